"""A tiny model trained with the centres sharded over every device of 1 or 2 processes.

Run by tests/test_head.py:

  python tests/_head_worker.py OUT.npz                           # one process, 8 devices
  python tests/_head_worker.py OUT.npz --process-id I --port P   # one of two, 4 each

A linear embedding (params replicated) and a (250, d) centre matrix padded to
256 and sharded over the 8 devices (`head.margin_term`, the trainer's path);
plain SGD on the ArcFace loss, with and without Partial-FC sampling. Process 0
writes the final params and centres.
"""

import argparse

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

NUM_CLASSES, IN_DIM, EMBED_DIM, BATCH, STEPS, LR = 250, 12, 8, 16, 4, 0.5
SCALE, M2 = 16.0, 0.5


def problem():
  """The data and initial parameters, identical in every process."""
  rng = np.random.default_rng(0)
  return {"inputs": rng.normal(size=(STEPS, BATCH, IN_DIM)).astype(np.float32),
          "labels": rng.integers(0, NUM_CLASSES, (STEPS, BATCH)).astype(np.int32),
          "params": rng.normal(size=(IN_DIM, EMBED_DIM)).astype(np.float32),
          "centres": rng.normal(size=(NUM_CLASSES, EMBED_DIM)).astype(np.float32)}


def _global(mesh, array, spec):
  sharding = NamedSharding(mesh, spec)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def train(sample_rate: float) -> tuple[np.ndarray, np.ndarray]:
  """Final (params, centres) after STEPS SGD steps over all of jax.devices()."""
  from arcjax import head, losses, margins, sharding  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh()
  data = problem()
  term = head.margin_term(
      losses.loss_config("arcface", s=SCALE, m2=M2),
      ml_collections.ConfigDict(dict(sharded=True, sample_rate=sample_rate, chunk_size=0)),
      NUM_CLASSES, mesh)

  @jax.jit
  def step(params, centres, inputs, labels, key):
    loss_fn = lambda p, c: term(inputs @ p, {"centres": c}, labels, key,
                                margins.make_margin(m2=M2), SCALE)[0]
    g_params, g_centres = jax.grad(loss_fn, argnums=(0, 1))(params, centres)
    return params - LR * g_params, centres - LR * g_centres

  padded = np.pad(data["centres"], ((0, head.padded_num_classes(NUM_CLASSES, mesh.size)
                                     - NUM_CLASSES), (0, 0)))
  params = _global(mesh, data["params"], P())
  centres = _global(mesh, padded, P(sharding.AXIS))
  for i in range(STEPS):
    params, centres = step(params, centres, _global(mesh, data["inputs"][i], P(sharding.AXIS)),
                           _global(mesh, data["labels"][i], P(sharding.AXIS)), jax.random.key(i))
  centres = multihost_utils.process_allgather(centres, tiled=True)
  return np.asarray(params.addressable_data(0)), np.asarray(centres)[:NUM_CLASSES]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("out")
  parser.add_argument("--process-id", type=int)
  parser.add_argument("--port", type=int)
  args = parser.parse_args()
  if args.process_id is None:
    jax.config.update("jax_num_cpu_devices", 8)
  else:
    jax.config.update("jax_num_cpu_devices", 4)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                               num_processes=2, process_id=args.process_id,
                               initialization_timeout=120)
  assert jax.device_count() == 8, jax.devices()
  results = {}
  for name, rate in [("full", 1.0), ("sampled", 0.5)]:
    results[f"{name}_params"], results[f"{name}_centres"] = train(rate)
  if jax.process_index() == 0:
    np.savez(args.out, **results)


if __name__ == "__main__":
  main()

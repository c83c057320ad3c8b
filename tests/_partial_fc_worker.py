"""A tiny model trained with the centres sharded over every device of 1 or 2 processes.

Run by tests/test_partial_fc.py:

  python tests/_partial_fc_worker.py OUT.npz                      # one process, 8 devices
  python tests/_partial_fc_worker.py OUT.npz --process-id I --port P   # one of two, 4 each

A linear embedding (params replicated) and a (250, d) centre matrix padded to
256 and sharded over the 8 devices; plain SGD on the ArcFace loss, with and
without Partial-FC sampling. Process 0 writes the final params and centres.
"""

import argparse

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

NUM_CLASSES, IN_DIM, EMBED_DIM, BATCH, STEPS, LR = 250, 12, 8, 16, 4, 0.5
MARGIN = dict(s=16.0, m2=0.5)


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
  from arcjax import partial_fc
  mesh = Mesh(np.array(jax.devices()), ("d",))
  num_shards = mesh.size
  data = problem()

  def inner(params, centres_shard, inputs, labels, key):
    def loss_fn(params, centres_shard):
      return partial_fc.sharded_margin_loss(
          inputs @ params, centres_shard, labels, axis_name="d", num_classes=NUM_CLASSES,
          sample_rate=sample_rate, key=key, **MARGIN)[0]
    g_params, g_centres = jax.grad(loss_fn, argnums=(0, 1))(params, centres_shard)
    g_params = jax.lax.pmean(g_params, "d")
    return params - LR * g_params, centres_shard - LR * g_centres

  step = jax.jit(jax.shard_map(
      inner, mesh=mesh, in_specs=(P(), P("d"), P("d"), P("d"), P()),
      out_specs=(P(), P("d")), check_vma=False))
  params = _global(mesh, data["params"], P())
  centres = _global(mesh, np.asarray(partial_fc.pad_classes(data["centres"], num_shards)), P("d"))
  for i in range(STEPS):
    params, centres = step(params, centres, _global(mesh, data["inputs"][i], P("d")),
                           _global(mesh, data["labels"][i], P("d")), jax.random.key(i))
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
                               initialization_timeout=60)
  assert jax.device_count() == 8, jax.devices()
  results = {}
  for name, rate in [("full", 1.0), ("sampled", 0.5)]:
    results[f"{name}_params"], results[f"{name}_centres"] = train(rate)
  if jax.process_index() == 0:
    np.savez(args.out, **results)


if __name__ == "__main__":
  main()

"""One process of the multi-process training test in tests/test_parallel.py.

  python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT DEVICES OUT_DIR

Trains a few steps of tiny_cnn on synthetic data in each mode ('mesh', 'pmap',
and 'sharded': 'mesh' with the centres split over the devices of both processes)
with `DEVICES` CPU devices per process, and saves this process's copy of the
parameters to OUT_DIR/{mode}_process{PROCESS_ID}.npz. With two processes it
then runs `train.train_and_evaluate` on the default data, together, in
OUT_DIR/run (pmap) and OUT_DIR/run_sharded (checkpoints written by both).
"""

import pathlib
import sys

import jax
import numpy as np

NUM_CLASSES, IMAGE_SHAPE, GLOBAL_BATCH, STEPS = 10, (16, 16, 1), 32, 3
MODES = ("mesh", "pmap", "sharded")


def _train_synthetic(mode: str, out_file: pathlib.Path) -> None:
  from arcjax import losses, parallel, train  # pylint: disable=import-outside-toplevel
  from arcjax.data import pipeline, sources  # pylint: disable=import-outside-toplevel
  from configs import default  # pylint: disable=import-outside-toplevel

  config = default.get_config()
  config.model.embedding_dim = 32
  config.loss = losses.loss_config("arcface", s=16.0)  # as in test_train's equivalence test
  # A small step: float rounding, which differs with the collectives' summation order,
  # then stays of its own size instead of being amplified by large updates.
  sharded = mode == "sharded"
  config.head.sharded = sharded
  config.train.update(batch_size=GLOBAL_BATCH, warmup_steps=0, schedule="piecewise",
                      lr=0.01, parallel="mesh" if sharded else mode)
  rng = np.random.default_rng(0)
  source = sources.ArraySource(rng.integers(0, 256, (256, *IMAGE_SHAPE), dtype=np.uint8),
                               rng.integers(0, NUM_CLASSES, 256), num_classes=NUM_CLASSES)
  par = parallel.parallel_for(config.train.parallel, shard_head=sharded)
  state = train.create_train_state(config, jax.random.key(0), NUM_CLASSES, IMAGE_SHAPE,
                                   num_shards=par.num_devices if sharded else 1)
  state = par.put_state(par.from_host(state))
  step = train.make_train_step(config, par, NUM_CLASSES)
  with pipeline.batches(source, global_batch_size=GLOBAL_BATCH, seed=0,
                        process_index=jax.process_index(),
                        process_count=jax.process_count()) as batches:
    for _ in range(STEPS):
      state, _ = step(state, par.put_batch(next(batches)))
  local = par.local_state(state)
  head = {"centres": local.head["centres"][:NUM_CLASSES]}  # without a sharded head's padding
  leaves = jax.tree_util.tree_flatten_with_path((local.params, head, local.batch_stats))[0]
  np.savez(out_file, **{jax.tree_util.keystr(path): leaf for path, leaf in leaves})


def _train_default(workdir: pathlib.Path, **head) -> None:
  from arcjax import train  # pylint: disable=import-outside-toplevel
  from configs import default  # pylint: disable=import-outside-toplevel

  config = default.get_config()
  config.model.embedding_dim = 32
  config.data.max_pairs = 200
  config.train.update(steps=6, batch_size=GLOBAL_BATCH, warmup_steps=0, checkpoint_every=3,
                      log_every=3, parallel="pmap")
  config.eval.every = 0
  config.eval.batch_size = 100
  config.angles.probe_size = 64
  config.wandb.mode = "disabled"
  if head:
    config.head.update(head)
    config.train.parallel = "mesh"
  train.train_and_evaluate(config, str(workdir))


def main(process_id: int, num_processes: int, port: int, devices: int, out: str) -> None:
  jax.config.update("jax_num_cpu_devices", devices)
  from arcjax import parallel  # pylint: disable=import-outside-toplevel
  if num_processes > 1:
    parallel.initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id)
  assert jax.process_count() == num_processes and jax.local_device_count() == devices
  out_dir = pathlib.Path(out)
  for mode in MODES:
    _train_synthetic(mode, out_dir / f"{mode}_process{process_id}.npz")
  if num_processes > 1:
    _train_default(out_dir / "run")
    _train_default(out_dir / "run_sharded", sharded=True, sample_rate=0.5, chunk_size=2)
  print(f"process {process_id} done", flush=True)


if __name__ == "__main__":
  main(*map(int, sys.argv[1:5]), sys.argv[5])

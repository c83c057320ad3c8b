"""One process of the multi-process training test in tests/test_sharding.py.

  python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT DEVICES OUT_DIR

Trains a few steps of tiny_cnn on synthetic data in each mode ('mesh', 'pmap',
and 'sharded': 'mesh' with the centres split over the devices of both processes)
with `DEVICES` CPU devices per process, and saves this process's copy of the
parameters to OUT_DIR/{mode}_process{PROCESS_ID}.npz. With two processes it
then runs `train.train_and_evaluate` on the default data, together, in
OUT_DIR/run (pmap) and OUT_DIR/run_sharded (checkpoints written by both), with
any gather of a sharded array inside a checkpoint save or restore made an
error, and restores the sharded run's last checkpoint once more to report how
many centre rows this process holds. With one process or two, it then trains a
pack of two runs ('mesh', seeds 0 and 1) in OUT_DIR/pack0 and OUT_DIR/pack1. Its
last line is that report, as JSON.
"""

import contextlib
import functools
import json
import pathlib
import sys

import jax
import numpy as np

NUM_CLASSES, IMAGE_SHAPE, GLOBAL_BATCH, STEPS = 10, (16, 16, 1), 32, 3
MODES = ("mesh", "pmap", "sharded")


def _train_synthetic(mode: str, out_file: pathlib.Path) -> None:
  from arcjax import losses, sharding, train  # pylint: disable=import-outside-toplevel
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
  par = sharding.parallelism_for(config.train, config.head)
  state = par.init(functools.partial(
      train.create_train_state, config, num_classes=NUM_CLASSES, image_shape=IMAGE_SHAPE,
      num_shards=par.num_devices if sharded else 1), jax.random.key(0))
  step = train.make_train_step(config, par, NUM_CLASSES, state)
  state = par.to_step(state)
  with pipeline.batches(source, global_batch_size=GLOBAL_BATCH, seed=0,
                        process_index=jax.process_index(),
                        process_count=jax.process_count()) as batches:
    for _ in range(STEPS):
      state, _ = step(state, par.put_batch(next(batches)))
  local = par.host(par.to_global(state))
  head = {"centres": local.head["centres"][:NUM_CLASSES]}  # without a sharded head's padding
  leaves = jax.tree_util.tree_flatten_with_path((local.params, head, local.batch_stats))[0]
  np.savez(out_file, **{jax.tree_util.keystr(path): leaf for path, leaf in leaves})


def _config(**head):
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
  return config


@contextlib.contextmanager
def _no_gather_inside_checkpoints():
  """Makes a gather of a sharded array an error while a checkpoint is saved or restored."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  from arcjax import workdir  # pylint: disable=import-outside-toplevel
  inside = []
  real_gather = multihost_utils.process_allgather

  def gather(tree, *args, **kwargs):
    sharded = [x for x in jax.tree.leaves(tree)
               if isinstance(x, jax.Array) and not x.sharding.is_fully_replicated]
    assert not (inside and sharded), "a checkpoint save or restore gathered a sharded array"
    return real_gather(tree, *args, **kwargs)

  def guarded(method):
    def run(*args, **kwargs):
      inside.append(True)
      try:
        return method(*args, **kwargs)
      finally:
        inside.pop()
    return run

  saved = (multihost_utils.process_allgather, workdir.Checkpoints.save,
           workdir.Checkpoints.restore_latest)
  multihost_utils.process_allgather = gather
  workdir.Checkpoints.save = guarded(saved[1])
  workdir.Checkpoints.restore_latest = guarded(saved[2])
  try:
    yield
  finally:
    (multihost_utils.process_allgather, workdir.Checkpoints.save,
     workdir.Checkpoints.restore_latest) = saved


def _restored_rows_here(workdir_path: pathlib.Path, config) -> dict[str, int]:
  """Restores the sharded run's newest checkpoint as a resume would; rows of centres here."""
  from arcjax import data, head, sharding, train, workdir  # pylint: disable=import-outside-toplevel
  par = sharding.parallelism_for(config.train, config.head)
  num_classes = data.get_datasets(config.data).num_classes
  init = functools.partial(train.create_train_state, config, num_classes=num_classes,
                           image_shape=(32, 32, 1), num_shards=par.num_devices)
  abstract = par.abstract(jax.eval_shape(init, jax.random.key(0)))
  checkpoints = workdir.Checkpoints(workdir.as_path(workdir_path))
  try:
    with _no_gather_inside_checkpoints():
      state, _ = checkpoints.restore_latest(
          abstract, sharding.match_tree(abstract, sharding.CLASS_ROWS))
  finally:
    checkpoints.close()
  centres = state.head["centres"]
  return {"restored_rows_here": sum(s.data.shape[0] for s in centres.addressable_shards),
          "padded_classes": head.padded_num_classes(num_classes, par.num_devices)}


def main(process_id: int, num_processes: int, port: int, devices: int, out: str) -> None:
  jax.config.update("jax_num_cpu_devices", devices)
  from arcjax import sharding, train  # pylint: disable=import-outside-toplevel
  if num_processes > 1:
    sharding.initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id)
  assert jax.process_count() == num_processes and jax.local_device_count() == devices
  out_dir = pathlib.Path(out)
  for mode in MODES:
    _train_synthetic(mode, out_dir / f"{mode}_process{process_id}.npz")
  report = {}
  if num_processes > 1:
    train.train_and_evaluate(_config(), str(out_dir / "run"))
    sharded = _config(sharded=True, sample_rate=0.5, chunk_size=2)
    with _no_gather_inside_checkpoints():
      train.train_and_evaluate(sharded, str(out_dir / "run_sharded"))
    report = _restored_rows_here(out_dir / "run_sharded", sharded)
  from arcjax import pack  # pylint: disable=import-outside-toplevel
  configs = [_config(), _config()]
  for seed, config in enumerate(configs):
    config.seed = seed
    config.train.update(parallel="mesh", lr=0.01)  # small steps: rounding stays its own size
  pack.train_pack(configs, [str(out_dir / f"pack{seed}") for seed in (0, 1)])
  print(f"process {process_id} done", flush=True)
  print(json.dumps(report), flush=True)


if __name__ == "__main__":
  main(*map(int, sys.argv[1:5]), sys.argv[5])

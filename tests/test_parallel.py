"""Meshes, layouts of batches and states, distributed start-up, and two processes training."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from arcjax import parallel

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _eight_devices():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")


def test_make_mesh_is_one_auto_batch_axis():
  mesh = parallel.make_mesh()
  assert mesh.axis_names == (parallel.AXIS,) and mesh.devices.size == 8
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,)


def test_shard_batch_puts_rows_in_order():
  mesh = parallel.make_mesh()
  batch = {"image": np.arange(16 * 3).reshape(16, 3), "label": np.arange(16, dtype=np.int32)}
  sharded = parallel.shard_batch(batch, mesh)
  assert sharded["image"].sharding == NamedSharding(mesh, P(parallel.AXIS))
  for shard in sharded["label"].addressable_shards:
    start = shard.index[0].start
    np.testing.assert_array_equal(np.asarray(shard.data), [start, start + 1])
  np.testing.assert_array_equal(np.asarray(sharded["image"]), batch["image"])


def test_split_for_pmap_shapes_and_error():
  split = parallel.split_for_pmap({"x": np.arange(24).reshape(8, 3)}, 4)
  np.testing.assert_array_equal(split["x"][1], [[6, 7, 8], [9, 10, 11]])
  with pytest.raises(ValueError, match="batch of 6 does not split over 4"):
    parallel.split_for_pmap({"x": np.zeros((6, 2))}, 4)


@pytest.mark.parametrize("mode", parallel.MODES)
def test_state_round_trips_through_every_mode(mode):
  par = parallel.parallel_for(mode)
  host = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.int32(7)}
  state = par.put_state(par.from_host(host))
  if mode == "pmap":
    assert state["w"].shape == (8, 2, 3)
  local = par.local_state(state)
  np.testing.assert_array_equal(local["w"], host["w"])
  assert local["step"] == 7 and local["step"].shape == ()
  restored = par.global_state(state)
  assert restored["w"].sharding.is_fully_replicated and len(restored["w"].sharding.device_set) == 8
  np.testing.assert_array_equal(parallel.host_copy(restored)["w"], host["w"])


def test_wrapped_step_means_over_the_global_batch():
  def step(state, batch, *, axis_name):
    mean = batch["x"].mean()
    if axis_name is not None:
      mean = jax.lax.pmean(mean, axis_name)
    return state + mean, mean

  batch = {"x": np.arange(16, dtype=np.float32)}
  for mode in parallel.MODES:
    par = parallel.parallel_for(mode)
    state = par.put_state(par.from_host(np.float32(1.0)))
    new_state, mean = par.wrap(step)(state, par.put_batch(batch))
    assert float(par.local_state(mean)) == pytest.approx(7.5), mode
    assert float(par.local_state(new_state)) == pytest.approx(8.5), mode


def test_initialize_distributed_single_process_is_a_no_op(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  assert parallel.initialize_distributed() is False


def test_initialize_distributed_names_missing_or_bad_values(monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
  monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
  monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
  with pytest.raises(ValueError, match="num_processes=None, process_id=None"):
    parallel.initialize_distributed()
  with pytest.raises(ValueError, match=r"process_id=2 is not in \[0, num_processes=2\)"):
    parallel.initialize_distributed(num_processes=2, process_id=2)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is not an integer"):
    parallel.initialize_distributed(process_id=0)


def test_parallel_for_unknown_mode():
  with pytest.raises(ValueError, match="unknown parallel mode 'ddp'"):
    parallel.parallel_for("ddp")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_workers(num_processes: int, devices: int, out: pathlib.Path) -> None:
  port = _free_port()
  env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
  workers = [subprocess.Popen(
      [sys.executable, str(REPO / "tests" / "multiprocess_worker.py"), str(i),
       str(num_processes), str(port), str(devices), str(out)],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
      for i in range(num_processes)]
  try:
    outputs = [w.communicate(timeout=300)[0].decode() for w in workers]
  finally:
    for w in workers:
      if w.poll() is None:
        w.kill()
  for i, (w, output) in enumerate(zip(workers, outputs)):
    assert w.returncode == 0, f"process {i}:\n{output[-4000:]}"


@pytest.mark.slow
def test_two_processes_train_together(tmp_path):
  # Build the default dataset's cache once, so the two processes only read it.
  from arcjax import data  # pylint: disable=import-outside-toplevel
  from configs import default  # pylint: disable=import-outside-toplevel
  data.get_datasets(default.get_config().data)

  (tmp_path / "two").mkdir()
  (tmp_path / "one").mkdir()
  _run_workers(2, 2, tmp_path / "two")
  _run_workers(1, 4, tmp_path / "one")  # one process with the same 4 devices and global batch
  for mode in ("mesh", "pmap", "sharded"):
    first, second, single = (np.load(tmp_path / d / f"{mode}_process{i}.npz")
                             for d, i in (("two", 0), ("two", 1), ("one", 0)))
    assert sorted(first) == sorted(single)
    for name in first:
      np.testing.assert_array_equal(first[name], second[name], err_msg=f"{mode} {name}")
      np.testing.assert_allclose(first[name], single[name], rtol=1e-5, atol=1e-5,
                                 err_msg=f"{mode} {name}")
  for run in ("run", "run_sharded"):
    results = json.loads((tmp_path / "two" / run / "results.json").read_text())
    assert results["step"] == 6 and 0.0 <= results["eval"]["holdout"]["accuracy"] <= 1.0
    assert sorted(p.name for p in (tmp_path / "two" / run / "checkpoints").iterdir()
                  if p.name.isdigit()) == ["3", "6"]

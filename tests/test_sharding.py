"""The mesh, partition rules, the step layouts of each mode, distributed start-up, and
training across two processes without a host ever holding the whole centre matrix."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from arcjax import errors, inference, sharding

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _eight_devices():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")


def _configs(parallel="mesh", sharded=False):
  return (ml_collections.ConfigDict(dict(parallel=parallel)),
          ml_collections.ConfigDict(dict(sharded=sharded)))


def test_make_mesh_is_one_auto_batch_axis():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == (sharding.AXIS,) and mesh.devices.size == 8
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,)


def test_rules_place_every_class_row_leaf_and_replicate_the_rest():
  state = {"params": {"conv": {"kernel": 0}}, "head": {"centres": 0, "bias": 0},
           "opt_state": [{"trace": {"head": {"centres": 0}, "backbone": {"kernel": 0}}}]}
  specs = sharding.partition_specs(state, sharding.partition_rules(shard_head=True))
  assert specs["head"]["centres"] == P(sharding.AXIS)
  assert specs["opt_state"][0]["trace"]["head"]["centres"] == P(sharding.AXIS)
  assert specs["head"]["bias"] == P() and specs["params"]["conv"]["kernel"] == P()
  replicated = sharding.partition_specs(state, sharding.partition_rules(shard_head=False))
  assert all(spec == P() for spec in jax.tree.leaves(replicated, is_leaf=lambda x: isinstance(x, P)))
  paths = [sharding.leaf_path(path) for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  assert "opt_state/0/trace/backbone/kernel" in paths and "head/centres" in paths


def test_init_computes_a_sharded_leaf_straight_into_its_shards():
  par = sharding.parallelism_for(*_configs(sharded=True))
  state = par.init(lambda key: {"centres": jax.random.normal(key, (16, 4)), "w": jnp.ones(3)},
                   jax.random.key(0))
  assert state["centres"].sharding == NamedSharding(par.mesh, P(sharding.AXIS))
  assert [s.data.shape for s in state["centres"].addressable_shards] == [(2, 4)] * 8
  assert state["w"].sharding.is_fully_replicated
  np.testing.assert_array_equal(par.host(state)["centres"],
                                jax.random.normal(jax.random.key(0), (16, 4)))


def test_inits_that_trace_to_one_program_compile_once_and_give_their_own_states():
  par = sharding.parallelism_for(*_configs())
  init = lambda shape: lambda key: {"w": jax.random.normal(key, shape), "b": jnp.zeros(3)}
  programs = {}
  states = [par.init(init((4, 2)), jax.random.key(seed), programs) for seed in (0, 1)]
  assert len(programs) == 1
  for seed, state in enumerate(states):
    alone = par.init(init((4, 2)), jax.random.key(seed))
    np.testing.assert_array_equal(par.host(state)["w"], par.host(alone)["w"])
  assert not np.array_equal(par.host(states[0])["w"], par.host(states[1])["w"])
  assert par.init(init((5, 2)), jax.random.key(0), programs)["w"].shape == (5, 2)
  assert len(programs) == 2


def test_put_batch_puts_rows_in_order():
  par = sharding.parallelism_for(*_configs())
  batch = {"image": np.arange(16 * 3).reshape(16, 3), "label": np.arange(16, dtype=np.int32)}
  placed = par.put_batch(batch)
  assert placed["image"].sharding == NamedSharding(par.mesh, P(sharding.AXIS))
  for shard in placed["label"].addressable_shards:
    start = shard.index[0].start
    np.testing.assert_array_equal(np.asarray(shard.data), [start, start + 1])
  pmap_batch = sharding.parallelism_for(*_configs("pmap")).put_batch(batch)
  np.testing.assert_array_equal(pmap_batch["image"][1], batch["image"][2:4])


@pytest.mark.parametrize("mode", sharding.MODES)
def test_state_round_trips_between_the_step_and_global_layouts(mode):
  par = sharding.parallelism_for(*_configs(mode))
  host = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.int32(7)}
  state = par.init(lambda key: jax.tree.map(jnp.asarray, host), jax.random.key(0))
  stepped = par.to_step(state)
  if mode == "pmap":
    assert stepped["w"].shape == (8, 2, 3)
  back = par.to_global(stepped)
  assert back["w"].sharding.is_fully_replicated
  assert len(back["w"].sharding.device_set) == (1 if mode == "none" else 8)
  np.testing.assert_array_equal(par.host(back)["w"], host["w"])
  assert par.host(back)["step"] == 7


def test_compiled_step_means_over_the_global_batch():
  def step(state, batch, collectives):
    mean = collectives.mean(batch["x"].mean())
    return state + mean, mean

  batch = {"x": np.arange(16, dtype=np.float32)}
  for mode in sharding.MODES:
    par = sharding.parallelism_for(*_configs(mode))
    state = par.init(lambda key: jnp.float32(1.0), jax.random.key(0))
    compiled = par.compile(lambda s, b: step(s, b, par.collectives), state)
    new_state, mean = compiled(par.to_step(state), par.put_batch(batch))
    assert float(np.ravel(mean)[0]) == pytest.approx(7.5), mode
    assert float(par.host(par.to_global(new_state))) == pytest.approx(8.5), mode


def test_a_packs_runs_each_split_their_batch_over_the_devices():
  """runs=True: a leading run axis on states and batches; each run's batch split over the mesh
  axis as a solo run's, its mean over its own global batch; metrics one row per run."""
  par = sharding.parallelism_for(*_configs())
  batch = {"x": np.arange(3 * 16, dtype=np.float32).reshape(3, 16)}
  placed = par.put_batch(batch, runs=True)
  assert placed["x"].sharding == NamedSharding(par.mesh, P(None, sharding.AXIS))
  for shard in placed["x"].addressable_shards:
    assert shard.data.shape == (3, 2)
  states = par.init(lambda key: jnp.zeros((3,), jnp.float32), jax.random.key(0))

  def step(states, batches, hparams, active):
    means = batches["x"].mean(axis=1)
    return jnp.where(active, states + hparams["scale"] * means, states), {"mean": means}

  compiled = par.compile(step, states, runs=True)
  new_states, metrics = compiled(states, placed, {"scale": jnp.float32(2.0)},
                                 jnp.asarray([True, False, True]))
  np.testing.assert_allclose(par.host(new_states), [2 * 7.5, 0.0, 2 * 39.5])
  assert [row["mean"] for row in par.run_scalars(metrics)] == [7.5, 23.5, 39.5]
  with pytest.raises(errors.ConfigError, match="'mesh' or 'none'"):
    sharding.parallelism_for(*_configs("pmap")).compile(step, states, runs=True)


def test_a_pack_lays_its_runs_over_a_mesh_axis_where_the_devices_allow():
  """for_pack: 4 runs on 8 devices → (runs 4, batch 2): each device holds one run's state and
  half of that run's batch; the step's means are each run's over its own global batch."""
  par = sharding.parallelism_for(*_configs())
  assert par.for_pack(3) is par and par.for_pack(1) is par
  assert sharding.parallelism_for(*_configs("none")).for_pack(4).mesh.devices.size == 1
  pack = par.for_pack(4)
  assert dict(pack.mesh.shape) == {sharding.RUN_AXIS: 4, sharding.AXIS: 2}
  assert dict(par.for_pack(6).mesh.shape) == {sharding.RUN_AXIS: 2, sharding.AXIS: 4}
  batch = {"x": np.arange(4 * 16, dtype=np.float32).reshape(4, 16)}
  placed = pack.put_batch(batch, runs=True)
  for shard in placed["x"].addressable_shards:
    run, rows = shard.index[0].start, shard.index[1]
    assert shard.data.shape == (1, 8)
    np.testing.assert_array_equal(np.asarray(shard.data)[0], batch["x"][run, rows])
  states = jax.device_put(jnp.zeros((4,), jnp.float32), pack.run_shardings(jnp.float32(0)))
  assert [shard.data.shape for shard in states.addressable_shards] == [(1,)] * 8

  def step(states, batches, hparams, active):
    means = batches["x"].mean(axis=1)
    return jnp.where(active, states + hparams["scale"] * means, states), {"mean": means}

  new_states, metrics = pack.compile(step, jnp.float32(0), runs=True)(
      states, placed, {"scale": jnp.float32(2.0)}, jnp.asarray([True, True, False, True]))
  assert new_states.sharding.spec == P(sharding.RUN_AXIS)
  np.testing.assert_allclose(pack.host(new_states), [15.0, 47.0, 0.0, 111.0])
  assert [row["mean"] for row in pack.run_scalars(metrics)] == [7.5, 23.5, 39.5, 55.5]


def test_a_replicated_head_that_fills_a_device_gets_a_note():
  """2 M identities × 512 with SGD momentum: 7.6 GiB of class rows, past a quarter of 16 GiB."""
  state = {"head": {"centres": jax.ShapeDtypeStruct((2_000_000, 512), jnp.float32)},
           "opt_state": {"trace": {"head": {"centres": jax.ShapeDtypeStruct((2_000_000, 512),
                                                                              jnp.float32)}}},
           "params": {"kernel": jax.ShapeDtypeStruct((10**8,), jnp.float32)}}
  note = sharding.replicated_head_note(state, 16 * 2**30)
  assert note is not None and "7.6 GiB of each device's 16.0 GiB" in note
  assert "config.head.sharded=True" in note
  assert sharding.replicated_head_note(state, 64 * 2**30) is None  # 7.6 GiB < 16 GiB
  assert sharding.replicated_head_note(state, None) is None       # the CPU does not say


def test_bad_modes_are_config_errors():
  with pytest.raises(errors.ConfigError, match="train.parallel must be one of"):
    sharding.parallelism_for(*_configs("ddp"))
  with pytest.raises(errors.ConfigError, match="runs under train.parallel='mesh'"):
    sharding.parallelism_for(*_configs("pmap", sharded=True))


def test_initialize_distributed_single_process_is_a_no_op(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  assert sharding.initialize_distributed() is False


def test_initialize_distributed_names_missing_or_bad_values(monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
  monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
  monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
  with pytest.raises(errors.ConfigError, match="num_processes=None, process_id=None"):
    sharding.initialize_distributed()
  with pytest.raises(errors.ConfigError, match=r"process_id=2 is not in \[0, num_processes=2\)"):
    sharding.initialize_distributed(num_processes=2, process_id=2)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(errors.ConfigError, match="JAX_NUM_PROCESSES='two' is not an integer"):
    sharding.initialize_distributed(process_id=0)


# --- Two processes --------------------------------------------------------------------


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_workers(num_processes: int, devices: int, out: pathlib.Path) -> list[str]:
  port = _free_port()
  env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
  workers = [subprocess.Popen(
      [sys.executable, str(REPO / "tests" / "multiprocess_worker.py"), str(i),
       str(num_processes), str(port), str(devices), str(out)],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
      for i in range(num_processes)]
  try:
    outputs = [w.communicate(timeout=900)[0].decode() for w in workers]
  finally:
    for w in workers:
      if w.poll() is None:
        w.kill()
  for i, (w, output) in enumerate(zip(workers, outputs)):
    assert w.returncode == 0, f"process {i}:\n{output[-4000:]}"
  return outputs


@pytest.mark.slow
def test_two_processes_train_together(tmp_path):
  (tmp_path / "two").mkdir()
  (tmp_path / "one").mkdir()
  outputs = _run_workers(2, 2, tmp_path / "two")
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
  # A pack over two processes (each run's batch over the 4 devices of both) trains as over
  # one process's 4 devices (there: runs over a mesh axis, 2 × 2).
  for seed in (0, 1):
    two, one = (inference.load_run(tmp_path / d / f"pack{seed}") for d in ("two", "one"))
    assert json.loads((tmp_path / "two" / f"pack{seed}" / "results.json").read_text())["step"] == 6
    wants = dict(jax.tree_util.tree_leaves_with_path((one.centres, one.variables)))
    for path, got in jax.tree_util.tree_leaves_with_path((two.centres, two.variables)):
      if jax.tree_util.keystr(path).endswith("['fc']['bias']"):
        continue  # BatchNorm follows: no gradient, only each program's rounding
      want = np.asarray(wants[path], np.float64)
      difference = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
      # Measured: 1.7e-4 at most (a BatchNorm bias); two layouts' summation orders, 6 steps.
      assert difference <= 1e-3, (seed, jax.tree_util.keystr(path), difference)
  # Each process held only its half of the sharded centres when saving and restoring
  # (the worker fails if a gather ran inside either).
  for i, output in enumerate(outputs):
    report = json.loads(output.strip().splitlines()[-1])
    assert report["restored_rows_here"] * 2 == report["padded_classes"], (i, report)

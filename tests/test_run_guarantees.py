"""What a run guarantees, each shown by injecting the fault: bit-exact resume after SIGKILL
and SIGINT, one run per workdir, no silent config change, finite checkpoints only, damaged
checkpoints skipped, results rewritten whole, and one clear line for every expected error."""

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from arcjax import errors, optim, train, workdir
from configs import default

REPO = pathlib.Path(__file__).resolve().parents[1]
# Seconds, not a speed assertion: how long a slow, shared CI machine may take.
PATIENCE = 600
SMALL = ("--config.train.batch_size=32", "--config.train.warmup_steps=0",
         "--config.train.schedule=piecewise", "--config.train.checkpoint_every=5",
         "--config.train.keep_checkpoints=20", "--config.train.log_every=5",
         "--config.model.embedding_dim=32", "--config.model.dropout=0.2",
         "--config.data.max_pairs=200", "--config.eval.every=0",
         "--config.angles.probe_size=64", "--config.wandb.mode=disabled")


def _start(workdir_path: pathlib.Path, steps: int, *extra: str, devices: int = 2,
           config: str = "configs/default.py") -> subprocess.Popen:
  command = [sys.executable, "-m", "arcjax.main", f"--config={config}",
             f"--workdir={workdir_path}", f"--config.train.steps={steps}", *SMALL, *extra]
  return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True,
                          env={**os.environ, "XLA_FLAGS":
                               f"--xla_force_host_platform_device_count={devices}"})


def _finish(process: subprocess.Popen, returncode: int = 0) -> tuple[str, str]:
  out, err = process.communicate(timeout=PATIENCE)
  assert process.returncode == returncode, (process.returncode, out[-2000:], err[-3000:])
  return out, err


def _one_error_line(err: str) -> str:
  """The stderr of a failed command: exactly one `error:` line, no traceback."""
  assert "Traceback" not in err, err[-3000:]
  lines = [line for line in err.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, err[-3000:]
  return lines[0]


def _wait_for(condition, process: subprocess.Popen, what: str) -> None:
  deadline = time.monotonic() + PATIENCE
  while not condition():
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.monotonic() < deadline, f"no {what} within {PATIENCE} s"
    time.sleep(0.05)


def _checkpoint(path: pathlib.Path, step: int | None = None):
  with ocp.CheckpointManager(path / "checkpoints", item_handlers={
      "state": ocp.PyTreeCheckpointHandler()}) as manager:
    step = manager.latest_step() if step is None else step
    return step, manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore()))["state"]


def _rows(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigkill_and_sigint_then_resume_are_bit_identical(tmp_path):
  steps = 30
  _finish(_start(tmp_path / "reference", steps))
  run = tmp_path / "run"
  process = _start(run, steps)
  # orbax renames a finished checkpoint to its step number: kill once one exists.
  _wait_for(lambda: (run / "checkpoints" / "10").is_dir(), process, "checkpoint 10")
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not (run / "results.json").exists()

  process = _start(run, steps)
  _wait_for(lambda: (run / "checkpoints" / "20").is_dir(), process, "checkpoint 20")
  process.send_signal(signal.SIGINT)
  _, err = _finish(process, errors.EXIT_INTERRUPTED)
  line = _one_error_line(err)
  stopped_at = int(line.split("at step ")[1].split(";")[0])
  assert f"checkpoint {stopped_at} saved" in line and stopped_at >= 20, line
  assert (run / "checkpoints" / str(stopped_at)).is_dir()

  _finish(_start(run, steps))
  _, want = _checkpoint(tmp_path / "reference", steps)
  _, got = _checkpoint(run, steps)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
  results = json.loads((run / "results.json").read_text())
  reference = json.loads((tmp_path / "reference" / "results.json").read_text())
  assert results["eval"] == reference["eval"] and results["angle_stats"] == reference["angle_stats"]
  assert results["train_loss"] is not None
  rows = _rows(run)
  pairs = [(row["step"], key) for row in rows for key in row if key != "step"]
  assert len(pairs) == len(set(pairs)), "a (step, metric) pair appears twice"
  assert [row["step"] for row in rows] == sorted(row["step"] for row in rows)


@pytest.mark.slow
@pytest.mark.parametrize("row, state", [("curricularface", ("t",)),
                                        ("adaface", ("norm_mean", "norm_std"))])
def test_a_loss_state_resumes_bit_exact_after_sigkill(tmp_path, row, state):
  """The family's running state (CurricularFace's t, AdaFace's norm statistics) lives in the
  checkpoint: a run killed after checkpoint 10 and started again ends as one never stopped,
  on 2 devices (the state a statistic of the global batch)."""
  steps, config = 20, f"configs/ablations.py:{row}"
  _finish(_start(tmp_path / "reference", steps, config=config))
  run = tmp_path / "run"
  process = _start(run, steps, config=config)
  _wait_for(lambda: (run / "checkpoints" / "10").is_dir(), process, "checkpoint 10")
  process.send_signal(signal.SIGKILL)
  process.wait()
  _, saved = _checkpoint(run, 10)
  _finish(_start(run, steps, config=config))
  _, want = _checkpoint(tmp_path / "reference", steps)
  _, got = _checkpoint(run, steps)
  assert sorted(got["loss_state"]) == sorted(state)
  for name in state:  # the state moved after step 10: a resume must have restored it
    assert np.asarray(got["loss_state"][name]) != np.asarray(saved["loss_state"][name])
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a))


@pytest.mark.slow
def test_a_busy_workdir_is_refused_and_a_dead_holder_s_lock_taken_over(tmp_path):
  # Long enough never to finish nor checkpoint before it is killed below.
  first = _start(tmp_path, 100_000, "--config.train.checkpoint_every=100000")
  # The holder takes the lock, then writes config.json (atomically): wait for both.
  _wait_for(lambda: (tmp_path / "config.json").exists()
            and str(first.pid) in (tmp_path / "lock").read_text(), first, "lock and config")
  config_before = (tmp_path / "config.json").read_bytes()
  second = _start(tmp_path, 400, "--config.train.lr=0.5")
  _, err = _finish(second, 1)
  line = _one_error_line(err)
  assert f"is in use by pid {first.pid}" in line, line
  assert (tmp_path / "config.json").read_bytes() == config_before
  first.send_signal(signal.SIGKILL)
  first.wait()
  out, _ = _finish(_start(tmp_path, 10))
  assert f"taking over the stale lock of {tmp_path} (pid {first.pid}" in out, out[-2000:]
  assert json.loads((tmp_path / "results.json").read_text())["step"] == 10


@pytest.mark.slow
def test_a_changed_config_is_refused_before_anything_is_written(tmp_path):
  _finish(_start(tmp_path, 10))
  config_before = (tmp_path / "config.json").read_bytes()
  _, err = _finish(_start(tmp_path, 20, "--config.seed=7", "--config.train.lr=0.5"), 1)
  line = _one_error_line(err)
  assert "seed: 0 → 7" in line and "train.lr: 0.1 → 0.5" in line, line
  assert "train.steps" not in line  # a longer run changes nothing that was trained
  _, err = _finish(_start(tmp_path, 10, "--config.model.embedding_dim=64"), 1)
  assert "model.embedding_dim: 32 → 64" in _one_error_line(err)
  assert (tmp_path / "config.json").read_bytes() == config_before
  assert not (tmp_path / "config_history.jsonl").exists()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["10", "5"]

  _finish(_start(tmp_path, 20, "--config.seed=7", "--config.train.lr=0.5",
                 "--allow_config_change"))
  history = [json.loads(line) for line in
             (tmp_path / "config_history.jsonl").read_text().splitlines()]
  changed = {c["field"]: [c["stored"], c["requested"]] for c in history[0]["changes"]}
  assert changed == {"seed": [0, 7], "train.lr": [0.1, 0.5], "train.steps": [10, 20]}
  assert history[0]["allowed_by_flag"] is True
  assert json.loads((tmp_path / "config.json").read_text())["seed"] == 7
  _finish(_start(tmp_path, 25, "--config.seed=7", "--config.train.lr=0.5"))  # free: steps only
  history = (tmp_path / "config_history.jsonl").read_text().splitlines()
  assert len(history) == 2 and json.loads(history[1])["allowed_by_flag"] is False


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["emptied", "truncated"])
def test_a_damaged_newest_checkpoint_is_named_and_skipped(tmp_path, damage):
  _finish(_start(tmp_path, 15))
  newest = tmp_path / "checkpoints" / "15"
  for file in (p for p in newest.rglob("*") if p.is_file()):
    if damage == "emptied":
      file.unlink()
    else:
      file.write_bytes(file.read_bytes()[:len(file.read_bytes()) // 2])
  out, _ = _finish(_start(tmp_path, 20))
  assert "checkpoint 15 in" in out and "is damaged" in out, out[-2000:]
  kept_aside = sorted(p.name.split("-")[0] for p in (tmp_path / "checkpoints_damaged").iterdir())
  assert kept_aside == ["15", "README"]
  step, state = _checkpoint(tmp_path)
  assert step == 20 and int(state["step"]) == 20
  train_steps = [row["step"] for row in _rows(tmp_path) if "train/loss" in row]
  assert train_steps == [5, 10, 15, 20]  # the rows of the lost steps 11-15 written again, once


@pytest.mark.slow
def test_flipped_bytes_in_a_checkpoint_are_damage_and_the_older_one_resumes(tmp_path):
  """Bytes flipped in a file of the newest checkpoint, its size unchanged: orbax restores such
  a file without a word, the SHA-256 recorded at save does not match it."""
  _finish(_start(tmp_path, 15))
  newest = tmp_path / "checkpoints" / "15"
  file = max((p for p in newest.rglob("*") if p.is_file() and p.name != "SHA256SUMS"),
             key=lambda p: p.stat().st_size)
  data = bytearray(file.read_bytes())
  data[len(data) // 2] ^= 0x10
  file.write_bytes(bytes(data))
  out, _ = _finish(_start(tmp_path, 20))
  assert "checkpoint 15 in" in out and "does not match the SHA-256" in out, out[-2000:]
  assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints_damaged").iterdir()
          if p.is_dir()] == ["15"]
  train_steps = [row["step"] for row in _rows(tmp_path) if "train/loss" in row]
  assert train_steps == [5, 10, 15, 20]  # resumed from 10: steps 11-15 trained again


@pytest.mark.slow
def test_a_refused_resume_writes_nothing_and_a_shape_change_moves_nothing(tmp_path):
  _finish(_start(tmp_path, 10))
  config_before = (tmp_path / "config.json").read_bytes()
  rows_before = _rows(tmp_path)
  # A batch that does not split over the devices: refused before config.json is rewritten.
  _, err = _finish(_start(tmp_path, 20, devices=3), 1)
  assert "does not split over the 3 devices" in _one_error_line(err)
  assert (tmp_path / "config.json").read_bytes() == config_before
  # A change of the trained state's shapes: refused even with the flag, nothing moved.
  _, err = _finish(_start(tmp_path, 10, "--config.model.embedding_dim=64",
                          "--allow_config_change"), 1)
  line = _one_error_line(err)
  assert "model.embedding_dim: 32 → 64" in line, line
  assert f"--config.train.init_from={tmp_path}" in line, line
  assert (tmp_path / "config.json").read_bytes() == config_before
  assert not (tmp_path / "config_history.jsonl").exists()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["10", "5"]
  assert not (tmp_path / "checkpoints_damaged").exists()
  # The original command finds its finished run, as before.
  _finish(_start(tmp_path, 10))
  assert _rows(tmp_path) == rows_before
  assert json.loads((tmp_path / "results.json").read_text())["step"] == 10


def _nan_from_step(step: int):
  """A learning rate that is NaN from update `step` (from 1) on: that update's state is NaN."""
  real = optim.make_schedule
  return lambda train_config, hparams=None: (
      lambda t: jax.numpy.where(t >= step - 1, jax.numpy.nan, real(train_config, hparams)(t)))


def _in_process_config(steps: int, **train_changes):
  config = default.get_config()
  config.model.embedding_dim = 32
  config.data.max_pairs = 200
  config.train.update(steps=steps, batch_size=32, warmup_steps=0, checkpoint_every=5,
                      log_every=5, keep_checkpoints=10, schedule="piecewise", **train_changes)
  config.eval.every = 0
  config.angles.probe_size = 64
  config.wandb.mode = "disabled"
  return config


@pytest.mark.slow
def test_a_non_finite_state_never_reaches_a_checkpoint(tmp_path, monkeypatch):
  monkeypatch.setattr(optim, "make_schedule", _nan_from_step(8))
  with pytest.raises(errors.TrainingError,
                     match=r"non-finite .* at step 8\b.*the newest checkpoint, step 5 in"):
    train.train_and_evaluate(_in_process_config(20), str(tmp_path))
  step, state = _checkpoint(tmp_path)
  assert step == 5
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state)
             if np.issubdtype(np.asarray(leaf).dtype, np.floating))
  assert not (tmp_path / "results.json").exists()
  monkeypatch.undo()
  results = train.train_and_evaluate(_in_process_config(20), str(tmp_path))  # resumes at 5
  assert results["step"] == 20 and np.isfinite(results["train_loss"])


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ("--config.train.lr=1e38", "non-finite"),
    ("--config.train.lr=1e4", "training diverged: parameter norm"),
])
def test_an_exploding_run_stops_with_one_line_and_keeps_finite_checkpoints(tmp_path, override,
                                                                            message):
  _, err = _finish(_start(tmp_path, 40, override, "--config.train.checkpoint_every=1",
                          "--config.train.momentum=0.0"), 1)
  line = _one_error_line(err)
  assert message in line and "lower config.train.lr" in line, line
  for folder in (tmp_path / "checkpoints").glob("*"):  # none where step 1 diverged
    _, state = _checkpoint(tmp_path, int(folder.name))
    leaves = [np.asarray(x) for x in jax.tree.leaves(state)]
    assert all(np.isfinite(x).all() for x in leaves if np.issubdtype(x.dtype, np.floating))
  # A smaller learning rate continues from the last finite checkpoint (or from scratch).
  _finish(_start(tmp_path, 40, "--config.train.lr=0.05", "--config.train.checkpoint_every=1",
                 "--config.train.momentum=0.0", "--allow_config_change"))


@pytest.mark.slow
def test_a_run_killed_before_its_results_writes_them_whole_when_run_again(tmp_path):
  _finish(_start(tmp_path, 10))
  before = json.loads((tmp_path / "results.json").read_text())
  (tmp_path / "results.json").unlink()
  (tmp_path / "angle_stats.json").unlink()
  rows_before = _rows(tmp_path)
  _finish(_start(tmp_path, 10))
  after = json.loads((tmp_path / "results.json").read_text())
  assert after == before and after["train_loss"] is not None
  assert _rows(tmp_path) == rows_before  # nothing written twice
  assert (tmp_path / "angle_stats.json").exists()


@contextlib.contextmanager
def _tiny_filesystem(path: pathlib.Path, size: str):
  path.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True, text=True, check=False)
  if mounted.returncode:
    pytest.skip(f"cannot mount a tiny tmpfs here ({mounted.stderr.strip()}): needs root")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.slow
def test_a_full_disk_is_one_line(tmp_path):
  with _tiny_filesystem(tmp_path / "tiny", "600k") as tiny:
    _, err = _finish(_start(tiny / "run", 20), 1)
  line = _one_error_line(err)
  assert line.startswith("error: disk full"), line


def test_record_config_refuses_before_writing(tmp_path):
  """The provenance rule itself, without a run: a checkpointed workdir keeps its config."""
  directory = workdir.as_path(tmp_path)
  config = default.get_config()
  workdir.record_config(directory, config)
  (tmp_path / "checkpoints" / "5").mkdir(parents=True)
  config.train.lr, config.eval.every = 0.5, 7
  with pytest.raises(errors.WorkdirError, match=r"train.lr: 0.1 → 0.5$|train.lr: 0.1 → 0.5;"):
    workdir.record_config(directory, config)
  assert json.loads((tmp_path / "config.json").read_text())["train"]["lr"] == 0.1
  changes = workdir.record_config(directory, config, allow_changes=True)
  assert [(c.field, c.free) for c in changes] == [("eval.every", True), ("train.lr", False)]


@pytest.mark.slow
def test_a_sharded_run_resumes_on_any_device_count(tmp_path):
  """Saved with the 200 centres sharded over 3 devices (padded to 201), restored onto 8
  (200, no padding) with the same numbers, then trained on 1 device unsharded, then on 3."""
  sharded = ("--config.head.sharded=True", "--config.train.batch_size=48")
  _finish(_start(tmp_path, 10, *sharded, devices=3))
  before = json.loads((tmp_path / "results.json").read_text())
  (tmp_path / "results.json").unlink()
  _finish(_start(tmp_path, 10, *sharded, devices=8))  # restores step 10, evaluates again
  after = json.loads((tmp_path / "results.json").read_text())
  assert after["eval"] == before["eval"] and after["angle_stats"] == before["angle_stats"]
  _finish(_start(tmp_path, 15, "--config.train.batch_size=48", devices=1))
  step, state = _checkpoint(tmp_path)
  assert step == 15 and state["head"]["centres"].shape == (200, 32)
  _finish(_start(tmp_path, 20, *sharded, devices=3))
  step, state = _checkpoint(tmp_path)
  assert step == 20 and state["head"]["centres"].shape == (201, 32)
  np.testing.assert_array_equal(state["head"]["centres"][200], 0.0)  # padding stays zero
  assert np.isfinite(state["head"]["centres"]).all()

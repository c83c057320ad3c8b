"""The pack trainer (`arcjax.pack`): runs trained together, each as it trains alone, each in a
workdir of its own with a solo run's files, its faults its own."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from arcjax import errors, pack, train
from configs import default

REPO = pathlib.Path(__file__).resolve().parents[1]
# Seconds, not a speed assertion: how long a slow, shared CI machine may take.
PATIENCE = 600
SMALL = ("--config.train.batch_size=32", "--config.train.warmup_steps=0",
         "--config.train.schedule=piecewise", "--config.train.checkpoint_every=5",
         "--config.train.keep_checkpoints=20", "--config.train.log_every=5",
         "--config.model.embedding_dim=32", "--config.data.max_pairs=200",
         "--config.eval.every=0", "--config.angles.probe_size=64",
         "--config.wandb.mode=disabled")


def _config(steps: int, seed: int = 0, *, lr: float = 0.1, **loss):
  config = default.get_config()
  config.seed = seed
  config.model.embedding_dim = 32
  config.data.max_pairs = 200
  config.train.update(steps=steps, lr=lr, batch_size=32, warmup_steps=0, checkpoint_every=5,
                      log_every=5, keep_checkpoints=10, schedule="piecewise")
  config.loss.update(loss)
  config.eval.every = 0
  config.angles.probe_size = 64
  config.wandb.mode = "disabled"
  return config


def _checkpoint(path: pathlib.Path, step: int | None = None):
  with ocp.CheckpointManager(path / "checkpoints", item_handlers={
      "state": ocp.PyTreeCheckpointHandler()}) as manager:
    step = manager.latest_step() if step is None else step
    return step, manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore()))["state"]


def _files(path: pathlib.Path) -> set[str]:
  """The files under `path`, content-addressed names (orbax's, wandb's) as '*'."""
  names = set()
  for file in (p for p in path.rglob("*") if p.is_file()):
    parts = file.relative_to(path).parts
    if parts[0] == "wandb":  # a folder per start, named by the time
      parts = parts[:2] if not parts[1].startswith("offline-run") else ("wandb", "offline-run")
    names.add("/".join(re.sub(r"^[0-9a-f]{32}$", "*", part) for part in parts))
  return names


def _floats(state) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(state)
          if np.issubdtype(np.asarray(x).dtype, np.floating)]


def _leaf(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def _rows(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _segments(path: pathlib.Path) -> list[tuple]:
  return [(s["from_step"], s["trained"], s.get("pack"))
          for s in json.loads((path / "trained_in.json").read_text())]


@pytest.mark.slow
def test_a_pack_trains_each_run_as_alone_and_runs_move_between_solo_and_pack(tmp_path):
  """Three runs (seeds, margins, learning rates, one with an Intra term) 5 steps in a pack and
  each alone: the same parameters to float rounding, the same files. Then a solo run goes on
  in a pack beside a new run (different start steps), then alone again."""
  configs = [_config(5, 0), _config(5, 1, lr=0.05, m2=0.3), _config(5, 2, intra_weight=1.0)]
  solos = [tmp_path / f"solo{i}" for i in range(3)]
  packed = [tmp_path / f"pack{i}" for i in range(3)]
  for config, path in zip(configs, solos):
    train.train_and_evaluate(config, str(path))
  results = pack.train_pack(configs, [str(p) for p in packed])
  worst, worst_cosine, worst_row = 0.0, 1.0, 1.0
  for config, solo, packed_run, result in zip(configs, solos, packed, results):
    assert _files(packed_run) == _files(solo)
    assert (packed_run / "config.json").read_text() == (solo / "config.json").read_text()
    assert [(row["step"], sorted(row)) for row in _rows(packed_run)] == [
        (row["step"], sorted(row)) for row in _rows(solo)]  # each run's own metrics, as solo
    assert json.loads((packed_run / "results.json").read_text()) == result
    assert result["step"] == 5 and np.isfinite(result["train_loss"])
    (step, want), (_, got) = _checkpoint(solo), _checkpoint(packed_run)
    assert step == 5 and int(got["step"]) == 5
    for path, a in jax.tree_util.tree_leaves_with_path(got["params"]):
      name = jax.tree_util.keystr(path)
      if name == "['fc']['bias']":  # BatchNorm follows: no gradient, only each program's rounding
        continue
      b = np.asarray(_leaf(want["params"], path), np.float64)
      worst = max(worst, np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))
    a = np.asarray(got["head"]["centres"], np.float64)
    b = np.asarray(want["head"]["centres"], np.float64)
    rows = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    worst_row = min(worst_row, rows.min())
    worst_cosine = min(worst_cosine, np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b))
    assert _segments(packed_run) == [(0, "pack", sorted(str(p) for p in packed
                                                       if p != packed_run))]
  # Measured: 1.2e-2, 0.99999915, 0.99989 (each step within 3e-5 of its solo step, amplified by
  # the first steps' sensitivity, `train.make_pack_step`).
  print(f"pack vs solo after 5 steps: largest relative difference of a parameter leaf "
        f"{worst:.1e}; smallest cosine of the centres {worst_cosine:.8f}, of a centre "
        f"{worst_row:.6f}")
  assert worst <= 5e-2
  assert worst_cosine >= 0.9999
  assert worst_row >= 0.999

  # solo (0-5) → a pack beside a new run (5-10, the new one 0-10) → solo again (10-15).
  fresh = tmp_path / "fresh"
  pack.train_pack([_config(10, 0), _config(10, 3, m2=0.3)], [str(solos[0]), str(fresh)])
  assert _checkpoint(fresh)[0] == 10 and _checkpoint(solos[0])[0] == 10
  train.train_and_evaluate(_config(15, 0), str(solos[0]))
  assert _segments(solos[0]) == [(0, "solo", None), (5, "pack", [str(fresh)]),
                                 (10, "solo", None)]
  assert _segments(fresh) == [(0, "pack", [str(solos[0])])]
  assert not (solos[0] / "config_history.jsonl").read_text().count("allowed_by_flag\": true")
  assert [row["step"] for row in _rows(solos[0]) if "train/loss" in row] == [5, 10, 15]


@pytest.mark.slow
def test_a_non_finite_run_stops_alone_and_a_damaged_checkpoint_is_set_aside(tmp_path, capsys):
  good, bad = tmp_path / "good", tmp_path / "bad"
  configs = [_config(5, 0), _config(5, 1, lr=1e38)]
  for config in configs:
    config.train.checkpoint_every = 1
  with pytest.raises(errors.TrainingError, match=rf"1 of the pack's 2 runs failed \({bad}\)"):
    pack.train_pack(configs, [str(good), str(bad)])
  out = capsys.readouterr().out
  assert f"[{bad}] error: non-finite" in out, out[-3000:]
  assert f"[{bad}] failed: non-finite" in out and f"[{good}] finished" in out
  assert json.loads((good / "results.json").read_text())["step"] == 5
  assert not (bad / "results.json").exists()
  for folder in (bad / "checkpoints").glob("[0-9]*"):  # none where step 1 diverged
    assert all(np.isfinite(x).all() for x in _floats(_checkpoint(bad, int(folder.name))[1]))

  # The good run's newest checkpoint damaged: set aside, the run resumes from the one before,
  # beside the other run trained again from 0 with a learning rate that trains.
  for file in (p for p in (good / "checkpoints" / "5").rglob("*") if p.is_file()):
    file.write_bytes(file.read_bytes()[:len(file.read_bytes()) // 2])
  configs = [_config(7, 0), _config(7, 1)]
  for config in configs:
    config.train.checkpoint_every = 1
  pack.train_pack(configs, [str(good), str(bad)], allow_config_change=True)
  out = capsys.readouterr().out
  assert "checkpoint 5 in" in out and "is damaged" in out, out[-3000:]
  assert [p.name.split("-")[0] for p in (good / "checkpoints_damaged").iterdir()
          if p.is_dir()] == ["5"]
  assert _segments(good) == [(0, "pack", [str(bad)]), (4, "pack", [str(bad)])]
  assert [row["step"] for row in _rows(good) if "train/loss" in row] == [5, 7]
  for path in (good, bad):
    assert json.loads((path / "results.json").read_text())["step"] == 7


def _pack_command(paths: list[pathlib.Path], steps: int) -> list[str]:
  command = [sys.executable, "-m", "arcjax.pack"]
  for seed, path in enumerate(paths):
    command += ["--", "--config=configs/default.py", f"--workdir={path}",
                f"--config.train.steps={steps}", f"--config.seed={seed}",
                f"--config.loss.m2={0.5 - 0.2 * seed}", *SMALL]
  return command


def _run(command: list[str], *, interrupt_when=None) -> subprocess.CompletedProcess:
  process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "XLA_FLAGS":
                                             "--xla_force_host_platform_device_count=2"})
  if interrupt_when is not None:
    deadline = time.monotonic() + PATIENCE
    while not interrupt_when():
      assert process.poll() is None, process.communicate()[1][-3000:]
      assert time.monotonic() < deadline, "no checkpoint within PATIENCE"
      time.sleep(0.05)
    process.send_signal(signal.SIGINT)
  out, err = process.communicate(timeout=PATIENCE)
  return subprocess.CompletedProcess(command, process.returncode, out, err)


@pytest.mark.slow
def test_sigint_saves_every_run_and_the_same_command_resumes_bit_exact(tmp_path):
  steps = 20
  reference = [tmp_path / "reference_a", tmp_path / "reference_b"]
  done = _run(_pack_command(reference, steps))
  assert done.returncode == 0, done.stderr[-3000:]
  paths = [tmp_path / "a", tmp_path / "b"]
  stopped = _run(_pack_command(paths, steps),
                 interrupt_when=lambda: (paths[1] / "checkpoints" / "5").exists())
  assert stopped.returncode == errors.EXIT_INTERRUPTED, stopped.stderr[-3000:]
  lines = [line for line in stopped.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1 and "stopped by SIGINT at step" in lines[0], stopped.stderr[-3000:]
  stopped_at = [_checkpoint(path)[0] for path in paths]
  assert stopped_at[0] == stopped_at[1] and 5 <= stopped_at[0] < steps, stopped_at
  resumed = _run(_pack_command(paths, steps))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"[{paths[0]}] finished" in resumed.stdout
  for path, want_path in zip(paths, reference):
    (step, got), (_, want) = _checkpoint(path), _checkpoint(want_path)
    assert step == steps
    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert _segments(path) == [(0, "pack", [str(paths[1 - paths.index(path)])]),
                               (stopped_at[0], "pack", [str(paths[1 - paths.index(path)])])]


@pytest.mark.parametrize("flags, message", [
    (["--", "--workdir={a}", "--config.wandb.mode=disabled",
      "--", "--workdir={b}", "--config.model.name=mobilefacenet"],
     "run 1 of the pack differs from run 0 in config.model.name ('mobilefacenet' vs "
     "'tiny_cnn'), which a pack shares: see train.pack_key"),
    (["--", "--workdir={a}", "--", "--workdir={a}/"], "the pack names workdir {a}/ twice"),
    (["--", "--workdir={a}", "--", "--config.seed=1"], "run 1 of the pack needs one --workdir"),
    (["--", "--workdir={a}", "--config.train.stepz=3"],
     "run 0 of the pack ({a}): configs/default.py: unknown config key config.train.stepz"),
    (["--allow_config_changes", "--", "--workdir={a}"], "unknown flag --allow_config_changes"),
    ([], "no runs"),
    (["--", "--workdir={a}", "--distributed_auto", "--", "--workdir={b}"],
     "the runs of a pack train in one process group"),
])
def test_what_refuses_a_pack_is_one_line_and_writes_nothing(tmp_path, capsys, flags, message):
  names = {"a": tmp_path / "a", "b": tmp_path / "b"}
  argv = ["arcjax.pack"] + [flag.format(**names) for flag in flags]
  argv = sum(([arg, "--config=configs/default.py"] if arg == "--" else [arg] for arg in argv), [])
  with pytest.raises(SystemExit) as exit_info:
    pack.main(argv)
  assert exit_info.value.code == 1
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  assert message.format(**names) in lines[0], lines[0]
  assert not any(path.exists() for path in names.values())


def test_the_launchers_pack_command_parses_as_each_runs_solo_flags():
  """`experiments.plan.pack_command`'s form: each group a solo trainer's flags, a TPU pod's
  --distributed_auto in each."""
  argv = ["arcjax.pack", "--allow_config_change",
          "--", "--config=configs/ablations.py:arcface", "--workdir=runs/a",
          "--config.seed=1", "--distributed_auto",
          "--", "--config=configs/ablations.py:arcface", "--workdir", "runs/b",
          "--distributed_auto"]
  options, runs = pack.parse_command_line(argv)
  assert options == {"allow_config_change": True, "traceback": False,
                     "distributed": {"distributed_auto": "true"}}
  assert runs == [("runs/a", ["arcjax.pack", "--config=configs/ablations.py:arcface",
                              "--config.seed=1"]),
                  ("runs/b", ["arcjax.pack", "--config=configs/ablations.py:arcface"])]

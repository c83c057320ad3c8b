"""The command line: config overrides, errors before any compile, and a short real run."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _main(workdir: pathlib.Path, *overrides: str, timeout: float = 60) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", "arcjax.main", "--config=configs/default.py",
       f"--workdir={workdir}", *overrides],
      cwd=REPO, capture_output=True, text=True, timeout=timeout,
      env={**os.environ, "WANDB_MODE": "disabled", "XLA_FLAGS": ""})


@pytest.mark.parametrize("override, message", [
    ("--config.train.stepz=5", "unknown config key 'stepz'; Did you mean \"steps\""),
    ("--config.nosuch.field=1", "unknown config key 'nosuch'"),
    ("--config.train.steps=-5", "bad config: config.train.steps must be > 0, got -5"),
    ("--config.loss.s=0", "bad config: scale s must be > 0, got s=0.0"),
    ("--config.loss.m2=4.0", "m2 must be in [0, pi), got m2=4.0"),
    ("--config.train.parallel=ddp", "config.train.parallel must be one of"),
    ("--config.train.steps=many", "--config.train.steps=many: invalid literal for int()"),
])
def test_bad_config_fails_before_anything_runs(tmp_path, override, message):
  result = _main(tmp_path / "run", override)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "run").exists()  # stopped before the workdir, data or compile


@pytest.mark.slow
def test_short_run_prints_loss_throughput_and_verification(tmp_path):
  result = _main(tmp_path / "run", "--config.train.steps=20", "--config.train.log_every=10",
                 "--config.train.batch_size=64", "--config.eval.every=10",
                 "--config.data.max_pairs=600", "--config.angles.probe_size=100",
                 timeout=240)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "loss=" in result.stderr and "img_s=" in result.stderr
  assert "step 10 eval: holdout accuracy" in result.stdout
  assert "final holdout: verification accuracy" in result.stdout
  results = json.loads((tmp_path / "run" / "results.json").read_text())
  config = json.loads((tmp_path / "run" / "config.json").read_text())
  assert config["train"]["steps"] == 20 and results["step"] == 20
  assert 0.5 <= results["eval"]["holdout"]["accuracy"] <= 1.0
  stats = results["angle_stats"]
  for name in ("w_ec_deg", "w_inter_deg", "intra1_deg", "inter1_deg", "intra2_deg",
               "inter2_deg"):  # Intra2 / Inter2 on the held-out identities
    assert 0.0 < stats[name] < 180.0, (name, stats)
  for step in (0, 10, 20):
    assert (tmp_path / "run" / "angles" / f"theta_step{step:08d}.npz").exists()

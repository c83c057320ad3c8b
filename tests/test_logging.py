"""MetricWriter: metrics.jsonl, histogram and image files, offline wandb; the progress bar."""

import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from arcjax import logging as arcjax_logging
from configs import default


def _config(mode: str = "offline"):
  config = default.get_config()
  config.wandb.mode = mode
  return config


def test_metrics_jsonl_round_trips_and_resume_drops_later_rows(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "disabled")
  writer = arcjax_logging.MetricWriter(tmp_path, _config())
  writer.write_scalars(10, {"train/loss": np.float32(2.5), "train/images_per_s": 1000})
  writer.write_scalars(20, {"train/loss": float("nan"), "eval/holdout/accuracy": 0.75})
  writer.write_scalars(30, {"train/loss": 1.25})
  writer.close()
  rows = arcjax_logging.read_metrics(tmp_path)
  assert rows == [{"step": 10, "train/loss": 2.5, "train/images_per_s": 1000},
                  {"step": 20, "train/loss": "nan", "eval/holdout/accuracy": 0.75},
                  {"step": 30, "train/loss": 1.25}]
  assert math.isnan(float(rows[1]["train/loss"]))
  # A run resumed from step 20 rewrites what came after it.
  writer = arcjax_logging.MetricWriter(tmp_path, _config(), keep_through_step=20)
  assert writer.has(20, "eval/holdout/accuracy") and not writer.has(30, "train/loss")
  writer.write_scalars(30, {"train/loss": 1.5})
  writer.close()
  assert [row["step"] for row in arcjax_logging.read_metrics(tmp_path)] == [10, 20, 30]
  assert arcjax_logging.read_metrics(tmp_path)[-1]["train/loss"] == 1.5
  # A run that starts afresh (no checkpoint to resume from) keeps none of them.
  arcjax_logging.MetricWriter(tmp_path, _config()).close()
  assert arcjax_logging.read_metrics(tmp_path) == []


def test_a_line_cut_short_is_skipped(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a"')
  assert arcjax_logging.read_metrics(tmp_path) == [{"step": 1, "a": 1.0}]


def test_histograms_and_images_are_saved_as_npz(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "disabled")
  writer = arcjax_logging.MetricWriter(tmp_path, _config())
  writer.write_histogram(5, "angles/theta_target_deg", np.array([0.5, 1.5, 1.6, 2.0]),
                         bins=np.array([0.0, 1.0, 2.0]))
  images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1)
  writer.write_images(5, {"train/batch": images})
  with pytest.raises(ValueError, match="'bad' must be"):
    writer.write_images(5, {"bad": images.astype(np.float32)})
  writer.close()
  saved = np.load(tmp_path / "histograms" / "angles_theta_target_deg_step00000005.npz")
  np.testing.assert_array_equal(saved["counts"], [1, 3])  # the last bin is closed: 2.0 counts
  np.testing.assert_array_equal(saved["edges"], [0.0, 1.0, 2.0])
  np.testing.assert_array_equal(
      np.load(tmp_path / "images" / "train_batch_step00000005.npz")["images"], images)


def test_disabled_writer_writes_nothing(tmp_path):
  writer = arcjax_logging.MetricWriter(tmp_path / "run", _config(), enabled=False)
  writer.write_scalars(1, {"a": 1.0})
  writer.write_histogram(1, "h", np.zeros(3))
  writer.close()
  assert not (tmp_path / "run").exists()


def test_wandb_mode_environment_wins_and_bad_mode_is_named(monkeypatch):
  monkeypatch.delenv("WANDB_MODE", raising=False)
  assert arcjax_logging.wandb_mode("offline") == "offline"
  monkeypatch.setenv("WANDB_MODE", "online")
  assert arcjax_logging.wandb_mode("offline") == "online"
  monkeypatch.setenv("WANDB_MODE", "sometimes")
  with pytest.raises(ValueError, match="'sometimes' \\(from WANDB_MODE\\)"):
    arcjax_logging.wandb_mode("offline")


@pytest.mark.slow
def test_offline_wandb_run_files_appear(tmp_path, monkeypatch):
  monkeypatch.delenv("WANDB_MODE", raising=False)
  monkeypatch.setenv("WANDB_API_KEY", "")  # no login is needed offline
  writer = arcjax_logging.MetricWriter(tmp_path, _config("offline"))
  writer.write_scalars(1, {"train/loss": 3.0})
  writer.write_histogram(1, "angles/theta_target_deg", np.linspace(0, 90, 50))
  writer.close()
  runs = list((tmp_path / "wandb").glob("offline-run-*"))
  assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
  records = list(runs[0].glob("run-*.wandb"))
  assert len(records) == 1 and records[0].stat().st_size > 0
  assert arcjax_logging.read_metrics(tmp_path) == [{"step": 1, "train/loss": 3.0}]
  # A resume (after a kill, say) continues the same wandb run: one id, kept in the workdir.
  writer = arcjax_logging.MetricWriter(tmp_path, _config("offline"), keep_through_step=1)
  writer.write_scalars(2, {"train/loss": 2.0})
  writer.close()
  run_id = (tmp_path / "wandb_run_id").read_text().strip()
  parts = sorted((tmp_path / "wandb").glob("offline-run-*"))
  # offline-run-<time>-<id>, '-1' added when both start in the same second
  assert len(parts) == 2 and all(f"-{run_id}" in part.name for part in parts), parts


_WRITER_SCRIPT = """
import sys, time
from arcjax import logging as arcjax_logging
from configs import default
config = default.get_config()
config.wandb.mode = "offline"
writer = arcjax_logging.MetricWriter(__import__("pathlib").Path(sys.argv[1]), config)
writer.write_scalars(1, {"train/loss": 3.0})
print("started", flush=True)
if sys.argv[2] == "hang":
  time.sleep(300)
writer.close()
"""


@pytest.mark.slow
def test_a_killed_run_resumes_its_wandb_run_when_its_parent_runs_a_wandb_service(tmp_path,
                                                                                   monkeypatch):
  # A parent that used wandb (a notebook, a launcher, pytest) hands its service to its children
  # in WANDB_SERVICE: a killed run's stream would stay open there and its resume be refused.
  monkeypatch.delenv("WANDB_MODE", raising=False)
  import wandb  # pylint: disable=import-outside-toplevel
  wandb.init(project="parent", dir=os.fspath(tmp_path), mode="offline",
             settings=wandb.Settings(console="off", silent=True)).finish()
  assert os.environ.get("WANDB_SERVICE")
  run = tmp_path / "run"
  run.mkdir()
  command = [sys.executable, "-c", _WRITER_SCRIPT, os.fspath(run)]
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  hung = subprocess.Popen(command + ["hang"], stdout=subprocess.PIPE, text=True, cwd=repo)
  assert hung.stdout.readline().strip() == "started"
  hung.send_signal(signal.SIGKILL)
  hung.wait()
  resumed = subprocess.run(command + ["finish"], capture_output=True, text=True, timeout=300,
                           cwd=repo)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  run_id = (run / "wandb_run_id").read_text().strip()
  assert len(list((run / "wandb").glob(f"offline-run-*-{run_id}*"))) == 2


def test_progress_writes_eval_lines(capsys):
  progress = arcjax_logging.Progress(100, 10)
  progress.update(20, 1.2345, 999.0)
  progress.write("step 20 eval: holdout accuracy 0.9000 ± 0.0100")
  progress.close()
  captured = capsys.readouterr()
  assert "step 20 eval: holdout accuracy 0.9000 ± 0.0100" in captured.out
  assert "loss=1.2345" in captured.err and "20/100" in captured.err

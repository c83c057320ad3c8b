"""Executes notebooks/*.ipynb headless on a small synthetic finished grid.

The grid's files follow the workdir layout the trainer writes (config.json,
metrics.jsonl, angles/theta_step*.npz, angle_stats.json, results.json), with
plausible arrays: θ_y starts near 90° (random init) and shrinks with training.
"""

import json
import pathlib

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
STEPS = (0, 150, 300)
# Final mean θ_y (degrees) of each finished synthetic run.
FINISHED = {"norm_softmax": 52.0, "arcface": 31.0, "triplet_l": 64.0}


def _theta(rng, mean_deg: float, std_deg: float, size: int) -> np.ndarray:
  return np.clip(np.radians(rng.normal(mean_deg, std_deg, size)), 0.0, np.pi).astype(np.float32)


def _write_run(root: pathlib.Path, name: str, end_theta_deg: float, *, finished: bool,
               seed: int, probe: int = 256) -> None:
  rng = np.random.default_rng(seed)
  run = root / name
  (run / "angles").mkdir(parents=True)
  (run / "config.json").write_text(json.dumps({"loss": {"preset": name}, "seed": seed}))
  steps = STEPS if finished else STEPS[:1]
  labels = rng.integers(0, 32, probe).astype(np.int32)
  for step in steps:
    progress = step / STEPS[-1]
    np.savez(run / "angles" / f"theta_step{step:08d}.npz",
             theta_target=_theta(rng, 90 + (end_theta_deg - 90) * progress, 3 + 6 * progress,
                                 probe),
             theta_nearest=_theta(rng, 88 - 12 * progress, 3 + 2 * progress, probe),
             labels=labels)
  with open(run / "metrics.jsonl", "w") as f:
    for step in steps:
      f.write(json.dumps({"step": step, "train/loss": 20.0 - 0.05 * step}) + "\n")
  if not finished:
    return
  stats = {"w_ec_deg": end_theta_deg / 2, "w_inter_deg": 80.0 + seed,
           "intra1_deg": end_theta_deg * 0.9, "inter1_deg": 70.0 - seed,
           "intra2_deg": end_theta_deg * 1.1, "inter2_deg": 60.0 - seed}
  (run / "angle_stats.json").write_text(json.dumps({**stats, "step": STEPS[-1]}))
  (run / "results.json").write_text(json.dumps({
      "step": STEPS[-1], "loss": name, "angle_stats": stats,
      "eval": {"lfw": {"accuracy": 0.9 - seed / 100, "accuracy_std": 0.01, "auc": 0.95},
               "agedb_30": {"accuracy": 0.8, "accuracy_std": 0.02, "auc": 0.9}}}))


@pytest.fixture(scope="module")
def grid_root(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("table5")
  for seed, (name, end_theta) in enumerate(FINISHED.items()):
    _write_run(root, name, end_theta, finished=True, seed=seed)
  _write_run(root, "inter_l", 45.0, finished=False, seed=9)
  return root


def _execute(name: str, runs_root: pathlib.Path, monkeypatch) -> nbformat.NotebookNode:
  # The kernel inherits the environment; cwd = repo root so `import arcjax` works.
  monkeypatch.setenv("ARCJAX_RUNS", str(runs_root))
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  NotebookClient(nb, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": str(REPO)}}).execute()
  return nb


def _outputs(nb: nbformat.NotebookNode, cell_id: str) -> list:
  (cell,) = [c for c in nb.cells if c.get("id") == cell_id]
  return cell.outputs


def _pngs(outputs) -> int:
  return sum("image/png" in o.get("data", {}) for o in outputs)


@pytest.mark.slow
def test_theta_histograms_notebook(grid_root, monkeypatch):
  nb = _execute("theta_histograms.ipynb", grid_root, monkeypatch)
  assert _pngs(_outputs(nb, "per_loss")) == 1
  assert _pngs(_outputs(nb, "end")) == 1
  summary = "".join(o.get("text", "") for o in _outputs(nb, "load")).splitlines()
  # Every run with θ records, the unfinished one at its only step; start / middle / end picked.
  arcface = [line.split() for line in summary if line.startswith("arcface ")]
  assert [fields[1:3] for fields in arcface] == [["start", "0"], ["middle", "150"],
                                                 ["end", "300"]]
  assert abs(float(arcface[2][3]) - FINISHED["arcface"]) < 2.0
  assert [line.split()[:3] for line in summary if line.startswith("inter_l ")] == [
      ["inter_l", "start/middle/end", "0"]]


@pytest.mark.slow
def test_angle_statistics_notebook(grid_root, monkeypatch):
  nb = _execute("angle_statistics.ipynb", grid_root, monkeypatch)
  (table,) = _outputs(nb, "table")
  markdown = table["data"]["text/markdown"]
  for name in FINISHED:
    assert f"| {name} |" in markdown
  assert "| arcface | 89.00 ± 1.00 | 80.00 ± 2.00 | 15.50 |" in markdown
  assert "Unfinished: inter_l (step 0)" in markdown
  assert _pngs(_outputs(nb, "bars")) == 1
  assert _pngs(_outputs(nb, "logits")) == 1


@pytest.mark.slow
def test_notebook_without_records_fails_clearly(tmp_path, monkeypatch):
  (tmp_path / "empty_run").mkdir()
  with pytest.raises(CellExecutionError, match="no angles/theta_step"):
    _execute("theta_histograms.ipynb", tmp_path, monkeypatch)

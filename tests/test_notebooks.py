"""Executes notebooks/*.ipynb headless on small grids and checks what they print and draw.

The synthetic grid is seeded (`<row>/seed<k>`) and its files follow the workdir layout the
trainer writes (config.json, metrics.jsonl, angles/theta_step*.npz, results.json), with
plausible arrays: θ_y starts near 90° (random init) and shrinks with training. The numbers the
notebooks print are checked against ones computed here from what was written. One test adds a
really trained (tiny) run as a row, for the notebook's section that loads a run as a model, and
one loads that run exported to ONNX and imported again (no centres). The kernels run as
Jupyter runs them: in notebooks/, with arcjax importable only as the installed package.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
KERNEL_TIMEOUT = 600  # seconds per cell on a loaded machine (not a speed assertion)
STEPS = (0, 150, 300)
# row: (final mean θ_y in degrees, finished seeds, unfinished seeds).
ROWS = {"arcface": (31.0, (0, 1, 2), ()),
        "norm_softmax": (52.0, (0, 1, 2), ()),
        "triplet_l": (64.0, (0, 1), (2,)),  # trains no centres: W-EC, W-Inter do not apply
        "inter_l": (45.0, (), (0,))}
# Rows whose θ records hold the probe's feature norms (the others are runs from before they did):
# row: the mean norm at the start and at the end.
NORM_ROWS = {"arcface": (4.0, 30.0), "norm_softmax": (4.0, 12.0)}
ANGLE_KEYS = ("w_ec_deg", "w_inter_deg", "intra1_deg", "inter1_deg", "intra2_deg", "inter2_deg")


def _theta(rng, mean_deg: float, std_deg: float, size: int) -> np.ndarray:
  return np.clip(np.radians(rng.normal(mean_deg, std_deg, size)), 0.0, np.pi).astype(np.float32)


def _angle_stats(row: str, seed: int) -> dict[str, float | None]:
  end_theta = ROWS[row][0]
  stats = {"w_ec_deg": end_theta / 2 + seed ** 2, "w_inter_deg": 80.0 + seed,
           "intra1_deg": end_theta * 0.9 - seed, "inter1_deg": 70.0 - 2 * seed,
           "intra2_deg": end_theta * 1.1 + seed / 3, "inter2_deg": 60.0 - seed}
  if row == "triplet_l":
    stats.update(w_ec_deg=None, w_inter_deg=None)
  return stats


def _accuracy(row: str, seed: int) -> float:
  return 0.9 - seed / 100 - len(row) / 1000


def _write_run(run: pathlib.Path, row: str, seed: int, *, finished: bool,
               probe: int = 256) -> dict[int, float]:
  """Writes one run; returns {step: mean θ_y in degrees} of its θ records."""
  rng = np.random.default_rng([seed, len(row)])
  end_theta = ROWS[row][0] + seed
  (run / "angles").mkdir(parents=True)
  (run / "config.json").write_text(json.dumps({"loss": {"s": 64.0}, "seed": seed}))
  steps = STEPS if finished else STEPS[:1]
  labels = rng.integers(0, 32, probe).astype(np.int32)
  means = {}
  for step in steps:
    progress = step / STEPS[-1]
    theta_target = _theta(rng, 90 + (end_theta - 90) * progress, 3 + 6 * progress, probe)
    norms = {}
    if row in NORM_ROWS:
      start, end = NORM_ROWS[row]
      norms["feature_norm"] = np.abs(rng.normal(start + (end - start) * progress, 1 + progress,
                                                probe))
    np.savez(run / "angles" / f"theta_step{step:08d}.npz", theta_target=theta_target,
             theta_nearest=_theta(rng, 88 - 12 * progress, 3 + 2 * progress, probe),
             labels=labels, **norms)
    means[step] = float(np.degrees(theta_target.astype(np.float64)).mean())
  with open(run / "metrics.jsonl", "w") as f:
    for step in steps:
      f.write(json.dumps({"step": step, "train/loss": 20.0 - 0.05 * step}) + "\n")
  if finished:
    stats = _angle_stats(row, seed)
    (run / "angle_stats.json").write_text(json.dumps({**stats, "step": STEPS[-1]}))
    (run / "results.json").write_text(json.dumps({
        "step": STEPS[-1], "loss": {"preset": row}, "angle_stats": stats,
        "eval": {"lfw": {"accuracy": _accuracy(row, seed), "accuracy_std": 0.01, "auc": 0.95}}}))
  return means


def _write_grid(root: pathlib.Path) -> dict[str, dict[int, float]]:
  """The synthetic grid under `root`; returns {'<row>/seed<k>': {step: mean θ_y (°)}}."""
  means = {}
  for row, (_, finished, unfinished) in ROWS.items():
    for seed in sorted(finished + unfinished):
      means[f"{row}/seed{seed}"] = _write_run(root / row / f"seed{seed}", row, seed,
                                              finished=seed in finished)
  return means


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> tuple[pathlib.Path, dict[str, dict[int, float]]]:
  root = tmp_path_factory.mktemp("table5")
  return root, _write_grid(root)


def _execute(name: str, runs_root: str | os.PathLike, env: dict[str, str] | None = None,
             **params) -> nbformat.NotebookNode:
  """Runs notebook `name` on RUNS=`runs_root`, its parameters cell extended by `params`."""
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  (cell,) = [c for c in nb.cells if c.get("id") == "params"]
  cell.source += "".join(f"\n{key} = {value!r}" for key, value in params.items())
  env = {**(env or os.environ), "ARCJAX_RUNS": str(runs_root)}
  env.pop("PYTHONPATH", None)
  # As Jupyter runs it: the kernel in notebooks/, arcjax importable only as an installed
  # package (`pip install -e .`, the README's set-up).
  try:
    NotebookClient(nb, timeout=KERNEL_TIMEOUT, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute(env=env)
  except CellExecutionError as error:
    if "No module named 'arcjax'" in str(error):
      raise AssertionError("the notebook's kernel (in notebooks/) cannot import arcjax: install "
                           "the package first (pip install -e .)") from error
    raise
  return nb


def _outputs(nb: nbformat.NotebookNode, cell_id: str) -> list:
  (cell,) = [c for c in nb.cells if c.get("id") == cell_id]
  return cell.outputs


def _text(nb: nbformat.NotebookNode, cell_id: str) -> str:
  return "".join(o.get("text", "") for o in _outputs(nb, cell_id))


def _pngs(nb: nbformat.NotebookNode, cell_id: str) -> int:
  return sum("image/png" in o.get("data", {}) for o in _outputs(nb, cell_id))


def _summary(nb: nbformat.NotebookNode) -> dict[str, list[list[str]]]:
  """The θ notebook's printed table: {run name: [[stage, step, mean θ_y, mean nearest]]}."""
  table = {}
  for line in _text(nb, "load").splitlines()[1:]:
    name, *fields = line.split()
    table.setdefault(name, []).append(fields)
  return table


def _check_theta_summary(nb, means: dict[str, dict[int, float]], shown: list[str]) -> None:
  table = _summary(nb)
  assert sorted(table) == sorted(shown)
  for name in shown:
    steps = list(means[name])
    if len(steps) == 3:
      assert [fields[:2] for fields in table[name]] == [["start", "0"], ["middle", "150"],
                                                      ["end", "300"]]
    else:  # an unfinished run: its only record is all three stages
      assert [fields[:2] for fields in table[name]] == [["start/middle/end", "0"]]
    for fields in table[name]:
      assert abs(float(fields[2]) - means[name][int(fields[1])]) <= 0.051, (name, fields)


def _check_norms(nb, root: pathlib.Path, shown: list[str]) -> None:
  """The norms section prints each run's mean and std ‖x‖ at its start, middle and end, read
  here from the records written, and draws one figure; runs without norms are left out."""
  printed = {}
  for line in _text(nb, "norms").splitlines()[1:]:
    name, stage, step, mean, std = line.split()
    printed.setdefault(name, []).append((stage, int(step), float(mean), float(std)))
  assert list(printed) == shown
  for name in shown:
    assert [(stage, step) for stage, step, _, _ in printed[name]] == [
        ("start", 0), ("middle", 150), ("end", 300)]
    for _, step, mean, std in printed[name]:
      with np.load(root / name / "angles" / f"theta_step{step:08d}.npz") as record:
        norms = record["feature_norm"]
      assert abs(mean - norms.mean()) <= 0.0051 and abs(std - norms.std()) <= 0.0051
  assert _pngs(nb, "norms") == 1


def _mean_std(values) -> str:
  return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def test_theta_histograms_notebook(grid):
  root, means = grid
  nb = _execute("theta_histograms.ipynb", root)
  # Each row's first seed with θ records; the unfinished inter_l at its only step.
  _check_theta_summary(nb, means, ["arcface/seed0", "norm_softmax/seed0", "triplet_l/seed0",
                                   "inter_l/seed0"])
  assert _pngs(nb, "per_loss") == 1
  assert _pngs(nb, "end") == 1
  _check_norms(nb, root, ["arcface/seed0", "norm_softmax/seed0"])
  assert _text(nb, "model").startswith("No finished run with a checkpoint among arcface/seed0")
  assert "this section is skipped" in _text(nb, "model")
  assert _pngs(nb, "model_plot") == 0


def test_theta_histograms_notebook_plots_the_chosen_seed(grid):
  root, means = grid
  nb = _execute("theta_histograms.ipynb", root, SEED=1, RUN_NAMES=["triplet_l", "arcface"])
  _check_theta_summary(nb, means, ["triplet_l/seed1", "arcface/seed1"])
  assert list(_summary(nb)) == ["triplet_l/seed1", "arcface/seed1"]  # in RUN_NAMES' order
  assert _pngs(nb, "per_loss") == 1
  _check_norms(nb, root, ["arcface/seed1"])
  nb = _execute("theta_histograms.ipynb", root, RUN_NAMES=["triplet_l"])
  assert _text(nb, "norms").startswith("No plotted run recorded its feature norms")
  assert _pngs(nb, "norms") == 0

  with pytest.raises(CellExecutionError, match=r"no angles/theta_step\*\.npz under .* \(seed 1\) "
                                               r"for inter_l"):
    _execute("theta_histograms.ipynb", root, SEED=1, RUN_NAMES=["arcface", "inter_l"])


def test_angle_statistics_notebook(grid):
  root, _ = grid
  nb = _execute("angle_statistics.ipynb", root)
  (table,) = _outputs(nb, "table")
  markdown = table["data"]["text/markdown"]
  arcface = [_angle_stats("arcface", seed) for seed in (0, 1, 2)]
  lfw = _mean_std([100 * _accuracy("arcface", seed) for seed in (0, 1, 2)])
  # W-EC is marked: 10.5° from norm_softmax's, five times the standard error of the difference.
  assert (f"| arcface | 3 | {lfw} | {_mean_std([s['w_ec_deg'] for s in arcface])} * | "
          f"{_mean_std([s['w_inter_deg'] for s in arcface])} |") in markdown
  assert "| triplet_l | 2 | " in markdown and "| inter_l |" not in markdown
  assert "Unfinished: inter_l/seed0 (step 0), triplet_l/seed2 (step 0)" in markdown

  assert _pngs(nb, "bars") == 1
  labels = {}
  for line in _text(nb, "bars").splitlines()[1:]:
    tick, *cells = re.split(r"\s{2,}", line.strip())
    labels[tick] = cells
  assert list(labels) == ["arcface (n=3)", "norm_softmax (n=3)", "triplet_l (n=2)"]
  for tick, row, seeds in (("arcface (n=3)", "arcface", (0, 1, 2)),
                           ("triplet_l (n=2)", "triplet_l", (0, 1))):
    stats = [_angle_stats(row, seed) for seed in seeds]
    assert labels[tick] == ["–" if stats[0][key] is None else
                            _mean_std([s[key] for s in stats]) for key in ANGLE_KEYS]
  assert labels["triplet_l (n=2)"][:2] == ["–", "–"]
  assert _pngs(nb, "logits") == 1


def test_notebook_without_records_fails_clearly(tmp_path):
  run = tmp_path / "arcface" / "seed0"
  run.mkdir(parents=True)
  (run / "config.json").write_text("{}")  # a run that has not recorded θ yet
  with pytest.raises(CellExecutionError, match="no angles/theta_step"):
    _execute("theta_histograms.ipynb", tmp_path)


@pytest.mark.slow
def test_notebooks_read_a_grid_in_a_bucket(gcs, grid):
  root, means = grid
  upload = ("import pathlib, sys\nfrom etils import epath\n"
            "root = pathlib.Path(sys.argv[1])\n"
            "for file in root.rglob('*'):\n"
            "  if file.is_file():\n"
            "    epath.Path('gs://bucket/table5', str(file.relative_to(root)))"
            ".write_bytes(file.read_bytes())\n")
  subprocess.run([sys.executable, "-c", upload, str(root)], env=gcs, check=True, timeout=600)
  nb = _execute("theta_histograms.ipynb", "gs://bucket/table5", env=gcs)
  _check_theta_summary(nb, means, ["arcface/seed0", "norm_softmax/seed0", "triplet_l/seed0",
                                   "inter_l/seed0"])
  assert _pngs(nb, "per_loss") == 1
  nb = _execute("angle_statistics.ipynb", "gs://bucket/table5", env=gcs)
  assert "| arcface | 3 | " in _outputs(nb, "table")[0]["data"]["text/markdown"]
  assert _pngs(nb, "bars") == 1


@pytest.fixture(scope="module")
def trained_grid(grid, tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
  """The synthetic grid plus a tiny real run of sub-center ArcFace (3 sub-centres a class) as
  row 'tiny_subcenter', seed 0: (root, its path)."""
  from arcjax import losses, train  # pylint: disable=import-outside-toplevel
  from configs import default  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("trained") / "table5"
  shutil.copytree(grid[0], root)
  path = root / "tiny_subcenter" / "seed0"
  config = default.get_config()
  config.loss = losses.loss_config("subcenter_arcface")
  config.train.update(steps=6, batch_size=32, checkpoint_every=6, log_every=3)
  config.model.embedding_dim = 16
  config.eval.every = 0
  config.angles.probe_size = 64
  config.data.max_pairs = 200
  config.wandb.mode = "disabled"
  train.train_and_evaluate(config, str(path))
  return root, path


@pytest.mark.slow
def test_theta_histograms_notebook_loads_a_trained_run(trained_grid):
  from arcjax import data, inference  # pylint: disable=import-outside-toplevel
  root, path = trained_grid
  run = inference.load_run(path)
  images, labels = data.get_datasets(run.config.data).unseen
  nb = _execute("theta_histograms.ipynb", root)
  assert "tiny_subcenter/seed0" in _summary(nb)
  assert "tiny_subcenter/seed0" in _text(nb, "norms")  # a real run records its norms
  lines = _text(nb, "model").splitlines()
  # The synthetic runs before it have no checkpoint: the trained run is the one loaded.
  assert lines[0] == (f"model: {path} (checkpoint at step 6, {len(run.centres)} centres)")
  assert lines[1] == (f"unseen images embedded: {len(images)} of {len(np.unique(labels))} "
                      "identities")
  # The nearest of all the run's sub-centres (C, K, d).
  assert run.centres.ndim == 3 and run.centres.shape[1] == 3
  unit = run.centres / np.linalg.norm(run.centres, axis=2, keepdims=True)
  nearest = np.degrees(np.arccos(np.clip(
      np.einsum("nd,ckd->nck", run.embed(images), unit).max(axis=(1, 2)), -1, 1)))
  printed = float(re.fullmatch(r"mean angle to the nearest trained centre: (.*)°", lines[2])[1])
  assert abs(printed - nearest.mean()) <= 0.051
  assert _pngs(nb, "model_plot") == 1


def test_notebooks_run_where_jupyter_runs_them():
  nb = nbformat.read(NOTEBOOKS / "theta_histograms.ipynb", as_version=4)
  nb.cells = [nbformat.v4.new_code_cell("import os, arcjax, experiments.collect\n"
                                        "print(os.getcwd())\nprint(arcjax.__file__)")]
  env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
  NotebookClient(nb, timeout=KERNEL_TIMEOUT, kernel_name="python3",
                 resources={"metadata": {"path": str(NOTEBOOKS)}}).execute(env=env)
  cwd, module = nb.cells[0].outputs[0]["text"].split()
  assert pathlib.Path(cwd) == NOTEBOOKS
  assert pathlib.Path(module).is_file()


@pytest.mark.slow
def test_theta_histograms_notebook_views_an_imported_model(grid, tmp_path):
  # pylint: disable=import-outside-toplevel
  import jax
  from arcjax import data, from_onnx, inference, models
  from arcjax.models import onnx_export
  from configs import default
  root, _ = grid
  images, labels = data.get_datasets(default.get_config().data).unseen
  # A random tiny CNN whose BatchNorm statistics are those of these images (its running
  # averages after 60 updates on them), so that its embeddings spread out.
  model = models.get_model("tiny_cnn", embedding_dim=16)
  x = models.normalize_images(images, (127.5, 128.0))
  variables = model.init(jax.random.key(0), x[:1], train=False)
  update = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"])[1])
  for _ in range(60):
    variables = {"params": variables["params"], **update(variables)}
  proto = onnx_export.backbone_to_onnx(model, variables, images.shape[1:], (127.5, 128.0))
  (tmp_path / "tiny.onnx").write_bytes(proto.SerializeToString())
  imported = tmp_path / "imported"
  from_onnx.import_onnx(tmp_path / "tiny.onnx", str(imported))
  run = inference.load_run(imported)
  nb = _execute("theta_histograms.ipynb", root, MODEL_RUN=str(imported),
                UNSEEN_DATA={"name": "omniglot"})
  lines = _text(nb, "model").splitlines()
  assert lines[0] == f"model: {imported} (checkpoint at step 0, 0 centres)"
  x = run.embed(images).astype(np.float64)
  classes = np.unique(labels)
  means = np.stack([x[labels == c].sum(0) for c in classes])
  means /= np.linalg.norm(means, axis=1, keepdims=True)
  own = np.degrees(np.arccos(np.clip(np.sum(x * means[np.searchsorted(classes, labels)], 1),
                                     -1, 1)))
  cos = means @ means.T
  np.fill_diagonal(cos, -np.inf)
  inter = np.degrees(np.arccos(np.clip(cos.max(1), -1, 1))).mean()
  printed = re.fullmatch(r"no trained centres: Intra (.*)°, Inter (.*)° \(against the "
                         r"identities' mean directions\)", lines[2])
  assert own.mean() > 5 and inter > 5  # embeddings that spread: the angles mean something
  assert abs(float(printed[1]) - own.mean()) <= 0.051, (lines[2], own.mean())
  assert abs(float(printed[2]) - inter) <= 0.051, (lines[2], inter)
  assert _pngs(nb, "model_plot") == 1
  nb = _execute("theta_histograms.ipynb", root, MODEL_RUN=str(imported))
  assert "with no data of its own: name the unseen identities' data in UNSEEN_DATA" in _text(
      nb, "model")

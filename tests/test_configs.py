"""configs/: every row of the paper's Table 2 and of the family after it builds, validates and
holds its paper's values; the family's rows train on a fresh copy with nothing beside it."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from arcjax import errors, optim, train
from configs import ablations, default

# (m1, m2, m3) of the paper's Table 2 rows, written out here independently of margins.PRESETS.
PAPER_MARGINS = {
    "norm_softmax": (1.0, 0.0, 0.0), "sphereface": (1.35, 0.0, 0.0), "cosface": (1.0, 0.0, 0.35),
    "arcface_0.4": (1.0, 0.4, 0.0), "arcface_0.45": (1.0, 0.45, 0.0), "arcface": (1.0, 0.5, 0.0),
    "arcface_0.55": (1.0, 0.55, 0.0), "cm1": (1.0, 0.3, 0.2), "cm2": (0.9, 0.4, 0.15),
}
# Active loss terms of each row: (softmax, intra, inter, triplet) weights.
PAPER_TERMS = {
    "ns_intra": (1, 1, 0, 0), "ns_inter": (1, 0, 1, 0), "ns_intra_inter": (1, 1, 1, 0),
    "triplet": (0, 0, 0, 1), "arcface_intra": (1, 1, 0, 0), "arcface_inter": (1, 0, 1, 0),
    "arcface_intra_inter": (1, 1, 1, 0), "arcface_triplet": (1, 0, 0, 1),
}


# The family rows' values, written out from each paper's official training script (the
# files are named in arcjax.losses).
FAMILY_VALUES = {
    "subcenter_arcface": dict(s=64.0, m=0.5, subcenters=3),  # insightface sample_config.py
    "curricularface": dict(s=64.0, m=0.5, momentum=0.01),    # CurricularFace head/metrics.py
    "magface": dict(s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0),  # run.sh
    "adaface": dict(s=64.0, m=0.4, h=0.333, t_alpha=0.01),   # run_ir101_ms1mv2.sh, config.py
    "elasticface_arc": dict(s=64.0, m=0.5, sigma=0.05),      # ElasticFace config/config.py
    "elasticface_cos": dict(s=64.0, m=0.35, sigma=0.05),
}


@pytest.mark.parametrize("setting", ablations.SETTINGS)
@pytest.mark.parametrize("row", ablations.ROWS)
def test_every_row_validates(row, setting):
  config = ablations.get_config(f"{row},setting={setting}")
  train.check_config(config)
  assert set(config.keys()) == set(default.get_config().keys())  # nothing added or dropped


@pytest.mark.parametrize("row, margins", PAPER_MARGINS.items())
def test_margin_rows_have_the_papers_values(row, margins):
  loss = ablations.get_config(row).loss
  assert (loss.m1, loss.m2, loss.m3) == pytest.approx(margins)
  assert loss.s == 64.0 and loss.normalize and not loss.bias
  assert (loss.softmax_weight, loss.intra_weight, loss.inter_weight, loss.triplet_weight) == (
      1, 0, 0, 0)


def test_softmax_row_is_the_plain_linear_layer():
  loss = ablations.get_config("softmax").loss
  assert not loss.normalize and loss.bias and loss.s == 1.0


@pytest.mark.parametrize("row, terms", PAPER_TERMS.items())
def test_combination_rows_weight_their_terms(row, terms):
  config = ablations.get_config(row)
  loss = config.loss
  assert (loss.softmax_weight, loss.intra_weight, loss.inter_weight,
          loss.triplet_weight) == terms
  assert loss.m2 == (0.5 if row.startswith("arcface") else 0.0)
  # Batch-hard triplet mining needs P identities × K images per batch.
  assert (config.data.sampler == "pk") == bool(loss.triplet_weight)
  if loss.triplet_weight:
    assert loss.triplet_margin == 0.35
    assert config.data.pk_identities * config.data.pk_images == config.train.batch_size


def test_settings_change_backbone_data_and_schedule_not_the_loss():
  cpu, paper = ablations.get_config("cm2"), ablations.get_config("cm2,setting=paper")
  assert cpu.loss == paper.loss
  assert (paper.model.name, paper.train.batch_size, paper.train.steps) == ("iresnet50", 512, 32_000)
  assert optim.boundary_steps(paper.train) == [20_000, 28_000] and paper.train.lr == 0.1
  assert paper.data.name == "recordio" and tuple(paper.data.image_size) == (112, 112)
  assert paper.data.path == "faces_webface_112x112" and paper.eval.flip  # under the data root
  assert cpu.data.name == "omniglot" and cpu.data.path == "" and not cpu.eval.flip  # embedded


def test_gradient_is_an_ablation_axis():
  assert ablations.get_config("arcface").loss.gradient == "exact"
  assert ablations.get_config("arcface,gradient=straight_through").loss.gradient == (
      "straight_through")
  assert ablations.sweep("gradient,setting=paper") == [
      "arcface,setting=paper", "arcface,gradient=straight_through,setting=paper"]


@pytest.mark.parametrize("row, values", FAMILY_VALUES.items())
def test_family_rows_have_their_papers_values_and_no_other_field(row, values):
  loss = ablations.get_config(row).loss
  warmup = {} if row == "curricularface" else {"margin_warmup_steps": 0}  # the official: none
  assert loss.to_dict() == {"kind": row, **values, "extension": "official", **warmup}


def test_the_family_grid():
  assert ablations.sweep("family") == [
      "norm_softmax", "arcface", "arcface,warmup=300", "cosface", "subcenter_arcface",
      "curricularface", "magface", "adaface", "elasticface_arc", "elasticface_cos"]
  assert ablations.get_config("arcface,warmup=300").loss.margin_warmup_steps == 300
  assert ablations.get_config("magface,warmup=300").loss.margin_warmup_steps == 300
  for row in ablations.sweep("family,setting=paper"):
    train.check_config(ablations.get_config(row))


@pytest.mark.parametrize("arg, match", [
    ("curricularface,warmup=300", "CurricularFace takes no margin warm-up"),
    ("adaface,gradient=straight_through", "config.loss.gradient is not read by loss kind"),
    ("subcenter_arcface,intra=1", "config.loss.intra_weight is not read"),
])
def test_an_option_a_family_row_does_not_read_is_refused(arg, match):
  with pytest.raises(errors.ConfigError, match=match):
    train.check_config(ablations.get_config(arg))


def test_sweeps():
  assert ablations.sweep() == [row for row in ablations.ROWS
                               if row not in ablations.FAMILY_ROWS]
  assert len(ablations.sweep("table2")) == 18
  assert ablations.sweep("table5") == ["norm_softmax", "arcface", "ns_intra", "ns_inter",
                                       "triplet"]
  assert ablations.sweep("table5,setting=paper")[0] == "norm_softmax,setting=paper"
  for row in ablations.sweep("table2,setting=paper"):  # every listed row is a config
    ablations.get_config(row)


@pytest.mark.parametrize("call, arg, match", [
    (ablations.get_config, "arcfac", "unknown row 'arcfac'"),
    (ablations.get_config, "arcface,setting=tpu", "setting must be one of"),
    (ablations.get_config, "arcface,gradient=approx", "gradient must be"),
    (ablations.get_config, "arcface,lr=0.1", "got the part 'lr=0.1'"),
    (ablations.sweep, "table3", "unknown grid 'table3'"),
])
def test_bad_arguments_are_named(call, arg, match):
  with pytest.raises(ValueError, match=match):
    call(arg)


@pytest.mark.slow
def test_every_family_row_trains_on_a_fresh_copy_with_nothing_beside_it(tmp_path, fresh_copy):
  """Each new row, a few steps on the embedded Omniglot, from a copy of what a clone holds:
  finished, finite, its state saved and its norms recorded."""
  env = {**os.environ, "WANDB_MODE": "disabled", "XLA_FLAGS": ""}
  env.pop("PYTHONPATH", None)
  runs = tmp_path / "runs"
  grid = subprocess.run(
      [sys.executable, "-m", "experiments.launch", "--grid=configs/ablations.py:family",
       f"--workdir={runs}", "--parallel=2", "--override", "config.train.steps=3",
       "config.eval.every=0", "config.angles.probe_size=64", "config.data.max_pairs=200"],
      cwd=fresh_copy, capture_output=True, text=True, timeout=1800, env=env)
  assert grid.returncode == 0, (grid.stdout[-3000:], grid.stderr[-3000:])
  assert "10 finished, 0 failed" in grid.stdout, grid.stdout[-3000:]
  for row in ablations.FAMILY_ROWS:
    results = json.loads((runs / row / "results.json").read_text())
    assert results["step"] == 3 and math.isfinite(results["train_loss"]), (row, results)
    assert results["loss"]["kind"] == row
    assert all(math.isfinite(value) for name, value in results["angle_stats"].items()
               if name.endswith("_deg")), (row, results["angle_stats"])
    with np.load(runs / row / "angles" / "theta_step00000003.npz") as record:
      assert record["feature_norm"].shape == (64,) and np.all(record["feature_norm"] > 0)
    metrics = [json.loads(line) for line in (runs / row / "metrics.jsonl").read_text().splitlines()]
    names = {name for line in metrics for name in line}
    if row in ("curricularface", "adaface"):  # the state, logged after its update
      assert any(name.startswith("train/loss_state/") for name in names), names

"""configs/: every row of the paper's Table 2 builds, validates and holds the paper's values."""

import pytest

from arcjax import optim, train
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


@pytest.mark.parametrize("setting", ablations.SETTINGS)
@pytest.mark.parametrize("row", ablations.GRIDS["table2"])
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


def test_sweeps():
  assert ablations.sweep() == list(ablations.ROWS)
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

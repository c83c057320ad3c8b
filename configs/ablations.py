"""The ArcFace paper's ablations (Deng et al., CVPR 2019): every row of its Table 2.

  python -m arcjax.main --config=configs/ablations.py:arcface --workdir=runs/arcface
  python -m arcjax.main --config=configs/ablations.py:cm1,setting=paper --workdir=...
  python -m experiments.launch --grid=configs/ablations.py:table5 --workdir=runs/table5

`arg` is `ROW[,setting=cpu|paper][,gradient=exact|straight_through]`:
  - ROW: a loss, a key of `ROWS` (the paper's Table 2 names in the comments);
  - setting: the backbone, data and schedule, independent of the loss:
      'cpu' (default): a tiny CNN on the embedded Omniglot characters (242
        handwritten characters × 20 drawers; 42 characters held out for
        open-set verification), minutes per run on 2 cores;
      'paper': IResNet-50 on CASIA-WebFace (insightface's faces_webface_112x112:
        train.rec under the data root, $ARCJAX_DATA or the repository's data/),
        batch 512, 32K steps, lr 0.1 divided by 10 at 20K and 28K (62.5 % and
        87.5 % of the run, whatever its length), evaluated
        on the .bin files beside train.rec (lfw, cfp_fp, agedb_30);
  - gradient: the margin's exact gradient (the paper's) or insightface's
    current straight-through one (an ablation axis of its own).

`sweep(arg)` lists the rows of a grid, `arg` = `GRID[,setting=…][,gradient=…]`
with GRID one of `GRIDS`: 'table2' (every row), 'table5' (the losses whose
angle statistics the paper's Table 5 compares), 'margins' (the single margins)
and 'gradient' (ArcFace with each gradient).
"""

import ml_collections

from configs import default
from arcjax import losses

# ROW: (margin preset, weights of the extra terms). Intra, Inter and Triplet are
# the paper's eqs. 5, 6 and 7 with weight 1, as in its Table 2.
ROWS: dict[str, tuple[str, dict[str, float]]] = {
    "softmax": ("softmax", {}),                               # Softmax
    "norm_softmax": ("norm_softmax", {}),                     # Norm-Softmax (NS)
    "sphereface": ("sphereface", {}),                         # SphereFace (1.35)
    "cosface": ("cosface", {}),                               # CosFace (0.35)
    "arcface_0.4": ("arcface_0.4", {}),                       # ArcFace (0.4)
    "arcface_0.45": ("arcface_0.45", {}),                     # ArcFace (0.45)
    "arcface": ("arcface", {}),                               # ArcFace (0.5)
    "arcface_0.55": ("arcface_0.55", {}),                     # ArcFace (0.55)
    "cm1": ("cm1", {}),                                       # CM1 (1, 0.3, 0.2)
    "cm2": ("cm2", {}),                                       # CM2 (0.9, 0.4, 0.15)
    "ns_intra": ("norm_softmax", {"intra_weight": 1.0}),      # NS+Intra (Intra-L)
    "ns_inter": ("norm_softmax", {"inter_weight": 1.0}),      # NS+Inter (Inter-L)
    "ns_intra_inter": ("norm_softmax", {"intra_weight": 1.0, "inter_weight": 1.0}),
    "triplet": ("norm_softmax", {"softmax_weight": 0.0, "triplet_weight": 1.0}),  # Triplet (0.35)
    "arcface_intra": ("arcface", {"intra_weight": 1.0}),
    "arcface_inter": ("arcface", {"inter_weight": 1.0}),
    "arcface_intra_inter": ("arcface", {"intra_weight": 1.0, "inter_weight": 1.0}),
    "arcface_triplet": ("arcface", {"triplet_weight": 1.0}),
}
GRIDS: dict[str, tuple[str, ...]] = {
    "table2": tuple(ROWS),
    "table5": ("norm_softmax", "arcface", "ns_intra", "ns_inter", "triplet"),
    "margins": ("softmax", "norm_softmax", "sphereface", "cosface", "arcface_0.4",
                "arcface_0.45", "arcface", "arcface_0.55", "cm1", "cm2"),
    "gradient": ("arcface", "arcface,gradient=straight_through"),
}
SETTINGS = ("cpu", "paper")
# insightface's CASIA-WebFace folder, under the data root (arcjax.data.data_root()).
CASIA = "faces_webface_112x112"


def _parse(arg: str | None, name: str) -> tuple[str, dict[str, str]]:
  """'head,k=v,k2=v2' -> ('head', {k: v, k2: v2}); settings must be in {setting, gradient}."""
  head, *pairs = (arg or "").split(",")
  options = {}
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep or key not in ("setting", "gradient"):
      raise ValueError(f"{name} {arg!r}: expected {name.upper()}[,setting=…][,gradient=…], "
                       f"got the part {pair!r}")
    options[key] = value
  if options.get("setting", "cpu") not in SETTINGS:
    raise ValueError(f"{name} {arg!r}: setting must be one of {SETTINGS}")
  if options.get("gradient", "exact") not in ("exact", "straight_through"):
    raise ValueError(f"{name} {arg!r}: gradient must be 'exact' or 'straight_through'")
  return head, options


def _cpu_setting(config: ml_collections.ConfigDict) -> None:
  """Tiny CNN, the embedded Omniglot characters at 32×32, 1 500 steps of 128: minutes on 2 cores."""
  config.model.name = "tiny_cnn"
  config.model.embedding_dim = 128
  config.data.name = "omniglot"
  config.data.path = ""
  config.data.image_size = (32, 32)
  config.data.num_holdout_identities = 42
  config.data.flip = False  # a mirrored character is another character
  config.eval.flip = False
  config.train.steps = 1500
  config.train.batch_size = 128
  config.train.schedule = "poly"
  config.train.checkpoint_every = 500
  config.eval.every = 500


def _paper_setting(config: ml_collections.ConfigDict) -> None:
  """The paper's Table 2 training: IResNet-50 (LResNet50E-IR) on CASIA-WebFace."""
  config.model.name = "iresnet50"
  config.model.embedding_dim = 512
  config.model.dropout = 0.4  # insightface's BN-Dropout-FC-BN output block ('E')
  config.data.name = "recordio"
  config.data.path = CASIA
  config.data.image_size = (112, 112)
  config.data.num_holdout_identities = 0
  config.data.flip = True
  config.data.eval_bins = ()  # every .bin beside train.rec: lfw, cfp_fp, agedb_30 in CASIA's
  config.eval.flip = True     # insightface's flip-fused embeddings
  config.train.steps = 32_000
  config.train.batch_size = 512
  config.train.schedule = "piecewise"
  config.train.lr_boundaries = (0.625, 0.875)  # 20K and 28K of 32K; a shorter run scales them
  config.train.checkpoint_every = 2_000
  config.eval.every = 2_000
  config.angles.probe_size = 5_000


def get_config(arg: str | None = "arcface") -> ml_collections.ConfigDict:
  """The run of one row: `ROW[,setting=cpu|paper][,gradient=exact|straight_through]`."""
  row, options = _parse(arg or "arcface", "row")
  if row not in ROWS:
    raise ValueError(f"unknown row {row!r} of configs/ablations.py; known: {', '.join(ROWS)}")
  preset, weights = ROWS[row]
  config = default.get_config()
  config.loss = losses.loss_config(preset, gradient=options.get("gradient", "exact"), **weights)
  {"cpu": _cpu_setting, "paper": _paper_setting}[options.get("setting", "cpu")](config)
  if config.loss.triplet_weight:
    # Batch-hard mining needs positives in the batch: P identities × K images.
    config.data.sampler = "pk"
    config.data.pk_images = 4
    config.data.pk_identities = config.train.batch_size // config.data.pk_images
  return config


def sweep(arg: str | None = "table2") -> list[str]:
  """Rows of grid `GRID[,setting=…][,gradient=…]`, each a `get_config` argument."""
  grid, options = _parse(arg or "table2", "grid")
  if grid not in GRIDS:
    raise ValueError(f"unknown grid {grid!r}; known: {', '.join(GRIDS)}")
  suffix = "".join(f",{key}={value}" for key, value in options.items())
  return [row + suffix for row in GRIDS[grid]]

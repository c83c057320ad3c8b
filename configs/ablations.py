"""The ArcFace paper's ablations (Deng et al., CVPR 2019): every row of its Table 2, and the
margin family after it (sub-center ArcFace, CurricularFace, MagFace, AdaFace, ElasticFace).

  python -m arcjax.main --config=configs/ablations.py:arcface --workdir=runs/arcface
  python -m arcjax.main --config=configs/ablations.py:cm1,setting=paper --workdir=...
  python -m experiments.launch --grid=configs/ablations.py:table5 --workdir=runs/table5

`arg` is `ROW[,setting=cpu|paper][,gradient=exact|straight_through][,OPTION=VALUE…]`:
  - ROW: a loss, a key of `ROWS` (the paper's Table 2 names in the comments; the family
    rows with their papers' defaults, `losses.FAMILY`);
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
    current straight-through one (an ablation axis of its own);
  - warmup=N: the margin annealed in over the first N steps from the plain
    normalised softmax (SphereFace's λ-annealing; `margins.make_margin`);
  - steps=N, intra=W, inter=W, inter_form=angle|cosine: the run's length, the
    Intra / Inter weights and the Inter form (the paper's eq. 6 or insightface's).
  An option a row's loss does not read (gradient, intra, inter, inter_form on a family
  row; warmup on CurricularFace) stops with one line when the run starts.

`sweep(arg)` lists the rows of a grid, `arg` = `GRID[,OPTION=VALUE…]` (the
options apply to every row) with GRID one of `GRIDS`: 'table2' (every row of Table 2),
'table5' (the losses whose angle statistics the paper's Table 5 compares),
'margins' (the single margins), 'gradient' (ArcFace with each gradient),
'large_margins' (large margins from scratch, with and without a warm-up), the
'study_*' grids of the README's Table 5 study, and 'table5_balanced' (Table 5
with the extra terms weighted by a stated rule, see GRIDS), and 'family' (the margin
family after ArcFace beside Norm-Softmax, ArcFace with and without the warm-up, and CosFace).
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
    # The family after ArcFace (`losses.FAMILY`), each with its paper's official defaults:
    "subcenter_arcface": ("subcenter_arcface", {}),  # Deng et al. 2020, K = 3, m = 0.5
    "curricularface": ("curricularface", {}),        # Huang et al. 2020, m = 0.5
    "magface": ("magface", {}),                      # Meng et al. 2021, m(a) in [0.45, 0.8]
    "adaface": ("adaface", {}),                      # Kim et al. 2022, m = 0.4, h = 0.333
    "elasticface_arc": ("elasticface_arc", {}),      # Boutros et al. 2022, m ~ N(0.5, 0.05²)
    "elasticface_cos": ("elasticface_cos", {}),      # m ~ N(0.35, 0.05²)
}
FAMILY_ROWS = ("subcenter_arcface", "curricularface", "magface", "adaface", "elasticface_arc",
               "elasticface_cos")
GRIDS: dict[str, tuple[str, ...]] = {
    "table2": tuple(row for row in ROWS if row not in FAMILY_ROWS),
    "table5": ("norm_softmax", "arcface", "ns_intra", "ns_inter", "triplet"),
    "margins": ("softmax", "norm_softmax", "sphereface", "cosface", "arcface_0.4",
                "arcface_0.45", "arcface", "arcface_0.55", "cm1", "cm2"),
    "gradient": ("arcface", "arcface,gradient=straight_through"),
    # A fifth of the CPU run's 1 500 steps to reach the full margin.
    "large_margins": ("arcface_0.55", "arcface_0.55,warmup=300", "sphereface",
                      "sphereface,warmup=300", "arcface", "arcface,warmup=300"),
    # Why Table 5's Intra-L and Inter-L directions are missing at weight 1 (README):
    "study_length": ("norm_softmax,steps=6000", "ns_intra,steps=6000", "ns_inter,steps=6000",
                     "arcface,steps=6000"),
    "study_weights": ("ns_intra,intra=8", "ns_intra,intra=64", "ns_intra,intra=200",
                      "ns_inter,inter=8", "ns_inter,inter=64", "ns_inter,inter=200"),
    "study_inter_form": ("ns_inter,inter_form=cosine", "ns_inter,inter_form=cosine,inter=64"),
    # Table 5 again, each extra term weighted so that at the first step it pulls as hard as
    # the softmax term does on what it is meant to move (the rule, fixed before this grid
    # ran): Intra on the embeddings, Inter on the centres. Measured at initialisation with
    # weight 1 (`grad_norm/<term>` of the first step, seeds 0-2): the softmax's gradient is
    # 246 ± 2 times Intra's on the embeddings and 2 140 ± 100 times Inter's on the centres;
    # rounded to one significant figure: intra 200, inter 2000. Length and all else as 'cpu'.
    "table5_balanced": ("norm_softmax", "arcface", "ns_intra,intra=200", "ns_inter,inter=2000",
                        "triplet"),
    # The family after ArcFace beside the paper's references, ArcFace from scratch and with
    # the warm-up the default run uses (the family rows keep their papers' settings).
    "family": ("norm_softmax", "arcface", "arcface,warmup=300", "cosface", *FAMILY_ROWS),
}
SETTINGS = ("cpu", "paper")
GRADIENTS = ("exact", "straight_through")
# insightface's CASIA-WebFace folder, under the data root (arcjax.data.data_root()).
CASIA = "faces_webface_112x112"
# OPTION: (parse the value, check it, what it must be, (config section, field) it sets).
_OPTIONS = {
    "setting": (str, lambda v: v in SETTINGS, f"one of {SETTINGS}", None),
    "gradient": (str, lambda v: v in GRADIENTS, f"one of {GRADIENTS}", ("loss", "gradient")),
    "warmup": (int, lambda v: v >= 0, "an int >= 0", ("loss", "margin_warmup_steps")),
    "steps": (int, lambda v: v > 0, "an int > 0", ("train", "steps")),
    "intra": (float, lambda v: v >= 0, "a number >= 0", ("loss", "intra_weight")),
    "inter": (float, lambda v: v >= 0, "a number >= 0", ("loss", "inter_weight")),
    "inter_form": (str, lambda v: v in losses.INTER_FORMS, f"one of {losses.INTER_FORMS}",
                   ("loss", "inter_form")),
}


def _parse(arg: str | None, name: str) -> tuple[str, dict[str, object]]:
  """'head,k=v,k2=v2' -> ('head', {k: v, k2: v2}), each option parsed and checked."""
  head, *pairs = (arg or "").split(",")
  options = {}
  for pair in pairs:
    key, sep, text = pair.partition("=")
    if not sep or key not in _OPTIONS:
      raise ValueError(f"{name} {arg!r}: expected {name.upper()}[,OPTION=VALUE…] with OPTION "
                       f"one of {', '.join(_OPTIONS)}; got the part {pair!r}")
    parse, ok, must_be, _ = _OPTIONS[key]
    try:
      value = parse(text)
    except ValueError:
      value = None
    if value is None or not ok(value):
      raise ValueError(f"{name} {arg!r}: {key} must be {must_be}, got {text!r}")
    options[key] = value
  return head, options


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
  """The run of one row: `ROW[,setting=cpu|paper][,gradient=…][,OPTION=VALUE…]` (module doc)."""
  row, options = _parse(arg or "arcface", "row")
  if row not in ROWS:
    raise ValueError(f"unknown row {row!r} of configs/ablations.py; known: {', '.join(ROWS)}")
  preset, weights = ROWS[row]
  config = default.get_config()  # the 'cpu' setting: the default run's model, data, schedule
  config.loss = losses.loss_config(preset, **weights)  # the row's loss, as its paper's (no warm-up)
  if options.get("setting") == "paper":
    _paper_setting(config)
  for key, value in options.items():
    if _OPTIONS[key][3] is not None:
      section, field = _OPTIONS[key][3]
      config[section][field] = value
  if config.loss.get("triplet_weight"):
    # Batch-hard mining needs positives in the batch: P identities × K images.
    config.data.sampler = "pk"
    config.data.pk_images = 4
    config.data.pk_identities = config.train.batch_size // config.data.pk_images
  return config


def sweep(arg: str | None = "table2") -> list[str]:
  """Rows of grid `GRID[,OPTION=VALUE…]`, each a `get_config` argument."""
  grid, options = _parse(arg or "table2", "grid")
  if grid not in GRIDS:
    raise ValueError(f"unknown grid {grid!r}; known: {', '.join(GRIDS)}")
  suffix = "".join(f",{key}={value}" for key, value in options.items())
  return [row + suffix for row in GRIDS[grid]]

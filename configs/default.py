"""The default run: a tiny CNN with ArcFace on the embedded default dataset, on a CPU.

Every field the trainer reads is here (no defaults hidden in code); other
configs import `get_config` and change fields. Trains in a few minutes on 2
cores and reports held-out verification accuracy (identities never trained on):

  python -m arcjax.main --config=configs/default.py --workdir=runs/default

`arg` (`--config=configs/default.py:ARG`) is unused here; it is accepted so
that every config file has the same `get_config(arg)` signature.
"""

import ml_collections

from arcjax import losses


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The whole config tree (schema in the README)."""
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.name = "tiny_cnn"
  config.model.embedding_dim = 128
  config.model.dropout = 0.0
  config.model.dtype = "float32"

  # The paper's ArcFace: s = 64, m2 = 0.5 (s = 16 and 32 train this model as well).
  config.loss = losses.loss_config("arcface")

  config.head = ml_collections.ConfigDict()
  config.head.sharded = False
  config.head.sample_rate = 1.0
  config.head.chunk_size = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = "default"
  config.data.path = ""
  config.data.image_size = (28, 28)
  # 3 of the 10 classes are held out: verification pairs of classes never trained on.
  config.data.num_holdout_identities = 3
  config.data.pairs_seed = 0
  config.data.max_pairs = 6000
  config.data.flip = True
  config.data.sampler = "uniform"
  config.data.pk_identities = 0
  config.data.pk_images = 0
  config.data.data_dir = ""
  config.data.eval_bins = ()

  config.train = ml_collections.ConfigDict()
  config.train.steps = 600
  config.train.batch_size = 128
  config.train.optimizer = "sgd"
  config.train.lr = 0.1
  config.train.momentum = 0.9
  config.train.weight_decay = 5e-4
  config.train.schedule = "poly"
  config.train.lr_boundaries = ()
  config.train.warmup_steps = 0
  config.train.grad_clip = 0.0
  config.train.parallel = "mesh"
  config.train.checkpoint_every = 200
  config.train.keep_checkpoints = 2
  config.train.log_every = 50

  config.eval = ml_collections.ConfigDict()
  config.eval.every = 200
  config.eval.batch_size = 500

  config.angles = ml_collections.ConfigDict()
  config.angles.probe_size = 1000
  config.angles.every = 0

  config.wandb = ml_collections.ConfigDict()
  config.wandb.mode = "offline"
  config.wandb.project = "arcjax"
  return config

"""The default run: a tiny CNN with ArcFace on the embedded Omniglot characters, on a CPU.

Every field the trainer reads is here (no defaults hidden in code); other
configs import `get_config` and change fields. 200 of Omniglot's 242
characters train the model; the other 42 are never seen in training and give
the open-set verification pairs. 1 500 steps of 128, about 70 s on 2 idle cores:

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
  # The model sees (pixel − input_mean) / input_std: arcjax trains on [−0.996, 0.996];
  # insightface's released models expect (x − 127.5) / 127.5 (an imported model records it).
  config.model.input_mean = 127.5
  config.model.input_std = 128.0

  # The paper's ArcFace, s = 64, m2 = 0.5, annealed in over the first 300 steps: from
  # scratch, the full margin leaves this model's centres far from their classes in 2 of 3
  # seeds (the README's 'Large margins from scratch'); with the warm-up every seed ends
  # above the plain normalised softmax.
  config.loss = losses.loss_config("arcface", margin_warmup_steps=300)

  config.head = ml_collections.ConfigDict()
  config.head.sharded = False
  config.head.sample_rate = 1.0
  config.head.chunk_size = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = "omniglot"   # see arcjax/data/__init__.py for the others
  config.data.path = ""           # '' = the embedded zips; relative paths start at $ARCJAX_DATA
  config.data.stage_dir = ""      # where a gs:// data.path is copied to first
  config.data.image_size = (32, 32)
  # 42 characters are held out: verification pairs of identities never trained on.
  config.data.num_holdout_identities = 42
  config.data.pairs_seed = 0
  config.data.max_pairs = 6000
  config.data.flip = False        # a mirrored character is another character
  config.data.sampler = "uniform"
  config.data.pk_identities = 0
  config.data.pk_images = 0
  config.data.data_dir = ""       # the tensorflow-datasets cache of 'fashion_mnist', 'digits'
  config.data.eval_bins = ()      # .bin names beside a train.rec, or paths; () = every one there

  config.train = ml_collections.ConfigDict()
  config.train.steps = 1500
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
  config.train.checkpoint_every = 500
  config.train.keep_checkpoints = 2
  config.train.log_every = 50
  # Stop (keeping the last checkpoint) when the parameters' global norm passes this:
  # a diverging run (lr or s far too large) rather than a trained one.
  config.train.max_param_norm = 1e4
  # A workdir (a trained run, or a model imported with `python -m arcjax.from_onnx`) whose
  # backbone this run starts from, and its centres when the classes match; '' = random init.
  config.train.init_from = ""

  config.eval = ml_collections.ConfigDict()
  config.eval.every = 500
  config.eval.batch_size = 500
  config.eval.flip = False        # fuse each image with its mirror (insightface's faces: True)

  config.angles = ml_collections.ConfigDict()
  config.angles.probe_size = 1000
  config.angles.every = 0

  config.wandb = ml_collections.ConfigDict()
  config.wandb.mode = "offline"
  config.wandb.project = "arcjax"
  return config

"""Backbones: images (B, H, W, C) normalised float → embeddings (B, embedding_dim) float32.

Every model is called as `model.apply(variables, images, train=bool, rngs={'dropout': key},
mutable=['batch_stats'] if train else False)`; batch statistics live in the
'batch_stats' collection. Constructor kwargs: embedding_dim=512, dropout=0.0,
dtype=jnp.float32 (compute dtype; parameters stay float32), bn_axis_name=None
(a pmap axis over which BatchNorm averages its batch statistics).
"""

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from arcjax import errors

from arcjax.models.iresnet import IResNet
from arcjax.models.mobilefacenet import MobileFaceNet
from arcjax.models.tiny_cnn import TinyCNN

MODELS: dict[str, Callable[..., nn.Module]] = {
    "iresnet18": functools.partial(IResNet, stage_sizes=(2, 2, 2, 2)),
    "iresnet34": functools.partial(IResNet, stage_sizes=(3, 4, 6, 3)),
    "iresnet50": functools.partial(IResNet, stage_sizes=(3, 4, 14, 3)),
    "iresnet100": functools.partial(IResNet, stage_sizes=(3, 13, 30, 3)),
    "mobilefacenet": MobileFaceNet,
    "tiny_cnn": TinyCNN,
}


def get_model(name: str, **kwargs) -> nn.Module:
  """The backbone called `name` (a key of MODELS), built with `kwargs`."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
  return MODELS[name](**kwargs)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def check_config(model_config) -> None:
  """Raises ConfigError naming the first `config.model` value out of range."""
  if model_config.name not in MODELS:
    raise errors.ConfigError(f"config.model.name must be one of {tuple(sorted(MODELS))}, "
                             f"got {model_config.name!r}")
  if not model_config.embedding_dim > 0:
    raise errors.ConfigError(f"config.model.embedding_dim must be > 0, "
                             f"got {model_config.embedding_dim!r}")
  if not 0 <= model_config.dropout < 1:
    raise errors.ConfigError(f"config.model.dropout must be in [0, 1), got {model_config.dropout!r}")
  if model_config.dtype not in DTYPES:
    raise errors.ConfigError(f"config.model.dtype must be one of {tuple(DTYPES)}, "
                             f"got {model_config.dtype!r}")


def make_model(model_config, *, bn_axis_name: str | None = None) -> nn.Module:
  """The backbone of `config.model`.

  `bn_axis_name`: pmap's device axis. BatchNorm then averages its batch
  statistics over every device (synchronised BN), so that the pmapped step
  computes what one device would on the global batch, as the 'mesh' mode does
  by construction.
  """
  sync_bn = {"bn_axis_name": bn_axis_name} if bn_axis_name else {}
  return get_model(model_config.name, embedding_dim=model_config.embedding_dim,
                   dropout=model_config.dropout, dtype=DTYPES[model_config.dtype], **sync_bn)


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 pixels in [0, 255] → float32 (x − 127.5) / 128, in [−0.996, 0.996]. Any shape."""
  if images.dtype != jnp.uint8:
    raise ValueError(f"normalize_images expects uint8 pixels; got dtype {images.dtype}")
  return (jnp.asarray(images, jnp.float32) - 127.5) / 128.0

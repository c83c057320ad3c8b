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


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 pixels in [0, 255] → float32 (x − 127.5) / 128, in [−0.996, 0.996]. Any shape."""
  if images.dtype != jnp.uint8:
    raise ValueError(f"normalize_images expects uint8 pixels; got dtype {images.dtype}")
  return (jnp.asarray(images, jnp.float32) - 127.5) / 128.0

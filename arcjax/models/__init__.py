"""Backbones: images (B, H, W, C) normalised float → embeddings (B, embedding_dim) float32.

Every model is called as `model.apply(variables, images, train=bool, rngs={'dropout': key},
mutable=['batch_stats'] if train else False)`; batch statistics live in the
'batch_stats' collection. Constructor kwargs: embedding_dim=512, dropout=0.0,
dtype=jnp.float32 (compute dtype; parameters stay float32), bn_axis_name=None
(a pmap axis over which BatchNorm averages its batch statistics).

`arcjax.models.onnx_export` / `onnx_import` write and read them as ONNX graphs,
through `arcjax.models.graphs`, the backbones as lists of layers.
"""

import functools
import math
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
    "iresnet200": functools.partial(IResNet, stage_sizes=(6, 26, 60, 6)),
    # Chen et al.'s MobileFaceNet (the paper's Table 1), and insightface's arcface_torch
    # `mbf` (what its buffalo_s model pack ships) and `mbf_large`: the same network, wider.
    "mobilefacenet": MobileFaceNet,
    "mbf": functools.partial(MobileFaceNet, scale=2, blocks=(1, 4, 6, 2)),
    "mbf_large": functools.partial(MobileFaceNet, scale=4, blocks=(2, 8, 12, 4)),
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
  for name in ("input_mean", "input_std"):
    value = model_config[name]
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)):
      raise errors.ConfigError(f"config.model.{name} must be a finite number, got {value!r}")
  if not model_config.input_std > 0:
    raise errors.ConfigError(f"config.model.input_std must be > 0, got {model_config.input_std!r}")


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


def normalization(model_config) -> tuple[float, float]:
  """(mean, std) of `config.model`: the model sees (pixel − mean) / std.

  arcjax trains with (127.5, 128.0), pixels in [−0.996, 0.996]; insightface's released
  models expect (127.5, 127.5), and a model imported from one records that.
  """
  return float(model_config.input_mean), float(model_config.input_std)


def normalize_images(images: jax.Array, mean_std: tuple[float, float]) -> jax.Array:
  """uint8 pixels in [0, 255] → float32 (x − mean) / std (`normalization(config.model)`).

  Any shape. The division is a multiplication by 1/std, as the ONNX graphs of
  `arcjax.export` compute it (Sub, then Mul).
  """
  if images.dtype != jnp.uint8:
    raise ValueError(f"normalize_images expects uint8 pixels; got dtype {images.dtype}")
  mean, std = mean_std
  return (jnp.asarray(images, jnp.float32) - jnp.float32(mean)) * jnp.float32(1.0 / std)

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


def _looped_under_vmap(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """`fn`, whose vmap calls `fn` once per index of the mapped axis and stacks the results."""
  looped = jax.custom_batching.custom_vmap(fn)

  @looped.def_vmap
  def _rule(axis_size, in_batched, *args):
    args = [arg if batched else jnp.broadcast_to(arg, (axis_size, *arg.shape))
            for arg, batched in zip(args, in_batched)]
    outs = [looped(*(arg[i] for arg in args)) for i in range(axis_size)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs), jax.tree.map(lambda _: True, outs[0])

  return looped


def per_run_conv(lhs: jax.Array, rhs: jax.Array, window_strides, padding, lhs_dilation=None,
                 rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                 batch_group_count: int = 1, precision=None,
                 preferred_element_type=None) -> jax.Array:
  """`lax.conv_general_dilated` (same arguments), whose vmap over per-run kernels runs one plain
  convolution per run, forward and backward.

  vmap of a convolution whose kernels differ along the mapped axis makes one grouped
  convolution (feature_group_count × N), which XLA:CPU runs 4-5 times slower than the N
  convolutions one after another (and an im2col batched matmul 10 times, a `lax.map` 30
  times: `train.make_pack_step` says where this was measured). Not vmapped, it computes
  what `lax.conv_general_dilated` does; its backward is that of autodiff, run per run.
  """
  plain = functools.partial(
      jax.lax.conv_general_dilated, window_strides=window_strides, padding=padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type)
  forward = _looped_under_vmap(plain)
  # A convolution is bilinear: its VJP needs the operands only, not the output.
  backward = _looped_under_vmap(lambda x, w, g: jax.vjp(plain, x, w)[1](g))

  @jax.custom_vjp
  def conv(x, w):
    return forward(x, w)

  conv.defvjp(lambda x, w: (forward(x, w), (x, w)), lambda operands, g: backward(*operands, g))
  return conv(lhs, rhs)


def make_model(model_config, *, bn_axis_name: str | None = None,
               per_run_convs: bool = False) -> nn.Module:
  """The backbone of `config.model`.

  `bn_axis_name`: pmap's device axis. BatchNorm then averages its batch
  statistics over every device (synchronised BN), so that the pmapped step
  computes what one device would on the global batch, as the 'mesh' mode does
  by construction. `per_run_convs`: convolve with `per_run_conv` (a pack's step
  vmapped over runs, on XLA:CPU).
  """
  options = {"bn_axis_name": bn_axis_name} if bn_axis_name else {}
  if per_run_convs:
    options["conv_general_dilated"] = per_run_conv
  return get_model(model_config.name, embedding_dim=model_config.embedding_dim,
                   dropout=model_config.dropout, dtype=DTYPES[model_config.dtype], **options)


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

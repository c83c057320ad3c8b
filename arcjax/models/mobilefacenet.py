"""MobileFaceNet (Chen et al., 2018), the architecture of the paper's Table 1.

A 3×3 stride-2 stem, a depthwise 3×3, MobileNetV2 bottlenecks (1×1 expand,
depthwise 3×3, linear 1×1 project; PReLU, residual where the shape is kept),
a 1×1 conv to 512, then the global depthwise conv (GDConv) whose kernel covers
the whole last feature map (7×7 for 112×112 faces) instead of global average
pooling, and a linear FC-BN to the embedding (the paper's linear 1×1 conv to 128-d).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from arcjax.models.iresnet import CONV_INIT, BatchNorm, PReLU, check_images

# The bottleneck stages as insightface's arcface_torch builds them: (hidden width, output
# width at scale 1, first stride); the repeats come from `blocks`. The hidden widths do not
# grow with `scale`. At scale 1 these are the paper's Table 1 rows (t, c, n, s) = (2, 64, 5, 2),
# (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1).
STAGES = ((128, 64, 2), (256, 128, 2), (256, 128, 1), (512, 128, 2), (256, 128, 1))


class _ConvBN(nn.Module):
  """Conv (no bias) + BN, then PReLU unless `linear`. x: (B, H, W, C) → (B, H', W', features).

  `padding` is symmetric, as PyTorch's: 1 for 3×3 kernels, 0 for 1×1 and GDConv.
  """
  features: int
  kernel: tuple[int, int]
  dtype: Any
  stride: int = 1
  padding: int = 0
  groups: int = 1
  linear: bool = False
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Conv(self.features, self.kernel, strides=self.stride, padding=self.padding,
                feature_group_count=self.groups, use_bias=False, kernel_init=CONV_INIT,
                dtype=self.dtype, name="conv")(x)
    x = BatchNorm(use_running_average=not train, dtype=self.dtype, axis_name=self.bn_axis_name,
                  name="bn")(x)
    return x if self.linear else PReLU(name="prelu")(x)


class _Bottleneck(nn.Module):
  """MobileNetV2 inverted residual, with PReLU: 1×1 to `hidden`, depthwise 3×3, linear 1×1.

  x: (B, H, W, C) → (B, ceil(H/stride), ceil(W/stride), features); residual where the
  shape is kept.
  """
  hidden: int
  features: int
  stride: int
  dtype: Any
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    unit = functools.partial(_ConvBN, dtype=self.dtype, bn_axis_name=self.bn_axis_name)
    y = unit(self.hidden, (1, 1), name="expand")(x, train)
    y = unit(self.hidden, (3, 3), stride=self.stride, padding=1, groups=self.hidden,
             name="depthwise")(y, train)
    y = unit(self.features, (1, 1), linear=True, name="project")(y, train)
    return x + y if self.stride == 1 and x.shape[-1] == self.features else y


def stage_repeats(blocks: tuple[int, int, int, int]) -> tuple[int, ...]:
  """The number of bottlenecks in each of the five stages of `STAGES`, from `blocks`."""
  return (1 + blocks[1], 1, blocks[2], 1, blocks[3])


class MobileFaceNet(nn.Module):
  """MobileFaceNet: images (B, H, W, C) float, normalised → embeddings (B, embedding_dim) float32.

  Four stride-2 layers (the stem and three bottleneck stages) take 112×112 to 7×7;
  the GDConv kernel is the last feature map's size, so any input size works. The
  paper uses embedding_dim=128: 1.003 M parameters here (the paper says 0.99 M).

  As insightface's arcface_torch `MobileFaceNet(scale, blocks)`: `scale` multiplies the
  stem's and the stages' output widths (not the bottlenecks' hidden widths); `blocks`
  are the repeats of the stem's second layer (1: a 3×3 conv in 64 groups, else that many
  bottlenecks), of the first stage after its stride-2 block, and of the two stride-1
  stages. Its last BatchNorm has a learnt scale where this one has none (as IResNet's):
  `onnx_import` folds that scale into the FC, which computes the same.
  """
  embedding_dim: int = 512
  dropout: float = 0.0
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  scale: int = 1
  blocks: tuple[int, int, int, int] = (1, 4, 6, 2)

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    check_images(images)
    unit = functools.partial(_ConvBN, dtype=self.dtype, bn_axis_name=self.bn_axis_name)
    block = functools.partial(_Bottleneck, dtype=self.dtype, bn_axis_name=self.bn_axis_name)
    x = unit(64 * self.scale, (3, 3), stride=2, padding=1, name="stem")(images, train)
    if self.blocks[0] == 1:
      x = unit(64 * self.scale, (3, 3), padding=1, groups=64, name="stem_depthwise")(x, train)
    else:
      for index in range(self.blocks[0]):
        x = block(128, 64 * self.scale, 1, name=f"stage0_block{index + 1}")(x, train)
    for stage, (repeats, (hidden, width, stride)) in enumerate(zip(stage_repeats(self.blocks),
                                                                   STAGES)):
      for index in range(repeats):
        x = block(hidden, width * self.scale, stride if index == 0 else 1,
                  name=f"stage{stage + 1}_block{index + 1}")(x, train)
    x = unit(512, (1, 1), name="conv_sep")(x, train)
    x = unit(512, x.shape[1:3], groups=512, linear=True, name="gdconv")(x, train)
    x = x.reshape(x.shape[0], -1)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.Dense(self.embedding_dim, use_bias=False, dtype=self.dtype, name="fc")(x)
    x = BatchNorm(use_running_average=not train, use_scale=False, dtype=jnp.float32,
                  axis_name=self.bn_axis_name, name="features")(x.astype(jnp.float32))
    return x

"""IResNet-18/34/50/100/200: the ArcFace paper's "LResNet-E-IR" backbone.

As insightface's `arcface_torch/backbones/iresnet.py`: a 3×3 stride-1 stem
(+BN+PReLU) so that four stride-2 stages take 112×112 faces to 7×7, the improved
residual unit BN-Conv3×3-BN-PReLU-Conv3×3(stride)-BN, and the output block
BN-Dropout-Flatten-FC-BN. The last BN has no scale (insightface freezes its
weight at 1), so the embedding's per-dimension scale is not learnt.

Also holds the layers MobileFaceNet shares: per-channel `PReLU`, the conv
initialiser and the BatchNorm settings.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch BatchNorm defaults (momentum 0.1 on the new value, eps 1e-5), as insightface.
BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)
# Kaiming normal, fan-out: what torchvision and insightface's MobileFaceNet use.
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class PReLU(nn.Module):
  """Per-channel PReLU over the last axis, slope initialised to 0.25 (PyTorch's default).

  x: (..., C) → (..., C) in x's dtype; the slope parameter is float32.
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    alpha = self.param("alpha", nn.initializers.constant(0.25), (x.shape[-1],), jnp.float32)
    return jnp.where(x >= 0, x, alpha.astype(x.dtype) * x)


def check_images(images: jax.Array) -> None:
  """Raises ValueError unless `images` is a (B, H, W, C) float array (normalised, not uint8)."""
  if images.ndim != 4:
    raise ValueError(f"images must be (B, H, W, C); got shape {images.shape}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(
        f"images must be float (normalize_images(uint8) first); got dtype {images.dtype}")


class _IBasicBlock(nn.Module):
  """Improved residual unit: BN-Conv3×3-BN-PReLU-Conv3×3(stride)-BN, plus the shortcut.

  x: (B, H, W, C_in) → (B, ceil(H/stride), ceil(W/stride), features).
  """
  features: int
  stride: int
  dtype: Any
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = functools.partial(BatchNorm, use_running_average=not train, dtype=self.dtype,
                           axis_name=self.bn_axis_name)
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=CONV_INIT, dtype=self.dtype)
    y = bn(name="bn1")(x)
    y = conv(self.features, (3, 3), padding=1, name="conv1")(y)
    y = bn(name="bn2")(y)
    y = PReLU(name="prelu")(y)
    y = conv(self.features, (3, 3), strides=self.stride, padding=1, name="conv2")(y)
    y = bn(name="bn3")(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = conv(self.features, (1, 1), strides=self.stride, padding=0, name="downsample_conv")(x)
      x = bn(name="downsample_bn")(x)
    return x + y


class IResNet(nn.Module):
  """IResNet: images (B, H, W, C) float, normalised → embeddings (B, embedding_dim) float32.

  Each of the four stages halves H and W (ceil), so 112×112 ends at 7×7 and the FC
  has 512·7·7 inputs; other sizes give other FC widths. `dtype` is the compute
  dtype (bfloat16 for mixed precision); parameters stay float32 and the last BN
  runs in float32. `bn_axis_name` (pmap's device axis) synchronises the batch
  statistics of every BatchNorm over the devices.
  """
  stage_sizes: Sequence[int]
  embedding_dim: int = 512
  dropout: float = 0.0
  dtype: Any = jnp.float32
  widths: Sequence[int] = (64, 128, 256, 512)
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    check_images(images)
    bn = functools.partial(BatchNorm, use_running_average=not train, dtype=self.dtype,
                           axis_name=self.bn_axis_name)
    x = nn.Conv(self.widths[0], (3, 3), padding=1, use_bias=False, kernel_init=CONV_INIT,
                dtype=self.dtype, name="stem_conv")(images)
    x = bn(name="stem_bn")(x)
    x = PReLU(name="stem_prelu")(x)
    for stage, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for block in range(num_blocks):
        x = _IBasicBlock(width, stride=2 if block == 0 else 1, dtype=self.dtype,
                         bn_axis_name=self.bn_axis_name, name=f"stage{stage + 1}_block{block + 1}")(x, train)
    x = bn(name="bn_out")(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.Dense(self.embedding_dim, dtype=self.dtype, name="fc")(x)
    x = BatchNorm(use_running_average=not train, use_scale=False, dtype=jnp.float32,
                  axis_name=self.bn_axis_name, name="features")(x.astype(jnp.float32))
    return x

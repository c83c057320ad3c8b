"""A small CNN that trains in minutes on a 2-core CPU, for demos and tests.

Per stage: Conv3×3-BN-ReLU then 2×2 average pool (stride 2, ceil); then global
average pooling, Dropout, FC and BN to the embedding. Any input size and channel
count. Narrow early stages and average (not max) pooling keep it fast on XLA:CPU,
whose max-pool gradient is slow: ~3400 images/s at 28×28 grey and ~160 at
112×112 RGB for a forward+backward pass at batch 64 on 2 cores.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from arcjax.models.iresnet import CONV_INIT, BatchNorm, check_images


class TinyCNN(nn.Module):
  """images (B, H, W, C) float, normalised → embeddings (B, embedding_dim) float32.

  `dtype` is the compute dtype; parameters and the last BN stay float32.
  """
  embedding_dim: int = 512
  dropout: float = 0.0
  dtype: Any = jnp.float32
  widths: Sequence[int] = (16, 32, 64, 128)
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    check_images(images)
    bn = functools.partial(BatchNorm, use_running_average=not train, dtype=self.dtype,
                           axis_name=self.bn_axis_name)
    x = images
    for stage, width in enumerate(self.widths):
      x = nn.Conv(width, (3, 3), padding=1, use_bias=False, kernel_init=CONV_INIT,
                  dtype=self.dtype, name=f"conv{stage + 1}")(x)
      x = nn.relu(bn(name=f"bn{stage + 1}")(x))
      # SAME padding rounds odd sizes up (7 → 4), so 28×28 inputs survive every stage;
      # the padding is left out of the averages.
      x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME", count_include_pad=False)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.Dense(self.embedding_dim, dtype=self.dtype, name="fc")(x)
    x = BatchNorm(use_running_average=not train, use_scale=False, dtype=jnp.float32,
                  axis_name=self.bn_axis_name, name="features")(x.astype(jnp.float32))
    return x

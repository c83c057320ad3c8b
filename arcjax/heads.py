"""The classifier head: the class-centre matrix W (and the plain softmax's bias)."""

import jax
import jax.numpy as jnp

# insightface's arcface_torch draws the centres from N(0, 0.01²). The normalised
# losses see only their directions; the scale sets how fast they turn under SGD.
CENTRE_INIT_STD = 0.01


def init_head(key: jax.Array, num_classes: int, embedding_dim: int, *,
              bias: bool) -> dict[str, jax.Array]:
  """Initial head parameters.

  Args:
    key: PRNG key.
    num_classes: C, the training identities.
    embedding_dim: d.
    bias: add a (C,) zero bias (the plain softmax of `margins.PRESETS['softmax']`).

  Returns:
    {'centres': (C, d) float32 ~ N(0, 0.01²)} plus {'bias': (C,) float32 zeros} if `bias`.
  """
  if num_classes < 1 or embedding_dim < 1:
    raise ValueError(f"num_classes={num_classes} and embedding_dim={embedding_dim} "
                     "must be positive")
  head = {"centres": CENTRE_INIT_STD * jax.random.normal(key, (num_classes, embedding_dim),
                                                         jnp.float32)}
  if bias:
    head["bias"] = jnp.zeros((num_classes,), jnp.float32)
  return head

"""The classifier head: the class-centre matrix W (and the plain softmax's bias).

`config.head` picks how the margin softmax term runs over W:
  - replicated (the default): `losses.margin_softmax_loss`, the (B, C) logits at once;
  - `chunk_size > 0`: `losses.chunked_margin_softmax_loss`, (B, chunk_size) at a time;
  - `sharded`: W split over the devices' axis (`partial_fc.sharded_margin_loss`),
    with Partial-FC sampling of a fraction `sample_rate` of each shard's centres.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp

from arcjax import losses
from arcjax import partial_fc

# insightface's arcface_torch draws the centres from N(0, 0.01²). The normalised
# losses see only their directions; the scale sets how fast they turn under SGD.
CENTRE_INIT_STD = 0.01


def init_head(key: jax.Array, num_classes: int, embedding_dim: int, *,
              bias: bool, num_shards: int = 1) -> dict[str, jax.Array]:
  """Initial head parameters.

  Args:
    key: PRNG key.
    num_classes: C, the training identities.
    embedding_dim: d.
    bias: add a (C,) zero bias (the plain softmax of `margins.PRESETS['softmax']`).
    num_shards: the devices the centres will be split over: zero rows are
      appended up to a multiple of it (`partial_fc.pad_classes`).

  Returns:
    {'centres': (C_pad, d) float32 ~ N(0, 0.01²)} plus {'bias': (C,) float32 zeros} if `bias`.
  """
  if num_classes < 1 or embedding_dim < 1:
    raise ValueError(f"num_classes={num_classes} and embedding_dim={embedding_dim} "
                     "must be positive")
  centres = CENTRE_INIT_STD * jax.random.normal(key, (num_classes, embedding_dim), jnp.float32)
  head = {"centres": partial_fc.pad_classes(centres, num_shards)}
  if bias:
    head["bias"] = jnp.zeros((num_classes,), jnp.float32)
  return head


def check_head_config(head_config: Any, loss_config: Any) -> None:
  """Raises ValueError naming the first `config.head` value that cannot run with the loss."""
  if not 0.0 < head_config.sample_rate <= 1.0:
    raise ValueError(f"config.head.sample_rate must be in (0, 1], got {head_config.sample_rate!r}")
  if head_config.chunk_size:
    losses.check_chunk_size(head_config.chunk_size)
  if head_config.sample_rate < 1.0 and not head_config.sharded:
    raise ValueError("config.head.sample_rate < 1 (Partial FC) needs config.head.sharded=True")
  if (head_config.sharded or head_config.chunk_size) and not loss_config.normalize:
    raise ValueError("a chunked or sharded head computes the normalised margin softmax; the "
                     "plain softmax (loss.normalize=False) needs the replicated head")
  if head_config.sharded and (loss_config.intra_weight or loss_config.inter_weight):
    raise ValueError("the Intra and Inter terms need every class centre on each device: use "
                     "config.head.sharded=False with loss.intra_weight or loss.inter_weight")


def margin_term(loss_config: Any, head_config: Any, num_classes: int,
                axis_name: str | None) -> losses.LossFn | None:
  """The margin softmax term of `losses.make_loss_fn` for `config.head`.

  None for the replicated head (make_loss_fn's own). A sharded head runs per
  device inside `shard_map` over `axis_name`, on the device's (C_pad / devices, d)
  shard of the centres; its gradients follow `partial_fc`'s data-parallel
  convention (the centre shard's exact, the backbone's to be `pmean`-ed).
  """
  check_head_config(head_config, loss_config)
  margin = dict(s=loss_config.s, m1=loss_config.m1, m2=loss_config.m2, m3=loss_config.m3,
                gradient=loss_config.gradient)
  if head_config.sharded:
    if axis_name is None:
      raise ValueError("a sharded head runs inside shard_map over an axis_name")

    def sharded(embeddings, head, labels, key):
      loss, aux = partial_fc.sharded_margin_loss(
          embeddings, head["centres"], labels, axis_name=axis_name, num_classes=num_classes,
          sample_rate=head_config.sample_rate, key=key, chunk_size=head_config.chunk_size,
          **margin)
      return loss, {"theta_y": aux["theta_y"]}

    return sharded
  if head_config.chunk_size:
    chunked = functools.partial(losses.chunked_margin_softmax_loss,
                                chunk_size=head_config.chunk_size, **margin)
    return lambda embeddings, head, labels, key: chunked(embeddings, head["centres"], labels)
  return None

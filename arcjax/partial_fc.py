"""Model-parallel margin softmax for millions of classes (Partial FC).

The centre matrix W (C, d) is split over the devices of one mesh axis: shard k
holds the global classes [k·C_local, (k+1)·C_local). Each device embeds its
own slice of the batch; `sharded_margin_loss` all-gathers the embeddings and
labels over the axis, computes the logits of its own classes only, puts the
margin on the target columns that live in its shard and normalises the
softmax with collectives (the row max, the sum of exponentials and the target
logit are reduced across the axis). No device ever holds more than
(global batch × C_local) logits, or (global batch × chunk_size) with chunking.

Partial FC (An et al. 2022, insightface's `partial_fc_v2.py`) also samples a
fraction r of each shard's centres per step: every positive class of the
gathered batch, and random negatives up to ≈ r·C_local.

A class count that is not a multiple of the device count is padded with
dummy (zero) centres at the end, masked out of the softmax: build the
sharded matrix with `pad_classes` / `shard_centres`, pass the true
`num_classes`, and read the real centres back with `unshard_centres`.

How a train step uses it (pmap, or shard_map with `check_vma=False`):

    def step(params, centres_shard, images, labels, key):   # all per-device
      def loss_fn(params, centres_shard):
        x = model.apply(params, images)                      # (B_local, d)
        return sharded_margin_loss(x, centres_shard, labels, axis_name='d',
                                   num_classes=C, sample_rate=r, key=key, ...)
      (loss, aux), (g_params, g_centres) = jax.value_and_grad(
          loss_fn, argnums=(0, 1), has_aux=True)(params, centres_shard)
      g_params = jax.lax.pmean(g_params, 'd')   # backbone: the usual pmean
      # g_centres: already the exact gradient of this shard. Do NOT pmean it.

The gradients follow the data-parallel convention (as insightface's): the
centre shard's is the exact gradient of the global loss; the embeddings'
is that of the device's own rows' mean loss, i.e. (axis size) × ∂loss/∂x,
so that the backbone gradients need exactly the `pmean` that data-parallel
training already does (and local loss terms, e.g. a triplet loss on the
device's rows, add to it unchanged). Under `shard_map` with the default
`check_vma=True`, JAX itself sums the gradient of replicated (unvarying)
backbone parameters over the axis; divide it by the axis size there instead
of taking a `pmean`. Do not differentiate from outside the mapped function.

Optimiser state of unsampled centres (sample_rate < 1): they get an exactly
zero loss gradient that step. We follow partial_fc_v2: one dense optimiser
state over the whole shard, updated every step for every centre. So SGD
momentum keeps moving an unsampled centre along its last velocity (decaying
by the momentum factor per step) and weight decay keeps shrinking it; as the
loss normalises centres, the shrinkage changes only the effective step size
of that row, not its direction. `aux['sampled']` marks the centres used, for
anyone who prefers to mask their updates (optax.masked) instead.
"""

import math

import jax
import jax.numpy as jnp

from arcjax import losses, margins


def padded_num_classes(num_classes: int, num_shards: int) -> int:
  """The smallest multiple of `num_shards` that is ≥ `num_classes`."""
  if num_classes < 1 or num_shards < 1:
    raise ValueError(f"num_classes={num_classes} and num_shards={num_shards} must be positive")
  return -(-num_classes // num_shards) * num_shards


def pad_classes(centres: jax.Array, num_shards: int) -> jax.Array:
  """(C, d) → (C_pad, d): zero dummy centres appended so that C_pad % num_shards == 0.

  Shard the result over the axis with `PartitionSpec(axis)` (shard_map) or
  use `shard_centres` (pmap). The dummies are masked out of the softmax when
  `sharded_margin_loss` is given the true `num_classes`, and get zero gradient.
  """
  num_classes = centres.shape[0]
  extra = padded_num_classes(num_classes, num_shards) - num_classes
  return jnp.pad(centres, ((0, extra), (0, 0)))


def shard_centres(centres: jax.Array, num_shards: int) -> jax.Array:
  """(C, d) → (num_shards, C_local, d), padded; row k is device k's shard (pmap)."""
  padded = pad_classes(centres, num_shards)
  return padded.reshape(num_shards, -1, centres.shape[1])


def unshard_centres(shards: jax.Array, num_classes: int) -> jax.Array:
  """(num_shards, C_local, d) or (C_pad, d) → the (num_classes, d) real centres."""
  centres = shards.reshape(-1, shards.shape[-1])
  if not 0 < num_classes <= centres.shape[0]:
    raise ValueError(f"num_classes={num_classes} must be in (0, {centres.shape[0]}]")
  return centres[:num_classes]


def num_sampled(num_local: int, global_batch: int, sample_rate: float) -> int:
  """Centres used per shard and step: ⌈r·C_local⌉, raised to fit every positive.

  A shard can hold at most min(global_batch, C_local) positives of one batch,
  so it uses min(C_local, max(⌈r·C_local⌉, global_batch)) centres: a static
  count, so that shapes stay fixed under `jit`.
  """
  check_sample_rate(sample_rate)
  return min(num_local, max(math.ceil(sample_rate * num_local), global_batch))


def check_sample_rate(sample_rate: float) -> None:
  """Raises ValueError unless 0 < sample_rate ≤ 1."""
  if not 0.0 < sample_rate <= 1.0:
    raise ValueError(f"sample_rate must be in (0, 1], got sample_rate={sample_rate}")


def _sample(key, local_labels, real, num_keep):
  """Indices (num_keep,) ascending of the centres this shard uses this step.

  Top-k of uniform scores with the positives scored 2 (always kept) and the
  padding −1 (taken last, and only when the shard has too few real classes).
  """
  num_local = real.shape[0]
  positive = jnp.zeros((num_local,), bool).at[
      jnp.where(local_labels >= 0, local_labels, num_local)].set(True, mode="drop")
  scores = jax.random.uniform(key, (num_local,))
  scores = jnp.where(positive, 2.0, jnp.where(real, scores, -1.0))
  return jnp.sort(jax.lax.top_k(scores, num_keep)[1])


def sharded_margin_loss(
    embeddings: jax.Array, centres_shard: jax.Array, labels: jax.Array, *,
    axis_name: str, s: float = 64.0, m1: float = 1.0, m2: float = 0.0,
    m3: float = 0.0, gradient: margins.Gradient = "exact",
    num_classes: int | None = None, sample_rate: float = 1.0,
    key: jax.Array | None = None, chunk_size: int = 0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Margin softmax cross-entropy with the centres sharded over `axis_name`.

  Call inside `jax.pmap` or `jax.shard_map` over `axis_name` (see the module
  docstring for the train step and which gradients need a `pmean`).

  Args:
    embeddings: (B_local, d) this device's features, any float dtype.
    centres_shard: (C_local, d) this device's centres, global classes
      [k·C_local, (k+1)·C_local) on the k-th device of the axis.
    labels: (B_local,) int global class ids in [0, num_classes).
    axis_name: the mesh / pmap axis the centres and the batch are split over.
    s, m1, m2, m3, gradient: see `margins.combined_margin`.
    num_classes: the real class count C; classes ≥ C are padding (see
      `pad_classes`). None: every centre is real (C = axis size × C_local).
    sample_rate: Partial-FC r in (0, 1]; 1 uses every centre (no sampling).
    key: PRNG key of the step, needed when r < 1 (folded with the device's
      axis index, so every shard samples differently).
    chunk_size: > 0 streams over chunks of that many centres on each shard
      (`losses.chunked_margin_softmax_loss`); 0 computes the shard at once.

  Returns:
    (loss, aux): the mean loss over the global batch (the same on every
    device); aux['theta_y'] (B_local,) the angles to the target centres in
    radians; aux['sampled'] (C_local,) bool, the real centres used this step.
  """
  if embeddings.ndim != 2 or centres_shard.ndim != 2 or labels.shape != embeddings.shape[:1] \
      or embeddings.shape[1] != centres_shard.shape[1]:
    raise ValueError(
        "expected embeddings (B_local, d), centres_shard (C_local, d) and labels "
        f"(B_local,), got {embeddings.shape}, {centres_shard.shape} and {labels.shape}")
  margins.validate_margin(s, m1, m2, m3, gradient)
  check_sample_rate(sample_rate)
  if sample_rate < 1.0 and key is None:
    raise ValueError(f"sample_rate={sample_rate} < 1 needs the step's PRNG key, got key=None")
  if chunk_size:
    losses.check_chunk_size(chunk_size)
  num_shards = jax.lax.axis_size(axis_name)
  num_local = centres_shard.shape[0]
  if num_classes is None:
    num_classes = num_shards * num_local
  if not 0 < num_classes <= num_shards * num_local:
    raise ValueError(
        f"num_classes={num_classes} does not fit {num_shards} shards of {num_local} "
        f"centres; pad the centre matrix with pad_classes(centres, {num_shards})")

  shard = jax.lax.axis_index(axis_name)
  offset = shard * num_local
  all_labels = jax.lax.all_gather(labels.astype(jnp.int32), axis_name, tiled=True)
  local_labels = all_labels - offset
  local_labels = jnp.where((local_labels >= 0) & (local_labels < num_local), local_labels, -1)
  real = offset + jnp.arange(num_local) < num_classes

  if sample_rate < 1.0:
    keep = _sample(jax.random.fold_in(key, shard), local_labels, real,
                   num_sampled(num_local, all_labels.shape[0], sample_rate))
    block = centres_shard[keep]
    valid = real[keep]
    # Positives are always kept, so each found position holds the label itself.
    block_labels = jnp.where(local_labels >= 0, jnp.searchsorted(keep, local_labels), -1)
    sampled = jnp.zeros((num_local,), bool).at[keep].set(valid)
  else:
    block, valid, block_labels, sampled = centres_shard, real, local_labels, real

  spec = losses._MarginCE(float(s), float(m1), float(m2), float(m3),
                          gradient == "straight_through", chunk_size, axis_name)
  loss, cos_y = losses._margin_ce(losses.l2_normalize(embeddings), block,
                                  block_labels, valid, spec)
  batch = embeddings.shape[0]
  cos_y = jax.lax.dynamic_slice_in_dim(cos_y, shard * batch, batch)
  theta_y = jax.lax.stop_gradient(losses._angle(cos_y))
  return loss, {"theta_y": theta_y, "sampled": sampled}

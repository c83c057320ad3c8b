"""The classifier over C identities: the class-centre matrix W, however stored, and its loss.

One margin softmax cross-entropy, `margin_softmax`, serves every layout of W (the
chunked and sharded ones through one custom-VJP core, `_softmax_ce`):

  - replicated, the (B, C) logits at once (`chunk_size=0`), differentiated by JAX
    with the margin's own backward on the target column: the head costs what a
    plain normalised softmax does;
  - replicated, streamed over chunks of `chunk_size` classes with an online
    log-sum-exp, never more than (B, chunk_size) logits (millions of classes);
  - sharded over a mesh axis (`axis_name`, called per device inside
    `jax.shard_map`): device k holds classes [k·C_local, (k+1)·C_local), the
    embeddings are all-gathered, the softmax is normalised with collectives, and
    Partial FC (An et al. 2022) samples a fraction `sample_rate` of each shard's
    centres per step (every positive, random negatives).

The margin comes in as a function (`margins.MarginFn`): cos θ_y ↦ (target logit,
its slope), evaluated on the R target cosines only, never on the (R, C) matrix.
The margin and the scale s may be traced (a pack's runs differ in them).

The family after ArcFace (`losses.FAMILY`) runs on every one of these layouts,
each member changing only what the core changes per chunk or per row:
  - sub-centres: W stored (C, K, d), split over the devices by class (a class's K
    sub-centres on one shard, Partial FC sampling whole classes); every chunk takes
    (R, width·K) cosines and keeps each class's largest, the backward sending each
    class's gradient to that arg-max sub-centre (sub-center ArcFace);
  - per-row margin values (`rows`: MagFace's m(‖x‖), AdaFace's scaler, ElasticFace's
    drawn margins), gathered with the rows; the target logit may keep a gradient
    w.r.t. them (MagFace's live norm), which the core returns for the target;
  - `Negatives`: an elementwise change of the non-target cosines inside every chunk,
    forward and backward (AdaFace's clamp, CurricularFace's hard negatives).
What a member needs of the whole batch (CurricularFace's mean target cosine,
AdaFace's norm statistics) is computed by the loss outside the core, over the
global batch (`losses.make_loss_fn`). No member needs the (R, C) matrix at once,
so none is restricted to a layout.
`margin_term` builds, from `config.head` and `config.loss`, the term that
`losses.make_loss_fn` composes with the angular terms.

A class count that does not split evenly over the devices is padded with zero
centres at the end (`init_head(..., num_shards)`), masked out of the softmax by
`num_classes`; they get no gradient, so they stay zero, and a checkpoint
restores onto any device count by padding or cutting those rows.

Gradients are exact: the centres' for each shard, the embeddings' summed over
shards (the transpose of the all-gather), whatever the layout.
"""

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from arcjax import errors
from arcjax import margins
from arcjax import sharding

# insightface's arcface_torch draws the centres from N(0, 0.01²). The normalised
# losses see only their directions; the scale sets how fast they turn under SGD.
CENTRE_INIT_STD = 0.01
# term(embeddings (B, d), head {'centres', ['bias']}, labels (B,), key, margin, s, rows=None,
# negatives=None) -> (loss, aux): see `margin_term`.
MarginTerm = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / ‖x‖ along `axis` in float32; a zero vector stays zero."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis, keepdims=True), 1e-24))


def padded_num_classes(num_classes: int, num_shards: int) -> int:
  """The smallest multiple of `num_shards` that is ≥ `num_classes`."""
  if num_classes < 1 or num_shards < 1:
    raise ValueError(f"num_classes={num_classes} and num_shards={num_shards} must be positive")
  return -(-num_classes // num_shards) * num_shards


def init_head(key: jax.Array, num_classes: int, embedding_dim: int, *,
              bias: bool, num_shards: int = 1, subcenters: int = 0) -> dict[str, jax.Array]:
  """Initial head parameters.

  Args:
    key: PRNG key.
    num_classes: C, the training identities.
    embedding_dim: d.
    bias: add a (C,) zero bias (the plain softmax of `margins.PRESETS['softmax']`).
    num_shards: the devices the centres will be split over: zero rows are
      appended up to a multiple of it. The first C rows do not depend on it.
    subcenters: K ≥ 1 stores K sub-centres per class, (C_pad, K, d) (sub-center
      ArcFace); 0, one centre per class, (C_pad, d).

  Returns:
    {'centres': (C_pad, d) or (C_pad, K, d) float32 ~ N(0, 0.01²)} plus {'bias': (C,) float32
    zeros} if `bias`.
  """
  if num_classes < 1 or embedding_dim < 1 or subcenters < 0:
    raise ValueError(f"num_classes={num_classes} and embedding_dim={embedding_dim} "
                     f"must be positive, subcenters={subcenters} >= 0")
  shape = (num_classes, *((subcenters,) if subcenters else ()), embedding_dim)
  centres = CENTRE_INIT_STD * jax.random.normal(key, shape, jnp.float32)
  extra = padded_num_classes(num_classes, num_shards) - num_classes
  head = {"centres": jnp.pad(centres, ((0, extra),) + ((0, 0),) * (centres.ndim - 1))}
  if bias:
    head["bias"] = jnp.zeros((num_classes,), jnp.float32)
  return head


def num_sampled(num_local: int, global_batch: int, sample_rate: float) -> int:
  """Centres used per shard and step: ⌈r·C_local⌉, raised to fit every positive.

  A shard can hold at most min(global_batch, C_local) positives of one batch,
  so it uses min(C_local, max(⌈r·C_local⌉, global_batch)) centres: a static
  count, so that shapes stay fixed under `jit`.
  """
  return min(num_local, max(math.ceil(sample_rate * num_local), global_batch))


# --- The one cross-entropy core ------------------------------------------------------


class Negatives(NamedTuple):
  """An elementwise change of every row's non-target cosines c_j, applied inside each chunk
  (forward and backward), so that no layout ever holds more than a chunk of them.

  clamp: (low, high), or None: c_j ← clip(c_j, low, high), gradient 1 on the closed interval
    and 0 outside (torch.clamp's; AdaFace clamps every cosine to ±(1 − 1e-3)).
  t: () float, or None: CurricularFace's hard negatives, c_j ← c_j·(t + c_j) (slope t + 2c_j)
    where c_j > threshold(cos_y) of its row; t and the threshold carry no gradient.
  threshold: cos_y (R,) -> (R,), each row's bound (CurricularFace's cos(θ_y + m)); with `t`.
  """
  clamp: tuple[float, float] | None = None
  t: jax.Array | None = None
  threshold: Callable[[jax.Array], jax.Array] | None = None


class _Spec(NamedTuple):
  """Static settings of `_softmax_ce` (hashable: a nondiff argument)."""
  chunk_size: int          # columns per chunk; 0 = the whole block at once
  axis_name: str | None    # the class-sharding axis, None on one device
  clamp: tuple[float, float] | None = None  # `Negatives.clamp`
  curriculum: bool = False  # `Negatives.t` is given: the operand `hard` = (threshold, t)


def _chunking(num_columns: int, chunk_size: int) -> tuple[int, int]:
  """(chunk width, number of chunks) covering `num_columns` columns."""
  width = num_columns if chunk_size <= 0 else min(chunk_size, num_columns)
  return width, -(-num_columns // width)


class _Cosines(NamedTuple):
  """A class chunk's cosines and what its backward needs."""
  cos: jax.Array            # (R, width) x̂·Ŵᵀ; with sub-centres the max over each class's K
  closest: jax.Array | None  # (R, width) int8, the arg-max sub-centre; None without sub-centres
  is_target: jax.Array      # (R, width) bool
  fresh: jax.Array          # (width,) bool, columns of this chunk that take part
  start: jax.Array          # () the chunk's first column
  w_hat: jax.Array          # (width·K, d) the normalised centres
  normalize_vjp: Callable


def _chunk(i, x_all, centres, labels, valid, spec) -> _Cosines:
  """The cosines of the i-th class chunk, (R, width).

  Every chunk has the same width so that shapes stay static: the last chunk
  starts at K − width and masks the columns an earlier chunk already covered
  (no padded copy of the centre matrix). Sub-centres (K_local, k, d): a class's k
  cosines are computed together and the largest kept.
  """
  width, _ = _chunking(centres.shape[0], spec.chunk_size)
  start = jnp.minimum(i * width, centres.shape[0] - width)
  w_chunk = jax.lax.dynamic_slice_in_dim(centres, start, width).astype(jnp.float32)
  w_hat, normalize_vjp = jax.vjp(l2_normalize, w_chunk.reshape(-1, w_chunk.shape[-1]))
  cos, closest = x_all @ w_hat.T, None
  if centres.ndim == 3:
    cos = cos.reshape(cos.shape[0], width, centres.shape[1])
    closest = jnp.argmax(cos, axis=2).astype(jnp.int8)
    cos = jnp.max(cos, axis=2)
  columns = start + jnp.arange(width)
  fresh = jax.lax.dynamic_slice_in_dim(valid, start, width) & (columns >= i * width)
  is_target = (columns[None, :] == labels[:, None]) & fresh[None, :]
  return _Cosines(cos, closest, is_target, fresh, start, w_hat, normalize_vjp)


def _negative_cos(cos, hard, spec):
  """The non-target cosines after `Negatives` (elementwise), (R, width)."""
  if spec.clamp is not None:
    cos = jnp.where(cos < spec.clamp[0], spec.clamp[0],
                    jnp.where(cos > spec.clamp[1], spec.clamp[1], cos))
  if spec.curriculum:
    threshold, t = hard
    cos = jnp.where(cos > threshold[:, None], cos * (t + cos), cos)
  return cos


def _negative_slope(cos, hard, spec):
  """d(`_negative_cos`)/d cos, (R, width), or None where it is 1 everywhere."""
  slope = None
  if spec.clamp is not None:
    slope = ((cos >= spec.clamp[0]) & (cos <= spec.clamp[1])).astype(jnp.float32)
    cos = jnp.clip(cos, *spec.clamp)
  if spec.curriculum:
    threshold, t = hard
    curriculum = jnp.where(cos > threshold[:, None], t + 2.0 * cos, 1.0)
    slope = curriculum if slope is None else slope * curriculum
  return slope


def _logits(chunk: _Cosines, target, s, hard, spec):
  """The chunk's logits (R, width): s·cos, the target column s·`target`, masked columns −inf."""
  # The scale after the select: XLA:CPU then keeps x·Ŵᵀ a plain matrix product (a scale
  # folded into it made the whole-block forward 1.7 times slower at C = 85 742).
  logits = s * jnp.where(chunk.is_target, target[:, None], _negative_cos(chunk.cos, hard, spec))
  return jnp.where(chunk.fresh[None, :], logits, -jnp.inf)


def _scan_chunks(step, init, centres, spec):
  """`lax.scan` of `step` over the chunk indices, the first chunk peeled off.

  Peeling lets the carry take its per-shard type from the data (shard_map's
  varying-axes typing) instead of from the constant `init`.
  """
  _, num_chunks = _chunking(centres.shape[0], spec.chunk_size)
  carry, _ = step(init, 0)
  return jax.lax.scan(step, carry, jnp.arange(1, num_chunks))


def _log_sum_exp(x_all, centres, labels, valid, target, s, hard, spec):
  """(R,) log Σ_j exp(logit_j) over every class of every shard, and, for the whole block
  (chunk_size 0), its `_Cosines`, which the backward reuses; None for chunks, which the
  backward recomputes."""
  rows = x_all.shape[0]
  if spec.chunk_size == 0:
    kept = _chunk(0, x_all, centres, labels, valid, spec)
    logits = _logits(kept, target, s, hard, spec)
    row_max = jnp.max(logits, axis=1)
    # A block whose columns are all masked (a shard of padding) gives a zero sum.
    row_max = jnp.maximum(row_max, jnp.finfo(jnp.float32).min)
    row_sum = jnp.sum(jnp.exp(logits - row_max[:, None]), axis=1)
  else:
    kept = None

    def step(carry, i):
      row_max, row_sum = carry
      chunk = _logits(_chunk(i, x_all, centres, labels, valid, spec), target, s, hard, spec)
      new_max = jnp.maximum(row_max, jnp.max(chunk, axis=1))
      row_sum = (row_sum * jnp.exp(row_max - new_max)
                 + jnp.sum(jnp.exp(chunk - new_max[:, None]), axis=1))
      return (new_max, row_sum), None

    floor = jnp.full((rows,), jnp.finfo(jnp.float32).min)
    (row_max, row_sum), _ = _scan_chunks(step, (floor, jnp.zeros((rows,))), centres, spec)
  if spec.axis_name is not None:
    global_max = jax.lax.pmax(row_max, spec.axis_name)
    row_sum = jax.lax.psum(row_sum * jnp.exp(row_max - global_max), spec.axis_name)
    row_max = global_max
  return row_max + jnp.log(row_sum), kept


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _softmax_ce(x_all, centres, labels, valid, target, slope, s, hard, spec):
  """Mean softmax cross-entropy of R rows over a block of K classes, the target logit given.

  Args:
    x_all: (R, d) float32 unit embeddings (every device's rows when sharded).
    centres: (K, d) raw centres of this block (normalised here), or (K, k, d) sub-centres.
    labels: (R,) int32, each row's target column in this block, −1 where it lives elsewhere.
    valid: (K,) bool, False for columns that take no part (padding).
    target: (R,) the target logits before the scale, ψ(cos θ_y), the same on every shard.
    slope: (R,) dψ/dcos θ_y: the target column's cosine enters the backward through it.
    s: () float32, the scale (an operand, not a static setting: a pack's runs may differ in it).
    hard: (threshold (R,), t ()) of `Negatives` when `spec.curriculum`, else ignored.
    spec: `_Spec`.

  Returns:
    The mean loss over the R rows (the same on every shard). The VJP gives the
    exact gradient of this block's centres and this block's part of the
    embeddings' gradient (summed over shards by the all-gather's transpose),
    and that of `target` from the shard that holds each row's target column (a
    target computed from a live value, MagFace's feature norm, passes it on);
    `slope`, `s` and `hard` get none.
  """
  return _softmax_ce_fwd(x_all, centres, labels, valid, target, slope, s, hard, spec)[0]


def _softmax_ce_fwd(x_all, centres, labels, valid, target, slope, s, hard, spec):
  lse, kept = _log_sum_exp(x_all, centres, labels, valid, target, s, hard, spec)
  loss = jnp.mean(lse - s * target)
  # Unchunked, the cosines and Ŵ are kept for the backward (no second x·Wᵀ), as autodiff would.
  return loss, (x_all, centres, labels, valid, target, slope, s, hard, lse, kept)


def _softmax_ce_bwd(spec, residuals, g):
  x_all, centres, labels, valid, target, slope, s, hard, lse, kept = residuals
  row_g = s * g / x_all.shape[0]  # ∂loss/∂logit of each row, times ∂logit/∂cos = s

  def grads(chunk: _Cosines):
    d_logits = row_g * (jnp.exp(_logits(chunk, target, s, hard, spec) - lse[:, None])
                        - chunk.is_target)
    # The target column's cosine feeds ψ: chain rule through dψ/dcos on R numbers.
    negative_slope = _negative_slope(chunk.cos, hard, spec)
    d_negative = d_logits if negative_slope is None else d_logits * negative_slope
    d_cos = jnp.where(chunk.is_target, d_logits * slope[:, None], d_negative)
    if chunk.closest is not None:  # each class's gradient goes to its closest sub-centre
      k = centres.shape[1]
      d_cos = jnp.where(jnp.arange(k, dtype=jnp.int8) == chunk.closest[..., None],
                        d_cos[..., None], 0.0).reshape(d_cos.shape[0], -1)
    d_w = chunk.normalize_vjp(d_cos.T @ x_all)[0].reshape(-1, *centres.shape[1:])
    return d_cos @ chunk.w_hat, d_w.astype(centres.dtype)

  if kept is not None:
    dx_all, d_centres = grads(kept)
  else:
    def step(carry, i):
      dx_all, d_centres = carry
      chunk = _chunk(i, x_all, centres, labels, valid, spec)
      dx, d_chunk = grads(chunk)
      old = jax.lax.dynamic_slice_in_dim(d_centres, chunk.start, d_chunk.shape[0])
      fresh = chunk.fresh.reshape(-1, *(1,) * (d_chunk.ndim - 1))
      d_centres = jax.lax.dynamic_update_slice_in_dim(
          d_centres, jnp.where(fresh, d_chunk, old), chunk.start, 0)
      return (dx_all + dx, d_centres), None

    (dx_all, d_centres), _ = _scan_chunks(
        step, (jnp.zeros_like(x_all), jnp.zeros_like(centres)), centres, spec)
  # ∂loss/∂target: s·(p_y − 1)/R, where this shard holds the row's target column.
  d_target = jnp.where(labels >= 0, row_g * (jnp.exp(s * target - lse) - 1.0), 0.0)
  return (dx_all, d_centres, None, None, d_target, jnp.zeros_like(slope), jnp.zeros_like(s),
          jax.tree.map(jnp.zeros_like, hard))


_softmax_ce.defvjp(_softmax_ce_fwd, _softmax_ce_bwd)


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


def margin_softmax(
    embeddings: jax.Array, centres: jax.Array, labels: jax.Array, *,
    margin: margins.MarginFn | Callable[..., tuple[jax.Array, jax.Array]], s: float = 64.0,
    num_classes: int | None = None, chunk_size: int = 0, axis_name: str | None = None,
    sample_rate: float = 1.0, key: jax.Array | None = None, rows: Any = None,
    negatives: Negatives | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean cross-entropy of s · margin(cos θ) over the class-centre matrix, however stored.

  Args:
    embeddings: (B, d) features x (this device's rows when sharded), any float dtype.
    centres: (K, d) centres W: all C (K ≥ C) or, with `axis_name`, this device's
      shard, global classes [k·K, (k+1)·K) on the k-th device of the axis. Or
      (K, k, d): k sub-centres per class, the cosine to a class the largest of its k
      (sub-center ArcFace; a class's gradient goes to that sub-centre).
    labels: (B,) int global class ids in [0, num_classes).
    margin: cos θ_y ↦ (target logit, slope), e.g. `margins.make_margin(m2=0.5)`;
      with `rows`, (cos θ_y, rows) ↦ (target logit, slope). It runs on the target
      cosines of the global batch (R rows when sharded), never on the (R, C) matrix.
    s: the scale, a float or a traced scalar.
    num_classes: C, the real classes; rows ≥ C are padding. None: every row is real.
    chunk_size: > 0 streams over chunks of that many centres (classes: a class's
      sub-centres stay together); 0, all at once.
    axis_name: the mesh axis the centres and the batch are split over (call
      inside `jax.shard_map` or `jax.pmap`; the gradient is that of the whole
      loss when each device's copy of it gets cotangent 1, as when
      differentiating inside the map; `margin_term` differentiates from outside
      a shard_map); None on one device.
    sample_rate: Partial-FC r in (0, 1]; 1 uses every centre (whole classes, their
      sub-centres together).
    key: the step's PRNG key, needed when r < 1 (folded with the shard index).
    rows: None, or a pytree of (B,) per-row values the margin reads (this device's
      rows; all-gathered when sharded): a per-row margin. The target logit may
      depend on them with a gradient (MagFace's margin of the live feature norm);
      its slope is taken at fixed rows.
    negatives: None, or the `Negatives` change of the non-target cosines.

  Returns:
    (loss, aux): the mean loss over the global batch (float32, the same on
    every device); aux['theta_y'] (B,) the angles to the target centres in
    radians (to the closest sub-centre); aux['sampled'] (K,) bool, the real
    centres used this step.
  """
  if (embeddings.ndim != 2 or centres.ndim not in (2, 3) or labels.shape != embeddings.shape[:1]
      or embeddings.shape[1] != centres.shape[-1]):
    raise ValueError("expected embeddings (B, d), centres (K, d) or (K, k, d) and labels (B,), "
                     f"got {embeddings.shape}, {centres.shape} and {labels.shape}")
  if not 0.0 < sample_rate <= 1.0 or (sample_rate < 1.0 and key is None):
    raise ValueError(f"sample_rate={sample_rate} must be in (0, 1], and < 1 needs a key")
  if negatives is not None and (negatives.t is None) != (negatives.threshold is None):
    raise ValueError("Negatives.t and Negatives.threshold come together")
  margins.check_labels(labels, num_classes or centres.shape[0])
  num_shards = 1 if axis_name is None else jax.lax.axis_size(axis_name)
  num_local = centres.shape[0]
  num_classes = num_classes or num_shards * num_local
  if not 0 < num_classes <= num_shards * num_local:
    raise ValueError(f"num_classes={num_classes} does not fit {num_shards} shards of "
                     f"{num_local} centres")
  x_hat = l2_normalize(embeddings)
  labels = labels.astype(jnp.int32)
  plain = rows is None and negatives is None and centres.ndim == 2
  if axis_name is None and chunk_size == 0 and sample_rate == 1.0 and plain:
    return _whole_block(x_hat, centres, labels, margin, s, num_classes)
  if axis_name is None:
    shard, x_all, all_labels = 0, x_hat, labels
  else:
    shard = jax.lax.axis_index(axis_name)
    x_all = jax.lax.all_gather(x_hat, axis_name, tiled=True)
    all_labels = jax.lax.all_gather(labels, axis_name, tiled=True)
    if rows is not None:
      rows = jax.tree.map(lambda v: jax.lax.all_gather(v, axis_name, tiled=True), rows)
  local_labels = all_labels - shard * num_local
  local_labels = jnp.where((local_labels >= 0) & (local_labels < num_local), local_labels, -1)
  real = shard * num_local + jnp.arange(num_local) < num_classes

  if sample_rate < 1.0:
    keep = _sample(jax.random.fold_in(key, shard), local_labels, real,
                   num_sampled(num_local, all_labels.shape[0], sample_rate))
    block, valid = centres[keep], real[keep]
    # Positives are always kept, so each found position holds the label itself.
    block_labels = jnp.where(local_labels >= 0, jnp.searchsorted(keep, local_labels), -1)
    sampled = jnp.zeros((num_local,), bool).at[keep].set(valid)
  else:
    block, valid, block_labels, sampled = centres, real, local_labels, real

  here = block_labels >= 0
  w_y = l2_normalize(block[jnp.where(here, block_labels, 0)])
  if w_y.ndim == 3:  # sub-centres: the closest of the target class's
    cos_y = jnp.max(jnp.einsum("rd,rkd->rk", x_all, w_y), axis=1)
  else:
    cos_y = jnp.sum(x_all * w_y, axis=1)
  cos_y = jnp.where(here, cos_y, 0.0)
  if axis_name is not None:
    cos_y = jax.lax.psum(cos_y, axis_name)
  cos_y = jax.lax.stop_gradient(cos_y)
  if rows is None:
    logit_y, slope = jax.lax.stop_gradient(margin(cos_y))
  else:
    logit_y, slope = margin(cos_y, rows)
    slope = jax.lax.stop_gradient(slope)
  negatives = negatives or Negatives()
  curriculum = negatives.t is not None
  hard = ((jax.lax.stop_gradient(negatives.threshold(cos_y)),
           jax.lax.stop_gradient(jnp.asarray(negatives.t, jnp.float32)))
          if curriculum else (jnp.zeros_like(cos_y), jnp.zeros((), jnp.float32)))
  loss = _softmax_ce(x_all, block, block_labels, valid, logit_y, slope,
                     jax.lax.stop_gradient(jnp.asarray(s, jnp.float32)), hard,
                     _Spec(int(chunk_size), axis_name,
                           None if negatives.clamp is None else tuple(map(float, negatives.clamp)),
                           curriculum))
  own = jax.lax.dynamic_slice_in_dim(cos_y, shard * embeddings.shape[0], embeddings.shape[0])
  return loss, {"theta_y": margins.angle(own), "sampled": sampled}


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _scale_cotangent(x: jax.Array, factor: float) -> jax.Array:
  """x, whose cotangent is multiplied by `factor` on the way back."""
  return x


_scale_cotangent.defvjp(lambda x, factor: (x, None), lambda factor, _, g: (g * factor,))


def _whole_block(x_hat, centres, labels, margin, s, num_classes):
  """The (B, C) logits at once, differentiated by JAX (`margins.apply_margin` on the target
  column): what a plain normalised softmax costs, the margin included."""
  cos = x_hat @ l2_normalize(centres).T
  logits = s * margins.apply_margin(cos, labels, margin)
  columns = jnp.arange(centres.shape[0])[None, :]
  if num_classes < centres.shape[0]:
    logits = jnp.where(columns < num_classes, logits, -jnp.inf)
  # One-hot selects, not `logits[rows, labels]`: their backward fuses into the (B, C) pass.
  is_target = columns == labels[:, None]
  loss = jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.sum(jnp.where(is_target, logits, 0.0), 1))
  cos_y = jax.lax.stop_gradient(cos[jnp.arange(labels.shape[0]), labels])
  return loss, {"theta_y": margins.angle(cos_y), "sampled": columns[0] < num_classes}


def linear_softmax(embeddings: jax.Array, centres: jax.Array, bias: jax.Array,
                   labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The plain softmax (Table 2's 'Softmax'): cross-entropy of x·Wᵀ + b, unnormalised.

  Shapes as `margin_softmax` (replicated centres, bias (C,)); aux['theta_y'] as there.
  """
  x = embeddings.astype(jnp.float32)
  logits = x @ centres.astype(jnp.float32).T + bias.astype(jnp.float32)
  is_target = jnp.arange(centres.shape[0])[None, :] == labels[:, None]
  target = jnp.sum(jnp.where(is_target, logits, 0.0), axis=1)
  cos_y = jnp.sum(l2_normalize(x) * l2_normalize(centres[labels]), axis=1)
  loss = jnp.mean(jax.nn.logsumexp(logits, axis=1) - target)
  return loss, {"theta_y": jax.lax.stop_gradient(margins.angle(cos_y))}


# --- From the config ----------------------------------------------------------------


def check_config(head_config: Any, loss_config: Any) -> None:
  """Raises ConfigError naming the first `config.head` value that cannot run with the loss."""
  if not 0.0 < head_config.sample_rate <= 1.0:
    raise errors.ConfigError(f"config.head.sample_rate must be in (0, 1], "
                             f"got {head_config.sample_rate!r}")
  chunk = head_config.chunk_size
  if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
    raise errors.ConfigError(f"config.head.chunk_size must be an int >= 0 (0: no chunks), "
                             f"got {chunk!r}")
  if head_config.sample_rate < 1.0 and not head_config.sharded:
    raise errors.ConfigError("config.head.sample_rate < 1 (Partial FC) needs "
                             "config.head.sharded=True")
  # Only the margin kind holds `normalize` (the family after ArcFace is normalised).
  if (head_config.sharded or chunk) and not loss_config.get("normalize", True):
    raise errors.ConfigError("a chunked or sharded head computes the normalised margin "
                             "softmax; the plain softmax (loss.normalize=False) needs "
                             "head.sharded=False and head.chunk_size=0")


def margin_term(loss_config: Any, head_config: Any, num_classes: int,
                mesh: Mesh | None = None) -> MarginTerm:
  """The margin softmax term over the head stored as `config.head`.

  The term is called as `term(embeddings, head, labels, key, margin, s, rows=None,
  negatives=None)`: the margin (`margins.make_margin`, annealed by the warm-up, or a
  family member's, `losses.make_loss_fn`), the scale, the per-row values the margin
  reads and the change of the non-target cosines come in per call (see
  `margin_softmax`), so that one term serves runs whose values differ. The plain
  softmax (`loss.normalize=False`) takes none of them. A sharded head runs its loss
  per device under `jax.shard_map` over `mesh`'s axis, the centres (and sub-centres)
  split by class as `sharding.partition_rules` lays them out, the per-row values
  split with the batch; the rest of the step stays an ordinary jitted function of
  global arrays.
  """
  check_config(head_config, loss_config)
  if not loss_config.get("normalize", True):
    return lambda embeddings, head, labels, key, margin, s, rows=None, negatives=None: (
        linear_softmax(embeddings, head["centres"], head["bias"], labels))
  options = dict(num_classes=num_classes, chunk_size=head_config.chunk_size)
  if not head_config.sharded:
    return lambda embeddings, head, labels, key, margin, s, rows=None, negatives=None: (
        margin_softmax(embeddings, head["centres"], labels, margin=margin, s=s, rows=rows,
                       negatives=negatives, **options))
  if mesh is None:
    raise ValueError("a sharded head needs the mesh it is sharded over")

  def sharded(embeddings, head, labels, key, margin, s, rows=None, negatives=None):
    # The margin, s and the negatives' t are closed over (traced or not): the same on every
    # device. The per-row values are split with the batch, gathered inside (their gradient,
    # MagFace's, summed back over the shards by the gather's transpose).
    def local(embeddings, centres, labels, key, rows):
      loss, aux = margin_softmax(embeddings, centres, labels, margin=margin, s=s,
                                 axis_name=sharding.AXIS, sample_rate=head_config.sample_rate,
                                 key=key, rows=rows, negatives=negatives, **options)
      # shard_map (check_vma=False) transposes this replicated output by handing each of
      # the N devices 1/N of its cotangent; the core's gradient is that of the whole loss.
      return _scale_cotangent(loss, jax.lax.axis_size(sharding.AXIS)), aux["theta_y"]

    # check_vma=False: the loss is replicated by construction (psum'd inside the core).
    row_specs = jax.tree.map(lambda _: P(sharding.AXIS), rows)
    mapped = jax.shard_map(local, mesh=mesh, check_vma=False,
                           in_specs=(P(sharding.AXIS), P(sharding.AXIS), P(sharding.AXIS), P(),
                                     row_specs),
                           out_specs=(P(), P(sharding.AXIS)))
    loss, theta_y = mapped(embeddings, head["centres"], labels, key, rows)
    return loss, {"theta_y": theta_y}

  return sharded

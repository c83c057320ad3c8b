"""The losses of the paper's Table 2, as pure functions of arrays.

Margin softmax cross-entropy from (embeddings, centres, labels), the angular
Intra / Inter / Triplet terms, and `make_loss_fn`, the weighted sum a loss
config names. Everything is computed in float32 whatever the input dtype.
Angles are in radians.
"""

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from arcjax import margins

# loss_fn(embeddings (B, d), head, labels (B,), key) -> (loss, aux); `key` is the step's
# PRNG key (only Partial-FC sampling draws from it).
LossFn = Callable[[jax.Array, dict, jax.Array, jax.Array | None], tuple[jax.Array, dict]]


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / ‖x‖ along `axis` in float32; a zero vector stays zero."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis, keepdims=True), 1e-24))


def _angle(cos: jax.Array) -> jax.Array:
  """arccos with the argument clipped so that its gradient stays finite."""
  return jnp.arccos(jnp.clip(cos, -1.0 + margins._EPS, 1.0 - margins._EPS))


def _check_shapes(embeddings, centres, labels) -> None:
  if (embeddings.ndim != 2 or centres.ndim != 2 or labels.ndim != 1
      or embeddings.shape[1] != centres.shape[1]
      or labels.shape[0] != embeddings.shape[0]):
    raise ValueError(
        "expected embeddings (B, d), centres (C, d) and labels (B,), got "
        f"{embeddings.shape}, {centres.shape} and {labels.shape}")


def margin_softmax_loss(
    embeddings: jax.Array, centres: jax.Array, labels: jax.Array, *,
    s: float = 64.0, m1: float = 1.0, m2: float = 0.0, m3: float = 0.0,
    gradient: margins.Gradient = "exact", normalize: bool = True,
    bias: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean cross-entropy of s · margin(cos θ).

  Args:
    embeddings: (B, d) features x, any float dtype.
    centres: (C, d) class centres W.
    labels: (B,) int in [0, C).
    s, m1, m2, m3, gradient: see `margins.combined_margin`.
    normalize: False gives the plain softmax: logits x·Wᵀ + bias, no scale and
      no margin (then s must be 1 and the margins the identity).
    bias: (C,) or None, added to the logits of the plain softmax only.

  Returns:
    (loss, aux): loss a float32 scalar; aux['theta_y'] (B,) the angle between
    each feature and its class centre in radians (for θ histograms).
  """
  _check_shapes(embeddings, centres, labels)
  margins.validate_margin(s, m1, m2, m3, gradient)
  x, w = l2_normalize(embeddings), l2_normalize(centres)
  cos_theta = x @ w.T
  rows = jnp.arange(labels.shape[0])
  theta_y = jax.lax.stop_gradient(_angle(cos_theta[rows, labels]))
  if normalize:
    if bias is not None:
      raise ValueError("a bias is only used by the plain softmax (normalize=False)")
    logits = s * margins.combined_margin(cos_theta, labels, m1, m2, m3,
                                         gradient=gradient)
  else:
    if (s, m1, m2, m3) != (1.0, 1.0, 0.0, 0.0):
      raise ValueError("the plain softmax (normalize=False) takes no scale or "
                       f"margin, got s={s}, m1={m1}, m2={m2}, m3={m3}")
    margins.check_labels(labels, centres.shape[0])
    logits = embeddings.astype(jnp.float32) @ centres.astype(jnp.float32).T
    if bias is not None:
      logits = logits + bias.astype(jnp.float32)
  loss = jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[rows, labels])
  return loss, {"theta_y": theta_y}


def intra_loss(theta_y: jax.Array) -> jax.Array:
  """Intra-Loss (the paper's eq. 5 term): (1/π) · mean θ_y, θ_y (B,) radians."""
  return jnp.mean(theta_y) / jnp.pi


def inter_loss(centres: jax.Array, labels: jax.Array) -> jax.Array:
  """Inter-Loss (the paper's eq. 6 term), pushing class centres apart.

      −1/(π(C−1)) · mean_i Σ_{j≠y_i} arccos(Ŵ_{y_i} · Ŵ_j)

  Args:
    centres: (C, d) class centres W.
    labels: (B,) int in [0, C), the batch's classes y_i.
  """
  w = l2_normalize(centres)
  num_classes = w.shape[0]
  cos = w[labels] @ w.T                                       # (B, C)
  others = jnp.arange(num_classes)[None, :] != labels[:, None]
  angles = jnp.where(others, _angle(jnp.where(others, cos, 0.0)), 0.0)
  return -jnp.mean(jnp.sum(angles, axis=1)) / (jnp.pi * (num_classes - 1))


def triplet_loss(embeddings: jax.Array, labels: jax.Array,
                 margin: float = 0.35) -> jax.Array:
  """Triplet-Loss in angular space with batch-hard online mining.

  For each anchor a, the hardest positive p (largest angle, same label,
  p ≠ a) and the hardest negative n (smallest angle, other label) in the
  batch (Hermans et al. 2017):

      max(0, arccos(x̂_a·x̂_p) + margin − arccos(x̂_a·x̂_n)),

  averaged over the anchors that have both a positive and a negative in the
  batch (0 when none has: sample batches of P identities × K images).

  Args:
    embeddings: (B, d) features.
    labels: (B,) int class labels.
    margin: in radians (the paper's 0.35).
  """
  x = l2_normalize(embeddings)
  angles = _angle(x @ x.T)                                     # (B, B)
  same = labels[:, None] == labels[None, :]
  positive = same & ~jnp.eye(labels.shape[0], dtype=bool)
  hardest_positive = jnp.max(jnp.where(positive, angles, -jnp.inf), axis=1)
  hardest_negative = jnp.min(jnp.where(same, jnp.inf, angles), axis=1)
  valid = jnp.any(positive, axis=1) & jnp.any(~same, axis=1)
  hinge = jnp.maximum(0.0, hardest_positive + margin - hardest_negative)
  hinge = jnp.where(valid, hinge, 0.0)
  return jnp.sum(hinge) / jnp.maximum(jnp.sum(valid), 1)


def loss_config(preset: str = "arcface", **overrides) -> ml_collections.ConfigDict:
  """A `config.loss` for a margin preset (see `margins.PRESETS`).

  Its s, m1, m2, m3, normalize and bias, the exact gradient and the margin
  softmax term alone; `overrides` change any field, e.g.
  `loss_config('arcface', intra_weight=1.0)` is the paper's ArcFace+Intra.
  """
  spec = margins.get_preset(preset)
  config = ml_collections.ConfigDict(dict(
      preset=preset, s=spec.s, m1=spec.m1, m2=spec.m2, m3=spec.m3,
      normalize=spec.normalize, bias=spec.bias, gradient="exact",
      softmax_weight=1.0, intra_weight=0.0, inter_weight=0.0,
      triplet_weight=0.0, triplet_margin=0.35))
  unknown = set(overrides) - set(config)
  if unknown:
    raise ValueError(f"unknown loss config fields {sorted(unknown)}; known: {sorted(config)}")
  config.update(overrides)
  return config


def make_loss_fn(config: ml_collections.ConfigDict | Any,
                 margin_term: LossFn | None = None) -> LossFn:
  """The composite loss of a `config.loss`: any row of the paper's Table 2.

      softmax_weight · margin softmax + intra_weight · Intra
        + inter_weight · Inter + triplet_weight · Triplet

  Fields read: s, m1, m2, m3, normalize, bias, gradient, softmax_weight,
  intra_weight, inter_weight, triplet_weight, triplet_margin. All values are
  validated here, before anything is compiled.

  Args:
    config: `config.loss`.
    margin_term: computes the margin softmax term and aux['theta_y'] instead of
      `margin_softmax_loss` (a chunked or class-sharded head: `heads.margin_term`).

  Returns:
    loss_fn(embeddings (B, d), head {'centres': (C, d)[, 'bias': (C,)]},
    labels (B,), key=None) -> (loss, aux) with aux['theta_y'] (B,) radians
    and one aux['loss/<term>'] per active term (unweighted).
  """
  margins.validate_margin(config.s, config.m1, config.m2, config.m3,
                          config.gradient)
  weights = {"softmax": config.softmax_weight, "intra": config.intra_weight,
             "inter": config.inter_weight, "triplet": config.triplet_weight}
  for name, weight in weights.items():
    if weight < 0:
      raise ValueError(f"loss weight {name}_weight must be >= 0, got {weight}")
  if not any(weights.values()):
    raise ValueError(f"every loss weight is 0: {weights}")
  if config.bias and config.normalize:
    raise ValueError("loss.bias=True needs loss.normalize=False (the plain softmax)")

  def plain_margin_term(embeddings, head, labels, key):
    del key
    return margin_softmax_loss(
        embeddings, head["centres"], labels, s=config.s, m1=config.m1, m2=config.m2,
        m3=config.m3, gradient=config.gradient, normalize=config.normalize,
        bias=head.get("bias"))

  def loss_fn(embeddings, head, labels, key=None):
    centres = head["centres"]
    softmax, aux = (margin_term or plain_margin_term)(embeddings, head, labels, key)
    terms = {}
    if weights["softmax"]:
      terms["softmax"] = softmax
    if weights["intra"]:
      x, w = l2_normalize(embeddings), l2_normalize(centres)
      terms["intra"] = intra_loss(_angle(jnp.sum(x * w[labels], axis=1)))
    if weights["inter"]:
      terms["inter"] = inter_loss(centres, labels)
    if weights["triplet"]:
      terms["triplet"] = triplet_loss(embeddings, labels, config.triplet_margin)
    total = sum(weights[name] * value for name, value in terms.items())
    aux.update({f"loss/{name}": value for name, value in terms.items()})
    return total, aux

  return loss_fn


# --- The class-chunked, memory-bounded margin softmax ---------------------------
#
# For C in the millions the (B, C) logits (and their exp and gradient) dwarf
# the centre matrix itself. `_margin_ce` streams over chunks of classes with an
# online log-sum-exp and never holds more than (B, chunk) of them; its custom
# VJP recomputes each chunk's cosines in the backward pass. The same core runs
# on one shard of a class-sharded centre matrix (arcjax/partial_fc.py): with an
# `axis_name` it gathers the batch and reduces the softmax across the shards.


class _MarginCE(NamedTuple):
  """Static settings of `_margin_ce` (hashable: a nondiff argument)."""
  s: float
  m1: float
  m2: float
  m3: float
  straight_through: bool
  chunk_size: int            # columns per chunk; 0 = the whole block at once
  axis_name: str | None      # the class-sharding axis, None on one device


def _target_margin(cos_y: jax.Array, spec: _MarginCE) -> tuple[jax.Array, jax.Array]:
  """ψ(cos_y) = target_logit(arccos(cos_y)) and dψ/dcos_y, both (R,)."""
  if (spec.m1, spec.m2, spec.m3) == (1.0, 0.0, 0.0):
    return cos_y, jnp.ones_like(cos_y)
  margin_fn = lambda c: margins.target_logit(_angle(c), spec.m1, spec.m2, spec.m3)
  if spec.straight_through:
    return margin_fn(cos_y), jnp.ones_like(cos_y)
  return jax.jvp(margin_fn, (cos_y,), (jnp.ones_like(cos_y),))


def _chunking(num_columns: int, chunk_size: int) -> tuple[int, int]:
  """(chunk width, number of chunks) covering `num_columns` columns."""
  width = num_columns if chunk_size <= 0 else min(chunk_size, num_columns)
  return width, -(-num_columns // width)


def _chunk(i, x_all, centres, labels, valid, target, spec):
  """Logits of the i-th class chunk, (R, width), target column = s·ψ, masked = -inf.

  Every chunk has the same width so that shapes stay static: the last chunk
  starts at K − width and masks the columns an earlier chunk already covered
  (no padded copy of the centre matrix).
  """
  width, _ = _chunking(centres.shape[0], spec.chunk_size)
  start = jnp.minimum(i * width, centres.shape[0] - width)
  w_chunk = jax.lax.dynamic_slice_in_dim(centres, start, width).astype(jnp.float32)
  w_hat, normalize_vjp = jax.vjp(l2_normalize, w_chunk)
  columns = start + jnp.arange(width)
  fresh = jax.lax.dynamic_slice_in_dim(valid, start, width) & (columns >= i * width)
  is_target = (columns[None, :] == labels[:, None]) & fresh[None, :]
  logits = jnp.where(is_target, target[:, None], spec.s * (x_all @ w_hat.T))
  logits = jnp.where(fresh[None, :], logits, -jnp.inf)
  return logits, is_target, fresh, start, w_hat, normalize_vjp


def _gather_rows(x_hat, spec):
  if spec.axis_name is None:
    return x_hat
  return jax.lax.all_gather(x_hat, spec.axis_name, tiled=True)


def _scan_chunks(step, init, centres, spec):
  """`lax.scan` of `step` over the chunk indices, the first chunk peeled off.

  Peeling lets the carry take its per-shard type from the data (shard_map's
  check_vma typing) instead of from the constant `init`.
  """
  _, num_chunks = _chunking(centres.shape[0], spec.chunk_size)
  carry, _ = step(init, 0)
  return jax.lax.scan(step, carry, jnp.arange(1, num_chunks))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _margin_ce(x_hat, centres, labels, valid, spec):
  """Mean margin softmax cross-entropy over a block of classes, chunk by chunk.

  Args:
    x_hat: (B, d) float32 normalised embeddings (this device's rows).
    centres: (K, d) raw centres of this block (normalised chunk by chunk).
    labels: (R,) int32, each row's target column in this block, −1 where the
      target lives elsewhere; R = B · (axis size) rows, in `all_gather` order.
    valid: (K,) bool, False for columns that take no part (padding).
    spec: `_MarginCE`.

  Returns:
    (loss, cos_y): the mean over all R rows (identical on every shard) and the
    (R,) target cosines (not differentiable: stop its gradient).

  The VJP gives the exact gradient for `centres` and, for `x_hat`, that of
  the device's own rows' mean loss, (axis size) × ∂loss/∂x_hat: the
  data-parallel convention (see `partial_fc.sharded_margin_loss`).
  """
  return _margin_ce_fwd(x_hat, centres, labels, valid, spec)[0]


def _margin_ce_fwd(x_hat, centres, labels, valid, spec):
  x_all = _gather_rows(x_hat, spec)
  here = labels >= 0
  w_y = l2_normalize(centres[jnp.where(here, labels, 0)])
  cos_y = jnp.where(here, jnp.sum(x_all * w_y, axis=1), 0.0)
  if spec.axis_name is not None:
    cos_y = jax.lax.psum(cos_y, spec.axis_name)
  psi, slope = _target_margin(cos_y, spec)
  target = spec.s * psi

  def step(carry, i):
    row_max, row_sum = carry
    logits = _chunk(i, x_all, centres, labels, valid, target, spec)[0]
    new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
    row_sum = (row_sum * jnp.exp(row_max - new_max)
               + jnp.sum(jnp.exp(logits - new_max[:, None]), axis=1))
    return (new_max, row_sum), None

  rows = x_all.shape[0]
  # A finite floor instead of -inf: a block whose columns are all masked
  # (a shard holding only padding) must give a zero sum, not exp(-inf + inf).
  floor = jnp.full((rows,), jnp.finfo(jnp.float32).min)
  (row_max, row_sum), _ = _scan_chunks(step, (floor, jnp.zeros((rows,))), centres, spec)
  if spec.axis_name is not None:
    global_max = jax.lax.pmax(row_max, spec.axis_name)
    row_sum = jax.lax.psum(row_sum * jnp.exp(row_max - global_max), spec.axis_name)
    row_max = global_max
  lse = row_max + jnp.log(row_sum)
  loss = jnp.mean(lse - target)
  return (loss, cos_y), (x_all, centres, labels, valid, target, slope, lse)


def _margin_ce_bwd(spec, residuals, cotangents):
  x_all, centres, labels, valid, target, slope, lse = residuals
  g = cotangents[0]
  row_g = g / x_all.shape[0]

  def step(carry, i):
    dx_all, d_centres = carry
    logits, is_target, fresh, start, w_hat, normalize_vjp = _chunk(
        i, x_all, centres, labels, valid, target, spec)
    d_logits = row_g * (jnp.exp(logits - lse[:, None]) - is_target)
    # The target column's cosine feeds ψ: chain rule through dψ/dcos on B numbers.
    d_cos = spec.s * jnp.where(is_target, d_logits * slope[:, None], d_logits)
    dx_all = dx_all + d_cos @ w_hat
    d_chunk = normalize_vjp(d_cos.T @ x_all)[0].astype(centres.dtype)
    old = jax.lax.dynamic_slice_in_dim(d_centres, start, d_chunk.shape[0])
    d_centres = jax.lax.dynamic_update_slice_in_dim(
        d_centres, jnp.where(fresh[:, None], d_chunk, old), start, 0)
    return (dx_all, d_centres), None

  (dx_all, d_centres), _ = _scan_chunks(
      step, (jnp.zeros_like(x_all), jnp.zeros_like(centres)), centres, spec)
  if spec.axis_name is None:
    dx_hat = dx_all
  else:
    dx_hat = jax.lax.axis_size(spec.axis_name) * jax.lax.psum_scatter(
        dx_all, spec.axis_name, tiled=True)
  return dx_hat, d_centres, None, None


_margin_ce.defvjp(_margin_ce_fwd, _margin_ce_bwd)


def check_chunk_size(chunk_size: int) -> None:
  """Raises ValueError unless `chunk_size` is a positive int."""
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got chunk_size={chunk_size!r}")


def chunked_margin_softmax_loss(
    embeddings: jax.Array, centres: jax.Array, labels: jax.Array, *,
    chunk_size: int, s: float = 64.0, m1: float = 1.0, m2: float = 0.0,
    m3: float = 0.0, gradient: margins.Gradient = "exact",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`margin_softmax_loss` in O(B·chunk_size) memory instead of O(B·C).

  Same value and gradients as `margin_softmax_loss` (normalised, no bias): a
  `lax.scan` over chunks of `chunk_size` classes with an online log-sum-exp,
  and a custom VJP that recomputes each chunk's cosines in the backward pass
  (4 matmuls of B×d×C instead of 3). The margin touches the B target cosines
  only. C need not be a multiple of `chunk_size`.

  Args:
    embeddings: (B, d) features, any float dtype.
    centres: (C, d) class centres.
    labels: (B,) int in [0, C).
    chunk_size: classes per chunk (> 0; clipped to C).
    s, m1, m2, m3, gradient: see `margins.combined_margin`.

  Returns:
    (loss, aux): float32 scalar; aux['theta_y'] (B,) target angles in radians.
  """
  _check_shapes(embeddings, centres, labels)
  margins.validate_margin(s, m1, m2, m3, gradient)
  check_chunk_size(chunk_size)
  margins.check_labels(labels, centres.shape[0])
  spec = _MarginCE(float(s), float(m1), float(m2), float(m3),
                   gradient == "straight_through", chunk_size, None)
  valid = jnp.ones((centres.shape[0],), bool)
  loss, cos_y = _margin_ce(l2_normalize(embeddings), centres,
                           labels.astype(jnp.int32), valid, spec)
  return loss, {"theta_y": jax.lax.stop_gradient(_angle(cos_y))}

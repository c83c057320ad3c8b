"""The losses of the paper's Table 2 and of the margin family after it, as pure functions.

`margin_softmax_loss`, the reference margin softmax cross-entropy (the (B, C)
logits at once; the head's production core is `head.margin_softmax`), the
angular Intra / Inter / Triplet terms, and `make_loss_fn`, the weighted sum a
loss config names over the head's margin term. The family after ArcFace, each
exact to its paper's official code, with its state in and out explicitly:
`subcenter_arcface_loss`, `curricularface_loss` (t), `magface_loss`,
`adaface_loss` (the feature norms' mean and std), `elasticface_loss` (a key).
Everything is computed in float32 whatever the input dtype. Angles are in radians.

`config.loss.kind` picks what a run trains (`loss_config(name)`): 'margin', any
row of Table 2, or a member of the family (`FAMILY`), which `make_loss_fn` runs
over the head's core on every layout, equal to its reference here.

A loss may keep a running state between steps (`init_loss_state`; the
TrainState holds it): the loss function takes it and returns the new one in
aux['loss_state'], a statistic of the global batch. None of Table 2's losses
keeps one; CurricularFace keeps t, AdaFace its norms' running mean and std.
"""

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from arcjax import errors
from arcjax import head as head_lib
from arcjax import margins
from arcjax import sharding

INTER_FORMS = ("angle", "cosine")
TERMS = ("softmax", "intra", "inter", "triplet")
# The config.loss fields a step may take as traced values (`make_loss_fn`'s hparams, the
# margin warm-up's length): the runs of a pack may differ in them (`train.pack_key`).
TRACED_FIELDS = ("s", "m1", "m2", "m3", *(f"{term}_weight" for term in TERMS),
                 "margin_warmup_steps")
l2_normalize = head_lib.l2_normalize


def _check_shapes(embeddings, centres, labels) -> None:
  if (embeddings.ndim != 2 or centres.ndim != 2 or labels.ndim != 1
      or embeddings.shape[1] != centres.shape[1]
      or labels.shape[0] != embeddings.shape[0]):
    raise ValueError(
        "expected embeddings (B, d), centres (C, d) and labels (B,), got "
        f"{embeddings.shape}, {centres.shape} and {labels.shape}")


def _target_mask(labels: jax.Array, num_classes: int) -> jax.Array:
  """(B, C) bool, True at each row's label."""
  return jnp.arange(num_classes)[None, :] == labels[:, None]


def _pick(values: jax.Array, is_target: jax.Array) -> jax.Array:
  """(B,) each row's target column of (B, C) `values`.

  One-hot selects, not `values[rows, labels]`: their backward fuses into the (B, C) pass
  where a gather's would scatter into a (B, C) buffer.
  """
  return jnp.sum(jnp.where(is_target, values, 0.0), axis=1)


def _mean_cross_entropy(logits: jax.Array, is_target: jax.Array) -> jax.Array:
  """Mean over the rows of log Σ_j exp(logit_j) − logit_y, logits (B, C)."""
  return jnp.mean(jax.nn.logsumexp(logits, axis=1) - _pick(logits, is_target))


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
    s, m1, m2, m3, gradient: see `margins.combined_margin` (s and the margins may be traced).
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
  is_target = _target_mask(labels, centres.shape[0])
  theta_y = jax.lax.stop_gradient(margins.angle(_pick(cos_theta, is_target)))
  if normalize:
    if bias is not None:
      raise ValueError("a bias is only used by the plain softmax (normalize=False)")
    logits = s * margins.combined_margin(cos_theta, labels, m1, m2, m3,
                                         gradient=gradient)
  else:
    given = (s, m1, m2, m3)
    if not any(isinstance(v, jax.core.Tracer) for v in given) and given != (1.0, 1.0, 0.0, 0.0):
      raise ValueError("the plain softmax (normalize=False) takes no scale or "
                       f"margin, got s={s}, m1={m1}, m2={m2}, m3={m3}")
    margins.check_labels(labels, centres.shape[0])
    logits = embeddings.astype(jnp.float32) @ centres.astype(jnp.float32).T
    if bias is not None:
      logits = logits + bias.astype(jnp.float32)
  return _mean_cross_entropy(logits, is_target), {"theta_y": theta_y}


def intra_loss(theta_y: jax.Array) -> jax.Array:
  """Intra-Loss (the paper's eq. 5 term): (1/π) · mean θ_y, θ_y (B,) radians."""
  return jnp.mean(theta_y) / jnp.pi


def inter_loss(centres: jax.Array, labels: jax.Array, form: str = "angle",
               num_classes: int | None = None) -> jax.Array:
  """Inter-Loss, pushing class centres apart, in the paper's form or insightface's.

  'angle' (the paper's eq. 6 term):
      −1/(π(C−1)) · mean_i Σ_{j≠y_i} arccos(Ŵ_{y_i} · Ŵ_j)
  'cosine' (insightface's implementation, train_softmax.py loss_type 7):
      mean_i mean_j Ŵ_{y_i} · Ŵ_j      (j over all C classes, y_i included)

  Args:
    centres: (K, d) class centres W; rows ≥ `num_classes` (padding) are left out.
    labels: (B,) int in [0, C), the batch's classes y_i.
    form: 'angle' or 'cosine'.
    num_classes: C (default K).
  """
  w = l2_normalize(centres)
  num_classes = num_classes or w.shape[0]
  cos = w[labels] @ w.T                                       # (B, K)
  columns = jnp.arange(w.shape[0])[None, :]
  real = columns < num_classes
  if form == "cosine":
    return jnp.mean(jnp.sum(jnp.where(real, cos, 0.0), axis=1)) / num_classes
  others = real & (columns != labels[:, None])
  angles = jnp.where(others, margins.angle(jnp.where(others, cos, 0.0)), 0.0)
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
  angles = margins.angle(x @ x.T)                              # (B, B)
  same = labels[:, None] == labels[None, :]
  positive = same & ~jnp.eye(labels.shape[0], dtype=bool)
  hardest_positive = jnp.max(jnp.where(positive, angles, -jnp.inf), axis=1)
  hardest_negative = jnp.min(jnp.where(same, jnp.inf, angles), axis=1)
  valid = jnp.any(positive, axis=1) & jnp.any(~same, axis=1)
  hinge = jnp.maximum(0.0, hardest_positive + margin - hardest_negative)
  hinge = jnp.where(valid, hinge, 0.0)
  return jnp.sum(hinge) / jnp.maximum(jnp.sum(valid), 1)


# --- The margin family after ArcFace --------------------------------------------------
#
# Each function reproduces its paper's official code: its clamps and eps, what is
# detached, and the order of a state update against its use. Two departures, the same
# everywhere: the cosines are computed in float32 whatever the input dtype, and the
# gradient stays finite where |cos θ| = 1, where the official code's √(1 − cos²θ) or
# arccos has an infinite derivative (the official value is kept there).

# How a target logit cos(θ_y + m) continues past θ_y + m = π, where cos rises again:
#   'official': what the method's official code does (each function says which);
#   'fallback': cos θ − m·sin m once cos θ ≤ cos(π − m), arcface-pytorch's `th`/`mm`
#     (CurricularFace's official code, pytorch-metric-learning's ArcFaceLoss and
#     SubCenterArcFaceLoss, MagFace with easy_margin=False);
#   'monotone': arcjax's continuation, `margins.target_logit` (strictly decreasing).
EXTENSIONS = ("official", "fallback", "monotone")
# ElasticFace's official config/config.py: the mean margin m of each kind (σ = 0.05 for both).
ELASTICFACE_MARGINS = {"arc": 0.5, "cos": 0.35}
# AdaFace's official head.py initialises its buffers to batch_mean = 20, batch_std = 100.
ADAFACE_INITIAL_NORM_STATS = (20.0, 100.0)
# AdaFace's eps: its cosines' clamp, its angle clip and the std's floor.
_ADAFACE_EPS = 1e-3
# √(1 − cos²θ) is floored here (the smallest normal float32): the value at |cos θ| = 1
# stays exact and its gradient 0 instead of infinite.
_SIN_FLOOR = float(jnp.finfo(jnp.float32).tiny)


def _clamp(x: jax.Array, low, high) -> jax.Array:
  """x clipped to [low, high] with torch.clamp's gradient: 1 on the closed interval, 0 outside.

  (`jnp.clip` passes half of it at the bounds themselves.)
  """
  return jnp.where(x < low, low, jnp.where(x > high, high, x))


def _feature_norm(x: jax.Array) -> jax.Array:
  """(B,) ‖x‖ of float32 rows x (B, d); finite gradient at 0, as l2_normalize's floor."""
  return jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=1), 1e-24))


def _cos_plus(cos: jax.Array, m) -> jax.Array:
  """cos(θ + m) = cos θ·cos m − sin θ·sin m for θ = arccos(cos) ∈ [0, π], cos ∈ [−1, 1].

  The official codes' formula (arccos then cos, as insightface and ElasticFace write it,
  is the same function); `m` a float or broadcastable array, in radians.
  """
  sin = jnp.sqrt(jnp.maximum(1.0 - cos * cos, _SIN_FLOOR))
  return cos * jnp.cos(m) - sin * jnp.sin(m)


def _arc_logit(cos_y: jax.Array, m, rule: str) -> jax.Array:
  """The target logit cos(θ_y + m), (B,), of target cosines cos_y ∈ [−1, 1], continued past
  θ_y + m = π by `rule`: 'none' (cos(θ_y + m) as it is), 'easy' (cos θ_y once cos θ_y ≤ 0:
  easy_margin), 'fallback' or 'monotone' (see `EXTENSIONS`). m: float or (B,), radians."""
  if rule == "monotone":
    return margins.target_logit(margins.angle(cos_y), 1.0, m, 0.0)
  cos_y_m = _cos_plus(cos_y, m)
  if rule == "none":
    return cos_y_m
  if rule == "easy":
    return jnp.where(cos_y > 0, cos_y_m, cos_y)
  # arcface-pytorch's th = cos(π − m) and mm = sin(π − m)·m, as the official codes write them.
  return jnp.where(cos_y > jnp.cos(jnp.pi - m), cos_y_m, cos_y - jnp.sin(jnp.pi - m) * m)


def _extension_rule(extension: str, official: str, allowed=EXTENSIONS) -> str:
  if extension not in allowed:
    raise ValueError(f"extension must be one of {allowed}, got {extension!r}")
  return official if extension == "official" else extension


def _check_family(embeddings, centres, labels, s: float, **angles: float) -> None:
  """Shapes (centres (C, d) or (C, K, d)), concrete labels in [0, C), s > 0, margins in [0, π)."""
  if (embeddings.ndim != 2 or centres.ndim not in (2, 3) or labels.ndim != 1
      or embeddings.shape[1] != centres.shape[-1] or labels.shape[0] != embeddings.shape[0]):
    raise ValueError(
        "expected embeddings (B, d), centres (C, d) (sub-center: (C, K, d)) and labels (B,), "
        f"got {embeddings.shape}, {centres.shape} and {labels.shape}")
  margins.check_labels(labels, centres.shape[0])
  if not s > 0:
    raise ValueError(f"scale s must be > 0, got s={s}")
  for name, value in angles.items():
    if not 0 <= value < math.pi:
      raise ValueError(f"{name} must be in [0, pi), got {name}={value}")


def _unit_cosines(embeddings: jax.Array, centres: jax.Array) -> jax.Array:
  """x̂·Ŵᵀ, (B, C) float32 (centres (C, d)), or (B, C·K) for sub-centres (C, K, d)."""
  w = l2_normalize(centres.reshape(-1, centres.shape[-1]))
  return l2_normalize(embeddings) @ w.T


def subcenter_arcface_loss(
    embeddings: jax.Array, centres: jax.Array, labels: jax.Array, *, s: float = 64.0,
    m: float = 0.5, extension: str = "official") -> tuple[jax.Array, dict[str, jax.Array]]:
  """Sub-center ArcFace (Deng et al., ECCV 2020): ArcFace on the closest of K sub-centres.

  The cosine to class c is max_k cos(x, W_ck); the target's gets ArcFace's margin,
  cos(θ_y + m), the others none; mean cross-entropy of s times that.

  Official code: deepinsight/insightface, recognition/subcenter_arcface/train_parall.py
  (`get_symbol_arcface`: centres (C·K, d) class-major, both sides L2-normalised, the
  (B, C·K) cosines reshaped (B, C, K) and maxed over K, then cos(arccos(cos θ_y) + m) with
  no clamp and no fallback past θ_y + m = π); defaults from its sample_config.py (s = 64,
  m = 0.5, loss_K = 3). pytorch-metric-learning's SubCenterArcFaceLoss
  (losses/subcenter_arcface_loss.py over arcface_loss.py) is the same loss, its margin in
  degrees (28.6° by default; margin=math.degrees(m) matches m) and with the th/mm fallback
  past θ_y = π − m, which `extension='fallback'` reproduces.

  Departures: the target cosine is clipped to [−1, 1] before the margin (MXNet's arccos
  gives NaN past 1 after rounding), and the gradient stays finite at |cos θ_y| = 1.
  The gradient reaches the arg-max sub-centre only (where sub-centres tie exactly, JAX
  shares it among them). The paper's optional second stage (dropping non-dominant
  sub-centres and the samples far from the dominant one, insightface's drop.py) is not
  part of this loss.

  Args:
    embeddings: (B, d) raw features x (normalised here), any float dtype.
    centres: (C, K, d) K sub-centres per class (K = 1 is ArcFace).
    labels: (B,) int in [0, C).
    s: the scale.
    m: the additive angular margin, radians.
    extension: past θ_y + m = π: 'official' (cos(θ_y + m) as it is, rising again),
      'fallback' (pytorch-metric-learning's) or 'monotone' (see `EXTENSIONS`).

  Returns:
    (loss, aux): the float32 batch mean; aux['theta_y'] (B,) radians, the angle to the
    closest sub-centre of the target class.
  """
  if centres.ndim != 3:
    raise ValueError(f"expected sub-centres (C, K, d), got {centres.shape}")
  _check_family(embeddings, centres, labels, s, m=m)
  rule = _extension_rule(extension, "none")
  num_classes, k, _ = centres.shape
  cos = jnp.max(_unit_cosines(embeddings, centres).reshape(-1, num_classes, k), axis=2)
  is_target = _target_mask(labels, num_classes)
  cos_y = _pick(cos, is_target)
  target = _arc_logit(_clamp(cos_y, -1.0, 1.0), m, rule)
  loss = _mean_cross_entropy(s * jnp.where(is_target, target[:, None], cos), is_target)
  return loss, {"theta_y": jax.lax.stop_gradient(margins.angle(cos_y))}


def curricularface_loss(
    embeddings: jax.Array, centres: jax.Array, labels: jax.Array, t: jax.Array, *,
    s: float = 64.0, m: float = 0.5, momentum: float = 0.01,
    extension: str = "official") -> tuple[jax.Array, dict[str, jax.Array]]:
  """CurricularFace (Huang et al., CVPR 2020): ArcFace whose hard negatives are re-weighted
  by a curriculum t that follows the mean target cosine.

      cos θ_y ← cos(θ_y + m)                 (the th/mm fallback past θ_y + m = π)
      t ← momentum·mean_i cos θ_{y_i} + (1 − momentum)·t          (no gradient)
      cos θ_j ← cos θ_j·(t + cos θ_j)        where cos θ_j > cos(θ_y + m), j ≠ y

  then the mean cross-entropy of s times the logits.

  Official code: HuangYG123/CurricularFace, head/metrics.py (`CurricularFace`): cosines
  clamped to [−1, 1]; t is updated from this batch's target cosines (before the margin)
  under no_grad BEFORE it re-weights them; the hard-negative test compares with
  cos(θ_y + m) itself, not with the fallback value; its momentum 0.01 and t₀ = 0 (the
  buffer's init); s = 64, m = 0.5 as its train.py builds the head.

  Departure: the gradient stays finite at |cos θ_y| = 1 (√(1 − cos²) floored).

  Args:
    embeddings: (B, d) raw features, any float dtype.
    centres: (C, d) class centres.
    labels: (B,) int in [0, C).
    t: () float, the state: 0 at the start.
    s, m: the scale and the angular margin (radians).
    momentum: the weight of this batch's mean target cosine in the new t.
    extension: 'official' = 'fallback', or 'monotone' (`margins.target_logit`; the hard
      negatives are then those above that monotone target logit).

  Returns:
    (loss, aux): aux['t'] the updated state (float32, t's shape), aux['theta_y'] (B,)
    radians. Over devices, t follows the mean target cosine of the global batch.
  """
  _check_family(embeddings, centres, labels, s, m=m)
  if not 0.0 <= momentum <= 1.0:
    raise ValueError(f"momentum must be in [0, 1], got {momentum}")
  rule = _extension_rule(extension, "fallback")
  cos = _clamp(_unit_cosines(embeddings, centres), -1.0, 1.0)
  is_target = _target_mask(labels, centres.shape[0])
  cos_y = _pick(cos, is_target)
  target = _arc_logit(cos_y, m, rule)
  hard_above = target if rule == "monotone" else _cos_plus(cos_y, m)
  t = jax.lax.stop_gradient(
      momentum * jnp.mean(cos_y) + (1.0 - momentum) * jnp.asarray(t, jnp.float32))
  logits = jnp.where(cos > hard_above[:, None], cos * (t + cos), cos)
  logits = jnp.where(is_target, target[:, None], logits)
  loss = _mean_cross_entropy(s * logits, is_target)
  return loss, {"t": t, "theta_y": jax.lax.stop_gradient(margins.angle(cos_y))}


def magface_loss(
    embeddings: jax.Array, centres: jax.Array, labels: jax.Array, *, s: float = 64.0,
    l_a: float = 10.0, u_a: float = 110.0, l_m: float = 0.45, u_m: float = 0.8,
    lambda_g: float = 35.0,
    extension: str = "official") -> tuple[jax.Array, dict[str, jax.Array]]:
  """MagFace (Meng et al., CVPR 2021): an angular margin that grows with the feature norm,
  plus a regulariser g that rewards a large norm.

      a = clamp(‖x‖, l_a, u_a)                         (NOT detached)
      m(a) = (u_m − l_m)/(u_a − l_a)·(a − l_a) + l_m
      loss = CE(s·[cos(θ_y + m(a)) on the target]) + λ_g·mean_i(a_i/u_a² + 1/a_i)

  Official code: IrvingMeng/MagFace, models/magface.py (`MagLinear`, `MagLoss`,
  `SoftmaxBuilder._margin`) with run/trainer.py's loss_id + lambda_g·loss_g: the norm
  carries the gradient into the margin and into g, the clamp passes none outside
  [l_a, u_a]; cosines clamped to [−1, 1]; MagLinear's default easy_margin=True, which
  its trainers keep: the target logit is cos θ_y itself wherever cos θ_y ≤ 0.
  Defaults from run/run.sh: l_a = 10, u_a = 110, l_m = 0.45, u_m = 0.8, λ_g = 35, s = 64.

  Departure: the gradient stays finite at |cos θ_y| = 1.

  Args:
    embeddings: (B, d) raw features (their norm is the magnitude a), any float dtype.
    centres: (C, d) class centres.
    labels: (B,) int in [0, C).
    s: the scale.
    l_a, u_a: the norm range, 0 < l_a < u_a.
    l_m, u_m: the margins at l_a and u_a, radians.
    lambda_g: the weight of g.
    extension: 'official' (easy_margin), 'fallback' (easy_margin=False, the th/mm of the
      official code's other branch) or 'monotone' (`margins.target_logit`).

  Returns:
    (loss, aux): aux['theta_y'] (B,) radians, aux['margin'] (B,) m(a) in radians,
    aux['g'] the unweighted regulariser mean_i g(a_i).
  """
  _check_family(embeddings, centres, labels, s, l_m=l_m, u_m=u_m)
  if not 0 < l_a < u_a or not lambda_g >= 0:
    raise ValueError(f"MagFace needs 0 < l_a < u_a and lambda_g >= 0, got l_a={l_a}, "
                     f"u_a={u_a}, lambda_g={lambda_g}")
  rule = _extension_rule(extension, "easy")
  norm, margin = _magface_margin(_feature_norm(embeddings.astype(jnp.float32)), l_a, u_a, l_m, u_m)
  cos = _clamp(_unit_cosines(embeddings, centres), -1.0, 1.0)
  is_target = _target_mask(labels, centres.shape[0])
  cos_y = _pick(cos, is_target)
  target = _arc_logit(cos_y, margin, rule)
  g = jnp.mean(norm / u_a**2 + 1.0 / norm)
  loss = _mean_cross_entropy(s * jnp.where(is_target, target[:, None], cos), is_target)
  aux = {"theta_y": margins.angle(cos_y), "margin": margin, "g": g}
  return loss + lambda_g * g, jax.lax.stop_gradient(aux)


def adaface_loss(
    embeddings: jax.Array, centres: jax.Array, labels: jax.Array,
    norm_stats: tuple[jax.Array, jax.Array], *, s: float = 64.0, m: float = 0.4,
    h: float = 0.333, t_alpha: float = 0.01,
    extension: str = "official") -> tuple[jax.Array, dict[str, Any]]:
  """AdaFace (Kim et al., CVPR 2022): a margin adapted to image quality, the feature norm
  relative to its running mean and std.

      n = clip(‖x‖, 0.001, 100)                                   (detached)
      μ ← α·mean(n) + (1 − α)·μ,   σ ← α·std(n) + (1 − α)·σ     (unbiased std; no grad)
      ẑ = clip(h·(n − μ)/(σ + 0.001), −1, 1)
      target = cos(clip(θ_y − m·ẑ, 0.001, π − 0.001)) − (m + m·ẑ)

  every cosine first clamped to [−1 + 0.001, 1 − 0.001]; mean cross-entropy of s times
  the logits.

  Official code: mk-minchul/AdaFace, head.py (`AdaFace.forward`, with net.py's backbone
  returning x/‖x‖ and ‖x‖; train_val.py's CrossEntropyLoss): the EMA is updated from
  this batch BEFORE it scales the margin; eps = 1e-3 throughout; buffers start at
  μ = 20, σ = 100 (`ADAFACE_INITIAL_NORM_STATS`). Defaults from
  scripts/run_ir101_ms1mv2.sh (m = 0.4, h = 0.333) and config.py (s = 64, t_alpha = 0.01).
  The official arccos and cos of the non-target columns are the identity there (their
  angles lie inside the clip) and are left out.

  Args:
    embeddings: (B, d) raw features, B ≥ 2 (the unbiased std of one norm is undefined),
      any float dtype.
    centres: (C, d) class centres.
    labels: (B,) int in [0, C).
    norm_stats: (μ, σ), two () floats, the state: `ADAFACE_INITIAL_NORM_STATS` at the start.
    s, m, h: the scale, the margin (radians and cosine units), the concentration h.
    t_alpha: the weight of this batch's statistics in the new (μ, σ).
    extension: 'official' (the angle clipped at π − 0.001: a flat logit past it) or
      'monotone' (`margins.target_logit`'s continuation past π).

  Returns:
    (loss, aux): aux['norm_stats'] the updated (μ, σ) (float32 scalars), aux['theta_y']
    (B,) radians. Over devices, (μ, σ) are the statistics of the global batch.
  """
  _check_family(embeddings, centres, labels, s, m=m)
  if embeddings.shape[0] < 2:
    raise ValueError(f"AdaFace needs a batch of at least 2 (the std of the norms), "
                     f"got {embeddings.shape[0]}")
  if not 0.0 <= t_alpha <= 1.0 or not h >= 0:
    raise ValueError(f"t_alpha must be in [0, 1] and h >= 0, got t_alpha={t_alpha}, h={h}")
  rule = _extension_rule(extension, "clip", ("official", "monotone"))
  norms = _adaface_norms(embeddings)
  mean, std = _adaface_norm_stats(norms, norm_stats, t_alpha)
  scaler = _adaface_scaler(norms, mean, std, h)
  raw_cos = _unit_cosines(embeddings, centres)
  cos = _clamp(raw_cos, -1.0 + _ADAFACE_EPS, 1.0 - _ADAFACE_EPS)
  is_target = _target_mask(labels, centres.shape[0])
  target = _adaface_logit(_pick(cos, is_target), scaler, m, rule)
  loss = _mean_cross_entropy(s * jnp.where(is_target, target[:, None], cos), is_target)
  theta_y = jax.lax.stop_gradient(margins.angle(_pick(raw_cos, is_target)))
  return loss, {"norm_stats": (mean, std), "theta_y": theta_y}


def _adaface_norms(embeddings: jax.Array) -> jax.Array:
  """(B,) AdaFace's detached feature norms, clipped to [0.001, 100]."""
  return jax.lax.stop_gradient(
      jnp.clip(_feature_norm(embeddings.astype(jnp.float32)), 0.001, 100.0))


def _adaface_norm_stats(norms: jax.Array, norm_stats, t_alpha) -> tuple[jax.Array, jax.Array]:
  """The new (μ, σ): the EMA of the mean and unbiased std of `norms` (every row of the batch)."""
  old_mean, old_std = (jnp.asarray(v, jnp.float32) for v in norm_stats)
  mean = t_alpha * jnp.mean(norms) + (1.0 - t_alpha) * old_mean
  std = t_alpha * jnp.std(norms, ddof=1) + (1.0 - t_alpha) * old_std
  return jax.lax.stop_gradient(mean), jax.lax.stop_gradient(std)


def _adaface_scaler(norms, mean, std, h) -> jax.Array:
  """ẑ = clip(h·(n − μ)/(σ + eps), −1, 1), (B,), detached."""
  return jax.lax.stop_gradient(jnp.clip(h * (norms - mean) / (std + _ADAFACE_EPS), -1.0, 1.0))


def _adaface_logit(cos_y: jax.Array, scaler: jax.Array, m, rule: str) -> jax.Array:
  """AdaFace's target logit (R,) of clamped target cosines and the rows' scalers ẑ:
  cos(clip(θ_y − m·ẑ, eps, π − eps)) − (m + m·ẑ) ('clip'), or the monotone continuation."""
  theta = jnp.arccos(cos_y) - m * scaler
  if rule == "clip":
    return jnp.cos(_clamp(theta, _ADAFACE_EPS, jnp.pi - _ADAFACE_EPS)) - (m + m * scaler)
  return margins.target_logit(_clamp(theta, _ADAFACE_EPS, jnp.inf), m3=m + m * scaler)


def _magface_margin(norm: jax.Array, l_a, u_a, l_m, u_m) -> tuple[jax.Array, jax.Array]:
  """(a, m(a)): MagFace's clamped norm (live gradient) and its margin, (B,) each."""
  a = _clamp(norm, l_a, u_a)
  return a, (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m


def elasticface_loss(
    embeddings: jax.Array, centres: jax.Array, labels: jax.Array, key: jax.Array, *,
    s: float = 64.0, m: float | None = None, sigma: float = 0.05, kind: str = "arc",
    extension: str = "official") -> tuple[jax.Array, dict[str, jax.Array]]:
  """ElasticFace (Boutros et al., CVPRW 2022): ArcFace or CosFace with a margin drawn per
  sample from N(m, σ²) at every step.

      m_i ~ N(m, σ²);   target = cos(θ_y + m_i) ('arc')  or  cos θ_y − m_i ('cos')

  Official code: fdbtrs/ElasticFace, utils/losses.py (`ElasticArcFace`, `ElasticCosFace`,
  plus=False): cosines clamped to [−1, 1], one margin per row from torch.normal (not
  clipped), cos(arccos(cos θ_y) + m_i) with no fallback past π. Defaults from
  config/config.py: 'arc' m = 0.5, 'cos' m = 0.35 (`ELASTICFACE_MARGINS`), σ = 0.05 and
  s = 64 for both; m left None takes its kind's value. The '+' variant (margins sorted
  against the target cosines) is not reproduced.

  Departure: the official arccos then cos of the non-target columns is the identity and
  is left out (its gradient is NaN at |cos| = 1); the target's gradient stays finite
  there.

  Args:
    embeddings: (B, d) raw features, any float dtype.
    centres: (C, d) class centres.
    labels: (B,) int in [0, C).
    key: PRNG key of the step's margins (the same key draws the same margins).
    s: the scale.
    m: the margin's mean (radians for 'arc', cosine units for 'cos'); None: the kind's
      official value, 0.5 for 'arc', 0.35 for 'cos'.
    sigma: the margin's standard deviation (the official 0.05 for both kinds).
    kind: 'arc' (ElasticArcFace) or 'cos' (ElasticCosFace).
    extension: 'arc': 'official' (cos(θ_y + m_i) as it is), 'fallback' or 'monotone'
      (see `EXTENSIONS`); 'cos' takes 'official' or 'monotone', the same there
      (cos θ − m_i is monotone already).

  Returns:
    (loss, aux): aux['margin'] (B,) the margins drawn, aux['theta_y'] (B,) radians.
  """
  if kind not in ELASTICFACE_MARGINS:
    raise ValueError(f"kind must be one of {tuple(ELASTICFACE_MARGINS)}, got {kind!r}")
  m = ELASTICFACE_MARGINS[kind] if m is None else m
  _check_family(embeddings, centres, labels, s, m=m)
  if not sigma >= 0:
    raise ValueError(f"sigma must be >= 0, got sigma={sigma}")
  rule = _extension_rule(extension, "none", EXTENSIONS if kind == "arc" else
                         ("official", "monotone"))
  margin = m + sigma * jax.random.normal(key, labels.shape, jnp.float32)
  cos = _clamp(_unit_cosines(embeddings, centres), -1.0, 1.0)
  is_target = _target_mask(labels, centres.shape[0])
  cos_y = _pick(cos, is_target)
  target = _arc_logit(cos_y, margin, rule) if kind == "arc" else cos_y - margin
  loss = _mean_cross_entropy(s * jnp.where(is_target, target[:, None], cos), is_target)
  return loss, {"margin": margin, "theta_y": jax.lax.stop_gradient(margins.angle(cos_y))}


# --- The loss a run trains: config.loss ------------------------------------------------

# config.loss.kind: 'margin', the combined margin cos(m1·θ + m2) − m3 of the paper's Table 2
# with its extra terms (`loss_config(preset)`); or a member of the family after ArcFace,
# trained by the head exactly as its pure reference above computes it.
MARGIN_KIND = "margin"
# Each family kind's fields, with the values of its paper's official training scripts (the
# references above name them). A kind's config holds these and `kind`, nothing else.
FAMILY: dict[str, dict[str, Any]] = {
    "subcenter_arcface": dict(s=64.0, m=0.5, subcenters=3, extension="official",
                              margin_warmup_steps=0),
    # No margin warm-up: its curriculum t (from 0) is its own easing-in of the hard negatives.
    "curricularface": dict(s=64.0, m=0.5, momentum=0.01, extension="official"),
    "magface": dict(s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0,
                    extension="official", margin_warmup_steps=0),
    "adaface": dict(s=64.0, m=0.4, h=0.333, t_alpha=0.01, extension="official",
                    margin_warmup_steps=0),
    "elasticface_arc": dict(s=64.0, m=ELASTICFACE_MARGINS["arc"], sigma=0.05,
                            extension="official", margin_warmup_steps=0),
    "elasticface_cos": dict(s=64.0, m=ELASTICFACE_MARGINS["cos"], sigma=0.05,
                            extension="official", margin_warmup_steps=0),
}
KINDS = (MARGIN_KIND, *FAMILY)
# The extensions past θ_y + m = π each kind honours ('official': its official code's own;
# CurricularFace's is the fallback). ElasticFace-cos's cos θ − m_i is monotone already.
_KIND_EXTENSIONS = {"subcenter_arcface": EXTENSIONS, "curricularface": EXTENSIONS,
                    "magface": EXTENSIONS, "adaface": ("official", "monotone"),
                    "elasticface_arc": EXTENSIONS, "elasticface_cos": ("official",)}
# The rule of `_arc_logit` (AdaFace: of `_adaface_logit`) that 'official' stands for.
_OFFICIAL_RULES = {"subcenter_arcface": "none", "curricularface": "fallback", "magface": "easy",
                   "adaface": "clip", "elasticface_arc": "none", "elasticface_cos": "none"}
# Where the official code clamps the cosine before its margin; AdaFace clamps every
# cosine, the non-targets too (`head.Negatives.clamp`).
_COS_BOUNDS = {"adaface": (-1.0 + _ADAFACE_EPS, 1.0 - _ADAFACE_EPS)}


def loss_config(name: str = "arcface", **overrides) -> ml_collections.ConfigDict:
  """A `config.loss`: a margin preset (`margins.PRESETS`) or a family kind (`FAMILY`).

  A preset gives kind 'margin': its s, m1, m2, m3, normalize and bias, the exact
  gradient and the margin softmax term alone. The config holds these values, not the
  preset's name: every field acts, and `margin_name` names the margin from them.
  E.g. `loss_config('arcface', intra_weight=1.0)` is the paper's ArcFace+Intra.
  `inter_form` picks the paper's Inter ('angle') or insightface's ('cosine').

  A family kind ('subcenter_arcface', 'curricularface', 'magface', 'adaface',
  'elasticface_arc', 'elasticface_cos') gives its paper's defaults and only the
  fields it reads: s, its margin's parameters, `extension` ('official' past
  θ_y + m = π as its official code does; 'fallback', 'monotone' where it honours
  them, see `EXTENSIONS`).

  `margin_warmup_steps` > 0 anneals the target logit in from the plain normalised
  cos θ over that many steps (`margins.make_margin`; every kind but CurricularFace).
  `overrides` change any field the config holds.
  """
  if name in FAMILY:
    config = ml_collections.ConfigDict(dict(kind=name, **FAMILY[name]))
  else:
    spec = margins.get_preset(name)
    config = ml_collections.ConfigDict(dict(
        kind=MARGIN_KIND, s=spec.s, m1=spec.m1, m2=spec.m2, m3=spec.m3,
        normalize=spec.normalize, bias=spec.bias, gradient="exact",
        softmax_weight=1.0, intra_weight=0.0, inter_weight=0.0, inter_form="angle",
        triplet_weight=0.0, triplet_margin=0.35, margin_warmup_steps=0))
  unknown = set(overrides) - set(config)
  if unknown:
    raise ValueError(f"unknown loss config fields {sorted(unknown)} for {name!r}; known: "
                     f"{sorted(config)}")
  config.update(overrides)
  return config


def _kind(config: Any) -> str:
  return config.get("kind", MARGIN_KIND)


def _weights(config: Any) -> dict[str, float]:
  """{term: weight}: the margin kind's four terms; a family kind's softmax (and MagFace's g)."""
  kind = _kind(config)
  if kind == "magface":
    return {"softmax": 1.0, "g": config.lambda_g}
  if kind in FAMILY:
    return {"softmax": 1.0}
  return {term: config[f"{term}_weight"] for term in TERMS}


def active_terms(config: Any) -> tuple[str, ...]:
  """The terms of `config.loss` with a non-zero weight, in the order of `TERMS` (MagFace:
  'softmax', then its norm regulariser 'g')."""
  return tuple(term for term, weight in _weights(config).items() if weight)


def num_subcenters(config: Any) -> int:
  """K, the sub-centres per class the head stores for `config.loss`; 0: one centre per class."""
  return config.subcenters if _kind(config) == "subcenter_arcface" else 0


def init_loss_state(config: Any) -> dict[str, jax.Array]:
  """The running state of `config.loss` before the first step, float32 scalars.

  CurricularFace: {'t': 0}; AdaFace: {'norm_mean': 20, 'norm_std': 100} (the official
  buffers' initial values, `ADAFACE_INITIAL_NORM_STATS`); every other loss keeps none: {}.
  A loss with state returns the new one in aux['loss_state'] (computed from the global
  batch, the same on every device) and `train.train_step` writes it into the TrainState.
  """
  kind = _kind(config)
  if kind == "curricularface":
    return {"t": jnp.zeros((), jnp.float32)}
  if kind == "adaface":
    mean, std = ADAFACE_INITIAL_NORM_STATS
    return {"norm_mean": jnp.asarray(mean, jnp.float32), "norm_std": jnp.asarray(std, jnp.float32)}
  return {}


def margin_name(config: Any) -> str:
  """The preset of `margins.PRESETS` whose s, m1, m2, m3, normalize and bias a `config.loss`
  has, else 'custom'."""
  values = (config.s, config.m1, config.m2, config.m3, config.normalize, config.bias)
  return next((name for name, spec in margins.PRESETS.items()
               if (spec.s, spec.m1, spec.m2, spec.m3, spec.normalize, spec.bias) == values),
              "custom")


def describe(config: Any) -> dict[str, Any]:
  """For results.json, all read from the values that act: {'kind'; for the margin kind
  'preset' (`margin_name`) and 's', 'm1', 'm2', 'm3'; for a family kind 'preset' the kind and
  its fields; 'terms': {name: weight} of the active terms}."""
  kind = _kind(config)
  if kind == MARGIN_KIND:
    values = {"preset": margin_name(config), "s": config.s, "m1": config.m1, "m2": config.m2,
              "m3": config.m3}
  else:
    values = {"preset": kind, **{name: config[name] for name in FAMILY[kind]}}
  return {"kind": kind, **values,
          "terms": {name: weight for name, weight in _weights(config).items() if weight}}


def trains_centres(config: Any) -> bool:
  """Whether a `config.loss` trains the class centres (Triplet alone does not)."""
  weights = _weights(config)
  return bool(weights["softmax"] or weights.get("intra") or weights.get("inter"))


def check_config(config: Any, *, batch_size: int | None = None) -> None:
  """Raises ConfigError naming the first `config.loss` value out of range, or a field its
  kind does not read. `batch_size`: the global batch, where a kind needs one (AdaFace: ≥ 2)."""
  kind = _kind(config)
  if kind not in KINDS:
    raise errors.ConfigError(f"config.loss.kind must be one of {KINDS}, got {kind!r}")
  if kind == MARGIN_KIND:
    _check_margin_config(config)
  else:
    _check_family_config(config, batch_size)


def _check_fields(config: Any, kind: str, fields) -> None:
  for name in config:
    if name in ("kind", *fields):
      continue
    if name == "margin_warmup_steps" and kind == "curricularface":
      raise errors.ConfigError(
          "config.loss.margin_warmup_steps: CurricularFace takes no margin warm-up (its "
          "curriculum t, from 0, eases the hard negatives in; a partial margin would leave "
          "them no defined target to be compared with): remove the field")
    raise errors.ConfigError(f"config.loss.{name} is not read by loss kind {kind!r} (its "
                             f"fields: {', '.join(fields)}): remove it")


def _check_margin_config(config: Any) -> None:
  _check_fields(config, MARGIN_KIND, [name for name in loss_config("arcface") if name != "kind"])
  try:
    margins.validate_margin(config.s, config.m1, config.m2, config.m3, config.gradient)
  except ValueError as error:
    raise errors.ConfigError(f"config.loss: {error}") from None
  if not math.isfinite(config.s):
    raise errors.ConfigError(f"config.loss.s must be finite, got {config.s}")
  weights = _weights(config)
  for name, weight in weights.items():
    if not (math.isfinite(weight) and weight >= 0):
      raise errors.ConfigError(f"config.loss.{name}_weight must be finite and >= 0, got {weight}")
  if not any(weights.values()):
    raise errors.ConfigError(f"config.loss: every loss weight is 0: {weights}")
  if config.bias and config.normalize:
    raise errors.ConfigError("config.loss.bias=True needs loss.normalize=False (the plain softmax)")
  if config.inter_form not in INTER_FORMS:
    raise errors.ConfigError(f"config.loss.inter_form must be one of {INTER_FORMS}, "
                             f"got {config.inter_form!r}")
  if config.triplet_margin < 0 or config.margin_warmup_steps < 0:
    raise errors.ConfigError("config.loss.triplet_margin and margin_warmup_steps must be >= 0, "
                             f"got {config.triplet_margin} and {config.margin_warmup_steps}")


def _check_family_config(config: Any, batch_size: int | None) -> None:
  kind = config.kind
  _check_fields(config, kind, tuple(FAMILY[kind]))

  def require(ok: bool, name: str, must: str) -> None:
    if not ok:
      raise errors.ConfigError(f"config.loss.{name} must be {must} for {kind}, "
                               f"got {config[name]!r}")

  require(math.isfinite(config.s) and config.s > 0, "s", "finite and > 0")
  if "m" in config:
    if kind in ("elasticface_cos",):
      require(math.isfinite(config.m) and config.m >= 0, "m", ">= 0 (a cosine margin)")
    else:
      require(0 <= config.m < math.pi, "m", "in [0, pi) (radians)")
  if "margin_warmup_steps" in config:
    require(isinstance(config.margin_warmup_steps, int) and config.margin_warmup_steps >= 0,
            "margin_warmup_steps", "an int >= 0")
  if kind == "elasticface_cos":
    require(config.extension == "official", "extension",
            "'official' (its target cos θ − m_i is monotone already)")
  else:
    require(config.extension in _KIND_EXTENSIONS[kind], "extension",
            f"one of {_KIND_EXTENSIONS[kind]}")
  if kind == "subcenter_arcface":
    require(isinstance(config.subcenters, int) and not isinstance(config.subcenters, bool)
            and config.subcenters >= 1, "subcenters", "an int >= 1")
  elif kind == "curricularface":
    require(0.0 <= config.momentum <= 1.0, "momentum", "in [0, 1]")
  elif kind == "magface":
    require(0 < config.l_a, "l_a", "> 0")
    require(config.l_a < config.u_a, "u_a", f"> l_a = {config.l_a}")
    require(0 <= config.l_m < math.pi, "l_m", "in [0, pi) (radians)")
    require(0 <= config.u_m < math.pi, "u_m", "in [0, pi) (radians)")
    require(math.isfinite(config.lambda_g) and config.lambda_g >= 0, "lambda_g", "finite and >= 0")
  elif kind == "adaface":
    require(math.isfinite(config.h) and config.h >= 0, "h", "finite and >= 0")
    require(0.0 <= config.t_alpha <= 1.0, "t_alpha", "in [0, 1]")
    if batch_size is not None and batch_size < 2:
      raise errors.ConfigError(f"AdaFace needs config.train.batch_size >= 2 (the std of the "
                               f"feature norms), got {batch_size}")
  else:
    require(math.isfinite(config.sigma) and config.sigma >= 0, "sigma", "finite and >= 0")


class CompositeLoss(NamedTuple):
  """A weighted sum of loss terms: loss_fn(embeddings (B, d), head, labels (B,), key=None,
  strength=1.0, loss_state=None) -> (loss, aux).

  terms(embeddings, head, labels, key, strength, loss_state) -> ({name: unweighted value},
  aux) with aux['theta_y'] (B,) and, for a loss that keeps a state, aux['loss_state'];
  weights: {name: weight} of the terms computed (floats, or traced scalars in a pack).
  """
  terms: Callable[..., tuple[dict[str, jax.Array], dict[str, Any]]]
  weights: dict[str, float | jax.Array]

  def __call__(self, embeddings, head, labels, key=None, strength=1.0, loss_state=None):
    terms, aux = self.terms(embeddings, head, labels, key, strength, loss_state)
    total = sum(self.weights[name] * value for name, value in terms.items())
    return total, {**aux, **{f"loss/{name}": v for name, v in terms.items()}}

  def gradient_norms(self, embeddings, head, labels, key=None, strength=1.0,
                     loss_state=None) -> dict[str, jax.Array]:
    """How hard each weighted term pulls: {'grad_norm/<term>': ‖∂(w·term)/∂x‖ over the batch's
    embeddings, 'grad_norm/<term>_centres': the same over the centres}."""
    norms = {}
    for name, weight in self.weights.items():
      term = lambda x, h, name=name, weight=weight: weight * self.terms(
          x, h, labels, key, strength, loss_state)[0][name]
      on_x, on_head = jax.grad(term, argnums=(0, 1))(embeddings, head)
      norms[f"grad_norm/{name}"] = jnp.linalg.norm(on_x)
      norms[f"grad_norm/{name}_centres"] = jnp.linalg.norm(on_head["centres"])
    return norms


def make_loss_fn(config: ml_collections.ConfigDict | Any, margin_term: head_lib.MarginTerm,
                 num_classes: int | None = None, hparams: dict[str, Any] | None = None, *,
                 terms: tuple[str, ...] | None = None,
                 collectives: sharding.Collectives = sharding.NO_COLLECTIVES) -> CompositeLoss:
  """The composite loss of a `config.loss`: any row of the paper's Table 2, or a member of the
  family after ArcFace (`FAMILY`).

      softmax_weight · margin softmax + intra_weight · Intra
        + inter_weight · Inter + triplet_weight · Triplet

  Args:
    config: `config.loss` (checked here, before anything is compiled).
    margin_term: the head's margin softmax term (`head.margin_term`).
    num_classes: C; centre rows past it are padding (a sharded head's).
    hparams: the values of s, m1, m2, m3 and the weights (the `TRACED_FIELDS` of that
      name that the config holds; other keys are ignored): Python numbers, or traced
      scalars in a pack (`train.make_pack_step`). None: the config's.
    terms: the terms computed (a pack's: those active in any of its runs), each times
      its weight; None: the config's active terms. A term of weight 0 adds exactly 0
      to the loss and its gradient (its value is finite), and θ_y is then the one the run computes alone. A family
      kind computes its own terms (the runs of a pack share their kind).
    collectives: the step's (`sharding.Parallelism.collectives`): a family member's
      statistics of the batch (CurricularFace's mean target cosine, AdaFace's norm
      statistics) and ElasticFace's margins are those of the global batch.

  Returns:
    loss_fn(embeddings (B, d), head {'centres': (K, d)[, 'bias': (C,)]},
    labels (B,), key=None, strength=1.0, loss_state=None) -> (loss, aux) with
    aux['theta_y'] (B,) radians and aux['loss/<term>'] (unweighted) for each
    computed term; aux['loss_state'], the new state, for a loss that keeps one.
  """
  check_config(config)
  hparams = ({name: config[name] for name in TRACED_FIELDS if name in config}
             if hparams is None else hparams)
  if _kind(config) in FAMILY:
    return _family_loss_fn(config, margin_term, hparams, collectives)
  terms = active_terms(config) if terms is None else tuple(terms)
  unknown = set(terms) - set(TERMS)
  if unknown:
    raise ValueError(f"unknown loss terms {sorted(unknown)}; known: {TERMS}")
  weights = {name: hparams[f"{name}_weight"] for name in TERMS if name in terms}

  def terms_of(embeddings, head, labels, key=None, strength=1.0, loss_state=None):
    del loss_state  # none of these terms keeps a state
    centres, values = head["centres"], {}
    if "softmax" in weights:
      margin = margins.make_margin(hparams["m1"], hparams["m2"], hparams["m3"],
                                   gradient=config.gradient, strength=strength)
      values["softmax"], aux = margin_term(embeddings, head, labels, key, margin, hparams["s"])
      theta_y = aux["theta_y"]
    else:
      x, w = l2_normalize(embeddings), l2_normalize(centres[labels])
      theta_y = jax.lax.stop_gradient(margins.angle(jnp.sum(x * w, axis=1)))
    if "intra" in weights:
      x, w = l2_normalize(embeddings), l2_normalize(centres[labels])
      values["intra"] = intra_loss(margins.angle(jnp.sum(x * w, axis=1)))
    if "inter" in weights:
      values["inter"] = inter_loss(centres, labels, config.inter_form, num_classes)
    if "triplet" in weights:
      values["triplet"] = triplet_loss(embeddings, labels, config.triplet_margin)
    return values, {"theta_y": theta_y}

  return CompositeLoss(terms_of, weights)


# --- The family in the trainer ---------------------------------------------------------


def _family_margin(value, plain, strength, anneal: bool):
  """The head's margin (cos_y (R,)[, rows]) -> (logit, slope) of a target logit
  `value(cos_y, rows)`, annealed from `plain(cos_y)` by α = `strength` when `anneal`.

  The logit keeps its gradient w.r.t. `rows` (MagFace's live norm); the slope is
  dlogit/dcos_y at fixed rows, by forward-mode on the R target cosines.
  """
  def logit(cos_y, rows):
    psi = value(cos_y, rows)
    if not anneal:
      return psi
    base = plain(cos_y)
    return base + strength * (psi - base)

  def margin(cos_y, rows=None):
    fixed = jax.lax.stop_gradient(rows)
    slope = jax.jvp(lambda c: logit(c, fixed), (cos_y,), (jnp.ones_like(cos_y),))[1]
    return logit(cos_y, rows), slope

  return margin


def _target_cosines(embeddings: jax.Array, centres: jax.Array, labels: jax.Array) -> jax.Array:
  """(B,) x̂·Ŵ_y, float32 (centres (C, d))."""
  return jnp.sum(l2_normalize(embeddings) * l2_normalize(centres[labels]), axis=1)


def _family_loss_fn(config: Any, margin_term: head_lib.MarginTerm, hparams: dict[str, Any],
                    collectives: sharding.Collectives) -> CompositeLoss:
  """The loss of a family kind over the head, as its reference above computes it.

  What each kind adds to the head's one core (`head.margin_softmax`):
    subcenter_arcface: (C, K, d) centres, the max over K in every chunk; ArcFace's margin;
    curricularface: t ← momentum·mean cos θ_y (global batch) + (1 − momentum)·t, then the
      hard negatives re-weighted in every chunk (`head.Negatives`);
    magface: the per-row margin m(‖x‖) of the live norm (its gradient flows through the
      target logit) and the regulariser term 'g' = mean g(‖x‖), weight λ_g;
    adaface: (μ, σ) of the detached norms of the global batch, then the per-row scaler ẑ,
      and every cosine clamped to ±(1 − 1e-3) (`head.Negatives`);
    elasticface_arc / _cos: one margin per row of the global batch from N(m, σ²), drawn
      from the second key of `jax.random.split(key)` (the first samples Partial FC).
  """
  kind, s = config.kind, hparams["s"]
  rule = _extension_rule(config.extension, _OFFICIAL_RULES[kind], _KIND_EXTENSIONS[kind])
  warmup = hparams.get("margin_warmup_steps", 0)
  anneal = isinstance(warmup, jax.core.Tracer) or warmup > 0
  low, high = _COS_BOUNDS.get(kind, (-1.0, 1.0))
  plain = lambda c: _clamp(c, low, high)
  weights = {name: weight for name, weight in _weights(config).items() if weight}

  def terms_of(embeddings, head, labels, key=None, strength=1.0, loss_state=None):
    x = embeddings.astype(jnp.float32)
    sample_key, margin_key = (None, None) if key is None else jax.random.split(key)
    rows, negatives, state, values = None, None, {}, {}
    if kind == "subcenter_arcface":
      value = lambda c, rows: _arc_logit(plain(c), config.m, rule)
    elif kind == "curricularface":
      # Updated BEFORE its use, from this step's target cosines of the global batch.
      cos_y = jax.lax.stop_gradient(plain(_target_cosines(x, head["centres"], labels)))
      t = (config.momentum * collectives.mean(jnp.mean(cos_y))
           + (1.0 - config.momentum) * loss_state["t"])
      value = lambda c, rows: _arc_logit(plain(c), config.m, rule)
      threshold = ((lambda c: value(c, None)) if rule == "monotone"
                   else lambda c: _cos_plus(plain(c), config.m))
      negatives, state = head_lib.Negatives(t=t, threshold=threshold), {"t": t}
    elif kind == "magface":
      norm, margin_of_norm = _magface_margin(_feature_norm(x), config.l_a, config.u_a,
                                             config.l_m, config.u_m)
      rows = {"margin": margin_of_norm}
      value = lambda c, rows: _arc_logit(plain(c), rows["margin"], rule)
      if "g" in weights:
        values["g"] = jnp.mean(norm / config.u_a**2 + 1.0 / norm)
    elif kind == "adaface":
      norms = _adaface_norms(x)
      mean, std = _adaface_norm_stats(collectives.gather_rows(norms),
                                      (loss_state["norm_mean"], loss_state["norm_std"]),
                                      config.t_alpha)
      rows = {"scaler": _adaface_scaler(norms, mean, std, config.h)}
      value = lambda c, rows: _adaface_logit(plain(c), rows["scaler"], config.m, rule)
      negatives, state = head_lib.Negatives(clamp=(low, high)), {"norm_mean": mean,
                                                                  "norm_std": std}
    else:  # ElasticFace: every device draws the global batch's margins, then takes its own
      if key is None:
        raise ValueError("ElasticFace draws its margins from the step's key: pass one")
      global_rows = collectives.gather_rows(labels).shape[0]
      drawn = config.m + config.sigma * jax.random.normal(margin_key, (global_rows,), jnp.float32)
      rows = {"margin": collectives.own_rows(drawn)}
      if kind == "elasticface_arc":
        value = lambda c, rows: _arc_logit(plain(c), rows["margin"], rule)
      else:
        value = lambda c, rows: plain(c) - rows["margin"]
    margin = _family_margin(value, plain, strength, anneal)
    values["softmax"], aux = margin_term(embeddings, head, labels, sample_key, margin, s,
                                         rows=rows, negatives=negatives)
    return values, {"theta_y": aux["theta_y"], "loss_state": state}

  return CompositeLoss(terms_of, weights)

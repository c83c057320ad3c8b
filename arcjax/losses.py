"""The losses of the paper's Table 2, as pure functions of arrays.

Margin softmax cross-entropy from (embeddings, centres, labels), the angular
Intra / Inter / Triplet terms, and `make_loss_fn`, the weighted sum a loss
config names. Everything is computed in float32 whatever the input dtype.
Angles are in radians.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from arcjax import margins

LossFn = Callable[[jax.Array, dict, jax.Array], tuple[jax.Array, dict]]


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


def make_loss_fn(config: ml_collections.ConfigDict | Any) -> LossFn:
  """The composite loss of a `config.loss`: any row of the paper's Table 2.

      softmax_weight · margin softmax + intra_weight · Intra
        + inter_weight · Inter + triplet_weight · Triplet

  Fields read: s, m1, m2, m3, normalize, bias, gradient, softmax_weight,
  intra_weight, inter_weight, triplet_weight, triplet_margin. All values are
  validated here, before anything is compiled.

  Returns:
    loss_fn(embeddings (B, d), head {'centres': (C, d)[, 'bias': (C,)]},
    labels (B,)) -> (loss, aux) with aux['theta_y'] (B,) radians and one
    aux['loss/<term>'] per active term (unweighted).
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

  def loss_fn(embeddings, head, labels):
    centres = head["centres"]
    softmax, aux = margin_softmax_loss(
        embeddings, centres, labels, s=config.s, m1=config.m1, m2=config.m2,
        m3=config.m3, gradient=config.gradient, normalize=config.normalize,
        bias=head.get("bias"))
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

"""The losses of the paper's Table 2, as pure functions of arrays.

`margin_softmax_loss`, the reference margin softmax cross-entropy (the (B, C)
logits at once; the head's production core is `head.margin_softmax`), the
angular Intra / Inter / Triplet terms, and `make_loss_fn`, the weighted sum a
loss config names over the head's margin term. Everything is computed in
float32 whatever the input dtype. Angles are in radians.

A loss may keep a running state between steps (`init_loss_state`; the
TrainState holds it): the loss function takes it and returns the new one in
aux['loss_state']. None of Table 2's losses keeps one.
"""

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from arcjax import errors
from arcjax import head as head_lib
from arcjax import margins

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
  # One-hot selects, not `logits[rows, labels]`: their backward fuses into the (B, C) pass
  # where a gather's would scatter into a (B, C) buffer.
  is_target = jnp.arange(centres.shape[0])[None, :] == labels[:, None]
  theta_y = jax.lax.stop_gradient(margins.angle(jnp.sum(jnp.where(is_target, cos_theta, 0.0), 1)))
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
  target = jnp.sum(jnp.where(is_target, logits, 0.0), axis=1)
  loss = jnp.mean(jax.nn.logsumexp(logits, axis=1) - target)
  return loss, {"theta_y": theta_y}


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


def loss_config(preset: str = "arcface", **overrides) -> ml_collections.ConfigDict:
  """A `config.loss` for a margin preset (see `margins.PRESETS`).

  Its s, m1, m2, m3, normalize and bias, the exact gradient and the margin
  softmax term alone; `overrides` change any field, e.g.
  `loss_config('arcface', intra_weight=1.0)` is the paper's ArcFace+Intra.
  `inter_form` picks the paper's Inter ('angle') or insightface's ('cosine');
  `margin_warmup_steps` > 0 anneals the margin in from the plain normalised
  softmax over that many steps (`margins.make_margin`).
  """
  spec = margins.get_preset(preset)
  config = ml_collections.ConfigDict(dict(
      preset=preset, s=spec.s, m1=spec.m1, m2=spec.m2, m3=spec.m3,
      normalize=spec.normalize, bias=spec.bias, gradient="exact",
      softmax_weight=1.0, intra_weight=0.0, inter_weight=0.0, inter_form="angle",
      triplet_weight=0.0, triplet_margin=0.35, margin_warmup_steps=0))
  unknown = set(overrides) - set(config)
  if unknown:
    raise ValueError(f"unknown loss config fields {sorted(unknown)}; known: {sorted(config)}")
  config.update(overrides)
  return config


def _weights(config: Any) -> dict[str, float]:
  return {term: config[f"{term}_weight"] for term in TERMS}


def active_terms(config: Any) -> tuple[str, ...]:
  """The terms of `config.loss` with a non-zero weight, in the order of `TERMS`."""
  return tuple(term for term, weight in _weights(config).items() if weight)


def init_loss_state(config: Any) -> dict[str, jax.Array]:
  """The running state of `config.loss` before the first step: {} (Table 2's losses keep none).

  A loss with state (a running statistic) returns the new one in
  aux['loss_state'] and `train.train_step` writes it back into the TrainState.
  """
  del config
  return {}


def describe(config: Any) -> dict[str, Any]:
  """{'preset': the margin, 'terms': {name: weight} of the active terms}, for results.json."""
  return {"preset": config.preset,
          "terms": {name: weight for name, weight in _weights(config).items() if weight}}


def trains_centres(config: Any) -> bool:
  """Whether a `config.loss` trains the class centres (Triplet alone does not)."""
  weights = _weights(config)
  return bool(weights["softmax"] or weights["intra"] or weights["inter"])


def check_config(config: Any) -> None:
  """Raises ConfigError naming the first `config.loss` value out of range."""
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
                 terms: tuple[str, ...] | None = None) -> CompositeLoss:
  """The composite loss of a `config.loss`: any row of the paper's Table 2.

      softmax_weight · margin softmax + intra_weight · Intra
        + inter_weight · Inter + triplet_weight · Triplet

  Args:
    config: `config.loss` (checked here, before anything is compiled).
    margin_term: the head's margin softmax term (`head.margin_term`).
    num_classes: C; centre rows past it are padding (a sharded head's).
    hparams: the values of s, m1, m2, m3 and the weights (the `TRACED_FIELDS` of that
      name; other keys are ignored): Python numbers, or traced scalars in a pack
      (`train.make_pack_step`). None: the config's.
    terms: the terms computed (a pack's: those active in any of its runs), each times
      its weight; None: the config's active terms. A term of weight 0 adds exactly 0 to
      the loss and its gradient (its value is finite).

  Returns:
    loss_fn(embeddings (B, d), head {'centres': (K, d)[, 'bias': (C,)]},
    labels (B,), key=None, strength=1.0, loss_state=None) -> (loss, aux) with
    aux['theta_y'] (B,) radians and aux['loss/<term>'] (unweighted) for each
    computed term. Table 2's losses keep no state: no aux['loss_state'].
  """
  check_config(config)
  hparams = {name: config[name] for name in TRACED_FIELDS} if hparams is None else hparams
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

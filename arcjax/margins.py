"""The combined angular margin `cos(m1·θ + m2) − m3` and the paper's presets.

Pure functions on cos θ. Angles are in radians. The margin touches the target
column only: arccos and cos run on the `B` target values (gather, modify,
scatter), never on the whole `B×C` matrix.

The margins m1, m2, m3, the scale and the warm-up length may be Python numbers
(a solo run: static, checked here) or traced scalars (a pack of runs vmapped
over a run axis, `train.make_pack_step`: checked on the host, per run, by
`losses.check_config`). Both compute the same values.
"""

import dataclasses
import math
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

Gradient = Literal["exact", "straight_through"]
GRADIENTS = ("exact", "straight_through")
# cos_y (R,) -> (target logit ψ (R,), dψ/dcos_y (R,)): a margin as the head takes it.
MarginFn = Callable[[jax.Array], tuple[jax.Array, jax.Array]]

# cos θ is clipped to [-1 + COS_EPS, 1 - COS_EPS] before arccos: d arccos(c)/dc is
# infinite at |c| = 1, and so is d cos(m1·arccos(c) + m2)/dc when m2 > 0.
COS_EPS = 1e-6


def angle(cos: jax.Array) -> jax.Array:
  """θ = arccos(cos) in radians, with cos clipped so that the gradient stays finite."""
  return jnp.arccos(jnp.clip(cos, -1.0 + COS_EPS, 1.0 - COS_EPS))


@dataclasses.dataclass(frozen=True)
class MarginSpec:
  """A row of the paper's Table 2: scale `s` and margins of cos(m1·θ + m2) − m3.

  `normalize=False` with `bias=True` is the plain softmax (a linear layer with
  bias on unnormalised features); every other preset normalises features and
  centres and uses no bias.
  """
  s: float = 64.0
  m1: float = 1.0
  m2: float = 0.0
  m3: float = 0.0
  normalize: bool = True
  bias: bool = False


PRESETS: dict[str, MarginSpec] = {
    "softmax": MarginSpec(s=1.0, normalize=False, bias=True),
    "norm_softmax": MarginSpec(),
    "sphereface": MarginSpec(m1=1.35),
    "cosface": MarginSpec(m3=0.35),
    "arcface": MarginSpec(m2=0.5),
    "arcface_0.4": MarginSpec(m2=0.4),
    "arcface_0.45": MarginSpec(m2=0.45),
    "arcface_0.55": MarginSpec(m2=0.55),
    "cm1": MarginSpec(m1=1.0, m2=0.3, m3=0.2),
    "cm2": MarginSpec(m1=0.9, m2=0.4, m3=0.15),
}


def get_preset(name: str) -> MarginSpec:
  """The named row of the paper's Table 2 (see `PRESETS`)."""
  if name not in PRESETS:
    raise ValueError(f"unknown margin preset {name!r}; known: {', '.join(PRESETS)}")
  return PRESETS[name]


def _is_traced(value) -> bool:
  return isinstance(value, jax.core.Tracer)


def _is_identity(m1, m2, m3) -> bool:
  """Whether the margins are the identity (1, 0, 0), known before tracing."""
  return not any(map(_is_traced, (m1, m2, m3))) and (m1, m2, m3) == (1.0, 0.0, 0.0)


def validate_margin(s: float | jax.Array, m1: float | jax.Array, m2: float | jax.Array,
                    m3: float | jax.Array, gradient: str = "exact") -> None:
  """Raises ValueError naming the first out-of-range value; traced values are not checked."""
  if not _is_traced(s) and not s > 0:
    raise ValueError(f"scale s must be > 0, got s={s}")
  if not _is_traced(m1) and not m1 > 0:
    raise ValueError(f"multiplicative margin m1 must be > 0, got m1={m1}")
  if not _is_traced(m2) and not 0 <= m2 < math.pi:
    raise ValueError(f"additive angular margin m2 must be in [0, pi), got m2={m2}")
  if not _is_traced(m3) and not m3 >= 0:
    raise ValueError(f"additive cosine margin m3 must be >= 0, got m3={m3}")
  if gradient not in GRADIENTS:
    raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")


def target_logit(theta: jax.Array, m1: float = 1.0, m2: float = 0.0,
                 m3: float = 0.0) -> jax.Array:
  """The margin target logit ψ(θ) before scaling, θ in radians, any shape.

  With φ = m1·θ + m2 and k = ⌊φ / π⌋:

      ψ(θ) = (−1)^k · cos φ − 2k − m3

  For φ ≤ π (k = 0) this is cos(m1·θ + m2) − m3 exactly. Past φ = π, where
  cos φ would rise again, it continues with SphereFace's monotone extension
  (Liu et al. 2017, ψ(θ) = (−1)^k cos(mθ) − 2k, here with a real m1 and an
  offset m2): continuous, and strictly decreasing in θ over the whole of
  [0, π] for every m1 > 0, m2 ∈ [0, π), m3 ≥ 0. pytorch-metric-learning and
  arcface-pytorch instead switch to cos θ − m·sin m past θ = π − m, which is
  monotone but jumps at the switch.
  """
  phi = m1 * theta + m2
  k = jnp.floor(phi / jnp.pi)
  sign = 1.0 - 2.0 * jnp.mod(k, 2.0)
  return sign * jnp.cos(phi) - 2.0 * k - m3


def check_labels(labels, num_classes: int) -> None:
  """Raises ValueError if a concrete label lies outside [0, num_classes).

  Under `jit` labels are tracers and cannot be checked here; the input
  pipeline checks every batch on the host instead.
  """
  if isinstance(labels, jax.core.Tracer):
    return
  labels = np.asarray(labels)
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if bad.size:
    i = int(bad[0])
    raise ValueError(
        f"label {int(labels[i])} at index {i} is outside [0, {num_classes}) "
        f"({bad.size} labels out of range)")


def logit_and_slope(cos_y: jax.Array, m1: float | jax.Array = 1.0, m2: float | jax.Array = 0.0,
                    m3: float | jax.Array = 0.0, *,
                    gradient: Gradient = "exact") -> tuple[jax.Array, jax.Array]:
  """The target logit ψ(arccos(cos_y)) and its slope dψ/dcos_y, elementwise, float32.

  'straight_through' keeps the value and reports slope 1 (the plain cos θ's
  backward), as insightface's arcface_torch does. The identity margin (1, 0, 0)
  gives exactly (cos_y, 1), also when the margins are traced.
  """
  cos_y = cos_y.astype(jnp.float32)
  if _is_identity(m1, m2, m3):
    return cos_y, jnp.ones_like(cos_y)
  margin_fn = lambda c: target_logit(angle(c), m1, m2, m3)
  if gradient == "straight_through":
    logit, slope = margin_fn(cos_y), jnp.ones_like(cos_y)
  else:
    logit, slope = jax.jvp(margin_fn, (cos_y,), (jnp.ones_like(cos_y),))
  if not any(map(_is_traced, (m1, m2, m3))):
    return logit, slope
  # A traced lane of the identity: cos(arccos(clip(c))) is c only to a rounding.
  identity = (m1 == 1.0) & (m2 == 0.0) & (m3 == 0.0)
  return jnp.where(identity, cos_y, logit), jnp.where(identity, 1.0, slope)


def warmup_strength(step: jax.Array, warmup_steps: int | jax.Array) -> jax.Array:
  """Margin strength α = min(1, step / warmup_steps) of the update numbered `step` (from 1).

  α = 1 (the full margin) from step `warmup_steps` on, and at every step when
  `warmup_steps` is 0. `warmup_steps` may be traced (a whole number as a float).
  """
  step = jnp.asarray(step, jnp.float32)
  if not _is_traced(warmup_steps):
    if not warmup_steps:
      return jnp.ones((), jnp.float32)
    return jnp.minimum(1.0, step / warmup_steps)
  return jnp.where(warmup_steps > 0, jnp.minimum(1.0, step / jnp.maximum(warmup_steps, 1)), 1.0)


def make_margin(m1: float | jax.Array = 1.0, m2: float | jax.Array = 0.0,
                m3: float | jax.Array = 0.0, *, gradient: Gradient = "exact",
                strength: jax.Array | float = 1.0) -> MarginFn:
  """The margin cos(m1·θ + m2) − m3 as a `MarginFn`, annealed by `strength` α ∈ [0, 1].

      ψ_α(θ) = (1 − α)·cos θ + α·ψ(θ)

  α = 1 is the margin itself, α = 0 the plain normalised softmax: SphereFace's
  annealing (λ cos θ + ψ(θ)) / (1 + λ) with λ = (1 − α) / α, so that a large
  margin can be reached gradually (`warmup_strength`). α and the margins may be
  traced values.
  """
  validate_margin(1.0, m1, m2, m3, gradient)

  def margin(cos_y: jax.Array) -> tuple[jax.Array, jax.Array]:
    logit, slope = logit_and_slope(cos_y, m1, m2, m3, gradient=gradient)
    if isinstance(strength, (int, float)) and strength == 1.0:
      return logit, slope
    cos_y = cos_y.astype(jnp.float32)
    return cos_y + strength * (logit - cos_y), 1.0 + strength * (slope - 1.0)

  return margin


def combined_margin(cos_theta: jax.Array, labels: jax.Array, m1: float = 1.0,
                    m2: float = 0.0, m3: float = 0.0, *,
                    gradient: Gradient = "exact") -> jax.Array:
  """Applies cos(m1·θ + m2) − m3 to each row's target column.

  Args:
    cos_theta: (B, C) cosines between normalised features and centres, any
      float dtype; computed in float32.
    labels: (B,) int in [0, C). Checked eagerly when concrete (see
      `check_labels`).
    m1, m2, m3: the margins; m2 in radians.
    gradient: 'exact' differentiates through arccos and cos (the paper's);
      'straight_through' changes the forward value only, with the backward of
      the plain cos θ, as insightface's arcface_torch does.

  Returns:
    (B, C) float32: the target column of row i is `target_logit(θ_i)` with
    θ_i = arccos(cos_theta[i, labels[i]]); all other columns are unchanged.
  """
  validate_margin(1.0, m1, m2, m3, gradient)
  if cos_theta.ndim != 2 or labels.shape != cos_theta.shape[:1]:
    raise ValueError(f"expected cos_theta (B, C) and labels (B,), got "
                     f"{cos_theta.shape} and {labels.shape}")
  check_labels(labels, cos_theta.shape[1])
  cos_theta = cos_theta.astype(jnp.float32)
  if _is_identity(m1, m2, m3):
    return cos_theta
  return apply_margin(cos_theta, labels, make_margin(m1, m2, m3, gradient=gradient))


def apply_margin(cos_theta: jax.Array, labels: jax.Array, margin: MarginFn) -> jax.Array:
  """(B, C) cosines with each row's target column replaced by `margin`'s logit, float32.

  The margin runs on the B target cosines only (a gather); the backward is one
  elementwise pass over (B, C), d cos = where(target, g · slope, g).
  """
  cos_theta = cos_theta.astype(jnp.float32)
  cos_y = jax.lax.stop_gradient(cos_theta[jnp.arange(labels.shape[0]), labels])
  logit_y, slope = jax.lax.stop_gradient(margin(cos_y))
  return _replace_target(cos_theta, labels, logit_y, slope)


def _is_target(labels: jax.Array, num_classes: int) -> jax.Array:
  return jnp.arange(num_classes)[None, :] == labels[:, None]


# A custom VJP keeps the backward one fused elementwise pass over (B, C),
#   d cos_theta = where(target, g · slope, g),
# where autodiff of gather + select would add two more passes and a scatter.
@jax.custom_vjp
def _replace_target(cos_theta, labels, logit_y, slope):
  del slope
  return jnp.where(_is_target(labels, cos_theta.shape[1]), logit_y[:, None], cos_theta)


def _replace_target_fwd(cos_theta, labels, logit_y, slope):
  return _replace_target(cos_theta, labels, logit_y, slope), (labels, slope)


def _replace_target_bwd(residuals, g):
  labels, slope = residuals
  return (jnp.where(_is_target(labels, g.shape[1]), g * slope[:, None], g), None,
          jnp.zeros_like(slope), jnp.zeros_like(slope))


_replace_target.defvjp(_replace_target_fwd, _replace_target_bwd)

"""Tests of arcjax.margins against float64 NumPy and the margin's properties."""

import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from arcjax import margins

MARGIN_PRESETS = [name for name, p in margins.PRESETS.items() if p.normalize]


def _margins_of(name):
  p = margins.get_preset(name)
  return p.m1, p.m2, p.m3


def _reference_target(cos_y, m1, m2, m3):
  """The paper's cos(m1·θ + m2) − m3 in float64, valid where m1·θ + m2 ≤ π."""
  theta = np.arccos(np.asarray(cos_y, np.float64))
  return np.cos(m1 * theta + m2) - m3


def test_presets_have_the_papers_values():
  expected = {
      "sphereface": (1.35, 0.0, 0.0), "cosface": (1.0, 0.0, 0.35),
      "arcface": (1.0, 0.5, 0.0), "arcface_0.4": (1.0, 0.4, 0.0),
      "arcface_0.45": (1.0, 0.45, 0.0), "arcface_0.55": (1.0, 0.55, 0.0),
      "cm1": (1.0, 0.3, 0.2), "cm2": (0.9, 0.4, 0.15),
      "norm_softmax": (1.0, 0.0, 0.0),
  }
  for name, values in expected.items():
    assert _margins_of(name) == values, name
    assert margins.get_preset(name).s == 64.0
  softmax = margins.get_preset("softmax")
  assert (softmax.normalize, softmax.bias) == (False, True)


@pytest.mark.parametrize("name", MARGIN_PRESETS)
def test_combined_margin_matches_float64_on_target_column_only(name):
  m1, m2, m3 = _margins_of(name)
  rng = np.random.default_rng(0)
  batch, num_classes = 16, 11
  # Angles where m1·θ + m2 ≤ π, the paper's formula without extension.
  theta_max = (math.pi - m2) / m1
  cos = rng.uniform(-1, 1, (batch, num_classes)).astype(np.float32)
  labels = rng.integers(0, num_classes, batch)
  cos[np.arange(batch), labels] = np.cos(rng.uniform(0, theta_max, batch))
  out = np.asarray(margins.combined_margin(jnp.asarray(cos), jnp.asarray(labels),
                                           m1, m2, m3))
  expected = cos.astype(np.float64).copy()
  expected[np.arange(batch), labels] = _reference_target(
      cos[np.arange(batch), labels], m1, m2, m3)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=2e-6)
  off_target = np.ones_like(cos, bool)
  off_target[np.arange(batch), labels] = False
  np.testing.assert_array_equal(out[off_target], cos[off_target])


def test_arcface_matches_the_angle_sum_identity():
  # cos(θ + m) = cos θ cos m − sin θ sin m: an independent form of ArcFace.
  m = 0.5
  cos_y = np.linspace(-math.cos(m) + 1e-3, 1 - 1e-3, 101)
  out = margins.combined_margin(jnp.asarray(cos_y[:, None], jnp.float32),
                                jnp.zeros(101, jnp.int32), m2=m)
  expected = cos_y * math.cos(m) - np.sqrt(1 - cos_y**2) * math.sin(m)
  np.testing.assert_allclose(np.asarray(out)[:, 0], expected, atol=2e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_input_is_computed_in_float32(dtype):
  cos = jnp.asarray([[0.3, -0.2], [0.9, 0.1]], dtype)
  labels = jnp.asarray([0, 0])
  out = margins.combined_margin(cos, labels, m2=0.5)
  assert out.dtype == jnp.float32
  expected = _reference_target(np.asarray(cos[:, 0], np.float64), 1.0, 0.5, 0.0)
  np.testing.assert_allclose(np.asarray(out[:, 0]), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", MARGIN_PRESETS)
def test_target_logit_is_continuous_and_non_increasing_on_0_pi(name):
  m1, m2, m3 = _margins_of(name)
  theta = np.linspace(0.0, math.pi, 200_001)
  psi = np.asarray(margins.target_logit(jnp.asarray(theta, jnp.float32), m1, m2, m3),
                   np.float64)
  steps = np.diff(psi)
  assert steps.max() <= 1e-6, f"{name}: ψ increases by {steps.max()}"
  # Continuity: |ψ'| ≤ m1 everywhere, so no step may exceed m1·Δθ (+ rounding).
  assert np.abs(steps).max() <= m1 * (theta[1] - theta[0]) + 1e-5
  # The paper's formula holds where it is monotone.
  inside = m1 * theta + m2 <= math.pi
  np.testing.assert_allclose(psi[inside], np.cos(m1 * theta[inside] + m2) - m3,
                             atol=2e-6)


@pytest.mark.parametrize("name", MARGIN_PRESETS)
def test_margin_logit_is_non_increasing_in_theta_through_combined_margin(name):
  m1, m2, m3 = _margins_of(name)
  theta = np.linspace(0.0, math.pi, 4001)
  cos_y = jnp.asarray(np.cos(theta)[:, None], jnp.float32)
  out = np.asarray(margins.combined_margin(cos_y, jnp.zeros(theta.size, jnp.int32),
                                           m1, m2, m3))[:, 0]
  assert np.diff(out).max() <= 1e-6


@pytest.mark.parametrize("gradient", margins.GRADIENTS)
@pytest.mark.parametrize("name", MARGIN_PRESETS)
def test_gradients_are_finite_from_cos_1_to_cos_minus_1(name, gradient):
  m1, m2, m3 = _margins_of(name)
  cos_y = jnp.concatenate([jnp.asarray([1.0, -1.0, 1 - 1e-7, -1 + 1e-7]),
                           jnp.linspace(-1.0, 1.0, 997)])

  def target_sum(c):
    cos = jnp.stack([c, jnp.zeros_like(c)], axis=1)
    return jnp.sum(margins.combined_margin(cos, jnp.zeros(c.shape, jnp.int32),
                                           m1, m2, m3, gradient=gradient)[:, 0])

  grads = jax.grad(target_sum)(cos_y)
  assert bool(jnp.all(jnp.isfinite(grads)))


def test_exact_gradient_matches_float64_derivative():
  m1, m2, m3 = 0.9, 0.4, 0.15
  cos_y = np.linspace(-0.5, 0.95, 30)
  grad = jax.vmap(jax.grad(lambda c: margins.combined_margin(
      c.reshape(1, 1), jnp.zeros(1, jnp.int32), m1, m2, m3)[0, 0]))(
          jnp.asarray(cos_y, jnp.float32))
  # d/dc cos(m1·arccos c + m2) = m1·sin(m1·θ + m2) / sin θ.
  theta = np.arccos(cos_y)
  expected = m1 * np.sin(m1 * theta + m2) / np.sin(theta)
  np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-4)


def test_straight_through_keeps_the_forward_and_the_plain_backward():
  rng = np.random.default_rng(1)
  cos = jnp.asarray(rng.uniform(-1, 1, (8, 5)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 5, 8))
  exact = margins.combined_margin(cos, labels, 1.0, 0.5, 0.1)
  straight = margins.combined_margin(cos, labels, 1.0, 0.5, 0.1,
                                     gradient="straight_through")
  np.testing.assert_allclose(np.asarray(straight), np.asarray(exact), atol=1e-6)
  weights = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
  grad = jax.grad(lambda c: jnp.sum(weights * margins.combined_margin(
      c, labels, 1.0, 0.5, 0.1, gradient="straight_through")))(cos)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(weights), atol=1e-6)
  exact_grad = jax.grad(lambda c: jnp.sum(weights * margins.combined_margin(
      c, labels, 1.0, 0.5, 0.1)))(cos)
  assert not np.allclose(np.asarray(exact_grad), np.asarray(weights))


def _all_eqns(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in its equations."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)
      if isinstance(inner, jax.extend.core.Jaxpr):
        yield from _all_eqns(inner)


@pytest.mark.parametrize("gradient", margins.GRADIENTS)
def test_arccos_and_cos_run_on_the_target_column_only(gradient):
  batch, num_classes = 4, 1000

  def margin_and_grad(c, y):
    return jax.vjp(lambda c: margins.combined_margin(c, y, 1.2, 0.3, 0.1,
                                                     gradient=gradient), c)[1](c)

  jaxpr = jax.make_jaxpr(margin_and_grad)(
      jnp.zeros((batch, num_classes)), jnp.zeros(batch, jnp.int32))
  transcendental = [e for e in _all_eqns(jaxpr.jaxpr)
                    if e.primitive.name in ("acos", "cos", "sin", "atan2")]
  assert transcendental, "expected arccos/cos in the margin"
  for eqn in transcendental:
    for var in eqn.invars:
      assert var.aval.size <= batch, f"{eqn.primitive.name} on {var.aval.shape}"


@pytest.mark.parametrize("kwargs, message", [
    (dict(m1=0.0), "m1=0.0"),
    (dict(m1=-1.0), "m1=-1.0"),
    (dict(m2=-0.1), "m2=-0.1"),
    (dict(m2=math.pi), "m2=3.14"),
    (dict(m3=-0.2), "m3=-0.2"),
    (dict(gradient="approx"), "'approx'"),
])
def test_bad_margins_raise_naming_the_value(kwargs, message):
  with pytest.raises(ValueError, match=message):
    margins.combined_margin(jnp.zeros((2, 3)), jnp.zeros(2, jnp.int32), **kwargs)


def test_bad_scale_and_unknown_preset_raise():
  with pytest.raises(ValueError, match="s=0"):
    margins.validate_margin(0, 1.0, 0.5, 0.0)
  with pytest.raises(ValueError, match="'arcfase'.*arcface"):
    margins.get_preset("arcfase")


@pytest.mark.parametrize("bad_label", [-1, 3])
def test_labels_outside_the_classes_raise(bad_label):
  with pytest.raises(ValueError, match=f"label {bad_label} at index 1"):
    margins.combined_margin(jnp.zeros((2, 3)), jnp.asarray([0, bad_label]), m2=0.5)


def test_shape_mismatch_raises():
  with pytest.raises(ValueError, match=r"\(2, 3\) and \(3,\)"):
    margins.combined_margin(jnp.zeros((2, 3)), jnp.zeros(3, jnp.int32), m2=0.5)


def test_logit_and_slope_match_float64_finite_differences():
  cos = np.linspace(-0.95, 0.95, 41)
  for name in ("sphereface", "cosface", "arcface", "cm1", "cm2"):
    p = margins.get_preset(name)
    logit, slope = margins.logit_and_slope(jnp.asarray(cos, jnp.float32), p.m1, p.m2, p.m3)

    def psi(c, p=p):  # the monotone-extended margin in float64, written out here
      phi = p.m1 * np.arccos(c) + p.m2
      k = np.floor(phi / np.pi)
      return (-1.0) ** k * np.cos(phi) - 2 * k - p.m3

    np.testing.assert_allclose(np.asarray(logit), psi(cos), atol=1e-5, err_msg=name)
    h = 1e-6
    numeric = (psi(cos + h) - psi(cos - h)) / (2 * h)
    np.testing.assert_allclose(np.asarray(slope), numeric, rtol=1e-3, atol=1e-3, err_msg=name)
  _, straight = margins.logit_and_slope(jnp.asarray(cos), m2=0.5, gradient="straight_through")
  np.testing.assert_array_equal(np.asarray(straight), 1.0)


def test_warmup_reaches_the_full_margin_at_the_stated_step():
  """α = min(1, step / W) for the update numbered `step` from 1: α = 1 from step W on."""
  got = [float(margins.warmup_strength(step, 100)) for step in (1, 50, 99, 100, 101, 5000)]
  np.testing.assert_allclose(got, [0.01, 0.5, 0.99, 1.0, 1.0, 1.0], rtol=1e-6)
  assert float(margins.warmup_strength(7, 0)) == 1.0  # no warm-up: the full margin at once
  cos = jnp.asarray([0.9, 0.2, -0.6])
  full = margins.make_margin(m2=0.5)(cos)
  for alpha in (0.0, 0.25, 1.0):
    logit, slope = margins.make_margin(m2=0.5, strength=jnp.float32(alpha))(cos)
    np.testing.assert_allclose(logit, (1 - alpha) * cos + alpha * full[0], rtol=1e-6)
    np.testing.assert_allclose(slope, (1 - alpha) + alpha * full[1], rtol=1e-6)


def test_traced_margins_compute_what_python_margins_do():
  """A pack vmaps the margin over per-run (m1, m2, m3): each lane as its own Python margin, and
  the identity lane exactly cos θ (its own run never evaluates arccos)."""
  cos = jnp.asarray(np.linspace(-0.999, 0.999, 33), jnp.float32)
  rows = [(1.0, 0.0, 0.0), (1.0, 0.5, 0.0), (1.35, 0.0, 0.0), (1.0, 0.0, 0.35), (0.9, 0.4, 0.15)]
  m1, m2, m3 = (jnp.asarray(column, jnp.float32) for column in zip(*rows))
  for gradient in margins.GRADIENTS:
    lanes = jax.vmap(lambda a, b, c, g=gradient: margins.logit_and_slope(cos, a, b, c, gradient=g))
    logits, slopes = jax.jit(lanes)(m1, m2, m3)
    np.testing.assert_array_equal(np.asarray(logits[0]), np.asarray(cos))
    np.testing.assert_array_equal(np.asarray(slopes[0]), 1.0)
    for lane, (a, b, c) in enumerate(rows[1:], start=1):
      theta = np.arccos(np.clip(np.asarray(cos, np.float64), -1 + margins.COS_EPS,
                                1 - margins.COS_EPS))
      phi = a * theta + b
      k = np.floor(phi / np.pi)
      np.testing.assert_allclose(np.asarray(logits[lane]), (-1.0) ** k * np.cos(phi) - 2 * k - c,
                                 atol=2e-6, err_msg=f"{gradient} {rows[lane]}")
      _, want_slope = margins.logit_and_slope(cos, a, b, c, gradient=gradient)
      np.testing.assert_allclose(np.asarray(slopes[lane]), np.asarray(want_slope), rtol=1e-5,
                                 err_msg=f"{gradient} {rows[lane]}")


def test_a_traced_warmup_length_gives_the_python_strengths():
  steps = jnp.asarray([1, 50, 99, 100, 101, 5000], jnp.float32)
  lengths = [0, 1, 100, 300]
  got = jax.jit(jax.vmap(lambda w: margins.warmup_strength(steps, w)))(
      jnp.asarray(lengths, jnp.float32))
  for lane, length in enumerate(lengths):
    want = np.ones(6) if length == 0 else np.minimum(1.0, np.asarray(steps) / length)
    np.testing.assert_allclose(np.asarray(got[lane]), want, rtol=1e-6, err_msg=f"W={length}")


def test_validation_checks_concrete_values_and_lets_traced_ones_through():
  with pytest.raises(ValueError, match="m2=4.0"):
    margins.make_margin(m2=4.0)
  margin = jax.jit(lambda m2: margins.make_margin(m2=m2)(jnp.asarray([0.5]))[0])
  np.testing.assert_allclose(float(margin(jnp.float32(0.5))[0]), math.cos(math.acos(0.5) + 0.5),
                             atol=1e-6)

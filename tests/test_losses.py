"""Tests of arcjax.losses against float64 NumPy implementations written here."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ml_collections

from arcjax import head as head_lib
from arcjax import losses, margins

B, D, C = 12, 16, 9


def _data(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, D))
  w = rng.normal(size=(C, D))
  y = rng.integers(0, C, B)
  return x, w, y


def _normalize(v):
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _np_margin_loss(x, w, y, s, m1, m2, m3):
  """float64 NumPy: mean CE of s·(cos θ with cos(m1θ_y+m2)−m3 on the target)."""
  cos = _normalize(x) @ _normalize(w).T
  rows = np.arange(len(y))
  theta = np.arccos(cos[rows, y])
  logits = cos.copy()
  logits[rows, y] = np.cos(m1 * theta + m2) - m3
  logits *= s
  top = logits.max(axis=1, keepdims=True)
  lse = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
  return np.mean(lse - logits[rows, y])


def _np_grad(f, *arrays, h=1e-6):
  """Central finite differences of a float64 function, one array per argument."""
  grads = []
  for k, a in enumerate(arrays):
    g = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
      plus = [v.copy() for v in arrays]
      minus = [v.copy() for v in arrays]
      plus[k][idx] += h
      minus[k][idx] -= h
      g[idx] = (f(*plus) - f(*minus)) / (2 * h)
    grads.append(g)
  return grads


# The target angles of `_data` stay below (π − m2)/m1 for these margins, where
# the paper's formula needs no extension.
@pytest.mark.parametrize("name", ["norm_softmax", "sphereface", "cosface",
                                  "arcface", "cm1", "cm2"])
def test_margin_softmax_loss_value_and_gradients_match_float64(name):
  p = margins.get_preset(name)
  x, w, y = _data()
  s = 16.0  # a smaller scale keeps float32 rounding inside 1e-5 relative
  theta = np.arccos(np.sum(_normalize(x) * _normalize(w)[y], axis=1))
  assert np.all(p.m1 * theta + p.m2 < math.pi)

  def loss(xx, ww):
    return losses.margin_softmax_loss(xx, ww, jnp.asarray(y), s=s, m1=p.m1,
                                      m2=p.m2, m3=p.m3)[0]

  value, (gx, gw) = jax.value_and_grad(loss, argnums=(0, 1))(
      jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
  ref = lambda xx, ww: _np_margin_loss(xx, ww, y, s, p.m1, p.m2, p.m3)
  np.testing.assert_allclose(float(value), ref(x, w), rtol=1e-5)
  ref_gx, ref_gw = _np_grad(ref, x, w)
  scale = max(np.abs(ref_gx).max(), np.abs(ref_gw).max())
  np.testing.assert_allclose(np.asarray(gx), ref_gx, rtol=1e-5, atol=1e-5 * scale)
  np.testing.assert_allclose(np.asarray(gw), ref_gw, rtol=1e-5, atol=1e-5 * scale)


def test_theta_y_is_the_target_angle_in_radians():
  x, w, y = _data(1)
  _, aux = losses.margin_softmax_loss(jnp.asarray(x), jnp.asarray(w), jnp.asarray(y),
                                      m2=0.5)
  expected = np.arccos(np.sum(_normalize(x) * _normalize(w)[y], axis=1))
  np.testing.assert_allclose(np.asarray(aux["theta_y"]), expected, atol=1e-5)


def test_plain_softmax_is_a_linear_layer_with_bias():
  x, w, y = _data(2)
  bias = np.random.default_rng(3).normal(size=C)
  loss, _ = losses.margin_softmax_loss(
      jnp.asarray(x), jnp.asarray(w), jnp.asarray(y), s=1.0, normalize=False,
      bias=jnp.asarray(bias))
  logits = x @ w.T + bias
  expected = np.mean(np.log(np.exp(logits).sum(1)) - logits[np.arange(B), y])
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_margin_softmax_loss_in_float32_for_bfloat16_inputs():
  x, w, y = _data(4)
  loss, aux = losses.margin_softmax_loss(
      jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16), jnp.asarray(y),
      s=16.0, m2=0.5)
  assert loss.dtype == jnp.float32 and aux["theta_y"].dtype == jnp.float32
  xb = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
  wb = np.asarray(jnp.asarray(w, jnp.bfloat16), np.float64)
  np.testing.assert_allclose(float(loss), _np_margin_loss(xb, wb, y, 16.0, 1, 0.5, 0),
                             rtol=1e-5)


def test_intra_loss_matches_float64():
  theta = np.random.default_rng(5).uniform(0, math.pi, B)
  np.testing.assert_allclose(float(losses.intra_loss(jnp.asarray(theta))),
                             theta.mean() / math.pi, rtol=1e-6)


def test_inter_loss_matches_float64_loop():
  _, w, y = _data(6)
  wn = _normalize(w)
  total = 0.0
  for yi in y:
    total += sum(np.arccos(np.clip(wn[yi] @ wn[j], -1, 1)) for j in range(C) if j != yi)
  expected = -total / len(y) / (math.pi * (C - 1))
  np.testing.assert_allclose(float(losses.inter_loss(jnp.asarray(w), jnp.asarray(y))),
                             expected, rtol=1e-5)


def _np_batch_hard_triplet(x, y, margin):
  xn = _normalize(x)
  hinges = []
  for a in range(len(y)):
    pos = [np.arccos(np.clip(xn[a] @ xn[p], -1, 1))
           for p in range(len(y)) if p != a and y[p] == y[a]]
    neg = [np.arccos(np.clip(xn[a] @ xn[n], -1, 1))
           for n in range(len(y)) if y[n] != y[a]]
    if pos and neg:
      hinges.append(max(0.0, max(pos) + margin - min(neg)))
  return np.mean(hinges)


def test_triplet_loss_matches_float64_batch_hard():
  rng = np.random.default_rng(7)
  x = rng.normal(size=(B, D))
  y = np.repeat(np.arange(4), 3)
  y[-1] = 99  # an anchor with no positive is left out of the mean
  value = losses.triplet_loss(jnp.asarray(x), jnp.asarray(y), margin=0.35)
  np.testing.assert_allclose(float(value), _np_batch_hard_triplet(x, y, 0.35), rtol=1e-5)


def test_triplet_loss_is_zero_when_classes_are_separated_by_the_margin():
  angles = np.array([0.0, 0.1, 1.0, 1.1])
  x = np.stack([np.cos(angles), np.sin(angles)], axis=1)
  value = losses.triplet_loss(jnp.asarray(x), jnp.asarray([0, 0, 1, 1]), margin=0.35)
  assert float(value) == 0.0
  # Hardest positive 0.1 for every anchor; hardest negative 1.0, 0.9, 0.9, 1.0:
  # hinges 0.1 + 1 − (1.0, 0.9, 0.9, 1.0) = 0.1, 0.2, 0.2, 0.1, mean 0.15.
  value = losses.triplet_loss(jnp.asarray(x), jnp.asarray([0, 0, 1, 1]), margin=1.0)
  np.testing.assert_allclose(float(value), 0.15, rtol=1e-5)


def _loss_fn(config, num_classes=C):
  head_config = ml_collections.ConfigDict(dict(sharded=False, sample_rate=1.0, chunk_size=0))
  return losses.make_loss_fn(config, head_lib.margin_term(config, head_config, num_classes),
                             num_classes)


def test_inter_loss_cosine_form_is_insightfaces_mean_cosine():
  """Three unit centres at 0°, 90°, 180° in the plane: hand-computed mean cosines."""
  w = jnp.asarray([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
  # Row of class 0: cosines (1, 0, −1), mean 0; class 1: (0, 1, 0), mean 1/3.
  np.testing.assert_allclose(float(losses.inter_loss(w, jnp.asarray([0, 1]), "cosine")),
                             (0.0 + 1 / 3) / 2, rtol=1e-6)
  # The paper's form: −1/(π(C−1)) Σ_{j≠y} angle; class 0: (π/2 + π), class 1: (π/2 + π/2)
  # (the antipodal pair's cosine is clipped to −1 + 1e-6 before arccos: 1.4e-3 rad short).
  np.testing.assert_allclose(float(losses.inter_loss(w, jnp.asarray([0, 1]), "angle")),
                             -((1.5 * math.pi + math.pi) / 2) / (2 * math.pi), atol=5e-4)
  # Zero padding rows past num_classes change neither form.
  padded = jnp.pad(w, ((0, 2), (0, 0)))
  for form in losses.INTER_FORMS:
    np.testing.assert_allclose(float(losses.inter_loss(padded, jnp.asarray([0, 1]), form, 3)),
                               float(losses.inter_loss(w, jnp.asarray([0, 1]), form)), rtol=1e-6)


@pytest.mark.parametrize("preset, weights", [
    ("softmax", {}),
    ("norm_softmax", {}),
    ("norm_softmax", dict(intra_weight=1.0)),
    ("norm_softmax", dict(inter_weight=1.0)),
    ("norm_softmax", dict(intra_weight=1.0, inter_weight=1.0)),
    ("norm_softmax", dict(softmax_weight=0.0, triplet_weight=1.0)),
    ("arcface", dict(intra_weight=1.0)),
    ("arcface", dict(inter_weight=1.0)),
    ("arcface", dict(intra_weight=1.0, inter_weight=1.0)),
    ("arcface", dict(triplet_weight=1.0)),
    ("sphereface", {}), ("cosface", {}), ("cm1", {}), ("cm2", {}),
])
def test_composite_loss_is_the_weighted_sum_of_its_terms(preset, weights):
  config = losses.loss_config(preset, **weights)
  rng = np.random.default_rng(8)
  x = rng.normal(size=(B, D))
  y = np.repeat(np.arange(4), 3)
  w = rng.normal(size=(C, D))
  head = {"centres": jnp.asarray(w)}
  if config.bias:
    head["bias"] = jnp.asarray(rng.normal(size=C))
  loss, aux = _loss_fn(config)(jnp.asarray(x), head, jnp.asarray(y))
  theta = np.arccos(np.sum(_normalize(x) * _normalize(w)[y], axis=1))
  expected = 0.0
  if config.softmax_weight:
    if config.normalize:
      expected += _np_margin_loss(x, w, y, config.s, config.m1, config.m2, config.m3)
    else:
      logits = x @ w.T + np.asarray(head["bias"])
      expected += np.mean(np.log(np.exp(logits).sum(1)) - logits[np.arange(B), y])
  expected += config.intra_weight * theta.mean() / math.pi
  if config.inter_weight:
    expected += config.inter_weight * float(losses.inter_loss(jnp.asarray(w), jnp.asarray(y)))
  if config.triplet_weight:
    expected += config.triplet_weight * _np_batch_hard_triplet(x, y, 0.35)
  np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(aux["theta_y"]), theta, atol=1e-5)
  assert set(k for k in aux if k.startswith("loss/")) == {
      f"loss/{t}" for t in ("softmax", "intra", "inter", "triplet")
      if config[f"{t}_weight"]}


def test_a_pack_of_loss_configs_computes_each_runs_loss():
  """vmap over per-run s, margins and weights with the union of the runs' terms computed: each
  lane is its run's loss (float64 reference), a term of weight 0 adds nothing, θ_y is the angle
  to the target centre, and the gradients are those of each run's own loss."""
  configs = [losses.loss_config("norm_softmax"), losses.loss_config("arcface", s=32.0),
             losses.loss_config("cm2", intra_weight=2.0, inter_weight=0.5),
             losses.loss_config("norm_softmax", softmax_weight=0.0, triplet_weight=1.0)]
  rng = np.random.default_rng(3)
  x, w = rng.normal(size=(B, D)), rng.normal(size=(C, D))
  y = np.repeat(np.arange(4), 3)
  names = ("s", "m1", "m2", "m3", "softmax_weight", "intra_weight", "inter_weight",
           "triplet_weight")
  hparams = {name: jnp.asarray([config[name] for config in configs], jnp.float32)
             for name in names}
  term = head_lib.margin_term(configs[0], ml_collections.ConfigDict(
      dict(sharded=False, sample_rate=1.0, chunk_size=0)), C)

  def lane(values):
    loss_fn = losses.make_loss_fn(configs[0], term, C, values, terms=losses.TERMS)
    (loss, aux), grad = jax.value_and_grad(
        lambda e: loss_fn(e, {"centres": jnp.asarray(w)}, jnp.asarray(y)), has_aux=True)(
            jnp.asarray(x, jnp.float32))
    return loss, aux, grad

  loss, aux, grads = jax.jit(jax.vmap(lane))(hparams)
  theta = np.arccos(np.sum(_normalize(x) * _normalize(w)[y], axis=1))
  for i, config in enumerate(configs):
    expected = config.intra_weight * theta.mean() / math.pi
    if config.softmax_weight:
      expected += config.softmax_weight * _np_margin_loss(x, w, y, config.s, config.m1,
                                                          config.m2, config.m3)
    if config.inter_weight:
      expected += config.inter_weight * float(losses.inter_loss(jnp.asarray(w), jnp.asarray(y)))
    if config.triplet_weight:
      expected += config.triplet_weight * _np_batch_hard_triplet(x, y, 0.35)
    np.testing.assert_allclose(float(loss[i]), expected, rtol=2e-5, err_msg=str(i))
    np.testing.assert_allclose(np.asarray(aux["theta_y"][i]), theta, atol=1e-5, err_msg=str(i))
    assert {f"loss/{t}" for t in losses.TERMS} <= set(aux)
    own = losses.make_loss_fn(config, head_lib.margin_term(config, ml_collections.ConfigDict(
        dict(sharded=False, sample_rate=1.0, chunk_size=0)), C), C)
    want = jax.grad(lambda e: own(e, {"centres": jnp.asarray(w)}, jnp.asarray(y))[0])(
        jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(grads[i]), np.asarray(want), rtol=1e-5,
                               atol=1e-5 * float(jnp.abs(want).max()), err_msg=str(i))


def test_active_terms_and_the_empty_loss_state():
  config = losses.loss_config("arcface", intra_weight=1.0, triplet_weight=0.5)
  assert losses.active_terms(config) == ("softmax", "intra", "triplet")
  assert losses.init_loss_state(config) == {}
  loss_fn = _loss_fn(config)
  x, w, _ = _data()
  _, aux = loss_fn(jnp.asarray(x), {"centres": jnp.asarray(w)}, jnp.repeat(jnp.arange(4), 3),
                   loss_state={})
  assert "loss_state" not in aux  # Table 2's losses keep none: the step keeps the old one
  with pytest.raises(ValueError, match="unknown loss terms"):
    losses.make_loss_fn(config, None, C, terms=("softmax", "arc"))


@pytest.mark.parametrize("overrides, message", [
    (dict(s=-1.0), "s=-1.0"),
    (dict(m2=4.0), "m2=4.0"),
    (dict(intra_weight=-0.5), "intra_weight"),
    (dict(softmax_weight=0.0), "every loss weight is 0"),
    (dict(bias=True), "normalize=False"),
    (dict(gradient="none"), "'none'"),
    (dict(inter_form="sine"), "inter_form"),
    (dict(margin_warmup_steps=-1), "margin_warmup_steps"),
    (dict(s=float("inf")), "finite"),
])
def test_bad_loss_configs_raise_before_compiling(overrides, message):
  with pytest.raises(ValueError, match=message):
    _loss_fn(losses.loss_config("arcface", **overrides))


def test_bad_shapes_and_labels_raise():
  x, w, y = _data()
  with pytest.raises(ValueError, match="embeddings"):
    losses.margin_softmax_loss(jnp.asarray(x), jnp.asarray(w[:, :3]), jnp.asarray(y))
  with pytest.raises(ValueError, match=f"label {C} at index 0"):
    losses.margin_softmax_loss(jnp.asarray(x), jnp.asarray(w),
                               jnp.asarray(np.r_[C, y[1:]]), m2=0.5)
  with pytest.raises(ValueError, match="no scale or margin"):
    losses.margin_softmax_loss(jnp.asarray(x), jnp.asarray(w), jnp.asarray(y),
                               normalize=False, m2=0.5)


def test_the_config_holds_the_margin_s_values_and_results_name_them_from_those():
  """No label beside the values: a preset only fills them in, and the name is read back."""
  config = losses.loss_config("cosface")
  assert "preset" not in config and (config.m2, config.m3) == (0.0, 0.35)
  assert losses.describe(config)["preset"] == "cosface"
  config.m3 = 0.0
  assert losses.describe(config)["preset"] == "norm_softmax"
  config.m2 = 0.5
  assert losses.describe(config) == {"kind": "margin", "preset": "arcface", "s": 64.0, "m1": 1.0,
                                     "m2": 0.5, "m3": 0.0, "terms": {"softmax": 1.0}}
  config.s = 30.0
  assert losses.describe(config)["preset"] == "custom"

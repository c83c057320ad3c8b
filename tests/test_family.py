"""The margin family after ArcFace (arcjax.losses) against float64 NumPy transcriptions.

Each `_np_*` below transcribes its paper's official torch (or MXNet) forward line by line,
in float64; it is written from the official code, not from arcjax's. Gradients are central
finite differences of these forwards, with what the official code detaches (CurricularFace's
t, AdaFace's margin scaler, ElasticFace's drawn margins) passed in as constants.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arcjax import losses

B, D, C, K = 8, 6, 5, 3
RTOL = 2e-4  # float32 against float64 at s = 64


def _normalize(v):
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _np_cross_entropy(logits, y):
  top = logits.max(axis=1, keepdims=True)
  lse = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
  return np.mean(lse - logits[np.arange(len(y)), y])


def _np_grad(f, x, w, h=1e-6, forward_x=None):
  """Finite differences of f(x, w) (float64) in x and w; central, except forward steps at the
  entries of x where `forward_x` (bool, x's shape) is True."""
  grads = []
  for which, a in enumerate((x, w)):
    g = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
      step = np.zeros_like(a)
      step[idx] = h
      at = lambda delta: f(x + delta, w) if which == 0 else f(x, w + delta)
      if which == 0 and forward_x is not None and forward_x[idx]:
        g[idx] = (at(step) - at(0 * step)) / h
      else:
        g[idx] = (at(step) - at(-step)) / (2 * h)
    grads.append(g)
  return grads


@functools.cache
def _compiled_value_and_grad(loss_fn, static):
  fn = lambda x, w, *args: loss_fn(x, w, *args, **dict(static))
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))


def _jax_value_and_grad(loss_fn, x, w, *args, **static):
  """loss_fn(x, w, *args, **static) -> (loss, aux) at float32 x, w: (loss, aux, ∂x, ∂w), the
  gradients float64 NumPy; compiled once per loss_fn and `static` (args are traced)."""
  compiled = _compiled_value_and_grad(loss_fn, tuple(sorted(static.items())))
  (loss, aux), (gx, gw) = compiled(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32),
                                   *args)
  return float(loss), aux, np.asarray(gx, np.float64), np.asarray(gw, np.float64)


def _assert_close(value, grads, ref_value, ref_grads):
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(want).max())


def _at_angle(centre, theta, rng, norm=1.0):
  """A vector at exactly `theta` radians from `centre`, of the given norm."""
  u = rng.normal(size=centre.shape)
  c = _normalize(centre)
  u = _normalize(u - (u @ c) * c)
  return norm * (math.cos(theta) * c + math.sin(theta) * u)


def _data(seed, angles=(), norms=None):
  """x (B, D), w (C, D), y (B,); row i < len(angles) at angle angles[i] from its centre."""
  rng = np.random.default_rng(seed)
  x, w, y = rng.normal(size=(B, D)), rng.normal(size=(C, D)), rng.integers(0, C, B)
  for i, theta in enumerate(angles):
    x[i] = _at_angle(w[y[i]], theta, rng, np.linalg.norm(x[i]))
  if norms is not None:
    x = _normalize(x) * np.asarray(norms)[:, None]
  return x, w, y


def _np_monotone(cos_y, m):
  """SphereFace's monotone continuation of cos(θ + m): (−1)^k cos φ − 2k, φ = θ + m,
  k = ⌊φ/π⌋, θ = arccos of cos_y clipped to ±(1 − 1e-6) (arcjax's `margins.angle`)."""
  phi = np.arccos(np.clip(cos_y, -1 + 1e-6, 1 - 1e-6)) + m
  k = np.floor(phi / math.pi)
  return (-1.0) ** k * np.cos(phi) - 2 * k


# Angles past π − m = 2.64 (m = 0.5): the official codes' fallback branch or their rise.
PAST_PI = (2.7, 2.9, 3.05)


# --- Sub-center ArcFace ---------------------------------------------------------------


def _np_subcenter(x, w, y, s=64.0, m=0.5, extension="official"):
  """insightface recognition/subcenter_arcface/train_parall.py, get_symbol_arcface
  (extension='official'); pytorch-metric-learning ArcFaceLoss.modify_cosine_of_target_classes
  ('fallback')."""
  num_classes, k, d = w.shape
  nweight = _normalize(w.reshape(num_classes * k, d))
  nembedding = _normalize(x)
  fc7 = nembedding @ nweight.T
  fc7 = fc7.reshape(-1, num_classes, k).max(axis=2)
  gt_one_hot = np.eye(num_classes)[y]
  cos_t = np.clip(fc7, -1, 1) * gt_one_hot  # (clip: arcjax's departure, NaN in MXNet)
  if extension == "official":
    margin_cos = np.cos(np.arccos(cos_t) + m)
  elif extension == "fallback":
    angles = np.arccos(cos_t)
    margin_cos = np.where(angles <= np.deg2rad(180) - m, np.cos(angles + m),
                          np.cos(angles) - m * np.sin(m))
  else:
    margin_cos = _np_monotone(cos_t, m)
  diff = margin_cos * gt_one_hot - cos_t
  fc7 = (fc7 + diff) * s
  return _np_cross_entropy(fc7, y)


def _subcenters(seed, w):
  """(C, K, D) sub-centres around each row of w."""
  return w[:, None, :] + 0.2 * np.random.default_rng(seed).normal(size=(C, K, D))


@pytest.mark.parametrize("extension", ["official", "fallback", "monotone"])
def test_subcenter_matches_insightface_and_pml(extension):
  x, w, y = _data(0, angles=PAST_PI)
  w3 = _subcenters(1, w)
  # The past-π rows must be past π − m for their closest sub-centre too.
  cos3 = np.einsum("bd,ckd->bck", _normalize(x), _normalize(w3))
  closest = cos3.max(axis=2)[np.arange(B), y]
  assert np.all(np.arccos(closest[:3]) > math.pi - 0.5) and np.all(np.arccos(closest[3:]) < 2.5)
  value, aux, gx, gw = _jax_value_and_grad(losses.subcenter_arcface_loss, x, w3, jnp.asarray(y),
                                           extension=extension)
  ref = lambda a, b: _np_subcenter(a, b, y, extension=extension)
  _assert_close(value, (gx, gw), ref(x, w3), _np_grad(ref, x, w3))
  np.testing.assert_allclose(np.asarray(aux["theta_y"]), np.arccos(closest), atol=1e-5)


def test_subcenter_with_one_subcentre_is_arcface():
  x, w, y = (jnp.asarray(a) for a in _data(2))
  sub = jax.jit(losses.subcenter_arcface_loss)(x, w[:, None, :], y)
  arc = jax.jit(functools.partial(losses.margin_softmax_loss, m2=0.5))(x, w, y)
  np.testing.assert_allclose(float(sub[0]), float(arc[0]), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(sub[1]["theta_y"]), np.asarray(arc[1]["theta_y"]),
                             atol=1e-6)


# --- CurricularFace ------------------------------------------------------------------


def _np_curricularface(x, w, y, t, s=64.0, m=0.5, momentum=0.01, t_new=None, monotone=False):
  """HuangYG123/CurricularFace head/metrics.py, CurricularFace.forward, then
  nn.CrossEntropyLoss. `t_new` given: the no-grad update replaced by that constant."""
  embbedings = _normalize(x)
  kernel_norm = _normalize(w).T
  cos_theta = np.clip(embbedings @ kernel_norm, -1, 1)
  target_logit = cos_theta[np.arange(len(y)), y].reshape(-1, 1)
  sin_theta = np.sqrt(1.0 - target_logit**2)
  cos_theta_m = target_logit * math.cos(m) - sin_theta * math.sin(m)
  mask = cos_theta > cos_theta_m
  final_target_logit = np.where(target_logit > math.cos(math.pi - m), cos_theta_m,
                                target_logit - math.sin(math.pi - m) * m)
  if monotone:  # arcjax's option: the monotone target, the hard negatives above it
    final_target_logit = _np_monotone(target_logit, m)
    mask = cos_theta > final_target_logit
  if t_new is None:
    t_new = target_logit.mean() * momentum + (1 - momentum) * t
  cos_theta = cos_theta.copy()
  hard_example = cos_theta[mask]
  cos_theta[mask] = hard_example * (t_new + hard_example)
  cos_theta[np.arange(len(y)), y] = final_target_logit[:, 0]
  return _np_cross_entropy(cos_theta * s, y), t_new


@pytest.mark.parametrize("t0,angles,monotone", [
    (0.0, (), False), (0.3, (), False), (0.1, PAST_PI, False), (0.1, PAST_PI, True)])
def test_curricularface_matches_official(t0, angles, monotone):
  x, w, y = _data(3, angles=angles)
  if angles:
    # A negative centre beside row 2's target, so that row 2 (θ_y = 3.05) sees a negative
    # below cos(θ_y + m) = −0.92 but above the fallback logit −1.24: the official code
    # compares with the former (not hard), the monotone option with its own logit (hard).
    j = (y[2] + 1) % C
    w[j] = w[y[2]] + 0.05 * np.random.default_rng(4).normal(size=D)
    cos_j = _normalize(x[2]) @ _normalize(w[j])
    assert -1.24 < cos_j < math.cos(3.05 + 0.5) and j not in y
  extension = "monotone" if monotone else "official"
  value, aux, gx, gw = _jax_value_and_grad(losses.curricularface_loss, x, w, jnp.asarray(y),
                                           np.float32(t0), extension=extension)
  ref_value, t_new = _np_curricularface(x, w, y, t0, monotone=monotone)
  # The update came before its use, from this batch's target cosines.
  cos_y = np.sum(_normalize(x) * _normalize(w)[y], axis=1)
  assert t_new == pytest.approx(0.01 * cos_y.mean() + 0.99 * t0)
  np.testing.assert_allclose(float(aux["t"]), t_new, rtol=1e-6, atol=1e-7)
  # Some negatives are hard and some are not, so the re-weighting is exercised.
  cos = _normalize(x) @ _normalize(w).T
  hard = cos > (np.cos(np.arccos(cos_y) + 0.5))[:, None]
  hard[np.arange(B), y] = False
  assert 0 < hard.sum() < B * (C - 1)
  ref = lambda a, b: _np_curricularface(a, b, y, t0, t_new=t_new, monotone=monotone)[0]
  _assert_close(value, (gx, gw), ref_value, _np_grad(ref, x, w))


def test_curricularface_state_carries_over_steps():
  t = jnp.float32(0.0)
  expected = 0.0
  step_fn = jax.jit(losses.curricularface_loss)
  for step in range(3):
    x, w, y = _data(10 + step)
    _, aux = step_fn(jnp.asarray(x), jnp.asarray(w), jnp.asarray(y), t)
    t = aux["t"]
    expected = _np_curricularface(x, w, y, expected)[1]
  np.testing.assert_allclose(float(t), expected, rtol=1e-6)


# --- MagFace -------------------------------------------------------------------------


def _np_magface(x, w, y, s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0,
                easy_margin=True, monotone=False):
  """IrvingMeng/MagFace models/magface.py: SoftmaxBuilder._margin, MagLinear.forward,
  MagLoss.forward; run/trainer.py's loss_id + lambda_g * loss_g."""
  x_norm = np.clip(np.linalg.norm(x, axis=1, keepdims=True), l_a, u_a)
  ada_margin = (u_m - l_m) / (u_a - l_a) * (x_norm - l_a) + l_m
  cos_m, sin_m = np.cos(ada_margin), np.sin(ada_margin)
  weight_norm = _normalize(w).T
  cos_theta = np.clip(_normalize(x) @ weight_norm, -1, 1)
  sin_theta = np.sqrt(1.0 - cos_theta**2)
  cos_theta_m = cos_theta * cos_m - sin_theta * sin_m
  if monotone:
    cos_theta_m = _np_monotone(cos_theta, ada_margin)
  elif easy_margin:
    cos_theta_m = np.where(cos_theta > 0, cos_theta_m, cos_theta)
  else:
    mm = np.sin(math.pi - ada_margin) * ada_margin
    threshold = np.cos(math.pi - ada_margin)
    cos_theta_m = np.where(cos_theta > threshold, cos_theta_m, cos_theta - mm)
  cos_theta_m, cos_theta = s * cos_theta_m, s * cos_theta
  loss_g = np.mean(1 / u_a**2 * x_norm + 1 / x_norm)
  one_hot = np.eye(w.shape[0])[y]
  output = one_hot * cos_theta_m + (1.0 - one_hot) * cos_theta
  return _np_cross_entropy(output, y) + lambda_g * loss_g


# Norms inside [l_a, u_a], exactly at l_a, below l_a and above u_a.
MAG_NORMS = (10.0, 5.0, 150.0, 30.0, 45.0, 60.0, 80.0, 100.0)


@pytest.mark.parametrize("extension", ["official", "fallback", "monotone"])
def test_magface_matches_official(extension):
  # Rows 0-2 (norms 10, 5, 150) at angles past π − m(a); rows 3.. inside.
  x, w, y = _data(4, angles=(3.0, 2.9, 2.85), norms=MAG_NORMS)
  x[0] = 0.0
  x[0, 0] = 10.0  # exactly ‖x‖ = l_a in float32 too (cos to the centres stays generic)
  value, aux, gx, gw = _jax_value_and_grad(losses.magface_loss, x, w, jnp.asarray(y),
                                           extension=extension)
  ref = lambda a, b: _np_magface(a, b, y, easy_margin=extension == "official",
                                 monotone=extension == "monotone")
  # At ‖x‖ = l_a torch.clamp passes the gradient (its interval is closed): the inward
  # (forward) difference along x[0, 0], the only direction that changes ‖x‖ to first order.
  forward = np.zeros_like(x, bool)
  forward[0, 0] = True
  _assert_close(value, (gx, gw), ref(x, w), _np_grad(ref, x, w, forward_x=forward))
  clamped = np.clip(np.linalg.norm(x, axis=1), 10.0, 110.0)
  np.testing.assert_allclose(np.asarray(aux["margin"]), 0.0035 * (clamped - 10) + 0.45, rtol=1e-6)
  np.testing.assert_allclose(float(aux["g"]), np.mean(clamped / 110**2 + 1 / clamped), rtol=1e-6)


# --- AdaFace -------------------------------------------------------------------------


def _np_adaface(x, w, y, norm_stats, s=64.0, m=0.4, h=0.333, t_alpha=0.01, scaler=None,
                monotone=False):
  """mk-minchul/AdaFace: net.py's backbone output (x/‖x‖, ‖x‖), head.py AdaFace.forward,
  train_val.py's CrossEntropyLoss. `scaler` given: the detached margin_scaler replaced by it.
  Returns (loss, (batch_mean, batch_std), margin_scaler)."""
  eps = 1e-3
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  embbedings = x / norms
  kernel_norm = _normalize(w).T
  cosine = np.clip(embbedings @ kernel_norm, -1 + eps, 1 - eps)
  safe_norms = np.clip(norms, 0.001, 100)
  mean, std = safe_norms.mean(), safe_norms.std(ddof=1)  # torch.std is unbiased
  batch_mean = mean * t_alpha + (1 - t_alpha) * norm_stats[0]
  batch_std = std * t_alpha + (1 - t_alpha) * norm_stats[1]
  margin_scaler = (safe_norms - batch_mean) / (batch_std + eps)
  margin_scaler = np.clip(margin_scaler * h, -1, 1)
  if scaler is not None:
    margin_scaler = scaler
  m_arc = np.eye(w.shape[0])[y]
  g_angular = m * margin_scaler * -1
  m_arc = m_arc * g_angular
  theta = np.arccos(cosine)
  theta_m = np.clip(theta + m_arc, eps, math.pi - eps)
  if monotone:  # arcjax's option: past π the monotone continuation, not the clip
    phi = np.maximum(theta + m_arc, eps)
    k = np.floor(phi / math.pi)
    cosine = (-1.0) ** k * np.cos(phi) - 2 * k
  else:
    cosine = np.cos(theta_m)
  m_cos = np.eye(w.shape[0])[y]
  g_add = m + (m * margin_scaler)
  m_cos = m_cos * g_add
  cosine = cosine - m_cos
  return _np_cross_entropy(cosine * s, y), (batch_mean, batch_std), margin_scaler


@pytest.mark.parametrize("norm_stats,norms,angles,monotone", [
    (losses.ADAFACE_INITIAL_NORM_STATS, None, (), False),  # the first batch
    ((15.0, 3.0), (1e-4, 150.0, 12.0, 14.0, 15.0, 16.0, 18.0, 25.0), (), False),  # norm clips
    ((15.0, 3.0), (12.0, 14.0, 25.0, 15.0, 16.0, 18.0, 1e-4, 150.0), (3.05, 3.0, 2.9), False),
    ((15.0, 3.0), (12.0, 14.0, 25.0, 15.0, 16.0, 18.0, 1e-4, 150.0), (3.05, 3.0, 2.9), True),
])
def test_adaface_matches_official(norm_stats, norms, angles, monotone):
  x, w, y = _data(6, angles=angles, norms=norms)
  extension = "monotone" if monotone else "official"
  value, aux, gx, gw = _jax_value_and_grad(losses.adaface_loss, x, w, jnp.asarray(y),
                                           tuple(map(np.float32, norm_stats)), extension=extension)
  ref_value, ref_stats, scaler = _np_adaface(x, w, y, norm_stats, monotone=monotone)
  if angles:  # the margin must carry θ_y + g past π − eps for some of these rows
    theta = np.arccos(np.sum(_normalize(x) * _normalize(w)[y], axis=1))
    assert np.any(theta - 0.4 * scaler[:, 0] > math.pi - 1e-3)
  if norms is not None:  # both clips of the norms and of the scaler are exercised
    assert np.any(np.abs(scaler) == 1.0) and np.any(np.abs(scaler) < 1.0)
  np.testing.assert_allclose([float(v) for v in aux["norm_stats"]], ref_stats, rtol=1e-6)
  ref = lambda a, b: _np_adaface(a, b, y, norm_stats, scaler=scaler, monotone=monotone)[0]
  _assert_close(value, (gx, gw), ref_value, _np_grad(ref, x, w))


def test_adaface_refuses_a_batch_of_one():
  x, w, y = _data(7)
  with pytest.raises(ValueError, match="at least 2"):
    losses.adaface_loss(jnp.asarray(x[:1]), jnp.asarray(w), jnp.asarray(y[:1]), (20.0, 100.0))


# --- ElasticFace ---------------------------------------------------------------------


def _np_elasticface(x, w, y, margin, kind, s=64.0, monotone=False):
  """fdbtrs/ElasticFace utils/losses.py: ElasticArcFace / ElasticCosFace (plus=False),
  the margins drawn by torch.normal given as `margin` (B,)."""
  embbedings = _normalize(x)
  kernel_norm = _normalize(w).T
  cos_theta = np.clip(embbedings @ kernel_norm, -1, 1)
  m_hot = np.zeros_like(cos_theta)
  m_hot[np.arange(len(y)), y] = margin
  if kind == "cos":
    return _np_cross_entropy((cos_theta - m_hot) * s, y)
  if monotone:
    cos_theta = cos_theta.copy()
    cos_theta[np.arange(len(y)), y] = _np_monotone(cos_theta[np.arange(len(y)), y], margin)
    return _np_cross_entropy(cos_theta * s, y)
  theta = np.arccos(cos_theta)
  theta += m_hot
  return _np_cross_entropy(np.cos(theta) * s, y)


@pytest.mark.parametrize("kind,extension", [("arc", "official"), ("arc", "monotone"),
                                            ("cos", "official")])
def test_elasticface_matches_official(kind, extension):
  x, w, y = _data(8, angles=(2.9, 3.0))
  key = jax.random.key(3)
  value, aux, gx, gw = _jax_value_and_grad(losses.elasticface_loss, x, w, jnp.asarray(y), key,
                                           kind=kind, extension=extension)
  margin = np.asarray(aux["margin"], np.float64)
  ref = lambda a, b: _np_elasticface(a, b, y, margin, kind, monotone=extension == "monotone")
  _assert_close(value, (gx, gw), ref(x, w), _np_grad(ref, x, w))


def test_elasticface_margins_come_from_the_key():
  x, w, y = (jnp.asarray(a) for a in _data(9))
  draw = jax.jit(lambda key: losses.elasticface_loss(x, w, y, key)[1]["margin"])
  np.testing.assert_array_equal(draw(jax.random.key(0)), draw(jax.random.key(0)))
  assert not np.any(draw(jax.random.key(0)) == draw(jax.random.key(1)))
  # The official config's defaults: N(0.5, 0.05²) for 'arc', N(0.35, 0.05²) for 'cos'.
  big_x, big_y = jnp.ones((5000, D)), jnp.zeros((5000,), jnp.int32)
  for kind, mean in [("arc", 0.5), ("cos", 0.35)]:
    drawn = np.asarray(jax.jit(functools.partial(losses.elasticface_loss, kind=kind))(
        big_x, w, big_y, jax.random.key(5))[1]["margin"])
    assert abs(drawn.mean() - mean) < 4 * 0.05 / math.sqrt(drawn.size)
    assert abs(drawn.std() - 0.05) < 0.05 * 4 / math.sqrt(2 * drawn.size)


# --- Every method --------------------------------------------------------------------

_CALLS = {
    "subcenter": lambda x, w, y, **kw: losses.subcenter_arcface_loss(
        x, jnp.stack([w, 2.0 * w], axis=1), y, **kw),
    "curricularface": lambda x, w, y, **kw: losses.curricularface_loss(x, w, y, 0.2, **kw),
    "magface": lambda x, w, y, **kw: losses.magface_loss(30.0 * x, w, y, **kw),
    "adaface": lambda x, w, y, **kw: losses.adaface_loss(x, w, y, (1.0, 0.5), **kw),
    "elasticface_arc": lambda x, w, y, **kw: losses.elasticface_loss(
        x, w, y, jax.random.key(0), **kw),
    "elasticface_cos": lambda x, w, y, **kw: losses.elasticface_loss(
        x, w, y, jax.random.key(0), kind="cos", **kw),
}


def _np_reference(name, x, w, y, aux):
  """The official value of `_CALLS[name]` (float64); ElasticFace's margins from its aux."""
  margin = np.asarray(aux.get("margin", 0.0), np.float64)
  return {
      "subcenter": lambda: _np_subcenter(x, np.stack([w, 2.0 * w], axis=1), y),
      "curricularface": lambda: _np_curricularface(x, w, y, 0.2)[0],
      "magface": lambda: _np_magface(30.0 * x, w, y),
      "adaface": lambda: _np_adaface(x, w, y, (1.0, 0.5))[0],
      "elasticface_arc": lambda: _np_elasticface(x, w, y, margin, "arc"),
      "elasticface_cos": lambda: _np_elasticface(x, w, y, margin, "cos"),
  }[name]()


@pytest.mark.parametrize("name", sorted(_CALLS))
def test_cosine_of_plus_or_minus_one_and_bfloat16_inputs(name):
  # Rows 0 and 1 lie exactly on and opposite their centre, where the official codes'
  # √(1 − cos²θ) or arccos has an infinite derivative: arcjax's gradient stays finite, the
  # value is the official one. The inputs come in bfloat16; everything is float32. (The
  # monotone extension's arccos is clipped by `margins.angle`, tested in test_margins.)
  x, w, y = _data(11)
  x[0], x[1] = w[y[0]], -w[y[1]]
  x16, w16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  fn = lambda a, b: _CALLS[name](a, b, jnp.asarray(y))
  (loss, aux), grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(x16, w16)
  assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in jax.tree.leaves(aux))
  assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in grads)
  np.testing.assert_allclose(np.asarray(aux["theta_y"])[:2], [0.0, math.pi], atol=2e-3)
  # rtol 1e-4: at |cos θ| = 1, √(1 − cos²θ) turns float32's rounding of cos θ (6e-8) into
  # 3e-4 of sin θ, and s = 64 scales it.
  rounded = [np.asarray(a, np.float64) for a in (x16, w16)]
  np.testing.assert_allclose(float(loss), _np_reference(name, *rounded, y, aux), rtol=1e-4)


@pytest.mark.parametrize("name,kw,match", [
    ("subcenter", {"extension": "exact"}, "extension"),
    ("adaface", {"extension": "fallback"}, "extension"),
    ("elasticface_cos", {"extension": "fallback"}, "extension"),
    ("elasticface_arc", {"kind": "sphere"}, "kind"),
    ("curricularface", {"m": -0.1}, "m must be in"),
    ("magface", {"l_a": 120.0}, "l_a < u_a"),
    ("curricularface", {"s": 0.0}, "s must be"),
])
def test_bad_arguments_are_refused_in_one_line(name, kw, match):
  x, w, y = (jnp.asarray(a) for a in _data(13))
  with pytest.raises(ValueError, match=match):
    _CALLS[name](x, w, y, **kw)


def test_shapes_and_labels_are_checked():
  x, w, y = (jnp.asarray(a) for a in _data(14))
  with pytest.raises(ValueError, match=r"\(C, K, d\)"):
    losses.subcenter_arcface_loss(x, w, y)
  with pytest.raises(ValueError, match="expected embeddings"):
    losses.curricularface_loss(x[:, :3], w, y, 0.0)
  with pytest.raises(ValueError, match="outside"):
    losses.magface_loss(x, w, y.at[0].set(C), )

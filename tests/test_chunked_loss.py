"""The class-chunked loss equals the plain margin loss, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arcjax import losses, margins

B, D, C = 12, 16, 37


def _data(seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(B, D)), jnp.float32),
          jnp.asarray(rng.normal(size=(C, D)), jnp.float32),
          jnp.asarray(rng.integers(0, C, B), jnp.int32))


def _value_and_grads(loss_fn, x, w, y, **kwargs):
  return jax.jit(jax.value_and_grad(lambda a, b: loss_fn(a, b, y, **kwargs)[0],
                                    argnums=(0, 1)))(x, w)


def _assert_close(got, want):
  (value, (gx, gw)), (ref, (ref_gx, ref_gw)) = got, want
  np.testing.assert_allclose(float(value), float(ref), rtol=1e-5)
  for g, r in [(gx, ref_gx), (gw, ref_gw)]:
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5,
                               atol=1e-5 * float(jnp.max(jnp.abs(r))))


# 37 classes: chunks of 5 leave a partial last chunk, 100 is clipped to C.
@pytest.mark.parametrize("chunk_size", [5, 100])
@pytest.mark.parametrize("name", ["norm_softmax", "sphereface", "cosface", "arcface", "cm1"])
def test_chunked_equals_plain(name, chunk_size):
  p = margins.get_preset(name)
  x, w, y = _data()
  kwargs = dict(s=p.s, m1=p.m1, m2=p.m2, m3=p.m3)
  _assert_close(
      _value_and_grads(losses.chunked_margin_softmax_loss, x, w, y, chunk_size=chunk_size, **kwargs),
      _value_and_grads(losses.margin_softmax_loss, x, w, y, **kwargs))


def test_chunked_straight_through_equals_plain():
  x, w, y = _data(1)
  kwargs = dict(s=64.0, m2=0.5, gradient="straight_through")
  _assert_close(
      _value_and_grads(losses.chunked_margin_softmax_loss, x, w, y, chunk_size=6, **kwargs),
      _value_and_grads(losses.margin_softmax_loss, x, w, y, **kwargs))


def test_chunked_matches_float64_past_pi():
  """Targets near θ = π (φ = θ + m2 > π) take the monotone extension, in float64 too."""
  x, w, y = (np.array(a) for a in _data(2))
  x, w = x.astype(np.float64), w.astype(np.float64)
  y[:3] = [0, 1, 2]
  w[:3] = -x[:3]  # the first rows point away from their centres (θ ≈ π)
  loss, aux = losses.chunked_margin_softmax_loss(
      jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(y),
      chunk_size=7, s=16.0, m2=0.5)
  xn = x / np.linalg.norm(x, axis=1, keepdims=True)
  wn = w / np.linalg.norm(w, axis=1, keepdims=True)
  cos = xn @ wn.T
  rows = np.arange(B)
  theta = np.arccos(np.clip(cos[rows, y], -1 + 1e-6, 1 - 1e-6))
  phi = theta + 0.5
  k = np.floor(phi / np.pi)
  logits = 16.0 * cos
  logits[rows, y] = 16.0 * ((-1.0) ** k * np.cos(phi) - 2 * k)
  top = logits.max(1)
  want = np.mean(np.log(np.exp(logits - top[:, None]).sum(1)) + top - logits[rows, y])
  assert np.all(phi[:3] > np.pi)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(aux["theta_y"]), theta, atol=1e-5)


def test_chunked_never_materialises_logits():
  """The compiled forward+backward holds O(B·chunk) temporaries, not O(B·C)."""
  rng = np.random.default_rng(0)
  batch, num_classes, chunk = 64, 20_000, 256
  x = jnp.asarray(rng.normal(size=(batch, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(num_classes, 8)), jnp.float32)
  y = jnp.asarray(rng.integers(0, num_classes, batch), jnp.int32)

  def temp_bytes(loss_fn, **kwargs):
    fn = jax.jit(jax.grad(lambda a, b: loss_fn(a, b, y, s=64.0, m2=0.5, **kwargs)[0], (0, 1)))
    return fn.lower(x, w).compile().memory_analysis().temp_size_in_bytes

  logits_bytes = 4 * batch * num_classes
  assert temp_bytes(losses.margin_softmax_loss) >= logits_bytes
  assert temp_bytes(losses.chunked_margin_softmax_loss, chunk_size=chunk) < logits_bytes / 4


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True])
def test_chunk_size_must_be_positive_int(chunk_size):
  x, w, y = _data()
  with pytest.raises(ValueError, match="chunk_size"):
    losses.chunked_margin_softmax_loss(x, w, y, chunk_size=chunk_size)


def test_chunked_rejects_bad_labels_and_margins():
  x, w, y = _data()
  with pytest.raises(ValueError, match=f"label {C}"):
    losses.chunked_margin_softmax_loss(x, w, y.at[0].set(C), chunk_size=4)
  with pytest.raises(ValueError, match="m2=4.0"):
    losses.chunked_margin_softmax_loss(x, w, y, chunk_size=4, m2=4.0)

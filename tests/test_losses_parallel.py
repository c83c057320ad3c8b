"""One code, any number of devices: the margin loss under pmap and shard_map."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from arcjax import losses

NUM_DEVICES = 8
B, D, C = 32, 16, 50
MARGINS = dict(s=64.0, m1=0.9, m2=0.4, m3=0.15)


@pytest.fixture(scope="module")
def data():
  if jax.device_count() < NUM_DEVICES:
    pytest.skip(f"needs {NUM_DEVICES} devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.normal(size=(B, D)), jnp.float32),
          jnp.asarray(rng.normal(size=(C, D)), jnp.float32),
          jnp.asarray(rng.integers(0, C, B), jnp.int32))


def _local_loss(x, w, y):
  return losses.margin_softmax_loss(x, w, y, **MARGINS)[0]


def _reference(x, w, y):
  return jax.jit(jax.value_and_grad(_local_loss, argnums=(0, 1)))(x, w, y)


def test_pmap_matches_one_device(data):
  x, w, y = data

  @functools.partial(jax.pmap, axis_name="batch", in_axes=(0, None, 0))
  def step(x, w, y):
    loss, (gx, gw) = jax.value_and_grad(_local_loss, argnums=(0, 1))(x, w, y)
    # The global loss is the mean of the per-device means: d/dx_local carries 1/devices.
    return jax.lax.pmean(loss, "batch"), gx / NUM_DEVICES, jax.lax.pmean(gw, "batch")

  shard = lambda a: a.reshape(NUM_DEVICES, -1, *a.shape[1:])
  loss, gx, gw = step(shard(x), w, shard(y))
  ref_loss, (ref_gx, ref_gw) = _reference(x, w, y)
  np.testing.assert_allclose(np.asarray(loss), float(ref_loss), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(gx).reshape(B, D), ref_gx, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(gw)[0], ref_gw, rtol=1e-5, atol=1e-7)


def test_shard_map_matches_one_device(data):
  x, w, y = data
  mesh = Mesh(np.array(jax.devices()[:NUM_DEVICES]), ("batch",))

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("batch"), P(), P("batch")),
                     out_specs=P())
  def global_loss(x, w, y):
    return jax.lax.pmean(_local_loss(x, w, y), "batch")

  loss, (gx, gw) = jax.jit(jax.value_and_grad(global_loss, argnums=(0, 1)))(x, w, y)
  assert len(gx.sharding.device_set) == NUM_DEVICES
  ref_loss, (ref_gx, ref_gw) = _reference(x, w, y)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(gx), ref_gx, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(gw), ref_gw, rtol=1e-5, atol=1e-7)

"""Class-sharded margin loss on 8 devices (and 2 processes) equals the one-device loss."""

import functools
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from arcjax import losses, margins, partial_fc

N = 8
B, D = 32, 16
C = 45  # not a multiple of 8: padded to 48, 6 centres per shard
PRESETS = ["arcface", "cosface", "cm1"]


@pytest.fixture(scope="module", autouse=True)
def _eight_devices():
  if jax.device_count() < N:
    pytest.skip(f"needs {N} devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")


def _data(num_classes=C, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(B, D)), jnp.float32),
          jnp.asarray(rng.normal(size=(num_classes, D)), jnp.float32),
          jnp.asarray(rng.integers(0, num_classes, B), jnp.int32))


def _margin(name):
  p = margins.get_preset(name)
  return dict(s=p.s, m1=p.m1, m2=p.m2, m3=p.m3)


def _reference(x, w, y, **margin):
  fn = lambda a, b: losses.margin_softmax_loss(a, b, y, **margin)
  (loss, aux), grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(x, w)
  return loss, grads, aux["theta_y"]


def _per_device(x, w, y, num_classes, **kwargs):
  """Loss, ∂loss/∂x (rescaled from the data-parallel convention), ∂loss/∂w_shard, θ_y."""
  fn = lambda a, b: partial_fc.sharded_margin_loss(a, b, y, axis_name="d",
                                                   num_classes=num_classes, **kwargs)
  (loss, aux), (gx, gw) = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(x, w)
  return loss, gx / N, gw, aux["theta_y"]


def _run_pmap(x, w, y, num_classes=C, **kwargs):
  step = jax.pmap(functools.partial(_per_device, num_classes=num_classes, **kwargs),
                  axis_name="d")
  loss, gx, gw, theta = step(x.reshape(N, -1, D), partial_fc.shard_centres(w, N),
                             y.reshape(N, -1))
  np.testing.assert_array_equal(loss, np.full(N, loss[0]))  # the same on every device
  return (loss[0], gx.reshape(B, D), partial_fc.unshard_centres(gw, num_classes),
          theta.reshape(B))


def _run_shard_map(x, w, y, num_classes=C, check_vma=True, **kwargs):
  mesh = Mesh(np.array(jax.devices()[:N]), ("d",))
  step = jax.jit(jax.shard_map(
      functools.partial(_per_device, num_classes=num_classes, **kwargs), mesh=mesh,
      in_specs=(P("d"), P("d"), P("d")), out_specs=(P(), P("d"), P("d"), P("d")),
      check_vma=check_vma))
  loss, gx, gw, theta = step(x, partial_fc.pad_classes(w, N), y)
  return loss, gx, partial_fc.unshard_centres(gw, num_classes), theta


def _assert_matches(got, want):
  (loss, gx, gw, theta), (ref_loss, (ref_gx, ref_gw), ref_theta) = got, want
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  for g, r in [(gx, ref_gx), (gw, ref_gw)]:
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5,
                               atol=1e-5 * float(jnp.max(jnp.abs(r))))
  np.testing.assert_allclose(np.asarray(theta), np.asarray(ref_theta), atol=1e-5)


@pytest.mark.parametrize("name", PRESETS)
def test_pmap_matches_one_device(name):
  x, w, y = _data()
  _assert_matches(_run_pmap(x, w, y, **_margin(name)), _reference(x, w, y, **_margin(name)))


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("name", PRESETS)
def test_shard_map_matches_one_device(name, check_vma):
  x, w, y = _data()
  _assert_matches(_run_shard_map(x, w, y, check_vma=check_vma, **_margin(name)),
                  _reference(x, w, y, **_margin(name)))


def test_divisible_class_count_and_chunked_shards():
  """48 classes (no padding), each shard streamed in chunks of 4 (6 % 4 ≠ 0)."""
  x, w, y = _data(48)
  _assert_matches(_run_shard_map(x, w, y, num_classes=48, chunk_size=4, **_margin("cm1")),
                  _reference(x, w, y, **_margin("cm1")))


def test_shards_of_padding_only():
  """9 classes over 8 devices: 2 per shard, shards 5-7 hold only padding."""
  x, w, y = _data(9)
  _assert_matches(_run_pmap(x, w, y, num_classes=9, **_margin("arcface")),
                  _reference(x, w, y, **_margin("arcface")))


def test_sampling_every_centre_equals_unsampled():
  """r = 1, and an r < 1 whose sample is the whole shard, give the unsampled loss."""
  x, w, y = _data()
  want = _reference(x, w, y, **_margin("arcface"))
  _assert_matches(_run_pmap(x, w, y, sample_rate=1.0, **_margin("arcface")), want)
  # 6 centres per shard ≤ global batch 32: the sample keeps all of them (in order).
  assert partial_fc.num_sampled(6, B, 0.1) == 6
  _assert_matches(_run_pmap(x, w, y, sample_rate=0.1, key=jax.random.key(3),
                            **_margin("arcface")), want)


def test_sampling_keeps_positives_and_is_the_loss_over_the_sample():
  num_classes, rate = 1000, 0.3        # 125 per shard: 38 sampled (≥ batch 32)
  x, w, y = _data(num_classes)
  margin = _margin("arcface")
  step = jax.pmap(lambda a, b, c, key: jax.value_and_grad(
      lambda a, b: partial_fc.sharded_margin_loss(
          a, b, c, axis_name="d", num_classes=num_classes, sample_rate=rate, key=key,
          **margin), argnums=(0, 1), has_aux=True)(a, b), axis_name="d", in_axes=(0, 0, 0, None))
  run = lambda key: step(x.reshape(N, -1, D), partial_fc.shard_centres(w, N),
                         y.reshape(N, -1), key)
  (loss, aux), (gx, gw) = run(jax.random.key(0))
  sampled = np.asarray(aux["sampled"]).reshape(-1)[:num_classes]
  per_shard = partial_fc.num_sampled(125, B, rate)
  assert per_shard == 38
  np.testing.assert_array_equal(np.asarray(aux["sampled"]).sum(1), np.full(N, per_shard))
  assert sampled[np.asarray(y)].all()
  gw = np.asarray(partial_fc.unshard_centres(gw, num_classes))
  assert np.all(gw[~sampled] == 0.0) and np.all(np.abs(gw[sampled]).sum(1) > 0)
  # The loss and gradients are those of the plain loss over the sampled classes.
  kept = np.flatnonzero(sampled)
  ref_loss, (ref_gx, ref_gw), _ = _reference(x, w[kept], jnp.searchsorted(kept, y), **margin)
  np.testing.assert_allclose(float(loss[0]), float(ref_loss), rtol=1e-5)
  for g, r in [(np.asarray(gx).reshape(B, D) / N, ref_gx), (gw[kept], ref_gw)]:
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(r))))
  # Another key draws another sample, and the shards draw differently.
  other = np.asarray(run(jax.random.key(1))[0][1]["sampled"])
  assert (other != np.asarray(aux["sampled"])).any()
  negatives = np.asarray(aux["sampled"]).copy()
  negatives.reshape(-1)[np.asarray(y)] = False
  assert len({tuple(row) for row in negatives}) == N


def test_backbone_gradients_take_the_usual_pmean():
  """A linear backbone x = u·A: pmean (pmap) or ÷ axis size (shard_map, check_vma) is exact."""
  rng = np.random.default_rng(5)
  u = jnp.asarray(rng.normal(size=(B, 6)), jnp.float32)
  a = jnp.asarray(rng.normal(size=(6, D)), jnp.float32)
  _, w, y = _data()
  margin = _margin("cm1")
  ref = jax.grad(lambda a: losses.margin_softmax_loss(u @ a, w, y, **margin)[0])(a)

  def grad_a(a, u, w_shard, y):
    return jax.grad(lambda a: partial_fc.sharded_margin_loss(
        u @ a, w_shard, y, axis_name="d", num_classes=C, **margin)[0])(a)

  pmapped = jax.pmap(lambda *args: jax.lax.pmean(grad_a(*args), "d"), axis_name="d",
                     in_axes=(None, 0, 0, 0))(a, u.reshape(N, -1, 6),
                                              partial_fc.shard_centres(w, N), y.reshape(N, -1))
  mesh = Mesh(np.array(jax.devices()[:N]), ("d",))
  shard_mapped = jax.jit(jax.shard_map(
      lambda *args: grad_a(*args) / N, mesh=mesh,
      in_specs=(P(), P("d"), P("d"), P("d")), out_specs=P()))(a, u, partial_fc.pad_classes(w, N), y)
  for got in (pmapped[0], shard_mapped):
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def test_padding_helpers():
  w = jnp.arange(45 * 2, dtype=jnp.float32).reshape(45, 2)
  assert partial_fc.padded_num_classes(45, 8) == 48
  assert partial_fc.padded_num_classes(48, 8) == 48
  shards = partial_fc.shard_centres(w, 8)
  assert shards.shape == (8, 6, 2)
  np.testing.assert_array_equal(shards[7, 3:], 0.0)
  np.testing.assert_array_equal(partial_fc.unshard_centres(shards, 45), w)
  np.testing.assert_array_equal(partial_fc.unshard_centres(partial_fc.pad_classes(w, 8), 45), w)
  with pytest.raises(ValueError, match="num_classes=49"):
    partial_fc.unshard_centres(shards, 49)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sample_rate=0.0), "sample_rate=0.0"),
    (dict(sample_rate=1.5), "sample_rate=1.5"),
    (dict(sample_rate=0.5), "key=None"),
    (dict(num_classes=49), "num_classes=49"),
    (dict(chunk_size=-1), "chunk_size=-1"),
    (dict(m2=-0.1), "m2=-0.1"),
])
def test_bad_arguments_are_named(kwargs, match):
  x, w, y = _data()
  with pytest.raises(ValueError, match=match):
    _run_pmap(x, w, y, **kwargs)


def test_shape_mismatch_is_named():
  x, w, y = _data()
  with pytest.raises(ValueError, match=r"\(4, 16\), \(6, 3\)"):
    jax.pmap(lambda a, b, c: partial_fc.sharded_margin_loss(a, b, c, axis_name="d")[0],
             axis_name="d")(x.reshape(N, -1, D), jnp.zeros((N, 6, 3)), y.reshape(N, -1))


# --- two processes -------------------------------------------------------------

WORKER = pathlib.Path(__file__).with_name("_partial_fc_worker.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _worker(out, *args) -> subprocess.Popen:
  env = os.environ | {"XLA_FLAGS": "", "PYTHONPATH": str(WORKER.parents[1])}
  return subprocess.Popen([sys.executable, str(WORKER), str(out), *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(procs, timeout=240):
  try:
    for p in procs:
      out, _ = p.communicate(timeout=timeout)
      assert p.returncode == 0, out[-3000:]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  """Centres sharded over the 8 devices of 2 processes train as on 1 process."""
  port = str(_free_port())
  _wait([_worker(tmp_path / "two.npz", "--process-id", str(i), "--port", port)
         for i in range(2)])
  _wait([_worker(tmp_path / "one.npz")])
  two, one = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
  for name in one.files:
    np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-6, err_msg=name)
  # r = 1 equals plain SGD on the unsharded loss on one device.
  sys.path.insert(0, str(WORKER.parent))
  import _partial_fc_worker as worker
  data = worker.problem()
  params, centres = jnp.asarray(data["params"]), jnp.asarray(data["centres"])
  for i in range(worker.STEPS):
    grads = jax.grad(lambda p, c: losses.margin_softmax_loss(
        jnp.asarray(data["inputs"][i]) @ p, c, jnp.asarray(data["labels"][i]),
        **worker.MARGIN)[0], argnums=(0, 1))(params, centres)
    params, centres = params - worker.LR * grads[0], centres - worker.LR * grads[1]
  np.testing.assert_allclose(two["full_params"], params, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(two["full_centres"], centres, rtol=1e-5, atol=1e-5)
  assert np.abs(two["sampled_centres"] - two["full_centres"]).max() > 1e-3

"""The head's one margin-CE core equals the reference loss in every layout: whole, chunked,
class-sharded over 8 devices (and 2 processes), sampled (Partial FC)."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from arcjax import head, losses, margins, sharding

B, D, C = 32, 16, 45  # 45 classes: padded to 48 over 8 devices, 6 per shard
N = 8
PRESETS = ["norm_softmax", "sphereface", "cosface", "arcface", "cm1"]


def _data(num_classes=C, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(B, D)), jnp.float32),
          jnp.asarray(rng.normal(size=(num_classes, D)), jnp.float32),
          jnp.asarray(rng.integers(0, num_classes, B), jnp.int32))


def _margin(name, gradient="exact"):
  p = margins.get_preset(name)
  return dict(s=p.s, m1=p.m1, m2=p.m2, m3=p.m3, gradient=gradient)


def _reference(x, w, y, **margin):
  fn = lambda a, b: losses.margin_softmax_loss(a, b, y, **margin)
  (loss, aux), grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(x, w)
  return loss, grads, aux["theta_y"]


def _core(x, w, y, *, s, m1, m2, m3, gradient, **kwargs):
  margin = margins.make_margin(m1, m2, m3, gradient=gradient)
  fn = lambda a, b: head.margin_softmax(a, b, y, margin=margin, s=s, **kwargs)
  (loss, aux), grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(x, w)
  return loss, grads, aux["theta_y"]


def _assert_matches(got, want, num_classes=C):
  (loss, (gx, gw), theta), (ref_loss, (ref_gx, ref_gw), ref_theta) = got, want
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(gx), ref_gx, rtol=1e-5,
                             atol=1e-5 * float(jnp.max(jnp.abs(ref_gx))))
  np.testing.assert_allclose(np.asarray(gw)[:num_classes], ref_gw, rtol=1e-5,
                             atol=1e-5 * float(jnp.max(jnp.abs(ref_gw))))
  np.testing.assert_array_equal(np.asarray(gw)[num_classes:], 0.0)  # padding gets nothing
  np.testing.assert_allclose(np.asarray(theta), np.asarray(ref_theta), atol=1e-5)


# 45 classes: chunks of 7 leave a partial last chunk; 100 is clipped to C; 0 is all at once.
@pytest.mark.parametrize("chunk_size", [0, 7, 100])
@pytest.mark.parametrize("name", PRESETS)
def test_whole_and_chunked_equal_the_reference(name, chunk_size):
  x, w, y = _data()
  _assert_matches(_core(x, w, y, chunk_size=chunk_size, **_margin(name)),
                  _reference(x, w, y, **_margin(name)))


@pytest.mark.parametrize("chunk_size", [0, 6])
def test_straight_through_equals_the_reference(chunk_size):
  x, w, y = _data(seed=1)
  _assert_matches(_core(x, w, y, chunk_size=chunk_size, **_margin("arcface", "straight_through")),
                  _reference(x, w, y, **_margin("arcface", "straight_through")))


def test_padding_rows_are_left_out():
  x, w, y = _data()
  padded = jnp.pad(w, ((0, 3), (0, 0)))
  _assert_matches(_core(x, padded, y, num_classes=C, chunk_size=4, **_margin("cm1")),
                  _reference(x, w, y, **_margin("cm1")))


def test_matches_float64_past_pi():
  """Targets near θ = π (φ = θ + m2 > π) take the monotone extension, in float64 too."""
  x, w, y = (np.array(a) for a in _data(seed=2))
  x, w = x.astype(np.float64), w.astype(np.float64)
  y[:3] = [0, 1, 2]
  w[:3] = -x[:3]  # the first rows point away from their centres (θ ≈ π)
  loss, _, theta_y = _core(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32),
                           jnp.asarray(y), chunk_size=7, s=16.0, m1=1.0, m2=0.5, m3=0.0,
                           gradient="exact")
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
  np.testing.assert_allclose(np.asarray(theta_y), theta, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [0, 7])
def test_traced_scale_and_margins_give_each_runs_loss(chunk_size):
  """A pack vmaps the head over per-run s, m1, m2, m3 (the chunked core takes s as an operand):
  each lane equals the reference of its own values, loss and gradients."""
  x, w, y = _data(seed=4)
  names = ("norm_softmax", "arcface", "cm1")
  values = {key: jnp.asarray([_margin(name)[key] for name in names], jnp.float32)
            for key in ("s", "m1", "m2", "m3")}
  values["s"] = jnp.asarray([64.0, 16.0, 32.0], jnp.float32)

  def lane(v):
    margin = margins.make_margin(v["m1"], v["m2"], v["m3"])
    fn = lambda a, b: head.margin_softmax(a, b, y, margin=margin, s=v["s"], chunk_size=chunk_size)
    (loss, aux), grads = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(x, w)
    return loss, grads, aux["theta_y"]

  got = jax.jit(jax.vmap(lane))(values)
  for i, name in enumerate(names):
    _assert_matches(jax.tree.map(lambda leaf, i=i: leaf[i], got),
                    _reference(x, w, y, **{**_margin(name), "s": float(values["s"][i])}))


def test_warmup_strength_mixes_plain_and_margin_logits():
  """ψ_α = (1 − α)·cos θ + α·ψ(θ): α = 0 is the plain normalised softmax, α = 1 ArcFace."""
  x, w, y = _data(seed=3)
  for alpha in (0.0, 0.3, 1.0):
    margin = margins.make_margin(m2=0.5, strength=jnp.float32(alpha))
    loss, _ = head.margin_softmax(x, w, y, margin=margin, s=32.0)
    xn = np.asarray(x, np.float64) / np.linalg.norm(x, axis=1, keepdims=True)
    wn = np.asarray(w, np.float64) / np.linalg.norm(w, axis=1, keepdims=True)
    cos = xn @ wn.T
    rows = np.arange(B)
    logits = 32.0 * cos
    target = cos[rows, y]
    logits[rows, y] = 32.0 * ((1 - alpha) * target + alpha * np.cos(np.arccos(target) + 0.5))
    top = logits.max(1)
    want = np.mean(np.log(np.exp(logits - top[:, None]).sum(1)) + top - logits[rows, y])
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, err_msg=f"alpha={alpha}")


def test_whole_block_keeps_the_softmax_and_chunks_never_hold_the_logits():
  """Unchunked: the (B, C) softmax is kept for the backward (no second matmul); chunked:
  O(B·chunk) temporaries, not O(B·C)."""
  rng = np.random.default_rng(0)
  batch, num_classes, chunk = 64, 20_000, 256
  x = jnp.asarray(rng.normal(size=(batch, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(num_classes, 8)), jnp.float32)
  y = jnp.asarray(rng.integers(0, num_classes, batch), jnp.int32)
  margin = margins.make_margin(m2=0.5)

  def temp_bytes(chunk_size):
    fn = jax.jit(jax.grad(lambda a, b: head.margin_softmax(
        a, b, y, margin=margin, chunk_size=chunk_size)[0], (0, 1)))
    return fn.lower(x, w).compile().memory_analysis().temp_size_in_bytes

  logits_bytes = 4 * batch * num_classes
  assert temp_bytes(0) >= logits_bytes
  assert temp_bytes(chunk) < logits_bytes / 4


def test_linear_softmax_is_the_reference_plain_softmax():
  x, w, y = _data()
  bias = jnp.linspace(-1.0, 1.0, C)
  got = jax.value_and_grad(lambda a, b, c: head.linear_softmax(a, b, c, y)[0], (0, 1, 2))(x, w, bias)
  want = jax.value_and_grad(lambda a, b, c: losses.margin_softmax_loss(
      a, b, y, s=1.0, normalize=False, bias=c)[0], (0, 1, 2))(x, w, bias)
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)
  for g, r in zip(got[1], want[1]):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-7)


def test_init_head_pads_with_zero_rows_whatever_the_shards():
  key = jax.random.key(0)
  one = head.init_head(key, 45, 8, bias=False)["centres"]
  eight = head.init_head(key, 45, 8, bias=False, num_shards=8)["centres"]
  assert one.shape == (45, 8) and eight.shape == (48, 8)
  np.testing.assert_array_equal(eight[:45], one)
  np.testing.assert_array_equal(eight[45:], 0.0)
  assert head.padded_num_classes(45, 8) == 48 and head.padded_num_classes(48, 8) == 48
  np.testing.assert_allclose(float(jnp.std(one)), head.CENTRE_INIT_STD, rtol=0.2)


@pytest.mark.parametrize("changes, match", [
    (dict(sample_rate=0.0), "sample_rate"),
    (dict(sample_rate=0.5), "needs config.head.sharded"),
    (dict(chunk_size=-1), "chunk_size"),
])
def test_bad_head_configs_are_named(changes, match):
  config = ml_collections.ConfigDict(dict(sharded=False, sample_rate=1.0, chunk_size=0))
  config.update(changes)
  with pytest.raises(ValueError, match=match):
    head.check_config(config, losses.loss_config("arcface"))


def test_plain_softmax_needs_the_replicated_head():
  config = ml_collections.ConfigDict(dict(sharded=False, sample_rate=1.0, chunk_size=8))
  with pytest.raises(ValueError, match="plain softmax"):
    head.check_config(config, losses.loss_config("softmax"))


# --- Class-sharded over 8 devices -----------------------------------------------------


@pytest.fixture
def mesh():
  if jax.device_count() < N:
    pytest.skip(f"needs {N} devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  return sharding.make_mesh(jax.devices()[:N])


def _sharded(mesh, x, w, y, num_classes=C, sample_rate=1.0, chunk_size=0, name="arcface",
             key=None):
  """The production path: `head.margin_term` over a sharded head, differentiated from outside."""
  loss_config = losses.loss_config(name)
  head_config = ml_collections.ConfigDict(dict(sharded=True, sample_rate=sample_rate,
                                               chunk_size=chunk_size))
  term = head.margin_term(loss_config, head_config, num_classes, mesh)
  padded = jnp.pad(w, ((0, head.padded_num_classes(num_classes, N) - num_classes), (0, 0)))
  placed = jax.device_put(padded, jax.sharding.NamedSharding(mesh, jax.P(sharding.AXIS)))
  margin = margins.make_margin(loss_config.m1, loss_config.m2, loss_config.m3)
  fn = lambda a, b: term(a, {"centres": b}, y, key, margin, loss_config.s)
  (loss, aux), grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(x, placed)
  assert grads[1].sharding.spec == jax.P(sharding.AXIS)  # the centre gradient stays sharded
  return loss, grads, aux["theta_y"]


@pytest.mark.parametrize("name", ["arcface", "cosface", "cm1"])
def test_sharded_head_equals_the_reference(mesh, name):
  x, w, y = _data()
  _assert_matches(_sharded(mesh, x, w, y, name=name), _reference(x, w, y, **_margin(name)))


def test_sharded_and_chunked_with_shards_of_padding_only(mesh):
  """9 classes over 8 devices: 2 per shard, shards 5-7 hold only padding; chunks of 1."""
  x, w, y = _data(9)
  _assert_matches(_sharded(mesh, x, w, y, num_classes=9, chunk_size=1),
                  _reference(x, w, y, **_margin("arcface")), num_classes=9)


def test_sampling_every_centre_equals_unsampled(mesh):
  """An r < 1 whose sample is the whole shard (6 centres ≤ batch 32) gives the unsampled loss."""
  x, w, y = _data()
  assert head.num_sampled(6, B, 0.1) == 6
  _assert_matches(_sharded(mesh, x, w, y, sample_rate=0.1, key=jax.random.key(3)),
                  _reference(x, w, y, **_margin("arcface")))


def test_sampling_keeps_positives_and_is_the_loss_over_the_sample(mesh):
  num_classes, rate = 1000, 0.3        # 125 per shard: 38 sampled (≥ batch 32)
  x, w, y = _data(num_classes)
  loss, (gx, gw), _ = _sharded(mesh, x, w, y, num_classes=num_classes, sample_rate=rate,
                               key=jax.random.key(0))
  gw = np.asarray(gw)[:num_classes]
  sampled = np.abs(gw).sum(1) > 0
  assert head.num_sampled(125, B, rate) == 38
  assert sampled.reshape(N, -1).sum(1).tolist() == [38] * N  # every shard uses 38 centres
  assert sampled[np.asarray(y)].all()                          # every positive among them
  kept = np.flatnonzero(sampled)
  ref_loss, (ref_gx, ref_gw), _ = _reference(x, w[kept], jnp.searchsorted(kept, y),
                                             **_margin("arcface"))
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  for g, r in [(np.asarray(gx), ref_gx), (gw[kept], ref_gw)]:
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(r))))
  other = _sharded(mesh, x, w, y, num_classes=num_classes, sample_rate=rate,
                   key=jax.random.key(1))[1][1]
  assert ((np.abs(np.asarray(other)[:num_classes]).sum(1) > 0) != sampled).any()


# --- two processes -------------------------------------------------------------------

WORKER = pathlib.Path(__file__).with_name("_head_worker.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _worker(out, *args) -> subprocess.Popen:
  env = os.environ | {"XLA_FLAGS": "", "PYTHONPATH": str(WORKER.parents[1])}
  return subprocess.Popen([sys.executable, str(WORKER), str(out), *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(procs, timeout=600):
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
  """Centres sharded over the 8 devices of 2 processes train as on 1 process, and r = 1
  equals plain SGD on the reference loss."""
  port = str(_free_port())
  _wait([_worker(tmp_path / "two.npz", "--process-id", str(i), "--port", port)
         for i in range(2)])
  _wait([_worker(tmp_path / "one.npz")])
  two, one = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
  for name in one.files:
    np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-6, err_msg=name)
  sys.path.insert(0, str(WORKER.parent))
  import _head_worker as worker  # pylint: disable=import-outside-toplevel
  data = worker.problem()
  params, centres = jnp.asarray(data["params"]), jnp.asarray(data["centres"])
  for i in range(worker.STEPS):
    grads = jax.grad(lambda p, c: losses.margin_softmax_loss(
        jnp.asarray(data["inputs"][i]) @ p, c, jnp.asarray(data["labels"][i]),
        s=worker.SCALE, m2=worker.M2)[0], argnums=(0, 1))(params, centres)
    params, centres = params - worker.LR * grads[0], centres - worker.LR * grads[1]
  np.testing.assert_allclose(two["full_params"], params, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(two["full_centres"], centres, rtol=1e-5, atol=1e-5)
  assert np.abs(two["sampled_centres"] - two["full_centres"]).max() > 1e-3

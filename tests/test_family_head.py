"""The family after ArcFace in the trainer's head equals its pure reference in arcjax.losses.

Every kind on every path of the head (the whole block, chunked, class-sharded over 8
devices with and without chunks, Partial FC, pmap's per-device rows): the loss, its
gradients w.r.t. the embeddings and the centres (sub-centres), and the state update
(CurricularFace's t, AdaFace's norm statistics) are those of `losses.*_loss` on the whole
batch at once. The references are themselves checked against float64 transcriptions of the
official codes in tests/test_family.py.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from arcjax import errors, head, losses, sharding

B, D, C, K = 32, 16, 45, 3  # 45 classes: 48 over 8 devices, 6 per shard
N = 8
STATE = {"curricularface": {"t": 0.2}, "adaface": {"norm_mean": 18.0, "norm_std": 6.0}}
# (kind, config overrides): each kind with its defaults, and a second extension past π.
CASES = [("subcenter_arcface", {}), ("subcenter_arcface", {"extension": "fallback"}),
         ("curricularface", {}), ("curricularface", {"extension": "monotone"}),
         ("magface", {}), ("magface", {"extension": "monotone"}),
         ("adaface", {}), ("elasticface_arc", {}), ("elasticface_cos", {})]
KINDS = [kind for kind, changes in CASES if not changes]


def _data(seed=0):
  """Embeddings with norms from 6 to 60 (MagFace's and AdaFace's ranges and their clips),
  centres (C, d) or sub-centres (C, K, d), labels; the first rows nearly opposite their class
  (targets past θ + m = π)."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(C, D))
  y = rng.integers(0, C, B)
  x = rng.normal(size=(B, D))
  x[:3] = -w[y[:3]] + 0.1 * rng.normal(size=(3, D))
  x *= np.linspace(6.0, 60.0, B)[:, None] / np.linalg.norm(x, axis=1, keepdims=True)
  subcentres = w[:, None, :] + 0.15 * rng.normal(size=(C, K, D))
  return (jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32),
          jnp.asarray(subcentres, jnp.float32), jnp.asarray(y, jnp.int32))


def _centres(kind, data):
  return data[2] if kind == "subcenter_arcface" else data[1]


def _state(kind):
  return {name: jnp.float32(value) for name, value in STATE.get(kind, {}).items()}


def _reference(kind, config, x, w, y, key):
  """(loss, grads (∂x, ∂w), new state) of the pure reference."""
  common = dict(s=config.s, extension=config.extension)
  if kind == "subcenter_arcface":
    fn = lambda a, b: losses.subcenter_arcface_loss(a, b, y, m=config.m, **common)
  elif kind == "curricularface":
    fn = lambda a, b: losses.curricularface_loss(a, b, y, STATE[kind]["t"], m=config.m,
                                                 momentum=config.momentum, **common)
  elif kind == "magface":
    fn = lambda a, b: losses.magface_loss(a, b, y, l_a=config.l_a, u_a=config.u_a,
                                          l_m=config.l_m, u_m=config.u_m,
                                          lambda_g=config.lambda_g, **common)
  elif kind == "adaface":
    stats = (STATE[kind]["norm_mean"], STATE[kind]["norm_std"])
    fn = lambda a, b: losses.adaface_loss(a, b, y, stats, m=config.m, h=config.h,
                                          t_alpha=config.t_alpha, **common)
  else:  # the trainer draws ElasticFace's margins from the second half of split(key)
    fn = lambda a, b: losses.elasticface_loss(a, b, y, jax.random.split(key)[1], m=config.m,
                                              sigma=config.sigma, kind=kind[-3:], **common)
  (loss, aux), grads = jax.jit(jax.value_and_grad(fn, (0, 1), has_aux=True))(x, w)
  state = {}
  if kind == "curricularface":
    state = {"t": aux["t"]}
  elif kind == "adaface":
    state = dict(zip(("norm_mean", "norm_std"), aux["norm_stats"]))
  return loss, grads, state, aux["theta_y"]


def _head_config(sharded=False, chunk_size=0, sample_rate=1.0):
  return ml_collections.ConfigDict(dict(sharded=sharded, chunk_size=chunk_size,
                                        sample_rate=sample_rate))


def _place(mesh, w):
  padded = jnp.pad(w, ((0, head.padded_num_classes(C, N) - C),) + ((0, 0),) * (w.ndim - 1))
  return jax.device_put(padded, jax.sharding.NamedSharding(mesh, jax.P(sharding.AXIS)))


def _trainer_loss(config, head_config, x, w, y, key, mesh=None, strength=1.0):
  """(loss, grads, new state, θ_y) of the trainer's loss (`losses.make_loss_fn` over
  `head.margin_term`), jitted; a sharded head's centres laid out over `mesh`."""
  term = head.margin_term(config, head_config, C, mesh)
  loss_fn = losses.make_loss_fn(config, term, C)
  state = _state(config.kind)
  if mesh is not None:
    w = _place(mesh, w)
  fn = lambda a, b: loss_fn(a, {"centres": b}, y, key, strength, state)
  (loss, aux), grads = jax.jit(jax.value_and_grad(fn, (0, 1), has_aux=True))(x, w)
  if mesh is not None:
    assert grads[1].sharding.spec[0] == sharding.AXIS  # the centres' gradient stays sharded
  grads = (grads[0], np.asarray(grads[1])[:C])
  return loss, grads, aux["loss_state"], aux["theta_y"]


def _assert_matches(got, want):
  (loss, (gx, gw), state, theta), (ref_loss, (ref_gx, ref_gw), ref_state, ref_theta) = got, want
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  for g, r in [(gx, ref_gx), (gw, ref_gw)]:
    r = np.asarray(r)
    np.testing.assert_allclose(np.asarray(g), r, rtol=1e-5, atol=1e-5 * np.abs(r).max())
  assert set(state) == set(ref_state)
  for name in state:
    np.testing.assert_allclose(float(state[name]), float(ref_state[name]), rtol=1e-6,
                               atol=1e-7, err_msg=name)
  np.testing.assert_allclose(np.asarray(theta), np.asarray(ref_theta), atol=1e-5)


@pytest.fixture(scope="module")
def mesh():
  if jax.device_count() < N:
    pytest.skip(f"needs {N} devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  return sharding.make_mesh(jax.devices()[:N])


def test_the_data_reach_past_pi_and_the_norm_clips():
  x, w, subcentres, y = _data()
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
  cos = np.sum(unit(np.asarray(x)) * unit(np.asarray(w))[np.asarray(y)], axis=1)
  assert np.all(np.arccos(cos[:3]) > np.pi - 0.5)  # past π − m for m = 0.5
  closest = np.einsum("bd,bkd->bk", unit(np.asarray(x)),
                      unit(np.asarray(subcentres))[np.asarray(y)]).max(axis=1)
  assert np.all(np.arccos(closest[:3]) > np.pi - 0.5)
  norms = np.linalg.norm(np.asarray(x), axis=1)
  assert norms.min() < 10.0 < norms.max()  # MagFace's l_a = 10 clips some rows


@pytest.mark.parametrize("chunk_size", [0, 7])
@pytest.mark.parametrize("kind, changes", CASES)
def test_every_kind_whole_and_chunked_equals_its_reference(kind, changes, chunk_size):
  data, key = _data(), jax.random.key(1)
  config = losses.loss_config(kind, **changes)
  x, y, w = data[0], data[3], _centres(kind, data)
  _assert_matches(_trainer_loss(config, _head_config(chunk_size=chunk_size), x, w, y, key),
                  _reference(kind, config, x, w, y, key))


@pytest.mark.parametrize("chunk_size", [0, 1])
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_sharded_over_8_devices_equals_its_reference(mesh, kind, chunk_size):
  """The centres (sub-centres: whole classes) split over 8 devices, the global batch's
  statistics and margins, the per-row values gathered (MagFace's norm gradient summed back);
  chunks of 1 class stream a class's sub-centres together."""
  data, key = _data(2), jax.random.key(2)
  config = losses.loss_config(kind)
  x, y, w = data[0], data[3], _centres(kind, data)
  _assert_matches(
      _trainer_loss(config, _head_config(sharded=True, chunk_size=chunk_size), x, w, y, key,
                    mesh),
      _reference(kind, config, x, w, y, key))


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_under_pmap_equals_its_reference(mesh, kind):
  """pmap's layout: each device its rows and a replicated head; the loss's statistics over
  the global batch through the step's collectives; the mean of the devices' losses and
  gradients is the whole batch's."""
  del mesh
  data, key = _data(3), jax.random.key(3)
  config = losses.loss_config(kind)
  x, y, w = data[0], data[3], _centres(kind, data)
  par = sharding.parallelism_for(ml_collections.ConfigDict(dict(parallel="pmap")),
                                 _head_config())
  loss_fn = losses.make_loss_fn(config, head.margin_term(config, _head_config(), C), C,
                                collectives=par.collectives)
  state = _state(kind)

  def per_device(a, b, labels):
    (loss, aux), grads = jax.value_and_grad(
        lambda a, b: loss_fn(a, {"centres": b}, labels, key, 1.0, state), (0, 1),
        has_aux=True)(a, b)
    # The trainer's reduction: gradients w.r.t. shared values averaged over the devices.
    loss, grad_w = jax.lax.pmean((loss, grads[1]), sharding.AXIS)
    return loss, (grads[0], grad_w), aux["loss_state"], aux["theta_y"]

  split = lambda v: v.reshape(N, -1, *v.shape[1:])
  loss, (gx, gw), state, theta = jax.pmap(per_device, axis_name=sharding.AXIS,
                                          in_axes=(0, None, 0))(split(x), w, split(y))
  for name, value in state.items():  # every device holds the same state
    np.testing.assert_array_equal(np.asarray(value), np.asarray(value)[0])
  # Each device's ∂x is of the mean of its own b rows: the global mean's is 1/N of it.
  got = (loss[0], (np.asarray(gx).reshape(B, D) / N, gw[0]),
         {name: value[0] for name, value in state.items()}, np.asarray(theta).reshape(B))
  _assert_matches(got, _reference(kind, config, x, w, y, key))


@pytest.mark.parametrize("kind", ["subcenter_arcface", "curricularface", "magface"])
def test_sampling_every_class_equals_unsampled_and_keeps_whole_classes(mesh, kind):
  """Partial FC samples whole classes (a class's K sub-centres together): a rate whose sample
  is the whole shard gives the reference; a real sample leaves whole classes untouched."""
  data, key = _data(4), jax.random.key(4)
  config = losses.loss_config(kind)
  x, y, w = data[0], data[3], _centres(kind, data)
  assert head.num_sampled(6, B, 0.1) == 6
  _assert_matches(_trainer_loss(config, _head_config(sharded=True, sample_rate=0.1), x, w, y,
                                key, mesh),
                  _reference(kind, config, x, w, y, key))
  if kind != "subcenter_arcface":
    return
  num_classes, rate = 1000, 0.3  # 125 a shard, 38 sampled
  rng = np.random.default_rng(5)
  big = jnp.asarray(rng.normal(size=(num_classes, K, D)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, num_classes, B), jnp.int32)
  term = head.margin_term(config, _head_config(sharded=True, sample_rate=rate), num_classes,
                          mesh)
  loss_fn = losses.make_loss_fn(config, term, num_classes)
  placed = jax.device_put(big, jax.sharding.NamedSharding(mesh, jax.P(sharding.AXIS)))
  grads = np.asarray(jax.jit(jax.grad(lambda b: loss_fn(x, {"centres": b}, labels, key)[0]))(
      placed))
  touched = np.abs(grads).sum(axis=2) > 0  # (classes, K)
  sampled = touched.any(axis=1)
  assert sampled.reshape(N, -1).sum(axis=1).tolist() == [38] * N
  assert sampled[np.asarray(labels)].all()
  # Within a sampled class only the closest sub-centre of each row moves; a class is never
  # cut: every sub-centre of an unsampled class stays still.
  assert not touched[~sampled].any()


def test_warmup_anneals_the_target_logit_from_the_plain_cosine():
  """α = 0: the plain normalised softmax (MagFace: plus its g, whose norm gradient remains);
  α = 0.3: (1 − α)·cos θ_y + α·cos(θ_y + m_i), checked in float64 for ElasticFace."""
  x, w, _, y = _data(6)
  key = jax.random.key(6)
  for kind in ("magface", "elasticface_arc", "adaface", "subcenter_arcface"):
    config = losses.loss_config(kind, margin_warmup_steps=100)
    centres = w[:, None, :] if kind == "subcenter_arcface" else w
    got = _trainer_loss(config, _head_config(chunk_size=7), x, centres, y, key,
                        strength=jnp.float32(0.0))
    plain = lambda a, b: losses.margin_softmax_loss(a, b, y, s=config.s, m1=1.0, m2=0.0, m3=0.0)
    if kind == "magface":
      norm = lambda a: jnp.clip(jnp.linalg.norm(a, axis=1), config.l_a, config.u_a)
      plain = lambda a, b, plain=plain: (
          plain(a, b)[0] + config.lambda_g * jnp.mean(norm(a) / config.u_a**2 + 1 / norm(a)),
          {})
    if kind == "adaface":  # its every cosine clamped to ±(1 − 1e-3): none is, here
      assert float(jnp.max(jnp.abs(head.l2_normalize(x) @ head.l2_normalize(w).T))) < 0.999
    value, grads = jax.value_and_grad(lambda a, b: plain(a, b)[0], (0, 1))(x, w)
    grads = (grads[0], grads[1][:, None, :] if kind == "subcenter_arcface" else grads[1])
    np.testing.assert_allclose(float(got[0]), float(value), rtol=1e-5, err_msg=kind)
    for g, r in zip(got[1], grads):
      np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5,
                                 atol=1e-5 * float(jnp.max(jnp.abs(r))), err_msg=kind)
  config = losses.loss_config("elasticface_arc", margin_warmup_steps=100)
  loss = _trainer_loss(config, _head_config(), x, w, y, key, strength=jnp.float32(0.3))[0]
  margin = np.asarray(config.m + config.sigma * jax.random.normal(
      jax.random.split(key)[1], (B,)), np.float64)
  xn, wn = (np.asarray(v, np.float64) / np.linalg.norm(np.asarray(v, np.float64), axis=1,
                                                       keepdims=True) for v in (x, w))
  cos, rows, labels = xn @ wn.T, np.arange(B), np.asarray(y)
  logits = cos.copy()
  target = cos[rows, labels]
  logits[rows, labels] = 0.7 * target + 0.3 * np.cos(np.arccos(target) + margin)
  logits *= config.s
  top = logits.max(axis=1)
  want = np.mean(np.log(np.exp(logits - top[:, None]).sum(axis=1)) + top - logits[rows, labels])
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_elasticface_draws_apart_from_partial_fc_and_the_same_on_every_shard(mesh):
  """The margins come from the step key's second half, the same on every device (the sharded
  loss equals the reference with those margins); another key draws others."""
  data = _data(7)
  config = losses.loss_config("elasticface_arc")
  x, w, y = data[0], data[1], data[3]
  one = _trainer_loss(config, _head_config(sharded=True), x, w, y, jax.random.key(0), mesh)[0]
  other = _trainer_loss(config, _head_config(sharded=True), x, w, y, jax.random.key(1), mesh)[0]
  assert float(one) != float(other)
  np.testing.assert_allclose(float(one), float(_reference(
      "elasticface_arc", config, x, w, y, jax.random.key(0))[0]), rtol=1e-5)


@pytest.mark.parametrize("kind, changes, match", [
    ("curricularface", dict(margin_warmup_steps=10), "CurricularFace takes no margin warm-up"),
    ("magface", dict(m2=0.5), "config.loss.m2 is not read by loss kind 'magface'"),
    ("elasticface_cos", dict(extension="monotone"), "monotone already"),
    ("adaface", dict(extension="fallback"), "extension must be one of"),
    ("subcenter_arcface", dict(subcenters=0), "subcenters must be an int >= 1"),
    ("magface", dict(u_a=5.0), "u_a must be > l_a"),
    ("curricularface", dict(momentum=1.5), "momentum must be in"),
    ("adaface", dict(t_alpha=-0.1), "t_alpha must be in"),
    ("elasticface_arc", dict(sigma=-1.0), "sigma must be"),
    ("subcenter_arcface", dict(m=4.0), "m must be in"),
])
def test_a_value_a_kind_cannot_honour_is_refused_in_one_line(kind, changes, match):
  config = losses.loss_config(kind)
  for name, value in changes.items():
    config[name] = value  # a field the kind does not hold is added, as an override would
  with pytest.raises(errors.ConfigError, match=match):
    losses.check_config(config)


def test_adaface_needs_a_global_batch_of_two():
  with pytest.raises(errors.ConfigError, match="batch_size >= 2"):
    losses.check_config(losses.loss_config("adaface"), batch_size=1)
  losses.check_config(losses.loss_config("adaface"), batch_size=2)


def test_configs_hold_the_papers_defaults_and_only_their_fields():
  want = {
      "subcenter_arcface": dict(s=64.0, m=0.5, subcenters=3),
      "curricularface": dict(s=64.0, m=0.5, momentum=0.01),
      "magface": dict(s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0),
      "adaface": dict(s=64.0, m=0.4, h=0.333, t_alpha=0.01),
      "elasticface_arc": dict(s=64.0, m=0.5, sigma=0.05),
      "elasticface_cos": dict(s=64.0, m=0.35, sigma=0.05),
  }
  for kind, values in want.items():
    config = losses.loss_config(kind)
    warmup = {} if kind == "curricularface" else {"margin_warmup_steps": 0}
    assert config.to_dict() == {"kind": kind, **values, "extension": "official", **warmup}
    losses.check_config(config)
  assert losses.loss_config("arcface").kind == "margin"
  assert losses.active_terms(losses.loss_config("magface")) == ("softmax", "g")
  assert losses.active_terms(losses.loss_config("magface", lambda_g=0.0)) == ("softmax",)
  assert losses.num_subcenters(losses.loss_config("subcenter_arcface", subcenters=5)) == 5
  assert losses.num_subcenters(losses.loss_config("arcface")) == 0


# --- The trainer: 8 devices give the one-device parameters and state --------------------

NUM_CLASSES, IMAGE_SHAPE = 10, (16, 16, 1)


def _train_config(kind, parallel, **head_changes):
  from configs import default  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  config.model.embedding_dim = 32
  config.train.update(batch_size=32, warmup_steps=0, schedule="piecewise", lr=0.1,
                      parallel=parallel)
  # s = 16: a smoother loss on random labels, so that rounding that differs with the
  # summation order is not amplified past the tolerance in 3 steps (as tests/test_train.py).
  config.loss = losses.loss_config(kind, s=16.0)
  config.head.update(head_changes)
  return config


@functools.cache
def _trained(kind, parallel, head_items=()):
  """(host state, metrics) after 3 steps of the compiled train step; a sharded head's rows
  without padding."""
  from arcjax import train  # pylint: disable=import-outside-toplevel
  config = _train_config(kind, parallel, **dict(head_items))
  par = sharding.parallelism_for(config.train, config.head)
  init = functools.partial(train.create_train_state, config, num_classes=NUM_CLASSES,
                           image_shape=IMAGE_SHAPE,
                           num_shards=par.num_devices if config.head.sharded else 1)
  state = par.init(init, jax.random.key(0))
  step = train.make_train_step(config, par, NUM_CLASSES, state)
  state, history = par.to_step(state), []
  rng = np.random.default_rng(0)
  for _ in range(3):
    batch = {"image": rng.integers(0, 256, (32, *IMAGE_SHAPE), dtype=np.uint8),
             "label": rng.integers(0, NUM_CLASSES, 32).astype(np.int32)}
    state, metrics = step(state, par.put_batch(batch))
    history.append(par.scalars(metrics))
  host = par.host(par.to_global(state))
  rows = sharding.match_tree(host, sharding.CLASS_ROWS)
  return jax.tree.map(lambda v, is_rows: v[:NUM_CLASSES] if is_rows else v, host, rows), history


@pytest.mark.slow
@pytest.mark.parametrize("kind, parallel, head_changes", [
    ("curricularface", "pmap", {}), ("adaface", "pmap", {}), ("elasticface_arc", "pmap", {}),
    ("magface", "pmap", {}),
    ("subcenter_arcface", "mesh", dict(sharded=True, chunk_size=1)),
    ("curricularface", "mesh", dict(sharded=True, chunk_size=1)),
    ("adaface", "mesh", dict(sharded=True)),
    ("magface", "mesh", dict(sharded=True, chunk_size=3)),
])
def test_the_trainer_on_8_devices_gives_the_one_device_parameters_and_state(
    mesh, kind, parallel, head_changes):
  del mesh
  one, one_metrics = _trained(kind, "none")
  many, many_metrics = _trained(kind, parallel, tuple(sorted(head_changes.items())))
  assert set(one.loss_state) == set(STATE.get(kind, {}))
  initial = losses.init_loss_state(losses.loss_config(kind))
  for name in one.loss_state:  # the state moved, and identically
    assert float(one.loss_state[name]) != float(initial[name])
  for name in ("params", "batch_stats", "head", "opt_state", "loss_state"):
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=5e-5),
                 getattr(many, name), getattr(one, name))
  for key in ("loss", "grad_norm", "theta_y_deg", *(f"loss_state/{n}" for n in one.loss_state)):
    np.testing.assert_allclose([m[key] for m in many_metrics], [m[key] for m in one_metrics],
                               rtol=1e-5, err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["adaface", "elasticface_arc"])
def test_a_pack_of_seeds_gives_each_run_its_solo_state(kind):
  """Runs of a family kind that differ in their seed train vmapped as one pack
  (`train.make_pack_step`), each run's state as its solo step's."""
  from arcjax import train  # pylint: disable=import-outside-toplevel
  configs = [_train_config(kind, "none") for _ in range(2)]
  configs[1].seed = 1
  par = sharding.parallelism_for(configs[0].train, configs[0].head)
  states = [train.create_train_state(config, jax.random.key(config.seed),
                                     num_classes=NUM_CLASSES, image_shape=IMAGE_SHAPE)
            for config in configs]
  rng = np.random.default_rng(0)
  batches = [{"image": rng.integers(0, 256, (32, *IMAGE_SHAPE), dtype=np.uint8),
              "label": rng.integers(0, NUM_CLASSES, 32).astype(np.int32)} for _ in range(2)]
  stacked = train.stack_runs(states)  # before the solo steps donate the states
  pack = train.make_pack_step(configs, par, NUM_CLASSES, stacked)
  solo = [train.make_train_step(config, par, NUM_CLASSES, state)(state, par.put_batch(batch))[0]
          for config, state, batch in zip(configs, states, batches)]
  packed, _ = pack(stacked, par.put_batch(
      {name: np.stack([b[name] for b in batches]) for name in batches[0]}, runs=True),
      [True, True])
  for want, got in zip(solo, train.unstack_runs(packed)):
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
                 got.loss_state, want.loss_state)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=5e-5),
                 got.head, want.head)

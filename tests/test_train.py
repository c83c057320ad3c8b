"""The train state and step: every device layout gives the one-device parameters, bf16,
the margin warm-up, per-term gradients, and the config checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arcjax import data, errors
from arcjax import head as head_lib
from arcjax import losses, models, optim, sharding, train
from arcjax.data import pipeline
from configs import ablations, default

NUM_CLASSES, IMAGE_SHAPE = 10, (16, 16, 1)


def _small_config(**train_changes):
  config = default.get_config()
  config.model.embedding_dim = 32
  config.train.batch_size = 32
  config.train.warmup_steps = 0
  config.train.schedule = "piecewise"
  config.train.update(train_changes)
  return config


def _batches(num_steps: int, batch_size: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
  rng = np.random.default_rng(seed)
  return [{"image": rng.integers(0, 256, (batch_size, *IMAGE_SHAPE), dtype=np.uint8),
           "label": rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32)}
          for _ in range(num_steps)]


def _train(config, batches) -> tuple[train.TrainState, list[dict]]:
  """Runs `batches` through the compiled step of `config`; the final state on the host
  (a sharded head's centres and their optimiser state without padding) and the metrics."""
  par = sharding.parallelism_for(config.train, config.head)
  init = functools.partial(train.create_train_state, config, num_classes=NUM_CLASSES,
                           image_shape=IMAGE_SHAPE,
                           num_shards=par.num_devices if config.head.sharded else 1)
  state = par.init(init, jax.random.key(0))
  step = train.make_train_step(config, par, NUM_CLASSES, state)
  state, history = par.to_step(state), []
  for batch in batches:
    state, metrics = step(state, par.put_batch(batch))
    history.append(par.scalars(metrics))
  host = par.host(par.to_global(state))
  rows = sharding.match_tree(host, sharding.CLASS_ROWS)
  return jax.tree.map(lambda x, is_rows: x[:NUM_CLASSES] if is_rows else x, host, rows), history


@pytest.mark.parametrize("mode, head, changes", [
    ("mesh", {}, {}),
    ("pmap", {}, {}),
    ("mesh", dict(sharded=True), {}),                # 10 classes padded to 16 over 8 devices
    ("mesh", dict(sharded=True, chunk_size=1), {}),  # and streamed a centre at a time
    ("mesh", dict(chunk_size=3), {}),
    ("pmap", dict(chunk_size=4), {}),
    ("mesh", dict(sharded=True), dict(grad_clip=0.05)),   # the global norm over the shards
    ("mesh", dict(sharded=True), dict(intra_weight=1.0, inter_weight=1.0)),
])
def test_device_layouts_give_the_one_device_parameters(mode, head, changes):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  config = _small_config(lr=0.1, grad_clip=changes.get("grad_clip", 0.0))
  # s = 16 rather than 64: a smoother loss on random labels, so that the rounding that
  # differs with the summation order is not amplified past the tolerance in 3 steps.
  config.loss = losses.loss_config("arcface", s=16.0, **{k: v for k, v in changes.items()
                                                         if k.endswith("_weight")})
  batches = _batches(3, 32)
  config.train.parallel = "none"
  one, one_metrics = _train(config, batches)
  config.train.parallel = mode
  config.head.update(head)
  many, many_metrics = _train(config, batches)
  assert int(one.step) == int(many.step) == 3
  # Something moved: the comparison is not of initial values.
  initial = train.create_train_state(config, jax.random.key(0), num_classes=NUM_CLASSES,
                                     image_shape=IMAGE_SHAPE)
  assert np.abs(one.head["centres"] - np.asarray(initial.head["centres"])).max() > 1e-4
  # atol 5e-5: float32 sums over 8 shards round differently from one sum (seen: 1.3e-5
  # on a conv kernel of O(1) after 3 updates of O(1e-2)); a missing mean is off by O(1).
  for name in ("params", "batch_stats", "head", "opt_state"):
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=5e-5),
                 getattr(many, name), getattr(one, name))
  for key in ("loss", "grad_norm", "theta_y_deg", "param_norm"):
    np.testing.assert_allclose([m[key] for m in many_metrics], [m[key] for m in one_metrics],
                               rtol=1e-5, err_msg=key)


def _step_fn(config, dtype="float32"):
  """step(state, batch) of `config` with its values closed over, as a solo run's."""
  config.model.dtype = dtype
  term = head_lib.margin_term(config.loss, config.head, NUM_CLASSES)
  step = functools.partial(
      train.train_step, model=models.make_model(config.model),
      make_optimizer=functools.partial(optim.make_optimizer, config.train),
      make_schedule=functools.partial(optim.make_schedule, config.train),
      make_loss_fn=functools.partial(losses.make_loss_fn, config.loss, term, NUM_CLASSES),
      normalization=models.normalization(config.model),
      collectives=sharding.parallelism_for(config.train, config.head).collectives)
  hparams = train.step_hparams(config)
  return lambda state, batch: step(state, batch, hparams)


def _state(config):
  return train.create_train_state(config, jax.random.key(0), num_classes=NUM_CLASSES,
                                  image_shape=IMAGE_SHAPE)


def test_bfloat16_backbone_float32_head_and_loss():
  config = _small_config()
  batch = _batches(1, 8)[0]
  state = _state(config)
  step16, step32 = _step_fn(config, "bfloat16"), _step_fn(config, "float32")
  jaxpr = str(jax.make_jaxpr(step16)(state, batch))
  convs = [line for line in jaxpr.splitlines() if "conv_general_dilated" in line]
  assert convs and all("bf16" in line for line in convs), convs[:2]
  new_state, metrics = jax.jit(step16)(state, batch)
  _, metrics32 = jax.jit(step32)(state, batch)
  assert metrics["loss"].dtype == jnp.float32
  for leaf in jax.tree.leaves((new_state.params, new_state.head, new_state.batch_stats)):
    assert leaf.dtype == jnp.float32
  # bf16 has 8 mantissa bits: the same loss to about 1%, and different from f32 at all.
  np.testing.assert_allclose(float(metrics["loss"]), float(metrics32["loss"]), rtol=2e-2)
  assert float(metrics["loss"]) != float(metrics32["loss"])


def test_margin_warmup_reaches_the_full_margin_at_the_stated_step():
  config = _small_config()
  config.loss = losses.loss_config("arcface", margin_warmup_steps=4)
  step = jax.jit(_step_fn(config))
  state, strengths, losses_seen = _state(config), [], []
  for batch in _batches(6, 8):
    state, metrics = step(state, batch)
    strengths.append(float(metrics["margin_strength"]))
    losses_seen.append(float(metrics["loss"]))
  np.testing.assert_allclose(strengths, [0.25, 0.5, 0.75, 1.0, 1.0, 1.0], rtol=1e-6)
  # At step 1 (α = 1/4) the loss is that of ψ = cos θ + (ψ_arcface − cos θ)/4.
  first = _batches(1, 8)[0]
  plain = losses.loss_config("arcface", margin_warmup_steps=0)
  config.loss = plain
  full = float(jax.jit(_step_fn(config))(_state(config), first)[1]["loss"])
  config.loss = losses.loss_config("norm_softmax")
  none = float(jax.jit(_step_fn(config))(_state(config), first)[1]["loss"])
  assert none < losses_seen[0] < full


def test_every_term_reports_its_gradient_on_the_embeddings():
  config = _small_config()
  config.loss = losses.loss_config("norm_softmax", intra_weight=2.0, inter_weight=1.0)
  state = _state(config)
  batch = _batches(1, 8)[0]
  _, metrics = jax.jit(_step_fn(config))(state, batch)
  assert {"grad_norm/softmax", "grad_norm/intra", "grad_norm/inter", "grad_norm/softmax_centres",
          "grad_norm/intra_centres", "grad_norm/inter_centres"} <= set(metrics)
  # The Inter term does not depend on the embeddings at all, only on the centres.
  assert float(metrics["grad_norm/inter"]) == 0.0 and float(metrics["grad_norm/intra"]) > 0.0
  assert float(metrics["grad_norm/inter_centres"]) > 0.0
  # Intra's: ‖∂(w·mean θ_y/π)/∂x‖ computed independently.
  model = models.make_model(config.model)
  embeddings = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                           models.normalize_images(batch["image"], (127.5, 128.0)), train=True,
                           rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"])[0]
  def intra(x):
    x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
    w = state.head["centres"][batch["label"]]
    w = w / jnp.linalg.norm(w, axis=1, keepdims=True)
    return 2.0 * jnp.mean(jnp.arccos(jnp.sum(x * w, 1))) / jnp.pi
  np.testing.assert_allclose(float(metrics["grad_norm/intra"]),
                             float(jnp.linalg.norm(jax.grad(intra)(embeddings))), rtol=1e-3)


def test_state_finite_and_param_norm_are_measured_on_the_new_state():
  config = _small_config(lr=1e30, momentum=0.0, weight_decay=0.0)
  _, metrics = jax.jit(_step_fn(config))(_state(config), _batches(1, 8)[0])
  assert float(metrics["param_norm"]) > 1e20 or float(metrics["state_finite"]) == 0.0
  config = _small_config(lr=0.01)
  new_state, metrics = jax.jit(_step_fn(config))(_state(config), _batches(1, 8)[0])
  assert float(metrics["state_finite"]) == 1.0
  trainable = {"backbone": new_state.params, "head": new_state.head}
  np.testing.assert_allclose(float(metrics["param_norm"]),
                             np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2)
                                         for x in jax.tree.leaves(trainable))), rtol=1e-5)


@pytest.mark.parametrize("section, key, value, message", [
    ("train", "steps", -5, "config.train.steps must be an int > 0, got -5"),
    ("train", "parallel", "ddp", "config.train.parallel must be one of"),
    ("loss", "s", 0.0, "s must be > 0"),
    ("train", "warmup_steps", 10**6, "config.train.warmup_steps"),
    ("train", "lr", float("inf"), "config.train.lr must be finite"),
    ("model", "dtype", "float16", "config.model.dtype"),
    ("model", "name", "resnet", "config.model.name"),
    ("data", "name", "imagenet", "config.data.name"),
    ("data", "num_holdout_identities", 1, "num_holdout_identities"),
    ("angles", "probe_size", -1, "config.angles.probe_size"),
    ("wandb", "mode", "loud", "config.wandb.mode"),
    ("train", "max_param_norm", 0.0, "max_param_norm"),
])
def test_check_config_names_bad_values(section, key, value, message):
  config = default.get_config()
  config[section][key] = value
  with pytest.raises(errors.ConfigError, match=message):
    train.check_config(config)


def test_cross_section_rules_are_checked_once():
  config = default.get_config()
  config.head.sharded, config.train.parallel = True, "pmap"
  with pytest.raises(errors.ConfigError, match="runs under train.parallel='mesh'"):
    train.check_config(config)
  config = default.get_config()
  config.data.update(sampler="pk", pk_identities=8, pk_images=4)
  with pytest.raises(errors.ConfigError, match="pk_identities × pk_images = train.batch_size"):
    train.check_config(config)
  train.check_config(default.get_config())


# --- Packs ---------------------------------------------------------------------------


def _pack_configs():
  """Four runs that differ in what a pack may vary: seeds, margins (the identity, ArcFace with a
  warm-up, CM2), an Intra-weighted row, Triplet with the P×K sampler, lr and weight decay."""
  rows = [("norm_softmax", 0, {}), ("arcface,warmup=3", 1, {"lr": 0.05}),
          ("cm2,intra=2", 2, {"weight_decay": 1e-3}), ("triplet", 3, {"lr": 0.2})]
  configs = []
  for row, seed, train_changes in rows:
    config = ablations.get_config(row)
    config.seed = seed
    config.model.embedding_dim = 32
    config.train.batch_size = 32
    config.train.update(train_changes)
    if config.data.sampler == "pk":
      config.data.pk_identities = 8
    configs.append(config)
  return configs


def test_pack_key_splits_on_what_a_pack_shares():
  configs = _pack_configs()
  assert len({train.pack_key(config) for config in configs}) == 1
  changed = _pack_configs()[1]
  changed.loss.inter_form = "cosine"
  assert train.pack_key(changed) != train.pack_key(configs[0])
  par = sharding.parallelism_for(configs[0].train, configs[0].head)
  train.check_pack(configs, par)
  for section, key, value in (("train", "batch_size", 64), ("model", "name", "mobilefacenet"),
                              ("train", "steps", 10), ("loss", "triplet_margin", 0.2),
                              ("train", "momentum", 0.5), ("eval", "every", 7)):
    bad = _pack_configs()
    bad[2][section][key] = value
    with pytest.raises(errors.ConfigError, match=rf"run 2 of the pack differs from run 0 in "
                                                 rf"config\.{section}\.{key} "):
      train.check_pack(bad, par)
  with pytest.raises(errors.ConfigError, match="not 'pmap'"):
    train.check_pack(configs, sharding.Parallelism("pmap", par.mesh))
  sharded = _pack_configs()
  for config in sharded:
    config.head.sharded = True
  with pytest.raises(errors.ConfigError, match="head.sharded=False"):
    train.check_pack(sharded, par)


def test_run_metrics_keep_a_runs_own_terms():
  configs = _pack_configs()
  row = {"loss": 1.0, "grad_norm": 2.0, "lr": 0.1, **{f"loss/{t}": 1.0 for t in losses.TERMS},
         **{f"grad_norm/{t}{end}": 1.0 for t in losses.TERMS for end in ("", "_centres")}}
  assert set(train.run_metrics(configs[0], row)) == {"loss", "grad_norm", "lr", "loss/softmax"}
  assert set(train.run_metrics(configs[2], row)) == {
      "loss", "grad_norm", "lr", "loss/softmax", "loss/intra", "grad_norm/softmax",
      "grad_norm/softmax_centres", "grad_norm/intra", "grad_norm/intra_centres"}
  assert set(train.run_metrics(configs[3], row)) == {"loss", "grad_norm", "lr", "loss/triplet"}


def _relative(got, want) -> float:
  got, want = np.asarray(got, np.float64).ravel(), np.asarray(want, np.float64).ravel()
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


@pytest.mark.slow
@pytest.mark.parametrize("run_axis", [False, True])
def test_a_pack_steps_each_run_as_its_solo_step(run_axis):
  """Five steps of a pack of four runs on Omniglot, each run's batches its own stream: from the
  same state, each run's update in the pack is its solo step's (every leaf, every metric); a
  run that is not active keeps its state bit for bit. `run_axis`: the runs laid over a mesh
  axis of their own (`Parallelism.for_pack`: 4 × 2 of the 8 devices), each run's batch over
  its 2 devices where its solo step splits it over 8.

  Compared step by step (the solo step applied to the pack's state), not as two free
  trajectories: the first steps of this setting amplify a float rounding about tenfold per
  step, so that two trajectories of different XLA programs (a pack's, or 8 devices') part
  by O(1e-2) after 5 steps whatever the formulation.
  """
  configs = _pack_configs()
  par = sharding.parallelism_for(configs[0].train, configs[0].head)
  datasets = data.get_datasets(configs[0].data)
  image_shape = (*configs[0].data.image_size, 1)

  def init(config):
    return par.init(functools.partial(train.create_train_state, config,
                                      num_classes=datasets.num_classes, image_shape=image_shape),
                    jax.random.key(config.seed))

  def stream(config):
    with pipeline.batches(datasets.train, global_batch_size=config.train.batch_size,
                          seed=config.seed, image_size=tuple(config.data.image_size),
                          flip=config.data.flip, sampler=config.data.sampler,
                          pk_identities=config.data.pk_identities,
                          pk_images=config.data.pk_images) as batches:
      return [next(batches) for _ in range(5)]

  streams = [stream(config) for config in configs]
  pack_par = par.for_pack(len(configs)) if run_axis else par
  assert (sharding.RUN_AXIS in pack_par.mesh.axis_names) == (run_axis and jax.device_count() > 1)
  states = [init(config) for config in configs]
  states = jax.device_put(train.stack_runs(states), pack_par.run_shardings(states[0]))
  pack = train.make_pack_step(configs, pack_par, datasets.num_classes, states)
  solos = [train.make_train_step(config, par, datasets.num_classes, init(config))
           for config in configs]
  worst = 0.0
  for step in range(5):
    before = train.unstack_runs(par.host(states))
    batch = {key: np.stack([s[step][key] for s in streams]) for key in ("image", "label")}
    active = np.asarray([True, step != 2, True, True])
    states, metrics = pack(states, pack_par.put_batch(batch, runs=True), active)
    after, rows = train.unstack_runs(pack_par.host(states)), pack_par.run_scalars(metrics)
    for i, config in enumerate(configs):
      if not active[i]:  # stopped, or ahead of the others: untouched
        jax.tree.map(np.testing.assert_array_equal, after[i], before[i])
        continue
      solo_state, solo_metrics = solos[i](jax.device_put(before[i]),
                                          par.put_batch(streams[i][step]))
      solo_state = par.host(solo_state)
      assert int(after[i].step) == step + 1 - (i == 1 and step >= 2)
      wants = {sharding.leaf_path(path): leaf
               for path, leaf in jax.tree_util.tree_leaves_with_path(solo_state)}
      for path, got in jax.tree_util.tree_leaves_with_path(after[i]):
        name = sharding.leaf_path(path)
        want = wants[name]
        if not np.issubdtype(want.dtype, np.floating):
          np.testing.assert_array_equal(got, want, err_msg=name)
        elif name.endswith("fc/bias"):
          # BatchNorm follows the FC: its bias has no gradient but a rounding, different in
          # every XLA program; measured against the FC kernel's scale.
          scale = np.abs(wants[name.replace("fc/bias", "fc/kernel")]).max()
          assert np.abs(got - want).max() <= 1e-4 * scale, (i, step, name)
        else:
          worst = max(worst, _relative(got, want))
          # Measured: 7.8e-6 at most (a conv kernel's, summed over 32·32·32 positions).
          assert _relative(got, want) <= 3e-5, (i, step, name, _relative(got, want))
      own = train.run_metrics(config, rows[i])
      solo_row = par.scalars(solo_metrics)
      assert set(own) == set(solo_row), (i, set(own) ^ set(solo_row))
      for name, value in solo_row.items():
        np.testing.assert_allclose(own[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
  print(f"largest relative difference of a leaf to its solo step: {worst:.1e}")

"""The optimiser and learning-rate schedules against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arcjax import errors, optim
from configs import default


def _small_config(**train_changes):
  config = default.get_config()
  config.train.warmup_steps = 0
  config.train.schedule = "piecewise"
  config.train.update(train_changes)
  return config


def test_piecewise_schedule_matches_hand_values():
  config = _small_config(lr=0.1, steps=100, warmup_steps=10, lr_boundaries=(40, 70))
  schedule = optim.make_schedule(config.train)
  expected = {0: 0.0, 5: 0.05, 10: 0.1, 39: 0.1, 40: 0.01, 69: 0.01, 70: 0.001, 99: 0.001}
  for step, lr in expected.items():
    np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-6, err_msg=f"step {step}")


def test_poly_schedule_matches_insightface():
  config = _small_config(lr=0.2, steps=110, warmup_steps=10, schedule="poly")
  schedule = optim.make_schedule(config.train)
  for step in (0, 3, 10, 30, 60, 109):
    # insightface's PolyScheduler: linear warm-up, then base · (1 − progress)².
    expected = (0.2 * step / 10 if step < 10 else 0.2 * (1 - (step - 10) / 100) ** 2)
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5, atol=1e-9,
                               err_msg=f"step {step}")


def test_sgd_decays_kernels_not_batchnorm_or_bias():
  config = _small_config(lr=0.5, weight_decay=0.01, momentum=0.9)
  tx = optim.make_optimizer(config.train)
  params = {"backbone": {"kernel": jnp.full((3, 2), 2.0), "bn": {"scale": jnp.full((2,), 2.0)}},
            "head": {"centres": jnp.full((4, 2), 3.0), "bias": jnp.full((4,), 1.0)}}
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  # PyTorch SGD: v = g + wd·w (first step), w ← w − lr·v; no decay on 1-D parameters.
  np.testing.assert_allclose(updates["backbone"]["kernel"], -0.5 * (1 + 0.01 * 2.0), rtol=1e-6)
  np.testing.assert_allclose(updates["head"]["centres"], -0.5 * (1 + 0.01 * 3.0), rtol=1e-6)
  np.testing.assert_allclose(updates["backbone"]["bn"]["scale"], -0.5, rtol=1e-6)
  np.testing.assert_allclose(updates["head"]["bias"], -0.5, rtol=1e-6)
  # Second step: momentum 0.9 on the same gradient.
  updates, _ = tx.update(grads, state, params)
  np.testing.assert_allclose(updates["backbone"]["bn"]["scale"], -0.5 * 1.9, rtol=1e-6)


def test_gradient_clipping_bounds_the_update():
  config = _small_config(lr=1.0, weight_decay=0.0, momentum=0.0, grad_clip=1.0)
  tx = optim.make_optimizer(config.train)
  params = {"backbone": {"w": jnp.zeros((2, 2))}, "head": {"centres": jnp.zeros((1, 2))}}
  grads = {"backbone": {"w": jnp.full((2, 2), 3.0)}, "head": {"centres": jnp.full((1, 2), 4.0)}}
  updates, _ = tx.update(grads, tx.init(params), params)
  norm = np.sqrt(4 * 9 + 2 * 16)
  np.testing.assert_allclose(updates["backbone"]["w"], -3.0 / norm, rtol=1e-6)


def test_fractional_boundaries_follow_the_run_length():
  """(0.625, 0.875) of 32 000 steps are the paper's 20K and 28K; of 8 steps, 5 and 7."""
  for steps, want in ((32_000, [20_000, 28_000]), (8, [5, 7]), (4, [2, 3])):
    config = _small_config(steps=steps, lr_boundaries=(0.625, 0.875))
    optim.check_config(config.train)
    assert optim.boundary_steps(config.train) == want
  schedule = optim.make_schedule(_small_config(steps=8, lr=0.1, lr_boundaries=(0.625, 0.875)).train)
  np.testing.assert_allclose([float(schedule(t)) for t in (4, 5, 7)], [0.1, 0.01, 0.001],
                             rtol=1e-6)


@pytest.mark.parametrize("optimizer, schedule", [("sgd", "piecewise"), ("sgd", "poly"),
                                                 ("adamw", "poly")])
def test_traced_lr_and_weight_decay_give_the_same_updates(optimizer, schedule):
  """A pack builds the optimiser inside its step from per-run (lr, weight_decay): the state is
  the same structure whatever the values, and each lane updates as the hand-written rule."""
  config = _small_config(optimizer=optimizer, schedule=schedule, steps=10, warmup_steps=2,
                         lr_boundaries=(0.5,) if schedule == "piecewise" else (),
                         momentum=0.9)
  params = {"backbone": {"kernel": jnp.full((3, 2), 2.0), "bn": {"scale": jnp.full((2,), 2.0)}},
            "head": {"centres": jnp.full((4, 2), 3.0)}}
  grads = jax.tree.map(jnp.ones_like, params)
  lrs, decays = jnp.asarray([0.1, 0.5]), jnp.asarray([0.0, 0.01])
  state = optim.make_optimizer(config.train).init(params)
  assert (jax.tree.structure(state) == jax.tree.structure(optim.make_optimizer(
      config.train, {"lr": lrs[0], "weight_decay": decays[0]}).init(params)))

  def lane(lr, decay, count):
    values = {"lr": lr, "weight_decay": decay}
    tx = optim.make_optimizer(config.train, values)
    lane_state = jax.tree.map(lambda x: x, state)
    for _ in range(count):
      updates, lane_state = tx.update(grads, lane_state, params)
    return updates["backbone"]["kernel"][0, 0], optim.make_schedule(config.train, values)(count - 1)

  kernel_updates, rates = jax.jit(jax.vmap(lane, in_axes=(0, 0, None)), static_argnums=2)(
      lrs, decays, 4)
  for i in range(2):
    lr, decay = float(lrs[i]), float(decays[i])
    # The 4th update (count 3, past the 2 warm-up steps): the schedule's rate at step 3.
    rate = (lr if schedule == "piecewise" else lr * (1 - (3 - 2) / 8) ** 2)
    np.testing.assert_allclose(float(rates[i]), rate, rtol=1e-6)
    if optimizer == "sgd":  # v_t = Σ 0.9^k (1 + wd·2): the update is −rate·v_4
      velocity = sum(0.9 ** k for k in range(4)) * (1 + decay * 2.0)
      np.testing.assert_allclose(float(kernel_updates[i]), -rate * velocity, rtol=1e-5)
    else:  # Adam on a constant gradient: m̂/√v̂ = 1; decoupled decay rate·wd·w
      np.testing.assert_allclose(float(kernel_updates[i]), -rate * (1 + decay * 2.0), rtol=1e-4)


@pytest.mark.parametrize("changes, message", [
    (dict(lr=float("inf")), "config.train.lr must be finite"),
    (dict(lr=0.0), "config.train.lr must be finite and > 0"),
    (dict(steps=100, lr_boundaries=(40, 100)), "not all below train.steps=100"),
    (dict(steps=100, lr_boundaries=(70, 40)), "increasing steps"),
    (dict(steps=100, lr_boundaries=(0.5, 60)), "all fractions"),
    (dict(steps=100, warmup_steps=100), "warmup_steps"),
    (dict(momentum=1.0), "momentum"),
    (dict(optimizer="lion"), "optimizer"),
    (dict(grad_clip=float("nan")), "grad_clip"),
])
def test_bad_values_are_named_before_anything_compiles(changes, message):
  with pytest.raises(errors.ConfigError, match=message):
    optim.check_config(_small_config(**changes).train)

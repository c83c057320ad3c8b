"""The trainer: schedules, optimiser, the data-parallel step, bf16, NaN stop, exact resume."""

import functools
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from arcjax import losses
from arcjax import parallel
from arcjax import train
from configs import default

REPO = pathlib.Path(__file__).resolve().parents[1]
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


def _train(config, mode: str, batches) -> tuple[train.TrainState, list[dict]]:
  """Runs `batches` through the step of `mode`; the final state on the host and the metrics.

  A sharded head's centres (and their optimiser state) come back without their padding.
  """
  sharded = config.head.sharded
  par = parallel.parallel_for(mode, shard_head=sharded)
  state = train.create_train_state(config, jax.random.key(0), NUM_CLASSES, IMAGE_SHAPE,
                                   num_shards=par.num_devices if sharded else 1)
  state = par.put_state(par.from_host(state))
  step = train.make_train_step(config, par, NUM_CLASSES)
  history = []
  for batch in batches:
    state, metrics = step(state, par.put_batch(batch))
    history.append(jax.tree.map(float, par.local_state(metrics)))
  unpad = lambda path, x: x[:NUM_CLASSES] if path[-1] == jax.tree_util.DictKey("centres") else x
  return jax.tree_util.tree_map_with_path(unpad, par.local_state(state)), history


def test_piecewise_schedule_matches_hand_values():
  config = _small_config(lr=0.1, steps=100, warmup_steps=10, lr_boundaries=(40, 70))
  schedule = train.make_schedule(config.train)
  expected = {0: 0.0, 5: 0.05, 10: 0.1, 39: 0.1, 40: 0.01, 69: 0.01, 70: 0.001, 99: 0.001}
  for step, lr in expected.items():
    np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-6, err_msg=f"step {step}")


def test_poly_schedule_matches_insightface():
  config = _small_config(lr=0.2, steps=110, warmup_steps=10, schedule="poly")
  schedule = train.make_schedule(config.train)
  for step in (0, 3, 10, 30, 60, 109):
    # insightface's PolyScheduler: linear warm-up, then base · (1 − progress)².
    expected = (0.2 * step / 10 if step < 10 else 0.2 * (1 - (step - 10) / 100) ** 2)
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5, atol=1e-9,
                               err_msg=f"step {step}")


def test_sgd_decays_kernels_not_batchnorm_or_bias():
  config = _small_config(lr=0.5, weight_decay=0.01, momentum=0.9)
  tx = train.make_optimizer(config.train)
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
  tx = train.make_optimizer(config.train)
  params = {"backbone": {"w": jnp.zeros((2, 2))}, "head": {"centres": jnp.zeros((1, 2))}}
  grads = {"backbone": {"w": jnp.full((2, 2), 3.0)}, "head": {"centres": jnp.full((1, 2), 4.0)}}
  updates, _ = tx.update(grads, tx.init(params), params)
  norm = np.sqrt(4 * 9 + 2 * 16)
  np.testing.assert_allclose(updates["backbone"]["w"], -3.0 / norm, rtol=1e-6)


@pytest.mark.parametrize("mode, head", [
    ("mesh", {}),
    ("pmap", {}),
    ("mesh", dict(sharded=True)),                  # 10 classes padded to 16 over 8 devices
    ("mesh", dict(sharded=True, chunk_size=1)),    # and streamed a centre at a time
    ("mesh", dict(chunk_size=3)),
    ("pmap", dict(chunk_size=4)),
])
def test_data_parallel_and_head_layouts_match_one_device(mode, head):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  config = _small_config(lr=0.1)
  # s = 16 rather than 64: a smoother loss on random labels, so that the rounding that
  # differs with the summation order is not amplified past the tolerance in 3 steps.
  config.loss = losses.loss_config("arcface", s=16.0)
  batches = _batches(3, 32)
  one, one_metrics = _train(config, "none", batches)
  config.head.update(head)
  many, many_metrics = _train(config, mode, batches)
  assert int(one.step) == int(many.step) == 3
  # Something moved: the comparison is not of initial values.
  initial = train.create_train_state(config, jax.random.key(0), NUM_CLASSES, IMAGE_SHAPE)
  assert np.abs(one.head["centres"] - np.asarray(initial.head["centres"])).max() > 1e-4
  # atol 5e-5: float32 sums over 8 shards round differently from one sum (seen: 1.3e-5
  # on a conv kernel of O(1) after 3 updates of O(1e-2)); a missing pmean is off by O(1).
  for name in ("params", "batch_stats", "head", "opt_state"):
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=5e-5),
                 getattr(many, name), getattr(one, name))
  for key in ("loss", "grad_norm", "theta_y_deg"):
    np.testing.assert_allclose([m[key] for m in many_metrics], [m[key] for m in one_metrics],
                               rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("changes, match", [
    (dict(head=dict(sharded=True), train=dict(parallel="pmap")), "parallel='mesh'"),
    (dict(head=dict(sample_rate=0.5)), "needs config.head.sharded=True"),
    (dict(head=dict(sample_rate=0.0, sharded=True)), "sample_rate must be in"),
    (dict(head=dict(chunk_size=-2)), "chunk_size=-2"),
    (dict(head=dict(sharded=True), loss=dict(intra_weight=1.0)), "Intra and Inter"),
    (dict(head=dict(chunk_size=64), loss=losses.loss_config("softmax").to_dict()),
     "plain softmax"),
    (dict(head=dict(sharded=True), train=dict(grad_clip=1.0)), "grad_clip"),
])
def test_bad_head_configs_are_named(changes, match):
  config = default.get_config()
  for part, values in changes.items():
    config[part].update(values)
  with pytest.raises(ValueError, match=match):
    train.validate_config(config)


def test_bfloat16_backbone_float32_head_and_loss():
  config = _small_config()
  batch = _batches(1, 8)[0]
  state = train.create_train_state(config, jax.random.key(0), NUM_CLASSES, IMAGE_SHAPE)
  steps = {}
  for dtype in ("float32", "bfloat16"):
    config.model.dtype = dtype
    steps[dtype] = functools.partial(
        train.train_step, model=train.make_model(config.model),
        tx=train.make_optimizer(config.train), loss_fn=losses.make_loss_fn(config.loss),
        schedule=train.make_schedule(config.train))
  jaxpr = str(jax.make_jaxpr(steps["bfloat16"])(state, batch))
  assert "conv_general_dilated" in jaxpr
  convs = [line for line in jaxpr.splitlines() if "conv_general_dilated" in line]
  assert all("bf16" in line for line in convs), convs[:2]
  new_state, metrics = jax.jit(steps["bfloat16"])(state, batch)
  _, metrics32 = jax.jit(steps["float32"])(state, batch)
  assert metrics["loss"].dtype == jnp.float32
  for leaf in jax.tree.leaves((new_state.params, new_state.head, new_state.batch_stats)):
    assert leaf.dtype == jnp.float32
  # bf16 has 8 mantissa bits: the same loss to about 1%, and different from f32 at all.
  np.testing.assert_allclose(float(metrics["loss"]), float(metrics32["loss"]), rtol=2e-2)
  assert float(metrics["loss"]) != float(metrics32["loss"])


def test_validate_config_names_bad_values():
  for section, key, value, message in [
      ("train", "steps", -5, "config.train.steps must be > 0, got -5"),
      ("train", "parallel", "ddp", "config.train.parallel must be one of"),
      ("loss", "s", 0.0, "s must be > 0"),
      ("train", "warmup_steps", 10**6, "config.train.warmup_steps"),
      ("model", "dtype", "float16", "config.model.dtype"),
  ]:
    config = default.get_config()
    config[section][key] = value
    with pytest.raises(ValueError, match=message):
      train.validate_config(config)
  train.validate_config(default.get_config())


def _tiny_run_config(steps: int, checkpoint_every: int, **changes):
  """The default data and model, cut down to seconds."""
  config = default.get_config()
  config.model.embedding_dim = 32
  config.data.max_pairs = 200
  config.train.update(steps=steps, batch_size=32, warmup_steps=0, checkpoint_every=checkpoint_every,
                      log_every=5, keep_checkpoints=10, **changes)
  config.eval.every = 0
  config.eval.batch_size = 100
  config.angles.probe_size = 64
  return config


def _restore_state(workdir: pathlib.Path, step: int | None = None):
  with ocp.CheckpointManager(workdir.resolve() / "checkpoints") as manager:
    step = manager.latest_step() if step is None else step
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return step, restored["state"]


@pytest.mark.slow
def test_nan_loss_stops_run_and_keeps_last_checkpoint(tmp_path, monkeypatch):
  poison_from = 7  # batches from this step on get label -1, which the loss turns into NaN
  real_batches, real_loss = train.pipeline.batches, train.losses.make_loss_fn

  class PoisonedBatches:
    def __init__(self, *args, start_step=0, **kwargs):
      self._batches = real_batches(*args, start_step=start_step, **kwargs)
      self._step = start_step

    def __next__(self):
      batch = next(self._batches)
      if self._step >= poison_from:
        batch["label"][:] = -1
      self._step += 1
      return batch

    def __enter__(self):
      return self

    def __exit__(self, *exc_info):
      self._batches.close()

  def nan_on_negative_labels(config, margin_term=None):
    loss_fn = real_loss(config, margin_term)
    def poisoned(embeddings, head, labels, key=None):
      loss, aux = loss_fn(embeddings, head, jnp.maximum(labels, 0), key)
      return jnp.where(jnp.any(labels < 0), jnp.nan, loss), aux
    return poisoned

  monkeypatch.setenv("WANDB_MODE", "disabled")
  monkeypatch.setattr(train.pipeline, "batches", PoisonedBatches)
  monkeypatch.setattr(train.losses, "make_loss_fn", nan_on_negative_labels)
  config = _tiny_run_config(steps=20, checkpoint_every=5, parallel="none")
  with pytest.raises(train.NonFiniteLossError, match=r"loss is nan at step 8\b.*step 5"):
    train.train_and_evaluate(config, str(tmp_path))
  step, state = _restore_state(tmp_path)
  assert step == 5
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state))
  assert not (tmp_path / "results.json").exists()


def _start(workdir: pathlib.Path, steps: int, *extra: str, devices: int = 2) -> subprocess.Popen:
  command = [sys.executable, "-m", "arcjax.main", "--config=configs/default.py",
             f"--workdir={workdir}", f"--config.train.steps={steps}",
             "--config.train.batch_size=32", "--config.train.warmup_steps=0",
             "--config.train.checkpoint_every=5", "--config.train.keep_checkpoints=20",
             "--config.train.log_every=5",
             "--config.train.parallel=mesh", "--config.model.embedding_dim=32",
             "--config.model.dropout=0.2", "--config.data.max_pairs=200",
             "--config.eval.every=0", "--config.angles.probe_size=64",
             *extra]
  return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          env={**os.environ, "WANDB_MODE": "disabled",
                               "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"})


def _finish(process: subprocess.Popen, timeout: float = 240) -> str:
  output = process.communicate(timeout=timeout)[0].decode()
  assert process.returncode == 0, output[-3000:]
  return output


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
  steps = 60
  reference = _start(tmp_path / "reference", steps)
  _finish(reference)

  killed = tmp_path / "killed"
  process = _start(killed, steps)
  deadline = time.monotonic() + 180
  # orbax renames a finished checkpoint to its step number: kill once one exists.
  while not (killed / "checkpoints" / "10").is_dir():
    assert process.poll() is None, process.communicate()[0].decode()[-3000:]
    assert time.monotonic() < deadline, "no checkpoint within 180 s"
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  interrupted_at, _ = _restore_state(killed)
  assert 10 <= interrupted_at < steps
  assert not (killed / "results.json").exists()

  _finish(_start(killed, steps))
  rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
  train_steps = [row["step"] for row in rows if "train/loss" in row]
  assert train_steps == sorted(set(train_steps)), "resumed run duplicated metric rows"
  _, expected = _restore_state(tmp_path / "reference", steps)
  _, resumed = _restore_state(killed, steps)
  for want, got in zip(jax.tree.leaves(expected), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  results = json.loads((killed / "results.json").read_text())
  assert results["eval"] == json.loads((tmp_path / "reference" / "results.json").read_text())["eval"]


@pytest.mark.slow
def test_resume_on_other_device_count_and_mode(tmp_path):
  process = _start(tmp_path, 10)
  _finish(process)
  process = _start(tmp_path, 15, "--config.train.parallel=pmap", devices=1)
  output = _finish(process)
  step, state = _restore_state(tmp_path)
  assert step == 15 and int(state["step"]) == 15
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [row["step"] for row in rows if "train/loss" in row] == [5, 10, 15], output[-2000:]


@pytest.mark.slow
def test_sharded_sampled_chunked_head_trains_and_resumes_only_as_saved(tmp_path):
  head = ("--config.head.sharded=True", "--config.head.sample_rate=0.5",
          "--config.head.chunk_size=2")
  output = _finish(_start(tmp_path, 10, *head))
  assert "final holdout: verification accuracy" in output
  step, state = _restore_state(tmp_path)
  # 7 training classes padded to 8 over the 2 devices; the padding row never moves.
  assert step == 10 and state["head"]["centres"].shape == (8, 32)
  np.testing.assert_array_equal(state["head"]["centres"][7], 0.0)
  assert np.isfinite(state["head"]["centres"]).all()
  process = _start(tmp_path, 15, *head, devices=1)
  output = process.communicate(timeout=240)[0].decode()
  assert process.returncode != 0
  assert "resumes only as it was saved (here: head.sharded=True on 1 devices)" in output, (
      output[-2000:])
  process = _start(tmp_path, 15, devices=2)  # the same devices, the head no longer sharded
  output = process.communicate(timeout=240)[0].decode()
  assert process.returncode != 0
  assert "resumes only as it was saved (here: head.sharded=False on 2 devices)" in output, (
      output[-2000:])

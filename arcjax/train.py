"""Training: the state, the optimiser, a pure train step, and the loop with checkpoints.

`train_and_evaluate(config, workdir)` runs a whole config. A run writes in its
workdir (the layout in the README): config.json, checkpoints/ (orbax),
metrics.jsonl, angles/theta_step{N:08d}.npz, angle_stats.json and, last,
results.json. Started again with the same command, it resumes from its latest
checkpoint and ends bit-identical (on CPU) to a run never interrupted: the
batch of step t and the dropout key of step t are functions of (seed, t) only.
"""

import functools
import json
import pathlib
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from arcjax import angles
from arcjax import data
from arcjax import evaluation
from arcjax import heads
from arcjax import logging as arcjax_logging
from arcjax import losses
from arcjax import models
from arcjax import parallel
from arcjax.data import pipeline

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("piecewise", "poly")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# insightface's PolyScheduler decays the learning rate as (1 - progress)^2.
POLY_POWER = 2.0


class NonFiniteLossError(FloatingPointError):
  """The training loss (or the gradient norm) became NaN or infinite at a step."""


@flax.struct.dataclass
class TrainState:
  """Everything a step changes; every leaf an array, so one checkpoint holds it all.

  step: () int32, updates done so far (the next batch is batch `step`).
  params, batch_stats: the backbone's variables.
  head: {'centres': (C, d)[, 'bias': (C,)]} float32.
  opt_state: of the optimiser over {'backbone': params, 'head': head}.
  rng: (2,) uint32, raw key data (`jax.random.key_data`) of the run's dropout key.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  head: dict[str, jax.Array]
  opt_state: Any
  rng: jax.Array

  @property
  def trainable(self) -> dict[str, Any]:
    """What the optimiser updates: {'backbone': params, 'head': head}."""
    return {"backbone": self.params, "head": self.head}


def make_model(model_config: ml_collections.ConfigDict, *,
               bn_axis_name: str | None = None) -> nn.Module:
  """The backbone of `config.model`.

  `bn_axis_name`: pmap's device axis. BatchNorm then averages its batch
  statistics over every device (synchronised BN), so that the pmapped step
  computes what one device would on the global batch, as the 'mesh' mode does
  by construction.
  """
  sync_bn = {"bn_axis_name": bn_axis_name} if bn_axis_name else {}
  return models.get_model(model_config.name, embedding_dim=model_config.embedding_dim,
                          dropout=model_config.dropout, dtype=DTYPES[model_config.dtype],
                          **sync_bn)


def make_schedule(train_config: ml_collections.ConfigDict) -> optax.Schedule:
  """Learning rate as a function of the step (the update count, from 0).

  A linear warm-up from 0 to `lr` over `warmup_steps` (none when 0), then
    'piecewise': `lr` divided by 10 at each of `lr_boundaries` (the paper's);
    'poly': lr · (1 − (t − warmup) / (steps − warmup))² (insightface's PolyScheduler).
  """
  lr, warmup, steps = train_config.lr, train_config.warmup_steps, train_config.steps
  if train_config.schedule == "piecewise":
    boundaries = [b - warmup for b in train_config.lr_boundaries]
    main = optax.piecewise_constant_schedule(lr, {b: 0.1 for b in boundaries})
  elif train_config.schedule == "poly":
    main = optax.polynomial_schedule(lr, 0.0, POLY_POWER, steps - warmup)
  else:
    raise ValueError(f"unknown schedule {train_config.schedule!r}; known: {SCHEDULES}")
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _decay_mask(trainable: Any) -> Any:
  # Weight decay on kernels and class centres only: BN scales and offsets, PReLU
  # slopes and biases (all 1-D) are left alone, as is usual since Goyal et al. 2017.
  return jax.tree.map(lambda x: x.ndim > 1, trainable)


def make_optimizer(train_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optimiser of `config.train` over {'backbone': params, 'head': head}.

  'sgd': gradient (clipped to global norm `grad_clip` if > 0) plus
  `weight_decay`·w on ≥2-D parameters, then momentum SGD as PyTorch's
  (v ← μv + g, w ← w − lr·v): the paper's SGD with momentum 0.9 and 5e-4.
  'adamw': clipping, then AdamW with decoupled `weight_decay` (same mask) and
  b1 = `momentum`.
  """
  schedule = make_schedule(train_config)
  clip = ([optax.clip_by_global_norm(train_config.grad_clip)]
          if train_config.grad_clip > 0 else [])
  if train_config.optimizer == "sgd":
    return optax.chain(*clip, optax.add_decayed_weights(train_config.weight_decay, _decay_mask),
                       optax.sgd(schedule, momentum=train_config.momentum))
  if train_config.optimizer == "adamw":
    return optax.chain(*clip, optax.adamw(schedule, b1=train_config.momentum,
                                          weight_decay=train_config.weight_decay,
                                          mask=_decay_mask))
  raise ValueError(f"unknown optimizer {train_config.optimizer!r}; known: {OPTIMIZERS}")


def create_train_state(config: ml_collections.ConfigDict, key: jax.Array, num_classes: int,
                       image_shape: tuple[int, int, int], num_shards: int = 1) -> TrainState:
  """The initial state for `num_classes` identities and images `(H, W, C)`.

  `num_shards`: the devices a sharded head splits the centres over (padded to a multiple).
  """
  model, tx = make_model(config.model), make_optimizer(config.train)
  model_key, head_key, dropout_key = jax.random.split(key, 3)
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(model_key, dummy)
  head = heads.init_head(head_key, num_classes, config.model.embedding_dim,
                         bias=config.loss.bias, num_shards=num_shards)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats, head=head,
      opt_state=tx.init({"backbone": params, "head": head}),
      rng=jax.random.key_data(dropout_key))


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation, loss_fn: losses.LossFn,
               schedule: optax.Schedule, axis_name: str | None = None,
               sharded_head: bool = False) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser update on a batch.

  Args:
    state: the current state.
    batch: {'image': (B, H, W, C) uint8, 'label': (B,) int32}: the whole batch
      under jit, the device's slice under pmap.
    model: the backbone (its `dtype` is the compute dtype; the head and the
      loss always run in float32).
    tx: the optimiser; schedule: its learning rate (for the metrics).
    loss_fn: `losses.make_loss_fn(config.loss)`.
    axis_name: under pmap or shard_map, the device axis: gradients, batch
      statistics and metrics are averaged over it. None under jit (one device,
      or a mesh where XLA makes every batch mean global).
    sharded_head: the state holds this device's shard of the centres, and
      `loss_fn` gives their exact gradient (`heads.margin_term`): it is not
      averaged, and the gradient norm sums the shards'.

  Returns:
    (new state, metrics): scalars 'loss', one 'loss/<term>' per loss term,
    'grad_norm', 'lr' and 'theta_y_deg' (mean target angle, degrees).
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  if axis_name is not None:
    key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
  images = models.normalize_images(batch["image"])

  def compute_loss(trainable):
    embeddings, updates = model.apply(
        {"params": trainable["backbone"], "batch_stats": state.batch_stats}, images,
        train=True, rngs={"dropout": key}, mutable=["batch_stats"])
    loss, aux = loss_fn(embeddings.astype(jnp.float32), trainable["head"], batch["label"], key)
    return loss, (aux, updates.get("batch_stats", {}))

  (loss, (aux, batch_stats)), grads = jax.value_and_grad(compute_loss, has_aux=True)(
      state.trainable)
  metrics = {"loss": loss, "theta_y_deg": jnp.degrees(jnp.mean(aux["theta_y"])),
             **{name: value for name, value in aux.items() if name.startswith("loss/")}}
  averaged = {"backbone": grads["backbone"]} if sharded_head else grads
  if axis_name is not None:
    averaged, batch_stats, metrics = jax.lax.pmean((averaged, batch_stats, metrics), axis_name)
  grad_norm_sq = optax.tree.norm(averaged, squared=True)
  if sharded_head:
    grads = {"backbone": averaged["backbone"], "head": grads["head"]}
    grad_norm_sq += jax.lax.psum(optax.tree.norm(grads["head"], squared=True), axis_name)
  else:
    grads = averaged
  updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
  trainable = optax.apply_updates(state.trainable, updates)
  metrics.update(grad_norm=jnp.sqrt(grad_norm_sq), lr=schedule(state.step))
  new_state = state.replace(step=state.step + 1, params=trainable["backbone"],
                            head=trainable["head"], batch_stats=batch_stats,
                            opt_state=opt_state)
  return new_state, metrics


def make_train_step(config: ml_collections.ConfigDict, par: parallel.DataParallel,
                    num_classes: int) -> Callable[..., Any]:
  """`train_step` of `config` for `num_classes` identities, compiled over `par`'s devices.

  Returns step(state, batch) -> (state, metrics), the state as `par.put_state`
  lays it out (donated), the batch as `par.put_batch` does.
  """
  loss_fn = losses.make_loss_fn(config.loss, heads.margin_term(
      config.loss, config.head, num_classes, par.axis_name))
  return par.wrap(functools.partial(
      train_step, model=make_model(config.model, bn_axis_name=par.axis_name),
      tx=make_optimizer(config.train), loss_fn=loss_fn, schedule=make_schedule(config.train),
      sharded_head=config.head.sharded))


def _positive(name: str, value: Any) -> None:
  if not value > 0:
    raise ValueError(f"config.{name} must be > 0, got {value!r}")


def _non_negative(name: str, value: Any) -> None:
  if not value >= 0:
    raise ValueError(f"config.{name} must be >= 0, got {value!r}")


def _one_of(name: str, value: Any, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"config.{name} must be one of {tuple(allowed)}, got {value!r}")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad value; cheap, runs before anything compiles."""
  train = config.train
  _one_of("model.name", config.model.name, models.MODELS)
  _positive("model.embedding_dim", config.model.embedding_dim)
  if not 0 <= config.model.dropout < 1:
    raise ValueError(f"config.model.dropout must be in [0, 1), got {config.model.dropout!r}")
  _one_of("model.dtype", config.model.dtype, DTYPES)
  losses.make_loss_fn(config.loss)  # validates the margin and the loss weights
  heads.check_head_config(config.head, config.loss)
  if config.head.sharded and train.parallel != "mesh":
    raise ValueError("config.head.sharded=True runs under train.parallel='mesh' (shard_map), "
                     f"got {train.parallel!r}")
  if config.head.sharded and train.grad_clip:
    raise ValueError("config.train.grad_clip > 0 clips by a norm that a sharded head's "
                     "optimiser cannot see whole: use grad_clip=0 with config.head.sharded")
  _one_of("data.name", config.data.name, data.DATA_NAMES)
  _one_of("data.sampler", config.data.sampler, pipeline.SAMPLERS)
  if (config.data.sampler == "pk"
      and config.data.pk_identities * config.data.pk_images != train.batch_size):
    raise ValueError(
        f"config.data.sampler='pk' needs pk_identities × pk_images = train.batch_size; got "
        f"{config.data.pk_identities} × {config.data.pk_images} and {train.batch_size}")
  _positive("train.steps", train.steps)
  _positive("train.batch_size", train.batch_size)
  _one_of("train.optimizer", train.optimizer, OPTIMIZERS)
  _positive("train.lr", train.lr)
  if not 0 <= train.momentum < 1:
    raise ValueError(f"config.train.momentum must be in [0, 1), got {train.momentum!r}")
  _non_negative("train.weight_decay", train.weight_decay)
  _one_of("train.schedule", train.schedule, SCHEDULES)
  boundaries = list(train.lr_boundaries)
  if any(b <= train.warmup_steps for b in boundaries) or boundaries != sorted(set(boundaries)):
    raise ValueError("config.train.lr_boundaries must be increasing steps after the warm-up "
                     f"({train.warmup_steps}), got {tuple(boundaries)}")
  if not 0 <= train.warmup_steps < train.steps:
    raise ValueError(f"config.train.warmup_steps must be in [0, steps={train.steps}), "
                     f"got {train.warmup_steps!r}")
  _non_negative("train.grad_clip", train.grad_clip)
  _one_of("train.parallel", train.parallel, parallel.MODES)
  _positive("train.checkpoint_every", train.checkpoint_every)
  _positive("train.keep_checkpoints", train.keep_checkpoints)
  _positive("train.log_every", train.log_every)
  _non_negative("eval.every", config.eval.every)
  _positive("eval.batch_size", config.eval.batch_size)
  _non_negative("angles.probe_size", config.angles.probe_size)
  _non_negative("angles.every", config.angles.every)
  _one_of("wandb.mode", config.wandb.mode, arcjax_logging.WANDB_MODES)


def _check_finite(pending: list[tuple[int, dict]], par: parallel.DataParallel,
                  checkpoints: ocp.CheckpointManager) -> list[dict[str, float]]:
  """Host values of the steps' metrics; NonFiniteLossError at the first bad one."""
  rows = []
  for step, metrics in pending:
    row = {name: float(value) for name, value in par.local_state(metrics).items()}
    for name in ("loss", "grad_norm"):
      if not np.isfinite(row[name]):
        checkpoints.wait_until_finished()
        raise NonFiniteLossError(
            f"training {name} is {row[name]} at step {step}; stopped before saving: the last "
            f"good checkpoint (step {checkpoints.latest_step()}) in {checkpoints.directory} "
            "is untouched")
    rows.append(row)
  return rows


def _probe_set(source, size: int, seed: int, image_size) -> tuple[np.ndarray, np.ndarray]:
  """A fixed set of `size` training images (N, H, W, C) uint8 and their labels (N,)."""
  indices = np.sort(np.random.default_rng(seed).permutation(len(source))[:size])
  return (pipeline.load_images(source, indices, image_size=image_size),
          np.asarray(source.labels)[indices])


def _embed_fn(model: nn.Module) -> Callable[[Any, np.ndarray], jax.Array]:
  @jax.jit
  def embed(variables, images):
    return model.apply(variables, models.normalize_images(images), train=False)
  return embed


def _embed(embed, variables, images: np.ndarray, batch_size: int) -> np.ndarray:
  """Embeddings (N, d) of images in padded batches of one shape (one compile)."""
  out = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), *chunk.shape[1:]),
                                             chunk.dtype)])
    out.append(np.asarray(embed(variables, padded))[:len(chunk)])
  return np.concatenate(out)


_EVAL_SCALARS = ("accuracy", "accuracy_std", "threshold", "auc")


def evaluate(embed, variables, eval_sets: dict, batch_size: int) -> dict[str, dict[str, float]]:
  """Flip-fused verification of every eval set: {set: {accuracy, accuracy_std, ...}}."""
  results = {}
  for name, pairs in eval_sets.items():
    emb1, emb2 = evaluation.embed_pairs(lambda images: embed(variables, images), pairs.images1,
                                        pairs.images2, batch_size=batch_size)
    verified = evaluation.verify(emb1, emb2, pairs.issame)
    scalars = {key: verified[key] for key in _EVAL_SCALARS}
    scalars.update({key: value for key, value in verified.items()
                    if key.startswith(("val_at_far", "far_at_val"))})
    scalars.update({f"tar_at_far_{far}": tar for far, tar in verified["tar_at_far"].items()})
    results[name] = scalars
  return results


def _record_angles(workdir: pathlib.Path, step: int, embeddings: np.ndarray,
                   centres: np.ndarray, labels: np.ndarray,
                   writer: arcjax_logging.MetricWriter, primary: bool) -> None:
  """θ_y and the nearest non-target angle of the probe set at `step` (arrays + histograms)."""
  theta_target = angles.target_angles(embeddings, centres, labels)
  theta_nearest = angles.nearest_nontarget_angles(embeddings, centres, labels)
  if primary:
    path = workdir / "angles" / f"theta_step{step:08d}.npz"
    path.parent.mkdir(exist_ok=True)
    np.savez(path, theta_target=theta_target, theta_nearest=theta_nearest, labels=labels)
  edges = np.linspace(0.0, 180.0, 91)
  writer.write_histogram(step, "angles/theta_target_deg", np.degrees(theta_target), bins=edges)
  writer.write_histogram(step, "angles/theta_nearest_deg", np.degrees(theta_nearest), bins=edges)


def _angle_steps(config: ml_collections.ConfigDict) -> set[int]:
  steps = config.train.steps
  recorded = {0, steps // 2, steps}
  if config.angles.every:
    recorded.update(range(config.angles.every, steps, config.angles.every))
  return recorded


def _write_json(path: pathlib.Path, value: Any) -> None:
  # Written whole, then renamed, so a reader never sees half a file.
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(value, indent=2))
  tmp.replace(path)


def pixel_baseline(eval_sets: dict) -> dict[str, dict[str, float]]:
  """Verification of every eval set with raw pixels as embeddings (cosine similarity).

  What any model must beat: {set: {accuracy, accuracy_std, auc}}.
  """
  flat = lambda images: np.asarray(images, np.float64).reshape(len(images), -1)
  results = {}
  for name, pairs in eval_sets.items():
    verified = evaluation.verify(flat(pairs.images1), flat(pairs.images2), pairs.issame)
    results[name] = {key: verified[key] for key in ("accuracy", "accuracy_std", "auc")}
  return results


def _eval_line(step: int, results: dict[str, dict[str, float]]) -> str:
  return f"step {step} eval: " + "; ".join(
      f"{name} accuracy {r['accuracy']:.4f} ± {r['accuracy_std']:.4f} (AUC {r['auc']:.4f})"
      for name, r in results.items())


def _check_resumable(checkpoints: ocp.CheckpointManager, config: ml_collections.ConfigDict,
                     par: parallel.DataParallel) -> None:
  """A sharded head's centres are padded to a multiple of the devices: resume on as many."""
  step = checkpoints.latest_step()
  meta = checkpoints.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  saved_sharded = bool(meta.get("sharded"))
  if not (saved_sharded or config.head.sharded):
    return
  if (saved_sharded, meta.get("num_devices")) != (config.head.sharded, par.num_devices):
    raise ValueError(
        f"the checkpoint at step {step} in {checkpoints.directory} was saved with "
        f"head.sharded={saved_sharded} on {meta.get('num_devices')} devices; a sharded head "
        f"resumes only as it was saved (here: head.sharded={config.head.sharded} on "
        f"{par.num_devices} devices)")


def _check_batch_size(config: ml_collections.ConfigDict, par: parallel.DataParallel) -> None:
  batch = config.train.batch_size
  for count, what in ((par.num_devices, "devices"), (jax.process_count(), "processes")):
    if batch % count:
      raise ValueError(f"config.train.batch_size={batch} is not divisible by the {count} {what}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run of `config` in `workdir` and evaluates it.

  Returns:
    The contents of workdir/results.json: {'step', 'train_loss', 'eval': {set:
    {accuracy, accuracy_std, ...}}, 'pixel_baseline': {set: {accuracy,
    accuracy_std, auc}}, 'angle_stats': {...} or None, 'loss': {...}}.

  Raises:
    NonFiniteLossError: the loss or the gradient norm became NaN or inf; the
      checkpoints are left as they were before that step.
  """
  validate_config(config)
  workdir = pathlib.Path(workdir)
  primary = jax.process_index() == 0
  if primary:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

  par = parallel.parallel_for(config.train.parallel, shard_head=config.head.sharded)
  _check_batch_size(config, par)
  datasets = data.get_datasets(config.data)
  image_size = tuple(config.data.image_size) if config.data.image_size else None
  steps = config.train.steps
  step_fn = make_train_step(config, par, datasets.num_classes)

  sample_images = pipeline.load_images(datasets.train, np.arange(min(16, len(datasets.train))),
                                       image_size=image_size)
  record = config.angles.probe_size > 0
  if record:
    probe_images, probe_labels = _probe_set(datasets.train, config.angles.probe_size,
                                            config.seed, image_size)
  num_shards = par.num_devices if config.head.sharded else 1
  state = par.from_host(create_train_state(config, jax.random.key(config.seed),
                                           datasets.num_classes, sample_images.shape[1:],
                                           num_shards))
  checkpoints = ocp.CheckpointManager(
      (workdir / "checkpoints").resolve(),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints,
                                           create=True))
  if checkpoints.latest_step() is not None:
    _check_resumable(checkpoints, config, par)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    state = checkpoints.restore(checkpoints.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]
  start_step = int(parallel.host_copy(state.step))
  if start_step > steps:
    checkpoints.close()
    raise ValueError(f"the latest checkpoint in {checkpoints.directory} is at step {start_step}, "
                     f"past config.train.steps={steps}")

  writer = arcjax_logging.MetricWriter(workdir, config, start_step=start_step, enabled=primary)
  progress = arcjax_logging.Progress(steps, start_step, enabled=primary)
  embed = _embed_fn(make_model(config.model))
  device = jax.local_devices()[0]

  def variables_of(local: TrainState):
    return jax.device_put(({"params": local.params, "batch_stats": local.batch_stats},
                           local.head), device)

  def record_angles(local: TrainState, step) -> dict[str, float | None]:
    """θ records of the probe set, and the angle statistics (Intra2/Inter2 on the holdout)."""
    variables, head = variables_of(local)
    centres = np.asarray(head["centres"])[:datasets.num_classes]  # a sharded head's padding
    embeddings = _embed(embed, variables, probe_images, config.eval.batch_size)
    _record_angles(workdir, step, embeddings, centres, probe_labels, writer, primary)
    unseen = ()
    if datasets.holdout is not None:
      images, labels = datasets.holdout
      unseen = (_embed(embed, variables, images, config.eval.batch_size), labels)
    stats = angles.angle_statistics(embeddings, probe_labels, centres, *unseen)
    writer.write_scalars(step, {f"angles/{name}": value for name, value in stats.items()
                                if value is not None})
    return stats

  def save(state, step):
    checkpoints.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(par.global_state(state)),
        meta=ocp.args.JsonSave({"step": step, "parallel": par.mode,
                                "num_devices": par.num_devices,
                                "sharded": config.head.sharded})))

  baseline = pixel_baseline(datasets.eval_sets)
  progress.write("raw-pixel cosine baseline: " + "; ".join(
      f"{name} accuracy {r['accuracy']:.4f} ± {r['accuracy_std']:.4f} (AUC {r['auc']:.4f})"
      for name, r in baseline.items()))
  angle_steps = _angle_steps(config)
  if start_step == 0:
    writer.write_images(0, {"train/images": sample_images})
    if record:
      record_angles(parallel.host_copy(state), 0)
  state = par.put_state(state)
  pending, rows, last_row = [], [], None
  eval_results: dict[str, dict[str, float]] = {}
  timer_step, timer = start_step, time.monotonic()
  batch_iter = pipeline.batches(
      datasets.train, global_batch_size=config.train.batch_size, seed=config.seed,
      start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count(), image_size=image_size, flip=config.data.flip,
      sampler=config.data.sampler, pk_identities=config.data.pk_identities,
      pk_images=config.data.pk_images)
  try:
    with batch_iter:
      for step in range(start_step + 1, steps + 1):
        state, metrics = step_fn(state, par.put_batch(next(batch_iter)))
        pending.append((step, metrics))
        if step == start_step + 1:  # the first step compiles: time from its end
          jax.block_until_ready(metrics)
          timer_step, timer = step, time.monotonic()
        do_log = step % config.train.log_every == 0 or step == steps
        do_save = step % config.train.checkpoint_every == 0 or step == steps
        do_eval = (config.eval.every and step % config.eval.every == 0) or step == steps
        do_angles = record and step in angle_steps and step < steps  # the end: below
        if not (do_log or do_save or do_eval or do_angles):
          continue
        rows += _check_finite(pending, par, checkpoints)
        pending = []
        if do_log:
          now = time.monotonic()
          images_per_s = ((step - timer_step) * config.train.batch_size / (now - timer)
                          if step > timer_step else float("nan"))
          timer_step, timer = step, now
          last_row = {f"train/{name}": np.mean([row[name] for row in rows])
                      for name in rows[-1]}
          last_row["train/images_per_s"] = images_per_s
          writer.write_scalars(step, last_row)
          progress.update(step, last_row["train/loss"], images_per_s)
          rows = []
        if do_save:
          save(state, step)
        if do_eval and datasets.eval_sets:
          eval_results = evaluate(embed, variables_of(par.local_state(state))[0],
                                  datasets.eval_sets, config.eval.batch_size)
          writer.write_scalars(step, {f"eval/{name}/{key}": value
                                      for name, scalars in eval_results.items()
                                      for key, value in scalars.items()})
          progress.write(_eval_line(step, eval_results))
        if do_angles:
          record_angles(par.local_state(state), step)
        if do_eval or do_angles:  # images/s leaves evaluation and angle records out
          timer_step, timer = step, time.monotonic()
    if start_step == steps and datasets.eval_sets:  # resumed a run that had trained to the end
      eval_results = evaluate(embed, variables_of(par.local_state(state))[0],
                              datasets.eval_sets, config.eval.batch_size)
    angle_stats = None
    if record:
      angle_stats = {"step": steps, **record_angles(par.local_state(state), steps)}
    checkpoints.wait_until_finished()
  finally:
    checkpoints.close()
    progress.close()
    writer.close()

  results = {
      "step": steps,
      "train_loss": None if last_row is None else float(last_row["train/loss"]),
      "eval": eval_results,
      "pixel_baseline": baseline,
      "angle_stats": angle_stats,
      "loss": {"preset": config.loss.preset,
               "terms": {name: config.loss[f"{name}_weight"]
                         for name in ("softmax", "intra", "inter", "triplet")
                         if config.loss[f"{name}_weight"]}},
  }
  if primary:
    if angle_stats is not None:
      _write_json(workdir / "angle_stats.json", angle_stats)
    _write_json(workdir / "results.json", results)
  return results

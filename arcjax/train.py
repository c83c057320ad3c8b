"""Training: the state, a pure train step, and `train_and_evaluate`, a short loop over a workdir.

A new run with `config.train.init_from=W` starts from the backbone of workdir W
(a trained run or a model imported from ONNX), and from its centres when W was
trained on the same classes; `init_from.json` records where it started.

`train_and_evaluate(config, workdir)` runs a whole config in its workdir
(`arcjax.workdir` holds the layout and the run's guarantees). Started again with
the same command, a run resumes from its newest complete checkpoint and ends
bit-identical (on CPU) to a run never interrupted: the batch, the dropout key
and the margin's strength of step t are functions of (seed, t) only.
"""

import contextlib
import datetime
import functools
import hashlib
import time
from typing import Any

import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from arcjax import data
from arcjax import errors
from arcjax import evaluators
from arcjax import head as head_lib
from arcjax import inference
from arcjax import logging as arcjax_logging
from arcjax import losses
from arcjax import margins
from arcjax import models
from arcjax import optim
from arcjax import sharding
from arcjax import workdir
from arcjax.data import pipeline


@flax.struct.dataclass
class TrainState:
  """Everything a step changes; every leaf an array, so one checkpoint holds it all.

  step: () int32, updates done so far (the next batch is batch `step`).
  params, batch_stats: the backbone's variables.
  head: {'centres': (C_pad, d)[, 'bias': (C,)]} float32.
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


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad value; cheap, runs before anything compiles.

  Each section is checked by the module that reads it.
  """
  train = config.train
  for name in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every"):
    if not (isinstance(train[name], int) and train[name] > 0):
      raise errors.ConfigError(f"config.train.{name} must be an int > 0, got {train[name]!r}")
  models.check_config(config.model)
  losses.check_config(config.loss)
  head_lib.check_config(config.head, config.loss)
  data.check_config(config.data, batch_size=train.batch_size)
  optim.check_config(config.train)
  sharding.check_config(config.train, config.head)
  evaluators.check_config(config.eval, config.angles)
  arcjax_logging.check_config(config.wandb)
  if not isinstance(config.train.init_from, str):
    raise errors.ConfigError(f"config.train.init_from must be a workdir path or '', got "
                             f"{config.train.init_from!r}")
  if config.seed < 0:
    raise errors.ConfigError(f"config.seed must be >= 0, got {config.seed}")


def create_train_state(config: ml_collections.ConfigDict, key: jax.Array, *, num_classes: int,
                       image_shape: tuple[int, int, int], num_shards: int = 1) -> TrainState:
  """The initial state for `num_classes` identities and images `(H, W, C)` (jittable).

  `num_shards`: the devices a sharded head splits the centres over (padded to a multiple).
  """
  model, tx = models.make_model(config.model), optim.make_optimizer(config.train)
  model_key, head_key, dropout_key = jax.random.split(key, 3)
  variables = model.init(model_key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  head = head_lib.init_head(head_key, num_classes, config.model.embedding_dim,
                            bias=config.loss.bias, num_shards=num_shards)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    head=head, opt_state=tx.init({"backbone": params, "head": head}),
                    rng=jax.random.key_data(dropout_key))


def _all_finite(tree: Any) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model, tx, loss_fn, schedule,
               margin_warmup_steps: int, normalization: tuple[float, float],
               collectives: sharding.Collectives) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser update on a batch {'image': (B, H, W, C) uint8, 'label': (B,) int32}.

  `normalization`: (mean, std) of the pixels (`models.normalization`).
  `collectives` averages gradients and metrics over pmap's devices (identity
  under jit, where every mean is already over the global batch).

  Returns:
    (new state, metrics): 'loss', 'loss/<term>', 'grad_norm/<term>' and
    'grad_norm/<term>_centres' (‖∂(w·term)/∂x‖ over the batch's embeddings and over the
    centres, with several terms), 'grad_norm', 'lr',
    'margin_strength', 'theta_y_deg' (mean target angle), 'param_norm' and
    'state_finite' (1 when every leaf of the new state is finite).
  """
  key = collectives.fold_device(jax.random.fold_in(jax.random.wrap_key_data(state.rng),
                                                   state.step))
  strength = margins.warmup_strength(state.step + 1, margin_warmup_steps)
  labels = batch["label"]

  def compute_loss(trainable):
    embeddings, updates = model.apply(
        {"params": trainable["backbone"], "batch_stats": state.batch_stats},
        models.normalize_images(batch["image"], normalization), train=True, rngs={"dropout": key},
        mutable=["batch_stats"])
    embeddings = embeddings.astype(jnp.float32)
    loss, aux = loss_fn(embeddings, trainable["head"], labels, key, strength)
    return loss, (aux, updates.get("batch_stats", {}), embeddings)

  (loss, (aux, batch_stats, embeddings)), grads = jax.value_and_grad(
      compute_loss, has_aux=True)(state.trainable)
  metrics = {"loss": loss, "margin_strength": strength,
             "theta_y_deg": jnp.degrees(jnp.mean(aux["theta_y"])),
             **{name: value for name, value in aux.items() if name.startswith("loss/")}}
  if len(loss_fn.weights) > 1:  # how hard each term pulls the embeddings and the centres
    metrics.update(loss_fn.gradient_norms(jax.lax.stop_gradient(embeddings), state.head, labels,
                                          key, strength))
  grads, metrics = collectives.mean((grads, metrics))
  updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
  trainable = optax.apply_updates(state.trainable, updates)
  new_state = state.replace(step=state.step + 1, params=trainable["backbone"],
                            head=trainable["head"], batch_stats=batch_stats, opt_state=opt_state)
  metrics.update(grad_norm=optax.tree.norm(grads), lr=schedule(state.step),
                 param_norm=optax.tree.norm(trainable),
                 state_finite=_all_finite((trainable, opt_state, batch_stats)).astype(jnp.float32))
  return new_state, metrics


def make_train_step(config: ml_collections.ConfigDict, par: sharding.Parallelism,
                    num_classes: int, state: Any):
  """`train_step` of `config` for `num_classes` identities, compiled over `par`'s devices."""
  margin_term = head_lib.margin_term(config.loss, config.head, num_classes, par.mesh)
  step = functools.partial(
      train_step, model=models.make_model(config.model, bn_axis_name=par.bn_axis_name),
      tx=optim.make_optimizer(config.train), schedule=optim.make_schedule(config.train),
      loss_fn=losses.make_loss_fn(config.loss, margin_term, num_classes),
      margin_warmup_steps=config.loss.margin_warmup_steps,
      normalization=models.normalization(config.model), collectives=par.collectives)
  return par.compile(step, state)


# What decides a run's classes: W's centres are its classes' only when all of these agree.
_CLASS_FIELDS = ("name", "path", "num_holdout_identities", "pairs_seed")


def _content_hash(tree: Any) -> str:
  """SHA-256 of a tree of arrays: every leaf's path, dtype, shape and bytes, in path order."""
  digest = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(tree)[0],
                           key=lambda item: jax.tree_util.keystr(item[0])):
    leaf = np.ascontiguousarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)} {leaf.dtype} {leaf.shape}\n".encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def _source_run(config: ml_collections.ConfigDict) -> inference.Run:
  """The run of `config.train.init_from`, refused in one line where its backbone cannot be
  this config's (architecture, embedding width, normalisation, image size)."""
  source = config.train.init_from
  try:
    run = inference.load_run(source)
  except errors.WorkdirError as error:
    raise errors.ConfigError(f"config.train.init_from={source}: {error}") from None
  ours, theirs = config.model, run.config.model
  misfits = [f"model.{field}: {theirs[field]!r} there, {ours[field]!r} here"
             for field in ("name", "embedding_dim", "input_mean", "input_std")
             if theirs[field] != ours[field]]
  size = tuple(config.data.image_size) if config.data.image_size else None
  if size is not None and size != tuple(run.image_shape[:2]):
    misfits.append(f"image size: {tuple(run.image_shape[:2])} there, {size} here")
  if misfits:
    raise errors.ConfigError(f"config.train.init_from={source}: its backbone does not fit this "
                             f"config ({'; '.join(misfits)})")
  return run


def _start_from(run: inference.Run, state: TrainState, config: ml_collections.ConfigDict,
                num_classes: int, image_shape: tuple[int, ...]) -> tuple[TrainState, dict]:
  """`state` with `run`'s backbone, and its centres where the classes match; and the record
  for init_from.json."""
  source = config.train.init_from
  if tuple(run.image_shape) != tuple(image_shape):
    raise errors.ConfigError(f"config.train.init_from={source}: its backbone embeds images "
                             f"{tuple(run.image_shape)}, this run's data gives {tuple(image_shape)}")
  shapes = lambda tree: jax.tree.map(lambda leaf: tuple(leaf.shape), tree)  # noqa: E731
  ours = {"params": state.params, "batch_stats": state.batch_stats}
  if shapes(run.variables) != shapes(ours):
    raise errors.ConfigError(f"config.train.init_from={source}: its backbone's parameters do not "
                             "fit this config's model (another architecture or code version)")

  def put(leaf, value):
    value = np.asarray(value, leaf.dtype)
    return jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda index: value[index])

  loaded = dict(run.variables)
  state = state.replace(params=jax.tree.map(put, state.params, run.variables["params"]),
                        batch_stats=jax.tree.map(put, state.batch_stats,
                                                 run.variables["batch_stats"]))
  differ = [f"data.{field}" for field in _CLASS_FIELDS
            if run.config.data[field] != config.data[field]]
  if not len(run.centres):
    centres = f"fresh: {source} has no centres (an imported model)"
  elif len(run.centres) != num_classes or differ:
    centres = (f"fresh: {source} was trained on {len(run.centres)} classes"
               + (f" of other data ({', '.join(differ)} differ)" if differ else "")
               + f", this run has {num_classes}")
  else:
    padded = np.zeros(state.head["centres"].shape, np.float32)
    padded[:num_classes] = run.centres
    state = state.replace(head={**state.head, "centres": put(state.head["centres"], padded)})
    loaded["centres"] = run.centres
    centres = f"loaded: the same {num_classes} classes"
  record = {"workdir": run.workdir, "step": run.step, "sha256": _content_hash(loaded),
            "hashed": sorted(loaded), "centres": centres,
            "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
  return state, record


def _check_rows(rows: list[dict[str, float]], steps: list[int], max_norm: float,
                last_checkpoint: int | None, directory) -> None:
  """Raises TrainingError at the first step whose loss, gradient or state is not finite, or
  whose parameter norm passed `max_norm`: nothing of it is saved."""
  kept = (f"stopped before saving it: the last checkpoint (step {last_checkpoint}) in {directory} "
          "holds finite values" if last_checkpoint is not None else "no checkpoint was saved")
  for step, row in zip(steps, rows):
    bad = [name for name in ("loss", "grad_norm", "param_norm") if not np.isfinite(row[name])]
    if bad or row["state_finite"] != 1.0:
      problem = f"non-finite {' and '.join(bad) or 'parameters'} at step {step}"
    elif row["param_norm"] > max_norm:
      problem = (f"training diverged: parameter norm {row['param_norm']:.3g} at step {step} "
                 f"passed config.train.max_param_norm={max_norm:g}")
    else:
      continue
    raise errors.TrainingError(f"{problem}; {kept}; lower config.train.lr (or loss.s) and run "
                               "again to resume from there")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir_path: str, *,
                       allow_config_change: bool = False) -> dict[str, Any]:
  """Trains (or resumes) the run of `config` in `workdir_path` and evaluates it.

  Returns the contents of results.json: {'step', 'train_loss', 'eval': {set:
  scalars}, 'pixel_baseline', 'angle_stats' (or None), 'loss'}. Raises an
  `errors.Error` (one line at the command line) for what a user can fix.
  """
  check_config(config)
  directory = workdir.as_path(workdir_path)
  if config.train.init_from and workdir.as_path(config.train.init_from) == directory:
    raise errors.ConfigError("config.train.init_from names the run's own workdir; a resumed run "
                             "starts from its own checkpoint by itself")
  if config.train.init_from and not workdir.has_checkpoint(directory):
    _source_run(config)  # refused here, before anything is written, where it cannot fit
  primary = jax.process_index() == 0
  agree = (lambda ok: bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
           if jax.process_count() > 1 else lambda ok: ok)
  with workdir.open_run(directory, config, allow_changes=allow_config_change, primary=primary,
                        agree=agree):
    return _train(config, directory, primary)


def _train(config, directory, primary: bool) -> dict[str, Any]:
  par = sharding.parallelism_for(config.train, config.head)
  steps, batch_size = config.train.steps, config.train.batch_size
  par.check_batch_size(batch_size)
  datasets = data.get_datasets(config.data)
  if config.data.sampler == "uniform" and batch_size > len(datasets.train):
    raise errors.ConfigError(f"config.train.batch_size={batch_size} is larger than the "
                             f"{len(datasets.train)} training images of {config.data.name}")
  image_size = tuple(config.data.image_size) if config.data.image_size else None
  samples = pipeline.load_images(datasets.train, np.arange(min(16, len(datasets.train))),
                                 image_size=image_size)
  num_classes = datasets.num_classes
  init = functools.partial(create_train_state, config, num_classes=num_classes,
                           image_shape=samples.shape[1:],
                           num_shards=par.num_devices if config.head.sharded else 1)
  key = jax.random.key(config.seed)
  abstract = par.abstract(jax.eval_shape(init, key))
  note = None if config.head.sharded else sharding.replicated_head_note(
      abstract, sharding.device_memory_bytes())
  if note and primary:
    print(note, flush=True)
  checkpoints = workdir.Checkpoints(directory, keep=config.train.keep_checkpoints)
  restored = checkpoints.restore_latest(abstract, sharding.match_tree(abstract, sharding.CLASS_ROWS),
                                        primary=primary)
  state, start = (restored[0], restored[1]["step"]) if restored else (par.init(init, key), 0)
  if not restored and config.train.init_from:  # a resumed run's own checkpoint wins
    state, record = _start_from(_source_run(config), state, config, num_classes,
                                samples.shape[1:])
    if primary:
      workdir.write_json(directory / workdir.INIT_FROM, record)
      print(f"started from {record['workdir']} (step {record['step']}): its backbone; centres "
            f"{record['centres']}", flush=True)
  if start > steps:
    raise errors.ConfigError(f"the latest checkpoint in {directory} is at step {start}, past "
                             f"config.train.steps={steps}")
  meta = {"num_classes": num_classes, "image_shape": list(samples.shape[1:]),
          "num_devices": par.num_devices, "parallel": par.mode}
  writer = arcjax_logging.MetricWriter(directory, config, enabled=primary,
                                       keep_through_step=start if restored else None)
  progress = arcjax_logging.Progress(steps, start, enabled=primary)
  evals = evaluators.Evaluators(config, datasets, writer, progress, directory, primary=primary)
  if start == 0:
    writer.write_images(0, {"train/images": samples})
    evals.run(evaluators.ModelView.of(state, 0, num_classes, par.host))
  step_fn = make_train_step(config, par, num_classes, state)
  state = par.to_step(state)
  stop = errors.StopSignals() if jax.process_count() == 1 else contextlib.nullcontext()
  pending, rows, timer = [], [], (start, time.monotonic())
  try:
    with stop, pipeline.batches(
        datasets.train, global_batch_size=batch_size, seed=config.seed, start_step=start,
        process_index=jax.process_index(), process_count=jax.process_count(),
        image_size=image_size, flip=config.data.flip, sampler=config.data.sampler,
        pk_identities=config.data.pk_identities, pk_images=config.data.pk_images) as batches:
      for step in range(start + 1, steps + 1):
        state, metrics = step_fn(state, par.put_batch(next(batches)))
        pending.append((step, metrics))
        if step == start + 1:  # the first step compiles: time from its end
          jax.block_until_ready(metrics)
          timer = (step, time.monotonic())
        final, stopping = step == steps, getattr(stop, "number", None) is not None
        log = step % config.train.log_every == 0 or final or stopping
        save = step % config.train.checkpoint_every == 0 or final or stopping
        evaluate = evals.due(step) and not final  # the end's evaluation: after the loop
        if not (log or save or evaluate):
          continue
        new_rows = [par.scalars(m) for _, m in pending]
        _check_rows(new_rows, [s for s, _ in pending], config.train.max_param_norm,
                    checkpoints.latest_step(), directory)
        rows, pending = rows + new_rows, []
        if log:
          images_per_s = ((step - timer[0]) * batch_size / (time.monotonic() - timer[1])
                          if step > timer[0] else 0.0)
          means = {f"train/{name}": float(np.mean([row[name] for row in rows])) for name in rows[-1]}
          writer.write_scalars(step, {**means, "train/images_per_s": images_per_s})
          progress.update(step, means["train/loss"], images_per_s)
          rows = []
        global_state = par.to_global(state)
        if evaluate:
          evals.run(evaluators.ModelView.of(global_state, step, num_classes, par.host))
          timer = (step, time.monotonic())  # images/s leaves evaluations out
        if save:
          if final:  # the end's rows, like every step's, reach the disk before its checkpoint
            evals.run(evaluators.ModelView.of(global_state, step, num_classes, par.host), final=True)
          writer.flush()
          checkpoints.save(step, global_state, {"step": step, **meta})
        if stopping and not final:
          checkpoints.wait()
          raise stop.interrupted(f"at step {step}; checkpoint {step} saved in {directory}: run "
                                 "the same command to resume")
    if start == steps:  # resumed a run trained to the end: its results again, rows once
      evals.run(evaluators.ModelView.of(par.to_global(state), steps, num_classes, par.host), final=True)
    checkpoints.wait()
  finally:
    checkpoints.close()
    progress.close()
    writer.close()
  train_loss = next((row["train/loss"] for row in reversed(writer.rows)
                     if "train/loss" in row and row["step"] == steps), None)
  results = {"step": steps, "train_loss": train_loss, **evals.summary(),
             "loss": losses.describe(config.loss)}
  if primary:
    if results["angle_stats"] is not None:
      workdir.write_json(directory / workdir.ANGLE_STATS, results["angle_stats"])
    workdir.write_json(directory / workdir.RESULTS, results)
  return results

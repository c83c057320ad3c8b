"""Training: the state, a pure train step, and `train_and_evaluate`, a short loop over a workdir.

`train_and_evaluate(config, workdir)` runs a whole config in its workdir
(`arcjax.workdir` holds the layout and the run's guarantees). Started again with
the same command, a run resumes from its newest complete checkpoint and ends
bit-identical (on CPU) to a run never interrupted: the batch, the dropout key
and the margin's strength of step t are functions of (seed, t) only.

`train_step(state, batch, hparams)` takes the run's per-run values
(`step_hparams`: learning rate, weight decay, scale, margins, loss weights,
margin warm-up) as an argument. A solo run closes over them as Python numbers:
its compiled step is the one of a step that reads them from the config. A pack
(`make_pack_step`) vmaps the step over a leading run axis of the states, the
batches and those values, traced: the runs of a grid that differ only in them
(`pack_key`) train in one compiled program.
"""

import contextlib
import functools
import json
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
  loss_state: the loss's running state (`losses.init_loss_state`): {} for Table 2's losses.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  head: dict[str, jax.Array]
  opt_state: Any
  rng: jax.Array
  loss_state: dict[str, jax.Array]

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
                    rng=jax.random.key_data(dropout_key),
                    loss_state=losses.init_loss_state(config.loss))


def _all_finite(tree: Any) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def step_hparams(config: ml_collections.ConfigDict) -> dict[str, float | int]:
  """The values of `config` that a step takes as its `hparams` argument, as Python numbers.

  {'lr', 'weight_decay'} (`optim.TRACED_FIELDS`) and {'s', 'm1', 'm2', 'm3',
  'softmax_weight', 'intra_weight', 'inter_weight', 'triplet_weight',
  'margin_warmup_steps'} (`losses.TRACED_FIELDS`): the runs of a pack may differ
  in them.
  """
  return {**{name: config.train[name] for name in optim.TRACED_FIELDS},
          **{name: config.loss[name] for name in losses.TRACED_FIELDS}}


def train_step(state: TrainState, batch: dict[str, jax.Array], hparams: dict[str, Any], *,
               model, make_optimizer, make_schedule, make_loss_fn,
               collectives: sharding.Collectives) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser update on a batch {'image': (B, H, W, C) uint8, 'label': (B,) int32}.

  Args:
    state, batch: the run's.
    hparams: `step_hparams`'s values: Python numbers (a solo run: static) or traced
      scalars (a pack, vmapped over runs: `make_pack_step`).
    model: the backbone (`models.make_model`).
    make_optimizer, make_schedule: hparams -> the optax optimiser, its learning rate
      schedule (`optim.make_optimizer`, `optim.make_schedule` of config.train).
    make_loss_fn: hparams -> `losses.CompositeLoss`.
    collectives: averages gradients and metrics over pmap's devices (identity
      under jit, where every mean is already over the global batch).

  Returns:
    (new state, metrics): 'loss', 'loss/<term>', 'grad_norm/<term>' and
    'grad_norm/<term>_centres' (‖∂(w·term)/∂x‖ over the batch's embeddings and over the
    centres, with several terms), 'grad_norm', 'lr',
    'margin_strength', 'theta_y_deg' (mean target angle), 'param_norm' and
    'state_finite' (1 when every leaf of the new state is finite).
  """
  tx, schedule, loss_fn = make_optimizer(hparams), make_schedule(hparams), make_loss_fn(hparams)
  key = collectives.fold_device(jax.random.fold_in(jax.random.wrap_key_data(state.rng),
                                                   state.step))
  strength = margins.warmup_strength(state.step + 1, hparams["margin_warmup_steps"])
  labels = batch["label"]

  def compute_loss(trainable):
    embeddings, updates = model.apply(
        {"params": trainable["backbone"], "batch_stats": state.batch_stats},
        models.normalize_images(batch["image"]), train=True, rngs={"dropout": key},
        mutable=["batch_stats"])
    embeddings = embeddings.astype(jnp.float32)
    loss, aux = loss_fn(embeddings, trainable["head"], labels, key, strength, state.loss_state)
    return loss, (aux, updates.get("batch_stats", {}), embeddings)

  (loss, (aux, batch_stats, embeddings)), grads = jax.value_and_grad(
      compute_loss, has_aux=True)(state.trainable)
  metrics = {"loss": loss, "margin_strength": strength,
             "theta_y_deg": jnp.degrees(jnp.mean(aux["theta_y"])),
             **{name: value for name, value in aux.items() if name.startswith("loss/")}}
  if len(loss_fn.weights) > 1:  # how hard each term pulls the embeddings and the centres
    metrics.update(loss_fn.gradient_norms(jax.lax.stop_gradient(embeddings), state.head, labels,
                                          key, strength, state.loss_state))
  # A loss's running state is averaged over pmap's devices as the gradients are, so that
  # every device keeps the same.
  loss_state = aux.get("loss_state", state.loss_state)
  grads, metrics, loss_state = collectives.mean((grads, metrics, loss_state))
  updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
  trainable = optax.apply_updates(state.trainable, updates)
  new_state = state.replace(step=state.step + 1, params=trainable["backbone"],
                            head=trainable["head"], batch_stats=batch_stats, opt_state=opt_state,
                            loss_state=loss_state)
  metrics.update(grad_norm=optax.tree.norm(grads), lr=schedule(state.step),
                 param_norm=optax.tree.norm(trainable),
                 state_finite=_all_finite((trainable, opt_state, batch_stats,
                                           loss_state)).astype(jnp.float32))
  return new_state, metrics


def _step_fn(config: ml_collections.ConfigDict, par: sharding.Parallelism, num_classes: int,
             terms: tuple[str, ...] | None = None, per_run_convs: bool = False):
  """`train_step` of `config`'s static parts (the model, the optimiser's and the loss's form,
  the head) for `num_classes` identities, the loss computing `terms` (default: its own)."""
  margin_term = head_lib.margin_term(config.loss, config.head, num_classes, par.mesh)
  model = models.make_model(config.model, bn_axis_name=par.bn_axis_name,
                            per_run_convs=per_run_convs)
  return functools.partial(
      train_step, model=model,
      make_optimizer=functools.partial(optim.make_optimizer, config.train),
      make_schedule=functools.partial(optim.make_schedule, config.train),
      make_loss_fn=functools.partial(losses.make_loss_fn, config.loss, margin_term, num_classes,
                                     terms=terms),
      collectives=par.collectives)


def make_train_step(config: ml_collections.ConfigDict, par: sharding.Parallelism,
                    num_classes: int, state: Any):
  """`train_step` of `config` for `num_classes` identities, compiled over `par`'s devices:
  step(state, batch) -> (state, metrics), the run's `step_hparams` closed over (static)."""
  step, hparams = _step_fn(config, par, num_classes), step_hparams(config)
  return par.compile(lambda state, batch: step(state, batch, hparams), state)


# --- Packs: runs trained together, vmapped over a leading run axis -------------------

# What the runs of a pack may differ in besides `step_hparams`: the seed (each run's initial
# state and dropout key are in its own state), the sampler (the host draws each run's
# batches) and the preset's name (a label: its values are s, m1, m2, m3).
_PER_RUN_FIELDS = ("seed", "data.sampler", "data.pk_identities", "data.pk_images", "loss.preset")


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'train.lr': 0.1, ...}: a config's leaves by dotted path (tuples as lists, as in JSON)."""
  flat = {}
  for name, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f"{prefix}{name}."))
    else:
      flat[f"{prefix}{name}"] = list(value) if isinstance(value, tuple) else value
  return flat


def _shared_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
  per_run = {*_PER_RUN_FIELDS, *(f"train.{name}" for name in optim.TRACED_FIELDS),
             *(f"loss.{name}" for name in losses.TRACED_FIELDS)}
  return {name: value for name, value in _flat(config.to_dict()).items() if name not in per_run}


def pack_key(config: ml_collections.ConfigDict) -> str:
  """What the runs of one pack share, as a string: runs whose keys are equal can train together.

  The runs of a pack may differ in
    - the values a step takes traced (`step_hparams`): train.lr and train.weight_decay;
      loss.s, m1, m2, m3, the four term weights and margin_warmup_steps;
    - the seed (each run's initial state and dropout key live in its own state);
    - the sampler: data.sampler, pk_identities, pk_images (the host draws each run's
      batches from its own stream);
    - loss.preset, a name for the margins' values.
  Every other field splits packs: the model, the data and image size, the batch size,
  the steps and the schedule (kind, boundaries, warm-up), the optimiser and its momentum
  and clipping, the head layout, the parallel mode, the loss's form (normalize, bias,
  gradient, inter_form, triplet_margin), and also what only the host reads (evaluation,
  angles, checkpoints, logging, max_param_norm), which a pack runs on one schedule.
  """
  return json.dumps(_shared_fields(config), sort_keys=True, default=repr)


def check_pack(configs: list[ml_collections.ConfigDict], par: sharding.Parallelism) -> None:
  """Raises ConfigError unless `configs` can train as one pack over `par`.

  A pack runs under 'mesh' or 'none' with a replicated head: under 'pmap' the
  step's arrays already carry the device axis first, and a sharded head lays
  its centres over the mesh axis by rules written for one run (a run axis beside
  the data axis would be needed first).
  """
  if not configs:
    raise errors.ConfigError("a pack needs at least one run")
  if par.mode == "pmap":
    raise errors.ConfigError("a pack of runs trains under train.parallel='mesh' or 'none', "
                             "not 'pmap'")
  first = _shared_fields(configs[0])
  for index, config in enumerate(configs):
    check_config(config)
    if config.head.sharded:
      raise errors.ConfigError("a pack of runs needs config.head.sharded=False (a sharded "
                               "head trains alone)")
    fields = _shared_fields(config)
    differ = sorted(name for name in first.keys() | fields.keys()
                    if first.get(name) != fields.get(name))
    if differ:
      raise errors.ConfigError(
          f"run {index} of the pack differs from run 0 in config.{differ[0]} "
          f"({fields.get(differ[0])!r} vs {first.get(differ[0])!r}), which a pack shares: "
          "see train.pack_key")


def stack_runs(trees: list[Any]) -> Any:
  """Trees of the same structure → one tree whose leaves carry a leading run axis (N, ...)."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def unstack_runs(tree: Any) -> list[Any]:
  """A tree with a leading run axis → its N runs' trees (the inverse of `stack_runs`)."""
  count = jax.tree.leaves(tree)[0].shape[0]
  return [jax.tree.map(lambda leaf, i=i: leaf[i], tree) for i in range(count)]


def make_pack_step(configs: list[ml_collections.ConfigDict], par: sharding.Parallelism,
                   num_classes: int, states: Any, *, per_run_convs: bool | None = None):
  """One compiled step for the N runs of `configs` (`check_pack`), vmapped over a run axis.

  The values the runs share are static, as in a solo step; those they differ in are
  traced. The loss computes the union of the runs' terms, each times its run's weight
  (0 where the run has no such term).

  Args:
    configs: the runs' configs, equal in `pack_key`.
    par: a 'mesh' or 'none' parallelism; each run's batch is split over its devices.
    num_classes: C, the same for every run (the data is shared).
    states: the runs' TrainStates stacked (`stack_runs`), to lay out the compiled step.
    per_run_convs: convolve one run at a time (`models.per_run_conv`) rather than with
      vmap's convolution grouped over the runs; None: on CPU only. On XLA:CPU (jaxlib
      0.10.2, 2 cores, the CPU setting) the grouped convolution made the pack step 2.6-3.9
      times the N solo steps (N = 3-15), per-run convolutions 1.03-1.2 times
      (`benchmarks/pack_step.py`); accelerators run grouped convolutions natively.

  Returns:
    step(states, batches, active) -> (states, metrics): batches {'image': (N, B, H, W, C)
    uint8, 'label': (N, B) int32} (each run's own, stacked; `par.put_batch(..., runs=True)`),
    active (N,) bool. A run that is not active keeps its state bit for bit (its lane still
    computes, on whatever batch it is given). metrics: each of `train_step`'s with a
    leading (N,) axis: `run_metrics` keeps a run's own.

  Each run's update equals its solo step's to float rounding (each leaf within 3e-5 of it,
  relative, tested), not bit for bit: vmapped kernels sum in other orders. Over several steps the training's own
  sensitivity amplifies that rounding (about tenfold a step in the first steps of the CPU
  setting), as it does between any two XLA programs of the same step.
  """
  check_pack(configs, par)
  values = [step_hparams(config) for config in configs]
  shared = {name: value for name, value in values[0].items()
            if all(run[name] == value for run in values)}
  varying = {name: jnp.asarray([run[name] for run in values], jnp.float32)
             for name in values[0] if name not in shared}
  terms = tuple(term for term in losses.TERMS
                if any(term in losses.active_terms(config.loss) for config in configs))
  if per_run_convs is None:
    per_run_convs = jax.default_backend() == "cpu"
  step = _step_fn(configs[0], par, num_classes, terms, per_run_convs)

  def pack_step(states, batches, varying, active):
    run = lambda state, batch, values: step(state, batch, {**shared, **values})
    new_states, metrics = jax.vmap(run)(states, batches, varying)
    keep = lambda new, old: jnp.where(active.reshape(-1, *(1,) * (new.ndim - 1)), new, old)
    return jax.tree.map(keep, new_states, states), metrics

  compiled = par.compile(pack_step, states, runs=True)
  return lambda states, batches, active: compiled(states, batches, varying,
                                                  jnp.asarray(active, bool))


def run_metrics(config: ml_collections.ConfigDict, row: dict[str, float]) -> dict[str, float]:
  """One run's metrics out of its pack's `row`, the names its solo step reports: 'loss/<term>'
  of its own terms, 'grad_norm/<term>[_centres]' of its own terms when it has several."""
  own = losses.active_terms(config.loss)

  def is_own(name):
    kind, _, term = name.partition("/")
    if kind == "loss" and term:
      return term in own
    if kind == "grad_norm" and term:
      return len(own) > 1 and term.removesuffix("_centres") in own
    return True

  return {name: value for name, value in row.items() if is_own(name)}


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

"""Training: the state, a pure train step, and `train_and_evaluate`, a short loop over a workdir.

A new run with `config.train.init_from=W` starts from the backbone of workdir W
(a trained run or a model imported from ONNX, its folded BatchNorms calibrated on
the run's images), and from its centres when W was trained on the same classes
(`start_from`); `init_from.json` records where it started.

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
(`pack_key`) train in one compiled program; `arcjax.pack` runs such a pack, each
run in its own workdir, with the pieces of the solo loop below (`open_run`,
`set_up`, `start_state`, `RunEvents`, `write_results`).
"""

import contextlib
import datetime
import functools
import hashlib
import json
import time
from typing import Any, NamedTuple

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
from arcjax.models import onnx_import


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
  losses.check_config(config.loss, batch_size=train.batch_size)
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
                            bias=config.loss.get("bias", False), num_shards=num_shards,
                            subcenters=losses.num_subcenters(config.loss))
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
  'margin_warmup_steps'} (`losses.TRACED_FIELDS`, those the loss's kind holds): the runs
  of a pack may differ in them.
  """
  return {**{name: config.train[name] for name in optim.TRACED_FIELDS},
          **{name: config.loss[name] for name in losses.TRACED_FIELDS if name in config.loss}}


def train_step(state: TrainState, batch: dict[str, jax.Array], hparams: dict[str, Any], *,
               model, make_optimizer, make_schedule, make_loss_fn,
               normalization: tuple[float, float],
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
    normalization: (mean, std) of the pixels (`models.normalization`).
    collectives: averages gradients and metrics over pmap's devices (identity
      under jit, where every mean is already over the global batch); the loss takes
      them too, for its statistics of the global batch.

  Returns:
    (new state, metrics): 'loss', 'loss/<term>', 'grad_norm/<term>' and
    'grad_norm/<term>_centres' (‖∂(w·term)/∂x‖ over the batch's embeddings and over the
    centres, with several terms), 'grad_norm', 'lr',
    'margin_strength', 'theta_y_deg' (mean target angle), 'param_norm',
    'loss_state/<name>' (a loss's running state, after this step's update) and
    'state_finite' (1 when every leaf of the new state is finite).
  """
  tx, schedule, loss_fn = make_optimizer(hparams), make_schedule(hparams), make_loss_fn(hparams)
  # The loss's key is the same on every device (Partial FC's sample, ElasticFace's margins
  # of the global batch); dropout's differs per device.
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  key = collectives.fold_device(step_key)
  # A loss kind without a warm-up (CurricularFace) holds no margin_warmup_steps: α = 1.
  strength = margins.warmup_strength(state.step + 1, hparams.get("margin_warmup_steps", 0))
  labels = batch["label"]

  def compute_loss(trainable):
    embeddings, updates = model.apply(
        {"params": trainable["backbone"], "batch_stats": state.batch_stats},
        models.normalize_images(batch["image"], normalization), train=True, rngs={"dropout": key},
        mutable=["batch_stats"])
    embeddings = embeddings.astype(jnp.float32)
    loss, aux = loss_fn(embeddings, trainable["head"], labels, step_key, strength,
                        state.loss_state)
    return loss, (aux, updates.get("batch_stats", {}), embeddings)

  (loss, (aux, batch_stats, embeddings)), grads = jax.value_and_grad(
      compute_loss, has_aux=True)(state.trainable)
  metrics = {"loss": loss, "margin_strength": strength,
             "theta_y_deg": jnp.degrees(jnp.mean(aux["theta_y"])),
             **{name: value for name, value in aux.items() if name.startswith("loss/")}}
  if len(loss_fn.weights) > 1:  # how hard each term pulls the embeddings and the centres
    metrics.update(loss_fn.gradient_norms(jax.lax.stop_gradient(embeddings), state.head, labels,
                                          step_key, strength, state.loss_state))
  # A loss's running state is a statistic of the global batch, computed inside the loss with
  # the step's collectives: the same on every device already (a mean over the devices would
  # be wrong for a std). It is logged as 'loss_state/<name>'.
  loss_state = aux.get("loss_state", state.loss_state)
  metrics.update({f"loss_state/{name}": value for name, value in loss_state.items()})
  grads, metrics = collectives.mean((grads, metrics))
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
             terms: tuple[str, ...] | None = None):
  """`train_step` of `config`'s static parts (the model, the optimiser's and the loss's form,
  the head) for `num_classes` identities, the loss computing `terms` (default: its own)."""
  margin_term = head_lib.margin_term(config.loss, config.head, num_classes, par.mesh)
  return functools.partial(
      train_step, model=models.make_model(config.model, bn_axis_name=par.bn_axis_name),
      make_optimizer=functools.partial(optim.make_optimizer, config.train),
      make_schedule=functools.partial(optim.make_schedule, config.train),
      make_loss_fn=functools.partial(losses.make_loss_fn, config.loss, margin_term, num_classes,
                                     terms=terms, collectives=par.collectives),
      normalization=models.normalization(config.model), collectives=par.collectives)


def make_train_step(config: ml_collections.ConfigDict, par: sharding.Parallelism,
                    num_classes: int, state: Any):
  """`train_step` of `config` for `num_classes` identities, compiled over `par`'s devices:
  step(state, batch) -> (state, metrics), the run's `step_hparams` closed over (static)."""
  step, hparams = _step_fn(config, par, num_classes), step_hparams(config)
  return par.compile(lambda state, batch: step(state, batch, hparams), state)


# --- Packs: runs trained together, vmapped over a leading run axis -------------------

# What the runs of a pack may differ in besides `step_hparams`: the seed (each run's initial
# state and dropout key are in its own state), the sampler (the host draws each run's
# batches).
_PER_RUN_FIELDS = ("seed", "data.sampler", "data.pk_identities", "data.pk_images")


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
      batches from its own stream).
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
                   num_classes: int, states: Any, *, vectorize: bool | None = None):
  """One compiled step for the N runs of `configs` (`check_pack`), over a leading run axis.

  The values the runs share are static, as in a solo step; those they differ in are
  traced. The loss computes the union of the runs' terms, each times its run's weight
  (0 where the run has no such term).

  Args:
    configs: the runs' configs, equal in `pack_key`.
    par: a 'mesh' or 'none' parallelism; each run's batch is split over its devices.
    num_classes: C, the same for every run (the data is shared).
    states: the runs' TrainStates stacked (`stack_runs`), to lay out the compiled step.
    vectorize: vmap the step over the run axis (batched matrix products, convolutions
      grouped over the runs), else write each run's step once, one after another, in
      the one program; None: vmap except on CPU. XLA:CPU runs vmap's grouped
      convolutions several times slower than the runs' own one after another
      (`benchmarks/pack_step.py`), and each run's own step there is its solo step's
      arithmetic: its centres after 5 steps at cosine >= 0.99999 to solo, class by
      class, where vmap's summation orders left 0.9997 (the table5 rows, 2 seeds).

  Returns:
    step(states, batches, active) -> (states, metrics): batches {'image': (N, B, H, W, C)
    uint8, 'label': (N, B) int32} (each run's own, stacked; `par.put_batch(..., runs=True)`),
    active (N,) bool. A run that is not active keeps its state bit for bit (its lane still
    computes, on whatever batch it is given). metrics: each of `train_step`'s with a
    leading (N,) axis: `run_metrics` keeps a run's own.

  Each run's update equals its solo step's to float rounding (each leaf within 3e-5 of it,
  relative, tested), not always bit for bit: its traced values (a margin, the learning
  rate) are constants in the solo step, which XLA may fold in another order. Over several
  steps the training's own sensitivity amplifies that rounding (about tenfold a step in
  the first steps of the CPU setting), as it does between any two XLA programs.
  """
  check_pack(configs, par)
  values = [step_hparams(config) for config in configs]
  shared = {name: value for name, value in values[0].items()
            if all(run[name] == value for run in values)}
  varying = {name: jnp.asarray([run[name] for run in values], jnp.float32)
             for name in values[0] if name not in shared}
  terms = tuple(term for term in losses.TERMS
                if any(term in losses.active_terms(config.loss) for config in configs))
  if vectorize is None:
    vectorize = jax.default_backend() != "cpu"
  step = _step_fn(configs[0], par, num_classes, terms)

  def pack_step(states, batches, varying, active):
    run = lambda state, batch, values: step(state, batch, {**shared, **values})
    if vectorize:
      new_states, metrics = jax.vmap(run)(states, batches, varying)
    else:
      take = lambda tree, i: jax.tree.map(lambda leaf: leaf[i], tree)
      new_states, metrics = stack_runs([run(take(states, i), take(batches, i), take(varying, i))
                                        for i in range(len(configs))])
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


def source_run(config: ml_collections.ConfigDict) -> inference.Run:
  """The run of `config.train.init_from`, refused in one line where its backbone cannot be
  this config's (architecture, embedding width, normalisation, image size); the trainer asks
  before it writes anything."""
  source = config.train.init_from
  try:
    run = inference.load_run(source)
  except errors.WorkdirError as error:
    raise errors.ConfigError(f"config.train.init_from={source}: {error}") from None
  if run.folded_batchnorms is None:
    raise errors.ConfigError(
        f"config.train.init_from={source}: imported by an arcjax that did not record which "
        "BatchNorms its graph had folded into its convs (they must be calibrated before "
        f"training): import {run.imported_from} again with python -m arcjax.from_onnx")
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


# The training images (seeded by config.seed) on which `start_from` calibrates an imported
# model's folded BatchNorms: one pass; each channel's statistics over N·H·W values.
CALIBRATION_IMAGES = 256


def start_from(source: inference.Run, state: TrainState, config: ml_collections.ConfigDict,
               datasets: data.Datasets) -> tuple[TrainState, dict]:
  """The state a new run of `config` starts from, and the record for init_from.json.

  `state`: the run's initial state (`create_train_state`), its backbone replaced by
  `source`'s (`source_run(config)`), its centres too where the classes match. An
  imported model's folded BatchNorms (`source.folded_batchnorms`) are first calibrated
  on `CALIBRATION_IMAGES` of `datasets.train` (`onnx_import.calibrate_folded_batchnorms`),
  so that training mode starts from the function the model computes.
  """
  init_from = config.train.init_from
  folded = source.folded_batchnorms
  count = min(CALIBRATION_IMAGES, len(datasets.train)) if folded else 1  # 1: for its shape
  images = pipeline.load_images(
      datasets.train, np.sort(np.random.default_rng(config.seed).choice(
          len(datasets.train), count, replace=False)),
      image_size=tuple(config.data.image_size) if config.data.image_size else None)
  if tuple(source.image_shape) != images.shape[1:]:
    raise errors.ConfigError(f"config.train.init_from={init_from}: its backbone embeds images "
                             f"{tuple(source.image_shape)}, this run's data gives "
                             f"{images.shape[1:]}")
  shapes = lambda tree: jax.tree.map(lambda leaf: tuple(leaf.shape), tree)  # noqa: E731
  ours = {"params": state.params, "batch_stats": state.batch_stats}
  if shapes(source.variables) != shapes(ours):
    raise errors.ConfigError(f"config.train.init_from={init_from}: its backbone's parameters do "
                             "not fit this config's model (another architecture or code version)")
  variables, calibration = source.variables, None
  if folded:
    # float32 and no dropout (whatever the run's): the statistics of the model's function.
    model = models.get_model(config.model.name, embedding_dim=config.model.embedding_dim)
    variables, calibrated = onnx_import.calibrate_folded_batchnorms(
        model, variables, models.normalize_images(images, models.normalization(config.model)),
        folded)
    if jax.process_count() > 1:  # the same values on every process, however each rounded
      variables = multihost_utils.broadcast_one_to_all(variables)
    calibration = {"batchnorms": list(calibrated), "images": count, "seed": config.seed,
                   "left": sorted(set(folded) - set(calibrated))}

  def put(leaf, value):
    value = np.asarray(value, leaf.dtype)
    return jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda index: value[index])

  loaded = dict(source.variables)
  state = state.replace(params=jax.tree.map(put, state.params, variables["params"]),
                        batch_stats=jax.tree.map(put, state.batch_stats,
                                                 variables["batch_stats"]))
  num_classes = datasets.num_classes
  differ = [f"data.{field}" for field in _CLASS_FIELDS
            if source.config.data[field] != config.data[field]]
  if not len(source.centres):
    centres = f"fresh: {init_from} has no centres (an imported model)"
  elif len(source.centres) != num_classes or differ:
    centres = (f"fresh: {init_from} was trained on {len(source.centres)} classes"
               + (f" of other data ({', '.join(differ)} differ)" if differ else "")
               + f", this run has {num_classes}")
  else:
    padded = np.zeros(state.head["centres"].shape, np.float32)
    padded[:num_classes] = source.centres
    state = state.replace(head={**state.head, "centres": put(state.head["centres"], padded)})
    loaded["centres"] = source.centres
    centres = f"loaded: the same {num_classes} classes"
  record = {"workdir": source.workdir, "step": source.step, "sha256": _content_hash(loaded),
            "hashed": sorted(loaded), "centres": centres, "calibration": calibration,
            "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
  return state, record


def input_batches(config: ml_collections.ConfigDict, datasets: data.Datasets, start_step: int):
  """The batches this process trains on from batch `start_step` on (a context manager over
  an iterator of {'image', 'label'}; `pipeline.batches` with the config's data fields)."""
  image_size = tuple(config.data.image_size) if config.data.image_size else None
  return pipeline.batches(
      datasets.train, global_batch_size=config.train.batch_size, seed=config.seed,
      start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count(), image_size=image_size, flip=config.data.flip,
      sampler=config.data.sampler, pk_identities=config.data.pk_identities,
      pk_images=config.data.pk_images)


def due(train_config: ml_collections.ConfigDict, step: int) -> dict[str, bool]:
  """What the loop does after update `step` besides evaluating: {'log': …, 'save': …}.

  Every `log_every` and `checkpoint_every` steps, and both at the last step.
  """
  final = step == train_config.steps
  return {"log": step % train_config.log_every == 0 or final,
          "save": step % train_config.checkpoint_every == 0 or final}


def check_rows(rows: list[dict[str, float]], steps: list[int], max_norm: float,
               last_checkpoint: int | None, directory) -> None:
  """Raises TrainingError at the first step whose loss, gradient or state is not finite, or
  whose parameter norm passed `max_norm`: the loop calls it before any save, so nothing of
  that step is saved."""
  kept = (f"stopped before saving it; the newest checkpoint, step {last_checkpoint} in "
          f"{directory}, was saved from a state checked finite (its files' SHA-256 are checked "
          "when it is restored)" if last_checkpoint is not None else
          "stopped before saving it; no checkpoint was saved")
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

  Everything that can refuse the run is checked before anything is written (but
  the lock): the config, the devices, the data, the state's shapes against the
  newest intact checkpoint, a changed config (`workdir.record_config`).

  Returns the contents of results.json: {'step', 'train_loss', 'eval': {set:
  scalars}, 'pixel_baseline', 'angle_stats' (or None), 'loss'}. Raises an
  `errors.Error` (one line at the command line) for what a user can fix.
  """
  with open_run(config, workdir_path) as (directory, primary, record_config):
    setup = set_up(config, directory, primary)
    try:
      record_config(config, allow_changes=allow_config_change)
      return _train(config, directory, setup, primary)
    finally:
      setup.checkpoints.close()


@contextlib.contextmanager
def open_run(config: ml_collections.ConfigDict, workdir_path: str):
  """Checks `config` and holds its workdir (`workdir.open_run`, every process agreeing).

  Yields (directory, primary, record_config): the workdir's path, whether this
  process writes its files, and `record(config, allow_changes=False)`.
  """
  check_config(config)
  directory = workdir.as_path(workdir_path)
  if config.train.init_from and workdir.as_path(config.train.init_from) == directory:
    raise errors.ConfigError("config.train.init_from names the run's own workdir; a resumed run "
                             "starts from its own checkpoint by itself")
  primary = jax.process_index() == 0
  agree = (lambda ok: bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
           if jax.process_count() > 1 else lambda ok: ok)
  with workdir.open_run(directory, primary=primary, agree=agree) as record_config:
    yield directory, primary, record_config


class Setup(NamedTuple):
  """What `set_up` found: the devices, the data, the state to start from, the checkpoints."""
  par: sharding.Parallelism
  datasets: data.Datasets
  samples: np.ndarray  # (16, H, W, C) uint8: the first training images, for the image log
  init: Any  # key -> the initial TrainState
  abstract: Any  # the state's ShapeDtypeStructs, with their shardings
  checkpoints: workdir.Checkpoints  # its newest step is intact and fits `abstract`
  source: inference.Run | None  # config.train.init_from's run, for a run not resumed


def set_up(config: ml_collections.ConfigDict, directory, primary: bool,
           datasets: data.Datasets | None = None) -> Setup:
  """Every check a run needs before it writes: raises a one-line error, writes nothing (but
  moves a checkpoint that fails its integrity check aside). The caller closes
  `checkpoints`. `datasets`: `config.data`'s, where already loaded (a pack's runs share it)."""
  par = sharding.parallelism_for(config.train, config.head)
  steps, batch_size = config.train.steps, config.train.batch_size
  par.check_batch_size(batch_size)
  datasets = data.get_datasets(config.data) if datasets is None else datasets
  if config.data.sampler == "uniform" and batch_size > len(datasets.train):
    raise errors.ConfigError(f"config.train.batch_size={batch_size} is larger than the "
                             f"{len(datasets.train)} training images of {config.data.name}")
  image_size = tuple(config.data.image_size) if config.data.image_size else None
  samples = pipeline.load_images(datasets.train, np.arange(min(16, len(datasets.train))),
                                 image_size=image_size)
  init = functools.partial(create_train_state, config, num_classes=datasets.num_classes,
                           image_shape=samples.shape[1:],
                           num_shards=par.num_devices if config.head.sharded else 1)
  abstract = par.abstract(jax.eval_shape(init, jax.random.key(config.seed)))
  note = None if config.head.sharded else sharding.replicated_head_note(
      abstract, sharding.device_memory_bytes())
  if note and primary:
    print(note, flush=True)
  checkpoints = workdir.Checkpoints(directory, keep=config.train.keep_checkpoints,
                                    primary=primary)
  try:
    had_checkpoints = bool(checkpoints.all_steps())
    resume_step = checkpoints.newest_intact()
    if had_checkpoints and resume_step is None:
      raise errors.WorkdirError(
          f"no checkpoint in {directory / workdir.CHECKPOINTS} is intact (see the notes above; "
          f"they are kept in {directory / workdir.DAMAGED_CHECKPOINTS}): run again to train "
          "from step 0 here")
    if resume_step is not None:
      _check_shapes(config, directory, checkpoints, resume_step, abstract, datasets.num_classes)
      if resume_step > steps:
        raise errors.ConfigError(f"the latest checkpoint in {directory} is at step {resume_step}, "
                                 f"past config.train.steps={steps}")
    # A resumed run's own checkpoint wins over init_from; a new one is refused here where it
    # cannot start from that run.
    source = (source_run(config) if config.train.init_from and resume_step is None else None)
  except BaseException:
    checkpoints.close()
    raise
  return Setup(par, datasets, samples, init, abstract, checkpoints, source)


def _check_shapes(config, directory, checkpoints: workdir.Checkpoints, step: int, abstract,
                  num_classes: int) -> None:
  """Raises WorkdirError, moving nothing, where checkpoint `step` holds a state of other
  shapes or structure than `abstract` (the class rows of a sharded head may differ by their
  padding), or of another number of training identities."""
  stored, meta = checkpoints.stored_shapes(step)
  requested = {path: tuple(leaf.shape) for path, leaf in checkpoints.flatten(abstract).items()}
  resizable = checkpoints.flatten(sharding.match_tree(abstract, sharding.CLASS_ROWS))
  differ = []
  if meta.get("num_classes", num_classes) != num_classes:
    differ.append(f"training identities {meta['num_classes']} → {num_classes}")
  for path in sorted(stored.keys() | requested.keys()):
    old, new = stored.get(path), requested.get(path)
    if old is not None and new is not None and (
        old[1:] == new[1:] and len(old) == len(new) if resizable.get(path) else old == new):
      continue
    differ.append(f"{'/'.join(path)} {'absent' if old is None else old} → "
                  f"{'absent' if new is None else new}")
  if not differ:
    return
  fields = [c for c in workdir.stored_config_changes(directory, config) if not c.free]
  shown = "; ".join(differ[:3]) + (f"; and {len(differ) - 3} more" if len(differ) > 3 else "")
  raise errors.WorkdirError(
      f"{directory} holds checkpoint {step} of a state of other shapes than this config's "
      f"({workdir.describe_changes(fields) + ': ' if fields else ''}{shown}): a checkpoint "
      "continues only its own shapes, --allow_config_change or not. To start from this run's "
      f"weights, train in a new workdir with --config.train.init_from={directory}")


def start_state(config: ml_collections.ConfigDict, directory, setup: Setup, primary: bool,
                init_programs: dict[str, Any] | None = None) -> tuple[TrainState, int, bool]:
  """The state a run starts from, its step, and whether it was restored from a checkpoint.

  The newest intact checkpoint, else a new state of `config.seed` (its init compiled once
  for all callers sharing `init_programs`: `Parallelism.init`), started from
  `setup.source` (config.train.init_from) where it has one: init_from.json is
  written and a line printed.
  """
  par = setup.par
  restored = setup.checkpoints.restore_latest(
      setup.abstract, sharding.match_tree(setup.abstract, sharding.CLASS_ROWS))
  state, start = ((restored[0], restored[1]["step"]) if restored
                  else (par.init(setup.init, jax.random.key(config.seed), init_programs), 0))
  if setup.source is not None:
    state, record = start_from(setup.source, state, config, setup.datasets)
    if primary:
      workdir.write_json(directory / workdir.INIT_FROM, record)
      calibration = record["calibration"]
      calibrated = (f", its {len(calibration['batchnorms'])} folded BatchNorms calibrated on "
                    f"{calibration['images']} training images" if calibration else "")
      left = (f" ({', '.join(calibration['left'])}: no scale, left as imported)"
              if calibration and calibration["left"] else "")
      print(f"started from {record['workdir']} (step {record['step']}): its backbone{calibrated}"
            f"{left}; centres {record['centres']}", flush=True)
  return state, start, restored is not None


def _checkpoint_meta(setup: Setup) -> dict[str, Any]:
  """What each checkpoint records beside the state (`_check_shapes` reads num_classes)."""
  return {"num_classes": setup.datasets.num_classes,
          "image_shape": list(setup.samples.shape[1:]),
          "num_devices": setup.par.num_devices, "parallel": setup.par.mode}


def record_segment(directory, start: int, pack: list[str] | None = None) -> None:
  """Appends to the workdir's trained_in.json how it trains from step `start` on: solo, or in
  a pack with the workdirs `pack` (a run may move between the two; config.json is the same,
  so this is no config change). One entry per start; the next entry's step ends it."""
  path = directory / workdir.TRAINED_IN
  segments = workdir.read_json(path) if path.exists() else []
  segment = {"from_step": start, "trained": "pack" if pack else "solo",
             **({"pack": pack} if pack else {}),
             "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
  workdir.write_json(path, [*segments, segment])


class RunEvents:
  """The host side of one run's loop: after each update, what is due at its step.

  Every update's metrics wait (on the device) until something is due: then they
  are checked (`check_rows`: a non-finite or diverged step raises TrainingError
  before anything of it is saved), logged as the mean over the logging window,
  and the evaluations (`evaluators.Evaluators`) and the checkpoint due at the
  step run (`due`; all of it when the run is stopping). A solo run and each run
  of a pack have one.
  """

  def __init__(self, config: ml_collections.ConfigDict, directory, setup: Setup, *, writer,
               evals: evaluators.Evaluators, progress, start: int):
    self._config, self._directory, self._setup = config, directory, setup
    self._writer, self._evals, self._progress = writer, evals, progress
    self._meta = _checkpoint_meta(setup)
    self._pending, self._rows, self._timer = [], [], (start, time.monotonic())

  def restart_clock(self, step: int) -> None:
    """Images/s is timed from update `step` on, done now: after the first update, which
    compiled (and in a pack, after the other runs' evaluations)."""
    self._timer = (step, time.monotonic())

  def after(self, step: int, scalars, state, *, stopping: bool = False) -> None:
    """Notes update `step`, then logs, evaluates and saves what is due at it (`log`, then
    `evaluate_and_save`).

    Args:
      step: the update just done.
      scalars: () -> its metrics as Python floats (called only when something is due).
      state: () -> the run's state in the global layout (for evaluations and checkpoints).
      stopping: the run stops after this step (a signal): its rows are logged and its
        checkpoint saved now.
    """
    self.log(step, scalars, stopping=stopping)
    self.evaluate_and_save(step, state, stopping=stopping)

  def log(self, step: int, scalars, *, stopping: bool = False) -> None:
    """Notes update `step` (`after`'s arguments); where anything is due at it, checks the
    rows so far (raises TrainingError) and logs them where a log is due."""
    train_config = self._config.train
    self._pending.append((step, scalars))
    events = due(train_config, step)
    log = events["log"] or stopping
    if not (log or events["save"] or stopping or self._evals.due(step)):
      return
    new_rows = [row() for _, row in self._pending]
    check_rows(new_rows, [s for s, _ in self._pending], train_config.max_param_norm,
               self._setup.checkpoints.latest_step(), self._directory)
    self._rows, self._pending = self._rows + new_rows, []
    if log:
      rows, timer = self._rows, self._timer
      images_per_s = ((step - timer[0]) * train_config.batch_size / (time.monotonic() - timer[1])
                      if step > timer[0] else 0.0)
      means = {f"train/{name}": float(np.mean([row[name] for row in rows])) for name in rows[-1]}
      self._writer.write_scalars(step, {**means, "train/images_per_s": images_per_s})
      self._progress.update(step, means["train/loss"], images_per_s)
      self._rows = []

  def evaluate_and_save(self, step: int, state, *, stopping: bool = False) -> None:
    """Runs the evaluations and saves the checkpoint due at update `step`, logged by `log`."""
    train_config, setup = self._config.train, self._setup
    final = step == train_config.steps
    save = due(train_config, step)["save"] or stopping
    evaluate = self._evals.due(step) and not final  # the end's evaluation: below, with the save
    if not (evaluate or save):
      return
    global_state, num_classes = state(), setup.datasets.num_classes
    if evaluate:
      self._evals.run(evaluators.ModelView.of(global_state, step, num_classes, setup.par.host))
      self._timer = (step, time.monotonic())  # images/s leaves evaluations out
    if save:
      if final:  # the end's rows, like every step's, reach the disk before its checkpoint
        self._evals.run(evaluators.ModelView.of(global_state, step, num_classes, setup.par.host),
                        final=True)
      self._writer.flush()
      setup.checkpoints.save(step, global_state, {"step": step, **self._meta})


def _train(config, directory, setup: Setup, primary: bool) -> dict[str, Any]:
  par, datasets, checkpoints = setup.par, setup.datasets, setup.checkpoints
  steps, num_classes = config.train.steps, datasets.num_classes
  state, start, restored = start_state(config, directory, setup, primary)
  if primary and start < steps:
    record_segment(directory, start)
  writer = arcjax_logging.MetricWriter(directory, config, enabled=primary,
                                       keep_through_step=start if restored else None)
  progress = arcjax_logging.Progress(steps, start, enabled=primary)
  evals = evaluators.Evaluators(config, datasets, writer, progress, directory, primary=primary)
  if start == 0:
    writer.write_images(0, {"train/images": setup.samples})
    evals.run(evaluators.ModelView.of(state, 0, num_classes, par.host))
  events = RunEvents(config, directory, setup, writer=writer, evals=evals, progress=progress,
                     start=start)
  step_fn = make_train_step(config, par, num_classes, state)
  state = par.to_step(state)
  stop = errors.StopSignals() if jax.process_count() == 1 else contextlib.nullcontext()
  try:
    with stop, input_batches(config, datasets, start) as batches:
      for step in range(start + 1, steps + 1):
        state, metrics = step_fn(state, par.put_batch(next(batches)))
        if step == start + 1:  # the first step compiles: time from its end
          jax.block_until_ready(metrics)
          events.restart_clock(step)
        stopping = getattr(stop, "number", None) is not None
        events.after(step, functools.partial(par.scalars, metrics),
                     functools.partial(par.to_global, state), stopping=stopping)
        if stopping and step < steps:
          checkpoints.wait()
          raise stop.interrupted(f"at step {step}; checkpoint {step} saved in {directory}: run "
                                 "the same command to resume")
    if start == steps:  # resumed a run trained to the end: its results again, rows once
      evals.run(evaluators.ModelView.of(par.to_global(state), steps, num_classes, par.host), final=True)
    checkpoints.wait()
  finally:
    progress.close()
    writer.close()
  return write_results(config, directory, writer.rows, evals, primary)


def write_results(config: ml_collections.ConfigDict, directory, rows: list[dict[str, Any]],
                  evals: evaluators.Evaluators, primary: bool) -> dict[str, Any]:
  """results.json (and angle_stats.json) of a run trained to its end, from its metrics
  `rows` and its evaluators; prints `did_not_train_note`'s note. Returns the results."""
  steps = config.train.steps
  train_loss = next((row["train/loss"] for row in reversed(rows)
                     if "train/loss" in row and row["step"] == steps), None)
  results = {"step": steps, "train_loss": train_loss, **evals.summary(),
             "loss": losses.describe(config.loss)}
  if primary:
    if results["angle_stats"] is not None:
      workdir.write_json(directory / workdir.ANGLE_STATS, results["angle_stats"])
    workdir.write_json(directory / workdir.RESULTS, results)
    note = did_not_train_note(rows, config.loss.get("margin_warmup_steps", 0))
    if note:
      print(note, flush=True)
  return results


# A run whose last logged train loss is this much above its first did not train.
_ROSE_FACTOR = 1.1


def did_not_train_note(rows: list[dict[str, Any]], margin_warmup_steps: int = 0) -> str | None:
  """A note when the last logged 'train/loss' of metrics rows (each the mean over its logging
  window) ends more than 10 % above the first, else None.

  Not before the margin's warm-up is over: while the margin grows, so does the loss of an
  unchanged model, and a rising loss then says nothing.
  """
  logged = [(row["step"], row["train/loss"]) for row in rows
            if isinstance(row.get("train/loss"), (int, float))]
  if len(logged) < 2 or logged[-1][0] < margin_warmup_steps:
    return None
  (first_step, first), (last_step, last) = logged[0], logged[-1]
  if not last > _ROSE_FACTOR * first:
    return None
  return (f"note: the train loss rose over the run, from {first:.4g} (step {first_step}) to "
          f"{last:.4g} (step {last_step}): it did not train; a learning rate (config.train.lr) "
          "or scale (config.loss.s) too large is the usual cause")

"""Every config leaf acts: set to another valid value, it changes what a run computes.

A field that nothing reads is a label a user can set and believe (as the former
`loss.preset` was: `--config.loss.preset=cosface` trained ArcFace and said CosFace).
Each leaf of configs/default.py and of every row of configs/ablations.py (both
settings) is either perturbed here — `PERTURBATIONS`: another valid value, in the
context where it acts — and shown to change at least one of what a run computes
(`OBSERVABLES`), or named in `METADATA` with the reason it changes nothing computed.

Adding a config leaf: add `"section.name": Perturb(<another valid value>)` to
PERTURBATIONS (`base=` the row or changes under which it acts, `also=` fields that
must change with it to stay valid). The test then fails if the leaf changes none of
the observables; make it act (or remove it) rather than add it to METADATA.
"""

import contextlib
import dataclasses
import functools
import io
import json
import os
import sys
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import pytest
from PIL import Image

from arcjax import data, errors, verification, evaluators, optim, sharding, train, workdir
from arcjax import logging as arcjax_logging
from arcjax.data import omniglot, pairs
from configs import ablations, default

# Leaves that change nothing a run computes, only where files are kept; each says why.
METADATA = {
    # Where a gs:// data.path is copied to: the copy is checked file by file (SHA-256)
    # against what was read, so the data trained on is the same wherever it is staged.
    "data.stage_dir",
    # Where tensorflow-datasets keeps its cache of 'fashion_mnist' / 'digits': the same
    # dataset whichever folder it is built in.
    "data.data_dir",
}


@dataclasses.dataclass(frozen=True)
class Perturb:
  """Another valid value for a leaf. `base`: a row of configs/ablations.py or {field: value}
  changes of configs/default.py, the context in which the leaf acts (default: default.py);
  `also`: {field: value} that must change with it for the config to stay valid."""
  value: Any
  base: str | dict[str, Any] | None = None
  also: dict[str, Any] = dataclasses.field(default_factory=dict)


# Files a perturbation points at: made once, in a temporary folder (see `_files`).
SMALL_ZIP = os.fspath(omniglot.EMBEDDED / "images_background_small1.zip")
FOLDER, BIN = "<a folder of 6 identities>", "<a .bin of 20 pairs>"
SOURCE = "<a workdir to start from>"  # made once, only when asked for (see `_source_workdir`)

PERTURBATIONS: dict[str, Perturb] = {
    "seed": Perturb(1),
    "model.name": Perturb("mobilefacenet"),
    "model.embedding_dim": Perturb(64),
    "model.dropout": Perturb(0.3),
    "model.dtype": Perturb("bfloat16"),
    "model.input_mean": Perturb(100.0),
    "model.input_std": Perturb(127.5),
    "loss.s": Perturb(30.0),
    "loss.m1": Perturb(1.35),
    "loss.m2": Perturb(0.3),
    "loss.m3": Perturb(0.2),
    "loss.normalize": Perturb(True, base="softmax", also={"loss.bias": False}),
    "loss.bias": Perturb(False, base="softmax"),
    "loss.gradient": Perturb("straight_through"),
    "loss.softmax_weight": Perturb(2.0),
    "loss.intra_weight": Perturb(1.0),
    "loss.inter_weight": Perturb(1.0),
    "loss.inter_form": Perturb("cosine", base="ns_inter"),
    "loss.triplet_weight": Perturb(0.5, base="arcface_triplet"),
    "loss.triplet_margin": Perturb(0.2, base="triplet"),
    "loss.margin_warmup_steps": Perturb(100),
    "loss.kind": Perturb("elasticface_cos", base="elasticface_arc"),
    "loss.m": Perturb(0.4, base="curricularface"),
    "loss.subcenters": Perturb(2, base="subcenter_arcface"),
    "loss.extension": Perturb("monotone", base="subcenter_arcface"),
    "loss.momentum": Perturb(0.1, base="curricularface"),
    "loss.l_a": Perturb(5.0, base="magface"),
    "loss.u_a": Perturb(80.0, base="magface"),
    "loss.l_m": Perturb(0.4, base="magface"),
    "loss.u_m": Perturb(0.7, base="magface"),
    "loss.lambda_g": Perturb(20.0, base="magface"),
    "loss.h": Perturb(0.5, base="adaface"),
    "loss.t_alpha": Perturb(0.05, base="adaface"),
    "loss.sigma": Perturb(0.1, base="elasticface_arc"),
    "head.sharded": Perturb(True),
    "head.sample_rate": Perturb(0.5, base={"head.sharded": True}),
    "head.chunk_size": Perturb(64),
    "data.name": Perturb("folder", also={"data.path": FOLDER, "data.num_holdout_identities": 2}),
    "data.path": Perturb(SMALL_ZIP),
    "data.image_size": Perturb((40, 40)),
    "data.num_holdout_identities": Perturb(30),
    "data.pairs_seed": Perturb(1),
    "data.max_pairs": Perturb(600),
    "data.flip": Perturb(True),
    "data.sampler": Perturb("uniform", base="triplet"),
    # The P×K sampler fills the batch: P and K change together (their product is the batch).
    "data.pk_identities": Perturb(16, base="triplet", also={"data.pk_images": 8}),
    "data.pk_images": Perturb(2, base="triplet", also={"data.pk_identities": 64}),
    "data.eval_bins": Perturb((BIN,)),
    "train.steps": Perturb(1000),
    "train.batch_size": Perturb(64),
    "train.optimizer": Perturb("adamw"),
    "train.lr": Perturb(0.05),
    "train.momentum": Perturb(0.5),
    "train.weight_decay": Perturb(1e-4),
    "train.schedule": Perturb("piecewise", also={"train.lr_boundaries": (0.5,)}),
    "train.lr_boundaries": Perturb((0.5,), base={"train.schedule": "piecewise",
                                                 "train.lr_boundaries": (0.8,)}),
    "train.warmup_steps": Perturb(100),
    "train.grad_clip": Perturb(1.0),
    "train.parallel": Perturb("none"),
    "train.checkpoint_every": Perturb(300),
    "train.keep_checkpoints": Perturb(1),
    "train.log_every": Perturb(100),
    "train.max_param_norm": Perturb(1e6),
    "train.init_from": Perturb(SOURCE),
    "eval.every": Perturb(300),
    "eval.batch_size": Perturb(64),
    "eval.flip": Perturb(True),
    "angles.probe_size": Perturb(500),
    "angles.every": Perturb(500),
    "wandb.mode": Perturb("disabled"),
    "wandb.project": Perturb("elsewhere"),
}


# --- The configs and their leaves ----------------------------------------------------------

def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_leaves(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _all_configs() -> dict[str, ml_collections.ConfigDict]:
  configs = {"configs/default.py": default.get_config()}
  for row in ablations.ROWS:
    for setting in ablations.SETTINGS:
      arg = f"{row},setting={setting}"
      configs[f"configs/ablations.py:{arg}"] = ablations.get_config(arg)
  return configs


def test_every_leaf_is_perturbed_or_metadata():
  where: dict[str, str] = {}
  for name, config in _all_configs().items():
    for leaf in _leaves(config.to_dict()):
      where.setdefault(leaf, name)
  missing = [leaf for leaf in where if leaf not in PERTURBATIONS and leaf not in METADATA]
  assert not missing, "\n".join(
      f"config.{leaf} (in {where[leaf]}) is not covered: add "
      f"'{leaf}': Perturb(<another valid value>) to PERTURBATIONS in tests/test_config_leaves.py "
      "(base= the row where it acts, also= fields that change with it), so that this test "
      "shows that it changes what a run computes" for leaf in missing)
  stale = sorted((PERTURBATIONS.keys() | METADATA) - where.keys())
  assert not stale, f"tests/test_config_leaves.py names fields no config has: {stale}; remove them"
  assert not PERTURBATIONS.keys() & METADATA


# --- What a run computes ---------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _files() -> dict[str, str]:
  """The stand-ins of FOLDER and BIN, made once for the session."""
  import tempfile  # pylint: disable=import-outside-toplevel
  root = tempfile.mkdtemp(prefix="arcjax-leaves-")
  rng = np.random.default_rng(0)
  for person in range(6):
    os.makedirs(f"{root}/people/p{person}")
    for i in range(4):
      Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(
          f"{root}/people/p{person}/{i}.png")
  encoded = []
  for _ in range(40):
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(buffer, format="PNG")
    encoded.append(buffer.getvalue())
  pairs.write_bin(f"{root}/other.bin", encoded, np.arange(20) % 2 == 0)
  return {FOLDER: f"{root}/people", BIN: f"{root}/other.bin"}


@functools.lru_cache(maxsize=None)
def _source_workdir() -> str:
  """The stand-in of SOURCE: a workdir as a run of configs/default.py leaves it, with the
  backbone and centres of seed 1's initial state (not the default seed's), its checkpoint
  written directly (no training), made once for the session."""
  import tempfile  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  datasets = _data_of(config)
  shape = _image_shape(config, datasets)
  state = jax.jit(functools.partial(train.create_train_state, config, image_shape=shape,
                                    num_classes=datasets.num_classes))(jax.random.key(1))
  directory = workdir.as_path(tempfile.mkdtemp(prefix="arcjax-leaves-")) / "source"
  workdir.record_config(directory, config)
  kept = workdir.Checkpoints(directory, keep=1)
  kept.save(1, {"params": state.params, "batch_stats": state.batch_stats, "head": state.head},
            {"step": 1, "num_classes": datasets.num_classes, "image_shape": list(shape),
             "num_devices": 1, "parallel": "none"})
  kept.close()
  return os.fspath(directory)


def _set(config: ml_collections.ConfigDict, field: str, value: Any) -> None:
  section, _, name = field.rpartition(".")
  target = config
  for part in filter(None, section.split(".")):
    target = target[part]
  if value == SOURCE:
    value = _source_workdir()
  files = _files()
  if isinstance(value, tuple):
    value = tuple(files.get(v, v) if isinstance(v, str) else v for v in value)
  elif isinstance(value, str):
    value = files.get(value, value)
  target[name] = value


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
  value = config
  for part in field.split("."):
    value = value[part]
  return value


def _context(perturb: Perturb) -> ml_collections.ConfigDict:
  if isinstance(perturb.base, str):
    return ablations.get_config(perturb.base)
  config = default.get_config()
  for field, value in (perturb.base or {}).items():
    _set(config, field, value)
  return config


def _key(config: ml_collections.ConfigDict) -> str:
  return json.dumps(workdir.config_as_json(config), sort_keys=True)


@functools.lru_cache(maxsize=None)
def _datasets(data_key: str) -> data.Datasets:
  return data.get_datasets(ml_collections.ConfigDict(json.loads(data_key)))


def _data_of(config) -> data.Datasets:
  return _datasets(json.dumps(workdir.config_as_json(config.data), sort_keys=True))


def _image_shape(config, datasets: data.Datasets) -> tuple[int, int, int]:
  from arcjax.data import pipeline  # pylint: disable=import-outside-toplevel
  size = tuple(config.data.image_size) if config.data.image_size else None
  return tuple(pipeline.load_images(datasets.train, np.arange(1), image_size=size).shape[1:])


def _init(config, par: sharding.Parallelism, datasets: data.Datasets):
  return functools.partial(train.create_train_state, config, num_classes=datasets.num_classes,
                           image_shape=_image_shape(config, datasets),
                           num_shards=par.num_devices if config.head.sharded else 1)


def _digest(tree: Any) -> list[tuple[str, tuple[int, ...], str, str]]:
  """(path, shape, dtype, SHA-256 of the bytes) of every leaf."""
  import hashlib  # pylint: disable=import-outside-toplevel
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [(jax.tree_util.keystr(path), np.shape(leaf), str(np.asarray(leaf).dtype),
           hashlib.sha256(np.ascontiguousarray(np.asarray(leaf)).tobytes()).hexdigest())
          for path, leaf in leaves]


def schedule(config) -> list[float]:
  """The learning rate of every step (`optim.make_schedule`)."""
  return np.asarray(optim.make_schedule(config.train)(jnp.arange(config.train.steps))).tolist()


def plan(config) -> dict[str, Any]:
  """Which steps log and save (`train.due`), and whether the loop's stop rule (`check_rows`)
  stops rows of parameter norms 10, 10², …, 10⁸."""
  events = {step: train.due(config.train, step) for step in range(1, config.train.steps + 1)}
  stops = []
  for exponent in range(1, 9):
    row = {"loss": 1.0, "grad_norm": 1.0, "param_norm": 10.0 ** exponent, "state_finite": 1.0}
    try:
      train.check_rows([row], [1], config.train.max_param_norm, None, "here")
      stops.append(False)
    except errors.TrainingError:
      stops.append(True)
  return {"log": [s for s, e in events.items() if e["log"]],
          "save": [s for s, e in events.items() if e["save"]], "stops": stops}


def state_shapes(config) -> Any:
  """The initial train state's structure, shapes and dtypes (`train.create_train_state`)."""
  par = sharding.parallelism_for(config.train, config.head)
  abstract = jax.eval_shape(_init(config, par, _data_of(config)), jax.random.key(config.seed))
  return [(jax.tree_util.keystr(path), leaf.shape, str(leaf.dtype))
          for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]]


def state_values(config) -> Any:
  """The values of the state a run starts from, as the trainer makes it: the initial state
  (`train.create_train_state`, compiled: the costliest observable, so the last to be asked),
  with `train.init_from` the state `train.start_from` makes of it."""
  par = sharding.parallelism_for(config.train, config.head)
  datasets = _data_of(config)
  state = jax.jit(_init(config, par, datasets))(jax.random.key(config.seed))
  if config.train.init_from:
    state, _ = train.start_from(train.source_run(config), state, config, datasets)
  return _digest(state)


def step(config) -> str:
  """The train step as lowered for the devices (`train.make_train_step`), as text."""
  datasets = _data_of(config)
  par = sharding.parallelism_for(config.train, config.head)
  abstract = par.abstract(jax.eval_shape(_init(config, par, datasets), jax.random.key(0)))
  step_fn = train.make_train_step(config, par, datasets.num_classes, abstract)
  size, shape = config.train.batch_size, _image_shape(config, datasets)
  split = NamedSharding(par.mesh, P(sharding.AXIS))
  batch = {"image": jax.ShapeDtypeStruct((size, *shape), jnp.uint8, sharding=split),
           "label": jax.ShapeDtypeStruct((size,), jnp.int32, sharding=split)}
  return step_fn.lower(abstract, batch).as_text()


def batches(config) -> Any:
  """The first two training batches (`train.input_batches`, as the trainer reads them)."""
  with train.input_batches(config, _data_of(config), 0) as iterator:
    return _digest([next(iterator), next(iterator)])


def evaluation_(config) -> dict[str, Any]:
  """What the evaluators do (`evaluators.Evaluators`): at each step they are due, what they
  embed and how (`verification.model_outputs`' calls, which `embed_images` makes too); and
  what they find at the end. The model is a stand-in (a fixed projection of the pixels, random
  centres): what is observed is the evaluators' work, not a network's."""
  datasets = _data_of(config)
  dim = config.model.embedding_dim
  calls, real = [], verification.model_outputs

  def stand_in(embed, images, *, batch_size, flip=False):
    del embed
    calls.append((len(images), batch_size, flip))
    views = [images, images[:, :, ::-1]] if flip else [images]
    pixels = [np.asarray(view, np.float32).reshape(len(images), -1) for view in views]
    projection = np.random.default_rng(pixels[0].shape[1]).normal(size=(pixels[0].shape[1], dim))
    outputs = [(view @ projection).astype(np.float32) for view in pixels]
    return np.stack(outputs, axis=1) if flip else outputs[0]

  centres = np.random.default_rng(0).normal(size=(datasets.num_classes, dim)).astype(np.float32)
  with _tmp_dir() as directory:
    writer = arcjax_logging.MetricWriter(directory, config, enabled=False)
    progress = arcjax_logging.Progress(config.train.steps, enabled=False)
    verification.model_outputs = stand_in
    try:
      evals = evaluators.Evaluators(config, datasets, writer, progress, directory, primary=False)
      done = {}
      for at in range(config.train.steps + 1):
        final = at == config.train.steps
        if evals.due(at, final):
          evals.run(evaluators.ModelView(at, {}, centres), final=final)
          done[at], calls[:] = list(calls), []
    finally:
      verification.model_outputs = real
    return {"done": done, "found": evals.summary()}


def logging_(config) -> Any:
  """How the metric writer opens wandb (`logging.MetricWriter`; wandb itself faked)."""
  opened = []
  fake = types.SimpleNamespace(init=lambda **kwargs: opened.append(kwargs),
                               Settings=lambda **kwargs: kwargs)
  with _tmp_dir() as directory, _environment(WANDB_MODE=None), _module("wandb", fake):
    arcjax_logging.MetricWriter(directory, config)
  # Not the config it sends (every leaf would change that), nor the per-folder name and id.
  return [{k: v for k, v in kwargs.items() if k not in ("config", "dir", "id", "name")}
          for kwargs in opened]


def checkpoints(config) -> list[int]:
  """The checkpoints a run keeps after saving steps 1-4 (`workdir.Checkpoints`)."""
  with _tmp_dir() as directory:
    kept = workdir.Checkpoints(directory, keep=config.train.keep_checkpoints)
    for at in range(1, 5):
      kept.save(at, {"x": jnp.full((2,), at, jnp.float32)}, {"step": at})
    kept.close()
    return kept.all_steps()


# Cheapest first: a perturbation is shown to act by the first that changes.
OBSERVABLES: dict[str, Callable[[Any], Any]] = {
    "the learning-rate schedule": schedule, "the log, save and stop plan": plan,
    "the initial train state's shapes": state_shapes, "the lowered train step": step,
    "the first batches": batches, "the wandb run": logging_,
    "the checkpoints kept": checkpoints, "the evaluations": evaluation_,
    "the values of the state a run starts from": state_values,
}


@contextlib.contextmanager
def _tmp_dir():
  import tempfile  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory(prefix="arcjax-leaves-") as folder:
    yield workdir.as_path(folder)


@contextlib.contextmanager
def _environment(**values):
  saved = {key: os.environ.get(key) for key in values}
  try:
    for key, value in values.items():
      os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    yield
  finally:
    for key, value in saved.items():
      os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


@contextlib.contextmanager
def _module(name: str, module):
  saved = sys.modules.get(name)
  sys.modules[name] = module
  try:
    yield
  finally:
    if saved is None:
      del sys.modules[name]
    else:
      sys.modules[name] = saved


_SEEN: dict[tuple[str, str], Any] = {}


def _observe(name: str, config) -> Any:
  key = (name, _key(config))
  if key not in _SEEN:
    _SEEN[key] = OBSERVABLES[name](config)
  return _SEEN[key]


@pytest.mark.slow
@pytest.mark.parametrize("leaf", sorted(PERTURBATIONS))
def test_a_perturbed_leaf_changes_what_a_run_computes(leaf):
  perturb = PERTURBATIONS[leaf]
  base = _context(perturb)
  changed = _context(perturb)
  for field, value in {leaf: perturb.value, **perturb.also}.items():
    _set(changed, field, value)
  assert _get(changed, leaf) != _get(base, leaf), (
      f"Perturb({perturb.value!r}) of config.{leaf} is its value in the context already")
  train.check_config(base)
  train.check_config(changed)  # both valid: a perturbation must not be refused
  for name in OBSERVABLES:
    if _observe(name, changed) != _observe(name, base):
      print(f"config.{leaf} changes {name}")
      return
  pytest.fail(
      f"config.{leaf} set to {_get(changed, leaf)!r} (from {_get(base, leaf)!r}"
      f"{', with ' + repr(perturb.also) if perturb.also else ''}) changes none of: "
      f"{', '.join(OBSERVABLES)}. A field that nothing reads is a label: make it act or "
      "remove it; if it acts only in some rows, give its Perturb a base= where it does; if it "
      "only says where files go, add it to METADATA in tests/test_config_leaves.py with the "
      "reason")

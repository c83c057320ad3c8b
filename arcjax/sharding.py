"""Devices, hosts and the named mesh: where each piece of the state lives, and how a step runs.

Every device of every host forms one mesh axis, `AXIS`. The batch is split over
it; each leaf of the train state is placed by `partition_rules`: regexes over
the leaf's path (big_vision's way), the first that matches giving its
PartitionSpec, replicated where none does. With a sharded head the class-centre
rows — the centres and the optimiser's copies of them — are split over `AXIS`.

`config.train.parallel` picks how a step runs over the devices:

  - 'mesh': `jax.jit` over global arrays laid out by the rules. XLA inserts the
    collectives, so the step is written as for one device and every mean over
    the batch is over the global batch: the way to scale to TPU pods. A sharded
    head's loss alone runs under `shard_map` (`head.margin_term`).
  - 'pmap': `jax.pmap` over each host's devices with axis name `AXIS`, the step
    averaging gradients and metrics with `lax.pmean` (`Collectives`); its state
    carries a leading (local devices,) axis. A thin mode, kept for code that
    expects it.
  - 'none': `jax.jit` on the first device.

Whatever the mode, the state between steps is also available in the global
layout (`to_global`), which is what checkpoints store as it lies on the devices:
no host copy, no gather of a sharded leaf.

A pack of runs (`train.make_pack_step`) carries a leading run axis on its
states and batches (`runs=True` below). `for_pack` lays that axis over a second
mesh axis, `RUN_AXIS`, beside `AXIS` where the device count allows it (8 devices,
4 runs: 4 × 2, each run's batch over its 2 devices); else every device holds
every run, each run's batch split over all of them. `initialize_distributed`
starts `jax.distributed` for a multi-host run.
"""

import dataclasses
import functools
import math
import os
import re
from typing import Any, Callable, NamedTuple

import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from arcjax import errors

AXIS = "batch"
RUN_AXIS = "runs"  # a pack's runs (`Parallelism.for_pack`)
MODES = ("mesh", "pmap", "none")
# The state leaves that hold one row per class: the head's centres and the optimiser's
# copies of them (momentum, Adam moments) all end in this key.
CLASS_ROWS = r"(^|/)centres$"
Rules = tuple[tuple[str, P], ...]

# The usual environment of a multi-host job, read when no flag is given.
_ENV_COORDINATOR, _ENV_NUM_PROCESSES, _ENV_PROCESS_ID = (
    "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise errors.ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None, *, auto: bool = False) -> bool:
  """Starts `jax.distributed` for a multi-host run; must precede any other JAX call.

  Arguments left None are read from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
  and JAX_PROCESS_ID. With none of them set, a single-process run is a no-op,
  unless `auto` (TPU pods, SLURM: JAX detects the cluster from its environment).

  Returns:
    True if `jax.distributed.initialize` was called.
  """
  coordinator_address = coordinator_address or os.environ.get(_ENV_COORDINATOR) or None
  if num_processes is None:
    num_processes = _env_int(_ENV_NUM_PROCESSES)
  if process_id is None:
    process_id = _env_int(_ENV_PROCESS_ID)
  given = (coordinator_address, num_processes, process_id)
  if all(value is None for value in given):
    if auto:
      jax.distributed.initialize()
    return auto
  if None in given:
    raise errors.ConfigError(
        "a multi-process run needs the coordinator address, the number of processes and "
        f"this process's id; got coordinator_address={coordinator_address!r}, "
        f"num_processes={num_processes}, process_id={process_id}")
  if not 0 <= process_id < num_processes:
    raise errors.ConfigError(f"process_id={process_id} is not in [0, num_processes={num_processes})")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis `AXIS` over `devices` (default: every device of every host).

  Auto axis type (XLA propagates shardings), where `jax.make_mesh` would make
  an Explicit one.
  """
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (AXIS,), axis_types=(AxisType.Auto,))


def partition_rules(shard_head: bool) -> Rules:
  """(regex over a leaf's '/'-joined path, PartitionSpec) pairs; unmatched leaves are replicated."""
  return ((CLASS_ROWS, P(AXIS)),) if shard_head else ()


def leaf_path(path: tuple) -> str:
  """'opt_state/0/trace/head/centres' for a key path of `jax.tree_util`."""
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
  return "/".join(names)


def match_tree(tree: Any, pattern: str) -> Any:
  """A tree of bools: whether each leaf's path matches `pattern`."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: re.search(pattern, leaf_path(path)) is not None, tree)


def partition_specs(tree: Any, rules: Rules) -> Any:
  """The PartitionSpec of each leaf of `tree`: the first rule whose regex matches its path."""
  def spec(path, _):
    name = leaf_path(path)
    return next((spec for pattern, spec in rules if re.search(pattern, name)), P())
  return jax.tree_util.tree_map_with_path(spec, tree)


class Collectives(NamedTuple):
  """What a step needs of its devices: identity under jit (where every array is global),
  `pmean`, `all_gather` and the axis index under pmap (where each device holds its rows).

  mean: a tree's mean over the devices (of per-device means: the global batch's mean).
  fold_device: a key made different on each device.
  gather_rows: (b, ...) this device's rows -> (B, ...) the global batch's, in device order.
  own_rows: (B, ...) the global batch's rows -> (b, ...) this device's.
  """
  mean: Callable[[Any], Any]
  fold_device: Callable[[jax.Array], jax.Array]
  gather_rows: Callable[[jax.Array], jax.Array]
  own_rows: Callable[[jax.Array], jax.Array]


def _own_rows(x: jax.Array) -> jax.Array:
  count = x.shape[0] // jax.lax.axis_size(AXIS)
  return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(AXIS) * count, count)


# One device, or global arrays under jit: every collective is the identity.
NO_COLLECTIVES = Collectives(mean=lambda tree: tree, fold_device=lambda key: key,
                             gather_rows=lambda x: x, own_rows=lambda x: x)
_PMAP_COLLECTIVES = Collectives(
    mean=functools.partial(jax.lax.pmean, axis_name=AXIS),
    fold_device=lambda key: jax.random.fold_in(key, jax.lax.axis_index(AXIS)),
    gather_rows=functools.partial(jax.lax.all_gather, axis_name=AXIS, tiled=True),
    own_rows=_own_rows)


def check_config(train_config: Any, head_config: Any) -> None:
  """Raises ConfigError for a parallel mode that cannot run the head as configured."""
  if train_config.parallel not in MODES:
    raise errors.ConfigError(f"config.train.parallel must be one of {MODES}, "
                             f"got {train_config.parallel!r}")
  if head_config.sharded and train_config.parallel != "mesh":
    raise errors.ConfigError("config.head.sharded=True runs under train.parallel='mesh', "
                             f"got {train_config.parallel!r}")


@dataclasses.dataclass(frozen=True)
class Parallelism:
  """How a step runs over the devices (`mode`), over `mesh`, with the state laid out by `rules`."""
  mode: str
  mesh: Mesh
  rules: Rules = ()

  @property
  def num_devices(self) -> int:
    """Devices that share each global batch."""
    return self.mesh.devices.size

  @property
  def collectives(self) -> Collectives:
    return _PMAP_COLLECTIVES if self.mode == "pmap" else NO_COLLECTIVES

  @property
  def bn_axis_name(self) -> str | None:
    """pmap's axis, over which BatchNorm averages its statistics; None under jit."""
    return AXIS if self.mode == "pmap" else None

  def check_batch_size(self, batch_size: int) -> None:
    """Raises ConfigError unless the global batch splits over the devices and the hosts."""
    for count, what in ((self.num_devices, "devices"), (jax.process_count(), "processes")):
      if batch_size % count:
        raise errors.ConfigError(f"config.train.batch_size={batch_size} does not split over "
                                 f"the {count} {what}")

  def shardings(self, tree: Any) -> Any:
    """NamedShardings of the global layout of `tree`'s leaves."""
    return jax.tree.map(lambda spec: NamedSharding(self.mesh, spec),
                        partition_specs(tree, self.rules))

  def _run_axis(self) -> str | None:
    return RUN_AXIS if RUN_AXIS in self.mesh.axis_names else None

  def run_shardings(self, tree: Any) -> Any:
    """NamedShardings of a pack's `tree`, each leaf with a leading run axis: that axis over
    `RUN_AXIS` where the mesh has one, each run's part laid out as a solo run's leaf."""
    return jax.tree.map(lambda spec: NamedSharding(self.mesh, P(self._run_axis(), *spec)),
                        partition_specs(tree, self.rules))

  def for_pack(self, count: int) -> "Parallelism":
    """The layout of a pack of `count` runs: a mesh (RUN_AXIS r, AXIS devices / r) over the
    same devices, r = gcd(count, devices), where r > 1 under 'mesh' on one process (a run
    axis across hosts would need each host to feed other hosts' runs); else this one."""
    r = math.gcd(count, self.num_devices)
    if self.mode != "mesh" or r == 1 or jax.process_count() > 1:
      return self
    mesh = Mesh(self.mesh.devices.reshape(r, -1), (RUN_AXIS, AXIS),
                axis_types=(AxisType.Auto, AxisType.Auto))
    return Parallelism(self.mode, mesh, self.rules)

  def abstract(self, tree: Any) -> Any:
    """`tree`'s leaves as ShapeDtypeStructs carrying their global shardings."""
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(
        leaf.shape, leaf.dtype, sharding=sharding), tree, self.shardings(tree))

  def init(self, init_fn: Callable[[jax.Array], Any], key: jax.Array,
           programs: dict[str, Any] | None = None) -> Any:
    """`init_fn(key)` computed straight into the global layout (a sharded leaf never whole).

    `programs`: compiled inits by their program's text, shared by callers whose `init_fn`s
    trace to the same program (a pack's runs: compiled once, not once a run).
    """
    abstract = jax.eval_shape(init_fn, key)
    lowered = jax.jit(init_fn, out_shardings=self.shardings(abstract)).lower(key)
    if programs is None:
      return lowered.compile()(key)
    text = lowered.as_text()
    if text not in programs:
      programs[text] = lowered.compile()
    return programs[text](key)

  def compile(self, step_fn: Callable[..., Any], state: Any, *,
              runs: bool = False) -> Callable[..., Any]:
    """`step_fn(state, batch) -> (state, metrics)` compiled over the devices; state donated.

    Takes and returns the state in the step layout (`to_step`). With `runs` (a
    pack; 'mesh' or 'none' only): `step_fn(states, batches, hparams, active)`,
    the states' leaves and the batches with a leading run axis (over `RUN_AXIS` on a
    `for_pack` mesh), each run's batch split over its devices; hparams, active and
    the metrics replicated.
    """
    if self.mode == "pmap":
      if runs:
        raise errors.ConfigError("a pack of runs trains under train.parallel='mesh' or 'none'")
      return jax.pmap(step_fn, axis_name=AXIS, donate_argnums=(0,))
    shardings = self.run_shardings(state) if runs else self.shardings(state)
    replicated = NamedSharding(self.mesh, P())
    arguments = (shardings, self._batch_sharding(runs)) + ((replicated, replicated) if runs else ())
    return jax.jit(step_fn, in_shardings=arguments, out_shardings=(shardings, replicated),
                   donate_argnums=(0,))

  def _local_mesh(self) -> Mesh:
    return Mesh(np.asarray(jax.local_devices()), (AXIS,))

  def to_step(self, state: Any) -> Any:
    """Global layout → the step's: itself under jit; one copy per local device under pmap."""
    if self.mode != "pmap":
      return state
    local = NamedSharding(self._local_mesh(), P(AXIS))

    def stack(x):
      shards = {shard.device: shard.data for shard in x.addressable_shards}
      return jax.make_array_from_single_device_arrays(
          (jax.local_device_count(), *x.shape), local,
          [shards[device][None] for device in jax.local_devices()])
    return jax.tree.map(stack, state)

  def to_global(self, state: Any) -> Any:
    """The step's layout → the global one, on the devices (what checkpoints store)."""
    if self.mode != "pmap":
      return state
    replicated = NamedSharding(self.mesh, P())

    def unstack(x):
      return jax.make_array_from_single_device_arrays(
          x.shape[1:], replicated, [shard.data.reshape(x.shape[1:])
                                    for shard in x.addressable_shards])
    return jax.tree.map(unstack, state)

  def put_batch(self, batch: dict[str, np.ndarray], *, runs: bool = False) -> Any:
    """This host's slice of a global batch → the step's batch argument.

    `runs`: a pack's batches, each leaf (N, B/P, ...): N runs' slices stacked.
    """
    if self.mode == "pmap" and not runs:
      count = jax.local_device_count()
      return jax.tree.map(lambda x: x.reshape(count, x.shape[0] // count, *x.shape[1:]), batch)
    sharding = self._batch_sharding(runs)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)

  def _batch_sharding(self, runs: bool) -> NamedSharding:
    """A batch split over `AXIS`; a pack's (`runs`) with its run axis first."""
    return NamedSharding(self.mesh, P(self._run_axis(), AXIS) if runs else P(AXIS))

  def scalars(self, metrics: dict[str, jax.Array]) -> dict[str, float]:
    """A step's metrics as Python floats (the same on every device: read where they lie)."""
    return {name: float(np.asarray(value.addressable_shards[0].data).reshape(-1)[0])
            for name, value in metrics.items()}

  def run_scalars(self, metrics: dict[str, jax.Array]) -> list[dict[str, float]]:
    """A pack step's metrics, each (N,), as one dict of Python floats per run."""
    values = {name: np.asarray(value.addressable_shards[0].data).reshape(-1)
              for name, value in metrics.items()}
    count = len(next(iter(values.values())))
    return [{name: float(value[i]) for name, value in values.items()} for i in range(count)]

  def host(self, tree: Any) -> Any:
    """Global arrays → NumPy arrays of their whole value on this process (for evaluation).

    A replicated leaf is read from this process's first shard; a sharded one is
    gathered from every process (a collective: every process must call it).
    """
    def copy(x):
      if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_shards[0].data)
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.tree.map(copy, tree)


# A replicated head whose centres and optimiser copies take more of a device's memory than
# this is worth sharding (config.head.sharded): see the README's rule.
HEAD_MEMORY_FRACTION = 0.25


def device_memory_bytes() -> int | None:
  """The memory of one local device (None where the backend does not say: CPU)."""
  stats = jax.local_devices()[0].memory_stats()
  return None if not stats else stats.get("bytes_limit")


def replicated_head_note(abstract_state: Any, memory_bytes: int | None) -> str | None:
  """A note to shard the head when its replicated class rows (the centres and the optimiser's
  copies of them) pass HEAD_MEMORY_FRACTION of `memory_bytes`; None otherwise."""
  rows = jax.tree.leaves(jax.tree.map(lambda leaf, is_rows: leaf.size * leaf.dtype.itemsize
                                      if is_rows else 0, abstract_state,
                                      match_tree(abstract_state, CLASS_ROWS)))
  held = sum(rows)
  if memory_bytes is None or held <= HEAD_MEMORY_FRACTION * memory_bytes:
    return None
  return (f"note: the replicated head's centres and their optimiser state take "
          f"{held / 2**30:.1f} GiB of each device's {memory_bytes / 2**30:.1f} GiB, and their "
          "gradient is all-reduced every step: set config.head.sharded=True to split them over "
          "the devices (and config.head.sample_rate < 1 for Partial FC)")


def parallelism_for(train_config: Any, head_config: Any) -> Parallelism:
  """The `Parallelism` of `config.train.parallel` and `config.head.sharded`."""
  check_config(train_config, head_config)
  rules = partition_rules(head_config.sharded)
  if train_config.parallel == "none":
    if jax.process_count() > 1:
      raise errors.ConfigError("train.parallel='none' runs on one device; a multi-process run "
                               "needs 'mesh' or 'pmap'")
    return Parallelism("none", make_mesh(jax.devices()[:1]), rules)
  return Parallelism(train_config.parallel, make_mesh(), rules)

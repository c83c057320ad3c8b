"""Devices, hosts and meshes; `jax.distributed` start-up; the data-parallel wrappers of a step.

`config.train.parallel` picks how one step runs over every device of every host:

  - 'pmap': `jax.pmap` over each host's local devices with axis name `AXIS`.
    The step sees its device's slice of the batch and averages gradients and
    batch statistics with `lax.pmean(..., AXIS)`; the state carries a leading
    (local devices,) axis.
  - 'mesh': `jax.jit` over global arrays on a 1-D `Mesh` with axis `AXIS`: the
    batch sharded over it, the state replicated. XLA inserts the collectives,
    so the step is written as for one device (axis_name=None) and every mean
    over the batch is over the global batch: the way to scale to TPU pods.
  - 'none': `jax.jit` on the first device.

With `shard_head` ('mesh' only) the class centres, and their optimiser state,
are split over `AXIS` (`config.head.sharded`: millions of identities): the step
then runs per device under `jax.shard_map`, with axis name `AXIS` as under
pmap, and the centres' gradients stay on their shard.

Whatever the mode, `DataParallel.global_state` gives the state as global arrays
over the mesh of all devices (replicated, the centres sharded with
`shard_head`): what checkpoints store, so a checkpoint restores under any mode
and any number of devices or hosts (a sharded head: the same number of devices).
"""

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXIS = "batch"
MODES = ("pmap", "mesh", "none")
# The state leaves that `shard_head` splits over AXIS: the head's centre matrix and the
# optimiser's copies of it (momentum, Adam moments) all sit under this dict key.
CENTRES = "centres"

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
    raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None, *, auto: bool = False) -> bool:
  """Starts `jax.distributed` for a multi-host run; must precede any other JAX call.

  Arguments left None are read from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
  and JAX_PROCESS_ID. With none of them set, a single-process run is a no-op,
  unless `auto` (TPU pods, SLURM: JAX detects the cluster itself).

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
    raise ValueError(
        "a multi-process run needs the coordinator address, the number of processes and "
        f"this process's id; got coordinator_address={coordinator_address!r}, "
        f"num_processes={num_processes}, process_id={process_id}")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process_id={process_id} is not in [0, num_processes={num_processes})")
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


def place(tree: Any, shardings: Any) -> Any:
  """Host values (equal on every process) → global arrays with `shardings` (a matching tree)."""
  def put(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree, shardings)


def host_copy(tree: Any) -> Any:
  """Global or single-device arrays → NumPy arrays of their whole value on this process.

  A replicated leaf is read from this process's first shard; a sharded one is
  gathered from every process (a collective: every process must call it).
  """
  def copy(x):
    if x.sharding.is_fully_replicated:
      return np.asarray(x.addressable_shards[0].data)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(copy, tree)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local batch `(B / hosts, ...)` → global arrays `(B, ...)` sharded over `AXIS`."""
  sharding = NamedSharding(mesh, P(AXIS))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def split_for_pmap(batch: dict[str, np.ndarray], num_devices: int) -> dict[str, np.ndarray]:
  """Host-local batch `(b, ...)` → `(num_devices, b / num_devices, ...)` for `jax.pmap`."""
  def split(x):
    if x.shape[0] % num_devices:
      raise ValueError(f"a host-local batch of {x.shape[0]} does not split over "
                       f"{num_devices} local devices")
    return x.reshape(num_devices, x.shape[0] // num_devices, *x.shape[1:])
  return jax.tree.map(split, batch)


@dataclasses.dataclass(frozen=True)
class DataParallel:
  """How a step runs over the devices (`mode` in MODES) and the layouts it needs.

  `mesh` spans every device of every host (one device for 'none'). Use
  `parallel_for(mode, shard_head=...)` to build one.
  """
  mode: str
  mesh: Mesh
  shard_head: bool = False

  @property
  def num_devices(self) -> int:
    """Devices that share each global batch."""
    return self.mesh.devices.size

  @property
  def axis_name(self) -> str | None:
    """The axis name a step's collectives use: pmap's, or shard_map's with `shard_head`."""
    return AXIS if self.mode == "pmap" or self.shard_head else None

  def state_specs(self, state: Any) -> Any:
    """PartitionSpecs of the state's leaves: P(AXIS) for the centres with `shard_head`, else P()."""
    def spec(path, leaf):
      del leaf
      last = path[-1] if path else None
      is_centres = isinstance(last, jax.tree_util.DictKey) and last.key == CENTRES
      return P(AXIS) if self.shard_head and is_centres else P()
    return jax.tree_util.tree_map_with_path(spec, state)

  def _shardings(self, state: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), self.state_specs(state))

  def wrap(self, step_fn: Callable[..., Any]) -> Callable[..., Any]:
    """`step_fn(state, batch, *, axis_name)` → the compiled step over the devices.

    The state argument is donated: its buffers are reused for the new state.
    """
    step_fn = functools.partial(step_fn, axis_name=self.axis_name)
    if self.mode == "pmap":
      return jax.pmap(step_fn, axis_name=AXIS, donate_argnums=(0,))
    batch_sharding = NamedSharding(self.mesh, P(AXIS))
    if not self.shard_head:
      replicated = NamedSharding(self.mesh, P())
      return jax.jit(step_fn, in_shardings=(replicated, batch_sharding),
                     out_shardings=replicated, donate_argnums=(0,))

    def sharded_step(state, batch):
      specs = self.state_specs(state)
      # check_vma=False: the step says itself (pmean) what is replicated, as under pmap.
      mapped = jax.shard_map(step_fn, mesh=self.mesh, in_specs=(specs, P(AXIS)),
                             out_specs=(specs, P()), check_vma=False)
      return mapped(state, batch)

    return jax.jit(sharded_step, donate_argnums=(0,))

  def put_batch(self, batch: dict[str, np.ndarray]) -> Any:
    """This host's slice of a global batch → the step's batch argument."""
    if self.mode == "pmap":
      return split_for_pmap(batch, jax.local_device_count())
    return shard_batch(batch, self.mesh)

  def put_state(self, state: Any) -> Any:
    """A global state (as `global_state` gives) → the step's state argument."""
    state = host_copy(state)
    if self.mode == "pmap":
      local = Mesh(np.asarray(jax.local_devices()), (AXIS,))
      count = jax.local_device_count()
      return jax.device_put(
          jax.tree.map(lambda x: np.broadcast_to(x, (count, *x.shape)), state),
          NamedSharding(local, P(AXIS)))
    return place(state, self._shardings(state, self.mesh))

  def from_host(self, state: Any) -> Any:
    """The whole state as host (or single-device) arrays → global arrays over the mesh of all
    devices, the centres sharded with `shard_head`: the layout checkpoints store."""
    return place(state, self._shardings(state, make_mesh()))

  def global_state(self, state: Any) -> Any:
    """The step's state → `from_host`'s layout."""
    return self.from_host(self.local_state(state))

  def local_state(self, state: Any) -> Any:
    """The step's state → NumPy arrays of the whole state (for evaluation and statistics)."""
    if self.mode == "pmap":
      # A pmap state's shard on this host's first device is (1, ...): one copy of each leaf.
      return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data)[0], state)
    return host_copy(state)


def parallel_for(mode: str, *, shard_head: bool = False) -> DataParallel:
  """The `DataParallel` of `config.train.parallel` ('pmap', 'mesh' or 'none') and `config.head.sharded`."""
  if mode not in MODES:
    raise ValueError(f"unknown parallel mode {mode!r}; known: {', '.join(MODES)}")
  if shard_head and mode != "mesh":
    raise ValueError(f"a sharded head (config.head.sharded) runs under train.parallel='mesh', "
                     f"got {mode!r}")
  if shard_head:
    return DataParallel(mode, make_mesh(), shard_head=True)
  if mode == "none":
    if jax.process_count() > 1:
      raise ValueError("parallel='none' runs on one device; a multi-process run needs "
                       "'pmap' or 'mesh'")
    return DataParallel(mode, make_mesh(jax.devices()[:1]))
  return DataParallel(mode, make_mesh())

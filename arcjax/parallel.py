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

Whatever the mode, `DataParallel.global_state` gives the state as global arrays
replicated over the mesh of all devices: what checkpoints store, so a
checkpoint restores under any mode and any number of devices or hosts.
"""

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXIS = "batch"
MODES = ("pmap", "mesh", "none")

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


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Host values (equal on every process) → global arrays replicated over `mesh`."""
  sharding = NamedSharding(mesh, P())

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def host_copy(tree: Any) -> Any:
  """Replicated (global or single-device) arrays → NumPy arrays of this process."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data), tree)


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
  `parallel_for(mode)` to build one.
  """
  mode: str
  mesh: Mesh

  @property
  def num_devices(self) -> int:
    """Devices that share each global batch."""
    return self.mesh.devices.size

  @property
  def axis_name(self) -> str | None:
    """The axis name a step's collectives use (only pmap's step sees one)."""
    return AXIS if self.mode == "pmap" else None

  def wrap(self, step_fn: Callable[..., Any]) -> Callable[..., Any]:
    """`step_fn(state, batch, *, axis_name)` → the compiled step over the devices.

    The state argument is donated: its buffers are reused for the new state.
    """
    step_fn = functools.partial(step_fn, axis_name=self.axis_name)
    if self.mode == "pmap":
      return jax.pmap(step_fn, axis_name=AXIS, donate_argnums=(0,))
    replicated = NamedSharding(self.mesh, P())
    return jax.jit(step_fn, in_shardings=(replicated, NamedSharding(self.mesh, P(AXIS))),
                   out_shardings=replicated, donate_argnums=(0,))

  def put_batch(self, batch: dict[str, np.ndarray]) -> Any:
    """This host's slice of a global batch → the step's batch argument."""
    if self.mode == "pmap":
      return split_for_pmap(batch, jax.local_device_count())
    return shard_batch(batch, self.mesh)

  def put_state(self, state: Any) -> Any:
    """A global replicated state (as `global_state` gives) → the step's state argument."""
    if self.mode == "pmap":
      local = Mesh(np.asarray(jax.local_devices()), (AXIS,))
      count = jax.local_device_count()
      return jax.device_put(
          jax.tree.map(lambda x: np.broadcast_to(x, (count, *x.shape)), host_copy(state)),
          NamedSharding(local, P(AXIS)))
    return replicate(host_copy(state), self.mesh)

  def global_state(self, state: Any) -> Any:
    """The step's state → global arrays replicated over the mesh of all devices."""
    return replicate(self.local_state(state), make_mesh())

  def local_state(self, state: Any) -> Any:
    """The step's state → NumPy arrays on this host (for evaluation and statistics)."""
    state = host_copy(state)
    # A pmap state's shard on this host's first device is (1, ...): one copy of each leaf.
    return jax.tree.map(lambda x: x[0], state) if self.mode == "pmap" else state


def parallel_for(mode: str) -> DataParallel:
  """The `DataParallel` of `config.train.parallel`: 'pmap', 'mesh' or 'none'."""
  if mode not in MODES:
    raise ValueError(f"unknown parallel mode {mode!r}; known: {', '.join(MODES)}")
  if mode == "none":
    if jax.process_count() > 1:
      raise ValueError("parallel='none' runs on one device; a multi-process run needs "
                       "'pmap' or 'mesh'")
    return DataParallel(mode, make_mesh(jax.devices()[:1]))
  return DataParallel(mode, make_mesh())

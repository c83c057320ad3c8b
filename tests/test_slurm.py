"""What `--target=slurm` relies on: `jax.distributed.initialize()` with no arguments
starts a multi-process run from the environment srun gives each task.

JAX's SLURM detection (jax/_src/clusters/slurm_cluster.py) needs SLURM_JOB_ID,
SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID. The
coordinator is the first host of SLURM_STEP_NODELIST, on port
JAX_COORDINATOR_PORT if set, else 61440 + SLURM_JOB_ID mod 4096; the process
count is SLURM_NTASKS, the process id SLURM_PROCID, and (off Cloud TPU) only
the local device SLURM_LOCALID stays visible unless JAX_LOCAL_DEVICE_IDS says
otherwise — which is why the launcher's script exports JAX_LOCAL_DEVICE_IDS
for its one task per node.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

TIMEOUT_S = 300

WORKER = textwrap.dedent("""\
    import json
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    jax.distributed.initialize()
    gathered = multihost_utils.process_allgather(np.array([jax.process_index()]))
    print(json.dumps({"count": jax.process_count(), "index": jax.process_index(),
                      "gathered": np.asarray(gathered).ravel().tolist()}), flush=True)
    jax.distributed.shutdown()
    """)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _slurm_env(process_id: int, port: int) -> dict[str, str]:
  """What srun gives task `process_id` of 2, one task per node, both nodes this machine."""
  environ = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "JAX_", "XLA_")) and "proxy" not in k.lower()}
  return {**environ, "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_PORT": str(port),
          "SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": "2",
          "SLURM_STEP_NUM_NODES": "2", "SLURM_PROCID": str(process_id), "SLURM_LOCALID": "0"}


def test_two_processes_start_from_a_slurm_environment(tmp_path):
  port = _free_port()
  processes = [subprocess.Popen([sys.executable, "-c", WORKER], cwd=tmp_path,
                                env=_slurm_env(i, port), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = []
  try:
    for process in processes:
      outputs.append(process.communicate(timeout=TIMEOUT_S))
  except subprocess.TimeoutExpired:
    pytest.skip(f"two local JAX processes did not meet within {TIMEOUT_S} s on 127.0.0.1:{port}"
                " (is loopback networking available here?)")
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.communicate()
  for process, (out, err) in zip(processes, outputs):
    if process.returncode != 0 and "Address already in use" in err:
      pytest.skip(f"port {port} was taken before the coordinator listened on it")
    assert process.returncode == 0, err[-3000:]
  results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
  assert results == [{"count": 2, "index": i, "gathered": [0, 1]} for i in range(2)]


def test_jax_derives_the_coordinator_the_script_documents(monkeypatch):
  """The facts behind the sbatch script, read from JAX's own detection (no processes)."""
  clusters = pytest.importorskip("jax._src.clusters")
  for key in list(os.environ):
    if key.startswith(("SLURM_", "JAX_")):
      monkeypatch.delenv(key)
  env = {"SLURM_JOB_ID": "123457", "SLURM_STEP_NODELIST": "gpu[007-008],gpu011",
         "SLURM_NTASKS": "3", "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  detect = clusters.ClusterEnv.auto_detect_unset_distributed_params
  # 61440 + 123457 mod 4096 = 61440 + 577 = 62017; the first host of the node list.
  assert detect(None, None, None, None, None, None) == ("gpu007:62017", 3, 2, [0])
  monkeypatch.setenv("JAX_COORDINATOR_PORT", "5555")
  assert detect(None, None, None, None, None, None)[0] == "gpu007:5555"
  # Device ids given (as jax.distributed.initialize does from JAX_LOCAL_DEVICE_IDS) are kept.
  assert detect(None, None, None, [0, 1, 2, 3], None, None)[3] == [0, 1, 2, 3]

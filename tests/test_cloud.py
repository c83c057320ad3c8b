"""Workdirs and data in a bucket: a run, its resume, a grid's collect, load_run and the evaluate
command on gs:// (a Google Cloud Storage emulator on 127.0.0.1); data staged with checksums;
the lock's heartbeat where the filesystem has no flock."""

import json
import pathlib
import subprocess
import sys
import textwrap
import time

import pytest

from arcjax import errors, workdir

REPO = pathlib.Path(__file__).resolve().parents[1]
PATIENCE = 900  # seconds a slow, shared CI machine may take (not a speed assertion)
SMALL = ("--config.train.batch_size=32", "--config.model.embedding_dim=32",
         "--config.train.checkpoint_every=5", "--config.train.log_every=5",
         "--config.data.max_pairs=200", "--config.eval.every=0", "--config.angles.probe_size=64")


def _python(env, *args: str, cwd=REPO) -> subprocess.CompletedProcess:
  result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=PATIENCE)
  assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
  return result


def _read_gs(env, path: str) -> str:
  return _python(env, "-c", f"from etils import epath; print(epath.Path({path!r}).read_text())"
                 ).stdout


@pytest.mark.slow
def test_a_run_in_a_bucket_resumes_and_is_read_back(gcs, tmp_path):
  run = "gs://bucket/grid/arcface"
  _python(gcs, "-m", "arcjax.main", "--config=configs/default.py", f"--workdir={run}",
          "--config.train.steps=10", *SMALL)
  _python(gcs, "-m", "arcjax.main", "--config=configs/default.py", f"--workdir={run}",
          "--config.train.steps=15", *SMALL)  # resumes from the checkpoint of step 10
  results = json.loads(_read_gs(gcs, f"{run}/results.json"))
  assert results["step"] == 15
  rows = [json.loads(line) for line in _read_gs(gcs, f"{run}/metrics.jsonl").splitlines() if line]
  assert [row["step"] for row in rows if "train/loss" in row] == [5, 10, 15]
  assert not list(tmp_path.glob("gs:*")) and not (REPO / "gs:").exists()

  table = _python(gcs, "-m", "experiments.collect", "gs://bucket/grid").stdout
  assert "arcface" in table and f"{100 * results['eval']['holdout']['accuracy']:.2f}" in table
  evaluated = _python(gcs, "-m", "arcjax.evaluate", f"--workdir={run}")
  record = evaluated.stdout.split("record: ")[1].split()[0]
  assert record.startswith(f"{run}/evaluations/step15-own-")
  assert json.loads(_read_gs(gcs, record))["eval"] == results["eval"]
  assert "holdout" in evaluated.stdout
  loaded = _python(gcs, "-c", textwrap.dedent(f"""\
      import numpy as np
      from arcjax import inference
      run = inference.load_run({run!r})
      images = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 1), dtype=np.uint8)
      print(run.step, run.centres.shape, run.embed(images).shape)
      """)).stdout.split()
  assert loaded == ["15", "(200,", "32)", "(3,", "32)"]


@pytest.mark.slow
def test_checkpoints_in_a_bucket_carry_their_sha256_and_damage_is_moved_aside(gcs):
  checked = _python(gcs, "-c", textwrap.dedent("""\
      import jax, jax.numpy as jnp
      from etils import epath
      from arcjax import workdir
      directory = workdir.as_path("gs://bucket/sums")
      state = lambda v: {"w": jnp.full((64, 64), v, jnp.float32)}
      checkpoints = workdir.Checkpoints(directory, keep=5)
      for step in (1, 2):
        checkpoints.save(step, state(float(step)), {"step": step})
      checkpoints.close()
      sums = workdir.read_checksums(directory / "checkpoints" / "2")
      name = max(sums, key=lambda n: (directory / "checkpoints" / "2" / n).stat().length)
      file = directory / "checkpoints" / "2" / name
      data = bytearray(file.read_bytes())
      data[len(data) // 2] ^= 0x01
      file.write_bytes(bytes(data))
      device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      abstract = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=device)}
      checkpoints = workdir.Checkpoints(directory, keep=5)
      state, meta = checkpoints.restore_latest(abstract, {"w": False})
      checkpoints.close()
      print("restored", meta["step"], float(state["w"][0, 0]))
      print("kept", checkpoints.all_steps())
      """))
  assert "checkpoint 2 in gs://bucket/sums/checkpoints is damaged" in checked.stdout, checked.stdout
  assert "restored 1 1.0" in checked.stdout and "kept [1]" in checked.stdout


@pytest.mark.slow
def test_bucket_data_is_staged_once_and_checked(gcs, tmp_path):
  faces = tmp_path / "faces"
  _python(gcs, "-c", textwrap.dedent(f"""\
      import numpy as np
      from PIL import Image
      rng = np.random.default_rng(0)
      for person in range(6):
        folder = {str(tmp_path / 'people')!r} + f"/p{{person}}"
        __import__("os").makedirs(folder)
        for i in range(6):
          Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8)).save(f"{{folder}}/{{i}}.png")
      """))
  _python(gcs, "-m", "arcjax.data.convert", str(tmp_path / "people"), str(faces), "--size", "24",
          "--holdout-identities", "2", "--format", "png")
  upload = textwrap.dedent(f"""\
      import hashlib, pathlib
      from etils import epath
      sums = []
      for file in sorted(pathlib.Path({str(faces)!r}).iterdir()):
        epath.Path("gs://bucket/faces", file.name).write_bytes(file.read_bytes())
        sums.append(f"{{hashlib.sha256(file.read_bytes()).hexdigest()}}  {{file.name}}")
      epath.Path("gs://bucket/faces/SHA256SUMS").write_text("\\n".join(sums) + "\\n")
      """)
  _python(gcs, "-c", upload)
  train = ("-m", "arcjax.main", "--config=configs/default.py", "--config.data.name=recordio",
           "--config.data.path=gs://bucket/faces", f"--config.data.stage_dir={tmp_path / 'stage'}",
           "--config.data.image_size=(24, 24)", "--config.data.num_holdout_identities=0",
           "--config.train.steps=4", "--config.train.batch_size=8", "--config.model.embedding_dim=16",
           "--config.angles.probe_size=8", "--config.eval.every=0")
  _python(gcs, *train, f"--workdir={tmp_path / 'run'}")
  manifest = json.loads((tmp_path / "stage" / ".arcjax_staged.json").read_text())
  assert manifest["source"] == "gs://bucket/faces" and "train.rec" in manifest["files"]
  results = json.loads((tmp_path / "run" / "results.json").read_text())
  assert set(results["eval"]) == {"holdout"}  # the staged .bin, beside the staged train.rec

  # A copy that does not match the bucket's SHA256SUMS is refused, in one line.
  _python(gcs, "-c", "from etils import epath; epath.Path('gs://bucket/faces/SHA256SUMS')"
          ".write_text('0' * 64 + '  train.idx\\n')")
  bad = subprocess.run([sys.executable, *train, f"--workdir={tmp_path / 'run2'}",
                        f"--config.data.stage_dir={tmp_path / 'stage2'}"],
                       cwd=REPO, env=gcs, capture_output=True, text=True, timeout=PATIENCE)
  assert bad.returncode == 1 and "Traceback" not in bad.stderr
  assert "error: staging gs://bucket/faces/train.idx: SHA-256 of the copy" in bad.stderr


def test_the_heartbeat_lock_where_there_is_no_flock(tmp_path, capsys):
  """The cloud lock, exercised on a local folder: held, refused, released, stale, taken over."""
  directory = workdir.as_path(tmp_path)
  first = workdir.RunLock(directory, heartbeat=True, heartbeat_s=0.05).acquire()
  holder = json.loads((tmp_path / "lock").read_text())
  with pytest.raises(errors.WorkdirError, match=f"in use by pid {holder['pid']}"):
    workdir.RunLock(directory, heartbeat=True, heartbeat_s=0.05).acquire()
  beat = holder["heartbeat"]
  deadline = time.monotonic() + PATIENCE
  while json.loads((tmp_path / "lock").read_text())["heartbeat"] == beat:
    assert time.monotonic() < deadline, "the holder never renewed its heartbeat"
    time.sleep(0.05)
  first.release()
  assert not (tmp_path / "lock").exists()
  # A lock of another host whose heartbeat is older than stale_after_s is taken over.
  (tmp_path / "lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "then",
                                             "id": "x", "heartbeat": time.time() - 1000}))
  second = workdir.RunLock(directory, heartbeat=True, heartbeat_s=0.05, stale_after_s=90).acquire()
  assert "taking over the stale lock" in capsys.readouterr().out
  second.release()
  # Its heartbeat fresh, it is refused.
  (tmp_path / "lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "then",
                                             "id": "x", "heartbeat": time.time()}))
  with pytest.raises(errors.WorkdirError, match="pid 1 on host elsewhere"):
    workdir.RunLock(directory, heartbeat=True, heartbeat_s=0.05).acquire()

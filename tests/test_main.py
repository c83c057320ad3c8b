"""The command line: config overrides, one-line errors before any compile, a cheap start,
and a short real run with its evaluate and embed commands."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# Seconds: how long a slow, shared CI machine may take (not a speed assertion).
PATIENCE = 600


def _run(*args: str, python_flags=()) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *python_flags, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=PATIENCE,
                        env={**os.environ, "WANDB_MODE": "disabled", "XLA_FLAGS": ""})


def _main(workdir: pathlib.Path, *overrides: str, python_flags=()) -> subprocess.CompletedProcess:
  return _run("-m", "arcjax.main", "--config=configs/default.py", f"--workdir={workdir}",
              *overrides, python_flags=python_flags)


@pytest.mark.parametrize("override, message", [
    ("--config.train.stepz=5", "error: configs/default.py: unknown config key "
                               "config.train.stepz: config.train has no stepz (did you mean "
                               "steps?); its keys: batch_size, checkpoint_every, grad_clip,"),
    ("--config.nosuch.field=1", "error: configs/default.py: unknown config key "
                                "config.nosuch.field: config has no nosuch; its keys: angles, "
                                "data, eval, head, loss, model, seed, train, wandb"),
    # The margin is its values (s, m1, m2, m3): a preset name would be a label nothing reads.
    ("--config.loss.preset=cosface", "error: configs/default.py: unknown config key "
                                     "config.loss.preset: config.loss has no preset"),
    ("--config.loss.preset=nosuch", "error: configs/default.py: unknown config key "
                                    "config.loss.preset: config.loss has no preset"),
    ("--config.train.steps=many", "--config.train.steps=many: invalid literal for int()"),
    ("--config.train.steps=-5", "error: config.train.steps must be an int > 0, got -5"),
    ("--config.loss.s=0", "error: config.loss: scale s must be > 0, got s=0.0"),
    ("--config.loss.m2=4.0", "m2 must be in [0, pi), got m2=4.0"),
    ("--config.train.parallel=ddp", "error: config.train.parallel must be one of"),
    ("--config.train.lr=inf", "error: config.train.lr must be finite and > 0, got inf"),
    ("--config.data.num_holdout_identities=241",
     "error: the data has 242 identities; with num_holdout_identities=241 held out, training "
     "needs at least 2"),
    ("--config.train.batch_size=4096", "error: config.train.batch_size=4096 is larger than the"),
])
def test_bad_config_fails_with_one_line_before_anything_compiles(tmp_path, override, message):
  result = _main(tmp_path / "run", override)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("config, message", [
    ("configs/nonexist.py", "error: cannot read the config file: No such file or directory"),
    ("configs/ablations.py:arcfac", "ValueError: unknown row 'arcfac' of configs/ablations.py"),
])
def test_a_bad_config_file_or_row_is_one_line(tmp_path, config, message):
  result = _run("-m", "arcjax.main", f"--config={config}", f"--workdir={tmp_path}")
  assert result.returncode == 1 and message in result.stderr, result.stderr[-2000:]
  assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_mistyped_flag_is_reported_before_the_heavy_imports(tmp_path):
  """What makes a bad flag quick: nothing of the training stack is imported to report it."""
  result = _main(tmp_path / "run", "--config.train.stepz=5", python_flags=("-X", "importtime"))
  assert result.returncode != 0 and "unknown config key config.train.stepz" in result.stderr
  imported = {line.split("|")[-1].strip().split(".")[0]
              for line in result.stderr.splitlines() if line.startswith("import time:")}
  assert "jax" in imported  # sanity: the import log was read
  assert not imported & {"orbax", "flax", "optax", "tensorflow_datasets", "sklearn", "wandb"}


def test_a_gs_workdir_without_credentials_fails_at_once_and_writes_nothing_here(tmp_path):
  env = {key: value for key, value in os.environ.items()
         if key not in ("GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST")}
  result = subprocess.run(
      [sys.executable, "-m", "arcjax.main", f"--config={REPO / 'configs' / 'default.py'}",
       "--workdir=gs://some-bucket/run", "--config.train.steps=2"],
      cwd=tmp_path, capture_output=True, text=True, timeout=PATIENCE,
      env={**env, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled",
           "CLOUDSDK_CONFIG": str(tmp_path / "no-gcloud")})
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert "error: cannot use workdir gs://some-bucket/run:" in result.stderr, result.stderr[-2000:]
  assert list(tmp_path.iterdir()) == []  # no local 'gs:' folder


@pytest.mark.slow
def test_short_run_then_evaluate_and_embed_it(tmp_path, capsys):
  run = tmp_path / "run"
  result = _main(run, "--config.train.steps=20", "--config.train.log_every=10",
                 "--config.train.checkpoint_every=10",
                 "--config.train.batch_size=64", "--config.eval.every=10",
                 "--config.data.max_pairs=600", "--config.angles.probe_size=100")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "loss=" in result.stderr and "img_s=" in result.stderr
  assert "step 10 verification:" in result.stdout
  assert "final verification (step 20):" in result.stdout
  results = json.loads((run / "results.json").read_text())
  config = json.loads((run / "config.json").read_text())
  assert config["train"]["steps"] == 20 and results["step"] == 20
  assert 0.5 <= results["eval"]["holdout"]["accuracy"] <= 1.0
  stats = results["angle_stats"]
  for name in ("w_ec_deg", "w_inter_deg", "intra1_deg", "inter1_deg", "intra2_deg",
               "inter2_deg"):  # Intra2 / Inter2 on the held-out identities
    assert 0.0 < stats[name] < 180.0, (name, stats)
  for step in (0, 10, 20):
    assert (run / "angles" / f"theta_step{step:08d}.npz").exists()

  # The evaluate command reproduces results.json exactly, from a relative workdir.
  evaluated = subprocess.run([sys.executable, "-m", "arcjax.evaluate", "--workdir=run"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=PATIENCE,
                             env={**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": ""})
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  [own] = (run / "evaluations").glob("step20-own-*.json")
  record = json.loads(own.read_text())
  assert record["eval"] == results["eval"] and record["source"]["kind"] == "the run's own sets"
  assert f"{100 * results['eval']['holdout']['accuracy']:.2f}" in evaluated.stdout
  assert f"record: {own}" in evaluated.stdout
  # An earlier checkpoint too.
  evaluated = _run("-m", "arcjax.evaluate", f"--workdir={run}", "--step=10")
  assert evaluated.returncode == 0 and list((run / "evaluations").glob("step10-own-*.json"))

  # Another dataset's holdout.bin: a record of its own, keyed and labelled by the file's path
  # and SHA-256; the run's own record stays as it was.
  other = _a_small_bin(tmp_path / "other" / "holdout.bin")
  own_before = own.read_bytes()
  evaluated = _run("-m", "arcjax.evaluate", f"--workdir={run}", f"--bins={other}")
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert own.read_bytes() == own_before
  [foreign] = (run / "evaluations").glob("step20-holdout-*.json")
  source = json.loads(foreign.read_text())["source"]
  assert source == {"kind": "files", "sets": {"holdout": {
      "path": str(other), "sha256": hashlib.sha256(other.read_bytes()).hexdigest()}}}

  # The embed command: one unit row per image file, in the file list's order.
  images = tmp_path / "images" / "a"
  images.mkdir(parents=True)
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (50, 40), dtype=np.uint8)).save(images / f"{i}.png")
  embedded = _run("-m", "arcjax.embed", f"--workdir={run}", f"--images={images.parent}",
                  f"--out={tmp_path / 'emb'}")
  assert embedded.returncode == 0, embedded.stderr[-3000:]
  vectors = np.load(tmp_path / "emb.npy")
  assert vectors.shape == (3, 128) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
  assert (tmp_path / "emb.txt").read_text().split() == ["a/0.png", "a/1.png", "a/2.png"]

  # In this process from here: load_run, and the embed command's refusals.
  from arcjax import embed, inference  # pylint: disable=import-outside-toplevel
  loaded = inference.load_run(run)
  np.testing.assert_allclose(loaded.embed(str(images / "1.png")), vectors[1:2], atol=1e-5)
  with pytest.raises(SystemExit):  # the outputs exist: never replaced without --overwrite
    embed.main([f"--workdir={run}", f"--images={images.parent}", f"--out={tmp_path / 'emb'}"])
  assert "exist already: --overwrite replaces them" in capsys.readouterr().err
  (images / "2.png").write_bytes(b"not an image")
  with pytest.raises(SystemExit):
    embed.main([f"--workdir={run}", f"--images={images.parent}", f"--out={tmp_path / 'emb'}",
                "--overwrite"])
  assert f"({images / '2.png'}): cannot decode image" in capsys.readouterr().err

  # A checkpoint whose bytes changed is named and skipped by load_run (and moved by no reader).
  newest = run / "checkpoints" / "20"
  file = max((p for p in newest.rglob("*") if p.is_file() and p.name != "SHA256SUMS"),
             key=lambda p: p.stat().st_size)
  data = bytearray(file.read_bytes())
  data[len(data) // 2] ^= 0x01
  file.write_bytes(bytes(data))
  assert inference.load_run(run).step == 10
  assert "checkpoint 20 in" in capsys.readouterr().out and newest.is_dir()
  from arcjax import errors  # pylint: disable=import-outside-toplevel
  with pytest.raises(errors.WorkdirError, match="checkpoint 20 in .* is damaged"):
    inference.load_run(run, 20)


def _a_small_bin(path: pathlib.Path) -> pathlib.Path:
  """A verification .bin of 40 pairs of random 40×40 grey images (another dataset's)."""
  import io  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from arcjax.data import pairs  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(1)
  encoded = []
  for _ in range(80):
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(buffer, format="PNG")
    encoded.append(buffer.getvalue())
  path.parent.mkdir(parents=True)
  pairs.write_bin(path, encoded, np.arange(40) % 2 == 0)
  return path

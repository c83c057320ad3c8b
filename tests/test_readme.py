"""Every command of README.md and benchmarks/README.md runs as written on a fresh copy of the
repository with nothing beside it: the quick ones as they are, the long ones shortened by the
flags listed here, the ones that need what a fresh machine lacks (CASIA, a bucket) to their
one-line error. A command added to a README without an entry here fails the test."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PATIENCE = 1200  # seconds a slow, shared CI machine may take (not a speed assertion)
SHORT = " --config.train.steps=20 --config.eval.every=0"

# README command -> (what to append, expected exit status, text the output must hold).
# None: not run here (the reason in the comment).
README = {
    # .ci/run runs this set-up command itself, in full; here its run, shortened, for what follows.
    "pip install -q -r requirements.txt && pip install -q -e . && python -m arcjax.main "
    "--config=configs/default.py --workdir=runs/default": (SHORT, 0, "final verification (step 20)"),
    "python -m pytest -q -n 2": None,  # the tests themselves
    "python -m arcjax.evaluate --workdir=runs/default": ("", 0, "verification of runs/default"),
    "python -m arcjax.embed --workdir=runs/default --images=arcjax/data/omniglot/"
    "images_background_small2.zip --out=runs/default_embeddings": ("", 0, "3120 embeddings"),
    # Needs insightface's IJB-C folder, which a fresh machine has not: one line.
    "python -m arcjax.evaluate --workdir=runs/default --ijb=IJB_release/IJBC":
        ("", 1, "IJB_release/IJBC must hold meta/ and loose_crop/"),
    "python -m arcjax.main --config=configs/ablations.py:arcface --workdir=runs/arcface":
        (SHORT, 0, "final verification (step 20)"),
    "python -m experiments.launch --grid=configs/ablations.py:table5 --workdir=runs/cpu --seeds=3 "
    "--parallel=2": (" --override config.train.steps=3 config.eval.every=0 "
                     "config.angles.probe_size=64", 0, "15 finished, 0 failed"),
    "python -m experiments.collect runs/cpu": ("", 0, "| arcface | 3 |"),
    "python -m experiments.launch --grid=configs/ablations.py:table5 --workdir=runs/cpu_packs "
    "--seeds=3 --vectorize --parallel=2": (" --override config.train.steps=3 config.eval.every=0 "
                                           "config.angles.probe_size=64", 0,
                                           "15 finished, 0 failed"),
    # One seed of each of the family grid's 10 rows, 3 steps (tests/test_configs.py also
    # trains every family row on a fresh copy).
    "python -m experiments.launch --grid=configs/ablations.py:family --workdir=runs/family "
    "--seeds=3 --parallel=2": (" --seeds=1 --override config.train.steps=3 config.eval.every=0 "
                               "config.angles.probe_size=64", 0, "10 finished, 0 failed"),
    "python -m experiments.collect runs/family --reference=arcface,warmup=300":
        ("", 0, "| magface | 1 |"),
    "python -m arcjax.data.convert arcjax/data/omniglot/images_background_small1.zip "
    "data/omniglot_faces --size 112 --fit resize --holdout-identities 8 --max-pairs 200":
        ("", 0, "wrote 200 verification pairs"),
    "python -m arcjax.main --config=configs/ablations.py:arcface,setting=paper "
    "--workdir=runs/paper_smoke --config.data.path=omniglot_faces --config.train.steps=4 "
    "--config.train.batch_size=16 --config.angles.probe_size=256":
        ("", 0, "final verification (step 4)"),
    # Needs CASIA-WebFace, which a fresh machine has not: it stops at once, in one line.
    "python -m arcjax.main --config=configs/ablations.py:arcface,setting=paper "
    "--workdir=runs/arcface_paper --config.model.dtype=bfloat16":
        ("", 1, "error: config.data.path: "),
    # A zoo file, which a fresh machine has not: one line each, nothing written.
    "python -m arcjax.from_onnx ~/.insightface/models/buffalo_l/w600k_r50.onnx "
    "--workdir=runs/w600k_r50": ("", 1, "w600k_r50.onnx does not exist"),
    "python -m arcjax.evaluate --workdir=runs/w600k_r50 --bins=faces_emore/lfw.bin,"
    "faces_emore/cfp_fp.bin,faces_emore/agedb_30.bin": ("", 1, "holds no run"),
    # Needs CASIA-WebFace too: the data is the first thing it checks.
    "python -m arcjax.main --config=configs/ablations.py:arcface,setting=paper "
    "--workdir=runs/w600k_r50_casia --config.train.init_from=runs/w600k_r50 "
    "--config.model.input_std=127.5": ("", 1, "error: config.data.path: "),
    "python -m arcjax.export --workdir=runs/default --out=runs/default.onnx":
        ("", 0, "differ from load_run(...).embed's by at most"),
    "python -m arcjax.from_onnx runs/default.onnx --workdir=runs/default_imported":
        ("", 0, "imported runs/default.onnx as tiny_cnn"),
    "python -m arcjax.evaluate --workdir=runs/default_imported --bins=omniglot_faces/holdout.bin":
        ("", 0, "verification of runs/default_imported"),
    "python -m arcjax.embed --workdir=runs/default_imported --images=arcjax/data/omniglot/"
    "images_background_small2.zip --out=runs/imported_embeddings": ("", 0, "3120 embeddings"),
    "python -m arcjax.main --config=configs/default.py --workdir=runs/finetuned "
    "--config.train.init_from=runs/default_imported":
        (SHORT, 0, "its 4 folded BatchNorms calibrated on 256 training images; centres fresh: "
                   "runs/default_imported has no centres"),
    "python -m arcjax.export --workdir=runs/finetuned --out=runs/finetuned.onnx":
        ("", 0, "wrote runs/finetuned.onnx"),
    "python -m experiments.launch --grid=configs/ablations.py:table2,setting=paper --target=slurm "
    "--workdir=runs/table2_paper --nodes=2 --gpus-per-node=8 --partition=gpu "
    "--time=2-00:00:00 --slurm-setup='source .venv/bin/activate' --dry-run":
        ("", 0, "#SBATCH --nodes=2"),
    "python -m experiments.launch --grid=configs/ablations.py:table5,setting=paper "
    "--target=tpu-pod --tpu=NAME --zone=ZONE --bucket=gs://BUCKET/table5 --seeds=3 --dry-run":
        ("", 0, "gcloud compute tpus tpu-vm scp"),
    # Needs Google Cloud credentials, which a fresh machine has not: one line, nothing written.
    "python -m experiments.collect gs://BUCKET/table5": ("", 1, "error: cannot use"),
    "python -m arcjax.main --config=configs/ablations.py:arcface --workdir=runs/arcface_pfc "
    "--config.head.sharded=True --config.head.sample_rate=0.3 --config.head.chunk_size=8192":
        (SHORT, 0, "final verification (step 20)"),
}
# Every benchmark as documented, in its --smoke form (CI has no accelerator; the figures
# in benchmarks/README.md come from the full runs).
BENCHMARKS = {
    "python -m benchmarks.head": " --smoke",
    "python -m benchmarks.large_classes": " --smoke",
    "python -m benchmarks.train_step": " --smoke",
    "python -m benchmarks.recordio_throughput": " --smoke",
    "python -m benchmarks.input_pipeline": " --smoke",
    "bash benchmarks/device_check.sh": " --smoke",
    "python -m benchmarks.pack_step": " --smoke",
    "python -m benchmarks.grid": " --smoke",
}


def commands(readme: pathlib.Path) -> list[str]:
  """The commands of a README's ```sh blocks: continued lines joined, comments dropped."""
  found = []
  for block in re.findall(r"```sh\n(.*?)```", readme.read_text(), re.S):
    command = ""
    for line in block.splitlines():
      if not command and (not line.strip() or line.lstrip().startswith("#")):
        continue
      command += line.strip().removesuffix("\\").strip() + " "
      if not line.rstrip().endswith("\\"):
        found.append(re.sub(r"\s+#.*$", "", command.strip()))
        command = ""
  return found


def test_every_readme_command_has_its_entry_here():
  assert commands(REPO / "README.md") == [c for c in README], (
      "README.md's commands changed: update README in tests/test_readme.py")
  documented = commands(REPO / "benchmarks" / "README.md")
  assert sorted(set(documented)) == sorted(BENCHMARKS), documented


def _run(clone: pathlib.Path, command: str) -> subprocess.CompletedProcess:
  env = {key: value for key, value in os.environ.items()
         if key not in ("XLA_FLAGS", "PYTHONPATH", "GOOGLE_APPLICATION_CREDENTIALS",
                        "STORAGE_EMULATOR_HOST", "ARCJAX_DATA")}
  env.update(WANDB_MODE="disabled", CLOUDSDK_CONFIG=str(clone.parent / "no-gcloud"),
             PATH=f"{pathlib.Path(sys.executable).parent}:{env.get('PATH', '')}")
  return subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True,
                        text=True, timeout=PATIENCE)


@pytest.mark.slow
def test_the_readme_commands_run_on_a_fresh_copy(fresh_copy):
  clone = fresh_copy
  for command, how in README.items():
    if how is None:
      continue
    extra, status, expected = how
    if command.startswith("pip install"):
      # .ci/run installs (here an editable install would point at this temporary copy)
      command = command.rsplit("&& ", 1)[1]
    result = _run(clone, command + extra)
    output = result.stdout + result.stderr
    assert result.returncode == status and expected in output, (command, output[-3000:])
    assert "Traceback" not in output, (command, output[-3000:])
  assert not (clone / "gs:").exists()


@pytest.mark.slow
def test_the_benchmarks_run_as_documented(fresh_copy):
  clone = fresh_copy
  for command, extra in BENCHMARKS.items():
    result = _run(clone, command + extra)
    assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-3000:])
    assert "|---|" in result.stdout, (command, result.stdout[-2000:])  # its table

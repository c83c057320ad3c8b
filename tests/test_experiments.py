"""Tests of experiments/: the grid launcher (commands, statuses, seeds, SLURM and TPU-pod
dry runs, failures) and collect (seed statistics, marks, robustness).

Stand-in trainers only: a fake `arcjax/main.py` in a temporary cwd (found first
on sys.path by `python -m arcjax.main`) that builds its config as the real one
does and writes config.json and results.json.
"""

import csv
import io
import json
import math
import os
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap

import pytest
from etils.epath import testing as epath_testing

from arcjax import errors
from arcjax import workdir
from experiments import collect as collect_lib
from experiments import launch
from experiments import local
from experiments import plan
from experiments import slurm
from experiments import tpu_pod

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"

GRID = textwrap.dedent("""\
    import ml_collections

    def get_config(arg=None):
      if arg == "broken":
        raise ValueError("no such row 'broken'")
      config = ml_collections.ConfigDict()
      config.seed = 0
      config.lr = 0.1
      config.name = ""
      config.train = ml_collections.ConfigDict({"steps": 10, "log_every": 5})
      return config

    def sweep(arg=None):
      return {None: ["good", "bad", "done", "resume"], "small": ["good"],
              "pair": ["good", "norm_softmax"], "broken": ["good", "broken"]}[arg]
    """)

# Stands in for `python -m arcjax.main`: builds the config from its flags as the trainer
# does, fails for row 'bad', writes config.json, then results.json last.
FAKE_TRAINER = textwrap.dedent("""\
    import json, os, sys
    from absl import flags
    from ml_collections import config_flags
    values = flags.FlagValues()
    config = config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                             sys_argv=sys.argv)
    flags.DEFINE_string("workdir", None, "", flag_values=values)
    values(sys.argv)
    row = values["config"].serialize().rsplit(":", 1)[1].rstrip("'")
    print("training", row, flush=True)
    if row == "bad":
      print("boom", file=sys.stderr)
      sys.exit(3)
    os.makedirs(values.workdir, exist_ok=True)
    with open(os.path.join(values.workdir, "config.json"), "w") as f:
      f.write(config.value.to_json_best_effort())
    with open(os.path.join(values.workdir, "results.json"), "w") as f:
      json.dump({"step": config.value.train.steps, "argv": sys.argv[1:], "cwd": os.getcwd()}, f)
    """)

CONFIG_JSON = {"seed": 0, "lr": 0.1, "name": "", "train": {"steps": 10, "log_every": 5}}


@pytest.fixture
def grid_repo(tmp_path, monkeypatch) -> pathlib.Path:
  """A cwd holding grid.py, requirements.txt and a fake arcjax/main.py, as a repository."""
  (tmp_path / "grid.py").write_text(GRID)
  (tmp_path / "requirements.txt").write_text("# pinned\njaxlib==0.10.2\njax==0.10.2\n")
  (tmp_path / "arcjax").mkdir()
  (tmp_path / "arcjax" / "__init__.py").write_text("")
  (tmp_path / "arcjax" / "main.py").write_text(FAKE_TRAINER)
  monkeypatch.chdir(tmp_path)
  monkeypatch.delenv("PYTHONPATH", raising=False)
  return tmp_path


def _run_main(argv, **kwargs):
  out = io.StringIO()
  status = launch.main(argv, out=out, **kwargs)
  return status, out.getvalue()


def _write_workdir(run_dir: pathlib.Path, config=None, *, results_step=None,
                   checkpoint=False) -> None:
  """A run's workdir as the trainer leaves it: config.json, maybe a checkpoint and results."""
  run_dir.mkdir(parents=True, exist_ok=True)
  (run_dir / "config.json").write_text(json.dumps(config or CONFIG_JSON))
  if checkpoint:
    (run_dir / "checkpoints" / "10").mkdir(parents=True)
  if results_step is not None:
    (run_dir / "results.json").write_text(json.dumps({"step": results_step, "kept": True}))


# --- command builders -------------------------------------------------------------

def test_trainer_command_is_the_documented_argv():
  argv = plan.trainer_command("configs/ablations.py", "arcface_0.4", "runs/t2/arcface_0.4",
                                ["config.train.steps=300", "config.data.path=a b"],
                                python="python3")
  assert argv == ["python3", "-m", "arcjax.main", "--config=configs/ablations.py:arcface_0.4",
                  "--workdir=runs/t2/arcface_0.4", "--config.train.steps=300",
                  "--config.data.path=a b"]
  assert plan.trainer_command("g.py", "r", "w", distributed_auto=True,
                                python="p")[-1] == "--distributed_auto"


@pytest.mark.parametrize("bad", ["train.steps=3", "config.train.steps", "--config.x=1",
                                 "config.=1", "config.a..b=1"])
def test_override_must_be_config_field_equals_value(bad):
  with pytest.raises(ValueError, match="config.FIELD=VALUE"):
    plan.override_flag(bad)


def test_plan_runs_with_and_without_seeds():
  assert plan.plan_runs(["a", "b"], "runs/t", ["config.lr=1"]) == [
      plan.Run("a", None, "runs/t/a", ("config.lr=1",)),
      plan.Run("b", None, "runs/t/b", ("config.lr=1",))]
  runs = plan.plan_runs(["a", "b"], "gs://bkt/t", ["config.lr=1"], seeds=2)
  assert [(r.name, r.workdir, r.overrides) for r in runs] == [
      ("a/seed0", "gs://bkt/t/a/seed0", ("config.lr=1", "config.seed=0")),
      ("a/seed1", "gs://bkt/t/a/seed1", ("config.lr=1", "config.seed=1")),
      ("b/seed0", "gs://bkt/t/b/seed0", ("config.lr=1", "config.seed=0")),
      ("b/seed1", "gs://bkt/t/b/seed1", ("config.lr=1", "config.seed=1"))]
  assert [plan.seed_of(f) for f in ("seed0", "seed12", "seed", "seedx", "xseed1")] == [
      0, 12, None, None, None]


def test_tpu_pod_command_tilde_quoting_and_distributed_auto():
  run = plan.Run("cm1", None, "gs://bkt/table2/cm1", ("config.model.name=iresnet50",))
  argv = tpu_pod.tpu_pod_command("configs/ablations.py", run, tpu="pod-v4", zone="us-c2-b",
                                remote_dir="~/my repo")
  assert argv[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-v4",
                      "--zone=us-c2-b", "--worker=all"]
  assert argv[8] == ("--command=cd ~/'my repo' && python3 -m arcjax.main "
                     "--config=configs/ablations.py:cm1 --workdir=gs://bkt/table2/cm1 "
                     "--config.model.name=iresnet50 --distributed_auto")


@pytest.mark.parametrize("grid_path", ["/abs/grid.py", "../elsewhere/grid.py"])
def test_tpu_pod_command_rejects_grids_the_workers_cannot_see(grid_path):
  with pytest.raises(ValueError, match="inside the repository"):
    tpu_pod.tpu_pod_command(grid_path, plan.Run("a", None, "gs://b/a", ()), tpu="t", zone="z")


def test_pinned_jax_version(tmp_path):
  path = tmp_path / "requirements.txt"
  path.write_text("jaxlib==0.4.1\n# jax==9\njax==0.10.2  # pinned\nflax==1\n")
  assert tpu_pod.pinned_jax_version(str(path)) == "0.10.2"
  path.write_text("jaxlib==0.4.1\n")
  with pytest.raises(errors.ConfigError, match="pins no jax version"):
    tpu_pod.pinned_jax_version(str(path))


# --- grid loading and the trainer's config -------------------------------------------

def test_load_grid_passes_the_sweep_argument(grid_repo):
  assert plan.load_grid("grid.py") == ("grid.py", ["good", "bad", "done", "resume"])
  assert plan.load_grid("grid.py:small") == ("grid.py", ["good"])
  assert plan.grid_name("configs/ablations.py:table5,setting=paper") == "table5_setting_paper"
  assert plan.grid_name("grid.py") == "grid"


@pytest.mark.parametrize("source, match", [
    ("def get_config(arg=None): pass\n", "has no sweep"),
    ("def sweep(): return 'arcface'\n", "must return a list"),
    ("def sweep(): return ['a', 'a']\n", "more than once"),
    ("def sweep(): return ['a/b']\n", "not usable as a run directory"),
    ("def sweep(): return ['seed3']\n", "not usable as a run directory"),
    ("def sweep(): return []\n", "no rows"),
])
def test_load_grid_errors_name_the_file(tmp_path, source, match):
  path = tmp_path / "g.py"
  path.write_text(source)
  with pytest.raises(errors.ConfigError, match=match) as e:
    plan.load_grid(str(path))
  assert str(path) in str(e.value)


def test_trainer_config_parses_like_the_trainer(grid_repo):
  config = plan.trainer_config("grid.py", "good", ["config.train.steps=7", "config.seed=3",
                                                     "config.name=a 'b' c"])
  assert (config.train.steps, config.seed, config.name, config.lr) == (7, 3, "a 'b' c", 0.1)
  with pytest.raises(errors.ConfigError, match=r"^grid.py:good: unknown config key "):
    plan.trainer_config("grid.py", "good", ["config.train.stepz=7"])
  with pytest.raises(errors.ConfigError, match=r"grid.py:good: .*config.train.steps=x"):
    plan.trainer_config("grid.py", "good", ["config.train.steps=x"])
  with pytest.raises(errors.ConfigError, match=r"^grid.py:broken: ValueError: no such row"):
    plan.trainer_config("grid.py", "broken")


@pytest.mark.parametrize("override, message", [
    ("config.train.stepz=7", "config.train.stepz: config.train has no stepz (did you mean "
                             "steps?); its keys: log_every, steps"),
    ("config.trian.steps=7", "config.trian.steps: config has no trian (did you mean train?); "
                             "its keys: lr, name, seed, train"),
    ("config.nosuch=1", "config.nosuch: config has no nosuch; its keys: lr, name, seed, train"),
    ("config.lr.x=1", "config.lr.x: config.lr is 0.1, which has no keys"),
])
def test_an_unknown_override_names_the_key_and_the_known_ones_beside_it(grid_repo, override,
                                                                        message):
  with pytest.raises(errors.ConfigError) as error:
    plan.trainer_config("grid.py", "good", [override])
  assert str(error.value) == f"grid.py:good: unknown config key {message}"


def test_run_status_of_each_kind_of_workdir(grid_repo):
  runs = {row: plan.Run(row, None, f"runs/{row}", ()) for row in
          ("new", "unfinished", "finished", "more_steps", "changed", "changed_free")}
  _write_workdir(grid_repo / "runs" / "unfinished", checkpoint=True)
  _write_workdir(grid_repo / "runs" / "finished", checkpoint=True, results_step=10)
  _write_workdir(grid_repo / "runs" / "more_steps", {**CONFIG_JSON, "train": {
      "steps": 5, "log_every": 5}}, checkpoint=True, results_step=5)
  _write_workdir(grid_repo / "runs" / "changed", {**CONFIG_JSON, "lr": 0.5}, checkpoint=True)
  _write_workdir(grid_repo / "runs" / "changed_free", {**CONFIG_JSON, "train": {
      "steps": 10, "log_every": 1}}, checkpoint=True, results_step=10)
  status = {row: plan.run_status("grid.py", run) for row, run in runs.items()}
  assert {row: s for row, (s, _) in status.items()} == {
      "new": "new", "unfinished": "unfinished", "finished": "finished",
      "more_steps": "unfinished", "changed": "changed", "changed_free": "finished"}
  assert workdir.describe_changes(status["changed"][1]) == "lr: 0.5 → 0.1"


# --- command line: usage and one-line errors ---------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--grid=grid.py", "--target=gke", "--workdir=w"], "invalid choice: 'gke'"),
    (["--grid=grid.py", "--target=tpu-pod", "--bucket=gs://b"], "needs --tpu, --zone"),
    (["--grid=grid.py", "--target=tpu-pod", "--tpu=t", "--zone=z"], "needs --bucket"),
    (["--grid=grid.py", "--target=tpu-pod", "--tpu=t", "--zone=z", "--bucket=/local"],
     "--bucket must be a gs://"),
    (["--grid=grid.py", "--target=tpu-pod", "--tpu=t", "--zone=z", "--bucket=gs://b",
      "--workdir=w"], "--workdir is for --target=local or slurm"),
    (["--grid=grid.py"], "needs --workdir"),
    (["--grid=grid.py", "--target=slurm"], "--target=slurm needs --workdir"),
    (["--grid=grid.py", "--workdir=gs://b/x"], "needs a local (or shared) --workdir"),
    (["--grid=grid.py", "--workdir=w", "--tpu=t"], "--tpu only applies to --target=tpu-pod"),
    (["--grid=grid.py", "--workdir=w", "--nodes=2"], "--nodes only applies to --target=slurm"),
    (["--grid=grid.py", "--workdir=w", "--target=slurm", "--parallel=2"],
     "--parallel only applies to --target=local"),
    (["--grid=grid.py", "--workdir=w", "--parallel=0"], "--parallel must be >= 1"),
    (["--grid=grid.py", "--workdir=w", "--seeds=0"], "--seeds must be >= 1"),
    (["--grid=grid.py", "--workdir=w", "--seeds=2", "--override", "config.seed=4"],
     "drop --override config.seed"),
    (["--grid=grid.py", "--workdir=w", "--override", "steps=3"], "'steps=3'"),
])
def test_usage_errors(grid_repo, capsys, argv, message):
  with pytest.raises(SystemExit) as e:
    launch.main(argv + ["--dry-run"], out=io.StringIO())
  assert e.value.code == 2
  assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--grid=missing.py", "--workdir=w"], "error: grid file 'missing.py' does not exist"),
    (["--grid=grid.py:broken", "--workdir=w"], "error: grid.py:broken: ValueError: no such row"),
    (["--grid=grid.py", "--workdir=w", "--override", "config.trian.steps=3"],
     "error: grid.py:good: unknown config key config.trian.steps: config has no trian "
     "(did you mean train?); its keys: lr, name, seed, train\n"),
    (["--grid=grid.py:nosuch", "--workdir=w"], "error: grid.py:nosuch: KeyError: 'nosuch'\n"),
])
def test_expected_errors_are_one_line(grid_repo, capsys, argv, message):
  with pytest.raises(SystemExit) as e:
    launch.main(argv, out=io.StringIO())
  assert e.value.code == 1
  err = capsys.readouterr().err
  assert err.startswith(message) and err.count("\n") == 1, err
  with pytest.raises(errors.ConfigError):  # --traceback: the error itself
    launch.main(argv + ["--traceback"], out=io.StringIO())


def test_an_unknown_grid_of_the_ablations_names_the_known_ones(monkeypatch, capsys):
  monkeypatch.chdir(REPO)
  with pytest.raises(SystemExit) as e:
    launch.main(["--grid=configs/ablations.py:tabel5", "--workdir=w", "--dry-run"])
  assert e.value.code == 1
  known = "table2, table5, margins, gradient, large_margins"
  assert capsys.readouterr().err.startswith(
      f"error: configs/ablations.py:tabel5: ValueError: unknown grid 'tabel5'; known: {known}")


def test_a_run_folder_is_recognised_locally_and_in_a_bucket(tmp_path, monkeypatch):
  _write_workdir(tmp_path / "grid" / "arcface")
  (tmp_path / "grid" / "notes").mkdir()

  def on_disk(original, path, *args, **kwargs):
    assert os.fspath(path).startswith("gs://bkt/grid"), path
    return original(os.fspath(path).replace("gs://bkt", str(tmp_path), 1), *args, **kwargs)

  monkeypatch.setattr(workdir, "_gcs_credentials_hint", lambda: None)  # no gcsfs needed
  with epath_testing.mock_epath(exists=on_disk):
    in_bucket = [workdir.holds_run(f"gs://bkt/grid/{f}") for f in ("arcface", "notes")]
  assert in_bucket == [True, False]
  assert [workdir.holds_run(tmp_path / "grid" / f) for f in ("arcface", "notes")] == [True, False]


def test_a_mixed_layout_is_refused(grid_repo, capsys):
  _write_workdir(grid_repo / "runs" / "good")
  with pytest.raises(SystemExit):
    launch.main(["--grid=grid.py:small", "--workdir=runs", "--seeds=2", "--dry-run"])
  assert "runs/good holds a single run (no --seeds)" in capsys.readouterr().err
  _write_workdir(grid_repo / "seeded" / "good" / "seed1")
  with pytest.raises(SystemExit):
    launch.main(["--grid=grid.py:small", "--workdir=seeded", "--dry-run"])
  assert "seeded/good holds seeded runs (seed1): launch with --seeds" in capsys.readouterr().err


# --- command line: local runs ------------------------------------------------------

def test_local_dry_run_shows_each_status_and_the_commands_to_run(grid_repo):
  _write_workdir(grid_repo / "runs" / "done", results_step=10)
  _write_workdir(grid_repo / "runs" / "resume", {**CONFIG_JSON, "lr": 0.5}, checkpoint=True)
  (grid_repo / "runs" / "bad").mkdir()
  (grid_repo / "runs" / "bad" / "results.json").write_text('{"step": 10}')  # no config.json
  status, out = _run_main(["--grid=grid.py", "--workdir=runs", "--dry-run",
                           "--override", "config.name=x y"])
  assert status == 0

  def command(row):
    return shlex.join([sys.executable, "-m", "arcjax.main", f"--config=grid.py:{row}",
                       f"--workdir=runs/{row}", "--config.name=x y"])

  assert out.splitlines() == [
      "# good: new", command("good"),
      "# bad: new", command("bad"),  # results.json alone is not a finished run
      "# done: finished, skipped",
      '# resume: changed (lr: 0.5 → 0.1, name: "" → "x y"), not run']
  assert sorted(os.listdir(grid_repo / "runs")) == ["bad", "done", "resume"]


def test_local_dry_run_with_seeds(grid_repo):
  _write_workdir(grid_repo / "runs" / "good" / "seed1", {**CONFIG_JSON, "seed": 1},
                 results_step=10)
  status, out = _run_main(["--grid=grid.py:small", "--workdir=runs", "--seeds=3", "--dry-run"])
  assert status == 0
  assert out.splitlines() == [
      "# good/seed0: new",
      shlex.join([sys.executable, "-m", "arcjax.main", "--config=grid.py:good",
                  "--workdir=runs/good/seed0", "--config.seed=0"]),
      "# good/seed1: finished, skipped",
      "# good/seed2: new",
      shlex.join([sys.executable, "-m", "arcjax.main", "--config=grid.py:good",
                  "--workdir=runs/good/seed2", "--config.seed=2"])]


def test_local_runs_skip_finished_resume_unfinished_refuse_changed_survive_failures(grid_repo):
  runs = grid_repo / "runs"
  steps5 = {**CONFIG_JSON, "train": {"steps": 5, "log_every": 5}}
  _write_workdir(runs / "done", steps5, results_step=5, checkpoint=True)
  _write_workdir(runs / "resume", steps5, checkpoint=True)
  (runs / "resume" / "launch.log").write_text("earlier attempt\n")
  _write_workdir(runs / "good", {**steps5, "lr": 0.3}, checkpoint=True)
  status, out = _run_main(["--grid=grid.py", "--workdir=runs", "--parallel=2",
                           "--override", "config.train.steps=5"])
  assert status == 1
  assert json.loads((runs / "done" / "results.json").read_text())["kept"]
  assert not (runs / "good" / "results.json").exists()  # changed: not run
  written = json.loads((runs / "resume" / "results.json").read_text())
  assert written["argv"] == ["--config=grid.py:resume", "--workdir=runs/resume",
                             "--config.train.steps=5"] and written["step"] == 5
  assert not (runs / "bad" / "results.json").exists()
  bad_log = (runs / "bad" / "launch.log").read_text().splitlines()
  assert bad_log[0].startswith("=== ") and bad_log[0].endswith("--config.train.steps=5")
  assert bad_log[1:] == ["training bad", "boom"]
  resume_log = (runs / "resume" / "launch.log").read_text().splitlines()
  assert resume_log[0] == "earlier attempt" and resume_log[2] == "training resume"
  lines = out.splitlines()
  assert "[bad] boom" in lines and "[resume] training resume" in lines
  assert "[resume] resuming (earlier attempts in runs/resume/launch.log)" in lines
  summary = lines[lines.index("summary: 1 finished, 1 failed, 1 skipped, 1 changed"):]
  assert [line.split()[:2] for line in summary[1:5]] == [
      ["changed", "good"], ["failed", "bad"], ["skipped", "done"], ["finished", "resume"]]
  assert summary[1].endswith("(lr: 0.3 → 0.1)")
  assert summary[2].endswith("(exit status 3)  runs/bad/launch.log")
  assert summary[5].startswith("1 run(s) hold a checkpoint trained with another config")
  assert "new --workdir" in summary[5] and "--allow_config_change" in summary[5]
  assert shlex.split(summary[6]) == [
      sys.executable, "-m", "arcjax.main", "--config=grid.py:good", "--workdir=runs/good",
      "--config.train.steps=5", "--allow_config_change"]
  # A second launch has nothing left but the failed run (and the changed one).
  status, out = _run_main(["--grid=grid.py", "--workdir=runs", "--override",
                           "config.train.steps=5"])
  assert status == 1
  assert "summary: 0 finished, 1 failed, 2 skipped, 1 changed" in out.splitlines()


def test_a_finished_run_asked_for_more_steps_resumes(grid_repo):
  _write_workdir(grid_repo / "runs" / "good", results_step=10, checkpoint=True)
  status, out = _run_main(["--grid=grid.py:small", "--workdir=runs",
                           "--override", "config.train.steps=20"])
  assert status == 0 and "summary: 1 finished, 0 failed, 0 skipped" in out
  assert json.loads((grid_repo / "runs" / "good" / "results.json").read_text())["step"] == 20


def test_seeded_runs_get_their_seed(grid_repo):
  status, out = _run_main(["--grid=grid.py:small", "--workdir=runs", "--seeds=2"])
  assert status == 0 and "summary: 2 finished, 0 failed, 0 skipped" in out
  for seed in (0, 1):
    run_dir = grid_repo / "runs" / "good" / f"seed{seed}"
    assert json.loads((run_dir / "config.json").read_text())["seed"] == seed
    assert json.loads((run_dir / "results.json").read_text())["argv"][-1] == (
        f"--config.seed={seed}")
  status, out = _run_main(["--grid=grid.py:small", "--workdir=runs", "--seeds=3"])
  assert "summary: 1 finished, 0 failed, 2 skipped" in out


def test_run_jobs_reports_a_command_that_cannot_start(tmp_path):
  outcomes, signum = local.run_jobs(
      [local.Job("x", ("/nonexistent/trainer",), str(tmp_path / "x" / "launch.log"))],
      out=io.StringIO())
  assert signum is None
  assert outcomes[0].status == "failed" and "could not start" in outcomes[0].detail


# --- SLURM --------------------------------------------------------------------------

SLURM_ARGS = ["--grid=grid.py:pair", "--target=slurm", "--workdir=runs/t", "--seeds=2",
              "--nodes=2", "--gpus-per-node=4", "--partition=gpu", "--time=1-00:00:00",
              "--account=proj", "--slurm-setup=source .venv/bin/activate",
              "--override", "config.name=o'brien x"]


def test_slurm_dry_run_matches_the_recorded_scripts(grid_repo):
  _write_workdir(grid_repo / "runs" / "t" / "good" / "seed1", {**CONFIG_JSON, "seed": 1,
                                                               "name": "o'brien x"},
                 results_step=10, checkpoint=True)
  status, out = _run_main(SLURM_ARGS + ["--dry-run"])
  assert status == 0
  expected = (DATA / "launch_slurm_dry_run.txt").read_text().replace("{repo}", str(grid_repo))
  assert out == expected
  assert not (grid_repo / "runs" / "t" / "good" / "seed0").exists()


def test_slurm_dry_run_output_is_a_shell_script_doing_what_the_launcher_does(grid_repo):
  """Pasting the dry run into bash (with a stand-in sbatch) writes the same scripts."""
  _, out = _run_main(SLURM_ARGS + ["--dry-run"])
  bin_dir = grid_repo / "bin"
  bin_dir.mkdir()
  (bin_dir / "sbatch").write_text("#!/bin/sh\necho \"$@\" >> sbatch.calls\n")
  (bin_dir / "sbatch").chmod(0o755)
  subprocess.run(["bash", "-e"], input=out, text=True, check=True, cwd=grid_repo,
                 env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
  pasted = {p: p.read_text() for p in (grid_repo / "runs").rglob("slurm.sbatch")}
  for path in pasted:
    path.unlink()
  submitted = []
  status, _ = _run_main(SLURM_ARGS, submit=lambda argv: submitted.append(argv) or "7")
  assert status == 0
  written = {p: p.read_text() for p in (grid_repo / "runs").rglob("slurm.sbatch")}
  assert written == pasted and len(written) == 4
  calls = (grid_repo / "sbatch.calls").read_text().splitlines()
  assert calls == [shlex.join(argv[1:]) for argv in submitted]


def test_slurm_submits_each_run_and_reports_failures(grid_repo):
  _write_workdir(grid_repo / "runs" / "t" / "good", results_step=10)
  submitted = []

  def submit(argv):
    submitted.append(argv)
    if "norm_softmax" in argv[-1]:
      raise errors.Error("sbatch: error: invalid partition")
    return "4242"

  status, out = _run_main(["--grid=grid.py:pair", "--target=slurm", "--workdir=runs/t"],
                          submit=submit)
  assert status == 1
  script = grid_repo / "runs" / "t" / "norm_softmax" / "slurm.sbatch"
  assert submitted == [["sbatch", "--parsable", str(script)]]
  assert script.read_text().splitlines()[-1] == shlex.join([
      "srun", "--kill-on-bad-exit=1", "python3", "-m", "arcjax.main",
      "--config=grid.py:norm_softmax", f"--workdir={script.parent}", "--distributed_auto"])
  assert "JAX_LOCAL_DEVICE_IDS" not in script.read_text()  # no --gpus-per-node
  lines = out.splitlines()
  assert lines[0] == "[norm_softmax] FAILED to submit: sbatch: error: invalid partition"
  assert lines[1] == "summary: 0 finished, 1 failed, 1 skipped"
  submitted.clear()
  status, out = _run_main(["--grid=grid.py:small", "--target=slurm", "--workdir=more"],
                          submit=submit)
  assert status == 0 and "submitted: job 4242" in out and "1 submitted" in out


def _sbatch_arguments(line: str) -> list[str]:
  """The arguments sbatch reads from an '#SBATCH …' line: get_argument of Slurm's
  src/sbatch/opt.c (master, 2026-08) transcribed. Whitespace splits outside '…' or "…"
  quotes, which may open mid-argument; a backslash passes the next character on; an
  unquoted '#' ends the line; an unmatched quote makes sbatch refuse the script."""
  assert line.startswith("#SBATCH")
  text, i, arguments = line[len("#SBATCH"):], 0, []
  while True:
    while i < len(text) and text[i] in " \t\n\v\f\r":
      i += 1
    argument, quote, escaped = "", None, False
    while i < len(text) and (quote or text[i] not in " \t\n\v\f\r"):
      char = text[i]
      if escaped:
        escaped = False
      elif char == "\\":
        i += 1
        if i < len(text) and text[i] == " ":  # master's '\ ': a space, taken at once
          argument, i = argument + " ", i + 1
        else:
          escaped = True
        continue
      elif quote:
        if char == quote:
          quote, i = None, i + 1
          continue
      elif char in "\"'":
        quote, i = char, i + 1
        continue
      elif char == "#":
        break
      argument += char
      i += 1
    assert quote is None, f"sbatch: unmatched {quote} in {line!r}"
    if not argument:  # sbatch stops at the first empty argument (the line's end, or a '#')
      return arguments
    arguments.append(argument)


def _output_file(pattern: str, job_id: str) -> str:
  """The file sbatch's --output pattern names: '%j' the job id, '%%' a '%', and none of
  them replaced where the pattern holds a backslash (which is dropped) — sbatch(1),
  "filename pattern"; src/common/print_fields.c, expand_stdio_fields."""
  if "\\" in pattern:
    return pattern.replace("\\", "")
  return re.sub(r"%(.)", lambda m: {"%": "%", "j": job_id}[m.group(1)], pattern)


@pytest.mark.parametrize("folder", ["my runs", "it's \"#1\"", "50% off", "tab\there", "plain"])
def test_sbatch_reads_each_directive_back_whole(tmp_path, folder):
  run = plan.Run("good", 0, str(tmp_path / folder / "good" / "seed0"), ("config.seed=0",))
  options = slurm.SlurmOptions(partition="gpu a100", time="1-00:00:00", account="o'brien #2")
  script = slurm.slurm_script("grid.py", run, options, repo=str(tmp_path), job_name="g.good")
  arguments = [argument for line in script.splitlines() if line.startswith("#SBATCH")
               for argument in _sbatch_arguments(line)]
  assert arguments == [
      "--job-name=g.good", "--nodes=1", "--ntasks-per-node=1", "--partition=gpu a100",
      "--time=1-00:00:00", "--account=o'brien #2", arguments[6], "--signal=TERM@120"]
  output = arguments[6].removeprefix("--output=")
  assert _output_file(output, "4242") == f"{tmp_path}/{folder}/good/seed0/slurm-4242.out"


def test_sbatch_output_refuses_a_folder_with_a_backslash(tmp_path):
  run = plan.Run("good", None, str(tmp_path / "a\\b" / "good"), ())
  with pytest.raises(errors.WorkdirError, match=r"backslash"):
    slurm.slurm_script("grid.py", run, slurm.SlurmOptions(), repo=str(tmp_path), job_name="j")


# --- TPU pod -------------------------------------------------------------------------

def test_tpu_pod_dry_run_matches_the_recorded_commands(grid_repo):
  status, out = _run_main([
      "--grid=grid.py:pair", "--target=tpu-pod", "--tpu=my-pod", "--zone=europe-west4-a",
      "--bucket=gs://bkt/table2/", "--seeds=2", "--commit=v1.0", "--remote-dir=~/my repo",
      "--override", "config.train.steps=300", "config.name=/data/o'brien faces", "--dry-run"])
  assert status == 0
  assert out == (DATA / "launch_tpu_pod_dry_run.txt").read_text()
  assert not list(grid_repo.glob("gs:*")) and not (grid_repo / "runs").exists()
  commands = [shlex.split(line) for line in out.splitlines() if not line.startswith("#")]
  assert commands[1] == ["git", "archive", "--format=tar.gz",
                         "--output=runs/pair-logs/arcjax.tar.gz", "v1.0"]
  remote = commands[3][-1].removeprefix("--command=")
  assert shlex.split(remote)[-4:] == ["requirements.txt", "jax[tpu]==0.10.2", "-f",
                                      tpu_pod.LIBTPU_RELEASES]
  flag, trainer = commands[4][-1].split("=", 1)
  assert flag == "--command" and shlex.split(trainer) == [
      "cd", "~/my repo", "&&", "python3", "-m", "arcjax.main", "--config=grid.py:good",
      "--workdir=gs://bkt/table2/good/seed0", "--config.train.steps=300",
      "--config.name=/data/o'brien faces", "--config.seed=0", "--distributed_auto"]
  assert commands[-1] == ["python", "-m", "experiments.collect", "gs://bkt/table2"]


def test_tpu_pod_skip_deploy(grid_repo):
  status, out = _run_main(["--grid=grid.py:small", "--target=tpu-pod", "--tpu=p", "--zone=z",
                           "--bucket=gs://b/x", "--skip-deploy", "--dry-run"])
  assert status == 0
  assert "git archive" not in out and "scp" not in out
  assert len([line for line in out.splitlines() if line.startswith("gcloud")]) == 1


def test_tpu_pod_deploys_then_runs_each_row_with_its_log(grid_repo, monkeypatch):
  """The real (not dry) sequence, with a stand-in `gcloud` on PATH that records its calls."""
  subprocess.run(["git", "init", "-q"], cwd=grid_repo, check=True)
  subprocess.run(["git", "add", "grid.py", "requirements.txt"], cwd=grid_repo, check=True)
  subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"],
                 cwd=grid_repo, check=True)
  bin_dir = grid_repo / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(textwrap.dedent("""\
      #!/bin/sh
      echo "$4 $*" >> gcloud.calls
      case "$*" in *grid.py:bad*) echo "worker 0: boom"; exit 1;; esac
      echo "worker 0: ok $4"
      """))
  (bin_dir / "gcloud").chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
  status, out = _run_main(["--grid=grid.py", "--target=tpu-pod", "--tpu=pod", "--zone=z",
                           "--bucket=gs://b/t"])
  assert status == 1
  calls = (grid_repo / "gcloud.calls").read_text().splitlines()
  assert [call.split()[0] for call in calls] == ["scp", "ssh", "ssh", "ssh", "ssh", "ssh"]
  assert [c.split("--config=")[1].split()[0] for c in calls[2:]] == [
      "grid.py:good", "grid.py:bad", "grid.py:done", "grid.py:resume"]
  logs = grid_repo / "runs" / "grid-logs"
  assert subprocess.run(["tar", "-tzf", logs / "arcjax.tar.gz"], capture_output=True,
                        text=True, check=True).stdout.split() == ["grid.py", "requirements.txt"]
  assert (logs / "deploy.log").read_text().count("=== ") == 4
  assert (logs / "bad.log").read_text().splitlines()[1:] == ["worker 0: boom"]
  lines = out.splitlines()
  assert "[good] worker 0: ok ssh" in lines and "[bad] worker 0: boom" in lines
  assert "summary: 3 finished, 1 failed, 0 skipped" in lines
  assert lines[-1] == "the table: python -m experiments.collect gs://b/t"


def test_tpu_pod_remote_command_runs_in_a_real_shell(grid_repo, tmp_path_factory):
  """What a worker's shell does with --command: cd to the repo under ~, run the trainer."""
  home = tmp_path_factory.mktemp("home")
  os.symlink(grid_repo, home / "my repo")
  run = plan.Run("good", None, "gs://b/x/good", ("config.name=a 'b' c",))
  argv = tpu_pod.tpu_pod_command("grid.py", run, tpu="t", zone="z", remote_dir="~/my repo",
                                remote_python=sys.executable)
  remote = argv[-1].removeprefix("--command=").removesuffix(" --distributed_auto")
  # The fake trainer cannot write to gs://; a local folder of that name stands in.
  result = subprocess.run(["bash", "-c", remote], cwd="/", capture_output=True, text=True,
                          env={"HOME": str(home), "PATH": os.environ["PATH"]})
  assert result.returncode == 0, result.stderr
  written = json.loads((grid_repo / "gs:" / "b" / "x" / "good" / "results.json").read_text())
  assert written["argv"] == ["--config=grid.py:good", "--workdir=gs://b/x/good",
                             "--config.name=a 'b' c"]
  assert os.path.realpath(written["cwd"]) == os.path.realpath(grid_repo)


def test_tpu_pod_deploy_command_unpacks_the_archive_in_a_real_shell(grid_repo,
                                                                   tmp_path_factory):
  """git archive, then the worker's unpack + install (pip stands in) in a real shell."""
  subprocess.run(["git", "init", "-q"], cwd=grid_repo, check=True)
  subprocess.run(["git", "add", "grid.py", "requirements.txt"], cwd=grid_repo, check=True)
  subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"],
                 cwd=grid_repo, check=True)
  home = tmp_path_factory.mktemp("home")
  deploy = tpu_pod.deploy_commands(tpu="t", zone="z", commit="HEAD",
                                  archive=str(home / "arcjax.tar.gz"), remote_dir="~/my repo",
                                  remote_python="fakepython", jax_version="0.10.2")
  for argv in deploy[:2]:
    subprocess.run(argv, cwd=grid_repo, check=True)
  bin_dir = home / "bin"
  bin_dir.mkdir()
  (bin_dir / "fakepython").write_text("#!/bin/sh\npwd > ~/pip.cwd\necho \"$@\" > ~/pip.args\n")
  (bin_dir / "fakepython").chmod(0o755)
  remote = deploy[3][-1].removeprefix("--command=")
  subprocess.run(["bash", "-c", remote], cwd="/", check=True,
                 env={"HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"})
  assert (home / "my repo" / "grid.py").read_text() == GRID
  assert (home / "pip.cwd").read_text().strip() == str(home / "my repo")
  assert (home / "pip.args").read_text().split() == [
      "-m", "pip", "install", "-r", "requirements.txt", "jax[tpu]==0.10.2", "-f",
      tpu_pod.LIBTPU_RELEASES]


# --- collect ------------------------------------------------------------------------

def _write_run(root: pathlib.Path, name: str, results=None, metrics=None, config=True,
               history=None):
  """A run folder: config.json (True: a stand-in naming the row; a dict: that), metrics.jsonl
  text, results.json, and config_history.jsonl entries (a list of lists of changes)."""
  run = root / name
  run.mkdir(parents=True)
  if config:
    config = {"loss": {"s": 64.0}, "train": {"steps": 10}} if config is True else config
    (run / "config.json").write_text(json.dumps(config))
  for changes in history or ():
    with open(run / "config_history.jsonl", "a", encoding="utf-8") as f:
      f.write(json.dumps({"time": "t", "changes": changes, "allowed_by_flag": False}) + "\n")
  if metrics is not None:
    (run / "metrics.jsonl").write_text(metrics)
  if results is not None:
    (run / "results.json").write_text(json.dumps(results))


_STATS = {"w_ec_deg": 14.29, "w_inter_deg": 81.03, "intra1_deg": 15.0123,
          "inter1_deg": 72.991}


@pytest.fixture
def runs_root(tmp_path) -> pathlib.Path:
  root = tmp_path / "table5"
  _write_run(root, "norm_softmax", {
      "step": 300, "loss": "norm_softmax",
      "eval": {"lfw": {"accuracy": 0.98, "accuracy_std": 0.0123, "auc": 0.99},
               "cfp_fp": {"accuracy": 0.9, "accuracy_std": 0.005}},
      "angle_stats": {**_STATS, "intra2_deg": 30.0, "inter2_deg": 60.5}})
  _write_run(root, "arcface", {
      "step": 300, "loss": "arcface",
      "eval": {"lfw": {"accuracy": 0.99534, "accuracy_std": 0.001}}, "angle_stats": _STATS})
  _write_run(root, "triplet", {
      "step": 300, "loss": "triplet", "eval": {"lfw": {"accuracy": 0.5, "accuracy_std": 0.1}},
      "angle_stats": {**_STATS, "w_ec_deg": None, "w_inter_deg": None}})
  _write_run(root, "ws_queued", metrics='{"step": 100}\n{"step": 200}\n{"step": 3')
  _write_run(root, "zz_queued", config=False, metrics=None)
  (root / "zz_queued" / "launch.log").write_text("")
  (root / "not_a_run").mkdir()
  return root


def test_collect_reads_finished_and_unfinished_runs(runs_root):
  runs = collect_lib.collect(str(runs_root))
  assert [(r["name"], r["row"], r["seed"], r["finished"], r["step"]) for r in runs] == [
      ("arcface", "arcface", None, True, 300), ("norm_softmax", "norm_softmax", None, True, 300),
      ("triplet", "triplet", None, True, 300), ("ws_queued", "ws_queued", None, False, 200),
      ("zz_queued", "zz_queued", None, False, None)]
  assert runs[0]["config"] == {"loss": {"s": 64.0}, "train": {"steps": 10}}
  assert runs[4]["config"] is None
  assert runs[2]["angle_stats"]["w_ec_deg"] is None


def test_to_markdown_single_runs(runs_root):
  expected = (
      "| Loss | lfw (%) | cfp_fp (%) | W-EC (°) | W-Inter (°) | Intra1 (°) | Inter1 (°) "
      "| Intra2 (°) | Inter2 (°) |\n"
      "|:---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
      "| arcface | 99.53 ± 0.10 | — | 14.29 | 81.03 | 15.01 | 72.99 | — | — |\n"
      "| norm_softmax | 98.00 ± 1.23 | 90.00 ± 0.50 | 14.29 | 81.03 | 15.01 | 72.99 "
      "| 30.00 | 60.50 |\n"
      "| triplet | 50.00 ± 10.00 | — | – | – | 15.01 | 72.99 | — | — |\n"
      "\n"
      "± in a row of one run: its accuracy ± the standard deviation over the verification "
      "folds.\n"
      "\n"
      "–: does not apply to this row's loss (e.g. W-EC and W-Inter where the class centres "
      "are never trained); —: not recorded.\n"
      "\n"
      "Unfinished: ws_queued (step 200), zz_queued (not started)\n")
  assert collect_lib.to_markdown(collect_lib.collect(str(runs_root))) == expected


def test_to_csv_single_runs(runs_root):
  expected = (
      "loss,status,n,spread,lfw_accuracy,lfw_accuracy_std,cfp_fp_accuracy,cfp_fp_accuracy_std,"
      "w_ec_deg,w_ec_deg_std,w_inter_deg,w_inter_deg_std,intra1_deg,intra1_deg_std,inter1_deg,"
      "inter1_deg_std,intra2_deg,intra2_deg_std,inter2_deg,inter2_deg_std,"
      "differs_from_reference,left_out\n"
      "arcface,finished,1,folds,99.5340,0.1000,,,14.2900,,81.0300,,15.0123,,72.9910,,,,,,,\n"
      "norm_softmax,finished,1,folds,98.0000,1.2300,90.0000,0.5000,14.2900,,81.0300,,15.0123,,"
      "72.9910,,30.0000,,60.5000,,,\n"
      "triplet,finished,1,folds,50.0000,10.0000,,,,,,,15.0123,,72.9910,,,,,,,\n"
      "ws_queued,unfinished,0,,,,,,,,,,,,,,,,,,,\n"
      "zz_queued,unfinished,0,,,,,,,,,,,,,,,,,,,\n")
  assert collect_lib.to_csv(collect_lib.collect(str(runs_root))) == expected


# Seeded grid: per row and seed, (lfw accuracy, W-EC or None).
SEEDED = {
    "norm_softmax": [(0.90, 60.0), (0.92, 62.0), (0.91, 61.0)],
    "arcface": [(0.95, 20.0), (0.96, 21.5), (0.94, 61.5)],
    "triplet": [(0.905, None), (0.925, None)],
    "cosface": [(0.93, 30.0)],
}


def _seed_config(row: str, seed: int, steps: int = 10) -> dict:
  return {"seed": seed, "loss": {"m2": 0.5 if row.startswith("arc") else 0.0},
          "train": {"steps": steps, "lr": 0.1, "log_every": 5}, "eval": {"every": 5}}


@pytest.fixture
def seeded_root(tmp_path) -> pathlib.Path:
  root = tmp_path / "seeded"
  for row, seeds in SEEDED.items():
    for seed, (accuracy, w_ec) in enumerate(seeds):
      _write_run(root / row, f"seed{seed}", {
          "step": 10, "eval": {"lfw": {"accuracy": accuracy, "accuracy_std": 0.5}},
          "angle_stats": {"w_ec_deg": w_ec, "intra1_deg": 10.0 + seed}},
          config=_seed_config(row, seed))
  _write_run(root / "arcface", "seed3", metrics='{"step": 4}\n')
  return root


def test_summarize_seeded_rows_against_hand_computed_statistics(seeded_root):
  rows = {r["row"]: r for r in collect_lib.summarize(collect_lib.collect(str(seeded_root)))}
  assert list(rows) == ["arcface", "cosface", "norm_softmax", "triplet"]
  # norm_softmax lfw: mean (0.90 + 0.92 + 0.91)/3 = 0.91; deviations ±0.01, 0 → sample
  # variance (1e-4 + 1e-4 + 0)/2 = 1e-4, std 0.01. arcface: mean 0.95, std 0.01 likewise.
  ns, arc = rows["norm_softmax"]["eval"]["lfw"], rows["arcface"]["eval"]["lfw"]
  assert (ns.n, arc.n) == (3, 3) and rows["arcface"]["n"] == 3 and len(rows["arcface"]["runs"]) == 4
  assert ns.mean == pytest.approx(0.91) and ns.spread == pytest.approx(0.01)
  assert arc.mean == pytest.approx(0.95) and arc.spread == pytest.approx(0.01)
  # Difference 0.04 > 2·sqrt(0.01²/3 + 0.01²/3) = 0.01633: marked.
  assert ("eval", "lfw") in rows["arcface"]["marked"]
  # W-EC: norm_softmax 61 ± 1; arcface (20 + 21.5 + 61.5)/3 = 34.33, deviations −14.33,
  # −12.83, 27.17: variance (205.44 + 164.69 + 738.03)/2 = 554.08, std 23.54.
  # |34.33 − 61| = 26.67 < 2·sqrt(554.08/3 + 1/3) = 27.19: not marked.
  w_arc = rows["arcface"]["angle_stats"]["w_ec_deg"]
  assert w_arc.mean == pytest.approx(103 / 3) and w_arc.spread == pytest.approx(23.5389, abs=1e-4)
  assert ("angle_stats", "w_ec_deg") not in rows["arcface"]["marked"]
  # Intra1 is 10, 11, 12 in both rows: same mean, not marked.
  assert ("angle_stats", "intra1_deg") not in rows["arcface"]["marked"]
  # triplet lfw: mean 0.915, std 0.0141421; |0.915 − 0.91| = 0.005 < 2·sqrt(1e-4/3 +
  # 2e-4/2) = 0.0231: not marked. Its W-EC does not apply.
  assert rows["triplet"]["eval"]["lfw"].spread == pytest.approx(math.sqrt(2e-4))
  assert rows["triplet"]["marked"] == []
  assert rows["triplet"]["angle_stats"]["w_ec_deg"] is collect_lib.NOT_APPLICABLE
  assert rows["triplet"]["angle_stats"]["w_inter_deg"] is None
  # One seed: no spread, no comparison.
  assert rows["cosface"]["eval"]["lfw"] == collect_lib.Cell(0.93, None, 1)
  assert rows["cosface"]["marked"] == []
  assert rows["norm_softmax"]["marked"] == []


def _seeded_run(root, row, folder, accuracy, config, history=None):
  _write_run(root / row, folder, {"step": config["train"]["steps"],
                                  "eval": {"lfw": {"accuracy": accuracy}}, "angle_stats": {}},
             config=config, history=history)


def test_a_row_s_mean_is_over_runs_of_one_config_and_the_others_are_named(tmp_path):
  """A 200-step run copied in as seed2, a run of seed 0 copied in as seed7: not averaged in."""
  root = tmp_path / "grid"
  for seed, accuracy in enumerate((0.90, 0.92)):
    _seeded_run(root, "arcface", f"seed{seed}", accuracy, _seed_config("arcface", seed))
  _seeded_run(root, "arcface", "seed2", 0.60, _seed_config("arcface", 2, steps=200))
  _seeded_run(root, "arcface", "seed7", 0.61, _seed_config("arcface", 0))
  # Fields that change neither training nor measurement may differ.
  relaxed = _seed_config("arcface", 3)
  relaxed["train"]["log_every"], relaxed["eval"]["every"] = 50, 500
  _seeded_run(root, "arcface", "seed3", 0.91, relaxed)
  [row] = collect_lib.summarize(collect_lib.collect(str(root)))
  assert row["n"] == 3 and row["eval"]["lfw"].mean == pytest.approx(0.91)
  assert row["left_out"] == {
      "arcface/seed2": "its config differs from arcface/seed0's: train.steps: 10 → 200",
      "arcface/seed7": "its config.seed is 0, not 7"}
  table = collect_lib.to_markdown(collect_lib.collect(str(root)))
  assert "| arcface † | 3 | 91.00 ± 1.00 |" in table, table
  assert ("† Left out of the mean (N counts the rest):\n"
          "- arcface/seed2: its config differs from arcface/seed0's: train.steps: 10 → 200\n"
          "- arcface/seed7: its config.seed is 0, not 7\n") in table
  [csv_row] = csv_rows(collect_lib.to_csv(collect_lib.collect(str(root))))
  assert csv_row["status"] == "partial" and csv_row["left_out"].startswith("arcface/seed2: ")


def test_seeds_trained_under_another_schedule_are_not_averaged_together(tmp_path):
  """Seeds 0-1 extended from 10 to 20 steps (re-stretched schedule), seed 2 started at 20."""
  root = tmp_path / "grid"
  extended = [[{"field": "train.steps", "stored": 10, "requested": 20, "free": True}]]
  for seed in (0, 1):
    _seeded_run(root, "ns", f"seed{seed}", 0.9, _seed_config("ns", seed, 20), history=extended)
  _seeded_run(root, "ns", "seed2", 0.8, _seed_config("ns", 2, 20))
  [row] = collect_lib.summarize(collect_lib.collect(str(root)))
  assert row["n"] == 2 and list(row["left_out"]) == ["ns/seed2"]
  assert row["left_out"]["ns/seed2"] == (
      "it trained under other config changes than ns/seed0 (its config_history.jsonl: none; "
      "ns/seed0's: train.steps: 10 → 20)")
  # A tie keeps the group of the smallest seed.
  _seeded_run(root, "ns", "seed3", 0.8, _seed_config("ns", 3, 20))
  [row] = collect_lib.summarize(collect_lib.collect(str(root)))
  assert sorted(row["left_out"]) == ["ns/seed2", "ns/seed3"]


def test_an_empty_results_file_is_named_not_a_row_of_dashes(tmp_path):
  root = tmp_path / "grid"
  _write_run(root, "arcface", {})
  _write_run(root, "cosface", {"step": 10, "eval": {"lfw": {"accuracy": 0.9}}})
  table = collect_lib.to_markdown(collect_lib.collect(str(root)))
  assert "| arcface" not in table
  assert "- arcface: its results.json holds no evaluation and no angle statistic" in table


def test_differs_is_two_standard_errors_of_the_difference():
  # sqrt(0.3²/4 + 0.4²/4) = 0.25: the threshold is 0.5.
  assert collect_lib.differs(collect_lib.Cell(1.51, 0.3, 4), collect_lib.Cell(1.0, 0.4, 4))
  assert not collect_lib.differs(collect_lib.Cell(1.49, 0.3, 4), collect_lib.Cell(1.0, 0.4, 4))
  assert not collect_lib.differs(collect_lib.Cell(9.0, 0.3, 1), collect_lib.Cell(1.0, 0.4, 4))
  assert not collect_lib.differs(collect_lib.NOT_APPLICABLE, collect_lib.Cell(1.0, 0.4, 4))
  assert not collect_lib.differs(None, collect_lib.Cell(1.0, 0.4, 4))


def test_to_markdown_seeded(seeded_root):
  lines = collect_lib.to_markdown(collect_lib.collect(str(seeded_root))).splitlines()
  assert lines[0] == ("| Loss | N | lfw (%) | W-EC (°) | W-Inter (°) | Intra1 (°) | Inter1 (°) "
                      "| Intra2 (°) | Inter2 (°) |")
  assert lines[2:6] == [
      "| arcface | 3 | 95.00 ± 1.00 * | 34.33 ± 23.54 | — | 11.00 ± 1.00 | — | — | — |",
      "| cosface | 1 | 93.00 | 30.00 | — | 10.00 | — | — | — |",
      "| norm_softmax | 3 | 91.00 ± 1.00 | 61.00 ± 1.00 | — | 11.00 ± 1.00 | — | — | — |",
      "| triplet | 2 | 91.50 ± 1.41 | – | — | 10.50 ± 0.71 | — | — | — |"]
  notes = [line for line in lines[6:] if line]
  assert notes[0].startswith("± in a row of N seeds: the mean ± the sample standard deviation")
  assert notes[1].startswith("*: the mean differs from norm_softmax's by more than two "
                             "standard errors")
  assert notes[2].startswith("–: does not apply")
  assert notes[3] == "Unfinished: arcface/seed3 (step 4)"


def test_to_csv_seeded_and_reference(seeded_root):
  runs = collect_lib.collect(str(seeded_root))
  rows = list(csv_rows(collect_lib.to_csv(runs)))
  assert rows[0]["loss"] == "arcface" and rows[0]["status"] == "partial"
  assert (rows[0]["n"], rows[0]["spread"]) == ("3", "seeds")
  assert rows[0]["lfw_accuracy"] == "95.0000" and rows[0]["lfw_accuracy_std"] == "1.0000"
  assert rows[0]["differs_from_reference"] == "lfw_accuracy"
  assert rows[3]["w_ec_deg"] == "" and rows[3]["w_ec_deg_std"] == ""  # triplet: n/a
  # Against arcface, norm_softmax's lfw and W-EC... W-EC still within 2 SE; lfw marked.
  rows = list(csv_rows(collect_lib.to_csv(runs, reference="arcface")))
  assert rows[2]["loss"] == "norm_softmax" and rows[2]["differs_from_reference"] == "lfw_accuracy"
  assert rows[0]["differs_from_reference"] == ""
  rows = list(csv_rows(collect_lib.to_csv(runs, reference=None)))
  assert all(r["differs_from_reference"] == "" for r in rows)


def csv_rows(text):
  return csv.DictReader(io.StringIO(text))


def test_collect_command_line(runs_root, seeded_root, tmp_path, capsys):
  out = tmp_path / "t.csv"
  assert collect_lib.main([str(runs_root), "--format", "csv", "--out", str(out)]) == 0
  runs = collect_lib.collect(str(runs_root))
  assert out.read_text() == collect_lib.to_csv(runs)
  assert collect_lib.main([str(runs_root)]) == 0
  assert capsys.readouterr().out == collect_lib.to_markdown(runs)
  assert collect_lib.main([str(seeded_root), "--reference", "arcface"]) == 0
  assert capsys.readouterr().out == collect_lib.to_markdown(
      collect_lib.collect(str(seeded_root)), reference="arcface")
  with pytest.raises(SystemExit) as e:
    collect_lib.main([str(seeded_root), "--reference", "sphereface"])
  assert e.value.code == 1
  assert capsys.readouterr().err == (
      f"error: --reference 'sphereface' is not a row of {seeded_root} "
      "(rows: arcface, cosface, norm_softmax, triplet)\n")


def test_collect_shows_the_rows_asked_for_in_their_order(seeded_root, capsys):
  assert collect_lib.main([str(seeded_root), "--rows", "triplet", "norm_softmax"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert [line.split("|")[1].strip() for line in lines[2:4]] == ["triplet", "norm_softmax"]
  assert not any(line.startswith("| arcface") for line in lines)
  with pytest.raises(SystemExit):
    collect_lib.main([str(seeded_root), "--rows", "arcface", "nosuch"])
  assert "error: --rows nosuch: not rows of" in capsys.readouterr().err


def test_collect_reads_a_grid_from_a_bucket(seeded_root, monkeypatch):
  """gs://bkt/… read through epath, its file system mocked onto the local seeded grid."""
  def on_disk(original, path, *args, **kwargs):
    assert os.fspath(path).startswith("gs://bkt/seeded"), path
    return original(os.fspath(path).replace("gs://bkt/seeded", str(seeded_root), 1),
                    *args, **kwargs)

  monkeypatch.setattr(workdir, "_gcs_credentials_hint", lambda: None)  # no gcsfs needed
  with epath_testing.mock_epath(open=on_disk, exists=on_disk, isdir=on_disk,
                                listdir=on_disk, glob=on_disk, stat=on_disk):
    runs = collect_lib.collect("gs://bkt/seeded")
  local = collect_lib.collect(str(seeded_root))
  for run in local:
    run["path"] = run["path"].replace(str(seeded_root), "gs://bkt/seeded")
  assert runs == local


@pytest.mark.parametrize("results, message", [
    (b'{"step": 3', "arcface/results.json is not valid JSON"),
    (b'{"step": "\xff\xfe"}', "arcface/results.json is not UTF-8 text"),
    (b'[1, 2]', "arcface/results.json: the file must be a JSON object, got a list"),
    (b'{"eval": []}', "arcface/results.json: 'eval' must be an object of evaluation sets, "
                      "got a list"),
    (b'{"eval": {"lfw": {}}}', "arcface/results.json: eval['lfw'] has no 'accuracy'"),
    (b'{"eval": {"lfw": {"accuracy": "high"}}}',
     "arcface/results.json: eval['lfw']['accuracy'] must be a number, got a string"),
    (b'{"eval": {"lfw": {"accuracy": true}}}',
     "arcface/results.json: eval['lfw']['accuracy'] must be a number, got True"),
    (b'{"eval": {"lfw": {"accuracy": 0.9, "accuracy_std": [0.1]}}}',
     "arcface/results.json: eval['lfw']['accuracy_std'] must be a number, got a list"),
    (b'{"angle_stats": {"w_ec_deg": "12"}}',
     "arcface/results.json: angle_stats['w_ec_deg'] must be a number or null, got a string"),
    (b'{"angle_stats": [1]}', "arcface/results.json: 'angle_stats' must be an object"),
    (b'{"step": 1.5}', "arcface/results.json: 'step' must be an integer, got 1.5"),
])
def test_collect_reports_a_broken_results_file_in_one_line(tmp_path, capsys, results, message):
  _write_run(tmp_path / "broken", "arcface")
  (tmp_path / "broken" / "arcface" / "results.json").write_bytes(results)
  with pytest.raises(errors.WorkdirError, match="^" + str(tmp_path).replace("\\", "\\\\")):
    collect_lib.collect(str(tmp_path / "broken"))
  with pytest.raises(SystemExit) as e:
    collect_lib.main([str(tmp_path / "broken")])
  assert e.value.code == 1
  err = capsys.readouterr().err
  assert err.startswith(f"error: {tmp_path}/broken/") and err.count("\n") == 1, err
  assert message in err
  with pytest.raises(errors.WorkdirError):
    collect_lib.main([str(tmp_path / "broken"), "--traceback"])


def test_collect_errors_name_the_path(tmp_path, capsys):
  with pytest.raises(errors.WorkdirError, match="does not exist"):
    collect_lib.collect(str(tmp_path / "missing"))
  (tmp_path / "empty" / "sub").mkdir(parents=True)
  with pytest.raises(errors.WorkdirError, match="holds no run workdirs"):
    collect_lib.collect(str(tmp_path / "empty"))
  _write_run(tmp_path / "mixed", "arcface", results={"step": 1})
  _write_run(tmp_path / "mixed" / "arcface", "seed0", results={"step": 1})
  with pytest.raises(errors.WorkdirError, match="arcface holds both a run and seeded runs"):
    collect_lib.collect(str(tmp_path / "mixed"))
  (tmp_path / "badconfig" / "arcface").mkdir(parents=True)
  (tmp_path / "badconfig" / "arcface" / "config.json").write_bytes(b"\x80")
  with pytest.raises(SystemExit):
    collect_lib.main([str(tmp_path / "badconfig")])
  assert capsys.readouterr().err.startswith(
      f"error: {tmp_path}/badconfig/arcface/config.json is not UTF-8 text")


def test_term_gradients_plots_each_term_and_names_a_run_without_them(tmp_path, capsys):
  from experiments import term_gradients  # pylint: disable=import-outside-toplevel
  run = tmp_path / "ns_intra"
  run.mkdir()
  rows = [{"step": s, "train/loss": 1.0, "train/grad_norm/softmax": 1.0 / s,
           "train/grad_norm/softmax_centres": 2.0 / s, "train/grad_norm/intra": 0.01,
           "train/grad_norm/intra_centres": 0.02} for s in (50, 100, 150)]
  (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert term_gradients.series(rows, "")["intra"] == ([50, 100, 150], [0.01] * 3)
  assert term_gradients.series(rows, "_centres")["softmax"][1] == [0.04, 0.02, 2.0 / 150]
  out = tmp_path / "plot.png"
  assert term_gradients.main([str(run), "--out", str(out)]) == 0
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  plain = tmp_path / "arcface"
  plain.mkdir()
  (plain / "metrics.jsonl").write_text('{"step": 50, "train/loss": 1.0}\n')
  with pytest.raises(SystemExit):
    term_gradients.main([str(plain), "--out", str(out)])
  assert "logged no per-term gradient norms" in capsys.readouterr().err

"""Tests of experiments/: the grid launcher (commands, skip/resume, failures) and collect."""

import io
import json
import os
import pathlib
import shlex
import subprocess
import sys
import textwrap

import pytest

from experiments import collect as collect_lib
from experiments import launch

GRID = textwrap.dedent("""\
    def get_config(arg=None):
      raise AssertionError("the launcher must not build configs itself")

    def sweep(arg=None):
      return {None: ["good", "bad", "done", "resume"], "small": ["good"]}[arg]
    """)

# Stands in for `python -m arcjax.main` (found first on sys.path: the cwd):
# records its flags, fails for row 'bad', and writes results.json last.
FAKE_TRAINER = textwrap.dedent("""\
    import json, os, sys
    flags = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    workdir, row = flags["workdir"], flags["config"].rsplit(":", 1)[1]
    print("training", row, flush=True)
    if row == "bad":
      print("boom", file=sys.stderr)
      sys.exit(3)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump({"argv": sys.argv[1:], "cwd": os.getcwd()}, f)
    """)


@pytest.fixture
def grid_repo(tmp_path, monkeypatch) -> pathlib.Path:
  """A cwd holding grid.py and a fake arcjax/main.py, as a repository root would."""
  (tmp_path / "grid.py").write_text(GRID)
  (tmp_path / "arcjax").mkdir()
  (tmp_path / "arcjax" / "__init__.py").write_text("")
  (tmp_path / "arcjax" / "main.py").write_text(FAKE_TRAINER)
  monkeypatch.chdir(tmp_path)
  monkeypatch.delenv("PYTHONPATH", raising=False)
  return tmp_path


def _run_main(argv):
  out = io.StringIO()
  status = launch.main(argv, out=out)
  return status, out.getvalue()


# --- command builders -------------------------------------------------------------

def test_trainer_command_is_the_documented_argv():
  argv = launch.trainer_command("configs/ablations.py", "arcface_0.4", "runs/t2/arcface_0.4",
                                ["config.train.steps=300", "config.data.path=a b"],
                                python="python3")
  assert argv == ["python3", "-m", "arcjax.main", "--config=configs/ablations.py:arcface_0.4",
                  "--workdir=runs/t2/arcface_0.4", "--config.train.steps=300",
                  "--config.data.path=a b"]


@pytest.mark.parametrize("bad", ["train.steps=3", "config.train.steps", "--config.x=1",
                                 "config.=1", "config.a..b=1"])
def test_override_must_be_config_field_equals_value(bad):
  with pytest.raises(ValueError, match="config.FIELD=VALUE"):
    launch.override_flag(bad)


def test_tpu_pod_command_tilde_and_quoting():
  argv = launch.tpu_pod_command("configs/ablations.py", "cm1", tpu="pod-v4", zone="us-c2-b",
                                bucket="gs://bkt/table2/", remote_dir="~/my repo",
                                overrides=["config.model.name=iresnet50"])
  assert argv[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-v4",
                      "--zone=us-c2-b", "--worker=all"]
  assert argv[8] == ("--command=cd ~/'my repo' && python3 -m arcjax.main "
                     "--config=configs/ablations.py:cm1 --workdir=gs://bkt/table2/cm1 "
                     "--config.model.name=iresnet50")


@pytest.mark.parametrize("kwargs, match", [
    ({"bucket": "/local/dir"}, "gs://"),
    ({"bucket": "gs://"}, "gs://"),
    ({"grid_path": "/abs/grid.py"}, "inside the repository"),
    ({"grid_path": "../elsewhere/grid.py"}, "inside the repository"),
])
def test_tpu_pod_command_rejects_paths_workers_cannot_see(kwargs, match):
  args = {"grid_path": "configs/ablations.py", "bucket": "gs://b"} | kwargs
  with pytest.raises(ValueError, match=match):
    launch.tpu_pod_command(args.pop("grid_path"), "arcface", tpu="t", zone="z", **args)


# --- grid loading --------------------------------------------------------------

def test_load_grid_passes_the_sweep_argument(grid_repo):
  assert launch.load_grid("grid.py") == ("grid.py", ["good", "bad", "done", "resume"])
  assert launch.load_grid("grid.py:small") == ("grid.py", ["good"])


@pytest.mark.parametrize("source, match", [
    ("def get_config(arg=None): pass\n", "has no sweep"),
    ("def sweep(): return 'arcface'\n", "must return a list"),
    ("def sweep(): return ['a', 'a']\n", "more than once"),
    ("def sweep(): return ['a/b']\n", "not usable as a run directory"),
    ("def sweep(): return []\n", "no rows"),
])
def test_load_grid_errors_name_the_file(tmp_path, source, match):
  path = tmp_path / "g.py"
  path.write_text(source)
  with pytest.raises(ValueError, match=match) as e:
    launch.load_grid(str(path))
  assert str(path) in str(e.value)


def test_load_grid_missing_file(tmp_path):
  with pytest.raises(ValueError, match="nope.py.*does not exist"):
    launch.load_grid(str(tmp_path / "nope.py") + ":table5")


# --- command line: TPU pod, dry run ------------------------------------------------

def test_tpu_pod_dry_run_prints_pasteable_commands(grid_repo):
  status, out = _run_main([
      "--grid=grid.py", "--target=tpu-pod", "--tpu=my-pod", "--zone=europe-west4-a",
      "--bucket=gs://bkt/table2", "--override", "config.train.steps=300",
      "config.data.path=/data/o'brien faces", "--dry-run"])
  assert status == 0
  lines = out.splitlines()
  assert len(lines) == 4
  for row, line in zip(["good", "bad", "done", "resume"], lines):
    argv = shlex.split(line)
    assert argv[:-1] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod",
                         "--zone=europe-west4-a", "--worker=all"]
    flag, remote = argv[-1].split("=", 1)
    assert flag == "--command"
    assert shlex.split(remote) == [
        "cd", "~/arcjax", "&&", "python3", "-m", "arcjax.main", f"--config=grid.py:{row}",
        f"--workdir=gs://bkt/table2/{row}", "--config.train.steps=300",
        "--config.data.path=/data/o'brien faces"]
  assert not list(grid_repo.glob("gs:*"))


def test_tpu_pod_remote_command_runs_in_a_real_shell(grid_repo, tmp_path_factory):
  """What a worker's shell does with --command: cd to the repo under ~, run the trainer."""
  home = tmp_path_factory.mktemp("home")
  os.symlink(grid_repo, home / "my repo")
  argv = launch.tpu_pod_command("grid.py", "good", tpu="t", zone="z", bucket="gs://b/x",
                                remote_dir="~/my repo", remote_python=sys.executable,
                                overrides=["config.name=a 'b' c"])
  remote = argv[-1].removeprefix("--command=")
  # The fake trainer cannot write to gs://; a local folder of that name stands in.
  result = subprocess.run(["bash", "-c", remote], cwd="/", capture_output=True, text=True,
                          env={"HOME": str(home), "PATH": os.environ["PATH"]})
  assert result.returncode == 0, result.stderr
  written = json.loads((grid_repo / "gs:" / "b" / "x" / "good" / "results.json").read_text())
  assert written["argv"] == ["--config=grid.py:good", "--workdir=gs://b/x/good",
                             "--config.name=a 'b' c"]
  assert os.path.realpath(written["cwd"]) == os.path.realpath(grid_repo)


@pytest.mark.parametrize("argv, message", [
    (["--grid=grid.py", "--target=gke", "--workdir=w"], "invalid choice: 'gke'"),
    (["--grid=grid.py", "--target=tpu-pod", "--bucket=gs://b"], "needs --tpu, --zone"),
    (["--grid=grid.py", "--target=tpu-pod", "--tpu=t", "--zone=z"], "needs --bucket"),
    (["--grid=grid.py", "--target=tpu-pod", "--tpu=t", "--zone=z", "--bucket=gs://b",
      "--workdir=w"], "--workdir is for --target=local"),
    (["--grid=grid.py"], "needs --workdir"),
    (["--grid=grid.py", "--workdir=w", "--tpu=t"], "--tpu only apply"),
    (["--grid=grid.py", "--workdir=w", "--parallel=0"], "--parallel must be >= 1"),
    (["--grid=grid.py", "--workdir=w", "--override", "steps=3"], "'steps=3'"),
    (["--grid=missing.py", "--workdir=w"], "grid file 'missing.py' does not exist"),
])
def test_command_line_errors(grid_repo, capsys, argv, message):
  with pytest.raises(SystemExit) as e:
    launch.main(argv + ["--dry-run"], out=io.StringIO())
  assert e.value.code == 2
  assert message in capsys.readouterr().err


# --- command line: local runs ------------------------------------------------------

def test_local_dry_run_lists_unfinished_runs_only(grid_repo):
  (grid_repo / "runs" / "done").mkdir(parents=True)
  (grid_repo / "runs" / "done" / "results.json").write_text("{}")
  status, out = _run_main(["--grid=grid.py", "--workdir=runs", "--dry-run",
                           "--override", "config.seed=1"])
  assert status == 0
  lines = out.splitlines()
  assert lines[2] == "# done: finished (runs/done/results.json exists), skipped"
  commands = [shlex.split(line) for i, line in enumerate(lines) if i != 2]
  assert commands == [[sys.executable, "-m", "arcjax.main", f"--config=grid.py:{row}",
                       f"--workdir=runs/{row}", "--config.seed=1"]
                      for row in ("good", "bad", "resume")]
  assert sorted(os.listdir(grid_repo / "runs")) == ["done"]


def test_local_runs_skip_finished_resume_unfinished_and_survive_failures(grid_repo):
  runs = grid_repo / "runs"
  (runs / "done").mkdir(parents=True)
  (runs / "done" / "results.json").write_text('{"kept": true}')
  (runs / "resume").mkdir()
  (runs / "resume" / "launch.log").write_text("earlier attempt\n")
  status, out = _run_main(["--grid=grid.py", "--workdir=runs", "--parallel=2",
                           "--override", "config.train.steps=5"])
  assert status == 1
  assert json.loads((runs / "done" / "results.json").read_text()) == {"kept": True}
  for row in ("good", "resume"):
    written = json.loads((runs / row / "results.json").read_text())
    assert written["argv"] == [f"--config=grid.py:{row}", f"--workdir=runs/{row}",
                               "--config.train.steps=5"]
  assert not (runs / "bad" / "results.json").exists()
  bad_log = (runs / "bad" / "launch.log").read_text().splitlines()
  assert bad_log[0].startswith("=== ") and bad_log[0].endswith("--config.train.steps=5")
  assert bad_log[1:] == ["training bad", "boom"]
  resume_log = (runs / "resume" / "launch.log").read_text().splitlines()
  assert resume_log[0] == "earlier attempt" and resume_log[2] == "training resume"
  lines = out.splitlines()
  assert "[bad] boom" in lines and "[good] training good" in lines
  assert "[resume] resuming (earlier attempts in runs/resume/launch.log)" in lines
  summary = lines[lines.index("summary: 2 finished, 1 failed, 1 skipped"):]
  assert [line.split()[:2] for line in summary[1:]] == [
      ["finished", "good"], ["failed", "bad"], ["skipped", "done"], ["finished", "resume"]]
  assert summary[2].endswith("(exit status 3)  runs/bad/launch.log")
  # A second launch has nothing left but the failed run.
  status, out = _run_main(["--grid=grid.py", "--workdir=runs"])
  assert status == 1
  assert "summary: 0 finished, 1 failed, 3 skipped" in out.splitlines()


def test_run_jobs_reports_a_command_that_cannot_start(tmp_path):
  outcomes = launch.run_jobs([launch.Job("x", ("/nonexistent/trainer",), None)],
                             out=io.StringIO())
  assert outcomes[0].status == "failed" and "could not start" in outcomes[0].detail


# --- collect ------------------------------------------------------------------------

def _write_run(root: pathlib.Path, name: str, results=None, metrics=None, config=True):
  run = root / name
  run.mkdir(parents=True)
  if config:
    (run / "config.json").write_text(json.dumps({"loss": {"preset": name}}))
  if metrics is not None:
    (run / "metrics.jsonl").write_text(metrics)
  if results is not None:
    (run / "results.json").write_text(json.dumps(results))


_STATS = {"w_ec_deg": 14.29, "w_inter_deg": 81.03, "intra1_deg": 15.0123,
          "inter1_deg": 72.991, "intra2_deg": None, "inter2_deg": None}


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
  _write_run(root, "triplet", metrics='{"step": 100}\n{"step": 200}\n{"step": 3')
  _write_run(root, "zz_queued", config=False, metrics=None)
  (root / "zz_queued" / "launch.log").write_text("")
  (root / "not_a_run").mkdir()
  return root


def test_collect_reads_finished_and_unfinished_runs(runs_root):
  rows = collect_lib.collect(str(runs_root))
  assert [(r["name"], r["finished"], r["step"]) for r in rows] == [
      ("arcface", True, 300), ("norm_softmax", True, 300), ("triplet", False, 200),
      ("zz_queued", False, None)]
  assert rows[0]["config"] == {"loss": {"preset": "arcface"}} and rows[3]["config"] is None
  assert collect_lib.eval_sets(rows) == ["lfw", "cfp_fp"]


def test_to_markdown(runs_root):
  expected = (
      "| Loss | lfw (%) | cfp_fp (%) | W-EC (°) | W-Inter (°) | Intra1 (°) | Inter1 (°) "
      "| Intra2 (°) | Inter2 (°) |\n"
      "|:---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
      "| arcface | 99.53 ± 0.10 | — | 14.29 | 81.03 | 15.01 | 72.99 | — | — |\n"
      "| norm_softmax | 98.00 ± 1.23 | 90.00 ± 0.50 | 14.29 | 81.03 | 15.01 | 72.99 "
      "| 30.00 | 60.50 |\n"
      "\n"
      "Unfinished: triplet (step 200), zz_queued (not started)\n")
  assert collect_lib.to_markdown(collect_lib.collect(str(runs_root))) == expected


def test_to_csv(runs_root):
  expected = (
      "loss,status,step,lfw_accuracy,lfw_accuracy_std,cfp_fp_accuracy,cfp_fp_accuracy_std,"
      "w_ec_deg,w_inter_deg,intra1_deg,inter1_deg,intra2_deg,inter2_deg\n"
      "arcface,finished,300,99.5340,0.1000,,,14.2900,81.0300,15.0123,72.9910,,\n"
      "norm_softmax,finished,300,98.0000,1.2300,90.0000,0.5000,14.2900,81.0300,15.0123,"
      "72.9910,30.0000,60.5000\n"
      "triplet,unfinished,200,,,,,,,,,,\n"
      "zz_queued,unfinished,,,,,,,,,,,\n")
  assert collect_lib.to_csv(collect_lib.collect(str(runs_root))) == expected


def test_collect_command_line(runs_root, tmp_path, capsys):
  out = tmp_path / "t.csv"
  assert collect_lib.main([str(runs_root), "--format", "csv", "--out", str(out)]) == 0
  rows = collect_lib.collect(str(runs_root))
  assert out.read_text() == collect_lib.to_csv(rows)
  assert collect_lib.main([str(runs_root)]) == 0
  assert capsys.readouterr().out == collect_lib.to_markdown(rows)


def test_collect_errors_name_the_path(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    collect_lib.collect(str(tmp_path / "missing"))
  (tmp_path / "empty" / "sub").mkdir(parents=True)
  with pytest.raises(ValueError, match="holds no run workdirs"):
    collect_lib.collect(str(tmp_path / "empty"))
  _write_run(tmp_path / "broken", "arcface")
  (tmp_path / "broken" / "arcface" / "results.json").write_text('{"step": 3')
  with pytest.raises(ValueError, match=r"arcface/results.json is not valid JSON"):
    collect_lib.collect(str(tmp_path / "broken"))
  (tmp_path / "broken" / "arcface" / "results.json").write_text('{"eval": {"lfw": {}}}')
  with pytest.raises(ValueError, match=r"eval\['lfw'\] has no 'accuracy'"):
    collect_lib.collect(str(tmp_path / "broken"))

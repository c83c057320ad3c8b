"""Tests of `experiments.launch --vectorize`: the packs planned from a grid (who trains with
whom, the --parallel split), the pack trainer's command line, and each target's jobs: local
(end to end with a stand-in pack trainer), SLURM and TPU pod (dry runs, stand-in sbatch and
gcloud).

The stand-ins (`arcjax/pack.py`, `arcjax/main.py` in a temporary cwd, found first by
`python -m`) parse each run's flags as the trainer does and write its config.json, then
results.json last, as a finished run leaves them.
"""

import io
import json
import os
import pathlib
import shlex
import subprocess
import sys
import textwrap

import pytest

from arcjax import errors
from experiments import launch
from experiments import plan
from experiments import summary

# Rows that differ from 'base' only in values a traced step takes (lr, m2), a row with
# another model width (another pack), and two rows that cannot train in a pack.
GRID = textwrap.dedent("""\
    import ml_collections

    def get_config(arg=None):
      config = ml_collections.ConfigDict()
      config.seed = 0
      config.model = ml_collections.ConfigDict({"width": 8})
      config.train = ml_collections.ConfigDict({"steps": 10, "lr": 0.1, "parallel": "mesh"})
      config.head = ml_collections.ConfigDict({"sharded": False})
      config.loss = ml_collections.ConfigDict({"m2": 0.5})
      if arg == "small_lr":
        config.train.lr = 0.01
      elif arg == "no_margin":
        config.loss.m2 = 0.0
      elif arg in ("wide", "wide_small_lr"):
        config.model.width = 16
        config.train.lr = 0.01 if arg == "wide_small_lr" else 0.1
      elif arg == "pmap":
        config.train.parallel = "pmap"
      elif arg == "sharded":
        config.head.sharded = True
      return config

    def sweep(arg=None):
      return {None: ["base", "wide", "small_lr", "pmap", "no_margin", "wide_small_lr",
                     "sharded"],
              "bad": ["base", "fails", "small_lr", "wide"],
              "two": ["base", "small_lr"], "retry": ["fails", "killed"]}[arg]
    """)

# `python -m arcjax.pack -- <run flags> -- <run flags> …`: each run as the trainer parses
# it; a run of row 'fails' gets the pack's failure line, and one of row 'killed' none.
# $FAKE_PACK_EXIT: exit at once with that status.
FAKE_PACK = textwrap.dedent("""\
    import json, os, sys
    from absl import flags
    from ml_collections import config_flags

    def parse(argv):
      values = flags.FlagValues()
      config = config_flags.DEFINE_config_file("config", None, "", flag_values=values)
      flags.DEFINE_string("workdir", None, "", flag_values=values)
      flags.DEFINE_bool("distributed_auto", False, "", flag_values=values)
      values(["pack", *argv])
      return values["config"].serialize().rsplit(":", 1)[1].rstrip("'"), config.value, values

    args = sys.argv[1:]
    assert args[0] == "--", args
    if os.environ.get("FAKE_PACK_EXIT"):
      sys.exit(int(os.environ["FAKE_PACK_EXIT"]))
    groups, failed = [[]], 0
    for arg in args[1:]:
      if arg == "--":
        groups.append([])
      else:
        groups[-1].append(arg)
    print("pack of", len(groups), flush=True)
    for group in groups:
      row, config, values = parse(group)
      if row == "killed":
        continue
      if row == "fails":
        print(f"[{values.workdir}] failed: non-finite loss at step 3", flush=True)
        failed = 1
        continue
      os.makedirs(values.workdir, exist_ok=True)
      with open(os.path.join(values.workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort())
      with open(os.path.join(values.workdir, "results.json"), "w") as f:
        json.dump({"step": config.train.steps, "argv": group}, f)
      print(f"[{values.workdir}] finished", flush=True)
    sys.exit(failed)
    """)


@pytest.fixture
def grid_repo(tmp_path, monkeypatch) -> pathlib.Path:
  """A cwd holding grid.py and stand-in `arcjax.pack` and `arcjax.main`, as a repository."""
  (tmp_path / "grid.py").write_text(GRID)
  (tmp_path / "requirements.txt").write_text("jax==0.10.2\n")
  (tmp_path / "arcjax").mkdir()
  (tmp_path / "arcjax" / "__init__.py").write_text("")
  (tmp_path / "arcjax" / "pack.py").write_text(FAKE_PACK)
  # The solo trainer: the pack trainer with one run.
  (tmp_path / "arcjax" / "main.py").write_text(
      "import sys\nsys.argv[1:1] = ['--']\nexec(open('arcjax/pack.py').read())\n")
  monkeypatch.chdir(tmp_path)
  monkeypatch.delenv("PYTHONPATH", raising=False)
  return tmp_path


def _run_main(argv, **kwargs):
  out = io.StringIO()
  status = launch.main(argv, out=out, **kwargs)
  return status, out.getvalue()


def _names(packs):
  return [(pack.name, [run.name for run in pack.runs]) for pack in packs]


def _flags(row, run_workdir, *extra):
  return [f"--config=grid.py:{row}", f"--workdir={run_workdir}", *extra]


# --- planning ---------------------------------------------------------------------------------

def test_runs_that_differ_in_traced_values_share_a_pack_others_train_alone(grid_repo):
  path, rows = plan.load_grid("grid.py")
  runs = plan.plan_runs(rows, "runs", seeds=2)
  packs = plan.plan_packs(path, runs)
  assert _names(packs) == [
      ("pack1", ["base/seed0", "base/seed1", "small_lr/seed0", "small_lr/seed1",
                 "no_margin/seed0", "no_margin/seed1"]),
      ("pack2", ["wide/seed0", "wide/seed1", "wide_small_lr/seed0", "wide_small_lr/seed1"]),
      ("pmap/seed0", ["pmap/seed0"]), ("pmap/seed1", ["pmap/seed1"]),
      ("sharded/seed0", ["sharded/seed0"]), ("sharded/seed1", ["sharded/seed1"])]
  assert [pack.solo for pack in packs] == [False, False, True, True, True, True]
  assert packs[1].describe() == (
      "pack2 (wide/seed0, wide/seed1, wide_small_lr/seed0, wide_small_lr/seed1)")


def test_finished_and_changed_runs_are_left_out(grid_repo):
  path, rows = plan.load_grid("grid.py:two")
  runs = plan.plan_runs(rows, "runs", seeds=2)
  statuses = [("finished", []), ("new", []), ("changed", []), ("unfinished", [])]
  assert _names(plan.plan_packs(path, runs, statuses)) == [
      ("pack1", ["base/seed1", "small_lr/seed1"])]
  statuses[1] = ("finished", [])
  assert _names(plan.plan_packs(path, runs, statuses)) == [
      ("small_lr/seed1", ["small_lr/seed1"])]


@pytest.mark.parametrize("parallel, sizes", [(1, [6]), (2, [3, 3]), (4, [2, 2, 1, 1]),
                                             (6, [1] * 6), (9, [1] * 6)])
def test_parallel_cuts_each_group_into_near_equal_packs(grid_repo, parallel, sizes):
  path, rows = plan.load_grid("grid.py")
  runs = [run for run in plan.plan_runs(rows, "runs", seeds=2)
          if run.row in ("base", "small_lr", "no_margin")]
  packs = plan.plan_packs(path, runs, parallel=parallel)
  assert [len(pack.runs) for pack in packs] == sizes
  assert [run for pack in packs for run in pack.runs] == runs  # contiguous, in order
  assert [pack.name for pack in packs if not pack.solo] == [
      f"pack{k + 1}" for k in range(sum(size > 1 for size in sizes))]


def test_pack_command_is_each_run_s_solo_flags_after_a_separator():
  runs = (plan.Run("a", 0, "r/a/seed0", ("config.x=1 2", "config.seed=0")),
          plan.Run("b", None, "r/b", ()))
  assert plan.pack_command("g.py", plan.Pack("pack1", runs), python="py") == [
      "py", "-m", "arcjax.pack",
      "--", "--config=g.py:a", "--workdir=r/a/seed0", "--config.x=1 2", "--config.seed=0",
      "--", "--config=g.py:b", "--workdir=r/b"]
  assert plan.pack_command("g.py", plan.Pack("pack1", runs), python="py",
                           distributed_auto=True)[8:] == [
      "--distributed_auto", "--", "--config=g.py:b", "--workdir=r/b", "--distributed_auto"]
  alone = plan.Pack("b", runs[1:])
  assert plan.pack_command("g.py", alone, python="py") == plan.trainer_command(
      "g.py", "b", "r/b", python="py")


# --- local ------------------------------------------------------------------------------------

def test_local_dry_run_prints_each_pack_after_the_status_of_its_last_run(grid_repo):
  (grid_repo / "runs" / "base" / "seed1").mkdir(parents=True)
  (grid_repo / "runs" / "base" / "seed1" / "config.json").write_text(json.dumps(
      {"seed": 1, "model": {"width": 8}, "train": {"steps": 10, "lr": 0.1, "parallel": "mesh"},
       "head": {"sharded": False}, "loss": {"m2": 0.5}}))
  (grid_repo / "runs" / "base" / "seed1" / "results.json").write_text('{"step": 10}')
  status, out = _run_main(["--grid=grid.py:two", "--workdir=runs", "--seeds=2", "--vectorize",
                           "--parallel=2", "--dry-run"])
  assert status == 0
  py = sys.executable
  assert out.splitlines() == [
      "# base/seed0: new",
      "# base/seed1: finished, skipped",
      "# small_lr/seed0: new",
      "# pack1 (base/seed0, small_lr/seed0): output in runs/packs/pack1.log",
      shlex.join([py, "-m", "arcjax.pack", "--", *_flags("base", "runs/base/seed0",
                                                         "--config.seed=0"),
                  "--", *_flags("small_lr", "runs/small_lr/seed0", "--config.seed=0")]),
      "# small_lr/seed1: new",
      "# small_lr/seed1 (alone): output in runs/small_lr/seed1/launch.log",
      shlex.join([py, "-m", "arcjax.main",
                  *_flags("small_lr", "runs/small_lr/seed1", "--config.seed=1")])]
  assert not (grid_repo / "runs" / "packs").exists()


def test_local_packs_write_each_run_and_report_each_run(grid_repo):
  status, out = _run_main(["--grid=grid.py:bad", "--workdir=runs", "--vectorize",
                           "--parallel=2", "--override", "config.train.steps=5"])
  assert status == 1
  runs = grid_repo / "runs"
  for row in ("base", "small_lr", "wide"):
    written = json.loads((runs / row / "results.json").read_text())
    assert written["step"] == 5 and written["argv"][:2] == _flags(row, f"runs/{row}")
  assert not (runs / "fails" / "results.json").exists()
  lines = out.splitlines()
  assert "[pack1] [runs/fails] failed: non-finite loss at step 3" in lines
  table = lines[lines.index("summary: 3 finished, 1 failed, 0 skipped"):]
  assert [line.split()[:2] for line in table[1:]] == [
      ["finished", "base"], ["failed", "fails"], ["finished", "small_lr"],
      ["finished", "wide"]]
  assert table[2].endswith("(non-finite loss at step 3)  runs/packs/pack1.log")
  assert "(in pack1: exit status 1)" in table[1]
  assert table[4].endswith("runs/wide/launch.log")  # alone: a solo run, as without packs
  pack_log = (runs / "packs" / "pack1.log").read_text().splitlines()
  assert pack_log[0].startswith("=== ") and " -m arcjax.pack -- " in pack_log[0]
  assert pack_log[1:] == ["pack of 2", "[runs/base] finished",
                          "[runs/fails] failed: non-finite loss at step 3"]
  pointer = (runs / "fails" / "launch.log").read_text()
  assert pointer.startswith("=== ") and pointer.endswith(
      " trained in pack1 (base, fails): its output in runs/packs/pack1.log\n")
  # Again: only the failed run is left, alone now; the pack's log keeps both attempts.
  status, out = _run_main(["--grid=grid.py:bad", "--workdir=runs", "--vectorize",
                           "--override", "config.train.steps=5"])
  assert status == 1 and "summary: 0 finished, 1 failed, 3 skipped" in out
  assert (runs / "fails" / "launch.log").read_text().count("=== ") == 2


def test_each_attempt_of_a_pack_is_read_from_its_own_output(grid_repo, monkeypatch):
  status, out = _run_main(["--grid=grid.py:retry", "--workdir=runs", "--vectorize"])
  assert status == 1
  assert "(non-finite loss at step 3)" in out and "(pack1: exit status 1)" in out
  monkeypatch.setenv("FAKE_PACK_EXIT", "9")
  status, out = _run_main(["--grid=grid.py:retry", "--workdir=runs", "--vectorize"])
  table = out.splitlines()[-3:]
  assert table[0] == "summary: 0 finished, 2 failed, 0 skipped"
  assert ["(pack1: exit status 9)" in line for line in table[1:]] == [True, True]


def test_a_pack_that_ends_without_a_word_on_a_run_fails_that_run(grid_repo):
  run = plan.Run("killed", None, "runs/killed", ())
  pack = plan.Pack("pack1", (plan.Run("base", None, "runs/base", ()), run))
  said = "[runs/base] finished\n"
  job = summary.Outcome("pack1", "failed", "killed by SIGKILL", "runs/packs/pack1.log")
  assert [(o.status, o.detail) for o in summary.pack_outcomes(pack, job, said)] == [
      ("finished", "in pack1: killed by SIGKILL"), ("failed", "pack1: killed by SIGKILL")]
  for fate in ("interrupted", "queued"):
    job = summary.Outcome("pack1", fate, "x", None)
    assert [o.status for o in summary.pack_outcomes(pack, job, said)] == ["finished", fate]
  job = summary.Outcome("pack1", "finished", "9 s", None)
  assert summary.pack_outcomes(pack, job, said)[1].detail == "pack1 ended without finishing it"
  # A workdir's word wins over the lines: locally a run is finished when its results are.
  assert [o.status for o in summary.pack_outcomes(pack, job, said, lambda r: False)] == [
      "failed", "failed"]


# --- SLURM ------------------------------------------------------------------------------------

def test_slurm_submits_a_script_per_pack(grid_repo):
  submitted = []

  def submit(argv):
    submitted.append(argv[-1])
    if argv[-1].endswith("pmap/slurm.sbatch"):
      raise errors.Error("sbatch: error: invalid partition")
    return str(100 + len(submitted))

  status, out = _run_main(["--grid=grid.py", "--target=slurm", "--workdir=runs",
                           "--vectorize", "--gpus-per-node=2"], submit=submit)
  assert status == 1
  root = grid_repo / "runs"
  assert submitted == [str(root / "packs" / "pack1.sbatch"), str(root / "packs" / "pack2.sbatch"),
                       str(root / "pmap" / "slurm.sbatch"), str(root / "sharded" / "slurm.sbatch")]
  script = (root / "packs" / "pack1.sbatch").read_text().splitlines()
  assert f"#SBATCH --output={root}/packs/pack1-%j.out" in script
  assert "#SBATCH --job-name=grid.pack1" in script
  assert "# pack1 (base, small_lr, no_margin) of grid.py, written by python -m " \
         "experiments.launch." in script
  assert "export JAX_LOCAL_DEVICE_IDS=0,1" in script
  assert shlex.split(script[-1]) == [
      "srun", "--kill-on-bad-exit=1", "python3", "-m", "arcjax.pack",
      "--", *_flags("base", root / "base", "--distributed_auto"),
      "--", *_flags("small_lr", root / "small_lr", "--distributed_auto"),
      "--", *_flags("no_margin", root / "no_margin", "--distributed_auto")]
  solo = (root / "sharded" / "slurm.sbatch").read_text().splitlines()
  assert shlex.split(solo[-1])[4:6] == ["arcjax.main", "--config=grid.py:sharded"]
  lines = out.splitlines()
  assert f"[pack2] submitted: job 102 ({root}/packs/pack2.sbatch)" in lines
  assert "[pmap] FAILED to submit: sbatch: error: invalid partition" in lines
  table = lines[lines.index("summary: 0 finished, 1 failed, 0 skipped, 6 submitted"):]
  assert [line.split()[:2] for line in table[1:]] == [
      ["submitted", "base"], ["submitted", "wide"], ["submitted", "small_lr"],
      ["failed", "pmap"], ["submitted", "no_margin"], ["submitted", "wide_small_lr"],
      ["submitted", "sharded"]]
  assert "(job 101, pack1)" in table[1]


def test_slurm_dry_run_pasted_into_bash_writes_the_same_pack_scripts(grid_repo):
  argv = ["--grid=grid.py", "--target=slurm", "--workdir=runs", "--seeds=2", "--vectorize"]
  _, out = _run_main(argv + ["--dry-run"])
  assert not (grid_repo / "runs").exists()
  bin_dir = grid_repo / "bin"
  bin_dir.mkdir()
  (bin_dir / "sbatch").write_text("#!/bin/sh\necho \"$@\" >> sbatch.calls\n")
  (bin_dir / "sbatch").chmod(0o755)
  subprocess.run(["bash", "-e"], input=out, text=True, check=True, cwd=grid_repo,
                 env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
  scripts = sorted((grid_repo / "runs").rglob("*.sbatch"))
  pasted = {p: p.read_text() for p in scripts}
  for path in scripts:
    path.unlink()
  status, _ = _run_main(argv, submit=lambda argv: "7")
  assert status == 0
  assert {p: p.read_text() for p in (grid_repo / "runs").rglob("*.sbatch")} == pasted
  assert [p.relative_to(grid_repo / "runs").as_posix() for p in scripts] == [
      "packs/pack1.sbatch", "packs/pack2.sbatch", "pmap/seed0/slurm.sbatch",
      "pmap/seed1/slurm.sbatch", "sharded/seed0/slurm.sbatch", "sharded/seed1/slurm.sbatch"]


# --- TPU pod ----------------------------------------------------------------------------------

POD_ARGS = ["--grid=grid.py:bad", "--target=tpu-pod", "--tpu=pod", "--zone=z",
            "--bucket=gs://b/t", "--skip-deploy", "--vectorize"]


def test_tpu_pod_dry_run_gives_one_pack_per_group_over_every_worker(grid_repo):
  status, out = _run_main(POD_ARGS + ["--seeds=2", "--dry-run"])
  assert status == 0
  lines = out.splitlines()
  assert lines[0] == "# the packs, one after another, each on every worker (output: " \
                     "runs/bad-logs/)"
  assert lines[1] == "# pack1 (base/seed0, base/seed1, fails/seed0, fails/seed1, " \
                     "small_lr/seed0, small_lr/seed1)"
  assert lines[3] == "# pack2 (wide/seed0, wide/seed1)"
  gcloud = [shlex.split(line) for line in (lines[2], lines[4])]
  assert [argv[:8] for argv in gcloud] == [
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--zone=z", "--worker=all"]] * 2
  remote = shlex.split(gcloud[1][8].removeprefix("--command="))
  assert remote == [
      "cd", "~/arcjax", "&&", "python3", "-m", "arcjax.pack",
      "--", *_flags("wide", "gs://b/t/wide/seed0", "--config.seed=0", "--distributed_auto"),
      "--", *_flags("wide", "gs://b/t/wide/seed1", "--config.seed=1", "--distributed_auto")]
  assert lines[5:] == ["# the table", "python -m experiments.collect gs://b/t"]


def test_tpu_pod_runs_each_pack_and_reads_each_run_from_its_lines(grid_repo, monkeypatch):
  bin_dir = grid_repo / "bin"
  bin_dir.mkdir()
  # A stand-in gcloud: the pack trainer's lines, as the workers would print them.
  (bin_dir / "gcloud").write_text(textwrap.dedent("""\
      #!/bin/sh
      echo "$*" >> gcloud.calls
      case "$*" in
        *grid.py:fails*) echo "[gs://b/t/base] finished"
                         echo "[gs://b/t/fails] failed: non-finite loss"; exit 1;;
      esac
      echo "[gs://b/t/wide] finished"
      """))
  (bin_dir / "gcloud").chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
  status, out = _run_main(POD_ARGS)
  assert status == 1
  assert len((grid_repo / "gcloud.calls").read_text().splitlines()) == 2
  lines = out.splitlines()
  table = lines[lines.index("summary: 2 finished, 2 failed, 0 skipped"):]
  assert [line.split()[:2] for line in table[1:5]] == [
      ["finished", "base"], ["failed", "fails"], ["failed", "small_lr"], ["finished", "wide"]]
  assert table[2].endswith("(non-finite loss)  runs/bad-logs/pack1.log")
  assert table[3].endswith("(pack1: exit status 1)  runs/bad-logs/pack1.log")
  assert lines[-1] == "the table: python -m experiments.collect gs://b/t"


def test_tpu_pod_stop_command_finds_a_pack_by_its_first_run():
  runs = (plan.Run("a", None, "gs://b/a", ()), plan.Run("b", None, "gs://b/b", ()))
  from experiments import tpu_pod  # pylint: disable=import-outside-toplevel
  argv = tpu_pod.tpu_pod_stop_command("g.py", plan.Pack("pack1", runs), tpu="t", zone="z")
  assert shlex.split(argv[-1].removeprefix("--command=")) == [
      "pkill", "-INT", "-f", "--", "arcjax.pack -- --config=g.py:a --workdir=gs://b/a"]


# --- usage ------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--target=slurm", "--workdir=w", "--parallel=2"],
     "--parallel only applies to --target=local"),
    (["--target=tpu-pod", "--tpu=t", "--zone=z", "--bucket=gs://b", "--parallel=2"],
     "--parallel only applies to --target=local"),
])
def test_combinations_that_do_not_apply_are_refused_in_one_line(grid_repo, capsys, argv,
                                                                 message):
  with pytest.raises(SystemExit) as e:
    launch.main(["--grid=grid.py", "--vectorize", "--dry-run", *argv], out=io.StringIO())
  assert e.value.code == 2
  assert capsys.readouterr().err.splitlines()[-1] == (
      f"python -m experiments.launch: error: {message}")  # after argparse's usage

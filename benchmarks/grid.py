"""Wall time of a seeded grid launched run by run against the same grid launched in packs.

Each mode launches the whole grid afresh, one after another in one invocation, with
`python -m experiments.launch` into its own folder: 'solo' (`--parallel=2`: two trainers
at a time), 'vectorize' (`--vectorize --parallel=2`: each group of runs that can train
together cut into two packs, trained at the same time) and, if asked for,
'vectorize1' (`--vectorize --parallel=1`: one pack per group). It prints each mode's
wall time and its ratio to 'solo', and where the time went, summed over the jobs
(trainer processes): their steady steps (from each run's metrics.jsonl: the logged
windows' steps × batch / train/images_per_s, which leave out the first step's
compile and the evaluations) and the rest of each job's time (start-up, compilation,
evaluations, checkpoints). A pack's steady steps are its slowest run's, each run's
images/s counting its own images over the pack's time, as a solo run's does.

  python -m benchmarks.grid [--grid=configs/ablations.py:table5] [--seeds=3] \
      [--modes solo vectorize vectorize1] [--rows=N] [--override config.F=V ...] \
      [--workdir=DIR] [--smoke]

`--smoke`: 2 rows × 2 seeds, 10 steps each (CI). The packs need the pack trainer,
`python -m arcjax.pack`: without it this stops at once, in one line.
"""

import argparse
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Sequence

from arcjax import errors
from experiments import plan

MODES = {"solo": ["--parallel=2"], "vectorize": ["--vectorize", "--parallel=2"],
         "vectorize1": ["--vectorize", "--parallel=1"]}
_JOB_END = re.compile(r"\[(.+)\] finished in (\d+) s$")
_SMOKE = ("config.train.steps=10", "config.train.log_every=5", "config.eval.every=0",
          "config.angles.probe_size=64")


def _grid_of_rows(spec: str, count: int, folder: str) -> str:
  """A grid file in `folder` whose sweep is the first `count` rows of grid `spec`."""
  path, arg = plan.split_grid_spec(spec)
  sweep_arg = "" if arg is None else repr(arg)
  wrapper = os.path.join(folder, f"first{count}_{plan.grid_name(spec)}.py")
  with open(wrapper, "w", encoding="utf-8") as f:
    f.write(textwrap.dedent(f"""\
        # The first {count} rows of {spec}, written by benchmarks/grid.py.
        import importlib.util
        _spec = importlib.util.spec_from_file_location("_grid", {os.path.abspath(path)!r})
        _grid = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(_grid)
        get_config = _grid.get_config

        def sweep(arg=None):
          return list(_grid.sweep({sweep_arg}))[:{count}]
        """))
  return wrapper


def _launch(grid: str, root: str, seeds: int, overrides: Sequence[str], flags: Sequence[str],
            log_path: str) -> tuple[float, str]:
  """(wall seconds, output) of one launch of the grid; raises errors.Error if it fails."""
  argv = [sys.executable, "-m", "experiments.launch", f"--grid={grid}", f"--workdir={root}",
          f"--seeds={seeds}", *flags, *(["--override", *overrides] if overrides else [])]
  start = time.perf_counter()
  result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          check=False)
  seconds = time.perf_counter() - start
  with open(log_path, "w", encoding="utf-8") as f:
    f.write(result.stdout)
  if result.returncode != 0:
    raise errors.Error(f"`{' '.join(argv[1:])}` failed with exit status {result.returncode}; "
                       f"its output: {log_path}")
  return seconds, result.stdout


def _steady_seconds(run_dir: str) -> float:
  """A run's seconds in steady steps: Σ over its logged windows of steps × batch / images/s."""
  with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
    batch_size = json.load(f)["train"]["batch_size"]
  seconds, last = 0.0, 1  # the first window starts after the first (compiling) step
  with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      rate = row.get("train/images_per_s")
      if isinstance(rate, (int, float)) and rate > 0:
        seconds += (row["step"] - last) * batch_size / rate
        last = row["step"]
  return seconds


def _where_the_time_went(root: str, output: str) -> tuple[int, float, float]:
  """(jobs, their seconds summed, their steady steps' seconds summed) of one launch."""
  job_seconds = {name: float(s) for name, s in
                 (m.groups() for m in map(_JOB_END.search, output.splitlines()) if m)}
  steady = 0.0
  for name in job_seconds:
    pack_log = os.path.join(root, plan.PACK_FOLDER, f"{name}.log")
    if os.path.exists(pack_log):  # a pack: its runs' workdirs are in its command, the header
      with open(pack_log, encoding="utf-8") as f:
        command = shlex.split(f.readline().split(" ", 2)[2])  # '=== <time> <command>'
      run_dirs = [a.removeprefix("--workdir=") for a in command if a.startswith("--workdir=")]
    else:
      run_dirs = [os.path.join(root, name)]
    steady += max(_steady_seconds(d) for d in run_dirs)
  return len(job_seconds), sum(job_seconds.values()), steady


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--grid", default="configs/ablations.py:table5")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--rows", type=int, help="the grid's first N rows only (default all)")
  parser.add_argument("--modes", nargs="+", choices=list(MODES), default=["solo", "vectorize"])
  parser.add_argument("--override", nargs="+", default=[], metavar="config.FIELD=VALUE")
  parser.add_argument("--workdir", help="where the runs go (default: a temporary folder, "
                                        "removed after)")
  parser.add_argument("--smoke", action="store_true", help="2 rows × 2 seeds, 10 steps (CI)")
  args = parser.parse_args(argv)
  if args.smoke:
    args.rows, args.seeds, args.override = 2, 2, [*_SMOKE, *args.override]
  with errors.report_errors():
    if (any("--vectorize" in MODES[m] for m in args.modes)
        and importlib.util.find_spec(plan.PACK_TRAINER_MODULE) is None):
      raise errors.Error(f"the packs need the pack trainer ({plan.PACK_TRAINER_MODULE}), "
                         "which this checkout lacks: only --modes solo can run")
    with tempfile.TemporaryDirectory(prefix="grid_benchmark_") as scratch:
      folder = args.workdir or scratch
      os.makedirs(folder, exist_ok=True)
      grid = _grid_of_rows(args.grid, args.rows, folder) if args.rows else args.grid
      rows = len(plan.load_grid(grid)[1])
      print(f"{args.grid}: {rows} rows × {args.seeds} seeds"
            + (f", {' '.join(args.override)}" if args.override else "")
            + f"; {os.cpu_count()} CPUs; modes one after another", flush=True)
      print("| mode | launcher flags | wall s | / solo | jobs | job s (sum) | steady steps s "
            "(sum) | the rest s (sum) |")
      print("|---|---|---|---|---|---|---|---|")
      walls = {}
      for mode in args.modes:
        root = os.path.join(folder, mode)
        walls[mode], output = _launch(grid, root, args.seeds, args.override, MODES[mode],
                                      os.path.join(folder, f"{mode}.log"))
        jobs, job_s, steady_s = _where_the_time_went(root, output)
        ratio = f"{walls[mode] / walls['solo']:.2f}" if "solo" in walls else "-"
        print(f"| {mode} | {' '.join(MODES[mode])} | {walls[mode]:.1f} | {ratio} | {jobs} "
              f"| {job_s:.0f} | {steady_s:.0f} | {job_s - steady_s:.0f} |", flush=True)
      print("steady steps: the logged windows (first step and evaluations left out); the "
            "rest: start-up, compilation, evaluations, checkpoints. Job seconds are whole "
            "seconds as the launcher prints them.")


if __name__ == "__main__":
  main()

"""Launches every run of a grid: locally, as SLURM jobs, or on every worker of a TPU VM pod.

  python -m experiments.launch --grid=configs/ablations.py:table5 --workdir=runs/table5 \
      [--seeds=3] [--parallel=2] [--vectorize] [--override config.train.steps=300 ...] \
      [--dry-run]
  python -m experiments.launch --grid=configs/ablations.py:table5 --target=slurm \
      --workdir=/shared/runs/table5 --nodes=2 --gpus-per-node=8 [--partition=P] [--time=T] \
      [--account=A] [--slurm-setup='source .venv/bin/activate'] [--dry-run]
  python -m experiments.launch --grid=configs/ablations.py:table5 --target=tpu-pod \
      --tpu=NAME --zone=ZONE --bucket=gs://BUCKET/table5 [--commit=HEAD] [--skip-deploy] \
      [--remote-dir=~/arcjax] [--log-dir=runs/table5-logs] [--dry-run]

A grid file is a config file (`get_config(arg)`) with a module-level
`sweep(arg=None)` returning the config args of its runs, here called rows. Row
`r` runs as `python -m arcjax.main --config=<grid file>:r --workdir=<workdir>/r`;
with `--seeds=N`, N times, as `--workdir=<workdir>/r/seed<k> --config.seed=k`
(k = 0 … N−1).

Locally and on SLURM, the launcher first builds each run's config exactly as
the trainer will and compares it with the run's workdir:
  finished     results.json for the requested steps: skipped
  changed      a checkpoint trained with another config: not run (the summary says
               how to go on: a new --workdir, or the trainer with --allow_config_change)
  new, unfinished   run; the trainer resumes an unfinished run from its checkpoint
After the runs, each has one of: finished, failed, skipped, changed, interrupted,
queued (never started: the launcher was stopped first), submitted (SLURM).

Locally, runs go `--parallel` at a time, each trainer's output in `<run
workdir>/launch.log` and on the terminal; Ctrl-C or SIGTERM stops the launcher
cleanly, forwarded to the running trainers, which save and exit (a second one
kills them). On SLURM each run to do gets `<run workdir>/slurm.sbatch`,
submitted with `sbatch --parsable`. On a TPU pod the launcher deploys the
repository to every worker, then runs the rows one after another on all
workers, their workdirs in the bucket. `--dry-run` prints every command (and
SLURM script) and runs nothing.

`--vectorize` (every target) trains the runs in packs (experiments/plan.py,
`plan_packs`): the runs to do whose configs differ only in values a traced step
takes (`arcjax.train.pack_key`) train together in one process, `python -m
arcjax.pack`, which writes each run's own workdir as a solo run would. Locally
each group of such runs is cut into `--parallel` packs, run `--parallel` at a
time, each pack's output in `<workdir>/packs/<pack>.log` (each run's launch.log
points there); on SLURM each group is one job, `<workdir>/packs/<pack>.sbatch`;
on a TPU pod each group is one pack trained over every worker, the packs one
after another. A run alone in its group runs as without --vectorize.

The parts: experiments/plan.py (the grid, its runs and their statuses),
local.py (processes, signals, logs), slurm.py, tpu_pod.py, summary.py.
"""

import argparse
import os
import posixpath
import sys
from typing import Callable, Sequence, TextIO

from arcjax import errors
from arcjax import workdir
from experiments import local
from experiments import plan
from experiments import slurm
from experiments import tpu_pod

TARGETS = ("local", "slurm", "tpu-pod")

# Options that apply to some targets only: option -> those targets.
_TARGET_OPTIONS = {
    "parallel": ("local",),
    **dict.fromkeys(("nodes", "gpus_per_node", "partition", "time", "account", "slurm_setup"),
                    ("slurm",)),
    **dict.fromkeys(("tpu", "zone", "bucket", "remote_dir", "commit", "log_dir", "skip_deploy"),
                    ("tpu-pod",)),
    "remote_python": ("slurm", "tpu-pod"),
}


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.launch", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--grid", required=True,
                      help="grid file[:sweep argument], e.g. configs/ablations.py:table5")
  parser.add_argument("--target", default="local", choices=TARGETS)
  parser.add_argument("--workdir", help="local, slurm: the folder holding one workdir per row")
  parser.add_argument("--seeds", type=int,
                      help="run each row N times, in <row>/seed<k> with config.seed=k")
  parser.add_argument("--override", action="extend", nargs="+", default=[],
                      metavar="config.FIELD=VALUE", help="config fields to change in every run")
  parser.add_argument("--dry-run", action="store_true",
                      help="print the commands (and SLURM scripts), run nothing")
  parser.add_argument("--traceback", action="store_true",
                      help="show the traceback of an error instead of one line")
  parser.add_argument("--parallel", type=int,
                      help="local: jobs (runs, or packs with --vectorize) at a time (default 1)")
  parser.add_argument("--vectorize", action="store_true",
                      help="train the runs that can train together in one process each "
                           "(packs; with --parallel=P locally, P packs per group)")
  slurm = parser.add_argument_group("--target=slurm")
  slurm.add_argument("--nodes", type=int, help="nodes per run (default 1), one task each")
  slurm.add_argument("--gpus-per-node", type=int, help="GPUs per node")
  slurm.add_argument("--partition")
  slurm.add_argument("--time", help="time limit per run, e.g. 1-00:00:00")
  slurm.add_argument("--account")
  slurm.add_argument("--slurm-setup", metavar="LINE",
                     help="a shell line run before the trainer, e.g. "
                          "'source .venv/bin/activate'")
  pod = parser.add_argument_group("--target=tpu-pod")
  pod.add_argument("--tpu", help="the TPU VM's name")
  pod.add_argument("--zone", help="the TPU VM's zone")
  pod.add_argument("--bucket", help="gs:// folder holding one workdir per row")
  pod.add_argument("--commit", help="the commit deployed to the workers (default HEAD)")
  pod.add_argument("--skip-deploy", action="store_true",
                   help="the workers already hold the repository and its packages")
  pod.add_argument("--remote-dir", help="the repository on the workers (default ~/arcjax)")
  pod.add_argument("--log-dir", help="where each run's output is appended "
                                     "(default runs/<grid name>-logs)")
  parser.add_argument("--remote-python",
                      help="slurm, tpu-pod: the Python interpreter on the nodes (default python3)")
  return parser


def _check_args(args: argparse.Namespace) -> None:
  """Flag combinations; raises ValueError (a usage error)."""
  for name, targets in _TARGET_OPTIONS.items():
    if getattr(args, name) not in (None, False) and args.target not in targets:
      raise ValueError(f"--{name.replace('_', '-')} only applies to "
                       f"--target={' or '.join(targets)}")
  if args.target in ("local", "slurm"):
    if not args.workdir:
      raise ValueError(f"--target={args.target} needs --workdir (the folder of the runs' "
                       "workdirs)")
    if workdir.is_remote(args.workdir):
      raise ValueError(f"--target={args.target} needs a local (or shared) --workdir; "
                       "for gs:// use --target=tpu-pod --bucket")
  else:
    missing = [f"--{f}" for f in ("tpu", "zone", "bucket") if not getattr(args, f)]
    if missing:
      raise ValueError(f"--target=tpu-pod needs {', '.join(missing)}")
    if args.workdir:
      raise ValueError("--workdir is for --target=local or slurm; on a TPU pod the workdirs "
                       "are <--bucket>/<row>")
    if not args.bucket.startswith("gs://") or len(args.bucket.rstrip("/")) <= len("gs://"):
      raise ValueError(f"--bucket must be a gs://BUCKET[/PATH] folder, got {args.bucket!r}")
  for name in ("parallel", "seeds", "nodes", "gpus_per_node"):
    value = getattr(args, name)
    if value is not None and value < 1:
      raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
  for override in args.override:
    plan.override_flag(override)
    if args.seeds is not None and override.startswith("config.seed="):
      raise ValueError("--seeds sets config.seed of each run: drop --override config.seed=…")


def _launch(args: argparse.Namespace, out: TextIO,
            submit: Callable[[Sequence[str]], str]) -> int:
  grid_path, rows = plan.load_grid(args.grid)
  root = {"local": args.workdir, "slurm": os.path.abspath(args.workdir or ""),
          "tpu-pod": (args.bucket or "").rstrip("/")}[args.target]
  runs = plan.plan_runs(rows, root, args.override, args.seeds)
  if args.target == "local":
    return local.launch(grid_path, runs, parallel=args.parallel or 1,
                        vectorize=args.vectorize,
                        pack_dir=posixpath.join(root, plan.PACK_FOLDER), dry_run=args.dry_run,
                        out=out)
  if args.target == "slurm":
    options = slurm.SlurmOptions(
        nodes=args.nodes or 1, gpus_per_node=args.gpus_per_node, partition=args.partition,
        time=args.time, account=args.account, setup=args.slurm_setup,
        python=args.remote_python or "python3")
    return slurm.launch(grid_path, runs, options, grid_name=plan.grid_name(args.grid),
                        vectorize=args.vectorize,
                        pack_dir=posixpath.join(root, plan.PACK_FOLDER), dry_run=args.dry_run,
                        out=out, submit=submit)
  pod = tpu_pod.PodOptions(
      tpu=args.tpu, zone=args.zone,
      log_dir=args.log_dir or os.path.join("runs", f"{plan.grid_name(args.grid)}-logs"),
      remote_dir=args.remote_dir or "~/arcjax", python=args.remote_python or "python3",
      commit=args.commit or "HEAD", deploy=not args.skip_deploy)
  return tpu_pod.launch(grid_path, runs, pod, root=root, vectorize=args.vectorize,
                        dry_run=args.dry_run, out=out)


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout, *,
         submit: Callable[[Sequence[str]], str] = slurm.submit_with_sbatch) -> int:
  """The command line; returns the exit status (see `summary.exit_status`).

  `submit` runs an sbatch argv and returns the job id (tests pass a stand-in).
  """
  parser = _parser()
  args = parser.parse_args(argv)
  try:
    _check_args(args)
  except ValueError as error:
    parser.error(str(error))
  with errors.report_errors(traceback=args.traceback):
    return _launch(args, out, submit)


if __name__ == "__main__":
  sys.exit(main())

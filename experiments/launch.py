"""Launches every run of a grid: locally, or on every worker of a TPU VM pod.

  python -m experiments.launch --grid=configs/ablations.py:table5 --workdir=runs/table5 \
      [--parallel=2] [--override config.train.steps=300 ...] [--dry-run]
  python -m experiments.launch --grid=configs/ablations.py:table5 --target=tpu-pod \
      --tpu=NAME --zone=ZONE --bucket=gs://BUCKET/table5 [--remote-dir=~/arcjax] [--dry-run]

A grid file is a config file (`get_config(arg)`) with a module-level
`sweep(arg=None)` returning the config args of its runs, here called rows. Row
`r` runs as `python -m arcjax.main --config=<grid file>:r --workdir=<workdir>/r`.

Locally, a run whose `results.json` exists has finished and is skipped; any
other is started again and the trainer resumes it from its last checkpoint.
Each run's output goes to `<workdir>/<row>/launch.log` (appended, one header
per attempt) and, prefixed by `[row]`, to the terminal. A failed run does not
stop the others; the exit status is 1 if any failed.

On a TPU pod the runs go one after another (each needs the whole pod), each
started on all workers at once by `gcloud compute tpus tpu-vm ssh --worker=all`
with its workdir in the bucket. The launcher cannot see the bucket, so it skips
nothing there: the trainer resumes a run from its checkpoint in the bucket.
"""

import argparse
import concurrent.futures
import dataclasses
import datetime
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from typing import Sequence, TextIO

TRAINER_MODULE = "arcjax.main"
TARGETS = ("local", "tpu-pod")
RESULTS_FILE = "results.json"
LOG_FILE = "launch.log"
_OVERRIDE = re.compile(r"config(\.[A-Za-z_]\w*)+=")


@dataclasses.dataclass(frozen=True)
class Job:
  """One run to execute: its row name, argv, and the file its output is appended to."""
  name: str
  argv: tuple[str, ...]
  log_path: str | None


@dataclasses.dataclass(frozen=True)
class Outcome:
  """What became of a run: status is 'finished', 'failed' or 'skipped'."""
  name: str
  status: str
  detail: str
  log_path: str | None


def split_grid_spec(spec: str) -> tuple[str, str | None]:
  """'configs/ablations.py:table5' -> ('configs/ablations.py', 'table5'); no ':' -> arg None."""
  path, sep, arg = spec.partition(":")
  if not path:
    raise ValueError(f"--grid {spec!r} names no file")
  return path, (arg if sep else None)


def load_grid(spec: str) -> tuple[str, list[str]]:
  """Imports a grid file and calls its `sweep`.

  Args:
    spec: 'PATH' or 'PATH:ARG'; ARG, if given, is passed to `sweep(ARG)`.

  Returns:
    (PATH, the row names `sweep` returned): unique, non-empty, usable as a
    directory name.
  """
  path, arg = split_grid_spec(spec)
  if not os.path.isfile(path):
    raise ValueError(f"grid file {path!r} does not exist")
  module_name = "_arcjax_grid_" + re.sub(r"\W", "_", os.path.abspath(path))
  module_spec = importlib.util.spec_from_file_location(module_name, path)
  if module_spec is None or module_spec.loader is None:
    raise ValueError(f"grid file {path!r} is not a Python file")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  sweep = getattr(module, "sweep", None)
  if not callable(sweep):
    raise ValueError(f"grid file {path!r} has no sweep() function listing its runs")
  rows = sweep() if arg is None else sweep(arg)
  if isinstance(rows, str) or not isinstance(rows, (list, tuple)):
    raise ValueError(f"sweep({arg!r}) in {path!r} must return a list of row names, "
                     f"got {rows!r}")
  for row in rows:
    if (not isinstance(row, str) or not row or row in (".", "..") or "/" in row
        or os.sep in row or ":" in row or row != row.strip()):
      raise ValueError(f"sweep({arg!r}) in {path!r} returned {row!r}, which is not "
                       f"usable as a run directory name")
  duplicates = sorted({row for row in rows if rows.count(row) > 1})
  if duplicates:
    raise ValueError(f"sweep({arg!r}) in {path!r} lists {duplicates} more than once")
  if not rows:
    raise ValueError(f"sweep({arg!r}) in {path!r} returned no rows")
  return path, list(rows)


def override_flag(override: str) -> str:
  """'config.train.steps=300' -> '--config.train.steps=300' (the trainer's flag)."""
  if not _OVERRIDE.match(override):
    raise ValueError(f"override {override!r} is not of the form config.FIELD=VALUE "
                     f"(e.g. config.train.steps=300)")
  return "--" + override


def trainer_command(grid_path: str, row: str, workdir: str,
                    overrides: Sequence[str] = (), *,
                    python: str = sys.executable) -> list[str]:
  """argv of one row's trainer.

  `python -m arcjax.main --config=GRID:ROW --workdir=DIR [--config.FIELD=VALUE …]`.
  """
  return [python, "-m", TRAINER_MODULE, f"--config={grid_path}:{row}",
          f"--workdir={workdir}", *(override_flag(o) for o in overrides)]


def _quote_remote_path(path: str) -> str:
  """Shell-quotes a path but leaves a leading '~/' bare, so the worker's shell expands it."""
  if path == "~":
    return path
  if path.startswith("~/"):
    return "~/" + shlex.quote(path[2:])
  return shlex.quote(path)


def tpu_pod_command(grid_path: str, row: str, *, tpu: str, zone: str, bucket: str,
                    remote_dir: str = "~/arcjax", remote_python: str = "python3",
                    overrides: Sequence[str] = ()) -> list[str]:
  """argv of the gcloud command that starts one row on every worker of a TPU VM pod.

  Args:
    grid_path: the grid file relative to the repository, as on the workers.
    row: the row name; its workdir is `<bucket>/<row>`.
    tpu, zone: the TPU VM's name and zone.
    bucket: 'gs://…' folder holding one workdir per row.
    remote_dir: the repository on the workers ('~/…' is expanded there).
    remote_python: the Python interpreter on the workers.
    overrides: 'config.FIELD=VALUE' strings.

  Returns:
    ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', tpu, '--zone=…',
    '--worker=all', '--command=cd DIR && PYTHON -m arcjax.main …'].
  """
  if not bucket.startswith("gs://") or len(bucket.rstrip("/")) <= len("gs://"):
    raise ValueError(f"--bucket must be a gs://BUCKET[/PATH] folder, got {bucket!r}")
  if os.path.isabs(grid_path) or os.path.normpath(grid_path).startswith(".."):
    raise ValueError(f"grid file {grid_path!r} must be a path inside the repository "
                     f"(relative to it), so that the workers find it under the remote dir")
  workdir = f"{bucket.rstrip('/')}/{row}"
  trainer = trainer_command(grid_path, row, workdir, overrides, python=remote_python)
  remote = f"cd {_quote_remote_path(remote_dir)} && {shlex.join(trainer)}"
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, f"--zone={zone}",
          "--worker=all", f"--command={remote}"]


def is_finished(run_dir: str) -> bool:
  """A run has finished when the trainer has written its results.json (last)."""
  return os.path.isfile(os.path.join(run_dir, RESULTS_FILE))


def _run_job(job: Job, out: TextIO, lock: threading.Lock) -> Outcome:
  """Runs one job to completion, appending its output to its log and, prefixed, to `out`."""
  def emit(line: str) -> None:
    with lock:
      out.write(f"[{job.name}] {line}\n")
      out.flush()

  log = open(job.log_path, "a", encoding="utf-8") if job.log_path else None
  start = time.monotonic()
  try:
    if log:
      log.write(f"=== {datetime.datetime.now().isoformat(timespec='seconds')} "
                f"{shlex.join(job.argv)}\n")
      log.flush()
    emit(f"started{f' (log: {job.log_path})' if job.log_path else ''}")
    # Unbuffered child output, so that lines arrive as the run makes them.
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
      proc = subprocess.Popen(job.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, env=env)
    except OSError as e:
      emit(f"FAILED to start: {e}")
      return Outcome(job.name, "failed", f"could not start: {e}", job.log_path)
    assert proc.stdout is not None
    for raw in proc.stdout:
      line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
      if log:
        log.write(line + "\n")
        log.flush()
      emit(line)
    returncode = proc.wait()
  finally:
    if log:
      log.close()
  seconds = time.monotonic() - start
  if returncode == 0:
    emit(f"finished in {seconds:.0f} s")
    return Outcome(job.name, "finished", f"{seconds:.0f} s", job.log_path)
  emit(f"FAILED with exit status {returncode} after {seconds:.0f} s")
  return Outcome(job.name, "failed", f"exit status {returncode}", job.log_path)


def run_jobs(jobs: Sequence[Job], parallel: int = 1,
             out: TextIO = sys.stdout) -> list[Outcome]:
  """Runs jobs `parallel` at a time; a failing job does not stop the others.

  Returns:
    One Outcome per job, in the order of `jobs`.
  """
  if parallel < 1:
    raise ValueError(f"parallel must be >= 1, got {parallel}")
  lock = threading.Lock()
  with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
    futures = [pool.submit(_run_job, job, out, lock) for job in jobs]
    return [f.result() for f in futures]


def format_summary(outcomes: Sequence[Outcome]) -> str:
  """'N finished, N failed, N skipped' and a line per run with its log."""
  counts = {s: sum(o.status == s for o in outcomes) for s in ("finished", "failed", "skipped")}
  lines = [f"summary: {counts['finished']} finished, {counts['failed']} failed, "
           f"{counts['skipped']} skipped"]
  width = max((len(o.name) for o in outcomes), default=0)
  for o in outcomes:
    where = f"  {o.log_path}" if o.log_path else ""
    lines.append(f"  {o.status:<8}  {o.name:<{width}}  ({o.detail}){where}")
  return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.launch", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--grid", required=True,
                      help="grid file[:sweep argument], e.g. configs/ablations.py:table5")
  parser.add_argument("--target", default="local", choices=TARGETS)
  parser.add_argument("--workdir", help="local: the folder holding one workdir per row")
  parser.add_argument("--parallel", type=int, default=1, help="local: runs at a time")
  parser.add_argument("--override", action="extend", nargs="+", default=[],
                      metavar="config.FIELD=VALUE", help="config fields to change in every run")
  parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  parser.add_argument("--tpu", help="tpu-pod: the TPU VM's name")
  parser.add_argument("--zone", help="tpu-pod: the TPU VM's zone")
  parser.add_argument("--bucket", help="tpu-pod: gs:// folder holding one workdir per row")
  parser.add_argument("--remote-dir", default="~/arcjax",
                      help="tpu-pod: the repository on the workers")
  parser.add_argument("--remote-python", default="python3",
                      help="tpu-pod: the Python interpreter on the workers")
  return parser


def _local_jobs(args, grid_path: str, rows: Sequence[str],
                out: TextIO) -> tuple[list[Job], list[Outcome]]:
  """Jobs of the unfinished rows, and 'skipped' outcomes of the finished ones."""
  jobs, skipped = [], []
  for row in rows:
    run_dir = os.path.join(args.workdir, row)
    log_path = os.path.join(run_dir, LOG_FILE)
    if is_finished(run_dir):
      skipped.append(Outcome(row, "skipped", f"finished: {RESULTS_FILE} exists", log_path))
      if args.dry_run:
        out.write(f"# {row}: finished ({os.path.join(run_dir, RESULTS_FILE)} exists), skipped\n")
      continue
    argv = trainer_command(grid_path, row, run_dir, args.override)
    if args.dry_run:
      out.write(shlex.join(argv) + "\n")
    else:
      os.makedirs(run_dir, exist_ok=True)
      if os.path.isfile(log_path):
        out.write(f"[{row}] resuming (earlier attempts in {log_path})\n")
    jobs.append(Job(row, tuple(argv), log_path))
  return jobs, skipped


def _check_args(args) -> None:
  if args.target == "local":
    given = [f"--{f}" for f in ("tpu", "zone", "bucket") if getattr(args, f) is not None]
    if given:
      raise ValueError(f"{', '.join(given)} only apply to --target=tpu-pod")
    if not args.workdir:
      raise ValueError("--target=local needs --workdir (the folder of the runs' workdirs)")
  else:
    missing = [f"--{f}" for f in ("tpu", "zone", "bucket") if not getattr(args, f)]
    if missing:
      raise ValueError(f"--target=tpu-pod needs {', '.join(missing)}")
    if args.workdir:
      raise ValueError("--workdir is for --target=local; on a TPU pod the workdirs "
                       "are <--bucket>/<row>")
    if args.parallel != 1:
      raise ValueError("--parallel is for --target=local: each run on a TPU pod uses "
                       "the whole pod")
  if args.parallel < 1:
    raise ValueError(f"--parallel must be >= 1, got {args.parallel}")
  for override in args.override:
    override_flag(override)


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
  """The command line; returns the exit status (1 if any run failed)."""
  parser = _parser()
  args = parser.parse_args(argv)
  try:
    _check_args(args)
    grid_path, rows = load_grid(args.grid)
    if args.target == "local":
      jobs, skipped = _local_jobs(args, grid_path, rows, out)
    else:
      jobs = [Job(row, tuple(tpu_pod_command(
          grid_path, row, tpu=args.tpu, zone=args.zone, bucket=args.bucket,
          remote_dir=args.remote_dir, remote_python=args.remote_python,
          overrides=args.override)), None) for row in rows]
      skipped = []
      if args.dry_run:
        out.writelines(shlex.join(job.argv) + "\n" for job in jobs)
  except ValueError as e:
    parser.error(str(e))
  if args.dry_run:
    return 0
  outcomes = {o.name: o for o in skipped}
  outcomes.update((o.name, o) for o in run_jobs(jobs, args.parallel, out))
  out.write(format_summary([outcomes[row] for row in rows]) + "\n")
  return int(any(o.status == "failed" for o in outcomes.values()))


if __name__ == "__main__":
  sys.exit(main())

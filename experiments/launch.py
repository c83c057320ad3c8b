"""Launches every run of a grid: locally, as SLURM jobs, or on every worker of a TPU VM pod.

  python -m experiments.launch --grid=configs/ablations.py:table5 --workdir=runs/table5 \
      [--seeds=3] [--parallel=2] [--override config.train.steps=300 ...] [--dry-run]
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

Locally, runs go `--parallel` at a time. Each trainer writes its output to
`<run workdir>/launch.log` (appended, one header per attempt), which the
launcher shows on the terminal prefixed by `[row]`. A failed run does not stop
the others; the exit status is 1 if any run failed or changed.

Ctrl-C (SIGINT) or SIGTERM stops the launcher cleanly: no new run starts, the
signal is forwarded to every running trainer (which saves a checkpoint and
exits), and the launcher waits for them, prints the summary and exits 130
(SIGINT) / 143 (SIGTERM). A second Ctrl-C or SIGTERM while it waits kills the
trainers at once (SIGKILL to each trainer's process group; they resume from
their last completed checkpoint). Trainers run in their own sessions, so a
terminal's Ctrl-C reaches the launcher only, which forwards it once. If the
launcher itself is killed (SIGKILL), Linux sends each trainer SIGTERM
(prctl PR_SET_PDEATHSIG), so they save and exit rather than run on unwatched.

On SLURM (`--target=slurm`) each run to do gets `<run workdir>/slurm.sbatch`,
submitted with `sbatch --parsable`: one task per node, `srun python3 -m
arcjax.main … --distributed_auto`, its output in `<run workdir>/slurm-<job>.out`.

On a TPU pod the launcher first deploys the repository (`git archive` of
--commit, copied to every worker and unpacked into --remote-dir, with
requirements.txt and the TPU build of the pinned jax installed), then runs the
rows one after another (each needs the whole pod), each started on all workers
at once by `gcloud compute tpus tpu-vm ssh --worker=all`, its workdir in the
bucket, its output shown prefixed and appended to `<--log-dir>/<run>.log`;
finally it prints the command that collects the grid from the bucket. The
launcher does not look into the bucket: the trainer resumes a run from its
checkpoint there. `--dry-run` prints every command (pasteable) and runs nothing.
"""

import argparse
import collections
import contextlib
import ctypes
import dataclasses
import datetime
import importlib.util
import os
import posixpath
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterator, Sequence, TextIO

from absl import flags
import ml_collections
from ml_collections import config_flags

from arcjax import errors
from arcjax import workdir

TRAINER_MODULE = "arcjax.main"
TARGETS = ("local", "slurm", "tpu-pod")
STATUSES = ("finished", "failed", "skipped", "changed", "interrupted", "queued", "submitted")
LIBTPU_RELEASES = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
SLURM_GRACE_S = 120  # SIGTERM this long before a SLURM time limit, for the final checkpoint
_OVERRIDE = re.compile(r"config(\.[A-Za-z_]\w*)+=")
_SEED_FOLDER = re.compile(r"seed(\d+)")
_EXIT_STATUS = {signal.SIGINT: errors.EXIT_INTERRUPTED, signal.SIGTERM: errors.EXIT_TERMINATED}
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_POLL_S = 0.1


# --- The grid and its runs ------------------------------------------------------------


def split_grid_spec(spec: str) -> tuple[str, str | None]:
  """'configs/ablations.py:table5' -> ('configs/ablations.py', 'table5'); no ':' -> arg None."""
  path, sep, arg = spec.partition(":")
  if not path:
    raise errors.ConfigError(f"--grid {spec!r} names no file")
  return path, (arg if sep else None)


def grid_name(spec: str) -> str:
  """A file-name-safe name of a grid: its sweep argument, else its file's stem.

  'configs/ablations.py:table5,setting=paper' -> 'table5_setting_paper'.
  """
  path, arg = split_grid_spec(spec)
  name = arg or os.path.splitext(os.path.basename(path))[0]
  return re.sub(r"[^\w.-]+", "_", name)


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
    raise errors.ConfigError(f"grid file {path!r} does not exist")
  module_name = "_arcjax_grid_" + re.sub(r"\W", "_", os.path.abspath(path))
  module_spec = importlib.util.spec_from_file_location(module_name, path)
  if module_spec is None or module_spec.loader is None:
    raise errors.ConfigError(f"grid file {path!r} is not a Python file")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  sweep = getattr(module, "sweep", None)
  if not callable(sweep):
    raise errors.ConfigError(f"grid file {path!r} has no sweep() function listing its runs")
  rows = sweep() if arg is None else sweep(arg)
  if isinstance(rows, str) or not isinstance(rows, (list, tuple)):
    raise errors.ConfigError(f"sweep({arg!r}) in {path!r} must return a list of row names, "
                             f"got {rows!r}")
  for row in rows:
    if (not isinstance(row, str) or not row or row in (".", "..") or "/" in row
        or os.sep in row or ":" in row or row != row.strip() or _SEED_FOLDER.fullmatch(row)):
      raise errors.ConfigError(f"sweep({arg!r}) in {path!r} returned {row!r}, which is not "
                               f"usable as a run directory name")
  duplicates = sorted({row for row in rows if rows.count(row) > 1})
  if duplicates:
    raise errors.ConfigError(f"sweep({arg!r}) in {path!r} lists {duplicates} more than once")
  if not rows:
    raise errors.ConfigError(f"sweep({arg!r}) in {path!r} returned no rows")
  return path, list(rows)


def seed_folder(seed: int) -> str:
  """The folder of seed `seed` inside its row's folder: 'seed3'."""
  return f"seed{seed}"


def seed_of(folder: str) -> int | None:
  """3 for 'seed3'; None for a name that is not a seed folder."""
  match = _SEED_FOLDER.fullmatch(folder)
  return int(match.group(1)) if match else None


@dataclasses.dataclass(frozen=True)
class Run:
  """One trainer run of a grid: a row, or one seed of it.

  `workdir` is what the trainer gets (`<root>/<row>` or `<root>/<row>/seed<k>`);
  `overrides` are 'config.FIELD=VALUE' strings, `config.seed=k` last for a seed.
  """
  row: str
  seed: int | None
  workdir: str
  overrides: tuple[str, ...]

  @property
  def name(self) -> str:
    """'arcface' or 'arcface/seed2': how the terminal, logs and summary name the run."""
    return self.row if self.seed is None else f"{self.row}/{seed_folder(self.seed)}"


def plan_runs(rows: Sequence[str], root: str, overrides: Sequence[str] = (),
              seeds: int | None = None) -> list[Run]:
  """Every run of a grid, row by row (and seed by seed within a row).

  Args:
    rows: the grid's row names.
    root: the folder (or gs:// folder) holding one folder per row.
    overrides: 'config.FIELD=VALUE' for every run.
    seeds: None for one run per row in `<root>/<row>`; N for N runs per row in
      `<root>/<row>/seed<k>` with `config.seed=k`.
  """
  runs = []
  for row in rows:
    if seeds is None:
      runs.append(Run(row, None, posixpath.join(root, row), tuple(overrides)))
      continue
    for seed in range(seeds):
      runs.append(Run(row, seed, posixpath.join(root, row, seed_folder(seed)),
                      (*overrides, f"config.seed={seed}")))
  return runs


def override_flag(override: str) -> str:
  """'config.train.steps=300' -> '--config.train.steps=300' (the trainer's flag)."""
  if not _OVERRIDE.match(override):
    raise ValueError(f"override {override!r} is not of the form config.FIELD=VALUE "
                     f"(e.g. config.train.steps=300)")
  return "--" + override


def trainer_command(grid_path: str, row: str, run_workdir: str,
                    overrides: Sequence[str] = (), *, python: str = sys.executable,
                    distributed_auto: bool = False) -> list[str]:
  """argv of one run's trainer.

  `python -m arcjax.main --config=GRID:ROW --workdir=DIR [--config.FIELD=VALUE …]
  [--distributed_auto]`.
  """
  return [python, "-m", TRAINER_MODULE, f"--config={grid_path}:{row}",
          f"--workdir={run_workdir}", *(override_flag(o) for o in overrides),
          *(["--distributed_auto"] if distributed_auto else [])]


# --- What a run's workdir holds -------------------------------------------------------


def _flag_error_message(error: BaseException) -> str:
  """The message of a flag-parsing error, unwrapped, as one line.

  ml_collections raises AttributeError(KeyError(message)) for an unknown field,
  and wraps get_config's ValueError with its traceback, whose last line says it.
  """
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  lines = str(error.args[0] if error.args else error).strip().splitlines()
  if "Traceback (most recent call last):" in lines:
    lines = lines[-1:]
  return "; ".join(line.strip() for line in lines if line.strip()) or type(error).__name__


def trainer_config(grid_path: str, row: str,
                   overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config the trainer will build for a run, parsed exactly as `arcjax.main` does.

  `config_flags.DEFINE_config_file("config")` on a private FlagValues, given
  `[prog, --config=GRID:ROW, --config.FIELD=VALUE …]`. Raises ConfigError (one
  line) for an unknown row, an unknown field or a value of the wrong type.
  """
  argv = ["arcjax.main", f"--config={grid_path}:{row}", *(override_flag(o) for o in overrides)]
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "Config file[:arg].",
                                           flag_values=flag_values, lock_config=True,
                                           sys_argv=argv)
  try:
    flag_values(argv)
  except (flags.Error, AttributeError, KeyError) as error:
    raise errors.ConfigError(f"{grid_path}:{row}: {_flag_error_message(error)}") from None
  config = holder.value
  if not isinstance(config, ml_collections.ConfigDict):
    raise errors.ConfigError(f"{grid_path}:{row}: get_config did not build a ConfigDict: "
                             f"{getattr(config, '_error', config)!r}")
  return config


def run_status(grid_path: str, run: Run) -> tuple[str, list[workdir.Change]]:
  """('new' | 'unfinished' | 'finished' | 'changed', changes) of a run's workdir (see
  `workdir.run_status`) against the config the trainer would build for it."""
  config = trainer_config(grid_path, run.row, run.overrides)
  return workdir.run_status(workdir.as_path(run.workdir), config)


def _holds_run(folder: str) -> bool:
  return any(os.path.exists(os.path.join(folder, f)) for f in workdir.RUN_FILES)


def check_layout(run: Run) -> None:
  """Refuses to mix one run per row and seeded runs in a row's folder (WorkdirError)."""
  row_dir = os.path.dirname(run.workdir) if run.seed is not None else run.workdir
  if run.seed is not None and _holds_run(row_dir):
    raise errors.WorkdirError(f"{row_dir} holds a single run (no --seeds): seeded runs cannot "
                              "go inside it; use another --workdir")
  if run.seed is None and os.path.isdir(row_dir):
    seeded = sorted(f for f in os.listdir(row_dir) if seed_of(f) is not None
                    and _holds_run(os.path.join(row_dir, f)))
    if seeded:
      raise errors.WorkdirError(f"{row_dir} holds seeded runs ({', '.join(seeded)}): launch "
                                "with --seeds, or use another --workdir")


# --- Running processes ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
  """A process to run: its name, argv, and the file its output is appended to."""
  name: str
  argv: tuple[str, ...]
  log_path: str


@dataclasses.dataclass(frozen=True)
class Outcome:
  """What became of a run: `status` is one of STATUSES."""
  name: str
  status: str
  detail: str
  log_path: str | None = None


def _die_with_launcher() -> Callable[[], None] | None:
  """A `preexec_fn` that makes Linux send the child SIGTERM when the launcher dies.

  None where `prctl` is unavailable (not Linux): there a killed launcher
  leaves its trainers running to their end.
  """
  if not sys.platform.startswith("linux"):
    return None
  try:
    prctl = ctypes.CDLL(None, use_errno=True).prctl
  except (OSError, AttributeError):
    return None
  launcher = os.getpid()

  def set_parent_death_signal() -> None:
    prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != launcher:  # the launcher died before prctl took effect
      os._exit(1)  # pylint: disable=protected-access

  return set_parent_death_signal


def _exit_text(returncode: int) -> str:
  if returncode < 0:
    return f"killed by {signal.Signals(-returncode).name}"
  return f"exit status {returncode}"


def _last_redraw(line: bytes) -> str:
  """A log line as a terminal would leave it: the text after its last carriage return
  (progress bars redraw themselves with '\\r')."""
  return line.decode("utf-8", errors="replace").rstrip("\r").rsplit("\r", 1)[-1]


def _send(process: subprocess.Popen, signum: int) -> None:
  with contextlib.suppress(ProcessLookupError):
    process.send_signal(signum)  # does nothing once the process has been reaped


def _kill_group(process: subprocess.Popen) -> None:
  if process.returncode is None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
      os.killpg(process.pid, signal.SIGKILL)  # its own session: process group id = pid


class _Runner:
  """Runs jobs `parallel` at a time and stops them cleanly on SIGINT / SIGTERM.

  Processes are started from the main thread only: Linux sends the parent-death
  signal when the *thread* that forked a child ends, and the main thread lives
  as long as the launcher. Each trainer writes into its log file itself (it
  never dies of a broken pipe if the launcher goes); a thread per job follows
  the file and shows its new lines on `out`.
  """

  def __init__(self, parallel: int, out: TextIO):
    self._parallel = parallel
    self._out = out
    self._out_lock = threading.Lock()
    self._running: dict[int, subprocess.Popen] = {}
    self._signalled: set[int] = set()
    self._done: queue.Queue = queue.Queue()
    self._notices: list[str] = []
    self._shown_notices = 0
    self._preexec = _die_with_launcher()
    self.signals: list[int] = []

  def emit(self, name: str, line: str) -> None:
    with self._out_lock:
      self._out.write(f"[{name}] {line}\n")
      self._out.flush()

  def on_signal(self, signum: int, frame: Any) -> None:  # pylint: disable=unused-argument
    """The SIGINT / SIGTERM handler. Takes no lock (it interrupts the main thread
    anywhere): it forwards or kills, and leaves a notice for the main loop to print."""
    self.signals.append(signum)
    name = signal.Signals(signum).name
    running = list(self._running.items())
    if len(self.signals) == 1:
      for index, process in running:
        self._signalled.add(index)
        _send(process, signum)
      self._notices.append(
          f"{name}: no new run starts; forwarded to {len(running)} running trainer(s), "
          f"waiting for them to save and exit ({name} again kills them at once)")
    else:
      for _, process in running:
        _kill_group(process)
      self._notices.append(f"{name} again: killed {len(running)} running trainer(s) "
                           "(SIGKILL); they resume from their last checkpoint")

  def _show_notices(self) -> None:
    while self._shown_notices < len(self._notices):
      self.emit("launch", self._notices[self._shown_notices])
      self._shown_notices += 1

  def _start(self, index: int, job: Job) -> Outcome | None:
    """Starts a job; an Outcome if it could not start."""
    os.makedirs(os.path.dirname(job.log_path) or ".", exist_ok=True)
    with open(job.log_path, "ab") as log:
      log.write(f"=== {datetime.datetime.now().isoformat(timespec='seconds')} "
                f"{shlex.join(job.argv)}\n".encode())
      log.flush()
      offset = log.tell()
      try:
        # Its own session: a terminal's Ctrl-C reaches the launcher only, which forwards it.
        process = subprocess.Popen(  # pylint: disable=consider-using-with
            job.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True,
            preexec_fn=self._preexec)
      except OSError as error:
        self.emit(job.name, f"FAILED to start: {error}")
        return Outcome(job.name, "failed", f"could not start: {error}", job.log_path)
    self._running[index] = process
    if self.signals and index not in self._signalled:  # a signal came while it started
      self._signalled.add(index)
      _send(process, self.signals[0])
    self.emit(job.name, f"started (log: {job.log_path})")
    threading.Thread(target=self._follow, args=(index, job, process, offset, time.monotonic()),
                     name=f"follow-{job.name}", daemon=True).start()
    return None

  def _follow(self, index: int, job: Job, process: subprocess.Popen, offset: int,
              start: float) -> None:
    """Shows the job's new log lines until it has exited and they are all shown."""
    pending = b""
    with open(job.log_path, "rb") as log:
      log.seek(offset)
      while True:
        exited = process.poll() is not None
        chunk = log.read()
        if chunk:
          *lines, pending = (pending + chunk).split(b"\n")
          for line in lines:
            self.emit(job.name, _last_redraw(line))
        elif exited:
          break
        else:
          time.sleep(_POLL_S)
    if pending:
      self.emit(job.name, _last_redraw(pending))
    self._done.put((index, process.returncode, time.monotonic() - start))

  def _outcome(self, index: int, job: Job, returncode: int, seconds: float) -> Outcome:
    if returncode == 0:
      self.emit(job.name, f"finished in {seconds:.0f} s")
      return Outcome(job.name, "finished", f"{seconds:.0f} s", job.log_path)
    if index in self._signalled:
      self.emit(job.name, f"interrupted: {_exit_text(returncode)} after {seconds:.0f} s")
      return Outcome(job.name, "interrupted", _exit_text(returncode), job.log_path)
    self.emit(job.name, f"FAILED with {_exit_text(returncode)} after {seconds:.0f} s")
    return Outcome(job.name, "failed", _exit_text(returncode), job.log_path)

  def run(self, jobs: Sequence[Job]) -> list[Outcome]:
    """Runs `jobs`; returns one Outcome per job, in their order."""
    outcomes: list[Outcome | None] = [None] * len(jobs)
    queued = collections.deque(range(len(jobs)))
    while True:
      while queued and len(self._running) < self._parallel and not self.signals:
        index = queued.popleft()
        outcomes[index] = self._start(index, jobs[index])
      self._show_notices()
      if not self._running:
        break
      try:
        index, returncode, seconds = self._done.get(timeout=0.5)
      except queue.Empty:
        continue
      del self._running[index]
      outcomes[index] = self._outcome(index, jobs[index], returncode, seconds)
    for index in queued:
      outcomes[index] = Outcome(jobs[index].name, "queued", "not started: the launcher "
                                "was stopped first", None)
    return outcomes


@contextlib.contextmanager
def _handling_signals(handler: Callable[[int, Any], None]) -> Iterator[None]:
  """Installs `handler` for SIGINT and SIGTERM for the body (main thread only)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {signum: signal.signal(signum, handler) for signum in _EXIT_STATUS}
  try:
    yield
  finally:
    for signum, old in previous.items():
      signal.signal(signum, old)


def run_jobs(jobs: Sequence[Job], parallel: int = 1,
             out: TextIO = sys.stdout) -> tuple[list[Outcome], int | None]:
  """Runs jobs `parallel` at a time; a failing job does not stop the others.

  SIGINT / SIGTERM stop it cleanly (see the module docstring). Call it from the
  main thread: only there can it handle signals, and a trainer's parent-death
  signal fires when the thread that started it ends.

  Returns:
    (one Outcome per job in the order of `jobs`, the first signal received or None).
  """
  if parallel < 1:
    raise ValueError(f"parallel must be >= 1, got {parallel}")
  runner = _Runner(parallel, out)
  with _handling_signals(runner.on_signal):
    outcomes = runner.run(jobs)
  return outcomes, (runner.signals[0] if runner.signals else None)


def exit_status(outcomes: Sequence[Outcome], signum: int | None) -> int:
  """130 / 143 after SIGINT / SIGTERM; else 1 if a run failed or changed; else 0."""
  if signum is not None:
    return _EXIT_STATUS[signum]
  return int(any(o.status in ("failed", "changed") for o in outcomes))


# --- The summary -----------------------------------------------------------------------


def format_summary(outcomes: Sequence[Outcome]) -> str:
  """'summary: N finished, N failed, N skipped[, N <other status>…]' and a line per run."""
  counts = collections.Counter(o.status for o in outcomes)
  shown = [s for s in STATUSES if s in ("finished", "failed", "skipped") or counts[s]]
  lines = ["summary: " + ", ".join(f"{counts[s]} {s}" for s in shown)]
  width = max((len(o.name) for o in outcomes), default=0)
  for o in outcomes:
    where = f"  {o.log_path}" if o.log_path else ""
    lines.append(f"  {o.status:<11}  {o.name:<{width}}  ({o.detail}){where}")
  return "\n".join(lines)


def changed_advice(changed: Sequence[Run], grid_path: str) -> str:
  """How to go on with runs whose workdir holds a run trained with another config."""
  lines = [f"{len(changed)} run(s) hold a checkpoint trained with another config than the "
           "grid now gives them (changed, above), and were not run. Either launch the grid "
           "again with a new --workdir, or continue each with the new values by running its "
           f"trainer with --allow_config_change (the change is recorded in "
           f"{workdir.CONFIG_HISTORY}):"]
  lines += ["  " + shlex.join([*trainer_command(grid_path, run.row, run.workdir, run.overrides),
                               "--allow_config_change"]) for run in changed]
  return "\n".join(lines)


# --- SLURM -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
  """The `#SBATCH` resources of every run, and what the job runs before the trainer."""
  nodes: int = 1
  gpus_per_node: int | None = None
  partition: str | None = None
  time: str | None = None
  account: str | None = None
  setup: str | None = None
  python: str = "python3"


def slurm_script(grid_path: str, run: Run, options: SlurmOptions, *, repo: str,
                 job_name: str) -> str:
  """The sbatch script of one run: one task per node, all of its GPUs to that task.

  `srun` starts the trainer once per node with --distributed_auto;
  `jax.distributed.initialize()` then reads SLURM_JOB_ID, SLURM_STEP_NODELIST,
  SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID: the coordinator is the first
  node of SLURM_STEP_NODELIST on port 61440 + SLURM_JOB_ID mod 4096 (or
  $JAX_COORDINATOR_PORT). JAX would also keep only GPU number SLURM_LOCALID
  visible to each task (one task per GPU is its default); the script exports
  JAX_LOCAL_DEVICE_IDS with every GPU of the node instead.

  Args:
    grid_path, run: the run; its workdir must be absolute (on the shared file system).
    options: resources and set-up.
    repo: the repository's absolute path, where the job runs.
    job_name: the SLURM job name.
  """
  run_dir = run.workdir
  directives = [f"--job-name={job_name}", f"--nodes={options.nodes}", "--ntasks-per-node=1"]
  if options.gpus_per_node:
    directives.append(f"--gpus-per-node={options.gpus_per_node}")
  directives += [f"--{key}={value}" for key, value in (
      ("partition", options.partition), ("time", options.time), ("account", options.account))
      if value]
  directives += [f"--output={posixpath.join(run_dir, 'slurm-%j.out')}",
                 f"--signal=TERM@{SLURM_GRACE_S}"]
  seed = "" if run.seed is None else f", seed {run.seed}"
  lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives),
           f"# Row {run.row}{seed} of {grid_path}, written by python -m experiments.launch.",
           "# The trainer gets SIGTERM (it saves and exits) "
           f"{SLURM_GRACE_S} s before the time limit; run the",
           "# launcher again to resume it.",
           "set -eo pipefail",
           f"cd {shlex.quote(repo)}"]
  if options.setup:
    lines.append(options.setup)
  lines.append("export PYTHONUNBUFFERED=1")
  if options.gpus_per_node:
    lines += ["# One task per node uses all its GPUs (JAX on SLURM would keep GPU $SLURM_LOCALID "
              "only).",
              "export JAX_LOCAL_DEVICE_IDS="
              + ",".join(str(i) for i in range(options.gpus_per_node))]
  trainer = trainer_command(grid_path, run.row, run_dir, run.overrides, python=options.python,
                            distributed_auto=True)
  lines.append(shlex.join(["srun", "--kill-on-bad-exit=1", *trainer]))
  return "\n".join(lines) + "\n"


def sbatch_command(script_path: str) -> list[str]:
  """`sbatch --parsable SCRIPT`: prints the job id."""
  return ["sbatch", "--parsable", script_path]


def submit_with_sbatch(argv: Sequence[str]) -> str:
  """Runs `sbatch`; returns what it printed (the job id).

  Raises errors.Error (one line) if sbatch refuses the job, OSError if there is no sbatch.
  """
  result = subprocess.run(list(argv), capture_output=True, text=True, check=False)
  if result.returncode != 0:
    reason = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
    raise errors.Error(f"{shlex.join(argv)} failed: {reason}")
  return result.stdout.strip()


# --- TPU pod --------------------------------------------------------------------------------


def pinned_jax_version(requirements: str = "requirements.txt") -> str:
  """The version of `jax==X` in requirements.txt."""
  try:
    with open(requirements, encoding="utf-8") as f:
      text = f.read()
  except FileNotFoundError:
    raise errors.ConfigError(f"{requirements} not found: run the launcher from the "
                             "repository's root") from None
  match = re.search(r"^jax==([^\s;#]+)", text, re.MULTILINE)
  if not match:
    raise errors.ConfigError(f"{requirements} pins no jax version (a line jax==X)")
  return match.group(1)


def _quote_remote_path(path: str) -> str:
  """Shell-quotes a path but leaves a leading '~/' bare, so the worker's shell expands it."""
  if path == "~":
    return path
  if path.startswith("~/"):
    return "~/" + shlex.quote(path[2:])
  return shlex.quote(path)


def _gcloud_ssh(tpu: str, zone: str, remote: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, f"--zone={zone}",
          "--worker=all", f"--command={remote}"]


def deploy_commands(*, tpu: str, zone: str, commit: str, archive: str, remote_dir: str,
                    remote_python: str, jax_version: str) -> list[list[str]]:
  """argvs that copy the repository at `commit` to every worker and install it there.

  `git archive` into `archive` (a local .tar.gz), `gcloud … scp --worker=all` to
  each worker's home, then on every worker: unpack into `remote_dir`, and pip
  install requirements.txt (gcsfs, for gs:// workdirs, among them) and the TPU
  build of jax `jax_version`.
  """
  name = os.path.basename(archive)
  folder = _quote_remote_path(remote_dir)
  install = shlex.join([remote_python, "-m", "pip", "install", "-r", "requirements.txt",
                        f"jax[tpu]=={jax_version}", "-f", LIBTPU_RELEASES])
  remote = (f"mkdir -p {folder} && tar -xzf ~/{shlex.quote(name)} -C {folder} && "
            f"cd {folder} && {install}")
  return [["mkdir", "-p", os.path.dirname(archive) or "."],
          ["git", "archive", "--format=tar.gz", f"--output={archive}", commit],
          ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, f"{tpu}:~/", f"--zone={zone}",
           "--worker=all"],
          _gcloud_ssh(tpu, zone, remote)]


def tpu_pod_command(grid_path: str, run: Run, *, tpu: str, zone: str,
                    remote_dir: str = "~/arcjax", remote_python: str = "python3") -> list[str]:
  """argv of the gcloud command that starts one run on every worker of a TPU VM pod.

  Args:
    grid_path: the grid file relative to the repository, as on the workers.
    run: the run; its workdir is a gs:// folder.
    tpu, zone: the TPU VM's name and zone.
    remote_dir: the repository on the workers ('~/…' is expanded there).
    remote_python: the Python interpreter on the workers.

  Returns:
    ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', tpu, '--zone=…', '--worker=all',
    '--command=cd DIR && PYTHON -m arcjax.main … --distributed_auto'].
  """
  if os.path.isabs(grid_path) or os.path.normpath(grid_path).startswith(".."):
    raise errors.ConfigError(f"grid file {grid_path!r} must be a path inside the repository "
                             "(relative to it), so that the workers find it under the remote "
                             "dir")
  trainer = trainer_command(grid_path, run.row, run.workdir, run.overrides,
                            python=remote_python, distributed_auto=True)
  return _gcloud_ssh(tpu, zone, f"cd {_quote_remote_path(remote_dir)} && {shlex.join(trainer)}")


def tpu_pod_stop_command(grid_path: str, run: Run, *, tpu: str, zone: str) -> list[str]:
  """argv that sends SIGINT to a run's trainers on every worker (they save and exit)."""
  pattern = f"{TRAINER_MODULE} --config={grid_path}:{run.row} --workdir={run.workdir}"
  return _gcloud_ssh(tpu, zone, shlex.join(["pkill", "-INT", "-f", "--", pattern]))


def collect_command(root: str) -> list[str]:
  """The command that prints the grid's table from `root` (local or gs://)."""
  return ["python", "-m", "experiments.collect", root]


# --- The command line ----------------------------------------------------------------------

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
  parser.add_argument("--parallel", type=int, help="local: runs at a time (default 1)")
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
    override_flag(override)
    if args.seeds is not None and override.startswith("config.seed="):
      raise ValueError("--seeds sets config.seed of each run: drop --override config.seed=…")


def _statuses(grid_path: str, runs: Sequence[Run]) -> list[tuple[str, list[workdir.Change]]]:
  """Each run's status (see `run_status`), its folder layout checked first."""
  statuses = []
  for run in runs:
    check_layout(run)
    statuses.append(run_status(grid_path, run))
  return statuses


def _trained_changes(changes: Sequence[workdir.Change]) -> str:
  """'lr: 0.1 → 0.5': the changes that make a run 'changed' (not the free fields)."""
  return workdir.describe_changes([c for c in changes if not c.free])


def _status_line(run: Run, status: str, changes: Sequence[workdir.Change]) -> str:
  if status == "finished":
    return f"# {run.name}: finished, skipped"
  if status == "changed":
    return f"# {run.name}: changed ({_trained_changes(changes)}), not run"
  return f"# {run.name}: {status}"


def _not_run(run: Run, status: str, changes: Sequence[workdir.Change]) -> Outcome | None:
  """The Outcome of a run that is not to run (finished or changed); None for one to run."""
  if status == "finished":
    return Outcome(run.name, "skipped", "finished before")
  if status == "changed":
    return Outcome(run.name, "changed", _trained_changes(changes))
  return None


def _finish(outcomes: Sequence[Outcome], changed: Sequence[Run], grid_path: str,
            out: TextIO) -> None:
  out.write(format_summary(outcomes) + "\n")
  if changed:
    out.write(changed_advice(changed, grid_path) + "\n")


def _launch_local(args: argparse.Namespace, grid_path: str, runs: Sequence[Run],
                  out: TextIO) -> int:
  statuses = _statuses(grid_path, runs)
  outcomes: dict[str, Outcome] = {}
  jobs = []
  for run, (status, changes) in zip(runs, statuses):
    argv = trainer_command(grid_path, run.row, run.workdir, run.overrides)
    log_path = os.path.join(run.workdir, workdir.LAUNCH_LOG)
    if args.dry_run:
      out.write(_status_line(run, status, changes) + "\n")
    not_run = _not_run(run, status, changes)
    if not_run:
      outcomes[run.name] = not_run
      continue
    if args.dry_run:
      out.write(shlex.join(argv) + "\n")
      continue
    if status == "unfinished":
      earlier = f" (earlier attempts in {log_path})" if os.path.exists(log_path) else ""
      out.write(f"[{run.name}] resuming{earlier}\n")
    jobs.append(Job(run.name, tuple(argv), log_path))
  if args.dry_run:
    return 0
  ran, signum = run_jobs(jobs, args.parallel or 1, out)
  outcomes.update((o.name, o) for o in ran)
  ordered = [outcomes[run.name] for run in runs]
  changed = [run for run in runs if outcomes[run.name].status == "changed"]
  _finish(ordered, changed, grid_path, out)
  return exit_status(ordered, signum)


def _job_name(args: argparse.Namespace, run: Run) -> str:
  return re.sub(r"[^\w.-]+", "_", f"{grid_name(args.grid)}.{run.name.replace('/', '.')}")


def _launch_slurm(args: argparse.Namespace, grid_path: str, runs: Sequence[Run], out: TextIO,
                  submit: Callable[[Sequence[str]], str]) -> int:
  options = SlurmOptions(
      nodes=args.nodes or 1, gpus_per_node=args.gpus_per_node, partition=args.partition,
      time=args.time, account=args.account, setup=args.slurm_setup,
      python=args.remote_python or "python3")
  repo = os.getcwd()
  statuses = _statuses(grid_path, runs)
  outcomes = []
  for run, (status, changes) in zip(runs, statuses):
    if args.dry_run:
      out.write(_status_line(run, status, changes) + "\n")
    not_run = _not_run(run, status, changes)
    if not_run:
      outcomes.append(not_run)
      continue
    script = slurm_script(grid_path, run, options, repo=repo, job_name=_job_name(args, run))
    script_path = os.path.join(run.workdir, workdir.SLURM_SCRIPT)
    command = sbatch_command(script_path)
    if args.dry_run:
      out.write(f"mkdir -p {shlex.quote(run.workdir)} && cat > {shlex.quote(script_path)} "
                f"<<'SBATCH_SCRIPT'\n{script}SBATCH_SCRIPT\n{shlex.join(command)}\n")
      continue
    workdir.write_text(workdir.as_path(script_path), script)
    try:
      job = submit(command)
    except errors.Error as error:  # this run's submission failed; an OSError stops them all
      out.write(f"[{run.name}] FAILED to submit: {error}\n")
      outcomes.append(Outcome(run.name, "failed", str(error), script_path))
      continue
    out.write(f"[{run.name}] submitted: job {job} ({script_path})\n")
    outcomes.append(Outcome(run.name, "submitted", f"job {job}", script_path))
  if args.dry_run:
    return 0
  changed = [run for run, o in zip(runs, outcomes) if o.status == "changed"]
  _finish(outcomes, changed, grid_path, out)
  return exit_status(outcomes, None)


def _launch_tpu_pod(args: argparse.Namespace, grid_path: str, runs: Sequence[Run],
                    out: TextIO) -> int:
  remote_dir = args.remote_dir or "~/arcjax"
  remote_python = args.remote_python or "python3"
  log_dir = args.log_dir or os.path.join("runs", f"{grid_name(args.grid)}-logs")
  deploy = [] if args.skip_deploy else deploy_commands(
      tpu=args.tpu, zone=args.zone, commit=args.commit or "HEAD",
      archive=os.path.join(log_dir, "arcjax.tar.gz"), remote_dir=remote_dir,
      remote_python=remote_python, jax_version=pinned_jax_version())
  jobs = [Job(run.name, tuple(tpu_pod_command(grid_path, run, tpu=args.tpu, zone=args.zone,
                                              remote_dir=remote_dir,
                                              remote_python=remote_python)),
              os.path.join(log_dir, run.name.replace("/", ".") + ".log")) for run in runs]
  collect = collect_command(args.bucket.rstrip("/"))
  if args.dry_run:
    if deploy:
      out.write(f"# deploy {args.commit or 'HEAD'} to every worker of {args.tpu}\n")
      out.writelines(shlex.join(argv) + "\n" for argv in deploy)
    out.write(f"# the runs, one after another, each on every worker (output: {log_dir}/)\n")
    out.writelines(shlex.join(job.argv) + "\n" for job in jobs)
    out.write("# the table\n" + shlex.join(collect) + "\n")
    return 0
  os.makedirs(log_dir, exist_ok=True)
  deploy_log = os.path.join(log_dir, "deploy.log")
  for argv in deploy:
    (outcome,), signum = run_jobs([Job("deploy", tuple(argv), deploy_log)], 1, out)
    if signum is not None:
      return _EXIT_STATUS[signum]
    if outcome.status != "finished":
      raise errors.Error(f"deploying failed at `{shlex.join(argv)}` ({outcome.detail}; "
                         f"log: {deploy_log})")
  outcomes, signum = run_jobs(jobs, 1, out)
  _finish(outcomes, [], grid_path, out)
  stopped = [run for run, o in zip(runs, outcomes) if o.status == "interrupted"]
  if stopped:
    out.write("The trainers on the workers may still be running; to stop them (they save "
              "and exit):\n")
    out.writelines("  " + shlex.join(tpu_pod_stop_command(grid_path, run, tpu=args.tpu,
                                                          zone=args.zone)) + "\n"
                   for run in stopped)
  out.write("the table: " + shlex.join(collect) + "\n")
  return exit_status(outcomes, signum)


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout, *,
         submit: Callable[[Sequence[str]], str] = submit_with_sbatch) -> int:
  """The command line; returns the exit status (see `exit_status`).

  `submit` runs an sbatch argv and returns the job id (tests pass a stand-in).
  """
  parser = _parser()
  args = parser.parse_args(argv)
  try:
    _check_args(args)
  except ValueError as error:
    parser.error(str(error))
  with errors.report_errors(traceback=args.traceback):
    grid_path, rows = load_grid(args.grid)
    root = {"local": args.workdir, "slurm": os.path.abspath(args.workdir or ""),
            "tpu-pod": (args.bucket or "").rstrip("/")}[args.target]
    runs = plan_runs(rows, root, args.override, args.seeds)
    if args.target == "local":
      return _launch_local(args, grid_path, runs, out)
    if args.target == "slurm":
      return _launch_slurm(args, grid_path, runs, out, submit)
    return _launch_tpu_pod(args, grid_path, runs, out)


if __name__ == "__main__":
  sys.exit(main())

"""Processes on this machine: the local target's trainers, and the TPU-pod target's gcloud runs.

Locally, runs go `parallel` at a time. Each trainer writes its output to
`<run workdir>/launch.log` (appended, one header per attempt), which the
launcher shows on the terminal prefixed by `[run]`. A failed run does not stop
the others; the exit status is 1 if any run failed or changed.

With `--vectorize`, a job trains a pack of runs (`plan.plan_packs`): its output
goes to `<root>/packs/<pack>.log`, shown prefixed by `[pack<k>]`, and each of
its runs' launch.log gets a line pointing there. Each run's outcome is read
from its workdir (finished: results of the requested steps), else from the
pack's line about it (`[<workdir>] failed: <error>`), else it is the pack's.

Ctrl-C (SIGINT) or SIGTERM stops the launcher cleanly: no new run starts, the
signal is forwarded to every running trainer (which saves a checkpoint and
exits), and the launcher waits for them, prints the summary and exits 130
(SIGINT) / 143 (SIGTERM). A second Ctrl-C or SIGTERM while it waits kills the
trainers at once (SIGKILL to each trainer's process group; they resume from
their last completed checkpoint). Trainers run in their own sessions, so a
terminal's Ctrl-C reaches the launcher only, which forwards it once. If the
launcher itself is killed (SIGKILL), Linux sends each trainer SIGTERM
(prctl PR_SET_PDEATHSIG), so they save and exit rather than run on unwatched.
"""

import collections
import contextlib
import ctypes
import dataclasses
import datetime
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterator, Sequence, TextIO

from arcjax import workdir
from experiments import plan
from experiments import summary

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_POLL_S = 0.1


# --- Running processes ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
  """A process to run: its name, argv, and the file its output is appended to."""
  name: str
  argv: tuple[str, ...]
  log_path: str


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

  def _start(self, index: int, job: Job) -> summary.Outcome | None:
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
        return summary.Outcome(job.name, "failed", f"could not start: {error}", job.log_path)
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

  def _outcome(self, index: int, job: Job, returncode: int, seconds: float) -> summary.Outcome:
    if returncode == 0:
      self.emit(job.name, f"finished in {seconds:.0f} s")
      return summary.Outcome(job.name, "finished", f"{seconds:.0f} s", job.log_path)
    if index in self._signalled:
      self.emit(job.name, f"interrupted: {_exit_text(returncode)} after {seconds:.0f} s")
      return summary.Outcome(job.name, "interrupted", _exit_text(returncode), job.log_path)
    self.emit(job.name, f"FAILED with {_exit_text(returncode)} after {seconds:.0f} s")
    return summary.Outcome(job.name, "failed", _exit_text(returncode), job.log_path)

  def run(self, jobs: Sequence[Job]) -> list[summary.Outcome]:
    """Runs `jobs`; returns one Outcome per job, in their order."""
    outcomes: list[summary.Outcome | None] = [None] * len(jobs)
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
      outcomes[index] = summary.Outcome(jobs[index].name, "queued",
                                        "not started: the launcher was stopped first", None)
    return outcomes


@contextlib.contextmanager
def _handling_signals(handler: Callable[[int, Any], None]) -> Iterator[None]:
  """Installs `handler` for SIGINT and SIGTERM for the body (main thread only)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {signum: signal.signal(signum, handler) for signum in summary.EXIT_STATUS}
  try:
    yield
  finally:
    for signum, old in previous.items():
      signal.signal(signum, old)


def run_jobs(jobs: Sequence[Job], parallel: int = 1,
             out: TextIO = sys.stdout) -> tuple[list[summary.Outcome], int | None]:
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


# --- Packs -----------------------------------------------------------------------------------


def _size(path: str) -> int:
  return os.path.getsize(path) if os.path.exists(path) else 0


def _read_from(path: str, offset: int) -> str:
  """What `path` holds past byte `offset` ('' if it does not exist)."""
  if not os.path.exists(path):
    return ""
  with open(path, "rb") as f:
    f.seek(offset)
    return f.read().decode("utf-8", errors="replace")


def run_packs(packs: Sequence[plan.Pack], jobs: Sequence[Job], parallel: int = 1,
              out: TextIO = sys.stdout,
              finished: Callable[[plan.Run], bool] | None = None,
              ) -> tuple[list[summary.Outcome], int | None]:
  """Runs one job per pack (`run_jobs`), and tells what became of each of their runs.

  Args:
    packs, jobs: the packs and, for each, the job that trains it.
    parallel, out: as `run_jobs`.
    finished: whether a run finished (see `summary.pack_outcomes`).

  Returns:
    (one Outcome per run of the packs, pack by pack, the first signal received or None).
  """
  offsets = [_size(job.log_path) for job in jobs]  # each pack's output is what it appends
  ran, signum = run_jobs(jobs, parallel, out)
  outcomes = []
  for pack, job, offset, outcome in zip(packs, jobs, offsets, ran):
    outcomes += summary.pack_outcomes(pack, outcome, _read_from(job.log_path, offset), finished)
  return outcomes, signum


# --- The local target ------------------------------------------------------------------------


def _job(grid_path: str, run: plan.Run) -> Job:
  """A run's trainer, its output appended to `<run workdir>/launch.log`."""
  argv = plan.trainer_command(grid_path, run.row, run.workdir, run.overrides)
  return Job(run.name, tuple(argv), os.path.join(run.workdir, workdir.LAUNCH_LOG))


def _pack_job(grid_path: str, pack: plan.Pack, pack_dir: str) -> Job:
  """A pack's trainer, its output appended to `<pack_dir>/<pack>.log`; a pack of one run
  is that run's `_job`."""
  if pack.solo:
    return _job(grid_path, pack.runs[0])
  return Job(pack.name, tuple(plan.pack_command(grid_path, pack)),
             os.path.join(pack_dir, f"{pack.name}.log"))


def _point_to_pack_log(pack: plan.Pack, job: Job) -> None:
  """Appends to each run's launch.log where this attempt's output is: the pack's log."""
  stamp = datetime.datetime.now().isoformat(timespec="seconds")
  for run in pack.runs:
    os.makedirs(run.workdir, exist_ok=True)
    with open(os.path.join(run.workdir, workdir.LAUNCH_LOG), "a", encoding="utf-8") as log:
      log.write(f"=== {stamp} trained in {pack.describe()}: its output in {job.log_path}\n")


def _finished(grid_path: str) -> Callable[[plan.Run], bool]:
  return lambda run: plan.run_status(grid_path, run)[0] == "finished"


def launch(grid_path: str, runs: Sequence[plan.Run], *, parallel: int = 1,
           vectorize: bool = False, pack_dir: str = plan.PACK_FOLDER, dry_run: bool = False,
           out: TextIO = sys.stdout) -> int:
  """Runs the grid's runs that are to run here, `parallel` at a time; returns the exit status.

  Args:
    grid_path, runs: the grid file and its runs.
    parallel: jobs at a time.
    vectorize: train the runs in packs (`plan.plan_packs`, cut into `parallel` packs
      per group), a job per pack, its output in `<pack_dir>/<pack>.log` and a line in
      each run's launch.log pointing there.
    pack_dir: the folder of the packs' logs (`<root>/packs`).
    dry_run: print each run's status and the commands of the jobs to run; run nothing.
  """
  statuses = plan.statuses(grid_path, runs)
  packs = (plan.plan_packs(grid_path, runs, statuses, parallel) if vectorize
           else plan.solo_packs(runs, statuses))
  jobs = [_pack_job(grid_path, pack, pack_dir) for pack in packs]
  last_runs = {pack.runs[-1].name: (pack, job) for pack, job in zip(packs, jobs)}
  outcomes: dict[str, summary.Outcome] = {}
  to_run = []
  for run, (status, changes) in zip(runs, statuses):
    not_run = summary.before_running(run, status, changes)
    if not_run:
      outcomes[run.name] = not_run
    else:
      to_run.append((run, status))
    if dry_run:
      out.write(plan.status_line(run, status, changes) + "\n")
      if run.name in last_runs:  # a job after the status of its last run
        pack, job = last_runs[run.name]
        if vectorize:
          out.write(f"# {pack.describe()}: output in {job.log_path}\n")
        out.write(shlex.join(job.argv) + "\n")
  if dry_run:
    return 0
  for run, status in to_run:
    log_path = os.path.join(run.workdir, workdir.LAUNCH_LOG)
    if status == "unfinished":
      earlier = f" (earlier attempts in {log_path})" if os.path.exists(log_path) else ""
      out.write(f"[{run.name}] resuming{earlier}\n")
  for pack, job in zip(packs, jobs):
    if not pack.solo:
      _point_to_pack_log(pack, job)
  ran, signum = run_packs(packs, jobs, parallel, out, _finished(grid_path))
  outcomes.update((o.name, o) for o in ran)
  ordered = [outcomes[run.name] for run in runs]
  summary.write(runs, ordered, grid_path, out)
  return summary.exit_status(ordered, signum)

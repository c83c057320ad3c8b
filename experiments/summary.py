"""What became of a grid's runs: one Outcome each, the summary, and the launcher's exit status.

Each run ends as one of: finished, failed, skipped (finished before),
changed (its checkpoint was trained with another config: not run),
interrupted, queued (never started: the launcher was stopped first),
submitted (SLURM). The runs of a pack (`--vectorize`) each get their own
Outcome (`pack_outcomes`).
"""

import collections
import dataclasses
import shlex
import signal
from typing import Callable, Sequence, TextIO

from arcjax import errors
from arcjax import workdir
from experiments import plan

STATUSES = ("finished", "failed", "skipped", "changed", "interrupted", "queued", "submitted")
EXIT_STATUS = {signal.SIGINT: errors.EXIT_INTERRUPTED, signal.SIGTERM: errors.EXIT_TERMINATED}


@dataclasses.dataclass(frozen=True)
class Outcome:
  """What became of a run: `status` is one of STATUSES."""
  name: str
  status: str
  detail: str
  log_path: str | None = None


def before_running(run: plan.Run, status: str,
                   changes: Sequence[workdir.Change]) -> Outcome | None:
  """The Outcome of a run that is not to run (finished or changed); None for one to run."""
  if status == "finished":
    return Outcome(run.name, "skipped", "finished before")
  if status == "changed":
    return Outcome(run.name, "changed", plan.trained_changes(changes))
  return None


def _pack_lines(pack: plan.Pack, output: str) -> dict[str, str]:
  """{run workdir: 'finished' | 'failed: <error>'}: the pack trainer's last word on each run,
  its lines `[<workdir>] finished` and `[<workdir>] failed: <error>` in `output`."""
  said = {}
  for line in output.splitlines():
    line = line.rsplit("\r", 1)[-1].strip()  # a progress bar's redraws: the last one
    for run in pack.runs:
      word = line.removeprefix(f"[{run.workdir}] ")
      if word != line and (word == "finished" or word.startswith("failed: ")):
        said[run.workdir] = word
  return said


def pack_outcomes(pack: plan.Pack, job: Outcome, output: str,
                  finished: Callable[[plan.Run], bool] | None = None) -> list[Outcome]:
  """What became of each run of a pack, from its job's Outcome and the trainer's output.

  A run is finished when `finished(run)` says so (locally: its workdir holds the
  results of the requested steps), or, without `finished`, when the pack printed
  `[<workdir>] finished`. Else it failed with the error of the pack's line
  `[<workdir>] failed: <error>`; else it shares the pack's fate: interrupted,
  queued, or failed with the pack's exit status. A pack of one run is a solo
  run: its job's Outcome is the run's.

  Args:
    pack: the pack.
    job: the Outcome of the pack's job (named as the pack).
    output: what the pack's trainer printed (this attempt's part of its log).
    finished: whether a run finished; None: as the pack's lines say.

  Returns:
    One Outcome per run of the pack, in its order, each pointing at the job's log.
  """
  if pack.solo:
    return [dataclasses.replace(job, name=pack.runs[0].name)]
  said = _pack_lines(pack, output)
  outcomes = []
  for run in pack.runs:
    word = said.get(run.workdir, "")
    done = finished(run) if finished is not None else word == "finished"
    if done:
      outcome = Outcome(run.name, "finished", f"in {pack.name}: {job.detail}", job.log_path)
    elif word.startswith("failed: "):
      outcome = Outcome(run.name, "failed", word.removeprefix("failed: "), job.log_path)
    elif job.status in ("interrupted", "queued"):
      outcome = Outcome(run.name, job.status, f"{pack.name}: {job.detail}", job.log_path)
    elif job.status == "finished":
      outcome = Outcome(run.name, "failed", f"{pack.name} ended without finishing it",
                        job.log_path)
    else:
      outcome = Outcome(run.name, "failed", f"{pack.name}: {job.detail}", job.log_path)
    outcomes.append(outcome)
  return outcomes


def _table(outcomes: Sequence[Outcome]) -> str:
  """'summary: N finished, N failed, N skipped[, N <other status>…]' and a line per run."""
  counts = collections.Counter(o.status for o in outcomes)
  shown = [s for s in STATUSES if s in ("finished", "failed", "skipped") or counts[s]]
  lines = ["summary: " + ", ".join(f"{counts[s]} {s}" for s in shown)]
  width = max((len(o.name) for o in outcomes), default=0)
  for o in outcomes:
    where = f"  {o.log_path}" if o.log_path else ""
    lines.append(f"  {o.status:<11}  {o.name:<{width}}  ({o.detail}){where}")
  return "\n".join(lines)


def _changed_advice(changed: Sequence[plan.Run], grid_path: str) -> str:
  """How to go on with runs whose workdir holds a run trained with another config."""
  lines = [f"{len(changed)} run(s) hold a checkpoint trained with another config than the "
           "grid now gives them (changed, above), and were not run. Either launch the grid "
           "again with a new --workdir, or continue each with the new values by running its "
           f"trainer with --allow_config_change (the change is recorded in "
           f"{workdir.CONFIG_HISTORY}):"]
  lines += ["  " + shlex.join([*plan.trainer_command(grid_path, run.row, run.workdir,
                                                     run.overrides),
                               "--allow_config_change"]) for run in changed]
  return "\n".join(lines)


def write(runs: Sequence[plan.Run], outcomes: Sequence[Outcome], grid_path: str,
          out: TextIO) -> None:
  """Writes the summary of `outcomes` (one per run, in order), and how to go on with the
  changed runs."""
  out.write(_table(outcomes) + "\n")
  changed = [run for run, o in zip(runs, outcomes) if o.status == "changed"]
  if changed:
    out.write(_changed_advice(changed, grid_path) + "\n")


def exit_status(outcomes: Sequence[Outcome], signum: int | None) -> int:
  """130 / 143 after SIGINT / SIGTERM; else 1 if a run failed or changed; else 0."""
  if signum is not None:
    return EXIT_STATUS[signum]
  return int(any(o.status in ("failed", "changed") for o in outcomes))

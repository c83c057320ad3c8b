"""The SLURM target: each run to do gets `<run workdir>/slurm.sbatch`, submitted with sbatch.

The script runs one task per node, `srun python3 -m arcjax.main …
--distributed_auto`, its output in `<run workdir>/slurm-<job>.out`. The trainer
gets SIGTERM (it saves and exits) SLURM_GRACE_S before the job's time limit;
launching the grid again resumes it. The runs' folders must be on a file
system the nodes share.

With `--vectorize`, each pack of several runs (`plan.plan_packs`: one per group
of runs that can train together) is one job instead, `<root>/packs/<pack>.sbatch`
running `python3 -m arcjax.pack …`, its output in `<root>/packs/<pack>-<job>.out`.
"""

import dataclasses
import os
import posixpath
import re
import shlex
import subprocess
import sys
from typing import Callable, Sequence, TextIO

from arcjax import errors
from arcjax import workdir
from experiments import plan
from experiments import summary

SLURM_GRACE_S = 120  # SIGTERM this long before a SLURM time limit, for the final checkpoint
# What sbatch's reading of an #SBATCH line (below) takes for something else than a character.
_SBATCH_SPECIAL = re.compile(r"[\s\"'\\#]")


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


def _directive(option: str, value: object) -> str:
  """'#SBATCH --OPTION=VALUE', VALUE quoted where sbatch needs it to read VALUE back.

  sbatch cuts an #SBATCH line into arguments at whitespace outside '…' or "…"
  quotes (which may open mid-argument); a backslash passes the next character
  on as it is, and an unquoted '#' ends the line (Slurm's src/sbatch/opt.c,
  get_argument). So a value holding any of these goes inside double quotes,
  each '"' and '\\' in it behind a backslash. A line break cannot be written.
  """
  text = str(value)
  if "\n" in text or "\r" in text:
    raise errors.ConfigError(f"--{option} {text!r}: an #SBATCH line cannot hold a line break")
  if _SBATCH_SPECIAL.search(text):
    text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
  return f"#SBATCH --{option}={text}"


def _output_pattern(folder: str, prefix: str = "slurm") -> str:
  """sbatch's --output pattern for `<folder>/<prefix>-<job id>.out`.

  In the pattern '%j' is the job id and '%%' a '%'; a backslash anywhere turns
  every '%' sequence off (sbatch's man page, "filename pattern").
  """
  if "\\" in folder or "\\" in prefix:
    raise errors.WorkdirError(f"{folder}: sbatch cannot write a job's output into a folder "
                              "whose path holds a backslash; use another --workdir")
  return posixpath.join(folder.replace("%", "%%"), prefix.replace("%", "%%") + "-%j.out")


def _script(trainer: Sequence[str], options: SlurmOptions, *, repo: str, job_name: str,
            output: str, what: str) -> str:
  """An sbatch script running `trainer` once per node; `what` names its runs in a comment."""
  directives = [("job-name", job_name), ("nodes", options.nodes), ("ntasks-per-node", 1)]
  if options.gpus_per_node:
    directives.append(("gpus-per-node", options.gpus_per_node))
  directives += [(key, value) for key, value in (
      ("partition", options.partition), ("time", options.time), ("account", options.account))
      if value]
  directives += [("output", output), ("signal", f"TERM@{SLURM_GRACE_S}")]
  lines = ["#!/bin/bash", *(_directive(key, value) for key, value in directives),
           f"# {what}, written by python -m experiments.launch.",
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
  lines.append(shlex.join(["srun", "--kill-on-bad-exit=1", *trainer]))
  return "\n".join(lines) + "\n"


def slurm_script(grid_path: str, run: plan.Run, options: SlurmOptions, *, repo: str,
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
  trainer = plan.trainer_command(grid_path, run.row, run.workdir, run.overrides,
                                 python=options.python, distributed_auto=True)
  seed = "" if run.seed is None else f", seed {run.seed}"
  return _script(trainer, options, repo=repo, job_name=job_name,
                 output=_output_pattern(run.workdir), what=f"Row {run.row}{seed} of {grid_path}")


def pack_script(grid_path: str, pack: plan.Pack, options: SlurmOptions, *, repo: str,
                job_name: str, pack_dir: str) -> str:
  """The sbatch script of a pack of several runs (`slurm_script`'s, running `python -m
  arcjax.pack`), its output in `<pack_dir>/<pack>-<job id>.out`."""
  trainer = plan.pack_command(grid_path, pack, python=options.python, distributed_auto=True)
  return _script(trainer, options, repo=repo, job_name=job_name,
                 output=_output_pattern(pack_dir, pack.name),
                 what=f"{pack.describe()} of {grid_path}")


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


def _job_name(grid_name: str, pack: plan.Pack) -> str:
  return re.sub(r"[^\w.-]+", "_", f"{grid_name}.{pack.name.replace('/', '.')}")


def launch(grid_path: str, runs: Sequence[plan.Run], options: SlurmOptions, *, grid_name: str,
           vectorize: bool = False, pack_dir: str = plan.PACK_FOLDER, dry_run: bool = False,
           out: TextIO = sys.stdout,
           submit: Callable[[Sequence[str]], str] = submit_with_sbatch) -> int:
  """Submits a job for each of the grid's runs (or packs) that are to run; returns the exit
  status.

  Args:
    grid_path, runs: the grid file and its runs (absolute workdirs).
    options: every job's resources and set-up.
    grid_name: the grid's name (`plan.grid_name`), the first part of each job's name.
    vectorize: a job per pack (`plan.plan_packs`, one per group of runs), its script
      `<pack_dir>/<pack>.sbatch`; a pack of one run is that run's job.
    pack_dir: the folder of the packs' scripts and output (absolute, shared).
    dry_run: print each run's status and a shell script that writes and submits
      each job's script (after the status of its last run); write and submit nothing.
    submit: runs an sbatch argv and returns the job id (tests pass a stand-in).
  """
  repo = os.getcwd()
  statuses = plan.statuses(grid_path, runs)
  packs = (plan.plan_packs(grid_path, runs, statuses) if vectorize
           else plan.solo_packs(runs, statuses))
  # Every script is built (and so checked) before any is written or submitted.
  jobs = []
  for pack in packs:
    if pack.solo:
      folder = pack.runs[0].workdir
      script = slurm_script(grid_path, pack.runs[0], options, repo=repo,
                            job_name=_job_name(grid_name, pack))
      script_path = os.path.join(folder, workdir.SLURM_SCRIPT)
    else:
      folder = pack_dir
      script = pack_script(grid_path, pack, options, repo=repo,
                           job_name=_job_name(grid_name, pack), pack_dir=pack_dir)
      script_path = os.path.join(pack_dir, f"{pack.name}.sbatch")
    jobs.append((pack, folder, script, script_path))
  last_runs = {pack.runs[-1].name: job for pack, *job in jobs}
  outcomes: dict[str, summary.Outcome] = {}
  for run, (status, changes) in zip(runs, statuses):
    if dry_run:
      out.write(plan.status_line(run, status, changes) + "\n")
    not_run = summary.before_running(run, status, changes)
    if not_run:
      outcomes[run.name] = not_run
    if dry_run and run.name in last_runs:
      folder, script, script_path = last_runs[run.name]
      out.write(f"mkdir -p {shlex.quote(folder)} && cat > {shlex.quote(script_path)} "
                f"<<'SBATCH_SCRIPT'\n{script}SBATCH_SCRIPT\n"
                f"{shlex.join(sbatch_command(script_path))}\n")
  if dry_run:
    return 0
  for pack, _, script, script_path in jobs:
    workdir.write_text(workdir.as_path(script_path), script)
    try:
      job = submit(sbatch_command(script_path))
    except errors.Error as error:  # this job's submission failed; an OSError stops them all
      out.write(f"[{pack.name}] FAILED to submit: {error}\n")
      outcomes.update((run.name, summary.Outcome(run.name, "failed", str(error), script_path))
                      for run in pack.runs)
      continue
    out.write(f"[{pack.name}] submitted: job {job} ({script_path})\n")
    detail = f"job {job}" if pack.solo else f"job {job}, {pack.name}"
    outcomes.update((run.name, summary.Outcome(run.name, "submitted", detail, script_path))
                    for run in pack.runs)
  ordered = [outcomes[run.name] for run in runs]
  summary.write(runs, ordered, grid_path, out)
  return summary.exit_status(ordered, None)

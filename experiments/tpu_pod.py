"""The TPU-pod target: deploy the repository to every worker, then run the rows one after another.

The launcher first deploys the repository (`git archive` of a commit, copied to
every worker and unpacked into the remote dir, with requirements.txt and the
TPU build of the pinned jax installed), then runs the runs one after another
(each needs the whole pod), each started on all workers at once by `gcloud
compute tpus tpu-vm ssh --worker=all`, its workdir in the bucket, its output
shown prefixed and appended to `<log dir>/<run>.log`; finally it prints the
command that collects the grid from the bucket. The launcher does not look into
the bucket: the trainer resumes a run from its checkpoint there. A dry run
prints every command (pasteable) and runs nothing.

With `--vectorize`, each group of runs that can train together (`plan.plan_packs`)
is one pack, `python3 -m arcjax.pack … --distributed_auto` started on every worker
at once: its run axis lies over the pod's devices, beside the data axis. The packs
go one after another; each run's outcome is the pack's line about it. (A process per
worker, each training its own pack, would need each worker's TPU runtime told it is
a slice of its own, which the TPU VM does not document; one pack over the whole pod
needs nothing of the kind.)
"""

import dataclasses
import os
import re
import shlex
import sys
from typing import Sequence, TextIO

from arcjax import errors
from experiments import local
from experiments import plan
from experiments import summary

LIBTPU_RELEASES = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"


@dataclasses.dataclass(frozen=True)
class PodOptions:
  """The TPU VM, where the repository goes on its workers, and where the runs' output goes.

  deploy: copy `commit` to the workers and install its packages first (False:
  they already hold them). log_dir: a local folder.
  """
  tpu: str
  zone: str
  log_dir: str
  remote_dir: str = "~/arcjax"
  python: str = "python3"
  commit: str = "HEAD"
  deploy: bool = True


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


def _check_grid_path(grid_path: str) -> None:
  if os.path.isabs(grid_path) or os.path.normpath(grid_path).startswith(".."):
    raise errors.ConfigError(f"grid file {grid_path!r} must be a path inside the repository "
                             "(relative to it), so that the workers find it under the remote "
                             "dir")


def tpu_pod_command(grid_path: str, run: plan.Run | plan.Pack, *, tpu: str, zone: str,
                    remote_dir: str = "~/arcjax", remote_python: str = "python3") -> list[str]:
  """argv of the gcloud command that starts one run (or pack) on every worker of a TPU VM pod.

  Args:
    grid_path: the grid file relative to the repository, as on the workers.
    run: the run, its workdir a gs:// folder; or a pack of such runs
      (`plan.pack_command`, the pack's run axis over every worker's devices).
    tpu, zone: the TPU VM's name and zone.
    remote_dir: the repository on the workers ('~/…' is expanded there).
    remote_python: the Python interpreter on the workers.

  Returns:
    ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', tpu, '--zone=…', '--worker=all',
    '--command=cd DIR && PYTHON -m arcjax.main … --distributed_auto'].
  """
  _check_grid_path(grid_path)
  pack = run if isinstance(run, plan.Pack) else plan.Pack(run.name, (run,))
  trainer = plan.pack_command(grid_path, pack, python=remote_python, distributed_auto=True)
  return _gcloud_ssh(tpu, zone, f"cd {_quote_remote_path(remote_dir)} && {shlex.join(trainer)}")


def tpu_pod_stop_command(grid_path: str, run: plan.Run | plan.Pack, *, tpu: str,
                         zone: str) -> list[str]:
  """argv that sends SIGINT to a run's (or pack's) trainers on every worker (they save and
  exit)."""
  first = run.runs[0] if isinstance(run, plan.Pack) else run
  module = (plan.PACK_TRAINER_MODULE + " --" if isinstance(run, plan.Pack) and not run.solo
            else plan.TRAINER_MODULE)
  pattern = f"{module} --config={grid_path}:{first.row} --workdir={first.workdir}"
  return _gcloud_ssh(tpu, zone, shlex.join(["pkill", "-INT", "-f", "--", pattern]))


def collect_command(root: str) -> list[str]:
  """The command that prints the grid's table from `root` (local or gs://)."""
  return ["python", "-m", "experiments.collect", root]


def launch(grid_path: str, runs: Sequence[plan.Run], pod: PodOptions, *, root: str,
           vectorize: bool = False, dry_run: bool = False, out: TextIO = sys.stdout) -> int:
  """Deploys, then runs each run (or pack) on every worker, one after another; returns the
  exit status.

  Args:
    grid_path, runs: the grid file (relative to the repository) and its runs.
    pod: the TPU VM and where things go.
    root: the gs:// folder of the runs' workdirs, which `collect` reads.
    vectorize: a job per pack (`plan.plan_packs`, one per group of runs that can train
      together), its run axis over every worker's devices, its output in
      `<log dir>/<pack>.log`; the packs one after another.
    dry_run: print the commands; run nothing.
  """
  _check_grid_path(grid_path)
  deploy = [] if not pod.deploy else deploy_commands(
      tpu=pod.tpu, zone=pod.zone, commit=pod.commit,
      archive=os.path.join(pod.log_dir, "arcjax.tar.gz"), remote_dir=pod.remote_dir,
      remote_python=pod.python, jax_version=pinned_jax_version())
  packs = plan.plan_packs(grid_path, runs) if vectorize else plan.solo_packs(runs)
  jobs = [local.Job(pack.name, tuple(tpu_pod_command(grid_path, pack, tpu=pod.tpu, zone=pod.zone,
                                                     remote_dir=pod.remote_dir,
                                                     remote_python=pod.python)),
                    os.path.join(pod.log_dir, pack.name.replace("/", ".") + ".log"))
          for pack in packs]
  collect = collect_command(root)
  what = "packs" if vectorize else "runs"
  if dry_run:
    if deploy:
      out.write(f"# deploy {pod.commit} to every worker of {pod.tpu}\n")
      out.writelines(shlex.join(argv) + "\n" for argv in deploy)
    out.write(f"# the {what}, one after another, each on every worker (output: "
              f"{pod.log_dir}/)\n")
    for pack, job in zip(packs, jobs):
      if vectorize:
        out.write(f"# {pack.describe()}\n")
      out.write(shlex.join(job.argv) + "\n")
    out.write("# the table\n" + shlex.join(collect) + "\n")
    return 0
  os.makedirs(pod.log_dir, exist_ok=True)
  deploy_log = os.path.join(pod.log_dir, "deploy.log")
  for argv in deploy:
    (outcome,), signum = local.run_jobs([local.Job("deploy", tuple(argv), deploy_log)], 1, out)
    if signum is not None:
      return summary.EXIT_STATUS[signum]
    if outcome.status != "finished":
      raise errors.Error(f"deploying failed at `{shlex.join(argv)}` ({outcome.detail}; "
                         f"log: {deploy_log})")
  # The launcher does not look into the bucket: a pack's runs are as its lines say.
  ran, signum = local.run_packs(packs, jobs, 1, out)
  outcomes = {o.name: o for o in ran}
  ordered = [outcomes[run.name] for run in runs]
  summary.write(runs, ordered, grid_path, out)
  stopped = [pack for pack in packs
             if any(outcomes[run.name].status == "interrupted" for run in pack.runs)]
  if stopped:
    out.write("The trainers on the workers may still be running; to stop them (they save "
              "and exit):\n")
    out.writelines("  " + shlex.join(tpu_pod_stop_command(grid_path, pack, tpu=pod.tpu,
                                                          zone=pod.zone)) + "\n"
                   for pack in stopped)
  out.write("the table: " + shlex.join(collect) + "\n")
  return summary.exit_status(ordered, signum)

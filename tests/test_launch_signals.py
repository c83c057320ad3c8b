"""The launcher under signals, with real processes: Ctrl-C / SIGTERM stop it cleanly and
reach the running trainer; a killed launcher leaves no trainer running.

The launcher runs as its own process (`python -c` importing this repository's
experiments.launch) in a temporary cwd whose fake `arcjax/main.py` stands in
for the trainer: it sleeps until SIGINT / SIGTERM, then records which signal
came and exits 128 + signal, as the real trainer does after saving. Every wait
has a generous deadline and nothing is asserted about speed.
"""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DEADLINE_S = 600.0  # seconds: a hang guard for a slow, shared CI machine, not a speed assertion

GRID = textwrap.dedent("""\
    import ml_collections

    def get_config(arg=None):
      config = ml_collections.ConfigDict()
      config.seed = 0
      config.train = ml_collections.ConfigDict({"steps": 10})
      return config

    def sweep(arg=None):
      return ["a", "b", "c"]
    """)

# Row 'a' of the stubborn kind ignores its first signal (a trainer busy saving).
SLEEPER = textwrap.dedent("""\
    import os, signal, sys, time
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if "=" in a)
    workdir = args["workdir"]
    stubborn = os.environ.get("SLEEPER_STUBBORN") == "1"

    def stop(signum, frame):
      with open(os.path.join(workdir, "signals"), "a") as f:
        f.write(signal.Signals(signum).name + "\\n")
      if not stubborn:
        sys.exit(128 + signum)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "started.tmp"), "w") as f:
      f.write(str(os.getpid()))
    os.replace(os.path.join(workdir, "started.tmp"), os.path.join(workdir, "started"))
    print("sleeping", flush=True)
    while True:
      time.sleep(0.05)
    """)

LAUNCHER = (f"import sys; sys.path.insert(0, {str(REPO)!r}); "
            "from experiments import launch; sys.exit(launch.main(sys.argv[1:]))")


@pytest.fixture
def repo(tmp_path) -> pathlib.Path:
  (tmp_path / "grid.py").write_text(GRID)
  (tmp_path / "arcjax").mkdir()
  (tmp_path / "arcjax" / "__init__.py").write_text("")
  (tmp_path / "arcjax" / "main.py").write_text(SLEEPER)
  return tmp_path


def _start_launcher(repo: pathlib.Path, **env) -> subprocess.Popen:
  environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  return subprocess.Popen(
      [sys.executable, "-c", LAUNCHER, "--grid=grid.py", "--workdir=runs", "--parallel=1"],
      cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={**environ, **env})


def _wait_for(predicate, what: str) -> None:
  deadline = time.monotonic() + DEADLINE_S
  while not predicate():
    if time.monotonic() > deadline:
      raise AssertionError(f"gave up after {DEADLINE_S:.0f} s waiting for {what}")
    time.sleep(0.1)


def _alive(pid: int) -> bool:
  """Whether `pid` runs (a zombie, exited but not yet reaped, does not)."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def _trainer_pid(repo: pathlib.Path, row: str) -> int:
  started = repo / "runs" / row / "started"
  _wait_for(started.exists, f"the trainer of row {row} to start")
  return int(started.read_text())


@pytest.fixture
def launched(repo):
  """Starts launchers; afterwards kills, by pid, whatever a failing test left running:
  the launchers, then every trainer that recorded its pid under runs/."""
  launchers = []

  def start(**env) -> subprocess.Popen:
    launchers.append(_start_launcher(repo, **env))
    return launchers[-1]

  yield start
  for launcher in launchers:
    if launcher.poll() is None:
      launcher.kill()
      launcher.communicate()
  for started in (repo / "runs").glob("*/started"):
    pid = int(started.read_text())
    if _alive(pid):
      os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_launcher_and_reaches_the_running_trainer(repo, launched, signum,
                                                                     status):
  launcher = launched()
  pid = _trainer_pid(repo, "a")
  os.kill(launcher.pid, signum)
  out, err = launcher.communicate(timeout=DEADLINE_S)
  assert launcher.returncode == status, (out, err)
  assert (repo / "runs" / "a" / "signals").read_text() == f"{signal.Signals(signum).name}\n"
  _wait_for(lambda: not _alive(pid), "the trainer to exit")
  assert not (repo / "runs" / "b").exists() and not (repo / "runs" / "c").exists()
  lines = out.splitlines()
  assert "[a] sleeping" in lines
  summary = lines[lines.index("summary: 0 finished, 0 failed, 0 skipped, 1 interrupted, "
                              "2 queued"):]
  assert [line.split()[:2] for line in summary[1:]] == [
      ["interrupted", "a"], ["queued", "b"], ["queued", "c"]]
  assert f"(exit status {status})" in summary[1]
  assert "Traceback" not in err and "Traceback" not in out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_second_ctrl_c_kills_a_trainer_that_does_not_stop(repo, launched):
  launcher = launched(SLEEPER_STUBBORN="1")
  pid = _trainer_pid(repo, "a")
  os.kill(launcher.pid, signal.SIGINT)
  _wait_for((repo / "runs" / "a" / "signals").exists, "the forwarded SIGINT")
  os.kill(launcher.pid, signal.SIGINT)
  out, err = launcher.communicate(timeout=DEADLINE_S)
  assert launcher.returncode == 130, (out, err)
  _wait_for(lambda: not _alive(pid), "the trainer to be killed")
  assert "Traceback" not in err and "Traceback" not in out
  assert "[launch] SIGINT again: killed 1 running trainer(s)" in out
  assert any(line.split()[:2] == ["interrupted", "a"] and "(killed by SIGKILL)" in line
             for line in out.splitlines())


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="PR_SET_PDEATHSIG is Linux only")
def test_a_killed_launcher_takes_its_trainer_down(repo, launched):
  launcher = launched()
  pid = _trainer_pid(repo, "a")
  os.kill(launcher.pid, signal.SIGKILL)
  launcher.communicate(timeout=DEADLINE_S)
  _wait_for(lambda: not _alive(pid), "the orphaned trainer to exit")
  assert (repo / "runs" / "a" / "signals").read_text() == "SIGTERM\n"
  assert not (repo / "runs" / "b").exists()

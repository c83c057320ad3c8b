"""A grid's runs, planned before any runs: their folders, trainer commands, configs and statuses.

A grid file is a config file (`get_config(arg)`) with a module-level
`sweep(arg=None)` returning the config args of its runs, here called rows. Row
`r` runs as `python -m arcjax.main --config=<grid file>:r --workdir=<root>/r`;
with `--seeds=N`, N times, as `--workdir=<root>/r/seed<k> --config.seed=k`
(k = 0 … N−1).

Each run's config is built exactly as the trainer will build it and compared
with the run's workdir (`run_status`):
  new, unfinished   to run; the trainer resumes an unfinished run from its checkpoint
  finished          results.json for the requested steps: skipped
  changed           a checkpoint trained with another config: not run
Each target (experiments/local.py, slurm.py, tpu_pod.py) then makes a job of
each run to do; experiments/summary.py reports what became of them.

With `--vectorize`, the runs to do are first grouped into packs (`plan_packs`):
runs whose configs share `train.pack_key` (they differ only in values a traced
step takes: the seed, the margin, the terms' weights, the warm-up, lr, weight
decay, the sampler) train together in one process, `python -m arcjax.pack`
(`pack_command`), which writes each run's own workdir as its solo trainer
would; each target then makes a job of each pack.
"""

import dataclasses
import importlib.util
import os
import posixpath
import re
import sys
from typing import Sequence

from etils import epath
import ml_collections

from arcjax import config_file
from arcjax import errors
from arcjax import workdir

TRAINER_MODULE = "arcjax.main"
PACK_TRAINER_MODULE = "arcjax.pack"  # trains a pack's runs in one process
PACK_FOLDER = "packs"  # <root>/packs: the packs' logs (local) and job scripts (SLURM)
_OVERRIDE = re.compile(r"config(\.[A-Za-z_]\w*)+=")
_SEED_FOLDER = re.compile(r"seed(\d+)")
_TO_RUN = ("new", "unfinished")  # the statuses of runs a launch runs


# --- The grid file ---------------------------------------------------------------------


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

  Raises:
    ConfigError (one line) for a missing file, no sweep, or a sweep that
    refuses ARG (a ValueError or KeyError, as get_config refuses a row).
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
  try:
    rows = sweep() if arg is None else sweep(arg)
  except (ValueError, KeyError) as error:  # an unknown grid: the sweep's own words
    raise errors.ConfigError(f"{spec}: {type(error).__name__}: {error}") from None
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


# --- The runs --------------------------------------------------------------------------


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


@dataclasses.dataclass(frozen=True)
class Pack:
  """Runs trained together in one process (`--vectorize`), each writing its own workdir.

  `name` is 'pack<k>' for a pack of several runs; a pack of one run is that run
  alone, trained by the solo trainer, and named as the run.
  """
  name: str
  runs: tuple[Run, ...]

  @property
  def solo(self) -> bool:
    return len(self.runs) == 1

  def describe(self) -> str:
    """'pack1 (arcface/seed0, arcface/seed1, arcface/seed2)': how the terminal names it."""
    if self.solo:
      return f"{self.name} (alone)"
    return f"{self.name} ({', '.join(run.name for run in self.runs)})"


def _splits(count: int, parts: int) -> list[int]:
  """Sizes of `parts` near-equal contiguous parts of `count` items (the larger first)."""
  parts = min(parts, count)
  return [count // parts + (i < count % parts) for i in range(parts)]


def _trains_alone(config: ml_collections.ConfigDict) -> bool:
  """Whether `config` cannot train in a pack (`train.check_pack`): under pmap, or with a
  sharded head. Read here from the config, as the launcher touches no device."""
  return (config.get("train", {}).get("parallel") == "pmap"
          or bool(config.get("head", {}).get("sharded")))


def solo_packs(runs: Sequence[Run],
               statuses: Sequence[tuple[str, Sequence[workdir.Change]]] | None = None
               ) -> list[Pack]:
  """A pack of one per run to run (new or unfinished; every run if `statuses` is None):
  the jobs of a launch without --vectorize."""
  return [Pack(run.name, (run,)) for index, run in enumerate(runs)
          if statuses is None or statuses[index][0] in _TO_RUN]


def plan_packs(grid_path: str, runs: Sequence[Run],
               statuses: Sequence[tuple[str, Sequence[workdir.Change]]] | None = None,
               parallel: int = 1) -> list[Pack]:
  """The packs of a grid's runs to run: runs whose trainer configs share `train.pack_key`.

  Args:
    grid_path, runs: the grid file and its runs (`plan_runs`).
    statuses: each run's `run_status`; finished and changed runs are left out, as a
      launch without packs leaves them. None: every run is to run (a TPU pod's
      launcher does not look into the bucket).
    parallel: the packs of each group of runs sharing a key: the group is cut into
      this many contiguous packs of near-equal size, so that `parallel` processes
      keep `parallel` cores busy.

  Returns:
    The packs, in the order of their first runs; 'pack1', 'pack2', … for packs of
    several runs. A run alone in its group, and a run that cannot train in a pack
    (train.parallel='pmap' or head.sharded), is a pack of one: a solo run.
  """
  # Imported here: train pulls in jax and flax, which `collect` and a launch without
  # packs do without.
  from arcjax import train  # pylint: disable=import-outside-toplevel
  if parallel < 1:
    raise ValueError(f"parallel must be >= 1, got {parallel}")
  groups: dict[str, list[Run]] = {}
  for run in [pack.runs[0] for pack in solo_packs(runs, statuses)]:
    config = trainer_config(grid_path, run.row, run.overrides)
    key = f"alone:{run.workdir}" if _trains_alone(config) else train.pack_key(config)
    groups.setdefault(key, []).append(run)
  chunks = []
  for group in groups.values():
    start = 0
    for size in _splits(len(group), parallel):
      chunks.append(tuple(group[start:start + size]))
      start += size
  order = {run.name: index for index, run in enumerate(runs)}
  chunks.sort(key=lambda chunk: order[chunk[0].name])
  packs, count = [], 0
  for chunk in chunks:
    if len(chunk) == 1:
      packs.append(Pack(chunk[0].name, chunk))
    else:
      count += 1
      packs.append(Pack(f"pack{count}", chunk))
  return packs


# --- A run's trainer ---------------------------------------------------------------------


def override_flag(override: str) -> str:
  """'config.train.steps=300' -> '--config.train.steps=300' (the trainer's flag)."""
  if not _OVERRIDE.match(override):
    raise ValueError(f"override {override!r} is not of the form config.FIELD=VALUE "
                     f"(e.g. config.train.steps=300)")
  return "--" + override


def _trainer_flags(grid_path: str, row: str, run_workdir: str, overrides: Sequence[str],
                   distributed_auto: bool) -> list[str]:
  return [f"--config={grid_path}:{row}", f"--workdir={run_workdir}",
          *(override_flag(o) for o in overrides),
          *(["--distributed_auto"] if distributed_auto else [])]


def trainer_command(grid_path: str, row: str, run_workdir: str,
                    overrides: Sequence[str] = (), *, python: str = sys.executable,
                    distributed_auto: bool = False) -> list[str]:
  """argv of one run's trainer.

  `python -m arcjax.main --config=GRID:ROW --workdir=DIR [--config.FIELD=VALUE …]
  [--distributed_auto]`.
  """
  return [python, "-m", TRAINER_MODULE,
          *_trainer_flags(grid_path, row, run_workdir, overrides, distributed_auto)]


def pack_command(grid_path: str, pack: Pack, *, python: str = sys.executable,
                 distributed_auto: bool = False) -> list[str]:
  """argv of a pack's trainer; a pack of one run is that run's `trainer_command`.

  `python -m arcjax.pack -- <run 1's flags> -- <run 2's flags> …`, each run's
  flags those of its solo trainer (`--config=GRID:ROW --workdir=DIR
  [--config.FIELD=VALUE …] [--distributed_auto]`).
  """
  if pack.solo:
    (run,) = pack.runs
    return trainer_command(grid_path, run.row, run.workdir, run.overrides, python=python,
                           distributed_auto=distributed_auto)
  argv = [python, "-m", PACK_TRAINER_MODULE]
  for run in pack.runs:
    argv += ["--", *_trainer_flags(grid_path, run.row, run.workdir, run.overrides,
                                   distributed_auto)]
  return argv


def trainer_config(grid_path: str, row: str,
                   overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config the trainer will build for a run, parsed as `arcjax.main` parses it.

  Raises ConfigError (one line, naming GRID:ROW) for an unknown row, an unknown
  field (and the known ones beside it) or a value of the wrong type.
  """
  return config_file.load([TRAINER_MODULE, f"--config={grid_path}:{row}",
                           *(override_flag(o) for o in overrides)])


# --- What the runs' folders hold -----------------------------------------------------------


def run_status(grid_path: str, run: Run) -> tuple[str, list[workdir.Change]]:
  """('new' | 'unfinished' | 'finished' | 'changed', changes) of a run's workdir (see
  `workdir.run_status`) against the config the trainer would build for it."""
  config = trainer_config(grid_path, run.row, run.overrides)
  return workdir.run_status(workdir.as_path(run.workdir), config)


def check_layout(run: Run) -> None:
  """Refuses to mix one run per row and seeded runs in a row's folder (WorkdirError)."""
  row_dir = epath.Path(posixpath.dirname(run.workdir) if run.seed is not None else run.workdir)
  if run.seed is not None and workdir.holds_run(row_dir):
    raise errors.WorkdirError(f"{row_dir} holds a single run (no --seeds): seeded runs cannot "
                              "go inside it; use another --workdir")
  if run.seed is None and row_dir.is_dir():
    seeded = sorted(f.name for f in row_dir.iterdir()
                    if seed_of(f.name) is not None and workdir.holds_run(f))
    if seeded:
      raise errors.WorkdirError(f"{row_dir} holds seeded runs ({', '.join(seeded)}): launch "
                                "with --seeds, or use another --workdir")


def statuses(grid_path: str, runs: Sequence[Run]) -> list[tuple[str, list[workdir.Change]]]:
  """Each run's `run_status`, its folder's layout checked first."""
  found = []
  for run in runs:
    check_layout(run)
    found.append(run_status(grid_path, run))
  return found


def trained_changes(changes: Sequence[workdir.Change]) -> str:
  """'lr: 0.1 → 0.5': the changes that make a run 'changed' (not the free fields)."""
  return workdir.describe_changes([c for c in changes if not c.free])


def status_line(run: Run, status: str, changes: Sequence[workdir.Change]) -> str:
  """'# arcface/seed0: finished, skipped': a dry run's comment on a run."""
  if status == "finished":
    return f"# {run.name}: finished, skipped"
  if status == "changed":
    return f"# {run.name}: changed ({trained_changes(changes)}), not run"
  return f"# {run.name}: {status}"

"""One metric writer (wandb + files in the workdir) and the terminal progress bar.

Files the notebooks and `experiments.collect` read (names in `arcjax.workdir`):
  workdir/metrics.jsonl                      one JSON object per row: {"step": N, name: value}
  workdir/histograms/<name>_step{N:08d}.npz  counts (bins,), edges (bins + 1,)
  workdir/images/<name>_step{N:08d}.npz      images (N, H, W, C) uint8
wandb runs offline (files under workdir/wandb, `wandb sync` later) unless
`config.wandb.mode` or the WANDB_MODE environment variable says 'online'; it
never needs a login or a network otherwise. A run keeps one wandb run id
(workdir/wandb_run_id) across kills and resumes.
"""

import json
import math
import os
import re
import time
import uuid
from typing import Any, Mapping

from etils import epath
import ml_collections
import numpy as np
import tqdm

from arcjax import errors
from arcjax import workdir

WANDB_MODES = ("offline", "online", "disabled")


def wandb_mode(config_mode: str) -> str:
  """The wandb mode: WANDB_MODE if set (it wins, as in wandb itself), else `config_mode`."""
  mode = os.environ.get("WANDB_MODE") or config_mode
  if mode not in WANDB_MODES:
    raise errors.ConfigError(f"wandb mode {mode!r} (from "
                     f"{'WANDB_MODE' if os.environ.get('WANDB_MODE') else 'config.wandb.mode'}) "
                     f"is not one of {WANDB_MODES}")
  return mode


def _file_name(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _json_value(value: Any) -> Any:
  value = np.asarray(value)
  if value.ndim:
    raise ValueError(f"a scalar metric must be a scalar, got shape {value.shape}")
  value = value.item()
  # JSON has no NaN or inf; the strings keep them visible instead of failing the run.
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def check_config(wandb_config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for a `config.wandb.mode` wandb does not know."""
  if wandb_config.mode not in WANDB_MODES:
    raise errors.ConfigError(f"config.wandb.mode must be one of {WANDB_MODES}, "
                             f"got {wandb_config.mode!r}")


def read_metrics(directory: str | os.PathLike) -> list[dict[str, Any]]:
  """The rows of `directory`/metrics.jsonl, in order (a line cut short is skipped)."""
  path = workdir.as_path(directory) / workdir.METRICS
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(row, dict) and isinstance(row.get("step"), int):
      rows.append(row)
  return rows


def _own_wandb_service() -> None:
  """Makes this process start its own wandb service, not use one inherited from its parent.

  wandb keeps the service's address in WANDB_SERVICE ("3-<pid of its owner>-…"), which child
  processes inherit. A run's stream in its parent's service outlives the run when it is
  killed, and its resume, which reopens the same run id, is then refused ("run ID … is in
  use"). The run's own service dies with it.
  """
  owner = os.environ.get("WANDB_SERVICE", "").split("-")
  if len(owner) > 1 and owner[1] != str(os.getpid()):
    del os.environ["WANDB_SERVICE"]


def _wandb_run_id(directory: epath.Path) -> str:
  """The id in `directory`/wandb_run_id; a new one, written there, on the first start."""
  path = directory / workdir.WANDB_RUN_ID
  if path.exists():
    run_id = path.read_text().strip()
    if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run_id):
      return run_id
    raise errors.WorkdirError(f"{path} holds no wandb run id ({run_id[:40]!r}): remove it to "
                              "start a new wandb run")
  run_id = uuid.uuid4().hex[:12]  # wandb's ids: letters and digits
  workdir.write_text(path, run_id + "\n")
  return run_id


class MetricWriter:
  """Scalars, histograms and images to wandb and to files in the workdir.

  metrics.jsonl is rewritten whole at each flush (atomically, see
  `workdir.write_text`): after every row in a local workdir, at most every
  `remote_flush_s` seconds in a bucket (whose objects cannot be appended to),
  and at every `flush()` — the trainer flushes before each checkpoint, so the
  rows of a step are on disk before the checkpoint of that step.

  Args:
    directory: the run's workdir (`workdir.as_path`).
    config: the run's config (sent to wandb; `config.wandb.mode` and `.project`).
    keep_through_step: rows of an earlier start with a step up to this one are
      kept (the step of the checkpoint the run resumes from), later ones dropped,
      so that a resumed run holds each (step, metric) once; None keeps none.
    enabled: False on every process but the first of a multi-host run.
  """

  def __init__(self, directory: epath.Path, config: ml_collections.ConfigDict, *,
               keep_through_step: int | None = None, enabled: bool = True,
               remote_flush_s: float = 30.0):
    self._directory = directory
    self._enabled = enabled
    self._run = None
    self._flush_s = remote_flush_s if workdir.is_remote(directory) else 0.0
    self._flushed = 0.0
    self.rows: list[dict[str, Any]] = []
    if not enabled:
      return
    if keep_through_step is not None:
      self.rows = [row for row in read_metrics(directory) if row["step"] <= keep_through_step]
    self.flush()
    mode = wandb_mode(config.wandb.mode)
    if mode != "disabled":
      import wandb  # pylint: disable=import-outside-toplevel  (slow import, unneeded when disabled)
      # wandb writes local files; a bucket workdir keeps them in ./wandb.
      local = "wandb" if workdir.is_remote(directory) else os.fspath(directory)
      _own_wandb_service()
      # One wandb run for the whole run, however often it was killed and resumed: its id is
      # kept in the workdir, and each start resumes it (offline, `wandb sync` joins the parts).
      self._run = wandb.init(project=config.wandb.project, dir=local, mode=mode,
                             name=directory.name, id=_wandb_run_id(directory),
                             resume="allow", config=config.to_dict(),
                             # a pack's runs are several wandb runs of one process
                             reinit="create_new",
                             settings=wandb.Settings(console="off", silent=True))

  def flush(self) -> None:
    """Writes metrics.jsonl with every row so far."""
    if self._enabled:
      workdir.write_text(self._directory / workdir.METRICS,
                         "".join(json.dumps(row) + "\n" for row in self.rows))
      self._flushed = time.monotonic()

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """One row `{"step": step, **scalars}` of Python numbers (NaN/inf written as strings)."""
    if not self._enabled:
      return
    row = {"step": int(step), **{name: _json_value(value) for name, value in scalars.items()}}
    self.rows.append(row)
    if time.monotonic() - self._flushed >= self._flush_s:
      self.flush()
    if self._run is not None:
      self._run.log({name: value for name, value in row.items() if name != "step"}, step=int(step))

  def has(self, step: int, name: str) -> bool:
    """Whether a row of `step` holds `name` (a resumed run writes each (step, name) once)."""
    return any(row["step"] == step and name in row for row in self.rows)

  def _save_npz(self, folder: str, name: str, step: int, **arrays) -> None:
    path = self._directory / folder / f"{_file_name(name)}_step{int(step):08d}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
      np.savez(f, **arrays)

  def write_histogram(self, step: int, name: str, values: np.ndarray, *,
                      bins: int | np.ndarray = 90) -> None:
    """The histogram of `values: (N,)` (np.histogram's `bins`: a count or the edges)."""
    if not self._enabled:
      return
    counts, edges = np.histogram(np.asarray(values), bins=bins)
    self._save_npz(workdir.HISTOGRAMS, name, step, counts=counts, edges=edges)
    if self._run is not None:
      import wandb  # pylint: disable=import-outside-toplevel
      self._run.log({name: wandb.Histogram(np_histogram=(counts, edges))}, step=int(step))

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """`images`: name → (N, H, W, C) uint8, C = 1 or 3."""
    if not self._enabled:
      return
    for name, batch in images.items():
      batch = np.asarray(batch)
      if batch.ndim != 4 or batch.dtype != np.uint8 or batch.shape[-1] not in (1, 3):
        raise ValueError(f"images {name!r} must be (N, H, W, 1 or 3) uint8, got "
                         f"{batch.dtype} {batch.shape}")
      self._save_npz(workdir.IMAGES, name, step, images=batch)
      if self._run is not None:
        import wandb  # pylint: disable=import-outside-toplevel
        self._run.log({name: [wandb.Image(image) for image in batch]}, step=int(step))

  def close(self) -> None:
    """Flushes the rows and finishes the wandb run (its files are complete after this)."""
    self.flush()
    if self._run is not None:
      self._run.finish()
      self._run = None


class Progress:
  """A tqdm bar over the training steps (loss, images/s; tqdm adds the ETA), and eval lines.

  Shown on the first process only (`enabled`).
  """

  def __init__(self, total_steps: int, start_step: int = 0, *, enabled: bool = True):
    self._bar = tqdm.tqdm(total=total_steps, initial=start_step, disable=not enabled,
                          unit="step", dynamic_ncols=True, mininterval=0.5)
    self._step = start_step
    self._enabled = enabled

  def update(self, step: int, loss: float, images_per_s: float) -> None:
    """Moves the bar to `step` and shows the latest loss and throughput."""
    self._bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.0f}", refresh=False)
    self._bar.update(step - self._step)
    self._step = step

  def write(self, line: str) -> None:
    """A line above the bar (e.g. one per evaluation)."""
    if self._enabled:
      self._bar.write(line)

  def close(self) -> None:
    self._bar.close()

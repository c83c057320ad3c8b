"""One metric writer (wandb + files in the workdir) and the terminal progress bar.

Files the notebooks and `experiments.collect` read:
  workdir/metrics.jsonl                      one JSON object per write: {"step": N, name: value}
  workdir/histograms/<name>_step{N:08d}.npz  counts (bins,), edges (bins + 1,)
  workdir/images/<name>_step{N:08d}.npz      images (N, H, W, C) uint8
wandb runs offline (files under workdir/wandb, `wandb sync` later) unless
`config.wandb.mode` or the WANDB_MODE environment variable says 'online'; it
never needs a login or a network otherwise.
"""

import json
import math
import os
import pathlib
import re
from typing import Any, Mapping

import ml_collections
import numpy as np
import tqdm

WANDB_MODES = ("offline", "online", "disabled")
METRICS_FILE = "metrics.jsonl"


def wandb_mode(config_mode: str) -> str:
  """The wandb mode: WANDB_MODE if set (it wins, as in wandb itself), else `config_mode`."""
  mode = os.environ.get("WANDB_MODE") or config_mode
  if mode not in WANDB_MODES:
    raise ValueError(f"wandb mode {mode!r} (from "
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


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The rows of workdir/metrics.jsonl, in order."""
  path = pathlib.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricWriter:
  """Scalars, histograms and images to wandb and to files in `workdir`.

  Args:
    workdir: the run's directory.
    config: the run's config (sent to wandb; `config.wandb.mode` and `.project`).
    start_step: the step the run (re)starts from: rows of metrics.jsonl after
      it, written by a run that was killed before its next checkpoint, are
      dropped, so a resumed run leaves one row per step.
    enabled: False on every process but the first of a multi-host run.
  """

  def __init__(self, workdir: str | os.PathLike, config: ml_collections.ConfigDict, *,
               start_step: int = 0, enabled: bool = True):
    self._workdir = pathlib.Path(workdir)
    self._enabled = enabled
    self._run = None
    if not enabled:
      return
    self._workdir.mkdir(parents=True, exist_ok=True)
    kept = [row for row in read_metrics(self._workdir) if row["step"] <= start_step]
    with open(self._workdir / METRICS_FILE, "w") as f:
      f.writelines(json.dumps(row) + "\n" for row in kept)
    mode = wandb_mode(config.wandb.mode)
    if mode != "disabled":
      import wandb  # pylint: disable=import-outside-toplevel  (slow import, unneeded when disabled)
      resolved = self._workdir.resolve()
      # A fresh wandb run per start, named after the workdir: after a SIGKILL the old
      # run's id can stay held by its orphaned wandb service.
      self._run = wandb.init(project=config.wandb.project, dir=str(resolved), mode=mode,
                             name=resolved.name, config=config.to_dict(),
                             settings=wandb.Settings(console="off", silent=True))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """One row `{"step": step, **scalars}` of Python numbers (NaN/inf written as strings)."""
    if not self._enabled:
      return
    row = {"step": int(step), **{name: _json_value(value) for name, value in scalars.items()}}
    with open(self._workdir / METRICS_FILE, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._run is not None:
      self._run.log({name: value for name, value in row.items() if name != "step"}, step=int(step))

  def write_histogram(self, step: int, name: str, values: np.ndarray, *,
                      bins: int | np.ndarray = 90) -> None:
    """The histogram of `values: (N,)` (np.histogram's `bins`: a count or the edges)."""
    if not self._enabled:
      return
    counts, edges = np.histogram(np.asarray(values), bins=bins)
    path = self._workdir / "histograms" / f"{_file_name(name)}_step{int(step):08d}.npz"
    path.parent.mkdir(exist_ok=True)
    np.savez(path, counts=counts, edges=edges)
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
      path = self._workdir / "images" / f"{_file_name(name)}_step{int(step):08d}.npz"
      path.parent.mkdir(exist_ok=True)
      np.savez(path, images=batch)
      if self._run is not None:
        import wandb  # pylint: disable=import-outside-toplevel
        self._run.log({name: [wandb.Image(image) for image in batch]}, step=int(step))

  def close(self) -> None:
    """Finishes the wandb run (its files are complete after this)."""
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

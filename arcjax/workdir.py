"""A run's workdir: its file names, atomic writes, the lock, config provenance, checkpoints.

A run is its config plus its workdir. The workdir holds:

  config.json           the run's whole config
  config_history.jsonl  every accepted change of config.json on a resume, appended
  lock                  who runs here now (one process at a time)
  checkpoints/<step>/   orbax: the state (global arrays, as they lie on the devices) + meta
  metrics.jsonl         one JSON row per write: {"step": N, name: value, ...}
  angles/, histograms/, images/   θ records and what also goes to wandb
  wandb_run_id          the id of the run's wandb run, which every start resumes
  evaluations/          what `python -m arcjax.evaluate` wrote
  angle_stats.json, results.json  written last
  init_from.json        a run started from another run's backbone (config.train.init_from):
                        that run, its step, the SHA-256 of what was loaded, whether the
                        centres came too
  trained_in.json       each start of training: its step, solo or in a pack (with whom)
  imported.json         a workdir made by `python -m arcjax.from_onnx`: the ONNX file, its
                        SHA-256, the architecture found, where the normalisation came from

A workdir is any path `etils.epath` reaches: a local folder (relative paths are
taken from the current directory) or a bucket (`gs://bucket/run`). Every file a
run reads or writes goes through this module. Nothing here imports JAX, so the
launcher and `experiments.collect` stay cheap; orbax is imported where
checkpoints are used.
"""

import contextlib
import dataclasses
import datetime
import errno
import json
import os
import pathlib
import socket
import threading
import time
import uuid
from typing import Any, Callable, Iterator

from etils import epath

from arcjax import errors

CONFIG = "config.json"
CONFIG_HISTORY = "config_history.jsonl"
LOCK = "lock"
CHECKPOINTS = "checkpoints"
DAMAGED_CHECKPOINTS = "checkpoints_damaged"
METRICS = "metrics.jsonl"
ANGLES = "angles"
HISTOGRAMS = "histograms"
IMAGES = "images"
EVALUATIONS = "evaluations"
ANGLE_STATS = "angle_stats.json"
RESULTS = "results.json"
INIT_FROM = "init_from.json"
# How each segment of the run was trained: solo, or in a pack with which workdirs (a list).
TRAINED_IN = "trained_in.json"
IMPORTED = "imported.json"
WANDB_RUN_ID = "wandb_run_id"
LAUNCH_LOG = "launch.log"
SLURM_SCRIPT = "slurm.sbatch"  # what `experiments.launch --target=slurm` submits
# Files that only a run's workdir holds: a folder with none of them is not a run.
RUN_FILES = (RESULTS, CONFIG, METRICS, LAUNCH_LOG, SLURM_SCRIPT)

_REMOTE_SCHEMES = ("gs://", "s3://")
# Config fields that change only what is recorded, when, or on which devices — not the
# trained parameters. A resume may change them; the change is still recorded.
FREE_FIELDS = ("train.steps", "train.log_every", "train.checkpoint_every",
               "train.keep_checkpoints", "train.max_param_norm", "train.parallel",
               "head.sharded", "head.chunk_size", "eval", "angles", "wandb",
               "data.max_pairs", "data.eval_bins", "data.stage_dir")
_ABSENT = "<absent>"
# Fields added after runs were made, with the value every earlier run had: a stored
# config.json without them meant this, so resuming it or collecting its grid is no change.
ADDED_FIELDS = {"model.input_mean": 127.5, "model.input_std": 128.0, "train.init_from": "",
                "loss.kind": "margin"}
# Fields that earlier runs' config.json hold and configs no longer have: labels that never
# changed what was computed (loss.preset named the margin that s, m1, m2, m3 gave).
REMOVED_FIELDS = ("loss.preset",)


# --- Paths -------------------------------------------------------------------------


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` names cloud storage (gs://, s3://) rather than a local file."""
  return os.fspath(path).startswith(_REMOTE_SCHEMES)


def holds_run(folder: str | os.PathLike) -> bool:
  """Whether `folder` (local or gs://…) is a run's workdir: it holds one of RUN_FILES."""
  folder = epath.Path(folder)
  return any((folder / name).exists() for name in RUN_FILES)


def _gcs_credentials_hint() -> str | None:
  """Why gs:// cannot work on this machine, found without any network traffic; None if it may."""
  try:
    import gcsfs  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return "the Python package gcsfs is not installed (pip install gcsfs)"
  if os.environ.get("STORAGE_EMULATOR_HOST"):
    return None
  adc = pathlib.Path(os.environ.get("CLOUDSDK_CONFIG", "~/.config/gcloud")).expanduser()
  if (os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
      or (adc / "application_default_credentials.json").is_file()):
    return None
  try:
    on_google_cloud = "Google" in pathlib.Path("/sys/class/dmi/id/product_name").read_text()
  except OSError:
    on_google_cloud = False
  if on_google_cloud:
    return None
  return ("no Google Cloud credentials on this machine (set GOOGLE_APPLICATION_CREDENTIALS, "
          "run `gcloud auth application-default login`, or run on a Google Cloud VM)")


def as_path(path: str | os.PathLike, what: str = "workdir") -> epath.Path:
  """`path` as an epath: local paths absolute, cloud paths checked for reachability first.

  Raises WorkdirError (one line) for a gs:// path this machine cannot reach,
  before anything is written (never a local `gs:` folder).
  """
  text = os.fspath(path)
  if not text:
    raise errors.WorkdirError(f"the {what} path is empty")
  if text.startswith("gs://"):
    hint = _gcs_credentials_hint()
    if hint is not None:
      raise errors.WorkdirError(f"cannot use {what} {text}: {hint}")
    import fsspec  # pylint: disable=import-outside-toplevel
    # gcsfs caches directory listings, and sizes from them: another process's (or orbax's)
    # newer, longer file would then be read cut short. A run's files are few: no cache.
    fsspec.config.conf.setdefault("gcs", {})["use_listings_cache"] = False
    return epath.Path(text)
  if is_remote(text):
    return epath.Path(text)
  if "://" in text:
    raise errors.WorkdirError(f"{what} {text}: unknown storage scheme (use a local path or gs://)")
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def read_json(path: epath.Path) -> Any:
  """The JSON value in `path`; WorkdirError naming the file if it is not UTF-8 JSON."""
  try:
    return json.loads(path.read_bytes().decode("utf-8"))
  except UnicodeDecodeError as error:
    raise errors.WorkdirError(f"{path} is not UTF-8 text ({error.reason} at byte "
                              f"{error.start})") from None
  except json.JSONDecodeError as error:
    raise errors.WorkdirError(f"{path} is not valid JSON: {error}") from None


def write_text(path: epath.Path, text: str) -> None:
  """Writes `text` to `path` whole: a reader sees the old file or the new one, never half.

  Local files are written beside and renamed; a cloud object appears whole when
  its upload completes.
  """
  path.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(path):
    path.write_text(text)
    return
  tmp = path.parent / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_json(path: epath.Path, value: Any) -> None:
  """`value` as indented JSON, written whole (see `write_text`)."""
  write_text(path, json.dumps(value, indent=2) + "\n")


# --- Config provenance -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Change:
  """One config field that differs: `free` if it does not change the trained parameters."""
  field: str
  stored: Any
  requested: Any
  free: bool


def config_as_json(config: Any) -> dict[str, Any]:
  """A ConfigDict (or a dict) as the JSON object config.json holds (tuples become lists)."""
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(_flatten(value, name + "."))
    else:
      flat[name] = value
  return flat


def is_free_field(field: str) -> bool:
  """Whether `field` (dotted) changes nothing that is trained (see FREE_FIELDS)."""
  return any(field == free or field.startswith(free + ".") for free in FREE_FIELDS)


def config_changes(stored: dict[str, Any], requested: dict[str, Any]) -> list[Change]:
  """The fields of two config.json objects that differ, in sorted order.

  A stored config of an earlier version reads as holding ADDED_FIELDS' values where the
  requested one has them, and without its REMOVED_FIELDS.
  """
  new = _flatten(requested)
  old = {field: value for field, value in _flatten(stored).items()
         if field not in REMOVED_FIELDS}
  old = {**{field: value for field, value in ADDED_FIELDS.items() if field in new}, **old}
  return [Change(field, old.get(field, _ABSENT), new.get(field, _ABSENT), is_free_field(field))
          for field in sorted(old.keys() | new.keys())
          if old.get(field, _ABSENT) != new.get(field, _ABSENT)]


def describe_changes(changes: list[Change]) -> str:
  """'train.lr: 0.1 → 0.5, seed: 0 → 7'."""
  return ", ".join(f"{c.field}: {json.dumps(c.stored)} → {json.dumps(c.requested)}"
                   for c in changes)


def has_checkpoint(directory: epath.Path) -> bool:
  """Whether the workdir holds at least one checkpoint step folder."""
  folder = directory / CHECKPOINTS
  return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def stored_config_changes(directory: epath.Path, config: Any) -> list[Change]:
  """The fields in which `config` differs from the workdir's config.json ([] without one)."""
  config_path = directory / CONFIG
  if not config_path.exists():
    return []
  return config_changes(read_json(config_path), config_as_json(config))


def check_config_change(directory: epath.Path, config: Any, *,
                        allow_changes: bool = False) -> list[Change]:
  """The changes `record_config` would record; raises its refusal. Writes nothing."""
  changes = stored_config_changes(directory, config)
  trained = [c for c in changes if not c.free]
  if trained and has_checkpoint(directory) and not allow_changes:
    raise errors.WorkdirError(
        f"{directory} holds a run trained with another config: {describe_changes(trained)}; "
        "run with --allow_config_change to continue it with the new values (recorded in "
        f"{CONFIG_HISTORY}), or use a new workdir")
  return changes


def record_config(directory: epath.Path, config: Any, *, allow_changes: bool = False) -> list[Change]:
  """Writes config.json, refusing a change of a trained run's config unless allowed.

  Compares `config` with the stored config.json before writing anything. Where
  the workdir holds a checkpoint, a change in any field outside FREE_FIELDS
  raises WorkdirError naming every such field with both values, unless
  `allow_changes`. Every accepted change is appended to config_history.jsonl
  (with the time and whether it needed permission), then config.json is
  rewritten. Returns the changes.
  """
  config_path = directory / CONFIG
  if not config_path.exists():
    write_json(config_path, config_as_json(config))
    return []
  changes = check_config_change(directory, config, allow_changes=allow_changes)
  if not changes:
    return []
  entry = {"time": _now(), "changes": [dataclasses.asdict(c) for c in changes],
           "allowed_by_flag": bool(any(not c.free for c in changes) and has_checkpoint(directory))}
  history = directory / CONFIG_HISTORY
  previous = history.read_text() if history.exists() else ""
  write_text(history, previous + json.dumps(entry) + "\n")
  write_json(config_path, config_as_json(config))
  return changes


def run_status(directory: epath.Path, requested: Any) -> tuple[str, list[Change]]:
  """What a workdir holds against a requested config: (status, changes).

  'new': no config.json; 'changed': a checkpointed run whose trained fields
  differ; 'finished': results.json for the requested number of steps (free
  fields may differ); 'unfinished': anything else (a resume continues it).
  """
  config_path = directory / CONFIG
  if not config_path.exists():
    return "new", []
  requested = config_as_json(requested)
  changes = config_changes(read_json(config_path), requested)
  if any(not c.free for c in changes) and has_checkpoint(directory):
    return "changed", changes
  results_path = directory / RESULTS
  if results_path.exists():
    results = read_json(results_path)
    if isinstance(results, dict) and results.get("step") == requested["train"]["steps"]:
      return "finished", changes
  return "unfinished", changes


# --- The lock ------------------------------------------------------------------------


def _now() -> str:
  return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class RunLock:
  """One process runs in a workdir at a time; a second one is refused within seconds.

  A local workdir is locked with `flock` on its `lock` file, which the kernel
  releases when the holder dies however it dies: a stale lock is taken over at
  once, with a message. A cloud workdir has no such lock: the holder rewrites
  the file every `heartbeat_s` seconds, and a lock not rewritten for
  `stale_after_s` (or held by a dead process on this host) is stale. The file
  names the holder (host, pid, start time) for the refusal message.

  `heartbeat` chooses the heartbeat lock; None (the default) takes it for cloud
  workdirs only. A network file system whose `flock` is not shared between
  hosts wants it too.
  """

  def __init__(self, directory: epath.Path, *, heartbeat: bool | None = None,
               heartbeat_s: float = 20.0, stale_after_s: float = 90.0):
    self.path = directory / LOCK
    self._heartbeat = is_remote(self.path) if heartbeat is None else heartbeat
    self._heartbeat_s, self._stale_after_s = heartbeat_s, stale_after_s
    self._owner = {"host": socket.gethostname(), "pid": os.getpid(), "since": _now(),
                   "id": uuid.uuid4().hex}
    self._file = None
    self._stop = threading.Event()
    self._thread = None

  def _holder(self, text: str) -> dict[str, Any]:
    try:
      holder = json.loads(text)
    except json.JSONDecodeError:
      return {}
    return holder if isinstance(holder, dict) else {}

  def _refuse(self, holder: dict[str, Any]) -> errors.WorkdirError:
    return errors.WorkdirError(
        f"{self.path.parent} is in use by pid {holder.get('pid', '?')} on host "
        f"{holder.get('host', '?')} since {holder.get('since', '?')}: one run per workdir "
        "(wait for it, stop it, or use another workdir)")

  def _note_takeover(self, holder: dict[str, Any]) -> None:
    if holder and holder.get("id") != self._owner["id"]:
      print(f"note: taking over the stale lock of {self.path.parent} (pid "
            f"{holder.get('pid', '?')} on host {holder.get('host', '?')}, since "
            f"{holder.get('since', '?')}, no longer running)", flush=True)

  def acquire(self) -> "RunLock":
    """Takes the lock or raises WorkdirError naming its holder."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if self._heartbeat:
      self._acquire_heartbeat()
    else:
      self._acquire_flock()
    return self

  def _acquire_flock(self) -> None:
    import fcntl  # pylint: disable=import-outside-toplevel
    file = open(self.path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
    try:
      fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      file.seek(0)
      holder = self._holder(file.read())
      file.close()
      raise self._refuse(holder) from None
    file.seek(0)
    self._note_takeover(self._holder(file.read()))
    file.seek(0)
    file.truncate()
    file.write(json.dumps(self._owner) + "\n")
    file.flush()
    self._file = file

  def _read_holder(self) -> dict[str, Any]:
    try:
      return self._holder(self.path.read_text())
    except FileNotFoundError:
      return {}

  def _stale(self, holder: dict[str, Any]) -> bool:
    if not holder:
      return True
    if holder.get("host") == self._owner["host"] and isinstance(holder.get("pid"), int):
      if not _process_alive(holder["pid"]):
        return True
    return time.time() - holder.get("heartbeat", 0.0) > self._stale_after_s

  def _write_heartbeat(self) -> None:
    write_text(self.path, json.dumps({**self._owner, "heartbeat": time.time()}) + "\n")

  def _acquire_heartbeat(self) -> None:
    holder = self._read_holder()
    if not self._stale(holder):
      raise self._refuse(holder)
    self._note_takeover(holder)
    self._write_heartbeat()
    time.sleep(min(1.0, self._heartbeat_s))  # a racing writer shows up in the re-read
    holder = self._read_holder()
    if holder.get("id") != self._owner["id"]:
      raise self._refuse(holder)
    self._thread = threading.Thread(target=self._beat, name="arcjax-lock", daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self._heartbeat_s):
      with contextlib.suppress(OSError):
        self._write_heartbeat()

  def release(self) -> None:
    """Gives the lock up (a no-op if not held)."""
    if self._file is not None:
      # Emptied while still held: the next holder finds no one to take over from (a holder
      # that died leaves its line, and the next one says it took over). Not unlinked: a
      # process that opened the old file could then hold a lock on it beside a new one.
      with contextlib.suppress(OSError):
        self._file.seek(0)
        self._file.truncate()
        self._file.flush()
      self._file.close()  # closing the descriptor releases the flock
      self._file = None
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None
      with contextlib.suppress(OSError):
        if self._read_holder().get("id") == self._owner["id"]:
          self.path.unlink()


@contextlib.contextmanager
def open_run(directory: epath.Path, *, primary: bool = True,
             agree=lambda ok: ok) -> Iterator[Callable[..., list[Change]]]:
  """Holds the workdir for a run: takes its lock, and yields `record(config, allow_changes=False)`.

  The caller checks everything the run needs (reading only), then calls
  `record`: `record_config` (a changed config refused, config.json written).
  Nothing but the lock is written before it; the lock is released on leaving.
  Only the `primary` process (the first of a multi-host run) touches the
  files; `agree(ok) -> ok of the primary` lets every process learn whether it
  succeeded (a broadcast), so that all stop together when it did not.
  """

  def agreed(error: errors.Error | None) -> None:
    if not agree(error is None) and error is None:
      error = errors.WorkdirError(f"the first process could not open {directory} (see its message)")
    if error is not None:
      raise error

  def record(config: Any, *, allow_changes: bool = False) -> list[Change]:
    changes, error = [], None
    if primary:
      try:
        changes = record_config(directory, config, allow_changes=allow_changes)
      except errors.Error as caught:
        error = caught
    agreed(error)
    return changes

  lock, error = None, None
  if primary:
    try:
      if directory.exists() and not directory.is_dir():
        raise errors.WorkdirError(f"workdir {directory} is a file, not a folder: name another "
                                  "path (or move the file)")
      lock = RunLock(directory).acquire()
    except errors.Error as caught:
      error = caught
  try:
    agreed(error)
    yield record
  finally:
    if lock is not None:
      lock.release()


# --- Checkpoints ----------------------------------------------------------------------

CHECKSUMS = "SHA256SUMS"  # sha256sum's format: '<hex>  <path>' a line
# The meta entry with which a checkpoint declares that its files' SHA-256 follow it.
_CHECKSUMS_META = "checksums"
_BLOCK = 1 << 22


def files_under(folder: epath.Path) -> list[str]:
  """Paths of every file under `folder`, relative to it ('/'-separated), sorted."""
  # walk() gives a bucket's folders without their 'gs://': compare the paths without it.
  root = os.fspath(folder).split("://", 1)[-1].rstrip("/")
  found = []
  for directory, _, names in folder.walk():
    relative = os.fspath(directory).split("://", 1)[-1][len(root):].strip("/")
    found += [f"{relative}/{name}" if relative else name for name in names]
  return sorted(found)


def sha256_of(path: epath.Path) -> str:
  """The SHA-256 (hex) of the file `path`, read in blocks."""
  import hashlib  # pylint: disable=import-outside-toplevel
  digest = hashlib.sha256()
  with path.open("rb") as f:
    while block := f.read(_BLOCK):
      digest.update(block)
  return digest.hexdigest()


def read_checksums(folder: epath.Path) -> dict[str, str] | None:
  """{path: SHA-256 hex} of `folder`/SHA256SUMS (sha256sum's format); None without one.

  Raises ValueError for a line that is not '<64 hex digits>  <path>'.
  """
  path = folder / CHECKSUMS
  if not path.exists():
    return None
  sums = {}
  for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
    digest, _, name = line.strip().partition("  ")
    digest = digest.lower()
    if not name or len(digest) != 64 or set(digest) - set("0123456789abcdef"):
      raise ValueError(f"{path}: not a sha256sum line: {line[:80]!r}")
    sums[name.lstrip("*")] = digest
  return sums


@dataclasses.dataclass
class Checkpoints:
  """The orbax checkpoints of a workdir: `state` (a pytree of global arrays) and `meta` (JSON).

  Saves the state as it lies on the devices (no host copy, no gather of a
  sharded leaf); restores onto any device count: leaves marked resizable (the
  class-centre rows) are padded with zeros or cut to the requested shape.

  Integrity: orbax records no checksum, so once orbax has committed a step
  (it saves asynchronously) the SHA-256 of each of its files goes to
  `checkpoints/<step>/SHA256SUMS` (`sha256sum -c` reads it there); this happens
  at the next `save`, `wait` or `close`. A step's meta says that its sums
  follow it. Before a step is trusted (restored, or its shapes read) its files
  are checked against them (`integrity`):
    - every file matches: intact;
    - a file differs or is missing, the sums or the meta are unreadable, or
      the meta announces sums that were never written (the process died
      between orbax's commit and the sums): damaged. The first process moves
      it to `checkpoints_damaged/<step>-<time>/`, and the next older step is
      tried.
    - neither sums nor the announcement (a checkpoint of an arcjax that
      recorded none): restored with a note that it is unverified; if orbax
      cannot read it (its metadata, or its state when restored), it is
      damaged.
  Nothing else moves a checkpoint: one that is intact but does not fit the
  requested state raises WorkdirError and stays where it is.

  `primary`: whether this process writes (the sums, the moves); in a
  multi-host run only the first does, every process verifies. A reader that
  holds no lock on the workdir (`inference.load_run`) passes False: it names a
  damaged checkpoint and skips it, and the run's next start moves it.
  """
  directory: epath.Path
  keep: int = 2
  primary: bool = True

  def __post_init__(self):
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    self._ocp = ocp
    self._manager = ocp.CheckpointManager(
        self.directory / CHECKPOINTS,
        options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=False),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})
    self._pending: int | None = None  # saved, its sums not yet written
    self._checked: dict[int, str | None] = {}  # step -> its `integrity` verdict

  def _step_dir(self, step: int) -> epath.Path:
    return self.directory / CHECKPOINTS / str(step)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Starts writing checkpoint `step` (asynchronously; `wait` or `close` to finish).

    The previous step's sums are written first. A local disk without room for
    it is reported before anything is written (OSError ENOSPC), rather than
    from orbax's writer threads halfway through.
    """
    self._write_pending_sums()
    (self.directory / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    if not is_remote(self.directory):
      import shutil  # pylint: disable=import-outside-toplevel
      import jax  # pylint: disable=import-outside-toplevel
      needed = sum(leaf.nbytes for leaf in jax.tree.leaves(state)) + (1 << 20)
      free = shutil.disk_usage(self.directory).free
      if free < needed:
        raise OSError(errno.ENOSPC, f"checkpoint {step} needs about {needed / 2**20:.1f} MiB, "
                      f"{free / 2**20:.1f} MiB are free", os.fspath(self.directory / CHECKPOINTS))
    self._manager.save(step, args=self._ocp.args.Composite(
        state=self._ocp.args.PyTreeSave(state),
        meta=self._ocp.args.JsonSave({**meta, _CHECKSUMS_META: CHECKSUMS})))
    self._pending = step

  def _write_pending_sums(self) -> None:
    """Waits for orbax to commit the pending step, then writes its SHA256SUMS."""
    if self._pending is None:
      return
    self._manager.wait_until_finished()
    step, self._pending = self._pending, None
    folder = self._step_dir(step)
    if self.primary and folder.exists():
      sums = {name: sha256_of(folder / name) for name in files_under(folder)}
      write_text(folder / CHECKSUMS, "".join(f"{digest}  {name}\n"
                                             for name, digest in sums.items()))
      self._checked[step] = None

  def integrity(self, step: int) -> str | None:
    """None if checkpoint `step` is intact or predates checksums, else what is wrong with it
    (see the class docstring); `unverified(step)` tells the two apart."""
    if step not in self._checked:
      self._checked[step] = self._check(step)
    return self._checked[step]

  def unverified(self, step: int) -> bool:
    """Whether `step` has no SHA256SUMS and announces none (written before arcjax kept them)."""
    return not (self._step_dir(step) / CHECKSUMS).exists()

  def _check(self, step: int) -> str | None:
    folder = self._step_dir(step)
    try:
      sums = read_checksums(folder)
    except (ValueError, OSError) as error:
      return f"its {CHECKSUMS} cannot be read ({' '.join(str(error).split())[:200]})"
    if sums is None:
      try:
        meta = self._read_meta(step)
      except Exception as error:  # pylint: disable=broad-except  (orbax raises many kinds)
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        return f"its meta cannot be read ({reason})"
      if _CHECKSUMS_META in meta:
        return (f"its {CHECKSUMS} was never written (the run stopped between saving it and "
                "recording its checksums), so it cannot be checked")
      try:  # saved before checksums: what can be checked is that orbax reads its metadata
        self._manager.item_metadata(step)
      except Exception as error:  # pylint: disable=broad-except  (orbax raises many kinds)
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        return f"its metadata cannot be read ({reason})"
      return None
    for name, digest in sums.items():
      if not (folder / name).exists():
        return f"its file {name} is missing"
      if sha256_of(folder / name) != digest:
        return f"its file {name} does not match the SHA-256 recorded when it was saved"
    return None

  def _read_meta(self, step: int) -> dict[str, Any]:
    ocp = self._ocp
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def _damaged(self, step: int, reason: str) -> None:
    moved = f"moved to {DAMAGED_CHECKPOINTS}/; " if self.primary else ""
    print(f"note: checkpoint {step} in {self.directory / CHECKPOINTS} is damaged ({reason}); "
          f"{moved}trying an older one", flush=True)
    if self.primary:
      self._move_aside(step)

  def newest_intact(self) -> int | None:
    """The newest step that passes `integrity`; damaged newer ones are named on stdout and
    moved aside (by the `primary` process). None if there is none."""
    for step in sorted(self._manager.all_steps(), reverse=True):
      problem = self.integrity(step)
      if problem is None:
        return step
      self._damaged(step, problem)
    return None

  def stored_shapes(self, step: int) -> tuple[dict[tuple[str, ...], tuple[int, ...]], dict]:
    """({leaf path: shape} of the state checkpoint `step` holds, its meta), read from orbax's
    metadata (no array is read)."""
    try:
      tree = self._manager.item_metadata(step)["state"]
      tree = getattr(tree, "tree", tree)
      flat = self._ocp.tree.to_flat_dict(tree)
      return {path: tuple(leaf.shape) for path, leaf in flat.items()}, self._read_meta(step)
    except Exception as error:  # pylint: disable=broad-except  (orbax raises many kinds)
      reason = " ".join(str(error).split())[:300] or type(error).__name__
      raise errors.WorkdirError(f"checkpoint {step} in {self.directory / CHECKPOINTS} passed "
                                f"its integrity check but its metadata cannot be read: {reason}"
                                ) from None

  def flatten(self, tree: Any) -> dict[tuple[str, ...], Any]:
    """{leaf path: leaf} of a state tree, with the paths `stored_shapes` gives."""
    return self._ocp.tree.to_flat_dict(self._ocp.tree.serialize_tree(tree, keep_empty_nodes=True))

  def _restore(self, step: int, abstract_state: Any, resizable: Any) -> tuple[Any, dict]:
    import jax  # pylint: disable=import-outside-toplevel
    ocp = self._ocp

    def args(leaf, resize):
      return ocp.ArrayRestoreArgs(sharding=leaf.sharding, global_shape=leaf.shape,
                                  strict=not resize)

    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=abstract_state,
            restore_args=jax.tree.map(args, abstract_state, resizable)),
        meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def restore_latest(self, abstract_state: Any, resizable: Any) -> tuple[Any, dict] | None:
    """(state, meta) of the newest intact checkpoint; None if there is none.

    `abstract_state`: jax.ShapeDtypeStruct leaves with their shardings;
    `resizable`: a matching tree of bools. Damaged checkpoints are named and
    moved aside (see the class docstring); raises WorkdirError when every
    checkpoint is damaged, or when an intact one does not restore into
    `abstract_state` (it stays where it is).
    """
    had_steps = bool(self._manager.all_steps())
    while (step := self.newest_intact()) is not None:
      try:
        restored = self._restore(step, abstract_state, resizable)
      except Exception as error:  # pylint: disable=broad-except  (orbax raises many kinds)
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        if not self.unverified(step):
          raise errors.WorkdirError(
              f"checkpoint {step} in {self.directory / CHECKPOINTS} is intact (its files match "
              f"their SHA-256) but does not restore into this run's state: {reason}") from None
        self._checked[step] = f"orbax cannot restore it: {reason}"
        self._damaged(step, self._checked[step])
        continue
      if self.unverified(step):
        print(f"note: checkpoint {step} in {self.directory / CHECKPOINTS} has no {CHECKSUMS} "
              "(saved before arcjax recorded checksums): restored unverified", flush=True)
      return restored
    if had_steps:
      raise errors.WorkdirError(f"no checkpoint in {self.directory / CHECKPOINTS} is intact: "
                                f"the damaged ones are in {self.directory / DAMAGED_CHECKPOINTS}")
    return None

  def restore_arrays(self, step: int, keys: tuple[str, ...],
                     optional: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict]:
    """(the state's entries `keys` as NumPy arrays, meta) of checkpoint `step`, on this host.

    For inference: reads only those entries (not the optimiser state), whatever
    device layout they were saved from. Keys in `optional` may be absent (an
    imported model has no centres). The caller checks `integrity` first.
    """
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    ocp = self._ocp
    tree = self._manager.item_metadata(step)["state"]
    tree = getattr(tree, "tree", tree)
    keys = tuple(key for key in keys if key in tree or key not in optional)
    missing = [key for key in keys if key not in tree]
    if missing:
      raise errors.WorkdirError(f"checkpoint {step} in {self.directory / CHECKPOINTS} has no "
                                f"{missing}")
    wanted = {key: tree[key] for key in keys}
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), wanted),
            restore_args=jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), wanted),
            partial_restore=True),
        meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def _move_aside(self, step: int) -> None:
    source = self._step_dir(step)
    target = self.directory / DAMAGED_CHECKPOINTS / f"{step}-{int(time.time())}"
    target.parent.mkdir(parents=True, exist_ok=True)
    # A bucket has no empty folders: a file makes the target's parent exist for the rename.
    write_text(target.parent / "README", "checkpoints that failed their integrity check, kept "
               "aside (see arcjax.workdir.Checkpoints)\n")
    source.rename(target)
    self._checked.pop(step, None)
    self._manager.reload()

  def wait(self) -> None:
    """Waits for the pending save, and writes its sums."""
    self._write_pending_sums()
    self._manager.wait_until_finished()

  def close(self) -> None:
    """`wait`, then closes the manager."""
    try:
      self._write_pending_sums()
    finally:
      self._manager.close()

"""Copying a dataset from cloud storage to a worker's local disk, checked, before training.

Random reads of a train.rec over the network cost a round trip each, so a run
whose `data.path` is in a bucket first copies the dataset folder (train.rec,
train.idx, property, the .bin files — or an image folder, whole) to its local
`data.stage_dir`, once per machine. Each file is hashed (SHA-256) as it is
read from the bucket, and the local copy is hashed again after writing; a
`SHA256SUMS` file in the bucket folder (sha256sum's format), where present, is
what both must match. A manifest in the stage folder records what was copied,
so a restarted run copies nothing again; a stage folder holding other files is
refused rather than overwritten.
"""

import hashlib
import json
import os
import pathlib

from etils import epath
import tqdm

from arcjax import errors
from arcjax import workdir

MANIFEST = ".arcjax_staged.json"
CHECKSUMS = workdir.CHECKSUMS
_BLOCK = 1 << 22


def read_checksums(folder: str | os.PathLike) -> dict[str, str]:
  """{file name: SHA-256 hex} of `folder`/SHA256SUMS (sha256sum's format); {} without one."""
  return workdir.read_checksums(epath.Path(folder)) or {}


def _copy(source: epath.Path, target: pathlib.Path, bar: tqdm.tqdm) -> str:
  """Copies one file, returning the SHA-256 of what was read."""
  digest = hashlib.sha256()
  target.parent.mkdir(parents=True, exist_ok=True)
  partial = target.with_name(target.name + ".partial")
  with source.open("rb") as src, open(partial, "wb") as dst:
    while block := src.read(_BLOCK):
      digest.update(block)
      dst.write(block)
      bar.update(len(block))
  os.replace(partial, target)
  return digest.hexdigest()


def stage(source: str | os.PathLike, stage_dir: str | os.PathLike) -> pathlib.Path:
  """Copies the folder (or the folder of the file) `source` into `stage_dir`, checked.

  Returns the local path standing for `source` (the same file name inside
  `stage_dir` when `source` is a file). Raises DataError when a copy does not
  match its checksum, or when `stage_dir` holds something else.
  """
  source = epath.Path(source)
  if not source.exists():
    raise errors.DataError(f"data.path {source} does not exist")
  folder = source if source.is_dir() else source.parent
  local = pathlib.Path(stage_dir).expanduser()
  manifest_path = local / MANIFEST
  names = workdir.files_under(folder)
  if manifest_path.is_file():
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("source") != os.fspath(folder):
      raise errors.DataError(f"data.stage_dir {local} holds a copy of {manifest.get('source')}, "
                             f"not of {folder}: use another stage_dir")
    if sorted(manifest["files"]) == names:
      return local / source.name if source != folder else local
  elif local.exists() and any(local.iterdir()):
    raise errors.DataError(f"data.stage_dir {local} is not empty and holds no arcjax copy: "
                           "use an empty or new folder")
  expected = read_checksums(folder)
  total = sum((folder / name).stat().length for name in names)
  files = {}
  with tqdm.tqdm(total=total, unit="B", unit_scale=True, desc=f"staging {folder}") as bar:
    for name in names:
      read = _copy(folder / name, local / name, bar)
      written = workdir.sha256_of(epath.Path(local / name))
      if read != written or expected.get(name, read) != read:
        raise errors.DataError(
            f"staging {folder / name}: SHA-256 of the copy ({written}) does not match "
            f"{'its SHA256SUMS entry' if name in expected else 'what was read'} "
            f"({expected.get(name, read)})")
      files[name] = read
  manifest_path.write_text(json.dumps({"source": os.fspath(folder), "files": files}, indent=2))
  return local / source.name if source != folder else local

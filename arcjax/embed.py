"""Embeds a folder (or a .zip) of images with a trained run, for use elsewhere.

  python -m arcjax.embed --workdir=runs/default --images=DIR_OR_ZIP --out=PREFIX [--step=N]
      [--overwrite]

Writes PREFIX.npy, (N, d) float32 L2-normalised embeddings (the run's own
preprocessing, flip fusion as its `eval.flip`), and PREFIX.txt, the N image
paths relative to DIR (or inside the zip), one per line, in the order of the rows.
Existing outputs are never replaced without --overwrite (checked before anything
is read).
"""

import argparse
import os
import sys
from typing import Sequence

import numpy as np

from arcjax import errors

_CHUNK = 2048  # images decoded at a time


def image_files(folder: str | os.PathLike) -> list[str]:
  """Paths of the image files under `folder`, relative to it, sorted (hidden entries skipped)."""
  from arcjax.data.images import IMAGE_SUFFIXES  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(folder):
    raise errors.DataError(f"--images {folder} is not a folder")
  found = []
  for directory, subdirs, names in os.walk(folder):
    subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
    found += [os.path.relpath(os.path.join(directory, name), folder) for name in names
              if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES]
  if not found:
    raise errors.DataError(f"no image files under {folder}")
  return sorted(found)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m arcjax.embed",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="the trained run's workdir")
  parser.add_argument("--images", required=True,
                      help="a folder of images (searched recursively), or a .zip of one")
  parser.add_argument("--out", required=True, help="output prefix: writes PREFIX.npy, PREFIX.txt")
  parser.add_argument("--step", type=int, help="the checkpoint to use (default: the latest)")
  parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
  parser.add_argument("--traceback", action="store_true", help="show tracebacks of errors")
  args = parser.parse_args(argv)
  with errors.report_errors(traceback=args.traceback):
    outputs = [args.out + ".npy", args.out + ".txt"]
    existing = [path for path in outputs if os.path.exists(path)]
    if existing and not args.overwrite:
      raise errors.DataError(f"{' and '.join(existing)} exist already: --overwrite replaces them, "
                             "or choose another --out")
    import tqdm  # pylint: disable=import-outside-toplevel
    from arcjax import inference  # pylint: disable=import-outside-toplevel
    from arcjax.data.folders import unpacked  # pylint: disable=import-outside-toplevel
    run = inference.load_run(args.workdir, args.step)
    with unpacked(args.images) as folder:
      files = image_files(folder)
      chunks = [run.embed([os.path.join(folder, f) for f in files[start:start + _CHUNK]])
                for start in tqdm.trange(0, len(files), _CHUNK, unit="chunk", desc="embedding")]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.save(args.out + ".npy", np.concatenate(chunks))
    with open(args.out + ".txt", "w", encoding="utf-8") as f:
      f.writelines(name + "\n" for name in files)
    print(f"{len(files)} embeddings of dimension {chunks[0].shape[1]} (step {run.step}): "
          f"{args.out}.npy, file list {args.out}.txt")
  return 0


if __name__ == "__main__":
  sys.exit(main())

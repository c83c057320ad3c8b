"""Prepares your own aligned faces for training: `python -m arcjax.data.convert`.

  python -m arcjax.data.convert IMAGE_FOLDER OUT_DIR --size 112 [--fit pad|resize|crop]
      [--holdout-identities N] [--bin-name holdout] [--max-pairs 6000] [--seed 0]
      [--format jpeg|png|keep] [--overwrite] [--traceback]

IMAGE_FOLDER holds one sub-folder of images per identity, as
`folders.ImageFolderSource` reads it (a .zip of such a folder is unpacked first). OUT_DIR gets

  train.rec, train.idx, property  the training identities, insightface's RecordIO
                                  (`data.name='recordio'`, `data.path=OUT_DIR`)
  train.identities.txt            line c: the folder name of training label c
  <bin-name>.bin                  verification pairs of the held-out identities,
                                  insightface's *.bin, found beside train.rec
  <bin-name>.labels.npy           int64 (2N,): the held-out identity of each of the
                                  .bin's 2N images, in its order (`pairs.read_bin_labels`)
  <bin-name>.identities.txt       line k: the folder name of held-out identity k

The held-out identities (`--holdout-identities`; by default `default_holdout`:
about 20 %) are disjoint from the training ones. Both are numbered in sorted
order of their folder names. The split and the pairs are the ones `data.name=
'folder'` draws on the same folder with `num_holdout_identities=N`,
`pairs_seed=--seed` and `max_pairs=--max-pairs` (`sources.open_set_split`,
then `pairs.make_verification_pairs`). Images of another size than `--size`
are brought to it by `--fit` (geometry: `images.fit_geometry`). The outputs
appear together once all are written; existing ones are never replaced
without `--overwrite`.
"""

import argparse
import dataclasses
import pathlib
import shlex
import sys
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import tqdm

from arcjax import errors
from arcjax.data import pairs
from arcjax.data import recordio
from arcjax.data.folders import ImageFolderSource, unpacked
from arcjax.data.images import FITS, fit_file
from arcjax.data.sources import Subset, open_set_split

# --format: the PIL format to re-encode every image as; 'keep' (None) keeps each file's bytes
# where the image has the size already (a fitted image is stored as PNG).
FORMATS = {"jpeg": "JPEG", "png": "PNG", "keep": None}
TRAIN_NAMES_FILE = "train.identities.txt"


@dataclasses.dataclass(frozen=True)
class Written:
  """What `convert` wrote: counts, and the paths (None where nothing was held out)."""
  out_dir: pathlib.Path
  image_size: tuple[int, int]
  num_train_identities: int
  num_train_images: int
  num_holdout_identities: int
  num_holdout_images: int  # distinct images of the held-out identities in the pairs
  num_pairs: int
  num_same_pairs: int
  bin_path: pathlib.Path | None


def parse_size(text: str) -> tuple[int, int]:
  """`'112'` → (112, 112); `'112x96'` → (112, 96): `(H, W)` in pixels."""
  parts = text.lower().split("x")
  try:
    size = tuple(int(part) for part in parts)
  except ValueError:
    size = ()
  if len(size) == 1:
    size = size * 2
  if len(size) != 2 or min(size) < 1:
    raise ValueError(f"size {text!r} must be a positive side S or HxW (e.g. 112 or 112x96)")
  return size


def default_holdout(num_identities: int) -> int:
  """The default number of held-out identities: 20 % of `num_identities`, rounded half up.

  At least 2 (different-identity pairs need two) and at most `num_identities − 1`
  (training needs one); 0 when that leaves fewer than 2 (3 identities or fewer).
  E.g. 40 → 8, 10 → 2, 3 → 0.
  """
  count = min(max(2, (num_identities + 2) // 5), num_identities - 1)
  return count if count >= 2 else 0


def output_names(bin_name: str) -> list[str]:
  """The files `convert` writes in OUT_DIR (the .bin's three whether or not it holds out any)."""
  return ["train.rec", "train.idx", "property", TRAIN_NAMES_FILE, f"{bin_name}.bin",
          pathlib.Path(pairs.bin_labels_path(f"{bin_name}.bin")).name, f"{bin_name}.identities.txt"]


def _write_names(path: pathlib.Path, names: Sequence[str]) -> None:
  """`names` as UTF-8 text, one a line (line k for identity k)."""
  bad = [name for name in names if "\n" in name or "\r" in name]
  if bad:
    raise errors.DataError(f"identity folder name {bad[0]!r} holds a line break")
  path.write_text("".join(f"{name}\n" for name in names), encoding="utf-8")


def _progress(iterable, total: int, what: str):
  """`iterable` with a progress bar on stderr where that is a terminal."""
  return tqdm.tqdm(iterable, total=total, desc=what, unit=" images", disable=None, leave=False)


class _Identities(NamedTuple):
  """Some identities of an image folder: `names` (C',) sorted; `paths`, `labels` (N',) in [0, C')."""
  names: list[str]
  paths: list[pathlib.Path]
  labels: np.ndarray


def _identities(source: ImageFolderSource, indices: np.ndarray) -> _Identities:
  """The examples `indices` of `source`, relabelled in sorted-name order (as `sources.Subset`)."""
  subset = Subset(source, indices, relabel=True)
  return _Identities(names=[source.identity_names[c] for c in subset.original_labels],
                     paths=[source.paths[i] for i in subset.indices], labels=subset.labels)


def _write_train(staging: pathlib.Path, train: _Identities, image_size: tuple[int, int], fit: str,
                 image_format: str | None) -> None:
  items = recordio.folder_items(train.paths, train.labels, image_size, fit=fit,
                                image_format=image_format)
  recordio.write_recordio(staging / "train", _progress(items, len(train.paths), "train.rec"),
                          image_size)
  _write_names(staging / TRAIN_NAMES_FILE, train.names)


def _write_holdout(staging: pathlib.Path, held_out: _Identities, bin_name: str,
                   image_size: tuple[int, int], fit: str, image_format: str | None, max_pairs: int,
                   seed: int) -> tuple[int, int, int]:
  """Writes the .bin, its labels and names; returns `(images, pairs, same pairs)`."""
  try:
    pair_indices, issame = pairs.make_verification_pairs(held_out.labels, max_pairs=max_pairs,
                                                         seed=seed)
  except ValueError as error:
    raise errors.DataError(
        f"too few held-out images for verification pairs: {error}; hold out more identities "
        f"(--holdout-identities) or none (--holdout-identities 0)") from error
  used, positions = np.unique(pair_indices, return_inverse=True)
  encoded = [fit_file(held_out.paths[i], image_size, fit=fit, image_format=image_format)
             for i in _progress(used, len(used), f"{bin_name}.bin")]
  bin_path = staging / f"{bin_name}.bin"
  pairs.write_bin(bin_path, [encoded[j] for j in positions.reshape(-1)], issame)
  pairs.write_bin_labels(bin_path, held_out.labels[pair_indices.reshape(-1)], issame)
  _write_names(staging / f"{bin_name}.identities.txt", held_out.names)
  return len(used), len(issame), int(issame.sum())


def convert(image_folder: str | pathlib.Path, out_dir: str | pathlib.Path, *,
            image_size: tuple[int, int], fit: str = "pad", holdout_identities: int | None = None,
            bin_name: str = "holdout", max_pairs: int = 6000, seed: int = 0,
            image_format: str | None = "JPEG", overwrite: bool = False) -> Written:
  """Writes OUT_DIR's files (see the module docstring) from `image_folder`; returns what it wrote.

  `image_size = (H, W)` pixels; `fit` in `FITS`; `holdout_identities` None for
  `default_holdout`; `image_format` 'JPEG' (quality 95), 'PNG' or None (keep).
  Raises `errors.DataError` for a folder it cannot use (missing, undecodable
  images named by file, too few identities for pairs) and for existing outputs
  unless `overwrite`.
  """
  if fit not in FITS:
    raise errors.DataError(f"unknown fit {fit!r}; known: {', '.join(FITS)}")
  if not bin_name or "/" in bin_name or bin_name.startswith("."):
    raise errors.DataError(f"--bin-name {bin_name!r} must be a plain file name (e.g. holdout)")
  source = ImageFolderSource(image_folder)
  holdout = default_holdout(source.num_classes) if holdout_identities is None else holdout_identities
  if holdout == 1 or not 0 <= holdout < source.num_classes:
    raise errors.DataError(
        f"--holdout-identities {holdout}: hold out 0 or at least 2 identities (different-identity "
        f"pairs need two), leaving at least 1 for training; {image_folder} has {source.num_classes}")
  train_indices, holdout_indices = open_set_split(source.labels, num_holdout_identities=holdout,
                                                  seed=seed)
  train = _identities(source, train_indices)
  out_dir = pathlib.Path(out_dir).expanduser()
  holdout_counts = (0, 0, 0)
  with recordio.writing_new(out_dir, output_names(bin_name), overwrite=overwrite,
                            hint="--overwrite replaces the outputs") as staging:
    _write_train(staging, train, image_size, fit, image_format)
    if holdout:
      holdout_counts = _write_holdout(staging, _identities(source, holdout_indices), bin_name,
                                      image_size, fit, image_format, max_pairs, seed)
  return Written(out_dir=out_dir, image_size=tuple(image_size), num_train_identities=len(train.names),
                 num_train_images=len(train.paths), num_holdout_identities=holdout,
                 num_holdout_images=holdout_counts[0], num_pairs=holdout_counts[1],
                 num_same_pairs=holdout_counts[2],
                 bin_path=out_dir / f"{bin_name}.bin" if holdout else None)


def _shell_flag(flag: str, value: str) -> str:
  """`flag=value` as one shell word, in double quotes where it needs quoting and that suffices."""
  word = f"{flag}={value}"
  if shlex.quote(word) == word:
    return word
  if not set(value) & set('"$`\\!'):
    return f'{flag}="{value}"'
  return shlex.quote(word)


def training_command(written: Written) -> str:
  """The command that trains the paper's ArcFace row (IResNet-50) on what `convert` wrote
  (the trainer finds the .bin beside train.rec by itself)."""
  words = ["python -m arcjax.main --config=configs/ablations.py:arcface,setting=paper",
           _shell_flag("--config.data.path", str(written.out_dir.resolve()))]
  if written.image_size != (112, 112):
    words.append(_shell_flag("--config.data.image_size", repr(written.image_size)))
  words.append(_shell_flag("--workdir", f"runs/{written.out_dir.resolve().name or 'faces'}_arcface"))
  return " ".join(words)


def summary(written: Written) -> str:
  """What `convert` wrote, and how to train on it, as the command prints it."""
  height, width = written.image_size
  lines = [f"wrote {written.num_train_images} images of {written.num_train_identities} training "
           f"identities ({height}x{width}) to {written.out_dir / 'train.rec'} "
           f"(+ train.idx, property, {TRAIN_NAMES_FILE})"]
  if written.bin_path is None:
    lines.append("held out no identities: no verification .bin")
  else:
    stem = written.bin_path.name[:-len(".bin")]
    lines.append(f"wrote {written.num_pairs} verification pairs ({written.num_same_pairs} same, "
                 f"{written.num_pairs - written.num_same_pairs} different) of "
                 f"{written.num_holdout_images} images of {written.num_holdout_identities} held-out "
                 f"identities to {written.bin_path} (+ {stem}.labels.npy, {stem}.identities.txt)")
  lines += ["train on it (the paper's ArcFace row; add e.g. --config.train.steps=… to shorten it):",
            f"  {training_command(written)}"]
  return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m arcjax.data.convert", description=__doc__.split("\n\n")[0],
      epilog="See the module docstring (python -m pydoc arcjax.data.convert) for the files written.")
  parser.add_argument("image_folder", help="one sub-folder of images per identity (or a .zip "
                                           "of such a folder)")
  parser.add_argument("out_dir", help="where train.rec, train.idx, property and the .bin go")
  parser.add_argument("--size", type=_size_argument, required=True,
                      help="side S of the square images (insightface: 112), or HxW")
  parser.add_argument("--fit", choices=FITS, default="pad",
                      help="images of another size: pad (scale down only, keep the aspect ratio, "
                           "centre on black), resize (stretch), crop (scale to cover, centre-crop); "
                           "default pad")
  parser.add_argument("--holdout-identities", type=int, default=None, metavar="N",
                      help="identities held out for the .bin, disjoint from training; 0 writes no "
                           ".bin; default 20%% of them, rounded half up, at least 2")
  parser.add_argument("--bin-name", default="holdout", help="the .bin's name (default holdout)")
  parser.add_argument("--max-pairs", type=int, default=6000,
                      help="at most this many pairs, half same, half different (default 6000)")
  parser.add_argument("--seed", type=int, default=0, help="seeds the split and the pairs (default 0)")
  parser.add_argument("--format", choices=tuple(FORMATS), default="jpeg",
                      help="jpeg (quality 95, as insightface's files), png (lossless), or keep "
                           "each file's bytes where it has the size already (else PNG); default jpeg")
  parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
  parser.add_argument("--traceback", action="store_true", help="show the traceback of an error")
  return parser


def _size_argument(text: str) -> tuple[int, int]:
  try:
    return parse_size(text)
  except ValueError as error:
    raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; an expected failure ends as one line `error: …` and exit status 1."""
  args = _parser().parse_args(argv)
  with errors.report_errors(traceback=args.traceback), unpacked(args.image_folder) as folder:
    written = convert(folder, args.out_dir, image_size=args.size, fit=args.fit,
                      holdout_identities=args.holdout_identities, bin_name=args.bin_name,
                      max_pairs=args.max_pairs, seed=args.seed, image_format=FORMATS[args.format],
                      overwrite=args.overwrite)
  print(summary(written))
  return 0


if __name__ == "__main__":
  sys.exit(main())

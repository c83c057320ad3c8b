"""Verification pairs: insightface's `*.bin` files, and open-set pair generation.

A `*.bin` (lfw.bin, cfp_fp.bin, agedb_30.bin …) is a pickle of
`(bins, issame_list)`, mostly written by Python 2: `bins` holds 2N encoded
images (JPEG/PNG bytes) and pair i is `(bins[2i], bins[2i+1])` with
`issame_list[i]` telling whether both show the same person.

Pickles can run arbitrary code, so `read_bin` unpickles with an allow-list of
exactly what such files contain: lists/tuples/bytes/bools (no class needed),
`_codecs.encode(text, 'latin1')` and `bytes()` (how Python 3 writes non-empty
and empty bytes at protocol 2, e.g. `write_bin`'s files) and NumPy arrays and scalars (some converters store
each image as a `uint8` array from `cv2.imencode`, or `issame` as a bool array).
Everything else is refused with `UnsafePickleError`, and so is a NumPy array or
scalar larger than the file itself (a pickle can ask NumPy for any shape: 10**12
bytes would be a 931 GiB allocation before anything else is checked), an object
array whose pickled list is not exactly its size (NumPy would keep uninitialised
pointers and crash) and a dtype holding objects other than plain `object`.

Beside a `.bin`, `<name>.labels.npy` (written by `python -m arcjax.data.convert`,
read by `read_bin_labels`) may hold the identity of each of its 2N images:
`int64 (2N,)`, `labels[2i], labels[2i+1]` for pair i, so `issame[i] ==
(labels[2i] == labels[2i+1])`; identities are numbered 0…K−1 (the converter
lists their names in `<name>.identities.txt`, line k for identity k).
"""

import codecs
from collections.abc import Sequence
import math
import os
import pathlib
import pickle

from etils import epath
import numpy as np

from arcjax import errors
from arcjax.data.recordio import writing_new

# The modules a verification pickle's arrays come from (names in the file, not imports):
# NumPy 2 writes `numpy._core`, NumPy 1 and Python 2-era files `numpy.core`.
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMPY_CLASSES = frozenset((("numpy", "ndarray"), ("numpy", "dtype")))


class UnsafePickleError(pickle.UnpicklingError, errors.DataError):
  """A pickle references something other than what verification files contain."""


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
  """`_codecs.encode`, restricted to the latin-1 round trip Python 3 uses to pickle bytes."""
  if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
    raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r} is not allowed "
                            "(only latin-1, as pickled bytes use)")
  return codecs.encode(text, "latin1", errors)


def _empty_bytes(*args) -> bytes:
  """`bytes()`, restricted to no arguments (`bytes(n)` would allocate n bytes on a file's say)."""
  if args:
    raise UnsafePickleError(f"bytes{args!r} is not allowed (only bytes(), as pickled b'' uses)")
  return b""


def _check_array(shape, dtype, max_bytes: int) -> int:
  """The element count of an array of `shape` and `dtype`; refuses one NumPy should not build.

  Refused: more than `max_bytes` (checked before NumPy allocates it), and dtypes
  holding objects other than plain `object` (a structured one, or a dtype whose
  pickled flags claim objects), whose memory NumPy would read as pointers.
  """
  dims = shape if isinstance(shape, (tuple, list)) else (shape,)
  if not all(isinstance(d, (int, np.integer)) and d >= 0 for d in dims):
    raise UnsafePickleError(f"array shape {shape!r} is not a tuple of sizes")
  if not isinstance(dtype, np.dtype):
    dtype = np.dtype(dtype)
  if dtype.hasobject and dtype != np.dtype(object):
    raise UnsafePickleError(f"dtype {dtype!r} holding objects is not allowed (only plain object)")
  count = math.prod(int(d) for d in dims)
  if count * dtype.itemsize > max_bytes:
    raise UnsafePickleError(f"an array of shape {tuple(int(d) for d in dims)} and dtype {dtype} "
                            f"({count * dtype.itemsize} bytes) is larger than the {max_bytes}-byte "
                            "file could hold")
  return count


class _BoundedArray(np.ndarray):
  """An ndarray under unpickling whose `__setstate__` (pickle's BUILD) is checked first.

  NumPy allocates the state's shape before it compares it with the pickled
  data, and fills an object array from a shorter list leaving the rest as
  uninitialised pointers (a crash, in NumPy 2.4). So the shape must fit the
  file, and an object array's list must have exactly its element count.
  `max_bytes` is set per array by the unpickler (the class's 0 refuses every
  non-empty array).
  """
  max_bytes = 0

  def __setstate__(self, state):
    # (version, shape, dtype, is_fortran, data), or the same without version.
    if not isinstance(state, tuple) or len(state) not in (4, 5):
      raise UnsafePickleError(f"unexpected ndarray state of {type(state).__name__}")
    shape, dtype, _, data = state[-4:]
    count = _check_array(shape, dtype, self.max_bytes)
    if np.dtype(dtype).hasobject and not (isinstance(data, list) and len(data) == count):
      raise UnsafePickleError(f"an object array of {count} elements needs a list of {count}; got "
                              f"{type(data).__name__} of {len(data) if isinstance(data, list) else '?'}")
    super().__setstate__(state)


class _RestrictedUnpickler(pickle.Unpickler):
  """The allow-list of the module docstring; NumPy arrays and scalars at most `max_bytes` each."""

  def __init__(self, file, *, max_bytes: int, **kwargs):
    super().__init__(file, **kwargs)
    self.max_bytes = max_bytes

  def _bounded_reconstruct(self, reconstruct):
    """NumPy's `_reconstruct(ndarray, shape, dtype)`, which allocates `shape`, checked first."""

    def checked(subtype, shape, dtype):
      if subtype is not np.ndarray:
        raise UnsafePickleError(f"_reconstruct of {subtype!r} is not allowed (only numpy.ndarray)")
      _check_array(shape, dtype, self.max_bytes)
      array = reconstruct(_BoundedArray, shape, dtype)
      array.max_bytes = self.max_bytes
      return array

    return checked

  def _bounded_scalar(self, scalar):
    """NumPy's `scalar(dtype, data)`, its dtype checked as an array's (`_check_array`)."""

    def checked(dtype, *args):
      if not isinstance(dtype, np.dtype):
        raise UnsafePickleError(f"scalar of {type(dtype).__name__} is not allowed (only a numpy dtype)")
      _check_array((), dtype, self.max_bytes)
      return scalar(dtype, *args)

    return checked

  def find_class(self, module: str, name: str):
    if (module, name) == ("_codecs", "encode"):
      return _latin1_encode
    if (module, name) in (("__builtin__", "bytes"), ("builtins", "bytes")):
      return _empty_bytes
    if module in _NUMPY_MODULES and name == "_reconstruct":
      return self._bounded_reconstruct(super().find_class(module, name))
    if module in _NUMPY_MODULES and name == "scalar":
      return self._bounded_scalar(super().find_class(module, name))
    if (module, name) in _NUMPY_CLASSES:
      return super().find_class(module, name)
    raise UnsafePickleError(f"refusing to unpickle {module}.{name}: a verification .bin holds "
                            "only image bytes and booleans")


def _as_bytes(item, path, index: int) -> bytes:
  if isinstance(item, (bytes, bytearray)):
    return bytes(item)
  if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
    return item.tobytes()
  what = type(item).__name__
  if isinstance(item, np.ndarray):
    what = f"a {item.dtype} array of shape {item.shape}"
  raise errors.DataError(f"{path}: bins[{index}] is {what}, not image bytes")


def read_bin(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
  """Reads a verification `*.bin`: `(bins: 2N encoded images, issame: (N,) bool)`.

  `path`: anything `etils.epath` opens (a local file, gs://…). Pair i is
  `(bins[2i], bins[2i+1])`. Raises `UnsafePickleError` for a pickle that
  references anything beyond the allow-list or asks for an array larger than
  the file (see the module docstring), and `errors.DataError` (a `ValueError`)
  naming the file for a pickle of the wrong shape.
  """
  with epath.Path(path).open("rb") as f:
    f.seek(0, os.SEEK_END)
    file_size = f.tell()
    f.seek(0)
    try:
      # encoding='bytes': Python 2 `str` image data must come back as bytes, not text.
      content = _RestrictedUnpickler(f, max_bytes=file_size, encoding="bytes").load()
    except UnsafePickleError as error:
      raise UnsafePickleError(f"{path}: {error}") from error
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
      raise errors.DataError(f"{path}: not a verification .bin pickle ({error})") from error
  if not isinstance(content, (tuple, list)) or len(content) != 2:
    raise errors.DataError(f"{path}: expected a pickled (bins, issame_list); got "
                           f"{type(content).__name__}")
  bins, issame = content
  bins = [_as_bytes(item, path, i) for i, item in enumerate(bins)]
  issame = np.asarray(issame)  # a plain ndarray, also of an unpickled _BoundedArray
  if issame.ndim != 1 or issame.dtype != bool:
    raise errors.DataError(f"{path}: issame_list must be a list of bools; got {issame.dtype} "
                           f"{issame.shape}")
  if len(bins) != 2 * len(issame):
    raise errors.DataError(f"{path}: {len(bins)} images for {len(issame)} pairs (need 2 per pair)")
  return bins, issame


def write_bin(path: str | os.PathLike, bins: Sequence[bytes], issame: Sequence[bool] | np.ndarray, *,
              overwrite: bool = False) -> None:
  """Writes `(bins: 2N encoded images, issame: (N,) bool)` as insightface's `*.bin`.

  Pickle protocol 2 of plain lists of bytes and bools, so Python 2-era readers
  (and `read_bin`) load it. Refuses (`errors.DataError`) to replace an existing
  file unless `overwrite`; the file appears whole (`recordio.writing_new`).
  """
  issame = np.asarray(issame)
  if issame.ndim != 1 or issame.dtype != bool:
    raise errors.DataError(f"issame must be (N,) bool; got {issame.dtype} {issame.shape}")
  if len(bins) != 2 * len(issame):
    raise errors.DataError(f"{len(bins)} images for {len(issame)} pairs (need 2 per pair)")
  bad = [i for i, item in enumerate(bins) if not isinstance(item, (bytes, bytearray))]
  if bad:
    raise errors.DataError(f"bins[{bad[0]}] is {type(bins[bad[0]]).__name__}, not encoded image bytes")
  path = pathlib.Path(path)
  with writing_new(path.parent, [path.name], overwrite=overwrite) as staging, \
       open(staging / path.name, "wb") as f:
    pickle.dump(([bytes(item) for item in bins], [bool(x) for x in issame]), f, protocol=2)


def bin_labels_path(bin_path: str | os.PathLike) -> epath.Path:
  """Where the labels of `bin_path`'s images lie: `NAME.labels.npy` for `NAME.bin`."""
  bin_path = epath.Path(bin_path)
  stem = bin_path.name[:-len(".bin")] if bin_path.name.endswith(".bin") else bin_path.name
  return bin_path.parent / f"{stem}.labels.npy"


def _checked_labels(labels: np.ndarray, issame: np.ndarray, what: str) -> np.ndarray:
  """`labels` as `(2N,) int64` if it is the identities of `issame`'s N pairs; else `errors.DataError`."""
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise errors.DataError(f"{what}: labels must be (2N,) integers; got {labels.dtype} {labels.shape}")
  if labels.shape != (2 * len(issame),):
    raise errors.DataError(f"{what}: {len(labels)} labels for the {2 * len(issame)} images of "
                           f"{len(issame)} pairs")
  if len(labels) and labels.min() < 0:
    raise errors.DataError(f"{what}: label {labels.min()} is negative")
  disagree = np.flatnonzero((labels[0::2] == labels[1::2]) != issame)
  if len(disagree):
    i = disagree[0]
    raise errors.DataError(f"{what}: pair {i} has labels {labels[2 * i]}, {labels[2 * i + 1]} but "
                           f"issame {bool(issame[i])}")
  return labels.astype(np.int64)


def write_bin_labels(bin_path: str | os.PathLike, labels: np.ndarray, issame: np.ndarray, *,
                     overwrite: bool = False) -> None:
  """Writes `labels: (2N,) int`, the identity of each image of `bin_path`, as `bin_labels_path`.

  `issame: (N,) bool` are the .bin's pairs, checked against the labels (same
  label ⇔ same identity). Refuses an existing file unless `overwrite`.
  """
  path = pathlib.Path(bin_labels_path(bin_path))
  labels = _checked_labels(np.asarray(labels), np.asarray(issame, bool), str(path))
  with writing_new(path.parent, [path.name], overwrite=overwrite) as staging:
    np.save(staging / path.name, labels, allow_pickle=False)


def read_bin_labels(bin_path: str | os.PathLike) -> np.ndarray | None:
  """The identities of `bin_path`'s 2N images, `(2N,) int64`; None when no labels file lies beside it.

  Reads `bin_labels_path(bin_path)` (any `etils.epath` path; a plain `.npy`,
  never a pickle) and the .bin itself, and checks that there is one label per
  image and that pair i's two labels are equal exactly where `issame[i]`;
  raises `errors.DataError` naming the labels file otherwise.
  """
  path = bin_labels_path(bin_path)
  if not path.exists():
    return None
  with path.open("rb") as f:
    try:
      labels = np.load(f, allow_pickle=False)
    except (ValueError, EOFError) as error:
      raise errors.DataError(f"{path}: not a .npy array of labels ({error})") from error
  if not isinstance(labels, np.ndarray):
    raise errors.DataError(f"{path}: not a .npy array of labels")
  _, issame = read_bin(bin_path)
  return _checked_labels(labels, issame, str(path))


def _decode_pairs(ranks: np.ndarray, counts: np.ndarray, first_partner: np.ndarray) -> np.ndarray:
  """Maps ranks of pairs to `(P, 2)` positions.

  The pairs are enumerated first-element-major: position i has `counts[i]`
  partners `first_partner[i], first_partner[i] + 1, …`.
  """
  starts = np.cumsum(counts) - counts
  first = np.searchsorted(starts, ranks, side="right") - 1
  # Positions with no partners share their start with the next one; searchsorted
  # 'right' picks the last of equal starts, which is the one that has partners.
  return np.stack([first, first_partner[first] + (ranks - starts[first])], axis=1)


def make_verification_pairs(labels: np.ndarray, *, num_folds: int = 10, max_pairs: int = 6000,
                            seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic LFW-style verification pairs of the examples with `labels: (N,)` ints.

  Rule: `k = min(max_pairs // (2·num_folds), S // num_folds, D // num_folds)`
  where S and D count the distinct unordered same-identity and
  different-identity pairs the data has. Draws `num_folds·k` distinct same pairs
  and as many distinct different pairs, each uniformly without replacement from
  all such pairs (so no pair repeats, and identities with more images give more
  same pairs), seeded by `seed`. Fold f is the contiguous block
  `[2kf, 2k(f+1))`: its k same pairs, then its k different pairs (LFW's
  pairs.txt order), so a contiguous 10-fold split sees balanced folds. Folds
  share identities (unlike LFW's view 2): held-out sets are often too small to
  split by identity.

  Returns `(pairs: (P, 2) int64 indices into labels, issame: (P,) bool)`,
  `P = 2·num_folds·k ≤ max_pairs`. Raises `ValueError` when not even one same
  and one different pair per fold exist.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be (N,) integers; got {labels.dtype} {labels.shape}")
  if num_folds < 1:
    raise ValueError(f"num_folds={num_folds} must be at least 1")
  if max_pairs < 2 * num_folds:
    raise ValueError(f"max_pairs={max_pairs} leaves no room for one same and one different pair "
                     f"in each of {num_folds} folds (need at least {2 * num_folds})")
  identities, sizes = np.unique(labels, return_counts=True)
  if len(identities) < 2:
    raise ValueError(f"need at least 2 identities for different-identity pairs; labels have "
                     f"{len(identities)}")
  # Positions in label-sorted order; group_end[i] is one past the last position of i's identity.
  order = np.argsort(labels, kind="stable")
  group_end = np.repeat(np.cumsum(sizes), sizes)
  positions = np.arange(len(labels))
  same_counts = group_end - positions - 1  # partners after i in its own identity
  diff_counts = len(labels) - group_end    # partners in later identities
  num_same, num_diff = int(same_counts.sum()), int(diff_counts.sum())
  per_fold = min(max_pairs // (2 * num_folds), num_same // num_folds, num_diff // num_folds)
  if per_fold == 0:
    raise ValueError(f"{len(labels)} examples of {len(identities)} identities give {num_same} "
                     f"same-identity and {num_diff} different-identity pairs: fewer than one of "
                     f"each per fold for {num_folds} folds")
  rng = np.random.default_rng(seed)
  total = num_folds * per_fold
  same = _decode_pairs(rng.choice(num_same, total, replace=False), same_counts, positions + 1)
  diff = _decode_pairs(rng.choice(num_diff, total, replace=False), diff_counts, group_end)
  pairs = np.concatenate([same.reshape(num_folds, per_fold, 2), diff.reshape(num_folds, per_fold, 2)],
                         axis=1).reshape(-1, 2)
  issame = np.tile(np.repeat([True, False], per_fold), num_folds)
  return order[pairs].astype(np.int64), issame

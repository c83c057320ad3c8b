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
Everything else is refused with `UnsafePickleError`.
"""

import codecs
from collections.abc import Sequence
import os
import pickle

import numpy as np

# (module, name) pairs a verification pickle may reference. NumPy 2 writes
# `numpy._core`, NumPy 1 and Python 2-era files `numpy.core`.
_NUMPY_GLOBALS = frozenset(
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")) | {("numpy", "ndarray"), ("numpy", "dtype")}


class UnsafePickleError(pickle.UnpicklingError):
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


class _RestrictedUnpickler(pickle.Unpickler):

  def find_class(self, module: str, name: str):
    if (module, name) == ("_codecs", "encode"):
      return _latin1_encode
    if (module, name) in (("__builtin__", "bytes"), ("builtins", "bytes")):
      return _empty_bytes
    if (module, name) in _NUMPY_GLOBALS:
      return super().find_class(module, name)
    raise UnsafePickleError(f"refusing to unpickle {module}.{name}: a verification .bin holds "
                            "only image bytes and booleans")


def _as_bytes(item, path, index: int) -> bytes:
  if isinstance(item, (bytes, bytearray)):
    return bytes(item)
  if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
    return item.tobytes()
  raise ValueError(f"{path}: bins[{index}] is {type(item).__name__}, not image bytes")


def read_bin(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
  """Reads a verification `*.bin`: `(bins: 2N encoded images, issame: (N,) bool)`.

  Pair i is `(bins[2i], bins[2i+1])`. Raises `UnsafePickleError` for a pickle
  that references anything beyond the allow-list (see the module docstring) and
  `ValueError` naming the file for a pickle of the wrong shape.
  """
  with open(path, "rb") as f:
    try:
      # encoding='bytes': Python 2 `str` image data must come back as bytes, not text.
      content = _RestrictedUnpickler(f, encoding="bytes").load()
    except UnsafePickleError as error:
      raise UnsafePickleError(f"{path}: {error}") from error
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
      raise ValueError(f"{path}: not a verification .bin pickle ({error})") from error
  if not isinstance(content, (tuple, list)) or len(content) != 2:
    raise ValueError(f"{path}: expected a pickled (bins, issame_list); got {type(content).__name__}")
  bins, issame = content
  bins = [_as_bytes(item, path, i) for i, item in enumerate(bins)]
  issame = np.asarray(issame)
  if issame.ndim != 1 or issame.dtype != bool:
    raise ValueError(f"{path}: issame_list must be a list of bools; got {issame.dtype} {issame.shape}")
  if len(bins) != 2 * len(issame):
    raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs (need 2 per pair)")
  return bins, issame


def write_bin(path: str | os.PathLike, bins: Sequence[bytes], issame: Sequence[bool] | np.ndarray) -> None:
  """Writes `(bins: 2N encoded images, issame: (N,) bool)` as insightface's `*.bin`.

  Pickle protocol 2 of plain lists of bytes and bools, so Python 2-era readers
  (and `read_bin`) load it.
  """
  issame = np.asarray(issame)
  if issame.ndim != 1 or issame.dtype != bool:
    raise ValueError(f"issame must be (N,) bool; got {issame.dtype} {issame.shape}")
  if len(bins) != 2 * len(issame):
    raise ValueError(f"{len(bins)} images for {len(issame)} pairs (need 2 per pair)")
  bad = [i for i, item in enumerate(bins) if not isinstance(item, (bytes, bytearray))]
  if bad:
    raise ValueError(f"bins[{bad[0]}] is {type(bins[bad[0]]).__name__}, not encoded image bytes")
  with open(path, "wb") as f:
    pickle.dump(([bytes(item) for item in bins], [bool(x) for x in issame]), f, protocol=2)


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

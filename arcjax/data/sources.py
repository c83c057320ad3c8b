"""Random-access image sources and the open-set (identity-disjoint) split.

A *source* is what the pipeline reads. It has
  `len(source)`, `source[i] -> (image uint8 (H, W, C), label int)` (decoded),
  `source.labels: (N,) int64` (no decoding needed) and `source.num_classes: int`,
with labels in [0, num_classes). A source that reads faster in bulk (ArrayRecord)
may also have `source.__getitems__(indices) -> list of (image, label)` (the
convention of grain and PyTorch); `read_many` uses it where present.
`ArraySource` holds arrays in memory; `Subset` restricts any source to some
indices (and relabels them, for the open-set split).
"""

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from arcjax.data.images import decode_image, resize_image


class Source(Protocol):
  """The source contract (see the module docstring)."""
  labels: np.ndarray
  num_classes: int

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    ...


def read_many(source: Source, indices: Sequence[int]) -> list[tuple[np.ndarray, int]]:
  """`[source[i] for i in indices]`, through `source.__getitems__` where the source has one."""
  indices = [int(i) for i in indices]
  if hasattr(source, "__getitems__"):
    return list(source.__getitems__(indices))
  return [source[i] for i in indices]


class ArraySource:
  """An in-memory source: `images: (N, H, W, C) uint8`, `labels: (N,)` ints.

  `num_classes` defaults to `labels.max() + 1`; `identity_names[c]`, if given,
  names label c.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int | None = None,
               identity_names: list[str] | None = None):
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4:
      raise ValueError(f"images must be uint8 (N, H, W, C); got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(
          f"labels must be integers of shape ({images.shape[0]},); got {labels.dtype} {labels.shape}")
    self.images = images
    self.labels = labels.astype(np.int64)
    self.num_classes = int(num_classes if num_classes is not None else
                           (self.labels.max() + 1 if len(self.labels) else 0))
    self.identity_names = identity_names

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    return self.images[index], int(self.labels[index])

  def resized(self, size: tuple[int, int]) -> "ArraySource":
    """This source with every image resized to `size = (H, W)` (`resize_image`), once: the
    images the pipeline would resize batch by batch, every epoch, for every run."""
    if self.images.shape[1:3] == tuple(size):
      return self
    images = np.stack([resize_image(image, size) for image in self.images])
    return ArraySource(images, self.labels, self.num_classes, self.identity_names)


class Subset:
  """The examples `indices` of `source`, in that order.

  With `relabel=True` the labels that occur are mapped to [0, C') in increasing
  order of the original label (so the map is deterministic), and `num_classes`
  is C'; otherwise labels and `num_classes` are the source's. `original_labels`
  (C',) gives the source label of each new one.
  """

  def __init__(self, source: Source, indices: Sequence[int] | np.ndarray, relabel: bool = True):
    indices = np.asarray(indices, dtype=np.int64)
    if indices.ndim != 1:
      raise ValueError(f"indices must be 1-D; got shape {indices.shape}")
    if len(indices) and (indices.min() < 0 or indices.max() >= len(source)):
      bad = indices[(indices < 0) | (indices >= len(source))][0]
      raise ValueError(f"index {bad} out of range for a source of {len(source)} examples")
    self.source = source
    self.indices = indices
    source_labels = np.asarray(source.labels, dtype=np.int64)[indices]
    if relabel:
      self.original_labels, self.labels = np.unique(source_labels, return_inverse=True)
      self.labels = self.labels.astype(np.int64)
      self.num_classes = len(self.original_labels)
      # Dense lookup from source label to new label; -1 for labels not in the subset.
      self._label_map = np.full(int(source.num_classes), -1, np.int64)
      self._label_map[self.original_labels] = np.arange(self.num_classes)
    else:
      self.original_labels = np.arange(int(source.num_classes))
      self.labels = source_labels
      self.num_classes = int(source.num_classes)
      self._label_map = None

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    return self.__getitems__([index])[0]

  def __getitems__(self, indices: Sequence[int]) -> list[tuple[np.ndarray, int]]:
    examples = read_many(self.source, self.indices[np.asarray(indices, np.int64)])
    if self._label_map is None:
      return examples
    return [(image, int(self._label_map[label])) for image, label in examples]


def open_set_split(labels: np.ndarray, *, num_holdout_identities: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Identity-disjoint split of `labels: (N,)` into training and held-out examples.

  `num_holdout_identities` of the identities present (chosen uniformly by
  `seed`) are held out. Returns `(train_indices, holdout_indices)`, both sorted
  int64, which partition [0, N).
  """
  labels = np.asarray(labels)
  identities = np.unique(labels)
  if not 0 <= num_holdout_identities < len(identities):
    raise ValueError(
        f"num_holdout_identities={num_holdout_identities} must be in [0, {len(identities)}): "
        f"the data has {len(identities)} identities and training needs at least one")
  rng = np.random.default_rng(seed)
  held_out = rng.choice(identities, size=num_holdout_identities, replace=False)
  is_held_out = np.isin(labels, held_out)
  return np.flatnonzero(~is_held_out), np.flatnonzero(is_held_out)


class EncodedImages:
  """A source over encoded image bytes (e.g. a verification .bin's images); every label 0.

  `name` (the file they came from) prefixes a decoding error.
  """

  def __init__(self, encoded: Sequence[bytes], name: str = "images"):
    self._encoded, self._name = encoded, name
    self.labels = np.zeros(len(encoded), np.int64)
    self.num_classes = 1

  def __len__(self) -> int:
    return len(self._encoded)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    try:
      return decode_image(self._encoded[index]), 0
    except ValueError as error:
      raise ValueError(f"{self._name}: image {index}: {error}") from error

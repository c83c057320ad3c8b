"""Datasets for arcjax: training identities and open-set verification pairs from a config.

`get_datasets(config.data)` gives the training source (training identities
only, labels in [0, C_train)) and the evaluation pair sets: 'holdout' (pairs of
the held-out identities, disjoint from training) and one per `eval_bins` file.
Batches come from `arcjax.data.pipeline.batches(datasets.train, ...)`.
"""

import dataclasses
import pathlib
from typing import Any, NamedTuple

import numpy as np

from arcjax.data import tfds_builder
from arcjax.data.default import default_name
from arcjax.data.folders import ImageFolderSource, decode_image
from arcjax.data.pairs import make_verification_pairs, read_bin
from arcjax.data.pipeline import load_images
from arcjax.data.recordio import RecordIOSource
from arcjax.data.sources import Source, Subset, open_set_split

DATA_NAMES = ("default", "folder", "recordio")


class PairSet(NamedTuple):
  """Verification pairs: `images1, images2: (P, H, W, C) uint8`, `issame: (P,) bool`."""
  images1: np.ndarray
  images2: np.ndarray
  issame: np.ndarray


@dataclasses.dataclass(frozen=True)
class Datasets:
  """`train`: a source of the training identities, labels in [0, num_classes); `eval_sets` by name.

  `holdout`: the held-out identities' images in the pairs, `(images (M, H, W, C)
  uint8, labels (M,) int)`, for the angle statistics on unseen identities; None
  when nothing is held out.
  """
  train: Source
  num_classes: int
  eval_sets: dict[str, PairSet]
  holdout: tuple[np.ndarray, np.ndarray] | None = None


class _EncodedImages:
  """A source over encoded image bytes (a *.bin file's images); every label 0."""

  def __init__(self, encoded: list[bytes]):
    self._encoded = encoded
    self.labels = np.zeros(len(encoded), np.int64)
    self.num_classes = 1

  def __len__(self) -> int:
    return len(self._encoded)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    return decode_image(self._encoded[index]), 0


def _existing(path: Any, what: str) -> pathlib.Path:
  if not path:
    raise ValueError(f"config.data.path must name the {what}")
  path = pathlib.Path(path).expanduser()
  if not path.exists():
    raise FileNotFoundError(f"{what} {path} does not exist")
  return path


def _source(data_config: Any) -> Source:
  name = data_config.name
  if name == "default":
    return tfds_builder.load(default_name(), data_dir=data_config.get("data_dir") or None)
  if name == "folder":
    return ImageFolderSource(_existing(data_config.get("path"), "image folder"))
  if name == "recordio":
    return RecordIOSource(_existing(data_config.get("path"), "RecordIO file"))
  raise ValueError(f"unknown data name {name!r}; known: {', '.join(DATA_NAMES)}")


def _pair_set(images: np.ndarray, pairs: np.ndarray, issame: np.ndarray) -> PairSet:
  return PairSet(images[pairs[:, 0]], images[pairs[:, 1]], np.asarray(issame, bool))


def get_datasets(data_config: Any) -> Datasets:
  """Sources and evaluation sets named by `data_config` (`config.data`).

  Reads `name` ('default' | 'folder' | 'recordio'), `path`, `image_size`
  ((H, W) or None for the source's size), `num_holdout_identities`,
  `pairs_seed` (seeds both the split and the pairs), `max_pairs`, `data_dir`
  (the TFDS cache of 'default') and `eval_bins` (paths of *.bin files; each
  becomes an eval set named after the file's stem).
  """
  source = _source(data_config)
  image_size = data_config.get("image_size")
  image_size = None if image_size is None else tuple(image_size)
  num_holdout = int(data_config.num_holdout_identities)
  num_identities = len(np.unique(source.labels))
  if num_holdout == 1 or num_holdout >= num_identities:
    raise ValueError(
        f"num_holdout_identities={num_holdout}: the holdout needs 0 or at least 2 identities "
        f"(for different-identity pairs) and training at least 1; the data has {num_identities}")
  train_indices, holdout_indices = open_set_split(
      source.labels, num_holdout_identities=num_holdout, seed=data_config.pairs_seed)
  train = Subset(source, train_indices, relabel=True)

  eval_sets, holdout = {}, None
  if num_holdout:
    pairs, issame = make_verification_pairs(
        source.labels[holdout_indices], seed=data_config.pairs_seed, max_pairs=data_config.max_pairs)
    used, pairs = np.unique(pairs, return_inverse=True)
    images = load_images(source, holdout_indices[used], image_size=image_size)
    eval_sets["holdout"] = _pair_set(images, pairs.reshape(-1, 2), issame)
    holdout = (images, source.labels[holdout_indices[used]])
  for path in data_config.get("eval_bins") or ():
    path = _existing(path, "verification .bin file")
    encoded, issame = read_bin(path)
    images = load_images(_EncodedImages(list(encoded)), np.arange(len(encoded)), image_size=image_size)
    eval_sets[path.stem] = _pair_set(images, np.arange(len(encoded)).reshape(-1, 2), issame)
  return Datasets(train=train, num_classes=train.num_classes, eval_sets=eval_sets,
                  holdout=holdout)

"""A tensorflow-datasets builder for arcjax's image sources, read without TensorFlow.

`ArcjaxImages` (registered with tfds as 'arcjax_images' when this module is
imported) writes one 'train' split of uint8 images and int64 labels from local
files, with no download:

  - config 'fashion_mnist': Debian's Fashion-MNIST (`arcjax.data.default`);
  - config 'digits': scikit-learn's digits;
  - `folder_config(path)`: an image folder (one sub-folder per identity), named
    after the folder and a fingerprint of its file list, so a changed folder
    gets a fresh cache.

Why this path needs no TensorFlow: the features are `tfds.features.Tensor`
(uint8 image, int64 label) rather than `tfds.features.Image` (whose PNG
encoding needs TF), the file format is ArrayRecord rather than TFRecord, and the
data is read random-access with `builder.as_data_source()` /
`tfds.data_source(...)` rather than `tfds.load` / `as_dataset` (tf.data). The
labels are also kept in the dataset's `metadata.json`, so `TfdsSource.labels`
needs no pass over the records. The build is cached under `data_dir` (tfds'
default `~/tensorflow_datasets` when None); later calls reuse it.

Examples are stored grouped by identity, in the source's order within each one
(`identity_order(labels)`, and `disable_shuffling`), as insightface's `.rec`
files store them: a `.rec` written from the split in its order holds the same
example i, so training on either gives the same numbers.
"""

from collections.abc import Sequence
import dataclasses
import hashlib
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from arcjax.data import default
from arcjax.data.folders import ImageFolderSource
from arcjax.data.sources import Source

FILE_FORMAT = "array_record"


@dataclasses.dataclass(eq=False)
class ArcjaxImagesConfig(tfds.core.BuilderConfig):
  """A config of `ArcjaxImages`: a default dataset by name, or an image folder at `path`."""
  path: str | None = None


def folder_config(path: str | os.PathLike) -> ArcjaxImagesConfig:
  """The config for the image folder at `path`: 'folder_<name>_<fingerprint of its files>'."""
  root = pathlib.Path(path).resolve()
  if not root.is_dir():
    raise FileNotFoundError(f"image folder {root} does not exist")
  digest = hashlib.sha256(str(root).encode())
  for directory, subdirs, files in sorted(os.walk(root)):
    subdirs.sort()
    for name in sorted(files):
      file = pathlib.Path(directory, name)
      digest.update(f"{file.relative_to(root)}\0{file.stat().st_size}\0".encode())
  return ArcjaxImagesConfig(name=f"folder_{root.name}_{digest.hexdigest()[:12]}", path=str(root),
                            description=f"image folder {root}")


def identity_order(labels: np.ndarray) -> np.ndarray:
  """Indices that group the examples by label, keeping their order within a label."""
  return np.argsort(np.asarray(labels), kind="stable")


class ArcjaxImages(tfds.core.GeneratorBasedBuilder):
  """uint8 images `(H, W, C)` with int64 identity labels; one 'train' split."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.", "1.1.0": "Examples grouped by identity."}
  BUILDER_CONFIGS = [
      ArcjaxImagesConfig(name="fashion_mnist", description="Debian's Fashion-MNIST, 70 000 × 28×28×1"),
      ArcjaxImagesConfig(name="digits", description="scikit-learn's digits, 1 797 × 8×8×1"),
  ]

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", FILE_FORMAT)
    super().__init__(**kwargs)

  def _raw_source(self) -> Source:
    if self.builder_config.path is not None:
      return ImageFolderSource(self.builder_config.path)
    return default.LOADERS[self.builder_config.name]()

  def _info(self) -> tfds.core.DatasetInfo:
    if self.builder_config.path is not None:
      shape = np.asarray(ImageFolderSource(self.builder_config.path)[0][0]).shape
    else:
      shape = {"fashion_mnist": (28, 28, 1), "digits": (8, 8, 1)}[self.builder_config.name]
    return tfds.core.DatasetInfo(
        builder=self,
        description="Identity-labelled images for arcjax (classes are identities).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=shape, dtype=np.uint8),
            "label": tfds.features.Tensor(shape=(), dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is local
    source = self._raw_source()
    order = identity_order(source.labels)
    self.info.metadata["labels"] = np.asarray(source.labels, np.int64)[order].tolist()
    self.info.metadata["num_classes"] = int(source.num_classes)
    return {"train": self._generate_examples(source, order)}

  def _generate_examples(self, source: Source, order: np.ndarray):
    shape = self.info.features["image"].shape
    for key, i in enumerate(order):
      image, label = source[int(i)]
      if image.shape != shape:
        raise ValueError(f"{self.builder_config.name}: example {i} has image shape {image.shape}, "
                         f"the dataset's is {shape}; all images must have one size")
      yield key, {"image": image, "label": label}


class TfdsSource:
  """A source (see `arcjax.data.sources`) over a tfds ArrayRecord data source."""

  def __init__(self, data_source, labels: np.ndarray, num_classes: int):
    self.data_source = data_source
    self.labels = np.asarray(labels, np.int64)
    self.num_classes = int(num_classes)
    if len(self.labels) != len(data_source):
      raise ValueError(f"{len(self.labels)} labels in the metadata for {len(data_source)} records "
                       f"of {data_source}")

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    return self.__getitems__([index])[0]

  def __getitems__(self, indices: Sequence[int]) -> list[tuple[np.ndarray, int]]:
    # One ArrayRecord read of many records costs about as much as a read of one.
    return [(example["image"], int(example["label"]))
            for example in self.data_source.__getitems__(list(indices))]


def load(config: str | ArcjaxImagesConfig, *, data_dir: str | os.PathLike | None = None) -> TfdsSource:
  """Builds `config` into `data_dir` unless cached there, then reads it back as a `TfdsSource`.

  `config`: 'fashion_mnist', 'digits' or `folder_config(path)`.
  """
  builder = ArcjaxImages(config=config, data_dir=None if data_dir is None else os.fspath(data_dir))
  builder.download_and_prepare()
  return TfdsSource(builder.as_data_source(split="train"), builder.info.metadata["labels"],
                    builder.info.metadata["num_classes"])

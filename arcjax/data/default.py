"""Small class-labelled datasets that need no download, their 10 classes taken as identities.

  - `fashion_mnist`: Debian's `dataset-fashion-mnist` under
    /usr/share/datasets/fashion-mnist (train + t10k = 70 000 images, 28×28×1);
  - `digits`: scikit-learn's `load_digits` (1 797 images, 8×8×1).

Ten classes teach little about unseen ones: the default run uses Omniglot's
242 characters instead (`arcjax.data.omniglot`).
"""

import gzip
import pathlib

import numpy as np

from arcjax import errors
from arcjax.data.sources import ArraySource

FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
_FASHION_MNIST_FILES = {
    split: (f"{split}-images-idx3-ubyte.gz", f"{split}-labels-idx1-ubyte.gz")
    for split in ("train", "t10k")
}
# idx magic numbers: 0x00000803 = uint8 3-D array, 0x00000801 = uint8 1-D array.
_IDX_MAGIC = {3: 0x0803, 1: 0x0801}


def read_idx(path: str | pathlib.Path, ndim: int) -> np.ndarray:
  """A gzipped idx file of uint8 with `ndim` dimensions, as a uint8 array."""
  with gzip.open(path, "rb") as f:
    data = f.read()
  header = 4 + 4 * ndim
  if len(data) < header:
    raise ValueError(f"{path}: {len(data)} bytes is shorter than an idx header")
  magic = int.from_bytes(data[:4], "big")
  if magic != _IDX_MAGIC[ndim]:
    raise ValueError(f"{path}: idx magic {magic:#010x}, expected {_IDX_MAGIC[ndim]:#010x}")
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  if len(data) - header != int(np.prod(shape)):
    raise ValueError(f"{path}: {len(data) - header} data bytes for shape {shape}")
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def fashion_mnist_available(directory: str | pathlib.Path | None = None) -> bool:
  """Whether all four Fashion-MNIST idx files are in `directory` (default `FASHION_MNIST_DIR`)."""
  directory = pathlib.Path(directory or FASHION_MNIST_DIR)
  return all((directory / name).is_file() for names in _FASHION_MNIST_FILES.values() for name in names)


def load_fashion_mnist(directory: str | pathlib.Path | None = None) -> ArraySource:
  """Fashion-MNIST train then t10k: images (70000, 28, 28, 1) uint8, labels in [0, 10)."""
  directory = pathlib.Path(directory or FASHION_MNIST_DIR)
  if not fashion_mnist_available(directory):
    raise errors.DataError(f"Fashion-MNIST not found in {directory} (Debian's package "
                           "dataset-fashion-mnist: apt-get install dataset-fashion-mnist)")
  images, labels = [], []
  for image_file, label_file in _FASHION_MNIST_FILES.values():
    images.append(read_idx(directory / image_file, 3))
    labels.append(read_idx(directory / label_file, 1))
    if len(images[-1]) != len(labels[-1]):
      raise ValueError(f"{directory / image_file}: {len(images[-1])} images but "
                       f"{len(labels[-1])} labels in {label_file}")
  return ArraySource(np.concatenate(images)[..., None], np.concatenate(labels), num_classes=10)


def load_digits() -> ArraySource:
  """scikit-learn's digits: images (1797, 8, 8, 1) uint8 (0..16 scaled to 0..255), labels in [0, 10)."""
  import sklearn.datasets  # pylint: disable=import-outside-toplevel  (slow import)
  digits = sklearn.datasets.load_digits()
  images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
  return ArraySource(images[..., None], digits.target, num_classes=10)


# The constructors by name (the TFDS builder's configs use the same names).
LOADERS = {"fashion_mnist": load_fashion_mnist, "digits": load_digits}

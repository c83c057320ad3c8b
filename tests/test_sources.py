"""Tests of arcjax.data.sources, arcjax.data.default and get_datasets (arcjax.data)."""

import gzip
import pathlib

import ml_collections
import numpy as np
import pytest
import sklearn.datasets

from arcjax import data, errors
from arcjax.data import default, tfds_builder
from arcjax.data.folders import ImageFolderSource
from arcjax.data.pipeline import load_images
from arcjax.data.sources import ArraySource, Subset, open_set_split

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_array_source_contract_and_validation():
  images = np.arange(2 * 3 * 4 * 1, dtype=np.uint8).reshape(2, 3, 4, 1)
  source = ArraySource(images, np.array([4, 1]))
  assert len(source) == 2 and source.num_classes == 5 and source.labels.dtype == np.int64
  image, label = source[1]
  np.testing.assert_array_equal(image, images[1])
  assert label == 1 and isinstance(label, int)
  with pytest.raises(ValueError, match="uint8"):
    ArraySource(images.astype(np.float32), np.array([0, 1]))
  with pytest.raises(ValueError, match=r"labels must be integers of shape \(2,\)"):
    ArraySource(images, np.array([0, 1, 2]))


def test_subset_relabels_to_a_dense_range_in_label_order():
  images = np.arange(6, dtype=np.uint8).reshape(6, 1, 1, 1)
  source = ArraySource(images, np.array([7, 3, 7, 9, 3, 0]), num_classes=10)
  subset = Subset(source, [0, 3, 1, 2])
  np.testing.assert_array_equal(subset.original_labels, [3, 7, 9])
  np.testing.assert_array_equal(subset.labels, [1, 2, 0, 1])
  assert subset.num_classes == 3 and len(subset) == 4
  for j, (index, new_label) in enumerate(zip([0, 3, 1, 2], [1, 2, 0, 1])):
    image, label = subset[j]
    assert image[0, 0, 0] == index and label == new_label
  kept = Subset(source, [3, 5], relabel=False)
  assert kept.num_classes == 10 and kept[0][1] == 9
  np.testing.assert_array_equal(kept.labels, [9, 0])
  with pytest.raises(ValueError, match="index 6 out of range"):
    Subset(source, [1, 6])


def test_open_set_split_is_identity_disjoint_complete_and_seeded():
  labels = np.random.default_rng(0).integers(0, 30, 500)
  train, holdout = open_set_split(labels, num_holdout_identities=7, seed=3)
  assert not set(labels[train]) & set(labels[holdout])
  assert len(np.unique(labels[holdout])) == 7
  np.testing.assert_array_equal(np.sort(np.concatenate([train, holdout])), np.arange(500))
  again = open_set_split(labels, num_holdout_identities=7, seed=3)
  np.testing.assert_array_equal(again[1], holdout)
  other = open_set_split(labels, num_holdout_identities=7, seed=4)
  assert set(labels[other[1]]) != set(labels[holdout])
  with pytest.raises(ValueError, match="num_holdout_identities=30 must be in \\[0, 30\\)"):
    open_set_split(labels, num_holdout_identities=30, seed=0)


def _raw_idx(path, header: int) -> np.ndarray:
  with gzip.open(path) as f:
    return np.frombuffer(f.read()[header:], np.uint8)


@pytest.mark.skipif(not default.fashion_mnist_available(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_matches_the_raw_idx_files():
  source = default.load_fashion_mnist()
  assert source.images.shape == (70_000, 28, 28, 1) and source.num_classes == 10
  directory = default.FASHION_MNIST_DIR
  labels = np.concatenate([_raw_idx(directory / f"{s}-labels-idx1-ubyte.gz", 8) for s in ("train", "t10k")])
  np.testing.assert_array_equal(source.labels, labels)
  np.testing.assert_array_equal(np.bincount(source.labels), np.full(10, 7000))
  test_images = _raw_idx(directory / "t10k-images-idx3-ubyte.gz", 16).reshape(10_000, 28, 28)
  np.testing.assert_array_equal(source.images[60_000:, ..., 0], test_images)


def test_fashion_mnist_absent_is_one_clear_error(tmp_path):
  with pytest.raises(errors.DataError, match="apt-get install dataset-fashion-mnist"):
    default.load_fashion_mnist(tmp_path / "absent")


def test_read_idx_rejects_a_wrong_magic(tmp_path):
  path = tmp_path / "bad-idx1-ubyte.gz"
  with gzip.open(path, "wb") as f:
    f.write(bytes([0, 0, 8, 3, 0, 0, 0, 1, 5]))
  with pytest.raises(ValueError, match="bad-idx1-ubyte.gz: idx magic 0x00000803"):
    default.read_idx(path, 1)


def test_digits_are_scikit_learns():
  source = default.load_digits()
  digits = sklearn.datasets.load_digits()
  assert source.images.shape == (1797, 8, 8, 1) and source.images.dtype == np.uint8
  np.testing.assert_array_equal(source.images[..., 0], np.round(digits.images / 16 * 255))
  np.testing.assert_array_equal(source.labels, digits.target)


def _data_config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(dict(
      name="folder", path="", stage_dir="", image_size=None, num_holdout_identities=8,
      pairs_seed=0, max_pairs=6000, data_dir="", eval_bins=[], sampler="uniform"))
  config.update(overrides)
  return config


def _pair_identities(pair_set, lookup):
  ids = np.array([lookup[im.tobytes()] for im in pair_set.images.reshape(len(pair_set.images), -1)])
  return ids[pair_set.pairs[:, 0]], ids[pair_set.pairs[:, 1]], ids


def test_get_datasets_on_orl_is_an_open_set_split(shared_datasets):
  orl = shared_datasets / "orl_faces"
  datasets = data.get_datasets(_data_config(path=str(orl), image_size=(56, 46)))
  folder = ImageFolderSource(orl)
  train = datasets.train
  assert datasets.num_classes == train.num_classes == 32 and len(train) == 320
  np.testing.assert_array_equal(np.unique(train.labels), np.arange(32))
  train_identities = set(folder.labels[train.indices])
  holdout_identities = set(folder.labels) - train_identities
  assert len(holdout_identities) == 8

  holdout = datasets.eval_sets["holdout"]
  assert set(datasets.eval_sets) == {"holdout"}
  assert holdout.images.shape[1:] == (56, 46, 1) and holdout.images.dtype == np.uint8
  assert holdout.pairs.shape == (len(holdout.issame), 2)
  assert holdout.issame.any() and not holdout.issame.all()
  # Recover each pair image's identity from the folder by exact image match.
  resized = load_images(folder, np.arange(len(folder)), image_size=(56, 46)).reshape(len(folder), -1)
  lookup = {row.tobytes(): label for row, label in zip(resized, folder.labels)}
  ids1, ids2, ids = _pair_identities(holdout, lookup)
  assert set(ids1) | set(ids2) <= holdout_identities
  np.testing.assert_array_equal(holdout.issame, ids1 == ids2)
  # The labelled unseen images (for Intra2 / Inter2): every pair image, with its identity.
  images, labels = datasets.unseen
  np.testing.assert_array_equal(images, holdout.images)
  np.testing.assert_array_equal(labels, ids)
  # The training source yields the training people's images with their new labels.
  image, label = train[0]
  np.testing.assert_array_equal(image, folder[int(train.indices[0])][0])
  assert train.original_labels[label] == folder.labels[train.indices[0]]


def test_relative_data_paths_start_at_the_data_root(shared_datasets, monkeypatch):
  monkeypatch.setenv(data.DATA_ROOT_ENV, str(shared_datasets))
  datasets = data.get_datasets(_data_config(path="orl_faces", image_size=(28, 23)))
  assert datasets.num_classes == 32
  monkeypatch.delenv(data.DATA_ROOT_ENV)
  assert data.data_root() == REPO / "data"
  with pytest.raises(errors.DataError, match=r"relative paths start at the data root .*/data"):
    data.get_datasets(_data_config(path="orl_faces"))


def test_get_datasets_errors(shared_datasets, tmp_path):
  orl = str(shared_datasets / "orl_faces")
  with pytest.raises(errors.ConfigError, match="config.data.name must be one of"):
    data.get_datasets(_data_config(name="mnist"))
  with pytest.raises(errors.DataError, match="nowhere does not exist"):
    data.get_datasets(_data_config(path=str(tmp_path / "nowhere")))
  with pytest.raises(errors.DataError, match="40 identities; with num_holdout_identities=39"):
    data.get_datasets(_data_config(path=orl, num_holdout_identities=39))
  with pytest.raises(errors.ConfigError, match="num_holdout_identities must be 0 or at least 2"):
    data.get_datasets(_data_config(path=orl, num_holdout_identities=1))
  with pytest.raises(errors.ConfigError, match="gs://.*set config.data.stage_dir"):
    data.get_datasets(_data_config(name="recordio", path="gs://bucket/faces"))


def test_digits_by_name_read_the_tfds_build(tmp_path):
  datasets = data.get_datasets(_data_config(name="digits", data_dir=str(tmp_path / "tfds"),
                                            num_holdout_identities=3, max_pairs=200))
  assert list(tmp_path.glob("tfds/arcjax_images/digits/1.1.0/*.array_record*"))
  digits = default.load_digits()
  train = datasets.train
  assert datasets.num_classes == 7
  # The build stores the examples grouped by identity.
  stored_labels = digits.labels[tfds_builder.identity_order(digits.labels)]
  np.testing.assert_array_equal(train.original_labels[train.labels], stored_labels[train.indices])
  held_out = set(range(10)) - set(train.original_labels)
  holdout = datasets.eval_sets["holdout"]
  assert holdout.images.shape[1:] == (8, 8, 1) and 0 < len(holdout.issame) <= 200
  # Each pair image is one of the held-out digits' images (8×8 digits images are nearly unique).
  by_image = {}
  for image, label in zip(digits.images, digits.labels):
    by_image.setdefault(image.tobytes(), set()).add(label)
  for image in holdout.images:
    assert by_image[image.tobytes()] <= held_out

"""Tests of arcjax.data.tfds_builder: build without TensorFlow, read back random-access, cache."""

import shutil
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from arcjax.data import default, tfds_builder
from arcjax.data.folders import ImageFolderSource


def _assert_same(source, reference, indices):
  """`source` holds `reference`'s examples grouped by label, in their order within a label."""
  assert len(source) == len(reference) and source.num_classes == reference.num_classes
  order = [i for label in range(reference.num_classes)
           for i in np.flatnonzero(np.asarray(reference.labels) == label)]
  np.testing.assert_array_equal(source.labels, np.asarray(reference.labels)[order])
  assert np.all(np.diff(source.labels) >= 0)
  for i in indices:
    image, label = source[i]
    expected_image, expected_label = reference[int(order[i])]
    assert image.dtype == np.uint8 and isinstance(label, int)
    np.testing.assert_array_equal(image, expected_image)
    assert label == expected_label


def test_digits_build_reads_back_the_raw_arrays_and_is_cached(tmp_path, monkeypatch):
  source = tfds_builder.load("digits", data_dir=tmp_path)
  _assert_same(source, default.load_digits(), range(len(source)))
  record_files = list(tmp_path.glob("arcjax_images/digits/1.1.0/*.array_record*"))
  assert len(record_files) == 1
  built_at = record_files[0].stat().st_mtime_ns

  # A second load must not regenerate: the loader may not even be called.
  def _no_regeneration():
    raise AssertionError("the cached build was regenerated")
  monkeypatch.setitem(default.LOADERS, "digits", _no_regeneration)
  again = tfds_builder.load("digits", data_dir=tmp_path)
  assert record_files[0].stat().st_mtime_ns == built_at
  for i in (0, 1796):
    np.testing.assert_array_equal(again[i][0], source[i][0])

  # tfds' own entry point finds the registered builder and reads the same records.
  records = tfds.data_source("arcjax_images/digits", split="train", data_dir=tmp_path, download=False)
  assert len(records) == 1797 and records[5]["label"] == source[5][1]
  assert "tensorflow" not in sys.modules  # everything above ran without TensorFlow


def test_image_folder_config_builds_and_fingerprints_the_folder(shared_datasets, tmp_path):
  folder = tmp_path / "orl"
  shutil.copytree(shared_datasets / "orl_faces", folder)
  config = tfds_builder.folder_config(folder)
  assert config.name.startswith("folder_orl_") and config.path == str(folder.resolve())
  assert tfds_builder.folder_config(folder).name == config.name
  source = tfds_builder.load(config, data_dir=tmp_path / "tfds")
  _assert_same(source, ImageFolderSource(folder), range(0, 400, 7))

  shutil.copy(folder / "s1" / "1.pgm", folder / "s1" / "11.pgm")
  assert tfds_builder.folder_config(folder).name != config.name
  with pytest.raises(FileNotFoundError, match="absent does not exist"):
    tfds_builder.folder_config(tmp_path / "absent")


def test_folder_with_two_image_sizes_is_an_error(shared_datasets, tmp_path):
  folder = tmp_path / "mixed"
  (folder / "a").mkdir(parents=True)
  (folder / "b").mkdir()
  shutil.copy(shared_datasets / "orl_faces" / "s1" / "1.pgm", folder / "a" / "1.pgm")
  omniglot_png = next((shared_datasets / "omniglot_small").rglob("*.png"))
  shutil.copy(omniglot_png, folder / "b" / "1.png")
  with pytest.raises(ValueError, match=r"example 1 has image shape \(105, 105, \d\).*\(112, 92, 1\)"):
    tfds_builder.load(tfds_builder.folder_config(folder), data_dir=tmp_path / "tfds")


@pytest.mark.slow
@pytest.mark.skipif(not default.fashion_mnist_available(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_build_reads_back_the_raw_arrays(tmp_path):
  source = tfds_builder.load("fashion_mnist", data_dir=tmp_path)
  _assert_same(source, default.load_fashion_mnist(), [0, 1, 59_999, 60_000, 69_999])

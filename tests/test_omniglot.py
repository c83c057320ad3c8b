"""The embedded Omniglot: read from its zips as published, checked, each character once; and a
fresh copy of the repository with nothing beside it trains the ablations and their grid."""

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import ml_collections
import numpy as np
import pytest

from arcjax import data, errors
from arcjax.data import images, omniglot

REPO = pathlib.Path(__file__).resolve().parents[1]
PATIENCE = 900  # seconds a slow, shared CI machine may take (not a speed assertion)


@pytest.fixture(scope="module")
def embedded():
  return omniglot.load()


def test_embedded_zips_are_the_published_files_with_licence_and_checksums():
  sums = dict(reversed(line.split()) for line in
              (omniglot.EMBEDDED / "SHA256SUMS").read_text().splitlines())
  assert sorted(sums) == ["images_background_small1.zip", "images_background_small2.zip"]
  for name, digest in sums.items():
    assert hashlib.sha256((omniglot.EMBEDDED / name).read_bytes()).hexdigest() == digest
  assert "MIT License" in (omniglot.EMBEDDED / "LICENSE").read_text()


def test_242_characters_of_20_drawings_each_greek_and_latin_once(embedded):
  assert embedded.images.shape == (4840, 105, 105, 1) and embedded.num_classes == 242
  np.testing.assert_array_equal(np.bincount(embedded.labels), np.full(242, 20))
  names = embedded.identity_names
  assert names == sorted(names) and len(set(names)) == 242
  alphabets = {name.split("/")[0] for name in names}
  assert alphabets == {"Balinese", "Early_Aramaic", "Greek", "Japanese_(katakana)", "Korean",
                       "Latin", "Sanskrit", "Tagalog"}
  assert sum(name.startswith("Greek/") for name in names) == 24
  assert set(np.unique(embedded.images)) == {0, 255}  # black strokes on white


def test_each_image_is_its_file_in_the_zip(embedded):
  """Read independently: the PNG of character k's j-th drawing in the zip that has it."""
  with zipfile.ZipFile(omniglot.EMBEDDED / "images_background_small2.zip") as archive:
    members = sorted(m for m in archive.namelist() if m.startswith(
        "images_background_small2/Tagalog/character03/") and m.endswith(".png"))
    label = embedded.identity_names.index("Tagalog/character03")
    drawings = embedded.images[embedded.labels == label]
    assert len(members) == 20
    for member, image in zip(members, drawings):
      np.testing.assert_array_equal(image, images.decode_image(archive.read(member)))


def test_the_shared_folder_copy_reads_the_same(embedded, shared_datasets):
  from_folder = omniglot.load(shared_datasets / "omniglot_small")
  assert from_folder.identity_names == embedded.identity_names
  np.testing.assert_array_equal(from_folder.labels, embedded.labels)
  np.testing.assert_array_equal(from_folder.images, embedded.images)


def test_another_zip_or_a_damaged_one(tmp_path):
  one = omniglot.load(omniglot.EMBEDDED / "images_background_small1.zip")
  assert one.num_classes == 136 and len(one.labels) == 136 * 20
  folder = tmp_path / "copy"
  shutil.copytree(omniglot.EMBEDDED, folder)
  damaged = folder / "images_background_small2.zip"
  content = bytearray(damaged.read_bytes())
  content[1000] ^= 0xFF
  damaged.write_bytes(bytes(content))
  with pytest.raises(errors.DataError, match="images_background_small2.zip: SHA-256 .* does not "
                     "match"):
    omniglot.load(folder)
  with pytest.raises(errors.DataError, match="Omniglot not found"):
    omniglot.load(tmp_path / "nowhere")


def test_data_name_omniglot_holds_out_characters(embedded):
  config = ml_collections.ConfigDict(dict(
      name="omniglot", path="", stage_dir="", image_size=(32, 32), num_holdout_identities=42,
      pairs_seed=0, max_pairs=6000, data_dir="", eval_bins=(), sampler="uniform"))
  datasets = data.get_datasets(config)
  assert datasets.num_classes == 200 and len(datasets.train) == 4000
  holdout = datasets.eval_sets["holdout"]
  assert holdout.images.shape[1:] == (32, 32, 1) and len(holdout.issame) == 6000
  unseen_labels = datasets.unseen[1]
  assert len(np.unique(unseen_labels)) == 42
  assert not set(unseen_labels) & set(datasets.train.original_labels)


@pytest.mark.slow
def test_a_fresh_copy_with_nothing_beside_it_trains_a_row_and_the_table5_grid(tmp_path,
                                                                             fresh_copy):
  clone = fresh_copy
  env = {**os.environ, "WANDB_MODE": "disabled", "XLA_FLAGS": ""}
  env.pop("PYTHONPATH", None)
  row = subprocess.run(
      [sys.executable, "-m", "arcjax.main", "--config=configs/ablations.py:arcface",
       f"--workdir={tmp_path / 'runs' / 'arcface'}", "--config.train.steps=20"],
      cwd=clone, capture_output=True, text=True, timeout=PATIENCE, env=env)
  assert row.returncode == 0, row.stderr[-3000:]
  assert "final verification (step 20)" in row.stdout
  grid = subprocess.run(
      [sys.executable, "-m", "experiments.launch", "--grid=configs/ablations.py:table5",
       f"--workdir={tmp_path / 'runs' / 'table5'}", "--override", "config.train.steps=3",
       "config.eval.every=0", "config.angles.probe_size=64"],
      cwd=clone, capture_output=True, text=True, timeout=PATIENCE, env=env)
  assert grid.returncode == 0, (grid.stdout[-3000:], grid.stderr[-3000:])
  assert "5 finished, 0 failed" in grid.stdout

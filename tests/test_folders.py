"""Image folders (one leaf folder per identity)."""

import numpy as np
from PIL import Image
import pytest

from arcjax.data.folders import ImageFolderSource


def _save(path, image, **kwargs):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(image).save(path, **kwargs)


@pytest.fixture
def tree(tmp_path):
  """Identities at depths 1 and 2, plus files and folders that are not identities."""
  rng = np.random.default_rng(0)
  images = {}
  for rel in ("b/2.png", "b/10.png", "a/x/0.png", "a/y/0.bmp", "a/y/1.pgm", "c/z/w/0.jpg"):
    shape = (6, 5) if rel.endswith((".pgm", ".jpg")) else (6, 5, 3)
    images[rel] = rng.integers(0, 256, shape, dtype=np.uint8)
    _save(tmp_path / rel, images[rel])
  (tmp_path / "README").write_text("not an image")
  (tmp_path / "a" / "notes.txt").write_text("not an image")
  _save(tmp_path / ".hidden" / "0.png", images["b/2.png"])
  _save(tmp_path / "b" / ".thumb.png", images["b/2.png"])
  (tmp_path / "empty").mkdir()
  return tmp_path, images


def test_identities_are_leaf_folders(tree):
  root, images = tree
  source = ImageFolderSource(root)
  assert source.identity_names == ["a/x", "a/y", "b", "c/z/w"]
  assert source.num_classes == 4
  rel = [p.relative_to(root).as_posix() for p in source.paths]
  assert rel == ["a/x/0.png", "a/y/0.bmp", "a/y/1.pgm", "b/10.png", "b/2.png", "c/z/w/0.jpg"]
  np.testing.assert_array_equal(source.labels, [0, 1, 1, 2, 2, 3])
  assert source.labels.dtype == np.int64 and len(source) == 6
  for i, name in enumerate(rel):
    image, label = source[i]
    assert label == source.labels[i] and image.dtype == np.uint8
    assert source.encoded(i) == (root / name).read_bytes()
    if name.endswith(".jpg"):
      assert image.shape == (6, 5, 1)  # lossy: shape only
    else:
      np.testing.assert_array_equal(image.reshape(images[name].shape), images[name])
      assert image.shape[2] == (1 if images[name].ndim == 2 else 3)


def test_identities_argument_sets_labels(tree):
  root, _ = tree
  source = ImageFolderSource(root, identities=["b", "a/x"])
  assert source.identity_names == ["b", "a/x"]
  np.testing.assert_array_equal(source.labels, [0, 0, 1])
  assert source.paths[2] == root / "a/x/0.png"
  with pytest.raises(ValueError, match=r"identity 'a' not found under .* \(identities look like 'a/x'\)"):
    ImageFolderSource(root, identities=["a"])
  with pytest.raises(ValueError, match="name an identity twice"):
    ImageFolderSource(root, identities=["b", "b"])


def test_root_errors(tmp_path):
  with pytest.raises(ValueError, match=r"missing does not exist or is not a directory"):
    ImageFolderSource(tmp_path / "missing")
  (tmp_path / "empty" / "sub").mkdir(parents=True)
  (tmp_path / "empty" / "sub" / "a.txt").write_text("x")
  with pytest.raises(ValueError, match=r"no images under .*empty"):
    ImageFolderSource(tmp_path / "empty")
  _save(tmp_path / "flat" / "0.png", np.zeros((2, 2), np.uint8))
  with pytest.raises(ValueError, match=r"flat holds images directly \(0\.png"):
    ImageFolderSource(tmp_path / "flat")
  _save(tmp_path / "nested" / "a" / "0.png", np.zeros((2, 2), np.uint8))
  _save(tmp_path / "nested" / "a" / "b" / "0.png", np.zeros((2, 2), np.uint8))
  with pytest.raises(ValueError, match=r"nested/a holds images and also sub-folders"):
    ImageFolderSource(tmp_path / "nested")


def test_unreadable_image_names_file(tmp_path):
  _save(tmp_path / "a" / "0.png", np.zeros((2, 2), np.uint8))
  (tmp_path / "a" / "1.png").write_bytes(b"\x89PNG truncated")
  source = ImageFolderSource(tmp_path)
  assert source[0][0].shape == (2, 2, 1)
  with pytest.raises(ValueError, match=r"a/1\.png: cannot decode image \(14 bytes\)"):
    source[1]


def test_orl(shared_datasets):
  source = ImageFolderSource(shared_datasets / "orl_faces")
  assert len(source) == 400 and source.num_classes == 40
  assert source.identity_names == sorted(f"s{i}" for i in range(1, 41))
  np.testing.assert_array_equal(np.bincount(source.labels), np.full(40, 10))
  image, label = source[123]
  assert image.shape == (112, 92, 1) and label == 12
  np.testing.assert_array_equal(image[..., 0], np.asarray(Image.open(source.paths[123])))
  assert source.paths[123].parent.name == source.identity_names[12]


def test_omniglot(shared_datasets):
  source = ImageFolderSource(shared_datasets / "omniglot_small")
  assert len(source) == 4840 and source.num_classes == 242
  assert all(name.count("/") == 1 and "/character" in name for name in source.identity_names)
  np.testing.assert_array_equal(np.bincount(source.labels), np.full(242, 20))
  image, _ = source[4000]
  assert image.shape == (105, 105, 1)
  assert set(np.unique(image)) <= {0, 255}
  np.testing.assert_array_equal(image[..., 0] > 0, np.asarray(Image.open(source.paths[4000])))

"""Tests of arcjax.data.pipeline: determinism, resume, host slicing, flips, P×K, errors, shutdown."""

import gc
import threading
import time

import numpy as np
from PIL import Image
import pytest

from arcjax.data.images import resize_image
from arcjax.data.pipeline import batches, load_images
from arcjax.data.sources import ArraySource

N = 100


def _indexed_source(n: int = N, num_classes: int = 10) -> ArraySource:
  """Image i: row 0 = i % 256, row 1 = i // 256 (flip-invariant), row 2 = 0, 1, 2, 3 (shows flips)."""
  images = np.zeros((n, 3, 4, 1), np.uint8)
  images[:, 0] = (np.arange(n) % 256)[:, None, None]
  images[:, 1] = (np.arange(n) // 256)[:, None, None]
  images[:, 2, :, 0] = np.arange(4)
  return ArraySource(images, np.arange(n) % num_classes, num_classes=num_classes)


def _indices(batch: dict) -> np.ndarray:
  rows = batch["image"][:, :2, 0, 0].astype(np.int64)
  return rows[:, 0] + 256 * rows[:, 1]


def _flipped(batch: dict) -> np.ndarray:
  return batch["image"][:, 2, 0, 0] == 3


def _take(iterator, n: int) -> list[dict]:
  with iterator:
    return [next(iterator) for _ in range(n)]


def test_batches_have_shapes_dtypes_and_the_source_labels():
  source = _indexed_source()
  (batch,) = _take(batches(source, global_batch_size=8, seed=0), 1)
  assert batch["image"].shape == (8, 3, 4, 1) and batch["image"].dtype == np.uint8
  assert batch["label"].dtype == np.int32
  np.testing.assert_array_equal(batch["label"], source.labels[_indices(batch)])


def test_each_epoch_is_a_permutation_with_the_remainder_dropped():
  got = _take(batches(_indexed_source(), global_batch_size=16, seed=3, flip=False), 12)
  indices = np.stack([_indices(b) for b in got])  # 6 steps per epoch (96 of 100 used)
  for epoch in (indices[:6], indices[6:]):
    assert len(np.unique(epoch)) == 96
  assert not np.array_equal(indices[:6], indices[6:])


def test_same_seed_same_batches_other_seed_other_batches():
  a = _take(batches(_indexed_source(), global_batch_size=10, seed=1), 3)
  b = _take(batches(_indexed_source(), global_batch_size=10, seed=1), 3)
  c = _take(batches(_indexed_source(), global_batch_size=10, seed=2), 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
  assert not all(np.array_equal(x["image"], z["image"]) for x, z in zip(a, c))


@pytest.mark.parametrize("sampler", ["uniform", "pk"])
def test_resuming_at_step_k_gives_the_uninterrupted_batches(sampler):
  kwargs = dict(global_batch_size=12, seed=7, sampler=sampler)
  if sampler == "pk":
    kwargs.update(pk_identities=4, pk_images=3)
  uninterrupted = _take(batches(_indexed_source(), **kwargs), 20)
  resumed = _take(batches(_indexed_source(), start_step=13, **kwargs), 7)  # crosses epoch 1 → 2
  for x, y in zip(uninterrupted[13:], resumed):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


def test_hosts_read_contiguous_slices_whose_concatenation_is_the_global_batch():
  single = _take(batches(_indexed_source(), global_batch_size=12, seed=5), 4)
  per_host = [_take(batches(_indexed_source(), global_batch_size=12, seed=5, process_index=p,
                            process_count=4), 4) for p in range(4)]
  for step in range(4):
    assert per_host[0][step]["image"].shape[0] == 3
    for key in ("image", "label"):
      np.testing.assert_array_equal(
          np.concatenate([host[step][key] for host in per_host]), single[step][key])


def test_batch_not_divisible_by_process_count_is_an_error():
  with pytest.raises(ValueError, match="global_batch_size=10.*process_count=4"):
    batches(_indexed_source(), global_batch_size=10, seed=0, process_count=4)


def test_flips_are_half_of_the_images_and_do_not_depend_on_the_thread_count():
  source = _indexed_source()
  one = _take(batches(source, global_batch_size=50, seed=11, num_threads=1), 4)
  three = _take(batches(source, global_batch_size=50, seed=11, num_threads=3), 4)
  for x, y in zip(one, three):
    np.testing.assert_array_equal(x["image"], y["image"])
  flipped = np.concatenate([_flipped(b) for b in one])
  assert 0.35 < flipped.mean() < 0.65
  # A flipped image is the source image mirrored left-right; the others are untouched.
  batch = one[0]
  expected = source.images[_indices(batch)]
  expected[_flipped(batch)] = expected[_flipped(batch)][:, :, ::-1]
  np.testing.assert_array_equal(batch["image"], expected)
  (unflipped,) = _take(batches(source, global_batch_size=50, seed=11, flip=False), 1)
  assert not _flipped(unflipped).any()


def test_pk_batches_are_p_distinct_identities_times_k_images():
  # Identity 9 has 2 images (< K = 3), so it is sampled with replacement.
  labels = np.concatenate([np.repeat(np.arange(9), 10), [9, 9]])
  source = ArraySource(_indexed_source(92).images, labels, num_classes=10)
  saw_identity_9 = False
  for batch in _take(batches(source, global_batch_size=15, seed=2, sampler="pk", pk_identities=5,
                             pk_images=3, flip=False), 30):
    groups = batch["label"].reshape(5, 3)
    assert (groups == groups[:, :1]).all() and len(np.unique(groups[:, 0])) == 5
    indices = _indices(batch).reshape(5, 3)
    np.testing.assert_array_equal(labels[indices], groups)
    for identity, group in zip(groups[:, 0], indices):
      if identity != 9:
        assert len(np.unique(group)) == 3
      else:
        saw_identity_9 = True
        assert set(group) <= {90, 91}
  assert saw_identity_9


def test_pk_errors():
  with pytest.raises(ValueError, match="pk_identities × pk_images"):
    batches(_indexed_source(), global_batch_size=16, seed=0, sampler="pk", pk_identities=5, pk_images=3)
  with pytest.raises(ValueError, match="pk_identities=11 but the data has only 10"):
    batches(_indexed_source(), global_batch_size=22, seed=0, sampler="pk", pk_identities=11, pk_images=2)
  with pytest.raises(ValueError, match="unknown sampler 'triplet'"):
    batches(_indexed_source(), global_batch_size=4, seed=0, sampler="triplet")


def test_label_outside_num_classes_is_an_error_naming_the_example():
  source = _indexed_source(num_classes=10)
  source.labels[37] = 12
  with pytest.raises(ValueError, match=r"example 37 has label 12 outside \[0, 10\)"):
    with batches(source, global_batch_size=N, seed=0) as iterator:
      next(iterator)


class _FailingSource:
  """A source whose example 5 cannot be read."""

  def __init__(self):
    self._inner = _indexed_source()
    self.labels, self.num_classes = self._inner.labels, self._inner.num_classes

  def __len__(self):
    return len(self._inner)

  def __getitem__(self, index):
    if index == 5:
      raise OSError("example 5 is unreadable")
    return self._inner[index]


def test_worker_exceptions_reach_the_consumer():
  with pytest.raises(OSError, match="example 5 is unreadable"):
    with batches(_FailingSource(), global_batch_size=N, seed=0, num_threads=3) as iterator:
      next(iterator)


def _pipeline_threads() -> list[threading.Thread]:
  return [t for t in threading.enumerate() if t.name.startswith(("arcjax-prefetch", "arcjax-decode"))]


def _wait_until_no_pipeline_threads(timeout: float = 5.0) -> bool:
  deadline = time.monotonic() + timeout
  while _pipeline_threads() and time.monotonic() < deadline:
    time.sleep(0.02)
  return not _pipeline_threads()


def test_close_and_garbage_collection_stop_the_threads():
  assert _wait_until_no_pipeline_threads()
  iterator = batches(_indexed_source(), global_batch_size=10, seed=0)
  next(iterator)
  assert _pipeline_threads()
  iterator.close()
  assert not _pipeline_threads()
  with pytest.raises(StopIteration):
    next(iterator)

  iterator = batches(_indexed_source(), global_batch_size=10, seed=0)
  next(iterator)
  del iterator
  gc.collect()
  assert _wait_until_no_pipeline_threads()


def test_resize_matches_pil_and_mismatched_sizes_need_image_size():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 12, 10, 3), dtype=np.uint8)
  source = ArraySource(images, np.arange(6))
  got = load_images(source, [4, 1], image_size=(6, 5))
  for image, index in zip(got, [4, 1]):
    reference = np.asarray(Image.fromarray(images[index]).resize((5, 6), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(image, reference)
  grey = rng.integers(0, 256, (12, 10, 1), dtype=np.uint8)
  assert resize_image(grey, (24, 20)).shape == (24, 20, 1)

  class _TwoSizes(ArraySource):
    def __getitem__(self, index):
      image, label = super().__getitem__(index)
      return (image[:-1] if index == 3 else image), label

  two_sizes = _TwoSizes(images, np.arange(6))
  with pytest.raises(ValueError, match=r"example 3: image shape \(11, 10, 3\)"):
    load_images(two_sizes, np.arange(6))
  assert load_images(two_sizes, np.arange(6), image_size=(12, 10)).shape == (6, 12, 10, 3)


def test_a_source_resized_once_gives_the_batches_resized_batch_by_batch():
  """`ArraySource.resized` (what `get_datasets` does to in-memory data) changes no batch."""
  rng = np.random.default_rng(1)
  source = ArraySource(rng.integers(0, 256, (40, 15, 13, 1), dtype=np.uint8), np.arange(40) % 4)
  resized = source.resized((8, 7))
  assert resized.images.shape == (40, 8, 7, 1) and source.resized((15, 13)) is source
  each_batch = _take(batches(source, global_batch_size=8, seed=3, image_size=(8, 7)), 6)
  once = _take(batches(resized, global_batch_size=8, seed=3, image_size=(8, 7)), 6)
  for expected, got in zip(each_batch, once):
    np.testing.assert_array_equal(got["image"], expected["image"])
    np.testing.assert_array_equal(got["label"], expected["label"])


def test_load_images_gives_the_source_images_in_order():
  source = _indexed_source()
  indices = np.array([5, 99, 0, 5])
  np.testing.assert_array_equal(load_images(source, indices, num_threads=3), source.images[indices])


def test_bad_arguments():
  with pytest.raises(ValueError, match="larger than the dataset"):
    batches(_indexed_source(), global_batch_size=128, seed=0)
  with pytest.raises(ValueError, match="process_index=2"):
    batches(_indexed_source(), global_batch_size=8, seed=0, process_index=2, process_count=2)

"""The input pipeline: deterministic, resumable, host-sharded batches from a source.

Which examples make up global batch `t` is a pure function of `(seed, t)`, and so
is the flip decision of each position in it, so

  - resuming at `start_step=t` yields exactly the batches an uninterrupted run
    would have seen from step `t` on (nothing but the step needs checkpointing);
  - host `p` of `P` reads only its contiguous slice `[p·B/P, (p+1)·B/P)` of the
    global batch, and the concatenation over hosts is the single-host batch;
  - the thread count changes speed, never the data.

Decoding (`read_many(source, ...)`, a chunk of the batch per thread), resizing
(PIL) and flipping run on the host in a thread pool; a producer thread keeps
`prefetch` batches ready. Errors in either thread are raised by `next()`.
"""

from collections.abc import Iterator
import concurrent.futures
import queue
import threading
from typing import Any
import weakref

import numpy as np

from arcjax.data.images import resize_image
from arcjax.data.sources import Source, read_many

# Stream ids keep the random streams of one seed apart.
_UNIFORM_STREAM, _PK_STREAM, _FLIP_STREAM = 0, 1, 2
SAMPLERS = ("uniform", "pk")


def _checked(image: np.ndarray, index: int, image_size: tuple[int, int] | None) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3:
    raise ValueError(f"example {index}: image must be uint8 (H, W, C); got {image.dtype} {image.shape}")
  return image if image_size is None else resize_image(image, image_size)


def _fill(source: Source, indices: np.ndarray, flips: np.ndarray | None, image_size: tuple[int, int] | None,
          images: np.ndarray, labels: np.ndarray, positions: range) -> None:
  """Decodes `indices[positions]` into `images[positions]` / `labels[positions]` in place."""
  examples = read_many(source, indices[positions.start:positions.stop])
  for j, (image, label) in zip(positions, examples):
    image = _checked(image, indices[j], image_size)
    if image.shape != images.shape[1:]:
      raise ValueError(f"example {indices[j]}: image shape {image.shape} differs from "
                       f"{images.shape[1:]} (set image_size to resize)")
    images[j] = image[:, ::-1] if flips is not None and flips[j] else image
    labels[j] = label


def _check_labels(indices: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if len(bad):
    j = bad[0]
    raise ValueError(f"example {indices[j]} has label {labels[j]} outside [0, {num_classes})")


def _load(pool: concurrent.futures.Executor, num_threads: int, source: Source, indices: np.ndarray,
          flips: np.ndarray | None, image_size: tuple[int, int] | None,
          example_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """`(images (n, *example_shape) uint8, labels (n,) int64)` of `indices`, decoded by `pool`."""
  n = len(indices)
  images = np.empty((n, *example_shape), np.uint8)
  labels = np.empty((n,), np.int64)
  bounds = np.linspace(0, n, min(num_threads, max(n, 1)) + 1).astype(int)
  futures = [pool.submit(_fill, source, indices, flips, image_size, images, labels, range(lo, hi))
             for lo, hi in zip(bounds[:-1], bounds[1:])]
  for future in futures:
    future.result()  # re-raises a worker's exception here
  _check_labels(indices, labels, source.num_classes)
  return images, labels


def _example_shape(source: Source, image_size: tuple[int, int] | None) -> tuple[int, int, int]:
  if len(source) == 0:
    raise ValueError("the source is empty")
  return _checked(source[0][0], 0, image_size).shape


def load_images(source: Source, indices: np.ndarray, *, image_size: tuple[int, int] | None = None,
                num_threads: int = 4) -> np.ndarray:
  """Images of `source` at `indices` as `(n, H, W, C) uint8`, resized to `image_size` if given.

  For evaluation sets: no flips; labels are checked like the training batches'.
  """
  indices = np.asarray(indices, dtype=np.int64)
  image_size = None if image_size is None else tuple(image_size)
  shape = _example_shape(source, image_size)
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    return _load(pool, num_threads, source, indices, None, image_size, shape)[0]


class _UniformSampler:
  """Epochs of random permutations of [0, N), the last incomplete batch of each dropped.

  With `S = N // B` steps per epoch, step `t` is batch `t mod S` of the
  permutation of epoch `t // S`, drawn from `(seed, epoch)`.
  """

  def __init__(self, num_examples: int, global_batch_size: int, seed: int):
    if global_batch_size > num_examples:
      raise ValueError(f"global_batch_size={global_batch_size} is larger than the dataset "
                       f"({num_examples} examples)")
    self._n, self._b, self._seed = num_examples, global_batch_size, seed
    self._steps_per_epoch = num_examples // global_batch_size
    self._epoch, self._permutation = -1, np.empty(0, np.int64)  # cache of the current epoch

  def __call__(self, step: int) -> np.ndarray:
    epoch, within = divmod(step, self._steps_per_epoch)
    if epoch != self._epoch:
      rng = np.random.default_rng([self._seed, _UNIFORM_STREAM, epoch])
      self._epoch, self._permutation = epoch, rng.permutation(self._n)
    return self._permutation[within * self._b:(within + 1) * self._b]


class _PKSampler:
  """P identities × K images per global batch, drawn from `(seed, step)` alone.

  The P identities are distinct (uniform among those with at least one image);
  the K images of each are distinct where the identity has at least K images and
  drawn with replacement where it has fewer. The batch is identity-major:
  positions [k·K, (k+1)·K) share an identity.
  """

  def __init__(self, labels: np.ndarray, num_identities: int, num_images: int, seed: int):
    order = np.argsort(labels, kind="stable")
    _, starts = np.unique(labels[order], return_index=True)
    self._groups = np.split(order, starts[1:])
    if num_identities > len(self._groups):
      raise ValueError(f"pk_identities={num_identities} but the data has only "
                       f"{len(self._groups)} identities")
    self._p, self._k, self._seed = num_identities, num_images, seed

  def __call__(self, step: int) -> np.ndarray:
    rng = np.random.default_rng([self._seed, _PK_STREAM, step])
    chosen = rng.choice(len(self._groups), size=self._p, replace=False)
    return np.concatenate([
        rng.choice(self._groups[c], size=self._k, replace=len(self._groups[c]) < self._k)
        for c in chosen])


def _flips(seed: int, step: int, global_batch_size: int) -> np.ndarray:
  """Flip decision of each position of global batch `step`: `(B,) bool`."""
  return np.random.default_rng([seed, _FLIP_STREAM, step]).random(global_batch_size) < 0.5


class _Failure:
  """A producer exception, carried to the consumer."""

  def __init__(self, error: BaseException):
    self.error = error


def _put(out: queue.Queue, stop: threading.Event, item: Any) -> bool:
  while not stop.is_set():
    try:
      out.put(item, timeout=0.05)
      return True
    except queue.Full:
      pass
  return False


def _produce(out: queue.Queue, stop: threading.Event, make_batch, start_step: int,
             num_threads: int) -> None:
  # The producer must not reference the iterator, or the iterator could never be collected.
  with concurrent.futures.ThreadPoolExecutor(num_threads, thread_name_prefix="arcjax-decode") as pool:
    step = start_step
    while not stop.is_set():
      try:
        batch = make_batch(pool, step)
      except BaseException as error:  # pylint: disable=broad-except
        _put(out, stop, _Failure(error))
        return
      if not _put(out, stop, batch):
        return
      step += 1


class BatchIterator(Iterator[dict[str, np.ndarray]]):
  """The iterator `batches` returns; `close()` (or `with`, or garbage collection) stops its threads."""

  def __init__(self, make_batch, start_step: int, num_threads: int, prefetch: int):
    self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
    self._stop = threading.Event()
    self._thread = threading.Thread(
        target=_produce, args=(self._queue, self._stop, make_batch, start_step, num_threads),
        name="arcjax-prefetch", daemon=True)
    self._thread.start()
    # Runs at collection or exit; only signals, since collection may happen on any thread.
    self._finalizer = weakref.finalize(self, self._stop.set)

  def __next__(self) -> dict[str, np.ndarray]:
    while not self._stop.is_set():
      try:
        item = self._queue.get(timeout=0.1)
      except queue.Empty:
        if not self._thread.is_alive() and self._queue.empty():
          raise RuntimeError("the prefetch thread died without a batch or an error") from None
        continue
      if isinstance(item, _Failure):
        self.close()
        raise item.error
      return item
    raise StopIteration

  def close(self) -> None:
    """Stops the producer and its decoding threads and waits for them."""
    self._stop.set()
    if self._thread is not threading.current_thread():
      self._thread.join()

  def __enter__(self) -> "BatchIterator":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def batches(source: Source, *, global_batch_size: int, seed: int, start_step: int = 0,
            process_index: int = 0, process_count: int = 1,
            image_size: tuple[int, int] | None = None, flip: bool = True, sampler: str = "uniform",
            pk_identities: int | None = None, pk_images: int | None = None,
            num_threads: int = 4, prefetch: int = 2) -> BatchIterator:
  """Endless host-local batches `{'image': (B/P, H, W, C) uint8, 'label': (B/P,) int32}`.

  Args:
    source: meets the source contract (`arcjax.data.sources`).
    global_batch_size: B, over all `process_count` hosts; must be divisible by it.
    seed: non-negative; with the step, fixes every batch and flip.
    start_step: the first step to yield (resume from a checkpoint's step).
    process_index, process_count: this host's slice of each global batch.
    image_size: `(H, W)` to resize to (PIL bilinear); None keeps the source's
      size, which must then be the same for every image.
    flip: random horizontal flip with probability 1/2 per position.
    sampler: 'uniform' (epochs of permutations, remainder dropped) or 'pk'
      (`pk_identities` × `pk_images` per global batch, see `_PKSampler`).
    num_threads: decoding threads; prefetch: batches kept ready.

  Raises ValueError on inconsistent arguments; while iterating, on an image of
  the wrong shape or a label outside [0, source.num_classes) (naming the example).
  """
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be positive and divisible "
                     f"by process_count={process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
  if seed < 0 or start_step < 0:
    raise ValueError(f"seed={seed} and start_step={start_step} must be non-negative")
  if num_threads < 1 or prefetch < 1:
    raise ValueError(f"num_threads={num_threads} and prefetch={prefetch} must be at least 1")
  if sampler == "uniform":
    sample = _UniformSampler(len(source), global_batch_size, seed)
  elif sampler == "pk":
    if pk_identities is None or pk_images is None or pk_identities * pk_images != global_batch_size:
      raise ValueError(f"sampler='pk' needs pk_identities × pk_images = global_batch_size; got "
                       f"{pk_identities} × {pk_images} and {global_batch_size}")
    sample = _PKSampler(np.asarray(source.labels), pk_identities, pk_images, seed)
  else:
    raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
  image_size = None if image_size is None else tuple(image_size)
  shape = _example_shape(source, image_size)
  local = global_batch_size // process_count
  lo, hi = process_index * local, (process_index + 1) * local

  def make_batch(pool: concurrent.futures.Executor, step: int) -> dict[str, np.ndarray]:
    indices = sample(step)[lo:hi]
    flips = _flips(seed, step, global_batch_size)[lo:hi] if flip else None
    images, labels = _load(pool, num_threads, source, indices, flips, image_size, shape)
    return {"image": images, "label": labels.astype(np.int32)}

  return BatchIterator(make_batch, start_step, num_threads, prefetch)

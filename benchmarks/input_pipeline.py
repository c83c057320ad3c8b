"""Input pipeline: today's thread/queue `pipeline.batches` against grain, on JPEG `.rec` data.

Writes `--images` synthetic 112×112 JPEGs to a `.rec` (the writer of
`benchmarks.recordio_throughput`), then measures, in one run and interleaved,
passes of `--images // --batch` batches of each pipeline (median of `--repeats`):

  (a) pipeline.batches   2 decode threads, prefetch 2 (today)
  grain steps            MapDataset.range(steps).map(batch of step) →
                         to_iter_dataset(ReadOptions(2 threads, 2 batches)):
                         each thread decodes a whole batch
  grain elements         MapDataset.range(steps·B).map(example of position) →
                         to_iter_dataset(2 threads, 2·B images) → batch(B)
  grain steps, 2 procs   grain steps → mp_prefetch(2 worker processes, 1 thread each)
  grain native           MapDataset.source(rec).seed(s).shuffle().repeat().random_map(flip)
                         → to_iter_dataset(2 threads, 2·B images) → batch(B): grain's order

Each pass creates its iterator, so its start-up counts in images/s; the steady
rate (after the first few batches) and the time to the first batch are shown
apart. grain steps/elements take the examples and flips of step t from the same
(seed, t) functions as `pipeline.batches` (`_UniformSampler`, `_flips`), and
grain steps decodes with the same code (`_fill`), so only the scheduling
differs. The run checks, per pipeline, whether its first batches equal today's
bit for bit, and whether resuming at a step t of the second epoch
(`get_state` after t batches, `set_state` on a fresh iterator) gives batch t.

  python -m benchmarks.input_pipeline [--images 8192] [--batch 128] [--repeats 3] [--smoke]
"""

import argparse
from collections.abc import Callable, Iterator
import multiprocessing
import pathlib
import statistics
import tempfile
import threading
import time

from absl import flags
import grain
import numpy as np

from arcjax.data import pipeline
from arcjax.data.recordio import RecordIOSource
from benchmarks.recordio_throughput import write_synthetic

Batch = dict[str, np.ndarray]
# pipeline.batches' own pieces: what a grain pipeline must reproduce, bit for bit.
# pylint: disable=protected-access
_UniformSampler, _flips, _fill = pipeline._UniformSampler, pipeline._flips, pipeline._fill
_check_labels, _example_shape = pipeline._check_labels, pipeline._example_shape
# pylint: enable=protected-access


class StepPlan:
  """Today's `(seed, step) → (example indices, flips)` of this host's slice of global batch `step`."""

  def __init__(self, num_examples: int, global_batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    self._args = (num_examples, global_batch_size, seed)
    self._seed, self._batch = seed, global_batch_size
    local = global_batch_size // process_count
    self._lo, self._hi = process_index * local, (process_index + 1) * local
    self._init()

  def _init(self) -> None:
    # The sampler caches one epoch's permutation: grain calls it from several threads.
    self._sampler = _UniformSampler(*self._args)
    self._lock = threading.Lock()

  def __getstate__(self) -> dict:  # a lock cannot be pickled for grain's worker processes
    return {k: v for k, v in self.__dict__.items() if k not in ("_sampler", "_lock")}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._init()

  def __len__(self) -> int:
    return self._hi - self._lo

  def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    with self._lock:
      indices = self._sampler(step)[self._lo:self._hi].copy()
    flips = _flips(self._seed, step, self._batch)[self._lo:self._hi]
    return indices, flips


class BatchOfStep:
  """grain `map`: step → today's batch of that step, decoded in the calling thread."""

  def __init__(self, source: RecordIOSource, plan: StepPlan):
    self._source, self._plan = source, plan
    self._shape = _example_shape(source, None)

  def __call__(self, step: int) -> Batch:
    indices, flips = self._plan(int(step))
    images = np.empty((len(indices), *self._shape), np.uint8)
    labels = np.empty((len(indices),), np.int64)
    _fill(self._source, indices, flips, None, images, labels, range(len(indices)))
    _check_labels(indices, labels, self._source.num_classes)
    return {"image": images, "label": labels.astype(np.int32)}


class ExampleOfPosition:
  """grain `map`: position `step·B + j` → example `j` of today's batch `step` (image flipped or not)."""

  def __init__(self, source: RecordIOSource, plan: StepPlan):
    self._source, self._plan = source, plan

  def __call__(self, position: int) -> Batch:
    step, j = divmod(int(position), len(self._plan))
    indices, flips = self._plan(step)
    image, label = self._source[int(indices[j])]
    return {"image": image[:, ::-1] if flips[j] else image, "label": np.int32(label)}


def _flip(example: tuple[np.ndarray, int], rng: np.random.Generator) -> Batch:
  image, label = example
  return {"image": image[:, ::-1] if rng.random() < 0.5 else image, "label": np.int32(label)}


def today(source: RecordIOSource, batch: int, seed: int, *, start_step: int = 0,
          threads: int = 2) -> pipeline.BatchIterator:
  """(a): `pipeline.batches`, `threads` decoding threads."""
  return pipeline.batches(source, global_batch_size=batch, seed=seed, start_step=start_step,
                          num_threads=threads)


def grain_steps(source: RecordIOSource, batch: int, seed: int, num_steps: int, *, start_step: int = 0,
                threads: int = 2, buffer: int = 2, workers: int = 0) -> Iterator[Batch]:
  """Today's batches as a grain MapDataset over steps; `workers` > 0 adds `mp_prefetch`."""
  plan = StepPlan(len(source), batch, seed)
  ds = grain.MapDataset.range(start_step, num_steps).map(BatchOfStep(source, plan))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer))
  if workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=buffer))
  return iter(ds)


def grain_elements(source: RecordIOSource, batch: int, seed: int, num_steps: int, *,
                   threads: int = 2, buffer_batches: int = 2) -> Iterator[Batch]:
  """Today's batches from a grain MapDataset over positions, decoded per image, batched after."""
  plan = StepPlan(len(source), batch, seed)
  ds = grain.MapDataset.range(num_steps * batch).map(ExampleOfPosition(source, plan))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                            prefetch_buffer_size=buffer_batches * batch))
  return iter(ds.batch(batch, drop_remainder=True))


def grain_native(source: RecordIOSource, batch: int, seed: int, *, threads: int = 2,
                 buffer_batches: int = 2) -> Iterator[Batch]:
  """grain's own deterministic order: index_shuffle per epoch, Philox flips per position."""
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat().random_map(_flip)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                            prefetch_buffer_size=buffer_batches * batch))
  return iter(ds.batch(batch, drop_remainder=True))


def _close(it: Iterator, settle_s: float = 10.0) -> None:
  """Closes `it` and waits (up to `settle_s`) for grain's worker processes to exit, so that
  a pipeline's shutdown does not eat into the next one's measurement."""
  close = getattr(it, "close", None)
  if close is not None:
    close()
  deadline = time.perf_counter() + settle_s
  while multiprocessing.active_children() and time.perf_counter() < deadline:
    time.sleep(0.01)


def time_pass(make: Callable[[], Iterator[Batch]], steps: int, skip: int) -> tuple[float, float, float]:
  """Seconds of a fresh iterator to its first batch, to its `skip`-th and to its `steps`-th."""
  start = time.perf_counter()
  it = make()
  marks = []
  for i in range(steps):
    next(it)
    if i in (0, skip - 1):
      marks.append(time.perf_counter() - start)
  end = time.perf_counter() - start
  _close(it)
  return marks[0], marks[-1], end


def _same(a: Batch, b: Batch) -> bool:
  return a.keys() == b.keys() and all(
      a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def _take(it: Iterator[Batch], n: int) -> list[Batch]:
  return [next(it) for _ in range(n)]


def matches_today(make: Callable[[], Iterator[Batch]], reference: list[Batch]) -> bool:
  """Whether the first batches of `make()` equal `reference` (today's, bit for bit)."""
  it = make()
  try:
    return all(_same(a, b) for a, b in zip(_take(it, len(reference)), reference))
  finally:
    _close(it)


def resumes(make: Callable[[], Iterator[Batch]], t: int) -> bool:
  """Whether `set_state(state after t batches)` on a fresh iterator gives batch t again."""
  it = make()
  _take(it, t)
  state = it.get_state()
  expected = next(it)
  _close(it)
  fresh = make()
  try:
    fresh.set_state(state)
    return _same(next(fresh), expected)
  finally:
    _close(fresh)


def today_resumes(source: RecordIOSource, batch: int, seed: int, t: int) -> bool:
  """Whether `pipeline.batches(start_step=t)` starts with the batch t of an uninterrupted run."""
  with today(source, batch, seed) as it:
    expected = _take(it, t + 1)[-1]
  with today(source, batch, seed, start_step=t) as it:
    return _same(next(it), expected)


def pipelines(source: RecordIOSource, batch: int, seed: int) -> dict[str, Callable[[int], Iterator[Batch]]]:
  """The measured pipelines by name, each `num_steps → a fresh iterator`; (a) first."""
  return {
      "(a) `pipeline.batches`, 2 threads": lambda n: today(source, batch, seed),
      "grain steps, 2 threads": lambda n: grain_steps(source, batch, seed, n),
      "grain elements, 2 threads": lambda n: grain_elements(source, batch, seed, n),
      "grain steps, 2 processes × 1 thread":
          lambda n: grain_steps(source, batch, seed, n, threads=1, workers=2),
      "grain native, 2 threads": lambda n: grain_native(source, batch, seed),
  }


def check(source: RecordIOSource, batch: int, seed: int, check_steps: int,
          resume_at: int) -> tuple[dict[str, tuple[bool | None, bool]], bool]:
  """Per pipeline `(first batches = today's, resume at resume_at = batch t)` (None: (a) itself),
  and whether grain steps started at `resume_at` begins with today's batch `resume_at`."""
  runs = pipelines(source, batch, seed)
  horizon = resume_at + check_steps + 1
  with today(source, batch, seed) as it:
    reference = _take(it, check_steps)
  checks = {name: (matches_today(lambda make=make: make(horizon), reference),
                   resumes(lambda make=make: make(horizon), resume_at))
            for name, make in list(runs.items())[1:]}
  checks = {next(iter(runs)): (None, today_resumes(source, batch, seed, resume_at)), **checks}
  started = grain_steps(source, batch, seed, horizon, start_step=resume_at)
  with today(source, batch, seed, start_step=resume_at) as it:
    start_matches = _same(next(started), next(it))
  _close(started)
  return checks, start_matches


def measure(source: RecordIOSource, batch: int, seed: int, steps: int, skip: int, repeats: int,
            warmup: int) -> dict[str, list[tuple[float, float, float]]]:
  """`time_pass` of every pipeline, `repeats` times, interleaved, after `warmup` untimed rounds."""
  runs = pipelines(source, batch, seed)
  times = {name: [] for name in runs}
  for round_ in range(warmup + repeats):
    for name, make in runs.items():
      elapsed = time_pass(lambda make=make: make(steps), steps, skip)
      if round_ >= warmup:
        times[name].append(elapsed)
  return times


def _markdown(rows: list[tuple], header: tuple) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _yes(flag: bool | None) -> str:
  return "(reference)" if flag is None else ("yes" if flag else "no")


def table(times: dict[str, list[tuple[float, float, float]]], checks: dict[str, tuple[bool | None, bool]],
          batch: int, steps: int, skip: int) -> str:
  """The markdown table: medians over passes, and ratios to the first pipeline (a)."""
  rows, base = [], None
  for name, passes in times.items():
    whole = statistics.median(batch * steps / end for _, _, end in passes)
    steady = statistics.median(batch * (steps - skip) / (end - after) for _, after, end in passes)
    first = statistics.median(first for first, _, _ in passes)
    base = base or (whole, steady)
    rows.append((name, f"{whole:,.0f}", f"{whole / base[0]:.3f}",
                 f"{steady:,.0f}", f"{steady / base[1]:.3f}",
                 f"{first * 1e3:,.0f}", *(_yes(flag) for flag in checks[name])))
  return _markdown(rows, ("pipeline", "images/s", "of (a)", f"images/s after {skip} batches", "of (a)",
                          "1st batch ms", "batches = today's", "resume = batch t"))


def main(argv: list[str] | None = None) -> None:
  """Parses `argv`, checks determinism and resume, measures every pipeline, prints the table."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=8192)
  parser.add_argument("--identities", type=int, default=256)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--check-steps", type=int, default=4, help="batches compared with today's")
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, one pass, no warm-up: for CI")
  args = parser.parse_args(argv)
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain reads its absl flags (defaults here) while iterating
  if args.smoke:
    (args.images, args.identities, args.batch, args.repeats, args.warmup,
     args.check_steps) = 256, 16, 32, 1, 0, 2
  steps = args.images // args.batch
  resume_at = steps + 1  # inside the second epoch: past the sampler's epoch boundary
  skip = min(4, steps // 2)  # batches left out of the steady rate: buffers fill during start-up
  with tempfile.TemporaryDirectory() as tmp:
    prefix = pathlib.Path(tmp) / "train"
    write_synthetic(prefix, args.images, args.identities)
    source = RecordIOSource(prefix)
    checks, start_matches = check(source, args.batch, args.seed, args.check_steps, resume_at)
    times = measure(source, args.batch, args.seed, steps, skip, args.repeats, args.warmup)
  print(f"{args.images} JPEGs 112×112 in a .rec, batch {args.batch}, {steps} batches per pass, "
        f"median of {args.repeats}; {args.check_steps} batches compared, resume at step {resume_at}")
  print(table(times, checks, args.batch, steps, skip))
  print(f"grain steps started at step {resume_at} (MapDataset.range(t, …)) = today's "
        f"batches(start_step={resume_at}): {_yes(start_matches)}")


if __name__ == "__main__":
  main()

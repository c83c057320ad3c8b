"""Throughput of insightface's `.rec` on this machine: raw reads vs reads + JPEG decode + batching.

Writes `--images` synthetic 112×112 RGB JPEGs (smooth faces-like content, about
the size of MS1MV2's) to a `.rec` in a temporary directory, then measures in one
run, as images/s (median of `--repeats` passes over `--batches` random batches):

  raw        RecordIOSource.encoded(i) for every index of a batch (bytes only)
  decode xT  encoded + decode_image into a (B, 112, 112, 3) uint8 batch, T threads
  pipeline   arcjax.data.pipeline.batches (decode, flip, prefetch), 2 threads

and each decoded figure as a ratio to raw.

  python -m benchmarks.recordio_throughput [--images 8192] [--batch 128] [--smoke]
"""

import argparse
import concurrent.futures
import io
import pathlib
import statistics
import tempfile
import time

import numpy as np
from PIL import Image

from arcjax.data.images import decode_image
from arcjax.data.pipeline import batches
from arcjax.data.recordio import RecordIOSource, write_recordio

_SIZE = 112


def _jpegs(count: int, seed: int) -> list[bytes]:
  """`count` distinct smooth 112×112 RGB JPEGs (quality 95, as insightface's files)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:_SIZE, 0:_SIZE] / _SIZE
  out = []
  for _ in range(count):
    a, b, c = rng.uniform(1, 6, 3)
    base = np.stack([np.sin(a * xx + b * yy + c * k) for k in range(3)], -1)
    image = 127.5 + 90 * base + rng.normal(0, 12, base.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=95)
    out.append(buffer.getvalue())
  return out


def write_synthetic(prefix: pathlib.Path, images: int, identities: int) -> float:
  """Writes `images` synthetic JPEGs (512 distinct ones, cycled) of `identities` sorted labels to
  `prefix`.rec/.idx (and `property`); returns the seconds the write took."""
  distinct = _jpegs(min(512, images), seed=0)
  labels = np.sort(np.arange(images) % identities)
  start = time.perf_counter()
  write_recordio(prefix, ((distinct[i % len(distinct)], int(labels[i])) for i in range(images)),
                 (_SIZE, _SIZE))
  return time.perf_counter() - start


def _raw(source: RecordIOSource, indices: np.ndarray) -> None:
  for batch in indices:
    for i in batch:
      source.encoded(i)


def _decode_into(source: RecordIOSource, batch: np.ndarray, out: np.ndarray, lo: int, hi: int) -> None:
  for j in range(lo, hi):
    out[j] = decode_image(source.encoded(batch[j]))


def _decoded(source: RecordIOSource, indices: np.ndarray, pool: concurrent.futures.Executor,
             threads: int) -> None:
  bounds = np.linspace(0, indices.shape[1], threads + 1).astype(int)
  for batch in indices:
    images = np.empty((len(batch), _SIZE, _SIZE, 3), np.uint8)
    futures = [pool.submit(_decode_into, source, batch, images, lo, hi)
               for lo, hi in zip(bounds[:-1], bounds[1:])]
    for future in futures:
      future.result()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=8192)
  parser.add_argument("--identities", type=int, default=256)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--batches", type=int, default=24)
  parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--smoke", action="store_true", help="256 images, 1 repeat (CI)")
  args = parser.parse_args()
  if args.smoke:
    args.images, args.identities, args.batch, args.batches, args.threads, args.repeats = (
        256, 16, 32, 4, [2], 1)

  with tempfile.TemporaryDirectory() as tmp:
    prefix = pathlib.Path(tmp) / "train"
    write_s = write_synthetic(prefix, args.images, args.identities)
    start = time.perf_counter()
    source = RecordIOSource(prefix)
    open_s = time.perf_counter() - start
    rec_mb = prefix.with_suffix(".rec").stat().st_size / 2**20
    print(f"{args.images} images, {rec_mb:.1f} MiB ({rec_mb * 2**20 / args.images / 1024:.1f} KiB/image); "
          f"write {args.images / write_s:.0f} images/s; open (label pass) {open_s * 1e3:.1f} ms")

    rng = np.random.default_rng(1)
    indices = rng.integers(0, len(source), (args.batches, args.batch))
    runs = {"raw": lambda: _raw(source, indices)}
    pools = {t: concurrent.futures.ThreadPoolExecutor(t) for t in args.threads}
    for t, pool in pools.items():
      runs[f"decode x{t}"] = lambda pool=pool, t=t: _decoded(source, indices, pool, t)

    def pipeline():
      with batches(source, global_batch_size=args.batch, seed=0, flip=True, num_threads=2) as it:
        for _ in range(args.batches):
          next(it)

    runs["pipeline"] = pipeline
    for run in runs.values():
      run()  # warm: page cache, thread start-up
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
      for name, run in runs.items():
        start = time.perf_counter()
        run()
        times[name].append(time.perf_counter() - start)
    for pool in pools.values():
      pool.shutdown()

  count = args.batches * args.batch
  rates = {name: count / statistics.median(t) for name, t in times.items()}
  print(f"batches of {args.batch}, {args.batches} batches per pass, median of {args.repeats}")
  print("| reader | images/s | of raw |")
  print("|---|---|---|")
  for name, rate in rates.items():
    print(f"| {name} | {rate:,.0f} | {rate / rates['raw']:.4f} |")


if __name__ == "__main__":
  main()

"""Timing shared by the benchmarks: warm, interleaved, median."""

import statistics
import time
from typing import Any, Callable

import jax


def interleaved_seconds(fns: dict[str, Callable[..., Any]], args: tuple,
                        repeats: int) -> dict[str, list[float]]:
  """Wall times of each `fn(*args)`, `repeats` each, after one warm-up call each (compiles).

  The repeats are interleaved (fn1, fn2, fn1, fn2, …) so that drift of the
  machine hits every function alike; the i-th time of each comes from the same round.
  """
  for fn in fns.values():
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return times


def median_seconds(fns: dict[str, Callable[..., Any]], args: tuple,
                   repeats: int) -> dict[str, float]:
  """Median wall time of each `fn(*args)` (`interleaved_seconds`)."""
  return {name: statistics.median(t)
          for name, t in interleaved_seconds(fns, args, repeats).items()}

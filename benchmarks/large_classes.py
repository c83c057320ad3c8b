"""Millions of classes on one device: the head's margin softmax whole vs class-chunked.

Forward + backward (w.r.t. embeddings and centres) of `head.margin_softmax` with
`chunk_size=0` (the B×C logits at once, the softmax kept for the backward) and
with `chunk_size` > 0 (a scan over class chunks, recomputed in the backward
pass), ArcFace s=64, m=0.5.

Memory: XLA's buffer assignment of each compiled forward+backward
(`compiled.memory_analysis()`): `temp` (every intermediate) + `output` (the
loss and the gradients, the (C, d) centre gradient dW included) is what one
call allocates on top of its arguments (x, W, labels). On CPU the executable
allocates exactly these buffers, so this is the call's peak above its inputs.
(`jax.devices()[0].memory_stats()` is None on the CPU backend, and the
process's VmHWM / ru_maxrss proved unreliable here: pages touched by XLA's
worker threads reach the kernel's counters late, and repeated runs of one
case gave 0.13 and 0.67 GB.) "above W" is temp + output; "above W and dW"
leaves out the gradient too, i.e. what the loss itself needs.

Time: median of repeats, the two losses interleaved in one process; a case
whose buffers do not fit in the free memory is compiled but not run.

  python -m benchmarks.large_classes [--classes 100000 1000000 2000000]
      [--chunk-size 2048] [--repeats 3] [--smoke]
"""

import argparse
import re

import jax

from arcjax import head, margins
from benchmarks import timing

ARCFACE = margins.make_margin(m2=0.5)


def _loss_fns(chunk_size: int) -> dict:
  plain = lambda x, w, y: head.margin_softmax(x, w, y, margin=ARCFACE, s=64.0)[0]
  chunked = lambda x, w, y: head.margin_softmax(x, w, y, margin=ARCFACE, s=64.0,
                                                chunk_size=chunk_size)[0]
  return {name: jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
          for name, fn in [("plain", plain), ("chunked", chunked)]}


def _inputs(batch: int, dim: int, num_classes: int):
  kx, kw, ky = jax.random.split(jax.random.key(0), 3)
  return (jax.random.normal(kx, (batch, dim)), jax.random.normal(kw, (num_classes, dim)),
          jax.random.randint(ky, (batch,), 0, num_classes))


def _available_bytes() -> int:
  with open("/proc/meminfo") as f:
    return 1024 * int(re.search(r"MemAvailable:\s+(\d+)", f.read()).group(1))


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=512)
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000, 2_000_000])
  parser.add_argument("--chunk-size", type=int, default=2048)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repeat (CI)")
  args = parser.parse_args()
  if args.smoke:
    args.batch, args.dim, args.classes, args.chunk_size, args.repeats = 32, 16, [4096], 512, 1

  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), B={args.batch}, "
        f"d={args.dim}, chunk_size={args.chunk_size}, forward+backward, "
        f"median of {args.repeats}; memory in GiB")
  print("| C | W | plain above W | chunked above W | ratio | plain above W+dW "
        "| chunked above W+dW | ratio | plain s | chunked s | time ratio |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for num_classes in args.classes:
    inputs = _inputs(args.batch, args.dim, num_classes)
    centres = 4 * num_classes * args.dim
    above, runnable = {}, {}
    for name, fn in _loss_fns(args.chunk_size).items():
      compiled = fn.lower(*inputs).compile()
      stats = compiled.memory_analysis()
      above[name] = stats.temp_size_in_bytes + stats.output_size_in_bytes
      if above[name] < 0.9 * _available_bytes():
        runnable[name] = compiled
    seconds = timing.median_seconds(runnable, inputs, args.repeats)
    time_of = lambda name: f"{seconds[name]:.2f}" if name in seconds else "does not fit"
    ratio = (f"{seconds['chunked'] / seconds['plain']:.3f}" if len(seconds) == 2 else "-")
    print(f"| {num_classes} | {_gib(centres)} | {_gib(above['plain'])} | "
          f"{_gib(above['chunked'])} | {above['chunked'] / above['plain']:.3f} | "
          f"{_gib(above['plain'] - centres)} | {_gib(above['chunked'] - centres)} | "
          f"{(above['chunked'] - centres) / (above['plain'] - centres):.4f} | "
          f"{time_of('plain')} | {time_of('chunked')} | {ratio} |", flush=True)
    del inputs, runnable


if __name__ == "__main__":
  main()

"""Per-step time of a pack of N runs (`train.make_pack_step`) against the N runs' solo steps.

The CPU setting (the tiny CNN, batch 128, 32×32 grey images, 200 classes) with the
runs of the seeded table5 grid (norm_softmax, arcface, ns_intra, ns_inter, triplet,
then again with the next seed): for each N, the N solo steps (each run's own compiled
step, one after another) and one pack step, timed in one process on fixed batches,
interleaved (solo, then each pack formulation, `--repeats` times, each `--steps`
steps). The pack is formed two ways (`make_pack_step(vectorize=...)`): 'unrolled' (each
run's step written once in the one program, the default on CPU) and 'vmapped' (vmap over
the run axis: batched matrix products, convolutions grouped over the runs, the default on
accelerators). Ratios < 1 are a pack faster than its runs alone. Compile: all N solo
steps' against the pack's.

  python -m benchmarks.pack_step [--runs 1 3 5 15] [--forms unrolled vmapped] [--smoke]
"""

import argparse
import functools
import statistics
import time

import jax
import numpy as np

from arcjax import sharding
from arcjax import train
from configs import ablations

ROWS = ("norm_softmax", "arcface", "ns_intra", "ns_inter", "triplet")
NUM_CLASSES, IMAGE_SHAPE = 200, (32, 32, 1)


def _configs(count: int, batch_size: int):
  configs = []
  for i in range(count):
    config = ablations.get_config(ROWS[i % len(ROWS)])
    config.seed = i // len(ROWS)
    config.train.batch_size = batch_size
    if config.data.sampler == "pk":
      config.data.pk_identities = batch_size // config.data.pk_images
    configs.append(config)
  return configs


def _batch(rng, shape):
  return {"image": rng.integers(0, 256, (*shape, *IMAGE_SHAPE), dtype=np.uint8),
          "label": rng.integers(0, NUM_CLASSES, shape).astype(np.int32)}


def _timed(step, state, batch, steps: int):
  """(seconds per step, the new state) of `steps` warm steps."""
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - start) / steps, state


def benchmark(count: int, forms: list[str], batch_size: int, repeats: int, steps: int) -> dict:
  """Seconds per step (each repeat) of N solo steps and of the pack in each formulation."""
  configs = _configs(count, batch_size)
  par = sharding.parallelism_for(configs[0].train, configs[0].head)
  init = lambda config: par.init(functools.partial(
      train.create_train_state, config, num_classes=NUM_CLASSES, image_shape=IMAGE_SHAPE),
      jax.random.key(config.seed))
  rng = np.random.default_rng(0)
  batches = [par.put_batch(_batch(rng, (batch_size,))) for _ in configs]
  states = [init(config) for config in configs]
  start = time.perf_counter()
  solos = [train.make_train_step(config, par, NUM_CLASSES, state)
           for config, state in zip(configs, states)]
  for i, solo in enumerate(solos):  # compiles
    states[i], metrics = solo(states[i], batches[i])
  jax.block_until_ready(metrics)
  compile_s = {"solo": time.perf_counter() - start}
  active = np.ones(count, bool)
  pack_batch = par.put_batch(_batch(rng, (count, batch_size)), runs=True)
  packs = {}
  for kind in forms:
    pack_states = train.stack_runs([init(config) for config in configs])
    start = time.perf_counter()
    pack = train.make_pack_step(configs, par, NUM_CLASSES, pack_states,
                                vectorize=kind == "vmapped")
    step = functools.partial(lambda pack, states, batch: pack(states, batch, active), pack)
    pack_states, metrics = step(pack_states, pack_batch)
    jax.block_until_ready(metrics)
    compile_s[kind] = time.perf_counter() - start
    packs[kind] = [step, pack_states]

  def solo_steps(states, _):
    for i, solo in enumerate(solos):
      states[i], _ = solo(states[i], batches[i])
    return states, {"done": states[-1].step}

  seconds = {"solo": [], **{kind: [] for kind in forms}}
  for _ in range(repeats):
    took, states = _timed(solo_steps, states, None, steps)
    seconds["solo"].append(took)
    for kind, (step, pack_states) in packs.items():
      took, packs[kind][1] = _timed(step, pack_states, pack_batch, steps)
      seconds[kind].append(took)
  return {"seconds": seconds, "compile_s": compile_s}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", nargs="+", type=int, default=[1, 3, 5, 15])
  parser.add_argument("--forms", nargs="+", choices=["unrolled", "vmapped"],
                      default=["unrolled", "vmapped"])
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--steps", type=int, default=5, help="steps per timed repeat")
  parser.add_argument("--smoke", action="store_true", help="N = 2 at batch 8, once (CI)")
  args = parser.parse_args()
  if args.smoke:
    args.runs, args.batch_size, args.repeats, args.steps = [2], 8, 1, 1

  devices = jax.local_devices()
  print(f"devices: {len(devices)} × {devices[0].device_kind} ({jax.default_backend()}); "
        f"tiny CNN, batch {args.batch_size} per run, {IMAGE_SHAPE}, {NUM_CLASSES} classes; "
        f"{args.repeats} interleaved repeats of {args.steps} steps")
  columns = ["runs", "solo ms/step (N runs)"]
  for kind in args.forms:
    columns += [f"pack {kind} ms/step", f"{kind} / solo (median, range)"]
  columns += ["compile s: solo (all N)", *(f"{kind}" for kind in args.forms)]
  print("| " + " | ".join(columns) + " |")
  print("|" + "---|" * len(columns))
  for count in args.runs:
    r = benchmark(count, args.forms, args.batch_size, args.repeats, args.steps)
    solo = r["seconds"]["solo"]
    cells = [str(count), f"{statistics.median(solo) * 1e3:.0f}"]
    for kind in args.forms:
      ratios = [pack / alone for pack, alone in zip(r["seconds"][kind], solo)]
      cells += [f"{statistics.median(r['seconds'][kind]) * 1e3:.0f}",
                f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"]
    cells += [f"{r['compile_s'][kind]:.1f}" for kind in ("solo", *args.forms)]
    print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  main()

"""Throughput of the jitted train step: images/s, FLOPs per image and MFU.

For each model and compute dtype, builds the real train step (backbone,
ArcFace head over `--classes` identities, SGD) data-parallel over every local
device ('mesh' mode), compiles it, then times warm steps on a fixed batch
(median of `--repeats`, each `--steps` steps). The model FLOPs per image are
XLA's count for the compiled step (forward + backward + update, from
`cost_analysis()`) divided by the global batch; with `--peak-tflops` (the
device's dense peak for the dtype, e.g. 989 for an H100 SXM in bfloat16) it
prints MFU = FLOPs/image × images/s / (peak × devices).

  python -m benchmarks.train_step [--models iresnet50 tiny_cnn] [--batch-per-device 8]
      [--dtypes float32 bfloat16] [--peak-tflops 989] [--smoke]
"""

import argparse
import functools
import statistics
import time

import jax
import numpy as np

from arcjax import sharding
from arcjax import train
from configs import default

# (H, W, C) of each model's benchmark input: faces for the paper's backbones,
# the default dataset's images for the tiny CNN.
IMAGE_SHAPES = {"tiny_cnn": (32, 32, 1)}
FACE_SHAPE = (112, 112, 3)


def _step_and_inputs(name: str, dtype: str, batch_per_device: int, classes: int):
  config = default.get_config()
  config.model.update(name=name, dtype=dtype, embedding_dim=512)
  config.train.parallel = "mesh"
  par = sharding.parallelism_for(config.train, config.head)
  shape = IMAGE_SHAPES.get(name, FACE_SHAPE)
  batch_size = batch_per_device * par.num_devices
  rng = np.random.default_rng(0)
  batch = par.put_batch({
      "image": rng.integers(0, 256, (batch_size, *shape), dtype=np.uint8),
      "label": rng.integers(0, classes, batch_size).astype(np.int32)})
  state = par.init(functools.partial(train.create_train_state, config, num_classes=classes,
                                     image_shape=shape), jax.random.key(0))
  step = train.make_train_step(config, par, classes, state)
  return step, par.to_step(state), batch, batch_size, shape


def _flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list):  # older JAX: one dict per program
    analysis = analysis[0]
  return float(analysis.get("flops", float("nan")))


def benchmark(name: str, dtype: str, batch_per_device: int, classes: int, repeats: int,
              steps: int) -> dict:
  """Images/s (median over repeats) and XLA's FLOPs per image of one configuration."""
  step, state, batch, batch_size, shape = _step_and_inputs(name, dtype, batch_per_device,
                                                           classes)
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    rates.append(steps * batch_size / (time.perf_counter() - start))
  return {"model": name, "dtype": dtype, "shape": shape, "batch": batch_size,
          "images_per_s": statistics.median(rates), "flops_per_image": _flops(compiled) / batch_size,
          "compile_s": compile_s, "loss": float(np.asarray(metrics["loss"]))}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=["iresnet50", "tiny_cnn"])
  parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
  parser.add_argument("--batch-per-device", type=int, default=8)
  parser.add_argument("--classes", type=int, default=10_572, help="CASIA-WebFace's identities")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--steps", type=int, default=3, help="steps per timed repeat")
  parser.add_argument("--peak-tflops", type=float, default=None,
                      help="dense peak TFLOP/s of one device in the dtype, for MFU")
  parser.add_argument("--smoke", action="store_true", help="tiny CNN, 1 repeat of 1 step (CI)")
  args = parser.parse_args()
  if args.smoke:
    args.models, args.dtypes, args.batch_per_device, args.repeats, args.steps = (
        ["tiny_cnn"], ["float32", "bfloat16"], 4, 1, 1)

  devices = jax.local_devices()
  print(f"devices: {len(devices)} × {devices[0].device_kind} ({jax.default_backend()}); "
        f"{args.batch_per_device} images per device; {args.classes} classes; "
        f"median of {args.repeats} × {args.steps} warm steps")
  columns = ["model", "input", "dtype", "batch", "images/s", "GFLOP/image", "TFLOP/s", "compile s"]
  if args.peak_tflops:
    columns.append("MFU")
  print("| " + " | ".join(columns) + " |")
  print("|" + "---|" * len(columns))
  for name in args.models:
    for dtype in args.dtypes:
      r = benchmark(name, dtype, args.batch_per_device, args.classes, args.repeats, args.steps)
      achieved = r["flops_per_image"] * r["images_per_s"] / 1e12
      cells = [name, "×".join(map(str, r["shape"])), dtype, str(r["batch"]),
               f"{r['images_per_s']:.1f}", f"{r['flops_per_image'] / 1e9:.3f}",
               f"{achieved:.3f}", f"{r['compile_s']:.1f}"]
      if args.peak_tflops:
        cells.append(f"{achieved / (args.peak_tflops * len(devices)):.1%}")
      line = "| " + " | ".join(cells) + " |"
      print(line, flush=True)


if __name__ == "__main__":
  main()

"""Writes a run's backbone as ONNX, checked with onnxruntime before it reports success.

  python -m arcjax.export --workdir=runs/default [--step=N] --out=runs/default.onnx

The graph takes float32 (N, C, H, W) raw pixels in [0, 255], in the run's
channel order (RGB, or grey for one channel), with the run's normalisation
inside it (a Sub and a Mul first, where insightface's model loader looks for
them, so that it feeds raw pixels), and gives (N, d) embeddings before L2
normalisation; the batch size is free. Before writing, onnxruntime embeds
seeded random images with the graph and the largest difference from
`load_run(W).embed` (both L2-normalised, no flip fusion) is printed.
"""

import argparse
import os
import sys
from typing import Sequence

import numpy as np

from arcjax import errors

_CHECK_IMAGES = 8
# Largest difference of unit embeddings accepted: float32 graphs agree to ~1e-6; a
# bfloat16 run's own embed rounds to 8 bits of mantissa.
_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}


def export(workdir_path: str, out: str | os.PathLike, step: int | None = None
           ) -> tuple[int, float]:
  """Writes run `workdir_path`'s backbone at `step` (default: the latest) to `out`.

  Returns (the step, the largest difference between onnxruntime's unit embeddings
  and `load_run(...).embed(..., flip=False)` on seeded random images).
  """
  # pylint: disable=import-outside-toplevel  (a bad flag is reported before these load)
  import onnxruntime
  from arcjax import inference, models, workdir
  from arcjax.models import onnx_export
  out_path = workdir.as_path(out, "output file")
  run = inference.load_run(workdir_path, step)
  proto = onnx_export.backbone_to_onnx(
      models.make_model(run.config.model), run.variables, run.image_shape,
      models.normalization(run.config.model),
      doc_string=f"arcjax run {run.workdir}, checkpoint at step {run.step}")
  data = proto.SerializeToString()
  images = np.random.default_rng(0).integers(0, 256, (_CHECK_IMAGES, *run.image_shape),
                                             dtype=np.uint8)
  session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
  got = session.run(None, {session.get_inputs()[0].name:
                           images.transpose(0, 3, 1, 2).astype(np.float32)})[0]
  got = got / np.linalg.norm(got, axis=1, keepdims=True)
  difference = float(np.abs(got - run.embed(images, flip=False)).max())
  if not difference <= _TOLERANCE[run.config.model.dtype]:
    raise RuntimeError(f"the ONNX graph's embeddings differ from the run's by {difference:.3g} "
                       "(a bug in arcjax.models.onnx_export); nothing was written")
  out_path.parent.mkdir(parents=True, exist_ok=True)
  temporary = out_path.parent / f".{out_path.name}.tmp"
  temporary.write_bytes(data)
  temporary.rename(out_path)
  return run.step, difference


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m arcjax.export",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="the run's workdir (local or gs://)")
  parser.add_argument("--step", type=int, help="the checkpoint to export (default: the latest)")
  parser.add_argument("--out", required=True, help="the .onnx file to write")
  parser.add_argument("--traceback", action="store_true", help="show tracebacks of errors")
  args = parser.parse_args(argv)
  with errors.report_errors(traceback=args.traceback):
    step, difference = export(args.workdir, args.out, args.step)
    print(f"wrote {args.out}: the backbone of {args.workdir} at step {step}; onnxruntime's "
          f"unit embeddings of {_CHECK_IMAGES} random images differ from load_run(...).embed's "
          f"by at most {difference:.2e}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

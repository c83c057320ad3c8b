"""Turns an ONNX recognition model (insightface's model zoo, or `arcjax.export`'s) into a workdir.

  python -m arcjax.from_onnx w600k_r50.onnx --workdir=runs/w600k_r50 \
      [--input-mean=127.5 --input-std=127.5]

The architecture (IResNet-18…200, MobileFaceNet / mbf / mbf_large, tiny CNN),
the embedding width and the image size are read from the graph. The workdir
then holds what a trained run holds for inference: config.json (the default
config with those fields, the normalisation, `eval.flip` true), a checkpoint
of the backbone at step 0 (no class centres) and imported.json (the file, its
SHA-256, where the normalisation came from, which BatchNorms the graph had folded
into the conv before them). The normalisation is the graph's
own where it starts with a Sub and a Mul (as `arcjax.export` writes it), else
the flags', by default insightface's (x − 127.5) / 127.5 on RGB pixels, which
its zoo models expect outside the graph. Before anything is written, the
imported backbone embeds seeded random images and is compared with
onnxruntime on the same file; the smallest cosine is printed.
"""

import argparse
import datetime
import hashlib
import os
import sys
from typing import Sequence

import numpy as np

from arcjax import errors

# insightface's convention for its released models: (x − 127.5) / 127.5, outside the graph.
INSIGHTFACE_NORMALIZATION = (127.5, 127.5)
_CHECK_IMAGES = 8
_MIN_COSINE = 0.9999  # float32 graphs agree to ~1e-7; below this the mapping is wrong


def _check_against_onnxruntime(data: bytes, imported, normalization, in_graph: bool) -> float:
  """The smallest cosine between the imported backbone's and onnxruntime's embeddings."""
  # pylint: disable=import-outside-toplevel
  import jax
  import onnxruntime
  from arcjax import models
  images = np.random.default_rng(0).integers(0, 256, (_CHECK_IMAGES, *imported.image_shape),
                                             dtype=np.uint8)
  model = models.get_model(imported.model_name, embedding_dim=imported.embedding_dim)
  ours = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(
      imported.variables, models.normalize_images(images, normalization)), np.float64)
  pixels = images.transpose(0, 3, 1, 2).astype(np.float32)
  if not in_graph:
    pixels = (pixels - np.float32(normalization[0])) / np.float32(normalization[1])
  session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
  theirs = session.run(None, {session.get_inputs()[0].name: pixels})[0].astype(np.float64)
  return float(np.min(np.sum(ours * theirs, axis=1) / np.linalg.norm(ours, axis=1)
                      / np.linalg.norm(theirs, axis=1)))


def import_onnx(onnx_path: str | os.PathLike, workdir_path: str,
                normalization: tuple[float, float] | None = None) -> dict:
  """Writes the workdir of the ONNX model `onnx_path` (see the module docstring).

  `normalization`: (mean, std) for a graph without its own; None: insightface's.
  Returns what imported.json holds, with 'min_cosine' (against onnxruntime).
  """
  # pylint: disable=import-outside-toplevel  (a bad flag is reported before these load)
  import onnx
  from configs import default
  from arcjax import models, workdir
  from arcjax.models import onnx_import
  source = workdir.as_path(onnx_path, "ONNX file")
  if not source.is_file():
    raise errors.DataError(f"{onnx_path} does not exist")
  data = source.read_bytes()
  try:
    proto = onnx.load_from_string(data)
  except Exception as error:  # pylint: disable=broad-except  (protobuf raises several kinds)
    raise errors.DataError(f"{onnx_path} is not an ONNX model ({type(error).__name__})") from None
  try:
    imported = onnx_import.backbone_from_onnx(proto)
  except errors.ConfigError as error:
    raise errors.ConfigError(f"{onnx_path}: {error}") from None
  in_graph = imported.normalization is not None
  if in_graph and normalization is not None:
    raise errors.ConfigError(
        f"{onnx_path} normalises its input itself ((x − {imported.normalization[0]:g}) / "
        f"{imported.normalization[1]:g}); --input-mean/--input-std are for graphs without")
  normalization = imported.normalization or normalization or INSIGHTFACE_NORMALIZATION
  directory = workdir.as_path(workdir_path)
  if (directory / workdir.CONFIG).exists():
    raise errors.WorkdirError(f"{directory} already holds a run; import into a new workdir")

  config = default.get_config()
  config.model.update(name=imported.model_name, embedding_dim=imported.embedding_dim,
                      input_mean=float(normalization[0]), input_std=float(normalization[1]))
  models.check_config(config.model)
  height, width, channels = imported.image_shape
  # No data of its own: trained elsewhere. Faces: flip-fused, as insightface evaluates.
  config.data.update(name="folder", path="", image_size=(height, width), flip=True)
  config.eval.flip = True
  min_cosine = _check_against_onnxruntime(data, imported, normalization, in_graph)
  if not min_cosine >= _MIN_COSINE:
    raise RuntimeError(f"the imported backbone's embeddings differ from onnxruntime's (cosine "
                       f"{min_cosine:.6f}): a bug in arcjax.models.onnx_import; nothing written")

  record = {"onnx": os.path.abspath(onnx_path) if "://" not in os.fspath(onnx_path)
            else os.fspath(onnx_path),
            "sha256": hashlib.sha256(data).hexdigest(), "model": imported.model_name,
            "embedding_dim": imported.embedding_dim, "image_shape": [height, width, channels],
            "normalization": {"mean": normalization[0], "std": normalization[1],
                              "from": "as the graph does" if in_graph else "outside the graph"},
            # Identity plus bias here: a run starting from the model calibrates them first.
            "folded_batchnorms": list(imported.folded_batchnorms),
            "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
  lock = workdir.RunLock(directory).acquire()
  try:
    workdir.record_config(directory, config)
    checkpoints = workdir.Checkpoints(directory, keep=1)
    try:
      state = {key: {**imported.variables[key]} for key in ("params", "batch_stats")}
      checkpoints.save(0, _as_jax_arrays(state),
                       {"step": 0, "num_classes": 0, "image_shape": [height, width, channels],
                        "num_devices": 1, "parallel": "imported"})
      checkpoints.wait()
    finally:
      checkpoints.close()
    workdir.write_json(directory / workdir.IMPORTED, record)
  finally:
    lock.release()
  return {**record, "min_cosine": min_cosine}


def _as_jax_arrays(tree: dict) -> dict:
  """A nested dict of NumPy arrays as JAX arrays (what orbax saves)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  return {key: _as_jax_arrays(value) if isinstance(value, dict) else jnp.asarray(value)
          for key, value in tree.items()}


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m arcjax.from_onnx",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("onnx", help="the .onnx recognition model")
  parser.add_argument("--workdir", required=True, help="the new workdir to write")
  parser.add_argument("--input-mean", type=float,
                      help="the model's pixel mean, for a graph that does not normalise itself "
                      f"(default: insightface's {INSIGHTFACE_NORMALIZATION[0]})")
  parser.add_argument("--input-std", type=float,
                      help="the model's pixel std, likewise "
                      f"(default: insightface's {INSIGHTFACE_NORMALIZATION[1]})")
  parser.add_argument("--traceback", action="store_true", help="show tracebacks of errors")
  args = parser.parse_args(argv)
  with errors.report_errors(traceback=args.traceback):
    normalization = None
    if args.input_mean is not None or args.input_std is not None:
      normalization = (INSIGHTFACE_NORMALIZATION[0] if args.input_mean is None else args.input_mean,
                       INSIGHTFACE_NORMALIZATION[1] if args.input_std is None else args.input_std)
    record = import_onnx(args.onnx, args.workdir, normalization)
    h, w, c = record["image_shape"]
    norm = record["normalization"]
    print(f"imported {args.onnx} as {record['model']} (d = {record['embedding_dim']}, "
          f"{h}×{w}×{c}, pixels (x − {norm['mean']:g}) / {norm['std']:g}, {norm['from']}) into "
          f"{args.workdir}; smallest cosine to onnxruntime's embeddings of "
          f"{_CHECK_IMAGES} random images: {record['min_cosine']:.7f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""A trained run as a model: its config, its class centres, and the embedding of new images.

    run = inference.load_run("runs/default")          # the latest checkpoint
    run.embed(["a.png", "b.png"])                      # (2, d) float32 unit rows
    run.embed(images_uint8_nhwc)                       # or encoded bytes, or a mix
    run.centres                                        # (C, d) float32; sub-center: (C, K, d); (0, d) imported

Images go through the run's own preprocessing: decoded, resized to the
config's `data.image_size` (PIL bilinear, as in training), given the channel
count the model was trained on, normalised as its config says
(`config.model.input_mean` / `input_std`); they are embedded in batches of one
compiled shape. A workdir made by `python -m arcjax.from_onnx` loads the same
way; it has no centres (`Run.require_centres` says so in one line). `embedder` is the one place the trainer's
evaluators, `python -m arcjax.evaluate` and `load_run` embed images.
"""

import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from arcjax import errors
from arcjax import models
from arcjax import verification
from arcjax import workdir
from arcjax.data import images as image_ops

# What a run's checkpoints hold besides the optimiser state: all that inference needs.
MODEL_KEYS = ("params", "batch_stats", "head")
Images = (np.ndarray | str | os.PathLike | bytes
          | Sequence[bytes | str | os.PathLike | np.ndarray])


def embedder(model_config: ml_collections.ConfigDict) -> Callable[[Any, np.ndarray], jax.Array]:
  """embed(variables, images (B, H, W, C) uint8) -> (B, d) float32 embeddings, jitted."""
  model = models.make_model(model_config)
  mean_std = models.normalization(model_config)

  @jax.jit
  def embed(variables, images):
    return model.apply(variables, models.normalize_images(images, mean_std), train=False)

  return embed


def batch_size_for(eval_batch_size: int, *set_sizes: int) -> int:
  """One batch size for image sets of these sizes: `eval.batch_size`, or less if every set is
  smaller (no call padded to more images than any set holds)."""
  return max(1, min(eval_batch_size, max(set_sizes)))


def _as_uint8(image: Any, index: int) -> np.ndarray:
  """One image, given as a path, encoded bytes or an array, as (H, W, C) uint8; errors name
  the image by its index and, for a path, its file."""
  what = f"image {index}"
  if isinstance(image, (str, os.PathLike)):
    what = f"image {index} ({os.fspath(image)})"
    try:
      image = workdir.as_path(image, "image").read_bytes()
    except FileNotFoundError:
      raise errors.DataError(f"{what} does not exist") from None
    except IsADirectoryError:
      raise errors.DataError(f"{what} is a folder, not an image file") from None
  if isinstance(image, (bytes, bytearray)):
    try:
      return image_ops.decode_image(bytes(image))
    except ValueError as error:
      raise errors.DataError(f"{what}: {error}") from None
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim not in (2, 3):
    raise errors.DataError(f"{what}: expected uint8 (H, W[, C]), got {image.dtype} "
                           f"{image.shape}")
  return image[..., None] if image.ndim == 2 else image


def _as_list(images: Images) -> list[Any]:
  """`images` as a list of single images: one path or encoded image becomes a list of one."""
  if isinstance(images, (str, os.PathLike, bytes, bytearray)):
    return [images]
  if isinstance(images, np.ndarray):
    if images.ndim != 4:
      raise errors.DataError(f"an array of images must be (N, H, W, C) uint8, got {images.dtype} "
                             f"{images.shape}; for one image pass [image]")
    return list(images)
  return list(images)


def preprocess(images: Images, image_shape: tuple[int, int, int]) -> np.ndarray:
  """Images as the model was trained on them: (N, H, W, C) uint8 of `image_shape`.

  `images`: see `Run.embed`. Resized with the training pipeline's resize; grey
  images are repeated to 3 channels and colour ones averaged to 1 where the
  model wants it.
  """
  height, width, channels = image_shape
  images = _as_list(images)
  out = np.empty((len(images), height, width, channels), np.uint8)
  for i, image in enumerate(images):
    out[i] = image_ops.with_channels(image_ops.resize_image(_as_uint8(image, i), (height, width)),
                                     channels)
  return out


@dataclasses.dataclass(frozen=True)
class Run:
  """A trained run: `config`, `step`, `centres` (C, d) float32, `variables` of the backbone.

  A sub-center ArcFace run's `centres` are its (C, K, d) sub-centres as trained: which
  one is "the" class centre depends on data (the dominant one, closest to the most of
  the class's images: `angles.dominant_subcentres(run.embed(images), labels,
  run.centres)`), and the loss's own angle to a class is the smallest to its K.

  `image_shape`: (H, W, C) the model was trained on; `embed_fn`: `embedder(config.model)`;
  `imported_from`: the ONNX file of a workdir made by `arcjax.from_onnx` (else None);
  `folded_batchnorms`: the paths of its BatchNorms that the graph had folded into the conv
  before them (imported.json's), to be calibrated before training; None for a workdir
  imported before arcjax recorded them.
  """
  workdir: str
  config: ml_collections.ConfigDict
  step: int
  centres: np.ndarray
  variables: dict[str, Any]
  image_shape: tuple[int, int, int]
  embed_fn: Callable[[Any, np.ndarray], jax.Array]
  imported_from: str | None = None
  folded_batchnorms: tuple[str, ...] | None = ()

  def require_centres(self, what: str) -> np.ndarray:
    """The (C, d) centres, or WorkdirError (one line) saying that `what` needs them."""
    if not len(self.centres):
      origin = (f"a model imported from {self.imported_from}" if self.imported_from
                else "no class centres")
      raise errors.WorkdirError(f"{what} needs trained class centres; {self.workdir} has none "
                                f"({origin}): use what needs only embeddings (Intra, Inter "
                                "against class means: arcjax.angles.embedding_statistics)")
    return self.centres

  def embed(self, images: Images, *, batch_size: int | None = None,
            flip: bool | None = None) -> np.ndarray:
    """L2-normalised embeddings (N, d) float32 of `images`.

    `images`: a uint8 array (N, H, W, C), a list of paths, encoded images
    (bytes) or arrays, or one path or encoded image (N = 1). `flip` fuses
    each image with its mirror (default: the run's `eval.flip`); `batch_size`
    defaults to the run's `eval.batch_size`.
    """
    images = preprocess(images, self.image_shape)
    if not len(images):
      return np.zeros((0, self.centres.shape[1]), np.float32)
    batch = batch_size_for(batch_size or self.config.eval.batch_size, len(images))
    return verification.embed_images(
        lambda x: self.embed_fn(self.variables, x), images, batch_size=batch,
        flip=self.config.eval.flip if flip is None else flip).astype(np.float32)

  def features(self, images: Images, *, batch_size: int | None = None,
               flip: bool = False) -> np.ndarray:
    """The backbone's raw outputs for `images` (as `embed` takes them), before L2 normalisation.

    (N, d) float32, or with `flip` (N, 2, d): each image's, then its mirror's.
    What insightface's IJB protocol pools, where a feature's norm may weigh it.
    """
    images = preprocess(images, self.image_shape)
    batch = batch_size_for(batch_size or self.config.eval.batch_size, len(images))
    return verification.model_outputs(lambda x: self.embed_fn(self.variables, x), images,
                                      batch_size=batch, flip=flip).astype(np.float32)


def load_run(directory: str | os.PathLike, step: int | None = None) -> Run:
  """The run in `directory` (local or gs://) at checkpoint `step` (default: the latest)."""
  path = workdir.as_path(directory)
  config_path = path / workdir.CONFIG
  if not config_path.exists():
    raise errors.WorkdirError(f"{path} holds no run ({workdir.CONFIG} missing)")
  stored = workdir.read_json(config_path)
  for field, value in workdir.ADDED_FIELDS.items():  # a run from before the field existed
    section, name = field.split(".")
    stored[section].setdefault(name, value)
  config = ml_collections.ConfigDict(stored)
  # primary=False: a reader holds no lock, so it moves nothing (a trainer may be running here).
  checkpoints = workdir.Checkpoints(path, primary=False)
  try:
    steps = checkpoints.all_steps()
    if not steps:
      raise errors.WorkdirError(f"{path} holds no checkpoint yet")
    if step is None:
      step = checkpoints.newest_intact()
      if step is None:
        raise errors.WorkdirError(f"no checkpoint in {path / workdir.CHECKPOINTS} is intact")
    elif step not in steps:
      raise errors.WorkdirError(f"{path} has no checkpoint at step {step}; it has {steps}")
    elif (problem := checkpoints.integrity(step)) is not None:
      raise errors.WorkdirError(f"checkpoint {step} in {path / workdir.CHECKPOINTS} is damaged "
                                f"({problem})")
    if checkpoints.unverified(step):
      print(f"note: checkpoint {step} in {path / workdir.CHECKPOINTS} has no "
            f"{workdir.CHECKSUMS} (saved before arcjax recorded checksums): read unverified",
            flush=True)
    arrays, meta = checkpoints.restore_arrays(step, MODEL_KEYS, optional=("head",))
  finally:
    checkpoints.close()
  centres = (np.asarray(arrays["head"]["centres"][:meta["num_classes"]], np.float32)
             if "head" in arrays else np.zeros((0, config.model.embedding_dim), np.float32))
  imported = (workdir.read_json(path / workdir.IMPORTED)
              if (path / workdir.IMPORTED).exists() else None)
  folded = () if imported is None else imported.get("folded_batchnorms")
  return Run(workdir=os.fspath(path), config=config, step=step, centres=centres,
             variables={"params": arrays["params"], "batch_stats": arrays["batch_stats"]},
             image_shape=tuple(meta["image_shape"]), embed_fn=embedder(config.model),
             imported_from=None if imported is None else imported["onnx"],
             folded_batchnorms=None if folded is None else tuple(folded))

"""A trained run as a model: its config, its class centres, and the embedding of new images.

    run = inference.load_run("runs/default")          # the latest checkpoint
    run.embed(["a.png", "b.png"])                      # (2, d) float32 unit rows
    run.embed(images_uint8_nhwc)                       # or encoded bytes, or a mix
    run.centres                                        # (C, d) float32; sub-center: (C, K, d)

Images go through the run's own preprocessing: decoded, resized to the
config's `data.image_size` (PIL bilinear, as in training), given the channel
count the model was trained on, normalised as in training; they are embedded
in batches of one compiled shape. `embedder` is the one place the trainer's
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
Images = np.ndarray | Sequence[bytes | str | os.PathLike | np.ndarray]


def embedder(model_config: ml_collections.ConfigDict) -> Callable[[Any, np.ndarray], jax.Array]:
  """embed(variables, images (B, H, W, C) uint8) -> (B, d) float32 embeddings, jitted."""
  model = models.make_model(model_config)

  @jax.jit
  def embed(variables, images):
    return model.apply(variables, models.normalize_images(images), train=False)

  return embed


def batch_size_for(eval_batch_size: int, *set_sizes: int) -> int:
  """One batch size for image sets of these sizes: `eval.batch_size`, or less if every set is
  smaller (no call padded to more images than any set holds)."""
  return max(1, min(eval_batch_size, max(set_sizes)))


def _as_uint8(image: Any, index: int) -> np.ndarray:
  """One image, given as a path, encoded bytes or an array, as (H, W, C) uint8."""
  if isinstance(image, (str, os.PathLike)):
    try:
      image = workdir.as_path(image, "image").read_bytes()
    except FileNotFoundError:
      raise errors.DataError(f"image {index}: {image} does not exist") from None
  if isinstance(image, (bytes, bytearray)):
    try:
      return image_ops.decode_image(bytes(image))
    except ValueError as error:
      raise errors.DataError(f"image {index}: {error}") from None
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim not in (2, 3):
    raise errors.DataError(f"image {index}: expected uint8 (H, W[, C]), got {image.dtype} "
                           f"{image.shape}")
  return image[..., None] if image.ndim == 2 else image


def preprocess(images: Images, image_shape: tuple[int, int, int]) -> np.ndarray:
  """Images as the model was trained on them: (N, H, W, C) uint8 of `image_shape`.

  Resized with the training pipeline's resize; grey images are repeated to 3
  channels and colour ones averaged to 1 where the model wants it.
  """
  height, width, channels = image_shape
  if isinstance(images, np.ndarray) and images.ndim == 4:
    images = list(images)
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

  `image_shape`: (H, W, C) the model was trained on; `embed_fn`: `embedder(config.model)`.
  """
  workdir: str
  config: ml_collections.ConfigDict
  step: int
  centres: np.ndarray
  variables: dict[str, Any]
  image_shape: tuple[int, int, int]
  embed_fn: Callable[[Any, np.ndarray], jax.Array]

  def embed(self, images: Images, *, batch_size: int | None = None,
            flip: bool | None = None) -> np.ndarray:
    """L2-normalised embeddings (N, d) float32 of `images`.

    `images`: a uint8 array (N, H, W, C), or a list of paths, encoded images
    (bytes) or arrays. `flip` fuses each image with its mirror (default: the
    run's `eval.flip`); `batch_size` defaults to the run's `eval.batch_size`.
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
  config = ml_collections.ConfigDict(workdir.read_json(config_path))
  checkpoints = workdir.Checkpoints(path)
  try:
    steps = checkpoints.all_steps()
    if not steps:
      raise errors.WorkdirError(f"{path} holds no checkpoint yet")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise errors.WorkdirError(f"{path} has no checkpoint at step {step}; it has {steps}")
    arrays, meta = checkpoints.restore_arrays(step, MODEL_KEYS)
  finally:
    checkpoints.close()
  centres = np.asarray(arrays["head"]["centres"][:meta["num_classes"]], np.float32)
  return Run(workdir=os.fspath(path), config=config, step=step, centres=centres,
             variables={"params": arrays["params"], "batch_stats": arrays["batch_stats"]},
             image_shape=tuple(meta["image_shape"]), embed_fn=embedder(config.model))

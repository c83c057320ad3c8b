"""Datasets for arcjax: training identities and open-set verification pairs from `config.data`.

`get_datasets(config.data)` gives the training source (training identities
only, labels in [0, C_train)) and the evaluation pair sets: 'holdout' (pairs of
the held-out identities, disjoint from training) and one per verification
`.bin` file. Batches come from `arcjax.data.pipeline.batches(datasets.train, ...)`.

`data.name`:
  'omniglot'       the embedded Omniglot characters (`arcjax.data.omniglot`; the default),
                   or another copy of Omniglot at `data.path`;
  'fashion_mnist'  Debian's dataset-fashion-mnist (its 10 classes as identities), through
                   a tensorflow-datasets builder; 'digits', scikit-learn's digits, likewise;
  'folder'         one folder of images per identity at `data.path` (ORL, your own);
  'recordio'       insightface's train.rec/.idx/property at `data.path` (a folder or the .rec),
                   with the verification `*.bin` files beside it (lfw, cfp_fp, agedb_30).

A relative `data.path` is taken from the data root: the environment variable
ARCJAX_DATA if set, else the `data/` folder of the repository — never the
shell's current directory. A path in cloud storage (gs://) is copied to the
local `data.stage_dir` first (`arcjax.data.staging`).
"""

import dataclasses
import os
import pathlib
from typing import Any, NamedTuple

from etils import epath
import numpy as np

from arcjax import errors
from arcjax import workdir
from arcjax.data.sources import ArraySource, Source, Subset, open_set_split

DATA_NAMES = ("omniglot", "fashion_mnist", "digits", "folder", "recordio")
DATA_ROOT_ENV = "ARCJAX_DATA"
REPOSITORY_DATA = pathlib.Path(__file__).resolve().parents[2] / "data"
# Verification pair files (insightface's); the paper's three come with CASIA-WebFace.
BIN_SUFFIX = ".bin"


class PairSet(NamedTuple):
  """Verification pairs over a set of images, each image stored (and embedded) once.

  `images: (M, H, W, C) uint8`; `pairs: (P, 2)` int indices into them;
  `issame: (P,) bool`.
  """
  images: np.ndarray
  pairs: np.ndarray
  issame: np.ndarray


@dataclasses.dataclass(frozen=True)
class Datasets:
  """`train`: a source of the training identities, labels in [0, num_classes); `eval_sets` by name.

  `unseen`: images of identities never trained on with their labels, `(images
  (M, H, W, C) uint8, labels (M,) int)`, for the angle statistics Intra2 and
  Inter2: the held-out identities, else the first .bin with a labels file;
  None when there is neither.
  """
  train: Source
  num_classes: int
  eval_sets: dict[str, PairSet]
  unseen: tuple[np.ndarray, np.ndarray] | None = None


def data_root() -> pathlib.Path:
  """Where relative data paths start: $ARCJAX_DATA, else the repository's data/ folder."""
  return pathlib.Path(os.environ.get(DATA_ROOT_ENV) or REPOSITORY_DATA).expanduser()


def resolve(path: str | os.PathLike) -> str:
  """An absolute local path, or a cloud path as given; a relative path starts at `data_root()`."""
  text = os.fspath(path)
  if "://" in text:
    return text
  path = pathlib.Path(text).expanduser()
  return str(path if path.is_absolute() else data_root() / path)


def check_config(data_config: Any, batch_size: int | None = None) -> None:
  """Raises ConfigError naming the first `config.data` value out of range (cheap: no data read).

  `batch_size`: `config.train.batch_size`, which the P×K sampler must fill.
  """
  if data_config.name not in DATA_NAMES:
    raise errors.ConfigError(f"config.data.name must be one of {DATA_NAMES}, "
                             f"got {data_config.name!r}")
  if data_config.name in ("folder", "recordio") and not data_config.path:
    raise errors.ConfigError(f"config.data.name={data_config.name!r} needs config.data.path")
  size = data_config.image_size
  if size is not None and (len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size)):
    raise errors.ConfigError(f"config.data.image_size must be (H, W) positive ints or None, "
                             f"got {size!r}")
  if data_config.num_holdout_identities < 0 or data_config.num_holdout_identities == 1:
    raise errors.ConfigError("config.data.num_holdout_identities must be 0 or at least 2 (for "
                             "different-identity pairs), got "
                             f"{data_config.num_holdout_identities}")
  if data_config.max_pairs < 20:
    raise errors.ConfigError("config.data.max_pairs must be at least 20 (a same and a different "
                             f"pair in each of 10 folds), got {data_config.max_pairs}")
  if data_config.sampler not in ("uniform", "pk"):
    raise errors.ConfigError(f"config.data.sampler must be 'uniform' or 'pk', "
                             f"got {data_config.sampler!r}")
  if (data_config.sampler == "pk" and batch_size is not None
      and data_config.pk_identities * data_config.pk_images != batch_size):
    raise errors.ConfigError(
        "config.data.sampler='pk' needs pk_identities × pk_images = train.batch_size; got "
        f"{data_config.pk_identities} × {data_config.pk_images} and {batch_size}")


def _local_data_path(data_config: Any) -> pathlib.Path:
  """`data.path` resolved, staged to `data.stage_dir` first when it is in cloud storage."""
  path = resolve(data_config.path)
  if "://" in path:
    from arcjax.data import staging  # pylint: disable=import-outside-toplevel
    if not data_config.get("stage_dir"):
      raise errors.ConfigError(
          f"config.data.path={path} is in cloud storage: set config.data.stage_dir to a local "
          "folder to copy it to first (random reads of a train.rec over the network are slow)")
    return staging.stage(path, resolve(data_config.stage_dir))
  path = pathlib.Path(path)
  if not path.exists():
    raise errors.DataError(f"config.data.path: {path} does not exist (relative paths start at "
                           f"the data root {data_root()}, set by ${DATA_ROOT_ENV})")
  return path


def _source(data_config: Any) -> tuple[Source, pathlib.Path | None]:
  """The whole dataset named by `data_config`, and the folder its .bin files would be in."""
  # Heavy readers (tensorflow-datasets, scikit-learn) are imported by the names that use them.
  name = data_config.name
  if name == "omniglot":
    from arcjax.data import omniglot  # pylint: disable=import-outside-toplevel
    return omniglot.load(_local_data_path(data_config) if data_config.path else None), None
  if name in ("fashion_mnist", "digits"):
    from arcjax.data import tfds_builder  # pylint: disable=import-outside-toplevel
    return tfds_builder.load(name, data_dir=data_config.get("data_dir") or None), None
  path = _local_data_path(data_config)
  if name == "folder":
    from arcjax.data.folders import ImageFolderSource  # pylint: disable=import-outside-toplevel
    return ImageFolderSource(path), None
  from arcjax.data.recordio import RecordIOSource, recordio_paths  # pylint: disable=import-outside-toplevel
  return RecordIOSource(path), recordio_paths(path)[0].parent


def _bin_paths(data_config: Any, data_dir: pathlib.Path | None) -> list[epath.Path]:
  """The verification .bin files: `data.eval_bins` (names beside the data, or paths: local or
  in a bucket, each read whole once), else every .bin beside a train.rec."""
  names = list(data_config.get("eval_bins") or ())
  if not names:
    return [epath.Path(p) for p in sorted(data_dir.glob("*" + BIN_SUFFIX))] if data_dir else []
  paths = []
  for name in names:
    bare = "/" not in name and not name.endswith(BIN_SUFFIX)
    if bare and data_dir is None:
      raise errors.ConfigError(f"config.data.eval_bins names {name!r}, but only a train.rec "
                               "has .bin files beside it; give a path")
    path = (epath.Path(data_dir / (name + BIN_SUFFIX)) if bare
            else workdir.as_path(resolve(name), "verification file"))
    if not path.is_file():
      raise errors.DataError(f"verification file {path} (config.data.eval_bins) does not exist")
    paths.append(path)
  return paths


def load_bin(path: str | os.PathLike, image_size: tuple[int, int] | None
             ) -> tuple[PairSet, tuple[np.ndarray, np.ndarray] | None]:
  """A verification .bin's pairs (images resized to `image_size`), and its distinct images
  with their identity labels where a labels file is beside it (else None)."""
  from arcjax.data import pairs  # pylint: disable=import-outside-toplevel
  from arcjax.data.pipeline import load_images  # pylint: disable=import-outside-toplevel
  from arcjax.data.sources import EncodedImages  # pylint: disable=import-outside-toplevel
  encoded, issame = pairs.read_bin(path)
  images = load_images(EncodedImages(list(encoded), name=str(path)), np.arange(len(encoded)),
                       image_size=image_size)
  pair_set = PairSet(images, np.arange(len(encoded)).reshape(-1, 2), np.asarray(issame, bool))
  labels = pairs.read_bin_labels(path)
  if labels is None:
    return pair_set, None
  _, first = np.unique(np.asarray(encoded, dtype=object), return_index=True)
  return pair_set, (images[np.sort(first)], labels[np.sort(first)])


def bin_name(path: str | os.PathLike) -> str:
  """The evaluation set name of a .bin file: its name without '.bin' ('lfw')."""
  name = pathlib.Path(path).name
  return name[:-len(BIN_SUFFIX)] if name.endswith(BIN_SUFFIX) else name


def get_datasets(data_config: Any) -> Datasets:
  """Sources and evaluation sets named by `data_config` (`config.data`).

  Reads `name`, `path`, `stage_dir`, `image_size` ((H, W), or None for the
  source's size), `num_holdout_identities`, `pairs_seed` (seeds both the split
  and the pairs), `max_pairs`, `data_dir` (the TFDS cache) and `eval_bins`.
  Raises DataError (one line) for data that cannot be used.
  """
  from arcjax.data.pairs import make_verification_pairs  # pylint: disable=import-outside-toplevel
  from arcjax.data.pipeline import load_images  # pylint: disable=import-outside-toplevel
  check_config(data_config)
  try:
    source, data_dir = _source(data_config)
    image_size = data_config.get("image_size")
    image_size = None if image_size is None else tuple(image_size)
    if image_size is not None and isinstance(source, ArraySource):
      source = source.resized(image_size)
    num_holdout = int(data_config.num_holdout_identities)
    num_identities = len(np.unique(source.labels))
    if num_identities - num_holdout < 2:
      raise errors.DataError(
          f"the data has {num_identities} identities; with num_holdout_identities={num_holdout} "
          "held out, training needs at least 2")
    train_indices, holdout_indices = open_set_split(
        source.labels, num_holdout_identities=num_holdout, seed=data_config.pairs_seed)
    train = Subset(source, train_indices, relabel=True)

    eval_sets, unseen = {}, None
    if num_holdout:
      pairs, issame = make_verification_pairs(source.labels[holdout_indices],
                                              seed=data_config.pairs_seed,
                                              max_pairs=data_config.max_pairs)
      used, pairs = np.unique(pairs, return_inverse=True)
      images = load_images(source, holdout_indices[used], image_size=image_size)
      eval_sets["holdout"] = PairSet(images, pairs.reshape(-1, 2), np.asarray(issame, bool))
      unseen = (images, source.labels[holdout_indices[used]])
    for path in _bin_paths(data_config, data_dir):
      eval_sets[bin_name(path)], labelled = load_bin(path, image_size)
      unseen = unseen or labelled
  except errors.Error:
    raise
  except ValueError as error:  # a reader's complaint about the data: one line, naming it
    raise errors.DataError(str(error)) from error
  return Datasets(train=train, num_classes=train.num_classes, eval_sets=eval_sets, unseen=unseen)

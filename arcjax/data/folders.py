"""Image folders as a source (one folder per identity), and the image decoder all sources share.

An identity is a directory that directly holds image files, at any depth under
the root: ORL is `s1/1.pgm …`, Omniglot is `<alphabet>/<characterNN>/*.png`.
Its name is its path relative to the root (POSIX separators, e.g.
`Latin/character01`); labels follow the sorted names, so the label map is the
same on every machine. Hidden entries (a leading '.') and non-image files
(READMEs, licences) are ignored.
"""

from collections.abc import Sequence
import io
import os
import pathlib

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = frozenset((".bmp", ".gif", ".jpeg", ".jpg", ".pbm", ".pgm", ".png", ".ppm",
                            ".tif", ".tiff", ".webp"))
# PIL modes mapped to the mode decoded images get: grey stays one channel, colour
# becomes RGB (alpha dropped: the models take 1 or 3 channels).
_GREY_MODES = frozenset(("1", "L", "LA", "La"))
_COLOUR_MODES = frozenset(("RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"))


def decode_image(encoded: bytes) -> np.ndarray:
  """Decodes JPEG/PNG/PGM/… bytes to `(H, W, C) uint8`, C = 1 for grey images, else 3.

  1-bit images become 0/255. 16-bit and float images are refused rather than
  silently clipped to 8 bits. Raises `ValueError` on bytes PIL cannot decode.
  """
  try:
    with Image.open(io.BytesIO(encoded)) as image:
      if image.mode in _GREY_MODES:
        image = image.convert("L")
      elif image.mode in _COLOUR_MODES:
        image = image.convert("RGB")
      else:
        raise ValueError(f"unsupported image mode {image.mode!r} (only 8-bit grey or colour)")
      array = np.asarray(image, dtype=np.uint8)
  except (OSError, Image.DecompressionBombError, SyntaxError) as error:
    # PIL raises UnidentifiedImageError (an OSError) or OSError/SyntaxError on corrupt data.
    raise ValueError(f"cannot decode image ({len(encoded)} bytes): {error}") from error
  return array[..., None] if array.ndim == 2 else array


def _is_image(entry: os.DirEntry) -> bool:
  return entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES


def _scan(root: pathlib.Path) -> dict[str, list[pathlib.Path]]:
  """`{identity name: sorted image paths}` of every directory under `root` that holds images."""
  found = {}
  stack = [root]
  while stack:
    directory = stack.pop()
    with os.scandir(directory) as entries:
      entries = [e for e in entries if not e.name.startswith(".")]
    images = sorted(pathlib.Path(e.path) for e in entries if _is_image(e))
    if images:
      found[directory.relative_to(root).as_posix()] = images
    stack.extend(pathlib.Path(e.path) for e in entries if e.is_dir())
  if "." in found:
    raise ValueError(f"{root} holds images directly ({found['.'][0].name}, …); "
                     "put each identity's images in its own sub-folder")
  nested = [name for name in found if any(other.startswith(name + "/") for other in found)]
  if nested:
    raise ValueError(f"identity folder {root / nested[0]} holds images and also sub-folders "
                     "with images; an identity must be a leaf folder")
  return found


class ImageFolderSource:
  """A source over `root/<identity …>/<image>`: one leaf folder of images per identity.

  Attributes: `identity_names: list[str]` (label `c` is `identity_names[c]`),
  `paths: list[pathlib.Path]` (N,), `labels: (N,) int64`, `num_classes: int`.
  `identities`: if given, only these identity names, labelled in the given
  order; otherwise every identity found, labelled in sorted-name order.
  """

  def __init__(self, root: str | os.PathLike, *, identities: Sequence[str] | None = None):
    root = pathlib.Path(root).expanduser()
    if not root.is_dir():
      raise ValueError(f"image folder root {root} does not exist or is not a directory")
    found = _scan(root)
    if not found:
      raise ValueError(f"no images under {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    if identities is None:
      names = sorted(found)
    else:
      names = list(identities)
      unknown = [name for name in names if name not in found]
      if unknown:
        raise ValueError(f"identity {unknown[0]!r} not found under {root} "
                         f"(identities look like {next(iter(sorted(found)))!r})")
      if len(set(names)) != len(names):
        raise ValueError(f"identities {names} name an identity twice")
    self.root = root
    self.identity_names = names
    self.paths = [path for name in names for path in found[name]]
    self.labels = np.repeat(np.arange(len(names), dtype=np.int64), [len(found[n]) for n in names])
    self.num_classes = len(names)

  def __len__(self) -> int:
    return len(self.paths)

  def encoded(self, index: int) -> bytes:
    """The file bytes of example `index`, undecoded."""
    return self.paths[index].read_bytes()

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    """`(image (H, W, C) uint8, label)` of example `index`; errors name the file."""
    try:
      image = decode_image(self.encoded(index))
    except ValueError as error:
      raise ValueError(f"{self.paths[index]}: {error}") from error
    return image, int(self.labels[index])

"""Image folders as a source (one folder per identity), and the image decoding, fitting and
encoding that all sources and writers share.

An identity is a directory that directly holds image files, at any depth under
the root: ORL is `s1/1.pgm …`, Omniglot is `<alphabet>/<characterNN>/*.png`.
Its name is its path relative to the root (POSIX separators, e.g.
`Latin/character01`); labels follow the sorted names, so the label map is the
same on every machine. Hidden entries (a leading '.') and non-image files
(READMEs, licences) are ignored.

Writers (`recordio.folder_to_recordio`, `python -m arcjax.data.convert`) bring
images of another size to the one they write with a fit policy (`FITS`; the
geometry is `fit_geometry`'s docstring).
"""

from collections.abc import Iterator, Sequence
import contextlib
import io
import os
import pathlib
import tempfile
import zipfile

import numpy as np
from PIL import Image

from arcjax import errors
from arcjax.data.pipeline import resize_image

IMAGE_SUFFIXES = frozenset((".bmp", ".gif", ".jpeg", ".jpg", ".pbm", ".pgm", ".png", ".ppm",
                            ".tif", ".tiff", ".webp"))
# PIL modes mapped to the mode decoded images get: grey stays one channel, colour
# becomes RGB (alpha dropped: the models take 1 or 3 channels).
_GREY_MODES = frozenset(("1", "L", "LA", "La"))
_COLOUR_MODES = frozenset(("RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"))
FITS = ("pad", "resize", "crop")
_JPEG_QUALITY = 95  # insightface's files


def decode_image(encoded: bytes) -> np.ndarray:
  """Decodes JPEG/PNG/PGM/… bytes to `(H, W, C) uint8`, C = 1 for grey images, else 3.

  1-bit images become 0/255. 16-bit and float images are refused rather than
  silently clipped to 8 bits. Raises `errors.DataError` (a `ValueError`) on bytes
  PIL cannot decode.
  """
  try:
    with Image.open(io.BytesIO(encoded)) as image:
      if image.mode in _GREY_MODES:
        image = image.convert("L")
      elif image.mode in _COLOUR_MODES:
        image = image.convert("RGB")
      else:
        raise errors.DataError(f"unsupported image mode {image.mode!r} (only 8-bit grey or colour)")
      array = np.asarray(image, dtype=np.uint8)
  except (OSError, Image.DecompressionBombError, SyntaxError) as error:
    # PIL raises UnidentifiedImageError (an OSError) or OSError/SyntaxError on corrupt data.
    raise errors.DataError(f"cannot decode image ({len(encoded)} bytes): {error}") from error
  return array[..., None] if array.ndim == 2 else array


def _round_half_up(numerator: int, denominator: int) -> int:
  return (2 * numerator + denominator) // (2 * denominator)


def fit_geometry(height: int, width: int, size: tuple[int, int],
                 fit: str) -> tuple[tuple[int, int], tuple[int, int]]:
  """Where a `height × width` image goes when fitted to `size = (H, W)`: `((h, w), (top, left))`.

  The image is resized (bilinear, `pipeline.resize_image`) to `h × w` pixels, then
  - 'pad': pasted with its top-left corner at `(top, left)` of a black `H × W`
    canvas, `top = (H − h) // 2`, `left = (W − w) // 2`;
  - 'crop': its window of rows `[top, top + H)` and columns `[left, left + W)`
    is kept, `top = (h − H) // 2`, `left = (w − W) // 2`;
  - 'resize': `(h, w) = (H, W)` and `(top, left) = (0, 0)`: stretched to the size.
  The odd pixel of an odd difference goes to the bottom or right. 'pad' scales
  by `s = min(1, H / height, W / width)` (down only, keeping the aspect ratio);
  'crop' by `s = max(H / height, W / width)` (up or down, so that the image
  covers the canvas). Of the two sides, the one that sets `s` becomes exactly
  `H` or `W`; the other is `side · s` rounded half up (exact integer
  arithmetic). Example: ORL's 112 × 92 faces (H × W) padded to 112 × 112 stay
  112 × 92 at `(0, 10)`: 10 black columns on each side.
  """
  out_height, out_width = size
  if fit not in FITS:
    raise ValueError(f"unknown fit {fit!r}; known: {', '.join(FITS)}")
  if min(height, width, out_height, out_width) < 1:
    raise ValueError(f"sizes must be positive; got {height}x{width} to {out_height}x{out_width}")
  if fit == "resize" or (height, width) == (out_height, out_width):
    return (out_height, out_width), (0, 0)
  if fit == "pad" and height <= out_height and width <= out_width:
    scaled = (height, width)
  # H / height <= W / width, cross-multiplied: the height sets the smaller scale (pad's), else
  # the larger (crop's).
  elif (out_height * width <= out_width * height) == (fit == "pad"):
    scaled = (out_height, max(1, _round_half_up(width * out_height, height)))
  else:
    scaled = (max(1, _round_half_up(height * out_width, width)), out_width)
  sign = 1 if fit == "pad" else -1
  return scaled, (sign * (out_height - scaled[0]) // 2, sign * (out_width - scaled[1]) // 2)


def fit_image(image: np.ndarray, size: tuple[int, int], fit: str) -> np.ndarray:
  """`image: (h0, w0, C) uint8` fitted to `size = (H, W)` by `fit` ('pad' | 'resize' | 'crop').

  Returns `(H, W, C) uint8`; the geometry is `fit_geometry`'s.
  """
  (height, width), (top, left) = fit_geometry(image.shape[0], image.shape[1], size, fit)
  scaled = resize_image(image, (height, width))
  if fit == "pad":
    canvas = np.zeros((size[0], size[1], image.shape[2]), np.uint8)
    canvas[top:top + height, left:left + width] = scaled
    return canvas
  return scaled[top:top + size[0], left:left + size[1]]


def encode_image(image: np.ndarray, image_format: str) -> bytes:
  """`image: (H, W, C) uint8`, C = 1 or 3, encoded as `image_format` ('JPEG' at quality 95, 'PNG', …)."""
  buffer = io.BytesIO()
  options = {"quality": _JPEG_QUALITY} if image_format.upper() == "JPEG" else {}
  Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(buffer, format=image_format,
                                                                        **options)
  return buffer.getvalue()


def fit_encoded(encoded: bytes, size: tuple[int, int], *, fit: str | None = None,
                image_format: str | None = None) -> bytes:
  """The bytes a writer stores for the encoded image `encoded` at `size = (H, W)`.

  Decodes it (so a corrupt file fails here, not in training). `image_format`
  None keeps `encoded` as it is when the image has the size already, and
  stores a fitted image as PNG (lossless); a PIL format ('JPEG', 'PNG')
  re-encodes every image. An image of another size is fitted by `fit` (see
  `fit_geometry`), or refused with `errors.DataError` when `fit` is None.
  """
  image = decode_image(encoded)
  if image.shape[:2] == tuple(size) and image_format is None:
    return encoded
  if image.shape[:2] != tuple(size):
    if fit is None:
      raise errors.DataError(f"image is {image.shape[0]}x{image.shape[1]} (HxW), expected "
                             f"{size[0]}x{size[1]} (choose a fit: {', '.join(FITS)})")
    image = fit_image(image, size, fit)
  return encode_image(image, image_format or "PNG")


def fit_file(path: str | os.PathLike, size: tuple[int, int], *, fit: str | None = None,
             image_format: str | None = None) -> bytes:
  """`fit_encoded` of the image file at `path`; errors name the file."""
  try:
    return fit_encoded(pathlib.Path(path).read_bytes(), size, fit=fit, image_format=image_format)
  except errors.DataError as error:
    raise errors.DataError(f"{path}: {error}") from error


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
    raise errors.DataError(f"{root} holds images directly ({found['.'][0].name}, …); "
                     "put each identity's images in its own sub-folder")
  nested = [name for name in found if any(other.startswith(name + "/") for other in found)]
  if nested:
    raise errors.DataError(f"identity folder {root / nested[0]} holds images and also sub-folders "
                     "with images; an identity must be a leaf folder")
  return found


def check_zip_names(archive: zipfile.ZipFile, path: str | os.PathLike) -> None:
  """Raises DataError naming the entries of a zip that would not unpack as themselves: the
  same name twice (one would replace the other), or a name that leaves the folder it is
  unpacked to (an absolute path, a drive, a '..' part)."""
  names = archive.namelist()
  seen, duplicates = set(), []
  for name in names:
    if name in seen and name not in duplicates:
      duplicates.append(name)
    seen.add(name)
  if duplicates:
    raise errors.DataError(f"{path} holds the entr{'ies' if len(duplicates) > 1 else 'y'} "
                           f"{', '.join(duplicates[:5])}{' …' if len(duplicates) > 5 else ''} "
                           "more than once; one copy would silently replace the other")
  unsafe = [name for name in names
            if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":")
            or ".." in pathlib.PurePosixPath(name.replace("\\", "/")).parts]
  if unsafe:
    raise errors.DataError(f"{path} holds entries outside its own folder ("
                           f"{', '.join(unsafe[:5])}{' …' if len(unsafe) > 5 else ''}): "
                           "refused (absolute paths and '..' are not unpacked)")


@contextlib.contextmanager
def unpacked(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """`path` if it is a folder; if a .zip (e.g. `arcjax/data/omniglot/*.zip`), the folder it
  unpacks to, in a temporary directory removed afterwards. A zip whose entries would not
  unpack as themselves is refused (`check_zip_names`); errors raised inside that name a
  file of the temporary folder as `<zip>:<entry>`."""
  path = pathlib.Path(path).expanduser()
  if path.suffix.lower() != ".zip":
    yield path
    return
  if not path.is_file():
    raise errors.DataError(f"{path} does not exist")
  with tempfile.TemporaryDirectory(prefix="arcjax-unzip-") as folder:
    try:
      with zipfile.ZipFile(path) as archive:
        check_zip_names(archive, path)
        archive.extractall(folder)
    except zipfile.BadZipFile as error:
      raise errors.DataError(f"{path}: not a readable zip ({error})") from None
    try:
      yield pathlib.Path(folder)
    except errors.DataError as error:  # the user knows the zip, not the temporary copy
      error.args = tuple(arg.replace(folder + os.sep, f"{path}:").replace(folder, f"{path}:")
                         if isinstance(arg, str) else arg for arg in error.args)
      raise


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
      raise errors.DataError(f"image folder root {root} does not exist or is not a directory")
    found = _scan(root)
    if not found:
      raise errors.DataError(f"no images under {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    if identities is None:
      names = sorted(found)
    else:
      names = list(identities)
      unknown = [name for name in names if name not in found]
      if unknown:
        raise errors.DataError(f"identity {unknown[0]!r} not found under {root} "
                         f"(identities look like {next(iter(sorted(found)))!r})")
      if len(set(names)) != len(names):
        raise errors.DataError(f"identities {names} name an identity twice")
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
      raise errors.DataError(f"{self.paths[index]}: {error}") from error
    return image, int(self.labels[index])

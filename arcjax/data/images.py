"""Images: decoding, resizing, fitting to a size, encoding (and face alignment).

The one place where pixels are read and reshaped, used by every source
(`folders`, `recordio`, `sources.EncodedImages`, `omniglot`), the input
pipeline, the writers (`recordio`, `convert`) and `inference`. It imports no
other module of `arcjax.data`, so none of them import each other through it.
"""

import io
import os
import pathlib

import numpy as np
from PIL import Image

from arcjax import errors

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


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """`image: (h, w, C) uint8` resized to `size = (H, W)` with PIL's bilinear filter (antialiased)."""
  height, width = size
  if image.shape[:2] == (height, width):
    return image
  channels = image.shape[2]
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  resized = np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR))
  return resized.reshape(height, width, channels)


def with_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """`image: (H, W, C) uint8` with `channels` channels: grey repeated to 3, colour averaged to 1."""
  if image.shape[2] == channels:
    return image
  if image.shape[2] == 1:
    return np.repeat(image, channels, axis=2)
  return np.rint(image.mean(axis=2, keepdims=True)).astype(np.uint8)


def encoded_size(encoded: bytes) -> tuple[int, int]:
  """`(H, W)` of an encoded image, from its header alone; `errors.DataError` if it is none."""
  try:
    with Image.open(io.BytesIO(encoded)) as image:
      width, height = image.size
  except (OSError, SyntaxError) as error:
    raise errors.DataError(f"not an encoded image ({error})") from error
  return height, width


def _round_half_up(numerator: int, denominator: int) -> int:
  return (2 * numerator + denominator) // (2 * denominator)


def fit_geometry(height: int, width: int, size: tuple[int, int],
                 fit: str) -> tuple[tuple[int, int], tuple[int, int]]:
  """Where a `height × width` image goes when fitted to `size = (H, W)`: `((h, w), (top, left))`.

  The image is resized (bilinear, `resize_image`) to `h × w` pixels, then
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

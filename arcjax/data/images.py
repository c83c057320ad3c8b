"""Images: decoding, resizing, fitting to a size, encoding, and face alignment.

The one place where pixels are read and reshaped, used by every source
(`folders`, `recordio`, `sources.EncodedImages`, `omniglot`), the input
pipeline, the writers (`recordio`, `convert`), `inference` and the IJB reader
(`ijb`). It imports no other module of `arcjax.data`, so none of them import
each other through it.

Alignment is insightface's `norm_crop`: the similarity transform that takes a
face's 5 landmarks (eye centres, nose tip, mouth corners) closest to the
ArcFace template, estimated as scikit-image's `SimilarityTransform` does
(Umeyama), and the warp as OpenCV's `cv2.warpAffine` (bilinear, black
border) computes it, fixed point included; neither library is needed.
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


# insightface's 112×112 ArcFace template, (x, y) pixels of the eye centres, nose tip and mouth
# corners, as its IJB evaluation builds it (arcface_torch/eval_ijbc.py): the 96-wide template
# shifted right by 8, in float32 (the last x is one float32 step off `face_align.arcface_dst`).
ARCFACE_TEMPLATE = (np.array([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366],
                              [33.5493, 92.3655], [62.7299, 92.2041]], np.float32)
                    + np.array([8.0, 0.0], np.float32))
ARCFACE_SIZE = (112, 112)
# OpenCV's fixed point for a bilinear warp of 8-bit images (imgwarp.cpp): source positions on a
# grid of 1/32 pixel, computed from the matrix scaled by 2**10; weights in units of 2**-15.
_INTER_BITS = 5
_AB_BITS = 10
_COEF_BITS = 15


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
  """The rotation, uniform scale and translation taking `source` points closest to `target`.

  Least squares over the points, as scikit-image's `SimilarityTransform.estimate`
  (Umeyama 1991; a reflection is never chosen). In 2-D it has a closed form: with
  the points as complex numbers z (source) and w (target), centred on their
  means, the map is w = a·z with a = Σ conj(z)·w / Σ |z|² (|a| the scale, arg a
  the angle).

  Args:
    source, target: (K, 2) points (x, y), K >= 2, not all source points equal.

  Returns:
    (2, 3) float64 `[[s·cos, −s·sin, tx], [s·sin, s·cos, ty]]`: target ≈ M @ (x, y, 1).
  """
  source = np.asarray(source, np.float64)
  target = np.asarray(target, np.float64)
  if source.ndim != 2 or source.shape[1] != 2 or source.shape != target.shape or len(source) < 2:
    raise ValueError(f"similarity_transform needs two (K, 2) arrays of the same shape, K >= 2; "
                     f"got {source.shape} and {target.shape}")
  z = source[:, 0] + 1j * source[:, 1]
  w = target[:, 0] + 1j * target[:, 1]
  z_mean, w_mean = z.mean(), w.mean()
  spread = np.sum(np.abs(z - z_mean) ** 2)
  if spread == 0:
    raise ValueError("similarity_transform: the source points all coincide")
  a = np.sum(np.conj(z - z_mean) * (w - w_mean)) / spread
  shift = w_mean - a * z_mean
  return np.array([[a.real, -a.imag, shift.real], [a.imag, a.real, shift.imag]])


def _inverse_affine(matrix: np.ndarray) -> np.ndarray:
  """The inverse of a (2, 3) affine map, computed in OpenCV's order of operations."""
  (m0, m1, m2), (m3, m4, m5) = matrix
  det = m0 * m4 - m1 * m3
  det = 1.0 / det if det != 0 else 0.0
  a11, a12, a21, a22 = m4 * det, m1 * -det, m3 * -det, m0 * det
  return np.array([[a11, a12, -a11 * m2 - a12 * m5], [a21, a22, -a21 * m2 - a22 * m5]])


def _fixed(values: np.ndarray) -> np.ndarray:
  """OpenCV's saturate_cast<int> of doubles: round half to even, clipped to int32."""
  return np.clip(np.rint(values), -2**31, 2**31 - 1).astype(np.int64)


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """`image` moved by the affine `matrix` onto a black canvas of `size = (H, W)`.

  As OpenCV's `cv2.warpAffine(image, matrix, (W, H))` (bilinear, constant
  border 0): output pixel (x, y) samples the source at M⁻¹·(x, y, 1), that
  position rounded to 1/32 pixel, the four neighbours weighted in units of
  2**-15 and the sum rounded; neighbours outside the image count as 0.

  Args:
    image: (h, w, C) uint8.
    matrix: (2, 3) map from source pixel coordinates (x, y) to output ones.
    size: (H, W) of the output.

  Returns:
    (H, W, C) uint8.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3:
    raise ValueError(f"warp_affine needs a uint8 (h, w, C) image; got {image.dtype} {image.shape}")
  inverse = _inverse_affine(np.asarray(matrix, np.float64))
  height, width = size
  scale = float(1 << _AB_BITS)
  round_delta = (1 << _AB_BITS) >> (_INTER_BITS + 1)
  x, y = np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64)
  # Source positions in units of 1/32 pixel, as OpenCV's WarpAffineInvoker forms them.
  fixed_x = ((_fixed((inverse[0, 1] * y + inverse[0, 2]) * scale)[:, None] + round_delta
              + _fixed(inverse[0, 0] * x * scale)[None, :]) >> (_AB_BITS - _INTER_BITS))
  fixed_y = ((_fixed((inverse[1, 1] * y + inverse[1, 2]) * scale)[:, None] + round_delta
              + _fixed(inverse[1, 0] * x * scale)[None, :]) >> (_AB_BITS - _INTER_BITS))
  tab = 1 << _INTER_BITS
  col, row = fixed_x >> _INTER_BITS, fixed_y >> _INTER_BITS
  frac_x, frac_y = fixed_x & (tab - 1), fixed_y & (tab - 1)
  # A one-pixel black frame makes every neighbour of a position in [-1, w) × [-1, h) readable.
  padded = np.pad(image, ((1, 1), (1, 1), (0, 0))).astype(np.int64)
  inside = (col >= -1) & (col < image.shape[1]) & (row >= -1) & (row < image.shape[0])
  col, row = np.where(inside, col + 1, 0), np.where(inside, row + 1, 0)
  unit = (1 << _COEF_BITS) // (tab * tab)
  total = np.zeros((height, width, image.shape[2]), np.int64)
  for d_row, weight_y in ((0, tab - frac_y), (1, frac_y)):
    for d_col, weight_x in ((0, tab - frac_x), (1, frac_x)):
      total += padded[row + d_row, col + d_col] * (weight_y * weight_x * unit)[..., None]
  out = (total + (1 << (_COEF_BITS - 1))) >> _COEF_BITS
  return np.where(inside[..., None], np.clip(out, 0, 255), 0).astype(np.uint8)


def align_face(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
  """A face cropped as insightface crops it for recognition (`norm_crop`): (112, 112, C) uint8.

  Args:
    image: (h, w, C) uint8, the face somewhere in it (IJB's loose crops).
    landmarks: (5, 2) (x, y) pixels of the left eye, right eye, nose tip, left
      and right mouth corners (as the viewer sees them).
  """
  landmarks = np.asarray(landmarks)
  if landmarks.shape != (5, 2):
    raise ValueError(f"align_face needs (5, 2) landmarks; got shape {landmarks.shape}")
  return warp_affine(image, similarity_transform(landmarks, ARCFACE_TEMPLATE), ARCFACE_SIZE)

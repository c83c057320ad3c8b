"""arcjax.data.images: decoding, face alignment against references, and the import graph of
arcjax.data (no circle)."""

import ast
import io
import pathlib

import numpy as np
from PIL import Image
import pytest
import scipy.ndimage

from arcjax.data import images
from arcjax.data.images import decode_image, with_channels

DATA_PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "arcjax" / "data"


def _encode(image, mode=None, format="PNG"):
  buffer = io.BytesIO()
  pil = Image.fromarray(image) if mode is None else Image.fromarray(image).convert(mode)
  pil.save(buffer, format=format)
  return buffer.getvalue()


def test_decode_modes():
  rng = np.random.default_rng(1)
  grey = rng.integers(0, 256, (4, 3), dtype=np.uint8)
  rgb = rng.integers(0, 256, (4, 3, 3), dtype=np.uint8)
  np.testing.assert_array_equal(decode_image(_encode(grey)), grey[..., None])
  np.testing.assert_array_equal(decode_image(_encode(rgb)), rgb)
  np.testing.assert_array_equal(decode_image(_encode(rgb, "RGBA")), rgb)  # alpha dropped
  np.testing.assert_array_equal(decode_image(_encode(grey, format="PPM")), grey[..., None])
  bits = (grey > 127).astype(np.uint8) * 255
  np.testing.assert_array_equal(decode_image(_encode(bits, "1")), bits[..., None])  # 1-bit -> 0/255
  palette = decode_image(_encode(rgb, "P"))
  assert palette.shape == (4, 3, 3) and palette.dtype == np.uint8
  wide = Image.fromarray(np.full((2, 2), 4000, np.uint16))
  buffer = io.BytesIO()
  wide.save(buffer, format="PNG")
  with pytest.raises(ValueError, match="unsupported image mode 'I;16'"):
    decode_image(buffer.getvalue())
  with pytest.raises(ValueError, match=r"cannot decode image \(3 bytes\)"):
    decode_image(b"abc")


def test_with_channels():
  grey = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
  np.testing.assert_array_equal(with_channels(grey, 3), np.concatenate([grey] * 3, axis=2))
  rgb = np.array([[[0, 1, 3], [10, 20, 31]]], np.uint8)   # means 4/3 and 61/3
  np.testing.assert_array_equal(with_channels(rgb, 1), [[[1], [20]]])
  assert with_channels(rgb, 3) is rgb


def _umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """Umeyama (1991), eq. 40-42, as scikit-image's `_umeyama` computes it: (3, 3), float64."""
  num, dim = src.shape
  src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
  src_demean, dst_demean = src - src_mean, dst - dst_mean
  a = dst_demean.T @ src_demean / num
  d = np.ones(dim)
  if np.linalg.det(a) < 0:
    d[dim - 1] = -1
  t = np.eye(dim + 1)
  u, s, v = np.linalg.svd(a)
  t[:dim, :dim] = u @ np.diag(d) @ v
  scale = 1.0 / src_demean.var(axis=0).sum() * (s @ d)
  t[:dim, dim] = dst_mean - scale * (t[:dim, :dim] @ src_mean.T)
  t[:dim, :dim] *= scale
  return t


def test_similarity_transform_is_umeyamas_least_squares_fit():
  rng = np.random.default_rng(0)
  for _ in range(200):
    source = rng.normal(0.0, 60.0, (5, 2)) + rng.uniform(0, 200, 2)
    target = images.ARCFACE_TEMPLATE.astype(np.float64) + rng.normal(0.0, 3.0, (5, 2))
    np.testing.assert_allclose(images.similarity_transform(source, target),
                               _umeyama(source, target)[:2], rtol=1e-9, atol=1e-9)
  # Exact points of a known similarity give it back.
  angle, scale = 0.3, 1.7
  known = np.array([[scale * np.cos(angle), -scale * np.sin(angle), 12.5],
                    [scale * np.sin(angle), scale * np.cos(angle), -3.0]])
  moved = images.ARCFACE_TEMPLATE @ known[:, :2].T + known[:, 2]
  np.testing.assert_allclose(images.similarity_transform(images.ARCFACE_TEMPLATE, moved), known,
                             atol=1e-9)
  with pytest.raises(ValueError, match="coincide"):
    images.similarity_transform(np.ones((5, 2)), moved)


def test_warp_is_bilinear_interpolation_at_the_inverse_map():
  """Against SciPy's bilinear interpolation (continuous positions, no 1/32 grid): within one
  grey level on a smooth image, and exactly where the map moves by whole pixels."""
  rows, cols = np.mgrid[0:90, 0:120]
  smooth = np.stack([rows * 2, cols * 2, (rows + cols)], -1).astype(np.uint8)
  rng = np.random.default_rng(1)
  for _ in range(10):
    angle, scale = rng.uniform(-0.6, 0.6), rng.uniform(0.6, 1.6)
    matrix = np.array([[scale * np.cos(angle), -scale * np.sin(angle), rng.uniform(-20, 20)],
                       [scale * np.sin(angle), scale * np.cos(angle), rng.uniform(-20, 20)]])
    got = images.warp_affine(smooth, matrix, (80, 100)).astype(int)
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))
    out_y, out_x = np.mgrid[0:80, 0:100]
    src_x = inverse[0, 0] * out_x + inverse[0, 1] * out_y + inverse[0, 2]
    src_y = inverse[1, 0] * out_x + inverse[1, 1] * out_y + inverse[1, 2]
    want = np.stack([scipy.ndimage.map_coordinates(smooth[..., c].astype(float), [src_y, src_x],
                                                   order=1, mode="constant", cval=0.0)
                     for c in range(3)], -1)
    # Where all four neighbours are inside the image (the border blends with black).
    inside = (src_x >= 0) & (src_x <= 118.9) & (src_y >= 0) & (src_y <= 88.9)
    assert inside.mean() > 0.3
    assert np.abs(got - want)[inside].max() <= 1.0
    assert (got[~inside & ((src_x < -1.1) | (src_y < -1.1) | (src_x > 120.1))] == 0).all()
  shift = np.array([[1.0, 0.0, 7.0], [0.0, 1.0, -4.0]])   # 7 right, 4 up
  moved = images.warp_affine(smooth, shift, (90, 120))
  np.testing.assert_array_equal(moved[:86, 7:], smooth[4:, :113])
  assert (moved[:, :7] == 0).all() and (moved[86:] == 0).all()
  np.testing.assert_array_equal(images.warp_affine(smooth, np.eye(2, 3), (90, 120)), smooth)


def test_warp_rounds_positions_to_opencvs_grid_of_a_32nd_pixel():
  """Worked by hand as OpenCV's fixed point does it: a shift of 0.29 px right samples output
  x at x − 9/32 (−0.29 to the nearest 32nd), weights 23/32 and 9/32, rounded: 100 · 23/32 =
  71.9 → 72, (100 · 9 + 200 · 23)/32 = 171.9 → 172 (exact bilinear would give 71 and 171)."""
  row = np.array([[[0], [100], [200]]], np.uint8)
  got = images.warp_affine(row, np.array([[1.0, 0.0, 0.29], [0.0, 1.0, 0.0]]), (1, 3))
  np.testing.assert_array_equal(got[0, :, 0], [0, 72, 172])


def _data_imports(path: pathlib.Path) -> set[str]:
  """The modules of arcjax.data that `path` imports, at the top or inside functions."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      found.add(node.module)
      # `from arcjax.data import pairs` imports the module arcjax.data.pairs.
      found |= {f"{node.module}.{alias.name}" for alias in node.names}
  modules = {"arcjax.data." + p.stem for p in DATA_PACKAGE.glob("*.py") if p.stem != "__init__"}
  return {name for name in found if name in modules}


def test_the_data_modules_import_each_other_in_no_circle():
  graph = {"arcjax.data." + p.stem: _data_imports(p) for p in DATA_PACKAGE.glob("*.py")
           if p.stem != "__init__"}
  assert graph["arcjax.data.images"] == set()
  # Depth-first search for a back edge: a module reached again while it is on the path.
  on_path, done = [], set()

  def visit(module):
    if module in on_path:
      pytest.fail("import circle: " + " -> ".join(on_path[on_path.index(module):] + [module]))
    if module in done:
      return
    on_path.append(module)
    for imported in sorted(graph[module]):
      visit(imported)
    on_path.pop()
    done.add(module)

  for module in sorted(graph):
    visit(module)

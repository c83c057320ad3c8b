"""arcjax.data.images: decoding, and the import graph of arcjax.data (no circle)."""

import ast
import io
import pathlib

import numpy as np
from PIL import Image
import pytest

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

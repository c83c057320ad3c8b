"""`python -m arcjax.data.convert`: the fit geometry against a NumPy reference; the CLI end to end."""

from fractions import Fraction
import math
import pathlib
import re
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
from PIL import Image
import pytest

from arcjax import data
from arcjax import errors
from arcjax.data import convert
from arcjax.data.images import decode_image, fit_geometry, fit_image
from arcjax.data.pairs import read_bin, read_bin_labels
from arcjax.data.recordio import RecordIOSource

REPO = pathlib.Path(__file__).resolve().parents[1]
# (H, W) of the images of each identity, in file order: square at the size, wide, tall, large, narrow.
SHAPES = [(16, 16), (20, 12), (10, 14), (30, 40), (16, 9)]
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank"]


def _reference_fit(image: np.ndarray, size: tuple[int, int], fit: str) -> np.ndarray:
  """The fit by its definition, with exact fractions: scale, round half up, centre, pad or crop."""
  height, width = size
  h0, w0 = image.shape[:2]
  if fit == "resize":
    h, w = height, width
  else:
    scales = (Fraction(height, h0), Fraction(width, w0))
    scale = min(*scales, 1) if fit == "pad" else max(scales)
    h, w = (math.floor(side * scale + Fraction(1, 2)) for side in (h0, w0))
  scaled = image
  if (h, w) != (h0, w0):
    pil = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
    scaled = np.asarray(pil.resize((w, h), Image.Resampling.BILINEAR)).reshape(h, w, -1)
  if fit == "pad":
    canvas = np.zeros((height, width, image.shape[2]), np.uint8)
    top, left = (height - h) // 2, (width - w) // 2
    canvas[top:top + h, left:left + w] = scaled
    return canvas
  top, left = (h - height) // 2, (w - width) // 2
  return scaled[top:top + height, left:left + width]


def _smooth_image(rng: np.random.Generator, shape: tuple[int, int], channels: int) -> np.ndarray:
  """A random smooth gradient (JPEG keeps it close), values in [40, 230]."""
  y, x = np.mgrid[:shape[0], :shape[1]]
  slopes = rng.uniform(-3, 3, (2, channels))
  image = 135 + slopes[0] * (y[..., None] - shape[0] / 2) + slopes[1] * (x[..., None] - shape[1] / 2)
  return np.clip(image + rng.uniform(-20, 20, channels), 40, 230).astype(np.uint8)


@pytest.fixture
def faces(tmp_path) -> pathlib.Path:
  """6 identities × 5 images of the SHAPES, as PNG, BMP, JPEG; 'frank' grey PGM."""
  rng = np.random.default_rng(0)
  root = tmp_path / "faces"
  for name in NAMES:
    (root / name).mkdir(parents=True)
    for j, shape in enumerate(SHAPES):
      grey = name == "frank"
      image = _smooth_image(rng, shape, 1 if grey else 3)
      suffix = ".pgm" if grey else (".png", ".bmp", ".jpg")[j % 3]
      Image.fromarray(image[..., 0] if grey else image).save(root / name / f"{j}{suffix}")
  (root / "README.txt").write_text("not an identity")
  return root


def _files(root: pathlib.Path) -> dict[str, list[pathlib.Path]]:
  return {name: sorted((root / name).iterdir()) for name in NAMES}


def _run(root, out, *flags) -> None:
  assert convert.main([str(root), str(out), *flags]) == 0


# --- the fit geometry ----------------------------------------------------------------------------


@pytest.mark.parametrize("height, width, size, fit, want", [
    (112, 92, (112, 112), "pad", ((112, 92), (0, 10))),       # ORL: 10 black columns each side
    (100, 200, (112, 112), "pad", ((56, 112), (28, 0))),      # scaled down by 0.56
    (50, 60, (112, 112), "pad", ((50, 60), (31, 26))),        # never scaled up
    (51, 60, (112, 112), "pad", ((51, 60), (30, 26))),        # odd band: the extra row at the bottom
    (200, 100, (112, 112), "crop", ((224, 112), (56, 0))),
    (50, 60, (112, 112), "crop", ((112, 134), (0, 11))),      # 60 · 2.24 = 134.4 → 134
    (3, 2, (3, 3), "crop", ((5, 3), (1, 0))),                 # 3 · 1.5 = 4.5 → 5 (half up)
    (2, 3, (3, 3), "pad", ((2, 3), (0, 0))),
    (6, 4, (3, 3), "pad", ((3, 2), (0, 0))),                  # 4 · 0.5 = 2
    (112, 92, (112, 112), "resize", ((112, 112), (0, 0))),
    (112, 112, (112, 112), "crop", ((112, 112), (0, 0))),
])
def test_fit_geometry_hand_derived(height, width, size, fit, want):
  assert fit_geometry(height, width, size, fit) == want


def test_pad_of_a_constant_orl_sized_image():
  image = np.full((112, 92, 1), 77, np.uint8)
  padded = fit_image(image, (112, 112), "pad")
  assert padded.shape == (112, 112, 1)
  assert (padded[:, :10] == 0).all() and (padded[:, 102:] == 0).all() and (padded[:, 10:102] == 77).all()


@pytest.mark.parametrize("fit", ["pad", "resize", "crop"])
@pytest.mark.parametrize("size", [(16, 16), (12, 16), (40, 30)])
def test_fit_image_matches_reference(fit, size):
  rng = np.random.default_rng(1)
  for shape in SHAPES + [(1, 17), (33, 5)]:
    for channels in (1, 3):
      image = rng.integers(0, 256, (*shape, channels), dtype=np.uint8)
      got = fit_image(image, size, fit)
      assert got.shape == (*size, channels) and got.dtype == np.uint8
      np.testing.assert_array_equal(got, _reference_fit(image, size, fit), err_msg=f"{shape} {fit}")


def test_parse_size_and_default_holdout():
  assert convert.parse_size("112") == (112, 112)
  assert convert.parse_size("112x96") == (112, 96)
  for bad in ("0", "x", "112x", "1x2x3", "-4"):
    with pytest.raises(ValueError, match="must be a positive side"):
      convert.parse_size(bad)
  # 20 % rounded half up, at least 2, at most all but one; 0 when that leaves fewer than 2.
  assert [convert.default_holdout(n) for n in (2, 3, 4, 6, 10, 12, 13, 40)] == [0, 2, 2, 2, 2, 2, 3, 8]


# --- the command line ----------------------------------------------------------------------------


def _held_out_identity(bin_image: np.ndarray, fitted: dict[str, list[np.ndarray]]) -> str:
  """The identity whose fitted image `bin_image` is (exactly: PNG is lossless)."""
  found = [name for name, images in fitted.items()
           if any(np.array_equal(image, bin_image) for image in images)]
  assert len(found) == 1, found
  return found[0]


@pytest.mark.parametrize("fit, size, size_flag", [("pad", (16, 16), "16"), ("crop", (12, 16), "12x16"),
                                                  ("resize", (16, 16), "16")])
def test_png_conversion_is_the_reference_fit(faces, tmp_path, fit, size, size_flag):
  out = tmp_path / "out"
  _run(faces, out, "--size", size_flag, "--fit", fit, "--format", "png", "--seed", "3")
  fitted = {name: [_reference_fit(decode_image(f.read_bytes()), size, fit) for f in files]
            for name, files in _files(faces).items()}

  # The .bin: pairs of exactly 2 held-out identities (the default for 6), told apart by their images.
  bins, issame = read_bin(out / "holdout.bin")
  identities = [_held_out_identity(decode_image(b), fitted) for b in bins]
  held_out = sorted(set(identities))
  assert len(held_out) == 2
  # 2 identities × 5 images: 20 same and 25 different pairs, so 2 of each per fold of 10.
  assert len(issame) == 40 and issame.sum() == 20
  np.testing.assert_array_equal(issame, np.array(identities[0::2]) == np.array(identities[1::2]))
  labels = read_bin_labels(out / "holdout.bin")
  assert labels.dtype == np.int64
  np.testing.assert_array_equal(labels, [held_out.index(name) for name in identities])
  assert (out / "holdout.identities.txt").read_text().splitlines() == held_out

  # train.rec: the other identities, labelled in sorted-name order, every image the reference fit.
  train_names = sorted(set(NAMES) - set(held_out))
  assert (out / "train.identities.txt").read_text().splitlines() == train_names
  source = RecordIOSource(out)
  assert (source.num_classes, source.image_size) == (4, size)
  np.testing.assert_array_equal(source.labels, np.repeat(np.arange(4), 5))
  expected = [image for name in train_names for image in fitted[name]]
  assert len(source) == len(expected)
  for i, want in enumerate(expected):
    assert source.encoded(i).startswith(b"\x89PNG")
    np.testing.assert_array_equal(source[i][0], want)


def test_split_and_pairs_are_those_of_the_folder_pipeline(faces, tmp_path):
  """As the module docstring says: `data.name='folder'` with the same N, seed and max_pairs draws
  the same held-out pairs, whose images (resized by the pipeline: the 'resize' fit) are the .bin's."""
  shutil.rmtree(faces / "frank")  # the pipeline wants one channel count: colour only
  out = tmp_path / "out"
  _run(faces, out, "--size", "16", "--fit", "resize", "--format", "png", "--holdout-identities", "2",
       "--seed", "4", "--max-pairs", "100")
  config = ml_collections.ConfigDict({
      "name": "folder", "path": str(faces), "image_size": (16, 16), "num_holdout_identities": 2,
      "pairs_seed": 4, "max_pairs": 100, "eval_bins": (), "sampler": "uniform", "stage_dir": ""})
  datasets = data.get_datasets(config)
  holdout = datasets.eval_sets["holdout"]
  bins, issame = read_bin(out / "holdout.bin")
  np.testing.assert_array_equal(issame, holdout.issame)
  images = np.stack([decode_image(b) for b in bins])
  np.testing.assert_array_equal(images[0::2], holdout.images[holdout.pairs[:, 0]])
  np.testing.assert_array_equal(images[1::2], holdout.images[holdout.pairs[:, 1]])
  assert datasets.num_classes == RecordIOSource(out).num_classes == 3


def test_jpeg_conversion_is_close_to_the_reference_fit(faces, tmp_path, capsys):
  out = tmp_path / "out"
  _run(faces, out, "--size", "16", "--holdout-identities", "3", "--max-pairs", "60", "--seed", "1")
  printed = capsys.readouterr().out
  source = RecordIOSource(out)
  train_names = (out / "train.identities.txt").read_text().splitlines()
  assert len(train_names) == 3 and source.num_classes == 3
  files = [f for name in train_names for f in _files(faces)[name]]
  wants = [_reference_fit(decode_image(f.read_bytes()), (16, 16), "pad").astype(float) for f in files]
  for i, file in enumerate(files):
    assert source.encoded(i).startswith(b"\xff\xd8")  # JPEG
    got = source[i][0].astype(float)
    # JPEG at quality 95 of a 16 × 16 image with black bands: off by 1.6 on average, 4.3 at worst
    # (200 random images); and nearer its own reference than any other image's.
    distances = [np.abs(got - want).mean() for want in wants]
    assert distances[i] < 6.0 and np.argmin(distances) == i, file
  bins, issame = read_bin(out / "holdout.bin")
  # 3 × 5 images: 30 same and 75 different pairs; at most 60 pairs: 3 of each per fold.
  assert len(issame) == 60 and all(b.startswith(b"\xff\xd8") for b in bins)
  labels = read_bin_labels(out / "holdout.bin")
  assert set(labels.tolist()) == {0, 1, 2}
  assert not set(train_names) & set((out / "holdout.identities.txt").read_text().splitlines())
  assert "wrote 15 images of 3 training identities (16x16)" in printed
  assert "wrote 60 verification pairs (30 same, 30 different) of" in printed
  assert f'--config.data.path={out.resolve()} --config.data.image_size="(16, 16)"' in printed
  assert "python -m arcjax.main --config=configs/ablations.py:arcface,setting=paper" in printed


def test_keep_format_keeps_bytes_of_images_at_the_size(faces, tmp_path):
  out = tmp_path / "out"
  _run(faces, out, "--size", "16", "--format", "keep", "--holdout-identities", "0")
  assert not (out / "holdout.bin").exists()
  source = RecordIOSource(out)
  for i, file in enumerate(f for name in NAMES for f in _files(faces)[name]):
    data = file.read_bytes()
    if decode_image(data).shape[:2] == (16, 16):
      assert source.encoded(i) == data
    else:
      assert source.encoded(i).startswith(b"\x89PNG")
      np.testing.assert_array_equal(source[i][0], _reference_fit(decode_image(data), (16, 16), "pad"))


def test_refuses_to_overwrite_unless_asked(faces, tmp_path, capsys):
  out = tmp_path / "out"
  _run(faces, out, "--size", "16")
  before = {path.name: path.read_bytes() for path in out.iterdir()}
  assert sorted(before) == sorted(convert.output_names("holdout"))
  with pytest.raises(SystemExit) as exit_info:
    convert.main([str(faces), str(out), "--size", "16", "--seed", "5"])
  assert exit_info.value.code == 1
  assert capsys.readouterr().err == (f"error: {out / 'train.rec'} already exists; refusing to "
                                     "overwrite it (--overwrite replaces the outputs)\n")
  assert {path.name: path.read_bytes() for path in out.iterdir()} == before

  # --overwrite replaces the set; with nothing held out, the old .bin and its labels go too.
  _run(faces, out, "--size", "16", "--overwrite", "--holdout-identities", "0")
  assert RecordIOSource(out).num_classes == 6
  assert sorted(path.name for path in out.iterdir()) == ["property", "train.identities.txt",
                                                         "train.idx", "train.rec"]
  _run(faces, out, "--size", "16", "--overwrite", "--holdout-identities", "4")
  assert RecordIOSource(out).num_classes == 2 and len(read_bin(out / "holdout.bin")[1]) > 0


def test_failure_leaves_nothing_behind(faces, tmp_path, capsys):
  (faces / "erin" / "9.png").write_bytes(b"\x89PNG but truncated")
  out = tmp_path / "out"
  with pytest.raises(SystemExit):
    convert.main([str(faces), str(out), "--size", "16", "--holdout-identities", "0"])
  err = capsys.readouterr().err
  assert err.startswith(f"error: {faces / 'erin' / '9.png'}: cannot decode image")
  assert err.count("\n") == 1
  assert not out.exists()
  # With --traceback the same error keeps its traceback.
  with pytest.raises(errors.DataError, match=r"erin/9\.png: cannot decode image"):
    convert.main([str(faces), str(out), "--size", "16", "--holdout-identities", "0", "--traceback"])


@pytest.mark.parametrize("flags, message", [
    (["--holdout-identities", "1"], "--holdout-identities 1: hold out 0 or at least 2 identities"),
    (["--holdout-identities", "6"], "--holdout-identities 6: .* has 6"),
    (["--bin-name", "a/b"], "--bin-name 'a/b' must be a plain file name"),
])
def test_bad_arguments_are_one_line_errors(faces, tmp_path, capsys, flags, message):
  with pytest.raises(SystemExit) as exit_info:
    convert.main([str(faces), str(tmp_path / "out"), "--size", "16", *flags])
  assert exit_info.value.code == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1
  assert re.search(message, err), err


def test_too_few_images_for_pairs(tmp_path, capsys):
  for name in ("a", "b", "c"):
    (tmp_path / "faces" / name).mkdir(parents=True)
    for j in range(2):
      Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "faces" / name / f"{j}.png")
  with pytest.raises(SystemExit):
    convert.main([str(tmp_path / "faces"), str(tmp_path / "out"), "--size", "16",
                  "--holdout-identities", "2"])
  err = capsys.readouterr().err
  # 2 identities × 2 images: 2 same-identity pairs, fewer than one per fold of 10.
  assert err.startswith("error: too few held-out images for verification pairs: 4 examples of 2 "
                        "identities give 2 same-identity") and err.count("\n") == 1
  assert not (tmp_path / "out").exists()


def _convert_subprocess(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "arcjax.data.convert", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300, check=False)


def test_command_line_errors_are_one_line(faces, tmp_path):
  missing = _convert_subprocess(str(tmp_path / "nowhere"), str(tmp_path / "out"), "--size", "16")
  assert missing.returncode == 1
  assert missing.stderr == (f"error: image folder root {tmp_path / 'nowhere'} does not exist or is "
                            "not a directory\n")
  (faces / "bob" / "7.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
  broken = _convert_subprocess(str(faces), str(tmp_path / "out"), "--size", "16")
  assert broken.returncode == 1 and "Traceback" not in broken.stderr
  assert broken.stderr.startswith(f"error: {faces / 'bob' / '7.jpg'}: cannot decode image")
  assert broken.stderr.count("\n") == 1 and not (tmp_path / "out").exists()


def test_orl_faces(shared_datasets, tmp_path, capsys):
  orl, out = shared_datasets / "orl_faces", tmp_path / "orl"
  _run(orl, out, "--size", "112", "--fit", "pad", "--format", "png")
  assert "wrote 320 images of 32 training identities (112x112)" in capsys.readouterr().out
  source = RecordIOSource(out)
  assert (source.num_classes, source.image_size, len(source)) == (32, (112, 112), 320)
  np.testing.assert_array_equal(np.bincount(source.labels), np.full(32, 10))
  train_names = (out / "train.identities.txt").read_text().splitlines()
  held_out = (out / "holdout.identities.txt").read_text().splitlines()
  assert len(held_out) == 8 and sorted(train_names + held_out) == sorted(f"s{i}" for i in range(1, 41))
  # ORL is 112 × 92: padding adds 10 black columns each side and leaves the face untouched.
  for i in (0, 157, 319):
    name, number = train_names[source.labels[i]], i % 10
    face = np.asarray(Image.open(sorted((orl / name).glob("*.pgm"))[number]))
    image = source[i][0][..., 0]
    assert (image[:, :10] == 0).all() and (image[:, 102:] == 0).all()
    np.testing.assert_array_equal(image[:, 10:102], face)
  # 8 × 10 images: S = 8 · 45 = 360, D = 3160 − 360 = 2800; min(6000 // 20, 36, 280) = 36 a fold.
  bins, issame = read_bin(out / "holdout.bin")
  assert (len(issame), issame.sum(), len(bins)) == (720, 360, 1440)
  # Each image of the .bin is a held-out face padded by hand; its label is its name's rank.
  padded = {np.pad(np.asarray(Image.open(f)), ((0, 0), (10, 10))).tobytes(): name
            for name in held_out for f in (orl / name).glob("*.pgm")}
  identities = [padded[decode_image(b)[..., 0].tobytes()] for b in bins]
  np.testing.assert_array_equal(read_bin_labels(out / "holdout.bin"),
                                [held_out.index(name) for name in identities])
  np.testing.assert_array_equal(issame, np.array(identities[0::2]) == np.array(identities[1::2]))


def _zip_of(path: pathlib.Path, entries: list[tuple[str, np.ndarray]]) -> pathlib.Path:
  """A zip of PNG images under the given entry names (a name may repeat)."""
  import io  # pylint: disable=import-outside-toplevel
  import warnings  # pylint: disable=import-outside-toplevel
  import zipfile  # pylint: disable=import-outside-toplevel
  with zipfile.ZipFile(path, "w") as archive, warnings.catch_warnings():
    warnings.simplefilter("ignore")  # zipfile warns of a duplicate name; that is the point here
    for name, image in entries:
      buffer = io.BytesIO()
      Image.fromarray(image).save(buffer, format="PNG")
      archive.writestr(name, buffer.getvalue())
  return path


def _people(count: int = 3, images: int = 3) -> list[tuple[str, np.ndarray]]:
  return [(f"faces/s{person}/{i}.png", np.full((16, 16), 10 * person + i, np.uint8))
          for person in range(1, count + 1) for i in range(images)]


def test_a_zip_with_an_entry_twice_is_refused_naming_it(tmp_path, capsys):
  """The second faces/s1/1.png, another person's face, would replace s1's own: refused."""
  archive = _zip_of(tmp_path / "faces.zip",
                    _people() + [("faces/s1/1.png", np.full((16, 16), 255, np.uint8))])
  with pytest.raises(SystemExit):
    convert.main([str(archive), str(tmp_path / "out"), "--size", "16",
                  "--holdout-identities", "0"])
  err = capsys.readouterr().err
  assert err == (f"error: {archive} holds the entry faces/s1/1.png more than once; one copy "
                 "would silently replace the other\n")
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("entry", ["../evil/1.png", "/abs/evil/1.png", "faces/../../evil.png"])
def test_a_zip_with_an_entry_outside_its_folder_is_refused(tmp_path, capsys, entry):
  archive = _zip_of(tmp_path / "faces.zip", _people() + [(entry, np.zeros((16, 16), np.uint8))])
  with pytest.raises(SystemExit):
    convert.main([str(archive), str(tmp_path / "out"), "--size", "16",
                  "--holdout-identities", "0"])
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and f"holds entries outside its own folder ({entry})" in err, err


def test_an_identity_with_sub_folders_is_one_line_naming_the_zip_s_entry(tmp_path):
  archive = _zip_of(tmp_path / "faces.zip",
                    _people() + [("faces/s1/more/9.png", np.zeros((16, 16), np.uint8))])
  result = _convert_subprocess(str(archive), str(tmp_path / "out"), "--size", "16")
  assert result.returncode == 1 and result.stdout == ""
  assert result.stderr == (f"error: identity folder {archive}:faces/s1 holds images and also "
                           "sub-folders with images; an identity must be a leaf folder\n")

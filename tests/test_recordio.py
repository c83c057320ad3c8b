"""insightface's RecordIO: round trips, split records, flag > 0 labels and every corrupt-input error."""

import io
import pickle
import struct

import numpy as np
from PIL import Image
import pytest

from arcjax import errors
from arcjax.data.folders import ImageFolderSource
from arcjax.data.images import decode_image
from arcjax.data.recordio import (RecordIOError, RecordIOSource, folder_to_recordio, recordio_paths,
                                  write_recordio)

MAGIC_BYTES = struct.pack("<I", 0xCED7230A)


def _png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def _jpeg(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def _synthetic_items(sizes=(3, 1, 4), shape=(12, 10, 3), seed=0):
  """Grouped (encoded bytes, label) items: sizes[c] random images of label c."""
  rng = np.random.default_rng(seed)
  items = []
  for label, size in enumerate(sizes):
    for _ in range(size):
      image = rng.integers(0, 256, shape, dtype=np.uint8)
      items.append(((_png if len(items) % 2 else _jpeg)(image), label))
  return items


def _reference_records(rec: bytes) -> list[tuple[list[int], bytes]]:
  """Walks a .rec front to back as dmlc-core's RecordIOReader::NextRecord does.

  Returns `(cflags of its parts, payload)` per logical record; independent of the
  .idx and of arcjax's reader.
  """
  records, pos = [], 0
  while pos < len(rec):
    flags, parts = [], []
    while True:
      magic, lrec = struct.unpack_from("<II", rec, pos)
      assert magic == 0xCED7230A
      cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
      flags.append(cflag)
      parts.append(rec[pos + 8:pos + 8 + length])
      pos += 8 + (length + 3) // 4 * 4
      if cflag in (0, 3):
        break
    records.append((flags, MAGIC_BYTES.join(parts)))
  return records


def _ir_header(payload: bytes) -> tuple[int, float, int, list[float], bytes]:
  flag, label, key, _ = struct.unpack_from("<IfQQ", payload)
  extra = list(struct.unpack_from(f"<{flag}f", payload, 24))
  return flag, label, key, extra, payload[24 + 4 * flag:]


def _raw(part: bytes, cflag: int = 0) -> bytes:
  """One physical record by the spec: magic, cflag << 29 | length, data, zero padding."""
  return struct.pack("<II", 0xCED7230A, cflag << 29 | len(part)) + part + b"\0" * (-len(part) % 4)


def _write_raw(tmp_path, records: list[tuple[int, bytes]], property_text: str = "10,12,10"):
  """Writes hand-built records `(key, raw bytes)` with their .idx and property; returns the prefix."""
  rec, offsets = b"", []
  for key, raw in records:
    offsets.append(f"{key}\t{len(rec)}\n")
    rec += raw
  prefix = tmp_path / "train"
  (tmp_path / "train.rec").write_bytes(rec)
  (tmp_path / "train.idx").write_text("".join(offsets))
  (tmp_path / "property").write_text(property_text)
  return prefix


def _written(tmp_path, items=None):
  items = _synthetic_items() if items is None else items
  write_recordio(tmp_path / "train", items, (12, 10))
  return items


def test_round_trip_synthetic(tmp_path):
  items = _written(tmp_path)
  source = RecordIOSource(tmp_path)
  assert len(source) == len(items) and source.num_classes == 3 and source.image_size == (12, 10)
  np.testing.assert_array_equal(source.labels, [label for _, label in items])
  assert source.labels.dtype == np.int64
  for i, (encoded, label) in enumerate(items):
    assert source.encoded(i) == encoded
    image, got_label = source[i]
    np.testing.assert_array_equal(image, np.asarray(Image.open(io.BytesIO(encoded))))
    assert got_label == label
  # A pickled source (as handed to worker processes) re-opens the file.
  clone = pickle.loads(pickle.dumps(source))
  assert clone.encoded(5) == items[5][0]


def test_written_layout_is_insightfaces(tmp_path):
  """Records 1…N images, one identity record per class with its [first, end) keys, record 0 last."""
  items = _written(tmp_path)
  records = _reference_records((tmp_path / "train.rec").read_bytes())
  n, c = len(items), 3
  assert len(records) == n + c + 1
  for key, (_, payload) in enumerate(records[:n], start=1):
    flag, label, stored_key, _, image = _ir_header(payload)
    assert (flag, label, stored_key, image) == (0, items[key - 1][1], key, items[key - 1][0])
  ranges = [_ir_header(payload)[3] for _, payload in records[n:n + c]]
  assert ranges == [[1, 4], [4, 5], [5, 9]]  # sizes (3, 1, 4)
  assert _ir_header(records[-1][1])[:4] == (2, 0.0, 0, [n + 1, n + 1 + c])
  index = [line.split("\t") for line in (tmp_path / "train.idx").read_text().splitlines()]
  assert [int(k) for k, _ in index] == list(range(1, n + c + 1)) + [0]
  assert (tmp_path / "property").read_text().strip() == "3,12,10"


def test_path_forms(tmp_path):
  _written(tmp_path)
  for path in (tmp_path, tmp_path / "train", tmp_path / "train.rec", tmp_path / "train.idx"):
    assert recordio_paths(path) == (tmp_path / "train.rec", tmp_path / "train.idx", tmp_path / "property")
    assert len(RecordIOSource(path)) == 8


def test_round_trip_orl(shared_datasets, tmp_path):
  orl = ImageFolderSource(shared_datasets / "orl_faces")
  assert folder_to_recordio(shared_datasets / "orl_faces", tmp_path / "orl" / "train") == 400
  source = RecordIOSource(tmp_path / "orl")
  assert (source.num_classes, source.image_size) == (40, (112, 92))
  np.testing.assert_array_equal(source.labels, orl.labels)
  for i in range(0, 400, 13):
    assert source.encoded(i) == orl.paths[i].read_bytes()
    image, label = source[i]
    assert image.shape == (112, 92, 1) and label == orl.labels[i]
    np.testing.assert_array_equal(image[..., 0], np.asarray(Image.open(orl.paths[i])))


def test_folder_to_recordio_reencodes(tmp_path):
  rng = np.random.default_rng(1)
  images = {}
  for name in ("a", "b"):
    (tmp_path / "faces" / name).mkdir(parents=True)
    for j in range(2):
      images[name, j] = rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)
      Image.fromarray(images[name, j]).save(tmp_path / "faces" / name / f"{j}.bmp")
  folder_to_recordio(tmp_path / "faces", tmp_path / "png" / "train", image_format="PNG")
  source = RecordIOSource(tmp_path / "png")
  assert source.encoded(0).startswith(b"\x89PNG")
  for i, key in enumerate([("a", 0), ("a", 1), ("b", 0), ("b", 1)]):
    np.testing.assert_array_equal(source[i][0], images[key])
  folder_to_recordio(tmp_path / "faces", tmp_path / "jpeg" / "train", image_format="JPEG")
  assert RecordIOSource(tmp_path / "jpeg").encoded(0).startswith(b"\xff\xd8")


def test_folder_to_recordio_size_mismatch_names_file(tmp_path):
  for name, shape in (("a", (8, 6)), ("b", (9, 6))):
    (tmp_path / "faces" / name).mkdir(parents=True)
    Image.fromarray(np.zeros(shape, np.uint8)).save(tmp_path / "faces" / name / "0.png")
  with pytest.raises(ValueError, match=r"b/0\.png: image is 9x6 \(HxW\), expected 8x6"):
    folder_to_recordio(tmp_path / "faces", tmp_path / "out")


@pytest.mark.parametrize("magic_at", [[0], [4, 8], [12], [20, 28]])
def test_writer_splits_at_aligned_magic(tmp_path, magic_at):
  """Image bytes with the magic at 4-aligned payload positions give cflag 1/2/3 parts, read back whole."""
  png = _png(np.arange(120, dtype=np.uint8).reshape(12, 10))
  # The image starts at payload byte 24, so tail offsets t ≡ -len(png) (mod 4) are aligned.
  tail = bytearray(b"\x01" * (32 + -len(png) % 4))
  for position in magic_at:
    tail[(-len(png) % 4) + position:(-len(png) % 4) + position + 4] = MAGIC_BYTES
  tail += MAGIC_BYTES  # a magic ending the payload leaves an empty last part
  encoded = png + bytes(tail)
  items = [(_png(np.zeros((12, 10), np.uint8)), 0), (encoded, 1)]
  write_recordio(tmp_path / "train", items, (12, 10))
  records = _reference_records((tmp_path / "train.rec").read_bytes())
  assert records[0][0] == [0]
  flags, payload = records[1]
  assert flags == [1] + [2] * len(magic_at) + [3]
  assert _ir_header(payload)[4] == encoded
  source = RecordIOSource(tmp_path)
  np.testing.assert_array_equal(source.labels, [0, 1])
  assert source.encoded(1) == encoded
  np.testing.assert_array_equal(source[1][0][..., 0], np.arange(120).reshape(12, 10))


def test_reads_hand_built_split_record(tmp_path):
  """A split record built by the spec (not by arcjax's writer) is joined with the magic re-inserted."""
  image = _png(np.full((12, 10), 7, np.uint8))
  image += b"\0" * (-len(image) % 4)
  payload = struct.pack("<IfQQ", 0, 4.0, 1, 0) + image + MAGIC_BYTES + b"abcd" + MAGIC_BYTES + b"xyz"
  cut = len(payload) - 15  # the first magic
  records = [(1, _raw(payload[:cut], 1) + _raw(payload[cut + 4:cut + 8], 2) + _raw(payload[cut + 12:], 3))]
  _write_raw(tmp_path, records)
  source = RecordIOSource(tmp_path)
  assert source.labels.tolist() == [4]
  assert source.encoded(0) == payload[24:]
  np.testing.assert_array_equal(source[0][0][..., 0], np.full((12, 10), 7))


def test_flag_labels_and_no_header_record(tmp_path):
  """flag > 0 records take label[0] (as MXFaceDataset); without a header record 0 every record is an image."""
  image = _png(np.zeros((12, 10), np.uint8))
  records = [(0, _raw(struct.pack("<IfQQ", 0, 2.0, 0, 0) + image)),
             (1, _raw(struct.pack("<IfQQf", 1, 0.0, 1, 0, 5.0) + image)),
             (2, _raw(struct.pack("<IfQQfff", 3, 9.0, 2, 0, 7.0, 1.0, 3.0) + image))]
  _write_raw(tmp_path, records)
  source = RecordIOSource(tmp_path)
  assert source.keys.tolist() == [0, 1, 2]
  assert source.labels.tolist() == [2, 5, 7]
  assert all(source.encoded(i) == image for i in range(3))


def test_header_record_selects_images(tmp_path):
  """Record 0 with flag 2 = [3, 5): images are records 1, 2; records 3, 4 are identity records."""
  image = _png(np.zeros((12, 10), np.uint8))
  records = [(0, _raw(struct.pack("<IfQQff", 2, 0.0, 0, 0, 3.0, 5.0))),
             (1, _raw(struct.pack("<IfQQ", 0, 1.0, 1, 0) + image)),
             (2, _raw(struct.pack("<IfQQ", 0, 0.0, 2, 0) + image)),
             (3, _raw(struct.pack("<IfQQff", 2, 0.0, 3, 0, 2.0, 3.0))),
             (4, _raw(struct.pack("<IfQQff", 2, 0.0, 4, 0, 1.0, 2.0)))]
  _write_raw(tmp_path, records, "2,12,10")
  source = RecordIOSource(tmp_path)
  assert source.keys.tolist() == [1, 2] and source.labels.tolist() == [1, 0]


# --- corrupt input: every error names the file, the record key and what is wrong -----------------


def _offsets(tmp_path) -> dict[int, int]:
  lines = (tmp_path / "train.idx").read_text().splitlines()
  return {int(k): int(v) for k, v in (line.split("\t") for line in lines)}


def test_bad_magic(tmp_path):
  _written(tmp_path)
  rec = bytearray((tmp_path / "train.rec").read_bytes())
  offset = _offsets(tmp_path)[3]
  rec[offset:offset + 4] = b"\xde\xad\xbe\xef"
  (tmp_path / "train.rec").write_bytes(bytes(rec))
  with pytest.raises(RecordIOError, match=r"train\.rec: record 3: bad magic 0xefbeadde"):
    RecordIOSource(tmp_path)


def test_truncated_record(tmp_path):
  _written(tmp_path)
  offsets = _offsets(tmp_path)
  # Drop the identity records and record 0, and cut image record 8 in half; the .idx says 0 is at the end.
  rec = (tmp_path / "train.rec").read_bytes()
  (tmp_path / "train.idx").write_text("".join(f"{k}\t{offsets[k]}\n" for k in range(1, 9)))
  (tmp_path / "train.rec").write_bytes(rec[:offsets[8] + 40])
  with pytest.raises(RecordIOError, match=r"train\.rec: record 8: truncated \(needs \d+ bytes"):
    RecordIOSource(tmp_path)
  (tmp_path / "train.rec").write_bytes(rec[:offsets[8] + 5])
  with pytest.raises(RecordIOError, match=r"record 8: truncated \(file ends inside the record header"):
    RecordIOSource(tmp_path)


def test_offset_past_end(tmp_path):
  _written(tmp_path)
  offsets = _offsets(tmp_path)
  size = (tmp_path / "train.rec").stat().st_size
  offsets[5] = size + 100
  (tmp_path / "train.idx").write_text("".join(f"{k}\t{v}\n" for k, v in offsets.items()))
  with pytest.raises(RecordIOError, match=rf"record 5: offset {size + 100} is past the end of file"):
    RecordIOSource(tmp_path)


def test_label_outside_property(tmp_path):
  _written(tmp_path)
  (tmp_path / "property").write_text("2,12,10")
  # Label 2 first occurs at record 5 (sizes 3, 1, 4).
  with pytest.raises(RecordIOError, match=r"record 5: label 2\.0 is outside property's class count \[0, 2\)"):
    RecordIOSource(tmp_path)


def test_non_integer_label(tmp_path):
  image = _png(np.zeros((12, 10), np.uint8))
  _write_raw(tmp_path, [(1, _raw(struct.pack("<IfQQ", 0, 1.5, 1, 0) + image))])
  with pytest.raises(RecordIOError, match=r"record 1: label 1\.5 .* not an integer"):
    RecordIOSource(tmp_path)


@pytest.mark.parametrize("missing, message", [("train.idx", "missing .idx file"),
                                              ("property", "missing property file"),
                                              ("train.rec", "missing .rec file")])
def test_missing_files(tmp_path, missing, message):
  _written(tmp_path)
  (tmp_path / missing).unlink()
  with pytest.raises(RecordIOError, match=rf"{missing}: {message}"):
    RecordIOSource(tmp_path)


@pytest.mark.parametrize("text, message", [("1\t0\nx\t8\n", "not lines of 'key<TAB>offset'"),
                                           ("1\t0\n1\t8\n", "key 1 listed twice"),
                                           ("1\t0\t3\n", "expected 2 tab-separated columns")])
def test_malformed_index(tmp_path, text, message):
  _written(tmp_path)
  (tmp_path / "train.idx").write_text(text)
  with pytest.raises(RecordIOError, match=message):
    RecordIOSource(tmp_path)


def test_malformed_property(tmp_path):
  _written(tmp_path)
  (tmp_path / "property").write_text("85742;112;112")
  with pytest.raises(RecordIOError, match=r"property: expected 'num_classes,height,width'"):
    RecordIOSource(tmp_path)


def test_image_missing_from_index(tmp_path):
  _written(tmp_path)
  offsets = _offsets(tmp_path)
  del offsets[4]
  (tmp_path / "train.idx").write_text("".join(f"{k}\t{v}\n" for k, v in offsets.items()))
  with pytest.raises(RecordIOError, match=r"record 4 .* is missing from the index"):
    RecordIOSource(tmp_path)


def test_bad_continuation_and_short_records(tmp_path):
  image = _png(np.zeros((12, 10), np.uint8))
  _write_raw(tmp_path, [(1, _raw(struct.pack("<IfQQ", 0, 1.0, 1, 0) + image, cflag=2))])
  with pytest.raises(RecordIOError, match=r"record 1: continuation flag 2 at offset 0"):
    RecordIOSource(tmp_path)
  _write_raw(tmp_path, [(1, _raw(struct.pack("<IfQ", 0, 1.0, 1)))])
  with pytest.raises(RecordIOError, match=r"record 1: 16 bytes, too short for the 24-byte header"):
    RecordIOSource(tmp_path)
  _write_raw(tmp_path, [(1, _raw(struct.pack("<IfQQf", 2, 0.0, 1, 0, 1.0)))])
  with pytest.raises(RecordIOError, match=r"record 1: header flag 2 needs 32 bytes; record has 28"):
    RecordIOSource(tmp_path)


def test_undecodable_image_names_record(tmp_path):
  _write_raw(tmp_path, [(1, _raw(struct.pack("<IfQQ", 0, 1.0, 1, 0) + b"not an image"))])
  source = RecordIOSource(tmp_path)  # labels need no decoding
  with pytest.raises(RecordIOError, match=r"train\.rec: record 1: cannot decode image"):
    source[0]


@pytest.mark.parametrize("items, message", [
    ([(b"a", 0), (b"b", 1), (b"c", 0)], "item 2: label 0 appears again after other labels"),
    ([(b"a", 1)], "label 0 has no images"),
    ([(b"a", -1)], r"item 0: label -1 must be an int in \[0, 2\*\*24\)"),
    ([(b"a", 2**24)], r"must be an int in \[0, 2\*\*24\)"),
    ([(b"a", 1.0)], "must be an int"),
    ([], "no items to write"),
])
def test_writer_label_errors(tmp_path, items, message):
  image = _png(np.zeros((12, 10), np.uint8))
  items = [(image, label) for _, label in items]
  with pytest.raises(ValueError, match=message):
    write_recordio(tmp_path / "train", items, (12, 10))


def test_writer_image_errors(tmp_path):
  with pytest.raises(ValueError, match=r"item 0 \(label 0\): image is 12x10 \(HxW\), expected 10x12"):
    write_recordio(tmp_path / "train", [(_png(np.zeros((12, 10), np.uint8)), 0)], (10, 12))
  with pytest.raises(ValueError, match=r"item 0 \(label 0\): not an encoded image"):
    write_recordio(tmp_path / "train", [(b"garbage", 0)], (10, 12))


def test_decode_matches_folder_decoder(tmp_path):
  """RecordIOSource decodes with the shared decoder: grey stays one channel."""
  items = _synthetic_items(sizes=(2,), shape=(12, 10))
  _written(tmp_path, items)
  source = RecordIOSource(tmp_path)
  assert source[0][0].shape == (12, 10, 1)
  np.testing.assert_array_equal(source[1][0], decode_image(items[1][0]))


# --- writers never clobber ----------------------------------------------------------------------


def test_refuses_to_write_a_second_set_into_a_folder(tmp_path):
  """The bug: a 3-class set written beside an 8-class train.rec rewrote `property`, breaking it."""
  eight = _synthetic_items(sizes=(1, 2, 1, 1, 3, 1, 1, 2))
  write_recordio(tmp_path / "train", eight, (12, 10))
  before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
  with pytest.raises(errors.DataError, match=r"property already exists; refusing to overwrite it "
                                             r"\(a folder holds one RecordIO set"):
    write_recordio(tmp_path / "small", _synthetic_items(sizes=(1, 1, 1)), (12, 10))
  with pytest.raises(errors.DataError, match=r"train\.rec already exists"):
    write_recordio(tmp_path, _synthetic_items(sizes=(1, 1, 1)), (12, 10))
  assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
  source = RecordIOSource(tmp_path)
  assert source.num_classes == 8
  np.testing.assert_array_equal(source.labels, [label for _, label in eight])
  assert source.encoded(3) == eight[3][0]


def test_overwrite_replaces_and_a_failed_write_keeps_the_old_set(tmp_path):
  write_recordio(tmp_path / "train", _synthetic_items(sizes=(2, 2)), (12, 10))
  write_recordio(tmp_path / "train", _synthetic_items(sizes=(1, 1, 1)), (12, 10), overwrite=True)
  assert RecordIOSource(tmp_path).num_classes == 3
  before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
  items = _synthetic_items(sizes=(1, 1, 1, 1, 1)) + [(b"not an image", 4)]
  with pytest.raises(ValueError, match="item 5 .*not an encoded image"):
    write_recordio(tmp_path / "train", items, (12, 10), overwrite=True)
  assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before  # no staging left
  assert RecordIOSource(tmp_path).num_classes == 3


def test_folder_to_recordio_refuses_existing_and_passes_overwrite(tmp_path):
  (tmp_path / "faces" / "a").mkdir(parents=True)
  Image.fromarray(np.zeros((8, 6), np.uint8)).save(tmp_path / "faces" / "a" / "0.png")
  folder_to_recordio(tmp_path / "faces", tmp_path / "out" / "train")
  with pytest.raises(errors.DataError, match="out/train.rec already exists"):
    folder_to_recordio(tmp_path / "faces", tmp_path / "out" / "train")
  assert folder_to_recordio(tmp_path / "faces", tmp_path / "out" / "train", overwrite=True) == 1


def test_folder_to_recordio_fits_other_sizes(tmp_path):
  """ORL-like 12 × 8 (H × W) images padded to 12 × 12: 2 black columns each side, faces untouched."""
  rng = np.random.default_rng(2)
  faces = {}
  for name, shape in (("a", (12, 8)), ("b", (12, 12))):
    (tmp_path / "faces" / name).mkdir(parents=True)
    faces[name] = rng.integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(faces[name]).save(tmp_path / "faces" / name / "0.pgm")
  with pytest.raises(ValueError, match=r"a/0\.pgm: image is 12x8 \(HxW\), expected 12x12 \(choose"):
    folder_to_recordio(tmp_path / "faces", tmp_path / "refused" / "train", image_size=(12, 12))
  folder_to_recordio(tmp_path / "faces", tmp_path / "out" / "train", image_size=(12, 12), fit="pad")
  source = RecordIOSource(tmp_path / "out")
  assert source.image_size == (12, 12)
  padded = source[0][0][..., 0]
  assert source.encoded(0).startswith(b"\x89PNG")  # fitted: stored lossless
  np.testing.assert_array_equal(padded, np.pad(faces["a"], ((0, 0), (2, 2))))
  assert source.encoded(1) == (tmp_path / "faces" / "b" / "0.pgm").read_bytes()  # at the size: kept


def test_errors_are_data_errors():
  assert issubclass(RecordIOError, errors.DataError) and issubclass(RecordIOError, ValueError)

"""insightface's `train.rec` / `train.idx` / `property` (MXNet RecordIO), without mxnet.

The files (as MS1MV2, MS1MV3, Glint360K and CASIA-WebFace are distributed):

- `train.idx`: text lines `key\\toffset`, the byte offset of each record in `train.rec`.
- `train.rec`: records, each `uint32 magic 0xced7230a`, `uint32 cflag << 29 | length`,
  `length` payload bytes, zero padding to a multiple of 4. dmlc-core's writer
  splits a payload at every 4-aligned occurrence of the magic: part 1 (cflag 1),
  middle parts (cflag 2), last part (cflag 3), the magic bytes themselves left
  out; the reader joins the parts putting the magic back between them.
- payload: the header `<IfQQ` (flag, label, id, id2), then `flag` float32
  labels if flag > 0, then the encoded image (JPEG).
- record 0 (flag 2) holds `[first identity record, end)` in its labels: the
  images are records `1 … label[0] − 1`; records `label[0] …` are one per
  identity, each with flag 2 and the `[first, end)` keys of its images.
  Without such a record 0, every record is an image.
- `property` (beside the files): text `num_classes,height,width`.

An image's label is its header's float label (flag 0), or its first extra
label (flag > 0), as insightface's MXFaceDataset reads it. Labels are stored as
float32, exact only up to 2**24 (16 777 216); `RecordIOSource.labels` are int64.
"""

from collections.abc import Iterable, Iterator, Sequence
import contextlib
import mmap
import os
import pathlib
import shutil
import struct
import tempfile

import numpy as np

from arcjax import errors
from arcjax.data.folders import ImageFolderSource
from arcjax.data.images import decode_image, encoded_size, fit_file

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_MASK = (1 << 29) - 1
_IR_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2: 24 bytes
# Record start (8 bytes) + IR header + the first extra label: all the label pass reads.
_PEEK = 8 + _IR_HEADER.size + 4
_FLOAT32_EXACT = 2**24
# dmlc-core's limit: the length field has 29 bits.
_MAX_RECORD = 1 << 29
_ONE_SET_PER_FOLDER = ("a folder holds one RecordIO set, whose class count is its `property`; "
                       "overwrite=True replaces the set")


class RecordIOError(errors.DataError, ValueError):
  """Corrupt or inconsistent RecordIO input; the message names the file and the record key."""


def recordio_paths(path: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
  """`(rec, idx, property)` paths of `path`: a directory (its `train.*`), a prefix or a `.rec`/`.idx` file."""
  path = pathlib.Path(path).expanduser()
  if path.is_dir():
    prefix = path / "train"
  elif path.suffix in (".rec", ".idx"):
    prefix = path.with_suffix("")
  else:
    prefix = path
  return (prefix.parent / (prefix.name + ".rec"), prefix.parent / (prefix.name + ".idx"),
          prefix.parent / "property")


def _read_property(path: pathlib.Path) -> tuple[int, tuple[int, int]]:
  """`(num_classes, (height, width))` from a `property` file."""
  if not path.is_file():
    raise RecordIOError(f"{path}: missing property file (text 'num_classes,height,width')")
  fields = path.read_text().strip().split(",")
  try:
    num_classes, height, width = (int(field) for field in fields)
  except ValueError:
    raise RecordIOError(f"{path}: expected 'num_classes,height,width'; got {','.join(fields)!r}") from None
  if num_classes < 1 or height < 1 or width < 1:
    raise RecordIOError(f"{path}: num_classes, height and width must be positive; got {fields}")
  return num_classes, (height, width)


def _read_index(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """`(keys, offsets)` of a `.idx` file, both (K,) int64, sorted by key."""
  if not path.is_file():
    raise RecordIOError(f"{path}: missing .idx file (text lines 'key<TAB>offset')")
  try:
    table = np.loadtxt(path, dtype=np.int64, delimiter="\t", ndmin=2)
  except ValueError as error:
    raise RecordIOError(f"{path}: not lines of 'key<TAB>offset' ({error})") from None
  if table.size and table.shape[1] != 2:
    raise RecordIOError(f"{path}: expected 2 tab-separated columns; got {table.shape[1]}")
  table = table.reshape(-1, 2)
  keys, offsets = table[:, 0], table[:, 1]
  order = np.argsort(keys, kind="stable")
  keys, offsets = keys[order], offsets[order]
  repeated = keys[1:][keys[1:] == keys[:-1]]
  if len(repeated):
    raise RecordIOError(f"{path}: key {repeated[0]} listed twice")
  if len(offsets) and offsets.min() < 0:
    raise RecordIOError(f"{path}: key {keys[np.argmin(offsets)]} has a negative offset")
  return keys, offsets


def _read_payload(data, rec_path: pathlib.Path, key: int, offset: int) -> bytes:
  """The payload of the record at `offset`, its split parts joined (with the magic between them)."""
  parts = []
  while True:
    if offset >= len(data):
      raise RecordIOError(f"{rec_path}: record {key}: offset {offset} is past the end of file "
                          f"({len(data)} bytes)")
    if offset + 8 > len(data):
      raise RecordIOError(f"{rec_path}: record {key}: truncated (file ends inside the record header)")
    magic, lrec = struct.unpack_from("<II", data, offset)
    if magic != MAGIC:
      raise RecordIOError(f"{rec_path}: record {key}: bad magic {magic:#010x} at offset {offset} "
                          f"(expected {MAGIC:#010x})")
    cflag, length = lrec >> 29, lrec & _LENGTH_MASK
    expected = (0, 1) if not parts else (2, 3)
    if cflag not in expected:
      raise RecordIOError(f"{rec_path}: record {key}: continuation flag {cflag} at offset {offset} "
                          f"(expected one of {expected})")
    start = offset + 8
    if start + length > len(data):
      raise RecordIOError(f"{rec_path}: record {key}: truncated (needs {length} bytes at offset "
                          f"{start}, file has {len(data)})")
    parts.append(data[start:start + length])
    if cflag in (0, 3):
      return _MAGIC_BYTES.join(parts)
    offset = start + (length + 3) // 4 * 4


def _unpack(payload: bytes, rec_path: pathlib.Path, key: int) -> tuple[int, np.ndarray, bytes]:
  """`(flag, labels (max(flag, 1),) float32, image bytes)` of a payload."""
  if len(payload) < _IR_HEADER.size:
    raise RecordIOError(f"{rec_path}: record {key}: {len(payload)} bytes, too short for the "
                        f"{_IR_HEADER.size}-byte header")
  flag, label, _, _ = _IR_HEADER.unpack_from(payload)
  end = _IR_HEADER.size + 4 * flag
  if len(payload) < end:
    raise RecordIOError(f"{rec_path}: record {key}: header flag {flag} needs {end} bytes; "
                        f"record has {len(payload)}")
  labels = np.frombuffer(payload, "<f4", flag, _IR_HEADER.size) if flag else np.array([label], "<f4")
  return flag, labels, payload[end:]


class RecordIOSource:
  """insightface's `train.rec` as a source (see the module docstring for the format).

  `path`: a directory holding `train.rec`, `train.idx` and `property`, a prefix
  (`…/train`) or the `.rec`/`.idx` file. Opening reads only record headers
  (memory-mapped, vectorised), checks every image record and its label, and
  keeps `labels: (N,) int64`, `keys: (N,) int64` (each example's record key),
  `num_classes: int` and `image_size: (H, W)` from `property`, and the
  records' byte offsets. Images are read on demand; reads
  are thread-safe. Raises `RecordIOError` naming the file and record key.
  """

  def __init__(self, path: str | os.PathLike):
    self.rec_path, self.idx_path, self.property_path = recordio_paths(path)
    if not self.rec_path.is_file():
      raise RecordIOError(f"{self.rec_path}: missing .rec file")
    self.num_classes, self.image_size = _read_property(self.property_path)
    keys, offsets = _read_index(self.idx_path)
    self._open()
    self.keys = self._image_keys(keys, offsets)
    self._offsets = offsets[np.searchsorted(keys, self.keys)]
    self.labels = self._read_labels()

  def _open(self) -> None:
    with open(self.rec_path, "rb") as f:
      size = os.fstat(f.fileno()).st_size
      # mmap slices are thread-safe reads without a shared file position; mmap refuses empty files.
      self._data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""

  def __getstate__(self) -> dict:
    # An mmap cannot be pickled: worker processes re-open the file.
    return {k: v for k, v in self.__dict__.items() if k != "_data"}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._open()

  def _image_keys(self, keys: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Keys of the image records: `1 … label[0] − 1` if record 0 is a flag > 0 header, else all."""
    if not len(keys) or keys[0] != 0:
      return keys
    flag, labels, _ = _unpack(_read_payload(self._data, self.rec_path, 0, int(offsets[0])), self.rec_path, 0)
    if flag == 0:
      return keys
    end = float(labels[0])
    if end != int(end) or end < 1:
      raise RecordIOError(f"{self.rec_path}: record 0: image range end {end} is not a key >= 1")
    image_keys = np.arange(1, int(end), dtype=np.int64)
    missing = image_keys[~np.isin(image_keys, keys)]
    if len(missing):
      raise RecordIOError(f"{self.idx_path}: record {missing[0]} (an image, as record 0 says records "
                          f"1…{int(end) - 1} are) is missing from the index")
    return image_keys

  def _read_labels(self, chunk: int = 1 << 16) -> np.ndarray:
    """`(N,) int64` labels, read from the record headers alone, every record checked."""
    data = np.frombuffer(self._data, np.uint8)
    size = len(data)
    labels = np.empty(len(self.keys), np.float32)
    for lo in range(0, len(self.keys), chunk):
      offsets = self._offsets[lo:lo + chunk]
      at = offsets[:, None] + np.arange(_PEEK)
      peek = data[np.minimum(at, max(size - 1, 0))] if size else np.zeros(at.shape, np.uint8)
      magic, lrec = peek[:, :4].copy().view("<u4")[:, 0], peek[:, 4:8].copy().view("<u4")[:, 0]
      flag = peek[:, 8:12].copy().view("<u4")[:, 0]
      length = lrec & _LENGTH_MASK
      # The fast path covers whole (unsplit) records with every peeked byte inside the record.
      fast = ((offsets + 8 <= size) & (magic == MAGIC) & (lrec >> 29 == 0)
              & (offsets + 8 + length <= size) & (length >= _IR_HEADER.size + 4 * np.minimum(flag, 1)))
      header_label = peek[:, 12:16].copy().view("<f4")[:, 0]
      first_extra = peek[:, 32:36].copy().view("<f4")[:, 0]
      labels[lo:lo + chunk] = np.where(flag > 0, first_extra, header_label)
      for j in np.flatnonzero(~fast | (flag > 1)):
        # Split records, and flag > 1 records (whose length the fast path did not check), get the
        # full reader, which raises the precise error for corrupt ones.
        key, offset = int(self.keys[lo + j]), int(offsets[j])
        payload = _read_payload(self._data, self.rec_path, key, offset)
        labels[lo + j] = _unpack(payload, self.rec_path, key)[1][0]
    bad = np.flatnonzero(~(labels >= 0) | (labels >= self.num_classes) | (labels != np.floor(labels)))
    if len(bad):
      raise RecordIOError(f"{self.rec_path}: record {self.keys[bad[0]]}: label {labels[bad[0]]} is "
                          f"outside property's class count [0, {self.num_classes}) or not an integer")
    return labels.astype(np.int64)

  def __len__(self) -> int:
    return len(self.keys)

  def encoded(self, index: int) -> bytes:
    """The encoded image bytes of example `index` (record `keys[index]`)."""
    key = int(self.keys[index])
    payload = _read_payload(self._data, self.rec_path, key, int(self._offsets[index]))
    return _unpack(payload, self.rec_path, key)[2]

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    """`(image (H, W, C) uint8, label)` of example `index`."""
    encoded = self.encoded(index)
    try:
      image = decode_image(encoded)
    except ValueError as error:
      raise RecordIOError(f"{self.rec_path}: record {self.keys[index]}: {error}") from error
    return image, int(self.labels[index])


def _pack(flag: int, label: float, key: int, extra: tuple[float, ...] = (), image: bytes = b"") -> bytes:
  return _IR_HEADER.pack(flag, label, key, 0) + np.asarray(extra, "<f4").tobytes() + image


def _write_record(f, payload: bytes) -> None:
  """Writes one record as dmlc-core does: split at each 4-aligned magic, padded to 4 bytes."""
  if len(payload) >= _MAX_RECORD:
    raise errors.DataError(f"a RecordIO record holds less than 2**29 bytes; got {len(payload)}")
  aligned = len(payload) // 4 * 4
  cuts = 4 * np.flatnonzero(np.frombuffer(payload, "<u4", aligned // 4) == MAGIC)
  start = 0
  for cut in cuts:
    f.write(struct.pack("<II", MAGIC, (1 if start == 0 else 2) << 29 | (cut - start)))
    f.write(payload[start:cut])
    start = cut + 4
  f.write(struct.pack("<II", MAGIC, (3 if start else 0) << 29 | (len(payload) - start)))
  f.write(payload[start:])
  f.write(b"\0" * (-len(payload) % 4))


def _check_image(encoded: bytes, image_size: tuple[int, int], what: str) -> None:
  """Raises `errors.DataError` naming `what` unless `encoded` is an image of `image_size = (H, W)`."""
  try:
    height, width = encoded_size(encoded)
  except errors.DataError as error:
    raise errors.DataError(f"{what}: {error}") from error
  if (height, width) != tuple(image_size):
    raise errors.DataError(f"{what}: image is {height}x{width} (HxW), expected "
                           f"{image_size[0]}x{image_size[1]}")


@contextlib.contextmanager
def writing_new(directory: str | os.PathLike, names: Sequence[str], *, overwrite: bool = False,
                hint: str = "overwrite=True replaces it") -> Iterator[pathlib.Path]:
  """Writes the files `names` of a local `directory` as one set: whole, and never over others.

  Refuses (`errors.DataError` naming the file, then `hint`) when one of them
  exists and not `overwrite`. Yields an empty hidden folder inside `directory`
  for the body to write the files in, under the same names; when the body
  returns, moves each there onto its place (checking again first) and removes
  any of `names` the body did not write (it belonged to the set being
  replaced); when the body raises, leaves `directory` as it was.
  """
  directory = pathlib.Path(directory)
  targets = [directory / name for name in names]

  def refuse_existing():
    for target in targets:
      if not overwrite and os.path.lexists(target):
        raise errors.DataError(f"{target} already exists; refusing to overwrite it ({hint})")

  refuse_existing()
  created = not directory.exists()
  directory.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(dir=directory, prefix=".partial-"))
  try:
    yield staging
    refuse_existing()  # written meanwhile by someone else
    for name, target in zip(names, targets):
      if (staging / name).exists():
        os.replace(staging / name, target)
      else:
        target.unlink(missing_ok=True)
    created = False
  finally:
    shutil.rmtree(staging, ignore_errors=True)
    if created and not any(directory.iterdir()):
      directory.rmdir()


def write_recordio(path: str | os.PathLike, items: Iterable[tuple[bytes, int]],
                   image_size: tuple[int, int], *, overwrite: bool = False) -> int:
  """Writes `items` (encoded image bytes, label) as insightface's `.rec`/`.idx`/`property`.

  `path` as for `RecordIOSource` (a directory gets `train.*`). Images become
  records 1…N (flag 0, the label in the header, id = key), then one record per
  identity (flag 2, labels `[first, end)` keys of its images), then record 0
  (flag 2, labels `[N + 1, N + 1 + C)`), written last; the `.idx` lists them in file order;
  `property` is `C,H,W` with C = max label + 1. `items` must be grouped by
  label (each identity's images contiguous, as insightface's files are) and
  cover every label in [0, C); labels below 2**24; every image of
  `image_size = (H, W)` (`folder_to_recordio` fits images of other sizes).
  Returns N.

  Refuses (`errors.DataError` naming the file) when any of the three files
  exists, unless `overwrite`: `property` is shared by every set in a folder, so
  a folder holds one set. The files appear once all are written
  (`writing_new`), so a failure leaves an existing set as it was.
  """
  rec_path, idx_path, property_path = recordio_paths(path)
  names = [rec_path.name, idx_path.name, property_path.name]
  with writing_new(rec_path.parent, names, overwrite=overwrite, hint=_ONE_SET_PER_FOLDER) as staging:
    num_images, num_classes = _write_records(staging / names[0], staging / names[1], items, image_size)
    (staging / names[2]).write_text(f"{num_classes},{image_size[0]},{image_size[1]}\n")
  return num_images


def _write_records(rec_path: pathlib.Path, idx_path: pathlib.Path, items: Iterable[tuple[bytes, int]],
                   image_size: tuple[int, int]) -> tuple[int, int]:
  """Writes the `.rec` and `.idx` of `write_recordio`; returns `(N images, C classes)`."""
  ranges = {}  # label -> [first key, end key)
  current = None
  with open(rec_path, "wb") as f, open(idx_path, "w") as index:

    def write(key: int, payload: bytes) -> None:
      index.write(f"{key}\t{f.tell()}\n")
      _write_record(f, payload)

    key = 0
    for key, (encoded, label) in enumerate(items, start=1):
      if not isinstance(label, (int, np.integer)) or not 0 <= label < _FLOAT32_EXACT:
        raise errors.DataError(f"item {key - 1}: label {label!r} must be an int in [0, 2**24) "
                               "(RecordIO stores labels as float32)")
      label = int(label)
      if label != current:
        if label in ranges:
          raise errors.DataError(f"item {key - 1}: label {label} appears again after other labels; "
                                 "items must be grouped by label (sort them by label)")
        ranges[label] = [key, key]
        current = label
      ranges[label][1] = key + 1
      _check_image(encoded, image_size, f"item {key - 1} (label {label})")
      write(key, _pack(0, label, key, image=encoded))
    if not ranges:
      raise errors.DataError("no items to write")
    num_images, num_classes = key, max(ranges) + 1
    missing = sorted(set(range(num_classes)) - set(ranges))
    if missing:
      raise errors.DataError(f"label {missing[0]} has no images; labels must cover [0, {num_classes})")
    first_identity = num_images + 1
    if first_identity + num_classes > _FLOAT32_EXACT:
      raise errors.DataError(f"{num_images} images + {num_classes} identities: record keys beyond "
                             "2**24 are not exact in record 0's float32 labels")
    for label in range(num_classes):
      write(first_identity + label, _pack(2, 0.0, first_identity + label, tuple(ranges[label])))
    write(0, _pack(2, 0.0, 0, (first_identity, first_identity + num_classes)))
  return num_images, num_classes


def folder_items(paths: Sequence[str | os.PathLike], labels: Sequence[int] | np.ndarray,
                 image_size: tuple[int, int], *, fit: str | None = None,
                 image_format: str | None = None) -> Iterator[tuple[bytes, int]]:
  """`(bytes to store, label)` of the image files `paths: (N,)` with `labels: (N,)`, to write.

  Each file goes through `images.fit_file(path, image_size, fit=, image_format=)`:
  `image_format` None keeps a file's bytes when the image has `image_size`
  already (fitted images become PNG), 'JPEG' (quality 95) or 'PNG'
  re-encodes all; `fit` ('pad' | 'resize' | 'crop', see `images.fit_geometry`)
  brings other sizes to `image_size`, which are refused when it is None.
  Errors name the file.
  """
  for path, label in zip(paths, labels, strict=True):
    yield fit_file(path, image_size, fit=fit, image_format=image_format), int(label)


def folder_to_recordio(root: str | os.PathLike, path: str | os.PathLike, *,
                       image_format: str | None = None, image_size: tuple[int, int] | None = None,
                       fit: str | None = None, overwrite: bool = False) -> int:
  """Converts an image folder (`ImageFolderSource(root)`) to `path`'s `.rec`/`.idx`/`property`.

  Labels are the folder source's (sorted identity names). `image_size = (H, W)`
  defaults to the first image's; `image_format` and `fit` as for
  `folder_items`: by default every image must have the size, and its file's
  bytes are kept (lossless; PGM/PNG/JPEG alike). `overwrite` as for
  `write_recordio`. Returns the number of images.
  """
  source = ImageFolderSource(root)
  if image_size is None:
    image_size = encoded_size(source.encoded(0))
  items = folder_items(source.paths, source.labels, image_size, fit=fit, image_format=image_format)
  return write_recordio(path, items, image_size, overwrite=overwrite)

"""insightface's IJB-B / IJB-C folders, as distributed with its IJB evaluation.

A folder `DIR` (e.g. `IJB_release/IJBC`) holds, for `name` in IJBB, IJBC
(file names in lower case, `ijbc_…`):

- `meta/<name>_face_tid_mid.txt`: one line per face, `image template_id media_id`;
- `meta/<name>_name_5pts_score.txt`: the same faces in the same order,
  `image x1 y1 … x5 y5 score`: the 5 landmarks (eye centres, nose tip, mouth
  corners, in pixels of the image) and the face detector's score;
- `meta/<name>_template_pair_label.txt`: `template_1 template_2 label`, label 1
  for the same subject; the 1:1 protocol;
- `loose_crop/<image>`: the images, a face somewhere in each;
- for 1:N, where present: `meta/<name>_1N_probe_mixed.csv` and two galleries,
  `<name>_1N_gallery_G1.csv` and `_G2.csv` (IJB-C) or `_S1.csv` and `_S2.csv`
  (IJB-B): a header line, then `template_id,subject_id,…` per face.

insightface reads the landmarks and scores as float32, and pairs row i of the
two face lists; `read_meta` checks that they list the same images, and that
every template of a pair or a 1:N list has faces. `aligned_face` reads one
image (IJB-C has 469 375: read them lazily) and aligns it to the ArcFace template.
"""

import csv
import dataclasses
import hashlib
import pathlib

import numpy as np

from arcjax import errors
from arcjax.data import images

NAMES = ("IJBB", "IJBC")
# The two gallery sets of each dataset's 1:N protocol (insightface's ijb_1n.py).
_GALLERIES = {"IJBB": ("S1", "S2"), "IJBC": ("G1", "G2")}
_NUM_LANDMARKS = 5


@dataclasses.dataclass(frozen=True)
class TemplateList:
  """A 1:N list (gallery or probes): per row `templates: (R,) int64`, `subjects: (R,) int64`."""
  templates: np.ndarray
  subjects: np.ndarray


@dataclasses.dataclass(frozen=True)
class Meta:
  """An IJB folder's metadata: F faces, P template pairs.

  `image_names`: F names under `loose_crop/`; `landmarks: (F, 5, 2) float32`
  (x, y); `face_scores: (F,) float32`; `templates`, `medias`: `(F,) int64`;
  `pairs: (P, 2) int64` template ids; `pair_labels: (P,) int64` in {0, 1};
  `gallery`, `probes`: the 1:N lists, or None where the folder has none;
  `meta_files`: the files read, for `meta_sha256`.
  """
  root: pathlib.Path
  name: str
  image_names: list[str]
  landmarks: np.ndarray
  face_scores: np.ndarray
  templates: np.ndarray
  medias: np.ndarray
  pairs: np.ndarray
  pair_labels: np.ndarray
  gallery: TemplateList | None
  probes: TemplateList | None
  meta_files: list[pathlib.Path]


def meta_path(root: str | pathlib.Path, name: str, suffix: str) -> pathlib.Path:
  """`root/meta/<name in lower case><suffix>`, e.g. suffix '_face_tid_mid.txt'."""
  return pathlib.Path(root) / "meta" / f"{name.lower()}{suffix}"


def one_n_files(root: str | pathlib.Path, name: str) -> list[pathlib.Path]:
  """The 1:N files of `name`: the two galleries, then the probes."""
  return ([meta_path(root, name, f"_1N_gallery_{g}.csv") for g in _GALLERIES[name]]
          + [meta_path(root, name, "_1N_probe_mixed.csv")])


def _lines(path: pathlib.Path) -> list[list[str]]:
  if not path.is_file():
    raise errors.DataError(f"{path} does not exist (an IJB folder holds meta/ and loose_crop/)")
  with open(path, encoding="utf-8") as f:
    return [line.split() for line in f if line.strip()]


def _ints(rows: list[list[str]], columns: slice, path: pathlib.Path, width: int) -> np.ndarray:
  for i, row in enumerate(rows):
    if len(row) != width:
      raise errors.DataError(f"{path}: line {i + 1} has {len(row)} fields, expected {width}")
  try:
    return np.array([row[columns] for row in rows], np.int64)
  except ValueError as error:
    raise errors.DataError(f"{path}: {error}") from None


def _read_faces(root: pathlib.Path, name: str):
  tid_mid_path = meta_path(root, name, "_face_tid_mid.txt")
  points_path = meta_path(root, name, "_name_5pts_score.txt")
  tid_mid, points = _lines(tid_mid_path), _lines(points_path)
  ids = _ints(tid_mid, slice(1, 3), tid_mid_path, 3)
  width = 2 + 2 * _NUM_LANDMARKS
  if len(tid_mid) != len(points):
    raise errors.DataError(f"{points_path} lists {len(points)} faces but {tid_mid_path} "
                           f"{len(tid_mid)}; insightface pairs them line by line")
  for i, (row, face) in enumerate(zip(points, tid_mid)):
    if len(row) != width:
      raise errors.DataError(f"{points_path}: line {i + 1} has {len(row)} fields, expected "
                             f"{width} (image, 5 landmarks (x, y), score)")
    if row[0] != face[0]:
      raise errors.DataError(f"line {i + 1} names {row[0]} in {points_path} but {face[0]} in "
                             f"{tid_mid_path}; insightface pairs them line by line")
  try:
    numbers = np.array([row[1:] for row in points], np.float32)
  except ValueError as error:
    raise errors.DataError(f"{points_path}: {error}") from None
  landmarks = numbers[:, :-1].reshape(-1, _NUM_LANDMARKS, 2)
  return [face[0] for face in tid_mid], landmarks, numbers[:, -1], ids[:, 0], ids[:, 1]


def _read_pairs(root: pathlib.Path, name: str) -> tuple[np.ndarray, np.ndarray]:
  path = meta_path(root, name, "_template_pair_label.txt")
  if not path.is_file():
    raise errors.DataError(f"{path} does not exist (an IJB folder holds meta/ and loose_crop/)")
  try:
    # 15.7 M lines in IJB-C: NumPy's parser, not Python's split.
    table = np.loadtxt(path, dtype=np.int64, ndmin=2)
  except ValueError as error:
    raise errors.DataError(f"{path}: {error}") from None
  if table.shape[1] != 3 or not len(table):
    raise errors.DataError(f"{path} must hold lines 'template_1 template_2 label'; "
                           f"got {table.shape[1]} columns in {len(table)} lines")
  labels = table[:, 2]
  if not np.isin(labels, (0, 1)).all():
    raise errors.DataError(f"{path}: labels must be 0 or 1; got {np.unique(labels)[:5]}")
  if labels.min() == labels.max():
    raise errors.DataError(f"{path}: every pair has label {labels[0]}; a ROC needs both kinds")
  return table[:, :2], labels


def _read_list(path: pathlib.Path) -> TemplateList:
  """A 1:N csv: a header, then `template_id,subject_id,…` (insightface: columns 0 and 1)."""
  with open(path, encoding="utf-8", newline="") as f:
    rows = [row for row in csv.reader(f) if row][1:]
  if not rows:
    raise errors.DataError(f"{path} lists no templates")
  for i, row in enumerate(rows):
    if len(row) < 2:
      raise errors.DataError(f"{path}: line {i + 2} has {len(row)} fields; expected "
                             "template_id,subject_id,…")
  return TemplateList(*_ints([row[:2] for row in rows], slice(0, 2), path, 2).T)


def _read_one_n(root: pathlib.Path, name: str) -> tuple[TemplateList | None, TemplateList | None]:
  paths = one_n_files(root, name)
  present = [path.is_file() for path in paths]
  if not any(present):
    return None, None
  if not all(present):
    missing = paths[present.index(False)]
    raise errors.DataError(f"{missing} does not exist but other 1:N files do; 1:N needs "
                           f"{', '.join(path.name for path in paths)}")
  galleries = [_read_list(path) for path in paths[:2]]
  gallery = TemplateList(np.concatenate([g.templates for g in galleries]),
                         np.concatenate([g.subjects for g in galleries]))
  return gallery, _read_list(paths[2])


def _check_templates(known: np.ndarray, used: np.ndarray, where: pathlib.Path) -> None:
  unknown = np.setdiff1d(used, known)
  if unknown.size:
    raise errors.DataError(f"{where} names template {unknown[0]}, which has no face in the "
                           f"face lists ({unknown.size} such templates)")


def read_meta(root: str | pathlib.Path, name: str) -> Meta:
  """The metadata of the IJB folder `root` (`DIR` above) for `name` ('IJBB' or 'IJBC').

  Raises `errors.DataError` (one line, naming the file) for a folder that does
  not hold them as insightface's evaluation reads them.
  """
  if name not in NAMES:
    raise errors.ConfigError(f"unknown IJB name {name!r}; known: {', '.join(NAMES)}")
  root = pathlib.Path(root).expanduser()
  if not (root / "meta").is_dir() or not (root / "loose_crop").is_dir():
    raise errors.DataError(f"IJB folder {root} must hold meta/ and loose_crop/ (insightface's "
                           f"{name} folder, as distributed)")
  image_names, landmarks, face_scores, templates, medias = _read_faces(root, name)
  pairs, pair_labels = _read_pairs(root, name)
  gallery, probes = _read_one_n(root, name)
  known = np.unique(templates)
  _check_templates(known, pairs, meta_path(root, name, "_template_pair_label.txt"))
  meta_files = [meta_path(root, name, suffix) for suffix in
                ("_face_tid_mid.txt", "_name_5pts_score.txt", "_template_pair_label.txt")]
  if gallery is not None:
    paths = one_n_files(root, name)
    for path, listed in ((paths[0], gallery), (paths[2], probes)):
      _check_templates(known, listed.templates, path)
    meta_files += paths
  return Meta(root=root, name=name, image_names=image_names, landmarks=landmarks,
              face_scores=face_scores, templates=templates, medias=medias, pairs=pairs,
              pair_labels=pair_labels, gallery=gallery, probes=probes, meta_files=meta_files)


def meta_sha256(meta: Meta) -> str:
  """SHA-256 over the meta files read (each file's name, then its bytes), in reading order.

  The images are left out: hashing 469 375 of them would cost what embedding does.
  """
  digest = hashlib.sha256()
  for path in meta.meta_files:
    digest.update(path.name.encode() + b"\0")
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):  # pylint: disable=cell-var-from-loop
        digest.update(block)
  return digest.hexdigest()


def check_images(meta: Meta) -> None:
  """Raises `errors.DataError` naming the first image of the face lists missing in loose_crop/."""
  crops = meta.root / "loose_crop"
  missing = [name for name in meta.image_names if not (crops / name).is_file()]
  if missing:
    raise errors.DataError(f"{crops / missing[0]} does not exist ({len(missing)} of the "
                           f"{len(meta.image_names)} faces' images are missing)")


def aligned_face(meta: Meta, index: int) -> np.ndarray:
  """Face `index` read from loose_crop/ in colour, aligned by its landmarks: (112, 112, 3) uint8."""
  path = meta.root / "loose_crop" / meta.image_names[index]
  try:
    image = images.decode_image(path.read_bytes())
  except (OSError, errors.DataError) as error:
    raise errors.DataError(f"{path}: {error}") from None
  # As cv2.imread reads them for insightface: every image in colour.
  return images.align_face(images.with_channels(image, 3), meta.landmarks[index])

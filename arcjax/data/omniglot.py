"""Omniglot's handwritten characters as identities, embedded in the package.

Omniglot (Lake, Salakhutdinov and Tenenbaum, Science 350(6266), 2015; MIT
licence, see omniglot/LICENSE) has 20 drawings, by 20 different people, of each
character of 50 alphabets: an open set of many identities with few images each,
as faces are. The package carries the two small background sets exactly as
published — `images_background_small1.zip` (136 characters) and
`images_background_small2.zip` (156) — with their SHA256SUMS, checked on every
read. They are read straight from the zips, without extracting them; Greek and
Latin are in both, with the same drawings, and are counted once: 242 characters
× 20 drawings = 4 840 images of 105×105 (1 channel, strokes black on white).

`load(path)` also reads another copy of Omniglot: a zip of the same layout
(e.g. the full background set, `images_background.zip`, 964 characters, from
https://github.com/brendenlake/omniglot), several such zips in a folder, or an
extracted folder `<alphabet>/<characterNN>/*.png`.
"""

import hashlib
import os
import pathlib
import zipfile

import numpy as np

from arcjax import errors
from arcjax.data import staging
from arcjax.data.folders import ImageFolderSource, check_zip_names
from arcjax.data.images import IMAGE_SUFFIXES, decode_image
from arcjax.data.sources import ArraySource

EMBEDDED = pathlib.Path(__file__).resolve().parent / "omniglot"


def verify_checksum(path: pathlib.Path, expected: str) -> None:
  """Raises DataError unless the file's SHA-256 is `expected` (hex)."""
  digest = hashlib.sha256(path.read_bytes()).hexdigest()
  if digest != expected:
    raise errors.DataError(f"{path}: SHA-256 {digest} does not match {expected} in "
                           f"{path.parent / staging.CHECKSUMS}: the file is damaged or another one")


def _zip_images(path: pathlib.Path) -> dict[str, list[tuple[str, bytes]]]:
  """{'<alphabet>/<character>': [(file name, PNG bytes), ...]} of one Omniglot zip."""
  characters: dict[str, list[tuple[str, bytes]]] = {}
  try:
    with zipfile.ZipFile(path) as archive:
      check_zip_names(archive, path)
      for member in sorted(archive.namelist()):
        parts = member.split("/")
        if len(parts) < 3 or os.path.splitext(parts[-1])[1].lower() not in IMAGE_SUFFIXES:
          continue
        characters.setdefault("/".join(parts[-3:-1]), []).append(
            (parts[-1], archive.read(member)))
  except zipfile.BadZipFile as error:
    raise errors.DataError(f"{path}: not a readable zip ({error})") from None
  return characters


def _zips_of(path: pathlib.Path) -> list[pathlib.Path]:
  """The Omniglot zips that `path` names (a zip, or a folder of zips), checksums verified."""
  zips = [path] if path.is_file() else sorted(path.glob("*.zip"))
  for zip_path in zips:
    expected = staging.read_checksums(zip_path.parent).get(zip_path.name)
    if expected is not None:
      verify_checksum(zip_path, expected)
  return zips


def _from_zips(zips: list[pathlib.Path]) -> tuple[list[str], list[list[bytes]]]:
  """Identity names (sorted) and their encoded images; a character in several zips counts once."""
  characters: dict[str, list[tuple[str, bytes]]] = {}
  for zip_path in zips:
    for name, images in _zip_images(zip_path).items():
      if name in characters and [n for n, _ in characters[name]] != [n for n, _ in images]:
        raise errors.DataError(f"{zip_path}: character {name} holds other drawings than in "
                               "an earlier zip; a character must be the same in every zip")
      characters.setdefault(name, images)
  names = sorted(characters)
  return names, [[encoded for _, encoded in characters[name]] for name in names]


def load(path: str | os.PathLike | None = None) -> ArraySource:
  """Omniglot as an in-memory source: images (N, 105, 105, 1) uint8, a character per label.

  Args:
    path: None for the embedded small background sets; else an Omniglot zip, a
      folder of zips, or an extracted folder of `<alphabet>/<character>/` images.
      Zips listed in a SHA256SUMS beside them are checked against it.

  Returns:
    An ArraySource whose `identity_names[c]` is label c's '<alphabet>/<character>',
    labels in sorted-name order, images in file-name order within a character.
  """
  path = EMBEDDED if path is None else pathlib.Path(path).expanduser()
  if not path.exists():
    raise errors.DataError(f"Omniglot not found at {path}")
  if path == EMBEDDED:
    sums = staging.read_checksums(EMBEDDED)
    if len(sums) != 2:
      raise errors.DataError(f"{EMBEDDED / staging.CHECKSUMS} must list the two embedded zips")
  zips = _zips_of(path)
  if zips:
    names, encoded = _from_zips(zips)
  else:
    folder = ImageFolderSource(path)
    names = folder.identity_names
    encoded = [[] for _ in names]
    for index, label in enumerate(folder.labels):
      encoded[label].append(folder.encoded(index))
  if len(names) < 2:
    raise errors.DataError(f"{path} holds {len(names)} Omniglot characters; at least 2 are needed")
  try:
    images = np.stack([decode_image(image) for images in encoded for image in images])
  except ValueError as error:
    raise errors.DataError(f"{path}: {error}") from None
  labels = np.repeat(np.arange(len(names)), [len(images) for images in encoded])
  return ArraySource(images, labels, num_classes=len(names), identity_names=names)

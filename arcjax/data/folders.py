"""Image folders as a source (one folder per identity), and zips of them unpacked.

An identity is a directory that directly holds image files, at any depth under
the root: ORL is `s1/1.pgm …`, Omniglot is `<alphabet>/<characterNN>/*.png`.
Its name is its path relative to the root (POSIX separators, e.g.
`Latin/character01`); labels follow the sorted names, so the label map is the
same on every machine. Hidden entries (a leading '.') and non-image files
(READMEs, licences) are ignored.

Writers (`recordio.folder_to_recordio`, `python -m arcjax.data.convert`) bring
images of another size to the one they write with a fit policy
(`images.FITS`; the geometry is `images.fit_geometry`'s docstring).
"""

from collections.abc import Iterator, Sequence
import contextlib
import os
import pathlib
import tempfile
import zipfile

import numpy as np

from arcjax import errors
from arcjax.data.images import IMAGE_SUFFIXES, decode_image


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

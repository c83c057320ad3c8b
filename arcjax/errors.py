"""The failures a user can cause, and the one line every command prints for them.

Library code raises a subclass of `Error` for anything a user can bring about
and fix (a bad config value, a corrupt record, a busy workdir, a diverged run).
The command lines run their work through `report_errors`, which turns such an
error — and a full disk, a missing file, a permission refused — into one line
`error: …` and a non-zero exit; anything else is a bug and keeps its traceback.
"""

import contextlib
import errno
import signal
import sys
from collections.abc import Iterator

# Exit status of a command interrupted by SIGINT (Ctrl-C) / SIGTERM, as shells report them.
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_USER_OS_ERRORS = (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR,
                   errno.EISDIR) + _DISK_FULL


class Error(Exception):
  """An expected failure, reported by the command lines as one line."""


class ConfigError(Error, ValueError):
  """A config value that is out of range, inconsistent, or does not fit the data."""


class DataError(Error, ValueError):
  """Input data that cannot be read: a missing file, a corrupt record, a bad label."""


class WorkdirError(Error):
  """A workdir that cannot be used now: held by another run, or a config that changed."""


class TrainingError(Error):
  """A run that cannot go on: a non-finite loss or state, or diverging parameters."""


class Interrupted(Error):
  """The run stopped on SIGINT or SIGTERM (after saving what it had)."""

  def __init__(self, message: str, exit_status: int = EXIT_INTERRUPTED):
    super().__init__(message)
    self.exit_status = exit_status


def _chain(error: BaseException) -> Iterator[BaseException]:
  """`error`, then its causes and contexts (orbax wraps the OSError of a failed write)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def message_of(error: BaseException) -> str | None:
  """The one-line message of an expected error; None for a bug (keep its traceback)."""
  for link in _chain(error):
    if isinstance(link, OSError) and link.errno in _DISK_FULL:
      where = f" writing {link.filename}" if link.filename else ""
      return f"disk full{where}: {link.strerror or link}"
    if "No space left on device" in str(link):  # tensorstore's writers say it in words
      return f"disk full: {' '.join(str(link).split())[:300]}"
  if isinstance(error, KeyboardInterrupt):
    return "interrupted"
  if isinstance(error, Error):
    return " ".join(str(error).split("\n"))
  if isinstance(error, OSError) and error.errno in _USER_OS_ERRORS:
    return str(error)
  return None


def exit_status_of(error: BaseException) -> int:
  """The exit status for an expected error: 130 for Ctrl-C, 143 for SIGTERM, else 1."""
  if isinstance(error, KeyboardInterrupt):
    return EXIT_INTERRUPTED
  return getattr(error, "exit_status", 1)


@contextlib.contextmanager
def report_errors(*, traceback: bool = False) -> Iterator[None]:
  """Runs the body; an expected error becomes `error: …` on stderr and `SystemExit`.

  `traceback=True` (a command's `--traceback` flag) re-raises every error as it is.
  """
  try:
    yield
  except (Exception, KeyboardInterrupt) as error:  # pylint: disable=broad-except
    message = message_of(error)
    if traceback or message is None:
      raise
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(exit_status_of(error)) from None


class StopSignals:
  """While entered, SIGINT and SIGTERM are only noted (`number`), for a loop to stop cleanly.

  The loop checks `number` between steps, saves, and raises `interrupted()`.
  """

  def __init__(self):
    self.number, self._previous = None, {}

  def __enter__(self) -> "StopSignals":
    for number in (signal.SIGINT, signal.SIGTERM):
      self._previous[number] = signal.signal(number, self._note)
    return self

  def _note(self, number, frame) -> None:
    del frame
    self.number = number

  def __exit__(self, *exc_info) -> bool:
    for number, handler in self._previous.items():
      signal.signal(number, handler)
    return False

  def interrupted(self, what: str) -> Interrupted:
    """The error that ends the command, exit status 128 + the signal's number."""
    return Interrupted(f"stopped by {signal.Signals(self.number).name} {what}", 128 + self.number)

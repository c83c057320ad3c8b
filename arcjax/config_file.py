"""The `--config` flag, parsed one way for the trainer and the launcher, its errors one line each.

`--config=FILE[:ARG]` names a config file whose `get_config(ARG)` builds a run's
config; `--config.a.b=VALUE` overrides a field (ml_collections' config_flags).
`arcjax.main` parses its command line with `parse_flags`; the launcher builds
each run's config with `load`, from the argv it gives that run's trainer, so
the two cannot disagree. ml_collections reports a failure as a nested
exception, a multi-line text or a whole traceback; here each becomes one line
that names the config, and an unknown key names its parent's keys.

Nothing here imports JAX (a config file may).
"""

import difflib
import re
from typing import Sequence

from absl import flags
import ml_collections
from ml_collections import config_flags

from arcjax import errors

# What absl and ml_collections raise for a bad flag, a bad value or a config file that fails.
_PARSE_ERRORS = (flags.Error, AttributeError, KeyError, OSError, ValueError, TypeError)
_OVERRIDE = re.compile(r"--?config\.([A-Za-z_][\w.]*)(=|$)")


def define_flag(flag_values: flags.FlagValues = flags.FLAGS,
                sys_argv: Sequence[str] | None = None) -> flags.FlagHolder:
  """Defines `--config` on `flag_values` (the trainer's flags unless given).

  `sys_argv`: the argv to be parsed, where it is not sys.argv (ml_collections
  reads the override flags it must define from it).
  """
  return config_flags.DEFINE_config_file("config", None, "Config file[:arg].",
                                         flag_values=flag_values, lock_config=True,
                                         sys_argv=None if sys_argv is None else list(sys_argv))


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """Parses `argv` into `flag_values` and loads the config; returns the arguments left over.

  Raises:
    ConfigError (one line) for an unknown flag or config key, a value of the
    wrong type, or a config file that cannot be read or whose get_config fails.
  """
  try:
    remaining = flag_values(list(argv))
    config = flag_values["config"].value
    if not isinstance(config, ml_collections.ConfigDict):
      getattr(config, "keys", None)  # a file that failed to load raises its OSError on any use
  except _PARSE_ERRORS as error:
    raise errors.ConfigError(_one_line(error, argv)) from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise errors.ConfigError(f"{_config_spec(argv)}: get_config did not build a ConfigDict "
                             f"but {type(config).__name__}")
  return remaining


def load(argv: Sequence[str]) -> ml_collections.ConfigDict:
  """The config that `argv` builds, as the trainer builds it, on flags of its own.

  Args:
    argv: `[prog, --config=FILE[:ARG], --config.FIELD=VALUE, …]`.

  Raises:
    ConfigError (one line), as `parse_flags`.
  """
  flag_values = flags.FlagValues()
  define_flag(flag_values, sys_argv=argv)
  parse_flags(argv, flag_values)
  return flag_values["config"].value


def _config_spec(argv: Sequence[str]) -> str | None:
  """'configs/ablations.py:arcface' of `--config=…` or `--config …` in argv; None if absent."""
  for index, arg in enumerate(argv):
    for name in ("--config", "-config"):
      if arg.startswith(name + "="):
        return arg[len(name) + 1:]
      if arg == name and index + 1 < len(argv):
        return argv[index + 1]
  return None


def _unknown_key(config: ml_collections.ConfigDict, path: str) -> str | None:
  """Why `config.<path>` names no field, with the keys where it goes astray; None if it does."""
  node, parent = config, "config"
  for key in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict):
      return f"unknown config key config.{path}: {parent} is {node!r}, which has no keys"
    if key not in node:
      known = sorted(node.keys())
      close = difflib.get_close_matches(key, known, n=1)
      hint = f" (did you mean {close[0]}?)" if close else ""
      return (f"unknown config key config.{path}: {parent} has no {key}{hint}; its keys: "
              f"{', '.join(known)}")
    node, parent = node[key], f"{parent}.{key}"
  return None


def _unknown_key_message(argv: Sequence[str], spec: str) -> str | None:
  """Why the first override in argv that names no field of `spec`'s config does not; None if
  every one does, or `spec` builds no config."""
  argv_of_spec = ["arcjax", f"--config={spec}"]
  flag_values = flags.FlagValues()
  define_flag(flag_values, sys_argv=argv_of_spec)
  try:
    flag_values(argv_of_spec)
    config = flag_values["config"].value
  except _PARSE_ERRORS:
    return None
  if not isinstance(config, ml_collections.ConfigDict):
    return None
  for arg in argv:
    match = _OVERRIDE.match(arg)
    message = match and _unknown_key(config, match.group(1))
    if message:
      return message
  return None


def _one_line(error: BaseException, argv: Sequence[str]) -> str:
  """The message of a flag-parsing error as one line, naming the config it is about.

  ml_collections raises AttributeError(KeyError(key)) or KeyError for an unknown
  field, names the flag in a bad value's message, and wraps a failing
  get_config in a text ending with that error's traceback.
  """
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  text = str(error.args[0] if error.args else error)
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  spec = _config_spec(argv)
  if isinstance(error, (AttributeError, KeyError)) and spec is not None:
    message = _unknown_key_message(argv, spec) or f"unknown config key {'; '.join(lines)}"
    return f"{spec}: {message}"
  if "Error whilst parsing config file" in text:  # get_config raised: its last line says it
    return f"{spec}: {lines[-1]}"
  if "No such file or directory" in text:
    return f"cannot read the config file: {text.split(']')[-1].strip() or text}"
  if spec is not None and text.startswith("flag --config."):  # a bad value of an override
    return f"{spec}: {' '.join(lines).removeprefix('flag ')}"
  return " ".join(lines) or type(error).__name__

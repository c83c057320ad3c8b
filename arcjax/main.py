"""Trains and evaluates one run: a config plus a workdir.

  python -m arcjax.main --config=configs/default.py --workdir=runs/default \
      [--config.train.steps=2000 ...] [--allow_config_change] [--traceback]

`--config=FILE[:ARG]` names a config file whose `get_config(ARG)` builds the
run; `--config.a.b=value` overrides a field. Unknown keys, values of the wrong
type and out-of-range values stop here, before anything is compiled. The same
command, run again, resumes from the workdir's newest complete checkpoint; a
changed config is refused there unless --allow_config_change (recorded in
config_history.jsonl). The workdir may be local or in a bucket (gs://…). A
multi-host run passes --coordinator_address, --num_processes and --process_id
(or sets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or
--distributed_auto on a TPU pod or under SLURM.

Every expected failure ends as one line `error: …` and a non-zero exit (130 on
Ctrl-C, 143 on SIGTERM, after saving a checkpoint); --traceback shows the
Python traceback too.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from arcjax import errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:arg].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run (local or gs://).")
_ALLOW_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Resume a trained run with a config that changes what is trained (recorded).")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the traceback of expected errors too.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for a multi-process run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index in [0, num_processes).")
_AUTO = flags.DEFINE_bool("distributed_auto", False,
                          "Let JAX detect the cluster (TPU pods, SLURM).")
flags.mark_flags_as_required(["config", "workdir"])


def _flag_error(error: Exception) -> str:
  """One line for a flag or config-file error (ml_collections nests and multi-lines them)."""
  while error.args and isinstance(error.args[0], Exception):  # AttributeError(KeyError(...))
    error = error.args[0]
  text = str(error.args[0] if error.args else error)
  if isinstance(error, (AttributeError, KeyError)):  # --config.no.such.key, with "Did you mean"
    return "unknown config key " + text.replace("\n", "; ")
  if "No such file or directory" in text:
    return f"cannot read the config file: {text.split(']')[-1].strip() or text}"
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if "Error whilst parsing config file" in text:  # get_config raised: keep its own words
    return f"{lines[0].split(': Error')[0]}: {lines[-1]}"
  return " ".join(lines)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, every flag or config-file error reported as one line."""
  try:
    argv = flags.FLAGS(argv)
    _CONFIG.value.keys()  # a config file that failed to load raises here, not when parsed
  except (flags.Error, AttributeError, KeyError, OSError, ValueError, TypeError) as error:
    sys.exit(f"error: {_flag_error(error)}")
  return argv


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  with errors.report_errors(traceback=_TRACEBACK.value):
    # Imported here: a mistyped flag is reported above without loading JAX's stack.
    from arcjax import sharding, train  # pylint: disable=import-outside-toplevel
    train.check_config(config)
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                    auto=_AUTO.value)
    train.train_and_evaluate(config, _WORKDIR.value, allow_config_change=_ALLOW_CHANGE.value)
  print(f"results: {_WORKDIR.value.rstrip('/')}/results.json")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)

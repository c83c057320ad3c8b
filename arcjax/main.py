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

from arcjax import config_file
from arcjax import errors

_CONFIG = config_file.define_flag()
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


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, every flag or config-file error reported as one line."""
  try:
    return config_file.parse_flags(argv)
  except errors.ConfigError as error:
    sys.exit(f"error: {error}")


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

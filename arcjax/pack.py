r"""Trains a pack of runs together: one compiled step over a leading run axis, a workdir each.

  python -m arcjax.pack [--allow_config_change] [--traceback] \
      -- --config=configs/ablations.py:arcface --workdir=runs/arcface_s0 \
      -- --config=configs/ablations.py:arcface --workdir=runs/arcface_s1 --config.seed=1

Each group after a `--` is what `python -m arcjax.main` takes for that run
alone: `--config=FILE[:ARG] --workdir=DIR [--config.a.b=v ...]` (a multi-process
pack, e.g. on a TPU pod, takes main's --distributed_auto or --coordinator_address,
--num_processes, --process_id once, or the same in every group). The runs may
differ only in what a step takes traced (learning rate, weight decay, s, m1,
m2, m3, the loss weights, the margin warm-up), the seed and the sampler;
anything else splits a pack (`train.pack_key`) and is refused in one line.

Each run keeps its own workdir with a solo run's files, and can be resumed
solo or in another pack (trained_in.json records each start). Runs may start
at different steps. A run that goes non-finite stops alone, the others finish;
Ctrl-C or SIGTERM saves every run's checkpoint. The end prints one line per run
(`[DIR] finished` or `[DIR] failed: …`); the exit status is 0 iff every run
finished.
"""

import contextlib
import dataclasses
import functools
import sys
from typing import Any

from absl import logging
import jax
import numpy as np

from arcjax import config_file
from arcjax import errors
from arcjax import evaluators
from arcjax import logging as arcjax_logging
from arcjax import sharding
from arcjax import train
from arcjax import workdir

_GLOBAL_FLAGS = ("--allow_config_change", "--traceback")
# `arcjax.main`'s flags for a multi-process run (a TPU pod's pack: `--distributed_auto`).
_DISTRIBUTED_FLAGS = ("--coordinator_address", "--num_processes", "--process_id",
                      "--distributed_auto")


@dataclasses.dataclass
class _Run:
  """One run of a pack: its config and workdir, and its loop's host side once started."""
  name: str  # the workdir as given
  config: Any
  directory: Any = None
  setup: Any = None
  start: int = 0
  writer: Any = None
  evals: Any = None
  events: Any = None
  inputs: contextlib.ExitStack = dataclasses.field(default_factory=contextlib.ExitStack)
  batches: Any = None
  error: BaseException | None = None
  results: dict[str, Any] | None = None

  def done(self) -> bool:
    return self.error is not None or self.results is not None


class _RunProgress:
  """A run's view of the pack's progress bar: its lines named by its workdir; its logged loss
  and images/s shown on the bar, at the pack's step (the runs may be at different steps)."""

  def __init__(self, bar, name: str, offset: int):
    self._bar, self._name, self._offset = bar, name, offset

  def update(self, step: int, loss: float, images_per_s: float) -> None:
    self._bar.update(step + self._offset, loss, images_per_s)

  def write(self, line: str) -> None:
    self._bar.write(f"[{self._name}] {line}")


def _run_state(states: Any, index: int, abstract: Any) -> Any:
  """Run `index`'s state out of the pack's stacked states, laid out as `abstract` (its solo
  layout; new arrays: the pack's are donated)."""
  return jax.device_put(jax.tree.map(lambda leaf: leaf[index], states),
                        jax.tree.map(lambda leaf: leaf.sharding, abstract))


def train_pack(configs: list[Any], workdirs: list[str], *,
               allow_config_change: bool = False) -> list[dict[str, Any] | None]:
  """Trains (or resumes) the runs of `configs` in `workdirs` together, one compiled step.

  Everything of every run (the pack, each config, workdir, data and checkpoint,
  a changed config) is checked before anything of any run is written (but the
  locks). Each run then trains from its own step on its own batches
  (`train.input_batches`), logs, evaluates and saves on its own schedule, and
  writes results.json at its end. A run whose step is not finite stops alone
  (nothing of that step saved); SIGINT/SIGTERM saves every running run's
  checkpoint and raises `errors.Interrupted`.

  Returns:
    Each run's results (`train.train_and_evaluate`'s), None for a failed run.

  Raises:
    errors.Error: one line, before training, for what refuses the pack; after it,
      a TrainingError naming the runs that failed (each run's line was printed).
  """
  if len(configs) != len(workdirs):
    raise ValueError(f"{len(configs)} configs for {len(workdirs)} workdirs")
  seen = {}
  for name in workdirs:
    path = str(workdir.as_path(name))
    if path in seen:
      raise errors.ConfigError(f"the pack names workdir {name} twice ({seen[path]} and {name}): "
                               "each run needs its own")
    seen[path] = name
  par = sharding.parallelism_for(configs[0].train, configs[0].head)
  train.check_pack(configs, par)
  runs = [_Run(name, config) for name, config in zip(workdirs, configs)]
  steps = configs[0].train.steps  # shared (train.pack_key)
  with contextlib.ExitStack() as stack:
    records, primary = [], True
    for run in runs:
      run.directory, primary, record = stack.enter_context(train.open_run(run.config, run.name))
      run.setup = train.set_up(run.config, run.directory, primary,  # the data is shared
                               runs[0].setup.datasets if runs[0].setup else None)
      stack.callback(run.setup.checkpoints.close)
      records.append(record)
    if primary:  # every run's config change refused before any run's config.json is written
      for run in runs:
        workdir.check_config_change(run.directory, run.config, allow_changes=allow_config_change)
    for run, record in zip(runs, records):
      record(run.config, allow_changes=allow_config_change)

    states, init_programs = [], {}
    for run in runs:
      state, run.start, restored = train.start_state(run.config, run.directory, run.setup, primary,
                                                     init_programs)
      states.append(state)
      if primary and run.start < steps:
        train.record_segment(run.directory, run.start, [r.name for r in runs if r is not run])
      run.writer = stack.enter_context(contextlib.closing(arcjax_logging.MetricWriter(
          run.directory, run.config, enabled=primary,
          keep_through_step=run.start if restored else None)))
    first = min(run.start for run in runs)
    bar = stack.enter_context(contextlib.closing(
        arcjax_logging.Progress(steps, first, enabled=primary)))
    num_classes = runs[0].setup.datasets.num_classes

    def finish(run, state=None):
      """Closes a run trained to its end (its final evaluation re-run from `state` when it was
      finished before this start), and writes its results."""
      if state is not None:  # resumed a run trained to the end: its results again, rows once
        run.evals.run(evaluators.ModelView.of(state, steps, num_classes, par.host), final=True)
      run.setup.checkpoints.wait()
      run.inputs.close()
      run.writer.close()
      run.results = train.write_results(run.config, run.directory, run.writer.rows, run.evals,
                                        primary)

    def fail(run, error):
      run.error = error
      run.setup.checkpoints.wait()
      run.inputs.close()
      run.writer.close()
      bar.write(f"[{run.name}] error: {errors.message_of(error) or error}")

    shared = evaluators.Shared.of(runs[0].config, runs[0].setup.datasets)  # one model, one data
    for run, state in zip(runs, states):
      progress = _RunProgress(bar, run.name, first - run.start)
      run.evals = evaluators.Evaluators(run.config, run.setup.datasets, run.writer, progress,
                                        run.directory, primary=primary, shared=shared)
      if run.start == 0:
        run.writer.write_images(0, {"train/images": run.setup.samples})
        run.evals.run(evaluators.ModelView.of(state, 0, num_classes, par.host))
      if run.start == steps:
        finish(run, state)
        continue
      run.events = train.RunEvents(run.config, run.directory, run.setup, writer=run.writer,
                                   evals=run.evals, progress=progress, start=run.start)
      run.batches = run.inputs.enter_context(
          train.input_batches(run.config, run.setup.datasets, run.start))
      stack.callback(run.inputs.close)

    # Update `tick` of the loop is update start + tick of each run; a run resumed at its end
    # is done already, and where every run is, nothing compiles.
    ticks = max((steps - run.start for run in runs if not run.done()), default=0)
    pack_par = par.for_pack(len(runs))  # the runs over a mesh axis where the devices allow
    states = jax.device_put(train.stack_runs(states), pack_par.run_shardings(states[0]))
    step_fn = train.make_pack_step(configs, pack_par, num_classes, states) if ticks else None
    stop = errors.StopSignals() if jax.process_count() == 1 else contextlib.nullcontext()
    with stop:
      for tick in range(1, ticks + 1):
        active = [not run.done() and run.start + tick <= steps for run in runs]
        if not any(active):
          break
        own = {i: next(run.batches) for i, run in enumerate(runs) if active[i]}
        filler = jax.tree.map(np.zeros_like, next(iter(own.values())))  # a stopped run's lane
        batches = {key: np.stack([own.get(i, filler)[key] for i in range(len(runs))])
                   for key in ("image", "label")}
        states, metrics = step_fn(states, pack_par.put_batch(batches, runs=True),
                                  np.asarray(active))
        rows = functools.cache(functools.partial(pack_par.run_scalars, metrics))
        if tick == 1:  # the first step compiles: time from its end
          jax.block_until_ready(metrics)
        stopping = getattr(stop, "number", None) is not None
        # Every run logs before any evaluates: a run's images/s leaves out its own
        # evaluations (RunEvents) and, with the clocks restarted below, the other runs'.
        for i, run in enumerate(runs):
          if not active[i]:
            continue
          if tick == 1:
            run.events.restart_clock(run.start + tick)
          try:
            run.events.log(run.start + tick, lambda i=i, run=run, rows=rows: train.run_metrics(
                run.config, rows()[i]), stopping=stopping)
          except errors.TrainingError as error:
            fail(run, error)
        evaluated = False
        for i, run in enumerate(runs):
          if not active[i] or run.done():
            continue
          step = run.start + tick
          evaluated |= run.evals.due(step) or step == steps
          run.events.evaluate_and_save(
              step, functools.partial(_run_state, states, i, run.setup.abstract),
              stopping=stopping)
          if step == steps:
            finish(run)
        for run in runs if evaluated else ():
          if not run.done():
            run.events.restart_clock(run.start + tick)
        saved = [run for i, run in enumerate(runs) if active[i] and not run.done()]
        if stopping and saved:
          for run in saved:
            run.setup.checkpoints.wait()
          raise stop.interrupted(
              "; ".join(f"at step {run.start + tick}, checkpoint saved in {run.directory}"
                        for run in saved) + ": run the same command to resume")
  for run in runs:
    line = "finished" if run.error is None else f"failed: {errors.message_of(run.error)}"
    print(f"[{run.name}] {line}", flush=True)
  failed = [run.name for run in runs if run.error is not None]
  if failed:
    raise errors.TrainingError(f"{len(failed)} of the pack's {len(runs)} runs failed "
                               f"({', '.join(failed)}); the others finished")
  return [run.results for run in runs]


def _split_distributed(args: list[str]) -> tuple[dict[str, str], list[str]]:
  """`arcjax.main`'s multi-process flags among `args` ({name: value}), and the other args."""
  found, rest = {}, []
  for arg in args:
    name, has_value, value = arg.partition("=")
    if name in _DISTRIBUTED_FLAGS:
      found[name.removeprefix("--")] = value if has_value else "true"
    else:
      rest.append(arg)
  return found, rest


def parse_command_line(argv: list[str]) -> tuple[dict[str, Any], list[tuple[str, list[str]]]]:
  """`[prog, GLOBAL..., --, RUN FLAGS..., --, RUN FLAGS..., ...]` → (options, runs).

  options: {'allow_config_change': bool, 'traceback': bool, 'distributed': {name: value}}:
  `arcjax.main`'s multi-process flags (--coordinator_address=, --num_processes=,
  --process_id=, --distributed_auto), given before the first '--' or in the runs' groups,
  the same in each (the pack is one process group). runs: [(workdir, the run's argv for
  `config_file.load`), ...]. Raises a one-line ConfigError for anything else.
  """
  groups, current, before = [], None, []
  for arg in argv[1:]:
    if arg == "--":
      current = []
      groups.append(current)
    elif current is not None:
      current.append(arg)
    else:
      before.append(arg)
  distributed, before = _split_distributed(before)
  options = {name.removeprefix("--"): False for name in _GLOBAL_FLAGS}
  for arg in before:
    if arg in ("-h", "--help"):
      print(__doc__)
      raise SystemExit(0)
    if arg not in _GLOBAL_FLAGS:
      raise errors.ConfigError(f"unknown flag {arg} before the first '--' (the pack's own flags: "
                               f"{', '.join(_GLOBAL_FLAGS)}); each run's flags follow a '--'")
    options[arg.removeprefix("--")] = True
  if not groups:
    raise errors.ConfigError("no runs: python -m arcjax.pack [--allow_config_change] "
                             "-- --config=FILE --workdir=DIR [--config.a.b=v ...] -- ...")
  runs, given = [], []
  for index, group in enumerate(groups):
    flags, group_rest = _split_distributed(group)
    if flags:
      given.append(flags)
    workdirs, rest, args = [], [], iter(group_rest)
    for arg in args:
      if arg.startswith("--workdir="):
        workdirs.append(arg.removeprefix("--workdir="))
      elif arg == "--workdir":
        workdirs.append(next(args, ""))
      else:
        rest.append(arg)
    if len(workdirs) != 1 or not workdirs[0]:
      raise errors.ConfigError(f"run {index} of the pack needs one --workdir=DIR, got "
                               f"{len(workdirs)}: {' '.join(group) or '(no flags)'}")
    runs.append((workdirs[0], [argv[0], *rest]))
  if given and (len(given) != len(groups) or any(flags != given[0] for flags in given)):
    raise errors.ConfigError("the runs of a pack train in one process group: give "
                             f"{'/'.join(_DISTRIBUTED_FLAGS)} once before the first '--', or "
                             "the same in every run's flags")
  if given and distributed and distributed != given[0]:
    raise errors.ConfigError("the multi-process flags before the first '--' differ from the "
                             "runs' own")
  options["distributed"] = distributed or (given[0] if given else {})
  return options, runs


def _initialize_distributed(flags: dict[str, str]) -> None:
  """`sharding.initialize_distributed` of the multi-process flags `parse_command_line` found."""
  try:
    count, index = (int(flags[name]) if name in flags else None
                    for name in ("num_processes", "process_id"))
  except ValueError:
    raise errors.ConfigError(f"--num_processes and --process_id take an int, got {flags}") from None
  sharding.initialize_distributed(flags.get("coordinator_address"), count, index,
                                  auto=flags.get("distributed_auto") == "true")


def main(argv: list[str]) -> None:
  traceback = "--traceback" in argv[1:argv.index("--")] if "--" in argv else False
  with errors.report_errors(traceback=traceback):
    options, groups = parse_command_line(argv)
    configs = []
    for index, (name, run_argv) in enumerate(groups):
      try:
        configs.append(config_file.load(run_argv))
      except errors.ConfigError as error:
        raise errors.ConfigError(f"run {index} of the pack ({name}): {error}") from None
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    _initialize_distributed(options["distributed"])
    train_pack(configs, [name for name, _ in groups],
               allow_config_change=options["allow_config_change"])


if __name__ == "__main__":
  main(sys.argv)

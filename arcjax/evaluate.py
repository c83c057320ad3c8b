"""Evaluates any checkpoint of a run on verification data, as the trainer does.

  python -m arcjax.evaluate --workdir=runs/default [--step=N] [--bins=lfw.bin,cfp_fp.bin]

With no --bins, the run's own evaluation sets (its held-out identities and the
.bin files of its config); the numbers for the final step equal those in its
results.json. Prints the verification table and writes it to
<workdir>/evaluations/step<N>.json.
"""

import argparse
import sys
from typing import Sequence

from arcjax import errors


def evaluate(workdir_path: str, step: int | None = None,
             bins: Sequence[str] = ()) -> tuple[int, dict[str, dict[str, float]]]:
  """(the step evaluated, {set: verification summary}) of a run's checkpoint."""
  # pylint: disable=import-outside-toplevel  (a bad flag is reported before these load)
  from arcjax import data, evaluators, inference, workdir
  run = inference.load_run(workdir_path, step)
  image_size = tuple(run.config.data.image_size) if run.config.data.image_size else None
  if not bins and run.imported_from:
    raise errors.ConfigError(f"{workdir_path} is a model imported from {run.imported_from}: it has "
                             "no evaluation sets of its own; name .bin files with --bins")
  if bins:
    eval_sets = {data.bin_name(path): data.load_bin(data.resolve(path), image_size)[0]
                 for path in bins}
  else:
    eval_sets = data.get_datasets(run.config.data).eval_sets
  if not eval_sets:
    raise errors.ConfigError(f"{workdir_path} has no evaluation sets; name .bin files with --bins")
  batch = inference.batch_size_for(run.config.eval.batch_size,
                                   *(len(pair_set.images) for pair_set in eval_sets.values()))
  results = evaluators.verify_sets(run.embed_fn, run.variables, eval_sets, batch_size=batch,
                                   flip=run.config.eval.flip)
  workdir.write_json(workdir.as_path(workdir_path) / workdir.EVALUATIONS / f"step{run.step}.json",
                     {"step": run.step, "eval": results})
  return run.step, results


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m arcjax.evaluate",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="the run's workdir (local or gs://)")
  parser.add_argument("--step", type=int, help="the checkpoint to evaluate (default: the latest)")
  parser.add_argument("--bins", default="",
                      help="comma-separated verification .bin files instead of the run's sets")
  parser.add_argument("--traceback", action="store_true", help="show tracebacks of errors")
  args = parser.parse_args(argv)
  with errors.report_errors(traceback=args.traceback):
    from arcjax import evaluation  # pylint: disable=import-outside-toplevel
    bins = [path for path in args.bins.split(",") if path]
    step, results = evaluate(args.workdir, args.step, bins)
    print(f"verification of {args.workdir} at step {step}:")
    print(evaluation.format_table(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""How hard each loss term pulls during training: a plot of the runs' per-term gradient norms.

  python -m experiments.term_gradients RUN [RUN ...] --out term_gradients.png

Each RUN is a workdir (local or gs://) of a loss with several terms; the trainer
logs, averaged over each `log_every` window, ‖∂(w·term)/∂x‖ over the batch's
embeddings (`train/grad_norm/<term>`) and the same over the centres
(`train/grad_norm/<term>_centres`). One panel per run and per quantity, the
terms on a log scale against the step.
"""

import argparse
import sys
from typing import Sequence

from arcjax import errors


def series(rows: list[dict], suffix: str) -> dict[str, tuple[list[int], list[float]]]:
  """{term: (steps, values)} of the `train/grad_norm/<term><suffix>` rows."""
  found: dict[str, tuple[list[int], list[float]]] = {}
  for row in rows:
    for key, value in row.items():
      if not key.startswith("train/grad_norm/") or not isinstance(value, (int, float)):
        continue
      term = key.removeprefix("train/grad_norm/")
      if term.endswith("_centres") != bool(suffix):
        continue
      steps, values = found.setdefault(term.removesuffix(suffix), ([], []))
      steps.append(row["step"])
      values.append(value)
  return found


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.term_gradients",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("runs", nargs="+", help="workdirs of runs with several loss terms")
  parser.add_argument("--out", required=True, help="the PNG to write")
  parser.add_argument("--traceback", action="store_true", help="show tracebacks of errors")
  args = parser.parse_args(argv)
  with errors.report_errors(traceback=args.traceback):
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    from arcjax import logging as arcjax_logging  # pylint: disable=import-outside-toplevel
    fig, axes = plt.subplots(len(args.runs), 2, figsize=(11, 2.8 * len(args.runs)),
                             squeeze=False, constrained_layout=True)
    for run, row in zip(args.runs, axes):
      rows = arcjax_logging.read_metrics(run)
      for ax, (suffix, on) in zip(row, (("", "embeddings"), ("_centres", "centres"))):
        curves = series(rows, suffix)
        if not curves:
          raise errors.DataError(f"{run} logged no per-term gradient norms (a loss of one term?)")
        for term, (steps, values) in sorted(curves.items()):
          ax.plot(steps, values, label=term)
        ax.set_yscale("log")
        name = "/".join(run.rstrip("/").split("/")[-2:])
        ax.set_title(f"{name}: ‖∂(w·term)/∂{on}‖", fontsize="small")
        ax.set_xlabel("step")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

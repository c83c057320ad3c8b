"""Collects a grid's results into the paper-style table (its Tables 2 and 5).

  python -m experiments.collect runs/table5 [--format markdown|csv] [--out FILE]

Rows are the runs (one workdir per row, named after its loss); columns are the
verification accuracy ± std over the folds of every evaluation set, in %, then
the angle statistics in degrees. Runs without results.json are unfinished and
listed as such.
"""

import argparse
import csv
import io
import json
import os
import sys
from typing import Any, Sequence

RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
# Files that only a run's workdir holds: a subfolder with none of them is not a run.
_RUN_FILES = (RESULTS_FILE, CONFIG_FILE, METRICS_FILE, "launch.log")
# (key in angle_stats, column title), in the paper's order.
ANGLE_COLUMNS = (("w_ec_deg", "W-EC"), ("w_inter_deg", "W-Inter"),
                 ("intra1_deg", "Intra1"), ("inter1_deg", "Inter1"),
                 ("intra2_deg", "Intra2"), ("inter2_deg", "Inter2"))


def _read_json(path: str) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e


def _last_step(metrics_path: str) -> int | None:
  """The largest 'step' in metrics.jsonl; a line cut short by a running trainer is ignored."""
  if not os.path.isfile(metrics_path):
    return None
  step = None
  with open(metrics_path, encoding="utf-8") as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict) and isinstance(record.get("step"), int):
        step = record["step"] if step is None else max(step, record["step"])
  return step


def _read_run(run_dir: str) -> dict[str, Any]:
  """One row of `collect` (see there)."""
  name = os.path.basename(run_dir)
  config_path = os.path.join(run_dir, CONFIG_FILE)
  config = _read_json(config_path) if os.path.isfile(config_path) else None
  results_path = os.path.join(run_dir, RESULTS_FILE)
  if not os.path.isfile(results_path):
    return {"name": name, "path": run_dir, "finished": False,
            "step": _last_step(os.path.join(run_dir, METRICS_FILE)),
            "loss": None, "eval": {}, "angle_stats": {}, "config": config}
  results = _read_json(results_path)
  if not isinstance(results, dict):
    raise ValueError(f"{results_path} must hold a JSON object, got {type(results).__name__}")
  evals = results.get("eval", {})
  if not isinstance(evals, dict):
    raise ValueError(f"{results_path}: 'eval' must map evaluation sets to metrics")
  for set_name, metrics in evals.items():
    if not isinstance(metrics, dict) or "accuracy" not in metrics:
      raise ValueError(f"{results_path}: eval[{set_name!r}] has no 'accuracy'")
  angle_stats = results.get("angle_stats") or {}
  if not isinstance(angle_stats, dict):
    raise ValueError(f"{results_path}: 'angle_stats' must be an object")
  return {"name": name, "path": run_dir, "finished": True, "step": results.get("step"),
          "loss": results.get("loss"), "eval": evals, "angle_stats": angle_stats,
          "config": config}


def collect(root: str) -> list[dict[str, Any]]:
  """Reads every run workdir directly under `root`, in name order.

  Args:
    root: the grid's folder (the launcher's --workdir).

  Returns:
    One dict per run: 'name' (the folder's name, i.e. the grid row), 'path',
    'finished' (results.json exists), 'step' (results' step; for an unfinished
    run the last step in metrics.jsonl, or None), 'loss' (results' loss entry
    or None), 'eval' ({set: {'accuracy', 'accuracy_std', …}} as fractions in
    [0, 1], empty while unfinished), 'angle_stats' ({'w_ec_deg', …} degrees,
    empty while unfinished), 'config' (config.json's content or None).
  """
  if not os.path.isdir(root):
    raise ValueError(f"runs folder {root!r} does not exist")
  runs = []
  for entry in sorted(os.listdir(root)):
    run_dir = os.path.join(root, entry)
    if os.path.isdir(run_dir) and any(os.path.exists(os.path.join(run_dir, f))
                                      for f in _RUN_FILES):
      runs.append(_read_run(run_dir))
  if not runs:
    raise ValueError(f"{root!r} holds no run workdirs (folders with {' or '.join(_RUN_FILES)})")
  return runs


def eval_sets(rows: Sequence[dict[str, Any]]) -> list[str]:
  """Evaluation sets of the finished rows, in order of first appearance."""
  names: dict[str, None] = {}
  for row in rows:
    names.update(dict.fromkeys(row["eval"]))
  return list(names)


def _unfinished_note(row: dict[str, Any]) -> str:
  return f"{row['name']} (step {row['step']})" if row["step"] is not None else (
      f"{row['name']} (not started)")


def to_markdown(rows: Sequence[dict[str, Any]]) -> str:
  """The table of finished runs: accuracy ± std in %, angles in degrees (2 decimals).

  Unfinished runs are listed in a line under the table; a missing value is '—'.
  """
  finished = [r for r in rows if r["finished"]]
  sets = eval_sets(finished)
  header = ["Loss"] + [f"{s} (%)" for s in sets] + [f"{title} (°)" for _, title in ANGLE_COLUMNS]
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
  for row in finished:
    cells = [row["name"]]
    for s in sets:
      m = row["eval"].get(s)
      if m is None:
        cells.append("—")
      elif m.get("accuracy_std") is None:
        cells.append(f"{100 * m['accuracy']:.2f}")
      else:
        cells.append(f"{100 * m['accuracy']:.2f} ± {100 * m['accuracy_std']:.2f}")
    for key, _ in ANGLE_COLUMNS:
      value = row["angle_stats"].get(key)
      cells.append("—" if value is None else f"{value:.2f}")
    lines.append("| " + " | ".join(cells) + " |")
  unfinished = [r for r in rows if not r["finished"]]
  if unfinished:
    lines += ["", "Unfinished: " + ", ".join(_unfinished_note(r) for r in unfinished)]
  return "\n".join(lines) + "\n"


def _csv_number(value: float | None, scale: float = 1.0) -> str:
  return "" if value is None else f"{scale * value:.4f}"


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
  """Every run, finished or not: loss, status, step, <set>_accuracy and
  <set>_accuracy_std in % and the angle statistics in degrees (4 decimals;
  empty where missing)."""
  sets = eval_sets(rows)
  header = ["loss", "status", "step"]
  for s in sets:
    header += [f"{s}_accuracy", f"{s}_accuracy_std"]
  header += [key for key, _ in ANGLE_COLUMNS]
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(header)
  for row in rows:
    cells = [row["name"], "finished" if row["finished"] else "unfinished",
             "" if row["step"] is None else row["step"]]
    for s in sets:
      m = row["eval"].get(s, {})
      cells += [_csv_number(m.get("accuracy"), 100), _csv_number(m.get("accuracy_std"), 100)]
    cells += [_csv_number(row["angle_stats"].get(key)) for key, _ in ANGLE_COLUMNS]
    writer.writerow(cells)
  return buffer.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
  """The command line: prints (or writes to --out) the table."""
  parser = argparse.ArgumentParser(prog="python -m experiments.collect",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("root", help="the grid's folder of run workdirs, e.g. runs/table5")
  parser.add_argument("--format", choices=("markdown", "csv"), default="markdown")
  parser.add_argument("--out", help="write the table to this file instead of stdout")
  args = parser.parse_args(argv)
  try:
    rows = collect(args.root)
  except ValueError as e:
    parser.error(str(e))
  table = to_markdown(rows) if args.format == "markdown" else to_csv(rows)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(table)
  else:
    sys.stdout.write(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())

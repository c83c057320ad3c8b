"""Collects a grid's results into the paper-style table (its Tables 2 and 5).

  python -m experiments.collect ROOT [--format markdown|csv] [--reference ROW] [--out FILE]

ROOT is the launcher's --workdir or --bucket: a local folder or gs://…. Rows
are the grid's rows (one folder per row, named after its loss); columns are
the verification accuracy of every evaluation set in %, then the angle
statistics in degrees.

A row of one run (`ROOT/<row>`) shows its accuracy ± the standard deviation
over the verification folds. A seeded row (`ROOT/<row>/seed<k>`, from
`launch --seeds`) shows, in every column, the mean ± the sample standard
deviation (ddof=1) over its finished seeds, and N, their number. A cell is
marked `*` where the row's mean differs from the reference row's (--reference,
default norm_softmax when present) by more than two standard errors of the
difference, sqrt(s1²/n1 + s2²/n2), where both rows have at least 2 seeds.
A statistic that does not apply to a row (the trainer wrote None: W-EC and
W-Inter of a loss that never trains the class centres) shows as '–'; a missing
one as '—'. Runs without results.json are unfinished and listed under the table.

A seeded row's mean is over runs of one experiment: their config.json agree
in every field but `seed` and those that change neither the training nor the
measurement (`workdir.FREE_FIELDS` less `train.steps`, `eval.flip`,
`data.max_pairs`, `data.eval_bins`, `angles.probe_size`), their
config_history.jsonl record the same changes (a run whose steps were extended
trained under another schedule than one started at that length), and the seed
of `seed<k>` is k. A run that breaks this (against the largest group of
agreeing seeds; on a tie, the one with the smallest seed), has no config.json,
or a results.json with no evaluation and no angle statistic, is left out of
the mean and named under the table with the reason; its row is marked †.
"""

import argparse
import csv
import io
import json
import math
import statistics
import sys
from typing import Any, NamedTuple, Sequence

from etils import epath

from arcjax import errors
from arcjax import workdir
from experiments import plan

# (key in angle_stats, column title), in the paper's order.
ANGLE_COLUMNS = (("w_ec_deg", "W-EC"), ("w_inter_deg", "W-Inter"),
                 ("intra1_deg", "Intra1"), ("inter1_deg", "Inter1"),
                 ("intra2_deg", "Intra2"), ("inter2_deg", "Inter2"))
DEFAULT_REFERENCE = "norm_softmax"
# A statistic the trainer wrote as None: it does not apply to the row's loss.
NOT_APPLICABLE = "not applicable"
NOT_APPLICABLE_MARK = "–"  # en dash
MISSING_MARK = "—"  # em dash
SIGNIFICANCE_MARK = "*"
LEFT_OUT_MARK = "†"
# Free fields (workdir.FREE_FIELDS) that still change what a run measures or how long it
# trained: the seeds of a row must agree in them.
MEASURED_FIELDS = ("train.steps", "eval.flip", "data.max_pairs", "data.eval_bins",
                   "angles.probe_size")
_ABSENT = object()


# --- Reading the runs -------------------------------------------------------------------


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_name(value: Any) -> str:
  return {dict: "an object", list: "a list", str: "a string"}.get(type(value), repr(value))


def _bad(path: epath.Path, field: str, expected: str, value: Any) -> errors.WorkdirError:
  return errors.WorkdirError(f"{path}: {field} must be {expected}, got {_type_name(value)}")


def _check_results(path: epath.Path, results: Any) -> None:
  """Raises WorkdirError naming the file and the field of a results.json of the wrong shape."""
  if not isinstance(results, dict):
    raise _bad(path, "the file", "a JSON object", results)
  if results.get("step") is not None and not isinstance(results["step"], int):
    raise _bad(path, "'step'", "an integer", results["step"])
  evals = results.get("eval", {})
  if not isinstance(evals, dict):
    raise _bad(path, "'eval'", "an object of evaluation sets", evals)
  for set_name, metrics in evals.items():
    if not isinstance(metrics, dict):
      raise _bad(path, f"eval[{set_name!r}]", "an object of metrics", metrics)
    if "accuracy" not in metrics:
      raise errors.WorkdirError(f"{path}: eval[{set_name!r}] has no 'accuracy'")
    if not _is_number(metrics["accuracy"]):
      raise _bad(path, f"eval[{set_name!r}]['accuracy']", "a number", metrics["accuracy"])
    std = metrics.get("accuracy_std")
    if std is not None and not _is_number(std):
      raise _bad(path, f"eval[{set_name!r}]['accuracy_std']", "a number", std)
  angle_stats = results.get("angle_stats")
  if angle_stats is not None and not isinstance(angle_stats, dict):
    raise _bad(path, "'angle_stats'", "an object", angle_stats)
  for key, _ in ANGLE_COLUMNS:
    value = (angle_stats or {}).get(key)
    if value is not None and not _is_number(value):
      raise _bad(path, f"angle_stats[{key!r}]", "a number or null", value)


def _last_step(metrics_path: epath.Path) -> int | None:
  """The largest 'step' in metrics.jsonl; a line cut short by a running trainer is ignored."""
  if not metrics_path.exists():
    return None
  step = None
  for line in metrics_path.read_bytes().decode("utf-8", errors="replace").splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(record, dict) and isinstance(record.get("step"), int):
      step = record["step"] if step is None else max(step, record["step"])
  return step


def _read_history(path: epath.Path) -> list[dict[str, Any]]:
  """The changes config_history.jsonl records, in order ([] without one)."""
  if not path.exists():
    return []
  changes = []
  for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
    try:
      entry = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(entry, dict) and isinstance(entry.get("changes"), list):
      changes += [c for c in entry["changes"] if isinstance(c, dict) and "field" in c]
  return changes


def _read_run(run_dir: epath.Path, row: str, seed: int | None) -> dict[str, Any]:
  """One entry of `collect` (see there)."""
  name = row if seed is None else f"{row}/{plan.seed_folder(seed)}"
  config_path = run_dir / workdir.CONFIG
  config = workdir.read_json(config_path) if config_path.exists() else None
  run = {"name": name, "row": row, "seed": seed, "path": str(run_dir), "config": config,
         "history": _read_history(run_dir / workdir.CONFIG_HISTORY), "empty": False}
  results_path = run_dir / workdir.RESULTS
  if not results_path.exists():
    return {**run, "finished": False, "step": _last_step(run_dir / workdir.METRICS),
            "loss": None, "eval": {}, "angle_stats": {}}
  results = workdir.read_json(results_path)
  _check_results(results_path, results)
  angle_stats = results.get("angle_stats") or {}
  return {**run, "finished": True, "step": results.get("step"), "loss": results.get("loss"),
          "eval": results.get("eval", {}), "angle_stats": angle_stats,
          "empty": not results.get("eval") and not any(
              angle_stats.get(key) is not None for key, _ in ANGLE_COLUMNS)}


def _seed_runs(row_dir: epath.Path) -> list[tuple[int, epath.Path]]:
  """(k, folder) of the `seed<k>` run folders in a row's folder, by k."""
  seeds = []
  for child in row_dir.iterdir():
    seed = plan.seed_of(child.name)
    if seed is not None and child.is_dir() and workdir.holds_run(child):
      seeds.append((seed, child))
  return sorted(seeds)


def collect(root: str) -> list[dict[str, Any]]:
  """Reads every run of a grid: `root/<row>`, or `root/<row>/seed<k>` for seeded rows.

  Args:
    root: the grid's folder (the launcher's --workdir or --bucket), local or gs://.

  Returns:
    One dict per run, by row name then seed: 'name' ('<row>' or '<row>/seed<k>'),
    'row', 'seed' (int or None), 'path', 'finished' (results.json exists),
    'step' (results' step; for an unfinished run the last step in metrics.jsonl,
    or None), 'loss' (results' loss entry or None), 'eval' ({set: {'accuracy',
    'accuracy_std', …}} as fractions in [0, 1], empty while unfinished),
    'angle_stats' ({'w_ec_deg', …} degrees, or None where a statistic does not
    apply; empty while unfinished), 'config' (config.json's content or None),
    'history' (the changes config_history.jsonl records, in order), 'empty'
    (a results.json with no evaluation and no angle statistic).

  Raises:
    WorkdirError naming the file (and field) of anything unreadable.
  """
  root_path = workdir.as_path(root, what="runs folder")
  if not root_path.is_dir():
    raise errors.WorkdirError(f"runs folder {root!r} does not exist")
  runs = []
  for row_dir in sorted(root_path.iterdir(), key=lambda p: p.name):
    if not row_dir.is_dir():
      continue
    seeds = _seed_runs(row_dir)
    if workdir.holds_run(row_dir):
      if seeds:
        raise errors.WorkdirError(f"{row_dir} holds both a run and seeded runs "
                                  f"({', '.join(p.name for _, p in seeds)})")
      runs.append(_read_run(row_dir, row_dir.name, None))
    runs += [_read_run(path, row_dir.name, seed) for seed, path in seeds]
  if not runs:
    raise errors.WorkdirError(f"{root!r} holds no run workdirs (folders with "
                              f"{' or '.join(workdir.RUN_FILES)})")
  return runs


# --- Rows and their statistics --------------------------------------------------------------


class Cell(NamedTuple):
  """A number of the table: the mean over a row's runs, its spread, and how many runs.

  spread: for a seeded row, the sample standard deviation over seeds (None for
  one seed); for a row of one run, its accuracy's standard deviation over the
  verification folds (None for angles).
  """
  mean: float
  spread: float | None
  n: int


def _seed_cell(values: Sequence[Any]) -> Cell | str | None:
  """Mean ± sample std of the runs' values; NOT_APPLICABLE if all are None; None if absent."""
  present = [v for v in values if v is not _ABSENT]
  if not present:
    return None
  numbers = [float(v) for v in present if v is not None]
  if not numbers:
    return NOT_APPLICABLE
  spread = statistics.stdev(numbers) if len(numbers) >= 2 else None
  return Cell(statistics.fmean(numbers), spread, len(numbers))


def _angle_cell(value: Any) -> Cell | str | None:
  if value is _ABSENT:
    return None
  return NOT_APPLICABLE if value is None else Cell(float(value), None, 1)


def differs(a: Cell | str | None, b: Cell | str | None) -> bool:
  """Whether two seeded cells' means differ by more than two standard errors of the
  difference, sqrt(s1²/n1 + s2²/n2); False unless both have ≥ 2 seeds."""
  if not (isinstance(a, Cell) and isinstance(b, Cell)) or min(a.n, b.n) < 2:
    return False
  standard_error = math.sqrt(a.spread ** 2 / a.n + b.spread ** 2 / b.n)
  return abs(a.mean - b.mean) > 2 * standard_error


def _columns(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
  """('eval', set) for every evaluation set (in order of first appearance), then
  ('angle_stats', key) for every angle statistic."""
  sets: dict[str, None] = {}
  for row in rows:
    sets.update(dict.fromkeys(row["eval"]))
  return [("eval", s) for s in sets] + [("angle_stats", key) for key, _ in ANGLE_COLUMNS]


def _compared(field: str) -> bool:
  """Whether the seeds of a row must agree in config field `field` (not `seed`)."""
  return field != "seed" and (not workdir.is_free_field(field) or field in MEASURED_FIELDS)


def _history(run: dict[str, Any]) -> list[tuple[str, str, str]]:
  """The recorded changes of a run that change its training or measurement (seed included)."""
  return [(c["field"], json.dumps(c.get("stored")), json.dumps(c.get("requested")))
          for c in run.get("history", []) if c["field"] == "seed" or _compared(c["field"])]


def _describe_history(changes: list[tuple[str, str, str]]) -> str:
  return ", ".join(f"{field}: {old} → {new}" for field, old, new in changes) or "none"


def _difference(reference: dict[str, Any], run: dict[str, Any]) -> str | None:
  """Why `run` is not a seed of `reference`'s experiment; None if it is."""
  changes = [c for c in workdir.config_changes(reference["config"], run["config"])
             if _compared(c.field)]
  if changes:
    return f"its config differs from {reference['name']}'s: {workdir.describe_changes(changes)}"
  if _history(run) != _history(reference):
    return (f"it trained under other config changes than {reference['name']} (its "
            f"{workdir.CONFIG_HISTORY}: {_describe_history(_history(run))}; "
            f"{reference['name']}'s: {_describe_history(_history(reference))})")
  return None


def left_out(runs: Sequence[dict[str, Any]]) -> dict[str, str]:
  """{name: reason} of the finished runs of one row that its mean leaves out (module doc)."""
  finished = [r for r in runs if r["finished"]]
  reasons = {r["name"]: "its results.json holds no evaluation and no angle statistic"
             for r in finished if r.get("empty")}
  if not any(r.get("seed") is not None for r in finished):
    return reasons
  for run in finished:
    config = run.get("config")
    if run["name"] in reasons:
      continue
    if config is None:
      reasons[run["name"]] = f"it has no {workdir.CONFIG}: its config cannot be checked"
    elif config.get("seed") != run["seed"]:
      reasons[run["name"]] = (f"its config.seed is {json.dumps(config.get('seed'))}, "
                              f"not {run['seed']}")
  groups: list[list[dict[str, Any]]] = []
  for run in sorted((r for r in finished if r["name"] not in reasons),
                    key=lambda r: r["seed"]):
    group = next((g for g in groups if _difference(g[0], run) is None), None)
    if group is None:
      groups.append([run])
    else:
      group.append(run)
  if groups:
    kept = max(groups, key=len)  # the first of the largest: on a tie, the smallest seed's
    for group in groups:
      if group is not kept:
        reasons.update({run["name"]: _difference(kept[0], run) for run in group})
  return {r["name"]: reasons[r["name"]] for r in finished if r["name"] in reasons}


def summarize(runs: Sequence[dict[str, Any]],
              reference: str | None = DEFAULT_REFERENCE) -> list[dict[str, Any]]:
  """Groups `collect`'s runs by row, with the statistics over each row's finished seeds.

  Args:
    runs: what `collect` returned (any subset, in any order: rows keep the
      order of their first run).
    reference: the row the others are compared with; no marks where it is None
      or not a row with finished runs.

  Returns:
    One dict per row: 'row', 'seeded' (its runs are seed<k> folders), 'n'
    (finished runs counted), 'runs' (its entries of `runs`), 'left_out'
    ({name: reason} of finished runs not counted, see `left_out`), 'eval'
    ({set: Cell of the accuracy}), 'angle_stats' ({key: Cell, NOT_APPLICABLE,
    or None if missing}), 'marked' (the (section, key) columns whose mean
    differs from the reference's; see `differs`).
  """
  groups: dict[str, list[dict[str, Any]]] = {}
  for run in runs:
    groups.setdefault(run.get("row", run["name"]), []).append(run)
  rows = []
  for name, members in groups.items():
    excluded = left_out(members)
    finished = [r for r in members if r["finished"] and r["name"] not in excluded]
    seeded = any(r.get("seed") is not None for r in members)
    row = {"row": name, "seeded": seeded, "n": len(finished), "runs": members,
           "left_out": excluded, "eval": {}, "angle_stats": {}, "marked": []}
    sets = dict.fromkeys(s for r in finished for s in r["eval"])
    for s in sets:
      if seeded:
        row["eval"][s] = _seed_cell([r["eval"][s]["accuracy"] if s in r["eval"] else _ABSENT
                                     for r in finished])
      else:
        metrics = finished[0]["eval"][s]
        row["eval"][s] = Cell(float(metrics["accuracy"]), metrics.get("accuracy_std"), 1)
    for key, _ in ANGLE_COLUMNS:
      values = [r["angle_stats"].get(key, _ABSENT) for r in finished]
      row["angle_stats"][key] = (_seed_cell(values) if seeded
                                 else _angle_cell(values[0]) if values else None)
    rows.append(row)
  by_name = {row["row"]: row for row in rows}
  base = by_name.get(reference) if reference is not None else None
  if base is not None and base["n"]:
    for row in rows:
      if row is not base:
        row["marked"] = [(section, key) for section, key in _columns(rows)
                         if differs(row[section].get(key), base[section].get(key))]
  return rows


# --- Tables ---------------------------------------------------------------------------------


def _format(cell: Cell | str | None, scale: float, marked: bool) -> str:
  if cell is None:
    return MISSING_MARK
  if cell is NOT_APPLICABLE:
    return NOT_APPLICABLE_MARK
  text = f"{scale * cell.mean:.2f}"
  if cell.spread is not None:
    text += f" ± {scale * cell.spread:.2f}"
  return text + (f" {SIGNIFICANCE_MARK}" if marked else "")


def _unfinished_note(run: dict[str, Any]) -> str:
  return f"{run['name']} (step {run['step']})" if run["step"] is not None else (
      f"{run['name']} (not started)")


def _footnotes(rows: Sequence[dict[str, Any]], reference: str | None) -> list[str]:
  """What the ±, the marks and the dashes of the table mean (only those it shows)."""
  notes = []
  if any(r["seeded"] and r["n"] >= 2 for r in rows):
    notes.append("± in a row of N seeds: the mean ± the sample standard deviation (ddof=1) "
                 "over its seeds, in every column.")
  if any(not r["seeded"] and any(isinstance(c, Cell) and c.spread is not None
                                 for c in r["eval"].values()) for r in rows):
    notes.append("± in a row of one run: its accuracy ± the standard deviation over the "
                 "verification folds.")
  base = next((r for r in rows if r["row"] == reference), None)
  if base is not None and base["seeded"] and base["n"] >= 2:
    notes.append(f"{SIGNIFICANCE_MARK}: the mean differs from {reference}'s by more than two "
                 "standard errors of the difference, √(s₁²/n₁ + s₂²/n₂) (rows of ≥ 2 seeds).")
  if any(c is NOT_APPLICABLE for r in rows for section in ("eval", "angle_stats")
         for c in r[section].values()):
    notes.append(f"{NOT_APPLICABLE_MARK}: does not apply to this row's loss (e.g. W-EC and "
                 f"W-Inter where the class centres are never trained); {MISSING_MARK}: not "
                 "recorded.")
  return notes


def to_markdown(runs: Sequence[dict[str, Any]],
                reference: str | None = DEFAULT_REFERENCE) -> str:
  """The table of rows with finished runs: accuracy in %, angles in degrees (2 decimals).

  A column N (finished seeds counted) where any row is seeded; footnotes say
  what ±, the marks and the dashes mean; runs left out of a row's mean
  (`left_out`, row marked †) and unfinished runs are listed under the table.
  """
  rows = summarize(runs, reference)
  shown = [r for r in rows if r["n"]]
  columns = _columns(shown)
  with_n = any(r["seeded"] for r in shown)
  header = (["Loss"] + (["N"] if with_n else [])
            + [f"{key} (%)" for section, key in columns if section == "eval"]
            + [f"{title} (°)" for _, title in ANGLE_COLUMNS])
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
  for row in shown:
    label = row["row"] + (f" {LEFT_OUT_MARK}" if row["left_out"] else "")
    cells = [label] + ([str(row["n"])] if with_n else [])
    cells += [_format(row[section].get(key), 100.0 if section == "eval" else 1.0,
                      (section, key) in row["marked"]) for section, key in columns]
    lines.append("| " + " | ".join(cells) + " |")
  for note in _footnotes(shown, reference):
    lines += ["", note]
  excluded = [(name, reason) for row in rows for name, reason in row["left_out"].items()]
  if excluded:
    lines += ["", f"{LEFT_OUT_MARK} Left out of the mean (N counts the rest):"]
    lines += [f"- {name}: {reason}" for name, reason in excluded]
  unfinished = [r for r in runs if not r["finished"]]
  if unfinished:
    lines += ["", "Unfinished: " + ", ".join(_unfinished_note(r) for r in unfinished)]
  return "\n".join(lines) + "\n"


def _csv_number(cell: Cell | str | None, scale: float) -> tuple[str, str]:
  if not isinstance(cell, Cell):
    return "", ""
  spread = "" if cell.spread is None else f"{scale * cell.spread:.4f}"
  return f"{scale * cell.mean:.4f}", spread


def _status(row: dict[str, Any]) -> str:
  return ("unfinished" if not row["n"] else "finished" if row["n"] == len(row["runs"])
          else "partial")


def to_csv(runs: Sequence[dict[str, Any]], reference: str | None = DEFAULT_REFERENCE) -> str:
  """Every row, finished or not: loss, status (finished, partial, unfinished), n (finished
  runs), spread (what the _std columns are: 'seeds' or 'folds'), then per column its mean
  and _std (accuracy in %, angles in degrees, 4 decimals; empty where missing or not
  applicable), differs_from_reference (the marked columns, ';'-separated), and left_out
  (the runs not counted, 'name: reason' '; '-separated)."""
  rows = summarize(runs, reference)
  columns = _columns(rows)
  names = {column: (f"{column[1]}_accuracy" if column[0] == "eval" else column[1])
           for column in columns}
  header = ["loss", "status", "n", "spread"]
  for column in columns:
    header += [names[column], f"{names[column]}_std"]
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(header + ["differs_from_reference", "left_out"])
  for row in rows:
    spread = "seeds" if row["seeded"] else "folds" if row["n"] else ""
    cells = [row["row"], _status(row), row["n"], spread]
    for section, key in columns:
      cells += _csv_number(row[section].get(key), 100.0 if section == "eval" else 1.0)
    cells.append(";".join(names[column] for column in row["marked"]))
    cells.append("; ".join(f"{name}: {reason}" for name, reason in row["left_out"].items()))
    writer.writerow(cells)
  return buffer.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
  """The command line: prints (or writes to --out) the table."""
  parser = argparse.ArgumentParser(prog="python -m experiments.collect",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("root", help="the grid's folder of run workdirs, e.g. runs/table5 or "
                                   "gs://BUCKET/table5")
  parser.add_argument("--format", choices=("markdown", "csv"), default="markdown")
  parser.add_argument("--reference", help="the row the others are compared with (default "
                                          f"{DEFAULT_REFERENCE} when present)")
  parser.add_argument("--rows", nargs="+", help="the rows to show, in this order (default: "
                                                "every row under the root)")
  parser.add_argument("--out", help="write the table to this file instead of stdout")
  parser.add_argument("--traceback", action="store_true",
                      help="show the traceback of an error instead of one line")
  args = parser.parse_args(argv)
  with errors.report_errors(traceback=args.traceback):
    runs = collect(args.root)
    rows = {run["row"] for run in runs}
    if args.rows:
      wanted = args.rows
      missing = [row for row in wanted if row not in rows]
      if missing:
        raise errors.ConfigError(f"--rows {', '.join(missing)}: not rows of {args.root} "
                                 f"(rows: {', '.join(sorted(rows))})")
      runs = sorted((run for run in runs if run["row"] in wanted),
                    key=lambda run: wanted.index(run["row"]))
      rows = set(wanted)
    if args.reference is not None and args.reference not in rows:
      raise errors.ConfigError(f"--reference {args.reference!r} is not a row of {args.root} "
                               f"(rows: {', '.join(sorted(rows))})")
    reference = args.reference or DEFAULT_REFERENCE
    table = (to_markdown if args.format == "markdown" else to_csv)(runs, reference)
    if args.out:
      workdir.write_text(workdir.as_path(args.out, what="--out file"), table)
    else:
      sys.stdout.write(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())

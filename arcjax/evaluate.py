"""Evaluates any checkpoint of a run on verification data, as the trainer does, or on IJB.

  python -m arcjax.evaluate --workdir=runs/default [--step=N] [--bins=lfw.bin,cfp_fp.bin]
  python -m arcjax.evaluate --workdir=runs/default [--step=N] --ijb=IJB_release/IJBC [--ijb-name=…]

With no --bins, the run's own evaluation sets (its held-out identities and the
.bin files of its config); the numbers for the final step equal those in its
results.json. Prints the verification table and writes it, with its source, to
<workdir>/evaluations/step<N>-<sets>-<id>.json: <sets> is 'own' or the .bin
names, <id> the start of the SHA-256 of the source (for --bins each file's path
and the SHA-256 of its content; for the run's own sets the SHA-256 of their
images and pairs as evaluated). A record is only ever replaced by one of the
same source: evaluations on other files never overwrite it.

With --ijb, insightface's IJB-B or IJB-C folder (`arcjax.data.ijb`): every face
aligned and embedded (the run's preprocessing, its raw features and its
mirror's), then insightface's protocol (`arcjax.ijb`): TAR at FAR 1e-6 … 1e-1
of the template pairs in each of its test modes, and 1:N identification where
the folder has its lists. Prints the table, writes
<workdir>/evaluations/<name>_step<N>.json and the ROC beside it (_roc.png).
"""

import argparse
import hashlib
import json
import re
import sys
from typing import Any, Sequence

from arcjax import errors


OWN_SETS = "the run's own sets"


def _content_sha256(pair_set) -> str:
  """SHA-256 of a pair set as evaluated: its images (shape and bytes), pairs and issame."""
  digest = hashlib.sha256()
  for array in (pair_set.images, pair_set.pairs.astype("int64"), pair_set.issame.astype(bool)):
    digest.update(repr(array.shape).encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def record_name(step: int, source: dict[str, Any]) -> str:
  """The file name of the evaluation record of `step` on `source` (see the module docstring)."""
  sets = "own" if source["kind"] == OWN_SETS else "+".join(source["sets"])
  sets = re.sub(r"[^A-Za-z0-9_.+-]+", "_", sets)[:60]
  source_id = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:12]
  return f"step{step}-{sets}-{source_id}.json"


def evaluate(workdir_path: str, step: int | None = None,
             bins: Sequence[str] = ()) -> tuple[int, dict[str, dict[str, float]], Any]:
  """(the step evaluated, {set: verification summary}, the record's path) of a run's
  checkpoint; the record goes to its workdir's evaluations/ (`record_name`), with its source."""
  # pylint: disable=import-outside-toplevel  (a bad flag is reported before these load)
  from arcjax import data, evaluators, inference, workdir
  run = inference.load_run(workdir_path, step)
  image_size = tuple(run.config.data.image_size) if run.config.data.image_size else None
  if not bins and run.imported_from:
    raise errors.ConfigError(f"{workdir_path} is a model imported from {run.imported_from}: it has "
                             "no evaluation sets of its own; name .bin files with --bins")
  if bins:
    eval_sets, files = {}, {}
    for path in bins:
      name, resolved = data.bin_name(path), workdir.as_path(data.resolve(path), "verification file")
      if name in eval_sets:
        raise errors.ConfigError(f"--bins names two sets {name!r} ({files[name]['path']} and "
                                 f"{resolved}): rename one file")
      eval_sets[name] = data.load_bin(resolved, image_size)[0]
      files[name] = {"path": str(resolved), "sha256": workdir.sha256_of(resolved)}
    source = {"kind": "files", "sets": files}
  else:
    eval_sets = data.get_datasets(run.config.data).eval_sets
    source = {"kind": OWN_SETS,
              "sets": {name: {"content_sha256": _content_sha256(pair_set)}
                       for name, pair_set in eval_sets.items()}}
  if not eval_sets:
    raise errors.ConfigError(f"{workdir_path} has no evaluation sets; name .bin files with --bins")
  batch = inference.batch_size_for(run.config.eval.batch_size,
                                   *(len(pair_set.images) for pair_set in eval_sets.values()))
  results = evaluators.verify_sets(run.embed_fn, run.variables, eval_sets, batch_size=batch,
                                   flip=run.config.eval.flip)
  path = workdir.as_path(workdir_path) / workdir.EVALUATIONS / record_name(run.step, source)
  if path.exists() and workdir.read_json(path).get("source") != source:
    raise errors.WorkdirError(f"{path} holds the record of another source; move it aside")
  workdir.write_json(path, {"step": run.step, "source": source, "eval": results})
  return run.step, results, path


def _ijb_source(meta) -> dict[str, str]:
  """What an IJB record was computed from: the folder and a hash of its meta files."""
  from arcjax.data import ijb as ijb_data  # pylint: disable=import-outside-toplevel
  return {"path": str(meta.root.resolve()), "sha256": ijb_data.meta_sha256(meta),
          "hashed": ", ".join(path.name for path in meta.meta_files)}


def evaluate_ijb(workdir_path: str, folder: str, name: str | None = None,
                 step: int | None = None) -> tuple[dict, str, str]:
  """insightface's IJB evaluation of a run's checkpoint: (the record, its table, its path).

  `folder`: insightface's IJB-B or IJB-C folder (relative: from the data root,
  as `data.path`); `name`: 'IJBB' or 'IJBC', by default the folder's name.
  Everything is read and checked before the first image is embedded; a record
  of another folder at the same place is never overwritten.
  """
  # pylint: disable=import-outside-toplevel  (a bad flag is reported before these load)
  import pathlib
  from arcjax import data, ijb, inference, workdir
  from arcjax.data import ijb as ijb_data
  if "://" in folder:
    raise errors.DataError(f"--ijb {folder}: the IJB folder must be on a local disk")
  root = pathlib.Path(data.resolve(folder))
  name = name or root.name.upper()
  if name not in ijb_data.NAMES:
    raise errors.ConfigError(f"--ijb {folder}: name the set with --ijb-name "
                             f"({' or '.join(ijb_data.NAMES)})")
  meta = ijb_data.read_meta(root, name)
  source = _ijb_source(meta)
  run = inference.load_run(workdir_path, step)
  path = workdir.as_path(workdir_path) / workdir.EVALUATIONS / f"{name}_step{run.step}.json"
  if path.exists():
    held = workdir.read_json(path).get("source", {})
    if (held.get("path"), held.get("sha256")) != (source["path"], source["sha256"]):
      raise errors.WorkdirError(
          f"{path} holds the {name} evaluation of another folder ({held.get('path')}, "
          f"meta sha256 {str(held.get('sha256'))[:12]}…); move it away to evaluate {root}")
  ijb_data.check_images(meta)
  batch = run.config.eval.batch_size
  features = ijb.face_features(lambda faces: run.features(faces, batch_size=batch, flip=True),
                               meta, chunk_size=batch * max(1, 2048 // batch))
  results = ijb.evaluate(features, meta)
  record = {"step": run.step, "ijb": name, "source": source, **ijb.record(results)}
  png = path.parent / f"{name}_step{run.step}_roc.png"
  png.parent.mkdir(parents=True, exist_ok=True)
  png.write_bytes(ijb.roc_png(results, f"{name} 1:1, {workdir_path} step {run.step}"))
  workdir.write_json(path, record)
  return record, ijb.format_table(results), str(path)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m arcjax.evaluate",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="the run's workdir (local or gs://)")
  parser.add_argument("--step", type=int, help="the checkpoint to evaluate (default: the latest)")
  parser.add_argument("--bins", default="",
                      help="comma-separated verification .bin files instead of the run's sets")
  parser.add_argument("--ijb", help="insightface's IJB-B or IJB-C folder (meta/, loose_crop/) "
                      "to evaluate on instead")
  parser.add_argument("--ijb-name", choices=("IJBB", "IJBC"),
                      help="which IJB set --ijb holds (default: the folder's name)")
  parser.add_argument("--traceback", action="store_true", help="show tracebacks of errors")
  args = parser.parse_args(argv)
  with errors.report_errors(traceback=args.traceback):
    if args.ijb_name and not args.ijb:
      raise errors.ConfigError("--ijb-name names the set of an --ijb folder; give --ijb")
    if args.ijb:
      if args.bins:
        raise errors.ConfigError("--ijb and --bins are two evaluations; run them one at a time")
      record, table, path = evaluate_ijb(args.workdir, args.ijb, args.ijb_name, args.step)
      print(f"{record['ijb']} of {args.workdir} at step {record['step']}:")
      print(table)
      print(f"wrote {path} and the ROC beside it")
      return 0
    from arcjax import verification  # pylint: disable=import-outside-toplevel
    bins = [path for path in args.bins.split(",") if path]
    step, results, record = evaluate(args.workdir, args.step, bins)
    print(f"verification of {args.workdir} at step {step} on "
          f"{', '.join(bins) if bins else OWN_SETS}:")
    print(verification.format_table(results))
    print(f"record: {record}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

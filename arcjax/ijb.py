"""IJB-B and IJB-C: insightface's 1:1 template verification and 1:N identification.

From each face's features (the model's raw outputs for the aligned face and
for its mirror image), the numbers insightface's IJB evaluation reports
(`recognition/_evaluation_/ijb/ijb_11.py` and `ijb_1n.py`,
`recognition/arcface_torch/eval_ijbc.py`), in NumPy, in float32 where
insightface computes in float32:

1. A face's input, by insightface's test mode `N·D·F·`: F0 its output f;
   F1 [f, f′] (f′ the mirror's) concatenated; F2 f + f′. N0: that
   L2-normalised; N1: kept as it is, so that its norm weighs the face ('norm
   score'). D1: then multiplied by the face detector's score ('detector
   score'); D0: not.
2. Media, then templates: the faces of one media of a template (frames of one
   video) are averaged; a template's feature is the sum of its media's,
   L2-normalised.
3. 1:1: a pair's score is the dot product of its two template features. The
   ROC is scikit-learn's `roc_curve(labels, scores)` (intermediate points
   dropped, its default); TAR at FAR x is the TPR of the ROC point whose FPR
   is nearest x (of equally near points, the last in the ROC's order), at
   x = 1e-6 … 1e-1. All twelve modes are computed; `HEADLINE` (N1D1F2) is
   eval_ijbc.py's: its flags are all on, and its code adds the mirror's
   output (insightface's tables name that F2, the concatenation F1).
4. 1:N (ijb_1n.py, in mode N1D1F2, templates normalised by their norm): the
   probe templates against the two galleries together; each probe's subject
   has exactly one gallery template, its mate. Rank-k: the fraction of probes
   whose mate is among their k most similar gallery templates. TPIR at FPIR
   f: the fraction of probes whose mate similarity exceeds the ⌈f·Q⌉-th
   largest of the Q·(G − 1) non-mate similarities of all Q probes
   (insightface's definition, not NIST's, which takes each probe's top one).
"""

import concurrent.futures
import io
import itertools
import math
from typing import Callable

import numpy as np
import sklearn.metrics
import sklearn.preprocessing
import tqdm

from arcjax import errors
from arcjax.data import ijb as ijb_data

# insightface's x_labels, written as it writes them: the record's keys are their str().
FARS = (10 ** -6, 10 ** -5, 10 ** -4, 10 ** -3, 10 ** -2, 10 ** -1)
FPIRS = (0.01, 0.1)
RANKS = (1, 5, 10)
VARIANTS = tuple(f"N{n}D{d}F{f}" for n, d, f in itertools.product((0, 1), (0, 1), (0, 1, 2)))
HEADLINE = "N1D1F2"
_PAIR_CHUNK = 100_000       # pairs scored at once
_SIMILARITY_ROWS = 4096     # probe templates scored against the gallery at once


def face_features(features_fn: Callable[[np.ndarray], np.ndarray], meta: ijb_data.Meta, *,
                  chunk_size: int, num_threads: int = 8) -> np.ndarray:
  """Every face of `meta` read lazily, aligned, and given to `features_fn`, with a progress bar.

  Args:
    features_fn: aligned faces (n, 112, 112, 3) uint8 -> (n, 2, d): each
      face's raw model output, then its mirror's (`inference.Run.features`
      with flip=True).
    meta: the IJB folder's metadata.
    chunk_size: faces read, aligned and embedded at a time; the next chunk is
      read by `num_threads` threads while this one is embedded.

  Returns:
    (F, 2, d) float32, row i for face i of the face lists.
  """
  count = len(meta.image_names)
  pool = concurrent.futures.ThreadPoolExecutor(num_threads, thread_name_prefix="arcjax-ijb")

  def read(start: int) -> list[concurrent.futures.Future]:
    return [pool.submit(ijb_data.aligned_face, meta, i)
            for i in range(start, min(start + chunk_size, count))]

  features = None
  try:
    with tqdm.tqdm(total=count, unit="face", desc=f"{meta.name} faces") as bar:
      pending = read(0)
      for start in range(0, count, chunk_size):
        faces = np.stack([future.result() for future in pending])
        pending = read(start + chunk_size)
        out = np.asarray(features_fn(faces), np.float32)
        if out.ndim != 3 or out.shape[:2] != (len(faces), 2):
          raise ValueError(f"features_fn must map {len(faces)} faces to ({len(faces)}, 2, d) "
                           f"features, got shape {out.shape}")
        if features is None:
          features = np.empty((count,) + out.shape[1:], np.float32)
        features[start:start + len(faces)] = out
        bar.update(len(faces))
  finally:
    pool.shutdown(cancel_futures=True)
  return features


def face_inputs(features: np.ndarray, face_scores: np.ndarray, variant: str) -> np.ndarray:
  """What insightface pools for each face in test mode `variant` ('N1D1F2', …): (F, d′) float32.

  Args:
    features: (F, 2, d) float32: each face's raw output and its mirror's.
    face_scores: (F,) float32 detector scores.
  """
  if variant not in VARIANTS:
    raise ValueError(f"unknown IJB test mode {variant!r}; known: {', '.join(VARIANTS)}")
  norm_score, detector_score, flip = (int(variant[i]) for i in (1, 3, 5))
  features = np.asarray(features, np.float32)
  if flip == 1:
    inputs = features.reshape(len(features), -1)
  elif flip == 2:
    inputs = features[:, 0] + features[:, 1]
  else:
    inputs = features[:, 0]
  if not norm_score:
    inputs = inputs / np.sqrt(np.sum(inputs ** 2, -1, keepdims=True))
  if detector_score:
    inputs = inputs * np.asarray(face_scores, np.float32)[:, np.newaxis]
  return inputs


def _segment_sums(rows: np.ndarray, starts: np.ndarray) -> np.ndarray:
  """Sums of `rows` over the segments [starts[i], starts[i + 1]), in `rows`' dtype.

  Row by row, in order, as NumPy's sum over axis 0 (and so insightface) adds
  them; `np.add.reduceat` adds in another order (different float32 results).
  """
  sizes = np.diff(np.r_[starts, len(rows)])
  sums = rows[starts].copy()
  for offset in range(1, int(sizes.max())):
    longer = np.flatnonzero(sizes > offset)
    sums[longer] += rows[starts[longer] + offset]
  return sums


def template_sums(inputs: np.ndarray, templates: np.ndarray,
                  medias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Each template's sum of its media means, before normalisation.

  Args:
    inputs: (F, d′) float32 face inputs (`face_inputs`); templates, medias: (F,) ints.

  Returns:
    `(unique_templates (T,) ascending, sums (T, d′) float64)`. As insightface: a
    media's mean and the template's sum in float32, faces and media in file
    and ascending media order.
  """
  order = np.lexsort((medias, templates))  # stable: a media's faces stay in file order
  sorted_templates, sorted_medias = templates[order], medias[order]
  new_media = np.r_[True, (sorted_templates[1:] != sorted_templates[:-1])
                    | (sorted_medias[1:] != sorted_medias[:-1])]
  media_starts = np.flatnonzero(new_media)
  media_sizes = np.diff(np.r_[media_starts, len(order)]).astype(np.float32)
  media_means = _segment_sums(inputs[order], media_starts) / media_sizes[:, np.newaxis]
  media_templates = sorted_templates[media_starts]
  template_starts = np.flatnonzero(np.r_[True, media_templates[1:] != media_templates[:-1]])
  sums = _segment_sums(media_means, template_starts)
  return media_templates[template_starts], sums.astype(np.float64)


def pair_scores(template_features: np.ndarray, unique_templates: np.ndarray,
                pairs: np.ndarray) -> np.ndarray:
  """(P,) float64: for each (P, 2) template pair, the dot product of its unit template features.

  `template_features: (T, d′)` rows in the order of `unique_templates: (T,)`, ascending.
  """
  rows = np.searchsorted(unique_templates, pairs)
  scores = np.empty(len(pairs))
  for start in range(0, len(pairs), _PAIR_CHUNK):
    chunk = rows[start:start + _PAIR_CHUNK]
    scores[start:start + len(chunk)] = np.sum(
        template_features[chunk[:, 0]] * template_features[chunk[:, 1]], -1)
  return scores


def tar_at_far(labels: np.ndarray, scores: np.ndarray) -> dict:
  """insightface's ROC read-out: {'tar_at_far': {str(far): TAR}, 'auc', 'roc_fpr', 'roc_tpr'}.

  The TAR at each FAR of `FARS` is the TPR of the ROC point nearest it in FPR.
  """
  fpr, tpr, _ = sklearn.metrics.roc_curve(labels, scores)
  nearest_last = {str(far): float(tpr[::-1][np.argmin(np.abs(fpr[::-1] - far))]) for far in FARS}
  return {"tar_at_far": nearest_last, "auc": float(sklearn.metrics.auc(fpr, tpr)),
          "roc_fpr": fpr, "roc_tpr": tpr}


def verification(features: np.ndarray, meta: ijb_data.Meta, variant: str) -> dict:
  """1:1 verification of `meta`'s template pairs in test mode `variant` (`tar_at_far`'s dict)."""
  inputs = face_inputs(features, meta.face_scores, variant)
  unique_templates, sums = template_sums(inputs, meta.templates, meta.medias)
  scores = pair_scores(sklearn.preprocessing.normalize(sums), unique_templates, meta.pairs)
  return tar_at_far(meta.pair_labels, scores)


def _listed(unique_templates: np.ndarray, sums: np.ndarray,
            listed: ijb_data.TemplateList) -> tuple[np.ndarray, np.ndarray]:
  """(the listed templates' unit features (R, d′), their subjects (R,)), in template order."""
  templates, first = np.unique(listed.templates, return_index=True)
  chosen = sums[np.searchsorted(unique_templates, templates)]
  return chosen / np.sqrt(np.sum(chosen ** 2, -1, keepdims=True)), listed.subjects[first]


def identification(features: np.ndarray, meta: ijb_data.Meta, variant: str = HEADLINE) -> dict:
  """1:N identification of `meta`'s probes against its galleries (see the module docstring).

  Returns {'variant', 'probes', 'gallery', 'rank1', 'rank5', 'rank10',
  'tpir_at_fpir': {str(fpir): TPIR}}.
  """
  inputs = face_inputs(features, meta.face_scores, variant)
  unique_templates, sums = template_sums(inputs, meta.templates, meta.medias)
  gallery, gallery_subjects = _listed(unique_templates, sums, meta.gallery)
  probes, probe_subjects = _listed(unique_templates, sums, meta.probes)
  if len(gallery) < 2:
    raise errors.DataError(f"the {meta.name} galleries hold {len(gallery)} template; 1:N "
                           "needs at least 2")
  positions: dict[int, list[int]] = {}
  for position, subject in enumerate(gallery_subjects):
    positions.setdefault(int(subject), []).append(position)
  for subject in probe_subjects:
    if len(positions.get(int(subject), ())) != 1:
      raise errors.DataError(f"probe subject {subject} has {len(positions.get(int(subject), ()))} "
                             f"templates in the {meta.name} galleries; 1:N needs exactly one")
  mates = np.array([positions[int(subject)][0] for subject in probe_subjects])
  num_probes = len(probes)
  needed = max(math.ceil(num_probes * fpir) for fpir in FPIRS)
  mate_scores, ranks, largest_non_mates = np.empty(num_probes), np.empty(num_probes, int), []
  for start in range(0, num_probes, _SIMILARITY_ROWS):
    similarity = probes[start:start + _SIMILARITY_ROWS] @ gallery.T
    rows = np.arange(len(similarity))
    mate = similarity[rows, mates[start:start + len(rows)]]
    mate_scores[start:start + len(rows)] = mate
    ranks[start:start + len(rows)] = 1 + np.sum(similarity > mate[:, np.newaxis], axis=1)
    similarity[rows, mates[start:start + len(rows)]] = -np.inf
    flat = similarity.ravel()
    keep = min(needed, flat.size - len(rows))
    largest_non_mates.append(np.partition(flat, flat.size - keep)[flat.size - keep:])
  non_mates = np.sort(np.concatenate(largest_non_mates))[::-1]
  tpir = {str(fpir): float(np.mean(mate_scores > non_mates[math.ceil(num_probes * fpir) - 1]))
          for fpir in FPIRS}
  return {"variant": variant, "probes": num_probes, "gallery": len(gallery),
          **{f"rank{k}": float(np.mean(ranks <= k)) for k in RANKS}, "tpir_at_fpir": tpir}


def evaluate(features: np.ndarray, meta: ijb_data.Meta) -> dict:
  """Everything insightface reports of `meta` from the faces' (F, 2, d) features.

  Returns {'faces', 'templates', 'pairs': counts; 'variants': {mode:
  `tar_at_far`'s dict}; 'identification': `identification`'s dict, or None
  where the folder has no 1:N lists}.
  """
  if features.shape[0] != len(meta.image_names):
    raise ValueError(f"{features.shape[0]} features for {len(meta.image_names)} faces")
  return {"faces": len(meta.image_names), "templates": len(np.unique(meta.templates)),
          "pairs": len(meta.pairs),
          "variants": {variant: verification(features, meta, variant) for variant in VARIANTS},
          "identification": None if meta.gallery is None else identification(features, meta)}


def record(results: dict) -> dict:
  """What the evaluation record holds of `evaluate`'s results: JSON, the ROC arrays left out.

  'tar_at_far' and 'auc' at the top are `HEADLINE`'s; every mode's are under 'variants'.
  """
  variants = {variant: {"tar_at_far": r["tar_at_far"], "auc": r["auc"]}
              for variant, r in results["variants"].items()}
  return {**{key: results[key] for key in ("faces", "templates", "pairs")},
          "variant": HEADLINE, **variants[HEADLINE], "variants": variants,
          "identification": results["identification"]}


def format_table(results: dict) -> str:
  """insightface's TAR@FAR table (%), a row per test mode, and the 1:N line where there is one."""
  lines = [f"  {results['faces']} faces, {results['templates']} templates, {results['pairs']} "
           "pairs: TAR (%) at FAR"]
  header = f"  {'mode':<8}" + "".join(f"{str(far):>8}" for far in FARS) + f"{'AUC':>8}"
  lines.append(header)
  for variant, r in results["variants"].items():
    mark = " *" if variant == HEADLINE else "  "
    lines.append(f"  {variant}{mark}" + "".join(f"{100 * r['tar_at_far'][str(far)]:>8.2f}"
                                              for far in FARS) + f"{100 * r['auc']:>8.2f}")
  lines.append("  N1: features keep their norm (N0: normalised); D1: × detector score; "
               "F1: mirror concatenated, F2: mirror added; * eval_ijbc.py's default")
  found = results["identification"]
  if found is not None:
    lines.append(
        f"  1:N ({found['variant']}, {found['probes']} probe templates, {found['gallery']} "
        "gallery): " + ", ".join(f"rank-{k} {100 * found[f'rank{k}']:.2f}" for k in RANKS)
        + ", " + ", ".join(f"TPIR@FPIR={fpir} {100 * tpir:.2f}"
                           for fpir, tpir in found["tpir_at_fpir"].items()) + " (%)")
  return "\n".join(lines)


def roc_png(results: dict, title: str) -> bytes:
  """The ROC of every test mode on a log-FAR axis, as insightface draws it: PNG bytes."""
  # pylint: disable=import-outside-toplevel  (matplotlib only where a figure is drawn)
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib import colormaps
  figure = Figure(figsize=(7, 5.5))
  FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  colours = colormaps["tab20"].colors  # 12 modes, 12 colours
  for colour, (variant, r) in zip(colours, results["variants"].items()):
    axes.plot(r["roc_fpr"], r["roc_tpr"], color=colour, lw=2.0 if variant == HEADLINE else 0.8,
              label=f"{variant} (AUC {100 * r['auc']:.2f} %)")
  axes.set_xscale("log")
  axes.set_xlim(FARS[0], 1.0)
  axes.set_ylim(0.0, 1.0)
  axes.set_xticks(FARS + (1.0,))
  axes.grid(linestyle="--", linewidth=0.5)
  axes.set_xlabel("False Positive Rate (FAR)")
  axes.set_ylabel("True Positive Rate (TAR)")
  axes.set_title(title)
  axes.legend(loc="lower right", fontsize=7)
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=120)
  return buffer.getvalue()

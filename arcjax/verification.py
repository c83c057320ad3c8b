"""Face verification and identification metrics, as insightface reports them.

Pure NumPy (float64) functions of embeddings, as insightface evaluates
lfw / cfp_fp / agedb_30 (`recognition/arcface_torch/eval/verification.py`):

1. embed each image and its horizontal flip, sum, L2-normalise (`fuse_flip`);
2. the squared L2 distance between the two normalised embeddings of a pair,
   in [0, 4] (`pair_distances`); a pair is predicted "same" when
   distance < threshold;
3. `num_folds` contiguous folds (scikit-learn's `KFold(shuffle=False)`); on
   each fold the threshold from `arange(0, 4, 0.01)` that is best on the
   other folds; accuracy mean ± std over the folds, and the mean threshold;
4. VAL at FAR = 1e-3 with the threshold interpolated on the training folds
   over `arange(0, 4, 0.001)`; and, on all pairs, the exact ROC, its AUC and
   TAR at FAR 1e-4 … 1e-1 (`verify`).
"""

from typing import Callable

import numpy as np

_ACCURACY_THRESHOLD_STEP = 0.01   # insightface's calculate_roc grid
_VAL_THRESHOLD_STEP = 0.001       # insightface's calculate_val grid
_MAX_DISTANCE = 4.0               # squared distance of antipodal unit vectors
_TAR_FARS = (1e-4, 1e-3, 1e-2, 1e-1)
# Rows of a (rows, columns) similarity matrix computed at once: bounds the
# float64 scratch of rank-1 identification to 128 MiB for any gallery size.
_SIMILARITY_CHUNK_ELEMENTS = 1 << 24


def far_key(far: float) -> str:
  """The spelling of a FAR in result keys: 1e-3 -> '1e-3', 2.5e-4 -> '2.5e-4'."""
  return np.format_float_scientific(far, trim="-", exp_digits=1)


def as_embeddings(x, name: str) -> np.ndarray:
  """(N, d) finite float64, or ValueError naming `name`."""
  x = np.asarray(x)
  if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
    raise ValueError(f"{name} must be a non-empty (N, d) array, got shape {x.shape}")
  if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
    raise ValueError(f"{name} must be real numbers, got dtype {x.dtype}")
  x = x.astype(np.float64)
  bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
  if bad.size:
    raise ValueError(f"{name} has non-finite values in row {int(bad[0])} "
                     f"({bad.size} rows in all)")
  return x


def _l2_normalize(x: np.ndarray, name: str) -> np.ndarray:
  """Rows of (N, d) float64 scaled to unit norm; a zero row is a ValueError."""
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  zero = np.flatnonzero(norms[:, 0] == 0)
  if zero.size:
    raise ValueError(f"{name} row {int(zero[0])} has zero norm and no direction "
                     f"({zero.size} rows in all)")
  return x / norms


def unit_rows(x, name: str) -> np.ndarray:
  """(N, d) finite float64 rows scaled to unit norm, or ValueError naming `name`."""
  return _l2_normalize(as_embeddings(x, name), name)


def _same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
  if a.shape != b.shape:
    raise ValueError(f"{name_a} and {name_b} must have the same shape, got "
                     f"{a.shape} and {b.shape}")


def fuse_flip(emb: np.ndarray, emb_flipped: np.ndarray) -> np.ndarray:
  """Flip-test fusion: L2-normalised `emb + emb_flipped`.

  Args:
    emb: (N, d) embeddings of the images.
    emb_flipped: (N, d) embeddings of their horizontal flips.

  Returns:
    (N, d) float64 unit rows.
  """
  emb = as_embeddings(emb, "emb")
  emb_flipped = as_embeddings(emb_flipped, "emb_flipped")
  _same_shape(emb, emb_flipped, "emb", "emb_flipped")
  return _l2_normalize(emb + emb_flipped, "emb + emb_flipped")


def pair_distances(embeddings1: np.ndarray, embeddings2: np.ndarray) -> np.ndarray:
  """Squared L2 distance between the L2-normalised embeddings of each pair.

  Args:
    embeddings1, embeddings2: (P, d); row i of each is pair i. Normalised
      here (a no-op for `fuse_flip` output), so any scale is accepted.

  Returns:
    (P,) float64 in [0, 4]; 2 − 2 cos θ of the pair's angle θ.
  """
  e1 = as_embeddings(embeddings1, "embeddings1")
  e2 = as_embeddings(embeddings2, "embeddings2")
  _same_shape(e1, e2, "embeddings1", "embeddings2")
  diff = _l2_normalize(e1, "embeddings1") - _l2_normalize(e2, "embeddings2")
  return np.sum(diff * diff, axis=1)


def _as_issame(issame, num_pairs: int) -> np.ndarray:
  """(P,) bool from bools or 0/1 integers, or ValueError."""
  issame = np.asarray(issame)
  if issame.ndim != 1:
    raise ValueError(f"issame must be a (P,) array, got shape {issame.shape}")
  if issame.shape[0] != num_pairs:
    raise ValueError(f"issame has {issame.shape[0]} entries but there are "
                     f"{num_pairs} pairs of embeddings")
  if issame.dtype != bool:
    if not np.issubdtype(issame.dtype, np.integer) or not np.isin(issame, (0, 1)).all():
      raise ValueError(f"issame must be bool (or 0/1 integers), got dtype {issame.dtype} "
                       f"with values {np.unique(issame)[:5]}")
    issame = issame.astype(bool)
  return issame


def _fold_bounds(num_pairs: int, num_folds: int) -> np.ndarray:
  """(num_folds + 1,) start/end indices of contiguous folds, as KFold(shuffle=False).

  The first `num_pairs % num_folds` folds hold one pair more than the others.
  """
  sizes = np.full(num_folds, num_pairs // num_folds)
  sizes[:num_pairs % num_folds] += 1
  return np.concatenate([[0], np.cumsum(sizes)])


def _accept_counts(dist: np.ndarray, issame: np.ndarray,
                   thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """True and false accepts (dist < threshold) at each threshold: two (T,) ints."""
  pos = np.sort(dist[issame])
  neg = np.sort(dist[~issame])
  return (np.searchsorted(pos, thresholds, side="left"),
          np.searchsorted(neg, thresholds, side="left"))


def _val_threshold(far: np.ndarray, thresholds: np.ndarray, far_target: float) -> float:
  """The threshold at which the (non-decreasing) FAR curve reaches `far_target`.

  insightface calls `scipy.interpolate.interp1d(far, thresholds, 'slinear')`,
  which current SciPy refuses because `far` repeats values (insightface issue
  #2152). Here: the largest grid threshold whose FAR is ≤ the target,
  interpolated linearly toward the next grid threshold by where the target
  lies between their FARs. Where every threshold stays below the target, the
  largest threshold.
  """
  lo = int(np.searchsorted(far, far_target, side="right")) - 1
  if lo < 0:  # no threshold has FAR ≤ target; cannot happen for t_0 = 0
    return float(thresholds[0])
  if lo == len(thresholds) - 1:
    return float(thresholds[lo])
  frac = (far_target - far[lo]) / (far[lo + 1] - far[lo])
  return float(thresholds[lo] + frac * (thresholds[lo + 1] - thresholds[lo]))


def _roc_curve(dist: np.ndarray, issame: np.ndarray) -> dict[str, np.ndarray]:
  """The exact ROC of "same when dist ≤ t" over every distinct distance t.

  Args:
    dist: (P,) distances; issame: (P,) bool, with at least one pair of each kind.

  Returns:
    {'fpr', 'tpr', 'thresholds'}: (K + 1,) float64 each, K distinct
    distances ascending, preceded by threshold −inf (accept nothing, the
    point (0, 0)). Tied distances enter together, as scikit-learn's
    `roc_curve(issame, -dist, drop_intermediate=False)`.
  """
  order = np.argsort(dist, kind="stable")
  d = dist[order]
  same = issame[order]
  last_of_value = np.flatnonzero(np.r_[d[1:] != d[:-1], True])
  tp = np.cumsum(same)[last_of_value]
  fp = np.cumsum(~same)[last_of_value]
  return {
      "fpr": np.r_[0.0, fp / fp[-1]],
      "tpr": np.r_[0.0, tp / tp[-1]],
      "thresholds": np.r_[-np.inf, d[last_of_value]],
  }


def verify(embeddings1: np.ndarray, embeddings2: np.ndarray, issame: np.ndarray, *,
           num_folds: int = 10, val_far: float = 1e-3,
           tar_fars: tuple[float, ...] = _TAR_FARS) -> dict:
  """insightface's verification protocol on P pairs of embeddings.

  Args:
    embeddings1, embeddings2: (P, d) embeddings of the two sides of each pair
      (flip-fused or not; normalised in `pair_distances`).
    issame: (P,) bool, True for same-identity pairs.
    num_folds: contiguous folds (insightface: 10). Every fold must hold a
      same and a different pair (VAL and FAR are per-fold rates).
    val_far: the FAR target of VAL (insightface: 1e-3).
    tar_fars: the FARs at which TAR is read off the all-pairs ROC.

  Returns:
    A dict; scalars are Python floats:
      'accuracy', 'accuracy_std': mean and (population) std over the folds of
        the test-fold accuracy at the threshold best on the other folds;
      'threshold': the mean of those thresholds (squared L2 distance);
      'fold_accuracy', 'fold_threshold': (num_folds,) arrays of them;
      f'val_at_far_{k}', f'val_at_far_{k}_std', f'far_at_val_{k}': VAL mean,
        std and the FAR it came with, k = `far_key(val_far)` (e.g. '1e-3');
      'auc': area under the all-pairs ROC;
      'tar_at_far': {far_key(far): the best TPR with FPR ≤ far};
      'roc_fpr', 'roc_tpr', 'roc_thresholds': the all-pairs ROC of "same when
        distance ≤ t" at t = −inf and at every distinct distance, ascending.
  """
  dist = pair_distances(embeddings1, embeddings2)
  num_pairs = dist.shape[0]
  issame = _as_issame(issame, num_pairs)
  if not isinstance(num_folds, (int, np.integer)) or num_folds < 2:
    raise ValueError(f"num_folds must be an integer >= 2, got {num_folds!r}")
  if num_pairs < num_folds:
    raise ValueError(f"{num_pairs} pairs are fewer than num_folds={num_folds}")
  for far in (val_far, *tar_fars):
    if not 0 < far < 1:
      raise ValueError(f"a FAR target must be in (0, 1), got {far}")

  bounds = _fold_bounds(num_pairs, num_folds)
  folds = [slice(bounds[f], bounds[f + 1]) for f in range(num_folds)]
  for f, fold in enumerate(folds):
    n_same = int(issame[fold].sum())
    if n_same in (0, fold.stop - fold.start):
      kind = "same" if n_same == 0 else "different"
      raise ValueError(
          f"fold {f} (pairs {fold.start}..{fold.stop - 1}) has no {kind}-identity "
          f"pair; VAL and FAR need both in every fold (order pairs so each fold "
          f"mixes them, as LFW's 10 folds of 300 + 300 do)")

  acc_thresholds = np.arange(0.0, _MAX_DISTANCE, _ACCURACY_THRESHOLD_STEP)
  val_thresholds = np.arange(0.0, _MAX_DISTANCE, _VAL_THRESHOLD_STEP)
  # Counts per fold; a fold's training counts are the totals minus its own.
  acc_counts = [_accept_counts(dist[fold], issame[fold], acc_thresholds) for fold in folds]
  val_counts = [_accept_counts(dist[fold], issame[fold], val_thresholds) for fold in folds]
  acc_total = [sum(c[i] for c in acc_counts) for i in (0, 1)]
  val_total = [sum(c[i] for c in val_counts) for i in (0, 1)]
  n_pos = np.array([issame[fold].sum() for fold in folds])
  n_neg = np.array([fold.stop - fold.start for fold in folds]) - n_pos

  fold_accuracy = np.zeros(num_folds)
  fold_threshold = np.zeros(num_folds)
  fold_val = np.zeros(num_folds)
  fold_far = np.zeros(num_folds)
  for f, fold in enumerate(folds):
    train_tp = acc_total[0] - acc_counts[f][0]
    train_fp = acc_total[1] - acc_counts[f][1]
    train_correct = train_tp + (n_neg.sum() - n_neg[f]) - train_fp
    best = int(np.argmax(train_correct))  # the first of equals, as insightface
    fold_threshold[f] = acc_thresholds[best]
    tp, fp = acc_counts[f][0][best], acc_counts[f][1][best]
    fold_accuracy[f] = (tp + n_neg[f] - fp) / (fold.stop - fold.start)

    train_far = (val_total[1] - val_counts[f][1]) / (n_neg.sum() - n_neg[f])
    threshold = _val_threshold(train_far, val_thresholds, val_far)
    tp, fp = _accept_counts(dist[fold], issame[fold], np.array([threshold]))
    fold_val[f] = tp[0] / n_pos[f]
    fold_far[f] = fp[0] / n_neg[f]

  roc = _roc_curve(dist, issame)
  k = far_key(val_far)
  return {
      "accuracy": float(fold_accuracy.mean()),
      "accuracy_std": float(fold_accuracy.std()),
      "threshold": float(fold_threshold.mean()),
      "fold_accuracy": fold_accuracy,
      "fold_threshold": fold_threshold,
      f"val_at_far_{k}": float(fold_val.mean()),
      f"val_at_far_{k}_std": float(fold_val.std()),
      f"far_at_val_{k}": float(fold_far.mean()),
      "auc": float(np.trapezoid(roc["tpr"], roc["fpr"])),
      "tar_at_far": {far_key(far): float(roc["tpr"][roc["fpr"] <= far].max())
                     for far in tar_fars},
      "roc_fpr": roc["fpr"],
      "roc_tpr": roc["tpr"],
      "roc_thresholds": roc["thresholds"],
  }


def identification_rank1(gallery_emb: np.ndarray, gallery_labels: np.ndarray,
                         probe_emb: np.ndarray, probe_labels: np.ndarray) -> float:
  """Fraction of probes whose most cosine-similar gallery item has their label.

  Args:
    gallery_emb: (G, d); gallery_labels: (G,) identities (any integers).
    probe_emb: (Q, d); probe_labels: (Q,).

  Returns:
    Rank-1 identification rate in [0, 1]; ties go to the first gallery item.
  """
  gallery = unit_rows(gallery_emb, "gallery_emb")
  probe = unit_rows(probe_emb, "probe_emb")
  if gallery.shape[1] != probe.shape[1]:
    raise ValueError(f"gallery_emb has dimension {gallery.shape[1]} but probe_emb "
                     f"has {probe.shape[1]}")
  gallery_labels, probe_labels = np.asarray(gallery_labels), np.asarray(probe_labels)
  for labels, emb, name in ((gallery_labels, gallery, "gallery"), (probe_labels, probe, "probe")):
    if labels.shape != emb.shape[:1]:
      raise ValueError(f"{name}_labels must have shape ({emb.shape[0]},) to match "
                       f"{name}_emb, got {labels.shape}")
  rows = max(1, _SIMILARITY_CHUNK_ELEMENTS // gallery.shape[0])
  nearest = np.concatenate([np.argmax(probe[i:i + rows] @ gallery.T, axis=1)
                            for i in range(0, probe.shape[0], rows)])
  return float(np.mean(gallery_labels[nearest] == probe_labels))


def model_outputs(embed_fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray, *,
                  batch_size: int, flip: bool = False) -> np.ndarray:
  """The raw outputs of `embed_fn` on uint8 images, in batches of one fixed shape.

  Args:
    embed_fn: uint8 (B, H, W, C) -> (B, d), e.g. a jitted model apply that
      normalises the images itself. Always called with B = `batch_size` (the
      last batch is padded with black images, whose outputs are dropped), so
      a jitted function compiles once.
    images: (N, H, W, C) uint8.
    batch_size: images per call.
    flip: also embed each image's horizontal mirror.

  Returns:
    (N, d) as `embed_fn` gives them (not normalised), or with `flip` (N, 2, d):
    row i holds image i's output, then its mirror's.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[0] == 0:
    raise ValueError(f"images must be a non-empty (N, H, W, C) array, got shape {images.shape}")
  if images.dtype != np.uint8:
    raise ValueError(f"images must be uint8, got dtype {images.dtype}")
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  views = [lambda batch: batch]
  if flip:
    views.append(lambda batch: np.ascontiguousarray(batch[:, :, ::-1]))
  outputs = [[] for _ in views]
  for start in range(0, images.shape[0], batch_size):
    batch = images[start:start + batch_size]
    count = batch.shape[0]
    if count < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - count,) + batch.shape[1:],
                                              np.uint8)])
    for out, view in zip(outputs, views):
      emb = np.asarray(embed_fn(view(batch)))
      if emb.ndim != 2 or emb.shape[0] != batch_size:
        raise ValueError(f"embed_fn must map ({batch_size}, H, W, C) images to "
                         f"({batch_size}, d) embeddings, got shape {emb.shape}")
      out.append(emb[:count])
  if flip:
    return np.stack([np.concatenate(outputs[0]), np.concatenate(outputs[1])], axis=1)
  return np.concatenate(outputs[0])


def embed_images(embed_fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray, *,
                 batch_size: int, flip: bool) -> np.ndarray:
  """Embeddings of uint8 images as unit rows, in batches of one fixed shape (`model_outputs`).

  Args:
    embed_fn, images, batch_size: as for `model_outputs`.
    flip: also embed each horizontal flip and fuse the two (`fuse_flip`), as
      insightface evaluates faces; False for data whose mirror image is another
      identity (a mirrored character is another character).

  Returns:
    (N, d) float64 unit rows.
  """
  outputs = model_outputs(embed_fn, images, batch_size=batch_size, flip=flip)
  if flip:
    return fuse_flip(outputs[:, 0], outputs[:, 1])
  return unit_rows(outputs, "embeddings")


# The scalars of `verify` that a run records for each verification set.
_SUMMARY = ("accuracy", "accuracy_std", "threshold", "auc")


def verification_summary(verified: dict) -> dict[str, float]:
  """The scalars of a `verify` result, flattened: accuracy, accuracy_std, threshold, auc,
  VAL@FAR and its FAR, and tar_at_far_<far> for each FAR."""
  summary = {key: verified[key] for key in _SUMMARY}
  summary.update({key: value for key, value in verified.items()
                  if key.startswith(("val_at_far", "far_at_val"))})
  summary.update({f"tar_at_far_{far}": tar for far, tar in verified["tar_at_far"].items()})
  return summary


def _cell(value: float | None, scale: float = 100.0, digits: int = 2) -> str:
  return "–" if value is None else f"{scale * value:.{digits}f}"


def format_table(results: dict[str, dict[str, float]],
                 baseline: dict[str, dict[str, float]] | None = None) -> str:
  """The verification table researchers compare with papers: a row per set.

  `results`: {set: `verification_summary`}; `baseline`: {set: the raw pixels' scores},
  shown in a column of its own. A set at 50 % ± 0 whose AUC says the model
  has learnt something gets a note on why (insightface's threshold grid).
  """
  val, tar = f"val_at_far_{far_key(1e-3)}", f"tar_at_far_{far_key(1e-4)}"
  header = f"  {'set':<14} {'accuracy (%)':>16} {'AUC':>7} {'VAL@FAR=1e-3':>13} {'TAR@FAR=1e-4':>13}"
  if baseline:
    header += f" {'raw pixels (%)':>15}"
  lines = [header]
  notes = []
  for name, r in results.items():
    line = (f"  {name:<14} {_cell(r['accuracy']):>7} ± {_cell(r['accuracy_std']):<6} "
            f"{_cell(r['auc'], 1, 4):>7} {_cell(r.get(val)):>13} {_cell(r.get(tar)):>13}")
    if baseline:
      line += f" {_cell(baseline[name]['accuracy'] if name in baseline else None):>15}"
    lines.append(line)
    if r["accuracy"] == 0.5 and r["accuracy_std"] == 0.0 and r["auc"] > 0.6:
      notes.append(
          f"  note: {name} is at 50 % ± 0 but its AUC is {r['auc']:.3f}: every pair's distance is "
          f"below {_ACCURACY_THRESHOLD_STEP}, the first threshold of insightface's grid, so "
          "every pair is called 'same' (embeddings still close together early in training); "
          "AUC, which needs no threshold, shows what the model has learnt")
  return "\n".join(lines + notes)

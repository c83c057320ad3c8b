"""θ distributions and the ArcFace paper's angle statistics (its Table 5).

Pure NumPy float64 functions of embeddings x (N, d), class centres W (C, d)
and integer labels. Angles are radians in and out, except in names ending in
`_deg`. Every vector is L2-normalised first, so only directions matter.

The "embedding centre" of a class is the normalised mean of its normalised
embeddings: the mean direction of the class, which unnormalised features
(plain softmax) cannot pull toward their longest members.

Sub-center ArcFace keeps K sub-centres per class, W (C, K, d). The angle of an
embedding to a class is then the smallest to any of its sub-centres (the loss's
own: the cosine to a class is the max over its K), which `target_angles` and
`nearest_nontarget_angles` compute from (C, K, d) centres. "The" class centre, the
W_j of W-EC and W-Inter, is the class's dominant sub-centre
(`dominant_subcentres`): the one closest to the most of its embeddings, as the
paper's second stage (insightface's drop.py) picks it.
"""

import numpy as np

from arcjax.verification import unit_rows

# Rows of an (rows, C) cosine matrix computed at once: bounds the float64
# scratch of nearest-angle searches to 128 MiB for any number of classes.
_CHUNK_ELEMENTS = 1 << 24
# float32 arccos returns up to float32(π) > π; such angles are still in range.
_ANGLE_TOLERANCE = 1e-6


def _labels_for(labels, num_rows: int, name: str,
                num_classes: int | None = None) -> np.ndarray:
  """(N,) int64 labels matching `num_rows` (and in [0, num_classes) if given)."""
  labels = np.asarray(labels)
  if labels.shape != (num_rows,):
    raise ValueError(f"{name} must have shape ({num_rows},) to match the embeddings, "
                     f"got {labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{name} must be integers, got dtype {labels.dtype}")
  if num_classes is not None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
      i = int(bad[0])
      raise ValueError(f"{name}[{i}] = {int(labels[i])} is outside [0, {num_classes}) "
                       f"({bad.size} labels out of range)")
  return labels.astype(np.int64)


def _same_dim(x: np.ndarray, w: np.ndarray) -> None:
  if x.shape[1] != w.shape[1]:
    raise ValueError(f"embeddings have dimension {x.shape[1]} but centres have "
                     f"{w.shape[1]}")


def _angle(cos: np.ndarray) -> np.ndarray:
  """arccos, with cosines that rounding pushed past ±1 clipped back."""
  return np.arccos(np.clip(cos, -1.0, 1.0))


def _class_centres(x_unit: np.ndarray,
                   labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Embedding centres of the classes present.

  Returns:
    classes: (K,) the distinct labels, ascending; centres: (K, d) unit rows,
    centres[k] the normalised mean of the unit embeddings labelled classes[k];
    index: (N,) the row of `centres` of each embedding's class.
    A class whose embeddings cancel out (zero mean) is a ValueError.
  """
  classes, inverse = np.unique(labels, return_inverse=True)
  sums = np.zeros((len(classes), x_unit.shape[1]))
  np.add.at(sums, inverse, x_unit)
  norms = np.linalg.norm(sums, axis=1, keepdims=True)
  zero = np.flatnonzero(norms[:, 0] < 1e-12)
  if zero.size:
    raise ValueError(f"class {int(classes[zero[0]])}'s embeddings sum to zero: its "
                     f"centre has no direction")
  return classes, sums / norms, inverse


def _nearest_other_cos(a: np.ndarray, b: np.ndarray, exclude: np.ndarray,
                       per_class: int = 1) -> np.ndarray:
  """(N,) max over classes k ≠ exclude[i] of a[i]·b[k], for unit rows a (N, d) and b
  (M·per_class, d) holding `per_class` rows a class, class-major (M ≥ 2): a class's cosine is
  the max over its rows."""
  rows = max(1, _CHUNK_ELEMENTS // b.shape[0])
  out = np.empty(a.shape[0])
  for start in range(0, a.shape[0], rows):
    cos = (a[start:start + rows] @ b.T).reshape(-1, b.shape[0] // per_class, per_class).max(2)
    cos[np.arange(cos.shape[0]), exclude[start:start + rows]] = -np.inf
    out[start:start + rows] = cos.max(axis=1)
  return out


def _unit_centres(centres: np.ndarray) -> tuple[np.ndarray, int]:
  """(C·K, d) unit rows of centres (C, d) (K = 1) or sub-centres (C, K, d), and K."""
  centres = np.asarray(centres)
  per_class = centres.shape[1] if centres.ndim == 3 else 1
  flat = centres.reshape(-1, centres.shape[-1]) if centres.ndim == 3 else centres
  return unit_rows(flat, "centres"), per_class


def dominant_subcentres(embeddings: np.ndarray, labels: np.ndarray,
                        subcentres: np.ndarray) -> np.ndarray:
  """(C, d) each class's dominant sub-centre: the one closest to the most of its embeddings.

  Sub-center ArcFace's "class centre" (Deng et al. 2020; insightface's
  subcenter_arcface/drop.py counts, over the training set, which sub-centre each
  image of a class is closest to). Ties go to the lower index; a class without
  embeddings here keeps its longest sub-centre (the one its gradient lengthened
  most: a centre's normalised-softmax gradient is orthogonal to it).

  Args:
    embeddings: (N, d); labels: (N,) int in [0, C); subcentres: (C, K, d).

  Returns:
    (C, d) float64, the chosen sub-centres as given (not normalised).
  """
  subcentres = np.asarray(subcentres, np.float64)
  if subcentres.ndim != 3:
    raise ValueError(f"subcentres must be (C, K, d), got shape {subcentres.shape}")
  num_classes, k, dim = subcentres.shape
  x = unit_rows(embeddings, "embeddings")
  _same_dim(x, subcentres[0])
  labels = _labels_for(labels, x.shape[0], "labels", num_classes)
  w = unit_rows(subcentres.reshape(-1, dim), "subcentres").reshape(num_classes, k, dim)
  closest = np.argmax(np.einsum("nd,nkd->nk", x, w[labels]), axis=1)
  counts = np.zeros((num_classes, k), np.int64)
  np.add.at(counts, (labels, closest), 1)
  longest = np.argmax(np.linalg.norm(subcentres, axis=2), axis=1)
  chosen = np.where(counts.sum(axis=1) > 0, np.argmax(counts, axis=1), longest)
  return subcentres[np.arange(num_classes), chosen]


def target_angles(embeddings: np.ndarray, centres: np.ndarray,
                  labels: np.ndarray) -> np.ndarray:
  """θ_y: the angle between each embedding and its class's centre W_y (with sub-centres, the
  closest of its class's).

  Args:
    embeddings: (N, d); centres: (C, d) or sub-centres (C, K, d); labels: (N,) int in [0, C).

  Returns:
    (N,) float64 radians in [0, π].
  """
  x = unit_rows(embeddings, "embeddings")
  w, per_class = _unit_centres(centres)
  _same_dim(x, w)
  labels = _labels_for(labels, x.shape[0], "labels", w.shape[0] // per_class)
  w = w.reshape(-1, per_class, w.shape[1])
  return _angle(np.einsum("nd,nkd->nk", x, w[labels]).max(axis=1))


def nearest_nontarget_angles(embeddings: np.ndarray, centres: np.ndarray,
                             labels: np.ndarray) -> np.ndarray:
  """min over j ≠ y of the angle between each embedding and centre W_j (with sub-centres, the
  closest sub-centre of any other class).

  Args:
    embeddings: (N, d); centres: (C, d) or sub-centres (C, K, d), C ≥ 2; labels: (N,) int
      in [0, C).

  Returns:
    (N,) float64 radians in [0, π].
  """
  x = unit_rows(embeddings, "embeddings")
  w, per_class = _unit_centres(centres)
  _same_dim(x, w)
  num_classes = w.shape[0] // per_class
  if num_classes < 2:
    raise ValueError(f"a non-target centre needs at least 2 centres, got {num_classes}")
  labels = _labels_for(labels, x.shape[0], "labels", num_classes)
  return _angle(_nearest_other_cos(x, w, labels, per_class))


def w_ec(embeddings: np.ndarray, labels: np.ndarray, centres: np.ndarray) -> float:
  """W-EC: mean over classes j present in `labels` of angle(W_j, centre_j).

  centre_j is class j's embedding centre (module docstring). Classes without
  samples have no centre and are left out of the mean.

  Args:
    embeddings: (N, d); labels: (N,) int in [0, C); centres: (C, d).

  Returns:
    Radians.
  """
  x = unit_rows(embeddings, "embeddings")
  w = unit_rows(centres, "centres")
  _same_dim(x, w)
  labels = _labels_for(labels, x.shape[0], "labels", w.shape[0])
  classes, class_centres, _ = _class_centres(x, labels)
  return float(np.mean(_angle(np.sum(w[classes] * class_centres, axis=1))))


def w_inter(centres: np.ndarray) -> float:
  """W-Inter: mean over j of min over k ≠ j of angle(W_j, W_k).

  Args:
    centres: (C, d), C ≥ 2.

  Returns:
    Radians.
  """
  w = unit_rows(centres, "centres")
  if w.shape[0] < 2:
    raise ValueError(f"W-Inter needs at least 2 centres, got {w.shape[0]}")
  return float(np.mean(_angle(_nearest_other_cos(w, w, np.arange(w.shape[0])))))


def intra(embeddings: np.ndarray, labels: np.ndarray) -> float:
  """Intra: mean over embeddings of the angle to their class's embedding centre.

  Intra1 on the training set, Intra2 on an evaluation set. A class with one
  sample contributes an angle of 0.

  Args:
    embeddings: (N, d); labels: (N,) int identities (any values).

  Returns:
    Radians.
  """
  x = unit_rows(embeddings, "embeddings")
  labels = _labels_for(labels, x.shape[0], "labels")
  _, class_centres, index = _class_centres(x, labels)
  return float(np.mean(_angle(np.sum(x * class_centres[index], axis=1))))


def inter(embeddings: np.ndarray, labels: np.ndarray) -> float:
  """Inter: mean over classes of the min angle between their embedding centres.

  Inter1 on the training set, Inter2 on an evaluation set.

  Args:
    embeddings: (N, d); labels: (N,) int identities (any values), ≥ 2 distinct.

  Returns:
    Radians.
  """
  x = unit_rows(embeddings, "embeddings")
  labels = _labels_for(labels, x.shape[0], "labels")
  classes, class_centres, _ = _class_centres(x, labels)
  if len(classes) < 2:
    raise ValueError(f"Inter needs at least 2 classes, labels hold {len(classes)}")
  nearest = _nearest_other_cos(class_centres, class_centres, np.arange(len(classes)))
  return float(np.mean(_angle(nearest)))


def class_mean_angles(embeddings: np.ndarray, labels: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Each embedding's angle to its class's embedding centre and to the nearest other class's.

  What trained centres W give for θ_y and the nearest non-target angle, with the
  classes' own mean directions in their place: it needs no classifier, so it
  applies to identities never trained on and to models imported without centres.

  Args:
    embeddings: (N, d); labels: (N,) int identities (any values), ≥ 2 distinct.

  Returns:
    (theta_own, theta_nearest_other): (N,) float64 radians each.
  """
  x = unit_rows(embeddings, "embeddings")
  labels = _labels_for(labels, x.shape[0], "labels")
  classes, class_centres, index = _class_centres(x, labels)
  if len(classes) < 2:
    raise ValueError(f"another class's centre needs at least 2 classes, labels hold {len(classes)}")
  return (_angle(np.sum(x * class_centres[index], axis=1)),
          _angle(_nearest_other_cos(x, class_centres, index)))


def embedding_statistics(embeddings: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """The statistics of Table 5 that need no trained centres, in degrees: Intra and Inter
  against the class means of `embeddings` (N, d) with identities `labels` (N,), ≥ 2 of them.

  Returns {'intra_deg', 'inter_deg'}: Intra1/Inter1 on training images, Intra2/Inter2 on
  unseen identities; W-EC and W-Inter need trained centres (`angle_statistics`).
  """
  return {"intra_deg": float(np.degrees(intra(embeddings, labels))),
          "inter_deg": float(np.degrees(inter(embeddings, labels)))}


def angle_statistics(train_emb: np.ndarray, train_labels: np.ndarray,
                     centres: np.ndarray, eval_emb: np.ndarray | None = None,
                     eval_labels: np.ndarray | None = None) -> dict[str, float | None]:
  """The paper's Table 5 statistics, in degrees.

  Args:
    train_emb: (N, d) embeddings of training images; train_labels: (N,) int
      in [0, C), at least 2 classes.
    centres: (C, d) the classifier's centres W; or sub-centres (C, K, d), each class
      then represented by its dominant sub-centre among `train_emb`
      (`dominant_subcentres`).
    eval_emb, eval_labels: (M, d) and (M,) an evaluation set (any identity
      values, at least 2); both or neither.

  Returns:
    {'w_ec_deg', 'w_inter_deg', 'intra1_deg', 'inter1_deg', 'intra2_deg',
    'inter2_deg'}: Python floats; the last two are None without an
    evaluation set.
  """
  if (eval_emb is None) != (eval_labels is None):
    raise ValueError("eval_emb and eval_labels must be given together")
  if np.shape(centres)[0] == 0:
    raise ValueError("W-EC and W-Inter need trained class centres and there are none (a model "
                     "imported without centres): embedding_statistics gives Intra and Inter")
  has_eval = eval_emb is not None
  if np.ndim(centres) == 3:
    centres = dominant_subcentres(train_emb, train_labels, centres)
  return {
      "w_ec_deg": float(np.degrees(w_ec(train_emb, train_labels, centres))),
      "w_inter_deg": float(np.degrees(w_inter(centres))),
      "intra1_deg": float(np.degrees(intra(train_emb, train_labels))),
      "inter1_deg": float(np.degrees(inter(train_emb, train_labels))),
      "intra2_deg": float(np.degrees(intra(eval_emb, eval_labels))) if has_eval else None,
      "inter2_deg": float(np.degrees(inter(eval_emb, eval_labels))) if has_eval else None,
  }


def theta_histogram(theta: np.ndarray, *, bins: int = 90) -> tuple[np.ndarray, np.ndarray]:
  """Histogram of angles over [0°, 180°] in equal bins.

  Args:
    theta: (N,) radians in [0, π] (up to 1e-6 rad of rounding, as float32
      arccos gives, which is clipped into range).
    bins: number of bins (90: 2° each).

  Returns:
    counts: (bins,) int64, the last bin closed on the right (θ = π counts);
    edges_deg: (bins + 1,) float64 degrees, 0 … 180.
  """
  theta = np.asarray(theta)
  if theta.ndim != 1:
    raise ValueError(f"theta must be a (N,) array of radians, got shape {theta.shape}")
  if not isinstance(bins, (int, np.integer)) or bins < 1:
    raise ValueError(f"bins must be a positive integer, got {bins!r}")
  theta = theta.astype(np.float64)
  bad = np.flatnonzero(~np.isfinite(theta) | (theta < -_ANGLE_TOLERANCE)
                       | (theta > np.pi + _ANGLE_TOLERANCE))
  if bad.size:
    i = int(bad[0])
    raise ValueError(f"theta[{i}] = {theta[i]} is not an angle in [0, pi] radians "
                     f"({bad.size} such values)")
  edges_deg = np.linspace(0.0, 180.0, bins + 1)
  counts, _ = np.histogram(np.degrees(np.clip(theta, 0.0, np.pi)), bins=edges_deg)
  return counts.astype(np.int64), edges_deg

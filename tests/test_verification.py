"""Tests of arcjax.verification: hand-worked cases, an insightface-style loop, scikit-learn."""

import numpy as np
import pytest
import scipy.interpolate
import sklearn.metrics
import sklearn.model_selection

from arcjax import verification


def _pairs_at_distances(dist):
  """(P, 2) unit-vector pairs whose squared L2 distance is `dist` (in [0, 4])."""
  theta = np.arccos(1.0 - np.asarray(dist, np.float64) / 2.0)
  e1 = np.tile([1.0, 0.0], (len(theta), 1))
  e2 = np.stack([np.cos(theta), np.sin(theta)], axis=1)
  return e1, e2


def _random_pairs(rng, num_pairs, dim=16, noise=1.0):
  """Random embeddings where same pairs are noisy copies and issame is random."""
  issame = rng.random(num_pairs) < 0.5
  e1 = rng.normal(size=(num_pairs, dim))
  e2 = np.where(issame[:, None], e1 + noise * rng.normal(size=(num_pairs, dim)),
                rng.normal(size=(num_pairs, dim)))
  return e1, e2, issame


# --- an insightface-style reference: loops over thresholds and sklearn's KFold ---

def _ref_accuracy(threshold, dist, issame):
  predict = dist < threshold
  tp = np.sum(predict & issame)
  tn = np.sum(~predict & ~issame)
  return (tp + tn) / dist.size


def _ref_val_far(threshold, dist, issame):
  predict = dist < threshold
  return (np.sum(predict & issame) / np.sum(issame),
          np.sum(predict & ~issame) / np.sum(~issame))


def _ref_val_threshold(far_train, thresholds, far_target):
  """Largest threshold with FAR ≤ target, interpolated toward the next one (scipy)."""
  lo = max(i for i in range(len(thresholds)) if far_train[i] <= far_target)
  if lo == len(thresholds) - 1:
    return thresholds[lo]
  f = scipy.interpolate.interp1d(far_train[lo:lo + 2], thresholds[lo:lo + 2], kind="slinear")
  return float(f(far_target))


def _reference_verify(e1, e2, issame, num_folds=10, far_target=1e-3):
  e1 = e1 / np.linalg.norm(e1, axis=1, keepdims=True)
  e2 = e2 / np.linalg.norm(e2, axis=1, keepdims=True)
  dist = np.sum(np.square(e1 - e2), axis=1)
  thresholds = np.arange(0, 4, 0.01)
  val_thresholds = np.arange(0, 4, 0.001)
  acc, best_t, val, far = [], [], [], []
  kfold = sklearn.model_selection.KFold(n_splits=num_folds, shuffle=False)
  for train, test in kfold.split(np.arange(len(dist))):
    acc_train = [_ref_accuracy(t, dist[train], issame[train]) for t in thresholds]
    t = thresholds[int(np.argmax(acc_train))]
    best_t.append(t)
    acc.append(_ref_accuracy(t, dist[test], issame[test]))
    far_train = np.array([_ref_val_far(t, dist[train], issame[train])[1]
                          for t in val_thresholds])
    t = _ref_val_threshold(far_train, val_thresholds, far_target)
    v, f = _ref_val_far(t, dist[test], issame[test])
    val.append(v)
    far.append(f)
  return np.array(acc), np.array(best_t), np.array(val), np.array(far)


# --- flip fusion, distances ---

def test_fuse_flip_matches_numpy():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(2, 7, 5))
  expected = (a + b) / np.linalg.norm(a + b, axis=1, keepdims=True)
  np.testing.assert_allclose(verification.fuse_flip(a, b), expected, rtol=1e-12)
  np.testing.assert_allclose(verification.fuse_flip(a.astype(np.float32), b.astype(np.float32)),
                             expected, rtol=1e-6)


def test_pair_distances_are_squared_l2_of_normalised_embeddings():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(2, 9, 4))
  an = a / np.linalg.norm(a, axis=1, keepdims=True)
  bn = b / np.linalg.norm(b, axis=1, keepdims=True)
  expected = 2.0 - 2.0 * np.sum(an * bn, axis=1)
  np.testing.assert_allclose(verification.pair_distances(3.0 * a, b), expected, atol=1e-12)
  e1, e2 = _pairs_at_distances([0.0, 1.0, 2.0, 4.0])
  np.testing.assert_allclose(verification.pair_distances(e1, e2), [0.0, 1.0, 2.0, 4.0], atol=1e-12)


# --- the 10-fold protocol ---

def test_separable_distances_give_accuracy_one_and_a_threshold_in_the_gap():
  rng = np.random.default_rng(2)
  issame = np.tile([True, False], 300)
  dist = np.where(issame, rng.uniform(0.2, 0.8, 600), rng.uniform(1.5, 3.0, 600))
  out = verification.verify(*_pairs_at_distances(dist), issame)
  assert out["accuracy"] == 1.0 and out["accuracy_std"] == 0.0
  # The first grid threshold above every training positive wins (argmax takes the first).
  assert np.all(out["fold_threshold"] > dist[issame].max() - 0.01)
  assert np.all(out["fold_threshold"] <= dist[issame].max() + 0.01)
  assert out["fold_accuracy"].shape == (10,)
  assert out["threshold"] == pytest.approx(out["fold_threshold"].mean())
  # The VAL threshold sits just below the training folds' nearest different
  # pair, far above every same pair.
  assert out["val_at_far_1e-3"] == 1.0 and out["val_at_far_1e-3_std"] == 0.0
  assert out["auc"] == 1.0
  assert out["tar_at_far"] == {"1e-4": 1.0, "1e-3": 1.0, "1e-2": 1.0, "1e-1": 1.0}


def test_two_folds_worked_by_hand():
  # Fold 0 = pairs 0, 1; fold 1 = pairs 2, 3 (same, different in each).
  dist = [0.5, 1.5, 1.0, 0.3]
  issame = [True, False, True, False]
  out = verification.verify(*_pairs_at_distances(dist), issame, num_folds=2)
  # Fold 0 trains on pairs 2, 3 (same at 1.0, different at 0.3): no threshold
  # gets both right; t = 0 (first of the 0.5 ties) is tested on fold 0:
  # everything "different", so pair 0 is wrong and pair 1 right -> 0.5.
  # Fold 1 trains on pairs 0, 1: best t = 0.51 (first grid value > 0.5); on
  # fold 1, pair 2 (1.0) is called different and pair 3 (0.3) same -> 0.
  np.testing.assert_allclose(out["fold_threshold"], [0.0, 0.51])
  np.testing.assert_allclose(out["fold_accuracy"], [0.5, 0.0])
  assert out["accuracy"] == pytest.approx(0.25)
  assert out["accuracy_std"] == pytest.approx(0.25)
  assert out["threshold"] == pytest.approx(0.255)


def test_val_threshold_is_interpolated_on_the_training_fold():
  # Both folds alike: same pairs at 1.9, 2.0003, 2.0007; different ones at
  # 1.0005, 2.0005, 3.0005, 3.5005. The training FAR is 0.25 up to the grid
  # threshold 2.000 and 0.5 from 2.001; the target 0.375 lies half-way, so the
  # threshold is 2.0005: two of three same pairs accepted, one different one.
  # Without interpolation (t = 2.000) VAL would be 1/3.
  fold_dist = [1.9, 2.0003, 2.0007, 1.0005, 2.0005, 3.0005, 3.5005]
  fold_same = [True, True, True, False, False, False, False]
  out = verification.verify(*_pairs_at_distances(fold_dist * 2), fold_same * 2,
                            num_folds=2, val_far=0.375)
  assert out["val_at_far_3.75e-1"] == pytest.approx(2 / 3)
  assert out["val_at_far_3.75e-1_std"] == 0.0
  assert out["far_at_val_3.75e-1"] == pytest.approx(0.25)


def test_folds_are_contiguous_blocks():
  # 10 folds of 2 pairs; fold 3 alone is inverted (same pairs far apart), so
  # with contiguous folds it alone scores 0; shuffled folds would spread errors.
  dist = np.tile([0.2, 3.0], 10)
  issame = np.tile([True, False], 10)
  issame[6:8] = [False, True]
  out = verification.verify(*_pairs_at_distances(dist), issame)
  np.testing.assert_array_equal(out["fold_accuracy"], [1, 1, 1, 0, 1, 1, 1, 1, 1, 1])


@pytest.mark.parametrize("num_pairs,num_folds", [(600, 10), (233, 10), (101, 4)])
def test_matches_an_insightface_style_reference(num_pairs, num_folds):
  rng = np.random.default_rng(num_pairs)
  e1, e2, issame = _random_pairs(rng, num_pairs)
  acc, thresholds, val, far = _reference_verify(e1, e2, issame, num_folds)
  out = verification.verify(e1, e2, issame, num_folds=num_folds)
  np.testing.assert_allclose(out["fold_accuracy"], acc, rtol=0, atol=1e-12)
  np.testing.assert_allclose(out["fold_threshold"], thresholds, rtol=0, atol=1e-12)
  assert out["accuracy"] == pytest.approx(acc.mean(), abs=1e-12)
  assert out["accuracy_std"] == pytest.approx(acc.std(), abs=1e-12)
  assert 0.6 < out["accuracy"] < 0.99  # a non-trivial case
  assert out["val_at_far_1e-3"] == pytest.approx(val.mean(), abs=1e-12)
  assert out["val_at_far_1e-3_std"] == pytest.approx(val.std(), abs=1e-12)
  assert out["far_at_val_1e-3"] == pytest.approx(far.mean(), abs=1e-12)


def test_roc_auc_and_tar_match_sklearn_with_ties():
  rng = np.random.default_rng(3)
  num_pairs = 20000
  issame = rng.random(num_pairs) < 0.5
  # Quantised angles make many exactly tied distances, of both kinds.
  theta = np.round(np.clip(np.where(issame, rng.normal(1.0, 0.3, num_pairs),
                                    rng.normal(1.5, 0.3, num_pairs)), 0, np.pi), 3)
  e1 = np.tile([1.0, 0.0], (num_pairs, 1))
  e2 = np.stack([np.cos(theta), np.sin(theta)], axis=1)
  dist = verification.pair_distances(e1, e2)
  assert len(np.unique(dist)) < num_pairs // 5
  out = verification.verify(e1, e2, issame)
  fpr, tpr, thr = sklearn.metrics.roc_curve(issame, -dist, drop_intermediate=False)
  np.testing.assert_allclose(out["roc_fpr"], fpr, atol=1e-15)
  np.testing.assert_allclose(out["roc_tpr"], tpr, atol=1e-15)
  np.testing.assert_allclose(out["roc_thresholds"][1:], -thr[1:], atol=0)
  assert out["auc"] == pytest.approx(sklearn.metrics.roc_auc_score(issame, -dist), abs=1e-12)
  for far in (1e-4, 1e-3, 1e-2, 1e-1):
    assert out["tar_at_far"][verification.far_key(far)] == tpr[fpr <= far].max()
  assert 0 < out["tar_at_far"]["1e-4"] < out["tar_at_far"]["1e-1"] < 1


def test_tar_at_far_allows_fpr_equal_to_the_target():
  # 10 different pairs, so FPR = 0.1 is reached exactly by accepting the one
  # at 0.6: TAR@FAR=0.1 accepts the same pairs at 0.2, 0.7, 1.2 -> 3/4.
  dist = [0.2, 0.6, 1.5, 1.6, 1.7, 0.7, 1.8, 1.2, 1.9, 2.0, 2.1, 2.2, 2.3, 3.0]
  issame = [True, False, False, False, False, True, False,
            True, False, False, False, False, False, True]
  out = verification.verify(*_pairs_at_distances(dist), issame, num_folds=2,
                            tar_fars=(0.1, 0.05))
  assert out["tar_at_far"] == {"1e-1": 0.75, "5e-2": 0.25}


def test_far_key_spelling():
  assert [verification.far_key(f) for f in (1e-4, 1e-3, 0.1, 2.5e-3)] == ["1e-4", "1e-3", "1e-1", "2.5e-3"]


# --- errors ---

def test_verify_errors_name_the_problem():
  e1, e2 = _pairs_at_distances(np.tile([0.5, 2.0], 10))
  issame = np.tile([True, False], 10)
  with pytest.raises(ValueError, match="19 entries but there are 20 pairs"):
    verification.verify(e1, e2, issame[:-1])
  with pytest.raises(ValueError, match="same shape"):
    verification.verify(e1, e2[:-1], issame)
  with pytest.raises(ValueError, match="8 pairs are fewer than num_folds=10"):
    verification.verify(e1[:8], e2[:8], issame[:8])
  with pytest.raises(ValueError, match="num_folds must be an integer >= 2"):
    verification.verify(e1, e2, issame, num_folds=1)
  with pytest.raises(ValueError, match="fold 0 .pairs 0..1. has no same-identity pair"):
    verification.verify(e1, e2, np.r_[False, False, issame[2:]])
  with pytest.raises(ValueError, match="fold 9 .pairs 18..19. has no different-identity"):
    verification.verify(e1, e2, np.r_[issame[:18], True, True])
  with pytest.raises(ValueError, match="has no same-identity"):
    verification.verify(e1, e2, np.zeros(20, bool))
  bad = e2.copy()
  bad[5, 1] = np.nan
  with pytest.raises(ValueError, match="embeddings2 has non-finite values in row 5"):
    verification.verify(e1, bad, issame)
  bad[5] = 0.0
  with pytest.raises(ValueError, match="embeddings2 row 5 has zero norm"):
    verification.verify(e1, bad, issame)
  with pytest.raises(ValueError, match="issame must be bool"):
    verification.verify(e1, e2, np.full(20, 2))
  with pytest.raises(ValueError, match="FAR target must be in"):
    verification.verify(e1, e2, issame, val_far=0.0)


def test_fuse_flip_errors():
  with pytest.raises(ValueError, match="same shape"):
    verification.fuse_flip(np.ones((3, 4)), np.ones((3, 5)))
  with pytest.raises(ValueError, match="emb_flipped has non-finite values in row 2"):
    verification.fuse_flip(np.ones((3, 4)), np.array([[1.0] * 4] * 2 + [[np.inf] * 4]))
  with pytest.raises(ValueError, match="zero norm"):
    verification.fuse_flip(np.ones((1, 2)), -np.ones((1, 2)))


# --- identification ---

def test_identification_rank1_by_hand():
  gallery = np.eye(3) * [1.0, 5.0, 0.2]  # scale must not matter
  gallery_labels = np.array([10, 20, 30])
  probe = np.array([[0.9, 0.1, 0.0], [0.1, 0.2, 0.9], [0.0, 1.0, 0.9], [2.0, 0.0, 0.1]])
  probe_labels = np.array([10, 30, 30, 20])
  # nearest: 10 (right), 30 (right), 20 (wrong: cos to axis 1 is larger), 10 (wrong)
  assert verification.identification_rank1(gallery, gallery_labels, probe, probe_labels) == 0.5


def test_identification_rank1_matches_a_loop(monkeypatch):
  # Chunks of 3 probes against the 50-item gallery exercise the chunked path.
  monkeypatch.setattr(verification, "_SIMILARITY_CHUNK_ELEMENTS", 150)
  rng = np.random.default_rng(4)
  gallery, probe = rng.normal(size=(50, 8)), rng.normal(size=(40, 8))
  gallery_labels, probe_labels = rng.integers(0, 5, 50), rng.integers(0, 5, 40)
  hits = 0
  for x, y in zip(probe, probe_labels):
    cos = [x @ g / np.linalg.norm(x) / np.linalg.norm(g) for g in gallery]
    hits += gallery_labels[int(np.argmax(cos))] == y
  assert verification.identification_rank1(gallery, gallery_labels, probe, probe_labels) == hits / 40


def test_identification_errors():
  with pytest.raises(ValueError, match="gallery_labels must have shape .3,."):
    verification.identification_rank1(np.eye(3), [0, 1], np.eye(3), [0, 1, 2])
  with pytest.raises(ValueError, match="dimension 3 but probe_emb has 2"):
    verification.identification_rank1(np.eye(3), [0, 1, 2], np.eye(2), [0, 1])


# --- batched embedding ---

def _toy_embed(images):
  """(B, H, W, C) uint8 -> (B, 2W): first-row pixels (flip-sensitive) and ones."""
  first_row = images[:, 0, :, 0].astype(np.float64)
  return np.concatenate([first_row, np.ones_like(first_row)], axis=1)


@pytest.mark.parametrize("flip", [True, False])
def test_embed_images_batches_pads_and_fuses_flips_only_when_asked(flip):
  images = np.random.default_rng(5).integers(0, 256, (7, 3, 4, 1), dtype=np.uint8)
  shapes = []

  def embed_fn(batch):
    shapes.append(batch.shape)
    return _toy_embed(batch)

  emb = verification.embed_images(embed_fn, images, batch_size=3, flip=flip)
  assert set(shapes) == {(3, 3, 4, 1)}
  assert len(shapes) == (2 if flip else 1) * 3  # (plain[, flipped]) x ceil(7 / 3) batches
  want = _toy_embed(images) + (_toy_embed(images[:, :, ::-1]) if flip else 0)
  np.testing.assert_allclose(emb, want / np.linalg.norm(want, axis=1, keepdims=True),
                             rtol=1e-12)


def test_model_outputs_are_raw_and_keep_each_mirror_beside_its_image():
  images = np.random.default_rng(7).integers(0, 256, (5, 3, 4, 1), dtype=np.uint8)
  raw = verification.model_outputs(_toy_embed, images, batch_size=2)
  np.testing.assert_array_equal(raw, _toy_embed(images))   # not normalised
  both = verification.model_outputs(_toy_embed, images, batch_size=2, flip=True)
  assert both.shape == (5, 2, 8)
  np.testing.assert_array_equal(both[:, 0], _toy_embed(images))
  np.testing.assert_array_equal(both[:, 1], _toy_embed(images[:, :, ::-1]))


def test_verification_table_rows_and_the_note_on_a_collapsed_model():
  results = {"holdout": {"accuracy": 0.9303, "accuracy_std": 0.0097, "auc": 0.98,
                         "val_at_far_1e-3": 0.61, "tar_at_far_1e-4": 0.42},
             "lfw": {"accuracy": 0.5, "accuracy_std": 0.0, "auc": 0.93,
                     "val_at_far_1e-3": 0.0, "tar_at_far_1e-4": 0.0}}
  table = verification.format_table(results, {"holdout": {"accuracy": 0.6045}})
  rows = table.splitlines()
  assert rows[1].split() == ["holdout", "93.03", "±", "0.97", "0.9800", "61.00", "42.00", "60.45"]
  assert rows[2].split()[:4] == ["lfw", "50.00", "±", "0.00"] and rows[2].split()[-1] == "–"
  assert "note: lfw is at 50 % ± 0 but its AUC is 0.930" in table
  assert "note: holdout" not in table


def test_embed_images_with_a_jitted_function_compiles_once():
  import jax
  import jax.numpy as jnp
  traces = []

  @jax.jit
  def embed_fn(batch):
    traces.append(batch.shape)
    x = batch.astype(jnp.float32).reshape(batch.shape[0], -1)
    return x[:, :6] - 100.0

  images = np.random.default_rng(6).integers(0, 256, (10, 2, 3, 1), dtype=np.uint8)
  emb = verification.embed_images(embed_fn, images, batch_size=4, flip=True)
  assert traces == [(4, 2, 3, 1)]
  flat = images.reshape(10, -1).astype(np.float64)
  fused = (flat - 100) + (images[:, :, ::-1].reshape(10, -1) - 100.0)
  np.testing.assert_allclose(emb, fused / np.linalg.norm(fused, axis=1, keepdims=True),
                             rtol=1e-6)


def test_embed_errors():
  images = np.zeros((4, 2, 2, 1), np.uint8)
  with pytest.raises(ValueError, match="must be uint8, got dtype float32"):
    verification.embed_images(_toy_embed, images.astype(np.float32), batch_size=2, flip=True)
  with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
    verification.embed_images(_toy_embed, images[..., 0], batch_size=2, flip=True)
  with pytest.raises(ValueError, match="batch_size must be a positive integer"):
    verification.embed_images(_toy_embed, images, batch_size=0, flip=True)
  with pytest.raises(ValueError, match=r"\(2, d\) embeddings, got shape \(4,\)"):
    verification.embed_images(lambda b: np.ones(4), images, batch_size=2, flip=True)

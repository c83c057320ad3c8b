"""Tests of arcjax.angles on hand-made vectors with known angles and against a float64 loop."""

import json

import numpy as np
import pytest

from arcjax import angles


def _unit2(deg, scale=1.0):
  """2-D vectors at the given angles (degrees) from the x axis, times `scale`."""
  rad = np.radians(np.asarray(deg, np.float64))
  return np.stack([np.cos(rad), np.sin(rad)], axis=-1) * np.asarray(scale, np.float64)[..., None]


def _deg(rad):
  return np.degrees(rad)


# --- per-sample angles ---

def test_target_and_nearest_nontarget_angles_in_the_plane():
  centres = _unit2([0.0, 90.0, 200.0], scale=[1.0, 3.0, 0.5])
  embeddings = _unit2([10.0, 135.0, 250.0, 300.0], scale=[2.0, 1.0, 7.0, 0.1])
  labels = np.array([0, 1, 2, 0])
  np.testing.assert_allclose(_deg(angles.target_angles(embeddings, centres, labels)),
                             [10.0, 45.0, 50.0, 60.0], atol=1e-9)
  # 10° to 90° and 170° to 200° -> 80; 135° to 0° and 65° to 200° -> 65;
  # 250° to 0° (110) and 90° (160) -> 110; 300° to 90° (150) and 200° (100) -> 100.
  np.testing.assert_allclose(_deg(angles.nearest_nontarget_angles(embeddings, centres, labels)),
                             [80.0, 65.0, 110.0, 100.0], atol=1e-9)


def test_subcentres_the_angle_to_a_class_is_to_its_closest_and_its_centre_the_dominant():
  # Class 0's sub-centres at 0° (long) and 100°, class 1's at 180° and 60°, class 2's at 250°
  # and 270° (no embedding: its longest, 270°, stands for it).
  subcentres = np.stack([_unit2([0.0, 100.0], scale=[1.0, 5.0]),
                         _unit2([180.0, 60.0], scale=[2.0, 1.0]),
                         _unit2([250.0, 270.0], scale=[1.0, 4.0])])
  embeddings = _unit2([10.0, 95.0, 105.0, 170.0, 20.0])
  labels = np.array([0, 0, 0, 1, 1])
  # By hand: 10° -> 0° (10); 95° -> 100° (5); 105° -> 100° (5); 170° -> 180° (10);
  # 20° -> 60° (40).
  np.testing.assert_allclose(_deg(angles.target_angles(embeddings, subcentres, labels)),
                             [10.0, 5.0, 5.0, 10.0, 40.0], atol=1e-9)
  # Nearest other class, over its sub-centres: 10° -> 60° (50); 95° -> 60° (35);
  # 105° -> 60° (45); 170° -> 100° (70); 20° -> 0° (20).
  np.testing.assert_allclose(
      _deg(angles.nearest_nontarget_angles(embeddings, subcentres, labels)),
      [50.0, 35.0, 45.0, 70.0, 20.0], atol=1e-9)
  # Dominant: class 0's 100° (2 of 3 embeddings), class 1's a tie (1 each: the first,
  # 180°), class 2 none: its longest, 270°.
  dominant = angles.dominant_subcentres(embeddings, labels, subcentres)
  np.testing.assert_array_equal(dominant, subcentres[[0, 1, 2], [1, 0, 1]])
  stats = angles.angle_statistics(embeddings, labels, subcentres)
  assert stats == angles.angle_statistics(embeddings, labels, dominant)
  # W-Inter over the dominant centres 100°, 180°, 270°: 80, 80, 90.
  assert stats["w_inter_deg"] == pytest.approx((80 + 80 + 90) / 3)


def test_target_angle_is_exact_at_zero_and_pi():
  e = np.array([[1.0, 0.0], [1.0, 0.0]])
  theta = angles.target_angles(e, np.array([[3.0, 0.0], [-2.0, 0.0]]), np.array([0, 1]))
  np.testing.assert_array_equal(theta, [0.0, np.pi])


# --- the Table 5 statistics on vectors whose answer is known ---

def test_w_inter_of_orthogonal_axes_is_90_degrees():
  assert _deg(angles.w_inter(np.eye(5) * np.arange(1, 6)[:, None])) == pytest.approx(90.0)
  # 0°, 30°, 100°: nearest neighbours 30, 30, 70 -> mean 130/3.
  assert _deg(angles.w_inter(_unit2([0.0, 30.0, 100.0]))) == pytest.approx(130 / 3)


def test_w_ec_uses_the_normalised_mean_direction_of_each_present_class():
  # Class 0 at ±20° (centre 0°) with W_0 at 10°; class 1 at 45° and 135° with
  # unequal norms (centre 90°, not pulled toward the long one) with W_1 at
  # 120°; class 2 has no samples and is left out: (10 + 30) / 2 = 20°.
  embeddings = _unit2([20.0, -20.0, 45.0, 135.0], scale=[1.0, 1.0, 10.0, 0.5])
  labels = np.array([0, 0, 1, 1])
  centres = _unit2([10.0, 120.0, 250.0])
  assert _deg(angles.w_ec(embeddings, labels, centres)) == pytest.approx(20.0)


def test_intra_is_the_mean_angle_to_the_class_embedding_centre():
  # Class 5 at ±20° -> 20, 20; class 9 at 45°, 135° -> 45, 45; class 7 has a
  # single sample -> 0. Mean over the 5 samples: 130 / 5 = 26°.
  embeddings = _unit2([20.0, -20.0, 45.0, 135.0, 300.0], scale=[1.0, 2.0, 3.0, 4.0, 5.0])
  labels = np.array([5, 5, 9, 9, 7])
  assert _deg(angles.intra(embeddings, labels)) == pytest.approx(26.0)


def test_inter_is_the_mean_minimum_angle_between_class_centres():
  # Class centres at 0°, 90°, 200°: pairwise 90, 160, 110 -> nearest 90, 90, 110.
  embeddings = _unit2([-10.0, 10.0, 80.0, 100.0, 200.0])
  labels = np.array([3, 3, 1, 1, 8])
  assert _deg(angles.inter(embeddings, labels)) == pytest.approx(290 / 3)


def test_angle_statistics_keys_degrees_and_json():
  embeddings = _unit2([20.0, -20.0, 45.0, 135.0])
  labels = np.array([0, 0, 1, 1])
  centres = _unit2([10.0, 120.0, 250.0])
  eval_emb = _unit2([0.0, 60.0, 180.0, 170.0, 190.0])
  eval_labels = np.array([40, 40, 77, 77, 77])
  stats = angles.angle_statistics(embeddings, labels, centres, eval_emb, eval_labels)
  expected = {"w_ec_deg": 20.0, "w_inter_deg": (110 + 110 + 120) / 3, "intra1_deg": 32.5,
              "inter1_deg": 90.0, "intra2_deg": (30 + 30 + 0 + 10 + 10) / 5,
              "inter2_deg": 150.0}
  assert stats.keys() == expected.keys()
  for key, value in expected.items():
    assert stats[key] == pytest.approx(value), key
    assert type(stats[key]) is float
  json.dumps(stats)
  no_eval = angles.angle_statistics(embeddings, labels, centres)
  assert no_eval["intra2_deg"] is None and no_eval["inter2_deg"] is None
  assert no_eval["w_ec_deg"] == stats["w_ec_deg"]


# --- random data against a float64 loop written from the definitions ---

def _angle_deg(u, v):
  c = np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v))
  return np.degrees(np.arccos(min(1.0, max(-1.0, c))))


def _loop_centre(embeddings, labels, c):
  members = [e / np.linalg.norm(e) for e, y in zip(embeddings, labels) if y == c]
  return np.sum(members, axis=0)


def _loop_statistics(emb, labels, centres, eval_emb, eval_labels):
  def intra_inter(e, y):
    classes = sorted(set(y.tolist()))
    cent = {c: _loop_centre(e, y, c) for c in classes}
    intra_ = np.mean([_angle_deg(x, cent[c]) for x, c in zip(e, y)])
    inter_ = np.mean([min(_angle_deg(cent[a], cent[b]) for b in classes if b != a)
                      for a in classes])
    return intra_, inter_

  present = sorted(set(labels.tolist()))
  w_ec = np.mean([_angle_deg(centres[c], _loop_centre(emb, labels, c)) for c in present])
  num_classes = len(centres)
  w_inter = np.mean([min(_angle_deg(centres[j], centres[k]) for k in range(num_classes) if k != j)
                     for j in range(num_classes)])
  intra1, inter1 = intra_inter(emb, labels)
  intra2, inter2 = intra_inter(eval_emb, eval_labels)
  return {"w_ec_deg": w_ec, "w_inter_deg": w_inter, "intra1_deg": intra1,
          "inter1_deg": inter1, "intra2_deg": intra2, "inter2_deg": inter2}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_random_statistics_match_a_float64_loop(dtype, monkeypatch):
  monkeypatch.setattr(angles, "_CHUNK_ELEMENTS", 40)  # several chunks per search
  rng = np.random.default_rng(0)
  num_classes, dim = 12, 6
  centres = rng.normal(size=(num_classes, dim))
  labels = rng.choice([c for c in range(num_classes) if c not in (4, 9)], 200)  # 4, 9 unseen
  emb = centres[labels] + 0.8 * rng.normal(size=(200, dim))
  eval_labels = rng.choice([3, 17, 101, 250, 999], 60)
  eval_emb = rng.normal(size=(60, dim))
  expected = _loop_statistics(emb, labels, centres, eval_emb, eval_labels)
  stats = angles.angle_statistics(emb.astype(dtype), labels, centres.astype(dtype),
                                  eval_emb.astype(dtype), eval_labels)
  tol = 1e-9 if dtype == np.float64 else 1e-4
  for key, value in expected.items():
    assert stats[key] == pytest.approx(value, abs=tol), key

  theta_y = np.array([_angle_deg(x, centres[y]) for x, y in zip(emb, labels)])
  nearest = np.array([min(_angle_deg(x, centres[j]) for j in range(num_classes) if j != y)
                      for x, y in zip(emb, labels)])
  np.testing.assert_allclose(_deg(angles.target_angles(emb.astype(dtype), centres, labels)),
                             theta_y, atol=tol)
  np.testing.assert_allclose(
      _deg(angles.nearest_nontarget_angles(emb.astype(dtype), centres, labels)), nearest, atol=tol)


# --- histograms ---

def test_theta_histogram_counts_by_hand():
  # 2° bins: 0 and 1.9 -> bin 0, 3 -> bin 1, 45 -> bin 22, 179 and 180 -> bin 89.
  theta = np.radians([0.0, 1.9, 3.0, 45.0, 179.0, 180.0])
  counts, edges = angles.theta_histogram(theta)
  np.testing.assert_allclose(edges, np.arange(0.0, 181.0, 2.0))
  np.testing.assert_array_equal(counts, [2, 1] + [0] * 20 + [1] + [0] * 66 + [2])
  counts, edges = angles.theta_histogram(np.array([0.1, 3.0]), bins=3)
  np.testing.assert_array_equal(counts, [1, 0, 1])
  np.testing.assert_allclose(edges, [0.0, 60.0, 120.0, 180.0])


def test_theta_histogram_keeps_float32_pi_and_matches_numpy():
  theta32 = np.arccos(np.array([-1.0, 1.0], np.float32))
  assert float(theta32[0]) > np.pi  # float32(π) rounds up
  counts, _ = angles.theta_histogram(theta32, bins=4)
  np.testing.assert_array_equal(counts, [1, 0, 0, 1])
  theta = np.random.default_rng(1).uniform(0, np.pi, 1000)
  counts, edges = angles.theta_histogram(theta, bins=36)
  np.testing.assert_array_equal(counts, np.bincount((np.degrees(theta) // 5).astype(int),
                                                    minlength=36))


# --- errors ---

def test_errors_name_the_problem():
  centres = np.eye(3)
  emb = np.ones((4, 3))
  with pytest.raises(ValueError, match=r"labels\[2\] = 3 is outside \[0, 3\)"):
    angles.target_angles(emb, centres, np.array([0, 1, 3, 0]))
  with pytest.raises(ValueError, match=r"labels\[0\] = -1 is outside"):
    angles.w_ec(emb, np.array([-1, 0, 0, 0]), centres)
  with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
    angles.intra(emb, np.array([0, 1, 2]))
  with pytest.raises(ValueError, match="labels must be integers"):
    angles.inter(emb, np.array([0.0, 1.0, 0.0, 1.0]))
  with pytest.raises(ValueError, match="dimension 3 but centres have 2"):
    angles.nearest_nontarget_angles(emb, np.eye(2), np.zeros(4, int))
  with pytest.raises(ValueError, match="at least 2 centres, got 1"):
    angles.nearest_nontarget_angles(emb, np.ones((1, 3)), np.zeros(4, int))
  with pytest.raises(ValueError, match="W-Inter needs at least 2 centres"):
    angles.w_inter(np.ones((1, 3)))
  with pytest.raises(ValueError, match="Inter needs at least 2 classes, labels hold 1"):
    angles.inter(emb, np.zeros(4, int))
  with pytest.raises(ValueError, match="class 4's embeddings sum to zero"):
    angles.intra(np.array([[1.0, 0.0], [-1.0, 0.0]]), np.array([4, 4]))
  bad = emb.copy()
  bad[1, 2] = np.nan
  with pytest.raises(ValueError, match="embeddings has non-finite values in row 1"):
    angles.target_angles(bad, centres, np.zeros(4, int))
  with pytest.raises(ValueError, match="centres row 2 has zero norm"):
    angles.w_inter(np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
  with pytest.raises(ValueError, match=r"non-empty \(N, d\)"):
    angles.intra(np.ones(3), np.zeros(3, int))
  with pytest.raises(ValueError, match="given together"):
    angles.angle_statistics(emb, np.array([0, 1, 0, 1]), centres, eval_emb=emb)
  with pytest.raises(ValueError, match=r"theta\[1\] = 4.0 is not an angle"):
    angles.theta_histogram(np.array([0.0, 4.0]))
  with pytest.raises(ValueError, match=r"theta\[0\] = nan"):
    angles.theta_histogram(np.array([np.nan]))
  with pytest.raises(ValueError, match="bins must be a positive integer"):
    angles.theta_histogram(np.array([0.0]), bins=0)
  with pytest.raises(ValueError, match=r"theta must be a \(N,\) array"):
    angles.theta_histogram(np.zeros((2, 2)))


def test_class_mean_angles_and_embedding_statistics_in_the_plane():
  # Class 0 at ±10° about the x axis (centre at 0°), class 1 at 80° and 100° (centre at 90°),
  # class 2 alone at 200° (its own centre): every angle by hand, in degrees.
  deg = np.array([10.0, -10.0, 80.0, 100.0, 200.0])
  emb = 3.0 * np.stack([np.cos(np.radians(deg)), np.sin(np.radians(deg))], axis=1)
  labels = np.array([5, 5, 7, 7, 9])
  own, nearest = angles.class_mean_angles(emb, labels)
  np.testing.assert_allclose(np.degrees(own), [10, 10, 10, 10, 0], atol=1e-9)
  # Nearest other centre: 0° ↔ 90° for class 0's members (80°, 100°), 90° ↔ 0° for class 1's
  # (80°, 100°: 80 nearer 0° than 200°'s 120°); 200° ↔ 0° (160°) vs 90° (110°).
  np.testing.assert_allclose(np.degrees(nearest), [80, 100, 80, 100, 110], atol=1e-9)
  stats = angles.embedding_statistics(emb, labels)
  assert stats == pytest.approx({"intra_deg": 8.0, "inter_deg": (90 + 90 + 110) / 3}, abs=1e-9)
  with pytest.raises(ValueError, match="at least 2 classes"):
    angles.class_mean_angles(emb, np.zeros(5, int))
  with pytest.raises(ValueError, match="need trained class centres and there are none"):
    angles.angle_statistics(emb, labels, np.zeros((0, 2)))


def test_the_angles_evaluator_records_feature_norms_and_subcentre_angles(tmp_path):
  """evaluators.Angles on a sub-center head: the probe set's ‖x‖ (the backbone's raw output)
  beside θ_y and the nearest angle (to the closest sub-centres), as arrays and histograms."""
  import jax  # pylint: disable=import-outside-toplevel
  from arcjax import data, evaluators, inference, losses, train, workdir  # pylint: disable=import-outside-toplevel
  from arcjax import logging as arcjax_logging  # pylint: disable=import-outside-toplevel
  from arcjax.data import pipeline  # pylint: disable=import-outside-toplevel
  from configs import default  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  config.loss = losses.loss_config("subcenter_arcface")
  config.angles.probe_size, config.train.steps, config.wandb.mode = 64, 10, "disabled"
  datasets = data.get_datasets(config.data)
  state = train.create_train_state(config, jax.random.key(0), num_classes=datasets.num_classes,
                                   image_shape=(32, 32, 1))
  centres = np.asarray(state.head["centres"])
  assert centres.shape == (datasets.num_classes, 3, config.model.embedding_dim)
  directory = workdir.as_path(tmp_path)
  writer = arcjax_logging.MetricWriter(directory, config)
  evaluator = evaluators.Angles(config, datasets.train, datasets.unseen, writer, directory,
                                primary=True, embed=inference.embedder(config.model))
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  evaluator(evaluators.ModelView(5, variables, centres))
  writer.close()
  record = np.load(tmp_path / "angles" / "theta_step00000005.npz")
  # The probe set: config.angles.probe_size training images drawn by the run's seed.
  indices = np.sort(np.random.default_rng(config.seed).permutation(len(datasets.train))[:64])
  images = pipeline.load_images(datasets.train, indices, image_size=(32, 32))
  outputs = np.asarray(inference.embedder(config.model)(variables, images), np.float64)
  np.testing.assert_allclose(record["feature_norm"], np.linalg.norm(outputs, axis=1), rtol=1e-6)
  labels = np.asarray(datasets.train.labels)[indices]
  np.testing.assert_array_equal(record["labels"], labels)
  unit = outputs / np.linalg.norm(outputs, axis=1, keepdims=True)
  w = centres / np.linalg.norm(centres, axis=2, keepdims=True)
  cos = np.einsum("nd,ckd->nck", unit, w).max(axis=2)  # the closest sub-centre of each class
  rows = np.arange(len(labels))
  np.testing.assert_allclose(record["theta_target"], np.arccos(cos[rows, labels]), atol=1e-6)
  cos[rows, labels] = -np.inf
  np.testing.assert_allclose(record["theta_nearest"], np.arccos(cos.max(axis=1)), atol=1e-6)
  histogram = np.load(next((tmp_path / "histograms").glob("*feature_norm*")))
  assert histogram["counts"].sum() == 64

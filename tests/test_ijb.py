"""IJB-B/C: a synthetic IJB folder built from the embedded Omniglot characters, its alignment
against the known transforms, insightface's protocol against a plain transcription of its
code (ijb_11.py, ijb_1n.py, eval_ijbc.py), and `python -m arcjax.evaluate --ijb` end to end."""

import heapq
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
from sklearn.metrics import roc_curve
import sklearn.preprocessing

from arcjax import errors
from arcjax import ijb
from arcjax.data import ijb as ijb_data
from arcjax.data import images, omniglot

REPO = pathlib.Path(__file__).resolve().parents[1]
PATIENCE = 900  # seconds a slow, shared CI machine may take (not a speed assertion)
NUM_SUBJECTS = 12
TEMPLATES_PER_SUBJECT = 3
MEDIAS_PER_SUBJECT = 3


def _similarity(scale: float, angle: float) -> np.ndarray:
  c, s = scale * np.cos(angle), scale * np.sin(angle)
  return np.array([[c, -s, 0.0], [s, c, 0.0]])


def _pil_warp(image: np.ndarray, matrix: np.ndarray, size, fill) -> np.ndarray:
  """`image` moved by `matrix` (pixel centres at integers) onto (H, W), by PIL, not by arcjax.

  PIL's affine transform takes the output-to-input map with pixel centres at
  half-integers, hence the half-pixel shifts.
  """
  inverse = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]
  linear = inverse[:, :2]
  shift = inverse[:, 2] + 0.5 - linear @ [0.5, 0.5]
  coefficients = (linear[0, 0], linear[0, 1], shift[0], linear[1, 0], linear[1, 1], shift[1])
  return np.asarray(Image.fromarray(image).transform(
      (size[1], size[0]), Image.Transform.AFFINE, coefficients,
      resample=Image.Resampling.BILINEAR, fillcolor=fill))


def build_ijb_folder(root: pathlib.Path, seed: int = 0) -> dict:
  """An IJB-C-style folder at `root` (meta/, loose_crop/) from Omniglot characters.

  Each subject is a character; each of its images a drawing of it resized to
  112×112 and coloured (the aligned crop), placed into a larger 'loose crop' by
  a known similarity transform T, its landmarks T applied to the ArcFace
  template (3 decimals, as insightface's files). Subjects have 3 media of 1–3
  images each, and 3 templates, each a random set of the subject's media (so
  images and media recur across templates, as in IJB). The 1:N lists: the
  first template of subjects 0–5 in G1, of 6–11 in G2; the others probe.

  Returns {'crops': {image name: (112, 112, 3) uint8}, 'transforms': {image
  name: (2, 3) T}, 'subject_of_template': {template id: subject}}.
  """
  rng = np.random.default_rng(seed)
  characters = omniglot.load()
  (root / "meta").mkdir(parents=True)
  (root / "loose_crop").mkdir()
  template_ids = rng.choice(np.arange(1, 5000), NUM_SUBJECTS * TEMPLATES_PER_SUBJECT,
                            replace=False)
  media_ids = rng.choice(np.arange(1, 90000), NUM_SUBJECTS * MEDIAS_PER_SUBJECT, replace=False)
  crops, transforms, subject_of_template, rows, one_n = {}, {}, {}, [], {"G1": [], "G2": [],
                                                                         "probe_mixed": []}
  for subject in range(NUM_SUBJECTS):
    drawings = characters.images[characters.labels == 7 * subject][..., 0]
    medias = []
    for m in range(MEDIAS_PER_SUBJECT):
      frames = []
      for _ in range(rng.integers(1, 4)):
        name = f"{len(crops) + 1}.png"
        grey = np.asarray(Image.fromarray(drawings[len(crops) % len(drawings)]).resize(
            (112, 112), Image.Resampling.BILINEAR)).astype(int)
        crop = np.stack([grey, grey * 3 // 4 + 40, 255 - grey // 2], -1).astype(np.uint8)
        transform = _similarity(rng.uniform(1.2, 1.8), rng.uniform(-0.5, 0.5))
        corners = np.array([[0, 0], [111, 0], [0, 111], [111, 111]]) @ transform[:, :2].T
        width, height = (np.ptp(corners, axis=0) + rng.integers(24, 48, 2)).astype(int)
        transform[:, 2] = ([width / 2, height / 2] - transform[:, :2] @ [55.5, 55.5]
                           + rng.uniform(-8, 8, 2))
        loose = _pil_warp(crop, transform, (height, width), (90, 120, 150))
        Image.fromarray(loose).save(root / "loose_crop" / name)
        crops[name], transforms[name] = crop, transform
        frames.append(name)
      medias.append((int(media_ids[subject * MEDIAS_PER_SUBJECT + m]), frames))
    for t in range(TEMPLATES_PER_SUBJECT):
      template = int(template_ids[subject * TEMPLATES_PER_SUBJECT + t])
      subject_of_template[template] = subject
      chosen = rng.choice(MEDIAS_PER_SUBJECT, rng.integers(1, MEDIAS_PER_SUBJECT + 1),
                          replace=False)
      faces = [(name, template, medias[m][0]) for m in sorted(chosen) for name in medias[m][1]]
      rows += faces
      listed = ("G1" if subject < NUM_SUBJECTS // 2 else "G2") if t == 0 else "probe_mixed"
      one_n[listed] += [f"{template},{subject},{name}" for name, _, _ in faces]
  order = rng.permutation(len(rows))  # insightface's lists are in no template order
  rows = [rows[i] for i in order]
  with open(root / "meta" / "ijbc_face_tid_mid.txt", "w") as f:
    f.writelines(f"{name} {template} {media}\n" for name, template, media in rows)
  with open(root / "meta" / "ijbc_name_5pts_score.txt", "w") as f:
    for name, _, _ in rows:
      transform = transforms[name]
      points = images.ARCFACE_TEMPLATE.astype(np.float64) @ transform[:, :2].T + transform[:, 2]
      f.write(f"{name} " + " ".join(f"{v:.3f}" for v in points.ravel())
              + f" {rng.uniform(0.3, 1.0):.4f}\n")
  templates = sorted(subject_of_template)
  with open(root / "meta" / "ijbc_template_pair_label.txt", "w") as f:
    for i, first in enumerate(templates):
      for second in templates[i + 1:]:
        same = subject_of_template[first] == subject_of_template[second]
        f.write(f"{first} {second} {int(same)}\n")
  for listed, lines in one_n.items():
    path = root / "meta" / f"ijbc_1N_{'gallery_' if listed != 'probe_mixed' else ''}{listed}.csv"
    path.write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME\n" + "\n".join(lines) + "\n")
  return {"crops": crops, "transforms": transforms, "subject_of_template": subject_of_template}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("IJB_release") / "IJBC"
  return root, build_ijb_folder(root)


def test_the_reader_pairs_each_face_with_its_landmarks_template_and_media(folder):
  root, truth = folder
  meta = ijb_data.read_meta(root, "IJBC")
  lines = (root / "meta" / "ijbc_face_tid_mid.txt").read_text().split("\n")
  assert len(meta.image_names) == len(lines) - 1 > 2 * NUM_SUBJECTS
  assert meta.landmarks.dtype == np.float32 and meta.face_scores.dtype == np.float32
  for i in (0, 17, len(lines) - 2):
    name, template, media = lines[i].split()
    assert (meta.image_names[i], meta.templates[i], meta.medias[i]) == (name, int(template),
                                                                      int(media))
    transform = truth["transforms"][name]
    want = images.ARCFACE_TEMPLATE.astype(np.float64) @ transform[:, :2].T + transform[:, 2]
    np.testing.assert_allclose(meta.landmarks[i], want, atol=6e-4)
  assert len(meta.pairs) == 36 * 35 // 2 and meta.pair_labels.sum() == NUM_SUBJECTS * 3
  assert len(np.unique(meta.gallery.templates)) == NUM_SUBJECTS
  assert len(np.unique(meta.probes.templates)) == NUM_SUBJECTS * (TEMPLATES_PER_SUBJECT - 1)


def test_alignment_recovers_each_crop_by_the_known_transform(folder):
  """The estimated transform is T's inverse (to the landmarks' 3 decimals), and the aligned
  face is the crop: closer than aligning from landmarks half a pixel off."""
  root, truth = folder
  meta = ijb_data.read_meta(root, "IJBC")
  seen, errors_on, errors_off = set(), [], []
  for i, name in enumerate(meta.image_names):
    if name in seen:
      continue
    seen.add(name)
    inverse = np.linalg.inv(np.vstack([truth["transforms"][name], [0, 0, 1]]))[:2]
    estimate = images.similarity_transform(meta.landmarks[i], images.ARCFACE_TEMPLATE)
    np.testing.assert_allclose(estimate, inverse, atol=2e-3)
    crop = truth["crops"][name].astype(int)
    aligned = ijb_data.aligned_face(meta, i)
    assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8
    errors_on.append(np.abs(aligned.astype(int) - crop)[2:-2, 2:-2].mean())
    scale = np.hypot(*truth["transforms"][name][:, 0])
    off = images.align_face(np.asarray(Image.open(root / "loose_crop" / name)),
                            meta.landmarks[i] + [0.5 * scale, 0.5 * scale])
    errors_off.append(np.abs(off.astype(int) - crop)[2:-2, 2:-2].mean())
  # Mean absolute error in grey levels over the crops: the bilinear blur of two warps.
  assert max(errors_on) < 2.0 and np.mean(errors_on) < np.mean(errors_off) / 2, (
      np.mean(errors_on), np.mean(errors_off))


# --- insightface's protocol, transcribed plainly from ijb_11.py / eval_ijbc.py / ijb_1n.py ---

def _insightface_inputs(img_feats, faceness_scores, norm_score, detector_score, flip):
  """img_feats: (F, 2d) float32, [output, mirror's output] per face, as get_image_feature."""
  half = img_feats.shape[1] // 2
  if flip == 2:
    x = img_feats[:, 0:half] + img_feats[:, half:]
  elif flip == 1:
    x = img_feats
  else:
    x = img_feats[:, 0:half]
  if not norm_score:
    x = x / np.sqrt(np.sum(x ** 2, -1, keepdims=True))
  if detector_score:
    x = x * faceness_scores[:, np.newaxis]
  return x


def _insightface_template_sums(img_feats, templates, medias, chosen):
  unique_templates = np.unique(chosen)
  template_feats = np.zeros((len(unique_templates), img_feats.shape[1]))
  for count, template in enumerate(unique_templates):
    (faces,) = np.where(templates == template)
    face_feats, face_medias = img_feats[faces], medias[faces]
    media_feats = []
    for media, size in zip(*np.unique(face_medias, return_counts=True)):
      (in_media,) = np.where(face_medias == media)
      media_feats.append(face_feats[in_media] if size == 1
                         else np.mean(face_feats[in_media], axis=0, keepdims=True))
    template_feats[count] = np.sum(np.array(media_feats), axis=0)
  return template_feats, unique_templates


def _insightface_11(img_feats, faceness_scores, templates, medias, p1, p2, label, mode):
  x = _insightface_inputs(img_feats, faceness_scores, *mode)
  template_feats, unique_templates = _insightface_template_sums(x, templates, medias, templates)
  template_norm_feats = sklearn.preprocessing.normalize(template_feats)
  template2id = np.zeros((max(unique_templates) + 1, 1), dtype=int)
  for count, template in enumerate(unique_templates):
    template2id[template] = count
  score = np.sum(template_norm_feats[template2id[p1]] * template_norm_feats[template2id[p2]],
                 -1).flatten()
  fpr, tpr, _ = roc_curve(label, score)
  fpr, tpr = np.flipud(fpr), np.flipud(tpr)
  row = {}
  for x_label in [10 ** -6, 10 ** -5, 10 ** -4, 10 ** -3, 10 ** -2, 10 ** -1]:
    _, min_index = min(list(zip(abs(fpr - x_label), range(len(fpr)))))
    row[str(x_label)] = tpr[min_index]
  return row, score


def _insightface_1n(img_feats, faceness_scores, templates, medias, gallery, probes):
  x = _insightface_inputs(img_feats, faceness_scores, True, True, 2)

  def pooled(listed):
    feats, unique = _insightface_template_sums(x, templates, medias, listed[:, 0])
    _, first = np.unique(listed[:, 0], return_index=True)
    return feats / np.sqrt(np.sum(feats ** 2, -1, keepdims=True)), listed[first, 1]

  gallery_feats, gallery_ids = pooled(gallery)
  query_feats, query_ids = pooled(probes)
  mask = [[i for i, g in enumerate(gallery_ids) if g == q][0] for q in query_ids]
  similarity = np.dot(query_feats, gallery_feats.T)
  top_inds = np.argsort(-similarity)
  query_num = len(query_feats)
  found = {f"rank{k}": sum(mask[i] in top_inds[i, 0:k] for i in range(query_num)) / query_num
           for k in (1, 5, 10)}
  pos_sims = []
  for i in range(query_num):
    pos_sims.append(similarity[i, mask[i]])
    similarity[i, mask[i]] = -2.0
  pos_sims = np.array(pos_sims)
  required_topk = [int(np.ceil(query_num * far)) for far in (0.01, 0.1)]
  neg_sims = heapq.nlargest(max(required_topk), similarity[np.where(similarity > -2.0)])
  found["tpir_at_fpir"] = {str(far): np.sum(pos_sims > neg_sims[k - 1]) / query_num
                           for far, k in zip((0.01, 0.1), required_topk)}
  return found


def _features(meta, truth, seed=1, dim=16):
  """Raw features per face, (F, 2, d) float32: a subject direction, noise, norms that vary."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(NUM_SUBJECTS, dim))
  subjects = np.array([truth["subject_of_template"][t] for t in meta.templates])
  own = centres[subjects] + rng.normal(scale=1.3, size=(len(subjects), dim))
  mirror = own + rng.normal(scale=0.4, size=own.shape)
  norms = rng.uniform(2.0, 30.0, size=(len(subjects), 1, 1))
  return (np.stack([own, mirror], axis=1) * norms).astype(np.float32)


def _csv(path):
  return np.loadtxt(path, dtype=str, skiprows=1, delimiter=",")[:, :2].astype(int)


def test_protocol_matches_a_plain_transcription_of_insightface(folder):
  root, truth = folder
  meta = ijb_data.read_meta(root, "IJBC")
  features = _features(meta, truth)
  results = ijb.evaluate(features, meta)
  img_feats = features.reshape(len(features), -1)   # insightface's (F, 2d) layout
  tid_mid = np.loadtxt(root / "meta" / "ijbc_face_tid_mid.txt", dtype=str)
  templates, medias = tid_mid[:, 1].astype(int), tid_mid[:, 2].astype(int)
  pairs = np.loadtxt(root / "meta" / "ijbc_template_pair_label.txt", dtype=int)
  scores = np.loadtxt(root / "meta" / "ijbc_name_5pts_score.txt", dtype=str)[:, -1]
  faceness_scores = scores.astype(np.float32)
  assert sorted(results["variants"]) == sorted(ijb.VARIANTS) and len(ijb.VARIANTS) == 12
  for variant, found in results["variants"].items():
    mode = (variant[1] == "1", variant[3] == "1", int(variant[5]))
    want, want_scores = _insightface_11(img_feats, faceness_scores, templates, medias,
                                        pairs[:, 0], pairs[:, 1], pairs[:, 2], mode)
    assert found["tar_at_far"] == want, variant
    # Bit for bit: the float32 pooling adds in insightface's order.
    unique, sums = ijb.template_sums(ijb.face_inputs(features, meta.face_scores, variant),
                                     meta.templates, meta.medias)
    np.testing.assert_array_equal(
        ijb.pair_scores(sklearn.preprocessing.normalize(sums), unique, meta.pairs), want_scores)
    assert list(found["tar_at_far"]) == ["1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"]
  # The modes differ here (else the comparison above would test little).
  assert len({tuple(r["tar_at_far"].values()) for r in results["variants"].values()}) >= 6
  want = _insightface_1n(img_feats, faceness_scores, templates, medias,
                         np.concatenate([_csv(root / "meta" / f"ijbc_1N_gallery_{g}.csv")
                                         for g in ("G1", "G2")]),
                         _csv(root / "meta" / "ijbc_1N_probe_mixed.csv"))
  found = results["identification"]
  assert (found["probes"], found["gallery"]) == (24, 12)
  assert {key: found[key] for key in want} == want
  assert 0 < found["rank1"] < found["rank5"] <= 1


def test_scores_are_template_dot_products_and_tar_reads_the_nearest_roc_point():
  """A hand-worked case: three templates, one face each, two media in one of them."""
  features = np.zeros((4, 2, 2), np.float32)
  features[:, 0] = [[1, 0], [3, 0], [0, 2], [1, 1]]
  meta = ijb_data.Meta(
      root=pathlib.Path("."), name="IJBC", image_names=["a", "b", "c", "d"],
      landmarks=np.zeros((4, 5, 2), np.float32), face_scores=np.ones(4, np.float32),
      templates=np.array([5, 5, 7, 9]), medias=np.array([1, 2, 3, 4]),
      pairs=np.array([[5, 7], [5, 9], [7, 9]]), pair_labels=np.array([0, 1, 0]),
      gallery=None, probes=None, meta_files=[])
  found = ijb.verification(features, meta, "N0D0F0")
  # Template 5: (1, 0) + (1, 0) -> (1, 0); 7: (0, 1); 9: (1, 1)/√2.
  # Scores 0, 1/√2, 1/√2: the ROC (FPR, TPR) = (0, 0), (0.5, 1) [threshold 1/√2], (1, 1).
  assert found["tar_at_far"] == {"1e-06": 0.0, "1e-05": 0.0, "0.0001": 0.0, "0.001": 0.0,
                                 "0.01": 0.0, "0.1": 0.0}
  assert found["auc"] == 0.75


def _write(root: pathlib.Path, name: str, text: str) -> None:
  (root / "meta" / name).write_text(text)


def test_a_folder_insightface_would_misread_is_refused_in_one_line(tmp_path):
  root = tmp_path / "IJBC"
  (root / "meta").mkdir(parents=True)
  (root / "loose_crop").mkdir()
  faces = "1.jpg 10 100\n2.jpg 11 101\n"
  points = "".join(f"{n}.jpg " + " ".join(["1.0"] * 10) + " 0.9\n" for n in (1, 2))
  _write(root, "ijbc_face_tid_mid.txt", faces)
  _write(root, "ijbc_name_5pts_score.txt", points)
  _write(root, "ijbc_template_pair_label.txt", "10 11 0\n10 10 1\n")
  assert len(ijb_data.read_meta(root, "IJBC").image_names) == 2
  with pytest.raises(errors.DataError, match="1.jpg does not exist"):
    ijb_data.check_images(ijb_data.read_meta(root, "IJBC"))
  with pytest.raises(errors.ConfigError, match="unknown IJB name 'IJBA'"):
    ijb_data.read_meta(root, "IJBA")
  _write(root, "ijbc_name_5pts_score.txt", points.replace("2.jpg", "3.jpg"))
  with pytest.raises(errors.DataError, match="line 2 names 3.jpg in .* but 2.jpg"):
    ijb_data.read_meta(root, "IJBC")
  _write(root, "ijbc_name_5pts_score.txt", points)
  _write(root, "ijbc_template_pair_label.txt", "10 12 0\n10 10 1\n")
  with pytest.raises(errors.DataError, match="names template 12, which has no face"):
    ijb_data.read_meta(root, "IJBC")
  _write(root, "ijbc_template_pair_label.txt", "10 11 2\n10 10 1\n")
  with pytest.raises(errors.DataError, match="labels must be 0 or 1"):
    ijb_data.read_meta(root, "IJBC")
  _write(root, "ijbc_template_pair_label.txt", "10 11 0\n10 10 1\n")
  _write(root, "ijbc_1N_gallery_G1.csv", "TEMPLATE_ID,SUBJECT_ID\n10,1\n")
  with pytest.raises(errors.DataError, match="ijbc_1N_gallery_G2.csv does not exist but other"):
    ijb_data.read_meta(root, "IJBC")
  (root / "loose_crop").rmdir()
  with pytest.raises(errors.DataError, match="must hold meta/ and loose_crop/"):
    ijb_data.read_meta(root, "IJBC")


def _run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=PATIENCE,
                        env={**os.environ, "WANDB_MODE": "disabled", "XLA_FLAGS": ""})


@pytest.mark.slow
def test_evaluate_ijb_end_to_end_equals_the_transcription_on_the_runs_features(folder, tmp_path):
  root, _ = folder
  run_dir = tmp_path / "run"
  trained = _run("-m", "arcjax.main", "--config=configs/default.py", f"--workdir={run_dir}",
                 "--config.train.steps=2", "--config.train.batch_size=16",
                 "--config.eval.every=0", "--config.eval.batch_size=32",
                 "--config.data.max_pairs=60", "--config.angles.probe_size=16")
  assert trained.returncode == 0, trained.stderr[-3000:]
  evaluated = _run("-m", "arcjax.evaluate", f"--workdir={run_dir}", f"--ijb={root}")
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert "IJBC of" in evaluated.stdout and "N1D1F2 *" in evaluated.stdout
  assert "1:N (N1D1F2, 24 probe templates, 12 gallery)" in evaluated.stdout
  record = json.loads((run_dir / "evaluations" / "IJBC_step2.json").read_text())
  assert (run_dir / "evaluations" / "IJBC_step2_roc.png").read_bytes()[:4] == b"\x89PNG"
  meta = ijb_data.read_meta(root, "IJBC")
  assert record["source"]["path"] == str(root.resolve())
  assert record["source"]["sha256"] == ijb_data.meta_sha256(meta)
  assert (record["step"], record["faces"], record["templates"]) == (2, len(meta.image_names), 36)

  # The same features, through the public API: the transcription gives the record's numbers.
  from arcjax import inference  # pylint: disable=import-outside-toplevel
  run = inference.load_run(run_dir)
  aligned = np.stack([ijb_data.aligned_face(meta, i) for i in range(len(meta.image_names))])
  features = run.features(aligned, flip=True)
  assert features.shape == (len(aligned), 2, 128)
  want, _ = _insightface_11(features.reshape(len(features), -1), meta.face_scores,
                            meta.templates, meta.medias, meta.pairs[:, 0], meta.pairs[:, 1],
                            meta.pair_labels, (True, True, 2))
  assert record["variant"] == "N1D1F2" and record["tar_at_far"] == want
  assert record["variants"]["N1D1F2"]["tar_at_far"] == want

  # Another folder's record at the same step is never overwritten.
  other = tmp_path / "other" / "IJBC"
  (other / "meta").mkdir(parents=True)
  for path in (root / "meta").iterdir():
    (other / "meta" / path.name).write_bytes(path.read_bytes())
  (other / "loose_crop").symlink_to(root / "loose_crop")
  _write(other, "ijbc_template_pair_label.txt",
         (root / "meta" / "ijbc_template_pair_label.txt").read_text()[::-1].strip()[::-1] + "\n")
  refused = _run("-m", "arcjax.evaluate", f"--workdir={run_dir}", f"--ijb={other}")
  assert refused.returncode == 1 and "Traceback" not in refused.stderr
  assert "holds the IJBC evaluation of another folder" in refused.stderr, refused.stderr[-2000:]

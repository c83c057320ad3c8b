"""The data formats end to end: a `.rec` and a `.bin` give the numbers of the TFDS path,
and on ORL's held-out people a trained model beats raw-pixel cosine similarity."""

import io
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from arcjax import data
from arcjax import train
from arcjax.data import default as default_data
from arcjax.data import pairs
from arcjax.data import recordio
from arcjax.data import tfds_builder
from configs import default

REPO = pathlib.Path(__file__).resolve().parents[1]


def _png(image: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(out, format="PNG")
  return out.getvalue()


def _png_and_label(source, index: int) -> tuple[bytes, int]:
  image, label = source[index]
  return _png(image), label


def _final_state(workdir: pathlib.Path):
  with ocp.CheckpointManager(workdir.resolve() / "checkpoints") as manager:
    restored = manager.restore(manager.latest_step(),
                               args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return restored["state"]


@pytest.mark.slow
def test_recordio_and_bin_files_give_the_tfds_numbers(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "disabled")
  config = default.get_config()
  config.train.update(steps=12, batch_size=64, log_every=4, checkpoint_every=12)
  config.update({"eval": {"every": 0, "batch_size": 500}, "angles": {"probe_size": 0, "every": 0}})
  config.data.max_pairs = 600

  # The default dataset as insightface's files: every example, in the TFDS split's order
  # (grouped by identity), PNG-encoded; and the held-out pairs as a *.bin.
  source = tfds_builder.load(default_data.default_name())
  image_size = source[0][0].shape[:2]
  written = recordio.write_recordio(
      tmp_path / "train.rec", (_png_and_label(source, i) for i in range(len(source))), image_size)
  assert written == len(source)
  holdout = data.get_datasets(config.data).eval_sets["holdout"]
  bins = [_png(image) for pair in zip(holdout.images1, holdout.images2) for image in pair]
  pairs.write_bin(tmp_path / "holdout_pairs.bin", bins, holdout.issame)

  via_tfds = train.train_and_evaluate(config, str(tmp_path / "tfds_run"))
  config.data.update(name="recordio", path=str(tmp_path / "train.rec"),
                     eval_bins=(str(tmp_path / "holdout_pairs.bin"),))
  via_rec = train.train_and_evaluate(config, str(tmp_path / "rec_run"))

  assert via_rec["train_loss"] == via_tfds["train_loss"]
  assert via_rec["eval"]["holdout"] == via_tfds["eval"]["holdout"]
  assert via_rec["eval"]["holdout_pairs"] == via_rec["eval"]["holdout"]
  assert 0.5 < via_rec["eval"]["holdout"]["accuracy"] <= 1.0
  for want, got in zip(jax.tree.leaves(_final_state(tmp_path / "tfds_run")),
                       jax.tree.leaves(_final_state(tmp_path / "rec_run")), strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.slow
def test_on_orl_a_trained_model_beats_raw_pixels(shared_datasets, tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "arcjax.main", "--config=configs/default.py",
       f"--workdir={tmp_path}", "--config.data.name=folder",
       f"--config.data.path={shared_datasets / 'orl_faces'}",
       "--config.data.image_size=(56, 46)", "--config.data.num_holdout_identities=8",
       "--config.data.flip=True", "--config.train.steps=300", "--config.train.batch_size=64",
       "--config.loss.s=32", "--config.eval.every=0", "--config.angles.probe_size=0"],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env={**os.environ, "WANDB_MODE": "disabled", "XLA_FLAGS": ""})
  assert result.returncode == 0, result.stderr[-3000:]
  assert "raw-pixel cosine baseline: holdout accuracy" in result.stdout
  assert "final holdout: verification accuracy" in result.stdout
  assert "(raw pixels: accuracy" in result.stdout
  results = json.loads((tmp_path / "results.json").read_text())
  trained, pixels = results["eval"]["holdout"], results["pixel_baseline"]["holdout"]
  print(f"ORL held-out people: trained {trained}, raw pixels {pixels}")
  assert trained["accuracy"] > pixels["accuracy"] and trained["auc"] > pixels["auc"]

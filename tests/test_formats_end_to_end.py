"""The data formats end to end: a `.rec` and a `.bin` give the numbers of the embedded data,
on ORL's held-out people a trained model beats raw pixels, and ORL converted by the CLI trains
the paper's setting with only its path, steps and batch size given."""

import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from arcjax import data
from arcjax import train
from arcjax.data import omniglot, pairs, recordio
from configs import default

REPO = pathlib.Path(__file__).resolve().parents[1]
PATIENCE = 3600  # seconds: a hang guard, not a speed assertion (an IResNet-50 run here takes minutes)


def _png(image: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(out, format="PNG")
  return out.getvalue()


@pytest.mark.slow
def test_recordio_and_bin_files_give_the_numbers_of_the_embedded_data(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "disabled")
  config = default.get_config()
  config.train.update(steps=12, batch_size=64, log_every=4, checkpoint_every=12)
  config.update({"eval": {"every": 0, "batch_size": 500}, "angles": {"probe_size": 0, "every": 0}})
  config.data.max_pairs = 600

  # The embedded Omniglot as insightface's files: every example in the source's order
  # (grouped by identity), PNG-encoded; and the held-out pairs as a *.bin.
  source = omniglot.load()
  written = recordio.write_recordio(
      tmp_path / "rec" / "train.rec",
      ((_png(source.images[i]), int(source.labels[i])) for i in range(len(source))), (105, 105))
  assert written == len(source) == 4840
  holdout = data.get_datasets(config.data).eval_sets["holdout"]
  bins = [_png(holdout.images[i]) for pair in holdout.pairs for i in pair]
  pairs.write_bin(tmp_path / "holdout_pairs.bin", bins, holdout.issame)

  embedded = train.train_and_evaluate(config, str(tmp_path / "embedded_run"))
  config.data.update(name="recordio", path=str(tmp_path / "rec"),
                     eval_bins=(str(tmp_path / "holdout_pairs.bin"),))
  via_rec = train.train_and_evaluate(config, str(tmp_path / "rec_run"))

  assert via_rec["train_loss"] == embedded["train_loss"]
  assert via_rec["eval"]["holdout"] == embedded["eval"]["holdout"]
  assert via_rec["eval"]["holdout_pairs"] == via_rec["eval"]["holdout"]
  # AUC (no threshold grid) of 12 steps already beats raw pixels' on unseen characters.
  assert via_rec["eval"]["holdout"]["auc"] > via_rec["pixel_baseline"]["holdout"]["auc"]


def _main(workdir: pathlib.Path, *flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "arcjax.main", f"--workdir={workdir}", *flags],
                        cwd=REPO, capture_output=True, text=True, timeout=PATIENCE,
                        env={**os.environ, "WANDB_MODE": "disabled", "XLA_FLAGS": ""})


@pytest.mark.slow
def test_on_orl_a_trained_model_beats_raw_pixels(shared_datasets, tmp_path):
  result = _main(
      tmp_path, "--config=configs/default.py", "--config.data.name=folder",
      f"--config.data.path={shared_datasets / 'orl_faces'}",
      "--config.data.image_size=(56, 46)", "--config.data.num_holdout_identities=8",
      "--config.data.flip=True", "--config.eval.flip=True", "--config.train.steps=300",
      "--config.train.batch_size=64", "--config.loss.s=32", "--config.eval.every=0",
      "--config.angles.probe_size=0")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "final verification (step 300)" in result.stdout and "raw pixels (%)" in result.stdout
  results = json.loads((tmp_path / "results.json").read_text())
  trained, pixels = results["eval"]["holdout"], results["pixel_baseline"]["holdout"]
  print(f"ORL held-out people: trained {trained}, raw pixels {pixels}")
  assert trained["accuracy"] > pixels["accuracy"] and trained["auc"] > pixels["auc"]


@pytest.mark.slow
def test_orl_converted_by_the_cli_trains_the_papers_setting(shared_datasets, tmp_path):
  faces = tmp_path / "orl_112"
  converted = subprocess.run(
      [sys.executable, "-m", "arcjax.data.convert", str(shared_datasets / "orl_faces"),
       str(faces), "--size", "112", "--fit", "pad"],
      cwd=REPO, capture_output=True, text=True, timeout=PATIENCE)
  assert converted.returncode == 0, converted.stderr[-3000:]
  assert sorted(p.name for p in faces.glob("*.bin")) == ["holdout.bin"]
  paper = ("--config=configs/ablations.py:arcface,setting=paper",
           f"--config.data.path={faces}", "--config.train.steps=4")
  # The paper's batch of 512 does not fit 320 images: refused before anything compiles.
  refused = _main(tmp_path / "refused", *paper, "--config.train.batch_size=512")
  assert refused.returncode == 1 and "Traceback" not in refused.stderr
  assert "error: config.train.batch_size=512 is larger than the 320 training images" in (
      refused.stderr), refused.stderr[-2000:]
  assert not (tmp_path / "refused" / "checkpoints").exists()

  result = _main(tmp_path / "run", *paper, "--config.train.batch_size=16")
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  table = lines.index("final verification (step 4):")
  assert [line.split()[0] for line in lines[table + 1:table + 3]] == ["set", "holdout"]
  results = json.loads((tmp_path / "run" / "results.json").read_text())
  assert set(results["eval"]) == {"holdout"}  # the .bin beside train.rec, found by itself
  stats = results["angle_stats"]
  assert 0 < stats["intra2_deg"] < 180 and 0 < stats["inter2_deg"] < 180  # the labels file

"""The input-pipeline benchmark runs (`--smoke`) and prints its table; no speed is checked."""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_input_pipeline_smoke_prints_its_table():
  pytest.importorskip("grain")  # not in requirements.txt: only this benchmark uses it
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  result = subprocess.run([sys.executable, "-m", "benchmarks.input_pipeline", "--smoke"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert any(line.startswith("| pipeline | images/s | of (a) |") for line in lines), result.stdout
  rows = [line for line in lines if line.startswith(("| (a) `pipeline.batches`", "| grain"))]
  assert len(rows) == 5, result.stdout

"""The benchmarks run as documented: the device check's --smoke form, as CI runs it."""

import os
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_device_check_smoke_writes_its_three_tables(tmp_path):
  out = tmp_path / "device_check.txt"
  result = subprocess.run(["bash", "benchmarks/device_check.sh", "--smoke", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900,
                          env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  text = out.read_text()
  for title in ("## 1. head", "## 2. chunked loss", "## 3. train step"):
    assert title in text
  assert "| 1000 |" in text and "| 4096 |" in text  # one row each of the two loss tables
  assert "tiny_cnn" in text and "bfloat16" in text

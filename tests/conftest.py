"""Test set-up: 8 simulated CPU devices, and the shared real datasets."""

import os
import pathlib

# Must happen before JAX initialises its backend (i.e. before any test imports jax).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def shared_datasets() -> pathlib.Path:
  """`../shared/datasets` beside the checkout (ORL faces, Omniglot); skips where absent."""
  if not SHARED_DATASETS.is_dir():
    pytest.skip(f"real datasets not found at {SHARED_DATASETS} (see ../shared/datasets/README.md)")
  return SHARED_DATASETS

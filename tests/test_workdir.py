"""A run's workdir, without a run: checkpoints checked against the SHA-256 of their files, the
lock released whole, a workdir that is a file refused in one line."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arcjax import errors, workdir
from configs import default


def _state(scale: float) -> dict:
  return {"w": jnp.full((3, 4), scale, jnp.float32), "n": jnp.arange(5, dtype=jnp.int32)}


def _abstract(state: dict) -> dict:
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)


def _saved(tmp_path: pathlib.Path, steps=(1, 2)) -> pathlib.Path:
  """A workdir with checkpoints of `_state(step)` at `steps`, saved as a run saves them."""
  checkpoints = workdir.Checkpoints(workdir.as_path(tmp_path), keep=10)
  for step in steps:
    checkpoints.save(step, _state(float(step)), {"step": step})
  checkpoints.close()
  return tmp_path / workdir.CHECKPOINTS


def _restore_latest(tmp_path: pathlib.Path, like: dict | None = None):
  checkpoints = workdir.Checkpoints(workdir.as_path(tmp_path), keep=10)
  try:
    like = _state(0.0) if like is None else like
    return checkpoints.restore_latest(_abstract(like), jax.tree.map(lambda _: False, like))
  finally:
    checkpoints.close()


def _flip_a_byte(file: pathlib.Path) -> None:
  data = bytearray(file.read_bytes())
  data[len(data) // 2] ^= 0x01
  file.write_bytes(bytes(data))


def _largest_file(folder: pathlib.Path) -> pathlib.Path:
  return max((p for p in folder.rglob("*") if p.is_file() and p.name != workdir.CHECKSUMS),
             key=lambda p: p.stat().st_size)


def test_every_file_of_a_checkpoint_has_its_sha256_in_sha256sum_format(tmp_path):
  import hashlib  # pylint: disable=import-outside-toplevel
  folder = _saved(tmp_path) / "2"
  lines = (folder / workdir.CHECKSUMS).read_text().splitlines()
  listed = {line.split("  ", 1)[1]: line.split("  ", 1)[0] for line in lines}
  on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*")
             if p.is_file() and p.name != workdir.CHECKSUMS}
  assert set(listed) == on_disk and len(on_disk) > 3
  for name, digest in listed.items():
    assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest


def test_a_flipped_byte_is_damage_named_moved_aside_and_the_older_step_restored(tmp_path, capsys):
  checkpoints = _saved(tmp_path)
  file = _largest_file(checkpoints / "2")
  size = file.stat().st_size
  _flip_a_byte(file)
  assert file.stat().st_size == size
  state, meta = _restore_latest(tmp_path)
  assert meta["step"] == 1 and float(state["w"][0, 0]) == 1.0
  out = capsys.readouterr().out
  assert "checkpoint 2 in" in out and "does not match the SHA-256 recorded" in out, out
  assert sorted(p.name for p in checkpoints.iterdir()) == ["1"]
  assert [p.name.split("-")[0] for p in (tmp_path / workdir.DAMAGED_CHECKPOINTS).iterdir()
          if p.is_dir()] == ["2"]


def test_sums_never_written_after_orbax_committed_are_not_trusted(tmp_path, capsys):
  """A process killed between orbax's commit and the sums leaves a step that announces sums it
  does not have: it is not trusted unchecked."""
  checkpoints = _saved(tmp_path)
  (checkpoints / "2" / workdir.CHECKSUMS).unlink()
  _, meta = _restore_latest(tmp_path)
  assert meta["step"] == 1
  assert "SHA256SUMS was never written" in capsys.readouterr().out


def test_a_checkpoint_of_before_checksums_is_restored_with_a_note(tmp_path, capsys):
  checkpoints = _saved(tmp_path, steps=(1,))
  (checkpoints / "1" / workdir.CHECKSUMS).unlink()
  meta_file = checkpoints / "1" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  del meta["checksums"]
  meta_file.write_text(json.dumps(meta))
  _, meta = _restore_latest(tmp_path)
  assert meta["step"] == 1
  assert "restored unverified" in capsys.readouterr().out


def test_an_intact_checkpoint_that_does_not_fit_is_refused_and_stays(tmp_path):
  checkpoints = _saved(tmp_path)
  wider = {"w": jnp.zeros((3, 5), jnp.float32), "n": jnp.arange(5, dtype=jnp.int32)}
  with pytest.raises(errors.WorkdirError, match="checkpoint 2 in .* is intact"):
    _restore_latest(tmp_path, like=wider)
  assert sorted(p.name for p in checkpoints.iterdir()) == ["1", "2"]
  assert not (tmp_path / workdir.DAMAGED_CHECKPOINTS).exists()


def test_the_lock_is_left_empty_on_release_so_the_next_holder_takes_over_no_one(tmp_path, capsys):
  directory = workdir.as_path(tmp_path)
  workdir.RunLock(directory).acquire().release()
  workdir.RunLock(directory).acquire().release()
  assert "taking over" not in capsys.readouterr().out
  # A holder that died without releasing leaves its line: the next one says it took over.
  (tmp_path / workdir.LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "id": "x"}))
  workdir.RunLock(directory).acquire().release()
  assert "taking over the stale lock" in capsys.readouterr().out


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
  file = tmp_path / "run"
  file.write_text("not a folder")
  with pytest.raises(errors.WorkdirError, match="is a file, not a folder"):
    with workdir.open_run(workdir.as_path(file)):
      pass
  assert file.read_text() == "not a folder"


def test_open_run_writes_nothing_but_the_lock_before_record(tmp_path):
  directory = workdir.as_path(tmp_path / "run")
  with workdir.open_run(directory) as record:
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [workdir.LOCK]
    record(default.get_config())
  assert json.loads((tmp_path / "run" / workdir.CONFIG).read_text())["seed"] == 0
  np.testing.assert_equal((tmp_path / "run" / workdir.LOCK).read_text(), "")


def test_a_config_json_of_an_earlier_version_is_no_change():
  # Written before model.input_mean/input_std and train.init_from existed, and with the
  # former loss.preset label: it meant the requested config's values.
  earlier = {"loss": {"preset": "arcface", "m2": 0.5}, "model": {"name": "tiny_cnn"},
             "train": {"lr": 0.1}}
  requested = {"loss": {"m2": 0.5},
               "model": {"name": "tiny_cnn", "input_mean": 127.5, "input_std": 128.0},
               "train": {"lr": 0.1, "init_from": ""}}
  assert workdir.config_changes(earlier, requested) == []
  # A value an earlier run could not have had is a change.
  requested["model"]["input_std"] = 127.5
  assert [c.field for c in workdir.config_changes(earlier, requested)] == ["model.input_std"]
  # A field the requested config lacks is not made up for the stored one.
  assert workdir.config_changes({"seed": 0}, {"seed": 0}) == []

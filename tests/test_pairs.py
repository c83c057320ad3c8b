"""Verification *.bin files (safe unpickling) and deterministic open-set pair generation."""

import itertools
import os
import pathlib
import pickle
import struct
import subprocess
import sys

from etils.epath import testing as epath_testing
import numpy as np
import pytest

from arcjax import errors
from arcjax.data.pairs import (UnsafePickleError, bin_labels_path, make_verification_pairs, read_bin,
                               read_bin_labels, write_bin, write_bin_labels)

REPO = pathlib.Path(__file__).resolve().parents[1]


def _binstring(data: bytes) -> bytes:
  """Python 2's opcodes for a `str`: SHORT_BINSTRING below 256 bytes, else BINSTRING."""
  if len(data) < 256:
    return b"U" + bytes([len(data)]) + data
  return b"T" + struct.pack("<I", len(data)) + data


def _python2_pickle(bins: list[bytes], issame: list[bool]) -> bytes:
  """`pickle.dumps((bins, issame), 2)` as Python 2 writes it: images as `str` (SHORT_BINSTRING)."""
  out = b"\x80\x02]("  # PROTO 2, EMPTY_LIST, MARK
  out += b"".join(_binstring(b) for b in bins)
  out += b"e]("  # APPENDS, EMPTY_LIST, MARK
  out += b"".join(b"\x88" if x else b"\x89" for x in issame)
  return out + b"e\x86."  # APPENDS, TUPLE2, STOP


BINS = [b"\xff\xd8jpeg-a", b"\x89PNG-b", b"c" * 300, b"", b"\x00\x01", b"f"]
ISSAME = [True, False, True]


def test_round_trip(tmp_path):
  write_bin(tmp_path / "lfw.bin", BINS, np.array(ISSAME))
  bins, issame = read_bin(tmp_path / "lfw.bin")
  assert bins == BINS
  assert issame.dtype == bool and issame.tolist() == ISSAME
  raw = (tmp_path / "lfw.bin").read_bytes()
  assert raw.startswith(b"\x80\x02")  # protocol 2, readable by Python 2
  # What insightface's loader does gives the same content.
  assert pickle.loads(raw, encoding="bytes") == (BINS, ISSAME)


def test_reads_python2_pickle(tmp_path):
  (tmp_path / "agedb_30.bin").write_bytes(_python2_pickle(BINS, ISSAME))
  bins, issame = read_bin(tmp_path / "agedb_30.bin")
  assert bins == BINS and issame.tolist() == ISSAME


@pytest.mark.parametrize("protocol", [2, 4])
def test_reads_numpy_arrays(tmp_path, protocol):
  """Converters that keep `cv2.imencode` arrays and a bool array of issame."""
  bins = [np.frombuffer(b, np.uint8) for b in BINS]
  (tmp_path / "cfp_fp.bin").write_bytes(pickle.dumps((bins, np.array(ISSAME)), protocol=protocol))
  got, issame = read_bin(tmp_path / "cfp_fp.bin")
  assert got == BINS and issame.tolist() == ISSAME
  (tmp_path / "scalars.bin").write_bytes(pickle.dumps((BINS, [np.bool_(x) for x in ISSAME]), protocol))
  assert read_bin(tmp_path / "scalars.bin")[1].tolist() == ISSAME


class _Exploit:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_refuses_malicious_pickle(tmp_path):
  marker = tmp_path / "pwned"
  (tmp_path / "evil.bin").write_bytes(pickle.dumps(([_Exploit(marker)], []), protocol=2))
  with pytest.raises(UnsafePickleError, match=r"evil\.bin: refusing to unpickle (posix|os)\.system"):
    read_bin(tmp_path / "evil.bin")
  assert not marker.exists()
  # The exploit is real: an unrestricted load runs it.
  pickle.loads((tmp_path / "evil.bin").read_bytes())
  assert marker.exists()


@pytest.mark.parametrize("payload", [
    pickle.dumps(eval, protocol=2),
    b"\x80\x02c__builtin__\neval\nq\x00.",
    b"\x80\x02cnumpy\nload\nq\x00.",
    # _codecs.encode is allowed only for the latin-1 round trip that pickled bytes use.
    b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x04\x00\x00\x00zlib\x86R.",
])
def test_refuses_other_globals(tmp_path, payload):
  (tmp_path / "bad.bin").write_bytes(payload)
  with pytest.raises(UnsafePickleError, match="bad.bin"):
    read_bin(tmp_path / "bad.bin")


@pytest.mark.parametrize("content, message", [
    (([b"a"], [True]), r"1 images for 1 pairs"),
    (([b"a", b"b"],), r"expected a pickled \(bins, issame_list\)"),
    (([b"a", 3], [True]), r"bins\[1\] is int, not image bytes"),
    (([b"a", b"b"], [1]), r"issame_list must be a list of bools"),
])
def test_wrong_shapes(tmp_path, content, message):
  (tmp_path / "x.bin").write_bytes(pickle.dumps(content, protocol=2))
  with pytest.raises(ValueError, match=message):
    read_bin(tmp_path / "x.bin")


def test_not_a_pickle(tmp_path):
  (tmp_path / "x.bin").write_bytes(b"\xff\xd8 a jpeg, not a pickle")
  with pytest.raises(ValueError, match=r"x\.bin: not a verification \.bin pickle"):
    read_bin(tmp_path / "x.bin")


def test_write_bin_errors(tmp_path):
  with pytest.raises(ValueError, match="3 images for 1 pairs"):
    write_bin(tmp_path / "x.bin", [b"a", b"b", b"c"], [True])
  with pytest.raises(ValueError, match=r"bins\[1\] is str"):
    write_bin(tmp_path / "x.bin", [b"a", "b"], [True])
  with pytest.raises(ValueError, match="issame must be"):
    write_bin(tmp_path / "x.bin", [b"a", b"b"], [1])


# --- make_verification_pairs -------------------------------------------------------------------


def _brute_force(labels):
  """All unordered (i < j) same and different pairs, by enumeration."""
  same, diff = set(), set()
  for i, j in itertools.combinations(range(len(labels)), 2):
    (same if labels[i] == labels[j] else diff).add((i, j))
  return same, diff


def _as_set(pairs):
  return {(min(i, j), max(i, j)) for i, j in pairs.tolist()}


def _check(labels, pairs, issame, num_folds):
  labels = np.asarray(labels)
  assert pairs.dtype == np.int64 and pairs.shape == (len(issame), 2) and issame.dtype == bool
  assert np.all(pairs >= 0) and np.all(pairs < len(labels)) and np.all(pairs[:, 0] != pairs[:, 1])
  np.testing.assert_array_equal(issame, labels[pairs[:, 0]] == labels[pairs[:, 1]])
  assert len(_as_set(pairs)) == len(pairs)  # no pair twice, in either order
  k = len(pairs) // (2 * num_folds)
  assert len(pairs) == 2 * num_folds * k
  for fold in issame.reshape(num_folds, 2 * k):
    assert fold[:k].all() and not fold[k:].any()  # k same, then k different (LFW's order)


def test_pairs_lfw_size():
  labels = np.random.default_rng(0).integers(0, 300, 5000)
  pairs, issame = make_verification_pairs(labels, seed=3)
  assert len(pairs) == 6000
  _check(labels, pairs, issame, 10)


def test_pairs_deterministic():
  labels = np.repeat(np.arange(12), 7)
  a = make_verification_pairs(labels, seed=5)
  b = make_verification_pairs(labels, seed=5)
  c = make_verification_pairs(labels, seed=6)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])


def test_pairs_use_all_same_pairs_when_scarce():
  """4 identities × 5 images: S = 40 same pairs, so 4 per fold uses every one exactly once."""
  labels = np.repeat([3, 9, 1, 4], 5)
  np.random.default_rng(0).shuffle(labels)
  pairs, issame = make_verification_pairs(labels, seed=0)
  _check(labels, pairs, issame, 10)
  same, diff = _brute_force(labels)
  assert len(pairs) == 80 and _as_set(pairs[issame]) == same
  assert _as_set(pairs[~issame]) <= diff


def test_pairs_use_all_different_pairs_when_scarce():
  """Sizes (1, 1, 6): D = 13 different pairs, S = 15; 13 folds of one pair each use all of D."""
  labels = np.array([2, 0, 2, 2, 1, 2, 2, 2])
  pairs, issame = make_verification_pairs(labels, num_folds=13, seed=1)
  _check(labels, pairs, issame, 13)
  same, diff = _brute_force(labels)
  assert _as_set(pairs[~issame]) == diff and _as_set(pairs[issame]) < same


def test_pairs_cover_all_pairs_uniformly_over_seeds():
  """Every same (different) pair of a small set is drawn about equally often across seeds."""
  labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
  same, diff = _brute_force(labels)
  counts = {pair: 0 for pair in same | diff}
  for seed in range(400):
    pairs, _ = make_verification_pairs(labels, num_folds=2, max_pairs=4, seed=seed)
    for pair in _as_set(pairs):
      counts[pair] += 1
  # Each draw takes 2 of |S| = 10 same and 2 of |D| = 26 different pairs: expected 80 and ~30.8.
  same_counts = np.array([counts[p] for p in same])
  diff_counts = np.array([counts[p] for p in diff])
  assert abs(same_counts.mean() - 80) < 1e-9 and abs(diff_counts.mean() - 800 / 26) < 1e-9
  assert same_counts.min() > 50 and same_counts.max() < 110
  assert diff_counts.min() > 12 and diff_counts.max() < 52


def test_pairs_small_data_and_limits():
  labels = np.repeat(np.arange(10), 10)  # an ORL-sized holdout: S = 450, D = 4500
  pairs, issame = make_verification_pairs(labels, seed=0)
  assert len(pairs) == 900
  _check(labels, pairs, issame, 10)
  pairs, issame = make_verification_pairs(labels, max_pairs=205, seed=0)
  assert len(pairs) == 200  # 10 per fold per kind, rounded down
  pairs, issame = make_verification_pairs(np.array([0, 0, 1]), num_folds=1, seed=0)
  assert pairs.shape == (2, 2) and issame.tolist() == [True, False]


def test_pairs_big_identity_is_cheap():
  """Two classes × 7000 (a Fashion-MNIST holdout): 49 M same pairs, sampled without enumerating."""
  labels = np.repeat([0, 1], 7000)
  pairs, issame = make_verification_pairs(labels, seed=0)
  assert len(pairs) == 6000
  _check(labels, pairs, issame, 10)


@pytest.mark.parametrize("labels, kwargs, message", [
    (np.zeros(10, int), {}, "need at least 2 identities"),
    (np.arange(10), {}, "0 same-identity"),
    (np.array([0, 0, 1, 1]), {}, "fewer than one of each per fold for 10 folds"),
    (np.array([0.0, 1.0]), {}, "labels must be"),
    (np.zeros((2, 2), int), {}, "labels must be"),
    (np.array([0, 0, 1]), {"num_folds": 0}, "num_folds=0"),
    (np.array([0, 0, 1]), {"max_pairs": 19}, "max_pairs=19"),
])
def test_pairs_errors(labels, kwargs, message):
  with pytest.raises(ValueError, match=message):
    make_verification_pairs(labels, seed=0, **kwargs)


# --- errors, epath paths, absurd allocations ------------------------------------------------------


def test_errors_are_data_errors_and_keep_their_bases():
  assert issubclass(UnsafePickleError, errors.DataError)
  assert issubclass(UnsafePickleError, pickle.UnpicklingError)


def _gs_mock(tmp_path, opened):
  """epath mocked so that gs://bucket/NAME is tmp_path/NAME (and records what was opened)."""

  def local(path):
    return tmp_path / str(path).removeprefix("gs://bucket/")

  def fake_open(_, path, mode="r", **kwargs):
    opened.append(str(path))
    return open(local(path), mode)

  return epath_testing.mock_epath(open=fake_open, exists=lambda _, path: local(path).exists())


def test_reads_through_epath(tmp_path):
  write_bin(tmp_path / "lfw.bin", BINS, ISSAME)
  write_bin_labels(tmp_path / "lfw.bin", [0, 0, 1, 2, 3, 3], ISSAME)
  opened = []
  with _gs_mock(tmp_path, opened):
    bins, issame = read_bin("gs://bucket/lfw.bin")
    labels = read_bin_labels("gs://bucket/lfw.bin")
  assert bins == BINS and issame.tolist() == ISSAME
  assert labels.tolist() == [0, 0, 1, 2, 3, 3]
  assert opened == ["gs://bucket/lfw.bin", "gs://bucket/lfw.labels.npy", "gs://bucket/lfw.bin"]


_BIG = 10**12  # 931 GiB of uint8


def _long(n: int) -> bytes:
  """Pickle's LONG1 opcode for a non-negative int."""
  data = n.to_bytes(n.bit_length() // 8 + 1, "little")
  return b"\x8a" + bytes([len(data)]) + data


def _reconstruct_pickle(num_elements: int) -> bytes:
  """`([numpy _reconstruct(ndarray, (num_elements,), 'b')], [])`: NumPy allocates the shape at once."""
  return (b"\x80\x02]cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _long(num_elements)
          + b"\x85X\x01\x00\x00\x00b\x87Ra]\x86.")


def _setstate_pickle(array: np.ndarray, num_elements: int) -> bytes:
  """`([array], [])` with the shape in the array's state (pickle's BUILD) replaced by `num_elements`."""
  data = pickle.dumps(([array], []), protocol=2)
  shape = b"K\x01K" + bytes([len(array)]) + b"\x85"  # the state's version 1 and shape (n,)
  assert data.count(shape) == 1
  return data.replace(shape, b"K\x01" + _long(num_elements) + b"\x85")


@pytest.mark.parametrize("payload", [
    _reconstruct_pickle(10**7),
    _setstate_pickle(np.zeros(3, np.uint8), 10**7),
    # NumPy allocates an object array's state shape before it checks the data's length.
    _setstate_pickle(np.array([b"x", b"y"], dtype=object), 10**7),
], ids=["reconstruct", "setstate", "object_setstate"])
def test_refuses_arrays_larger_than_the_file(tmp_path, payload):
  (tmp_path / "big.bin").write_bytes(payload)
  with pytest.raises(UnsafePickleError, match=rf"big\.bin: an array of shape \(10000000,\) .* is larger "
                                              rf"than the {len(payload)}-byte file could hold"):
    read_bin(tmp_path / "big.bin")


def test_refuses_in_a_child_what_would_exhaust_memory_or_crash(tmp_path):
  """10**12-element requests (931 GiB), and an object array with a short list, which crashes NumPy.

  In a child process that cannot allocate even 4 GiB, so that a regression fails this test
  rather than the machine or the test run.
  """
  payloads = {"reconstruct": _reconstruct_pickle(_BIG),
              "setstate": _setstate_pickle(np.array([b"x", b"y"], dtype=object), _BIG),
              "short_list": _setstate_pickle(np.array([b"x", b"y"], dtype=object), 5)}
  for name, payload in payloads.items():
    (tmp_path / f"{name}.bin").write_bytes(payload)
  script = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))\n"
            "from arcjax.data.pairs import read_bin, UnsafePickleError\n"
            "for path in sys.argv[1:]:\n"
            "  try:\n"
            "    read_bin(path)\n"
            "  except UnsafePickleError as error:\n"
            "    print(error, flush=True)\n")
  result = subprocess.run(
      [sys.executable, "-c", script, *(str(tmp_path / f"{name}.bin") for name in payloads)],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
      env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [
      f"{tmp_path}/reconstruct.bin: an array of shape (1000000000000,) and dtype int8 "
      f"(1000000000000 bytes) is larger than the {len(payloads['reconstruct'])}-byte file could hold",
      f"{tmp_path}/setstate.bin: an array of shape (1000000000000,) and dtype object "
      f"(8000000000000 bytes) is larger than the {len(payloads['setstate'])}-byte file could hold",
      f"{tmp_path}/short_list.bin: an object array of 5 elements needs a list of 5; got list of 2"]


def test_refuses_a_dtype_that_claims_objects(tmp_path):
  """A void dtype whose pickled flags say it holds objects: NumPy would read its bytes as pointers."""
  data = pickle.dumps(([np.zeros(2, "V8")], []), protocol=2)
  flags = b"K\x08K\x01K\x00t"  # the dtype state's itemsize 8, alignment 1, flags 0
  assert data.count(flags) == 1
  (tmp_path / "flags.bin").write_bytes(data.replace(flags, b"K\x08K\x01K\x1ft"))
  with pytest.raises(UnsafePickleError, match=r"flags\.bin: dtype .*V8.* holding objects"):
    read_bin(tmp_path / "flags.bin")


def test_legitimate_arrays_still_read(tmp_path):
  """A large image array (what cv2.imencode converters store) is well within its file's size."""
  bins = [np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8), np.zeros(0, np.uint8)]
  (tmp_path / "ok.bin").write_bytes(pickle.dumps((bins, np.array([True])), protocol=4))
  got, issame = read_bin(tmp_path / "ok.bin")
  assert got == [b.tobytes() for b in bins] and issame.tolist() == [True]
  assert type(issame) is np.ndarray
  # The images as an object array of bytes: its list has exactly its element count.
  (tmp_path / "objects.bin").write_bytes(pickle.dumps((np.array(BINS, dtype=object), ISSAME)))
  assert read_bin(tmp_path / "objects.bin")[0] == BINS


# --- writers never clobber; labels beside a .bin ----------------------------------------------------


def test_write_bin_refuses_an_existing_file(tmp_path):
  write_bin(tmp_path / "lfw.bin", BINS, ISSAME)
  with pytest.raises(errors.DataError, match=r"lfw\.bin already exists; refusing to overwrite it"):
    write_bin(tmp_path / "lfw.bin", BINS[:2], ISSAME[:1])
  assert read_bin(tmp_path / "lfw.bin")[0] == BINS
  write_bin(tmp_path / "lfw.bin", BINS[:2], ISSAME[:1], overwrite=True)
  assert read_bin(tmp_path / "lfw.bin")[0] == BINS[:2]
  assert sorted(path.name for path in tmp_path.iterdir()) == ["lfw.bin"]


def test_bin_labels_round_trip(tmp_path):
  write_bin(tmp_path / "x.bin", BINS, ISSAME)
  assert read_bin_labels(tmp_path / "x.bin") is None
  write_bin_labels(tmp_path / "x.bin", np.array([5, 5, 1, 2, 0, 0], np.int32), ISSAME)
  assert bin_labels_path(tmp_path / "x.bin").name == "x.labels.npy"
  labels = np.load(tmp_path / "x.labels.npy")  # a plain .npy
  assert labels.dtype == np.int64 and labels.tolist() == [5, 5, 1, 2, 0, 0]
  np.testing.assert_array_equal(read_bin_labels(tmp_path / "x.bin"), labels)
  with pytest.raises(errors.DataError, match=r"x\.labels\.npy already exists"):
    write_bin_labels(tmp_path / "x.bin", [5, 5, 1, 2, 0, 0], ISSAME)


@pytest.mark.parametrize("labels, message", [
    (np.array([0, 0, 1, 2]), r"4 labels for the 6 images of 3 pairs"),
    (np.array([0, 0, 1, 2, 3, 4]), r"pair 2 has labels 3, 4 but issame True"),
    (np.array([0, 1, 1, 2, 3, 3]), r"pair 0 has labels 0, 1 but issame True"),
    (np.array([0, 0, 1, 1, 3, 3]), r"pair 1 has labels 1, 1 but issame False"),
    (np.array([0.0, 0, 1, 2, 3, 3]), r"labels must be \(2N,\) integers"),
    (np.array([-1, -1, 1, 2, 3, 3]), r"label -1 is negative"),
])
def test_bin_labels_checked_against_the_bin(tmp_path, labels, message):
  write_bin(tmp_path / "x.bin", BINS, ISSAME)
  np.save(tmp_path / "x.labels.npy", labels)
  with pytest.raises(errors.DataError, match=r"x\.labels\.npy: " + message):
    read_bin_labels(tmp_path / "x.bin")
  with pytest.raises(errors.DataError, match=message):
    write_bin_labels(tmp_path / "y.bin", labels, ISSAME)


def test_bin_labels_never_unpickle(tmp_path):
  write_bin(tmp_path / "x.bin", BINS, ISSAME)
  np.save(tmp_path / "x.labels.npy", np.array([_Exploit(tmp_path / "pwned")] * 6, dtype=object),
          allow_pickle=True)
  with pytest.raises(errors.DataError, match=r"x\.labels\.npy: not a \.npy array of labels"):
    read_bin_labels(tmp_path / "x.bin")
  assert not (tmp_path / "pwned").exists()

"""Verification *.bin files (safe unpickling) and deterministic open-set pair generation."""

import itertools
import os
import pickle
import struct

import numpy as np
import pytest

from arcjax.data.pairs import UnsafePickleError, make_verification_pairs, read_bin, write_bin


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

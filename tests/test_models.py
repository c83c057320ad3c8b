"""Backbones: parameter counts against published and hand-derived figures, shapes,
dtypes, BatchNorm train/eval behaviour, dropout's rng, and image normalisation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arcjax.models import MODELS, get_model, normalize_images

_STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3)}


def _shapes(model, shape):
  """Variables of `model` for inputs of `shape`, as ShapeDtypeStructs (no compute)."""
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                        jax.ShapeDtypeStruct(shape, jnp.float32))


def _count(tree) -> int:
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def _iresnet_count(stages, d: int, in_channels: int = 3, out_hw: int = 7) -> int:
  """IResNet parameters counted by hand: convs have no bias, BN has scale+bias
  (2 per channel), PReLU 1 per channel, the last BN only a bias."""
  n = 9 * in_channels * 64 + 2 * 64 + 64  # stem conv, BN, PReLU
  c_in = 64
  for blocks, c in zip(stages, (64, 128, 256, 512)):
    for b in range(blocks):
      cin = c_in if b == 0 else c
      n += 2 * cin + 9 * cin * c + 2 * c + c + 9 * c * c + 2 * c
      if b == 0:  # stride-2 first block: 1×1 conv + BN shortcut
        n += cin * c + 2 * c
    c_in = c
  return n + 2 * 512 + (512 * out_hw * out_hw * d + d) + d


@pytest.mark.parametrize("depth,published", [(50, 43.6e6), (100, 65.2e6)])
def test_iresnet_params_within_1pct_of_published(depth, published):
  variables = _shapes(get_model(f"iresnet{depth}", embedding_dim=512), (1, 112, 112, 3))
  n = _count(variables["params"])
  assert abs(n - published) / published < 0.01, n
  # The FC sees a 7×7×512 map: 112×112 is halved (ceil) by each of the four stages.
  assert variables["params"]["fc"]["kernel"].shape == (7 * 7 * 512, 512)


@pytest.mark.parametrize("depth", [18, 34, 50, 100])
def test_iresnet_params_match_hand_count(depth):
  variables = _shapes(get_model(f"iresnet{depth}", embedding_dim=512), (1, 112, 112, 3))
  assert _count(variables["params"]) == _iresnet_count(_STAGES[depth], 512)


@pytest.mark.parametrize("hw,out_hw", [((28, 28), (2, 2)), ((112, 96), (7, 6)), ((16, 16), (1, 1))])
def test_iresnet_any_input_size_and_channels(hw, out_hw):
  model = get_model("iresnet18", embedding_dim=64)
  variables = _shapes(model, (2, *hw, 1))
  assert variables["params"]["fc"]["kernel"].shape == (512 * out_hw[0] * out_hw[1], 64)
  assert variables["params"]["stem_conv"]["kernel"].shape == (3, 3, 1, 64)


def test_mobilefacenet_params_near_paper():
  variables = _shapes(get_model("mobilefacenet", embedding_dim=128), (1, 112, 112, 3))
  n = _count(variables["params"])
  # Chen et al. (2018) report 0.99 M for the 128-d model, rounded to 0.5%, without saying
  # whether the ~27 k BN/PReLU parameters are counted (ours: 1.003 M with them, 0.976 M
  # without); 2% covers both readings and still catches a missing or doubled block
  # (the smallest bottleneck, 64 → 64 with t=2, has ~20 k parameters).
  assert abs(n - 0.99e6) / 0.99e6 < 0.02, n
  # GDConv: one 7×7 depthwise filter per channel over the whole 7×7 map of 112×112 faces.
  assert variables["params"]["gdconv"]["conv"]["kernel"].shape == (7, 7, 1, 512)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_output_shape_and_dtype_abstract(name):
  for dtype in (jnp.float32, jnp.bfloat16):
    model = get_model(name, embedding_dim=128, dtype=dtype)
    x = jax.ShapeDtypeStruct((2, 112, 112, 3), jnp.float32)
    variables = _shapes(model, x.shape)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    out = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
    assert (out.shape, out.dtype) == ((2, 128), jnp.float32)


@pytest.mark.parametrize("name,shape", [("tiny_cnn", (3, 28, 28, 1)),
                                        ("mobilefacenet", (3, 24, 20, 3)),
                                        ("iresnet18", (3, 16, 16, 3))])
def test_forward_runs_small_input(name, shape):
  model = get_model(name, embedding_dim=32)
  x = jax.random.normal(jax.random.key(1), shape)
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
  out = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  assert (out.shape, out.dtype) == ((3, 32), jnp.float32)
  assert np.all(np.isfinite(out)) and np.std(out) > 0


def _tiny(**kwargs):
  model = get_model("tiny_cnn", embedding_dim=16, **kwargs)
  x = jax.random.normal(jax.random.key(1), (8, 28, 28, 1))
  variables = model.init(jax.random.key(0), x, train=False)
  return model, variables, x


def test_bfloat16_compute_close_to_float32():
  model32, variables, x = _tiny()
  model16 = get_model("tiny_cnn", embedding_dim=16, dtype=jnp.bfloat16)

  def embed(m):
    return jax.jit(functools.partial(m.apply, train=True, mutable=["batch_stats"]))(variables, x)[0]

  out32, out16 = embed(model32), embed(model16)
  assert out16.dtype == jnp.float32
  diff = np.linalg.norm(np.asarray(out16) - np.asarray(out32))
  # bfloat16 keeps 8 mantissa bits (0.4% per rounding); ~10 roundings in a row → a few %.
  assert diff / np.linalg.norm(out32) < 0.03, diff / np.linalg.norm(out32)
  assert diff > 0  # the compute really ran in bfloat16


def test_batchnorm_train_uses_batch_stats_and_updates_them():
  model, variables, x = _tiny()
  (out, state) = model.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"],
                             capture_intermediates=True)
  z = np.asarray(state["intermediates"]["fc"]["__call__"][0], np.float64)  # (B, 16) FC output
  out = np.asarray(out, np.float64)
  # Train mode: the last BN (bias 0, no scale) normalises with the batch's own statistics.
  np.testing.assert_allclose(out, (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5), atol=1e-4)
  # Running stats move 10% of the way from their init (0, 1) to the biased batch stats.
  new = state["batch_stats"]["features"]
  np.testing.assert_allclose(new["mean"], 0.1 * z.mean(0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new["var"], 0.9 + 0.1 * z.var(0), rtol=1e-4)
  # Eval mode uses the running stats, here still (0, 1).
  out_eval, state = model.apply(variables, x, train=False, mutable=["intermediates"],
                                capture_intermediates=True)
  z = np.asarray(state["intermediates"]["fc"]["__call__"][0], np.float64)
  np.testing.assert_allclose(out_eval, z / np.sqrt(1 + 1e-5), rtol=1e-5, atol=1e-5)


def test_dropout_uses_dropout_rng():
  model, variables, x = _tiny(dropout=0.5)
  no_drop = get_model("tiny_cnn", embedding_dim=16, dropout=0.0)

  def dropped(m, key=None):
    rngs = {} if key is None else {"dropout": key}
    _, state = m.apply(variables, x, train=True, rngs=rngs,
                       mutable=["batch_stats", "intermediates"], capture_intermediates=True)
    return np.asarray(state["intermediates"]["Dropout_0"]["__call__"][0])

  kept = dropped(no_drop)
  a, b = dropped(model, jax.random.key(1)), dropped(model, jax.random.key(2))
  np.testing.assert_array_equal(a, dropped(model, jax.random.key(1)))
  assert not np.array_equal(a, b)
  # Inverted dropout: each unit is 0 or 2× its value, about half of them 0.
  zero = a == 0
  np.testing.assert_allclose(a[~zero], 2 * kept[~zero], rtol=1e-6)
  assert 0.35 < zero.mean() < 0.65
  with pytest.raises(Exception, match="dropout"):
    model.apply(variables, x, train=True, mutable=["batch_stats"])
  # Eval mode: no rng needed, no dropout.
  np.testing.assert_array_equal(model.apply(variables, x, train=False),
                                no_drop.apply(variables, x, train=False))


@pytest.mark.parametrize("mean_std", [(127.5, 128.0), (127.5, 127.5), (0.0, 1.0)])
def test_normalize_images_matches_numpy(mean_std):
  pixels = np.arange(256, dtype=np.uint8).reshape(2, 8, 16, 1)
  out = normalize_images(pixels, mean_std)
  assert out.dtype == jnp.float32
  mean, std = mean_std
  np.testing.assert_allclose(out, (pixels.astype(np.float64) - mean) / std, rtol=1e-7,
                             atol=1e-7)
  with pytest.raises(ValueError, match="uint8"):
    normalize_images(pixels.astype(np.float32), mean_std)


def test_the_configured_normalisation_reaches_training_and_inference():
  from configs import default  # pylint: disable=import-outside-toplevel
  from arcjax import errors, inference, models  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  assert models.normalization(config.model) == (127.5, 128.0)
  config.model.update(input_mean=100.0, input_std=50.0, embedding_dim=8)
  embed = inference.embedder(config.model)
  model = models.make_model(config.model)
  pixels = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 1)).astype(np.uint8)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)), train=False)
  expected = model.apply(variables, (pixels.astype(np.float32) - 100.0) / 50.0, train=False)
  np.testing.assert_allclose(embed(variables, pixels), expected, rtol=1e-5, atol=1e-6)
  for bad in ({"input_std": 0.0}, {"input_std": -1.0}, {"input_mean": float("nan")}):
    config = default.get_config()
    config.model.update(**bad)
    with pytest.raises(errors.ConfigError, match=f"config.model.{next(iter(bad))}"):
      models.check_config(config.model)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="iresnet50.*tiny_cnn"):
    get_model("resnet50")
  model, variables, x = _tiny()
  with pytest.raises(ValueError, match="uint8"):
    model.apply(variables, jnp.zeros((1, 28, 28, 1), jnp.uint8), train=False)
  with pytest.raises(ValueError, match=r"\(28, 28, 1\)"):
    model.apply(variables, jnp.zeros((28, 28, 1)), train=False)

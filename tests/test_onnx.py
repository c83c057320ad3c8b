"""ONNX in and out: insightface-style graphs built here as torch exports them, imported against
onnxruntime on the same file; every backbone exported against its Flax module; round trips
through a trained Omniglot run and an imported model; fine-tuning from either (init_from).

The graphs are built with onnx.helper from torch-layout weights (OIHW kernels, (out, in) FC,
NCHW flatten) with random weights and random BatchNorm statistics, BN folded into each conv
that precedes it as torch's eval-mode export folds it, node names as torch writes them: an
independent description of insightface's iresnet and mobilefacenet, not arcjax's emitter.
"""

import collections
import functools
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from arcjax import errors, export, from_onnx, inference, models, train
from arcjax.models import onnx_export, onnx_import

REPO = pathlib.Path(__file__).resolve().parents[1]
MIN_COSINE = 0.99999


class _TorchLike:
  """A graph written as torch.onnx.export writes an eval-mode model (BN folded into convs)."""

  def __init__(self, seed: int):
    self.rng = np.random.default_rng(seed)
    self.nodes, self.inits = [], []

  def const(self, value) -> str:
    name = f"onnx::{len(self.inits)}"
    self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
    return name

  def node(self, op, inputs, name, **attrs) -> str:
    out = f"/{name}/{op}_output_0"
    self.nodes.append(helper.make_node(op, inputs, [out], name=f"/{name}/{op}", **attrs))
    return out

  def bn_stats(self, c):
    return (self.rng.uniform(0.5, 1.5, c), self.rng.normal(0, 0.2, c), self.rng.normal(0, 0.3, c),
            self.rng.uniform(0.5, 2.0, c))

  def conv_bn(self, x, name, c_in, c_out, k, stride=1, pad=0, groups=1):
    """Conv(no bias) + BatchNorm2d, folded as torch folds them: W·γ/σ, β − μγ/σ."""
    w = self.rng.normal(0, 1 / np.sqrt(c_in // groups * k * k), (c_out, c_in // groups, k, k))
    gamma, beta, mean, var = self.bn_stats(c_out)
    a = gamma / np.sqrt(var + 1e-5)
    return self.node("Conv", [x, self.const(w * a[:, None, None, None]), self.const(beta - mean * a)],
                     name, kernel_shape=[k, k], strides=[stride] * 2, pads=[pad] * 4,
                     group=groups, dilations=[1, 1])

  def bn(self, x, name, c, eps=1e-5, frozen_scale=False):
    gamma, beta, mean, var = self.bn_stats(c)
    if frozen_scale:
      gamma = np.ones(c)
    return self.node("BatchNormalization", [x, *map(self.const, (gamma, beta, mean, var))], name,
                     epsilon=eps)

  def prelu(self, x, name, c):
    return self.node("PRelu", [x, self.const(self.rng.uniform(0, 0.5, (c, 1, 1)))], name)

  def model(self, shape: tuple[int, int, int], d: int) -> onnx.ModelProto:
    self.nodes[-1].output[0] = "fc1"
    c, h, w = shape
    graph = helper.make_graph(
        self.nodes, "torch_jit", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT,
                                                                ["None", c, h, w])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["None", d])], self.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    proto.ir_version = 6
    onnx.checker.check_model(proto)
    return proto


def insightface_iresnet(stages=(2, 2, 2, 2), size=32, d=32, seed=0) -> onnx.ModelProto:
  """insightface's iresnet (arcface_torch/backbones/iresnet.py) as torch exports it."""
  g = _TorchLike(seed)
  x = g.prelu(g.conv_bn("input.1", "conv1", 3, 64, 3, 1, 1), "prelu", 64)
  c_in, hw = 64, size
  for layer, (blocks, planes) in enumerate(zip(stages, (64, 128, 256, 512))):
    for block in range(blocks):
      name, stride = f"layer{layer + 1}/{block}", 2 if block == 0 else 1
      out = g.bn(x, f"{name}/bn1", c_in)
      out = g.prelu(g.conv_bn(out, f"{name}/conv1", c_in, planes, 3, 1, 1), f"{name}/prelu",
                    planes)
      out = g.conv_bn(out, f"{name}/conv2", planes, planes, 3, stride, 1)
      identity = (g.conv_bn(x, f"{name}/downsample", c_in, planes, 1, stride, 0)
                  if block == 0 else x)
      x, c_in = g.node("Add", [out, identity], f"{name}/add"), planes
    hw = (hw - 1) // 2 + 1
  x = g.node("Flatten", [g.bn(x, "bn2", 512)], "flatten", axis=1)
  fc = g.rng.normal(0, 1 / np.sqrt(512 * hw * hw), (d, 512 * hw * hw))
  x = g.node("Gemm", [x, g.const(fc), g.const(g.rng.normal(0, 0.1, d))], "fc", alpha=1.0,
             beta=1.0, transB=1)
  g.bn(x, "features", d, frozen_scale=True)
  return g.model((3, size, size), d)


def insightface_mobilefacenet(scale=2, blocks=(1, 4, 6, 2), size=32, d=16,
                              seed=1) -> onnx.ModelProto:
  """insightface's arcface_torch mobilefacenet as torch exports it: `x.view(x.size(0), -1)` as a
  Shape/Gather/Unsqueeze/Concat/Reshape chain, Linear(bias=False) as MatMul, a BN1d with a learnt
  scale and torch's default eps; the GDC's kernel the last map's size (7×7 at 112)."""
  g = _TorchLike(seed)

  def conv_block(x, name, c_in, c_out, k=1, stride=1, pad=0, groups=1, linear=False):
    x = g.conv_bn(x, name, c_in, c_out, k, stride, pad, groups)
    return x if linear else g.prelu(x, name, c_out)

  def depthwise(x, name, c_in, c_out, groups, stride, residual):
    y = conv_block(x, f"{name}/0", c_in, groups)
    y = conv_block(y, f"{name}/1", groups, groups, 3, stride, 1, groups)
    y = conv_block(y, f"{name}/2", groups, c_out, linear=True)
    return g.node("Add", [x, y], f"{name}/add") if residual else y

  hw = (size - 1) // 2 + 1
  x = conv_block("input.1", "layers.0", 3, 64 * scale, 3, 2, 1)
  if blocks[0] == 1:
    x = conv_block(x, "layers.1", 64 * scale, 64 * scale, 3, 1, 1, 64)
  else:
    for i in range(blocks[0]):
      x = depthwise(x, f"layers.1/{i}", 64 * scale, 64 * scale, 128, 1, True)
  plan = [(64, 64, 128, 2, 1), (64, 64, 128, 1, blocks[1]), (64, 128, 256, 2, 1),
          (128, 128, 256, 1, blocks[2]), (128, 128, 512, 2, 1), (128, 128, 256, 1, blocks[3])]
  for i, (c_in, c_out, groups, stride, repeats) in enumerate(plan):
    for r in range(repeats):
      x = depthwise(x, f"layers.{i + 2}/{r}", c_in * scale, c_out * scale, groups, stride,
                    stride == 1)
    if stride == 2:
      hw = (hw - 1) // 2 + 1
  x = conv_block(x, "conv_sep", 128 * scale, 512)
  x = conv_block(x, "features.0", 512, 512, hw, 1, 0, 512, linear=True)
  shape = g.node("Shape", [x], "features.1/shape")
  g.inits += [numpy_helper.from_array(np.array(0, np.int64), "zero"),
              numpy_helper.from_array(np.array([-1], np.int64), "minus_one")]
  batch = g.node("Gather", [shape, "zero"], "features.1/gather", axis=0)
  batch = g.node("Unsqueeze", [batch], "features.1/unsqueeze", axes=[0])
  target = g.node("Concat", [batch, "minus_one"], "features.1/concat", axis=0)
  x = g.node("Reshape", [x, target], "features.1/reshape")
  x = g.node("MatMul", [x, g.const(g.rng.normal(0, 1 / np.sqrt(512), (512, d)))], "features.2")
  g.bn(x, "features.3", d)
  return g.model((3, size, size), d)


def _cosines(a, b) -> np.ndarray:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _onnxruntime(proto_or_path, pixels_nhwc: np.ndarray, normalization=None) -> np.ndarray:
  """onnxruntime's output on uint8 NHWC images, normalised outside the graph if given."""
  data = proto_or_path.SerializeToString() if isinstance(proto_or_path, onnx.ModelProto) else (
      pathlib.Path(proto_or_path).read_bytes())
  blob = pixels_nhwc.transpose(0, 3, 1, 2).astype(np.float32)
  if normalization is not None:
    blob = (blob - np.float32(normalization[0])) / np.float32(normalization[1])
  session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
  return session.run(None, {session.get_inputs()[0].name: blob})[0]


def _pixels(n, shape, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def _save(proto, path) -> pathlib.Path:
  pathlib.Path(path).write_bytes(proto.SerializeToString())
  return pathlib.Path(path)


@pytest.mark.parametrize("build,name", [
    (functools.partial(insightface_iresnet, (2, 2, 2, 2), 32), "iresnet18"),
    (functools.partial(insightface_iresnet, (3, 4, 6, 3), 20), "iresnet34"),
    (functools.partial(insightface_mobilefacenet, 2, (1, 4, 6, 2)), "mbf"),
    (functools.partial(insightface_mobilefacenet, 1, (1, 4, 6, 2), 40), "mobilefacenet"),
])
def test_insightface_graphs_import_to_onnxruntimes_embeddings(build, name):
  proto = build()
  imported = onnx_import.backbone_from_onnx(proto)
  assert imported.model_name == name and imported.normalization is None
  model = models.get_model(name, embedding_dim=imported.embedding_dim)
  pixels = _pixels(4, imported.image_shape)
  ours = model.apply(imported.variables, models.normalize_images(pixels, (127.5, 127.5)),
                     train=False)
  theirs = _onnxruntime(proto, pixels, (127.5, 127.5))
  assert _cosines(ours, theirs).min() >= MIN_COSINE
  np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-3 * np.abs(theirs).max())


def test_the_command_imports_and_the_workdir_embeds_evaluates_and_refuses(tmp_path):
  path = _save(insightface_iresnet(), tmp_path / "r18.onnx")
  work = tmp_path / "r18"
  assert from_onnx.main([str(path), f"--workdir={work}"]) == 0
  config = json.loads((work / "config.json").read_text())
  assert config["model"]["name"] == "iresnet18" and config["model"]["embedding_dim"] == 32
  assert (config["model"]["input_mean"], config["model"]["input_std"]) == (127.5, 127.5)
  assert config["data"]["image_size"] == [32, 32] and config["eval"]["flip"] is True
  record = json.loads((work / "imported.json").read_text())
  assert record["normalization"]["from"] == "outside the graph"
  run = inference.load_run(work)
  assert run.centres.shape == (0, 32) and run.step == 0 and run.imported_from == str(path)
  pixels = _pixels(5, (32, 32, 3), seed=3)
  theirs = _onnxruntime(path, pixels, (127.5, 127.5))
  theirs_flipped = _onnxruntime(path, pixels[:, :, ::-1], (127.5, 127.5))
  assert _cosines(run.embed(pixels, flip=False), theirs).min() >= MIN_COSINE
  # eval.flip: each embedding summed with its mirror image's, as insightface evaluates.
  assert _cosines(run.embed(pixels), theirs + theirs_flipped).min() >= MIN_COSINE
  with pytest.raises(errors.WorkdirError, match="needs trained class centres.*imported from"):
    run.require_centres("W-EC")
  with pytest.raises(errors.ConfigError, match="no evaluation sets of its own; name .bin"):
    from arcjax import evaluate  # pylint: disable=import-outside-toplevel
    evaluate.evaluate(str(work))
  with pytest.raises(errors.WorkdirError, match="already holds a run"):
    from_onnx.import_onnx(path, str(work))


def _unknown_op_graph(tmp_path) -> pathlib.Path:
  proto = insightface_iresnet()
  nodes = list(proto.graph.node)
  stranger = helper.make_node("Sin", [nodes[3].output[0]], ["strange"], name="/layer1/0/Sin")
  nodes[4].input[0] = "strange"
  del proto.graph.node[:]
  proto.graph.node.extend(nodes[:4] + [stranger] + nodes[4:])
  return _save(proto, tmp_path / "strange.onnx")


def test_a_graph_that_does_not_map_is_refused_in_one_line_naming_the_node(tmp_path):
  path = _unknown_op_graph(tmp_path)
  result = subprocess.run([sys.executable, "-m", "arcjax.from_onnx", str(path),
                           f"--workdir={tmp_path / 'w'}"], capture_output=True, text=True,
                          cwd=REPO, timeout=600)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      f"error: {path}: cannot place node '/layer1/0/Sin' (Sin): no arcjax backbone has a Sin "
      "(they map Add, AveragePool, BatchNormalization, Conv, Div, Flatten, Gemm, "
      "GlobalAveragePool, MatMul, Mul, PRelu, ReduceMean, Relu, Reshape, Squeeze, Sub, "
      "Unsqueeze)"]
  assert not (tmp_path / "w").exists()
  # A known op in the wrong place: the node the furthest backbone could not place.
  proto = insightface_iresnet()
  prelu = next(n for n in proto.graph.node if n.name == "/layer1/0/prelu/PRelu")
  prelu.op_type, prelu.name = "Relu", "/layer1/0/prelu/Relu"
  del prelu.input[1]
  with pytest.raises(errors.ConfigError, match=r"cannot place node '/layer1/0/prelu/Relu' \(Relu\)"
                                               r": arcjax's iresnet18 has a PRelu of 64 channels"):
    onnx_import.backbone_from_onnx(proto)


def _random_variables(model, shape, seed=0):
  """Random weights and BatchNorm statistics (running averages of a shifted, scaled batch)."""
  x = jax.random.normal(jax.random.key(seed), (8, *shape))
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(seed + 1), x)
  _, updates = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
      variables, 3 * x + 1)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(seed + 2), p.shape),
                        variables["params"])
  return {"params": params, "batch_stats": updates["batch_stats"]}


@pytest.mark.slow
@pytest.mark.parametrize("name,shape", [("tiny_cnn", (28, 28, 1)), ("iresnet18", (20, 24, 3)),
                                        ("mobilefacenet", (32, 32, 3)), ("mbf", (24, 24, 3)),
                                        ("mbf_large", (16, 16, 3))])
def test_every_small_backbone_exports_and_imports_back(name, shape):
  model = models.get_model(name, embedding_dim=24)
  variables = _random_variables(model, shape)
  normalization = (120.0, 60.0)
  proto = onnx_export.backbone_to_onnx(model, variables, shape, normalization)
  pixels = _pixels(3, shape)
  apply = jax.jit(functools.partial(model.apply, train=False))
  ours = apply(variables, models.normalize_images(pixels, normalization))
  theirs = _onnxruntime(proto, pixels)  # raw pixels: the normalisation is in the graph
  np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4 * float(np.abs(ours).max()))
  back = onnx_import.backbone_from_onnx(proto)
  assert (back.model_name, back.image_shape, back.normalization) == (name, shape, normalization)
  again = apply(back.variables, models.normalize_images(pixels, back.normalization))
  assert _cosines(again, ours).min() >= MIN_COSINE


@pytest.mark.slow
@pytest.mark.parametrize("name,counts", [
    # torch's export of insightface's iresnet50 (DESIGN.md): 53 Conv, 26 BatchNormalization, 25 PRelu.
    ("iresnet50", {"Conv": 53, "BatchNormalization": 26, "PRelu": 25, "Add": 24}),
    # By hand: a Conv per stem and 2 per block plus 4 shortcuts; a BN per block (bn1) plus 2;
    # a PReLU per block plus 1; an Add per block. IResNet-100: 49 blocks; IResNet-200: 98.
    ("iresnet100", {"Conv": 103, "BatchNormalization": 51, "PRelu": 50, "Add": 49}),
    ("iresnet200", {"Conv": 201, "BatchNormalization": 100, "PRelu": 99, "Add": 98})])
def test_deep_iresnets_export_as_torch_does(name, counts):
  model = models.get_model(name, embedding_dim=8)
  abstract = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda a: rng.uniform(0.5, 1.0, a.shape).astype(np.float32) * 0.05,
                           abstract)
  proto = onnx_export.backbone_to_onnx(model, variables, (16, 16, 3), (127.5, 128.0))
  found = collections.Counter(node.op_type for node in proto.graph.node)
  assert {op: found[op] for op in counts} == counts
  assert [n.op_type for n in proto.graph.node[:2]] == ["Sub", "Mul"]
  assert onnx_import.backbone_from_onnx(proto).model_name == name


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> pathlib.Path:
  """A tiny CNN trained for a few steps on the embedded Omniglot."""
  from configs import default  # pylint: disable=import-outside-toplevel
  path = tmp_path_factory.mktemp("runs") / "tiny"
  train.train_and_evaluate(_tiny_config(default.get_config()), str(path))
  return path


def _tiny_config(config):
  config.train.update(steps=4, batch_size=32, checkpoint_every=4, log_every=2)
  config.model.embedding_dim = 16
  config.eval.every = 0
  config.angles.probe_size = 64
  config.data.max_pairs = 200
  config.wandb.mode = "disabled"
  return config


@pytest.mark.slow
def test_a_trained_run_exports_for_insightface_and_round_trips(trained_run, tmp_path, capsys):
  out = tmp_path / "tiny.onnx"
  assert export.main([f"--workdir={trained_run}", f"--out={out}"]) == 0
  assert "differ from load_run(...).embed's by at most" in capsys.readouterr().out
  proto = onnx.load(out)
  # What insightface's loader reads: a Sub and a Mul among the first nodes (it then feeds raw
  # pixels), H and W fixed, one output; the batch size is free.
  assert [n.name.split("_")[0] for n in proto.graph.node[:2]] == ["Sub", "Mul"]
  dims = proto.graph.input[0].type.tensor_type.shape.dim
  assert [d.dim_value for d in dims[1:]] == [1, 32, 32] and dims[0].dim_param
  run = inference.load_run(trained_run)
  for batch in (1, 5):
    pixels = _pixels(batch, (32, 32, 1), seed=batch)
    theirs = _onnxruntime(out, pixels)
    assert theirs.shape == (batch, 16)
    assert _cosines(run.embed(pixels, flip=False), theirs).min() >= MIN_COSINE
  # Import the export: the same embeddings, the run's normalisation (÷128) taken from the graph.
  back = tmp_path / "back"
  from_onnx.import_onnx(out, str(back))
  imported = inference.load_run(back)
  assert (imported.config.model.input_mean, imported.config.model.input_std) == (127.5, 128.0)
  pixels = _pixels(6, (32, 32, 1), seed=9)
  assert _cosines(imported.embed(pixels, flip=False), run.embed(pixels, flip=False)
                  ).min() >= MIN_COSINE
  # And an imported model, exported and imported again.
  second = tmp_path / "second.onnx"
  export.export(str(back), second)
  again = tmp_path / "again"
  from_onnx.import_onnx(second, str(again))
  assert _cosines(inference.load_run(again).embed(pixels, flip=False),
                  imported.embed(pixels, flip=False)).min() >= MIN_COSINE


@pytest.mark.slow
def test_an_imported_insightface_model_round_trips(tmp_path):
  path = _save(insightface_mobilefacenet(), tmp_path / "mbf.onnx")
  from_onnx.import_onnx(path, str(tmp_path / "mbf"))
  export.export(str(tmp_path / "mbf"), tmp_path / "mbf_out.onnx")
  pixels = _pixels(4, (32, 32, 3))
  original = _onnxruntime(path, pixels, (127.5, 127.5))
  exported = _onnxruntime(tmp_path / "mbf_out.onnx", pixels)  # raw pixels: normalises itself
  assert _cosines(exported, original).min() >= MIN_COSINE
  from_onnx.import_onnx(tmp_path / "mbf_out.onnx", str(tmp_path / "mbf_again"))
  again = inference.load_run(tmp_path / "mbf_again")
  assert (again.config.model.name, again.config.model.input_std) == ("mbf", 127.5)
  assert _cosines(again.embed(pixels, flip=False), original).min() >= MIN_COSINE


@pytest.mark.slow
def test_fine_tuning_starts_from_a_run_or_an_imported_model(trained_run, tmp_path, capsys):
  from configs import default  # pylint: disable=import-outside-toplevel
  source = inference.load_run(trained_run)
  # Same data and classes, lr 1e-30 (no float32 parameter moves): the backbone and the centres are the source's after a step.
  config = _tiny_config(default.get_config())
  config.train.update(init_from=str(trained_run), lr=1e-30, steps=1, checkpoint_every=1)
  train.train_and_evaluate(config, str(tmp_path / "same"))
  assert "centres loaded: the same 200 classes" in capsys.readouterr().out
  tuned = inference.load_run(tmp_path / "same")
  jax.tree.map(np.testing.assert_array_equal, tuned.variables["params"],
               source.variables["params"])
  np.testing.assert_array_equal(tuned.centres, source.centres)
  record = json.loads((tmp_path / "same" / "init_from.json").read_text())
  assert (record["workdir"], record["step"]) == (str(trained_run), 4)
  assert json.loads((tmp_path / "same" / "config.json").read_text())["train"]["init_from"] == str(
      trained_run)
  # Other classes: the backbone comes, the centres start fresh, said in one line.
  config = _tiny_config(default.get_config())
  config.data.num_holdout_identities = 40
  config.train.update(init_from=str(trained_run), lr=1e-30, steps=1, checkpoint_every=1)
  train.train_and_evaluate(config, str(tmp_path / "other"))
  assert ("centres fresh: " + str(trained_run) + " was trained on 200 classes of other data "
          "(data.num_holdout_identities differ), this run has 202") in capsys.readouterr().out
  assert not np.array_equal(inference.load_run(tmp_path / "other").centres[:200], source.centres)
  # A resumed run starts from its own checkpoint: the source may be gone.
  config = _tiny_config(default.get_config())
  config.train.update(init_from=str(tmp_path / "same"), steps=2, checkpoint_every=1)
  train.train_and_evaluate(config, str(tmp_path / "resumed"))
  config.train.steps = 3
  (tmp_path / "same" / "config.json").rename(tmp_path / "same" / "moved.json")
  train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert inference.load_run(tmp_path / "resumed").step == 3
  # A backbone that cannot be this config's is refused before anything is written but the
  # lock (released empty, as every refusal leaves it).
  config = _tiny_config(default.get_config())
  config.model.embedding_dim = 8
  config.train.init_from = str(trained_run)
  with pytest.raises(errors.ConfigError, match=r"does not fit this config \(model.embedding_dim: "
                                               r"16 there, 8 here\)"):
    train.train_and_evaluate(config, str(tmp_path / "misfit"))
  assert [p.name for p in (tmp_path / "misfit").iterdir()] == ["lock"]
  assert (tmp_path / "misfit" / "lock").read_text() == ""


@pytest.mark.slow
def test_fine_tuning_from_an_imported_model_says_the_centres_are_fresh(tmp_path, capsys):
  from configs import default  # pylint: disable=import-outside-toplevel
  model = models.get_model("tiny_cnn", embedding_dim=16)
  proto = onnx_export.backbone_to_onnx(model, _random_variables(model, (32, 32, 1)), (32, 32, 1),
                                       (127.5, 128.0))
  from_onnx.import_onnx(_save(proto, tmp_path / "m.onnx"), str(tmp_path / "imported"))
  config = _tiny_config(default.get_config())
  config.train.update(init_from=str(tmp_path / "imported"), lr=1e-30, steps=1, checkpoint_every=1)
  train.train_and_evaluate(config, str(tmp_path / "tuned"))
  # arcjax's export folds each conv's BatchNorm into it: imported as identity plus bias, they
  # are calibrated on the run's images before training (see the IResNet test below).
  folded = ["bn1", "bn2", "bn3", "bn4"]
  assert json.loads((tmp_path / "imported" / "imported.json").read_text())[
      "folded_batchnorms"] == folded
  assert (f"its backbone, its 4 folded BatchNorms calibrated on {train.CALIBRATION_IMAGES} "
          f"training images; centres fresh: {tmp_path / 'imported'} has no centres (an imported "
          "model)") in capsys.readouterr().out
  calibration = json.loads((tmp_path / "tuned" / "init_from.json").read_text())["calibration"]
  assert calibration == {"batchnorms": folded, "images": train.CALIBRATION_IMAGES, "seed": 0,
                         "left": []}
  tuned, imported = (inference.load_run(tmp_path / name) for name in ("tuned", "imported"))
  unchanged = lambda tree: {k: v for k, v in tree.items() if k not in folded}  # noqa: E731
  jax.tree.map(np.testing.assert_array_equal, unchanged(tuned.variables["params"]),
               unchanged(imported.variables["params"]))
  # A workdir imported before arcjax recorded its folded BatchNorms: refused before anything
  # is written but the lock (released empty).
  record = json.loads((tmp_path / "imported" / "imported.json").read_text())
  del record["folded_batchnorms"]
  (tmp_path / "imported" / "imported.json").write_text(json.dumps(record))
  with pytest.raises(errors.ConfigError, match="did not record which BatchNorms its graph had "
                                               r"folded .*: import .*m\.onnx again"):
    train.train_and_evaluate(config, str(tmp_path / "old"))
  assert [p.name for p in (tmp_path / "old").iterdir()] == ["lock"]


@pytest.mark.slow
def test_calibration_holds_each_folded_batchnorm_to_its_inference_in_training_mode():
  """On the calibration images, in training mode, each calibrated BatchNorm computes its
  inference affine a·y + c of its input y (the conv's output); inference is unchanged. In
  training mode y depends on the BatchNorms before it: here the blocks' own bn1, whose
  running statistics are not these images' (calibration is in order, not on inference-mode
  inputs)."""
  model = models.get_model("iresnet18", embedding_dim=8)
  shape = (16, 16, 3)
  variables = jax.tree.map(np.asarray, _random_variables(model, shape))
  # The BatchNorm after each conv, and the conv before it.
  convs = {"stem_bn": "stem_conv", "bn2": "conv1", "bn3": "conv2",
           "downsample_bn": "downsample_conv"}
  folded = tuple("/".join(key.key for key in path[:-1])
                 for path, _ in jax.tree_util.tree_flatten_with_path(variables["batch_stats"])[0]
                 if path[-1].key == "mean" and path[-2].key in convs)
  assert len(folded) == 21
  images = jax.random.normal(jax.random.key(7), (32, *shape))
  # The embedding's last BatchNorm, as if a graph had folded it into the FC: it has no scale,
  # so it cannot be calibrated, and is left as it is.
  calibrated, done = onnx_import.calibrate_folded_batchnorms(model, variables, images,
                                                             folded + ("features",))
  assert done == folded
  for collection in ("params", "batch_stats"):
    jax.tree.map(np.testing.assert_array_equal, calibrated[collection]["features"],
                 variables[collection]["features"])
  infer = jax.jit(functools.partial(model.apply, train=False))
  before = infer(variables, images)
  np.testing.assert_allclose(infer(calibrated, images), before, rtol=1e-4,
                             atol=1e-4 * float(np.abs(before).max()))
  _, found = model.apply(calibrated, images, train=True, capture_intermediates=True,
                         mutable=["batch_stats", "intermediates"])

  def at(tree, path):
    for key in path.split("/"):
      tree = tree[key]
    return tree

  for path in folded:
    *block, name = path.split("/")
    y = np.asarray(at(found["intermediates"], "/".join([*block, convs[name]]))["__call__"][0],
                   np.float64)
    z = np.asarray(at(found["intermediates"], path)["__call__"][0], np.float64)
    p, s = at(variables["params"], path), at(variables["batch_stats"], path)
    a = p["scale"] / np.sqrt(s["var"].astype(np.float64) + 1e-5)
    np.testing.assert_allclose(z, a * (y - s["mean"]) + p["bias"], rtol=1e-4,
                               atol=1e-4 * float(np.abs(z).max()), err_msg=path)


def _fit_batchnorms(proto: onnx.ModelProto, pixels: np.ndarray) -> onnx.ModelProto:
  """`proto` with the running statistics of each of its BatchNormalization nodes, in order, set
  to its input's on `pixels` (uint8 NHWC, normalised (x − 127.5)/127.5), as onnxruntime
  computes them: a model trained on the distribution of `pixels`."""
  blob = (pixels.transpose(0, 3, 1, 2).astype(np.float32) - 127.5) / 127.5
  initializers = {init.name: init for init in proto.graph.initializer}
  for node in [n for n in proto.graph.node if n.op_type == "BatchNormalization"]:
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.append(helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT,
                                                            None))
    session = onnxruntime.InferenceSession(probe.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    x = session.run([node.input[0]], {session.get_inputs()[0].name: blob})[0].astype(np.float64)
    axes = (0, 2, 3) if x.ndim == 4 else (0,)
    for name, value in ((node.input[3], x.mean(axes)), (node.input[4], x.var(axes))):
      initializers[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
  return proto


@pytest.mark.slow
def test_fine_tuning_an_imported_model_starts_from_its_function_in_training_mode(tmp_path):
  """A BatchNorm that the graph had folded into its conv is imported as the identity plus the
  conv's bias: exact in inference, but training mode would normalise each such channel by
  the batch's statistics. `train.start_from` calibrates them on the run's images first."""
  from configs import default  # pylint: disable=import-outside-toplevel
  from arcjax import data  # pylint: disable=import-outside-toplevel
  from arcjax.data import pipeline  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  size, d = 16, 32
  draw = lambda n, seed: np.random.default_rng(seed).integers(  # noqa: E731
      0, 256, (n, size, size, 3), dtype=np.uint8)
  # The run's data: 8 identities of 40 random RGB images; 6 train (240 images: fewer than
  # CALIBRATION_IMAGES, so calibration sees all of them), 2 are held out.
  for person in range(8):
    (tmp_path / "people" / f"p{person}").mkdir(parents=True)
    for i, image in enumerate(draw(40, person)):
      Image.fromarray(image).save(tmp_path / "people" / f"p{person}" / f"{i}.png")
  config = default.get_config()
  config.model.update(name="iresnet18", embedding_dim=d, input_mean=127.5, input_std=127.5)
  config.data.update(name="folder", path=str(tmp_path / "people"), image_size=(size, size),
                     num_holdout_identities=2, flip=True)
  config.train.init_from = str(tmp_path / "imported")
  datasets = data.get_datasets(config.data)
  training = pipeline.load_images(datasets.train, np.arange(len(datasets.train)))
  assert training.shape == (240, size, size, 3)
  # insightface's iresnet18, as if trained on this distribution: the graph's own BatchNorms
  # hold its training images' statistics (the folded ones are random, folded in).
  path = _save(_fit_batchnorms(insightface_iresnet((2, 2, 2, 2), size, d), training),
               tmp_path / "r18.onnx")
  from_onnx.import_onnx(path, str(tmp_path / "imported"))
  source = train.source_run(config)
  assert len(source.folded_batchnorms) == 21  # the stem's, 2 per block, 3 shortcuts
  init = jax.jit(functools.partial(train.create_train_state, config, image_shape=(size, size, 3),
                                   num_classes=datasets.num_classes))
  state, record = train.start_from(source, init(jax.random.key(0)), config, datasets)
  assert record["calibration"] == {"batchnorms": list(source.folded_batchnorms), "images": 240,
                                   "seed": 0, "left": []}
  model = models.get_model("iresnet18", embedding_dim=d)
  infer = jax.jit(functools.partial(model.apply, train=False))
  batch_mode = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0])
  calibrated = {"params": state.params, "batch_stats": state.batch_stats}
  fresh = draw(240, 100)  # another batch of the distribution
  # Inference: the imported model's function, unchanged.
  x = models.normalize_images(fresh, (127.5, 127.5))
  assert _cosines(infer(calibrated, x), _onnxruntime(path, fresh, (127.5, 127.5))
                  ).min() >= MIN_COSINE
  # Training mode, on the calibration images: the same function (the graph's own BatchNorms
  # hold these images' statistics, and each calibrated one computes y + b on them).
  x_training = models.normalize_images(training, (127.5, 127.5))
  assert _cosines(batch_mode(calibrated, x_training), infer(calibrated, x_training)
                  ).min() >= 0.9999
  # On another batch: near it (found: 0.98 at the least; as imported: 0.44 on average, some
  # embeddings turned away (cosine < 0)).
  near = _cosines(batch_mode(calibrated, x), infer(calibrated, x))
  assert near.min() >= 0.95
  as_imported = _cosines(batch_mode(source.variables, x), infer(source.variables, x))
  assert as_imported.mean() < 0.7


def test_a_config_from_before_the_new_fields_is_no_change():
  from configs import default  # pylint: disable=import-outside-toplevel
  from arcjax import workdir  # pylint: disable=import-outside-toplevel
  current = workdir.config_as_json(default.get_config())
  old = json.loads(json.dumps(current))
  del old["model"]["input_mean"], old["model"]["input_std"], old["train"]["init_from"]
  assert workdir.config_changes(old, current) == []
  current["model"]["input_std"] = 127.5  # but a new value is a change of what is trained
  (change,) = workdir.config_changes(old, current)
  assert (change.field, change.stored, change.requested, change.free) == (
      "model.input_std", 128.0, 127.5, False)

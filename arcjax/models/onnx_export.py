"""A backbone as an ONNX graph, written as torch writes insightface's models.

`backbone_to_onnx(model, variables, image_shape, normalization)` maps the
layers of `graphs.layer_graph` to ONNX nodes with `onnx.helper`:

  - input: float32 (N, C, H, W) raw pixels in [0, 255] (batch dynamic; H, W, C fixed);
  - `Sub` then `Mul`: the run's normalisation (x − mean) · (1/std), the first two
    nodes, named so that insightface's model loader (which looks for a Sub and a Mul
    among the first nodes) feeds raw pixels;
  - Conv (BatchNorm folded in where the conv's output feeds only the BN, as torch folds
    it in eval mode), BatchNormalization, PRelu, Relu, AveragePool, Add, Flatten, Gemm;
  - output: float32 (N, d) embeddings before L2 normalisation.

Weights are converted from Flax's layouts (HWIO kernels, NHWC flatten order) to
ONNX's (OIHW kernels, NCHW flatten order). `onnx_import` reads such graphs back.
"""

from typing import Any

import flax.linen as nn
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from arcjax.models import graphs

# Opset 13 and IR version 7: what onnxruntime releases back to 1.8 and insightface's tools read.
OPSET = 13
IR_VERSION = 7
BN_EPSILON = 1e-5  # arcjax's BatchNorm (and torch's)
INPUT, OUTPUT = "input", "embedding"


def _leaf(tree: dict[str, Any], path: tuple[str, ...]) -> dict[str, np.ndarray]:
  for key in path:
    tree = tree[key]
  return {name: np.asarray(value, np.float64) for name, value in tree.items()}


class _Emitter:
  """Collects nodes and initialisers; names nodes `<Op>_<index>` as torch's exporter does."""

  def __init__(self):
    self.nodes: list[onnx.NodeProto] = []
    self.initializers: list[onnx.TensorProto] = []

  def constant(self, name: str, value: np.ndarray) -> str:
    self.initializers.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
    return name

  def node(self, op: str, inputs: list[str], output: str, **attributes) -> str:
    self.nodes.append(helper.make_node(op, inputs, [output], name=f"{op}_{len(self.nodes)}",
                                       **attributes))
    return output


def _bn_affine(params: dict[str, np.ndarray], stats: dict[str, np.ndarray]
               ) -> tuple[np.ndarray, np.ndarray]:
  """(a, c) with BN(x) = a·x + c per channel, in float64."""
  a = params.get("scale", np.ones_like(stats["mean"])) / np.sqrt(stats["var"] + BN_EPSILON)
  return a, params["bias"] - stats["mean"] * a


def backbone_to_onnx(model: nn.Module, variables: dict[str, Any], image_shape: tuple[int, int, int],
                     normalization: tuple[float, float], *,
                     doc_string: str = "") -> onnx.ModelProto:
  """The ONNX model of backbone `model` with `variables` on images (H, W, C).

  Args:
    model: a backbone module (`models.make_model`), whatever its compute dtype.
    variables: {'params', 'batch_stats'} as the checkpoint holds them.
    image_shape: (H, W, C) the model embeds.
    normalization: (mean, std), `models.normalization(config.model)`.
    doc_string: recorded in the graph (e.g. where the weights come from).

  Returns:
    An onnx.ModelProto (checked with `onnx.checker`).
  """
  height, width, channels = image_shape
  layers = graphs.layer_graph(model, image_shape)
  params, stats = variables["params"], variables.get("batch_stats", {})
  readers = {tensor: [] for layer in layers for tensor in layer.inputs}
  for layer in layers:
    for tensor in layer.inputs:
      readers[tensor].append(layer)
  producer = {layer.output: layer for layer in layers}
  mean, std = normalization
  emit = _Emitter()
  names = {graphs.IMAGE: emit.node(
      "Mul", [emit.node("Sub", [INPUT, emit.constant("input_mean", np.float32(mean))], "centred"),
              emit.constant("input_scale", np.float32(1.0 / std))], "normalised")}

  def folded_into_conv(layer: graphs.Layer) -> bool:
    source = producer.get(layer.inputs[0])
    return (layer.kind == "bn" and source is not None and source.kind == "conv"
            and len(readers[source.output]) == 1)

  for layer in layers:
    if folded_into_conv(layer):  # written with its conv
      continue
    name = ".".join(layer.path)
    x = [names[tensor] for tensor in layer.inputs]
    out = layer.output
    if layer.kind == "conv":
      kernel = _leaf(params, layer.path)["kernel"].transpose(3, 2, 0, 1)  # HWIO → OIHW
      bias = None
      bn = next((reader for reader in readers.get(out, []) if folded_into_conv(reader)), None)
      if bn is not None:
        a, bias = _bn_affine(_leaf(params, bn.path), _leaf(stats, bn.path))
        kernel = kernel * a[:, None, None, None]
        out, name = bn.output, ".".join(bn.path)
      inputs = [x[0], emit.constant(f"{'.'.join(layer.path)}.weight", kernel)]
      if bias is not None:
        inputs.append(emit.constant(f"{name}.bias", bias))
      names[out] = emit.node("Conv", inputs, out, kernel_shape=list(layer.kernel),
                             strides=[layer.stride] * 2, pads=list(layer.padding),
                             group=layer.groups, dilations=[1, 1])
    elif layer.kind == "bn":
      p, s = _leaf(params, layer.path), _leaf(stats, layer.path)
      scale = p.get("scale", np.ones_like(s["mean"]))
      names[out] = emit.node("BatchNormalization", [
          x[0], emit.constant(f"{name}.weight", scale), emit.constant(f"{name}.bias", p["bias"]),
          emit.constant(f"{name}.running_mean", s["mean"]),
          emit.constant(f"{name}.running_var", s["var"])], out, epsilon=BN_EPSILON)
    elif layer.kind == "prelu":
      slope = _leaf(params, layer.path)["alpha"].reshape(-1, 1, 1)  # as torch exports it
      names[out] = emit.node("PRelu", [x[0], emit.constant(f"{name}.weight", slope)], out)
    elif layer.kind == "relu":
      names[out] = emit.node("Relu", x, out)
    elif layer.kind == "avg_pool":
      names[out] = emit.node("AveragePool", x, out, kernel_shape=list(layer.kernel),
                             strides=[layer.stride] * 2, pads=list(layer.padding),
                             count_include_pad=0)
    elif layer.kind == "global_mean":
      names[out] = emit.node("Flatten", [emit.node("GlobalAveragePool", x, f"{out}.pooled")],
                             out, axis=1)
    elif layer.kind == "flatten":
      names[out] = emit.node("Flatten", x, out, axis=1)
    elif layer.kind == "dense":
      kernel = _leaf(params, layer.path)["kernel"]  # (in, out), rows in the input's order
      source = producer[layer.inputs[0]]
      if source.kind == "flatten":  # NHWC flatten order → NCHW, as ONNX's Flatten gives
        h, w, c = producer[source.inputs[0]].shape
        kernel = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
      inputs = [x[0], emit.constant(f"{name}.weight", kernel.T)]
      if layer.bias:
        inputs.append(emit.constant(f"{name}.bias", _leaf(params, layer.path)["bias"]))
      names[out] = emit.node("Gemm", inputs, out, alpha=1.0, beta=1.0, transB=1)
    elif layer.kind == "add":
      names[out] = emit.node("Add", x, out)
    else:
      raise ValueError(f"layer kind {layer.kind!r} has no ONNX mapping")
  last = emit.nodes[-1]
  last.output[0] = OUTPUT
  graph = helper.make_graph(
      emit.nodes, "arcjax_backbone",
      [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", channels, height, width])],
      [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", layers[-1].shape[0]])],
      emit.initializers, doc_string=doc_string)
  onnx_model = helper.make_model(graph, producer_name="arcjax",
                                 opset_imports=[helper.make_opsetid("", OPSET)])
  onnx_model.ir_version = IR_VERSION
  onnx.checker.check_model(onnx_model)
  return onnx_model

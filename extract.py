"""extract.py -- pre-trained models -> features; the only module of the project that imports torch.

Turns a labelled image dataset and a list of pre-trained models into the ``feats.npz`` (one N x D array per
model, plus ``labels``) that ``itm.py`` and ``baselines.py`` rank::

    python extract.py --models resnet18,mobilenet_v2,dino_vitb16,mae_vitb16 \\
        --dataset cifar100 --root DATA --split train --out feats.npz --labels-out y.npy
    python itm.py --features feats.npz

Output. ``feats.npz`` holds one float16 (``--dtype float32`` to change) array per model name, N x D, and
``labels`` (int64, N). A JSON sidecar next to it (``feats.json``) records per model the architecture, weights
(URL / file and sha256), pooling, preprocessing, feature dimension, device and images/s, plus the dataset,
split and ``--limit``. Re-running with more models extracts only those not yet in the file; the npz is
rewritten atomically (temporary file + ``os.replace``) after every model, so an interrupted run keeps every
finished model and never leaves a truncated npz (a ``kill -9`` during a write may leave a hidden
``.feats.npz.tmp-PID`` beside it, safe to delete).

Models (``--list`` prints them all).

* Any torchvision classification model by name (``resnet18``, ``mobilenet_v2``, ``efficientnet_b0``,
  ``densenet121``; the other CNNs of the SFDA benchmark: ``resnet34/50/101/152``, ``densenet161/169/201``,
  ``inception_v3``, ``googlenet``, ``mnasnet1_0``; and every other name torchvision lists), with its DEFAULT
  weights (downloaded and hash-checked by torchvision).
* The self-supervised ViTs of the paper, loaded from their official releases into torchvision's
  ``VisionTransformer`` (see ``SSL_VITS``): ``dino_vits8``, ``dino_vitb16`` (DINO), ``mocov3_vitb16``
  (MoCo v3, 300 ep), ``mae_vitb16``, ``mae_vitl16`` (MAE), ``simmim_vitb16`` (SimMIM, 800 ep). Downloads
  are cached in ``torch.hub.get_dir()/checkpoints``. No sha256 is pinned for them yet (``sha256=None``: they
  could not be downloaded when this was written); the sha256 of the file actually used is recorded in the
  sidecar. SimMIM is released on Google Drive only, which has no direct URL: save the file under the cache
  name given in the error message, or pass it with ``--checkpoint``.
* ``--checkpoint PATH --arch NAME``: a local file for a torchvision architecture (torchvision key names;
  a ``module.`` prefix is stripped) or for one of the ViTs above / a torchvision ``vit_*`` (official
  timm/DINO/MoCo/MAE/SimMIM key names, converted as below). ``--models`` may name the output key (default:
  the file's stem). A checkpoint that does not fit the architecture is an error naming the keys.

Features = the input of the final classifier: for torchvision models the last ``nn.Linear`` is replaced by
the identity (global average pool for CNNs; the class token after the final LayerNorm for torchvision ViTs;
the hidden layer before the last Linear for MobileNetV3 / VGG / AlexNet / MaxViT, as their classifier has
one). DINO and MoCo v3: the class token after the final norm. MAE and SimMIM: the mean of the patch tokens
followed by a LayerNorm, as their own fine-tuning builds the classifier input (``fc_norm``: the checkpoint's
if it has one, else a fresh one with unit weight and zero bias, exactly as fine-tuning starts; the
pre-training ``norm`` is then dropped, as their fine-tuning drops it). ``--pool cls|mean`` overrides the
pooling of any ViT.

ViT key conversion (official name -> torchvision ``VisionTransformer``; after stripping the first prefix of
``module.base_encoder.`` (MoCo v3), ``base_encoder.``, ``encoder.`` (SimMIM), ``backbone.``, ``module.``
that has a ``cls_token``; keys outside that prefix (momentum encoder, predictor, decoder) are ignored)::

    cls_token                          class_token
    pos_embed                          encoder.pos_embedding   (zeros if absent: SimMIM uses no absolute one)
    patch_embed.proj.{weight,bias}     conv_proj.{weight,bias}
    blocks.N.norm1.*                   encoder.layers.encoder_layer_N.ln_1.*
    blocks.N.attn.qkv.{weight,bias}    ...self_attention.in_proj_{weight,bias}
    blocks.N.attn.{q_bias,v_bias}      ...self_attention.in_proj_bias = [q_bias, 0, v_bias]   (SimMIM/BEiT)
    blocks.N.attn.proj.*               ...self_attention.out_proj.*   (x gamma_1, layer scale, if present)
    blocks.N.norm2.*                   ...ln_2.*
    blocks.N.mlp.fc1.*                 ...mlp.0.*
    blocks.N.mlp.fc2.*                 ...mlp.3.*                     (x gamma_2, layer scale, if present)
    norm.*                             encoder.ln.*                    (class-token / token-norm models)
    fc_norm.*                          post_norm.* (LayerNorm after mean pooling; MAE/SimMIM fine-tuning)
    rel_pos_bias.relative_position_bias_table   rel_pos_bias.table (shared relative position bias, SimMIM;
                                       added to every block's attention logits)
    ignored: head.*, mask_token, decoder*, *relative_position_index (recomputed)

Anything else under the prefix is reported as an unknown key, anything absent as a missing key, by name.

Datasets: ``cifar10``, ``cifar100``, ``aircraft`` (FGVC-Aircraft, variants), ``caltech101``, ``dtd``,
``pets`` (Oxford-IIIT Pets; ``train`` means ``trainval``), ``cars`` (Stanford Cars), ``sun397``, ``food101``,
``flowers102`` through ``torchvision.datasets`` under ``--root`` (``--download`` where torchvision can);
Caltech-101 and SUN397 have no split in torchvision, so all images are used. ``imagefolder``: an
``ImageFolder`` tree at ``--root`` (``--root/SPLIT`` if that exists). ``PATH.npz``: images (uint8, NHW,
NHWC or NCHW) and integer labels under ``SPLIT_images/SPLIT_labels``, ``x_SPLIT/y_SPLIT``,
``images/labels`` or ``x/y``. ``fake``: ``torchvision.datasets.FakeData`` (smoke tests, timing).
``--limit N`` keeps a random subset of N images (seed 0, original order kept).

Preprocessing: a torchvision model's own ``weights.transforms()`` (for ``--random-init`` and local
checkpoints: those of the weights whose file name matches, else of its DEFAULT weights) -- e.g. resnet18 /
densenet121 / mobilenet_v2 V1: Resize(256, bilinear) + CenterCrop(224); mobilenet_v2 DEFAULT (V2): Resize(232);
efficientnet_b0: Resize(256, bicubic) + CenterCrop(224); inception_v3: Resize(342) + CenterCrop(299); all
with ImageNet mean/std. The SSL ViTs (and any model without torchvision weights): Resize(224, bicubic) +
CenterCrop(224) + ImageNet mean/std. Images are converted to RGB first. ``--list`` prints the preprocessing
of the paper's models and the SFDA CNNs; the sidecar records the transform of every extracted model.

Dense features (``--dense``, for semantic segmentation, SPEC section 5): one N x h x w x D array per model
(float16 unless ``--dtype float32``) and ``labels`` (uint8, 255 = ignore)::

    python extract.py --dense --models resnet18,dino_vitb16 --dataset voc2012 --root DATA --split train \
        --out seg.npz
    python itm.py --features seg.npz

* ViTs: the patch tokens after the final norm, without the class token, reshaped to the h x w patch grid
  (14 x 14 for /16 at 224). SSL ViTs are built as for ``--pool cls``, so a pre-training checkpoint keeps its
  own final token ``norm`` (MAE/SimMIM included); a checkpoint with only ``fc_norm`` (MAE/SimMIM fine-tuned)
  gets that LayerNorm applied to every token. ``--pool`` does not apply.
* CNNs: the last convolutional feature map, before global pooling, channels last (resnet18 at 224: 7 x 7 x
  512): the input of the global average pool for the models that have one as ``avgpool`` (ResNet/ResNeXt,
  RegNet, EfficientNet, MobileNetV3, GoogLeNet, Inception, ConvNeXt, Swin), ``features`` (+ the final ReLU
  for DenseNet) for MobileNetV2 / DenseNet / SqueezeNet / VGG / AlexNet, ``layers`` for MNASNet, the trunk
  up to ``conv5`` for ShuffleNetV2, ``stem`` + ``blocks`` for MaxViT. For the models whose classification
  feature is the global average pool (ResNet, DenseNet, MobileNetV2, EfficientNet, MNASNet, ...), its spatial
  mean is that feature; for VGG / AlexNet / MobileNetV3 / ConvNeXt / MaxViT there is a layer between.
* Geometry: all models of a file see the same pixels, so that one label map serves them all: the image and
  its mask are resized (shorter side to ``--size``, default 224; masks with nearest neighbour, images with
  the model's own interpolation) and center-cropped to ``--size`` x ``--size``; then the image gets the
  model's normalisation (mean/std). Unlike classification, there is no 256 -> 224 margin. ViTs need
  ``--size`` = their image size (224).
* ``labels``: the transformed masks reduced to the feature grid h x w of the models by the per-cell majority
  of labelled pixels (``itm.downsample_labels``: ties to the smaller class, 255 where a cell has no
  labelled pixel). When the models of a file have different grids (ViT-B/16: 14 x 14, resnet18: 7 x 7),
  ``labels`` holds the full-resolution transformed maps (N x size x size) instead and ``itm.py``
  downsamples them to each model's grid by the same rule; a resume that adds a model with another grid
  switches the file to full-resolution maps. The sidecar says which (``dense``, ``label_maps``: ``grid`` or
  ``full``, ``h``, ``w`` of ``labels``, ``size``; per model ``h``, ``w``, ``dim``).
* Datasets: ``voc2012`` / ``voc2007`` (``torchvision.datasets.VOCSegmentation``, ``--split`` train, val,
  trainval, and test for 2007; ``--download`` works where the VOC server does; 255 = the object borders),
  ``cityscapes`` (``torchvision.datasets.Cityscapes``, fine annotations, ``target_type="semantic"``, split
  train/val; no download: registration is needed; the label ids are mapped to the 19 train ids of
  cityscapesScripts (road 0 ... bicycle 18), every class with train id 255 or -1 (unlabeled, ego vehicle,
  rectification border, out of roi, static, dynamic, ground, parking, rail track, guard rail, bridge, tunnel,
  polegroup, caravan, trailer, license plate) -> 255; files sorted by name), and ``segfolder``:
  ``--root DIR`` (or ``DIR/SPLIT`` if that holds ``images/``) with ``DIR/images/*.{jpg,jpeg,png}`` and
  ``DIR/masks/<same stem>.png``, single-channel masks (L, P or I mode) whose pixel values are class ids
  0..254, 255 = ignore. ``--limit`` picks the same seeded subset as for classification.

Device: CUDA when available (``--device`` to choose), with autocast (bfloat16 where the GPU supports it, else
float16), channels_last and pinned memory; CPU runs in float32. Progress on stderr (tqdm if installed, a
plain counter otherwise); results on stdout. Bad input (unknown model / dataset, missing root, checkpoint
not matching its architecture) is a one-line error on stderr and exit status 1.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision import transforms as T

try:  # installed: a module of the itm_transferability package; in a checkout or vendored: beside itm.py
    from . import itm
except ImportError:
    import itm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ExtractError(Exception):
    """Bad input: reported by the CLI as one line on stderr, exit status 1."""


# ----------------------------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class ViTSpec:
    """A ViT in official (timm-style) layout and where its released weights live."""
    name: str
    patch: int
    dim: int
    depth: int
    heads: int
    mlp: int
    pool: str = "cls"            # default pooling: 'cls' or 'mean'
    mim: bool = False            # MAE/SimMIM: mean pooling goes through fc_norm, as their fine-tuning does
    image_size: int = 224
    url: str | None = None       # None: no direct download (see `source`)
    filename: str = ""           # name in torch.hub's checkpoint cache
    sha256: str | None = None    # hash prefix checked on download; None = not pinned
    source: str = ""             # the official release page


SSL_VITS = {s.name: s for s in [
    ViTSpec("dino_vits8", 8, 384, 12, 6, 1536, url="https://dl.fbaipublicfiles.com/dino/"
            "dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth", filename="dino_deitsmall8_pretrain.pth",
            source="https://github.com/facebookresearch/dino"),
    ViTSpec("dino_vitb16", 16, 768, 12, 12, 3072, url="https://dl.fbaipublicfiles.com/dino/"
            "dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth", filename="dino_vitbase16_pretrain.pth",
            source="https://github.com/facebookresearch/dino"),
    ViTSpec("mocov3_vitb16", 16, 768, 12, 12, 3072, url="https://dl.fbaipublicfiles.com/moco-v3/"
            "vit-b-300ep/vit-b-300ep.pth.tar", filename="mocov3-vit-b-300ep.pth.tar",
            source="https://github.com/facebookresearch/moco-v3"),
    ViTSpec("mae_vitb16", 16, 768, 12, 12, 3072, pool="mean", mim=True,
            url="https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth",
            filename="mae_pretrain_vit_base.pth", source="https://github.com/facebookresearch/mae"),
    ViTSpec("mae_vitl16", 16, 1024, 24, 16, 4096, pool="mean", mim=True,
            url="https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_large.pth",
            filename="mae_pretrain_vit_large.pth", source="https://github.com/facebookresearch/mae"),
    ViTSpec("simmim_vitb16", 16, 768, 12, 12, 3072, pool="mean", mim=True, url=None,
            filename="simmim_pretrain__vit_base__img224__800ep.pth",
            source="https://drive.google.com/file/d/1dJn6GYkwMIcoP3zqOEyW1_iQfpBi8UOw (linked from "
                   "https://github.com/microsoft/SimMIM)"),
]}

# torchvision's own ViTs, so that `--arch vit_b_16` also accepts official-layout checkpoints
TORCHVISION_VITS = {n: ViTSpec(n, p, d, L, h, m) for n, p, d, L, h, m in [
    ("vit_b_16", 16, 768, 12, 12, 3072), ("vit_b_32", 32, 768, 12, 12, 3072),
    ("vit_l_16", 16, 1024, 24, 16, 4096), ("vit_l_32", 32, 1024, 24, 16, 4096),
    ("vit_h_14", 14, 1280, 32, 16, 5120)]}

PAPER_MODELS = ["resnet18", "mobilenet_v2", "efficientnet_b0", "densenet121", *SSL_VITS]
SFDA_CNNS = ["resnet34", "resnet50", "resnet101", "resnet152", "densenet121", "densenet161", "densenet169",
             "densenet201", "inception_v3", "googlenet", "mobilenet_v2", "mnasnet1_0"]


def torchvision_models() -> list[str]:
    """Names of torchvision's ImageNet classification models."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def available_models() -> list[str]:
    return sorted(SSL_VITS) + torchvision_models()


# ------------------------------------------------------------------------------------------ preprocessing

def default_transform(size: int = 224) -> Callable:
    """Resize(size, bicubic) + CenterCrop(size) + ImageNet normalisation: for models without their own."""
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def describe_transform(transform) -> str:
    return " ".join(repr(transform).split())


def preprocessing(name: str) -> str:
    """One line: the preprocessing `name` gets (with its DEFAULT weights for torchvision models)."""
    spec = SSL_VITS.get(name)
    weights = None if spec else _torchvision_weights(name, None)
    if weights is None:
        size = spec.image_size if spec else 224
        return f"Resize({size}, bicubic) + CenterCrop({size}) + ImageNet mean/std"
    t = weights.transforms()
    return (f"Resize({t.resize_size[0]}, {t.interpolation.value}) + CenterCrop({t.crop_size[0]}) + "
            f"mean {tuple(t.mean)} std {tuple(t.std)}  [{weights}]")


def _to_rgb(img):
    """Every model expects 3 channels; datasets give grey (MNIST, Caltech), palette or RGBA images too."""
    from PIL import Image
    if isinstance(img, torch.Tensor):
        img = T.functional.to_pil_image(img)
    elif isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    return img if img.mode == "RGB" else img.convert("RGB")


# ---------------------------------------------------------------------------------------- ViT conversion

class _RelPosBias(nn.Module):
    """BEiT/SimMIM shared relative position bias: a (heads, L, L) additive attention bias, L = grid^2 + 1."""

    def __init__(self, grid: int, heads: int):
        super().__init__()
        self.table = nn.Parameter(torch.zeros((2 * grid - 1) ** 2 + 3, heads))
        self.register_buffer("index", _rel_pos_index(grid), persistent=False)

    def forward(self) -> torch.Tensor:
        n = self.index.shape[0]
        return self.table[self.index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)


def _rel_pos_index(grid: int) -> torch.Tensor:
    """Index into the bias table of every token pair; the last 3 rows serve cls->patch, patch->cls, cls->cls."""
    coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (grid - 1)
    n_rel = (2 * grid - 1) ** 2
    index = torch.zeros(grid * grid + 1, grid * grid + 1, dtype=torch.long)
    index[1:, 1:] = rel[..., 0] * (2 * grid - 1) + rel[..., 1]
    index[0, :], index[:, 0], index[0, 0] = n_rel, n_rel + 1, n_rel + 2
    return index


class _BiasedAttention(nn.MultiheadAttention):
    """torchvision's attention plus an additive per-head bias; keeps the parameter names of the original."""

    def __init__(self, dim: int, heads: int, bias: _RelPosBias):
        super().__init__(dim, heads, batch_first=True)
        self._bias = [bias]  # a list: the shared module must not be registered once per block

    def forward(self, query, key, value, **kwargs):
        bias = self._bias[0]().to(query.dtype)                 # (heads, L, L)
        mask = bias.repeat(query.shape[0], 1, 1)               # (B*heads, L, L), index b*heads + h
        return super().forward(query, key, value, attn_mask=mask, need_weights=False)


class ViTFeatures(nn.Module):
    """torchvision VisionTransformer -> pooled features ('cls' token or 'mean' of the patch tokens).

    The final LayerNorm sits either on the tokens (``vit.encoder.ln``, DINO/MoCo/supervised) or after the
    pooling (``post_norm``, MAE/SimMIM's fc_norm); the other one is the identity.
    """

    def __init__(self, vit, pool: str, pooled_norm: bool = False, rel_pos_bias: bool = False):
        super().__init__()
        vit.heads = nn.Identity()
        dim = vit.hidden_dim
        self.vit, self.pool = vit, pool
        self.post_norm = nn.LayerNorm(dim, eps=1e-6) if pooled_norm else nn.Identity()
        if pooled_norm:
            vit.encoder.ln = nn.Identity()
        self.rel_pos_bias = None
        if rel_pos_bias:
            heads = vit.encoder.layers[0].self_attention.num_heads
            self.rel_pos_bias = _RelPosBias(vit.image_size // vit.patch_size, heads)
            for block in vit.encoder.layers:
                block.self_attention = _BiasedAttention(dim, heads, self.rel_pos_bias)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens (class token first) after the encoder and its final norm: B x (1 + h*w) x D."""
        x = self.vit._process_input(x)
        cls = self.vit.class_token.expand(x.shape[0], -1, -1)
        return self.vit.encoder(torch.cat([cls, x], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tokens(x)
        x = x[:, 0] if self.pool == "cls" else x[:, 1:].mean(dim=1)
        return self.post_norm(x)


def new_vit_features(spec: ViTSpec, pool: str | None = None, pooled_norm: bool | None = None,
                     rel_pos_bias: bool = False) -> ViTFeatures:
    """A randomly initialised ViTFeatures of the shape `spec` describes."""
    pool = pool or spec.pool
    if pooled_norm is None:
        pooled_norm = spec.mim and pool == "mean"
    vit = torchvision.models.VisionTransformer(
        image_size=spec.image_size, patch_size=spec.patch, num_layers=spec.depth, num_heads=spec.heads,
        hidden_dim=spec.dim, mlp_dim=spec.mlp)
    return ViTFeatures(vit, pool, pooled_norm, rel_pos_bias)


_PREFIXES = ("", "module.base_encoder.", "base_encoder.", "module.encoder.", "encoder.",
             "module.backbone.", "backbone.", "module.")
_IGNORED = re.compile(r"^(head\.|heads\.|mask_token$|decoder|.*relative_position_index$)")


def _vit_key_table(depth: int, pooled_norm: bool, rel_pos_bias: bool) -> list[tuple[str, str]]:
    """(official key, ViTFeatures key) pairs -- the conversion table of the module docstring."""
    table = [("cls_token", "vit.class_token"), ("pos_embed", "vit.encoder.pos_embedding"),
             ("patch_embed.proj.weight", "vit.conv_proj.weight"), ("patch_embed.proj.bias", "vit.conv_proj.bias")]
    pairs = [("norm1", "ln_1"), ("attn.qkv", "self_attention.in_proj"), ("attn.proj", "self_attention.out_proj"),
             ("norm2", "ln_2"), ("mlp.fc1", "mlp.0"), ("mlp.fc2", "mlp.3")]
    for i in range(depth):
        for src, dst in pairs:
            for p in ("weight", "bias"):
                sep = "_" if dst.endswith("in_proj") else "."
                table.append((f"blocks.{i}.{src}.{p}", f"vit.encoder.layers.encoder_layer_{i}.{dst}{sep}{p}"))
    final = ("fc_norm", "post_norm") if pooled_norm else ("norm", "vit.encoder.ln")
    table += [(f"{final[0]}.{p}", f"{final[1]}.{p}") for p in ("weight", "bias")]
    if rel_pos_bias:
        table.append(("rel_pos_bias.relative_position_bias_table", "rel_pos_bias.table"))
    return table


def _strip_prefix(state: dict) -> tuple[dict, int]:
    """The encoder's keys without their prefix, and how many keys lay outside it (momentum encoder...)."""
    for prefix in _PREFIXES:
        if prefix + "cls_token" in state:
            inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            return inner, len(state) - len(inner)
    raise ExtractError("not a ViT checkpoint in timm/DINO/MoCo/MAE/SimMIM layout: no 'cls_token' key "
                       f"(first keys: {', '.join(list(state)[:5])})")


def _fold_beit(state: dict, depth: int) -> list[str]:
    """Rewrite SimMIM/BEiT blocks into plain timm ones: q/v biases -> qkv bias, layer scale -> weights."""
    notes = []
    for i in range(depth):
        b = f"blocks.{i}."
        if b + "attn.q_bias" in state:
            q, v = state.pop(b + "attn.q_bias"), state.pop(b + "attn.v_bias", None)
            v = torch.zeros_like(q) if v is None else v
            state[b + "attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])  # BEiT has no key bias
        for gamma, layer in (("gamma_1", "attn.proj"), ("gamma_2", "mlp.fc2")):
            g = state.pop(b + gamma, None)
            if g is not None:  # g * (W x + c) == (g[:, None] W) x + g c, exactly
                for p in ("weight", "bias"):
                    if b + f"{layer}.{p}" in state:
                        t = state[b + f"{layer}.{p}"]
                        state[b + f"{layer}.{p}"] = t * (g[:, None] if p == "weight" else g)
                notes.append(gamma)
    return sorted(set(notes))


def convert_vit_state(state: dict, depth: int, pool: str, mim: bool) -> tuple[dict, dict]:
    """Official ViT state dict -> (ViTFeatures state dict, layout/notes). Raises on unknown/missing keys."""
    state, outside = _strip_prefix(dict(state))
    ignored = sorted(k for k in state if _IGNORED.match(k))
    for k in ignored:
        del state[k]
    notes = [f"ignored {outside} keys outside the encoder"] if outside else []
    notes += [f"folded layer scale {g}" for g in _fold_beit(state, depth)]
    if ignored:
        notes.append(f"ignored {len(ignored)} keys: {_names(ignored)}")
    rel = "rel_pos_bias.relative_position_bias_table" in state
    if rel and "pos_embed" not in state:
        state["pos_embed"] = torch.zeros(1, 1, state["cls_token"].shape[-1])  # broadcast; SimMIM has no APE
    if not any(k.endswith("attn.qkv.bias") for k in state):
        for i in range(depth):  # a model trained with qkv_bias=False
            state[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(state[f"blocks.{i}.attn.qkv.weight"].shape[0])
    pooled_norm = "fc_norm.weight" in state or (mim and pool == "mean")
    if pooled_norm and "fc_norm.weight" not in state:
        dropped = [k for k in ("norm.weight", "norm.bias") if state.pop(k, None) is not None]
        notes.append("fresh fc_norm after mean pooling" + (", pre-training norm dropped" if dropped else "")
                     + " (as MAE/SimMIM fine-tuning)")
    table = _vit_key_table(depth, pooled_norm, rel)
    if pooled_norm and "fc_norm.weight" not in state:
        table = [(s, d) for s, d in table if not s.startswith("fc_norm.")]
    _check_keys(state, [s for s, _ in table])
    mapped = {d: state[s] for s, d in table}
    return mapped, {"pooled_norm": pooled_norm, "rel_pos_bias": rel, "notes": notes}


def _names(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _check_keys(state: dict, expected: list[str]) -> None:
    unknown = [k for k in state if k not in set(expected)]
    missing = [k for k in expected if k not in state]
    if unknown or missing:
        parts = ([f"unknown keys: {_names(unknown)}"] if unknown else []) + \
                ([f"missing keys: {_names(missing)}"] if missing else [])
        raise ExtractError("checkpoint does not match the ViT layout: " + "; ".join(parts))


def vit_from_state(state: dict, spec: ViTSpec, pool: str | None = None) -> tuple[ViTFeatures, dict]:
    """Build the ViTFeatures of `spec` from an official-layout state dict (see the docstring's table)."""
    pool = pool or spec.pool
    mapped, layout = convert_vit_state(state, spec.depth, pool, spec.mim)
    model = new_vit_features(spec, pool, layout["pooled_norm"], layout["rel_pos_bias"])
    if "post_norm.weight" not in mapped:  # a fresh fc_norm: keep nn.LayerNorm's own init (1, 0)
        mapped.update({k: v for k, v in model.state_dict().items() if k.startswith("post_norm.")})
    pos = mapped["vit.encoder.pos_embedding"]
    if pos.shape[1] == 1:
        mapped["vit.encoder.pos_embedding"] = pos.expand_as(model.vit.encoder.pos_embedding).clone()
    _load_exact(model, mapped, spec.name)
    return model.eval(), layout


def _load_exact(model: nn.Module, state: dict, arch: str) -> None:
    """load_state_dict(strict) with a one-line error listing what does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unknown = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unknown or shapes:
        parts = ([f"missing keys: {_names(missing)}"] if missing else []) + \
                ([f"unknown keys: {_names(unknown)}"] if unknown else []) + \
                ([f"shape mismatch: {_names(shapes, 4)}"] if shapes else [])
        raise ExtractError(f"checkpoint does not match architecture {arch}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------- model building

def load_checkpoint(path: str | Path) -> dict:
    """A state dict from a file: unwraps {'state_dict'|'model'|'teacher': ...}."""
    path = Path(path)
    if not path.is_file():
        raise ExtractError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickled extras (argparse/yacs configs) need the full unpickler
        if "weights only load failed" not in str(exc).lower():
            raise ExtractError(f"cannot read checkpoint {path}: {_first_line(exc)}") from None
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise ExtractError(f"cannot read checkpoint {path}: {_first_line(exc2)}") from None
        print(f"note: {path.name} holds non-tensor objects; loaded with weights_only=False", file=sys.stderr)
    for key in ("state_dict", "model", "teacher"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ExtractError(f"checkpoint {path} holds no state dict of tensors")
    return ckpt


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_checkpoint(spec: ViTSpec) -> Path:
    """The official checkpoint of `spec`, downloaded once into torch.hub's cache (hash-checked if pinned)."""
    dst = Path(torch.hub.get_dir()) / "checkpoints" / spec.filename
    if dst.is_file():
        return dst
    if spec.url is None:
        raise ExtractError(f"{spec.name} has no direct download: get it from {spec.source} and save it as "
                           f"{dst}, or pass --checkpoint FILE --arch {spec.name}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {spec.url} -> {dst}", file=sys.stderr)
    try:  # download_url_to_file writes a temporary file and renames it: no partial file in the cache
        torch.hub.download_url_to_file(spec.url, str(dst), hash_prefix=spec.sha256, progress=True)
    except Exception as exc:
        raise ExtractError(f"cannot download {spec.url}: {_first_line(exc)}") from None
    return dst


def _strip_classifier(model: nn.Module, arch: str) -> nn.Module:
    """Replace the final classifier (the last nn.Linear) by the identity: the model then returns its input."""
    last = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not last:
        if arch.startswith("squeezenet"):  # its classifier is a 1x1 conv; its input is the pooled features
            model.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
            return model
        raise ExtractError(f"{arch}: no linear classifier found")
    parent_name, _, attr = last[-1].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Identity())
    return model


def _torchvision_weights(arch: str, checkpoint: Path | None):
    """The weights enum entry for `arch`: the one whose file name matches `checkpoint`, else DEFAULT."""
    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        return None
    if checkpoint is not None:
        for entry in enum:
            if Path(entry.url).name == checkpoint.name:
                return entry
    return enum.DEFAULT


def _build_torchvision(arch: str, checkpoint: Path | None, random_init: bool, pool: str | None):
    weights = _torchvision_weights(arch, checkpoint)
    if checkpoint is None and not random_init:
        model = torchvision.models.get_model(arch, weights=weights)
        described = f"{weights} ({weights.url})"
    else:
        model = torchvision.models.get_model(arch, weights=None)
        described = "random init" if checkpoint is None else f"{checkpoint} (sha256 {_sha256(checkpoint)})"
        described += f", preprocessing of {weights}" if weights is not None else ""
        if checkpoint is not None:
            state = load_checkpoint(checkpoint)
            if all(k.startswith("module.") for k in state):  # saved from DataParallel
                state = {k[len("module."):]: v for k, v in state.items()}
            _load_exact(model, state, arch)
    transform = weights.transforms() if weights is not None else default_transform()
    if isinstance(model, torchvision.models.VisionTransformer):
        model = ViTFeatures(model, pool or "cls")
    elif pool is not None:
        raise ExtractError(f"--pool applies to ViTs only, not to {arch}")
    else:
        model = _strip_classifier(model, arch)
    info = {"arch": arch, "weights": described, "pool": pool or ("cls" if arch.startswith("vit_") else "avg")}
    return model.eval(), transform, info


def _build_vit(spec: ViTSpec, checkpoint: Path | None, random_init: bool, pool: str | None):
    pool = pool or spec.pool
    if random_init and checkpoint is None:
        model, layout, described = new_vit_features(spec, pool), {}, "random init"
    else:
        path = checkpoint or fetch_checkpoint(spec)
        model, layout = vit_from_state(load_checkpoint(path), spec, pool)
        described = f"{spec.url or path} (file {path.name}, sha256 {_sha256(path)})"
    info = {"arch": spec.name, "weights": described, "pool": pool, "conversion": layout.get("notes", [])}
    return model.eval(), default_transform(spec.image_size), info


def build_model(name: str, *, checkpoint: str | Path | None = None, arch: str | None = None,
                pool: str | None = None, random_init: bool = False):
    """(model: images -> features, transform: PIL image -> tensor, info dict) for a model name.

    `checkpoint` loads a local file into `arch` (default: `name`). `random_init` skips all weights
    (torchvision ``weights=None``) -- for tests and timing.
    """
    arch = arch or name
    if pool not in (None, "cls", "mean"):
        raise ExtractError(f"--pool must be cls or mean, not {pool!r}")
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and not ckpt.is_file():
        raise ExtractError(f"checkpoint {ckpt} does not exist")
    if arch in SSL_VITS:
        return _build_vit(SSL_VITS[arch], ckpt, random_init, pool)
    if arch not in torchvision_models():
        raise ExtractError(f"unknown model {arch!r}; valid: {', '.join(available_models())}")
    if ckpt is not None and arch in TORCHVISION_VITS:
        state = load_checkpoint(ckpt)
        if "class_token" not in state and any(k.endswith("cls_token") for k in state):
            model, layout = vit_from_state(state, TORCHVISION_VITS[arch], pool)
            info = {"arch": arch, "weights": f"{ckpt} (sha256 {_sha256(ckpt)})", "pool": pool or "cls",
                    "conversion": layout["notes"]}
            return model, default_transform(), info
    return _build_torchvision(arch, ckpt, random_init, pool)


# -------------------------------------------------------------------------------------- dense features

class DenseViT(nn.Module):
    """ViTFeatures -> its patch tokens after the final norm, without the class token: B x h x w x D.

    Models whose final LayerNorm follows the pooling (MAE/SimMIM fine-tuned ``fc_norm``) get it per token.
    """

    def __init__(self, features: ViTFeatures):
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.features.tokens(x)[:, 1:]
        if isinstance(self.features.post_norm, nn.LayerNorm):
            t = self.features.post_norm(t)
        patch = self.features.vit.patch_size
        return t.reshape(x.shape[0], x.shape[-2] // patch, x.shape[-1] // patch, t.shape[-1])


class _ToChannelsLast(nn.Module):
    """A trunk B x C x h x w -> B x h x w x C."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x).permute(0, 2, 3, 1)


class _PoolInput(nn.Module):
    """Runs the whole model and returns the input of its global average pool (``avgpool``), channels last."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self._grabbed = model, None
        model.avgpool.register_forward_pre_hook(self._grab)

    def _grab(self, module, args):
        self._grabbed = args[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._grabbed = None
        self.model(x)
        out, self._grabbed = self._grabbed, None
        return out.permute(0, 2, 3, 1)


def _is_global_pool(module) -> bool:
    return isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1))


def dense_model(model: nn.Module, arch: str) -> nn.Module:
    """A model of ``build_model`` -> images B x 3 x H x W to its dense features B x h x w x D (see the
    module docstring: ViT patch tokens, or the last CNN feature map before global pooling)."""
    tv = torchvision.models
    if isinstance(model, ViTFeatures):
        return DenseViT(model)
    if isinstance(model, tv.DenseNet):  # forward: features -> F.relu -> pool
        return _ToChannelsLast(nn.Sequential(model.features, nn.ReLU()))
    if isinstance(model, (tv.MobileNetV2, tv.VGG, tv.AlexNet, tv.SqueezeNet)):
        return _ToChannelsLast(model.features)
    if isinstance(model, tv.MNASNet):
        return _ToChannelsLast(model.layers)
    if isinstance(model, tv.ShuffleNetV2):
        return _ToChannelsLast(nn.Sequential(model.conv1, model.maxpool, model.stage2, model.stage3,
                                             model.stage4, model.conv5))
    if isinstance(model, tv.MaxVit):
        return _ToChannelsLast(nn.Sequential(model.stem, *model.blocks))
    if _is_global_pool(getattr(model, "avgpool", None)):
        return _PoolInput(model)
    raise ExtractError(f"--dense: no feature map known for {arch}")


def _vit_image_size(model: nn.Module) -> int | None:
    return model.vit.image_size if isinstance(model, ViTFeatures) else None


# --------------------------------------------------------------------------------------------- datasets

TORCHVISION_DATASETS = {
    # name: (torchvision class, {our split: constructor kwargs}); None = the dataset has no split
    "cifar10": ("CIFAR10", {"train": {"train": True}, "test": {"train": False}}),
    "cifar100": ("CIFAR100", {"train": {"train": True}, "test": {"train": False}}),
    "aircraft": ("FGVCAircraft", {s: {"split": s, "annotation_level": "variant"}
                                  for s in ("train", "val", "trainval", "test")}),
    "caltech101": ("Caltech101", None),
    "dtd": ("DTD", {s: {"split": s} for s in ("train", "val", "test")}),
    "pets": ("OxfordIIITPet", {"train": {"split": "trainval"}, "trainval": {"split": "trainval"},
                               "test": {"split": "test"}}),
    "cars": ("StanfordCars", {s: {"split": s} for s in ("train", "test")}),
    "sun397": ("SUN397", None),
    "food101": ("Food101", {s: {"split": s} for s in ("train", "test")}),
    "flowers102": ("Flowers102", {s: {"split": s} for s in ("train", "val", "test")}),
}
DATASETS = [*TORCHVISION_DATASETS, "imagefolder", "fake", "PATH.npz"]


class NpzImages(torch.utils.data.Dataset):
    """Images + integer labels from an .npz: (PIL image, label) items."""

    def __init__(self, path: str | Path, split: str = "train"):
        with np.load(path) as z:
            pairs = [(f"{split}_images", f"{split}_labels"), (f"x_{split}", f"y_{split}"),
                     ("images", "labels"), ("x", "y")]
            found = next(((x, y) for x, y in pairs if x in z.files and y in z.files), None)
            if found is None:
                raise ExtractError(f"{path}: no image/label arrays for split {split!r} "
                                   f"(looked for {', '.join('/'.join(p) for p in pairs)}; has {', '.join(z.files)})")
            self.images, self.labels = z[found[0]], z[found[1]].reshape(-1).astype(np.int64)
        if len(self.images) != len(self.labels):
            raise ExtractError(f"{path}: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        img = self.images[i]
        if img.dtype != np.uint8:  # floats in [0, 1]
            img = np.clip(np.asarray(img, np.float64) * 255 + 0.5, 0, 255).astype(np.uint8)
        if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
            img = img.transpose(1, 2, 0)  # CHW -> HWC
        if img.ndim == 3 and img.shape[-1] == 1:
            img = img[..., 0]
        return _to_rgb(img), int(self.labels[i])


def _torchvision_dataset(name: str, root: Path, split: str, download: bool):
    cls_name, splits = TORCHVISION_DATASETS[name]
    if splits is None:
        if split not in ("train", "all"):
            raise ExtractError(f"{name} has no split in torchvision; use --split all (or train)")
        kwargs, split = {}, "all"
        print(f"note: {name} has no official split in torchvision: all images are used", file=sys.stderr)
    elif split not in splits:
        raise ExtractError(f"{name}: unknown split {split!r}; valid: {', '.join(splits)}")
    else:
        kwargs = dict(splits[split])
    try:
        return getattr(torchvision.datasets, cls_name)(root=str(root), download=download, **kwargs), split
    except Exception as exc:  # torchvision says "Dataset not found or corrupted..." as RuntimeError
        raise ExtractError(f"{name} under {root}: {_first_line(exc)}") from None


def load_dataset(name: str, root: str | Path | None = None, split: str = "train", download: bool = False,
                 limit: int | None = None, fake_size: int = 100):
    """A dataset of (untransformed image, int label) items, and the split actually used."""
    if name in SEG_DATASETS:
        raise ExtractError(f"{name} is a segmentation dataset: use --dense")
    if name.endswith(".npz") or name == "npz":
        path = Path(root if name == "npz" else name)
        if not path.is_file():
            raise ExtractError(f"dataset file {path} does not exist")
        ds = NpzImages(path, split)
    elif name == "fake":
        ds = torchvision.datasets.FakeData(size=limit or fake_size, image_size=(3, 224, 224), num_classes=10)
    elif name == "imagefolder" or name in TORCHVISION_DATASETS:
        if root is None:
            raise ExtractError(f"--root is required for dataset {name}")
        root = Path(root)
        if not root.exists() and not (download and name != "imagefolder"):
            raise ExtractError(f"--root {root} does not exist")
        if name == "imagefolder":
            folder = root / split if (root / split).is_dir() else root
            try:
                ds = torchvision.datasets.ImageFolder(str(folder))
            except Exception as exc:
                raise ExtractError(f"imagefolder {folder}: {_first_line(exc)}") from None
        else:
            ds, split = _torchvision_dataset(name, root, split, download)
    else:
        raise ExtractError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    return _limit(ds, limit), split


def _limit(ds, limit: int | None):
    """A seeded random subset (original order kept): the first N of a class-sorted set would be one class."""
    if limit is None or limit >= len(ds):
        return ds
    if limit < 1:
        raise ExtractError("--limit must be >= 1")
    idx = np.sort(np.random.default_rng(0).choice(len(ds), size=limit, replace=False))
    return torch.utils.data.Subset(ds, idx.tolist())


class _Transformed(torch.utils.data.Dataset):
    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        img, label = self.base[i]
        return self.transform(_to_rgb(img)), int(label)


# ------------------------------------------------------------------------------- segmentation datasets

SEG_DATASETS = ["voc2012", "voc2007", "cityscapes", "segfolder"]
IGNORE = 255  # label-map value of unlabelled pixels (as in itm.py)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_MASK_MODES = ("L", "P", "I", "I;16", "1")


def _mask_image(mask, lut: np.ndarray | None = None, name: str = "mask"):
    """A single-channel mask of class ids (255 = ignore) -> a PIL 'L' image, through `lut` if given."""
    from PIL import Image
    if isinstance(mask, Image.Image):
        if mask.mode not in _MASK_MODES:
            raise ExtractError(f"{name} has mode {mask.mode}: masks must be single-channel class ids "
                               "(0..254, 255 = ignore)")
        mask = np.asarray(mask)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ExtractError(f"{name} has shape {mask.shape}: masks must be single-channel class ids")
    if lut is not None:
        mask = lut[mask.astype(np.int64) % len(lut)]
    elif mask.dtype != np.uint8:
        if mask.size and (mask.min() < 0 or mask.max() > IGNORE):
            raise ExtractError(f"{name} holds values outside 0..255")
        mask = mask.astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))  # 2-D uint8: mode L


def cityscapes_lut() -> np.ndarray:
    """Cityscapes label id (0..33; -1 = license plate, read as 255) -> train id (0..18), 255 for the rest."""
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for c in torchvision.datasets.Cityscapes.classes:
        if 0 <= c.id < 256 and 0 <= c.train_id < IGNORE:
            lut[c.id] = c.train_id
    return lut


class SegFolder(torch.utils.data.Dataset):
    """``root/images/*.{jpg,jpeg,png}`` with ``root/masks/<same stem>.png``: (RGB image, 'L' mask) items."""

    def __init__(self, root: str | Path):
        from PIL import Image
        root = Path(root)
        images_dir, masks_dir = root / "images", root / "masks"
        for d in (images_dir, masks_dir):
            if not d.is_dir():
                raise ExtractError(f"segfolder {root}: no {d.name}/ folder")
        images = sorted(f for f in images_dir.iterdir() if f.suffix.lower() in _IMAGE_SUFFIXES)
        if not images:
            raise ExtractError(f"segfolder {root}: no .jpg/.png images in {images_dir}")
        stems = [f.stem for f in images]
        dup = sorted({s for s in stems if stems.count(s) > 1})
        if dup:
            raise ExtractError(f"segfolder {root}: several images named {_names(dup, 3)}")
        masks = [masks_dir / f"{f.stem}.png" for f in images]
        missing = [m.name for m in masks if not m.is_file()]
        if missing:
            raise ExtractError(f"segfolder {root}: {len(missing)} images without a mask in {masks_dir}: "
                               f"{_names(missing, 3)}")
        for img, mask in zip(images, masks):  # headers only: cheap, and errors come before any model runs
            try:
                with Image.open(img) as a, Image.open(mask) as b:
                    size_a, size_b, mode = a.size, b.size, b.mode
            except Exception as exc:
                raise ExtractError(f"segfolder {root}: cannot read {img.name} / {mask.name}: "
                                   f"{_first_line(exc)}") from None
            if mode not in _MASK_MODES:
                raise ExtractError(f"mask {mask} has mode {mode}: masks must be single-channel class ids "
                                   "(0..254, 255 = ignore)")
            if size_a != size_b:
                raise ExtractError(f"segfolder {root}: {img.name} is {size_a[0]}x{size_a[1]} but its mask "
                                   f"is {size_b[0]}x{size_b[1]}")
        self.images, self.masks = images, masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image
        with Image.open(self.images[i]) as img, Image.open(self.masks[i]) as mask:
            return img.convert("RGB"), _mask_image(mask, name=f"mask {self.masks[i]}")


class _SegPairs(torch.utils.data.Dataset):
    """A torchvision segmentation dataset -> (RGB image, 'L' mask of class ids) items."""

    def __init__(self, base, lut: np.ndarray | None = None):
        self.base, self.lut = base, lut

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        img, mask = self.base[i]
        return _to_rgb(img), _mask_image(mask, self.lut)


def load_seg_dataset(name: str, root: str | Path | None = None, split: str = "train", download: bool = False,
                     limit: int | None = None):
    """A dataset of (RGB image, 'L' mask: class ids, 255 = ignore) items, and the split actually used."""
    if name not in SEG_DATASETS:
        raise ExtractError(f"--dense needs a segmentation dataset ({', '.join(SEG_DATASETS)}), not {name!r}")
    if root is None:
        raise ExtractError(f"--root is required for dataset {name}")
    root = Path(root)
    if not root.exists() and not (download and name.startswith("voc")):
        raise ExtractError(f"--root {root} does not exist")
    if name == "segfolder":
        folder = root / split if (root / split / "images").is_dir() else root
        ds = SegFolder(folder)
        split = split if folder != root else "all"
    elif name.startswith("voc"):
        year = name[3:]
        splits = ("train", "val", "trainval") + (("test",) if year == "2007" else ())
        if split not in splits:
            raise ExtractError(f"{name}: unknown split {split!r}; valid: {', '.join(splits)}")
        try:
            base = torchvision.datasets.VOCSegmentation(str(root), year=year, image_set=split, download=download)
        except Exception as exc:
            raise ExtractError(f"{name} under {root}: {_first_line(exc)}") from None
        ds = _SegPairs(base)
    else:
        if download:
            raise ExtractError("cityscapes cannot be downloaded by torchvision (registration at "
                               "https://www.cityscapes-dataset.com); unpack leftImg8bit/ and gtFine/ under --root")
        if split not in ("train", "val"):
            raise ExtractError(f"cityscapes: unknown split {split!r}; valid: train, val")
        try:
            base = torchvision.datasets.Cityscapes(str(root), split=split, mode="fine", target_type="semantic")
        except Exception as exc:
            raise ExtractError(f"cityscapes under {root}: {_first_line(exc)}") from None
        order = sorted(range(len(base.images)), key=lambda i: base.images[i])  # os.listdir order is arbitrary
        base.images, base.targets = [base.images[i] for i in order], [base.targets[i] for i in order]
        ds = _SegPairs(base, cityscapes_lut())
    if len(ds) == 0:
        raise ExtractError(f"{name} under {root}: no images")
    return _limit(ds, limit), split


# ------------------------------------------------------------------------------------------- extraction

def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ExtractError(f"unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ExtractError("--device cuda requested but CUDA is not available")
    return dev


def autocast_dtype(device: torch.device):
    """bfloat16 where the GPU supports it (no overflow), float16 otherwise; None (float32) on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class _Progress:
    """tqdm on stderr if installed, else a plain counter (at most every 2 s)."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.enabled, self.n, self.last, self.bar = total, desc, enabled, 0, 0.0, None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, leave=False)
            except ImportError:
                pass

    def update(self, k: int) -> None:
        self.n += k
        if self.bar is not None:
            self.bar.update(k)
        elif self.enabled and (self.n >= self.total or time.monotonic() - self.last > 2):
            self.last = time.monotonic()
            print(f"\r{self.desc}: {self.n}/{self.total} images", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.n:
            print(file=sys.stderr)


def _prepare_run(model, items, batch_size, workers, device):
    """(model on its device in eval mode, device, an in-order DataLoader over items, autocast context):
    channels_last and cuDNN autotuning on CUDA, bf16/fp16 autocast where the device has it."""
    dev = resolve_device(device)
    model = model.eval().to(dev)
    amp = autocast_dtype(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    loader = torch.utils.data.DataLoader(items, batch_size=batch_size, shuffle=False,
                                         num_workers=workers, pin_memory=dev.type == "cuda")
    ctx = torch.autocast(dev.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    return model, dev, loader, ctx


def _forward(model, dev, loader, ctx):
    """(model output as float32 on the CPU, the batch's second item) for each batch, in order."""
    with torch.inference_mode(), ctx:
        for x, extra in loader:
            x = x.to(dev, non_blocking=True)
            if dev.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            yield model(x).float().cpu(), extra


def run_model(model: nn.Module, transform, dataset, *, batch_size: int = 64, workers: int = 0,
              device: str = "auto", desc: str = "extract", progress: bool = True):
    """Features (float32, N x D), labels (int64) and images/s of `model` over `dataset` in order."""
    model, dev, loader, ctx = _prepare_run(model, _Transformed(dataset, transform), batch_size, workers,
                                           device)
    feats, labels, bar = [], [], _Progress(len(dataset), desc, progress)
    start = time.perf_counter()
    try:
        for out, y in _forward(model, dev, loader, ctx):
            feats.append(out.flatten(1))
            labels.append(y)
            bar.update(len(y))
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    if not feats:
        raise ExtractError("the dataset is empty")
    return torch.cat(feats).numpy(), torch.cat(labels).numpy().astype(np.int64), len(dataset) / seconds


def extract_features(model_name: str, dataset, *, checkpoint=None, arch=None, pool=None, random_init=False,
                     batch_size: int = 64, workers: int = 0, device: str = "auto", dtype: str = "float16",
                     progress: bool = True) -> np.ndarray:
    """N x D features of `model_name` for a dataset of (image, label) items (see ``load_dataset``)."""
    model, transform, _ = build_model(model_name, checkpoint=checkpoint, arch=arch, pool=pool,
                                      random_init=random_init)
    feats, _, _ = run_model(model, transform, dataset, batch_size=batch_size, workers=workers,
                            device=device, desc=model_name, progress=progress)
    return _cast(feats, dtype, model_name)


def _cast(feats: np.ndarray, dtype: str, name: str) -> np.ndarray:
    if dtype not in ("float16", "float32"):
        raise ExtractError(f"--dtype must be float16 or float32, not {dtype!r}")
    if dtype == "float16" and np.abs(feats).max(initial=0) > np.finfo(np.float16).max:
        raise ExtractError(f"{name}: features exceed the float16 range; use --dtype float32")
    return feats.astype(dtype)


class DenseTransform:
    """(image, mask) -> (normalised image tensor 3 x S x S, uint8 mask tensor S x S): the same resize (shorter
    side to S; the image with the model's interpolation, the mask with nearest neighbour) and center crop
    for both, then the model's mean/std for the image."""

    def __init__(self, size: int, interpolation=T.InterpolationMode.BILINEAR, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD):
        self.size, self.interpolation, self.mean, self.std = int(size), interpolation, tuple(mean), tuple(std)
        self.image = T.Compose([T.Resize(self.size, interpolation=interpolation), T.CenterCrop(self.size)])
        self.mask = T.Compose([T.Resize(self.size, interpolation=T.InterpolationMode.NEAREST),
                               T.CenterCrop(self.size)])
        self.normalise = T.Compose([T.ToTensor(), T.Normalize(self.mean, self.std)])

    def __call__(self, img, mask):
        if img.size != mask.size:
            raise ExtractError(f"image is {img.size[0]}x{img.size[1]} but its mask {mask.size[0]}x{mask.size[1]}")
        img, mask = self.image(img), self.mask(mask)
        return self.normalise(img), torch.from_numpy(np.array(mask, dtype=np.uint8))

    def __repr__(self) -> str:
        return (f"Resize({self.size}, {self.interpolation.value}) + CenterCrop({self.size}) [masks: "
                f"Resize({self.size}, nearest) + CenterCrop({self.size})] + mean {self.mean} std {self.std}")


def dense_transform(transform, size: int = 224) -> DenseTransform:
    """The dense (image, mask) transform at `size` with the interpolation and mean/std of a model's
    classification `transform` (torchvision ``weights.transforms()`` or a ``T.Compose``)."""
    interp, mean, std = T.InterpolationMode.BILINEAR, IMAGENET_MEAN, IMAGENET_STD
    if all(hasattr(transform, a) for a in ("interpolation", "mean", "std")):  # torchvision ImageClassification
        interp, mean, std = transform.interpolation, transform.mean, transform.std
    elif isinstance(transform, T.Compose):
        for t in transform.transforms:
            if isinstance(t, T.Resize):
                interp = t.interpolation
            elif isinstance(t, T.Normalize):
                mean, std = t.mean, t.std
    return DenseTransform(size, interp, mean, std)


class _DensePairs(torch.utils.data.Dataset):
    def __init__(self, base, transform: DenseTransform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        img, mask = self.base[i]
        return self.transform(_to_rgb(img), mask)


def run_dense(model: nn.Module, transform: DenseTransform, dataset, *, batch_size: int = 64, workers: int = 0,
              device: str = "auto", dtype: str = "float16", desc: str = "extract", progress: bool = True):
    """Dense features (`dtype`, N x h x w x D), transformed label maps (uint8, N x S x S) and images/s of
    `model` (a ``dense_model``) over a dataset of (image, mask) items in order."""
    if dtype not in ("float16", "float32"):
        raise ExtractError(f"--dtype must be float16 or float32, not {dtype!r}")
    model, dev, loader, ctx = _prepare_run(model, _DensePairs(dataset, transform), batch_size, workers,
                                           device)
    feats, maps, bar, n = None, None, _Progress(len(dataset), desc, progress), 0
    start = time.perf_counter()
    try:
        for out, m in _forward(model, dev, loader, ctx):
            f = out.numpy()
            if dtype == "float16" and np.abs(f).max(initial=0) > np.finfo(np.float16).max:
                raise ExtractError(f"{desc}: features exceed the float16 range; use --dtype float32")
            if feats is None:  # preallocated in the output dtype: N x h x w x D float32 can be GBs
                feats = np.empty((len(dataset), *f.shape[1:]), dtype=dtype)
                maps = np.empty((len(dataset), *m.shape[1:]), dtype=np.uint8)
            feats[n:n + len(f)], maps[n:n + len(f)] = f, m.numpy()
            n += len(f)
            bar.update(len(f))
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    if feats is None:
        raise ExtractError("the dataset is empty")
    return feats, maps, len(dataset) / seconds


# ------------------------------------------------------------------------------------------------ output

def _atomic_write(path: Path, write: Callable) -> None:
    """write(file) into a temporary file beside `path`, then rename: readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sidecar_path(out: str | Path) -> Path:
    return Path(out).with_suffix(".json")


def read_output(out: str | Path) -> tuple[dict, dict]:
    """(arrays, sidecar metadata) of an existing output, ({}, {}) if there is none."""
    out = Path(out)
    if not out.exists():
        return {}, {}
    try:
        with np.load(out) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:
        raise ExtractError(f"existing --out {out} is not a readable npz ({exc}); remove it") from None
    side = sidecar_path(out)
    meta = json.loads(side.read_text()) if side.exists() else {}
    return arrays, meta


def write_output(out: str | Path, arrays: dict, meta: dict) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(out, lambda f: np.savez(f, **arrays))
    _atomic_write(sidecar_path(out), lambda f: f.write(json.dumps(meta, indent=1).encode()))


def _check_same_data(meta: dict, want: dict, out: Path) -> None:
    """Resuming onto features of other images would silently misalign rows: refuse."""
    if meta and bool(meta.get("dense", False)) != bool(want.get("dense", False)):
        kind = "dense" if meta.get("dense") else "classification"
        raise ExtractError(f"{out} holds {kind} features; use another --out")
    for key in want:
        if key in meta and meta[key] != want[key]:
            raise ExtractError(f"{out} holds features of {key}={meta[key]!r}, not {want[key]!r}; "
                               "use another --out")


def _resume(out: Path, want: dict, models: list[str], checkpoint, root, load, check=None):
    """Open `out` for more models: its arrays, the models still to do and, when there are any, the
    dataset (load() → (dataset, split used)) and the metadata to write. check(arrays) may reject the file."""
    arrays, meta = read_output(out)
    _check_same_data(meta, want, out)
    if check is not None:
        check(arrays)
    todo = _todo(models, arrays, checkpoint)
    if not todo:
        return arrays, [], None, None
    ds, used_split = load()
    meta = {**want, "split_used": used_split, "root": str(root) if root else None, "n": len(ds),
            "models": meta.get("models", {})}
    return arrays, todo, ds, meta


def extract_to_npz(models: list[str], dataset: str, out: str | Path, *, root=None, split: str = "train",
                   download: bool = False, limit: int | None = None, checkpoint=None, arch=None, pool=None,
                   random_init: bool = False, batch_size: int = 64, workers: int = 0, device: str = "auto",
                   dtype: str = "float16", progress: bool = True) -> tuple[dict, list[str]]:
    """Extract every model not yet in `out` and save after each one. Returns (arrays, models extracted)."""
    out = Path(out)
    want = {"dataset": dataset, "split": split, "limit": limit}
    arrays, todo, ds, meta = _resume(out, want, models, checkpoint, root,
                                     lambda: load_dataset(dataset, root, split, download, limit))
    for name in todo:
        feats, labels, info = _extract_one(name, ds, checkpoint, arch, pool, random_init, batch_size,
                                           workers, device, progress)
        if "labels" in arrays and not np.array_equal(arrays["labels"], labels):
            raise ExtractError(f"labels differ from those in {out}: not the same images; use another --out")
        arrays = {**arrays, name: _cast(feats, dtype, name), "labels": labels}
        meta["models"][name] = {**info, "dtype": dtype, "dim": int(feats.shape[1])}
        write_output(out, arrays, meta)
        print(f"{name}\t{feats.shape[0]}x{feats.shape[1]}\t{info['images_per_s']:.1f} images/s")
    return arrays, todo


def _todo(models: list[str], arrays: dict, checkpoint) -> list[str]:
    """The models not yet in the output; fails on a bad name or file before any dataset is read."""
    todo = [m for m in models if m not in arrays]
    for m in todo:
        if checkpoint is None and m not in SSL_VITS and m not in torchvision_models():
            raise ExtractError(f"unknown model {m!r}; valid: {', '.join(available_models())}")
    if todo and checkpoint is not None and not Path(checkpoint).is_file():
        raise ExtractError(f"checkpoint {checkpoint} does not exist")
    return todo


def _extract_one(name, ds, checkpoint, arch, pool, random_init, batch_size, workers, device, progress):
    model, transform, info = build_model(name, checkpoint=checkpoint, arch=arch, pool=pool,
                                         random_init=random_init)
    feats, labels, ips = run_model(model, transform, ds, batch_size=batch_size, workers=workers,
                                   device=device, desc=name, progress=progress)
    dev = resolve_device(device)
    info.update(transform=describe_transform(transform), images_per_s=round(ips, 2), device=str(dev),
                autocast=str(autocast_dtype(dev)).replace("torch.", "") if dev.type == "cuda" else None)
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return feats, labels, info


def grid_labels(maps: np.ndarray, h: int, w: int) -> np.ndarray:
    """Label maps N x H x W -> N x h x w (uint8): per-cell majority of labelled pixels, 255 where a cell has
    none -- the rule of ``itm.downsample_labels``, which itm.py applies to full-resolution maps."""
    return itm.downsample_labels(maps, h, w).astype(np.uint8)


def _dense_labels(full: np.ndarray, grids: list[tuple[int, int]]) -> tuple[np.ndarray, dict]:
    """``labels`` for a file whose models have feature grids `grids` (first model first), and its sidecar."""
    if len(set(grids)) == 1:
        h, w = grids[0]
        return grid_labels(full, h, w), {
            "label_maps": "grid", "h": h, "w": w,
            "label_maps_note": f"transformed masks reduced to the {h}x{w} feature grid by the per-cell "
                               "majority of labelled pixels (itm.downsample_labels); 255 = no labelled pixel"}
    h, w = full.shape[1:]
    return full, {"label_maps": "full", "h": h, "w": w,
                  "label_maps_note": "the models' feature grids differ (" + ", ".join(
                      f"{a}x{b}" for a, b in dict.fromkeys(grids)) + f"): full-resolution {h}x{w} transformed "
                      "masks, which itm.py downsamples to each model's grid; 255 = ignore"}


def _same_label_maps(stored: np.ndarray, full: np.ndarray) -> bool:
    """Whether `stored` labels (grid or full resolution) come from the full-resolution maps `full`."""
    if stored.ndim != 3 or len(stored) != len(full):
        return False
    if stored.shape == full.shape:
        return np.array_equal(stored, full)
    try:
        return np.array_equal(grid_labels(full, *stored.shape[1:]), stored)
    except ValueError:
        return False


def extract_dense_to_npz(models: list[str], dataset: str, out: str | Path, *, root=None, split: str = "train",
                         download: bool = False, limit: int | None = None, size: int = 224, checkpoint=None,
                         arch=None, random_init: bool = False, batch_size: int = 64, workers: int = 0,
                         device: str = "auto", dtype: str = "float16",
                         progress: bool = True) -> tuple[dict, list[str]]:
    """``--dense``: N x h x w x D features of every model not yet in `out` and the label maps (see the module
    docstring), saved after each model. Returns (arrays, models extracted)."""
    out = Path(out)
    if size < 1:
        raise ExtractError("--size must be >= 1")
    want = {"dataset": dataset, "split": split, "limit": limit, "dense": True, "size": size}

    def dense_only(arrays):
        if any(arrays[k].ndim != 4 for k in arrays if k != "labels"):
            raise ExtractError(f"{out} holds classification features; use another --out")
    arrays, todo, ds, meta = _resume(out, want, models, checkpoint, root,
                                     lambda: load_seg_dataset(dataset, root, split, download, limit), dense_only)
    full = None
    for name in todo:
        feats, maps, info = _extract_dense_one(name, ds, size, checkpoint, arch, random_init, batch_size,
                                               workers, device, dtype, progress)
        if full is None and "labels" in arrays and not _same_label_maps(arrays["labels"], maps):
            raise ExtractError(f"label maps differ from those in {out}: not the same images; use another --out")
        if full is not None and not np.array_equal(full, maps):
            raise ExtractError(f"{name}: label maps differ from those of {todo[0]}")
        full = maps
        n, h, w, dim = feats.shape
        arrays = {**{k: v for k, v in arrays.items() if k != "labels"}, name: feats}
        labels, label_meta = _dense_labels(full, [tuple(v.shape[1:3]) for v in arrays.values()])
        arrays["labels"] = labels
        meta.update(label_meta)
        meta["models"][name] = {**info, "dtype": dtype, "dim": int(dim), "h": int(h), "w": int(w)}
        write_output(out, arrays, meta)
        print(f"{name}\t{n}x{h}x{w}x{dim}\t{info['images_per_s']:.1f} images/s")
    return arrays, todo


def _extract_dense_one(name, ds, size, checkpoint, arch, random_init, batch_size, workers, device, dtype,
                       progress):
    vit = (arch or name) in SSL_VITS
    model, transform, info = build_model(name, checkpoint=checkpoint, arch=arch, pool="cls" if vit else None,
                                         random_init=random_init)
    image_size = _vit_image_size(model)
    if image_size is not None and image_size != size:
        raise ExtractError(f"{name} takes {image_size}x{image_size} images: use --size {image_size}")
    dense = dense_model(model, arch or name)
    pairs = dense_transform(transform, size)
    feats, maps, ips = run_dense(dense, pairs, ds, batch_size=batch_size, workers=workers, device=device,
                                 dtype=dtype, desc=name, progress=progress)
    dev = resolve_device(device)
    info.update(pool="patch tokens" if image_size is not None else "feature map before global pooling",
                transform=repr(pairs), images_per_s=round(ips, 2), device=str(dev),
                autocast=str(autocast_dtype(dev)).replace("torch.", "") if dev.type == "cuda" else None)
    del model, dense
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return feats, maps, info


# --------------------------------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="extract.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="", help="comma-separated model names (--list shows them)")
    p.add_argument("--dataset", help=f"one of {', '.join(DATASETS)}; with --dense: {', '.join(SEG_DATASETS)}")
    p.add_argument("--root", help="dataset directory (or the .npz for --dataset npz)")
    p.add_argument("--split", default="train")
    p.add_argument("--download", action="store_true", help="let torchvision download the dataset")
    p.add_argument("--out", help="output .npz (resumed if it exists)")
    p.add_argument("--labels-out", help="also write the labels as .npy")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--limit", type=int, help="random subset of N images (seed 0), for a quick look")
    p.add_argument("--pool", choices=["cls", "mean"], help="ViT pooling (default: the model's own)")
    p.add_argument("--checkpoint", help="local weights file (with --arch)")
    p.add_argument("--arch", help="architecture of --checkpoint: a torchvision name or an SSL ViT name")
    p.add_argument("--random-init", action="store_true", help="no weights (tests, timing)")
    p.add_argument("--dense", action="store_true",
                   help=f"dense features N x h x w x D and label maps, for segmentation ({', '.join(SEG_DATASETS)})")
    p.add_argument("--size", type=int, help="--dense: resize (shorter side) + center crop to SIZE x SIZE "
                                            "(default 224)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--list", action="store_true", help="list models and datasets, then exit")
    return p


def _model_names(args) -> list[str]:
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.checkpoint is None:
        if not names:
            raise ExtractError("--models is required")
        return names
    if len(names) > 1:
        raise ExtractError("--checkpoint loads one model: give at most one --models name")
    if args.arch is None and not (names and names[0] in available_models()):
        raise ExtractError("--checkpoint needs --arch (a torchvision model name or an SSL ViT name)")
    return names or [Path(args.checkpoint).name.split(".")[0]]


def _run_cli(args) -> int:
    if args.list:
        print("models:", " ".join(available_models()))
        print("datasets:", " ".join(DATASETS))
        print("segmentation datasets (--dense):", " ".join(SEG_DATASETS))
        print("preprocessing of the paper's models and the SFDA CNNs:")
        for name in dict.fromkeys(PAPER_MODELS + SFDA_CNNS):
            print(f"  {name:15s} {preprocessing(name)}")
        return 0
    if args.dataset is None or args.out is None:
        raise ExtractError("--dataset and --out are required")
    names = _model_names(args)
    if args.checkpoint is not None and args.arch is not None and args.arch not in available_models():
        raise ExtractError(f"unknown model {args.arch!r}; valid: {', '.join(available_models())}")
    if args.dense:
        if args.pool is not None:
            raise ExtractError("--pool does not apply to --dense (ViTs give their patch tokens)")
        arrays, done = extract_dense_to_npz(
            names, args.dataset, args.out, root=args.root, split=args.split, download=args.download,
            limit=args.limit, size=224 if args.size is None else args.size, checkpoint=args.checkpoint,
            arch=args.arch, random_init=args.random_init, batch_size=args.batch_size, workers=args.workers,
            device=args.device, dtype=args.dtype, progress=not args.quiet)
    else:
        if args.size is not None:
            raise ExtractError("--size applies to --dense only")
        arrays, done = extract_to_npz(
            names, args.dataset, args.out, root=args.root, split=args.split, download=args.download,
            limit=args.limit, checkpoint=args.checkpoint, arch=args.arch, pool=args.pool,
            random_init=args.random_init, batch_size=args.batch_size, workers=args.workers,
            device=args.device, dtype=args.dtype, progress=not args.quiet)
    if args.labels_out:
        Path(args.labels_out).parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(Path(args.labels_out), lambda f: np.save(f, arrays["labels"]))
    skipped = [m for m in names if m not in done]
    if skipped:
        print(f"already in {args.out}: {', '.join(skipped)}", file=sys.stderr)
    print(f"wrote {args.out}: {len(arrays['labels'])} images, models {', '.join(k for k in arrays if k != 'labels')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run_cli(args)
    except ExtractError as exc:
        print(f"extract.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nextract.py: interrupted; finished models are in {args.out}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""extract.py -- pre-trained models -> features: the only module of the project that imports torch.

Writes the ``feats.npz`` that ``itm.py`` and ``baselines.py`` rank (one N x D array per model, plus
``labels``, and a JSON sidecar recording weights, pooling and preprocessing), resuming where it stopped::

    python extract.py --models resnet18,mobilenet_v2,dino_vitb16 --dataset cifar100 --root DATA --out feats.npz
    python extract.py --models timm:convnext_tiny.fb_in22k_ft_in1k,hf:facebook/dinov2-small,resnet50 \
        --dataset imagefolder --root DIR --out feats.npz
    python extract.py --dense --models resnet18,dino_vitb16 --dataset voc2012 --root DATA --out seg.npz
    python itm.py --features feats.npz

``timm:NAME`` and ``hf:REPO_ID`` (or ``hf:FOLDER``) name models of the two hubs, with their own preprocessing,
weights from the hubs' caches (the extras ``timm`` and ``hf``). ``python extract.py --list`` shows every
model (its pooling, preprocessing and weights) and dataset; ``--list --models NAME,...`` the rows of those
models; docs/usage.md describes the output, the models, the checkpoint conversion and the dense features.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import os
import re
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

try:
    import torch
    import torchvision
    from torch import nn
    from torchvision import transforms as T
except ModuleNotFoundError as _exc:  # the rest of the package runs without torch; this module cannot
    if _exc.name not in ("torch", "torchvision"):
        raise
    _HINT = f'{_exc.name} is not installed: pip install "itm-transferability[extract]"'
    if __name__ == "__main__":
        sys.exit(f"extract.py: error: {_HINT}")
    raise ModuleNotFoundError(_HINT, name=_exc.name) from None

try:  # installed: a module of the itm_transferability package; in a checkout or vendored: beside itm.py
    from . import itm
except ImportError:
    import itm

PROG = itm.prog_name("extract.py", "itm-extract")  # the name in this CLI's messages

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ExtractError(ValueError):
    """Bad input: reported by the CLI (``itm.run_cli``) as one line on stderr, exit status 1."""


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


def torchvision_models() -> list[str]:
    """Names of torchvision's ImageNet classification models."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def available_models() -> list[str]:
    return sorted(SSL_VITS) + torchvision_models()


def _is_vit(arch: str) -> bool:
    return arch in SSL_VITS or arch in TORCHVISION_VITS


def _check_model(name: str, checkpoint=None, arch: str | None = None, pool: str | None = None,
                 dense: bool = False) -> None:
    """Refuse, before any work, a model that cannot be built: unknown name, missing file, --pool on a CNN; a
    hub model (timm:, hf:) with an option it does not take, or whose library is not installed."""
    if pool not in (None, "cls", "mean"):
        raise ExtractError(f"--pool must be cls or mean, got {pool!r}")
    hub = hub_of(name)
    if hub is not None or hub_of(arch or ""):
        if checkpoint is not None or arch is not None:
            raise ExtractError(f"--checkpoint/--arch load torchvision and SSL ViT architectures, not {arch or name} "
                               "(hf:FOLDER reads a local save_pretrained folder)")
        if dense:
            raise ExtractError(f"--dense takes torchvision and SSL ViT models, not {name}")
        _check_hub(name, *hub, pool)
        return
    arch = arch or name
    if arch not in SSL_VITS and arch not in torchvision_models():
        raise ExtractError(f"unknown model {arch!r}; valid: {', '.join(available_models())}, "
                           "or a hub model timm:NAME, hf:REPO_ID, hf:FOLDER")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise ExtractError(f"checkpoint {checkpoint} " + ("is a folder, not a weights file" if Path(checkpoint).is_dir()
                                                         else "does not exist"))
    if pool is not None and not _is_vit(arch):
        raise ExtractError(f"--pool applies to ViTs only, not to {arch}")


# ------------------------------------------------------------------------------------------ preprocessing

def default_transform(size: int = 224) -> Callable:
    """Resize(size, bicubic) + CenterCrop(size) + ImageNet normalisation: for models without their own."""
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def describe_transform(transform) -> str:
    return " ".join(repr(transform).split())


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
    """(official key, ViTFeatures key) pairs: timm's ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,
    mlp.fc2}`` -> torchvision's ``encoder_layer_N.{ln_1,self_attention.in_proj,..out_proj,ln_2,mlp.0,mlp.3}``;
    the final ``norm`` -> ``encoder.ln``, or ``fc_norm`` (LayerNorm after mean pooling) -> ``post_norm``."""
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
    _check_keys(state, [s for s, _ in table], "the ViT layout")
    mapped = {d: state[s] for s, d in table}
    return mapped, {"pooled_norm": pooled_norm, "rel_pos_bias": rel, "notes": notes}


def _names(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _check_keys(state: dict, expected, what: str) -> None:
    """A one-line error naming what does not fit `expected` (key names, or a state dict whose shapes count)."""
    expected = expected if isinstance(expected, dict) else dict.fromkeys(expected)
    missing = [k for k in expected if k not in state]
    unknown = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if v is not None and k in state and tuple(state[k].shape) != tuple(v.shape)]
    parts = [f"{label}: {_names(keys, n)}" for label, keys, n in
             (("missing keys", missing, 8), ("unknown keys", unknown, 8), ("shape mismatch", shapes, 4)) if keys]
    if parts:
        raise ExtractError(f"checkpoint does not match {what}: " + "; ".join(parts))


def vit_from_state(state: dict, spec: ViTSpec, pool: str | None = None) -> tuple[ViTFeatures, dict]:
    """Build the ViTFeatures of `spec` from an official-layout state dict (see ``_vit_key_table``)."""
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
    _check_keys(state, model.state_dict(), f"architecture {arch}")
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
            raise ExtractError(f"cannot read checkpoint {path}: {itm.one_line(exc)}") from None
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise ExtractError(f"cannot read checkpoint {path}: {itm.one_line(exc2)}") from None
        print(f"note: {path.name} holds non-tensor objects; loaded with weights_only=False", file=sys.stderr)
    for key in ("state_dict", "model", "teacher"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ExtractError(f"checkpoint {path} holds no state dict of tensors")
    return ckpt


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_weights(model: str, url: str | None, filename: str, sha256: str | None = None,
                  source: str = "") -> Path:
    """The weights file of `model` in torch.hub's cache (``torch.hub.get_dir()/checkpoints``), downloaded
    there once (hash-checked when a prefix is known); a one-line error naming the model if it cannot be."""
    dst = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if dst.is_file():
        return dst
    if url is None:
        raise ExtractError(f"{model} has no direct download: get it from {source} and save it as "
                           f"{dst}, or pass --checkpoint FILE --arch {model}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url} -> {dst}", file=sys.stderr)
    try:  # download_url_to_file writes a temporary file and renames it: no partial file in the cache
        torch.hub.download_url_to_file(url, str(dst), hash_prefix=sha256, progress=True)
    except (OSError, RuntimeError) as exc:  # URLError, HTTPError, timeouts are OSErrors; a bad hash is not
        raise ExtractError(f"{model}: the weights could not be fetched from {url} ({itm.one_line(exc)}); "
                           f"offline? they are expected in {dst} (copy the file there, or pass "
                           f"--checkpoint FILE --arch {model})") from None
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
        filename = Path(weights.url).name  # torchvision's own cache name, its sha256 prefix inside
        hash_prefix = torch.hub.HASH_REGEX.search(filename)
        fetch_weights(arch, weights.url, filename, hash_prefix and hash_prefix.group(1))
        model = torchvision.models.get_model(arch, weights=weights)  # now read from the cache
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
    else:
        model = _strip_classifier(model, arch)
    info = {"arch": arch, "weights": described, "pool": pool or ("cls" if _is_vit(arch) else "avg")}
    return model.eval(), transform, info


def _build_vit(spec: ViTSpec, checkpoint: Path | None, random_init: bool, pool: str | None, state=None):
    """An official-layout ViT: random, from `state` / `checkpoint`, or from its release (`spec.url`)."""
    pool = pool or spec.pool
    if random_init and checkpoint is None:
        model, layout, described = new_vit_features(spec, pool), {}, "random init"
    else:
        path = checkpoint or fetch_weights(spec.name, spec.url, spec.filename, spec.sha256, spec.source)
        model, layout = vit_from_state(load_checkpoint(path) if state is None else state, spec, pool)
        described = f"{spec.url or path} (file {path.name}, sha256 {_sha256(path)})"
    info = {"arch": spec.name, "weights": described, "pool": pool, "conversion": layout.get("notes", [])}
    return model.eval(), default_transform(spec.image_size), info


# ------------------------------------------------------------------------ hub models: timm, Hugging Face
# timm:NAME and hf:REPO_ID / hf:FOLDER. Their libraries are optional extras, imported only when such a model
# is named. Weights live in the hubs' own caches (HF_HOME; TORCH_HOME for timm weights known by URL only): a
# cached file is used without going online, a missing one is downloaded there -- both before any image is
# read, so that an offline run fails at once, naming the model.

HUBS = {"timm": ("timm", "timm"), "hf": ("transformers", "hf")}  # prefix: (library, extra installing it)
HUB_EXAMPLES = {"timm": "timm:convnext_tiny.fb_in22k_ft_in1k", "hf": "hf:facebook/dinov2-small"}
HF_CONFIGS = ("config.json", "preprocessor_config.json")
# transformers' weight files, in its order of preference; an index names the shards of a sharded checkpoint
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json")
_TIMM_POOL = {"cls": "token", "mean": "avg"}  # --pool -> timm's global_pool of a token model
HF_POOLING = {"pooler_output": "pooler_output, the pooled output the model defines",
              "cls": "class token: last_hidden_state[:, 0]",
              "mean": "mean of last_hidden_state over its tokens (or feature-map positions)"}


def hub_of(name: str) -> tuple[str, str] | None:
    """('timm' | 'hf', the rest of the name) of a hub model name; None for torchvision and SSL ViT names."""
    prefix, sep, rest = name.partition(":")
    return (prefix, rest) if sep and prefix in HUBS else None


def _import_hub(hub: str, name: str):
    """The library of a hub (timm, transformers), or a one-line error naming the extra that installs it."""
    module, extra = HUBS[hub]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in (module, "huggingface_hub", "safetensors"):
            raise
        raise ExtractError(f'{name}: {exc.name} is not installed: pip install "itm-transferability[{extra}]"') \
            from None


def _check_hub(name: str, hub: str, rest: str, pool: str | None) -> None:
    """Refuse, before any work, a hub model that cannot be built: library missing, unknown timm name or tag,
    --pool where it does not apply. Whether its files are at hand is `fetch_hub_files`'s part."""
    lib = _import_hub(hub, name)
    if not rest:
        raise ExtractError(f"{name}: no model after '{hub}:' (e.g. {HUB_EXAMPLES[hub]})")
    if hub == "hf":
        if pool is not None:
            raise ExtractError(f"--pool does not apply to {name}: it gives the pooled output it defines "
                               f"(--list --models {name} shows which)")
        return
    if not lib.is_model(rest):
        raise ExtractError(f"unknown timm model {rest!r} (timm {lib.__version__}; timm.list_models() names them)")
    _timm_cfg(name, rest)  # an unknown tag fails here
    if pool is not None:
        _set_timm_pool(_timm_on_meta(rest), pool, name)


def fetch_hub_files(name: str, random_init: bool = False) -> None:
    """Make the files a hub model needs local (see `_hub_file`); nothing for other names."""
    hub = hub_of(name)
    if hub is not None and hub[0] == "hf":
        _hf_folder(name, hub[1], random_init)
    elif hub is not None and not random_init:
        _timm_weights(name, hub[1])


def _hub_file(name: str, repo: str, filenames, revision: str | None = None) -> Path:
    """The local path of the first of `filenames` that hub repo `repo` holds: its copy in the Hugging Face cache
    when there is one (no network then), else downloaded into it; one line naming the model when neither can
    be (offline, no network, no such repo)."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.utils import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError)
    try:
        for filename in filenames:
            cached = try_to_load_from_cache(repo, filename, revision=revision)
            if isinstance(cached, str):  # else None (not cached) or a marker: the hub said it has no such file
                return Path(cached)
    except ValueError as exc:  # HFValidationError: not a repo id
        raise ExtractError(f"{name}: {repo!r} is neither a folder nor a hub repo id ({itm.one_line(exc)})") from None
    missing = f"{repo}/{filenames[0]} is not in the Hugging Face cache {constants.HF_HUB_CACHE}"
    todo = "run once with network to download it, or set HF_HOME to a cache that has it"
    if constants.HF_HUB_OFFLINE:
        raise ExtractError(f"{name}: {missing} and HF_HUB_OFFLINE is set: {todo}")
    unreachable = _hub_unreachable()
    if unreachable:
        raise ExtractError(f"{name}: {missing} and the hub cannot be reached ({unreachable}): {todo}")
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo, filename, revision=revision))
        except LocalEntryNotFoundError:  # no connection; a subclass of EntryNotFoundError, so caught first
            raise ExtractError(f"{name}: {missing} and the hub cannot be reached: {todo}") from None
        except RepositoryNotFoundError:  # gated repos too
            raise ExtractError(f"{name}: no repository {repo} on the Hugging Face hub (private or gated? log in "
                               "with `hf auth login`)") from None
        except EntryNotFoundError:
            continue
        except (HfHubHTTPError, OSError) as exc:
            raise ExtractError(f"{name}: cannot download {filename} from {repo}: {itm.one_line(exc)}") from None
    raise ExtractError(f"{name}: {repo} has none of {', '.join(filenames)}")


def _hub_unreachable() -> str | None:
    """Why the hub does not answer (one line), or None if it does. Asked before a download: without network,
    huggingface_hub retries a missing file for ~20 s, warning at each try, before it gives up."""
    from huggingface_hub import constants, get_session
    try:
        get_session().head(constants.ENDPOINT, timeout=10)
    except Exception as exc:  # httpx / requests errors, by the hub library's version; all mean "no answer"
        return itm.one_line(exc)
    return None


def _snapshot(path: Path) -> str:
    """'@COMMIT' of a file in a Hugging Face cache snapshot (…/snapshots/COMMIT/file), else ''."""
    return f"@{path.parent.name}" if path.parent.parent.name == "snapshots" else ""


def _described_file(path: Path, source: str) -> str:
    """'source (file PATH, sha256 …)'; the hash is the cache's blob name when it is one (no re-read of GBs)."""
    blob = Path(os.path.realpath(path)).name
    sha = blob if re.fullmatch(r"[0-9a-f]{64}", blob) else _sha256(path)
    return f"{source} (file {path}, sha256 {sha})"


# timm

class TimmFeatures(nn.Module):
    """A timm model -> its pooled pre-logits features, the input of its classifier, by timm's own split:
    ``forward_features`` (the trunk and its final norm), then ``forward_head(pre_logits=True)`` (the pooling)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def _timm_cfg(name: str, rest: str):
    """timm's pretrained config of `rest` (architecture[.tag], the default tag if none), or None."""
    import timm
    try:
        return timm.models.get_pretrained_cfg(rest)
    except RuntimeError as exc:  # "Invalid pretrained tag (x) for arch."
        raise ExtractError(f"{name}: {itm.one_line(exc)}") from None


def _timm_on_meta(rest: str) -> nn.Module:
    """The architecture alone (no memory, no init compute), for checks and --list; built on the CPU where its
    constructor reads tensor values (older timm ViTs: ``.item()`` of a linspace)."""
    import timm
    try:
        with torch.device("meta"):
            return timm.create_model(rest, pretrained=False)
    except (NotImplementedError, RuntimeError):
        return timm.create_model(rest, pretrained=False)


def timm_transform(model: nn.Module):
    """(transform, data config): timm's own eval preprocessing of `model` -- its pretrained config's input size,
    interpolation, crop and mean/std, through timm.data.resolve_model_data_config and create_transform."""
    import timm.data
    config = timm.data.resolve_model_data_config(model)
    return timm.data.create_transform(**config, is_training=False), config


def _timm_global_pool(model: nn.Module) -> str | None:
    """timm's name of the pooling before the classifier ('token', 'avg', 'map', ...), where it has one."""
    pool = getattr(model, "global_pool", None)
    if pool is None:  # ConvNeXt and others pool in their head
        pool = getattr(getattr(model, "head", None), "global_pool", None)
    pool = getattr(pool, "pool_type", pool)  # SelectAdaptivePool2d
    return pool if isinstance(pool, str) else None


def _has_tokens(model: nn.Module) -> bool:
    """A timm model whose trunk gives tokens and whose global_pool picks among them: ViT, EVA, BEiT, ..."""
    return hasattr(model, "num_prefix_tokens") and isinstance(getattr(model, "global_pool", None), str)


def _set_timm_pool(model: nn.Module, pool: str, name: str) -> None:
    """--pool: a token model's global_pool, set by timm's reset_classifier (the head it resets is unused)."""
    if not _has_tokens(model):
        raise ExtractError(f"--pool applies to ViTs only (timm models with tokens), not to {name}")
    if pool == "cls" and getattr(model, "cls_token", None) is None:
        raise ExtractError(f"{name} has no class token: use --pool mean, or no --pool for its own pooling")
    model.reset_classifier(0, global_pool=_TIMM_POOL[pool])


def _timm_pooling(model: nn.Module) -> tuple[str, str]:
    """(pool, description) of a timm model's pre-logits: 'cls' / 'mean' for token models, else timm's name."""
    global_pool, text = _timm_global_pool(model), "pre-logits: forward_head(forward_features(x), pre_logits=True)"
    if global_pool is None:
        return "the model's own", text
    pool = {"token": "cls", "avg": "mean"}.get(global_pool, global_pool) if _has_tokens(model) else global_pool
    return pool, f"{text}, global_pool={global_pool!r}"


def _safetensors_first(filename: str) -> list[str]:
    """The hub file names timm tries for a weights file: its .safetensors twin first, then the file itself."""
    twin = {"pytorch_model.bin": "model.safetensors", "open_clip_pytorch_model.bin": "open_clip_model.safetensors"
            }.get(filename, filename[:-4] + ".safetensors" if filename.endswith(".bin") else None)
    return [twin, filename] if twin else [filename]


def _timm_weights(name: str, rest: str) -> tuple[Path, str]:
    """(local file, where it comes from) of a timm model's pretrained weights, where timm itself takes them: its
    Hugging Face repo (HF_HOME cache), or for older weights known by URL only, torch.hub's cache (TORCH_HOME)."""
    cfg = _timm_cfg(name, rest)
    if cfg is not None and cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        path = _hub_file(name, repo, _safetensors_first(cfg.hf_hub_filename or "pytorch_model.bin"), revision or None)
        return path, f"{repo}{_snapshot(path)}"
    if cfg is not None and cfg.url:
        return fetch_weights(name, cfg.url, Path(urllib.parse.urlparse(cfg.url).path).name), cfg.url
    raise ExtractError(f"{name}: timm has no pretrained weights for it: use --random-init, or a tag that has "
                       "weights (timm.list_pretrained() names them)")


def _build_timm(name: str, rest: str, pool: str | None, random_init: bool):
    import timm
    kwargs, described = {}, f"random init, preprocessing of timm's pretrained config {rest}"
    if not random_init:
        path, source = _timm_weights(name, rest)
        # timm reads the file located above (the cache, or a fresh download) and never goes online itself
        kwargs = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}
        described = _described_file(path, source)
    try:
        model = timm.create_model(rest, **kwargs)
    except (RuntimeError, OSError, ValueError) as exc:  # a file that does not fit the architecture
        raise ExtractError(f"{name}: cannot load its weights: {itm.one_line(exc)}") from None
    if pool is not None:
        _set_timm_pool(model, pool, name)
    transform, config = timm_transform(model)
    pool_name, pooling = _timm_pooling(model)
    info = {"arch": name, "library": f"timm {timm.__version__}", "weights": described, "pool": pool_name,
            "pooling": pooling, "data_config": config}
    return TimmFeatures(model).eval(), transform, info


# Hugging Face transformers

class HFFeatures(nn.Module):
    """A transformers vision model -> one vector per image by `pool` (see ``HF_POOLING``)."""

    def __init__(self, model: nn.Module, pool: str):
        super().__init__()
        self.model, self.pool = model, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x)
        if self.pool == "pooler_output":
            return out.pooler_output.flatten(1)  # CNNs give B x C x 1 x 1
        h = out.last_hidden_state
        if self.pool == "cls":
            return h[:, 0]
        return h.flatten(2).mean(dim=2) if h.ndim == 4 else h.mean(dim=1)  # CNN map B x C x h x w, or tokens


class HFProcessor:
    """PIL image -> the pixel_values (3 x H x W) of the repo's own image processor."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, img) -> torch.Tensor:
        return self.processor(images=img, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        settings = {k: v for k, v in self.processor.to_dict().items() if not k.startswith("_")}
        return f"{type(self.processor).__name__}({json.dumps(settings, sort_keys=True, default=str)})"


def _hf_local(rest: str) -> Path | None:
    """The folder of hf:FOLDER; None for a repo id. A path-like name that is no folder is refused."""
    path = Path(rest).expanduser()
    if path.is_dir():
        return path
    if rest.startswith((".", "/", "~")) or rest.count("/") > 1:
        raise ExtractError(f"hf:{rest}: no such folder (a repo id reads org/name)")
    return None


def _hf_folder(name: str, rest: str, random_init: bool) -> Path:
    """A local folder with the model's config.json and preprocessor_config.json and, unless `random_init`, its
    weights: FOLDER itself, or the repo's snapshot in the Hugging Face cache (files downloaded into it if missing)."""
    local = _hf_local(rest)
    if local is not None:
        for needed in HF_CONFIGS:
            if not (local / needed).is_file():
                raise ExtractError(f"{name}: no {needed} in {local}")
        if not random_init and not any((local / f).is_file() for f in HF_WEIGHTS):
            raise ExtractError(f"{name}: no weights ({', '.join(HF_WEIGHTS)}) in {local}; --random-init builds "
                               "the model from its config.json")
        return local
    config = _hub_file(name, rest, ["config.json"])
    _hub_file(name, rest, ["preprocessor_config.json"])
    if not random_init:
        weights = _hub_file(name, rest, HF_WEIGHTS)
        if weights.name.endswith(".index.json"):  # sharded: every shard the index names
            for shard in sorted(set(json.loads(weights.read_text())["weight_map"].values())):
                _hub_file(name, rest, [shard])
    return config.parent


@contextlib.contextmanager
def _quiet_transformers(transformers):
    """transformers' loading logs and bars would bury this CLI's progress; we check missing weights ourselves."""
    logging = transformers.utils.logging
    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def _vision_tower(model: nn.Module) -> tuple[nn.Module, str]:
    """(the module that maps pixel_values to features, its key prefix): the image tower of a two-tower model
    (CLIP, SigLIP: ``vision_model``), else the model."""
    tower = getattr(model, "vision_model", None)
    return (tower, "vision_model.") if isinstance(tower, nn.Module) else (model, "")


def hf_pooling(tower: nn.Module, sample: torch.Tensor, pooler_loaded: bool = True) -> str:
    """'pooler_output' when the model returns one (and its weights were loaded), else 'cls' when it has a
    class token, else 'mean' -- decided on one forward pass of `sample` (a batch of the processor's size)."""
    with torch.inference_mode():
        out = tower(pixel_values=sample)
    if pooler_loaded and getattr(out, "pooler_output", None) is not None:
        return "pooler_output"
    if any(re.search(r"(^|\.)(cls_token|class_embedding)$", n) for n, _ in tower.named_parameters()):
        return "cls"
    return "mean"


def _hf_load(name: str, folder: Path, random_init: bool, device: str | None = None):
    """(model, processor, missing weight keys) from a folder; transformers never goes online for a folder.
    `device` 'meta': the random-init architecture alone, for --list."""
    transformers = _import_hub("hf", name)
    with _quiet_transformers(transformers):
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(folder)
            if random_init:
                config = transformers.AutoConfig.from_pretrained(folder)
                with torch.device(device) if device else contextlib.nullcontext():
                    return transformers.AutoModel.from_config(config, dtype=torch.float32), processor, []
            model, loading = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32,
                                                                    output_loading_info=True)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ExtractError(f"{name}: cannot build it from {folder}: {itm.one_line(exc)}") from None
    return model, processor, sorted(loading["missing_keys"])


def _build_hf(name: str, rest: str, random_init: bool):
    transformers = _import_hub("hf", name)
    folder = _hf_folder(name, rest, random_init)
    model, processor, missing = _hf_load(name, folder, random_init)
    tower, prefix = _vision_tower(model)
    missing = [k[len(prefix):] for k in missing if k.startswith(prefix)]
    # a pooler/head absent from the checkpoint is freshly random (ViTModel from DINO weights): not used
    random_pooler = [k for k in missing if re.match(r"(.*\.)?(pooler|head)\.", k)]
    others = [k for k in missing if k not in random_pooler]
    if others:
        raise ExtractError(f"{name}: the checkpoint in {folder} lacks {len(others)} weights of "
                           f"{type(tower).__name__}: {_names(others)}")
    transform = HFProcessor(processor)
    tower.eval()
    pool = hf_pooling(tower, transform(_blank_image())[None], pooler_loaded=not random_pooler)
    notes = [f"pooler weights not in the checkpoint ({_names(random_pooler, 4)}): its pooled output is not "
             "used"] if random_pooler else []
    source = str(folder) if _hf_local(rest) else f"{rest}{_snapshot(folder / 'config.json')} ({folder})"
    described = f"random init from {folder / 'config.json'}" if random_init else source
    info = {"arch": name, "library": f"transformers {transformers.__version__}", "weights": described,
            "pool": pool, "pooling": HF_POOLING[pool] + (f" of {prefix[:-1]}" if prefix else ""),
            "model_class": type(tower).__name__, "notes": notes}
    return HFFeatures(tower, pool).eval(), transform, info


def _blank_image():
    from PIL import Image
    return Image.new("RGB", (256, 256))


def build_model(name: str, *, checkpoint: str | Path | None = None, arch: str | None = None,
                pool: str | None = None, random_init: bool = False):
    """(model: images -> features, transform: PIL image -> tensor, info dict) for a model name.

    `checkpoint` loads a local file into `arch` (default: `name`). `random_init` skips all weights
    (torchvision ``weights=None``; timm ``pretrained=False``; transformers: built from config.json) -- for tests
    and timing; the random weights are drawn from seed 0 (torch's global generator is left as it was), so the
    same command gives the same features. ``timm:NAME`` and ``hf:REPO_ID`` / ``hf:FOLDER`` are hub models (see
    ``_build_timm``, ``_build_hf``).
    """
    if random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            return _build_model(name, checkpoint, arch, pool, True)
    return _build_model(name, checkpoint, arch, pool, False)


RANDOM_INIT_SEED = 0


def _build_model(name, checkpoint, arch, pool, random_init):
    _check_model(name, checkpoint, arch, pool)
    hub = hub_of(name)
    if hub is not None:
        return _build_timm(name, hub[1], pool, random_init) if hub[0] == "timm" else \
            _build_hf(name, hub[1], random_init)
    arch = arch or name
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if arch in SSL_VITS:
        return _build_vit(SSL_VITS[arch], ckpt, random_init, pool)
    if ckpt is not None and arch in TORCHVISION_VITS:  # torchvision or official (timm) key names
        state = load_checkpoint(ckpt)
        if "class_token" not in state and any(k.endswith("cls_token") for k in state):
            return _build_vit(TORCHVISION_VITS[arch], ckpt, random_init, pool, state)
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
    """A model of ``build_model`` -> images B x 3 x H x W to its dense features B x h x w x D: a ViT's patch
    tokens after its final norm, a CNN's last feature map before its global pool (channels last)."""
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
        try:
            z = np.load(path, allow_pickle=False)
        except (OSError, EOFError, ValueError) as exc:  # numpy says "pickled data" of what is no .npy/.npz
            raise ExtractError(f"cannot read {path}: " + ("not an .npz archive" if isinstance(exc, ValueError)
                                                          else itm.one_line(exc))) from None
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ExtractError(f"{path}: expected an .npz of images and labels, got one array")
        with z:
            pairs = [(f"{split}_images", f"{split}_labels"), (f"x_{split}", f"y_{split}"),
                     ("images", "labels"), ("x", "y")]
            found = next(((x, y) for x, y in pairs if x in z.files and y in z.files), None)
            if found is None:
                raise ExtractError(f"{path}: no image/label arrays for split {split!r} "
                                   f"(looked for {', '.join('/'.join(p) for p in pairs)}; has {', '.join(z.files)})")
            try:
                self.images, labels = z[found[0]], z[found[1]].reshape(-1)
            except (OSError, EOFError, ValueError) as exc:
                raise ExtractError(f"cannot read {path}: {itm.one_line(exc)}") from None
        self.labels = self._check(path, found, self.images, labels)

    @staticmethod
    def _check(path, names, images, labels) -> np.ndarray:
        """The labels as int64, after refusing (one line) what would fail or go wrong image by image: images
        that are not N×H×W, N×H×W×C (C = 1, 3, 4) or N×C×H×W (C = 1, 3), neither uint8 nor floats (in [0, 1],
        read as such: other integers would saturate), non-finite floats, labels that are no integers."""
        if len(images) != len(labels):
            raise ExtractError(f"{path}: {len(images)} images but {len(labels)} labels")
        shape, one = images.shape, images.shape[1:]
        if len(one) == 3 and one[0] in (1, 3) and one[-1] not in (1, 3):  # C×H×W, as __getitem__ reads it
            one = (*one[1:], one[0])
        if not (len(one) == 2 or (len(one) == 3 and one[-1] in (1, 3, 4))) or min(one[:2], default=0) < 1 \
                or not (images.dtype == np.uint8 or images.dtype.kind == "f"):
            raise ExtractError(f"{path}: {names[0]} must be N×H×W, N×H×W×C (C = 1, 3 or 4) or N×C×H×W (C = 1 or "
                               f"3), uint8 or floats in [0, 1]; got shape {shape} of {images.dtype}")
        if images.dtype.kind == "f" and not np.isfinite(images).all():
            raise ExtractError(f"{path}: {names[0]} contain NaN/Inf values")
        if labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
            labels = labels.astype(np.int64)
        if labels.dtype.kind not in "iub":
            raise ExtractError(f"{path}: {names[1]} must be integer class ids, got {labels.dtype}"
                               + (f" (e.g. {labels[0].item()!r})" if labels.size else ""))
        return labels.astype(np.int64)

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
        raise _dataset_error(name, root, exc) from None


def _dataset_error(name: str, root, exc: Exception) -> ExtractError:
    """torchvision's message as one line, with its advice to use `download=True` in the CLI's words."""
    return ExtractError(f"{name} under {root}: {itm.one_line(exc).replace('download=True', '--download')}")


def _root(name: str, root, download: bool) -> Path:
    """--root of a dataset read from disk: required, and existing unless torchvision is to download it."""
    if root is None:
        raise ExtractError(f"--root is required for dataset {name}")
    if not Path(root).exists() and not download:
        raise ExtractError(f"--root {root} does not exist")
    return Path(root)


def load_dataset(name: str, root: str | Path | None = None, split: str = "train", download: bool = False,
                 limit: int | None = None, fake_size: int = 100):
    """A dataset of (untransformed image, int label) items, and the split actually used."""
    if name in SEG_DATASETS:
        raise ExtractError(f"{name} is a segmentation dataset: use --dense")
    if name.endswith(".npz") or name == "npz":
        if name == "npz" and root is None:
            raise ExtractError("--dataset npz reads the .npz given as --root; or give --dataset PATH.npz")
        path = Path(root if name == "npz" else name)
        if not path.is_file():
            raise ExtractError(f"dataset file {path} does not exist")
        ds = NpzImages(path, split)
    elif name == "fake":
        ds = torchvision.datasets.FakeData(size=limit or fake_size, image_size=(3, 224, 224), num_classes=10)
    elif name == "imagefolder":
        root = _root(name, root, False)
        folder = root / split if (root / split).is_dir() else root
        try:
            ds = torchvision.datasets.ImageFolder(str(folder))
        except Exception as exc:
            raise _dataset_error(name, folder, exc) from None
    elif name in TORCHVISION_DATASETS:
        ds, split = _torchvision_dataset(name, _root(name, root, download), split, download)
    else:
        raise ExtractError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    return _limit(ds, limit), split


def _limit(ds, limit: int | None):
    """A seeded random subset (original order kept): the first N of a class-sorted set would be one class."""
    if limit is not None and limit < 1:
        raise ExtractError(f"--limit must be ≥ 1, got {limit}")
    if limit is None or limit >= len(ds):
        return ds
    idx = np.sort(np.random.default_rng(0).choice(len(ds), size=limit, replace=False))
    return torch.utils.data.Subset(ds, idx.tolist())


class _Transformed(torch.utils.data.Dataset):
    """(image, label) -> (tensor, label); `dense`: (image, mask) -> transform(image, mask), both tensors."""

    def __init__(self, base, transform, dense: bool = False):
        self.base, self.transform, self.dense = base, transform, dense

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        img, target = self.base[i]
        return self.transform(_to_rgb(img), target) if self.dense else (self.transform(_to_rgb(img)), int(target))


# ------------------------------------------------------------------------------- segmentation datasets

SEG_DATASETS = ["voc2012", "voc2007", "cityscapes", "segfolder"]
IGNORE = itm.IGNORE  # label-map value of unlabelled pixels
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
                                   f"{itm.one_line(exc)}") from None
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
        raise ExtractError(f"--dense needs a segmentation dataset ({', '.join(SEG_DATASETS)}), got {name!r}")
    root = _root(name, root, download and name.startswith("voc"))
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
            raise _dataset_error(name, root, exc) from None
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
            raise _dataset_error(name, root, exc) from None
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
            self.bar.refresh()  # the final count is shown once even when tqdm's rate limit skipped it
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
    # never a larger batch than the dataset, nor more loading processes than batches (--workers 10**20
    # would otherwise fork until memory runs out; --batch-size 10**20 overflows the sampler)
    batch_size = max(1, min(batch_size, len(items)))
    workers = min(workers, -(-len(items) // batch_size))
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


def run_model(model: nn.Module, transform, dataset, *, dense: bool = False, batch_size: int = 64,
              workers: int = 0, device: str = "auto", dtype: str = "float32", desc: str = "extract",
              progress: bool = True):
    """(features, targets, images/s) of `model` over `dataset`, in order. Features in `dtype`: N x D, or
    N x h x w x D for a ``dense_model`` fed (image, mask) pairs through a ``DenseTransform`` (`dense`);
    targets: the labels (int64, N), or the transformed label maps (uint8, N x S x S) when `dense`."""
    model, dev, loader, ctx = _prepare_run(model, _Transformed(dataset, transform, dense), batch_size,
                                           workers, device)
    feats, targets, bar, n = None, None, _Progress(len(dataset), desc, progress), 0
    start = time.perf_counter()
    try:
        for out, t in _forward(model, dev, loader, ctx):
            f = out.numpy()
            finite = np.isfinite(f).reshape(len(f), -1).all(axis=1)
            if not finite.all():                         # itm.py and baselines.py would refuse them later
                raise ExtractError(f"{desc}: the model gave NaN/Inf features (image {n + int(np.argmin(finite))})")
            if dtype == "float16" and np.abs(f).max(initial=0) > np.finfo(np.float16).max:
                raise ExtractError(f"{desc}: features exceed the float16 range; use --dtype float32")
            if feats is None:  # preallocated in the output dtype: N x h x w x D float32 can be GBs
                feats = np.empty((len(dataset), *f.shape[1:]), dtype=dtype)
                targets = np.empty((len(dataset), *t.shape[1:]), dtype=np.uint8 if dense else np.int64)
            feats[n:n + len(f)], targets[n:n + len(f)] = f, t.numpy()
            n += len(f)
            bar.update(len(f))
    finally:
        bar.close()
    if feats is None:
        raise ExtractError("the dataset is empty")
    return feats, targets, len(dataset) / (time.perf_counter() - start)


def extract_features(model_name: str, dataset, *, checkpoint=None, arch=None, pool=None, random_init=False,
                     batch_size: int = 64, workers: int = 0, device: str = "auto", dtype: str = "float16",
                     progress: bool = True) -> np.ndarray:
    """N x D features of `model_name` for a dataset of (image, label) items (see ``load_dataset``)."""
    model, transform, _ = build_model(model_name, checkpoint=checkpoint, arch=arch, pool=pool,
                                      random_init=random_init)
    return run_model(model, transform, dataset, batch_size=batch_size, workers=workers, device=device,
                     dtype=dtype, desc=model_name, progress=progress)[0]


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


# ------------------------------------------------------------------------------------------------ output

def sidecar_path(out: str | Path) -> Path:
    return Path(out).with_suffix(".json")


def _check_out(path: Path, option: str) -> None:
    """Refuse, before any work, an output that cannot be written: a folder, or a path under a file."""
    if path.is_dir():
        raise ExtractError(f"{option} {path} is a folder; give a file name")
    folder = path.absolute().parent
    while not folder.exists():  # missing folders are created at the first write
        folder = folder.parent
    if not folder.is_dir():
        raise ExtractError(f"{option} {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ExtractError(f"{option} {path}: cannot write in {folder}")


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
    """The npz, then its sidecar, each written atomically: an interrupted run keeps the finished models."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    itm.write_atomic(out, lambda f: np.savez(f, **arrays), binary=True)
    itm.write_atomic(sidecar_path(out), lambda f: f.write(json.dumps(meta, indent=1)))


def _check_same_data(arrays: dict, meta: dict, want: dict, out: Path) -> None:
    """Resuming onto features of other images would silently misalign rows: refuse."""
    kinds = {"dense" if v.ndim == 4 else "classification" for k, v in arrays.items() if k != "labels"}
    other = kinds - {"dense" if want.get("dense") else "classification"}
    if other:
        raise ExtractError(f"{out} holds {other.pop()} features; use another --out")
    for key in want:
        if key in meta and meta[key] != want[key]:
            raise ExtractError(f"{out} holds features of {key}={meta[key]!r}, not {want[key]!r}; "
                               "use another --out")


def _check_options(out: Path, *, dense, limit, size, checkpoint, arch, pool, batch_size, workers, dtype):
    for option, value, least in (("--batch-size", batch_size, 1), ("--workers", workers, 0),
                                 ("--limit", limit, 1), ("--size", size, 1)):
        if value is not None and value < least:
            raise ExtractError(f"{option} must be ≥ {least}, got {value}")
    most = 8 * (os.cpu_count() or 1)                 # each worker is a process: a typo must not fork thousands
    if workers is not None and workers > most:
        raise ExtractError(f"--workers must be ≤ {most} (8 data-loading processes per core), got {workers}")
    if dtype not in ("float16", "float32"):
        raise ExtractError(f"--dtype must be float16 or float32, got {dtype!r}")
    if arch is not None and checkpoint is None:
        raise ExtractError("--arch is the architecture of --checkpoint: give both or neither")
    if dense and pool is not None:
        raise ExtractError("--pool does not apply to --dense (ViTs give their patch tokens)")
    _check_out(out, "--out")
    _check_out(sidecar_path(out), "the sidecar of --out")
    if sidecar_path(out) == out:
        raise ExtractError(f"--out {out} would be its own sidecar; give a .npz name")


def extract_to_npz(models: list[str], dataset: str, out: str | Path, *, dense: bool = False, root=None,
                   split: str = "train", download: bool = False, limit: int | None = None, size: int = 224,
                   checkpoint=None, arch=None, pool=None, random_init: bool = False, batch_size: int = 64,
                   workers: int = 0, device: str = "auto", dtype: str = "float16",
                   progress: bool = True) -> tuple[dict, list[str]]:
    """Extract every model not yet in `out`, saving after each one. Returns (arrays, models extracted).

    One N x D array per model and ``labels`` (int64, N); `dense`: N x h x w x D per model (images and masks
    resized and cropped to `size`) and ``labels``, uint8 label maps (255 = ignore) on the models' common
    grid, or at full resolution when their grids differ (see ``_dense_labels``)."""
    out = Path(out)
    _check_options(out, dense=dense, limit=limit, size=size, checkpoint=checkpoint, arch=arch, pool=pool,
                   batch_size=batch_size, workers=workers, dtype=dtype)
    run = dict(dense=dense, batch_size=batch_size, workers=workers, device=resolve_device(device),
               dtype=dtype, progress=progress)
    want = {"dataset": dataset, "split": split, "limit": limit, **({"dense": True, "size": size} if dense else {})}
    arrays, meta = read_output(out)
    _check_same_data(arrays, meta, want, out)
    todo = list(dict.fromkeys(m for m in models if m not in arrays))
    for m in todo:
        _check_model(m, checkpoint, arch, pool, dense)
    for m in todo:  # hub files found in their cache or fetched now: a missing one fails before any image is read
        fetch_hub_files(m, random_init)
    if not todo:
        return arrays, []
    ds, used_split = (load_seg_dataset if dense else load_dataset)(dataset, root, split, download, limit)
    meta = {**want, "split_used": used_split, "root": str(root) if root else None, "n": len(ds),
            "models": meta.get("models", {})}
    build = dict(checkpoint=checkpoint, arch=arch, pool=pool, random_init=random_init)
    full = None  # dense: this run's label maps, at full resolution
    for name in todo:
        feats, targets, info = _extract_one(name, ds, size, build, run)
        stored = arrays.get("labels") if full is None else full
        if stored is not None and not _same_labels(stored, targets):
            raise ExtractError(f"{name}: labels differ from those in {out}: not the same images; use another --out")
        arrays = {**{k: v for k, v in arrays.items() if k != "labels"}, name: feats}
        if dense:
            full = targets
            targets, label_meta = _dense_labels(full, [v.shape[1:3] for v in arrays.values()])
            meta.update(label_meta)
        arrays["labels"], meta["models"][name] = targets, info
        write_output(out, arrays, meta)
        print(f"{name}\t{'x'.join(map(str, feats.shape))}\t{info['images_per_s']:.1f} images/s")
    return arrays, todo


def _extract_one(name: str, ds, size: int, build: dict, run: dict):
    """(features, targets, sidecar info) of one model over `ds`; ``run["dense"]``: its dense features."""
    arch, dense, dev = build["arch"] or name, run["dense"], run["device"]
    if dense and arch in SSL_VITS:  # built as for --pool cls: a pre-training checkpoint keeps its token norm
        build = {**build, "pool": "cls"}
    model, transform, info = build_model(name, **build)
    if dense:
        image_size = _vit_image_size(model)
        if image_size is not None and image_size != size:
            raise ExtractError(f"{name} takes {image_size}x{image_size} images: use --size {image_size}")
        model, transform = dense_model(model, arch), dense_transform(transform, size)
        info["pool"] = "patch tokens" if image_size is not None else "feature map before global pooling"
    feats, targets, ips = run_model(model, transform, ds, desc=name, **run)
    info.update(transform=describe_transform(transform), images_per_s=round(ips, 2), device=str(dev),
                autocast=str(autocast_dtype(dev)).replace("torch.", "") if dev.type == "cuda" else None,
                dtype=run["dtype"], dim=int(feats.shape[-1]))
    if dense:
        info.update(h=int(feats.shape[1]), w=int(feats.shape[2]))
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return feats, targets, info


def grid_labels(maps: np.ndarray, h: int, w: int) -> np.ndarray:
    """Label maps N x H x W -> N x h x w (uint8): per-cell majority of labelled pixels, 255 where a cell has
    none -- the rule of ``itm.downsample_labels``, which itm.py applies to full-resolution maps."""
    return itm.downsample_labels(maps, h, w).astype(np.uint8)


def _dense_labels(full: np.ndarray, grids: list[tuple[int, int]]) -> tuple[np.ndarray, dict]:
    """``labels`` for a file whose models have feature grids `grids` (first model first), and its sidecar:
    the maps reduced to the grid when all models share one, else the full-resolution maps, which itm.py
    reduces to each model's grid by the same rule."""
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


def _same_labels(stored: np.ndarray, new: np.ndarray) -> bool:
    """Whether `stored` labels come from the same images as `new` ones: equal, or (dense) the full-resolution
    maps `new` reduced to the grid of `stored`."""
    if stored.shape == new.shape:
        return np.array_equal(stored, new)
    if stored.ndim != 3 or new.ndim != 3 or len(stored) != len(new):
        return False
    try:
        return np.array_equal(grid_labels(new, *stored.shape[1:]), stored)
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    p = itm.CLIParser(prog=PROG, description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="", help="comma-separated model names (--list shows them): torchvision "
                                                "or SSL ViT names, timm:NAME, hf:REPO_ID, hf:FOLDER")
    p.add_argument("--dataset", help=f"one of {', '.join(DATASETS)}; with --dense: {', '.join(SEG_DATASETS)}")
    p.add_argument("--root", help="dataset directory (or the .npz for --dataset npz)")
    p.add_argument("--split", default="train")
    p.add_argument("--download", action="store_true", help="let torchvision download the dataset")
    p.add_argument("--out", help="output .npz (resumed if it exists)")
    p.add_argument("--labels-out", help="also write the labels as .npy")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (≥ 1)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="data-loading processes (≥ 0; 0: in the main process)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--limit", type=int, help="random subset of N ≥ 1 images (seed 0), for a quick look")
    p.add_argument("--pool", choices=["cls", "mean"],
                   help="ViT pooling, timm token models too (default: the model's own)")
    p.add_argument("--checkpoint", help="local weights file (with --arch)")
    p.add_argument("--arch", help="architecture of --checkpoint: a torchvision name or an SSL ViT name")
    p.add_argument("--random-init", action="store_true", help="no weights: seeded random ones (tests, timing)")
    p.add_argument("--dense", action="store_true",
                   help=f"dense features N x h x w x D and label maps, for segmentation ({', '.join(SEG_DATASETS)})")
    p.add_argument("--size", type=int, help="--dense: resize (shorter side) + center crop to SIZE x SIZE "
                                            "(default 224)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--list", action="store_true",
                   help="list the models (pooling, preprocessing, weights) and datasets, then exit; with "
                        "--models: the rows of those models")
    return p


_FEATURES = [  # torchvision families whose feature (the input of the last Linear) is not a plain average pool
    (("vit_",), "class token after the final LayerNorm"),
    (("convnext",), "global average pool + LayerNorm"),
    (("swin",), "LayerNorm + global average pool"),
    (("alexnet", "maxvit", "mobilenet_v3", "vgg"), "hidden layer before the last Linear"),
]


def _list_row(name: str) -> tuple[str, str, str, str]:
    """(name, feature with the default pooling, preprocessing, weights) of a model, for --list."""
    if hub_of(name) is not None:
        return _hub_list_row(name, *hub_of(name))
    spec = SSL_VITS.get(name)
    weights = None if spec else _torchvision_weights(name, None)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if spec is not None:
        pooling = ("mean of the patch tokens + LayerNorm (fc_norm)" if spec.pool == "mean"
                   else "class token after the final LayerNorm")
        prep, source = f"Resize({spec.image_size}, bicubic) + CenterCrop({spec.image_size})", spec.url or spec.source
    else:
        pooling = next((text for prefixes, text in _FEATURES if name.startswith(prefixes)), "global average pool")
        t = weights.transforms()
        prep = f"Resize({t.resize_size[0]}, {t.interpolation.value}) + CenterCrop({t.crop_size[0]})"
        mean, std, source = tuple(t.mean), tuple(t.std), str(weights)
    return name, pooling, prep + _norm_text(mean, std), source


def _norm_text(mean, std) -> str:
    mean, std = (tuple(round(float(v), 4) for v in m) for m in (mean, std))
    imagenet = (mean, std) == tuple(tuple(round(v, 4) for v in m) for m in (IMAGENET_MEAN, IMAGENET_STD))
    return " + ImageNet mean/std" if imagenet else f" + mean {mean} std {std}"


def _size_text(size) -> str:
    size = [size] if isinstance(size, int) else list(size)
    return str(size[0]) if len(set(size)) == 1 else "x".join(map(str, size))


def _compose_text(transform) -> str:
    """'Resize(248, bicubic) + CenterCrop(224)' of a torchvision/timm Compose (tensor conversion and Normalize
    left out: `_norm_text` says the mean/std)."""
    parts = []
    for t in getattr(transform, "transforms", [transform]):
        if isinstance(t, T.Resize):
            parts.append(f"Resize({_size_text(t.size)}, {t.interpolation.value})")
        elif isinstance(t, T.CenterCrop):
            parts.append(f"CenterCrop({_size_text(t.size)})")
        elif not isinstance(t, T.Normalize) and "ToTensor" not in type(t).__name__:
            parts.append(type(t).__name__)
    return " + ".join(parts)


def _processor_text(processor) -> str:
    """'ViTImageProcessor: resize 224x224 (bilinear) + ImageNet mean/std' of a transformers image processor."""
    from PIL import Image
    d = processor.to_dict()
    size = lambda s: f"{s['height']}x{s['width']}" if {"height", "width"} <= set(s) else \
        ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in s.items())  # noqa: E731
    parts = []
    if d.get("do_resize", True) and d.get("size"):
        resample = d.get("resample")
        resample = Image.Resampling(resample).name.lower() if isinstance(resample, int) else resample
        parts.append(f"resize {size(d['size'])} ({resample})")
    if d.get("do_center_crop") and d.get("crop_size"):
        parts.append(f"center crop {size(d['crop_size'])}")
    norm = _norm_text(d["image_mean"], d["image_std"]) if d.get("do_normalize", True) and d.get("image_mean") else ""
    return f"{type(processor).__name__}: " + " + ".join(parts) + norm


def _hub_list_row(name: str, hub: str, rest: str) -> tuple[str, str, str, str]:
    """--list's row of a hub model, from its architecture on the meta device (no weights, no compute)."""
    _check_hub(name, hub, rest, None)
    if hub == "timm":
        model, cfg = _timm_on_meta(rest), _timm_cfg(name, rest)
        transform, config = timm_transform(model)
        source = cfg.url if cfg is not None and cfg.url else "no pretrained weights in timm"
        if cfg is not None and cfg.hf_hub_id:
            from huggingface_hub import try_to_load_from_cache
            repo, _, revision = cfg.hf_hub_id.partition("@")
            cached = any(isinstance(try_to_load_from_cache(repo, f, revision=revision or None), str)
                         for f in _safetensors_first(cfg.hf_hub_filename or "pytorch_model.bin"))
            source = f"{cfg.hf_hub_id} on the Hugging Face hub ({'cached' if cached else 'not cached'})"
        return name, _timm_pooling(model)[1], _compose_text(transform) + _norm_text(config["mean"], config["std"]), \
            source
    folder = _hf_folder(name, rest, random_init=True)
    model, processor, _ = _hf_load(name, folder, random_init=True, device="meta")
    tower, prefix = _vision_tower(model)
    try:  # the rule as extraction decides it; the pooled output is used only if the checkpoint has its weights
        pooling = HF_POOLING[hf_pooling(tower, HFProcessor(processor)(_blank_image())[None].to("meta"))]
    except (NotImplementedError, RuntimeError):  # an op without a meta kernel
        pooling = "decided when extracting: " + ", else ".join(HF_POOLING)
    source = f"{folder} (local folder)" if _hf_local(rest) else f"{rest} on the Hugging Face hub"
    return name, pooling + (f" of {prefix[:-1]}" if prefix else ""), _processor_text(processor), source


HUB_LIST_ROWS = [
    ("timm:NAME", "pre-logits: forward_head(forward_features(x), pre_logits=True); --pool cls|mean sets the "
     "global_pool of token models", "its pretrained config (timm.data.resolve_model_data_config + create_transform)",
     "timm's source: the Hugging Face cache (HF_HOME), or its URL (TORCH_HOME)"),
    ("hf:REPO_ID", "pooler_output if the model defines one, else the class token, else the mean of its tokens",
     "the repo's image processor (AutoImageProcessor)", "the Hugging Face cache (HF_HOME)"),
    ("hf:FOLDER", "as hf:REPO_ID", "its preprocessor_config.json", "its save_pretrained files"),
]


def _print_rows(rows) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])


def _print_list(names: list[str] | None = None) -> None:
    """Every model known by name and the hub models' rules; with `names`, the rows of those models only."""
    for name in names or []:
        _check_model(name)
    rows = [_list_row(name) for name in names or available_models()]  # all of them first: errors come alone
    print("models (name, feature with the default pooling, preprocessing, weights):")
    _print_rows(rows)
    if names:
        return
    print("hub models (--models timm:NAME,hf:REPO_ID,hf:FOLDER; --list --models NAME,... shows their rows):")
    _print_rows(HUB_LIST_ROWS)
    print("datasets:", " ".join(DATASETS))
    print("segmentation datasets (--dense):", " ".join(SEG_DATASETS))


def _model_names(args) -> list[str]:
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.checkpoint is None:
        if not names:
            raise ExtractError("--models is required")
        return names
    if len(names) > 1:
        raise ExtractError("--checkpoint loads one model: give at most one --models name")
    if names and hub_of(names[0]):
        _check_model(names[0], args.checkpoint)  # its error: hub models load their hub weights
    if args.arch is None and not (names and names[0] in available_models()):
        raise ExtractError("--checkpoint needs --arch (a torchvision model name or an SSL ViT name)")
    return names or [Path(args.checkpoint).name.split(".")[0]]


def _run(args) -> int:
    if args.list:
        _print_list([m.strip() for m in args.models.split(",") if m.strip()])
        return 0
    if args.dataset is None or args.out is None:
        raise ExtractError("--dataset and --out are required")
    names = _model_names(args)
    if args.size is not None and not args.dense:
        raise ExtractError("--size applies to --dense only")
    if args.labels_out:
        _check_out(Path(args.labels_out), "--labels-out")
    arrays, done = extract_to_npz(
        names, args.dataset, args.out, dense=args.dense, root=args.root, split=args.split,
        download=args.download, limit=args.limit, size=224 if args.size is None else args.size,
        checkpoint=args.checkpoint, arch=args.arch, pool=args.pool, random_init=args.random_init,
        batch_size=args.batch_size, workers=args.workers, device=args.device, dtype=args.dtype,
        progress=not args.quiet)
    if args.labels_out:
        Path(args.labels_out).parent.mkdir(parents=True, exist_ok=True)
        itm.write_atomic(args.labels_out, lambda f: np.save(f, arrays["labels"]), binary=True)
    skipped = [m for m in names if m not in done]
    if skipped:
        print(f"already in {args.out}: {', '.join(skipped)}", file=sys.stderr)
    print(f"wrote {args.out}: {len(arrays['labels'])} images, models {', '.join(k for k in arrays if k != 'labels')}")
    return 0


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    try:
        status = _run(args)
        sys.stdout.flush()  # inside run_cli: a reader that left (`| head`) ends the run quietly
        return status
    except KeyboardInterrupt:
        where = f"; finished models are in {args.out}" if args.out else ""
        print(f"\n{PROG}: interrupted{where}", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    return itm.run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())

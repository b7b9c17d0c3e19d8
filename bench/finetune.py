"""Fine-tune pre-trained models on a target and write the ground truth that the rankings are judged by.

For each model: all layers plus a new linear head on its global-average-pooled penultimate feature (the
feature ``extract.py`` builds), trained by one fixed protocol (SGD + OneCycle, a few epochs, the learning
rate chosen on a held-out 20 % of the train split and bracketed on a ladder); the value is the chosen run's
test accuracy. Output: a ``groundtruth.json`` that ``kendall.py --truth``, ``itm.py --truth`` and
``bench/accuracy.py`` read, and a runs file (one JSON line per finished run, with its learning curve) from
which an interrupted job resumes. docs/finetune.md describes the protocol and how it was checked.

Usage::

    python bench/finetune.py --target flowers17 --data DATA --models tv_mnv2_in1k \\
        --checkpoint mobilenet_v2-b0353104.pth --arch mobilenet_v2 --out runs/groundtruth.json
    python bench/finetune.py --dataset imagefolder --root DIR --models resnet18,mobilenet_v2 --out gt.json
    python bench/finetune.py --dataset my.npz --models resnet18 --family bn128 --epochs 4 --out gt.json
    python bench/finetune.py --dataset my.npz --models resnet18,mobilenet_v2 --rung --epochs 1 \
        --schedule-epochs 8 --lrs 0.01 --out rung.json     # a short rung: signals, not ground truth

``--target flowers17|cifar10|pneumonia`` builds the benchmark's three targets from their raw files in DATA
(flowers17_s160_q90.zip, cifar10_jpeg_subset.npz, pneumoniamnist.npz) by its splits; ``--dataset``/``--root``
read a train and a test split through ``extract.load_dataset`` (an imagefolder with train/ and test/, a
PATH.npz with x_train/x_test, a torchvision dataset). Model names are extract.py's (``--list`` there), or
with ``--zoo`` the benchmark's own (bench/te_models.py). ``--rung`` runs a short rung of the budget ladder
(docs/ladder.md): the grid only, and a scores file of its signals instead of ground truth.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import re
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # a checkout: extract.py and itm.py sit one folder up
    sys.path.insert(0, str(ROOT))

import extract  # noqa: E402  (imports torch, with a one-line hint when it is missing)
import itm  # noqa: E402
import ladder  # noqa: E402  (bench/ladder.py: the short rungs' signals, the runs-file reader)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torchvision.transforms.v2 import functional as TF  # noqa: E402

ExtractError = extract.ExtractError
PROG = "finetune.py"

FAMILIES = ladder.FAMILIES   # the learning-rate families (bench/ladder.py, which needs no torch, holds them)
BATCH, MOMENTUM, WEIGHT_DECAY, PCT_START, EPOCHS = 32, 0.9, 1e-4, 0.1, 8
VAL_FRACTION, VAL_SEED = 0.2, 12345   # the stratified validation carve of the train split
EVAL_BATCH = 128
TARGET_FILES = {"flowers17": "flowers17_s160_q90.zip", "cifar10": "cifar10_jpeg_subset.npz",
                "pneumonia": "pneumoniamnist.npz"}
FLOWERS_PER_CLASS, FLOWERS_TRAIN, FLOWERS_SIDE = 80, 40, 128
PNEUMONIA_TRAIN = 1000


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def lr_key(lr: float) -> str:
    """A learning rate as a JSON key: 0.003 -> "0.003"."""
    return f"{lr:g}"


# ------------------------------------------------------------------------------------------------ data

@dataclass
class Split:
    """A target's images at one resolution: uint8 N x 3 x res x res tensors and int64 labels."""
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    flip: bool          # random horizontal flips while training (off for gray, MNIST-like data)
    about: str          # the split as groundtruth.json's protocol.splits says it


def square(img, side: int) -> torch.Tensor:
    """A PIL image -> uint8 3 x side x side: shorter side to `side` (antialiased bilinear) + centre crop."""
    x = TF.pil_to_tensor(extract._to_rgb(img))
    if min(x.shape[-2:]) != side:
        x = TF.resize(x, side, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return TF.center_crop(x, [side, side])


def stack(items, res: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images N x 3 x res x res uint8, labels N int64) of (PIL image, label) items."""
    if len(items) == 0:
        raise ExtractError("a split has no images")
    xs, ys = zip(*((square(img, res), int(y)) for img, y in items))
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)


def stratified_carve(y: np.ndarray, fraction: float = VAL_FRACTION, seed: int = VAL_SEED):
    """(fit indices, validation indices), both sorted: round(fraction * n) random images of each class
    (numpy seed `seed`) are held out, at least one of every class with two or more images."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        val.extend(rng.permutation(idx)[:k])
    val = np.sort(np.asarray(val, dtype=np.int64))
    return np.setdiff1d(np.arange(len(y)), val), val


def _data_file(data, target: str) -> Path:
    path = Path(data) / TARGET_FILES[target]
    if not path.is_file():
        raise ExtractError(f"--target {target}: {path} does not exist (--data is the folder holding "
                           f"{', '.join(TARGET_FILES.values())})")
    return path


def flowers17_items(data) -> tuple[list, list]:
    """Oxford Flowers-17 from its zip of image_0001..1360.jpg (label (index-1)//80): 40 random images of
    each class (np.random.RandomState(0)) for train, the other 40 for test; each shorter side 128 + centre crop 128."""
    from PIL import Image
    path = _data_file(data, "flowers17")
    with zipfile.ZipFile(path) as z:
        names = sorted(n for n in z.namelist() if re.fullmatch(r"image_\d{4}\.jpg", Path(n).name))
        if len(names) != 17 * FLOWERS_PER_CLASS:
            raise ExtractError(f"{path}: expected 1360 images image_0001..1360.jpg, found {len(names)}")
        images = [square(Image.open(io.BytesIO(z.read(n))), FLOWERS_SIDE) for n in names]
    labels = np.array([(int(Path(n).stem[-4:]) - 1) // FLOWERS_PER_CLASS for n in names])
    rng = np.random.RandomState(0)   # numpy's legacy generator: the benchmark's split (its features' rows)
    train = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:FLOWERS_TRAIN]
                                    for c in range(17)]))
    test = np.setdiff1d(np.arange(len(names)), train)
    as_pil = lambda i: TF.to_pil_image(images[i])  # noqa: E731
    return [(as_pil(i), labels[i]) for i in train], [(as_pil(i), labels[i]) for i in test]


def load_target(target: str, data, res: int) -> Split:
    """One of the benchmark's targets, built from its raw file in `data` by the protocol's split."""
    if target == "flowers17":
        train, test = flowers17_items(data)
        return Split(target, *stack(train, res), *stack(test, res), True,
                     f"Oxford Flowers-17 ({TARGET_FILES[target]}; short side 128, centre crop 128): stratified "
                     "random 40/class train (680), the other 40/class test (680), seed 0")
    path = _data_file(data, target)
    if target == "cifar10":
        train, test = extract.NpzImages(path, "train"), extract.NpzImages(path, "test")
        return Split(target, *stack(train, res), *stack(test, res), True,
                     f"CIFAR-10 (JPEG q75 copy; {TARGET_FILES[target]}): 100/class of train (1000) as train, "
                     "200/class of test as test (2000), as stored")
    # 1000 random train images (seed 0, original order kept: extract's --limit rule)
    train, _ = extract.load_dataset(str(path), split="train", limit=PNEUMONIA_TRAIN)
    test = extract.NpzImages(path, "test")
    return Split(target, *stack(train, res), *stack(test, res), False,
                 f"PneumoniaMNIST ({TARGET_FILES[target]}, 28x28 gray -> RGB): 1000 random of the 2428 train "
                 "images (seed 0) as train, all 468 test images as test (468)")


def load_user_dataset(name: str, root, res: int, *, limit=None, download=False, flip=True,
                      label: str | None = None) -> Split:
    """A train and a test split through ``extract.load_dataset`` (`limit`: a seeded subset of each)."""
    train, _ = extract.load_dataset(name, root, "train", download, limit)
    test, _ = extract.load_dataset(name, root, "test", download, limit)
    label = label or dataset_label(name, root)
    tx, ty = stack(train, res)
    vx, vy = stack(test, res)
    about = f"{name} ({root or 'no root'}): its train split ({len(ty)}) as train, its test split as test ({len(vy)})"
    return Split(label, tx, ty, vx, vy, flip, about + (f", each a random {limit} (seed 0)" if limit else ""))


def dataset_label(name: str, root) -> str:
    """The target's name in the output: the dataset name, a .npz's stem, an imagefolder's folder name."""
    if name.endswith(".npz"):
        return Path(name).stem
    if name in ("imagefolder", "npz") and root:
        return Path(root).resolve().stem
    return name


# ----------------------------------------------------------------------------------------------- model

class Classifier(nn.Module):
    """extract.py's feature model (pooled penultimate feature) + a new linear head."""

    def __init__(self, features: nn.Module, dim: int, classes: int):
        super().__init__()
        self.features, self.head = features, nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def normalisation(transform) -> tuple[tuple, tuple]:
    """(mean, std) of a model's own preprocessing: torchvision/timm transforms, a transformers processor."""
    processor = getattr(transform, "processor", None)
    if processor is not None and getattr(processor, "image_mean", None) is not None:
        return tuple(processor.image_mean), tuple(processor.image_std)
    dense = extract.dense_transform(transform)  # reads the Normalize of either kind of transform
    return tuple(dense.mean), tuple(dense.std)


def build_features(name: str, build: dict, res: int):
    """(feature model, its dim, (mean, std), info) of a model name, checked to run at `res` px."""
    if build.get("zoo"):  # the benchmark's own models (bench/te_models.py)
        import te_models
        model, mean_std, _ = te_models.build(name, build["zoo"])
        transform, info = None, {"zoo": str(build["zoo"])}
    else:
        model, transform, info = extract.build_model(name, **{k: v for k, v in build.items() if k != "zoo"})
        mean_std = normalisation(transform)
    model.eval()
    try:
        with torch.no_grad():
            dim = model(torch.zeros(2, 3, res, res)).flatten(1).shape[1]
    except Exception as exc:  # ViTs of a fixed image size, stems that shrink too far
        raise ExtractError(f"{name} does not run on {res}x{res} images ({itm.one_line(exc)}); "
                           "choose --res") from None
    return model, dim, mean_std, info


# -------------------------------------------------------------------------------------------- training

@dataclass
class Settings:
    """What every run of a job shares."""
    epochs: int = EPOCHS
    res: int = 128
    batch: int = BATCH
    family: str = "bn128"
    device: str = "auto"
    progress: bool = True
    schedule: int | None = None   # epochs the OneCycle schedule spans (None: `epochs`; more: a truncated run)
    rung: bool = False            # a short rung: no test accuracy; validation also after BN recomputation

    @property
    def schedule_epochs(self) -> int:
        return self.epochs if self.schedule is None else self.schedule


def batches(n: int, size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """A seeded shuffle of range(n) in batches of `size`; a last batch of one joins the one before, because
    batch norm cannot train on a single image."""
    parts = list(torch.randperm(n, generator=gen).split(size))
    if len(parts) > 1 and len(parts[-1]) == 1:
        parts[-2:] = [torch.cat(parts[-2:])]
    return parts


def augment(x: torch.Tensor, gen: torch.Generator, flip: bool) -> torch.Tensor:
    """Per image: a random horizontal flip (if `flip`) and a random res x res crop of the image reflect-padded
    by res/8 on each side. x: float B x 3 x res x res."""
    res = x.shape[-1]
    pad = res // 8
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect") if pad else x
    flips = torch.rand(len(x), generator=gen) < 0.5
    offsets = torch.randint(0, 2 * pad + 1, (len(x), 2), generator=gen)
    out = torch.empty_like(x)
    for i in range(len(x)):
        top, left = offsets[i].tolist()
        img = padded[i, :, top:top + res, left:left + res]
        out[i] = img.flip(-1) if flip and flips[i] else img
    return out


class Normalise:
    """uint8 images -> float, scaled to [0, 1] and normalised by the model's mean/std, on `device`."""

    def __init__(self, mean, std, device):
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.device = device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).float().div_(255)
        return (x - self.mean) / self.std


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: Normalise, ctx) -> float:
    """Top-1 accuracy in eval mode, no augmentation."""
    net.eval()
    correct = 0
    with torch.inference_mode(), ctx():
        for i in range(0, len(y), EVAL_BATCH):
            pred = net(norm(x[i:i + EVAL_BATCH])).argmax(1).cpu()
            correct += int((pred == y[i:i + EVAL_BATCH]).sum())
    return correct / len(y)


def recompute_bn(net: nn.Module, x: torch.Tensor, norm: Normalise, ctx) -> int:
    """Reset every batch norm's running statistics to the plain average of its batch statistics over the
    images x (batches of EVAL_BATCH, no augmentation, no gradient): what validation sees after a short,
    high-rate run whose running averages lag behind the weights. Returns the number of batch-norm layers
    (0: nothing to recompute)."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None   # None: a cumulative average over every batch
    net.train()
    with torch.no_grad(), ctx():
        for i in range(0, len(x), EVAL_BATCH):
            net(norm(x[i:i + EVAL_BATCH]))
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    return len(bns)


def _amp(dev: torch.device):
    """(autocast context factory, GradScaler or None): bf16/fp16 autocast on a GPU, float32 on the CPU."""
    dtype = extract.autocast_dtype(dev)
    if dtype is None:
        return contextlib.nullcontext, None
    scaler = torch.amp.GradScaler(dev.type) if dtype == torch.float16 else None
    return (lambda: torch.autocast(dev.type, dtype=dtype)), scaler


def _epoch(net, opt, sched, data, norm, ctx, scaler, gen) -> float:
    """One training epoch over data = (images, labels, flip, batch size) -> its mean training loss (NaN as
    soon as a loss is not finite)."""
    x, y, flip, size = data
    net.train()
    total = 0.0
    for idx in batches(len(y), size, gen):
        with ctx():
            loss = F.cross_entropy(net(augment(norm(x[idx]), gen, flip)), y[idx].to(norm.device))
        if not torch.isfinite(loss):
            return math.nan
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        sched.step()
        total += float(loss.detach()) * len(idx)
    return total / len(y)


def train_run(base: nn.Module, head: tuple[int, int], mean_std, split: Split, fit, val, lr: float,
              seed: int, s: Settings) -> dict:
    """Fine-tune a copy of `base` + a new head at `lr` on split.train[fit] -> the run's record."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    np.random.seed(seed)
    dev = extract.resolve_device(s.device)
    net = Classifier(copy.deepcopy(base), *head).to(dev)
    norm, (ctx, scaler) = Normalise(*mean_std, dev), _amp(dev)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)
    gen = torch.Generator().manual_seed(seed)
    steps = len(batches(len(fit), s.batch, torch.Generator()))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=s.schedule_epochs * steps,
                                                pct_start=PCT_START)
    data = (split.train_x[fit], split.train_y[fit], split.flip, s.batch)
    vx, vy = split.train_x[val], split.train_y[val]
    losses, curve, times, diverged = [], [], [], False
    for epoch in range(s.epochs):
        tick = time.perf_counter()
        loss = _epoch(net, opt, sched, data, norm, ctx, scaler, gen)
        times.append(round(time.perf_counter() - tick, 2))   # training alone, for cost estimates
        diverged = not math.isfinite(loss)
        losses.append(None if diverged else round(loss, 4))
        if diverged:
            break
        curve.append(round(accuracy(net, vx, vy, norm, ctx), 4))
        if s.progress:
            log(f"  epoch {epoch + 1}/{s.epochs}: loss {loss:.4f}, val {curve[-1]:.4f} "
                f"({time.perf_counter() - start:.0f} s)")
    record = {"val_acc": None if diverged else curve[-1], "test_acc": None, "epoch_loss": losses,
              "val_curve": curve, "epoch_seconds": times, "diverged": diverged, "device": str(dev)}
    if s.rung and not diverged:
        tick = time.perf_counter()
        has_bn = recompute_bn(net, split.train_x[fit], norm, ctx)
        record["val_acc_bn"] = round(accuracy(net, vx, vy, norm, ctx), 4) if has_bn else curve[-1]
        record["bn_seconds"] = round(time.perf_counter() - tick, 2)
    elif not diverged:
        record["test_acc"] = accuracy(net, split.test_x, split.test_y, norm, ctx)
    return {**record, "seconds": round(time.perf_counter() - start, 2)}


# ------------------------------------------------------------------------------ learning-rate search

def lr_table(runs: list[dict]) -> dict:
    """{lr: (mean val acc, mean final-epoch loss) or None if a seed diverged} of one model's runs."""
    by_lr = {}
    for r in runs:
        by_lr.setdefault(r["lr"], []).append(r)
    return {lr: None if any(r["diverged"] for r in rs) else
            (float(np.mean([r["val_acc"] for r in rs])), float(np.mean([r["epoch_loss"][-1] for r in rs])))
            for lr, rs in by_lr.items()}


def best_lr(table: dict) -> float | None:
    """The rate with the best validation accuracy, ties to the lower final training loss; never a
    diverged one (None if all diverged)."""
    ok = {lr: v for lr, v in table.items() if v is not None}
    return max(ok, key=lambda lr: (ok[lr][0], -ok[lr][1])) if ok else None


def next_lr(table: dict, ladder: list[float]) -> float | None:
    """Bracketing: while the best rate is the lowest (highest) tried, the next lower (higher) rate of the
    ladder; when every rate diverged, the next lower one. None when the search is done."""
    tried = sorted(table)
    best = best_lr(table)
    lower = [lr for lr in ladder if lr < tried[0]]
    higher = [lr for lr in ladder if lr > tried[-1]]
    if (best is None or best == tried[0]) and lower:
        return max(lower)
    if best is not None and best == tried[-1] and higher:
        return min(higher)
    return None


def search_lrs(todo_run, grid: list[float], ladder: list[float], seeds: list[int], done: list[dict]) -> list[dict]:
    """Run the grid, then bracket on the ladder; `done` holds the finished runs, `todo_run(lr, seed)` makes
    one. Returns every run of the model."""
    runs = list(done)
    have = {(r["lr"], r["seed"]) for r in runs}
    lrs = list(grid)
    while lrs:
        for lr in lrs:
            for seed in seeds:
                if (lr, seed) not in have:
                    runs.append(todo_run(lr, seed))
                    have.add((lr, seed))
        nxt = next_lr(lr_table(runs), ladder)
        lrs = [] if nxt is None else [nxt]
    return runs


# ---------------------------------------------------------------------------------------- runs file

def append_run(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------- ground truth

def model_details(runs: list[dict], ladder: list[float]) -> dict:
    """groundtruth.json's details entry of one model from its runs (seed means per rate)."""
    table, chosen = lr_table(runs), best_lr(lr_table(runs))
    per = lambda key: {lr_key(lr): (None if table[lr] is None else round(float(np.mean(  # noqa: E731
        [r[key] for r in runs if r["lr"] == lr])), 4)) for lr in sorted(table, reverse=True)}
    return {"chosen_lr": chosen, "n_seeds": len({r["seed"] for r in runs}), "family": runs[0]["family"],
            "epochs": runs[0]["epochs"], "res": runs[0]["res"], "val_acc": per("val_acc"),
            "test_acc": per("test_acc"),
            "seconds": {lr_key(lr): round(sum(r["seconds"] for r in runs if r["lr"] == lr), 1)
                        for lr in sorted(table, reverse=True)},
            "diverged": [lr_key(lr) for lr in sorted(table, reverse=True) if table[lr] is None],
            "search_done": next_lr(table, ladder) is None}


def protocol(s: Settings, grid, ladder, seeds, splits: dict) -> dict:
    """groundtruth.json's protocol block for these settings."""
    return {
        "value": "test accuracy (fraction) of the chosen-LR fine-tuning run; the run is trained on the 80 % fit "
                 "part of the train split (NOT retrained on 100 %); mean over finished seeds",
        "splits": splits,
        "validation": f"stratified {VAL_FRACTION:.0%} of the train split (numpy seed {VAL_SEED}) is held out for "
                      "choosing the LR; the model is fit on the rest; ties in val accuracy are broken by lower "
                      "final-epoch training loss",
        "fine_tuning": f"all layers + new linear head on global-average-pooled penultimate features; SGD nesterov "
                       f"momentum {MOMENTUM}, weight decay {WEIGHT_DECAY:g} (all params), batch {s.batch}, "
                       f"{s.epochs} epochs, OneCycleLR(max_lr=LR, pct_start={PCT_START}, torch defaults "
                       "otherwise), augmentation: random horizontal flip (not for gray data) + reflect-pad "
                       "(res/8) random crop, per sample; eval at the model resolution without augmentation",
        "resolution": f"{s.res} px; images resized with antialiased bilinear interpolation (shorter side + "
                      "centre crop); each model uses its own input normalization",
        "lr_bracketing": "the base grid is run first; while the LR with the best validation accuracy is the "
                         "lowest or the highest LR tried, the next LR of the ladder on that side is run too",
        "lr_ladder": {s.family: ladder}, "lr_grid": {s.family: grid},
        "seeds": f"seeds {', '.join(map(str, seeds))} (torch + numpy)",
        "hardware": f"{extract.resolve_device(s.device)}, {torch.get_num_threads()} threads, torch "
                    f"{torch.__version__}",
    }


def write_groundtruth(out: Path, target: str, models: list[str], runs: list[dict], proto: dict, ladder) -> dict:
    """Merge into `out` this target's models, rebuilt from `runs`; its other models (an earlier job's, made
    with other settings) and the other targets are kept as they are -> the target's details."""
    doc = json.loads(out.read_text(encoding="utf-8")) if out.exists() else {}
    fresh = {m: model_details([r for r in runs if r["model"] == m], ladder)
             for m in models if any(r["model"] == m for r in runs)}
    kept = ((doc.get("details") or {}).get(target) or {}).get("per_model", {})
    per_model = {**{m: d for m, d in kept.items() if m not in fresh}, **fresh}
    names = list(dict.fromkeys([*per_model, *models]))
    done = [m for m, d in per_model.items() if d.get("search_done", True)]
    table = {m: d["test_acc"][lr_key(d["chosen_lr"])] for m, d in per_model.items() if d["chosen_lr"] is not None}
    details = {"models_done": len(done), "models_total": len(names), "complete": len(done) == len(names),
               "per_model": per_model}
    splits = {**(doc.get("protocol") or {}).get("splits", {}), **proto["splits"]}
    doc = {**{k: v for k, v in doc.items() if k not in ("protocol", "details", target)},
           "protocol": {**proto, "splits": splits}, "details": {**doc.get("details", {}), target: details},
           target: table}
    out.parent.mkdir(parents=True, exist_ok=True)
    itm.write_atomic(out, lambda f: json.dump(doc, f, indent=1))
    return details


def feature_seconds(base: nn.Module, x: torch.Tensor, mean_std, s: Settings) -> float:
    """Seconds of one eval-mode pass of the feature model over the images x: what extracting the features
    for a score on frozen features costs, timed on the same machine as the runs."""
    dev = extract.resolve_device(s.device)
    norm, (ctx, _) = Normalise(*mean_std, dev), _amp(dev)
    net = base.to(dev).eval()
    start = time.perf_counter()
    with torch.inference_mode(), ctx():
        for i in range(0, len(x), EVAL_BATCH):
            net(norm(x[i:i + EVAL_BATCH]))
    return round(time.perf_counter() - start, 2)


def write_rung_scores(out: Path, target: str, runs: list[dict]) -> dict:
    """A short rung's scores file (what kendall.py --scores reads): {"dataset": target, "scores": {rung:
    {model: score}}, "seconds": {rung: {model: seconds}}}, one rung per rate choice and signal
    (bench/ladder.py). Other targets' entries in `out` are not kept: one scores file per target."""
    cut = any(r.get("schedule_epochs", r["epochs"]) > r["epochs"] for r in runs)   # the first epochs of a run
    rungs = ladder.rung_scores(runs, kind="trunc" if cut else "short")
    doc = {"dataset": target, "scores": {k: v["scores"] for k, v in rungs.items()},
           "seconds": {k: v["seconds"] for k, v in rungs.items()},
           "signals": "higher is better: loss = - the last epoch's training loss, loss_sum = - the sum of the "
                      "epochs' losses, val = validation accuracy, val_bn = the same after batch-norm statistics "
                      "are recomputed; low = the grid's lower rate, best = the better of the grid's rates"}
    out.parent.mkdir(parents=True, exist_ok=True)
    itm.write_atomic(out, lambda f: json.dump(doc, f, indent=1))
    return {"rungs": rungs, "models": sorted({r["model"] for r in runs})}


# ----------------------------------------------------------------------------------------------- job

@dataclass
class Job:
    """One target, its models and the rates to search: what ``finetune`` runs."""
    split: Split
    models: list
    build: dict          # extract.build_model's keyword arguments (checkpoint, arch, pool, random_init)
    settings: Settings
    grid: list
    ladder: list
    seeds: list
    runs_path: Path
    out: Path


def finetune(job: Job) -> dict:
    """Fine-tune every model of the job (resuming from its runs file), writing groundtruth.json (a rung: its
    scores file) after each run -> the target's details."""
    s, split = job.settings, job.split
    fit, val = stratified_carve(split.train_y.numpy())
    sizes = {"n_fit": len(fit), "n_val": len(val), "n_test": len(split.test_y)}
    same = lambda r: (r["target"] == split.name and r["epochs"] == s.epochs and r["res"] == s.res  # noqa: E731
                      and r.get("schedule_epochs", r["epochs"]) == s.schedule_epochs
                      and bool(r.get("rung")) == s.rung
                      and r["seed"] in job.seeds and all(r.get(k) == v for k, v in sizes.items()))
    runs = [r for r in ladder.read_runs(job.runs_path) if same(r)]
    models = list(dict.fromkeys([r["model"] for r in runs] + job.models))  # earlier jobs' models stay in the table
    proto = protocol(s, job.grid, job.ladder, job.seeds, {split.name: split.about})
    built = {}
    for model in job.models:
        def one_run(lr, seed, model=model):
            base, head, mean_std, extra = _model_parts(model, job, built)
            log(f"{split.name} {model} lr {lr_key(lr)} seed {seed}: {len(fit)} fit / {len(val)} val / "
                f"{sizes['n_test']} test images, {s.epochs} epochs at {s.res} px")
            result = train_run(base, head, mean_std, split, torch.from_numpy(fit), torch.from_numpy(val), lr,
                               seed, s)
            record = {"target": split.name, "model": model, "lr": lr, "seed": seed, "fit": "train80",
                      "family": s.family, "res": s.res, "epochs": s.epochs, **sizes, **result, **extra}
            if s.schedule is not None or s.rung:
                record.update(schedule_epochs=s.schedule_epochs, rung=s.rung)
            append_run(job.runs_path, record)
            runs.append(record)
            log(f"  -> val {record['val_acc']}, test {record['test_acc']}, {record['seconds']} s"
                + (" (diverged)" if record["diverged"] else ""))
            _write(job, runs, models, proto)
            return record
        search_lrs(one_run, job.grid, [] if s.rung else job.ladder, job.seeds,
                   [r for r in runs if r["model"] == model])
    return _write(job, runs, models, proto)


def _model_parts(model: str, job: Job, cache: dict) -> tuple:
    """(feature model, head shape, (mean, std), extra record fields) of `model`; one model in memory at a
    time. A rung's extra field is the seconds of one feature-extraction pass."""
    if model not in cache:
        cache.clear()
        s, split = job.settings, job.split
        feats, dim, mean_std = build_features(model, job.build, s.res)[:3]
        extra = {"feature_seconds": feature_seconds(feats, split.train_x, mean_std, s)} if s.rung else {}
        cache[model] = (feats, (dim, int(split.train_y.max()) + 1), mean_std, extra)
    return cache[model]


def _write(job: Job, runs: list[dict], models: list[str], proto: dict) -> dict:
    """groundtruth.json -> the target's details; for a rung its scores file instead, from every rung run of
    the target with these epochs in the runs file, whatever job (family, resolution) made it."""
    s, target = job.settings, job.split.name
    if s.rung:
        return write_rung_scores(job.out, target, [
            r for r in ladder.read_runs(job.runs_path) if r["target"] == target and r.get("rung")
            and r["epochs"] == s.epochs and r.get("schedule_epochs") == s.schedule_epochs
            and r["seed"] in job.seeds])
    return write_groundtruth(job.out, target, models, runs, proto, job.ladder)


# ----------------------------------------------------------------------------------------------- CLI

def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected integers >= 0, got {text!r}")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = itm.CLIParser(prog=PROG, description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      epilog="Families (--family: base grid; ladder; default --res):\n" + "\n".join(
                          f"  {k}: {v['grid']}; {v['ladder']}; {v['res']} px -- {v['about']}"
                          for k, v in FAMILIES.items()) + "\nThe protocol in full: docs/finetune.md.")
    a = p.add_argument
    a("--target", choices=sorted(TARGET_FILES), help="a benchmark target, built from its raw file in --data")
    a("--data", metavar="DIR", help="--target: the folder holding " + ", ".join(TARGET_FILES.values()))
    a("--dataset", help="instead of --target: a dataset of extract.py with train and test splits "
      f"({', '.join(extract.DATASETS)})")
    a("--root", help="--dataset: its directory (imagefolder: holding train/ and test/)")
    a("--download", action="store_true", help="--dataset: let torchvision download it")
    a("--name", help="--dataset: the target's name in the output (default: the dataset, file or folder name)")
    a("--models", default="", help="comma-separated model names of extract.py (torchvision, SSL ViT, timm:NAME, "
      "hf:REPO_ID); with --checkpoint and --arch: the name to record it under")
    a("--checkpoint", help="local weights file of one model (with --arch, as in extract.py)")
    a("--arch", help="architecture of --checkpoint")
    a("--pool", choices=["cls", "mean"], help="ViT pooling (default: the model's own)")
    a("--random-init", action="store_true", help="no weights: seeded random ones (tests, timing)")
    a("--family", choices=sorted(FAMILIES), help="learning-rate family (default bn128; with --zoo each model's)")
    a("--lrs", type=_floats, help="base grid of learning rates (default: the family's)")
    a("--ladder", help="comma-separated rates bracketing walks (default: the family's); none: no bracketing")
    a("--epochs", type=_positive, default=EPOCHS, help=f"default {EPOCHS}")
    a("--schedule-epochs", type=_positive, metavar="S", help="epochs the learning-rate schedule spans "
      "(default: --epochs); more than --epochs stops each run early, after the first epochs of a longer one")
    a("--rung", action="store_true", help="a short rung (docs/ladder.md): the grid only (no bracketing), no "
      "test accuracy, validation also after recomputing batch-norm statistics; --out is then a scores file "
      "of the rung's signals, for kendall.py --scores")
    a("--zoo", metavar="DIR", help="the benchmark's weights folder: --models are names of bench/te_models.py "
      "(default: all of them); each model's family and resolution come from models.json beside DIR unless "
      "--family/--res are given")
    a("--res", type=_positive, help="input resolution in px (default: the family's)")
    a("--batch-size", type=_positive, default=BATCH, help=f"default {BATCH}")
    a("--seeds", type=_ints, default=[0], help="comma-separated seeds (torch + numpy) of every rate (default 0)")
    a("--no-flip", action="store_true", help="no random horizontal flips (gray, MNIST-like data; --target "
      "pneumonia has none)")
    a("--limit", type=_positive, help="a random subset of N images of each split (seed 0), for a quick look")
    a("--out", required=True, help="groundtruth.json to write (other targets in it are kept)")
    a("--runs", help="JSON-lines file of finished runs, appended to and resumed from (default: "
      "finetune_runs.jsonl beside --out)")
    a("--device", default="auto", help="auto (cuda if available; AMP there), cpu, cuda, cuda:1, ...")
    a("--threads", type=_positive, help="torch CPU threads (default: torch's)")
    a("--quiet", action="store_true", help="no per-epoch progress on stderr")
    return p


def _limited(split: Split, limit: int | None) -> Split:
    """`split` with a seeded random `limit` images of each part (original order kept)."""
    if limit is None:
        return split
    def pick(n):  # extract.py's --limit rule
        return torch.from_numpy(np.sort(np.random.default_rng(0).choice(n, min(n, limit), replace=False)))
    tr, te = pick(len(split.train_y)), pick(len(split.test_y))
    return Split(split.name, split.train_x[tr], split.train_y[tr], split.test_x[te], split.test_y[te], split.flip,
                 split.about + f"; a random {limit} of each (seed 0)")


def _split(args, res: int) -> Split:
    """The target's images, from --target/--data or --dataset/--root."""
    if (args.target is None) == (args.dataset is None):
        raise ExtractError("give one of --target (with --data) and --dataset (with --root)")
    if args.target is not None:
        if args.data is None:
            raise ExtractError("--target needs --data DIR")
        split = _limited(load_target(args.target, args.data, res), args.limit)
    else:
        split = load_user_dataset(args.dataset, args.root, res, limit=args.limit, download=args.download,
                                  label=args.name)
    if args.no_flip:
        split.flip = False
    return split


def _zoo_groups(args) -> list[tuple[str, int | None, list[str]]]:
    """[(family, res, models)] of a --zoo job: the benchmark's models grouped by the family and resolution
    models.json beside the weights folder gives them (--family/--res override)."""
    import te_models
    names = [m.strip() for m in args.models.split(",") if m.strip()] or list(te_models.NAMES)
    unknown = [m for m in names if m not in te_models.NAMES]
    if unknown:
        raise ExtractError(f"--zoo: unknown models {unknown}; known: {', '.join(te_models.NAMES)}")
    facts_path = Path(args.zoo).resolve().parent / "models.json"
    if not facts_path.is_file():
        raise ExtractError(f"--zoo: no models.json beside {args.zoo} (its family and resolution per model)")
    facts = json.loads(facts_path.read_text(encoding="utf-8"))["models"]
    groups: dict = {}
    for m in names:
        key = (args.family or facts[m]["family"], args.res or facts[m]["resolution"])
        groups.setdefault(key, []).append(m)
    return [(family, res, ms) for (family, res), ms in groups.items()]


def _job(args, family_name=None, res=None, models=None) -> Job:
    family_name = family_name or args.family or "bn128"
    family = FAMILIES[family_name]
    ladder = family["ladder"] if args.ladder is None else \
        [] if args.ladder.strip().lower() == "none" else _floats(args.ladder)
    build = {"checkpoint": args.checkpoint, "arch": args.arch, "pool": args.pool, "random_init": args.random_init,
             "zoo": args.zoo}
    if models is None:
        models = extract._model_names(args)
        for m in models:  # an unknown name or a missing file fails before any image is read
            extract._check_model(m, args.checkpoint, args.arch, args.pool)
            extract.fetch_hub_files(m, args.random_init)
    if args.schedule_epochs is not None and args.schedule_epochs < args.epochs:
        raise ExtractError(f"--schedule-epochs {args.schedule_epochs} is shorter than --epochs {args.epochs}")
    settings = Settings(epochs=args.epochs, res=res or args.res or family["res"], batch=args.batch_size,
                        family=family_name, device=args.device, progress=not args.quiet,
                        schedule=args.schedule_epochs, rung=args.rung)
    extract.resolve_device(args.device)
    out = Path(args.out)
    runs = Path(args.runs) if args.runs else out.with_name("finetune_runs.jsonl")
    return Job(_split(args, settings.res), models, build, settings, args.lrs or family["grid"], ladder,
               args.seeds, runs, out)


def _report(target: str, details: dict) -> None:
    """The chosen rate and accuracies of every model, on stdout."""
    print("target\tmodel\tchosen_lr\tval_acc\ttest_acc\trates tried")
    for m, d in details["per_model"].items():
        lr = d["chosen_lr"]
        key = None if lr is None else lr_key(lr)
        print(f"{target}\t{m}\t{key}\t{d['val_acc'].get(key)}\t{d['test_acc'].get(key)}\t{','.join(d['val_acc'])}")


def _report_rung(target: str, details: dict) -> None:
    """The models ranked by the rung's default signal (docs/ladder.md), then every signal, on stdout."""
    rungs = details["rungs"]
    names = sorted(rungs)
    print("target\tmodel\t" + "\t".join(names))
    for m in details["models"]:
        print(f"{target}\t{m}\t" + "\t".join("" if rungs[k]["scores"][m] is None else f"{rungs[k]['scores'][m]:.4f}"
                                           for k in names))


def _main(argv) -> int:
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    jobs = [_job(args, *group) for group in _zoo_groups(args)] if args.zoo else [_job(args)]
    for job in jobs:
        try:
            details = finetune(job)
        except KeyboardInterrupt:
            log(f"\n{PROG}: interrupted; finished runs are in {job.runs_path}")
            return 130
    if args.rung:
        _report_rung(job.split.name, details)
        print(f"wrote {job.out} (scores of {len(details['models'])} models); runs in {job.runs_path}")
        return 0
    _report(job.split.name, details)
    print(f"wrote {job.out} ({details['models_done']} of {details['models_total']} models done); runs in "
          f"{job.runs_path}")
    return 0


def main(argv=None) -> int:
    return itm.run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Tests for bench/finetune.py (the fine-tuning ground truth) and the truth files in bench/data/truth/.

Everything is offline and small: random-weight torchvision models at 32 px, one epoch, on the committed
Flowers-17 photos (tests/data/images) or a tiny in-memory npz; the ground truth it writes is read by
kendall.py, itm.py --truth and bench/accuracy.py as they are. The last test runs the path of
docs/finetune.md's "reproduce Table 1" (extract.py -> itm.py / baselines.py --json -> kendall.py against a
truth file of Table 5's shape) on fake data.
"""
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import accuracy  # noqa: E402
import baselines  # noqa: E402
import extract  # noqa: E402
import finetune  # noqa: E402
import itm  # noqa: E402
import kendall  # noqa: E402

IMAGES = ROOT / "tests" / "data" / "images"   # 12 Flowers-17 photos, 3 class folders of 4
TRUTH_DIR = ROOT / "bench" / "data" / "truth"
MODELS = "resnet18,squeezenet1_1"      # small enough to train at 32 px in a second
QUICK = ["--random-init", "--epochs", "1", "--res", "32", "--lrs", "0.01", "--ladder", "none", "--quiet"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: more threads only cost time


def run(capsys, main, *args):
    """Run a CLI's main in-process: (exit status, stdout, stderr)."""
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    """An imagefolder with train/ and test/, both the 12 committed photos."""
    root = tmp_path_factory.mktemp("flowers")
    for split in ("train", "test"):
        shutil.copytree(IMAGES, root / split, ignore=shutil.ignore_patterns("*.md"))
    return root


@pytest.fixture(scope="module")
def finetuned(flowers, tmp_path_factory):
    """(groundtruth.json, runs file, stdout) of one quick job on the photos."""
    out = tmp_path_factory.mktemp("ft") / "groundtruth.json"
    rc = finetune.main(["--dataset", "imagefolder", "--root", str(flowers), "--name", "flowers",
                        "--models", MODELS, "--out", str(out), *QUICK])
    assert rc == 0
    return out, out.with_name("finetune_runs.jsonl")


# ------------------------------------------------------------------------------------ the output

def test_groundtruth_has_the_benchmark_shape(finetuned):
    out, runs_path = finetuned
    doc = json.loads(out.read_text())
    assert set(doc) == {"protocol", "details", "flowers"}
    assert set(doc["flowers"]) == {"resnet18", "squeezenet1_1"}
    d = doc["details"]["flowers"]
    assert (d["models_done"], d["models_total"], d["complete"]) == (2, 2, True)
    for model, acc in doc["flowers"].items():
        per = d["per_model"][model]
        assert per["chosen_lr"] == 0.01 and per["test_acc"] == {"0.01": acc} and 0 <= acc <= 1
        assert set(per["val_acc"]) == {"0.01"} and per["epochs"] == 1 and per["res"] == 32
    assert {"splits", "validation", "fine_tuning", "lr_ladder", "lr_grid", "seeds"} <= set(doc["protocol"])
    runs = [json.loads(line) for line in runs_path.read_text().splitlines()]
    assert len(runs) == 2
    for r in runs:  # finetune_runs.jsonl's keys, a learning curve of one epoch
        assert {"target", "model", "lr", "seed", "fit", "family", "res", "epochs", "n_fit", "n_val", "n_test",
                "val_acc", "test_acc", "epoch_loss", "val_curve", "diverged", "seconds"} <= set(r)
        assert (r["n_fit"], r["n_val"], r["n_test"]) == (9, 3, 12)  # one of 4 per class held out
        assert len(r["epoch_loss"]) == len(r["val_curve"]) == 1 and not r["diverged"]


def test_groundtruth_feeds_kendall_itm_and_accuracy(finetuned, flowers, tmp_path, capsys):
    out, _ = finetuned
    truth = json.loads(out.read_text())["flowers"]
    assert kendall.load_truth(out, "flowers") == truth
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"flowers": {"resnet18": 1.0, "squeezenet1_1": 2.0}}))
    rc, text, err = run(capsys, kendall.main, "--scores", scores, "--truth", out, "--json")
    assert rc == 0, err
    assert json.loads(text)["tau_w"]["flowers"] in (-1.0, 1.0)
    feats = tmp_path / "flowers.npz"
    rc, _, err = run(capsys, extract.main, "--models", MODELS, "--random-init", "--dataset", "imagefolder",
                     "--root", flowers / "train", "--out", feats, "--quiet", "--workers", "0")
    assert rc == 0, err
    rc, text, err = run(capsys, itm.main, "--features", feats, "--truth", out, "--json", "--quiet",
                        "--iterations", "20", "--eval-every", "10", "--batch-size", "8")
    assert rc == 0, err
    ranked = json.loads(text)
    assert set(ranked["scores"]["ITM"]) == set(truth) and ranked.get("weighted_tau") is not None  # truth was read
    bench = tmp_path / "bench"
    (bench / "features").mkdir(parents=True)
    shutil.copy(out, bench / "groundtruth.json")
    tables, details = accuracy.read_groundtruth(bench)
    assert tables == {"flowers": truth} and details["flowers"]["complete"] is True


def test_a_second_run_resumes_without_rerunning(finetuned, flowers, capsys):
    out, runs_path = finetuned
    before = runs_path.read_text()
    rc, text, _ = run(capsys, finetune.main, "--dataset", "imagefolder", "--root", flowers, "--name", "flowers",
                      "--models", MODELS, "--out", out, *QUICK)
    assert rc == 0 and runs_path.read_text() == before
    assert "2 of 2 models done" in text


def test_npz_target_and_bracketing_on_the_ladder(tmp_path, capsys):
    """A gray npz (no flips), a grid of one rate: bracketing walks the ladder to both sides."""
    rng = np.random.default_rng(0)
    path = tmp_path / "gray.npz"
    y = np.repeat(np.arange(2), 6)
    np.savez(path, x_train=rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), y_train=y,
             x_test=rng.integers(0, 256, (6, 28, 28), dtype=np.uint8), y_test=y[::2])
    out = tmp_path / "gt.json"
    rc, text, err = run(capsys, finetune.main, "--dataset", path, "--models", "mobilenet_v3_small", "--random-init",
                        "--epochs", "1", "--res", "32", "--lrs", "0.01", "--ladder", "0.03,0.01,0.003",
                        "--no-flip", "--out", out, "--quiet")
    assert rc == 0, err
    per = json.loads(out.read_text())["details"]["gray"]["per_model"]["mobilenet_v3_small"]
    assert {"0.01", "0.003"} <= set(per["val_acc"]) and per["search_done"]
    assert "gray\tmobilenet_v3_small" in text
    rc, _, err = run(capsys, finetune.main, "--dataset", path, "--models", "squeezenet1_1", "--random-init",
                     "--epochs", "1", "--res", "40", "--lrs", "0.01", "--ladder", "none", "--out", out, "--quiet")
    assert rc == 0, err  # another model with other settings: the first one stays in the table
    doc = json.loads(out.read_text())
    assert set(doc["gray"]) == {"mobilenet_v3_small", "squeezenet1_1"} and doc["details"]["gray"]["models_total"] == 2


# ------------------------------------------------------------------------ short rungs (docs/ladder.md)

RUNG = ["--random-init", "--res", "32", "--lrs", "0.01,0.003", "--quiet", "--rung"]


def test_a_short_rung_writes_signals_kendall_reads(flowers, tmp_path, capsys):
    """One epoch of two tiny models at the grid's two rates: no bracketing (its ladder is the family's),
    no test accuracy, every signal in a scores file that kendall.py reads against a truth file."""
    out = tmp_path / "rung.json"
    rc, text, err = run(capsys, finetune.main, "--dataset", "imagefolder", "--root", flowers, "--name", "flowers",
                        "--models", MODELS, "--epochs", "1", "--out", out, *RUNG)
    assert rc == 0, err
    runs = [json.loads(line) for line in out.with_name("finetune_runs.jsonl").read_text().splitlines()]
    assert sorted((r["model"], r["lr"]) for r in runs) == [(m, lr) for m in sorted(MODELS.split(","))
                                                           for lr in (0.003, 0.01)]
    for r in runs:
        assert r["rung"] is True and r["test_acc"] is None and r["schedule_epochs"] == r["epochs"] == 1
        assert 0 <= r["val_acc_bn"] <= 1 and r["bn_seconds"] >= 0 and r["feature_seconds"] >= 0
        assert len(r["epoch_seconds"]) == 1 and r["epoch_seconds"][0] <= r["seconds"]
    doc = json.loads(out.read_text())
    assert doc["dataset"] == "flowers" and len(doc["scores"]) == 8   # 2 rate choices x 4 signals
    lows = {r["model"]: r for r in runs if r["lr"] == 0.003}
    assert doc["scores"]["short E=1 low loss"] == {m: -r["epoch_loss"][0] for m, r in lows.items()}
    assert doc["scores"]["short E=1 low val_bn"] == {m: r["val_acc_bn"] for m, r in lows.items()}
    assert "flowers\tresnet18\t" in text
    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps({"flowers": {"resnet18": 0.9, "squeezenet1_1": 0.5}}))
    rc, text, err = run(capsys, kendall.main, "--scores", out, "--truth", truth, "--json")
    assert rc == 0, err
    table = json.loads(text)   # {rung: {"tau_w": {target: value, "mean": value}}}
    assert set(table) == set(doc["scores"])
    low = doc["scores"]["short E=1 low loss"]
    assert table["short E=1 low loss"]["tau_w"]["flowers"] == (1.0 if low["resnet18"] > low["squeezenet1_1"]
                                                              else -1.0)


def test_schedule_epochs_cut_a_longer_run_short(flowers, tmp_path, capsys):
    """--epochs 1 --schedule-epochs 2 is the first epoch of the 2-epoch run, bit for bit, and not the
    compressed 1-epoch run (whose rate anneals within its one epoch)."""
    losses = {}
    for name, extra in (("two", ["--epochs", "2"]), ("cut", ["--epochs", "1", "--schedule-epochs", "2"]),
                        ("one", ["--epochs", "1"])):
        out = tmp_path / name / "rung.json"
        rc, _, err = run(capsys, finetune.main, "--dataset", "imagefolder", "--root", flowers, "--models",
                         "resnet18", "--out", out, "--batch-size", "3", *RUNG, *extra)   # 3 steps an epoch
        assert rc == 0, err
        runs = [json.loads(line) for line in out.with_name("finetune_runs.jsonl").read_text().splitlines()]
        losses[name] = {r["lr"]: r["epoch_loss"] for r in runs}
        prefix = "trunc e=1 " if name == "cut" else f"short E={len(runs[0]['epoch_loss'])} "
        assert all(k.startswith(prefix) for k in json.loads(out.read_text())["scores"])
    for lr in (0.01, 0.003):
        assert losses["cut"][lr] == losses["two"][lr][:1]
        assert losses["one"][lr] != losses["cut"][lr]
    rc, _, err = run(capsys, finetune.main, "--dataset", "imagefolder", "--root", flowers, "--models", "resnet18",
                     "--out", tmp_path / "x.json", *RUNG, "--epochs", "2", "--schedule-epochs", "1")
    assert rc == 1 and "--schedule-epochs 1 is shorter than --epochs 2" in err


def test_recompute_bn_is_the_plain_average_over_the_images():
    """After recompute_bn a batch norm's running mean and variance are the plain average of its input's
    per-batch mean and unbiased variance (computed here by hand); its momentum is restored."""
    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.3)
    net = torch.nn.Sequential(conv, bn)
    x = torch.randint(0, 256, (300, 3, 8, 8), dtype=torch.uint8)   # 3 batches of EVAL_BATCH = 128 images
    norm = finetune.Normalise((0.5,) * 3, (0.25,) * 3, torch.device("cpu"))
    assert finetune.recompute_bn(net, x, norm, finetune.contextlib.nullcontext) == 1
    with torch.no_grad():
        z = conv(norm(x)).double()                     # N x 4 x 6 x 6
    per_batch = [z[i:i + finetune.EVAL_BATCH] for i in range(0, len(z), finetune.EVAL_BATCH)]
    # momentum=None: the running values are the plain average of the batches' mean and unbiased variance
    want_mean = torch.stack([b.mean((0, 2, 3)) for b in per_batch]).mean(0)
    want_var = torch.stack([b.transpose(0, 1).flatten(1).var(1) for b in per_batch]).mean(0)
    assert torch.allclose(bn.running_mean.double(), want_mean, atol=1e-5)
    assert torch.allclose(bn.running_var.double(), want_var, rtol=1e-4)
    assert bn.momentum == 0.3
    assert finetune.recompute_bn(torch.nn.Sequential(conv), x, norm, finetune.contextlib.nullcontext) == 0


# ----------------------------------------------------------------------------- parts of the protocol

def table(**rates):
    """{lr: (val acc, final loss) or None} from keyword pairs like r0_01=(0.9, 0.1)."""
    return {float(k[1:].replace("_", ".")): v for k, v in rates.items()}


LADDER = finetune.FAMILIES["bn128"]["ladder"]


@pytest.mark.parametrize("rates, want", [
    (table(r0_03=(0.80, 0.1), r0_01=(0.90, 0.1)), 0.003),                       # best at the low edge
    (table(r0_03=(0.95, 0.1), r0_01=(0.90, 0.1)), 0.1),                         # best at the high edge
    (table(r0_03=(0.8, 0.1), r0_01=(0.9, 0.1), r0_003=(0.85, 0.1)), None),      # bracketed
    (table(r0_01=(0.8, 0.1), r0_003=(0.8, 0.2), r0_001=(0.9, 0.3)), None),      # the ladder's end
    (table(r0_03=None, r0_01=(0.9, 0.1)), 0.003),                               # diverged: tried, never chosen
    (table(r0_03=None, r0_01=None), 0.003),                                     # all diverged: go lower
])
def test_next_lr(rates, want):
    assert finetune.next_lr(rates, LADDER) == want


def test_best_lr_breaks_ties_by_final_loss_and_skips_diverged():
    assert finetune.best_lr(table(r0_03=(0.9, 0.3), r0_01=(0.9, 0.1))) == 0.01
    assert finetune.best_lr(table(r0_03=None, r0_01=(0.5, 0.1))) == 0.01
    assert finetune.best_lr(table(r0_03=None)) is None


def test_stratified_carve_holds_out_a_fifth_of_each_class():
    y = np.repeat(np.arange(17), 40)
    fit, val = finetune.stratified_carve(y)
    assert len(val) == 136 and np.all(np.bincount(y[val]) == 8)
    assert np.array_equal(np.sort(np.concatenate([fit, val])), np.arange(len(y)))
    again = finetune.stratified_carve(y)
    assert np.array_equal(val, again[1])


def test_augment_is_seeded_and_flips_only_when_asked():
    x = torch.rand(20, 3, 16, 16)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")  # res/8 = 2 on each side
    crops = lambda i: [padded[i, :, t:t + 16, s:s + 16] for t in range(5) for s in range(5)]  # noqa: E731
    a = finetune.augment(x, torch.Generator().manual_seed(0), True)
    assert torch.equal(a, finetune.augment(x, torch.Generator().manual_seed(0), True))
    flipped = [not any(torch.equal(a[i], c) for c in crops(i)) for i in range(20)]
    assert all(any(torch.equal(a[i], c.flip(-1)) for c in crops(i)) for i in range(20) if flipped[i])
    assert 0 < sum(flipped) < 20
    b = finetune.augment(x, torch.Generator().manual_seed(0), False)
    assert all(any(torch.equal(b[i], c) for c in crops(i)) for i in range(20))


def test_batches_never_leave_one_image_alone():
    sizes = [len(b) for b in finetune.batches(65, 32, torch.Generator().manual_seed(0))]
    assert sizes == [32, 33]


def test_bad_input_is_one_line(capsys, tmp_path):
    rc, _, err = run(capsys, finetune.main, "--models", "resnet18", "--out", tmp_path / "gt.json")
    assert rc == 1 and err.strip() == "finetune.py: error: give one of --target (with --data) and --dataset " \
                                      "(with --root)"
    rc, _, err = run(capsys, finetune.main, "--target", "flowers17", "--data", tmp_path, "--models", "resnet18",
                     "--out", tmp_path / "gt.json")
    assert rc == 1 and "flowers17_s160_q90.zip does not exist" in err and err.count("\n") == 1
    rc, _, err = run(capsys, finetune.main, "--dataset", "fake", "--models", "no_such_model",
                     "--out", tmp_path / "gt.json")
    assert rc == 1 and "unknown model 'no_such_model'" in err


# -------------------------------------------------------------------------------------- truth files

PAPER_DATASETS = ["caltech101", "cars", "cifar100", "cifar10", "dtd", "aircraft", "flowers102", "food101",
                  "pets", "sun397", "voc"]


def test_paper_table5_is_20_models_of_extract_by_11_datasets():
    path = TRUTH_DIR / "paper_table5.json"
    doc = json.loads(path.read_text())
    assert isinstance(doc["source"], str) and "Table 5" in doc["source"]
    tables = {k: v for k, v in doc.items() if isinstance(v, dict)}
    assert list(tables) == PAPER_DATASETS
    models = set(extract.available_models())
    for name in PAPER_DATASETS:
        truth = kendall.load_truth(path, name)
        assert len(truth) == 20 and set(truth) <= models and all(50 < v < 100 for v in truth.values())
    assert doc["cifar10"]["dino_vitb16"] == 98.70 and doc["voc"]["mae_vitl16"] == 88.01  # as printed


def test_published_groups_are_the_tables_file_in_the_truth_shape():
    rename = {"flowers": "flowers102", "food": "food101", "voc2007": "voc"}
    groups = json.loads((ROOT / "bench" / "data" / "finetune_acc_tables.json").read_text())
    for group, tables in groups.items():
        doc = json.loads((TRUTH_DIR / f"{group}.json").read_text())
        assert isinstance(doc.pop("source"), str)
        assert doc == {rename.get(k, k): v for k, v in tables.items()}


def test_table1_path_on_fake_data(tmp_path, capsys):
    """docs/finetune.md's Table 1 path: extract.py into FOLDER/features/, a Table-5-shaped truth file as
    FOLDER/groundtruth.json; then itm.py and baselines.py --json -> kendall.py, and bench/accuracy.py."""
    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, x_train=rng.integers(0, 256, (18, 32, 32, 3), dtype=np.uint8), y_train=np.repeat(np.arange(3), 6))
    models = ["resnet18", "squeezenet1_1", "shufflenet_v2_x0_5"]
    folder = tmp_path / "table1"
    (folder / "features").mkdir(parents=True)
    truth = folder / "groundtruth.json"
    truth.write_text(json.dumps({"source": "made up", "tiny": dict(zip(models, (71.5, 80.2, 64.0)))}))
    feats = folder / "features" / "tiny.npz"
    rc, _, err = run(capsys, extract.main, "--models", ",".join(models), "--random-init", "--dataset", data,
                     "--limit", "18", "--out", feats, "--quiet", "--workers", "0", "--batch-size", "18")
    assert rc == 0, err
    small = ["--iterations", "20", "--eval-every", "10", "--batch-size", "8"]
    rc, itm_json, err = run(capsys, itm.main, "--features", feats, "--json", "--quiet", *small)
    assert rc == 0, err
    rc, base_json, err = run(capsys, baselines.main, "--features", feats, "--methods", "logme,probe_ncm",
                             "--json", "--quiet")
    assert rc == 0, err
    (tmp_path / "itm.json").write_text(itm_json)
    (tmp_path / "base.json").write_text(base_json)
    rc, text, err = run(capsys, kendall.main, "--scores", f"{tmp_path / 'itm.json'},{tmp_path / 'base.json'}",
                        "--truth", truth, "--metric", "tau_w,rel1", "--json")
    assert rc == 0, err
    result = json.loads(text)  # {method: {metric: {dataset: value}}}; the table named by the features' file
    assert set(result) == {"ITM", "logme", "probe_ncm"}
    assert all(math.isfinite(r[metric]["tiny"]) for r in result.values() for metric in ("tau_w", "rel1"))
    rc, _, err = run(capsys, accuracy.main, "--shared", folder, "--min-models", "2", "--seeds", "1",
                     "--bootstrap", "10", "--methods", "logme", "--no-figures", "--out", tmp_path / "results",
                     "--itm", "iterations=20", "--itm", "eval_every=10", "--itm", "batch_size=8")
    assert rc == 0, err
    scored = json.loads((tmp_path / "results" / "results.json").read_text())
    assert "tiny" in json.dumps(scored)

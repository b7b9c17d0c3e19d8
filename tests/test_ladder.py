"""Tests for bench/ladder.py (the budget ladder's signals, procedures and rule, DESIGN.md §7) and
bench/accuracy.py --ladder, on hand-made runs: every expected value is worked out by hand beside it.
No torch: the short rungs themselves are tested in tests/test_finetune.py."""
import json
import math
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import accuracy  # noqa: E402
import kendall  # noqa: E402
import ladder  # noqa: E402


def run(model, lr, losses, val=None, *, epochs=None, seconds=10.0, diverged=False, **extra):
    """A runs-file record (bench/finetune.py's keys)."""
    return {"target": "t", "model": model, "lr": lr, "seed": 0, "epochs": epochs or len(losses),
            "epoch_loss": losses, "val_curve": val or [], "val_acc": (val or [None])[-1], "diverged": diverged,
            "seconds": seconds, "n_val": 10, "n_test": 20, "family": "tfl", **extra}


# ------------------------------------------------------------------------------------------ signals

def test_signals_of_a_run():
    r = run("a", 0.01, [2.0, 1.5], [0.4, 0.6], val_acc_bn=0.7, bn_seconds=1.0)
    assert ladder.signal(r, "loss") == -1.5
    assert ladder.signal(r, "loss_sum") == -3.5
    assert ladder.signal(r, "val") == 0.6
    assert ladder.signal(r, "val_bn") == 0.7
    assert ladder.signal(r, "loss", epochs=1) == -2.0          # truncated: the first epoch only
    assert ladder.signal(r, "val", epochs=1) == 0.4
    assert ladder.signal(r, "val_bn", epochs=1) is None         # never recorded mid-run
    with pytest.raises(ValueError, match="unknown signal"):
        ladder.signal(r, "speed")


def test_a_diverged_run_has_no_signal_but_its_early_epochs_do():
    r = run("a", 0.03, [2.0, 1.8, None], diverged=True)
    assert ladder.signal(r, "loss") is None
    assert ladder.signal(r, "loss_sum", epochs=2) == -3.8


def test_seconds_leave_out_the_bn_pass_unless_needed_and_scale_truncated_runs():
    r = run("a", 0.01, [2.0], [0.5], seconds=12.0, bn_seconds=2.0)
    assert ladder.run_seconds(r, "loss") == 10.0
    assert ladder.run_seconds(r, "val_bn") == 12.0
    full = run("a", 0.01, [3.0] * 8, seconds=80.0)
    assert ladder.run_seconds(full, "loss", epochs=2) == 20.0


def test_rung_scores_low_and_best_rates():
    runs = [run("a", 0.01, [1.0], [0.5]), run("a", 0.003, [0.8], [0.4]),
            run("b", 0.01, [0.9], [0.7]), run("b", 0.003, [None], diverged=True)]
    cells = ladder.rung_scores(runs)   # low = each model's lowest rate, 0.003
    assert cells["short E=1 low loss"]["scores"] == {"a": -0.8, "b": None}
    assert cells["short E=1 best loss"]["scores"] == {"a": -0.8, "b": -0.9}
    assert cells["short E=1 best val"]["scores"] == {"a": 0.5, "b": 0.7}
    assert cells["short E=1 low loss"]["seconds"] == {"a": 10.0, "b": 10.0}
    assert cells["short E=1 best loss"]["seconds"] == {"a": 20.0, "b": 20.0}


def test_shortlist_reorders_only_the_top_k():
    itm_scores = {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0}
    rung = {"a": 0.1, "b": 0.9, "c": 0.5, "d": 0.0}
    got = ladder.shortlisted(itm_scores, rung, 2)             # a, b re-ordered by the rung: b, a, c, d
    assert sorted(got, key=lambda m: -got[m]) == ["b", "a", "c", "d"]
    got = ladder.shortlisted(itm_scores, rung, None)          # every model: the rung's order
    assert sorted(got, key=lambda m: -got[m]) == ["b", "c", "a", "d"]
    got = ladder.shortlisted(itm_scores, {"a": None, "b": 0.2}, 2)   # no signal: below the shortlist
    assert sorted(got, key=lambda m: -got[m]) == ["b", "a", "c", "d"]


def test_describe_says_it_in_words():
    assert ladder.describe("trunc e=1 low loss") == ("every model: the first epoch of the 8-epoch protocol at the "
                                                     "grid's lower rate; rank by its last training loss")
    assert ladder.describe("short E=2 best val", 5).startswith("ITM's top 5: 2 epochs of fine-tuning")


def test_metrics_are_kendalls():
    scores, truth = {"a": 3.0, "b": None, "c": 1.0}, {"a": 0.9, "b": 0.5, "c": 0.7}
    got = ladder.metrics(scores, truth)
    assert got["tau_w"] == kendall.weighted_tau([3.0, 0.0, 1.0], [0.9, 0.5, 0.7])   # None -> below all
    assert got["rel1"] == 1.0


# ------------------------------------------------------------------------------------------ the rule

def cand(name, tau, rel, share, rung="r"):
    return {"name": name, "rung": rung, "k": None, "tau_w": tau, "rel1": rel, "share_max": share,
            "share_mean": share, "per_target": {}}


def test_choose_applies_tiers_eligibility_and_ties():
    evaluated = [cand("ITM", 0.20, 0.95, 0.001, rung=None),
                 cand("cheap", 0.40, 0.96, 0.04),
                 cand("tied-but-dearer", 0.41, 0.97, 0.10),
                 cand("best", 0.60, 0.99, 0.30),
                 cand("worse top pick", 0.90, 0.90, 0.01),     # Rel@1 below ITM's: not eligible
                 cand("too dear", 0.95, 1.0, 0.50)]
    chosen = {tier: c["name"] for tier, c in ladder.choose(evaluated).items()}
    assert chosen == {"seconds": "ITM", "<= 5%": "cheap", "<= 15%": "cheap", "<= 40%": "best"}


def test_truncated_reads_the_grid_and_the_chosen_rate():
    full = [run("a", 0.01, [1.0, 0.5] + [0.1] * 6, seconds=80.0), run("a", 0.003, [1.2, 0.4] + [0.1] * 6),
            run("a", 0.001, [1.5, 0.3] + [0.1] * 6)]   # 0.001: a bracketing rate, outside tfl's grid
    cells = ladder.truncated(full, {"a": "tfl"}, {"a": 0.001})
    assert cells["trunc e=1 low loss"]["scores"] == {"a": -1.2}      # tfl's lower grid rate, 0.003
    assert cells["trunc e=1 best loss"]["scores"] == {"a": -1.0}
    assert cells["trunc e=2 best loss_sum"]["scores"] == {"a": -1.5}
    assert cells["trunc e=1 chosen loss"]["scores"] == {"a": -1.5}
    assert cells["trunc e=1 best loss"]["seconds"] == {"a": 11.25}    # 80/8 + 10/8
    assert "trunc e=1 low loss_sum" not in cells                      # = loss at e = 1


def test_full_protocol_estimated_from_short_runs():
    short = [run("a", 0.01, [1.0, 0.9], [0.5, 0.6], seconds=9.0, epoch_seconds=[4.0, 4.0], bn_seconds=0.0)]
    # per epoch 4 s; per validation pass (9 - 8) / 2 = 0.5 s; test pass 0.5 * 20 / 10 = 1 s; 3 full runs
    assert ladder.full_seconds_here(short, {"a": 3}) == {"a": 3 * (8 * 4.5 + 1.0)}


def test_svg_plot_is_well_formed():
    lt = {"rows": {"x": {"kind": "short", "share": 0.02, "tau_w": 0.5},
                   "y": {"kind": "features", "share": math.nan, "tau_w": 0.1},
                   "full protocol": {"kind": "full", "share": 1.0, "tau_w": 1.0}}}
    root = ET.fromstring(ladder.svg_plot({"t1": lt, "t2": lt}))
    assert root.tag.endswith("svg")


# ----------------------------------------------------------------------------- accuracy.py --ladder

def make_bench(root: Path) -> tuple[Path, Path]:
    """A te_bench with 4 models on one target, its runs and results.json; -> (shared dir, short runs)."""
    bench = root / "te_bench"
    (bench / "features").mkdir(parents=True)   # what find_bench_dir looks for
    truth = {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.6}
    details = {"t": {"complete": True, "per_model": {m: {"chosen_lr": 0.01} for m in truth}}}
    (bench / "groundtruth.json").write_text(json.dumps({"protocol": {}, "details": details, "t": truth}))
    (bench / "models.json").write_text(json.dumps({"models": {m: {"family": "tfl"} for m in truth}}))
    full = [run(m, lr, [1.0 + i / 10 + j] * 8, seconds=80.0)
            for i, m in enumerate(truth) for j, lr in enumerate((0.01, 0.003))]
    (bench / "finetune_runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in full))
    short = [run(m, lr, [1.0 + i / 10], [0.9 - i / 10], seconds=5.0, epoch_seconds=[4.0], bn_seconds=0.5,
                 val_acc_bn=0.9 - i / 10, feature_seconds=1.0, rung=True)
             for i, m in enumerate(truth) for lr in (0.01, 0.003)]
    (root / "short.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short))
    itm_scores = {"a": 1.0, "b": 4.0, "c": 3.0, "d": 2.0}   # ITM puts b first
    results = {"targets": {"t": {"models": list(truth), "truth": truth, "methods": {
        "itm": {"runs": [{"seed": 0, "seconds": 2.0, "scores": itm_scores}]},
        "prior_dim": {"scores": {"a": 1, "b": 2, "c": 3, "d": 4}, "seconds": 0.0}}}}}
    (root / "out").mkdir()
    (root / "out" / "results.json").write_text(json.dumps(results))
    return root, root / "short.jsonl"


def test_accuracy_ladder_end_to_end(tmp_path, capsys):
    shared, short = make_bench(tmp_path)
    page = tmp_path / "ladder.md"
    page.write_text("before\n<!-- ladder:begin -->\nold\n<!-- ladder:end -->\nafter\n")
    readme = tmp_path / "README.md"
    readme.write_text("top\n<!-- budget:begin -->\n<!-- budget:end -->\n")
    rc = accuracy.main(["--shared", str(shared), "--out", str(tmp_path / "out"), "--ladder", str(short),
                        "--ladder-docs", str(page), "--ladder-readme", str(readme)])
    assert rc == 0
    text = page.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    budget = readme.read_text()
    assert "| seconds per model | ITM on the features (seed 0) |" in budget and "python bench/accuracy.py" in budget and "--ladder-readme" not in budget
    doc = json.loads((tmp_path / "out" / "ladder.json").read_text())
    rows = doc["rows"]["t"]
    assert rows["short E=1 low loss"]["tau_w"] == pytest.approx(1.0)   # losses rise with the truth's fall
    assert rows["itm"]["rel1"] == pytest.approx(0.8 / 0.9)
    # ITM: (1 s features + 0.5 s ITM) per model; full here: 2 runs x (8 x (4 + 0.5) + 0.5 x 2) = 74 s
    assert rows["itm"]["share"] == pytest.approx(1.5 / 74)
    assert rows["short E=1 low loss"]["share"] == pytest.approx(4.5 / 74)
    assert doc["chosen"]["seconds"] == "ITM"
    assert doc["chosen"]["<= 15%"].startswith("top-")
    assert (tmp_path / "out" / "ladder.svg").is_file() and (tmp_path / "ladder.svg").is_file()
    assert "python bench/accuracy.py" in capsys.readouterr().out


def test_accuracy_ladder_errors_are_one_line(tmp_path, capsys):
    shared, short = make_bench(tmp_path)
    rc = accuracy.main(["--shared", str(shared), "--out", str(tmp_path / "out"), "--ladder", "nope.jsonl"])
    assert rc != 0 and "no runs file" in capsys.readouterr().err
    rc = accuracy.main(["--shared", str(shared), "--out", str(tmp_path), "--ladder", str(short)])
    assert rc != 0 and "no " in capsys.readouterr().err
    rc = accuracy.main(["--shared", str(shared), "--ladder-docs", "x.md"])
    assert rc != 0 and "--ladder-docs and --ladder-readme need --ladder" in capsys.readouterr().err

"""Tests for bench/accuracy.py (the real-data accuracy harness) on a tiny synthetic shared/ directory.

The directory mimics te_bench: features/<target>.npz (float16 N×D per model + labels) and groundtruth.json.
t1 is complete (4 models); t2 is incomplete and lacks ground truth for one model; t3 has no ground truth.
ITM runs shortened (SMALL) so the whole file takes a few seconds.
"""
import copy
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import accuracy  # noqa: E402

SMALL = {"iterations": 40, "eval_every": 20, "batch_size": 32}
SEEDS = (0, 1)
METHODS = ["logme", "sfda", "etran", "leep", "no_such_method"]


def _features(rng, y, K, D, sep):
    means = sep * rng.standard_normal((K, D))
    return np.maximum(means[y] + rng.standard_normal((len(y), D)), 0).astype(np.float16)


def make_shared(root):
    rng = np.random.default_rng(0)
    feats = root / "te_bench" / "features"
    feats.mkdir(parents=True)
    truth = {}
    for t, (N, K) in {"t1": (120, 3), "t2": (100, 4), "t3": (90, 3)}.items():
        y = rng.permutation(np.arange(N) % K)
        arrays = {f"m{i}": _features(rng, y, K, D, sep) for i, (D, sep) in
                  enumerate([(8, 0.3), (16, 0.8), (24, 1.5), (12, 2.5)])}
        np.savez(feats / f"{t}.npz", labels=y.astype(np.int64), **arrays)
        truth[t] = dict(zip(arrays, (0.6, 0.5, 0.8, 0.7)))
    del truth["t3"], truth["t2"]["m3"]            # t3: no ground truth; t2: m3 not finished yet
    gt = {"protocol": {}, "details": {"t1": {"complete": True},
                                      "t2": {"complete": False, "models_done": 3, "models_total": 4}}}
    (root / "te_bench" / "groundtruth.json").write_text(json.dumps({**gt, **truth}))
    return root


def numbers(obj):
    """The results without wall times (everything that must be identical across runs)."""
    if isinstance(obj, dict):
        return {k: numbers(v) for k, v in obj.items() if "seconds" not in k}
    if isinstance(obj, list):
        return [numbers(v) for v in obj]
    return obj


def run_small(shared, **kw):
    bench = accuracy.find_bench_dir(shared)
    return accuracy.run(bench, seeds=SEEDS, methods=METHODS, itm_options=SMALL, quiet=True, **kw)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return make_shared(tmp_path_factory.mktemp("shared"))


@pytest.fixture(scope="module")
def first(shared):
    return run_small(shared)


def test_targets_present_are_picked_up_and_missing_truth_skipped(first):
    results, _ = first
    assert list(results["targets"]) == ["t1", "t2"]
    assert "t3" in results["skipped_targets"]
    t2 = results["targets"]["t2"]
    assert t2["models"] == ["m0", "m1", "m2"] and "m3" not in t2["methods"]["itm"]["mean_score"]
    assert any("m3 has no ground truth" in n for n in t2["notes"])
    assert any("incomplete" in n for n in t2["notes"])
    md = accuracy.render(results)
    assert "m3 has no ground truth yet, skipped" in md and "t3: not scored" in md


def test_table_rows_and_columns(first):
    results, _ = first
    md = accuracy.render(results).splitlines()
    head = md.index("| Method | t1 | t2 | Mean |")
    rows = [line.split(" | ")[0].lstrip("| ") for line in md[head + 2: head + 4 + len(METHODS)]]
    assert rows[:2] == [f"ITM ({len(SEEDS)} seeds, mean ± std)", f"ITM (τ_w of the {len(SEEDS)}-seed mean score)"]
    assert rows[2:] == [accuracy.label(m) for m in METHODS]
    assert all(line.count("|") == 5 for line in md[head: head + 4 + len(METHODS)])
    assert "| Method | τ_w | Kendall τ | Spearman ρ | Rel@1 |" in md
    assert "| Method | t1 | t2 | Total |" in md          # the seconds table
    t1 = results["targets"]["t1"]["methods"]
    assert set(t1["logme"]["metrics"]) == set(accuracy.METRICS)
    assert len(t1["itm"]["runs"]) == len(SEEDS)
    assert "n/a (needs source-model logits" in "\n".join(md)
    assert t1["no_such_method"]["error"] == "not in baselines.py"
    assert results["summary"]["logme"]["mean"] == pytest.approx(
        np.mean([results["targets"][t]["methods"]["logme"]["metrics"]["tau_w"] for t in ("t1", "t2")]))
    assert "leep" not in results["summary"]


def test_deterministic(shared, first):
    again, _ = run_small(shared)
    assert numbers(again) == numbers(first[0])


def test_jobs_give_the_same_itm_scores(shared, first):
    target = accuracy.load_targets(accuracy.find_bench_dir(shared), ["t1"])[0][0]
    two = accuracy.itm_runs(target, (0,), jobs=2, options=SMALL, quiet=True)[0]
    assert two["scores"] == first[0]["targets"]["t1"]["methods"]["itm"]["runs"][0]["scores"]


def test_stability_all_subsets_and_sampled(first):
    results, arrays = first
    s = results["stability"]["t1"]
    assert (s["k"], s["subsets"], s["sampled"]) == (3, 4, False)      # min(10, M - 1) of 4 models
    assert set(s["itm_beats"]["itm_seed0"]) == {"logme", "sfda", "etran"}
    scores = accuracy.stability_scores(results["targets"]["t1"])
    sampled, tau = accuracy.run_stability(scores, results["targets"]["t1"]["truth"], k=3, max_subsets=1,
                                          sample=3)
    assert sampled["sampled"] and sampled["subsets"] == 3 and len(tau["logme"]) == 3
    md = accuracy.render(results)
    assert "all C(4, 3) = 4 subsets" in md


@pytest.mark.skipif(accuracy.baselines is None, reason="baselines.py not importable")
def test_raising_baseline_is_reported_not_fatal(shared, monkeypatch):
    def boom(features, labels):
        raise RuntimeError("synthetic failure")
    monkeypatch.setattr(accuracy.baselines, "logme", boom)
    target = accuracy.load_targets(accuracy.find_bench_dir(shared), ["t1"])[0][0]
    res = accuracy.run_baseline("logme", target)
    assert res["error"].startswith("m0: RuntimeError: synthetic failure") and res["scores"] is None


@pytest.mark.skipif(accuracy.baselines is None, reason="baselines.py not importable")
def test_round_off_does_not_break_ties(shared, monkeypatch):
    raw = iter([16.000000000000007, 15.999999999999993, 12.5, 16.0])
    monkeypatch.setattr(accuracy.baselines, "hscore", lambda features, labels: next(raw))
    target = accuracy.load_targets(accuracy.find_bench_dir(shared), ["t1"])[0][0]
    res = accuracy.run_baseline("hscore", target)
    assert res["scores"] == {"m0": 16.0, "m1": 16.0, "m2": 12.5, "m3": 16.0}
    assert "3 models tie at score 16" in res["notes"]


def test_diverged_runs_rank_last():
    r = accuracy.rankable({"a": 3.0, "b": math.nan, "c": 1.0, "d": math.nan})
    assert r["b"] == r["d"] < r["c"] < r["a"]
    assert accuracy.rankable({"a": math.nan}) is None


def test_readme_replacement_keeps_markers_and_outside(tmp_path):
    before = "# T\n\nintro <!-- x -->\n\n" + accuracy.BEGIN + "\nold\nstuff\n" + accuracy.END + "\n\n## After\n"
    readme = tmp_path / "README.md"
    readme.write_text(before)
    accuracy.update_readme(readme, "### New\n\n| a |\n")
    text = readme.read_text()
    head, rest = text.split(accuracy.BEGIN)
    inside, tail = rest.split(accuracy.END)
    assert head == before.split(accuracy.BEGIN)[0] and tail == before.split(accuracy.END)[1]
    assert inside == "\n### New\n\n| a |\n" and "old" not in text
    accuracy.update_readme(readme, "### New\n\n| a |\n")
    assert readme.read_text() == text                          # idempotent
    for bad in ("no markers", accuracy.END + accuracy.BEGIN, accuracy.BEGIN * 2 + accuracy.END):
        with pytest.raises(ValueError):
            accuracy.replace_region(bad, "x")


def test_cli_writes_outputs_and_readme(shared, tmp_path, capsys):
    out, readme = tmp_path / "out", tmp_path / "README.md"
    readme.write_text("a\n" + accuracy.BEGIN + "\n" + accuracy.END + "\nz\n")
    argv = ["--shared", str(shared), "--out", str(out), "--seeds", "0", "--methods", "logme,leep",
            "--targets", "t1", "--no-figures", "--readme", str(readme)] + \
           [f"--itm={k}={v}" for k, v in SMALL.items()]
    assert accuracy.main(argv) == 0
    printed = capsys.readouterr().out
    md = (out / "results.md").read_text()
    assert printed.strip() == md.strip()
    data = json.loads((out / "results.json").read_text())
    assert data["itm_options"] == SMALL and list(data["targets"]) == ["t1"]
    assert "--readme" not in data["command"] and "--targets t1" in data["command"]
    text = readme.read_text()
    assert text.startswith("a\n" + accuracy.BEGIN + "\n### Ranking accuracy") and text.endswith(accuracy.END + "\nz\n")
    readme.write_text("a\n" + accuracy.BEGIN + "\n" + accuracy.END + "\nz\n")
    assert accuracy.main(["--out", str(out), "--readme", str(readme), "--readme-only"]) == 0
    assert readme.read_text() == text


def test_figures_when_matplotlib_is_there(first, tmp_path):
    pytest.importorskip("matplotlib")
    results, arrays = copy.deepcopy(first[0]), first[1]
    accuracy.write_outputs(results, arrays, tmp_path)
    assert (tmp_path / "stability_t1.png").stat().st_size > 0
    assert (tmp_path / "trajectories_t2.png").stat().st_size > 0
    assert "](" in (tmp_path / "results.md").read_text()

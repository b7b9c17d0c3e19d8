"""Tests for bench/accuracy.py (the real-data accuracy harness) and bench/report.py on a tiny synthetic
shared/ folder.

The folder mimics te_bench: features/<target>.npz (float16 N×D per model + labels), groundtruth.json and
models.json. t1 is complete (5 models; m4 has no models.json entry); t2 is incomplete and lacks ground
truth for m3 and m4; t3 has no ground truth; t4 has ground truth for 2 models only (below MIN). ITM runs
are shortened (SMALL) and the minimum pool is 3 models, so the whole file takes seconds.
"""
import concurrent.futures as cf
import copy
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import accuracy  # noqa: E402
import itm  # noqa: E402
import report  # noqa: E402

SMALL = {"iterations": 40, "eval_every": 20, "batch_size": 32, "folds": 2}
SEEDS = (0, 1)
SETTINGS = accuracy.Settings(min_models=3, bootstrap=200)
METHODS = ["logme", "sfda", "etran", "hscore", "leep", "no_such_method"]
DIMS = [(8, 0.3), (16, 0.8), (24, 1.5), (12, 2.5), (20, 1.0)]
TRUTH = (0.6, 0.5, 0.8, 0.7, 0.65)
PARAMS = {"m0": 1e6, "m1": 3e6, "m2": 2e6, "m3": 5e5}


def _features(rng, y, K, D, sep):
    means = sep * rng.standard_normal((K, D))
    return np.maximum(means[y] + rng.standard_normal((len(y), D)), 0).astype(np.float16)


def make_shared(root):
    rng = np.random.default_rng(0)
    feats = root / "te_bench" / "features"
    feats.mkdir(parents=True)
    truth = {}
    for t, (N, K) in {"t1": (120, 3), "t2": (100, 4), "t3": (90, 3), "t4": (90, 3)}.items():
        y = rng.permutation(np.arange(N) % K)
        arrays = {f"m{i}": _features(rng, y, K, D, sep) for i, (D, sep) in enumerate(DIMS)}
        np.savez(feats / f"{t}.npz", labels=y.astype(np.int64), **arrays)
        truth[t] = dict(zip(arrays, TRUTH))
    del truth["t3"], truth["t2"]["m3"], truth["t2"]["m4"]
    truth["t2"]["m1"] = 0.9                           # t2 ranks differently from t1
    truth["t4"] = {"m0": 0.5, "m1": 0.7}
    gt = {"protocol": {}, "details": {"t1": {"complete": True},
                                      "t2": {"complete": False, "models_done": 3, "models_total": 5}}}
    (root / "te_bench" / "groundtruth.json").write_text(json.dumps({**gt, **truth}))
    facts = {"note": "test", "models": {m: {"params": p} for m, p in PARAMS.items()}}
    (root / "te_bench" / "models.json").write_text(json.dumps(facts))
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
    kw = {"seeds": SEEDS, "methods": METHODS, "itm_options": SMALL, "settings": SETTINGS, "quiet": True,
          **kw}
    return accuracy.run(bench, **kw)


def load(shared, name):
    targets, _, _ = accuracy.load_targets(accuracy.find_bench_dir(shared), [name], SETTINGS.min_models)
    return targets[0]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return make_shared(tmp_path_factory.mktemp("shared"))


@pytest.fixture(scope="module")
def first(shared):
    return run_small(shared)


def table_rows(md, header):
    lines = md.splitlines()
    i = lines.index(header)
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


# ------------------------------------------------------------------------------------------- targets

def test_targets_need_min_models_with_ground_truth(first):
    results, _ = first
    assert list(results["targets"]) == ["t1", "t2"]
    assert results["skipped_targets"]["t3"] == "no ground truth in groundtruth.json yet"
    assert "only 2 model(s)" in results["skipped_targets"]["t4"] and "needs 3" in results["skipped_targets"]["t4"]
    t2 = results["targets"]["t2"]
    assert t2["models"] == ["m0", "m1", "m2"] and "m3" not in t2["methods"]["itm"]["mean_score"]
    assert any("m3 has no ground truth" in n for n in t2["notes"])
    assert any("incomplete (3 of 5" in n for n in t2["notes"])
    md = report.render(results)
    assert "m4 has no ground truth yet, skipped" in md and "t3: not scored" in md and "t4: not scored" in md
    assert "at least 3 of them" in md


# --------------------------------------------------------------------------------------- row names

def test_table1_rows_say_which_variant(first):
    results, _ = first
    md = report.render(results)
    rows = table_rows(md, "| Method | t1 | t2 | Mean | Mean of t1 (complete truth) |")
    itm_name = accuracy.variant_name(itm.Config(**SMALL), "default")
    assert itm_name == results["labels"]["itm"]
    assert [r[0] for r in rows[:2]] == [f"{itm_name}, {len(SEEDS)} seeds: mean ± sd",
                                        f"{itm_name}: τ_w of the {len(SEEDS)}-seed mean score"]
    display = getattr(accuracy.baselines, "DISPLAY_NAMES", {}) or {}
    assert [r[0] for r in rows[2:-1]] == ([display.get(m, m) for m in METHODS] + list(accuracy.PRIORS.values()))
    assert rows[-1][0].startswith("Noise ceiling") and rows[-1][1].startswith("n/a (the number of test images")
    assert all(len(r) == 5 for r in rows)
    logme = results["targets"]["t1"]["methods"]["logme"]["metrics"]["tau_w"]   # t2's truth is incomplete
    assert results["complete_targets"] == ["t1"] and results["summary_complete"]["logme"]["mean"] == logme
    assert rows[METHODS.index("leep") + 2][1].startswith("n/a (needs source-model logits")
    assert results["targets"]["t1"]["methods"]["no_such_method"]["error"] == "not in baselines.py"
    assert "| Method | τ_w | Kendall τ | Spearman ρ | Rel@1 |" in md
    assert "| Method | t1 | t2 | Total |" in md          # the seconds table


def test_variant_names_are_built_from_the_config():
    cfg = itm.Config()
    split = "single 4/5 : 1/5 split" if cfg.folds == 1 else f"{cfg.folds}-fold cross-fit"
    assert accuracy.variant_name(cfg, "default") == f"ITM (default: {split}, {cfg.preprocess})"
    one = dataclasses.replace(cfg, folds=1, preprocess="none")
    assert accuracy.variant_name(one) == "ITM (single 4/5 : 1/5 split, none)"
    other = "B2" if cfg.c_scale == "B" else "B"
    three = dataclasses.replace(cfg, folds=3, c_scale=other, iterations=7)
    assert accuracy.variant_name(three) == f"ITM (3-fold cross-fit, {cfg.preprocess}; iterations=7, c_scale={other})"
    authors = accuracy.variant_name(itm.preset("authors"), "authors' reading, DESIGN.md §1b")
    assert authors.startswith("ITM (authors' reading, DESIGN.md §1b: single 4/5 : 1/5 split, standardize; ")


def test_labels_use_baselines_display_names(monkeypatch):
    monkeypatch.setattr(accuracy.baselines, "DISPLAY_NAMES", {"logme": "LogME (evidence)"}, raising=False)
    assert accuracy.label("logme") == "LogME (evidence)"
    assert accuracy.label("sfda") == "sfda"                        # no display name: the method key
    assert accuracy.label("prior_params") == accuracy.PRIORS["prior_params"]
    monkeypatch.setitem(accuracy.baselines.METHODS, "logme_published", accuracy.baselines.logme)
    names = accuracy.baseline_names()
    assert names[:2] == ["logme", "logme_published"]


# ---------------------------------------------------------------------------------------- the metrics

def test_metrics_and_summary(first):
    results, _ = first
    t1 = results["targets"]["t1"]["methods"]
    assert set(t1["logme"]["metrics"]) == set(accuracy.METRICS)
    assert len(t1["itm"]["runs"]) == len(SEEDS)
    assert results["summary"]["logme"]["mean"] == pytest.approx(
        np.mean([results["targets"][t]["methods"]["logme"]["metrics"]["tau_w"] for t in ("t1", "t2")]))
    assert "leep" not in results["summary"]


def test_noise_ceiling():
    """A perfect ranking against the truth re-drawn with its binomial noise: near 1 when the accuracies
    are far apart for their test set, lower when they crowd together; seeded; the test-set size is read
    from the protocol's split description."""
    spread = {f"m{i}": v for i, v in enumerate([0.5, 0.6, 0.7, 0.8, 0.9, 0.95])}
    crowded = {f"m{i}": v for i, v in enumerate([0.86, 0.865, 0.87, 0.875, 0.88, 0.885])}
    wide = accuracy.noise_ceiling(spread, 2000, draws=200)
    narrow = accuracy.noise_ceiling(crowded, 468, draws=200)
    assert wide["mean"] > 0.97 and narrow["mean"] < 0.8 and narrow["p5"] < narrow["mean"] < narrow["p95"]
    assert accuracy.noise_ceiling(crowded, 468, draws=200) == narrow
    assert accuracy.noise_ceiling(spread, None)["error"]
    assert accuracy._test_size("stratified random 40/class train (680), the other 40/class test (680), seed 0") == 680
    assert accuracy._test_size("1000 random of the 2428 train images as train, all 468 test images as test") == 468
    assert accuracy._test_size("no number here") is None


def test_bootstrap_interval():
    truth = {f"m{i}": v for i, v in enumerate([0.1, 0.5, 0.3, 0.9, 0.7, 0.2])}
    assert accuracy.bootstrap_tau_w([truth], truth, 100, 0) == pytest.approx([1.0, 1.0])  # perfect ranking
    rng = np.random.default_rng(1)
    noisy = {m: v + 0.3 * rng.standard_normal() for m, v in truth.items()}
    lo, hi = accuracy.bootstrap_tau_w([noisy], truth, 300, 0)
    assert -1 <= lo < hi <= 1
    assert accuracy.bootstrap_tau_w([noisy], truth, 300, 0) == [lo, hi]        # seeded
    assert accuracy.bootstrap_tau_w([noisy], truth, 300, 1) != [lo, hi]
    # ITM's per-seed interval: of the mean over seeds, on the same resamples
    two = accuracy.bootstrap_tau_w([noisy, truth], truth, 300, 0)
    assert lo < two[0] and hi <= two[1]


def test_intervals_in_the_tables(first):
    results, _ = first
    res = results["targets"]["t1"]["methods"]
    lo, hi = res["sfda"]["interval"]
    assert lo <= hi
    rows = table_rows(report.render(results), "| Method | t1 | t2 | Mean | Mean of t1 (complete truth) |")
    sfda = rows[2 + METHODS.index("sfda")]
    assert sfda[1] == f"{res['sfda']['metrics']['tau_w']:.3f} [{lo:.2f}, {hi:.2f}]"
    t = res["itm"]["metrics"]["tau_w"]
    assert rows[0][1] == (f"{t['mean']:.3f} ± {t['std']:.3f} "
                          f"[{res['itm']['interval'][0]:.2f}, {res['itm']['interval'][1]:.2f}]")
    md = report.render(results)
    assert f"B = {SETTINGS.bootstrap}, seed {SETTINGS.bootstrap_seed}" in md and "percentile 95 %" in md


# ------------------------------------------------------------------------------------------- priors

def test_static_priors(first):
    results, _ = first
    t1, t2 = results["targets"]["t1"]["methods"], results["targets"]["t2"]["methods"]
    assert t1["prior_params"]["scores"] == {**PARAMS, "m4": None}
    assert t1["prior_params"]["errors"] == {"m4": "no parameter count in models.json"}
    assert t1["prior_params"]["metrics"]["tau_w"] == pytest.approx(
        accuracy.rank_metrics(PARAMS, results["targets"]["t1"]["truth"])["tau_w"])
    assert t1["prior_dim"]["scores"] == {f"m{i}": float(D) for i, (D, _) in enumerate(DIMS)}
    # leave one target out, over the other targets whose truth is complete: only t1's (t2's is provisional,
    # t4 records no completeness), so t1 itself has no prior and t2's comes from t1
    t2_truth = {"m0": 0.6, "m1": 0.9, "m2": 0.8}
    assert accuracy._normalised_ranks(t2_truth) == {"m0": 1.0, "m1": 0.0, "m2": 0.5}
    assert t1["prior_loo"]["error"] and set(t1["prior_loo"]["scores"].values()) == {None}
    t1_ranks = accuracy._normalised_ranks(dict(zip([f"m{i}" for i in range(5)], TRUTH)))
    assert t1_ranks == {"m0": 0.75, "m1": 1.0, "m2": 0.0, "m3": 0.25, "m4": 0.5}
    assert t2["prior_loo"]["scores"] == {m: 1 - t1_ranks[m] for m in t2_truth}
    # with no completeness recorded anywhere, every other table counts
    tables = {"a": {"m0": 0.5, "m1": 0.7}, "b": {"m0": 0.9, "m1": 0.1}}
    target = accuracy.Target("a", {}, None, tables["a"], None, [])
    assert accuracy._loo_prior(target, tables)[0] == {"m0": 1.0, "m1": 0.0}
    md = report.render(results)
    assert "n/a (no parameter count in models.json)" in md              # m4's cell in t1's score table
    assert "τ_w etc. on the 4 of 5 models it scored" in md


def test_loo_prior_without_other_targets_is_na(shared):
    target = load(shared, "t1")
    res = accuracy.run_prior("prior_loo", target, None, {"t1": target.truth}, SETTINGS)
    assert res["error"] == "0 of 5 models scored, need 3; m0: no other target has ground truth"
    res = accuracy.run_prior("prior_params", target, None, {}, SETTINGS, "no model facts file (models.json)")
    assert res["error"].endswith("m0: no model facts file (models.json)")
    cell = report._cell(res, target.truth)
    assert cell.startswith("n/a (0 of 5 models scored")


# ---------------------------------------------------------------------------------------- bad input

def test_baseline_failing_on_one_model(shared, monkeypatch):
    real = accuracy.baselines.METHODS["logme"]

    def flaky(features, labels):
        if features.shape[1] == 16:
            raise RuntimeError("synthetic failure")
        return real(features, labels)
    monkeypatch.setitem(accuracy.baselines.METHODS, "logme", flaky)
    target = load(shared, "t1")
    res = accuracy.run_baseline("logme", target, SETTINGS)
    assert res["errors"] == {"m1": "RuntimeError: synthetic failure"} and res["scores"]["m1"] is None
    rest = {m: v for m, v in res["scores"].items() if v is not None}
    assert len(rest) == 4 and res["metrics"] == accuracy.rank_metrics(rest, target.truth)
    assert any("on the 4 of 5 models" in n and "m1 (RuntimeError: synthetic failure)" in n for n in res["notes"])
    monkeypatch.setitem(accuracy.baselines.METHODS, "logme",
                        lambda f, y: (_ for _ in ()).throw(RuntimeError("always")))
    res = accuracy.run_baseline("logme", target, SETTINGS)
    assert res["error"] == "0 of 5 models scored, need 3; m0: RuntimeError: always"
    monkeypatch.setitem(accuracy.baselines.METHODS, "logme", lambda f, y: math.inf if f.shape[1] == 8 else 1.0)
    assert accuracy.run_baseline("logme", target, SETTINGS)["errors"] == {"m0": "non-finite score inf"}


def test_itm_failing_on_one_model(shared, monkeypatch):
    real = itm.itm_score

    def flaky(features, labels, config=None, **kw):
        if features.shape[1] == 24:
            raise ValueError("synthetic bad model")
        return real(features, labels, config, **kw)
    monkeypatch.setattr(itm, "itm_score", flaky)
    target = load(shared, "t1")
    res = accuracy.run_itm(target, itm.Config(**SMALL), SEEDS, SETTINGS)
    assert res["error"] is None and res["errors"] == {"m2": "ValueError: synthetic bad model"}
    assert "m2" not in res["mean_score"] and res["scored"] == 4
    cell = report._itm_cells(res, list(target.truth))[0]
    assert cell.endswith("(4 of 5 models)")


def test_round_off_does_not_break_ties(shared, monkeypatch):
    raw = {8: 16.000000000000007, 16: 15.999999999999993, 24: 12.5, 12: 16.0, 20: 3.0}
    monkeypatch.setitem(accuracy.baselines.METHODS, "hscore", lambda features, labels: raw[features.shape[1]])
    res = accuracy.run_baseline("hscore", load(shared, "t1"), SETTINGS)
    assert res["scores"] == {"m0": 16.0, "m1": 16.0, "m2": 12.5, "m3": 16.0, "m4": 3.0}
    assert "3 models tie at score 16" in res["notes"]


def test_diverged_runs_rank_last():
    r = accuracy.rankable({"a": 3.0, "b": math.nan, "c": 1.0, "d": math.nan})
    assert r["b"] == r["d"] < r["c"] < r["a"]
    assert accuracy.rankable({"a": math.nan}) is None


# ----------------------------------------------------------------------------- determinism, executors

def test_deterministic(shared, first):
    again, _ = run_small(shared)
    assert numbers(again) == numbers(first[0])


def test_process_pool_gives_the_serial_results(shared, first):
    with accuracy.make_executor(jobs=2) as executor:
        assert isinstance(executor, cf.ProcessPoolExecutor)
        pooled, _ = run_small(shared, executor=executor)
    assert numbers(pooled) == numbers(first[0])
    order = [r["scores"] for r in pooled["targets"]["t1"]["methods"]["itm"]["runs"]]
    assert [list(s) for s in order] == [list(first[0]["targets"]["t1"]["models"])] * len(SEEDS)


def test_score_pool_keeps_task_order():
    tasks = [(pow, (b, 2)) for b in range(6)]
    seen = []
    with cf.ThreadPoolExecutor(3) as ex:
        assert accuracy.score_pool(tasks, ex, lambda i, n, r: seen.append((i, r))) == [0, 1, 4, 9, 16, 25]
    assert seen == [(i + 1, i * i) for i in range(6)]
    assert accuracy.score_pool(tasks) == [0, 1, 4, 9, 16, 25]


def test_dask_scheduler_gives_the_serial_results(shared, first):
    """Dask (the cluster extra, which `make test` installs) is required here, not optional: a missing
    install fails this test instead of skipping it."""
    with accuracy.make_executor(scheduler="local:2") as executor:
        target = load(shared, "t1")
        cfg = itm.Config(**SMALL)
        runs = accuracy.itm_runs(target, cfg, SEEDS, executor, quiet=True)
        base = accuracy.run_baseline("sfda", target, SETTINGS, executor)
    scores = [{m: r["score"] for m, r in run["results"].items()} for run in runs]
    assert scores == [r["scores"] for r in first[0]["targets"]["t1"]["methods"]["itm"]["runs"]]
    assert base["scores"] == first[0]["targets"]["t1"]["methods"]["sfda"]["scores"]


# ----------------------------------------------------------------------------------------- stability

def test_stability_all_subsets_and_sampled(first):
    results, arrays = first
    s = results["stability"]["t1"]
    assert (s["k"], s["subsets"], s["sampled"]) == (4, 5, False)      # min(10, M - 1) of 5 models
    # only methods that scored every model (m4 has no parameter count; the LOO prior lacks m3, m4)
    assert set(s["itm_beats"]["itm_seed0"]) == {"logme", "sfda", "etran", "hscore", "prior_dim"}
    scores = accuracy.stability_scores(results["targets"]["t1"])
    small = dataclasses.replace(SETTINGS, stability_k=3, max_subsets=1, subset_sample=3)
    sampled, tau = accuracy.run_stability(scores, results["targets"]["t1"]["truth"], small)
    assert sampled["sampled"] and sampled["subsets"] == 3 and len(tau["logme"]) == 3
    assert "all C(5, 4) = 5 subsets" in report.render(results)


# ------------------------------------------------------------------------------------------ ablation

@pytest.fixture(scope="module")
def ablated(shared):
    spec = accuracy.Ablation(seeds=(0, 1), folds=(1, 2), preprocess=("none", itm.Config().preprocess), readings=False)
    calls = []
    real = accuracy._itm_task

    def counting(cfg, feats, labels):
        calls.append((cfg, feats.shape))
        return real(cfg, feats, labels)
    accuracy._itm_task = counting
    try:
        out = run_small(shared, seeds=(0, 1, 2), methods=["sfda"], targets=["t1"], ablation=spec)
    finally:
        accuracy._itm_task = real
    return out[0], calls


def test_ablation_rows(ablated):
    results, calls = ablated
    rows = results["ablation"]["t1"]
    base = itm.Config(**SMALL)
    assert list(rows) == ["default", "preprocess=none", f"preprocess={base.preprocess}", "folds=1", "folds=2",
                          "preset=paper", "preset=authors"]
    assert rows[f"preprocess={base.preprocess}"] == {"group": "preprocess", "same_as": "default"}
    assert rows["folds=2"] == {"group": "folds", "same_as": "default"}
    # a preset keeps its own protocol (folds=1 here despite SMALL's folds=2); other options apply
    assert rows["preset=paper"]["name"] == ("ITM (paper: single 4/5 : 1/5 split, none; iterations=40, "
                                            "batch_size=32, eval_every=20, c_scale=B, score_by=head)")
    assert rows["preset=authors"]["name"].startswith("ITM (authors' reading, DESIGN.md §1b: ")
    assert rows["folds=1"]["changed"] == {"folds": 1}
    default = results["targets"]["t1"]["methods"]["itm"]
    assert rows["default"]["tau_w_per_seed"] == [r["metrics"]["tau_w"] for r in default["runs"][:2]]
    for row in rows.values():
        if "same_as" not in row:
            assert len(row["tau_w_per_seed"]) == 2 and row["runs"] == 10 and row["seconds_per_seed"] > 0
    # every (Config, seed) once: 3 default seeds, then 2 seeds of each of the 4 other Configs
    configs = {c for c, _ in calls}
    assert len(configs) == 3 + 4 * 2 and len(calls) == 5 * len(configs)


def test_ablation_table_and_reading(ablated):
    results, _ = ablated
    md = report.render(results)
    rows = table_rows(md, "| Variant | Varied | τ_w, 2 seeds (mean ± sd) | τ_w of the seed-mean score | "
                          "Diverged runs | Seconds per seed |")
    assert rows[0][0] == accuracy.variant_name(itm.Config(**SMALL), "default")
    assert f"same Config as preprocess={itm.Config().preprocess}, folds=2" in rows[0][1]
    assert [r[1] for r in rows[1:]][:2] == ["preprocess=none", "folds=1"]
    default = results["ablation"]["t1"]["default"]
    assert rows[0][2] == f"{default['tau_w_mean']:.3f} ± {default['tau_w_std']:.3f}"
    assert "- t1, ITM by preprocess (the rest as the default): none: " in md
    assert "- t1, ITM by folds (the rest as the default): 1: " in md and "- t1, presets: " in md


def test_ablation_without_an_option_is_na(monkeypatch):
    monkeypatch.delattr(itm, "preset")
    spec = accuracy.Ablation(seeds=(0,), folds=(1,), preprocess=("none",), readings=True)
    variants = accuracy.ablation_variants(itm.Config(**SMALL), spec)
    presets = [cfg for key, _, _, cfg in variants if key.startswith("preset=")]
    assert len(presets) == 2 and all(isinstance(c, str) and "preset" in c for c in presets)
    keys = [key for key, *_ in variants]
    assert "c_scale=B2" in keys or "c_scale=B" in keys
    assert f"shift={not itm.Config().shift}" in keys


def test_ablation_rows_follow_the_spec():
    """The rows DESIGN.md §1c's rule takes: the §1d evolution rows with the readings, none of the presets
    or readings when switched off (its stage B: only the folds)."""
    base = itm.Config(**SMALL)
    keys = [k for k, *_ in accuracy.ablation_variants(base, accuracy.Ablation(folds=(1, 2)))]
    other = ({"head", "centres"} - {base.score_by}).pop()
    assert {"c_scale=B/Z+score_by=centres", "n=0", f"score_by={other}", "preset=authors"} <= set(keys)
    only = accuracy.Ablation(folds=(1, 2), preprocess=(base.preprocess,), readings=False, presets=False)
    assert [k for k, *_ in accuracy.ablation_variants(base, only)] == [
        "default", f"preprocess={base.preprocess}", "folds=1", "folds=2"]


# ------------------------------------------------------------------------------------- README and CLI

def test_readme_replacement_keeps_markers_and_outside(tmp_path):
    before = "# T\n\nintro <!-- x -->\n\n" + report.BEGIN + "\nold\nstuff\n" + report.END + "\n\n## After\n"
    readme = tmp_path / "README.md"
    readme.write_text(before)
    report.update_region(readme, "### New τ\n\n| a |\n")
    text = readme.read_text(encoding="utf-8")
    head, rest = text.split(report.BEGIN)
    inside, tail = rest.split(report.END)
    assert head == before.split(report.BEGIN)[0] and tail == before.split(report.END)[1]
    assert inside == "\n### New τ\n\n| a |\n" and "old" not in text
    report.update_region(readme, "### New τ\n\n| a |\n")
    assert readme.read_text(encoding="utf-8") == text                          # idempotent
    for bad in ("no markers", report.END + report.BEGIN, report.BEGIN * 2 + report.END):
        with pytest.raises(ValueError):
            report.replace_region(bad, "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]        # no temporary left


def test_cli_writes_outputs_readme_and_docs(shared, tmp_path, capsys):
    out, readme, docs = tmp_path / "out", tmp_path / "README.md", tmp_path / "docs" / "results.md"
    readme.write_text("a\n" + report.TRUST_BEGIN + "\n" + report.TRUST_END + "\nz\n")
    docs.parent.mkdir()
    docs.write_text("b\n" + report.BEGIN + "\n" + report.END + "\ny\n")
    argv = ["--shared", str(shared), "--out", str(out), "--seeds", "1", "--methods", "logme,leep,prior_dim",
            "--targets", "t1", "--min-models", "3", "--bootstrap", "50",
            "--readme", str(readme), "--docs", str(docs)] + [f"--itm={k}={v}" for k, v in SMALL.items()]
    assert accuracy.main(argv) == 0
    printed = capsys.readouterr().out
    md = (out / "results.md").read_text(encoding="utf-8")
    assert printed.strip() == md.strip()
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert data["itm_options"] == SMALL and list(data["targets"]) == ["t1"]
    assert data["methods"] == ["logme", "leep"] and data["priors"] == ["prior_dim"]
    assert "--readme" not in data["command"] and "--docs" not in data["command"] and "--targets t1" in data["command"]
    text, page = readme.read_text(encoding="utf-8"), docs.read_text(encoding="utf-8")
    assert text.startswith("a\n" + report.TRUST_BEGIN + "\n| target | ITM default (1 seeds) | best other method |")
    assert text.endswith(report.TRUST_END + "\nz\n") and data["command"] in text
    assert page.startswith("b\n" + report.BEGIN + "\n### Where ITM ranks well") and page.endswith(report.END + "\ny\n")
    figures = [line for line in page.splitlines() if line.startswith("![")]
    assert figures and all("](../out/" in line for line in figures), figures   # links relative to docs/
    readme.write_text("a\n" + report.TRUST_BEGIN + "\n" + report.TRUST_END + "\nz\n")
    docs.write_text("b\n" + report.BEGIN + "\n" + report.END + "\ny\n")
    assert accuracy.main(["--out", str(out), "--readme", str(readme), "--docs", str(docs), "--readme-only"]) == 0
    assert readme.read_text(encoding="utf-8") == text and docs.read_text(encoding="utf-8") == page


@pytest.mark.parametrize("args, message", [
    (["--methods", "logme,nope"], "--methods: unknown method 'nope'"),
    (["--targets", "t9"], "--targets: no features/t9.npz"),
    (["--itm", "nope=1"], "--itm 'nope=1': expected KEY=VALUE"),
    (["--itm", "iterations=x"], "--itm iterations: expected int"),
    (["--itm", "shift=maybe"], "--itm shift: expected true or false"),
    (["--itm", "seed=3"], "--itm 'seed=3'"),
    (["--seeds", "0"], "--seeds: must be an integer ≥ 1"),
    (["--ablation-folds", "1,0"], "--ablation-folds: must be comma-separated integers ≥ 1"),
    (["--ablation-preprocess", "zscore"], "--ablation-preprocess: 'zscore' is not one of"),
    (["--jobs", "2", "--scheduler", "local:2"], "--scheduler and --jobs"),
    (["--readme", "MISSING.md"], "--readme MISSING.md"),
    (["--docs", "MISSING.md"], "--docs MISSING.md"),
    (["--models-json", "missing.json"], "--models-json: no file missing.json"),
])
def test_cli_rejects_bad_arguments_before_any_work(shared, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert accuracy.main(["--shared", str(shared), "--out", str(out)] + args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("bench/accuracy.py: error: ") and message in err
    assert not out.exists()


def test_help_points_inside_the_repo(capsys):
    assert accuracy.main(["--help"]) == 0
    text = capsys.readouterr().out + (accuracy.__doc__ or "") + (report.__doc__ or "")
    for outside in ("../shared", "SPEC", "BASELINES.md", "mid-edit"):
        assert outside not in text


def test_figures_when_matplotlib_is_there(first, tmp_path):
    pytest.importorskip("matplotlib")
    results, arrays = copy.deepcopy(first[0]), first[1]
    report.write_outputs(results, arrays, tmp_path)
    assert (tmp_path / "stability_t1.png").stat().st_size > 0
    assert (tmp_path / "trajectories_t2.png").stat().st_size > 0
    assert "](" in (tmp_path / "results.md").read_text(encoding="utf-8")

"""Tests for kendall.py: every metric written twice (ours vs scipy, the field's oracle), asserted equal.

The published fine-tuning tables in bench/data/finetune_acc_tables.json are verbatim copies of the distinct
tables the public TE codes ship (TencentARC/SFDA tw_group1/2, BUserName/NCTI tw_group2 with resisc/eurosat,
OpenGVLab/Multitask-Model-Selector ViT, prafful-kumar/enhancing_TE lbft/lft); tables that are identical
copies of these (ETran, PED, EMMS CNN, SA ft) are left out.
"""
import ast
import doctest
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats as st

import kendall

ROOT = Path(__file__).resolve().parents[1]
TABLES = json.loads((ROOT / "bench" / "data" / "finetune_acc_tables.json").read_text())
TOL = 1e-12


@pytest.fixture(params=["kernel", "numpy"])
def backend(request, monkeypatch):
    """Run a test through the numba kernels and through the pure NumPy fallback."""
    monkeypatch.setattr(kendall, "HAVE_NUMBA", request.param == "kernel")
    return request.param


def same(a, b, tol=TOL):
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


def sample(rng, n, ties):
    """A (scores, truth) pair; with ties, both have repeated values and some pairs tie jointly."""
    if not ties:
        return rng.standard_normal(n), rng.uniform(50, 95, n)
    levels = max(2, n // 3)
    x = rng.integers(0, levels, n).astype(float)
    y = np.round(x * 0.5 + rng.integers(0, levels, n) * 0.5)
    return x, y


OPTIONS = {  # scipy weightedtau keyword arguments exercised against the oracle
    "default": {},
    "rank=None": {"rank": None},
    "rank=False": {"rank": False},
    "additive=False": {"additive": False},
    "rank=None,additive=False": {"rank": None, "additive": False},
    "rank=False,additive=False": {"rank": False, "additive": False},
    "weigher=exp": {"weigher": lambda r: math.exp(-r / 3.0)},
    "weigher=sqrt,additive=False": {"weigher": lambda r: 1.0 / math.sqrt(r + 1), "additive": False},
    "weigher=1 (tau-b)": {"weigher": lambda r: 1.0},
}


# --- weighted tau against scipy ---------------------------------------------------------------------

@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("n", [2, 3, 4, 7, 11, 14, 31, 64, 200])
def test_weighted_tau_matches_scipy(backend, n, ties):
    rng = np.random.default_rng(1000 * n + ties)
    for trial in range(3):
        x, y = sample(rng, n, ties)
        for name, kw in OPTIONS.items():
            for a, b in ((x, y), (y, x)):  # both argument orders
                ours, ref = kendall.weighted_tau(a, b, **kw), st.weightedtau(a, b, **kw).statistic
                assert same(ours, ref), (n, ties, trial, name, ours, ref)


@pytest.mark.parametrize("n", [2, 5, 13, 60])
def test_weighted_tau_explicit_rank_array_matches_scipy(backend, n):
    """scipy from 1.16 on weighs an explicit rank array by its dense ranks (0, 1, ... in the order of
    its values), as kendall does; 1.15 (the last for Python 3.10) weighed the values themselves. scipy
    is given the dense ranks: the same numbers from either."""
    rng = np.random.default_rng(n)
    x, y = sample(rng, n, ties=True)
    for rank in (rng.permutation(n), rng.integers(0, 3 * n, n), np.zeros(n, dtype=int)):
        dense = st.rankdata(rank, method="dense").astype(int) - 1
        for kw in ({}, {"additive": False}, {"weigher": lambda r: 1.0 / (r + 2) ** 2}):
            ours = kendall.weighted_tau(x, y, rank=rank, **kw)
            assert same(ours, st.weightedtau(x, y, rank=dense, **kw).statistic), (rank, kw)


def test_weighted_tau_integer_and_mixed_dtypes_match_scipy(backend):
    rng = np.random.default_rng(7)
    xi, yi = rng.integers(0, 5, 30), rng.integers(0, 4, 30)
    for a, b in ((xi, yi), (xi, yi.astype(float) + 0.5), (xi.astype(np.float32), yi)):
        assert same(kendall.weighted_tau(a, b), st.weightedtau(a, b).statistic)


def test_weighted_tau_docstring_examples_of_scipy(backend):
    x, y = [12, 2, 1, 12, 2], [1, 4, 7, 1, 0]
    assert same(kendall.weighted_tau(x, y), -0.56694968153682723)
    assert same(kendall.weighted_tau(x, y, additive=False), -0.62205716951801038)
    assert same(kendall.weighted_tau(x, y, weigher=lambda r: 1), -0.47140452079103173)
    assert same(kendall.weighted_tau(x, y, rank=None), -0.4157652301037516)
    assert same(kendall.weighted_tau(y, x, rank=None), -0.7181341329699028)


def test_weighted_tau_degenerate_cases_match_scipy(backend):
    with np.errstate(all="ignore"):
        for x, y, kw in (([1, 1, 1], [1, 2, 3], {}), ([3, 1, 2], [5, 5, 5], {}),
                         ([3, 1, 2, 4], [1, 2, 3, 4], {"weigher": lambda r: 0.0}),
                         ([3, 1, 2, 4], [1, 2, 3, 4], {"weigher": lambda r: float(r < 1)})):
            ref = st.weightedtau(x, y, **kw).statistic
            assert same(kendall.weighted_tau(x, y, **kw), ref), (x, y, ref)


def test_weighted_tau_on_published_tables_matches_scipy(backend):
    """Realistic pools: last-block / linear-probe accuracy as the 'score' of full fine-tuning accuracy."""
    for probe, ft in (("sa_group1_lbft", "sfda_group1"), ("sa_group1_lft", "sfda_group1"),
                      ("sa_group2_lbft", "sfda_group2"), ("sa_group2_lft", "sfda_group2")):
        for ds, acc in TABLES[ft].items():
            models = list(acc)
            s, g = [TABLES[probe][ds][m] for m in models], [acc[m] for m in models]
            assert same(kendall.weighted_tau(s, g), st.weightedtau(s, g).statistic), (probe, ds)


def test_kernel_and_numpy_fallback_agree():
    rng = np.random.default_rng(3)
    for n, ties in itertools.product((2, 9, 150), (False, True)):
        x, y = sample(rng, n, ties)
        w = rng.uniform(0, 1, n)
        for additive in (True, False):
            a = kendall._wtau_core_nb(x, y, w, additive)
            b = kendall._wtau_core_np(x[None], y[None], w[None], additive)[0]
            assert same(a, b, 1e-13)
        assert np.array_equal(kendall._lexrank_nb(x, y), kendall._lexrank_np(x[None], y[None])[0])


# --- the published convention, the paper's formula, orientation --------------------------------------

def test_tau_w_of_truth_with_itself_is_one_on_every_published_table(backend):
    for name, table in TABLES.items():
        for ds, acc in table.items():
            g = [a for a in acc.values() if a != 0]  # 0 = missing run (NCTI resisc/eurosat)
            assert abs(kendall.weighted_tau(g, g) - 1.0) <= TOL, (name, ds)
            if len(set(g)) == len(g):  # the paper's formula counts tied pairs in the denominator
                assert abs(kendall.weighted_tau(g, g, variant="paper") - 1.0) <= TOL, (name, ds)


def test_paper_variant_hand_computed():
    # truth [3, 2, 1] -> G = [1, 2, 3]; scores [1, 3, 2] -> P = [3, 1, 2]
    # pairs (0,1): w 1/3, sign -1; (0,2): w 1/4, sign -1; (1,2): w 1/5, sign +1  ->  (-23/60) / (47/60)
    assert abs(kendall.weighted_tau([1, 3, 2], [3, 2, 1], variant="paper") - (-23 / 47)) <= TOL
    # ties in truth share the average rank: truth [3, 1, 1] -> G = [1, 2.5, 2.5]; scores [1, 2, 3]
    # (0,1): w 2/7, sign -1; (0,2): w 2/7, sign -1; (1,2): w 1/5, sign 0  ->  (-4/7) / (27/35) = -20/27
    assert abs(kendall.weighted_tau([1, 2, 3], [3, 1, 1], variant="paper") - (-20 / 27)) <= TOL


def test_paper_variant_rejects_field_options():
    with pytest.raises(ValueError, match="paper"):
        kendall.weighted_tau([1, 2, 3], [1, 2, 3], variant="paper", additive=False)
    with pytest.raises(ValueError, match="unknown variant"):
        kendall.weighted_tau([1, 2, 3], [1, 2, 3], variant="vigna")


def test_orientation_matters(backend):
    """tau_w(-s, g) is not -tau_w(s, g): scores must be 'higher is better'."""
    s, g = [0.9, 0.3, 0.1, 0.5], [85.0, 70.2, 79.9, 80.1]
    pos, neg = kendall.weighted_tau(s, g), kendall.weighted_tau(np.negative(s), g)
    assert same(pos, st.weightedtau(s, g).statistic) and same(neg, st.weightedtau(np.negative(s), g).statistic)
    assert abs(pos + neg) > 0.1  # 0.8133 vs -0.6667
    assert "higher is better" in kendall.weighted_tau.__doc__


# --- other metrics -----------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("n", [2, 3, 10, 57, 200])
def test_kendall_spearman_pearson_match_scipy(backend, n, ties):
    rng = np.random.default_rng(77 + n + ties)
    for _ in range(3):
        x, y = sample(rng, n, ties)
        assert same(kendall.kendall_tau(x, y), st.kendalltau(x, y).statistic)
        assert same(kendall.spearman_rho(x, y), st.spearmanr(x, y).statistic)
        assert same(kendall.pearson_r(x, y), st.pearsonr(x, y).statistic)


def test_correlations_of_constant_input_are_nan(backend):
    for fn in (kendall.kendall_tau, kendall.spearman_rho, kendall.pearson_r, kendall.weighted_tau):
        assert math.isnan(fn([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])), fn.__name__


def sfda_rel_k(score, gt, k):
    """TencentARC/SFDA rank_correlation.rel_k, restated on plain dicts."""
    sorted_score = sorted(score.items(), key=lambda i: i[1], reverse=True)
    topk = [a[0] for i, a in enumerate(sorted_score) if i < k]
    return max(gt[m] for m in topk) / max(gt.values())


def test_rel_k_and_top1_hit():
    assert kendall.rel_k([3, 2, 1], [80.0, 90.0, 85.0], 1) == 80.0 / 90.0
    assert kendall.rel_k([3, 2, 1], [80.0, 90.0, 85.0], 2) == 1.0
    assert kendall.rel_k([3, 2, 1], [80.0, 90.0, 85.0], 10) == 1.0  # k > n: the whole pool
    assert kendall.top1_hit([1, 5, 2], [70.0, 90.0, 80.0]) is True
    assert kendall.top1_hit([5, 1, 2], [70.0, 90.0, 80.0]) is False
    rng = np.random.default_rng(5)
    for n, ties, k in itertools.product((2, 7, 14, 120), (False, True), (1, 3, 5)):  # 120: ties need a stable sort
        x, y = sample(rng, n, ties)
        y = y + 1.0  # accuracies are positive
        names = [f"m{i}" for i in range(n)]
        ref = sfda_rel_k(dict(zip(names, x)), dict(zip(names, y)), k)
        assert kendall.rel_k(x, y, k) == ref
        assert kendall.top1_hit(x, y) == (sfda_rel_k(dict(zip(names, x)), dict(zip(names, y)), 1) == 1.0)


# --- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [kendall.weighted_tau, kendall.kendall_tau, kendall.spearman_rho,
                                kendall.pearson_r, kendall.top1_hit, lambda s, g: kendall.rel_k(s, g, 1)])
def test_bad_input_raises_value_error_naming_the_problem(fn):
    with pytest.raises(ValueError, match="length mismatch"):
        fn([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least 2 models"):
        fn([1.0], [2.0])
    with pytest.raises(ValueError, match="non-finite"):
        fn([1.0, np.nan, 3.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="truth has non-finite"):
        fn([1.0, 2.0, 3.0], [1.0, np.inf, 3.0])
    with pytest.raises(ValueError, match="1-D"):
        fn([[1.0, 2.0]], [[1.0, 2.0]])
    with pytest.raises(ValueError, match="numbers"):
        fn(["a", "b"], [1.0, 2.0])
    with pytest.raises(ValueError, match="not in truth.*'c'"):
        fn({"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 1.0, "b": 2.0, "d": 3.0})


def test_mappings_are_aligned_by_model_name(backend):
    s, g = {"a": 0.1, "b": 0.7, "c": 0.4}, {"c": 80.0, "a": 70.0, "b": 90.0}
    assert kendall.weighted_tau(s, g) == kendall.weighted_tau([0.1, 0.7, 0.4], [70.0, 90.0, 80.0]) == 1.0


def test_bad_k_and_rank():
    with pytest.raises(ValueError, match="k must be a positive integer"):
        kendall.rel_k([1, 2], [1, 2], 0)
    with pytest.raises(ValueError, match="rank has 2 entries"):
        kendall.weighted_tau([1, 2, 3], [1, 2, 3], rank=[0, 1])
    with pytest.raises(ValueError, match="positive best"):
        kendall.rel_k([1, 2], [0.0, 0.0], 1)


# --- evaluate: the layout of Table 1 -----------------------------------------------------------------

def probe_scores(probe, ft):
    """{dataset: {model: score}}: a probing accuracy table used as the scores of a fine-tuning table."""
    return {ds: {m: TABLES[probe][ds][m] for m in acc} for ds, acc in TABLES[ft].items()}


def test_evaluate_matches_per_dataset_scipy():
    scores, truth = probe_scores("sa_group1_lbft", "sfda_group1"), TABLES["sfda_group1"]
    res = kendall.evaluate(scores, truth, metrics="tau_w,tau,rho,pearson,rel1,rel3,top1")
    assert list(res["tau_w"]) == list(truth) + ["mean"]
    for ds in truth:
        s, g = list(scores[ds].values()), [truth[ds][m] for m in scores[ds]]
        assert same(res["tau_w"][ds], st.weightedtau(s, g).statistic)
        assert same(res["tau"][ds], st.kendalltau(s, g).statistic)
        assert same(res["rho"][ds], st.spearmanr(s, g).statistic)
        assert same(res["pearson"][ds], st.pearsonr(s, g).statistic)
        assert res["rel3"][ds] == sfda_rel_k(scores[ds], truth[ds], 3)
    for row in res.values():
        assert same(row["mean"], np.mean([v for k, v in row.items() if k != "mean"]))


def test_evaluate_drops_zero_truth_with_a_warning():
    truth = TABLES["ncti_group2"]
    scores = {ds: {m: (hash(m) % 97) / 97 for m in truth[ds]} for ds in ("eurosat", "cifar10")}
    with pytest.warns(UserWarning, match=r"eurosat: truth is 0 for \['simclr-v1', 'simclr-v2'\]"):
        res = kendall.evaluate(scores, truth)
    kept = {m: s for m, s in scores["eurosat"].items() if truth["eurosat"][m] != 0}
    assert res["tau_w"]["eurosat"] == kendall.weighted_tau(list(kept.values()), [truth["eurosat"][m] for m in kept])
    assert len(kept) == 10 and "cifar10" in res["tau_w"]


def test_evaluate_missing_models():
    truth = {"d": {"a": 80.0, "b": 85.0, "c": 90.0}}
    with pytest.raises(ValueError, match=r"d: models in scores but not in truth: \['x'\]"):
        kendall.evaluate({"d": {"a": 1.0, "b": 2.0, "x": 3.0}}, truth)
    with pytest.raises(ValueError, match=r"in truth but not in scores: \['c'\]"):
        kendall.evaluate({"d": {"a": 1.0, "b": 2.0}}, truth)
    with pytest.warns(UserWarning, match="dropped"):
        res = kendall.evaluate({"d": {"a": 1.0, "b": 2.0, "x": 3.0}}, truth, missing="drop")
    assert res["tau_w"]["d"] == 1.0
    with pytest.raises(ValueError, match="dataset 'e' is not in truth"):
        kendall.evaluate({"e": {"a": 1.0, "b": 2.0}}, truth)
    with pytest.raises(ValueError, match="unknown metric 'tau_x'"):
        kendall.evaluate({"d": {"a": 1.0, "b": 2.0, "c": 3.0}}, truth, metrics=["tau_x"])
    with pytest.raises(ValueError, match="d: need at least 2 models"):
        with pytest.warns(UserWarning):
            kendall.evaluate({"d": {"a": 1.0, "x": 3.0}}, truth, missing="drop")


# --- stability (Fig. 3) ------------------------------------------------------------------------------

def pool14(n_methods=3, seed=0):
    """11 supervised CNNs of sfda_group1 on cifar100 (with a tie) + 3 ViTs of emms_vit = 14 models."""
    truth = dict(TABLES["sfda_group1"]["cifar100"])
    truth.update({m: TABLES["emms_vit"]["cifar100"][m] for m in ("deit_small", "swin_t", "pvt_tiny")})
    rng = np.random.default_rng(seed)
    g = np.array(list(truth.values()))
    scores = {f"method{i}": dict(zip(truth, np.round(g + rng.normal(0, 2 + 2 * i, g.size), 1)))
              for i in range(n_methods)}
    return scores, truth


def test_stability_matches_scipy_on_every_subset(backend):
    scores, truth = pool14()
    res = kendall.stability(scores, truth, k=10)
    assert res["subsets"].shape == (1001, 10) and res["models"] == list(truth)
    g = np.array(list(truth.values()))
    for m, sc in scores.items():
        s = np.array([sc[mo] for mo in truth])
        ref = np.array([st.weightedtau(s[sub], g[sub]).statistic for sub in res["subsets"]])
        np.testing.assert_allclose(res["tau"][m], ref, rtol=0, atol=TOL)
        assert same(res["summary"]["mean"][m], ref.mean()) and same(res["summary"]["std"][m], ref.std())
    a, b = "method0", "method2"
    assert res["summary"]["beats"][a][b] == np.mean(res["tau"][a] > res["tau"][b])
    assert res["summary"]["beats"][a][b] + res["summary"]["beats"][b][a] <= 1.0


def test_stability_options_and_array_input_match_scipy(backend):
    rng = np.random.default_rng(11)
    g = np.round(rng.uniform(60, 90, 8))  # ties
    scores = {"a": rng.standard_normal(8), "b": np.round(rng.standard_normal(8))}
    weigher = lambda r: 1.0 / (r + 1) ** 2  # noqa: E731
    res = kendall.stability(scores, g, k=5, weigher=weigher, additive=False)
    assert res["subsets"].shape == (math.comb(8, 5), 5)
    for m, s in scores.items():
        ref = [st.weightedtau(s[sub], g[sub], weigher=weigher, additive=False).statistic for sub in res["subsets"]]
        np.testing.assert_allclose(res["tau"][m], ref, rtol=0, atol=TOL)


def test_stability_kernel_and_numpy_agree():
    scores, truth = pool14(n_methods=4, seed=3)
    S = np.array([list(s.values()) for s in scores.values()])
    g = np.array(list(truth.values()))
    subsets = np.array(list(itertools.combinations(range(14), 10)))
    table = kendall._weight_table(None, 10)
    for additive in (True, False):
        a = kendall._stability_nb(S, g, subsets, table, additive)
        b = kendall._stability_np(S, g, subsets, table, additive)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-13)


def test_stability_bad_input():
    scores, truth = pool14()
    with pytest.raises(ValueError, match=r"k must be an integer in \[2, 14\]"):
        kendall.stability(scores, truth, k=15)
    with pytest.raises(ValueError, match="exceeds max_subsets"):
        kendall.stability(scores, truth, k=7, max_subsets=1000)
    broken = {**scores, "method9": {m: 1.0 for m in list(truth)[:-1]}}
    with pytest.raises(ValueError, match=r"method 'method9': .*in truth but not in scores: \['pvt_tiny'\]"):
        kendall.stability(broken, truth, k=10)
    with pytest.warns(UserWarning, match="dropped"):
        res = kendall.stability(broken, truth, k=10, missing="drop")
    assert len(res["models"]) == 13 and res["subsets"].shape == (math.comb(13, 10), 10)
    with pytest.raises(ValueError, match="length mismatch"):
        kendall.stability({"a": [1.0, 2.0, 3.0]}, [1.0, 2.0], k=2)


# --- CLI ---------------------------------------------------------------------------------------------

def write(tmp_path, name, obj):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def test_cli_table_and_json(tmp_path, capsys):
    scores = probe_scores("sa_group2_lbft", "sfda_group2")
    sp, tp = write(tmp_path, "s.json", scores), write(tmp_path, "t.json", TABLES)
    assert kendall.main(["--scores", sp, "--truth", tp, "--table", "sfda_group2",
                         "--metric", "tau_w,rho,rel1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == kendall.evaluate(scores, TABLES["sfda_group2"], metrics=["tau_w", "rho", "rel1"])
    assert kendall.main(["--scores", sp, "--truth", tp, "--table", "sfda_group2"]) == 0
    text = capsys.readouterr().out
    assert "tau_w" in text and "aircraft" in text and "mean" in text
    assert f"{out['tau_w']['mean']:.4f}" in text


def test_cli_several_methods_and_stability(tmp_path, capsys):
    scores, truth = pool14()
    by_method = {m: {"cifar100": s} for m, s in scores.items()}
    sp, tp = write(tmp_path, "s.json", by_method), write(tmp_path, "t.json", {"cifar100": truth})
    assert kendall.main(["--scores", sp, "--truth", tp, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == set(scores) and "cifar100" in out["method1"]["tau_w"]
    assert kendall.main(["--scores", sp, "--truth", tp, "--stability", "10", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["cifar100"]
    ref = kendall.stability(scores, truth, 10)["summary"]
    assert out["n_subsets"] == 1001 and out["mean"] == ref["mean"] and out["beats"] == ref["beats"]
    assert kendall.main(["--scores", sp, "--truth", tp, "--stability", "10"]) == 0
    assert "1001 subsets" in capsys.readouterr().out


@pytest.mark.parametrize("case, message", [
    ("missing_file", "scores file not found"),
    ("bad_json", "not valid JSON"),
    ("unknown_model", "models in scores but not in truth: ['zzz']"),
    ("no_table", "choose one with --table"),
    ("bad_metric", "unknown metric"),
    ("bad_flag", "unrecognized arguments"),
])
def test_cli_errors_are_one_line_exit_1(tmp_path, capsys, case, message):
    truth = {"d": {"a": 80.0, "b": 90.0}}
    tp = write(tmp_path, "t.json", truth)
    sp = write(tmp_path, "s.json", {"d": {"a": 1.0, "b": 2.0}})
    args = {"missing_file": ["--scores", str(tmp_path / "nope.json"), "--truth", tp],
            "bad_json": ["--scores", write(tmp_path, "bad.json", "{oops"), "--truth", tp],
            "unknown_model": ["--scores", write(tmp_path, "u.json", {"d": {"a": 1.0, "b": 2.0, "zzz": 3.0}}),
                              "--truth", tp],
            "no_table": ["--scores", sp, "--truth", write(tmp_path, "m.json", TABLES)],
            "bad_metric": ["--scores", sp, "--truth", tp, "--metric", "tau_w,foo"],
            "bad_flag": ["--scores", sp, "--truth", tp, "--frobnicate"]}[case]
    assert kendall.main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kendall.py: error:") and message in err


def test_cli_subprocess_never_prints_a_traceback(tmp_path):
    tp = write(tmp_path, "t.json", {"d": {"a": 80.0, "b": 90.0}})
    sp = write(tmp_path, "s.json", {"d": {"a": 1.0, "b": float("nan")}})
    proc = subprocess.run([sys.executable, str(ROOT / "kendall.py"), "--scores", sp, "--truth", tp],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "kendall.py: error: d: scores has non-finite values (nan at index 1)"


def test_cli_notes_dropped_models_on_stderr(tmp_path, capsys):
    truth = TABLES["ncti_group2"]
    scores = {"resisc": {m: float(i) for i, m in enumerate(truth["resisc"])}}
    sp, tp = write(tmp_path, "s.json", scores), write(tmp_path, "t.json", {"resisc": truth["resisc"]})
    assert kendall.main(["--scores", sp, "--truth", tp]) == 0
    captured = capsys.readouterr()
    assert "kendall.py: note: resisc: truth is 0 for ['simclr-v1', 'simclr-v2']" in captured.err
    assert "resisc" in captured.out


# --- CLI: the common scores shape, several files, ground-truth files, undefined metrics ------------------

ACC = {"a": 0.91, "b": 0.84, "c": 0.77, "d": 0.62, "e": 0.55}


def common(dataset, scores, **extras):
    """The shape itm.py --json and baselines.py --json print."""
    return {"dataset": dataset, "scores": scores, **extras}


def run(argv, capsys):
    code = kendall.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_common_shape_several_files_and_nulls(tmp_path, capsys):
    itm_scores = {"a": 70.0, "b": 72.0, "c": 60.0, "d": None, "e": 41.0}
    base_scores = {"logme": {"a": -0.2, "b": -0.3, "c": -0.5, "d": -0.4, "e": -0.9},
                   "sfda": {"a": 1.0, "b": None, "c": None, "d": 0.2, "e": 0.1}}
    s1 = write(tmp_path, "itm.json", common("toy", {"ITM": itm_scores}, ranking=[]))
    s2 = write(tmp_path, "base.json", common("toy", base_scores, methods=["logme", "sfda"], errors={}))
    tp = write(tmp_path, "gt.json", {"protocol": {"splits": 3}, "toy": ACC, "other": {"a": 1.0, "z": 2.0}})
    for argv in (["--scores", s1, "--scores", s2], ["--scores", f"{s1},{s2}"]):
        code, out, err = run([*argv, "--truth", tp, "--json"], capsys)
        assert code == 0, err
        res = json.loads(out)
        assert list(res) == ["ITM", "logme", "sfda"]
        for method, sc in {"ITM": itm_scores, **base_scores}.items():
            kept = {m: v for m, v in sc.items() if v is not None}
            assert same(res[method]["tau_w"]["toy"], st.weightedtau(list(kept.values()),
                                                                   [ACC[m] for m in kept]).statistic)
        assert "kendall.py: note: ITM: toy: no score (null) for d: dropped" in err
        assert "kendall.py: note: sfda: toy: no score (null) for b, c: dropped" in err
        assert "logme" not in err
    code, out, _ = run(["--scores", f"{s1},{s2}", "--truth", tp], capsys)
    assert code == 0 and out.splitlines()[0].split() == ["tau_w", "toy", "mean"]
    assert [line.split()[0] for line in out.splitlines()[1:4]] == ["ITM", "logme", "sfda"]


def test_cli_truth_table_choice(tmp_path, capsys):
    sc = {"a": 5.0, "b": 4.0, "c": 1.0, "d": 2.0, "e": 3.0}
    rev = {m: -v for m, v in ACC.items()}
    gt = write(tmp_path, "gt.json", {"details": {"toy": {"epochs": 10}}, "toy": ACC, "rev": rev})
    flat = write(tmp_path, "flat.json", ACC)
    one = write(tmp_path, "one.json", {"protocol": "x", "toy": ACC})
    ref, ref_rev = kendall.weighted_tau(sc, ACC), kendall.weighted_tau(sc, rev)
    named = write(tmp_path, "n.json", common("toy", {"M": sc}))
    unnamed = write(tmp_path, "u.json", common(None, {"M": sc}))
    other = write(tmp_path, "o.json", common("zoo", {"M": sc}))

    def tau(argv):
        code, out, err = run([*argv, "--json"], capsys)
        assert code == 0, err
        (col, value), = ((c, v) for c, v in json.loads(out)["M"]["tau_w"].items() if c != "mean")
        return col, value, err
    assert tau(["--scores", named, "--truth", gt])[:2] == ("toy", ref)                 # the dataset names it
    assert tau(["--scores", named, "--truth", gt, "--target", "rev"])[:2] == ("rev", ref_rev)
    assert tau(["--scores", named, "--truth", flat])[:2] == ("toy", ref)               # a flat truth
    assert tau(["--scores", unnamed, "--truth", flat])[:2] == ("flat", ref)            # ... named by its file
    assert tau(["--scores", unnamed, "--truth", one])[:2] == ("one", ref)              # the only table
    col, value, err = tau(["--scores", other, "--truth", one])                          # no table 'zoo': the only one
    assert (col, value) == ("zoo", ref) and "has no table 'zoo': its only table is used" in err
    for argv, message in ((["--scores", unnamed, "--truth", gt], "holds 2 tables (toy, rev)"),
                          (["--scores", other, "--truth", gt], "has no table 'zoo' (tables: toy, rev)"),
                          (["--scores", named, "--truth", gt, "--target", "nope"], "no table 'nope'")):
        code, out, err = run(argv, capsys)
        assert code == 1 and out == "" and err.count("\n") == 1 and message in err, err


@pytest.fixture
def bench_groundtruth():
    """The benchmark's ground-truth file cut to flowers17's details (tests/data/README.md);
    bench/test_full_benchmark.py runs the test below on the whole file."""
    return ROOT / "tests" / "data" / "groundtruth.json"


def test_cli_reads_the_bench_ground_truth(tmp_path, capsys, bench_groundtruth):
    # the benchmark's groundtruth.json has metadata entries besides its several tables
    path = bench_groundtruth
    doc = json.loads(path.read_text())
    tables = [k for k, v in doc.items() if isinstance(v, dict) and all(type(a) is float for a in v.values())]
    assert "flowers17" in tables and len(tables) > 1 and len(doc) > len(tables), list(doc)
    acc = doc["flowers17"]
    sp = write(tmp_path, "s.json", common("flowers17", {"truth_itself": acc,
                                                        "reversed": {m: -a for m, a in acc.items()}}))
    code, out, err = run(["--scores", sp, "--truth", str(path), "--json", "--metric", "tau_w,rel1"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["truth_itself"]["tau_w"]["flowers17"] == 1.0 and res["truth_itself"]["rel1"]["flowers17"] == 1.0
    assert same(res["reversed"]["tau_w"]["flowers17"], st.weightedtau([-a for a in acc.values()],
                                                                      list(acc.values())).statistic)


def test_cli_legacy_shapes_mix_with_the_common_one(tmp_path, capsys):
    truth = {"d1": ACC, "d2": {"a": 1.0, "b": 3.0, "c": 2.0}}
    tp = write(tmp_path, "t.json", truth)
    legacy1 = write(tmp_path, "probe.json", {"d1": {m: a + 0.01 for m, a in ACC.items()},
                                             "d2": {"a": 1, "b": 2, "c": 3}})
    legacy3 = write(tmp_path, "l3.json", {"X": {"d2": {"a": 3.0, "b": 2.0, "c": 1.0}}})
    new = write(tmp_path, "new.json", common("d1", {"X": {m: -a for m, a in ACC.items()}}))
    code, out, err = run(["--scores", f"{legacy1},{legacy3},{new}", "--truth", tp, "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert list(res) == ["probe", "X"] and res["probe"]["tau_w"]["d1"] == 1.0
    assert list(res["X"]["tau_w"]) == ["d2", "d1", "mean"]
    assert res["X"]["tau_w"]["mean"] == np.mean([kendall.weighted_tau([3, 2, 1], [1, 3, 2]), -1.0])
    code, out, err = run(["--scores", f"{new},{new}", "--truth", tp], capsys)
    assert code == 1 and "method 'X' has scores for 'd1' in" in err and err.count("\n") == 1


def test_cli_all_tied_scores_or_truth_are_na_with_a_note(tmp_path, capsys):
    tied = {"ITM": {m: 50.0 for m in ACC}, "logme": {"a": 3.0, "b": 2.0, "c": 1.0, "d": 0.0, "e": -1.0}}
    sp = write(tmp_path, "s.json", common("toy", tied))
    tp = write(tmp_path, "t.json", {"toy": ACC})
    code, out, err = run(["--scores", sp, "--truth", tp, "--metric", "tau_w,rho,rel1"], capsys)
    assert code == 0, err
    assert "kendall.py: note: ITM: toy: all scores tied: tau_w, rho undefined" in err
    assert "logme" not in err
    blocks = [block.splitlines() for block in out.strip().split("\n\n")]  # one per metric: tau_w, rho, rel1
    assert [block[0].split() for block in blocks] == [[metric, "toy", "mean"] for metric in ("tau_w", "rho", "rel1")]
    assert [line.split() for line in blocks[0][1:]] == [["ITM", "n/a", "n/a"], ["logme", "1.0000", "1.0000"]]
    assert blocks[1][1].split() == ["ITM", "n/a", "n/a"] and blocks[2][1].split()[0:2] == ["ITM", "1.0000"]
    code, out, err = run(["--scores", sp, "--truth", tp, "--json"], capsys)
    res = json.loads(out)  # strict JSON: undefined is null, not NaN
    assert code == 0 and res["ITM"]["tau_w"] == {"toy": None, "mean": None} and res["logme"]["tau_w"]["toy"] == 1.0
    flat_truth = write(tmp_path, "ft.json", {"toy": {m: 0.5 for m in ACC}})
    code, out, err = run(["--scores", sp, "--truth", flat_truth, "--json"], capsys)
    assert code == 0 and json.loads(out)["logme"]["tau_w"]["toy"] is None
    assert "kendall.py: note: logme: toy: all truth values tied: tau_w undefined" in err
    assert "ITM: toy: all scores and truth values tied" in err


def test_cli_stability_with_common_shape_nulls_and_ties(tmp_path, capsys):
    scores, truth = pool14()
    scores["method1"] = {**scores["method1"], "swin_t": None}
    sp, tp = write(tmp_path, "s.json", common("cifar100", scores)), write(tmp_path, "t.json", {"cifar100": truth})
    code, out, err = run(["--scores", sp, "--truth", tp, "--stability", "10", "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)["cifar100"]
    ref = kendall.stability({m: {k: v for k, v in s.items() if k != "swin_t"} for m, s in scores.items()},
                            {k: v for k, v in truth.items() if k != "swin_t"}, 10)
    assert res["n_subsets"] == math.comb(13, 10) and res["mean"] == ref["summary"]["mean"]
    assert "method1: cifar100: no score (null) for swin_t: dropped" in err


@pytest.mark.parametrize("argv, message", [
    (["--metric", "tau_w,foo"], "--metric: unknown metric 'foo'"),
    (["--stability", "1"], "--stability: K must be >= 2"),
    (["--stability", "5", "--metric", "rho"], "--metric does not apply to --stability"),
    (["--scores", "a.json,"], "--scores: empty file name in 'a.json,'"),
])
def test_cli_arguments_are_checked_before_files_are_read(tmp_path, capsys, argv, message):
    missing = str(tmp_path / "nope.json")
    code, out, err = run(["--scores", missing, "--truth", missing, *argv], capsys)
    assert code == 1 and out == "" and err.count("\n") == 1 and message in err and "nope" not in err, err


def test_cli_target_must_not_merge_datasets(tmp_path, capsys):
    sp = write(tmp_path, "s.json", {"d1": {"a": 1.0, "b": 2.0}, "d2": {"a": 1.0, "b": 2.0}})
    tp = write(tmp_path, "t.json", {"d1": {"a": 1.0, "b": 2.0}, "d2": {"a": 2.0, "b": 1.0}})
    code, _, err = run(["--scores", sp, "--truth", tp, "--target", "d1"], capsys)
    assert code == 1 and "--target 'd1' picks one truth table, but the scores cover datasets d1, d2" in err


@pytest.mark.parametrize("case, message", [
    ("bad_dataset", '"dataset" must be a name or null'),
    ("bad_scores", '"scores" must be {method: {model: score or null}}'),
    ("flat", "expected {\"dataset\": NAME"),
    ("bad_group", "--table 'nope'"),
])
def test_cli_bad_shapes_are_one_line(tmp_path, capsys, case, message):
    tp = write(tmp_path, "t.json", {"d": ACC})
    sp = write(tmp_path, "s.json", {"bad_dataset": common(3, {"M": ACC}), "bad_scores": common("d", ACC),
                                    "flat": ACC, "bad_group": {"d": ACC}}[case])
    code, out, err = run(["--scores", sp, "--truth", tp] + (["--table", "nope"] if case == "bad_group" else []),
                         capsys)
    assert code == 1 and out == "" and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("buffered", [True, False])
def test_cli_closed_stdout_ends_quietly(tmp_path, buffered):
    """`kendall.py ... | head -1`: the reader leaves before the table is written; no BrokenPipeError."""
    scores = {f"method{i}": {m: float((i * 7 + j * 3) % 11) for j, m in enumerate(ACC)} for i in range(200)}
    sp, tp = write(tmp_path, "s.json", common("toy", scores)), write(tmp_path, "t.json", ACC)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    read_end, write_end = os.pipe()
    proc = subprocess.Popen([sys.executable, str(ROOT / "kendall.py"), "--scores", sp, "--truth", tp],
                            stdout=write_end, stderr=subprocess.PIPE, text=True, env=env)
    os.close(write_end)
    os.close(read_end)  # closed before the child can have written: every write of it fails
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 0 and "BrokenPipe" not in err and "Traceback" not in err, err


# --- module hygiene ----------------------------------------------------------------------------------

def test_docstring_examples():
    assert doctest.testmod(kendall).failed == 0


def test_no_scipy_import_no_compile_at_import_and_env_switch():
    tree = ast.parse((ROOT / "kendall.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(m.split(".")[0] == "scipy" for m in imported), imported  # scipy is a test-only oracle
    code = ("import sys, kendall; assert kendall.HAVE_NUMBA or 'scipy' not in sys.modules; "
            "print(kendall.HAVE_NUMBA, kendall.HAVE_NUMBA and len(kendall._wtau_core_nb.signatures))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[1] in ("0", "False")  # nothing compiled by importing
    env["ITM_NO_NUMBA"] = "1"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.split() == ["False", "False"], out.stderr

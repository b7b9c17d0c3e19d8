"""The scoring protocol: scale invariance of the default, the paper reading's parity with the code before
cross-fitting, every sample scored once, bad input named, and the uncertainty the CLI shows.

Small synthetic data (N=160, D=24, K=4, 40 iterations, B=32): a default run (5 folds) takes ~0.1 s.
"""
import contextlib
import io
import json
import math
import sys
import warnings

import numpy as np
import pytest

import itm

N, D, K = 160, 24, 4
KW = dict(iterations=40, batch_size=32, eval_every=10)


def blobs(seed, sep=0.6, n=N, dtype=np.float32):
    """K Gaussian blobs, balanced labels 0..K−1 in round-robin order; deterministic per seed."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % K
    centres = rng.standard_normal((K, D))
    return (sep * centres[y] + rng.standard_normal((n, D))).astype(dtype), y


@contextlib.contextmanager
def strict_floats():
    """Any overflow / underflow / invalid operation, or any warning, is an error."""
    with np.errstate(all="raise"), warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def cli(*argv):
    """itm.main(argv) → (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = itm.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def cli_args(path, *extra):
    return ["--features", path, "--iterations", 40, "--batch-size", 32, "--eval-every", 10, *extra]


def one_line_error(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ----------------------------------------------------------------------------------------------------
# 1. Scale invariance of the default config (preprocess="standardize", folds=5).

@pytest.fixture
def serial(monkeypatch):
    # folds on one thread: np.errstate is per thread (a context variable), so strict_floats() then
    # covers every fold's arithmetic, not only the main thread's
    monkeypatch.setattr(itm, "cores", lambda: 1)


POW2 = {np.float64: (-40, -3, 5, 60), np.float32: (-40, -3, 5, 60),
        np.float16: (-3, 5, 10)}   # float16: max 65504, normal ≥ 6.1e-5; 2**±40 leaves that range


@pytest.mark.parametrize("dtype", list(POW2), ids=lambda t: t.__name__)
def test_power_of_two_factor_gives_bit_identical_scores(dtype, serial):
    X, y = blobs(0, dtype=np.float64)
    if dtype == np.float16:                             # keep 2**-3 · |x| normal: |x| ≥ 2**-8
        X = np.where(np.abs(X) < 2.0 ** -8, np.copysign(2.0 ** -8, X), X)
    X = X.astype(dtype)
    base = itm.itm_score(X, y, **KW)
    for k in POW2[dtype]:
        with strict_floats():
            Xs = X * dtype(2.0 ** k)                    # raises if any entry under/overflows
            assert np.array_equal(Xs / dtype(2.0 ** k), X), "the scaling itself must be exact"
            r = itm.itm_score(Xs, y, **KW)
        assert r.score == base.score, (dtype, k)
        assert r.fold_scores == base.fold_scores, (dtype, k)
        assert r.trajectory == base.trajectory, (dtype, k)
        assert r.fold_n == base.fold_n, (dtype, k)


def test_preprocessing_moves_by_exactly_the_power_of_two():
    X, _ = blobs(1, dtype=np.float64)
    base = itm.fit_preprocessing(X, "standardize")
    for k in (-40, 7, 60):
        prep = itm.fit_preprocessing(X * 2.0 ** k, "standardize")
        assert np.array_equal(prep.c, base.c * 2.0 ** k)
        assert np.array_equal(prep.s, base.s * 2.0 ** -k)


# Measured on this implementation: max |Δscore| and max |Δfold score| over seeds 0–7, float64/float32/
# float16 features, factors 1e-4, 10, 1e4, 1e30, 1e-30, 3.7 (and 1e±200 for float64) = 0.0 exactly.
# The smallest non-zero difference one changed prediction can make is 100/N = 0.625 (3.125 for a
# fold), so this bound asserts that no prediction changed.
SCALE_TOL = 1e-9
FACTORS = (1e-4, 10.0, 1e4, 1e30, 1e-30)


def _representable(X, dtype):
    """X as dtype with no overflow to Inf and no underflow to subnormals (or zero)."""
    Xd = X.astype(dtype)
    info = np.finfo(dtype)
    nonzero = np.abs(Xd[X != 0])
    return bool(np.all(np.isfinite(Xd)) and nonzero.min() >= info.tiny and np.all(Xd[X != 0] != 0))


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda t: t.__name__)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decimal_factor_changes_no_prediction(dtype, seed, serial):
    X, y = blobs(seed, dtype=np.float64)
    base = itm.itm_score(X.astype(dtype), y, **KW)
    for f in FACTORS:
        Xs = X * f
        assert _representable(Xs, dtype), (dtype, f)   # all five fit float32's normal range here
        with strict_floats():
            r = itm.itm_score(Xs.astype(dtype), y, **KW)
        assert abs(r.score - base.score) <= SCALE_TOL, (dtype, f, r.score, base.score)
        assert np.max(np.abs(np.subtract(r.fold_scores, base.fold_scores))) <= SCALE_TOL, (dtype, f)


@pytest.mark.parametrize("factor", [1e200, 1e-200])
def test_float64_times_1e200_scores_like_unscaled(factor, serial):
    X, y = blobs(3, dtype=np.float64)
    base = itm.itm_score(X, y, **KW)
    with strict_floats():                               # no overflow, no LinAlgError
        r = itm.itm_score(X * factor, y, **KW)
    assert math.isfinite(r.score) and not r.diverged
    assert abs(r.score - base.score) <= SCALE_TOL


# ----------------------------------------------------------------------------------------------------
# 2. folds=1 + preprocess="none" (preset "paper") is the code before cross-fitting.
#
# GOLDEN values computed with commit fc29bea's itm.py (`git show fc29bea:itm.py`, imported under another
# module name) as  old.itm_score(X, y, iterations=40, batch_size=32, eval_every=10[, seed=3])  — the same
# itm_score(features, labels, config=None, **overrides) signature as now — on blobs(data_seed, dtype=...).
# losses: Result.losses[0], [-1] and float(np.sum(Result.losses)).

GOLDEN = [
    dict(data_seed=0, dtype=np.float32, overrides={}, score=43.75, n=168,
         trajectory=[(10, 31.25), (20, 34.375), (30, 43.75), (40, 43.75)],
         loss_first=1.5097118144598596, loss_last=1.1988052945973926, loss_sum=53.07080308292629),
    dict(data_seed=1, dtype=np.float64, overrides={}, score=53.125, n=168,
         trajectory=[(10, 37.5), (20, 46.875), (30, 50.0), (40, 53.125)],
         loss_first=1.3744734212985696, loss_last=1.102492332211396, loss_sum=49.636548783447),
    dict(data_seed=2, dtype=np.float32, overrides=dict(seed=3), score=65.625, n=169,
         trajectory=[(10, 31.25), (20, 43.75), (30, 59.375), (40, 65.625)],
         loss_first=1.3748849771018532, loss_last=1.0526172636018756, loss_sum=48.15419325951935),
]


@pytest.mark.parametrize("golden", GOLDEN, ids=lambda g: f"data{g['data_seed']}")
@pytest.mark.parametrize("reading", ["preset", "config"])
def test_paper_reading_reproduces_fc29bea(golden, reading):
    X, y = blobs(golden["data_seed"], dtype=golden["dtype"])
    opts = {**KW, **golden["overrides"]}
    cfg = itm.preset("paper", **opts) if reading == "preset" else \
        itm.Config(folds=1, preprocess="none", c_scale="B", score_by="head", **opts)
    r = itm.itm_score(X, y, cfg)
    assert r.score == golden["score"]
    assert r.n == golden["n"]
    assert r.trajectory == golden["trajectory"]
    assert float(r.losses[0]) == golden["loss_first"]
    assert float(r.losses[-1]) == golden["loss_last"]
    assert float(np.sum(r.losses)) == golden["loss_sum"]
    assert r.fold_scores == [golden["score"]] and math.isnan(r.sd)


# ----------------------------------------------------------------------------------------------------
# 3. Every sample scored exactly once.

def _unbalanced_labels(seed):
    counts = (37, 23, 11, 3, 2)
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))


@pytest.mark.parametrize("k", [2, 3, 5, 7])
def test_crossfit_folds_partition_stratified_deterministic(k):
    y = _unbalanced_labels(0)
    fold = itm.crossfit_folds(y, k, np.random.default_rng(4))
    assert fold.shape == y.shape and set(np.unique(fold)) == set(range(k))
    sizes = np.bincount(fold, minlength=k)
    assert sizes.sum() == y.size and sizes.max() - sizes.min() <= 1
    for c in np.unique(y):
        per_fold = np.bincount(fold[y == c], minlength=k)
        assert per_fold.max() - per_fold.min() <= 1, (c, per_fold)
    assert np.array_equal(fold, itm.crossfit_folds(y, k, np.random.default_rng(4)))
    assert not np.array_equal(fold, itm.crossfit_folds(y, k, np.random.default_rng(5)))


def test_folds_score_every_sample_once_and_train_on_the_rest():
    X, y = blobs(0, n=163)                              # 163 = 5·32 + 3: unequal folds
    scored = []
    for f in range(itm.Config().folds):
        plan = itm.make_plan(X, y, itm.Config(**KW), fold=f)
        train, score = np.sort(plan.train_idx), np.sort(plan.score_idx)
        assert np.array_equal(np.union1d(train, score), np.arange(163))
        assert np.intersect1d(train, score).size == 0
        scored.append(score)
    everything = np.concatenate(scored)
    assert np.array_equal(np.sort(everything), np.arange(163))


def test_result_aggregates_the_folds():
    X, y = blobs(0, n=163)
    r = itm.itm_score(X, y, **KW)
    k = itm.Config().folds
    assert len(r.fold_scores) == k and len(r.fold_n) == k
    # fold_n is each fold's deparametric n (not a sample count); n is their median; n_scored counts samples
    assert r.n == int(np.median(r.fold_n))
    assert r.n_scored == 163
    assert r.score == float(np.mean(r.fold_scores))     # unweighted mean over folds (unequal sizes)
    assert r.sd == float(np.std(r.fold_scores, ddof=1))
    sizes = np.bincount(itm.crossfit_folds(y, k, np.random.default_rng(0)))
    for acc, size in zip(r.fold_scores, sizes):         # each fold: correct / its own size, percent
        assert abs(acc * size / 100 - round(acc * size / 100)) < 1e-9


def test_chance_is_what_a_model_without_class_information_scores():
    """Scored by h, chance is the majority rate. Scored by the nearest centre of the evolved embeddings
    (the default), the propagation pulls each scoring batch towards its own labels' centres, so chance is
    the higher of the majority rate and what the same scoring step gives random unit rows Θ (seeded, per
    fold with the fold's own n), and pure noise features score within it."""
    X, y = blobs(0, n=163)
    majority = 100.0 * np.bincount(y).max() / 163
    assert itm.itm_score(X, y, score_by="head", **KW).chance == majority
    cfg = itm.Config(**KW)
    assert cfg.score_by == "centres"
    plans = [itm.make_plan(X, y, cfg, fold=f) for f in range(cfg.folds)]
    rates = [itm._Model(p).uninformed(np.random.default_rng([cfg.seed, p.fold, 1])) for p in plans]
    r = itm.itm_score(X, y, cfg)
    assert r.chance == max(majority, float(np.mean(rates))) and r.chance > majority + 5
    assert itm.itm_score(X, y, cfg).chance == r.chance                     # seeded
    noise = np.random.default_rng(4).standard_normal(X.shape)
    assert itm._at_chance(itm.itm_score(noise, y, cfg)) and not itm._at_chance(r)


@pytest.mark.parametrize("folds", [3, 5])
def test_fold_arrangements_give_the_same_scores(folds, monkeypatch):
    """Folds one after the other, two at a time on threads with the odd fold left over run alone, all at
    once in forked processes (itm_parallel): bit-identical Results (each fold computes the same)."""
    X, y = blobs(0, n=163)
    kw = {**KW, "folds": folds}

    def run(cores, fork_work):
        monkeypatch.setattr(itm, "cores", lambda: cores)
        monkeypatch.setattr(itm, "_FORK_WORK", fork_work)
        r = itm.itm_score(X, y, **kw)
        return r.fold_scores, r.trajectory, r.fold_n, r.losses.tolist()

    calls = []
    fold_runs = itm.sibling("itm_parallel", "test").fold_runs
    monkeypatch.setattr(itm.sibling("itm_parallel", "test"), "fold_runs",
                        lambda run, folds, workers: calls.append(folds) or fold_runs(run, folds, workers))
    serial = run(1, 1 << 60)
    assert run(2, 1 << 60) == serial                     # threads
    assert not calls
    assert run(2, 0) == serial                           # forked processes
    assert calls == [folds]                              # every fold forked at once


def test_one_fold_has_no_sd():
    X, y = blobs(0)
    r = itm.itm_score(X, y, folds=1, **KW)
    assert len(r.fold_scores) == 1 and r.score == r.fold_scores[0] and math.isnan(r.sd)
    assert r.n_scored == N // 5


# ----------------------------------------------------------------------------------------------------
# 4. Degenerate input: a clear result or an error naming the model — never a silent chance score.

def test_class_smaller_than_folds_is_scored():
    X, _ = blobs(0)
    y = np.arange(N) % 3
    y[[5, 77]] = 3                                      # class 3: 2 samples, 5 folds
    r = itm.itm_score(X, y, **KW)
    assert math.isfinite(r.score) and not r.diverged and not r.error
    assert r.n_scored == N and len(r.fold_scores) == itm.Config().folds
    y[77] = 0                                           # a class of one sample cannot be split
    with pytest.raises(ValueError, match="single sample"):
        itm.itm_score(X, y, **KW)


def _degenerate(X):
    nan = X.copy()
    nan[7, 3] = np.nan
    return {"const": np.full_like(X, 3.0), "zero": np.zeros_like(X), "nan": nan,
            "same_rows": np.tile(X[:1], (X.shape[0], 1))}


REASONS = {"const": "features are the same for every sample", "zero": "features are all zero",
           "nan": "features contain NaN/Inf", "same_rows": "features are the same for every sample"}


def test_rank_reports_each_bad_model_by_name():
    X, y = blobs(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ranking = itm.rank({"good": X, **_degenerate(X)}, y, errors="report", **KW)
    assert ranking[0][0] == "good" and math.isfinite(ranking[0][1].score) and not ranking[0][1].error
    for name, r in ranking[1:]:
        assert math.isnan(r.score), name
        assert r.error.startswith(f"model {name!r}: ") and REASONS[name] in r.error, r.error
        assert "\n" not in r.error


@pytest.mark.parametrize("bad", list(REASONS))
def test_rank_raises_naming_the_bad_model(bad):
    X, y = blobs(0)
    with pytest.raises(ValueError, match=f"model '{bad}': {REASONS[bad]}"):
        itm.rank({"good": X, bad: _degenerate(X)[bad]}, y, **KW)


@pytest.mark.parametrize("bad", list(REASONS))
def test_cli_only_bad_models_one_line_exit_1(tmp_path, bad):
    X, y = blobs(0)
    path = tmp_path / "bad.npz"
    np.savez(path, labels=y, **{bad: _degenerate(X)[bad]})
    rc, out, err = cli(*cli_args(path, "--quiet"))
    assert rc == 1 and out == ""
    line = one_line_error(err)
    assert line.startswith(f"itm: error: model '{bad}': ") and REASONS[bad] in line, line


def test_cli_bad_model_beside_good_one_is_ranked_last_as_na(tmp_path):
    X, y = blobs(0)
    path = tmp_path / "mixed.npz"
    np.savez(path, labels=y, good=X, const=np.full_like(X, 3.0))
    rc, out, err = cli(*cli_args(path, "--quiet"))
    assert rc == 0, err
    rows = [line for line in out.splitlines() if line[:4].strip().isdigit()]
    assert "good" in rows[0] and "±" in rows[0]
    assert "const" in rows[1] and "n/a" in rows[1]
    assert f"model 'const': {REASONS['const']}" in err and "ranked last as n/a" in err


def test_paper_preset_constant_model_fails_alone_naming_it(tmp_path):
    # preprocess="none" computes no preprocessing, but the same checks run: a constant model is refused
    # (not scored at the majority rate), and the CLI ranks it last as n/a, naming it
    X, y = blobs(0)
    path = tmp_path / "c.npz"
    np.savez(path, labels=y, good=X, const=np.full_like(X, 3.0))
    rc, out, err = cli(*cli_args(path, "--quiet", "--preset", "paper"))
    assert rc == 0, err
    assert "'const'" in err and "the same for every sample" in err and "ranked last as n/a" in err, err
    assert "scores at chance" not in err
    last = out.splitlines()[-1].split()
    assert last[:3] == ["2", "const", "n/a"], out


# ----------------------------------------------------------------------------------------------------
# 5. The uncertainty a user sees.

ZOO_KW = {**KW, "folds": 5}   # the ≈ rule pairs fold scores: five of them, not the default's three


def _zoo():
    X, y = blobs(0)
    good, _ = blobs(0, sep=3.0)
    noise = np.random.default_rng(5).standard_normal(X.shape).astype(np.float32)
    return {"a": X, "a_copy": X.copy(), "good": good, "noise": noise}, y


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    feats, y = _zoo()
    path = tmp_path_factory.mktemp("zoo") / "zoo.npz"
    np.savez(path, labels=y, **feats)
    ranking = itm.rank(feats, y, **ZOO_KW)
    return path, ranking, cli(*cli_args(path, "--quiet", "--folds", ZOO_KW["folds"]))


def _rows(out):
    """(rank, mark, model, rest of the line) of every table row."""
    rows = []
    for line in out.splitlines():
        if line[:4].strip().isdigit():
            rows.append((int(line[:4]), line[4], line[5:].split()[0], line))
    return rows


def test_table_shows_score_and_sd_per_row(zoo):
    _, ranking, (rc, out, _) = zoo
    assert rc == 0
    rows = _rows(out)
    assert [name for _, _, name, _ in rows] == [name for name, _ in ranking]
    for (_, _, _, line), (_, r) in zip(rows, ranking):
        assert f"{r.score:.2f} ± {r.sd:.2f}" in line


def test_within_noise_mark_follows_the_rule(zoo):
    _, ranking, (_, out, _) = zoo
    marks = {name: mark for _, mark, name, _ in _rows(out)}
    for i, (name, r) in enumerate(ranking):
        expected = i > 0 and itm._within_noise(ranking[i - 1][1], r)
        assert (marks[name] == "≈") == expected, name
    order = [name for name, _ in ranking]
    # identical features: identical fold scores, within noise of each other; the others are far apart
    assert abs(order.index("a") - order.index("a_copy")) == 1
    assert marks[order[max(order.index("a"), order.index("a_copy"))]] == "≈"
    assert marks["good"] == " " and marks["noise"] == " "
    assert sum(m == "≈" for m in marks.values()) == 1
    assert "≈ within noise of the model above" in out


def test_noise_model_is_warned_at_chance(zoo):
    _, ranking, (_, _, err) = zoo
    assert "model 'noise' scores at chance" in err
    for name in ("a", "a_copy", "good"):
        assert f"model {name!r} scores at chance" not in err
    assert itm._at_chance(dict(ranking)["noise"])


def test_json_has_fold_scores_and_sd(zoo):
    path, ranking, _ = zoo
    rc, out, _ = cli(*cli_args(path, "--quiet", "--json", "--folds", ZOO_KW["folds"]))
    assert rc == 0
    doc = json.loads(out)
    rows = {row["model"]: row for row in doc["ranking"]}
    assert set(rows) == {"a", "a_copy", "good", "noise"}
    for name, r in ranking:
        assert rows[name]["fold_scores"] == r.fold_scores and len(r.fold_scores) == ZOO_KW["folds"]
        assert rows[name]["sd"] == pytest.approx(np.std(rows[name]["fold_scores"], ddof=1), abs=1e-12)
        assert rows[name]["score"] == pytest.approx(np.mean(rows[name]["fold_scores"]), abs=1e-12)


@pytest.mark.parametrize("with_truth", [False, True])
def test_plot_writes_a_png(zoo, tmp_path, with_truth):
    pytest.importorskip("matplotlib")
    path, _, _ = zoo
    png = tmp_path / "scores.png"
    extra = []
    if with_truth:
        truth = tmp_path / "truth.json"
        truth.write_text(json.dumps({"a": 70.0, "a_copy": 70.5, "good": 95.0, "noise": 30.0}))
        extra = ["--truth", truth]
    rc, out, err = cli(*cli_args(path, "--quiet", "--plot", png, *extra))
    assert rc == 0, err
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    if with_truth:
        assert "weighted Kendall tau_w" in out


def test_plot_without_matplotlib_fails_before_scoring(zoo, tmp_path, monkeypatch):
    path, _, _ = zoo
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # `import matplotlib` raises ImportError

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored before refusing --plot")
    monkeypatch.setattr(itm, "score_grid", no_scoring)
    png = tmp_path / "scores.png"
    rc, out, err = cli(*cli_args(path, "--plot", png))
    assert rc == 1 and out == "" and not png.exists()
    assert one_line_error(err).startswith("itm: error: --plot needs matplotlib")


# ----------------------------------------------------------------------------------------------------
# 6. Bad input from elsewhere.

MIXED = np.array([1, "a", 2.0] * 53 + [1], dtype=object)   # 160 labels of three Python types


def test_mixed_type_labels_one_line_error_naming_labels():
    X, _ = blobs(0)
    for call in (lambda: itm.encode_labels(MIXED), lambda: itm.itm_score(X, MIXED, **KW),
                 lambda: itm.rank({"m": X}, MIXED, **KW)):
        with pytest.raises(ValueError) as info:
            call()
        msg = str(info.value)
        assert "\n" not in msg and "labels mix types (float, int, str)" in msg, msg
    (name, r), = itm.rank({"m": X}, MIXED, errors="report", **KW)    # reported like any bad input
    assert r.error.startswith("model 'm': labels mix types") and math.isnan(r.score), r.error


def test_cli_mixed_type_labels_one_line(tmp_path):
    X, _ = blobs(0)
    feats, labels = tmp_path / "f.npz", tmp_path / "mixed.npy"
    np.savez(feats, m=X)
    np.save(labels, MIXED, allow_pickle=True)
    rc, out, err = cli(*cli_args(feats, "--labels", labels, "--quiet"))
    assert rc == 1 and out == ""
    line = one_line_error(err)
    assert line.startswith(f"itm: error: cannot read labels file {labels}")

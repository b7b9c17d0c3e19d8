"""Independent oracles for parts that were checked only against themselves (issue 27, item 5).

Each test computes the expected value here, by the formula DESIGN.md states, written out in the test
(NumPy float64 or plain Python loops), never from the code under test:
- the preprocessing of DESIGN.md §0 (Config.preprocess), through the rows a run actually reads
  (itm.make_plan(...).features[rows]), for float64, float32 and float16 input;
- the torch oracle (tests/itm_torch_ref.py) with each preprocessing: it now computes the preprocessing
  itself, from the raw features, and must give itm's loss and gradients;
- the "≈ within noise" mark (itm._within_noise) and the chance warning (itm._at_chance) just inside and
  just outside their thresholds (1e-9 relative);
- the paper's τ_w (kendall.weighted_tau(..., variant="paper"), DESIGN.md §4) against a literal double loop
  over i < j, with ties in scores and in truth, n = 3..30.
"""
import math

import numpy as np
import pytest

import itm
import kendall

N, K = 240, 4
REL = 1e-9          # how far inside / outside a threshold the hand-made cases sit (relative)


# ----------------------------------------------------------------------------------------------------
# Preprocessing (DESIGN.md §0) against the textbook formulas.

def raw_features(dtype):
    """N×8 features with very different scales and offsets per dimension, one exactly constant dimension
    (5) and one that is constant up to rounding (6: 0.3 and 0.1 + 0.2, which differ in the last bit), cast
    to dtype. Offsets stay within ~10 standard deviations, so float32 arithmetic keeps ~1e-6 relative."""
    rng = np.random.default_rng(27)
    y = rng.permutation(np.arange(N) % K)
    X = rng.standard_normal((N, 8)) * [0.01, 1.0, 100.0, 3.0, 1.0, 1.0, 1.0, 1e-3] \
        + [0.05, -2.0, 300.0, 1.0, 0.0, 0.0, 0.0, 0.0] + 0.7 * rng.standard_normal((K, 8))[y]
    X[:, 5] = 2.5
    X[:, 6] = np.where(np.arange(N) % 2 == 0, 0.3, 0.1 + 0.2)
    assert np.float64(0.3) != 0.1 + 0.2
    X[:, 7] = 1e-3 + 3e-7 * (y - 1.5) + 1e-7 * rng.standard_normal(N)   # σ ≈ 3.5e-7: informative, tiny
    return X.astype(dtype), y


def expected(X64, kind, std_floor=None):
    """DESIGN.md §0 written out on float64 features: population statistics over all N rows.
    Returns (expected features, the scale |s| that multiplies x − c, the centre |c|), each N×D — the last
    two only to size the rounding tolerance."""
    n = X64.shape[0]
    full = lambda v: np.broadcast_to(v, X64.shape)  # noqa: E731
    if kind == "none":
        return X64, full(1.0), full(0.0)
    if kind == "unit_rows":
        norms = np.sqrt((X64 ** 2).sum(axis=1))[:, None]
        return X64 / norms, full(1.0 / norms), full(0.0)
    if kind == "rms":
        rms = math.sqrt(sum(float(row @ row) for row in X64) / n)       # root-mean-square row norm
        return X64 / rms, full(1.0 / rms), full(0.0)
    mean = X64.sum(axis=0) / n
    centred = X64 - mean
    if kind == "center_rms":
        rms = math.sqrt(sum(float(row @ row) for row in centred) / n)   # RMS norm of the centred rows
        return centred / rms, full(1.0 / rms), full(np.abs(mean))
    assert kind == "standardize"
    std = np.sqrt((centred ** 2).sum(axis=0) / n)                      # population std (ddof 0)
    if std_floor is not None:                                          # the authors' reading (§1b)
        scale = 1.0 / np.maximum(std, std_floor)
        return centred * scale, full(scale), full(np.abs(mean))
    # a constant dimension contributes 0 ("constant": its std is rounding, ≤ 1e-12 of the largest std)
    constant = std <= 1e-12 * std.max()
    scale = np.where(constant, 0.0, 1.0 / np.where(constant, 1.0, std))
    return centred * scale, full(scale), full(np.abs(mean))


def check_rows(plan, X, kind, rows, std_floor=None):
    X64 = np.asarray(X, dtype=np.float64)                              # float16 → float64 is exact
    want, scale, centre = expected(X64, kind, std_floor)
    got = plan.features[rows]
    # float32 unless the input is float64; "none" reads the features as they are
    out = X.dtype if kind == "none" else np.float64 if X.dtype == np.float64 else np.float32
    assert got.dtype == out and got.shape == want[rows].shape
    # rounding: a few ulps of |x|·|s|, |c|·|s| and the result for (x − c)·s in the output dtype, and
    # N·ε64 of the same for the statistics (sums over N rows in float64, in another order than here)
    eps = 4 * np.finfo(out).eps + 2 * N * np.finfo(np.float64).eps
    tol = eps * ((np.abs(X64[rows]) + centre[rows]) * scale[rows] + np.abs(want[rows]))
    err = np.abs(np.asarray(got, np.float64) - want[rows])
    assert np.all(err <= tol), (kind, X.dtype, float((err / np.maximum(tol, 1e-300)).max()))


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("kind", ["standardize", "rms", "center_rms", "unit_rows", "none"])
def test_preprocessing_against_the_formulas(kind, dtype):
    """What f reads (make_plan(...).features) equals DESIGN.md §0's formula on the input's own values:
    all rows by an index array (a copy, preprocessed in place), a shuffled subset, and a slice (a view of
    float32 input, not modified)."""
    X, y = raw_features(dtype)
    before = X.copy()
    plan = itm.make_plan(X, y, itm.Config(preprocess=kind, batch_size=16, iterations=1))
    for rows in (np.arange(N), np.random.default_rng(1).permutation(N)[:37], slice(5, 50)):
        check_rows(plan, X, kind, rows)
    np.testing.assert_array_equal(X, before)                           # the caller's features untouched
    if kind == "standardize":                                          # the constant dimensions give 0
        assert not np.any(plan.features[np.arange(N)][:, [5, 6]])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_authors_reading_clamps_the_std_at_1e_6(dtype):
    """preset("authors"): (x − μ)/max(σ, 1e-6) per dimension (DESIGN.md §1b); dimension 7 has σ ≈ 3.5e-7,
    below the floor, so a missing or different floor shows (and the constant ones give 0 either way)."""
    X, y = raw_features(dtype)
    assert np.asarray(X[:, 7], np.float64).std() < 1e-6
    plan = itm.make_plan(X, y, itm.preset("authors", batch_size=16, iterations=1))
    check_rows(plan, X, "standardize", np.arange(N), std_floor=1e-6)


@pytest.mark.parametrize("kind", ["standardize", "rms", "center_rms", "unit_rows", "none"])
def test_torch_oracle_preprocesses_by_itself(kind, one_torch_thread):
    """tests/itm_torch_ref.py reads the raw features and computes Config.preprocess itself: its loss and
    gradients of a plan's first batch equal itm's (float64) for every preprocessing, and its preprocessed
    features equal the formulas above."""
    from tests import itm_torch_ref as ref     # torch: the test extra, which make test installs
    X, y = raw_features(np.float64)
    cfg = itm.Config(preprocess=kind, dtype="float64", batch_size=32, iterations=2, n=37)
    plan = itm.make_plan(X, y, cfg)
    np.testing.assert_allclose(ref.features_of(X, plan, cfg).numpy(), expected(X, kind)[0], rtol=1e-12,
                               atol=1e-12)
    loss, grads = itm._Model(plan).loss_and_grads(plan.params, plan.batches[0])
    loss_t, grads_t = ref.loss_and_grads(X, plan, cfg, plan.params, plan.batches[0])
    assert abs(loss - loss_t) <= 1e-9 * abs(loss_t)
    for g, gt in zip(grads, grads_t):
        assert np.abs(g - gt).max() <= 1e-9 * max(1.0, float(np.abs(gt).max()))


# ----------------------------------------------------------------------------------------------------
# The "≈ within noise" mark and the chance warning, at their thresholds.

def result(fold_scores=(), score=None, chance=float("nan"), n_scored=0, **kw):
    fold_scores = list(fold_scores)
    score = float(np.mean(fold_scores)) if score is None else score
    return itm.Result(score=score, trajectory=[], n=1, seconds=0.0, fold_scores=fold_scores, chance=chance,
                      n_scored=n_scored, **kw)


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_within_noise_at_two_standard_errors(k, sign):
    """≈ when |mean of the paired fold differences d| ≤ 2·sd(d)/√k, sd with ddof 1 (DESIGN.md: the
    fold-paired difference is within 2 standard errors). d = m + δ·u with u = (−1, 1) for k = 2, (−1, 0, 1)
    for k = 3, (−2, −1, 0, 1, 2) for k = 5: mean(u) = 0, so mean(d) = m and sd(d) = δ·sqrt(Σu²/(k − 1))."""
    u = {2: [-1.0, 1.0], 3: [-1.0, 0.0, 1.0], 5: [-2.0, -1.0, 0.0, 1.0, 2.0]}[k]
    delta = 1.5
    sd = delta * math.sqrt(sum(v * v for v in u) / (k - 1))             # ddof 1, by hand
    threshold = 2.0 * sd / math.sqrt(k)
    base = [60.0 + 3.0 * i for i in range(k)]                           # model b's fold scores
    for factor, close in ((1 - REL, True), (1 + REL, False)):
        m = sign * threshold * factor
        a = result([bi + m + delta * ui for bi, ui in zip(base, u)])
        b = result(base)
        assert itm._within_noise(a, b) is close, (k, sign, factor)
        assert itm._within_noise(b, a) is close                       # |mean| — the order does not matter


def test_within_noise_degenerate_cases():
    """Identical fold scores are within noise (0 ≤ 0); a constant non-zero difference is not (sd 0);
    one fold, a diverged model or one that failed has no paired spread: never ≈."""
    assert itm._within_noise(result([70.0, 71.0, 72.0]), result([70.0, 71.0, 72.0])) is True
    assert itm._within_noise(result([70.5, 71.5, 72.5]), result([70.0, 71.0, 72.0])) is False
    assert itm._within_noise(result([70.0]), result([70.0])) is False
    diverged = result([70.0, 71.0, 72.0], diverged=True)
    failed = result([70.0, 71.0, 72.0], error="bad input")
    for other in (diverged, failed):
        assert itm._within_noise(other, result([70.0, 71.0, 72.0])) is False
        assert itm._within_noise(result([70.0, 71.0, 72.0]), other) is False


@pytest.mark.parametrize("chance, n_scored", [(25.0, 300), (50.0, 100), (10.0, 1000), (100 / 3, 137)])
def test_at_chance_at_two_binomial_standard_errors(chance, n_scored):
    """The chance warning fires when score ≤ 100·(c + 2·sqrt(c(1 − c)/n)), c = Result.chance/100, n the
    samples scored. By hand: c = 0.25, n = 300 → 100·(0.25 + 2·0.025) = 30; c = 0.5, n = 100 → 60."""
    c = chance / 100.0
    threshold = 100.0 * (c + 2.0 * math.sqrt(c * (1.0 - c) / n_scored))
    if (chance, n_scored) == (25.0, 300):
        assert threshold == pytest.approx(30.0, rel=1e-15)
    if (chance, n_scored) == (50.0, 100):
        assert threshold == pytest.approx(60.0, rel=1e-15)
    # ≤: the threshold itself is at chance (the same expression, so the same double)
    assert itm._at_chance(result(score=threshold, chance=chance, n_scored=n_scored)) is True
    assert itm._at_chance(result(score=threshold * (1 - REL), chance=chance, n_scored=n_scored)) is True
    assert itm._at_chance(result(score=threshold * (1 + REL), chance=chance, n_scored=n_scored)) is False
    assert itm._at_chance(result(score=float("nan"), chance=chance, n_scored=n_scored)) is False  # diverged


# ----------------------------------------------------------------------------------------------------
# The paper's τ_w (DESIGN.md §4) against a literal double loop.

def average_rank_best_first(values, i):
    """1-based rank of values[i], 1 = the largest; tied values share the mean of the positions they take:
    the positions after the #greater values, #equal of them (i included)."""
    greater = sum(1 for v in values if v > values[i])
    equal = sum(1 for v in values if v == values[i])
    return greater + (equal + 1) / 2.0


def paper_tau_loop(scores, truth):
    """Σ_{i<j} w_ij·sign[(G_i − G_j)(P_i − P_j)] / Σ_{i<j} w_ij, w_ij = 1/(G_i + G_j), G the truth ranks and
    P the score ranks (1-based, 1 = best, average ranks on ties)."""
    n = len(scores)
    G = [average_rank_best_first(truth, i) for i in range(n)]
    P = [average_rank_best_first(scores, i) for i in range(n)]
    num = den = 0.0
    for i in range(n):
        for j in range(i + 1, n):
            w = 1.0 / (G[i] + G[j])
            d = (G[i] - G[j]) * (P[i] - P[j])
            num += w * ((d > 0) - (d < 0))
            den += w
    return num / den


@pytest.mark.parametrize("n", range(3, 31))
def test_paper_tau_against_the_double_loop(n):
    """Seeded inputs with ties on both sides (few distinct values), plus one input without ties."""
    rng = np.random.default_rng(n)
    levels = max(2, n // 3)
    cases = [(rng.integers(0, levels, n).astype(float), 60.0 + rng.integers(0, levels, n)),
             (rng.standard_normal(n), 70.0 + 10.0 * rng.standard_normal(n))]
    for scores, truth in cases:
        if len(set(truth.tolist())) == 1:                             # all truth tied: make one differ
            truth[0] += 1.0
        want = paper_tau_loop(scores.tolist(), truth.tolist())
        got = kendall.weighted_tau(scores, truth, variant="paper")
        assert got == pytest.approx(want, rel=1e-12, abs=1e-14), (n, scores, truth)
    # a mapping input aligns by model name, whatever the order
    names = [f"m{i}" for i in range(n)]
    order = rng.permutation(n)
    got = kendall.weighted_tau(dict(zip(names, scores)), {names[i]: truth[i] for i in order}, variant="paper")
    assert got == pytest.approx(paper_tau_loop(scores.tolist(), truth.tolist()), rel=1e-12, abs=1e-14)


def test_paper_tau_weights_matter():
    """The loop above is not blind to the weights: with n = 3 and one discordant pair among the best
    models, 1/(G_i + G_j) gives (1/5 + 1/4 − 1/3)/(1/5 + 1/4 + 1/3) — not the unweighted (1 + 1 − 1)/3."""
    scores, truth = [2.0, 3.0, 1.0], [3.0, 2.0, 1.0]                  # G = (1, 2, 3), P = (2, 1, 3)
    want = (1 / 4 + 1 / 5 - 1 / 3) / (1 / 3 + 1 / 4 + 1 / 5)
    assert paper_tau_loop(scores, truth) == pytest.approx(want, rel=1e-15)
    assert kendall.weighted_tau(scores, truth, variant="paper") == pytest.approx(want, rel=1e-12)
    assert want != pytest.approx(1 / 3)

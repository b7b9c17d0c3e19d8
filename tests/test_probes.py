"""The probe baselines (baselines.probe_ridge, probe_ncm, probe_knn), each against a second computation
written the plain way: leave-one-out by refitting N times, scikit-learn's NearestCentroid and
KNeighborsClassifier."""
import math

import numpy as np
import pytest

import baselines
import itm

sklearn = pytest.importorskip("sklearn")   # the baselines extra; make test installs it
from sklearn.neighbors import KNeighborsClassifier, NearestCentroid  # noqa: E402


def blobs(N=120, D=12, C=4, seed=0, sep=1.0):
    rng = np.random.default_rng(seed)
    y = np.arange(N) % C
    rng.shuffle(y)
    return sep * rng.standard_normal((C, D))[y] + rng.standard_normal((N, D)), y


def naive_ridge(Xtr, ytr, Xte, C):
    """Every α of the grid: leave-one-out by refitting without each row, on the same centred targets;
    the α with the least squared error predicts the held-out rows."""
    Y = np.eye(C)[ytr]
    Y -= Y.mean(axis=0)
    N, D = Xtr.shape
    lam_mean = np.mean([v for v in np.linalg.eigvalsh(Xtr.T @ Xtr) if v > 1e-10 * np.abs(Xtr).max() ** 2])
    best = None
    for a in baselines._RIDGE_GRID * lam_mean:
        err = 0.0
        for i in range(N):
            keep = np.arange(N) != i
            W = np.linalg.solve(Xtr[keep].T @ Xtr[keep] + a * np.eye(D), Xtr[keep].T @ Y[keep])
            err += float(np.sum((Y[i] - Xtr[i] @ W) ** 2))
        if best is None or err < best[0]:
            best = (err, a)
    W = np.linalg.solve(Xtr.T @ Xtr + best[1] * np.eye(D), Xtr.T @ Y)
    return np.argmax(Xte @ W, axis=1)


@pytest.mark.parametrize("D", [6, 80], ids=["N>D", "N<D"])
def test_ridge_matches_refitting(D):
    """The closed-form leave-one-out choice of α and the fit, in both branches (XᵀX when N > D, XXᵀ when
    N ≤ D), against refitting without each row."""
    X, y = blobs(N=60, D=D, C=3, seed=D, sep=0.7)
    Xtr, Xte = baselines._standardised(X, np.arange(45), np.arange(45, 60))
    ours = baselines._ridge_predict(Xtr, y[:45], Xte, 3)
    assert np.array_equal(ours, naive_ridge(Xtr, y[:45], Xte, 3))


def test_ncm_matches_sklearn():
    X, y = blobs(seed=3, sep=0.5)
    Xtr, Xte = baselines._standardised(X, np.arange(90), np.arange(90, 120))
    ref = NearestCentroid().fit(Xtr, y[:90]).predict(Xte)
    assert np.array_equal(baselines._ncm_predict(Xtr, y[:90], Xte, 4), ref)


def test_knn_matches_sklearn():
    """Weighted k-NN on cosine similarity: scikit-learn's cosine distance is 1 − similarity, so the vote
    weight exp(similarity / T) is exp((1 − distance) / T)."""
    X, y = blobs(N=200, D=16, seed=4, sep=0.4)
    Xtr, Xte = baselines._standardised(X, np.arange(150), np.arange(150, 200))
    T = baselines._KNN_T
    ref = KNeighborsClassifier(n_neighbors=baselines._KNN_K, metric="cosine", algorithm="brute",
                               weights=lambda d: np.exp((1.0 - d) / T)).fit(Xtr, y[:150]).predict(Xte)
    ours = baselines._knn_predict(Xtr, y[:150], Xte, 4)
    assert np.array_equal(ours, ref)
    assert 0.3 < np.mean(ours == y[150:]) < 1.0      # informative, not trivially perfect


@pytest.mark.parametrize("method", ["probe_ridge", "probe_ncm", "probe_knn"])
def test_probe_is_the_mean_held_out_accuracy_over_the_folds(method):
    """The score: the mean over itm.crossfit_folds (seed 0, 5 folds) of each fold's held-out accuracy,
    every fold standardised with its training rows."""
    X, y = blobs(N=150, D=10, C=3, seed=5, sep=0.6)
    predict = {"probe_ridge": baselines._ridge_predict, "probe_ncm": baselines._ncm_predict,
               "probe_knn": baselines._knn_predict}[method]
    fold = itm.crossfit_folds(y, 5, np.random.default_rng(0))
    accs = []
    for k in range(5):
        train, held = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        mean, std = X[train].mean(axis=0), X[train].std(axis=0)
        pred = predict((X[train] - mean) / std, y[train], (X[held] - mean) / std, 3)
        accs.append(np.mean(pred == y[held]))
    score = baselines.METHODS[method](X.astype(np.float32), y)
    assert math.isclose(score, float(np.mean(accs)), abs_tol=1e-12)
    assert baselines.METHODS[method](X, y, seed=1) != score or method == "probe_ncm"  # the seed deals the folds


@pytest.mark.parametrize("method", ["probe_ridge", "probe_ncm", "probe_knn"])
def test_probe_scale_invariance_and_bad_input(method):
    X, y = blobs(seed=6, sep=0.6)
    X[:, 3] = 2.5                                       # a constant dimension contributes nothing
    fn = baselines.METHODS[method]
    assert fn(X, y) == fn(X * 1024.0, y) == fn(X * 1e-3, y)
    with pytest.raises(ValueError, match="folds must be ≥ 2"):
        fn(X, y, folds=1)
    with pytest.raises(ValueError, match="NaN"):
        fn(np.where(np.arange(X.size).reshape(X.shape) == 7, np.nan, X), y)


def test_probes_are_in_the_tables():
    for method in ("probe_ridge", "probe_ncm", "probe_knn"):
        assert method in baselines.METHODS and baselines.DISPLAY_NAMES[method].startswith("Probe: ")

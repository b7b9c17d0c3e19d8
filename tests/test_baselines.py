"""Tests of baselines.py: reference values (DESIGN.md §6), the published codes' outputs on real
features (flowers17), naive re-implementations of the published formulas, identities,
invariances (scale included), bad input, pools on executors and the command line.

Every naive function below is written directly from the reference algorithm (per-class loops,
np.cov, scipy's generalized eigh, np.linalg.pinv, slogdet, np.corrcoef + scipy.stats.spearmanr,
...) and shares no code with baselines.py.
"""
import json
import multiprocessing
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize
import scipy.special
import scipy.stats

import baselines as B

try:
    import sklearn  # noqa: F401
    HAVE_SKLEARN = True
except ImportError:
    HAVE_SKLEARN = False
needs_sklearn = pytest.mark.skipif(not HAVE_SKLEARN, reason="scikit-learn (extra 'baselines') "
                                   "is not installed")


ROOT = Path(__file__).resolve().parents[1]
# 11 of flowers17's 21 models: the bundled example's 8 and 3 more (tests/data/README.md: how made)
FLOWERS = (ROOT / "examples" / "flowers17_8models.npz", ROOT / "tests" / "data" / "flowers17_extra.npz")
FLOWERS_REFERENCE = ROOT / "tests" / "data" / "flowers17_reference.json"


def synth(N=3000, D=128, C=10, sep=0.25, seed=0):
    """The seeded synthetic set of DESIGN.md §6 (float32, ReLU'd Gaussian classes)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, N)
    mu = rng.standard_normal((C, D)) * sep
    X = np.maximum(mu[y] + rng.standard_normal((N, D)), 0).astype(np.float32)
    return X, y


@pytest.fixture(scope="module")
def ref():
    return synth()


@pytest.fixture(scope="module")
def small():
    return synth(N=600, D=48, C=6, sep=0.6, seed=5)


def source_probs(y):
    """§5's source-model probabilities for LEEP / NCE."""
    rng3 = np.random.default_rng(3)
    logits = rng3.standard_normal((len(y), 50)) + 3 * np.eye(50)[5 * y]
    return scipy.special.softmax(logits, axis=1)


# ============================================================================ naive references

def naive_logme(X, y, variant="fixed_point", pad=False, converge=False):
    """thuml/LogME, per class, as published (``pad`` adds the fix of issue #23; ``converge``
    also drops the 1e-5 and iterates the fixed point until α/β stops changing, or until it has run
    into the boundary α/β → 0 as far as float64 goes: its last finite iterate is the result)."""
    f = X.astype(np.float64)
    N, D = f.shape
    evidences = []
    if variant == "icml":
        v, s, vh = np.linalg.svd(f.T @ f, full_matrices=True)
    elif N > D:
        _, s, vh = np.linalg.svd(f.T @ f)
        s = np.sqrt(s)
        k = int(np.sum(s > 1e-10))
        u, s = (f @ vh.T)[:, :k] / s[:k], s[:k]
    else:
        u, s, vh = np.linalg.svd(f, full_matrices=False)
    for c in range(int(y.max()) + 1):
        yc = (y == c).astype(np.float64)
        alpha, beta = 1.0, 1.0
        if variant == "icml":
            lam, eps, tmp = 1.0, 1e-5, vh @ (f.T @ yc)
            for _ in range(11):
                gamma = (s / (s + lam)).sum()
                m = v @ (tmp * beta / (alpha + beta * s))
                alpha_de = (m * m).sum()
                alpha = gamma / (alpha_de + eps)
                beta_de = ((yc - f @ m) ** 2).sum()
                beta = (N - gamma) / (beta_de + eps)
                if abs(alpha / beta - lam) / lam < 0.01:
                    break
                lam = alpha / beta
            ev = (D / 2 * np.log(alpha) + N / 2 * np.log(beta) - 0.5 * np.log(alpha + beta * s).sum()
                  - beta / 2 * (beta_de + eps) - alpha / 2 * (alpha_de + eps) - N / 2 * np.log(2 * np.pi))
        else:
            sigma = s ** 2
            x2 = (u.T @ yc) ** 2
            res_x2 = yc @ yc - x2.sum()
            eps, steps, tol = (0.0, 100000, 1e-13) if converge else (1e-5, 11, 1e-3)
            if converge:        # a squared norm; for N <= D it is 0, to a rounding of either sign
                res_x2 = max(res_x2, 0.0)
            for _ in range(steps):
                t = alpha / beta
                gamma = (sigma / (sigma + t)).sum()
                m2 = (sigma * x2 / (t + sigma) ** 2).sum()
                res2 = (x2 / (1 + sigma / t) ** 2).sum() + res_x2
                with np.errstate(divide="ignore", invalid="ignore"):
                    step = gamma / (m2 + eps), (N - gamma) / (res2 + eps)
                if converge and not all(0 < v < np.inf for v in step):
                    break       # α/β → 0, β → ∞: N − γ and res2 have rounded to 0
                alpha, beta = step
                if abs(alpha / beta - t) / t <= tol:
                    break
            pad = pad or converge
            logdet = np.log(alpha + beta * sigma).sum() + (pad * (D - len(sigma)) * np.log(alpha))
            ev = (D / 2 * np.log(alpha) + N / 2 * np.log(beta) - 0.5 * logdet - beta / 2 * res2
                  - alpha / 2 * m2 - N / 2 * np.log(2 * np.pi))
        evidences.append(ev / N)
    return float(np.mean(evidences))


def naive_logme_evidence(X, y):
    """LogME's definition: mean over classes of max over (α, β) of log N(y_c; 0, I/β + XXᵀ/α) / N,
    by a 2-D grid and Nelder–Mead on (log α, log β) (no fixed point, no profile over α/β)."""
    f = X.astype(np.float64)
    N = len(f)
    lam, U = np.linalg.eigh(f @ f.T)                  # covariance I/β + XXᵀ/α = U diag(·) Uᵀ
    lam = np.maximum(lam, 0.0)
    out = []
    for c in range(int(y.max()) + 1):
        z2 = (U.T @ (y == c).astype(np.float64)) ** 2

        def nll(p):
            var = np.exp(-p[1]) + lam * np.exp(-p[0])
            return 0.5 * (np.log(var).sum() + (z2 / var).sum() + N * np.log(2 * np.pi))

        grid = [(a, b) for a in np.linspace(-15, 15, 31) for b in np.linspace(-5, 15, 21)]
        start = min(grid, key=nll)
        best = scipy.optimize.minimize(nll, start, method="Nelder-Mead",
                                       options={"xatol": 1e-11, "fatol": 1e-14, "maxiter": 20000})
        out.append(-best.fun / N)
    return float(np.mean(out))


def _cov(X, shrinkage=-1):
    emp = np.cov(np.asarray(X).T, bias=1)
    if shrinkage < 0:
        return emp
    out = (1 - shrinkage) * emp
    out.flat[:: emp.shape[0] + 1] += shrinkage * np.trace(emp) / emp.shape[0]
    return out


def _iterative_a(A):
    x = A.sum(axis=1)
    for _ in range(3):
        t = A @ x
        v = t / np.linalg.norm(t)
        t = A @ v
        x = t / np.linalg.norm(t)
    return x @ A @ v


def naive_fda(X, y, shrinkage=None, etran=False):
    """SFDA's ``SFDA`` class (``etran=True``: ETran's LDA, eigh of inv(Sw) @ Sb)."""
    C = int(y.max()) + 1
    priors = np.bincount(y) / len(y)
    means = np.stack([X[y == c].mean(axis=0, dtype=np.float64) for c in range(C)])
    Sw = sum(priors[c] * _cov(X[y == c]) for c in range(C))
    lam = max(np.exp(-5 * _iterative_a(Sw)), 1e-10) if shrinkage is None else shrinkage
    St = _cov(X, lam)
    sSw = (1 - lam) * Sw
    sSw.flat[:: Sw.shape[0] + 1] += lam * np.trace(Sw) / Sw.shape[0]
    if etran:
        evals, V = np.linalg.eigh(np.linalg.inv(sSw) @ (St - sSw))
    else:
        evals, V = scipy.linalg.eigh(St - sSw, sSw)
    V = V[:, np.argsort(evals)[::-1]]
    coef = means @ V @ V.T
    b = -0.5 * np.diag(means @ coef.T) + np.log(priors)
    return (lambda Z: scipy.special.softmax(Z @ coef.T + b, axis=1)), lam


def naive_sfda(X, y):
    n, C = len(y), int(y.max()) + 1
    X = X.astype(np.float64)
    proba, lam = naive_fda(X, y)
    p = np.exp(proba(X))
    p /= p.sum(axis=1, keepdims=True)
    means = np.stack([X[y == c].mean(axis=0) for c in range(C)])
    others = [(means.sum(axis=0) - means[c]) / (C - 1) for c in range(C)]
    for c in range(C):
        idx = np.where(y == c)[0]
        w = p[idx, c][:, None]
        X[idx] = w * X[idx] + (1 - w) * others[c]
    proba2, _ = naive_fda(X, y, lam)
    return proba2(X)[np.arange(n), y].sum() / n


def naive_etran_lda(X, y):
    proba, _ = naive_fda(X, y, etran=True)
    return proba(X)[np.arange(len(y)), y].mean()


def naive_nearest_mean(X, y):
    """softmax_c(−½‖x − μ_c‖² + log π_c): the identity-covariance Gaussian classifier."""
    X = X.astype(np.float64)
    C = int(y.max()) + 1
    means = np.stack([X[y == c].mean(axis=0) for c in range(C)])
    d2 = ((X[:, None, :] - means[None]) ** 2).sum(axis=2)
    P = scipy.special.softmax(-0.5 * d2 + np.log(np.bincount(y) / len(y)), axis=1)
    return P[np.arange(len(y)), y].mean()


def naive_energy(X, percent=0.5):
    e = scipy.special.logsumexp(X.astype(np.float64), axis=-1)
    return e[np.argsort(e)[: int(percent * 10) * len(e) // 1000]].mean()


def naive_energy_all(X):
    return scipy.special.logsumexp(X.astype(np.float64), axis=-1)


def naive_ped(X, y, G, steps=6, time_step=0.1, nsigma=0.6, exit_ratio=0.5, eps=1e-3):
    """PED_Score / One_Step_PED with its meshgrid pair bookkeeping."""
    X = X.astype(np.float64)
    smean, sstd = G.mean(axis=0), np.maximum(G.std(axis=0), eps)
    C = int(y.max()) + 1
    gi, gj = np.meshgrid(np.arange(C), np.arange(C))
    mask = np.triu(gi != gj, k=1)
    gi, gj = gi[mask], gj[mask]
    first = None
    for _ in range(steps):
        Z = (X - smean) / sstd
        means = np.stack([Z[y == c].mean(axis=0) for c in range(C)])
        R = np.sqrt(np.stack([Z[y == c].var(axis=0) for c in range(C)]).sum(axis=1))
        dist = means[gi] - means[gj]
        d = np.sqrt((dist ** 2).sum(axis=1))
        over = np.maximum(nsigma * R[gi] + nsigma * R[gj] - d, 0)[:, None]
        inter = np.zeros((C, C, X.shape[1]))
        inter[mask] = -dist / d[:, None] * np.minimum(0.5 * time_step ** 2 * over, over)
        overall = (inter - inter.transpose(1, 0, 2)).sum(axis=1)
        change = np.abs(overall).sum()
        first = change if first is None else first
        if not change / first > exit_ratio:
            break
        X = (Z + overall[y]) * sstd + smean
    return naive_sfda(X, y)


def naive_ncti(X, y, float64=True):
    """BUserName/NCTI ``NCTI_Score`` (scikit-learn PCA + LinearDiscriminantAnalysis); float64=False
    keeps the input dtype, as the published code does (the benchmark times it so)."""
    from sklearn.decomposition import PCA
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis as LDA
    pca = PCA(n_components=min(64, *X.shape))
    Z = pca.fit_transform(X.astype(np.float64) if float64 else X)
    temp = max(np.exp(-pca.explained_variance_[:32].sum()), 1e-10)
    clf = LDA(solver="svd") if temp == 1e-10 else LDA(solver="eigen", shrinkage=float(temp))
    low = clf.fit_transform(Z, y)
    low = low - low.mean(axis=0, keepdims=True)
    P = clf.predict_proba(Z)
    nuc = sum(np.linalg.norm(P[y == c], ord="nuc") for c in range(int(y.max()) + 1))
    return (np.linalg.norm(low, ord="nuc"), P[np.arange(len(y)), y].sum() / len(y), np.log(nuc))


def naive_hscore(X, y):
    f = X.astype(np.float64)
    g = np.zeros_like(f)
    for c in range(int(y.max()) + 1):
        g[y == c] = f[y == c].mean(axis=0)
    return np.trace(np.linalg.pinv(np.cov(f, rowvar=False), rcond=1e-15) @ np.cov(g, rowvar=False))


def naive_transrate(X, y, eps=1e-4):
    def rate(Z):
        n, d = Z.shape
        return 0.5 * np.linalg.slogdet(np.eye(d) + Z.T @ Z / (n * eps))[1]
    Z = X.astype(np.float64)
    Z = Z - Z.mean(axis=0, keepdims=True)
    C = int(y.max()) + 1
    return rate(Z) - sum(rate(Z[y == c]) for c in range(C)) / C


def exact_pca(X, k):
    """SVD-based PCA with scikit-learn's svd_flip sign convention."""
    Xc = X.astype(np.float64) - X.astype(np.float64).mean(axis=0)
    _, s, Vt = np.linalg.svd(Xc, full_matrices=False)
    Vt = Vt * np.sign(Vt[np.arange(len(Vt)), np.argmax(np.abs(Vt), axis=1)])[:, None]
    return Xc @ Vt[:k].T, s[:k] ** 2 / (len(X) - 1)


def naive_gbc(X, y, pca_dim=64, ddof=0, spherical=True):
    Z = exact_pca(X, pca_dim)[0] if pca_dim else X.astype(np.float64)
    C = int(y.max()) + 1
    mu = [Z[y == c].mean(axis=0) for c in range(C)]
    var = [np.maximum(Z[y == c].var(axis=0, ddof=ddof), 1e-4) for c in range(C)]
    total = 0.0
    for a in range(C):
        for b in range(C):
            if a == b:
                continue
            va, vb = (var[a].mean(), var[b].mean()) if spherical else (var[a], var[b])
            avg = (va + vb) / 2
            db = (np.sum((mu[a] - mu[b]) ** 2 / avg) / 8 + 0.5 * (np.sum(np.log(avg))
                  - 0.5 * np.sum(np.log(va)) - 0.5 * np.sum(np.log(vb))))
            total += np.exp(-db)
    return -total


def naive_parc(X, y, n_dims=32):
    Z = exact_pca(X, n_dims)[0]
    Z = (Z - Z.mean(axis=0)) / Z.std(axis=0)
    onehot = np.eye(int(y.max()) + 1)[y]
    iu = np.triu_indices(len(y), 1)
    return scipy.stats.spearmanr((1 - np.corrcoef(Z))[iu], (1 - np.corrcoef(onehot))[iu])[0] * 100


def naive_leep(P, y, log=True):
    N, C = len(y), int(y.max()) + 1
    joint = np.stack([P[y == c].sum(axis=0) / N for c in range(C)])
    cond = (joint / joint.sum(axis=0, keepdims=True)).T
    eep = np.array([row[label] for row, label in zip(P @ cond, y)])
    return np.mean(np.log(eep)) if log else np.mean(eep)


def naive_nce(z, y):
    N, Ct, Cs = len(y), int(y.max()) + 1, int(z.max()) + 1
    joint = np.zeros((Ct, Cs))
    for s, t in zip(z, y):
        joint[t, s] += 1.0 / N
    pz = joint.sum(axis=0, keepdims=True)
    mask = pz.reshape(-1) != 0
    p = (joint / np.where(pz == 0, 1, pz)).T[mask] + 1e-20
    return -np.sum(np.sum(-p * np.log(p), axis=1) * pz.reshape(-1)[mask])


def naive_sa_lda(X, y, alpha=0.005, sigma=0.6):
    """SA with the LDA base when the gate holds: PCA(64) → ``attract`` (meshgrid) → ETran LDA."""
    Z = exact_pca(X, 64)[0]
    C = int(y.max()) + 1
    means = np.stack([Z[y == c].mean(axis=0) for c in range(C)])
    R = np.sqrt(np.stack([Z[y == c].var(axis=0) for c in range(C)]).sum(axis=1))
    gi, gj = np.meshgrid(np.arange(C), np.arange(C))
    mask = np.triu(gi != gj, k=1)
    gi, gj = gi[mask], gj[mask]
    dist = means[gi] - means[gj]
    d = np.sqrt((dist ** 2).sum(axis=1))
    disp = np.zeros((C, C, Z.shape[1]))
    disp[mask] = -dist / d[:, None] * alpha * (d - sigma * (R[gi] + R[gj]))[:, None]
    Z = Z + (disp - disp.transpose(1, 0, 2)).sum(axis=1)[y]
    return naive_etran_lda(Z, y)


def rel(a, b):
    return abs(a - b) / abs(b)


# ============================================================================ reference values, synthetic

@pytest.mark.parametrize("name, compute, expected", [
    ("logme fixed point", lambda X, y: B.logme(X, y, variant="fixed_point"), -0.035709090807915046),
    ("logme default", lambda X, y: B.logme(X, y), -0.035709090807915046),   # 1.3e-8 apart
    ("logme icml", lambda X, y: B.logme(X, y, variant="icml"), -0.035712327326488866),
    ("sfda", lambda X, y: B.sfda(X, y), 0.3977716245992525),
    ("etran lda", lambda X, y: B.etran_parts(X, y)["lda"], 0.42386913111496455),
    ("etran energy", lambda X, y: B.etran_energy(X, percent=0.5, tail="bot"), 5.252252700449393),
    ("ncti seli", lambda X, y: B.ncti_parts(X, y)["seli"], 618.9670598540134),
    ("ncti ncc", lambda X, y: B.ncti_parts(X, y)["ncc"], 0.6830925558179233),
    ("ncti vc", lambda X, y: B.ncti_parts(X, y)["vc"], 5.7034099214661085),
    ("transrate", lambda X, y: B.transrate(X, y, compat=True), 18.73017729739894),
    ("leep", lambda X, y: B.leep(source_probs(y), y), -1.5830146475893243),
    ("nce", lambda X, y: B.nce(source_probs(y), y), -0.6478658878343458),
])
def test_reference_values(ref, name, compute, expected):
    assert rel(compute(*ref), expected) <= 1e-6


def test_logme_reference_values_n_below_d():
    X, y = synth(N=100, D=256, C=5, seed=1)
    assert rel(B.logme(X, y, variant="fixed_point"), 4.702064970384451) <= 1e-6   # thuml's bug
    assert rel(B.logme(X, y, variant="icml"), -0.36028915189411215) <= 1e-6


def test_ped_reference_value(ref):
    """Matches to ~1e-8, not 1e-12: the reference computed the ImageNet mean/std of the
    float32 G in float32 (np.mean of a float32 array); here they are float64."""
    G, _ = synth(N=2000, D=128, C=10, seed=9)
    assert rel(B.ped(*ref, reference_features=G), 0.8150325614015158) <= 1e-6


@needs_sklearn
def test_nleep_close_to_unseeded_reference(ref):
    """§5 gives ≈0.259 for the SFDA copy (no log, unseeded mixture — not reproducible)."""
    X, y = ref
    assert abs(B.nleep(X, y, log=False) - 0.259) < 0.01


# ============================================================================ same formula twice

@pytest.mark.parametrize("variant", ["fixed_point", "icml"])
@pytest.mark.parametrize("shape", [(600, 48), (40, 64)])
def test_logme_matches_naive(variant, shape):
    X, y = synth(N=shape[0], D=shape[1], C=4, seed=2)
    ours = B.logme(X, y, variant=variant)
    assert rel(ours, naive_logme(X, y, variant)) < 1e-9
    assert B.METHODS[{"fixed_point": "logme_published", "icml": "logme_icml"}[variant]](X, y) == ours


@pytest.mark.parametrize("shape", [(40, 64), (300, 20), (600, 48)])
def test_logme_default_is_the_evidence_maximum(shape):
    """The default is LogME's definition, max over α, β of the evidence, to rounding — for N ≤ D
    too, where the published fixed point drops the zero eigenvalues' (D − k)/2 · log α."""
    X, y = synth(N=shape[0], D=shape[1], C=4, seed=2)
    assert rel(B.logme(X, y), naive_logme_evidence(X, y)) < 1e-12
    if shape[0] <= shape[1]:
        assert abs(B.logme(X, y, variant="fixed_point") - B.logme(X, y)) > 0.1
        # the ICML iteration has the term; it differs by its 11-step, 1e-2 convergence only
        assert abs(B.logme(X, y, variant="icml") - B.logme(X, y)) < 1e-2 * abs(B.logme(X, y))
    assert rel(B.logme(X, y), naive_logme(X, y, converge=True)) < 1e-10


def test_logme_variants_agree_when_n_above_d(ref):
    assert abs(B.logme(*ref) - B.logme(*ref, variant="icml")) < 1e-5
    assert rel(B.logme(*ref), B.logme(*ref, variant="fixed_point")) < 2e-8


def test_sfda_matches_naive(small):
    assert rel(B.sfda(*small), naive_sfda(*small)) < 1e-10


def test_sfda_first_stage_is_shrinkage_lda(small):
    X, y = small
    P, lam = B.shrinkage_lda_proba(X, y)
    proba, lam_ref = naive_fda(X.astype(np.float64), y)
    assert lam == pytest.approx(lam_ref, rel=1e-12)
    assert np.abs(P - proba(X.astype(np.float64))).max() < 1e-10
    # the same probabilities from the textbook shrinkage-LDA formula with covariance Sw_λ
    C = int(y.max()) + 1
    Xf = X.astype(np.float64)
    means = np.stack([Xf[y == c].mean(axis=0) for c in range(C)])
    Sw = sum(np.mean(y == c) * np.cov(Xf[y == c].T, bias=True) for c in range(C))
    S = (1 - lam) * Sw + lam * np.trace(Sw) / Sw.shape[0] * np.eye(Sw.shape[0])
    W = np.linalg.solve(S, means.T)
    logits = Xf @ W - 0.5 * np.sum(means.T * W, axis=0) + np.log(np.bincount(y) / len(y))
    assert np.abs(P - scipy.special.softmax(logits, axis=1)).max() < 1e-10


def test_etran_lda_is_identity_covariance_nearest_mean(small):
    X, y = small
    ours = B.etran_parts(X, y)["lda"]
    assert rel(ours, naive_etran_lda(X, y)) < 1e-10
    assert rel(ours, naive_nearest_mean(X, y)) < 1e-10
    paper = B.etran_parts(X, y, compat=False)["lda"]
    assert rel(paper, B.shrinkage_lda_proba(X, y)[0][np.arange(len(y)), y].mean()) < 1e-12
    assert abs(paper - ours) > 1e-3


def test_etran_energy_matches_naive():
    X, y = synth(N=2400, D=32, C=3, seed=4)
    assert rel(B.etran_energy(X), naive_energy(X)) < 1e-12
    # N < 200: the reference's slice is empty (NaN); we keep the single lowest energy
    assert B.etran_energy(X[:100]) == pytest.approx(np.min(naive_energy_all(X[:100])))


def test_ped_matches_naive(small):
    X, y = small
    G, _ = synth(N=400, D=48, C=3, seed=8)
    assert rel(B.ped(X, y, reference_features=G), naive_ped(X, y, G.astype(np.float64))) < 1e-10
    with pytest.warns(UserWarning, match="standardising with the target features"):
        no_ref = B.ped(X, y)
    assert rel(no_ref, naive_ped(X, y, X.astype(np.float64))) < 1e-10


@needs_sklearn
@pytest.mark.parametrize("scale", [1.0, 6.0])          # eigen solver / svd solver (temp = 1e-10)
def test_ncti_matches_sklearn_pipeline(small, scale):
    X, y = small
    X = X * scale
    version = tuple(int(v) for v in sklearn.__version__.split(".")[:2])
    parts = B.ncti_parts(X, y, svd_covariance="biased" if version >= (1, 9) else "unbiased")
    for key, value in zip(("seli", "ncc", "vc"), naive_ncti(X, y)):
        assert rel(parts[key], value) < 1e-9, key
    if scale > 1:                       # the two scikit-learn conventions differ only here
        other = B.ncti_parts(X, y, svd_covariance="unbiased" if version >= (1, 9) else "biased")
        assert rel(other["seli"], parts["seli"]) > 1e-4


def spread(X):
    """The RMS dimension spread √(mean_j var_j) the scale-free defaults divide by."""
    return np.sqrt(np.var(X.astype(np.float64), axis=0).mean())


def test_hscore_and_transrate_match_naive(small):
    assert rel(B.hscore(*small), naive_hscore(*small)) < 1e-9
    assert rel(B.transrate(*small, compat=True), naive_transrate(*small)) < 1e-10
    X, y = synth(N=90, D=120, C=3, seed=6)                       # classes with n_c < D
    assert rel(B.transrate(X, y, compat=True), naive_transrate(X, y)) < 1e-10
    assert B.transrate_published(X, y) == B.transrate(X, y, compat=True)
    for X, y in (small, (X, y)):                                 # default: unit RMS spread first
        assert rel(B.transrate(X, y), naive_transrate(X / spread(X), y)) < 1e-10


@needs_sklearn
def test_reg_hscore_matches_sklearn_ledoit_wolf(small):
    from sklearn.covariance import LedoitWolf
    X, y = small
    f = X.astype(np.float64)
    f = f - f.mean(axis=0, keepdims=True)
    lw = LedoitWolf(assume_centered=False).fit(f)
    g = np.zeros_like(f)
    for c in range(int(y.max()) + 1):
        g[y == c] = f[y == c].mean(axis=0)
    expected = np.trace(np.linalg.pinv(lw.covariance_, rcond=1e-15)
                        @ ((1 - lw.shrinkage_) * np.cov(g, rowvar=False)))
    assert rel(B.reg_hscore(X, y), expected) < 1e-9


@pytest.mark.parametrize("options", [{}, {"gaussian_type": "diagonal", "ddof": 1},
                                     {"pca_dim": None}])
def test_gbc_matches_naive(small, options):
    naive = naive_gbc(*small, pca_dim=options.get("pca_dim", 64), ddof=options.get("ddof", 0),
                      spherical=options.get("gaussian_type", "spherical") == "spherical")
    assert rel(B.gbc(*small, compat=True, **options), naive) < 1e-10
    X, y = small
    Xs = X.astype(np.float64) / spread(X)                        # default: clamp relative to s²
    naive = naive_gbc(Xs, y, pca_dim=options.get("pca_dim", 64), ddof=options.get("ddof", 0),
                      spherical=options.get("gaussian_type", "spherical") == "spherical")
    assert rel(B.gbc(X.astype(np.float64) * 1e-3, y, **options), naive) < 1e-10


def test_parc_matches_corrcoef_and_spearmanr():
    X, y = synth(N=300, D=40, C=4, seed=3)
    assert rel(B.parc(X, y), naive_parc(X, y)) < 1e-9
    # duplicated rows give tied RDM values; values equal in exact arithmetic may differ in the
    # last bit between one np.corrcoef product and our row blocks, which moves a few ranks
    Xd = np.repeat(X[:100], 2, axis=0)
    yd = np.repeat(y[:100], 2)
    assert rel(B.parc(Xd, yd), naive_parc(Xd, yd)) < 1e-7


def test_rank_correlation_with_ties_matches_scipy():
    """PARC's Spearman step on heavily tied values: average ranks and the tie correction."""
    rng = np.random.default_rng(0)
    v = rng.integers(0, 20, 5000).astype(np.float64)
    same = rng.random(5000) < 0.2
    expected = scipy.stats.spearmanr(v, ~same)[0]
    assert B._spearman_binary(v.copy(), v[same]) == pytest.approx(expected, rel=1e-12)


def test_leep_and_nce_match_naive(small):
    _, y = small
    P = source_probs(y % 6)
    assert rel(B.leep(P, y), naive_leep(P, y)) < 1e-12
    assert rel(B.leep(P, y, log=False), naive_leep(P, y, log=False)) < 1e-12
    assert rel(B.leep(np.log(P) + 3.0, y, from_logits=True), naive_leep(P, y)) < 1e-12
    z = np.argmax(P, axis=1)
    assert rel(B.nce(z, y), naive_nce(z, y)) < 1e-12
    assert B.nce(z, y) == B.nce(P, y)


def test_sa_gate_and_attract(ref, small):
    X, y = ref
    parts = B.sa_parts(X, y)                                      # gate off on §5's data
    assert parts["applied"] is False
    assert parts["score"] == B.etran_parts(X, y)["lda"]
    Xs, ys = small
    Xs = Xs * 8.0                                                 # large variance: gate on
    parts = B.sa_parts(Xs, ys)
    assert parts["applied"] is True
    assert rel(parts["score"], naive_sa_lda(Xs, ys)) < 1e-10
    assert B.sa_parts(Xs, ys, compat=False)["score"] != parts["score"]


@needs_sklearn
def test_nleep_matches_sklearn_pipeline():
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture
    X, y = synth(N=400, D=20, C=4, sep=1.0, seed=7)
    Z = PCA(n_components=0.8, svd_solver="full").fit_transform(X.astype(np.float64))
    post = GaussianMixture(n_components=20, random_state=123).fit(Z).predict_proba(Z)
    assert rel(B.nleep(X, y, compat=True), naive_leep(post, y)) < 1e-6
    assert rel(B.nleep(X, y, log=False, compat=True), naive_leep(post, y, log=False)) < 1e-6
    Z = Z / spread(X)                                            # default: unit RMS spread first
    post = GaussianMixture(n_components=20, random_state=123).fit(Z).predict_proba(Z)
    assert rel(B.nleep(X, y), naive_leep(post, y)) < 1e-6


def test_exact_pca_helper_matches_svd(small):
    X, _ = small
    Z, var = B._pca(X, 10)
    Zr, var_r = exact_pca(X, 10)
    assert np.abs(Z - Zr).max() < 1e-9 and np.abs(var - var_r).max() < 1e-9
    Xw, _ = synth(N=30, D=80, C=3, seed=1)                        # N < D: the N×N route
    assert np.abs(B._pca(Xw, 10)[0] - exact_pca(Xw, 10)[0]).max() < 1e-9


# ============================================================================ real features (flowers17)

def load_flowers(feature_files, reference_file):
    """(arrays, labels, published): float16 feature sets of flowers17 (N = 680, D = 64..1280) from one or
    more .npz files of the same rows, their labels, and the published codes' outputs on exactly these
    models (the reference file names the repository commit of each)."""
    arrays, labels = {}, None
    for path in feature_files:
        with np.load(path) as npz:
            part = {k: npz[k] for k in npz.files}
        part_labels = part.pop("labels")
        assert labels is None or np.array_equal(part_labels, labels), path
        assert not set(part) & set(arrays), path
        labels = part_labels
        arrays.update(part)
    published = json.loads(Path(reference_file).read_text(encoding="utf-8"))["models"]
    assert set(published) == set(arrays)
    return arrays, labels, published


@pytest.fixture(scope="module")
def flowers():
    """11 of flowers17's 21 models (bench/test_full_benchmark.py runs these tests on all 21): D = 64 to
    1280, N > D and N <= D, vww_mnv1_025_96 (rank 22) and mnv2_in1k_slim_q among them."""
    return load_flowers(FLOWERS, FLOWERS_REFERENCE)


PUBLISHED = {      # reference entry -> the compat mode of ours that reproduces it
    "logme_fixed_point": B.logme_published,
    "logme_icml": B.logme_icml,
    "sfda": B.sfda,
    "etran_lda": lambda X, y: B.etran_parts(X, y)["lda"],
    "etran_energy": lambda X, y: B.etran_energy(X, percent=0.5, tail="bot"),
}


@pytest.mark.parametrize("key", sorted(PUBLISHED))
def test_published_codes_on_real_features(flowers, key):
    """≤ 1e-8 relative on every model, vww_mnv1_025_96 (234 of 256 columns zero) included."""
    arrays, y, published = flowers
    errors = {m: rel(PUBLISHED[key](X, y), published[m][key]) for m, X in arrays.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-8, (worst, errors[worst])


def test_logme_default_on_real_features(flowers):
    """The default equals the published fixed point where that one is right (N > D), to its
    convergence (≤ 2.5e-4 measured); for N ≤ D it restores the dropped (D − k)/2 · log α,
    which moves a score by 0.6 (D = 768) to 4.2 (D = 1280) here."""
    arrays, y, published = flowers
    for m, X in arrays.items():
        ours, theirs = B.logme(X, y), published[m]["logme_fixed_point"]
        if X.shape[0] > X.shape[1]:
            assert rel(ours, theirs) < 3e-4, m
        else:
            assert 0.5 < theirs - ours < 4.3, m
    # one model on which the fixed point, run to convergence, stops at a lower local maximum
    X = arrays["mnv2_in1k_slim_q"]
    assert rel(B.logme(X, y), naive_logme_evidence(X, y)) < 1e-9
    assert B.logme(X, y) - naive_logme(X, y, converge=True) > 0.04


# where the published PCA is exact: the five CIFAR ResNets (D = 64) and vww (rank 22)
NCTI_EXACT = {"c10_resnet20", "c10_resnet32", "c10_resnet44", "c10_resnet56", "c10_resnet8_tiny",
              "vww_mnv1_025_96"}


@needs_sklearn
def test_ncti_parts_on_real_features(flowers):
    """Equal where the published PCA (scikit-learn's 'auto', unseeded) is exact: N ≥ 10·D, or
    rank < 64 so that its randomised solver spans the whole range. Elsewhere that solver is
    approximate and not reproducible: ≤ 3e-3 with scikit-learn 1.9's covariance convention,
    which the reference values were made with."""
    arrays, y, published = flowers
    exact = set()
    for m, X in arrays.items():
        N, D = X.shape
        is_exact = 10 * D <= N or np.linalg.matrix_rank(X.astype(np.float64)) < 64
        parts = B.ncti_parts(X, y, svd_covariance="biased")
        err = max(rel(parts[k], v) for k, v in zip(("seli", "ncc", "vc"), published[m]["ncti_parts"]))
        assert err <= (1e-8 if is_exact else 3e-3), (m, err)
        if is_exact:
            exact.add(m)
    assert exact == NCTI_EXACT & set(arrays)     # those of the six here
    assert len(exact) < len(arrays)              # the approximate case is checked too


SCALE_INVARIANT = {
    "logme": B.logme, "hscore": B.hscore, "reg_hscore": B.reg_hscore, "parc": B.parc,
    "transrate": B.transrate, "gbc": B.gbc, "nleep": B.nleep,
}
SCALE_MODELS = ("c10_resnet20", "mnv1_025_in1k_q", "tv_mnv2_in1k", "vww_mnv1_025_96")


@pytest.mark.parametrize("name", sorted(SCALE_INVARIANT))
def test_scale_invariance_on_real_features(flowers, name):
    """Features × 1e-4 and × 1e4 score as × 1 to 1e-9 relative (measured ≤ 3e-11; the worst
    is LogME on mnv2_in1k_slim_q). Models: D = 64, 256, 1280 (N < D) and a rank-22 one."""
    if name == "nleep" and not HAVE_SKLEARN:
        pytest.skip("nleep needs scikit-learn")
    arrays, y, _ = flowers
    f = SCALE_INVARIANT[name]
    for m in SCALE_MODELS:
        X = arrays[m].astype(np.float64)                # float16 would overflow at × 1e4
        base = f(X, y)
        for scale in (1e-4, 1e4):
            assert rel(f(X * scale, y), base) < 1e-9, (m, scale)


def test_published_absolute_epsilons_are_not_scale_invariant(flowers):
    """Why the defaults differ: the published codes' absolute constants at × 1e±4."""
    arrays, y, _ = flowers
    X = arrays["c10_resnet20"].astype(np.float64)
    assert B.logme_published(X * 1e4, y) < 0 < B.logme_published(X, y)         # 1e-5 dominates
    assert B.transrate_published(X * 1e-4, y) < 1e-6 < B.transrate_published(X, y)
    assert B.gbc(X * 1e-4, y, compat=True) == pytest.approx(-17 * 16, rel=1e-3)  # all clamped
    if HAVE_SKLEARN:                                                             # chance: −ln C
        assert B.nleep(X * 1e-4, y, compat=True) == pytest.approx(-np.log(17), rel=1e-6)
    for key in ("logme", "transrate", "gbc"):                                    # the defaults
        assert B.METHODS[key](X * 1e4, y) == pytest.approx(B.METHODS[key](X, y), rel=1e-9)


def test_display_names_name_every_method_and_variant():
    assert list(B.DISPLAY_NAMES) == list(B.METHODS)
    assert B.DISPLAY_NAMES["logme"] == "LogME (evidence maximum, corrected for N ≤ D)"
    assert B.DISPLAY_NAMES["logme_published"] == "LogME (published fixed point)"
    assert len(set(B.DISPLAY_NAMES.values())) == len(B.DISPLAY_NAMES)
    for key, func in B.METHODS.items():                 # each key is also a function of that name
        assert getattr(B, key) is func


# ============================================================================ pools

def test_combine_matches_published_normalisation(small):
    X, y = small
    pool = {"a": X, "b": X[:, :24], "c": np.sqrt(X)}
    parts = {m: B.etran_parts(F, y) for m, F in pool.items()}
    e = np.array([parts[m]["energy"] for m in pool])
    lda = np.array([parts[m]["lda"] for m in pool])
    mm = lambda v: (v - v.min()) / (v.max() - v.min())     # noqa: E731
    expected = 0.15 * mm(e) + 0.85 * mm(lda)
    assert np.allclose([B.combine("etran", parts)[m] for m in pool], expected, rtol=0, atol=1e-15)
    nparts = {m: B.ncti_parts(F, y) for m, F in pool.items()}
    col = lambda k: np.array([nparts[m][k] for m in pool])  # noqa: E731
    expected = mm(col("ncc")) + mm(col("seli")) - mm(col("vc"))
    assert np.allclose(list(B.combine("ncti", nparts).values()), expected, atol=1e-15)
    assert B.combine("sa", {m: B.sa_parts(F, y, base="ncti") for m, F in pool.items()}) \
        == pytest.approx(B.combine("ncti", nparts))
    assert B.combine("etran", {"only": parts["a"]}) == {"only": 0.0}
    assert B.etran(X, y) == pytest.approx(0.15 * parts["a"]["energy"] + 0.85 * parts["a"]["lda"])


def test_combine_rejects_bad_parts(small):
    with pytest.raises(ValueError, match="unknown pool-relative method"):
        B.combine("logme", {"a": {"score": 1.0}})
    with pytest.raises(ValueError, match="lack 'lda'"):
        B.combine("etran", {"a": {"energy": 1.0}})
    with pytest.raises(ValueError, match="at least one model"):
        B.combine("ncti", {})


# ============================================================================ invariances

PED_REFERENCE = synth(N=300, D=48, C=3, seed=9)[0]
INVARIANT = {
    "logme": B.logme, "logme_icml": lambda X, y: B.logme(X, y, variant="icml"),
    "sfda": B.sfda, "etran": B.etran, "ncti": B.ncti, "transrate": B.transrate,
    "hscore": B.hscore, "reg_hscore": B.reg_hscore, "gbc": B.gbc, "parc": B.parc,
    "ped": lambda X, y: B.ped(X, y, reference_features=PED_REFERENCE), "sa": B.sa,
}


@pytest.mark.parametrize("name", sorted(INVARIANT))
def test_sample_permutation_and_relabelling_invariance(small, name):
    X, y = small
    f = INVARIANT[name]
    base = f(X, y)
    perm = np.random.default_rng(1).permutation(len(y))
    assert f(X[perm], y[perm]) == pytest.approx(base, rel=1e-9, abs=1e-12)
    relabel = np.array([3, 5, 0, 1, 4, 2])[y]                     # permuted class ids
    assert f(X, relabel) == pytest.approx(base, rel=1e-9, abs=1e-12)
    names = np.array(["cat", "dog", "emu", "fox", "gnu", "hen"])[y]   # string labels
    assert f(X, names) == pytest.approx(base, rel=1e-9, abs=1e-12)
    assert f(X.astype(np.float64), y + 10) == pytest.approx(base, rel=1e-12, abs=1e-12)


def test_probability_methods_invariances(small):
    _, y = small
    P = source_probs(y % 6)
    perm = np.random.default_rng(2).permutation(len(y))
    for f in (B.leep, B.nce):
        assert f(P[perm], y[perm]) == pytest.approx(f(P, y), rel=1e-12)
        assert f(P, y.astype(str)) == pytest.approx(f(P, y), rel=1e-12)


def test_inputs_are_not_modified(small):
    X, y = small
    Xc, yc = X.copy(), y.copy()
    for f in (B.sfda, B.sa, B.parc, B.logme):
        f(X, y)
    B.ped(X, y, reference_features=PED_REFERENCE)
    assert np.array_equal(X, Xc) and np.array_equal(y, yc)


# ============================================================================ blocks and threads

BLOCKED = {
    "logme": B.logme, "sfda": B.sfda, "etran": B.etran, "transrate": B.transrate,
    "reg_hscore": B.reg_hscore, "gbc": lambda X, y: B.gbc(X, y, pca_dim=None),
    "ped": lambda X, y: B.ped(X, y, reference_features=PED_REFERENCE),
}


def test_row_blocks_on_threads_give_the_same_scores(small, monkeypatch):
    """Many 64-row blocks spread over the worker threads: same values as one block."""
    X, y = small
    expected = {name: f(X, y) for name, f in BLOCKED.items()}
    monkeypatch.setattr(B, "_BLOCK_VALUES", 1)
    assert len(B._row_blocks(*X.shape)) == 10
    for name, f in BLOCKED.items():
        assert f(X, y) == pytest.approx(expected[name], rel=1e-12, abs=1e-14), name


def test_large_float32_pca_uses_float32_products(small, monkeypatch):
    """Above the size threshold float32 input gets float32 Gram products, as scikit-learn's
    PCA keeps float32: the leading components, hence NCTI, move by far less than 1e-5."""
    X, y = small
    exact = B.ncti_parts(X, y)
    monkeypatch.setattr(B, "_LARGE_GRAM", 0)
    fast = B.ncti_parts(X, y)
    assert fast != exact
    for key in exact:
        assert fast[key] == pytest.approx(exact[key], rel=1e-5)
    assert B.ncti_parts(X.astype(np.float64), y) == pytest.approx(exact, rel=1e-12)


# ============================================================================ subsampling caps

def test_stratified_subsample_is_seeded_and_proportional():
    y = np.repeat(np.arange(4), [500, 300, 150, 50])
    idx = B._stratified_subsample(y, 4, 200, seed=0)
    assert len(idx) == 200 and len(np.unique(idx)) == 200
    assert np.array_equal(np.bincount(y[idx]), [100, 60, 30, 10])
    assert np.array_equal(idx, B._stratified_subsample(y, 4, 200, seed=0))
    assert not np.array_equal(idx, B._stratified_subsample(y, 4, 200, seed=1))


def test_parc_cap_scores_the_subsample():
    X, y = synth(N=500, D=40, C=4, seed=3)
    capped = B.parc(X, y, max_samples=200, seed=5)
    idx = B._stratified_subsample(y, 4, 200, 5)
    assert capped == B.parc(X[idx], y[idx], max_samples=None)
    assert capped == B.parc(X, y, max_samples=200, seed=5)


# ============================================================================ numba / NumPy paths

def test_numpy_and_numba_paths_agree(ref):
    X, _ = ref
    lse = B._logsumexp_rows_numpy(X)
    assert np.abs(lse - naive_energy_all(X)).max() < 1e-12
    if B.HAVE_NUMBA:
        assert np.abs(B._logsumexp_rows_numba(X) - lse).max() < 1e-12


def test_itm_no_numba_gives_the_same_scores(tmp_path, ref):
    X, y = ref
    np.savez(tmp_path / "f.npz", m=X[:500], labels=y[:500])
    code = ("import json, numpy as np, baselines as B; d = np.load(r'%s'); "
            "print(json.dumps([B.HAVE_NUMBA, B.etran_energy(d['m']), B.sfda(d['m'], d['labels'])]))"
            % (tmp_path / "f.npz"))
    env = dict(os.environ, ITM_NO_NUMBA="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(B.__file__), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    have, energy, score = json.loads(out.stdout)
    assert have is False
    assert energy == pytest.approx(B.etran_energy(X[:500]), rel=1e-13)
    assert score == pytest.approx(B.sfda(X[:500], y[:500]), rel=1e-13)


# ============================================================================ bad input

ALL_FEATURE_METHODS = sorted(set(B.METHODS) - {"leep", "nce", "nleep"})


@pytest.mark.parametrize("name", ALL_FEATURE_METHODS)
def test_bad_input_raises_clear_value_errors(name):
    f = B.METHODS[name]
    X, y = synth(N=60, D=8, C=3, seed=0)
    with pytest.raises(ValueError, match="N mismatch"):
        f(X, y[:-1])
    bad = X.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN/Inf"):
        f(bad, y)
    bad[3, 2] = np.inf
    with pytest.raises(ValueError, match="NaN/Inf"):
        f(bad, y)
    with pytest.raises(ValueError, match="at least 2 classes"):
        f(X, np.zeros(len(y), int))
    with pytest.raises(ValueError, match="2-D"):
        f(X[:, 0], y)
    with pytest.raises(ValueError, match="2-D"):
        f(X[None], y)
    with pytest.raises(ValueError, match="non-integer"):
        f(X, y + 0.5)
    with pytest.raises(ValueError, match="numeric"):
        f(X.astype(str), y)
    with pytest.raises(ValueError, match=r"^features are constant \(all zero\)"):
        f(np.zeros_like(X), y)
    with pytest.raises(ValueError, match="constant"):
        f(np.ones_like(X) * 3.0, y)


def test_bad_input_specific_messages():
    X, y = synth(N=60, D=8, C=3, seed=0)
    with pytest.raises(ValueError, match="probabilities"):
        B.leep(X, y)
    with pytest.raises(ValueError, match="N mismatch"):
        B.leep(source_probs(y)[:-1], y)
    with pytest.raises(ValueError, match="N mismatch"):
        B.nce(np.zeros(59, int), y)
    with pytest.raises(ValueError, match="reference_features have 5 dims"):
        B.ped(X, y, reference_features=X[:, :5])
    with pytest.raises(ValueError, match="variant"):
        B.logme(X, y, variant="exact")
    with pytest.raises(ValueError, match="gaussian_type"):
        B.gbc(X, y, gaussian_type="full")
    with pytest.raises(ValueError, match="base must be one of"):
        B.sa(X, y, base="parc")
    with pytest.raises(ValueError, match="labels are empty"):
        B.encode_labels([])
    with pytest.raises(ValueError, match="NaN"):
        B.encode_labels([0.0, np.nan])
    y_enc, classes = B.encode_labels(np.array([2.0, 7.0, 2.0]))
    assert y_enc.tolist() == [0, 1, 0] and classes.tolist() == [2, 7]


# ============================================================================ pools on executors

@pytest.fixture(scope="module")
def pool():
    """Five small models, one of them all zero and one with a NaN: bad input in a pool."""
    y = synth(N=300, D=16, C=3, seed=12)[1]
    models = {f"m{i}": synth(N=300, D=16, C=3, sep=0.3 * (i + 1), seed=12 + i)[0] for i in range(3)}
    models["zero"] = np.zeros((300, 16), np.float32)
    models["nan"] = models["m0"].copy()
    models["nan"][5, 3] = np.nan
    return models, y


POOL = ["logme", "logme_published", "sfda", "etran", "ncti", "transrate", "gbc"]


def test_score_pool_scores_good_models_and_names_the_bad_ones(pool):
    models, y = pool
    result = B.score_pool(models, y, POOL)
    assert list(result["scores"]) == POOL
    good = {m: F for m, F in models.items() if m.startswith("m")}
    for method in POOL:
        assert list(result["scores"][method]) == list(models)
        assert result["scores"][method]["zero"] is None and result["scores"][method]["nan"] is None
        assert result["errors"][method]["zero"].startswith("features are constant (all zero)")
        assert "NaN/Inf" in result["errors"][method]["nan"]
        assert set(result["errors"][method]) == {"zero", "nan"}
    for m, F in good.items():
        assert result["scores"]["logme"][m] == B.logme(F, y)
        assert result["scores"]["sfda"][m] == B.sfda(F, y)
    # pool-relative methods are normalised over the models whose parts succeeded
    parts = {m: B.etran_parts(F, y) for m, F in good.items()}
    assert {m: result["scores"]["etran"][m] for m in good} == B.combine("etran", parts)


def test_score_pool_reports_progress_and_rejects_unknown_methods(pool):
    models, y = pool
    seen = []
    B.score_pool(models, y, ["logme", "etran"], progress=lambda *a: seen.append(a))
    assert [s[:4] for s in seen] == [(i + 1, 10, method, m) for i, (method, m) in
                                     enumerate((k, m) for k in ("logme", "etran") for m in models)]
    assert isinstance(seen[5][4]["value"], dict) and seen[3][4]["error"].startswith("features are")
    with pytest.raises(ValueError, match="unknown method 'bogus'"):
        B.score_pool(models, y, ["logme", "bogus"])
    with pytest.raises(ValueError, match="non-empty"):
        B.score_pool({}, y, ["logme"])


def _boom(features, labels):
    raise RuntimeError("boom")


def test_score_pool_turns_a_raising_task_into_its_cell(pool, monkeypatch):
    models, y = pool
    monkeypatch.setitem(B.METHODS, "hscore", _boom)
    result = B.score_pool({"m0": models["m0"]}, y, ["hscore", "logme"])
    assert result["scores"]["hscore"] == {"m0": None}
    assert result["errors"]["hscore"] == {"m0": "RuntimeError: boom"}
    assert result["scores"]["logme"]["m0"] == B.logme(models["m0"], y)


@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_score_pool_on_executors_equals_the_serial_run(pool, kind):
    """Same values, same order, same errors, whatever finishes first; PED's warning from a
    worker process reaches the caller."""
    models, y = pool
    methods = POOL + ["ped"]
    with pytest.warns(UserWarning, match="standardising with the target features"):
        serial = B.score_pool(models, y, methods)
    if kind == "threads":
        executor = ThreadPoolExecutor(2)
    else:       # spawn: no fork of a process whose BLAS threads are running
        executor = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))
    order = []
    with executor, pytest.warns(UserWarning, match="standardising with the target features"):
        parallel = B.score_pool(models, y, methods, executor=executor,
                                progress=lambda done, total, method, model, out:
                                order.append((method, model)))
    assert parallel == serial
    assert json.dumps(parallel) == json.dumps(serial)            # key order included
    assert sorted(order) == sorted((k, m) for k in methods for m in models)


def test_blas_limit_is_restored_after_concurrent_use(pool):
    import threadpoolctl      # a hard dependency (setup.cfg install_requires): no skip hides its absence
    before = [i["num_threads"] for i in threadpoolctl.threadpool_info()]
    models, y = pool
    with ThreadPoolExecutor(4) as executor:
        B.score_pool(models, y, ["logme", "sfda", "hscore"], executor=executor)
    assert [i["num_threads"] for i in threadpoolctl.threadpool_info()] == before


# ============================================================================ command line

@pytest.fixture
def feature_file(tmp_path):
    X, y = synth(N=400, D=24, C=4, seed=11)
    path = tmp_path / "feats.npz"
    np.savez(path, alpha=X, beta=np.sqrt(X), labels=y)
    np.save(tmp_path / "labels.npy", np.array(["a", "b", "c", "d"])[y])
    return path, X, y


def test_cli_table_and_json(feature_file, capsys):
    path, X, y = feature_file
    assert B.main(["--features", str(path), "--methods", "logme,sfda,etran"]) == 0
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert out[0].split() == ["model", "logme", "sfda", "etran"]
    assert [line.split()[0] for line in out[1:]] == ["alpha", "beta"]
    assert float(out[1].split()[1]) == pytest.approx(B.logme(X, y), rel=1e-5)
    progress = captured.err.splitlines()                 # one line per (method, model)
    assert len(progress) == 6 and progress[0].startswith("[1/6] logme / alpha: ")
    assert B.main(["--features", str(path), "--labels", str(path.parent / "labels.npy"),
                   "--methods", "logme,ncti", "--json", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    data = json.loads(captured.out)
    assert list(data) == ["dataset", "methods", "scores", "errors"]
    assert data["dataset"] == "feats" and data["methods"] == ["logme", "ncti"]
    assert data["errors"] == {"logme": {}, "ncti": {}}
    assert data["scores"]["logme"]["alpha"] == pytest.approx(B.logme(X, y), rel=1e-12)
    parts = {"alpha": B.ncti_parts(X, y), "beta": B.ncti_parts(np.sqrt(X), y)}
    assert data["scores"]["ncti"]["beta"] == pytest.approx(B.combine("ncti", parts)["beta"])


def test_cli_reads_a_folder_and_a_single_npy(feature_file, tmp_path, capsys):
    path, X, y = feature_file
    folder = tmp_path / "pool"
    folder.mkdir()
    np.save(folder / "alpha.npy", X)
    np.save(folder / "beta.npy", np.sqrt(X))
    np.save(folder / "labels.npy", y)
    assert B.main(["--features", str(folder), "--methods", "logme", "--json", "--quiet"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["dataset"] == "pool" and list(data["scores"]["logme"]) == ["alpha", "beta"]
    assert data["scores"]["logme"]["alpha"] == pytest.approx(B.logme(X, y), rel=1e-12)
    assert B.main(["--features", str(folder / "beta.npy"), "--labels", str(folder / "labels.npy"),
                   "--methods", "logme", "--json", "--quiet"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["dataset"] == "beta"
    assert data["scores"]["logme"] == {"beta": pytest.approx(B.logme(np.sqrt(X), y), rel=1e-12)}


def test_cli_bad_model_in_a_pool_is_one_cell(feature_file, tmp_path, capsys):
    _, X, y = feature_file
    path = tmp_path / "bad.npz"
    np.savez(path, good=X, zero=np.zeros_like(X), labels=y)
    assert B.main(["--features", str(path), "--methods", "logme,etran", "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["scores"]["logme"] == {"good": pytest.approx(B.logme(X, y)), "zero": None}
    assert data["scores"]["etran"] == {"good": 0.0, "zero": None}        # a pool of one: 0
    assert data["errors"]["logme"]["zero"].startswith("features are constant (all zero)")
    assert "[3/4] etran / good: parts done" in captured.err
    assert "cells are n/a" in captured.err.splitlines()[-1] and "Traceback" not in captured.err
    assert B.main(["--features", str(path), "--methods", "logme", "--quiet"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2].split()[0] == "zero" and "n/a (features are constant (all zero)" in table[2]


def test_cli_ped_warning_is_one_line(feature_file, capsys):
    path, _, _ = feature_file
    assert B.main(["--features", str(path), "--methods", "ped", "--models", "alpha", "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("baselines.py: warning: ped:")


@pytest.mark.parametrize("args, message", [
    (["--methods", "logme,bogus"], "unknown method 'bogus'"),
    (["--labels", "MISSING.npy"], "labels file not found: MISSING.npy"),
    (["--models", "gamma"], "model(s) not in"),
    (["--reference", "MISSING.npz", "--methods", "ped"], "--reference file not found"),
    (["--reference", "MISSING.npz", "--methods", "logme"], "--reference is for ped"),
    (["--bogus-flag"], "unrecognized arguments"),
    (["--methods", "logme,leep"], "leep needs the source model's class probabilities"),
])
def test_cli_errors_are_one_line(feature_file, capsys, args, message):
    path, _, _ = feature_file
    assert B.main(["--features", str(path)] + args) == 1
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and err.startswith("baselines.py: error:") and message in err
    assert "Traceback" not in err and captured.out == ""
    assert "[1/" not in err                                   # nothing was scored


def test_cli_subprocess_bad_labels_and_closed_stdout(tmp_path):
    X, y = synth(N=50, D=6, C=3, seed=0)
    np.savez(tmp_path / "f.npz", m=X)
    np.save(tmp_path / "y.npy", y[:-1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(B.__file__), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, B.__file__, "--features", str(tmp_path / "f.npz"),
                          "--labels", str(tmp_path / "y.npy"), "--methods", "logme"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "N mismatch: model 'm'" in run.stderr
    run = subprocess.run([sys.executable, B.__file__, "--features", str(tmp_path / "f.npz")],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 1 and "no 'labels' array" in run.stderr
    assert "Traceback" not in run.stderr
    np.savez(tmp_path / "many.npz", labels=y, **{f"m{i}": X + i for i in range(40)})
    run = subprocess.run(f"{sys.executable} {B.__file__} --features {tmp_path / 'many.npz'} "
                         "--methods logme,hscore --quiet | head -2", shell=True,
                         capture_output=True, text=True, env=env)
    assert run.stdout.splitlines()[0].split() == ["model", "logme", "hscore"]
    assert len(run.stdout.splitlines()) == 2 and run.stderr == ""


def test_cli_says_dense_input_is_not_for_baselines(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "dense.npz", labels=rng.integers(0, 3, (10, 8, 8)).astype(np.uint8),
             m=rng.standard_normal((10, 4, 4, 5)).astype(np.float16))
    assert B.main(["--features", str(tmp_path / "dense.npz"), "--methods", "logme"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "itm.py only" in err[0] and "segmentation" in err[0]

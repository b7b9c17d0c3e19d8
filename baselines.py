"""Baseline transferability-estimation (TE) scores: the methods ITM is compared against.

Every public function reproduces what the method's *published reference code* computes (the
formulas are paraphrased in DESIGN.md §6), numerically, on the same inputs, but faster: each
method is one or two passes of large BLAS products over the N×D features plus D×D (or C×C)
linear algebra. float32/float16 input is cast to float64 in row blocks of about 64 MB (never
all at once); the blocks run on one thread per core with single-threaded BLAS, and LAPACK calls
are single-threaded too (threadpoolctl, optional), which on a small busy machine is much faster
than OpenBLAS's own threading. Arithmetic is float64 wherever the reference's is; PCA keeps
large float32 input in float32 products, as scikit-learn's PCA in the references does.

Notation: N samples, D feature dimensions, C target classes, C_s source classes. Every score is
"higher = better" (the orientation the rank correlations of the field assume).

========== ============================================ ===========================================
function   paper                                        reference implementation reproduced
========== ============================================ ===========================================
logme      You et al., ICML'21; JMLR'22 (fixed point)   thuml/LogME ``LogME.py``
leep       Nguyen et al., ICML'20                       thuml/LogME ``LEEP.py``
nce        Tran et al., ICCV'19                         thuml/LogME ``NCE.py``
hscore     Bao et al., ICIP'19                          Transfer-Learning-Library ``hscore.py``
reg_hscore Ibrahim et al., 2022 (regularised H-score)   Transfer-Learning-Library ``hscore.py``
transrate  Huang et al., ICML'22                        Transfer-Learning-Library ``transrate.py``
nleep      Li et al., CVPR'21                           google-research ``stable_transfer`` NLEEP
parc       Bolya et al., NeurIPS'21                     dbolya/parc ``methods.PARC``
gbc        Pándy et al., CVPR'22                        google-research ``stable_transfer`` GBC
sfda       Shao et al., ECCV'22                         TencentARC/SFDA ``metrics.SFDA_Score``
etran      Gholami et al., ICCV'23                      mgholamikn/ETran ``metrics`` + ``tw.py``
ped        Li et al., ICCV'23                           lixiaotong97/PED ``metrics.PED_Score``
ncti       Wang et al., ICCV'23                         BUserName/NCTI ``metrics.NCTI_Score``
sa         Khoba et al., WACV'25                        prafful-kumar/enhancing_TE ``metrics.SA``
========== ============================================ ===========================================

``METHODS`` maps each key to its function and ``DISPLAY_NAMES`` says which variant the key is
(e.g. "LogME (evidence maximum, corrected for N ≤ D)"). Where the published code deviates from
its paper or is wrong, each function documents which behaviour is the default and offers the
other one; checked against the published codes' outputs on real features (flowers17, 21 models):

* ``logme``: the evidence maximum, exactly and scale-invariantly; the published fixed point
  (wrong for N ≤ D, not converged, not scale-invariant) is ``logme_published``
  (``variant="fixed_point"``) and the ICML'21 iteration ``logme_icml``.
* ``transrate``, ``gbc``, ``nleep`` use absolute epsilons (ε = 1e-4, a variance clamp 1e-4, the
  mixture's 1e-6): by default they apply to features scaled to unit RMS dimension spread, so
  the scores are scale-invariant; ``compat=True`` (``transrate_published``) keeps raw features.
* ``leep`` / ``nleep``: log as in the papers by default (``log=False`` = SFDA-family tables).
* ``etran``: identity-covariance LDA as shipped by default (``compat=False`` = shrinkage LDA).
* ``sa``: Spread discarded as shipped by default (``compat=False`` applies it before Attract).
* ``ped``: standardises with ImageNet features of the same model when given
  (``reference_features``); otherwise with the target features, and warns.
* ``parc`` / ``nleep``: seeded, class-stratified subsampling above a documented cap.
* PCA is always exact (eigendecomposition of the smaller Gram matrix, scikit-learn's sign
  convention). The references use scikit-learn's PCA; where that is the randomised solver
  (PARC, SA, and NCTI whenever N < 10·D and D > 64) the reference itself is approximate and,
  for NCTI, unseeded: its published scores are reproducible only to ~1e-2.

Scale: LogME, H-score, the regularised H-score, PARC, and by default TransRate, GBC and NLEEP
give the same score for features × c (any c > 0). SFDA (its shrinkage exp(−5 λ_max)), ETran's
energy, NCTI's shrinkage, SA's gate and PED's std floor depend on the units of the features by
their published definitions, and are kept so.

Degenerate input (NaN/Inf, constant or all-zero features, one class) raises a one-line
ValueError. ``score_pool`` scores a pool of models with several methods, one task per (method,
model) on any ``concurrent.futures.Executor``; a failing cell becomes None with its reason.
Pool-relative methods (ETran, NCTI, and SA on top of NCTI) normalise their parts over the pool:
``score_pool`` does it, or compute ``*_parts(features, labels)`` per model and ``combine``.

Example::

    import numpy as np, baselines
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 3000)
    X = np.maximum(rng.standard_normal((10, 128))[y] + rng.standard_normal((3000, 128)), 0)
    baselines.logme(X, y)                    # one model, one float
    pool = {"a": X, "b": X[:, :64]}
    baselines.score_pool(pool, y, ["logme", "ncti"])   # {"scores": ..., "errors": ...}

Command line (model × method table; ``--json`` for {dataset, methods, scores, errors})::

    python baselines.py --features feats.npz --methods logme,sfda,etran
    python baselines.py --features feats.npz --scheduler local:4     # on a Dask cluster (or --jobs 4)

Dependencies: NumPy; numba (optional, see ``HAVE_NUMBA``); scikit-learn only for ``nleep``
(optional extra ``baselines``), imported when ``nleep`` is called.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np

try:  # installed: a module of the itm_transferability package; in a checkout or vendored: beside itm.py
    from . import itm
except ImportError:
    import itm

PROG = itm.prog_name("baselines.py", "itm-baselines")  # the name in this CLI's messages

numba, HAVE_NUMBA = itm.numba, itm.HAVE_NUMBA  # one numba guard (and ITM_NO_NUMBA), in itm.py

__all__ = [
    "logme", "leep", "nce", "hscore", "reg_hscore", "transrate", "nleep", "parc", "gbc",
    "sfda", "shrinkage_lda_proba", "etran", "etran_parts", "etran_energy", "ped", "ncti",
    "ncti_parts", "sa", "sa_parts", "combine", "encode_labels", "logme_published",
    "logme_icml", "transrate_published", "score_pool", "METHODS", "POOL_METHODS",
    "DISPLAY_NAMES", "TABLE1", "HAVE_NUMBA", "main",
]

_BLOCK_VALUES = 1 << 23     # float64 values per row block: 64 MB, big enough for BLAS to run at speed
_LARGE_GRAM = 2e9           # N·D² above which a problem counts as large (about a second of Gram)
_LOG_2PI = math.log(2.0 * math.pi)


# ============================================================================== input checks

def encode_labels(labels):
    """Map labels to ``0..C-1``: ``(y, classes)`` with ``classes[y] == labels`` (itm.encode_labels, the
    project's one label check, without ITM's two classes and two samples a class)."""
    return itm.encode_labels(labels, min_count=1, min_classes=1)


def _check_features(features, name="features"):
    """N×D float32/float64 array (itm.check_features; float16, ints and bools are upcast)."""
    X = itm.check_features(features, what=name)
    if X.dtype in (np.float32, np.float64):
        return X
    return X.astype(np.float32 if X.dtype.kind in "fb" else np.float64)


def _check_inputs(features, labels, name="features"):
    """Validated ``(X, y, C)``: features N×D, not constant, labels 0..C-1 of length N, C >= 2."""
    X = _check_features(features, name)
    if np.array_equal(X.max(axis=0), X.min(axis=0)):
        what = "all zero" if not X[0].any() else "every dimension takes a single value"
        raise ValueError(f"{name} are constant ({what}): nothing to rank by")
    return (X, *_labels_for(labels, X.shape[0], name))


def _labels_for(labels, N, what):
    """``(y, C)`` of labels for the N rows of ``what``: one label per row, C >= 2 classes."""
    y, classes = itm.encode_labels(labels, N, min_count=1, what=what)
    return y, len(classes)


# ============================================================================== shared numerics

def _row_blocks(N, D):
    """(start, stop) row ranges of about ``_BLOCK_VALUES`` float64 values each."""
    step = int(max(64, min(N, _BLOCK_VALUES // max(D, 1))))
    return [(s, min(s + step, N)) for s in range(0, N, step)]


def _blocks(X, center=None, ranges=None):
    """Yield ``(s, e, xb)``: float64 copies of ``X[s:e] - center`` in one reused buffer."""
    N, D = X.shape
    ranges = _row_blocks(N, D) if ranges is None else ranges
    buf = np.empty((max(e - s for s, e in ranges), D))
    for s, e in ranges:
        xb = buf[: e - s]
        if center is None:
            xb[...] = X[s:e]
        else:
            np.subtract(X[s:e], center, out=xb)     # cast and centre in one pass
        yield s, e, xb


def _map_blocks(X, center, work, init=dict):
    """Run ``work(acc, s, e, xb)`` over the row blocks of X on one thread per core.

    Each thread owns an accumulator ``acc = init()`` (also its scratch space) and a fixed set
    of blocks (k, k + W, ...), so sums are deterministic; BLAS runs single-threaded inside.
    Independent blocks share a busy 2-core machine far better than OpenBLAS's own threads,
    whose spin-waiting barriers stall whenever another process takes a core.
    Returns the W accumulators.
    """
    ranges = _row_blocks(*X.shape)
    W = max(1, min(os.cpu_count() or 1, len(ranges), 8))

    def run(k):
        acc = init()
        for s, e, xb in _blocks(X, center, ranges[k::W]):
            work(acc, s, e, xb)
        return acc

    if W == 1:
        return [run(0)]
    with _one_blas_thread(), ThreadPoolExecutor(W) as pool:
        return list(pool.map(run, range(W)))


def _onehot(y, C, values=1.0):
    out = np.zeros((len(y), C))
    out[np.arange(len(y)), y] = values
    return out


def _add_class_rows(xb, yb, M, scale, acc):
    """xb += scale_i · M[y_i] in place, as a (N_b×C)(C×D) product into ``acc``'s scratch
    buffer: no N_b×D gather or allocation per block."""
    if acc.get("rows") is None or acc["rows"].shape[0] < len(yb):
        acc["rows"] = np.empty_like(xb)
    xb += np.matmul(_onehot(yb, len(M), scale), M, out=acc["rows"][: len(yb)])


def _scatter(X, y, C, center, transform=None, single=False):
    """One pass: Gram ``G = Σ (x−c)(x−c)ᵀ`` (D×D) and class sums ``S_k = Σ_{y=k} (x−c)`` (C×D).

    ``y=None`` skips the class sums. ``transform(xb, s, e, acc)`` may rewrite the centred
    float64 block in place first (ConfMix). ``single=True`` forms each block's product in
    float32 (accumulated in float64), for inputs the reference keeps in float32.
    """
    D = X.shape[1]
    dtype = np.float32 if single else np.float64

    def init():
        return {"G": np.zeros((D, D)), "P": np.empty((D, D), dtype),
                "S": None if y is None else np.zeros((C, D))}

    def work(acc, s, e, xb):
        if transform is not None:
            transform(xb, s, e, acc)
        xp = xb
        if single:
            if acc.get("x32") is None or acc["x32"].shape[0] < e - s:
                acc["x32"] = np.empty(xb.shape, np.float32)
            xp = acc["x32"][: e - s]
            xp[...] = xb
        np.matmul(xp.T, xp, out=acc["P"])          # D×D, BLAS syrk: the dominant N·D² term
        acc["G"] += acc["P"]
        if y is not None:
            acc["S"] += _onehot(y[s:e], C).T @ xb  # C×D

    accs = _map_blocks(X, center, work, init)
    G = functools.reduce(np.add, [a["G"] for a in accs])
    S = None if y is None else functools.reduce(np.add, [a["S"] for a in accs])
    return G, S


class _Scatter:
    """Means and (biased, /N) scatter matrices of the rows, relative to a centre c.

    ``Mc`` holds class means − c (C×D), ``m`` the global mean − c, ``St`` the total and ``Sw``
    the pooled within-class covariance Σ_k π_k cov_k. Any c works; c ≈ mean avoids cancellation.
    """

    def __init__(self, X, y, C, center=None, transform=None):
        N = len(y)
        self.center = X.mean(axis=0, dtype=np.float64) if center is None else center
        G, S = _scatter(X, y, C, self.center, transform)
        self.counts = np.bincount(y, minlength=C).astype(np.float64)
        self.priors = self.counts / N
        self.Mc = S / self.counts[:, None]
        self.m = S.sum(axis=0) / N
        self.St = _sym(G / N - np.outer(self.m, self.m))
        self.Sw = _sym((G - self.Mc.T @ (self.counts[:, None] * self.Mc)) / N)  # D×D = (D×C)(C×D)


def _sym(A):
    return (A + A.T) / 2.0


_one_blas_thread = itm.one_blas_thread  # one process-wide BLAS limiter for every module


def _threads_by_size(func):
    """Run a method with one BLAS thread unless its Gram work N·D² exceeds 2·10⁹ flops.

    On small problems a second OpenBLAS thread costs more in start-up and, on a busy machine,
    in waiting than it gains (measured 10-20x on N=3000, D=128).
    """
    @functools.wraps(func)
    def wrapper(features, *args, **kwargs):
        shape = np.shape(features)
        small = len(shape) != 2 or shape[0] * shape[1] ** 2 < _LARGE_GRAM
        with _one_blas_thread() if small else contextlib.nullcontext():
            return func(features, *args, **kwargs)
    return wrapper


def _eigh_desc(A):
    """Eigenvalues (descending) and eigenvectors of a symmetric matrix."""
    with _one_blas_thread():
        lam, V = np.linalg.eigh(A)
    return lam[::-1], V[:, ::-1]


def _svdvals(A):
    with _one_blas_thread():
        return np.linalg.svd(A, compute_uv=False)


def _softmax(Z):
    """Row softmax, in place on a float64 array (the reference's max-shifted form)."""
    Z -= Z.max(axis=1, keepdims=True)
    np.exp(Z, out=Z)
    Z /= Z.sum(axis=1, keepdims=True)
    return Z


def _pca_fit(X, single=None):
    """Exact PCA of the rows: (centre, variances (ddof 1, desc), axes D×r), r = min(N, D).

    Uses the D×D covariance when D <= N, else the N×N Gram of the centred rows. Axes follow
    scikit-learn's ``svd_flip`` convention (largest-magnitude loading positive). scikit-learn's
    PCA, which the references call, keeps float32 input in float32: for large float32 input
    (N·D² > 2·10⁹) the covariance is likewise formed from float32 products, in float64 sums
    (``single`` forces either choice).
    """
    N, D = X.shape
    c = X.mean(axis=0, dtype=np.float64)
    if single is None:
        single = X.dtype == np.float32 and N * D * D > _LARGE_GRAM
    if D <= N:
        G, _ = _scatter(X, None, 0, c, single=single)
        lam, V = _eigh_desc(_sym(G) / max(N - 1, 1))
    else:
        Xc = X.astype(np.float64) - c
        lam, U = _eigh_desc(_sym(Xc @ Xc.T) / max(N - 1, 1))   # N×N
        scale = np.sqrt(np.maximum(lam, 0.0) * max(N - 1, 1))
        V = (Xc.T @ U) / np.where(scale > 0, scale, 1.0)       # D×N axes
    lam = np.maximum(lam, 0.0)
    rows = np.argmax(np.abs(V), axis=0)
    V = V * np.where(V[rows, np.arange(V.shape[1])] < 0, -1.0, 1.0)
    return c, lam, V


def _pca(X, k):
    """Scores (N×k float64) and variances of the top-k principal axes, k <= min(N, D)."""
    c, lam, V = _pca_fit(X)
    k = int(min(k, V.shape[1]))
    return _project(X, c, V[:, :k]), lam[:k]


def _project(X, center, V):
    """(X − center) V in float64, N×k."""
    Z = np.empty((X.shape[0], V.shape[1]))

    def work(acc, s, e, xb):
        np.matmul(xb, V, out=Z[s:e])  # N_b×k = (N_b×D)(D×k)

    _map_blocks(X, center, work)
    return Z


def _stratified_subsample(y, C, n_max, seed):
    """Indices of a seeded class-stratified subsample of size n_max (largest remainders)."""
    counts = np.bincount(y, minlength=C)
    want = counts * (n_max / len(y))
    take = np.floor(want).astype(np.int64)
    rest = n_max - take.sum()
    take[np.argsort(-(want - take), kind="stable")[:rest]] += 1
    rng = np.random.default_rng(seed)
    idx = [rng.permutation(np.flatnonzero(y == k))[: take[k]] for k in range(C)]
    return np.sort(np.concatenate(idx))


def _class_sums(X, y, C):
    """Σ_{y=k} x (C×D, float64)."""
    def work(acc, s, e, xb):
        acc["S"] = acc.get("S", 0.0) + _onehot(y[s:e], C).T @ xb  # C×D = (C×N_b)(N_b×D)

    return sum(a.get("S", 0.0) for a in _map_blocks(X, None, work)) + np.zeros((C, X.shape[1]))


def _class_means_vars(X, y, C, ddof=0):
    """Class means and per-dimension variances (C×D, float64), two passes for accuracy."""
    counts = np.bincount(y, minlength=C).astype(np.float64)
    M = _class_sums(X, y, C) / counts[:, None]

    def work(acc, s, e, xb):                                  # Σ_{y=k} (x − μ_k)², C×D
        _add_class_rows(xb, y[s:e], M, -1.0, acc)
        np.square(xb, out=xb)
        acc["Q"] = acc.get("Q", 0.0) + _onehot(y[s:e], C).T @ xb  # C×D = (C×N_b)(N_b×D)

    Q = sum(a.get("Q", 0.0) for a in _map_blocks(X, None, work)) + np.zeros_like(M)
    denom = counts - ddof
    var = np.divide(Q, denom[:, None], out=np.zeros_like(Q), where=denom[:, None] > 0)
    return M, var, counts


# ============================================================================== LogME

_LOGME_VARIANTS = ("evidence", "fixed_point", "icml")


def _logme_spectrum(X, y, C, variant):
    """σ (k eigenvalues of XᵀX, desc.) and x = Uᵀ Y (k×C) for the one-hot targets Y.

    N > D, ``variant="fixed_point"``: thuml's ``truncated_svd`` op for op — XᵀX by one
    product, ``np.linalg.svd`` of it, and every value whose square root exceeds 1e-10 kept.
    For rank-deficient features which of the null values pass that cutoff is rounding noise
    of the SVD (vww_mnv1_025_96 on flowers17: all 256 pass, an eigh keeps 45), and each one
    kept changes the published score by log α / 2N, so only this route reproduces it.
    N > D otherwise: eigh of the blocked D×D Gram, with Uᵀy = Vᵀ(Xᵀy)/s from the same pass;
    "icml" keeps √σ > 1e-10 as published, "evidence" drops values below the Gram's rounding
    level σ_max·max(N, D)·ε (their terms vanish from the evidence either way).
    N <= D: eigh of the N×N Gram; all N values kept, except below that level for "evidence".
    """
    N, D = X.shape
    if N > D and variant == "fixed_point":
        X64 = np.asarray(X, dtype=np.float64)
        with _one_blas_thread():
            _, s, vh = np.linalg.svd(X64.T @ X64)             # D×D = (D×N)(N×D)
        s = np.sqrt(s)
        k = int(np.sum(s > 1e-10))
        x = (vh[:k] @ (X64.T @ _onehot(y, C))) / s[:k, None]  # k×C = (k×D)(D×N)(N×C)
        return s[:k] ** 2, x
    if N > D:
        G, S = _scatter(X, y, C, None)
        sigma, V = _eigh_desc(_sym(G))
        sigma = np.maximum(sigma, 0.0)
        keep = np.sqrt(sigma) > 1e-10 if variant == "icml" else _above_rounding(sigma, N, D)
        sigma, V = sigma[keep], V[:, keep]
        x = (V.T @ S.T) / np.sqrt(sigma)[:, None]             # k×C
    else:
        Xf = X.astype(np.float64)
        sigma, U = _eigh_desc(_sym(Xf @ Xf.T))                # N×N
        sigma = np.maximum(sigma, 0.0)
        x = U.T @ _onehot(y, C)                               # k×C, k = N
        if variant == "evidence":
            keep = _above_rounding(sigma, N, D)
            sigma, x = sigma[keep], x[keep]
    return sigma, x


def _above_rounding(sigma, N, D):
    """Eigenvalues of a Gram above its rounding level σ_max · max(N, D) · ε (scale-free)."""
    return sigma > sigma[0] * max(N, D) * np.finfo(np.float64).eps


def _logme_fixed_point(sigma, x, counts, N, D):
    """Per-class value of thuml's fixed point (JMLR Alg. 3), all classes at once, as
    published: α = β = 1 at the start, 1e-5 added to both denominators, at most 11 steps,
    stop at a relative change of α/β ≤ 1e-3, log(α + βσ) summed over the k values kept."""
    k, C = x.shape
    sig, x2 = sigma[:, None], x * x
    res_x2 = counts - x2.sum(axis=0)                 # ‖y_c‖² − Σ x², ‖y_c‖² = n_c
    alpha, beta = np.ones(C), np.ones(C)
    m2, res2 = np.zeros(C), np.zeros(C)
    active = np.ones(C, bool)
    for _ in range(11):                              # classes freeze once converged
        a = np.flatnonzero(active)
        t = alpha[a] / beta[a]
        gamma = (sig / (sig + t)).sum(axis=0)
        m2[a] = (sig * x2[:, a] / (t + sig) ** 2).sum(axis=0)
        res2[a] = (x2[:, a] / (1 + sig / t) ** 2).sum(axis=0) + res_x2[a]
        alpha[a] = gamma / (m2[a] + 1e-5)
        beta[a] = (N - gamma) / (res2[a] + 1e-5)
        active[a[np.abs(alpha[a] / beta[a] - t) / t <= 1e-3]] = False
        if not active.any():
            break
    logdet = np.log(alpha + beta * sig).sum(axis=0)
    ev = (D / 2 * np.log(alpha) + N / 2 * np.log(beta) - logdet / 2
          - beta / 2 * res2 - alpha / 2 * m2 - N / 2 * _LOG_2PI)
    return ev / N


def _logme_icml(sigma, x, counts, N, D):
    """Per-class evidence of the ICML'21 iteration (thuml ``each_evidence``), all classes."""
    k, C = x.shape
    sig, s = sigma[:, None], np.sqrt(sigma)[:, None]
    tmp = s * x                                      # Vᵀ Xᵀ y on the non-null eigenvectors
    res_x2 = counts - (x * x).sum(axis=0)
    alpha, beta, lam = np.ones(C), np.ones(C), np.ones(C)
    alpha_de, beta_de = np.zeros(C), np.zeros(C)
    active = np.ones(C, bool)
    eps = 1e-5
    for _ in range(11):
        a = np.flatnonzero(active)
        gamma = (sig / (sig + lam[a])).sum(axis=0)
        m = tmp[:, a] * beta[a] / (alpha[a] + beta[a] * sig)     # posterior mean, eigenbasis
        alpha_de[a] = (m * m).sum(axis=0)
        beta_de[a] = res_x2[a] + ((x[:, a] - s * m) ** 2).sum(axis=0)   # ‖y − X m‖²
        alpha[a] = gamma / (alpha_de[a] + eps)
        beta[a] = (N - gamma) / (beta_de[a] + eps)
        new_lam = alpha[a] / beta[a]
        done = np.abs(new_lam - lam[a]) / lam[a] < 0.01
        lam[a[~done]] = new_lam[~done]
        active[a[done]] = False
        if not active.any():
            break
    logdet = np.log(alpha + beta * sig).sum(axis=0) + (D - k) * np.log(alpha)
    ev = (D / 2 * np.log(alpha) + N / 2 * np.log(beta) - logdet / 2
          - beta / 2 * (beta_de + eps) - alpha / 2 * (alpha_de + eps) - N / 2 * _LOG_2PI)
    return ev / N


def _log_evidence_profile(u, sigma, x2, r, N):
    """log p(y_c | X) / N at t = α/β = e^u, β at its optimum N / E(t), for every class c.

    E(t) = ‖y − X m_t‖² + t‖m_t‖² = Σ_i x_i² t/(t + σ_i) + r, and the log-determinant is
    Σ_i log(1 + σ_i/t): the D − k zero eigenvalues contribute nothing, and the value depends
    on the features only through σ/t, so scaling X by c moves the optimal t by c² and leaves
    the maximum unchanged. ``u``: a grid (G,) evaluated for all classes (G×C), or one value
    per class (C,) giving (C,).
    """
    t = np.exp(u)
    if np.ndim(u) == 2:                                       # (G, 1): the grid
        E = (t / (t + sigma)) @ x2 + r                        # G×C
        logdet = np.log1p(sigma / t).sum(axis=1, keepdims=True)
    else:
        frac = t[:, None] / (t[:, None] + sigma)              # C×k
        E = np.einsum("ck,kc->c", frac, x2) + r               # C: per-class Σ_k, the diagonal of (C×k)(k×C)
        logdet = np.log1p(sigma / t[:, None]).sum(axis=1)
    return (-0.5 * logdet - 0.5 * N * np.log(E)) / N + 0.5 * (math.log(N) - 1.0 - _LOG_2PI)


def _logme_evidence(sigma, x, counts, N, step=0.1, margin=20.0, iterations=60):
    """Per-class maximum over α, β of the log evidence / N, searched on u = log(α/β).

    A grid of ``step`` in u over the spectrum plus ``margin`` on each side (beyond it the
    evidence changes by less than e^-20), then golden-section search in the two grid cells
    around each class's best point, to ~1e-13 in u. The grid is placed relative to σ_max, so
    the result is scale-invariant up to rounding. Where the evidence has several local
    maxima this takes the largest (a fixed point finds the one nearest its start).
    """
    x2 = x * x
    r = np.maximum(counts - x2.sum(axis=0), 0.0)              # the part of y outside span X
    top = math.log(sigma[0])
    lo = math.floor(math.log(sigma[-1]) - top - margin)
    grid = top + np.arange(lo, margin + step / 2, step)
    values = _log_evidence_profile(grid[:, None], sigma, x2, r, N)    # G×C
    best = np.argmax(values, axis=0)
    a, b = grid[np.maximum(best - 1, 0)], grid[np.minimum(best + 1, len(grid) - 1)]
    g = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = _log_evidence_profile(c, sigma, x2, r, N), _log_evidence_profile(d, sigma, x2, r, N)
    for _ in range(iterations):
        left = fc >= fd                                       # the maximum is in [a, d]
        a, b = np.where(left, a, c), np.where(left, d, b)
        kept_u, kept_f = np.where(left, c, d), np.where(left, fc, fd)
        new_u = np.where(left, b - g * (b - a), a + g * (b - a))
        new_f = _log_evidence_profile(new_u, sigma, x2, r, N)
        c, fc = np.where(left, new_u, kept_u), np.where(left, new_f, kept_f)
        d, fd = np.where(left, kept_u, new_u), np.where(left, kept_f, new_f)
    return np.maximum(np.maximum(fc, fd), values.max(axis=0))


@_threads_by_size
def logme(features, labels, *, variant="evidence"):
    """LogME: mean over classes of the maximum log evidence / N of a Bayesian linear model.

    One binary regression target per class (y_c = 1[y = c]), raw features in float64 (no
    centring, no bias), prior w ~ N(0, α⁻¹I), noise N(0, β⁻¹), as thuml/LogME ``LogME.fit``.

    ``variant="evidence"`` (default, "LogME (evidence maximum, corrected for N ≤ D)"): the
    quantity LogME defines, max over α, β of log p(y_c | X), computed exactly
    (``_logme_evidence``). It equals the published fixed point only where that one is right,
    which it is not in two ways:

    * N ≤ D or rank-deficient features (k < D non-zero eigenvalues): the fixed point sums
      log(α + βσ_i) over the k values only and so drops the (D − k)/2 · log α term of the
      zero eigenvalues (thuml issue #23 / PR #24). On flowers17 (N = 680) this adds 0.6
      (D = 768) to 4.2 (D = 1280) to a score and mostly orders those models by D. The ICML
      iteration has the term.
    * It is not converged, and not scale-invariant: it starts at α = β = 1, stops after
      11 steps or at a 1e-3 relative change of α/β, and adds 1e-5 to both denominators. On
      flowers17's models with N > D it is 3e-7 to 2.5e-4 below the maximum (one class of
      c10_resnet44 needs ~50 steps); features × 1e4 make the 1e-5 dominate (a score falls
      from 0.10 to −0.21), × 1e-4 leave it far from converged.

    The maximum is invariant to the scale of the features; measured on flowers17, scores at
    × 1e-4 and × 1e4 equal those at × 1 to 1e-10 relative.

    ``variant="fixed_point"`` ("LogME (published fixed point)", key ``logme_published``):
    thuml's default ``_fit_fixed_point`` reproduced numerically, including the above and,
    for N > D, its SVD of XᵀX (``_logme_spectrum``). ``variant="icml"`` ("LogME (published
    ICML'21 iteration)"): ``_fit_icml`` (1e-5 inside the evidence terms, ≤ 11 steps, 1e-2
    tolerance). Cost: one N·D² Gram pass + eigh(D×D) (N×N when N <= D).
    """
    if variant not in _LOGME_VARIANTS:
        raise ValueError(f"variant must be one of {_LOGME_VARIANTS}, got {variant!r}")
    X, y, C = _check_inputs(features, labels)
    N, D = X.shape
    sigma, x = _logme_spectrum(X, y, C, variant)
    if sigma.size == 0 or not sigma[0] > 0:   # e.g. |x| ~ 1e-300: every product underflows to 0
        raise ValueError("features have no non-zero eigenvalue in float64: their Gram matrix "
                         "underflows (or overflows) at this scale")
    counts = np.bincount(y, minlength=C).astype(np.float64)
    if variant == "icml":
        ev = _logme_icml(sigma, x, counts, N, D)
    elif variant == "fixed_point":
        ev = _logme_fixed_point(sigma, x, counts, N, D)
    else:
        ev = _logme_evidence(sigma, x, counts, N)
    return float(np.mean(ev))


def logme_published(features, labels):
    """LogME as thuml/LogME's default computes it: ``logme(..., variant="fixed_point")``."""
    return logme(features, labels, variant="fixed_point")


def logme_icml(features, labels):
    """LogME by thuml/LogME's ICML'21 iteration: ``logme(..., variant="icml")``."""
    return logme(features, labels, variant="icml")


# ============================================================================== LEEP and NCE

def _check_probabilities(features, from_logits):
    P = _check_features(features, "source probabilities").astype(np.float64)
    if from_logits:
        return _softmax(P)
    if P.min() < 0 or np.abs(P.sum(axis=1) - 1.0).max() > 1e-3:
        raise ValueError("leep needs source-model probabilities (non-negative rows summing to "
                         "1); pass from_logits=True for logits")
    return P


def _leep_from_posteriors(P, y, C, log):
    """LEEP on an N×C_s matrix of p(z|x): mean_i [log] Σ_z p(z|x_i) p(y_i|z)."""
    N = len(y)
    joint = _onehot(y, C).T @ P / N                          # C×C_s, P(y, z)
    pz = joint.sum(axis=0)
    cond = np.divide(joint, pz, out=np.zeros_like(joint), where=pz > 0)   # P(y | z)
    # N×C = (N×C_s)(C_s×C), then entry y_i of each row i: N
    eep = (P @ cond.T)[np.arange(N), y]                      # expected empirical prediction
    return float(np.mean(np.log(eep)) if log else np.mean(eep))


@_threads_by_size
def leep(features, labels, *, log=True, from_logits=False):
    """LEEP from source-model probabilities ``features`` (N×C_s, rows p(z|x)).

    ``log=True`` (default) is the paper and thuml/tllib/google/PARC: mean log EEP. The SFDA
    family (and ETran, NCTI, PED tables) return the mean EEP *without* log ("ignored in case of
    instability"): ``log=False``. ``from_logits=True`` applies a row softmax first.
    """
    P = _check_probabilities(features, from_logits)
    y, C = _labels_for(labels, P.shape[0], "source probabilities")
    return _leep_from_posteriors(P, y, C, log)


def nce(features, labels):
    """NCE = −H(Y | Z) with Z the source model's predicted class (thuml ``NCE.py``).

    ``features``: N source predictions (1-D ints), or N×C_s probabilities/logits (argmax is
    taken). As the reference, 1e-20 is added to P(y|z) inside the entropy.
    """
    Z = np.asarray(features)
    if Z.ndim == 2:
        z = np.argmax(_check_features(Z, "source probabilities"), axis=1)
    elif Z.ndim == 1:
        z = Z
    else:
        raise ValueError(f"nce needs 1-D source predictions or N×C_s probabilities, got shape "
                         f"{Z.shape}")
    zs, zclasses = encode_labels(z)
    y, classes = itm.encode_labels(labels, len(zs), min_count=1, what="source predictions")
    C, Cs, N = len(classes), len(zclasses), len(y)
    joint = np.bincount(y * Cs + zs, minlength=C * Cs).reshape(C, Cs) / N
    pz = joint.sum(axis=0)                                   # > 0: unused z were dropped
    p = (joint / pz).T + 1e-20                               # C_s×C, P(y | z)
    entropy = -(p * np.log(p)).sum(axis=1)
    return float(-(entropy * pz).sum())


# ============================================================================== H-score, TransRate

def _trace_pinv(A, B, rcond=1e-15):
    """tr(pinv(A) BᵀB) for symmetric A (np.linalg.pinv's cutoff rcond·max|λ|)."""
    lam, V = _eigh_desc(A)
    keep = np.abs(lam) > rcond * np.abs(lam).max()
    Q = B @ V[:, keep]                                        # C×r
    return float(((Q * Q).sum(axis=0) / lam[keep]).sum())


def _between_factor(st, N):
    """B (C×D) with BᵀB = cov(g) (ddof 1), g = each row replaced by its class mean."""
    return np.sqrt(st.counts / (N - 1))[:, None] * (st.Mc - st.m)


@_threads_by_size
def hscore(features, labels):
    """H-score: tr(pinv(cov f) · cov g), g = class-mean features (tllib ``h_score``).

    cov with ddof 1; the pseudo-inverse cuts eigenvalues below 1e-15·λ_max as ``np.linalg.pinv``
    does, so ill-conditioned covariances give the reference's (unstable) large values too.
    """
    X, y, C = _check_inputs(features, labels)
    N = len(y)
    st = _Scatter(X, y, C)
    return _trace_pinv(st.St * N / (N - 1), _between_factor(st, N))


def _ledoit_wolf_shrinkage(st, row_norm4, N):
    """scikit-learn's ``ledoit_wolf_shrinkage`` from the centred moments.

    Σ(X²ᵀX²) = Σ_i ‖x_i‖⁴ and Σ(XᵀX)²/N² = ‖St‖_F², so no N×D temporaries are needed.
    """
    D = st.St.shape[0]
    trace = np.trace(st.St)
    mu = trace / D
    delta_ = np.sum(st.St * st.St)
    beta = (row_norm4 / N - delta_) / (D * N)
    delta = (delta_ - 2.0 * mu * trace + D * mu * mu) / D
    beta = min(beta, delta)
    return 0.0 if beta == 0 else beta / delta


@_threads_by_size
def reg_hscore(features, labels):
    """Regularised H-score: tr(pinv(Σ_α) · (1 − α) cov g) with Ledoit–Wolf (Σ_α, α).

    As tllib ``regularized_h_score``: features centred in float64, scikit-learn's Ledoit–Wolf
    estimator (reimplemented here), cov g with ddof 1.
    """
    X, y, C = _check_inputs(features, labels)
    N = len(y)
    st = _Scatter(X, y, C)
    def work(acc, s, e, xb):                                  # Σ_i ‖x_i − μ‖⁴
        # N_b: per-row Σ of squares of N_b×D xb, ‖x_i − μ‖² (squared and summed: Σ_i ‖x_i − μ‖⁴)
        acc["r4"] = acc.get("r4", 0.0) + float(np.sum(np.einsum("ij,ij->i", xb, xb) ** 2))

    row_norm4 = sum(a.get("r4", 0.0) for a in _map_blocks(X, st.center + st.m, work))
    alpha = _ledoit_wolf_shrinkage(st, row_norm4, N)
    D = X.shape[1]
    cov_a = (1.0 - alpha) * st.St
    cov_a.flat[:: D + 1] += alpha * np.trace(st.St) / D
    return _trace_pinv(cov_a, math.sqrt(1.0 - alpha) * _between_factor(st, N))


def _coding_rate(Z, n, eps):
    """½ log det(I + ZᵀZ/(n ε)) via Cholesky of the smaller Gram (Sylvester's identity)."""
    # Z is n×D: D×D = (D×n)(n×D) if D <= n, else n×n = (n×D)(D×n)
    G = Z.T @ Z if Z.shape[1] <= Z.shape[0] else Z @ Z.T
    return _half_logdet_identity_plus(G / (n * eps))


def _half_logdet_identity_plus(A):
    """½ log det(I + A) for symmetric PSD A, by Cholesky."""
    A = _sym(A)
    A.flat[:: A.shape[0] + 1] += 1.0
    with _one_blas_thread():
        return float(np.log(np.diag(np.linalg.cholesky(A))).sum())


@_threads_by_size
def transrate(features, labels, *, eps=1e-4, compat=False):
    """TransRate = R(Z) − (1/C) Σ_c R(Z_c), R(Z) = ½ logdet(I + ZᵀZ/(n ε)) (tllib/EMMS).

    Z = features centred by their column means (class subsets use the global centring, and
    n = n_c for them); note 1/(n ε) where the paper writes d/(n ε). float64.

    ε is absolute in the published code, so its score depends on the units of the features
    (on flowers17's c10_resnet20: 4e-8 at × 1e-4, 69.7 at × 1, 293 at × 1e4). By default the
    features are first divided by their RMS dimension spread s = √(mean_j var_j) (ε taken
    relative to s²), which makes the score scale-invariant ("TransRate (ε = 1e-4 on
    features scaled to unit RMS spread)"); real CNN features have s of order 1, but the score
    still moves with s, so ``compat=True`` ("TransRate (published, absolute ε)", key
    ``transrate_published``) keeps the raw features as the published code does.
    """
    X, y, C = _check_inputs(features, labels)
    N, D = X.shape
    c = X.mean(axis=0, dtype=np.float64)
    if D <= N:
        G, _ = _scatter(X, None, 0, c)                        # D×D centred Gram
    else:
        Xc = X.astype(np.float64) - c
        G = Xc @ Xc.T                                         # N×N: same non-zero spectrum
    if not compat:
        eps = eps * (np.trace(G) / (N * D))                   # ε relative to s² = mean var
    total = _half_logdet_identity_plus(G / (N * eps))
    order = np.argsort(y, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(y, minlength=C))])
    per_class = sum(_coding_rate(X[order[a:b]].astype(np.float64) - c, b - a, eps)
                    for a, b in zip(bounds[:-1], bounds[1:]))
    return total - per_class / C


def transrate_published(features, labels):
    """TransRate on the raw features, as published: ``transrate(..., compat=True)``."""
    return transrate(features, labels, compat=True)


# ============================================================================== N-LEEP

def _n_components_for_variance(lam, ratio):
    """scikit-learn's rule for PCA(n_components=ratio): smallest d reaching ``ratio``."""
    cum = np.cumsum(lam) / lam.sum()
    return int(min(np.searchsorted(cum, ratio, side="right") + 1, len(lam)))


@_threads_by_size
def nleep(features, labels, *, component_ratio=5, var_ratio=0.8, max_samples=10000,
          max_components=None, max_dims=None, log=True, seed=123, compat=False):
    """N-LEEP: LEEP on the posteriors of a Gaussian mixture fitted to PCA-reduced features.

    As google-research ``stable_transfer`` NLEEP: PCA keeping ``var_ratio`` of the variance
    (exact PCA), ``GaussianMixture(n_components=component_ratio·C, random_state=seed)`` with
    scikit-learn's defaults (full covariances, k-means init), then LEEP with log (the paper).
    The SFDA family leaves the mixture unseeded (not reproducible), uses ratio 1 for food/pets
    and drops the log: ``log=False``.

    The mixture adds an absolute 1e-6 to every covariance diagonal, so on raw features the
    score depends on their units: at × 1e-4 every component sees noise and the score falls to
    chance (−ln C; some real features make the fit fail). By default the PCA scores are
    divided by the features' RMS dimension spread s = √(mean_j var_j) first, which makes the
    score scale-invariant ("NLEEP (seeded mixture on features scaled to unit RMS spread)");
    ``compat=True`` fits the raw PCA scores, as the published code.

    Cost: EM is O(iterations · N · K · d'²) — hours for N = 50 000, K = 500, d' ≈ 200. Caps:
    above ``max_samples`` (default 10 000) the method runs on a seeded, class-stratified
    subsample (mixture fit and score alike; ≈ 1.5 min at C = 100, d' ≈ 170 on 2 cores);
    ``max_components`` caps K and ``max_dims`` caps d' (both off by default). None disables a
    cap. Needs scikit-learn (extra ``baselines``).
    """
    try:
        from sklearn.mixture import GaussianMixture
    except ImportError:
        raise ImportError("nleep needs scikit-learn (pip install scikit-learn, or the "
                          "'baselines' extra)") from None
    X, y, C = _check_inputs(features, labels)
    if max_samples is not None and len(y) > max_samples:
        idx = _stratified_subsample(y, C, int(max_samples), seed)
        X, y = X[idx], y[idx]
    c, lam, V = _pca_fit(X)
    d = _n_components_for_variance(lam, var_ratio)
    Z = _project(X, c, V[:, : d if max_dims is None else min(d, int(max_dims))])
    if not compat:
        Z /= math.sqrt(_mean_variance(lam, *X.shape))
    K = int(round(component_ratio * C))
    if max_components is not None:
        K = min(K, int(max_components))
    K = max(1, min(K, len(y)))
    with _one_blas_thread():              # EM is many small per-component LAPACK calls
        gmm = GaussianMixture(n_components=K, random_state=seed).fit(Z)
        posteriors = gmm.predict_proba(Z)
    return _leep_from_posteriors(posteriors, y, C, log)


def _mean_variance(lam, N, D):
    """s² = mean over the D dimensions of their variance (ddof 0), from the PCA variances."""
    return float(lam.sum()) * (N - 1) / N / D


# ============================================================================== PARC

def _tie_term(v_sorted):
    """Σ (t³ − t) over groups of t equal values of a sorted array (Spearman's correction)."""
    eq = np.flatnonzero(v_sorted[1:] == v_sorted[:-1])
    if len(eq) == 0:
        return 0.0
    breaks = np.flatnonzero(np.diff(eq) != 1)
    runs = np.diff(np.concatenate([[0], breaks + 1, [len(eq)]])) + 1.0
    return float(np.sum(runs ** 3 - runs))


def _rdm_pairs(Z, y):
    """Upper triangle (i < j, row-major) of 1 − corrcoef(rows of Z), and its same-class values.

    Built in row blocks so memory stays at the N(N−1)/2 values themselves (np.corrcoef's
    operation order: rows centred, covariance scaled by 1/(f − 1), divided by the std. devs).
    """
    N, f = Z.shape
    Zr = Z - Z.mean(axis=1, keepdims=True)
    scale = 1.0 / (f - 1)
    std = np.sqrt(np.einsum("ij,ij->i", Zr, Zr) * scale)  # N: per-row Σ of squares; Zr is N×f
    if not (std > 0).all():
        raise ValueError("parc: a sample has zero variance across the reduced features")
    v = np.empty(N * (N - 1) // 2)
    same, pos = [], 0
    rows = max(1, (1 << 22) // N)
    for i0 in range(0, N, rows):
        i1 = min(N, i0 + rows)
        c = (Zr[i0:i1] @ Zr[i0:].T) * scale                  # (i1−i0)×(N−i0)
        c /= std[i0:i1, None]
        c /= std[None, i0:]
        np.clip(c, -1.0, 1.0, out=c)
        upper = np.arange(N - i0)[None, :] > np.arange(i1 - i0)[:, None]
        vals = 1.0 - c[upper]
        v[pos: pos + len(vals)] = vals
        pos += len(vals)
        same.append(vals[(y[i0:i1, None] == y[None, i0:])[upper]])
    return v, np.concatenate(same)


def _spearman_binary(v, same):
    """Spearman ρ between all values v and the indicator "different class" (average ranks).

    The label RDM takes two values (0 same class, C/(C−1) different), so ρ is the Pearson
    correlation of rank(v) with that indicator; only the same-class ranks are needed.
    """
    P, n_same = len(v), len(same)
    if n_same == 0 or n_same == P:
        raise ValueError("parc needs sample pairs from the same class and from different classes")
    v.sort()
    same = np.sort(same)                 # sorted needles: searchsorted walks v once, cache-friendly
    left = np.searchsorted(v, same, side="left")
    right = np.searchsorted(v, same, side="right")
    rank_same = float(np.sum((left + right + 1) / 2.0))           # average 1-based ranks
    var_rank = (P * P - 1.0) / 12.0 - _tie_term(v) / (12.0 * P)
    p_diff = (P - n_same) / P
    cov = (P * (P + 1) / 2.0 - rank_same) / P - (P + 1) / 2.0 * p_diff
    return cov / math.sqrt(var_rank * p_diff * (1.0 - p_diff))


@_threads_by_size
def parc(features, labels, *, n_dims=32, max_samples=15000, seed=0):
    """PARC: 100 × Spearman(RDM of the features, RDM of the one-hot labels), upper triangles.

    As dbolya/parc ``PARC``: PCA to ``n_dims`` = 32 (SFDA family's ``--parc-ratio 2``), column
    standardisation (ddof 0), RDM = 1 − corrcoef of the rows. The reference PCA is scikit-learn's
    randomised solver (seed 1919, one power iteration) — approximate; this one is exact.
    Features of rank r < ``n_dims`` keep r components: the others hold rounding noise, which
    the reference's StandardScaler would scale up to unit variance (vww_mnv1_025_96 on
    flowers17, rank 22: that noise moved the score by 12 % between × 1 and × 1e4).

    Memory and time are O(N²) (N(N−1)/2 float64 values, one sort): above ``max_samples``
    (default 15 000 as the SFDA family; None = never) a seeded, class-stratified subsample is
    scored (≈ 0.9 GB and ≈ 18 s at the cap on 2 cores). Exact ties between RDM values are
    ranked as scipy does; values equal only in exact arithmetic may differ in their last bit.
    """
    X, y, C = _check_inputs(features, labels)
    if max_samples is not None and len(y) > max_samples:
        idx = _stratified_subsample(y, C, int(max_samples), seed)
        X, y = X[idx], y[idx]
    N, D = X.shape
    if N < 3:
        raise ValueError(f"parc needs at least 3 samples, got {N}")
    Z, var = _pca(X, min(n_dims, N, D))
    Z = Z[:, _above_rounding(var, N, D)]                  # features of rank < n_dims: the rest
    if Z.shape[1] < 2:                                    # is rounding noise, not scaled up
        raise ValueError("parc needs at least 2 reduced feature dimensions (features of rank "
                         f"{Z.shape[1]})")
    Z = (Z - Z.mean(axis=0)) / Z.std(axis=0)
    v, same = _rdm_pairs(Z, y)
    return 100.0 * _spearman_binary(v, same)


# ============================================================================== GBC

@_threads_by_size
def gbc(features, labels, *, pca_dim=64, gaussian_type="spherical", ddof=0, compat=False):
    """GBC: −Σ_{c≠c'} exp(−D_B(c, c')), Bhattacharyya distances of per-class Gaussians.

    As google-research ``stable_transfer`` GBC (config: spherical, PCA to 64): class means and
    per-dimension variances (ddof 0, as TF; the torch port used for the PED/SA tables has
    ddof 1) clamped at 1e-4. Spherical: σ_c = mean variance and, as the reference, the log terms
    of D_B are *not* multiplied by the dimension. ``pca_dim=None`` skips the (exact) PCA.
    Computed in float64 (the reference casts to float32).

    D_B is scale-invariant but the 1e-4 clamp is absolute: at × 1e-4 every variance is
    clamped and the score falls to −C(C − 1)·e^(−0) (−272 for C = 17). By default the clamp is
    1e-4 · s², s = √(mean_j var_j) the features' RMS dimension spread — the published clamp on
    features scaled to unit spread ("GBC (spherical, PCA-64, variances clamped relative to the
    RMS spread)"); on flowers17's features it never binds at × 1, so both agree there.
    ``compat=True`` clamps at 1e-4 absolute, as published.
    """
    if gaussian_type not in ("spherical", "diagonal"):
        raise ValueError(f"gaussian_type must be 'spherical' or 'diagonal', got {gaussian_type!r}")
    X, y, C = _check_inputs(features, labels)
    if pca_dim:
        c, lam, V = _pca_fit(X)
        Z = _project(X, c, V[:, : min(pca_dim, V.shape[1])])
        spread2 = _mean_variance(lam, *X.shape)
    else:
        Z, spread2 = X, float(np.mean(_mean_std(X)[1] ** 2))
    M, var, _ = _class_means_vars(Z, y, C, ddof)
    var = np.maximum(var, 1e-4 * (1.0 if compat else spread2))
    total, s = 0.0, var.mean(axis=1)                         # s: spherical variances
    for a in range(C):                                       # row a of the C×C distance matrix
        d2 = (M[a] - M) ** 2                                 # C×d
        if gaussian_type == "spherical":
            sbar = (s[a] + s) / 2.0
            db = d2.sum(axis=1) / (8 * sbar) + 0.5 * (np.log(sbar) - 0.5 * np.log(s[a])
                                                      - 0.5 * np.log(s))
        else:
            vbar = (var[a] + var) / 2.0
            db = (d2 / vbar).sum(axis=1) / 8 + 0.5 * (np.log(vbar).sum(axis=1)
                                                      - 0.5 * np.log(var[a]).sum()
                                                      - 0.5 * np.log(var).sum(axis=1))
        coef = np.exp(-db)
        coef[a] = 0.0
        total += coef.sum()
    return float(-total)


# ============================================================================== SFDA

def _power_lambda_max(A, iterations=3):
    """λ_max(A) as SFDA's ``utils.iterative_A``: start at A·1, each iteration two products."""
    x = A.sum(axis=1)
    for _ in range(iterations):
        t = A @ x  # D = (D×D)(D)
        v = t / np.linalg.norm(t)
        t = A @ v  # D = (D×D)(D)
        x = t / np.linalg.norm(t)
    return float(x @ A @ v)  # scalar = (D)(D×D)(D)


def _shrunk(S, lam):
    """(1 − λ) S + λ tr(S)/D · I."""
    D = S.shape[0]
    out = (1.0 - lam) * S
    out.flat[:: D + 1] += lam * np.trace(S) / D
    return out


class _LDA:
    """Gaussian classifier with shared covariance Σ on rows centred at ``st.center``.

    logits = (x − c) W + b with W = Σ⁻¹ (M − c)ᵀ. This is SFDA's M V Vᵀ: scipy's eigh(Sb, Σ)
    returns all D eigenvectors with VᵀΣV = I, so V Vᵀ = Σ⁻¹ and Sb drops out of p(y|x).
    """

    def __init__(self, Sigma, st):
        if not np.trace(Sigma) > 0:
            raise ValueError("features have no within-class variance")
        with _one_blas_thread():
            self.W = np.linalg.solve(Sigma, st.Mc.T)             # D×C
        self.b = -0.5 * np.einsum("cd,dc->c", st.Mc, self.W) + np.log(st.priors)  # C: diagonal of (C×D)(D×C)
        self.center = st.center

    def proba(self, xb):
        """p(y|x) for a centred float64 block (N_b×D) -> N_b×C."""
        return _softmax(xb @ self.W + self.b)  # N_b×C = (N_b×D)(D×C)


def _true_class_proba(X, y, lda, transform=None):
    """p(y_i | x_i) for all i (optionally of transformed rows), one pass."""
    out = np.empty(len(y))

    def work(acc, s, e, xb):
        if transform is not None:
            transform(xb, s, e, acc)
        out[s:e] = lda.proba(xb)[np.arange(e - s), y[s:e]]

    _map_blocks(X, lda.center, work)
    return out


def _sfda_stage1(X, y, C, shrinkage):
    st = _Scatter(X, y, C)
    lam = max(math.exp(-5.0 * _power_lambda_max(st.Sw)), 1e-10) if shrinkage is None else shrinkage
    return st, lam, _LDA(_shrunk(st.Sw, lam), st)


def _sfda_core(X, y, C, shrinkage=None):
    """SFDA on validated inputs: 3 passes over X, two of them Gram products."""
    st, lam, lda = _sfda_stage1(X, y, C, shrinkage)
    others = (st.Mc.sum(axis=0) - st.Mc) / (C - 1)        # mean of the other class means − c
    w = np.empty(len(y))

    def confmix(xb, s, e, acc):                           # x ← w x + (1 − w) m̄_{−y}, centred
        xb *= w[s:e, None]
        _add_class_rows(xb, y[s:e], others, 1.0 - w[s:e], acc)

    def weigh_and_mix(xb, s, e, acc):                     # w = q_y(x), q = softmax of p(·|x)
        q = np.exp(lda.proba(xb))
        w[s:e] = q[np.arange(e - s), y[s:e]] / q.sum(axis=1)
        confmix(xb, s, e, acc)

    st2 = _Scatter(X, y, C, center=st.center, transform=weigh_and_mix)
    lda2 = _LDA(_shrunk(st2.Sw, lam), st2)
    return float(np.mean(_true_class_proba(X, y, lda2, confmix)))


@_threads_by_size
def sfda(features, labels, *, shrinkage=None):
    """SFDA: mean p(y_i|x_i) of a shrinkage LDA refitted after ConfMix (TencentARC/SFDA).

    Stage 1: LDA with Sw_λ = (1 − λ) Sw + λ tr(Sw)/D I, Sw = Σ_c π_c cov_c (biased),
    λ = max(exp(−5 λ_max(Sw)), 1e-10) with λ_max from SFDA's 3-step power iteration (or the
    given ``shrinkage``). ConfMix: x ← q x + (1 − q) m̄_{−y}, q = softmax over classes of the
    stage-1 probabilities. Stage 2: same λ, score = mean p(y_i|x_i), no log (as shipped; the
    copies in PED/NCTI/ETran/EMMS/SA are identical). float64; the input is not modified.
    Equals the published ``SFDA_Score`` on flowers17's 21 models to 1e-13. λ is absolute, so
    the score depends on the units of the features, as published.
    """
    X, y, C = _check_inputs(features, labels)
    return _sfda_core(X, y, C, shrinkage)


@_threads_by_size
def shrinkage_lda_proba(features, labels, *, shrinkage=None):
    """SFDA's stage-1 classifier: (p(y|x) as an N×C array, the shrinkage λ used)."""
    X, y, C = _check_inputs(features, labels)
    _, lam, lda = _sfda_stage1(X, y, C, shrinkage)
    P = np.empty((len(y), C))

    def work(acc, s, e, xb):
        P[s:e] = lda.proba(xb)

    _map_blocks(X, lda.center, work)
    return P, lam


# ============================================================================== ETran

def _logsumexp_rows_numpy(X):
    out = np.empty(X.shape[0])
    for s, e, xb in _blocks(X):
        m = xb.max(axis=1)
        out[s:e] = m + np.log(np.exp(xb - m[:, None]).sum(axis=1))
    return out


def _logsumexp_rows_loop(X):
    """Fused per-row max + Σ exp in float64: no N×D temporaries."""
    N, D = X.shape
    out = np.empty(N)
    for i in range(N):
        m = -np.inf
        for j in range(D):
            v = np.float64(X[i, j])
            if v > m:
                m = v
        acc = 0.0
        for j in range(D):
            acc += np.exp(np.float64(X[i, j]) - m)
        out[i] = m + np.log(acc)
    return out


_logsumexp_rows_numba = itm.njit(_logsumexp_rows_loop)   # None without numba


def _logsumexp_rows(X):
    if HAVE_NUMBA:
        return _logsumexp_rows_numba(np.ascontiguousarray(X))
    return _logsumexp_rows_numpy(X)


def etran_energy(features, *, percent=0.5, tail="bot"):
    """ETran's energy score: mean of the lowest (``tail="bot"``) or highest ``percent`` % of
    E(x) = logsumexp over the D *feature* dimensions (float64).

    The reference keeps ⌊int(10·percent)·N/1000⌋ samples (0.5 % by default); this keeps at least
    one (the reference returns NaN for N < 200).
    """
    if tail not in ("bot", "top"):
        raise ValueError(f"tail must be 'bot' or 'top', got {tail!r}")
    X = _check_features(features)
    energy = np.sort(_logsumexp_rows(X))
    N, share = len(energy), int(percent * 10)
    if tail == "bot":
        keep = energy[: max(1, share * N // 1000)]
    else:
        keep = energy[-max(1, -((-share * N) // 1000)):]   # the reference's -k*N//1000 slice
    return float(keep.mean())


def _nearest_mean_score(X, y, C):
    """ETran's LDA_Score: mean p(y_i|x_i) for softmax_c(x·μ_c − ½‖μ_c‖² + log π_c).

    ETran takes eigenvectors from np.linalg.eigh(inv(Sw_λ) @ Sb); eigh of that non-symmetric
    matrix returns an orthonormal V, so V Vᵀ = I and the classifier has identity covariance.
    """
    counts = np.bincount(y, minlength=C).astype(np.float64)
    M = _class_sums(X, y, C) / counts[:, None]
    b = -0.5 * np.einsum("cd,cd->c", M, M) + np.log(counts / len(y))  # C: per-row ‖μ_c‖² of C×D M
    proba = np.empty(len(y))

    def work(acc, s, e, xb):
        proba[s:e] = _softmax(xb @ M.T + b)[np.arange(e - s), y[s:e]]  # N_b×C = (N_b×D)(D×C)

    _map_blocks(X, None, work)
    return float(proba.sum() / len(y))


@_threads_by_size
def etran_parts(features, labels, *, percent=0.5, compat=True):
    """ETran's two per-model parts: ``{"energy": S_en, "lda": S_lda}``; see ``combine``.

    ``compat=True`` (default, what the published tables used): the shipped LDA with identity
    covariance (``_nearest_mean_score``). ``compat=False``: the paper's LDA, i.e. the shrinkage
    LDA of SFDA's stage 1 (mean p(y_i|x_i)). The regression score of the paper is not part of
    the shipped classification pipeline. Both parts equal the published ``LDA_Score`` and
    ``Energy_Score(X, 0.5, 'bot')`` on flowers17's 21 models to 1e-14.
    """
    X, y, C = _check_inputs(features, labels)
    energy = etran_energy(X, percent=percent)
    if compat:
        lda = _nearest_mean_score(X, y, C)
    else:
        _, _, model = _sfda_stage1(X, y, C, None)
        lda = float(np.mean(_true_class_proba(X, y, model)))
    return {"energy": energy, "lda": lda}


def etran(features, labels, **options):
    """ETran for ONE model without pool normalisation: 0.15·S_en + 0.85·S_lda.

    The published score min-max scales both parts over the model pool first
    (``combine("etran", {model: etran_parts(...)})``); use that to rank models.
    """
    parts = etran_parts(features, labels, **options)
    return 0.15 * parts["energy"] + 0.85 * parts["lda"]


# ============================================================================== PED

def _mean_std(X):
    """Column mean and standard deviation (ddof 0) in float64, two passes over row blocks."""
    mean = X.mean(axis=0, dtype=np.float64)

    def work(acc, s, e, xb):
        acc["sq"] = acc.get("sq", 0.0) + np.einsum("ij,ij->j", xb, xb)  # D: per-dim Σ of squares, N_b×D xb

    sq = sum(a.get("sq", 0.0) for a in _map_blocks(X, mean, work))
    return mean, np.sqrt(sq / X.shape[0])


def _ped_step(M, R, nsigma, time_step, constant):
    """Class displacements (C×D, standardised units) of one PED repulsion step.

    For each pair, overlap o = max(|nσ|(R_i + R_j) − d_ij, 0) pushes class i away from j by
    min(½ Δt² · k·o, o) along (μ_i − μ_j)/d_ij.
    """
    Delta = np.zeros_like(M)
    for a in range(len(M)):
        diff = M[a] - M                                       # C×D, rows μ_a − μ_b
        d = np.sqrt(np.einsum("ij,ij->i", diff, diff))        # C: per-row Σ of squares, d_b = ‖μ_a − μ_b‖
        overlap = np.maximum(abs(nsigma) * R[a] + abs(nsigma) * R - d, 0.0)
        disp = np.minimum(0.5 * time_step ** 2 * constant * overlap, overlap)
        Delta[a] = np.divide(disp, d, out=np.zeros_like(d), where=d > 0) @ diff  # D = (C)(C×D)
    return Delta


_PED_BASES = ("sfda", "logme", "nleep")


@_threads_by_size
def ped(features, labels, *, reference_features=None, base="sfda", time_step=0.1, nsigma=0.6,
        exit_ratio=0.5, constant=1.0, eps=1e-3, max_steps=6, **base_options):
    """PED: move class clusters apart by simulated repulsion, then score with SFDA.

    As lixiaotong97/PED ``PED_Score`` with its command-line defaults (Δt = 0.1, nσ = 0.6, exit
    ratio 0.5, k = 1, type SFDA, rescale on): features are standardised with the mean/std
    (std ≥ ``eps``) of ``reference_features`` — ImageNet features of the same model in the paper
    — each step recomputes class means/radii R_c = √Σ_d var_c,d and repels overlapping classes;
    a step is kept while its total |displacement| exceeds ``exit_ratio`` × the first step's
    (at most ``max_steps``). ``base``: "sfda" | "logme" | "nleep" (+ ``base_options``).

    Without ``reference_features`` the reference raises; here the target features themselves
    standardise, and a warning says so. Identical class means get no displacement (the
    reference divides by zero).
    """
    if base not in _PED_BASES:
        raise ValueError(f"base must be one of {_PED_BASES}, got {base!r}")
    X, y, C = _check_inputs(features, labels)
    if reference_features is None:
        warnings.warn("ped: no reference_features (ImageNet features of the same model) given; "
                      "standardising with the target features", UserWarning, stacklevel=3)
        G = X
    else:
        G = _check_features(reference_features, "reference_features")
        if G.shape[1] != X.shape[1]:
            raise ValueError(f"reference_features have {G.shape[1]} dims, features have "
                             f"{X.shape[1]}")
    smean, sstd = _mean_std(G)
    sstd = np.maximum(sstd, eps)
    M, var, _ = _class_means_vars(X, y, C)
    Mn, R = (M - smean) / sstd, np.sqrt((var / sstd ** 2).sum(axis=1))
    shift, first = np.zeros_like(Mn), None                 # accumulated class shift
    for _ in range(max_steps):
        step = _ped_step(Mn + shift, R, nsigma, time_step, constant)
        change = np.abs(step).sum()
        first = change if first is None else first
        if not (first > 0 and change / first > exit_ratio):
            break
        shift += step
    moved = X.astype(np.float64)
    moved += (shift * sstd)[y]
    if base == "sfda":
        return _sfda_core(moved, y, C, **base_options)
    return (logme if base == "logme" else nleep)(moved, y, **base_options)


# ============================================================================== NCTI

def _lda_eigen(Z, y, C, shrinkage):
    """scikit-learn LDA(solver='eigen', shrinkage): (centred transform N×q, p(y|x) N×C)."""
    st = _Scatter(Z, y, C)
    Sw, St = _shrunk(st.Sw, shrinkage), _shrunk(st.St, shrinkage)
    lam, Q = _eigh_desc(Sw)
    root = (Q / np.sqrt(lam)) @ Q.T                           # Sw^(−1/2), p×p = (p×p)(p×p); Z is N×p
    _, U = _eigh_desc(_sym(root @ (St - Sw) @ root))          # p×p = (p×p)(p×p)(p×p)
    V = root @ U                                              # p×p = (p×p)(p×p); eigh(Sb, Sw): VᵀSwV = I
    q = min(C - 1, Z.shape[1])
    Zc = Z - (st.center + st.m)
    proj = Zc @ V[:, :q]                                      # N×q = (N×p)(p×q)
    lda = _LDA(Sw, st)
    return proj, lda.proba(Z - lda.center)


def _lda_svd(Z, y, C, biased, tol=1e-4):
    """scikit-learn LDA(solver='svd'): (centred transform N×q, p(y|x) N×C).

    The within-class whitening divides by N − C (scikit-learn < 1.9) or N (``biased``, 1.9+).
    """
    N = len(y)
    counts = np.bincount(y, minlength=C).astype(np.float64)
    M = (_onehot(y, C).T @ Z) / counts[:, None]               # C×p = (C×N)(N×p); Z is N×p
    priors = counts / N
    Xc = Z - M[y]                                             # within-class centred
    std = Xc.std(axis=0)
    std[std == 0] = 1.0
    with _one_blas_thread():
        _, S, Vt = np.linalg.svd(math.sqrt(1.0 / (N if biased else N - C)) * (Xc / std),
                                 full_matrices=False)
    r = int(np.sum(S > tol))
    whiten = (Vt[:r] / std).T / S[:r]                         # p×r, whitens pooled Sw
    xbar = priors @ M                                         # p = (C)(C×p)
    B = (np.sqrt(counts / (C - 1))[:, None] * (M - xbar)) @ whiten  # C×r = (C×p)(p×r)
    with _one_blas_thread():
        _, S2, Vt2 = np.linalg.svd(B, full_matrices=False)
    scalings = whiten @ Vt2.T[:, : int(np.sum(S2 > tol * S2[0]))]  # p×r2 = (p×r)(r×r2)
    proj_all = (Z - xbar) @ scalings                          # N×r2 = (N×p)(p×r2)
    coef = (M - xbar) @ scalings                              # C×r2
    logits = proj_all @ coef.T - 0.5 * (coef ** 2).sum(axis=1) + np.log(priors)  # N×C = (N×r2)(r2×C)
    return proj_all[:, : min(C - 1, Z.shape[1])], _softmax(logits)


@_threads_by_size
def ncti_parts(features, labels, *, n_components=64, svd_covariance="unbiased"):
    """NCTI's per-model parts ``{"seli", "ncc", "vc"}`` (BUserName/NCTI ``NCTI_Score``).

    X₆₄ = PCA(64) (exact); temp = max(exp(−Σ top-32 PCA variances), 1e-10); LDA =
    scikit-learn's 'svd' solver if temp == 1e-10 else 'eigen' with shrinkage temp (both
    reimplemented); seli = nuclear norm of the centred LDA projection, ncc = mean p(y_i|x_i),
    vc = log Σ_c ‖P_c‖_* over the rows of each class. Rank models with ``combine("ncti", ...)``.

    The 'svd' solver (typical for real features, whose top-32 variances sum past 23) whitens
    by the pooled within-class covariance /(N − C) in the scikit-learn releases NCTI's results
    were computed with (``svd_covariance="unbiased"``, default) and /N since scikit-learn 1.9
    (PR #33626, ``"biased"``); seli changes by a common factor, ncc slightly.

    The published code's PCA is scikit-learn's ``PCA(64)`` with the 'auto' solver and no
    seed, which for N < 10·D and max(N, D) > 500 is the randomised solver: its scores are then
    approximate and differ from run to run. Where its PCA is exact (flowers17: D = 64, and
    features of rank < 64) these parts equal the published ones to 1e-13; elsewhere by up to
    3e-3 with ``svd_covariance="biased"`` (the published values there were made with
    scikit-learn 1.9) — the spread of the randomised solver itself — and 1.4e-2 by default.
    """
    if svd_covariance not in ("unbiased", "biased"):
        raise ValueError(f"svd_covariance must be 'unbiased' or 'biased', got {svd_covariance!r}")
    X, y, C = _check_inputs(features, labels)
    Z, var = _pca(X, min(n_components, *X.shape))
    temp = max(math.exp(-float(var[:32].sum())), 1e-10)
    if temp == 1e-10:
        proj, P = _lda_svd(Z, y, C, biased=svd_covariance == "biased")
    else:
        proj, P = _lda_eigen(Z, y, C, temp)
    proj -= proj.mean(axis=0)
    seli = float(_svdvals(proj).sum())
    ncc = float(P[np.arange(len(y)), y].sum() / len(y))
    order = np.argsort(y, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(y, minlength=C))])
    nuc = sum(_svdvals(P[order[a:b]]).sum()
              for a, b in zip(bounds[:-1], bounds[1:]))
    return {"seli": seli, "ncc": ncc, "vc": float(np.log(nuc))}


def ncti(features, labels, **options):
    """NCTI for ONE model without pool normalisation: ncc + seli − vc (seli dominates).

    The published score min-max scales each part over the model pool first
    (``combine("ncti", {model: ncti_parts(...)})``); use that to rank models.
    """
    p = ncti_parts(features, labels, **options)
    return p["ncc"] + p["seli"] - p["vc"]


# ============================================================================== SA

def _sa_gate(variances, N):
    """SA's ``check_sa`` from the PCA variances (ddof 1): apply iff max(exp(−5 · mean of the
    top-2 eigenvalues of cov X (bias)), 1e-10) < 1e-9."""
    top2 = variances[:2] * (N - 1) / N
    return max(math.exp(-5.0 * float(np.mean(top2))), 1e-10) < 1e-9


def _sa_spread(Z, y, C):
    """Spread: push each sample one unit along its direction from its class centroid."""
    out = Z.copy()
    for k in range(C):
        idx = np.flatnonzero(y == k)
        dv = Z[idx] - Z[idx].mean(axis=0)
        n = np.linalg.norm(dv, axis=1)
        out[idx] += np.divide(dv, n[:, None], out=np.zeros_like(dv), where=n[:, None] > 0)
    return out


def _sa_attract(Z, y, C, alpha, sigma):
    """SA's ``attract``, with the sign of the reference code: class i moves by
    α·(d_ij − σ(R_i + R_j)) along (μ_i − μ_j)/d_ij for every j (away from j when the gap exceeds
    σ(R_i + R_j), towards it otherwise; no clamping)."""
    M, var, _ = _class_means_vars(Z, y, C)
    R = np.sqrt(var.sum(axis=1))
    Delta = np.zeros_like(M)
    for a in range(C):
        diff = M[a] - M                                       # C×k, rows μ_a − μ_b; Z is N×k
        d = np.sqrt(np.einsum("ij,ij->i", diff, diff))        # C: per-row Σ of squares, d_b = ‖μ_a − μ_b‖
        amount = alpha * (d - sigma * (R[a] + R))
        Delta[a] = np.divide(amount, d, out=np.zeros_like(d), where=d > 0) @ diff  # k = (C)(C×k)
    return Z + Delta[y]


def _sa_base_parts(Z, y, C, base, options):
    if base == "lda":
        return {"score": _nearest_mean_score(Z, y, C)}
    if base == "ncti":
        return ncti_parts(Z, y, **options)
    if base == "gbc":
        options = {"pca_dim": None, "ddof": 1, **options}       # SA's torch port, no PCA
    func = {"sfda": sfda, "logme": logme, "nleep": nleep, "gbc": gbc}[base]
    return {"score": func(Z, y, **options)}


_SA_BASES = ("lda", "sfda", "logme", "nleep", "gbc", "ncti")


@_threads_by_size
def sa_parts(features, labels, *, base="lda", alpha=0.005, sigma=0.6, n_components=64,
             compat=True, **base_options):
    """SA (Spread & Attract) parts: the base metric's parts on the moved features.

    As prafful-kumar/enhancing_TE ``SA``: if the gate holds (``_sa_gate``), X₆₄ = PCA(64)
    (exact here; the reference uses scikit-learn's randomised solver, seed 1919), Attract
    (α = 0.005, σ = 0.6), then ``base``: "lda" (ETran's identity-covariance LDA score, the
    ITM paper's "SA (LDA)"), "sfda", "logme", "nleep", "gbc" (torch port: ddof 1, no PCA) or
    "ncti" (pool-relative). Otherwise the base metric scores the raw features.
    ``compat=True`` (default): Spread is computed and discarded, as shipped;
    ``compat=False`` applies Spread before Attract (the paper). Returns ``{"score": s}`` or
    NCTI's parts, plus ``"applied"`` (bool).
    """
    if base not in _SA_BASES:
        raise ValueError(f"base must be one of {_SA_BASES}, got {base!r}")
    X, y, C = _check_inputs(features, labels)
    center, variances, V = _pca_fit(X, single=False)        # float64: the gate's covariance
    applied = _sa_gate(variances, len(y))
    Z = X
    if applied:
        Z = _project(X, center, V[:, : min(n_components, *X.shape)])
        if not compat:
            Z = _sa_spread(Z, y, C)
        Z = _sa_attract(Z, y, C, alpha, sigma)
    parts = _sa_base_parts(Z, y, C, base, base_options)
    parts["applied"] = bool(applied)
    return parts


def sa(features, labels, **options):
    """SA score of ONE model (see ``sa_parts``); with ``base="ncti"`` the unnormalised
    ncc + seli − vc — rank NCTI-based SA with ``combine("sa", ...)``."""
    p = sa_parts(features, labels, **options)
    return p["score"] if "score" in p else p["ncc"] + p["seli"] - p["vc"]


# ============================================================================== pools

# ============================================================================== probes

# What a plain classifier on the frozen features reaches: the question every TE method must answer
# ("does it add anything beyond a probe?"). Each probe scores the held-out accuracy (a fraction) of
# k stratified folds (itm.crossfit_folds, seeded), every fold standardised per dimension with its
# training rows' mean and std (a constant dimension contributes 0), as ITM's default preprocessing
# does. Above ``max_samples`` rows a seeded class-stratified subsample is scored (as for PARC).

_RIDGE_GRID = 10.0 ** np.arange(-4.0, 4.5, 0.5)   # α / (mean non-zero eigenvalue of XᵀX): scale-free


def _probe_folds(features, labels, folds, seed, max_samples):
    """(X, y, C, [(train rows, held-out rows)]) of a probe: checked input, the folds."""
    X, y, C = _check_inputs(features, labels)
    if int(folds) < 2:
        raise ValueError(f"folds must be ≥ 2, got {folds}")
    if max_samples is not None and len(y) > max_samples:
        idx = _stratified_subsample(y, C, int(max_samples), seed)
        X, y = X[idx], y[idx]
    fold_of = itm.crossfit_folds(y, int(folds), np.random.default_rng(seed))
    return X, y, C, [(np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)) for k in range(int(folds))]


def _standardised(X, train, held):
    """Training and held-out rows (float64), standardised with the training rows' statistics."""
    Xtr, Xte = X[train].astype(np.float64), X[held].astype(np.float64)
    mean, std = Xtr.mean(axis=0), Xtr.std(axis=0)
    scale = np.where(std > 1e-12 * max(float(std.max()), 1e-300), 1.0 / np.where(std > 0, std, 1.0), 0.0)
    return (Xtr - mean) * scale, (Xte - mean) * scale


def _probe_accuracy(features, labels, folds, seed, max_samples, predict):
    """Mean over the folds of the held-out accuracy of predict(X_train, y_train, X_held, C)."""
    X, y, C, splits = _probe_folds(features, labels, folds, seed, max_samples)
    accs = []
    with _one_blas_thread():
        for train, held in splits:
            Xtr, Xte = _standardised(X, train, held)
            accs.append(float(np.mean(predict(Xtr, y[train], Xte, C) == y[held])))
    return float(np.mean(accs))


def _ridge_predict(Xtr, ytr, Xte, C):
    """Ridge regression of the centred one-hot labels, α chosen on the training rows by exact
    leave-one-out squared error over _RIDGE_GRID; the held-out rows' argmax."""
    N, D = Xtr.shape
    Y = _onehot(ytr, C)
    Y -= Y.mean(axis=0)
    small = N <= D                                     # eigendecompose the smaller Gram matrix
    lam, V = np.linalg.eigh(Xtr @ Xtr.T if small else Xtr.T @ Xtr)   # N×N or D×D
    keep = lam > 1e-10 * lam[-1]
    lam, V = lam[keep], V[:, keep]
    # P = X·W with W the right singular vectors (XᵀX = W diag(λ) Wᵀ): P = U√λ in the N×N case
    P = V * np.sqrt(lam) if small else Xtr @ V          # N×r
    Pte = Xte @ (Xtr.T @ (V / np.sqrt(lam))) if small else Xte @ V   # held×r
    PY, P2 = P.T @ Y, P * P                            # r×C, N×r
    best = None
    for a in _RIDGE_GRID * lam.mean():
        w = 1.0 / (lam + a)                            # (λ + α)⁻¹ on the r directions
        hat = P2 @ w                                   # leverages h_i = Σ_j P_ij² / (λ_j + α)
        loo = (Y - P @ (w[:, None] * PY)) / (1.0 - hat)[:, None]   # N×C leave-one-out residuals
        err = float(np.sum(loo * loo))
        if best is None or err < best[0]:
            best = (err, w)
    return np.argmax(Pte @ (best[1][:, None] * PY), axis=1)


def probe_ridge(features, labels, *, folds=5, seed=0, max_samples=20000):
    """k-fold linear probe: ridge regression of one-hot labels on standardised features (closed
    form, α by exact leave-one-out error on each training part), held-out top-1 accuracy."""
    return _probe_accuracy(features, labels, folds, seed, max_samples, _ridge_predict)


def _ncm_predict(Xtr, ytr, Xte, C):
    """The nearest class mean (Euclidean) of each held-out row."""
    counts = np.bincount(ytr, minlength=C)
    M = (_onehot(ytr, C).T @ Xtr) / np.maximum(counts, 1)[:, None]        # C×D = (C×N)(N×D)
    d = np.einsum("cd,cd->c", M, M)[None, :] - 2.0 * Xte @ M.T           # held×C, ‖x‖² dropped
    d[:, counts == 0] = np.inf
    return np.argmin(d, axis=1)


def probe_ncm(features, labels, *, folds=5, seed=0, max_samples=20000):
    """k-fold nearest-class-mean accuracy on standardised features."""
    return _probe_accuracy(features, labels, folds, seed, max_samples, _ncm_predict)


_KNN_K, _KNN_T = 20, 0.07      # the k-NN evaluation of self-supervised features (DINO, Caron et al. 2021)


def _knn_predict(Xtr, ytr, Xte, C, k=_KNN_K, temperature=_KNN_T):
    """Weighted k-NN on cosine similarity: each of the k most similar training rows votes
    exp(similarity / T) for its class."""
    def unit(A):
        return A / np.maximum(np.linalg.norm(A, axis=1, keepdims=True), 1e-300)
    Ttr, k = unit(Xtr), min(k, len(ytr))
    pred = np.empty(len(Xte), dtype=np.int64)
    for s, e in _row_blocks(len(Xte), len(ytr)):
        sim = unit(Xte[s:e]) @ Ttr.T                    # b×N = (b×D)(D×N)
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        w = np.exp(np.take_along_axis(sim, top, axis=1) / temperature)
        votes = np.zeros((e - s, C))
        np.add.at(votes, (np.arange(e - s)[:, None], ytr[top]), w)
        pred[s:e] = np.argmax(votes, axis=1)
    return pred


def probe_knn(features, labels, *, folds=5, seed=0, max_samples=20000):
    """k-fold weighted k-NN accuracy (k = 20, cosine similarity, exp(sim/0.07) votes) on standardised
    features."""
    return _probe_accuracy(features, labels, folds, seed, max_samples, _knn_predict)


def _minmax(v):
    """(v − min)/(max − min) over the pool; all zeros when every model ties."""
    v = np.asarray(v, dtype=np.float64)
    span = v.max() - v.min()
    return (v - v.min()) / span if span > 0 else np.zeros_like(v)


def combine(method, parts_by_model):
    """Pool-relative scores ``{model: score}`` from ``{model: *_parts(...)}``.

    "etran": 0.15·minmax(energy) + 0.85·minmax(lda) (ETran ``tw.py``); "ncti":
    minmax(ncc) + minmax(seli) − minmax(vc) (NCTI ``evaluate_metric_group*_cpu.py``); "sa":
    NCTI's combination for NCTI-based parts, else the scores unchanged. Min-max over a pool
    whose values all tie gives 0 (the reference divides by zero).
    """
    if not parts_by_model:
        raise ValueError("combine needs parts of at least one model")
    names = list(parts_by_model)

    def column(key):
        missing = [m for m in names if key not in parts_by_model[m]]
        if missing:
            raise ValueError(f"{method} parts of model {missing[0]!r} lack {key!r}")
        return np.array([float(parts_by_model[m][key]) for m in names])

    if method == "etran":
        score = 0.15 * _minmax(column("energy")) + 0.85 * _minmax(column("lda"))
    elif method == "ncti" or (method == "sa" and all("seli" in parts_by_model[m] for m in names)):
        score = _minmax(column("ncc")) + _minmax(column("seli")) - _minmax(column("vc"))
    elif method == "sa":
        score = column("score")
    else:
        raise ValueError(f"combine: unknown pool-relative method {method!r} "
                         f"(expected one of {sorted(POOL_METHODS)})")
    return {m: float(s) for m, s in zip(names, score)}


METHODS = {
    "logme": logme, "logme_published": logme_published, "logme_icml": logme_icml,
    "leep": leep, "nce": nce, "hscore": hscore, "reg_hscore": reg_hscore,
    "transrate": transrate, "transrate_published": transrate_published, "nleep": nleep,
    "parc": parc, "gbc": gbc, "sfda": sfda, "etran": etran, "ped": ped, "ncti": ncti, "sa": sa,
    "probe_ridge": probe_ridge, "probe_ncm": probe_ncm, "probe_knn": probe_knn,
}
POOL_METHODS = {"etran": etran_parts, "ncti": ncti_parts, "sa": sa_parts}
TABLE1 = ("logme", "nleep", "parc", "sfda", "etran", "ped", "sa")    # the ITM paper's Table 1

# What each key computes, for table rows: the variant, where the method has several.
DISPLAY_NAMES = {
    "logme": "LogME (evidence maximum, corrected for N ≤ D)",
    "logme_published": "LogME (published fixed point)",
    "logme_icml": "LogME (published ICML'21 iteration)",
    "leep": "LEEP (mean log EEP, source probabilities)",
    "nce": "NCE (source predictions)",
    "hscore": "H-score (pseudo-inverse covariance)",
    "reg_hscore": "H-score (Ledoit–Wolf regularised)",
    "transrate": "TransRate (ε = 1e-4 on features scaled to unit RMS spread)",
    "transrate_published": "TransRate (published, absolute ε = 1e-4)",
    "nleep": "NLEEP (seeded mixture, with log, unit RMS spread, ≤ 10k samples)",
    "parc": "PARC (PCA-32, ≤ 15k samples)",
    "gbc": "GBC (spherical, PCA-64, variance clamp relative to the RMS spread)",
    "sfda": "SFDA (as published)",
    "etran": "ETran (as shipped: identity-covariance LDA + energy, pool min-max)",
    "ped": "PED (SFDA base, published command-line defaults)",
    "ncti": "NCTI (exact PCA-64, pool min-max)",
    "sa": "SA (LDA base, Spread discarded as shipped)",
    "probe_ridge": "Probe: ridge on standardised features (5-fold, α by leave-one-out)",
    "probe_ncm": "Probe: nearest class mean (5-fold, standardised)",
    "probe_knn": "Probe: k-NN (k = 20, cosine, 5-fold, standardised)",
}


# ============================================================================== scoring a pool

def score_pool(feature_sets, labels, methods, executor=None, progress=None, *,
               reference_features=None, options=None):
    """Score every model of a pool with every method; a failure costs one cell, not the run.

    ``feature_sets``: {model: N×D features}; ``methods``: keys of ``METHODS``. One task per
    (method, model) — for pool-relative methods (``POOL_METHODS``) the task computes that
    model's parts and ``combine`` normalises over the models whose parts succeeded. Tasks run
    in order here, or on ``executor`` (any ``concurrent.futures.Executor``: threads,
    processes, or a cluster's); the result is the same either way and in input order,
    whatever finishes first. Warnings raised in other processes are re-issued here.

    ``progress(done, total, method, model, outcome)`` is called here after each task, with
    ``outcome = {"value": score, parts or None, "error": reason or None, "seconds": s}``.
    ``reference_features``: {model: ImageNet features} for PED; ``options``: {method:
    {keyword: value}} passed on. Returns ``{"scores": {method: {model: float or None}},
    "errors": {method: {model: reason}}}``; a task that raises or returns a non-finite score
    gives None with its one-line reason.
    """
    methods = _check_methods(methods)
    if not isinstance(feature_sets, dict) or not feature_sets:
        raise ValueError("score_pool needs a non-empty {model: features} mapping")
    reference_features, options = reference_features or {}, options or {}
    tasks = [(method, model) for method in methods for model in feature_sets]
    args = [(method, feature_sets[model], labels,
             _task_options(method, model, options, reference_features), os.getpid())
            for method, model in tasks]
    outcomes = _run_tasks(args, executor, lambda i, done, out: progress and progress(
        done, len(tasks), *tasks[i], out))
    return _assemble(methods, list(feature_sets), dict(zip(tasks, outcomes)))


def _check_methods(methods):
    methods = [methods] if isinstance(methods, str) else list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown method {unknown[0]!r} (choose from {', '.join(METHODS)})"
                         if unknown else "no methods given")
    return methods


def _check_cli_methods(methods):
    """The CLI scores features: methods that need source-model probabilities cannot run there."""
    methods = _check_methods(methods)
    needs = [m for m in methods if m in ("leep", "nce")]
    if needs:
        raise ValueError(f"{needs[0]} needs the source model's class probabilities, not features; "
                         "call baselines.leep/nce from Python")
    return methods


def _task_options(method, model, options, reference_features):
    kwargs = dict(options.get(method, {}))
    if method == "ped" and model in reference_features:
        kwargs.setdefault("reference_features", reference_features[model])
    return kwargs


def _run_tasks(args, executor, report):
    """Outcomes of ``_score_task(*a)`` for each ``a`` in order, serially or on ``executor``."""
    outcomes = [None] * len(args)
    if executor is None:
        for i, a in enumerate(args):
            outcomes[i] = _score_task(*a)
            report(i, i + 1, outcomes[i])
        return outcomes
    futures = {executor.submit(_score_task, *a): i for i, a in enumerate(_shared(args, executor))}
    for done, future in enumerate(as_completed(futures), 1):
        i = futures[future]
        try:
            outcomes[i] = future.result()
        except Exception as err:       # the executor failed the task (e.g. a worker died)
            outcomes[i] = {"value": None, "error": _reason(err), "seconds": None, "warnings": []}
        for category, message in outcomes[i].pop("warnings", []):
            warnings.warn(message, category, stacklevel=2)
        report(i, done, outcomes[i])
    return outcomes


def _shared(args, executor):
    """The tasks' arguments with each model's features and the labels sent once, where the
    executor can (``share``, as itm.make_executor's has), instead of once per method."""
    share = getattr(executor, "share", None)
    if share is None:
        return args
    sent = {}                          # by id: the arrays stay alive in ``args`` meanwhile

    def once(x):
        if id(x) not in sent:
            sent[id(x)] = share(x)
        return sent[id(x)]
    return [(method, once(F), once(y), kwargs, pid) for method, F, y, kwargs, pid in args]


def _score_task(method, features, labels, kwargs, parent_pid):
    """One (method, model) cell: {"value", "error", "seconds", "warnings"}. In another process
    the warnings are recorded for the caller; in the caller's process they pass through."""
    start = time.perf_counter()
    elsewhere = os.getpid() != parent_pid
    with warnings.catch_warnings(record=True) if elsewhere else contextlib.nullcontext() as seen:
        if elsewhere:
            warnings.simplefilter("always")
        try:
            value, error = _score_value(method, features, labels, kwargs), None
        except Exception as err:       # any failure is this cell's reason, the rest still runs
            value, error = None, _reason(err)
    return {"value": value, "error": error, "seconds": time.perf_counter() - start,
            "warnings": [(w.category, str(w.message)) for w in seen or []]}


def _score_value(method, features, labels, kwargs):
    if method in POOL_METHODS:
        parts = POOL_METHODS[method](features, labels, **kwargs)
        bad = [k for k, v in parts.items() if not math.isfinite(float(v))]
        if bad:
            raise ValueError(f"non-finite {method} part {bad[0]!r} ({parts[bad[0]]})")
        return parts
    value = float(METHODS[method](features, labels, **kwargs))
    if not math.isfinite(value):
        raise ValueError(f"non-finite score ({value})")
    return value


def _reason(err):
    text = itm.one_line(err)
    return text if isinstance(err, ValueError) else f"{type(err).__name__}: {text}"


def _assemble(methods, models, outcomes):
    scores, errors = {}, {}
    for method in methods:
        cells = {m: outcomes[method, m] for m in models}
        errors[method] = {m: c["error"] for m, c in cells.items() if c["error"] is not None}
        values = {m: c["value"] for m, c in cells.items() if c["error"] is None}
        if method in POOL_METHODS and values:
            values = combine(method, values)
        scores[method] = {m: values.get(m) for m in models}
    return {"scores": scores, "errors": errors}


# ============================================================================== command line

def _default_methods():
    try:
        import sklearn  # noqa: F401
        return ",".join(TABLE1)
    except ImportError:
        return ",".join(m for m in TABLE1 if m != "nleep")


def _parser():
    p = itm.CLIParser(prog=PROG, description="Score pre-trained models with the "
                      "baseline transferability-estimation methods (higher = better).")
    p.add_argument("--features", required=True, help=".npz with one N×D array per model (and "
                   "optionally 'labels'), one model's .npy (with --labels), or a folder of "
                   "<model>.npy plus labels.npy (memory-mapped)")
    p.add_argument("--labels", help=".npy of N labels (ints or strings); default: the "
                   "'labels' array of the .npz or folder")
    p.add_argument("--methods", default=_default_methods(),
                   help=f"comma-separated, from {','.join(METHODS)} (default: %(default)s)")
    p.add_argument("--models", help="comma-separated subset of the models in --features")
    p.add_argument("--reference", help=".npz with ImageNet features per model, for ped")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a "
                   "table: {dataset, methods, scores: {method: {model: score or null}}, errors}")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--jobs", type=int, default=1, help="score this many cells (method × model) in "
                   "parallel processes")
    p.add_argument("--scheduler", help="score on a Dask cluster: a scheduler address "
                   "(tcp://host:8786), or local:N for N worker processes on this machine (needs "
                   "the cluster extra)")
    return p


def _cli_executor(args, tasks):
    """The executor the pool runs on (None: serially, here), as a context manager: a Dask
    cluster's (itm.make_executor: no Dask is a one-line error), or forked processes — never
    more than there are tasks (``--jobs 10**20`` is as many as there are cells)."""
    if args.scheduler is not None:
        return itm.make_executor(args.scheduler)
    if min(args.jobs, tasks) > 1:
        return itm.sibling("itm_parallel", "--jobs").fork_pool(min(args.jobs, tasks))
    return contextlib.nullcontext()


def _load_inputs(args, methods):
    """({model: features}, labels, {model: reference features}), all checked before work."""
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    feature_sets, labels = itm.load_features(args.features, args.labels, models)
    dense = [m for m, F in feature_sets.items() if np.ndim(F) == 4]
    if dense or np.ndim(labels) == 3:
        raise ValueError("these baselines score one label per image; dense (segmentation) input "
                         f"— features N×h×w×D{' (' + dense[0] + ')' if dense else ''} or label "
                         "maps — is scored by itm.py only")
    y, classes = itm.encode_labels(labels, min_count=1)
    for m, F in feature_sets.items():
        if np.ndim(F) != 2:
            raise ValueError(f"model {m!r}: features must be a 2-D array N×D (one row per "
                             f"sample), got shape {np.shape(F)}")
        if np.shape(F)[0] != len(y):
            raise ValueError(f"N mismatch: model {m!r} has features of shape {np.shape(F)} but "
                             f"labels have {len(y)} entries")
    reference = {}
    if args.reference:
        if "ped" not in methods:
            raise ValueError("--reference is for ped, which is not among --methods")
        reference = _load_reference(args.reference)
    return feature_sets, labels, reference


def _load_reference(path):
    """{model: ImageNet features} from an .npz (a 'labels' array in it is ignored)."""
    if not os.path.isfile(path):
        raise ValueError(f"--reference file not found: {path}")
    try:
        npz = np.load(path, allow_pickle=False)
    except ValueError:   # numpy's "pickled data" message for anything that is neither .npy nor .npz
        raise ValueError(f"cannot read --reference file {path}: not an .npz archive") from None
    except (OSError, EOFError) as err:
        raise ValueError(f"cannot read --reference file {path}: {itm.one_line(err)}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"--reference file {path}: expected an .npz with one array per model")
    try:
        with npz:
            return {k: npz[k] for k in npz.files if k != "labels"}
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"cannot read --reference file {path}: {itm.one_line(err)}") from None


def _cell(value, error):
    return f"n/a ({error})" if error is not None else f"{value:.6g}"


def _format_table(result, methods, models):
    rows = [["model"] + list(methods)]
    rows += [[m] + [_cell(result["scores"][k][m], result["errors"][k].get(m)) for k in methods]
             for m in models]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))) for r in rows)


def _progress_printer(quiet):
    def report(done, total, method, model, outcome):
        if outcome["error"] is not None:
            what = f"n/a ({outcome['error']})"
        elif isinstance(outcome["value"], dict):
            what = "parts done"
        else:
            what = f"{outcome['value']:.6g}"
        print(f"[{done}/{total}] {method} / {model}: {what} ({outcome['seconds'] or 0:.2f} s)",
              file=sys.stderr, flush=True)
    return None if quiet else report


def _main(argv):
    args = _parser().parse_args(argv)
    itm.check_parallel(args)
    methods = _check_cli_methods([m.strip().lower() for m in args.methods.split(",") if m.strip()])
    feature_sets, labels, reference = _load_inputs(args, methods)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _cli_executor(args, len(methods) * len(feature_sets)) as executor:
            result = score_pool(feature_sets, labels, methods, executor,
                                progress=_progress_printer(args.quiet),
                                reference_features=reference)
    for message in dict.fromkeys(itm.one_line(w.message) for w in caught):
        print(f"{PROG}: warning: {message}", file=sys.stderr)
    failed = sum(len(e) for e in result["errors"].values())
    if failed == len(methods) * len(feature_sets):      # nothing scored: the first reason, exit 1
        method = next(k for k in methods if result["errors"][k])
        model, reason = next(iter(result["errors"][method].items()))
        raise ValueError(f"no model could be scored by any method (the first: {method} / {model}: "
                         f"{reason})")
    if failed:
        print(f"{PROG}: warning: {failed} of {len(methods) * len(feature_sets)} cells are "
              "n/a (the reasons are in the table / under \"errors\")", file=sys.stderr)
    if args.json:
        print(json.dumps({"dataset": itm.dataset_name(args.features), "methods": methods,
                          **result}, indent=2))
    else:
        print(_format_table(result, methods, list(feature_sets)))
    sys.stdout.flush()                 # a reader that left (`| head`) raises here, inside run_cli
    return 0


def main(argv=None):
    """CLI entry point; returns the exit status (errors: one line on stderr, status 1)."""
    return itm.run_cli(PROG, _main, argv)


if __name__ == "__main__":
    # run as the module itself, not as __main__: the tasks sent to a Dask cluster then name their
    # functions, instead of cloudpickle copying this script's globals (locks included) by value
    import importlib
    sys.exit(importlib.import_module(__spec__.name if __spec__ else
                                     os.path.splitext(os.path.basename(__file__))[0]).main())

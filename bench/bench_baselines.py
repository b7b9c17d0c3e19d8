"""Benchmarks for baselines.py (run: ``python -m pytest bench/bench_baselines.py --benchmark-only``).

Targets at N = 50,000, D = 2048, C = 100 (float32 input, the shape of CIFAR-100 on a ResNet-50),
on a 2-core machine: LogME <= 8 s, SFDA <= 15 s, ETran <= 10 s, NCTI <= 10 s, where the published
code takes 46, 65, 28 and 17 s. The ``reference-*`` cases time straightforward re-implementations
of the published algorithms (the same operations as the authors' code: thuml's truncated SVD with
U = XV/s and a per-class loop, SFDA's per-class covariances and scipy's generalized eigh twice,
ETran's covariances + inv + eigh and torch-style logsumexp, NCTI's scikit-learn PCA + LDA) in the
same run, so ours/reference ratios are measured under the same machine load — read the ratios,
absolute seconds depend on what else runs. ``BASELINES_BENCH_REFERENCE=0`` skips them (~3 min).
NLEEP and PARC run at their default caps (NLEEP: a 10,000-sample stratified subsample; PARC:
15,000). The small cases use the synthetic set of DESIGN.md §6 (N = 3000, D = 128, C = 10).

Features are class-structured and low-rank plus noise, rectified like pooled CNN features, so that
NLEEP's 80 %-variance PCA keeps a realistic ~200 dimensions. Nothing is built at import.
"""
import functools
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so `pytest bench` works without an installed package
    sys.path.insert(0, str(ROOT))

import baselines as B  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from test_baselines import naive_fda, naive_logme, naive_ncti  # noqa: E402  (the tests' oracles = published code)

BIG = (50_000, 2048, 100)
REFERENCE = os.environ.get("BASELINES_BENCH_REFERENCE", "1") not in ("0", "")
try:
    import sklearn  # noqa: F401
    HAVE_SKLEARN = True
except ImportError:
    HAVE_SKLEARN = False


@functools.lru_cache(maxsize=None)
def structured(N, D, C, rank=64, seed=0):
    """float32 features relu(H A + 0.1 ε), H = class mean + N(0, I) in a rank-64 latent space."""
    rng = np.random.default_rng(seed)
    y = np.arange(N) % C
    rng.shuffle(y)
    means = (0.5 * rng.standard_normal((C, rank))).astype(np.float32)
    A = (rng.standard_normal((rank, D)) / np.sqrt(rank)).astype(np.float32)
    X = (means[y] + rng.standard_normal((N, rank), dtype=np.float32)) @ A
    for start in range(0, N, 8192):                   # no N×D temporaries beyond X itself
        block = X[start:start + 8192]
        block += 0.1 * rng.standard_normal(block.shape, dtype=np.float32)
        np.maximum(block, 0, out=block)
    return X, y


@functools.lru_cache(maxsize=None)
def section5():
    """DESIGN.md §6's synthetic set: N=3000, D=128, C=10, sep=0.25, seed=0."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 3000)
    mu = rng.standard_normal((10, 128)) * 0.25
    return np.maximum(mu[y] + rng.standard_normal((3000, 128)), 0).astype(np.float32), y


def run(benchmark, func, *args, rounds=1, **kwargs):
    return benchmark.pedantic(func, args=args, kwargs=kwargs, rounds=rounds, iterations=1,
                              warmup_rounds=0)


# ============================================================================ §5 size, every method

SMALL_CASES = {
    "logme": B.logme, "sfda": B.sfda, "etran": B.etran_parts, "ncti": B.ncti_parts,
    "transrate": B.transrate, "hscore": B.hscore, "reg_hscore": B.reg_hscore, "gbc": B.gbc,
    "parc": B.parc, "sa": B.sa,
    "ped": lambda X, y: B.ped(X, y, reference_features=X[:1000]),
}


@pytest.mark.benchmark(group="baselines N=3000 D=128 C=10")
@pytest.mark.parametrize("name", sorted(SMALL_CASES))
def test_small(benchmark, name):
    X, y = section5()
    SMALL_CASES[name](X, y)                           # compile numba kernels outside the timing
    run(benchmark, SMALL_CASES[name], X, y, rounds=3)


@pytest.mark.benchmark(group="baselines N=3000 D=128 C=10")
def test_small_itm(benchmark):
    """ITM at default settings on the same set, in the same run, for docs/speed.md's side-by-side table."""
    import itm
    X, y = section5()
    itm.itm_score(X, y, iterations=2, eval_every=1)   # compile itm's kernels outside the timing
    run(benchmark, itm.itm_score, X, y, rounds=3)


@pytest.mark.benchmark(group="baselines N=3000 D=128 C=10")
@pytest.mark.skipif(not HAVE_SKLEARN, reason="nleep needs scikit-learn")
def test_small_nleep(benchmark):
    run(benchmark, B.nleep, *section5())


# ============================================================================ N=50k D=2048 C=100

TARGETS = {"logme": (B.logme, 8.0), "sfda": (B.sfda, 15.0), "etran": (B.etran_parts, 10.0),
           "ncti": (B.ncti_parts, 10.0)}


@pytest.mark.benchmark(group="baselines N=50000 D=2048 C=100")
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_big(benchmark, name):
    X, y = structured(*BIG)
    func, target = TARGETS[name]
    benchmark.extra_info["target_s"] = target
    run(benchmark, func, X, y, rounds=3)


@pytest.mark.benchmark(group="baselines N=50000 D=2048 C=100")
def test_big_parc_default_cap(benchmark):
    benchmark.extra_info["cap"] = 15_000
    run(benchmark, B.parc, *structured(*BIG))


@pytest.mark.benchmark(group="baselines N=50000 D=2048 C=100")
@pytest.mark.skipif(not HAVE_SKLEARN, reason="nleep needs scikit-learn")
def test_big_nleep_default_cap(benchmark):
    benchmark.extra_info["cap"] = 10_000
    run(benchmark, B.nleep, *structured(*BIG))


# ---------------------------------------------------------------------------- published algorithms

def _fda_proba(X, y, shrinkage=None, etran=False):
    proba, lam = naive_fda(X, y, shrinkage, etran)      # SFDA's / ETran's LDA, as the tests' oracle
    return proba(X), lam


def reference_logme(X, y):
    """thuml/LogME fixed point: truncated SVD (svd of XᵀX, U = XV/s), one class at a time."""
    return naive_logme(X, y)


def reference_sfda(X, y):
    """TencentARC/SFDA ``SFDA_Score`` on a float64 copy."""
    X = X.astype(np.float64)
    C = int(y.max()) + 1
    prob, lam = _fda_proba(X, y)
    prob = np.exp(prob) / np.exp(prob).sum(axis=1, keepdims=True)
    means = np.stack([X[y == c].mean(axis=0) for c in range(C)])
    for c in range(C):
        idx = np.where(y == c)[0]
        w = prob[idx, c][:, None]
        X[idx] = w * X[idx] + (1 - w) * (means.sum(axis=0) - means[c]) / (C - 1)
    prob, _ = _fda_proba(X, y, lam)
    return prob[np.arange(len(y)), y].mean()


def reference_etran(X, y):
    """mgholamikn/ETran ``LDA_Score`` and ``Energy_Score(X, 0.5, 'bot')``."""
    import scipy.special
    prob, _ = _fda_proba(X, y, etran=True)
    energy = scipy.special.logsumexp(X, axis=-1)
    keep = np.argsort(energy)[: 5 * len(energy) // 1000]
    return {"energy": energy[keep].mean(), "lda": prob[np.arange(len(y)), y].mean()}


def reference_ncti(X, y):
    """BUserName/NCTI ``NCTI_Score`` (scikit-learn PCA + LinearDiscriminantAnalysis), on float32 input."""
    return naive_ncti(X, y, float64=False)


REFERENCES = {"logme": reference_logme, "sfda": reference_sfda, "etran": reference_etran,
              "ncti": reference_ncti}


@pytest.mark.benchmark(group="baselines N=50000 D=2048 C=100")
@pytest.mark.skipif(not REFERENCE, reason="BASELINES_BENCH_REFERENCE=0")
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_big_reference(benchmark, name):
    if name == "ncti" and not HAVE_SKLEARN:
        pytest.skip("the NCTI reference needs scikit-learn")
    run(benchmark, REFERENCES[name], *structured(*BIG))

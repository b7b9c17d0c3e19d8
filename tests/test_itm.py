"""Tests for itm.py: each computation written twice — ours vs an independent oracle — asserted equal.

Oracles: tests/itm_torch_ref.py (the naive n-step propagation, Algorithm 1 and Algorithm 2 in torch with
autograd and torch.optim.AdamW), 1100-digit decimal arithmetic for φ and Ψ, DESIGN.md's definitions
recomputed directly for the plan, and scipy.stats.weightedtau for τ_w. The random choices of a run
(split, centres, initial weights, batch order) come from itm.make_plan so both sides solve the same
problem. Sizes are small; seeds are fixed.
"""
import csv
import functools
import json
import math
import os
import re
import subprocess
import sys
import warnings
from decimal import Decimal, localcontext
from pathlib import Path

import numpy as np
import pytest
import scipy.stats as st
import torch

import itm
from tests import itm_torch_ref as ref

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(iterations=50, batch_size=32, eval_every=10)  # a small, fast run


def blobs(seed=0, N=360, D=24, K=6, sep=1.0, dtype=np.float32):
    """N samples of K Gaussian classes in R^D, class means sep·N(0, I) apart (labels shuffled)."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(N) % K)
    means = rng.standard_normal((K, D))
    return (sep * means[y] + rng.standard_normal((N, D))).astype(dtype), y


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # conftest.py


@pytest.fixture(params=["numba", "numpy"])
def backend(request, monkeypatch):
    """Run a test through the numba kernels and through the pure NumPy fallback."""
    if request.param == "numba" and not itm.HAVE_NUMBA:
        pytest.skip("numba is not installed: only the NumPy path exists")
    monkeypatch.setattr(itm, "USE_NUMBA", request.param == "numba")
    return request.param


def max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


# ----------------------------------------------------------------------------------------------------
# Crafted Θ for the propagation tests: the spectra that need care (zero, repeated, near-repeated eigenvalues).

ETA = 0.01  # the step size η of the crafted-Θ tests (the default)
BRANCHES = {"gram": (48, 12), "kernel": (12, 30)}  # (B, Z): Z ≤ B uses G = s·ΘᵀΘ, Z > B uses C = s·ΘΘᵀ


def orthonormal_columns(rng, rows, cols):
    """rows×cols with orthonormal columns (rows ≥ cols), from the QR of a Gaussian matrix."""
    q, _ = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q


def crafted_theta(case, branch, rng):
    """A B×Z float64 Θ (B, Z = BRANCHES[branch]) whose spectrum of s·ΘᵀΘ / s·ΘΘᵀ (s = 1/B) is `case`:

    rank_deficient     Θ = L·R with inner dimension 3: rank 3 < min(B, Z), the rest exact-rank zeros
    duplicate_rows     4 distinct rows, each repeated (rank ≤ 4)
    repeated           Θ = c·U, U with orthonormal columns (gram) / rows (kernel): every nonzero
                       eigenvalue equals c²/B = 0.7
    repeated_and_zero  orthonormal columns (gram) / rows (kernel) on half the width, zero elsewhere:
                       eigenvalue 0.7 repeated plus exact zeros
    near_repeated      eigenvalues in pairs 1e-9 apart (0.2 + 0.1·k and 0.2 + 0.1·k + 1e-9)
    unit_rows          Gaussian rows scaled to unit L2 norm (what normalize="theta" produces)
    """
    B, Z = BRANCHES[branch]
    m = min(B, Z)
    if case == "rank_deficient":
        return rng.standard_normal((B, 3)) @ rng.standard_normal((3, Z)) / 3.0
    if case == "duplicate_rows":
        return rng.standard_normal((4, Z))[rng.permutation(np.arange(B) % 4)] / math.sqrt(Z)
    c = math.sqrt(0.7 * B)
    if case == "repeated":
        return c * (orthonormal_columns(rng, B, Z) if branch == "gram" else orthonormal_columns(rng, Z, B).T)
    if case == "repeated_and_zero":
        theta = np.zeros((B, Z))
        if branch == "gram":   # half the columns orthonormal, the others exactly zero
            theta[:, rng.permutation(Z)[:Z // 2]] = c * orthonormal_columns(rng, B, Z // 2)
        else:                  # half the rows orthonormal, the others exactly zero
            theta[rng.permutation(B)[:B // 2]] = c * orthonormal_columns(rng, Z, B // 2).T
        return theta
    if case == "near_repeated":
        lam = 0.2 + 0.1 * (np.arange(m) // 2) + 1e-9 * (np.arange(m) % 2)
        sv = np.sqrt(lam * B)  # s·σ² = λ
        return orthonormal_columns(rng, B, m) @ (sv[:, None] * orthonormal_columns(rng, Z, m).T)
    if case == "unit_rows":
        theta = rng.standard_normal((B, Z))
        return theta / np.linalg.norm(theta, axis=1, keepdims=True)
    raise ValueError(case)


# ----------------------------------------------------------------------------------------------------
# φ and Ψ against 1100-digit decimal arithmetic.

@functools.lru_cache(maxsize=None)
def divided_difference(a, b, n, eta, order):
    """Exact divided difference of f(λ) = (1 − ηλ)ⁿ at the float nodes (a, b) (order 1) or (a, b, 0)
    (order 2), to 1100 digits, rounded once to float64. f = Σ_k C(n,k)(−η)ᵏλᵏ, and the divided
    difference of λᵏ over m + 1 nodes is h_{k−m}(nodes), h_j(a, b) = Σ_i aⁱ b^{j−i} (h_j(a, b, 0) =
    h_j(a, b)): so f[a, b] = Σ_{k≥1} C(n,k)(−η)ᵏ h_{k−1}(a, b) and f[a, b, 0] = Σ_{k≥2} C(n,k)(−η)ᵏ
    h_{k−2}(a, b) — polynomials, exact for any a, b (f' and φ' where a == b), no division at all."""
    with localcontext() as ctx:
        ctx.prec = 1100
        A, Bn, E = Decimal(a), Decimal(b), Decimal(eta)  # exact binary values of the floats
        total, h, bpow, power = Decimal(0), Decimal(1), Decimal(1), (-E) ** order
        for k in range(order, n + 1):
            total += math.comb(n, k) * power * h          # h = h_{k−order}(a, b)
            power *= -E
            bpow *= Bn
            h = A * h + bpow
        return float(total)


def psi_reference(lam, n, eta, order):
    return np.array([[divided_difference(*sorted((float(a), float(b))), n, eta, order) for b in lam]
                     for a in lam])


def phi_reference(lam, n, eta):
    """φ(λ) = ((1 − ηλ)ⁿ − 1)/λ = f[λ, 0] (φ(0) = f'(0) = −nη)."""
    return np.array([divided_difference(0.0, float(a), n, eta, 1) for a in lam])


LAMBDAS = {
    "zero": [0.0, 0.0, 0.5, 1.0],
    "tiny": [0.0, 1e-17, 1e-12, 2e-12, 0.3],
    "equal": [0.25, 0.25, 0.7, 0.7, 0.7],
    "near": [0.4, 0.4 + 1e-15, 0.4 + 1e-9, 0.4 + 1e-6, 0.0],
    "general": list(np.random.default_rng(7).uniform(0.0, 1.0, 6)),
    "beyond": [150.0, 150.0 + 1e-9, 120.0, 100.0, 0.5, 0.0],  # ηλ > 1: 1 − ηλ < 0 (and = 0 at λ = 100)
}


def lambda_cases():
    """(case, n): the λ ∈ [0, 1] sets with n ∈ {1, 37, 400}; ηλ up to 1.5 with n ∈ {1, 3}."""
    return [(case, n) for case in LAMBDAS for n in ((1, 3) if case == "beyond" else (1, 37, 400))]


def assert_close_to_largest(ours, exact, tol, floor):
    """max |ours − exact| ≤ tol · max(largest |exact|, floor); floor covers an all-zero exact matrix."""
    scale = max(float(np.abs(exact).max()), floor)
    err = max_err(ours, exact) / scale
    assert err <= tol, (err, ours, exact)
    return err


@pytest.mark.parametrize("case,n", lambda_cases())
def test_phi_vs_decimal(case, n, backend):
    """itm.phi against the exact f[λ, 0], entry by entry relative (φ never vanishes for ηλ < 2, n ≥ 1)."""
    lam = np.array(LAMBDAS[case])
    ours, exact = itm.phi(lam, n, ETA), phi_reference(lam, n, ETA)
    rel = np.abs(ours - exact) / np.abs(exact)
    assert rel.max() <= 1e-13, (rel.max(), ours, exact)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("case,n", lambda_cases())
def test_psi_vs_decimal(case, n, order, backend):
    """itm.psi (the Daleckii–Krein matrix: f[λ_i, λ_j] for order 1, φ[λ_i, λ_j] = f[λ_i, λ_j, 0] for
    order 2) against the exact divided differences, relative to the largest entry. With n = 1, order 2
    is exactly zero (φ is the constant −η): then the floor η² is the scale."""
    lam = np.array(LAMBDAS[case])
    ours = itm.psi(lam, n, ETA, order)
    assert ours.shape == (lam.size, lam.size)
    assert_close_to_largest(ours, psi_reference(lam, n, ETA, order), 1e-11, ETA ** 2)


@pytest.mark.parametrize("order", [1, 2])
def test_phi_psi_exact_tiny_gaps(order, backend):
    """Pairs a != b closer than ulp(1)/η, so that 1 − ηa == 1 − ηb in float64: the naive quotient
    ((1 − ηa)ⁿ − (1 − ηb)ⁿ)/(a − b) would be 0; the exact divided difference is ≈ f'(a) (φ'(a))."""
    pairs = [(a, np.nextafter(a, 2.0)) for a in (0.3, 0.7, 1.0, 1e-3)]
    pairs += [(1e-17, 3e-17), (0.5, 0.5 + 3 * 2.0 ** -53), (0.9, 0.9 + 2e-15)]
    for a, b in pairs:
        assert a != b and 1.0 - ETA * a == 1.0 - ETA * b, (a, b)
    lam = np.array([x for pair in pairs for x in pair])
    for n in (37, 400):
        ours, exact = itm.psi(lam, n, ETA, order), psi_reference(lam, n, ETA, order)
        assert_close_to_largest(ours, exact, 1e-11, ETA ** 2)
        rel = np.abs(ours - exact) / np.abs(exact)  # here every entry is far from 0: entrywise too
        assert rel.max() <= 1e-11, rel.max()
        phi_exact = phi_reference(lam, n, ETA)
        phi_rel = np.abs(itm.phi(lam, n, ETA) - phi_exact) / np.abs(phi_exact)
        assert phi_rel.max() <= 1e-13, phi_rel.max()


# ----------------------------------------------------------------------------------------------------
# The plan (DESIGN.md §1 steps 1–5: split, adaptive n, centres, initialisation, batch order),
# recomputed from DESIGN.md's definitions.

def uneven_data(seed=0, sep=1.0, dtype=np.float64):
    """Classes of 2, 3, 7, 40 and 108 samples (a class of 2 must land in both parts), D = 16 with one
    constant dimension (std 0: contributes 0 to the adaptive-n distance) and one with a large offset."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.repeat(np.arange(5), [2, 3, 7, 40, 108]))
    X = sep * rng.standard_normal((5, 16))[y] + rng.standard_normal((y.size, 16))
    X[:, 3] = 2.5
    X[:, 7] += 1e3
    return X.astype(dtype), y


def spec_adaptive_n(X, y, train, cfg):
    """Eq. 9 literally: standardise over the training part, mean L2 distance to the own class mean."""
    Xt, yt = X[train].astype(np.float64), y[train]
    std = Xt.std(axis=0)
    S = np.where(std > 0, (Xt - Xt.mean(axis=0)) / np.where(std > 0, std, 1.0), 0.0)
    means = np.stack([S[yt == k].mean(axis=0) for k in range(int(y.max()) + 1)])
    dis = float(np.mean(np.linalg.norm(S - means[yt], axis=1)))
    n = math.ceil(math.log(cfg.dis_b / dis) / math.log(1.0 - cfg.eta0)) + cfg.n_b
    return max(n, 1), dis


@pytest.mark.parametrize("seed", [0, 1])
def test_plan_split_matches_spec(seed):
    """Stratified split: disjoint, together all N, every class (even one of 2 samples) in both parts, the
    scoring part 1/5 of each class (rounded; at least 1, at most all but 1)."""
    X, y = uneven_data(seed)
    plan = itm.make_plan(X, y, itm.Config(seed=seed, batch_size=16, iterations=30, folds=1))
    train, score = plan.train_idx, plan.score_idx
    assert np.intersect1d(train, score).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, score])), np.arange(y.size))
    assert np.array_equal(plan.y, y)
    for k in range(5):
        total, in_score = np.sum(y == k), np.sum(y[score] == k)
        assert 1 <= in_score <= total - 1
        assert abs(in_score - total / 5) <= 1, (k, in_score, total)
    other = itm.make_plan(X, y, itm.Config(seed=seed + 10, batch_size=16, iterations=30, folds=1))
    assert not np.array_equal(np.sort(other.score_idx), np.sort(score))  # the split follows the seed


@pytest.mark.parametrize("sep,dtype", [(1.0, np.float64), (0.2, np.float32), (1e4, np.float64)])
def test_plan_adaptive_n_matches_spec(sep, dtype):
    """plan.n and plan.dis against Eq. 9 recomputed in float64 (sep = 1e4: n clamped to 1)."""
    X, y = uneven_data(3, sep=sep, dtype=dtype)
    cfg = itm.Config(batch_size=16, iterations=10, preprocess="none")  # Eq. 9 on the features as given
    plan = itm.make_plan(X, y, cfg)
    n, dis = spec_adaptive_n(X, y, plan.train_idx, cfg)
    assert abs(plan.dis - dis) <= 1e-9 * dis, (plan.dis, dis)
    assert plan.n == n
    if sep == 1e4:
        assert n == 1
    assert np.isnan(itm.make_plan(X, y, cfg, n=7).dis) and itm.make_plan(X, y, cfg, n=7).n == 7


@pytest.mark.parametrize("normalize", ["theta", "features"])
def test_plan_onehot_centres_shifted(normalize):
    """Default centres: one-hot, shifted by the scalar mean μ and std σ of all training-feature entries
    (after row normalisation when normalize="features"): Ê = μ + σ·I. Unshifted with shift=False."""
    X, y = uneven_data(4)
    cfg = itm.Config(batch_size=16, iterations=10, normalize=normalize, preprocess="none")
    plan = itm.make_plan(X, y, cfg)
    F = X[plan.train_idx]
    if normalize == "features":
        F = F / np.linalg.norm(F, axis=1, keepdims=True)
    mu, sigma = F.mean(), F.std()
    assert max_err(plan.centres, mu + sigma * np.eye(5)) <= 1e-12 * max(1.0, abs(mu) + sigma)
    assert np.array_equal(plan.q, np.eye(5))
    assert np.array_equal(itm.make_plan(X, y, cfg, shift=False).centres, np.eye(5))


@pytest.mark.parametrize("latent_dim", [5, 9])
@pytest.mark.parametrize("centres", ["random", "pca", "laplacian"])
def test_plan_other_centres_orthonormal(centres, latent_dim):
    """random / pca / laplacian centres: K×Z, unit norm, mutually orthogonal (Ê Êᵀ = I), seeded."""
    X, y = uneven_data(5)
    cfg = itm.Config(batch_size=16, iterations=10, centres=centres, latent_dim=latent_dim, shift=False,
                     preprocess="none")
    plan = itm.make_plan(X, y, cfg)
    C = plan.centres
    assert C.shape == (5, latent_dim)
    assert max_err(C @ C.T, np.eye(5)) <= 1e-12
    assert max_err(plan.q, C ** 2) == 0
    assert np.array_equal(itm.make_plan(X, y, cfg).centres, C)
    shifted = itm.make_plan(X, y, cfg, shift=True)
    F = X[shifted.train_idx]
    U = (shifted.centres - F.mean()) / F.std()
    assert max_err(U, C) <= 1e-12


def test_centers_is_a_deprecated_spelling_of_centres(tmp_path):
    """Config.centres was Config.centers before 0.2: the API's keyword and the CLI's --centers still work,
    each saying so, and give the same plan as centres=."""
    X, y = blobs(5)
    with pytest.warns(DeprecationWarning, match="'centers' is now spelt 'centres'"):
        old = itm.make_plan(X, y, centers="pca", batch_size=16)
    assert np.array_equal(old.centres, itm.make_plan(X, y, centres="pca", batch_size=16).centres)
    path = write_npz(tmp_path / "f.npz", {"m": X}, y)
    args = ["--features", path, "--json", "--quiet", "--iterations", "20", "--eval-every", "10"]
    proc, new = run_cli(args + ["--centers", "pca"]), run_cli(args + ["--centres", "pca"])
    assert proc.returncode == 0 and proc.stderr == "itm: note: --centers is now spelt --centres\n"
    assert json.loads(proc.stdout)["ranking"][0]["score"] == json.loads(new.stdout)["ranking"][0]["score"]
    assert json.loads(proc.stdout)["config"]["centres"] == "pca"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_plan_init_like_torch_linear(dtype):
    """W_z, b_z ~ U(−1/√D, 1/√D) and W_h, b_h ~ U(−1/√Z, 1/√Z) (torch.nn.Linear), in the run's dtype;
    the weights fill their interval uniformly (Kolmogorov–Smirnov)."""
    X, y = uneven_data(6)
    D, Z, K = 16, 12, 5
    plan = itm.make_plan(X, y, itm.Config(batch_size=16, iterations=10, latent_dim=Z, dtype=dtype))
    Wz, bz, Wh, bh = plan.params
    assert (Wz.shape, bz.shape, Wh.shape, bh.shape) == ((D, Z), (Z,), (Z, K), (K,))
    for p, fan_in in ((Wz, D), (bz, D), (Wh, Z), (bh, Z)):
        assert p.dtype == np.dtype(dtype)
        assert np.abs(p).max() <= 1.0 / math.sqrt(fan_in) * (1 + 1e-7)
    for W, fan_in in ((Wz, D), (Wh, Z)):
        bound = 1.0 / math.sqrt(fan_in)
        assert st.kstest(W.ravel().astype(np.float64), st.uniform(-bound, 2 * bound).cdf).pvalue > 1e-3


def test_plan_batches_are_epochs_of_permutations():
    """Each epoch a fresh permutation of the training part cut into batches of B, the last incomplete
    batch dropped: rows distinct within a batch, batches of one epoch disjoint, all from the training
    part; a training part smaller than B gives one batch of all of it per iteration."""
    X, y = uneven_data(7)
    B, iterations = 16, 40
    plan = itm.make_plan(X, y, itm.Config(batch_size=B, iterations=iterations))
    per_epoch = plan.train_idx.size // B
    assert plan.batches.shape == (iterations, B)
    assert np.isin(plan.batches, plan.train_idx).all()
    for start in range(0, iterations, per_epoch):
        epoch = plan.batches[start:start + per_epoch].ravel()
        assert np.unique(epoch).size == epoch.size
    assert not np.array_equal(plan.batches[:per_epoch], plan.batches[per_epoch:2 * per_epoch])  # fresh order
    # N_train < B: every iteration one batch of the whole training part, in a fresh order
    small = np.concatenate([np.flatnonzero(y == k)[:2] for k in range(5)] +
                           [np.flatnonzero(y == 4)[2:12]])
    p2 = itm.make_plan(X[small], y[small], itm.Config(batch_size=18, iterations=5))
    assert p2.train_idx.size < 18 and p2.batches.shape == (5, p2.train_idx.size)
    for rows in p2.batches:
        assert np.array_equal(np.sort(rows), np.sort(p2.train_idx))


# ----------------------------------------------------------------------------------------------------
# One training iteration (loss and the gradients of W_z, b_z, W_h, b_h) against torch autograd through
# the naive n-step loop.

LOSS_VARIANTS = {
    **{f"gram_n{n}": dict(n=n) for n in (1, 37, 400)},                                # Z = K = 6 ≤ B = 32
    **{f"kernel_n{n}": dict(n=n, latent_dim=40, batch_size=16) for n in (1, 37, 400)},  # Z = 40 > B = 16
    "normalize_none": dict(n=5, normalize="none", scale=0.5),
    "c_scale_B2": dict(n=37, c_scale="B2"),
    "c_scale_BZ": dict(n=37, c_scale="B/Z"),
    "no_propagation": dict(n=0),                                                   # E⁽⁰⁾ = Θ
    "normalize_features": dict(n=37, normalize="features"),
    "centres_random": dict(n=37, centres="random", latent_dim=10),
}


@pytest.mark.parametrize("variant", list(LOSS_VARIANTS))
def test_loss_and_grads_vs_torch(variant, backend):
    """itm._Model.loss_and_grads vs ref.loss_and_grads (autograd through E ← E − ηC(E − T) n times), float64,
    on the plan's first batch: the loss and all four gradients to 1e-9."""
    kw = dict(LOSS_VARIANTS[variant])
    scale = kw.pop("scale", 1.0)
    X, y = blobs(40, N=240, D=24, K=6, dtype=np.float64)
    X = X * scale
    cfg = itm.Config(dtype="float64", iterations=2, **{"batch_size": 32, **kw})
    plan = itm.make_plan(X, y, cfg)
    assert plan.n == kw["n"]
    loss, grads = itm._Model(plan).loss_and_grads(plan.params, plan.batches[0])
    loss_t, grads_t = ref.loss_and_grads(X, plan, cfg, plan.params, plan.batches[0])
    assert abs(loss - loss_t) <= 1e-9, (loss, loss_t)
    assert [g.shape for g in grads] == [g.shape for g in grads_t]
    errs = [max_err(g, gt) for g, gt in zip(grads, grads_t)]
    assert max(errs) <= 1e-9, errs
    assert max(float(np.abs(g).max()) for g in grads_t) > 1e-6  # the comparison is not of zeros


CASES = ["rank_deficient", "duplicate_rows", "repeated", "repeated_and_zero", "near_repeated", "unit_rows"]


@pytest.mark.parametrize("n", [37, 400])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("branch", list(BRANCHES))
def test_propagate_crafted_vs_torch(branch, case, n, backend):
    rng = np.random.default_rng([CASES.index(case), n, branch == "gram"])
    theta = crafted_theta(case, branch, rng)
    B, Z = theta.shape
    assert (Z <= B) == (branch == "gram")
    T = rng.standard_normal((B, Z))
    dE = rng.standard_normal((B, Z))
    s = 1.0 / B
    # h = identity (W_h = I, b_h = 0): the logits are E⁽ⁿ⁾ itself, and dΘ the propagation's own
    I, zero = np.eye(Z), np.zeros(Z)
    E, backward = itm.propagate_logits(theta, T, n, ETA, s, I, zero, want_grad=True)
    dtheta, _ = backward(dE)
    th = ref.t(theta).requires_grad_(True)
    Et = ref.naive_propagate(th, ref.t(T), n, ETA, s)
    (dth,) = torch.autograd.grad(Et, th, ref.t(dE))
    assert max_err(E, Et.detach()) <= 1e-9
    assert max_err(dtheta, dth) <= 1e-9, max_err(dtheta, dth)
    E2, none = itm.propagate_logits(theta, T, n, ETA, s, I, zero, want_grad=False)
    assert none is None and max_err(E2, E) == 0


@pytest.mark.parametrize("branch", list(BRANCHES))
def test_low_rank_features_do_not_diverge(branch, backend):
    """D = 3 features: rank(Θ) ≤ 4 < Z, so s·ΘᵀΘ (Z = 10 ≤ B) or C (Z = 40 > B = 16) has exact-zero
    eigenvalues. The propagation is a contraction (unit rows), so the run must not be reported diverged,
    and its gradients must match torch's."""
    rng = np.random.default_rng(12)
    y = np.arange(400) % 4
    X = rng.standard_normal((4, 3))[y] + rng.standard_normal((400, 3))
    kw = dict(batch_size=32, latent_dim=10) if branch == "gram" else dict(batch_size=16, latent_dim=40)
    cfg = itm.Config(dtype="float64", n=50, iterations=1, **kw)
    plan = itm.make_plan(X, y, cfg)
    loss, grads = itm._Model(plan).loss_and_grads(plan.params, plan.batches[0])
    loss_t, grads_t = ref.loss_and_grads(X, plan, cfg, plan.params, plan.batches[0])
    assert abs(loss - loss_t) <= 1e-9 and max(max_err(g, gt) for g, gt in zip(grads, grads_t)) <= 1e-9
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = itm.itm_score(X, y, **{**SMALL, **kw, "iterations": 20})
    assert not r.diverged and r.score > 25.0


@pytest.mark.parametrize("pc_loss", ["mse", "mae", "ce"])
@pytest.mark.parametrize("branch", list(BRANCHES))
def test_propagate_explicit_vs_torch(branch, pc_loss):
    """Algorithm 1's loop (forward and hand-written backward) against autograd through literal GD on g."""
    rng = np.random.default_rng(3)
    theta = crafted_theta("unit_rows", branch, rng)
    B, Z = theta.shape
    y = rng.integers(0, Z, B)
    Q = np.eye(Z)[y]
    T = 0.1 + 0.3 * Q
    dE = rng.standard_normal((B, Z))
    n, eta, s = 25, 0.5, 1.0 / B  # a large η so the 25 steps move E visibly
    E, backward = itm.propagate_explicit(theta, T, Q, n, eta, s, pc_loss, want_grad=True)
    th = ref.t(theta).requires_grad_(True)
    Et = ref.explicit_propagate(th, ref.t(T), ref.t(Q), n, eta, s, pc_loss)
    (dth,) = torch.autograd.grad(Et, th, ref.t(dE))
    assert max_err(E, Et.detach()) <= 1e-12
    assert max_err(backward(dE), dth) <= 1e-10, max_err(backward(dE), dth)
    assert max_err(E, theta) > 1e-3


# ----------------------------------------------------------------------------------------------------
# AdamW against torch.optim.AdamW.

@pytest.mark.parametrize("hyper", [dict(lr=5e-3, wd=0.01, b1=0.9, b2=0.999, eps=1e-8),
                                   dict(lr=0.03, wd=0.2, b1=0.5, b2=0.9, eps=1e-3),
                                   dict(lr=1e-2, wd=0.1, b1=0.8, b2=0.95, eps=1e-6)])
def test_adamw_vs_torch(hyper, backend):
    rng = np.random.default_rng(0)
    shapes = [(7, 5), (5,), (3, 4, 2), (1,)]
    params = [rng.standard_normal(s) for s in shapes]
    moments = [(np.zeros(s), np.zeros(s)) for s in shapes]
    tp = [torch.tensor(p, requires_grad=True) for p in params]
    opt = torch.optim.AdamW(tp, lr=hyper["lr"], betas=(hyper["b1"], hyper["b2"]), eps=hyper["eps"],
                            weight_decay=hyper["wd"])
    for step in range(1, 11):
        grads = [rng.standard_normal(s) * 10.0 ** rng.integers(-6, 2) for s in shapes]
        grads[1][0] = 0.0  # an exactly-zero gradient entry
        for p, g, (m, v) in zip(params, grads, moments):
            itm.adamw_step(p, g, m, v, hyper["lr"], hyper["wd"], hyper["b1"], hyper["b2"], hyper["eps"],
                           step)
        for p, g in zip(tp, grads):
            p.grad = torch.tensor(g)
        opt.step()
        for p, pt in zip(params, tp):
            assert max_err(p, pt.detach()) <= 1e-14 * max(1.0, float(np.abs(p).max()))
    for (m, v), pt in zip(moments, tp):
        state = opt.state[pt]
        assert max_err(m, state["exp_avg"]) <= 1e-14 * max(1.0, float(np.abs(m).max()))
        assert max_err(v, state["exp_avg_sq"]) <= 1e-14 * max(1.0, float(np.abs(v).max()))


# ----------------------------------------------------------------------------------------------------
# A whole run (Algorithm 2) against the torch implementation.

def whole_run(dtype, **kw):
    X, y = blobs(5, N=400, D=20, K=5, sep=0.6, dtype=np.float64)
    cfg = itm.Config(dtype=dtype, **{**SMALL, **kw})
    plan = itm.make_plan(X, y, cfg)
    traj, losses = itm.train(plan)
    traj_t, losses_t = ref.algorithm2(X, plan, cfg)
    one_sample = 100.0 / plan.score_idx.size
    return plan, (traj, losses), (traj_t, losses_t), one_sample


@pytest.mark.parametrize("kw", [dict(c_scale="B/Z", score_by="centres"), dict(n=0, score_by="head")],
                         ids=["centres", "n0"])
def test_whole_run_readings_vs_torch(kw):
    """The DESIGN.md §1d readings over a whole run, float64: scoring by the nearest pseudo-cluster centre
    of E⁽ⁿ⁾ with C = Z·ΘΘᵀ/B (the default), and the propagation switched off (n = 0, scored by h)."""
    plan, (traj, losses), (traj_t, losses_t), one = whole_run("float64", **kw)
    assert np.abs(losses - losses_t).max() / np.abs(losses_t).min() <= 1e-10
    assert all(abs(a - b) <= one + 1e-9 for (_, a), (_, b) in zip(traj, traj_t)), (traj, traj_t)
    assert max(a for _, a in traj) > 40.0     # K = 5: well above chance, so the scoring path is exercised


def test_whole_run_vs_torch_float64():
    plan, (traj, losses), (traj_t, losses_t), one = whole_run("float64")
    assert plan.n > 100  # the adaptive n, from the data
    rel = np.abs(losses - losses_t) / np.abs(losses_t)
    assert rel.max() <= 1e-10, rel.max()  # float64 gives ~1e-16: a wrong gradient shows far above 1e-10
    assert [t for t, _ in traj] == [t for t, _ in traj_t] == [10, 20, 30, 40, 50]
    assert all(abs(a - b) <= one + 1e-9 for (_, a), (_, b) in zip(traj, traj_t)), (traj, traj_t)
    assert losses[-1] < losses[0]  # it did learn something


def test_whole_run_vs_torch_float32():
    """Default dtype: our parameters, E_b W_z and E_bᵀdΘ are float32 (the spectral part is float64) while
    the oracle is float64 throughout (from the same float32-rounded initial weights). Each step rounds at
    ~6e-8 relative, and AdamW amplifies it (it divides by √v, so the relative error of a near-zero gradient
    component becomes a comparable relative error of its O(lr) update) over 50 iterations: losses agree to
    ~5e-8 relative here, not 1e-15, and the tolerance is 1e-5 (200× margin for other BLAS/CPU rounding)."""
    plan, (traj, losses), (traj_t, losses_t), one = whole_run("float32")
    assert plan.params[0].dtype == np.float32
    rel = np.abs(losses - losses_t) / np.abs(losses_t)
    assert rel.max() <= 1e-5, rel.max()
    assert all(abs(a - b) <= one + 1e-9 for (_, a), (_, b) in zip(traj, traj_t)), (traj, traj_t)


def test_whole_run_explicit_ce_vs_torch():
    """mode="explicit" with L_pc = CE end to end (no closed form exists): our loop vs torch autograd."""
    plan, (traj, losses), (traj_t, losses_t), one = whole_run("float64", mode="explicit", pc_loss="ce",
                                                              iterations=10, eval_every=5, n=15)
    assert np.abs(losses - losses_t).max() / np.abs(losses_t).max() <= 1e-9
    assert all(abs(a - b) <= one + 1e-9 for (_, a), (_, b) in zip(traj, traj_t))


# ----------------------------------------------------------------------------------------------------
# The plain n steps of Eq. 5 (itm.propagate_steps) vs the closed form (itm.propagate_logits), and
# Algorithm 1 (explicit) vs Algorithm 2 (closed form) over whole runs.

@pytest.mark.parametrize("n", [1, 37, 400])
@pytest.mark.parametrize("c_scale", ["B", "B/Z"])
@pytest.mark.parametrize("branch", list(BRANCHES))
def test_plain_steps_equal_closed_form(branch, c_scale, n, backend):
    """E⁽ⁿ⁾ and dΘ of the n explicit steps (section 2 of itm.py) and of the closed form that replaces them
    (section 3: Θφ(G)Θᵀ when Z ≤ B, (I − ηC)ⁿ on C's spectrum when Z > B), float64: equal to 1e-10, on
    training-like unit rows and on a rank-deficient batch; and the plain steps equal torch's literal loop."""
    rng = np.random.default_rng([n, branch == "gram", c_scale == "B"])
    for case in ("unit_rows", "rank_deficient"):
        theta = crafted_theta(case, branch, rng)
        B, Z = theta.shape
        T, dE = rng.standard_normal((B, Z)), rng.standard_normal((B, Z))
        s = itm.c_scale_factor(c_scale, B, Z)
        E_steps, back_steps = itm.propagate_steps(theta, T, n, ETA, s, want_grad=True)
        E_closed, back_closed = itm.propagate_logits(theta, T, n, ETA, s, np.eye(Z), np.zeros(Z), want_grad=True)
        assert max_err(E_steps, E_closed) <= 1e-10 and max_err(back_steps(dE), back_closed(dE)[0]) <= 1e-10
        th = ref.t(theta).requires_grad_(True)
        Et = ref.naive_propagate(th, ref.t(T), n, ETA, s)
        (dth,) = torch.autograd.grad(Et, th, ref.t(dE))
        assert max_err(E_steps, Et.detach()) <= 1e-10 and max_err(back_steps(dE), dth) <= 1e-10
        assert max_err(E_steps, theta) > 1e-6                      # the steps moved E: not a comparison of Θ


def test_explicit_mse_equals_closed():
    X, y = blobs(2)
    kw = dict(SMALL, dtype="float64", n=60)
    closed = itm.itm_score(X, y, **kw)
    explicit = itm.itm_score(X, y, mode="explicit", pc_loss="mse", **kw)
    assert not closed.diverged and not explicit.diverged
    assert np.abs(closed.losses - explicit.losses).max() <= 1e-9
    assert closed.trajectory == explicit.trajectory and closed.score == explicit.score


def test_explicit_mae_and_ce_differ():
    X, y = blobs(2)
    kw = dict(SMALL, n=60, mode="explicit")
    runs = {loss: itm.itm_score(X, y, pc_loss=loss, **kw) for loss in ("mse", "mae", "ce")}
    for r in runs.values():
        assert not r.diverged and np.all(np.isfinite(r.losses)) and 0 <= r.score <= 100
    for a, b in [("mse", "mae"), ("mse", "ce"), ("mae", "ce")]:
        assert np.abs(runs[a].losses - runs[b].losses).max() > 1e-4, (a, b)


# ----------------------------------------------------------------------------------------------------
# NumPy-only and numba paths.

@pytest.mark.skipif(not itm.HAVE_NUMBA, reason="numba is not installed: only the NumPy path exists")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_numpy_and_numba_paths_agree(dtype, monkeypatch):
    X, y = blobs(4)
    results = {}
    for use in (True, False):
        monkeypatch.setattr(itm, "USE_NUMBA", use)
        results[use] = itm.itm_score(X, y, dtype=dtype, **SMALL)
    a, b = results[True], results[False]
    tol = 1e-10 if dtype == "float64" else 1e-5  # float32: the kernels round differently (~1e-7)
    assert np.abs(a.losses - b.losses).max() <= tol * np.abs(a.losses).max()
    assert a.n == b.n
    one = 100.0 / (X.shape[0] // 5)
    assert all(abs(p - q) <= one + 1e-9 for (_, p), (_, q) in zip(a.trajectory, b.trajectory))


def write_npz(path, feats, labels=None):
    arrays = dict(feats)
    if labels is not None:
        arrays["labels"] = labels
    np.savez(path, **arrays)
    return str(path)


def run_cli(args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, str(ROOT / "itm.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)


@pytest.mark.skipif(not itm.HAVE_NUMBA, reason="numba is not installed: only the NumPy path exists")
def test_cli_without_numba_matches_in_process(tmp_path, monkeypatch):
    feats = {f"m{i}": blobs(10 + i, sep=s)[0] for i, s in enumerate((0.2, 0.8))}
    y = blobs(10)[1]
    path = write_npz(tmp_path / "f.npz", feats, y)
    proc = run_cli(["--features", path, "--json", "--quiet", "--iterations", "40", "--batch-size", "32",
                    "--eval-every", "20"], {"ITM_NO_NUMBA": "1"})
    assert proc.returncode == 0, proc.stderr
    assert all(" scores at chance " in line for line in proc.stderr.splitlines()), proc.stderr
    out = {r["model"]: r for r in json.loads(proc.stdout)["ranking"]}
    monkeypatch.setattr(itm, "USE_NUMBA", True)
    one = 100.0 / (y.size // 5)
    for name, r in itm.rank(feats, y, iterations=40, batch_size=32, eval_every=20):
        assert out[name]["n"] == r.n
        assert abs(out[name]["score"] - r.score) <= one + 1e-9, (name, out[name]["score"], r.score)


# ----------------------------------------------------------------------------------------------------
# Seeds, sanity ranking, string labels.

def test_same_seed_identical_different_seed_close():
    X, y = blobs(6, N=600, sep=0.7)
    kw = dict(iterations=150, batch_size=32, eval_every=50)
    a, b = itm.itm_score(X, y, seed=3, **kw), itm.itm_score(X, y, seed=3, **kw)
    assert (a.score, a.trajectory, a.n, a.diverged, a.note) == (b.score, b.trajectory, b.n, b.diverged,
                                                                b.note)
    assert np.array_equal(a.losses, b.losses)
    others = [itm.itm_score(X, y, seed=s, **kw) for s in (4, 5)]
    for c in others:  # another split, init and batch order: ~120 scoring samples, so ±2.5 points of noise
        assert not np.array_equal(c.losses, a.losses)
        assert abs(c.score - a.score) <= 10.0, (a.score, c.score)
    assert len({a.score, *(c.score for c in others)}) > 1 or any(
        c.trajectory != a.trajectory for c in others)


def test_sanity_ranking_follows_separation():
    y = blobs(20, N=480, K=8)[1]
    rng = np.random.default_rng(21)
    means = rng.standard_normal((8, 32))
    feats = {f"sep{s}": (s * means[y] + rng.standard_normal((y.size, 32))).astype(np.float32)
             for s in (0.1, 0.3, 0.6, 1.2)}
    ranking = itm.rank(feats, y, iterations=100, batch_size=48, eval_every=50)
    assert [name for name, _ in ranking] == ["sep1.2", "sep0.6", "sep0.3", "sep0.1"], ranking
    scores = [r.score for _, r in ranking]
    assert all(a > b for a, b in zip(scores, scores[1:])), scores


def test_string_labels_equal_integer_labels():
    X, y = blobs(8)
    names = np.array([f"class_{k:02d}" for k in range(6)])
    a = itm.itm_score(X, y, **SMALL)
    b = itm.itm_score(X, names[y], **SMALL)
    c = itm.itm_score(X, y.astype(np.float64) + 10, **SMALL)  # integral floats are fine
    assert (a.score, a.trajectory, a.n) == (b.score, b.trajectory, b.n) == (c.score, c.trajectory, c.n)
    assert np.array_equal(a.losses, b.losses)
    enc, classes = itm.encode_labels(names[y])
    assert np.array_equal(enc, y) and list(classes) == list(names)
    assert list(itm.make_plan(X, names[y], **SMALL).classes) == list(names)


# ----------------------------------------------------------------------------------------------------
# Divergence: never a chance-level score.

def test_divergence_reported_not_scored():
    X, y = blobs(9)
    X = X * 1e4
    with pytest.warns(RuntimeWarning, match="diverged"):
        r = itm.itm_score(X, y, normalize="none", preprocess="none", **SMALL)
    assert r.diverged and math.isnan(r.score) and r.trajectory == []
    assert "2" in r.note or "finite" in r.note
    # the normalised default is a contraction on the same features
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok = itm.itm_score(X, y, **SMALL)
    assert not ok.diverged and ok.score > 100 / 6
    # in a ranking the diverged model comes last, with a warning naming it
    with pytest.warns(RuntimeWarning, match="'huge'"):
        ranking = itm.rank({"huge": X, "fine": X / 1e4}, y, normalize="none", preprocess="none", **SMALL)
    assert [name for name, _ in ranking] == ["fine", "huge"]
    assert ranking[1][1].diverged and not ranking[0][1].diverged


# ----------------------------------------------------------------------------------------------------
# Bad input: ValueError naming the problem (API); one line on stderr and exit 1 (CLI).

def bad_inputs():
    X, y = blobs(11, N=300)
    one_class = np.zeros(300, dtype=int)
    single = y.copy()
    single[0] = 99
    nan, inf = X.copy(), X.copy()
    nan[5, 3] = np.nan
    inf[7, 1] = np.inf
    few = np.concatenate([np.flatnonzero(y == k)[:5] for k in range(6)])  # 30 rows, 5 per class
    return {
        "n_mismatch": (X, y[:-1], r"N=300.*299"),
        "nan": (nan, y, r"NaN/Inf"),
        "inf": (inf, y, r"NaN/Inf"),
        "one_class": (X, one_class, r"single class"),
        "single_sample_class": (X, single, r"99.*single sample"),
        "smaller_than_batch": (X[few], y[few], r"N=30.*batch_size"),
        "float_labels": (X, y + 0.5, r"non-integer"),
        "one_d_features": (X[:, 0], y, r"2-D"),
    }


@pytest.mark.parametrize("case", list(bad_inputs()))
def test_bad_input_api(case):
    X, y, pattern = bad_inputs()[case]
    kw = dict(SMALL, batch_size=64) if case == "smaller_than_batch" else SMALL
    with pytest.raises(ValueError, match=pattern):
        itm.itm_score(X, y, **kw)
    with pytest.raises(ValueError, match=pattern):
        itm.rank({"m": X}, y, **kw)


def test_bad_files_api(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        itm.load_features(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(ValueError, match="no model arrays"):
        itm.load_features(str(tmp_path / "empty.npz"))
    X, y = blobs(0)
    write_npz(tmp_path / "nolabels.npz", {"m": X})
    with pytest.raises(ValueError, match="labels"):
        itm.load_features(str(tmp_path / "nolabels.npz"))


def test_corrupt_file_named(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"this is not an npz file")
    with pytest.raises(ValueError, match="junk.npz"):
        itm.load_features(str(tmp_path / "junk.npz"))


def assert_one_line_error(capsys, argv, pattern):
    assert itm.main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("itm: error:"), err
    assert "Traceback" not in err
    assert re.search(pattern, err), err


@pytest.mark.parametrize("case", list(bad_inputs()))
def test_bad_input_cli(case, tmp_path, capsys):
    X, y, pattern = bad_inputs()[case]
    path = write_npz(tmp_path / "f.npz", {"model": X}, y)
    batch = "64" if case == "smaller_than_batch" else "32"
    assert_one_line_error(capsys, ["--features", path, "--quiet", "--iterations", "5", "--batch-size", batch],
                          pattern)


def test_bad_files_cli(tmp_path, capsys):
    np.savez(tmp_path / "empty.npz")
    X, y = blobs(0)
    write_npz(tmp_path / "ok.npz", {"m": X}, y)
    np.save(tmp_path / "short.npy", y[:-3])
    cases = [
        (["--features", str(tmp_path / "missing.npz")], "not found"),
        (["--features", str(tmp_path / "empty.npz")], "no model arrays"),
        (["--features", str(tmp_path / "ok.npz"), "--labels", str(tmp_path / "nope.npy")], "not found"),
        (["--features", str(tmp_path / "ok.npz"), "--labels", str(tmp_path / "short.npy")], r"N=360.*357"),
        (["--features", str(tmp_path / "ok.npz"), "--models", "m,zzz"], "zzz"),
        (["--features", str(tmp_path / "ok.npz"), "--truth", str(tmp_path / "none.json")], "not found"),
        (["--batch-size", "1"], "batch.size"),
        (["--labels", "y.npy"], "--features"),
    ]
    for argv, pattern in cases:
        assert_one_line_error(capsys, argv + ["--quiet", "--iterations", "5", "--batch-size", "32"]
                              if "--batch-size" not in argv else argv + ["--quiet"], pattern)
    assert itm.main(["--normalize", "bogus"]) == 1  # argparse errors: one line too, exit 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "normalize" in err


def test_bad_input_subprocess_no_traceback(tmp_path):
    X, y, _ = bad_inputs()["nan"]
    path = write_npz(tmp_path / "nan.npz", {"model": X}, y)
    for args, pattern, env in [(["--features", path], "NaN/Inf", {}),
                               (["--features", str(tmp_path / "missing.npz")], "not found",
                                {"ITM_NO_NUMBA": "1"})]:
        proc = run_cli(args + ["--quiet"], env)
        assert proc.returncode == 1
        assert proc.stdout == ""
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert pattern in proc.stderr


# ----------------------------------------------------------------------------------------------------
# CLI outputs: --json, --out CSV, --truth (τ_w = scipy.stats.weightedtau).

@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zoo")
    y = blobs(30)[1]
    rng = np.random.default_rng(31)
    means = rng.standard_normal((6, 24))
    seps = {"a": 0.15, "b": 0.4, "c": 0.8, "d": 0.3}
    feats = {k: (s * means[y] + rng.standard_normal((y.size, 24))).astype(np.float32)
             for k, s in seps.items()}
    truth = {"a": 61.0, "b": 70.5, "c": 88.25, "d": 75.0}
    (tmp / "truth.json").write_text(json.dumps(truth))
    path = write_npz(tmp / "zoo.npz", feats, y)
    argv = ["--features", path, "--quiet", "--iterations", "30", "--batch-size", "32", "--eval-every", "15"]
    expected = itm.rank(feats, y, iterations=30, batch_size=32, eval_every=15)
    return tmp, argv, expected, truth


def test_cli_json_and_csv(zoo, capsys):
    tmp, argv, expected, truth = zoo
    out_csv = tmp / "ranking.csv"
    assert itm.main(argv + ["--json", "--out", str(out_csv)]) == 0
    stdout, stderr = capsys.readouterr()
    assert all(" scores at chance " in line for line in stderr.splitlines())   # only the chance warnings
    doc = json.loads(stdout)
    assert doc["dataset"] == "zoo" and doc["weighted_tau"] is None
    assert doc["scores"] == {"ITM": {name: r.score for name, r in expected}}   # the shape kendall.py reads
    assert [r["model"] for r in doc["ranking"]] == [name for name, _ in expected]
    for i, (row, (name, r)) in enumerate(zip(doc["ranking"], expected)):
        assert row["rank"] == i + 1 and row["score"] == r.score and row["n"] == r.n
        assert row["fold_scores"] == r.fold_scores and row["sd"] == r.sd
        assert len(r.fold_scores) == itm.Config().folds
        assert row["diverged"] is False
        assert [tuple(p) for p in row["trajectory"]] == [tuple(p) for p in r.trajectory]
    with open(out_csv, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["rank", "model", "score", "sd", "within_noise_of_previous", "n", "seconds", "diverged",
                       "error"]
    assert [(r[0], r[1], r[2], r[3], r[5], r[7]) for r in rows[1:]] == [
        (str(i + 1), name, f"{r.score:.4f}", f"{r.sd:.4f}", str(r.n), "False")
        for i, (name, r) in enumerate(expected)]
    assert not list(tmp.glob(".ranking.csv.tmp*")) and not list(tmp.glob("ranking.csv.tmp*"))


def test_cli_truth_weighted_tau(zoo, capsys):
    tmp, argv, expected, truth = zoo
    assert itm.main(argv + ["--json", "--truth", str(tmp / "truth.json")]) == 0
    doc = json.loads(capsys.readouterr().out)
    scores = {row["model"]: row["score"] for row in doc["ranking"]}
    names = sorted(truth)
    tau = st.weightedtau([scores[k] for k in names], [truth[k] for k in names]).statistic
    assert abs(doc["weighted_tau"] - tau) <= 1e-12, (doc["weighted_tau"], tau)
    assert itm.main(argv + ["--truth", str(tmp / "truth.json")]) == 0  # the table reports it too
    table = capsys.readouterr().out
    assert f"{tau:.3f}" in table.splitlines()[-1]


def test_cli_truth_without_the_models(zoo, capsys, monkeypatch):
    """A --truth table that names none (or one) of the models is a one-line error naming the file, before
    any model is scored; one that lacks some models gives τ_w over the others, with a note naming them."""
    tmp, argv, expected, truth = zoo
    monkeypatch.setattr(itm, "rank", lambda *a, **k: pytest.fail("scored before the truth was checked"))
    for table, pattern in [({"x": 70.0, "y": 80.0}, "no model matches"), ({"a": 61.0, "x": 1.0}, "only 1 of the 4")]:
        path = tmp / "other.json"
        path.write_text(json.dumps(table))
        assert_one_line_error(capsys, argv + ["--truth", str(path)], re.escape(f"--truth {path}: ") + pattern)
    monkeypatch.undo()
    partial = {k: v for k, v in truth.items() if k != "d"}
    (tmp / "partial.json").write_text(json.dumps(partial))
    assert itm.main(argv + ["--json", "--truth", str(tmp / "partial.json")]) == 0
    out, err = capsys.readouterr()
    assert "no accuracy for 1 of 4 models (d); τ_w is over the other 3" in err
    scores = {row["model"]: row["score"] for row in json.loads(out)["ranking"]}
    names = sorted(partial)
    tau = st.weightedtau([scores[k] for k in names], [partial[k] for k in names]).statistic
    assert abs(json.loads(out)["weighted_tau"] - tau) <= 1e-12


@pytest.mark.parametrize("seed", range(5))
def test_weighted_tau_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(9)
    y = np.round(rng.uniform(50, 95, 9)) if seed % 2 else rng.uniform(50, 95, 9)
    if seed == 4:
        x[3] = x[5]  # a tie in the scores
    tau = itm.sibling("kendall", "--truth").weighted_tau   # the one the CLI reports
    assert abs(tau(x, y) - st.weightedtau(x, y).statistic) <= 1e-12

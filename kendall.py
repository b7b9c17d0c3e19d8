"""Ranking metrics for transferability estimation (TE): exact, fast, and the evaluation harness.

A TE score is judged only by how well it ranks a pool of models against their fine-tuned accuracy, so
the metric must be the one the published tables used.  Every public TE evaluation of the ITM era (SFDA,
PED, NCTI, ETran, SA, EMMS) calls ``scipy.stats.weightedtau(scores, accuracies)`` with all defaults;
``weighted_tau`` reproduces that exactly (to ~1e-15) without importing scipy:

* weigher: hyperbolic ``1/(r + 1)`` on 0-based ranks, rank 0 = the LARGEST value;
* pair weight ``w(r_i) + w(r_j)`` (``additive=True``) or ``w(r_i) * w(r_j)``;
* ``rank=True``: the mean of the tau obtained ranking by (x, y) and by (y, x), each ranking being
  decreasing lexicographic, with exact ties broken by the larger input index first (a stable sort);
* ties are handled as in Vigna's tau-b generalisation (tied pairs leave numerator and denominator).

``variant="paper"`` is the formula written in the ITM paper instead: weights ``1/(G_i + G_j)`` on
1-based ranks G of the truth (1 = best; average ranks on ties), normalised by the sum of all weights.

Scores must be "higher is better": tau_w is NOT antisymmetric, ``weighted_tau(-s, g) != -weighted_tau(s, g)``,
because the weights follow the top of each ranking.  Negate losses/entropies before calling.

References
----------
* S. Vigna, "A weighted correlation index for rankings with ties", WWW 2015 -- the algorithm behind
  ``scipy.stats.weightedtau`` (scipy/stats/_stats.pyx ``_weightedrankedtau``).
* "Implicit Modeling for Transferability Estimation of Vision Foundation Models", NeurIPS 2025 (ITM):
  Sec. 4.1 (tau_w, Table 1) and Fig. 3 (stability over C(14, 10) = 1001 model subsets).
* TencentARC/SFDA ``rank_correlation.py``: the field's ``w_kendall_metric`` and ``rel_k``.

Example
-------
>>> s = [0.9, 0.3, 0.1, 0.5]; g = [85.0, 70.2, 79.9, 80.1]   # scores: higher = better
>>> round(weighted_tau(s, g), 6), round(weighted_tau([-v for v in s], g), 6)  # not antisymmetric
(0.813333, -0.666667)
>>> evaluate({"cifar10": {"a": 2.0, "b": 1.0}}, {"cifar10": {"a": 97.1, "b": 96.0}})
{'tau_w': {'cifar10': 1.0, 'mean': 1.0}}

CLI: ``python kendall.py --scores scores.json --truth truth.json [--table T] [--metric tau_w,rho,rel1]
[--json] [--missing drop] [--stability K]``.

numba is optional: without it, or with ``ITM_NO_NUMBA=1``, everything runs in NumPy with the same results.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Mapping

import numpy as np

try:  # installed: a module of the itm_transferability package; in a checkout or vendored: beside itm.py
    from . import itm
except ImportError:
    import itm

try:
    if os.environ.get("ITM_NO_NUMBA", "") not in ("", "0"):
        raise ImportError("disabled by ITM_NO_NUMBA")
    import numba
    HAVE_NUMBA = True
except ImportError:
    numba, HAVE_NUMBA = None, False

__all__ = ["weighted_tau", "kendall_tau", "spearman_rho", "pearson_r", "rel_k", "top1_hit",
           "evaluate", "stability", "main"]


def _jit(fn):
    # Lazy compilation (no signature): importing this module never compiles anything.
    # error_model="numpy": 0/0 gives nan like scipy instead of raising ZeroDivisionError.
    return numba.njit(cache=True, error_model="numpy")(fn) if numba is not None else fn


# ----------------------------------------------------------------------------------------------------
# Kernels.  O(n^2) over pairs: exact, and fastest for model pools (n <= a few hundred).
# The *_nb functions are numba kernels (plain Python loops); the *_np functions are the NumPy
# fallback, batched over rows so the stability study is vectorised too.
# ----------------------------------------------------------------------------------------------------

@_jit
def _clip_nb(tau):
    # scipy returns min(1., max(-1., tau)): a nan from 0/0 weights comes out as -1.
    r = tau if tau > -1.0 else -1.0
    return r if r < 1.0 else 1.0


@_jit
def _lexrank_nb(x, y):
    """0-based decreasing lexicographic rank by (x, y); exact ties: larger index first (= scipy)."""
    n = x.shape[0]
    rank = np.zeros(n, dtype=np.int64)
    for i in range(n):
        for j in range(n):
            if x[j] > x[i] or (x[j] == x[i] and (y[j] > y[i] or (y[j] == y[i] and j > i))):
                rank[i] += 1
    return rank


@_jit
def _wtau_core_nb(x, y, w, additive):
    """Weighted tau-b for element weights w: nan if x or y is constant, else clipped like scipy."""
    n = x.shape[0]
    tot = u = v = t = d = 0.0
    for i in range(n - 1):
        for j in range(i + 1, n):
            wij = w[i] + w[j] if additive else w[i] * w[j]
            tot += wij
            tx = x[i] == x[j]
            ty = y[i] == y[j]
            if tx:
                u += wij
            if ty:
                v += wij
            if tx and ty:
                t += wij
            elif not tx and not ty and (x[i] < x[j]) != (y[i] < y[j]):
                d += wij
    if np.all(x == x[0]) or np.all(y == y[0]):
        return np.nan
    # Same expression as scipy: (concordant - discordant) / sqrt(untied-in-x) / sqrt(untied-in-y).
    return _clip_nb(((tot - (v + u - t)) - 2.0 * d) / np.sqrt(tot - u) / np.sqrt(tot - v))


@_jit
def _ranked_tau_nb(x, y, table, additive):
    """scipy's _weightedrankedtau(x, y, rank=None): weights table[rank by (x, y)], clipped."""
    return _wtau_core_nb(x, y, table[_lexrank_nb(x, y)], additive)


@_jit
def _stability_nb(S, g, subsets, table, additive):
    """Default tau_w (rank=True) of every method (rows of S) on every subset: (methods, subsets)."""
    m, nsub, k = S.shape[0], subsets.shape[0], subsets.shape[1]
    out = np.empty((m, nsub))
    xs = np.empty(k)
    ys = np.empty(k)
    for b in range(nsub):
        for i in range(k):
            ys[i] = g[subsets[b, i]]
        for a in range(m):
            for i in range(k):
                xs[i] = S[a, subsets[b, i]]
            out[a, b] = (_ranked_tau_nb(xs, ys, table, additive)
                         + _ranked_tau_nb(ys, xs, table, additive)) / 2
    return out


_BLOCK = 1 << 20  # elements per temporary in the NumPy fallback: bounds memory for large n


def _lexrank_np(x, y):
    """Row-wise _lexrank_nb: x, y of shape (B, n) -> int ranks (B, n)."""
    perm = np.lexsort((y, x), axis=-1)[:, ::-1]  # stable ascending, reversed: ties -> larger index first
    rank = np.empty(perm.shape, dtype=np.intp)
    np.put_along_axis(rank, perm, np.broadcast_to(np.arange(x.shape[1]), perm.shape), axis=-1)
    return rank


def _wtau_core_np(x, y, w, additive):
    """Row-wise _wtau_core_nb: x, y, w of shape (B, n) -> tau (B,)."""
    B, n = x.shape
    sums = np.zeros((5, B))  # tot, u, v, t, d
    step = max(1, _BLOCK // (B * n))
    for i0 in range(0, n - 1, step):
        i = np.arange(i0, min(n - 1, i0 + step))
        upper = np.arange(n)[None, :] > i[:, None]            # pairs i < j only
        xi, yi, wi = x[:, i, None], y[:, i, None], w[:, i, None]
        wij = (wi + w[:, None, :]) if additive else wi * w[:, None, :]
        wij = np.where(upper, wij, 0.0)
        tx, ty = xi == x[:, None, :], yi == y[:, None, :]
        disc = ~tx & ~ty & ((xi < x[:, None, :]) != (yi < y[:, None, :]))
        for s, mask in enumerate((True, tx, ty, tx & ty, disc)):
            sums[s] += np.where(mask, wij, 0.0).sum(axis=(1, 2))
    tot, u, v, t, d = sums
    with np.errstate(invalid="ignore", divide="ignore"):
        tau = ((tot - (v + u - t)) - 2.0 * d) / np.sqrt(tot - u) / np.sqrt(tot - v)
    clipped = np.minimum(1.0, np.where(tau > -1.0, tau, -1.0))  # scipy's min(1, max(-1, tau))
    const = (x == x[:, :1]).all(axis=1) | (y == y[:, :1]).all(axis=1)
    return np.where(const, np.nan, clipped)


def _ranked_tau_np(x, y, table, additive):
    return _wtau_core_np(x, y, table[_lexrank_np(x, y)], additive)


def _stability_np(S, g, subsets, table, additive):
    m, (nsub, k) = S.shape[0], subsets.shape
    x = S[:, subsets].reshape(m * nsub, k)
    y = np.broadcast_to(g[subsets], (m, nsub, k)).reshape(m * nsub, k)
    taus, step = [], max(1, _BLOCK // (k * k))
    for r0 in range(0, m * nsub, step):  # row chunks bound the memory
        xs, ys = x[r0:r0 + step], y[r0:r0 + step]
        taus.append((_ranked_tau_np(xs, ys, table, additive) + _ranked_tau_np(ys, xs, table, additive)) / 2)
    return np.concatenate(taus).reshape(m, nsub)


# ----------------------------------------------------------------------------------------------------
# Input checks and small helpers
# ----------------------------------------------------------------------------------------------------

def _vector(a, name):
    try:
        v = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be numbers ({e})") from None
    if v.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {v.shape}")
    bad = np.flatnonzero(~np.isfinite(v))
    if bad.size:
        raise ValueError(f"{name} has non-finite values ({v[bad[0]]} at index {bad[0]})")
    return v


def _align(scores, truth, missing="error", where=""):
    """Match two {model: value} mappings -> (models in scores order, x, y)."""
    unknown = [m for m in scores if m not in truth]
    absent = [m for m in truth if m not in scores]
    if unknown or absent:
        msg = (f"{where}models in scores but not in truth: {unknown}; "
               f"in truth but not in scores: {absent}")
        if missing != "drop":
            raise ValueError(msg + " (use missing='drop' to ignore them)")
        warnings.warn("dropped " + msg, stacklevel=3)
    models = [m for m in scores if m in truth]
    return models, [scores[m] for m in models], [truth[m] for m in models]


def _check_pair(scores, truth):
    """Validate (scores, truth) -> two float64 vectors of equal length >= 2."""
    if isinstance(scores, Mapping) and isinstance(truth, Mapping):
        _, scores, truth = _align(scores, truth)
    x, y = _vector(scores, "scores"), _vector(truth, "truth")
    if x.size != y.size:
        raise ValueError(f"length mismatch: scores has {x.size} values, truth has {y.size}")
    if x.size < 2:
        raise ValueError(f"need at least 2 models to rank, got {x.size}")
    return x, y


def _weight_table(weigher, n):
    """weigher(r) for the ranks r = 0..n-1 (scipy calls it with Python ints)."""
    if weigher is None:
        return 1.0 / (1.0 + np.arange(n))
    return np.array([float(weigher(r)) for r in range(n)])


def _dense_rank(rank, n):
    # scipy reduces a user rank array to dense 0-based ranks (_toint64) before weighing.
    r = np.asarray(rank).ravel()
    if r.size != n:
        raise ValueError(f"rank has {r.size} entries for {n} models")
    if not np.issubdtype(r.dtype, np.number) or not np.all(np.isfinite(r)):
        raise ValueError("rank must be finite numbers")
    return np.unique(r, return_inverse=True)[1].ravel()


def _average_ranks(v):
    """1-based average ranks, ascending (rank 1 = smallest), like scipy.stats.rankdata."""
    order = np.argsort(v, kind="mergesort")
    sv = v[order]
    starts = np.r_[True, sv[1:] != sv[:-1]]
    first = np.flatnonzero(starts)
    counts = np.diff(np.r_[first, v.size])
    ranks = np.empty(v.size)
    ranks[order] = (first + (counts + 1) / 2.0)[np.cumsum(starts) - 1]
    return ranks


def _ranked_tau(x, y, table, additive):
    if HAVE_NUMBA:
        return float(_ranked_tau_nb(x, y, table, additive))
    return float(_ranked_tau_np(x[None], y[None], table, additive)[0])


def _core_tau(x, y, w, additive):
    if HAVE_NUMBA:
        return float(_wtau_core_nb(x, y, w, additive))
    return float(_wtau_core_np(x[None], y[None], w[None], additive)[0])


# ----------------------------------------------------------------------------------------------------
# Public API: pairwise metrics (scores first, truth second; both "higher is better")
# ----------------------------------------------------------------------------------------------------

def weighted_tau(scores, truth, *, variant="field", weigher=None, rank=True, additive=True):
    """Weighted Kendall tau_w of ``scores`` against ``truth`` (higher = better for both).

    ``variant="field"`` (default) equals ``scipy.stats.weightedtau(scores, truth, rank, weigher,
    additive).statistic``: ``rank`` True (mean of both lexicographic rankings), None (rank by
    (scores, truth)), False (element index = rank) or an array of ranks; ``weigher`` maps an int rank
    to a weight (default ``1/(r+1)``); ``additive`` sums (True) or multiplies element weights.
    Constant input gives nan, as in scipy.  ``variant="paper"``: the ITM paper's formula, see module doc.
    Scores must be "higher is better" (tau_w is not antisymmetric).
    Inputs: equal-length sequences (or two {model: value} mappings), >= 2 finite values.
    """
    x, y = _check_pair(scores, truth)
    if variant == "paper":
        if weigher is not None or rank is not True or additive is not True:
            raise ValueError("variant='paper' has fixed weights; weigher/rank/additive are for 'field'")
        return _paper_tau(x, y)
    if variant != "field":
        raise ValueError(f"unknown variant {variant!r} (use 'field' or 'paper')")
    table = _weight_table(weigher, x.size)
    if rank is True or rank is np.True_:
        return (_ranked_tau(x, y, table, additive) + _ranked_tau(y, x, table, additive)) / 2
    if rank is None:
        return _ranked_tau(x, y, table, additive)
    r = np.arange(x.size) if rank is False or rank is np.False_ else _dense_rank(rank, x.size)
    return _core_tau(x, y, np.ascontiguousarray(table[r]), additive)


def _paper_tau(x, y):
    """sum_{i<j} w_ij sign[(G_i-G_j)(P_i-P_j)] / sum_{i<j} w_ij, w_ij = 1/(G_i+G_j), G = 1-based truth rank."""
    G = y.size + 1 - _average_ranks(y)  # 1 = best (largest) truth; ties share their average rank
    i, j = np.triu_indices(y.size, 1)
    w = 1.0 / (G[i] + G[j])
    # Both rankings are decreasing, so the sign of rank differences equals that of value differences.
    sign = np.sign(x[i] - x[j]) * np.sign(y[i] - y[j])
    return float(np.sum(w * sign) / np.sum(w))


def kendall_tau(scores, truth):
    """Kendall tau-b (= scipy.stats.kendalltau(scores, truth).statistic); nan for constant input."""
    x, y = _check_pair(scores, truth)
    # tau-b is the weighted tau with unit element weights and multiplicative pair weights.
    return _core_tau(x, y, np.ones(x.size), False)


def pearson_r(scores, truth):
    """Pearson r (= scipy.stats.pearsonr(scores, truth).statistic); nan for constant input."""
    x, y = _check_pair(scores, truth)
    return _pearson(x, y)


def _pearson(x, y):
    if np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    xm, ym = x - x.mean(), y - y.mean()
    # Scale before the norm (as scipy does) so huge values cannot overflow.
    nx = np.abs(xm).max() * np.linalg.norm(xm / np.abs(xm).max())
    ny = np.abs(ym).max() * np.linalg.norm(ym / np.abs(ym).max())
    r = float(np.clip(np.dot(xm / nx, ym / ny), -1.0, 1.0))
    return float(round(r)) if x.size == 2 else r


def spearman_rho(scores, truth):
    """Spearman rho (= scipy.stats.spearmanr(scores, truth).statistic): Pearson r of average ranks."""
    x, y = _check_pair(scores, truth)
    return _pearson(_average_ranks(x), _average_ranks(y))


def rel_k(scores, truth, k):
    """Best true accuracy among the top-k models by score / best true accuracy (SFDA's ``rel_k``).

    Ties in score keep input order (Python's stable ``sorted(..., reverse=True)``); k > n means all.
    """
    x, y = _check_pair(scores, truth)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    best = y.max()
    if best <= 0:
        raise ValueError(f"rel_k needs a positive best true accuracy, got {best}")
    top = np.argsort(-x, kind="stable")[:k]
    return float(y[top].max() / best)


def top1_hit(scores, truth):
    """True if the top-scored model (first on ties) has the best true accuracy."""
    x, y = _check_pair(scores, truth)
    return bool(y[np.argsort(-x, kind="stable")[0]] == y.max())


# ----------------------------------------------------------------------------------------------------
# Evaluation harness: Table 1 (per-dataset tau_w and mean) and the stability study (Fig. 3)
# ----------------------------------------------------------------------------------------------------

_METRICS = {
    "tau_w": weighted_tau,
    "tau_w_paper": lambda s, g: weighted_tau(s, g, variant="paper"),
    "tau": kendall_tau,
    "rho": spearman_rho,
    "pearson": pearson_r,
    "top1": lambda s, g: float(top1_hit(s, g)),
}


def _metric_fn(name):
    if name in _METRICS:
        return _METRICS[name]
    m = re.fullmatch(r"rel(\d+)", name)
    if m and int(m.group(1)) >= 1:
        return lambda s, g: rel_k(s, g, int(m.group(1)))
    raise ValueError(f"unknown metric {name!r} (known: {', '.join(_METRICS)}, rel<k>)")


def _drop_zero_truth(truth, where):
    """-> (truth without zeros, the dropped models)."""
    # In the published tables a 0 means a fine-tuning run that is missing, not a 0 % accuracy.
    if not isinstance(truth, Mapping):
        raise ValueError(f"{where}truth must be a {{model: accuracy}} mapping")
    zeros = [m for m, a in truth.items() if isinstance(a, (int, float, np.number)) and a == 0]
    if zeros:
        warnings.warn(f"{where}truth is 0 for {zeros}: treated as missing runs and dropped", stacklevel=3)
    return {m: a for m, a in truth.items() if m not in zeros}, set(zeros)


def evaluate(scores, truth, *, metrics=("tau_w",), missing="error", zero_is_missing=True):
    """Score one method on several datasets: ``{metric: {dataset: value, ..., "mean": value}}``.

    ``scores = {dataset: {model: score}}`` (higher = better), ``truth = {dataset: {model: acc}}``.
    Every scored dataset must be in truth; truth-only datasets are ignored.  A model in one mapping
    but not the other is a ValueError unless ``missing="drop"`` (then a warning).  A truth of 0 is a
    missing run and is dropped with a warning (``zero_is_missing=False`` keeps it).  Metrics: tau_w,
    tau_w_paper, tau (tau-b), rho, pearson, top1 (hit = 1.0), rel<k> (e.g. rel1, rel3).
    """
    if missing not in ("error", "drop"):
        raise ValueError(f"missing must be 'error' or 'drop', got {missing!r}")
    if isinstance(metrics, str):
        metrics = metrics.split(",")
    fns = {name: _metric_fn(name) for name in metrics}
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError("scores must be a non-empty {dataset: {model: score}} mapping")
    table = {name: {} for name in fns}
    for ds, ds_scores in scores.items():
        if not isinstance(truth, Mapping) or ds not in truth:
            raise ValueError(f"dataset {ds!r} is not in truth")
        if not isinstance(ds_scores, Mapping) or not isinstance(truth[ds], Mapping):
            raise ValueError(f"{ds}: scores and truth must be {{model: value}} mappings")
        ds_truth, zeros = _drop_zero_truth(truth[ds], f"{ds}: ") if zero_is_missing else (truth[ds], set())
        ds_scores = {m: v for m, v in ds_scores.items() if m not in zeros}
        _, x, y = _align(ds_scores, ds_truth, missing, f"{ds}: ")
        for name, fn in fns.items():
            try:
                table[name][ds] = fn(x, y)
            except ValueError as e:
                raise ValueError(f"{ds}: {e}") from None
    for row in table.values():
        row["mean"] = float(np.mean(list(row.values())))
    return table


def _stability_inputs(scores_by_method, truth, missing, zero_is_missing):
    """-> (methods, models, S (methods x models), g) from mappings or aligned arrays."""
    if not isinstance(scores_by_method, Mapping) or not scores_by_method:
        raise ValueError("scores_by_method must be a non-empty {method: scores} mapping")
    methods = list(scores_by_method)
    if not isinstance(truth, Mapping):
        g = _vector(truth, "truth")
        rows = [_check_pair(scores_by_method[m], g)[0] for m in methods]
        return methods, list(range(g.size)), np.array(rows), g
    zeros = set()
    if zero_is_missing:
        truth, zeros = _drop_zero_truth(truth, "")
    models = list(truth)
    for m in methods:  # the pool is the models every method scored (or an error)
        if not isinstance(scores_by_method[m], Mapping):
            raise ValueError(f"scores of {m!r} must be a {{model: score}} mapping like truth")
        scored = {mo: v for mo, v in scores_by_method[m].items() if mo not in zeros}
        kept, _, _ = _align(scored, {mo: truth[mo] for mo in models}, missing, f"method {m!r}: ")
        models = [mo for mo in models if mo in kept]
    g = _vector([truth[mo] for mo in models], "truth")
    S = np.array([_vector([scores_by_method[m][mo] for mo in models], f"scores of {m!r}") for m in methods])
    return methods, models, S, g


def stability(scores_by_method, truth, k=10, *, weigher=None, additive=True, missing="error",
              zero_is_missing=True, max_subsets=2_000_000):
    """tau_w (field default) of every method on every k-subset of the model pool (ITM Fig. 3).

    ``scores_by_method = {method: {model: score}}`` and ``truth = {model: acc}`` for one dataset (or
    ``{method: array}`` and an aligned truth array).  Returns ``{"models", "subsets" (n_sub x k model
    indices), "tau": {method: array(n_sub)}, "summary": {"mean", "std" (ddof=0), "beats"}}`` where
    ``beats[a][b]`` is the fraction of subsets in which method a has a strictly higher tau_w than b.
    """
    methods, models, S, g = _stability_inputs(scores_by_method, truth, missing, zero_is_missing)
    M = g.size
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 2 <= k <= M:
        raise ValueError(f"k must be an integer in [2, {M}] (the pool has {M} models), got {k!r}")
    if math.comb(M, k) > max_subsets:
        raise ValueError(f"C({M}, {k}) = {math.comb(M, k)} subsets exceeds max_subsets={max_subsets}")
    subsets = np.array(list(itertools.combinations(range(M), k)), dtype=np.int64)
    table = _weight_table(weigher, k)
    run = _stability_nb if HAVE_NUMBA else _stability_np
    taus = run(np.ascontiguousarray(S), g, subsets, table, bool(additive))
    tau = {m: taus[i] for i, m in enumerate(methods)}
    summary = {
        "mean": {m: float(t.mean()) for m, t in tau.items()},
        "std": {m: float(t.std()) for m, t in tau.items()},
        "beats": {a: {b: float(np.mean(tau[a] > tau[b])) for b in methods if b != a} for a in methods},
    }
    return {"models": models, "subsets": subsets, "tau": tau, "summary": summary}


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr and exit 1, like every other bad input
        print(f"kendall.py: error: {message}", file=sys.stderr)
        raise SystemExit(1)


def _load_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read {what} file {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} file {path} is not valid JSON: {e}") from None


def _depth(d):
    """Nesting depth of dicts: {model: x} -> 1, {dataset: {model: x}} -> 2, ..."""
    n = 0
    while isinstance(d, Mapping) and d:
        d, n = next(iter(d.values())), n + 1
    return n


def _load_inputs(args):
    """-> ({method: {dataset: {model: score}}}, {dataset: {model: acc}}, single_method)."""
    scores = _load_json(args.scores, "scores")
    truth = _load_json(args.truth, "truth")
    if _depth(truth) == 3:  # a file of several published tables, like finetune_acc_tables.json
        if args.table is None or args.table not in truth:
            raise ValueError(f"truth file holds tables {sorted(truth)}; choose one with --table")
        truth = truth[args.table]
    elif args.table is not None:
        raise ValueError("--table given but the truth file holds a single table")
    if _depth(truth) != 2:
        raise ValueError("truth must be {dataset: {model: accuracy}}")
    single = _depth(scores) == 2
    if not single and _depth(scores) != 3:
        raise ValueError("scores must be {dataset: {model: score}} or {method: {dataset: {model: score}}}")
    return ({"scores": scores} if single else scores), truth, single


def _print_table(results, metrics):
    """Table 1 layout: one block per metric, a row per method, a column per dataset and the mean."""
    for metric in metrics:
        cols = list(next(iter(results.values()))[metric])
        width = max(9, *(len(c) for c in cols))
        print(f"{metric:<16}" + "".join(f"{c:>{width + 1}}" for c in cols))
        for method, res in results.items():
            print(f"{method:<16}" + "".join(f"{res[metric].get(c, math.nan):>{width + 1}.4f}" for c in cols))
        print()


def _run_stability(methods, truth, k, missing, as_json):
    out = {}
    for ds in next(iter(methods.values())):
        if ds not in truth:
            raise ValueError(f"dataset {ds!r} is not in truth")
        res = stability({m: s[ds] for m, s in methods.items()}, truth[ds], k, missing=missing)
        out[ds] = {"models": res["models"], "k": k, "n_subsets": len(res["subsets"]),
                   **res["summary"], "tau": {m: t.tolist() for m, t in res["tau"].items()}}
    if as_json:
        print(json.dumps(out, indent=1))
        return
    for ds, r in out.items():
        print(f"{ds}: {r['n_subsets']} subsets of {r['k']} from {len(r['models'])} models")
        for m in r["mean"]:
            beats = ", ".join(f"> {b}: {f:.3f}" for b, f in r["beats"][m].items())
            print(f"  {m:<16} tau_w {r['mean'][m]:.4f} +- {r['std'][m]:.4f}  {beats}")


def main(argv=None) -> int:
    p = _Parser(description="Rank-correlation metrics of transferability scores vs fine-tuned accuracy.")
    p.add_argument("--scores", required=True,
                   help="JSON {dataset: {model: score}} or {method: {dataset: {model: score}}}; higher = better")
    p.add_argument("--truth", required=True, help="JSON {dataset: {model: accuracy}} (or several tables, see --table)")
    p.add_argument("--table", help="which table of a multi-table truth file (e.g. sfda_group1)")
    p.add_argument("--metric", default="tau_w", help="comma list: tau_w,tau_w_paper,tau,rho,pearson,top1,rel<k>")
    p.add_argument("--missing", choices=("error", "drop"), default="error", help="models present on one side only")
    p.add_argument("--stability", type=int, metavar="K", help="tau_w over every K-subset of the models instead")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (1): return the code, don't exit
        return int(e.code or 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _run(args)
            code = 0
        except (ValueError, TypeError) as e:  # bad input: one line, never a traceback
            print(f"kendall.py: error: {e}", file=sys.stderr)
            code = 1
    for w in caught:  # notes (dropped models) as single lines on stderr
        print(f"kendall.py: note: {w.message}", file=sys.stderr)
    return code


def _run(args):
    methods, truth, single = _load_inputs(args)
    if args.stability is not None:
        return _run_stability(methods, truth, args.stability, args.missing, args.json)
    metrics = [m.strip() for m in args.metric.split(",") if m.strip()]
    results = {m: evaluate(s, truth, metrics=metrics, missing=args.missing) for m, s in methods.items()}
    if args.json:
        print(json.dumps(results["scores"] if single else results, indent=1))
    else:
        _print_table(results, metrics)


if __name__ == "__main__":
    sys.exit(main())

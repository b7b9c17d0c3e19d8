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

CLI: ``python kendall.py --scores itm.json --scores baselines.json --truth truth.json [--target T]
[--metric tau_w,rho,rel1] [--json] [--missing drop] [--stability K]``.  A scores file is what
``itm.py --json`` and ``baselines.py --json`` print, ``{"dataset": NAME or null, "scores": {method:
{model: score or null}}, ...}`` (null: the method failed on that model, which is then dropped with a
note), or ``{dataset: {model: score}}`` or ``{method: {dataset: {model: score}}}``.  The truth is
``{model: accuracy}`` or ``{target: {model: accuracy}, ...metadata}``; the table is the one ``--target``
names, else the one the scores' dataset names, else the only one.  An undefined metric (all scores or
all truth values tied) is a note on stderr and ``n/a`` in the table (null in JSON).

numba is optional: without it, or with ``ITM_NO_NUMBA=1``, everything runs in NumPy with the same results.
"""
from __future__ import annotations

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

PROG = itm.prog_name("kendall.py", "itm-kendall")  # the name in this CLI's messages

numba, HAVE_NUMBA = itm.numba, itm.HAVE_NUMBA  # one numba guard (and ITM_NO_NUMBA), in itm.py

__all__ = ["weighted_tau", "kendall_tau", "spearman_rho", "pearson_r", "rel_k", "top1_hit",
           "evaluate", "stability", "load_truth", "truth_table", "main"]


def _jit(fn):
    # Lazy compilation (no signature): importing this module never compiles anything.
    # error_model="numpy": 0/0 gives nan like scipy instead of raising ZeroDivisionError.
    # itm.njit: the project's one way to compile (error_model="numpy"), None without numba.
    return itm.njit(fn) or fn


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
    except (TypeError, ValueError, OverflowError) as e:  # OverflowError: an integer beyond float64 (1e400)
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
    r = float(np.clip(np.dot(xm / nx, ym / ny), -1.0, 1.0))  # scalar = (n)·(n)
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
    tau_w_paper, tau (tau-b), rho, pearson, top1 (hit = 1.0), rel<k> (e.g. rel1, rel3).  A metric that
    is undefined (all scores or all truth values tied) is nan, with a warning naming the dataset; a
    mean over a nan is nan.
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
        _warn_undefined([name for name in fns if math.isnan(table[name][ds])], ds, x, y)
    for row in table.values():
        row["mean"] = float(np.mean(list(row.values())))
    return table


def _warn_undefined(names, ds, x, y):
    """A nan metric is no number to compare: say why (a constant side), so a table's n/a is explained."""
    if names:
        tied = [what for what, v in (("scores", x), ("truth values", y)) if len(set(v)) == 1]
        why = f"all {' and '.join(tied)} tied: " if tied else ""
        warnings.warn(f"{ds}: {why}{', '.join(names)} undefined", stacklevel=3)


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

def _parse_args(argv):
    p = itm.CLIParser(prog=PROG, description="Rank-correlation metrics of transferability scores "
                      "(higher = better) against fine-tuned accuracy.")
    p.add_argument("--scores", required=True, action="append", metavar="FILE",
                   help='JSON {"dataset": NAME or null, "scores": {method: {model: score or null}}} (what '
                   "itm.py --json and baselines.py --json print), or {dataset: {model: score}}, or {method: "
                   "{dataset: {model: score}}}; give it several times (or comma-separated) to compare methods")
    p.add_argument("--truth", required=True, metavar="FILE",
                   help="JSON {model: accuracy}, or {target: {model: accuracy}, ...metadata} (entries that "
                   "are not tables of numbers are ignored)")
    p.add_argument("--target", help="the truth table to score against (default: the one the scores' "
                   "dataset names, else the only one)")
    p.add_argument("--table", help="for a truth file of several {dataset: {model: accuracy}} groups (like "
                   "bench/data/finetune_acc_tables.json): which group")
    p.add_argument("--metric", help="comma list: tau_w,tau_w_paper,tau,rho,pearson,top1,rel<k> (default tau_w)")
    p.add_argument("--missing", choices=("error", "drop"), default="error", help="models present on one side only")
    p.add_argument("--stability", type=int, metavar="K", help="tau_w over every K-subset of the models instead")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table (n/a is null)")
    args = p.parse_args(argv)
    for arg in args.scores:
        if "" in arg.split(","):
            p.error(f"--scores: empty file name in {arg!r}")
    args.scores = [path for arg in args.scores for path in arg.split(",")]
    if args.stability is not None and args.metric is not None:
        p.error("--metric does not apply to --stability (which is tau_w)")
    if args.stability is not None and args.stability < 2:
        p.error(f"--stability: K must be >= 2, got {args.stability}")
    args.metrics = [m.strip() for m in (args.metric or "tau_w").split(",") if m.strip()]
    try:
        for name in args.metrics or [""]:
            _metric_fn(name)
    except ValueError as e:
        p.error(f"--metric: {e}")
    return args


def _load_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{what} file not found: {path}") from None
    except OSError as e:
        raise ValueError(f"cannot read {what} file {path}: {e.strerror}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise ValueError(f"{what} file {path} is not valid JSON: {itm.one_line(e)}") from None


def load_truth(path, target=None, dataset=None):
    """{model: fine-tuned accuracy} from a JSON file that is either that object itself or a ground-truth
    file {target: {model: accuracy}, ...} (metadata entries that are not such tables are ignored): the
    table named `target`; else the one named like `dataset`, where there is one; else the only table."""
    return truth_table(path, target, dataset)[1]


def truth_table(path, target=None, dataset=None):
    """(name of the table used, or None for a flat file; {model: accuracy}) by load_truth's rules, so that a
    caller can say which table of a nested file it compares with."""
    doc = _load_json(path, "truth")
    if not isinstance(doc, dict) or not doc:
        raise ValueError(f"{path} must be a JSON object {{model: fine-tuned accuracy}}")
    if _is_table(doc):
        return None, _accuracies(path, doc)
    tables = {k: v for k, v in doc.items() if isinstance(v, dict) and v and _is_table(v)}
    if not tables:
        raise ValueError(f"{path} must be a JSON object {{model: fine-tuned accuracy}} or "
                         "{target: {model: accuracy}}; it holds no such table")
    if target is not None and target not in tables:
        raise ValueError(f"{path} has no table {target!r} (tables: {', '.join(tables)})")
    name = target if target is not None else dataset if dataset in tables else None
    if name is None and len(tables) != 1:
        raise ValueError(f"{path} holds {len(tables)} tables ({', '.join(tables)}) and none is named "
                         f"{dataset!r}; pick one with --target NAME" if dataset is not None else
                         f"{path} holds {len(tables)} tables ({', '.join(tables)}); pick one with --target NAME")
    name = name if name is not None else next(iter(tables))
    return name, _accuracies(path, tables[name])


def _accuracies(path, table):
    """{model: float}, refusing (one line, naming the model) what is no finite number: JSON's NaN and
    Infinity, or an integer beyond float64 (json reads 1e400 as inf and 10**400 as an int)."""
    out = {}
    for model, v in table.items():
        try:
            out[model] = float(v)
        except OverflowError:
            out[model], v = math.inf, "an integer beyond the float range"
        if not math.isfinite(out[model]):
            raise ValueError(f"truth file {path}: the accuracy of {model!r} is {v}, not a finite number")
    return out


def _is_table(d):
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in d.values())


def _levels(d):
    """Nesting depth of mappings, all leaves at one depth: {model: x} -> 1, {dataset: {model: x}} -> 2;
    0 for anything else (a leaf, an empty mapping, mixed depths)."""
    if not isinstance(d, Mapping) or not d:
        return 0
    depths = {_levels(v) if isinstance(v, Mapping) else 0 for v in d.values()}
    return 1 + depths.pop() if len(depths) == 1 else 0


def _load_scores(path):
    """One --scores file -> ({method: {dataset or None: {model: score or None}}}, legacy one-method file?)."""
    doc = _load_json(path, "scores")
    if isinstance(doc, Mapping) and "dataset" in doc and "scores" in doc \
            and not isinstance(doc["dataset"], Mapping):  # the shape itm.py and baselines.py print
        dataset, by_method = doc["dataset"], doc["scores"]
        if dataset is not None and not isinstance(dataset, str):
            raise ValueError(f"scores file {path}: \"dataset\" must be a name or null, got {dataset!r}")
        if _levels(by_method) != 2:
            raise ValueError(f"scores file {path}: \"scores\" must be {{method: {{model: score or null}}}}")
        return {method: {dataset: s} for method, s in by_method.items()}, False
    if _levels(doc) == 2:  # one method, named by its file
        return {os.path.splitext(os.path.basename(path))[0]: doc}, True
    if _levels(doc) == 3:
        return doc, False
    raise ValueError(f'scores file {path}: expected {{"dataset": NAME, "scores": {{method: {{model: score}}}}}}, '
                     "{dataset: {model: score}} or {method: {dataset: {model: score}}}")


def _truth_lookup(args):
    """-> lookup(name) -> (column label, {model: accuracy}): the truth table for one scores dataset."""
    doc = _load_json(args.truth, "truth")
    if args.table is not None:
        return _group_lookup(args, doc)
    if _levels(doc) == 3:
        raise ValueError(f"truth file {args.truth} holds groups of tables {sorted(doc)}; choose one with --table")
    stem = os.path.splitext(os.path.basename(args.truth))[0]

    def lookup(name):
        if args.target is not None:
            return args.target, load_truth(args.truth, args.target)
        return (name or stem), _named_or_only(args.truth, name)
    return lookup


def _named_or_only(path, name):
    """The table the scores' dataset names, else the only one (load_truth's rules for either)."""
    try:
        return load_truth(path, name)
    except ValueError as err:
        if name is None:
            raise
        try:
            table = load_truth(path)
        except ValueError:
            raise err from None  # it names the tables there are
    warnings.warn(f"truth file {path} has no table {name!r}: its only table is used for {name!r}")
    return table


def _group_lookup(args, doc):
    group = doc.get(args.table) if isinstance(doc, Mapping) else None
    if _levels(group) != 2:
        groups = sorted(k for k, v in doc.items() if _levels(v) == 2) if isinstance(doc, Mapping) else []
        raise ValueError(f"--table {args.table!r}: truth file {args.truth} has no such group of "
                         f"{{dataset: {{model: accuracy}}}} tables (groups: {', '.join(groups) or 'none'})")

    def lookup(name):
        name = args.target or name
        if name is None and len(group) == 1:
            name = next(iter(group))
        if name not in group:
            raise ValueError(f"dataset {name!r} is not in --table {args.table!r} of {args.truth} "
                             f"(datasets: {', '.join(group)})")
        return name, group[name]
    return lookup


def _gather(args):
    """-> ({method: {column: {model: score or None}}}, {column: {model: accuracy}}, legacy one-method?)."""
    files = [(path, *_load_scores(path)) for path in args.scores]
    datasets = list(dict.fromkeys(ds for _, by_method, _ in files for cols in by_method.values() for ds in cols))
    named = [ds for ds in datasets if ds is not None]
    if args.target is not None and len(named) > 1:
        raise ValueError(f"--target {args.target!r} picks one truth table, but the scores cover datasets "
                         f"{', '.join(named)}; leave --target out to match each by name")
    lookup = _truth_lookup(args)
    columns = {ds: lookup(ds) for ds in datasets}
    scores, origin = {}, {}
    for path, by_method, _ in files:
        for method, cols in by_method.items():
            for ds, values in cols.items():
                label = columns[ds][0]
                if (method, label) in origin:
                    raise ValueError(f"method {method!r} has scores for {label!r} in {origin[method, label]} "
                                     f"and in {path}")
                origin[method, label] = path
                scores.setdefault(method, {})[label] = values
    truth = dict(columns.values())
    return scores, truth, len(files) == 1 and files[0][2]


def _clean(scores, truth):
    """Drop 0 truth (a missing fine-tuning run) and null scores (the method failed or diverged on that
    model), each with one note -> (scores, truth, {(method, column): models with null scores})."""
    truth, zeros = dict(truth), {}
    for label, table in truth.items():
        truth[label], zeros[label] = _drop_zero_truth(table, f"{label}: ")
    kept, nulls = {}, {}
    for method, cols in scores.items():
        for label, values in cols.items():  # {model: value}: the shapes _load_scores accepts
            null = [m for m, v in values.items() if v is None and m not in zeros[label]]
            if null:
                warnings.warn(f"{method}: {label}: no score (null) for {', '.join(null)}: dropped")
            nulls[method, label] = set(null)
            kept.setdefault(method, {})[label] = {m: v for m, v in values.items()
                                                   if v is not None and m not in zeros[label]}
    return kept, truth, nulls


def _noted(prefix, fn, *args, **kwargs):
    """fn(*args, **kwargs), its warnings re-issued with a prefix (the method they are about)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    for w in caught:
        warnings.warn(f"{prefix}{w.message}", stacklevel=2)
    return out


def _without(table, models):
    return {m: v for m, v in table.items() if m not in models}


def _evaluate_all(scores, truth, nulls, args):
    """{method: {metric: {column: value, "mean": value}}}; a method is scored on the models it scored."""
    return {method: _noted(f"{method}: ", evaluate, cols,
                           {label: _without(truth[label], nulls[method, label]) for label in cols},
                           metrics=args.metrics, missing=args.missing, zero_is_missing=False)
            for method, cols in scores.items()}


def _stability_all(scores, truth, nulls, args):
    """{column: summary}: every method that scored a column, on the models all of them scored."""
    out = {}
    for label, table in truth.items():
        methods = [m for m in scores if label in scores[m]]
        failed = set().union(*(nulls[m, label] for m in methods))
        res = stability({m: _without(scores[m][label], failed) for m in methods}, _without(table, failed),
                        args.stability, missing=args.missing, zero_is_missing=False)
        out[label] = {"models": res["models"], "k": args.stability, "n_subsets": len(res["subsets"]),
                      **res["summary"], "tau": {m: t.tolist() for m, t in res["tau"].items()}}
    return out


def _cell(v):
    return "-" if v is None else "n/a" if math.isnan(v) else f"{v:.4f}"


def _format_table(results, metrics):
    """Table 1 layout: one block per metric, a row per method, a column per dataset and the mean."""
    cols = list(dict.fromkeys(c for res in results.values() for c in res[metrics[0]] if c != "mean"))
    cols.append("mean")
    width, name_width = max(9, *(len(c) for c in cols)), max(16, *(len(m) + 1 for m in results))
    lines = []
    for metric in metrics:
        lines.append(f"{metric:<{name_width}}" + "".join(f"{c:>{width + 1}}" for c in cols))
        lines += [f"{method:<{name_width}}" + "".join(f"{_cell(res[metric].get(c)):>{width + 1}}" for c in cols)
                  for method, res in results.items()]
        lines.append("")
    return "\n".join(lines)


def _format_stability(out):
    lines = []
    for ds, r in out.items():
        lines.append(f"{ds}: {r['n_subsets']} subsets of {r['k']} from {len(r['models'])} models")
        for m in r["mean"]:
            beats = ", ".join(f"> {b}: {f:.3f}" for b, f in r["beats"][m].items())
            lines.append(f"  {m:<16} tau_w {_cell(r['mean'][m])} +- {_cell(r['std'][m])}  {beats}")
    return "\n".join(lines)


def _jsonable(obj):
    """nan -> None, so --json prints strict JSON (null = undefined)."""
    if isinstance(obj, Mapping):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return None if isinstance(obj, float) and math.isnan(obj) else obj


def _run(args):
    """-> the text for stdout."""
    try:
        return _run_checked(args)
    except ValueError as err:  # the library's advice in the command line's words
        raise ValueError(str(err).replace("use missing='drop'", "use --missing drop")) from None


def _run_checked(args):
    scores, truth, single = _gather(args)
    scores, truth, nulls = _clean(scores, truth)
    if args.stability is not None:
        out = _stability_all(scores, truth, nulls, args)
        return json.dumps(_jsonable(out), indent=1) if args.json else _format_stability(out)
    results = _evaluate_all(scores, truth, nulls, args)
    if args.json:  # a legacy one-method file keeps its unkeyed output: {metric: {dataset: value}}
        return json.dumps(_jsonable(next(iter(results.values())) if single else results), indent=1)
    return _format_table(results, args.metrics)


def _main(argv):
    args = _parse_args(argv)  # every option is checked before any file is read
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            text = _run(args)
        finally:  # notes (dropped models, undefined metrics) as single lines, each once
            for note in dict.fromkeys(str(w.message) for w in caught):
                print(f"{PROG}: note: {' '.join(note.split())}", file=sys.stderr)
    # Flushed here, so a reader that left (`| head -1`) raises inside run_cli, which ends quietly.
    print(text, flush=True)
    return 0


def main(argv=None) -> int:
    """The command line; returns the exit status (errors: one line on stderr, status 1)."""
    return itm.run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())

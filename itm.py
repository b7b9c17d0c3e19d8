"""ITM — Implicit Transferability Modeling, in one file: the method, its API and its command line.

Reference implementation of Zheng, Wang, Zhou, Huang, "Implicit Modeling for Transferability Estimation
of Vision Foundation Models", NeurIPS 2025. Given the features a pre-trained model produces on a labelled
downstream dataset, ITM trains a linear map f (D→Z) and a linear head h (Z→K) through the deparametric
approximation of how the embeddings would evolve under fine-tuning, and scores the model by how well the
evolved embeddings of held-out samples are classified. Higher score = predicted to fine-tune better.

    import itm
    result = itm.itm_score(features, labels)      # features N×D, labels N (ints or strings)
    ranking = itm.rank({"resnet50": f1, "vit_b16": f2}, labels)   # [(name, Result)], best first

    $ python itm.py --features feats.npz --labels y.npy    # rank every model of the npz
    $ python itm.py                                        # the bundled example

Notation: N samples, D feature width, K classes, B batch size, Z latent width (= K with one-hot centres),
n deparametric steps of size η; X a batch of features (B×D, the paper's E_b), Θ = f(X) (B×Z), T the
batch's pseudo-cluster centres (B×Z), C = s·ΘΘᵀ (B×B), E⁽ⁿ⁾ the evolved embeddings (B×Z).

The file reads top to bottom as the method:
  1. Config (the paper's knobs first), the presets, Result.
  2. Algorithm 2, plain: f, the n steps of Eq. 5, h, the cross-entropy, the gradients, AdamW, training.
  3. The fast path: the n steps in closed form, one small eigendecomposition instead of n products.
  4. The other readings: Algorithm 1's inner loop, the authors' code (one variant, chosen once).
  5. The plan: checked input, preprocessing, split and folds, adaptive n, centres, weights, batches.
  6. A model's score over its folds.  7. The API: itm_score, rank, score_grid.
  8. Speed: the BLAS limiter and the numba twins of the hot loops, chosen in one place.
  9. Input files.  10. The command line.

Every choice the paper leaves open, and the measurements behind it, is recorded in DESIGN.md of the
project repository (cited as DESIGN.md §x). NumPy is the only requirement. numba compiles the hot loops
when present (ITM_NO_NUMBA=1 turns it off; the NumPy path sums in other orders, so a score can differ in
its last digits or, over a long run, a little more); threadpoolctl keeps small LAPACK calls on one
thread. Copied alone, itm.py does everything but --truth (kendall.py) and jobs > 1 / --scheduler
(itm_parallel.py).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import json
import math
import os
import re
import sys
import threading
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

try:  # optional: compiled element-wise kernels (section 8)
    if os.environ.get("ITM_NO_NUMBA", "") not in ("", "0"):
        raise ImportError("disabled by ITM_NO_NUMBA")
    import numba
except ImportError:
    numba = None
HAVE_NUMBA = numba is not None
USE_NUMBA = HAVE_NUMBA  # read at call time, so tests can compare both paths in one process

try:  # optional: single-threaded BLAS around small LAPACK calls (one_blas_thread)
    from threadpoolctl import ThreadpoolController
except ImportError:
    ThreadpoolController = None

__all__ = [
    # the API
    "Config", "Result", "Plan", "Diverged", "preset", "itm_score", "rank", "score_grid", "make_plan", "train",
    "make_executor", "load_features", "synthetic_zoo", "main",
    # the steps of the method, in the file's order
    "theta_and_targets", "propagate_steps", "softmax_ce", "adamw_step", "c_scale_factor", "nearest_centre",
    "mean_iou", "phi", "psi", "propagate_logits", "propagate_explicit", "propagate_detached",
    "check_features", "encode_labels", "downsample_labels", "IGNORE", "PREPROCESS", "Preprocessing",
    "fit_preprocessing", "stratified_split", "crossfit_folds", "split_by_image", "accumulate", "adaptive_n",
    "distance_sum", "feature_moments", "make_centres", "init_params", "make_batches",
    # what the project's other modules share (one convention for each concern)
    "HAVE_NUMBA", "USE_NUMBA", "numba", "njit", "one_blas_thread", "sibling", "cores", "score_model",
    "dataset_name", "write_atomic", "one_line", "prog_name", "CLIParser", "run_cli", "check_parallel",
]
__version__ = "0.1.0"

_TWINS = {}  # reference function name → its numba twin: filled in section 8, the one place twins are chosen


def _has_twin(reference):
    """`reference`, called through its numba twin where section 8 gives it one, USE_NUMBA is on (read at
    call time) and no argument is float16 (numba has no float16 arithmetic on the CPU)."""
    name = reference.__name__

    @functools.wraps(reference)
    def call(*args):
        twin = _TWINS.get(name)
        if USE_NUMBA and twin is not None and not any(getattr(a, "dtype", None) == np.float16 for a in args):
            return twin(*args)
        return reference(*args)
    call.reference = reference
    return call


# ====================================================================================================
# 1. Config, presets, Result: every knob of the method in one place (DESIGN.md §1).

PREPROCESS = ("none", "rms", "center_rms", "standardize", "unit_rows")   # Config.preprocess, DESIGN.md §0


@dataclass(frozen=True)
class Config:
    """Every knob of one ITM run, checked when made (a wrong type or value fails here, naming the field).
    The paper's knobs first, with its defaults (Sec. 4.2); then what it leaves open, chosen by DESIGN.md
    §1c's rule; then the other readings. preset() names the paper's and the authors' readings."""
    # Algorithm 2 and Sec. 4.2 of the paper
    iterations: int = field(default=500, metadata={"help": "training iterations T_iter"})
    batch_size: int = field(default=256, metadata={"help": "mini-batch size B"})
    eta: float = field(default=0.01, metadata={"help": "step size η of the deparametric update"})
    lr: float = field(default=5e-3, metadata={"help": "AdamW learning rate α"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (all tensors)"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW β1"})
    beta2: float = field(default=0.999, metadata={"help": "AdamW β2"})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW ε"})
    eval_every: int = field(default=100, metadata={"help": "score every this many iterations"})
    n: int | None = field(default=None, metadata={
        "help": "deparametric steps n (adaptive if unset; 0: no propagation, E = Θ)"})
    n_b: int = field(default=20, metadata={"help": "adaptive n: anchor n_b (Eq. 9)"})
    eta0: float = field(default=0.01, metadata={"help": "adaptive n: η0 (Eq. 9)"})
    dis_b: float = field(default=1.0, metadata={"help": "adaptive n: anchor distance dis_b (Eq. 9)"})
    centres: str = field(default="onehot", metadata={
        "help": "pseudo-cluster centres (A.8)", "choices": ("onehot", "random", "pca", "laplacian")})
    latent_dim: int | None = field(default=None, metadata={"help": "latent width Z ≥ K (default K)"})
    shift: bool = field(default=True, metadata={"help": "shift centres by the features' μ, σ"})
    # what the paper leaves open (DESIGN.md §0, §1, §1a, §1c)
    preprocess: str = field(default="standardize", metadata={
        "help": "scale-free preprocessing of each model's features (DESIGN.md §0)", "choices": PREPROCESS})
    folds: int = field(default=3, metadata={
        "help": "cross-fitting folds k: every sample scored once (1 = the paper's single 4/5 : 1/5 split)"})
    normalize: str = field(default="theta", metadata={
        "help": "unit-norm rows of Θ (DESIGN.md §1a)", "choices": ("theta", "features", "none")})
    c_scale: str = field(default="B/Z", metadata={
        "help": "C = ΘΘᵀ/B (Eq. 4–5), ΘΘᵀ/B² (Eq. 3) or Z·ΘΘᵀ/B (A.7: η0 per step along each class direction)",
        "choices": ("B", "B2", "B/Z")})
    score_by: str = field(default="centres", metadata={
        "help": "score the evolved embeddings by h's logits, or by their nearest pseudo-cluster centre",
        "choices": ("head", "centres")})
    # the other readings (DESIGN.md §1b, §3)
    mode: str = field(default="closed", metadata={
        "help": "closed-form propagation or Algorithm 1's explicit loop", "choices": ("closed", "explicit")})
    pc_loss: str = field(default="mse", metadata={
        "help": "L_pc of the explicit loop", "choices": ("mse", "mae", "ce")})
    reading: str = field(default="spec", metadata={
        "help": "spec, or authors: the authors' code as described (set it with preset('authors'))",
        "choices": ("spec", "authors")})
    # the input and the arithmetic
    task: str = field(default="auto", metadata={
        "help": "auto: N×h×w×D features are segmentation, N×D classification",
        "choices": ("auto", "classification", "segmentation")})
    metric: str = field(default="accuracy", metadata={
        "help": "score: top-1 / pixel accuracy, or mean IoU", "choices": ("accuracy", "miou")})
    dtype: str = field(default="float32", metadata={
        "help": "dtype of the large products (spectral part is always float64)",
        "choices": ("float32", "float64")})
    seed: int = field(default=0, metadata={"help": "seed of every random choice of a run"})

    def __post_init__(self):
        _check_types(self)
        _check_values(self)


def _check_types(cfg):
    """Config fields hold the types their defaults have: an option given as "5" or 5.0 through the
    Python API fails here, naming it, not deep inside a run."""
    for f in dataclasses.fields(cfg):
        value, kind = getattr(cfg, f.name), type(f.default)
        if value is None and f.default is None:
            continue
        if f.default is None or kind is int:
            ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
            if ok:
                object.__setattr__(cfg, f.name, int(value))
        elif kind is float:
            ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            if ok:
                object.__setattr__(cfg, f.name, float(value))
        else:
            ok = isinstance(value, kind)
        if not ok:
            want = "an integer" if f.default is None or kind is int else kind.__name__
            raise TypeError(f"Config.{f.name} must be {want}, got {value!r}")


_MAX_N = 10 ** 9                 # deparametric steps: far beyond any adaptive n, inside a 64-bit integer
_MAX_BATCH_ROWS = 1 << 27        # iterations × batch_size: the plan's row indices, 1 GiB of int64


def _check_values(cfg):
    """Every field within its range or its choices; the errors name the field."""
    for name in ("iterations", "batch_size", "eval_every", "n_b", "folds"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"Config.{name} must be ≥ 1, got {getattr(cfg, name)}")
    if cfg.seed < 0:
        raise ValueError(f"Config.seed must be ≥ 0, got {cfg.seed}")
    if cfg.latent_dim is not None and cfg.latent_dim < 1:
        raise ValueError(f"Config.latent_dim must be ≥ 1 (or None for K), got {cfg.latent_dim}")
    for f in dataclasses.fields(cfg):
        if isinstance(getattr(cfg, f.name), float) and not math.isfinite(getattr(cfg, f.name)):
            raise ValueError(f"Config.{f.name} must be a finite number, got {getattr(cfg, f.name)}")
    for name in ("eta", "lr", "eta0", "dis_b", "adam_eps"):
        if not float(getattr(cfg, name)) > 0:
            raise ValueError(f"Config.{name} must be > 0, got {getattr(cfg, name)}")
    for name in ("n", "n_b"):                        # (1 − ηλ)ⁿ and the loops take n as a 64-bit integer
        if getattr(cfg, name) is not None and getattr(cfg, name) > _MAX_N:
            raise ValueError(f"Config.{name} must be ≤ {_MAX_N:,}, got {getattr(cfg, name)}")
    if cfg.iterations * cfg.batch_size > _MAX_BATCH_ROWS:   # the plan holds every batch's row indices
        raise ValueError(f"Config.iterations × batch_size = {cfg.iterations * cfg.batch_size:,} row indices "
                         f"(the plan's batches) is more than {_MAX_BATCH_ROWS:,}; pass fewer iterations")
    if not 0 < cfg.eta0 < 1:
        raise ValueError(f"Config.eta0 must be in (0, 1), got {cfg.eta0}")
    if cfg.weight_decay < 0 or not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1):
        raise ValueError("Config: weight_decay must be ≥ 0 and beta1, beta2 in [0, 1)")
    if cfg.batch_size < 2:
        raise ValueError("Config.batch_size must be ≥ 2")
    if cfg.n is not None and int(cfg.n) < 0:
        raise ValueError(f"Config.n must be ≥ 0 (or None for adaptive), got {cfg.n}")
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise ValueError(f"Config.{f.name} must be one of {choices}, got {getattr(cfg, f.name)!r}")


def preset(name, **overrides):
    """A named Config: "default" (this implementation), "paper" (the paper's protocol read literally: raw
    features, one 4/5 : 1/5 split, C = ΘΘᵀ/B as Eq. 4–5 write it, scored by h's logits) or "authors" (the
    authors' code as reviewers and a public port describe it, DESIGN.md §1b: per-dimension standardised
    features, one detached propagation step (I − 0.5·C)(Θ − T) + T, no shift, a linear learning-rate decay
    over 10,000 iterations, an unstratified 80/20 split, the last incomplete batch kept)."""
    presets = {
        "default": {},
        "paper": dict(preprocess="none", folds=1, c_scale="B", score_by="head"),
        "authors": dict(preprocess="standardize", folds=1, reading="authors", n=1, eta=0.5, shift=False,
                        centres="onehot", normalize="theta", c_scale="B", mode="closed", score_by="head"),
    }
    if name not in presets:
        raise ValueError(f"unknown preset {name!r} (choose from {', '.join(presets)})")
    return _config(None, {**presets[name], **overrides})


@dataclass
class Result:
    """One model's score and everything behind it (itm_score, rank)."""
    score: float                    # percent: mean over folds of each fold's best scoring accuracy (NaN if
                                    # diverged)
    trajectory: list                # [(iteration, accuracy % averaged over folds), ...]
    n: int                          # deparametric steps (the median over folds; each fold adapts its own)
    seconds: float                  # wall time of the whole run
    diverged: bool = False          # propagation expanded (η·λ_max(C) ≥ 2) or produced non-finite values
    losses: np.ndarray | None = None  # training loss per iteration (fold 0)
    note: str = ""
    fold_scores: list = field(default_factory=list)   # each fold's best scoring accuracy, percent
    sd: float = float("nan")        # standard deviation of fold_scores (ddof 1; NaN with one fold)
    chance: float = float("nan")    # percent: what a model without class information scores (_chance)
    fold_n: list = field(default_factory=list)        # each fold's n
    error: str = ""                 # why the model could not be scored (rank(..., errors="report"))
    n_scored: int = 0               # samples scored over all folds (N with cross-fitting)


class Diverged(ArithmeticError):
    """The propagation stopped being a contraction (η·λ_max(C) ≥ 2) or produced non-finite values."""


# ====================================================================================================
# 2. Algorithm 2, plain (DESIGN.md §1 step 5). One training step on a batch X (B×D) with labels y:
#      Θ = f(X) = normalize_rows(XW_z + b_z),  T = Ê[y]                       (f, the centres)
#      E⁽ⁿ⁾ = Eq. 5 applied n times: E ← E − ηC(E − T) from E⁽⁰⁾ = Θ, C = s·ΘΘᵀ  (the propagation)
#      logits = E⁽ⁿ⁾W_h + b_h,  loss = mean cross-entropy(logits, y)           (h)
#    then the gradients of W_z, b_z, W_h, b_h back through all of it, and one AdamW step. Each forward
#    sits beside its backward. These functions are the references: section 3 computes the same E⁽ⁿ⁾
#    without the n products, and section 8 compiles some loops; the tests hold both to these.

# -- f: Θ = A/‖A‖ for A = XW_z + b_z (in _Model.evolve), and the targets T = Ê[y] ---------------------

@_has_twin
def theta_and_targets(A, centres, y, normalize):
    """Θ (rows unit-norm when normalize), the targets T = Ê[y] (B×Z, A's dtype) and the row norms (B)."""
    norms = np.sqrt(np.einsum("bz,bz->b", A, A, dtype=np.float64)) if normalize else np.ones(A.shape[0])
    norms = np.maximum(norms, 1e-12)  # an all-zero row stays zero instead of NaN
    return (A / norms[:, None]).astype(A.dtype, copy=False), centres[y].astype(A.dtype), norms


def _theta_backward(dtheta, theta, norms):
    """dA (B×Z) from dΘ through Θ = A/‖A‖: each row's component along Θ removed, the rest / ‖A‖."""
    return (dtheta - theta * np.sum(dtheta * theta, axis=1, keepdims=True)) / norms[:, None]


# -- the propagation: Eq. 5 n times, and back through the n steps --------------------------------------

def propagate_steps(theta, T, n, eta, s, want_grad=False):
    """E⁽ⁿ⁾ by n explicit steps E ← E − ηC(E − T) from E⁽⁰⁾ = Θ, C = s·ΘΘᵀ (B×B); with want_grad also
    dE⁽ⁿ⁾ → dΘ, back through the n steps and through C. O(n·B²·Z): the plain form of the propagation,
    what mode="explicit" runs (Algorithm 1 with L_pc = MSE is exactly these steps, DESIGN.md §3)."""
    C = s * (theta @ theta.T)                          # B×B = (B×Z)(Z×B)
    E, residuals = theta.copy(), []
    for _ in range(n):
        residuals.append(E - T)                        # B×Z: E⁽ᵏ⁾ − T
        E = E - eta * (C @ residuals[-1])              # B×Z = (B×B)(B×Z)
        if not np.all(np.isfinite(E)):
            raise Diverged("non-finite values in the explicit propagation")
    if not want_grad:
        return E, None

    def backward(dE):
        dC = np.zeros_like(C)                          # Σ_k dE⁽ᵏ⁺¹⁾(E⁽ᵏ⁾ − T)ᵀ = −dL/dC / η, B×B
        for R in reversed(residuals):
            dC += dE @ R.T                             # B×B = (B×Z)(Z×B)
            w = C @ dE                                 # Cᵀ dE⁽ᵏ⁺¹⁾ (C is symmetric), B×Z = (B×B)(B×Z)
            dE = dE - eta * w                          # dE⁽ᵏ⁾ = (I − ηC)ᵀ dE⁽ᵏ⁺¹⁾
        return dE - eta * s * ((dC + dC.T) @ theta)    # + the path through C = sΘΘᵀ, B×Z = (B×B)(B×Z)
    return E, backward


# -- h and its loss: logits = EW_h + b_h, the mean cross-entropy -------------------------------------

def _with_head(E, back, Wh, bh):
    """h on top of a propagation that forms E: logits and dlogits → (dΘ, dW_h)."""
    logits = E @ Wh + bh                               # B×K = (B×Z)(Z×K)
    if back is None:
        return logits, None
    # dE = dlogits·W_hᵀ (B×Z), dW_h = Eᵀ·dlogits (Z×K)
    return logits, lambda dlogits: (back(dlogits @ Wh.T), E.T @ dlogits)


def _identity(dE):
    return dE


@_has_twin
def softmax_ce(logits, y):
    """Mean cross-entropy of logits (B×K) against labels y (B), and its gradient w.r.t. the logits."""
    B = logits.shape[0]
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    s = e.sum(axis=1, keepdims=True)
    loss = float(np.mean(np.log(s[:, 0]) - shifted[np.arange(B), y]))
    grad = e / s
    grad[np.arange(B), y] -= 1.0
    return loss, grad / B


# -- AdamW, exactly torch.optim.AdamW (decoupled weight decay, bias-corrected moments) ------------------

@_has_twin
def _adamw_update(p, g, m, v, decay, c1, b1, c2, b2, step_size, bc2, eps, lerp_low):
    p *= decay
    if lerp_low:                                    # torch: exp_avg.lerp_(grad, 1 − β1), both branches
        m += c1 * (g - m)
    else:
        m[...] = g - (g - m) * b1
    v *= b2
    v += c2 * g * g
    p -= step_size * m / (np.sqrt(v) / bc2 + eps)


def adamw_step(p, g, m, v, lr, wd, b1, b2, eps, step):
    """One in-place AdamW step of one tensor with torch.optim.AdamW's arithmetic, in p's dtype (as
    torch computes a float32 parameter's step in float32)."""
    c = p.dtype.type                                # every constant in p's dtype
    _adamw_update(p, g, m, v, c(1.0 - lr * wd), c(1.0 - b1), c(b1), c(1.0 - b2), c(b2),
                  c(lr / (1.0 - b1 ** step)), c(math.sqrt(1.0 - b2 ** step)), c(eps), 1.0 - b1 < 0.5)


# -- one batch through f, the propagation and h; the training loop ---------------------------------------

def c_scale_factor(c_scale, B, Z):
    """The s of C = s·ΘΘᵀ for a batch of B rows: 1/B (Eq. 4–5), 1/B² (Eq. 3), or Z/B, which puts the
    mean non-zero eigenvalue of C at 1 for unit rows spread over Z directions, so that each class
    direction contracts by about 1 − η per step as A.7's derivation (B = 1) assumes (DESIGN.md §1d)."""
    return {"B": 1.0, "B2": 1.0 / B, "B/Z": float(Z)}[c_scale] / B


def _propagation(plan):
    """The propagation and h of a run, chosen once from its Config (DESIGN.md §1–3): a function
    (Θ, T, y, W_h, b_h, want_grad) → (logits B×K, dlogits → (dΘ, dW_h) or None). The closed form of
    section 3 by default; the n plain steps above with mode="explicit"; Algorithm 1 on another L_pc and
    the authors' detached step (section 4); none at all with n = 0 ((I − ηC)⁰ = I: E = Θ)."""
    cfg, n, eta = plan.config, plan.n, plan.config.eta

    def s(theta):
        return c_scale_factor(cfg.c_scale, *theta.shape)
    if n == 0:
        return lambda theta, T, y, Wh, bh, grad: _with_head(theta, _identity if grad else None, Wh, bh)
    own = _READINGS[cfg.reading].propagate
    if own is not None:
        return lambda theta, T, y, Wh, bh, grad: _with_head(*own(theta, T, n, eta, s(theta), grad), Wh, bh)
    if cfg.mode == "closed":
        return lambda theta, T, y, Wh, bh, grad: propagate_logits(theta, T, n, eta, s(theta), Wh, bh, grad)
    if cfg.pc_loss == "mse":
        return lambda theta, T, y, Wh, bh, grad: _with_head(
            *propagate_steps(theta, T, n, eta, s(theta), grad), Wh, bh)
    return lambda theta, T, y, Wh, bh, grad: _with_head(*propagate_explicit(
        theta, T, plan.q[y].astype(theta.dtype), n, eta, s(theta), cfg.pc_loss, grad), Wh, bh)


class _Model:
    """f (D→Z), the propagation, h (Z→K): forward, loss and gradients for one batch; scoring."""

    def __init__(self, plan):
        self.F, self.plan, self.cfg = plan.features, plan, plan.config
        self.dtype = np.dtype(self.cfg.dtype)
        self.propagate = _propagation(plan)

    def batch(self, rows):
        X = _gather(self.F, rows, self.dtype)                      # B×D
        if self.cfg.normalize == "features":
            X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        return X

    def evolve(self, params, X, y, want_grad):
        """logits (B×K) of a batch, Θ, its row norms, and dlogits → (dΘ, dW_h) when want_grad."""
        Wz, bz, Wh, bh = params
        A = X @ Wz + bz                                            # B×Z = (B×D)(D×Z), the big product
        with one_blas_thread():                                    # the rest is small: see _small_products
            theta, T, norms = theta_and_targets(A, self.plan.centres, y, self.cfg.normalize == "theta")
            logits, back = self.propagate(theta, T, y, Wh, bh, want_grad)
            return logits, theta, norms, back

    def loss_and_grads(self, params, rows):
        X, y = self.batch(rows), self.plan.y[rows]
        logits, theta, norms, back = self.evolve(params, X, y, True)
        with one_blas_thread():
            loss, dlogits = softmax_ce(logits, y)
            if not math.isfinite(loss):
                raise Diverged("non-finite training loss")
            dtheta, dWh = back(dlogits)                            # B×Z, Z×K
            if self.cfg.normalize == "theta":                      # through Θ = A/‖A‖
                dtheta = _theta_backward(dtheta, theta, norms)
            if not np.all(np.isfinite(dtheta)):
                raise Diverged("non-finite gradients")
            dA = dtheta.astype(self.dtype, copy=False)
        dWz = X.T @ dA                                             # D×Z = (D×B)(B×Z), the big product
        return loss, [dWz, dA.sum(axis=0), dWh, dlogits.sum(axis=0)]

    def predict(self, params):
        """argmax of the evolved logits over the scoring part, cut into consecutive batches of B, each
        evolved towards its own labels' centres (DESIGN.md §1 step 6); with score_by="centres" the
        nearest pseudo-cluster centre of each evolved embedding instead (h with W_h = I, b_h = 0 is
        E⁽ⁿ⁾ itself)."""
        rows_all, B = self.plan.score_idx, self.cfg.batch_size
        by_centres = self.cfg.score_by == "centres"
        if by_centres:
            centres = self.plan.centres                                    # K×Z
            params = [*params[:2], np.eye(centres.shape[1], dtype=self.dtype),
                      np.zeros(centres.shape[1], dtype=self.dtype)]
        pred = np.empty(rows_all.size, dtype=np.int64)
        for start in range(0, rows_all.size, B):
            rows = rows_all[start:start + B]
            out = self.evolve(params, self.batch(rows), self.plan.y[rows], False)[0]
            if not np.all(np.isfinite(out)):
                raise Diverged("non-finite logits while scoring")
            pred[start:start + B] = nearest_centre(out, centres) if by_centres else np.argmax(out, axis=1)
        return pred

    def uninformed(self, rng):
        """Top-1 accuracy (percent) of the scoring step on random unit rows Θ in place of f's (Gaussian
        directions: no class information), over the scoring part cut as predict cuts it: through
        evolve with X = Θ and f, h the identity."""
        rows_all, B, Z = self.plan.score_idx, self.cfg.batch_size, self.plan.centres.shape[1]
        eye, zero = np.eye(Z, dtype=self.dtype), np.zeros(Z, dtype=self.dtype)
        correct = 0
        for start in range(0, rows_all.size, B):
            y = self.plan.y[rows_all[start:start + B]]
            theta = rng.standard_normal((y.size, Z))
            theta /= np.linalg.norm(theta, axis=1, keepdims=True)
            E = self.evolve([eye, zero, eye, zero], theta.astype(self.dtype), y, False)[0]
            correct += int(np.sum(nearest_centre(E, self.plan.centres) == y))
        return 100.0 * correct / rows_all.size

    def accuracy(self, params):
        """Top-1 (pixel) accuracy, percent, over the scoring part."""
        return 100.0 * float(np.mean(self.predict(params) == self.plan.y[self.plan.score_idx]))

    def score(self, params):
        if self.cfg.metric == "accuracy":
            return self.accuracy(params)
        return mean_iou(self.predict(params), self.plan.y[self.plan.score_idx], self.plan.classes.size)


def nearest_centre(E, centres):
    """argmin_k ‖E_i − Ê_k‖² = argmax_k 2 E_i·Ê_k − ‖Ê_k‖² for each row of E (B×Z); B×K = (B×Z)(Z×K)."""
    return np.argmax(2.0 * (E @ centres.T) - np.einsum("kz,kz->k", centres, centres), axis=1)


def mean_iou(pred, y, K):
    """Mean over classes present in prediction or truth of TP / (TP + FP + FN), percent."""
    cm = np.bincount(y * K + pred, minlength=K * K).reshape(K, K)
    tp = np.diag(cm)
    union = cm.sum(axis=0) + cm.sum(axis=1) - tp
    return 100.0 * float(np.mean(tp[union > 0] / union[union > 0]))


def train(plan, callback=None):
    """Algorithm 2 with AdamW on one plan (make_plan); returns (trajectory, losses).
    callback(t, loss, params) if given."""
    cfg, model = plan.config, _Model(plan)
    with one_blas_thread(_small_products(cfg.batch_size, plan.features.shape[1], plan.centres.shape[1])):
        return _train_loop(model, plan, cfg, callback)


def _train_loop(model, plan, cfg, callback):
    params = [p.copy() for p in plan.params]
    moments = [(np.zeros_like(p), np.zeros_like(p)) for p in params]
    losses, trajectory = np.empty(cfg.iterations), []
    lr_at = _READINGS[cfg.reading].lr_at
    for t in range(1, cfg.iterations + 1):
        loss, grads = model.loss_and_grads(params, plan.batches[t - 1])
        losses[t - 1] = loss
        for p, g, (m, v) in zip(params, grads, moments):
            adamw_step(p, g, m, v, lr_at(cfg.lr, t), cfg.weight_decay, cfg.beta1, cfg.beta2, cfg.adam_eps, t)
        if callback is not None:
            callback(t, loss, params)
        if t % cfg.eval_every == 0 or t == cfg.iterations:
            trajectory.append((t, model.score(params)))
    return trajectory, losses


# ====================================================================================================
# 3. The fast path: the n steps of Eq. 5 in closed form (DESIGN.md §2), the default mode="closed".
#
# Each step maps E − T ↦ (I − ηC)(E − T), so E⁽ⁿ⁾ = (I − ηC)ⁿR + T with R = Θ − T. Write
# p(λ) = (1 − ηλ)ⁿ = 1 + λ·φ(λ), φ(λ) = ((1 − ηλ)ⁿ − 1)/λ (φ(0) = −nη), so (I − ηC)ⁿ = I + C·φ(C). With
# C = sΘΘᵀ and the push-through identity Θᵀg(sΘΘᵀ) = g(sΘᵀΘ)Θᵀ, C·φ(C) = sΘ·φ(G)·Θᵀ for G = sΘᵀΘ (Z×Z):
#     E⁽ⁿ⁾ = R + sΘφ(G)ΘᵀR + T = Θ·M,   M = I + s·φ(G)·ΘᵀR   (Z×Z).
# One float64 eigendecomposition of G per batch gives φ(G), whatever n is, and the logits are Θ(M·W_h):
# E⁽ⁿ⁾ is never formed. The backward pass goes through the matrix function φ(G) by the Daleckii–Krein
# formula, whose matrix Ψ holds φ's divided differences. When Z > B the B×B matrix C is the smaller one,
# and p is applied to its eigenvalues directly. tests/test_itm.py holds both to propagate_steps and to
# torch autograd through the literal loop.

# -- p(λ) = (1 − ηλ)ⁿ, φ and their divided differences (float64) ----------------------------------------
# p[a, b] is the first divided difference, p[a, b, 0] the second with one node at 0; φ(λ) = p[λ, 0] and
# the Daleckii–Krein matrix of φ is Ψ_ij = φ[λ_i, λ_j] = p[λ_i, λ_j, 0]. Written without cancellation:
# (uᵃ − uᵇ)/(u_a − u_b) = u_bⁿ·expm1(n·log1p(d/u_b))/d is exact to rounding for any d = u_a − u_b ≠ 0.
# Two thresholds, in units of 1/(nη), shared with the loops of section 8:
_SERIES = 0.05  # below it |λ| takes the Taylor series of p[a, b, 0]: it converges by a factor ≤ 0.05 a term
_SEP = 1e-2     # pairs further apart divide precomputed values directly: rounding ≤ 2ε/(nη·|Δ|) ≤ 1e-14

def _divdiff1(a, b, n, eta):
    """First divided difference p[a, b] of p(λ) = (1 − ηλ)ⁿ, elementwise (p' where a == b)."""
    ua, ub = 1.0 - eta * a, 1.0 - eta * b
    d = eta * (b - a)                       # = u_a − u_b, without the rounding of 1 − ηλ
    with np.errstate(all="ignore"):
        stable = -eta * ub ** n * np.expm1(n * np.log1p(d / ub)) / d
        plain = (ua ** n - ub ** n) / (a - b)
        deriv = -eta * n * (1.0 - eta * (a + b) / 2) ** (n - 1)
    out = np.where(ua * ub > 0, stable, plain)
    return np.where(d == 0, deriv, out)


def _divdiff2(a, b, n, eta):
    """Second divided difference p[a, b, 0], elementwise (= φ[a, b]; φ'(a) where a == b)."""
    big = np.where(np.abs(a) >= np.abs(b), a, b)
    small = np.where(np.abs(a) >= np.abs(b), b, a)
    with np.errstate(all="ignore"):
        # p[a,b,0] = (p[a,b] − p[b,0]) / a with |a| the larger node: no cancellation beyond ~2/(nη|a|)
        far = (_divdiff1(big, small, n, eta) - _divdiff1(small, np.zeros_like(small), n, eta)) / big
    # near 0: Σ_{k≥2} C(n,k)(−η)ᵏ h_{k−2}(a, b), h_m(a, b) = Σ_i aⁱ b^{m−i}
    near = np.zeros_like(big)
    h = np.ones_like(big)
    c = n * (n - 1) / 2 * eta * eta
    bpow = np.ones_like(small)
    for k in range(2, min(n, 40) + 1):
        near += c * h
        bpow = bpow * small
        h = big * h + bpow
        c *= -eta * (n - k) / (k + 1)
    return np.where(np.abs(big) < _SERIES / (n * eta), near, far)


def phi(lam, n, eta):
    """φ(λ) = ((1 − ηλ)ⁿ − 1)/λ, φ(0) = −nη, elementwise and without cancellation."""
    lam = np.asarray(lam, dtype=np.float64)
    return _divdiff1(lam, np.zeros_like(lam), n, eta)     # φ(λ) = p[λ, 0]


@_has_twin
def psi(lam, n, eta, order):
    """Daleckii–Krein matrix of p (order 1) or φ (order 2) on the eigenvalues lam: Ψ_ij = g[λ_i, λ_j],
    g = p or φ."""
    vals = (1.0 - eta * lam) ** n if order == 1 else phi(lam, n, eta)
    a, b = lam[:, None], lam[None, :]
    with np.errstate(all="ignore"):
        out = (vals[:, None] - vals[None, :]) / (a - b)
    i, j = np.nonzero(np.abs(a - b) <= _SEP / (n * eta))   # near-equal pairs (the diagonal among them)
    out[i, j] = (_divdiff1 if order == 1 else _divdiff2)(lam[i], lam[j], n, eta)
    return out


def _eigh(S, eta):
    """Eigendecomposition of the small symmetric matrix in float64, on one BLAS thread."""
    with one_blas_thread():
        lam, V = np.linalg.eigh(S.astype(np.float64))
    if not np.all(np.isfinite(lam)):
        raise Diverged("non-finite values in the propagation")
    if eta * lam[-1] >= 2.0:
        raise Diverged(f"propagation expands: η·λ_max(C) = {eta * lam[-1]:.3g} ≥ 2")
    return lam, V


# -- the closed form (Z ≤ B: through G = s·ΘᵀΘ; Z > B: through C) and h on top ------------------------

def propagate_logits(theta, T, n, eta, scale, Wh, bh, want_grad=False):
    """The closed-form propagation and h: logits = E⁽ⁿ⁾W_h + b_h (B×K); with want_grad also
    dlogits → (dΘ, dW_h). scale is the s of C = s·ΘΘᵀ (1/B; 1/B² or Z/B by c_scale). Z ≤ B goes through
    G = s·ΘᵀΘ (Z×Z) and φ, and never forms E⁽ⁿ⁾ = ΘM: logits = Θ(M·W_h), three B×Z×Z products fewer
    per step. Z > B goes through C (B×B) and f directly. Both are exact; they differ only in which
    matrix is smaller."""
    if theta.shape[1] > theta.shape[0]:
        return _with_head(*_propagate_kernel(theta, T, n, eta, scale, want_grad), Wh, bh)
    g = _Gram(theta, T, n, eta, scale)
    MW = (g.M @ Wh).astype(theta.dtype)               # Z×K = (Z×Z)(Z×K)
    logits = theta @ MW + bh                           # B×K = (B×Z)(Z×K)
    if not want_grad:
        return logits, None

    def backward(dlogits):
        U = (theta.T @ dlogits).astype(np.float64)     # Z×K = (Z×B)(B×K)
        # dE = dlogits·W_hᵀ, so dE·Mᵀ = dlogits·(MW_h)ᵀ (B×Z), dM = ΘᵀdE = U·W_hᵀ (Z×Z, E = ΘM),
        # dW_h = Eᵀdlogits = Mᵀ·U (Z×K)
        return g.dtheta(dlogits @ MW.T, U @ Wh.T), (g.M.T @ U).astype(theta.dtype)
    return logits, backward


class _Gram:
    """The Z ≤ B closed form: E = R + sΘφ(G)ΘᵀR + T = Θ(I + s·φ(G)ΘᵀR) = ΘM, G = s·ΘᵀΘ (Z×Z).
    B×Z×Z products run in Θ's dtype; the Z×Z spectral part in float64."""

    def __init__(self, theta, T, n, eta, s):
        self.theta, self.n, self.eta, self.s = theta, n, eta, s
        self.lam, self.V = _eigh(s * (theta.T @ theta), eta)   # G, Z×Z = (Z×B)(B×Z)
        self.R = theta - T
        self.ThR = (theta.T @ self.R).astype(np.float64)       # ΘᵀR, Z×Z = (Z×B)(B×Z)
        with one_blas_thread():
            self.Phi = (self.V * phi(self.lam, n, eta)) @ self.V.T   # φ(G), Z×Z = (Z×Z)(Z×Z)
            self.M = s * (self.Phi @ self.ThR)                   # Z×Z = (Z×Z)(Z×Z)
            self.M.flat[::self.M.shape[0] + 1] += 1.0      # + I, on a strided view of the diagonal

    def dtheta(self, dE_Mt, dM):
        """dΘ (B×Z) from dE·Mᵀ (B×Z, the path E = ΘM) and dM (Z×Z, float64)."""
        s, V, dt = self.s, self.V, self.theta.dtype
        with one_blas_thread():
            dP = s * (dM @ self.ThR.T)                 # Z×Z = (Z×Z)(Z×Z)
            dThR = s * (self.Phi @ dM)                   # Z×Z = (Z×Z)(Z×Z)
            dG = V @ ((V.T @ dP @ V) * psi(self.lam, self.n, self.eta, 2)) @ V.T   # Daleckii–Krein, Z×Z
            dZZ = dThR + s * (dG + dG.T)               # through R = Θ − T and G = s·ΘᵀΘ, Z×Z
        # B×Z = (B×Z)(Z×Z) twice; the last term is the path through ΘᵀR
        return dE_Mt + self.theta @ dZZ.astype(dt) + self.R @ dThR.T.astype(dt)


def _propagate_kernel(theta, T, n, eta, s, want_grad):
    """Z > B: E⁽ⁿ⁾ = (I − ηC)ⁿR + T with p on the eigenvalues of C (B×B); backward by Daleckii–Krein."""
    dt = theta.dtype
    C = s * (theta @ theta.T)                          # B×B = (B×Z)(Z×B)
    mu, U = _eigh(C, eta)
    with one_blas_thread():
        Cn = (U * (1.0 - eta * mu) ** n) @ U.T         # (I − ηC)ⁿ, B×B = (B×B)(B×B)
    R = theta - T
    E = Cn.astype(dt) @ R + T                          # B×Z = (B×B)(B×Z)
    if not want_grad:
        return E, None

    def backward(dE):
        dCn = (dE @ R.T).astype(np.float64)            # B×B = (B×Z)(Z×B)
        with one_blas_thread():
            dC = U @ ((U.T @ dCn @ U) * psi(mu, n, eta, 1)) @ U.T   # Daleckii–Krein, B×B
        return Cn.astype(dt) @ dE + (s * (dC + dC.T)).astype(dt) @ theta   # B×Z = (B×B)(B×Z)
    return E, backward


# ====================================================================================================
# 4. The other readings. Algorithm 1's inner loop on another L_pc (DESIGN.md §3), and the authors' code
#    as described (DESIGN.md §1b): one variant, chosen once by Config.reading through _READINGS and
#    _propagation, never tested along the core path.

def _pc_grad(E, T, q, pc_loss):
    """∇_E L_pc for the explicit loop, and what its Jacobian needs (softmax rows for CE)."""
    if pc_loss == "mse":
        return E - T, None
    if pc_loss == "mae":
        return np.sign(E - T), None
    S = np.exp(E - E.max(axis=1, keepdims=True))
    S /= S.sum(axis=1, keepdims=True)
    return S - q, S


def propagate_explicit(theta, T, q, n, eta, scale, pc_loss="mse", want_grad=False):
    """Algorithm 1: n gradient steps of a per-batch map g (Z×Z, from the identity) on L_pc.

    The step on W_g is W_g ← W_g − η·s·Θᵀ∇L_pc, so E = ΘW_g moves by −η·s·ΘΘᵀ∇L_pc = −ηC∇L_pc; with
    MSE (∇ = E − T) this is Eq. 5 exactly. MAE uses sign(E − T); CE reads the rows of E as logits over Z
    against the distribution q = (unshifted centre)² (one-hot centres: the class itself). Cost O(n·B²·Z).
    """
    C = scale * (theta @ theta.T)                      # B×B = (B×Z)(Z×B)
    E = theta.copy()
    grads, softmaxes = [], []
    for _ in range(n):
        g, S = _pc_grad(E, T, q, pc_loss)
        if want_grad:
            grads.append(g)
            softmaxes.append(S)
        E = E - eta * (C @ g)                          # B×Z = (B×B)(B×Z)
        if not np.all(np.isfinite(E)):
            raise Diverged("non-finite values in the explicit propagation")
    if not want_grad:
        return E, None

    def backward(dE):
        dC = np.zeros_like(C)                          # Σ_m dE_{m+1} g_mᵀ (= −dL/dC / η), B×B
        for g, S in zip(reversed(grads), reversed(softmaxes)):
            dC += dE @ g.T                             # B×B = (B×Z)(Z×B)
            w = C @ dE                                 # Cᵀ dE_{m+1}, B×Z = (B×B)(B×Z)
            if pc_loss == "mse":
                dE = dE - eta * w
            elif pc_loss == "ce":
                dE = dE - eta * S * (w - np.sum(S * w, axis=1, keepdims=True))
        return dE - eta * scale * ((dC + dC.T) @ theta)   # B×Z = (B×B)(B×Z)
    return E, backward


def propagate_detached(theta, T, n, eta, scale, want_grad=False):
    """The authors' reading (DESIGN.md §1b): E = (I − ηC)ⁿ(Θ − T) + T with C = s·ΘΘᵀ held constant in
    the backward pass (built from a detached Θ), so dΘ = ((I − ηC)ⁿ)ᵀ dE. n is 1 there; n small steps
    cost O(n·B²·Z)."""
    C = scale * (theta @ theta.T)                      # B×B = (B×Z)(Z×B)
    R = theta - T
    for _ in range(n):
        R = R - eta * (C @ R)                          # B×Z = (B×B)(B×Z)
    if not np.all(np.isfinite(R)):
        raise Diverged("non-finite values in the propagation")
    if not want_grad:
        return R + T, None

    def backward(dE):
        for _ in range(n):
            dE = dE - eta * (C @ dE)                   # B×Z = (B×B)(B×Z); C symmetric: Cᵀ = C
        return dE
    return R + T, backward


@dataclass(frozen=True)
class _Reading:
    """What a reading fixes of the protocol, looked up once per run (Config.reading)."""
    std_floor: float | None         # standardisation: clamp each std from below (None: a constant column → 0)
    split: Callable                 # (y, rng) → (train rows, score rows): the single split of folds=1
    keep_last: bool                 # keep each epoch's last, incomplete batch
    lr_at: Callable                 # (lr, iteration t ≥ 1) → AdamW's learning rate at t
    propagate: Callable | None      # its own propagation (Θ, T, n, η, s, want_grad) → (E, backward), or None


def _unstratified_split(y, rng):
    """The authors' split: a random 4/5 trains and 1/5 scores, classes not stratified."""
    order = rng.permutation(y.size)
    m = int(round(y.size / 5))
    return order[m:], order[:m]


def _linear_decay(lr, t):
    """torch's PolynomialLR(total_iters=10,000, power 1), as the authors' code schedules AdamW."""
    return lr * (1.0 - min(t - 1, 10_000) / 10_000)


_READINGS = {
    "spec": _Reading(std_floor=None, split=lambda y, rng: stratified_split(y, rng), keep_last=False,
                     lr_at=lambda lr, t: lr, propagate=None),
    "authors": _Reading(std_floor=1e-6, split=_unstratified_split, keep_last=True, lr_at=_linear_decay,
                        propagate=propagate_detached),
}


# ====================================================================================================
# 5. The plan: every random choice of a run, drawn before training from the checked input.

# -- checked input: features, labels, dense label maps -------------------------------------------------

def check_features(F, ndim=2, what="features"):
    """F as an array: N×D (ndim 2) or N×h×w×D (ndim 4), numeric, ≥ 2 samples, finite. Every module's
    features pass here; the finiteness check reads ~1M values at a time, so a memory-mapped pool is
    never copied whole."""
    F = np.asarray(F) if not isinstance(F, np.ndarray) else F
    if F.ndim != ndim:
        want = "a 2-D array N×D (one row per sample)" if ndim == 2 else "a 4-D array N×h×w×D"
        raise ValueError(f"{what} must be {want}, got shape {F.shape}")
    if F.dtype.kind not in "fiub":
        raise ValueError(f"{what} must be numeric, got dtype {F.dtype}")
    rows = _as_rows(F)
    if rows.shape[0] < 2 or rows.shape[1] < 1:
        raise ValueError(f"{what} must have at least 2 samples and 1 dimension, got shape {F.shape}")
    for s in (_slices(*rows.shape) if F.dtype.kind == "f" else ()):   # integers are always finite
        chunk = rows[s]
        if F.dtype == np.float16:                        # exponent bits all set: Inf or NaN
            bad = (chunk.view(np.uint16) & 0x7C00) == 0x7C00
        else:
            bad = ~np.isfinite(chunk)
        if bad.any():
            first = s.start * rows.shape[1] + int(np.argmax(bad.reshape(-1)))
            where = [int(i) for i in np.unravel_index(first, F.shape)]
            raise ValueError(f"{what} contain NaN/Inf values (the first at index {where})")
    return F


def _as_rows(features):
    """Dense features N×h×w×D as (N·h·w)×D, one row per position (a view when contiguous)."""
    return features.reshape(-1, features.shape[-1]) if features.ndim == 4 else features


def _plain(value):
    """A label as Python has it (0, 'daisy'), not as NumPy prints it (np.int64(0))."""
    return value.item() if isinstance(value, np.generic) else value


def encode_labels(labels, N=None, min_count=2, min_classes=2, what="features"):
    """Map labels (ints, integral floats, bools or strings; 1-D or an N×1 column) to 0..K−1; returns
    (y, classes) with classes[y] == labels. N: the rows of `what` they label. Every module's labels pass
    here: ITM needs min_classes=2 and min_count=2 samples a class (one to train, one to score); the
    baselines take min_count=1. Both are 1 or 2: the errors name what fails at 2."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D (one label per sample), got shape {labels.shape}")
    if labels.size == 0:
        raise ValueError("labels are empty")
    if N is not None and labels.shape[0] != N:
        raise ValueError(f"N mismatch: {what} have N={N} rows but labels have {labels.shape[0]} entries")
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)):
            raise ValueError("labels contain NaN/Inf; pass integer class ids or strings")
        frac = labels != np.round(labels)
        if np.any(frac):
            raise ValueError(f"labels must be integer class ids or strings, got the non-integer float "
                             f"label {labels[frac][0].item()!r}")
        labels = labels.astype(np.int64)
    elif labels.dtype.kind not in "iubUSO":
        raise ValueError(f"labels must be integers or strings, got dtype {labels.dtype}")
    try:
        classes, y = np.unique(labels, return_inverse=True)
    except TypeError:                                    # an object array mixing e.g. str and int
        kinds = sorted({type(v).__name__ for v in labels.tolist()})
        raise ValueError(f"labels mix types ({', '.join(kinds)}); give one type: integer ids or "
                         "strings") from None
    if classes.size < min_classes:
        raise ValueError(f"labels contain a single class ({_plain(classes[0])!r}); ranking needs at least 2 "
                         "classes")
    counts = np.bincount(y)
    if counts.min() < min_count:
        lonely = [str(classes[k]) for k in np.flatnonzero(counts < min_count)[:5]]
        raise ValueError(f"class(es) {', '.join(lonely)} have a single sample; every class needs ≥ 2 "
                         "(one to train, one to score)")
    return y.astype(np.int64), classes


IGNORE = 255  # label-map value of unlabelled pixels


def downsample_labels(maps, h, w):
    """Label maps N×H×W → N×h×w: each cell takes the majority label of its labelled pixels (pixel (r, c)
    falls in cell (r·h // H, c·w // W); ties go to the smaller label); a cell without one is IGNORE."""
    maps = np.asarray(maps)
    N, H, W = maps.shape
    if maps.dtype.kind not in "iu":
        raise ValueError(f"label maps must be integers (255 = ignore), got dtype {maps.dtype}")
    labelled = maps[maps != IGNORE]
    if labelled.size and (labelled.min() < 0 or labelled.max() > IGNORE):
        raise ValueError("label maps must hold class ids 0..254 and 255 for ignored pixels")
    if (H, W) == (h, w):
        return maps.astype(np.int64)
    if H < h or W < w:
        raise ValueError(f"label maps ({H}×{W}) are smaller than the feature grid ({h}×{w})")
    cell = (np.arange(H)[:, None] * h // H) * w + np.arange(W)[None, :] * w // W   # H×W → cell id
    L = int(labelled.max()) + 1 if labelled.size else 1
    out = np.full((N, h * w), IGNORE, dtype=np.int64)
    for i in range(N):                                # per image: memory stays h·w·L
        ok = maps[i] != IGNORE
        counts = np.bincount(cell[ok] * L + maps[i][ok], minlength=h * w * L).reshape(h * w, L)
        has = counts.sum(axis=1) > 0
        out[i, has] = counts[has].argmax(axis=1)
    return out.reshape(N, h, w)


def _dense_samples(features, maps):
    """Dense input as samples: labels of every position (−1 where ignored), the classes, and the image
    of every position. Features N×h×w×D, label maps N×H×W."""
    F = check_features(features, ndim=4)
    maps = np.asarray(maps)
    if maps.ndim != 3 or maps.shape[0] != F.shape[0]:
        raise ValueError(f"dense features {F.shape} need label maps N×H×W with N={F.shape[0]}, "
                         f"got shape {maps.shape}")
    grid = downsample_labels(maps, F.shape[1], F.shape[2]).reshape(-1)
    labelled = grid != IGNORE
    if not labelled.any():
        raise ValueError("label maps have no labelled pixel")
    y = np.full(grid.size, -1, dtype=np.int64)
    y[labelled], classes = encode_labels(grid[labelled], min_count=1)
    return y, classes, np.repeat(np.arange(F.shape[0]), F.shape[1] * F.shape[2])


# -- reading the features: chunks, float16, scale-free preprocessing (DESIGN.md §0) --------------------

def _slices(N, D):
    """Consecutive slices of N rows of D values, ~1M values each, so a float64 chunk costs ~8 MB,
    whatever N and D."""
    step = max(1, (1 << 20) // max(D, 1))
    return (slice(start, start + step) for start in range(0, N, step))


def _chunks(rows, D):
    """The row indices `rows` in pieces of ~1M values (see _slices)."""
    return (rows[s] for s in _slices(rows.size, D))


def _stream(F, rows, y, dtype):
    """F in storage order, ~1M values a chunk, as (chunk in dtype, class of each of its rows): the class
    is y for the rows in `rows` and −1 (skip) for the others. Reading in order needs no gather: for
    float32 features the chunks are views, and the memory is read sequentially."""
    cls = np.full(F.shape[0], -1, dtype=np.int64)
    cls[rows] = y[rows]
    for s in _slices(*F.shape):
        yield _convert(F[s], dtype), cls[s]


_F16 = []  # float16 → float32 lookup table (65,536 entries, 256 KB), built on first use


def _convert(X, dtype):
    """X as dtype (no copy when it already is). float16 (what extract.py writes) goes through a lookup
    table: exact, and faster than astype."""
    if X.dtype == np.float16:
        if not _F16:
            _F16.append(np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
                        .astype(np.float32))
        X = np.take(_F16[0], X.view(np.uint16))
        return X if dtype == np.float32 else X.astype(dtype)
    return X.astype(dtype, copy=False)


def _gather(F, rows, dtype):
    """F[rows] as dtype."""
    return _convert(F[rows], dtype)


def _work_dtype(F):
    return np.float64 if F.dtype == np.float64 else np.float32


@dataclass(frozen=True)
class Preprocessing:
    """x ↦ (x − c)·s for every row (c: D or None; s: a scalar or D), then unit L2 norm if unit_rows."""
    c: np.ndarray | None
    s: np.ndarray | float
    unit_rows: bool = False


def fit_preprocessing(F, kind, std_floor=None, rows=None):
    """The Preprocessing that makes features F (N×D) scale-free, from two streaming passes over all N rows
    (the labels are not used): "rms" divides by the root-mean-square row norm, "center_rms" centres first,
    "standardize" gives every dimension mean 0 and std 1 (a constant dimension contributes 0; std_floor,
    if given, clamps the std from below instead, as the authors' code does), "unit_rows" scales every row
    to norm 1. rows, if given, limits the statistics to those rows (segmentation: labelled positions).
    The statistics are taken on F·2⁻ᵉ, 2ᵉ the largest |entry| rounded up to a power of two,
    so that features × 1e±200 neither overflow nor underflow and a power-of-two factor on F changes c and
    s by exactly that factor: the scores are then bit-identical."""
    N, D = (F.shape[0] if rows is None else rows.size), F.shape[1]
    pieces = (lambda: (F[s] for s in _slices(*F.shape))) if rows is None else \
        (lambda: (F[r] for r in _chunks(rows, D)))
    amax = max(float(np.max(np.abs(_convert(X, _work_dtype(F))))) for X in pieces())
    if amax == 0.0:
        raise ValueError("features are all zero")
    p = math.ldexp(1.0, -math.frexp(amax)[1])              # exact power of two: F·p has |entries| < 1
    x0 = _convert(next(pieces())[:1], np.float64)[0] * p
    s1, s2, sq = np.zeros(D), np.zeros(D), 0.0
    for X in pieces():
        X = _convert(X, np.float64) * p                       # chunk×D
        sq += float(np.einsum("nd,nd->", X, X))
        X -= x0
        s1 += X.sum(axis=0)
        s2 += np.einsum("nd,nd->d", X, X)                    # D: per-dimension Σ of squares
    mean = x0 + s1 / N
    var = np.maximum(s2 / N - (s1 / N) ** 2, 0.0)
    if not np.any(var > (1e-12 * np.max(np.abs(mean))) ** 2):
        raise ValueError("features are the same for every sample (no information to rank by)")
    if kind == "none":                                   # checked all the same: never a silent chance score
        return None
    if kind == "rms":
        return Preprocessing(None, p / math.sqrt(sq / N))
    if kind == "unit_rows":
        return Preprocessing(None, p, True)
    if kind == "center_rms":
        return Preprocessing(mean / p, p / math.sqrt(float(var.sum())))
    std = np.sqrt(var)
    if std_floor is not None:
        return Preprocessing(mean / p, 1.0 / np.maximum(std / p, std_floor))
    return Preprocessing(mean / p, np.where(std > 1e-12 * std.max(), p / np.where(std > 0, std, 1.0), 0.0))


class _Preprocessed:
    """Features as f sees them: rows of F (N×D) read through a Preprocessing, in float32 (float64 for
    float64 features, so that the affine map runs before any narrowing and × 1e200 cannot overflow)."""

    def __init__(self, F, preprocessing):
        self.F, self.preprocessing = F, preprocessing
        self.shape, self.ndim = F.shape, 2
        self.dtype = np.dtype(_work_dtype(F))
        self._c = None if preprocessing.c is None else preprocessing.c.astype(self.dtype)
        self._s = np.asarray(preprocessing.s, dtype=self.dtype)

    def __getitem__(self, rows):
        X = _convert(self.F[rows], self.dtype)                # rows×D (a view for a float32 slice)
        # in place where X is a copy: fresh rows×D temporaries per batch cost more than the arithmetic
        out = None if np.may_share_memory(X, self.F) else X
        if self._c is not None:
            X = np.subtract(X, self._c, out=out)
            out = X
        X = np.multiply(X, self._s, out=out)
        if self.preprocessing.unit_rows:                          # row norms, rows
            X /= np.maximum(np.sqrt(np.einsum("nd,nd->n", X, X, dtype=np.float64)), 1e-300)[:, None] \
                .astype(self.dtype)
        return X


# -- which rows train and which score: the split, the folds --------------------------------------------

def stratified_split(y, rng):
    """Per class: shuffle, 1/5 (at least 1) to scoring, the rest to training; both parts shuffled."""
    train, score = [], []
    for k in range(int(y.max()) + 1):
        members = rng.permutation(np.flatnonzero(y == k))
        m = min(max(int(round(members.size / 5)), 1), members.size - 1)
        score.append(members[:m])
        train.append(members[m:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(score))


def crossfit_folds(y, k, rng):
    """The fold (0..k−1) of every sample: each class's members are shuffled and dealt round-robin,
    continuing where the previous class stopped, so every class is spread over the folds in proportion
    and the fold sizes differ by at most one."""
    fold, start = np.empty(y.size, dtype=np.int64), 0
    for c in range(int(y.max()) + 1):
        members = rng.permutation(np.flatnonzero(y == c))
        fold[members] = (start + np.arange(members.size)) % k
        start += members.size
    return fold


def split_by_image(y, image, rng):
    """Segmentation: 1/5 of the images (at least one) score, the rest train; labelled positions only,
    scoring positions in image order so its batches are consecutive positions."""
    images = rng.permutation(np.unique(image[y >= 0]))
    if images.size < 2:
        raise ValueError("segmentation needs at least 2 images with labelled pixels")
    m = min(max(int(round(images.size / 5)), 1), images.size - 1)
    is_score = np.zeros(int(image.max()) + 1, dtype=bool)
    is_score[images[:m]] = True
    labelled = np.flatnonzero(y >= 0)
    return rng.permutation(labelled[~is_score[image[labelled]]]), labelled[is_score[image[labelled]]]


# -- adaptive n (Eq. 9) and the centres' shift: one pass for moments and class sums, one for distances

def _training_stats(F, rows, y, K):
    """One pass over F: for the rows `rows`, class sums (K×D) and per-dimension Σ(x − x₀), Σ(x − x₀)² (D),
    x₀ = the first of them (shifting keeps Σx² − (Σx)²/N well-conditioned)."""
    D = F.shape[1]
    sums, s1, s2 = np.zeros((K, D)), np.zeros(D), np.zeros(D)
    x0 = _gather(F, rows[:1], np.float64)[0]
    for X, cls in _stream(F, rows, y, _work_dtype(F)):
        accumulate(X, cls, sums, s1, s2, x0)
    return sums, s1, s2, x0


@_has_twin
def accumulate(X, yc, sums, s1, s2, x0):
    """Add the rows of a chunk X (rows×D) whose class yc is ≥ 0 to the class sums (K×D) and to the
    moments around x₀ (D); rows of class −1 are skipped."""
    order = np.argsort(yc, kind="stable")
    order = order[yc[order] >= 0]
    if order.size == 0:
        return
    X, yc = X[order], yc[order]                          # class-contiguous: class sums are segment sums
    heads = np.flatnonzero(np.r_[True, yc[1:] != yc[:-1]])
    sums[yc[heads]] += np.add.reduceat(X, heads, axis=0, dtype=np.float64)
    Xs = X - x0                                          # chunk×D, float64
    s1 += Xs.sum(axis=0)
    s2 += np.einsum("nd,nd->d", Xs, Xs)                  # D: per-dimension Σ of squares


def adaptive_n(F, rows, y, K, cfg, stats=None):
    """Eq. 9: n = ⌈log_{1−η0}(dis_b / dis)⌉ + n_b, dis = mean distance to the own class mean after
    per-dimension standardisation (a dimension with std 0 contributes 0); clamped to n ≥ 1."""
    sums, s1, s2, _ = stats if stats is not None else _training_stats(F, rows, y, K)
    N = rows.size
    std = np.sqrt(np.maximum(s2 / N - (s1 / N) ** 2, 0.0))
    inv_std = np.where(std > 1e-12 * (1.0 + np.abs(sums.sum(0) / N)), 1.0 / np.where(std > 0, std, 1), 0)
    means = sums / np.maximum(np.bincount(y[rows], minlength=K), 1)[:, None]
    dis = sum(distance_sum(X, cls, means, inv_std) for X, cls in _stream(F, rows, y, _work_dtype(F))) / N
    if not math.isfinite(dis):
        raise ValueError("the preprocessed features are not finite: an entry overflows float64 once centred; "
                         "divide the features by a large power of two")
    if dis <= 0:
        return max(cfg.n_b, 1), dis
    n = math.ceil(math.log(cfg.dis_b / dis) / math.log(1.0 - cfg.eta0)) + cfg.n_b
    return max(int(n), 1), dis


@_has_twin
def distance_sum(X, yc, means, inv_std):
    """Σ over rows of class ≥ 0 of ‖(x − μ_y) / σ‖ — the standardisation's mean cancels in the
    difference."""
    keep = yc >= 0
    Xd = (X[keep] - means[yc[keep]]) * inv_std           # rows×D
    return float(np.sqrt(np.einsum("nd,nd->n", Xd, Xd)).sum())


def _moments_from_stats(s1, s2, x0, N):
    """Scalar mean and std of all N×D entries from _training_stats' shifted per-dimension sums."""
    count = N * x0.size
    mu = (s1.sum() + N * x0.sum()) / count
    c = x0 - mu                                         # Σ(x − μ)² = s2 + 2c·s1 + N·c², per dimension
    return mu, math.sqrt(max(float(np.sum(s2 + 2 * c * s1 + N * c * c)) / count, 0.0))


def feature_moments(F, rows, normalize_rows):
    """Scalar mean and std of all entries of F[rows] as f sees them (rows L2-normalised if asked)."""
    def pieces():
        for r in _chunks(rows, F.shape[1]):
            X = _gather(F, r, np.float64)
            if normalize_rows:
                X /= np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
            yield X
    count = rows.size * F.shape[1]
    mu = sum(X.sum() for X in pieces()) / count
    return mu, math.sqrt(sum(np.sum((X - mu) ** 2) for X in pieces()) / count)


# -- centres, initial weights, batches -----------------------------------------------------------------

def make_centres(K, Z, kind, rng):
    """K unit-norm, mutually orthogonal pseudo-cluster centres in R^Z (appendix A.8), K×Z."""
    if kind == "onehot":
        return np.eye(K, Z)
    if kind == "random":       # Gaussian directions, orthonormalised
        q, _ = np.linalg.qr(rng.standard_normal((Z, K)))
        return q.T
    if kind == "pca":          # principal axes of a random point cloud
        X = rng.standard_normal((4 * Z, Z)) * np.linspace(2.0, 1.0, Z)
        X -= X.mean(axis=0)
        _, vecs = np.linalg.eigh(X.T @ X)              # Z×Z = (Z×4Z)(4Z×Z)
        return vecs[:, ::-1][:, :K].T
    # "laplacian": smoothest non-trivial eigenvectors of the graph Laplacian of random points (Z nodes)
    P = rng.standard_normal((Z, 3))
    W = np.exp(-np.sum((P[:, None] - P[None]) ** 2, axis=-1))
    L = np.diag(W.sum(axis=1)) - W
    _, vecs = np.linalg.eigh(L)
    return vecs[:, 1:K + 1].T if Z > K else vecs[:, :K].T


def init_params(D, Z, K, rng, dtype):
    """torch.nn.Linear's initialisation: weight and bias ~ U(−1/√fan_in, 1/√fan_in)."""
    bz, bh = 1.0 / math.sqrt(D), 1.0 / math.sqrt(Z)
    return [rng.uniform(-bz, bz, (D, Z)).astype(dtype), rng.uniform(-bz, bz, Z).astype(dtype),
            rng.uniform(-bh, bh, (Z, K)).astype(dtype), rng.uniform(-bh, bh, K).astype(dtype)]


def make_batches(n_train, B, iterations, rng, keep_last=False):
    """Per epoch a fresh permutation cut into batches of B, the last incomplete one dropped (one batch
    of everything when the training part is smaller than B). Positions into the training part.
    keep_last keeps it (the authors' reading): then a list of arrays, the last of each epoch shorter."""
    if keep_last:
        cuts = []
        while len(cuts) < iterations:
            order = rng.permutation(n_train)
            cuts += [order[i:i + B] for i in range(0, n_train, B)]
        return cuts[:iterations]
    if n_train < B:
        return np.stack([rng.permutation(n_train) for _ in range(iterations)])
    per_epoch = n_train // B
    epochs = -(-iterations // per_epoch)
    cuts = [rng.permutation(n_train)[:per_epoch * B].reshape(per_epoch, B) for _ in range(epochs)]
    return np.concatenate(cuts)[:iterations]


# -- the plan of one run -------------------------------------------------------------------------------

@dataclass
class Plan:
    """One run: its input and everything its seed decides, fixed before training (tests replay it in
    torch). train(plan) runs it."""
    train_idx: np.ndarray           # rows of F that train ITM
    score_idx: np.ndarray           # rows of F that score it
    y: np.ndarray                   # labels mapped to 0..K−1 (all N rows; −1 = unlabelled position)
    classes: np.ndarray             # original label of each class index
    n: int                          # deparametric steps
    centres: np.ndarray             # Ê, K×Z (shifted when Config.shift)
    q: np.ndarray                   # unshifted centres squared (CE targets of the explicit loop), K×Z
    params: list                    # initial [W_z (D×Z), b_z (Z), W_h (Z×K), b_h (K)]
    batches: object                 # iterations×B row indices into F (a list when batch sizes vary)
    dis: float                      # adaptive-n distance (NaN when n was given)
    preprocessing: Preprocessing | None = None        # how f reads the features (None: raw)
    fold: int = 0                   # which of Config.folds this run scores
    features: object = field(default=None, repr=False)  # the rows f reads (N×D, through preprocessing)
    config: Config | None = None    # the resolved Config of the run


def _is_dense(features, cfg):
    ndim = np.ndim(features)
    if cfg.task == "segmentation" and ndim != 4:
        raise ValueError(f"task='segmentation' needs features N×h×w×D, got {ndim}-D")
    return cfg.task == "segmentation" or (cfg.task == "auto" and ndim == 4)


@dataclass
class _Input:
    """A model's checked input, shared by the runs of all its folds."""
    F: object                       # the features as f reads them (rows, through preprocessing), N×D
    y: np.ndarray                   # class index of every row, −1 = unlabelled position
    classes: np.ndarray
    image: np.ndarray | None        # segmentation: the image of every row
    preprocessing: Preprocessing | None
    fold_of: np.ndarray | None      # cross-fitting: the fold of every row (of every image when dense)


def _model_input(features, labels, cfg):
    """Check one model's input, encode its labels, fix its preprocessing and its folds."""
    if _is_dense(features, cfg):
        y, classes, image = _dense_samples(features, labels)
        F, N = _as_rows(np.asarray(features)), int(np.sum(y >= 0))
    else:
        F = check_features(features)
        y, classes = encode_labels(labels, F.shape[0])
        image, N = None, F.shape[0]
    if N < cfg.batch_size:
        raise ValueError(f"N={N} samples is smaller than batch_size={cfg.batch_size}; "
                         "pass a smaller batch_size")
    if cfg.latent_dim is not None and cfg.latent_dim < classes.size:
        raise ValueError(f"latent_dim={cfg.latent_dim} is smaller than the number of classes K={classes.size}")
    units = N if image is None else np.unique(image[y >= 0]).size   # what the folds divide
    if image is not None and units < 2:
        raise ValueError("segmentation needs at least 2 images with labelled pixels")
    preprocessing = fit_preprocessing(F, cfg.preprocess, _READINGS[cfg.reading].std_floor,
                                      None if image is None else np.flatnonzero(y >= 0))
    fold_of = None
    if cfg.folds > 1:
        rng = np.random.default_rng(cfg.seed)
        if units < cfg.folds:
            raise ValueError(f"folds={cfg.folds} needs at least {cfg.folds} "
                             f"{'images' if image is not None else 'samples'}, got {units}")
        fold_of = (rng.permutation(int(image.max()) + 1) % cfg.folds if image is not None
                   else crossfit_folds(y, cfg.folds, rng))
    return _Input(F=F if preprocessing is None else _Preprocessed(F, preprocessing), y=y, classes=classes,
                  image=image, preprocessing=preprocessing, fold_of=fold_of)


def _split(data, cfg, fold):
    """(train rows, score rows, rng for the run's other choices) of fold `fold`."""
    if cfg.folds == 1:                                   # the paper's split: one rng for the whole plan
        rng = np.random.default_rng(cfg.seed)
        if data.image is not None:
            return (*split_by_image(data.y, data.image, rng), rng)
        return (*_READINGS[cfg.reading].split(data.y, rng), rng)
    rng = np.random.default_rng([cfg.seed, fold])
    labelled = data.y >= 0
    member = data.fold_of[data.image] if data.image is not None else data.fold_of
    train = rng.permutation(np.flatnonzero(labelled & (member != fold)))
    score = np.flatnonzero(labelled & (member == fold))  # image order: consecutive positions (dense)
    return train, (score if data.image is not None else rng.permutation(score)), rng


def _plan(data, cfg, fold):
    """The Plan of fold `fold`, its random choices drawn in DESIGN.md §1's order: split, centres, initial
    weights, batch order."""
    train_idx, score_idx, rng = _split(data, cfg, fold)
    F, y, K = data.F, data.y, data.classes.size
    Z = cfg.latent_dim or K
    stats = _training_stats(F, train_idx, y, K) if cfg.n is None or cfg.shift else None
    if cfg.n is not None:
        n, dis = int(cfg.n), float("nan")
    else:
        n, dis = adaptive_n(F, train_idx, y, K, cfg, stats)
    unit = make_centres(K, Z, cfg.centres, rng)
    centres = unit
    if cfg.shift:
        if cfg.normalize == "features":
            mu, sigma = feature_moments(F, train_idx, True)
        else:
            mu, sigma = _moments_from_stats(*stats[1:], train_idx.size)
        centres = mu + sigma * unit
    params = init_params(F.shape[1], Z, K, rng, np.dtype(cfg.dtype))
    batches = make_batches(train_idx.size, cfg.batch_size, cfg.iterations, rng,
                           keep_last=_READINGS[cfg.reading].keep_last)
    batches = [train_idx[b] for b in batches] if isinstance(batches, list) else train_idx[batches]
    return Plan(train_idx=train_idx, score_idx=score_idx, y=y, classes=data.classes, n=n, centres=centres,
                q=unit ** 2, params=params, batches=batches, dis=dis, preprocessing=data.preprocessing,
                fold=fold, features=data.F, config=cfg)


def make_plan(features, labels, config=None, fold=0, **overrides):
    """Validate the input and draw every random choice of the run that scores fold `fold` of
    Config.folds: the split, the centres, the initial weights, the batch order."""
    cfg = _config(config, overrides)
    if not 0 <= fold < cfg.folds:
        raise ValueError(f"fold must be in 0..{cfg.folds - 1}, got {fold}")
    return _plan(_model_input(features, labels, cfg), cfg, fold)


# ====================================================================================================
# 6. A model's score: every fold trained on the others and scored, then aggregated.

def _score(features, labels, cfg, threads=1):
    """Every fold of one model: train on the other folds, score this one; aggregate. threads > 1 runs
    that many folds at once, each on one BLAS thread (the folds are independent: the same scores)."""
    start = time.perf_counter()
    data = _model_input(np.asarray(features), labels, cfg)
    outs = _map_folds(functools.partial(_fold_run, data, cfg), cfg.folds, threads, _fold_work(data, cfg))
    n = [out.n for out in outs]
    chance = _chance(data.y, [out.uninformed for out in outs])
    for fold, out in enumerate(outs):
        if isinstance(out.run, Diverged):
            note = f"fold {fold + 1} of {cfg.folds}: {out.run}" if cfg.folds > 1 else str(out.run)
            return Result(score=float("nan"), trajectory=[], n=int(np.median(n)),
                          seconds=time.perf_counter() - start, diverged=True, note=note, fold_n=n, chance=chance)
    runs = [out.run for out in outs]
    best = [max(acc for _, acc in trajectory) for trajectory, _ in runs]
    trajectory = [(t, float(np.mean([traj[i][1] for traj, _ in runs]))) for i, (t, _) in enumerate(runs[0][0])]
    return Result(score=float(np.mean(best)), trajectory=trajectory, n=int(np.median(n)),
                  seconds=time.perf_counter() - start, losses=runs[0][1], fold_scores=best,
                  sd=float(np.std(best, ddof=1)) if len(best) > 1 else float("nan"), chance=chance,
                  fold_n=n, n_scored=sum(out.scored for out in outs))


@dataclass
class _Fold:
    """What one fold's run gives back to _score (from a forked process too, so nothing large)."""
    n: int                          # its adaptive n
    scored: int                     # samples in its scoring part
    run: object                     # train's (trajectory, losses), or the Diverged it raised
    uninformed: float               # _Model.uninformed's rate (score_by="centres"), else NaN


def _fold_run(data, cfg, fold):
    """One fold from start to end: its plan, its training run, and what features without class
    information score through the same scoring step. The plan is made here, not in _score, so that
    folds run at once also build their plans at once."""
    plan = None
    try:
        plan = _plan(data, cfg, fold)
        run = train(plan)
        rate = (_Model(plan).uninformed(np.random.default_rng([cfg.seed, fold, 1]))
                if cfg.score_by == "centres" else float("nan"))
    except Diverged as err:          # in the plan, training, scoring, or the chance rate's scoring step
        run, rate = err, float("nan")
    return _Fold(n=0 if plan is None else plan.n, scored=0 if plan is None else plan.score_idx.size, run=run,
                 uninformed=rate)


def _chance(y, rates):
    """Percent: what a model without class information scores. The most frequent class's rate (over
    labelled rows); with score_by="centres" at least the mean over the folds of the rate the scoring step
    reaches from random Θ (_Model.uninformed, seeded by the run's seed and the fold): the propagation pulls
    each scoring batch towards its own labels' centres, so such a model scores above the majority rate
    (DESIGN.md §1d)."""
    counts = np.bincount(y[y >= 0])
    majority = 100.0 * counts.max() / counts.sum()
    return majority if np.isnan(rates).any() else max(majority, float(np.mean(rates)))


def _map_folds(run, folds, threads, work):
    """[run(fold) for fold in range(folds)] on `threads` cores. Large runs (`work`, training rows × D, from
    _FORK_WORK) go to forked processes on one BLAS thread each (itm_parallel, where it is present), since
    threads of one interpreter hold each other up in the many small steps of an iteration: `threads` at a
    time, or all at once when there is one fold more than cores (3 folds on 2 cores then take about 3/2
    of one fold instead of 2; more processes than that cost more in switching than they gain,
    bench/bench_itm.py --cost). Otherwise `threads` folds at a time on threads with one BLAS thread each,
    and a fold left over once the others are done alone with every core. Each fold computes the same in
    every arrangement: the same scores."""
    threads = min(int(threads), folds)
    if threads <= 1:
        return [run(fold) for fold in range(folds)]
    if work >= _FORK_WORK:
        forked = _forked(run, folds, folds if folds <= threads + 1 else threads)
        if forked is not None:
            return forked
    import concurrent.futures as cf
    full = folds - folds % threads
    with one_blas_thread(), cf.ThreadPoolExecutor(threads) as pool:
        out = list(pool.map(run, range(full)))
    return out + [run(fold) for fold in range(full, folds)]


_FORK_WORK = 1 << 24   # training rows × D from which folds run in forked processes, not threads


def _fold_work(data, cfg):
    """About the training rows × D of one fold: the labelled rows not in it (4/5 with one split)."""
    share = (cfg.folds - 1) / cfg.folds if cfg.folds > 1 else 0.8
    return int(np.sum(data.y >= 0) * share) * data.F.shape[1]


def _forked(run, folds, workers):
    """The folds' results from `workers` forked processes, or None where they are not to be used: no
    itm_parallel beside itm.py, a process that may not fork (a daemonic pool worker) or a platform
    without fork."""
    import multiprocessing as mp
    if mp.current_process().daemon:
        return None
    try:
        return sibling("itm_parallel", "forked folds").fold_runs(run, folds, workers)
    except ValueError:
        return None


# ====================================================================================================
# 7. The API: one model, a pool of models.

def _config(config, overrides):
    cfg = config if config is not None else Config()
    if not isinstance(cfg, Config):
        raise TypeError(f"config must be an itm.Config, got {type(cfg).__name__}")
    if "centers" in overrides:                       # the spelling of releases before 0.2
        warnings.warn("the ITM option 'centers' is now spelt 'centres'", DeprecationWarning, stacklevel=3)
        overrides = {("centres" if k == "centers" else k): v for k, v in overrides.items()}
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise TypeError(f"unknown ITM option(s): {', '.join(sorted(unknown))}")
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def itm_score(features, labels, config=None, **overrides) -> Result:
    """ITM transferability score of one model: features N×D, labels N (higher score = better model).

    Raises ValueError on bad input. A run whose propagation diverges returns score NaN with
    Result.diverged set, and warns — it is never reported as a chance-level score. The folds run
    concurrently on the machine's cores (the same scores as one after the other).
    """
    cfg = _config(config, overrides)
    result = _score(features, labels, cfg, cores())
    if result.diverged:
        warnings.warn(f"ITM diverged ({result.note}); score is NaN", RuntimeWarning, stacklevel=2)
    return result


def rank(feature_sets: Mapping[str, np.ndarray], labels, config=None, progress=None, jobs=1,
         executor=None, errors="raise", **overrides):
    """Score every model of {name: features N×D} on the same labels; [(name, Result)], best first.

    Diverged models (score NaN) come last, each with a warning naming it; ties keep the input order.
    progress(i, total, name, result) is called as each model finishes. jobs > 1 scores models in that
    many processes, the BLAS threads divided among them; executor (any concurrent.futures.Executor, e.g.
    make_executor("local:2")) runs them there instead. Every score is the same as with jobs=1: each run
    depends only on its seed. errors="raise" stops at a model with bad input (ValueError naming it);
    errors="report" gives it Result.error and score NaN, ranked last, and scores the others.
    """
    cfg = _config(config, overrides)
    results = score_grid(feature_sets, labels, [cfg], progress, jobs, executor, errors)[0]
    for name, result in results.items():
        if result.diverged:
            warnings.warn(f"ITM diverged on model {name!r} ({result.note}); score is NaN",
                          RuntimeWarning, stacklevel=2)
    return sorted(results.items(), key=lambda nr: (math.isnan(nr[1].score), -np.nan_to_num(nr[1].score)))


def score_grid(feature_sets, labels, configs, progress=None, jobs=1, executor=None, errors="raise"):
    """Every model under every Config (seeds, readings, ...): [{name: Result} in input order, one dict
    per config]. A model's features travel to an executor once, whatever the number of configs
    (Executor.share, where the executor has it: make_executor's sends each model's features once)."""
    if len(feature_sets) == 0:
        raise ValueError("no models to rank")
    if errors not in ("raise", "report"):
        raise ValueError(f"errors must be 'raise' or 'report', got {errors!r}")
    configs = [_config(c, {}) for c in configs]
    tasks = [(name, i) for name in feature_sets for i in range(len(configs))]
    done = {}
    for (name, i), outcome in _run_tasks(feature_sets, labels, configs, tasks, jobs, executor):
        if isinstance(outcome, BaseException):
            if errors == "raise":
                raise outcome
            reason = one_line(outcome) if isinstance(outcome, ValueError) else \
                f"model {name!r}: {type(outcome).__name__}: {one_line(outcome)}"
            outcome = Result(score=float("nan"), trajectory=[], n=0, seconds=0.0, error=reason)
        done[name, i] = outcome
        if progress is not None:
            progress(len(done), len(tasks), name, outcome)
    return [{name: done[name, i] for name in feature_sets} for i in range(len(configs))]


def cores():
    """The cores the folds of one model run on (the tests pin it)."""
    return os.cpu_count() or 1


def score_model(name, feats, labels, cfg, threads=1):
    """A model's Result, or the exception its run raised — returned, not raised, so an executor neither
    logs nor retries a failure that would only repeat, and one model's failure stays that model's (a
    ValueError of its input says which model)."""
    try:
        return _score(feats, labels, cfg, threads)
    except ValueError as err:
        return ValueError(f"model {name!r}: {err}")
    except Exception as err:  # noqa: BLE001 — one model's failure is that model's, here as on a worker
        return err


def _run_tasks(feature_sets, labels, configs, tasks, jobs, executor):
    """Yield ((name, config index), Result or the exception it raised) as tasks finish."""
    if executor is None and min(int(jobs), len(tasks)) <= 1:
        for name, i in tasks:
            yield (name, i), score_model(name, feature_sets[name], labels, configs[i], cores())
        return
    import concurrent.futures as cf
    with contextlib.ExitStack() as stack:
        if executor is None:
            parallel = sibling("itm_parallel", "jobs > 1 without an executor")
            executor = stack.enter_context(parallel.process_pool(feature_sets, labels, min(int(jobs), len(tasks))))
            futures = {executor.submit(parallel.pool_score, name, configs[i]): (name, i) for name, i in tasks}
        else:
            share = getattr(executor, "share", lambda x: x)
            shared = {name: share(feature_sets[name]) for name in feature_sets}
            labels_ = share(labels)
            futures = {executor.submit(score_model, name, shared[name], labels_, configs[i]): (name, i)
                       for name, i in tasks}
        for future in cf.as_completed(futures):
            try:
                yield futures[future], future.result()
            except Exception as err:                     # noqa: BLE001 — the task's failure, reported
                yield futures[future], err


def make_executor(scheduler):
    """A Dask executor for rank()/score_grid() (itm_parallel.make_executor: "local:N" or a scheduler
    address), as a context manager."""
    return sibling("itm_parallel", "--scheduler and make_executor").make_executor(scheduler)


def sibling(module, needs):
    """A module of this project beside itm.py (or in its package): itm.py copied alone does without
    them, and `needs` says what then fails."""
    import importlib
    try:
        return importlib.import_module(f"{__package__}.{module}" if __package__ else module)
    except ImportError:
        raise ValueError(f"{needs}: needs {module}.py beside itm.py") from None


# ====================================================================================================
# 8. Speed: what the method's steps run on, without changing what they compute. The BLAS limiter; then
# numba twins of the NumPy references above, only where they measure faster. Each loop computes what its
# reference does (to rounding); _has_twin calls it in the reference's place at call time (USE_NUMBA), and
# _TWINS below is the one place that chooses them. Every twin here is faster at the default shapes
# (bench/bench_itm.py times runs with and without); a twin of φ alone (a Z-vector) was not, and went.
# softmax_ce's pays for the small K of most targets; near K = 100 NumPy's vectorised exp overtakes it.

_BLAS = {"controllers": {}, "limiters": {}, "depth": 0, "lock": threading.Lock()}


@contextlib.contextmanager
def one_blas_thread(active=True):
    """BLAS and LAPACK on one thread inside (all modules of the project share this limiter): small calls
    (a Z×Z eigh, the B×Z×Z products, the baselines' LAPACK) are many times slower with several OpenBLAS
    threads on a busy machine, and large products get their cores from threads of their own instead.
    Process-wide, so nested and concurrent uses (folds or methods on threads) share it: the first to
    enter sets it, the last to leave restores the thread counts. SciPy ships its own OpenBLAS: once it
    is loaded, a second controller limits that one too. active=False: no limit."""
    if ThreadpoolController is None or not active:
        yield
        return
    with _BLAS["lock"]:
        key = "scipy.linalg" in sys.modules
        if key not in _BLAS["limiters"]:
            if key not in _BLAS["controllers"]:           # made on first use: it scans the libraries
                _BLAS["controllers"][key] = ThreadpoolController()
            _BLAS["limiters"][key] = _BLAS["controllers"][key].limit(limits=1, user_api="blas")
        _BLAS["depth"] += 1
    try:
        yield
    finally:
        with _BLAS["lock"]:
            _BLAS["depth"] -= 1
            if _BLAS["depth"] == 0:
                for limiter in reversed(list(_BLAS["limiters"].values())):
                    limiter.restore_original_limits()
                _BLAS["limiters"].clear()


def _small_products(B, D, Z):
    # below ~16M multiply-adds even the two large products gain nothing from more threads, and lose
    # much when the cores are shared (waking and syncing threads costs more than the work); the B×Z×Z
    # products always run on one thread, for the same reason.
    return B * D * Z < 1 << 24


def njit(fn, **options):
    """fn compiled by numba with the project's options (cached beside the file), or None without numba.
    error_model="numpy": division by zero gives inf/nan as in NumPy instead of raising, so the loops need
    no zero test and vectorise."""
    return numba.njit(cache=True, nogil=True, error_model="numpy", **options)(fn) if HAVE_NUMBA else None


def _divdiff1_scalar(a, b, n, eta):
    # _divdiff1 on one pair: the same formulas, the same thresholds
    ua, ub = 1.0 - eta * a, 1.0 - eta * b
    d = eta * (b - a)
    if d == 0.0:
        return -eta * n * (1.0 - eta * (a + b) / 2) ** (n - 1)
    if ua * ub > 0:
        return -eta * ub ** n * math.expm1(n * math.log1p(d / ub)) / d
    return (ua ** n - ub ** n) / (a - b)


def _divdiff2_scalar(a, b, n, eta):
    if abs(a) < abs(b):
        a, b = b, a
    if abs(a) >= _SERIES / (n * eta):
        return (_divdiff1_scalar(a, b, n, eta) - _divdiff1_scalar(b, 0.0, n, eta)) / a
    total, h, bpow, c = 0.0, 1.0, 1.0, n * (n - 1) / 2 * eta * eta
    for k in range(2, min(n, 40) + 1):
        total += c * h
        bpow *= b
        h = a * h + bpow
        c *= -eta * (n - k) / (k + 1)
    return total


def _psi_loop(lam, n, eta, order):
    # psi in one pass over the lower triangle (Ψ is symmetric), no m×m temporaries
    m = lam.shape[0]
    vals, out = np.empty(m), np.empty((m, m))
    for i in range(m):
        vals[i] = (1.0 - eta * lam[i]) ** n if order == 1 else _divdiff1_scalar(lam[i], 0.0, n, eta)
    sep = _SEP / (n * eta)
    for i in range(m):
        for j in range(i + 1):
            a, b = lam[i], lam[j]
            if abs(a - b) > sep:
                v = (vals[i] - vals[j]) / (a - b)
            elif order == 1:
                v = _divdiff1_scalar(a, b, n, eta)
            else:
                v = _divdiff2_scalar(a, b, n, eta)
            out[i, j] = v
            out[j, i] = v
    return out


if HAVE_NUMBA:
    _divdiff1_scalar = njit(_divdiff1_scalar)
    _divdiff2_scalar = njit(_divdiff2_scalar)


def _softmax_ce_loop(logits, y):
    B, K = logits.shape
    grad = np.empty_like(logits)
    total = 0.0
    for i in range(B):
        m = logits[i, 0]
        for k in range(1, K):
            m = max(m, logits[i, k])
        s = 0.0
        for k in range(K):
            grad[i, k] = math.exp(logits[i, k] - m)
            s += grad[i, k]
        total += math.log(s) - (logits[i, y[i]] - m)
        for k in range(K):
            grad[i, k] = grad[i, k] / s / B
        grad[i, y[i]] -= 1.0 / B
    return total / B, grad


def _adamw_loop(p, g, m, v, decay, c1, b1, c2, b2, step_size, bc2, eps, lerp_low):
    pf, gf, mf, vf = p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1)
    if lerp_low:                                    # branch outside the loops so both vectorise
        for i in range(pf.shape[0]):
            mf[i] += c1 * (gf[i] - mf[i])
    else:
        for i in range(pf.shape[0]):
            mf[i] = gf[i] - (gf[i] - mf[i]) * b1
    for i in range(pf.shape[0]):
        vf[i] = vf[i] * b2 + c2 * gf[i] * gf[i]
        pf[i] = pf[i] * decay - step_size * mf[i] / (math.sqrt(vf[i]) / bc2 + eps)


def _theta_loop(A, centres, y, normalize):
    B, Z = A.shape
    theta, T, norms = np.empty((B, Z), A.dtype), np.empty((B, Z), A.dtype), np.ones(B)
    for i in range(B):
        if normalize:
            s = 0.0
            for z in range(Z):
                s += float(A[i, z]) * float(A[i, z])
            norms[i] = max(math.sqrt(s), 1e-12)
        for z in range(Z):
            theta[i, z] = A[i, z] / norms[i]
            T[i, z] = centres[y[i], z]
    return theta, T, norms


def _accumulate_loop(X, yc, sums, s1, s2, x0):
    for i in range(X.shape[0]):
        k = yc[i]
        if k < 0:
            continue
        for d in range(X.shape[1]):
            x = float(X[i, d])
            sums[k, d] += x
            s1[d] += x - x0[d]
            s2[d] += (x - x0[d]) * (x - x0[d])


def _distance_sum_loop(X, yc, means, inv_std):
    total = 0.0
    for i in range(X.shape[0]):
        k = yc[i]
        if k < 0:
            continue
        s = 0.0
        for d in range(X.shape[1]):
            x = (float(X[i, d]) - means[k, d]) * inv_std[d]
            s += x * x
        total += math.sqrt(s)
    return total


_TWINS.update({
    "psi": njit(_psi_loop),
    "softmax_ce": njit(_softmax_ce_loop),
    "_adamw_update": njit(_adamw_loop),
    "theta_and_targets": njit(_theta_loop),
    "accumulate": njit(_accumulate_loop),
    # reassoc lets the sum over d vectorise; it changes only the order of the additions
    "distance_sum": njit(_distance_sum_loop, fastmath={"reassoc"}),
} if HAVE_NUMBA else {})


# ====================================================================================================
# 9. Files: the bundled example, the input layouts, atomic writes (ground-truth files: kendall.load_truth).

_EXAMPLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples")


def synthetic_zoo(seed=0, N=1200, K=12, D=96):
    """A deterministic synthetic zoo: 5 'models' whose features separate the classes increasingly well.
    Returns (features by name, labels, truth) where truth is the separation itself (for τ_w)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(K), N // K)
    centres = rng.standard_normal((K, D))
    feats, truth = {}, {}
    for i, sep in enumerate((0.05, 0.1, 0.2, 0.35, 0.6)):
        noise = rng.standard_normal((y.size, D))
        feats[f"synthetic_{i}"] = (sep * centres[y] + noise).astype(np.float32)
        truth[f"synthetic_{i}"] = sep
    return feats, y, truth


def _bundled_example():
    """(features by model, labels, fine-tuned accuracy by model, description): 8 real models on
    Flowers-17 from examples/, or — where this file was copied without examples/ — the synthetic zoo."""
    path = os.path.join(_EXAMPLE_DIR, "flowers17_8models.npz")
    if os.path.exists(path):
        feature_sets, labels = load_features(path)
        with open(os.path.join(_EXAMPLE_DIR, "flowers17_8models_truth.json")) as fh:
            truth = json.load(fh)                        # {model: fine-tuned accuracy}
        return feature_sets, labels, truth, ("bundled example: 8 real pre-trained models on Flowers-17 "
                                             "(examples/), scored against their real fine-tuning accuracy")
    feature_sets, labels, truth = synthetic_zoo()
    return feature_sets, labels, truth, ("bundled example: SYNTHETIC zoo (examples/ not found; 5 models, "
                                         "class separation increasing with the index)")


def load_features(path, labels_path=None, models=None):
    """Read ({model: features}, labels) from one of three layouts:

    * an .npz with one array per model (and a 'labels' array, used when labels_path is None);
    * a single .npy: one model, named by the file's stem (labels_path required);
    * a folder of <model>.npy files plus labels.npy (or labels_path), memory-mapped, for pools too large
      to hold in memory at once.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        feature_sets, labels = _load_folder(path, labels_path)
    elif path.endswith(".npy"):
        if labels_path is None:
            raise ValueError(f"{path} is a single model's features; pass its labels (--labels y.npy)")
        feature_sets, labels = {os.path.basename(path)[:-4]: _load_npy(path, mmap=True)}, None
    else:
        feature_sets, labels = _load_npz(path)
    if not feature_sets:
        raise ValueError(f"{path} holds no model arrays")
    if models:
        missing = sorted(set(models) - set(feature_sets))
        if missing:
            raise ValueError(f"model(s) not in {path}: {', '.join(missing)}")
        feature_sets = {m: feature_sets[m] for m in models}
    if labels_path is not None:
        labels = _load_npy(labels_path, what="labels")
    elif labels is None:
        raise ValueError(f"{path} has no 'labels' array; pass --labels y.npy")
    return feature_sets, labels


def _load_npy(path, mmap=False, what="features"):
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"{what} file not found: {path}") from None
    except ValueError:   # numpy's "pickled data" message for anything that is not a .npy file
        raise ValueError(f"cannot read {what} file {path}: not a .npy array") from None
    except (OSError, EOFError) as err:
        raise ValueError(f"cannot read {what} file {path}: {one_line(err)}") from None


def _load_folder(path, labels_path):
    names = sorted(f[:-4] for f in os.listdir(path) if f.endswith(".npy") and f != "labels.npy")
    feature_sets = {name: _load_npy(os.path.join(path, name + ".npy"), mmap=True) for name in names}
    labels_file = os.path.join(path, "labels.npy")
    labels = _load_npy(labels_file, what="labels") if labels_path is None and os.path.exists(labels_file) \
        else None
    return feature_sets, labels


def _load_npz(path):
    """Every array of an .npz, read now: a corrupt member fails here, naming the file and the member."""
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"features file not found: {path}") from None
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"cannot read features file {path}: {one_line(err)}") from None
    except ValueError:   # numpy's "pickled data" message for anything that is neither .npy nor .npz
        raise ValueError(f"cannot read features file {path}: not an .npz archive") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: expected an .npz with one array per model (or a .npy with --labels)")
    arrays = {}
    with archive:
        for key in archive.files:
            try:
                arrays[key] = archive[key]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
                raise ValueError(f"cannot read array {key!r} of {path}: {one_line(err)}") from None
    labels = arrays.pop("labels", None)
    return arrays, labels


def dataset_name(path):
    """The name a features path gives its dataset in score files: the file's or folder's stem."""
    base = os.path.basename(os.path.normpath(os.fspath(path)))
    return base[:-4] if base.endswith((".npz", ".npy")) else base


def _check_output(path, what="output path"):
    """Refuse an output that cannot be written: a folder, or a file in a folder that does not exist."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"cannot write {what} {path}: {folder} is not an existing folder")


def write_atomic(path, write, binary=False):
    """write(file) into a temporary file beside `path`, fsync, rename: readers see the old file or the new
    one, and nothing is left behind on error."""
    path = os.fspath(path)
    _check_output(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"newline": ""})) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def one_line(err):
    """An exception as one line: its message with whitespace collapsed."""
    return " ".join(str(err).split()) or type(err).__name__


# ====================================================================================================
# 10. The command line. The four tools share one convention: a usage or input error is one line
# `PROG: error: ...` on stderr and exit status 1; --help exits 0; results go to stdout, progress and notes
# to stderr.

def prog_name(script, command):
    """What a CLI calls itself in its messages: the installed command's name when run as that command
    (itm-baselines), else the script's file name (baselines.py)."""
    return command if os.path.basename(sys.argv[0] or "") == command else script


class CLIParser(argparse.ArgumentParser):
    """argparse with the project's one-line usage errors and exit status 1."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(1)


def run_cli(prog, body, argv=None):
    """Run body(argv) → exit status, turning input errors into one line and exit 1; a closed stdout
    (`| head`) ends quietly."""
    try:
        return int(body(argv) or 0)
    except SystemExit as exc:                       # --help, or CLIParser.error (already printed)
        return int(exc.code or 0)
    except BrokenPipeError:
        with contextlib.suppress(OSError):           # stdout's reader left: don't print to it again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, TypeError, OSError, KeyError, Diverged) as err:   # Diverged: never a traceback
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 1


def _parser():
    p = CLIParser(prog="itm", description="Rank pre-trained models by ITM transferability score "
                  "(higher = predicted to fine-tune better). Without --features: the bundled example.",
                  epilog="Every choice the paper leaves open, and the measurements behind the defaults: "
                  "DESIGN.md in the project repository.")
    p.add_argument("--features", help="an .npz with one N×D array per model (and 'labels'), a single "
                   "model's .npy (with --labels), or a folder of <model>.npy files and labels.npy")
    p.add_argument("--labels", help=".npy of N labels (ints or strings)")
    p.add_argument("--models", help="comma-separated subset of the models")
    p.add_argument("--truth", help="JSON {model: fine-tuned accuracy}, or a ground-truth file "
                   "{target: {model: accuracy}}: adds the fine-tuned column and weighted Kendall τ_w")
    p.add_argument("--target", help="which table of a multi-target --truth file (default: the features' "
                   "file name, or the only table)")
    p.add_argument("--out", help="also write the ranking to this CSV file")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--plot", metavar="FILE", help="draw every model's score ± sd (against its fine-tuned "
                   "accuracy with --truth) into FILE (.png, .pdf, .svg; needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--jobs", type=int, default=1, help="score this many models in parallel processes")
    p.add_argument("--scheduler", help="score on a Dask cluster: a scheduler address (tcp://host:8786), "
                   "or local:N for N worker processes on this machine (needs the cluster extra)")
    p.add_argument("--preset", default="default", choices=("default", "paper", "authors"),
                   help="default: this implementation; paper: raw features, one 4/5 : 1/5 split; authors: "
                   "the authors' code as described (the options below override it)")
    group = p.add_argument_group("ITM options (default: the value shown)")
    for f in dataclasses.fields(Config):
        flag, help_ = "--" + f.name.replace("_", "-"), f"{f.metadata['help']} (default {f.default})"
        if isinstance(f.default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_,
                               dest=f.name)
        else:
            kind = {"float": float, "str": str}.get(type(f.default).__name__, int)
            group.add_argument(flag, type=kind, default=None, choices=f.metadata.get("choices"),
                               help=help_, dest=f.name)
    group.add_argument("--centers", choices=Config.__dataclass_fields__["centres"].metadata["choices"],
                       help=argparse.SUPPRESS)   # the spelling before 0.2: --centres, with a note
    return p


def _cli_config(args):
    """The Config of the command line: the preset, then every option given; errors name the flag."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}
    if args.centers is not None:
        print("itm: note: --centers is now spelt --centres", file=sys.stderr)
        given.setdefault("centres", args.centers)
    try:
        return preset(args.preset, **given)
    except (ValueError, TypeError) as err:
        raise ValueError(re.sub(r"Config\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(err))) \
            from None


def check_parallel(args):
    """--jobs and --scheduler, as every CLI of the project takes them."""
    if args.jobs < 1:
        raise ValueError(f"--jobs must be ≥ 1, got {args.jobs}")
    if args.scheduler is not None and args.jobs != 1:
        raise ValueError("give --jobs or --scheduler, not both")


def _check_args(args):
    """Everything that can be checked before any work starts."""
    check_parallel(args)
    if args.truth:
        sibling("kendall", "--truth")
    if args.features is None and (args.labels or args.models):
        raise ValueError("--labels/--models need --features")
    for option in ("out", "plot"):
        if getattr(args, option) is not None:
            _check_output(getattr(args, option), f"--{option}")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install 'itm-transferability[plot]'") from None


def _within_noise(a, b):
    """Is the difference between two models' scores within noise? Their fold scores are paired (the
    same folds for every model): yes when |mean of the differences| ≤ 2 standard errors of that mean."""
    if a.diverged or b.diverged or a.error or b.error:     # no fold scores to pair
        return False
    d = np.subtract(a.fold_scores, b.fold_scores)
    if d.size < 2:
        return False
    return bool(abs(d.mean()) <= 2.0 * d.std(ddof=1) / math.sqrt(d.size))


def _at_chance(r):
    """Chance level plus noise: Result.chance (_chance: what features without class information score)
    plus two binomial standard errors of an accuracy at that rate over the scored samples."""
    c = r.chance / 100.0
    return not math.isnan(r.score) and r.score <= 100.0 * (c + 2.0 * math.sqrt(c * (1 - c) / max(r.n_scored, 1)))


def _tau(ranking, truth):
    """τ_w over the ranked models that have a fine-tuned accuracy (_matching_truth said which lack one)."""
    if truth is None:
        return None
    valid = [(r.score, truth[name]) for name, r in ranking if name in truth and not math.isnan(r.score)]
    # τ_w has one implementation, kendall.weighted_tau (scipy's convention, tested against it)
    tau = sibling("kendall", "--truth").weighted_tau
    if len(valid) < 2:
        reason = f"only {len(valid)} of the models with an accuracy has a score (the others diverged or failed)"
    elif len({score for score, _ in valid}) == 1:
        reason = f"every model with an accuracy scores {valid[0][0]:.2f}: the scores are tied"
    elif len({acc for _, acc in valid}) == 1:
        reason = f"every model has the same fine-tuned accuracy, {valid[0][1]:.4g}"
    else:
        return tau(*zip(*valid))
    print(f"itm: warning: τ_w is undefined (nan): {reason}", file=sys.stderr)
    return float("nan")


def _score_text(r):
    if r.error:
        return "n/a"
    if math.isnan(r.score):
        return "nan"
    return f"{r.score:.2f}" + (f" ± {r.sd:.2f}" if not math.isnan(r.sd) else "")


def _report(ranking, truth, args, dataset, cfg):
    tau = _tau(ranking, truth)
    close = [i > 0 and _within_noise(ranking[i - 1][1], r) for i, (_, r) in enumerate(ranking)]
    if args.out:
        _write_csv_atomic(args.out, ranking, close)
    if args.plot:
        _plot(args.plot, ranking, truth, dataset)
    if args.json:
        print(json.dumps(_json(ranking, close, tau, dataset, cfg)))
        return
    width = max(len("model"), *(len(name) for name, _ in ranking))
    extra = f"  {'fine-tuned':>10}" if truth is not None else ""
    print(f"{'rank':>5}  {'model':<{width}}  {'score ± sd':>13}  {'n':>4}  {'seconds':>7}{extra}")
    for i, (name, r) in enumerate(ranking):
        extra = f"  {truth[name]:>10.4g}" if truth is not None and name in truth else \
            f"  {'n/a':>10}" if truth is not None else ""
        mark = "≈" if close[i] else " "
        print(f"{i + 1:>4}{mark}  {name:<{width}}  {_score_text(r):>13}  {r.n:>4}  {r.seconds:>7.2f}{extra}"
              + (f"  ({r.error})" if r.error else ""))
    if any(close):
        print("≈ within noise of the model above (their fold-paired difference is within 2 standard errors)")
    if tau is not None:
        print(f"weighted Kendall tau_w vs fine-tuned accuracy: {tau:.3f}")


def _json(ranking, close, tau, dataset, cfg):
    finite = lambda v: None if v is None or math.isnan(v) else v  # noqa: E731
    rows = [{"rank": i + 1, "model": name, "score": finite(r.score), "sd": finite(r.sd),
             "fold_scores": r.fold_scores, "within_noise_of_previous": close[i], "n": r.n, "fold_n": r.fold_n,
             "seconds": r.seconds, "diverged": r.diverged, "error": r.error or None, "chance": finite(r.chance),
             "trajectory": r.trajectory} for i, (name, r) in enumerate(ranking)]
    return {"dataset": dataset, "method": "ITM", "config": dataclasses.asdict(cfg),
            "scores": {"ITM": {name: finite(r.score) for name, r in ranking}},
            "ranking": rows, "weighted_tau": None if tau is None else finite(tau)}


def _write_csv_atomic(path, ranking, close):
    def write(fh):
        writer = csv.writer(fh)
        writer.writerow(["rank", "model", "score", "sd", "within_noise_of_previous", "n", "seconds",
                         "diverged", "error"])
        for i, (name, r) in enumerate(ranking):
            writer.writerow([i + 1, name, f"{r.score:.4f}", f"{r.sd:.4f}", close[i], r.n, f"{r.seconds:.2f}",
                             r.diverged, r.error])
    write_atomic(path, write)


def _plot(path, ranking, truth, dataset):
    """Every model's score ± sd: against its fine-tuned accuracy with truth, else in ranking order."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [(name, r) for name, r in ranking if not math.isnan(r.score) and (truth is None or name in truth)]
    fig, ax = plt.subplots(figsize=(7, 5))
    x = [truth[name] for name, _ in ok] if truth is not None else list(range(1, len(ok) + 1))
    ax.errorbar(x, [r.score for _, r in ok], yerr=[np.nan_to_num(r.sd) for _, r in ok], fmt="o", capsize=3)
    for xi, (name, r) in zip(x, ok):
        ax.annotate(name, (xi, r.score), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("fine-tuned accuracy" if truth is not None else "rank")
    ax.set_ylabel("ITM score (%), mean ± sd over folds")
    ax.set_title(f"ITM on {dataset}")
    fig.tight_layout()
    fmt = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    write_atomic(path, lambda fh: fig.savefig(fh, format=fmt), binary=True)
    plt.close(fig)


def _compile_note():
    """The first run compiles the numba kernels (cached beside this file afterwards): say so."""
    if not (HAVE_NUMBA and USE_NUMBA):
        return None
    cache = os.environ.get("NUMBA_CACHE_DIR") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                               "__pycache__")
    stem = os.path.splitext(os.path.basename(__file__))[0]
    if os.path.isdir(cache) and any(f.startswith(stem + ".") and f.endswith(".nbi") for f in os.listdir(cache)):
        return None
    return "itm: compiling the numba kernels (first run only; cached for later runs)"


def main(argv=None) -> int:
    """The command line (`python itm.py --help`); returns the exit status."""
    return run_cli("itm", _main, argv)


def _main(argv):
    args = _parser().parse_args(argv)
    cfg = _cli_config(args)
    _check_args(args)
    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    feature_sets, labels, truth, dataset = _inputs(args, log)
    note = _compile_note()
    if note:
        log(note)
    progress = lambda i, total, name, r: log(  # noqa: E731
        f"[{i}/{total}] {name}: " + (f"n/a ({r.error})" if r.error else
                                     f"score {_score_text(r)} (n={r.n}, {r.seconds:.2f} s)"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with (make_executor(args.scheduler) if args.scheduler else contextlib.nullcontext()) as executor:
            ranking = rank(feature_sets, labels, cfg, progress=progress, jobs=args.jobs, executor=executor,
                           errors="report")
    failed = [(name, r) for name, r in ranking if r.error]
    if len(failed) == len(ranking):                      # nothing to rank: the first reason, exit 1
        raise ValueError(failed[0][1].error)
    for w in caught:
        print(f"itm: warning: {one_line(w.message)}", file=sys.stderr)
    for name, r in failed:
        print(f"itm: warning: {r.error}; ranked last as n/a", file=sys.stderr)
    for name, r in ranking:
        if _at_chance(r):
            print(f"itm: warning: model {name!r} scores at chance ({r.score:.2f} ≤ {r.chance:.2f} + noise): "
                  "its features carry little class information here", file=sys.stderr)
    _report(ranking, truth, args, dataset, cfg)
    return 0


def _inputs(args, log):
    """(features by model, labels, truth or None, dataset name) of the command line, labels checked."""
    if args.features is None:
        feature_sets, labels, truth, source = _bundled_example()
        dataset = "flowers17_8models" if "Flowers-17" in source else "synthetic"
        log(f"itm: no --features given; running the {source}")
        try:
            sibling("kendall", "τ_w")
        except ValueError:                               # itm.py copied alone: the table without τ_w
            truth = None
            log("itm: τ_w against the fine-tuned accuracies needs kendall.py beside itm.py; not shown")
    else:
        models = [m.strip() for m in args.models.split(",")] if args.models else None
        feature_sets, labels = load_features(args.features, args.labels, models)
        dataset = dataset_name(args.features)
        truth = _truth(args, dataset, feature_sets) if args.truth else None
    if np.ndim(labels) == 1:
        encode_labels(labels)                            # bad labels fail once, before any model runs
    return feature_sets, labels, truth, dataset


def _truth(args, dataset, feature_sets):
    """The --truth table for these features, checked against the models before any work; a note (stderr,
    also with --quiet) when it is the only table of a nested file and not named like the dataset."""
    table, truth = sibling("kendall", "--truth").truth_table(args.truth, args.target, dataset)
    if table is not None and table not in (dataset, args.target):
        print(f"itm: note: --truth {args.truth} has no table {dataset!r}: its only table, {table!r}, is used",
              file=sys.stderr)
    _matching_truth(truth, feature_sets, args.truth)
    return truth


def _matching_truth(truth, feature_sets, path):
    """Before any work: a one-line error when fewer than two of the models to rank have a fine-tuned
    accuracy in the --truth file (τ_w needs two), a note (stderr, also with --quiet) naming the models
    without one otherwise."""
    missing = [m for m in feature_sets if m not in truth]
    matched = len(feature_sets) - len(missing)
    if matched == 0:
        names = ", ".join(list(truth)[:4]) + (", ..." if len(truth) > 4 else "")
        raise ValueError(f"--truth {path}: no model matches: none of the {len(feature_sets)} models to rank has "
                         f"an accuracy there (it names {names or 'no model'})")
    if matched == 1:
        raise ValueError(f"--truth {path}: only 1 of the {len(feature_sets)} models to rank has an accuracy "
                         f"there; τ_w needs at least 2 (no accuracy for {_names(missing)})")
    if missing:
        print(f"itm: note: --truth {path} has no accuracy for {len(missing)} of {len(feature_sets)} models "
              f"({_names(missing)}); τ_w is over the other {matched}", file=sys.stderr)


def _names(models, most=10):
    """The models by name, the first `most` of them and how many more."""
    more = len(models) - most
    return ", ".join(models[:most]) + (f" and {more} more" if more > 0 else "")


if __name__ == "__main__":
    sys.exit(main())

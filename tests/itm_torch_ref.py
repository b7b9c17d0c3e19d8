"""A second, independent ITM written the naive way in torch — the oracle of tests/test_itm.py.

Nothing here is clever: the propagation is the literal n-step loop E ← E − η·C(E − T) (Eq. 5 unrolled),
Algorithm 1's inner loop is literal gradient descent on a per-batch map g through torch.autograd.grad,
every gradient comes from autograd, and the optimiser is torch.optim.AdamW. The preprocessing of
DESIGN.md §0 (Config.preprocess) is computed here too, from the raw features, by the textbook formulas
(`preprocess`). Only the random choices of a run (split, centres, initial weights, batch order) are taken
from itm.make_plan, so both implementations see the same problem. Everything runs in float64 on the CPU.
"""
import numpy as np
import torch
import torch.nn.functional as F

DT = torch.float64


def t(a):
    return torch.as_tensor(np.asarray(a), dtype=DT)


def naive_propagate(theta, T, n, eta, scale):
    """E⁽ⁿ⁾ by n explicit steps E ← E − η·C(E − T), C = scale·ΘΘᵀ, starting from E⁽⁰⁾ = Θ."""
    C = scale * (theta @ theta.T)
    E = theta
    for _ in range(n):
        E = E - eta * (C @ (E - T))
    return E


def explicit_propagate(theta, T, Q, n, eta, scale, pc_loss):
    """Algorithm 1 literally: W_g = I, n plain GD steps of step η·scale on L_pc(ΘW_g), E = ΘW_g.

    L_pc: "mse" = Σ‖E − T‖²/2, "mae" = Σ|E − T|, "ce" = Σ_i CE(softmax(E_i), Q_i). The inner gradient is
    taken with create_graph=True, so the outer autograd differentiates through the whole inner loop.
    """
    Wg = torch.eye(theta.shape[1], dtype=theta.dtype)
    for _ in range(n):
        if not Wg.requires_grad:
            Wg = Wg.requires_grad_(True)
        E = theta @ Wg
        if pc_loss == "mse":
            L = 0.5 * ((E - T) ** 2).sum()
        elif pc_loss == "mae":
            L = (E - T).abs().sum()
        else:
            L = -(Q * torch.log_softmax(E, dim=1)).sum()
        (g,) = torch.autograd.grad(L, Wg, create_graph=True)
        Wg = Wg - eta * scale * g
    return theta @ Wg


def preprocess(E, cfg, labelled=None):
    """All rows of the raw features E (N×D, or N×h×w×D as one row per position) as f reads them, by
    DESIGN.md §0 written out directly, in float64 — nothing is taken from itm. Statistics over the rows
    `labelled` (a boolean mask; all rows when None), population moments:
    "none": E; "rms": E / sqrt(mean_i ‖e_i‖²); "center_rms": (E − μ) / sqrt(mean_i ‖e_i − μ‖²);
    "unit_rows": e_i / ‖e_i‖; "standardize": (E − μ)/σ per dimension, a constant dimension (σ zero up to
    the rounding of its own mean, 1e-12 of the largest σ) giving 0 — or, with the authors' reading
    (DESIGN.md §1b), (E − μ)/max(σ, 1e-6)."""
    X = t(E).reshape(-1, np.shape(E)[-1])
    S = X if labelled is None else X[torch.as_tensor(np.asarray(labelled, dtype=bool))]
    kind = cfg.preprocess
    if kind == "none":
        return X
    if kind == "unit_rows":
        return X / X.norm(dim=1, keepdim=True)
    if kind == "rms":
        return X / (S * S).sum(dim=1).mean().sqrt()
    mean = S.mean(dim=0)
    if kind == "center_rms":
        return (X - mean) / ((S - mean) ** 2).sum(dim=1).mean().sqrt()
    assert kind == "standardize", kind
    std = S.std(dim=0, correction=0)
    if cfg.reading == "authors":
        return (X - mean) / std.clamp_min(1e-6)
    constant = std <= 1e-12 * std.max()
    return torch.where(constant, 0.0, (X - mean) / torch.where(constant, 1.0, std))


def features_of(E, plan, cfg):
    """E as f reads it (`preprocess`), the statistics over the labelled rows of the plan (all of them
    for classification)."""
    return preprocess(E, cfg, np.asarray(plan.y) >= 0)


def batch_features(X, rows, normalize):
    """The batch (rows of the preprocessed features X) as f sees it: L2-normalised rows with
    normalize="features"."""
    X = X[torch.as_tensor(rows)]
    if normalize == "features":
        X = X / X.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return X


def logits_of(params, X, y, centres, q, cfg, n, head=True):
    """f, the propagation, h — for one batch (X, y); cfg is an itm.Config (only its fields are read).
    head=False: E⁽ⁿ⁾ itself, without h."""
    Wz, bz, Wh, bh = params
    theta = X @ Wz + bz
    if cfg.normalize == "theta":
        theta = theta / theta.norm(dim=1, keepdim=True).clamp_min(1e-12)
    B, Z = X.shape[0], theta.shape[1]
    scale = {"B": 1.0 / B, "B2": 1.0 / B ** 2, "B/Z": Z / B}[cfg.c_scale]
    T = centres[y]
    if cfg.mode == "closed":
        E = naive_propagate(theta, T, n, cfg.eta, scale)
    else:
        E = explicit_propagate(theta, T, q[y], n, cfg.eta, scale, cfg.pc_loss)
    return E @ Wh + bh if head else E


def loss_and_grads(E, plan, cfg, params, rows):
    """One training iteration's loss and the gradients of [W_z, b_z, W_h, b_h] (NumPy float64); E: the
    raw features."""
    ps = [t(p).requires_grad_(True) for p in params]
    y = torch.as_tensor(plan.y[rows])
    logits = logits_of(ps, batch_features(features_of(E, plan, cfg), rows, cfg.normalize), y, t(plan.centres),
                       t(plan.q), cfg, plan.n)
    loss = F.cross_entropy(logits, y)
    grads = torch.autograd.grad(loss, ps)
    return loss.item(), [g.numpy() for g in grads]


@torch.no_grad()
def accuracy(E, plan, cfg, params, features=None):
    """Top-1 accuracy (percent) on the scoring part in consecutive batches of B, each batch with its own
    labels' centres (DESIGN.md §1 step 6): argmax of h's logits, or (score_by="centres") the nearest
    centre of E⁽ⁿ⁾ by Euclidean distance. E: the raw features (`features`: features_of(E, ...) if
    already computed)."""
    X_all = features_of(E, plan, cfg) if features is None else features
    rows_all, B, correct = plan.score_idx, cfg.batch_size, 0
    centres, q = t(plan.centres), t(plan.q)
    head = cfg.score_by == "head"
    for start in range(0, rows_all.size, B):
        rows = rows_all[start:start + B]
        y = torch.as_tensor(plan.y[rows])
        X = batch_features(X_all, rows, cfg.normalize)
        with torch.enable_grad():  # the explicit inner loop needs autograd
            out = logits_of(params, X, y, centres, q, cfg, plan.n, head).detach()
        pred = out.argmax(dim=1) if head else torch.cdist(out, centres).argmin(dim=1)
        correct += int((pred == y).sum())
    return 100.0 * correct / rows_all.size


def algorithm2(E, plan, cfg):
    """A whole ITM run (Algorithm 2): AdamW over plan.batches, scored every eval_every iterations and
    after the last. E: the raw features. Returns (trajectory [(t, accuracy %)], losses per iteration)."""
    X_all = features_of(E, plan, cfg)
    params = [t(p).requires_grad_(True) for p in plan.params]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                            weight_decay=cfg.weight_decay)
    centres, q = t(plan.centres), t(plan.q)
    losses, trajectory = [], []
    for step in range(1, cfg.iterations + 1):
        rows = plan.batches[step - 1]
        y = torch.as_tensor(plan.y[rows])
        opt.zero_grad()
        loss = F.cross_entropy(logits_of(params, batch_features(X_all, rows, cfg.normalize), y, centres, q,
                                         cfg, plan.n), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % cfg.eval_every == 0 or step == cfg.iterations:
            trajectory.append((step, accuracy(E, plan, cfg, params, X_all)))
    return trajectory, np.array(losses)

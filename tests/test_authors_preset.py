"""itm.preset("authors") against an independent torch transcription of the authors' protocol (issue 12
item 5, DESIGN.md §1b).

The transcription below is written from the protocol's text, not from itm.py: features standardised per
dimension over all N rows (population std, clamped at 1e-6); Θ = normalize(X W_z + b_z); one propagation
step E = (I − 0.5·C)(Θ − T) + T with C = ΘΘᵀ/B built from a detached Θ; one-hot centres, no shift;
logits E W_h + b_h, cross-entropy; torch.optim.AdamW (5e-3, wd 0.01, betas 0.9/0.999, eps 1e-8) with
torch.optim.lr_scheduler.PolynomialLR(total_iters=10,000, power=1) stepped after every optimiser step;
scored every 100 iterations and after the last, the score the best checkpoint. Only the random choices
(split, batch order, initial weights) come from itm.make_plan. float64 throughout.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import itm

DT = torch.float64
N, D, K = 300, 24, 4
FLAT = 5                      # a nearly constant dimension: std ≈ 3.5e-7 < 1e-6, so the clamp sets its scale
RUN = dict(iterations=250, batch_size=64, dtype="float64", seed=3)   # 240 train rows: batches 64,64,64,48


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # conftest.py


def data(seed=0, sep=0.5):
    """K Gaussian blobs with very different scales per dimension, plus one informative but nearly
    constant dimension (FLAT) whose standardisation depends on the 1e-6 clamp."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(N) % K)
    X = (sep * rng.standard_normal((K, D))[y] + rng.standard_normal((N, D))) * rng.uniform(0.1, 10.0, D)
    X[:, FLAT] = 1e-3 + 3e-7 * (y - 1.5) + 1e-7 * rng.standard_normal(N)
    return X, y


def standardise(X, clamp=True):
    """Per-dimension (x − mean)/max(std, 1e-6) over all rows, population std."""
    X = torch.as_tensor(X, dtype=DT)
    std = X.std(dim=0, correction=0)
    return (X - X.mean(dim=0)) / (std.clamp_min(1e-6) if clamp else std)


def logits_of(params, X, y, detach=True):
    """f, the authors' single detached propagation step, h — for one batch."""
    Wz, bz, Wh, bh = params
    theta = F.normalize(X @ Wz + bz, dim=1)
    T = torch.eye(K, dtype=DT)[y]                         # one-hot unit centres, no shift
    B = X.shape[0]                                        # the actual batch size (48 for a partial batch)
    th = theta.detach() if detach else theta
    C = th @ th.T / B
    E = (torch.eye(B, dtype=DT) - 0.5 * C) @ (theta - T) + T
    return E @ Wh + bh


@torch.no_grad()
def correct_on_score_part(params, X, y, score_idx, B, detach):
    """Correct top-1 predictions over the scoring part in consecutive batches of B, each evolved towards
    its own labels' centres."""
    correct = 0
    for start in range(0, score_idx.size, B):
        rows = torch.as_tensor(score_idx[start:start + B])
        correct += int((logits_of(params, X[rows], y[rows], detach).argmax(dim=1) == y[rows]).sum())
    return correct


def authors_run(X_raw, labels, plan, clamp=True, detach=True):
    """The whole protocol in torch → (losses, [(t, correct)], lr after each scheduler step)."""
    X, y = standardise(X_raw, clamp), torch.as_tensor(labels)
    params = [torch.tensor(p, dtype=DT, requires_grad=True) for p in plan.params]
    opt = torch.optim.AdamW(params, lr=5e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=10_000, power=1.0)
    iterations, B = len(plan.batches), plan.config.batch_size
    losses, trajectory, lrs = [], [], []
    for step, rows in enumerate(plan.batches, start=1):
        rows = torch.as_tensor(rows)
        opt.zero_grad()
        loss = F.cross_entropy(logits_of(params, X[rows], y[rows], detach), y[rows])
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        lrs.append(sched.get_last_lr()[0])
        if step % 100 == 0 or step == iterations:
            trajectory.append((step, correct_on_score_part(params, X, y, plan.score_idx, B, detach)))
    return np.array(losses), trajectory, np.array(lrs)


def as_counts(trajectory, n):
    """itm's percent trajectory as (t, correct count), checking each value is a whole count."""
    out = []
    for t, acc in trajectory:
        count = acc * n / 100.0
        assert abs(count - round(count)) < 1e-9, (t, acc)
        out.append((t, int(round(count))))
    return out


def test_preset_is_the_authors_protocol():
    """The fields the protocol fixes, and the plan's non-random parts (one step, unshifted one-hot centres)."""
    cfg = itm.preset("authors")
    assert (cfg.reading, cfg.preprocess, cfg.folds, cfg.n, cfg.eta, cfg.shift, cfg.centres, cfg.normalize,
            cfg.c_scale) == ("authors", "standardize", 1, 1, 0.5, False, "onehot", "theta", "B")
    assert (cfg.lr, cfg.weight_decay, cfg.beta1, cfg.beta2, cfg.adam_eps, cfg.eval_every) == \
        (5e-3, 0.01, 0.9, 0.999, 1e-8, 100)
    X, y = data()
    plan = itm.make_plan(X, y, itm.preset("authors", **RUN))
    assert plan.n == 1
    np.testing.assert_array_equal(plan.centres, np.eye(K))
    np.testing.assert_array_equal(plan.y, y)              # labels 0..K−1 encode to themselves


def test_authors_preset_matches_torch_transcription(monkeypatch):
    X, y = data()
    cfg = itm.preset("authors", **RUN)
    plan = itm.make_plan(X, y, cfg)
    losses, trajectory, lrs = authors_run(X, y, plan)

    # itm's own run of the same plan, recording the learning rate every AdamW step is given
    seen, real = [], itm.adamw_step
    monkeypatch.setattr(itm, "adamw_step", lambda p, g, m, v, lr, *a: (seen.append(lr), real(p, g, m, v, lr, *a)))
    itm_traj, itm_losses = itm.train(plan)
    monkeypatch.undo()
    result = itm.itm_score(X, y, cfg)

    n = plan.score_idx.size
    rel = np.max(np.abs(itm_losses - losses) / np.abs(losses))
    assert rel < 1e-9, f"per-iteration losses differ by {rel:.3g} relative"
    assert np.max(np.abs(result.losses - losses) / np.abs(losses)) < 1e-9
    assert [t for t, _ in trajectory] == [100, 200, 250]
    assert as_counts(itm_traj, n) == trajectory
    assert as_counts(result.trajectory, n) == trajectory
    assert result.score == 100.0 * (max(c for _, c in trajectory) / n)
    assert result.score > 100.0 / K + 10                  # it learned: the comparison is not of chance runs

    # the schedule: after t scheduler steps lr = 5e-3·(1 − t/10,000); step t + 1 uses it, in both
    t = np.arange(RUN["iterations"])
    lr_itm = np.array(seen).reshape(RUN["iterations"], 4)  # one call per tensor [W_z, b_z, W_h, b_h]
    assert np.all(lr_itm == lr_itm[:, :1])
    np.testing.assert_allclose(lr_itm[:, 0], 5e-3 * (1 - t / 10_000), rtol=1e-14, atol=0)
    np.testing.assert_allclose(lrs, 5e-3 * (1 - (t + 1) / 10_000), rtol=1e-12, atol=0)


@pytest.mark.parametrize("variant", [dict(clamp=False), dict(detach=False)])
def test_transcription_sees_the_clamp_and_the_detach(variant):
    """The comparison above can fail: without the 1e-6 clamp, or with the gradient through C, the
    transcription's losses leave itm's by far more than the 1e-9 tolerance."""
    X, y = data()
    plan = itm.make_plan(X, y, itm.preset("authors", **RUN))
    _, itm_losses = itm.train(plan)
    losses, _, _ = authors_run(X, y, plan, **variant)
    assert np.max(np.abs(itm_losses - losses) / np.abs(losses)) > 1e-6


def test_split_unstratified_80_20_and_last_batch_kept():
    X, y = data()
    cfg = itm.preset("authors", iterations=9, batch_size=64, seed=7)
    plan = itm.make_plan(X, y, cfg)
    # the split is one random permutation of all N rows cut at round(N/5), labels unused
    order = np.random.default_rng(7).permutation(N)
    np.testing.assert_array_equal(plan.score_idx, order[:60])
    np.testing.assert_array_equal(plan.train_idx, order[60:])
    # batches: each epoch a permutation of the 240 training rows, the last partial batch (48) kept
    assert [len(b) for b in plan.batches] == [64, 64, 64, 48] * 2 + [64]
    for epoch in range(2):
        rows = np.concatenate(plan.batches[4 * epoch:4 * epoch + 4])
        np.testing.assert_array_equal(np.sort(rows), np.sort(plan.train_idx))

    # unstratified: a class of 3 samples is absent from the scoring part for some seeds (the stratified
    # "paper" split always keeps one), and balanced classes do not get exactly N/(5K) scoring rows each
    rare = y.copy()
    rare[np.flatnonzero(y == 3)[3:]] = 0                  # class 3 keeps 3 members
    absent = [s for s in range(10)
              if not np.any(rare[itm.make_plan(X, rare, itm.preset("authors", iterations=1, seed=s)).score_idx] == 3)]
    assert absent, "the rare class reached the scoring part for every seed"
    for s in absent:
        paper = itm.make_plan(X, rare, itm.preset("paper", iterations=1, seed=s))
        assert np.sum(rare[paper.score_idx] == 3) == 1
    assert not np.all(np.bincount(y[plan.score_idx], minlength=K) == N // (5 * K))

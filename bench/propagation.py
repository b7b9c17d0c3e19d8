"""What the deparametric propagation does on real features (DESIGN.md §1d): for every model of every
benchmark target, how far E⁽ⁿ⁾ moves from Θ, where the spectrum of ηC sits against 1/n, each model's
adaptive n, and the score with the propagation switched off (the same training with E = Θ, Config n=0).

    python bench/propagation.py [--shared DIR] [--targets flowers17,cifar10] [--seed 0] [--jobs 2]
                                [--itm key=value ...] [--out bench/results/propagation.json]

Nothing here looks at the ground truth. Per model, from fold 0 of the Config's cross-fitting, after the
last training iteration, over the scoring part cut into batches of B as the score cuts it:

* n: the adaptive n of that fold (Eq. 9), and dis, its distance;
* move: ‖E⁽ⁿ⁾ − Θ‖ / ‖Θ‖ (Frobenius, over all scoring rows): how far the propagation moves the batch;
* left: ‖(I − ηC)ⁿ(Θ − T)‖ / ‖Θ − T‖: the part of the distance to the targets that is still there;
* nηλ₁ and nηλ_med: n·η times the largest and the median non-zero eigenvalue of C (batch mean); a
  direction with nηλ ≪ 1 is barely moved, since (1 − ηλ)ⁿ ≈ 1 − nηλ there;
* the score (percent, mean over the Config's folds) with the propagation and without it (n = 0, read by
  h, which training fitted to Θ), and their difference.

Per target: the spread of the scores across models against the spread of the differences, and the
Spearman correlation between the scores with and without propagation: when the two orders are nearly
the same, the model-to-model difference is made by f and h, not by the propagation.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
for _path in (HERE.parent, HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import accuracy  # noqa: E402
import itm  # noqa: E402
import kendall  # noqa: E402


def propagation_off(cfg):
    """The same training with E⁽ⁿ⁾ = Θ (n = 0), scored by h's logits: with no evolution there is no reason
    for Θ to lie near the pseudo-cluster centres, and h is what was trained to read it."""
    return dataclasses.replace(cfg, n=0, score_by="head")


def after_training(features, labels, cfg):
    """Fold 0's plan and its parameters after the last training iteration."""
    plan = itm.make_plan(features, labels, cfg, fold=0)
    final = {}
    itm.train(plan, callback=lambda t, loss, params: final.update(params=[p.copy() for p in params]))
    return plan, final["params"]


def spectrum(plan, params):
    """move, left, nηλ₁, nηλ_med over the scoring batches of a trained plan (see the module docstring)."""
    cfg, model = plan.config, itm._Model(plan)
    Wz, bz = params[0], params[1]
    moved = theta_sq = left = dist = 0.0
    top, med = [], []
    rows_all, B = plan.score_idx, cfg.batch_size
    for start in range(0, rows_all.size, B):
        rows = rows_all[start:start + B]
        X, y = model.batch(rows), plan.y[rows]
        A = (X @ Wz + bz).astype(np.float64)                       # B×Z = (B×D)(D×Z)
        theta, T, _ = itm.theta_and_targets(A, plan.centres, y, cfg.normalize == "theta")
        s = itm.c_scale_factor(cfg.c_scale, *theta.shape)
        lam, V = np.linalg.eigh(s * (theta.T @ theta))             # G's eigenvalues = C's non-zero ones
        R = theta - T
        # (I − ηC)ⁿR = R + Θ φ(G) ΘᵀR·s (DESIGN.md §2), B×Z
        evolved_R = R + theta @ ((V * itm.phi(lam, plan.n, cfg.eta)) @ V.T) @ (theta.T @ R) * s
        moved += float(np.sum((evolved_R - R) ** 2))               # E⁽ⁿ⁾ − Θ = (I − ηC)ⁿR − R
        theta_sq += float(np.sum(theta ** 2))
        left += float(np.sum(evolved_R ** 2))
        dist += float(np.sum(R ** 2))
        nonzero = lam[lam > 1e-12 * lam[-1]]
        top.append(plan.n * cfg.eta * lam[-1])
        med.append(plan.n * cfg.eta * float(np.median(nonzero)))
    return {"move": (moved / theta_sq) ** 0.5, "left": (left / dist) ** 0.5,
            "n_eta_lam_max": float(np.mean(top)), "n_eta_lam_median": float(np.mean(med))}


def measure(name, feats, labels, cfg, jobs=1, log=print):
    """Every model of a target: the per-model numbers of the module docstring."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        on = dict((name, r) for name, r in itm.rank(feats, labels, cfg, jobs=jobs))
        off = dict((name, r) for name, r in itm.rank(feats, labels, propagation_off(cfg), jobs=jobs))
    rows = {}
    for model in feats:
        plan, params = after_training(feats[model], labels, cfg)
        rows[model] = {"n": plan.n, "dis": plan.dis, **spectrum(plan, params),
                       "score": on[model].score, "score_off": off[model].score,
                       "difference": on[model].score - off[model].score}
        log(f"{name} {model}: " + ", ".join(f"{k} {v:.4g}" for k, v in rows[model].items()))
    return rows


def summary(rows):
    """Spread of the scores and of the on − off differences across models; Spearman ρ(on, off)."""
    on = np.array([r["score"] for r in rows.values()])
    off = np.array([r["score_off"] for r in rows.values()])
    return {"models": len(rows), "score_sd": float(np.std(on)), "difference_mean": float(np.mean(on - off)),
            "difference_sd": float(np.std(on - off)), "spearman_on_off": kendall.spearman_rho(on, off),
            "move_median": float(np.median([r["move"] for r in rows.values()])),
            "left_median": float(np.median([r["left"] for r in rows.values()])),
            "n_range": [min(r["n"] for r in rows.values()), max(r["n"] for r in rows.values())],
            "n_eta_lam_max_median": float(np.median([r["n_eta_lam_max"] for r in rows.values()]))}


def markdown(results, cfg):
    lines = [f"Config: {accuracy.variant_name(cfg)}", "",
             "| target | models | n (min–max) | median move ‖E⁽ⁿ⁾ − Θ‖/‖Θ‖ | median left | median nηλ₁ | "
             "sd of scores | on − off (mean ± sd) | Spearman ρ(on, off) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        s = res["summary"]
        lines.append(f"| {name} | {s['models']} | {s['n_range'][0]}–{s['n_range'][1]} | {s['move_median']:.3f} | "
                     f"{s['left_median']:.3f} | {s['n_eta_lam_max_median']:.3f} | {s['score_sd']:.2f} | "
                     f"{s['difference_mean']:+.2f} ± {s['difference_sd']:.2f} | {s['spearman_on_off']:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench/propagation.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--shared", help="the folder holding te_bench/ (default: ../shared beside the repo)")
    p.add_argument("--targets", help="comma-separated targets (default: every target with features)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--itm", nargs="*", default=[], metavar="KEY=VALUE", help="itm.Config overrides")
    p.add_argument("--out", default=str(HERE / "results" / "propagation.json"))
    args = p.parse_args(argv)
    cfg = itm.Config(**{**accuracy.itm_options(args.itm), "seed": args.seed})
    bench = accuracy.find_bench_dir(args.shared)
    names = args.targets.split(",") if args.targets else sorted(p.stem for p in (bench / "features").glob("*.npz"))
    results = {}
    for name in names:
        feats, labels = itm.load_features(bench / "features" / f"{name}.npz")
        rows = measure(name, feats, labels, cfg, args.jobs, log=lambda m: print(m, file=sys.stderr, flush=True))
        results[name] = {"models": rows, "summary": summary(rows)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    itm.write_atomic(args.out, lambda fh: json.dump({"config": dataclasses.asdict(cfg), "targets": results},
                                                    fh, indent=1))
    print(markdown(results, cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How far the NumPy-only path (ITM_NO_NUMBA=1, or no numba installed) is from the numba path on real
features: every model of each target scored both ways under one Config (the README's "NumPy-only" line).

    python bench/numpy_only.py [--shared DIR] [--targets flowers17,cifar10,pneumonia] [--seed 0] [--jobs 2]

The two paths compute the same formulas; they differ only in the order of floating-point sums (numba's
loops vs NumPy's pairwise and BLAS reductions), so a run can take a different trajectory after many
iterations. Printed per target: models whose score differs, the largest difference, whether the top model
and the whole ranking agree.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import itm  # noqa: E402
import kendall  # noqa: E402


def both_paths(feature_sets, labels, cfg, jobs):
    """{model: (numba score, NumPy-only score)}."""
    scores = []
    for use_numba in (True, False):
        itm.USE_NUMBA = use_numba and itm.HAVE_NUMBA
        scores.append(dict(itm.rank(feature_sets, labels, cfg, jobs=jobs, errors="report")))
    itm.USE_NUMBA = itm.HAVE_NUMBA
    return {name: (scores[0][name].score, scores[1][name].score) for name in feature_sets}


def summary_line(target, pairs):
    a, b = (np.array([p[i] for p in pairs.values()]) for i in (0, 1))
    ok = np.isfinite(a) & np.isfinite(b)
    diff = np.abs(a[ok] - b[ok])
    names = list(pairs)
    top = names[int(np.nanargmax(a))], names[int(np.nanargmax(b))]
    tau = kendall.kendall_tau(a[ok], b[ok])
    return (f"| {target} | {len(pairs)} | {int(np.sum(diff > 0))} | {diff.max():.2f} | {np.mean(diff):.3f} | "
            f"{'same' if top[0] == top[1] else f'{top[0]} vs {top[1]}'} | {tau:.3f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
    p.add_argument("--targets", default="flowers17,cifar10,pneumonia")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    if not itm.HAVE_NUMBA:
        sys.exit("numpy_only.py: error: numba is not installed: nothing to compare with")
    cfg = itm.Config(seed=args.seed)
    print(f"ITM default Config (seed {args.seed}), numba vs NumPy-only path:\n")
    print("| target | models | scores that differ | max abs difference (points) | mean abs difference | "
          "top model | Kendall τ between the rankings |")
    print("|---|---|---|---|---|---|---|")
    for target in args.targets.split(","):
        path = os.path.join(args.shared, "te_bench", "features", f"{target}.npz")
        feature_sets, labels = itm.load_features(path)
        print(summary_line(target, both_paths(feature_sets, labels, cfg, args.jobs)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

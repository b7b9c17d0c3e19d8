"""ITM's preprocessing × folds ablation on a benchmark target: τ_w per seed against the fine-tuning
ground truth (the numbers of DESIGN.md §0).

    python bench/ablation_itm.py --features FEATS.npz --truth groundtruth.json --target flowers17 \
        --out ablation.json [--seeds 10] [--fold-seeds 5]

Results are cached per (preprocess, folds, seed) in --out, so an interrupted run resumes.
"""
import argparse
import json
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import itm  # noqa: E402
import kendall  # noqa: E402


def run(args):
    feature_sets, labels = itm.load_features(args.features)
    truth = kendall.load_truth(args.truth, args.target)
    res = json.load(open(args.out)) if os.path.exists(args.out) else {}
    combos = [(p, 1, s) for s in range(args.seeds) for p in itm.PREPROCESS]
    combos += [(p, 5, s) for s in range(args.fold_seeds) for p in itm.PREPROCESS]
    for prep, folds, seed in combos:
        key = f"{prep}|{folds}|{seed}"
        if key in res:
            continue
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ranking = itm.rank(feature_sets, labels, itm.Config(preprocess=prep, folds=folds, seed=seed),
                               jobs=args.jobs)
        res[key] = {"seconds": time.perf_counter() - start, "scores": {n: r.score for n, r in ranking}}
        itm.write_atomic(args.out, lambda fh: json.dump(res, fh))
        print(key, f"{res[key]['seconds']:.1f} s", file=sys.stderr, flush=True)
    return res, truth


def summarize(res, truth):
    names = sorted(truth)
    tau = lambda s: kendall.weighted_tau([s[n] for n in names], [truth[n] for n in names])  # noqa: E731
    print("| preprocess | folds | seeds | τ_w mean ± sd | τ_w min | τ_w of the seed-mean score | distinct top models |")
    print("|---|---|---|---|---|---|---|")
    for folds in (1, 5):
        for prep in itm.PREPROCESS:
            runs = [v for k, v in res.items() if k.startswith(f"{prep}|{folds}|")]
            if not runs:
                continue
            taus = [tau(r["scores"]) for r in runs]
            mean = {n: np.mean([r["scores"][n] for r in runs]) for n in names}
            tops = {max(r["scores"], key=r["scores"].get) for r in runs}
            print(f"| {prep} | {folds} | {len(runs)} | {np.mean(taus):.3f} ± {np.std(taus):.3f} | "
                  f"{min(taus):.3f} | {tau(mean):.3f} | {len(tops)} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--features", required=True)
    p.add_argument("--truth", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--fold-seeds", type=int, default=5)
    p.add_argument("--jobs", type=int, default=2)
    summarize(*run(p.parse_args(argv)))


if __name__ == "__main__":
    main()

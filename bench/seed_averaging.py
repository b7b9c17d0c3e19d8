"""What averaging ITM's score over R seeds would buy (repeated cross-fitting: R independent fold
assignments and initialisations per model, R times the cost), read from the per-seed scores that
`python bench/accuracy.py` saved: τ_w of the R-seed mean score over every R-subset of the seeds.

    python bench/seed_averaging.py [--results bench/results/results.json] [--target flowers17]
"""
import argparse
import itertools
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kendall  # noqa: E402


def averaged_taus(runs, truth, R):
    """τ_w of the mean score of every R-subset of the runs (one run per seed)."""
    names = sorted(truth)
    S = np.array([[run["scores"][n] for n in names] for run in runs])      # seeds × models
    acc = [truth[n] for n in names]
    return [kendall.weighted_tau(list(S[list(c)].mean(axis=0)), acc)
            for c in itertools.combinations(range(len(runs)), R)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.abspath(__file__))
    p.add_argument("--results", default=os.path.join(here, "results", "results.json"))
    p.add_argument("--target", default="flowers17")
    args = p.parse_args(argv)
    target = json.load(open(args.results))["targets"][args.target]
    runs, truth = target["methods"]["itm"]["runs"], target["truth"]
    print(f"{args.target}: ITM default, {len(runs)} seeds; τ_w of the R-seed mean score over every R-subset\n")
    print("| R (seeds averaged = cost multiple) | subsets | τ_w mean ± sd |")
    print("|---|---|---|")
    for R in (1, 2, 3, 5):
        taus = averaged_taus(runs, truth, R)
        print(f"| {R} | {len(taus)} | {np.mean(taus):.3f} ± {np.std(taus):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

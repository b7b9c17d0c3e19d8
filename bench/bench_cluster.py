"""docs/usage.md's cluster table: one pool of 8 models × 3 seeds (the bundled Flowers-17 example, default
Config) scored serially, with jobs=2 (forked processes) and on a Dask LocalCluster of 2 workers
(`--scheduler local:2`), in one run; the scores must be identical in all three.

    python bench/bench_cluster.py [--seeds 3] [--workers 2] [--transfer-mb 400]

It also times the two ways a model's features can reach a worker: sent from the client (what
itm.make_executor's share() does: the array travels once, as a task's result) and read by the worker
from a shared path (np.load of an .npy, memory-mapped, then summed so every page is read).

Wall seconds include starting the processes or the cluster (what a user waits for). Needs the
`cluster` extra (dask[distributed]).
"""
import argparse
import dataclasses
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import itm  # noqa: E402

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                       "flowers17_8models.npz")


def timed(grid_fn, *args, **kwargs):
    """(wall seconds, [[score per model] per config]) of one call that returns score_grid's result."""
    start = time.perf_counter()
    grid = grid_fn(*args, **kwargs)
    return time.perf_counter() - start, [[r.score for r in run.values()] for run in grid]


def on_local_cluster(workers, *args):
    """score_grid(*args) on a LocalCluster started (and stopped) for it."""
    with itm.make_executor(f"local:{workers}") as executor:
        return itm.score_grid(*args, executor=executor)


def _touch(X):
    return float(np.asarray(X, dtype=np.float64).sum())


def _load_and_touch(path):
    return _touch(np.load(path, mmap_mode="r"))


def transfer_seconds(megabytes, workers):
    """(seconds via share(), seconds via a shared path) for one float32 array of that size."""
    X = np.random.default_rng(0).standard_normal((megabytes * 2 ** 18 // 1024, 1024), dtype=np.float32)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.npy")
        np.save(path, X)
        with itm.make_executor(f"local:{workers}") as executor:
            executor.submit(_touch, np.zeros(1)).result()               # the workers are up
            start = time.perf_counter()
            executor.submit(_touch, executor.share(X)).result()
            sent = time.perf_counter() - start
            start = time.perf_counter()
            executor.submit(_load_and_touch, path).result()
            read = time.perf_counter() - start
    return sent, read


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--transfer-mb", type=int, default=400, help="size of the array of the transfer timing")
    args = p.parse_args(argv)
    feature_sets, labels = itm.load_features(EXAMPLE)
    configs = [dataclasses.replace(itm.Config(), seed=s) for s in range(args.seeds)]
    itm.itm_score(next(iter(feature_sets.values())), labels, iterations=2, eval_every=1, folds=2)  # compile
    pool = (feature_sets, labels, configs)
    rows = [("serial", *timed(itm.score_grid, *pool)),
            (f"jobs={args.workers}", *timed(itm.score_grid, *pool, jobs=args.workers)),
            (f"scheduler local:{args.workers}", *timed(on_local_cluster, args.workers, *pool))]
    same = all(scores == rows[0][2] for _, _, scores in rows)
    print(f"{len(feature_sets)} models × {args.seeds} seeds ({len(feature_sets) * args.seeds} runs, "
          f"{itm.Config().folds} folds each):")
    for name, seconds, _ in rows:
        print(f"  {name:<22} {seconds:7.1f} s   ({rows[0][1] / seconds:.2f}× serial)")
    print(f"identical scores in all three: {same}")
    sent, read = transfer_seconds(args.transfer_mb, args.workers)
    print(f"one {args.transfer_mb} MB model's features to a worker: {sent:.2f} s sent from the client "
          f"(share), {read:.2f} s read from a shared path (memory-mapped .npy)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

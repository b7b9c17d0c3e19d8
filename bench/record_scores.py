"""Every number a run of itm.py gives, recorded to compare two versions of the code bit for bit: "a refactor
moves no number".

    python bench/record_scores.py --out before.json             # record (the code as it is now)
    python bench/record_scores.py --compare before.json         # record again and list every difference

Recorded, for each case: the Result's score, fold scores, sd, trajectory, n and fold n, chance rate, scored
samples, diverged flag and note, and the training losses (every value, as a hash and the first and last).
Floats are compared as written by repr(), which round-trips exactly. The cases: the bundled example's 8
models under the default and both presets with seeds 0 and 1; every option of DESIGN.md §1a on one of its
models (the explicit loop with each L_pc, the other centres, scales and readings, n = 0, float64, mean IoU);
the NumPy-only path; three real models of each benchmark target (../shared/te_bench, when it is there); a
small dense (segmentation) case; and a diverged run.
"""
import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's itm.py
import itm  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "te_bench")
REAL = {"flowers17": ("tv_mnv2_in1k", "effl2_in1k", "c10_resnet20"),
        "cifar10": ("tv_mnv2_in1k", "effl0_in1k", "mnv1_025_in1k_q"),
        "pneumonia": ("tv_mnv2_in1k", "mnv2_inat_bird_q", "c10_resnet56")}
# the field was Config.centers before b0a169b: either spelling, so that an earlier itm.py can be recorded too
CENTRES = next(f.name for f in dataclasses.fields(itm.Config) if f.name in ("centres", "centers"))
OPTIONS = {  # DESIGN.md §1a's readings and the other options, one at a time from the default
    "explicit_mse": dict(mode="explicit", n=12), "explicit_mae": dict(mode="explicit", n=12, pc_loss="mae"),
    "explicit_ce": dict(mode="explicit", n=12, pc_loss="ce"), "n0": dict(n=0),
    "random": {CENTRES: "random", "latent_dim": 24}, "pca": {CENTRES: "pca"}, "laplacian": {CENTRES: "laplacian"},
    "c_scale_B": dict(c_scale="B"), "c_scale_B2": dict(c_scale="B2"), "head": dict(score_by="head"),
    "noshift": dict(shift=False), "normalize_features": dict(normalize="features", preprocess="none"),
    "normalize_none": dict(normalize="none", preprocess="none", folds=1),
    "rms": dict(preprocess="rms"), "center_rms": dict(preprocess="center_rms"),
    "unit_rows": dict(preprocess="unit_rows"), "float64": dict(dtype="float64"), "miou": dict(metric="miou"),
    "folds5": dict(folds=5), "n_fixed": dict(n=40, eta=0.05), "diverged": dict(eta=50.0),
}


def record(result):
    """A Result as JSON-safe values that keep every bit (floats by repr)."""
    losses = np.asarray(result.losses if result.losses is not None else [], dtype=np.float64)
    return {"score": repr(result.score), "fold_scores": [repr(s) for s in result.fold_scores],
            "sd": repr(result.sd), "trajectory": [(t, repr(a)) for t, a in result.trajectory], "n": result.n,
            "fold_n": list(result.fold_n), "chance": repr(result.chance), "n_scored": result.n_scored,
            "diverged": result.diverged, "note": result.note,
            "losses": [hashlib.sha256(losses.tobytes()).hexdigest()[:16], len(losses),
                       *(repr(float(v)) for v in (losses[[0, -1]] if losses.size else ()))]}


def cases():
    """(case name, features, labels, Config) of every case, in a fixed order."""
    sets, labels = itm.load_features(os.path.join(ROOT, "examples", "flowers17_8models.npz"))
    for preset in ("default", "paper", "authors"):
        for seed in (0, 1):
            for name, F in sets.items():
                yield f"example/{preset}/seed{seed}/{name}", F, labels, itm.preset(preset, seed=seed)
    F = sets["tv_mnv2_in1k"]
    for option, change in OPTIONS.items():
        yield f"option/{option}", F, labels, itm.Config(**change)
    for target, models in REAL.items():
        path = os.path.join(SHARED, "features", f"{target}.npz")
        if os.path.exists(path):
            real, y = itm.load_features(path, models=list(models))
            for name in models:
                yield f"real/{target}/{name}", real[name], y, itm.Config()
    rng = np.random.default_rng(0)
    grid = rng.integers(0, 4, (24, 6, 6))
    maps = np.kron(grid, np.ones((3, 3), dtype=np.int64)).astype(np.uint8)
    maps[rng.random(maps.shape) < 0.1] = 255
    dense = (rng.standard_normal((4, 16))[grid] + rng.standard_normal((24, 6, 6, 16))).astype(np.float16)
    for metric in ("accuracy", "miou"):
        yield f"dense/{metric}", dense, maps, itm.Config(batch_size=64, iterations=60, eval_every=20, metric=metric)


def run_all(log):
    out = {}
    for name, F, labels, cfg in cases():
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                  # the diverged case warns, as it should
            out[name] = record(itm.itm_score(F, labels, cfg))
            if name.endswith(("explicit_mse", "head", "c_scale_B")):
                itm.USE_NUMBA = False                        # the NumPy-only path of the same case
                out[name + "/numpy_only"] = record(itm.itm_score(F, labels, cfg))
                itm.USE_NUMBA = itm.HAVE_NUMBA
        log(f"{name}: {out[name]['score']} ({time.perf_counter() - start:.1f} s)")
    return out


def differences(before, after):
    """Lines naming every case and field that differ."""
    lines = [f"{name}: only in {'before' if name in before else 'after'}" for name in sorted(set(before) ^ set(after))]
    for name in before:
        if name in after and before[name] != after[name]:
            fields = [k for k in before[name] if before[name][k] != after[name].get(k)]
            lines.append(f"{name}: {', '.join(fields)} differ: "
                         + "; ".join(f"{k} {before[name][k]} → {after[name].get(k)}" for k in fields))
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", help="write the record to this JSON file")
    group.add_argument("--compare", help="record again and compare with this JSON file")
    args = p.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    now = run_all(log)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(now, fh, indent=1)
        print(f"recorded {len(now)} cases in {args.out}")
        return 0
    with open(args.compare) as fh:
        before = json.load(fh)
    now = json.loads(json.dumps(now))                        # tuples as lists, as the file has them
    lines = differences(before, now)
    print("\n".join(lines) if lines else f"identical: all {len(now)} cases, every field, bit for bit")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())

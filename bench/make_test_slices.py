"""Write tests/data/ from the project's offline benchmark (te_bench): the real-feature data the test suite
reads instead of the benchmark, which a clone does not have.

    python bench/make_test_slices.py                 # te_bench/ beside the checkout (../shared)
    python bench/make_test_slices.py --shared DIR    # DIR holds te_bench/ (or is te_bench/ itself)

Run once; its output is committed. It writes, under --out (default tests/data/):

- flowers17_extra.npz: the flowers17 features of EXTRA_MODELS, copied as stored (float16, all 680 rows),
  and `labels`. With the bundled example (examples/flowers17_8models.npz, 8 more models of the same
  target, same rows) the tests have 11 of the 21 models.
- flowers17_reference.json: te_bench/reference_scores/flowers17.json (the published codes' outputs) cut to
  exactly those 11 models, numbers copied unchanged, with a "how_made" entry.
- groundtruth.json: te_bench/groundtruth.json cut to the targets whose truth is complete (its tables and
  their `details`), numbers copied unchanged: a provisional table changes while its runs finish, and the
  committed copy must keep equalling what this script makes.

It checks first that the bundled example is the benchmark's own data (the reference values are for those
arrays) and refuses to write otherwise. bench/test_full_benchmark.py checks that the committed files still
equal what this script makes, and runs the tests that need all 21 models on the benchmark itself.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402  (find_bench_dir: the --shared convention of bench/)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "flowers17_8models.npz"
OUT = ROOT / "tests" / "data"
# What the real-feature tests of tests/test_baselines.py need beyond the bundled example:
#   vww_mnv1_025_96   rank 22 (234 of 256 columns zero): the published codes' worst case, NCTI's exact PCA
#   mnv2_in1k_slim_q  the model on which LogME's fixed point stops at a lower local maximum
#   c10_resnet20      the D = 64 model of the scale-invariance and absolute-epsilon tests
EXTRA_MODELS = ("vww_mnv1_025_96", "mnv2_in1k_slim_q", "c10_resnet20")
SOURCE = "the project's offline benchmark te_bench"


def _relative(text):
    """The benchmark's notes name its files as shared/te_bench/...; the copies name them te_bench/...,
    the benchmark's own name, not a path of this repository or beside it."""
    return text.replace("shared/te_bench/", "te_bench/")


def _relative_all(obj):
    if isinstance(obj, str):
        return _relative(obj)
    if isinstance(obj, dict):
        return {k: _relative_all(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relative_all(v) for v in obj]
    return obj


def example_models():
    with np.load(EXAMPLE) as npz:
        return [k for k in npz.files if k != "labels"]


def make(bench):
    """{file name: content}: arrays for the .npz, a JSON-ready object for the .json files."""
    bench = Path(bench)
    with np.load(bench / "features" / "flowers17.npz") as npz:
        full = {k: npz[k] for k in npz.files}
    with np.load(EXAMPLE) as npz:
        for k in npz.files:
            if k not in full or full[k].dtype != npz[k].dtype or not np.array_equal(full[k], npz[k]):
                raise ValueError(f"{EXAMPLE.name}: {k} is not the benchmark's flowers17 array; the "
                                 "reference values would not be its values")
    models = example_models() + list(EXTRA_MODELS)
    features = {"labels": full["labels"], **{m: full[m] for m in EXTRA_MODELS}}

    ref_doc = json.loads((bench / "reference_scores" / "flowers17.json").read_text(encoding="utf-8"))
    reference = {
        "how_made": (f"Computed once from {SOURCE} by bench/make_test_slices.py: the entries of "
                     "te_bench/reference_scores/flowers17.json for exactly the 11 models of "
                     f"examples/{EXAMPLE.name} and tests/data/flowers17_extra.npz, numbers unchanged; "
                     "'note' is that file's note (its paths written relative to the benchmark)."),
        "note": _relative(ref_doc["note"]),
        "target": ref_doc["target"],
        "models": {m: ref_doc["models"][m] for m in models},
    }

    gt_doc = json.loads((bench / "groundtruth.json").read_text(encoding="utf-8"))
    complete = [t for t, d in gt_doc["details"].items() if isinstance(d, dict) and d.get("complete") is True]
    groundtruth = {
        "how_made": (f"Computed once from {SOURCE} by bench/make_test_slices.py: te_bench/groundtruth.json "
                     "cut to the targets whose truth is complete, their tables and details, numbers "
                     "unchanged."),
        "details": _relative_all({t: gt_doc["details"][t] for t in complete}),
        **{t: gt_doc[t] for t in complete},
    }
    return {"flowers17_extra.npz": features, "flowers17_reference.json": reference,
            "groundtruth.json": groundtruth}


def write(files, out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if name.endswith(".npz"):
            np.savez_compressed(out / name, **content)
        else:
            (out / name).write_text(json.dumps(content, indent=1) + "\n", encoding="utf-8")
        print(f"{out / name}: {(out / name).stat().st_size} bytes")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="bench/make_test_slices.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", metavar="DIR", help="the folder holding te_bench/ (or te_bench/ itself); "
                    "default: a folder named shared beside this checkout")
    ap.add_argument("--out", metavar="DIR", default=str(OUT), help="where to write (default: tests/data/)")
    args = ap.parse_args(argv)
    try:
        files = make(accuracy.find_bench_dir(args.shared))
    except (FileNotFoundError, ValueError) as e:
        print(f"bench/make_test_slices.py: error: {e}", file=sys.stderr)
        return 1
    write(files, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

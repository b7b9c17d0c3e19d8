"""The README's command regions, made by running the commands they show (offline, on the bundled example).

    python bench/readme_regions.py --readme README.md            # the demo and the brief's command
    python bench/readme_regions.py --readme README.md --tests    # ... and the test suite's summary line

Regions (each between <!-- NAME:begin --> and <!-- NAME:end -->, each naming the command that made it):
  demo   `python itm.py`: the bundled example (what `make demo` runs), progress lines and table as printed;
  brief  `python itm.py --features feats.npz --labels y.npy` on three of the example's models, written to
         feats.npz (no labels inside) and y.npy in a temporary folder;
  tests  the last line of `python -m pytest tests -q` (what `make test` runs), with its date.
The trust table (bench/accuracy.py --readme) and the speed table (bench/bench_itm.py --readme) have their
own regions and scripts.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import itm  # noqa: E402
import report  # noqa: E402  (bench/report.py: replace_region, the atomic write)

BRIEF_MODELS = ("tv_mnv2_in1k", "mnv1_025_in1k_q", "c10_resnet44")


def run(argv, cwd):
    """A command's stdout and stderr, interleaved as a terminal shows them; fails loudly."""
    out = subprocess.run(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if out.returncode != 0:
        raise SystemExit(f"readme_regions: `{' '.join(argv)}` exited {out.returncode}:\n{out.stdout}")
    return out.stdout.rstrip("\n")


def block(command, output, note):
    return "\n".join(["```", f"$ {command}", output, "```", note])


def demo():
    out = run([sys.executable, "itm.py"], ROOT)
    return block("python itm.py", out, "(`make demo` runs this command; progress goes to stderr, the table to "
                 f"stdout; the seconds are those of `python bench/readme_regions.py` on {time.strftime('%Y-%m-%d')}"
                 f", {os.cpu_count()} cores.)")


def brief():
    sets, labels = itm.load_features(os.path.join(ROOT, "examples", "flowers17_8models.npz"),
                                     models=list(BRIEF_MODELS))
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(os.path.join(tmp, "feats.npz"), **sets)
        np.save(os.path.join(tmp, "y.npy"), labels)
        out = run([sys.executable, os.path.join(ROOT, "itm.py"), "--features", "feats.npz", "--labels", "y.npy"],
                  tmp)
    return block("python itm.py --features feats.npz --labels y.npy", out,
                 f"(feats.npz: {len(BRIEF_MODELS)} of the bundled example's models, {labels.size} × D float16 "
                 f"arrays; y.npy: their {labels.size} labels; made and run by `python bench/readme_regions.py`.)")


def tests():
    out = run([sys.executable, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider"], ROOT)
    return (f"`python -m pytest tests -q` (what `make test` runs after installing), {time.strftime('%Y-%m-%d')}, "
            f"{os.cpu_count()} cores: `{out.splitlines()[-1].strip('= ')}`")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--readme", required=True, metavar="PATH")
    p.add_argument("--tests", action="store_true", help="also run the test suite (minutes) for its region")
    args = p.parse_args(argv)
    regions = {"demo": demo, "brief": brief, **({"tests": tests} if args.tests else {})}
    for name in regions:
        report.check_region(args.readme, "--readme", f"<!-- {name}:begin -->", f"<!-- {name}:end -->")
    for name, make in regions.items():
        report.update_region(args.readme, make(), f"<!-- {name}:begin -->", f"<!-- {name}:end -->")
        print(f"replaced the {name} region of {args.readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

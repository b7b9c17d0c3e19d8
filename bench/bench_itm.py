"""Speed of itm.py: pytest-benchmark cases, and a script that writes the speed tables (README.md, docs/speed.md).

    pytest bench/bench_itm.py --benchmark-only        # the cases below, medians by pytest-benchmark
    python bench/bench_itm.py [--rounds 3] [--quick]  # the speed tables: ITM vs its FLOP floor vs torch
    python bench/bench_itm.py --readme README.md --docs docs/speed.md   # ... written into their regions
    python bench/bench_itm.py --compare OTHER/itm.py   # this itm.py against another, interleaved

Features are synthetic float32 arrays shaped like the paper's targets (CIFAR-100 on ResNet-50: N=50,000,
D=2048, K=100), class-structured so that training behaves as on real data. The FLOP floor is the same count
of the only large products ITM must do — X @ W_z and Xᵀ @ dA for every training iteration, X @ W_z
for every scoring batch — timed alone, in the same process. "eigh alone" times the float64
eigendecompositions DESIGN.md §2 requires (one per training step and per scoring batch), which lie on the
critical path between those products: floor + eigh is a lower bound for any implementation of DESIGN.md §2.
The default protocol trains one model per fold (k = Config.folds), so its floor is k × the floor of one
fold's plan; the script sets the default beside k × floor and beside the paper's single-split protocol
(preset "paper"). It also times itm.rank over 4 models with jobs=1 and jobs=2 (throughput when ranking a zoo).
Ratios are what to read; absolute seconds depend on the machine and on what else runs on it.
"""
import argparse
import contextlib
import importlib.util
import os
import subprocess
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import itm  # noqa: E402
import report  # noqa: E402  (bench/report.py: the docs' regions)

SPEED_BEGIN, SPEED_END = "<!-- speed:begin -->", "<!-- speed:end -->"

SHAPES = {  # name: (N, D, K)
    "cifar100_r50": (50_000, 2048, 100),
    "k10_d768": (50_000, 768, 10),
    "sun397_d768": (76_000, 768, 397),
}


def synthetic(N, D, K, seed=0, y=None):
    """Class means plus noise, rectified like pooled CNN features; float32, built without N×D temporaries
    beyond the result itself. Labels are drawn from the seed unless given."""
    rng = np.random.default_rng(seed)
    if y is None:
        y = np.arange(N) % K
        rng.shuffle(y)
    means = (0.35 * rng.standard_normal((K, D))).astype(np.float32)
    F = rng.standard_normal((N, D), dtype=np.float32)
    for start in range(0, N, 8192):
        block = F[start:start + 8192]
        block += means[y[start:start + 8192]]
        np.maximum(block, 0, out=block)
    return F, y


def synthetic_dense(N=2000, h=14, w=14, D=768, K=12, seed=0):
    """Segmentation-shaped input: N×h×w×D float16 features (what extract.py --dense writes) whose class
    means separate blocks of a label map, and N×4h×4w uint8 label maps with some ignored pixels."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, K, (N, h, w)).astype(np.uint8)
    maps = np.kron(grid, np.ones((4, 4), dtype=np.uint8))
    maps[rng.random(maps.shape) < 0.1] = 255
    means = (0.35 * rng.standard_normal((K, D))).astype(np.float32)
    F = np.empty((N, h, w, D), dtype=np.float16)
    for start in range(0, N, 100):
        block = rng.standard_normal((min(100, N - start), h, w, D), dtype=np.float32)
        F[start:start + 100] = np.maximum(block + means[grid[start:start + 100]], 0)
    return F, maps


def flop_floor(F, plan, cfg):
    """The large products of a default run, alone: the same shapes and counts, no other work."""
    rng = np.random.default_rng(1)
    D, Z = plan.params[0].shape
    W = rng.standard_normal((D, Z)).astype(F.dtype)
    dA = rng.standard_normal((cfg.batch_size, Z)).astype(F.dtype)
    buf = np.empty((cfg.batch_size, D), dtype=F.dtype)
    start = time.perf_counter()
    for rows in plan.batches:
        np.take(F, rows, axis=0, out=buf)
        buf @ W                                       # X @ W_z (X: a batch of features, the paper's E_b)
        buf.T @ dA                                    # Xᵀ @ dA
    checkpoints = -(-cfg.iterations // cfg.eval_every)
    score = F[plan.score_idx]
    for _ in range(checkpoints):
        score @ W                                     # the scoring passes
    return time.perf_counter() - start


def folds_floor(F, plans, cfg):
    """k × the floor: flop_floor of every fold's plan (each fold trains as many iterations on (k−1)/k of
    the rows and scores its own 1/k)."""
    return sum(flop_floor(F, plan, cfg) for plan in plans)


def spectral_floor(plan, cfg):
    """The float64 eigendecompositions DESIGN.md §2 requires, alone: one per training step and one per scoring
    batch (of the Z×Z Gram when Z ≤ B, else of the B×B kernel), on one BLAS thread as ITM runs them.
    No schedule takes them off the critical path: a step's eigh needs that step's X @ W_z, and the
    next step's products need the update that follows it. So floor + this is a lower bound for ITM."""
    rng = np.random.default_rng(2)
    Z, B = plan.params[0].shape[1], cfg.batch_size
    score_sizes = [min(B, plan.score_idx.size - s) for s in range(0, plan.score_idx.size, B)]
    sizes = [min(len(rows), Z) for rows in plan.batches]
    sizes += [min(b, Z) for b in score_sizes] * -(-cfg.iterations // cfg.eval_every)
    mats = {m: (lambda A: A @ A.T / m)(rng.standard_normal((m, m))) for m in set(sizes)}
    with itm.one_blas_thread():
        start = time.perf_counter()
        for m in sizes:
            np.linalg.eigh(mats[m])
        return time.perf_counter() - start


def torch_naive_seconds(F, y, cfg, iterations=5):
    """tests/itm_torch_ref.py (the naive n-step loop with autograd) in float32 on all cores: `iterations`
    training steps and one scoring pass, scaled to the full run (cfg.iterations steps, one pass per
    checkpoint)."""
    import torch
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    import itm_torch_ref as ref
    torch.set_num_threads(os.cpu_count())
    ref.DT = torch.float32
    plan = itm.make_plan(F, y, cfg)
    X = ref.features_of(F, plan, cfg)                  # the preprocessed features, once (not timed)
    params = [ref.t(p).requires_grad_(True) for p in plan.params]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = time.perf_counter()
    for rows in plan.batches[:iterations]:
        labels = torch.as_tensor(plan.y[rows])
        opt.zero_grad()
        logits = ref.logits_of(params, ref.batch_features(X, rows, cfg.normalize), labels,
                               ref.t(plan.centres), ref.t(plan.q), cfg, plan.n)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        opt.step()
    per_iteration = (time.perf_counter() - start) / iterations
    start = time.perf_counter()
    ref.accuracy(F, plan, cfg, params, features=X)
    per_pass = time.perf_counter() - start
    checkpoints = -(-cfg.iterations // cfg.eval_every)
    return per_iteration * cfg.iterations + per_pass * checkpoints


def rank_seconds_per_model(N, D, K, models, jobs):
    """itm.rank over `models` synthetic models of one shape (same labels), wall seconds per model."""
    y = synthetic(N, D, K)[1]
    zoo = {f"m{i}": synthetic(N, D, K, seed=i, y=y)[0] for i in range(models)}
    start = time.perf_counter()
    itm.rank(zoo, y, jobs=jobs)
    return (time.perf_counter() - start) / models


def peak_memory_mb(N, D, K):
    """Peak RSS (VmHWM: ru_maxrss would include the parent's RSS at fork) of a fresh process: after
    building the features, and after scoring them once."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            "import bench_itm as b, itm; "
            "hwm = lambda: int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) / 1024; "
            f"F, y = b.synthetic({N}, {D}, {K}); before = hwm(); itm.itm_score(F, y); "
            "print(before, hwm())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = map(float, out.stdout.split())
    return before, after, N * D * 4 / 2 ** 20


# ---------------------------------------------------------------------------------------------------
# pytest-benchmark cases

@pytest.fixture(scope="module", params=list(SHAPES))
def data(request):
    F, y = synthetic(*SHAPES[request.param])
    itm.itm_score(F[:4096], y[:4096], iterations=2, eval_every=1)   # compile the kernels first
    return request.param, F, y


def test_itm_default(benchmark, data):
    name, F, y = data
    result = benchmark.pedantic(itm.itm_score, args=(F, y), rounds=3, iterations=1)
    benchmark.extra_info.update(shape=name, score=result.score, n=result.n)


def test_flop_floor(benchmark, data):
    name, F, y = data
    cfg = itm.Config()
    plan = itm.make_plan(F, y, cfg)
    benchmark.pedantic(flop_floor, args=(F, plan, cfg), rounds=3, iterations=1)
    benchmark.extra_info.update(shape=name)


def test_itm_paper_protocol(benchmark, data):
    name, F, y = data
    result = benchmark.pedantic(itm.itm_score, args=(F, y, itm.preset("paper")), rounds=3, iterations=1)
    benchmark.extra_info.update(shape=name, score=result.score, n=result.n)


def test_folds_floor(benchmark, data):
    name, F, y = data
    cfg = itm.Config()
    plans = [itm.make_plan(F, y, cfg, fold=f) for f in range(cfg.folds)]
    benchmark.pedantic(folds_floor, args=(F, plans, cfg), rounds=3, iterations=1)
    benchmark.extra_info.update(shape=name)


def test_spectral_floor(benchmark, data):
    name, F, y = data
    cfg = itm.Config()
    benchmark.pedantic(spectral_floor, args=(itm.make_plan(F, y, cfg), cfg), rounds=3, iterations=1)
    benchmark.extra_info.update(shape=name)


def test_itm_numpy_only(benchmark, data, monkeypatch):
    name, F, y = data
    monkeypatch.setattr(itm, "USE_NUMBA", False)
    benchmark.pedantic(itm.itm_score, args=(F, y), rounds=1, iterations=1)
    benchmark.extra_info.update(shape=name)


def test_torch_naive_scaled(benchmark, data):
    pytest.importorskip("torch", reason="the naive reference needs torch (extra 'test')")
    name, F, y = data
    seconds = benchmark.pedantic(torch_naive_seconds, args=(F, y, itm.Config()), rounds=1, iterations=1)
    benchmark.extra_info.update(shape=name, scaled_full_run_seconds=seconds)


@pytest.mark.parametrize("K", [17, 100])
@pytest.mark.parametrize("twin", ["softmax_ce", "theta_and_targets"])
@pytest.mark.parametrize("path", ["numpy", "numba"])
def test_twin(benchmark, monkeypatch, path, twin, K):
    """One call of a dispatched element-wise step at a batch of B = 256, with and without its numba twin:
    the speed section keeps a twin only where it measures faster (K = 17 is flowers17's, 100 CIFAR-100's)."""
    if path == "numba" and not itm.HAVE_NUMBA:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(itm, "USE_NUMBA", path == "numba")
    rng = np.random.default_rng(0)
    A, y = rng.standard_normal((256, K)).astype(np.float32), rng.integers(0, K, 256)
    args = (A, y) if twin == "softmax_ce" else (A, np.eye(K), y, True)
    fn = getattr(itm, twin)
    fn(*args)                                                      # compile first
    benchmark.pedantic(fn, args=args, rounds=20, iterations=200)
    benchmark.extra_info.update(twin=twin, K=K, path=path)


@pytest.fixture(scope="module")
def dense():
    F, maps = synthetic_dense()
    itm.itm_score(F[:40], maps[:40], iterations=2, eval_every=1)
    return F, maps


def test_dense_segmentation(benchmark, dense):
    """2,000 images × 14×14 positions × D=768, K=12: the issue's dense case."""
    F, maps = dense
    result = benchmark.pedantic(itm.itm_score, args=(F, maps), rounds=1, iterations=1)
    benchmark.extra_info.update(score=result.score, n=result.n)


def flattened(F, maps):
    """The labelled positions of a dense input as a plain classification problem (rows × D, labels)."""
    grid = itm.downsample_labels(maps, F.shape[1], F.shape[2]).reshape(-1)
    keep = np.flatnonzero(grid != itm.IGNORE)
    return F.reshape(-1, F.shape[-1])[keep], grid[keep]


def test_dense_equivalent_classification(benchmark, dense):
    """The same labelled positions as a classification run: same samples, iterations, D and K."""
    F, y = flattened(*dense)
    benchmark.pedantic(itm.itm_score, args=(F, y), rounds=1, iterations=1)


# ---------------------------------------------------------------------------------------------------
# The speed tables

def median_seconds(rounds, fn, *args):
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def shape_values(N, D, K, rounds, with_torch):
    """One shape's timings: the default (k folds) beside k × its floors, the paper protocol (one split)
    beside its floor, the NumPy-only default, the naive torch run of the paper protocol (seconds)."""
    F, y = synthetic(N, D, K)
    itm.itm_score(F[:4096], y[:4096], iterations=2, eval_every=1)
    cfg, paper = itm.Config(), itm.preset("paper")
    plans = [itm.make_plan(F, y, cfg, fold=f) for f in range(cfg.folds)]
    v = dict(shape=shape_name(N, D, K), ours=median_seconds(rounds, itm.itm_score, F, y, cfg),
             floor=float(np.median([folds_floor(F, plans, cfg) for _ in range(rounds)])),
             eigh=float(np.median([sum(spectral_floor(p, cfg) for p in plans) for _ in range(rounds)])),
             paper=median_seconds(rounds, itm.itm_score, F, y, paper))
    paper_plan = itm.make_plan(F, y, paper)
    v["paper_floor"] = float(np.median([flop_floor(F, paper_plan, paper) for _ in range(rounds)]))
    itm.USE_NUMBA = False
    v["numpy_only"] = median_seconds(1, itm.itm_score, F, y, cfg)
    itm.USE_NUMBA = itm.HAVE_NUMBA
    v["naive"] = torch_naive_seconds(F, y, paper) if with_torch else float("nan")
    return v


FULL_HEADER = ("| features (N × D, K) | ITM default s (k = {k} folds) | k × FLOP floor s | ITM / floor | "
               "k × (floor + eigh) s | ITM / (floor + eigh) | paper protocol s (one split) | its floor s | "
               "paper / floor | default / paper | NumPy-only default s | torch naive s (paper protocol, scaled) | "
               "torch / ITM paper |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def full_row(v):
    return (f"| {v['shape']} | {v['ours']:.2f} | {v['floor']:.2f} | {v['ours'] / v['floor']:.2f} | "
            f"{v['floor'] + v['eigh']:.2f} | {v['ours'] / (v['floor'] + v['eigh']):.2f} | {v['paper']:.2f} | "
            f"{v['paper_floor']:.2f} | {v['paper'] / v['paper_floor']:.2f} | {v['ours'] / v['paper']:.2f} | "
            f"{v['numpy_only']:.2f} | {v['naive']:.1f} | {v['naive'] / v['paper']:.1f}× |")


def short_table(values, dense_seconds):
    """The README's table: at most four rows, seconds per model."""
    lines = [f"| features (N × D, K) | ITM default, {itm.Config().folds} folds | paper protocol, one split | "
             "naive torch (paper protocol) |", "|---|---|---|---|"]
    lines += [f"| {v['shape']} | {v['ours']:.1f} s | {v['paper']:.1f} s | {v['naive']:.0f} s |" for v in values]
    return lines + [f"| segmentation: 2,000 images × 14×14 × 768, K=12 | {dense_seconds:.1f} s | — | — |"]


def machine():
    """This machine in words: the CPU model, its cores, numpy's and numba's versions."""
    model = "unknown CPU"
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    numba = f", numba {itm.numba.__version__}" if itm.HAVE_NUMBA else ", without numba"
    return f"{model}, {os.cpu_count()} cores, numpy {np.__version__}{numba}"


def stamp(argv, rounds):
    return (f"Measured by `python bench/bench_itm.py{''.join(' ' + a for a in argv)}` on "
            f"{time.strftime('%Y-%m-%d')} ({machine()}); medians of {rounds} runs, seconds per model, "
            "synthetic float32 features of the given shape, 500 iterations, B = 256.")


BRIEF_SECONDS = 8.0   # the project's brief: one model of the CIFAR-100 shape in at most this (DESIGN.md §1c)


def cost_table(rounds, folds=(1, 2, 3, 4, 5), readings=()):
    """DESIGN.md §1c's cost: seconds to score one model of the CIFAR-100 shape with each fold count (the
    default reading otherwise), each preset, and each extra reading (name, Config overrides), medians of
    `rounds`."""
    F, y = synthetic(*SHAPES["cifar100_r50"])
    itm.itm_score(F[:4096], y[:4096], iterations=2, eval_every=1)
    configs = [(f"folds={k}", itm.Config(folds=k)) for k in folds]
    configs += [(f"preset={p}", itm.preset(p)) for p in ("paper", "authors")]
    configs += [(name, itm.Config(**change)) for name, change in readings]
    lines = ["| Config (the rest: the default) | seconds, CIFAR-100 shape | within the brief (≤ 8 s) |",
             "|---|---|---|"]
    for name, cfg in configs:
        seconds = median_seconds(rounds, itm.itm_score, F, y, cfg)
        lines.append(f"| {name} | {seconds:.2f} | {'yes' if seconds <= BRIEF_SECONDS else 'no'} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def compare(other_path, rounds, shapes):
    """This itm.py against another (a file path: e.g. a worktree of an earlier commit), interleaved in one
    process, the default Config and the paper preset at each shape: medians of `rounds`."""
    spec = importlib.util.spec_from_file_location("itm_other", other_path)
    other = sys.modules["itm_other"] = importlib.util.module_from_spec(spec)   # dataclasses look it up
    spec.loader.exec_module(other)
    lines = ["| features (N × D, K) | Config | this itm.py s | other itm.py s | this / other |", "|---|---|---|---|---|"]
    for name in shapes:
        F, y = synthetic(*SHAPES[name])
        for module in (itm, other):
            module.itm_score(F[:4096], y[:4096], iterations=2, eval_every=1)
        for label in ("default", "paper"):
            times = {itm: [], other: []}
            for _ in range(rounds):
                for module in (itm, other):
                    times[module].append(median_seconds(1, module.itm_score, F, y, module.preset(label)))
            a, b = (float(np.median(times[m])) for m in (itm, other))
            lines.append(f"| {shape_name(*SHAPES[name])} | {label} | {a:.2f} | {b:.2f} | {a / b:.3f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def shape_name(N, D, K):
    """A shape as the tables write it: "50,000 × 2048, K=100"."""
    return f"{N:,} × {D}, K={K}"


def dense_line(rounds):
    F, maps = synthetic_dense()
    itm.itm_score(F[:40], maps[:40], iterations=2, eval_every=1)
    dense_s = median_seconds(rounds, itm.itm_score, F, maps)
    rows, labels = flattened(F, maps)
    cls_s = median_seconds(1, itm.itm_score, rows, labels)
    line = (f"segmentation, 2,000 images × 14×14 × D=768, K=12 (float16): {dense_s:.2f} s; the same labelled "
            f"positions as a classification run, same iterations: {cls_s:.2f} s (ratio {dense_s / cls_s:.2f})")
    return dense_s, line


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="only the CIFAR-100-shaped case")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--cost", action="store_true", help="only DESIGN.md §1c's cost table: one model of the "
                   "CIFAR-100 shape with folds 1–5, the presets and the §1d reading")
    p.add_argument("--compare", metavar="ITM_PY", help="only: this itm.py against another itm.py file, "
                   "interleaved (the default and the paper preset at the CIFAR-100 and K=10 shapes)")
    p.add_argument("--readme", metavar="PATH", help="write the short table into the <!-- speed:begin/end --> "
                   "region of this file (README.md)")
    p.add_argument("--docs", metavar="PATH", help="write every table into the <!-- speed:begin/end --> "
                   "region of this file (docs/speed.md)")
    args = p.parse_args(argv)
    for option, path in (("--readme", args.readme), ("--docs", args.docs)):
        if path:
            report.check_region(path, option, SPEED_BEGIN, SPEED_END)
    if args.cost:
        print(cost_table(args.rounds, readings=[("c_scale=B/Z, score_by=centres",
                                                  dict(c_scale="B/Z", score_by="centres"))]))
        return 0
    if args.compare:
        print(compare(args.compare, args.rounds, ["cifar100_r50", "k10_d768"]))
        return 0
    shown = [a for a in argv if not a.startswith(("--readme", "--docs")) and a not in (args.readme, args.docs)]
    full = [stamp(shown, args.rounds), "", FULL_HEADER.format(k=itm.Config().folds)]
    values = []
    for name in (["cifar100_r50"] if args.quick else SHAPES):
        values.append(shape_values(*SHAPES[name], args.rounds, not args.no_torch))
        full.append(full_row(values[-1]))
        print(full[-1], file=sys.stderr, flush=True)
    dense_s, line = dense_line(1)
    N, D, K = SHAPES["cifar100_r50"]
    one, two = (rank_seconds_per_model(N, D, K, 4, jobs) for jobs in (1, 2))
    before, after, feats = peak_memory_mb(*SHAPES["cifar100_r50"])
    full += ["", line, "", f"ranking 4 models of the CIFAR-100 shape: {one:.2f} s per model with jobs=1, "
             f"{two:.2f} s per model with jobs=2 (two processes, one BLAS thread each)", "",
             f"peak RSS (CIFAR-100 shape): {before:.0f} MB after building the {feats:.0f} MB features, "
             f"{after:.0f} MB after scoring (budget 1.2 × features + 300 MB above the interpreter)"]
    print("\n".join(full))
    if args.readme:
        report.update_region(args.readme, "\n".join([stamp(shown, args.rounds), ""] + short_table(values, dense_s)),
                             SPEED_BEGIN, SPEED_END)
    if args.docs:
        report.update_region(args.docs, "\n".join(full), SPEED_BEGIN, SPEED_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where one fold of the default ITM run spends its time: cProfile of its training run (scoring passes
included) on one BLAS thread, plus the scoring passes alone.

    python bench/profile_itm.py [N D K]        # default 50000 2048 100 (the CIFAR-100/ResNet-50 shape)

docs/speed.md's "where the time goes" comes from this script (synthetic features, bench_itm.py's).
"""
import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_itm  # noqa: E402
from bench_itm import itm  # noqa: E402


def main(argv=None):
    N, D, K = map(int, (argv or sys.argv[1:]) or (50_000, 2048, 100))
    E, y = bench_itm.synthetic(N, D, K)
    itm.itm_score(E[:4096], y[:4096], iterations=2, eval_every=1)   # compile the kernels first
    cfg = itm.Config()
    start = time.perf_counter()
    plan = itm.make_plan(E, y, cfg)
    print(f"make_plan: {time.perf_counter() - start:.2f} s")
    model = itm._Model(plan)
    with itm.one_blas_thread(itm._small_products(cfg.batch_size, D, plan.params[0].shape[1])):
        start = time.perf_counter()
        for _ in range(-(-cfg.iterations // cfg.eval_every)):
            model.score(plan.params)
        print(f"the scoring passes alone: {time.perf_counter() - start:.2f} s")
    profile = cProfile.Profile()
    with itm.one_blas_thread():           # as each fold runs when the folds run at once
        start = time.perf_counter()
        profile.runcall(itm.train, plan)
        print(f"train, one BLAS thread: {time.perf_counter() - start:.2f} s (under cProfile)")
    pstats.Stats(profile).sort_stats("tottime").print_stats(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())

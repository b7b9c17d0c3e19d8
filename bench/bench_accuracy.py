"""Timing side of the accuracy harness: ITM vs each baseline on one real te_bench target.

    pytest bench/bench_accuracy.py --benchmark-only

One model of the first target with enough ground truth (flowers17 when present; the widest model, the
slowest for every method): ITM with the default Config (seed 0) and every applicable baseline of
baselines.py (pool-relative ones as their parts + combine over that one model), 3 rounds after a warm-up
(numba compiles outside the timed rounds). Skipped when the benchmark folder is absent. The whole-pool
seconds per method are in the tables that `python bench/accuracy.py` prints.
"""
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402
import itm  # noqa: E402


def _target():
    try:
        targets, _, _ = accuracy.load_targets(accuracy.find_bench_dir())
    except FileNotFoundError:
        return None
    if not targets:
        return None
    return next((t for t in targets if t.name == "flowers17"), targets[0])


TARGET = _target()
METHODS = [m for m in accuracy.baseline_names() if m not in accuracy.NOT_APPLICABLE]


def _widest(target):
    model = max(target.features, key=lambda m: target.features[m].shape[1])
    return model, target.features[model], target.labels


def _one_model(method, model, feats, labels):
    """A call that scores one model with `method`; skips when baselines.py lacks it."""
    if accuracy.baselines is None:
        pytest.skip(f"baselines.py not importable: {accuracy.BASELINES_ERROR}")
    fn = accuracy.baseline_fn(method)
    if fn is None:
        pytest.skip(f"{method} not in baselines.py")
    if method in accuracy.POOL_RELATIVE:
        return lambda: accuracy.baselines.combine(method, {model: fn(feats, labels)})[model]
    return lambda: fn(feats, labels)


@pytest.mark.skipif(TARGET is None, reason="no te_bench target with enough ground truth")
@pytest.mark.parametrize("method", ["itm"] + METHODS)
def test_score_one_model(benchmark, method):
    model, feats, labels = _widest(TARGET)
    benchmark.extra_info.update(target=TARGET.name, model=model, shape=list(feats.shape))
    if method == "itm":
        fn = lambda: itm.itm_score(feats, labels, seed=0).score  # noqa: E731
    else:
        fn = _one_model(method, model, feats, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score = benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    assert score == score  # finite or at least not NaN

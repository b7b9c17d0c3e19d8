"""Benchmarks for kendall.py (run: ``python -m pytest bench --benchmark-only``; not part of the test run).

Target: ``stability`` over the C(14, 10) = 1001 subsets for 8 methods in <= 50 ms after compilation
(the study behind Fig. 3 of the ITM paper).  The pool is the 11 supervised CNNs of SFDA's table on
cifar100 plus 3 ViTs of EMMS's table (published accuracies, bench/data), with 8 seeded noisy scores.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so `pytest bench` works without an installed package
    sys.path.insert(0, str(ROOT))

import kendall  # noqa: E402


def pool(n_methods=8, seed=0):
    tables = json.loads((ROOT / "bench" / "data" / "finetune_acc_tables.json").read_text())
    truth = dict(tables["sfda_group1"]["cifar100"])
    truth.update({m: tables["emms_vit"]["cifar100"][m] for m in ("deit_small", "swin_t", "pvt_tiny")})
    rng = np.random.default_rng(seed)
    g = np.array(list(truth.values()))
    scores = {f"method{i}": dict(zip(truth, g + rng.normal(0, 1 + i, g.size))) for i in range(n_methods)}
    return scores, truth


@pytest.mark.parametrize("backend", ["kernel", "numpy"])
def test_stability_1001_subsets_8_methods(benchmark, monkeypatch, backend):
    monkeypatch.setattr(kendall, "HAVE_NUMBA", backend == "kernel" and kendall.numba is not None)
    scores, truth = pool()
    kendall.stability(scores, truth, k=10)  # compile (numba) outside the timed runs
    res = benchmark(kendall.stability, scores, truth, k=10)
    assert res["subsets"].shape == (1001, 10) and len(res["tau"]) == 8


def test_weighted_tau_200_models(benchmark):
    rng = np.random.default_rng(0)
    s, g = rng.standard_normal(200), rng.uniform(50, 95, 200)
    kendall.weighted_tau(s, g)  # compile
    assert -1.0 <= benchmark(kendall.weighted_tau, s, g) <= 1.0

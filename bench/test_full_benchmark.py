"""The real-feature tests of tests/ on the whole offline benchmark (te_bench), and the check that the
committed tests/data/ still equals what bench/make_test_slices.py makes from it.

    python -m pytest bench/test_full_benchmark.py        # te_bench/ beside the checkout (../shared)

`make test` runs these tests on 11 of flowers17's 21 models (the bundled example and tests/data/); here
they run, unchanged, on all 21 models and the benchmark's whole groundtruth.json: the functions are
tests/'s own, collected here with this module's `flowers` and `bench_groundtruth` fixtures. Skipped when
the benchmark folder is absent (a clone has none); .ci/run runs this file where it is there.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
import accuracy  # noqa: E402
import make_test_slices  # noqa: E402
import test_baselines  # noqa: E402
import test_kendall  # noqa: E402

try:
    BENCH = accuracy.find_bench_dir()
except FileNotFoundError:
    BENCH = None
pytestmark = pytest.mark.skipif(BENCH is None, reason="no te_bench/ beside the checkout (../shared)")

# collected here, with the fixtures below
test_published_codes_on_real_features = test_baselines.test_published_codes_on_real_features
test_logme_default_on_real_features = test_baselines.test_logme_default_on_real_features
test_ncti_parts_on_real_features = test_baselines.test_ncti_parts_on_real_features
test_cli_reads_the_bench_ground_truth = test_kendall.test_cli_reads_the_bench_ground_truth


@pytest.fixture(scope="module")
def flowers():
    """All 21 models of the benchmark's flowers17 and the published codes' outputs on them."""
    data = test_baselines.load_flowers([BENCH / "features" / "flowers17.npz"],
                                       BENCH / "reference_scores" / "flowers17.json")
    assert len(data[0]) == 21
    return data


@pytest.fixture
def bench_groundtruth():
    """The benchmark's whole ground-truth file."""
    return BENCH / "groundtruth.json"


def test_flowers_fixture_covers_what_the_tests_name(flowers):
    """The 21 models hold every NCTI_EXACT model: the exact-set check is the published one (6 models)."""
    assert test_baselines.NCTI_EXACT <= set(flowers[0]) and len(test_baselines.NCTI_EXACT) == 6


def test_committed_test_data_is_what_the_script_makes():
    made = make_test_slices.make(BENCH)
    data = ROOT / "tests" / "data"
    with np.load(data / "flowers17_extra.npz") as npz:
        committed = {k: npz[k] for k in npz.files}
    expected = made["flowers17_extra.npz"]
    assert sorted(committed) == sorted(expected)
    for k, a in expected.items():
        assert committed[k].dtype == a.dtype and np.array_equal(committed[k], a), k
    for name in ("flowers17_reference.json", "groundtruth.json"):
        assert json.loads((data / name).read_text(encoding="utf-8")) == made[name], name

"""The tools chain: itm.py --json and baselines.py --json print one scores shape,
{"dataset": NAME, "scores": {method: {model: score or null}}, ...}, which kendall.py --scores reads
(several files at once) against a ground-truth file whose table the scores' dataset names.

Run in-process (each module's main(argv), stdout captured) and as one real shell chain of subprocesses.
"""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import baselines
import itm
import kendall

ROOT = Path(__file__).resolve().parents[1]
ITM_ARGS = ["--iterations", "20", "--batch-size", "32", "--eval-every", "10", "--folds", "1", "--quiet"]
METHODS = ["logme", "sfda", "hscore"]
SEPARATION = {"m0": 0.1, "m1": 0.5, "m2": 1.0, "m3": 2.0}    # class separation of each synthetic model
TRUTH = {"m0": 0.31, "m1": 0.55, "m2": 0.78, "m3": 0.93}     # "fine-tuned accuracy": grows with it
OTHER = {"m0": 0.90, "m1": 0.20, "m2": 0.50, "m3": 0.40}     # a second table, which must not be picked


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """zoo.npz (4 models, 4 classes × 40 samples, 16-D, seeded) and groundtruth.json with two tables."""
    folder = tmp_path_factory.mktemp("pipeline")
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 40)
    centres = rng.standard_normal((4, 16))
    arrays = {m: (sep * centres[y] + rng.standard_normal((y.size, 16))).astype(np.float32)
              for m, sep in SEPARATION.items()}
    np.savez(folder / "zoo.npz", labels=y, **arrays)
    (folder / "groundtruth.json").write_text(json.dumps(
        {"protocol": {"note": "synthetic", "splits": 1}, "zoo": TRUTH, "other": OTHER}))
    return folder


def run_main(main, argv, capsys):
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def check_shape(doc, methods):
    """The common scores shape, on the zoo: its dataset, its methods, every model scored or null."""
    assert doc["dataset"] == "zoo"
    assert list(doc["scores"]) == methods
    for scores in doc["scores"].values():
        assert set(scores) == set(SEPARATION)
        assert all(v is None or isinstance(v, float) for v in scores.values())


def expected_tau(docs):
    """τ_w of every method against the 'zoo' table, on the models it scored (null = dropped)."""
    out = {}
    for doc in docs:
        for method, scores in doc["scores"].items():
            kept = {m: v for m, v in scores.items() if v is not None}
            out[method] = kendall.weighted_tau(kept, {m: TRUTH[m] for m in kept})
    return out


def test_in_process_chain(zoo, tmp_path, capsys):
    npz, truth = str(zoo / "zoo.npz"), str(zoo / "groundtruth.json")
    itm_doc = json.loads(run_main(itm.main, ["--features", npz, "--json", *ITM_ARGS], capsys))
    base_doc = json.loads(run_main(baselines.main, ["--features", npz, "--json", "--methods", ",".join(METHODS)],
                                   capsys))
    check_shape(itm_doc, ["ITM"])
    check_shape(base_doc, METHODS)
    (tmp_path / "itm.json").write_text(json.dumps(itm_doc))
    (tmp_path / "base.json").write_text(json.dumps(base_doc))
    out = json.loads(run_main(kendall.main, ["--scores", str(tmp_path / "itm.json"), "--scores",
                                             str(tmp_path / "base.json"), "--truth", truth, "--json"], capsys))
    assert list(out) == ["ITM", *METHODS]
    for method, tau in expected_tau([itm_doc, base_doc]).items():
        assert out[method]["tau_w"] == {"zoo": pytest.approx(tau, abs=1e-12), "mean": pytest.approx(tau, abs=1e-12)}
    # The zoo's separations are far apart: ITM must rank it mostly right, even after 20 iterations.
    assert out["ITM"]["tau_w"]["zoo"] >= 0.5
    table = run_main(kendall.main, ["--scores", f"{tmp_path / 'itm.json'},{tmp_path / 'base.json'}",
                                    "--truth", truth], capsys)
    assert table.splitlines()[0].split() == ["tau_w", "zoo", "mean"]
    assert [line.split()[0] for line in table.splitlines()[1:5]] == ["ITM", *METHODS]


def test_subprocess_chain(zoo, tmp_path):
    """itm.py --json > itm.json; baselines.py --json > base.json; kendall.py --scores both --truth ..."""
    py = shlex.quote(sys.executable)
    q = lambda p: shlex.quote(str(p))  # noqa: E731
    features = q(zoo / "zoo.npz")
    chain = (f"{py} {q(ROOT / 'itm.py')} --features {features} --json {' '.join(ITM_ARGS)} > itm.json && "
             f"{py} {q(ROOT / 'baselines.py')} --features {features} --json --methods {','.join(METHODS)}"
             " > base.json && "
             f"{py} {q(ROOT / 'kendall.py')} --scores itm.json,base.json --truth {q(zoo / 'groundtruth.json')}"
             " --json")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # each script finds its neighbours
    proc = subprocess.run(chain, shell=True, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = json.loads(proc.stdout)
    docs = [json.loads((tmp_path / name).read_text()) for name in ("itm.json", "base.json")]
    check_shape(docs[0], ["ITM"])
    check_shape(docs[1], METHODS)
    assert list(out) == ["ITM", *METHODS]
    for method, tau in expected_tau(docs).items():
        assert out[method]["tau_w"]["zoo"] == pytest.approx(tau, abs=1e-12)

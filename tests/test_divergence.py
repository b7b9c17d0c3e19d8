"""A diverged run is NaN with a warning, never a score and never a traceback — wherever it is detected:
in a fold's plan, its training, its scoring, or the chance rate's scoring step; one fold after the other,
on threads, in forked processes, on any executor; through itm_score, rank and the CLI. And the --truth
file's failure modes: a nested file without the dataset's table, several tables, models it does not name,
an undefined τ_w — each said on stderr, never a silent NaN.
"""
import concurrent.futures as cf
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import itm

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(iterations=20, batch_size=32, eval_every=10)


def blobs(seed=0, N=300, D=12, K=3):
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(N) % K)
    return (rng.standard_normal((K, D))[y] + rng.standard_normal((N, D))).astype(np.float32), y


def assert_diverged(result, note):
    assert result.diverged and math.isnan(result.score) and result.trajectory == [], result
    assert note in result.note, result.note


def test_large_eta_is_a_diverged_result_not_an_exception():
    """η = 50 expands the propagation (η·λ_max(C) ≥ 2): on 6afa48f the chance rate's scoring step raised
    Diverged out of itm_score."""
    X, y = blobs()
    with pytest.warns(RuntimeWarning, match=r"ITM diverged \(fold 1 of 3: propagation expands"):
        r = itm.itm_score(X, y, eta=50.0, **SMALL)
    assert_diverged(r, "η·λ_max(C)")
    with pytest.warns(RuntimeWarning, match="diverged"):       # h's logits: no chance-rate step
        assert_diverged(itm.itm_score(X, y, eta=50.0, score_by="head", **SMALL), "propagation expands")


class Injected(itm.Diverged):
    pass


@pytest.mark.parametrize("where", ["_plan", "train", "predict", "uninformed"])
def test_divergence_detected_anywhere_in_a_fold(where, monkeypatch):
    """Diverged raised at each place of a fold (injected) gives a diverged Result naming the fold."""
    X, y = blobs(1)

    def boom(*args, **kwargs):
        raise Injected(f"injected in {where}")
    owner = itm._Model if where in ("predict", "uninformed") else itm
    monkeypatch.setattr(owner, where, boom)
    with pytest.warns(RuntimeWarning, match=f"injected in {where}"):
        r = itm.itm_score(X, y, **SMALL)
    assert_diverged(r, f"fold 1 of 3: injected in {where}")


@pytest.mark.parametrize("cores, fork_work", [(1, 1 << 60), (2, 1 << 60), (2, 0)],
                         ids=["serial", "threads", "forked"])
def test_divergence_in_every_fold_arrangement(cores, fork_work, monkeypatch):
    X, y = blobs(2)
    monkeypatch.setattr(itm, "cores", lambda: cores)
    monkeypatch.setattr(itm, "_FORK_WORK", fork_work)
    with pytest.warns(RuntimeWarning, match="diverged"):
        assert_diverged(itm.itm_score(X, y, eta=50.0, **SMALL), "propagation expands")


@pytest.mark.parametrize("how", ["serial", "jobs", "executor"])
def test_rank_puts_a_diverged_model_last_with_a_warning(how):
    X, y = blobs(3)
    run = {"serial": {}, "jobs": {"jobs": 2}, "executor": {"executor": cf.ThreadPoolExecutor(2)}}[how]
    # read raw and unnormalised (the literal reading), features × 1e4 make the propagation expand
    sets = {"bad": X * 1e4, "good": X}
    with pytest.warns(RuntimeWarning, match="'bad'"):
        ranking = itm.rank(sets, y, normalize="none", preprocess="none", **run, **SMALL)
    assert [name for name, _ in ranking] == ["good", "bad"]
    assert ranking[1][1].diverged and math.isnan(ranking[1][1].score) and not ranking[0][1].diverged


def cli(*argv):
    return subprocess.run([sys.executable, str(ROOT / "itm.py"), *map(str, argv)], capture_output=True, text=True,
                          cwd=ROOT)


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    X, y = blobs(4)
    path = tmp_path_factory.mktemp("div") / "toy.npz"
    np.savez(path, a=X, b=X + np.random.default_rng(0).standard_normal(X.shape).astype(np.float32), labels=y)
    return path


def test_cli_ranks_diverged_models_without_a_traceback(npz):
    """`--eta 1e6`: on 6afa48f a traceback (Diverged); now each model is ranked as diverged, with a warning
    naming it, and the exit status of any run with diverged models (0)."""
    p = cli("--features", npz, "--eta", "1e6", "--iterations", 20, "--eval-every", 10, "--quiet", "--json")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    rows = json.loads(p.stdout)["ranking"]
    assert [(r["score"], r["diverged"]) for r in rows] == [(None, True), (None, True)]
    for model in ("a", "b"):
        assert f"itm: warning: ITM diverged on model '{model}' (fold 1 of 3: propagation expands" in p.stderr


def write(path, doc):
    path.write_text(json.dumps(doc))
    return path


def test_cli_nested_truth_without_the_datasets_table(npz, tmp_path):
    """One table, named otherwise than the features: used, and said so; several, none named like the
    features: a one-line error naming them and --target; --target picks one."""
    one = write(tmp_path / "one.json", {"cifar": {"a": 0.9, "b": 0.8}, "protocol": {"note": "text"}})
    p = cli("--features", npz, "--truth", one, "--iterations", 20, "--eval-every", 10, "--quiet")
    assert p.returncode == 0 and "weighted Kendall tau_w vs fine-tuned accuracy: " in p.stdout
    assert f"itm: note: --truth {one} has no table 'toy': its only table, 'cifar', is used" in p.stderr
    two = write(tmp_path / "two.json", {"cifar": {"a": 0.9, "b": 0.8}, "pets": {"a": 0.5, "b": 0.7}})
    p = cli("--features", npz, "--truth", two, "--iterations", 20, "--quiet")
    assert p.returncode == 1 and p.stdout == "" and p.stderr.count("\n") == 1
    assert p.stderr == (f"itm: error: {two} holds 2 tables (cifar, pets) and none is named 'toy'; "
                        "pick one with --target NAME\n")
    p = cli("--features", npz, "--truth", two, "--target", "pets", "--iterations", 20, "--eval-every", 10,
            "--quiet")
    assert p.returncode == 0 and "note" not in p.stderr, p.stderr


def test_cli_truth_errors_name_the_missing_models(npz, tmp_path):
    truth = write(tmp_path / "t.json", {"a": 0.9, "zz": 0.5})
    p = cli("--features", npz, "--truth", truth, "--quiet")
    assert p.returncode == 1 and p.stderr == (
        f"itm: error: --truth {truth}: only 1 of the 2 models to rank has an accuracy there; τ_w needs at "
        "least 2 (no accuracy for b)\n")


def test_cli_undefined_tau_says_why(npz, tmp_path):
    """τ_w is NaN when every accuracy is equal, or every scored model diverged: the reason on stderr."""
    tied = write(tmp_path / "tied.json", {"a": 0.9, "b": 0.9})
    p = cli("--features", npz, "--truth", tied, "--iterations", 20, "--eval-every", 10, "--quiet")
    assert p.returncode == 0 and "tau_w vs fine-tuned accuracy: nan" in p.stdout
    assert "itm: warning: τ_w is undefined (nan): every model has the same fine-tuned accuracy, 0.9" in p.stderr
    ok = write(tmp_path / "ok.json", {"a": 0.9, "b": 0.8})
    p = cli("--features", npz, "--truth", ok, "--eta", "1e6", "--iterations", 20, "--quiet")
    assert p.returncode == 0 and "tau_w vs fine-tuned accuracy: nan" in p.stdout
    assert ("itm: warning: τ_w is undefined (nan): only 0 of the models with an accuracy has a score (the "
            "others diverged or failed)") in p.stderr


def test_run_cli_turns_an_escaped_diverged_into_one_line(capsys):
    """The last resort: a Diverged escaping a CLI's body is one line and exit 1, never a traceback."""
    def body(argv):
        raise itm.Diverged("propagation expands: η·λ_max(C) = 3 ≥ 2")
    assert itm.run_cli("itm", body, []) == 1
    assert capsys.readouterr().err == "itm: error: propagation expands: η·λ_max(C) = 3 ≥ 2\n"


def test_no_warning_without_divergence():
    X, y = blobs(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not itm.itm_score(X, y, **SMALL).diverged

"""Bad and odd input to the four command lines never ends in a Python traceback (issue 27, item 4).

The convention (itm.run_cli): an input error is one line `PROG: error: ...` on stderr and exit status 1;
a method or a run that fails on one model of a pool is reported for that model (n/a, with the reason) and
the other models are still scored.

Each test here failed on 6afa48f (a traceback, an unnamed option, or a silent wrong result), except those
that guard the per-model convention, which held already.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import baselines as B
import itm
import kendall

ROOT = Path(__file__).resolve().parents[1]

def run(script, *args, cwd=None, code=None, timeout=300, preexec_fn=None):
    """One of the CLIs in a fresh interpreter (so a traceback would be seen as such): CompletedProcess."""
    argv = [sys.executable, "-c", code, *map(str, args)] if code else [sys.executable, str(ROOT / script), *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd or ROOT, timeout=timeout,
                          preexec_fn=preexec_fn, env={**os.environ, "PYTHONPATH": str(ROOT)})


def assert_one_line_error(proc_or_err, prog, *fragments, rc=None):
    """Exit 1 (when rc is given), and stderr is exactly one `PROG: error: ...` line holding every fragment."""
    err = proc_or_err if isinstance(proc_or_err, str) else proc_or_err.stderr
    if rc is not None:
        assert rc == 1, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def pool(tmp_path):
    """Two informative models (N = 120, 3 classes) in an .npz with their labels."""
    rng = np.random.default_rng(0)
    y = np.arange(120) % 3
    good = rng.standard_normal((3, 6))[y] + rng.standard_normal((120, 6))
    path = tmp_path / "pool.npz"
    np.savez(path, a=good, b=good[:, :4] * 3.0, labels=y)
    return path, good, y


# ====================================================================================== baselines.py

def test_baselines_huge_jobs_is_no_overflow(pool):
    """--jobs 10**20 once raised OverflowError from multiprocessing (a traceback): the pool never has more
    processes than cells, so it scores."""
    path, X, y = pool
    p = run("baselines.py", "--features", path, "--methods", "logme", "--jobs", 10 ** 20, "--json", "--quiet")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    scores = json.loads(p.stdout)["scores"]["logme"]
    assert scores["a"] == pytest.approx(B.logme(X, y), rel=1e-12) and scores["b"] is not None


@pytest.mark.parametrize("exc", [ArithmeticError, np.linalg.LinAlgError, FloatingPointError, ZeroDivisionError,
                                 RuntimeError, OverflowError])
def test_baselines_method_raising_on_one_model_is_one_cell(pool, monkeypatch, capsys, exc):
    """A method that raises anything on one degenerate model: that cell is n/a with the exception's name
    and message, the other model is scored, exit 0."""
    path, X, y = pool
    real = B.METHODS["logme"]

    def fragile(features, labels, **kw):
        if np.shape(features)[1] == 4:                  # model b
            raise exc("degenerate model")
        return real(features, labels, **kw)
    monkeypatch.setitem(B.METHODS, "logme", fragile)
    assert B.main(["--features", str(path), "--methods", "logme", "--json", "--quiet"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["scores"]["logme"]["a"] == pytest.approx(real(X, y), rel=1e-12)
    assert data["scores"]["logme"]["b"] is None
    reason = data["errors"]["logme"]["b"]
    assert "degenerate model" in reason
    assert reason.startswith(f"{exc.__name__}: ") or issubclass(exc, ValueError)   # LinAlgError is a ValueError
    assert "Traceback" not in captured.err and "1 of 2 cells are n/a" in captured.err


def test_baselines_method_raising_in_a_worker_process_is_one_cell(pool):
    """The same through --jobs 2 (forked workers): the cell's reason comes back, nothing escapes."""
    path, _, _ = pool
    code = ("import sys, numpy as np, baselines as B\n"
            "real = B.METHODS['logme']\n"
            "def fragile(f, y, **kw):\n"
            "    if np.shape(f)[1] == 4: raise ZeroDivisionError('degenerate model')\n"
            "    return real(f, y, **kw)\n"
            "B.METHODS['logme'] = fragile\n"
            "sys.exit(B.main(sys.argv[1:]))")
    p = run(None, "--features", path, "--methods", "logme", "--jobs", 2, "--json", "--quiet", code=code)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    data = json.loads(p.stdout)
    assert data["scores"]["logme"]["b"] is None and data["scores"]["logme"]["a"] is not None
    assert data["errors"]["logme"]["b"] == "ZeroDivisionError: degenerate model"


def test_baselines_nothing_scored_is_an_error(tmp_path, capsys):
    """Every cell n/a (here: the only model's features are complex): one line with the first reason and
    exit 1, as itm.py does when no model can be ranked — not a table of n/a and exit 0."""
    y = np.arange(60) % 2
    np.savez(tmp_path / "c.npz", a=np.ones((60, 3)) + 1j, labels=y)
    rc = B.main(["--features", str(tmp_path / "c.npz"), "--methods", "logme,sfda", "--quiet"])
    captured = capsys.readouterr()
    assert_one_line_error(captured.err, "baselines.py", "no model could be scored",
                          "logme / a: features must be numeric", rc=rc)
    assert captured.out == ""


def test_baselines_features_that_are_not_n_by_d(tmp_path, capsys):
    """1-D features were reported as an "N mismatch" of equal numbers (300 rows, 300 labels)."""
    y = np.arange(60) % 2
    np.savez(tmp_path / "v.npz", a=np.arange(60.0), labels=y)
    rc = B.main(["--features", str(tmp_path / "v.npz"), "--methods", "logme"])
    assert_one_line_error(capsys.readouterr().err, "baselines.py", "model 'a': features must be a 2-D array",
                          "got shape (60,)", rc=rc)


@pytest.mark.parametrize("content, fragment", [(b"not a zip at all", "not an .npz archive"),
                                               ("npy", "expected an .npz with one array per model")])
def test_baselines_reference_that_is_no_npz(pool, tmp_path, capsys, content, fragment):
    """--reference of another kind of file: numpy's "pickled data" advice, or a context-manager TypeError
    for a .npy, became one line saying what the file is not."""
    path, X, _ = pool
    ref = tmp_path / "ref.npz"
    if content == "npy":
        np.save(tmp_path / "ref.npy", X)
        ref = tmp_path / "ref.npy"
    else:
        ref.write_bytes(content)
    rc = B.main(["--features", str(path), "--methods", "ped", "--reference", str(ref)])
    assert_one_line_error(capsys.readouterr().err, "baselines.py", "--reference", fragment, rc=rc)


def test_logme_of_underflowing_features_says_why():
    """Features of ~1e-300: every product underflows and no eigenvalue survives; the cell's reason was
    "IndexError: index 0 is out of bounds", it is now a ValueError saying so (all three variants)."""
    rng = np.random.default_rng(1)
    y = np.arange(90) % 3
    X = (rng.standard_normal((3, 5))[y] + rng.standard_normal((90, 5))) * 1e-300
    for variant in ("evidence", "fixed_point", "icml"):
        with pytest.raises(ValueError, match="no non-zero eigenvalue"):
            B.logme(X, y, variant=variant)
    result = B.score_pool({"tiny": X, "fine": X * 1e300}, y, ["logme"])
    assert result["scores"]["logme"]["fine"] == pytest.approx(B.logme(X * 1e300, y))
    assert result["errors"]["logme"]["tiny"].startswith("features have no non-zero eigenvalue")


# ====================================================================================== kendall.py

def write(path, text):
    path.write_text(text if isinstance(text, str) else json.dumps(text))
    return path


@pytest.mark.parametrize("value, shown", [("NaN", "nan"), ("Infinity", "inf"), ("1e400", "inf"),
                                          ("1" + "0" * 400, "an integer beyond the float range")])
def test_kendall_truth_that_is_no_finite_number(tmp_path, capsys, value, shown):
    """An accuracy JSON reads as NaN, ±inf or an integer beyond float64 (10**400 raised OverflowError: a
    traceback): one line naming the file and the model."""
    scores = write(tmp_path / "s.json", {"dataset": "d", "scores": {"m": {"a": 1.0, "b": 2.0, "c": 3.0}}})
    truth = write(tmp_path / "t.json", '{"a": 80, "b": %s, "c": 90}' % value)
    rc = kendall.main(["--scores", str(scores), "--truth", str(truth)])
    assert_one_line_error(capsys.readouterr().err, "kendall.py", f"truth file {truth}",
                          f"the accuracy of 'b' is {shown}, not a finite number", rc=rc)
    with pytest.raises(ValueError, match="not a finite number"):
        kendall.load_truth(truth)


def test_kendall_scores_beyond_float64_and_huge_json_numbers(tmp_path, capsys):
    """A score of 10**400 (OverflowError: a traceback) and an integer of over 4300 digits (Python's
    int-conversion limit: a ValueError without the file's name) are one line each."""
    truth = write(tmp_path / "t.json", {"a": 80, "b": 70, "c": 90})
    scores = write(tmp_path / "s.json", '{"dataset": "d", "scores": {"m": {"a": 1%s, "b": 2, "c": 3}}}'
                   % ("0" * 400))
    rc = kendall.main(["--scores", str(scores), "--truth", str(truth)])
    assert_one_line_error(capsys.readouterr().err, "kendall.py", "scores must be numbers",
                          "int too large to convert to float", rc=rc)
    write(scores, '{"dataset": "d", "scores": {"m": {"a": 1%s, "b": 2, "c": 3}}}' % ("0" * 5000))
    rc = kendall.main(["--scores", str(scores), "--truth", str(truth)])
    assert_one_line_error(capsys.readouterr().err, "kendall.py", f"scores file {scores} is not valid JSON",
                          rc=rc)


def test_kendall_cli_names_its_own_option(tmp_path, capsys):
    """A model on one side only: the advice names the flag (--missing drop), not the Python keyword."""
    truth = write(tmp_path / "t.json", {"a": 80, "b": 70, "c": 90})
    scores = write(tmp_path / "s.json", {"dataset": "d", "scores": {"m": {"a": 1.0, "b": 2.0, "c": 3.0, "x": 4.0}}})
    rc = kendall.main(["--scores", str(scores), "--truth", str(truth)])
    assert_one_line_error(capsys.readouterr().err, "kendall.py", "['x']", "(use --missing drop to ignore them)",
                          rc=rc)
    assert kendall.main(["--scores", str(scores), "--truth", str(truth), "--missing", "drop"]) == 0


def test_kendall_cli_subprocess_bad_numbers_no_traceback(tmp_path):
    truth = write(tmp_path / "t.json", '{"a": 80, "b": 1%s, "c": 90}' % ("0" * 400))
    scores = write(tmp_path / "s.json", {"dataset": "d", "scores": {"m": {"a": 1.0, "b": 2.0, "c": 3.0}}})
    p = run("kendall.py", "--scores", scores, "--truth", truth)
    assert_one_line_error(p, "kendall.py", "the accuracy of 'b'", rc=p.returncode)


def test_itm_truth_with_nan_fails_before_any_model_is_scored(pool, tmp_path):
    """itm.py --truth reads the file with kendall.load_truth: a NaN accuracy is refused up front (it used to
    fail after every model was scored, as "truth has non-finite values (nan at index 0)")."""
    path, _, _ = pool
    truth = write(tmp_path / "t.json", '{"a": NaN, "b": 70.0}')
    p = run("itm.py", "--features", path, "--truth", truth, "--batch-size", 16, "--iterations", 5)
    assert_one_line_error(p, "itm", "the accuracy of 'a' is nan", rc=p.returncode)
    assert "[1/2]" not in p.stderr


# ====================================================================================== extract.py

def images_npz(tmp_path, name="imgs.npz", images=None, labels=None):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8) if images is None else images
    labels = np.arange(6) % 2 if labels is None else labels
    np.savez(tmp_path / name, images=images, labels=labels)
    return tmp_path / name


def extract_cli(capsys, *args):
    import extract                     # torch: the extract and test extras (make test installs them)
    rc = extract.main([str(a) for a in args])
    return rc, capsys.readouterr()


def quick(tmp_path, dataset, *more):
    return ["--models", "resnet18", "--random-init", "--device", "cpu", "--workers", 0, "--quiet",
            "--dataset", dataset, "--out", tmp_path / "out.npz", *more]


@pytest.mark.parametrize("images, labels, fragment", [
    (np.arange(6, dtype=np.uint8), None, "images must be N×H×W"),                  # was AttributeError
    (np.zeros((6, 5), np.uint8), None, "images must be N×H×W"),                     # was run on 1-D "images"
    (np.full((6, 8, 8, 3), np.nan), None, "images contain NaN/Inf values"),        # was silently 0
    (np.zeros((6, 8, 8, 3), np.int16), None, "uint8 or floats in [0, 1]"),          # was saturated
    (None, np.array(list("abcabc")), "labels must be integer class ids"),          # was int("a")
    (None, np.full(6, 0.5), "labels must be integer class ids"),                   # was truncated to 0
])
def test_extract_npz_dataset_checked_up_front(tmp_path, capsys, images, labels, fragment):
    data = images_npz(tmp_path, images=images, labels=labels)
    rc, cap = extract_cli(capsys, *quick(tmp_path, data))
    assert_one_line_error(cap.err, "extract.py", str(data), fragment, rc=rc)
    assert not (tmp_path / "out.npz").exists()


def test_extract_npz_dataset_that_is_no_npz(tmp_path, capsys):
    data = tmp_path / "junk.npz"
    data.write_bytes(b"not a zip at all")
    rc, cap = extract_cli(capsys, *quick(tmp_path, data))
    assert_one_line_error(cap.err, "extract.py", f"cannot read {data}: not an .npz archive", rc=rc)


def test_extract_options(tmp_path, capsys):
    """--dataset npz without --root (a TypeError about NoneType), --workers 10**20 (forked until memory ran
    out), a checkpoint that is a folder ("does not exist"); --batch-size 10**20 runs (one batch)."""
    data = images_npz(tmp_path)
    rc, cap = extract_cli(capsys, *quick(tmp_path, "npz"))
    assert_one_line_error(cap.err, "extract.py", "--dataset npz reads the .npz given as --root", rc=rc)
    args = quick(tmp_path, data)
    args[args.index("--workers") + 1] = 10 ** 20
    rc, cap = extract_cli(capsys, *args)
    assert_one_line_error(cap.err, "extract.py", "--workers must be ≤", rc=rc)
    rc, cap = extract_cli(capsys, "--checkpoint", tmp_path, "--arch", "resnet18", *quick(tmp_path, data))
    assert_one_line_error(cap.err, "extract.py", "is a folder, not a weights file", rc=rc)
    rc, cap = extract_cli(capsys, *quick(tmp_path, data, "--batch-size", 10 ** 20))
    assert rc == 0 and "Traceback" not in cap.err, cap.err
    with np.load(tmp_path / "out.npz") as z:
        assert z["resnet18"].shape == (6, 512)


def test_extract_model_giving_nan_features_is_one_line(tmp_path):
    """A model whose output is NaN (an fp16 overflow, say) stops with the image it happened on, instead of
    writing features every later tool refuses."""
    import extract
    import torch

    class Broken(torch.nn.Module):
        batches = 0

        def forward(self, x):                           # batches of 2: NaN from the 2nd row of the 2nd batch
            out = x.mean(dim=(2, 3))
            Broken.batches += 1
            if Broken.batches == 2:
                out[1] = float("nan")
            return out

    ds = extract.NpzImages(images_npz(tmp_path))
    with pytest.raises(extract.ExtractError, match=r"broken: the model gave NaN/Inf features \(image 3\)"):
        extract.run_model(Broken(), extract.default_transform(32), ds, batch_size=2, device="cpu",
                          dtype="float32", desc="broken", progress=False)


# ============================================================================================== itm.py

def itm_cli(path, *args, **kw):
    return run("itm.py", "--features", path, "--quiet", "--batch-size", 16, "--iterations", 5, *args, **kw)


def itm_main(capsys, path, *args):
    """itm.main in-process (faster than a fresh interpreter): (exit status, stdout, stderr); an exception
    that leaves main — a traceback on the command line — fails as an AssertionError."""
    try:
        rc = itm.main([str(a) for a in ("--features", path, "--quiet", "--batch-size", 16, "--iterations", 5,
                                        *args)])
    except Exception as err:  # noqa: BLE001
        raise AssertionError(f"escaped from itm.main: {type(err).__name__}: {err}") from err
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize("option, value", [("--dis-b", "inf"),          # OverflowError in adaptive_n
                                           ("--n", 10 ** 20),           # numba TypingError (int64 range)
                                           ("--n-b", 10 ** 20)])        # the same, through adaptive n
def test_itm_option_out_of_range_is_one_line(pool, capsys, option, value):
    """Today: a traceback (OverflowError: cannot convert float infinity to integer / numba's
    "Int value is too large"). Wanted: `itm: error: --dis-b must be finite ...`, exit 1."""
    path, _, _ = pool
    rc, _, err = itm_main(capsys, path, option, value)
    assert_one_line_error(err, "itm", option, rc=rc)


@pytest.mark.parametrize("option, value", [("--weight-decay", "nan"), ("--weight-decay", "inf"),
                                           ("--lr", "inf"), ("--adam-eps", "inf")])
def test_itm_non_finite_option_names_the_option(pool, capsys, option, value):
    """Today: `itm: error: model 'a': Eigenvalues did not converge` (weight decay NaN/inf, lr inf), or a
    run of untrained models and exit 0 (--adam-eps inf: every step is 0). Wanted: the option named."""
    path, _, _ = pool
    rc, _, err = itm_main(capsys, path, option, value)
    assert_one_line_error(err, "itm", option, rc=rc)


def test_itm_non_value_error_on_one_model_is_reported_for_that_model(pool, capsys, monkeypatch):
    """itm.score_model turns only ValueError into that model's n/a; any other exception of one model
    (ArithmeticError, FloatingPointError, ZeroDivisionError, RuntimeError ...) ends the serial run in a
    traceback — while with --jobs 2 (_run_tasks' `except Exception`) the same failure is that model's n/a.
    Wanted: the serial path like the parallel one (model 'b' n/a with its reason, 'a' ranked, exit 0)."""
    path, _, _ = pool
    real, called = itm._score, []

    def fragile(features, labels, cfg, threads=1):
        if np.shape(features)[1] == 4:                  # model b
            called.append(True)
            raise ZeroDivisionError("degenerate model")
        return real(features, labels, cfg, threads)
    monkeypatch.setattr(itm, "_score", fragile)
    try:
        rc, out, err = itm_main(capsys, path)
    finally:
        assert called, "the patch did not take effect (itm._score renamed?)"
    assert rc == 0 and "degenerate model" in err and " a " in out, (rc, out, err)


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS bounds the run's memory on Linux")
def test_itm_huge_iterations_is_refused_not_out_of_memory(pool):
    """--iterations 10**12: make_batches builds every batch's indices up front and grows until memory runs
    out (here bounded to 3 GB: a MemoryError traceback after ~10 s; unbounded, the machine's memory).
    Wanted: a one-line refusal naming --iterations (or batches drawn lazily)."""
    import resource
    path, _, _ = pool

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
    p = itm_cli(path, "--iterations", 10 ** 12, timeout=120, preexec_fn=limit)
    assert_one_line_error(p, "itm", "--iterations", rc=p.returncode)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_itm_odd_inputs_are_one_line_or_handled(tmp_path, capsys):
    """Found while closing the escapes above: a --labels file that is no .npy array, features that overflow
    float64 once centred, a single-class label printed as NumPy shows it, --models with spaces, a local
    Dask cluster of more processes than the machine can hold."""
    rng = np.random.default_rng(0)
    y = np.arange(120) % 3
    X = rng.standard_normal((3, 6))[y] + rng.standard_normal((120, 6))
    path = tmp_path / "p.npz"
    np.savez(path, a=X, b=X + rng.standard_normal(X.shape), labels=y)
    (tmp_path / "y.npy").write_text("not an array")
    rc = itm.main(["--features", str(path), "--labels", str(tmp_path / "y.npy"), "--quiet"])
    assert_one_line_error(capsys.readouterr().err, "itm", "not a .npy array", rc=rc)
    with pytest.raises(ValueError, match="overflows float64 once centred"):
        itm.itm_score(1.7e308 * np.sign(rng.standard_normal((120, 6))), y, batch_size=16, iterations=5)
    with pytest.raises(ValueError, match=r"a single class \(0\)"):
        itm.encode_labels(np.zeros(5, dtype=np.int64))
    rc = itm.main(["--features", str(path), "--models", " a, b", "--quiet", "--batch-size", "16", "--iterations", "5"])
    assert rc == 0 and "a" in capsys.readouterr().out
    rc = itm.main(["--features", str(path), "--scheduler", "local:100000000", "--quiet"])
    assert_one_line_error(capsys.readouterr().err, "itm", "--scheduler local:N: at most", rc=rc)

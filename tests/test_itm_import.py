"""itm.py as a vendorable file: importing it compiles nothing, and it runs with NumPy alone."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_python(code, **env):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, **env}, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_compiles_nothing():
    pytest.importorskip("numba")
    code = ("import itm, json; "
            "d = [v for v in itm.__dict__.values() if hasattr(v, 'signatures')]; "
            "d += list(itm._TWINS.values()); "          # the twins, chosen in one place (section 8)
            "print(json.dumps([len(x.signatures) for x in d]))")
    counts = json.loads(run_python(code))
    assert len(counts) >= 6 and sum(counts) == 0, counts   # dispatchers exist, none compiled yet


def test_runs_without_numba_installed(tmp_path):
    """A copy of itm.py alone in a folder, with numba made unimportable: same scores as in-process."""
    (tmp_path / "itm.py").write_text((ROOT / "itm.py").read_text())
    (tmp_path / "numba.py").write_text("raise ImportError('numba is not installed here')\n")
    code = ("import itm, numpy as np; assert not itm.HAVE_NUMBA; f, y, _ = itm.synthetic_zoo(); "
            "print(itm.itm_score(f['synthetic_3'], y, iterations=30, eval_every=10).score)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    sys.path.insert(0, str(ROOT))
    import itm
    f, y, _ = itm.synthetic_zoo()
    assert float(out.stdout) == pytest.approx(itm.itm_score(f["synthetic_3"], y, iterations=30,
                                                             eval_every=10).score, abs=1e-9)


def test_alone_it_scores_on_any_executor_and_names_the_missing_sibling(tmp_path):
    """itm.py copied alone: rank(executor=...) runs on a plain concurrent.futures executor with the serial
    scores; jobs > 1 and --truth, which need itm_parallel.py and kendall.py, fail with one line saying so."""
    (tmp_path / "itm.py").write_text((ROOT / "itm.py").read_text())
    code = ("import itm, json, concurrent.futures as cf; f, y, _ = itm.synthetic_zoo(N=240, K=4, D=16); "
            "kw = dict(iterations=20, eval_every=10, batch_size=32); serial = itm.rank(f, y, **kw)\n"
            "with cf.ThreadPoolExecutor(2) as ex: pooled = itm.rank(f, y, executor=ex, **kw)\n"
            "try: itm.rank(f, y, jobs=2, **kw)\n"
            "except ValueError as e: err = str(e)\n"
            "print(json.dumps([[(n, r.score) for n, r in serial] == [(n, r.score) for n, r in pooled], err]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    same, err = json.loads(out.stdout)
    assert same and "itm_parallel.py" in err, err
    import numpy as np        # a hard dependency: a broken install fails here, it is not skipped
    feats = tmp_path / "f.npz"
    np.savez(feats, a=np.random.default_rng(0).standard_normal((60, 4)), labels=np.arange(60) % 2)
    (tmp_path / "truth.json").write_text('{"a": 1.0}')
    cli = subprocess.run([sys.executable, "itm.py", "--features", str(feats), "--truth", "truth.json"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert cli.returncode == 1 and cli.stdout == ""
    assert cli.stderr.strip() == "itm: error: --truth: needs kendall.py beside itm.py", cli.stderr


def test_alone_the_bundled_example_ranks_without_tau(tmp_path):
    """`python itm.py` with itm.py copied alone (no examples/, no kendall.py): the synthetic zoo is ranked
    and printed, exit 0; τ_w, which needs kendall.py, is left out with a note instead of failing the run."""
    (tmp_path / "itm.py").write_text((ROOT / "itm.py").read_text())
    cli = subprocess.run([sys.executable, "itm.py", "--iterations", "20", "--eval-every", "10"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert cli.returncode == 0, cli.stderr
    rows = [line.split()[1] for line in cli.stdout.splitlines()[1:] if line[:5].strip().rstrip("≈").isdigit()]
    assert sorted(rows) == [f"synthetic_{i}" for i in range(5)], cli.stdout
    assert "tau" not in cli.stdout and "needs kendall.py beside itm.py" in cli.stderr, cli.stderr

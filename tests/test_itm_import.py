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
            "c = [f.__closure__ for f in itm.__dict__.values() if callable(f) and getattr(f, '__closure__', None)]; "
            "d += [cell.cell_contents for cl in c for cell in cl if hasattr(cell.cell_contents, 'signatures')]; "
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

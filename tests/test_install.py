"""Install like a library: build the sdist and, from it, the wheel; install the wheel into a fresh venv and
use it from a folder that is not the checkout.

The venv reuses this interpreter's installed packages (numpy, numba, torch, ...) so that nothing is
downloaded, but not through --system-site-packages: that would also run the .pth files of this environment,
among them the editable install of this very project (`make test` does `pip install -e .`), which maps
itm_transferability onto the checkout and would hide what the wheel really holds. A plain path in a .pth of
the venv adds those folders to sys.path without running their .pth files.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("itm", "kendall", "baselines", "extract", "itm_parallel")
EXAMPLE = ("examples/flowers17_8models.npz", "examples/flowers17_8models_truth.json")
SCRIPTS = {"itm": "itm", "itm-kendall": "kendall", "itm-baselines": "baselines", "itm-extract": "extract"}
# What an in-tree build leaves behind, or what git ignores: never part of the source that gets built.
NOT_SOURCE = shutil.ignore_patterns(".git", "__pycache__", "*.py[cod]", "*.egg-info", "build", "dist",
                                    ".venv", ".whl", ".pytest_cache", ".benchmarks", "ci-out")


def call(cmd, cwd, env=None):
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, f"{cmd} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return out


def build(tmp):
    """sdist from a copy of the checkout (an in-tree build would write build/ and *.egg-info into it, and
    setuptools would ship whatever a stale build/lib still holds), then the wheel from the unpacked sdist,
    as `python -m build` does: a file the wheel needs but the sdist lacks fails here."""
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    code = "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))"
    sdist = tmp / "sdist" / call([sys.executable, "-c", code, tmp / "sdist"], cwd=src).stdout.split()[-1]
    with tarfile.open(sdist) as tar:     # the extraction filter exists from 3.12 (and late 3.9-3.11 fixes)
        tar.extractall(tmp / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (unpacked,) = (tmp / "unpacked").iterdir()
    call([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "--disable-pip-version-check", "-q", "-w", tmp / "wheel", "."], cwd=unpacked)
    (wheel,) = (tmp / "wheel").glob("itm_transferability-*.whl")
    return sdist, wheel


def make_venv(tmp, wheel):
    venv = tmp / "venv"
    call([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = call([python, "-c", code], cwd=tmp).stdout.strip()
    outer = [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")]
    Path(site, "_outer_site_packages.pth").write_text("".join(p + "\n" for p in outer))
    # --ignore-installed: this environment's editable install is visible through that .pth; pip must
    # neither take it for this wheel nor try to uninstall it
    call([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
          "--disable-pip-version-check", "-q", wheel], cwd=tmp)
    return python, Path(site)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("install")
    sdist, wheel = build(tmp)
    python, site = make_venv(tmp, wheel)
    elsewhere = tmp / "elsewhere"          # no itm.py beside it: whatever runs here comes from the venv
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    env["PATH"] = str(python.parent) + os.pathsep + env.get("PATH", "")

    def run(*cmd):
        return subprocess.run([str(c) for c in cmd], cwd=elsewhere, env=env, capture_output=True, text=True,
                              timeout=300)
    return {"sdist": sdist, "wheel": wheel, "python": python, "site": site, "bin": python.parent, "run": run}


def test_wheel_holds_the_modules_and_the_example_only(installed):
    with zipfile.ZipFile(installed["wheel"]) as whl:
        names = whl.namelist()
        info = sorted(n for n in names if ".dist-info/" in n)
        assert sorted(set(names) - set(info)) == sorted([f"itm_transferability/{m}.py" for m in MODULES]
                                                        + [f"itm_transferability/{e}" for e in EXAMPLE])
        for e in EXAMPLE:
            assert whl.read(f"itm_transferability/{e}") == (ROOT / e).read_bytes()
        (licence,) = [n for n in info if n.endswith("/LICENSE")]
        text = whl.read(licence).decode()
        assert text.startswith("MIT License")
        assert "Copyright (c) 2026 the ITM reference implementation authors" in text
        (metadata,) = [n for n in info if n.endswith("/METADATA")]
        meta = whl.read(metadata).decode().split("\n\n")[0].splitlines()
        (entry_points,) = [n for n in info if n.endswith("/entry_points.txt")]
        scripts = whl.read(entry_points).decode()
    assert "Name: itm-transferability" in meta and "License-File: LICENSE" in meta
    assert "License: MIT" in meta or "License-Expression: MIT" in meta
    assert {f"Requires-Dist: {r}" for r in ("numpy>=1.22", "numba>=0.57", "threadpoolctl>=3.0")} <= set(meta)
    assert {"Provides-Extra: " + x for x in ("extract", "test", "plot", "cluster", "baselines")} <= set(meta)
    for name, module in SCRIPTS.items():
        assert f"{name} = itm_transferability.{module}:main" in scripts


def test_sdist_holds_what_make_test_needs(installed):
    with tarfile.open(installed["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"LICENSE", "Makefile", "setup.cfg", "pyproject.toml", *(f"{m}.py" for m in MODULES), *EXAMPLE,
            "DESIGN.md", "tests/conftest.py", "tests/test_install.py", "bench/accuracy.py"} <= names


# Run by the venv's python from a folder without itm.py: where the package and its modules come from, and
# whether the flat names of a checkout (import itm, import kendall, ...) resolve to anything there.
PROBE = """
import importlib.metadata as md, importlib.util as u, json, itm_transferability as p
from itm_transferability import itm, kendall, baselines, extract, itm_parallel
print(json.dumps({
    "path": list(p.__path__),
    "files": [m.__file__ for m in (itm, kendall, baselines, extract, itm_parallel)],
    "one_itm": all(m.itm is itm for m in (kendall, baselines, extract, itm_parallel)),
    "version": itm.__version__,
    "dist": md.version("itm-transferability"),
    "dist_site": str(md.distribution("itm-transferability").locate_file("")),
    "flat": {n: u.find_spec(n) and u.find_spec(n).origin for n in ("itm", "kendall", "baselines", "extract", "itm_parallel")},
}))
"""


def test_installed_package_is_the_venvs_and_the_flat_names_are_not_installed(installed):
    out = installed["run"](installed["python"], "-c", PROBE)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    package = installed["site"].resolve() / "itm_transferability"
    assert [Path(p).resolve() for p in got["path"]] == [package]
    assert [Path(f).resolve() for f in got["files"]] == [package / f"{m}.py" for m in MODULES]
    assert got["one_itm"]                  # the siblings import the package's itm, not a second copy
    assert got["dist"] == got["version"] and Path(got["dist_site"]).resolve() == package.parent
    # None for each: a hit would be another install (or the checkout) leaking into the venv
    assert got["flat"] == dict.fromkeys(MODULES), got["flat"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_console_script_help(installed, script):
    exe = installed["bin"] / script
    assert exe.exists(), sorted(p.name for p in installed["bin"].iterdir())
    out = installed["run"](exe, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: {script} ") and "--help" in out.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_console_script_errors_name_the_command(installed, tmp_path, script):
    """A usage error from an installed command names that command, not the module file behind it."""
    out = installed["run"](installed["bin"] / script, "--no-such-option")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith(f"{script}: error: ") and len(out.stderr.splitlines()) == 1, out.stderr


def test_itm_without_arguments_ranks_the_bundled_flowers17_example(installed):
    out = installed["run"](installed["bin"] / "itm")
    assert out.returncode == 0, out.stderr
    first = out.stderr.splitlines()[0]
    assert "Flowers-17" in first and "SYNTHETIC" not in out.stderr, first
    truth = json.loads((ROOT / EXAMPLE[1]).read_text())
    rows = [m.groups() for m in map(re.compile(r"\s*(\d+)\S*\s+(\S+)").match, out.stdout.splitlines()) if m]
    assert [int(rank) for rank, _ in rows] == list(range(1, 9)), out.stdout
    assert sorted(model for _, model in rows) == sorted(truth) and len(truth) == 8
    assert "weighted Kendall tau_w vs fine-tuned accuracy:" in out.stdout

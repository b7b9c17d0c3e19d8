"""rank() and score_grid() on a real Dask cluster: a LocalCluster of 2 single-threaded worker processes on
127.0.0.1, started once for the module through itm.make_executor. The same scores and order as serial, a
worker process lost in the middle of a pool, a bad model failing alone, and the CLI's --scheduler; then
baselines.py's CLI on a cluster (and --jobs): the serial table, a bad model's cells n/a, itm's usage errors."""
import dataclasses
import json
import os
import re
import sys
import threading
import time

import dask
import numpy as np
import psutil                       # a dependency of distributed: the worker processes left behind
import pytest

import baselines
import itm

CFG = itm.Config(iterations=20, batch_size=32, eval_every=10)
BOUND_S = 120                       # generous: a pool that loses a task for good hangs instead of failing


def _zoo():
    feats, labels, _ = itm.synthetic_zoo(seed=0, N=240, K=4, D=16)
    return feats, labels


@pytest.fixture(scope="module")
def executor():
    """One cluster for the module; at its end no process that it (or the CLI's own cluster) started is left."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with itm.make_executor("local:2") as ex:
        assert all(addr.startswith("tcp://127.0.0.1:") for addr in ex.client.scheduler_info()["workers"])
        yield ex
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and _alive(p)]
    assert not left, f"processes left behind: {[(p.pid, p.cmdline()) for p in left]}"


def _alive(process):
    """A process still running, other than multiprocessing's resource tracker (one per parent, by design
    alive until the parent exits)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE and \
            "multiprocessing.resource_tracker" not in " ".join(process.cmdline())
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def cluster(executor):
    """The module's executor with both workers up (a worker killed by a test is restarted by its nanny)."""
    executor.client.wait_for_workers(2, timeout=60)
    return executor


@pytest.fixture(scope="module")
def serial():
    feats, labels = _zoo()
    return dict(itm.rank(feats, labels, CFG, jobs=1))


def _within(seconds, fn, *args, **kwargs):
    """fn(*args, **kwargs), failing after `seconds`: a task Dask loses for good would hang as_completed."""
    out = {}

    def run():
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as err:             # noqa: BLE001 — re-raised in the test's thread
            out["error"] = err
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{fn.__name__} did not finish within {seconds} s")
    if "error" in out:
        raise out["error"]
    return out["value"]


def _same_result(got, want, name):
    assert not got.error, f"{name}: {got.error}"
    assert (got.score, got.fold_scores, got.n, got.fold_n, got.trajectory) == \
        (want.score, want.fold_scores, want.n, want.fold_n, want.trajectory), name


def _assert_same_ranking(got, want):
    assert [name for name, _ in got] == [name for name, _ in want]
    for (name, g), (_, w) in zip(got, want):
        _same_result(g, w, name)


def test_rank_on_cluster_matches_serial(cluster, serial):
    feats, labels = _zoo()
    got = _within(BOUND_S, itm.rank, feats, labels, CFG, executor=cluster)
    _assert_same_ranking(got, sorted(serial.items(), key=lambda nr: -nr[1].score))
    assert len({r.score for _, r in got}) > 1          # distinct scores: the order is a real check


class _Counting:
    """The executor, counting what share() is given: each model's features should travel once."""

    def __init__(self, inner):
        self.inner, self.shared = inner, []

    def submit(self, fn, *args, **kwargs):
        return self.inner.submit(fn, *args, **kwargs)

    def share(self, obj):
        self.shared.append(id(obj))
        return self.inner.share(obj)


def test_score_grid_three_seeds_matches_serial_and_shares_features_once(cluster):
    feats, labels = _zoo()
    configs = [dataclasses.replace(CFG, seed=s) for s in range(3)]
    want = itm.score_grid(feats, labels, configs, jobs=1)
    counting = _Counting(cluster)
    got = _within(BOUND_S, itm.score_grid, feats, labels, configs, executor=counting)
    assert len(got) == 3
    for g, w in zip(got, want):
        assert list(g) == list(w) == list(feats)
        for name in w:
            _same_result(g[name], w[name], name)
    assert want[0]["synthetic_4"].score != want[1]["synthetic_4"].score    # the seeds differ
    assert sorted(counting.shared.count(id(f)) for f in feats.values()) == [1] * len(feats)


def _die_once(marker, fn, *args, **kwargs):
    """The first task to start anywhere kills its own worker process (as a crash or an OOM kill would);
    every later attempt, the rescheduled one included, runs fn. Workers import this module by name."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return fn(*args, **kwargs)
    os._exit(1)


class _DyingOnce(_Counting):
    def __init__(self, inner, marker):
        super().__init__(inner)
        self.marker = marker

    def submit(self, fn, *args, **kwargs):
        return self.inner.submit(_die_once, self.marker, fn, *args, **kwargs)


def test_worker_killed_mid_pool_loses_no_row(cluster, serial, tmp_path):
    """Dask reschedules the task of the dead worker, and whatever that worker held (shared features
    included) must come back: every row, each with its serial score."""
    feats, labels = _zoo()
    marker = str(tmp_path / "killed")
    workers_before = set(cluster.client.scheduler_info()["workers"])
    got = _within(BOUND_S, itm.rank, feats, labels, CFG, executor=_DyingOnce(cluster, marker),
                  errors="report")
    assert os.path.exists(marker)                            # a task did kill its worker
    cluster.client.wait_for_workers(2, timeout=60)
    assert set(cluster.client.scheduler_info()["workers"]) != workers_before   # the nanny's new one
    assert sorted(name for name, _ in got) == sorted(feats)
    _assert_same_ranking(got, sorted(serial.items(), key=lambda nr: -nr[1].score))


@pytest.mark.parametrize("bad", [np.zeros((240, 16), np.float32), np.full((240, 16), np.nan, np.float32)],
                         ids=["all-zero", "nan"])
def test_bad_model_fails_alone(cluster, serial, bad):
    feats, labels = _zoo()
    feats = {"bad_model": bad, **feats}                      # first: its failure comes early
    got = _within(BOUND_S, itm.rank, feats, labels, CFG, executor=cluster, errors="report")
    name, worst = got[-1]
    assert name == "bad_model" and np.isnan(worst.score) and "'bad_model'" in worst.error
    _assert_same_ranking(got[:-1], sorted(serial.items(), key=lambda nr: -nr[1].score))
    with pytest.raises(ValueError, match="'bad_model'"):
        _within(BOUND_S, itm.rank, feats, labels, CFG, executor=cluster)


CLI_OPTIONS = ["--json", "--quiet", "--iterations", "20", "--batch-size", "32", "--eval-every", "10"]


def _cli(capsys, *argv):
    rc = itm.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_scheduler_local_prints_the_serial_scores(executor, tmp_path, capsys):
    feats, labels = _zoo()
    npz = tmp_path / "zoo.npz"
    np.savez(npz, labels=labels, **feats)
    rc, out, err = _cli(capsys, "--features", str(npz), "--jobs", "1", *CLI_OPTIONS)
    assert rc == 0, err
    want = json.loads(out)
    rc, out, err = _within(BOUND_S, _cli, capsys, "--features", str(npz), "--scheduler", "local:2", *CLI_OPTIONS)
    assert rc == 0, err
    got = json.loads(out)
    assert got["scores"] == want["scores"] and len(got["scores"]["ITM"]) == len(feats)
    assert [(r["model"], r["fold_scores"], r["n"]) for r in got["ranking"]] == \
        [(r["model"], r["fold_scores"], r["n"]) for r in want["ranking"]]


def test_cli_unreachable_scheduler_is_one_line_error(tmp_path, capsys):
    feats, labels = _zoo()
    npz = tmp_path / "zoo.npz"
    np.savez(npz, labels=labels, **feats)
    start = time.perf_counter()
    # nothing listens on port 1; Dask retries a refused connection until its connect timeout
    with dask.config.set({"distributed.comm.timeouts.connect": "3s"}):
        rc, out, err = _within(60, _cli, capsys, "--features", str(npz), "--scheduler", "tcp://127.0.0.1:1",
                               *CLI_OPTIONS)
    elapsed = time.perf_counter() - start
    assert rc == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("itm: error: ") and "tcp://127.0.0.1:1" in lines[0], err
    assert elapsed < 30, f"took {elapsed:.1f} s"


# ---------------------------------------------------------------------------------------------- baselines.py

BASELINE_METHODS = "logme,sfda,etran,ncti,sa,parc,gbc,transrate,hscore,reg_hscore"   # pool-relative ones included
PROGRESS = re.compile(r"^\[(\d+)/(\d+)\] (\w+) / (\w+): (.+) \(\d+\.\d\d s\)$")


def _baselines_cli(capsys, *argv):
    rc = baselines.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _pool_npz(path, bad=None):
    """3 of the zoo's models (distinct scores), with `bad` first where given."""
    feats, labels = _zoo()
    feats = {name: feats[name] for name in ("synthetic_0", "synthetic_2", "synthetic_4")}
    if bad is not None:
        feats = {"bad_model": bad, **feats}
    np.savez(path, labels=labels, **feats)
    return str(path), list(feats)


def _serial_json(capsys, npz):
    rc, out, err = _baselines_cli(capsys, "--features", npz, "--methods", BASELINE_METHODS, "--json", "--quiet")
    assert rc == 0, err
    return json.loads(out)


def _progress_cells(err, total):
    """The (method, model) of each progress line, checking they count 1..total as results arrive."""
    lines = [PROGRESS.match(line) for line in err.splitlines() if line.startswith("[")]
    assert [(int(m[1]), int(m[2])) for m in lines] == [(i, total) for i in range(1, total + 1)], err
    return [(m[3], m[4], m[5]) for m in lines]


def _same_json(got, want):
    """Exactly the serial scores and errors, and the serial order of methods and models."""
    assert got == want
    assert got["methods"] == want["methods"] and list(got["scores"]) == list(want["scores"])
    assert all(list(got["scores"][k]) == list(want["scores"][k]) for k in want["scores"])


@pytest.mark.parametrize("parallel", [["--scheduler", "local:2"], ["--jobs", "2"]], ids=["local-cluster", "jobs"])
def test_baselines_cli_parallel_prints_the_serial_scores(executor, tmp_path, capsys, parallel):
    npz, models = _pool_npz(tmp_path / "pool.npz")
    want = _serial_json(capsys, npz)
    assert len({want["scores"]["logme"][m] for m in models}) == 3       # distinct: the order is a real check
    rc, out, err = _within(BOUND_S, _baselines_cli, capsys, "--features", npz, "--methods", BASELINE_METHODS,
                           "--json", *parallel)
    assert rc == 0, err
    _same_json(json.loads(out), want)
    methods = BASELINE_METHODS.split(",")
    cells = _progress_cells(err, len(methods) * len(models))
    assert sorted((k, m) for k, m, _ in cells) == sorted((k, m) for k in methods for m in models)


def test_baselines_cli_bad_model_fails_alone_on_cluster(cluster, tmp_path, capsys):
    """On a running scheduler (the module's, by address): the all-zero model's cells are n/a with the reason,
    the others are the serial run's, and the models without it score as in a pool without it (for the
    pool-relative methods the normalisation leaves the failed model out)."""
    address = cluster.client.scheduler.address
    npz, models = _pool_npz(tmp_path / "pool.npz", bad=np.zeros((240, 16), np.float32))
    want = _serial_json(capsys, npz)
    rc, out, err = _within(BOUND_S, _baselines_cli, capsys, "--features", npz, "--methods", BASELINE_METHODS,
                           "--json", "--quiet", "--scheduler", address)
    assert rc == 0, err
    got = json.loads(out)
    _same_json(got, want)
    methods = BASELINE_METHODS.split(",")
    reason = "features are constant (all zero): nothing to rank by"
    assert got["errors"] == {k: {"bad_model": reason} for k in methods}
    assert all(got["scores"][k]["bad_model"] is None for k in methods)
    without = _serial_json(capsys, _pool_npz(tmp_path / "good.npz")[0])
    assert all(got["scores"][k][m] == without["scores"][k][m] for k in methods for m in models[1:])
    assert f"{len(methods)} of {len(methods) * len(models)} cells are n/a" in err

    rc, out, err = _within(BOUND_S, _baselines_cli, capsys, "--features", npz, "--methods", BASELINE_METHODS,
                           "--scheduler", address)
    assert rc == 0, err
    row = next(line for line in out.splitlines() if line.startswith("bad_model "))
    assert row.count(f"n/a ({reason})") == len(methods), row
    bad_cells = [what for k, m, what in _progress_cells(err, len(methods) * len(models)) if m == "bad_model"]
    assert bad_cells == [f"n/a ({reason})"] * len(methods)


@pytest.mark.parametrize("argv, message", [
    (["--scheduler", "local:2", "--jobs", "2"], "give --jobs or --scheduler, not both"),
    (["--jobs", "0"], "--jobs must be ≥ 1, got 0")])
def test_parallel_usage_errors_match_itm(tmp_path, capsys, argv, message):
    """One line, exit 1, before the (missing) features are read; worded as itm's CLI words it."""
    missing = str(tmp_path / "missing.npz")
    for main, prog in ((baselines.main, "baselines.py"), (itm.main, "itm")):
        rc = main(["--features", missing, *argv])
        out, err = capsys.readouterr()
        assert (rc, out, err) == (1, "", f"{prog}: error: {message}\n")


def test_baselines_cli_scheduler_without_dask_fails_before_scoring(tmp_path, capsys, monkeypatch):
    npz, _ = _pool_npz(tmp_path / "pool.npz")
    monkeypatch.setitem(sys.modules, "dask.distributed", None)           # `from dask.distributed import` fails
    monkeypatch.setattr(baselines, "score_pool", lambda *a, **k: pytest.fail("scored without Dask"))
    rc, out, err = _baselines_cli(capsys, "--features", npz, "--methods", "logme", "--scheduler", "local:2")
    assert (rc, out) == (1, "")
    assert err == "baselines.py: error: --scheduler needs Dask: pip install 'itm-transferability[cluster]'\n"


def test_score_pool_on_cluster_shares_each_array_once(cluster):
    """3 methods × 3 models: each model's features and the labels travel to the cluster once, not per cell."""
    feats, labels = _zoo()
    feats = {name: feats[name] for name in ("synthetic_0", "synthetic_2", "synthetic_4")}
    methods = ["logme", "etran", "sfda"]
    want = baselines.score_pool(feats, labels, methods)
    counting = _Counting(cluster)
    got = _within(BOUND_S, baselines.score_pool, feats, labels, methods, executor=counting)
    assert got == want and not any(got["errors"].values())
    assert sorted(counting.shared.count(id(x)) for x in [labels, *feats.values()]) == [1] * 4
    assert len(counting.shared) == 4


def _worker_environ():
    import os
    return os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("OMP_NUM_THREADS")


def test_local_workers_keep_glibcs_adaptive_malloc_and_one_blas_thread(cluster):
    # Dask's nannies set MALLOC_TRIM_THRESHOLD_, which turns off glibc's adaptive mmap threshold (ITM's
    # runs about 2× slower); make_executor("local:N") starts its workers without it, and keeps the rest
    # of Dask's worker environment (one OpenMP/BLAS thread per worker)
    assert set(cluster.client.run(_worker_environ).values()) == {(None, "1")}

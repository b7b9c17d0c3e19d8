"""Where rank()/score_grid() and the baselines' pool run their tasks when not here, one after the other:
forked worker processes, or a Dask cluster. itm.py alone (vendored) needs none of this: it scores serially,
or on any concurrent.futures.Executor given to rank(executor=...)."""
import contextlib
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor

try:  # installed: a module of the itm_transferability package; in a checkout or vendored: beside itm.py
    from . import itm
except ImportError:
    import itm

_POOL = {}  # what a worker process scores (forked workers inherit the features instead of unpickling)


def fork_pool(jobs, initializer=None, initargs=()):
    """`jobs` worker processes, forked where the platform can (the workers inherit the parent's memory)."""
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    return ProcessPoolExecutor(jobs, mp_context=ctx, initializer=initializer, initargs=initargs)


def process_pool(feature_sets, labels, jobs):
    """`jobs` forked worker processes that inherit the features, the BLAS threads divided among them;
    submit(pool_score, name, cfg) scores one model there."""
    threads = max(1, itm.cores() // jobs)
    return fork_pool(jobs, _pool_init, (threads, dict(feature_sets), labels))


def _pool_init(threads, feature_sets, labels):
    _POOL.update(sets=feature_sets, labels=labels, threads=threads)
    if itm.ThreadpoolController is not None:
        _POOL["limit"] = itm.ThreadpoolController().limit(limits=threads, user_api="blas")


def pool_score(name, cfg):
    return itm.score_model(name, _POOL["sets"][name], _POOL["labels"], cfg, _POOL["threads"])


def fold_runs(run, folds, workers):
    """[run(fold) for fold in range(folds)] in `workers` forked processes on one BLAS thread each: `run`
    (itm._fold_run with a model's prepared features bound) is inherited, never pickled; only each
    fold's small result comes back."""
    if "fork" not in mp.get_all_start_methods():
        raise ValueError("no fork on this platform")
    with fork_pool(workers, _fold_init, (run,)) as pool:
        return list(pool.map(_pool_fold, range(folds)))


def _fold_init(run):
    _POOL.update(run=run)
    if itm.ThreadpoolController is not None:
        _POOL["limit"] = itm.ThreadpoolController().limit(limits=1, user_api="blas")


def _pool_fold(fold):
    return _POOL["run"](fold)


@contextlib.contextmanager
def make_executor(scheduler):
    """An executor for rank()/score_grid() on a Dask cluster (the optional `cluster` extra):
    scheduler "local:N" starts a LocalCluster of N single-threaded worker processes on this machine;
    anything else is the address of a running scheduler ("tcp://host:8786"). A task whose worker dies
    is retried on another (twice); one that keeps failing is reported, not lost."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise ValueError("--scheduler needs Dask: pip install 'itm-transferability[cluster]'") from None
    with contextlib.ExitStack() as stack:
        if scheduler.startswith("local:"):
            workers = scheduler[len("local:"):]
            if not workers.isdigit() or int(workers) < 1:
                raise ValueError(f"--scheduler local:N needs N ≥ 1 workers, got {scheduler!r}")
            if int(workers) > 8 * itm.cores():           # each worker is a process of its own
                raise ValueError(f"--scheduler local:N: at most {8 * itm.cores()} worker processes on this "
                                 f"machine ({itm.cores()} cores), got {workers}")
            stack.enter_context(_without_malloc_trim())
            cluster = stack.enter_context(LocalCluster(n_workers=int(workers), threads_per_worker=1,
                                                       processes=True, dashboard_address=None))
            client = stack.enter_context(Client(cluster))
        else:
            try:
                client = stack.enter_context(Client(scheduler))
            except (OSError, TimeoutError) as err:
                raise ValueError(f"cannot reach the Dask scheduler {scheduler}: {itm.one_line(err)}") from None
        yield _DaskExecutor(client)


def _without_malloc_trim():
    """Dask's nannies start workers with MALLOC_TRIM_THRESHOLD_ set, which turns off glibc's adaptive
    mmap threshold: every batch-sized temporary is then mapped and unmapped afresh, which made ITM's runs
    much slower (bench/bench_cluster.py measures it). Workers started here keep glibc's default."""
    import dask
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}))
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    return dask.config.set({"distributed.nanny.pre-spawn-environ": environ})


class _DaskExecutor:
    """client.get_executor() plus share(): features sent to the cluster once, used by every task."""

    def __init__(self, client):
        self.client, self._executor = client, client.get_executor(retries=2, pure=False)

    def submit(self, fn, *args, **kwargs):
        return self._executor.submit(fn, *args, **kwargs)

    def share(self, obj):
        # a task, not scatter(): scattered data dies with its worker and a re-scatter of the same
        # content can be cancelled by the old one's release; a task's result is recomputed elsewhere
        import dask
        with dask.config.set({"distributed.admin.large-graph-warning-threshold": "1TB"}):
            return self.client.submit(_value, obj, pure=False)


def _value(x):
    return x

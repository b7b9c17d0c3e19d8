"""Ranking accuracy of ITM vs the baselines and static priors on the real te_bench targets (the paper's
Table 1 and Fig. 3), and the ablation of ITM's protocol and readings.

Usage::

    python bench/accuracy.py                        # every target with enough ground truth: prints the
                                                    # tables, writes bench/results/results.md, .json, *.png
    python bench/accuracy.py --ablation             # + the ITM ablation (preprocess, folds, presets,
                                                    #   DESIGN.md §1a readings; slow)
    python bench/accuracy.py --jobs 2               # score each pool in 2 processes
    python bench/accuracy.py --scheduler local:4    # ... on a Dask cluster (itm.make_executor)
    python bench/accuracy.py --shared DIR           # the benchmark folder: DIR/te_bench/{features/,
                                                    #   groundtruth.json, models.json}
    python bench/accuracy.py --readme README.md --docs docs/results.md   # run, then replace the README's
                                                    #   trust table and docs/results.md's tables
    python bench/accuracy.py --readme README.md --docs docs/results.md --readme-only   # from the stored
                                                    #   <out>/results.json, run nothing
    python bench/accuracy.py --ladder RUNS --ladder-docs docs/ladder.md   # the budget ladder (DESIGN.md §7)
                                                    #   from <out>/results.json, the short rungs' runs
                                                    #   file RUNS and the benchmark's own runs; run nothing
    pytest bench/bench_accuracy.py --benchmark-only # timing side: ITM vs each baseline, one model

This file is the pipeline (load, score, evaluate); bench/report.py writes the tables, the README region
and the figures from the results it returns. Protocol (every choice is here, and in the generated notes):

* Targets: every ``features/<target>.npz`` with ground truth in ``groundtruth.json``. A target is scored on
  its models with ground truth only, and only when at least ``--min-models`` (8) of them have it: a
  ranking of fewer models says little (τ_w of 2 models is ±1). Features are used as stored (float16).
* ITM: ``itm.itm_score`` per model with ``itm.Config()`` (its defaults, plus ``--itm`` overrides), seeds
  0 … ``--seeds``−1 (10); τ_w mean ± sd (ddof 0) over the seeds, and the τ_w of each model's mean score
  over the seeds. A diverged run (score NaN) ranks last (tied). Every ITM row is named from its Config.
* Baselines: every method of ``baselines.py`` that applies, named by ``baselines.DISPLAY_NAMES``;
  pool-relative ones (ETran, NCTI, SA) through their per-model parts + ``combine`` over the target's
  pool. LEEP and NCE need source-model logits, which the features do not carry: "n/a". Scores are rounded
  to 10 significant digits before ranking, so that round-off cannot order models a method scores equally
  (H-score saturates at C − 1 when D ≳ N); ties are reported in the notes.
* Static priors, which never look at the target features: parameter count (``models.json``), feature
  dimension D (the features' shape), and each model's mean normalised fine-tuned rank on the other
  targets (leave one target out; only targets whose truth is complete and has that model count).
* Bad input: a method that fails on a model (raises, or returns a non-finite score) gets "n/a (reason)"
  for that model and is evaluated on the others, with a note; below ``--min-models`` models it is n/a.
* Metrics: ``kendall.evaluate`` (τ_w as scipy.stats.weightedtau, Kendall τ-b, Spearman ρ, Rel@1); the
  uncertainty of τ_w: a percentile 95 % bootstrap interval over the target's models (resampled with
  replacement, ``--bootstrap`` 1000 resamples, seed ``--bootstrap-seed`` 0, the same resamples for every
  method scored on the same models).
* Stability: ``kendall.stability`` over every k-subset (k = 10) of each pool when there are at most
  ``--max-subsets`` (400,000), else a seeded sample of ``--subset-sample`` subsets (seed 0).
* Ablation (``--ablation``): one option varied at a time from the default Config — every ``preprocess``
  choice, ``folds`` in ``--ablation-folds`` (1, 2, 3, 4, 5), the presets "paper" and "authors"
  (``itm.preset``), every other choice of the DESIGN.md §1a reading options — each with
  ``--ablation-seeds`` (5) seeds: τ_w mean ± sd, τ_w of the seed-mean score, diverged runs, wall seconds
  per seed. A run shared by two rows (same Config and seed) is computed once.
* Seconds: wall time to score a target's pool once (ITM: per seed). They depend on the machine, its load
  and ``--jobs``; every other number is deterministic given the seeds, whatever the executor.

matplotlib is optional: without it the figures are skipped and everything else is produced.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import json
import math
import multiprocessing as mp
import os
import re
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (ROOT, HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import itm  # noqa: E402
import kendall  # noqa: E402
import ladder  # noqa: E402
import report  # noqa: E402

try:  # the table reports why the baselines are missing instead of the harness failing
    import baselines
    BASELINES_ERROR = None
except Exception as _err:  # noqa: BLE001
    baselines, BASELINES_ERROR = None, f"{type(_err).__name__}: {itm.one_line(_err)}"

PROG = "bench/accuracy.py"
SEEDS = 10                 # ITM seeds of the default row: 0 … SEEDS−1
METRICS = ("tau_w", "tau", "rho", "rel1")
TABLE1 = ("logme", "nleep", "parc", "sfda", "etran", "ped", "sa")   # the paper's Table 1: shown even if missing
BASELINE_ORDER = ("logme", "logme_published", "logme_icml", "nleep", "parc", "sfda", "etran", "ped", "sa",
                  "hscore", "reg_hscore", "transrate", "transrate_published", "gbc", "ncti", "leep", "nce")
POOL_RELATIVE = ("etran", "ncti", "sa")
NOT_APPLICABLE = {"leep": "needs source-model logits, not in the features",
                  "nce": "needs source-model logits, not in the features"}
PRIORS = {"prior_params": "Prior: parameter count (larger first)",
          "prior_dim": "Prior: feature dimension D (larger first)",
          "prior_loo": "Prior: mean fine-tuned rank on the other targets (leave one target out)"}
PREPROCESS = ("none", "rms", "center_rms", "standardize", "unit_rows")  # if itm.Config lists no choices
ABLATION_FOLDS = (1, 2, 3, 4, 5)
ABLATION_SEEDS = 5
READING_FIELDS = ("normalize", "c_scale", "shift", "centres", "score_by")   # DESIGN.md §1a
# DESIGN.md §1d: a reading in which the evolution matters, and the propagation switched off (a reference
# row: the same training with E⁽ⁿ⁾ = Θ, read by h as it was trained, not ITM, never a candidate of the
# rule of DESIGN.md §1c)
EVOLUTION_ROWS = {"c_scale=B/Z+score_by=centres": dict(c_scale="B/Z", score_by="centres"),
                  "n=0": dict(n=0, score_by="head")}
REFERENCE_ROWS = ("n=0",)
PRESET_TAGS = {"paper": "paper", "authors": "authors' reading, DESIGN.md §1b"}
SIG_DIGITS = 10       # baseline scores are rounded to this many significant digits before ranking


@dataclasses.dataclass(frozen=True)
class Settings:
    """How a run is evaluated (not what is scored)."""
    min_models: int = 8           # a target (and a method on it) needs this many models with ground truth
    bootstrap: int = 1000         # resamples of the models for the τ_w interval
    bootstrap_seed: int = 0
    stability_k: int = 10
    max_subsets: int = 400_000    # C(21, 10) = 352,716 are enumerated
    subset_sample: int = 2_000    # else this many sampled (seed 0)


@dataclasses.dataclass(frozen=True)
class Ablation:
    """Which ITM variants the ablation scores."""
    seeds: tuple = tuple(range(ABLATION_SEEDS))
    folds: tuple = ABLATION_FOLDS
    preprocess: tuple | None = None   # None: every choice itm.Config offers
    readings: bool = True
    presets: bool = True


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def _reason(err):
    text = f"{type(err).__name__}: {itm.one_line(err)}"
    return text if len(text) <= 160 else text[:157] + "..."


def label(key):
    """The display name of a baseline or prior: baselines.DISPLAY_NAMES, else the method key."""
    names = getattr(baselines, "DISPLAY_NAMES", None) or {}
    return names.get(key) or PRIORS.get(key, key)


# ---------------------------------------------------------------------------------------------- data

@dataclasses.dataclass
class Target:
    name: str
    features: dict        # model -> N×D (as stored), only models with ground truth
    labels: np.ndarray
    truth: dict           # model -> fine-tuned accuracy
    complete: bool | None
    notes: list
    n_test: int | None = None   # test images behind each fine-tuned accuracy (for the noise ceiling)


def find_bench_dir(shared=None):
    """te_bench/ under --shared (default: the shared folder beside the checkout); --shared may also
    name te_bench/ itself."""
    base = Path(shared) if shared else ROOT.parent / "shared"
    bench = base / "te_bench" if (base / "te_bench").is_dir() else base
    if not (bench / "features").is_dir():
        raise FileNotFoundError(f"--shared: no te_bench/features folder under {base}")
    return bench


def read_groundtruth(bench_dir):
    """({target: {model: acc}} of every table in groundtruth.json, {target: details})."""
    path = Path(bench_dir) / "groundtruth.json"
    if not path.exists():
        return {}, {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {itm.one_line(err)}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path} must be a JSON object {{target: {{model: fine-tuned accuracy}}}}")
    tables = {}
    for name, value in doc.items():
        if name not in ("protocol", "details") and isinstance(value, dict) and value:
            with contextlib.suppress(ValueError):      # a metadata entry, not a {model: acc} table
                tables[name] = {m: v for m, v in kendall.load_truth(path, name).items() if math.isfinite(v)}
    details = doc.get("details") if isinstance(doc.get("details"), dict) else {}
    splits = (doc.get("protocol") or {}).get("splits") if isinstance(doc.get("protocol"), dict) else None
    for name, text in (splits or {}).items():
        n_test = _test_size(text)
        if n_test and isinstance(details.get(name, {}), dict):
            details[name] = {**details.get(name, {}), "n_test": n_test}
    return tables, details


def _test_size(text):
    """The number of test images in a protocol's split description ("... test (680)", "all 468 test
    images ..."), or None."""
    match = re.search(r"test \((\d[\d,]*)\)", str(text)) or re.search(r"(\d[\d,]*) test images", str(text))
    return int(match.group(1).replace(",", "")) if match else None


def _load_target(path, truth, details):
    name = path.stem
    arrays, labels = itm.load_features(path)
    complete = details.get("complete") if isinstance(details, dict) else None
    notes = []
    if complete is False:
        notes.append(f"{name}: ground truth incomplete ({details.get('models_done', '?')} of "
                     f"{details.get('models_total', '?')} models finished); only finished models count")
    elif complete is None:
        notes.append(f"{name}: completeness not recorded in groundtruth.json details")
    kept = {m: f for m, f in arrays.items() if m in truth}
    notes += [f"{name}: {m} has no ground truth yet, skipped" for m in arrays if m not in truth]
    notes += [f"{name}: {m} has ground truth but no features, skipped" for m in truth if m not in arrays]
    return Target(name, kept, labels, {m: float(truth[m]) for m in kept}, complete, notes,
                  details.get("n_test") if isinstance(details, dict) else None)


def load_targets(bench_dir, only=None, min_models=Settings.min_models):
    """([Target], {skipped target: reason}, the ground-truth tables of the priors) for features/*.npz, in
    name order. The leave-one-target-out prior reads only tables whose truth is complete (a provisional
    one changes while its runs finish), every table when no completeness is recorded at all."""
    tables, details = read_groundtruth(bench_dir)
    targets, skipped = [], {}
    for path in sorted((Path(bench_dir) / "features").glob("*.npz")):
        if only and path.stem not in only:
            continue
        if not tables.get(path.stem):
            skipped[path.stem] = "no ground truth in groundtruth.json yet"
            continue
        target = _load_target(path, tables[path.stem], details.get(path.stem, {}))
        if len(target.truth) < min_models:
            skipped[path.stem] = (f"only {len(target.truth)} model(s) with ground truth and features "
                                  f"(a target needs {min_models})")
            continue
        targets.append(target)
    recorded = {t for t in tables if isinstance(details.get(t), dict) and "complete" in details[t]}
    if recorded:
        tables = {t: tab for t, tab in tables.items() if t in recorded and details[t]["complete"] is True}
    return targets, skipped, tables


def load_model_facts(path):
    """({model: facts}, None) from models.json, or (None, why not) when the file is absent."""
    path = Path(path)
    if not path.exists():
        return None, f"no model facts file ({path.name})"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--models-json: cannot read {path}: {itm.one_line(err)}") from None
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(models, dict):
        raise ValueError(f"--models-json: {path} has no \"models\" object {{model: {{\"params\": ...}}}}")
    return models, None


# ------------------------------------------------------------------------------------------- metrics

def rankable(scores):
    """Scores with NaN (diverged) replaced by a tie below every finite score; None if none is finite."""
    finite = [v for v in scores.values() if math.isfinite(v)]
    if not finite:
        return None
    floor = min(finite) - 1.0
    return {m: (v if math.isfinite(v) else floor) for m, v in scores.items()}


def rank_metrics(scores, truth):
    """{metric: value} of {model: score} against truth via kendall.evaluate (NaN if not computable)."""
    ranked = rankable(scores)
    if ranked is None or len(ranked) < 2:
        return {k: math.nan for k in METRICS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = kendall.evaluate({"t": ranked}, {"t": {m: truth[m] for m in ranked}}, metrics=METRICS)
    return {k: float(table[k]["t"]) for k in METRICS}


def bootstrap_tau_w(score_sets, truth, resamples, seed):
    """Percentile 95 % interval of the mean over score_sets of τ_w, the models resampled with replacement.

    score_sets: [{model: score}] on the same models (ITM: one per seed). The resamples depend only on
    (seed, number of models), so every method scored on the same models sees the same ones. A resample
    whose τ_w is undefined (all scores or all accuracies equal) is left out. Returns [lo, hi] or None.
    """
    sets = [rankable(s) for s in score_sets]
    if not sets or any(s is None for s in sets) or len(sets[0]) < 2:
        return None
    models = list(sets[0])
    S = np.array([[s[m] for m in models] for s in sets])
    g = np.array([truth[m] for m in models])
    idx = np.random.default_rng(seed).integers(0, len(models), (resamples, len(models)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = np.array([np.mean([kendall.weighted_tau(row[i], g[i]) for row in S]) for i in idx])
    stats = stats[np.isfinite(stats)]
    return [float(v) for v in np.percentile(stats, [2.5, 97.5])] if stats.size else None


def _mean_std(values):
    v = np.asarray(values, dtype=float)
    if v.size == 0 or np.isnan(v).all():
        return math.nan, math.nan
    return float(np.nanmean(v)), float(np.nanstd(v))


def _method_result(scores, errors, truth, settings, seconds=None, notes=()):
    """The record of one baseline or prior on one target: scores (None where it failed), errors per
    model, τ_w etc. on the models it scored, their bootstrap interval; n/a below min_models."""
    ok = {m: scores[m] for m in truth if m in scores and m not in errors}
    out = {"scores": {m: ok.get(m) for m in truth}, "errors": dict(errors), "seconds": seconds,
           "notes": list(notes), "scored": len(ok), "error": None, "metrics": None, "interval": None}
    if len(ok) < settings.min_models:
        first = next(iter(errors.items()), None)
        out["error"] = (f"{len(ok)} of {len(truth)} models scored, need {settings.min_models}" +
                        (f"; {first[0]}: {first[1]}" if first else ""))
        return out
    if errors:
        out["notes"].append(f"τ_w etc. on the {len(ok)} of {len(truth)} models it scored; n/a for " +
                            "; ".join(f"{m} ({why})" for m, why in errors.items()))
    out["metrics"] = rank_metrics(ok, truth)
    out["interval"] = bootstrap_tau_w([ok], truth, settings.bootstrap, settings.bootstrap_seed)
    return out


def _na(reason):
    return {"scores": None, "errors": {}, "seconds": None, "notes": [], "scored": 0, "error": reason,
            "metrics": None, "interval": None}


# ----------------------------------------------------------------------------------------- executors

def score_pool(tasks, executor=None, progress=None):
    """[fn(*args) for fn, args in tasks], in task order: in this process, or through executor.submit
    (any concurrent.futures.Executor). Each task depends only on its arguments, so the results are the
    same either way. progress(i, total, result) after each, in task order."""
    if executor is None:
        futures = None
    else:
        futures = [executor.submit(fn, *args) for fn, args in tasks]
    out = []
    for i, (fn, args) in enumerate(tasks):
        out.append(fn(*args) if futures is None else futures[i].result())
        if progress is not None:
            progress(i + 1, len(tasks), out[-1])
    return out


_BLAS_LIMIT = []  # keeps a worker's threadpool limit alive


def _limit_blas(threads):
    with contextlib.suppress(ImportError):
        from threadpoolctl import threadpool_limits
        _BLAS_LIMIT.append(threadpool_limits(limits=threads, user_api="blas"))


@contextlib.contextmanager
def make_executor(jobs=1, scheduler=None):
    """None (score in this process), a pool of `jobs` processes (BLAS threads divided among them), or the
    Dask-backed executor of itm.make_executor(scheduler=ADDRESS)."""
    if scheduler:
        with itm.make_executor(scheduler=scheduler) as executor:
            yield executor
        return
    if jobs <= 1:
        yield None
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_limit_blas, initargs=(threads,)) as ex:
        yield ex


# ----------------------------------------------------------------------------------------------- ITM

def itm_protocol(cfg):
    """How a Config splits and preprocesses, in words, e.g. "5-fold cross-fit, rms"."""
    folds = getattr(cfg, "folds", 1)
    split = "single 4/5 : 1/5 split" if folds == 1 else f"{folds}-fold cross-fit"
    return f"{split}, {getattr(cfg, 'preprocess', 'none')}"


def variant_name(cfg, tag=None):
    """The row name of an ITM Config: its protocol and every option that differs from itm.Config(),
    e.g. "ITM (default: 5-fold cross-fit, rms)" or "ITM (3-fold cross-fit, rms; c_scale=B2)"."""
    ref = itm.Config()
    diffs = [f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
             if f.name not in ("seed", "folds", "preprocess") and getattr(cfg, f.name) != getattr(ref, f.name)]
    inner = itm_protocol(cfg) + ("; " + ", ".join(diffs) if diffs else "")
    return f"ITM ({tag}: {inner})" if tag else f"ITM ({inner})"


def _itm_task(cfg, feats, labels):
    """One ITM run (a worker's task): a plain dict; a failure is its reason, never an exception."""
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # diverged runs are counted instead
            r = itm.itm_score(feats, labels, cfg)
    except Exception as err:  # noqa: BLE001 - that model is n/a, the others still count
        return {"error": _reason(err), "seconds": time.perf_counter() - start}
    return {"error": None, "score": float(r.score), "diverged": bool(r.diverged), "seconds": r.seconds,
            "trajectory": [[int(it), float(acc)] for it, acc in r.trajectory]}


def _shared(executor, features):
    """{model: features or a reference to them}: an executor with share() (itm.make_executor's) sends
    each array to the workers once instead of with every task."""
    share = getattr(executor, "share", None)
    return {m: share(f) for m, f in features.items()} if callable(share) else features


class RunCache(dict):
    """{(target, Config with seed): run} that also lives in a JSON-lines file: every run is appended as
    it finishes, and a later harness run with the same file reuses it (an interrupted sweep resumes;
    the README can be regenerated without scoring again). A line whose Config this itm.py cannot build
    is skipped. Scores are deterministic given the Config and the seed; the seconds are the original
    run's."""

    def __init__(self, path):
        super().__init__()
        self.path = Path(path)
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError, TypeError, KeyError):
                    rec = json.loads(line)
                    super().__setitem__((rec["target"], itm.Config(**rec["config"])), rec["run"])

    def __setitem__(self, key, run):
        super().__setitem__(key, run)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"target": key[0], "config": dataclasses.asdict(key[1]), "run": run}) + "\n")


def itm_runs(target, cfg, seeds, executor=None, cache=None, quiet=False):
    """One run of the pool per seed: [{"seed", "seconds" (wall per seed), "results": {model: task}}].
    cache: {(target, Config with seed): run}, so a (Config, seed) two rows share is run once."""
    cache = {} if cache is None else cache
    todo = [s for s in seeds if (target.name, dataclasses.replace(cfg, seed=s)) not in cache]
    if todo:
        models, feats = list(target.features), _shared(executor, target.features)
        tasks = [(_itm_task, (dataclasses.replace(cfg, seed=s), feats[m], target.labels))
                 for s in todo for m in models]

        def progress(i, total, out):
            state = out["error"] or ("diverged" if out["diverged"] else f"{out['score']:.2f}")
            log(f"  [{target.name}] ITM [{i}/{total}] seed {todo[(i - 1) // len(models)]} "
                f"{models[(i - 1) % len(models)]}: {state} ({out['seconds']:.1f} s)")
        start = time.perf_counter()
        outs = score_pool(tasks, executor, None if quiet else progress)
        per_seed = (time.perf_counter() - start) / len(todo)
        for j, s in enumerate(todo):
            cache[(target.name, dataclasses.replace(cfg, seed=s))] = {
                "seed": s, "seconds": per_seed,
                "results": dict(zip(models, outs[j * len(models):(j + 1) * len(models)]))}
    return [cache[(target.name, dataclasses.replace(cfg, seed=s))] for s in seeds]


def _run_record(run, ok):
    res = run["results"]
    return {"seed": run["seed"], "seconds": run["seconds"], "scores": {m: res[m]["score"] for m in ok},
            "diverged": [m for m in ok if res[m]["diverged"]]}


def summarize_itm(runs, truth, settings, trajectories=False):
    """Per-seed metrics, their mean ± sd, the metrics of the per-model mean score, bootstrap intervals."""
    errors = {}
    for run in runs:
        errors.update({m: r["error"] for m, r in run["results"].items() if r["error"] and m not in errors})
    ok = [m for m in truth if m not in errors]
    if len(ok) < settings.min_models:
        first = next(iter(errors.items()), ("", ""))
        return {"error": f"{len(ok)} of {len(truth)} models scored, need {settings.min_models}; "
                         f"{first[0]}: {first[1]}", "errors": errors}
    records = [_run_record(run, ok) for run in runs]
    for rec in records:
        rec["metrics"] = rank_metrics(rec["scores"], truth)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN models stay NaN
        mean_score = {m: float(np.nanmean([r["scores"][m] for r in records])) for m in ok}
    boot = (settings.bootstrap, settings.bootstrap_seed)
    out = {"error": None, "errors": errors, "scored": len(ok), "runs": records, "mean_score": mean_score,
           "metrics": {k: dict(zip(("mean", "std"), _mean_std([r["metrics"][k] for r in records])))
                       for k in METRICS},
           "mean_score_metrics": rank_metrics(mean_score, truth),
           "interval": bootstrap_tau_w([r["scores"] for r in records], truth, *boot),
           "mean_score_interval": bootstrap_tau_w([mean_score], truth, *boot),
           "seconds": float(np.mean([r["seconds"] for r in records])),
           "diverged": sum(len(r["diverged"]) for r in records), "runs_total": len(records) * len(ok)}
    if trajectories:
        out["trajectories"] = {m: runs[0]["results"][m]["trajectory"] for m in ok}
    return out


def run_itm(target, cfg, seeds, settings, executor=None, cache=None, quiet=False, trajectories=False):
    try:
        runs = itm_runs(target, cfg, seeds, executor, cache, quiet)
    except Exception as err:  # noqa: BLE001 - reported as n/a, the other methods still run
        return {"error": _reason(err), "errors": {}}
    return summarize_itm(runs, target.truth, settings, trajectories)


# ------------------------------------------------------------------------------------------ baselines

def baseline_names():
    """The methods of the table: the paper's Table 1 (shown even if missing), the others of baselines.py."""
    available = list(getattr(baselines, "METHODS", {}) or {})
    names = [m for m in BASELINE_ORDER if m in available or m in TABLE1 or m in NOT_APPLICABLE]
    return names + [m for m in available if m not in names]


def baseline_fn(name):
    """The per-model function of a method (for a pool-relative one: its parts); None if absent."""
    if baselines is None:
        return None
    if name in POOL_RELATIVE:
        pool = getattr(baselines, "POOL_METHODS", {}) or {}
        fn = pool.get(name) or getattr(baselines, f"{name}_parts", None)
        return fn if callable(fn) and hasattr(baselines, "combine") else None
    fn = (getattr(baselines, "METHODS", {}) or {}).get(name) or getattr(baselines, name, None)
    return fn if callable(fn) else None


def _baseline_task(name, feats, labels):
    """One method on one model (a worker's task): {"value", "warnings", "seconds", "error"}."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = baseline_fn(name)(feats, labels)
            error = None
            if name not in POOL_RELATIVE:
                value = float(value)
                error = None if math.isfinite(value) else f"non-finite score {value}"
        except Exception as err:  # noqa: BLE001 - that model is n/a, the others still count
            value, error = None, _reason(err)
    return {"value": value, "error": error, "seconds": time.perf_counter() - start,
            "warnings": list(dict.fromkeys(itm.one_line(w.message) for w in caught))}


def _tie_notes(scores):
    """Say so when several models share one (rounded) score, e.g. a method saturating."""
    values, counts = np.unique(list(scores.values()), return_counts=True)
    return [f"{c} models tie at score {v:.{SIG_DIGITS}g}" for v, c in zip(values, counts) if c > 1]


def run_baseline(name, target, settings=Settings(), executor=None):
    """The record of one method on one target's pool (see _method_result)."""
    if name in NOT_APPLICABLE:
        return _na(NOT_APPLICABLE[name])
    if baselines is None:
        return _na(f"baselines.py not importable: {BASELINES_ERROR}")
    if baseline_fn(name) is None:
        return _na("not in baselines.py")
    start = time.perf_counter()
    feats = _shared(executor, target.features)
    outs = dict(zip(target.features, score_pool(
        [(_baseline_task, (name, f, target.labels)) for f in feats.values()], executor)))
    errors = {m: o["error"] for m, o in outs.items() if o["error"]}
    values = {m: o["value"] for m, o in outs.items() if not o["error"]}
    if name in POOL_RELATIVE and values:
        try:
            values = baselines.combine(name, values)
        except Exception as err:  # noqa: BLE001
            return _na(f"combine: {_reason(err)}")
        errors.update({m: f"non-finite score {v}" for m, v in values.items() if not math.isfinite(v)})
    seconds = time.perf_counter() - start
    scores = {m: float(f"{v:.{SIG_DIGITS}g}") for m, v in values.items() if m not in errors}
    notes = list(dict.fromkeys(w for o in outs.values() for w in o["warnings"]))[:3] + _tie_notes(scores)
    return _method_result(scores, errors, target.truth, settings, seconds, notes)


# -------------------------------------------------------------------------------------- static priors

def _normalised_ranks(table):
    """{model: 0 (best fine-tuned accuracy) … 1 (worst)}, ties at their mean rank."""
    values = list(table.values())
    span = max(1, len(values) - 1)
    return {m: (sum(u > v for u in values) + (sum(u == v for u in values) - 1) / 2) / span
            for m, v in table.items()}


def _loo_prior(target, tables):
    others = {t: _normalised_ranks(tab) for t, tab in tables.items() if t != target.name and len(tab) >= 2}
    if not others:
        return {}, {m: "no other target has ground truth" for m in target.truth}
    scores, errors = {}, {}
    for m in target.truth:
        ranks = [r[m] for r in others.values() if m in r]
        if ranks:
            scores[m] = 1.0 - float(np.mean(ranks))      # higher = better, as every score here
        else:
            errors[m] = "no ground truth on another target"
    return scores, errors


def prior_scores(kind, target, facts, tables, facts_note=None):
    """({model: score}, {model: why not}) of one static prior; never reads the feature values."""
    if kind == "prior_dim":
        return {m: float(f.shape[-1]) for m, f in target.features.items()}, {}
    if kind == "prior_loo":
        return _loo_prior(target, tables)
    if facts is None:
        return {}, {m: facts_note or "no model facts" for m in target.truth}
    scores, errors = {}, {}
    for m in target.truth:
        params = (facts.get(m) or {}).get("params")
        if isinstance(params, (int, float)) and not isinstance(params, bool) and math.isfinite(params):
            scores[m] = float(params)
        else:
            errors[m] = "no parameter count in models.json"
    return scores, errors


def run_prior(kind, target, facts, tables, settings=Settings(), facts_note=None):
    scores, errors = prior_scores(kind, target, facts, tables, facts_note)
    ok = {m: v for m, v in scores.items() if m not in errors}
    return _method_result(scores, errors, target.truth, settings, notes=_tie_notes(ok) if ok else [])


# ------------------------------------------------------------------------------------------ stability

def _sample_subsets(M, k, n, seed):
    rng, seen = np.random.default_rng(seed), {}
    while len(seen) < n:
        seen.setdefault(tuple(sorted(rng.choice(M, k, replace=False).tolist())), None)
    return np.array(list(seen), dtype=np.int64)


def _sampled_taus(scores_by_method, truth, k, n, seed):
    models = list(truth)
    subsets = _sample_subsets(len(models), k, n, seed)
    g = np.array([truth[m] for m in models])
    tau = {}
    for method, scores in scores_by_method.items():
        s = np.array([scores[m] for m in models])
        tau[method] = np.array([kendall.weighted_tau(s[idx], g[idx]) for idx in subsets])
    return tau


def stability_scores(target_result):
    """{method key: {model: score}} for the stability study: ITM (first seed, seed-mean score) and every
    method that scored every model of the pool."""
    out = {}
    itm_res = target_result["methods"]["itm"]
    full = set(target_result["truth"])
    if not itm_res.get("error") and not itm_res["errors"]:
        for key, scores in (("itm_seed0", itm_res["runs"][0]["scores"]), ("itm_mean", itm_res["mean_score"])):
            if rankable(scores) is not None:
                out[key] = rankable(scores)
    for name, res in target_result["methods"].items():
        if name != "itm" and not res["error"] and not res["errors"] and set(res["scores"]) == full:
            out[name] = res["scores"]
    return out


def run_stability(scores_by_method, truth, settings=Settings(), seed=0):
    """(summary for the JSON, {method: τ_w per subset}) over the k-subsets of the pool."""
    M = len(truth)
    k = min(settings.stability_k, M - 1)
    if k < 2 or len(scores_by_method) < 2:
        return {"skipped": f"pool of {M} models / {len(scores_by_method)} methods is too small"}, {}
    total = math.comb(M, k)
    sampled = total > settings.max_subsets and settings.subset_sample < total
    if sampled:
        tau = _sampled_taus(scores_by_method, truth, k, settings.subset_sample, seed)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tau = kendall.stability(scores_by_method, truth, k=k, max_subsets=total)["tau"]
    summary = {"k": k, "pool": M, "subsets": settings.subset_sample if sampled else total, "of": total,
               "sampled": sampled, "sample_seed": seed if sampled else None,
               "mean": {}, "std": {}, "itm_beats": {}}
    for method, t in tau.items():
        summary["mean"][method], summary["std"][method] = _mean_std(t)
    for key in ("itm_seed0", "itm_mean"):
        if key in tau:
            summary["itm_beats"][key] = {m: float(np.mean(tau[key] > t)) for m, t in tau.items()
                                         if not m.startswith("itm")}
    return summary, tau


# -------------------------------------------------------------------------------------- noise ceiling

NOISE_DRAWS = 1000


def noise_ceiling(truth, n_test, draws=NOISE_DRAWS, seed=0):
    """What a target can tell: τ_w of a perfect ranking (the fine-tuned accuracies themselves) against
    the truth re-measured with its own binomial noise, accuracy a on n_test images ± √(a(1 − a)/n_test),
    over `draws` seeded draws. Binomial noise is a lower bound on the truth's noise (fine-tuning seeds
    and learning-rate choice add more), so this is an upper bound on what any method can reach."""
    if not n_test:
        return {"error": "the number of test images is not recorded in groundtruth.json's protocol"}
    names = sorted(truth)
    a = np.array([truth[m] for m in names])
    se = np.sqrt(np.clip(a * (1 - a), 0.0, None) / n_test)
    rng = np.random.default_rng(seed)
    taus = np.array([kendall.weighted_tau(a, a + se * rng.standard_normal(a.size)) for _ in range(draws)])
    return {"error": None, "n_test": int(n_test), "draws": int(draws), "seed": int(seed),
            "mean": float(np.mean(taus)), "p5": float(np.percentile(taus, 5)),
            "p95": float(np.percentile(taus, 95)), "median_se": float(np.median(se))}


# ------------------------------------------------------------------------------------------- ablation

def _choices(name, fallback=()):
    for f in dataclasses.fields(itm.Config):
        if f.name == name:
            return tuple(f.metadata.get("choices") or fallback)
    return tuple(fallback)


def _preset(name, options):
    """itm.preset(name) with the --itm options that do not touch what the preset sets (a preset keeps
    its protocol; options such as iterations apply to every row)."""
    own, ref = itm.preset(name), itm.Config()
    keep = {k: v for k, v in (options or {}).items() if getattr(own, k) == getattr(ref, k)}
    return itm.preset(name, **keep)


def ablation_variants(base, spec, options=None):
    """[(key, group, tag, Config or why not)]: the default, then one option varied at a time."""
    rows = [("default", "default", "default", base)]
    for p in spec.preprocess or _choices("preprocess", PREPROCESS):
        rows.append((f"preprocess={p}", "preprocess", None, lambda p=p: dataclasses.replace(base, preprocess=p)))
    for k in spec.folds:
        rows.append((f"folds={k}", "folds", None, lambda k=k: dataclasses.replace(base, folds=k)))
    for name, tag in (PRESET_TAGS if spec.presets else {}).items():
        rows.append((f"preset={name}", "preset", tag, lambda name=name: _preset(name, options)))
    if spec.readings:
        for field in READING_FIELDS:
            default = getattr(base, field)
            values = [not default] if isinstance(default, bool) else _choices(field)
            rows += [(f"{field}={v}", "DESIGN.md §1a reading", None,
                      lambda field=field, v=v: dataclasses.replace(base, **{field: v}))
                     for v in values if v != default]
        rows += [(key, "DESIGN.md §1d evolution", None, lambda change=change: dataclasses.replace(base, **change))
                 for key, change in EVOLUTION_ROWS.items()]
    out = []
    for key, group, tag, make in rows:
        try:
            cfg = make() if callable(make) else make
        except (TypeError, ValueError, AttributeError) as err:   # an option this itm.py does not have
            cfg = _reason(err)
        out.append((key, group, tag, cfg))
    return out


def _ablation_row(res, cfg, seeds):
    if res.get("error"):
        return {"error": res["error"]}
    return {"error": None, "tau_w_mean": res["metrics"]["tau_w"]["mean"],
            "tau_w_std": res["metrics"]["tau_w"]["std"],
            "tau_w_per_seed": [r["metrics"]["tau_w"] for r in res["runs"]],
            "tau_w_of_mean_score": res["mean_score_metrics"]["tau_w"],
            "interval_of_mean_score": res["mean_score_interval"], "diverged": res["diverged"],
            "runs": res["runs_total"], "failed": res["errors"], "seconds_per_seed": res["seconds"],
            "seeds": list(seeds)}


def run_ablation(target, base, spec, settings, options=None, executor=None, cache=None, quiet=False):
    """{key: row} over ablation_variants; a Config equal to an earlier row's is {"same_as": that key}."""
    rows, seen = {}, {}
    for key, group, tag, cfg in ablation_variants(base, spec, options):
        if isinstance(cfg, str):
            rows[key] = {"group": group, "name": key, "error": cfg}
            continue
        if cfg in seen:
            rows[key] = {"group": group, "same_as": seen[cfg]}
            continue
        seen[cfg] = key
        if not quiet:
            log(f"[{target.name}] ablation: {key} ({variant_name(cfg, tag)})")
        res = run_itm(target, cfg, spec.seeds, settings, executor, cache, quiet=True)
        changed = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                   if f.name != "seed" and getattr(cfg, f.name) != getattr(base, f.name)}
        rows[key] = {"group": group, "name": variant_name(cfg, tag), "changed": changed,
                     **_ablation_row(res, cfg, spec.seeds)}
    return rows


# ------------------------------------------------------------------------------------------------ run

def score_target(target, base, seeds, methods, priors, settings, executor=None, cache=None, quiet=False):
    """Every method on one target. priors: {kind: (model facts, ground-truth tables, why no facts)}."""
    log(f"[{target.name}] {len(target.truth)} models, N={len(target.labels)}: ITM, {len(seeds)} seeds")
    out = {"models": list(target.truth), "n": int(len(target.labels)),
           "classes": int(len(np.unique(target.labels))), "complete": target.complete,
           "notes": list(target.notes), "truth": target.truth,
           "noise_ceiling": noise_ceiling(target.truth, target.n_test),
           "methods": {"itm": run_itm(target, base, seeds, settings, executor, cache, quiet, trajectories=True)}}
    for name in methods:
        res = run_baseline(name, target, settings, executor)
        state = f"n/a ({res['error']})" if res["error"] else f"τ_w {res['metrics']['tau_w']:.3f}"
        log(f"[{target.name}] {label(name)}: {state}" + (f" ({res['seconds']:.1f} s)" if res["seconds"] else ""))
        out["methods"][name] = res
    for kind in priors:
        facts, tables, facts_note = priors[kind]
        out["methods"][kind] = run_prior(kind, target, facts, tables, settings, facts_note)
    return out


def complete_targets(results):
    """The targets whose ground truth is complete (details[target].complete), in order."""
    return [t for t, res in results["targets"].items() if res.get("complete") is True]


def summarize(results, only=None):
    """Mean τ_w over targets (only: those names), per method (ITM: per seed, then mean ± sd over the
    seeds)."""
    targets = [r for t, r in results["targets"].items() if only is None or t in only]
    summary = {}
    itms = [t["methods"]["itm"] for t in targets]
    if targets and not any(r.get("error") for r in itms):
        per_seed = np.mean([[run["metrics"]["tau_w"] for run in r["runs"]] for r in itms], axis=0)
        summary["itm"] = dict(zip(("mean", "std"), _mean_std(per_seed)))
        summary["itm"]["mean_score"] = float(np.mean([r["mean_score_metrics"]["tau_w"] for r in itms]))
    for name in results["methods"] + results["priors"]:
        vals = [t["methods"][name] for t in targets]
        if targets and not any(v["error"] for v in vals):
            summary[name] = {"mean": float(np.mean([v["metrics"]["tau_w"] for v in vals]))}
    return summary


def _labels(base, seeds, methods, priors):
    name = variant_name(base, "default")
    out = {"itm": name, "itm_seed0": f"{name}, seed {seeds[0]}",
           "itm_mean": f"{name}, mean score over {len(seeds)} seeds"}
    return {**out, **{m: label(m) for m in list(methods) + list(priors)}}


def run(bench_dir, seeds=tuple(range(SEEDS)), methods=None, targets=None, itm_options=None, ablation=None,
        settings=Settings(), executor=None, models_json=None, priors=tuple(PRIORS), quiet=False, cache=None):
    """Everything but files: (results as JSON-able dict, {target: {method: τ_w per subset}}).
    ablation: an Ablation, or None for none; cache: a RunCache (or dict) of ITM runs to reuse."""
    start = time.perf_counter()
    methods = list(methods) if methods is not None else baseline_names()
    loaded, skipped, tables = load_targets(bench_dir, targets, settings.min_models)
    facts, facts_note = load_model_facts(models_json or Path(bench_dir) / "models.json")
    base = itm.Config(**(itm_options or {}))
    results = {"seeds": list(seeds), "itm_options": dict(itm_options or {}),
               "itm_config": dataclasses.asdict(base), "methods": methods, "priors": list(priors),
               "labels": _labels(base, seeds, methods, priors), "metric_keys": list(METRICS),
               "settings": dataclasses.asdict(settings), "sig_digits": SIG_DIGITS,
               "skipped_targets": skipped, "targets": {}, "stability": {},
               "ablation": {} if ablation else None,
               "ablation_spec": dataclasses.asdict(ablation) if ablation else None}
    arrays, cache = {}, ({} if cache is None else cache)
    prior_inputs = {k: (facts, tables, facts_note) for k in priors}
    for target in loaded:
        res = score_target(target, base, seeds, methods, prior_inputs, settings, executor, cache, quiet)
        results["targets"][target.name] = res
        log(f"[{target.name}] stability")
        results["stability"][target.name], arrays[target.name] = run_stability(
            stability_scores(res), target.truth, settings)
        if ablation:
            results["ablation"][target.name] = run_ablation(target, base, ablation, settings, itm_options,
                                                            executor, cache, quiet)
    results["summary"] = summarize(results)
    results["complete_targets"] = complete_targets(results)
    results["summary_complete"] = summarize(results, results["complete_targets"])
    results["wall_seconds"] = time.perf_counter() - start
    return results, arrays


# ----------------------------------------------------------------------------------------------- CLI

def _count(minimum):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer ≥ {minimum}, got {text!r}")
        return value
    return parse


def _int_list(text):
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers ≥ 1, got {text!r}")
    return values


def parse_args(argv):
    p = itm.CLIParser(prog=PROG, description=__doc__.split("\n")[0],
                      epilog="Files: DIR/te_bench/features/<target>.npz (one float16 N×D array per model "
                             "plus 'labels'), DIR/te_bench/groundtruth.json ({target: {model: fine-tuned "
                             "accuracy}} plus 'details'), DIR/te_bench/models.json ({\"models\": {model: "
                             "{\"params\": ...}}}).")
    a = p.add_argument
    a("--shared", metavar="DIR", help="the benchmark folder holding te_bench/ (or te_bench/ itself); "
      "default: a folder named shared beside this checkout")
    a("--models-json", metavar="PATH", help="static model facts for the priors (default: "
      "models.json in te_bench/)")
    a("--out", default=str(HERE / "results"), metavar="DIR", help="output folder (default bench/results)")
    a("--seeds", type=_count(1), default=SEEDS, metavar="N", help=f"ITM seeds 0..N-1 (default {SEEDS})")
    a("--jobs", type=_count(1), default=1, metavar="N", help="score each pool in N processes")
    a("--scheduler", metavar="ADDRESS", help="score on Dask (itm.make_executor): a scheduler address, or "
      "local:N for a local cluster of N workers; its workers must import this checkout's modules")
    a("--methods", help="comma-separated baselines and priors (default: every one); priors: " +
      ", ".join(PRIORS))
    a("--targets", help="comma-separated targets (default: every one with enough ground truth)")
    a("--itm", action="append", default=[], metavar="KEY=VALUE",
      help="an itm.Config option for every ITM run (e.g. iterations=100)")
    a("--min-models", type=_count(2), default=Settings.min_models, metavar="N",
      help=f"models with ground truth a target (and a method) needs (default {Settings.min_models})")
    a("--bootstrap", type=_count(1), default=Settings.bootstrap, metavar="B",
      help=f"bootstrap resamples of the models for the τ_w interval (default {Settings.bootstrap})")
    a("--bootstrap-seed", type=_count(0), default=Settings.bootstrap_seed, metavar="SEED")
    a("--ablation", action="store_true", help="also run the ITM ablation (slow)")
    a("--ablation-seeds", type=_count(1), default=ABLATION_SEEDS, metavar="N",
      help=f"seeds 0..N-1 of every ablation row (default {ABLATION_SEEDS})")
    a("--ablation-folds", type=_int_list, default=ABLATION_FOLDS, metavar="K,K,...",
      help="folds values of the ablation (default " + ",".join(map(str, ABLATION_FOLDS)) + ")")
    a("--ablation-preprocess", metavar="P,P,...", help="preprocess values of the ablation (default: "
      "every choice of itm.Config)")
    a("--no-readings", action="store_true", help="ablation without the DESIGN.md §1a and §1d reading rows")
    a("--no-presets", action="store_true", help="ablation without the preset rows")
    a("--stability-k", type=_count(2), default=Settings.stability_k, metavar="K")
    a("--max-subsets", type=_count(1), default=Settings.max_subsets,
      help="enumerate every k-subset up to this many, else sample")
    a("--subset-sample", type=_count(1), default=Settings.subset_sample, help="subsets sampled (seed 0)")
    a("--cache", metavar="FILE", help="keep every ITM run in this JSON-lines file and reuse the runs it "
      "holds (same target, Config and seed): an interrupted run resumes")
    a("--no-figures", action="store_true")
    a("--readme", metavar="PATH", help="replace the <!-- trust:begin/end --> region of this file (README.md) "
      "with the trust table")
    a("--docs", metavar="PATH", help="replace the <!-- results:begin/end --> region of this file "
      "(docs/results.md) with every table")
    a("--ladder", metavar="RUNS", help="the budget ladder (DESIGN.md §7): every rung's τ_w, Rel@1 and cost "
      "and the rule's choice, from <out>/results.json, RUNS (the runs file of bench/finetune.py --rung) and "
      "te_bench/finetune_runs.jsonl; writes <out>/ladder.json and <out>/ladder.svg, runs nothing else")
    a("--ladder-docs", metavar="PATH", help="with --ladder: replace the <!-- ladder:begin/end --> region of "
      "this file (docs/ladder.md); the plot goes beside it as ladder.svg")
    a("--ladder-readme", metavar="PATH", help="with --ladder: replace the <!-- budget:begin/end --> region of "
      "this file (README.md) with the procedure chosen per budget")
    a("--readme-only", action="store_true", help="with --readme and/or --docs: render <out>/results.json "
      "into them, run nothing")
    return p.parse_args(argv)


def _typed(field, text):
    """text as the type of an itm.Config field's default (None-default fields: an int or "none")."""
    default = field.default
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"--itm {field.name}: expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    if default is None and text.lower() == "none":
        return None
    cast = int if default is None or isinstance(default, int) else type(default)
    try:
        return cast(text)
    except ValueError:
        raise ValueError(f"--itm {field.name}: expected {cast.__name__}, got {text!r}") from None


def itm_options(pairs):
    """{field: typed value} from KEY=VALUE strings, checked by building the Config."""
    fields = {f.name: f for f in dataclasses.fields(itm.Config)}
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields or key == "seed":
            raise ValueError(f"--itm {pair!r}: expected KEY=VALUE with KEY an itm.Config option other than "
                             f"seed ({', '.join(k for k in fields if k != 'seed')})")
        out[key] = _typed(fields[key], value)
    itm.Config(**out)
    return out


def _split(text):
    return [v.strip() for v in text.split(",") if v.strip()] if text else None


def _check_names(args, bench):
    """--methods, --targets, --ablation-preprocess against what exists."""
    known = baseline_names() + [m for m in NOT_APPLICABLE if m not in baseline_names()] + list(PRIORS)
    for m in _split(args.methods) or []:
        if m not in known:
            raise ValueError(f"--methods: unknown method {m!r} (choose from {', '.join(known)})")
    present = sorted(p.stem for p in (bench / "features").glob("*.npz"))
    for t in _split(args.targets) or []:
        if t not in present:
            raise ValueError(f"--targets: no features/{t}.npz (present: {', '.join(present) or 'none'})")
    choices = _choices("preprocess", PREPROCESS)
    for v in _split(args.ablation_preprocess) or []:
        if v not in choices:
            raise ValueError(f"--ablation-preprocess: {v!r} is not one of {', '.join(choices)}")


def prepare(args):
    """Every check before any work: the keyword arguments of run(), or a one-line ValueError."""
    if args.scheduler and args.jobs > 1:
        raise ValueError("--scheduler and --jobs: give one of them")
    if args.scheduler and not hasattr(itm, "make_executor"):
        raise ValueError("--scheduler: this itm.py has no make_executor")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out: {args.out} is not a folder")
    _check_pages(args)
    bench = find_bench_dir(args.shared)
    _check_names(args, bench)
    if args.models_json and not Path(args.models_json).is_file():
        raise ValueError(f"--models-json: no file {args.models_json}")
    load_model_facts(args.models_json or bench / "models.json")
    names = _split(args.methods)
    ablation = Ablation(tuple(range(args.ablation_seeds)), tuple(args.ablation_folds),
                        tuple(_split(args.ablation_preprocess) or ()) or None, not args.no_readings,
                        not args.no_presets)
    return dict(bench_dir=bench, seeds=tuple(range(args.seeds)), itm_options=itm_options(args.itm),
                methods=None if names is None else [m for m in names if m not in PRIORS],
                priors=tuple(PRIORS) if names is None else tuple(m for m in names if m in PRIORS),
                targets=_split(args.targets), ablation=ablation if args.ablation else None,
                models_json=args.models_json, cache=RunCache(args.cache) if args.cache else None,
                settings=Settings(args.min_models, args.bootstrap, args.bootstrap_seed, args.stability_k,
                                  args.max_subsets, args.subset_sample))


def command_line(argv):
    """The command that reproduces the numbers: this one without the README and cache options."""
    keep, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--readme", "--docs", "--cache", "--ladder-docs", "--ladder-readme"):
            skip = True
        elif not a.startswith(("--readme", "--docs=", "--cache=", "--ladder-docs=", "--ladder-readme=")):
            keep.append(a)
    return " ".join(["python bench/accuracy.py"] + [shlex.quote(a) for a in keep])


def _check_pages(args):
    """--readme and --docs name files with their region's markers, before any work."""
    if args.readme:
        report.check_region(args.readme, "--readme", report.TRUST_BEGIN, report.TRUST_END)
    if args.docs:
        report.check_region(args.docs, "--docs")


def _write_pages(args, results):
    """The trust table into --readme, every table into --docs (figure links relative to that page)."""
    if args.readme:
        report.update_region(args.readme, report.render_trust(results), report.TRUST_BEGIN, report.TRUST_END)
        log(f"replaced the trust region of {args.readme}")
    if args.docs:
        report.update_region(args.docs, report.render(results, Path(args.docs).resolve().parent))
        log(f"replaced the results region of {args.docs}")


LADDER_BEGIN, LADDER_END = "<!-- ladder:begin -->", "<!-- ladder:end -->"
BUDGET_BEGIN, BUDGET_END = "<!-- budget:begin -->", "<!-- budget:end -->"


def build_ladder(results: dict, short_runs: list[dict], bench_dir: Path) -> dict:
    """Every target's ladder (bench/ladder.py) and the rule's evaluation and choice."""
    full = finetune_runs(bench_dir)
    _, details = read_groundtruth(bench_dir)
    facts, why = load_model_facts(bench_dir / "models.json")
    if facts is None:
        raise ValueError(f"--ladder: {why} (each model's fine-tuning family)")
    families = {m: f["family"] for m, f in facts.items()}
    ladders = {}
    for name, target in sorted(results["targets"].items()):
        chosen = {m: d["chosen_lr"] for m, d in details[name]["per_model"].items()}
        ladders[name] = ladder.target_ladder(target, [r for r in short_runs if r["target"] == name],
                                             [r for r in full if r["target"] == name], families, chosen)
    evaluated = ladder.evaluate(ladders)
    spent: dict = {}   # {target: {E: seconds of every short run}}
    for r in short_runs:
        if r["target"] in ladders:
            spent.setdefault(r["target"], {}).setdefault(r["epochs"], 0.0)
            spent[r["target"]][r["epochs"]] += r["seconds"]
    return {"ladders": ladders, "evaluated": evaluated, "chosen": ladder.choose(evaluated), "spent": spent}


def finetune_runs(bench_dir: Path) -> list[dict]:
    """The benchmark's own fine-tuning runs (te_bench/finetune_runs.jsonl), every one behind its truth."""
    path = bench_dir / "finetune_runs.jsonl"
    if not path.is_file():
        raise ValueError(f"--ladder: no {path} (the benchmark's runs file)")
    return ladder.read_runs(path)


def render_ladder(lad: dict, command: str) -> str:
    """docs/ladder.md's generated region: the rule's choice, the best candidates, one table per target."""
    targets = list(lad["ladders"])
    lines = [f"Written by `{command}` on {time.strftime('%Y-%m-%d')}.", "",
             "### The procedure per budget (DESIGN.md §7)", "",
             *ladder.procedures_table(lad["evaluated"], lad["chosen"], targets),
             "The short rungs cost, in all (seconds of every run, with its validation and batch-norm "
             "passes): " + "; ".join(f"{t} " + ", ".join(f"E = {e}: {sec:.0f} s" for e, sec in sorted(
                 lad["spent"].get(t, {}).items())) for t in targets) + ".", "",
             "### Every rung, per target", "",
             "† seconds of the benchmark's own runs (its machine); every other time is this machine's. "
             "Share: of the full protocol's seconds on the machine that timed the row.", ""]
    for t in targets:
        lines += ladder.target_table(t, lad["ladders"][t],
                                     lambda key: "ITM (default, seed 0)" if key == "itm" else label(key))
    return "\n".join(lines)


def render_budget(lad: dict, command: str) -> str:
    """The README's budget region: the procedure DESIGN.md §7 chose per budget, τ_w per target."""
    targets = list(lad["ladders"])
    lines = ["| budget | procedure | " + " | ".join(f"{t} τ_w" for t in targets)
             + " | compute (share of the full protocol) |", "|" + "---|" * (len(targets) + 3)]
    for tier, c in lad["chosen"].items():
        per = " | ".join(ladder._f(c["per_target"][t]["tau_w"]) for t in targets)
        budget = "seconds per model" if tier == "seconds" else tier.replace("<=", "≤")
        lines.append(f"| {budget} | {ladder.describe(c['rung'], c['k'])} | {per} | "
                     f"{ladder._pct(c['share_max'])} at most |")
    return "\n".join(["", *lines, "", f"(`{command}`, {time.strftime('%Y-%m-%d')}; every rung: "
                       "[docs/ladder.md](docs/ladder.md).)", ""])


def _ladder_main(args, argv) -> int:
    """--ladder: render the budget ladder from stored results and runs; nothing is scored or trained."""
    stored = Path(args.out) / "results.json"
    if not stored.is_file():
        raise ValueError(f"--ladder: no {stored} (run bench/accuracy.py first)")
    if args.ladder_docs:
        report.check_region(args.ladder_docs, "--ladder-docs", LADDER_BEGIN, LADDER_END)
    if args.ladder_readme:
        report.check_region(args.ladder_readme, "--ladder-readme", BUDGET_BEGIN, BUDGET_END)
    runs_path = Path(args.ladder)
    if not runs_path.is_file():
        raise ValueError(f"--ladder: no runs file {runs_path}")
    short = [r for r in ladder.read_runs(runs_path) if r.get("rung")]
    lad = build_ladder(json.loads(stored.read_text(encoding="utf-8")), short, find_bench_dir(args.shared))
    text = render_ladder(lad, command_line(argv))
    print(text)
    svg = ladder.svg_plot(lad["ladders"])
    (Path(args.out) / "ladder.svg").write_text(svg, encoding="utf-8")
    (Path(args.out) / "ladder.json").write_text(json.dumps(
        {"chosen": {k: v["name"] for k, v in lad["chosen"].items()}, "evaluated": lad["evaluated"],
         "rows": {t: lt["rows"] for t, lt in lad["ladders"].items()}}, indent=1, default=str), encoding="utf-8")
    if args.ladder_docs:
        report.update_region(args.ladder_docs, text, LADDER_BEGIN, LADDER_END)
        (Path(args.ladder_docs).resolve().parent / "ladder.svg").write_text(svg, encoding="utf-8")
        log(f"replaced the ladder region of {args.ladder_docs}")
    if args.ladder_readme:
        report.update_region(args.ladder_readme, render_budget(lad, command_line(argv)), BUDGET_BEGIN, BUDGET_END)
        log(f"replaced the budget region of {args.ladder_readme}")
    return 0


def _main(argv):
    start = time.perf_counter()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.ladder:
        return _ladder_main(args, argv)
    if args.ladder_docs or args.ladder_readme:
        raise ValueError("--ladder-docs and --ladder-readme need --ladder RUNS")
    if args.readme_only:
        if not (args.readme or args.docs):
            raise ValueError("--readme-only needs --readme PATH or --docs PATH")
        _check_pages(args)
        stored = Path(args.out) / "results.json"
        if not stored.is_file():
            raise ValueError(f"--readme-only: no {stored} (run without --readme-only first)")
        _write_pages(args, json.loads(stored.read_text(encoding="utf-8")))
        return 0
    kwargs = prepare(args)
    with make_executor(args.jobs, args.scheduler) as executor:
        results, arrays = run(executor=executor, **kwargs)
    results.update(command=command_line(argv), jobs=args.jobs, scheduler=args.scheduler)
    md = report.write_outputs(results, arrays, args.out, figures=not args.no_figures, start=start)
    print(md)
    log(f"wrote {args.out}/results.md, results.json; total wall time {results['wall_seconds']:.0f} s")
    _write_pages(args, results)
    return 0


def main(argv=None):
    return itm.run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())

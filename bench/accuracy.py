"""Ranking accuracy of ITM vs the baselines on the real te_bench targets (the paper's Table 1 and Fig. 3).

Usage::

    python bench/accuracy.py                        # every target with ground truth: prints the tables,
                                                    # writes bench/results/results.md, results.json, *.png
    python bench/accuracy.py --ablation             # + the SPEC §1a ablation of ITM's readings (slower)
    python bench/accuracy.py --jobs 2               # ITM in 2 processes (itm.rank(..., jobs=2))
    python bench/accuracy.py --shared PATH          # shared/ elsewhere (default <repo>/../shared)
    python bench/accuracy.py --readme README.md     # run, then replace the README's results region
    python bench/accuracy.py --readme README.md --readme-only   # paste the existing results.md only
    pytest bench/bench_accuracy.py --benchmark-only # timing side: ITM vs each baseline, one model

Protocol (every choice is here, and repeated in the generated notes):

* Targets: every ``te_bench/features/<target>.npz`` whose target has ground truth in ``groundtruth.json``.
  Incomplete targets (``details[target].complete`` false) count with their finished models only; a model
  without ground truth is skipped for that target, with a note. Features are used as stored (float16);
  each method casts as it needs.
* ITM: ``itm.rank`` with the default ``itm.Config`` and seeds 0-4; τ_w mean ± std (std with ddof 0) over
  the seeds, and the τ_w of each model's 5-seed mean score. A diverged run (score NaN) ranks last (tied).
* Baselines: every function of ``baselines.py`` that applies; pool-relative ones (ETran, NCTI, SA) through
  ``*_parts`` + ``combine`` over the target's pool; NLEEP/PARC at their documented caps (defaults). LEEP and
  NCE need source-model logits, which the features do not carry: "n/a". A method that raises or is
  missing is "n/a (reason)". Warnings a method emits (e.g. PED without ImageNet reference features) are
  listed in the notes. Baseline scores are rounded to 10 significant digits before ranking, so that
  round-off cannot order models a method scores equally (H-score saturates at C − 1 when D ≳ N: its
  raw values 15.999999999999993 / 16.0 / 16.000000000000007 are ties); ties are reported in the notes.
* Metrics: ``kendall.evaluate`` (τ_w as scipy.stats.weightedtau, Kendall τ-b, Spearman ρ, Rel@1).
* Stability: ``kendall.stability`` over every k-subset (k = 10) of each target's pool when there are at
  most ``--max-subsets`` (400,000: C(21, 10) = 352,716 fits), else a seeded random sample of
  ``--subset-sample`` subsets (seed 0). ITM enters twice: seed 0 (one run, as a user would run it) and the
  5-seed mean score. The figure plots at most 20,000 of the subsets (a seeded sample); the numbers use all.
* Seconds: wall time to score a target's whole pool once (ITM: mean over seeds). They depend on the
  machine and on its load; every other number is deterministic given the seeds.

matplotlib is optional: without it the figures are skipped and everything else is produced.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import itm  # noqa: E402
import kendall  # noqa: E402


def _one_line(exc):
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


try:  # baselines.py may be mid-edit by someone else: record why, never crash
    import baselines
    BASELINES_ERROR = None
except Exception as _err:  # noqa: BLE001
    baselines, BASELINES_ERROR = None, f"{type(_err).__name__}: {_one_line(_err)}"

SEEDS = (0, 1, 2, 3, 4)
METRICS = ("tau_w", "tau", "rho", "rel1")
METRIC_LABELS = {"tau_w": "τ_w", "tau": "Kendall τ", "rho": "Spearman ρ", "rel1": "Rel@1"}
BASELINE_ORDER = ("logme", "nleep", "parc", "sfda", "etran", "ped", "sa",   # the paper's Table 1
                  "hscore", "reg_hscore", "transrate", "gbc", "ncti", "leep", "nce")
POOL_RELATIVE = ("etran", "ncti", "sa")
NOT_APPLICABLE = {"leep": "needs source-model logits, not in the features",
                  "nce": "needs source-model logits, not in the features"}
LABELS = {"itm": "ITM", "logme": "LogME", "nleep": "NLEEP", "parc": "PARC", "sfda": "SFDA",
          "etran": "ETran", "ped": "PED", "sa": "SA (LDA)", "hscore": "H-score",
          "reg_hscore": "Reg. H-score", "transrate": "TransRate", "gbc": "GBC", "ncti": "NCTI",
          "leep": "LEEP", "nce": "NCE", "itm_seed0": "ITM (seed 0)",
          "itm_mean": "ITM (mean score over seeds)"}
ABLATION = (("default (theta, B, shift on, onehot)", {}),
            ("normalize=features", {"normalize": "features"}),
            ("normalize=none (literal)", {"normalize": "none"}),
            ("c_scale=B2", {"c_scale": "B2"}),
            ("shift=off", {"shift": False}),
            ("centers=random", {"centers": "random"}),
            ("centers=pca", {"centers": "pca"}),
            ("centers=laplacian", {"centers": "laplacian"}))
STABILITY_K = 10
MAX_SUBSETS = 400_000
SUBSET_SAMPLE = 2_000
PLOT_POINTS = 20_000
SIG_DIGITS = 10       # baseline scores are rounded to this many significant digits before ranking
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def label(method):
    return LABELS.get(method, method)


# ---------------------------------------------------------------------------------------------- data

@dataclasses.dataclass
class Target:
    name: str
    features: dict        # model -> N×D (as stored), only models with ground truth
    labels: np.ndarray
    truth: dict           # model -> fine-tuned accuracy
    complete: bool | None
    notes: list


def find_bench_dir(shared=None):
    """te_bench/ under --shared (or <repo>/../shared); --shared may also name te_bench/ itself."""
    base = Path(shared) if shared else ROOT.parent / "shared"
    bench = base / "te_bench" if (base / "te_bench").is_dir() else base
    if not (bench / "features").is_dir():
        raise FileNotFoundError(f"no te_bench/features under {base}")
    return bench


def _finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _load_target(path, truth, details):
    name = path.stem
    with np.load(path, allow_pickle=False) as z:
        labels = z["labels"]
        arrays = {k: z[k] for k in z.files if k != "labels"}
    complete = details.get("complete") if isinstance(details, dict) else None
    notes = []
    if complete is False:
        notes.append(f"{name}: ground truth incomplete ({details.get('models_done', '?')} of "
                     f"{details.get('models_total', '?')} models finished); only finished models count")
    elif complete is None:
        notes.append(f"{name}: completeness not recorded in groundtruth.json details")
    kept, gt = {}, {}
    for model, feats in arrays.items():
        if _finite(truth.get(model)):
            kept[model], gt[model] = feats, float(truth[model])
        else:
            notes.append(f"{name}: {model} has no ground truth yet, skipped")
    notes += [f"{name}: {m} has ground truth but no features, skipped" for m in truth if m not in arrays]
    return Target(name, kept, labels, gt, complete, notes)


def load_targets(bench_dir, only=None):
    """([Target], {skipped target: reason}) for every features/*.npz, in name order."""
    gt_path = Path(bench_dir) / "groundtruth.json"
    gt = json.loads(gt_path.read_text()) if gt_path.exists() else {}
    details = gt.get("details", {}) if isinstance(gt.get("details"), dict) else {}
    targets, skipped = [], {}
    for path in sorted((Path(bench_dir) / "features").glob("*.npz")):
        if only and path.stem not in only:
            continue
        truth = gt.get(path.stem)
        if path.stem in ("protocol", "details") or not isinstance(truth, dict) or not truth:
            skipped[path.stem] = "no ground truth in groundtruth.json yet"
            continue
        target = _load_target(path, truth, details.get(path.stem, {}))
        if len(target.truth) < 2:
            skipped[path.stem] = f"only {len(target.truth)} model(s) with ground truth (need 2)"
            continue
        targets.append(target)
    return targets, skipped


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
    if ranked is None:
        return {k: math.nan for k in METRICS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = kendall.evaluate({"t": ranked}, {"t": {m: truth[m] for m in ranked}}, metrics=METRICS)
    return {k: float(table[k]["t"]) for k in METRICS}


def _mean_std(values):
    v = np.asarray(values, dtype=float)
    if v.size == 0 or np.isnan(v).all():
        return math.nan, math.nan
    return float(np.nanmean(v)), float(np.nanstd(v))


# ----------------------------------------------------------------------------------------------- ITM

def _itm_progress(target, seed):
    def progress(i, total, name, result):
        state = "diverged" if result.diverged else f"{result.score:.2f}"
        log(f"  [{target}] ITM seed {seed}: {i}/{total} {name} {state} ({result.seconds:.1f} s)")
    return progress


def itm_runs(target, seeds, jobs=1, options=None, quiet=False):
    """One itm.rank per seed: [{seed, scores, diverged, seconds, trajectories (first seed only)}]."""
    runs = []
    for i, seed in enumerate(seeds):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # diverged runs are counted instead
            ranked = dict(itm.rank(target.features, target.labels, jobs=jobs, seed=seed,
                                   progress=None if quiet else _itm_progress(target.name, seed),
                                   **(options or {})))
        run = {"seed": seed, "seconds": time.perf_counter() - start,
               "scores": {m: float(ranked[m].score) for m in target.features},
               "diverged": [m for m in target.features if ranked[m].diverged]}
        if i == 0:
            run["trajectories"] = {m: [[int(it), float(acc)] for it, acc in ranked[m].trajectory]
                                   for m in target.features}
        runs.append(run)
    return runs


def summarize_itm(runs, truth):
    """Per-seed metrics, their mean ± std, and the metrics of the per-model mean score."""
    for run in runs:
        run["metrics"] = rank_metrics(run["scores"], truth)
    models = list(truth)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
        mean_score = {m: float(np.nanmean([r["scores"][m] for r in runs])) for m in models}
    return {"runs": runs,
            "metrics": {k: dict(zip(("mean", "std"), _mean_std([r["metrics"][k] for r in runs])))
                        for k in METRICS},
            "mean_score": mean_score,
            "mean_score_metrics": rank_metrics(mean_score, truth),
            "seconds": float(np.mean([r["seconds"] for r in runs])),
            "seconds_total": float(sum(r["seconds"] for r in runs)),
            "diverged": sum(len(r["diverged"]) for r in runs),
            "runs_total": len(runs) * len(models),
            "error": None}


def run_itm(target, seeds, jobs=1, options=None, quiet=False):
    try:
        return summarize_itm(itm_runs(target, seeds, jobs, options, quiet), target.truth)
    except Exception as err:  # noqa: BLE001 - reported as n/a, the other methods still run
        return {"error": f"{type(err).__name__}: {_one_line(err)}"}


# ------------------------------------------------------------------------------------------ baselines

def baseline_names():
    """The methods of the table: the paper's Table 1 first, then every other one of baselines.py."""
    names = list(BASELINE_ORDER)
    extra = getattr(baselines, "METHODS", {}) if baselines is not None else {}
    return names + [m for m in extra if m not in names]


def _scorer(name):
    """pool, labels -> {model: score}; None if baselines.py lacks the method."""
    if name in POOL_RELATIVE and hasattr(baselines, f"{name}_parts") and hasattr(baselines, "combine"):
        parts = getattr(baselines, f"{name}_parts")
        return lambda pool, y: baselines.combine(name, {m: _per_model(m, parts, f, y)
                                                        for m, f in pool.items()})
    fn = getattr(baselines, name, None)
    if not callable(fn):
        return None
    return lambda pool, y: {m: float(_per_model(m, fn, f, y)) for m, f in pool.items()}


class _ModelError(Exception):
    pass


def _per_model(model, fn, feats, y):
    try:
        return fn(feats, y)
    except Exception as err:  # noqa: BLE001
        raise _ModelError(f"{model}: {type(err).__name__}: {_one_line(err)}") from err


def _tie_notes(scores):
    """Say so when several models share one (rounded) score, e.g. a method saturating."""
    values, counts = np.unique(list(scores.values()), return_counts=True)
    return [f"{c} models tie at score {v:.{SIG_DIGITS}g}" for v, c in zip(values, counts) if c > 1]


def _na(reason):
    return {"scores": None, "seconds": None, "error": reason, "notes": [], "metrics": None}


def run_baseline(name, target):
    """{"scores", "seconds", "error", "notes", "metrics"} of one method on one target's pool."""
    if name in NOT_APPLICABLE:
        return _na(NOT_APPLICABLE[name])
    if baselines is None:
        return _na(f"baselines.py not importable: {BASELINES_ERROR}")
    scorer = _scorer(name)
    if scorer is None:
        return _na("not in baselines.py")
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            scores = scorer(target.features, target.labels)
        except Exception as err:  # noqa: BLE001
            return _na(str(err) if isinstance(err, _ModelError) else f"{type(err).__name__}: {_one_line(err)}")
    seconds = time.perf_counter() - start
    bad = [m for m, v in scores.items() if not math.isfinite(v)]
    if bad:
        return _na(f"non-finite score for {bad[0]}")
    scores = {m: float(f"{v:.{SIG_DIGITS}g}") for m, v in scores.items()}
    notes = list(dict.fromkeys(_one_line(w.message) for w in caught))[:3] + _tie_notes(scores)
    return {"scores": scores, "seconds": seconds, "error": None, "notes": notes,
            "metrics": rank_metrics(scores, target.truth)}


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
    """{method key: {model: score}} for the stability study (ITM seed 0, ITM 5-seed mean, baselines)."""
    out = {}
    itm_res = target_result["methods"]["itm"]
    if not itm_res.get("error"):
        for key, scores in (("itm_seed0", itm_res["runs"][0]["scores"]), ("itm_mean", itm_res["mean_score"])):
            if rankable(scores) is not None:
                out[key] = rankable(scores)
    for name, res in target_result["methods"].items():
        if name != "itm" and not res["error"]:
            out[name] = res["scores"]
    return out


def run_stability(scores_by_method, truth, k=STABILITY_K, max_subsets=MAX_SUBSETS,
                  sample=SUBSET_SAMPLE, seed=0):
    """(summary for the JSON, {method: τ_w per subset}) over the k-subsets of the pool."""
    M = len(truth)
    k = min(k, M - 1)
    if k < 2 or len(scores_by_method) < 2:
        return {"skipped": f"pool of {M} models / {len(scores_by_method)} methods is too small"}, {}
    total = math.comb(M, k)
    sampled = total > max_subsets and sample < total
    if sampled:
        tau = _sampled_taus(scores_by_method, truth, k, sample, seed)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tau = kendall.stability(scores_by_method, truth, k=k, max_subsets=total)["tau"]
    summary = {"k": k, "pool": M, "subsets": sample if sampled else total, "of": total,
               "sampled": sampled, "sample_seed": seed if sampled else None,
               "mean": {}, "std": {}, "itm_beats": {}}
    for method, t in tau.items():
        summary["mean"][method], summary["std"][method] = _mean_std(t)
    for key in ("itm_seed0", "itm_mean"):
        if key in tau:
            summary["itm_beats"][key] = {m: float(np.mean(tau[key] > t)) for m, t in tau.items()
                                         if not m.startswith("itm")}
    return summary, tau


# ------------------------------------------------------------------------------------------- ablation

def run_ablation(target, seeds, jobs, options, default_itm, quiet=False):
    """{variant: τ_w mean ± std, τ_w of the mean score, diverged runs, seconds} for SPEC §1a's readings."""
    rows = {}
    for name, overrides in ABLATION:
        if not quiet:
            log(f"[{target.name}] ablation: {name}")
        res = default_itm if not overrides else run_itm(target, seeds, jobs, {**(options or {}), **overrides},
                                                        quiet=True)
        if res.get("error"):
            rows[name] = {"error": res["error"], "overrides": overrides}
            continue
        rows[name] = {"overrides": overrides, "tau_w_mean": res["metrics"]["tau_w"]["mean"],
                      "tau_w_std": res["metrics"]["tau_w"]["std"],
                      "tau_w_per_seed": [r["metrics"]["tau_w"] for r in res["runs"]],
                      "tau_w_of_mean_score": res["mean_score_metrics"]["tau_w"],
                      "diverged": res["diverged"], "runs": res["runs_total"],
                      "seconds_total": res["seconds_total"], "error": None}
    return rows


# ------------------------------------------------------------------------------------------------ run

def score_target(target, seeds, jobs, methods, itm_options, quiet=False):
    log(f"[{target.name}] {len(target.truth)} models, N={len(target.labels)}: ITM, {len(seeds)} seeds")
    out = {"models": list(target.truth), "n": int(len(target.labels)),
           "classes": int(len(np.unique(target.labels))), "complete": target.complete,
           "notes": list(target.notes), "truth": target.truth,
           "methods": {"itm": run_itm(target, seeds, jobs, itm_options, quiet)}}
    for name in methods:
        res = run_baseline(name, target)
        state = f"n/a ({res['error']})" if res["error"] else f"τ_w {res['metrics']['tau_w']:.3f}"
        log(f"[{target.name}] {label(name)}: {state}" + (f" ({res['seconds']:.1f} s)" if res["seconds"] else ""))
        out["methods"][name] = res
    return out


def summarize(results):
    """Mean over targets, per method (ITM: per seed, then mean ± std over the seeds)."""
    targets = list(results["targets"].values())
    summary = {}
    itms = [t["methods"]["itm"] for t in targets]
    if targets and not any(r.get("error") for r in itms):
        per_seed = np.mean([[run["metrics"]["tau_w"] for run in r["runs"]] for r in itms], axis=0)
        summary["itm"] = dict(zip(("mean", "std"), _mean_std(per_seed)))
        summary["itm"]["mean_score"] = float(np.mean([r["mean_score_metrics"]["tau_w"] for r in itms]))
    for name in results["methods"]:
        vals = [t["methods"][name] for t in targets]
        if targets and not any(v["error"] for v in vals):
            summary[name] = {"mean": float(np.mean([v["metrics"]["tau_w"] for v in vals]))}
    return summary


def run(bench_dir, seeds=SEEDS, jobs=1, methods=None, targets=None, itm_options=None, ablation=False,
        stability_k=STABILITY_K, max_subsets=MAX_SUBSETS, subset_sample=SUBSET_SAMPLE, quiet=False):
    """Everything but files: (results as JSON-able dict, {target: {method: τ_w per subset}})."""
    start = time.perf_counter()
    methods = list(methods) if methods is not None else baseline_names()
    loaded, skipped = load_targets(bench_dir, targets)
    results = {"seeds": list(seeds), "jobs": jobs, "itm_options": dict(itm_options or {}),
               "methods": methods, "skipped_targets": skipped, "targets": {}, "stability": {},
               "ablation": {} if ablation else None}
    arrays = {}
    for target in loaded:
        res = score_target(target, seeds, jobs, methods, itm_options, quiet)
        results["targets"][target.name] = res
        log(f"[{target.name}] stability")
        results["stability"][target.name], arrays[target.name] = run_stability(
            stability_scores(res), target.truth, stability_k, max_subsets, subset_sample)
        if ablation:
            results["ablation"][target.name] = run_ablation(target, seeds, jobs, itm_options,
                                                            res["methods"]["itm"], quiet)
    results["summary"] = summarize(results)
    results["wall_seconds"] = time.perf_counter() - start
    return results, arrays


# ------------------------------------------------------------------------------------------- figures

def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def plot_stability(name, summary, tau, outdir, points=PLOT_POINTS):
    """Fig. 3: ITM (seed 0) τ_w vs each baseline's τ_w per subset, y = x line; path or None."""
    plt = _pyplot()
    others = [m for m in tau if not m.startswith("itm")]
    if plt is None or "itm_seed0" not in tau or not others:
        return None
    n = len(tau["itm_seed0"])
    idx = np.sort(np.random.default_rng(0).choice(n, min(n, points), replace=False))
    cols = min(4, len(others))
    rows = -(-len(others) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    shown = np.concatenate([tau[m][idx] for m in others + ["itm_seed0"]])
    lo = max(-1.0, min(0.0, math.floor(4 * np.nanmin(shown)) / 4)) if np.isfinite(shown).any() else -1.0
    for ax, m in zip(axes.flat, others):
        ax.scatter(tau[m][idx], tau["itm_seed0"][idx], s=2, alpha=0.25, rasterized=True)
        ax.plot([-1, 1], [-1, 1], "k--", lw=0.8)
        ax.set(xlim=(lo, 1), ylim=(lo, 1), xlabel=f"{label(m)} τ_w", ylabel="ITM τ_w")
        ax.set_title(f"ITM > {label(m)}: {100 * summary['itm_beats']['itm_seed0'][m]:.0f}%", fontsize=9)
    for ax in list(axes.flat)[len(others):]:
        ax.axis("off")
    fig.suptitle(f"{name}: τ_w on {summary['subsets']:,} subsets of {summary['k']} models (ITM seed 0)")
    fig.tight_layout()
    path = Path(outdir) / f"stability_{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_trajectories(name, target_result, outdir):
    """ITM scoring accuracy vs iteration per model (seed 0), coloured by fine-tuned accuracy."""
    plt = _pyplot()
    itm_res = target_result["methods"]["itm"]
    if plt is None or itm_res.get("error"):
        return None
    truth = target_result["truth"]
    order = sorted(truth, key=truth.get, reverse=True)
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, m in enumerate(order):
        traj = np.array(itm_res["runs"][0]["trajectories"][m]).reshape(-1, 2)
        colour = cmap(0.9 * (1 - i / max(1, len(order) - 1)))
        ax.plot(traj[:, 0], traj[:, 1], marker="o", ms=3, color=colour, label=f"{m} ({truth[m]:.3f})")
    ax.set(xlabel="iteration", ylabel="ITM scoring accuracy (%)",
           title=f"{name}: ITM trajectories, seed 0 (legend: fine-tuned accuracy, best first)")
    ax.legend(fontsize=6, ncol=1, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path = Path(outdir) / f"trajectories_{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_figures(results, arrays, outdir, link_root=ROOT):
    """{target: {kind: path relative to link_root}} of the PNGs written to outdir."""
    figs = {}
    if _pyplot() is None:
        results["figures_note"] = "matplotlib not installed: figures skipped"
        return figs
    for name, res in results["targets"].items():
        stab = results["stability"][name]
        entry = {"stability": plot_stability(name, stab, arrays.get(name, {}), outdir)
                 if "skipped" not in stab else None,
                 "trajectories": plot_trajectories(name, res, outdir)}
        figs[name] = {k: _link(v, link_root) for k, v in entry.items() if v is not None}
    return figs


# ------------------------------------------------------------------------------------------ markdown

def fmt(v, digits=3):
    return "nan" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def fmt_pm(mean, std, digits=3):
    return f"{fmt(mean, digits)} ± {fmt(std, digits)}"


def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _cell(res, metric="tau_w", short=True):
    if res.get("error"):
        reason = res["error"]
        return f"n/a ({reason if not short or len(reason) <= 60 else reason[:57] + '...'})"
    return fmt(res["metrics"][metric])


def _itm_cells(res, metric="tau_w"):
    if res.get("error"):
        return f"n/a ({res['error'][:57]})", "n/a"
    m = res["metrics"][metric]
    return fmt_pm(m["mean"], m["std"]), fmt(res["mean_score_metrics"][metric])


def table1(results):
    names = list(results["targets"])
    summary = results["summary"]
    n_seeds = len(results["seeds"])
    itm_rows = [[f"ITM ({n_seeds} seeds, mean ± std)"], [f"ITM (τ_w of the {n_seeds}-seed mean score)"]]
    for name in names:
        a, b = _itm_cells(results["targets"][name]["methods"]["itm"])
        itm_rows[0].append(a)
        itm_rows[1].append(b)
    s = summary.get("itm")
    itm_rows[0].append(fmt_pm(s["mean"], s["std"]) if s else "n/a")
    itm_rows[1].append(fmt(s["mean_score"]) if s else "n/a")
    rows = itm_rows
    for m in results["methods"]:
        row = [label(m)] + [_cell(results["targets"][t]["methods"][m]) for t in names]
        rows.append(row + [fmt(summary[m]["mean"]) if m in summary else "n/a"])
    return md_table(["Method"] + names + ["Mean"], rows)


def seconds_table(results):
    names = list(results["targets"])
    rows = []
    for m in ["itm"] + results["methods"]:
        secs = [results["targets"][t]["methods"][m].get("seconds") for t in names]
        cells = ["n/a" if s is None else f"{s:.1f}" for s in secs]
        total = "n/a" if any(s is None for s in secs) else f"{sum(secs):.1f}"
        rows.append([label(m) + (" (one seed)" if m == "itm" else "")] + cells + [total])
    return md_table(["Method"] + names + ["Total"], rows)


def metrics_table(results, name):
    res = results["targets"][name]
    rows = []
    itm_res = res["methods"]["itm"]
    if itm_res.get("error"):
        rows.append(["ITM"] + [f"n/a ({itm_res['error'][:57]})"] * len(METRICS))
    else:
        rows.append([f"ITM ({len(results['seeds'])} seeds)"] +
                    [fmt_pm(itm_res["metrics"][k]["mean"], itm_res["metrics"][k]["std"]) for k in METRICS])
        rows.append(["ITM (mean score)"] + [fmt(itm_res["mean_score_metrics"][k]) for k in METRICS])
    for m in results["methods"]:
        r = res["methods"][m]
        rows.append([label(m)] + ([_cell(r)] + ["n/a"] * (len(METRICS) - 1) if r["error"]
                                  else [fmt(r["metrics"][k]) for k in METRICS]))
    return md_table(["Method"] + [METRIC_LABELS[k] for k in METRICS], rows)


def stability_table(summary):
    rows = []
    for m in summary["mean"]:
        beats = [summary["itm_beats"].get(key, {}).get(m) for key in ("itm_seed0", "itm_mean")]
        rows.append([label(m), fmt_pm(summary["mean"][m], summary["std"][m])] +
                    ["—" if b is None else f"{100 * b:.1f}%" for b in beats])
    return md_table(["Method", "τ_w over subsets (mean ± std)", "ITM (seed 0) higher in",
                     "ITM (mean score) higher in"], rows)


def ablation_table(results):
    names = list(results["ablation"])
    rows = []
    for variant, _ in ABLATION:
        row = [variant]
        for name in names:
            r = results["ablation"][name][variant]
            row += ([f"n/a ({r['error'][:50]})", "n/a", "n/a"] if r.get("error") else
                    [fmt_pm(r["tau_w_mean"], r["tau_w_std"]), fmt(r["tau_w_of_mean_score"]),
                     f"{r['diverged']}/{r['runs']}"])
        rows.append(row)
    header = ["Reading"]
    for name in names:
        header += [f"{name} τ_w (mean ± std)", f"{name} τ_w of mean score", f"{name} diverged"]
    return md_table(header, rows)


def _subset_words(s):
    if s["sampled"]:
        return (f"a seeded random sample (seed {s['sample_seed']}) of {s['subsets']:,} of the "
                f"C({s['pool']}, {s['k']}) = {s['of']:,} subsets")
    return f"all C({s['pool']}, {s['k']}) = {s['of']:,} subsets of {s['k']} models"


def _link(path, link_root):
    return os.path.relpath(path, link_root).replace(os.sep, "/")


# ----------------------------------------------------------------------------------- generated reading

def _itm_vs_baselines(results):
    s = results["summary"]
    base = {m: v["mean"] for m, v in s.items() if m != "itm" and math.isfinite(v["mean"])}
    if "itm" not in s:
        return ["ITM has no mean τ_w (it failed on a target); see the table."]
    itm_mean, n_t = s["itm"]["mean"], len(results["targets"])
    lines = []
    if base:
        best = max(base, key=base.get)
        lines.append(f"ITM's mean τ_w over {n_t} target(s) is {fmt_pm(itm_mean, s['itm']['std'])} "
                     f"({len(results['seeds'])} seeds; {fmt(s['itm']['mean_score'])} for the "
                     f"{len(results['seeds'])}-seed mean score) vs the best baseline "
                     f"{fmt(base[best])} ({label(best)}).")
        ahead = [label(m) for m in sorted(base, key=base.get) if itm_mean > base[m]]
        behind = [f"{label(m)} ({fmt(base[m])})" for m in sorted(base, key=base.get, reverse=True)
                  if base[m] >= itm_mean]
        lines.append(f"By mean τ_w, ITM ranks {len(behind) + 1} of {len(base) + 1} methods; "
                     f"ahead of it: {', '.join(behind) or 'none'}; behind it: {', '.join(ahead) or 'none'}.")
    return lines


def _per_target_lines(results):
    lines = []
    for name, res in results["targets"].items():
        itm_res = res["methods"]["itm"]
        vals = {m: r["metrics"]["tau_w"] for m, r in res["methods"].items()
                if m != "itm" and not r["error"] and math.isfinite(r["metrics"]["tau_w"])}
        if itm_res.get("error"):
            lines.append(f"{name}: ITM failed ({itm_res['error']}).")
            continue
        t = itm_res["metrics"]["tau_w"]
        if not math.isfinite(t["mean"]):
            lines.append(f"{name}: ITM's τ_w is not defined (every run diverged or tied).")
            continue
        vals["itm"] = t["mean"]
        winner = max(vals, key=vals.get)
        per_seed = [r["metrics"]["tau_w"] for r in itm_res["runs"]]
        truth, ms = res["truth"], itm_res["mean_score"]
        top = max(ms, key=lambda m: ms[m] if math.isfinite(ms[m]) else -math.inf)
        lines.append(
            f"{name} ({len(res['models'])} models): highest τ_w {label(winner)} ({fmt(vals[winner])}); ITM "
            f"{fmt_pm(t['mean'], t['std'])} (seeds range {fmt(min(per_seed))} to {fmt(max(per_seed))}), "
            f"rank {sorted(vals.values(), reverse=True).index(t['mean']) + 1} of {len(vals)}. ITM's top "
            f"model (mean score) is {top}, fine-tuned {truth[top]:.4f} vs best {max(truth.values()):.4f} "
            f"({max(truth, key=truth.get)}): Rel@1 {fmt(itm_res['mean_score_metrics']['rel1'])}.")
        if itm_res["diverged"]:
            lines.append(f"{name}: {itm_res['diverged']} of {itm_res['runs_total']} default ITM runs diverged "
                         "(ranked last).")
    return lines


def _stability_lines(results):
    lines = []
    for name, s in results["stability"].items():
        beats = s.get("itm_beats", {}).get("itm_seed0")
        if not beats:
            continue
        lo, hi = min(beats, key=beats.get), max(beats, key=beats.get)
        won = [label(m) for m in beats if beats[m] > 0.5]
        lines.append(f"{name}, stability over {_subset_words(s)}: ITM (seed 0) has a strictly higher τ_w "
                     f"than {len(won)} of {len(beats)} baselines in most subsets; least often vs "
                     f"{label(lo)} ({100 * beats[lo]:.1f}%), most often vs {label(hi)} ({100 * beats[hi]:.1f}%).")
    return lines


def _ablation_lines(results):
    if not results.get("ablation"):
        return []
    lines = []
    for name, rows in results["ablation"].items():
        ok = {v: r for v, r in rows.items() if not r.get("error") and math.isfinite(r["tau_w_mean"])}
        if not ok:
            continue
        best = max(ok, key=lambda v: ok[v]["tau_w_mean"])
        div = [f"{v} {r['diverged']}/{r['runs']}" for v, r in rows.items() if r.get("diverged")]
        default = ok.get(ABLATION[0][0], {})
        stable = [r["tau_w_mean"] for v, r in ok.items() if v != ABLATION[0][0] and not r["diverged"]]
        spread = (f" The other readings that never diverged range from {fmt(min(stable))} to "
                  f"{fmt(max(stable))}, against a seed-to-seed std of {fmt(default.get('tau_w_std'))} for the "
                  "default." if stable else "")
        lines.append(f"{name}, ITM readings: highest mean τ_w is {best} ({fmt(ok[best]['tau_w_mean'])}); "
                     f"the default gives {fmt(default.get('tau_w_mean'))}.{spread} Diverged runs: "
                     f"{', '.join(div) or 'none'}.")
    return lines


def _tie_lines(results):
    lines = []
    for name, res in results["targets"].items():
        tied = {}
        for m, r in res["methods"].items():
            if m != "itm" and not r["error"]:
                counts = np.unique(list(r["scores"].values()), return_counts=True)[1]
                if counts.max() >= 3:
                    tied[label(m)] = int(counts.max())
        if tied:
            lines.append(f"{name}: {', '.join(f'{m} ({c} models)' for m, c in tied.items())} give several "
                         "models exactly the same score (saturation); their τ_w depends on how these ties "
                         "are counted (τ_w's tie rule here).")
    return lines


def reading(results):
    """Bullets generated from the numbers (never typed by hand)."""
    lines = _itm_vs_baselines(results) + _per_target_lines(results) + _tie_lines(results)
    lines += _stability_lines(results) + _ablation_lines(results)
    n_t = len(results["targets"])
    if n_t == 1:
        name = next(iter(results["targets"]))
        lines.append(f"Only {name} has ground truth so far, so this is one dataset of "
                     f"{len(results['targets'][name]['models'])} models: the ordering of methods is fragile "
                     "(compare the gaps with ITM's seed-to-seed std).")
    return ["- " + line for line in lines]


# --------------------------------------------------------------------------------------- the fragment

def _notes(results):
    notes = [f"{name}: not scored — {why}" for name, why in results["skipped_targets"].items()]
    for name, res in results["targets"].items():
        notes += res["notes"]
        for m, r in res["methods"].items():
            if m != "itm" and r.get("notes"):
                notes += [f"{name}: {label(m)}: {w}" for w in r["notes"]]
    notes.append("A diverged ITM run (score NaN) is ranked last, tied; std is over seeds with ddof 0. "
                 "τ_w is scipy.stats.weightedtau's default (kendall.weighted_tau). Baseline scores are "
                 f"rounded to {SIG_DIGITS} significant digits before ranking (round-off must not break ties).")
    if results.get("figures_note"):
        notes.append(results["figures_note"])
    return ["- " + n for n in notes]


def render(results, link_root=ROOT):
    """The README fragment (markdown), from the results dict."""
    out = ["### Ranking accuracy (τ_w; layout of the paper's Table 1)", ""]
    out += table1(results) + ["", "Seconds to score each target's whole pool once (wall time; depends on the "
                              "machine and its load):", ""] + seconds_table(results)
    for name, res in results["targets"].items():
        out += ["", f"#### {name}: {len(res['models'])} models, N = {res['n']}, K = {res['classes']}", ""]
        out += metrics_table(results, name)
    out += ["", "### Stability (Fig. 3)", ""]
    for name, s in results["stability"].items():
        if "skipped" in s:
            out += [f"{name}: skipped ({s['skipped']}).", ""]
            continue
        out += [f"{name}: τ_w on {_subset_words(s)}.", ""] + stability_table(s) + [""]
    figs = results.get("figures", {})
    for name, f in figs.items():
        out += [f"![{name}: {kind}]({p})" for kind, p in sorted(f.items())] + [""]
    if results.get("ablation"):
        out += ["### ITM readings (SPEC §1a ablation)", "",
                f"Each option varied alone from the default, {len(results['seeds'])} seeds; diverged runs "
                "are ranked last and counted.", ""] + ablation_table(results) + [""]
    out += ["### Reading (generated from the numbers above)", ""] + reading(results)
    out += ["", "### Notes", ""] + _notes(results)
    out += ["", "Reproduce every number above (seconds aside) with:", "", "```",
            results.get("command", "python bench/accuracy.py"), "```", "",
            f"Wall time of that run: {results['wall_seconds']:.0f} s on {os.cpu_count()} cores."]
    return "\n".join(out) + "\n"


def replace_region(text, fragment, begin=BEGIN, end=END):
    """text with everything between the markers replaced by fragment; markers and the rest kept."""
    if text.count(begin) != 1 or text.count(end) != 1:
        raise ValueError(f"need exactly one {begin} and one {end}")
    i, j = text.index(begin) + len(begin), text.index(end)
    if j < i:
        raise ValueError(f"{end} comes before {begin}")
    return text[:i] + "\n" + fragment.strip("\n") + "\n" + text[j:]


def update_readme(path, fragment):
    path = Path(path)
    new = replace_region(path.read_text(encoding="utf-8"), fragment)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ outputs

def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_outputs(results, arrays, outdir, figures=True, link_root=ROOT, start=None):
    """results.json, results.md and the PNGs in outdir; returns the markdown. start: perf_counter() at
    the beginning of the whole run, to report the wall time figures included."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    if figures:
        results["figures"] = make_figures(results, arrays, outdir, link_root)
    if start is not None:
        results["wall_seconds"] = time.perf_counter() - start
    md = render(results, link_root)
    (outdir / "results.md").write_text(md, encoding="utf-8")
    (outdir / "results.json").write_text(json.dumps(_jsonable(results), indent=1, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
    return md


# ----------------------------------------------------------------------------------------------- CLI

def _parse_value(text):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench/accuracy.py", description=__doc__.split("\n")[0])
    p.add_argument("--shared", help="shared/ (or shared/te_bench) directory; default <repo>/../shared")
    p.add_argument("--out", default=str(HERE / "results"), help="output folder (default bench/results)")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="ITM seeds (default 0,1,2,3,4)")
    p.add_argument("--jobs", type=int, default=1, help="ITM processes (itm.rank jobs); baselines run serially")
    p.add_argument("--methods", help="comma-separated baselines (default: all of baselines.py)")
    p.add_argument("--targets", help="comma-separated targets (default: every one present with ground truth)")
    p.add_argument("--itm", action="append", default=[], metavar="KEY=VALUE",
                   help="an itm.Config override for every ITM run (e.g. iterations=100)")
    p.add_argument("--ablation", action="store_true", help="also run SPEC §1a's ablation (slower)")
    p.add_argument("--stability-k", type=int, default=STABILITY_K)
    p.add_argument("--max-subsets", type=int, default=MAX_SUBSETS,
                   help="enumerate every k-subset up to this many, else sample")
    p.add_argument("--subset-sample", type=int, default=SUBSET_SAMPLE, help="subsets sampled (seed 0)")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--readme", help="replace the <!-- results:begin/end --> region of this file")
    p.add_argument("--readme-only", action="store_true", help="with --readme: paste <out>/results.md, run nothing")
    return p.parse_args(argv)


def command_line(argv):
    """The command that reproduces the numbers: this one without the README options."""
    keep, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--readme":
            skip = True
            continue
        if a.startswith("--readme"):
            continue
        keep.append(a)
    return " ".join(["python bench/accuracy.py"] + [shlex.quote(a) for a in keep])


def main(argv=None):
    start = time.perf_counter()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.readme_only:
        if not args.readme:
            raise SystemExit("--readme-only needs --readme PATH")
        update_readme(args.readme, (Path(args.out) / "results.md").read_text(encoding="utf-8"))
        log(f"pasted {Path(args.out) / 'results.md'} into {args.readme}")
        return 0
    options = dict(kv.split("=", 1) for kv in args.itm)
    results, arrays = run(find_bench_dir(args.shared), tuple(int(s) for s in args.seeds.split(",")),
                          args.jobs, args.methods.split(",") if args.methods else None,
                          args.targets.split(",") if args.targets else None,
                          {k: _parse_value(v) for k, v in options.items()}, args.ablation,
                          args.stability_k, args.max_subsets, args.subset_sample)
    results["command"] = command_line(argv)
    md = write_outputs(results, arrays, args.out, figures=not args.no_figures, start=start)
    print(md)
    log(f"wrote {args.out}/results.md, results.json; total wall time {results['wall_seconds']:.0f} s")
    if args.readme:
        update_readme(args.readme, md)
        log(f"replaced the results region of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

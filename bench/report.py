"""The report of bench/accuracy.py: markdown tables, docs/results.md's region, the README's trust table and the
figures.

Nothing here scores or evaluates: every number comes from the results dict that ``accuracy.run`` returns,
and every sentence of the "Reading" and of the README's trust table is generated from those numbers, so the
docs never carry a typed claim. Row names come from ``results["labels"]`` (ITM rows: named from their Config; baselines:
``baselines.DISPLAY_NAMES``) and from each ablation row's own ``name``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import itm  # noqa: E402

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
METRIC_LABELS = {"tau_w": "τ_w", "tau": "Kendall τ", "rho": "Spearman ρ", "rel1": "Rel@1"}
PLOT_POINTS = 20_000     # subsets drawn in the stability figure (a seeded sample); the numbers use all


def name(results, key):
    return results.get("labels", {}).get(key, key)


def fmt(v, digits=3):
    return "nan" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def fmt_pm(mean, std, digits=3):
    return f"{fmt(mean, digits)} ± {fmt(std, digits)}"


def fmt_ci(interval):
    """" [lo, hi]" of a bootstrap interval (two digits: it is an uncertainty), "" if there is none."""
    return "" if not interval else f" [{fmt(interval[0], 2)}, {fmt(interval[1], 2)}]"


def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _short(reason, n=80):
    reason = " ".join(str(reason).split()).replace("|", "/")
    return reason if len(reason) <= n else reason[:n - 3] + "..."


def _na(reason):
    return f"n/a ({_short(reason)})"


def _partial(res, models):
    return f" ({res['scored']} of {len(models)} models)" if res.get("errors") else ""


# ------------------------------------------------------------------------------------------- tables

def _cell(res, models, metric="tau_w"):
    if res.get("error"):
        return _na(res["error"])
    ci = fmt_ci(res["interval"]) if metric == "tau_w" else ""
    return fmt(res["metrics"][metric]) + ci + (_partial(res, models) if metric == "tau_w" else "")


def _itm_cells(res, models):
    """(τ_w mean ± sd over seeds [interval of that mean], τ_w of the seed-mean score [its interval])."""
    if res.get("error"):
        return _na(res["error"]), "n/a"
    t = res["metrics"]["tau_w"]
    part = _partial(res, models)
    return (fmt_pm(t["mean"], t["std"]) + fmt_ci(res["interval"]) + part,
            fmt(res["mean_score_metrics"]["tau_w"]) + fmt_ci(res["mean_score_interval"]) + part)


def _summaries(results):
    """[(column header, summary)]: the mean over every target, and over the complete-truth targets when
    they are fewer (the mean DESIGN.md §1c's rule uses)."""
    out = [("Mean", results["summary"])]
    complete = results.get("complete_targets") or []
    if complete and len(complete) < len(results["targets"]):
        out.append((f"Mean of {', '.join(complete)} (complete truth)", results.get("summary_complete", {})))
    return out


def _ceiling_cell(c):
    if not c or c.get("error"):
        return _na(c["error"]) if c else "n/a"
    return f"{fmt(c['mean'])} [{fmt(c['p5'], 2)}, {fmt(c['p95'], 2)}]"


def ceiling_row(results, names, means=0):
    """The noise ceiling of each target (a perfect ranking against the truth's own binomial noise)."""
    cells = [results["targets"][t].get("noise_ceiling") for t in names]
    row = [f"Noise ceiling: a perfect ranking vs the truth re-drawn with its binomial noise "
           f"({NOISE_DRAWS_TEXT}; [5th, 95th percentile])"] + [_ceiling_cell(c) for c in cells]
    return row + ["—"] * means


NOISE_DRAWS_TEXT = "mean of 1,000 seeded draws"


def table1(results):
    names = list(results["targets"])
    n, sums = len(results["seeds"]), _summaries(results)
    rows = [[f"{name(results, 'itm')}, {n} seeds: mean ± sd"],
            [f"{name(results, 'itm')}: τ_w of the {n}-seed mean score"]]
    for t in names:
        for row, cell in zip(rows, _itm_cells(results["targets"][t]["methods"]["itm"],
                                              results["targets"][t]["models"])):
            row.append(cell)
    for _, s in sums:
        rows[0].append(fmt_pm(s["itm"]["mean"], s["itm"]["std"]) if "itm" in s else "n/a")
        rows[1].append(fmt(s["itm"]["mean_score"]) if "itm" in s else "n/a")
    for m in results["methods"] + results["priors"]:
        row = [name(results, m)] + [_cell(results["targets"][t]["methods"][m], results["targets"][t]["models"])
                                    for t in names]
        rows.append(row + [fmt(s[m]["mean"]) if m in s else "n/a" for _, s in sums])
    rows.append(ceiling_row(results, names, len(sums)))
    return md_table(["Method"] + names + [h for h, _ in sums], rows)


# ---------------------------------------------------------------------------------- the first screen

PROBES = ("probe_ridge", "probe_ncm", "probe_knn")


def glance_table(results):
    """Per target: ITM's default beside the probes, the best other baseline, the static priors and
    the noise ceiling."""
    names = list(results["targets"])
    n = len(results["seeds"])
    itm_row = [f"{name(results, 'itm')}, {n} seeds"]
    for t in names:
        r = results["targets"][t]["methods"]["itm"]
        itm_row.append(_na(r["error"]) if r.get("error") else
                       fmt_pm(r["metrics"]["tau_w"]["mean"], r["metrics"]["tau_w"]["std"]))
    rows = [itm_row]
    for m in [p for p in PROBES if p in results["methods"]] + list(results["priors"]):
        rows.append([name(results, m)] + [_cell(results["targets"][t]["methods"][m], results["targets"][t]["models"])
                                          for t in names])
    best = ["Best other baseline on the target"]
    for t in names:
        vals = {m: _tau(results["targets"][t]["methods"][m]) for m in results["methods"] if m not in PROBES}
        vals = {m: v for m, v in vals.items() if v is not None}
        best.append(f"{fmt(max(vals.values()))} ({name(results, max(vals, key=vals.get))})" if vals else "n/a")
    rows.append(best)
    rows.append(ceiling_row(results, names))
    header = ["τ_w"] + [t + ("" if results["targets"][t].get("complete") else " (truth provisional)")
                        for t in names]
    return md_table(header, rows)


def glance_words(results):
    """Where ITM ranks well and where it does not, generated from the numbers."""
    lines = []
    for t, res in results["targets"].items():
        r = res["methods"]["itm"]
        if r.get("error"):
            lines.append(f"{t}: ITM is n/a ({r['error']}).")
            continue
        x = r["metrics"]["tau_w"]["mean"]
        priors = {k: _tau(res["methods"][k]) for k in results["priors"]}
        priors = {k: v for k, v in priors.items() if v is not None}
        probes = {k: _tau(res["methods"][k]) for k in PROBES if k in res["methods"]}
        probes = {k: v for k, v in probes.items() if v is not None}
        others = [v for m, v in ((m, _tau(res["methods"][m])) for m in results["methods"]) if v is not None]
        parts = [f"ITM {fmt(x)}"]
        if priors:
            top = max(priors, key=priors.get)
            parts.append(("above every static prior" if x > priors[top] else "below the static prior "
                          f"{name(results, top)}") + f" (best prior {fmt(priors[top])})")
        if probes:
            top = max(probes, key=probes.get)
            parts.append(f"{'above' if x > probes[top] else 'below'} the best probe, {name(results, top)} "
                         f"({fmt(probes[top])})")
            follow = _follows(r["mean_score"], {k: res["methods"][k]["scores"] for k in probes})
            if follow:
                parts.append(f"its scores follow the probes' (Spearman ρ across models: {follow})")
        if others:
            parts.append(f"{sum(v > x for v in others)} of {len(others)} baselines rank higher")
        c = res.get("noise_ceiling") or {}
        if not c.get("error") and "mean" in c:
            parts.append(f"a perfect ranking would reach about {fmt(c['mean'])} against this truth")
        prov = "" if res.get("complete") else " (truth provisional)"
        lines.append(f"{t}{prov}: " + "; ".join(parts) + ".")
    return ["- " + line for line in lines]


def _follows(itm_scores, probe_scores):
    """"ridge 0.78, ncm 0.71, ...": Spearman ρ between ITM's mean scores and each probe's, over the models
    both scored."""
    import kendall
    cells = []
    for key, scores in probe_scores.items():
        common = [m for m in itm_scores if scores.get(m) is not None and math.isfinite(itm_scores[m])]
        if len(common) >= 3:
            rho = kendall.spearman_rho([itm_scores[m] for m in common], [scores[m] for m in common])
            cells.append(f"{key.replace('probe_', '')} {fmt(rho, 2)}")
    return ", ".join(cells)


def rule_table(results):
    """DESIGN.md §1c: every ablation row's criterion (mean τ_w over the complete-truth targets, each the
    mean over seeds), its τ_w per target, best first."""
    abl = results.get("ablation") or {}
    names = [t for t in results["targets"] if t in abl]
    complete = [t for t in (results.get("complete_targets") or names) if t in abl] or names
    if not names:
        return []
    first = abl[names[0]]
    rows = []
    for key, row in first.items():
        if "same_as" in row:
            continue
        per = {t: _resolve(abl[t], key) if key in abl[t] else {"error": "not run"} for t in names}
        vals = {t: r.get("tau_w_mean") for t, r in per.items() if not r.get("error")}
        crit = (float(np.mean([vals[t] for t in complete])) if all(t in vals and vals[t] is not None
                                                                  and math.isfinite(vals[t]) for t in complete)
                else float("nan"))
        cells = [fmt_pm(per[t]["tau_w_mean"], per[t]["tau_w_std"]) if t in vals else _na(per[t]["error"])
                 for t in names]
        rows.append((crit, [key, row["group"]] + cells + [fmt(crit)]))
    rows.sort(key=lambda cr: -cr[0] if math.isfinite(cr[0]) else math.inf)
    n = len(results["ablation_spec"]["seeds"])
    header = ["Row", "Group"] + [f"{t} τ_w ({n} seeds)" for t in names] + \
             [f"criterion: mean of {', '.join(complete)}"]
    return md_table(header, [r for _, r in rows])


def seconds_table(results):
    names = list(results["targets"])
    rows = []
    for m in ["itm"] + results["methods"]:
        secs = [results["targets"][t]["methods"][m].get("seconds") for t in names]
        cells = ["n/a" if v is None else f"{v:.1f}" for v in secs]
        total = "n/a" if any(v is None for v in secs) else f"{sum(secs):.1f}"
        rows.append([name(results, m) + (", one seed" if m == "itm" else "")] + cells + [total])
    return md_table(["Method"] + names + ["Total"], rows)


def metrics_table(results, target):
    res, keys = results["targets"][target], results["metric_keys"]
    itm_res = res["methods"]["itm"]
    n = len(results["seeds"])
    if itm_res.get("error"):
        rows = [[name(results, "itm")] + [_na(itm_res["error"])] + ["n/a"] * (len(keys) - 1)]
    else:
        rows = [[f"{name(results, 'itm')}, {n} seeds: mean ± sd"] +
                [fmt_pm(itm_res["metrics"][k]["mean"], itm_res["metrics"][k]["std"]) for k in keys],
                [f"{name(results, 'itm')}: {n}-seed mean score"] +
                [fmt(itm_res["mean_score_metrics"][k]) for k in keys]]
    for m in results["methods"] + results["priors"]:
        r = res["methods"][m]
        rows.append([name(results, m)] + ([_na(r["error"])] + ["n/a"] * (len(keys) - 1) if r["error"]
                                          else [_cell(r, res["models"], k) for k in keys]))
    return md_table(["Method"] + [METRIC_LABELS.get(k, k) for k in keys], rows)


def _score_cell(res, model):
    if model in res.get("errors", {}):
        return f"n/a ({_short(res['errors'][model], 40)})"
    v = res["scores"].get(model)
    return "n/a" if v is None else f"{v:.4g}"


def scores_table(results, target):
    """Every model's score under every method that ran (a failed model: n/a with its reason)."""
    res = results["targets"][target]
    itm_res = res["methods"]["itm"]
    cols = [("itm", None)] if not itm_res.get("error") else []
    cols += [(m, res["methods"][m]) for m in results["methods"] + results["priors"]
             if res["methods"][m]["scores"] is not None]
    header = ["Model", "Fine-tuned accuracy"] + [f"{name(results, 'itm')}, mean score" if m == "itm"
                                                 else name(results, m) for m, _ in cols]
    rows = []
    for model in res["models"]:
        row = [model, f"{res['truth'][model]:.4f}"]
        for m, r in cols:
            row.append(_score_cell({"scores": itm_res["mean_score"], "errors": itm_res["errors"]}
                                   if m == "itm" else r, model))
        rows.append(row)
    return md_table(header, rows)


def stability_table(results, summary):
    rows = []
    for m in summary["mean"]:
        beats = [summary["itm_beats"].get(key, {}).get(m) for key in ("itm_seed0", "itm_mean")]
        rows.append([name(results, m), fmt_pm(summary["mean"][m], summary["std"][m])] +
                    ["—" if b is None else f"{100 * b:.1f}%" for b in beats])
    return md_table(["Method", "τ_w over subsets (mean ± sd)", "first seed higher in",
                     "seed-mean score higher in"], rows)


def _resolve(rows, key):
    return rows[rows[key]["same_as"]] if "same_as" in rows[key] else rows[key]


def ablation_table(results, target):
    rows = results["ablation"][target]
    also = {}
    for key, row in rows.items():
        if "same_as" in row:
            also.setdefault(row["same_as"], []).append(key)
    out = []
    for key, row in rows.items():
        if "same_as" in row:
            continue
        varied = ("— (the default)" if key == "default" else key) + \
                 (f"; same Config as {', '.join(also[key])}" if key in also else "")
        if row.get("error"):
            out.append([row.get("name", key), varied, _na(row["error"]), "n/a", "n/a", "n/a"])
            continue
        out.append([row["name"], varied, fmt_pm(row["tau_w_mean"], row["tau_w_std"]),
                    fmt(row["tau_w_of_mean_score"]) + fmt_ci(row["interval_of_mean_score"]),
                    f"{row['diverged']}/{row['runs']}", f"{row['seconds_per_seed']:.1f}"])
    n = len(results["ablation_spec"]["seeds"])
    return md_table(["Variant", "Varied", f"τ_w, {n} seeds (mean ± sd)", "τ_w of the seed-mean score",
                     "Diverged runs", "Seconds per seed"], out)


def _subset_words(s):
    if s["sampled"]:
        return (f"a seeded random sample (seed {s['sample_seed']}) of {s['subsets']:,} of the "
                f"C({s['pool']}, {s['k']}) = {s['of']:,} subsets")
    return f"all C({s['pool']}, {s['k']}) = {s['of']:,} subsets of {s['k']} models"


# ------------------------------------------------------------------------- the README's trust table

TRUST_BEGIN, TRUST_END = "<!-- trust:begin -->", "<!-- trust:end -->"
SHORT_NAMES = {"probe_knn": "k-NN probe"}


def _best(results, t, keys):
    """(τ_w, name) of the highest of `keys` on target t, or None."""
    vals = {k: _tau(results["targets"][t]["methods"][k]) for k in keys if k in results["targets"][t]["methods"]}
    vals = {k: v for k, v in vals.items() if v is not None}
    if not vals:
        return None
    top = max(vals, key=vals.get)
    return vals[top], name(results, top)


def _best_cell(best):
    return "n/a" if best is None else f"{fmt(best[0])} ({best[1]})"


def trust_rows(results):
    """Per target: ITM's default over the seeds, the best other method there (baselines and probes), the best
    static prior, the k-NN probe and the noise ceiling, as τ_w."""
    rows = []
    for t, res in results["targets"].items():
        r = res["methods"]["itm"]
        itm_cell = _na(r["error"]) if r.get("error") else fmt_pm(r["metrics"]["tau_w"]["mean"],
                                                                 r["metrics"]["tau_w"]["std"])
        knn = res["methods"].get("probe_knn")
        rows.append([f"{t} ({len(res['models'])} models{'' if res.get('complete') else ', truth provisional'})",
                     itm_cell, _best_cell(_best(results, t, results["methods"])),
                     _best_cell(_best(results, t, results["priors"])), fmt(_tau(knn)) if knn else "n/a",
                     fmt((res.get("noise_ceiling") or {}).get("mean"))])
    n = len(results["seeds"])
    return md_table(["target", f"ITM default ({n} seeds)", "best other method", "best static prior",
                     "k-NN probe", "noise ceiling"], rows)


def trust_words(results):
    """Two or three plain sentences on the table, generated from its numbers."""
    above, below = [], []
    for t, res in results["targets"].items():
        r, prior = res["methods"]["itm"], _best(results, t, results["priors"])
        if r.get("error") or prior is None:
            continue
        (above if r["metrics"]["tau_w"]["mean"] > prior[0] else below).append(t)
    words = ["τ_w is 1 when the scores order the models as fine-tuning does and about 0 for a random order; "
             "the noise ceiling is what a perfect ranking scores against the truth re-drawn with its own "
             "sampling noise. A static prior never looks at the target data (e.g. larger models first)."]
    if above:
        words.append(f"ITM beats every static prior on {', '.join(above)}" +
                     (f", but not on {', '.join(below)}: there its ranking adds nothing to the prior." if below
                      else "."))
    elif below:
        words.append(f"ITM does not beat the best static prior on {', '.join(below)}.")
    words.append("Read a ranking as \"whose frozen features separate these classes best\", which is often, not "
                 "always, the model that fine-tunes best.")
    return words


def render_trust(results):
    """The README's region: the trust table, its sentences, the command that made them."""
    return "\n".join(trust_rows(results) + [""] + [" ".join(trust_words(results))] + [
        "", f"(`{results.get('command', 'python bench/accuracy.py')}`; every table: "
        "[docs/results.md](docs/results.md).)"]) + "\n"


# ----------------------------------------------------------------------------------- generated reading

def _tau(res):
    """A method's τ_w on a target, or None."""
    if res.get("error") or not res.get("metrics"):
        return None
    t = res["metrics"]["tau_w"]
    t = t["mean"] if isinstance(t, dict) else t
    return t if math.isfinite(t) else None


def _itm_vs_baselines(results):
    s = results["summary"]
    if "itm" not in s:
        return ["ITM has no mean τ_w (it failed on a target); see the table."]
    others = {m: v["mean"] for m, v in s.items() if m != "itm" and math.isfinite(v["mean"])}
    n, n_t = len(results["seeds"]), len(results["targets"])
    lines = []
    base = {m: v for m, v in others.items() if m in results["methods"]}
    if base:
        best = max(base, key=base.get)
        lines.append(f"{name(results, 'itm')}: mean τ_w over {n_t} target(s) "
                     f"{fmt_pm(s['itm']['mean'], s['itm']['std'])} ({n} seeds; {fmt(s['itm']['mean_score'])} "
                     f"for the {n}-seed mean score) vs the best baseline {fmt(base[best])} "
                     f"({name(results, best)}).")
    if others:
        ahead = [f"{name(results, m)} ({fmt(others[m])})" for m in sorted(others, key=others.get, reverse=True)
                 if others[m] >= s["itm"]["mean"]]
        lines.append(f"By mean τ_w, ITM ranks {len(ahead) + 1} of {len(others) + 1} rows (baselines and "
                     f"static priors); ahead of it: {', '.join(ahead) or 'none'}.")
    return lines


def _interval_words(a, b):
    if not a or not b:
        return "no interval"
    return "overlap" if a[0] <= b[1] and b[0] <= a[1] else "do not overlap"


def _per_target_lines(results):
    lines = []
    for t, res in results["targets"].items():
        itm_res = res["methods"]["itm"]
        if itm_res.get("error"):
            lines.append(f"{t}: ITM is n/a ({itm_res['error']}).")
            continue
        tw = itm_res["metrics"]["tau_w"]
        if not math.isfinite(tw["mean"]):
            lines.append(f"{t}: ITM's τ_w is not defined (every run diverged or tied).")
            continue
        vals = {m: _tau(r) for m, r in res["methods"].items() if m != "itm" and _tau(r) is not None}
        vals["itm"] = tw["mean"]
        winner = max(vals, key=vals.get)
        per_seed = [r["metrics"]["tau_w"] for r in itm_res["runs"]]
        truth, ms = res["truth"], itm_res["mean_score"]
        top = max(ms, key=lambda m: ms[m] if math.isfinite(ms[m]) else -math.inf)
        lines.append(
            f"{t} ({len(res['models'])} models): highest τ_w {name(results, winner)} ({fmt(vals[winner])}); ITM "
            f"{fmt_pm(tw['mean'], tw['std'])} (seeds range {fmt(min(per_seed))} to {fmt(max(per_seed))}), "
            f"rank {sorted(vals.values(), reverse=True).index(tw['mean']) + 1} of {len(vals)}. ITM's top "
            f"model (mean score) is {top}, fine-tuned {truth[top]:.4f} vs best {max(truth.values()):.4f} "
            f"({max(truth, key=truth.get)}): Rel@1 {fmt(itm_res['mean_score_metrics']['rel1'])}.")
        base = {m: v for m, v in vals.items() if m in results["methods"]}
        if base:
            best = max(base, key=base.get)
            a, b = itm_res["interval"], res["methods"][best]["interval"]
            lines.append(f"{t}: the 95 % bootstrap intervals of ITM{fmt_ci(a)} and of the best baseline, "
                         f"{name(results, best)}{fmt_ci(b)}, {_interval_words(a, b)}.")
        if itm_res["diverged"]:
            lines.append(f"{t}: {itm_res['diverged']} of {itm_res['runs_total']} default ITM runs diverged "
                         "(ranked last).")
    return lines


def _prior_lines(results):
    lines = []
    for t, res in results["targets"].items():
        cells = [f"{name(results, k)} {fmt(_tau(res['methods'][k]))}" if _tau(res["methods"][k]) is not None
                 else f"{name(results, k)} n/a ({res['methods'][k]['error']})" for k in results["priors"]]
        if cells:
            lines.append(f"{t}, static priors (they never look at the target features): {'; '.join(cells)}.")
    return lines


def _tie_lines(results):
    lines = []
    for t, res in results["targets"].items():
        tied = {}
        for m, r in res["methods"].items():
            if m != "itm" and not r["error"]:
                values = [v for v in r["scores"].values() if v is not None]
                counts = np.unique(values, return_counts=True)[1]
                if counts.size and counts.max() >= 3:
                    tied[name(results, m)] = int(counts.max())
        if tied:
            lines.append(f"{t}: {', '.join(f'{m} ({c} models)' for m, c in tied.items())} give several models "
                         "exactly the same score; their τ_w depends on how these ties are counted "
                         "(τ_w's tie rule here).")
    return lines


def _stability_lines(results):
    lines = []
    for t, s in results["stability"].items():
        beats = s.get("itm_beats", {}).get("itm_seed0")
        if not beats:
            continue
        lo, hi = min(beats, key=beats.get), max(beats, key=beats.get)
        won = [m for m in beats if beats[m] > 0.5]
        lines.append(f"{t}, stability over {_subset_words(s)}: {name(results, 'itm_seed0')} has a strictly "
                     f"higher τ_w than {len(won)} of {len(beats)} other methods in most subsets; least often vs "
                     f"{name(results, lo)} ({100 * beats[lo]:.1f}%), most often vs {name(results, hi)} "
                     f"({100 * beats[hi]:.1f}%).")
    return lines


def _group_line(t, rows, group, default_sd):
    members = [(k.split("=", 1)[1], _resolve(rows, k)) for k, r in rows.items() if r["group"] == group]
    ok = [(v, r) for v, r in members if not r.get("error") and math.isfinite(r["tau_w_mean"])]
    if not ok:
        return None
    best = max(ok, key=lambda vr: vr[1]["tau_w_mean"])
    parts = [f"{v}: {fmt_pm(r['tau_w_mean'], r['tau_w_std'])} ({r['seconds_per_seed']:.1f} s per seed)"
             for v, r in ok]
    return (f"{t}, ITM by {group} (the rest as the default): {'; '.join(parts)}. Highest mean τ_w: {group}="
            f"{best[0]}; the default's seed-to-seed sd is {fmt(default_sd)}.")


def _ablation_lines(results):
    lines = []
    for t, rows in (results.get("ablation") or {}).items():
        default = rows.get("default", {})
        sd = default.get("tau_w_std") if not default.get("error") else None
        lines += [x for x in (_group_line(t, rows, g, sd) for g in ("preprocess", "folds")) if x]
        presets = [(k, _resolve(rows, k)) for k, r in rows.items() if r["group"] == "preset"]
        cells = [f"{r['name']} {fmt_pm(r['tau_w_mean'], r['tau_w_std'])}" if not r.get("error")
                 else f"{k} n/a ({r['error']})" for k, r in presets]
        if cells and not default.get("error"):
            lines.append(f"{t}, presets: {'; '.join(cells)}; vs {default['name']} "
                         f"{fmt_pm(default['tau_w_mean'], default['tau_w_std'])}.")
        readings = {k: r for k, r in rows.items() if r["group"] == "DESIGN.md §1a reading"
                    and "same_as" not in r and not r.get("error") and math.isfinite(r["tau_w_mean"])}
        if readings:
            best = max(readings, key=lambda k: readings[k]["tau_w_mean"])
            lines.append(f"{t}, DESIGN.md §1a readings: highest mean τ_w {best} "
                         f"({fmt(readings[best]['tau_w_mean'])}), lowest "
                         f"{min(readings, key=lambda k: readings[k]['tau_w_mean'])} "
                         f"({fmt(min(r['tau_w_mean'] for r in readings.values()))}).")
        div = [f"{k} {r['diverged']}/{r['runs']}" for k, r in rows.items()
               if "same_as" not in r and not r.get("error") and r["diverged"]]
        lines.append(f"{t}, diverged ablation runs: {', '.join(div) or 'none'}.")
    return lines


def reading(results):
    """Bullets generated from the numbers (never typed by hand)."""
    lines = _itm_vs_baselines(results) + _per_target_lines(results) + _prior_lines(results)
    lines += _tie_lines(results) + _stability_lines(results) + _ablation_lines(results)
    if len(results["targets"]) == 1:
        t = next(iter(results["targets"]))
        lines.append(f"Only {t} is scored so far, so this is one dataset of "
                     f"{len(results['targets'][t]['models'])} models: the ordering of methods is fragile "
                     "(compare the gaps with the bootstrap intervals and ITM's seed-to-seed sd).")
    return ["- " + line for line in lines]


# --------------------------------------------------------------------------------------- the fragment

def _method_notes(results):
    notes = []
    for t, res in results["targets"].items():
        notes += res["notes"]
        for m, r in res["methods"].items():
            notes += [f"{t}: {name(results, m)}: {w}" for w in r.get("notes", [])]
            if m == "itm" and r.get("errors"):
                notes.append(f"{t}: {name(results, m)}: n/a for " +
                             "; ".join(f"{mo} ({why})" for mo, why in r["errors"].items()))
    return notes


def _protocol_notes(results):
    st, n = results["settings"], len(results["seeds"])
    notes = [f"ITM: seeds 0–{n - 1}; a diverged run (score NaN) is ranked last, tied; sd is over seeds "
             "with ddof 0. Every ITM row is named from its itm.Config: protocol, then each option that "
             "differs from the defaults.",
             f"A target is scored only on its models with ground truth, and only with at least "
             f"{st['min_models']} of them; a method failing on some models is evaluated on the others "
             f"(noted), and is n/a below {st['min_models']}.",
             f"Intervals [lo, hi]: percentile 95 % bootstrap over the target's models (resampled with "
             f"replacement, B = {st['bootstrap']}, seed {st['bootstrap_seed']}; the same resamples for "
             "every method scored on the same models; resamples where τ_w is undefined are left out). "
             "ITM's first row: the interval of its mean over seeds.",
             "Static priors never look at the target features: parameter count (models.json), feature "
             "dimension D (the features' shape), and 1 − the mean normalised fine-tuned rank (0 = best, "
             "1 = worst) on the other targets whose ground truth is complete and has the model (leave one target "
             "out; a provisional table is left out).",
             "τ_w is scipy.stats.weightedtau's default (kendall.weighted_tau). Baseline scores are rounded "
             f"to {results['sig_digits']} significant digits before ranking (round-off must not break ties)."]
    spec = results.get("ablation_spec")
    if spec:
        notes.append(f"Ablation: one option varied at a time from the default Config, seeds "
                     f"0–{len(spec['seeds']) - 1} per row; a row whose Config equals an earlier one is "
                     "listed in that row's Varied cell, and a (Config, seed) run shared by rows is computed "
                     "once. Seconds per seed: wall time of the row's runs / seeds.")
    how = (f"--scheduler {results['scheduler']}" if results.get("scheduler") else
           f"--jobs {results['jobs']}" if results.get("jobs", 1) > 1 else None)
    if how:
        notes.append(f"Scored with {how}: the scores are those of a serial run; the seconds are wall times "
                     "of that run.")
    return notes


def notes(results):
    out = [f"{t}: not scored — {why}" for t, why in results["skipped_targets"].items()]
    out += _method_notes(results) + _protocol_notes(results)
    if results.get("figures_note"):
        out.append(results["figures_note"])
    return ["- " + n for n in out]


def _target_section(results, t):
    res = results["targets"][t]
    out = ["", f"#### {t}: {len(res['models'])} models, N = {res['n']}, K = {res['classes']}", ""]
    out += metrics_table(results, t)
    out += ["", f"<details><summary>{t}: every model's score</summary>", ""] + scores_table(results, t)
    return out + ["", "</details>"]


def render(results, page_folder=ROOT):
    """docs/results.md's region (markdown), from the results dict; figure links are relative to page_folder
    (where the page that shows them lies; the figures' paths are stored relative to the repository)."""
    st, n = results["settings"], len(results["seeds"])
    out = ["### Where ITM ranks well, and where it does not", "",
           "τ_w against each target's fine-tuned accuracies: ITM's default (mean ± sd over seeds), the "
           "probes and the static priors (which never look at the features) beside it. A method that does "
           "not beat the priors adds nothing on that target.", ""]
    out += glance_table(results) + [""] + glance_words(results) + [""]
    out += ["### Ranking accuracy (τ_w; layout of the paper's Table 1)", "",
           f"Cells: τ_w [95 % bootstrap interval over the models, B = {st['bootstrap']}]; ITM's first row: "
           f"mean ± sd over {n} seeds [interval of that mean].", ""]
    out += table1(results) + ["", "Seconds to score each target's whole pool once (wall time; depends on "
                              "the machine and its load):", ""] + seconds_table(results)
    for t in results["targets"]:
        out += _target_section(results, t)
    out += ["", "### Stability (Fig. 3)", ""]
    for t, s in results["stability"].items():
        if "skipped" in s:
            out += [f"{t}: skipped ({s['skipped']}).", ""]
            continue
        out += [f"{t}: τ_w on {_subset_words(s)}.", ""] + stability_table(results, s) + [""]
    for t, f in results.get("figures", {}).items():
        out += [f"![{t}: {kind}]({_link(ROOT / p, page_folder)})" for kind, p in sorted(f.items())] + [""]
    if results.get("ablation"):
        out += ["### ITM ablation (one option varied at a time from the default)", ""]
        for t in results["ablation"]:
            out += [f"{t}:", ""] + ablation_table(results, t) + [""]
        out += ["Every row by the criterion of DESIGN.md §1c (the mean over the complete-truth targets of "
                "τ_w averaged over the seeds), best first:", ""] + rule_table(results) + [""]
    out += ["### Reading (generated from the numbers above)", ""] + reading(results)
    out += ["", "### Notes", ""] + notes(results)
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


def check_region(path, option, begin=BEGIN, end=END):
    """ValueError (naming the option) unless path is a readable file with one pair of the markers."""
    try:
        replace_region(Path(path).read_text(encoding="utf-8"), "", begin, end)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{option} {path}: {itm.one_line(err)}") from None


def _write_text(path, text):
    itm.write_atomic(path, lambda fh: fh.write(text.encode("utf-8")), binary=True)


def update_region(path, fragment, begin=BEGIN, end=END):
    _write_text(path, replace_region(Path(path).read_text(encoding="utf-8"), fragment, begin, end))


# ------------------------------------------------------------------------------------------- figures

def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def _save(plt, fig, path):
    itm.write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=110), binary=True)
    plt.close(fig)
    return path


def plot_stability(results, t, summary, tau, outdir, points=PLOT_POINTS):
    """Fig. 3: ITM (first seed) τ_w vs each other method's τ_w per subset, y = x line; path or None."""
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
        ax.set(xlim=(lo, 1), ylim=(lo, 1), ylabel="ITM τ_w")
        ax.set_xlabel(f"{_short(name(results, m), 40)} τ_w", fontsize=7)
        ax.set_title(f"ITM > {m}: {100 * summary['itm_beats']['itm_seed0'][m]:.0f}%", fontsize=9)
    for ax in list(axes.flat)[len(others):]:
        ax.axis("off")
    fig.suptitle(f"{t}: τ_w on {summary['subsets']:,} subsets of {summary['k']} models "
                 f"({name(results, 'itm_seed0')})", fontsize=9)
    fig.tight_layout()
    return _save(plt, fig, Path(outdir) / f"stability_{t}.png")


def plot_trajectories(results, t, outdir):
    """ITM scoring accuracy vs iteration per model (first seed), coloured by fine-tuned accuracy."""
    plt = _pyplot()
    res = results["targets"][t]
    trajectories = res["methods"]["itm"].get("trajectories")
    if plt is None or not trajectories:
        return None
    truth = res["truth"]
    order = sorted(trajectories, key=truth.get, reverse=True)
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, m in enumerate(order):
        traj = np.array(trajectories[m], dtype=float).reshape(-1, 2)
        colour = cmap(0.9 * (1 - i / max(1, len(order) - 1)))
        ax.plot(traj[:, 0], traj[:, 1], marker="o", ms=3, color=colour, label=f"{m} ({truth[m]:.3f})")
    ax.set(xlabel="iteration", ylabel="ITM scoring accuracy (%)")
    ax.set_title(f"{t}: {name(results, 'itm_seed0')} (legend: fine-tuned accuracy, best first)", fontsize=9)
    ax.legend(fontsize=6, ncol=1, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return _save(plt, fig, Path(outdir) / f"trajectories_{t}.png")


def _link(path, link_root):
    return os.path.relpath(path, link_root).replace(os.sep, "/")


def make_figures(results, arrays, outdir, link_root=ROOT):
    """{target: {kind: path relative to link_root}} of the PNGs written to outdir."""
    figs = {}
    if _pyplot() is None:
        results["figures_note"] = "matplotlib not installed: figures skipped"
        return figs
    for t in results["targets"]:
        stab = results["stability"][t]
        entry = {"stability": plot_stability(results, t, stab, arrays.get(t, {}), outdir)
                 if "skipped" not in stab else None,
                 "trajectories": plot_trajectories(results, t, outdir)}
        figs[t] = {k: _link(v, link_root) for k, v in entry.items() if v is not None}
    return figs


# ------------------------------------------------------------------------------------------ outputs

def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_outputs(results, arrays, outdir, figures=True, link_root=ROOT, start=None):
    """results.json, results.md and the PNGs in outdir; returns the markdown. start: perf_counter() at
    the beginning of the whole run, so that the reported wall time includes the figures."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    if figures:
        results["figures"] = make_figures(results, arrays, outdir, link_root)
    if start is not None:
        results["wall_seconds"] = time.perf_counter() - start
    md = render(results)
    _write_text(outdir / "results.md", md)
    _write_text(outdir / "results.json",
                json.dumps(jsonable(results), indent=1, ensure_ascii=False) + "\n")
    return md

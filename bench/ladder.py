"""The budget ladder: how much compute buys how much ranking (DESIGN.md §7 holds the rule, docs/ladder.md
the outcome).

A rung ranks the models by a signal read from short fine-tuning runs: the compressed short rungs of
``bench/finetune.py --rung`` (the protocol in E epochs, its schedule spread over them), or the first epochs
of the full protocol's own runs (free: the runs file behind groundtruth.json). A procedure shortlists the
top k by ITM and orders those k by a rung. ``python bench/accuracy.py --ladder`` measures every rung and
procedure against the truth and applies the rule; this module holds the pieces and needs no torch.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

# The protocol's learning-rate families: base grid, the ladder bracketing walks, the default resolution.
FAMILIES = {
    "tfl": {"grid": [0.01, 0.003], "ladder": [0.03, 0.01, 0.003, 0.001, 0.0003], "res": 128,
            "about": "BN-folded networks (dequantized TFLite replicas)"},
    "bn128": {"grid": [0.03, 0.01], "ladder": [0.1, 0.03, 0.01, 0.003, 0.001], "res": 128,
              "about": "ImageNet CNNs with batch norm (torchvision MobileNetV2, EfficientNet-Lite)"},
    "cifar32": {"grid": [0.1, 0.03], "ladder": [0.3, 0.1, 0.03, 0.01, 0.003], "res": 32,
                "about": "CIFAR ResNets at 32 px"},
}
SIGNALS = ("loss", "loss_sum", "val", "val_bn")   # DESIGN.md §7 item 1; higher = better for all four
RATES = ("low", "best")                           # the family grid's lower rate; the better of its rates
SHORTLISTS = (3, 5, None)                         # k of `top-k + rung`; None: every model
TIERS = (0.05, 0.15, 0.40)                        # budget tiers: cost fractions of the full protocol
TIE = 0.02                                        # criterion gap below which candidates tie


def read_runs(path: Path) -> list[dict]:
    """The runs in a JSON-lines runs file (bench/finetune.py's, or the benchmark's); a torn line (a killed
    writer) is skipped; no file: no runs."""
    path = Path(path)
    if not path.exists():
        return []
    runs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if line.strip():
                runs.append(json.loads(line))
    return runs


def signal(run: dict, name: str, epochs: int | None = None) -> float | None:
    """A run's signal (higher = better) after its first `epochs` epochs (None: all it ran); None when the
    run diverged by then or did not record it."""
    losses = run["epoch_loss"][:epochs]   # a diverged run's list ends in None (NaN in the benchmark's file)
    if any(v is None or not math.isfinite(v) for v in losses):
        return None
    if name == "loss":
        return -losses[-1]
    if name == "loss_sum":
        return -sum(losses)
    if name == "val":
        if epochs is None:
            return run["val_acc"]
        curve = run.get("val_curve") or []   # most full runs kept none
        return curve[epochs - 1] if len(curve) >= epochs else None
    if name == "val_bn":
        return run.get("val_acc_bn") if epochs is None else None
    raise ValueError(f"unknown signal {name!r}; known: {', '.join(SIGNALS)}")


def run_seconds(run: dict, name: str, epochs: int | None = None) -> float:
    """Seconds a signal costs from one run: the first `epochs` of a full run as a share of its seconds
    (truncated rungs), else the whole run, less the batch-norm pass unless the signal needs it."""
    if epochs is not None:
        return run["seconds"] * min(epochs, run["epochs"]) / run["epochs"]
    return run["seconds"] - (0.0 if name == "val_bn" else run.get("bn_seconds", 0.0))


def model_signal(runs: list[dict], name: str, rate: str, low: float, epochs: int | None = None):
    """(score, seconds) of one model from its runs at the grid's rates: `low` reads the run at the lower
    rate, `best` the best of the runs; score None when no run gives the signal."""
    if rate == "low":
        runs = [r for r in runs if math.isclose(r["lr"], low)]
    values = [v for v in (signal(r, name, epochs) for r in runs) if v is not None]
    seconds = sum(run_seconds(r, name, epochs) for r in runs)
    return (max(values) if values else None), seconds


def rung_name(kind: str, epochs: int, rate: str, name: str) -> str:
    """'short E=1 best loss', 'trunc e=2 low loss_sum': one rung's label."""
    return f"{kind} {'E' if kind == 'short' else 'e'}={epochs} {rate} {name}"


def rung_scores(runs: list[dict], lows: dict | None = None, kind: str = "short", epochs: int | None = None,
                signals=SIGNALS) -> dict:
    """{rung name: {"scores": {model: score or None}, "seconds": {model: seconds}}} of a target's runs.
    kind "short": compressed runs, E = their own epochs; kind "trunc": the first `epochs` epochs of full runs,
    or (epochs None) runs that --schedule-epochs stopped early.
    `lows`: {model: the lower rate of its family's grid} (default: the lowest rate of the model's runs,
    which is the grid's when no bracketing ran)."""
    by_model: dict = {}
    for r in runs:
        by_model.setdefault(r["model"], []).append(r)
    lows = lows or {m: min(r["lr"] for r in mine) for m, mine in by_model.items()}
    out: dict = {}
    for model, mine in by_model.items():
        for E in sorted({r["epochs"] for r in mine}) if epochs is None else [epochs]:
            part = [r for r in mine if epochs is not None or r["epochs"] == E]
            for rate in RATES:
                for name in signals:
                    score, sec = model_signal(part, name, rate, lows[model], epochs)
                    cell = out.setdefault(rung_name(kind, E, rate, name), {"scores": {}, "seconds": {}})
                    cell["scores"][model], cell["seconds"][model] = score, round(sec, 2)
    return out


def shortlisted(itm_scores: dict, rung: dict, k: int | None) -> dict:
    """`top-k + rung`: ITM's top k ordered by the rung's signal, above the rest in ITM's order -> rank scores
    (higher = better) over ITM's models."""
    order = sorted(itm_scores, key=lambda m: -itm_scores[m])
    top = order if k is None else order[:k]
    # no signal (a diverged or missing run): below every signal; ties keep ITM's order
    top_sorted = sorted(top, key=lambda m: (rung.get(m) is None, -(rung.get(m) or 0.0), order.index(m)))
    final = top_sorted + [m for m in order if m not in top]
    return {m: float(len(final) - i) for i, m in enumerate(final)}


def metrics(scores: dict, truth: dict) -> dict:
    """τ_w and Rel@1 of scores (None → below every score) against {model: accuracy}, by the accuracy
    harness's own rank metrics (NaN when fewer than two models can be ranked: a rung still running)."""
    import accuracy   # here, not at the top: accuracy imports this module
    got = accuracy.rank_metrics({m: math.nan if v is None else v for m, v in scores.items() if m in truth}, truth)
    return {"tau_w": got["tau_w"], "rel1": got["rel1"]}


# ------------------------------------------------------------------------------- the ladder on a target

def truncated(full_runs: list[dict], families: dict, chosen: dict) -> dict:
    """The free rungs: the first e = 1, 2 epochs of the full protocol's runs at its grid's rates (`low`,
    `best`), and at the rate it chose (`chosen`, not eligible: it needs the whole search)."""
    grid = [r for r in full_runs if r["seed"] == 0 and r["lr"] in FAMILIES[families[r["model"]]]["grid"]]
    lows = {m: min(FAMILIES[f]["grid"]) for m, f in families.items()}
    picked = [r for r in full_runs if r["seed"] == 0 and chosen.get(r["model"]) is not None
              and math.isclose(r["lr"], chosen[r["model"]])]
    out: dict = {}
    for e in (1, 2):
        names = ("loss",) if e == 1 else ("loss", "loss_sum")   # at e = 1 loss_sum is loss
        out.update(rung_scores(grid, lows, "trunc", e, names))
        for name in names:
            cell = out.setdefault(rung_name("trunc", e, "chosen", name), {"scores": {}, "seconds": {}})
            for r in picked:
                cell["scores"][r["model"]], sec = model_signal([r], name, "best", r["lr"], e)
                cell["seconds"][r["model"]] = round(sec, 2)
    return out


def full_seconds_here(short_runs: list[dict], n_full_runs: dict) -> dict:
    """{model: the full protocol's seconds on this machine}, estimated from the model's short runs: its
    number of 8-epoch runs x (8 x (one epoch + one validation pass) + one test pass), the epoch and the
    validation pass timed in the short runs (the test pass scaled from the validation one by image count)."""
    out = {}
    for m, n in n_full_runs.items():
        mine = [r for r in short_runs if r["model"] == m and not r["diverged"]]
        if not mine:
            continue
        epoch = sum(sum(r["epoch_seconds"]) for r in mine) / sum(len(r["epoch_seconds"]) for r in mine)
        val = sum((r["seconds"] - sum(r["epoch_seconds"]) - r.get("bn_seconds", 0.0)) / len(r["val_curve"])
                  for r in mine) / len(mine)
        test = val * mine[0]["n_test"] / mine[0]["n_val"]
        out[m] = n * (8 * (epoch + val) + test)
    return out


def target_ladder(target: dict, short_runs: list[dict], full_runs: list[dict], families: dict,
                  chosen: dict) -> dict:
    """Every rung of one target with its τ_w, Rel@1 and cost, and what the procedures need.

    target: results.json's entry (models, truth, methods with their scores and seconds). Costs: seconds
    per model (`seconds`), and the share of the full protocol on the machine that timed them (`share`):
    this one for the methods on features and the compressed rungs, the benchmark's for truncated rungs."""
    models, truth = target["models"], target["truth"]
    shorts = [r for r in short_runs if r["model"] in models and r["seed"] == 0   # compressed runs only
              and r.get("schedule_epochs", r["epochs"]) == r["epochs"]]
    n_full = {m: sum(1 for r in full_runs if r["model"] == m and r["seed"] == 0) for m in models}
    here = full_seconds_here(shorts, n_full)
    bench = {m: sum(r["seconds"] for r in full_runs if r["model"] == m and r["seed"] == 0) for m in models}
    feature = {m: next((r["feature_seconds"] for r in shorts if r["model"] == m), None) for m in models}
    rows: dict = {}
    cells = {**{k: v for k, v in rung_scores(shorts).items()
                if not (k.startswith("short E=1") and k.endswith("loss_sum"))},   # = loss at E = 1
             **truncated(full_runs, families, chosen)}
    for name, res in target["methods"].items():   # priors, ITM (seed 0), baselines, probes
        scores = res["runs"][0]["scores"] if name == "itm" else res.get("scores")
        if not scores or res.get("error"):
            continue
        spent = {m: (0.0 if name.startswith("prior") else (feature[m] or 0.0) + _per_model(res, name, len(models)))
                 for m in models}
        rows[name] = _row("features", scores, truth, spent, here)
    for name, cell in cells.items():
        kind = name.split()[0]
        rows[name] = _row(kind, cell["scores"], truth, cell["seconds"], here if kind == "short" else bench)
    rows["full protocol"] = {"kind": "full", "tau_w": 1.0, "rel1": 1.0, "share": 1.0,
                             "seconds": _mean(here.values()), "coverage": len(here)}
    return {"rows": rows, "cells": cells, "itm_scores": target["methods"]["itm"]["runs"][0]["scores"], "truth": truth,
            "full_here": here, "full_bench": bench, "n_models": len(models)}


def _per_model(res: dict, name: str, n: int) -> float:
    """A method's seconds per model: ITM's seed-0 run, the others' one run, over the models scored."""
    seconds = res["runs"][0]["seconds"] if name == "itm" else res.get("seconds") or 0.0
    return seconds / n


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def _row(kind: str, scores: dict, truth: dict, seconds: dict, full: dict) -> dict:
    """One ladder row: metrics over the models the rung scored, cost per model and as a share of `full`
    (the full protocol's seconds on the machine that timed `seconds`), over the models both cover."""
    both = [m for m in seconds if m in full]
    row = {"kind": kind, **metrics(scores, truth), "seconds": _mean(seconds.values()),
           "share": sum(seconds[m] for m in both) / sum(full[m] for m in both) if both else math.nan,
           "coverage": sum(1 for m in truth if scores.get(m) is not None)}
    return row


def procedure(ladder_t: dict, rung: str | None, k: int | None) -> dict:
    """`ITM` alone (rung None) or `top-k + rung` on one target -> its τ_w, Rel@1 and cost share."""
    itm_scores, truth = ladder_t["itm_scores"], ladder_t["truth"]
    itm_row = ladder_t["rows"]["itm"]
    if rung is None:
        return {**metrics(itm_scores, truth), "share": itm_row["share"]}
    cell = ladder_t["cells"][rung]
    order = sorted(itm_scores, key=lambda m: -itm_scores[m])
    top = order if k is None else order[:k]
    full = ladder_t["full_bench" if rung.startswith("trunc") else "full_here"]
    rung_share = sum(cell["seconds"].get(m, math.nan) for m in top) / sum(full.values())
    return {**metrics(shortlisted(itm_scores, cell["scores"], k), truth), "share": itm_row["share"] + rung_share}


# --------------------------------------------------------------------------------------------- the rule

def candidates(ladders: dict) -> list[tuple[str | None, int | None]]:
    """DESIGN.md §7 item 3: ITM alone, and top-k + every eligible rung (not the full search's `chosen`)
    that every target has."""
    rungs = set.intersection(*(set(lt["cells"]) for lt in ladders.values()))
    return [(None, None)] + [(r, k) for r in sorted(rungs) if " chosen " not in r for k in SHORTLISTS]


SIGNAL_WORDS = {"loss": "its last training loss", "loss_sum": "its summed training loss",
                "val": "its validation accuracy", "val_bn": "its validation accuracy after recomputing batch norm"}


def describe(rung: str | None, k: int | None = None) -> str:
    """A procedure in plain words, for the README."""
    if rung is None:
        return "ITM on the features (seed 0)"
    kind, epochs, rate, name = rung.split()
    e = int(epochs.split("=")[1])
    what = (f"{e} epoch{'s' * (e > 1)} of fine-tuning (the schedule spread over them)" if kind == "short" else
            f"the first {'epoch' if e == 1 else f'{e} epochs'} of the 8-epoch protocol")
    rates = {"low": "at the grid's lower rate", "best": "at both grid rates, the better one",
             "chosen": "at the chosen rate"}[rate]
    who = "every model" if k is None else f"ITM's top {k}"
    return f"{who}: {what} {rates}; rank by {SIGNAL_WORDS[name]}"


def procedure_name(rung: str | None, k: int | None) -> str:
    if rung is None:
        return "ITM"
    return f"every model by {rung}" if k is None else f"top-{k} by ITM, then {rung}"


def evaluate(ladders: dict) -> list[dict]:
    """Every candidate on every target, with the criterion (mean τ_w), mean Rel@1 and the cost shares."""
    out = []
    for rung, k in candidates(ladders):
        per = {t: procedure(lt, rung, k) for t, lt in ladders.items()}
        out.append({"name": procedure_name(rung, k), "rung": rung, "k": k, "per_target": per,
                    "tau_w": _mean(p["tau_w"] for p in per.values()),
                    "rel1": _mean(p["rel1"] for p in per.values()),
                    "share_max": max(p["share"] for p in per.values()),
                    "share_mean": _mean(p["share"] for p in per.values())})
    return out


def choose(evaluated: list[dict]) -> dict:
    """{tier: the chosen candidate}: the highest criterion among the eligible (mean Rel@1 at least ITM's)
    within the tier's cost, ties (within TIE) to the cheapest; tier "seconds" is ITM alone."""
    itm_row = next(c for c in evaluated if c["rung"] is None)
    chosen = {"seconds": itm_row}
    ok = [c for c in evaluated if c["rel1"] >= itm_row["rel1"] and math.isfinite(c["tau_w"])
          and math.isfinite(c["share_max"])]
    for tier in TIERS:
        inside = [c for c in ok if c["share_max"] <= tier]
        if not inside:
            continue
        best = max(c["tau_w"] for c in inside)
        tied = [c for c in inside if c["tau_w"] >= best - TIE]
        chosen[f"<= {tier:.0%}"] = min(tied, key=lambda c: c["share_mean"])
    return chosen


# ------------------------------------------------------------------------------------------- rendering

def _f(x, digits=3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _pct(x) -> str:
    return "n/a" if x is None or not math.isfinite(x) else (f"{100 * x:.2g} %" if x < 0.1 else f"{100 * x:.0f} %")


def target_table(name: str, lt: dict, label) -> list[str]:
    """One target's "τ_w against cost" table, cheapest first; `label(key)` names the methods."""
    out = [f"**{name}** ({lt['n_models']} models)", "",
           "| rung | τ_w | Rel@1 | seconds per model | share of the full protocol | models |",
           "|---|---|---|---|---|---|"]
    for key, r in sorted(lt["rows"].items(), key=lambda kv: (kv[1]["share"], kv[0])):
        mark = " †" if r["kind"] == "trunc" else ""
        shown = label(key) if r["kind"] == "features" else key
        out.append(f"| {shown} | {_f(r['tau_w'])} | {_f(r['rel1'])} | {r['seconds']:.2f}{mark} | "
                   f"{_pct(r['share'])} | {r['coverage']} |")
    return out + [""]


def procedures_table(evaluated: list[dict], chosen: dict, targets: list[str], top: int = 12) -> list[str]:
    """The chosen procedure of each tier, then the `top` candidates by criterion."""
    head = ("| | procedure | mean τ_w | mean Rel@1 | " + " | ".join(f"{t} τ_w" for t in targets)
            + " | largest share |")
    out = [head, "|" + "---|" * (len(targets) + 5)]

    def line(tag, c):
        per = " | ".join(_f(c["per_target"][t]["tau_w"]) for t in targets)
        return (f"| {tag} | {c['name']} | {_f(c['tau_w'])} | {_f(c['rel1'])} | {per} | "
                f"{_pct(c['share_max'])} |")
    out += [line(f"**chosen, {tier}**", c) for tier, c in chosen.items()]
    ranked_c = sorted(evaluated, key=lambda c: -c["tau_w"] if math.isfinite(c["tau_w"]) else math.inf)
    out += [line(str(i + 1), c) for i, c in enumerate(ranked_c[:top])]
    return out + [""]


KIND_LABELS = {"features": "on features", "short": "short fine-tune", "trunc": "first epochs of a run",
               "full": "full protocol"}


def svg_plot(ladders: dict, width: int = 720, height: int = 420) -> str:
    """τ_w against the share of the full protocol (log axis), one colour per target, one mark per kind."""
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    marks = {"features": "circle", "short": "square", "trunc": "diamond", "full": "star"}
    left, right, top, bottom = 60, 170, 20, 50
    lo, hi = -3.0, 0.0   # log10 of the share: 0.001 .. 1; the priors (share 0) sit on the left edge
    x = lambda s: left + (min(max(math.log10(max(s, 10 ** lo)), lo), hi) - lo) / (hi - lo) * (width - left - right)
    y = lambda t: top + (1 - (t + 0.5) / 1.5) * (height - top - bottom)   # τ_w from -0.5 to 1
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             'font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>']
    for p in range(int(lo), int(hi) + 1):
        parts.append(f'<line x1="{x(10 ** p):.1f}" y1="{top}" x2="{x(10 ** p):.1f}" y2="{height - bottom}" '
                     f'stroke="#ddd"/><text x="{x(10 ** p):.1f}" y="{height - bottom + 15}" text-anchor="middle">'
                     f'{"≤ " if p == lo else ""}{10 ** p:g}</text>')
    for t in (-0.5, 0, 0.5, 1):
        parts.append(f'<line x1="{left}" y1="{y(t):.1f}" x2="{width - right}" y2="{y(t):.1f}" stroke="#ddd"/>'
                     f'<text x="{left - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 12}" text-anchor="middle">share of the '
                 'full protocol\'s compute (log)</text>')
    parts.append(f'<text x="14" y="{(top + height - bottom) / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {(top + height - bottom) / 2})">τ_w against the fine-tuned truth</text>')
    for i, (name, lt) in enumerate(ladders.items()):
        c = colours[i % len(colours)]
        for r in lt["rows"].values():
            if not (math.isfinite(r["share"]) and math.isfinite(r["tau_w"])):
                continue
            parts.append(_mark(marks[r["kind"]], x(r["share"]), y(r["tau_w"]), c))
        parts.append(f'<text x="{width - right + 20}" y="{top + 15 * i + 10}" fill="{c}">{name}</text>')
    for j, (kind, shape) in enumerate(marks.items()):
        yy = top + 15 * (len(ladders) + 1 + j) + 10
        parts.append(_mark(shape, width - right + 12, yy - 4, "#555") + f'<text x="{width - right + 20}" '
                     f'y="{yy}">{KIND_LABELS[kind]}</text>')
    return "\n".join(parts + ["</svg>"]) + "\n"


def _mark(shape: str, cx: float, cy: float, colour: str) -> str:
    if shape == "circle":
        return f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3.5" fill="none" stroke="{colour}"/>'
    if shape == "square":
        return f'<rect x="{cx - 3.5:.1f}" y="{cy - 3.5:.1f}" width="7" height="7" fill="{colour}" opacity="0.7"/>'
    if shape == "diamond":
        return (f'<polygon points="{cx:.1f},{cy - 4.5:.1f} {cx + 4.5:.1f},{cy:.1f} {cx:.1f},{cy + 4.5:.1f} '
                f'{cx - 4.5:.1f},{cy:.1f}" fill="none" stroke="{colour}"/>')
    return f'<text x="{cx:.1f}" y="{cy + 4:.1f}" text-anchor="middle" fill="{colour}">★</text>'

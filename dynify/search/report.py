"""What a search leaves in its run folder, and the summary it prints.

``best.yaml`` (the winning plan as a ready recipe: ``dynify convert MODEL --recipe best.yaml``
reproduces it), ``front/`` (one recipe per Pareto-optimal trial in multi-objective mode),
``trials.csv`` (one row per trial), ``history.png`` and ``pareto.png``, ``summary.json``.
Every file is written under a temporary name and renamed.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from dynify import cost
from dynify._io import atomic_path, atomic_write_text
from dynify._table import format_table
from dynify.convert import apply
from dynify.cost import format_count
from dynify.search.study import STATIC, SearchContext, plan_of_trial

__all__ = ["best_trials", "trial_rows", "write_report"]


def _feasible(trial: FrozenTrial) -> bool:
    return all(v <= 0 for v in trial.constraints.values())


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best feasible trial (single objective), or the Pareto front of feasible ones."""
    try:
        return list(study.best_trials) if len(study.directions) > 1 else [study.best_trial]
    except ValueError:  # no completed feasible trial
        return []


def _label(trial: FrozenTrial) -> str:
    return str(trial.user_attrs.get("preset") or f"trial {trial.number}")


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    rows = []
    param_names = sorted({k for t in study.trials for k in t.params})
    for t in study.trials:
        values = t.values or []
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "preset": t.user_attrs.get("preset", ""),
            "top1": values[0] if values else "",
            # Pruned trials were feasible too (only feasible plans are trained).
            "feasible": _feasible(t) if t.state in (TrialState.COMPLETE, TrialState.PRUNED) else "",
            "macs": t.user_attrs.get("macs", ""),
            "flops": t.user_attrs.get("flops", ""),
            "params": t.user_attrs.get("params", ""),
            "latency_ms": t.user_attrs.get("latency_ms", ""),
            "converted_layers": t.user_attrs.get("converted", ""),
            "same_as": t.user_attrs.get("same_as", ""),
            "routing_effect": t.user_attrs.get("routing_effect", ""),
            "attention_entropy": t.user_attrs.get("attention_entropy", ""),
            "seconds": t.duration.total_seconds() if t.duration else "",
        }
        for key, value in t.constraints.items():
            row[f"constraint.{key}"] = value
        for name in param_names:
            row[name] = t.params.get(name, "")
        rows.append(row)
    return rows


def _csv(rows: list[dict[str, Any]]) -> str:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _plots(study: optuna.Study, ctx: SearchContext, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    best, xs, ys = -math.inf, [], []
    for t in sorted(done, key=lambda t: t.number):
        if t.state == TrialState.COMPLETE and _feasible(t):
            ax.scatter(t.number, t.values[0], c="tab:blue", s=18)
            best = max(best, t.values[0])
        elif t.state == TrialState.PRUNED:
            last = max(t.intermediate_values.items(), default=(0, 0.0))[1]
            ax.scatter(t.number, last, c="lightgray", marker="v", s=18)
        else:
            ax.scatter(t.number, 0.0, c="tab:red", marker="x", s=18)
        if best > -math.inf:
            xs.append(t.number)
            ys.append(best)
    ax.step(xs, ys, where="post", c="tab:green", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("held-out top-1 (%)")
    ax.set_title(
        f"{ctx.model_name}, budget {ctx.budget}: blue feasible, x over budget, v pruned", fontsize=9
    )
    ax.legend(loc="lower right")
    written.append(_save(fig, folder / "history.png"))
    plt.close(fig)

    second = ctx.settings.objectives[1] if len(ctx.settings.objectives) > 1 else None
    key, label = {
        None: ("flops", "FLOPs per image (= 2 x MACs)"),
        "latency": ("latency_ms", "latency (ms, batch 1)"),
        "params": ("params", "parameters"),
    }[second]
    front = {t.number for t in best_trials(study)}
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in done:
        if t.state != TrialState.COMPLETE or not _feasible(t) or key not in t.user_attrs:
            continue
        on_front = t.number in front
        ax.scatter(
            t.user_attrs[key],
            t.values[0],
            c="tab:orange" if on_front else "tab:blue",
            s=30 if on_front else 15,
            zorder=3 if on_front else 2,
        )
        if t.user_attrs.get("preset"):
            ax.annotate(t.user_attrs["preset"], (t.user_attrs[key], t.values[0]), fontsize=7)
    if second is None and ctx.budget.kind == "flops":
        ax.axvline(ctx.budget.value, c="tab:red", ls="--", label=f"budget {ctx.budget}")
        ax.legend(loc="lower right")
    ax.set_xlabel(label)
    ax.set_ylabel("held-out top-1 (%)")
    ax.set_title("feasible trials (orange: best / Pareto front)", fontsize=9)
    written.append(_save(fig, folder / "pareto.png"))
    plt.close(fig)
    return written


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def _recipe_text(trial: FrozenTrial, ctx: SearchContext, title: str) -> str:
    plan = plan_of_trial(trial, ctx)
    totals = cost.price(plan)
    size = ",".join(map(str, ctx.space.input_size))
    header = (
        f"{title}: found by 'dynify search' ({_label(trial)})\n"
        f"model {ctx.model_name} at {size}, budget {ctx.budget}, space {ctx.space.label}\n"
        f"held-out top-1 {trial.values[0]:.2f}% after {ctx.space.training.epochs} epochs; "
        f"{format_count(totals.macs)}MACs = {format_count(totals.flops)}FLOPs per image, "
        f"{totals.params:,} params\n"
        f"reproduce: dynify convert {ctx.model_name} --recipe THIS_FILE --input-size {size}"
    )
    return plan.to_recipe(description=f"{title} for {ctx.model_name}").to_yaml(header=header)


def _compare(ctx: SearchContext, trial: FrozenTrial, static: FrozenTrial | None) -> dict:
    """Best plan against the static model: accuracy, MACs, FLOPs (counted and measured on the
    device), params, latency (measured side by side)."""
    plan = plan_of_trial(trial, ctx)
    model = apply(ctx.base, plan, check=False, seed=ctx.settings.seed)
    size = ctx.space.input_size
    lat = cost.compare_latency(ctx.base, model, size, device=ctx.device, repeats=20)
    out = {}
    for name, m, t, p in (
        ("static", ctx.base, static, ctx.static_plan),
        ("best", model, trial, plan),
    ):
        totals = cost.price(p)
        out[name] = {
            "top1": t.values[0] if t is not None and t.values else None,
            "macs": totals.macs,
            "flops": totals.flops,
            "measured_flops": cost.measure_flops(m, input_size=size, device=ctx.device),
            "params": totals.params,
            "latency_ms": (lat.static if name == "static" else lat.converted).median_ms,
            "label": _label(t) if t is not None else STATIC,
        }
    out["latency_ratio"] = lat.ratio
    out["device"] = _device_name(ctx.device)
    return out


def _advantage(cmp: dict, images: int) -> dict | None:
    """The best plan's held-out advantage over static against its standard error.

    Both were scored on the same ``images`` held-out images; the standard error of the
    difference of two accuracies is taken as if they were independent,
    ``sqrt(p1 (1 - p1) / n + p2 (1 - p2) / n)``. That overstates it for paired scores, but
    the best plan is also the maximum over many trials on these same images, which biases
    its score upwards: "exceeds" is a first filter, not proof of a gain (re-score the plan
    on fresh images and seeds, as bench/upcycle.py does). It says nothing about a new seed.
    """
    a, b = cmp["static"]["top1"], cmp["best"]["top1"]
    if a is None or b is None or cmp["best"]["label"] == cmp["static"]["label"] or images < 1:
        return None
    p1, p2 = a / 100, b / 100
    se = 100 * math.sqrt(p1 * (1 - p1) / images + p2 * (1 - p2) / images)
    diff = b - a
    if se == 0:
        exceeds = diff != 0
    else:
        exceeds = abs(diff) > se
    word = "exceeds" if exceeds else "is within"
    text = (
        f"best - static: {diff:+.2f} top-1 points on {images:,} held-out images, standard "
        f"error {se:.2f}: the difference {word} one standard error"
        + (f" ({abs(diff) / se:.1f} SE)" if se else "")
        + ("" if exceeds else "; the search cannot tell the best plan from static here")
    )
    return {"difference": diff, "standard_error": se, "exceeds": exceeds, "text": text}


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    import platform

    threads = torch.get_num_threads()
    return (
        f"cpu ({platform.processor() or platform.machine()}, {threads} thread{'s' * (threads > 1)})"
    )


def write_report(study: optuna.Study, ctx: SearchContext) -> str:
    """Write the run folder's outputs; return the summary text to print."""
    folder = ctx.output
    folder.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(study)
    atomic_write_text(folder / "trials.csv", _csv(rows))
    plots = _plots(study, ctx, folder)
    winners = best_trials(study)
    lines = [
        f"search: {ctx.model_name}, budget {ctx.budget}, space {ctx.space.label}, "
        f"device {_device_name(ctx.device)}"
    ]
    counts = {s.name: sum(t.state == s for t in study.trials) for s in TrialState}
    lines.append("trials: " + ", ".join(f"{n} {k.lower()}" for k, n in counts.items() if n))
    summary: dict[str, Any] = {"study": study.study_name, "trials": counts}
    if not winners:
        lines.append("no feasible trial finished: nothing to recommend yet")
        atomic_write_text(folder / "summary.json", json.dumps(summary, indent=2))
        return "\n".join(lines)

    static = next(
        (
            t
            for t in study.trials
            if t.user_attrs.get("preset") == STATIC and t.state == TrialState.COMPLETE
        ),
        None,
    )
    if len(study.directions) == 1:
        best = winners[0]
        atomic_write_text(folder / "best.yaml", _recipe_text(best, ctx, "best plan"))
        cmp = _compare(ctx, best, static)
        summary["best"] = {"trial": best.number, **cmp}
        table = []
        for key, fmt in (
            ("top1", lambda v: "-" if v is None else f"{v:.2f}%"),
            ("macs", lambda v: f"{format_count(v)}MACs"),
            ("flops", lambda v: f"{format_count(v)}FLOPs"),
            ("measured_flops", lambda v: f"{format_count(v)}FLOPs"),
            ("params", lambda v: f"{v:,}"),
            ("latency_ms", lambda v: f"{v:.2f} ms"),
        ):
            table.append([key, fmt(cmp["static"][key]), fmt(cmp["best"][key])])
        lines.append(
            format_table(
                ["", f"static ({cmp['static']['label']})", f"best ({cmp['best']['label']})"], table
            )
        )
        lines.append(
            f"latency ratio best/static {cmp['latency_ratio']:.2f} (batch 1, median of "
            "interleaved rounds' ratios); FLOPs = 2 x MACs; measured = torch FlopCounterMode"
        )
        verdict = _advantage(cmp, ctx.space.training.val_images)
        if verdict is not None:
            summary["best"]["advantage"] = verdict
            lines.append(verdict["text"])
        lines.append(f"best plan: {folder / 'best.yaml'}")
    else:
        front_dir = folder / "front"
        table = []
        for t in sorted(winners, key=lambda t: t.values[1]):
            atomic_write_text(
                front_dir / f"trial_{t.number:04d}.yaml",
                _recipe_text(t, ctx, "Pareto-optimal plan"),
            )
            table.append(
                [
                    _label(t),
                    f"{t.values[0]:.2f}%",
                    f"{t.values[1]:.4g}",
                    f"{format_count(t.user_attrs.get('flops', 0))}FLOPs",
                ]
            )
        summary["front"] = [{"trial": t.number, "values": t.values} for t in winners]
        lines.append(format_table(["trial", "top-1", ctx.settings.objectives[1], "FLOPs"], table))
        lines.append(f"Pareto front: {len(winners)} plans in {front_dir}/")
    lines.append(f"trials: {folder / 'trials.csv'}; plots: {', '.join(str(p) for p in plots)}")
    atomic_write_text(folder / "summary.json", json.dumps(summary, indent=2, default=str))
    return "\n".join(lines)

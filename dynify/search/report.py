"""What a search leaves in its run folder, and the summary it prints.

``best.yaml`` (the winning plan as a ready recipe; its header and the summary give the
``dynify convert MODEL --recipe .../best.yaml --num-classes N --input-size C,H,W`` command that
rebuilds the searched model), ``front/`` (one recipe per Pareto-optimal trial in
multi-objective mode), ``trials.csv`` (one row per trial), ``history.png`` and ``pareto.png``,
``summary.json``.
Every file is written under a temporary name and renamed.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import shlex
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from dynify import cost
from dynify._io import atomic_path, atomic_write_text
from dynify._table import format_table
from dynify.convert import apply
from dynify.cost import decimal_prefix, format_count
from dynify.search.context import STATIC, SearchContext
from dynify.search.sampling import plan_of_trial
from dynify.search.trials import feasible

__all__ = [
    "best_trials",
    "count_label",
    "history_figure",
    "pareto_figure",
    "rebuild_command",
    "trial_rows",
    "write_report",
]


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
            "feasible": feasible(t) if t.state in (TrialState.COMPLETE, TrialState.PRUNED) else "",
            "macs": t.user_attrs.get("macs", ""),
            "flops": t.user_attrs.get("flops", ""),
            "params": t.user_attrs.get("params", ""),
            "latency_ms": t.user_attrs.get("latency_ms", ""),
            "converted_layers": t.user_attrs.get("converted", ""),
            "same_as": t.user_attrs.get("same_as", ""),
            "interrupted": t.user_attrs.get("interrupted", ""),
            "retry_of": t.user_attrs.get("retry_of", ""),
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


def count_label(value: float, _position: Any = None) -> str:
    """An axis tick for a count: ``1.2e8`` -> ``120M``, ``1.2e9`` -> ``1.2G`` (three
    significant digits, decimal prefixes, as FLOPs and parameters are quoted)."""
    scaled, prefix = decimal_prefix(value)
    return f"{scaled:.3g}{prefix}"


def _legend_outside(ax: Any) -> None:
    # Beside the axes (savefig's tight bounding box keeps it): it never hides a point.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8)


def _annotate_best(ax: Any, x: float, y: float, text: str) -> None:
    ax.annotate(
        text,
        (x, y),
        xytext=(8, -14),
        textcoords="offset points",
        fontsize=8,
        arrowprops={"arrowstyle": "-", "color": "0.4", "lw": 0.8},
    )


def history_figure(study: optuna.Study, ctx: SearchContext) -> Any:
    """Held-out top-1 per trial, the best so far, the best trial labelled."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    best: FrozenTrial | None = None
    xs: list[int] = []
    ys: list[float] = []
    points: dict[str, tuple[list[float], list[float]]] = {
        "feasible": ([], []),
        "pruned (last epoch)": ([], []),
        "over budget": ([], []),
    }
    for t in sorted(done, key=lambda t: t.number):
        if t.state == TrialState.COMPLETE and feasible(t):
            kind, value = "feasible", t.values[0]
            if best is None or value > best.values[0]:
                best = t
        elif t.state == TrialState.PRUNED:
            kind = "pruned (last epoch)"
            value = max(t.intermediate_values.items(), default=(0, 0.0))[1]
        else:
            kind, value = "over budget", 0.0
        points[kind][0].append(t.number)
        points[kind][1].append(value)
        if best is not None:
            xs.append(t.number)
            ys.append(best.values[0])
    styles = {
        "feasible": {"c": "tab:blue", "marker": "o"},
        "pruned (last epoch)": {"c": "0.6", "marker": "v"},
        "over budget": {"c": "tab:red", "marker": "x"},
    }
    for kind, (px, py) in points.items():
        if px:
            ax.scatter(px, py, s=18, label=kind, zorder=3, **styles[kind])
    if xs:
        ax.step(xs, ys, where="post", c="tab:green", label="best so far", zorder=2)
    if best is not None and len(study.directions) == 1:
        _annotate_best(
            ax, best.number, best.values[0], f"best: {_label(best)}, {best.values[0]:.2f}%"
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trials are whole numbers
    ax.set_xlabel("trial")
    ax.set_ylabel("held-out top-1 (%)")
    ax.set_title(f"{ctx.model_name}, budget {ctx.budget}", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        _legend_outside(ax)
    return fig


def pareto_figure(study: optuna.Study, ctx: SearchContext) -> Any:
    """Top-1 against FLOPs (or the second objective) for the feasible trials: presets and
    the best plan labelled, the budget line."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    second = ctx.settings.objectives[1] if len(ctx.settings.objectives) > 1 else None
    key, label = {
        None: ("flops", "FLOPs per image (= 2 x MACs)"),
        "latency": ("latency_ms", "latency (ms, batch 1)"),
        "params": ("params", "parameters"),
    }[second]
    winners = best_trials(study)
    front = {t.number for t in winners}
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    shown = [
        t
        for t in study.trials
        if t.state == TrialState.COMPLETE and feasible(t) and key in t.user_attrs
    ]
    for on_front in (False, True):
        group = [t for t in shown if (t.number in front) == on_front]
        if not group:
            continue
        ax.scatter(
            [t.user_attrs[key] for t in group],
            [t.values[0] for t in group],
            c="tab:orange" if on_front else "tab:blue",
            s=30 if on_front else 15,
            zorder=3 if on_front else 2,
            label=("Pareto front" if second else "best") if on_front else "feasible",
        )
    labelled_best = winners[0].number if second is None and winners else None
    for t in shown:
        if t.user_attrs.get("preset") and t.number != labelled_best:  # the best says its own
            ax.annotate(t.user_attrs["preset"], (t.user_attrs[key], t.values[0]), fontsize=7)
    if second is None and winners and key in winners[0].user_attrs:
        best = winners[0]
        _annotate_best(
            ax, best.user_attrs[key], best.values[0], f"best: {_label(best)}, {best.values[0]:.2f}%"
        )
    if second is None and ctx.budget.kind == "flops":
        ax.axvline(ctx.budget.value, c="tab:red", ls="--", label=f"budget {ctx.budget}")
    if key in ("flops", "params"):
        ax.xaxis.set_major_formatter(FuncFormatter(count_label))  # 120M, not a 1e8 offset
    ax.set_xlabel(label)
    ax.set_ylabel("held-out top-1 (%)")
    ax.set_title("feasible trials", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        _legend_outside(ax)
    return fig


def _plots(study: optuna.Study, ctx: SearchContext, folder: Path) -> list[Path]:
    return [
        _save(history_figure(study, ctx), folder / "history.png"),
        _save(pareto_figure(study, ctx), folder / "pareto.png"),
    ]


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def rebuild_command(ctx: SearchContext, recipe: str | Path) -> str:
    """The ``dynify convert`` command that rebuilds the searched model from ``recipe``: the
    search's model, number of classes (the data's) and input size, and its starting weights
    when they were not a random init."""
    size = ",".join(map(str, ctx.space.input_size))
    words = [
        "dynify", "convert", ctx.model_name, "--recipe", str(Path(recipe).absolute()),
        "--num-classes", str(ctx.data.num_classes), "--input-size", size,
    ]  # fmt: skip
    if ctx.settings.pretrained:
        words.append("--pretrained")
    elif ctx.settings.checkpoint:
        words += ["--checkpoint", ctx.settings.checkpoint]
    return shlex.join(words)


def _recipe_text(trial: FrozenTrial, ctx: SearchContext, title: str, path: Path) -> str:
    plan = plan_of_trial(trial, ctx)
    totals = cost.price(plan)
    size = ",".join(map(str, ctx.space.input_size))
    header = (
        f"{title}: found by 'dynify search' ({_label(trial)})\n"
        f"model {ctx.model_name} at {size}, {ctx.data.num_classes} classes, budget "
        f"{ctx.budget}, space {ctx.space.label}\n"
        f"held-out top-1 {trial.values[0]:.2f}% after {ctx.space.training.epochs} epochs; "
        f"{format_count(totals.macs)}MACs = {format_count(totals.flops)}FLOPs per image, "
        f"{totals.params:,} params\n"
        f"rebuild: {rebuild_command(ctx, path)}"
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
    summary: dict[str, Any] = {
        "study": study.study_name,
        "trials": counts,
        "model": ctx.model_name,
        "num_classes": ctx.data.num_classes,
        "input_size": list(ctx.space.input_size),
        "training": dataclasses.asdict(ctx.space.training),  # as used (fit to the data)
        "notes": list(ctx.notes),
    }
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
        atomic_write_text(
            folder / "best.yaml", _recipe_text(best, ctx, "best plan", folder / "best.yaml")
        )
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
        summary["best"]["rebuild"] = rebuild_command(ctx, folder / "best.yaml")
        lines.append(f"rebuild it: {summary['best']['rebuild']}")
    else:
        front_dir = folder / "front"
        table = []
        for t in sorted(winners, key=lambda t: t.values[1]):
            path = front_dir / f"trial_{t.number:04d}.yaml"
            atomic_write_text(path, _recipe_text(t, ctx, "Pareto-optimal plan", path))
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
        lines.append(f"rebuild one: {rebuild_command(ctx, front_dir / 'trial_NNNN.yaml')}")
    lines.append(f"trials: {folder / 'trials.csv'}; plots: {', '.join(str(p) for p in plots)}")
    atomic_write_text(folder / "summary.json", json.dumps(summary, indent=2, default=str))
    return "\n".join(lines)

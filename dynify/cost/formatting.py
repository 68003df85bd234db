"""Cost figures as text: decimal prefixes, counts, a report's table and summary, the static
and converted totals side by side, and a plan's per-conv table.

Text only: nothing here counts or prices; the figures come from :mod:`dynify.cost.report`
objects, which this module reads but does not import at run time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dynify._table import format_table
from dynify.plan import Plan

if TYPE_CHECKING:
    from dynify.cost.report import CostReport
    from dynify.cost.timing import LatencyComparison

__all__ = [
    "EXTRA_NOTE",
    "UNITS_NOTE",
    "decimal_prefix",
    "format_count",
    "format_layers",
    "format_report",
    "format_summary",
    "format_totals",
]

UNITS_NOTE = "FLOPs = 2 x MACs"
EXTRA_NOTE = "extra ops (pooling, softmax, ReLU, biases of dynamic layers) are not in FLOPs"


def decimal_prefix(n: float) -> tuple[float, str]:
    """``4_089_184_256`` -> ``(4.089184256, "G")``: ``n`` scaled by its largest decimal
    prefix (T, G, M, K; ``""`` below a thousand)."""
    n = float(n)
    for div, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return n / div, prefix
    return n, ""


def format_count(n: float) -> str:
    """``4_089_184_256`` -> ``"4.09 G"`` (decimal prefixes; append the unit)."""
    v, prefix = decimal_prefix(n)
    if not prefix:
        return f"{v:g} "
    digits = 2 if abs(v) < 10 else 1 if abs(v) < 100 else 0
    return f"{v:.{digits}f} {prefix}"


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"


def _extra(n: int) -> str:
    return format_count(n) if n else "-"


def format_summary(report: CostReport) -> str:
    """One line: MACs, FLOPs, parameters, weights, batch and input size
    (:meth:`CostReport.summary`)."""
    size = "x".join(map(str, report.input_size))
    return (
        f"{format_count(report.macs)}MACs = {format_count(report.flops)}FLOPs "
        f"({UNITS_NOTE}), {format_count(report.params)} params, "
        f"{_mib(report.weight_bytes)} weights; batch {report.batch_size} at {size}"
        + ("" if report.complete else "; convs only (the plan has no op counts)")
    )


def format_report(report: CostReport) -> str:
    """Every row of ``report`` as a text table, with totals (:meth:`CostReport.table`)."""
    rows = [
        [r.name or "(model)", r.kind, format_count(r.macs), f"{r.params:,}", _extra(r.extra_ops)]
        for r in report.rows
    ]
    footer = ["total", "", format_count(report.macs), f"{report.params:,}",
              _extra(report.extra_ops)]  # fmt: skip
    header = ["layer", "kind", "MACs", "params", "extra ops"]
    table = format_table(header, rows, footer=footer)
    return f"{table}\n{format_summary(report)}\n{EXTRA_NOTE}"


def _change(before: float, after: float) -> str:
    if before == 0:
        return "" if after == 0 else "new"
    if after >= 2 * before:
        return f"x{after / before:.2f}"
    return f"{(after - before) / before * 100:+.1f}%"


def format_totals(
    before: CostReport,
    after: CostReport,
    *,
    measured: tuple[int, int] | None = None,
    device: str | None = None,
    latency: LatencyComparison | None = None,
) -> str:
    """Totals of the static (``before``) and converted (``after``) model side by side.

    Args:
        measured: FLOPs measured by :func:`~dynify.cost.measure_flops` for both, shown
            beside the count.
        device: where ``measured`` was measured.
        latency: a :func:`~dynify.cost.compare_latency` result.
    """
    rows = [
        [label, format_count(a), format_count(b), _change(a, b)]
        for label, a, b in (
            ("MACs", before.macs, after.macs),
            ("FLOPs", before.flops, after.flops),
            ("params", before.params, after.params),
        )
    ]
    rows += [
        ["weights", _mib(before.weight_bytes), _mib(after.weight_bytes),
         _change(before.weight_bytes, after.weight_bytes)],
        ["extra ops", format_count(before.extra_ops), format_count(after.extra_ops),
         "not in FLOPs"],
    ]  # fmt: skip
    if measured is not None:
        ok = measured[0] == before.flops and measured[1] == after.flops
        rows.append(
            [
                "measured FLOPs",
                format_count(measured[0]),
                format_count(measured[1]),
                f"FlopCounterMode{f' on {device}' if device else ''}: "
                + ("equal to the count" if ok else "DIFFERS from the count"),
            ]
        )
    if latency is not None:
        rows.append(
            [
                "latency",
                f"{latency.static.median_ms:.2f} ms",
                f"{latency.converted.median_ms:.2f} ms",
                f"x{latency.ratio:.2f} (median of {len(latency.ratios)}, {latency.static.device})",
            ]
        )
    size = "x".join(map(str, after.input_size))
    per = "per image" if after.batch_size == 1 else f"per batch of {after.batch_size}"
    note = f"{UNITS_NOTE}; {per}, input {size}"
    if not (before.complete and after.complete):
        note += "; convs only (a plan without op counts)"
    return format_table(["", "static", "converted", "change"], rows) + "\n" + note


def format_layers(
    plan: Plan, before: CostReport, after: CostReport, *, show_all: bool = False
) -> str:
    """The plan's convs as a table: shape, input, kind, experts, and MACs and parameters
    before and after conversion (``before`` = ``count(plan, static=True)``, ``after`` =
    ``count(plan)``; what ``dynify inspect`` prints). ``show_all``: the convs that cannot
    be converted too."""
    rows = []
    for lp in plan.layers:
        s = lp.site
        if s.unsupported is not None and not show_all:
            continue
        b, a = before.row(s.name), after.row(s.name)
        rows.append(
            [
                s.name,
                s.label,
                "x".join(map(str, s.input_shape)) if s.input_shape else "?",
                lp.kind,
                str(lp.settings.experts) if lp.convert else "-",
                format_count(b.macs),
                format_count(a.macs),
                f"{b.params:,}",
                f"{a.params:,}",
            ]
        )
    header = ["layer", "conv", "input", "kind", "K", "MACs", "MACs after", "params",
              "params after"]  # fmt: skip
    return format_table(header, rows)

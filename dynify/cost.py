"""What a model or a plan costs: MACs, FLOPs, parameters, weight memory, and latency.

Units: a MAC is one multiply-accumulate; **FLOPs = 2 x MACs** (papers and timm quote MACs
and often call them "FLOPs": ResNet-50 is 4.1 GMACs = 8.2 GFLOPs). ``macs`` counts exactly
the work ``torch.utils.flop_counter.FlopCounterMode`` counts, halved: convolutions, linear
layers, matrix products and attention (bias additions, normalisation, activations and
pooling are not in it). What a dynamic layer adds besides matrix products (the attention's
global pooling, ReLU, biases, temperature and softmax) is reported apart as ``extra_ops``,
so that the analytic ``flops`` and the measured :func:`measure_flops` agree exactly.
Counts are for one image (batch 1) unless ``batch_size`` is given.

A dynamic layer (:class:`~dynify.layers.DynamicConv2d`, K experts, hidden width h) costs,
per image and call: pooling ``C_in*H*W`` adds; ``C_in*h`` + ``h*K`` MACs of attention;
``K * C_out * C_in/groups * kh * kw`` MACs of kernel mixing; ``K * C_out`` MACs of bias
mixing (when the conv has a bias); and the convolution itself, exactly as the static conv.

Pricing is analytic: the shapes come from the trace (``trace_model`` records the cost of
every op of its example pass in ``ModelTrace.op_counts``, carried into the plan), so
``count(plan)`` prices a plan without building it, in well under a millisecond once the
plan's trace has been indexed; the search prices thousands of candidates this way.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dynify._budget import BUDGET_FORMS, Budget, BudgetKind, parse_budget
from dynify._latency import (
    LatencyComparison,
    LatencyResult,
    compare_latency,
    example_input,
    latency,
    resolve_device,
)
from dynify._opcount import (
    ATTENTION_OP_NAMES,
    CONV_OP_NAMES,
    CPU_ATTENTION_OPS,
    OpCounts,
    OpRecorder,
    is_conv_layer,
)
from dynify.errors import DynifyError
from dynify.layers import DynamicConv2d
from dynify.layers._functional import runs_stacked
from dynify.layers.attention import attention_hidden_width
from dynify.plan import LayerPlan, Plan, find_plan

__all__ = [
    "BUDGET_FORMS",
    "Budget",
    "BudgetKind",
    "CostReport",
    "LatencyComparison",
    "LatencyResult",
    "LayerCost",
    "Totals",
    "compare_latency",
    "count",
    "decimal_prefix",
    "format_count",
    "format_totals",
    "latency",
    "measure_flops",
    "parse_budget",
    "price",
    "resolve_device",
]

UNITS_NOTE = "FLOPs = 2 x MACs"
EXTRA_NOTE = "extra ops (pooling, softmax, ReLU, biases of dynamic layers) are not in FLOPs"


# -- reports ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LayerCost:
    """One row of a cost report: a conv layer, or a module running matrix products.

    ``macs`` and ``extra_ops`` are for the whole batch of the report. ``parts`` splits a
    dynamic layer's MACs (conv, attention_fc1, attention_fc2, kernel_mix, bias_mix) and
    ``extra_parts`` its extra ops (pool, activations); both are empty for other rows.
    """

    name: str
    kind: str  # "conv", "dynamic", "matmul", "attention", "other"
    macs: int
    params: int
    extra_ops: int = 0
    parts: dict[str, int] = field(default_factory=dict)
    extra_parts: dict[str, int] = field(default_factory=dict)

    @property
    def flops(self) -> int:
        return 2 * self.macs


@dataclass(frozen=True, slots=True)
class Totals:
    """Totals only (``price``): MACs, parameters and extra ops for ``batch_size`` images."""

    macs: int
    params: int
    extra_ops: int
    batch_size: int

    @property
    def flops(self) -> int:
        """FLOPs = 2 x MACs (what FlopCounterMode counts)."""
        return 2 * self.macs


@dataclass(frozen=True)
class CostReport:
    """Per-layer and total cost of a model or plan for ``batch_size`` images.

    ``macs`` (and ``flops = 2 * macs``) is exactly what FlopCounterMode counts;
    ``extra_ops`` is the elementwise work of dynamic layers it does not count.
    ``complete`` is False when the plan carries no op counts (made by an older dynify):
    only its convs are priced then.
    """

    rows: tuple[LayerCost, ...]
    macs: int
    params: int
    extra_ops: int
    weight_bytes: int
    batch_size: int
    input_size: tuple[int, int, int]
    complete: bool = True

    @property
    def flops(self) -> int:
        """FLOPs = 2 x MACs."""
        return 2 * self.macs

    @property
    def totals(self) -> Totals:
        return Totals(self.macs, self.params, self.extra_ops, self.batch_size)

    def row(self, name: str) -> LayerCost:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def summary(self) -> str:
        """One line: MACs, FLOPs, parameters, weights, batch and input size."""
        size = "x".join(map(str, self.input_size))
        return (
            f"{format_count(self.macs)}MACs = {format_count(self.flops)}FLOPs "
            f"({UNITS_NOTE}), {format_count(self.params)} params, "
            f"{self.weight_bytes / 2**20:.1f} MiB weights; batch {self.batch_size} at {size}"
            + ("" if self.complete else "; convs only (the plan has no op counts)")
        )

    def table(self) -> str:
        """Every row as a text table, with totals."""
        from dynify._table import format_table

        rows = [
            [
                r.name or "(model)",
                r.kind,
                format_count(r.macs),
                f"{r.params:,}",
                format_count(r.extra_ops) if r.extra_ops else "-",
            ]
            for r in self.rows
        ]
        footer = [
            "total",
            "",
            format_count(self.macs),
            f"{self.params:,}",
            format_count(self.extra_ops) if self.extra_ops else "-",
        ]
        header = ["layer", "kind", "MACs", "params", "extra ops"]
        return format_table(header, rows, footer=footer) + f"\n{self.summary()}\n{EXTRA_NOTE}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "macs": self.macs,
            "flops": self.flops,
            "params": self.params,
            "extra_ops": self.extra_ops,
            "weight_bytes": self.weight_bytes,
            "batch_size": self.batch_size,
            "input_size": list(self.input_size),
            "complete": self.complete,
        }


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


# -- the static part of a trace, indexed once ---------------------------------------------


@dataclass
class _Index:
    """An ``OpCounts`` arranged for pricing: per conv layer and per other module."""

    # conv layer -> (batched, fixed) MACs of everything counted inside it / of its convs only
    layer_all: dict[str, tuple[int, int]]
    layer_conv: dict[str, tuple[int, int]]
    # other modules: (name, kind, batched, fixed, params)
    rows: list[tuple[str, str, int, int, int]]
    rows_batched: int
    rows_fixed: int
    rows_params: int


_INDEX: weakref.WeakKeyDictionary[OpCounts, _Index] = weakref.WeakKeyDictionary()


def _index(counts: OpCounts) -> _Index:
    cached = _INDEX.get(counts)
    if cached is not None:
        return cached
    layer_all: dict[str, list[int]] = {}
    layer_conv: dict[str, list[int]] = {}
    modules: dict[str, list[Any]] = {}
    for op in counts.ops:
        slot = 0 if op.batched else 1
        if op.in_conv:
            layer_all.setdefault(op.module, [0, 0])[slot] += op.macs
            if op.op in CONV_OP_NAMES:
                layer_conv.setdefault(op.module, [0, 0])[slot] += op.macs
            continue
        acc = modules.setdefault(op.module, [0, 0, set()])
        acc[slot] += op.macs
        acc[2].add(
            "attention"
            if op.op in ATTENTION_OP_NAMES
            else "conv"
            if op.op in CONV_OP_NAMES
            else "matmul"
        )
    rows = [
        (name, ",".join(sorted(kinds)), b, f, counts.module_params.get(name, 0))
        for name, (b, f, kinds) in modules.items()
    ]
    index = _Index(
        layer_all={k: (v[0], v[1]) for k, v in layer_all.items()},
        layer_conv={k: (v[0], v[1]) for k, v in layer_conv.items()},
        rows=rows,
        rows_batched=sum(r[2] for r in rows),
        rows_fixed=sum(r[3] for r in rows),
        rows_params=sum(r[4] for r in rows),
    )
    _INDEX[counts] = index
    return index


# -- dynamic layers -----------------------------------------------------------------------


def _dynamic_cost(
    name: str,
    *,
    conv: int,
    calls: int,
    params: int,
    rows: bool,
    in_channels: int,
    out_channels: int,
    weight_numel: int,
    bias: bool,
    experts: int,
    hidden: int,
    input_hw: tuple[int, int],
    groups: int,
    batch: int,
) -> tuple[int, int, LayerCost | None]:
    """(MACs, extra ops, row) of a dynamic layer: ``conv`` MACs of its convolution (the
    static conv's, all calls and images), plus, per image and call (``calls`` = calls x
    images), the matrix products ``dynamic_conv2d`` runs (the attention's two linear
    layers, kernel mixing, bias mixing) and the extra elementwise ops.

    At ``batch`` > 1 a layer with a tiny output map runs the ``stacked`` formulation (see
    ``dynify.layers._functional``): K convolutions and an output mix instead of kernel
    mixing. Priced as it runs, so the count agrees with FlopCounterMode at any batch."""
    k = experts
    fc1, fc2, mix = in_channels * hidden, hidden * k, k * weight_numel
    bias_mix = k * out_channels if bias else 0
    output_mix = 0
    positions = conv // (calls * weight_numel) if calls and weight_numel else 0
    if runs_stacked(batch, k, weight_numel, positions, groups):
        conv, mix, output_mix = k * conv, 0, k * out_channels * positions
    h, w = input_hw
    pool = in_channels * (h * w + 1)  # global average pool: C*H*W adds and C divides
    activations = 2 * hidden + 5 * k  # fc biases (h + K), ReLU (h), 1/T (K), softmax (3K)
    macs = conv + (fc1 + fc2 + mix + bias_mix + output_mix) * calls
    extra = (pool + activations) * calls
    if not rows:
        return macs, extra, None
    parts = {
        "conv": conv,
        "attention_fc1": fc1 * calls,
        "attention_fc2": fc2 * calls,
        "kernel_mix": mix * calls,
        "bias_mix": bias_mix * calls,
    }
    if output_mix:
        parts["output_mix"] = output_mix * calls
    extra_parts = {"pool": pool * calls, "activations": activations * calls}
    return macs, extra, LayerCost(name, "dynamic", macs, params, extra, parts, extra_parts)


def _hw(shape: tuple[int, ...] | None) -> tuple[int, int]:
    return (shape[1], shape[2]) if shape is not None and len(shape) == 3 else (0, 0)


def _plan_layer(
    lp: LayerPlan, index: _Index | None, batch: int, static: bool, rows: bool
) -> tuple[int, int, int, LayerCost | None]:
    """(MACs, params, extra ops, row) of one planned conv for ``batch`` images."""
    s = lp.site
    convert = lp.convert and not static
    if index is not None:
        b, f = (index.layer_conv if convert else index.layer_all).get(s.name, (0, 0))
        conv = b * batch + f
    else:  # a plan without op counts: the conv from its shapes
        out = s.output_shape
        conv = s.weight_numel * out[1] * out[2] * s.calls * batch if out else 0
    if not convert:
        row = LayerCost(s.name, "conv", conv, s.params) if rows else None
        return conv, s.params, 0, row
    params = lp.params_after
    macs, extra, row = _dynamic_cost(
        s.name,
        conv=conv,
        calls=s.calls * batch,
        params=params,
        rows=rows,
        in_channels=s.in_channels,
        out_channels=s.out_channels,
        weight_numel=s.weight_numel,
        bias=s.bias,
        experts=lp.settings.experts,
        hidden=attention_hidden_width(s.in_channels, lp.settings.reduction),
        input_hw=_hw(s.input_shape),
        groups=s.groups,
        batch=batch,
    )
    return macs, params, extra, row


def _check_batch(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DynifyError(f"batch size must be a positive integer, got {batch_size!r}")
    return batch_size


def _price_plan(plan: Plan, batch: int, static: bool, rows: bool) -> tuple[Any, ...]:
    counts = plan.op_counts
    index = _index(counts) if counts is not None else None
    macs = params = extra = site_params = 0
    out_rows = []
    for lp in plan.layers:
        m, p, e, row = _plan_layer(lp, index, batch, static, rows)
        macs += m
        params += p
        extra += e
        site_params += lp.site.params
        if row is not None:
            out_rows.append(row)
    if index is not None:
        macs += index.rows_batched * batch + index.rows_fixed
        other = counts.params - site_params - index.rows_params
        params += index.rows_params + other
        if rows:
            out_rows += [
                LayerCost(name, kind, b * batch + f, p) for name, kind, b, f, p in index.rows
            ]
            if other:
                out_rows.append(LayerCost("(other parameters)", "other", 0, other))
    return macs, params, extra, out_rows, index is not None


def price(plan: Plan, *, batch_size: int = 1, static: bool = False) -> Totals:
    """Totals of ``plan`` without building rows: the search's fast path.

    ``static=True`` prices the unconverted model the plan was made from.
    """
    batch = _check_batch(batch_size)
    macs, params, extra, _, _ = _price_plan(plan, batch, static, rows=False)
    return Totals(macs, params, extra, batch)


# -- models without a plan (or at another input size): one recorded forward pass ---------


def _count_model(model: nn.Module, size: tuple[int, int, int], batch: int) -> tuple[Any, ...]:
    example = example_input(model, size)
    recorder = OpRecorder(model, (example,))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), recorder:
            model(example)
    except Exception as err:
        message = str(err).splitlines()[0] if str(err) else ""
        raise DynifyError(
            f"the model does not run on an input of size {size}: {type(err).__name__}: {message}"
        ) from None
    finally:
        model.train(was_training)
    counts = recorder.counts()
    index = _index(counts)
    modules = dict(model.named_modules())
    layer_names = list(recorder.conv_calls) + [
        n for n, m in modules.items() if is_conv_layer(m) and n not in recorder.conv_calls
    ]
    # Nested conv layers (a conv inside another) are priced with their outermost one.
    layer_names = [
        n for n in layer_names if not any(n.startswith(o + ".") for o in layer_names if o)
    ]
    rows: list[LayerCost] = []
    macs = params = extra = 0
    for name in layer_names:
        module = modules[name]
        p = sum(t.numel() for t in module.parameters())
        if isinstance(module, DynamicConv2d):
            b, f = index.layer_conv.get(name, (0, 0))
            _, _, row = _dynamic_cost(
                name,
                conv=b * batch + f,
                calls=recorder.conv_calls.get(name, 0) * batch,
                params=p,
                rows=True,
                in_channels=module.in_channels,
                out_channels=module.out_channels,
                weight_numel=module.weight[0].numel(),
                bias=module.bias is not None,
                experts=module.num_experts,
                hidden=module.attention.fc1.out_features,
                input_hw=_hw(recorder.conv_inputs.get(name)),
                groups=module.groups,
                batch=batch,
            )
            assert row is not None
        else:
            b, f = index.layer_all.get(name, (0, 0))
            row = LayerCost(name, "conv", b * batch + f, p)
        rows.append(row)
        macs += row.macs
        params += p
        extra += row.extra_ops
    rows += [LayerCost(name, kind, b * batch + f, p) for name, kind, b, f, p in index.rows]
    macs += index.rows_batched * batch + index.rows_fixed
    other = counts.params - params - index.rows_params
    if other:
        rows.append(LayerCost("(other parameters)", "other", 0, other))
    return macs, counts.params, extra, rows, True


# -- entry points ---------------------------------------------------------------------------


def _bytes_per_param(model: nn.Module | None) -> int:
    param = None if model is None else next(model.parameters(), None)
    return 4 if param is None else param.element_size()


def count(
    model_or_plan: nn.Module | Plan,
    *,
    input_size: tuple[int, int, int] | None = None,
    batch_size: int = 1,
    static: bool = False,
) -> CostReport:
    """Per-layer and total MACs, FLOPs (= 2 x MACs), parameters and weight memory.

    Args:
        model_or_plan: a static model, a converted model (priced from its plan), a model
            holding ``DynamicConv2d`` layers without a plan, or a :class:`~dynify.Plan` that
            has not been applied (priced without building anything).
        input_size: ``(C, H, W)``; default: the plan's, else the model's
            ``pretrained_cfg``. A plan is priced at the size it was traced at.
        batch_size: images per pass (counts scale with it).
        static: for a plan, price the unconverted model it was made from instead.

    Weight memory is the parameters' bytes (float32 for a plan).
    """
    from dynify.models import parse_input_size
    from dynify.trace import default_input_size

    batch = _check_batch(batch_size)
    size = parse_input_size(input_size)
    model: nn.Module | None = None
    plan: Plan | None
    if isinstance(model_or_plan, Plan):
        plan = model_or_plan
        if size is not None and tuple(size) != tuple(plan.input_size):
            raise DynifyError(
                f"this plan was traced at input size {tuple(plan.input_size)}, not {size}: "
                "make a plan at that size (dynify.make_plan(model, recipe, input_size=...))"
            )
    elif isinstance(model_or_plan, nn.Module):
        model = model_or_plan
        plan = find_plan(model)
        if plan is not None and size is not None and tuple(size) != tuple(plan.input_size):
            plan = None  # priced at another size: count the model itself
    else:
        raise DynifyError(
            f"count() takes an nn.Module or a dynify Plan, got {type(model_or_plan).__name__}"
        )
    if plan is not None:
        size = tuple(plan.input_size)  # type: ignore[assignment]
        macs, params, extra, rows, complete = _price_plan(plan, batch, static, rows=True)
    else:
        assert model is not None
        if static and any(isinstance(m, DynamicConv2d) for m in model.modules()):
            raise DynifyError(
                "static=True needs a plan: this model holds dynamic layers but no dynify plan"
            )
        size = size or default_input_size(model)
        macs, params, extra, rows, complete = _count_model(model, size, batch)
    return CostReport(
        rows=tuple(rows),
        macs=macs,
        params=params,
        extra_ops=extra,
        weight_bytes=params * _bytes_per_param(model),
        batch_size=batch,
        input_size=tuple(size),  # type: ignore[arg-type]
        complete=complete,
    )


def _cpu_attention_flops(query, key, value, *_args: Any, out_val: Any = None, **_kw: Any) -> int:
    """torch's own attention formula, for the CPU attention kernel its registry lacks."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query.shape, key.shape, value.shape)


_cpu_attention_flops._get_raw = True  # type: ignore[attr-defined]  # takes tensors, not shapes


def measure_flops(
    model: nn.Module,
    *,
    input_size: tuple[int, int, int] | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 1,
) -> int:
    """FLOPs of one forward pass (eval mode, no grad) measured by torch's ``FlopCounterMode``
    on ``device`` (default: ``cuda`` when available, else ``cpu``).

    torch's registry lacks the CPU kernel of ``scaled_dot_product_attention``; it is counted
    with torch's own attention formula, so CPU and GPU measure the same.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from dynify.models import parse_input_size
    from dynify.trace import default_input_size

    batch = _check_batch(batch_size)
    dev = resolve_device(device)
    size = parse_input_size(input_size)
    if size is None:
        plan = find_plan(model)
        size = tuple(plan.input_size) if plan is not None else default_input_size(model)
    param = next(model.parameters(), None)
    target = model
    if param is not None and param.device.type != dev.type:
        target = copy.deepcopy(model).to(dev)
    x = example_input(target, size, batch)
    was_training = model.training
    target.eval()
    mapping = dict.fromkeys(CPU_ATTENTION_OPS, _cpu_attention_flops)
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            target(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


# -- text -----------------------------------------------------------------------------------


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
        measured: FLOPs measured by :func:`measure_flops` for both, shown beside the count.
        device: where ``measured`` was measured.
        latency: a :func:`compare_latency` result.
    """
    from dynify._table import format_table

    def mib(report: CostReport) -> str:
        return f"{report.weight_bytes / 2**20:.1f} MiB"

    rows = [
        [
            "MACs",
            format_count(before.macs),
            format_count(after.macs),
            _change(before.macs, after.macs),
        ],
        [
            "FLOPs",
            format_count(before.flops),
            format_count(after.flops),
            _change(before.flops, after.flops),
        ],
        [
            "params",
            format_count(before.params),
            format_count(after.params),
            _change(before.params, after.params),
        ],
        ["weights", mib(before), mib(after), _change(before.weight_bytes, after.weight_bytes)],
        [
            "extra ops",
            format_count(before.extra_ops),
            format_count(after.extra_ops),
            "not in FLOPs",
        ],
    ]
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

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

The public API is this package's ``__all__``; its modules, one job each (the arrows are
their imports):

- :mod:`~dynify.cost.formatting`: text (``format_count``, ``format_totals``,
  ``format_layers``); reads reports, imports none.
- :mod:`~dynify.cost.report`: ``LayerCost``, ``Totals``, ``CostReport`` -> formatting.
- :mod:`~dynify.cost.timing`: ``latency``, ``compare_latency`` (no dynify module above
  ``_device``).
- :mod:`~dynify.cost.pricing`: a plan priced per layer from its op counts (``price``)
  -> report.
- :mod:`~dynify.cost.counting`: ``count`` and ``measure_flops`` -> pricing, timing.
- :mod:`~dynify.cost.budget`: ``parse_budget``, ``Budget``, ``check_budget`` -> report,
  timing, formatting.
"""

from __future__ import annotations

from dynify._opcount import OpCounts
from dynify.cost.budget import (
    BUDGET_FORMS,
    Budget,
    BudgetCheck,
    BudgetKind,
    check_budget,
    parse_budget,
)
from dynify.cost.counting import count, measure_flops
from dynify.cost.formatting import (
    EXTRA_NOTE,
    UNITS_NOTE,
    decimal_prefix,
    format_count,
    format_layers,
    format_totals,
)
from dynify.cost.pricing import price
from dynify.cost.report import CostReport, LayerCost, Totals
from dynify.cost.timing import (
    LatencyComparison,
    LatencyResult,
    compare_latency,
    latency,
    resolve_device,
)

__all__ = [
    "BUDGET_FORMS",
    "EXTRA_NOTE",
    "UNITS_NOTE",
    "Budget",
    "BudgetCheck",
    "BudgetKind",
    "CostReport",
    "LatencyComparison",
    "LatencyResult",
    "LayerCost",
    "OpCounts",
    "Totals",
    "check_budget",
    "compare_latency",
    "count",
    "decimal_prefix",
    "format_count",
    "format_layers",
    "format_totals",
    "latency",
    "measure_flops",
    "parse_budget",
    "price",
    "resolve_device",
]

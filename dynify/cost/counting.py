"""Counting a model or a plan: :func:`count` (analytic, per layer) and :func:`measure_flops`
(torch's ``FlopCounterMode`` on a real pass, the reference the count must equal).

``count`` prices a plan (the model's own, or one given) with :mod:`dynify.cost.pricing`;
a model without a plan, or at another input size, is run once under the op recorder
(:func:`dynify._opcount.record_ops`) and its conv layers are priced with the same formulas.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from dynify._modes import evaluating
from dynify._opcount import CPU_ATTENTION_OPS, OpRecorder, record_ops
from dynify.cost.pricing import DynamicShape, check_batch, dynamic_layer_cost, hw, index, price_plan
from dynify.cost.report import CostReport, LayerCost
from dynify.cost.timing import example_input, resolve_device
from dynify.errors import DynifyError
from dynify.layers import DynamicConv2d
from dynify.layers.base import DynamicLayer
from dynify.layers.conv_variants import is_conv_layer
from dynify.layers.dcd import DCDConv2d
from dynify.layers.odconv import ODConv2d
from dynify.models import parse_input_size
from dynify.plan import Plan, find_plan
from dynify.trace import default_input_size

__all__ = ["count", "is_conv_layer", "measure_flops"]


def _module_shape(module: DynamicLayer, input_shape: tuple[int, ...] | None) -> DynamicShape:
    """What the dynamic layer's formula reads of a built layer (of any kind)."""
    kh, kw = module.kernel_size
    rank = 0
    numel = module.out_channels * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, DynamicConv2d):
        hidden = module.attention.fc1.out_features
    elif isinstance(module, ODConv2d):
        hidden = module.attention.fc.out_features
    elif isinstance(module, DCDConv2d):
        hidden, rank = module.squeeze, module.rank
    else:
        raise DynifyError(f"the cost model does not know a {type(module).__name__}")
    return DynamicShape(module.in_channels, module.out_channels, numel,
                        getattr(module, "bias", None) is not None, module.num_experts,
                        hidden, hw(input_shape), module.groups, module.kind,
                        (kh, kw), rank)  # fmt: skip


def _layer_names(model: nn.Module, recorder: OpRecorder) -> list[str]:
    """The conv layers, in the order they ran (then those that did not run); a conv layer
    inside another is priced with its outermost one."""
    names = list(recorder.conv_calls) + [
        n for n, m in model.named_modules() if is_conv_layer(m) and n not in recorder.conv_calls
    ]
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o)]


def _count_model(
    model: nn.Module, size: tuple[int, int, int], batch: int
) -> tuple[int, int, int, list[LayerCost]]:
    """(MACs, params, extra ops, rows) of one recorded forward pass of ``model``."""
    _, recorder = record_ops(model, example_input(model, size), is_conv_layer=is_conv_layer)
    counts = recorder.counts()
    idx = index(counts)
    modules = dict(model.named_modules())
    rows: list[LayerCost] = []
    macs = params = extra = 0
    for name in _layer_names(model, recorder):
        module = modules[name]
        p = sum(t.numel() for t in module.parameters())
        if isinstance(module, DynamicLayer):
            b, f = idx.layer_conv.get(name, (0, 0))
            _, _, row = dynamic_layer_cost(
                name, _module_shape(module, recorder.conv_inputs.get(name)), conv=b * batch + f,
                calls=recorder.conv_calls.get(name, 0) * batch, params=p, batch=batch,
            )  # fmt: skip
            assert row is not None
        else:
            b, f = idx.layer_all.get(name, (0, 0))
            row = LayerCost(name, "conv", b * batch + f, p)
        rows.append(row)
        macs += row.macs
        params += p
        extra += row.extra_ops
    rows += idx.other_rows(batch)
    macs += idx.other_macs(batch)
    other = counts.params - params - idx.rows_params
    if other:
        rows.append(LayerCost("(other parameters)", "other", 0, other))
    return macs, counts.params, extra, rows


def _bytes_per_param(model: nn.Module | None) -> int:
    param = None if model is None else next(model.parameters(), None)
    return 4 if param is None else param.element_size()


def _size_mismatch(plan: Plan, size: tuple[int, ...]) -> DynifyError:
    return DynifyError(
        f"this plan was traced at input size {tuple(plan.input_size)}, not {size}: make a "
        "plan at that size (dynify.make_plan(model, recipe, input_size=...))",
        arguments=("input_size",),
    )


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
    batch = check_batch(batch_size)
    size = parse_input_size(input_size)
    model: nn.Module | None = None
    plan: Plan | None
    if isinstance(model_or_plan, Plan):
        plan = model_or_plan
        if size is not None and tuple(size) != tuple(plan.input_size):
            raise _size_mismatch(plan, size)
    elif isinstance(model_or_plan, nn.Module):
        model = model_or_plan
        plan = find_plan(model)
        if plan is not None and size is not None and tuple(size) != tuple(plan.input_size):
            plan = None  # priced at another size: count the model itself
    else:
        raise DynifyError(
            "model_or_plan must be an nn.Module or a dynify Plan, got "
            f"{type(model_or_plan).__name__}",
            arguments=("model_or_plan",),
        )
    complete = True
    if plan is not None:
        size = tuple(plan.input_size)  # type: ignore[assignment]
        priced = price_plan(plan, batch=batch, static=static)
        macs, params, extra, rows = priced.macs, priced.params, priced.extra_ops, priced.rows
        complete = priced.complete
    else:
        assert model is not None
        if static and any(isinstance(m, DynamicLayer) for m in model.modules()):
            raise DynifyError(
                "static=True needs a plan: this model holds dynamic layers but no dynify plan",
                arguments=("static",),
            )
        size = size or default_input_size(model)
        macs, params, extra, rows = _count_model(model, size, batch)
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
    batch = check_batch(batch_size)
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
    mapping = dict.fromkeys(CPU_ATTENTION_OPS, _cpu_attention_flops)
    with (
        torch.no_grad(),
        evaluating(target),
        FlopCounterMode(display=False, custom_mapping=mapping) as counter,
    ):
        target(x)
    return int(counter.get_total_flops())

"""Pricing a plan layer by layer from its trace's op counts, without building anything.

A plan's ``op_counts`` (every counted op of the trace's example pass, per module) are
indexed once per :class:`~dynify._opcount.OpCounts` instance: per conv layer and per other
module, with the MACs that scale with the batch apart from the fixed ones. A planned conv
is then priced from its shapes: as it is when it stays static, by the dynamic layer's
formula (:func:`dynamic_layer_cost`) when it converts. :func:`price` gives the totals only,
the search's fast path; :func:`price_plan` the rows as well (what ``count(plan)`` reports).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from dynify._opcount import ATTENTION_OP_NAMES, CONV_OP_NAMES, OpCounts
from dynify.cost.report import LayerCost, Totals
from dynify.errors import DynifyError
from dynify.layers._functional import runs_stacked
from dynify.layers.attention import attention_hidden_width
from dynify.layers.dcd import dcd_rank, dcd_squeeze
from dynify.layers.odconv import od_runs_unfolded, odconv_hidden_width, odconv_sections
from dynify.plan import LayerPlan, Plan

__all__ = [
    "DynamicShape",
    "Index",
    "Priced",
    "check_batch",
    "dcd_layer_macs",
    "dynamic_layer_cost",
    "hw",
    "index",
    "price",
    "price_plan",
]


# -- the static part of a trace, indexed once ---------------------------------------------


@dataclass
class Index:
    """An ``OpCounts`` arranged for pricing: per conv layer and per other module."""

    # conv layer -> (batched, fixed) MACs of everything counted inside it / of its convs only
    layer_all: dict[str, tuple[int, int]]
    layer_conv: dict[str, tuple[int, int]]
    # other modules: (name, kind, batched, fixed, params)
    rows: list[tuple[str, str, int, int, int]]
    rows_batched: int
    rows_fixed: int
    rows_params: int

    def other_rows(self, batch: int) -> list[LayerCost]:
        """The modules outside conv layers that run counted ops, for ``batch`` images."""
        return [LayerCost(name, kind, b * batch + f, p) for name, kind, b, f, p in self.rows]

    def other_macs(self, batch: int) -> int:
        return self.rows_batched * batch + self.rows_fixed


_INDEX: weakref.WeakKeyDictionary[OpCounts, Index] = weakref.WeakKeyDictionary()


def index(counts: OpCounts) -> Index:
    """``counts`` indexed for pricing; built once per ``OpCounts`` and cached with it."""
    cached = _INDEX.get(counts)
    if cached is None:
        cached = _INDEX[counts] = _build_index(counts)
    return cached


def _build_index(counts: OpCounts) -> Index:
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
    return Index(
        layer_all={k: (v[0], v[1]) for k, v in layer_all.items()},
        layer_conv={k: (v[0], v[1]) for k, v in layer_conv.items()},
        rows=rows,
        rows_batched=sum(r[2] for r in rows),
        rows_fixed=sum(r[3] for r in rows),
        rows_params=sum(r[4] for r in rows),
    )


# -- dynamic layers -----------------------------------------------------------------------


def hw(shape: tuple[int, ...] | None) -> tuple[int, int]:
    """``(H, W)`` of a per-sample ``(C, H, W)`` shape; ``(0, 0)`` when it is unknown."""
    return (shape[1], shape[2]) if shape is not None and len(shape) == 3 else (0, 0)


@dataclass(frozen=True, slots=True)
class DynamicShape:
    """What the dynamic layer's formula reads of a layer (``weight_numel``: one expert's
    kernel; ``hidden``: the attention's hidden width; ``input_hw``: the input map)."""

    in_channels: int
    out_channels: int
    weight_numel: int
    bias: bool
    experts: int
    hidden: int
    input_hw: tuple[int, int]
    groups: int
    kind: str = "dycnn"
    kernel_size: tuple[int, int] = (1, 1)
    rank: int = 0  # DCD's latent dimension

    @classmethod
    def of_plan(cls, lp: LayerPlan) -> DynamicShape:
        """The layer ``lp`` would build."""
        s, settings = lp.site, lp.settings
        kind, rank = settings.kind, 0
        if kind == "odconv":
            hidden = odconv_hidden_width(s.in_channels, settings.reduction)
        elif kind == "dcd":  # the squeeze width S and the latent dimension L
            hidden = dcd_squeeze(s.in_channels, settings.reduction)
            rank = dcd_rank(s.in_channels, s.out_channels, settings.rank)
        else:
            hidden = attention_hidden_width(s.in_channels, settings.reduction)
        return cls(s.in_channels, s.out_channels, s.weight_numel, s.bias, settings.experts,
                   hidden, hw(s.input_shape), s.groups, kind, tuple(s.kernel_size),
                   rank)  # fmt: skip


def dynamic_layer_cost(
    name: str,
    shape: DynamicShape,
    *,
    conv: int,
    calls: int,
    params: int,
    batch: int,
    rows: bool = True,
) -> tuple[int, int, LayerCost | None]:
    """(MACs, extra ops, row) of a dynamic layer: ``conv`` MACs of its convolution (the
    static conv's, all calls and images), plus, per image and call (``calls`` = calls x
    images), the matrix products ``dynamic_conv2d`` runs (the attention's two linear
    layers, kernel mixing, bias mixing) and the extra elementwise ops. No row unless
    ``rows``.

    At ``batch`` > 1 a layer with a tiny output map runs the ``stacked`` formulation (see
    ``dynify.layers._functional``): K convolutions and an output mix instead of kernel
    mixing. Priced as it runs, so the count agrees with FlopCounterMode at any batch.

    Each kind has its own formula (:func:`odconv_layer_macs`, ...), priced from the same
    figures; ``calls`` images through one call each."""
    if shape.kind != "dycnn" and shape.kind != "condconv":
        return _kind_cost(name, shape, conv=conv, calls=calls, params=params, rows=rows)
    k, numel = shape.experts, shape.weight_numel
    fc1, fc2, mix = shape.in_channels * shape.hidden, shape.hidden * k, k * numel
    bias_mix = k * shape.out_channels if shape.bias else 0
    output_mix = 0
    positions = conv // (calls * numel) if calls and numel else 0
    if runs_stacked(batch, k, numel, positions, shape.groups):
        conv, mix, output_mix = k * conv, 0, k * shape.out_channels * positions
    h, w = shape.input_hw
    pool = shape.in_channels * (h * w + 1)  # global average pool: C*H*W adds and C divides
    activations = 2 * shape.hidden + 5 * k  # fc biases (h + K), ReLU (h), 1/T (K), softmax (3K)
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


def _kind_cost(
    name: str, shape: DynamicShape, *, conv: int, calls: int, params: int, rows: bool
) -> tuple[int, int, LayerCost | None]:
    """(MACs, extra ops, row) of a dynamic layer of a kind with its own formula."""
    numel = shape.weight_numel
    positions = conv // (calls * numel) if calls and numel else 0
    common = {
        "in_channels": shape.in_channels,
        "out_channels": shape.out_channels,
        "kernel_size": shape.kernel_size,
        "bias": shape.bias,
        "input_hw": shape.input_hw,
        "output_hw": (positions, 1),  # only the number of output positions counts
        "batch": calls,
    }
    if shape.kind == "odconv":
        macs, extra, parts = odconv_layer_macs(
            **common, groups=shape.groups, experts=shape.experts, hidden=shape.hidden
        )
    elif shape.kind == "dcd":
        kernel = common.pop("kernel_size")
        macs, extra, parts = dcd_layer_macs(
            **common, kernel=kernel, squeeze=shape.hidden, rank=shape.rank
        )
    else:
        raise DynifyError(f"the cost model has no formula for kind {shape.kind!r}")
    row = LayerCost(name, "dynamic", macs, params, extra, parts, {}) if rows else None
    return macs, extra, row


def dcd_layer_macs(
    *,
    in_channels: int,
    out_channels: int,
    kernel: tuple[int, int],
    bias: bool,
    squeeze: int,
    rank: int,
    input_hw: tuple[int, int],
    output_hw: tuple[int, int],
    batch: int,
) -> tuple[int, int, dict[str, int]]:
    """(MACs, extra elementwise ops, MACs by part) of one :class:`~dynify.layers.DCDConv2d`
    forward on ``batch`` images: exactly what ``FlopCounterMode`` counts (FLOPs = 2 x MACs).

    Per image, with N = H' x W' output pixels, S = ``squeeze``, L = ``rank``: the static
    conv ``C_out C_in kh kw N``, ``z = Q^T x`` ``C_in L N``, the latent mix
    ``L^2 min(N, C_out)`` (``A = P (I + Phi)`` when N > C_out, else ``(I + Phi) z``: see
    ``dynify.layers.dcd.folds_mix``), ``P`` ``L C_out N``, and the attention's four
    bias-free linear layers ``C_in S + S^2 + S C_out + S L^2``. Extra ops (not counted by
    torch): the pool (``C_in (H W + 1)``), the gate and the heads' hsig (``4 S + 3 C_out``),
    the mix's identity (``L min(N, C_out)``), the output's scale-and-add (``2 C_out N``) and
    the bias (``C_out N``).
    """
    c_in, c_out, s, big_l = in_channels, out_channels, squeeze, rank
    kh, kw = kernel
    n = output_hw[0] * output_hw[1]
    parts = {
        "conv": c_out * c_in * kh * kw * n * batch,
        "q": c_in * big_l * n * batch,
        "latent_mix": big_l * big_l * min(n, c_out) * batch,
        "p": big_l * c_out * n * batch,
        "attention_fc": c_in * s * batch,
        "attention_se": s * s * batch,
        "attention_scale": s * c_out * batch,
        "attention_phi": s * big_l * big_l * batch,
    }
    h, w = input_hw
    pool = c_in * (h * w + 1)
    gates = 4 * s + 3 * c_out + big_l * min(n, c_out)
    output = 2 * c_out * n + (c_out * n if bias else 0)
    return sum(parts.values()), (pool + gates + output) * batch, parts


# -- plans --------------------------------------------------------------------------------


def check_batch(batch_size: int) -> int:
    """``batch_size`` when it is a positive integer, else a :class:`DynifyError`."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DynifyError(
            f"batch_size must be a positive integer, got {batch_size!r}",
            arguments=("batch_size",),
        )
    return batch_size


def _plan_layer(
    lp: LayerPlan, idx: Index | None, batch: int, static: bool, rows: bool
) -> tuple[int, int, int, LayerCost | None]:
    """(MACs, params, extra ops, row) of one planned conv for ``batch`` images."""
    s = lp.site
    convert = lp.convert and not static
    if idx is not None:
        b, f = (idx.layer_conv if convert else idx.layer_all).get(s.name, (0, 0))
        conv = b * batch + f
    else:  # a plan without op counts: the conv from its shapes
        out = s.output_shape
        conv = s.weight_numel * out[1] * out[2] * s.calls * batch if out else 0
    if not convert:
        row = LayerCost(s.name, "conv", conv, s.params) if rows else None
        return conv, s.params, 0, row
    params = lp.params_after
    macs, extra, row = dynamic_layer_cost(
        s.name, DynamicShape.of_plan(lp), conv=conv, calls=s.calls * batch, params=params,
        batch=batch, rows=rows,
    )  # fmt: skip
    return macs, params, extra, row


@dataclass(frozen=True)
class Priced:
    """What :func:`price_plan` finds: totals, rows (empty unless asked for), and whether
    the plan carried op counts (else only its convs are priced)."""

    macs: int
    params: int
    extra_ops: int
    rows: list[LayerCost]
    complete: bool


def price_plan(plan: Plan, *, batch: int, static: bool = False, rows: bool = True) -> Priced:
    """Price ``plan`` for ``batch`` images (``static``: the unconverted model it was made
    from); with ``rows``, one :class:`LayerCost` per conv and per other module."""
    counts = plan.op_counts
    idx = index(counts) if counts is not None else None
    macs = params = extra = site_params = 0
    out_rows = []
    for lp in plan.layers:
        m, p, e, row = _plan_layer(lp, idx, batch, static, rows)
        macs += m
        params += p
        extra += e
        site_params += lp.site.params
        if row is not None:
            out_rows.append(row)
    if counts is not None and idx is not None:
        macs += idx.other_macs(batch)
        other = counts.params - site_params - idx.rows_params
        params += idx.rows_params + other
        if rows:
            out_rows += idx.other_rows(batch)
            if other:
                out_rows.append(LayerCost("(other parameters)", "other", 0, other))
    return Priced(macs, params, extra, out_rows, idx is not None)


def price(plan: Plan, *, batch_size: int = 1, static: bool = False) -> Totals:
    """Totals of ``plan`` without building rows: the search's fast path.

    ``static=True`` prices the unconverted model the plan was made from.
    """
    batch = check_batch(batch_size)
    priced = price_plan(plan, batch=batch, static=static, rows=False)
    return Totals(priced.macs, priced.params, priced.extra_ops, batch)


# -- ODConv -------------------------------------------------------------------------------


def odconv_layer_macs(
    *,
    in_channels: int,
    out_channels: int,
    kernel_size: tuple[int, int],
    groups: int,
    bias: bool,
    experts: int,
    hidden: int,
    input_hw: tuple[int, int],
    output_hw: tuple[int, int],
    batch: int,
) -> tuple[int, int, dict[str, int]]:
    """(MACs, extra elementwise ops, MACs by part) of one eager call of an
    :class:`~dynify.layers.ODConv2d` on ``batch`` images: exactly the multiply-accumulates
    torch's ``FlopCounterMode`` counts (its FLOPs = 2 x MACs).

    Per image, with ``N = C_out * C_in / groups * kh * kw`` (one expert), ``P = H' * W'``,
    ``D`` the routing's width (:func:`~dynify.layers.odconv.odconv_sections`): the
    attention ``C_in * hidden`` (``fc``) + ``hidden * D`` (``heads``), the kernel mixing
    ``K * N`` (K > 1) and the convolution ``N * P``. A 1x1 layer with K > 1 runs DY-CNN's
    ``dynamic_conv2d``, which at ``batch`` > 1 on a tiny output map takes the ``stacked``
    formulation (``runs_stacked``): K convolutions (``K * N * P``) and an output mix
    (``K * C_out * P``) instead of kernel mixing. The attentions' scalings, the spatial
    attention's kernel scaling, the pool, the activations and the bias are elementwise:
    counted in the extra ops, not in MACs.
    """
    kh, kw = kernel_size
    k = experts
    numel = out_channels * (in_channels // groups) * kh * kw
    c, f, s, w = odconv_sections(in_channels, out_channels, (kh, kw), groups, k)
    d = c + f + s + w
    positions = output_hw[0] * output_hw[1]
    fc, heads = in_channels * hidden, hidden * d
    conv, mix, output_mix = numel * positions, (k * numel if k > 1 else 0), 0
    if not s and k > 1 and runs_stacked(batch, k, numel, positions, groups):
        conv, mix, output_mix = k * conv, 0, k * out_channels * positions
    elif s and od_runs_unfolded(batch, k, numel, positions, groups):  # every expert at once
        conv, mix, output_mix = k * conv, 0, (k * out_channels * positions if k > 1 else 0)
    h, wd = input_hw
    pool = in_channels * (h * wd + 1)  # C*H*W adds and C divides
    # heads' bias and 1/T (2D), ReLU (hidden), sigmoid (c + f + s), softmax (3K)
    activations = 2 * d + hidden + (c + f + s) + 3 * w
    scaling = in_channels * h * wd + (out_channels * positions if f else 0)
    kernel_scale = numel if s else 0  # a_s times each sample's kernel
    bias_add = out_channels * positions if bias else 0
    parts = {
        "conv": conv * batch,
        "attention_fc": fc * batch,
        "attention_heads": heads * batch,
        "kernel_mix": mix * batch,
    }
    if output_mix:
        parts["output_mix"] = output_mix * batch
    macs = sum(parts.values())
    extra = (pool + activations + scaling + kernel_scale + bias_add) * batch
    return macs, extra, parts

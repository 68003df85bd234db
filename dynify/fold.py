"""Fold what does not route: ``dynify fold``.

A plan a search chose is rarely the cheapest that keeps the accuracy: some dynamic layers
learn almost no routing, and some experts almost never get weight. On a set of images,
:func:`fold`

1. measures every dynamic layer's routing effect on the model's output (the routing
   diagnostics' ``logit_effect``, :func:`dynify.routing_report`: the relative change of the
   logits when that layer's routing is frozen at its mean);
2. replaces each layer whose effect is below ``max_effect`` by a static conv with the layer's
   *average kernel* over the images (``DynamicLayer.average_kernel``: the mean of each
   image's kernel and bias; for DY-CNN, CondConv and DCD, whose kernels are linear in the
   routing, exactly the layer with its routing frozen at the mean, so the effect measured
   is the folding's own; for ODConv, whose kernel is a product of its attentions, the
   mean kernel, which differs from the frozen one's: the report's measured whole-model
   effect is the folding's);
3. drops from the other layers the experts whose mean weight (``usage``) is below
   ``min_usage`` (``DynamicLayer.drop_experts_``): under softmax (DY-CNN, ODConv's kernel
   attention) what remains is renormalised exactly, the softmax over the experts kept;
   under sigmoid (CondConv) each weight is its own and the dropped share is simply gone,
   which the measured output change then includes; a DY-CNN layer left with one expert is
   a static conv exactly and is folded;
4. fuses every eval-mode BatchNorm that follows a conv into it (``dynify.fuse``), so that
   an exported model has no separate BatchNorm;

and reports per layer what was folded or dropped, the MACs and parameters saved, and for
the whole model the output change the folding causes on the same images (measured, not
estimated: folding several layers at once is not the sum of their effects).

The plan the model carries says which layers are now static (``convert: false`` with the
reason) and how many experts each kept; the static convs and fused norms are recorded as
``dynify.fuse.ModelEdits``, so ``dynify.save`` writes an artifact ``dynify.load`` rebuilds.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from timm.utils import unwrap_model
from torch import nn

from dynify import artifact
from dynify._device import resolve_device
from dynify._io import ensure_writable
from dynify._limits import COUNT, NON_NEGATIVE, Limit
from dynify._modes import evaluating
from dynify._table import format_table
from dynify.convert import module_names, set_module
from dynify.cost import compare_latency, count, format_count
from dynify.errors import DynifyError
from dynify.fuse import StaticConv, fuse_batchnorm, record_edits, static_conv_like
from dynify.logging import get_logger
from dynify.plan import LayerPlan, Plan, attach_plan, plan_of
from dynify.routing import dynamic_layers, image_batches, output_logits, routing_report
from dynify.train import data as train_data
from dynify.train.data import Data
from dynify.train.evaluation import evaluate

__all__ = [
    "DEFAULT_IMAGES",
    "DEFAULT_MAX_EFFECT",
    "DEFAULT_MIN_USAGE",
    "FoldOutcome",
    "FoldReport",
    "LayerFold",
    "fold",
    "fold_artifact",
]

_logger = get_logger(__name__)

# A layer whose frozen routing changes the logits by less than 0.5% is folded, and an
# expert with less than 1% of the mean weight is dropped (K = 4 at uniform: 25% each).
DEFAULT_MAX_EFFECT = 0.005
DEFAULT_MIN_USAGE = 0.01
# One pass over the images per dynamic layer measures the effects (see fold).
DEFAULT_IMAGES = 256
MAX_EFFECT = NON_NEGATIVE.but(note="a fraction of the logits: 0.005 is 0.5%")
MIN_USAGE = Limit(low=0, high=1, high_open=True, note="a share of the mean weight: 0.01 is 1%")

Action = str  # "folded", "dropped", "kept"


@dataclass(frozen=True)
class LayerFold:
    """What :func:`fold` did to one dynamic layer, and why."""

    name: str
    kind: str
    action: Action  # "folded" (now a static conv), "dropped" (experts removed), "kept"
    effect: float  # its routing's effect on the logits (the decision's measure)
    experts_before: int
    experts_after: int  # 0 once folded
    dropped: tuple[int, ...]  # expert indices removed
    usage: tuple[float, ...]  # mean weight of each expert before
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["dropped"], out["usage"] = list(self.dropped), list(self.usage)
        return out


@dataclass(frozen=True)
class FoldReport:
    """Every dynamic layer's fate, the cost before and after, and what the folding changed
    on the images it was measured on (``effect``: ``||f - f_folded|| / ||f||`` of the
    logits; ``flips``: the share of top-1 predictions that changed). ``fused``: the
    BatchNorms fused into their convs. ``accuracy`` and ``latency`` are filled in by whoever
    measured them (:func:`dynify.fold.fold_artifact` and the CLI)."""

    layers: tuple[LayerFold, ...]
    images: int
    max_effect: float
    min_usage: float
    effect: float
    flips: float
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    fused: int
    accuracy: dict[str, float] | None = None  # {"top1_before", "top1_after", "images"}
    latency: dict[str, float] | None = None  # {"ms_before", "ms_after", "ratio", "batch"}

    @property
    def folded(self) -> list[LayerFold]:
        return [lf for lf in self.layers if lf.action == "folded"]

    @property
    def dropped(self) -> list[LayerFold]:
        return [lf for lf in self.layers if lf.action == "dropped"]

    def summary(self) -> str:
        n = len(self.layers)
        dropped = sum(len(lf.dropped) for lf in self.layers if lf.action == "dropped")
        text = (
            f"folded {len(self.folded)}/{n} dynamic layers to static convs and dropped "
            f"{dropped} experts from {len(self.dropped)} more; fused {self.fused} BatchNorms. "
            f"MACs {format_count(self.macs_before)} -> {format_count(self.macs_after)} "
            f"({_change(self.macs_before, self.macs_after)}), params "
            f"{format_count(self.params_before)} -> {format_count(self.params_after)} "
            f"({_change(self.params_before, self.params_after)}). Output change "
            f"{100 * self.effect:.2f}% of the logits, {100 * self.flips:.1f}% of "
            f"predictions flip ({self.images} images)"
        )
        if self.accuracy:
            a = self.accuracy
            text += (
                f"; top-1 {a['top1_before']:.2f}% -> {a['top1_after']:.2f}% "
                f"({a['top1_after'] - a['top1_before']:+.2f}, {int(a['images'])} validation images)"
            )
        if self.latency:
            t = self.latency
            text += (
                f"; latency {t['ms_before']:.2f} -> {t['ms_after']:.2f} ms (x{t['ratio']:.2f}, "
                f"batch {int(t['batch'])}, side by side)"
            )
        return text

    def table(self) -> str:
        header = ["layer", "kind", "action", "routing effect", "experts", "MACs", "params",
                  "why"]  # fmt: skip
        rows = []
        for lf in self.layers:
            experts = (
                f"{lf.experts_before}->{lf.experts_after}"
                if lf.experts_after != lf.experts_before
                else str(lf.experts_before)
            )
            rows.append(
                [
                    lf.name,
                    lf.kind,
                    lf.action,
                    f"{100 * lf.effect:.3f}%",
                    experts,
                    f"{format_count(lf.macs_before)} -> {format_count(lf.macs_after)}",
                    f"{format_count(lf.params_before)} -> {format_count(lf.params_after)}",
                    lf.reason,
                ]
            )
        return format_table(header, rows)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = [lf.to_dict() for lf in self.layers]
        return out


def fold(
    model: nn.Module,
    images: torch.Tensor | Iterable[Any],
    *,
    max_effect: float = DEFAULT_MAX_EFFECT,
    min_usage: float = DEFAULT_MIN_USAGE,
    max_images: int = DEFAULT_IMAGES,
    fuse: bool = True,
    inplace: bool = False,
) -> tuple[nn.Module, FoldReport]:
    """Fold the dynamic layers of ``model`` that do not route, drop the experts it does
    not use and fuse its BatchNorms (see the module documentation).

    Args:
        model: a converted model (``dynify.apply`` / ``dynify.load``), measured in eval mode.
        images: a ``(N, C, H, W)`` tensor or batches of them (or ``(images, labels)``
            pairs), as for :func:`dynify.routing_report`; the images the decisions are
            measured on (training images: the accuracy is for held-out ones).
        max_effect: fold a layer whose routing effect on the logits is below this
            (a fraction: 0.005 is 0.5%); 0 folds nothing.
        min_usage: drop an expert whose mean weight is below this share (0 drops none).
        max_images: use at most this many images. Measuring costs one pass over them
            per dynamic layer and about six more (the routing report's, the routings, the
            reference and the folded model's logits, the BatchNorm pairs' trace).
        fuse: also fuse every BatchNorm that follows a conv (``dynify.fuse_batchnorm``).
        inplace: change ``model`` itself instead of a copy.

    Returns:
        The folded model (carrying its new plan and edits) and a :class:`FoldReport`.
    """
    MAX_EFFECT.check("max_effect", max_effect)
    MIN_USAGE.check("min_usage", min_usage)
    COUNT.check("max_images", max_images)
    plan = plan_of(model)
    net = unwrap_model(model) if inplace else copy.deepcopy(unwrap_model(model))
    layers = dynamic_layers(net)
    if not layers:
        raise DynifyError("the model has no dynamic layers: nothing to fold")
    param = next(net.parameters())
    batches = image_batches(images, max_images, param.device, param.dtype)
    before_cost = count(plan)
    params_before = _parameters(net)
    with evaluating(net), torch.no_grad():
        report = routing_report(net, batches, max_images=max_images, logit_effects=True)
        routing = _routings(net, layers, batches)
        reference = [output_logits(net(x)).double() for x in batches]
        measured = {lr.name: lr for lr in report.layers}
        decisions: dict[str, tuple[Action, tuple[int, ...], str]] = {}
        for name, layer in layers:
            lr = measured.get(name)
            if lr is None:  # never ran on these images: nothing to say about it
                decisions[name] = ("kept", (), "did not run on these images")
                continue
            if lr.logit_effect is None:  # never folded without its effect measured
                decisions[name] = ("kept", (), "routing effect not measured")
                continue
            decisions[name] = _decide(layer, lr.logit_effect, lr.usage, max_effect, min_usage)
        new_layers = _apply_decisions(net, plan, layers, routing, decisions)
        fused = fuse_batchnorm(net) if fuse else []
        after = [output_logits(net(x)).double() for x in batches]
    new_plan = replace(plan, layers=tuple(new_layers))
    attach_plan(net, new_plan)
    effect, flips = _change_of(after, reference)
    after_cost = count(new_plan)
    macs_b = {r.name: r.macs for r in before_cost.rows}
    macs_a = {r.name: r.macs for r in after_cost.rows}
    by_name = {lp.name: lp for lp in plan.layers}
    new_by_name = {lp.name: lp for lp in new_layers}
    folds = []
    for name, layer in layers:
        action, dropped, why = decisions[name]
        lr = measured.get(name)
        experts = layer.num_experts if action != "folded" else 0
        folds.append(
            LayerFold(
                name=name,
                kind=by_name[name].settings.kind if name in by_name else layer.kind,
                action=action,
                effect=0.0 if lr is None else float(lr.logit_effect or 0.0),
                experts_before=len(lr.usage) if lr is not None else layer.num_experts,
                experts_after=experts,
                dropped=dropped,
                usage=() if lr is None else lr.usage,
                macs_before=macs_b.get(name, 0),
                macs_after=macs_a.get(name, 0),
                params_before=by_name[name].params_after if name in by_name else 0,
                params_after=new_by_name[name].params_after if name in new_by_name else 0,
                reason=why,
            )
        )
    result = FoldReport(
        layers=tuple(folds),
        images=sum(x.shape[0] for x in batches),
        max_effect=float(max_effect),
        min_usage=float(min_usage),
        effect=effect,
        flips=flips,
        macs_before=before_cost.macs,
        macs_after=after_cost.macs,
        params_before=params_before,
        params_after=_parameters(net),
        fused=len(fused),
    )
    _logger.debug(result.summary())
    return net, result


@dataclass
class FoldOutcome:
    """What :func:`fold_artifact` did: the report and the artifact written."""

    report: FoldReport
    output: Path


def fold_artifact(
    artifact_path: str | os.PathLike[str],
    *,
    data: str | os.PathLike[str] | Data,
    output: str | os.PathLike[str],
    max_effect: float = DEFAULT_MAX_EFFECT,
    min_usage: float = DEFAULT_MIN_USAGE,
    images: int = DEFAULT_IMAGES,
    val_images: int | None = None,
    holdout: float = 0.1,
    img_size: int | None = None,
    batch_size: int = 128,
    fuse: bool = True,
    latency: bool = True,
    latency_batch: int = 1,
    device: str | torch.device | None = None,
    workers: int = 2,
) -> FoldOutcome:
    """The whole ``dynify fold``: load the artifact, fold it on ``images`` training images
    of ``data`` (:func:`fold`), measure top-1 on the validation split before and after and
    the latency of both side by side, and write the folded model to ``output`` (one
    artifact, written only once complete, the report in its ``extra`` metadata).

    ``img_size`` defaults to the size the plan was traced at, which is the size the model
    was converted (and usually trained) for.
    """
    MAX_EFFECT.check("max_effect", max_effect)
    MIN_USAGE.check("min_usage", min_usage)
    COUNT.but(optional=True).check("val_images", val_images)
    NON_NEGATIVE.but(integer=True).check("workers", workers)
    Limit(low=0, high=1, low_open=True, high_open=True).check("holdout", holdout)
    for name, value in (
        ("images", images),
        ("batch_size", batch_size),
        ("latency_batch", latency_batch),
    ):
        COUNT.check(name, value)
    COUNT.but(optional=True).check("img_size", img_size)
    target = ensure_writable(output, what="output")
    dev = resolve_device(device)
    info = artifact.read_info(artifact_path)
    model = artifact.load(artifact_path, device=dev).eval()
    plan = plan_of(model)
    if img_size is None:
        _, h, w = plan.input_size
        img_size = h if h == w else None
    loaded = train_data.load_data(data, holdout=holdout, val_images=val_images)
    cfg = train_data.data_config(model, img_size=img_size)
    calibration = train_data.eval_loader(
        train_data.sample_images(loaded.train, images),
        cfg=cfg,
        batch_size=min(batch_size, images),
        workers=workers,
    )
    folded, report = fold(
        model, calibration, max_effect=max_effect, min_usage=min_usage, max_images=images,
        fuse=fuse,
    )  # fmt: skip
    scores = {}
    for which, net in (("before", model), ("after", folded)):
        result = evaluate(
            model=net, data=loaded, batch_size=batch_size, img_size=img_size, device=dev,
            workers=workers,
        )  # fmt: skip
        scores[f"top1_{which}"] = result["val_top1"]
        scores["images"] = result["images"]
    report = replace(report, accuracy=scores)
    if latency:
        timed = compare_latency(
            model, folded, tuple(cfg["input_size"]), device=dev, batch_size=latency_batch
        )
        report = replace(
            report,
            latency={
                "ms_before": timed.static.median_ms,
                "ms_after": timed.converted.median_ms,
                "ratio": timed.ratio,
                "batch": latency_batch,
            },
        )
    extra = dict(info.get("extra") or {})
    extra["fold"] = report.to_dict()
    artifact.save(
        folded,
        target,
        model_name=info["model_name"],
        model_kwargs=info["model_kwargs"],
        extra=extra,
    )
    return FoldOutcome(report, target)


# -- the decisions --------------------------------------------------------------------------


def _decide(
    layer: nn.Module,
    effect: float,
    usage: tuple[float, ...],
    max_effect: float,
    min_usage: float,
) -> tuple[Action, tuple[int, ...], str]:
    """What to do with one layer: fold it, drop some experts, or keep it; and why."""
    if effect < max_effect:
        return "folded", (), f"routing effect {100 * effect:.3f}% < {100 * max_effect:g}%"
    experts = layer.num_experts
    if experts < 2 or len(usage) != experts:
        return "kept", (), f"routing effect {100 * effect:.3f}% >= {100 * max_effect:g}%"
    dropped = [k for k, u in enumerate(usage) if u < min_usage]
    if len(dropped) == experts:  # keep the most used one
        dropped.remove(max(range(experts), key=lambda k: usage[k]))
    if not dropped:
        return "kept", (), f"routing effect {100 * effect:.3f}%, every expert used"
    why = f"experts {dropped} used < {100 * min_usage:g}% (" + ", ".join(
        f"{100 * usage[k]:.2f}%" for k in dropped
    )
    why += ")"
    if experts - len(dropped) == 1 and layer.kind == "dycnn":
        # A softmax over one expert is 1 for every input: the layer is that expert.
        return "folded", tuple(dropped), why + "; one expert left, a static conv exactly"
    return "dropped", tuple(dropped), why


def _apply_decisions(
    net: nn.Module,
    plan: Plan,
    layers: list[tuple[str, nn.Module]],
    routing: dict[str, torch.Tensor],
    decisions: dict[str, tuple[Action, tuple[int, ...], str]],
) -> list[LayerPlan]:
    """Carry out the decisions on ``net`` and return the plan's layers, changed to match."""
    aliases = module_names(net)
    changed: dict[str, LayerPlan] = {}
    statics = []
    for name, layer in layers:
        action, dropped, why = decisions[name]
        if dropped:
            keep = [k for k in range(layer.num_experts) if k not in dropped]
            layer.drop_experts_(keep)
        try:
            lp = plan.layer(name)
        except KeyError:
            lp = None
        if action == "folded":
            if dropped:  # one expert: its kernel for every input
                one = layer.weight.new_ones(1, 1)
                kernel, bias = layer.sample_kernels(one)
                kernel = kernel[0]
                bias = None if bias is None else bias[0]
            else:
                kernel, bias = layer.average_kernel(routing[name])
            conv = static_conv_like(layer, bias=bias is not None)
            conv.weight.copy_(kernel)
            if bias is not None:
                conv.bias.copy_(bias)
            for alias in aliases.get(id(layer), [name]):
                set_module(net, alias, conv)
            statics.append(StaticConv(name, bias is not None))
            if lp is not None:
                settings = replace(lp.settings, convert=False)
                changed[name] = replace(lp, settings=settings, reason=f"folded: {why}")
        elif action == "dropped" and lp is not None:
            settings = replace(lp.settings, experts=layer.num_experts)
            changed[name] = replace(lp, settings=settings, reason=f"{lp.reason}; fold: {why}")
    if statics:
        record_edits(net, static=statics)
    return [changed.get(lp.name, lp) for lp in plan.layers]


# -- measurements ---------------------------------------------------------------------------


def _routings(
    net: nn.Module, layers: list[tuple[str, nn.Module]], batches: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Every layer's routing ``(N, D)`` on the images (one pass)."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name, _ in layers}

    def recorder(store: list[torch.Tensor]):
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            store.append(output.detach())

        return hook

    hooks = [layer.attention.register_forward_hook(recorder(seen[n])) for n, layer in layers]
    try:
        for x in batches:
            net(x)
    finally:
        for h in hooks:
            h.remove()
    return {name: torch.cat(parts) for name, parts in seen.items() if parts}


def _change_of(after: list[torch.Tensor], reference: list[torch.Tensor]) -> tuple[float, float]:
    total = sum(float(r.square().sum()) for r in reference)
    diff = sum(float((a - r).square().sum()) for a, r in zip(after, reference, strict=True))
    flipped = sum(
        int((a.argmax(dim=1) != r.argmax(dim=1)).sum())
        for a, r in zip(after, reference, strict=True)
        if r.dim() == 2
    )
    images = sum(r.shape[0] for r in reference)
    return (math.sqrt(diff / total) if total > 0 else 0.0), flipped / max(images, 1)


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _change(before: float, after: float) -> str:
    return f"{100 * (after - before) / before:+.1f}%" if before else "n/a"

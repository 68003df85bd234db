"""Find every convolution of a model, with its shapes and its place in the network.

The first step of the data flow (trace -> plan -> swap): ``trace_model`` runs torch.fx over
the model with timm's own leaf modules and autowrapped functions, then runs one example input
through the traced graph (or through the model itself when fx cannot trace it) with forward
hooks on every conv, so that convs hidden inside fx leaf modules are found as well. For each
conv it records the input and output shapes, how many times it is called, how it was found,
and its position: stem, stage (timm's ``feature_info`` level), enclosing block, first/last
conv of that block, classifier.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.fx
from torch import nn

from dynify._opcount import OpCounts, record_ops
from dynify.errors import DynifyError, quoted, shorten
from dynify.layers.base import DynamicLayer
from dynify.layers.conv_variants import conversion_kind, is_conv, is_conv_layer

__all__ = [
    "MAX_CHANNELS",
    "MAX_SIDE",
    "ConvSite",
    "ModelTrace",
    "check_input_size",
    "default_input_size",
    "trace_model",
]

# The largest example image anything may ask for (a flag, a plan read from an artifact):
# far above any timm model's input, far below what would exhaust memory (one image of
# 3x100000x100000 is 120 GB before the model runs).
MAX_SIDE = 8192
MAX_CHANNELS = 4096
INPUT_SIZE_ACCEPTED = (
    f"three integers C,H,W with C from 1 to {MAX_CHANNELS} and H, W from 1 to {MAX_SIDE}"
)

FoundBy = Literal["fx", "hook"]


@dataclass(frozen=True)
class ConvSite:
    """One convolution module of a traced model (shapes are per sample, without batch)."""

    name: str
    type_name: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]
    groups: int
    bias: bool
    params: int = 0
    input_shape: tuple[int, int, int] | None = None
    output_shape: tuple[int, int, int] | None = None
    calls: int = 0
    found_by: FoundBy = "hook"
    stem: bool = False
    stage: int | None = None
    block: str | None = None
    first_in_block: bool = False
    last_in_block: bool = False
    classifier: bool = False
    # Why this conv cannot be converted (None when it can).
    unsupported: str | None = None

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels

    @property
    def weight_numel(self) -> int:
        kh, kw = self.kernel_size
        return self.out_channels * (self.in_channels // self.groups) * kh * kw

    @property
    def label(self) -> str:
        """The conv in a table cell: ``64->128 3x3/2``, with ``dw`` or ``g4`` when grouped."""
        kh, kw = self.kernel_size
        text = f"{self.in_channels}->{self.out_channels} {kh}x{kw}/{self.stride[0]}"
        if self.groups > 1:
            text += " dw" if self.depthwise else f" g{self.groups}"
        return text

    @property
    def output_hw(self) -> tuple[int, int] | None:
        return None if self.output_shape is None else self.output_shape[1:]

    @property
    def position(self) -> str:
        """A short human description of where the conv sits."""
        if self.classifier:
            return "classifier"
        if self.stem:
            return "stem"
        parts = []
        if self.stage is not None:
            parts.append(f"stage {self.stage}")
        if self.first_in_block and self.last_in_block:
            parts.append("only conv of block")
        elif self.first_in_block:
            parts.append("first of block")
        elif self.last_in_block:
            parts.append("last of block")
        return ", ".join(parts) if parts else "head"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConvSite:
        data = dict(data)
        for key in ("kernel_size", "stride", "dilation", "input_shape", "output_shape"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        if not isinstance(data.get("padding"), str):
            data["padding"] = tuple(data["padding"])
        return cls(**data)


@dataclass
class ModelTrace:
    """What ``trace_model`` learnt: the conv sites in execution order and how tracing went."""

    input_size: tuple[int, int, int]
    sites: list[ConvSite]
    fx_error: str | None = None
    num_stages: int = 0
    # Output of the unconverted model on the example input (for the equivalence check).
    example_input: torch.Tensor | None = field(default=None, repr=False)
    example_output: Any = field(default=None, repr=False)
    # The matrix products, convolutions and attention of the example pass, per module, for
    # the cost model (``dynify.cost``).
    op_counts: OpCounts | None = field(default=None, repr=False)

    def __iter__(self) -> Iterator[ConvSite]:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def site(self, name: str) -> ConvSite:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)


def check_input_size(value: Any, *, name: str = "input_size") -> tuple[int, int, int]:
    """``value`` as ``(C, H, W)``: a sequence of three integers within :data:`MAX_CHANNELS`
    and :data:`MAX_SIDE`, or the text ``"3,224,224"`` / ``"3x224x224"``; anything else is
    one line naming ``name``. The one check every input size passes (flags, plans, calls)."""
    parts = value.replace("x", ",").split(",") if isinstance(value, str) else value
    try:
        values = tuple(int(v) for v in parts) if isinstance(parts, list | tuple) else ()
        exact = all(float(v) == int(v) for v in parts) if values else False
    except (TypeError, ValueError):
        values, exact = (), False
    limits = (MAX_CHANNELS, MAX_SIDE, MAX_SIDE)
    if (
        len(values) != 3
        or not exact
        or any(not 1 <= v <= limit for v, limit in zip(values, limits, strict=True))
    ):
        raise DynifyError(
            f"{name} must be {INPUT_SIZE_ACCEPTED}, got {quoted(value)}", arguments=(name,)
        )
    return values  # type: ignore[return-value]


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """The model's own input size (timm's ``pretrained_cfg``), else 3x224x224."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if size is None or len(size) != 3:
        return (3, 224, 224)
    return tuple(int(v) for v in size)  # type: ignore[return-value]


# -- conv kinds ---------------------------------------------------------------------------


# -- fx -----------------------------------------------------------------------------------


class _Tracer(torch.fx.Tracer):
    """torch.fx tracer that treats timm's registered leaf modules and dynify's layers as leaves."""

    def __init__(self) -> None:
        from timm.layers import _fx as timm_fx

        super().__init__(autowrap_functions=tuple(timm_fx.get_notrace_functions()))
        self._leaves = (*timm_fx.get_notrace_modules(), DynamicLayer)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _fx_trace(model: nn.Module) -> tuple[dict[str, int], str | None]:
    """Trace ``model``; return the number of graph nodes that call each conv module, and
    the reason when fx fails (convs inside fx leaf modules have no node of their own)."""
    try:
        tracer = _Tracer()
        graph = tracer.trace(model)
    except Exception as err:  # fx raises many kinds; the hook pass still finds every conv
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return {}, shorten(f"{type(err).__name__}: {first_line}", 200)
    counts: dict[str, int] = {}
    modules = dict(model.named_modules())
    for node in graph.nodes:
        if node.op == "call_module" and is_conv(modules.get(str(node.target), nn.Identity())):
            counts[str(node.target)] = counts.get(str(node.target), 0) + 1
    return counts, None


# -- structure ----------------------------------------------------------------------------

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
# Submodule names timm gives residual projections.
_SHORTCUT_NAMES = frozenset({"shortcut", "downsample", "skip", "conv_skip"})


def _blocks(model: nn.Module, conv_names: list[str], features: list[str]) -> dict[str, str]:
    """Map each conv to its block, timm's unit of repetition inside a stage.

    A candidate block is an ancestor of the conv that holds at least two convs, is not a
    bare container (Sequential / ModuleList / ModuleDict) and sits in a container or beside
    a sibling of its own class (ResNet's ``layer1.0``, EfficientNet's ``blocks.1.0``,
    DenseNet's ``denselayer1``, DLA's ``tree1``); a squeeze-excite module inside a block is
    neither. The block is the outermost candidate inside the conv's stage (timm's
    ``feature_info`` module), else the stage module itself when it qualifies (Inception's
    ``Mixed_5d``), else the outermost candidate anywhere.
    """
    modules = dict(model.named_modules())
    per_module: dict[str, int] = {}
    for conv in conv_names:
        parts = conv.split(".")
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i])
            per_module[prefix] = per_module.get(prefix, 0) + 1

    def holds_convs(name: str) -> bool:
        return per_module.get(name, 0) >= 2 and not isinstance(modules[name], _CONTAINERS)

    def candidate(name: str) -> bool:
        if not holds_convs(name):
            return False
        parent_name, _, _ = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        if isinstance(parent, _CONTAINERS):
            return True
        cls = type(modules[name])
        return sum(type(c) is cls for c in parent.children()) >= 2

    candidates = [n for n in per_module if candidate(n)]
    result = {}
    for conv in conv_names:
        parts = conv.split(".")
        ancestors = [".".join(parts[:i]) for i in range(1, len(parts))]
        stage = next((a for a in reversed(ancestors) if a in features), None)
        inside = ancestors[ancestors.index(stage) + 1 :] if stage else ancestors
        block = next((a for a in inside if candidate(a)), None)
        if (
            block is None
            and stage is not None
            and holds_convs(stage)
            and not any(c.startswith(stage + ".") for c in candidates)
        ):
            block = stage
        if block is not None:
            result[conv] = block
    return result


def _feature_modules(model: nn.Module) -> list[str]:
    info = getattr(model, "feature_info", None)
    names = []
    if isinstance(info, list | tuple):
        for entry in info:
            if isinstance(entry, dict) and isinstance(entry.get("module"), str):
                names.append(entry["module"])
    return names


def _classifier_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_classifier", None)
    if get is None:
        return set()
    try:
        head = get()
    except Exception:
        return set()
    if not isinstance(head, nn.Module):
        return set()
    ids = {id(m) for m in head.modules()}
    return {n for n, m in model.named_modules() if id(m) in ids and is_conv(m)}


# -- the pass -----------------------------------------------------------------------------


def _example(model: nn.Module, input_size: tuple[int, int, int]) -> torch.Tensor:
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, *input_size, generator=gen).to(device=device, dtype=dtype)


@dataclass
class _Observation:
    """What one hooked example run saw: per conv its shapes, calls and when it ran; per
    block the tensor it was given; per feature (stage) module when it finished."""

    order: list[str] = field(default_factory=list)  # convs in the order they first ran
    in_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    out_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    input_ptr: dict[str, int] = field(default_factory=dict)  # which tensor each conv read
    block_input_ptr: dict[str, int] = field(default_factory=dict)
    conv_time: dict[str, int] = field(default_factory=dict)  # a clock ticking per hook call
    feature_end: dict[str, int] = field(default_factory=dict)
    example_ptr: int = 0
    output: Any = None
    op_counts: OpCounts | None = None


def _observe(
    model: nn.Module,
    convs: list[tuple[str, nn.Module]],
    blocks: dict[str, str],
    features: list[str],
    example: torch.Tensor,
    size: tuple[int, ...],
) -> _Observation:
    """Run ``example`` through ``model`` once, in eval mode under ``no_grad``, with hooks on
    every conv, block and feature module (all removed, and the mode restored, after)."""
    seen = _Observation(calls=dict.fromkeys((n for n, _ in convs), 0))
    seen.example_ptr = example.data_ptr()
    clock = [0]
    modules = dict(model.named_modules())

    def conv_pre(name: str):
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            seen.calls[name] += 1
            clock[0] += 1
            if name not in seen.in_shapes and isinstance(x, torch.Tensor):
                seen.in_shapes[name] = tuple(x.shape[1:])
                seen.input_ptr[name] = x.data_ptr()
                seen.conv_time[name] = clock[0]
                seen.order.append(name)

        return hook

    def conv_post(name: str):
        def hook(_m: nn.Module, _args: Any, out: Any) -> None:
            if name not in seen.out_shapes and isinstance(out, torch.Tensor):
                seen.out_shapes[name] = tuple(out.shape[1:])

        return hook

    def block_pre(block: str):
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            if block not in seen.block_input_ptr and args and isinstance(args[0], torch.Tensor):
                seen.block_input_ptr[block] = args[0].data_ptr()

        return hook

    def feature_post(feature: str):
        def hook(_m: nn.Module, _a: Any, _o: Any) -> None:
            clock[0] += 1
            seen.feature_end.setdefault(feature, clock[0])

        return hook

    handles = []
    for name, module in convs:
        handles.append(module.register_forward_pre_hook(conv_pre(name)))
        handles.append(module.register_forward_hook(conv_post(name)))
    for block in sorted(set(blocks.values())):
        handles.append(modules[block].register_forward_pre_hook(block_pre(block)))
    for feature in features:
        handles.append(modules[feature].register_forward_hook(feature_post(feature)))

    try:
        seen.output, recorder = record_ops(model, example, is_conv_layer=is_conv_layer)
    finally:
        for h in handles:
            h.remove()
    seen.op_counts = recorder.counts()
    return seen


@dataclass(frozen=True)
class _Position:
    stem: bool
    stage: int | None
    first_in_block: bool
    last_in_block: bool


def _positions(
    seen: _Observation, names: list[str], blocks: dict[str, str], features: list[str]
) -> dict[str, _Position]:
    """Each conv's place in the network, from the order things ran in (the rules below)."""
    order = seen.order
    # Stage: the first feature (stage) module to finish after the conv ran.
    ends = sorted(
        (t, i)
        for i, (f, t) in enumerate(
            (f, seen.feature_end[f]) for f in features if f in seen.feature_end
        )
    )
    # Stem: the convs that run before the first conv of any block (ResNet-D's three, DLA's
    # base and level 0-1); the first conv alone when the network has no blocks.
    # Convs inside the stage that holds the first block (DLA's level-2 projection) are
    # not stem either.
    first_block_conv = next((c for c in order if c in blocks), None)
    first_block_time = seen.conv_time[first_block_conv] if first_block_conv else None
    first_stage = next(
        (f for f in features if first_block_conv and first_block_conv.startswith(f + ".")), None
    )
    # Block positions along the main path: the first and the last executed conv of the
    # block that is not on its shortcut (reads the block's own input, or lives in a
    # shortcut / downsample branch), so a residual's projection is neither.
    by_block: dict[str, list[str]] = {}
    for c in order:
        if c in blocks:
            by_block.setdefault(blocks[c], []).append(c)
    first_of, last_of = set(), set()
    for block, members in by_block.items():
        branch = [
            c for c in members if not _SHORTCUT_NAMES.intersection(c[len(block) + 1 :].split("."))
        ]
        main = [c for c in branch if seen.input_ptr.get(c) != seen.block_input_ptr.get(block)]
        first_of.add((branch or members)[0])
        last_of.add((main or branch or members)[-1])

    out = {}
    for name in names:
        t = seen.conv_time.get(name)
        stage = next((idx for end_time, idx in ends if t is not None and t <= end_time), None)
        if t is None:
            stem = False
        elif first_block_time is None or first_block_time == seen.conv_time[order[0]]:
            stem = name == order[0]
        else:
            stem = t < first_block_time and not (first_stage and name.startswith(first_stage + "."))
        # A conv that reads the network's input is stem wherever it sits (RepVGG's stem is a
        # block whose 3x3 and 1x1 convs both read the image).
        stem = stem or (t is not None and seen.input_ptr.get(name) == seen.example_ptr)
        out[name] = _Position(stem, stage, name in first_of, name in last_of)
    return out


def _site(
    name: str,
    module: nn.Module,
    seen: _Observation,
    position: _Position,
    *,
    block: str | None,
    classifier: bool,
    found_by: FoundBy,
) -> ConvSite:
    unsupported = conversion_kind(module)[1]
    if unsupported is None and name not in seen.in_shapes:
        unsupported = "not called in the example forward pass"
    return ConvSite(
        name=name,
        type_name=type(module).__name__,
        in_channels=int(module.in_channels),
        out_channels=int(module.out_channels),
        kernel_size=tuple(module.kernel_size),
        stride=tuple(module.stride),
        padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),
        dilation=tuple(module.dilation),
        groups=int(module.groups),
        bias=getattr(module, "bias", None) is not None,
        params=sum(p.numel() for p in module.parameters(recurse=False)),
        input_shape=seen.in_shapes.get(name),  # type: ignore[arg-type]
        output_shape=seen.out_shapes.get(name),  # type: ignore[arg-type]
        calls=seen.calls[name],
        found_by=found_by,
        stem=position.stem and not classifier,
        stage=position.stage,
        block=block,
        first_in_block=position.first_in_block,
        last_in_block=position.last_in_block,
        classifier=classifier,
        unsupported=unsupported,
    )


def trace_model(
    model: nn.Module,
    *,
    input_size: tuple[int, int, int] | None = None,
    use_fx: bool = True,
) -> ModelTrace:
    """Find the model's convs, their shapes and positions, from one example forward pass.

    Args:
        model: any ``nn.Module`` taking an image batch (timm models get the most detail).
        input_size: ``(C, H, W)`` of the example input; default: ``pretrained_cfg``.
        use_fx: try torch.fx first (``False`` goes straight to hooks).

    The model is run once in eval mode under ``no_grad`` and left in the mode it was in.
    """
    size = check_input_size(input_size if input_size is not None else default_input_size(model))
    convs = [(n, m) for n, m in model.named_modules() if is_conv(m)]
    names = [n for n, _ in convs]
    fx_counts, fx_error = _fx_trace(model) if use_fx else ({}, "fx not used")
    modules = dict(model.named_modules())
    features = [f for f in _feature_modules(model) if f in modules]
    blocks = _blocks(model, names, features)

    # The example runs through the model itself, not the traced graph: module hooks then
    # fire for every block and feature module too (fx inlines those), and a graph that fx
    # traced but froze a branch of cannot mislead the shapes.
    example = _example(model, size)
    seen = _observe(model, convs, blocks, features, example, size)
    positions = _positions(seen, names, blocks, features)
    classifier = _classifier_names(model)
    ordered = seen.order + [n for n in names if n not in seen.in_shapes]
    sites = [
        _site(
            name,
            modules[name],
            seen,
            positions[name],
            block=blocks.get(name),
            classifier=name in classifier,
            found_by="fx" if name in fx_counts else "hook",
        )
        for name in ordered
    ]
    return ModelTrace(
        input_size=size,  # type: ignore[arg-type]
        sites=sites,
        fx_error=fx_error,
        num_stages=len(features),
        example_input=example,
        example_output=seen.output,
        op_counts=seen.op_counts,
    )

"""Exact batch-norm fusion, and the record of the edits made to a model after its plan.

Shipping a converted model (ONNX, ``torch.export``) wants no BatchNorm after its convs: in
eval mode a BatchNorm is the per-channel affine map ``y' = (y - mean) / sqrt(var + eps) *
gamma + beta = scale * y + shift``, which the conv before it can compute itself.
:func:`fuse_batchnorm` folds it in, in place: a static conv's kernel is scaled per output
channel and its bias set (created when it has none); a dynamic layer takes it in through
its own ``fuse_affine_`` (exact for every input: each kind knows where its output's rows
come from). The norm is replaced by ``nn.Identity`` (``BatchNorm2d``) or by :class:`DropAct`
(timm's ``BatchNormAct2d``: its own ``drop`` and ``act`` modules, kept under their names).

:func:`conv_norm_pairs` finds what can be fused: a BatchNorm whose input is a conv's output
and nothing else reads that output. It traces the model with torch.fx (convs, norms,
dynamic layers and timm's leaf modules kept as leaves). A model fx cannot trace is run once
on an example image instead, with forward hooks that match a conv's output tensor to a
norm's input tensor (the same object, unmodified) and the autograd graph counting who reads
that output. That fallback is reported (a warning, and :attr:`PairSearch.method`).

Limits. Convs and norms inside one of timm's fx leaf modules (``MobileVitBlock``, ...) are
not seen by the fx pass and stay unfused. The hook fallback sees only the
*differentiable* reads of a conv's output: a model that also reads it without gradients
(``.detach()``, ``argmax``, an integer index computed from it) could have a pair fused that
it should not; for such a model pass the ``pairs=`` to fuse to :func:`fuse_batchnorm`.
Taking an output's shape is no read and is harmless.

Fusing and ``dynify fold`` (which replaces dynamic layers that do not route by static convs,
built by :func:`static_conv_like`) change the module tree after ``dynify.apply``, so a model
carries a :class:`ModelEdits` record beside its plan (the attribute ``dynify_edits``, read
through DDP / ``torch.compile`` wrappers), an artifact stores it, and :func:`apply_edits`
replays its structure on load, on the meta device or on real tensors (the values then come
from the file). A record read from a file is untrusted: validated as a plan is, and every
name must be a module of the right kind in the model it is replayed on.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx
from timm.layers import Conv2dSame, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
from timm.layers.norm_act import BatchNormAct2d
from timm.utils import unwrap_model
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from dynify._modes import evaluating
from dynify._yaml import Doc
from dynify.convert import module_names, set_module
from dynify.errors import DynifyError, DynifyTypeError, quoted, shorten
from dynify.layers.base import DynamicLayer
from dynify.layers.conv_variants import conversion_kind
from dynify.layers.dynamic_conv_same import DynamicConv2dSame
from dynify.logging import get_logger
from dynify.trace import check_input_size, default_input_size

__all__ = [
    "EDITS_ATTRIBUTE",
    "DropAct",
    "FusedPair",
    "ModelEdits",
    "PairSearch",
    "StaticConv",
    "apply_edits",
    "conv_norm_pairs",
    "conv_refusal",
    "edits_of",
    "find_conv_norm_pairs",
    "find_edits",
    "fuse_batchnorm",
    "norm_refusal",
    "record_edits",
    "static_conv_like",
    "static_refusal",
]

logger = get_logger(__name__)

# The attribute of a model that holds its ModelEdits (beside dynify.plan's "dynify_plan").
EDITS_ATTRIBUTE = "dynify_edits"

# The longest module name a record may hold (timm's deepest are under 100 characters).
MAX_NAME = 1024

# Weight-standardised convs: scaling their raw weight is undone by the standardisation.
_STANDARDISED = (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame)
# The static convs whose function is a convolution with ``weight`` and ``bias`` as they are.
_LINEAR_FORWARDS = frozenset({nn.Conv2d.forward, Conv2dSame.forward})

_CONVS_ACCEPTED = "an nn.Conv2d, a timm Conv2dSame or a dynamic layer"
_NORMS_ACCEPTED = "an nn.BatchNorm2d or timm BatchNormAct2d with running statistics"


# -- what can be fused ----------------------------------------------------------------------


def conv_refusal(module: nn.Module) -> str | None:
    """Why ``module`` cannot take in a following BatchNorm (``None``: it can)."""
    if isinstance(module, DynamicLayer):
        return None
    if isinstance(module, _STANDARDISED):
        return f"{type(module).__name__} standardises its weight, which undoes a scaled kernel"
    if not isinstance(module, nn.Conv2d):
        return f"not a conv ({type(module).__name__})"
    if type(module).forward not in _LINEAR_FORWARDS:
        return f"{type(module).__name__} overrides Conv2d.forward; its function is unknown"
    return None


def norm_refusal(module: nn.Module) -> str | None:
    """Why ``module`` is not a BatchNorm that fusion can take out (``None``: it is)."""
    if not isinstance(module, nn.BatchNorm2d):
        return f"not a BatchNorm2d ({type(module).__name__})"
    forward = type(module).forward
    if forward is not _BatchNorm.forward and forward is not BatchNormAct2d.forward:
        return f"{type(module).__name__} overrides BatchNorm2d.forward; its function is unknown"
    if not module.track_running_stats or module.running_mean is None or module.running_var is None:
        return "it has no running statistics (it normalises by each batch's own)"
    return None


def _fits(conv: nn.Module, norm: nn.Module) -> str | None:
    channels = int(conv.out_channels)  # type: ignore[arg-type]
    if channels != norm.num_features:
        return f"the conv has {channels} output channels, the norm {norm.num_features}"
    return None


@dataclass(frozen=True)
class PairSearch:
    """What :func:`find_conv_norm_pairs` found, how, and what it passed over.

    ``method`` is ``"fx"`` (a traced graph) or ``"hook"`` (the fallback: one example run
    with forward hooks, see the module documentation); ``fx_error`` why fx failed;
    ``skipped`` each (conv, norm) that follow one another but cannot be fused, and why.
    """

    pairs: tuple[tuple[str, str], ...]
    method: Literal["fx", "hook"]
    fx_error: str | None = None
    skipped: tuple[tuple[str, str, str], ...] = ()


class _PairTracer(torch.fx.Tracer):
    """fx tracer with convs, norms, dynamic layers and timm's leaf modules as leaves."""

    def __init__(self) -> None:
        from timm.layers import _fx as timm_fx

        super().__init__(autowrap_functions=tuple(timm_fx.get_notrace_functions()))
        self._leaves = (
            *timm_fx.get_notrace_modules(),
            DynamicLayer,
            nn.Conv2d,
            nn.BatchNorm2d,
            BatchNormAct2d,
        )

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _candidates(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """The convs and the norms of ``model`` that could be fused, by (first) name."""
    convs, norms = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, DynamicLayer | nn.Conv2d):
            convs[name] = module
        elif isinstance(module, nn.BatchNorm2d):
            norms[name] = module
    return convs, norms


def find_conv_norm_pairs(
    model: nn.Module, *, input_size: tuple[int, int, int] | None = None
) -> PairSearch:
    """Every (conv, norm) pair of ``model`` that :func:`fuse_batchnorm` can fuse: an
    eval-mode-fusable BatchNorm (:func:`norm_refusal`) reading a conv's output
    (:func:`conv_refusal`) that nothing else reads, each module called once.

    Args:
        model: any module (wrappers are seen through); names are its modules' names.
        input_size: ``(C, H, W)`` of the example image, only when fx cannot trace the
            model (default: the model's ``pretrained_cfg``).
    """
    model = unwrap_model(model)
    convs, norms = _candidates(model)
    if not convs or not norms:
        return PairSearch((), "fx")
    try:
        graph = _PairTracer().trace(model)
    except Exception as err:  # fx raises many kinds; the hook pass still finds the pairs
        lines = str(err).strip().splitlines()
        fx_error = shorten(f"{type(err).__name__}: {lines[0] if lines else ''}", 200)
        logger.warning(
            "fuse: fx cannot trace %s (%s); conv->norm pairs found by forward hooks on one "
            "example run, which see only the differentiable uses of a conv's output",
            type(model).__name__,
            fx_error,
        )
        size = check_input_size(input_size if input_size is not None else default_input_size(model))
        found, skipped = _hook_pairs(model, convs, norms, size)
        return PairSearch(tuple(found), "hook", fx_error, tuple(skipped))
    found, skipped = _fx_pairs(graph, convs, norms)
    return PairSearch(tuple(found), "fx", None, tuple(skipped))


def conv_norm_pairs(
    model: nn.Module, *, input_size: tuple[int, int, int] | None = None
) -> list[tuple[str, str]]:
    """The (conv name, norm name) pairs :func:`find_conv_norm_pairs` finds, in graph order
    (a warning says when fx could not trace the model and forward hooks were used)."""
    return list(find_conv_norm_pairs(model, input_size=input_size).pairs)


def _skip(skipped: list[tuple[str, str, str]], conv: str, norm: str, why: str) -> None:
    logger.debug("fuse: %s -> %s not fused: %s", conv, norm, why)
    skipped.append((conv, norm, why))


def _fx_pairs(
    graph: torch.fx.Graph, convs: dict[str, nn.Module], norms: dict[str, nn.Module]
) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    found: list[tuple[str, str]] = []
    skipped: list[tuple[str, str, str]] = []
    for node in graph.nodes:
        norm_name = str(node.target)
        if node.op != "call_module" or norm_name not in norms or not node.args:
            continue
        source = node.args[0]
        if not isinstance(source, torch.fx.Node) or source.op != "call_module":
            continue
        conv_name = str(source.target)
        if conv_name not in convs:
            continue
        conv, norm = convs[conv_name], norms[norm_name]
        why = conv_refusal(conv) or norm_refusal(norm) or _fits(conv, norm)
        if why is None and len(source.users) != 1:
            why = f"the conv's output is also read by {len(source.users) - 1} other node(s)"
        if why is None and (calls[conv_name] != 1 or calls[norm_name] != 1):
            why = "the conv or the norm is called more than once (a shared module)"
        if why is None and (len(node.args) != 1 or node.kwargs):
            why = "the norm is called with more than its input"
        if why is None:
            found.append((conv_name, norm_name))
        else:
            _skip(skipped, conv_name, norm_name, why)
    return found, skipped


@dataclass
class _Output:
    conv: str
    tensor: torch.Tensor
    version: int
    grad_fn: Any


def _hook_pairs(
    model: nn.Module,
    convs: dict[str, nn.Module],
    norms: dict[str, nn.Module],
    size: tuple[int, int, int],
) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """The pairs seen in one example run: the norm's input is the conv's output tensor
    itself, unmodified since (same version and autograd node), and the autograd graph of
    the model's output has exactly one edge into that output (the norm's)."""
    outputs: dict[int, _Output] = {}
    calls: dict[str, int] = dict.fromkeys([*convs, *norms], 0)
    seen: list[tuple[str, str, _Output]] = []

    def conv_hook(name: str):
        def hook(_m: nn.Module, _args: Any, out: Any) -> None:
            calls[name] += 1
            if isinstance(out, torch.Tensor):
                outputs[id(out)] = _Output(name, out, out._version, out.grad_fn)

        return hook

    def norm_hook(name: str):
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            calls[name] += 1
            x = args[0] if args else None
            rec = outputs.get(id(x)) if isinstance(x, torch.Tensor) else None
            if rec is not None and rec.tensor is x and rec.version == x._version:
                if rec.grad_fn is x.grad_fn:
                    seen.append((rec.conv, name, rec))

        return hook

    handles = [m.register_forward_hook(conv_hook(n)) for n, m in convs.items()]
    handles += [m.register_forward_pre_hook(norm_hook(n)) for n, m in norms.items()]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    example = torch.randn(1, *size, generator=torch.Generator().manual_seed(0))
    example = example.to(device=device, dtype=dtype).requires_grad_(True)
    try:
        with torch.enable_grad(), evaluating(model):
            result = model(example)
    finally:
        for handle in handles:
            handle.remove()
    readers = _autograd_readers(result)
    found: list[tuple[str, str]] = []
    skipped: list[tuple[str, str, str]] = []
    for conv_name, norm_name, rec in seen:
        conv, norm = convs[conv_name], norms[norm_name]
        why = conv_refusal(conv) or norm_refusal(norm) or _fits(conv, norm)
        if why is None and (calls[conv_name] != 1 or calls[norm_name] != 1):
            why = "the conv or the norm is called more than once (a shared module)"
        if why is None and rec.grad_fn is None:
            why = "no gradient reaches the conv's output, so its readers cannot be counted"
        if why is None and readers.get((id(rec.grad_fn), rec.tensor.output_nr), 0) != 1:
            why = "the conv's output is also read elsewhere"
        if why is None:
            found.append((conv_name, norm_name))
        else:
            _skip(skipped, conv_name, norm_name, why)
    return found, skipped


def _autograd_readers(result: Any) -> dict[tuple[int, int], int]:
    """For each (autograd node, output index), how many edges of the graph read it."""
    roots = [t.grad_fn for t in _tensors(result) if t.grad_fn is not None]
    counts: dict[tuple[int, int], int] = {}
    stack, visited = list(roots), set()
    while stack:
        fn = stack.pop()
        if id(fn) in visited:
            continue
        visited.add(id(fn))
        for nxt, index in fn.next_functions:
            if nxt is None:
                continue
            counts[(id(nxt), index)] = counts.get((id(nxt), index), 0) + 1
            stack.append(nxt)
    return counts


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _tensors(v)


# -- fusing ---------------------------------------------------------------------------------


class DropAct(nn.Module):
    """What is left of a timm ``BatchNormAct2d`` once its normalisation is fused into the
    conv before it: its own ``drop`` then ``act`` modules (state-dict keys unchanged)."""

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


@dataclass(frozen=True)
class FusedPair:
    """One BatchNorm fused into the conv before it."""

    conv: str
    norm: str
    conv_type: str  # the conv's class name
    norm_type: str
    bias_added: bool  # the conv had no bias of its own (a static conv's is created)


def _affine(norm: nn.BatchNorm2d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The norm's eval-mode map as ``scale * y + shift``, computed in float64 (where the
    device has it) and rounded once to ``dtype``."""
    assert norm.running_mean is not None and norm.running_var is not None
    mean = norm.running_mean.detach()
    wide = torch.float64 if mean.device.type != "mps" else torch.float32
    mean, var = mean.to(wide), norm.running_var.detach().to(wide)
    scale = torch.rsqrt(var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.detach().to(wide)
    shift = -mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias.detach().to(wide)
    return scale.to(dtype), shift.to(dtype)


def _first_tensor(module: nn.Module) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight
    return next(module.parameters())


@torch.no_grad()
def _fuse_into_conv(conv: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make ``conv`` compute ``scale[o] * y[o] + shift[o]`` (``scale``, ``shift``: its
    dtype and device)."""
    if isinstance(conv, DynamicLayer):
        conv.fuse_affine_(scale, shift)  # type: ignore[attr-defined]
        return
    assert isinstance(conv, nn.Conv2d)
    conv.weight.mul_(scale.view(-1, *([1] * (conv.weight.dim() - 1))))
    if conv.bias is None:
        conv.bias = nn.Parameter(shift.clone(), requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.mul_(scale).add_(shift)


def _remainder(norm: nn.Module) -> nn.Module:
    """What replaces a fused norm: nothing (``nn.Identity``), or a BatchNormAct2d's tail."""
    rest = DropAct(norm.drop, norm.act) if isinstance(norm, BatchNormAct2d) else nn.Identity()
    rest.training = norm.training  # its drop and act keep their own modes
    return rest


def _replace(
    model: nn.Module, old: nn.Module, new: nn.Module, aliases: dict[int, list[str]]
) -> None:
    """Put ``new`` wherever ``old`` is registered (a module tied under several names)."""
    for name in aliases.get(id(old), []):
        set_module(model, name, new)
    aliases[id(new)] = aliases.pop(id(old), [])


def _lookup(model: nn.Module, name: Any, path: str) -> nn.Module:
    if not isinstance(name, str) or not name:
        raise DynifyError(f"{path}: expected a module name, got {quoted(name)}")
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise DynifyError(
            f"{path}: {quoted(name)} is not a module of {type(model).__name__}; was this made "
            "for another model?"
        ) from None


def _checked_pair(model: nn.Module, pair: Any, path: str) -> tuple[nn.Module, nn.Module]:
    """The conv and the norm ``pair`` names, checked to be fusable ones of ``model``."""
    if not isinstance(pair, list | tuple) or len(pair) != 2:
        raise DynifyError(f"{path}: expected a (conv name, norm name) pair, got {quoted(pair)}")
    conv = _lookup(model, pair[0], f"{path}[0]")
    norm = _lookup(model, pair[1], f"{path}[1]")
    why = conv_refusal(conv)
    if why is not None:
        raise DynifyError(
            f"{path}[0]: {pair[0]!r} cannot be fused ({why}); expected {_CONVS_ACCEPTED}"
        )
    why = norm_refusal(norm)
    if why is not None:
        raise DynifyError(
            f"{path}[1]: {pair[1]!r} cannot be fused ({why}); expected {_NORMS_ACCEPTED}"
        )
    why = _fits(conv, norm)
    if why is not None:
        raise DynifyError(f"{path}: {pair[0]!r} and {pair[1]!r} do not fit ({why})")
    return conv, norm


def fuse_batchnorm(
    model: nn.Module,
    pairs: Sequence[tuple[str, str]] | None = None,
    *,
    input_size: tuple[int, int, int] | None = None,
) -> list[FusedPair]:
    """Fuse each BatchNorm into the conv before it, in place, as in eval mode (the running
    statistics); the norm becomes ``nn.Identity`` or :class:`DropAct`.

    The fused model computes what the unfused one does in eval mode, to float rounding (the
    affine map is computed in float64 and rounded once). The pairs fused are appended to
    the model's :class:`ModelEdits` (what ``dynify.save`` stores). Works on the meta device.

    Args:
        model: the model (wrappers are seen through; names are the unwrapped model's).
        pairs: (conv name, norm name) pairs to fuse (default: :func:`conv_norm_pairs`);
            each is checked to be a fusable conv and norm, but not that nothing else reads
            the conv's output: that is the caller's word.
        input_size: the example image for :func:`conv_norm_pairs`'s hook fallback.

    Raises:
        DynifyError: one line naming ``pairs[i]`` when a pair is not a fusable conv and norm.
    """
    model = unwrap_model(model)
    if pairs is None:
        pairs = conv_norm_pairs(model, input_size=input_size)
    elif isinstance(pairs, str) or not isinstance(pairs, Sequence):
        raise DynifyTypeError(
            f"pairs must be a list of (conv name, norm name) pairs, got {type(pairs).__name__}"
        )
    checked = [_checked_pair(model, pair, f"pairs[{i}]") for i, pair in enumerate(pairs)]
    if len({id(norm) for _, norm in checked}) != len(checked):
        raise DynifyError("pairs: a norm is named twice; each norm is fused once")
    if len({id(conv) for conv, _ in checked}) != len(checked):
        raise DynifyError("pairs: a conv is named twice; each conv is fused with one norm")
    aliases = module_names(model)
    fused: list[FusedPair] = []
    for (conv_name, norm_name), (conv, norm) in zip(pairs, checked, strict=True):
        weight = _first_tensor(conv)
        scale, shift = _affine(norm, weight.dtype)  # type: ignore[arg-type]
        bias_added = getattr(conv, "bias", None) is None
        _fuse_into_conv(conv, scale.to(weight.device), shift.to(weight.device))
        _replace(model, norm, _remainder(norm), aliases)
        fused.append(
            FusedPair(conv_name, norm_name, type(conv).__name__, type(norm).__name__, bias_added)
        )
    if fused:
        record_edits(model, fused=[(p.conv, p.norm) for p in fused])
        logger.debug("fuse: %d BatchNorm(s) fused into the convs before them", len(fused))
    return fused


# -- static convs (dynify fold) ---------------------------------------------------------------


def _same_pad(module: nn.Module) -> bool:
    """Whether ``module`` pads TF-'SAME' style at run time (timm's ``Conv2dSame`` and its
    dynamic counterpart; a StdConv2dSame built with ``same_pad``)."""
    if isinstance(module, DynamicLayer):
        return isinstance(module, DynamicConv2dSame)
    cls, _ = conversion_kind(module)
    return cls is DynamicConv2dSame


def static_refusal(module: nn.Module) -> str | None:
    """Why :func:`static_conv_like` cannot stand in for ``module`` (``None``: it can)."""
    if isinstance(module, DynamicLayer):
        return None
    _, reason = conversion_kind(module)
    return reason


def static_conv_like(module: nn.Module, *, bias: bool) -> nn.Conv2d:
    """A plain conv with ``module``'s geometry (a dynamic layer's or a conv's), on its
    device and dtype, weights zero for the caller to copy in: ``nn.Conv2d``, or timm's
    ``Conv2dSame`` when ``module`` pads TF-'SAME' style at run time. What ``dynify fold``
    puts in place of a dynamic layer that does not route, and what :func:`apply_edits`
    rebuilds (on the meta device too)."""
    why = static_refusal(module)
    if why is not None:
        raise DynifyError(f"no static conv stands in for a {type(module).__name__}: {why}")
    like = _first_tensor(module)
    arguments: dict[str, Any] = {
        "in_channels": int(module.in_channels),  # type: ignore[arg-type]
        "out_channels": int(module.out_channels),  # type: ignore[arg-type]
        "kernel_size": tuple(module.kernel_size),  # type: ignore[arg-type]
        "stride": tuple(module.stride),  # type: ignore[arg-type]
        "dilation": tuple(module.dilation),  # type: ignore[arg-type]
        "groups": int(module.groups),  # type: ignore[arg-type]
        "bias": bias,
        "device": "meta",  # no initialisation drawn: the caller writes the weights
        "dtype": like.dtype,
    }
    if _same_pad(module):
        conv: nn.Conv2d = Conv2dSame(**arguments)
    else:
        padding = module.padding
        conv = nn.Conv2d(
            **arguments,
            padding=padding if isinstance(padding, str) else tuple(padding),  # type: ignore[arg-type]
            padding_mode=str(getattr(module, "padding_mode", "zeros")),
        )
    if like.device.type != "meta":
        conv = conv.to_empty(device=like.device)
        with torch.no_grad():
            for param in conv.parameters():
                param.zero_()
    conv.train(module.training)
    return conv


# -- the record -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StaticConv:
    """A module replaced by a plain conv of its geometry (:func:`static_conv_like`)."""

    name: str
    bias: bool


EDITS_KEYS = ("version", "static", "fused")
STATIC_KEYS = ("name", "bias")


@dataclass(frozen=True)
class ModelEdits:
    """The edits made to a model's module tree after ``dynify.apply``, in the order
    :func:`apply_edits` replays them: ``static`` convs first, then ``fused`` (conv, norm)
    pairs. Immutable; :meth:`extended` makes a longer copy."""

    static: tuple[StaticConv, ...] = ()
    fused: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "static", tuple(self.static))
        object.__setattr__(self, "fused", tuple((str(c), str(n)) for c, n in self.fused))

    @property
    def empty(self) -> bool:
        return not self.static and not self.fused

    def extended(
        self,
        *,
        static: Iterable[StaticConv] = (),
        fused: Iterable[tuple[str, str]] = (),
    ) -> ModelEdits:
        return ModelEdits(
            static=(*self.static, *static),
            fused=(*self.fused, *(tuple(p) for p in fused)),  # type: ignore[arg-type]
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "static": [{"name": s.name, "bias": s.bias} for s in self.static],
            "fused": [[conv, norm] for conv, norm in self.fused],
        }

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<edits>") -> ModelEdits:
        """A record as :meth:`to_dict` writes it (an artifact's metadata), validated: an
        unknown key, a wrong type or a bad name is one line naming ``source`` and the key
        path (``edits.fused[2][1]: expected a module name, got 3``)."""
        try:
            return _parse_edits(Doc(data, source, {}, prefix="edits"))
        except DynifyError as err:
            raise DynifyError(shorten(str(err), 300)) from None


def _name(doc: Doc, value: Any, path: str) -> str:
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= MAX_NAME
        or any(not part for part in value.split("."))
    ):
        raise doc.error(path, f"expected a module name, got {quoted(value)}")
    return value


def _parse_edits(doc: Doc) -> ModelEdits:
    if not isinstance(doc.data, dict):
        raise doc.error(
            "", f"expected a mapping with keys {list(EDITS_KEYS)}, got {quoted(doc.data)}"
        )
    top = doc.mapping(doc.data, "", EDITS_KEYS)
    if "version" in top and top["version"] != 1:
        raise doc.error(
            "version", f"unsupported edits version {quoted(top['version'])}; accepted: 1"
        )
    static_raw = top.get("static") or []
    fused_raw = top.get("fused") or []
    for key, raw in (("static", static_raw), ("fused", fused_raw)):
        if not isinstance(raw, list):
            raise doc.error(key, f"expected a list, got {quoted(raw)}")
    static = []
    for i, raw in enumerate(static_raw):
        path = f"static[{i}]"
        if not isinstance(raw, dict):
            raise doc.error(
                path, f"expected a mapping with keys {list(STATIC_KEYS)}, got {quoted(raw)}"
            )
        entry = doc.mapping(raw, path, STATIC_KEYS)
        for key in STATIC_KEYS:
            if key not in entry:
                raise doc.error(f"{path}.{key}", "missing (required)")
        static.append(
            StaticConv(
                _name(doc, entry["name"], f"{path}.name"),
                doc.boolean(entry["bias"], f"{path}.bias"),
            )
        )
    fused = []
    for i, raw in enumerate(fused_raw):
        path = f"fused[{i}]"
        if not isinstance(raw, list) or len(raw) != 2:
            raise doc.error(path, f"expected [conv name, norm name], got {quoted(raw)}")
        fused.append((_name(doc, raw[0], f"{path}[0]"), _name(doc, raw[1], f"{path}[1]")))
    norms = [norm for _, norm in fused]
    twice = next((n for i, n in enumerate(norms) if n in norms[:i]), None)
    if twice is not None:
        raise doc.error(
            f"fused[{norms.index(twice, norms.index(twice) + 1)}][1]", f"{twice!r} is fused twice"
        )
    return ModelEdits(static=tuple(static), fused=tuple(fused))


def find_edits(model: nn.Module) -> ModelEdits | None:
    """The edits ``model`` records (``None``: none), wrappers seen through."""
    edits = getattr(unwrap_model(model), EDITS_ATTRIBUTE, None)
    return edits if isinstance(edits, ModelEdits) else None


def edits_of(model: nn.Module) -> ModelEdits:
    """The edits ``model`` records, empty when it records none."""
    return find_edits(model) or ModelEdits()


def record_edits(
    model: nn.Module,
    *,
    static: Iterable[StaticConv] = (),
    fused: Iterable[tuple[str, str]] = (),
) -> ModelEdits:
    """Append edits to those ``model`` records (what :func:`fuse_batchnorm` does, and
    ``dynify fold`` for the convs it makes static); returns the whole record."""
    edits = edits_of(model).extended(static=static, fused=fused)
    # A ModelEdits is neither a parameter, a buffer nor a module: a plain attribute.
    setattr(unwrap_model(model), EDITS_ATTRIBUTE, edits)
    return edits


@torch.no_grad()
def apply_edits(model: nn.Module, edits: ModelEdits) -> nn.Module:
    """Replay the structure of ``edits`` on ``model`` (in place; meta or real tensors): each
    ``static`` module becomes :func:`static_conv_like`, then each fused pair's conv gets
    what fusing gives it (a bias, a dynamic layer's own) and its norm is replaced as
    :func:`fuse_batchnorm` replaces it. Values are placeholders (the loaded weights
    overwrite them). The edits are appended to the model's record.

    Raises:
        DynifyError: one line naming the record's key (``edits.fused[2][1]: ...``) when a
            name is not a module of the right kind in ``model``.
    """
    if not isinstance(edits, ModelEdits):
        raise DynifyTypeError(f"edits must be a ModelEdits, got {type(edits).__name__}")
    target = unwrap_model(model)
    aliases = module_names(target)
    for i, entry in enumerate(edits.static):
        path = f"edits.static[{i}].name"
        module = _lookup(target, entry.name, path)
        why = static_refusal(module)
        if why is not None:
            raise DynifyError(
                f"{path}: {entry.name!r} cannot be made a static conv ({why}); expected a "
                "dynamic layer or a conv"
            )
        _replace(target, module, static_conv_like(module, bias=entry.bias), aliases)
    for i, pair in enumerate(edits.fused):
        conv, norm = _checked_pair(target, pair, f"edits.fused[{i}]")
        weight = _first_tensor(conv)
        channels = int(conv.out_channels)  # type: ignore[arg-type]
        ones = torch.ones(channels, dtype=weight.dtype, device=weight.device)
        _fuse_into_conv(conv, ones, torch.zeros_like(ones))
        _replace(target, norm, _remainder(norm), aliases)
    if not edits.empty:
        record_edits(target, static=edits.static, fused=edits.fused)
    return model

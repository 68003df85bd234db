"""Record the multiply-accumulates of one forward pass, op by op, from the ops' shapes.

``OpRecorder`` is a ``TorchDispatchMode`` that watches the same aten ops as
``torch.utils.flop_counter.FlopCounterMode`` (matrix products, convolutions, attention) and
computes each one's MACs from its shapes. Each op is attributed to the conv layer it runs
inside (``nn.Conv2d`` and subclasses, timm's ``CondConv2d``, dynify's ``DynamicConv2d``),
else to the innermost module that ran it, and marked *batched* when it depends on the input
(its cost then scales with the batch size) or fixed when it only reads parameters.

Which modules are conv layers is the caller's to say (``is_conv_layer``): this module sits
below :mod:`dynify.layers` and knows no dynamic layer. :func:`record_ops` runs one example
pass under a recorder; ``trace_model`` runs its example that way, so a trace (and the plan
resolved from it, and an artifact's plan) knows what the rest of the network costs; the
cost model (``dynify.cost``) prices plans from that, and records models without a plan
through the same function.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from math import prod
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from dynify._modes import evaluating
from dynify.errors import DynifyError, shorten

__all__ = [
    "ATTENTION_OP_NAMES",
    "CONV_OP_NAMES",
    "CPU_ATTENTION_OPS",
    "CountedOp",
    "OpCounts",
    "OpRecorder",
    "op_macs",
    "record_ops",
]

aten = torch.ops.aten

# torch's FlopCounterMode misses the CPU attention kernel that scaled_dot_product_attention
# dispatches to; dynify counts it (and ``measure_flops`` maps it to torch's own attention
# formula) so that CPU and GPU counts agree.
CPU_ATTENTION_OPS = tuple(
    getattr(aten, name)
    for name in ("_scaled_dot_product_flash_attention_for_cpu",)
    if hasattr(aten, name)
)
_ATTENTION = {
    aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_cudnn_attention,
    *CPU_ATTENTION_OPS,
}
_CONV = {
    aten.convolution,
    aten._convolution,
    aten.cudnn_convolution,
    aten._slow_conv2d_forward,
    aten.convolution_overrideable,
}
_MAY_TRANSPOSE = {aten.convolution, aten._convolution, aten.convolution_overrideable}
_COUNTED = frozenset(flop_registry) | _ATTENTION

# Op names as ``CountedOp.op`` spells them, by family.
CONV_OP_NAMES = frozenset(p.__name__ for p in _CONV)
ATTENTION_OP_NAMES = frozenset(p.__name__ for p in _ATTENTION)

# How much of the model's own error message a one-line error quotes (all of it is kept as
# the error's cause).
_MESSAGE_LIMIT = 200


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape)


def op_macs(packet: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    """Multiply-accumulates of one counted op, from its shapes (FlopCounterMode's FLOPs / 2)."""
    if packet in (aten.mm, aten.addmm, aten._scaled_mm):
        a, b = (args[0], args[1]) if packet is not aten.addmm else (args[1], args[2])
        (m, k), (_, n) = _shape(a), _shape(b)
        return m * k * n
    if packet in (aten.bmm, aten.baddbmm):
        a, b = (args[0], args[1]) if packet is aten.bmm else (args[1], args[2])
        (bs, m, k), (_, _, n) = _shape(a), _shape(b)
        return bs * m * k * n
    if packet in _CONV:
        x, w = _shape(args[0]), _shape(args[1])
        transposed = packet in _MAY_TRANSPOSE and bool(args[6])
        spatial = x[2:] if transposed else _shape(out)[2:]
        return x[0] * prod(spatial) * prod(w)
    if packet in _ATTENTION:
        (b, h, s_q, d_q), (_, _, s_k, _), (_, _, _, d_v) = (_shape(a) for a in args[:3])
        return b * h * s_q * s_k * (d_q + d_v)
    # Anything else torch counts (fused attention kernels, ...): torch's own formula.
    formula = flop_registry[packet]
    return int(formula(*args, **kwargs, out_val=out)) // 2


@dataclass(frozen=True)
class CountedOp:
    """The MACs one module spends in one kind of op, at batch size 1, over all its calls."""

    module: str  # the conv layer it ran inside, else the innermost module ("" = the model)
    op: str  # aten op name, e.g. "addmm", "convolution"
    macs: int
    batched: bool  # depends on the input (scales with the batch) rather than weights only
    in_conv: bool  # ran inside the conv layer ``module``

    def to_list(self) -> list[Any]:
        return [self.module, self.op, self.macs, self.batched, self.in_conv]

    @classmethod
    def from_list(cls, data: list[Any]) -> CountedOp:
        module, op, macs, batched, in_conv = data
        return cls(str(module), str(op), int(macs), bool(batched), bool(in_conv))


@dataclass(frozen=True, eq=False)  # hashed by identity: the cost model caches per instance
class OpCounts:
    """Every counted op of one example forward pass (batch 1), and the model's parameters."""

    ops: tuple[CountedOp, ...]
    params: int  # all parameters of the model, tied ones once
    # Parameters of the modules outside conv layers that run counted ops (their own, not
    # their children's): a Linear's weight and bias.
    module_params: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ops": [op.to_list() for op in self.ops],
            "params": self.params,
            "module_params": dict(self.module_params),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OpCounts:
        return cls(
            ops=tuple(CountedOp.from_list(d) for d in data["ops"]),
            params=int(data["params"]),
            module_params={str(k): int(v) for k, v in data.get("module_params", {}).items()},
        )


class _Tainted:
    """Identity set of the tensors computed from the model's input (weak references)."""

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref] = {}

    def add(self, t: torch.Tensor) -> None:
        self._refs[id(t)] = weakref.ref(t)

    def __contains__(self, t: torch.Tensor) -> bool:
        ref = self._refs.get(id(t))
        return ref is not None and ref() is t


class OpRecorder(TorchDispatchMode):
    """Record the counted ops of the forward passes run inside ``with recorder:``.

    Args:
        model: the model whose modules name the ops.
        inputs: the tensors fed to the model; ops that depend on them are *batched*.
        is_conv_layer: which modules are conv layers (static or dynamic), each priced as
            one layer with every op run inside it.

    After the run: ``counts()`` gives an :class:`OpCounts`; ``conv_calls``,
    ``conv_inputs`` and ``conv_outputs`` give each conv layer's number of calls and first
    input / output shape (per sample).
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: tuple[torch.Tensor, ...] = (),
        *,
        is_conv_layer: Callable[[nn.Module], bool],
    ) -> None:
        super().__init__()
        self._model = model
        self._names: dict[int, str] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            self._names.setdefault(id(module), name)
        self._conv_ids = {id(m) for m in model.modules() if is_conv_layer(m)}
        self._stack: list[nn.Module] = []
        self._conv_depth = 0
        self._tainted = _Tainted()
        for x in inputs:
            self._tainted.add(x)
        self._macs: dict[tuple[str, str, bool, bool], int] = {}
        self._handles: list[Any] = []
        self._entered = 0
        self.conv_calls: dict[str, int] = {}
        self.conv_inputs: dict[str, tuple[int, ...]] = {}
        self.conv_outputs: dict[str, tuple[int, ...]] = {}

    # -- module stack -------------------------------------------------------------------

    def _pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._stack.append(module)
        if id(module) in self._conv_ids:
            self._conv_depth += 1
            if self._conv_depth == 1:
                name = self._names[id(module)]
                self.conv_calls[name] = self.conv_calls.get(name, 0) + 1
                if args and isinstance(args[0], torch.Tensor):
                    self.conv_inputs.setdefault(name, tuple(args[0].shape[1:]))

    def _post(self, module: nn.Module, _args: Any, out: Any) -> None:
        if self._stack and self._stack[-1] is module:
            self._stack.pop()
        if id(module) in self._conv_ids:
            if self._conv_depth == 1 and isinstance(out, torch.Tensor):
                self.conv_outputs.setdefault(self._names[id(module)], tuple(out.shape[1:]))
            self._conv_depth -= 1

    def _owner(self) -> tuple[str, bool]:
        for module in self._stack:  # outermost conv layer first
            if id(module) in self._conv_ids:
                return self._names[id(module)], True
        for module in reversed(self._stack):
            name = self._names.get(id(module))
            if name is not None:
                return name, False
        return "", False

    # The mode is re-entered while active (``with self:`` around a decomposition in
    # ``__torch_dispatch__``), so the global module hooks are registered on the outermost
    # entry only and removed on its exit: otherwise the outer pair stays registered for
    # good, keeping the recorder and its model alive and slowing every later forward.
    def __enter__(self) -> OpRecorder:
        from torch.nn.modules.module import (
            register_module_forward_hook,
            register_module_forward_pre_hook,
        )

        if self._entered == 0:
            self._handles = [
                register_module_forward_pre_hook(self._pre),
                register_module_forward_hook(self._post, always_call=True),
            ]
        self._entered += 1
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._entered -= 1
        if self._entered == 0:
            for h in self._handles:
                h.remove()
            self._handles = []
        return super().__exit__(*exc)

    # -- ops ----------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        # As FlopCounterMode does: an op with a decomposition (conv2d, linear, ... arrive
        # whole under inference_mode) is seen through its parts, so both see the same ops.
        if func is not torch.ops.prim.device.default:
            with self:
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
        out = func(*args, **kwargs)
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        batched = any(t in self._tainted for t in inputs)
        if batched:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self._tainted.add(t)
        packet = func._overloadpacket
        if packet in _COUNTED:
            module, in_conv = self._owner()
            key = (module, packet.__name__, batched, in_conv)
            self._macs[key] = self._macs.get(key, 0) + op_macs(packet, args, kwargs, out)
        return out

    def counts(self) -> OpCounts:
        ops = tuple(
            CountedOp(module, op, macs, batched, in_conv)
            for (module, op, batched, in_conv), macs in self._macs.items()
        )
        modules = dict(self._model.named_modules())
        module_params = {}
        for op in ops:
            if not op.in_conv and op.module in modules:
                own = sum(p.numel() for p in modules[op.module].parameters(recurse=False))
                if own:
                    module_params[op.module] = own
        params = sum(p.numel() for p in self._model.parameters())
        return OpCounts(ops=ops, params=params, module_params=module_params)


def record_ops(
    model: nn.Module,
    example: torch.Tensor,
    *,
    is_conv_layer: Callable[[nn.Module], bool],
) -> tuple[Any, OpRecorder]:
    """Run ``model(example)`` once, in eval mode under ``no_grad``, with an
    :class:`OpRecorder` watching; the model is left in the mode it was in.

    Returns the output and the recorder (``counts()``, ``conv_calls``, ...).

    Raises:
        DynifyError: the model fails on the example: one line naming the input size and
            the model's error, which is kept as the cause.
    """
    recorder = OpRecorder(model, (example,), is_conv_layer=is_conv_layer)
    try:
        with torch.no_grad(), evaluating(model), recorder:
            output = model(example)
    except Exception as err:
        size = tuple(example.shape[1:])
        message = shorten(str(err), _MESSAGE_LIMIT)
        raise DynifyError(
            f"the model does not run on an input of size {size}: {type(err).__name__}"
            + (f": {message}" if message else "")
        ) from err
    return output, recorder

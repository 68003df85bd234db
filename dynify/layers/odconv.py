"""ODConv2d: omni-dimensional dynamic convolution.

Li, Zhou and Yao, "Omni-Dimensional Dynamic Convolution", ICLR 2022 (ODConv); reference code
OSVAI/ODConv, ``modules/odconv.py``.

Four attentions computed from the input, each along one dimension of the kernel space,
multiply the kernel of every sample::

    W(x) = a_f(x) * a_c(x) * a_s(x) * sum_i a_w,i(x) W_i
    y    = conv2d(x, W(x)) + b

``a_c`` (C_in, sigmoid) scales the input channels, ``a_f`` (C_out, sigmoid) the filters,
``a_s`` (kh * kw, sigmoid) the kernel positions, and ``a_w`` (K, softmax) mixes the K expert
kernels. As in the reference, ``a_c`` and ``a_f`` are applied to the feature maps (the input
before the convolution, the output after it), which is the same function and much cheaper
than scaling every sample's kernel; only ``a_s * sum_i a_w,i W_i`` is built per sample. The
reference drops ``a_f`` for a depthwise conv (C_in == groups == C_out), ``a_s`` for a 1x1
kernel and ``a_w`` for K = 1; so does this layer.

Deviations from the reference, all deliberate:

- No BatchNorm in the attention (pool -> Linear(no bias) -> ReLU -> heads): the reference's
  BatchNorm2d on the pooled vector fails in training at batch size 1 (OSVAI/ODConv issues
  #5, #23, #27, #35), and a dynamic layer must work at any batch size.
- The four heads are one ``nn.Linear`` (``attention.heads``, rows in the routing's order):
  one matrix product instead of four, the same parameters and the same function.
- The hidden width is ``max(in_channels // reduction, 16)`` (the reference's
  ``max(int(in_channels * 0.0625), 16)`` is ``reduction=16``, the default).
- Non-square kernels (the spatial attention has kh * kw entries), every ``nn.Conv2d``
  padding form and padding mode, and a bias (added after the filter attention, so that
  :meth:`ODConv2d.from_conv` is exact) are supported; the reference has square kernels,
  zero padding and no bias.
- ``from_conv`` starts from a pretrained conv exactly (see there); the reference only
  trains from scratch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair

from dynify.errors import DynifyError, DynifyTypeError
from dynify.layers._functional import (
    _BACKWARD_MAX_KERNEL_BYTES,
    DEFAULT_MAX_KERNEL_BYTES,
    Strategy,
    _chunk_size,
    _conv_chunk,
    _conv_chunk_backward,
    _is_symbolic,
    _memory_format_of,
    _output_hw,
    choose_strategy,
    dynamic_conv2d,
    mix_kernels,
    runs_stacked,
)
from dynify.layers.attention import _drawable, _reset_linear
from dynify.layers.base import DynamicLayer
from dynify.layers.dynamic_conv import (
    DEFAULT_ROUTING_STD,
    DynamicConv2d,
    _check_positive,
    _checked_affine,
    _keep_layout,
    _kept,
    checked_kernel,
    conv_arguments,
    conv_geometry_repr,
    set_conv_geometry,
)
from dynify.layers.portable import per_sample_conv2d

__all__ = [
    "DEFAULT_REDUCTION",
    "MIN_HIDDEN",
    "OD_INITS",
    "ODAttention",
    "ODConv2d",
    "od_conv2d",
    "od_runs_unfolded",
    "odconv_hidden_width",
    "odconv_sections",
]

# The reference's attention width: max(int(C_in * 0.0625), 16).
DEFAULT_REDUCTION = 16
MIN_HIDDEN = 16

ODInit = Literal["upcycle", "scratch"]
OD_INITS: tuple[str, ...] = ("upcycle", "scratch")

_IntOrPair = int | tuple[int, int]


def odconv_hidden_width(in_channels: int, reduction: int) -> int:
    """Width of the attention's hidden layer: ``max(in_channels // reduction, 16)``."""
    return max(in_channels // reduction, MIN_HIDDEN)


def odconv_sections(
    in_channels: int,
    out_channels: int,
    kernel_size: _IntOrPair,
    groups: int,
    experts: int,
) -> tuple[int, int, int, int]:
    """Sizes of the routing's four parts: channel, filter, spatial, kernel attention (0 for
    a part the layer does not have: filter for depthwise, spatial for 1x1, kernel for K=1)."""
    kh, kw = _pair(kernel_size)
    depthwise = in_channels == groups == out_channels
    return (
        in_channels,
        0 if depthwise else out_channels,
        0 if kh * kw == 1 else kh * kw,
        0 if experts == 1 else experts,
    )


class ODAttention(nn.Module):
    """ODConv's four attentions: global average pool, ``fc`` (no bias), ReLU, ``heads``;
    sigmoid(z / T) on the channel, filter and spatial logits, softmax(z / T) on the kernel
    logits (T divides all of them, as in the reference).

    Shapes: input ``(B, C_in, H, W)``; output ``(B, D)``, the attentions side by side in the
    order of ``sections`` (channel, filter, spatial, kernel; absent parts have size 0).
    """

    temperature: torch.Tensor

    def __init__(
        self,
        in_channels: int,
        sections: tuple[int, int, int, int],
        *,
        reduction: int = DEFAULT_REDUCTION,
        temperature: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if float(temperature) <= 0:
            raise DynifyError(f"temperature must be > 0, got {temperature}")
        factory = {"device": device, "dtype": dtype}
        self.sections = tuple(int(s) for s in sections)
        self.hidden = odconv_hidden_width(in_channels, reduction)
        self.fc = nn.Linear(in_channels, self.hidden, bias=False, **factory)
        self.heads = nn.Linear(self.hidden, sum(self.sections), **factory)
        self.register_buffer("temperature", torch.tensor(float(temperature), **factory))

    @property
    def num_sigmoid(self) -> int:
        """How many leading routing entries are sigmoid gates (the rest is the softmax)."""
        return sum(self.sections[:3])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-temperature scores ``z`` of shape ``(B, D)``."""
        pooled = x.mean(dim=(2, 3))
        hidden = F.relu(F.linear(pooled, self.fc.weight))
        return F.linear(hidden, self.heads.weight, self.heads.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.logits(x) / self.temperature
        if not self.sections[3]:
            return torch.sigmoid(z)
        s = self.num_sigmoid
        return torch.cat([torch.sigmoid(z[:, :s]), torch.softmax(z[:, s:], dim=1)], dim=1)

    def reset_parameters(self, *, generator: torch.Generator | None = None) -> None:
        """The reference's initialisation: every layer ``kaiming_normal_(mode='fan_out',
        nonlinearity='relu')`` (each head with its own fan-out), biases zero."""
        if self.fc.weight.is_meta:
            return
        with torch.no_grad():
            self.fc.weight.copy_(_kaiming_fan_out(self.fc.weight, self.hidden, generator))
            rows = []
            for size in self.sections:
                if size:
                    block = self.heads.weight.new_empty(size, self.hidden)
                    rows.append(_kaiming_fan_out(block, size, generator))
            self.heads.weight.copy_(torch.cat(rows))
            self.heads.bias.zero_()

    def reset_routing(self, *, std: float, generator: torch.Generator | None = None) -> None:
        """``from_conv``'s start: ``fc`` as ``nn.Linear`` initialises itself, the sigmoid
        heads zero (every gate exactly 1/2), the kernel head's weight N(0, std^2) and its
        bias zero (random softmax weights, which sum to 1 for every input)."""
        _reset_linear(self.fc, generator)
        if self.heads.weight.is_meta:
            return
        with torch.no_grad():
            self.heads.weight.zero_()
            self.heads.bias.zero_()
            if self.sections[3]:
                s = self.num_sigmoid
                kernel_rows = self.heads.weight[s:]
                w = _drawable(kernel_rows, generator).normal_(0.0, float(std), generator=generator)
                kernel_rows.copy_(w)

    def extra_repr(self) -> str:
        c, f, s, k = self.sections
        return (
            f"hidden={self.hidden}, channel={c}, filter={f}, spatial={s}, kernel={k}, "
            f"temperature={float(self.temperature):g}"
        )


def _kaiming_fan_out(
    target: torch.Tensor, fan_out: int, generator: torch.Generator | None
) -> torch.Tensor:
    """N(0, 2 / fan_out) numbers shaped like ``target`` (``kaiming_normal_`` with
    ``mode='fan_out', nonlinearity='relu'``), drawn from ``generator``."""
    draw = _drawable(target, generator)
    return draw.normal_(0.0, math.sqrt(2.0 / fan_out), generator=generator).to(target.device)


def _od_kernels(
    kernel_att: torch.Tensor | None,
    spatial_att: torch.Tensor,
    weight: torch.Tensor,
    *,
    reuse: bool = True,
) -> torch.Tensor:
    """Each sample's ``a_s * sum_i a_w,i W_i``: ``(n, C_out, C_in // groups, kh, kw)``.
    ``reuse``: the result may live in the scratch buffer (see ``mix_kernels``)."""
    n = spatial_att.shape[0]
    kh, kw = weight.shape[-2:]
    spatial = spatial_att.reshape(n, 1, 1, kh, kw)
    if kernel_att is None:
        return weight[0].unsqueeze(0) * spatial
    recorded = torch.is_grad_enabled() and (
        kernel_att.requires_grad or weight.requires_grad or spatial_att.requires_grad
    )
    mixed = mix_kernels(kernel_att, weight, reuse=reuse and not recorded)
    if recorded:
        return mixed * spatial
    return mixed.mul_(spatial)  # a fresh tensor or this thread's scratch buffer


def od_runs_unfolded(
    batch: int, experts: int, kernel_numel: int, out_positions: int, groups: int
) -> bool:
    """Whether an eager call with a spatial attention takes the ``unfolded`` formulation: at
    batch > 1 on the tiny maps where DY-CNN stacks its experts (and, for K = 1, where one
    expert's worth of extra positions is as few): the input unfolded once, scaled by the
    spatial attention, and multiplied by every expert at once (K convolutions' MACs, then
    the outputs mixed), instead of one large kernel per sample, which is memory-bound. The
    cost model asks this too."""
    return runs_stacked(batch, max(experts, 2), kernel_numel, out_positions, groups)


def _od_unfolded(
    x: torch.Tensor,
    kernel_att: torch.Tensor | None,
    spatial_att: torch.Tensor,
    weight: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> torch.Tensor:
    """``sum_i a_w,i W_i * (a_s . unfold(x))``: every expert's output from one product with
    the unfolded, spatially scaled input, then mixed by the kernel attention."""
    batch = x.shape[0]
    k, c_out, c_in_g, kh, kw = weight.shape
    out_h, out_w = _output_hw(x, weight, stride, padding, dilation)
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    cols = cols.view(batch, groups, c_in_g, kh * kw, -1) * spatial_att.view(batch, 1, 1, -1, 1)
    cols = cols.reshape(batch, groups, c_in_g * kh * kw, -1)
    experts = weight.reshape(k, groups, c_out // groups, c_in_g * kh * kw)
    if kernel_att is None:
        out = torch.einsum("goc,bgcp->bgop", experts[0], cols)
    else:
        every = torch.einsum("kgoc,bgcp->bkgop", experts, cols)
        out = torch.einsum("bk,bkgop->bgop", kernel_att, every)
    return out.reshape(batch, c_out, out_h, out_w)


def od_conv2d(
    x: torch.Tensor,
    kernel_att: torch.Tensor | None,
    spatial_att: torch.Tensor | None,
    filter_att: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    max_kernel_bytes: int = DEFAULT_MAX_KERNEL_BYTES,
) -> torch.Tensor:
    """ODConv's convolution of an input already scaled by the channel attention.

    Args:
        x: ``(B, C_in, H, W)``, scaled by ``a_c`` and padded for non-zero padding modes.
        kernel_att: ``(B, K)`` or ``None`` (K = 1).
        spatial_att: ``(B, kh * kw)`` or ``None`` (1x1 kernels).
        filter_att: ``(B, C_out)`` or ``None`` (depthwise).
        weight: experts ``(K, C_out, C_in // groups, kh, kw)``.
        bias: ``(C_out,)`` or ``None``, added after the filter attention.

    Without a spatial attention the kernel is ``sum_i a_w,i W_i``: DY-CNN's
    :func:`~dynify.layers.dynamic_conv2d` (every formulation, bounded memory), or one
    ordinary convolution when K = 1. With one, each sample's kernel is built and convolved:
    one ordinary convolution at batch 1, else the batch-folded grouped convolution or a loop
    of per-sample convolutions, whichever ``choose_strategy`` finds faster, in chunks of at
    most ``max_kernel_bytes`` of kernels; under autograd only the input and the attentions
    are saved and backward rebuilds each chunk's kernels (as ``dynamic_conv2d`` does), so
    the extra memory does not grow with the batch. Under compile / export: the plain
    folded convolution.
    Returns ``(B, C_out, H_out, W_out)`` in ``x``'s memory layout.
    """
    fmt = _memory_format_of(x)
    if spatial_att is None:
        if kernel_att is None:
            out = F.conv2d(x, weight[0], None, stride, padding, dilation, groups)
        else:
            out = dynamic_conv2d(
                x, kernel_att, weight, None, stride, padding, dilation, groups, max_kernel_bytes
            )
    elif _is_symbolic(x):
        kernels = _od_kernels(kernel_att, spatial_att, weight, reuse=False)
        out = _conv_chunk(x, kernels, "folded", stride, padding, dilation, groups)
    elif x.shape[0] == 1:
        kernel = _od_kernels(kernel_att, spatial_att, weight)[0]
        out = F.conv2d(x, kernel, None, stride, padding, dilation, groups)
    elif od_runs_unfolded(
        x.shape[0],
        weight.shape[0],
        weight[0].numel(),
        math.prod(_output_hw(x, weight, stride, padding, dilation)),
        groups,
    ):
        out = _od_unfolded(x, kernel_att, spatial_att, weight, stride, padding, dilation, groups)
    else:
        batch = x.shape[0]
        out_hw = _output_hw(x, weight, stride, padding, dilation)
        strategy = choose_strategy(batch, weight.shape, (x.shape[2], x.shape[3]), out_hw, groups)
        if strategy not in ("folded", "per_sample"):
            strategy = "folded"  # "stacked" mixes outputs, which a spatial attention forbids
        args = (strategy, stride, padding, dilation, groups, max_kernel_bytes)
        if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, kernel_att, spatial_att, weight)
        ):
            out = _ODConvFunction.apply(x, kernel_att, spatial_att, weight, *args)
        else:
            out = _chunked_forward(x, kernel_att, spatial_att, weight, *args)
    if filter_att is not None:
        out = out * filter_att[:, :, None, None]
    if bias is not None:
        out = out + bias[None, :, None, None]
    return out.contiguous(memory_format=fmt)


# fx sees the dispatching function as one opaque call, so tracing never branches on a Proxy;
# likewise the layout fix-up, which inspects strides.
torch.fx.wrap("od_conv2d")
torch.fx.wrap("_keep_layout")


def _chunked_forward(
    x: torch.Tensor,
    kernel_att: torch.Tensor | None,
    spatial_att: torch.Tensor,
    weight: torch.Tensor,
    strategy: Strategy,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    max_kernel_bytes: int,
) -> torch.Tensor:
    batch = x.shape[0]
    chunk = _chunk_size(batch, weight, max_kernel_bytes)
    outs = []
    for start in range(0, batch, chunk):
        part = slice(start, min(start + chunk, batch))
        k_att = None if kernel_att is None else kernel_att[part]
        kernels = _od_kernels(k_att, spatial_att[part], weight)
        outs.append(_conv_chunk(x[part], kernels, strategy, stride, padding, dilation, groups))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


class _ODConvFunction(torch.autograd.Function):
    """Chunked ODConv convolution that rebuilds kernels in backward instead of saving them."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        kernel_att: torch.Tensor | None,
        spatial_att: torch.Tensor,
        weight: torch.Tensor,
        strategy: Strategy,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
        max_kernel_bytes: int,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, kernel_att, spatial_att, weight)
        ctx.conf = (strategy, stride, padding, dilation, groups, max_kernel_bytes)
        return _chunked_forward(
            x, kernel_att, spatial_att, weight, strategy, stride, padding, dilation, groups,
            max_kernel_bytes,
        )  # fmt: skip

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, kernel_att, spatial_att, weight = ctx.saved_tensors
        strategy, stride, padding, dilation, groups, max_kernel_bytes = ctx.conf
        need_x, need_kernel, need_spatial, need_weight = ctx.needs_input_grad[:4]
        # Under autocast the forward ran in a lower precision than the saved tensors;
        # backward computes in theirs (a no-op without autocast).
        grad_out = grad_out.to(x.dtype).contiguous(memory_format=_memory_format_of(x))
        batch, k = x.shape[0], weight.shape[0]
        kh, kw = weight.shape[-2:]
        flat_weight = weight.reshape(k, -1)
        chunk = _chunk_size(batch, weight, min(max_kernel_bytes, _BACKWARD_MAX_KERNEL_BYTES))
        grad_x = torch.empty_like(x) if need_x else None
        grad_kernel = torch.empty_like(kernel_att) if need_kernel else None
        grad_spatial = torch.empty_like(spatial_att) if need_spatial else None
        grad_weight = torch.zeros_like(flat_weight) if need_weight else None
        for start in range(0, batch, chunk):
            part = slice(start, min(start + chunk, batch))
            n = part.stop - start
            if kernel_att is None:
                mixed = weight[0].unsqueeze(0).expand(n, *weight.shape[1:])
            else:
                mixed = mix_kernels(kernel_att[part], weight, reuse=True)
            spatial = spatial_att[part].reshape(n, 1, 1, kh, kw)
            gx, gk = _conv_chunk_backward(
                grad_out[part], x[part], mixed * spatial, strategy, stride, padding, dilation,
                groups, need_x,
            )  # fmt: skip
            if grad_x is not None:
                grad_x[part] = gx
            if grad_spatial is not None:
                grad_spatial[part] = (gk * mixed).sum(dim=(1, 2)).reshape(n, kh * kw)
            grad_mixed = (gk * spatial).reshape(n, -1)
            if grad_kernel is not None:
                grad_kernel[part] = grad_mixed @ flat_weight.t()
            if grad_weight is not None:
                if kernel_att is None:
                    grad_weight[0] += grad_mixed.sum(0)
                else:
                    grad_weight.addmm_(kernel_att[part].t(), grad_mixed)
        if grad_weight is not None:
            grad_weight = grad_weight.reshape(weight.shape)
        return grad_x, grad_kernel, grad_spatial, grad_weight, *([None] * 6)


class ODConv2d(DynamicLayer):
    """A drop-in for ``nn.Conv2d`` with ODConv's four attentions (see the module doc).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
        padding_mode, device, dtype: exactly as for ``nn.Conv2d`` (kernel_size may be
            non-square; padding an int, a pair, ``"same"`` or ``"valid"``; every padding mode).
        num_experts: K, the number of expert kernels (>= 1; K = 1 has no kernel attention).
        reduction: r; the attention's hidden width is ``max(in_channels // r, 16)`` (the
            reference's ``max(int(C_in * 0.0625), 16)`` at the default r = 16).
        temperature: T, dividing every attention logit (a buffer; see ``temperature``).
        max_kernel_bytes: at most this many bytes of per-sample kernels exist at once in
            eager mode without autograd (the batch is processed in chunks); layers without
            a spatial attention bound it under autograd too (DY-CNN's machinery).

    Shapes: as for ``nn.Conv2d``; channels_last input gives channels_last output.

    Parameters: ``weight`` ``(K, C_out, C_in // groups, kh, kw)``, ``bias`` ``(C_out,)``,
    ``attention.fc`` ``(hidden, C_in)`` and ``attention.heads`` ``(D, hidden)`` + ``(D,)``.

    Routing ``(B, D)``: ``[a_c (C_in), a_f (C_out), a_s (kh*kw), a_w (K)]``, with a_f absent
    for depthwise convs, a_s for 1x1 kernels and a_w for K = 1 (``attention.sections``).
    """

    KINDS = ("odconv",)

    # nn.Conv2d's padding forms and modes, exactly as DynamicConv2d handles them.
    _pre_padding = DynamicConv2d._pre_padding
    _conv_padding = DynamicConv2d._conv_padding
    _pad = DynamicConv2d._pad

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _IntOrPair,
        stride: _IntOrPair = 1,
        padding: _IntOrPair | str = 0,
        dilation: _IntOrPair = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        num_experts: int = 4,
        reduction: int = DEFAULT_REDUCTION,
        temperature: float = 1.0,
        max_kernel_bytes: int = DEFAULT_MAX_KERNEL_BYTES,
    ) -> None:
        super().__init__()
        set_conv_geometry(self, in_channels, out_channels, kernel_size, stride, padding,
                          dilation, groups, padding_mode)  # fmt: skip
        _check_positive("num_experts", num_experts)
        _check_positive("reduction", reduction)
        self.num_experts = num_experts
        self.reduction = reduction
        self.max_kernel_bytes = int(max_kernel_bytes)
        self._pre_pad = self._pre_padding()

        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty(
                num_experts, out_channels, in_channels // groups, *self.kernel_size, **factory
            )
        )
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        sections = odconv_sections(in_channels, out_channels, self.kernel_size, groups, num_experts)
        self.attention = ODAttention(
            in_channels, sections, reduction=reduction, temperature=temperature, **factory
        )
        self.reset_parameters()

    # -- what the kind covers, before anything is built --------------------------------

    @classmethod
    def unsupported_reason(
        cls,
        *,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int] | str,
        dilation: tuple[int, int],
        groups: int,
        same_pad: bool = False,
    ) -> str | None:
        if same_pad:
            return "odconv does not implement timm's run-time TF-'SAME' padding"
        if isinstance(padding, str) and padding not in ("same", "valid"):
            return f"unsupported padding {padding!r}"
        return None

    @classmethod
    def parameter_count(
        cls,
        *,
        in_channels: int,
        out_channels: int,
        kernel_size: _IntOrPair,
        groups: int,
        bias: bool,
        experts: int,
        reduction: int,
    ) -> int:
        """The number of parameters of the layer these arguments build (exact)."""
        kh, kw = _pair(kernel_size)
        hidden = odconv_hidden_width(in_channels, reduction)
        routing = sum(odconv_sections(in_channels, out_channels, (kh, kw), groups, experts))
        kernels = experts * out_channels * (in_channels // groups) * kh * kw
        attention = in_channels * hidden + (hidden + 1) * routing
        return kernels + (out_channels if bias else 0) + attention

    # -- construction -----------------------------------------------------------------

    def reset_parameters(self, *, generator: torch.Generator | None = None) -> None:
        """The reference's from-scratch initialisation: every expert
        ``kaiming_normal_(mode='fan_out', nonlinearity='relu')``, the attention likewise
        (:meth:`ODAttention.reset_parameters`); the bias as ``nn.Conv2d`` draws it."""
        if self.weight.is_meta:
            return
        with torch.no_grad():
            fan_out = self.out_channels * self.kernel_size[0] * self.kernel_size[1]
            self.weight.copy_(_kaiming_fan_out(self.weight, fan_out, generator))
            if self.bias is not None:
                fan_in = self.weight[0].numel() // self.out_channels
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                b = _drawable(self.bias, generator).uniform_(-bound, bound, generator=generator)
                self.bias.copy_(b)
        self.attention.reset_parameters(generator=generator)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        *,
        num_experts: int = 4,
        reduction: int = DEFAULT_REDUCTION,
        temperature: float = 1.0,
        init: ODInit = "upcycle",
        routing_std: float | None = None,
        weight: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        max_kernel_bytes: int = DEFAULT_MAX_KERNEL_BYTES,
    ) -> ODConv2d:
        """An ODConv layer with ``conv``'s geometry, initialised as ``init`` says.

        ``init`` (see :data:`OD_INITS`):

        - ``"upcycle"`` (default): the layer computes exactly what ``conv`` computes, in
          training and evaluation mode, for every input, and routes once trained. The
          sigmoid heads (channel, filter, spatial) are zero, so every gate is exactly 1/2
          whatever the input and the temperature, and every expert is ``2^n`` times the
          kernel, n being the number of those gates the layer has (3 for a k x k conv, 2
          for a 1x1 or a depthwise one, 1 for a 1x1 depthwise): powers of two are exact in
          binary floating point. The kernel head (K > 1) is random, N(0, ``routing_std``^2)
          (default ``DEFAULT_ROUTING_STD``, DY-CNN's measured value) with a zero bias: its
          softmax weights sum to 1, so the mixture of identical experts is the same kernel
          for every input, while each expert's gradient is weighted differently per
          sample, which separates the experts from the first step (zero-sum perturbations
          with a uniform softmax instead give every expert the same gradient until the
          heads have moved, and DY-CNN's measurement found that start does not route).
          The gates' heads get non-zero gradients from the first step (``fc`` is random),
          the shared ``fc`` from the second. The bias is copied (it is added after the
          filter attention).
        - ``"scratch"``: the reference's from-scratch initialisation
          (:meth:`reset_parameters`); only ``conv``'s geometry is used.

        Args:
            conv: the source ``nn.Conv2d``.
            routing_std: standard deviation of the kernel head at creation (``"upcycle"``).
            weight: the effective kernel when it differs from ``conv.weight`` (timm's
                weight-standardised convs).
            generator: random generator for every random draw (reproducible conversions).
        """
        if not isinstance(conv, nn.Conv2d):
            raise DynifyTypeError(f"from_conv expects an nn.Conv2d, got {type(conv).__name__}")
        if init not in OD_INITS:
            raise DynifyError(f"init must be one of {OD_INITS}, got {init!r}")
        if weight is None and init != "scratch" and type(conv).forward is not nn.Conv2d.forward:
            raise DynifyTypeError(
                f"{type(conv).__name__} overrides Conv2d.forward, so its kernel or padding is not "
                "what conv.weight says; pass the effective weight= (or use dynify.apply, which "
                "handles timm's conv variants)"
            )
        if routing_std is None:
            routing_std = DEFAULT_ROUTING_STD
        if not (math.isfinite(routing_std) and routing_std >= 0):
            raise DynifyError(f"routing_std must be a finite number >= 0, got {routing_std}")
        source = checked_kernel(conv, weight)
        layer = cls(
            **conv_arguments(conv),
            device="meta",
            dtype=source.dtype,
            num_experts=num_experts,
            reduction=reduction,
            temperature=temperature,
            max_kernel_bytes=max_kernel_bytes,
        ).to_empty(device=source.device)
        with torch.no_grad():
            if init == "scratch":
                layer.reset_parameters(generator=generator)
            else:
                scale = 2.0 ** sum(1 for s in layer.attention.sections[:3] if s)
                layer.weight.copy_(source.detach().unsqueeze(0).expand_as(layer.weight))
                layer.weight.mul_(scale)
                if conv.bias is not None:
                    assert layer.bias is not None
                    layer.bias.copy_(conv.bias.detach())
                layer.attention.reset_routing(std=routing_std, generator=generator)
            layer.attention.temperature.fill_(float(temperature))
        layer.train(conv.training)
        return layer

    # -- the routing ------------------------------------------------------------------

    def split_routing(
        self, routing: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``routing`` ``(B, D)`` as (channel, filter, spatial, kernel) attentions, ``None``
        for the parts this layer does not have."""
        parts: list[torch.Tensor | None] = []
        start = 0
        for size in self.attention.sections:
            parts.append(routing[:, start : start + size] if size else None)
            start += size
        channel, filt, spatial, kernel = parts
        assert channel is not None
        return channel, filt, spatial, kernel

    def expert_weights(self, routing: torch.Tensor) -> torch.Tensor | None:
        return self.split_routing(routing)[3]

    def expert_kernels(self) -> torch.Tensor:
        return self.weight

    # -- forward ----------------------------------------------------------------------

    def forward_routed(self, x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        """The convolution with the attentions ``routing`` ``(B, D)`` instead of the
        attention's (what the routing diagnostics use to freeze a layer's routing)."""
        channel, filt, spatial, kernel = self.split_routing(routing)
        # Scaling a channel commutes with every padding mode (they copy within a channel).
        scaled = x * channel[:, :, None, None]
        return od_conv2d(
            _keep_layout(self._pad(scaled), x),
            kernel,
            spatial,
            filt,
            self.weight,
            self.bias,
            self.stride,
            self._conv_padding(),
            self.dilation,
            self.groups,
            self.max_kernel_bytes,
        )

    # -- shipping ---------------------------------------------------------------------

    def sample_kernels(self, routing: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``a_f[o] a_c[i] a_s[t] sum_k a_w,k W_k[o, i, t]`` per sample, the bias as it is."""
        channel, filt, spatial, kernel = self.split_routing(routing)
        b, g = routing.shape[0], self.groups
        if kernel is None:
            kernels = self.weight[0].unsqueeze(0).expand(b, *self.weight.shape[1:])
        else:
            kernels = (kernel @ self.weight.flatten(1)).unflatten(1, self.weight.shape[1:])
        c_out, c_in_g, kh, kw = self.weight.shape[1:]
        # Output channel o (group o // (C_out / g)) reads input channels of its own group.
        per_input = channel.reshape(b, g, 1, c_in_g).expand(b, g, c_out // g, c_in_g)
        kernels = kernels * per_input.reshape(b, c_out, c_in_g, 1, 1)
        if spatial is not None:
            kernels = kernels * spatial.reshape(b, 1, 1, kh, kw)
        if filt is not None:
            kernels = kernels * filt.reshape(b, c_out, 1, 1, 1)
        bias = None if self.bias is None else self.bias.expand(b, -1)
        return kernels, bias

    def forward_portable(self, x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        kernels, bias = self.sample_kernels(routing)
        return per_sample_conv2d(
            self._pad(x), kernels, bias, self.stride, self._conv_padding(), self.dilation,
            self.groups,
        )  # fmt: skip

    @torch.no_grad()
    def fuse_affine_(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """``W_k <- scale * W_k`` and ``b <- scale * b + shift``: exact under any attention,
        since every attention multiplies the kernel and the bias is added after them."""
        scale, shift = _checked_affine(self, scale, shift)
        self.weight.mul_(scale.view(1, -1, 1, 1, 1))
        if self.bias is None:
            self.bias = nn.Parameter(torch.zeros_like(shift))
        self.bias.mul_(scale).add_(shift)

    @torch.no_grad()
    def drop_experts_(self, keep: Sequence[int]) -> None:
        """The kernel attention over the experts kept is the softmax over their logits
        (the heads' rows kept), their weights renormalised; keeping one expert removes the
        kernel attention (a softmax over one logit is 1), as a K = 1 layer has none."""
        index = _kept(self, keep)
        self.weight = nn.Parameter(self.weight[index].clone())
        att = self.attention
        s = att.num_sigmoid
        rows = list(range(s)) + ([s + i for i in index] if len(index) > 1 else [])
        heads = att.heads
        new = nn.Linear(
            heads.in_features, len(rows), device=heads.weight.device, dtype=heads.weight.dtype
        )
        new.weight.copy_(heads.weight[rows])
        new.bias.copy_(heads.bias[rows])
        att.heads = new
        att.sections = (*att.sections[:3], len(index) if len(index) > 1 else 0)
        self.num_experts = len(index)

    def extra_repr(self) -> str:
        return (
            conv_geometry_repr(self)
            + f", num_experts={self.num_experts}, reduction={self.reduction}"
        )

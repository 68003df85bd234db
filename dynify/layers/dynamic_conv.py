"""DynamicConv2d: K expert kernels mixed per sample by an attention, then one convolution.

Chen et al., "Dynamic Convolution: Attention over Convolution Kernels", CVPR 2020 (DY-CNN),
with CondConv's sigmoid routing (Yang et al., 2019) as an option.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair, _reverse_repeat_tuple

from dynify.errors import DynifyError, DynifyTypeError
from dynify.layers._functional import DEFAULT_MAX_KERNEL_BYTES, dynamic_conv2d
from dynify.layers.attention import (
    ATTENTION_KINDS,
    AttentionKind,
    KernelAttention,
    _drawable,
    _reset_linear,
)
from dynify.layers.base import DynamicLayer
from dynify.layers.portable import per_sample_conv2d

__all__ = [
    "DEFAULT_ROUTING_STD",
    "EXPERT_INITS",
    "PADDING_MODES",
    "DynamicConv2d",
    "ExpertInit",
]

# How from_conv starts the experts and the attention (see DynamicConv2d.from_conv).
ExpertInit = Literal["upcycle", "scratch", "perturb"]
EXPERT_INITS: tuple[str, ...] = ("upcycle", "scratch", "perturb")
# Standard deviation of the random attention's last layer under init="upcycle", chosen by
# measurement (bench/routing.py, bench/README.md "Routing").
DEFAULT_ROUTING_STD = 1.0
# The "perturb" init's expert noise (relative to the kernel's std), as the seed had it.
DEFAULT_NOISE = 0.01

PADDING_MODES: tuple[str, ...] = ("zeros", "reflect", "replicate", "circular")

# fx sees the dispatching function as one opaque call, so tracing never branches on a Proxy.
torch.fx.wrap("dynamic_conv2d")

_IntOrPair = int | tuple[int, int]


class DynamicConv2d(DynamicLayer):
    """A drop-in for ``nn.Conv2d`` whose kernel is a per-sample mixture of ``num_experts``.

    ``W(x) = sum_k pi_k(x) W_k`` and ``b(x) = sum_k pi_k(x) b_k``, where ``pi(x)`` comes from a
    :class:`~dynify.layers.KernelAttention` (global average pool, Linear, ReLU, Linear,
    softmax(z / T) or sigmoid(z / T)); then ``y = conv2d(x, W(x), b(x))``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
        padding_mode, device, dtype: exactly as for ``nn.Conv2d`` (padding may be an int, a
            pair, ``"same"`` or ``"valid"``).
        num_experts: K, the number of expert kernels (>= 1).
        reduction: r; the attention's hidden width is ``max(in_channels // r, 4)``.
        attention: ``"softmax"`` (DY-CNN) or ``"sigmoid"`` (CondConv).
        temperature: initial softmax temperature T (a buffer; see ``temperature``).
        max_kernel_bytes: at most this many bytes of mixed kernels exist at once in eager
            mode (the batch is processed in chunks), which bounds the layer's extra memory.

    Shapes: input ``(B, C_in, H, W)``, output ``(B, C_out, H_out, W_out)`` as for
    ``nn.Conv2d``; channels_last input gives channels_last output.

    Parameters: ``weight`` ``(K, C_out, C_in // groups, kh, kw)``, ``bias`` ``(K, C_out)``,
    and the attention's ``attention.fc1`` / ``attention.fc2``.

    Kinds: ``dycnn`` (softmax attention) and ``condconv`` (sigmoid); the routing is the
    ``(B, K)`` expert weights.
    """

    KINDS = ("dycnn", "condconv")

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
        reduction: int = 4,
        attention: AttentionKind = "softmax",
        temperature: float = 1.0,
        max_kernel_bytes: int = DEFAULT_MAX_KERNEL_BYTES,
    ) -> None:
        super().__init__()
        set_conv_geometry(self, in_channels, out_channels, kernel_size, stride, padding,
                          dilation, groups, padding_mode)  # fmt: skip
        _check_positive("num_experts", num_experts)
        _check_positive("reduction", reduction)
        if attention not in ATTENTION_KINDS:
            raise DynifyError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        self.num_experts = num_experts
        self.reduction = reduction
        self.max_kernel_bytes = int(max_kernel_bytes)
        # Explicit (left, right, top, bottom) padding applied with F.pad before the
        # convolution: for non-zero modes, and for "same" when the total is odd.
        self._pre_pad = self._pre_padding()

        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty(
                num_experts, out_channels, in_channels // groups, *self.kernel_size, **factory
            )
        )
        self.bias = (
            nn.Parameter(torch.empty(num_experts, out_channels, **factory)) if bias else None
        )
        # A constant bias added after the mixture: only a BatchNorm fused into a sigmoid
        # (CondConv) layer needs one (see fuse_affine_).
        self.static_bias: nn.Parameter | None
        self.register_parameter("static_bias", None)
        self.attention = KernelAttention(
            in_channels,
            num_experts,
            reduction=reduction,
            kind=attention,
            temperature=temperature,
            **factory,
        )
        self.reset_parameters()

    # -- construction -----------------------------------------------------------------

    def _pre_padding(self) -> tuple[int, ...] | None:
        if self.padding == "same":
            totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size, strict=True)]
            lr = []
            for total in reversed(totals):  # F.pad wants the last dimension first
                lr += [total // 2, total - total // 2]
            symmetric = all(t % 2 == 0 for t in totals)
            if symmetric and self.padding_mode == "zeros":
                return None
            return tuple(lr)
        if self.padding_mode == "zeros":
            return None
        return tuple(_reverse_repeat_tuple(self.padding, 2))

    def _conv_padding(self) -> tuple[int, int]:
        if self._pre_pad is not None:
            return (0, 0)
        if self.padding == "same":
            return tuple(
                d * (k - 1) // 2 for d, k in zip(self.dilation, self.kernel_size, strict=True)
            )  # type: ignore[return-value]
        return self.padding  # type: ignore[return-value]

    def reset_parameters(self, *, generator: torch.Generator | None = None) -> None:
        """Initialise every expert independently as ``nn.Conv2d`` initialises its kernel, and
        the attention as ``nn.Linear`` initialises itself (DY-CNN's from-scratch setting)."""
        if self.weight.is_meta:  # built to be overwritten (from_conv)
            return
        with torch.no_grad():
            # nn.Conv2d's kaiming_uniform_(a=sqrt 5) for each expert, drawn as one tensor: the
            # same numbers as a loop over the experts (one generator, drawn in order), without
            # one Python call per expert.
            fan_in = self.weight[0][0].numel()
            bound = nn.init.calculate_gain("leaky_relu", math.sqrt(5)) * math.sqrt(3.0 / fan_in)
            kernels = _drawable(self.weight, generator)
            self.weight.copy_(kernels.uniform_(-bound, bound, generator=generator))
            if self.bias is not None:
                fan_in = self.weight[0].numel() // self.out_channels
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                bias = _drawable(self.bias, generator)
                self.bias.copy_(bias.uniform_(-bound, bound, generator=generator))
        self.attention.reset_parameters(generator=generator)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        *,
        num_experts: int = 4,
        reduction: int = 4,
        attention: AttentionKind = "softmax",
        temperature: float = 1.0,
        init: ExpertInit = "upcycle",
        routing_std: float = DEFAULT_ROUTING_STD,
        noise: float | None = None,
        weight: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        max_kernel_bytes: int = DEFAULT_MAX_KERNEL_BYTES,
    ) -> DynamicConv2d:
        """Build a dynamic layer with ``conv``'s geometry, initialised as ``init`` says.

        ``init`` (see :data:`EXPERT_INITS`):

        - ``"upcycle"`` (default): every expert is a copy of ``conv``'s kernel and the
          attention is random (:meth:`KernelAttention.reset_routing`, last layer
          N(0, ``routing_std``^2)), with weights that sum to the same constant for every
          input. The mixture of identical experts is the kernel whatever the attention says,
          so the layer computes exactly what ``conv`` computes; and because the attention
          differs per sample, each expert's gradient is weighted differently and the experts
          separate from the first step. (Zeroing the attention instead gives every expert
          the same gradient: they never separate and the attention never learns.)
        - ``"scratch"``: the DY-CNN paper's setting for training from scratch: K experts
          initialised independently as ``nn.Conv2d`` initialises a kernel and a default
          ``nn.Linear`` attention. Only ``conv``'s geometry is used; the function changes.
        - ``"perturb"``: the original seed's start, kept for comparison: experts are the
          kernel plus zero-sum noise (``noise`` x the kernel's std, default 0.01) and the
          attention's last layer is zero (uniform). Exact at creation, but measured not to
          route under training (bench/README.md, "Routing").

        Under sigmoid attention (mean weight 1/2) the experts are scaled by ``2 / K`` so that
        the mixture is the kernel.

        Args:
            conv: the source convolution (an ``nn.Conv2d``; subclasses are read through
                their ``weight`` and padding attributes).
            routing_std: standard deviation of the random attention's last layer
                (``"upcycle"``).
            noise: perturbation size relative to the kernel's standard deviation
                (``"perturb"`` only); ``0`` makes identical copies.
            weight: the effective kernel to start from when it differs from
                ``conv.weight`` (e.g. a weight-standardised conv's standardised kernel).
            generator: random generator for every random draw (reproducible conversions).
        """
        if not isinstance(conv, nn.Conv2d):
            raise DynifyTypeError(f"from_conv expects an nn.Conv2d, got {type(conv).__name__}")
        if init not in EXPERT_INITS:
            raise DynifyError(f"init must be one of {EXPERT_INITS}, got {init!r}")
        if weight is None and init != "scratch" and type(conv).forward is not nn.Conv2d.forward:
            raise DynifyTypeError(
                f"{type(conv).__name__} overrides Conv2d.forward, so its kernel or padding is not "
                "what conv.weight says; pass the effective weight= (or use dynify.apply, which "
                "handles timm's conv variants)"
            )
        if noise is not None and init != "perturb" and noise != 0:
            raise DynifyError(
                f"noise applies to init='perturb' only, got noise={noise} with {init!r}"
            )
        if noise is None:
            noise = DEFAULT_NOISE if init == "perturb" else 0.0
        if noise < 0:
            raise DynifyError(f"noise must be >= 0, got {noise}")
        if not (math.isfinite(routing_std) and routing_std >= 0):
            raise DynifyError(f"routing_std must be a finite number >= 0, got {routing_std}")
        source = conv.weight if weight is None else weight
        # Built on the meta device and then given real storage: the experts are written
        # below, so a default initialisation of K kernels would be wasted work.
        layer = cls(
            **conv_arguments(conv),
            device="meta",
            dtype=source.dtype,
            num_experts=num_experts,
            reduction=reduction,
            attention=attention,
            temperature=temperature,
            max_kernel_bytes=max_kernel_bytes,
        ).to_empty(device=source.device)
        with torch.no_grad():
            if init == "scratch":
                layer.reset_parameters(generator=generator)
            else:
                scale = 1.0 / (num_experts * layer.attention.value_at_zero())
                _init_experts(
                    layer.weight, source.detach(), noise=noise, scale=scale, generator=generator
                )
                if conv.bias is not None:
                    assert layer.bias is not None
                    layer.bias.copy_(scale * conv.bias.detach().unsqueeze(0).expand_as(layer.bias))
                if init == "upcycle":
                    layer.attention.reset_routing(std=routing_std, generator=generator)
                else:
                    _reset_linear(layer.attention.fc1, generator)
                    nn.init.zeros_(layer.attention.fc2.weight)
                    nn.init.zeros_(layer.attention.fc2.bias)
            layer.attention.temperature.fill_(float(temperature))
        layer.train(conv.training)
        return layer

    @property
    def kind(self) -> str:
        return "dycnn" if self.attention.kind == "softmax" else "condconv"

    def expert_weights(self, routing: torch.Tensor) -> torch.Tensor:
        return routing

    def expert_kernels(self) -> torch.Tensor:
        return self.weight

    # -- forward ----------------------------------------------------------------------

    def forward_routed(self, x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        """The convolution with given expert weights ``routing`` ``(B, K)`` instead of the
        attention's (what the routing diagnostics use to freeze a layer's routing)."""
        out = dynamic_conv2d(
            _keep_layout(self._pad(x), x),
            routing,
            self.weight,
            self.bias,
            self.stride,
            self._conv_padding(),
            self.dilation,
            self.groups,
            self.max_kernel_bytes,
        )
        if self.static_bias is not None:
            out = out + self.static_bias[:, None, None]
        return out

    # -- shipping ---------------------------------------------------------------------

    def sample_kernels(self, routing: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # A matrix product, not an einsum: onnxruntime's Einsum is slow at batch 1.
        kernels = (routing @ self.weight.flatten(1)).unflatten(1, self.weight.shape[1:])
        bias = None if self.bias is None else routing @ self.bias
        if self.static_bias is not None:
            fixed = self.static_bias.expand(routing.shape[0], -1)
            bias = fixed if bias is None else bias + fixed
        return kernels, bias

    def forward_portable(self, x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        kernels, bias = self.sample_kernels(routing)
        return per_sample_conv2d(
            self._pad(x), kernels, bias, self.stride, self._conv_padding(), self.dilation,
            self.groups,
        )  # fmt: skip

    @torch.no_grad()
    def fuse_affine_(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """``W_k <- scale * W_k`` for every expert (exact under any attention: the mixture
        is linear in the experts). The shift goes into every expert's bias under softmax,
        whose weights sum to 1 for every input, so ``sum_k pi_k (b_k + shift) = b(x) +
        shift``; sigmoid weights do not sum to a constant, so there the shift is a bias of
        its own (``static_bias``), added after the mixture."""
        scale, shift = _checked_affine(self, scale, shift)
        self.weight.mul_(scale.view(1, -1, 1, 1, 1))
        if self.attention.kind == "softmax":
            if self.bias is None:
                self.bias = nn.Parameter(torch.zeros_like(self.weight[:, :, 0, 0, 0]))
            self.bias.mul_(scale).add_(shift)
            return
        if self.bias is not None:
            self.bias.mul_(scale)
        if self.static_bias is None:
            self.static_bias = nn.Parameter(torch.zeros_like(shift))
        self.static_bias.mul_(scale).add_(shift)

    @torch.no_grad()
    def drop_experts_(self, keep: Sequence[int]) -> None:
        """Under softmax the attention over the experts kept is the softmax over their
        logits (``fc2``'s rows kept), i.e. their weights renormalised to sum to 1; under
        sigmoid each weight is its own, and the dropped experts' share is simply gone."""
        index = _kept(self, keep)
        self.weight = nn.Parameter(self.weight[index].clone())
        if self.bias is not None:
            self.bias = nn.Parameter(self.bias[index].clone())
        fc2 = self.attention.fc2
        new = nn.Linear(
            fc2.in_features, len(index), device=fc2.weight.device, dtype=fc2.weight.dtype
        )
        new.weight.copy_(fc2.weight[index])
        new.bias.copy_(fc2.bias[index])
        self.attention.fc2 = new
        self.attention.num_experts = self.num_experts = len(index)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """Padding the convolution itself cannot do (non-zero modes, odd 'same' totals)."""
        if self._pre_pad is None:
            return x
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, self._pre_pad, mode=mode)

    def extra_repr(self) -> str:
        return conv_geometry_repr(self) + (
            f", num_experts={self.num_experts}, reduction={self.reduction}"
        )


def _init_experts(
    experts: torch.Tensor,
    kernel: torch.Tensor,
    *,
    noise: float,
    scale: float,
    generator: torch.Generator | None,
) -> None:
    """``experts[k] = scale * (kernel + eps_k)`` with ``sum_k eps_k = 0``.

    ``eps`` is uniform noise of standard deviation ``noise * std(kernel)``, centred over
    the experts. Uniform rather than Gaussian: it is twice as fast to draw, and converting
    resnet50 draws 94 million of them.
    """
    num_experts = experts.shape[0]
    if noise == 0 or num_experts == 1:
        experts.copy_(kernel.unsqueeze(0).expand_as(experts)).mul_(scale)
        return
    std = float(kernel.float().std()) if kernel.numel() > 1 else float(kernel.float().abs())
    bound = math.sqrt(3.0)  # U(-sqrt 3, sqrt 3) has unit variance
    eps = _drawable(experts, generator)
    eps.uniform_(-bound, bound, generator=generator)
    eps = eps.to(experts.device)
    eps.sub_(eps.mean(dim=0, keepdim=True))
    experts.copy_(eps).mul_(noise * std * scale).add_(kernel.unsqueeze(0), alpha=scale)


def _keep_layout(padded: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``padded`` in ``x``'s memory layout.

    Circular padding (a cat of slices) returns a contiguous tensor even for a channels_last
    input, which would make the layer's output contiguous too; the other modes keep the
    layout, so this is a no-op for them. fx-wrapped: it inspects strides, not values.
    """
    if padded is not x and x.is_contiguous(memory_format=torch.channels_last):
        return padded.contiguous(memory_format=torch.channels_last)
    return padded


torch.fx.wrap("_keep_layout")


def set_conv_geometry(
    layer: nn.Module,
    in_channels: int,
    out_channels: int,
    kernel_size: _IntOrPair,
    stride: _IntOrPair,
    padding: _IntOrPair | str,
    dilation: _IntOrPair,
    groups: int,
    padding_mode: str,
) -> None:
    """Check the ``nn.Conv2d`` arguments every kind of dynamic layer takes, with
    ``nn.Conv2d``'s rules and one-line errors, and set them on ``layer`` (``in_channels``,
    ``out_channels``, ``kernel_size``, ``stride``, ``dilation`` and ``padding`` as pairs,
    ``padding`` ``'same'`` kept as such, ``groups``, ``padding_mode``)."""
    _check_positive("in_channels", in_channels)
    _check_positive("out_channels", out_channels)
    _check_positive("groups", groups)
    if in_channels % groups:
        raise DynifyError(f"in_channels ({in_channels}) must be divisible by groups ({groups})")
    if out_channels % groups:
        raise DynifyError(f"out_channels ({out_channels}) must be divisible by groups ({groups})")
    if padding_mode not in PADDING_MODES:
        raise DynifyError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    layer.in_channels = in_channels
    layer.out_channels = out_channels
    layer.kernel_size = _pair(kernel_size)
    layer.stride = _pair(stride)
    layer.dilation = _pair(dilation)
    for name in ("kernel_size", "stride", "dilation"):
        for v in getattr(layer, name):
            _check_positive(name, v)
    layer.groups = groups
    layer.padding_mode = padding_mode
    layer.padding = _parse_padding(padding, layer.stride)


def conv_arguments(conv: nn.Conv2d) -> dict[str, Any]:
    """The ``nn.Conv2d`` constructor arguments that rebuild ``conv``'s geometry (what a
    kind's ``from_conv`` passes on)."""
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": conv.kernel_size,
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "groups": conv.groups,
        "bias": conv.bias is not None,
        "padding_mode": conv.padding_mode,
    }


def checked_kernel(conv: nn.Conv2d, weight: torch.Tensor | None) -> torch.Tensor:
    """The kernel a ``from_conv`` starts from: ``weight`` (the one ``conv`` really
    convolves with, e.g. timm's standardised one) when given, of ``conv``'s kernel shape."""
    source = conv.weight if weight is None else weight
    if tuple(source.shape) != tuple(conv.weight.shape):
        raise DynifyError(
            f"weight has shape {tuple(source.shape)}, the conv's kernel {tuple(conv.weight.shape)}"
        )
    return source


def conv_geometry_repr(layer: nn.Module) -> str:
    """The ``nn.Conv2d``-style part of a dynamic layer's ``extra_repr``."""
    s = (
        f"{layer.in_channels}, {layer.out_channels}, kernel_size={layer.kernel_size}, "
        f"stride={layer.stride}"
    )
    if layer.padding != (0, 0):
        s += f", padding={layer.padding}"
    if layer.dilation != (1, 1):
        s += f", dilation={layer.dilation}"
    if layer.groups != 1:
        s += f", groups={layer.groups}"
    if layer.bias is None:
        s += ", bias=False"
    if layer.padding_mode != "zeros":
        s += f", padding_mode={layer.padding_mode}"
    return s


def _parse_padding(padding: _IntOrPair | str, stride: tuple[int, int]) -> tuple[int, int] | str:
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise DynifyError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
        if padding == "same" and any(s != 1 for s in stride):
            raise DynifyError("padding='same' is not supported for strided convolutions")
        return padding if padding == "same" else (0, 0)
    pad = _pair(padding)
    if any(p < 0 for p in pad):
        raise DynifyError(f"padding must be >= 0, got {padding}")
    return pad


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DynifyError(f"{name} must be a positive integer, got {value!r}")


def _checked_affine(
    layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale`` and ``shift`` checked to be ``(C_out,)``, on the layer's device and dtype."""
    c_out = layer.out_channels
    for name, t in (("scale", scale), ("shift", shift)):
        if tuple(t.shape) != (c_out,):
            raise DynifyError(f"{name} must have shape ({c_out},), got {tuple(t.shape)}")
    weight = layer.weight
    return scale.to(weight.device, weight.dtype), shift.to(weight.device, weight.dtype)


def _kept(layer: DynamicLayer, keep: Sequence[int]) -> list[int]:
    """``keep`` checked to be distinct expert indices of ``layer``, at least one."""
    index = [int(k) for k in keep]
    k = layer.num_experts
    if not index or len(set(index)) != len(index) or any(not 0 <= i < k for i in index):
        raise DynifyError(
            f"keep must list distinct expert indices from 0 to {k - 1}, at least one; got {index}"
        )
    return index

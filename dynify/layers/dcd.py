"""DCDConv2d: dynamic convolution by matrix decomposition (DCD).

Li et al., "Revisiting Dynamic Convolution via Matrix Decomposition", ICLR 2021
(reference code: github.com/liyunsheng13/dcd).

The per-sample kernel is ``W(x) = Lambda(x) W0 + P (I + Phi(x)) Q^T``: a static kernel W0
whose output channels are scaled by ``Lambda(x)`` (C_out values in [0, 2]), plus a
dynamic channel fusion in a latent space of L = ``rank`` channels, placed at the kernel's
centre tap (``Q^T``: C_in -> L, ``Phi(x)``: L x L per sample, ``P``: L -> C_out). As in the
reference code, the kernel is never built: everything runs on feature maps,

    y = Lambda(x) * conv(x, W0) + P ((I + Phi(x)) (Q^T x)) + b,

where ``Q^T`` and ``P`` act as 1x1 convolutions (``Q^T`` on the input subsampled at the main
conv's stride) and ``b`` is the conv's bias (not scaled by Lambda). On maps with more
positions than output channels the residual folds ``A = P (I + Phi)`` (C_out x L per
sample) and computes ``A z + b``; on small maps it mixes the latent map ``(I + Phi) z``
and applies ``P`` (see :func:`folds_mix`; either way no per-sample kernel). The 1x1 path
samples the main conv's centre tap only when the padding is 'same'-style
(``2 * padding == dilation * (kernel - 1)``, odd kernel): see
:meth:`DCDConv2d.unsupported_reason`.

Deviations from the reference code (``conv_dy`` in ``models/imagenet/resnet_dcd.py``):

- no BatchNorm after ``Q^T`` nor after ``Phi z``: the layer is batch-independent (it trains
  at batch 1 and computes the same in train and eval mode), and ``from_conv`` can start
  exactly at the original conv's function with every factor learning from the first step;
- the identity in the latent space (``I + Phi``) is kept, so ``P Q^T`` is a static
  low-rank term of the kernel, which ``from_conv`` folds out of W0 (see there);
- the squeeze width is ``max(in_channels // reduction, 4)`` (the reference has no minimum
  in ``conv_dy``) and the rank defaults to ``floor(sqrt(in_channels))`` as there, clamped
  to ``[1, min(in_channels, out_channels)]``;
- the conv's bias, when it has one, is added unscaled (the reference convs have none).

The attention is the reference's: global average pool, Linear(C_in -> S, no bias), the
reference's ``SEModule_small`` gate ``h * hsig(Linear(S -> S, no bias)(h))``, then two heads
without bias, ``Lambda = hsig(Linear(S -> C_out))`` and ``Phi = Linear(S -> L^2)``, with
``hsig(z) = relu6(z + 3) / 3`` (range [0, 2], exactly 1 at 0; not ``nn.Hardsigmoid``, which
is half of it). No temperature.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair, _reverse_repeat_tuple

from dynify.errors import DynifyError, DynifyTypeError
from dynify.layers.attention import MIN_HIDDEN, _drawable, _reset_linear
from dynify.layers.base import DynamicLayer
from dynify.layers.dynamic_conv import (
    _check_positive,
    _checked_affine,
    checked_kernel,
    conv_arguments,
    conv_geometry_repr,
    set_conv_geometry,
)

__all__ = ["DCD_INITS", "DCDAttention", "DCDConv2d", "dcd_rank", "dcd_squeeze", "folds_mix"]

_IntOrPair = int | tuple[int, int]

# How from_conv starts the layer (see DCDConv2d.from_conv).
DCDInit = Literal["exact", "scratch"]
DCD_INITS: tuple[str, ...] = ("exact", "scratch")


def dcd_squeeze(in_channels: int, reduction: int) -> int:
    """S, the attention's hidden width: ``max(in_channels // reduction, 4)``."""
    return max(in_channels // reduction, MIN_HIDDEN)


def dcd_rank(in_channels: int, out_channels: int, rank: int | None = None) -> int:
    """L, the latent width: ``rank``, or ``floor(sqrt(in_channels))`` (the reference's),
    clamped to ``[1, min(in_channels, out_channels)]``."""
    value = math.isqrt(in_channels) if rank is None else rank
    return max(1, min(value, in_channels, out_channels))


def _hsig(z: torch.Tensor) -> torch.Tensor:
    """The reference's ``Hsigmoid``: ``relu6(z + 3) / 3`` (range [0, 2], 1 at 0)."""
    return F.relu6(z + 3.0) / 3.0


class DCDAttention(nn.Module):
    """DCD's per-sample routing: ``[Lambda(x), Phi(x) flattened]``, shape ``(B, C_out + L^2)``.

    Global average pool -> ``fc`` (C_in -> S) -> ``h * hsig(se(h))`` -> ``fc_scale``
    (S -> C_out, then hsig) and ``fc_phi`` (S -> L^2, linear). All four are bias-free
    ``nn.Linear`` layers, as in the reference. ``Phi`` is row-major: ``Phi[i, j]`` is
    column ``C_out + i * L + j``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rank: int,
        squeeze: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.out_channels = out_channels
        self.rank = rank
        self.fc = nn.Linear(in_channels, squeeze, bias=False, **factory)
        self.se = nn.Linear(squeeze, squeeze, bias=False, **factory)
        self.fc_scale = nn.Linear(squeeze, out_channels, bias=False, **factory)
        self.fc_phi = nn.Linear(squeeze, rank * rank, bias=False, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A sum, then a divide of the (B, C) result: mean's backward would materialise a
        # full (B, C, H, W) gradient (a divide); sum's is an expanded view.
        pooled = x.sum(dim=(2, 3)) / (x.shape[2] * x.shape[3])
        # F.linear on the parameters rather than module calls (cheaper; see KernelAttention).
        h = F.linear(pooled, self.fc.weight)
        h = h * _hsig(F.linear(h, self.se.weight))
        scale = _hsig(F.linear(h, self.fc_scale.weight))
        phi = F.linear(h, self.fc_phi.weight)
        return torch.cat([scale, phi], dim=1)

    def reset_parameters(self, *, generator: torch.Generator | None = None) -> None:
        """Every layer as ``nn.Linear`` initialises itself (the reference's ResNet keeps
        that default)."""
        for linear in (self.fc, self.se, self.fc_scale, self.fc_phi):
            _reset_linear(linear, generator)


class DCDConv2d(DynamicLayer):
    """A drop-in for ``nn.Conv2d`` (groups 1, 'same'-style padding) computing DCD.

    ``y = Lambda(x) * conv(x, W0) + P ((I + Phi(x)) (Q^T x)) + b`` (see the module
    documentation), which is the convolution with the per-sample kernel
    ``Lambda(x) W0 + P (I + Phi(x)) Q^T`` (the low-rank term at the centre tap).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device, dtype: as for ``nn.Conv2d``; the configuration must be
            covered (:meth:`unsupported_reason` is ``None``), else a :class:`DynifyError`.
        rank: L, the latent width (default ``floor(sqrt(in_channels))``; clamped to
            ``[1, min(in_channels, out_channels)]``).
        reduction: r; the attention's hidden width is ``max(in_channels // r, 4)``.

    Shapes: input ``(B, C_in, H, W)``, output as ``nn.Conv2d``'s; channels_last input gives
    channels_last output.

    Parameters: ``weight`` (W0, ``(C_out, C_in, kh, kw)``), ``bias`` ``(C_out,)``, ``q``
    (``Q^T``, ``(L, C_in, 1, 1)``), ``p`` (``P``, ``(C_out, L, 1, 1)``), and the attention's
    ``fc``, ``se``, ``fc_scale``, ``fc_phi``.

    Kind ``dcd``; the routing is ``(B, C_out + L^2)``: Lambda, then Phi flattened.
    """

    KINDS = ("dcd",)

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
        rank: int | None = None,
        reduction: int = 16,
    ) -> None:
        super().__init__()
        set_conv_geometry(self, in_channels, out_channels, kernel_size, stride, padding,
                          dilation, groups, padding_mode)  # fmt: skip
        _check_positive("reduction", reduction)
        if rank is not None:
            _check_positive("rank", rank)
        reason = self.unsupported_reason(
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=padding if isinstance(padding, str) else self.padding,
            dilation=self.dilation,
            groups=groups,
        )
        if reason is not None:
            raise DynifyError(f"DCDConv2d: {reason}")
        self.reduction = reduction
        self.rank = dcd_rank(in_channels, out_channels, rank)
        self.squeeze = dcd_squeeze(in_channels, reduction)
        # 'same' here is always symmetric (odd kernel): the conv's own padding.
        self._pad_hw = tuple(
            d * (k - 1) // 2 for d, k in zip(self.dilation, self.kernel_size, strict=True)
        )
        self._pre_pad = (
            None
            if padding_mode == "zeros"
            else tuple(_reverse_repeat_tuple(self._pad_hw, 2))  # F.pad order
        )

        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels, *self.kernel_size, **factory)
        )
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.q = nn.Parameter(torch.empty(self.rank, in_channels, 1, 1, **factory))
        self.p = nn.Parameter(torch.empty(out_channels, self.rank, 1, 1, **factory))
        self.attention = DCDAttention(in_channels, out_channels, self.rank, self.squeeze, **factory)
        self.reset_parameters()

    # -- coverage and size, before anything is built ----------------------------------------

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
        """``None`` for a groups-1 conv whose padding centres the kernel on the output grid
        (``2 * padding == dilation * (kernel - 1)`` per axis with an odd kernel, i.e. 1x1
        with padding 0 at any stride, 3x3 with padding 1, 5x5 dilation 2 with padding 4,
        ``'same'``); otherwise why DCD's 1x1 centre-tap residual cannot reproduce it."""
        kernel, dil = _pair(kernel_size), _pair(dilation)
        if groups != 1:
            what = "depthwise" if groups == in_channels else "grouped"
            return (
                f"DCD covers groups=1 only (its residual mixes all input channels); "
                f"this conv is {what} (groups={groups})"
            )
        if same_pad:
            return (
                "DCD does not cover timm's run-time TF-'SAME' padding (input-dependent, "
                "so its 1x1 residual cannot sample the kernel's centre)"
            )
        if any(k % 2 == 0 for k in kernel):
            return f"DCD needs an odd kernel (its residual sits at the centre tap), got {kernel}"
        if padding == "same":
            if any(st != 1 for st in _pair(stride)):
                return "padding='same' is not supported for strided convolutions"
            return None  # an odd kernel: symmetric, centred
        pad = (0, 0) if padding == "valid" else _pair(padding)
        want = tuple(d * (k - 1) // 2 for d, k in zip(dil, kernel, strict=True))
        if tuple(pad) != want:
            return (
                f"DCD needs 'same'-style padding (2*padding == dilation*(kernel-1), here "
                f"padding={want}) so that its 1x1 residual samples the kernel's centre; "
                f"got padding={padding!r}"
            )
        return None

    @classmethod
    def parameter_count(
        cls,
        *,
        in_channels: int,
        out_channels: int,
        kernel_size: _IntOrPair,
        groups: int = 1,
        bias: bool,
        reduction: int = 16,
        rank: int | None = None,
    ) -> int:
        """The parameters the built layer has (exact): W0, bias, Q, P and the attention."""
        kh, kw = _pair(kernel_size)
        c_in, c_out = in_channels, out_channels
        big_l = dcd_rank(c_in, c_out, rank)
        s = dcd_squeeze(c_in, reduction)
        conv = c_out * (c_in // groups) * kh * kw + (c_out if bias else 0)
        low_rank = big_l * c_in + c_out * big_l
        attention = c_in * s + s * s + s * c_out + s * big_l * big_l
        return conv + low_rank + attention

    # -- construction -----------------------------------------------------------------

    def reset_parameters(self, *, generator: torch.Generator | None = None) -> None:
        """Training from scratch: W0, Q and P as ``nn.Conv2d`` initialises its kernel, the
        bias likewise, the attention as ``nn.Linear`` does. The function is not any
        particular conv's (use :meth:`from_conv` for that)."""
        if self.weight.is_meta:  # built to be overwritten (from_conv)
            return
        with torch.no_grad():
            for w in (self.weight, self.q, self.p):
                _kaiming_conv_(w, generator)
            if self.bias is not None:
                fan_in = self.weight[0].numel()
                bound = 1 / math.sqrt(fan_in)
                b = _drawable(self.bias, generator)
                self.bias.copy_(b.uniform_(-bound, bound, generator=generator))
        self.attention.reset_parameters(generator=generator)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        *,
        rank: int | None = None,
        reduction: int = 16,
        init: DCDInit = "exact",
        weight: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        **kw: object,
    ) -> DCDConv2d:
        """A DCD layer with ``conv``'s geometry, started as ``init`` says.

        - ``"exact"`` (default): computes exactly ``conv``'s function (any input, train
          and eval mode) while every factor learns from the first step. Both heads are
          zero (``Lambda == 1``, ``Phi == 0`` for every input; hsig's slope at 0 is 1/3, so
          they get gradients), ``Q`` and ``P`` are drawn as ``nn.Conv2d`` draws a fresh 1x1
          kernel (non-zero, so ``P``, ``Q`` and the ``Phi`` head get gradients), and the
          static low-rank term is folded out of the kernel: ``W0 = W - P Q^T`` at the
          centre tap (computed in float64), so ``W0 + P Q^T == W`` up to one rounding.
          The attention's ``fc`` and ``se`` get their first gradient at step 2 (both heads
          being zero at step 1).
        - ``"scratch"``: :meth:`reset_parameters` (only ``conv``'s geometry is used).

        Args:
            conv: the source convolution (an ``nn.Conv2d`` that :meth:`unsupported_reason`
                accepts).
            rank, reduction: as for the constructor.
            weight: the effective kernel when it differs from ``conv.weight`` (e.g. timm's
                weight-standardised convs).
            generator: random generator for every draw (reproducible conversions).
            kw: any other keyword is a :class:`DynifyError` naming it (the dynamic-conv
                kinds' ``num_experts``, ``attention``, ``temperature``, ... do not apply).
        """
        if kw:
            raise DynifyError(
                f"DCDConv2d.from_conv does not take {', '.join(sorted(kw))} (kind 'dcd' has "
                "no experts, attention kind or temperature)",
                arguments=tuple(sorted(kw)),
            )
        if not isinstance(conv, nn.Conv2d):
            raise DynifyTypeError(f"from_conv expects an nn.Conv2d, got {type(conv).__name__}")
        if init not in DCD_INITS:
            raise DynifyError(f"init must be one of {DCD_INITS}, got {init!r}")
        if weight is None and init != "scratch" and type(conv).forward is not nn.Conv2d.forward:
            raise DynifyTypeError(
                f"{type(conv).__name__} overrides Conv2d.forward, so its kernel or padding is not "
                "what conv.weight says; pass the effective weight= (or use dynify.apply, which "
                "handles timm's conv variants)"
            )
        source = checked_kernel(conv, weight)
        layer = cls(
            **conv_arguments(conv),
            device="meta",
            dtype=source.dtype,
            rank=rank,
            reduction=reduction,
        ).to_empty(device=source.device)
        with torch.no_grad():
            if init == "scratch":
                layer.reset_parameters(generator=generator)
            else:
                _kaiming_conv_(layer.q, generator)
                _kaiming_conv_(layer.p, generator)
                att = layer.attention
                _reset_linear(att.fc, generator)
                _reset_linear(att.se, generator)
                nn.init.zeros_(att.fc_scale.weight)
                nn.init.zeros_(att.fc_phi.weight)
                w0 = source.detach().to(torch.float64).clone()
                p, q = (t.detach().double().flatten(1) for t in (layer.p, layer.q))
                low_rank = p @ q  # P Q^T: (C_out, C_in)
                ch, cw = ((k - 1) // 2 for k in layer.kernel_size)
                w0[:, :, ch, cw] -= low_rank
                layer.weight.copy_(w0)
                if conv.bias is not None:
                    assert layer.bias is not None
                    layer.bias.copy_(conv.bias.detach())
        layer.train(conv.training)
        return layer

    # -- the DynamicLayer protocol ------------------------------------------------------

    def forward_routed(self, x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        """The output with ``routing`` ``(B, C_out + L^2)`` (``[Lambda, Phi]``) in place of
        the attention's."""
        c_out = self.out_channels
        scale = routing[:, :c_out, None, None]
        phi = routing[:, c_out:].unflatten(1, (self.rank, self.rank))
        if self._pre_pad is None:
            main = F.conv2d(x, self.weight, None, self.stride, self._pad_hw, self.dilation)
        else:
            mode = self.padding_mode
            xp = _keep_layout(F.pad(x, self._pre_pad, mode=mode), x)
            main = F.conv2d(xp, self.weight, None, self.stride, 0, self.dilation)
        residual = _low_rank_residual(x, self.q, self.p, phi, self.bias, self.stride)
        return torch.addcmul(residual, main, scale)

    # -- shipping ---------------------------------------------------------------------

    def sample_kernels(self, routing: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``Lambda(x) W0 + P (I + Phi(x)) Q^T`` (the low-rank term at the centre tap) per
        sample; the bias as it is (DCD does not scale it)."""
        c_out, b = self.out_channels, routing.shape[0]
        scale = routing[:, :c_out]
        phi = routing[:, c_out:].unflatten(1, (self.rank, self.rank))
        p, q = self.p.flatten(1), self.q.flatten(1)  # (C_out, L), (L, C_in)
        low_rank = p @ q + torch.matmul(p, torch.matmul(phi, q))  # (B, C_out, C_in)
        kernels = self.weight.unsqueeze(0) * scale[:, :, None, None, None]
        ch, cw = ((k - 1) // 2 for k in self.kernel_size)
        centre = torch.zeros_like(kernels)
        centre[:, :, :, ch, cw] = low_rank
        bias = None if self.bias is None else self.bias.expand(b, -1)
        return kernels + centre, bias

    def forward_portable(self, x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        # Already batch-independent: a static conv, batched products on the feature maps.
        return self.forward_routed(x, routing)

    @torch.no_grad()
    def fuse_affine_(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """``W0 <- scale * W0``, ``P <- scale * P`` (row-wise) and ``b <- scale * b + shift``:
        exact, since both terms of the kernel are linear in their output rows."""
        scale, shift = _checked_affine(self, scale, shift)
        self.weight.mul_(scale.view(-1, 1, 1, 1))
        self.p.mul_(scale.view(-1, 1, 1, 1))
        if self.bias is None:
            self.bias = nn.Parameter(torch.zeros_like(shift))
        self.bias.mul_(scale).add_(shift)

    # -- display --------------------------------------------------------------------------

    def extra_repr(self) -> str:
        return conv_geometry_repr(self) + f", rank={self.rank}, reduction={self.reduction}"


def folds_mix(out_channels: int, positions: int) -> bool:
    """Whether the residual folds ``P (I + Phi)`` into one per-sample ``C_out x L`` matrix
    (``C_out L^2`` MACs per image) rather than mixing the latent map (``L^2 N``): when the
    map has more positions ``N`` than the layer has output channels."""
    return positions > out_channels


def _low_rank_residual(
    x: torch.Tensor,
    q: torch.Tensor,
    p: torch.Tensor,
    phi: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
) -> torch.Tensor:
    """``P (I + Phi) Q^T x + b`` on the centre-tap grid.

    ``z = Q^T x`` on the input subsampled at the stride, then either ``A z + b`` with the
    per-sample ``A = P (I + Phi)`` (large maps, :func:`folds_mix`) or ``P ((I + Phi) z) + b``
    (small maps). In ``x``'s memory layout: for channels_last everything runs pixel-major
    (``z^T = x^T Q``, one ``mm``), whose result is channels_last again; otherwise as
    batched products. fx-wrapped: it inspects strides.
    """
    b, c_in, c_out = x.shape[0], x.shape[1], p.shape[0]
    q2, p2 = q.flatten(1), p.flatten(1)  # (L, C_in), (C_out, L)
    sh, sw = stride
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        xs = x.permute(0, 2, 3, 1)[:, ::sh, ::sw]  # (B, H', W', C_in)
        h, w = xs.shape[1], xs.shape[2]
        zt = (xs.reshape(-1, c_in) @ q2.t()).unflatten(0, (b, h * w))  # (B, N, L)
        if folds_mix(c_out, h * w):
            p_t = p2.t().expand(b, -1, -1)  # (B, L, C_out)
            mix_t = torch.baddbmm(p_t, phi.transpose(1, 2), p_t)  # P^T + Phi^T P^T
            out = torch.bmm(zt, mix_t) if bias is None else torch.baddbmm(bias, zt, mix_t)
        else:
            ut = torch.baddbmm(zt, zt, phi.transpose(1, 2)).flatten(0, 1)  # (B N, L)
            out = F.linear(ut, p2, bias).unflatten(0, (b, h * w))
        return out.unflatten(1, (h, w)).permute(0, 3, 1, 2)
    # Batched products with the shared Q and P expanded over the batch: measured faster on
    # CPU than 1x1 convolutions, whose backward is slow for few (L) channels.
    xs = x[:, :, ::sh, ::sw]
    h, w = xs.shape[2], xs.shape[3]
    z = torch.bmm(q2.expand(b, -1, -1), xs.reshape(b, c_in, h * w))  # (B, L, N)
    p_b = p2.expand(b, -1, -1)  # (B, C_out, L)
    if folds_mix(c_out, h * w):
        a, z = torch.baddbmm(p_b, p_b, phi), z  # A = P + P Phi
    else:
        a, z = p_b, torch.baddbmm(z, phi, z)  # (I + Phi) z
    out = torch.bmm(a, z) if bias is None else torch.baddbmm(bias[:, None], a, z)
    return out.unflatten(2, (h, w))


torch.fx.wrap("_low_rank_residual")


def _keep_layout(padded: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``padded`` in ``x``'s memory layout (circular padding returns a contiguous tensor)."""
    if padded is not x and x.is_contiguous(memory_format=torch.channels_last):
        return padded.contiguous(memory_format=torch.channels_last)
    return padded


torch.fx.wrap("_keep_layout")


def _kaiming_conv_(weight: torch.Tensor, generator: torch.Generator | None) -> None:
    """``nn.Conv2d``'s kernel init (kaiming_uniform a=sqrt 5: U(+-1/sqrt(fan_in))) drawn
    from ``generator``."""
    fan_in = weight[0].numel()
    bound = nn.init.calculate_gain("leaky_relu", math.sqrt(5)) * math.sqrt(3.0 / fan_in)
    w = _drawable(weight, generator)
    weight.copy_(w.uniform_(-bound, bound, generator=generator))

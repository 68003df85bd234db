"""The portable formulation: each kind's function with ops whose shapes never involve the batch.

The eager fast paths fold the batch into the group count of one convolution (``groups = B *
groups``), which is the fastest way to convolve every sample with its own kernel on CPU and
GPU but bakes the batch size into a traced graph: ONNX's ``Conv`` takes its ``group`` as a
constant attribute (onnx/onnx#3843). Under :func:`portable`, every dynamic layer computes the
same function as a batched matrix product instead: the per-sample kernels
(:meth:`~dynify.layers.base.DynamicLayer.sample_kernels`) times the input unfolded by
strided slicing (:func:`per_sample_conv2d`), so an exported graph has a symbolic batch.

It costs the convolution's MACs once (not K times, as K expert convolutions mixed afterwards
would) plus the unfolded input, ``kh * kw`` times the input's size; it is what
``dynify export`` traces, never the eager path. The alternative that keeps onnxruntime's
Conv kernels, the K experts as one grouped conv with the outputs mixed afterwards, was
measured slower for every dense conv and level for depthwise ones (``bench/portable.py``,
bench/README.md "Export"), so this one formulation serves every layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from timm.utils import unwrap_model
from torch import nn

from dynify.layers.base import DynamicLayer

__all__ = ["per_sample_conv2d", "portable"]


def per_sample_conv2d(
    x: torch.Tensor,
    kernels: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> torch.Tensor:
    """Convolve each sample with its own kernel, without a batch-dependent group count.

    Args:
        x: ``(B, C_in, H, W)``, already padded for non-zero padding modes.
        kernels: ``(B, C_out, C_in // groups, kh, kw)``.
        bias: ``(B, C_out)`` or ``None``.
        stride, padding, dilation, groups: as for ``F.conv2d`` (symmetric zero padding).

    Returns:
        ``(B, C_out, H_out, W_out)``: ``F.conv2d(x[b:b+1], kernels[b], bias[b], ...)`` for
        every ``b``, computed as one batched product.
    """
    c_in = x.shape[1]
    c_out, c_in_g, kh, kw = kernels.shape[1:]
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    out_h = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    # Each kernel tap's view of the input, stacked after the channel so that the columns
    # are ordered as a flattened (C_in // groups, kh, kw) kernel is.
    span_h, span_w = (out_h - 1) * sh + 1, (out_w - 1) * sw + 1
    taps = [
        x[:, :, i * dh : i * dh + span_h : sh, j * dw : j * dw + span_w : sw]
        for i in range(kh)
        for j in range(kw)
    ]
    cols = taps[0].unsqueeze(2) if len(taps) == 1 else torch.stack(taps, dim=2)
    cols = cols.reshape(-1, groups, (c_in // groups) * kh * kw, out_h * out_w)
    per_group = c_out // groups
    weights = kernels.reshape(-1, groups, per_group, c_in_g * kh * kw)
    if per_group == 1:  # depthwise: a product of tiny matrices is slower than mul + sum
        out = (weights.transpose(2, 3) * cols).sum(dim=2, keepdim=True)
    else:
        out = torch.matmul(weights, cols)
    out = out.reshape(-1, c_out, out_h, out_w)
    if bias is not None:
        out = out + bias[:, :, None, None]
    return out


@contextlib.contextmanager
def portable(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every dynamic layer of ``model`` (wrappers seen through) computes
    its function with the portable formulation (see the module documentation); each layer's
    own setting comes back afterwards. Yields ``model``."""
    layers = [m for m in unwrap_model(model).modules() if isinstance(m, DynamicLayer)]
    before = [m.__dict__.get("portable") for m in layers]
    for m in layers:
        m.portable = True
    try:
        yield model
    finally:
        for m, value in zip(layers, before, strict=True):
            if value is None:
                m.__dict__.pop("portable", None)
            else:
                m.portable = value

"""The dynamic convolution itself: ``y_b = conv(x_b, sum_k r_bk W_k)``, computed fast and exactly.

Three exact formulations, chosen by batch size and shape (see ``choose_strategy``):

``single``
    Batch of one: mix one kernel and run one ordinary convolution. Nothing can beat it.
``folded``
    Fold the batch into the channel axis and run one grouped convolution with
    ``groups = B * groups`` (the seed's and timm's CondConv trick). Best for grouped and
    depthwise layers, where per-sample calls would each do very little work.
``per_sample``
    Mix the kernels of a chunk with one matrix product, then one ordinary convolution per
    sample. For dense layers oneDNN runs each of those at full speed, whereas a grouped
    convolution with hundreds of large groups does not (measured here at B=32: 2.3x a static
    conv on 512 channels at 7x7 against 2.7-16x folded; 1.1x against 1.5x on the RGB stem).

Memory: the mixed kernels (B x C_out x C_in x kh x kw numbers) are what make dynamic layers
run out of memory at training batch sizes: 302 MB at B=32 for one 512-channel 3x3 layer.
Eager mode therefore mixes at most ``max_kernel_bytes`` of kernels at a time and, under
autograd, saves only the input and the routing weights: the backward pass re-mixes each
chunk's kernels (a cheap matrix product) instead of keeping them all alive. The extra memory
of a converted layer is thus bounded by a constant, not by the batch size.

Under ``torch.compile`` / ``torch.export`` (symbolic batch size) the plain folded
formulation is used: it is traceable with a dynamic batch dimension and the compiler plans
the memory itself.
"""

from __future__ import annotations

import threading
from typing import Literal

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = [
    "DEFAULT_MAX_KERNEL_BYTES",
    "Strategy",
    "choose_strategy",
    "dynamic_conv2d",
    "mix_kernels",
]

Strategy = Literal["single", "folded", "per_sample"]

# Mixed kernels held at once per layer call. Each chunk's mixing re-reads all K experts, so
# chunks of only a few samples make deep layers memory-bound: on 512 channels at 7x7, B=32,
# forward, 64 MiB (7 samples a chunk) measured 2.6x a static conv against 3.3x at 32 MiB
# (3 a chunk) and 2.5x unchunked (bench/layer.py, one thread). The kernels live in a reused
# scratch buffer (see ``_Scratch``), so the chunk size no longer has to suit glibc.
DEFAULT_MAX_KERNEL_BYTES = 64 * 2**20

# The backward pass's kernel gradients are fresh tensors from convolution_backward, and glibc
# serves blocks of 32 MiB or more with mmap on every call (page faults: 512@7, B=32, fwd+bwd
# went from 3.6x to 4.5x a static conv with 64 MiB chunks), so backward chunks stay below.
_BACKWARD_MAX_KERNEL_BYTES = 32 * 2**20 - 2**20

# Below this many multiply-accumulates per sample, a Python loop of convolutions costs more
# in call overhead than the grouped convolution loses in efficiency.
_PER_SAMPLE_MIN_MACS = 2_000_000


class _Scratch(threading.local):
    """Per-thread scratch buffers for mixed kernels, one per dtype (CPU only).

    Mixed kernels are temporaries that the convolution consumes at once, yet allocating
    them afresh on every call is what made dynamic layers slow on CPU: glibc serves big
    blocks with mmap or trims them off the top of the heap when they are freed, so every
    call page-faults its kernels back in. Measured here (one thread, B=1, plain malloc):
    256 channels at 14x14 went from 2.4x to 1.2x a static conv, 512 at 7x7 from 4.6x to 2.0x.
    The buffer grows to the largest chunk seen (at most ``max_kernel_bytes``, or one
    sample's kernel if that is larger) and is kept for the thread's lifetime.
    """

    def __init__(self) -> None:
        self.buffers: dict[torch.dtype, torch.Tensor] = {}


_SCRATCH = _Scratch()

# Below glibc's default mmap threshold small blocks come from the heap's free lists at no
# page-fault cost, and a fresh tensor is cheaper than the scratch's bookkeeping (~4 us).
_SCRATCH_MIN_BYTES = 128 * 2**10


def _scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    buf = _SCRATCH.buffers.get(dtype)
    if buf is None or buf.numel() < numel:
        _SCRATCH.buffers.pop(dtype, None)  # free the old buffer before allocating the new
        # A normal tensor even when first needed inside inference_mode, so that later calls
        # outside it may still write into it.
        with torch.inference_mode(False):
            buf = torch.empty(numel, dtype=dtype)
        _SCRATCH.buffers[dtype] = buf
    return buf[:numel]


def mix_kernels(
    routing: torch.Tensor, weight: torch.Tensor, *, reuse: bool = False
) -> torch.Tensor:
    """``(B, K) x (K, *kernel) -> (B, *kernel)``: each sample's weighted sum of the experts.

    With ``reuse=True`` the result may live in a per-thread scratch buffer that the next
    call overwrites: only for kernels consumed before the next mix and never saved by
    autograd (the request is ignored when autograd would record the product, on non-CPU
    devices and under autocast).
    """
    k = weight.shape[0]
    flat = weight.reshape(k, -1)
    n = routing.shape[0]
    if (
        reuse
        and n * flat.shape[1] * weight.element_size() >= _SCRATCH_MIN_BYTES
        and weight.device.type == "cpu"
        and routing.device.type == "cpu"
        and routing.dtype == weight.dtype
        and not (torch.is_grad_enabled() and (routing.requires_grad or weight.requires_grad))
        and not torch.is_autocast_enabled("cpu")
    ):
        out = _scratch(n * flat.shape[1], weight.dtype).view(n, flat.shape[1])
        torch.mm(routing, flat, out=out)
        return out.view(n, *weight.shape[1:])
    return (routing @ flat).reshape(n, *weight.shape[1:])


def choose_strategy(
    batch: int, weight_shape: torch.Size | tuple[int, ...], out_hw: tuple[int, int], groups: int
) -> Strategy:
    """Pick the fastest exact formulation for an eager call (measured on CPU, see module doc)."""
    if batch == 1:
        return "single"
    _, c_out, c_in_per_group, kh, kw = weight_shape
    macs_per_sample = c_out * c_in_per_group * kh * kw * out_hw[0] * out_hw[1]
    if groups == 1 and macs_per_sample >= _PER_SAMPLE_MIN_MACS:
        return "per_sample"
    return "folded"


def _chunk_size(batch: int, weight: torch.Tensor, max_kernel_bytes: int) -> int:
    per_sample = weight[0].numel() * weight.element_size()
    return max(1, min(batch, max_kernel_bytes // max(per_sample, 1)))


def _conv_chunk(
    x: torch.Tensor,
    kernels: torch.Tensor,
    strategy: Strategy,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> torch.Tensor:
    """Convolve each sample of ``x`` (n, C, H, W) with its own kernel ``kernels[i]``."""
    n = x.shape[0]
    if strategy == "per_sample":
        return torch.cat(
            [
                F.conv2d(x[i : i + 1], kernels[i], None, stride, padding, dilation, groups)
                for i in range(n)
            ]
        )
    _, c_out, c_in_g, kh, kw = kernels.shape
    folded = x.reshape(1, n * x.shape[1], x.shape[2], x.shape[3])
    out = F.conv2d(
        folded,
        kernels.reshape(n * c_out, c_in_g, kh, kw),
        None,
        stride,
        padding,
        dilation,
        groups * n,
    )
    return out.reshape(n, c_out, out.shape[-2], out.shape[-1])


def _conv_chunk_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    kernels: torch.Tensor,
    strategy: Strategy,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    need_input_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Gradients of ``_conv_chunk`` with respect to its input and its per-sample kernels."""
    mask = [need_input_grad, True, False]
    n = x.shape[0]
    if strategy == "per_sample":
        grads_x = []
        # one chunk-sized buffer rather than a list of per-sample gradients then a stack
        grad_w = kernels.new_empty(kernels.shape)
        for i in range(n):
            gx, gw, _ = torch.ops.aten.convolution_backward(
                grad_out[i : i + 1],
                x[i : i + 1],
                kernels[i],
                None,
                stride,
                padding,
                dilation,
                False,
                [0, 0],
                groups,
                mask,
            )
            grads_x.append(gx)
            grad_w[i] = gw
        grad_x = torch.cat(grads_x) if need_input_grad else None
        return grad_x, grad_w
    _, c_out, c_in_g, kh, kw = kernels.shape
    gx, gw, _ = torch.ops.aten.convolution_backward(
        grad_out.reshape(1, n * c_out, grad_out.shape[2], grad_out.shape[3]),
        x.reshape(1, n * x.shape[1], x.shape[2], x.shape[3]),
        kernels.reshape(n * c_out, c_in_g, kh, kw),
        None,
        stride,
        padding,
        dilation,
        False,
        [0, 0],
        groups * n,
        mask,
    )
    grad_x = gx.reshape(x.shape) if need_input_grad else None
    return grad_x, gw.reshape(kernels.shape)


def _chunked_forward(
    x: torch.Tensor,
    routing: torch.Tensor,
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
        kernels = mix_kernels(routing[part], weight, reuse=True)
        outs.append(_conv_chunk(x[part], kernels, strategy, stride, padding, dilation, groups))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


class _DynamicConvFunction(torch.autograd.Function):
    """Chunked dynamic convolution that re-mixes kernels in backward instead of saving them."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        routing: torch.Tensor,
        weight: torch.Tensor,
        strategy: Strategy,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
        max_kernel_bytes: int,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, routing, weight)
        ctx.conf = (strategy, stride, padding, dilation, groups, max_kernel_bytes)
        return _chunked_forward(
            x, routing, weight, strategy, stride, padding, dilation, groups, max_kernel_bytes
        )

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, routing, weight = ctx.saved_tensors
        strategy, stride, padding, dilation, groups, max_kernel_bytes = ctx.conf
        need_x, need_routing, need_weight = ctx.needs_input_grad[:3]
        # Under autocast the forward computed in a lower precision (grad_out's dtype) than
        # the saved float32 tensors; backward runs outside autocast, so cast explicitly (a
        # no-op without autocast). Gradients are accumulated in each input's own dtype.
        dtype = grad_out.dtype
        k = weight.shape[0]
        flat_weight = weight.reshape(k, -1)
        weight_c = weight.to(dtype)
        flat_weight_c = flat_weight.to(dtype)
        batch = x.shape[0]
        chunk = _chunk_size(batch, weight, min(max_kernel_bytes, _BACKWARD_MAX_KERNEL_BYTES))
        single = chunk >= batch  # one chunk: its input gradient is the whole one, no copy
        grad_x = torch.empty_like(x) if need_x and not single else None
        grad_routing = torch.empty_like(routing) if need_routing else None
        grad_weight = torch.zeros_like(flat_weight) if need_weight else None
        grad_out = grad_out.contiguous(memory_format=_memory_format_of(x))
        for start in range(0, batch, chunk):
            part = slice(start, min(start + chunk, batch))
            kernels = mix_kernels(routing[part].to(dtype), weight_c, reuse=True)
            gx, gw = _conv_chunk_backward(
                grad_out[part],
                x[part].to(dtype),
                kernels,
                strategy,
                stride,
                padding,
                dilation,
                groups,
                need_x,
            )
            gw = gw.reshape(gw.shape[0], -1)
            if need_x and single:
                grad_x = gx.to(x.dtype)
            elif grad_x is not None:
                grad_x[part] = gx
            if grad_routing is not None:
                grad_routing[part] = gw @ flat_weight_c.t()
            if grad_weight is not None:
                grad_weight.addmm_(routing[part].t().to(weight.dtype), gw.to(weight.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.reshape(weight.shape)
        return grad_x, grad_routing, grad_weight, None, None, None, None, None, None


def _memory_format_of(x: torch.Tensor) -> torch.memory_format:
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.channels_last
    return torch.contiguous_format


def _is_symbolic(x: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() or not isinstance(x.shape[0], int)


def dynamic_conv2d(
    x: torch.Tensor,
    routing: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    max_kernel_bytes: int = DEFAULT_MAX_KERNEL_BYTES,
) -> torch.Tensor:
    """Per-sample dynamic convolution.

    Args:
        x: input ``(B, C_in, H, W)``, already padded for non-zero padding modes.
        routing: expert weights ``(B, K)``.
        weight: experts ``(K, C_out, C_in // groups, kh, kw)``.
        bias: expert biases ``(K, C_out)`` or ``None``.
        stride, padding, dilation, groups: as for ``F.conv2d`` (symmetric zero padding).
        max_kernel_bytes: eager mode mixes at most this many bytes of kernels at once.

    Returns:
        ``(B, C_out, H_out, W_out)``, channels_last when ``x`` is channels_last.
    """
    batch = x.shape[0]
    if _is_symbolic(x):
        kernels = mix_kernels(routing, weight)
        out = _conv_chunk(x, kernels, "folded", stride, padding, dilation, groups)
    elif batch == 1:
        # reuse only takes effect when autograd does not record the product (eval)
        kernel = mix_kernels(routing, weight, reuse=True)[0]
        mixed_bias = None if bias is None else (routing @ bias)[0]
        return F.conv2d(x, kernel, mixed_bias, stride, padding, dilation, groups)
    else:
        out_hw = _output_hw(x, weight, stride, padding, dilation)
        strategy = choose_strategy(batch, weight.shape, out_hw, groups)
        args = (strategy, stride, padding, dilation, groups, max_kernel_bytes)
        if torch.is_grad_enabled() and (
            x.requires_grad or routing.requires_grad or weight.requires_grad
        ):
            out = _DynamicConvFunction.apply(x, routing, weight, *args)
        else:
            out = _chunked_forward(x, routing, weight, *args)
    if bias is not None:
        out = out + (routing @ bias)[:, :, None, None]
    return out.contiguous(memory_format=_memory_format_of(x))


def _output_hw(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int]:
    kh, kw = weight.shape[-2:]
    h = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return h, w

"""The dynamic convolution itself: ``y_b = conv(x_b, sum_k r_bk W_k)``, computed fast and exactly.

Four exact formulations, chosen by batch size and shape (see ``choose_strategy``):

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
``stacked``
    For tiny output maps (the deep layers of a network fed 32x32 images): run all K experts
    as one convolution with K * C_out outputs, then mix the outputs, ``y_b = sum_k r_bk
    (W_k * x_b)``. It does K times a static conv's multiply-accumulates, but reads each
    expert once per batch instead of writing and re-reading one kernel per sample, which is
    what dominates when a kernel has as many numbers as its output map has positions times
    few (see ``_STACKED_MAX_EXTRA_POSITIONS``). Plain autograd ops: nothing to chunk.

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
    "runs_stacked",
]

Strategy = Literal["single", "folded", "per_sample", "stacked"]

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

# PyTorch sends a batch-of-one float32 convolution with a kernel of at most 3x3 and an input
# of at most 20480 numbers to its reference kernel (THNN, im2col + matrix product) rather
# than oneDNN. That loses to the folded grouped conv for narrow layers but still wins for
# wide ones, whose kernels make the grouped conv inefficient. Measured here (B=64, fwd+bwd,
# per-sample vs folded): 64 channels at 16x16 63 vs 47 ms, 96 at 12x12
# 84 vs 72; 128 at 8x8 95 vs 124, 256 at 8x8 322 vs 408.
_ONEDNN_MIN_INPUT_NUMEL = 20480
_THNN_PER_SAMPLE_MIN_KERNEL_NUMEL = 2**17

# ``stacked`` costs (K - 1) * H_out * W_out more MACs per kernel number than mixing, whereas
# mixing costs a memory-bound write and re-read of every kernel number per sample. Measured
# here (one thread, B=64, K=4, fwd+bwd, best mixing formulation -> stacked): 512 channels at
# 1x1 692 -> 77 ms, 256 at 2x2 299 -> 47 ms, 128 at 4x4 74 -> 29 ms; at 8x8 (K-1)*64 = 192
# extra and mixing wins again (29 vs 32 ms). Small kernels (< 128 KiB) stay in cache when
# mixed, so they keep the mixing formulations, which do the fewest operations.
_STACKED_MAX_EXTRA_POSITIONS = 48
_STACKED_MIN_KERNEL_NUMEL = 2**15


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


def runs_stacked(
    batch: int, experts: int, kernel_numel: int, out_positions: int, groups: int
) -> bool:
    """Whether an eager call of ``batch`` samples uses the ``stacked`` formulation.

    ``kernel_numel`` is one expert's size, ``out_positions`` is H_out * W_out. The cost model
    asks this too: ``stacked`` runs K convolutions' worth of MACs and mixes outputs.
    """
    return (
        batch > 1
        and groups == 1
        and kernel_numel >= _STACKED_MIN_KERNEL_NUMEL
        and (experts - 1) * out_positions <= _STACKED_MAX_EXTRA_POSITIONS
    )


def choose_strategy(
    batch: int,
    weight_shape: torch.Size | tuple[int, ...],
    in_hw: tuple[int, int],
    out_hw: tuple[int, int],
    groups: int,
) -> Strategy:
    """Pick the fastest exact formulation for an eager call (measured on CPU, see module doc).

    ``weight_shape`` is the experts' ``(K, C_out, C_in // groups, kh, kw)``.
    """
    if batch == 1:
        return "single"
    k, c_out, c_in_per_group, kh, kw = weight_shape
    kernel_numel = c_out * c_in_per_group * kh * kw
    positions = out_hw[0] * out_hw[1]
    if runs_stacked(batch, k, kernel_numel, positions, groups):
        return "stacked"
    macs_per_sample = kernel_numel * positions
    on_onednn = (kh > 3 and kw > 3) or (
        c_in_per_group * groups * in_hw[0] * in_hw[1] > _ONEDNN_MIN_INPUT_NUMEL
    )
    if (
        groups == 1
        and macs_per_sample >= _PER_SAMPLE_MIN_MACS
        and (on_onednn or kernel_numel >= _THNN_PER_SAMPLE_MIN_KERNEL_NUMEL)
    ):
        return "per_sample"
    return "folded"


def _stacked(
    x: torch.Tensor,
    routing: torch.Tensor,
    weight: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> torch.Tensor:
    """``sum_k r_bk (W_k * x_b)``: one convolution with every expert, then mix the outputs."""
    k, c_out = weight.shape[:2]
    if groups == 1:
        # (K, C_out, ...) -> (K * C_out, ...) is a view: the experts are read in place
        stacked = weight.reshape(k * c_out, *weight.shape[2:])
    else:  # a grouped conv's outputs must be group-major: (g, K, C_out / g)
        stacked = weight.reshape(k, groups, c_out // groups, *weight.shape[2:]).transpose(0, 1)
        stacked = stacked.reshape(k * c_out, *weight.shape[2:])
    outs = F.conv2d(x, stacked, None, stride, padding, dilation, groups)
    b, _, h, w = outs.shape
    r = routing.to(outs.dtype)
    if groups == 1:
        mixed = torch.bmm(r.unsqueeze(1), outs.reshape(b, k, c_out * h * w))
    else:
        per_group = outs.reshape(b, groups, k, (c_out // groups) * h * w)
        mixed = (per_group * r.view(b, 1, k, 1)).sum(2)
    return mixed.view(b, c_out, h, w)


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
        strategy = choose_strategy(batch, weight.shape, (x.shape[2], x.shape[3]), out_hw, groups)
        args = (strategy, stride, padding, dilation, groups, max_kernel_bytes)
        if strategy == "stacked":
            out = _stacked(x, routing, weight, stride, padding, dilation, groups)
        elif torch.is_grad_enabled() and (
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

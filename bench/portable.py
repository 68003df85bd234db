"""Which batch-independent formulation of a mixture of experts onnxruntime runs fastest.

One DynamicConv2d (K=4, r=4) per shape, exported to ONNX with a dynamic batch in three
forms, timed side by side in one process under onnxruntime (CPU, thread spinning off so
that sessions taking turns do not steal each other's cores): the static ``nn.Conv2d`` of
the same shape, the *unfolded* product (``dynify.layers.portable.per_sample_conv2d``: the
input unfolded by strided slicing times the per-sample kernels) and the *experts* form
(:func:`expert_conv2d` here: the K experts as one conv, the outputs mixed).
Prints each form's median time as a multiple of the static conv's, at batch 1 and 8; both
dynamic forms are checked against the eager layer first.

    python bench/portable.py                    # see bench/README.md, "Export"
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
import warnings

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from dynify.layers import DynamicConv2d
from dynify.layers.portable import portable

SHAPES = {  # name: (C_in, C_out, kernel, groups, side)
    "3x3-64@56": (64, 64, 3, 1, 56),
    "1x1-256>64@56": (256, 64, 1, 1, 56),
    "3x3-256@14": (256, 256, 3, 1, 14),
    "dw-144@56": (144, 144, 3, 144, 56),
    "dw-576@7": (576, 576, 3, 576, 7),
}


def expert_conv2d(
    x: torch.Tensor,
    routing: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> torch.Tensor:
    """``sum_k routing[:, k] * conv2d(x, weight[k]) + routing @ bias``: a mixture of experts
    as one convolution with every expert's filters (K times the output channels), then the
    outputs mixed per sample; exact, since a convolution is linear in its kernel.

    Args:
        x: ``(B, C_in, H, W)``, already padded for non-zero padding modes.
        routing: ``(B, K)``; weight: ``(K, C_out, C_in // groups, kh, kw)``; bias:
            ``(K, C_out)`` or ``None``; the rest as for ``F.conv2d``.
    """
    k, c_out, c_in_g, kh, kw = weight.shape
    per_group = c_out // groups
    # Group g's filters, every expert's, side by side: the conv keeps groups = groups.
    filters = weight.reshape(k, groups, per_group, c_in_g, kh, kw).transpose(0, 1)
    out = F.conv2d(x, filters.reshape(groups * k * per_group, c_in_g, kh, kw), None, stride,
                   padding, dilation, groups)  # fmt: skip
    h, w = out.shape[2], out.shape[3]
    out = out.reshape(-1, groups, k, per_group, h, w) * routing.reshape(-1, 1, k, 1, 1, 1)
    out = out.sum(dim=2).reshape(-1, c_out, h, w)
    if bias is not None:
        out = out + (routing @ bias)[:, :, None, None]
    return out


class _Experts(nn.Module):
    def __init__(self, layer: DynamicConv2d) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.layer
        return expert_conv2d(m._pad(x), m.attention(x), m.weight, m.bias, m.stride,
                             m._conv_padding(), m.dilation, m.groups)  # fmt: skip


def _session(module: nn.Module, x: torch.Tensor, path: str, threads: int) -> ort.InferenceSession:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        program = torch.export.export(
            module, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)
        )
        torch.onnx.export(program, (x,), path, dynamo=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--folder", default="/tmp")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    for name, (c_in, c_out, k, groups, side) in SHAPES.items():
        torch.manual_seed(0)
        layer = DynamicConv2d(c_in, c_out, k, padding=k // 2, groups=groups, num_experts=4).eval()
        static = nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups).eval()
        x = torch.randn(2, c_in, side, side)
        sessions = {"static": _session(static, x, f"{args.folder}/static.onnx", args.threads)}
        with portable(layer):
            sessions["unfolded"] = _session(layer, x, f"{args.folder}/unfolded.onnx", args.threads)
        sessions["experts"] = _session(
            _Experts(layer), x, f"{args.folder}/experts.onnx", args.threads
        )
        for batch in (1, 8):
            xb = torch.randn(batch, c_in, side, side)
            feed = xb.numpy()
            with torch.no_grad():
                ref = layer(xb).numpy()
            for key in ("unfolded", "experts"):
                s = sessions[key]
                out = s.run(None, {s.get_inputs()[0].name: feed})[0]
                assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-4, key
            times: dict[str, list[float]] = {key: [] for key in sessions}
            for r in range(args.rounds + 3):
                order = list(sessions) if r % 2 else list(reversed(sessions))
                for key in order:
                    s = sessions[key]
                    start = time.perf_counter()
                    s.run(None, {s.get_inputs()[0].name: feed})
                    if r >= 3:  # warm-up rounds
                        times[key].append(time.perf_counter() - start)
            base = statistics.median(times["static"])
            print(f"{name} B={batch}: static {1e3 * base:.3f} ms, unfolded "
                  f"x{statistics.median(times['unfolded']) / base:.2f}, experts "
                  f"x{statistics.median(times['experts']) / base:.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

"""Numeric format and memory layout of a run: the autocast dtype, NHWC (channels_last), and
the global random streams seeded at every epoch."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

__all__ = ["amp_dtype", "memory_format", "seed_everything", "to_channels_last"]


def amp_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where supported, else float16 (older GPUs; used with loss scaling)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def memory_format(channels_last: bool) -> torch.memory_format:
    """What input batches are moved to the device in."""
    return torch.channels_last if channels_last else torch.preserve_format


def to_channels_last(model: nn.Module) -> None:
    """NHWC layout for every 4-D parameter and buffer. ``Module.to(memory_format=...)`` would
    also try to convert the 5-D expert kernels of dynamic layers, and fail."""
    with torch.no_grad():
        for module in model.modules():
            for p in module.parameters(recurse=False):
                if p.dim() == 4:
                    p.data = p.data.contiguous(memory_format=torch.channels_last)
            for name, b in module.named_buffers(recurse=False):
                if b.dim() == 4:
                    setattr(module, name, b.contiguous(memory_format=torch.channels_last))


def seed_everything(seed: int) -> None:
    """Seed torch's, Python's and numpy's global generators."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (1 << 32))

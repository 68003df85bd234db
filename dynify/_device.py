"""Which torch device a command or a function runs on: one resolver for all of them."""

from __future__ import annotations

import torch

from dynify.errors import DynifyError

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or CUDA when a GPU is present and ``device`` is None, else the CPU.

    Raises:
        DynifyError: a name torch does not know, or CUDA asked for where there is none.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DynifyError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DynifyError(f"device {device!r}: no CUDA device is available here; use cpu")
    return dev

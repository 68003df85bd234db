"""How much memory a device has free for new tensors: what the memory checks price against.

Used before anything large is allocated (``dynify.apply`` pricing a plan's experts,
``dynify.load`` pricing an artifact), so that a plan or file asking for more than the
machine has is one line instead of an out-of-memory kill. Callers look the function up as
``_memory.available_memory`` so that tests can stand in a smaller machine.
"""

from __future__ import annotations

import os

import torch

__all__ = ["available_memory", "format_gib"]


def format_gib(n_bytes: float) -> str:
    """``2.7 GiB`` (or ``512 MiB`` below a tenth of a GiB), for messages."""
    return f"{n_bytes / 2**30:,.1f} GiB" if n_bytes >= 2**30 / 10 else f"{n_bytes / 2**20:,.0f} MiB"


def available_memory(device: torch.device) -> int | None:
    """Bytes that new tensors on ``device`` can take without swapping, or ``None`` when this
    cannot be told (then nothing is refused).

    CPU: ``MemAvailable`` of /proc/meminfo (else ``os.sysconf``'s available pages), lowered
    to what the cgroup's memory limit leaves (a container). CUDA: the device's free memory.
    """
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    available: int | None = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:  # cgroup v2: the container's limit less what it already uses
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            used = int(open("/sys/fs/cgroup/memory.current").read().strip())
            available = min(available, max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return available

"""Forward-pass latency on a device: warm-up, synchronised timing, repeats, median.

Public through :mod:`dynify.cost` (``latency``, ``compare_latency``). On CUDA each pass is
timed with CUDA events (the wall clock would only see the kernel launches); on the CPU with
``time.perf_counter``. ``compare_latency`` interleaves the two models pass by pass, so that
load from other processes hits both alike, and reports the median of the per-round ratios.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from dynify._device import resolve_device
from dynify._modes import evaluating
from dynify.errors import DynifyError
from dynify.trace import check_input_size

__all__ = [
    "LatencyComparison",
    "LatencyResult",
    "compare_latency",
    "example_input",
    "latency",
    "resolve_device",
]


@dataclass(frozen=True)
class LatencyResult:
    """Per-pass forward times (seconds) of one model on one device and batch size."""

    times: tuple[float, ...]
    device: str
    batch_size: int
    clock: str = "wall"  # or "thread": the calling thread's CPU time

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def median_ms(self) -> float:
        return self.median * 1e3

    def __str__(self) -> str:
        clock = "" if self.clock == "wall" else ", thread CPU time"
        return (
            f"{self.median_ms:.2f} ms (median of {len(self.times)}, batch {self.batch_size}, "
            f"{self.device}{clock})"
        )


@dataclass(frozen=True)
class LatencyComparison:
    """Static and converted models timed interleaved in one run."""

    static: LatencyResult
    converted: LatencyResult

    @property
    def ratios(self) -> tuple[float, ...]:
        return tuple(c / s for s, c in zip(self.static.times, self.converted.times, strict=True))

    @property
    def ratio(self) -> float:
        """Median over rounds of converted / static (each round times both, back to back)."""
        return statistics.median(self.ratios)

    def __str__(self) -> str:
        return (
            f"static {self.static.median_ms:.2f} ms, converted {self.converted.median_ms:.2f} ms, "
            f"ratio x{self.ratio:.2f} (batch {self.static.batch_size}, {self.static.device}, "
            f"median of {len(self.ratios)} interleaved rounds)"
        )


@contextmanager
def _on_device(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """``model`` in eval mode on ``device`` (a copy when it lives elsewhere)."""
    param = next(model.parameters(), None)
    here = (
        param is None
        or param.device == device
        or (device.type == param.device.type and device.index is None)
    )
    target = model if here else copy.deepcopy(model).to(device)
    with evaluating(target):
        yield target


def example_input(
    model: nn.Module, input_size: tuple[int, ...], batch_size: int = 1
) -> torch.Tensor:
    """A random batch on the model's device, in its floating dtype (float32 by default)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.randn(batch_size, *input_size, device=device, dtype=dtype)


Clock = Literal["wall", "thread"]


def _timer(model: nn.Module, x: torch.Tensor, clock: Clock = "wall") -> Callable[[], float]:
    if x.device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)

        def run_cuda() -> float:
            start.record()
            model(x)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return run_cuda

    now = time.thread_time if clock == "thread" else time.perf_counter

    def run_cpu() -> float:
        t0 = now()
        model(x)
        return now() - t0

    return run_cpu


def _check(
    input_size, batch_size: int, warmup: int, repeats: int, clock: str, device: torch.device
) -> tuple[int, ...]:
    if clock not in ("wall", "thread"):
        raise DynifyError(f"clock must be 'wall' or 'thread', got {clock!r}", arguments=("clock",))
    if clock == "thread" and device.type != "cpu":
        raise DynifyError(
            f"clock='thread' times CPU work only, not {device.type}", arguments=("clock",)
        )
    size = check_input_size(input_size)
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise DynifyError(
            f"need batch_size >= 1, repeats >= 1, warmup >= 0; got {batch_size}, {repeats}, "
            f"{warmup}",
            arguments=("batch_size", "repeats", "warmup"),
        )
    return size


def _time_interleaved(
    models: tuple[nn.Module, ...],
    input_size: tuple[int, int, int],
    device: str | torch.device | None,
    batch_size: int,
    warmup: int,
    repeats: int,
    clock: Clock,
) -> tuple[LatencyResult, ...]:
    """Time ``models`` on one input, round by round: each round runs every model once, the
    order rotating from round to round, so that load from other processes hits all alike."""
    dev = resolve_device(device)
    size = _check(input_size, batch_size, warmup, repeats, clock, dev)
    with ExitStack() as stack:
        placed = [stack.enter_context(_on_device(m, dev)) for m in models]
        stack.enter_context(torch.inference_mode())
        x = example_input(placed[0], size, batch_size)
        runs = [_timer(m, x, clock) for m in placed]
        for _ in range(warmup):
            for run in runs:
                run()
        times: list[list[float]] = [[] for _ in runs]
        for i in range(repeats):
            for j in range(len(runs)):
                k = (i + j) % len(runs)
                times[k].append(runs[k]())
    return tuple(LatencyResult(tuple(t), str(dev), batch_size, clock) for t in times)


def latency(
    model: nn.Module,
    input_size: tuple[int, int, int],
    *,
    device: str | torch.device | None = None,
    batch_size: int = 1,
    warmup: int = 3,
    repeats: int = 10,
    clock: Clock = "wall",
) -> LatencyResult:
    """Time ``repeats`` forward passes (after ``warmup`` untimed ones) in eval mode under
    ``torch.inference_mode``; the median is ``result.median`` (seconds).

    ``clock="thread"`` (CPU only) measures the calling thread's CPU time instead of the
    wall clock: with ``torch.set_num_threads(1)`` that is the pass's compute time, which
    other processes' load on a shared machine barely changes.
    """
    (result,) = _time_interleaved((model,), input_size, device, batch_size, warmup, repeats, clock)
    return result


def compare_latency(
    static: nn.Module,
    converted: nn.Module,
    input_size: tuple[int, int, int],
    *,
    device: str | torch.device | None = None,
    batch_size: int = 1,
    warmup: int = 3,
    repeats: int = 10,
    clock: Clock = "wall",
) -> LatencyComparison:
    """Time two models side by side: each round runs both on the same input, alternating
    which goes first; ``result.ratio`` is the median per-round converted / static.
    Arguments as for :func:`latency`."""
    a, b = _time_interleaved(
        (static, converted), input_size, device, batch_size, warmup, repeats, clock
    )
    return LatencyComparison(a, b)

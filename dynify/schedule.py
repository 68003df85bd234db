"""Temperature schedules for the attention's softmax.

DY-CNN starts training with a high temperature (near-uniform attention, so every expert is
trained) and anneals it towards 1; the paper's default is 30 -> 1, linearly, over the first
10 epochs. A :class:`TemperatureSchedule` is a pure description (no state) that a recipe
names per layer; :class:`dynify.train.TemperatureScheduler` drives a model's dynamic layers
through their schedules during training.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Literal

from dynify.errors import DynifyError

__all__ = ["SCHEDULE_SHAPES", "SCHEDULE_UNITS", "TemperatureSchedule"]

ScheduleShape = Literal["linear", "cosine", "exponential", "constant"]
ScheduleUnit = Literal["epoch", "step"]
SCHEDULE_SHAPES: tuple[str, ...] = ("linear", "cosine", "exponential", "constant")
SCHEDULE_UNITS: tuple[str, ...] = ("epoch", "step")


@dataclass(frozen=True)
class TemperatureSchedule:
    """Temperature ``start`` at time 0, ``end`` from time ``length`` on, ``shape`` in between.

    ``unit`` says what the time counts: epochs (fractional epochs when stepped per
    iteration) or optimiser steps.
    """

    start: float = 30.0
    end: float = 1.0
    length: float = 10.0
    shape: ScheduleShape = "linear"
    unit: ScheduleUnit = "epoch"

    def __post_init__(self) -> None:
        if not (self.start > 0 and self.end > 0):
            raise DynifyError(f"temperatures must be > 0, got start={self.start}, end={self.end}")
        if self.length < 0:
            raise DynifyError(f"length must be >= 0, got {self.length}")
        if self.shape not in SCHEDULE_SHAPES:
            raise DynifyError(f"shape must be one of {SCHEDULE_SHAPES}, got {self.shape!r}")
        if self.unit not in SCHEDULE_UNITS:
            raise DynifyError(f"unit must be one of {SCHEDULE_UNITS}, got {self.unit!r}")

    @classmethod
    def constant(cls, value: float) -> TemperatureSchedule:
        return cls(start=value, end=value, length=0.0, shape="constant")

    def value(self, t: float) -> float:
        """The temperature at time ``t`` (in ``unit``s since the start of training)."""
        if self.shape == "constant":
            return self.start
        if self.length == 0 or t >= self.length:
            return self.end
        p = max(t, 0.0) / self.length
        if self.shape == "linear":
            return self.start + (self.end - self.start) * p
        if self.shape == "cosine":
            return self.end + (self.start - self.end) * 0.5 * (1 + math.cos(math.pi * p))
        # exponential: geometric interpolation, equal ratios per unit of time
        return self.start * (self.end / self.start) ** p

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TemperatureSchedule:
        return cls(**data)

    def describe(self) -> str:
        if self.shape == "constant":
            return f"T={self.start:g}"
        return f"T {self.start:g}->{self.end:g} {self.shape} over {self.length:g} {self.unit}s"


def __getattr__(name: str) -> Any:
    if name == "TemperatureScheduler":  # moved above the plan, which it reads
        warnings.warn(
            "dynify.schedule.TemperatureScheduler is deprecated; use "
            "dynify.TemperatureScheduler (defined in dynify.train.temperature)",
            DeprecationWarning,
            stacklevel=2,
        )
        from dynify.train.temperature import TemperatureScheduler

        return TemperatureScheduler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

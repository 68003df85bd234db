"""Temperature schedules for the attention's softmax.

DY-CNN starts training with a high temperature (near-uniform attention, so every expert is
trained) and anneals it towards 1; the paper's default is 30 -> 1, linearly, over the first
10 epochs. A :class:`TemperatureSchedule` is a pure description (no state); the
:class:`TemperatureScheduler` beside it drives a model's dynamic layers through their schedules
during training, like a torch LR scheduler::

    scheduler = dynify.TemperatureScheduler(model, steps_per_epoch=len(loader))
    for x, y in loader:
        ...  # forward, backward, optimizer.step()
        scheduler.step()
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import nn

    from dynify.layers import DynamicConv2d

__all__ = ["SCHEDULE_SHAPES", "SCHEDULE_UNITS", "TemperatureSchedule", "TemperatureScheduler"]

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
            raise ValueError(f"temperatures must be > 0, got start={self.start}, end={self.end}")
        if self.length < 0:
            raise ValueError(f"length must be >= 0, got {self.length}")
        if self.shape not in SCHEDULE_SHAPES:
            raise ValueError(f"shape must be one of {SCHEDULE_SHAPES}, got {self.shape!r}")
        if self.unit not in SCHEDULE_UNITS:
            raise ValueError(f"unit must be one of {SCHEDULE_UNITS}, got {self.unit!r}")

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


class TemperatureScheduler:
    """Drive every :class:`~dynify.DynamicConv2d` of ``model`` along its temperature schedule.

    Each dynamic layer follows the schedule its plan gives it (``dynify.plan_of(model)``:
    the recipe's ``temperature`` per layer); a model without a plan (layers built by hand)
    uses ``default``; ``schedule``, when given, overrides the plan for every layer.

    Like a torch LR scheduler, call :meth:`step` after each optimiser step when built with
    ``steps_per_epoch`` (epoch-unit schedules then advance by fractional epochs), or once per
    epoch without it. :meth:`step_update` sets the position from an absolute update count
    instead (timm's scheduler convention). Construction sets every layer to its temperature
    at time 0; ``state_dict`` / ``load_state_dict`` save and restore the position for resume.

    Args:
        model: a converted model (a DDP or ``torch.compile`` wrapper is looked through).
        steps_per_epoch: optimiser steps per epoch; ``None`` means :meth:`step` counts epochs
            (and step-unit schedules are then refused).
        default: the schedule for layers the model's plan does not cover (default: DY-CNN's
            30 -> 1, linear, over 10 epochs).
        schedule: one schedule for every layer, ignoring the plan (e.g. a search trial's).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        steps_per_epoch: int | None = None,
        default: TemperatureSchedule | None = None,
        schedule: TemperatureSchedule | None = None,
    ) -> None:
        if steps_per_epoch is not None and (
            isinstance(steps_per_epoch, bool)
            or int(steps_per_epoch) != steps_per_epoch
            or steps_per_epoch < 1
        ):
            raise ValueError(f"steps_per_epoch must be a positive integer, got {steps_per_epoch!r}")
        self.steps_per_epoch = None if steps_per_epoch is None else int(steps_per_epoch)
        self.layers: list[tuple[str, DynamicConv2d, TemperatureSchedule]] = _layer_schedules(
            model, default=default or TemperatureSchedule(), override=schedule
        )
        if self.steps_per_epoch is None:
            for name, _, sched in self.layers:
                if sched.unit == "step":
                    raise ValueError(
                        f"layer {name!r} has a step-unit temperature schedule; give "
                        "steps_per_epoch and call step() after every optimiser step"
                    )
        self.num_updates = 0  # optimiser steps (counted when steps_per_epoch is given)
        self.epochs = 0  # epochs (counted when steps_per_epoch is None)
        self._written: list[float | None] = [None] * len(self.layers)
        self._apply(force=True)

    # -- position -----------------------------------------------------------------------

    @property
    def epoch(self) -> float:
        """Training time in (fractional) epochs."""
        if self.steps_per_epoch is None:
            return float(self.epochs)
        return self.num_updates / self.steps_per_epoch

    def step(self) -> None:
        """Advance one optimiser step (with ``steps_per_epoch``) or one epoch (without)."""
        if self.steps_per_epoch is None:
            self.epochs += 1
        else:
            self.num_updates += 1
        self._apply()

    def step_update(self, num_updates: int) -> None:
        """Set the position to ``num_updates`` optimiser steps since the start of training."""
        if self.steps_per_epoch is None:
            raise ValueError("step_update needs a scheduler built with steps_per_epoch")
        self.num_updates = int(num_updates)
        self._apply()

    def value(self, schedule: TemperatureSchedule) -> float:
        """Where ``schedule`` is at the current position."""
        t = self.num_updates if schedule.unit == "step" else self.epoch
        return schedule.value(t)

    def _apply(self, *, force: bool = False) -> None:
        # Buffers are written only when their value changes (no device work once annealed).
        for i, (_, layer, sched) in enumerate(self.layers):
            value = self.value(sched)
            if force or value != self._written[i]:
                layer.temperature = value
                self._written[i] = value

    # -- reading ------------------------------------------------------------------------

    def temperatures(self) -> dict[str, float]:
        """Every driven layer's current temperature, by module path."""
        return {name: self.value(sched) for name, _, sched in self.layers}

    @property
    def temperature(self) -> float | None:
        """The largest current temperature (one number for a progress bar); ``None`` when
        the model has no dynamic layer."""
        return max((self.value(sched) for _, _, sched in self.layers), default=None)

    # -- resume -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_updates": self.num_updates,
            "epochs": self.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "schedules": {name: sched.to_dict() for name, _, sched in self.layers},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position (the schedules come from the model, as at construction)."""
        saved = state.get("schedules")
        if saved is not None and set(saved) != {name for name, _, _ in self.layers}:
            raise ValueError(
                "the saved temperature state is for other layers "
                f"({len(saved)} saved, {len(self.layers)} in this model)"
            )
        if state.get("steps_per_epoch") != self.steps_per_epoch:
            raise ValueError(
                f"the saved temperature state counts {state.get('steps_per_epoch')} steps per "
                f"epoch, this scheduler {self.steps_per_epoch}"
            )
        self.num_updates = int(state["num_updates"])
        self.epochs = int(state["epochs"])
        self._apply(force=True)

    def __repr__(self) -> str:
        kinds = sorted({sched.describe() for _, _, sched in self.layers})
        return (
            f"TemperatureScheduler({len(self.layers)} layers, epoch={self.epoch:g}, "
            f"schedules: {'; '.join(kinds) or 'none'})"
        )


def _layer_schedules(
    model: nn.Module, *, default: TemperatureSchedule, override: TemperatureSchedule | None
) -> list[tuple[str, DynamicConv2d, TemperatureSchedule]]:
    from timm.utils import unwrap_model

    from dynify.convert import plan_of
    from dynify.errors import DynifyError
    from dynify.layers import DynamicConv2d

    model = unwrap_model(model)
    try:
        planned = {lp.name: lp.settings.schedule for lp in plan_of(model).converted}
    except DynifyError:
        planned = {}
    out = []
    for name, module in model.named_modules():
        if isinstance(module, DynamicConv2d):
            sched = override or planned.get(name, default)
            out.append((name, module, sched))
    return out

"""The temperature scheduler: drives a model's dynamic layers through their schedules.

DY-CNN trains with a high softmax temperature first (near-uniform attention, so every expert
is trained) and anneals it towards 1. Each layer's :class:`~dynify.schedule.TemperatureSchedule`
comes from its plan; :class:`TemperatureScheduler` steps them like a torch LR scheduler::

    scheduler = dynify.TemperatureScheduler(model, steps_per_epoch=len(loader))
    for x, y in loader:
        ...  # forward, backward, optimizer.step()
        scheduler.step()
"""

from __future__ import annotations

from typing import Any

from timm.utils import unwrap_model
from torch import nn

from dynify.layers.base import DynamicLayer
from dynify.plan import find_plan
from dynify.schedule import TemperatureSchedule

__all__ = ["TemperatureScheduler"]


class TemperatureScheduler:
    """Drive every dynamic layer of ``model`` that has a temperature (DY-CNN, CondConv,
    ODConv; not DCD) along its temperature schedule.

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
        self.layers: list[tuple[str, DynamicLayer, TemperatureSchedule]] = _layer_schedules(
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
) -> list[tuple[str, DynamicLayer, TemperatureSchedule]]:
    plan = find_plan(model)
    model = unwrap_model(model)
    planned = {lp.name: lp.settings.schedule for lp in plan.converted} if plan else {}
    out = []
    for name, module in model.named_modules():
        if isinstance(module, DynamicLayer) and module.has_temperature:
            sched = override or planned.get(name, default)
            out.append((name, module, sched))
    return out

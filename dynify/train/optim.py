"""The optimiser and the learning-rate schedule of a run, built with timm's
``create_optimizer_v2`` and ``create_scheduler_v2`` from :class:`FinetuneSettings`."""

from __future__ import annotations

from typing import Any

from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

from dynify.errors import DynifyError, shorten
from dynify.train.settings import FinetuneSettings

__all__ = ["make_lr_scheduler", "make_optimizer"]


def make_optimizer(model: nn.Module, settings: FinetuneSettings) -> Any:
    """timm's optimiser ``settings.opt`` over ``model``'s parameters, at the peak ``lr``;
    an unknown name or a bad combination is one line naming ``opt`` (timm's message kept as
    the cause)."""
    try:
        return create_optimizer_v2(
            model,
            opt=settings.opt,
            lr=settings.peak_lr,
            weight_decay=settings.weight_decay,
            momentum=settings.momentum,
        )
    except (ValueError, AssertionError) as err:
        raise DynifyError(
            f"optimizer opt={settings.opt!r}: {shorten(str(err), 160)} (see "
            f"timm.optim.list_optimizers())",
            arguments=("opt",),
        ) from err


def make_lr_scheduler(optimizer: Any, settings: FinetuneSettings, *, steps_per_epoch: int) -> Any:
    """timm's schedule ``settings.sched`` over ``settings.epochs``, stepped on every update;
    ``None`` for ``sched="none"``."""
    if settings.sched == "none":
        return None
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=settings.sched,
        num_epochs=settings.epochs,
        warmup_epochs=settings.warmup_epochs,
        min_lr=settings.min_lr,
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    return scheduler

"""What a run says while it trains: a progress bar per epoch (tqdm, on stderr) and one line
per epoch through the ``dynify`` loggers (so ``logging.getLogger("dynify")
.setLevel(logging.WARNING)`` silences both)."""

from __future__ import annotations

import logging
from typing import Any

from tqdm.auto import tqdm

from dynify.logging import get_logger

__all__ = ["epoch_bar", "epoch_line", "format_temperature", "shows_progress"]

_logger = get_logger(__name__)


def shows_progress(progress: bool, *, primary: bool) -> bool:
    """Whether this process shows progress: asked for, rank 0, and INFO not silenced."""
    return progress and primary and _logger.isEnabledFor(logging.INFO)


def epoch_bar(*, steps: int, epoch: int, epochs: int, show: bool) -> tqdm:
    """The bar of one epoch (cleared when it ends; a no-op unless ``show``)."""
    return tqdm(
        total=steps,
        desc=f"epoch {epoch + 1}/{epochs}",
        unit="batch",
        leave=False,
        dynamic_ncols=True,
        disable=not show,
    )


def format_temperature(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def epoch_line(m: dict[str, Any], epochs: int) -> str:
    """The line logged after an epoch, from its metrics."""
    rate = m["images_per_s"]
    routing = m.get("routing")
    tail = ""
    if routing:
        tail = (
            f" | routing effect {100 * routing['effect']:.2f}% ({100 * routing['flips']:.1f}% "
            f"flips) H {routing['entropy']:.3f}"
        )
    return (
        f"epoch {m['epoch']}/{epochs}: train loss {m['train_loss']:.4f} acc "
        f"{m['train_top1']:.2f}% | val loss {m['val_loss']:.4f} top-1 {m['val_top1']:.2f}% "
        f"top-5 {m['val_top5']:.2f}% | T {format_temperature(m['temperature'])} lr "
        f"{m['lr']:.3g} | {rate or 0:.0f} img/s{tail}"
    )

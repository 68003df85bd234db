"""What a search says while it runs, through :mod:`dynify.logging` (stderr by default):
the line that opens it, its notes, the estimate of the time it may take, and one line per
finished trial (number, result, best so far, time used and left)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from dynify.cost import format_count
from dynify.logging import get_logger
from dynify.search.context import SearchContext
from dynify.search.settings import SearchSettings
from dynify.search.storage import redact_url
from dynify.search.trials import feasible, finished

__all__ = ["Progress", "announce", "clock", "estimate", "where"]

_logger = get_logger(__name__)


def clock(seconds: float) -> str:
    """``75`` -> ``1m15s``, ``3725`` -> ``1h02m``."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def estimate(ctx: SearchContext, remaining: int, images_per_s: float) -> str:
    """What ``remaining`` trials may take at ``images_per_s``, said as the estimate it is."""
    budget = ctx.space.training
    train, val = len(ctx.data.train), len(ctx.data.val)
    # Scoring an image costs about a third of training on it (no backward pass).
    per_trial = budget.epochs * (train + val / 3) / images_per_s
    workers = ctx.settings.workers
    total = remaining * per_trial / workers
    return (
        f"estimate: {remaining} trial(s) to run, each up to {budget.epochs} epoch(s) x "
        f"{train:,} images + {val:,} held out, at ~{images_per_s:,.0f} images/s (the static "
        f"model, timed just now on {ctx.device}"
        + (f", {workers} workers" if workers > 1 else "")
        + f"): about {clock(total)} if every trial trains in full; over-budget plans take "
        "seconds, pruned ones less, dynamic plans train slower than static"
    )


def where(settings: SearchSettings) -> str:
    """Where the study is stored, fit to show."""
    if settings.storage:
        return redact_url(settings.storage)
    return os.path.join(settings.output, "study.db")


def announce(
    ctx: SearchContext, study: optuna.Study, images_per_s: float | None = None
) -> Sequence[str]:
    """Say what the search is about to do: the study, the model and budget, how many trials
    are done, the notes, and (given the static model's ``images_per_s``) the estimate.
    Returns the lines said."""
    settings = ctx.settings
    done = len(finished(study))
    lines = [
        f"search {study.study_name}: {ctx.model_name} at "
        f"{'x'.join(map(str, ctx.space.input_size))}, {len(ctx.groups)} groups "
        f"({ctx.space.granularity}), static {format_count(ctx.static_cost.flops)}FLOPs, "
        f"budget {ctx.budget}, {done}/{settings.trials} trials done, "
        f"device {ctx.device}, storage {where(settings)}"
    ]
    _logger.info(lines[0])
    for note in ctx.notes:
        # The Python arguments a note names ride along, for a caller to show as its own
        # (the command line writes its flags).
        lines.append(f"note: {note}")
        _logger.info(lines[-1], extra={"arguments": getattr(note, "arguments", ())})
    remaining = settings.trials - done
    if remaining > 0 and images_per_s is not None:
        lines.append(estimate(ctx, remaining, images_per_s))
        _logger.info(lines[-1])
    return lines


class Progress:
    """An Optuna callback: one line per finished trial (number, result, best so far, time
    used and left), unless the settings turn progress off."""

    def __init__(self, ctx: SearchContext) -> None:
        self.ctx = ctx
        self.start = time.monotonic()

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if not self.ctx.settings.progress or "surplus" in trial.user_attrs:
            return
        _logger.info(self.line(study, trial))

    def line(self, study: optuna.Study, trial: FrozenTrial) -> str:
        total = self.ctx.settings.trials
        done = finished(study)
        what = str(trial.user_attrs.get("preset") or "sampled")
        if "same_as" in trial.user_attrs:
            what += f" (same plan as trial {trial.user_attrs['same_as']}, not retrained)"
        flops = trial.user_attrs.get("flops")
        cost = f"{format_count(flops)}FLOPs" if flops is not None else "?"
        if trial.state == TrialState.COMPLETE:
            result = f"{trial.values[0]:.2f}%" if feasible(trial) else "over budget"
        elif trial.state == TrialState.PRUNED:
            result = "pruned"
        else:
            result = trial.state.name.lower()
        best = ""
        try:
            if len(study.directions) == 1:
                b = study.best_trial
                best = f" | best {b.values[0]:.2f}% (trial {b.number})"
        except ValueError:
            pass
        used = time.monotonic() - self.start
        durations = [t.duration.total_seconds() for t in done if t.duration]
        left_n = max(total - len(done), 0)
        left = (
            (sum(durations) / len(durations)) * left_n / self.ctx.settings.workers
            if durations
            else 0.0
        )
        if self.ctx.settings.timeout is not None:
            left = min(left, max(self.ctx.settings.timeout - used, 0.0))
        return (
            f"{self.ctx.prefix}trial {trial.number} ({len(done)}/{total}) {what}: {result}, "
            f"{cost}{best} | {clock(used)} used, ~{clock(left)} left"
        )

"""The worker loop: run trials in this process until the study has enough.

Counts finished trials over every process sharing the study; with a heartbeat (SQL storages)
it also fails the trials of dead processes (queuing their retries) and waits while the last
trials run elsewhere, to take over if one dies. Diverged trials are caught (and the process
stops after too many); Ctrl-C is said as :class:`SearchInterrupted`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import optuna

from dynify import errors
from dynify.logging import get_logger
from dynify.search.claims import SearchInterrupted, Surplus, claim
from dynify.search.context import SearchContext
from dynify.search.identity import open_study
from dynify.search.storage import has_heartbeat
from dynify.search.trials import FINISHED

__all__ = ["run_worker"]

_logger = get_logger(__name__)


def run_worker(
    ctx: SearchContext,
    *,
    study: optuna.Study | None = None,
    on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
) -> optuna.Study:
    """Run trials in this process until the study has ``trials`` finished ones (COMPLETE or
    PRUNED, counted over every process sharing it) or the timeout passes.

    With a heartbeat (RDB storages), trials running elsewhere count too: when they are the
    last ones, this process waits for them, and runs the retry of any whose process died.
    Without one (journal storage), only finished trials count, so N processes may end up to
    N - 1 trials past ``trials``.

    ``study``: the one :func:`open_study` returned in this process (its sampler is seeded
    when this process created the study); by default the study is loaded.
    """
    if study is None:
        study = open_study(ctx, create=False)
    target = ctx.settings.trials
    heartbeat = has_heartbeat(ctx.settings)
    poll = min(float(ctx.settings.heartbeat), 5.0)
    deadline = None if ctx.settings.timeout is None else time.monotonic() + ctx.settings.timeout
    ran: list[optuna.trial.FrozenTrial] = []
    callbacks = [lambda _study, trial: ran.append(trial)]
    if on_trial is not None:
        callbacks.append(on_trial)
    failures = 0
    while deadline is None or time.monotonic() < deadline:
        if heartbeat:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # and queue their retries
        trials = study.get_trials(deepcopy=False)
        done = sum(t.state in FINISHED for t in trials)
        if done >= target:
            break
        running = sum(t.state == optuna.trial.TrialState.RUNNING for t in trials)
        if heartbeat and done + running >= target:
            time.sleep(poll)  # the last trials run elsewhere; take over if one dies
            continue
        try:
            study.optimize(
                lambda trial: claim(trial, ctx, heartbeat=heartbeat),
                n_trials=1,
                callbacks=callbacks,
                catch=(
                    errors.TrainingDiverged,
                    Surplus,
                ),  # a diverged trial fails; the search goes on
                gc_after_trial=True,
            )
        except KeyboardInterrupt as interrupt:
            if isinstance(interrupt, SearchInterrupted):
                raise
            # Between trials (Optuna asking for the next one): nothing is lost.
            raise SearchInterrupted("between trials; rerun the same command to resume") from None
        except optuna.exceptions.UpdateFinishedTrialError:
            # This process's heartbeat was late (a stall, a network cut): another process
            # declared the trial dead and queued its retry, which counts instead.
            _logger.warning(
                "a trial of this process was declared dead by another; its retry counts instead"
            )
        if (
            ran
            and ran[-1].state == optuna.trial.TrialState.FAIL
            and "surplus" not in ran[-1].user_attrs
        ):
            failures += 1
            if failures >= max(3, target):
                _logger.warning(
                    f"{failures} trials failed in this process (training diverged); stopping it"
                )
                break
    return study

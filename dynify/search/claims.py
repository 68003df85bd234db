"""Which process runs which trial, when several share a study.

Owns the claim protocol (:func:`claim`: a queued preset or retry that an earlier live trial
already runs is not run twice, and with a heartbeat a trial past the study's last one steps
aside, so a study ends with exactly ``trials`` finished), and what an interrupted trial
leaves: marked ``interrupted``, queued again on resume (:func:`requeue_interrupted`), with
Optuna's own warning for it silenced in favour of the command's one line.
"""

from __future__ import annotations

import logging
from typing import Any

import optuna

from dynify.search.context import SearchContext
from dynify.search.objective import objective
from dynify.search.trials import FINISHED

__all__ = ["INTERRUPTED", "SearchInterrupted", "Surplus", "claim", "requeue_interrupted"]


class Surplus(Exception):
    """Another process claimed the study's last trial first; this one is not run."""


def claim(
    trial: optuna.Trial, ctx: SearchContext, *, heartbeat: bool = True
) -> float | tuple[float, ...]:
    """Run ``trial`` unless another trial has it covered:

    - a preset that another live trial (finished, running or queued ahead of it) already
      runs: two processes that opened a new study together may both have queued the presets;
    - likewise a retry of an interrupted trial that an earlier live trial already retries
      (two resumes at once on a database server may both have queued it);
    - with a heartbeat, a trial the trials before it (finished or running) leave no room for:
      two processes may ask for the study's last trial at the same moment, and the one with
      the higher number steps aside, so the study ends with exactly ``trials`` finished.
    """
    trials = trial.study.get_trials(deepcopy=False)
    mine = next(t for t in trials if t.number == trial.number)
    live = (*FINISHED, optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
    # A queued trial whose job (a preset, a retry) an earlier live trial already does.
    for key, reason in (
        ("preset", "the {} preset is run by an earlier trial"),
        ("retry_of", "trial {} is retried by an earlier trial"),
    ):
        job = mine.user_attrs.get(key)
        if job is not None and any(
            t.user_attrs.get(key) == job and t.state in live and t.number < trial.number
            for t in trials
        ):
            note = "not run: " + reason.format(job)
            trial.set_user_attr("surplus", note)
            raise Surplus(note)
    if heartbeat:
        ahead = [
            t
            for t in trials
            if t.number < trial.number
            and (t.state in FINISHED or t.state == optuna.trial.TrialState.RUNNING)
        ]
        if len(ahead) >= ctx.settings.trials:
            note = f"not run: the study already had {len(ahead)} finished or running trials"
            trial.set_user_attr("surplus", note)
            if "fixed_params" in mine.system_attrs or "failed_trial" in mine.system_attrs:
                # It was a queued trial (a preset or a retry): put it back in the queue.
                trial.study.add_trial(
                    optuna.trial.create_trial(
                        state=optuna.trial.TrialState.WAITING,
                        params=mine.params,
                        distributions=mine.distributions,
                        user_attrs={k: v for k, v in mine.user_attrs.items() if k != "surplus"},
                        system_attrs=dict(mine.system_attrs),
                    )
                )
            raise Surplus(note)
    try:
        return objective(trial, ctx)
    except KeyboardInterrupt:
        # Optuna marks it FAIL, which is never retried: say it was interrupted, so that the
        # next run on this study queues it again (:func:`requeue_interrupted`).
        _QUIET_FAILURES.numbers.add(trial.number)
        trial.set_user_attr(INTERRUPTED, True)
        raise SearchInterrupted(
            f"trial {trial.number} was interrupted; rerun the same command to resume (it "
            "runs that trial again)"
        ) from None


INTERRUPTED = "interrupted"


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C during a trial: the trial is marked ``interrupted`` and rerun on resume."""


class _QuietFailures(logging.Filter):
    """Drops Optuna's "Trial N failed ... KeyboardInterrupt" warnings (with their traceback)
    for the trials this process interrupted: the command says it in one line instead."""

    def __init__(self) -> None:
        super().__init__()
        self.numbers: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(text.startswith(f"Trial {n} failed") for n in self.numbers)


_QUIET_FAILURES = _QuietFailures()
logging.getLogger("optuna.study._optimize").addFilter(_QUIET_FAILURES)


def requeue_interrupted(study: optuna.Study) -> list[int]:
    """Queue again every interrupted trial (Ctrl-C) that has no retry yet and whose plan no
    finished trial has run (the same preset, or the same sampled parameters); return the
    numbers of the trials queued again. So a preset interrupted mid-way is not lost."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    queued = []
    for t in trials:
        if (
            t.state != optuna.trial.TrialState.FAIL
            or not t.user_attrs.get(INTERRUPTED)
            or t.number in retried
        ):
            continue
        preset = t.user_attrs.get("preset")
        if any(
            other.state in FINISHED
            and other.user_attrs.get("preset") == preset
            and (preset is not None or other.params == t.params)
            for other in trials
        ):
            continue
        attrs: dict[str, Any] = {"retry_of": t.number}
        if preset is not None:
            attrs["preset"] = preset
        study.enqueue_trial(dict(t.params), user_attrs=attrs)
        queued.append(t.number)
    return queued

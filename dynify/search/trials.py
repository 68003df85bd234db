"""How the search reads Optuna's trials: which states count as finished, and whether a
trial's plan met every constraint."""

from __future__ import annotations

from collections.abc import Mapping

import optuna
from optuna.trial import FrozenTrial, TrialState

__all__ = ["FINISHED", "feasible", "finished", "meets"]

# The states that count towards ``trials`` (a pruned trial was trained, then stopped).
FINISHED: tuple[TrialState, ...] = (TrialState.COMPLETE, TrialState.PRUNED)


def finished(study: optuna.Study) -> list[FrozenTrial]:
    """The study's finished trials (COMPLETE or PRUNED), over every process sharing it."""
    return study.get_trials(deepcopy=False, states=FINISHED)


def meets(constraints: Mapping[str, float]) -> bool:
    """Whether every constraint is met: Optuna's convention, a value <= 0 is satisfied (the
    search's are ``figure / limit - 1``). The one test of feasibility in the search."""
    return all(v <= 0 for v in constraints.values())


def feasible(trial: FrozenTrial) -> bool:
    """Whether the trial's plan met every constraint it recorded (budget, limits)."""
    return meets(trial.constraints)

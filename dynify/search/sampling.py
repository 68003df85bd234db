"""Plans from trials: what a trial's parameters mean.

A trial samples one decision per group of candidate convs (an expert count, 1 = stays
static; for dynamic groups a reduction and an attention kind) and one temperature schedule.
:func:`plan_of_trial` rebuilds any trial's plan (a preset's, or the one its parameters
describe), :func:`static_params` are the parameters of the static model, and
:func:`plan_key` tells equal plans apart from different ones.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import optuna

from dynify.plan import Plan, resolve_plan
from dynify.recipe import Recipe, Rule, Selector
from dynify.schedule import TemperatureSchedule
from dynify.search.context import SearchContext, preset_plan
from dynify.search.space import SearchSpace

__all__ = ["plan_key", "plan_of_trial", "sample_recipe", "static_params"]


def _schedule_from(trial: optuna.Trial, space: SearchSpace) -> TemperatureSchedule:
    t = space.temperature
    return TemperatureSchedule(
        start=trial.suggest_categorical("temperature.start", list(t.start)),
        end=trial.suggest_categorical("temperature.end", list(t.end)),
        length=trial.suggest_categorical("temperature.length", list(t.length)),
        shape=trial.suggest_categorical("temperature.shape", list(t.shape)),
        unit=t.unit,  # type: ignore[arg-type]
    )


def sample_recipe(trial: optuna.Trial, ctx: SearchContext) -> Recipe:
    """The recipe a trial's parameters describe: every candidate group gets an expert count
    (1 = stays static) and, when dynamic, a reduction and a kind (DCD mixes no experts:
    its groups' expert counts all give the same plan, which the search trains once)."""
    space = ctx.space
    schedule = _schedule_from(trial, space)
    rules = [Rule(Selector(), {"convert": False}, name="static unless chosen")]
    for group, names in ctx.groups.items():
        experts = trial.suggest_categorical(f"experts.{group}", list(space.experts))
        if experts == 1:
            continue
        reduction = trial.suggest_categorical(f"reduction.{group}", list(space.reduction))
        kind = trial.suggest_categorical(f"kind.{group}", list(space.kinds))
        settings = {
            "convert": True,
            "kind": kind,
            "experts": experts,
            "reduction": reduction,
            "temperature": schedule,
        }
        rules.append(Rule(Selector(name=tuple(names)), settings, name=group))
    return Recipe(defaults=space.candidates.defaults, rules=tuple(rules))


def static_params(ctx: SearchContext) -> dict[str, Any]:
    """Trial parameters that describe the static model (every group at one expert)."""
    t = ctx.space.temperature
    params: dict[str, Any] = {
        "temperature.start": t.start[0],
        "temperature.end": t.end[0],
        "temperature.length": t.length[0],
        "temperature.shape": t.shape[0],
    }
    params.update({f"experts.{g}": 1 for g in ctx.groups} if 1 in ctx.space.experts else {})
    return params


def plan_of_trial(trial: optuna.Trial | optuna.trial.FrozenTrial, ctx: SearchContext) -> Plan:
    """Rebuild a trial's plan (a preset's, or the one its parameters describe)."""
    preset = trial.user_attrs.get("preset")
    if preset is not None:
        return preset_plan(ctx, preset)
    if isinstance(trial, optuna.trial.FrozenTrial):
        trial = optuna.trial.FixedTrial(trial.params)  # type: ignore[assignment]
    recipe = sample_recipe(trial, ctx)  # type: ignore[arg-type]
    return resolve_plan(ctx.trace, recipe, model_name=ctx.model_name)


def plan_key(plan: Plan) -> str:
    """A short hash of what a plan converts and how: equal plans (e.g. a sampled plan that
    keeps every group static, whatever temperature it drew, and the static preset) share it."""
    layers = sorted((lp.name, lp.settings.to_dict()) for lp in plan.converted)
    text = json.dumps(layers, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]

"""A trial's objective: price its plan, skip what was trained before, build, train, score.

The budget and the limits are recorded with ``Trial.set_constraint`` (positive = violated):
a plan over a counted limit ends after its pricing, in milliseconds. A plan equal to one a
finished trial trained is not trained again (training is deterministic for a plan): that
trial's result is reused. A feasible new plan is converted from the shared starting weights,
timed when a latency limit or objective needs it, fine-tuned (:func:`train_plan`) and scored
on the held-out images; each epoch's accuracy goes to the pruner.
"""

from __future__ import annotations

import copy
import math
import os
import socket
import warnings
from typing import Any

import optuna

from dynify import cost
from dynify.convert import apply
from dynify.logging import get_logger
from dynify.search.context import SearchContext, cost_constraints, latency_limit
from dynify.search.sampling import plan_key, plan_of_trial
from dynify.search.training import train_plan
from dynify.search.trials import FINISHED, feasible, meets

__all__ = ["objective"]

_logger = get_logger(__name__)

# What a trial that reuses another's result copies from it.
_REUSED_ATTRS = (
    "latency_ms",
    "top1_history",
    "images_per_s",
    "routing_effect",
    "attention_entropy",
)


def _worst(ctx: SearchContext) -> float | tuple[float, ...]:
    """The value an infeasible trial reports: the worst accuracy (and the worst second
    objective), so it never ranks anywhere but last."""
    objectives = ctx.settings.objectives
    return 0.0 if len(objectives) == 1 else (0.0, math.inf)


def _constrain(trial: optuna.Trial, constraints: dict[str, float]) -> None:
    # A retried trial (the copy of one whose process died) inherits the constraints its
    # original had recorded; Optuna keeps the first value and warns, the value is the same.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The constraint value is ignored")
        for key, value in constraints.items():
            trial.set_constraint(key, value)


def _same_plan(trial: optuna.Trial, key: str) -> optuna.trial.FrozenTrial | None:
    """A finished, feasible trial of this study that trained the same plan."""
    for other in trial.study.get_trials(deepcopy=False, states=FINISHED):
        if other.user_attrs.get("plan") == key and "same_as" not in other.user_attrs:
            if feasible(other):
                return other
    return None


def objective(trial: optuna.Trial, ctx: SearchContext) -> float | tuple[float, ...]:
    """Price the trial's plan; if it fits, build it, measure its latency when a limit or an
    objective needs it, fine-tune it and return the held-out top-1 (and the second
    objective). A plan equal to one a finished trial trained is not trained again: that
    trial's result is reused (training is deterministic for a plan)."""
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    plan = plan_of_trial(trial, ctx)
    totals = cost.price(plan)
    key = plan_key(plan)
    trial.set_user_attr("plan", key)
    trial.set_user_attr("macs", totals.macs)
    trial.set_user_attr("flops", totals.flops)
    trial.set_user_attr("params", totals.params)
    trial.set_user_attr("converted", len(plan.converted))
    constraints = cost_constraints(ctx, plan)
    limit = latency_limit(ctx)
    if not meets(constraints):
        if limit is not None:
            constraints["latency"] = 0.0  # not measured: the count already fails
        _constrain(trial, constraints)
        return _worst(ctx)

    same = _same_plan(trial, key)
    if same is not None:
        trial.set_user_attr("same_as", same.number)
        for attr in _REUSED_ATTRS:
            if attr in same.user_attrs:
                trial.set_user_attr(attr, same.user_attrs[attr])
        _constrain(trial, {**constraints, **same.constraints})
        if same.state == optuna.trial.TrialState.PRUNED:
            raise optuna.TrialPruned(f"the same plan as trial {same.number}, which was pruned")
        values = tuple(same.values)
        return values[0] if len(values) == 1 else values

    model = apply(copy.deepcopy(ctx.base), plan, inplace=True, check=False, seed=ctx.settings.seed)
    latency_s = None
    if limit is not None or "latency" in ctx.settings.objectives:
        latency_s = cost.latency(model, ctx.space.input_size, device=ctx.device).median
        trial.set_user_attr("latency_ms", latency_s * 1e3)
        if limit is not None:
            constraints["latency"] = latency_s / limit - 1.0
    _constrain(trial, constraints)
    if not meets(constraints):
        return _worst(ctx)

    single = len(ctx.settings.objectives) == 1
    epochs = ctx.space.training.epochs

    def report(epoch: int, metrics: dict[str, Any]) -> None:
        if ctx.settings.progress:
            rate = metrics.get("images_per_s")
            _logger.info(
                f"{ctx.prefix}  trial {trial.number} epoch {epoch}/{epochs}: held-out "
                f"top-1 {float(metrics['val_top1']):.2f}%"
                + (f", {rate:,.0f} images/s" if rate else "")
                + f", {float(metrics.get('seconds', 0.0)):.0f}s"
            )
        # Optuna prunes single-objective studies only (Trial.report raises otherwise).
        if not single:
            return
        trial.report(float(metrics["val_top1"]), epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"epoch {epoch}: {metrics['val_top1']:.2f}% top-1")

    if ctx.settings.progress:  # a trial trains for minutes: say what it is doing
        preset = trial.user_attrs.get("preset")
        what = f"the {preset} preset" if preset else "a sampled plan"
        _logger.info(
            f"{ctx.prefix}  trial {trial.number}: training {what} "
            f"({len(plan.converted)} dynamic convs, {cost.format_count(totals.flops)}FLOPs) "
            f"for {epochs} epoch(s) on {len(ctx.data.train):,} images"
        )
    result = train_plan(model, ctx, callbacks=[report])
    top1 = float(result.top1 or 0.0)
    trial.set_user_attr("top1_history", [h["val_top1"] for h in result.history])
    trial.set_user_attr("images_per_s", result.images_per_s)
    routing = result.history[-1].get("routing") if result.history else None
    if routing:  # does the plan route at the end of its budget? (trials.csv shows it)
        trial.set_user_attr("routing_effect", routing["effect"])
        trial.set_user_attr("attention_entropy", routing["entropy"])
    if single:
        return top1
    second = ctx.settings.objectives[1]
    assert latency_s is not None or second == "params"
    return (top1, latency_s * 1e3 if second == "latency" else float(totals.params))

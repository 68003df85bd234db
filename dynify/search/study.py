"""The budgeted search: an Optuna study over conversion plans.

Each trial samples a plan (one decision per group of candidate convs, plus a temperature
schedule) and prices it with the cost model first. The budget and the optional parameter and
latency limits are recorded with ``Trial.set_constraint`` (positive = violated), so a plan
over budget costs milliseconds and the sampler learns where the boundary is. A feasible plan
is converted from the shared starting weights, fine-tuned for the space's per-trial budget,
and scored on images held out from the training set; each epoch's accuracy is reported so the
pruner (median) stops poor trials early. The static model and the bundled recipes that fit
are enqueued first, so the search always matches or beats them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from torch import nn

from dynify import cost
from dynify._budget import Budget, parse_budget
from dynify._device import resolve_device
from dynify._io import ensure_writable
from dynify._resources import bundled_names
from dynify.convert import apply
from dynify.errors import DynifyError, shorten
from dynify.plan import Plan, resolve_plan
from dynify.recipe import LayerSettings, Recipe, Rule, Selector, load_recipe
from dynify.schedule import TemperatureSchedule
from dynify.search.space import SearchSpace, TrainingBudget, group_layers, load_space
from dynify.trace import ModelTrace, trace_model

__all__ = [
    "NUMERIC_SETTINGS",
    "OBJECTIVES",
    "SearchContext",
    "SearchInterrupted",
    "SearchSettings",
    "check_number",
    "estimate",
    "has_heartbeat",
    "local_storage_file",
    "make_storage",
    "open_study",
    "plan_key",
    "prepare",
    "redact_url",
    "requeue_interrupted",
    "run_worker",
    "storage_url",
    "training_speed",
]

OBJECTIVES: tuple[str, ...] = ("accuracy", "latency", "params")
# Bundled recipes tried as the first trials when they fit the budget.
PRESET_RECIPES: tuple[str, ...] = ("dycnn", "mobile", "condconv")
STATIC = "static"
FINISHED: tuple[optuna.trial.TrialState, ...] = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.PRUNED,
)


@dataclass(frozen=True)
class SearchSettings:
    """Everything a search run (and each of its worker processes) needs; plain data."""

    budget: str
    model: str | None = None
    space: str | None = None
    data: str | None = None
    trials: int = 20
    timeout: float | None = None
    output: str = "runs/search"
    storage: str | None = None
    study: str | None = None
    workers: int = 1
    device: str | None = None
    max_params: float | None = None
    max_latency: str | None = None
    objectives: tuple[str, ...] = ("accuracy",)
    pretrained: bool = False
    checkpoint: str | None = None
    seed: int = 0
    heartbeat: int = 60
    data_cache: str | None = None
    progress: bool = True
    # The per-trial training budget, overriding the space's ``training`` section when given.
    epochs: int | None = None
    train_images: int | None = None
    val_images: int | None = None


# The numeric settings and the values each accepts: (flag, integer?, minimum, what it is).
# The CLI parses with these too, so a bad value is the same one line from either.
NUMERIC_SETTINGS: dict[str, tuple[str, bool, float, str]] = {
    "trials": ("--trials", True, 1, "finished trials to reach"),
    "timeout": ("--timeout", False, 0, "seconds"),
    "workers": ("--workers", True, 1, "worker processes"),
    "max_params": ("--max-params", False, 0, "parameters"),
    "seed": ("--seed", True, 0, "a seed"),
    "heartbeat": ("--heartbeat", True, 1, "seconds"),
    "epochs": ("--epochs", True, 1, "epochs per trial"),
    "train_images": ("--train-images", True, 1, "images per epoch"),
    "val_images": ("--val-images", True, 1, "held-out images"),
}
# Seeds feed numpy and torch generators, which take 32-bit unsigned values.
_SEED_LIMIT = 2**32 - 1


def accepted(name: str) -> str:
    """The accepted values of the numeric setting ``name``, as an error message says them."""
    _, integer, minimum, what = NUMERIC_SETTINGS[name]
    kind = "an integer" if integer else "a number"
    bound = f">= {minimum:g}" if integer else f"> {minimum:g}"
    if name == "seed":
        bound = f"from 0 to {_SEED_LIMIT}"
    return f"{kind} {bound} ({what})"


def check_number(name: str, value: Any) -> None:
    """Refuse a numeric setting outside its range, naming its flag and what is accepted."""
    flag, integer, minimum, _ = NUMERIC_SETTINGS[name]
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if ok:
        ok = math.isfinite(value) and (value >= minimum if integer else value > minimum)
    if ok and name == "seed":
        ok = value <= _SEED_LIMIT
    if not ok:
        raise DynifyError(f"{flag} {value!r}: expected {accepted(name)}")


@dataclass
class SearchContext:
    """What every trial shares: resolved once per process by :func:`prepare`."""

    settings: SearchSettings
    space: SearchSpace
    model_name: str
    budget: Budget
    max_latency: float | None
    device: str
    base: nn.Module
    trace: ModelTrace
    candidates: Plan
    groups: dict[str, list[str]]
    data: Any
    static_plan: Plan
    static_cost: cost.Totals
    static_latency: float | None = None
    fingerprint: str = ""
    presets: list[str] = field(default_factory=list)
    # What the search chose for the user (e.g. a held-out split scaled to small data).
    notes: list[str] = field(default_factory=list)
    # Put before this process's progress lines ("[worker 1] ").
    prefix: str = ""

    @property
    def output(self) -> Path:
        return Path(self.settings.output)


# -- set-up ---------------------------------------------------------------------------------


def _device(requested: str | None) -> str:
    """The device the search trains on, as the string the study records (the one resolver
    of dynify/_device.py, limited to what the search runs on)."""
    device = resolve_device(requested)
    if device.type not in ("cpu", "cuda"):
        raise DynifyError(f"device {requested!r}: the search runs on cpu or cuda (cuda:N)")
    return str(device)


def _objectives(names: Sequence[str]) -> tuple[str, ...]:
    names = tuple(n.strip().lower() for n in names if n.strip())
    if not names or names[0] != "accuracy" or len(names) > 2 or len(set(names)) != len(names):
        raise DynifyError(
            f"--objectives {','.join(names)!r}: give 'accuracy', 'accuracy,latency' or "
            "'accuracy,params'"
        )
    for n in names:
        if n not in OBJECTIVES:
            raise DynifyError(f"unknown objective {n!r}; accepted: {', '.join(OBJECTIVES)}")
    return names


def _weights_fingerprint(model: nn.Module) -> str:
    """A short hash of the starting weights, so workers can tell they share them."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().flatten()[:: max(1, t.numel() // 64)].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# The fraction held out when the space's split does not fit the data: finetune's --holdout.
SCALED_HOLDOUT = 0.1


def _fit_budget(
    settings: SearchSettings, space: SearchSpace, n: int, spec: str
) -> tuple[TrainingBudget, str | None]:
    """The training budget per trial for ``n`` training images: the space's, with the
    command's ``epochs`` / ``train_images`` / ``val_images`` in place of its own, and (when
    the data is smaller than the space's counts) the counts the command did not give scaled
    to the data, with a note saying so. Refuses only what cannot work: explicit counts the
    data cannot hold, or fewer than two images."""
    overrides = {
        key: getattr(settings, key)
        for key in ("epochs", "train_images", "val_images")
        if getattr(settings, key) is not None
    }
    budget = dataclasses.replace(space.training, **overrides)
    val, train = budget.val_images, budget.train_images
    if val < n and val + (train or 0) <= n:
        return budget, None
    if n < 2:
        raise DynifyError(
            f"data {spec!r} has {n} training image(s); a search needs at least 2 (one to train "
            "on, one held out): give more data"
        )
    given_val, given_train = "val_images" in overrides, "train_images" in overrides
    if given_val and given_train:
        raise DynifyError(
            f"data {spec!r} has {n:,} training images; --val-images {val:,} and "
            f"--train-images {train:,} need {val + (train or 0):,}: give counts that add up to "
            f"at most {n:,}"
        )
    if given_val and val >= n:
        raise DynifyError(
            f"data {spec!r} has {n:,} training images; --val-images {val:,} leaves none to "
            f"train on: give --val-images below {n:,}"
        )
    if given_val:
        new_val = val
    elif train is None or given_train:
        new_val = max(1, round(n * SCALED_HOLDOUT))
    else:
        new_val = max(1, round(n * val / (val + train)))  # keep the space's proportion
    new_val = min(new_val, n - 1)
    if given_train and train is not None and train > n - new_val:
        raise DynifyError(
            f"data {spec!r} has {n:,} training images; --train-images {train:,} and the "
            f"{new_val:,} held out need {train + new_val:,}: give --train-images at most "
            f"{n - new_val:,} (or --val-images)"
        )
    new_train = train if given_train else (None if train is None else n - new_val)
    asked = f"{val:,} held out" + (f" + {train:,} to train on" if train else "")
    used = f"{new_val:,} held out and {new_train or n - new_val:,} to train on"
    note = (
        f"data {spec!r} has {n:,} training images, fewer than the space {space.label!r} asks "
        f"for ({asked}); using {used} (--val-images and --train-images choose)"
    )
    return dataclasses.replace(budget, val_images=new_val, train_images=new_train), note


def _split_data(full: Any, space: SearchSpace) -> Any:
    """Training images and a held-out set, both taken from the training split of ``full``
    (the test split is never used by the search), fixed by the space's seed; the space's
    budget fits the data (:func:`_fit_budget`)."""
    from torch.utils.data import Subset

    from dynify.train import Data

    budget = space.training
    n = len(full.train)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(budget.seed)).tolist()
    val = order[: budget.val_images]
    rest = order[budget.val_images :]
    train = rest[: budget.train_images] if budget.train_images else rest
    return Data(
        Subset(full.train, sorted(train)),
        Subset(full.train, sorted(val)),
        full.classes,
        full.source,
        f"{len(val):,} images held out from {full.source}",
    )


def prepare(settings: SearchSettings) -> SearchContext:
    """Validate everything and build what the trials share; refuses an impossible budget
    before any training."""
    from dynify.models import create_model

    for name in NUMERIC_SETTINGS:
        if getattr(settings, name) is not None:
            check_number(name, getattr(settings, name))
    # Before any model is built or any data read: a file in the way is one line now.
    ensure_writable(settings.output, what="--output", folder=True)
    # And the --storage file (SQLite or journal), named by the URL as redact_url shows it.
    if settings.storage and (storage_file := local_storage_file(settings.storage)) is not None:
        ensure_writable(storage_file, what=f"--storage {redact_url(settings.storage)!r} file")
    space = load_space(settings.space)
    budget = parse_budget(settings.budget)
    max_latency = parse_budget(settings.max_latency).value if settings.max_latency else None
    if settings.max_latency and parse_budget(settings.max_latency).kind != "latency":
        raise DynifyError(f"--max-latency {settings.max_latency!r}: give a time such as 3ms")
    # " Accuracy, params" and "accuracy,params" are the same search (and the same study).
    settings = dataclasses.replace(settings, objectives=_objectives(settings.objectives))
    device = _device(settings.device)
    model_name = settings.model or space.model
    data_spec = settings.data or space.data
    if not data_spec:
        raise DynifyError(f"no data: give --data (the space {space.label!r} names none)")

    from dynify.train import load_data

    full = load_data(data_spec, cache_dir=settings.data_cache)  # indexes it; reads no image
    training, note = _fit_budget(settings, space, len(full.train), data_spec)
    space = dataclasses.replace(space, training=training)
    torch.manual_seed(settings.seed)  # the random init every trial starts from
    base = create_model(
        model_name,
        pretrained=settings.pretrained,
        checkpoint=settings.checkpoint,
        num_classes=full.num_classes,
    ).eval()
    trace = trace_model(base, input_size=space.input_size)
    candidates = resolve_plan(trace, space.candidates)
    if not candidates.converted:
        raise DynifyError(f"the space {space.label!r} selects no conv of {model_name}")
    static_plan = resolve_plan(trace, Recipe(defaults=LayerSettings(convert=False)))
    static_cost = cost.price(static_plan)
    ctx = SearchContext(
        settings=settings,
        space=space,
        model_name=model_name,
        budget=budget,
        max_latency=max_latency,
        device=device,
        base=base,
        trace=trace,
        candidates=candidates,
        groups={
            g: [lp.name for lp in lps]
            for g, lps in group_layers(candidates, space.granularity).items()
        },
        data=None,  # split below, once the budget is known to be possible
        static_plan=static_plan,
        static_cost=static_cost,
        fingerprint=_weights_fingerprint(base),
    )
    if note is not None:
        ctx.notes.append(note)
    _refuse_impossible(ctx)
    ctx.data = _split_data(full, space)
    ctx.presets = [STATIC] + [
        name
        for name in PRESET_RECIPES
        if name in bundled_names("recipes")
        and all(v <= 0 for v in _cost_constraints(ctx, _preset_plan(ctx, name)).values())
    ]
    return ctx


def _static_latency(ctx: SearchContext) -> float:
    if ctx.static_latency is None:
        size = ctx.space.input_size
        ctx.static_latency = cost.latency(ctx.base, size, device=ctx.device).median
    return ctx.static_latency


def _refuse_impossible(ctx: SearchContext) -> None:
    size = "x".join(map(str, ctx.space.input_size))
    what = f"{ctx.model_name} at {size}"
    if ctx.budget.kind == "latency":
        static = _static_latency(ctx)
        if static > ctx.budget.value:
            raise DynifyError(
                f"budget {ctx.budget} is below the static model's own latency ({what}: "
                f"{static * 1e3:.2f} ms on {ctx.device}); no plan can meet it"
            )
    else:
        amount = _amount(ctx.budget.kind, ctx.static_cost)
        if amount > ctx.budget.value:
            shown = Budget(ctx.budget.kind, amount)
            raise DynifyError(
                f"budget {ctx.budget} is below the static model's own cost ({what}: {shown}); "
                "no plan can meet it: raise the budget or pick a smaller model or input size"
            )
    if ctx.settings.max_params is not None and ctx.static_cost.params > ctx.settings.max_params:
        raise DynifyError(
            f"--max-params {ctx.settings.max_params:g} is below the static model's "
            f"{ctx.static_cost.params:,} parameters; no plan can meet it"
        )
    if ctx.max_latency is not None and _static_latency(ctx) > ctx.max_latency:
        raise DynifyError(
            f"--max-latency {ctx.max_latency * 1e3:g} ms is below the static model's latency "
            f"({_static_latency(ctx) * 1e3:.2f} ms on {ctx.device}); no plan can meet it"
        )


def _amount(kind: str, totals: cost.Totals) -> float:
    return float({"flops": totals.flops, "macs": totals.macs, "params": totals.params}[kind])


def training_speed(ctx: SearchContext, *, steps: int = 2) -> float:
    """Images per second that the static model trains at on the search's device and batch
    (a few timed SGD steps on random images after one untimed step): the basis of the
    estimate printed before a search; dynamic plans train slower than this."""
    budget = ctx.space.training
    model = copy.deepcopy(ctx.base).to(ctx.device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    images = torch.randn(budget.batch_size, *ctx.space.input_size, device=ctx.device)
    labels = torch.randint(0, ctx.data.num_classes, (budget.batch_size,), device=ctx.device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    step()  # allocations, cuDNN's choice of kernels
    if ctx.device.startswith("cuda"):
        torch.cuda.synchronize(ctx.device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if ctx.device.startswith("cuda"):
        torch.cuda.synchronize(ctx.device)
    return steps * budget.batch_size / max(time.perf_counter() - start, 1e-9)


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


# -- plans from trials ----------------------------------------------------------------------


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
    (1 = stays static) and, when dynamic, a reduction and an attention kind."""
    space = ctx.space
    schedule = _schedule_from(trial, space)
    rules = [Rule(Selector(), {"convert": False}, name="static unless chosen")]
    for group, names in ctx.groups.items():
        experts = trial.suggest_categorical(f"experts.{group}", list(space.experts))
        if experts == 1:
            continue
        reduction = trial.suggest_categorical(f"reduction.{group}", list(space.reduction))
        attention = trial.suggest_categorical(f"attention.{group}", list(space.attention))
        settings = {
            "convert": True,
            "experts": experts,
            "reduction": reduction,
            "attention": attention,
            "temperature": schedule,
        }
        rules.append(Rule(Selector(name=tuple(names)), settings, name=group))
    return Recipe(defaults=space.candidates.defaults, rules=tuple(rules))


def _preset_plan(ctx: SearchContext, name: str) -> Plan:
    if name == STATIC:
        return ctx.static_plan
    return resolve_plan(ctx.trace, load_recipe(name))


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
        return _preset_plan(ctx, preset)
    if isinstance(trial, optuna.trial.FrozenTrial):
        trial = optuna.trial.FixedTrial(trial.params)  # type: ignore[assignment]
    recipe = sample_recipe(trial, ctx)  # type: ignore[arg-type]
    return resolve_plan(ctx.trace, recipe, model_name=ctx.model_name)


# -- constraints and the objective ----------------------------------------------------------


def _cost_constraints(ctx: SearchContext, plan: Plan) -> dict[str, float]:
    """Counted constraints, as relative excess (> 0 violates): milliseconds to compute."""
    totals = cost.price(plan)
    out: dict[str, float] = {}
    if ctx.budget.kind != "latency":
        out["budget"] = _amount(ctx.budget.kind, totals) / ctx.budget.value - 1.0
    if ctx.settings.max_params is not None:
        out["params"] = totals.params / ctx.settings.max_params - 1.0
    return out


def _latency_limit(ctx: SearchContext) -> float | None:
    limits = [ctx.max_latency] if ctx.max_latency is not None else []
    if ctx.budget.kind == "latency":
        limits.append(ctx.budget.value)
    return min(limits) if limits else None


def _worst(ctx: SearchContext) -> float | tuple[float, ...]:
    """The value an infeasible trial reports: the worst accuracy (and the worst second
    objective), so it never ranks anywhere but last."""
    objectives = ctx.settings.objectives
    return 0.0 if len(objectives) == 1 else (0.0, math.inf)


def plan_key(plan: Plan) -> str:
    """A short hash of what a plan converts and how: equal plans (e.g. a sampled plan that
    keeps every group static, whatever temperature it drew, and the static preset) share it."""
    layers = sorted((lp.name, lp.settings.to_dict()) for lp in plan.converted)
    text = json.dumps(layers, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
            if all(v <= 0 for v in other.constraints.values()):
                return other
    return None


def objective(trial: optuna.Trial, ctx: SearchContext) -> float | tuple[float, ...]:
    """Price the trial's plan; if it fits, build it, measure its latency when a limit or an
    objective needs it, fine-tune it and return the held-out top-1 (and the second
    objective). A plan equal to one a finished trial trained is not trained again: that
    trial's result is reused (training is deterministic for a plan)."""
    from dynify.train import finetune

    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    plan = plan_of_trial(trial, ctx)
    totals = cost.price(plan)
    key = plan_key(plan)
    trial.set_user_attr("plan", key)
    trial.set_user_attr("macs", totals.macs)
    trial.set_user_attr("flops", totals.flops)
    trial.set_user_attr("params", totals.params)
    trial.set_user_attr("converted", len(plan.converted))
    constraints = _cost_constraints(ctx, plan)
    limit = _latency_limit(ctx)
    if any(v > 0 for v in constraints.values()):
        if limit is not None:
            constraints["latency"] = 0.0  # not measured: the count already fails
        _constrain(trial, constraints)
        return _worst(ctx)

    same = _same_plan(trial, key)
    if same is not None:
        trial.set_user_attr("same_as", same.number)
        for attr in (
            "latency_ms",
            "top1_history",
            "images_per_s",
            "routing_effect",
            "attention_entropy",
        ):
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
    if any(v > 0 for v in constraints.values()):
        return _worst(ctx)

    single = len(ctx.settings.objectives) == 1

    budget = ctx.space.training

    def report(epoch: int, metrics: dict[str, Any]) -> None:
        if ctx.settings.progress:
            rate = metrics.get("images_per_s")
            print(
                f"{ctx.prefix}  trial {trial.number} epoch {epoch}/{budget.epochs}: held-out "
                f"top-1 {float(metrics['val_top1']):.2f}%"
                + (f", {rate:,.0f} images/s" if rate else "")
                + f", {float(metrics.get('seconds', 0.0)):.0f}s",
                flush=True,
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
        print(
            f"{ctx.prefix}  trial {trial.number}: training {what} "
            f"({len(plan.converted)} dynamic convs, {cost.format_count(totals.flops)}FLOPs) "
            f"for {budget.epochs} epoch(s) on {len(ctx.data.train):,} images",
            flush=True,
        )
    result = finetune(
        model=model,
        data=ctx.data,
        epochs=budget.epochs,
        batch_size=budget.batch_size,
        lr=budget.lr,
        img_size=ctx.space.input_size[1],
        device=ctx.device,
        seed=budget.seed,
        workers=budget.workers,
        callbacks=[report],
        progress=False,
    )
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


# -- storage and the study -------------------------------------------------------------------


def has_heartbeat(settings: SearchSettings) -> bool:
    """Whether the storage tracks trial heartbeats (SQLite and other RDB storages do; Optuna's
    journal storage does not, so a trial whose process died stays RUNNING there)."""
    return not (settings.storage or "").startswith("journal:")


def storage_url(settings: SearchSettings) -> str:
    """The storage URL of ``settings``: ``--storage``, or SQLite in the run folder."""
    return settings.storage or f"sqlite:///{Path(settings.output).resolve() / 'study.db'}"


# sqlite:///FILE, with or without a driver named (sqlite+pysqlite:///FILE), and its options.
_SQLITE_FILE = re.compile(r"sqlite(?:\+\w+)?:///(?P<path>[^?]*)")


def local_storage_file(url: str) -> Path | None:
    """The file a ``journal:PATH`` or ``sqlite:///FILE`` URL names; None for a database server
    or an in-memory SQLite."""
    if url.startswith("journal:"):
        return Path(url.removeprefix("journal:").removeprefix("//"))
    match = _SQLITE_FILE.match(url)
    if match is None or match["path"] in ("", ":memory:"):
        return None
    return Path(match["path"])


def make_storage(settings: SearchSettings) -> optuna.storages.BaseStorage:
    """The study's storage: SQLite in the run folder by default; any SQLAlchemy URL
    (``postgresql://``, ``mysql://``) or ``journal:PATH`` (a journal file on a shared file
    system). RDB storages get a heartbeat, so a trial whose process died is marked failed and
    retried (up to twice) by the next process that runs the study."""
    url = storage_url(settings)
    path = local_storage_file(url)
    folder = None if path is None else path.parent
    try:
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            return JournalStorage(JournalFileBackend(str(path)))
    except OSError as err:  # e.g. a file in the way, made after prepare's check
        reason = err.strerror or type(err).__name__
        raise DynifyError(
            f"--storage {redact_url(url)!r}: cannot create {str(err.filename or path)!r} "
            f"({reason}); choose another path"
        ) from None
    shown = url
    url = _with_driver(url)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 120}
    for attempt in range(_CREATE_ATTEMPTS):
        try:
            # Creating the tables of a new storage races between processes that start together
            # (one gets "UNIQUE constraint failed: alembic_version..." or "table ... already
            # exists"): processes on this machine take turns, others retry once it is made.
            with _folder_lock(folder), warnings.catch_warnings():
                # Heartbeats are "experimental" in Optuna's terms; they make resume work.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=settings.heartbeat,
                    grace_period=2 * settings.heartbeat,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                        max_retry=2
                    ),
                )
        except Exception as err:  # SQLAlchemy / driver errors: one line, naming the URL
            if _creation_race(err) and attempt + 1 < _CREATE_ATTEMPTS:
                time.sleep(0.2 * (attempt + 1))
                continue
            message = str(err).strip().splitlines()[0] if str(err).strip() else ""
            message = redact_text(message, shown)
            raise DynifyError(
                f"--storage {redact_url(shown)!r}: cannot open ({type(err).__name__}: {message}); "
                "accepted: sqlite:///FILE, postgresql://USER:PASS@HOST/DB, mysql://..., "
                "journal:PATH"
            ) from None
    raise AssertionError("unreachable")  # the last attempt returns or raises


_CREATE_ATTEMPTS = 5


def _creation_race(err: Exception) -> bool:
    """Whether ``err`` is another process creating the same new storage's tables."""
    import sqlalchemy.exc

    text = str(err).lower()
    return isinstance(err, sqlalchemy.exc.DBAPIError) and any(
        words in text for words in ("already exists", "unique constraint", "duplicate")
    )


@contextlib.contextmanager
def _folder_lock(folder: Path | None) -> Iterator[None]:
    """An exclusive ``flock`` on ``folder`` itself (no lock file is left behind), or nothing
    when there is no local folder or the platform has no flock."""
    try:
        import fcntl
    except ImportError:  # Windows: the retry covers it
        fcntl = None  # type: ignore[assignment]
    if folder is None or fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # a file system without locks (some NFS): retry
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


# SQLAlchemy's default driver for a bare scheme, and the ones tried instead when it is missing
# (SQLAlchemy 2.1 made psycopg 3 the PostgreSQL default; dynify's 'postgres' extra installs
# psycopg2).
_DRIVERS: dict[str, tuple[tuple[str, str], ...]] = {
    "postgresql": (("psycopg", "psycopg"), ("psycopg2", "psycopg2"), ("pg8000", "pg8000")),
    "mysql": (
        ("mysqldb", "MySQLdb"),
        ("pymysql", "pymysql"),
        ("mysqlconnector", "mysql.connector"),
    ),
}


def _with_driver(url: str) -> str:
    """``postgresql://...`` with an installed driver named (``postgresql+psycopg2://...``);
    a URL that names its driver is left as it is. Missing every driver is a clear error."""
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if scheme == "postgres":  # the libpq spelling SQLAlchemy does not accept
        scheme = "postgresql"
    if not sep or scheme not in _DRIVERS:
        return url
    for driver, module in _DRIVERS[scheme]:
        with contextlib.suppress(ImportError, ValueError):
            if importlib.util.find_spec(module) is not None:
                return f"{scheme}+{driver}://{rest}"
    names = ", ".join(module for _, module in _DRIVERS[scheme])
    hint = "pip install 'dynify[postgres]'" if scheme == "postgresql" else "pip install pymysql"
    raise DynifyError(
        f"--storage {redact_url(url)!r}: no {scheme} driver is installed ({names}); {hint}"
    )


# Query-string keys that carry a secret (libpq's password and sslpassword, tokens, keys).
_SECRET_QUERY = re.compile(r"pass|pwd|secret|token|key|auth|credential", re.IGNORECASE)
HIDDEN = "***"


def redact_url(url: str) -> str:
    """``url`` fit to print or store: its password (and any secret in its query string)
    replaced by ``***``, parsed as SQLAlchemy parses it. A URL that does not parse is not
    shown at all (only its scheme), since where its secret lies is unknown."""
    if url.startswith("journal:"):
        return url  # a file path: nothing secret in it
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # ArgumentError, or ValueError for a bad port
        scheme = url.partition("://")[0]
        shown = scheme if re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme) else "a storage"
        return f"{shown} URL that does not parse (not shown, it may hold a password)"
    host = parsed.host
    if host and "@" in host:
        # A password with a raw '@': SQLAlchemy takes the text after its first '@' as part
        # of the host, so that part is the rest of the password.
        host = host.rsplit("@", 1)[1]
        parsed = parsed.set(host=host, password=parsed.password or HIDDEN)
    query = {
        key: (HIDDEN if _SECRET_QUERY.search(key) else value) for key, value in parsed.query.items()
    }
    rendered = parsed.set(query=query).render_as_string(hide_password=True)
    # render_as_string percent-encodes the query's '***'; write it as the password is.
    return rendered.replace("%2A%2A%2A", HIDDEN)


def _secrets(url: str) -> list[str]:
    """The pieces of ``url`` that must not appear in a message: every reading of its password
    (as SQLAlchemy parses it, as typed, percent-decoded, and the wider readings a raw '@' or a
    user name with ':' allow), query-string secrets (as typed and decoded), and the whole URL
    when it does not parse. Hiding a candidate that was not the password costs a word of the
    message; missing one prints a password, so every candidate is kept."""
    from urllib.parse import unquote, unquote_plus

    from sqlalchemy.engine import make_url

    rest = url.partition("://")[2]
    try:
        parsed = make_url(url)
    except Exception:
        return [url, rest]
    found = [url]
    if parsed.password is not None:
        found.append(str(parsed.password))
    # SQLAlchemy's reading: the user name stops at ':' or '/', the password at the first '@'
    # (so it may hold '/', '?' or '#'); that text as typed, before percent-decoding.
    user = re.split(r"[:/]", rest, maxsplit=1)[0]
    typed = rest[len(user) + 1 :].partition("@")[0] if parsed.password is not None else ""
    found.append(typed)
    if parsed.host and "@" in parsed.host:
        # A password with a raw '@': SQLAlchemy reads the text after its first '@' as part of
        # the host, and drivers quote that host; its head is the rest of the password.
        tail = parsed.host.rsplit("@", 1)[0]
        found += [tail, f"{typed}@{tail}"]
    # The widest reading: everything before the last '@' is user and password, and the
    # password starts after any ':' in it (a user name may hold ':').
    userinfo = rest.rpartition("@")[0]
    for i, char in enumerate(userinfo):
        if char == ":":
            found.append(userinfo[i + 1 :])
    for key, value in parsed.query.items():
        if _SECRET_QUERY.search(key):
            found += [value] if isinstance(value, str) else list(value)
    # The query as typed: a driver may quote a value before it is decoded.
    for pair in rest.partition("?")[2].split("&"):
        key, _, value = pair.partition("=")
        if _SECRET_QUERY.search(unquote_plus(key)):
            found += [value, unquote_plus(value)]
    found += [unquote(f) for f in found[1:]]  # the URL itself is replaced by redact_url's
    return list(dict.fromkeys(f for f in found if f))


# The longest driver message a storage error quotes (cut at a word by ``shorten``).
MESSAGE_LIMIT = 160


def redact_text(text: str, url: str, *, limit: int = MESSAGE_LIMIT) -> str:
    """``text`` (e.g. a driver's error message) with every secret of ``url`` hidden, cut to
    ``limit`` characters at a word. Secrets are hidden before the cut, so a cut cannot leave
    part of one that the replacement would then miss."""
    for secret in sorted(_secrets(url), key=len, reverse=True):
        if secret == url:
            text = text.replace(url, redact_url(url))
        elif len(secret) >= 4:
            text = text.replace(secret, HIDDEN)
        else:  # a short one only where it stands alone, not inside every word
            text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", HIDDEN, text)
    return shorten(text, limit)


def study_name(ctx: SearchContext) -> str:
    if ctx.settings.study:
        return ctx.settings.study
    size = "x".join(map(str, ctx.space.input_size[1:]))
    # The parsed budget, so 600MFLOPs and 0.6GFLOPs name the same study.
    budget = str(ctx.budget).replace(" ", "")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{ctx.model_name}-{size}-{budget}")


def _identity(ctx: SearchContext) -> dict[str, Any]:
    """What must be the same for processes to share a study."""
    space = ctx.space
    choices = {
        "granularity": space.granularity,
        "experts": list(space.experts),
        "reduction": list(space.reduction),
        "attention": list(space.attention),
        "temperature": repr(space.temperature),
        "training": repr(space.training),
    }
    return {
        "model": ctx.model_name,
        "budget": str(ctx.budget),
        "max_params": ctx.settings.max_params,
        "max_latency": ctx.max_latency,
        "space": space.label,
        "choices": hashlib.sha256(json.dumps(choices).encode()).hexdigest()[:16],
        "input_size": list(space.input_size),
        "objectives": list(ctx.settings.objectives),
        "weights": ctx.fingerprint,
        "groups": sorted(ctx.groups),
    }


def open_study(ctx: SearchContext, *, create: bool) -> optuna.Study:
    """Create (``create``) or load the study; refuse one that was made for another search.

    The process that creates the study enqueues the presets (once, even when several
    processes start together) and seeds its sampler with ``--seed`` when it is the only
    worker, so a fresh one-process run is reproducible. Every other process (a resume, a
    ``--workers`` process, another machine) gets a freshly seeded sampler, so processes do
    not all draw the same plans.
    """
    storage = make_storage(ctx.settings)
    name = study_name(ctx)
    maximize, minimize = optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE
    directions = [maximize] + [minimize] * (len(ctx.settings.objectives) - 1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    identity = _identity(ctx)
    created = False
    if create:
        try:
            study_id = storage.create_new_study(directions, study_name=name)
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            pass  # a resume, or another process made it first
        else:
            # Claim the presets at once: a process joining a moment later sees the claim and
            # does not queue them again (the run-time check in _claim covers the rest).
            storage.set_study_user_attr(study_id, "dynify", identity)
            storage.set_study_user_attr(study_id, "presets_enqueued", list(ctx.presets))
    sampler = optuna.samplers.TPESampler(
        seed=ctx.settings.seed if created and ctx.settings.workers == 1 else None,
        n_startup_trials=max(len(ctx.presets) + 2, 5),
        multivariate=True,
        constant_liar=True,
    )
    pruner = optuna.pruners.MedianPruner(n_startup_trials=len(ctx.presets) + 1, n_warmup_steps=0)
    try:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        raise DynifyError(
            f"study {name!r} does not exist in "
            f"{redact_url(ctx.settings.storage) if ctx.settings.storage else 'the run folder'}"
        ) from None
    existing = study.user_attrs.get("dynify")
    if existing is None and create:
        study.set_user_attr("dynify", identity)
    elif existing is not None and existing != identity:
        diff = ", ".join(
            f"{k}: {existing.get(k)!r} there vs {v!r} here"
            for k, v in identity.items()
            if existing.get(k) != v
        )
        raise DynifyError(
            f"study {name!r} in this storage belongs to another search ({diff}); "
            "use another --study name or --output folder"
        )
    if list(study.directions) != directions:
        raise DynifyError(
            f"study {name!r} has {len(study.directions)} objective(s), this search "
            f"{len(directions)}; use another --study name or --output folder"
        )
    # Presets: queued by the creator; a later process queues them only if the creator died
    # before it could claim them.
    if created or (create and "presets_enqueued" not in study.user_attrs):
        if not created:
            study.set_user_attr("presets_enqueued", list(ctx.presets))
        for preset in ctx.presets:
            params = static_params(ctx) if preset == STATIC else {}
            study.enqueue_trial(params, user_attrs={"preset": preset})
    if create:
        # Two resumes at once must not both queue a retry of the same trial: on a local
        # storage they take turns under the folder lock that guards its creation, each reading
        # the trials afresh under it; on a server, _claim runs only the first of two retries.
        path = local_storage_file(storage_url(ctx.settings))
        with _folder_lock(None if path is None else path.parent):
            requeue_interrupted(study)
    return study


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=FINISHED)


class _Surplus(Exception):
    """Another process claimed the study's last trial first; this one is not run."""


def _claim(
    trial: optuna.Trial, ctx: SearchContext, *, heartbeat: bool = True
) -> float | tuple[float, ...]:
    """Run ``trial`` unless another trial has it covered:

    - a preset that another live trial (finished, running or queued ahead of it) already
      runs: two processes that opened a new study together may both have queued the presets;
    - likewise a retry of an interrupted trial that an earlier live trial already retries
      (two resumes at once on a database server may both have queued it);
    - with a heartbeat, a trial the trials before it (finished or running) leave no room for:
      two processes may ask for the study's last trial at the same moment, and the one with
      the higher number steps aside, so the study ends with exactly ``--trials`` finished.
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
            raise _Surplus(note)
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
            raise _Surplus(note)
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
    from dynify.train import TrainingDiverged

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
                lambda trial: _claim(trial, ctx, heartbeat=heartbeat),
                n_trials=1,
                callbacks=callbacks,
                catch=(TrainingDiverged, _Surplus),
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
            print(
                "warning: a trial of this process was declared dead by another; its retry "
                "counts instead",
                file=sys.stderr,
                flush=True,
            )
        if (
            ran
            and ran[-1].state == optuna.trial.TrialState.FAIL
            and "surplus" not in ran[-1].user_attrs
        ):
            failures += 1
            if failures >= max(3, target):
                print(
                    f"warning: {failures} trials failed in this process (training diverged); "
                    "stopping it",
                    file=sys.stderr,
                    flush=True,
                )
                break
    return study

"""What every trial of a search shares, resolved once per process by :func:`prepare`.

Owns the set-up: the settings checked, the run folder and storage file checked before any
work, the device the search trains on, the data read and split, the starting model (and the
fingerprint of its weights), the trace and the candidate groups; the budget and limits, with
the constraints they put on a plan and the refusal of a budget no plan can meet; and the
presets (the static model and the bundled recipes that fit), the first trials of a study.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import dynify.models
import dynify.train
from dynify import cost
from dynify._device import resolve_device
from dynify._io import ensure_writable
from dynify._resources import bundled_names
from dynify.cost import Budget, parse_budget
from dynify.errors import DynifyError
from dynify.plan import Plan, resolve_plan
from dynify.recipe import LayerSettings, Recipe, load_recipe
from dynify.search.data import fit_budget, split_data
from dynify.search.settings import SearchSettings, check_settings
from dynify.search.space import SearchSpace, group_layers, load_space
from dynify.search.storage import local_storage_file, redact_url
from dynify.search.trials import meets
from dynify.trace import ModelTrace, trace_model

__all__ = [
    "PRESET_RECIPES",
    "STATIC",
    "Note",
    "SearchContext",
    "cost_constraints",
    "latency_limit",
    "prepare",
    "preset_plan",
    "search_device",
]

# Bundled recipes tried as the first trials when they fit the budget.
PRESET_RECIPES: tuple[str, ...] = ("dycnn", "mobile", "condconv")
STATIC = "static"


class Note(str):
    """Something the search chose for the user (a ``str``), and the Python arguments it
    names (which the command line shows as its flags)."""

    arguments: tuple[str, ...]

    def __new__(cls, text: str, arguments: tuple[str, ...] = ()) -> Note:
        note = super().__new__(cls, text)
        note.arguments = tuple(arguments)
        return note


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
    notes: list[Note] = field(default_factory=list)
    # Put before this process's progress lines ("[worker 1] ").
    prefix: str = ""

    @property
    def output(self) -> Path:
        return Path(self.settings.output)


def search_device(requested: str | None) -> str:
    """The device the search trains on, as the string the study records (the one resolver
    of dynify/_device.py, limited to what the search runs on)."""
    device = resolve_device(requested)
    if device.type not in ("cpu", "cuda"):
        raise DynifyError(f"device {requested!r}: the search runs on cpu or cuda (cuda:N)")
    return str(device)


def _weights_fingerprint(model: nn.Module) -> str:
    """A short hash of the starting weights, so workers can tell they share them."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().flatten()[:: max(1, t.numel() // 64)].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _writable(path: str | Path, *, what: str, argument: str, folder: bool = False) -> None:
    """:func:`ensure_writable`, its message naming the argument ``argument``."""
    try:
        ensure_writable(path, what=what, folder=folder)
    except DynifyError as err:
        raise DynifyError(str(err), arguments=(*err.arguments, argument)) from err


def prepare(settings: SearchSettings) -> SearchContext:
    """Validate everything and build what the trials share; refuses an impossible budget
    before any training."""
    settings = check_settings(settings)
    # Before any model is built or any data read: a file in the way is one line now.
    _writable(settings.output, what="output", argument="output", folder=True)
    # And the storage file (SQLite or journal), named by the URL as redact_url shows it.
    if settings.storage and (storage_file := local_storage_file(settings.storage)) is not None:
        shown = redact_url(settings.storage)
        _writable(storage_file, what=f"storage {shown!r} file", argument="storage")
    space = load_space(settings.space)
    budget = parse_budget(settings.budget)
    max_latency = None
    if settings.max_latency:
        limit = parse_budget(settings.max_latency)
        if limit.kind != "latency":
            raise DynifyError(
                f"max_latency {settings.max_latency!r}: give a time such as 3ms",
                arguments=("max_latency",),
            )
        max_latency = limit.value
    device = search_device(settings.device)
    model_name = settings.model or space.model
    data_spec = settings.data or space.data
    if not data_spec:
        raise DynifyError(
            f"no images to search on: give data (the space {space.label!r} names none)",
            arguments=("data",),
        )

    full = dynify.train.load_data(data_spec, cache_dir=settings.data_cache)  # reads no image
    training, note = fit_budget(settings, space, len(full.train), data_spec)
    space = dataclasses.replace(space, training=training)
    torch.manual_seed(settings.seed)  # the random init every trial starts from
    base = dynify.models.create_model(
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
        static_cost=cost.price(static_plan),
        fingerprint=_weights_fingerprint(base),
    )
    if note is not None:
        ctx.notes.append(Note(note, ("val_images", "train_images")))
    _refuse_impossible(ctx)
    ctx.data = split_data(full, space)
    ctx.presets = [STATIC] + [
        name
        for name in PRESET_RECIPES
        if name in bundled_names("recipes") and meets(cost_constraints(ctx, preset_plan(ctx, name)))
    ]
    return ctx


# -- the budget and the limits ----------------------------------------------------------------


def static_latency(ctx: SearchContext) -> float:
    """The static model's latency on the search's device (measured once, when needed)."""
    if ctx.static_latency is None:
        size = ctx.space.input_size
        ctx.static_latency = cost.latency(ctx.base, size, device=ctx.device).median
    return ctx.static_latency


def _refuse_impossible(ctx: SearchContext) -> None:
    size = "x".join(map(str, ctx.space.input_size))
    what = f"{ctx.model_name} at {size}"
    if ctx.budget.kind == "latency":
        static = static_latency(ctx)
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
            f"max_params {ctx.settings.max_params:g} is below the static model's "
            f"{ctx.static_cost.params:,} parameters; no plan can meet it",
            arguments=("max_params",),
        )
    if ctx.max_latency is not None and static_latency(ctx) > ctx.max_latency:
        raise DynifyError(
            f"max_latency {ctx.max_latency * 1e3:g} ms is below the static model's latency "
            f"({static_latency(ctx) * 1e3:.2f} ms on {ctx.device}); no plan can meet it",
            arguments=("max_latency",),
        )


def _amount(kind: str, totals: cost.Totals) -> float:
    return float({"flops": totals.flops, "macs": totals.macs, "params": totals.params}[kind])


def cost_constraints(ctx: SearchContext, plan: Plan) -> dict[str, float]:
    """Counted constraints, as relative excess (> 0 violates): milliseconds to compute."""
    totals = cost.price(plan)
    out: dict[str, float] = {}
    if ctx.budget.kind != "latency":
        out["budget"] = _amount(ctx.budget.kind, totals) / ctx.budget.value - 1.0
    if ctx.settings.max_params is not None:
        out["params"] = totals.params / ctx.settings.max_params - 1.0
    return out


def latency_limit(ctx: SearchContext) -> float | None:
    """The tightest latency a plan must meet (seconds), or None when none is asked for."""
    limits = [ctx.max_latency] if ctx.max_latency is not None else []
    if ctx.budget.kind == "latency":
        limits.append(ctx.budget.value)
    return min(limits) if limits else None


def preset_plan(ctx: SearchContext, name: str) -> Plan:
    """The plan of the preset ``name``: the static model, or a bundled recipe."""
    if name == STATIC:
        return ctx.static_plan
    return resolve_plan(ctx.trace, load_recipe(name))

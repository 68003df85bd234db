"""Search spaces: which convs the search may convert, the choices for each, the training
budget per trial, and the defaults (model, input size, data) of ``dynify search``.

A space is YAML (bundled ones live in the top-level ``search/`` folder)::

    model: resnet101            # default MODEL
    input_size: [3, 32, 32]     # C, H, W: tracing, costs and training resolution
    data: torch/cifar10         # default --data
    candidates:                 # a recipe: the convs it converts are the candidates
      rules:
        - {select: {stem: true}, convert: false}
    granularity: stage          # one decision per layer | block | stage
    choices:
      experts: [1, 2, 4, 8]     # 1 = the group stays static
      reduction: [4, 8]
      kind: [dycnn, odconv, dcd]  # the kinds of dynamic conv to choose from per group
    temperature:                # one schedule per trial
      start: [1, 5]
      end: [1]
      length: [1, 2]
      shape: [linear, cosine]
      unit: epoch
    training:                   # what every trial gets
      epochs: 3
      train_images: 10000       # images per epoch (a fixed subset); omit for all
      val_images: 2000          # held out from the training set, never the test set
      batch_size: 128
      lr: 0.05

Errors name the file, line and key, as for recipes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dynify._resources import locate
from dynify._yaml import Doc, load_yaml_file
from dynify.errors import quoted
from dynify.layers.attention import ATTENTION_KINDS
from dynify.layers.kinds import KINDS
from dynify.logging import get_logger
from dynify.plan import LayerPlan, Plan
from dynify.recipe import ATTENTION_KINDS_AS_KIND, Recipe, parse_recipe
from dynify.schedule import SCHEDULE_SHAPES, SCHEDULE_UNITS

_logger = get_logger(__name__)

__all__ = [
    "DEFAULT_SPACE",
    "GRANULARITIES",
    "SearchSpace",
    "TemperatureChoices",
    "TrainingBudget",
    "group_layers",
    "load_space",
]

DEFAULT_SPACE = "default"
Granularity = Literal["layer", "block", "stage"]
GRANULARITIES: tuple[str, ...] = ("layer", "block", "stage")

TOP_KEYS = (
    "version",
    "description",
    "model",
    "input_size",
    "data",
    "candidates",
    "granularity",
    "choices",
    "temperature",
    "training",
)
CHOICE_KEYS = ("experts", "reduction", "kind", "attention")  # attention: deprecated, as kind
TEMPERATURE_KEYS = ("start", "end", "length", "shape", "unit")
TRAINING_KEYS = ("epochs", "train_images", "val_images", "batch_size", "lr", "workers", "seed")


@dataclass(frozen=True)
class TemperatureChoices:
    """The temperature schedules a trial may pick (one value from each list).

    The default is a constant 1, what upcycled layers route best with (bench/README.md,
    "Routing"); a 30 -> 1 anneal over 10 epochs would keep a short trial's attention flat.
    """

    start: tuple[float, ...] = (1.0,)
    end: tuple[float, ...] = (1.0,)
    length: tuple[float, ...] = (1.0,)
    shape: tuple[str, ...] = ("linear",)
    unit: str = "epoch"


@dataclass(frozen=True)
class TrainingBudget:
    """What each trial's fine-tuning gets (the same for every trial, presets included)."""

    epochs: int = 2
    train_images: int | None = None
    val_images: int = 2000
    batch_size: int = 64
    lr: float = 0.05
    workers: int = 2
    seed: int = 0


@dataclass(frozen=True)
class SearchSpace:
    model: str
    input_size: tuple[int, int, int]
    data: str | None
    candidates: Recipe
    granularity: Granularity = "stage"
    experts: tuple[int, ...] = (1, 2, 4, 8)
    reduction: tuple[int, ...] = (4,)
    kinds: tuple[str, ...] = ("dycnn",)
    temperature: TemperatureChoices = field(default_factory=TemperatureChoices)
    training: TrainingBudget = field(default_factory=TrainingBudget)
    description: str | None = None
    source: str | None = None

    @property
    def label(self) -> str:
        return Path(self.source).stem if self.source else "inline"


def group_layers(plan: Plan, granularity: Granularity) -> dict[str, list[LayerPlan]]:
    """The candidate convs (those ``plan`` converts), grouped so that each group gets one
    decision: per layer, per block (convs outside blocks stand alone) or per stage."""
    groups: dict[str, list[LayerPlan]] = {}
    for lp in plan.converted:
        site = lp.site
        if granularity == "layer":
            key = site.name
        elif granularity == "block":
            key = site.block or site.name
        elif site.stem:
            key = "stem"
        else:
            key = f"stage{site.stage}" if site.stage is not None else "head"
        groups.setdefault(key, []).append(lp)
    return groups


def load_space(space: SearchSpace | str | os.PathLike[str] | None) -> SearchSpace:
    """A space from a SearchSpace, a YAML path or a bundled space's name (default:
    ``default``)."""
    if isinstance(space, SearchSpace):
        return space
    path = locate("search", DEFAULT_SPACE if space is None else space, also=("a SearchSpace",))
    return parse_space(load_yaml_file(path))


def _choices(doc: Doc, value: Any, path: str, item: Any) -> tuple:
    """``doc.one_or_list`` that also refuses a value listed twice (a choice is a set)."""
    values = doc.one_or_list(value, path, item)
    for i, v in enumerate(values):
        if v in values[:i]:
            raise doc.error(f"{path}[{i}]", f"{quoted(v)} is listed twice")
    return values


def parse_space(doc: Doc) -> SearchSpace:
    """Validate a parsed YAML document as a search space."""
    if doc.data is None:
        raise doc.error("", "the search space is empty")
    top = doc.mapping(doc.data, "", TOP_KEYS)
    if "version" in top and top["version"] != 1:
        raise doc.error("version", f"unsupported version {quoted(top['version'])}; accepted: 1")
    for key in ("model", "input_size"):
        if key not in top:
            raise doc.error("", f"missing key {key!r}")
    model = doc.string(top["model"], "model")
    size = top["input_size"]
    if not (isinstance(size, list) and len(size) == 3):
        raise doc.error("input_size", f"expected [C, H, W], got {quoted(size)}")
    input_size = tuple(doc.integer(v, f"input_size[{i}]", minimum=1) for i, v in enumerate(size))
    data = doc.string(top["data"], "data") if top.get("data") is not None else None
    candidates = parse_recipe(doc.sub("candidates")) if "candidates" in top else Recipe()
    granularity = (
        doc.choice(top["granularity"], "granularity", GRANULARITIES)
        if "granularity" in top
        else "stage"
    )
    choices = doc.mapping(top.get("choices"), "choices", CHOICE_KEYS)

    def ints(v: Any, p: str) -> int:
        return doc.integer(v, p, minimum=1)

    kwargs: dict[str, Any] = {}
    if "experts" in choices:
        kwargs["experts"] = _choices(doc, choices["experts"], "choices.experts", ints)
    if "reduction" in choices:
        kwargs["reduction"] = _choices(doc, choices["reduction"], "choices.reduction", ints)
    if "kind" in choices and "attention" in choices:
        raise doc.error("choices.attention", "give the kinds as choices.kind alone")
    if "kind" in choices:
        kwargs["kinds"] = _choices(
            doc, choices["kind"], "choices.kind", lambda v, p: doc.choice(v, p, KINDS)
        )
    elif "attention" in choices:
        attention = _choices(
            doc,
            choices["attention"],
            "choices.attention",
            lambda v, p: doc.choice(v, p, ATTENTION_KINDS),
        )
        kwargs["kinds"] = tuple(ATTENTION_KINDS_AS_KIND[a] for a in attention)
        _logger.warning(
            "%s: 'choices.attention' is deprecated; write 'choices.kind: [%s]'",
            doc.where("choices.attention"),
            ", ".join(kwargs["kinds"]),
        )
    return SearchSpace(
        model=model,
        input_size=input_size,  # type: ignore[arg-type]
        data=data,
        candidates=candidates,
        granularity=granularity,  # type: ignore[arg-type]
        temperature=_temperature(doc, top.get("temperature")),
        training=_training(doc, top.get("training")),
        description=doc.string(top["description"], "description") if "description" in top else None,
        source=None if doc.source.startswith("<") else doc.source,
        **kwargs,
    )


def _temperature(doc: Doc, raw: Any) -> TemperatureChoices:
    entry = doc.mapping(raw, "temperature", TEMPERATURE_KEYS)

    def positive(v: Any, p: str) -> float:
        return doc.number(v, p, minimum=0, exclusive=True)

    def length(v: Any, p: str) -> float:
        return doc.number(v, p, minimum=0)

    kwargs: dict[str, Any] = {}
    for key, item in (("start", positive), ("end", positive), ("length", length)):
        if key in entry:
            kwargs[key] = _choices(doc, entry[key], f"temperature.{key}", item)
    if "shape" in entry:
        kwargs["shape"] = _choices(
            doc, entry["shape"], "temperature.shape", lambda v, p: doc.choice(v, p, SCHEDULE_SHAPES)
        )
    if "unit" in entry:
        kwargs["unit"] = doc.choice(entry["unit"], "temperature.unit", SCHEDULE_UNITS)
    return TemperatureChoices(**kwargs)


def _training(doc: Doc, raw: Any) -> TrainingBudget:
    entry = doc.mapping(raw, "training", TRAINING_KEYS)
    kwargs: dict[str, Any] = {}
    for key in ("epochs", "val_images", "batch_size"):
        if key in entry:
            kwargs[key] = doc.integer(entry[key], f"training.{key}", minimum=1)
    if entry.get("train_images") is not None:
        kwargs["train_images"] = doc.integer(
            entry["train_images"], "training.train_images", minimum=1
        )
    for key in ("workers", "seed"):
        if key in entry:
            kwargs[key] = doc.integer(entry[key], f"training.{key}", minimum=0)
    if "lr" in entry:
        kwargs["lr"] = doc.number(entry["lr"], "training.lr", minimum=0, exclusive=True)
    return TrainingBudget(**kwargs)

"""Conversion recipes: which convs become dynamic, and with which settings.

A recipe is YAML (or the same structure as a dict)::

    defaults:                 # settings every conv starts from
      kind: dycnn             # dycnn | condconv | odconv | dcd (see below)
      experts: 4              # K (dycnn, condconv, odconv; DCD mixes no experts)
      reduction: 4            # r: attention hidden width = max(C_in // r, minimum)
      rank: null              # dcd only: the latent dimension L (default floor(sqrt(C_in)))
      init: upcycle           # upcycle | scratch | perturb (how the experts start)
      routing_std: 1.0        # upcycle: std of the random attention's last layer
      temperature: 1          # a number, or {start, end, length, shape, unit}
    rules:                    # applied in order
      - name: keep the stem static
        select: {stem: true}
        convert: false
      - select: {kernel_size: 1, last_in_block: true}
        experts: 8
    strict: false             # true: a rule that matches no conv is an error

``init`` says how a converted layer starts (``DynamicConv2d.from_conv``):

- ``upcycle`` (default): every expert a copy of the conv's kernel, a random attention whose
  weights sum to a constant, so the converted model computes exactly what the original did
  and its layers route from the first training step. For trained (pretrained) models.
  Temperature default: constant 1 (a hot start only flattens a routing that already works).
- ``scratch``: independently initialised experts and attention, as the DY-CNN paper trains
  from scratch; the function is not preserved, so ``apply`` does not check it. Temperature
  default: 30 -> 1 linearly over 10 epochs (the paper: near-uniform attention at first so
  that every random expert trains).
- ``perturb``: experts = kernel + zero-sum ``noise`` (default 0.01), attention zeroed; exact
  but measured not to route (kept for comparison). Temperature default: 30 -> 1.

``temperature`` left out means the init's default; ``noise`` applies to ``perturb`` only.

``kind`` says which dynamic convolution a conv becomes:

- ``dycnn`` (default): DY-CNN, K experts mixed by softmax(z / T) (Chen et al., CVPR 2020);
- ``condconv``: the same layer with sigmoid routing (CondConv, Yang et al., NeurIPS 2019);
- ``odconv``: ODConv, attention over the kernel's spatial positions, input and output
  channels and the K kernels (Li, Zhou, Yao, ICLR 2022); K = 1 keeps one kernel;
- ``dcd``: DCD, the static kernel with a dynamic channel scale and a low-rank dynamic
  residual (Li et al., ICLR 2021); no per-sample kernel, ``rank`` sets its latent size.

A kind covers the convs its formulation does (``dynify.layers.kinds``); any other conv a
rule gives it stays static, with the reason in the plan. The former ``attention: softmax``
/ ``attention: sigmoid`` still reads as ``kind: dycnn`` / ``kind: condconv`` (with a
deprecation warning). A field that does not apply to a kind (``rank`` beside ``kind:
dycnn``, ``experts`` beside ``kind: dcd``) is an error in the rule that sets both; one
inherited from the defaults is dropped from that conv's resolved settings.

Priority: every conv starts from ``defaults``; then each rule whose ``select`` matches it is
applied in file order, and a rule overrides only the fields it sets, so for each field the
last matching rule wins (``convert`` included). This is torch.ao's ordered-selector idea
with position in the file as the priority: put general rules first and specific ones (a
single layer by name) last.

Selectors (all given conditions must hold; an empty ``select`` matches every conv):
``name`` (glob or list of globs on the module path), ``regex`` (full match on the module
path), ``type`` (conv class: Conv2d, Conv2dSame, StdConv2d, ...), ``kernel_size``,
``stride``, ``dilation``, ``groups`` (a value or a list), ``depthwise`` (bool),
``in_channels`` / ``out_channels`` (a value, or ``{min, max}``), ``stem`` (bool),
``stage`` (timm ``feature_info`` level or list; negative counts from the last), ``block``
(glob on the enclosing block's path), ``first_in_block`` / ``last_in_block`` (bool),
``classifier`` (bool).

The same recipe in Python, validated the same way (:class:`RecipeBuilder`)::

    recipe = (
        Recipe.builder()
        .set_defaults(experts=4, reduction=4)
        .set_stem(True, convert=False, name="keep the stem static")
        .add_rule({"kernel_size": 1, "last_in_block": True}, experts=8)
        .build()
    )
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from dynify._resources import locate
from dynify._yaml import Doc, load_yaml_file
from dynify.errors import DynifyError, quoted
from dynify.layers.attention import ATTENTION_KINDS
from dynify.layers.conv_variants import CONV_CLASSES
from dynify.layers.dynamic_conv import EXPERT_INITS
from dynify.layers.kinds import DEFAULT_KIND, KINDS
from dynify.logging import get_logger
from dynify.schedule import SCHEDULE_SHAPES, SCHEDULE_UNITS, TemperatureSchedule
from dynify.trace import ConvSite

_logger = get_logger(__name__)

__all__ = [
    "CONV_TYPES",
    "DEFAULT_RECIPE",
    "LayerSettings",
    "Recipe",
    "RecipeBuilder",
    "RecipeLike",
    "Rule",
    "Selector",
    "load_recipe",
    "parse_settings",
]

DEFAULT_RECIPE = "dycnn"

# Conv classes a ``type`` selector can name (what the trace reports as ``type_name``).
CONV_TYPES: tuple[str, ...] = tuple(cls.__name__ for cls in CONV_CLASSES)

SETTING_KEYS = (
    "convert",
    "kind",
    "experts",
    "reduction",
    "rank",
    "init",
    "routing_std",
    "noise",
    "temperature",
)
# Keys a recipe may still write, read as another (with a deprecation warning).
DEPRECATED_SETTING_KEYS = ("attention",)
# The kind each former attention value meant.
ATTENTION_KINDS_AS_KIND = {"softmax": "dycnn", "sigmoid": "condconv"}
# The settings that apply to some kinds only, and those kinds.
KIND_ONLY: dict[str, tuple[str, ...]] = {
    "experts": ("dycnn", "condconv", "odconv"),
    "rank": ("dcd",),
    "routing_std": ("dycnn", "condconv", "odconv"),
    "noise": ("dycnn", "condconv"),
}
# The inits each kind starts from (its ``from_conv``).
KIND_INITS: dict[str, tuple[str, ...]] = {
    "dycnn": ("upcycle", "scratch", "perturb"),
    "condconv": ("upcycle", "scratch", "perturb"),
    "odconv": ("upcycle", "scratch"),
    "dcd": ("upcycle",),
}

# The temperature schedule each init gets when a recipe sets none (bench/README.md,
# "Routing", has the measurements behind these).
INIT_TEMPERATURES: dict[str, TemperatureSchedule] = {
    "upcycle": TemperatureSchedule.constant(1.0),
    "scratch": TemperatureSchedule(start=30.0, end=1.0, length=10.0),
    "perturb": TemperatureSchedule(start=30.0, end=1.0, length=10.0),
}
TEMPERATURE_KEYS = ("start", "end", "length", "shape", "unit")
SELECTOR_KEYS = (
    "name",
    "regex",
    "type",
    "kernel_size",
    "stride",
    "dilation",
    "groups",
    "depthwise",
    "in_channels",
    "out_channels",
    "stem",
    "stage",
    "block",
    "first_in_block",
    "last_in_block",
    "classifier",
)
RULE_KEYS = ("name", "select", *SETTING_KEYS, *DEPRECATED_SETTING_KEYS)
TOP_KEYS = ("version", "description", "defaults", "rules", "strict")


@dataclass(frozen=True)
class LayerSettings:
    """The settings one conv is converted with (or ``convert=False``).

    ``temperature`` ``None`` means the init's default (:data:`INIT_TEMPERATURES`), and
    ``noise`` ``None`` the ``perturb`` init's default; :attr:`schedule` resolves it.
    """

    convert: bool = True
    kind: str = DEFAULT_KIND
    experts: int = 4
    reduction: int = 4
    rank: int | None = None
    init: str = "upcycle"
    routing_std: float | None = None
    noise: float | None = None
    temperature: TemperatureSchedule | None = None

    @property
    def schedule(self) -> TemperatureSchedule:
        """The temperature schedule: the one set, else the init's default."""
        if self.temperature is not None:
            return self.temperature
        return INIT_TEMPERATURES.get(self.init, INIT_TEMPERATURES["upcycle"])

    @property
    def attention(self) -> str | None:
        """``softmax`` / ``sigmoid`` for the kinds that mix K experts by one of them
        (``dycnn`` / ``condconv``), else ``None``."""
        return {"dycnn": "softmax", "condconv": "sigmoid"}.get(self.kind)

    def for_kind(self) -> LayerSettings:
        """These settings with the fields that do not apply to ``kind`` dropped (DCD mixes
        no experts: ``experts`` 1), as a conv's resolved settings say them."""
        changes: dict[str, Any] = {}
        for key, kinds in KIND_ONLY.items():
            if self.kind not in kinds and getattr(self, key) is not None:
                changes[key] = 1 if key == "experts" else None
        if self.kind not in ("dycnn", "condconv", "odconv") and self.experts != 1:
            changes["experts"] = 1
        return replace(self, **changes) if changes else self

    @property
    def preserves_function(self) -> bool:
        """Whether the converted layer starts out computing exactly the original conv."""
        return self.init != "scratch"

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.temperature is not None:
            out["temperature"] = self.temperature.to_dict()
        # Left out rather than null: "the init's default" survives a round trip (a rule that
        # switches init then still gets that init's temperature).
        for key in ("rank", "routing_std", "noise", "temperature"):
            if out[key] is None:
                del out[key]
        for key, kinds in KIND_ONLY.items():  # what the kind has no use for is not written
            if self.kind not in kinds:
                out.pop(key, None)
        return out

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<settings>") -> LayerSettings:
        """Settings as :meth:`to_dict` writes them, validated (see :func:`parse_settings`)."""
        return parse_settings(Doc(data, source, {}), data, "")


@dataclass(frozen=True)
class Selector:
    """Conditions on a :class:`~dynify.trace.ConvSite`; ``None`` means "any"."""

    name: tuple[str, ...] | None = None
    regex: str | None = None
    type: tuple[str, ...] | None = None
    kernel_size: tuple[int, ...] | None = None
    stride: tuple[int, ...] | None = None
    dilation: tuple[int, ...] | None = None
    groups: tuple[int, ...] | None = None
    depthwise: bool | None = None
    in_channels: tuple[int, int] | None = None
    out_channels: tuple[int, int] | None = None
    stem: bool | None = None
    stage: tuple[int, ...] | None = None
    block: tuple[str, ...] | None = None
    first_in_block: bool | None = None
    last_in_block: bool | None = None
    classifier: bool | None = None

    def matches(self, site: ConvSite, num_stages: int = 0) -> bool:
        if self.name is not None and not any(fnmatch.fnmatchcase(site.name, g) for g in self.name):
            return False
        if self.regex is not None and re.fullmatch(self.regex, site.name) is None:
            return False
        if self.type is not None and site.type_name not in self.type:
            return False
        for key in ("kernel_size", "stride", "dilation"):
            wanted = getattr(self, key)
            value = getattr(site, key)
            if wanted is not None and not (value[0] == value[1] and value[0] in wanted):
                return False
        if self.groups is not None and site.groups not in self.groups:
            return False
        for key in ("depthwise", "stem", "first_in_block", "last_in_block", "classifier"):
            wanted = getattr(self, key)
            if wanted is not None and bool(getattr(site, key)) != wanted:
                return False
        for key in ("in_channels", "out_channels"):
            bounds = getattr(self, key)
            if bounds is not None and not bounds[0] <= getattr(site, key) <= bounds[1]:
                return False
        if self.stage is not None:
            if site.stage is None:
                return False
            wanted = {s if s >= 0 else num_stages + s for s in self.stage}
            if site.stage not in wanted:
                return False
        if self.block is not None and (
            site.block is None or not any(fnmatch.fnmatchcase(site.block, g) for g in self.block)
        ):
            return False
        return True

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name in ("in_channels", "out_channels"):
                out[f.name] = {"min": value[0], "max": value[1]}
            elif isinstance(value, tuple):
                out[f.name] = value[0] if len(value) == 1 else list(value)
            else:
                out[f.name] = value
        return out


@dataclass(frozen=True)
class Rule:
    """Select convs, then set (some) settings for them."""

    select: Selector = field(default_factory=Selector)
    settings: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    # Where the rule was read from: for messages, not part of what the rule is.
    line: int | None = field(default=None, compare=False)

    def describe(self, index: int) -> str:
        label = f"rule {index + 1}"
        if self.name:
            label += f" ({self.name})"
        return label

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.name:
            out["name"] = self.name
        sel = self.select.to_dict()
        if sel:
            out["select"] = sel
        for key, value in self.settings.items():
            out[key] = value.to_dict() if isinstance(value, TemperatureSchedule) else value
        return out


@dataclass(frozen=True)
class Recipe:
    """Defaults plus ordered rules; see the module documentation for the format, and
    :meth:`builder` to write one in Python.

    Two recipes are equal when they say the same: defaults, rules (names included), strict
    and description; where they were read from (``source``, a rule's ``line``) is left out.
    """

    defaults: LayerSettings = field(default_factory=LayerSettings)
    rules: tuple[Rule, ...] = ()
    strict: bool = False
    description: str | None = None
    source: str | None = field(default=None, compare=False)

    @staticmethod
    def builder(*, description: str | None = None, strict: bool = False) -> RecipeBuilder:
        """A :class:`RecipeBuilder`: ``Recipe.builder().set_defaults(experts=8).build()``."""
        return RecipeBuilder(description=description, strict=strict)

    @property
    def label(self) -> str:
        """A short name for messages: the file stem, or ``"inline"``."""
        return Path(self.source).stem if self.source else "inline"

    def settings_for(self, site: ConvSite, num_stages: int = 0) -> tuple[LayerSettings, list[int]]:
        """Resolve one conv: its settings and the indices of the rules that matched it."""
        settings = self.defaults
        matched = []
        for i, rule in enumerate(self.rules):
            if rule.select.matches(site, num_stages):
                settings = replace(settings, **rule.settings)
                matched.append(i)
        settings = settings.for_kind()
        if settings.temperature is None:  # the init's default, made explicit in the plan
            settings = replace(settings, temperature=settings.schedule)
        if settings.convert:
            where = f"{self.source or 'recipe'}: {site.name}"
            _check_noise(where, settings.noise, settings.init, "this conv resolves to")
            if settings.init not in KIND_INITS[settings.kind]:
                raise DynifyError(
                    f"{where}: kind: {settings.kind} starts from init: "
                    f"{', '.join(KIND_INITS[settings.kind])}, and this conv resolves to init: "
                    f"{settings.init}; set init: upcycle for it"
                )
        return settings, matched

    # -- (de)serialisation ------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<recipe>") -> Recipe:
        return parse_recipe(Doc(data, source, {}))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": 1}
        if self.description:
            out["description"] = self.description
        out["defaults"] = self.defaults.to_dict()
        out["rules"] = [r.to_dict() for r in self.rules]
        if self.strict:
            out["strict"] = True
        return out

    def to_yaml(self, header: str | None = None) -> str:
        body = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)
        if not header:
            return body
        comment = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines())
        return comment + body


# What every function that takes a recipe accepts (``load_recipe`` reads it).
RecipeLike = Recipe | dict[str, Any] | str | os.PathLike[str] | None


def load_recipe(recipe: RecipeLike) -> Recipe:
    """A Recipe from a Recipe, a dict, a YAML path, or a bundled recipe's name.

    ``None`` gives the bundled ``dycnn`` recipe (the DY-CNN paper's setting).
    """
    if recipe is None:
        recipe = DEFAULT_RECIPE
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    path = locate("recipes", recipe, also=("a dict", "a Recipe"))
    return parse_recipe(load_yaml_file(path))


# -- building a recipe in Python ----------------------------------------------------------

# What a builder's messages name as their source (as a file's name its path).
BUILDER_SOURCE = "<RecipeBuilder>"


def _yaml_form(value: Any) -> Any:
    """``value`` as YAML would hold it: a tuple is a list (what ``(2, 3)`` means in Python),
    a Selector or a TemperatureSchedule its mapping; copied, so a caller's later change to a
    dict it passed changes nothing here. The rest is left for the recipe validation."""
    if isinstance(value, Selector | TemperatureSchedule):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _yaml_form(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_yaml_form(v) for v in value]
    return value


def _select_by(key: str) -> Any:
    """The builder method ``set_<key>``: one rule selecting on ``key`` alone."""

    def method(
        self: RecipeBuilder, value: Any, /, *, name: str | None = None, **settings: Any
    ) -> RecipeBuilder:
        return self.add_rule({key: value}, name=name, **settings)

    method.__name__ = f"set_{key}"
    method.__qualname__ = f"RecipeBuilder.set_{key}"
    method.__doc__ = (
        f"Add a rule setting ``settings`` on the convs that ``select: {{{key}: value}}`` "
        f"matches; the same as ``add_rule({{{key!r}: value}}, name=name, **settings)``."
    )
    return method


class RecipeBuilder:
    """A :class:`Recipe` written in Python, call by call, as torch.ao's ``QConfigMapping``
    is (``QConfigMapping().set_global(q).set_module_name(n, q2)``)::

        recipe = (
            Recipe.builder(description="DY-CNN, more experts late")
            .set_defaults(experts=4, reduction=4)
            .set_stem(True, convert=False, name="stem stays static")
            .set_stage(-1, experts=8)
            .add_rule({"kernel_size": 1, "last_in_block": True}, reduction=8)
            .set_name("layer4.1.*", convert=False)
            .build()
        )
        model = dynify.apply(model, recipe)

    It is the YAML format spelled as calls: :meth:`set_defaults` is ``defaults``; each
    :meth:`add_rule` is one entry of ``rules`` (``select`` a mapping of the selector keys,
    ``name`` the rule's label, the settings as keywords); ``set_<key>(value, ...)`` is a
    rule with the single selector ``key`` (:meth:`set_name`, :meth:`set_regex`,
    :meth:`set_type`, :meth:`set_kernel_size`, :meth:`set_stride`, :meth:`set_dilation`,
    :meth:`set_groups`, :meth:`set_depthwise`, :meth:`set_in_channels`,
    :meth:`set_out_channels`, :meth:`set_stem`, :meth:`set_stage`, :meth:`set_block`,
    :meth:`set_first_in_block`, :meth:`set_last_in_block`, :meth:`set_classifier`). Values
    are the YAML's: a tuple or list for a list, ``{"min": 64}`` for a channel range.

    Priority is the file's: every conv starts from the defaults, then each rule that
    matches it applies in the order the rules were added, overriding only the fields it
    sets, so for each field the last matching rule wins. Add general rules first and
    specific ones (a single layer by name) last. :meth:`set_defaults` called again updates
    the fields it names.

    Each call builds the dict a recipe file parses to and validates the whole of it as a
    file is (:func:`parse_recipe`), so a mistake raises at the call that made it, with the
    file's one-line message, ``<RecipeBuilder>`` in place of the file name and ``rules[i]``
    the i-th rule added from 0 (``<RecipeBuilder>: rules[2].select.kernal_size: unknown key
    (did you mean 'kernel_size'?); accepted keys: ...``); a call that fails changes
    nothing. :meth:`build` returns the Recipe; ``recipe.to_yaml()`` writes it as a file
    that loads to an equal Recipe.
    """

    def __init__(self, *, description: str | None = None, strict: bool = False) -> None:
        data: dict[str, Any] = {"version": 1, "defaults": {}, "rules": [], "strict": strict}
        if description is not None:
            data["description"] = description
        self._data: dict[str, Any] = {}
        self._commit(data)

    @classmethod
    def from_recipe(cls, recipe: Recipe | dict[str, Any] | str | os.PathLike[str]) -> RecipeBuilder:
        """A builder that starts as ``recipe`` (anything :func:`load_recipe` takes: a bundled
        recipe's name, a path, ...); rules added go after its own, so they win."""
        return cls()._commit(load_recipe(recipe).to_dict())

    def set_defaults(self, **settings: Any) -> RecipeBuilder:
        """Set fields of ``defaults`` (``experts``, ``reduction``, ``attention``, ``init``,
        ``routing_std``, ``noise``, ``temperature``, ``convert``), keeping the others."""
        data = self.to_dict()
        data["defaults"].update(_yaml_form(settings))
        return self._commit(data)

    def add_rule(
        self,
        select: dict[str, Any] | Selector | None = None,
        *,
        name: str | None = None,
        **settings: Any,
    ) -> RecipeBuilder:
        """Add a rule: the convs that ``select`` matches (all its conditions; ``None`` or
        ``{}`` matches every conv) get ``settings``; ``name`` labels it in plans."""
        rule: dict[str, Any] = {}
        if name is not None:
            rule["name"] = name
        if select is not None:
            rule["select"] = _yaml_form(select)
        rule.update(_yaml_form(settings))
        data = self.to_dict()
        data["rules"].append(rule)
        return self._commit(data)

    set_name = _select_by("name")
    set_regex = _select_by("regex")
    set_type = _select_by("type")
    set_kernel_size = _select_by("kernel_size")
    set_stride = _select_by("stride")
    set_dilation = _select_by("dilation")
    set_groups = _select_by("groups")
    set_depthwise = _select_by("depthwise")
    set_in_channels = _select_by("in_channels")
    set_out_channels = _select_by("out_channels")
    set_stem = _select_by("stem")
    set_stage = _select_by("stage")
    set_block = _select_by("block")
    set_first_in_block = _select_by("first_in_block")
    set_last_in_block = _select_by("last_in_block")
    set_classifier = _select_by("classifier")

    def to_dict(self) -> dict[str, Any]:
        """The recipe so far, as the dict a YAML file would parse to (a copy)."""
        return _yaml_form(self._data)

    def build(self) -> Recipe:
        """The Recipe so far (the builder can go on; a later call changes no built Recipe)."""
        return parse_recipe(Doc(self.to_dict(), BUILDER_SOURCE, {}))

    def __repr__(self) -> str:
        return f"RecipeBuilder({len(self._data['rules'])} rules)"

    def _commit(self, data: dict[str, Any]) -> RecipeBuilder:
        parse_recipe(Doc(data, BUILDER_SOURCE, {}))  # raises, leaving self._data as it was
        self._data = data
        return self


# -- validation ---------------------------------------------------------------------------


def parse_recipe(doc: Doc) -> Recipe:
    """Validate a parsed YAML document (or a section of one) as a recipe."""
    data = doc.data
    if data is None:
        raise doc.error("", "the recipe is empty; expected a mapping with 'defaults' and 'rules'")
    top = doc.mapping(data, "", TOP_KEYS)
    if "version" in top and top["version"] != 1:
        version = quoted(top["version"])
        raise doc.error("version", f"unsupported recipe version {version}; accepted: 1")
    defaults = LayerSettings(**_settings(doc, top.get("defaults"), "defaults", SETTING_KEYS))
    _check_noise(doc.where("defaults.noise"), defaults.noise, defaults.init)
    raw_rules = top.get("rules") or []
    if not isinstance(raw_rules, list):
        raise doc.error("rules", f"expected a list of rules, got {quoted(raw_rules)}")
    rules = []
    for i, raw in enumerate(raw_rules):
        path = f"rules[{i}]"
        entry = doc.mapping(raw, path, RULE_KEYS)
        settings = _settings(
            doc,
            {k: v for k, v in entry.items() if k in (*SETTING_KEYS, *DEPRECATED_SETTING_KEYS)},
            path,
            SETTING_KEYS,
        )
        if not settings:
            raise doc.error(path, f"a rule must set at least one of: {', '.join(SETTING_KEYS)}")
        if "init" in settings:  # otherwise checked per layer once the rules are resolved
            _check_noise(doc.where(f"{path}.noise"), settings.get("noise"), settings["init"])
        name = doc.string(entry["name"], f"{path}.name") if "name" in entry else None
        rules.append(
            Rule(
                select=_selector(doc, entry.get("select"), f"{path}.select"),
                settings=settings,
                name=name,
                line=doc.line(path),
            )
        )
    strict = doc.boolean(top["strict"], "strict") if "strict" in top else False
    description = doc.string(top["description"], "description") if "description" in top else None
    source = None if doc.source.startswith("<") else doc.source
    return Recipe(defaults, tuple(rules), strict, description, source)


def _settings(
    doc: Doc, raw: Any, path: str, keys: tuple[str, ...], *, warn_deprecated: bool = True
) -> dict[str, Any]:
    """One mapping of settings, each value checked; a deprecated key is read as its
    replacement (a warning unless ``warn_deprecated`` is off: plans written by older
    versions are read without one)."""
    entry = doc.mapping(raw, path, (*keys, *DEPRECATED_SETTING_KEYS))
    out: dict[str, Any] = {}
    for key, value in entry.items():
        sub = f"{path}.{key}"
        if key == "convert":
            out[key] = doc.boolean(value, sub)
        elif key in ("experts", "reduction", "rank"):
            out[key] = doc.integer(value, sub, minimum=1)
        elif key == "kind":
            out[key] = doc.choice(value, sub, KINDS)
        elif key == "attention":
            kind = ATTENTION_KINDS_AS_KIND[doc.choice(value, sub, ATTENTION_KINDS)]
            if "kind" in entry and entry["kind"] != kind:
                raise doc.error(
                    sub, f"attention: {value} means kind: {kind}, but kind: {entry['kind']} is set"
                )
            if warn_deprecated:
                _logger.warning(
                    "%s: 'attention: %s' is deprecated; write 'kind: %s'",
                    doc.where(sub),
                    value,
                    kind,
                )
            out["kind"] = kind
        elif key == "init":
            out[key] = doc.choice(value, sub, EXPERT_INITS)
        elif key in ("noise", "routing_std"):
            out[key] = doc.number(value, sub, minimum=0)
        elif key == "temperature":
            out[key] = _temperature(doc, value, sub)
    _check_kind_fields(doc, out, path)
    return out


def _check_kind_fields(doc: Doc, values: dict[str, Any], path: str) -> None:
    """A mapping that sets a kind and a field that kind has no use for is a mistake."""
    kind = values.get("kind")
    if kind is None:
        return
    for key, kinds in KIND_ONLY.items():
        if key in values and values[key] is not None and kind not in kinds:
            if key == "experts" and values[key] == 1:
                continue  # K=1 is every kind's
            raise doc.error(
                f"{path}.{key}" if path else key,
                f"{key} applies to kind: {', '.join(kinds)}, not {kind}; remove it here",
            )
    if "init" in values and values["init"] not in KIND_INITS[kind]:
        raise doc.error(
            f"{path}.init" if path else "init",
            f"kind: {kind} starts from init: {', '.join(KIND_INITS[kind])}, got {values['init']}",
        )


def parse_settings(doc: Doc, raw: Any, path: str) -> LayerSettings:
    """One conv's resolved settings (a plan's ``settings``), every field checked as in a
    recipe; one line naming ``path`` and the key at fault otherwise."""
    values = _settings(doc, raw, path, SETTING_KEYS, warn_deprecated=False)
    if "init" not in values and values.get("noise"):
        values["init"] = "perturb"  # a plan saved before inits existed: built that way
    settings = LayerSettings(**values).for_kind()  # as the plan resolved it
    if settings.convert:
        _check_noise(doc.where(f"{path}.noise"), settings.noise, settings.init)
    return settings


def _check_noise(where: str, noise: float | None, init: str, subject: str = "this is") -> None:
    """The one rule on ``noise``, for a recipe's fields and for a conv's resolved settings:
    only the ``perturb`` init adds it (the others would silently ignore it)."""
    if noise is not None and noise != 0 and init != "perturb":
        raise DynifyError(
            f"{where}: noise {noise:g} applies to init: perturb only, and {subject} init: {init}; "
            "remove the noise, or set init: perturb with it"
        )


def _temperature(doc: Doc, raw: Any, path: str) -> TemperatureSchedule:
    if isinstance(raw, TemperatureSchedule):
        return raw
    if not isinstance(raw, dict):
        return TemperatureSchedule.constant(doc.number(raw, path, minimum=0, exclusive=True))
    entry = doc.mapping(raw, path, TEMPERATURE_KEYS)
    kwargs: dict[str, Any] = {}
    for key in ("start", "end"):
        if key in entry:
            kwargs[key] = doc.number(entry[key], f"{path}.{key}", minimum=0, exclusive=True)
    if "length" in entry:
        kwargs["length"] = doc.number(entry["length"], f"{path}.length", minimum=0)
    if "shape" in entry:
        kwargs["shape"] = doc.choice(entry["shape"], f"{path}.shape", SCHEDULE_SHAPES)
    if "unit" in entry:
        kwargs["unit"] = doc.choice(entry["unit"], f"{path}.unit", SCHEDULE_UNITS)
    return TemperatureSchedule(**kwargs)


def _selector(doc: Doc, raw: Any, path: str) -> Selector:
    entry = doc.mapping(raw, path, SELECTOR_KEYS)
    kw: dict[str, Any] = {}

    def pos_int(v: Any, p: str) -> int:
        return doc.integer(v, p, minimum=1)

    for key, value in entry.items():
        sub = f"{path}.{key}"
        if key in ("name", "block"):
            kw[key] = doc.one_or_list(value, sub, doc.string)
        elif key == "regex":
            pattern = doc.string(value, sub)
            try:
                re.compile(pattern)
            except re.error as err:
                message = f"invalid regular expression {quoted(pattern)}: {err}"
                raise doc.error(sub, message) from None
            kw[key] = pattern
        elif key == "type":
            kw[key] = doc.one_or_list(value, sub, lambda v, p: doc.choice(v, p, CONV_TYPES))
        elif key in ("kernel_size", "stride", "dilation", "groups"):
            kw[key] = doc.one_or_list(value, sub, pos_int)
        elif key == "stage":
            kw[key] = doc.one_or_list(value, sub, doc.integer)
        elif key in ("in_channels", "out_channels"):
            kw[key] = _channel_range(doc, value, sub)
        else:
            kw[key] = doc.boolean(value, sub)
    return Selector(**kw)


def _channel_range(doc: Doc, raw: Any, path: str) -> tuple[int, int]:
    if isinstance(raw, dict):
        entry = doc.mapping(raw, path, ("min", "max"))
        low = doc.integer(entry["min"], f"{path}.min", minimum=1) if "min" in entry else 1
        high = doc.integer(entry["max"], f"{path}.max", minimum=1) if "max" in entry else 2**31
        if low > high:
            raise doc.error(path, f"empty range: min {low} > max {high}")
        return (low, high)
    value = doc.integer(raw, path, minimum=1)
    return (value, value)

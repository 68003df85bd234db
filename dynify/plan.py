"""The plan: a recipe resolved against one traced model, conv by conv.

Second step of the data flow (trace -> plan -> swap). A plan says, for every conv the trace
found, whether it becomes dynamic and with which settings, or why it stays static. It is
plain, immutable data: the cost model prices it without building anything, ``apply`` builds
from it, an artifact stores it, and ``Plan.to_recipe`` turns it back into a recipe.

A converted model carries its plan in the public attribute ``dynify_plan``
(:data:`PLAN_ATTRIBUTE`); :func:`plan_of` and :func:`find_plan` read it through the
wrappers training puts around a model (DistributedDataParallel, DataParallel,
``torch.compile``), so no caller unwraps by hand.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields, replace
from typing import Any

from timm.utils import unwrap_model
from torch import nn

from dynify._opcount import CountedOp, OpCounts
from dynify._table import format_table
from dynify._yaml import Doc
from dynify.errors import DynifyError, quoted, shorten
from dynify.layers.attention import attention_hidden_width
from dynify.layers.conv_variants import SAME_PAD_CLASSES
from dynify.layers.kinds import layer_class
from dynify.recipe import (
    LayerSettings,
    Recipe,
    RecipeLike,
    Rule,
    Selector,
    load_recipe,
    parse_settings,
)
from dynify.trace import MAX_CHANNELS, MAX_SIDE, ConvSite, ModelTrace

__all__ = [
    "MAX_CHANNELS",
    "MAX_SIDE",
    "PLAN_ATTRIBUTE",
    "LayerPlan",
    "Plan",
    "attach_plan",
    "find_plan",
    "kind_unsupported_reason",
    "parse_plan",
    "plan_of",
    "resolve_plan",
]

# Conv classes that may pad TF-'SAME' style at run time (what some kinds do not cover); a
# plan sees the class name only, so a StdConv2dSame built without same_pad counts too.
_SAME_PAD_TYPES = frozenset(cls.__name__ for cls in SAME_PAD_CLASSES)

# The attribute of a converted model that holds its Plan.
PLAN_ATTRIBUTE = "dynify_plan"

# Where the equivalence check's error was measured (see dynify.convert._check_equivalence).
CHECK_PRECISIONS = ("float16", "bfloat16", "float32", "float64")


PLAN_KEYS = (
    "version",
    "model_name",
    "input_size",
    "num_stages",
    "recipe",
    "fx_error",
    "check_error",
    "check_precision",
    "layers",
    "op_counts",
)
LAYER_KEYS = ("site", "settings", "reason")
SITE_KEYS = tuple(f.name for f in fields(ConvSite))
OP_COUNTS_KEYS = ("ops", "params", "module_params")


@dataclass(frozen=True)
class LayerPlan:
    """One conv: where it is, what it becomes, and why."""

    site: ConvSite
    settings: LayerSettings
    reason: str

    @property
    def name(self) -> str:
        return self.site.name

    @property
    def convert(self) -> bool:
        return self.settings.convert and self.site.unsupported is None

    @property
    def kind(self) -> str:
        return "dynamic" if self.convert else "static"

    @property
    def params_before(self) -> int:
        return self.site.params

    @property
    def params_after(self) -> int:
        """Parameters once converted (the kind's own count of what it builds)."""
        if not self.convert:
            return self.site.params
        s, st = self.site, self.settings
        if st.kind in ("dycnn", "condconv"):  # K kernels (and biases), the attention's layers
            k = st.experts
            hidden = attention_hidden_width(s.in_channels, st.reduction)
            experts = k * (s.weight_numel + (s.out_channels if s.bias else 0))
            return experts + s.in_channels * hidden + hidden + hidden * k + k
        # Each kind's own count, with the settings it has (DCD: a rank, no experts).
        sizes = {"experts": st.experts} if st.kind != "dcd" else {"rank": st.rank}
        return layer_class(st.kind).parameter_count(  # type: ignore[attr-defined]
            in_channels=s.in_channels,
            out_channels=s.out_channels,
            kernel_size=tuple(s.kernel_size),
            groups=s.groups,
            bias=s.bias,
            reduction=st.reduction,
            **sizes,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "site": self.site.to_dict(),
            "settings": self.settings.to_dict(),
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<plan layer>") -> LayerPlan:
        """A layer as :meth:`to_dict` writes it, validated (see :meth:`Plan.from_dict`)."""
        return _layer(Doc(data, source, {}), data, "")


@dataclass(frozen=True)
class Plan:
    """Every conv of a model with its resolved settings, in execution order (immutable:
    ``dataclasses.replace`` makes a changed copy)."""

    layers: tuple[LayerPlan, ...]
    input_size: tuple[int, int, int]
    num_stages: int = 0
    recipe: str | None = None
    fx_error: str | None = None
    model_name: str | None = field(default=None)
    # Relative max error of the converted model against the original (set by apply), and
    # the dtype it was measured in: the model's own ("float32"), or "float64" when that was
    # not close enough and the check was run again in float64 (see _check_equivalence).
    check_error: float | None = None
    check_precision: str | None = None
    # What the rest of the network costs (from the trace), so the plan can be priced.
    op_counts: OpCounts | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "input_size", tuple(self.input_size))

    @property
    def converted(self) -> list[LayerPlan]:
        return [lp for lp in self.layers if lp.convert]

    @property
    def skipped(self) -> list[LayerPlan]:
        return [lp for lp in self.layers if not lp.convert]

    def layer(self, name: str) -> LayerPlan:
        for lp in self.layers:
            if lp.name == name:
                return lp
        raise KeyError(name)

    @property
    def params_before(self) -> int:
        return sum(lp.params_before for lp in self.layers)

    @property
    def params_after(self) -> int:
        return sum(lp.params_after for lp in self.layers)

    # -- views ------------------------------------------------------------------------

    def table(self, *, only_converted: bool = False) -> str:
        """The plan as a fixed-width text table with totals."""
        rows = []
        for lp in self.layers:
            if only_converted and not lp.convert:
                continue
            s = lp.site
            shape = "x".join(str(v) for v in s.input_shape) if s.input_shape else "?"
            st = lp.settings
            rows.append(
                [
                    lp.name,
                    st.kind if lp.convert else "static",
                    s.label,
                    shape,
                    str(st.experts) if lp.convert else "-",
                    str(st.reduction) if lp.convert else "-",
                    f"{lp.params_before:,}",
                    f"{lp.params_after:,}",
                    lp.reason,
                ]
            )
        n = len(self.converted)
        ratio = self.params_after / max(self.params_before, 1)
        footer = [
            "total",
            f"{n}/{len(self.layers)} dynamic",
            "",
            "",
            "",
            "",
            f"{self.params_before:,}",
            f"{self.params_after:,}",
            f"conv params x{ratio:.2f}",
        ]
        header = ["layer", "kind", "conv", "input", "K", "r", "params", "params after", "why"]
        return format_table(header, rows, footer=footer)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "model_name": self.model_name,
            "input_size": list(self.input_size),
            "num_stages": self.num_stages,
            "recipe": self.recipe,
            "fx_error": self.fx_error,
            "check_error": self.check_error,
            "check_precision": self.check_precision,
            "layers": [lp.to_dict() for lp in self.layers],
            "op_counts": None if self.op_counts is None else self.op_counts.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<plan>") -> Plan:
        """A plan as :meth:`to_dict` writes it (an artifact's metadata), validated.

        A plan read from a file is untrusted: every field's type and range is checked, as a
        recipe's are, and an unknown or missing key is one line naming ``source`` and the
        key path (``layers[3].settings.experts: expected an integer >= 1, got -1``).
        """
        try:
            return parse_plan(Doc(data, source, {}))
        except DynifyError as err:
            # The recipe checks quote the value at fault whole; a forged one can be megabytes.
            raise DynifyError(shorten(str(err), 300)) from None

    def to_recipe(self, *, description: str | None = None) -> Recipe:
        """A recipe that reproduces exactly this plan on the same model.

        Convs are named explicitly, so the recipe does not depend on selector details. The
        most common settings become the defaults (with ``convert: false``) and each other
        combination one rule listing its convs, so the file stays short.
        """
        by_settings: dict[LayerSettings, list[str]] = {}
        for lp in self.converted:
            settings = replace(lp.settings, temperature=lp.settings.schedule)
            by_settings.setdefault(settings, []).append(lp.name)
        counts = Counter({s: len(names) for s, names in by_settings.items()})
        common = counts.most_common(1)[0][0] if counts else LayerSettings()
        defaults = replace(common, convert=False)
        rules = []
        for settings, names in by_settings.items():
            changed: dict[str, Any] = {"convert": True}
            for f in fields(LayerSettings):
                value = getattr(settings, f.name)
                if value is None or f.name == "convert":  # None: the default; never null
                    continue
                if value != getattr(defaults, f.name):
                    changed[f.name] = value
            label = f"{settings.kind} K={settings.experts} r={settings.reduction}"
            rules.append(Rule(select=Selector(name=tuple(names)), settings=changed, name=label))
        return Recipe(defaults=defaults, rules=tuple(rules), description=description)


def resolve_plan(
    trace: ModelTrace,
    recipe: RecipeLike = None,
    *,
    strict: bool | None = None,
    model_name: str | None = None,
) -> Plan:
    """Resolve ``recipe`` against every conv of ``trace``: :func:`dynify.make_plan` for a
    trace already made (``make_plan`` takes a model or a trace, this a trace; both take
    every form of recipe ``load_recipe`` reads).

    Args:
        recipe: a :class:`Recipe`, a dict, a YAML path or a bundled recipe's name (``None``:
            the DY-CNN defaults).
        strict: fail when a rule matches no conv (default: the recipe's own ``strict``).
        model_name: the timm architecture the trace is of, recorded in the plan.
    """
    recipe = load_recipe(recipe)
    strict = recipe.strict if strict is None else strict
    hits = [0] * len(recipe.rules)
    layers = []
    for site in trace.sites:
        settings, matched = recipe.settings_for(site, trace.num_stages)
        for i in matched:
            hits[i] += 1
        if settings.convert and site.unsupported is None:
            # A conv the swap can take over, but not every kind's formulation covers it.
            uncovered = kind_unsupported_reason(settings.kind, site)
            if uncovered is not None:
                site = replace(site, unsupported=f"kind {settings.kind}: {uncovered}")
        layers.append(LayerPlan(site, settings, _reason(site, settings, matched, recipe)))
    if strict:
        for i, n in enumerate(hits):
            if n == 0:
                rule = recipe.rules[i]
                where = (
                    f"{recipe.source}:{rule.line}"
                    if recipe.source and rule.line
                    else (recipe.label)
                )
                raise DynifyError(
                    f"{where}: {rule.describe(i)} matches no conv of this model "
                    f"(strict mode); its selector: {rule.select.to_dict() or 'everything'}"
                )
    return Plan(
        layers=layers,
        input_size=trace.input_size,
        num_stages=trace.num_stages,
        recipe=recipe.label,
        fx_error=trace.fx_error,
        model_name=model_name,
        op_counts=trace.op_counts,
    )


def kind_unsupported_reason(kind: str, site: ConvSite) -> str | None:
    """Why ``kind``'s formulation does not cover the conv at ``site`` (``None``: it does)."""
    return layer_class(kind).unsupported_reason(
        in_channels=site.in_channels,
        out_channels=site.out_channels,
        kernel_size=tuple(site.kernel_size),
        stride=tuple(site.stride),
        padding=site.padding if isinstance(site.padding, str) else tuple(site.padding),
        dilation=tuple(site.dilation),
        groups=site.groups,
        same_pad=site.type_name in _SAME_PAD_TYPES,
    )


def find_plan(model: nn.Module) -> Plan | None:
    """The plan ``model`` was converted with, or ``None`` for a model dynify did not convert;
    ``model`` may be wrapped (DDP, DataParallel, ``torch.compile``)."""
    plan = getattr(unwrap_model(model), PLAN_ATTRIBUTE, None)
    return plan if isinstance(plan, Plan) else None


def plan_of(model: nn.Module) -> Plan:
    """The plan ``apply`` (or ``dynify.load``) used to convert ``model`` (wrappers are seen
    through, as by :func:`find_plan`); a :class:`DynifyError` for a model without one."""
    plan = find_plan(model)
    if plan is None:
        raise DynifyError("this model was not converted by dynify (no plan attached)")
    return plan


def attach_plan(model: nn.Module, plan: Plan) -> None:
    """Make ``plan`` the plan ``model`` carries (what ``apply`` and ``dynify.load`` do)."""
    # object.__setattr__ would skip nn.Module's bookkeeping; a Plan is neither a parameter,
    # a buffer nor a module, so plain setattr stores it as an ordinary attribute.
    setattr(unwrap_model(model), PLAN_ATTRIBUTE, plan)


def _reason(site: ConvSite, settings: LayerSettings, matched: list[int], recipe: Recipe) -> str:
    if site.unsupported is not None:
        return site.unsupported
    decided = [i for i in matched if "convert" in recipe.rules[i].settings]
    source = recipe.rules[decided[-1]].describe(decided[-1]) if decided else "defaults"
    found = "" if site.found_by == "fx" else ", found by hook"
    shared = f", called {site.calls}x" if site.calls > 1 else ""
    return f"{source}{found}{shared}"


# -- validation of a plan read from a file ------------------------------------------------


def parse_plan(doc: Doc) -> Plan:
    """Validate a plan's dict form (``Plan.to_dict``) field by field, as a recipe is."""
    top = _required(doc, doc.data, "", PLAN_KEYS, ("layers", "input_size"))
    if "version" in top and top["version"] != 1:
        raise doc.error(
            "version", f"unsupported plan version {quoted(top['version'])}; accepted: 1"
        )
    raw_layers = top["layers"]
    if not isinstance(raw_layers, list):
        raise doc.error("layers", f"expected a list of layers, got {type(raw_layers).__name__}")
    check_error = _optional(doc, top, "check_error", lambda v, p: doc.number(v, p, minimum=0))
    return Plan(
        layers=[_layer(doc, raw, f"layers[{i}]") for i, raw in enumerate(raw_layers)],
        input_size=_shape(doc, top["input_size"], "input_size"),
        num_stages=doc.integer(top.get("num_stages", 0), "num_stages", minimum=0),
        recipe=_optional(doc, top, "recipe", doc.string),
        fx_error=_optional(doc, top, "fx_error", doc.string),
        model_name=_optional(doc, top, "model_name", doc.string),
        check_error=check_error,
        check_precision=_optional(
            doc, top, "check_precision", lambda v, p: doc.choice(v, p, CHECK_PRECISIONS)
        ),
        op_counts=_optional(doc, top, "op_counts", lambda v, p: _op_counts(doc, v, p)),
    )


def _required(
    doc: Doc, raw: Any, path: str, allowed: tuple[str, ...], required: tuple[str, ...]
) -> dict[str, Any]:
    """A mapping with only ``allowed`` keys and every one of ``required``."""
    if raw is None:
        raise doc.error(path, f"expected a mapping with keys {list(allowed)}, got null")
    entry = doc.mapping(raw, path, allowed)
    for key in required:
        if key not in entry:
            raise doc.error(f"{path}.{key}" if path else key, "missing (required)")
    return entry


def _optional(doc: Doc, entry: dict[str, Any], key: str, check: Any) -> Any:
    value = entry.get(key)
    return None if value is None else check(value, key)


def _pair(doc: Doc, raw: Any, path: str, *, minimum: int) -> tuple[int, int]:
    if not isinstance(raw, list | tuple) or len(raw) != 2:
        raise doc.error(path, f"expected two integers >= {minimum}, got {quoted(raw)}")
    return tuple(doc.integer(v, f"{path}[{i}]", minimum=minimum) for i, v in enumerate(raw))  # type: ignore[return-value]


def _shape(doc: Doc, raw: Any, path: str) -> tuple[int, int, int]:
    accepted = f"three integers (C, H, W), C from 1 to {MAX_CHANNELS}, H and W from 1 to {MAX_SIDE}"
    if not isinstance(raw, list | tuple) or len(raw) != 3:
        raise doc.error(path, f"expected {accepted}, got {quoted(raw)}")
    shape = tuple(doc.integer(v, f"{path}[{i}]", minimum=1) for i, v in enumerate(raw))
    for i, (value, limit) in enumerate(zip(shape, (MAX_CHANNELS, MAX_SIDE, MAX_SIDE), strict=True)):
        if value > limit:
            raise doc.error(f"{path}[{i}]", f"expected {accepted}, got {value:,}")
    return shape  # type: ignore[return-value]


def _layer(doc: Doc, raw: Any, path: str) -> LayerPlan:
    entry = _required(doc, raw, path, LAYER_KEYS, LAYER_KEYS)
    if not isinstance(entry["settings"], dict):  # null would silently mean the defaults
        raise doc.error(f"{path}.settings", f"expected a mapping, got {quoted(entry['settings'])}")
    return LayerPlan(
        _site(doc, entry["site"], f"{path}.site"),
        parse_settings(doc, entry["settings"], f"{path}.settings"),
        doc.string(entry["reason"], f"{path}.reason"),
    )


def _site(doc: Doc, raw: Any, path: str) -> ConvSite:
    geometry = ("name", "type_name", "in_channels", "out_channels", "kernel_size", "stride")
    entry = _required(
        doc, raw, path, SITE_KEYS, (*geometry, "padding", "dilation", "groups", "bias")
    )
    kw: dict[str, Any] = {}
    for key, value in entry.items():
        sub = f"{path}.{key}"
        if key in ("name", "type_name"):
            kw[key] = doc.string(value, sub)
        elif key in ("block", "unsupported"):
            kw[key] = None if value is None else doc.string(value, sub)
        elif key in ("in_channels", "out_channels", "groups"):
            kw[key] = doc.integer(value, sub, minimum=1)
        elif key in ("params", "calls"):
            kw[key] = doc.integer(value, sub, minimum=0)
        elif key == "stage":
            kw[key] = None if value is None else doc.integer(value, sub, minimum=0)
        elif key in ("kernel_size", "stride", "dilation"):
            kw[key] = _pair(doc, value, sub, minimum=1)
        elif key == "padding":
            if isinstance(value, str):
                kw[key] = doc.choice(value, sub, ("same", "valid"))
            else:
                kw[key] = _pair(doc, value, sub, minimum=0)
        elif key in ("input_shape", "output_shape"):
            kw[key] = None if value is None else _shape(doc, value, sub)
        elif key == "found_by":
            kw[key] = doc.choice(value, sub, ("fx", "hook"))
        else:  # bias, stem, first_in_block, last_in_block, classifier
            kw[key] = doc.boolean(value, sub)
    for key in ("in_channels", "out_channels"):
        if kw[key] % kw["groups"]:
            raise doc.error(
                f"{path}.groups", f"{key} {kw[key]} is not divisible by groups {kw['groups']}"
            )
    return ConvSite(**kw)


def _op_counts(doc: Doc, raw: Any, path: str) -> OpCounts:
    entry = _required(doc, raw, path, OP_COUNTS_KEYS, ("ops", "params"))
    ops = entry["ops"]
    if not isinstance(ops, list):
        raise doc.error(f"{path}.ops", f"expected a list, got {type(ops).__name__}")
    counted = []
    for i, op in enumerate(ops):
        sub = f"{path}.ops[{i}]"
        if not isinstance(op, list) or len(op) != 5:
            raise doc.error(sub, f"expected [module, op, macs, batched, in_conv], got {quoted(op)}")
        module, name, macs, batched, in_conv = op
        counted.append(
            CountedOp(
                doc.string(module, f"{sub}[0]"),
                doc.string(name, f"{sub}[1]"),
                doc.integer(macs, f"{sub}[2]", minimum=0),
                doc.boolean(batched, f"{sub}[3]"),
                doc.boolean(in_conv, f"{sub}[4]"),
            )
        )
    module_params = entry.get("module_params") or {}
    if not isinstance(module_params, dict):
        raise doc.error(f"{path}.module_params", "expected a mapping of module names to counts")
    return OpCounts(
        ops=tuple(counted),
        params=doc.integer(entry["params"], f"{path}.params", minimum=0),
        module_params={
            doc.string(k, f"{path}.module_params"): doc.integer(
                v, f"{path}.module_params.{k}", minimum=0
            )
            for k, v in module_params.items()
        },
    )

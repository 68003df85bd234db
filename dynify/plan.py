"""The plan: a recipe resolved against one traced model, conv by conv.

Second step of the data flow (trace -> plan -> swap). A plan says, for every conv the trace
found, whether it becomes dynamic and with which settings, or why it stays static. It is
plain data: the cost model prices it without building anything, ``apply`` builds from it,
an artifact stores it, and ``Plan.to_recipe`` turns it back into a recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from dynify._opcount import OpCounts
from dynify.errors import DynifyError
from dynify.layers.attention import attention_hidden_width
from dynify.recipe import LayerSettings, Recipe, Rule, Selector
from dynify.trace import ConvSite, ModelTrace

__all__ = ["LayerPlan", "Plan", "resolve_plan"]


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
        """Parameters once converted: K kernels (and biases) plus the attention's two layers."""
        if not self.convert:
            return self.site.params
        s, k = self.site, self.settings.experts
        hidden = attention_hidden_width(s.in_channels, self.settings.reduction)
        experts = k * (s.weight_numel + (s.out_channels if s.bias else 0))
        attention = s.in_channels * hidden + hidden + hidden * k + k
        return experts + attention

    def to_dict(self) -> dict[str, Any]:
        return {
            "site": self.site.to_dict(),
            "settings": self.settings.to_dict(),
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerPlan:
        return cls(
            ConvSite.from_dict(data["site"]),
            LayerSettings.from_dict(data["settings"]),
            data["reason"],
        )


@dataclass
class Plan:
    """Every conv of a model with its resolved settings, in execution order."""

    layers: list[LayerPlan]
    input_size: tuple[int, int, int]
    num_stages: int = 0
    recipe: str | None = None
    fx_error: str | None = None
    model_name: str | None = field(default=None)
    # Relative max error of the converted model against the original (set by apply).
    check_error: float | None = None
    # What the rest of the network costs (from the trace), so the plan can be priced.
    op_counts: OpCounts | None = field(default=None, repr=False)

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
        from dynify._table import format_table

        rows = []
        for lp in self.layers:
            if only_converted and not lp.convert:
                continue
            s = lp.site
            shape = "x".join(str(v) for v in s.input_shape) if s.input_shape else "?"
            kh, kw = s.kernel_size
            conv = f"{s.in_channels}->{s.out_channels} {kh}x{kw}/{s.stride[0]}"
            if s.groups > 1:
                conv += " dw" if s.depthwise else f" g{s.groups}"
            st = lp.settings
            rows.append(
                [
                    lp.name,
                    lp.kind,
                    conv,
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
            "layers": [lp.to_dict() for lp in self.layers],
            "op_counts": None if self.op_counts is None else self.op_counts.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        return cls(
            layers=[LayerPlan.from_dict(d) for d in data["layers"]],
            input_size=tuple(data["input_size"]),  # type: ignore[arg-type]
            num_stages=int(data.get("num_stages", 0)),
            recipe=data.get("recipe"),
            fx_error=data.get("fx_error"),
            model_name=data.get("model_name"),
            check_error=data.get("check_error"),
            op_counts=OpCounts.from_dict(data["op_counts"]) if data.get("op_counts") else None,
        )

    def to_recipe(self, *, description: str | None = None) -> Recipe:
        """A recipe that reproduces exactly this plan on the same model.

        Convs are named explicitly, so the recipe does not depend on selector details. The
        most common settings become the defaults (with ``convert: false``) and each other
        combination one rule listing its convs, so the file stays short.
        """
        from collections import Counter

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
            label = f"K={settings.experts} r={settings.reduction} {settings.attention}"
            rules.append(Rule(select=Selector(name=tuple(names)), settings=changed, name=label))
        return Recipe(defaults=defaults, rules=tuple(rules), description=description)


def resolve_plan(trace: ModelTrace, recipe: Recipe, *, strict: bool | None = None) -> Plan:
    """Resolve ``recipe`` against every conv of ``trace``.

    Args:
        strict: fail when a rule matches no conv (default: the recipe's own ``strict``).
    """
    strict = recipe.strict if strict is None else strict
    hits = [0] * len(recipe.rules)
    layers = []
    for site in trace.sites:
        settings, matched = recipe.settings_for(site, trace.num_stages)
        for i in matched:
            hits[i] += 1
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
        op_counts=trace.op_counts,
    )


def _reason(site: ConvSite, settings: LayerSettings, matched: list[int], recipe: Recipe) -> str:
    if site.unsupported is not None:
        return site.unsupported
    decided = [i for i in matched if "convert" in recipe.rules[i].settings]
    source = recipe.rules[decided[-1]].describe(decided[-1]) if decided else "defaults"
    found = "" if site.found_by == "fx" else ", found by hook"
    shared = f", called {site.calls}x" if site.calls > 1 else ""
    return f"{source}{found}{shared}"

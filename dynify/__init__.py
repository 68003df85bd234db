"""dynify: turn static CNNs into dynamic-convolution networks.

The data flow: timm model -> :func:`trace_model` (fx, shapes, positions) -> :func:`make_plan`
(recipe rules resolved per conv) -> :func:`apply` (swap via ``DynamicConv2d.from_conv``)
-> optional fine-tune (temperature schedule) -> :func:`fuse_batchnorm` (BatchNorms into the
convs before them, for export) -> artifact (:func:`save` / :func:`load`) -> export
(:func:`export_onnx`, :func:`export_program`: ONNX, torch.export, checked);
:func:`routing_report` measures whether the converted layers route.

The public API is what this module exports: the names below, and the subpackages
:mod:`dynify.cost` (FLOPs/MACs, parameters, latency, budgets), :mod:`dynify.train`
(fine-tuning), :mod:`dynify.search` (Optuna search under a budget), :mod:`dynify.logging`
and :mod:`dynify.errors`. Modules whose names start with an underscore are private;
docs/architecture.md says which module owns what. The names are imported on first use
(PEP 562), so ``import dynify`` (and the command line's ``--help``) does not pay for
importing torch and timm.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from dynify._version import __version__

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports these
    from dynify import cost, errors, logging, search, train
    from dynify.artifact import load, save
    from dynify.convert import apply, make_plan
    from dynify.errors import DynifyError
    from dynify.export import export_onnx, export_program
    from dynify.fuse import ModelEdits, apply_edits, conv_norm_pairs, fuse_batchnorm
    from dynify.layers import DynamicConv2d, KernelAttention
    from dynify.layers.dynamic_conv_same import DynamicConv2dSame
    from dynify.plan import LayerPlan, Plan, plan_of, resolve_plan
    from dynify.recipe import LayerSettings, Recipe, RecipeBuilder, Rule, Selector, load_recipe
    from dynify.routing import LayerRouting, RoutingReport, routing_report
    from dynify.schedule import TemperatureSchedule
    from dynify.trace import ConvSite, ModelTrace, trace_model
    from dynify.train.temperature import TemperatureScheduler

__all__ = [
    "ConvSite",
    "DynamicConv2d",
    "DynamicConv2dSame",
    "DynifyError",
    "KernelAttention",
    "LayerPlan",
    "LayerRouting",
    "LayerSettings",
    "ModelEdits",
    "ModelTrace",
    "Plan",
    "Recipe",
    "RecipeBuilder",
    "RoutingReport",
    "Rule",
    "Selector",
    "TemperatureSchedule",
    "TemperatureScheduler",
    "__version__",
    "apply",
    "apply_edits",
    "conv_norm_pairs",
    "cost",
    "errors",
    "export_onnx",
    "export_program",
    "fuse_batchnorm",
    "load",
    "load_recipe",
    "logging",
    "make_plan",
    "plan_of",
    "resolve_plan",
    "routing_report",
    "save",
    "search",
    "trace_model",
    "train",
]

# The public subpackages, imported on first use like the names.
_SUBPACKAGES = frozenset({"cost", "errors", "logging", "search", "train"})

# The module that defines each public name (the imports above, for run time).
_SOURCES: dict[str, str] = {
    name: module
    for module, names in {
        "dynify.artifact": ("load", "save"),
        "dynify.convert": ("apply", "make_plan"),
        "dynify.errors": ("DynifyError",),
        "dynify.export": ("export_onnx", "export_program"),
        "dynify.fuse": ("ModelEdits", "apply_edits", "conv_norm_pairs", "fuse_batchnorm"),
        "dynify.layers": ("DynamicConv2d", "KernelAttention"),
        "dynify.layers.dynamic_conv_same": ("DynamicConv2dSame",),
        "dynify.plan": ("LayerPlan", "Plan", "plan_of", "resolve_plan"),
        "dynify.recipe": (
            "LayerSettings",
            "Recipe",
            "RecipeBuilder",
            "Rule",
            "Selector",
            "load_recipe",
        ),
        "dynify.routing": ("LayerRouting", "RoutingReport", "routing_report"),
        "dynify.schedule": ("TemperatureSchedule",),
        "dynify.train.temperature": ("TemperatureScheduler",),
        "dynify.trace": ("ConvSite", "ModelTrace", "trace_model"),
    }.items()
    for name in names
}


def __getattr__(name: str) -> Any:
    source = _SOURCES.get(name)
    if source is not None:
        value = getattr(importlib.import_module(source), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"{__name__}.{name}")
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}"):
        # A public submodule (``dynify.artifact.read_info``): importing the package used to
        # import most of them, and code written against that keeps working.
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

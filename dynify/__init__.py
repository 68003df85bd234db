"""dynify: turn static CNNs into dynamic-convolution networks.

The data flow: timm model -> :func:`trace_model` (fx, shapes, positions) -> :func:`make_plan`
(recipe rules resolved per conv) -> :func:`apply` (swap via ``DynamicConv2d.from_conv``)
-> optional fine-tune (temperature schedule) -> artifact (:func:`save` / :func:`load`);
:func:`routing_report` measures whether the converted layers route.

The public API is what this module exports; modules whose names start with an underscore
are private.
"""

from dynify._version import __version__
from dynify.artifact import load, save
from dynify.convert import apply, make_plan, plan_of
from dynify.errors import DynifyError
from dynify.layers import DynamicConv2d, KernelAttention
from dynify.layers.dynamic_conv_same import DynamicConv2dSame
from dynify.plan import LayerPlan, Plan, resolve_plan
from dynify.recipe import LayerSettings, Recipe, load_recipe
from dynify.routing import LayerRouting, RoutingReport, routing_report
from dynify.schedule import TemperatureSchedule, TemperatureScheduler
from dynify.trace import ConvSite, ModelTrace, trace_model

__all__ = [
    "ConvSite",
    "DynamicConv2d",
    "DynamicConv2dSame",
    "DynifyError",
    "KernelAttention",
    "LayerPlan",
    "LayerRouting",
    "LayerSettings",
    "ModelTrace",
    "Plan",
    "Recipe",
    "RoutingReport",
    "TemperatureSchedule",
    "TemperatureScheduler",
    "__version__",
    "apply",
    "load",
    "load_recipe",
    "make_plan",
    "plan_of",
    "resolve_plan",
    "routing_report",
    "save",
    "trace_model",
]

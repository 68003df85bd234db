"""Swap planned convs for dynamic layers: ``dynify.apply`` and its helpers.

Last step of the data flow (trace -> plan -> swap). The model keeps its class (timm methods
such as ``forward_features`` and ``reset_classifier`` keep working): only the planned conv
modules are replaced, each by ``DynamicConv2d.from_conv`` (or its TF-'SAME' variant), so
that a converted model starts out computing the same function. ``apply`` checks that on the
example input and refuses to hand back a model whose output changed.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynify.errors import DynifyError
from dynify.layers import DynamicConv2d
from dynify.layers.dynamic_conv_same import DynamicConv2dSame
from dynify.plan import LayerPlan, Plan, resolve_plan
from dynify.recipe import Recipe, load_recipe
from dynify.trace import ModelTrace, trace_model

__all__ = [
    "EQUIVALENCE_TOLERANCE",
    "apply",
    "build_layer",
    "conversion_kind",
    "make_plan",
    "plan_of",
    "relative_error",
]

# Largest relative max error (max |y - y0| / max |y0|) a conversion may introduce.
EQUIVALENCE_TOLERANCE = 1e-4

_PLAN_ATTR = "_dynify_plan"
RecipeLike = Recipe | dict[str, Any] | str | os.PathLike[str] | None


# -- conv variants ------------------------------------------------------------------------


def _same_pad(module: nn.Module) -> bool:
    """Whether a timm conv pads TF-'SAME' style at run time."""
    name = type(module).__name__
    return name == "Conv2dSame" or (
        name in ("StdConv2dSame", "ScaledStdConv2dSame") and bool(module.same_pad)
    )


def _effective_weight(module: nn.Conv2d) -> torch.Tensor:
    """The kernel the module's forward really convolves with (weight standardisation applied
    exactly as timm's StdConv2d / ScaledStdConv2d do)."""
    name = type(module).__name__
    if name in ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"):
        gain = None
        if name.startswith("Scaled"):
            gain = (module.gain * module.scale).view(-1)
        return F.batch_norm(
            module.weight.reshape(1, module.out_channels, -1),
            None,
            None,
            weight=gain,
            training=True,
            momentum=0.0,
            eps=module.eps,
        ).reshape_as(module.weight)
    return module.weight


_SUPPORTED_SUBCLASSES = (
    "Conv2dSame",
    "StdConv2d",
    "StdConv2dSame",
    "ScaledStdConv2d",
    "ScaledStdConv2dSame",
)


def conversion_kind(module: nn.Module) -> tuple[type[DynamicConv2d] | None, str | None]:
    """The dynamic class ``module`` converts to, or ``None`` and the reason it cannot."""
    name = type(module).__name__
    if name == "CondConv2d":
        return None, "already dynamic (timm CondConv2d)"
    if not isinstance(module, nn.Conv2d):
        return None, f"not an nn.Conv2d ({name})"
    if type(module).forward is not nn.Conv2d.forward and name not in _SUPPORTED_SUBCLASSES:
        return None, f"{name} overrides Conv2d.forward; dynify does not know its function"
    if isinstance(module.padding, str) and module.padding not in ("same", "valid"):
        return None, f"unsupported padding {module.padding!r}"
    return (DynamicConv2dSame if _same_pad(module) else DynamicConv2d), None


def build_layer(
    module: nn.Module, layer: LayerPlan, *, generator: torch.Generator | None = None
) -> DynamicConv2d:
    """The dynamic layer that replaces ``module`` according to ``layer``'s settings."""
    cls, reason = conversion_kind(module)
    if cls is None:
        raise DynifyError(f"{layer.name}: cannot convert: {reason}")
    s = layer.settings
    with torch.no_grad():
        weight = _effective_weight(module).detach()  # type: ignore[arg-type]
    return cls.from_conv(
        module,  # type: ignore[arg-type]
        num_experts=s.experts,
        reduction=s.reduction,
        attention=s.attention,  # type: ignore[arg-type]
        temperature=s.schedule.value(0),
        init=s.init,  # type: ignore[arg-type]
        **({} if s.routing_std is None else {"routing_std": s.routing_std}),
        noise=s.noise if s.init == "perturb" else None,
        weight=weight,
        generator=generator,
    )


# -- planning and swapping ----------------------------------------------------------------


def make_plan(
    model: nn.Module | ModelTrace,
    recipe: RecipeLike = None,
    *,
    input_size: tuple[int, int, int] | None = None,
    strict: bool | None = None,
) -> Plan:
    """Trace ``model`` (unless given a trace) and resolve ``recipe`` against it, without
    converting anything: what the cost model and the search price."""
    trace = model if isinstance(model, ModelTrace) else trace_model(model, input_size=input_size)
    plan = resolve_plan(trace, load_recipe(recipe), strict=strict)
    if isinstance(model, nn.Module):
        plan.model_name = model_name_of(model)
    return plan


def model_name_of(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return str(cfg["architecture"])
    return None


def _module_names(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _swap(model: nn.Module, plan: Plan, generator: torch.Generator | None) -> None:
    aliases = _module_names(model)
    for layer in plan.converted:
        try:
            module = model.get_submodule(layer.name)
        except AttributeError:
            raise DynifyError(
                f"plan layer {layer.name!r} does not exist in this model "
                f"({type(model).__name__}); was the plan made for another model?"
            ) from None
        new = build_layer(module, layer, generator=generator)
        # A module registered under several names (tied weights) is swapped everywhere.
        for name in aliases.get(id(module), [layer.name]):
            _set_module(model, name, new)


def relative_error(output: Any, reference: Any) -> float:
    """max |y - y0| / max |y0| over (possibly nested) tensor outputs."""
    if isinstance(reference, torch.Tensor):
        scale = reference.detach().abs().max().clamp_min(1e-12)
        return float((output.detach() - reference.detach()).abs().max() / scale)
    if isinstance(reference, dict):
        return max((relative_error(output[k], v) for k, v in reference.items()), default=0.0)
    if isinstance(reference, list | tuple):
        return max(
            (relative_error(o, r) for o, r in zip(output, reference, strict=True)), default=0.0
        )
    return 0.0


def apply(
    model: nn.Module,
    recipe: RecipeLike | Plan = None,
    *,
    input_size: tuple[int, int, int] | None = None,
    inplace: bool = False,
    strict: bool | None = None,
    check: bool = True,
    seed: int = 0,
) -> nn.Module:
    """Convert ``model``'s convs to dynamic layers as ``recipe`` says.

    Args:
        model: a timm model (or any image model); it is copied unless ``inplace``.
        recipe: a YAML path, a bundled recipe's name (``"dycnn"``, ``"mobile"``, ...), a
            dict, a :class:`Recipe`, or an already resolved :class:`Plan`. ``None`` means
            the DY-CNN defaults (``dycnn``: every conv but the first, K=4, r=4, upcycled,
            T 1).
        input_size: ``(C, H, W)`` of the example input used to trace; default: the model's
            ``pretrained_cfg["input_size"]``.
        strict: fail when a recipe rule matches no conv (default: the recipe's setting).
        check: verify on the example input that the converted model (in eval mode)
            computes what the original did, to ``EQUIVALENCE_TOLERANCE`` (skipped when a
            layer's recipe says ``init: scratch``, which starts a new function by design).
        seed: seeds every random draw of the conversion (the attention's initial weights,
            a ``scratch`` layer's experts), so conversions are reproducible.

    Returns:
        The model, same class, with the planned convs swapped; ``plan_of(model)`` gives
        the per-layer plan.
    """
    if hasattr(model, _PLAN_ATTR):
        raise DynifyError("this model is already converted; apply dynify to the original model")
    if not inplace:
        model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    if isinstance(recipe, Plan):
        plan = recipe
        trace = None
    else:
        trace = trace_model(model, input_size=input_size)
        plan = resolve_plan(trace, load_recipe(recipe), strict=strict)
        plan.model_name = model_name_of(model)
    _swap(model, plan, generator)
    setattr(model, _PLAN_ATTR, plan)
    # A layer initialised from scratch computes a new function by design: nothing to check.
    preserving = all(lp.settings.preserves_function for lp in plan.converted)
    if check and trace is not None and plan.converted and preserving:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = model(trace.example_input)
        model.train(was_training)
        err = relative_error(out, trace.example_output)
        if not err <= EQUIVALENCE_TOLERANCE:
            raise DynifyError(
                f"converted model's output differs from the original's by {err:.2e} (relative "
                f"max error > {EQUIVALENCE_TOLERANCE:g}); a badly conditioned model can lose "
                "that much to float32 rounding alone (convert in float64 to tell), "
                "otherwise please report it with the model name; check=False skips the check"
            )
        plan.check_error = err
    return model


def plan_of(model: nn.Module) -> Plan:
    """The plan ``apply`` (or ``dynify.load``) used to convert ``model``."""
    plan = getattr(model, _PLAN_ATTR, None)
    if plan is None:
        raise DynifyError("this model was not converted by dynify (no plan attached)")
    return plan

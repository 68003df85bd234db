"""Swap planned convs for dynamic layers: ``dynify.apply`` and its helpers.

Last step of the data flow (trace -> plan -> swap). The model keeps its class (timm methods
such as ``forward_features`` and ``reset_classifier`` keep working): only the planned conv
modules are replaced, each by ``DynamicConv2d.from_conv`` (or its TF-'SAME' variant), so
that a converted model starts out computing the same function. ``apply`` checks that on the
example input and refuses to hand back a model whose output changed.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from dynify import _memory
from dynify._memory import available_memory, format_gib  # available_memory: public here
from dynify._modes import evaluating
from dynify.errors import DynifyError, quoted
from dynify.layers.base import DynamicLayer
from dynify.layers.conv_variants import conversion_kind, effective_weight
from dynify.layers.kinds import layer_class
from dynify.plan import LayerPlan, Plan, attach_plan, find_plan, plan_of, resolve_plan
from dynify.recipe import RecipeLike, load_recipe
from dynify.trace import ModelTrace, trace_model

__all__ = [
    "EQUIVALENCE_TOLERANCE",
    "apply",
    "available_memory",
    "build_layer",
    "check_memory",
    "conversion_kind",
    "make_plan",
    "module_names",
    "plan_of",
    "relative_error",
    "set_module",
]

# Largest relative max error (max |y - y0| / max |y0|) a conversion may introduce, the
# original and the converted model both computed in float64 (an exact conversion: ~1e-12).
EQUIVALENCE_TOLERANCE = 1e-4


# -- building a layer ---------------------------------------------------------------------


def build_layer(
    module: nn.Module, layer: LayerPlan, *, generator: torch.Generator | None = None
) -> DynamicLayer:
    """The dynamic layer that replaces ``module`` according to ``layer``'s settings (its
    ``kind``), computing what ``module`` does at creation."""
    cls, reason = conversion_kind(module)
    if cls is None:
        raise DynifyError(f"{layer.name}: cannot convert: {reason}")
    s = layer.settings
    with torch.no_grad():
        weight = effective_weight(module).detach()  # type: ignore[arg-type]
    if s.kind in ("dycnn", "condconv"):  # the mixture of experts; TF-'SAME' has its class
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
    options: dict[str, Any] = {"reduction": s.reduction, "weight": weight, "generator": generator}
    if s.kind == "odconv":
        options.update(num_experts=s.experts, temperature=s.schedule.value(0), init=s.init)
        if s.routing_std is not None:
            options["routing_std"] = s.routing_std
    elif s.kind == "dcd":
        options["rank"] = s.rank
    return layer_class(s.kind).from_conv(module, **options)  # type: ignore[attr-defined]


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
    name = model_name_of(model) if isinstance(model, nn.Module) else None
    return resolve_plan(trace, recipe, strict=strict, model_name=name)


def model_name_of(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return str(cfg["architecture"])
    return None


def module_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name each module of ``model`` is registered under (tied modules have several),
    by ``id``: what replacing a module everywhere it appears needs."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Register ``new`` under the dotted ``name`` of ``model`` (its parent's attribute)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


Swap = tuple[list[str], nn.Module, nn.Module]  # the names, the conv, its dynamic layer


def _swap(
    model: nn.Module,
    planned: list[tuple[LayerPlan, nn.Module]],
    generator: torch.Generator | None,
) -> list[Swap]:
    """Replace each planned conv (:func:`_planned_modules`) by its dynamic layer; return what
    was swapped where."""
    aliases = module_names(model)
    swaps: list[Swap] = []
    swapped: set[int] = set()
    for layer, module in planned:
        if id(module) in swapped:
            raise DynifyError(f"plan layer {layer.name!r}: this conv is planned twice")
        swapped.add(id(module))
        new = build_layer(module, layer, generator=generator)
        # A module registered under several names (tied weights) is swapped everywhere.
        names = aliases.get(id(module), [layer.name])
        for name in names:
            set_module(model, name, new)
        swaps.append((names, module, new))
    return swaps


def _put_back(model: nn.Module, swaps: list[Swap], *, original: bool) -> None:
    """Put the original convs (or, again, their dynamic layers) in place."""
    for names, old, new in swaps:
        for name in names:
            set_module(model, name, old if original else new)


def _planned_modules(model: nn.Module, plan: Plan) -> list[tuple[LayerPlan, nn.Module]]:
    """Each converted layer of ``plan`` with the module it replaces, checked to be a conv
    this model can convert and the very conv the plan describes (a plan read from a file
    is untrusted: its figures must be the model's, since the memory check prices them).
    Messages name the plan's key (``layers[3].site.name``), as a file's checks do."""
    found = []
    model_name = model_name_of(model) or type(model).__name__
    for index, layer in enumerate(plan.layers):
        if not layer.convert:
            continue
        try:
            module = model.get_submodule(layer.name)
        except AttributeError:
            module = None
        reason = "no such module" if module is None else conversion_kind(module)[1]
        if module is None or reason is not None:
            raise DynifyError(
                f"plan: layers[{index}].site.name: {quoted(layer.name)} is not a conv "
                f"{model_name} can convert ({reason}); expected the name of one of its "
                "convs; was the plan made for another model?"
            )
        s = layer.site
        if (module.in_channels, module.out_channels, tuple(module.kernel_size), module.groups) != (
            s.in_channels,
            s.out_channels,
            tuple(s.kernel_size),
            s.groups,
        ) or (module.bias is not None) != s.bias:
            raise DynifyError(
                f"plan: layers[{index}]: {layer.name!r} is a {s.in_channels}->{s.out_channels} "
                f"{s.kernel_size[0]}x{s.kernel_size[1]} conv (groups {s.groups}, bias "
                f"{s.bias}) but the model's is {module.in_channels}->{module.out_channels} "
                f"{module.kernel_size[0]}x{module.kernel_size[1]} (groups {module.groups}, "
                f"bias {module.bias is not None}); was the plan made for another model?"
            )
        found.append((layer, module))
    return found


def check_memory(model: nn.Module, plan: Plan) -> None:
    """Refuse, before anything is built, a plan whose dynamic layers' parameters cannot fit
    in the memory of the device they would live on.

    Raises:
        DynifyError: one line with the figure, the largest layer and what is available.
    """
    _check_memory(_planned_modules(model, plan))


def _check_memory(planned: list[tuple[LayerPlan, nn.Module]]) -> None:
    need: dict[torch.device, int] = {}
    largest: dict[torch.device, tuple[int, LayerPlan, nn.Module]] = {}
    seen: set[int] = set()
    for layer, module in planned:
        weight = getattr(module, "weight", None)
        if id(module) in seen or not isinstance(weight, torch.Tensor):
            continue
        seen.add(id(module))
        n_bytes = layer.params_after * weight.element_size()
        need[weight.device] = need.get(weight.device, 0) + n_bytes
        if n_bytes > largest.get(weight.device, (-1,))[0]:
            largest[weight.device] = (n_bytes, layer, module)
    for device, total in need.items():
        available = _memory.available_memory(device)
        if available is None or total <= available:
            continue
        n_bytes, layer, module = largest[device]
        where = "this machine has" if device.type == "cpu" else f"{device} has"
        raise DynifyError(
            f"the plan needs {format_gib(total)} of parameters for its dynamic layers "
            f"({layer.name}: {layer.settings.experts:,} experts x "
            f"{module.weight.numel():,} weights = {format_gib(n_bytes)}); {where} "
            f"{format_gib(available)} available; lower 'experts' in the recipe"
        )


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
            computes what the original did, to ``EQUIVALENCE_TOLERANCE``, both run in
            float64 when float32 is not close enough, so that float32 rounding never
            counts (see ``_check_equivalence``);
            skipped when a layer's recipe says ``init: scratch``, which starts a new
            function by design.
        seed: seeds every random draw of the conversion (the attention's initial weights,
            a ``scratch`` layer's experts), so conversions are reproducible.

    Returns:
        The model, same class, with the planned convs swapped; ``plan_of(model)`` gives
        the per-layer plan.
    """
    if find_plan(model) is not None:
        raise DynifyError("this model is already converted; apply dynify to the original model")
    if not inplace:
        model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    if isinstance(recipe, Plan):
        plan = recipe
        trace = None
    else:
        trace = trace_model(model, input_size=input_size)
        recipe = load_recipe(recipe)
        plan = resolve_plan(trace, recipe, strict=strict, model_name=model_name_of(model))
    # The planned convs are looked up and checked against the plan once, for both steps.
    planned = _planned_modules(model, plan)
    _check_memory(planned)
    # A layer initialised from scratch computes a new function by design: nothing to check.
    preserving = all(lp.settings.preserves_function for lp in plan.converted)
    checking = check and trace is not None and bool(plan.converted) and preserving
    swaps = _swap(model, planned, generator)
    if checking:
        assert trace is not None
        error, precision = _check_equivalence(model, trace, swaps)
        plan = replace(plan, check_error=error, check_precision=precision)
    attach_plan(model, plan)
    return model


def _check_equivalence(model: nn.Module, trace: ModelTrace, swaps: list[Swap]) -> tuple[float, str]:
    """The converted model's relative error against the original on the trace's example,
    and the precision it was measured in (the example's dtype, e.g. ``"float32"``, or
    ``"float64"`` for the re-check); raise when it exceeds ``EQUIVALENCE_TOLERANCE`` in float64.

    First in the model's own dtype (one cheap forward pass, against the trace's output);
    only an error above the tolerance is measured again with both models in float64, the
    original rebuilt by putting its convs back for that one pass. Why float64: the check
    must never blame dynify for float32 rounding. A badly conditioned network (timm's random
    init of efficientnetv2_rw_t, HaloNet, LeViT, ConvMixer with calibrated norms) amplifies
    float32 rounding to 1e-3 and more, the original on its own as much as the converted
    model, whereas in float64 an exact conversion differs by about 1e-12 and a wrong one (an
    expert off by 1%) by far more than the tolerance. Casting float32 (or float16, bfloat16)
    weights to float64 and back is exact, so the model is unchanged afterwards. Affordable:
    the example is one image, and the weights are in float64 only while it runs (float64
    convolutions are slow on CPU, hence float32 first). Devices without float64 (MPS) or a
    model with an op that has no float64 kernel keep the first measurement.
    """
    assert trace.example_input is not None
    err = relative_error(_output(model, trace.example_input, precise=False), trace.example_output)
    if err <= EQUIVALENCE_TOLERANCE:
        return err, str(trace.example_input.dtype).removeprefix("torch.")
    floating = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    if not any(t.device.type == "mps" for t in floating):
        try:
            converted = _output(model, trace.example_input, precise=True)
            _put_back(model, swaps, original=True)
            try:
                original = _output(model, trace.example_input, precise=True)
            finally:
                _put_back(model, swaps, original=False)
        except (RuntimeError, TypeError, NotImplementedError):
            pass  # no float64 kernel for some op: the first measurement stands
        else:
            err = relative_error(converted, original)
            if err <= EQUIVALENCE_TOLERANCE:
                return err, "float64"
            raise DynifyError(
                f"converted model's output differs from the original's by {err:.2e} (relative "
                f"max error > {EQUIVALENCE_TOLERANCE:g}, both computed in float64, so not "
                "rounding): the conversion changed the function; please report it with the "
                "model name and recipe (check=False skips the check)"
            )
    raise DynifyError(
        f"converted model's output differs from the original's by {err:.2e} (relative max "
        f"error > {EQUIVALENCE_TOLERANCE:g}) in {trace.example_input.dtype}, and this model "
        "cannot run in float64 to tell rounding from a conversion error; check=False skips "
        "the check"
    )


def _output(model: nn.Module, example: torch.Tensor, *, precise: bool) -> Any:
    """``model(example)`` in eval mode without gradients, in float64 when ``precise``; the
    model is left as it was (mode, dtypes, the same Parameter objects)."""
    if not precise:
        with torch.no_grad():
            with evaluating(model):
                return model(example)
    dtypes = _floating_dtypes(model)
    try:
        model.to(torch.float64)
        with torch.no_grad():
            with evaluating(model):
                return model(example.to(torch.float64))
    finally:
        _restore_dtypes(model, dtypes)


def _floating_dtypes(model: nn.Module) -> dict[tuple[int, str, str], torch.dtype]:
    """The dtype of every floating parameter and buffer, by (module, kind, name)."""
    dtypes = {}
    for module in model.modules():
        for kind, store in (("param", module._parameters), ("buffer", module._buffers)):
            for key, tensor in store.items():
                if tensor is not None and tensor.is_floating_point():
                    dtypes[(id(module), kind, key)] = tensor.dtype
    return dtypes


def _restore_dtypes(model: nn.Module, dtypes: dict[tuple[int, str, str], torch.dtype]) -> None:
    with torch.no_grad():
        for module in model.modules():
            for key, param in module._parameters.items():
                dtype = dtypes.get((id(module), "param", key))
                if param is not None and dtype is not None and param.dtype != dtype:
                    param.data = param.data.to(dtype)  # the same Parameter object
            for key, buffer in module._buffers.items():
                dtype = dtypes.get((id(module), "buffer", key))
                if buffer is not None and dtype is not None and buffer.dtype != dtype:
                    module._buffers[key] = buffer.to(dtype)

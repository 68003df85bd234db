"""Every kind of dynamic convolution through the whole pipeline: recipe -> plan -> swap ->
cost -> routing -> artifact, each checked against an independent reference (the
unconverted model, torch's FlopCounterMode, the built layers' own parameters)."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import dynify
from dynify import cost
from dynify.layers.base import DynamicLayer
from dynify.layers.kinds import KINDS
from dynify.routing import dynamic_layers

SIZE = (3, 32, 32)


def _recipe(kind: str) -> dict:
    defaults: dict = {"kind": kind, "reduction": 4}
    if kind != "dcd":
        defaults["experts"] = 2
    return {
        "defaults": defaults,
        "rules": [
            {"select": {"stem": True}, "convert": False},
            {"select": {"classifier": True}, "convert": False},
        ],
    }


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=10).eval()


@pytest.fixture(scope="module", params=KINDS)
def converted(request, resnet) -> tuple[str, nn.Module]:
    kind = request.param
    return kind, dynify.apply(resnet, _recipe(kind), input_size=SIZE, seed=1)


def test_a_kind_starts_out_computing_the_original_function(converted, resnet) -> None:
    kind, model = converted
    plan = dynify.plan_of(model)
    assert plan.converted and {lp.settings.kind for lp in plan.converted} == {kind}
    layers = dynamic_layers(model)
    assert len(layers) == len(plan.converted)
    assert all(isinstance(layer, DynamicLayer) and layer.kind == kind for _, layer in layers)
    x = torch.randn(3, *SIZE)
    for mode in ("eval", "train"):
        getattr(model, mode)()
        getattr(resnet, mode)()
        with torch.no_grad():
            out, ref = model(x), resnet(x)
        assert float((out - ref).abs().max() / ref.abs().max()) < 1e-4, mode
    resnet.eval()


def test_the_plan_counts_the_parameters_the_layers_have(converted, resnet) -> None:
    _, model = converted
    plan = dynify.plan_of(model)
    built = sum(p.numel() for p in model.parameters())
    static = sum(p.numel() for p in resnet.parameters())
    assert built == static - plan.params_before + plan.params_after


def test_the_cost_model_prices_a_kind_as_torch_counts_it(converted) -> None:
    """Plan, built model and FlopCounterMode agree, per image and for a batch."""
    _, model = converted
    plan = dynify.plan_of(model)
    for batch in (1, 4):
        priced = cost.count(plan, batch_size=batch)
        counted = cost.count(model, input_size=SIZE, batch_size=batch)
        flops = cost.measure_flops(model, input_size=SIZE, batch_size=batch)
        assert priced.macs == counted.macs, batch
        assert 2 * counted.macs == flops, batch


def test_routing_is_measured_for_every_kind(converted) -> None:
    kind, model = converted
    report = dynify.routing_report(model, torch.randn(8, *SIZE))
    assert {lr.kind for lr in report.layers} == {kind}
    for lr in report.layers:
        assert 0 <= lr.entropy <= 1 and lr.sample_spread >= 0 and lr.output_effect >= 0
    assert report.summary().startswith("routing effect")


def test_an_artifact_rebuilds_the_kind(converted, tmp_path: Path) -> None:
    kind, model = converted
    path = tmp_path / f"{kind}.safetensors"
    dynify.save(model, path)
    loaded = dynify.load(path).eval()
    assert [lp.settings.kind for lp in dynify.plan_of(loaded).converted] == [
        lp.settings.kind for lp in dynify.plan_of(model).converted
    ]
    x = torch.randn(2, *SIZE)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_the_temperature_scheduler_drives_the_kinds_that_have_one(converted) -> None:
    kind, model = converted
    scheduler = dynify.TemperatureScheduler(model, schedule=dynify.TemperatureSchedule(5, 1, 2))
    tempered = [layer for _, layer in dynamic_layers(model) if layer.has_temperature]
    assert len(scheduler.layers) == len(tempered)
    assert all(layer.temperature == 5 for layer in tempered)
    assert (kind == "dcd") == (not tempered)


def test_a_plan_of_every_kind_reads_back_equal(converted) -> None:
    from dynify.plan import Plan

    _, model = converted
    plan = dynify.plan_of(model)
    assert Plan.from_dict(plan.to_dict()).layers == plan.layers

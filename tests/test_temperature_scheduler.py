"""TemperatureScheduler: every dynamic layer follows its plan's schedule, per step or epoch.

Expected temperatures are written out from the schedule definitions (start, end, length,
shape) here, not taken from ``TemperatureSchedule.value``.
"""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from torch import nn

import dynify
from dynify import DynamicConv2d, TemperatureSchedule, TemperatureScheduler


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=4, channels=(8, 16, 24, 32), stem_width=8)


RECIPE = {
    "defaults": {"temperature": {"start": 30, "end": 1, "length": 10, "shape": "linear"}},
    "rules": [
        {"select": {"stem": True}, "convert": False},
        {"select": {"classifier": True}, "convert": False},
        {
            "name": "last stage anneals by cosine in steps",
            "select": {"name": "layer4.*"},
            "temperature": {"start": 8, "end": 2, "length": 6, "shape": "cosine", "unit": "step"},
        },
    ],
}


@pytest.fixture(scope="module")
def converted() -> nn.Module:
    return dynify.apply(_tiny_model(), RECIPE, input_size=(3, 32, 32))


def _linear(t: float) -> float:  # 30 -> 1 over 10 epochs
    return 30 + (1 - 30) * min(t / 10, 1.0)


def _cosine(step: int) -> float:  # 8 -> 2 over 6 steps
    p = min(step / 6, 1.0)
    return 2 + (8 - 2) * (1 + math.cos(math.pi * p)) / 2


def _layers(model: nn.Module) -> dict[str, float]:
    return {n: m.temperature for n, m in model.named_modules() if isinstance(m, DynamicConv2d)}


def test_every_layer_follows_its_own_schedule_per_step(converted: nn.Module) -> None:
    model = copy.deepcopy(converted)
    sched = TemperatureScheduler(model, steps_per_epoch=4)
    names = _layers(model)
    assert any(n.startswith("layer4.") for n in names)
    assert any(not n.startswith("layer4.") for n in names)
    for step in range(0, 50):
        for name, value in _layers(model).items():
            want = _cosine(step) if name.startswith("layer4.") else _linear(step / 4)
            assert value == pytest.approx(want, rel=1e-6), (name, step)
        sched.step()
    assert sched.epoch == pytest.approx(50 / 4)
    assert set(_layers(model).values()) == {1.0, 2.0}


@pytest.mark.parametrize(
    ("shape", "formula"),
    [
        ("linear", lambda p: 20 + (2 - 20) * p),
        ("cosine", lambda p: 2 + (20 - 2) * (1 + math.cos(math.pi * p)) / 2),
        ("exponential", lambda p: 20 * (2 / 20) ** p),
        ("constant", lambda p: 20.0),
    ],
)
def test_shapes_per_epoch_override_the_plan(converted: nn.Module, shape: str, formula) -> None:
    model = copy.deepcopy(converted)
    schedule = TemperatureSchedule(start=20, end=2, length=4, shape=shape)  # type: ignore[arg-type]
    sched = TemperatureScheduler(model, schedule=schedule)
    for epoch in range(7):
        p = min(epoch / 4, 1.0)
        values = set(_layers(model).values())
        assert len(values) == 1
        assert values.pop() == pytest.approx(formula(p), rel=1e-6)
        assert sched.temperature == pytest.approx(formula(p), rel=1e-6)
        sched.step()


def test_state_dict_resumes_the_position(converted: nn.Module) -> None:
    a, b = copy.deepcopy(converted), copy.deepcopy(converted)
    sa = TemperatureScheduler(a, steps_per_epoch=3)
    for _ in range(7):
        sa.step()
    sb = TemperatureScheduler(b, steps_per_epoch=3)
    assert _layers(b) != _layers(a)
    sb.load_state_dict(sa.state_dict())
    assert _layers(b) == _layers(a)
    for _ in range(5):
        sa.step()
        sb.step()
        assert _layers(b) == _layers(a)
    with pytest.raises(ValueError, match="steps per epoch"):
        TemperatureScheduler(copy.deepcopy(converted), steps_per_epoch=4).load_state_dict(
            sa.state_dict()
        )


def test_step_update_is_absolute(converted: nn.Module) -> None:
    model = copy.deepcopy(converted)
    sched = TemperatureScheduler(model, steps_per_epoch=5)
    sched.step_update(25)
    assert sched.epoch == 5
    assert sched.temperatures()["layer1.0.conv1"] == pytest.approx(_linear(5))


def test_model_without_plan_uses_the_default() -> None:
    model = nn.Sequential(
        DynamicConv2d(3, 8, 3, padding=1), nn.ReLU(), DynamicConv2d(8, 8, 3, padding=1)
    )
    sched = TemperatureScheduler(model, default=TemperatureSchedule(start=5, end=1, length=2))
    assert set(_layers(model).values()) == {5.0}
    sched.step()
    assert set(_layers(model).values()) == {3.0}
    step_unit = TemperatureSchedule(start=5, end=1, length=2, unit="step")
    with pytest.raises(ValueError, match="steps_per_epoch"):
        TemperatureScheduler(model, default=step_unit)
    assert TemperatureScheduler(nn.Linear(2, 2)).temperature is None


def test_three_line_usage_in_a_plain_loop() -> None:
    """The loop of docs/training.md: construct, then step after every optimiser step."""
    model = nn.Sequential(DynamicConv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    loader = [(torch.randn(2, 3, 8, 8), torch.tensor([0, 1])) for _ in range(5)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = TemperatureScheduler(model, steps_per_epoch=len(loader))
    for _ in range(2):
        for x, y in loader:
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
    assert model[0].temperature == pytest.approx(30 + (1 - 30) * 2 / 10)

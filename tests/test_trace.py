"""trace_model: every conv found, with its shapes, call count, how it was found and its
position, checked against hand-read architectures and tiny models written here."""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import timm
import torch
from torch import nn
from torch.nn.modules import module as torch_module

import dynify
from dynify import cost
from dynify.errors import DynifyError
from dynify.layers import DynamicConv2d
from dynify.trace import check_input_size, default_input_size, trace_model

warnings.filterwarnings("ignore", category=UserWarning)


def rel_err(y: torch.Tensor, y0: torch.Tensor) -> float:
    return float((y - y0).abs().max() / y0.abs().max())


def conv_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


# -- positions on real timm models --------------------------------------------------------


@pytest.fixture(scope="module")
def resnet50_trace():
    return trace_model(timm.create_model("resnet50").eval(), input_size=(3, 64, 64))


def test_resnet50_positions(resnet50_trace) -> None:
    t = resnet50_trace
    assert [s.name for s in t.sites if s.stem] == ["conv1"]
    assert t.num_stages == 5  # act1, layer1..layer4 (timm feature_info)
    assert len(t) == 53 and all(s.found_by == "fx" and s.calls == 1 for s in t)
    assert t.fx_error is None

    conv1 = t.site("conv1")
    assert conv1.input_shape == (3, 64, 64) and conv1.output_shape == (64, 32, 32)
    assert conv1.stage == 0 and conv1.block is None

    # layer1.0: conv1 -> conv2 -> conv3 on the main path; downsample.0 is the projection.
    block = [s for s in t if s.block == "layer1.0"]
    assert [s.name for s in block] == [
        "layer1.0.conv1",
        "layer1.0.conv2",
        "layer1.0.conv3",
        "layer1.0.downsample.0",
    ]
    assert [s.first_in_block for s in block] == [True, False, False, False]
    assert [s.last_in_block for s in block] == [False, False, True, False]
    assert all(s.stage == 1 for s in block)
    # Every bottleneck has exactly one first and one last conv: conv1 and conv3.
    blocks = {s.block for s in t if s.block}
    assert len(blocks) == 3 + 4 + 6 + 3
    assert {s.name.rsplit(".", 1)[1] for s in t if s.first_in_block} == {"conv1"}
    assert {s.name.rsplit(".", 1)[1] for s in t if s.last_in_block} == {"conv3"}
    assert sum(s.first_in_block for s in t) == sum(s.last_in_block for s in t) == 16

    # Stages follow feature_info: layerN convs are stage N.
    for s in t:
        if s.name.startswith("layer"):
            assert s.stage == int(s.name[5]), s.name
    down = t.site("layer2.0.downsample.0")
    assert down.stride == (2, 2) and down.kernel_size == (1, 1)
    assert down.input_shape == (256, 16, 16) and down.output_shape == (512, 8, 8)
    assert not any(s.classifier for s in t)  # resnet's classifier is a Linear
    assert "stage" in t.site("layer3.1.conv2").position


def test_dla34_positions() -> None:
    t = trace_model(timm.create_model("dla34").eval(), input_size=(3, 64, 64))
    assert [s.name for s in t if s.classifier] == ["fc"]
    fc = t.site("fc")
    assert fc.kernel_size == (1, 1) and fc.input_shape == (512, 1, 1) and not fc.stem
    assert fc.position == "classifier"
    # base layer and levels 0-1 run before the first tree: the stem.
    assert [s.name for s in t if s.stem] == ["base_layer.0", "level0.0", "level1.0"]
    # A tree block: its two convs, first and last.
    tree = [s for s in t if s.block == "level2.tree1"]
    assert [s.name for s in tree] == ["level2.tree1.conv1", "level2.tree1.conv2"]
    assert tree[0].first_in_block and tree[1].last_in_block


def test_mobilenetv2_positions_and_depthwise() -> None:
    t = trace_model(timm.create_model("mobilenetv2_100").eval(), input_size=(3, 64, 64))
    assert [s.name for s in t if s.stem] == ["conv_stem"]
    b = [s for s in t if s.block == "blocks.1.0"]
    assert [s.name.rsplit(".", 1)[1] for s in b] == ["conv_pw", "conv_dw", "conv_pwl"]
    assert [(s.first_in_block, s.last_in_block) for s in b] == [
        (True, False),
        (False, False),
        (False, True),
    ]
    dw = b[1]
    assert dw.depthwise and dw.groups == dw.in_channels == 96 and dw.stride == (2, 2)
    assert dw.input_shape == (96, 32, 32) and dw.output_shape == (96, 16, 16)
    assert not b[0].depthwise
    # Every conv is counted once, in execution order, with its parameters.
    assert [s.name for s in t] == conv_names(timm.create_model("mobilenetv2_100"))
    assert t.site("conv_head").params == 320 * 1280


def test_repvgg_stem_covers_both_branches_reading_the_image() -> None:
    t = trace_model(timm.create_model("repvgg_a0").eval(), input_size=(3, 64, 64))
    assert {s.name for s in t if s.stem} == {"stem.conv_kxk.conv", "stem.conv_1x1.conv"}


def test_default_input_size_comes_from_pretrained_cfg() -> None:
    model = timm.create_model("efficientnet_b1")
    assert default_input_size(model) == (3, 240, 240)
    assert trace_model(model).site("conv_stem").input_shape == (3, 240, 240)
    assert default_input_size(nn.Conv2d(3, 3, 1)) == (3, 224, 224)


# -- convs fx cannot see on their own -----------------------------------------------------


def test_convs_inside_fx_leaf_modules_are_found_by_hook() -> None:
    """nf_resnet26's NormFreeBlock is a timm fx leaf: its convs have no graph node."""
    model = timm.create_model("nf_resnet26").eval()
    t = trace_model(model, input_size=(3, 64, 64))
    by = {s.name: s.found_by for s in t}
    assert set(by) == set(conv_names(model))
    inside = [n for n in by if n.startswith("stages.")]
    assert inside and all(by[n] == "hook" for n in inside)
    assert all(t.site(n).input_shape is not None and t.site(n).calls == 1 for n in inside)
    # ...and they convert: the plan says how they were found.
    plan = dynify.make_plan(t, "all")
    assert "found by hook" in plan.layer(inside[0]).reason
    assert len(plan.converted) == len(by)


class Twice(nn.Module):
    """One conv module called at two places (weights shared)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.shared(x))
        x = torch.relu(self.shared(x))
        return self.head(x).mean((2, 3))


def test_shared_module_called_twice() -> None:
    model = Twice().eval()
    t = trace_model(model, input_size=(3, 12, 12))
    assert t.site("shared").calls == 2 and t.site("stem").calls == 1
    assert t.site("shared").found_by == "fx"
    converted = dynify.apply(model, "all", input_size=(3, 12, 12))
    assert isinstance(converted.shared, DynamicConv2d)
    assert "called 2x" in dynify.plan_of(converted).layer("shared").reason
    # One dynamic module, used at both places: the sharing survives the conversion.
    assert sum(isinstance(m, DynamicConv2d) for m in converted.modules()) == 3
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert rel_err(converted(x), model(x)) <= 1e-4
        converted.shared.attention.fc2.bias[0] = 3.0
        converted.shared.weight[0].mul_(2.0)
        assert rel_err(converted(x), model(x)) > 1e-3


def test_module_registered_under_two_names_is_swapped_everywhere() -> None:
    model = Twice().eval()
    model.alias = model.shared  # the same module under a second name
    converted = dynify.apply(model, "all", input_size=(3, 12, 12))
    assert converted.alias is converted.shared
    assert isinstance(converted.alias, DynamicConv2d)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert rel_err(converted(x), model(x)) <= 1e-4


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pos = nn.Conv2d(8, 8, 3, padding=1)
        self.neg = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = self.pos(x) if x.mean() > 0 else self.neg(x)
        return self.head(x).flatten(1)


def test_model_fx_cannot_trace_is_found_by_hooks_and_converts() -> None:
    torch.manual_seed(0)
    model = Branchy().eval()
    with torch.no_grad():
        model.stem.bias.fill_(0.5)  # the example (and every input here) takes the pos branch
    t = trace_model(model, input_size=(3, 9, 9))
    assert t.fx_error is not None and "TraceError" in t.fx_error
    assert all(s.found_by == "hook" for s in t)
    assert [s.name for s in t] == ["stem", "pos", "head", "neg"]  # called ones first
    assert t.site("pos").input_shape == (8, 9, 9) and t.site("head").output_shape == (4, 9, 9)
    # The branch that never ran cannot be checked: it is reported, not converted.
    assert t.site("neg").calls == 0
    assert t.site("neg").unsupported == "not called in the example forward pass"

    converted = dynify.apply(model, "all", input_size=(3, 9, 9))
    plan = dynify.plan_of(converted)
    assert [lp.name for lp in plan.converted] == ["stem", "pos", "head"]
    assert type(converted.neg) is nn.Conv2d
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert rel_err(converted(x), model(x)) <= 1e-4
    assert plan.fx_error == t.fx_error


def test_use_fx_false_finds_the_same_convs() -> None:
    model = Twice().eval()
    with_fx = trace_model(model, input_size=(3, 8, 8))
    hooks = trace_model(model, input_size=(3, 8, 8), use_fx=False)
    assert [s.name for s in hooks] == [s.name for s in with_fx]
    assert all(s.found_by == "hook" for s in hooks)
    assert [s.input_shape for s in hooks] == [s.input_shape for s in with_fx]


def test_condconv_is_reported_unsupported_with_reason() -> None:
    model = timm.create_model("efficientnet_cc_b0_4e").eval()
    t = trace_model(model, input_size=(3, 64, 64))
    cond = [s for s in t if s.type_name == "CondConv2d"]
    expected = [n for n, m in model.named_modules() if type(m).__name__ == "CondConv2d"]
    assert sorted(s.name for s in cond) == sorted(expected) and len(cond) == 24
    assert all(s.unsupported == "already dynamic (timm CondConv2d)" for s in cond)
    assert all(s.unsupported is None for s in t if s.type_name == "Conv2d")
    assert cond[0].in_channels > 0 and cond[0].input_shape is not None


# -- bookkeeping --------------------------------------------------------------------------


def test_trace_keeps_the_mode_and_the_function() -> None:
    model = Twice().train()
    x = torch.randn(1, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trace_model(model, input_size=(3, 8, 8))
    assert model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model(x).shape == (1, 4)


def test_example_output_is_the_models_output() -> None:
    model = Twice().eval()
    t = trace_model(model, input_size=(3, 8, 8))
    assert t.example_input.shape == (1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(t.example_input), t.example_output)


def test_site_round_trips_through_dict() -> None:
    t = trace_model(Twice().eval(), input_size=(3, 8, 8))
    for s in t:
        assert type(s).from_dict(s.to_dict()) == s
    with pytest.raises(KeyError):
        t.site("nope")


@pytest.mark.parametrize(
    "size", [(3, 8), (3, 0, 8), (3, -1, 8), (3, 8, 8.5), (5000, 8, 8), (3, 8193, 8), "3,8", None]
)
def test_bad_input_size(size) -> None:
    if size is None:  # None is the model's own size for trace_model, not for the check
        with pytest.raises(DynifyError, match=r"input_size must be three integers C,H,W"):
            check_input_size(size)
        return
    with pytest.raises(DynifyError, match=r"input_size must be three integers C,H,W") as info:
        trace_model(Twice(), input_size=size)
    assert info.value.arguments == ("input_size",)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("3,32,32", (3, 32, 32)), ("3x224x224", (3, 224, 224)), ([1, 8192, 2], (1, 8192, 2))],
)
def test_input_sizes_are_read_the_same_everywhere(value, expected) -> None:
    from dynify.models import parse_input_size

    assert check_input_size(value) == parse_input_size(value) == expected


def test_model_that_fails_on_the_example_is_a_dynify_error() -> None:
    with pytest.raises(DynifyError, match=r"does not run on an input of size \(4, 8, 8\)"):
        trace_model(Twice(), input_size=(4, 8, 8))  # stem wants 3 channels


def test_apply_and_count_leave_no_global_hooks_and_keep_no_model_alive() -> None:
    """The op recorder is re-entered during a run; its global module hooks must still all go
    (a leftover pair slowed every later forward and kept each traced model alive)."""

    def global_hooks() -> int:
        return len(torch_module._global_forward_hooks) + len(torch_module._global_forward_pre_hooks)

    before = global_hooks()
    model = timm.create_model("resnet18", pretrained=False, num_classes=5)
    converted = dynify.apply(model, "all", input_size=(3, 32, 32))
    cost.count(converted)
    assert global_hooks() == before
    refs = [weakref.ref(model), weakref.ref(converted)]
    del model, converted
    gc.collect()
    assert all(r() is None for r in refs)

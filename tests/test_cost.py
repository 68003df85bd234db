"""The cost model against independent references.

References: MACs computed by hand in this file for small nets and single dynamic layers;
torch's ``FlopCounterMode`` run on real forward passes (``measure_flops``), which must agree
exactly with the analytic count for static and converted timm models at batch 1 and > 1;
and published figures: torchvision's model metadata (``_ops`` GMACs, ``num_params``, for the
same architectures as timm's) and timm's model cards (ResNet-50 4.1 GMACs, MobileNetV2 0.3).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import timm
import torch
from torch import nn

import dynify
from dynify import DynamicConv2d, cost
from dynify.cost import counting, pricing
from dynify.errors import DynifyError

SMALL = (3, 64, 64)


# -- hand-computed ----------------------------------------------------------------------------


class TinyNet(nn.Module):
    """3x8x8 -> conv 3->8 3x3 -> depthwise 3x3 -> global pool -> linear 8->5."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw(torch.relu(self.conv(x)))
        return self.fc(x.mean((2, 3)))


# conv: 8 out x 3 in x 9 taps x 64 pixels; depthwise: 8 x 1 x 9 x 64; linear: 8 x 5
TINY_MACS = 8 * 3 * 9 * 64 + 8 * 1 * 9 * 64 + 8 * 5  # 18472
TINY_PARAMS = (8 * 27 + 8) + (8 * 9 + 8) + (8 * 5 + 5)  # 349


@pytest.mark.parametrize("batch", [1, 3])
def test_tiny_net_by_hand(batch: int) -> None:
    model = TinyNet()
    report = cost.count(model, input_size=(3, 8, 8), batch_size=batch)
    assert report.macs == TINY_MACS * batch
    assert report.flops == 2 * TINY_MACS * batch
    assert report.params == TINY_PARAMS
    assert report.weight_bytes == 4 * TINY_PARAMS
    assert report.extra_ops == 0
    assert report.row("conv").macs == 8 * 3 * 9 * 64 * batch
    assert report.row("dw").macs == 8 * 9 * 64 * batch
    assert report.row("fc").macs == 40 * batch
    assert report.row("fc").params == 45
    measured = cost.measure_flops(model, input_size=(3, 8, 8), device="cpu", batch_size=batch)
    assert measured == 2 * TINY_MACS * batch


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.enable_grad])
def test_counts_do_not_depend_on_the_grad_mode(mode) -> None:
    # Under inference_mode conv2d and linear reach dispatch modes whole; the recorder
    # decomposes them as FlopCounterMode does.
    with mode():
        report = cost.count(TinyNet(), input_size=(3, 8, 8))
        measured = cost.measure_flops(TinyNet(), input_size=(3, 8, 8), device="cpu")
    assert report.macs == TINY_MACS
    assert measured == 2 * TINY_MACS


def _dynamic_by_hand(c_in, c_out, k, groups, hw_in, hw_out, experts, hidden, bias) -> int:
    kernel = c_out * (c_in // groups) * k * k
    return (
        c_in * hidden  # attention fc1
        + hidden * experts  # attention fc2
        + experts * kernel  # kernel mixing
        + (experts * c_out if bias else 0)  # bias mixing
        + kernel * hw_out[0] * hw_out[1]  # the convolution
    )


# (c_in, c_out, k, stride, groups, size, experts, reduction, bias, attention): small ones take
# the folded grouped conv at B > 1, the 64-channel one the per-sample path, and the
# depthwise one the folded path with groups = B * C.
LAYERS = [
    (16, 32, 3, 1, 1, 10, 4, 4, True, "softmax"),
    (64, 64, 3, 1, 1, 16, 4, 4, False, "softmax"),
    (24, 24, 3, 2, 24, 9, 8, 16, True, "sigmoid"),
    (3, 8, 5, 2, 1, 11, 2, 4, True, "softmax"),
]


@pytest.mark.parametrize("cfg", LAYERS, ids=lambda c: f"{c[0]}-{c[1]}k{c[2]}s{c[3]}g{c[4]}")
@pytest.mark.parametrize("batch", [1, 3])
def test_single_dynamic_layer_by_hand(cfg, batch: int) -> None:
    c_in, c_out, k, stride, groups, size, experts, r, bias, attention = cfg
    layer = DynamicConv2d(
        c_in, c_out, k, stride=stride, padding=k // 2, groups=groups, bias=bias,
        num_experts=experts, reduction=r, attention=attention,
    )  # fmt: skip
    model = nn.Sequential(layer)
    hidden = max(c_in // r, 4)
    out = (size + 2 * (k // 2) - k) // stride + 1
    macs = _dynamic_by_hand(c_in, c_out, k, groups, (size, size), (out, out), experts, hidden, bias)
    report = cost.count(model, input_size=(c_in, size, size), batch_size=batch)
    row = report.row("0")
    assert row.kind == "dynamic"
    assert report.macs == row.macs == macs * batch
    assert row.parts["conv"] == c_out * (c_in // groups) * k * k * out * out * batch
    assert row.parts["kernel_mix"] == experts * c_out * (c_in // groups) * k * k * batch
    assert row.parts["bias_mix"] == (experts * c_out * batch if bias else 0)
    # pool: C*H*W adds + C divides; fc biases h + K, ReLU h, 1/T K, softmax/sigmoid 3K
    assert row.extra_ops == (c_in * (size * size + 1) + 2 * hidden + 5 * experts) * batch
    assert report.params == sum(p.numel() for p in layer.parameters())
    measured = cost.measure_flops(model, input_size=(c_in, size, size), device="cpu",
                                  batch_size=batch)  # fmt: skip
    assert measured == 2 * macs * batch


@pytest.mark.parametrize("batch", [1, 4])
def test_tiny_map_layer_is_priced_as_it_runs(batch: int) -> None:
    # 256 channels at 2x2: at B > 1 the layer runs all K experts as one conv and mixes the
    # outputs (the "stacked" formulation); at B = 1 it mixes one kernel.
    c, size, k = 256, 2, 4
    layer = DynamicConv2d(c, c, 3, padding=1, num_experts=k, bias=True)
    model = nn.Sequential(layer)
    report = cost.count(model, input_size=(c, size, size), batch_size=batch)
    row = report.row("0")
    static_conv = c * c * 9 * size * size * batch
    if batch == 1:
        assert row.parts["conv"] == static_conv
        assert row.parts["kernel_mix"] == k * c * c * 9
        assert "output_mix" not in row.parts
    else:
        assert row.parts["conv"] == k * static_conv
        assert row.parts["kernel_mix"] == 0
        assert row.parts["output_mix"] == k * c * size * size * batch
    measured = cost.measure_flops(model, input_size=(c, size, size), device="cpu",
                                  batch_size=batch)  # fmt: skip
    assert measured == report.flops


def test_dynamic_layer_chunked_batch_is_counted_once_per_sample() -> None:
    # A tiny max_kernel_bytes forces one chunk per sample in the layer's eager path.
    layer = DynamicConv2d(32, 32, 3, padding=1, num_experts=4, max_kernel_bytes=1)
    model = nn.Sequential(layer)
    single = cost.count(model, input_size=(32, 12, 12)).macs
    measured = cost.measure_flops(model, input_size=(32, 12, 12), device="cpu", batch_size=5)
    assert measured == 2 * 5 * single


# -- timm architectures: analytic == FlopCounterMode, exactly ------------------------------------

ARCHS = {
    # name: (recipe, timm kwargs)
    "resnet18": ("dycnn", {}),
    "mobilenetv2_100": ("dycnn", {}),
    "vit_tiny_patch16_224": ("all", {"img_size": 64}),  # its only conv is the patch stem
}
SLOW_ARCHS = {
    "efficientnet_b0": ("dycnn", {}),
    "convnext_nano": ("dycnn", {}),
    "tf_efficientnet_b0": ("dycnn", {}),  # TF 'SAME' padding: DynamicConv2dSame
    "efficientnet_cc_b0_4e": ("dycnn", {}),  # timm's own CondConv2d stays static
    "resnetv2_50x1_bit": ("dycnn", {}),  # StdConv2d weight standardisation
    "mixnet_s": ("mobile", {}),
}


@pytest.fixture(scope="module")
def converted_models() -> dict[str, tuple[nn.Module, nn.Module]]:
    return {}


def _pair(cache, name: str, recipe: str, kwargs) -> tuple[nn.Module, nn.Module]:
    if name not in cache:
        model = timm.create_model(name, **kwargs).eval()
        cache[name] = (model, dynify.apply(model, recipe, input_size=SMALL))
    return cache[name]


def _check_agreement(model: nn.Module, converted: nn.Module, batch: int) -> None:
    before = cost.count(model, input_size=SMALL, batch_size=batch)
    after = cost.count(converted, batch_size=batch)
    assert before.flops == cost.measure_flops(
        model, input_size=SMALL, device="cpu", batch_size=batch
    )
    assert after.flops == cost.measure_flops(converted, device="cpu", batch_size=batch)
    assert after.params == sum(p.numel() for p in converted.parameters())
    assert before.params == sum(p.numel() for p in model.parameters())
    plan = dynify.plan_of(converted)
    assert plan.converted, "the recipe converted nothing: the test would prove little"
    assert after.macs > before.macs
    # The plan priced as the unconverted model equals the static model's own count.
    assert cost.count(plan, static=True, batch_size=batch).macs == before.macs


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", list(ARCHS))
def test_analytic_equals_flopcounter(name: str, batch: int, converted_models) -> None:
    recipe, kwargs = ARCHS[name]
    _check_agreement(*_pair(converted_models, name, recipe, kwargs), batch)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", list(SLOW_ARCHS))
def test_analytic_equals_flopcounter_more_families(name: str, batch: int, converted_models) -> None:
    recipe, kwargs = SLOW_ARCHS[name]
    _check_agreement(*_pair(converted_models, name, recipe, kwargs), batch)


def test_vit_attention_is_counted_on_cpu() -> None:
    # torch's FlopCounterMode has no formula for the CPU attention kernel; dynify adds
    # torch's own, so attention's 2 x B x heads x N^2 x d MACs per block are included.
    model = timm.create_model("vit_tiny_patch16_224", img_size=32).eval()
    report = cost.count(model, input_size=(3, 32, 32))
    tokens, heads, dim, blocks = 4 + 1, 3, 64, 12
    attention = [r for r in report.rows if r.kind == "attention"]
    assert len(attention) == blocks
    assert all(r.macs == 2 * heads * tokens * tokens * dim for r in attention)
    assert report.flops == cost.measure_flops(model, input_size=(3, 32, 32), device="cpu")


# -- published figures --------------------------------------------------------------------------

# torchvision's weight metadata (``weights.meta["_ops"]`` in GMACs, ``["num_params"]``) for
# the same architectures as timm's; timm's model cards round to one decimal.
PUBLISHED = {
    "resnet50": (4.089, 25_557_032, 4.1),
    "mobilenetv2_100": (0.301, 3_504_872, 0.3),
}
PUBLISHED_SLOW = {
    "resnet18": (1.814, 11_689_512, 1.8),
    "efficientnet_b0": (0.386, 5_288_548, 0.4),
    "mobilenetv3_large_100": (0.217, 5_483_032, 0.2),
}


def _check_published(name: str, gmacs: float, params: int, card: float) -> None:
    report = cost.count(timm.create_model(name), input_size=(3, 224, 224))
    # torchvision gives three decimals, timm's cards one: equal at that precision.
    assert round(report.macs / 1e9, 3) == gmacs
    assert round(report.macs / 1e9, 1) == card
    assert report.params == params


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_macs(name: str) -> None:
    _check_published(name, *PUBLISHED[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PUBLISHED_SLOW))
def test_published_macs_more(name: str) -> None:
    _check_published(name, *PUBLISHED_SLOW[name])


# -- plans: priced without building ---------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18_trace():
    model = timm.create_model("resnet18").eval()
    return model, dynify.trace_model(model, input_size=SMALL)


@pytest.mark.parametrize("recipe", ["dycnn", "mobile", "all"])
def test_plan_price_equals_built_model(recipe: str, resnet18_trace) -> None:
    model, trace = resnet18_trace
    plan = dynify.make_plan(trace, recipe)
    converted = dynify.apply(model, plan)
    priced = cost.count(plan, batch_size=4)
    built = cost.count(converted, input_size=SMALL, batch_size=4)  # a fresh forward pass
    assert (priced.macs, priced.params, priced.extra_ops) == (
        built.macs,
        built.params,
        built.extra_ops,
    )
    fast = cost.price(plan, batch_size=4)
    assert (fast.macs, fast.params, fast.extra_ops) == (priced.macs, priced.params,
                                                        priced.extra_ops)  # fmt: skip


def test_plan_round_trip_keeps_its_price(resnet18_trace) -> None:
    _, trace = resnet18_trace
    plan = dynify.make_plan(trace, "dycnn")
    again = dynify.Plan.from_dict(plan.to_dict())
    assert again.op_counts is not None
    assert cost.count(again).totals == cost.count(plan).totals


def test_plan_at_another_input_size_is_refused(resnet18_trace) -> None:
    _, trace = resnet18_trace
    with pytest.raises(DynifyError, match="traced at input size"):
        cost.count(dynify.make_plan(trace, "dycnn"), input_size=(3, 32, 32))


def test_converted_model_counted_at_another_size(resnet18_trace) -> None:
    model, trace = resnet18_trace
    converted = dynify.apply(model, dynify.make_plan(trace, "dycnn"))
    other = cost.count(converted, input_size=(3, 32, 32))
    assert other.input_size == (3, 32, 32)
    assert other.flops == cost.measure_flops(converted, input_size=(3, 32, 32), device="cpu")


def test_dynamic_model_without_plan_counts_like_its_plan(resnet18_trace) -> None:
    import copy

    model, trace = resnet18_trace
    plan = dynify.make_plan(trace, "dycnn")
    converted = dynify.apply(model, plan)
    bare = copy.deepcopy(model)  # the same dynamic layers put in by hand: no plan attached
    for name, module in converted.named_modules():
        if isinstance(module, DynamicConv2d):
            bare.set_submodule(name, module)
    for batch in (1, 3):
        scanned = cost.count(bare, input_size=SMALL, batch_size=batch)
        priced = cost.count(plan, batch_size=batch)
        assert scanned.totals == priced.totals
        assert scanned.row("layer2.0.conv1").parts == priced.row("layer2.0.conv1").parts


def test_plan_without_op_counts_prices_its_convs(resnet18_trace) -> None:
    _, trace = resnet18_trace
    data = dynify.make_plan(trace, "dycnn").to_dict()
    data.pop("op_counts")
    old = cost.count(dynify.Plan.from_dict(data))
    full = cost.count(dynify.make_plan(trace, "dycnn"))
    assert not old.complete
    assert old.macs == full.macs - 512 * 1000  # everything but the classifier


def test_pricing_many_plans_indexes_the_trace_once(resnet18_trace, monkeypatch) -> None:
    # What makes pricing fast enough for the search (bench/cost.py times it): the trace's op
    # counts are indexed once, however many plans share them; pricing runs no model and
    # ``price`` builds no rows. Counted, not timed: a shared machine makes timings flaky.
    _, trace = resnet18_trace
    built = []
    build = pricing._build_index
    monkeypatch.setattr(
        pricing, "_build_index", lambda counts: built.append(counts) or build(counts)
    )

    def no_pass(*args, **kwargs):
        raise AssertionError("pricing a plan ran the model")

    monkeypatch.setattr(counting, "record_ops", no_pass)
    fresh = dynify.Plan.from_dict(dynify.make_plan(trace, "dycnn").to_dict())  # new OpCounts
    plans = [dataclasses.replace(fresh, recipe=f"r{i}") for i in range(50)]
    assert all(p.op_counts is fresh.op_counts for p in plans)
    for plan in plans:
        cost.count(plan)
    assert len(built) == 1 and built[0] is fresh.op_counts

    expected = cost.count(fresh, batch_size=2).totals

    def no_rows(*args, **kwargs):
        raise AssertionError("price() built a row")

    monkeypatch.setattr(pricing, "LayerCost", no_rows)
    totals = [cost.price(plan, batch_size=2) for plan in plans]
    assert len(built) == 1
    assert totals[0] == totals[-1] == expected


# -- budgets ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("600MFLOPs", "flops", 600e6),
        ("0.6GFLOPs", "flops", 0.6e9),
        ("600 mflops", "flops", 600e6),
        ("300MMACs", "macs", 300e6),
        ("4.1 GMACs", "macs", 4.1e9),
        ("25Mparams", "params", 25e6),
        ("25 M params", "params", 25e6),
        ("1e6params", "params", 1e6),
        ("3ms", "latency", 0.003),
        ("3 MS", "latency", 0.003),
        ("0.5s", "latency", 0.5),
        ("250us", "latency", 250e-6),
        ("2TFLOP", "flops", 2e12),
        ("800KMACs", "macs", 800e3),
    ],
)
def test_budget_parsing(text: str, kind: str, value: float) -> None:
    budget = cost.parse_budget(text)
    assert budget.kind == kind
    assert budget.value == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize(
    "text", ["600", "600M", "600 MB", "-1GFLOPs", "0MACs", "abc", "", "3 hours", "6OOMFLOPs",
             "1.2.3GFLOPs", "nanFLOPs", "GFLOPs", "5 XFLOPs"],
)  # fmt: skip
def test_bad_budget_is_one_clear_line(text: str) -> None:
    with pytest.raises(DynifyError) as info:
        cost.parse_budget(text)
    message = str(info.value)
    assert "\n" not in message
    assert repr(text) in message
    assert "600MFLOPs" in message and "3ms" in message  # the accepted forms


def test_budget_against_a_report() -> None:
    report = cost.count(TinyNet(), input_size=(3, 8, 8))
    assert cost.parse_budget(f"{2 * TINY_MACS}FLOPs").fits(report)
    assert not cost.parse_budget(f"{TINY_MACS - 1}MACs").fits(report)
    assert cost.parse_budget("349params").fits(report)
    with pytest.raises(DynifyError, match="latency"):
        cost.parse_budget("3ms").fits(report)
    assert str(cost.parse_budget("0.6GFLOPs")) == "600 MFLOPs"


def test_budget_against_a_measured_time() -> None:
    measured = cost.LatencyResult((0.004, 0.002, 0.003), "cpu", 1)
    assert cost.parse_budget("3ms").fits(measured)
    assert not cost.parse_budget("2.5ms").fits(measured)
    assert cost.parse_budget("3ms").amount(measured) == 0.003
    with pytest.raises(DynifyError, match="count"):
        cost.parse_budget("600MFLOPs").fits(measured)


def test_check_budget_gives_the_verdict_and_the_figures() -> None:
    plan = dynify.make_plan(TinyNet(), "all", input_size=(3, 8, 8))
    before, after = cost.count(plan, static=True), cost.count(plan)
    assert after.flops > before.flops == 2 * TINY_MACS
    check = cost.check_budget(f"{before.flops}FLOPs", before, after)
    assert isinstance(check, cost.BudgetCheck)
    assert (check.static, check.converted) == (before.flops, after.flops)
    assert check.static_fits and not check.converted_fits
    assert str(check).startswith(f"budget {check.budget}: static fits, converted does not fit")
    assert cost.format_count(after.flops) in str(check)
    # The search's fast path gives totals: the same verdict.
    assert cost.check_budget("349params", before.totals, after.totals).static_fits

    def timed(*times: float) -> cost.LatencyResult:
        return cost.LatencyResult(times, "cpu", 1)

    side_by_side = cost.LatencyComparison(timed(0.001, 0.003), timed(0.004, 0.006))
    check = cost.check_budget(cost.parse_budget("3ms"), before, after, latency=side_by_side)
    assert (check.static, check.converted) == (0.002, 0.005)
    assert str(check).startswith("budget 3 ms: static fits, converted does not fit")
    assert "static 2.00 ms, converted 5.00 ms" in str(check)
    with pytest.raises(DynifyError, match="give latency") as info:
        cost.check_budget("3ms", before, after)
    assert info.value.arguments == ("latency",)


# -- latency --------------------------------------------------------------------------------------


def test_latency_and_side_by_side() -> None:
    model = TinyNet()
    result = cost.latency(model, (3, 8, 8), device="cpu", batch_size=2, warmup=1, repeats=5)
    assert len(result.times) == 5 and result.median > 0
    assert result.batch_size == 2 and result.device == "cpu"
    converted = nn.Sequential(DynamicConv2d(3, 8, 3, padding=1), nn.Flatten())
    cmp = cost.compare_latency(model, converted, (3, 8, 8), device="cpu", warmup=1, repeats=4)
    assert len(cmp.ratios) == 4
    assert min(cmp.ratios) <= cmp.ratio <= max(cmp.ratios)
    assert cmp.static.median > 0 and cmp.converted.median > 0
    assert "ratio" in str(cmp)
    with pytest.raises(DynifyError):
        cost.latency(model, (3, 8), device="cpu")
    on_cpu = cost.latency(model, (3, 8, 8), device="cpu", repeats=3, clock="thread")
    assert on_cpu.clock == "thread" and all(t >= 0 for t in on_cpu.times)
    with pytest.raises(DynifyError, match="clock"):
        cost.latency(model, (3, 8, 8), device="cpu", clock="process")  # type: ignore[arg-type]


class _Clocked(nn.Module):
    """Writes its name to ``log`` on every forward pass."""

    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__()
        self.name, self.log = name, log
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append(self.name)
        return self.conv(x)


def test_compare_latency_interleaves_the_two_models() -> None:
    log: list[str] = []
    a, b = _Clocked("a", log), _Clocked("b", log)
    cmp = cost.compare_latency(a, b, (3, 8, 8), device="cpu", warmup=2, repeats=4)
    # Warm-up runs both in turn, then each round runs both, the order alternating.
    assert log == ["a", "b"] * 2 + ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert len(cmp.static.times) == len(cmp.converted.times) == 4
    log.clear()
    assert len(cost.latency(a, (3, 8, 8), device="cpu", warmup=1, repeats=3).times) == 3
    assert log == ["a"] * 4
    assert a.training and b.training  # left in the mode they were in


def test_bad_timing_arguments_name_them() -> None:
    model = TinyNet()
    with pytest.raises(DynifyError) as info:
        cost.latency(model, (3, 8, 8), device="cpu", repeats=0)
    assert info.value.arguments == ("batch_size", "repeats", "warmup")
    with pytest.raises(DynifyError) as info:
        cost.count(model, input_size=(3, 8, 8), batch_size=0)
    assert "batch_size" in str(info.value) and info.value.arguments == ("batch_size",)


class _Broken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("first line of the model's own error\nsecond line")


@pytest.mark.parametrize("run", ["count", "trace"])
def test_a_model_that_fails_is_one_line_with_its_error_as_cause(run: str) -> None:
    # One function (dynify._opcount.record_ops) runs the recorded pass for both.
    model = _Broken().train()
    with pytest.raises(DynifyError) as info:
        if run == "count":
            cost.count(model, input_size=(3, 8, 8))
        else:
            dynify.trace_model(model, input_size=(3, 8, 8))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("the model does not run on an input of size (3, 8, 8): RuntimeError")
    assert "first line of the model's own error second line" in message
    assert isinstance(info.value.__cause__, RuntimeError)  # --debug prints it
    assert model.training


def test_trace_and_count_record_the_same_conv_layers() -> None:
    # Each tells the op recorder which modules are conv layers: they must agree, or a plan
    # priced from its trace and a model counted by its own pass would split ops differently.
    from dynify._opcount import record_ops

    model = nn.Sequential(nn.Conv2d(3, 8, 3), DynamicConv2d(8, 8, 3, bias=True), nn.Flatten(),
                          nn.LazyLinear(5))  # fmt: skip
    model(torch.randn(1, 3, 8, 8))
    traced = dynify.trace_model(model, input_size=(3, 8, 8)).op_counts
    _, recorder = record_ops(model, torch.randn(1, 3, 8, 8), is_conv_layer=counting.is_conv_layer)

    def attribution(counts):
        return sorted((op.module, op.op, op.in_conv, op.batched) for op in counts.ops)

    assert attribution(traced) == attribution(recorder.counts())
    assert ("1", "addmm", True, True) in attribution(traced)  # the attention, inside layer 1


def test_public_api() -> None:
    import dynify._opcount

    for name in cost.__all__:
        assert getattr(cost, name) is not None, name
    assert cost.OpCounts is dynify._opcount.OpCounts
    for module in (cost.budget, cost.counting, cost.formatting, cost.pricing, cost.report,
                   cost.timing):  # fmt: skip
        assert module.__doc__, module.__name__


def test_import_direction() -> None:
    # The cost model sits beside the plan: importing it imports neither the swap nor
    # training nor the search; the op recorder sits below the dynamic layers.
    code = (
        "import sys, dynify._opcount\n"
        "assert 'dynify.layers' not in sys.modules\n"
        "import dynify.cost\n"
        "bad = [m for m in sys.modules if m.split('.')[:2] in (['dynify', 'convert'], "
        "['dynify', 'train'], ['dynify', 'search'], ['dynify', 'routing'])]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_format_layers_lists_the_convertible_convs(resnet18_trace) -> None:
    _, trace = resnet18_trace
    plan = dynify.make_plan(trace, "mobile")
    text = cost.format_layers(plan, cost.count(plan, static=True), cost.count(plan))
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["layer", "conv", "input", "kind", "K"]
    assert len(lines) == 2 + sum(lp.site.unsupported is None for lp in plan.layers)
    row = next(line for line in lines if line.startswith("layer1.0.conv2 "))
    assert "64->64 3x3/1" in row and "dynamic" in row


def test_format_totals_says_units(resnet18_trace) -> None:
    _, trace = resnet18_trace
    plan = dynify.make_plan(trace, "dycnn")
    text = cost.format_totals(cost.count(plan, static=True), cost.count(plan))
    assert "FLOPs = 2 x MACs" in text
    assert "MACs" in text and "params" in text
    assert "FLOPs = 2 x MACs" in cost.count(plan).summary()


# -- command line ----------------------------------------------------------------------------------


def test_cli_inspect(capsys) -> None:
    from dynify.cli import main

    code = main(["inspect", "resnet18", "--input-size", "3,32,32", "--device", "cpu",
                 "--budget", "100MFLOPs"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "layer1.0.conv1" in out and "dynamic" in out
    assert "FLOPs = 2 x MACs" in out
    assert "equal to the count" in out
    assert "budget 100 MFLOPs: static fits, converted does not fit" in out


def test_cli_inspect_latency_budget(capsys) -> None:
    from dynify.cli import main

    code = main(["inspect", "resnet18", "--input-size", "3,32,32", "--device", "cpu",
                 "--budget", "10s", "--repeats", "2"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "latency " in out  # measured because the budget is a time
    assert "budget 10000 ms: static fits, converted fits (static " in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("resnet5O",), "unknown model"),
        (("resnet18", "--budget", "600 MB"), "budget '600 MB'"),
        (("resnet18", "--input-size", "3,32"), "--input-size must be three integers"),
        (("resnet18", "--recipe", "dycn"), "recipe 'dycn'"),
    ],
)
def test_cli_inspect_errors_are_one_line(args: tuple[str, ...], needle: str, capsys) -> None:
    from dynify.cli import main

    assert main(["inspect", *args]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert needle in lines[0]


def test_cli_exit_status_from_the_shell() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dynify", "inspect", "resnet18", "--budget", "lots"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "budget 'lots'" in proc.stderr

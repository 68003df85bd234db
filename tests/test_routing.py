"""Routing diagnostics (dynify.routing) and the initialisations that make layers route.

References are independent of the code under test: per-sample formulas written out in
plain Python for a layer whose experts and attention are set by hand, the unconverted
model for function preservation, and a training run on a task that needs routing.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import timm
import torch
from _imagedata import write_splits
from torch import nn

import dynify
from dynify.cli import main
from dynify.errors import DynifyError
from dynify.layers import DynamicConv2d
from dynify.routing import expert_spread, routing_report

# -- the figures against hand-computed values ----------------------------------------------


def _hand_layer(attention: str = "softmax") -> DynamicConv2d:
    """A 1x1 conv, 2 -> 2 channels, K = 2, whose logits are the pooled input itself."""
    layer = DynamicConv2d(2, 2, 1, bias=False, num_experts=2, reduction=1, attention=attention)
    with torch.no_grad():
        layer.weight.copy_(
            torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]]).view(2, 2, 2, 1, 1)
        )
        hidden = layer.attention.fc1.out_features  # max(2 // 1, 4) = 4
        eye = torch.zeros(hidden, 2)
        eye[0, 0] = eye[1, 1] = 1.0
        layer.attention.fc1.weight.copy_(eye)
        layer.attention.fc1.bias.zero_()
        fc2 = torch.zeros(2, hidden)
        fc2[0, 0] = fc2[1, 1] = 1.0
        layer.attention.fc2.weight.copy_(fc2)
        layer.attention.fc2.bias.zero_()
    return layer


class _Flat(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x).flatten(1)


# Per-sample pooled inputs (a, b): positive, so relu passes them and z = (a, b) / T.
SAMPLES = [(0.2, 1.5), (1.0, 0.1), (2.5, 2.0), (0.3, 0.4), (1.7, 0.6)]


def _hand_figures(attention: str, temperature: float):
    """Every figure of the report for _hand_layer on SAMPLES, written out per sample."""
    w0 = [[2.0, 0.0], [0.0, 1.0]]  # expert 0: out x in
    w1 = [[0.0, 1.0], [1.0, 0.0]]
    weights, outputs = [], []
    for a, b in SAMPLES:
        z = (a / temperature, b / temperature)
        if attention == "softmax":
            e = (math.exp(z[0]), math.exp(z[1]))
            w = (e[0] / sum(e), e[1] / sum(e))
        else:
            w = (1 / (1 + math.exp(-z[0])), 1 / (1 + math.exp(-z[1])))
        weights.append(w)
        kernel = [[w[0] * w0[o][i] + w[1] * w1[o][i] for i in range(2)] for o in range(2)]
        outputs.append([kernel[o][0] * a + kernel[o][1] * b for o in range(2)])
    mean = [statistics.fmean(w[k] for w in weights) for k in range(2)]
    frozen_kernel = [[mean[0] * w0[o][i] + mean[1] * w1[o][i] for i in range(2)] for o in range(2)]
    frozen = [[frozen_kernel[o][0] * a + frozen_kernel[o][1] * b for o in range(2)]
              for a, b in SAMPLES]  # fmt: skip
    p = [(w[0] / (w[0] + w[1]), w[1] / (w[0] + w[1])) for w in weights]
    entropy = statistics.fmean(-(q[0] * math.log(q[0]) + q[1] * math.log(q[1])) for q in p)
    spread = math.sqrt(statistics.fmean(statistics.pvariance([q[k] for q in p]) for k in range(2)))
    total = sum(v * v for row in outputs for v in row)
    pairs = list(zip(outputs, frozen, strict=True))
    diff = sum((v - f) ** 2 for row, frow in pairs for v, f in zip(row, frow, strict=True))
    flips = statistics.fmean(float((row[0] > row[1]) != (frow[0] > frow[1])) for row, frow in pairs)
    usage = [statistics.fmean(q[k] for q in p) for k in range(2)]
    # expert spread: std(W_k - mean) / std(mean) over all elements (sample std, as torch's)
    centre = [(w0[o][i] + w1[o][i]) / 2 for o in range(2) for i in range(2)]
    dev = [w[o][i] - centre[2 * o + i] for w in (w0, w1) for o in range(2) for i in range(2)]
    return {
        "usage": usage,
        "entropy": entropy / math.log(2),
        "sample_spread": spread,
        "effect": math.sqrt(diff / total),
        "flips": flips,
        "expert_spread": statistics.stdev(dev) / statistics.stdev(centre),
    }


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("attention", ["softmax", "sigmoid"])
def test_report_matches_hand_computed_figures(attention: str, temperature: float) -> None:
    layer = _hand_layer(attention)
    layer.temperature = temperature
    model = _Flat(layer)
    # Constant 3x3 images: pooled = (a, b), and every pixel of the output is the same.
    images = torch.tensor(SAMPLES).view(-1, 2, 1, 1).expand(-1, -1, 3, 3).contiguous()
    report = routing_report(model, images, logit_effects=True)
    want = _hand_figures(attention, temperature)
    (lr,) = report.layers
    assert lr.name == "layer" and lr.experts == 2 and lr.attention == attention
    assert report.images == len(SAMPLES)
    assert lr.usage == pytest.approx(want["usage"], abs=1e-6)
    assert lr.entropy == pytest.approx(want["entropy"], abs=1e-6)
    assert lr.sample_spread == pytest.approx(want["sample_spread"], abs=1e-6)
    assert lr.expert_spread == pytest.approx(want["expert_spread"], rel=1e-6)
    # One layer: its own output is the model's output (flattened), so all effects agree.
    assert lr.output_effect == pytest.approx(want["effect"], rel=1e-5)
    assert lr.logit_effect == pytest.approx(want["effect"], rel=1e-5)
    assert report.effect == pytest.approx(want["effect"], rel=1e-5)
    assert report.flips == pytest.approx(want["flips"]) and lr.logit_flips == report.flips
    assert want["effect"] > 0.01 and want["sample_spread"] > 0.01  # the case is not trivial
    # The same numbers batch by batch (a loader's pairs) and capped by max_images.
    pairs = [(images[:2], None), (images[2:], None)]
    again = routing_report(model, pairs, logit_effects=True)
    assert again.effect == pytest.approx(report.effect, rel=1e-6)
    assert routing_report(model, pairs, max_images=3).images == 3


def test_identical_experts_have_no_effect_and_uniform_attention_has_entropy_one() -> None:
    conv = nn.Conv2d(8, 8, 3, padding=1)
    model = nn.Sequential(
        DynamicConv2d.from_conv(conv, num_experts=4), nn.Flatten(), nn.LazyLinear(3)
    )
    x = torch.randn(16, 8, 6, 6) + torch.randn(16, 8, 1, 1)
    model(x)
    report = routing_report(model, x, logit_effects=True)
    (lr,) = report.layers
    assert lr.expert_spread == 0.0
    assert lr.output_effect < 1e-6 and report.effect < 1e-6 and report.flips == 0
    assert lr.entropy < 1.0 and lr.sample_spread > 1e-3  # the attention itself does vary
    flat = nn.Sequential(DynamicConv2d.from_conv(conv, init="perturb"))
    lr = routing_report(flat, x).layers[0]
    assert lr.entropy == pytest.approx(1.0) and lr.sample_spread == pytest.approx(0.0, abs=1e-9)
    assert lr.usage == pytest.approx((0.25,) * 4)
    assert 0.002 < lr.expert_spread < 0.05  # perturb's 1% noise


def test_report_outputs_and_errors(tmp_path: Path) -> None:
    model = _Flat(_hand_layer())
    images = torch.tensor(SAMPLES).view(-1, 2, 1, 1).expand(-1, -1, 3, 3).contiguous()
    report = routing_report(model, images)
    data = report.to_dict()
    assert data["layers"][0]["logit_effect"] is None  # not asked for
    assert data["effect"] == report.effect and len(data["layers"][0]["usage"]) == 2
    assert "layer" in report.table() and "routing effect" in report.summary()
    png = report.plot(tmp_path / "routing.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert model.training  # restored
    with pytest.raises(DynifyError, match="no dynamic layers"):
        routing_report(nn.Sequential(nn.Conv2d(2, 2, 1)), images)
    with pytest.raises(DynifyError, match=r"\(N, C, H, W\) tensor"):
        routing_report(model, [torch.randn(3, 2)])
    assert expert_spread(torch.ones(1, 4, 2, 3, 3)) == 0.0


# -- initialisations on whole models -------------------------------------------------------


@pytest.mark.parametrize("recipe", ["dycnn", "mobile", "condconv", "all"])
@pytest.mark.parametrize("model_name", ["resnet18", "mobilenetv3_small_100", "regnetx_002"])
def test_upcycle_preserves_the_function_of_whole_models(model_name: str, recipe: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=10).eval()
    converted = dynify.apply(model, recipe, input_size=(3, 64, 64))
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        want, got = model(x), converted(x)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4
    # ...while the attention varies per sample: routing is random, not uniform.
    report = routing_report(converted, x)
    assert max(lr.sample_spread for lr in report.layers) > 1e-3


def test_scratch_recipe_starts_a_new_function_and_skips_the_check() -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).eval()
    converted = dynify.apply(model, "dycnn-scratch", input_size=(3, 32, 32)).eval()
    plan = dynify.plan_of(converted)
    assert plan.check_error is None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert float((converted(x) - model(x)).abs().max()) > 1e-2
    w = converted.layer1[0].conv1.weight
    assert not torch.allclose(w[0], w[1]) and not torch.allclose(w[0], model.layer1[0].conv1.weight)
    assert {lp.settings.temperature.start for lp in plan.converted} == {30.0}


def _task(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of two kinds told apart by their mean colour; each kind needs its own kernel."""
    kind = torch.randint(0, 2, (n,), generator=generator)
    x = torch.randn(n, 4, 8, 8, generator=generator)
    x[:, 0] += 2.0 * kind.view(-1, 1, 1) - 1.0
    ka = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(11))
    kb = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(12))
    ya = nn.functional.conv2d(x, ka, padding=1)
    yb = nn.functional.conv2d(x, kb, padding=1)
    y = torch.where(kind.view(-1, 1, 1, 1) == 1, ya, yb)
    return x, y


@pytest.mark.parametrize("attention", ["softmax", "sigmoid"])
def test_upcycled_layer_learns_to_route_on_a_task_that_needs_it(attention: str) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = _task(256, g)
    static = nn.Conv2d(4, 4, 3, padding=1)
    layer = DynamicConv2d.from_conv(
        static, num_experts=2, reduction=1, attention=attention, generator=g
    )
    baseline = nn.Conv2d(4, 4, 3, padding=1)
    baseline.load_state_dict(static.state_dict())
    # The symmetric start (identical experts, uniform attention): the check must catch it.
    stuck = DynamicConv2d.from_conv(
        static, num_experts=2, reduction=1, attention=attention, init="perturb", noise=0.0
    )
    losses = {}
    for name, module in (("dynamic", layer), ("static", baseline), ("stuck", stuck)):
        opt = torch.optim.Adam(module.parameters(), lr=0.02)
        for step in range(150):
            idx = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(step))
            loss = nn.functional.mse_loss(module(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            losses[name] = float(nn.functional.mse_loss(module(x), y))
    report = routing_report(nn.Sequential(layer), x)
    (lr,) = report.layers
    # The experts separated and the attention tells the two kinds apart: freezing it costs.
    assert lr.expert_spread > 0.2, lr
    assert lr.sample_spread > 0.1 and lr.entropy < 0.9, lr
    assert lr.output_effect > 0.2, lr
    # ...and routing buys what no single kernel can: a far lower loss than the static conv.
    assert losses["dynamic"] < 0.5 * losses["static"], losses
    never = routing_report(nn.Sequential(stuck), x).layers[0]
    assert never.expert_spread < 1e-6 and never.entropy > 1 - 1e-9, never
    if attention == "softmax":
        # (Sigmoid weights can still scale the one kernel per sample: a real, small effect.)
        assert never.output_effect < 1e-6, never
        assert losses["stuck"] > 0.9 * losses["static"], losses


# -- in finetune, and on the command line --------------------------------------------------


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_splits(tmp_path_factory.mktemp("imgs"), train=16, val=8)


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=4, channels=(8, 16, 24, 32), stem_width=8)


def test_finetune_records_routing_every_epoch(tmp_path: Path, splits: Path) -> None:
    import json

    from dynify.train import finetune

    model = dynify.apply(_tiny(), "dycnn", input_size=(3, 32, 32))
    result = finetune(
        model=model, data=splits, epochs=2, batch_size=16, lr=0.05, img_size=32, workers=0,
        progress=False, output=tmp_path, routing_images=20,
    )  # fmt: skip
    for h in result.history:
        r = h["routing"]
        assert r["images"] == 20 and len(r["layers"]) == len(dynify.plan_of(model).converted)
        assert 0 <= r["entropy"] <= 1 and r["effect"] >= 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["history"][-1]["routing"] == result.history[-1]["routing"]
    # The figures are what routing_report measures on the same images afterwards.
    assert result.history[-1]["routing"]["effect"] > 0
    static = finetune(model=_tiny(), data=splits, epochs=1, batch_size=16, img_size=32,
                      workers=0, progress=False)  # fmt: skip
    assert "routing" not in static.history[0]
    with pytest.raises(DynifyError, match=r"routing_images must be an integer >= 0, got -1"):
        finetune(model=model, data=splits, epochs=1, routing_images=-1)


def test_cli_inspect_an_artifact_with_data(
    tmp_path: Path, splits: Path, capsys: pytest.CaptureFixture
) -> None:
    artifact = tmp_path / "tiny.safetensors"
    model = dynify.apply(_tiny(), "dycnn", input_size=(3, 32, 32))
    kwargs = {"num_classes": 4, "channels": [8, 16, 24, 32], "stem_width": 8}
    dynify.save(model, artifact, model_name="test_resnet", model_kwargs=kwargs)
    png = tmp_path / "out" / "routing.png"
    code = main(["inspect", str(artifact), "--data", str(splits), "--routing-images", "12",
                 "--plot", str(png)])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "routing on 12 images" in out and "logit effect" in out and "layer1.0.conv1" in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    for argv, words in (
        (["inspect", "test_resnet", "--data", str(splits)], "give a .safetensors artifact"),
        (["inspect", str(artifact), "--plot", str(png)], "give --data too"),
        (["inspect", str(artifact), "--data", str(splits), "--plot", str(tmp_path)],
         "is a folder"),
        (["inspect", str(artifact), "--recipe", "mobile"], "--recipe applies to a timm MODEL"),
        (["inspect", str(artifact), "--budget", "1MMACs"], "--budget applies to a timm MODEL"),
        (["inspect", str(artifact), "--data", str(splits), "--img-size", "0"],
         "--img-size must be a positive integer"),
        (["inspect", str(artifact), "--data", str(splits), "--plot",
          str(artifact / "x" / "r.png")], "is a file, not a folder"),
    ):  # fmt: skip
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err and "Traceback" not in err, err


def test_scratch_and_upcycle_artifacts_round_trip(tmp_path: Path) -> None:
    x = torch.randn(2, 3, 32, 32)
    for recipe in ("dycnn-scratch", "dycnn"):
        model = dynify.apply(_tiny(), recipe, input_size=(3, 32, 32)).eval()
        path = tmp_path / f"{recipe}.safetensors"
        kwargs = {"num_classes": 4, "channels": [8, 16, 24, 32], "stem_width": 8}
        dynify.save(model, path, model_name="test_resnet", model_kwargs=kwargs)
        loaded = dynify.load(path).eval()
        assert {lp.settings.init for lp in dynify.plan_of(loaded).converted} == {
            "scratch" if recipe == "dycnn-scratch" else "upcycle"
        }
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))


def test_report_casts_inputs_skips_unused_layers_and_restores_modes() -> None:
    model = _Flat(_hand_layer()).to(torch.bfloat16)
    images = torch.tensor(SAMPLES).view(-1, 2, 1, 1).expand(-1, -1, 3, 3).contiguous()
    assert routing_report(model, images).images == len(SAMPLES)  # float32 images, bf16 model
    unused = nn.ModuleDict({"used": _Flat(_hand_layer()), "spare": _hand_layer()})

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.parts = unused
            self.frozen = nn.BatchNorm2d(2).eval()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.parts["used"](self.frozen(x))

    net = Net().train()
    net.frozen.eval()
    report = routing_report(net, images)
    assert [lr.name for lr in report.layers] == ["parts.used.layer"]
    assert net.training and not net.frozen.training  # each module's own mode restored


def test_old_plans_with_noise_read_as_perturb_and_noise_is_checked_per_layer() -> None:
    from dynify.recipe import LayerSettings, Recipe

    old = LayerSettings.from_dict({"experts": 4, "noise": 0.01, "attention": "softmax"})
    assert old.init == "perturb"
    ok = load_recipe_dict(
        {"rules": [{"select": {}, "init": "perturb"}, {"select": {}, "noise": 0.05}]}
    )
    assert isinstance(ok, Recipe)
    bad = load_recipe_dict(
        {
            "defaults": {"init": "perturb", "noise": 0.05},
            "rules": [{"select": {}, "init": "upcycle"}],
        }
    )
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=4)
    with pytest.raises(DynifyError, match=r"noise 0.05 applies to init: perturb only"):
        dynify.make_plan(model, bad, input_size=(3, 32, 32))
    plan = dynify.make_plan(model, ok, input_size=(3, 32, 32))
    assert {lp.settings.init for lp in plan.converted} == {"perturb"}
    again = plan.to_recipe().to_dict()
    assert "null" not in str(again) and None not in [
        v for rule in again["rules"] for v in rule.values()
    ]


def load_recipe_dict(data: dict):
    return dynify.load_recipe(data)

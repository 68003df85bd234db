"""``dynify fold``: what does not route is folded exactly, what routes is reported, unused
experts are dropped with the softmax renormalised, and the result reloads as an artifact.

References: the unfolded model's own output (a fold of constant routing must change nothing
beyond float rounding), the folding's output change computed here independently, and the
cost model's count of the saved artifact."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
from _imagedata import CLASSES, write_splits
from torch import nn

import dynify
from dynify.errors import DynifyError
from dynify.fold import fold
from dynify.plan import plan_of
from dynify.routing import dynamic_layers

SIZE = (3, 32, 32)
KWARGS = {"channels": (8, 16, 24, 32), "stem_width": 8}


def _model(recipe: str = "dycnn", seed: int = 0) -> nn.Module:
    """A converted tiny ResNet whose BatchNorms are random (timm zero-initialises each
    block's last one, which would hide every residual branch from the logits)."""
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=len(CLASSES), **KWARGS).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return dynify.apply(model, recipe, input_size=SIZE)


def _route(layer: nn.Module, strength: float = 0.8) -> None:
    """Make ``layer``'s experts differ, so its routing changes its output."""
    with torch.no_grad():
        layer.weight.mul_(1 + strength * torch.randn_like(layer.weight))


def _images(n: int = 64) -> torch.Tensor:
    return torch.randn(n, *SIZE, generator=torch.Generator().manual_seed(5))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("recipe", ["dycnn", "condconv", "odconv", "dcd"])
def test_constant_routing_folds_to_the_same_function(recipe: str) -> None:
    """Upcycled layers compute their conv whatever the routing (identical experts, gates
    at 1/2, DCD's zero heads): every one folds, and the model is unchanged but for float
    rounding, with no dynamic layer and no BatchNorm after a conv left."""
    model = _model(recipe)
    x = _images()
    folded, report = fold(model, x)
    assert [lf.action for lf in report.layers] == ["folded"] * len(report.layers)
    assert not dynamic_layers(folded)
    with torch.no_grad():
        assert _rel(folded(x), model(x)) < 1e-5
    assert report.effect < 1e-5 and report.flips == 0
    assert report.fused == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert report.macs_after < report.macs_before and report.params_after < report.params_before
    # The original is untouched (fold works on a copy).
    assert dynamic_layers(model)


def test_a_layer_that_routes_is_kept_and_reported_not_hidden() -> None:
    model = _model()
    name, layer = dynamic_layers(model)[3]
    _route(layer)
    x = _images()
    routing = dynify.routing_report(model, x, logit_effects=True)
    effect = {lr.name: lr.logit_effect for lr in routing.layers}[name]
    assert effect > 0.005  # it does route

    kept_model, kept = fold(model, x, max_effect=0.005)
    row = next(lf for lf in kept.layers if lf.name == name)
    assert row.action == "kept" and math.isclose(row.effect, effect, rel_tol=1e-9)
    assert [n for n, _ in dynamic_layers(kept_model)] == [name]
    assert plan_of(kept_model).layer(name).convert

    # Folded anyway (a threshold above its effect): the report says what that costs, and
    # that figure is the folded model's measured change, computed here independently.
    forced_model, forced = fold(model, x, max_effect=0.99)
    row = next(lf for lf in forced.layers if lf.name == name)
    assert row.action == "folded" and "routing effect" in row.reason
    with torch.no_grad():
        ref = model(x).double()
        change = _rel(forced_model(x).double(), ref)
        flips = float((forced_model(x).argmax(1) != ref.argmax(1)).double().mean())
    assert change > 1e-3
    assert math.isclose(forced.effect, change, rel_tol=1e-6)
    assert math.isclose(forced.flips, flips)
    assert "folded" in plan_of(forced_model).layer(name).reason


def test_the_folded_conv_is_the_average_kernel_over_the_images() -> None:
    model = _model()
    name, layer = dynamic_layers(model)[2]
    _route(layer)
    x = _images(16)
    folded, _ = fold(model, x, max_effect=0.99, fuse=False)
    conv = folded.get_submodule(name)
    assert type(conv) is nn.Conv2d
    with torch.no_grad():
        seen = []
        hook = layer.attention.register_forward_hook(lambda m, a, out: seen.append(out))
        model(x)
        hook.remove()
        routing = torch.cat(seen)
        # sum_k mean_x(pi_k(x)) W_k, written out for DY-CNN
        want = torch.einsum("k,k...->...", routing.double().mean(0), layer.weight.double())
    assert torch.allclose(conv.weight.double(), want, rtol=1e-5, atol=1e-7)


def test_unused_experts_are_dropped_and_the_rest_renormalised() -> None:
    model = _model()
    name, layer = dynamic_layers(model)[1]
    _route(layer)
    with torch.no_grad():
        layer.attention.fc2.bias[2] = -40.0  # expert 2 never gets weight
    x = _images()
    folded, report = fold(model, x, max_effect=0.0, min_usage=0.01, fuse=False)
    row = next(lf for lf in report.layers if lf.name == name)
    assert row.action == "dropped" and row.dropped == (2,)
    assert (row.experts_before, row.experts_after) == (4, 3)
    assert plan_of(folded).layer(name).settings.experts == 3
    assert folded.get_submodule(name).weight.shape[0] == 3
    with torch.no_grad():
        # exp(-40) of the weight is gone: the same output to float32 rounding
        assert _rel(folded(x), model(x)) < 1e-5
    # max_effect 0 folds nothing; other layers lose only experts that are as unused
    for lf in report.layers:
        assert lf.action in ("kept", "dropped")
        assert all(lf.usage[k] < 0.01 for k in lf.dropped)


def test_a_dycnn_layer_left_with_one_expert_is_folded_exactly() -> None:
    model = _model()
    name, layer = dynamic_layers(model)[0]
    _route(layer)
    with torch.no_grad():
        layer.attention.fc2.bias[1:] = -60.0
    x = _images(16)
    folded, report = fold(model, x, max_effect=0.0, min_usage=0.01, fuse=False)
    row = next(lf for lf in report.layers if lf.name == name)
    assert row.action == "folded" and row.dropped == (1, 2, 3)
    assert "one expert left" in row.reason
    conv = folded.get_submodule(name)
    assert torch.equal(conv.weight, layer.weight[0])


def test_the_folded_artifact_reloads_with_its_plan_and_cost(tmp_path: Path) -> None:
    model = _model()
    for _, layer in dynamic_layers(model)[::2]:
        _route(layer)
    with torch.no_grad():
        dynamic_layers(model)[0][1].attention.fc2.bias[3] = -40.0
    x = _images()
    folded, report = fold(model, x, max_effect=0.01, min_usage=0.01)
    assert report.folded and any(lf.action != "folded" for lf in report.layers)
    path = dynify.save(folded, tmp_path / "folded.safetensors", model_kwargs=KWARGS)
    loaded = dynify.load(path).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), folded(x), rtol=0, atol=1e-6)
    assert plan_of(loaded).to_dict() == plan_of(folded).to_dict()
    assert dynify.cost.count(loaded).macs == report.macs_after
    assert [n for n, _ in dynamic_layers(loaded)] == [n for n, _ in dynamic_layers(folded)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_effect": -0.1}, "max_effect must be a finite number >= 0"),
        ({"max_effect": float("nan")}, "max_effect must be"),
        ({"min_usage": 1.0}, r"min_usage must be a finite number in \[0, 1\)"),
        ({"max_images": 0}, "max_images must be a positive integer"),
    ],
)
def test_bad_settings_are_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(DynifyError, match=message):
        fold(_model(), _images(4), **kwargs)


def test_a_model_without_dynamic_layers_is_refused() -> None:
    model = _model(recipe={"defaults": {"convert": False}})
    with pytest.raises(DynifyError, match="no dynamic layers: nothing to fold"):
        fold(model, _images(4))


def test_the_command_line_defaults_are_the_librarys() -> None:
    """--help needs no torch, so the flags' defaults are written in the parser too."""
    import argparse

    from dynify import fold as library
    from dynify.cli import fold as command

    parser = argparse.ArgumentParser()
    command.add_parser(parser.add_subparsers())
    args = parser.parse_args(["fold", "a", "--data", "d", "--output", "o"])
    assert args.max_effect == library.DEFAULT_MAX_EFFECT
    assert args.min_usage == library.DEFAULT_MIN_USAGE
    assert args.images == library.DEFAULT_IMAGES


# -- the command ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact_and_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fold")
    data = write_splits(root / "data", train=8, val=6)
    model = _model()
    for _, layer in dynamic_layers(model)[::3]:
        _route(layer)
    return dynify.save(model, root / "model.safetensors", model_kwargs=KWARGS), data


def test_fold_command_writes_a_smaller_artifact(
    artifact_and_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from dynify.cli import main

    artifact, data = artifact_and_data
    out = tmp_path / "folded.safetensors"
    argv = ["fold", str(artifact), "--data", str(data), "--output", str(out), "--images", "16"]
    assert main([*argv, "--workers", "0", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "folded " in printed and "top-1" in printed and "latency" in printed
    info = dynify.artifact.read_info(out)
    fold_report = info["extra"]["fold"]
    assert fold_report["accuracy"]["images"] == 6 * len(CLASSES)
    assert fold_report["macs_after"] < fold_report["macs_before"]
    loaded = dynify.load(out)
    assert dynify.cost.count(loaded).macs == fold_report["macs_after"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-effect", "-1"], "--max-effect must be a finite number >= 0"),
        (["--min-usage", "2"], "--min-usage must be a finite number in [0, 1)"),
        (["--images", "0"], "--images must be a positive integer"),
        (["--img-size", "0"], "--img-size must be a positive integer"),
        (["--val-images", "0"], "--val-images must be a positive integer"),
        (["--workers", "-1"], "--workers must be an integer >= 0"),
    ],
)
def test_fold_command_refuses_bad_numbers_in_one_line(
    artifact_and_data: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    extra: list[str],
    message: str,
) -> None:
    from dynify.cli import main

    artifact, data = artifact_and_data
    out = tmp_path / "x.safetensors"
    code = main(["fold", str(artifact), "--data", str(data), "--output", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_fold_command_refuses_a_missing_artifact_and_an_unwritable_output(
    artifact_and_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from dynify.cli import main

    artifact, data = artifact_and_data
    code = main(["fold", str(tmp_path / "nope.safetensors"), "--data", str(data), "--output",
                 str(tmp_path / "o.safetensors")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "no such file" in err and len(err.strip().splitlines()) == 1
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["fold", str(artifact), "--data", str(data), "--output",
                 str(blocker / "o.safetensors")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--output" in err and len(err.strip().splitlines()) == 1, err

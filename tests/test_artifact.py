"""Artifacts: dynify.save / dynify.load round trip, metadata, bad files, atomic writes."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import dynify
from dynify.artifact import FORMAT, read_info
from dynify.errors import DynifyError
from dynify.layers import DynamicConv2d

warnings.filterwarnings("ignore", category=UserWarning)

SIZE = (3, 64, 64)


@pytest.fixture(scope="module")
def converted() -> nn.Module:
    model = timm.create_model("resnet18", num_classes=7).eval()
    out = dynify.apply(model, "mobile", input_size=SIZE)
    # Trained-looking state: attention no longer uniform, experts moved, temperature set,
    # and a BN statistic changed, so a load that forgot any of them would show.
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in out.modules():
            if isinstance(m, DynamicConv2d):
                m.attention.fc2.weight.normal_(0, 0.5, generator=gen)
                m.attention.fc2.bias.normal_(0, 0.5, generator=gen)
                m.weight.add_(torch.randn(m.weight.shape, generator=gen) * 0.01)
                m.temperature = 3.0
        out.layer1[0].bn1.running_mean.normal_(0, 0.3, generator=gen)
    return out.eval()


def _out(model: nn.Module, seed: int = 0) -> torch.Tensor:
    x = torch.randn(2, *SIZE, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


def test_round_trip_gives_identical_outputs(converted: nn.Module, tmp_path: Path) -> None:
    path = dynify.save(converted, tmp_path / "r18.dynify.safetensors")
    assert path == tmp_path / "r18.dynify.safetensors" and path.is_file()
    loaded = dynify.load(path)
    assert type(loaded) is type(converted)
    assert torch.equal(_out(loaded), _out(converted))
    # The perturbation matters: a freshly converted resnet18 computes something else.
    fresh = dynify.apply(timm.create_model("resnet18", num_classes=7), "mobile", input_size=SIZE)
    assert not torch.allclose(_out(fresh), _out(converted))
    assert loaded.layer1[0].conv2.temperature == 3.0
    assert [n for n, m in loaded.named_modules() if isinstance(m, DynamicConv2d)] == [
        n for n, m in converted.named_modules() if isinstance(m, DynamicConv2d)
    ]
    assert dynify.plan_of(loaded).layers == dynify.plan_of(converted).layers
    # Every tensor, buffers included, is back.
    a, b = converted.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_metadata(converted: nn.Module, tmp_path: Path) -> None:
    path = dynify.save(converted, tmp_path / "a.safetensors", extra={"epochs": 3})
    info = read_info(path)
    assert info["model_name"] == "resnet18"
    assert info["model_kwargs"] == {"num_classes": 7}
    assert info["dynify_version"] == dynify.__version__
    assert info["timm_version"] == timm.__version__
    assert info["torch_version"] == torch.__version__
    assert info["extra"] == {"epochs": 3}
    plan = info.plan
    assert [lp.name for lp in plan.converted] == [
        lp.name for lp in dynify.plan_of(converted).converted
    ]
    assert plan.recipe == "mobile" and plan.input_size == SIZE
    # The metadata is plain safetensors metadata, readable without dynify.
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert meta["format"] == FORMAT
        assert json.loads(meta["plan"])["layers"]
        assert "layer1.0.conv2.weight" in f.keys()
        assert tuple(f.get_slice("layer1.0.conv2.weight").get_shape()) == (4, 64, 64, 3, 3)


def test_model_kwargs_are_stored_and_used(tmp_path: Path) -> None:
    model = timm.create_model("resnet18", num_classes=3, in_chans=1).eval()
    conv = dynify.apply(model, "mobile", input_size=(1, 32, 32))
    path = dynify.save(conv, tmp_path / "x.safetensors", model_kwargs={"in_chans": 1})
    assert read_info(path)["model_kwargs"] == {"in_chans": 1, "num_classes": 3}
    loaded = dynify.load(path)
    assert loaded.conv1.in_channels == 1 and loaded.fc.out_features == 3


def test_non_rgb_model_round_trips_without_kwargs(tmp_path: Path) -> None:
    # timm keeps no in_chans attribute: save must infer it (from the first conv) or load
    # would build a 3-channel stem that the saved weights do not fit.
    torch.manual_seed(0)
    model = timm.create_model("resnet18", in_chans=1, num_classes=5).eval()
    converted = dynify.apply(model, "mobile", input_size=(1, 48, 48))
    path = tmp_path / "gray.safetensors"
    dynify.save(converted, path)
    assert read_info(path)["model_kwargs"] == {"num_classes": 5, "in_chans": 1}
    loaded = dynify.load(path).eval()
    x = torch.randn(2, 1, 48, 48)
    with torch.no_grad():
        assert torch.equal(loaded(x), converted.eval()(x))


def test_save_needs_a_converted_model(tmp_path: Path) -> None:
    with pytest.raises(DynifyError, match="not converted"):
        dynify.save(timm.create_model("resnet18"), tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_save_needs_a_model_name(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    conv = dynify.apply(model, "all", input_size=(3, 8, 8))
    with pytest.raises(DynifyError, match="model_name="):
        dynify.save(conv, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DynifyError, match="no such file"):
        dynify.load(tmp_path / "nope.safetensors")
    with pytest.raises(DynifyError, match="no such file"):
        read_info(tmp_path)  # a folder is not an artifact either


def test_not_a_safetensors_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"this is not safetensors at all" * 10)
    with pytest.raises(DynifyError, match="is not a safetensors file"):
        dynify.load(path)


def test_safetensors_without_dynify_metadata(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(DynifyError, match="is not a dynify artifact"):
        dynify.load(path)


def test_damaged_metadata(converted: nn.Module, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": FORMAT, "model_name": "x"})
    with pytest.raises(DynifyError, match="damaged dynify metadata"):
        read_info(path)


def test_weights_that_do_not_fit_the_plan(converted: nn.Module, tmp_path: Path) -> None:
    """An artifact whose tensors disagree with its plan (edited by hand) is refused."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = dynify.save(converted, tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors["layer1.0.conv2.weight"] = tensors["layer1.0.conv2.weight"][:2].contiguous()
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(DynifyError, match="weights do not fit resnet18"):
        dynify.load(path)


def test_save_is_atomic(converted: nn.Module, tmp_path: Path) -> None:
    target = tmp_path / "out" / "model.safetensors"  # the folder is created
    dynify.save(converted, target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.safetensors"]
    # Overwriting keeps the old file until the new one is complete.
    old = target.read_bytes()
    dynify.save(converted, target, extra={"again": True})
    assert target.read_bytes() != old
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.safetensors"]


def test_failing_save_leaves_nothing(converted: nn.Module, tmp_path: Path, monkeypatch) -> None:
    import safetensors.torch

    def half_then_fail(model, filename, metadata=None, **kwargs):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_model", half_then_fail)
    target = tmp_path / "model.safetensors"
    with pytest.raises(dynify.DynifyError, match=r"could not write .*model.safetensors.*disk full"):
        dynify.save(converted, target)
    assert list(tmp_path.iterdir()) == []
    # An existing artifact survives a failed overwrite untouched.
    monkeypatch.undo()
    dynify.save(converted, target)
    before = target.read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_model", half_then_fail)
    with pytest.raises(dynify.DynifyError, match="disk full"):
        dynify.save(converted, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]

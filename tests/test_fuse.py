"""BatchNorm fusion (dynify.fuse): which pairs are found, that the fused model computes the
unfused eval model's function exactly, the record of edits a model carries, and artifacts
that store and replay it (forged records refused in one line)."""

from __future__ import annotations

import copy
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.layers import Conv2dSame, StdConv2d
from timm.layers.norm_act import BatchNormAct2d
from torch import nn

import dynify
from dynify.artifact import read_info
from dynify.errors import DynifyError
from dynify.fuse import (
    DropAct,
    ModelEdits,
    StaticConv,
    apply_edits,
    conv_norm_pairs,
    edits_of,
    find_conv_norm_pairs,
    find_edits,
    fuse_batchnorm,
    record_edits,
    static_conv_like,
)
from dynify.layers import DCDConv2d, DynamicConv2d, ODConv2d
from dynify.layers.base import DynamicLayer
from dynify.layers.dynamic_conv_same import DynamicConv2dSame

warnings.filterwarnings("ignore", category=UserWarning)

# Exact fusion computed in float64: rounding alone is ~1e-15.
EXACT = 1e-10


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: float64 grouped (depthwise) convs open one parallel region per
    group, and on a busy machine two threads waiting on each other made mobilenetv2's first
    float64 pass take a minute instead of half a second."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomise_norms(model: nn.Module, seed: int = 0, *, eps: float | None = 1e-3) -> None:
    """Running statistics and affine parameters far from the identity, and an eps of
    ``eps`` (not a tensor, so not saved: ``None`` keeps it), so that a fusion that forgot
    any of them shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                if eps is not None:
                    m.eps = eps
                if m.weight is not None:
                    m.weight.copy_(1 + torch.randn(c, generator=gen) * 0.3)
                    m.bias.copy_(torch.randn(c, generator=gen) * 0.3)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _fused_matches(model: nn.Module, size: tuple[int, ...], **kw: Any) -> tuple[list, float]:
    """Fuse ``model`` (float64, eval, norms randomised) and return the fused pairs and the
    relative error of its output against the unfused model's."""
    model = model.double().eval()
    _randomise_norms(model)
    x = torch.randn(2, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x)
    fused = fuse_batchnorm(model, **kw)
    with torch.no_grad():
        after = model(x)
    return fused, _relative_error(after, before)


def _norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


# -- the pairs ------------------------------------------------------------------------------


def _resnet18_pairs() -> list[tuple[str, str]]:
    """Written out by hand: the stem, two convs per basic block, three downsamples."""
    pairs = [("conv1", "bn1")]
    for stage in range(1, 5):
        for block in range(2):
            b = f"layer{stage}.{block}"
            pairs += [(f"{b}.conv1", f"{b}.bn1"), (f"{b}.conv2", f"{b}.bn2")]
            if stage > 1 and block == 0:
                pairs.append((f"{b}.downsample.0", f"{b}.downsample.1"))
    return pairs


def test_resnet18_pairs_are_the_twenty_conv_bn_pairs() -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    search = find_conv_norm_pairs(model)
    assert search.method == "fx" and search.fx_error is None
    assert sorted(search.pairs) == sorted(_resnet18_pairs()) and len(search.pairs) == 20
    assert conv_norm_pairs(model) == list(search.pairs)


def test_resnet18_fused_is_the_eval_model() -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    fused, error = _fused_matches(model, (3, 64, 64))
    assert error < EXACT and len(fused) == 20 and _norms(model) == 0
    assert all(isinstance(model.get_submodule(p.norm), nn.Identity) for p in fused)
    # resnet convs have no bias: fusing gave each one.
    assert all(p.bias_added for p in fused) and model.conv1.bias is not None
    assert edits_of(model) == ModelEdits(fused=tuple(_resnet18_pairs_in(fused)))
    assert conv_norm_pairs(model) == []  # nothing left to fuse


def _resnet18_pairs_in(fused: list) -> list[tuple[str, str]]:
    return [(p.conv, p.norm) for p in fused]


# Families (built with pretrained=False, small inputs): the pairs each should have, and how
# many BatchNorms stay (DenseNet's norm1 and transitions come *before* their conv).
FAMILIES = [
    pytest.param("mobilenetv2_050", 52, 0, id="mobilenetv2_050"),
    pytest.param("efficientnet_b0", 49, 0, id="efficientnet_b0-BatchNormAct2d"),
    pytest.param("regnetx_002", 44, 0, id="regnetx_002"),
    pytest.param("tf_efficientnet_b0", 49, 0, id="tf_efficientnet_b0-Conv2dSame"),
    pytest.param("densenet121", 59, 62, id="densenet121-BN-before-conv"),
]


@pytest.mark.parametrize(("name", "pairs", "left"), FAMILIES)
def test_a_family_fused_is_its_eval_model(name: str, pairs: int, left: int) -> None:
    model = timm.create_model(name, pretrained=False, num_classes=10)
    fused, error = _fused_matches(model, (3, 32, 32))
    assert len(fused) == pairs and _norms(model) == left
    assert error < EXACT, f"{name}: fused output differs by {error:.2e}"
    if name == "densenet121":  # conv0 -> norm0, and conv1 -> norm2 in every dense layer
        assert ("features.conv0", "features.norm0") in [(p.conv, p.norm) for p in fused]
        assert all(p.norm.endswith(("norm0", "norm2")) for p in fused)
        assert not any("transition" in p.conv for p in fused)
    if name.startswith("tf_"):
        assert {p.conv_type for p in fused} == {"Conv2dSame", "Conv2d"}
    if "efficientnet" in name:
        assert {p.norm_type for p in fused} == {"BatchNormAct2d"}
        assert isinstance(model.bn1, DropAct) and isinstance(model.bn1.act, nn.SiLU)


def test_a_family_without_batchnorm_has_nothing_to_fuse() -> None:
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=10)  # LayerNorm
    assert conv_norm_pairs(model) == [] and fuse_batchnorm(model) == []
    assert find_edits(model) is None  # nothing fused, nothing recorded


def test_conv_bias_and_norms_without_affine_fuse_exactly() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=True),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect", groups=2, bias=True),
        nn.BatchNorm2d(8, affine=False),
        nn.Conv2d(8, 4, 1, bias=False),
        BatchNormAct2d(4, act_layer=nn.PReLU),
    )
    fused, error = _fused_matches(model, (3, 12, 12))
    assert [(p.conv, p.norm, p.bias_added) for p in fused] == [
        ("0", "1", False),
        ("3", "4", False),
        ("5", "6", True),
    ]
    assert error < EXACT
    # The BatchNormAct2d's act (a PReLU, with a weight) stays, under its own key.
    assert isinstance(model[6], DropAct) and "6.act.weight" in model.state_dict()
    assert not any(k.startswith(("1.", "4.")) for k in model.state_dict())


class _UsedTwice(nn.Module):
    """``conv_a``'s output feeds its norm and a residual sum: not fusable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv_b, self.bn_b = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_a(x)
        z = self.bn_a(y) + y
        return self.bn_b(self.conv_b(z))


class _Untraceable(_UsedTwice):
    """The same, behind data-dependent control flow that fx cannot trace."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1e30:
            return super().forward(x)
        return x


class _ChangedInPlace(_Untraceable):
    """``conv_a``'s output is changed in place before its norm reads it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1e30:
            y = self.conv_a(x)
            y.mul_(2)
            return self.bn_b(self.conv_b(self.bn_a(y)))
        return x


@pytest.mark.parametrize(("cls", "method"), [(_UsedTwice, "fx"), (_Untraceable, "hook")])
def test_a_conv_whose_output_is_read_twice_is_not_fused(cls: type, method: str, caplog) -> None:
    model = cls().eval()
    with caplog.at_level(logging.DEBUG, logger="dynify"):
        search = find_conv_norm_pairs(model, input_size=(3, 8, 8))
    assert search.method == method and search.pairs == (("conv_b", "bn_b"),)
    assert [(c, n) for c, n, _ in search.skipped] == [("conv_a", "bn_a")]
    assert "also read" in search.skipped[0][2]
    assert "conv_a -> bn_a not fused" in caplog.text
    if method == "hook":
        assert "fx cannot trace _Untraceable" in caplog.text and search.fx_error
    fused, error = _fused_matches(model, (3, 8, 8), input_size=(3, 8, 8))
    assert [(p.conv, p.norm) for p in fused] == [("conv_b", "bn_b")] and error < EXACT


def test_the_hook_fallback_refuses_an_output_changed_in_place() -> None:
    search = find_conv_norm_pairs(_ChangedInPlace().eval(), input_size=(3, 8, 8))
    assert search.method == "hook" and search.pairs == (("conv_b", "bn_b"),)


class _Wrapped(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) if x.sum() > -1e30 else x


def test_the_hook_fallback_finds_what_fx_finds() -> None:
    model = _Wrapped(timm.create_model("resnet18", pretrained=False, num_classes=10))
    search = find_conv_norm_pairs(model, input_size=(3, 32, 32))
    assert search.method == "hook"
    assert sorted(search.pairs) == sorted((f"net.{c}", f"net.{n}") for c, n in _resnet18_pairs())
    fused, error = _fused_matches(model, (3, 32, 32), input_size=(3, 32, 32))
    assert len(fused) == 20 and error < EXACT


def test_weight_standardised_convs_and_batch_statistics_are_refused() -> None:
    model = nn.Sequential(
        StdConv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 1),
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.Conv2d(4, 4, 1),
        nn.BatchNorm2d(4),
    )
    search = find_conv_norm_pairs(model)
    assert search.pairs == (("4", "5"),)
    reasons = {c: why for c, _, why in search.skipped}
    assert "standardises its weight" in reasons["0"]
    assert "no running statistics" in reasons["2"]
    with pytest.raises(DynifyError, match=r"pairs\[0\]\[0\]: '0' cannot be fused") as err:
        fuse_batchnorm(model, [("0", "1")])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ([("conv1", "act1")], r"pairs\[0\]\[1\]: 'act1' cannot be fused \(not a BatchNorm2d"),
        ([("nope", "bn1")], r"pairs\[0\]\[0\]: 'nope' is not a module of ResNet"),
        ([("conv1", "layer2.0.bn1")], r"pairs\[0\]: 'conv1' and 'layer2.0.bn1' do not fit"),
        ([("conv1",)], r"pairs\[0\]: expected a \(conv name, norm name\) pair"),
        ([("conv1", "bn1"), ("layer1.0.conv1", "bn1")], r"a norm is named twice"),
    ],
)
def test_bad_pairs_are_one_line(pairs: list, message: str) -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    with pytest.raises(DynifyError, match=message) as err:
        fuse_batchnorm(model, pairs)
    assert "\n" not in str(err.value)
    assert _norms(model) == 20 and find_edits(model) is None  # nothing was changed


# -- dynamic layers -------------------------------------------------------------------------


def _dynamic(kind: str, bias: bool) -> nn.Module:
    args = (6, 8, 3)
    if kind == "dycnn":
        return DynamicConv2d(*args, padding=1, bias=bias, num_experts=3)
    if kind == "condconv":
        return DynamicConv2d(*args, padding=1, bias=bias, num_experts=3, attention="sigmoid")
    if kind == "dycnn-same":
        return DynamicConv2dSame(*args, stride=2, bias=bias, num_experts=3)
    if kind == "odconv":
        return ODConv2d(*args, padding=1, bias=bias, num_experts=3)
    return DCDConv2d(*args, padding=1, bias=bias, rank=2)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("kind", ["dycnn", "condconv", "dycnn-same", "odconv", "dcd"])
def test_every_dynamic_kind_fuses_exactly(kind: str, bias: bool) -> None:
    torch.manual_seed(3)
    layer = _dynamic(kind, bias)
    with torch.no_grad():  # routing that depends on the input, as after training
        for p in layer.attention.parameters():
            p.add_(torch.randn_like(p) * 0.5)
        if layer.bias is not None:
            layer.bias.normal_()
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), layer, nn.BatchNorm2d(8), nn.ReLU())
    fused, error = _fused_matches(model, (3, 10, 10))
    assert [(p.conv, p.norm) for p in fused] == [("1", "2")]
    assert isinstance(model[1], DynamicLayer) and isinstance(model[2], nn.Identity)
    assert fused[0].bias_added == (not bias)
    assert error < EXACT, f"{kind}: fused output differs by {error:.2e}"


@pytest.mark.parametrize("kind", ["dycnn", "condconv", "odconv", "dcd"])
def test_a_converted_resnet18_of_every_kind_fuses_exactly(kind: str) -> None:
    model = _trained(kind, "resnet18")
    fused, error = _fused_matches(model, (3, 32, 32))
    assert len(fused) == 20 and all(p.conv_type != "Conv2d" for p in fused)
    assert error < EXACT, f"{kind}: fused output differs by {error:.2e}"


# -- the record and its replay ----------------------------------------------------------------


def test_fusing_on_the_meta_device_gives_the_structure_of_a_real_fusion() -> None:
    real = dynify.apply(
        timm.create_model("test_resnet", pretrained=False, num_classes=5),
        {"defaults": {"kind": "condconv", "experts": 2}},
        input_size=(3, 32, 32),
    )
    with torch.device("meta"):
        meta = timm.create_model("test_resnet", pretrained=False, num_classes=5)
        meta = dynify.apply(meta, dynify.plan_of(real), inplace=True, check=False)
    fused = fuse_batchnorm(real)
    # fx finds the same pairs on a skeleton without values.
    assert fuse_batchnorm(meta) == fused and len(fused) == 15
    shapes = {k: tuple(v.shape) for k, v in real.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in meta.state_dict().items()} == shapes
    assert any(k.endswith("static_bias") for k in shapes)  # CondConv's fused shift
    assert all(v.is_meta for v in meta.state_dict().values())


def test_apply_edits_replays_the_structure() -> None:
    fused_model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    fuse_batchnorm(fused_model)
    fresh = timm.create_model("resnet18", pretrained=False, num_classes=10)
    replayed = apply_edits(fresh, edits_of(fused_model))
    assert replayed is fresh and edits_of(fresh) == edits_of(fused_model)
    a, b = fused_model.state_dict(), fresh.state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    fresh.load_state_dict(a, strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), fused_model.eval()(x))


def test_the_record_is_seen_through_wrappers() -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    wrapped = torch.nn.DataParallel(model)
    fused = fuse_batchnorm(wrapped)
    assert len(fused) == 20 and find_edits(model) == find_edits(wrapped)
    assert find_edits(model) is not None and len(find_edits(model).fused) == 20
    record_edits(wrapped, static=[StaticConv("fc", False)])  # appended, not replaced
    assert find_edits(model).static == (StaticConv("fc", False),)
    assert len(find_edits(model).fused) == 20


def test_edits_round_trip_through_their_dict_form() -> None:
    edits = ModelEdits(
        static=(StaticConv("layer1.0.conv2", True),), fused=(("conv1", "bn1"), ("a.b", "a.c"))
    )
    data = json.loads(json.dumps(edits.to_dict()))
    assert ModelEdits.from_dict(data) == edits
    assert ModelEdits.from_dict({}) == ModelEdits() and ModelEdits().empty


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"fused": [["a", "b"], ["c", "d"], ["e", 3]]},
            r"edits\.fused\[2\]\[1\]: expected a module name, got 3",
        ),
        ({"fused": [["a", ""]]}, r"edits\.fused\[0\]\[1\]: expected a module name"),
        ({"fused": [["a..b", "c"]]}, r"edits\.fused\[0\]\[0\]: expected a module name"),
        ({"fused": [["a", "b", "c"]]}, r"edits\.fused\[0\]: expected \[conv name, norm name\]"),
        ({"fused": {"a": "b"}}, r"edits\.fused: expected a list"),
        ({"fused": [["a", "n"], ["b", "n"]]}, r"edits\.fused\[1\]\[1\]: 'n' is fused twice"),
        ({"static": [{"name": "a"}]}, r"edits\.static\[0\]\.bias: missing"),
        (
            {"static": [{"name": "a", "bias": "yes"}]},
            r"edits\.static\[0\]\.bias: expected true or false",
        ),
        ({"static": [{"name": "a", "bias": True, "x": 1}]}, r"edits\.static\[0\]\.x: unknown key"),
        ({"static": ["a"]}, r"edits\.static\[0\]: expected a mapping"),
        ({"version": 2}, r"edits\.version: unsupported edits version 2"),
        ({"fuse": []}, r"edits\.fuse: unknown key \(did you mean 'fused'\?\)"),
        ([], r"edits: expected a mapping"),
        ({"fused": [["x" * 5000, "b"]]}, r"edits\.fused\[0\]\[0\]: expected a module name"),
    ],
)
def test_a_bad_record_is_one_line_naming_the_key(data: Any, message: str) -> None:
    with pytest.raises(DynifyError, match=message) as err:
        ModelEdits.from_dict(data, source="r.json")
    text = str(err.value)
    assert text.startswith("r.json: edits") and "\n" not in text and len(text) < 400


@pytest.mark.parametrize(
    ("edits", "message"),
    [
        (ModelEdits(fused=(("conv1", "nope"),)), r"edits\.fused\[0\]\[1\]: 'nope' is not a module"),
        (ModelEdits(fused=(("conv1", "act1"),)), r"edits\.fused\[0\]\[1\]: 'act1' cannot be fused"),
        (ModelEdits(fused=(("bn1", "bn1"),)), r"edits\.fused\[0\]\[0\]: 'bn1' cannot be fused"),
        (
            ModelEdits(static=(StaticConv("fc", True),)),
            r"edits\.static\[0\]\.name: 'fc' cannot be made",
        ),
        (
            ModelEdits(static=(StaticConv("x.y", True),)),
            r"edits\.static\[0\]\.name: 'x\.y' is not a module",
        ),
    ],
)
def test_a_record_that_does_not_fit_the_model_is_one_line(edits: ModelEdits, message: str) -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    with pytest.raises(DynifyError, match=message) as err:
        apply_edits(model, edits)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("module", "cls"),
    [
        (DynamicConv2d(4, 8, 3, stride=2, padding=1, dilation=1, groups=2, bias=False), nn.Conv2d),
        (DynamicConv2dSame(4, 8, 5, stride=2, bias=True), Conv2dSame),
        (DynamicConv2d(4, 8, 3, padding="same", padding_mode="reflect"), nn.Conv2d),
        (ODConv2d(4, 8, 3, padding=2, dilation=2, bias=True), nn.Conv2d),
        (DCDConv2d(4, 8, 3, padding=1, bias=False), nn.Conv2d),
        (Conv2dSame(4, 8, 3, stride=2), Conv2dSame),
        (nn.Conv2d(4, 8, (1, 3), padding=(0, 1), padding_mode="circular"), nn.Conv2d),
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_static_conv_like_keeps_the_geometry(module: nn.Module, cls: type, bias: bool) -> None:
    conv = static_conv_like(module, bias=bias)
    assert type(conv) is cls and (conv.bias is not None) == bias
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "dilation", "groups"):
        assert getattr(conv, attr) == getattr(module, attr), attr
    if cls is nn.Conv2d:
        assert conv.padding == module.padding and conv.padding_mode == module.padding_mode
    assert not conv.weight.is_meta and not conv.weight.any()
    skeleton = copy.deepcopy(module).to("meta")
    assert static_conv_like(skeleton, bias=bias).weight.is_meta


# -- artifacts ------------------------------------------------------------------------------


def _trained(kind: str, name: str = "test_resnet") -> nn.Module:
    """A converted model (every conv dynamic) whose BNs and routing are far from their
    starting point."""
    defaults: dict[str, Any] = {"kind": kind}
    if kind != "dcd":
        defaults["experts"] = 2
    model = timm.create_model(name, pretrained=False, num_classes=5)
    model = dynify.apply(model, {"defaults": defaults}, input_size=(3, 32, 32))
    _randomise_norms(model, seed=4, eps=None)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DynamicLayer):
                for p in m.attention.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def _out(model: nn.Module) -> torch.Tensor:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("kind", ["dycnn", "condconv", "odconv", "dcd"])
def test_a_fused_model_round_trips_through_an_artifact(kind: str, tmp_path: Path) -> None:
    model = _trained(kind)
    before = _out(model)
    fused = fuse_batchnorm(model)
    assert fused and _relative_error(_out(model), before) < 1e-5
    path = dynify.save(model, tmp_path / "fused.safetensors")
    assert read_info(path).edits == edits_of(model)
    loaded = dynify.load(path)
    assert torch.equal(_out(loaded), _out(model))
    assert edits_of(loaded) == edits_of(model) and _norms(loaded) == _norms(model)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Saved again, the loaded model writes the same record.
    again = dynify.load(dynify.save(loaded, tmp_path / "again.safetensors"))
    assert edits_of(again) == edits_of(model)


def test_a_static_edit_round_trips_through_an_artifact(tmp_path: Path) -> None:
    """What ``dynify fold`` does: a dynamic layer replaced by a static conv (here with the
    layer's mean kernel), recorded, then the BatchNorms fused."""
    model = _trained("dycnn")
    name = next(n for n, m in model.named_modules() if isinstance(m, DynamicConv2d))
    layer = model.get_submodule(name)
    conv = static_conv_like(layer, bias=True)
    with torch.no_grad():
        routing = torch.full((1, layer.num_experts), 1.0 / layer.num_experts)
        kernel, bias = layer.average_kernel(routing)
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias if bias is not None else torch.zeros_like(conv.bias))
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, conv)
    record_edits(model, static=[StaticConv(name, True)])
    fuse_batchnorm(model)
    edits = edits_of(model)
    assert edits.static == (StaticConv(name, True),) and edits.fused
    loaded = dynify.load(dynify.save(model, tmp_path / "folded.safetensors"))
    assert type(loaded.get_submodule(name)) is nn.Conv2d
    assert torch.equal(_out(loaded), _out(model)) and edits_of(loaded) == edits


@pytest.fixture(scope="module")
def fused_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = _trained("dycnn")
    fuse_batchnorm(model)
    return dynify.save(model, tmp_path_factory.mktemp("fused") / "fused.safetensors")


def _forge(good: Path, target: Path, edits: Any) -> Path:
    with safe_open(str(good), framework="pt") as f:
        meta = dict(f.metadata())
    if edits is None:
        meta.pop("edits", None)
    else:
        meta["edits"] = edits if isinstance(edits, str) else json.dumps(edits)
    save_file(load_file(str(good)), str(target), metadata=meta)
    return target


def _edits(good: Path) -> dict[str, Any]:
    with safe_open(str(good), framework="pt") as f:
        return json.loads(f.metadata()["edits"])


def test_an_artifact_without_edits_has_no_edits_key(tmp_path: Path) -> None:
    model = _trained("dycnn")
    path = dynify.save(model, tmp_path / "plain.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert "edits" not in f.metadata()
    assert read_info(path).edits.empty
    loaded = dynify.load(path)
    assert find_edits(loaded) is None and torch.equal(_out(loaded), _out(model))


def _forged_fused(good: Path, index: int, pair: Any) -> dict[str, Any]:
    edits = _edits(good)
    edits["fused"][index] = pair
    return edits


@pytest.mark.parametrize(
    ("forged", "message"),
    [
        (
            lambda g: _forged_fused(g, 2, ["conv1.0", 3]),
            r"edits\.fused\[2\]\[1\]: expected a module name, got 3",
        ),
        (
            lambda g: _forged_fused(g, 0, ["conv1.0", "nope"]),
            r"edits\.fused\[0\]\[1\]: 'nope' is not a module",
        ),
        (
            lambda g: _forged_fused(g, 1, ["conv1.0", "fc"]),
            r"edits\.fused\[1\]\[1\]: 'fc' cannot be fused",
        ),
        (
            lambda g: {**_edits(g), "static": [{"name": "fc", "bias": True}]},
            r"edits\.static\[0\]\.name: 'fc' cannot be made",
        ),
        (
            lambda g: {**_edits(g), "fused": _edits(g)["fused"][1:]},
            r"tensor 'conv1\.1\.weight' \(\[16\]\) is not in the file",
        ),
        (lambda g: "[1]", r"'edits' must be a JSON object, got list"),
        (lambda g: "{no", r"'edits' is not JSON"),
    ],
)
def test_forged_edits_are_refused_in_one_line(
    fused_artifact: Path, tmp_path: Path, forged: Any, message: str
) -> None:
    hostile = _forge(fused_artifact, tmp_path / "h.safetensors", forged(fused_artifact))
    with pytest.raises(DynifyError, match=message) as err:
        dynify.load(hostile)
    text = str(err.value)
    assert "\n" not in text and str(hostile) in text


def test_an_artifact_that_lost_its_edits_is_refused(fused_artifact: Path, tmp_path: Path) -> None:
    """The tensors of a fused model do not fit the unfused tree (no norms, new biases)."""
    hostile = _forge(fused_artifact, tmp_path / "h.safetensors", None)
    with pytest.raises(DynifyError, match=r"weights do not fit test_resnet as planned"):
        dynify.load(hostile)


def test_the_public_names() -> None:
    assert dynify.fuse_batchnorm is fuse_batchnorm and dynify.ModelEdits is ModelEdits
    assert dynify.conv_norm_pairs is conv_norm_pairs and dynify.apply_edits is apply_edits
    assert {"fuse_batchnorm", "conv_norm_pairs", "apply_edits", "ModelEdits"} <= set(dynify.__all__)


def test_a_conv_named_in_two_pairs_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)).eval()
    with pytest.raises(DynifyError, match="a conv is named twice"):
        fuse_batchnorm(model, [("0", "1"), ("0", "2")])

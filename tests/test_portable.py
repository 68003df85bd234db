"""What every kind provides for shipping a model: its per-sample kernels written out, the
portable (batch-independent) formulation, the average kernel, BatchNorm fusion and dropping
experts, each checked against a literal computation (plain ``F.conv2d`` per sample, the
papers' formulas element by element, the unfused layer followed by its affine map)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynify.errors import DynifyError
from dynify.layers import DCDConv2d, DynamicConv2d, ODConv2d
from dynify.layers.dynamic_conv_same import DynamicConv2dSame
from dynify.layers.portable import per_sample_conv2d, portable

# (in, out, kernel, stride, padding, dilation, groups, padding_mode)
GEOMETRIES = [
    (8, 16, 3, 1, 1, 1, 1, "zeros"),
    (8, 16, 3, 2, 1, 1, 2, "reflect"),
    (8, 8, 3, 1, "same", 1, 8, "zeros"),  # depthwise
    (8, 16, 3, 1, 1, 1, 8, "zeros"),  # depthwise, channel multiplier 2
    (6, 12, (1, 3), 1, (0, 1), 1, 3, "circular"),
    (8, 16, 1, 2, 0, 1, 1, "zeros"),
    (8, 16, 3, 1, 2, 2, 1, "replicate"),
    (4, 8, (2, 4), 1, "same", 1, 1, "zeros"),  # even kernel: asymmetric 'same'
    (4, 6, 5, 3, 0, 1, 2, "zeros"),
]
DCD_GEOMETRIES = [(8, 16, 3, 1, 1), (8, 16, 1, 2, 0), (8, 16, 5, 2, 2), (16, 8, 3, 2, 1)]


def _random_(layer: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random (attention heads included), so that routing, biases and
    experts all differ: nothing below can pass by symmetry."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return layer.double().eval()


def _kinds(geometry: tuple, bias: bool = True) -> list[nn.Module]:
    c_in, c_out, k, s, p, d, g, mode = geometry
    args = (c_in, c_out, k, s, p, d, g, bias, mode)
    return [
        DynamicConv2d(*args, num_experts=3),
        DynamicConv2d(*args, num_experts=3, attention="sigmoid"),
        ODConv2d(*args, num_experts=3, reduction=2),
        ODConv2d(*args, num_experts=1, reduction=2),
    ]


def _dcd(geometry: tuple, bias: bool = True) -> DCDConv2d:
    c_in, c_out, k, s, p = geometry
    return DCDConv2d(c_in, c_out, k, s, p, bias=bias, rank=3, reduction=2)


def _every_layer(bias: bool = True) -> list[tuple[str, nn.Module]]:
    layers = []
    for geometry in GEOMETRIES:
        for layer in _kinds(geometry, bias):
            layers.append((f"{layer.kind}-K{layer.num_experts}-{geometry}", layer))
    for geometry in DCD_GEOMETRIES:
        layers.append((f"dcd-{geometry}", _dcd(geometry, bias)))
    return layers


LAYERS = _every_layer()
IDS = [name for name, _ in LAYERS]


def _padded(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """The input as the layer's convolution sees it, and the padding that conv adds."""
    if isinstance(layer, DCDConv2d):
        return x, layer._pad_hw
    return layer._pad(x), layer._conv_padding()


def _per_sample_reference(layer: nn.Module, x: torch.Tensor, kernels, bias) -> torch.Tensor:
    xp, pad = _padded(layer, x)
    if isinstance(layer, DCDConv2d) and layer.padding_mode != "zeros":
        raise AssertionError("the DCD geometries here are zero-padded")
    return torch.cat(
        [
            F.conv2d(
                xp[i : i + 1],
                kernels[i],
                None if bias is None else bias[i],
                layer.stride,
                pad,
                layer.dilation,
                layer.groups,
            )
            for i in range(x.shape[0])
        ]
    )


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-12) -> None:
    a, b = a.detach(), b.detach()
    err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
    assert err < tol, err


@pytest.mark.parametrize(("name", "layer"), LAYERS, ids=IDS)
def test_sample_kernels_convolved_per_sample_are_the_layer(name: str, layer: nn.Module) -> None:
    layer = _random_(layer)
    x = torch.randn(3, layer.in_channels, 9, 10, dtype=torch.float64)
    with torch.no_grad():
        kernels, bias = layer.sample_kernels(layer.attention(x))
        _close(_per_sample_reference(layer, x, kernels, bias), layer(x))


@pytest.mark.parametrize(("name", "layer"), LAYERS, ids=IDS)
def test_portable_formulation_is_the_layer(name: str, layer: nn.Module) -> None:
    layer = _random_(layer)
    x = torch.randn(4, layer.in_channels, 11, 9, dtype=torch.float64)
    with torch.no_grad():
        eager = layer(x)
        with portable(layer) as same:
            assert same is layer and layer.portable
            out = layer(x)
    assert not layer.portable  # restored
    _close(out, eager)


@torch.no_grad()
def test_sample_kernels_follow_each_papers_formula_element_by_element() -> None:
    """DY-CNN / CondConv: sum_k pi_k W_k; ODConv: a_f[o] a_c[i] a_s[t] sum_k a_w,k W_k;
    DCD: Lambda[o] W0 + (P (I + Phi) Q^T)[o, i] at the centre tap; written as loops."""
    torch.manual_seed(1)
    dy = _random_(DynamicConv2d(4, 6, 3, padding=1, groups=2, num_experts=3))
    r = torch.rand(2, 3, dtype=torch.float64)
    k, b = dy.sample_kernels(r)
    for n in range(2):
        _close(k[n], sum(r[n, e] * dy.weight[e] for e in range(3)))
        _close(b[n], sum(r[n, e] * dy.bias[e] for e in range(3)))

    od = _random_(ODConv2d(4, 6, 3, padding=1, groups=2, num_experts=3, reduction=2))
    routing = od.attention(torch.randn(2, 4, 5, 5, dtype=torch.float64))
    c, f, s, w = od.split_routing(routing)
    k, b = od.sample_kernels(routing)
    for n in range(2):
        mixed = sum(w[n, e] * od.weight[e] for e in range(3))
        for o in range(6):
            for i in range(2):  # the 2 input channels of o's group
                ch = (o // 3) * 2 + i
                for t in range(9):
                    want = f[n, o] * c[n, ch] * s[n, t] * mixed[o, i].flatten()[t]
                    assert math.isclose(float(k[n, o, i].flatten()[t]), float(want), rel_tol=1e-12)
        _close(b[n], od.bias)

    dcd = _random_(DCDConv2d(5, 4, 3, padding=1, rank=2, reduction=2))
    routing = dcd.attention(torch.randn(2, 5, 6, 6, dtype=torch.float64))
    k, b = dcd.sample_kernels(routing)
    p, q = dcd.p.flatten(1), dcd.q.flatten(1)
    for n in range(2):
        lam = routing[n, :4]
        phi = routing[n, 4:].view(2, 2)
        want = lam.view(4, 1, 1, 1) * dcd.weight
        want = want.clone()
        want[:, :, 1, 1] += p @ (torch.eye(2, dtype=torch.float64) + phi) @ q
        _close(k[n], want)
        _close(b[n], dcd.bias)


def test_per_sample_conv2d_against_conv2d_per_sample() -> None:
    torch.manual_seed(2)
    for c_in, c_out, kh, kw, stride, pad, dil, groups in [
        (6, 4, 3, 3, (1, 2), (1, 0), (1, 1), 2),
        (4, 4, 2, 3, (2, 1), (0, 2), (2, 1), 4),
        (3, 5, 1, 1, (1, 1), (0, 0), (1, 1), 1),
    ]:
        x = torch.randn(3, c_in, 8, 7, dtype=torch.float64)
        kernels = torch.randn(3, c_out, c_in // groups, kh, kw, dtype=torch.float64)
        bias = torch.randn(3, c_out, dtype=torch.float64)
        out = per_sample_conv2d(x, kernels, bias, stride, pad, dil, groups)
        ref = torch.cat(
            [
                F.conv2d(x[i : i + 1], kernels[i], bias[i], stride, pad, dil, groups)
                for i in range(3)
            ]
        )
        _close(out, ref)


def test_portable_exports_with_a_symbolic_batch() -> None:
    """torch.export with a dynamic batch: no guard on the batch size, and the program is the
    eager layer at batch sizes it was not traced at."""
    torch.manual_seed(3)
    layer = DynamicConv2d(8, 8, 3, padding=1, num_experts=4).eval()
    x = torch.randn(2, 8, 12, 12)
    with portable(layer):
        program = torch.export.export(
            layer, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}}
        )
    for batch in (1, 5):
        xb = torch.randn(batch, 8, 12, 12)
        with torch.no_grad():
            _close(program.module()(xb), layer(xb), tol=1e-5)


def test_tf_same_variant_is_portable_too() -> None:
    layer = _random_(DynamicConv2dSame(4, 6, 3, stride=2, padding=0, num_experts=2))
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    with torch.no_grad():
        eager = layer(x)
        with portable(layer):
            _close(layer(x), eager)


@pytest.mark.parametrize(("name", "layer"), LAYERS[::3], ids=IDS[::3])
def test_average_kernel_is_the_mean_of_the_sample_kernels(name: str, layer: nn.Module) -> None:
    layer = _random_(layer)
    x = torch.randn(7, layer.in_channels, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        routing = layer.attention(x)
        # A tiny chunk budget: the mean is accumulated over several chunks.
        kernel, bias = layer.average_kernel(routing, max_bytes=1)
        every = [layer.sample_kernels(routing[i : i + 1]) for i in range(7)]
    _close(kernel, sum(k[0] for k, _ in every) / 7)
    _close(bias, sum(b[0] for _, b in every) / 7)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize(("name", "index"), [(n, i) for i, (n, _) in enumerate(LAYERS)], ids=IDS)
def test_fuse_affine_is_the_layer_then_the_affine_map(name: str, index: int, bias: bool) -> None:
    layer = _random_(_every_layer(bias)[index][1])
    x = torch.randn(3, layer.in_channels, 9, 8, dtype=torch.float64)
    scale = torch.rand(layer.out_channels, dtype=torch.float64) + 0.5
    shift = torch.randn(layer.out_channels, dtype=torch.float64)
    with torch.no_grad():
        want = layer(x) * scale[:, None, None] + shift[:, None, None]
        layer.fuse_affine_(scale, shift)
        _close(layer(x), want)
        with portable(layer):
            _close(layer(x), want)


def test_fuse_affine_condition_softmax_experts_versus_sigmoid_own_bias() -> None:
    """Softmax weights sum to 1, so the shift goes into every expert's bias; sigmoid weights
    do not, so the shift gets a bias of its own."""
    soft = _random_(DynamicConv2d(4, 4, 3, padding=1, num_experts=2, bias=False))
    soft.fuse_affine_(torch.ones(4).double(), torch.arange(4.0).double())
    assert soft.static_bias is None and soft.bias is not None
    assert torch.equal(soft.bias, torch.arange(4.0).double().expand(2, 4))
    sig = _random_(DynamicConv2d(4, 4, 3, padding=1, num_experts=2, attention="sigmoid"))
    before = sig.bias.clone()
    sig.fuse_affine_(torch.full((4,), 2.0).double(), torch.arange(4.0).double())
    assert torch.equal(sig.bias, 2 * before)
    assert torch.equal(sig.static_bias, torch.arange(4.0).double())
    with pytest.raises(DynifyError, match=r"shift must have shape \(4,\)"):
        sig.fuse_affine_(torch.ones(4), torch.ones(3))


def test_fuse_affine_works_on_the_meta_device() -> None:
    with torch.device("meta"):
        for layer in (
            DynamicConv2d(4, 4, 3, num_experts=2, bias=False, attention="sigmoid"),
            ODConv2d(4, 4, 3, bias=False),
            DCDConv2d(4, 4, 3, padding=1, bias=False),
        ):
            layer.fuse_affine_(torch.ones(4), torch.zeros(4))
            if isinstance(layer, DynamicConv2d):  # sigmoid: the shift has its own bias
                assert layer.bias is None and layer.static_bias.shape == (4,)
            else:
                assert layer.bias.shape == (4,) and layer.bias.is_meta


def _expert_layers() -> list[nn.Module]:
    geometry = (6, 8, 3, 1, 1, 1, 2, "zeros")
    dy, cond, od, _ = _kinds(geometry)
    return [_random_(m) for m in (dy, cond, od)]


@pytest.mark.parametrize("layer", _expert_layers(), ids=["dycnn", "condconv", "odconv"])
def test_drop_experts_renormalises_exactly(layer: nn.Module) -> None:
    """After dropping expert 1 of 3: softmax weights are the old ones renormalised over the
    experts kept; sigmoid weights are the old ones; the output is the literal mixture."""
    x = torch.randn(3, layer.in_channels, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        before = layer.expert_weights(layer.attention(x))
        old_weight = layer.weight.clone()
        layer.drop_experts_([0, 2])
        assert layer.num_experts == 2 and layer.weight.shape[0] == 2
        after = layer.expert_weights(layer.attention(x))
        kept = before[:, [0, 2]]
        if layer.kind == "condconv":
            _close(after, kept)
        else:
            _close(after, kept / kept.sum(dim=1, keepdim=True))
        assert torch.equal(layer.weight, old_weight[[0, 2]])
        kernels, bias = layer.sample_kernels(layer.attention(x))
        _close(layer(x), _per_sample_reference(layer, x, kernels, bias))


def test_odconv_keeping_one_expert_is_a_one_expert_layer() -> None:
    layer = _random_(ODConv2d(6, 8, 3, padding=1, num_experts=3, reduction=2))
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        layer.drop_experts_([2])
        assert layer.attention.sections[3] == 0 and layer.expert_weights(layer.attention(x)) is None
        fresh = ODConv2d(6, 8, 3, padding=1, num_experts=1, reduction=2).double().eval()
        # The same tensors as a layer built with one expert: an artifact rebuilds it.
        assert {k: v.shape for k, v in fresh.state_dict().items()} == {
            k: v.shape for k, v in layer.state_dict().items()
        }
        fresh.load_state_dict(layer.state_dict())
        _close(fresh(x), layer(x))


def test_drop_experts_refuses_bad_indices_and_kinds_without_experts() -> None:
    layer = DynamicConv2d(4, 4, 3, num_experts=3)
    for keep in ([], [0, 0], [3], [-1]):
        with pytest.raises(DynifyError, match="keep must list distinct expert indices from 0 to 2"):
            layer.drop_experts_(keep)
    with pytest.raises(DynifyError, match="a dcd layer has no experts to drop"):
        DCDConv2d(4, 4, 3, padding=1).drop_experts_([0])

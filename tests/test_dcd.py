"""DCDConv2d (kind ``dcd``) against an independent reference.

The reference shares no code with dynify: the routing is recomputed by hand from the
attention's parameters, each sample's kernel ``Lambda W0 + P (I + Phi) Q^T`` (the low-rank
term at the centre tap) is BUILT, and the convolution is ``nn.Conv2d._conv_forward`` of a
template conv with the same constructor arguments, so torch handles padding and its modes.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from dynify.cost.pricing import dcd_layer_macs
from dynify.errors import DynifyError, DynifyTypeError
from dynify.layers import DCDConv2d
from dynify.layers.dcd import _hsig as _hsig_module
from dynify.layers.dcd import folds_mix
from dynify.layers.kinds import KINDS, layer_class

CL = torch.channels_last
H, W = 9, 11  # odd and non-square on purpose


def _cfg(**kw) -> dict:
    cfg = {
        "in_channels": 6,
        "out_channels": 10,
        "kernel_size": 3,
        "stride": 1,
        "padding": 1,
        "dilation": 1,
        "bias": True,
        "padding_mode": "zeros",
    }
    cfg.update(kw)
    return cfg


def _cfg_id(cfg: dict) -> str:
    base = _cfg()
    return ",".join(f"{k}={v}".replace(" ", "") for k, v in cfg.items() if base.get(k) != v)


GRID = [
    _cfg(),
    _cfg(stride=2),
    _cfg(kernel_size=1, padding=0),
    _cfg(kernel_size=1, padding=0, stride=2),
    _cfg(kernel_size=1, padding="valid"),
    _cfg(kernel_size=5, padding=2),
    _cfg(kernel_size=5, padding=2, stride=2, bias=False),
    _cfg(dilation=2, padding=2),
    _cfg(dilation=2, padding=2, stride=2),
    _cfg(kernel_size=(3, 1), padding=(1, 0)),
    _cfg(kernel_size=(1, 3), padding=(0, 1), stride=(2, 1)),
    _cfg(kernel_size=(3, 5), padding=(2, 2), dilation=(2, 1)),
    _cfg(padding="same"),
    _cfg(kernel_size=5, padding="same", dilation=2),
    _cfg(bias=False),
    _cfg(in_channels=10, out_channels=4),  # C_in > C_out
    _cfg(in_channels=16, out_channels=16, stride=2),  # default rank 4
    _cfg(rank=2),
    _cfg(rank=5, stride=2),
    _cfg(in_channels=3, out_channels=8, kernel_size=7, padding=3, stride=2),  # a stem
    _cfg(padding_mode="reflect"),
    _cfg(padding_mode="replicate", stride=2),
    _cfg(padding_mode="circular", kernel_size=5, padding=2),
    _cfg(padding_mode="circular", padding="same"),
    # Maps with no more positions than output channels: the residual mixes the latent map
    # instead of folding P (I + Phi) (dynify.layers.dcd.folds_mix).
    _cfg(in_channels=8, out_channels=40, stride=2),
    _cfg(in_channels=8, out_channels=40, kernel_size=1, padding=0, stride=2, bias=False),
    _cfg(in_channels=8, out_channels=99, padding_mode="reflect"),
]


def _conv_kwargs(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k != "rank"}


def make_layer(cfg: dict, dtype=torch.float32) -> DCDConv2d:
    """A DCDConv2d with every parameter random and a clearly sample-dependent routing."""
    layer = DCDConv2d(**cfg, dtype=dtype)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in layer.parameters():
            fan_in = param[0].numel() if param.dim() > 1 else 1
            param.copy_(torch.randn(param.shape, generator=g, dtype=dtype) / fan_in**0.5)
        att = layer.attention
        att.fc.weight.mul_(3.0)  # pooled inputs are small: spread the hidden units
        att.fc_scale.weight.mul_(2.0)
    return layer


def make_input(cfg: dict, batch: int, dtype=torch.float32) -> torch.Tensor:
    c = cfg["in_channels"]
    x = torch.randn(batch, c, H, W, dtype=dtype) + torch.randn(batch, c, 1, 1, dtype=dtype)
    return x


def _hsig(z: torch.Tensor) -> torch.Tensor:
    return torch.clamp(z + 3, 0, 6) / 3


def reference_routing(layer: DCDConv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Lambda (B, C_out), Phi (B, L, L)) by hand."""
    att = layer.attention
    pooled = x.sum(dim=(2, 3)) / (x.shape[2] * x.shape[3])
    h = pooled @ att.fc.weight.t()
    h = h * _hsig(h @ att.se.weight.t())
    lam = _hsig(h @ att.fc_scale.weight.t())
    phi = (h @ att.fc_phi.weight.t()).reshape(x.shape[0], layer.rank, layer.rank)
    return lam, phi


def reference(layer: DCDConv2d, cfg: dict, x: torch.Tensor) -> torch.Tensor:
    """A per-sample loop that builds each sample's kernel and convolves with it."""
    template = nn.Conv2d(**_conv_kwargs(cfg), device=x.device, dtype=x.dtype)
    lam, phi = reference_routing(layer, x)
    p2, q2 = layer.p[:, :, 0, 0], layer.q[:, :, 0, 0]
    kh, kw = layer.kernel_size
    eye = torch.eye(layer.rank, dtype=x.dtype)
    outs = []
    for b in range(x.shape[0]):
        kernel = lam[b][:, None, None, None] * layer.weight
        low_rank = p2 @ (eye + phi[b]) @ q2
        kernel = kernel.clone()
        kernel[:, :, (kh - 1) // 2, (kw - 1) // 2] += low_rank
        outs.append(template._conv_forward(x[b : b + 1], kernel, layer.bias))
    return torch.cat(outs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _assert_routing_is_informative(layer: DCDConv2d, x: torch.Tensor) -> None:
    lam, phi = reference_routing(layer, x)
    assert (lam - 1).abs().max() > 0.05, "Lambda is ~1: scaling goes untested"
    assert phi.abs().max() > 0.05, "Phi is ~0: the latent mix goes untested"
    if x.shape[0] > 1:
        assert (lam - lam[:1]).abs().max() > 1e-3, "Lambda does not depend on the sample"
        assert (phi - phi[:1]).abs().max() > 1e-3, "Phi does not depend on the sample"


# -- forward against the reference -------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("cfg", GRID, ids=_cfg_id)
def test_forward_matches_reference(cfg, batch):
    layer = make_layer(cfg)
    x = make_input(cfg, batch)
    _assert_routing_is_informative(layer, x)
    out = layer(x)
    assert out.shape == nn.Conv2d(**_conv_kwargs(cfg))(x).shape
    assert out.dtype == x.dtype
    assert rel_err(out, reference(layer, cfg, x)) < 1e-5


@pytest.mark.parametrize("cfg", GRID[:12], ids=_cfg_id)
def test_forward_matches_reference_in_float64(cfg):
    layer = make_layer(cfg, torch.float64)
    x = make_input(cfg, 3, torch.float64)
    assert rel_err(layer(x), reference(layer, cfg, x)) < 1e-12


@pytest.mark.parametrize("cfg", GRID[:4], ids=_cfg_id)
def test_forward_routed_is_forward_and_routing_is_lambda_then_phi(cfg):
    layer = make_layer(cfg)
    x = make_input(cfg, 3)
    routing = layer.attention(x)
    c_out, rank = cfg["out_channels"], layer.rank
    assert routing.shape == (3, c_out + rank * rank)
    assert torch.equal(layer.forward_routed(x, routing), layer(x))
    lam, phi = reference_routing(layer, x)
    assert rel_err(routing[:, :c_out], lam) < 1e-6
    assert rel_err(routing[:, c_out:].reshape(3, rank, rank), phi) < 1e-6
    # A routing frozen at its batch mean (what the routing diagnostics do) still applies.
    frozen = routing.mean(0, keepdim=True).expand_as(routing)
    assert layer.forward_routed(x, frozen).shape == layer(x).shape


def test_hsig_is_the_references_range_0_to_2():
    z = torch.tensor([-10.0, -3.0, -1.5, 0.0, 1.5, 3.0, 10.0])
    want = torch.tensor([0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.0])  # not nn.Hardsigmoid's half
    assert torch.equal(_hsig_module(z), want)
    assert torch.equal(_hsig(z), want)


# -- memory layouts and precisions ----------------------------------------------------------------


@pytest.mark.parametrize("cfg", [*GRID[:4], GRID[20], *GRID[-3:]], ids=_cfg_id)
def test_channels_last_in_gives_channels_last_out(cfg):
    layer = make_layer(cfg)
    x = make_input(cfg, 3).contiguous(memory_format=CL).requires_grad_()
    out = layer(x)
    assert out.is_contiguous(memory_format=CL)
    assert rel_err(out, reference(layer, cfg, x.detach().contiguous())) < 1e-5
    out.backward(torch.randn_like(out))
    assert x.grad is not None and x.grad.is_contiguous(memory_format=CL)
    x2 = x.detach().contiguous().requires_grad_()
    out2 = layer(x2)
    assert out2.is_contiguous()
    torch.manual_seed(1)
    g = torch.randn_like(out2)
    x.grad = None
    layer(x).backward(g.contiguous(memory_format=CL))
    out2.backward(g)
    assert rel_err(x.grad, x2.grad) < 1e-5


def test_non_contiguous_input():
    cfg = _cfg(stride=2)
    layer = make_layer(cfg)
    x = torch.randn(3, 12, H + 2, W)[:, ::2, 1:-1]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=CL)
    assert rel_err(layer(x), reference(layer, cfg, x.contiguous())) < 1e-5


LOW_PRECISION = {torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", list(LOW_PRECISION), ids=str)
@pytest.mark.parametrize("cfg", [GRID[0], GRID[3]], ids=_cfg_id)
def test_low_precision(cfg, dtype):
    layer = make_layer(cfg).to(dtype)
    x = make_input(cfg, 3).to(dtype)
    out = layer(x)
    assert out.dtype == dtype
    ref = reference(copy.deepcopy(layer).float(), cfg, x.float())
    assert rel_err(out, ref) < LOW_PRECISION[dtype]
    x.requires_grad_()
    layer(x).float().square().mean().backward()
    assert x.grad is not None and x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


# -- gradients --------------------------------------------------------------------------------


GRAD_CFGS = [
    _cfg(stride=2, out_channels=5),
    _cfg(kernel_size=(3, 1), padding=(1, 0), padding_mode="reflect", rank=3, bias=False),
    _cfg(stride=2, out_channels=12),  # 9 positions: the latent-map mix
]


def _gradcheck(cfg: dict, channels_last: bool, fast_mode: bool) -> None:
    cfg = {"out_channels": 5, **cfg, "in_channels": 4}
    layer = make_layer(cfg, torch.float64)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64) + 0.5
    if channels_last:
        x = x.contiguous(memory_format=CL)
    x.requires_grad_()

    def f(x, *ps):
        return functional_call(layer, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, fast_mode=fast_mode)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("cfg", GRAD_CFGS, ids=_cfg_id)
def test_gradcheck_fast(cfg, channels_last):
    """Every input and parameter, through random projections (torch's fast mode)."""
    _gradcheck(cfg, channels_last, fast_mode=True)


@pytest.mark.parametrize("cfg", [GRAD_CFGS[0], GRAD_CFGS[2]], ids=_cfg_id)
def test_gradcheck_full(cfg):
    _gradcheck(cfg, channels_last=False, fast_mode=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("cfg", "channels_last"), [(GRAD_CFGS[0], True), (GRAD_CFGS[1], False), (GRAD_CFGS[1], True)]
)
def test_gradcheck_full_slow(cfg, channels_last):
    _gradcheck(cfg, channels_last, fast_mode=False)


# -- from_conv: exact at creation, learning from the first step --------------------------------


def _random_conv(cfg: dict, dtype=torch.float32) -> nn.Conv2d:
    conv = nn.Conv2d(**_conv_kwargs(cfg), dtype=dtype)
    with torch.no_grad():
        if conv.bias is not None:
            conv.bias.normal_()
    return conv


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("cfg", GRID, ids=_cfg_id)
def test_from_conv_is_exact(cfg, dtype):
    conv = _random_conv(cfg, dtype)
    layer = DCDConv2d.from_conv(
        conv, rank=cfg.get("rank"), generator=torch.Generator().manual_seed(0)
    )
    assert layer.weight.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    # The folded kernel: W0' + P Q^T at the centre tap is the conv's kernel.
    kh, kw = layer.kernel_size
    rebuilt = layer.weight.detach().double().clone()
    rebuilt[:, :, (kh - 1) // 2, (kw - 1) // 2] += (
        layer.p.detach().double()[:, :, 0, 0] @ layer.q.detach().double()[:, :, 0, 0]
    )
    # Up to the one rounding of W0' to the layer's dtype.
    ulp = torch.finfo(dtype).eps * float(layer.weight.detach().abs().max())
    assert float((rebuilt - conv.weight.detach().double()).abs().max()) <= ulp
    assert layer.p.abs().max() > 0 and layer.q.abs().max() > 0
    for train in (True, False):
        layer.train(train)
        conv.train(train)
        for batch in (1, 3):
            x = make_input(cfg, batch, dtype)
            assert rel_err(layer(x), conv(x)) < tol
    routing = layer.attention(make_input(cfg, 3, dtype))
    assert torch.equal(
        routing[:, : layer.out_channels], torch.ones(3, layer.out_channels, dtype=dtype)
    )
    assert torch.equal(
        routing[:, layer.out_channels :], torch.zeros_like(routing[:, layer.out_channels :])
    )


def test_from_conv_first_step_gradients_and_routing_after_a_few_steps():
    cfg = _cfg(in_channels=16, out_channels=12, stride=2)
    conv = _random_conv(cfg)
    layer = DCDConv2d.from_conv(conv, generator=torch.Generator().manual_seed(0))
    x = make_input(cfg, 4)
    target = torch.randn_like(conv(x))
    F.mse_loss(layer(x), target).backward()
    att = layer.attention
    for name, param in [
        ("weight", layer.weight),
        ("bias", layer.bias),
        ("p", layer.p),
        ("q", layer.q),
        ("fc_scale", att.fc_scale.weight),
        ("fc_phi", att.fc_phi.weight),
    ]:
        assert param.grad is not None and param.grad.abs().max() > 0, name
    # Both heads being zero, the shared squeeze layers start learning at step 2.
    assert att.fc.weight.grad.abs().max() == 0 and att.se.weight.grad.abs().max() == 0
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    opt.step()
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(layer(x), target).backward()
        opt.step()
    assert att.fc.weight.grad.abs().max() > 0 and att.se.weight.grad.abs().max() > 0
    routing = layer.attention(x).detach()
    lam, phi = routing[:, : layer.out_channels], routing[:, layer.out_channels :]
    assert (lam - lam[:1]).abs().max() > 1e-4, "Lambda does not differ between samples"
    assert (phi - phi[:1]).abs().max() > 1e-4, "Phi does not differ between samples"


def test_from_conv_weight_keyword_bias_training_flag_and_generator():
    conv = _random_conv(_cfg()).eval()
    effective = torch.randn_like(conv.weight)
    a = DCDConv2d.from_conv(conv, weight=effective, generator=torch.Generator().manual_seed(3))
    b = DCDConv2d.from_conv(conv, weight=effective, generator=torch.Generator().manual_seed(3))
    assert not a.training
    assert torch.equal(a.bias, conv.bias)
    for (na, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), na
    x = make_input(_cfg(), 2)
    want = F.conv2d(x, effective, conv.bias, padding=1)
    assert rel_err(a(x), want) < 1e-5


def test_from_conv_scratch_uses_only_the_geometry():
    conv = _random_conv(_cfg())
    layer = DCDConv2d.from_conv(conv, init="scratch")
    assert layer.attention.fc_scale.weight.abs().max() > 0
    assert layer.attention.fc_phi.weight.abs().max() > 0
    assert not torch.equal(layer.weight, conv.weight)


def test_from_conv_rejects_what_it_cannot_take():
    conv = _random_conv(_cfg())
    with pytest.raises(DynifyError, match="num_experts"):
        DCDConv2d.from_conv(conv, num_experts=4)
    with pytest.raises(DynifyError, match="init"):
        DCDConv2d.from_conv(conv, init="upcycle")  # type: ignore[arg-type]
    with pytest.raises(DynifyTypeError):
        DCDConv2d.from_conv(nn.Linear(3, 3))  # type: ignore[arg-type]
    with pytest.raises(DynifyError, match="groups"):
        DCDConv2d.from_conv(nn.Conv2d(6, 6, 3, padding=1, groups=6))
    with pytest.raises(DynifyError, match="padding"):
        DCDConv2d.from_conv(nn.Conv2d(6, 6, 3))
    with pytest.raises(DynifyError, match="shape"):
        DCDConv2d.from_conv(conv, weight=torch.zeros(1))


def test_state_dict_round_trip():
    layer = make_layer(_cfg())
    fresh = DCDConv2d(**_cfg())
    fresh.load_state_dict(layer.state_dict())
    x = make_input(_cfg(), 2)
    assert torch.equal(fresh(x), layer(x))


# -- the DynamicLayer protocol, coverage, sizes --------------------------------------------------


def test_protocol_and_registry():
    layer = make_layer(_cfg())
    assert "dcd" in KINDS and layer_class("dcd") is DCDConv2d
    assert layer.kind == "dcd" and layer.num_experts == 1
    assert not layer.has_temperature
    with pytest.raises(DynifyError, match="temperature"):
        _ = layer.temperature
    routing = layer.attention(make_input(_cfg(), 2))
    assert layer.expert_weights(routing) is None and layer.expert_kernels() is None


def test_rank_and_squeeze_defaults_and_clamps():
    assert DCDConv2d(64, 64, 1).rank == 8 and DCDConv2d(64, 64, 1).squeeze == 4
    assert DCDConv2d(512, 256, 3, padding=1).rank == 22
    assert DCDConv2d(512, 256, 3, padding=1).squeeze == 32
    assert DCDConv2d(3, 16, 3, padding=1).rank == 1
    assert DCDConv2d(64, 4, 1).rank == 4  # at most C_out
    assert DCDConv2d(8, 8, 1, rank=100).rank == 8
    assert DCDConv2d(8, 8, 1, rank=3, reduction=2).squeeze == 4


def _reason(**kw):
    args = {
        "in_channels": 8,
        "out_channels": 8,
        "kernel_size": (3, 3),
        "stride": (1, 1),
        "padding": (1, 1),
        "dilation": (1, 1),
        "groups": 1,
    }
    args.update(kw)
    return DCDConv2d.unsupported_reason(**args)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"stride": (2, 2)},
        {"kernel_size": (1, 1), "padding": (0, 0), "stride": (2, 2)},
        {"kernel_size": (1, 1), "padding": "valid"},
        {"padding": "same"},
        {"kernel_size": (5, 5), "padding": (4, 4), "dilation": (2, 2)},
        {"kernel_size": (3, 1), "padding": (1, 0)},
    ],
)
def test_covered(kw):
    assert _reason(**kw) is None


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"groups": 8}, "depthwise"),
        ({"groups": 2}, "grouped"),
        ({"padding": "valid"}, "same'-style"),
        ({"padding": (0, 0)}, "same'-style"),
        ({"padding": (2, 2)}, "same'-style"),
        ({"kernel_size": (1, 1), "padding": (1, 1)}, "same'-style"),
        ({"same_pad": True}, "TF-'SAME'"),
        ({"kernel_size": (4, 4), "padding": "same"}, "odd kernel"),
        ({"padding": "same", "stride": (2, 2)}, "strided"),
        ({"kernel_size": (2, 2), "padding": (1, 1), "dilation": (2, 2)}, "odd kernel"),
    ],
)
def test_unsupported_reason(kw, match):
    reason = _reason(**kw)
    assert reason is not None and match in reason
    if "same_pad" not in kw:
        with pytest.raises(DynifyError, match=match):
            DCDConv2d(8, 8, **{"kernel_size": 3, "padding": 1, **kw})


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"rank": 0}, "rank"),
        ({"reduction": 0}, "reduction"),
        ({"padding": "full"}, "padding"),
        ({"padding_mode": "mirror"}, "padding_mode"),
        ({"padding": "same", "stride": 2}, "padding"),
        ({"padding": -1}, "padding"),
        ({"kernel_size": 0}, "kernel_size"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    args = {"in_channels": 4, "out_channels": 4, "kernel_size": 3, "padding": 1, **kwargs}
    with pytest.raises(ValueError, match=name):
        DCDConv2d(**args)


@pytest.mark.parametrize("cfg", GRID, ids=_cfg_id)
def test_parameter_count_is_the_built_layers(cfg):
    layer = DCDConv2d(**cfg)
    count = DCDConv2d.parameter_count(
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        kernel_size=cfg["kernel_size"],
        groups=1,
        bias=cfg["bias"],
        reduction=16,
        rank=cfg.get("rank"),
    )
    assert count == sum(p.numel() for p in layer.parameters())


FLOP_CFGS = [
    *GRID,
    _cfg(in_channels=64, out_channels=32, rank=6),
    _cfg(in_channels=40, out_channels=48),
]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("cfg", FLOP_CFGS, ids=_cfg_id)
def test_flop_counter_agrees_with_the_pricing(cfg, layout):
    layer = make_layer(cfg)
    for batch in (1, 2, 8):
        x = make_input(cfg, batch)
        if layout == "channels_last":
            x = x.contiguous(memory_format=CL)
        with FlopCounterMode(display=False) as counter:
            out = layer(x)
        macs, extra, parts = dcd_layer_macs(
            in_channels=layer.in_channels,
            out_channels=layer.out_channels,
            kernel=layer.kernel_size,
            bias=layer.bias is not None,
            squeeze=layer.squeeze,
            rank=layer.rank,
            input_hw=(H, W),
            output_hw=(out.shape[2], out.shape[3]),
            batch=batch,
        )
        assert counter.get_total_flops() == 2 * macs
        assert sum(parts.values()) == macs and extra > 0
        n = out.shape[2] * out.shape[3]
        assert parts["conv"] == batch * n * layer.weight.numel()


# -- tracing, compiling, exporting --------------------------------------------------------------


TRACE_CFG = _cfg(stride=2, padding_mode="reflect")
TRACE_CFGS = [TRACE_CFG, _cfg(in_channels=8, out_channels=40, stride=2)]  # both residual forms


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("cfg", TRACE_CFGS, ids=_cfg_id)
def test_fx_symbolic_trace(cfg, channels_last):
    layer = make_layer(cfg).eval()
    c = cfg["in_channels"]
    model = nn.Sequential(nn.Conv2d(c, c, 1), layer, nn.ReLU()).eval()
    gm = torch.fx.symbolic_trace(model)
    for batch in (1, 2, 5):
        x = make_input(cfg, batch)
        if channels_last:
            x = x.contiguous(memory_format=CL)
        assert torch.equal(gm(x), model(x))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("cfg", TRACE_CFGS, ids=_cfg_id)
def test_export_with_dynamic_batch(cfg, channels_last):
    layer = make_layer(cfg).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    example = make_input(cfg, 3)
    if channels_last:
        example = example.contiguous(memory_format=CL)
    ep = torch.export.export(layer, (example,), dynamic_shapes={"x": {0: batch}})
    exported = ep.module()
    for b in (1, 2, 5, 8):
        x = make_input(cfg, b)
        if channels_last:
            x = x.contiguous(memory_format=CL)
        assert rel_err(exported(x), layer(x)) < 1e-5
        assert rel_err(exported(x), reference(layer, cfg, x.contiguous())) < 1e-5


@pytest.mark.slow
def test_torch_compile_matches_eager():
    layer = make_layer(TRACE_CFG)
    compiled = torch.compile(layer)
    for b in (1, 3, 8):
        x = make_input(TRACE_CFG, b).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        out, want = compiled(x), layer(x2)
        assert rel_err(out, want) < 1e-5
        out.sum().backward()
        want.sum().backward()
        assert rel_err(x.grad, x2.grad) < 1e-5


@pytest.mark.slow
def test_torch_compile_dynamic_inference_channels_last():
    layer = make_layer(TRACE_CFG).eval()
    compiled = torch.compile(layer, dynamic=True)
    with torch.no_grad():
        for b in (1, 3, 8):
            x = make_input(TRACE_CFG, b).contiguous(memory_format=CL)
            assert rel_err(compiled(x), layer(x)) < 1e-5


def test_grid_covers_every_padding_mode_and_both_residual_forms():
    modes = {c["padding_mode"] for c in GRID}
    assert modes == {"zeros", "reflect", "replicate", "circular"}
    assert any(isinstance(c["kernel_size"], tuple) for c in GRID)
    folds = set()
    for c in GRID:
        n = nn.Conv2d(**_conv_kwargs(c))(torch.zeros(1, c["in_channels"], H, W)).shape[2:].numel()
        folds.add(folds_mix(c["out_channels"], n))
    assert folds == {True, False}

"""ODConv2d against an independent reference, from_conv's exactness, routing under training,
tracing, and the cost model's formula against torch's FlopCounterMode.

The reference shares no code with dynify: the four attentions are recomputed by hand from
the attention's parameters, each sample's kernel is the paper's formula taken literally
(``a_f * a_c * a_s * sum_i a_w,i W_i``, the channel attention on the kernel's input axis,
the filter attention on its output axis), and the convolution is ``nn.Conv2d._conv_forward``
of a template conv built from the same constructor arguments, one sample at a time.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dynify.layers.odconv as odconv
from dynify.cost.pricing import odconv_layer_macs
from dynify.layers import ODConv2d
from dynify.layers.kinds import KINDS, layer_class
from dynify.layers.odconv import odconv_hidden_width

CL = torch.channels_last
H, W = 9, 11  # odd and non-square on purpose

# torch's own reference conv warns about even kernels with padding="same"
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


# -- configurations -------------------------------------------------------------------------


def _cfg(**kw) -> dict:
    cfg = {
        "in_channels": 4,
        "out_channels": 6,
        "kernel_size": 3,
        "stride": 1,
        "padding": 0,
        "dilation": 1,
        "groups": 1,
        "bias": True,
        "padding_mode": "zeros",
    }
    cfg.update(kw)
    return cfg


def _cfg_id(cfg: dict) -> str:
    base = _cfg()
    return ",".join(
        f"{k}={v}".replace(" ", "")
        for k, v in cfg.items()
        if v != base[k] or k in ("kernel_size", "padding")
    )


GRID = [
    _cfg(padding=1),
    _cfg(padding=(1, 2), stride=2),
    _cfg(padding="same"),
    _cfg(padding="valid", stride=2),
    _cfg(padding=1, padding_mode="reflect"),
    _cfg(padding=(2, 1), padding_mode="replicate", stride=(2, 1)),
    _cfg(padding="same", padding_mode="circular"),
    _cfg(kernel_size=5, padding=2),
    _cfg(kernel_size=5, padding="same", dilation=2, padding_mode="reflect"),
    _cfg(kernel_size=4, padding="same"),  # even kernel: asymmetric 'same' padding
    _cfg(kernel_size=(1, 3), padding=(0, 1)),  # non-square
    _cfg(kernel_size=(3, 5), padding=(1, 2), stride=2, padding_mode="circular"),
    _cfg(padding=2, dilation=2),
    _cfg(padding=2, dilation=(2, 1), stride=2),
    _cfg(kernel_size=1),  # no spatial attention
    _cfg(kernel_size=1, stride=2, bias=False),
    _cfg(kernel_size=1, groups=2),
    _cfg(groups=2, padding=1),
    _cfg(groups=2, padding="same", padding_mode="reflect", bias=False),
    _cfg(in_channels=6, out_channels=6, groups=6, padding=1),  # depthwise: no filter att.
    _cfg(in_channels=6, out_channels=6, groups=6, padding=1, stride=2, padding_mode="reflect"),
    _cfg(in_channels=6, out_channels=6, groups=6, kernel_size=1),  # 1x1 depthwise
    _cfg(in_channels=4, out_channels=8, groups=4, padding="same"),  # depth multiplier 2
    _cfg(bias=False, padding=1),
    _cfg(in_channels=3, out_channels=8, kernel_size=7, stride=2, padding=3),  # a stem
]
EXPERTS = (1, 2, 4)

SUBSET = [
    _cfg(padding=1),
    _cfg(stride=2, padding=(1, 2), padding_mode="reflect", groups=2),
    _cfg(kernel_size=(1, 3), padding="same", padding_mode="circular"),
    _cfg(kernel_size=1),
    _cfg(in_channels=6, out_channels=6, groups=6, padding=1, bias=False),
]


# -- helpers --------------------------------------------------------------------------------


def make_layer(cfg: dict, num_experts: int = 3, dtype=None, **kw) -> ODConv2d:
    """An ODConv2d whose attentions are clearly non-uniform and sample-dependent."""
    layer = ODConv2d(**cfg, num_experts=num_experts, dtype=dtype, **kw)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        att = layer.attention
        # pre-activations of order 1: the gates neither saturate nor sit at 1/2
        fc, heads = att.fc.weight, att.heads.weight
        fc.copy_(torch.randn(fc.shape, generator=g) / fc.shape[1] ** 0.5)
        heads.copy_(torch.randn(heads.shape, generator=g) * 2 / heads.shape[1] ** 0.5)
        att.heads.bias.copy_(torch.rand(att.heads.bias.shape, generator=g) * 2 - 1)
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
    return layer


def make_input(cfg: dict, batch: int, dtype=None) -> torch.Tensor:
    c = cfg["in_channels"]
    x = torch.randn(batch, c, H, W) + torch.randn(batch, c, 1, 1)
    return x if dtype is None else x.to(dtype)


def reference_attentions(layer: ODConv2d, x: torch.Tensor):
    """(a_c, a_f, a_s, a_w) recomputed by hand, with ones for the absent parts."""
    att = layer.attention
    b = x.shape[0]
    pooled = x.sum(dim=(2, 3)) / (x.shape[2] * x.shape[3])
    hidden = torch.clamp(pooled @ att.fc.weight.t(), min=0)
    z = (hidden @ att.heads.weight.t() + att.heads.bias) / att.temperature
    c, f, s, k = att.sections
    kh, kw = layer.kernel_size
    sig = 1 / (1 + torch.exp(-z[:, : c + f + s]))
    a_c = sig[:, :c]
    a_f = sig[:, c : c + f] if f else torch.ones(b, layer.out_channels, dtype=x.dtype)
    a_s = sig[:, c + f : c + f + s] if s else torch.ones(b, kh * kw, dtype=x.dtype)
    if k:
        e = torch.exp(z[:, c + f + s :] - z[:, c + f + s :].max(1, keepdim=True).values)
        a_w = e / e.sum(1, keepdim=True)
    else:
        a_w = torch.ones(b, 1, dtype=x.dtype)
    return a_c, a_f, a_s, a_w


def reference_kernel(layer: ODConv2d, a_c, a_f, a_s, a_w) -> torch.Tensor:
    """One sample's ``a_f * a_c * a_s * sum_i a_w,i W_i`` (attentions of that sample)."""
    kh, kw = layer.kernel_size
    c_out, c_in, g = layer.out_channels, layer.in_channels, layer.groups
    kernel = sum(a_w[i] * layer.weight[i] for i in range(layer.num_experts))
    kernel = kernel * a_s.reshape(1, 1, kh, kw)
    # the kernel's input axis of output channel o holds the global input channels of o's group
    group = torch.arange(c_out) // (c_out // g)
    channel = group[:, None] * (c_in // g) + torch.arange(c_in // g)[None, :]
    kernel = kernel * a_c[channel][:, :, None, None]
    return kernel * a_f[:, None, None, None]


def reference(layer: ODConv2d, cfg: dict, x: torch.Tensor) -> torch.Tensor:
    template = nn.Conv2d(**{**cfg, "bias": False}, device=x.device, dtype=x.dtype)
    atts = reference_attentions(layer, x)
    outs = []
    for b in range(x.shape[0]):
        kernel = reference_kernel(layer, *(a[b] for a in atts))
        out = template._conv_forward(x[b : b + 1], kernel, None)
        if layer.bias is not None:
            out = out + layer.bias[None, :, None, None]
        outs.append(out)
    return torch.cat(outs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture
def force_strategy(monkeypatch):
    """Force the formulation ``od_conv2d`` picks for a layer with a spatial attention."""

    def force(strategy: str) -> None:
        monkeypatch.setattr(odconv, "choose_strategy", lambda *a, **k: strategy)

    return force


# -- forward against the reference ----------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("num_experts", EXPERTS)
@pytest.mark.parametrize("cfg", GRID, ids=_cfg_id)
def test_forward_matches_reference(cfg, num_experts, batch):
    layer = make_layer(cfg, num_experts)
    x = make_input(cfg, batch)
    a_c, *_ = reference_attentions(layer, x)
    assert (a_c.max(1).values - a_c.min(1).values).min() > 0.02, "channel attention is flat"
    if batch > 1:
        assert (a_c - a_c[:1]).abs().max() > 0.01, "routing does not depend on the sample"
    out = layer(x)
    assert out.shape == nn.Conv2d(**cfg)(x).shape
    assert rel_err(out, reference(layer, cfg, x)) < 1e-5


@pytest.mark.parametrize("strategy", ["folded", "per_sample"])
@pytest.mark.parametrize("cfg", SUBSET, ids=_cfg_id)
def test_each_formulation_with_chunking(cfg, strategy, force_strategy):
    force_strategy(strategy)
    layer = make_layer(cfg, 3)
    x = make_input(cfg, 5)
    want = reference(layer, cfg, x)
    assert rel_err(layer(x), want) < 1e-5
    one_sample = layer.weight[0].numel() * layer.weight.element_size()
    layer.max_kernel_bytes = 2 * one_sample  # chunks of 2, 2, 1
    assert rel_err(layer(x), want) < 1e-5
    with torch.no_grad():  # the scratch-buffer path
        assert rel_err(layer(x), want) < 1e-5
        assert rel_err(layer(x), want) < 1e-5


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("cfg", SUBSET, ids=_cfg_id)
def test_channels_last_in_gives_channels_last_out(cfg, batch):
    layer = make_layer(cfg, 2)
    x = make_input(cfg, batch)
    out = layer(x.contiguous(memory_format=CL))
    assert out.is_contiguous(memory_format=CL)
    assert rel_err(out, layer(x)) < 1e-6


LOW_PRECISION = {torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", list(LOW_PRECISION), ids=str)
@pytest.mark.parametrize("cfg", SUBSET, ids=_cfg_id)
def test_low_precision(cfg, dtype, batch):
    layer = make_layer(cfg, 2).to(dtype)
    x = make_input(cfg, batch, dtype)
    out = layer(x)
    assert out.dtype == dtype
    ref = reference(copy.deepcopy(layer).float(), cfg, x.float())
    assert rel_err(out, ref) < LOW_PRECISION[dtype]
    x.requires_grad_()
    layer(x).float().square().mean().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    assert torch.isfinite(layer.weight.grad).all()


# -- gradients ------------------------------------------------------------------------------


GRAD_CASES = [
    (_cfg(in_channels=3, out_channels=4, padding=1), 2),
    (_cfg(kernel_size=(1, 3), stride=2, padding=1, padding_mode="reflect", groups=2), 1),
    (_cfg(in_channels=3, out_channels=4, kernel_size=1), 3),
    (_cfg(in_channels=4, out_channels=4, groups=4, padding="same", bias=False), 2),
]


@pytest.mark.parametrize(
    ("batch", "strategy"), [(1, "single"), (2, "folded"), (3, "folded"), (3, "per_sample")]
)
@pytest.mark.parametrize(("cfg", "num_experts"), GRAD_CASES, ids=lambda c: str(c))
def test_gradcheck(cfg, num_experts, batch, strategy, force_strategy):
    """float64 gradients with respect to the input and every parameter (fast mode: random
    projections of the Jacobian; the attention alone has hundreds of parameters). At batch
    3, chunks of 2 and 1 samples."""
    force_strategy(strategy)
    layer = make_layer(cfg, num_experts).double()
    if batch == 3:
        layer.max_kernel_bytes = 2 * layer.weight[0].numel() * layer.weight.element_size()
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for _, p in layer.named_parameters())
    x = torch.randn(batch, cfg["in_channels"], 5, 6, dtype=torch.float64) + 0.5
    x.requires_grad_()

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)


def test_gradcheck_full_jacobian():
    """One small case with the full Jacobian, input and the experts and gates' heads."""
    cfg = _cfg(in_channels=2, out_channels=2, kernel_size=(2, 3), padding=1, groups=2)
    layer = make_layer(cfg, 2).double()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    weight = layer.weight.detach().clone().requires_grad_()
    heads = layer.attention.heads.bias.detach().clone().requires_grad_()

    def f(x, weight, heads):
        ps = {"weight": weight, "attention.heads.bias": heads}
        return torch.func.functional_call(layer, ps, (x,))

    assert torch.autograd.gradcheck(f, (x, weight, heads))


@pytest.mark.parametrize("num_experts", [1, 4])
@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_gradients_match_reference(chunk, num_experts):
    cfg = _cfg(groups=2, padding=1, padding_mode="circular")
    layer = make_layer(cfg, num_experts)
    if chunk is not None:
        layer.max_kernel_bytes = chunk * layer.weight[0].numel() * layer.weight.element_size()
    x = make_input(cfg, 4).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    layer(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    reference(layer, cfg, x2).square().sum().backward()
    assert rel_err(x.grad, x2.grad) < 1e-5
    for n, p in layer.named_parameters():
        assert rel_err(grads[n], p.grad) < 1e-5, n


@pytest.mark.parametrize("num_experts", [1, 4])
def test_autograd_does_not_save_the_per_sample_kernels(num_experts):
    """Under autograd the batch's kernels are rebuilt in backward, not kept: what the graph
    saves is the input, the attentions and the experts, whatever the batch."""
    layer = ODConv2d(32, 32, 3, padding=1, num_experts=num_experts)
    x = torch.randn(16, 32, 4, 4, requires_grad=True)
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    kernels = x.shape[0] * layer.weight[0].numel()
    assert max(saved) < kernels, (max(saved), kernels)
    out.square().sum().backward()
    assert layer.weight.grad is not None and x.grad is not None


# -- from_conv ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("num_experts", EXPERTS)
@pytest.mark.parametrize("cfg", GRID, ids=_cfg_id)
def test_from_conv_is_exact(cfg, num_experts, batch, dtype):
    conv = nn.Conv2d(**cfg, dtype=dtype)
    layer = ODConv2d.from_conv(conv, num_experts=num_experts)
    assert layer.weight.dtype == dtype
    x = make_input(cfg, batch, dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for training in (True, False):
        layer.train(training)
        conv.train(training)
        with torch.no_grad():
            want = conv(x)
        assert rel_err(layer(x), want) < tol
    if num_experts > 1:
        w = layer.expert_weights(layer.attention(x))
        assert (w.max(1).values - w.min(1).values).max() > 0.01, "the kernel head is not random"


@pytest.mark.parametrize(("cfg", "n"), [
    (_cfg(padding=1), 3),
    (_cfg(kernel_size=1), 2),
    (_cfg(in_channels=6, out_channels=6, groups=6, padding=1), 2),
    (_cfg(in_channels=6, out_channels=6, groups=6, kernel_size=1), 1),
])  # fmt: skip
def test_from_conv_gates_are_one_half_and_experts_scaled_by_two_to_the_n(cfg, n):
    conv = nn.Conv2d(**cfg)
    layer = ODConv2d.from_conv(conv, num_experts=2)
    routing = layer.attention(make_input(cfg, 4))
    s = layer.attention.num_sigmoid
    assert torch.equal(routing[:, :s], torch.full_like(routing[:, :s], 0.5))
    assert torch.equal(layer.weight[0], conv.weight * 2**n)
    assert torch.equal(layer.weight[1], layer.weight[0])
    assert torch.equal(layer.bias, conv.bias)


def test_from_conv_options():
    conv = nn.Conv2d(4, 6, 3, padding=1).eval()
    eff = torch.randn_like(conv.weight)
    layer = ODConv2d.from_conv(conv, num_experts=2, weight=eff, temperature=5.0)
    assert not layer.training and layer.temperature == 5.0
    assert torch.equal(layer.weight[0], eff * 8)
    a = ODConv2d.from_conv(conv, generator=torch.Generator().manual_seed(1))
    b = ODConv2d.from_conv(conv, generator=torch.Generator().manual_seed(1))
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), n
    wide = ODConv2d.from_conv(conv, routing_std=10.0, generator=torch.Generator().manual_seed(1))
    s = a.attention.num_sigmoid
    assert torch.allclose(wide.attention.heads.weight[s:], 10 * a.attention.heads.weight[s:])
    scratch = ODConv2d.from_conv(conv, init="scratch")
    assert not torch.equal(scratch.weight[0], scratch.weight[1])
    with pytest.raises(ValueError, match="init"):
        ODConv2d.from_conv(conv, init="perturb")
    with pytest.raises(ValueError, match="routing_std"):
        ODConv2d.from_conv(conv, routing_std=-1.0)
    with pytest.raises(TypeError):
        ODConv2d.from_conv(nn.Linear(3, 3))


@pytest.mark.parametrize("num_experts", [1, 4])
@pytest.mark.parametrize("cfg", [_cfg(padding=1), _cfg(kernel_size=1),
                                 _cfg(in_channels=6, out_channels=6, groups=6, padding=1)],
                         ids=_cfg_id)  # fmt: skip
def test_from_conv_routes_under_training(cfg, num_experts):
    """A few SGD steps from the exact start: the attentions differ between samples and
    move, and the experts separate (K > 1). Batch 1 trains as well (no BatchNorm)."""
    torch.manual_seed(3)
    conv = nn.Conv2d(**cfg)
    layer = ODConv2d.from_conv(conv, num_experts=num_experts).train()
    x = make_input(cfg, 8)
    target = torch.randn_like(conv(x))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    fc_before = layer.attention.fc.weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(layer(x), target).backward()
        opt.step()
    with torch.no_grad():
        routing = layer.attention(x)
    s = layer.attention.num_sigmoid
    gates = routing[:, :s]
    assert (gates - 0.5).abs().max() > 1e-3, "the gates did not move"
    assert (gates - gates[:1]).abs().amax(1)[1:].min() > 1e-4, "the gates do not differ per sample"
    assert not torch.equal(layer.attention.fc.weight, fc_before), "the shared fc did not learn"
    if num_experts > 1:
        w = layer.weight
        assert min((w[i] - w[j]).abs().max() for i in range(4) for j in range(i)) > 1e-4
    # batch 1 in training mode
    opt.zero_grad()
    layer(x[:1]).square().mean().backward()
    assert torch.isfinite(layer.attention.heads.weight.grad).all()


# -- the layer's protocol -------------------------------------------------------------------


@pytest.mark.parametrize("num_experts", EXPERTS)
@pytest.mark.parametrize("cfg", SUBSET, ids=_cfg_id)
def test_protocol(cfg, num_experts):
    layer = make_layer(cfg, num_experts)
    x = make_input(cfg, 3)
    routing = layer.attention(x)
    c, f, s, k = layer.attention.sections
    assert routing.shape == (3, c + f + s + k)
    assert torch.equal(layer(x), layer.forward_routed(x, routing))
    weights = layer.expert_weights(routing)
    if num_experts == 1:
        assert weights is None and k == 0
    else:
        assert weights.shape == (3, num_experts)
        assert torch.allclose(weights.sum(1), torch.ones(3))
    kh, kw = layer.kernel_size
    per_group = cfg["in_channels"] // cfg["groups"]
    assert layer.expert_kernels().shape == (num_experts, cfg["out_channels"], per_group, kh, kw)
    assert layer.kind == "odconv" and layer.num_experts == num_experts
    assert f == (0 if cfg["in_channels"] == cfg["groups"] == cfg["out_channels"] else 6)
    assert s == (0 if kh * kw == 1 else kh * kw)
    # the frozen-routing semantics: a routing of another input changes the output
    other = layer.attention(make_input(cfg, 3))
    assert not torch.allclose(layer.forward_routed(x, other), layer(x))


def test_registered_and_exported():
    import dynify.layers

    assert "odconv" in KINDS and layer_class("odconv") is ODConv2d
    assert dynify.layers.ODConv2d is ODConv2d
    kw = {"in_channels": 4, "out_channels": 4, "kernel_size": (3, 3), "stride": (1, 1),
          "padding": (1, 1), "dilation": (1, 1), "groups": 1}  # fmt: skip
    assert ODConv2d.unsupported_reason(**kw) is None
    assert "SAME" in ODConv2d.unsupported_reason(**kw, same_pad=True)


def test_hidden_width_and_temperature():
    assert odconv_hidden_width(64, 16) == 16 and odconv_hidden_width(2048, 16) == 128
    assert ODConv2d(512, 8, 3).attention.hidden == 32
    assert ODConv2d(512, 8, 3, reduction=4).attention.hidden == 128
    cfg = _cfg(padding=1)
    layer = make_layer(cfg, 3)
    x = make_input(cfg, 2)
    assert layer.has_temperature and layer.temperature == 1.0
    layer.temperature = 4.0
    assert layer.temperature == 4.0 and "temperature" in layer.attention.state_dict()
    assert rel_err(layer(x), reference(layer, cfg, x)) < 1e-5
    with pytest.raises(ValueError, match="temperature"):
        layer.temperature = 0.0
    fresh = ODConv2d(**cfg, num_experts=3)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), layer(x))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_experts": 0}, "num_experts"),
        ({"reduction": 0}, "reduction"),
        ({"in_channels": 5, "groups": 2}, "groups"),
        ({"out_channels": 5, "groups": 2}, "groups"),
        ({"padding": "full"}, "padding"),
        ({"padding_mode": "mirror"}, "padding_mode"),
        ({"padding": "same", "stride": 2}, "padding"),
        ({"kernel_size": 0}, "kernel_size"),
        ({"temperature": -1.0}, "temperature"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ODConv2d(**{"in_channels": 4, "out_channels": 4, "kernel_size": 3, **kwargs})


def test_reset_parameters_is_the_reference_init():
    layer = ODConv2d(64, 32, 3, num_experts=4)
    std = (2 / (32 * 9)) ** 0.5  # kaiming_normal_ fan_out, relu
    assert abs(float(layer.weight.detach().std()) / std - 1) < 0.05
    assert torch.equal(layer.attention.heads.bias, torch.zeros_like(layer.attention.heads.bias))
    a = ODConv2d(8, 8, 3, device="meta").to_empty(device="cpu")
    b = ODConv2d(8, 8, 3, device="meta").to_empty(device="cpu")
    a.reset_parameters(generator=torch.Generator().manual_seed(2))
    b.reset_parameters(generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


# -- parameters and cost ----------------------------------------------------------------------


@pytest.mark.parametrize("reduction", [1, 4, 16])
@pytest.mark.parametrize("num_experts", EXPERTS)
@pytest.mark.parametrize("cfg", GRID, ids=_cfg_id)
def test_parameter_count(cfg, num_experts, reduction):
    layer = ODConv2d(**cfg, num_experts=num_experts, reduction=reduction, device="meta")
    count = ODConv2d.parameter_count(
        in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
        kernel_size=cfg["kernel_size"], groups=cfg["groups"], bias=cfg["bias"],
        experts=num_experts, reduction=reduction,
    )  # fmt: skip
    assert count == sum(p.numel() for p in layer.parameters())


FLOP_CASES = [
    *GRID,
    _cfg(in_channels=32, out_channels=32, kernel_size=1),
    _cfg(in_channels=256, out_channels=128, kernel_size=1),  # 1x1 K>1 on a small map: stacked
    _cfg(in_channels=40, out_channels=24, kernel_size=3, padding=1, groups=8),
]


def _flops(layer: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        layer(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("num_experts", EXPERTS)
@pytest.mark.parametrize("cfg", FLOP_CASES, ids=_cfg_id)
def test_pricing_agrees_with_flop_counter(cfg, num_experts):
    layer = ODConv2d(**cfg, num_experts=num_experts)
    size = (4, 4) if cfg["in_channels"] == 256 else (H, W)
    for batch, grad in itertools.product((1, 2, 8), (False, True)):
        x = torch.randn(batch, cfg["in_channels"], *size)
        with torch.set_grad_enabled(grad):
            flops = _flops(layer, x)
            out = layer(x)
        macs, extra, parts = odconv_layer_macs(
            in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
            kernel_size=layer.kernel_size, groups=cfg["groups"], bias=cfg["bias"],
            experts=num_experts, hidden=layer.attention.hidden, input_hw=size,
            output_hw=tuple(out.shape[2:]), batch=batch,
        )  # fmt: skip
        assert flops == 2 * macs, (batch, grad, parts)
        assert macs == sum(parts.values()) and extra > 0
        static = cfg["out_channels"] * cfg["in_channels"] // cfg["groups"] * out[0, 0].numel()
        assert parts["conv"] >= static * layer.kernel_size[0] * layer.kernel_size[1] * batch
    if cfg["in_channels"] == 256 and num_experts > 1:
        assert "output_mix" in parts  # the stacked formulation was priced (and counted)


# -- tracing, compiling, exporting ----------------------------------------------------------


TRACE_CASES = [
    (_cfg(padding=1, padding_mode="reflect", groups=2), 4),
    (_cfg(kernel_size=1), 4),
    (_cfg(kernel_size=1), 1),
    (_cfg(in_channels=6, out_channels=6, groups=6, padding="same"), 1),
]


@pytest.mark.parametrize(("cfg", "num_experts"), TRACE_CASES, ids=lambda c: str(c))
def test_fx_symbolic_trace(cfg, num_experts):
    c = cfg["in_channels"]
    layer = make_layer(cfg, num_experts).eval()
    model = nn.Sequential(nn.Conv2d(c, c, 1), layer, nn.ReLU()).eval()
    gm = torch.fx.symbolic_trace(model)
    for batch in (1, 2, 5):
        x = make_input(cfg, batch)
        assert torch.equal(gm(x), model(x))


@pytest.mark.parametrize(("cfg", "num_experts"), TRACE_CASES[:2], ids=lambda c: str(c))
def test_export_with_dynamic_batch(cfg, num_experts):
    layer = make_layer(cfg, num_experts).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(layer, (make_input(cfg, 3),), dynamic_shapes={"x": {0: batch}})
    exported = ep.module()
    for b in (1, 2, 5, 8):
        x = make_input(cfg, b)
        assert rel_err(exported(x), reference(layer, cfg, x)) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize(("cfg", "num_experts"), TRACE_CASES[:2], ids=lambda c: str(c))
def test_torch_compile_matches_eager(cfg, num_experts):
    layer = make_layer(cfg, num_experts)
    compiled = torch.compile(layer)
    for b in (1, 3, 8):
        x = make_input(cfg, b).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        out, want = compiled(x), layer(x2)
        assert rel_err(out, want) < 1e-5
        out.sum().backward()
        want.sum().backward()
        assert rel_err(x.grad, x2.grad) < 1e-5
    with torch.no_grad():
        dynamic = torch.compile(layer.eval(), dynamic=True)
        for b in (1, 3, 8):
            x = make_input(cfg, b)
            assert rel_err(dynamic(x), reference(layer, cfg, x)) < 1e-5


@pytest.mark.parametrize("experts", [1, 2, 4])
@pytest.mark.parametrize("groups", [1, 2])
def test_the_unfolded_formulation_on_tiny_maps_computes_the_same(experts, groups) -> None:
    """On a tiny map at batch > 1 (the deep layers of a 32x32 network) every expert is
    applied to the unfolded input at once; it must equal each sample convolved alone with
    its own kernel (the batch-1 path), forward and backward, and be priced as it runs."""
    from torch.utils.flop_counter import FlopCounterMode

    from dynify.cost.pricing import odconv_layer_macs
    from dynify.layers.odconv import od_runs_unfolded, odconv_hidden_width

    torch.manual_seed(0)
    layer = ODConv2d(64, 64, 3, padding=1, groups=groups, num_experts=experts, reduction=4)
    with torch.no_grad():
        layer.attention.heads.weight.normal_(0, 0.5)
    x = torch.randn(3, 64, 4, 4, requires_grad=True)
    numel = layer.weight[0].numel()
    assert od_runs_unfolded(3, experts, numel, 16, groups) == (groups == 1)
    out = layer(x)
    singles = torch.cat([layer(x[i : i + 1]) for i in range(3)])
    assert torch.allclose(out, singles, rtol=1e-4, atol=1e-5)
    cotangent = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, layer.weight, layer.attention.heads.weight], cotangent)
    ref = torch.autograd.grad(singles, [x, layer.weight, layer.attention.heads.weight], cotangent)
    for g, r in zip(grads, ref, strict=True):
        assert torch.allclose(g, r, rtol=1e-3, atol=1e-4)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        layer(x)
    macs, _, _ = odconv_layer_macs(
        in_channels=64, out_channels=64, kernel_size=(3, 3), groups=groups, bias=True,
        experts=experts, hidden=odconv_hidden_width(64, 4), input_hw=(4, 4),
        output_hw=(4, 4), batch=3,
    )  # fmt: skip
    assert counter.get_total_flops() == 2 * macs

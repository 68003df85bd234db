"""DynamicConv2d against independent references.

The reference is deliberately naive and shares no code with dynify: the routing is recomputed
by hand from the attention's parameters, each sample's kernel is ``sum_k pi_k W_k`` (bias
likewise), and the convolution is ``nn.Conv2d._conv_forward`` of a template conv built from
the same constructor arguments, so torch itself handles every padding form and mode.
"""

from __future__ import annotations

import copy
import gc
import itertools
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynify.layers._functional as functional
from dynify import DynamicConv2d
from dynify.layers import choose_strategy, dynamic_conv2d

CL = torch.channels_last
MODES = ("zeros", "reflect", "replicate", "circular")
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
    parts = [
        f"{k}={v}".replace(" ", "")
        for k, v in cfg.items()
        if v != base[k] or k in ("padding", "stride")
    ]
    return ",".join(parts)


def _grid() -> list[dict]:
    cfgs = []
    for padding, mode in itertools.product([0, 1, (1, 2), "same", "valid"], MODES):
        for stride in (1, 2):
            if padding == "same" and stride != 1:
                continue
            cfgs.append(_cfg(stride=stride, padding=padding, padding_mode=mode))
    cfgs += [
        _cfg(kernel_size=(3, 5), padding=(1, 2)),
        _cfg(kernel_size=(3, 5), padding=(2, 1), stride=(2, 1), padding_mode="reflect"),
        _cfg(kernel_size=4, padding="same"),  # even kernel: asymmetric 'same' padding
        _cfg(kernel_size=4, padding="same", padding_mode="reflect"),
        _cfg(kernel_size=(2, 3), padding="same", padding_mode="circular"),
        _cfg(padding="same", dilation=2),
        _cfg(padding="same", dilation=(2, 1), padding_mode="replicate"),
        _cfg(padding=2, dilation=2),
        _cfg(padding=2, dilation=2, stride=2, padding_mode="circular"),
        _cfg(kernel_size=1),
        _cfg(kernel_size=1, stride=2),
        _cfg(groups=2, padding=1),
        _cfg(groups=2, stride=2, padding=1, padding_mode="replicate"),
        _cfg(in_channels=6, out_channels=6, groups=6, padding=1),  # depthwise
        _cfg(in_channels=6, out_channels=6, groups=6, padding=1, stride=2, padding_mode="reflect"),
        _cfg(in_channels=4, out_channels=8, groups=4, padding="same"),  # depth multiplier 2
        _cfg(bias=False, padding=1),
        _cfg(bias=False, groups=2, padding="same", padding_mode="circular"),
        _cfg(in_channels=3, out_channels=8, kernel_size=7, stride=2, padding=3),  # a stem
    ]
    return cfgs


GRID = _grid()
# A handful of representative configurations for the more expensive axes.
SUBSET = [
    _cfg(padding=1),
    _cfg(stride=2, padding=(1, 2), padding_mode="reflect"),
    _cfg(kernel_size=4, padding="same", padding_mode="circular"),
    _cfg(groups=2, padding=1, dilation=2, padding_mode="replicate"),
    _cfg(in_channels=6, out_channels=6, groups=6, padding=1, bias=False),
]


# -- helpers --------------------------------------------------------------------------------


def make_layer(cfg: dict, attention: str = "softmax", num_experts: int = 3, **kw):
    """A DynamicConv2d whose attention is clearly non-uniform and sample-dependent."""
    layer = DynamicConv2d(**cfg, num_experts=num_experts, attention=attention, **kw)
    g = torch.Generator().manual_seed(7)  # this module's own stream: one draw per weight
    with torch.no_grad():
        layer.attention.fc1.weight.normal_(0.0, 1.0, generator=g)
        layer.attention.fc1.bias.uniform_(0.0, 1.0, generator=g)  # hidden units active
        layer.attention.fc2.weight.normal_(0.0, 1.0, generator=g)
        # distinct expert preferences, plus the sample-dependent part from the weights
        layer.attention.fc2.bias.copy_(torch.linspace(-1.5, 1.5, num_experts))
        if layer.bias is not None:
            layer.bias.normal_(0.0, 1.0)
    return layer


def make_input(cfg: dict, batch: int, dtype=None) -> torch.Tensor:
    # A per-sample, per-channel offset makes the pooled features (hence the routing) differ
    # clearly between samples.
    c = cfg["in_channels"]
    x = torch.randn(batch, c, H, W) + torch.randn(batch, c, 1, 1)
    return x if dtype is None else x.to(dtype)


def reference_routing(layer: DynamicConv2d, x: torch.Tensor, temperature=None) -> torch.Tensor:
    att = layer.attention
    t = float(att.temperature) if temperature is None else temperature
    pooled = x.sum(dim=(2, 3)) / (x.shape[2] * x.shape[3])
    hidden = torch.clamp(pooled @ att.fc1.weight.t() + att.fc1.bias, min=0)
    z = (hidden @ att.fc2.weight.t() + att.fc2.bias) / t
    if att.kind == "softmax":
        return torch.exp(z - z.max(1, keepdim=True).values) / torch.exp(
            z - z.max(1, keepdim=True).values
        ).sum(1, keepdim=True)
    return 1 / (1 + torch.exp(-z))


def reference(layer: DynamicConv2d, cfg: dict, x: torch.Tensor, temperature=None):
    """Per-sample loop of torch's own Conv2d._conv_forward with the mixed kernel and bias."""
    template = nn.Conv2d(**cfg, device=x.device, dtype=x.dtype)
    pi = reference_routing(layer, x, temperature)
    outs = []
    for b in range(x.shape[0]):
        kernel = sum(pi[b, k] * layer.weight[k] for k in range(layer.num_experts))
        bias = None
        if layer.bias is not None:
            bias = sum(pi[b, k] * layer.bias[k] for k in range(layer.num_experts))
        outs.append(template._conv_forward(x[b : b + 1], kernel, bias))
    return torch.cat(outs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def per_sample_kernel_bytes(layer: DynamicConv2d) -> int:
    return layer.weight[0].numel() * layer.weight.element_size()


@pytest.fixture
def force_strategy(monkeypatch):
    """Force ``dynamic_conv2d``'s choice of formulation for calls with B > 1."""

    def force(strategy: str) -> None:
        monkeypatch.setattr(functional, "choose_strategy", lambda *a, **k: strategy)

    return force


@pytest.fixture
def mix_calls(monkeypatch):
    """Record the batch size of every kernel-mixing call (i.e. the chunk sizes)."""
    calls: list[int] = []
    original = functional.mix_kernels

    def spy(routing, weight, **kwargs):
        calls.append(routing.shape[0])
        return original(routing, weight, **kwargs)

    monkeypatch.setattr(functional, "mix_kernels", spy)
    return calls


def _assert_routing_is_informative(layer, x):
    pi = reference_routing(layer, x)
    spread = (pi.max(1).values - pi.min(1).values).min()
    assert spread > 0.03, "the test's attention is nearly uniform: mixing would go untested"
    if x.shape[0] > 1:
        assert (pi - pi[:1]).abs().max() > 0.01, "routing does not depend on the sample"


# -- forward against the reference ----------------------------------------------------------


@pytest.mark.parametrize("attention", ["softmax", "sigmoid"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("cfg", GRID, ids=_cfg_id)
def test_forward_matches_reference(cfg, batch, attention):
    layer = make_layer(cfg, attention)
    x = make_input(cfg, batch)
    _assert_routing_is_informative(layer, x)
    out = layer(x)
    ref = reference(layer, cfg, x)
    assert out.shape == nn.Conv2d(**cfg)(x).shape
    assert out.dtype == x.dtype
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced", "sliced_cl"])
@pytest.mark.parametrize("cfg", SUBSET, ids=_cfg_id)
def test_memory_layouts(cfg, layout, batch):
    layer = make_layer(cfg)
    c = cfg["in_channels"]
    if layout == "channels_last":
        x = make_input(cfg, batch).contiguous(memory_format=CL)
    elif layout == "transposed":
        x = (torch.randn(batch, c, W, H) + torch.randn(batch, c, 1, 1)).transpose(2, 3)
    elif layout == "sliced":
        x = torch.randn(batch, 2 * c, H + 2, W)[:, ::2, 1:-1]
    else:
        x = torch.randn(batch, 2 * c, H + 2, W).contiguous(memory_format=CL)[:, ::2, 1:-1]
    assert x.shape == (batch, c, H, W)
    if layout != "channels_last":
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=CL)
    out = layer(x)
    assert rel_err(out, reference(layer, cfg, x.contiguous())) < 1e-5
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("strategy", ["folded", "per_sample", "stacked"])
@pytest.mark.parametrize("cfg", SUBSET[:3], ids=_cfg_id)
def test_channels_last_in_gives_channels_last_out(cfg, strategy, force_strategy):
    force_strategy(strategy)
    layer = make_layer(cfg, max_kernel_bytes=2 * per_sample_kernel_bytes(make_layer(cfg)))
    x = make_input(cfg, 5).contiguous(memory_format=CL).requires_grad_()
    out = layer(x)
    assert out.is_contiguous(memory_format=CL)
    out.sum().backward()
    assert rel_err(out, reference(layer, cfg, x.detach())) < 1e-5


LOW_PRECISION = {torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("attention", ["softmax", "sigmoid"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", list(LOW_PRECISION), ids=str)
@pytest.mark.parametrize("cfg", SUBSET, ids=_cfg_id)
def test_low_precision(cfg, dtype, batch, attention):
    layer = make_layer(cfg, attention).to(dtype)
    x = make_input(cfg, batch, dtype)
    out = layer(x)
    assert out.dtype == dtype
    # Reference in float32 from the very same (rounded) parameters and input.
    ref = reference(copy.deepcopy(layer).float(), cfg, x.float())
    assert rel_err(out, ref) < LOW_PRECISION[dtype]
    # Backward runs in the low precision too and produces finite gradients.
    x.requires_grad_()
    layer(x).float().square().mean().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    assert torch.isfinite(layer.weight.grad).all()


# -- strategies and chunking ----------------------------------------------------------------


def test_choose_strategy_batch_of_one_is_single():
    assert choose_strategy(1, (4, 64, 64, 3, 3), (56, 56), (56, 56), 1) == "single"
    assert choose_strategy(1, (4, 512, 512, 3, 3), (1, 1), (1, 1), 1) == "single"


@pytest.mark.parametrize(
    ("weight_shape", "in_hw", "out_hw", "groups", "expected"),
    [
        # dense and big enough for oneDNN to run each sample at full speed
        ((4, 64, 64, 3, 3), (56, 56), (56, 56), 1, "per_sample"),
        ((4, 512, 512, 3, 3), (7, 7), (7, 7), 1, "per_sample"),
        # depthwise: per-sample calls would each do very little
        ((4, 96, 1, 3, 3), (7, 7), (7, 7), 96, "folded"),
        # a batch-of-one 64x16x16 input goes to PyTorch's reference conv, not oneDNN, which
        # loses to the folded grouped conv for narrow layers
        ((4, 64, 64, 3, 3), (16, 16), (16, 16), 1, "folded"),
        ((4, 64, 64, 3, 3), (8, 8), (8, 8), 1, "folded"),
        # tiny output maps with big kernels: mix outputs rather than kernels
        ((4, 512, 512, 3, 3), (1, 1), (1, 1), 1, "stacked"),
        ((4, 256, 256, 3, 3), (2, 2), (2, 2), 1, "stacked"),
        ((4, 128, 128, 3, 3), (4, 4), (4, 4), 1, "stacked"),
        ((4, 512, 256, 3, 3), (4, 4), (2, 2), 1, "stacked"),
        # ... unless the extra convolutions outweigh it (more experts or positions)
        ((8, 128, 128, 3, 3), (4, 4), (4, 4), 1, "per_sample"),
        ((4, 256, 256, 3, 3), (8, 8), (8, 8), 1, "per_sample"),
        # small kernels stay in cache when mixed
        ((4, 16, 16, 3, 3), (2, 2), (2, 2), 1, "folded"),
    ],
)
def test_choose_strategy_by_shape(weight_shape, in_hw, out_hw, groups, expected):
    for batch in (2, 32):
        assert choose_strategy(batch, weight_shape, in_hw, out_hw, groups) == expected


@pytest.mark.parametrize("strategy", ["folded", "per_sample"])
@pytest.mark.parametrize("cfg", SUBSET, ids=_cfg_id)
def test_each_strategy_with_chunking(cfg, strategy, force_strategy, mix_calls):
    force_strategy(strategy)
    probe = make_layer(cfg)
    layer = make_layer(cfg, max_kernel_bytes=2 * per_sample_kernel_bytes(probe) + 1)
    x = make_input(cfg, 5)
    with torch.no_grad():
        out = layer(x)
    assert mix_calls == [2, 2, 1], "the batch of 5 was not processed in chunks of 2"
    assert rel_err(out, reference(layer, cfg, x)) < 1e-5


@pytest.mark.parametrize("strategy", ["folded", "per_sample"])
def test_default_budget_does_not_chunk_small_layers(strategy, force_strategy, mix_calls):
    force_strategy(strategy)
    cfg = _cfg(padding=1)
    layer = make_layer(cfg)
    x = make_input(cfg, 5)
    with torch.no_grad():
        out = layer(x)
    assert mix_calls == [5]
    assert rel_err(out, reference(layer, cfg, x)) < 1e-5


def test_single_strategy_at_batch_one(mix_calls):
    cfg = _cfg(padding=1, padding_mode="reflect")
    layer = make_layer(cfg, max_kernel_bytes=1)  # the budget cannot split a single sample
    x = make_input(cfg, 1)
    out = layer(x)
    assert mix_calls == [1]
    assert rel_err(out, reference(layer, cfg, x)) < 1e-5


def test_scratch_reuse_never_corrupts_results(force_strategy):
    """Kernels mixed into the reused scratch buffer: earlier outputs stay intact, in any
    grad mode, across layers, dtypes and an inference_mode first call."""
    # 147 kB kernels: above the size from which the scratch buffer is used
    cfgs = [
        _cfg(in_channels=64, out_channels=64, padding=1),
        _cfg(in_channels=128, out_channels=64, groups=2, padding=1),
    ]
    assert all(
        per_sample_kernel_bytes(make_layer(c)) >= functional._SCRATCH_MIN_BYTES for c in cfgs
    )
    layers = [
        make_layer(c, max_kernel_bytes=2 * per_sample_kernel_bytes(make_layer(c))) for c in cfgs
    ]
    results = []
    with torch.inference_mode():  # the scratch buffer may first be created in here
        x = make_input(cfgs[0], 1)
        results.append((layers[0], cfgs[0], x, layers[0](x)))
    for strategy in ("folded", "per_sample"):
        force_strategy(strategy)
        for batch in (1, 5):
            for layer, cfg in zip(layers, cfgs, strict=True):
                x = make_input(cfg, batch)
                with torch.no_grad():
                    results.append((layer, cfg, x, layer(x)))
                results.append((layer, cfg, x, layer(x)))  # grad mode
                results.append((layer.double(), cfg, x.double(), layer(x.double())))
                layer.float()
    with torch.no_grad():
        for layer, cfg, x, out in results:
            assert rel_err(out, reference(layer.to(x.dtype), cfg, x)) < 1e-5
            layer.float()


def test_threads_do_not_share_scratch(force_strategy):
    force_strategy("per_sample")
    cfg = _cfg(in_channels=64, out_channels=64, padding=1)
    layer = make_layer(cfg)
    assert per_sample_kernel_bytes(layer) >= functional._SCRATCH_MIN_BYTES
    inputs = [make_input(cfg, b) for b in (1, 3, 1, 4)]
    with torch.no_grad():
        want = [layer(x) for x in inputs]

    def work(i: int):
        with torch.no_grad():
            return [torch.equal(layer(inputs[i]), want[i]) for _ in range(20)]

    with ThreadPoolExecutor(4) as pool:
        assert all(all(r) for r in pool.map(work, range(4)))


# -- autograd -------------------------------------------------------------------------------


GRAD_CASES = [
    _cfg(padding=1),
    _cfg(stride=2, padding=1, padding_mode="reflect", groups=2),
    _cfg(in_channels=6, out_channels=6, groups=6, padding="same", dilation=2),
]


def _grads(layer: nn.Module, x: torch.Tensor, out: torch.Tensor, g: torch.Tensor) -> dict:
    (out * g).sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}
    if x.requires_grad:
        grads["input"] = x.grad
    return grads


@pytest.mark.parametrize("needs", ["all", "input_only", "params_only"])
@pytest.mark.parametrize("attention", ["softmax", "sigmoid"])
@pytest.mark.parametrize("strategy", ["single", "folded", "per_sample", "stacked"])
@pytest.mark.parametrize("cfg", GRAD_CASES, ids=_cfg_id)
def test_gradients_match_reference(cfg, strategy, attention, needs, force_strategy):
    torch.set_default_dtype(torch.float64)
    try:
        batch = 1 if strategy == "single" else 5
        if strategy != "single":
            force_strategy(strategy)
        probe = make_layer(cfg)
        layer = make_layer(
            cfg, attention, max_kernel_bytes=2 * per_sample_kernel_bytes(probe)
        )  # chunks of 2, so the backward re-mixes 3 chunks
        if needs == "input_only":
            layer.requires_grad_(False)
        twin = copy.deepcopy(layer)
        x = make_input(cfg, batch).requires_grad_(needs != "params_only")
        x2 = x.detach().clone().requires_grad_(x.requires_grad)
        out = layer(x)
        g = torch.randn_like(out)
        got = _grads(layer, x, out, g)
        want = _grads(twin, x2, reference(twin, cfg, x2), g)
    finally:
        torch.set_default_dtype(torch.float32)
    assert got.keys() == want.keys() and got
    for name in want:
        assert got[name] is not None, name
        assert rel_err(got[name], want[name]) < 1e-10, name


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("strategy", ["folded", "per_sample"])
def test_gradients_in_one_chunk(strategy, channels_last, force_strategy, mix_calls):
    force_strategy(strategy)
    cfg = _cfg(padding=1, stride=2, padding_mode="circular")
    torch.set_default_dtype(torch.float64)
    try:
        layer = make_layer(cfg)
        twin = copy.deepcopy(layer)
        x = make_input(cfg, 4)
        if channels_last:
            x = x.contiguous(memory_format=CL)
        x.requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        out = layer(x)
        g = torch.randn_like(out)
        got = _grads(layer, x, out, g)
        want = _grads(twin, x2, reference(twin, cfg, x2), g)
    finally:
        torch.set_default_dtype(torch.float32)
    assert mix_calls == [4, 4]  # forward, then the backward's re-mix: one chunk each
    for name in want:
        assert rel_err(got[name], want[name]) < 1e-10, name


@pytest.mark.parametrize("strategy", ["folded", "per_sample"])
def test_no_grad_and_inference_mode(strategy, force_strategy, mix_calls):
    force_strategy(strategy)
    cfg = _cfg(padding=1, groups=2)
    layer = make_layer(cfg, max_kernel_bytes=2 * per_sample_kernel_bytes(make_layer(cfg)))
    x = make_input(cfg, 5).requires_grad_()
    with torch.no_grad():
        ref = reference(layer, cfg, x)
        out = layer(x)
    assert not out.requires_grad
    assert rel_err(out, ref) < 1e-5
    with torch.inference_mode():
        out2 = layer(x)
    assert torch.equal(out, out2)
    assert mix_calls == [2, 2, 1] * 2


@pytest.mark.parametrize(
    ("strategy", "cfg"),
    [
        ("single", _cfg(in_channels=2, out_channels=3, padding=1)),
        ("folded", _cfg(in_channels=2, out_channels=3, padding=1)),
        ("per_sample", _cfg(in_channels=2, out_channels=3, padding=1)),
        ("folded", _cfg(in_channels=4, out_channels=2, groups=2, stride=2, dilation=2)),
        ("per_sample", _cfg(in_channels=4, out_channels=2, groups=2, stride=2, dilation=2)),
    ],
)
def test_gradcheck_functional(strategy, cfg, force_strategy, mix_calls):
    """gradcheck of dynamic_conv2d itself (the chunked custom autograd Function)."""
    force_strategy(strategy)
    dd = {"dtype": torch.float64}
    batch = 1 if strategy == "single" else 3
    k, g = 3, cfg["groups"]
    x = torch.randn(batch, cfg["in_channels"], 5, 6, **dd, requires_grad=True)
    routing = torch.softmax(torch.randn(batch, k, **dd), 1).requires_grad_()
    shape = (k, cfg["out_channels"], cfg["in_channels"] // g, 3, 3)
    weight = torch.randn(shape, **dd, requires_grad=True)
    bias = torch.randn(k, cfg["out_channels"], **dd, requires_grad=True)
    budget = 2 * weight[0].numel() * 8

    def fn(x, routing, weight, bias):
        return dynamic_conv2d(
            x,
            routing,
            weight,
            bias,
            (cfg["stride"],) * 2,
            (cfg["padding"],) * 2,
            (cfg["dilation"],) * 2,
            g,
            max_kernel_bytes=budget,
        )

    assert torch.autograd.gradcheck(fn, (x, routing, weight, bias))
    if strategy != "single":
        assert 2 in mix_calls, "gradcheck did not go through the chunked path"


@pytest.mark.parametrize("strategy", ["single", "folded", "per_sample", "stacked"])
def test_gradcheck_module(strategy, force_strategy):
    """gradcheck through the whole layer, attention included, with reflect padding."""
    force_strategy(strategy)
    cfg = _cfg(in_channels=2, out_channels=2, padding=1, padding_mode="reflect")
    layer = make_layer(cfg, num_experts=2).double()
    layer.max_kernel_bytes = 8 * layer.weight[0].numel()  # chunks of 1
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    batch = 1 if strategy == "single" else 3
    x = make_input(cfg, batch, torch.float64)[:, :, :4, :5].clone().requires_grad_()

    def fn(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params))


# -- memory bound ---------------------------------------------------------------------------


def _retained_bytes(fn):
    """Bytes of distinct storage still held after ``fn()`` returns, other than its output.

    Two routes: tensors autograd saves for backward (``saved_tensors_hooks`` sees every
    ``save_for_backward`` and every built-in op's saved tensor), and tensors held by Python
    objects such as an autograd ``ctx`` attribute (found with the garbage collector).
    """
    seen: dict[int, int] = {}

    def note(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()

    def pack(t: torch.Tensor):
        note(t)
        return t

    gc.collect()
    before = {id(o) for o in gc.get_objects() if issubclass(type(o), torch.Tensor)}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    gc.collect()
    for o in gc.get_objects():
        if issubclass(type(o), torch.Tensor) and id(o) not in before and o is not out:
            note(o)
    seen.pop(out.untyped_storage().data_ptr(), None)
    return sum(seen.values()), out


def _seed_folded(layer: DynamicConv2d, x: torch.Tensor) -> torch.Tensor:
    """The seed's naive formulation: all B mixed kernels exist at once."""
    b = x.shape[0]
    routing = layer.attention(x)
    kernels = (routing @ layer.weight.reshape(layer.num_experts, -1)).reshape(
        b * layer.out_channels, *layer.weight.shape[2:]
    )
    out = F.conv2d(
        x.reshape(1, -1, *x.shape[2:]), kernels, None, layer.stride, 1, 1, b * layer.groups
    )
    return out.reshape(b, layer.out_channels, *out.shape[2:])


@pytest.mark.parametrize("strategy", ["folded", "per_sample"])
def test_autograd_does_not_save_the_mixed_kernels(strategy, force_strategy):
    force_strategy(strategy)
    batch = 32
    layer = DynamicConv2d(128, 128, 3, padding=1, num_experts=4)
    kernel_bytes = per_sample_kernel_bytes(layer)  # 590 KB; B of them are 18.9 MB
    layer.max_kernel_bytes = 2 * kernel_bytes
    x = torch.randn(batch, 128, 6, 6, requires_grad=True)

    naive, ref = _retained_bytes(lambda: _seed_folded(layer, x))
    assert naive >= batch * kernel_bytes  # the hook does see a naive layer's mixed kernels
    saved, out = _retained_bytes(lambda: layer(x))
    assert saved < batch * kernel_bytes / 4, (saved, batch * kernel_bytes)
    # input + experts + small things: bounded independently of the batch's kernels
    assert saved < 2 * (x.nbytes + layer.weight.nbytes)
    out.sum().backward()  # and the bounded backward still gives the right gradient
    grad = x.grad.clone()
    x.grad = None
    if layer.bias is not None:
        ref = ref + (layer.attention(x) @ layer.bias)[:, :, None, None]
    ref.sum().backward()
    assert rel_err(out, ref) < 1e-5
    assert rel_err(grad, x.grad) < 1e-4


def test_stacked_saves_no_kernels_only_the_expert_outputs(force_strategy):
    """The tiny-map formulation keeps K outputs per sample for backward, never B kernels."""
    force_strategy("stacked")
    batch, k = 32, 4
    layer = DynamicConv2d(256, 256, 3, padding=1, num_experts=k, bias=False)
    x = torch.randn(batch, 256, 2, 2, requires_grad=True)
    saved, out = _retained_bytes(lambda: layer(x))
    assert saved < batch * per_sample_kernel_bytes(layer) / 4
    assert saved <= x.nbytes + layer.weight.nbytes + k * out.nbytes + 2**18  # + attention
    out.sum().backward()
    cfg = _cfg(in_channels=256, out_channels=256, padding=1)
    assert rel_err(out, reference(layer, cfg, x.detach())) < 1e-5


# -- from_conv ------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["upcycle", "perturb"])
@pytest.mark.parametrize("attention", ["softmax", "sigmoid"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("cfg", GRID, ids=_cfg_id)
def test_from_conv_is_equivalent(cfg, batch, attention, init):
    conv = nn.Conv2d(**cfg).eval()
    layer = DynamicConv2d.from_conv(conv, num_experts=4, attention=attention, init=init).eval()
    x = make_input(cfg, batch)
    if init == "perturb":
        assert not torch.equal(layer.weight[0], layer.weight[1])  # default noise > 0
    else:
        # Any softmax routing, and any sigmoid routing in antisymmetric pairs, keeps the
        # function: make it strongly input-dependent so the test cannot pass by uniformity.
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            layer.attention.fc1.weight.normal_(0.0, 0.5, generator=g)
            layer.attention.fc1.bias.fill_(2.0)  # hidden units active for every sample
        # The attention really varies (per expert, and per sample when B > 1): the output
        # is the original's because the experts are equal, not because routing is uniform.
        pi = reference_routing(layer, x)
        assert (pi.max(1).values - pi.min(1).values).max() > 1e-2
        if batch > 1:
            assert (pi - pi[:1]).abs().max() > 1e-4
    with torch.no_grad():
        want = conv(x)
        got = layer(x)
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("num_experts", [1, 3, 4])
@pytest.mark.parametrize("attention", ["softmax", "sigmoid"])
def test_upcycle_copies_the_kernel_and_routing_sums_to_a_constant(attention, num_experts):
    cfg = _cfg(in_channels=8, out_channels=6, padding=1)
    conv = nn.Conv2d(**cfg)
    layer = DynamicConv2d.from_conv(conv, num_experts=num_experts, attention=attention)
    k = num_experts
    scale = 1.0 if attention == "softmax" else 2.0 / k  # sigmoid: the weights sum to K / 2
    for e in range(k):
        assert torch.equal(layer.weight[e], layer.weight[0])
        assert torch.allclose(layer.weight[e], scale * conv.weight, rtol=0, atol=1e-7)
        assert torch.allclose(layer.bias[e], scale * conv.bias, rtol=0, atol=1e-7)
    x = make_input(cfg, 6)
    pi = reference_routing(layer, x)
    total = pi.sum(dim=1)
    assert torch.allclose(total, torch.full_like(total, 1.0 / scale), rtol=0, atol=1e-6)
    if k > 1:
        assert layer.attention.fc2.weight.abs().max() > 0
        assert (pi - pi[:1]).abs().max() > 1e-3  # sample-dependent from the start
    for name in ("fc1", "fc2"):
        assert getattr(layer.attention, name).weight.requires_grad


def test_upcycle_routing_std_scales_the_attention():
    conv = nn.Conv2d(16, 16, 3, padding=1)
    g = torch.Generator().manual_seed(3)
    small = DynamicConv2d.from_conv(conv, routing_std=0.1, generator=g)
    g = torch.Generator().manual_seed(3)
    large = DynamicConv2d.from_conv(conv, routing_std=2.0, generator=g)
    w_small, w_large = small.attention.fc2.weight.detach(), large.attention.fc2.weight.detach()
    assert torch.allclose(w_large, 20 * w_small, atol=1e-5)
    assert 0.5 < float(w_large.std()) < 4
    assert torch.count_nonzero(large.attention.fc2.bias) == 0
    with pytest.raises(ValueError, match="routing_std"):
        DynamicConv2d.from_conv(conv, routing_std=-1.0)


@pytest.mark.parametrize("attention", ["softmax", "sigmoid"])
def test_scratch_initialises_experts_independently(attention):
    cfg = _cfg(in_channels=16, out_channels=12, padding=1)
    conv = nn.Conv2d(**cfg)
    layer = DynamicConv2d.from_conv(
        conv, num_experts=4, attention=attention, init="scratch",
        generator=torch.Generator().manual_seed(1),  # not the global seed the conv was drawn with
    )  # fmt: skip
    w = layer.weight.detach()
    bound = 1 / math.sqrt(16 * 9)  # nn.Conv2d's kaiming_uniform(a=sqrt 5) bound
    for a, b in itertools.combinations(range(4), 2):
        assert not torch.allclose(w[a], w[b], atol=1e-3)
    for e in range(4):
        assert float(w[e].abs().max()) <= bound + 1e-7
        assert 0.8 < float(w[e].std()) / (bound / math.sqrt(3)) < 1.2
        assert not torch.allclose(w[e], conv.weight, atol=1e-3)
    # The attention is nn.Linear's default, not zeroed: routing is random and non-uniform.
    assert torch.count_nonzero(layer.attention.fc2.weight) == layer.attention.fc2.weight.numel()
    assert layer.kernel_size == conv.kernel_size and layer.padding == conv.padding


def test_from_conv_rejects_unknown_init_and_noise_outside_perturb():
    conv = nn.Conv2d(4, 4, 3)
    with pytest.raises(ValueError, match="init must be one of"):
        DynamicConv2d.from_conv(conv, init="copy")  # type: ignore[arg-type]
    for init in ("upcycle", "scratch"):
        with pytest.raises(ValueError, match="noise applies to init='perturb' only"):
            DynamicConv2d.from_conv(conv, init=init, noise=0.01)
    DynamicConv2d.from_conv(conv, init="upcycle", noise=0.0)  # zero noise is no noise


@pytest.mark.parametrize("attention", ["softmax", "sigmoid"])
def test_perturb_noise_zero_gives_identical_experts(attention):
    conv = nn.Conv2d(8, 6, 3, padding=1)
    layer = DynamicConv2d.from_conv(
        conv, num_experts=4, attention=attention, init="perturb", noise=0.0
    )
    scale = 1.0 if attention == "softmax" else 0.5  # sigmoid: 4 experts x 0.5 each
    for k in range(4):
        assert torch.equal(layer.weight[k], layer.weight[0])
        assert torch.allclose(layer.weight[k], scale * conv.weight, rtol=0, atol=1e-7)
        assert torch.allclose(layer.bias[k], scale * conv.bias, rtol=0, atol=1e-7)
    assert torch.count_nonzero(layer.attention.fc2.weight) == 0


@pytest.mark.parametrize("attention", ["softmax", "sigmoid"])
def test_perturb_noise_makes_experts_differ_around_the_kernel(attention):
    conv = nn.Conv2d(8, 6, 3, padding=1)
    noise = 0.05
    layer = DynamicConv2d.from_conv(
        conv, num_experts=4, attention=attention, init="perturb", noise=noise
    )
    w = layer.weight.detach()
    per_expert = 1.0 / 4 if attention == "softmax" else 0.5
    mixed = per_expert * w.sum(0)
    assert torch.allclose(mixed, conv.weight, rtol=0, atol=1e-6)
    spread = (w - w.mean(0)).std() / (w.mean(0).std())
    assert 0.2 * noise < spread < 5 * noise
    for a, b in itertools.combinations(range(4), 2):
        assert not torch.allclose(w[a], w[b], atol=1e-4)


@pytest.mark.parametrize("init", ["upcycle", "scratch", "perturb"])
def test_from_conv_generator_is_reproducible(init):
    conv = nn.Conv2d(8, 6, 3)

    def make(seed):
        return DynamicConv2d.from_conv(
            conv, init=init, generator=torch.Generator().manual_seed(seed)
        )

    a, b, c = make(1), make(1), make(2)
    assert torch.equal(a.weight, b.weight)
    for name in ("fc1", "fc2"):
        wa, wb = getattr(a.attention, name).weight, getattr(b.attention, name).weight
        assert torch.equal(wa, wb)
    differs = [not torch.equal(a.weight, c.weight)] + [
        not torch.equal(getattr(a.attention, n).weight, getattr(c.attention, n).weight)
        for n in ("fc1", "fc2")
    ]
    assert all(differs[1:]) if init == "upcycle" else all(differs[:2])


def _first_backward(layer: DynamicConv2d, x: torch.Tensor):
    """fc2.weight's gradient and the routing logits' gradient after one backward."""
    att = layer.attention
    logits = {}
    original = att.logits

    def keep(inp):
        z = original(inp)
        z.retain_grad()
        logits["z"] = z
        return z

    att.logits = keep  # instance attribute: forward's self.logits(x) goes through it
    try:
        out = layer(x)
    finally:
        del att.logits
    (out * torch.randn_like(out)).sum().backward()
    return att.fc2.weight.grad, logits["z"].grad


@pytest.mark.parametrize("attention", ["softmax", "sigmoid"])
def test_upcycle_experts_get_different_gradients_from_the_first_step(attention):
    cfg = _cfg(in_channels=8, out_channels=8, padding=1)
    layer = DynamicConv2d.from_conv(nn.Conv2d(**cfg), num_experts=4, attention=attention)
    x = make_input(cfg, 6)
    _first_backward(layer, x)
    g = layer.weight.grad
    # Per-sample routing weighs each expert's gradient differently: they separate at once.
    for a, b in itertools.combinations(range(4), 2):
        assert (g[a] - g[b]).abs().max() > 1e-3 * g.abs().max()
    # Contrast: perturb's uniform start gives every expert the same gradient.
    flat = DynamicConv2d.from_conv(
        nn.Conv2d(**cfg), num_experts=4, attention=attention, init="perturb"
    )
    _first_backward(flat, x)
    gf = flat.weight.grad
    assert (gf - gf[:1]).abs().max() <= 1e-6 * gf.abs().max()


@pytest.mark.parametrize("attention", ["softmax", "sigmoid"])
@pytest.mark.parametrize("batch", [1, 4])
def test_perturb_attention_learns_from_the_first_step(attention, batch):
    cfg = _cfg(in_channels=8, out_channels=8, padding=1)
    conv = nn.Conv2d(**cfg)
    layer = DynamicConv2d.from_conv(
        conv, num_experts=4, attention=attention, init="perturb", noise=0.01
    )
    assert torch.count_nonzero(layer.attention.fc2.weight) == 0
    x = make_input(cfg, batch)
    fc2_grad, logit_grad = _first_backward(layer, x)
    assert fc2_grad is not None and fc2_grad.abs().max() > 1e-6
    assert logit_grad.abs().max() > 1e-6
    if attention == "softmax":
        # Contrast: identical experts give the softmax logits (numerically) no gradient.
        twin = DynamicConv2d.from_conv(
            conv, num_experts=4, attention=attention, init="perturb", noise=0.0
        )
        _, still = _first_backward(twin, x)
        assert still.abs().max() < 1e-3 * logit_grad.abs().max()


@pytest.mark.parametrize("init", ["upcycle", "perturb"])
@pytest.mark.parametrize("attention", ["softmax", "sigmoid"])
def test_single_expert(attention, init):
    cfg = _cfg(padding=1, stride=2, padding_mode="replicate")
    conv = nn.Conv2d(**cfg).eval()
    noise = 0.1 if init == "perturb" else None
    layer = DynamicConv2d.from_conv(
        conv, num_experts=1, attention=attention, init=init, noise=noise
    )
    x = make_input(cfg, 3)
    assert rel_err(layer(x), conv(x)) < 1e-5
    fresh = make_layer(cfg, attention, num_experts=1)
    assert rel_err(fresh(x), reference(fresh, cfg, x)) < 1e-5


def test_from_conv_keeps_the_training_flag_and_rejects_negative_noise():
    conv = nn.Conv2d(4, 4, 3).eval()
    assert not DynamicConv2d.from_conv(conv).training
    assert DynamicConv2d.from_conv(conv.train()).training
    with pytest.raises(ValueError, match="noise"):
        DynamicConv2d.from_conv(conv, init="perturb", noise=-0.1)


# -- temperature and state ------------------------------------------------------------------


def test_temperature_is_a_buffer_with_a_setter():
    layer = make_layer(_cfg(), temperature=7.0)
    assert layer.temperature == 7.0
    state = layer.state_dict()
    assert "attention.temperature" in state
    assert float(state["attention.temperature"]) == 7.0
    assert "attention.temperature" not in dict(layer.named_parameters())
    layer.temperature = 2.5
    assert layer.temperature == 2.5
    assert float(layer.state_dict()["attention.temperature"]) == 2.5
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            layer.temperature = bad
    with pytest.raises(ValueError, match="temperature"):
        DynamicConv2d(4, 4, 3, temperature=0.0)


def test_temperature_is_applied_and_never_changed_by_forward():
    cfg = _cfg(padding=1)
    layer = make_layer(cfg, temperature=1.0)
    x = make_input(cfg, 3)
    cold = layer(x)
    layer.temperature = 30.0
    for mode in (layer.train, layer.eval):
        mode()
        hot = layer(x)
        assert layer.temperature == 30.0
    assert rel_err(hot, reference(layer, cfg, x, temperature=30.0)) < 1e-5
    assert rel_err(hot, cold) > 1e-3
    # a hotter softmax is closer to uniform
    hot_pi = layer.attention(x)
    layer.temperature = 1.0
    cold_pi = layer.attention(x)
    uniform = 1 / layer.num_experts
    assert (hot_pi - uniform).abs().max() < 0.5 * (cold_pi - uniform).abs().max()


def test_eval_output_is_deterministic():
    cfg = _cfg(padding=1, groups=2)
    layer = make_layer(cfg, temperature=4.0).eval()
    x = make_input(cfg, 3)
    before = layer.state_dict()
    a, b = layer(x), layer(x)
    assert torch.equal(a, b)
    after = layer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("attention", ["softmax", "sigmoid"])
def test_state_dict_round_trip(attention):
    cfg = _cfg(padding="same", padding_mode="reflect", groups=2)
    layer = make_layer(cfg, attention, temperature=3.0)
    layer.temperature = 5.0
    torch.manual_seed(123)
    fresh = DynamicConv2d(**cfg, num_experts=3, attention=attention)
    x = make_input(cfg, 3)
    assert not torch.equal(fresh(x), layer(x))
    fresh.load_state_dict(layer.state_dict())
    assert fresh.temperature == 5.0
    assert torch.equal(fresh(x), layer(x))
    assert torch.equal(fresh(x[:1]), layer(x[:1]))


# -- tracing, compiling, exporting ----------------------------------------------------------


TRACE_CFG = _cfg(padding=1, padding_mode="reflect", groups=2)


def test_fx_symbolic_trace():
    layer = make_layer(TRACE_CFG).eval()
    model = nn.Sequential(nn.Conv2d(4, 4, 1), layer, nn.ReLU()).eval()
    gm = torch.fx.symbolic_trace(model)
    for batch in (1, 2, 5):
        x = make_input(TRACE_CFG, batch)
        assert torch.equal(gm(x), model(x))


def test_export_with_dynamic_batch():
    layer = make_layer(TRACE_CFG).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(layer, (make_input(TRACE_CFG, 3),), dynamic_shapes={"x": {0: batch}})
    exported = ep.module()
    for b in (1, 2, 5, 8):
        x = make_input(TRACE_CFG, b)
        assert rel_err(exported(x), layer(x)) < 1e-5
        assert rel_err(exported(x), reference(layer, TRACE_CFG, x)) < 1e-5


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
def test_torch_compile_dynamic_inference():
    layer = make_layer(TRACE_CFG).eval()
    compiled = torch.compile(layer, dynamic=True)
    with torch.no_grad():
        for b in (1, 3, 8):
            x = make_input(TRACE_CFG, b)
            assert rel_err(compiled(x), layer(x)) < 1e-5


# -- bad arguments --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_experts": 0}, "num_experts"),
        ({"num_experts": -2}, "num_experts"),
        ({"reduction": 0}, "reduction"),
        ({"in_channels": 5, "groups": 2}, "groups"),
        ({"out_channels": 5, "groups": 2}, "groups"),
        ({"attention": "relu"}, "attention"),
        ({"padding": "full"}, "padding"),
        ({"padding_mode": "mirror"}, "padding_mode"),
        ({"padding": "same", "stride": 2}, "padding"),
        ({"padding": -1}, "padding"),
        ({"kernel_size": 0}, "kernel_size"),
        ({"temperature": -1.0}, "temperature"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    args = {"in_channels": 4, "out_channels": 4, "kernel_size": 3, **kwargs}
    with pytest.raises(ValueError, match=name):
        DynamicConv2d(**args)


def test_reset_parameters_draws_each_expert_as_conv2d_does_in_one_call() -> None:
    """The same numbers as nn.Conv2d's init expert by expert (an independent loop over the
    experts with the same generator), and no Python loop per expert: 200,000 experts of a
    1x1 conv are one draw (a loop of kaiming_uniform_ calls made one per expert)."""

    layer = DynamicConv2d(8, 6, 3, num_experts=5, device="meta")
    layer = layer.to_empty(device="cpu")
    layer.reset_parameters(generator=torch.Generator().manual_seed(3))
    reference = torch.empty(5, 6, 8, 3, 3)
    gen = torch.Generator().manual_seed(3)
    for k in range(5):
        nn.init.kaiming_uniform_(reference[k], a=math.sqrt(5), generator=gen)
    assert torch.equal(layer.weight, reference)
    many = DynamicConv2d(4, 4, 1, num_experts=200_000, device="meta").to_empty(device="cpu")
    # Counted, not timed: the number of draws must not grow with the experts.
    draws: list[tuple[int, ...]] = []
    real_uniform = torch.Tensor.uniform_

    def counting_uniform(self, *args, **kwargs):
        draws.append(tuple(self.shape))
        return real_uniform(self, *args, **kwargs)

    torch.Tensor.uniform_ = counting_uniform  # type: ignore[method-assign]
    try:
        many.reset_parameters(generator=torch.Generator().manual_seed(0))
    finally:
        torch.Tensor.uniform_ = real_uniform  # type: ignore[method-assign]
    assert (200_000, 4, 4, 1, 1) in draws and len(draws) < 10, draws
    bound = 1 / math.sqrt(4)  # kaiming_uniform_(a=sqrt 5) on fan_in 4: 1/sqrt(fan_in)
    assert many.weight.abs().max() <= bound and many.weight.std() > 0.5 * bound / math.sqrt(3)

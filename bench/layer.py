"""Benchmark the dynamic layers against nn.Conv2d, the seed's formulation and timm's CondConv2d.

Implementations: ``dynify`` (DynamicConv2d, DY-CNN), ``odconv`` (ODConv2d, K=4, r=16) and
``dcd`` (DCDConv2d, r=16; "-" on the shapes its formulation does not cover: depthwise),
``seed`` and ``condconv`` (timm's CondConv2d) beside ``static`` (nn.Conv2d).

Every implementation of one (shape, batch) cell is timed side by side in the same process,
in rotating order, ``--repeats`` times, with ``torch.utils.benchmark``'s
``blocked_autorange``; a cell's ratio is the median over the repeats of ``t_impl / t_static``
measured in the same round, so slow drift of the machine cancels.

* forward: eval mode under ``torch.no_grad``;
* forward+backward: train mode, ``torch.autograd.grad`` of the output (with a fixed random
  cotangent) with respect to every parameter and to the input (except for the stem, whose
  input is the image and needs no gradient);
* peak extra memory at B=32: forward+backward in a fresh subprocess per (implementation,
  shape), the growth of the process's peak RSS (``ru_maxrss``) over the level reached after
  building the layer and its input.

K=4 experts, reduction r=4, no bias (as in ResNet / MobileNet), float32, contiguous input,
torch's default number of threads.

Usage::

    python bench/layer.py                       # everything, plain malloc
    python bench/layer.py --malloc both         # plain, then again with MALLOC_MMAP_MAX_=0
    python bench/layer.py --malloc all          # also MALLOC_MMAP_MAX_=0 + no heap trimming
    python bench/layer.py --quick               # fewer shapes and batches, short runs
    python bench/layer.py --shapes 3x3-512@7,dw-144@56 --batches 1,32 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import benchmark

K, R = 4, 4


@dataclass(frozen=True)
class Shape:
    name: str
    cin: int
    cout: int
    k: int
    stride: int
    groups: int
    hw: int

    @property
    def padding(self) -> int:
        return (self.k - 1) // 2

    @property
    def is_stem(self) -> bool:
        return self.cin == 3

    def conv(self, cls: type[nn.Module] = nn.Conv2d, **kwargs) -> nn.Module:
        """A ``cls`` conv of this shape, without bias (``kwargs``: ``cls``'s own)."""
        return cls(self.cin, self.cout, self.k, stride=self.stride, padding=self.padding,
                   groups=self.groups, bias=False, **kwargs)  # fmt: skip


SHAPES = [
    Shape("3x3-64@56", 64, 64, 3, 1, 1, 56),
    Shape("3x3-128@28", 128, 128, 3, 1, 1, 28),
    Shape("3x3-256@14", 256, 256, 3, 1, 1, 14),
    Shape("3x3-512@7", 512, 512, 3, 1, 1, 7),
    Shape("1x1-256>64@56", 256, 64, 1, 1, 1, 56),
    Shape("1x1-1024>256@14", 1024, 256, 1, 1, 1, 14),
    Shape("dw-144@56", 144, 144, 3, 1, 144, 56),
    Shape("dw-576@14", 576, 576, 3, 1, 576, 14),
    Shape("stem-7x7/2-3>64@224", 3, 64, 7, 2, 1, 224),
]
# Not in the default run (the shapes, over which the targets are computed): the deep
# layers of a network fed 32x32 images (CIFAR), where the "stacked" formulation runs.
EXTRA_SHAPES = [
    Shape("3x3-256@8", 256, 256, 3, 1, 1, 8),
    Shape("3x3-512@4", 512, 512, 3, 1, 1, 4),
]
SHAPES_BY_NAME = {s.name: s for s in SHAPES + EXTRA_SHAPES}
MALLOC_ENVS: dict[str, dict[str, str]] = {
    "plain": {},
    "nommap": {"MALLOC_MMAP_MAX_": "0"},
    "nommap-notrim": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**62)},
}
QUICK_SHAPES = ["3x3-64@56", "3x3-512@7", "1x1-256>64@56", "dw-144@56", "stem-7x7/2-3>64@224"]
IMPLS = ("static", "dynify", "seed", "condconv", "odconv", "dcd")
MEMORY_IMPLS = ("static", "dynify", "seed", "condconv")  # the memory table's columns


# -- the competitors ------------------------------------------------------------------------


class SeedDynamicConv(nn.Module):
    """The seed's formulation (design note), minimal and correct.

    SE attention (pool, Linear, ReLU, Linear, softmax(z / T)), one matmul mixing the B
    kernels, the batch folded into the groups of one grouped conv. Fixed relative to the
    note: the padding is applied (the note passes ``padding="valid"`` for zeros mode), the
    input is reshaped rather than viewed (channels_last), the hidden width has the same
    floor as dynify's (the note's ``C // r`` is 0 for the RGB stem), and the temperature is
    not updated inside forward.
    """

    def __init__(self, shape: Shape, temperature: float = 1.0) -> None:
        super().__init__()
        self.shape = shape
        hidden = max(shape.cin // R, 4)
        self.fc1 = nn.Linear(shape.cin, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, K, bias=False)
        self.temperature = temperature
        self.weight = nn.Parameter(
            torch.randn(K, shape.cout * (shape.cin // shape.groups) * shape.k * shape.k) * 0.05
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.shape
        b, c, h, w = x.shape
        z = self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3)))))
        routing = torch.softmax(z / self.temperature, dim=-1)
        weight = (routing @ self.weight).view(b * s.cout, s.cin // s.groups, s.k, s.k)
        out = F.conv2d(
            x.reshape(1, b * c, h, w),
            weight,
            None,
            stride=s.stride,
            padding=s.padding,
            groups=s.groups * b,
        )
        return out.view(b, s.cout, out.shape[-2], out.shape[-1])


class TimmCondConv(nn.Module):
    """timm's CondConv2d with the routing timm's CondConvResidual uses: pool, Linear, sigmoid."""

    def __init__(self, shape: Shape) -> None:
        super().__init__()
        from timm.layers import CondConv2d

        self.routing_fn = nn.Linear(shape.cin, K)
        self.conv = shape.conv(CondConv2d, num_experts=K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.conv(x, torch.sigmoid(self.routing_fn(pooled)))


def build(impl: str, shape: Shape) -> nn.Module:
    from dynify import DynamicConv2d

    conv = shape.conv()
    if impl == "static":
        return conv
    if impl == "dynify":
        layer = DynamicConv2d.from_conv(conv, num_experts=K, reduction=R)
        with torch.no_grad():  # a trained-looking, non-uniform attention (speed-neutral)
            layer.attention.fc2.weight.normal_(0, 0.1)
        return layer
    if impl == "seed":
        return SeedDynamicConv(shape)
    if impl == "condconv":
        return TimmCondConv(shape)
    if impl == "odconv":
        from dynify.layers import ODConv2d

        layer = ODConv2d.from_conv(conv, num_experts=K, reduction=16)
        with torch.no_grad():  # trained-looking attention: gates off 0.5 (speed-neutral)
            layer.attention.heads.weight.normal_(0, 0.1)
        return layer
    if impl == "dcd":
        from dynify.layers import DCDConv2d

        if DCDConv2d.unsupported_reason(**_geometry(conv)) is not None:
            return None
        layer = DCDConv2d.from_conv(conv, reduction=16)
        with torch.no_grad():  # a dynamic scale and latent mix that are not the identity
            for head in (layer.attention.fc_scale, layer.attention.fc_phi):
                head.weight.normal_(0, 0.1)
        return layer
    raise ValueError(impl)


def _geometry(conv: nn.Conv2d) -> dict:
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": tuple(conv.kernel_size),
        "stride": tuple(conv.stride),
        "padding": tuple(conv.padding),
        "dilation": tuple(conv.dilation),
        "groups": conv.groups,
    }


# -- timing ---------------------------------------------------------------------------------


def _forward_fn(module: nn.Module, x: torch.Tensor):
    module.eval()

    def run():
        with torch.no_grad():
            module(x)

    return run


def _forward_backward_fn(module: nn.Module, x: torch.Tensor, shape: Shape):
    module.train()
    inputs = list(module.parameters())
    if not shape.is_stem:
        x = x.detach().requires_grad_()
        inputs.append(x)
    with torch.no_grad():
        probe = module(x)
    cotangent = torch.randn_like(probe)

    def run():
        torch.autograd.grad(module(x), inputs, cotangent)

    return run


def _median_time(fn, min_run_time: float) -> float:
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=min_run_time).median


def time_cell(shape: Shape, batch: int, repeats: int, min_run_time: float) -> dict:
    """{mode: {impl: [ratio per repeat]}, "static_ms": {mode: median ms}}."""
    torch.manual_seed(0)
    x = torch.randn(batch, shape.cin, shape.hw, shape.hw)
    built = {impl: build(impl, shape) for impl in IMPLS}
    modules = {impl: m for impl, m in built.items() if m is not None}
    impls = tuple(modules)
    result: dict = {"static_ms": {}}
    for mode in ("fwd", "fwdbwd"):
        fns = {
            impl: _forward_fn(m, x) if mode == "fwd" else _forward_backward_fn(m, x, shape)
            for impl, m in modules.items()
        }
        for fn in fns.values():  # warm-up: oneDNN primitive creation, allocator
            fn()
            fn()
        times: dict[str, list[float]] = {impl: [] for impl in impls}
        for r in range(repeats):
            order = impls[r % len(impls) :] + impls[: r % len(impls)]
            for impl in order:
                times[impl].append(_median_time(fns[impl], min_run_time))
        result[mode] = {
            impl: [t / s for t, s in zip(times[impl], times["static"], strict=True)]
            if impl in times
            else [math.nan] * repeats  # not covered by that formulation
            for impl in IMPLS
            if impl != "static"
        }
        result["static_ms"][mode] = 1e3 * statistics.median(times["static"])
    return result


# -- memory ---------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _memory_child(impl: str, shape_name: str, batch: int) -> None:
    """Print the peak RSS growth (kB) of two forward+backward steps.

    Linux carries ``ru_maxrss`` over ``fork`` + ``exec``: a child of a parent that has
    grown to gigabytes starts with that peak, which hides everything below it. The child
    therefore resets its own high-water mark (``/proc/self/clear_refs``, "5") right before
    the steps and reads ``VmHWM`` - ``VmRSS`` from ``/proc/self/status``; where that reset
    is unavailable it falls back to the ``ru_maxrss`` difference.
    """
    shape = SHAPES_BY_NAME[shape_name]
    torch.manual_seed(0)
    module = build(impl, shape)
    x = torch.randn(batch, shape.cin, shape.hw, shape.hw)
    run = _forward_backward_fn(module, x, shape)  # includes one no-grad probe forward
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kb("VmRSS")
        use_hwm = _status_kb("VmHWM") <= before + 1024
    except OSError:
        use_hwm = False
    if not use_hwm:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run()
    run()
    if use_hwm:
        after = _status_kb("VmHWM")
    else:
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"extra_kb": after - before, "hwm": use_hwm}))


def peak_extra_mb(impl: str, shape: Shape, batch: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--_memory-child", impl, shape.name, str(batch)],
        check=True,
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_kb"] / 1024


# -- report ---------------------------------------------------------------------------------


def _med(values: list[float]) -> float:
    return statistics.median(values)


def _vs(ratios: dict, other: str) -> float:
    """Median over the rounds of t_dynify / t_other (both timed in the same round)."""
    pairs = zip(ratios["dynify"], ratios[other], strict=True)
    return _med([a / o for a, o in pairs])


def _fmt(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.2f}"


def report(cells: dict, batches: list[int], shapes: list[Shape], memory: dict | None) -> str:
    lines = []
    for mode, title in (("fwd", "forward (eval, no_grad)"), ("fwdbwd", "forward+backward")):
        lines += [
            f"### {title}: time as a multiple of nn.Conv2d (median of repeats)",
            "",
            "| shape | B | nn.Conv2d ms | dynify | seed | CondConv2d | ODConv | DCD "
            "| dynify/seed | dynify/CondConv |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for shape in shapes:
            for b in batches:
                c = cells[(shape.name, b)]
                d, s, cc, od, dcd = (
                    _med(c[mode][i]) for i in ("dynify", "seed", "condconv", "odconv", "dcd")
                )
                vs_seed = _vs(c[mode], "seed")
                vs_cc = _vs(c[mode], "condconv")
                lines.append(
                    f"| {shape.name} | {b} | {c['static_ms'][mode]:.3f} | {_fmt(d)} | "
                    f"{_fmt(s)} | {_fmt(cc)} | {_fmt(od)} | {_fmt(dcd)} | {_fmt(vs_seed)} | "
                    f"{_fmt(vs_cc)} |"
                )
        lines.append("")
    if memory:
        lines += [
            f"### peak extra memory, forward+backward at B={memory['batch']} (MB of peak RSS "
            "over the layer and its input)",
            "",
            "| shape | nn.Conv2d | dynify | seed | CondConv2d | dynify - nn.Conv2d "
            "| seed - nn.Conv2d |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for shape in shapes:
            m = memory["mb"][shape.name]
            lines.append(
                f"| {shape.name} | {m['static']:.0f} | {m['dynify']:.0f} | {m['seed']:.0f} | "
                f"{m['condconv']:.0f} | {m['dynify'] - m['static']:+.0f} | "
                f"{m['seed'] - m['static']:+.0f} |"
            )
        lines.append("")
    lines += targets(cells, batches, shapes)
    return "\n".join(lines)


def targets(cells: dict, batches: list[int], shapes: list[Shape]) -> list[str]:
    out = ["### targets (recorded, not asserted)", ""]
    slower = []
    for (name, b), c in cells.items():
        for mode in ("fwd", "fwdbwd"):
            for other in ("seed", "condconv"):
                r = _vs(c[mode], other)
                if r > 1.0:
                    slower.append(f"{name} B={b} {mode} vs {other}: {r:.2f}x")
    out.append(
        "- no slower than the seed or CondConv2d anywhere: "
        + ("**met**" if not slower else f"**missed** in {len(slower)} cells: " + "; ".join(slower))
    )
    if 1 in batches:
        misses = []
        for shape in shapes:
            if shape.hw < 14:
                continue
            for mode in ("fwd", "fwdbwd"):
                r = _med(cells[(shape.name, 1)][mode]["dynify"])
                if r > 1.25:
                    misses.append(f"{shape.name} {mode}: {r:.2f}x")
        out.append(
            "- B=1 within 1.25x of nn.Conv2d on layers >= 14x14: "
            + ("**met**" if not misses else "**missed**: " + "; ".join(misses))
        )
    if 32 in batches:
        dcd = {
            f"{name} {mode}": _med(c[mode]["dcd"])
            for (name, b), c in cells.items()
            if b == 32
            for mode in ("fwd", "fwdbwd")
            if not math.isnan(_med(c[mode]["dcd"]))
        }
        worst = max(dcd.items(), key=lambda kv: kv[1]) if dcd else ("-", math.nan)
        out.append(
            "- DCD at B=32 within 1.3x of nn.Conv2d on every shape it covers: "
            + ("**met**" if worst[1] <= 1.3 else "**missed**")
            + f" (worst {worst[0]}: {worst[1]:.2f}x)"
        )
    big = max(batches)
    if big > 1:
        parts = []
        for mode in ("fwd", "fwdbwd"):
            med = statistics.median(_med(cells[(s.name, big)][mode]["dynify"]) for s in shapes)
            parts.append(f"{mode} {med:.2f}x ({'met' if med <= 1.5 else 'missed'})")
        out.append(f"- B={big} within 1.5x of nn.Conv2d on the median shape: " + ", ".join(parts))
    out.append("")
    return out


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads), Python {platform.python_version()}, "
        f"MALLOC_MMAP_MAX_={os.environ.get('MALLOC_MMAP_MAX_', 'unset')}, "
        f"MALLOC_TRIM_THRESHOLD_={os.environ.get('MALLOC_TRIM_THRESHOLD_', 'unset')}, "
        f"load average {os.getloadavg()[0]:.1f} at start"
    )


def _without_malloc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--malloc":
            skip = True
        elif not a.startswith("--malloc="):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="5 shapes, B in {1, 32}, short runs")
    p.add_argument("--shapes", help="comma-separated names: " + ", ".join(SHAPES_BY_NAME))
    p.add_argument("--batches", help="comma-separated batch sizes (default 1,8,32)")
    p.add_argument("--repeats", type=int, help="side-by-side rounds per cell (default 5)")
    p.add_argument("--min-run-time", type=float, help="seconds per measurement (default 0.3)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    p.add_argument(
        "--malloc",
        choices=(*MALLOC_ENVS, "both", "all"),
        default="plain",
        help="glibc malloc settings, applied by re-running this script (glibc reads them at "
        "start): plain; nommap (MALLOC_MMAP_MAX_=0); nommap-notrim (also "
        "MALLOC_TRIM_THRESHOLD_ huge: freed memory is never returned to the OS); both = plain "
        "then nommap; all = the three",
    )
    p.add_argument("--_memory-child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._memory_child:
        impl, shape_name, batch = args._memory_child
        _memory_child(impl, shape_name, int(batch))
        return

    if args.malloc != "plain" or os.environ.get("_DYNIFY_BENCH_CHILD") is None:
        modes = {"both": ["plain", "nommap"], "all": list(MALLOC_ENVS)}.get(
            args.malloc, [args.malloc]
        )
        forwarded = _without_malloc(sys.argv[1:] if argv is None else argv)
        for mode in modes:
            label = " ".join(f"{k}={v}" for k, v in MALLOC_ENVS[mode].items()) or "plain glibc"
            print(f"## malloc: {label}\n", flush=True)
            env = {**os.environ, **MALLOC_ENVS[mode], "_DYNIFY_BENCH_CHILD": "1"}
            for key in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"):
                if key not in MALLOC_ENVS[mode]:
                    env.pop(key, None)
            subprocess.run([sys.executable, __file__, *forwarded], check=True, env=env)
        return

    names = args.shapes.split(",") if args.shapes else (QUICK_SHAPES if args.quick else None)
    shapes = [SHAPES_BY_NAME[n] for n in names] if names else SHAPES
    if args.batches:
        batches = [int(b) for b in args.batches.split(",")]
    else:
        batches = [1, 32] if args.quick else [1, 8, 32]
    repeats = args.repeats or (2 if args.quick else 5)
    min_run_time = args.min_run_time or (0.05 if args.quick else 0.3)

    print(f"Machine: {machine()}", flush=True)
    print(f"K={K}, r={R}, repeats={repeats}, min_run_time={min_run_time}s\n", flush=True)
    cells = {}
    for shape in shapes:
        for b in batches:
            cells[(shape.name, b)] = time_cell(shape, b, repeats, min_run_time)
            c = cells[(shape.name, b)]
            print(
                f"  {shape.name} B={b}: fwd dynify {_med(c['fwd']['dynify']):.2f}x "
                f"seed {_med(c['fwd']['seed']):.2f}x cc {_med(c['fwd']['condconv']):.2f}x | "
                f"fwd+bwd dynify {_med(c['fwdbwd']['dynify']):.2f}x "
                f"seed {_med(c['fwdbwd']['seed']):.2f}x cc {_med(c['fwdbwd']['condconv']):.2f}x",
                file=sys.stderr,
                flush=True,
            )
    memory = None
    if not args.no_memory:
        mem_batch = max(batches)
        memory = {
            "batch": mem_batch,
            "mb": {
                s.name: {i: peak_extra_mb(i, s, mem_batch) for i in MEMORY_IMPLS} for s in shapes
            },
        }
    print(report(cells, batches, shapes, memory), flush=True)
    print(f"(load average {os.getloadavg()[0]:.1f} at the end)\n", flush=True)


if __name__ == "__main__":
    main()

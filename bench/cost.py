"""Cost model benchmark: analytic vs measured FLOPs, pricing speed, latency ratios.

    python bench/cost.py                       # everything (about 15-25 min on 2 busy cores)
    python bench/cost.py --only agreement      # or: pricing, latency, profile
    python bench/cost.py --archs resnet18,vit_tiny_patch16_224 --size 3,96,96
    python bench/cost.py --only agreement --kinds dycnn,condconv,odconv,dcd

1. Agreement: for every architecture of the conversion tests, static and converted with the
   dycnn recipe ("all" for ViT, whose only conv is the stem), at batch 1 and 2: the analytic
   FLOPs (``dynify.cost.count``, from the trace) against FlopCounterMode (``measure_flops``);
   they must be equal, not close. ``--kinds``: each kind's bundled recipe in turn (for ViT a
   recipe of that kind converting every conv).
2. Pricing: time to price one resnet50 plan from its trace (target < 1 ms), with
   ``count`` (all rows) and ``price`` (totals only), and to resolve one plan.
3. Latency on the CPU: converted / static for resnet50 and mobilenetv3_large_100, recipes
   dycnn and mobile, batch 1 and 8, timed interleaved in one run (other processes share
   these cores, so only side-by-side ratios mean anything; medians of paired rounds). By
   default one torch thread timed by its own CPU time (``--threads 1 --clock thread``),
   which other processes' load barely disturbs; ``--threads 2 --clock wall`` is the
   wall-clock latency, as noisy as the machine is busy.
   Targets for dycnn on resnet50: FLOPs +5% at most, batch-1 ratio <= 1.20, batch-8 <= 1.5.
4. Profile: where the converted resnet50 spends its extra time (torch.profiler, per op).
"""

from __future__ import annotations

import argparse
import sys
import time

import timm
import torch
from families import ISSUE_FAMILIES

import dynify
from dynify import cost


def _recipe(name: str, kind: str) -> str | dict:
    if not name.startswith("vit"):
        return kind
    return "all" if kind == "dycnn" else {"defaults": {"kind": kind, "experts": 1}}


def agreement(
    archs: list[str], size: tuple[int, int, int] | None, kinds: tuple[str, ...] = ("dycnn",)
) -> bool:
    print("## analytic vs measured FLOPs (FlopCounterMode, cpu); FLOPs = 2 x MACs")
    print(
        f"{'model':24s} {'input':>9s} {'kind':>8s} {'B':>2s} {'static GFLOPs':>14s} "
        f"{'converted GFLOPs':>17s} {'+FLOPs':>7s} {'dyn':>7s}  agree"
    )
    all_ok = True
    for name, kind in ((n, k) for n in archs for k in kinds):
        kwargs = {"img_size": size[1]} if size and name.startswith("vit") else {}
        model = timm.create_model(name, **kwargs).eval()
        recipe = _recipe(name, kind)
        try:
            converted = dynify.apply(model, recipe, input_size=size)
        except Exception as err:  # report and go on: this is a survey
            print(f"{name:24s} conversion failed: {type(err).__name__}: {err}")
            all_ok = False
            continue
        plan = dynify.plan_of(converted)
        shown = "x".join(map(str, plan.input_size))
        for batch in (1, 2):
            before = cost.count(model, input_size=plan.input_size, batch_size=batch)
            after = cost.count(converted, batch_size=batch)
            m_before = cost.measure_flops(
                model, input_size=plan.input_size, device="cpu", batch_size=batch
            )
            m_after = cost.measure_flops(converted, device="cpu", batch_size=batch)
            ok = before.flops == m_before and after.flops == m_after
            all_ok &= ok
            verdict = "exact" if ok else f"NO: {m_before} / {m_after}"
            print(
                f"{name:24s} {shown:>9s} {kind:>8s} {batch:2d} {before.flops / 1e9:14.4f} "
                f"{after.flops / 1e9:17.4f} {(after.flops / before.flops - 1) * 100:+6.1f}% "
                f"{len(plan.converted):3d}/{len(plan.layers):<3d}  {verdict}"
            )
        sys.stdout.flush()
    print(f"all exact: {all_ok}\n")
    return all_ok


def _per_call(fn, n: int) -> float:
    fn()
    best = []
    for _ in range(5):  # best of 5 runs of n calls, in thread CPU time: the machine is shared
        start = time.thread_time()
        for _ in range(n):
            fn()
        best.append((time.thread_time() - start) / n)
    return min(best)


def pricing() -> None:
    print("## pricing one plan (resnet50 at 3x224x224)")
    model = timm.create_model("resnet50").eval()
    start = time.perf_counter()
    trace = dynify.trace_model(model)
    print(f"trace (once per model): {time.perf_counter() - start:.2f} s")
    plans = {r: dynify.make_plan(trace, r) for r in ("dycnn", "mobile", "all")}
    for recipe, plan in plans.items():
        c = _per_call(lambda plan=plan: cost.count(plan), 200)
        p = _per_call(lambda plan=plan: cost.price(plan), 200)
        print(
            f"{recipe:6s}: count (all rows) {c * 1e3:.3f} ms, price (totals) {p * 1e3:.3f} ms "
            f"-> {cost.count(plan).macs / 1e9:.3f} GMACs"
        )
    r = _per_call(lambda: dynify.make_plan(trace, "dycnn"), 20)
    print(f"make_plan(trace, 'dycnn') (recipe resolution, not pricing): {r * 1e3:.2f} ms\n")


def latency(repeats: int, clock: str) -> list[str]:
    what = "thread CPU time" if clock == "thread" else "wall clock"
    print(
        f"## latency on the CPU ({torch.get_num_threads()} threads, {what}), converted / static,"
        f" interleaved, median of {repeats} paired rounds"
    )
    print(
        f"{'model':22s} {'recipe':6s} {'B':>2s} {'+FLOPs':>7s} {'static ms':>10s} "
        f"{'converted ms':>13s} {'ratio':>6s} {'IQR':>11s}"
    )
    misses = []
    targets = {1: 1.20, 8: 1.5}
    for name in ("resnet50", "mobilenetv3_large_100"):
        model = timm.create_model(name).eval()
        for recipe in ("dycnn", "mobile"):
            converted = dynify.apply(model, recipe)
            plan = dynify.plan_of(converted)
            extra = cost.count(plan).flops / cost.count(plan, static=True).flops - 1
            for batch in (1, 8):
                cmp = cost.compare_latency(
                    model,
                    converted,
                    plan.input_size,
                    device="cpu",
                    batch_size=batch,
                    warmup=2,
                    repeats=repeats,
                    clock=clock,
                )
                ratios = sorted(cmp.ratios)
                q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
                print(
                    f"{name:22s} {recipe:6s} {batch:2d} {extra * 100:+6.1f}% "
                    f"{cmp.static.median_ms:10.1f} {cmp.converted.median_ms:13.1f} "
                    f"{cmp.ratio:6.2f} {q1:5.2f}-{q3:4.2f}"
                )
                sys.stdout.flush()
                if name == "resnet50" and recipe == "dycnn" and cmp.ratio > targets[batch]:
                    misses.append(f"resnet50 dycnn batch {batch}: x{cmp.ratio:.2f}")
            if name == "resnet50" and recipe == "dycnn" and extra > 0.05:
                misses.append(f"resnet50 dycnn FLOPs +{extra * 100:.1f}%")
    print("targets missed: " + (", ".join(misses) if misses else "none") + "\n")
    return misses


def profile(batches: tuple[int, ...] = (1, 8), rounds: int = 5) -> None:
    """Where a converted resnet50 (dycnn) spends its extra time: torch.profiler self CPU
    time per aten op, static and converted; each op's minimum over ``rounds`` profiled
    passes, so that passes slowed by other processes do not count."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    print(
        f"## profile: resnet50 dycnn, {torch.get_num_threads()} threads, self CPU time per op "
        f"(ms per pass, each op's minimum over {rounds} passes)"
    )
    model = timm.create_model("resnet50").eval()
    converted = dynify.apply(model, "dycnn")
    for batch in batches:
        x = torch.randn(batch, 3, 224, 224)
        per_op: dict[str, list[float]] = {}
        for i, m in enumerate((model, converted)):
            with torch.inference_mode():
                m(x)
                for _ in range(rounds):
                    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                        m(x)
                    for evt in prof.key_averages():
                        slot = per_op.setdefault(evt.key, [float("inf"), float("inf")])
                        slot[i] = min(slot[i], evt.self_cpu_time_total / 1e3)
        for slot in per_op.values():
            slot[:] = [0.0 if v == float("inf") else v for v in slot]
        total = [sum(v[i] for v in per_op.values()) for i in (0, 1)]
        print(
            f"batch {batch}: static {total[0]:.1f} ms, converted {total[1]:.1f} ms "
            f"(x{total[1] / total[0]:.2f}; sums of per-op minima, profiler overhead included)"
        )
        print(f"  {'op':36s} {'static':>8s} {'conv.':>8s} {'extra':>8s}")
        ranked = sorted(per_op.items(), key=lambda kv: -abs(kv[1][1] - kv[1][0]))
        for op, (a, b) in ranked[:10]:
            print(f"  {op:36s} {a:8.2f} {b:8.2f} {b - a:+8.2f}")
        sys.stdout.flush()
    _mixing_alone(converted)
    print()


def _mixing_alone(converted: torch.nn.Module, rounds: int = 5) -> None:
    """Batch-1 kernel mixing of every dynamic layer, timed alone (thread CPU time, best of
    ``rounds``), against the bytes of experts it must read: mixing is memory-bound."""
    from dynify.layers import mix_kernels

    layers = [m for m in converted.modules() if isinstance(m, dynify.DynamicConv2d)]
    read = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    written = read // layers[0].num_experts
    routing = [torch.softmax(torch.randn(1, m.num_experts), dim=1) for m in layers]
    best = float("inf")
    with torch.inference_mode():
        for _ in range(rounds):
            start = time.thread_time()
            for m, r in zip(layers, routing, strict=True):
                mix_kernels(r, m.weight, reuse=True)
            best = min(best, time.thread_time() - start)
        src = torch.empty(read // 4)
        dst = torch.empty_like(src)
        copy = float("inf")
        for _ in range(rounds):
            start = time.thread_time()
            dst.copy_(src)
            copy = min(copy, time.thread_time() - start)
    print(
        f"batch-1 kernel mixing alone, {len(layers)} layers: {best * 1e3:.1f} ms; reads "
        f"{read / 1e6:.0f} MB of experts, writes {written / 1e6:.0f} MB "
        f"({(read + written) / best / 1e9:.1f} GB/s); a plain copy of {read / 1e6:.0f} MB "
        f"moves {2 * read / copy / 1e9:.1f} GB/s here"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("agreement", "pricing", "latency", "profile"))
    parser.add_argument("--archs", default=",".join(ISSUE_FAMILIES))
    parser.add_argument("--size", default=None, help="C,H,W for the agreement survey")
    parser.add_argument("--kinds", default="dycnn", help="kinds for the agreement survey")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads for latency and profile"
    )
    parser.add_argument(
        "--clock",
        choices=("thread", "wall"),
        default="thread",
        help="latency clock: the thread's CPU time (robust to other processes; needs "
        "--threads 1) or the wall clock",
    )
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split(",")) if args.size else None
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, timm {timm.__version__}, dynify {dynify.__version__}\n")
    ok = True
    if args.only in (None, "agreement"):
        kinds = tuple(args.kinds.split(","))
        ok = agreement(args.archs.split(","), size, kinds)  # type: ignore[arg-type]
    if args.only in (None, "pricing"):
        pricing()
    if args.only in (None, "latency"):
        latency(args.repeats, args.clock)
    if args.only in (None, "profile"):
        profile()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

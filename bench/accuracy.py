"""Accuracy experiment: does dynify reproduce DY-CNN's gain on real data?

On CIFAR-10 (the offline copy in ../shared/data/cifar10), a small timm model is trained
from scratch three ways with the same budget (epochs, images, batch, LR schedule, seeds):
static, converted with the ``dycnn`` recipe, and converted with the ``mobile`` recipe. For
each it reports top-1 (mean, spread and the per-seed values) on the test split (a fixed
subset of it, the same images for every run), top-5, MACs and parameters at the training
size, and training images/s.

The runs are interleaved seed by seed (static, dycnn, mobile for seed 0, then seed 1, ...),
so a change in machine load during the experiment affects the three alike. The
temperature anneals 30 -> 1 linearly over the first ``--t-fraction`` of the run (the paper:
10 of ~100 epochs); with the recipes' fixed 10 epochs a short run would end still hot.

Run from the repository root (46 minutes here with the defaults, one torch thread, on the
2-core CPU shared with a test run for its first half; the dycnn variant trains at about
0.7x the static images/s):

    python bench/accuracy.py --output bench/results/accuracy.json

Recorded, not asserted: see bench/README.md ("## Accuracy").
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

import dynify
from dynify.schedule import TemperatureSchedule
from dynify.train import FinetuneSettings, evaluate, finetune, load_data

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="folder with train.tar, test.tar")
    p.add_argument("--model", default="test_resnet", help="timm model, trained from scratch")
    p.add_argument("--variants", default="static,dycnn,mobile", help="static and/or recipes")
    p.add_argument(
        "--init", default="scratch", choices=("scratch", "upcycle"),
        help="how converted layers start (the paper trains from scratch: independent experts)",
    )  # fmt: skip
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--train-images", type=int, default=25_000, help="fixed training subset")
    p.add_argument("--monitor-images", type=int, default=500, help="per-epoch val subset")
    p.add_argument("--test-images", type=int, default=10_000, help="final test images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--t-fraction", type=float, default=0.2, help="share of the run to anneal T")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared machine 2 threads thrash, 5x slower here)",
    )
    p.add_argument("--output", default=None, help="write the raw results as JSON here")
    return p.parse_args(argv)


def macs_and_params(model: torch.nn.Module, size: int) -> tuple[int, int, str]:
    """Per-image MACs and parameters; dynify.cost when present, else FlopCounterMode / 2."""
    try:
        from dynify import cost

        report = cost.count(model, input_size=(3, size, size))
        return report.macs, report.params, "dynify.cost.count"
    except ImportError:
        from torch.utils.flop_counter import FlopCounterMode

        model.eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.zeros(1, 3, size, size))
        params = sum(p.numel() for p in model.parameters())
        return counter.get_total_flops() // 2, params, "FlopCounterMode / 2"


def build(name: str, variant: str, seed: int, size: int, init: str = "scratch") -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=10)
    if variant == "static":
        return model
    # From scratch, the experts are initialised independently as in the DY-CNN paper
    # (init: scratch), not copied from the random static init; --init upcycle copies them.
    recipe = dynify.load_recipe(variant).to_dict()
    recipe["defaults"]["init"] = init
    return dynify.apply(model, recipe, input_size=(3, size, size), seed=seed)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    train_data = load_data(
        args.data, train_images=args.train_images, val_images=args.monitor_images
    )
    # The final numbers: the test split (or a fixed subset), the same images for every run.
    test_data = load_data(args.data, val_images=min(args.test_images, 10_000))
    print(f"data: {train_data.describe()}; final test: {len(test_data.val):,} images")
    schedule = TemperatureSchedule(
        start=30, end=1, length=max(args.t_fraction * args.epochs, 1e-9), shape="linear"
    )
    costs = {}
    for v in variants:
        macs, params, how = macs_and_params(
            build(args.model, v, 0, args.img_size, args.init), args.img_size
        )
        costs[v] = {"macs": macs, "params": params, "counted_by": how}
        print(f"{args.model} {v}: {macs / 1e6:.2f} MMACs, {params / 1e6:.3f} M params ({how})")

    runs = []
    for seed in seeds:
        for v in variants:
            model = build(args.model, v, seed, args.img_size, args.init)
            start = time.perf_counter()
            settings = FinetuneSettings(
                data=train_data,
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                weight_decay=args.weight_decay,
                img_size=args.img_size,
                aug_scale=(0.35, 1.0),
                temperature=schedule,
                seed=seed,
                workers=args.workers,
                device="cpu",
                progress=False,
            )
            result = finetune(model, settings)
            train_s = time.perf_counter() - start
            final = evaluate(
                model=result.model,
                data=test_data,
                img_size=args.img_size,
                workers=args.workers,
                device="cpu",
            )
            run = {
                "variant": v,
                "seed": seed,
                "top1": final["val_top1"],
                "top5": final["val_top5"],
                "test_loss": final["val_loss"],
                "train_images_per_s": result.images_per_s,
                "train_seconds": train_s,
                "history": result.history,
            }
            runs.append(run)
            print(
                f"seed {seed} {v:>6}: top-1 {run['top1']:.2f}% top-5 {run['top5']:.2f}% "
                f"({result.images_per_s:.0f} img/s, {train_s:.0f} s)",
                flush=True,
            )

    table = summarise(args, variants, costs, runs)
    print(table)
    total = time.perf_counter() - t0
    print(
        f"total {total / 60:.1f} min on {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads"
    )
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "command": " ".join(["python", "bench/accuracy.py", *(argv or sys.argv[1:])]),
            "settings": vars(args),
            "costs": costs,
            "runs": runs,
            "table": table,
            "minutes": total / 60,
        }
        out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


def summarise(args: argparse.Namespace, variants: list[str], costs: dict, runs: list) -> str:
    base = [r["top1"] for r in runs if r["variant"] == "static"]
    lines = [
        f"{args.model} from scratch on CIFAR-10 at {args.img_size}px: {args.epochs} epochs x "
        f"{args.train_images:,} images, batch {args.batch_size}, SGD lr {args.lr} cosine, "
        f"seeds {args.seeds}; top-1/top-5 on {args.test_images:,} fixed test images",
        "",
        "| variant | MMACs | params | top-1 mean ± sd (per seed) | Δ top-1 vs static | top-5 "
        "| train img/s |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for v in variants:
        rs = [r for r in runs if r["variant"] == v]
        top1 = [r["top1"] for r in rs]
        sd = statistics.stdev(top1) if len(top1) > 1 else math.nan
        per_seed = ", ".join(f"{t:.2f}" for t in top1)
        if v == "static" or not base:
            delta = "-"
        else:
            # paired by seed: the same data order and subset for both
            diffs = [a - b for a, b in zip(top1, base, strict=True)]
            dsd = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
            delta = f"{statistics.mean(diffs):+.2f} ± {dsd:.2f}"
        c = costs[v]
        macs_change = ""
        if v != "static" and "static" in costs:
            macs_change = f" ({100 * (c['macs'] / costs['static']['macs'] - 1):+.1f}%)"
        lines.append(
            f"| {v} | {c['macs'] / 1e6:.2f}{macs_change} | {c['params'] / 1e6:.3f} M "
            f"| {statistics.mean(top1):.2f} ± {sd:.2f} ({per_seed}) | {delta} "
            f"| {statistics.mean(r['top5'] for r in rs):.2f} "
            f"| {statistics.mean(r['train_images_per_s'] for r in rs):.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

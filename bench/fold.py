"""What ``dynify fold`` removes from the upcycling benchmark's models, and what it costs.

The models are bench/upcycle.py's (its CIFAR ResNet, upcycled from the same static
checkpoint, ``pretrained.pt``, by each kind's bundled recipe and fine-tuned one epoch on all
50,000 CIFAR-10 training images with that script's loop and seeds), saved here as artifacts.
Each is then folded (``dynify.fold.fold``: routing measured on 512 training images) at
several ``max_effect`` thresholds with ``min_usage`` 1%, and scored on all 10,000 test images
before and after. Reported per kind and threshold: the layers folded and experts dropped,
MACs and parameters removed, and the top-1 change with a 95% confidence interval over
seeds (paired: the same model before and after).

Resumable per run: one artifact per trained model and one JSON file per fold in
``--output``, each skipped when present.

    python bench/fold.py                        # see bench/README.md for the time it took
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import upcycle as up

import dynify
from dynify import cost
from dynify.fold import fold

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(up.DEFAULT_DATA), help="folder with train.tar, test.tar")
    p.add_argument("--upcycle", default=str(ROOT / "bench" / "results" / "upcycle"),
                   help="bench/upcycle.py's output (its pretrained.pt and data cache)")  # fmt: skip
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "fold"))
    p.add_argument("--variants", default="dycnn,condconv,odconv,dcd")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--thresholds", default="0.002,0.005,0.01,0.02", help="max_effect values")
    p.add_argument("--min-usage", type=float, default=0.01)
    p.add_argument("--images", type=int, default=512, help="training images fold measures on")
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--finetune-lr", type=float, default=0.04)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--train-only", action="store_true", help="train and save the models only")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def trained(variant: str, seed: int, args, x, y, tx, ty, out: Path) -> Path:
    """The upcycled model of ``variant`` and ``seed``, trained as bench/upcycle.py trains it
    (its run_one), saved as an artifact; reused when present."""
    path = out / f"model-{variant}-s{seed}.safetensors"
    if path.exists():
        return path
    base = up.cifar_resnet(args.width, seed=1000)
    base.load_state_dict(torch.load(Path(args.upcycle) / "pretrained.pt", weights_only=True))
    model = dynify.apply(base, variant, input_size=(3, 32, 32), seed=seed)
    t0 = time.perf_counter()
    up.train(model, x, y, epochs=args.finetune_epochs, lr=args.finetune_lr,
             batch_size=args.batch_size, seed=seed, warmup=0.0)  # fmt: skip
    top1 = up.test_top1(model, tx, ty)
    dynify.save(model, path, model_name=f"cifar_resnet10_w{args.width}",
                extra={"top1": top1, "seconds": time.perf_counter() - t0})  # fmt: skip
    print(f"trained {variant} seed {seed}: top-1 {top1:.2f}%", flush=True)
    return path


def folded(model_path: Path, threshold: float, args, x, tx, ty, out: Path) -> dict:
    name = model_path.stem.removeprefix("model-")
    path = out / f"fold-{name}-e{threshold:g}.json"
    if path.exists():
        return json.loads(path.read_text())
    model = dynify.load(model_path).eval()
    images = up.normalise(x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
                            [: args.images]])  # fmt: skip
    t0 = time.perf_counter()
    small, report = fold(model, images, max_effect=threshold, min_usage=args.min_usage,
                         max_images=args.images)  # fmt: skip
    seconds = time.perf_counter() - t0
    record = {
        "model": name,
        "max_effect": threshold,
        "min_usage": args.min_usage,
        "top1_before": up.test_top1(model, tx, ty),
        "top1_after": up.test_top1(small, tx, ty),
        "seconds": seconds,
        "static_macs": cost.count(dynify.plan_of(model), static=True).macs,
        **{k: v for k, v in report.to_dict().items() if k != "layers"},
        "folded": len(report.folded),
        "dropped_experts": sum(len(lf.dropped) for lf in report.layers if lf.action == "dropped"),
        "layers": len(report.layers),
        "per_layer": [lf.to_dict() for lf in report.layers],
    }
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"fold {name} max_effect {threshold:g}: {report.summary()}; test top-1 "
          f"{record['top1_before']:.2f} -> {record['top1_after']:.2f}", flush=True)  # fmt: skip
    return record


def _ci(values: list[float]) -> str:
    mean = statistics.mean(values)
    if len(values) < 2:
        return f"{mean:+.2f}"
    half = up.T95[len(values) - 1] * statistics.stdev(values) / len(values) ** 0.5
    return f"{mean:+.2f} ({mean - half:+.2f} to {mean + half:+.2f})"


def summarise(records: list[dict]) -> list[str]:
    lines = [
        "| kind | max_effect | layers folded | experts dropped | MACs (vs static) | "
        "MACs removed | params removed | top-1 before | top-1 change (95% CI) | output change |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in records:
        groups.setdefault((r["model"].rsplit("-s", 1)[0], r["max_effect"]), []).append(r)
    for (kind, threshold), rs in sorted(groups.items()):
        m = statistics.mean
        lines.append(
            f"| {kind} | {threshold:g} | {m(r['folded'] for r in rs):.1f}/{rs[0]['layers']} | "
            f"{m(r['dropped_experts'] for r in rs):.1f} | "
            f"{m(r['macs_after'] / r['static_macs'] for r in rs):.3f}x | "
            f"{100 * m(1 - r['macs_after'] / r['macs_before'] for r in rs):.1f}% | "
            f"{100 * m(1 - r['params_after'] / r['params_before'] for r in rs):.1f}% | "
            f"{m(r['top1_before'] for r in rs):.2f} | "
            f"{_ci([r['top1_after'] - r['top1_before'] for r in rs])} | "
            f"{100 * m(r['effect'] for r in rs):.2f}% |"
        )
    lines.append(f"\n({len(records)} folds; seeds per row: {len(rs)})")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.upcycle) / "cache"
    x, y = up.load_split(Path(args.data), "train", cache)
    tx, ty = up.load_split(Path(args.data), "test", cache)
    if not (Path(args.upcycle) / "pretrained.pt").exists():
        print("run bench/upcycle.py first: it trains the static checkpoint (pretrained.pt)")
        return 2
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    models = [trained(v, s, args, x, y, tx, ty, out) for s in seeds for v in variants]
    if args.train_only:
        return 0
    records = [folded(p, t, args, x, tx, ty, out) for p in models for t in thresholds]
    text = summarise(records)
    (out / "summary.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What conversion buys: upcycling a trained CIFAR-10 model, and DY-CNN from scratch.

Real CIFAR-10 (../shared/data/cifar10: all 50,000 training and 10,000 test images), a
CIFAR-style ResNet (timm's ResNet with BasicBlocks, layers 1-1-1-1, widths 16-32-64-128,
its 7x7/2 stem and max pool replaced by one 3x3/1 conv, so the feature maps are 32, 16, 8
and 4 pixels: not the tiny-map failure of an ImageNet stem on 32 px).

- *Upcycling* (the design's use case): a static model is trained once (``pretrained.pt``,
  reused when present); then, for every seed, each variant starts from that checkpoint and
  gets the same extra budget: ``static`` (fine-tuned on), ``dycnn`` and ``mobile`` (the
  bundled recipes, converted with ``dynify.apply``: exact at conversion) and, with
  ``--search N``, the best plan of an N-trial ``dynify search`` run from the same checkpoint
  (space ``bench/upcycle-space.yaml``, budget static MACs +10%; the model is registered
  with timm as ``cifar_resnet10_w16``), or a given ``--plan best.yaml``.
- *From scratch*: ``static`` against ``dycnn-scratch`` (independent experts, T 30 -> 1),
  same random init of the shared weights, same budget; and ``dycnn-scratch-frozen``, the
  control: the same experts with the attention held uniform (a static conv parametrised as
  the mean of its K kernels), so that a gain from the parametrisation is not taken for one
  from routing.

Training is a fast CIFAR loop in the spirit of airbench (images decoded once into a
uint8 tensor, random crop with 4-pixel reflection padding and flips done on tensors, SGD
with Nesterov momentum, label smoothing 0.2, a linear warm-up then linear decay), driven
through the public API: ``dynify.apply`` and ``dynify.TemperatureScheduler`` in the loop.
Every run is scored on the full 10,000 test images and reports MACs and parameters (the
cost model, per image at 32x32), training images/s, and the routing diagnostics on 512
test images (``dynify.routing_report``). Deltas are paired by seed against ``static``,
with a 95% confidence interval (Student t over seeds).

Resumable per run: one JSON file per run in ``--output``, skipped when present.

    python bench/upcycle.py                     # see bench/README.md for the time it took
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

import dynify
from dynify import cost

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10"
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
# Two-sided 95% Student t quantiles by degrees of freedom.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="folder with train.tar, test.tar")
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "upcycle"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--width", type=int, default=16, help="first stage's channels")
    p.add_argument("--pretrain-epochs", type=int, default=8)
    p.add_argument("--pretrain-lr", type=float, default=0.2)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--finetune-lr", type=float, default=0.04)
    p.add_argument("--scratch-epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--variants", default="static,dycnn,mobile", help="upcycling variants")
    p.add_argument("--plan", default=None, help="a searched recipe (best.yaml) to add")
    p.add_argument(
        "--search", type=int, default=0, metavar="N", help="add the best plan of an N-trial search"
    )
    p.add_argument("--no-scratch", action="store_true", help="skip the from-scratch runs")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


# -- data ---------------------------------------------------------------------------------


def load_split(data: Path, split: str, cache: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of ``split`` as uint8 (N, 3, 32, 32) and labels, decoded once."""
    path = cache / f"cifar10-{split}.pt"
    if path.exists():
        blob = torch.load(path, weights_only=True)
        return blob["x"], blob["y"]
    ds = timm.data.create_dataset("", root=str(data / f"{split}.tar"))
    xs = np.empty((len(ds), 32, 32, 3), dtype=np.uint8)
    ys = np.empty(len(ds), dtype=np.int64)
    for i in range(len(ds)):
        img, label = ds[i]
        xs[i] = np.asarray(img.convert("RGB"), dtype=np.uint8)
        ys[i] = label
    x = torch.from_numpy(xs).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(ys)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"x": x, "y": y}, path)
    return x, y


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255 - MEAN) / STD


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random 32x32 crop of the 4-pixel reflection-padded batch, and random flips."""
    n = x.shape[0]
    padded = F.pad(x.float(), (4, 4, 4, 4), mode="reflect")
    dx = torch.randint(0, 9, (n,), generator=g).tolist()
    dy = torch.randint(0, 9, (n,), generator=g).tolist()
    out = torch.stack([padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32] for i in range(n)])
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(3)
    return out


# -- model --------------------------------------------------------------------------------


@timm.models.register_model
def cifar_resnet10_w16(pretrained: bool = False, **kwargs) -> nn.Module:
    """The benchmark's model as a timm name, so that ``dynify search`` can build it."""
    model = cifar_resnet(16, seed=0, num_classes=kwargs.get("num_classes", 10))
    return model


def cifar_resnet(width: int, seed: int, num_classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    model = ResNet(
        BasicBlock,
        layers=(1, 1, 1, 1),
        channels=(width, 2 * width, 4 * width, 8 * width),
        num_classes=num_classes,
    )
    # CIFAR stem: one 3x3/1 conv to `width` channels (timm's plain stem always makes 64, so
    # the first block is rebuilt to take `width` and drops its 1x1 shortcut projection).
    model.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    model.maxpool = nn.Identity()
    first = model.layer1[0]
    first.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
    first.downsample = None
    for m in (model.conv1, first.conv1):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    model.pretrained_cfg = {"architecture": f"cifar_resnet10_w{width}", "input_size": (3, 32, 32)}
    return model


# -- training -----------------------------------------------------------------------------


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    warmup: float,
) -> float:
    """Train in place; returns training images per second."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() <= 1 or name.endswith(".bias") else decay).append(p)
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0}],
        lr=lr, momentum=0.9, nesterov=True,
    )  # fmt: skip
    steps_per_epoch = x.shape[0] // batch_size
    total = epochs * steps_per_epoch
    warm = max(1, int(warmup * total))

    def factor(step: int) -> float:
        return step / warm if step < warm else max(0.0, (total - step) / (total - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    temperature = None
    try:
        dynify.plan_of(model)
        temperature = dynify.TemperatureScheduler(model, steps_per_epoch=steps_per_epoch)
    except dynify.DynifyError:
        pass
    g = torch.Generator().manual_seed(seed)
    model.train()
    seen, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=g)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            xb = normalise(augment(x[idx], g))
            loss = F.cross_entropy(model(xb), y[idx], label_smoothing=0.2)
            if not math.isfinite(loss.item()):
                raise RuntimeError("loss is not finite")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if temperature is not None:
                temperature.step()
            seen += xb.shape[0]
    return seen / (time.perf_counter() - t0)


@torch.no_grad()
def test_top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], 500):
        correct += int((model(normalise(x[i : i + 500])).argmax(1) == y[i : i + 500]).sum())
    return 100 * correct / x.shape[0]


def describe(model: nn.Module, static_model: nn.Module, tx: torch.Tensor) -> dict:
    try:
        plan = dynify.plan_of(model)
    except dynify.DynifyError:
        report = cost.count(static_model, input_size=(3, 32, 32))
        return {"macs": report.macs, "params": report.params, "routing": None}
    report = cost.count(plan)
    routing = dynify.routing_report(model, normalise(tx[:512]))
    return {"macs": report.macs, "params": report.params, "routing": routing.to_dict()}


# -- runs ---------------------------------------------------------------------------------


def pretrained(args, x, y, tx, ty, out: Path) -> dict:
    path, meta = out / "pretrained.pt", out / "pretrained.json"
    if path.exists() and meta.exists():
        return json.loads(meta.read_text())
    model = cifar_resnet(args.width, seed=1000)
    t0 = time.perf_counter()
    rate = train(model, x, y, epochs=args.pretrain_epochs, lr=args.pretrain_lr,
                 batch_size=args.batch_size, seed=1000, warmup=0.15)  # fmt: skip
    info = {
        "epochs": args.pretrain_epochs,
        "lr": args.pretrain_lr,
        "width": args.width,
        "top1": test_top1(model, tx, ty),
        "images_per_s": rate,
        "seconds": time.perf_counter() - t0,
    }
    torch.save(model.state_dict(), path)
    meta.write_text(json.dumps(info, indent=1) + "\n")
    print(f"pretrained static model: top-1 {info['top1']:.2f}% ({info['seconds']:.0f} s)")
    return info


def searched_plan(args, out: Path) -> str:
    """Run (or resume) the search from the pretrained checkpoint; its best.yaml."""
    from dynify.search.run import search
    from dynify.search.study import SearchSettings

    folder = out / "search"
    best = folder / "best.yaml"
    if best.exists():
        return str(best)
    static_macs = cost.count(cifar_resnet(args.width, 0), input_size=(3, 32, 32)).macs
    budget = f"{1.10 * static_macs / 1e6:.3f}MMACs"
    outcome = search(
        SearchSettings(
            budget=budget,
            space=str(ROOT / "bench" / "upcycle-space.yaml"),
            data=str(Path(args.data) / "train.tar"),
            trials=args.search,
            output=str(folder),
            checkpoint=str(out / "pretrained.pt"),
            device="cpu",
            progress=False,
        )
    )
    print(outcome.summary, flush=True)
    return str(best)


def run_one(kind: str, variant: str, seed: int, args, x, y, tx, ty, out: Path) -> dict:
    path = out / f"{kind}-{variant.replace('/', '_')}-s{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    if kind == "upcycle":
        base = cifar_resnet(args.width, seed=1000)
        base.load_state_dict(torch.load(out / "pretrained.pt", weights_only=True))
        epochs, lr, warmup = args.finetune_epochs, args.finetune_lr, 0.0
    else:
        base = cifar_resnet(args.width, seed=2000 + seed)
        epochs, lr, warmup = args.scratch_epochs, args.pretrain_lr, 0.15
    if variant == "static":
        model = base
    else:
        recipe = args.plan if variant == "searched" else variant.removesuffix("-frozen")
        model = dynify.apply(base, recipe, input_size=(3, 32, 32), seed=seed)
    if variant.endswith("-frozen"):
        # The control: the same experts with the attention held uniform (zero logits, not
        # trained), i.e. a static conv parametrised as the mean of K kernels. What it gains
        # over static is not routing.
        for _, layer in dynify.routing.dynamic_layers(model):
            with torch.no_grad():
                layer.attention.fc2.weight.zero_()
                layer.attention.fc2.bias.zero_()
            layer.attention.requires_grad_(False)
    before = test_top1(model, tx, ty)
    t0 = time.perf_counter()
    rate = train(model, x, y, epochs=epochs, lr=lr, batch_size=args.batch_size,
                 seed=seed, warmup=warmup)  # fmt: skip
    record = {
        "kind": kind,
        "variant": variant,
        "seed": seed,
        "epochs": epochs,
        "lr": lr,
        "top1_before": before,
        "top1": test_top1(model, tx, ty),
        "images_per_s": rate,
        "seconds": time.perf_counter() - t0,
        **describe(model, base, tx),
    }
    path.write_text(json.dumps(record, indent=1) + "\n")
    effect = record["routing"]["effect"] if record["routing"] else 0.0
    print(f"{kind:8s} {variant:14s} seed {seed}: top-1 {record['top1_before']:.2f} -> "
          f"{record['top1']:.2f}  routing effect {100 * effect:.2f}%  "
          f"{rate:.0f} img/s", flush=True)  # fmt: skip
    return record


def side_by_side_speed(args, x, y, out: Path, variants: list[str]) -> dict[str, float]:
    """Training images/s of every variant, timed round-robin in this one process (the
    runs' own rates depend on what else the machine was doing while each ran)."""
    models = {}
    for variant in variants:
        base = cifar_resnet(args.width, seed=1000)
        if variant == "static":
            models[variant] = base
        else:
            recipe = args.plan if variant == "searched" else variant
            models[variant] = dynify.apply(base, recipe, input_size=(3, 32, 32), check=False)
    g = torch.Generator().manual_seed(0)
    batches = [(x[i * 256 : (i + 1) * 256], y[i * 256 : (i + 1) * 256]) for i in range(4)]
    times: dict[str, list[float]] = {v: [] for v in models}
    for round_ in range(4):
        for variant, model in models.items():
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            model.train()
            t0 = time.perf_counter()
            for xb, yb in batches:
                loss = F.cross_entropy(model(normalise(augment(xb, g))), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
            if round_:  # the first round warms up
                times[variant].append(time.perf_counter() - t0)
    return {v: 4 * 256 / statistics.median(t) for v, t in times.items()}


def summarise(records: list[dict], kind: str, speed: dict[str, float] | None = None) -> list[str]:
    runs = [r for r in records if r["kind"] == kind]
    static = {r["seed"]: r for r in runs if r["variant"] == "static"}
    lines = [
        "| variant | top-1 (mean of seeds) | delta vs static, paired (95% CI) | MACs | params "
        "| train img/s (side by side) | routing effect | entropy | seeds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rs = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["seed"])
        top1 = statistics.fmean(r["top1"] for r in rs)
        deltas = [r["top1"] - static[r["seed"]]["top1"] for r in rs if r["seed"] in static]
        if variant == "static" or not deltas:
            delta = "-"
        else:
            mean = statistics.fmean(deltas)
            if len(deltas) > 1:
                half = T95.get(len(deltas) - 1, 1.96) * statistics.stdev(deltas)
                half /= math.sqrt(len(deltas))
                delta = f"{mean:+.2f} ({mean - half:+.2f} to {mean + half:+.2f})"
            else:
                delta = f"{mean:+.2f} (one seed)"
        macs = rs[0]["macs"] / 1e6
        params = rs[0]["params"] / 1e6
        rate = (speed or {}).get(variant) or statistics.fmean(r["images_per_s"] for r in rs)
        routed = [r["routing"] for r in rs if r["routing"]]
        effect = f"{100 * statistics.fmean(r['effect'] for r in routed):.2f}%" if routed else "-"
        entropy = f"{statistics.fmean(r['entropy'] for r in routed):.3f}" if routed else "-"
        lines.append(
            f"| {variant} | {top1:.2f} | {delta} | {macs:.1f}M | {params:.2f}M | {rate:.0f} "
            f"| {effect} | {entropy} | {len(rs)} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "cache"
    x, y = load_split(Path(args.data), "train", cache)
    tx, ty = load_split(Path(args.data), "test", cache)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.plan:
        variants.append("searched")
    info = pretrained(args, x, y, tx, ty, out)
    if args.search:
        args.plan = searched_plan(args, out)
        variants.append("searched")
    records = []
    for seed in seeds:  # interleaved seed by seed: a change in load hits every variant alike
        for variant in variants:
            records.append(run_one("upcycle", variant, seed, args, x, y, tx, ty, out))
    if not args.no_scratch:
        for seed in seeds:
            for variant in ("static", "dycnn-scratch", "dycnn-scratch-frozen"):
                records.append(run_one("scratch", variant, seed, args, x, y, tx, ty, out))
    speed = side_by_side_speed(args, x, y, out, [*variants, "dycnn-scratch"])
    (out / "speed.json").write_text(json.dumps(speed, indent=1) + "\n")
    text = [
        f"Upcycling: from the static model trained {info['epochs']} epochs (test top-1 "
        f"{info['top1']:.2f}%), {args.finetune_epochs} more epochs each, lr {args.finetune_lr}:",
        "",
        *summarise(records, "upcycle", speed),
    ]
    if not args.no_scratch:
        text += ["", f"From scratch, {args.scratch_epochs} epochs each:", "",
                 *summarise(records, "scratch", speed)]  # fmt: skip
    (out / "summary.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())

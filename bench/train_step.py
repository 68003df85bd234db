"""One training step of a whole network, each kind of dynamic conv against the static model.

For each network (timm's resnet18 at 32x32, and the upcycling benchmark's CIFAR ResNet) the
static model and its conversion by every kind (the bundled recipes: ``dycnn``, ``condconv``,
``odconv``, ``dcd``) take SGD steps (forward, backward, update) on the same random batch,
side by side in this one process, in rotating order; a kind's ratio is the median over the
rounds of its step time over the static model's in the same round, so the machine's drift
and other load cancel. Targets (recorded, not asserted): DCD <= 1.3x, ODConv <= 2x.

    python bench/train_step.py                   # B=32, 7 rounds
    python bench/train_step.py --batch 128 --rounds 5 --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

import dynify

ROOT = Path(__file__).resolve().parent
KINDS = ("dycnn", "condconv", "odconv", "dcd")
TARGETS = {"dcd": 1.3, "odconv": 2.0}


def _cifar_model() -> nn.Module:
    spec = importlib.util.spec_from_file_location("upcycle", ROOT / "upcycle.py")
    assert spec is not None and spec.loader is not None
    upcycle = importlib.util.module_from_spec(spec)
    sys.modules["upcycle"] = upcycle
    spec.loader.exec_module(upcycle)
    return upcycle.cifar_resnet(16, seed=0)


NETWORKS = {
    "resnet18@32": lambda: timm.create_model("resnet18", pretrained=False, num_classes=10),
    "cifar-resnet10-w16": _cifar_model,
}


def step_time(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def measure(name: str, batch: int, rounds: int, steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    static = NETWORKS[name]()
    models = {"static": static}
    for kind in KINDS:
        models[kind] = dynify.apply(static, kind, input_size=(3, 32, 32), check=False)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    for model in models.values():  # warm-up: allocator, oneDNN primitives
        step_time(model, x, y, 1)
    times: dict[str, list[float]] = {k: [] for k in models}
    order = list(models)
    for r in range(rounds):
        for key in order[r % len(order) :] + order[: r % len(order)]:
            times[key].append(step_time(models[key], x, y, steps))
    ratios = {
        k: statistics.median(t / s for t, s in zip(times[k], times["static"], strict=True))
        for k in KINDS
    }
    ratios["static_ms"] = 1e3 * statistics.median(times["static"])
    return ratios


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=2, help="steps per timing")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"one SGD step at 32x32, B={args.batch}, time as a multiple of the static model's "
          f"(median of {args.rounds} rounds); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print()
    print("| network | static ms | " + " | ".join(KINDS) + " |")
    print("|---|---:|" + "---:|" * len(KINDS))
    verdicts = []
    for name in NETWORKS:
        r = measure(name, args.batch, args.rounds, args.steps)
        print(f"| {name} | {r['static_ms']:.1f} | " + " | ".join(f"{r[k]:.2f}" for k in KINDS)
              + " |", flush=True)  # fmt: skip
        for kind, target in TARGETS.items():
            met = "met" if r[kind] <= target else "missed"
            verdicts.append(f"{name} {kind} {r[kind]:.2f}x (target <= {target}x: {met})")
    print()
    print("targets (recorded, not asserted): " + "; ".join(verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())

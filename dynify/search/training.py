"""How the search trains: the one call into :mod:`dynify.train` that fine-tunes a trial's
model, and the timing of the static model that the search's estimate is based on.

Every trial is trained through :func:`train_plan`, so a change to the training loop's
arguments is made here alone. It looks ``dynify.train.finetune`` up at each call (tests and
tools may wrap it).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

import dynify.train
from dynify.search.context import SearchContext

__all__ = ["train_plan", "training_speed"]


def train_plan(
    model: nn.Module,
    ctx: SearchContext,
    *,
    callbacks: Sequence[Callable[[int, dict[str, Any]], None]] = (),
) -> Any:
    """Fine-tune ``model`` (a trial's converted plan) for the space's budget per trial on the
    search's data and device; the training loop's result (``top1``, ``history``, ...)."""
    budget = ctx.space.training
    settings = dynify.train.FinetuneSettings(
        data=ctx.data,
        epochs=budget.epochs,
        batch_size=budget.batch_size,
        lr=budget.lr,
        img_size=ctx.space.input_size[1],
        device=ctx.device,
        seed=budget.seed,
        workers=budget.workers,
        progress=False,
    )
    return dynify.train.finetune(model, settings, callbacks=list(callbacks))


def training_speed(ctx: SearchContext, *, steps: int = 2) -> float:
    """Images per second that the static model trains at on the search's device and batch
    (``steps`` timed SGD steps on random images after one untimed step): the basis of the
    estimate said before a search; dynamic plans train slower than this. What it allocated
    on a GPU is given back before it returns (the workers, not this process, may train)."""
    device = torch.device(ctx.device)
    try:
        return _timed_steps(ctx, device, steps)
    finally:  # the model, its gradients and the batch are gone: release the cached blocks
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.empty_cache()


def _timed_steps(ctx: SearchContext, device: torch.device, steps: int) -> float:
    budget = ctx.space.training
    model = copy.deepcopy(ctx.base).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    images = torch.randn(budget.batch_size, *ctx.space.input_size, device=device)
    labels = torch.randint(0, ctx.data.num_classes, (budget.batch_size,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    step()  # allocations, cuDNN's choice of kernels
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronize(device)
    return steps * budget.batch_size / max(time.perf_counter() - start, 1e-9)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

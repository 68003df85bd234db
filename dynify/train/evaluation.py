"""Measuring a model on the validation split: top-1 / top-5 and loss (:func:`evaluate`, and
the loop's :func:`evaluate_loader`), and the routing diagnostics after every epoch
(:class:`RoutingProbe`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from timm.utils import accuracy
from torch import nn

from dynify._limits import Limit
from dynify.routing import dynamic_layers, routing_report
from dynify.train.data import Data, data_config, eval_loader, load_data, sample_images
from dynify.train.distributed import Processes, start_processes
from dynify.train.precision import amp_dtype, memory_format, to_channels_last

__all__ = ["RoutingProbe", "evaluate", "evaluate_loader"]

_WORKERS = Limit(integer=True, low=0, note="0: load in this process")


def evaluate(
    *,
    model: nn.Module,
    data: str | os.PathLike[str] | Data,
    batch_size: int = 256,
    img_size: int | None = None,
    crop_pct: float | None = None,
    val_images: int | None = None,
    holdout: float = 0.1,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    channels_last: bool | None = None,
    workers: int = 2,
    data_cache: str | os.PathLike[str] | None = None,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy of ``model`` on the
    validation split of ``data`` (the same split, transforms and counting as
    :func:`~dynify.train.finetune`'s evaluation given the same ``img_size`` and
    ``crop_pct``; both default to the model's ``pretrained_cfg``, not to what a training run
    used; under torchrun the processes share the images).

    Returns ``{"val_loss", "val_top1", "val_top5", "images"}``.
    """
    _WORKERS.check("workers", workers)
    data = load_data(data, holdout=holdout, val_images=val_images, cache_dir=data_cache)
    procs = start_processes(device)
    try:
        cuda = procs.device.type == "cuda"
        use_amp = cuda if amp is None else bool(amp)
        nhwc = cuda if channels_last is None else bool(channels_last)
        model.to(procs.device)
        if nhwc:
            to_channels_last(model)
        cfg = data_config(model, img_size=img_size, crop_pct=crop_pct)
        loader = eval_loader(
            data.val,
            cfg=cfg,
            batch_size=batch_size,
            workers=workers,
            rank=procs.rank,
            world_size=procs.world_size,
            pin_memory=cuda,
        )
        metrics = evaluate_loader(
            model,
            loader,
            procs=procs,
            amp=use_amp,
            channels_last=nhwc,
            num_classes=data.num_classes,
        )
    finally:
        procs.close()
    return {**metrics, "images": float(len(data.val))}


@torch.no_grad()
def evaluate_loader(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    *,
    procs: Processes,
    amp: bool,
    channels_last: bool,
    num_classes: int,
) -> dict[str, float]:
    """``val_loss``, ``val_top1`` and ``val_top5`` (percent) of ``model`` over ``loader``
    (this process's share), summed over the processes; the model is left in eval mode."""
    device = procs.device
    model.eval()
    k5 = min(5, num_classes)
    total = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1, top-k correct, images
    layout, dtype = memory_format(channels_last), amp_dtype(device)
    for x, y in loader:
        x = x.to(device, non_blocking=True, memory_format=layout)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            logits = model(x)
        n = y.shape[0]
        acc1, acc5 = accuracy(logits.float(), y, topk=(1, k5))
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        total += torch.stack(
            [
                loss.double().cpu(),
                torch.round(acc1.double().cpu() * n / 100),
                torch.round(acc5.double().cpu() * n / 100),
                torch.tensor(float(n), dtype=torch.float64),
            ]
        )
    if procs.distributed:
        total = procs.all_reduce_sum(total.to(device)).cpu()
    images = max(float(total[3]), 1.0)
    return {
        "val_loss": float(total[0]) / images,
        "val_top1": 100 * float(total[1]) / images,
        "val_top5": 100 * float(total[2]) / images,
    }


class RoutingProbe:
    """The routing diagnostics (:func:`dynify.routing_report`) on the first ``images``
    validation images. Not the DDP-sharded validation loader: every process measures the
    same images, so every process reports the same figures."""

    def __init__(
        self,
        data: Data,
        *,
        images: int,
        cfg: dict[str, Any],
        batch_size: int,
        workers: int,
        device: torch.device,
        channels_last: bool,
    ) -> None:
        self.data, self.images, self.cfg = data, images, cfg
        self.batch_size, self.workers = min(batch_size, 256), workers
        self.device, self.channels_last = device, channels_last
        self._loader: torch.utils.data.DataLoader | None = None

    def measure(self, model: nn.Module) -> dict[str, Any]:
        """``{"routing": report}``; ``{}`` when off or the model has no dynamic layer."""
        if not self.images or not dynamic_layers(model):
            return {}
        report = routing_report(model, self._batches(), max_images=self.images)
        return {"routing": report.to_dict()}

    def _batches(self) -> Iterator[torch.Tensor]:
        if self._loader is None:
            self._loader = eval_loader(
                sample_images(self.data.val, self.images),
                cfg=self.cfg,
                batch_size=self.batch_size,
                # Read in worker processes like every other loader: a tar read in this
                # process would share its file offset with the workers forked later.
                workers=self.workers,
                rank=0,
                world_size=1,
                pin_memory=False,
            )
        layout = memory_format(self.channels_last)
        for x, _ in self._loader:
            yield x.to(self.device, memory_format=layout)

"""One fine-tuning run, the same whether started as one process or under torchrun.

``python -m torch.distributed.run --nproc-per-node 2 tests/_ddp_finetune.py DATA OUT`` runs it
on two processes (gloo on the CPU); the DDP test compares the result with ``run`` called in
one process. The model has no batch statistics (GroupNorm), so a global batch split over two
processes is mathematically the same computation as the whole batch in one.
"""

from __future__ import annotations

import sys

import timm
import torch
from timm.layers import GroupNorm1

import dynify
from dynify.train import FinetuneResult, FinetuneSettings, finetune


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        "test_resnet",
        num_classes=4,
        channels=(8, 16, 24, 32),
        stem_width=8,
        norm_layer=GroupNorm1,
    )
    return dynify.apply(model, "dycnn", input_size=(3, 32, 32))


def run(data: str, output: str) -> FinetuneResult:
    settings = FinetuneSettings(
        data=data,
        epochs=2,
        batch_size=16,
        lr=0.05,
        img_size=32,
        aug_scale=(0.5, 1.0),
        workers=0,
        device="cpu",
        output=output,
        progress=False,
    )
    return finetune(build_model(), settings)


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2])

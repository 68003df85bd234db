"""DistributedDataParallel: two CPU processes (gloo) against one process, same global batch.

The two-process run is a real ``torchrun`` launch of tests/_ddp_finetune.py. Each process
takes half of every global batch of 16 (DistributedSampler over the same per-epoch
permutation); DDP averages the two half-batch mean gradients, which equals the full-batch
mean gradient. The model uses GroupNorm (no batch statistics) and the augmentation is seeded
per image, so the computations are the same up to float32 summation order. Tolerance: 8 SGD
updates with momentum leave differences of order 1e-7 relative; we allow 1e-4 relative (and
1e-6 absolute), while one update moves the weights by far more than that (checked below).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _ddp_finetune import build_model, run
from _imagedata import write_splits


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path: Path) -> None:
    data = write_splits(tmp_path / "data", train=16, val=8)  # 64 images: 4 updates per epoch
    # The processes import the dynify under test (this checkout), not another installed one.
    paths = [str(Path(__file__).parent), str(Path(__file__).parents[1])]
    paths += [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(paths))
    script = Path(__file__).with_name("_ddp_finetune.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run(
        [*cmd, str(script), str(data), str(tmp_path / "ddp")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = run(str(data), str(tmp_path / "one"))

    ddp = torch.load(tmp_path / "ddp" / "checkpoint.pth", weights_only=True)
    one = torch.load(tmp_path / "one" / "checkpoint.pth", weights_only=True)
    assert (ddp["world_size"], one["world_size"]) == (2, 1)
    assert ddp["updates"] == one["updates"] == 8
    worst = 0.0
    for key, value in one["model"].items():
        if not value.is_floating_point():
            continue
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-4, atol=1e-6, msg=key)
        worst = max(worst, float((ddp["model"][key] - value).abs().max()))
    start = build_model().state_dict()
    moved = max(
        float((one["model"][k] - v).abs().max()) for k, v in start.items() if k.endswith("weight")
    )
    assert moved > 1e-2 > 100 * worst  # training moved the weights far beyond the tolerance
    assert all(torch.equal(v, single.model.state_dict()[k]) for k, v in one["model"].items())
    print(f"largest weight difference DDP vs one process: {worst:.2e} (moved {moved:.2e})")
    for a, b in zip(ddp["history"], one["history"], strict=True):
        assert a["val_top1"] == b["val_top1"] and a["val_top5"] == b["val_top5"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
        assert a["temperature"] == b["temperature"]

"""GPU check of the cost model (issue 4): run on a machine with CUDA.

    python bench/gpu_cost.py                 # about 2-4 minutes on one H100 / H200
    python bench/gpu_cost.py --repeats 50

For resnet50 and mobilenetv3_large_100, static and converted with the dycnn and mobile
recipes, on ``cuda``: FLOPs measured by FlopCounterMode on the GPU (where torch counts the
fused attention kernels and cuDNN convolutions itself) against the analytic count, and
batch-1 and batch-32 latency (CUDA events, warm-up, median, static and converted
interleaved) with the ratio converted / static. Exits 1 when a count disagrees.
Record the output, with the card's name, in bench/README.md.
"""

from __future__ import annotations

import argparse
import sys

import timm
import torch

import dynify
from dynify import cost


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--device", default="cuda", help="cpu only to smoke-test the script")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: this script is the GPU check", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batches.split(",")]
    torch.backends.cudnn.benchmark = True
    card = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke test)"
    print(
        f"{card}; torch {torch.__version__}, timm {timm.__version__}, "
        f"dynify {dynify.__version__}; fp32, eval, FLOPs = 2 x MACs"
    )
    header = (
        f"{'model':22s} {'recipe':7s} {'analytic GFLOPs':>15s} {'measured GFLOPs':>15s} "
        + " ".join(f"{f'B={b} ms':>9s} {'ratio':>6s}" for b in batches)
    )
    print(header)
    ok = True
    for name in ("resnet50", "mobilenetv3_large_100"):
        model = timm.create_model(name).eval().to(device)
        size = dynify.trace_model(model).input_size
        measured = cost.measure_flops(model, input_size=size, device=device)
        analytic = cost.count(model, input_size=size).flops
        ok &= measured == analytic
        static_ms = {}
        print(f"{name:22s} {'static':7s} {analytic / 1e9:15.4f} {measured / 1e9:15.4f} ", end="")
        converted = {r: dynify.apply(model, r) for r in ("dycnn", "mobile")}
        cmps = {}
        for b in batches:
            for r, conv in converted.items():
                cmps[r, b] = cost.compare_latency(
                    model, conv, size, device=device, batch_size=b, warmup=5,
                    repeats=args.repeats,
                )  # fmt: skip
            static_ms[b] = min(cmps[r, b].static.median_ms for r in converted)
        print(" ".join(f"{static_ms[b]:9.2f} {1.0:6.2f}" for b in batches))
        for r, conv in converted.items():
            measured = cost.measure_flops(conv, device=device)
            analytic = cost.count(conv).flops
            ok &= measured == analytic
            cells = " ".join(
                f"{cmps[r, b].converted.median_ms:9.2f} {cmps[r, b].ratio:6.2f}" for b in batches
            )
            print(f"{'':22s} {r:7s} {analytic / 1e9:15.4f} {measured / 1e9:15.4f} {cells}")
        sys.stdout.flush()
    print(f"analytic == measured on {device.type} for all: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

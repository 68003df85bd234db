"""onnxruntime latency of an exported converted model against the same architecture exported static.

For each configuration (a timm model and a recipe, pretrained=False, 224x224) the static
model and its conversion are both written by ``dynify.export.export_onnx`` with a dynamic
batch (checked against PyTorch at export time, as ``dynify export`` does), then run by
onnxruntime on the CPU (``CPUExecutionProvider``) side by side in this one process: each
round times both sessions, in alternating order, ``--runs`` times each; a ratio is the
median over the rounds of the dynamic session's median over the static one's in the same
round, so the machine's drift and other load cancel. Batch 1 and 8.

Resumable: one result file per configuration under ``bench/results/export/`` (``--output``),
skipped when present; delete a file to measure it again.

    python bench/export.py                                    # the three configurations
    python bench/export.py --configs mobilenetv3_large_100-dycnn --rounds 2 --runs 2
    python bench/export.py --threads 1 --output /tmp/export-1t
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
import torch

import dynify
from dynify.export import export_onnx

ROOT = Path(__file__).resolve().parents[1]
# name -> (timm model, recipe)
CONFIGS = {
    "resnet50-dycnn": ("resnet50", "dycnn"),
    "resnet50-mobile": ("resnet50", "mobile"),
    "mobilenetv3_large_100-dycnn": ("mobilenetv3_large_100", "dycnn"),
}


def session(path: Path, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # onnxruntime's threads spin after a run by default, which steals the cores from the
    # other model's next run when two sessions take turns: measured, it doubled ratios.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_time(sess: ort.InferenceSession, x: np.ndarray, runs: int) -> float:
    """The median of ``runs`` calls, in seconds."""
    name = sess.get_inputs()[0].name
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(config: str, args: argparse.Namespace) -> dict:
    model_name, recipe = CONFIGS[config]
    size = (3, args.size, args.size)
    torch.manual_seed(0)
    static = timm.create_model(model_name, pretrained=False).eval()
    converted = dynify.apply(static, recipe, input_size=size).eval()
    plan = dynify.plan_of(converted)
    record: dict = {
        "config": config,
        "model": model_name,
        "recipe": recipe,
        "input_size": list(size),
        "converted": f"{len(plan.converted)}/{len(plan.layers)}",
    }
    with tempfile.TemporaryDirectory(prefix="dynify-bench-export-") as folder:
        paths, sessions = {}, {}
        for key, model in (("static", static), ("dynamic", converted)):
            paths[key] = Path(folder) / f"{key}.onnx"
            start = time.perf_counter()
            report = export_onnx(model, paths[key], input_size=size)
            record[f"{key}_export_s"] = round(time.perf_counter() - start, 1)
            record[f"{key}_check_error"] = report.max_error
            record[f"{key}_mib"] = round(paths[key].stat().st_size / 2**20, 1)
            sessions[key] = session(paths[key], args.threads)
            print(f"  {config}: exported {key} in {record[f'{key}_export_s']} s "
                  f"(check {report.max_error:.1e})", flush=True)  # fmt: skip
        rng = np.random.default_rng(0)
        for batch in args.batches:
            x = rng.standard_normal((batch, *size), dtype=np.float32)
            for sess in sessions.values():  # warm-up: allocator, kernels
                run_time(sess, x, 2)
            times: dict[str, list[float]] = {"static": [], "dynamic": []}
            order = ["static", "dynamic"]
            for r in range(args.rounds):
                for key in order if r % 2 == 0 else order[::-1]:
                    times[key].append(run_time(sessions[key], x, args.runs))
            ratios = [d / s for d, s in zip(times["dynamic"], times["static"], strict=True)]
            record[f"b{batch}"] = {
                "static_ms": round(1e3 * statistics.median(times["static"]), 2),
                "dynamic_ms": round(1e3 * statistics.median(times["dynamic"]), 2),
                "ratio": round(statistics.median(ratios), 3),
            }
    return record


def machine(threads: int | None) -> dict:
    return {
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "threads": threads or "onnxruntime's default",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS)
    )
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (1,8)")
    p.add_argument("--rounds", type=int, default=7, help="side-by-side rounds (7)")
    p.add_argument("--runs", type=int, default=10, help="timed calls per session per round (10)")
    p.add_argument("--size", type=int, default=224, help="image side (224)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "export"))
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown configuration {unknown[0]!r}; choose from {', '.join(CONFIGS)}")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for config in configs:
        path = out / f"{config}.json"
        if path.exists():
            print(f"  {config}: {path} exists, skipped (delete it to measure again)")
            records.append(json.loads(path.read_text()))
            continue
        record = measure(config, args)
        record["settings"] = {k: getattr(args, k) for k in ("rounds", "runs", "batches")}
        record["machine"] = machine(args.threads)
        path.write_text(json.dumps(record, indent=1) + "\n")
        records.append(record)
    print()
    print("onnxruntime (CPU) latency, dynamic batch graphs, converted / static (median of "
          "rounds)")  # fmt: skip
    print()
    batches = args.batches
    head = " | ".join(f"B={b} static ms | B={b} converted ms | B={b} ratio" for b in batches)
    print(f"| configuration | converted | {head} |")
    print("|---|---:|" + "---:|---:|---:|" * len(batches))
    for r in records:
        cells = []
        for b in batches:
            cell = r.get(f"b{b}")
            cells += (
                [f"{cell['static_ms']:.1f}", f"{cell['dynamic_ms']:.1f}", f"{cell['ratio']:.2f}x"]
                if cell
                else ["-", "-", "-"]
            )
        print(f"| {r['config']} | {r['converted']} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

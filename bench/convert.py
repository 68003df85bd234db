"""Conversion benchmark: how long ``dynify.apply`` takes, and which timm models it converts.

Two parts (see bench/README.md, section "Convert", for the recorded results):

* ``--timing``: time to trace, plan and swap (model creation excluded) for resnet50,
  efficientnet_b0 and convnext_nano at their own input size (3x224x224). Each phase is
  timed separately over ``--repeats`` runs on a fresh copy of the model, and the min and the
  median are reported (the machine may be shared: the min is the least disturbed run).
  ``apply`` as a user calls it also copies the model (``inplace=False``) and checks the
  output on the example input; those two are reported beside, not in the target.
* ``--coverage``: the issue's families, then ``--sweep`` one model per timm family (the
  prefix of the name up to the first digit or '_'; the family's smallest model by parameter
  count, measured on the meta device). Each model's norms are first calibrated so that
  every conv matters (``calibrate_``), then it is converted with the ``all`` recipe (every
  conv) and the output on a fresh random batch of 2 is compared with the original's
  (relative max error, eval mode); ``spread`` says how much that output depends on the
  input (max difference between the two samples over max output: near 0 = weak check).
  Outcomes: ``converted`` (every conv dynamic),
  ``partial`` (some convs skipped; reasons given), ``no conv``, ``failed`` (apply raised or
  the output changed by more than 1e-4 and more than twice the unconverted model's own
  float32-vs-float64 error on that input), ``fp32-limited`` (changed by more than 1e-4, but
  no more than twice that float32 floor: rounding, not a changed function), ``skipped``
  (does not build, or one forward pass takes longer than
  ``--max-forward`` CPU seconds at the input size used).

Usage::

    python bench/convert.py --timing --repeats 5
    python bench/convert.py --coverage            # the issue's 26 families
    python bench/convert.py --coverage --sweep    # plus one model per timm family (long)
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import re
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from families import ISSUE_FAMILIES

warnings.filterwarnings("ignore")

TIMING_MODELS = ("resnet50", "efficientnet_b0", "convnext_nano")


def _now() -> float:
    return time.perf_counter()


# -- timing -------------------------------------------------------------------------------


def time_conversion(name: str, repeats: int) -> dict[str, Any]:
    """Wall and CPU (this process) seconds of each phase, min and median over repeats."""
    import timm

    from dynify.convert import _swap, apply
    from dynify.plan import resolve_plan
    from dynify.recipe import load_recipe
    from dynify.trace import trace_model

    model = timm.create_model(name, pretrained=False).eval()
    recipe = load_recipe("dycnn")
    wall: dict[str, list[float]] = collections.defaultdict(list)
    cpu: dict[str, list[float]] = collections.defaultdict(list)

    def clock() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def record(phase: str, start: tuple[float, float], end: tuple[float, float]) -> None:
        wall[phase].append(end[0] - start[0])
        cpu[phase].append(end[1] - start[1])

    for _ in range(repeats):
        work = copy.deepcopy(model)
        t0 = clock()
        trace = trace_model(work)
        t1 = clock()
        plan = resolve_plan(trace, recipe)
        t2 = clock()
        _swap(work, plan, torch.Generator().manual_seed(0))
        t3 = clock()
        record("trace", t0, t1)
        record("plan", t1, t2)
        record("swap", t2, t3)
        record("trace+plan+swap", t0, t3)
        t4 = clock()
        apply(model, recipe)  # what a user calls: copy + trace + plan + swap + check
        record("apply (copy+check incl.)", t4, clock())
    summary = {k: (min(v), statistics.median(v)) for k, v in wall.items()}
    summary_cpu = {k: (min(v), statistics.median(v)) for k, v in cpu.items()}
    return {
        "model": name,
        "input": "x".join(map(str, trace.input_size)),
        "convs": len(plan.layers),
        "dynamic": len(plan.converted),
        "phases": summary,
        "cpu": summary_cpu,
    }


# -- coverage -----------------------------------------------------------------------------


def family_of(name: str) -> str:
    match = re.match(r"[a-z]+", name)
    return match.group(0) if match else name


def pick_per_family() -> dict[str, str]:
    """The smallest model (parameters, counted on the meta device) of each timm family."""
    import timm

    best: dict[str, tuple[int, str]] = {}
    for name in timm.list_models():
        try:
            with torch.device("meta"):
                model = timm.create_model(name)
        except Exception:
            continue
        n = sum(p.numel() for p in model.parameters())
        fam = family_of(name)
        if fam not in best or n < best[fam][0]:
            best[fam] = (n, name)
    return {fam: name for fam, (_, name) in sorted(best.items())}


def _run(model: torch.nn.Module, x: torch.Tensor) -> tuple[Any, float]:
    """The output, and the CPU seconds the forward pass took (robust to a loaded machine)."""
    t0 = time.process_time()
    with torch.no_grad():
        y = model(x)
    return y, time.process_time() - t0


def calibrate_(model: torch.nn.Module, size: tuple[int, ...], seed: int = 0) -> None:
    """Make every conv matter before comparing outputs (as tests/test_convert.py does):
    random biases and norm / layer-scale / gain vectors, then batch-norm statistics measured
    on two random batches. With timm's random init the signal dies out in many networks (and
    zero-initialised last norms hide whole branches), so an unchanged output would prove
    little."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim > 1:
                if not p.any():  # a zero-initialised classifier (MLP-Mixer, Hiera)
                    p.normal_(0.0, 0.02, generator=gen)
                continue
            if pname.endswith("bias"):
                p.normal_(0.0, 0.1, generator=gen)
            else:
                p.uniform_(0.5, 1.5, generator=gen)
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)]
        momenta = [m.momentum for m in norms]
        for m in norms:
            if m.track_running_stats:
                m.reset_running_stats()
                m.momentum = None
        model.train()
        try:
            for _ in range(2):
                model(torch.randn(4, *size, generator=gen))
        finally:
            for m, momentum in zip(norms, momenta, strict=True):
                m.momentum = momentum
            model.eval()


def cover(name: str, *, size: int, max_forward: float) -> dict[str, Any]:
    """Convert one model with the ``all`` recipe and check it on a fresh batch."""
    import timm

    import dynify
    from dynify.convert import relative_error
    from dynify.trace import default_input_size

    row: dict[str, Any] = {"model": name}
    t0 = _now()
    torch.manual_seed(0)  # timm's random init: the same weights on every run
    try:
        model = timm.create_model(name, pretrained=False).eval()
    except Exception as err:
        return {**row, "status": "skipped", "why": f"build: {type(err).__name__}: {err}"[:160]}
    row["build_s"] = _now() - t0
    own = default_input_size(model)
    sizes = [own]
    if min(own[1:]) > size:
        sizes.insert(0, (own[0], size, size))
    x = y0 = None
    for s in sizes:
        try:
            gen = torch.Generator().manual_seed(1)
            x = torch.randn(2, *s, generator=gen)
            y0, dt = _run(model, x)
            row["input"] = "x".join(map(str, s))
            break
        except Exception as err:
            x, row["why"] = None, f"forward at {s}: {type(err).__name__}: {err}"[:160]
    if x is None:
        return {**row, "status": "skipped"}
    row.pop("why", None)
    if dt > max_forward:
        return {**row, "status": "skipped", "why": f"forward {dt:.1f} CPU s > {max_forward} s"}
    try:
        calibrate_(model, tuple(x.shape[1:]))
        y0, _ = _run(model, x)
    except Exception as err:
        return {
            **row,
            "status": "skipped",
            "why": f"calibration: {type(err).__name__}: {err}"[:160],
        }
    ref = y0 if isinstance(y0, torch.Tensor) else torch.cat([t.flatten(1) for t in y0], 1)
    # How much the output depends on the input (the two samples' difference, relative).
    row["spread"] = float((ref[0] - ref[1]).abs().max() / ref.abs().max().clamp_min(1e-12))
    t0 = _now()
    try:
        converted = dynify.apply(model, "all", input_size=tuple(x.shape[1:]))
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        row["why"] = f"{type(err).__name__}: {first}"[:240]
        if not isinstance(err, dynify.DynifyError) or "differs" not in first:
            return {**row, "status": "failed"}
        # apply's own check refused it: measure the error on the fresh input anyway.
        converted = dynify.apply(model, "all", input_size=tuple(x.shape[1:]), check=False)
    row["apply_s"] = _now() - t0
    plan = dynify.plan_of(converted)
    row["convs"] = len(plan.layers)
    row["dynamic"] = len(plan.converted)
    row["hook_found"] = sum(lp.site.found_by == "hook" for lp in plan.layers)
    row["fx_error"] = plan.fx_error
    try:
        y, _ = _run(converted.eval(), x)
        row["error"] = relative_error(y, y0)
    except Exception as err:
        return {**row, "status": "failed", "why": f"fresh input: {type(err).__name__}: {err}"[:240]}
    reasons = collections.Counter(lp.reason for lp in plan.skipped)
    row["skip_reasons"] = dict(reasons)
    if not row["error"] <= 1e-4 or "why" in row:
        # How far float32 itself is from float64 for the unconverted model on this input:
        # a conversion error of that order is rounding, not a changed function.
        with torch.no_grad():
            y64 = copy.deepcopy(model).double()(x.double())
        row["fp32_floor"] = relative_error(y0.double(), y64)
        limited = row["error"] <= 2 * row["fp32_floor"]
        row["status"] = "fp32-limited" if limited else "failed"
        row["why"] = (
            (row.get("why", "") + "; ").lstrip("; ")
            + f"fresh input: {row['error']:.1e}, the original's own float32-vs-float64 error: "
            f"{row['fp32_floor']:.1e}"
        )
    elif not plan.layers:
        row["status"] = "no conv"
    elif plan.skipped:
        row["status"] = "partial"
    else:
        row["status"] = "converted"
    return row


# -- report -------------------------------------------------------------------------------


def _fmt_s(v: float) -> str:
    return f"{v:.3f}"


def print_timing(rows: list[dict[str, Any]], repeats: int, threads: int) -> None:
    phases = list(rows[0]["phases"])
    for key, what in (("phases", "wall-clock"), ("cpu", "CPU time of this process")):
        print(
            f"\nConversion time, dycnn recipe, {threads} thread(s), {what}, "
            f"min / median of {repeats} runs (seconds)\n"
        )
        print("| model | input | convs (dynamic) | " + " | ".join(phases) + " |")
        print("|---|---|---|" + "---|" * len(phases))
        for r in rows:
            cells = [f"{_fmt_s(a)} / {_fmt_s(b)}" for a, b in r[key].values()]
            print(
                f"| {r['model']} | {r['input']} | {r['convs']} ({r['dynamic']}) | "
                + " | ".join(cells)
                + " |"
            )


def print_coverage(rows: list[dict[str, Any]], title: str) -> None:
    counts = collections.Counter(r["status"] for r in rows)
    print(f"\n{title}: " + ", ".join(f"{counts[k]} {k}" for k in sorted(counts)) + "\n")
    print("| model | input | status | dynamic / convs | by hook | rel. error | spread | notes |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        dyn = f"{r['dynamic']} / {r['convs']}" if "convs" in r else ""
        err = f"{r['error']:.1e}" if "error" in r else ""
        spread = f"{r['spread']:.2f}" if "spread" in r else ""
        notes = r.get("why") or "; ".join(
            f"{n}x {why}" for why, n in r.get("skip_reasons", {}).items()
        )
        if r.get("fx_error"):
            notes = (notes + "; " if notes else "") + f"fx failed ({r['fx_error'][:60]})"
        notes = notes.replace("|", "/")
        print(
            f"| {r['model']} | {r.get('input', '')} | {r['status']} | {dyn} | "
            f"{r.get('hook_found', '')} | {err} | {spread} | {notes} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timing", action="store_true")
    parser.add_argument("--coverage", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="one model per timm family")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=128, help="reduced input side (coverage)")
    parser.add_argument("--max-forward", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default=None, help="sweep only these (comma-separated)")
    parser.add_argument(
        "--picks-from", type=Path, default=None, help="reuse the sweep's models from a --json"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if not (args.timing or args.coverage):
        args.timing = args.coverage = True
    torch.set_num_threads(args.threads)
    import timm

    import dynify

    print(
        f"dynify {dynify.__version__}, timm {timm.__version__}, torch {torch.__version__}, "
        f"{args.threads} threads, {os.cpu_count()} CPUs, load average "
        f"{', '.join(f'{v:.1f}' for v in os.getloadavg())} at start"
    )
    out: dict[str, Any] = {}
    if args.timing:
        out["timing"] = [time_conversion(n, args.repeats) for n in TIMING_MODELS]
        print_timing(out["timing"], args.repeats, args.threads)
    if args.coverage:
        rows = []
        for name in () if args.models else ISSUE_FAMILIES:
            rows.append(cover(name, size=args.size, max_forward=args.max_forward))
            print(f"  {name}: {rows[-1]['status']}", file=sys.stderr, flush=True)
        out["families"] = rows
        if rows:
            print_coverage(rows, "Issue families, recipe 'all'")
        if args.sweep:
            if args.models:
                picks = {family_of(m): m for m in args.models.split(",")}
            elif args.picks_from:
                rows_before = json.loads(args.picks_from.read_text())["sweep"]
                picks = {r["family"]: r["model"] for r in rows_before}
            else:
                picks = pick_per_family()
            sweep = []
            for fam, name in picks.items():
                sweep.append(
                    {"family": fam, **cover(name, size=args.size, max_forward=args.max_forward)}
                )
                print(f"  {name}: {sweep[-1]['status']}", file=sys.stderr, flush=True)
            out["sweep"] = sweep
            print_coverage(sweep, f"timm sweep, one model per family ({len(picks)} families)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

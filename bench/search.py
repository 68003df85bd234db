"""Search experiment: a budgeted ``dynify search`` on the real CIFAR-10.

The space is bench/search-space.yaml (timm's test_resnet at 32x32, one decision per stage,
2-epoch trials on 8,000 training images, scored on 2,000 other training images; the test
split is never touched). Under a 12 MFLOPs budget the static model and the bundled dycnn
and mobile recipes fit, so they are the study's first trials: trained from the same random
init with the same per-trial budget as every sampled plan. The table compares the best plan
with them: held-out top-1, MACs, FLOPs, parameters, and the seconds each trial took.

Run from the repository root (about 35 minutes on 2 heavily shared CPU cores):

    python bench/search.py --output runs/bench-search

Rerunning the same command resumes the study (or just reprints the table). Recorded, not
asserted: see bench/README.md ("## Search (bench/search.py)").
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from optuna.trial import TrialState

from dynify.cost import format_count
from dynify.search import SearchSettings, search

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10" / "train.tar"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 train.tar (or folder)")
    p.add_argument("--space", default=str(ROOT / "bench" / "search-space.yaml"))
    p.add_argument("--budget", default="12MFLOPs")
    p.add_argument("--trials", type=int, default=14)
    p.add_argument("--output", default="runs/bench-search")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: shared cores)")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def _row(label: str, t, budget: float) -> list[str]:
    a = t.user_attrs
    top1 = "-" if t.value is None else f"{t.value:.2f}"
    if t.state == TrialState.PRUNED:
        top1 = f"pruned ({max(t.intermediate_values.values()):.2f} after epoch 1)"
    feasible = all(v <= 0 for v in t.constraints.values())
    return [
        label,
        str(t.number),
        top1 if feasible else "over budget",
        f"{format_count(a['macs'])}",
        f"{format_count(a['flops'])}",
        f"{a['params'] / 1e6:.3f} M",
        str(a["converted"]),
        f"{t.duration.total_seconds():.0f}" if t.duration else "-",
        "yes" if a["flops"] <= budget else "no",
    ]


def _markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = SearchSettings(
        budget=args.budget,
        space=args.space,
        data=args.data,
        trials=args.trials,
        output=args.output,
        device=args.device,
    )
    start = time.monotonic()
    outcome = search(settings)  # progress on stderr (dynify.logging)
    wall = time.monotonic() - start
    print(outcome.summary)

    study, ctx = outcome.study, outcome.context
    trials = study.trials
    by_preset = {
        t.user_attrs["preset"]: t
        for t in trials
        if t.user_attrs.get("preset") and t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    }
    best = study.best_trial
    rows = [_row(name, by_preset[name], ctx.budget.value) for name in ("static", "dycnn", "mobile")
            if name in by_preset]  # fmt: skip
    label = f"best ({best.user_attrs.get('preset') or 'sampled'})"
    rows.append(_row(label, best, ctx.budget.value))
    sampled = [
        t
        for t in trials
        if not t.user_attrs.get("preset")
        and t.state == TrialState.COMPLETE
        and all(v <= 0 for v in t.constraints.values())
        and t.number != best.number
    ]
    top = max(sampled, key=lambda t: t.value) if sampled else None
    if top is not None and best.user_attrs.get("preset"):  # when the best overall is a preset
        rows.append(_row("best sampled plan", top, ctx.budget.value))
    headers = ["plan", "trial", "held-out top-1 (%)", "MACs", "FLOPs", "params", "dynamic convs",
               "seconds", "fits"]  # fmt: skip
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    over = sum(
        1
        for t in trials
        if t.state == TrialState.COMPLETE and any(v > 0 for v in t.constraints.values())
    )
    n_val = ctx.space.training.val_images
    p = (best.value or 0) / 100
    se = 100 * math.sqrt(max(p * (1 - p), 1e-9) / n_val)
    b = ctx.space.training
    text = "\n".join(
        [
            _markdown(headers, rows),
            "",
            f"{len(trials)} trials ({', '.join(f'{n} {k}' for k, n in counts.items() if n)}; "
            f"{over} of the complete ones over budget, priced and not trained), "
            f"{wall / 60:.1f} min wall for this invocation; budget {ctx.budget}; per trial "
            f"{b.epochs} epochs x {b.train_images} images, batch {b.batch_size}, lr {b.lr}; "
            f"top-1 on {n_val} held-out training images (standard error ~{se:.1f} points at "
            f"the best's accuracy); device {ctx.device}, {torch.get_num_threads()} thread(s).",
            "",
            "best plan: "
            + (
                f"the {best.user_attrs['preset']} preset"
                if best.user_attrs.get("preset")
                else json.dumps(best.params, sort_keys=True)
            ),
            *(
                [
                    f"best sampled plan (trial {top.number}): "
                    + json.dumps(top.params, sort_keys=True)
                ]
                if top is not None and top.number != best.number
                else []
            ),
            f"trials reusing an earlier trial's result (same plan, not retrained): "
            f"{sum('same_as' in t.user_attrs for t in trials)}",
        ]
    )
    print()
    print(text)
    (Path(args.output) / "bench.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

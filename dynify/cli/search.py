"""``dynify search``: find the best conversion plan a compute budget allows."""

from __future__ import annotations

import argparse

HELP = "search which convs to make dynamic (and K, r, temperature) under a budget"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "search",
        help=HELP,
        description=(
            "Optuna searches which convs to convert and each group's expert count K, "
            "reduction r and the temperature schedule, under a compute budget. Plans are "
            "priced by the cost model before anything is built; feasible ones are fine-tuned "
            "and scored on held-out training images. Rerunning the same command resumes. "
            "Defaults (model, input size, data, training per trial) come from the space file."
        ),
    )
    p.add_argument("model", nargs="?", help="timm model name (default: the space's)")
    p.add_argument(
        "--budget",
        required=True,
        help="e.g. 600MFLOPs, 0.6GFLOPs, 300MMACs, 25Mparams or 3ms (FLOPs = 2 x MACs)",
    )
    p.add_argument("--space", default=None, help="search space YAML or bundled name (default)")
    p.add_argument("--data", default=None, help="training data (default: the space's)")
    p.add_argument("--trials", type=int, default=20, help="finished trials to reach (total)")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start no trial after this many seconds (of this command)",
    )
    p.add_argument("--output", default="runs/search", metavar="DIR", help="run folder")
    p.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="Optuna storage: sqlite:///FILE (default: DIR/study.db), postgresql://..., "
        "mysql://..., journal:PATH",
    )
    p.add_argument("--study", default=None, metavar="NAME", help="study name (to share one)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="worker processes on this machine (one GPU each where there are several)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument(
        "--max-params",
        type=param_count,
        default=None,
        metavar="P",
        help="parameter limit, e.g. 30M",
    )
    p.add_argument("--max-latency", default=None, metavar="T", help="latency limit, e.g. 5ms")
    p.add_argument(
        "--objectives",
        default="accuracy",
        help="accuracy (default), accuracy,latency or accuracy,params (Pareto front)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--pretrained", action="store_true", help="start from timm's weights")
    src.add_argument("--checkpoint", metavar="FILE", help="start from these weights")
    p.add_argument("--seed", type=int, default=0, help="random init and sampler seed")
    p.add_argument(
        "--heartbeat",
        type=int,
        default=60,
        metavar="SECONDS",
        help="trial heartbeat (SQL storages): a trial whose process died is failed after 2x "
        "this and retried, twice at most",
    )
    p.add_argument("--data-cache", default=None, metavar="DIR", help="download folder")
    p.set_defaults(run=run)


def param_count(text: str) -> float:
    """``30M`` -> 3e7 (for --max-params)."""
    from dynify._budget import parse_budget

    stripped = text.strip()
    budget = parse_budget(stripped if stripped.lower().endswith("params") else stripped + "params")
    return budget.value


def run(args: argparse.Namespace) -> int:
    from dynify.search.run import search
    from dynify.search.study import SearchSettings

    settings = SearchSettings(
        budget=args.budget,
        model=args.model,
        space=args.space,
        data=args.data,
        trials=args.trials,
        timeout=args.timeout,
        output=args.output,
        storage=args.storage,
        study=args.study,
        workers=args.workers,
        device=args.device,
        max_params=args.max_params,
        max_latency=args.max_latency,
        objectives=tuple(args.objectives.split(",")),
        pretrained=args.pretrained,
        checkpoint=args.checkpoint,
        seed=args.seed,
        heartbeat=args.heartbeat,
        data_cache=args.data_cache,
    )
    outcome = search(settings)
    print(outcome.summary)
    return 0

"""``dynify search``: find the best conversion plan a compute budget allows."""

from __future__ import annotations

import argparse

from dynify.cli._arguments import add_command, add_weights_source

HELP = "search which convs to make dynamic (and K, r, temperature) under a budget"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        "search",
        HELP,
        "Optuna searches which convs to convert and each group's expert count K, "
        "reduction r and the temperature schedule, under a compute budget. Plans are "
        "priced by the cost model before anything is built; feasible ones are fine-tuned "
        "and scored on held-out training images. Rerunning the same command resumes. "
        "Defaults (model, input size, data, training per trial) come from the space file.",
    )
    p.add_argument("model", nargs="?", help="timm model name (default: the space's)")
    p.add_argument(
        "--budget",
        required=True,
        help="e.g. 600MFLOPs, 0.6GFLOPs, 300MMACs, 25Mparams or 3ms (FLOPs = 2 x MACs)",
    )
    p.add_argument("--space", default=None, help="search space YAML or bundled name (default)")
    p.add_argument("--data", default=None, help="training data (default: the space's)")
    p.add_argument("--trials", default="20", help="finished trials to reach (total)")
    p.add_argument(
        "--timeout",
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
        default="1",
        metavar="N",
        help="worker processes on this machine (one GPU each where there are several)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument(
        "--max-params",
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
    add_weights_source(p)
    p.add_argument("--seed", default="0", help="random init and sampler seed")
    p.add_argument(
        "--heartbeat",
        default="60",
        metavar="SECONDS",
        help="trial heartbeat (SQL storages): a trial whose process died is failed after 2x "
        "this and retried, twice at most",
    )
    p.add_argument("--data-cache", default=None, metavar="DIR", help="download folder")
    training = p.add_argument_group(
        "training per trial", "override the space's training section (validated as it is)"
    )
    training.add_argument("--epochs", default=None, metavar="N", help="epochs per trial")
    training.add_argument(
        "--train-images", default=None, metavar="N", help="images per epoch (a fixed subset)"
    )
    training.add_argument(
        "--val-images", default=None, metavar="N", help="images held out to score each trial"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:

    from dynify.search import SearchSettings, search
    from dynify.search.settings import NUMERIC_SETTINGS, parse_number

    # The settings' names are the parser's destinations, so the command line's error
    # handler (and the filter below, for the notes) can show each as its flag.
    numbers = {name: parse_number(name, getattr(args, name)) for name in NUMERIC_SETTINGS}
    settings = SearchSettings(
        budget=args.budget,
        model=args.model,
        space=args.space,
        data=args.data,
        output=args.output,
        storage=args.storage,
        study=args.study,
        device=args.device,
        max_latency=args.max_latency,
        objectives=tuple(args.objectives.split(",")),
        pretrained=args.pretrained,
        checkpoint=args.checkpoint,
        data_cache=args.data_cache,
        **numbers,  # type: ignore[arg-type]
    )
    # A Ctrl-C is said by the command line's own handler; notes that name a setting show
    # its flag (dynify.cli's log filter), as errors do.
    outcome = search(settings)
    print(outcome.summary)
    return 0

"""``dynify finetune``: train a converted model (or an artifact) on an image data set.

A thin shell over :func:`dynify.train.finetune_to_artifact`: the flags' argparse
destinations are :class:`~dynify.train.FinetuneSettings` field names (built by one generic
mapping, :func:`settings_from_args`) or the function's model options
(:data:`~dynify.train.run.MODEL_OPTIONS`); what is printed at the end is the only output of
its own.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from dynify.cli import COUNT, check_limits
from dynify.cli._arguments import add_command, add_weights_source

if TYPE_CHECKING:
    from dynify.train import FinetuneSettings

HELP = "fine-tune a converted model (temperature schedule, optional distillation)"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        "finetune",
        HELP,
        "MODEL_OR_ARTIFACT is a timm model name (converted with --recipe first) or a "
        ".safetensors artifact from 'dynify convert'. Writes OUTPUT/checkpoint.pth after every "
        "epoch (--resume continues from it exactly), OUTPUT/metrics.json, and "
        "OUTPUT/model.safetensors at the end. Runs on several GPUs or machines under "
        "torchrun, e.g. 'torchrun --nproc-per-node 4 -m dynify finetune ...'.",
    )
    p.add_argument("model", metavar="MODEL_OR_ARTIFACT", help="timm name or .safetensors file")
    p.add_argument(
        "--data",
        required=True,
        help="ImageFolder folder, folder with train/ and val/ (or test/) folders or .tar "
        "files, an ImageFolder .tar, or torch/cifar10 (torchvision, downloaded)",
    )
    p.add_argument("--epochs", type=int, required=True, metavar="N")
    conv = p.add_argument_group("model")
    conv.add_argument(
        "--recipe",
        default=None,
        help="recipe YAML or bundled name for a timm MODEL (default: dycnn)",
    )
    conv.add_argument("--static", action="store_true", help="train MODEL without converting it")
    conv.add_argument(
        "--num-classes",
        type=int,
        default=None,
        metavar="N",
        help="classes of the model (default: the data's); an ARTIFACT with another count gets "
        "a new classifier (timm's reset_classifier)",
    )
    add_weights_source(conv)
    conv.add_argument("--seed", type=int, default=0, help="initialisation and data-order seed")

    data = p.add_argument_group("data")
    data.add_argument("--img-size", type=int, default=None, metavar="S", help="e.g. 32 for CIFAR")
    data.add_argument("--crop-pct", type=float, default=None, help="evaluation centre crop")
    data.add_argument(
        "--no-aug", dest="augment", action="store_false", help="no training augmentation"
    )
    data.add_argument(
        "--aug-scale",
        type=float,
        nargs=2,
        default=None,
        metavar=("MIN", "MAX"),
        help="random-resized-crop area range (default 0.08 1; 0.35 1 suits 32px images)",
    )
    data.add_argument("--train-images", type=int, default=None, metavar="N", help="subset")
    data.add_argument("--val-images", type=int, default=None, metavar="N", help="subset")
    data.add_argument(
        "--holdout",
        type=float,
        default=0.1,
        help="validation fraction when the data has no val split (default 0.1)",
    )
    data.add_argument("--data-cache", default=None, metavar="DIR", help="torch/NAME downloads")
    data.add_argument(
        "--workers", type=int, default=2, help="loader processes per process (0: none)"
    )

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=int, default=128, metavar="B", help="global batch")
    opt.add_argument("--lr", type=float, default=None, help="default 0.1*B/256 (SGD)")
    opt.add_argument("--opt", default="sgd", help="timm optimizer name (default sgd)")
    opt.add_argument("--weight-decay", type=float, default=1e-4)
    opt.add_argument("--sched", default="cosine", help="timm LR schedule (default cosine)")
    opt.add_argument("--warmup-epochs", type=int, default=0)
    opt.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    opt.add_argument("--clip-grad", type=float, default=None, metavar="NORM")
    opt.add_argument(
        "--teacher",
        action="store_true",
        help="distil from the unconverted model (needs a timm MODEL, not an artifact)",
    )
    opt.add_argument("--distill-weight", type=float, default=0.5, help="KD loss share")
    opt.add_argument("--distill-temperature", type=float, default=1.0)

    run = p.add_argument_group("run")
    run.add_argument(
        "--output",
        default=None,
        metavar="DIR",
        help="run folder (default: runs/<model>-<recipe>, runs/<model>-static with --static, "
        "runs/<artifact name> for an ARTIFACT)",
    )
    run.add_argument("--resume", action="store_true", help="continue OUTPUT/checkpoint.pth")
    run.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    run.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA"
    )
    run.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: on CUDA",
    )
    run.add_argument(
        "--sync-bn", action="store_true", help="under torchrun on GPUs: global batch-norm stats"
    )
    run.add_argument(
        "--quiet", dest="progress", action="store_false", help="no progress bar or epoch lines"
    )
    run.add_argument(
        "--routing-images",
        type=int,
        default=256,
        metavar="N",
        help="measure the dynamic layers' routing on N validation images after every epoch "
        "(in the epoch line and metrics.json; 0: off; default 256)",
    )
    p.set_defaults(run=run_command)


# FinetuneSettings fields without a flag (Python only): the recipe sets the temperature per
# layer; momentum and min_lr keep timm's usual values.
PYTHON_ONLY: tuple[str, ...] = ("momentum", "min_lr", "temperature")


def settings_from_args(args: argparse.Namespace) -> FinetuneSettings:
    """The run's settings: every field but :data:`PYTHON_ONLY` from the flag of its name."""
    from dataclasses import fields

    from dynify.train import FinetuneSettings

    names = [f.name for f in fields(FinetuneSettings) if f.name not in PYTHON_ONLY]
    return FinetuneSettings(**{name: getattr(args, name) for name in names})


def run_command(args: argparse.Namespace) -> int:
    from dynify.errors import TrainingDiverged
    from dynify.train import finetune_to_artifact
    from dynify.train.distributed import is_primary_process
    from dynify.train.run import MODEL_OPTIONS

    # The settings check every number of theirs (FinetuneSettings' limits), before any work.
    check_limits(args, {"num_classes": COUNT})
    settings = settings_from_args(args)
    options = {name: getattr(args, name) for name in MODEL_OPTIONS}
    try:
        outcome = finetune_to_artifact(args.model, settings, **options)
    except TrainingDiverged:
        if not is_primary_process():  # every process stops; rank 0 says why
            return 1
        raise
    if not outcome.primary:
        return 0
    result = outcome.result
    line = (
        f"done: {result.epochs} epochs, val top-1 {result.top1:.2f}% top-5 {result.top5:.2f}% "
        f"(best top-1 {result.best_top1:.2f}%)"
    )
    if result.images_per_s:
        line += f", {result.images_per_s:.0f} training images/s"
    print(line)
    routing = result.history[-1].get("routing") if result.history else None
    if routing:
        print(
            f"routing on {routing['images']} validation images: effect "
            f"{100 * routing['effect']:.2f}% of the logits ({100 * routing['flips']:.1f}% of "
            f"predictions flip with every attention frozen at its mean), entropy "
            f"{routing['entropy']:.3f} (1 = uniform), expert spread {routing['expert_spread']:.4f}"
        )
    if outcome.artifact is None:
        print(f"static model: its weights are in {outcome.checkpoint} ('model' entry)")
    else:
        print(f"wrote {outcome.artifact}")
    return 0

"""``dynify finetune``: train a converted model (or an artifact) on an image data set."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dynify.cli import (
    COUNT,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    SHARE,
    Limit,
    check_limits,
)

if TYPE_CHECKING:
    from torch import nn

    from dynify.train import Data

HELP = "fine-tune a converted model (temperature schedule, optional distillation)"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune",
        help=HELP,
        description=(
            f"{HELP[0].upper()}{HELP[1:]}. MODEL_OR_ARTIFACT is a timm model name (converted "
            "with --recipe first) or a .safetensors artifact from 'dynify convert'. Writes "
            "OUTPUT/checkpoint.pth after every epoch (--resume continues from it exactly), "
            "OUTPUT/metrics.json, and OUTPUT/model.safetensors at the end. Runs on several "
            "GPUs or machines under torchrun, e.g. 'torchrun --nproc-per-node 4 -m dynify "
            "finetune ...'."
        ),
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
    src = conv.add_mutually_exclusive_group()
    src.add_argument("--pretrained", action="store_true", help="start from timm's weights")
    src.add_argument("--checkpoint", metavar="FILE", help="start from these weights")
    conv.add_argument("--seed", type=int, default=0, help="initialisation and data-order seed")

    data = p.add_argument_group("data")
    data.add_argument("--img-size", type=int, default=None, metavar="S", help="e.g. 32 for CIFAR")
    data.add_argument("--crop-pct", type=float, default=None, help="evaluation centre crop")
    data.add_argument("--no-aug", action="store_true", help="no training augmentation")
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
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument(
        "--routing-images",
        type=int,
        default=256,
        metavar="N",
        help="measure the dynamic layers' routing on N validation images after every epoch "
        "(in the epoch line and metrics.json; 0: off; default 256)",
    )
    p.set_defaults(run=run_command)


# Accepted values of the numeric flags (argparse destinations), checked before any work.
LIMITS: dict[str, Limit] = {
    "epochs": COUNT,
    "num_classes": COUNT,
    "seed": SEED,
    "img_size": COUNT,
    "crop_pct": FRACTION,
    "aug_scale": FRACTION,
    "train_images": COUNT,
    "val_images": COUNT,
    "holdout": Limit(low=0, high=1, low_open=True, high_open=True),
    "workers": NON_NEGATIVE,
    "batch_size": COUNT,
    "lr": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "warmup_epochs": NON_NEGATIVE,
    "smoothing": Limit(low=0, high=1, high_open=True),
    "clip_grad": POSITIVE,
    "distill_weight": SHARE,
    "distill_temperature": POSITIVE,
    "routing_images": NON_NEGATIVE,
}


def run_command(args: argparse.Namespace) -> int:
    import copy

    import torch

    import dynify
    from dynify._io import ensure_writable
    from dynify.errors import DynifyError
    from dynify.models import create_model
    from dynify.train import TrainingDiverged, finetune, load_data

    check_limits(args, LIMITS)
    if args.aug_scale and args.aug_scale[0] > args.aug_scale[1]:
        raise DynifyError(
            f"--aug-scale {args.aug_scale[0]} {args.aug_scale[1]}: MIN must be <= MAX"
        )
    is_artifact = args.model.endswith(".safetensors")
    if is_artifact and (args.recipe or args.static or args.pretrained or args.checkpoint):
        raise DynifyError(
            "--recipe, --static, --pretrained and --checkpoint apply to a timm MODEL; an "
            "artifact is already converted and holds its weights"
        )
    if is_artifact and args.teacher:
        raise DynifyError(
            "--teacher needs the unconverted model: give the timm MODEL name (with "
            "--pretrained or --checkpoint) instead of the artifact"
        )
    if args.static and args.teacher:
        raise DynifyError("--teacher distils a converted model from the static one; drop --static")
    recipe = None if is_artifact or args.static else dynify.load_recipe(args.recipe)
    if is_artifact:
        label = Path(args.model).name.removesuffix(".safetensors")
    else:
        label = f"{args.model}-{'static' if recipe is None else recipe.label}"
    output = ensure_writable(
        Path("runs") / label if args.output is None else args.output,
        what="--output",
        folder=True,
    )
    # Subsets are finetune's to take (and its checkpoint's to record, so --resume compares
    # them); here only the classes are needed.
    data = load_data(args.data, holdout=args.holdout, cache_dir=args.data_cache)
    if args.num_classes is not None and not is_artifact and args.num_classes != data.num_classes:
        raise DynifyError(
            f"--num-classes {args.num_classes}: the data has {data.num_classes} classes "
            f"({data.source}); give --num-classes {data.num_classes} or leave it out"
        )
    teacher = None
    name = args.model
    kwargs: dict = {}
    if is_artifact:
        from dynify.artifact import load, read_info

        info = read_info(args.model)
        model = load(args.model)
        name, kwargs = info["model_name"], dict(info["model_kwargs"])
        model, kwargs = _fit_classifier(model, name, kwargs, args=args, data=data)
    else:
        kwargs = {"num_classes": data.num_classes}
        torch.manual_seed(args.seed)
        model = create_model(
            args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, **kwargs
        )
        if args.teacher:
            teacher = copy.deepcopy(model)
        if recipe is not None:
            size = None if args.img_size is None else (3, args.img_size, args.img_size)
            model = dynify.apply(model, recipe, input_size=size, inplace=True, seed=args.seed)
    primary = int(os.environ.get("RANK", "0")) == 0
    try:
        result = finetune(
            model=model,
            data=data,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            opt=args.opt,
            weight_decay=args.weight_decay,
            sched=args.sched,
            warmup_epochs=args.warmup_epochs,
            smoothing=args.smoothing,
            clip_grad=args.clip_grad,
            img_size=args.img_size,
            crop_pct=args.crop_pct,
            augment=not args.no_aug,
            aug_scale=tuple(args.aug_scale) if args.aug_scale else None,
            teacher=teacher,
            distill_weight=args.distill_weight,
            distill_temperature=args.distill_temperature,
            output=output,
            resume=args.resume,
            device=args.device,
            amp=args.amp,
            channels_last=args.channels_last,
            sync_bn=args.sync_bn,
            seed=args.seed,
            workers=args.workers,
            train_images=args.train_images,
            val_images=args.val_images,
            holdout=args.holdout,
            data_cache=args.data_cache,
            progress=not args.quiet,
            routing_images=args.routing_images,
        )
    except TrainingDiverged as err:
        if primary:
            print(f"dynify finetune: {err}", file=sys.stderr)
        return 1
    if not primary:
        return 0
    model = result.model.cpu()
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
    try:
        dynify.plan_of(model)
    except DynifyError:
        print(f"static model: its weights are in {output / 'checkpoint.pth'} ('model' entry)")
        return 0
    target = output / "model.safetensors"
    extra = {"finetune": {k: v for k, v in result.history[-1].items()}}
    dynify.save(model, target, model_name=name, model_kwargs=kwargs, extra=extra)
    print(f"wrote {target}")
    return 0


def _fit_classifier(
    model: nn.Module, name: str, kwargs: dict, *, args: argparse.Namespace, data: Data
) -> tuple[nn.Module, dict]:
    """An artifact's model and timm arguments with as many classes as the data: with
    ``--num-classes`` its classifier is replaced (timm's ``reset_classifier``), without
    it a mismatch is refused naming the flag."""
    from dynify.errors import DynifyError

    has = getattr(model, "num_classes", None)
    if args.num_classes is None:
        if isinstance(has, int) and has != data.num_classes:
            raise DynifyError(
                f"the artifact {args.model!r} classifies {has} classes, the data has "
                f"{data.num_classes} ({data.source}); give --num-classes {data.num_classes} to "
                f"replace its classifier"
            )
        return model, kwargs
    if args.num_classes != data.num_classes:
        raise DynifyError(
            f"--num-classes {args.num_classes}: the data has {data.num_classes} classes "
            f"({data.source}); give --num-classes {data.num_classes}"
        )
    if has == args.num_classes:
        return model, kwargs
    if not callable(getattr(model, "reset_classifier", None)):
        raise DynifyError(
            f"--num-classes: {name} has no reset_classifier to replace its {has}-class classifier"
        )
    model.reset_classifier(args.num_classes)
    weights = "from the checkpoint" if args.resume else "untrained"
    print(
        f"replaced the artifact's {has}-class classifier by a new {args.num_classes}-class "
        f"one (reset_classifier; its weights: {weights})"
    )
    return model, {**kwargs, "num_classes": args.num_classes}

"""``dynify fold``: fold the dynamic layers that do not route, drop unused experts, fuse
BatchNorms, and write the smaller artifact (``dynify.fold.fold_artifact``)."""

from __future__ import annotations

import argparse

from dynify.cli._arguments import add_command

HELP = "fold dynamic layers that do not route into static convs, drop unused experts"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    # The defaults are the library's; written here so that --help needs no torch.
    p = add_command(
        subparsers,
        "fold",
        HELP,
        "Measures each dynamic layer's routing effect on the logits on training images of "
        "--data, replaces the layers below --max-effect by a static conv with their average "
        "kernel, drops experts whose mean weight is below --min-usage, fuses every "
        "BatchNorm that follows a conv, and reports per layer what was folded, the MACs and "
        "parameters saved, the latency before and after (side by side) and the top-1 on the "
        "validation split before and after. The output reloads with dynify.load.",
    )
    p.add_argument("artifact", metavar="ARTIFACT", help=".safetensors artifact to fold")
    p.add_argument(
        "--data",
        required=True,
        help="the data the model was trained on (as for 'dynify finetune --data')",
    )
    p.add_argument("--output", required=True, metavar="PATH", help="artifact to write")
    p.add_argument(
        "--max-effect",
        type=float,
        default=0.005,
        metavar="E",
        help="fold a layer whose frozen routing changes the logits by less than E "
        "(a fraction; default 0.005 = 0.5%%; 0 folds nothing)",
    )
    p.add_argument(
        "--min-usage",
        type=float,
        default=0.01,
        metavar="U",
        help="drop an expert whose mean weight is below U (default 0.01 = 1%%; 0 drops none)",
    )
    p.add_argument(
        "--images",
        type=int,
        default=256,
        metavar="N",
        help="training images the routing is measured on (one pass per dynamic layer; default 256)",
    )
    p.add_argument(
        "--val-images",
        type=int,
        default=None,
        metavar="N",
        help="validation images for the accuracy before and after (default: all)",
    )
    p.add_argument(
        "--img-size",
        type=int,
        default=None,
        metavar="PX",
        help="image size (default: the size the plan was traced at)",
    )
    p.add_argument("--batch-size", type=int, default=128, metavar="N")
    p.add_argument("--no-fuse", action="store_true", help="leave the BatchNorms unfused")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="data loader processes")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dynify.fold import fold_artifact

    # fold_artifact checks every number before any work; its messages name these flags.
    outcome = fold_artifact(
        args.artifact,
        data=args.data,
        output=args.output,
        max_effect=args.max_effect,
        min_usage=args.min_usage,
        images=args.images,
        val_images=args.val_images,
        img_size=args.img_size,
        batch_size=args.batch_size,
        fuse=not args.no_fuse,
        latency=not args.no_latency,
        device=args.device,
        workers=args.workers,
    )
    print(outcome.report.table())
    print(outcome.report.summary())
    print(f"wrote {outcome.output}")
    return 0

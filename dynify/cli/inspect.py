"""``dynify inspect``: what converting a timm model would cost, layer by layer."""

from __future__ import annotations

import argparse

from dynify.cli._arguments import add_command, add_model_arguments

HELP = "show a model's convs and their cost (MACs, FLOPs, params) before and after conversion"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        "inspect",
        HELP,
        "Counts are analytic (from the traced shapes) and per image unless --batch-size is "
        "given; FLOPs = 2 x MACs. FLOPs measured with torch's FlopCounterMode are shown "
        "beside them.",
    )
    add_model_arguments(
        p,
        model_help="timm model name, e.g. resnet50, or a .safetensors artifact (its plan and "
        "weights)",
        input_size_help="default: the model's",
    )
    p.add_argument("--batch-size", type=int, default=1, metavar="B", help="default: 1")
    p.add_argument(
        "--device", default=None, help="where FLOPs and latency are measured (default: cuda if any)"
    )
    p.add_argument("--latency", action="store_true", help="time static and converted side by side")
    p.add_argument("--repeats", type=int, default=10, help="timed passes per model (--latency)")
    p.add_argument(
        "--budget",
        default=None,
        metavar="B",
        help="say whether each model fits, e.g. 600MFLOPs, 300MMACs, 25Mparams, 3ms",
    )
    p.add_argument("--all", action="store_true", help="list every conv, not only convertible")
    routing = p.add_argument_group(
        "routing (an artifact and --data: does each dynamic layer route?)"
    )
    routing.add_argument(
        "--data",
        default=None,
        metavar="D",
        help="measure routing on the validation split of this data set (folder, .tar, "
        "torch/NAME; a single folder or .tar is split as 'dynify finetune' splits it)",
    )
    routing.add_argument(
        "--routing-images", type=int, default=512, metavar="N", help="images to use (512)"
    )
    routing.add_argument(
        "--img-size",
        type=int,
        default=None,
        metavar="S",
        help="image size (default: the size the artifact's plan was traced at)",
    )
    routing.add_argument(
        "--plot", default=None, metavar="PNG", help="write a PNG of attention use per layer"
    )
    routing.add_argument(
        "--no-logit-effects",
        action="store_true",
        help="skip each layer's effect on the logits (one pass over the images per layer)",
    )
    p.set_defaults(run=run)


def _print_plan(label: str, plan, args: argparse.Namespace):
    """The per-conv table of ``plan``; returns its static and converted cost reports."""
    from dynify import cost

    before = cost.count(plan, batch_size=args.batch_size, static=True)
    after = cost.count(plan, batch_size=args.batch_size)
    per = "per image" if args.batch_size == 1 else f"per batch of {args.batch_size}"
    size = "x".join(map(str, plan.input_size))
    print(
        f"{label} recipe {plan.recipe}, input {size}, {per}; "
        f"{len(plan.converted)}/{len(plan.layers)} convs dynamic"
    )
    print(cost.format_layers(plan, before, after, show_all=args.all))
    print()
    return before, after


def run(args: argparse.Namespace) -> int:
    import dynify
    from dynify import cost
    from dynify.cli import COUNT, check_limits
    from dynify.errors import DynifyError
    from dynify.models import create_model, parse_input_size

    check_limits(
        args,
        {
            "num_classes": COUNT,
            "batch_size": COUNT,
            "repeats": COUNT,
            "routing_images": COUNT,
            "img_size": COUNT,
        },
    )
    budget = cost.parse_budget(args.budget) if args.budget is not None else None
    input_size = parse_input_size(args.input_size)
    device = cost.resolve_device(args.device)
    if args.model.endswith(".safetensors"):
        return _inspect_artifact(args, device=device)
    if args.data is not None or args.plot is not None:
        raise DynifyError(
            "--data and --plot measure a converted model's routing: give a .safetensors "
            "artifact (from 'dynify convert' or 'dynify finetune'), not a timm model name"
        )
    recipe = dynify.load_recipe(args.recipe)
    model = create_model(
        args.model,
        pretrained=args.pretrained,
        checkpoint=args.checkpoint,
        num_classes=args.num_classes,
    ).eval()
    plan = dynify.make_plan(model, recipe, input_size=input_size)
    before, after = _print_plan(f"{args.model}:", plan, args)

    converted = dynify.apply(model, plan)
    measured = (
        cost.measure_flops(model, input_size=plan.input_size, device=device,
                           batch_size=args.batch_size),
        cost.measure_flops(converted, device=device, batch_size=args.batch_size),
    )  # fmt: skip
    timing = None
    if args.latency or (budget is not None and budget.kind == "latency"):
        timing = cost.compare_latency(
            model,
            converted,
            plan.input_size,
            device=device,
            batch_size=args.batch_size,
            repeats=args.repeats,
        )
    print(cost.format_totals(before, after, measured=measured, device=str(device), latency=timing))
    print(cost.EXTRA_NOTE)
    if budget is not None:
        print(cost.check_budget(budget, before, after, latency=timing))
    return 0


def _inspect_artifact(args: argparse.Namespace, *, device) -> int:
    """An artifact: its plan and cost, and with --data its routing, layer by layer."""
    import dynify
    from dynify import cost
    from dynify._io import ensure_writable
    from dynify.errors import DynifyError

    for flag, value in (
        ("--recipe", args.recipe),
        ("--pretrained", args.pretrained),
        ("--checkpoint", args.checkpoint),
        ("--num-classes", args.num_classes),
        ("--input-size", args.input_size),
        ("--budget", args.budget),
        ("--latency", args.latency),
    ):
        if value:
            raise DynifyError(
                f"{flag} applies to a timm MODEL; an artifact holds its plan and weights"
            )
    if args.plot is not None and args.data is None:
        raise DynifyError("--plot draws the routing measured on --data: give --data too")
    plot = ensure_writable(args.plot, what="--plot") if args.plot is not None else None
    model = dynify.load(args.model).eval()
    plan = dynify.plan_of(model)
    before, after = _print_plan(f"{args.model}: {plan.model_name or 'model'},", plan, args)
    print(cost.format_totals(before, after, device=str(device)))
    if args.data is None:
        return 0
    from dynify.train.data import data_config, eval_loader, load_data, sample_images

    data = load_data(args.data, val_images=None)
    num_classes = getattr(model, "num_classes", None)
    if isinstance(num_classes, int) and num_classes != data.num_classes:
        raise DynifyError(
            f"the artifact classifies {num_classes} classes, the data {data.num_classes} "
            f"({data.source})"
        )
    if len(data.val) == 0:
        raise DynifyError(f"data {data.source!r}: no validation images to measure on")
    # The size the plan was traced at (the artifact's input size) unless --img-size.
    img_size = args.img_size if args.img_size is not None else plan.input_size[-1]
    cfg = data_config(model, img_size=img_size)
    images = sample_images(data.val, args.routing_images)
    n = len(images)
    loader = eval_loader(images, cfg=cfg, batch_size=128, workers=0)
    model.to(device)
    report = dynify.routing_report(
        model, loader, max_images=n, logit_effects=not args.no_logit_effects
    )
    print()
    print(f"routing on {n} images of {data.val_source or data.source} at {img_size}px:")
    print(report.table())
    print(report.summary())
    if plot is not None:
        report.plot(plot)
        print(f"wrote {plot}")
    return 0

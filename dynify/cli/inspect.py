"""``dynify inspect``: what converting a timm model would cost, layer by layer."""

from __future__ import annotations

import argparse

HELP = "show a model's convs and their cost (MACs, FLOPs, params) before and after conversion"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help=HELP,
        description=(
            f"{HELP[0].upper()}{HELP[1:]}. Counts are analytic (from the traced shapes) and "
            "per image unless --batch-size is given; FLOPs = 2 x MACs. FLOPs measured with "
            "torch's FlopCounterMode are shown beside them."
        ),
    )
    p.add_argument("model", help="timm model name, e.g. resnet50")
    p.add_argument(
        "--recipe",
        default=None,
        help="recipe YAML file or bundled name (dycnn, mobile, condconv, all); default: dycnn",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--pretrained", action="store_true", help="use timm's pretrained weights")
    src.add_argument("--checkpoint", metavar="FILE", help="load these weights")
    p.add_argument("--num-classes", type=int, default=None, metavar="N")
    p.add_argument("--input-size", default=None, metavar="C,H,W", help="default: the model's")
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
    p.set_defaults(run=run)


def _conv_rows(plan, before, after, *, show_all: bool) -> list[list[str]]:
    from dynify.cost import format_count

    rows = []
    for lp in plan.layers:
        s = lp.site
        if s.unsupported is not None and not show_all:
            continue
        kh, kw = s.kernel_size
        conv = f"{s.in_channels}->{s.out_channels} {kh}x{kw}/{s.stride[0]}"
        if s.groups > 1:
            conv += " dw" if s.depthwise else f" g{s.groups}"
        b, a = before.row(s.name), after.row(s.name)
        rows.append(
            [
                s.name,
                conv,
                "x".join(map(str, s.input_shape)) if s.input_shape else "?",
                lp.kind,
                str(lp.settings.experts) if lp.convert else "-",
                format_count(b.macs),
                format_count(a.macs),
                f"{b.params:,}",
                f"{a.params:,}",
            ]
        )
    return rows


def run(args: argparse.Namespace) -> int:
    import dynify
    from dynify import cost
    from dynify._table import format_table
    from dynify.errors import DynifyError
    from dynify.models import create_model, parse_input_size

    budget = cost.parse_budget(args.budget) if args.budget is not None else None
    input_size = parse_input_size(args.input_size)
    if args.batch_size < 1 or args.repeats < 1:
        raise DynifyError(
            f"--batch-size and --repeats must be >= 1, got {args.batch_size}, {args.repeats}"
        )
    device = cost.resolve_device(args.device)
    recipe = dynify.load_recipe(args.recipe)
    model = create_model(
        args.model,
        pretrained=args.pretrained,
        checkpoint=args.checkpoint,
        num_classes=args.num_classes,
    ).eval()
    plan = dynify.make_plan(model, recipe, input_size=input_size)
    before = cost.count(plan, batch_size=args.batch_size, static=True)
    after = cost.count(plan, batch_size=args.batch_size)

    per = "per image" if args.batch_size == 1 else f"per batch of {args.batch_size}"
    size = "x".join(map(str, plan.input_size))
    print(
        f"{args.model}: recipe {plan.recipe}, input {size}, {per}; "
        f"{len(plan.converted)}/{len(plan.layers)} convs dynamic"
    )
    header = ["layer", "conv", "input", "kind", "K", "MACs", "MACs after", "params",
              "params after"]  # fmt: skip
    print(format_table(header, _conv_rows(plan, before, after, show_all=args.all)))
    print()

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
        if budget.kind == "latency":
            assert timing is not None
            fits = [timing.static.median <= budget.value, timing.converted.median <= budget.value]
        else:
            fits = [budget.fits(before), budget.fits(after)]
        verdict = {True: "fits", False: "does not fit"}
        print(f"budget {budget}: static {verdict[fits[0]]}, converted {verdict[fits[1]]}")
    return 0

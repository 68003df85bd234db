"""``dynify convert``: build a timm model, convert it by a recipe, write one artifact."""

from __future__ import annotations

import argparse
import time

from dynify.cli._arguments import add_command, add_model_arguments

HELP = "convert a timm model's convs to dynamic convolutions and write an artifact"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        "convert",
        HELP,
        "Prints the per-layer plan, checks that the converted model computes what the "
        "original did, and writes the weights, the timm name and the plan to one "
        ".safetensors file (rebuild it with dynify.load or --from).",
    )
    rebuild = {
        "dest": "from_artifact",
        "metavar": "ARTIFACT",
        "help": "rebuild an existing artifact instead of converting a model",
    }
    add_model_arguments(
        p,
        model_help="timm model name, e.g. resnet50",
        input_size_help="example input size",
        optional=True,
        more_sources=[("--from", rebuild)],
    )
    p.add_argument(
        "--output",
        default=None,
        metavar="PATH",
        help="artifact to write (default: <model>.dynify.safetensors here)",
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--strict", action="store_true", help="fail if a recipe rule matches no conv")
    p.add_argument("--seed", type=int, default=0, help="seed of the experts' perturbation")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import dynify
    from dynify import cost
    from dynify._io import ensure_writable
    from dynify.cli import COUNT, SEED, check_limits
    from dynify.convert import EQUIVALENCE_TOLERANCE
    from dynify.errors import DynifyError
    from dynify.models import create_model, parse_input_size

    check_limits(args, {"num_classes": COUNT, "seed": SEED})
    if args.device == "cuda" and not torch.cuda.is_available():
        raise DynifyError("--device cuda: no CUDA device is available here; use --device cpu")
    if args.from_artifact:
        if args.model:
            raise DynifyError("give either MODEL or --from ARTIFACT, not both")
        return _rebuild(args)
    if not args.model:
        raise DynifyError("MODEL is required (a timm name such as resnet50), or --from ARTIFACT")
    input_size = parse_input_size(args.input_size)
    recipe = dynify.load_recipe(args.recipe)  # validate before building anything
    output = ensure_writable(
        f"{args.model}.dynify.safetensors" if args.output is None else args.output,
        what="--output",
    )
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    model = create_model(
        args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, **kwargs
    )
    model = model.to(args.device).eval()

    start = time.perf_counter()
    converted = dynify.apply(
        model,
        recipe,
        input_size=input_size,
        inplace=False,
        strict=args.strict or None,
        seed=args.seed,
    )
    elapsed = time.perf_counter() - start
    plan = dynify.plan_of(converted)
    print(f"{args.model}: recipe {plan.recipe}, input {'x'.join(map(str, plan.input_size))}")
    print(plan.table())
    # Both at the size the plan was traced at (the static model's default is its own).
    size = tuple(plan.input_size)
    print(
        cost.format_totals(
            cost.count(model, input_size=size), cost.count(converted, input_size=size)
        )
    )
    if plan.fx_error:
        print(
            f"note: torch.fx could not trace the model ({plan.fx_error}); convs were found "
            "with forward hooks"
        )
    if plan.converted:
        print(
            f"equivalence: eval output max relative error {plan.check_error:.2e} in "
            f"{plan.check_precision} (tolerance {EQUIVALENCE_TOLERANCE:g}): OK"
        )
    else:
        print("no conv matched the recipe: the model is unchanged")
    print(f"converted in {elapsed:.2f} s")

    dynify.save(converted, output, model_name=args.model, model_kwargs=kwargs)
    print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB)")
    return 0


def _rebuild(args: argparse.Namespace) -> int:
    import dynify
    from dynify._io import ensure_writable
    from dynify.artifact import read_info

    output = ensure_writable(args.output, what="--output") if args.output is not None else None
    info = read_info(args.from_artifact)
    model = dynify.load(args.from_artifact, device=args.device)
    plan = dynify.plan_of(model)
    print(
        f"{args.from_artifact}: {info['model_name']} {info['model_kwargs']}, written by dynify "
        f"{info['dynify_version']} (timm {info['timm_version']})"
    )
    print(plan.table())
    if output is not None:
        dynify.save(
            model,
            output,
            model_name=info["model_name"],
            model_kwargs=info["model_kwargs"],
            extra=info["extra"],
        )
        print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB)")
    return 0

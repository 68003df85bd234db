"""``dynify export``: an artifact as an ONNX graph or a torch.export program, checked."""

from __future__ import annotations

import argparse

from dynify.cli._arguments import add_command

HELP = "export an artifact to ONNX or a torch.export program, checked against the model"

FORMATS = ("onnx", "torch-export")  # dynify.export.FORMATS (kept here: --help imports no torch)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        "export",
        HELP,
        "Writes one .onnx file (weights inside) or one torch.export .pt2 program, then runs "
        "what was written (onnxruntime on the CPU, or torch.export.load) against the eager "
        "model at two batch sizes (the fixed one with --batch N); the file appears only if "
        'the outputs agree. ONNX needs the export extra: pip install "dynify[export]".',
    )
    p.add_argument("artifact", metavar="ARTIFACT", help="a .safetensors artifact (dynify convert)")
    p.add_argument("--format", default="onnx", choices=FORMATS, help="default: onnx")
    p.add_argument(
        "--batch",
        default="dynamic",
        metavar="N|dynamic",
        help="the graph's batch size: 'dynamic' (default; checked at 1 and 3) or a fixed N",
    )
    p.add_argument(
        "--opset", type=int, default=None, metavar="N", help="ONNX opset (default: torch's)"
    )
    p.add_argument(
        "--input-size",
        default=None,
        metavar="C,H,W",
        help="default: the size the artifact's plan was traced at",
    )
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the check")
    p.add_argument(
        "--no-fuse-batchnorm",
        dest="fuse_batchnorm",
        action="store_false",
        help="export the BatchNorms as they are (default: fused into the convs before them)",
    )
    p.add_argument(
        "--no-optimize",
        dest="optimize",
        action="store_false",
        help="skip onnxscript's graph optimizer (quicker; onnxruntime optimizes at load anyway)",
    )
    p.add_argument("--output", required=True, metavar="PATH", help="the file to write")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import dynify
    from dynify import export
    from dynify._io import ensure_writable
    from dynify.artifact import read_info
    from dynify.errors import DynifyError
    from dynify.models import parse_input_size

    # Every flag checked before the artifact is read.
    output = ensure_writable(args.output, what="--output")
    batch = export.parse_batch(args.batch)
    input_size = parse_input_size(args.input_size)
    if args.format == "onnx":
        export.require_onnx()
        export.check_opset(args.opset)
    elif args.opset is not None:
        raise DynifyError("--opset is for --format onnx; a torch.export program has none")
    info = read_info(args.artifact)
    model = dynify.load(args.artifact)
    print(f"{args.artifact}: {info['model_name']} {info['model_kwargs']}")
    common = {
        "batch": batch,
        "input_size": input_size,
        "check": args.check,
        "fuse_batchnorm": args.fuse_batchnorm,
    }
    if args.format == "onnx":
        report = export.export_onnx(
            model, output, opset=args.opset, optimize=args.optimize, **common
        )
    else:
        report = export.export_program(model, output, **common)
    size = "x".join(map(str, report.input_size))
    opset = f", opset {report.opset}" if report.opset is not None else ""
    norms = (
        f"{len(report.fused)} BatchNorm(s) fused into the convs before them"
        if args.fuse_batchnorm
        else "BatchNorms kept"
    )
    print(f"{report.format}{opset}: batch {report.batch}, input {size}, {norms}")
    if report.errors:
        checked = ", ".join(f"batch {b} {e:.1e}" for b, e in report.errors)
        runner = "onnxruntime" if report.format == "onnx" else "torch.export.load"
        print(
            f"check ({runner} against the eager model): max relative error {checked} "
            f"(tolerance {export.TOLERANCE:g}): OK"
        )
    print(f"wrote {report.path} ({report.path.stat().st_size / 2**20:.1f} MiB)")
    return 0

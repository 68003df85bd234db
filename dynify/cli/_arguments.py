"""Parser pieces more than one command shares: the command's own parser, a timm model and
where its weights come from, the recipe. Plain argparse (``--help`` imports no torch)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

__all__ = ["RECIPE_HELP", "add_command", "add_model_arguments", "add_weights_source"]

RECIPE_HELP = "recipe YAML file or bundled name (dycnn, mobile, condconv, all); default: dycnn"


def add_command(
    subparsers: argparse._SubParsersAction, name: str, help: str, details: str
) -> argparse.ArgumentParser:
    """The parser of command ``name``: ``help`` in the command list; the description is
    ``help`` as a sentence, then ``details``."""
    return subparsers.add_parser(
        name, help=help, description=f"{help[0].upper()}{help[1:]}. {details}"
    )


def add_model_arguments(
    p: argparse.ArgumentParser,
    *,
    model_help: str,
    input_size_help: str,
    optional: bool = False,
    more_sources: Sequence[tuple[str, dict[str, Any]]] = (),
) -> None:
    """The arguments of a command that builds a timm model and plans its conversion: the
    model (``optional``: may be left out), ``--recipe``, where the weights come from
    (``--pretrained``, ``--checkpoint`` and ``more_sources``, ``(flag, add_argument
    keywords)``, one of them at most), ``--num-classes`` and ``--input-size``."""
    p.add_argument("model", nargs="?" if optional else None, help=model_help)
    p.add_argument("--recipe", default=None, help=RECIPE_HELP)
    src = add_weights_source(p)
    for flag, kwargs in more_sources:
        src.add_argument(flag, **kwargs)
    p.add_argument("--num-classes", type=int, default=None, metavar="N")
    p.add_argument("--input-size", default=None, metavar="C,H,W", help=input_size_help)


def add_weights_source(
    p: argparse.ArgumentParser | argparse._ArgumentGroup,
) -> argparse._MutuallyExclusiveGroup:
    """``--pretrained`` or ``--checkpoint FILE`` (one at most): where a timm model's weights
    come from; the group, for commands that add another source to it."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--pretrained", action="store_true", help="start from timm's weights")
    src.add_argument("--checkpoint", metavar="FILE", help="start from these weights")
    return src

"""The settings of a search: :class:`SearchSettings` (plain data, what every worker process
is given) and their validation, before anything is built or read.

Owns the numeric settings and the values each accepts (the limits are
:mod:`dynify._limits`'s, shared with the command line), the parsing of a number given as
text (what the command line passes), and the objectives. Messages name the Python argument
(``trials``) and list it in ``DynifyError.arguments``; the command line shows its flag.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dynify._limits import COUNT, POSITIVE, SEED, Limit
from dynify.cost import parse_budget
from dynify.errors import DynifyError, quoted

__all__ = [
    "NUMERIC_SETTINGS",
    "OBJECTIVES",
    "SearchSettings",
    "accepted",
    "check_number",
    "check_settings",
    "param_count",
    "parse_number",
]

OBJECTIVES: tuple[str, ...] = ("accuracy", "latency", "params")


@dataclass(frozen=True)
class SearchSettings:
    """Everything a search run (and each of its worker processes) needs; plain data."""

    budget: str
    model: str | None = None
    space: str | None = None
    data: str | None = None
    trials: int = 20
    timeout: float | None = None
    output: str = "runs/search"
    storage: str | None = None
    study: str | None = None
    workers: int = 1
    device: str | None = None
    max_params: float | None = None
    max_latency: str | None = None
    objectives: tuple[str, ...] = ("accuracy",)
    pretrained: bool = False
    checkpoint: str | None = None
    seed: int = 0
    heartbeat: int = 60
    data_cache: str | None = None
    progress: bool = True
    # The per-trial training budget, overriding the space's ``training`` section when given.
    epochs: int | None = None
    train_images: int | None = None
    val_images: int | None = None


# The numeric settings of SearchSettings and the values each accepts; the command line parses
# with these too (parse_number), so a bad value is the same one line from either. What a
# number is does not repeat its setting's name: the command line writes each mention of the
# name as its flag.
NUMERIC_SETTINGS: dict[str, Limit] = {
    "trials": COUNT.but(note="the number to finish, over every process"),
    "timeout": POSITIVE.but(note="seconds"),
    "workers": COUNT.but(note="worker processes"),
    "max_params": POSITIVE.but(note="parameters"),
    "seed": SEED.but(note="random init and sampler"),
    "heartbeat": COUNT.but(note="seconds"),
    "epochs": COUNT.but(note="training passes per trial"),
    "train_images": COUNT.but(note="images per epoch"),
    "val_images": COUNT.but(note="held-out images"),
}


def accepted(name: str) -> str:
    """The accepted values of the numeric setting ``name``, as an error message says them."""
    return str(NUMERIC_SETTINGS[name])


def check_number(name: str, value: Any) -> None:
    """Refuse a numeric setting outside its range, naming it and what is accepted."""
    NUMERIC_SETTINGS[name].check(name, value)


def param_count(text: str) -> float:
    """``30M`` -> 3e7 (a parameter count, as ``max_params`` takes it)."""
    stripped = text.strip()
    budget = parse_budget(stripped if stripped.lower().endswith("params") else stripped + "params")
    return budget.value


def parse_number(name: str, text: str | None) -> float | int | None:
    """The text of the numeric setting ``name`` (``"20"``, ``"30M"`` for ``max_params``) as
    the number it takes; one line naming it and the accepted values if it is not one. The
    range is checked by :func:`check_settings`."""
    if text is None:
        return None
    integer = NUMERIC_SETTINGS[name].integer
    try:
        if name == "max_params":
            return param_count(text)
        return int(text) if integer else float(text)
    except (ValueError, DynifyError) as err:
        example = ", e.g. 30M" if name == "max_params" else ""
        raise DynifyError(
            f"{name} must be {accepted(name)}{example}, got {quoted(text)}", arguments=(name,)
        ) from err


def objectives(names: Sequence[str]) -> tuple[str, ...]:
    """The objectives ``names`` ask for, normalized: ``" Accuracy, params"`` and
    ``"accuracy,params"`` are the same search (and the same study)."""
    names = tuple(n.strip().lower() for n in names if n.strip())
    if not names or names[0] != "accuracy" or len(names) > 2 or len(set(names)) != len(names):
        raise DynifyError(
            f"objectives {','.join(names)!r}: give 'accuracy', 'accuracy,latency' or "
            "'accuracy,params'",
            arguments=("objectives",),
        )
    for n in names:
        if n not in OBJECTIVES:
            raise DynifyError(f"unknown objective {n!r}; accepted: {', '.join(OBJECTIVES)}")
    return names


def check_settings(settings: SearchSettings) -> SearchSettings:
    """Refuse a numeric setting out of range or unknown objectives; ``settings`` with its
    objectives normalized. Reads no file and builds nothing."""
    for name in NUMERIC_SETTINGS:
        if getattr(settings, name) is not None:
            check_number(name, getattr(settings, name))
    return dataclasses.replace(settings, objectives=objectives(settings.objectives))

"""The values a numeric setting accepts: one definition for the command line's flags and the
library's settings (the search's ``trials``, ``seed``, ...).

A :class:`Limit` is a range; the shared ones are named by what the number is (:data:`COUNT`,
:data:`SEED`, ...). :func:`check_value` refuses one value, :func:`check_limits` every
attribute of an object (an argparse namespace, a settings dataclass) that a table names. The
messages name the Python argument and list it in ``DynifyError.arguments``, so the command
line shows its flag instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dynify.errors import DynifyError

__all__ = [
    "COUNT",
    "FRACTION",
    "NON_NEGATIVE",
    "POSITIVE",
    "SEED",
    "SHARE",
    "Limit",
    "check_limits",
    "check_value",
    "expected",
]


@dataclass(frozen=True)
class Limit:
    """The values a number accepts: ``low`` / ``high`` bounds (inclusive unless ``low_open``
    / ``high_open``), always finite."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def accepts(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{low}, {high}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {high}"
        return "finite"


def _number(value: float | None) -> str:
    """A bound as a reader writes it: ``4294967295`` rather than ``4.29497e+09``."""
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


# Shared limits, by what the number is.
COUNT = Limit(low=1)  # images, epochs, classes, batch sizes, pixels, trials
NON_NEGATIVE = Limit(low=0)  # worker processes, warm-up epochs
SEED = Limit(low=0, high=2**32 - 1)  # what numpy's and torch's generators take
POSITIVE = Limit(low=0, low_open=True)  # learning rates, temperatures, norms, seconds
FRACTION = Limit(low=0, high=1, low_open=True)  # (0, 1]
SHARE = Limit(low=0, high=1)  # [0, 1]


def expected(limit: Limit, *, integer: bool = False, what: str = "") -> str:
    """What ``limit`` accepts, as a message says it: ``an integer >= 1 (epochs per trial)``."""
    kind = "an integer" if integer else "a number"
    return f"{kind} {limit}" + (f" ({what})" if what else "")


def check_value(
    name: str, value: Any, limit: Limit, *, integer: bool = False, what: str = ""
) -> None:
    """Refuse ``value`` (the argument ``name``) unless it is a number (an ``int`` when
    ``integer``; never a bool) that ``limit`` accepts: one line naming the argument, the value
    and what is accepted (``trials 0: expected an integer >= 1 (finished trials to reach)``).
    """
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if not (ok and limit.accepts(value)):
        raise DynifyError(
            f"{name} {value!r}: expected {expected(limit, integer=integer, what=what)}",
            arguments=(name,),
        )


def check_limits(values: object, limits: Mapping[str, Limit]) -> None:
    """Refuse, before any work, an attribute of ``values`` (an argparse namespace: ``limits``
    maps its destinations to their limits) outside its limit; ``None`` passes, and each item
    of a list or tuple is checked. One line naming the argument, the value and the accepted
    range (``num_classes must be >= 1, got 0``; the command line writes ``--num-classes``)."""
    for name, limit in limits.items():
        value = getattr(values, name)
        if value is None:
            continue
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if not limit.accepts(item):
                raise DynifyError(f"{name} must be {limit}, got {item}", arguments=(name,))

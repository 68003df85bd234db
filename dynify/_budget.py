"""Budget strings: ``600MFLOPs``, ``0.6GFLOPs``, ``300MMACs``, ``25Mparams``, ``3ms``.

Public through :mod:`dynify.cost` (``parse_budget``, ``Budget``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from dynify.errors import DynifyError

if TYPE_CHECKING:
    from dynify.cost import CostReport, Totals

__all__ = ["BUDGET_FORMS", "Budget", "BudgetKind", "parse_budget"]

BudgetKind = Literal["flops", "macs", "params", "latency"]

BUDGET_FORMS = (
    "a positive number and a unit, e.g. 600MFLOPs, 0.6GFLOPs, 300MMACs, 25Mparams or 3ms "
    "(prefixes K, M, G, T are powers of 1000; latency in s, ms or us; case-insensitive, "
    "a space is allowed)"
)

_PREFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_SECONDS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}
_NUMBER = r"(?P<num>(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)"
_COUNT_RE = re.compile(
    rf"^{_NUMBER}\s*(?P<prefix>[kmgt]?)\s*(?P<unit>flops?|macs?|params?)$", re.IGNORECASE
)
_TIME_RE = re.compile(rf"^{_NUMBER}\s*(?P<unit>s|ms|us|µs)$", re.IGNORECASE)
_UNIT_KIND: dict[str, BudgetKind] = {"flop": "flops", "mac": "macs", "param": "params"}
_SHOW = {"flops": "FLOPs", "macs": "MACs", "params": "params"}


@dataclass(frozen=True)
class Budget:
    """A parsed budget: ``kind`` and ``value`` in base units (FLOPs, MACs, parameters,
    or seconds for latency). FLOPs = 2 x MACs."""

    kind: BudgetKind
    value: float

    def amount(self, report: CostReport | Totals) -> float:
        """This budget's quantity in ``report`` (FLOPs, MACs or parameters); ``report`` is
        a :func:`~dynify.cost.count` report or :func:`~dynify.cost.price` totals.

        Latency is measured, not counted: use :func:`dynify.cost.latency` for it.
        """
        if self.kind == "latency":
            raise DynifyError(
                f"budget {self}: latency is measured on the device (dynify.cost.latency), "
                "a cost report does not hold it"
            )
        return float(
            {"flops": report.flops, "macs": report.macs, "params": report.params}[self.kind]
        )

    def fits(self, report: CostReport | Totals) -> bool:
        """Whether ``report`` stays within this budget."""
        return self.amount(report) <= self.value

    def __str__(self) -> str:
        if self.kind == "latency":
            return f"{self.value * 1e3:g} ms"
        from dynify.cost import format_count

        return f"{format_count(self.value)}{_SHOW[self.kind]}"


def parse_budget(text: str | Budget) -> Budget:
    """``"600MFLOPs"`` -> ``Budget("flops", 6e8)``; ``"3ms"`` -> ``Budget("latency", 0.003)``.

    Raises:
        DynifyError: for anything else, listing the accepted forms.
    """
    if isinstance(text, Budget):
        return text
    s = str(text).strip()
    m = _COUNT_RE.match(s)
    kind: BudgetKind | None = None
    value = math.nan
    if m is not None:
        unit = m["unit"].lower().rstrip("s")
        kind = _UNIT_KIND[unit]
        value = float(m["num"]) * _PREFIX[m["prefix"].lower()]
    else:
        m = _TIME_RE.match(s)
        if m is not None:
            kind = "latency"
            value = float(m["num"]) * _SECONDS[m["unit"].lower()]
    if kind is None or not (math.isfinite(value) and value > 0):
        raise DynifyError(f"budget {text!r} is not understood: give {BUDGET_FORMS}")
    return Budget(kind, value)

"""Budgets: parsing ``600MFLOPs``, ``0.6GFLOPs``, ``300MMACs``, ``25Mparams``, ``3ms``, and
deciding whether a model meets one.

A FLOPs, MACs or parameter budget is compared with a count (:func:`~dynify.cost.count`,
:func:`~dynify.cost.price`), a latency budget with a measured time
(:func:`~dynify.cost.latency`); :func:`check_budget` gives the verdict for a static and a
converted model side by side, with the figures it compared. Public through
:mod:`dynify.cost`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from dynify.cost.formatting import format_count
from dynify.cost.report import CostReport, Totals
from dynify.cost.timing import LatencyComparison, LatencyResult
from dynify.errors import DynifyError

__all__ = ["BUDGET_FORMS", "Budget", "BudgetCheck", "BudgetKind", "check_budget", "parse_budget"]

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

    def amount(self, measured: CostReport | Totals | LatencyResult) -> float:
        """This budget's quantity in ``measured``: FLOPs, MACs or parameters of a
        :func:`~dynify.cost.count` report or :func:`~dynify.cost.price` totals, or the
        median seconds of a :func:`~dynify.cost.latency` result.

        Raises:
            DynifyError: a latency budget given a count, or a count budget given a time.
        """
        if isinstance(measured, LatencyResult) != (self.kind == "latency"):
            what = "a measured time" if isinstance(measured, LatencyResult) else "a cost report"
            needs = (
                "a time measured on the device (dynify.cost.latency)"
                if self.kind == "latency"
                else "a count (dynify.cost.count or price)"
            )
            raise DynifyError(f"budget {self}: needs {needs}, not {what}")
        if isinstance(measured, LatencyResult):
            return measured.median
        return float(
            {"flops": measured.flops, "macs": measured.macs, "params": measured.params}[self.kind]
        )

    def fits(self, measured: CostReport | Totals | LatencyResult) -> bool:
        """Whether ``measured`` (as for :meth:`amount`) stays within this budget."""
        return self.amount(measured) <= self.value

    def show(self, amount: float) -> str:
        """``amount`` in this budget's unit: ``"600 MFLOPs"``, ``"2.31 ms"``."""
        if self.kind == "latency":
            return f"{amount * 1e3:.2f} ms"
        return f"{format_count(amount)}{_SHOW[self.kind]}"

    def __str__(self) -> str:
        if self.kind == "latency":
            return f"{self.value * 1e3:g} ms"
        return self.show(self.value)


@dataclass(frozen=True)
class BudgetCheck:
    """Whether the static and the converted model meet ``budget``: ``static`` and
    ``converted`` are the amounts compared (FLOPs, MACs, parameters, or median seconds)."""

    budget: Budget
    static: float
    converted: float

    @property
    def static_fits(self) -> bool:
        return self.static <= self.budget.value

    @property
    def converted_fits(self) -> bool:
        return self.converted <= self.budget.value

    def __str__(self) -> str:
        """``budget 100 MFLOPs: static fits, converted does not fit (static 59.4 MFLOPs,
        converted 77.1 MFLOPs)``"""
        verdict = {True: "fits", False: "does not fit"}
        b = self.budget
        return (
            f"budget {b}: static {verdict[self.static_fits]}, converted "
            f"{verdict[self.converted_fits]} (static {b.show(self.static)}, converted "
            f"{b.show(self.converted)})"
        )


def check_budget(
    budget: Budget | str,
    before: CostReport | Totals,
    after: CostReport | Totals,
    *,
    latency: LatencyComparison | None = None,
) -> BudgetCheck:
    """Does the static (``before``) and the converted (``after``) model meet ``budget``?

    A FLOPs, MACs or parameter budget compares the counts; a latency budget the medians of
    ``latency`` (a :func:`~dynify.cost.compare_latency` of the two models), which it needs.

    Raises:
        DynifyError: a budget string that is not understood, or a latency budget without
            ``latency``.
    """
    budget = parse_budget(budget)
    if budget.kind != "latency":
        return BudgetCheck(budget, budget.amount(before), budget.amount(after))
    if latency is None:
        raise DynifyError(
            f"budget {budget} is a time: give latency (a dynify.cost.compare_latency of "
            "the static and the converted model) to check it",
            arguments=("latency",),
        )
    return BudgetCheck(budget, budget.amount(latency.static), budget.amount(latency.converted))


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

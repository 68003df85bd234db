"""Old home of the budget strings, kept for the importers outside the cost model
(``dynify.search``, ``dynify.cli.search``); new code imports them from :mod:`dynify.cost`
(``Budget``, ``parse_budget``, ``BUDGET_FORMS``, ``BudgetKind``)."""

from __future__ import annotations

from dynify.cost.budget import BUDGET_FORMS, Budget, BudgetKind, parse_budget

__all__ = ["BUDGET_FORMS", "Budget", "BudgetKind", "parse_budget"]

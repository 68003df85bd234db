"""The search: Optuna picks which convs to make dynamic, and how, under a compute budget.

The public API is what this package exports (``dynify.search.search(SearchSettings(...))``
is what ``dynify search`` runs); its modules, each with one job, in the order they import
one another:

- ``space``: search spaces (the candidates, the choices, the training budget per trial);
- ``settings``: :class:`SearchSettings` and their validation;
- ``storage``: storage URLs, the Optuna storage they open, redaction of their passwords;
- ``data``: the training budget fitted to the data, the held-out split;
- ``context``: :func:`prepare` builds the :class:`SearchContext` every trial shares (the
  device, the model, the presets, the budget's constraints);
- ``sampling``: plans from trials (:func:`plan_of_trial`, :func:`plan_key`);
- ``trials``: which trial states count as finished;
- ``training``: the one call into the training loop, the speed the estimate is based on;
- ``objective``: a trial's objective (price, skip a plan seen before, build, train, score);
- ``claims``: which process runs which trial; interrupted trials and their retries;
- ``identity``: the study's name and identity, :func:`open_study`;
- ``worker``: :func:`run_worker`, the loop of one process;
- ``report``: the run folder and the summary;
- ``progress``: what a search says while it runs (through :mod:`dynify.logging`);
- ``run``: :func:`search`, one process or several;
- ``study``: the names the former single module had (deprecated, kept for importers).

The names are imported on first use (PEP 562), as for :mod:`dynify` itself.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports these
    from dynify.search.claims import SearchInterrupted
    from dynify.search.context import SearchContext, prepare
    from dynify.search.identity import open_study
    from dynify.search.report import (
        best_trials,
        history_figure,
        pareto_figure,
        rebuild_command,
        trial_rows,
        write_report,
    )
    from dynify.search.run import SearchOutcome, search
    from dynify.search.sampling import plan_key, plan_of_trial
    from dynify.search.settings import OBJECTIVES, SearchSettings
    from dynify.search.space import SearchSpace, group_layers, load_space
    from dynify.search.storage import redact_url
    from dynify.search.worker import run_worker

__all__ = [
    "OBJECTIVES",
    "SearchContext",
    "SearchInterrupted",
    "SearchOutcome",
    "SearchSettings",
    "SearchSpace",
    "best_trials",
    "group_layers",
    "history_figure",
    "load_space",
    "open_study",
    "pareto_figure",
    "plan_key",
    "plan_of_trial",
    "prepare",
    "rebuild_command",
    "redact_url",
    "run_worker",
    "search",
    "trial_rows",
    "write_report",
]

# The module that defines each public name (the imports above, for run time).
_SOURCES: dict[str, str] = {
    name: f"{__name__}.{module}"
    for module, names in {
        "claims": ("SearchInterrupted",),
        "context": ("SearchContext", "prepare"),
        "identity": ("open_study",),
        "report": (
            "best_trials",
            "history_figure",
            "pareto_figure",
            "rebuild_command",
            "trial_rows",
            "write_report",
        ),
        "run": ("SearchOutcome", "search"),
        "sampling": ("plan_key", "plan_of_trial"),
        "settings": ("OBJECTIVES", "SearchSettings"),
        "space": ("SearchSpace", "group_layers", "load_space"),
        "storage": ("redact_url",),
        "worker": ("run_worker",),
    }.items()
    for name in names
}


def __getattr__(name: str) -> Any:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(source), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

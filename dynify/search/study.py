"""The names ``dynify.search.study`` had before the search was split into modules with one
job each; kept so that code importing them from here keeps working. New code imports from
:mod:`dynify.search` (the public API) or from the module that owns a name:

- :mod:`dynify.search.settings`: ``SearchSettings``, ``NUMERIC_SETTINGS``, ``OBJECTIVES``,
  ``accepted``, ``check_number``;
- :mod:`dynify.search.context`: ``SearchContext``, ``prepare``, ``STATIC``;
- :mod:`dynify.search.sampling`: ``plan_of_trial``, ``plan_key``, ``sample_recipe``,
  ``static_params``;
- :mod:`dynify.search.objective`: ``objective``;
- :mod:`dynify.search.storage`: ``make_storage``, ``storage_url``, ``local_storage_file``,
  ``has_heartbeat``, ``redact_url``, ``redact_text``;
- :mod:`dynify.search.identity`: ``open_study``, ``study_name``;
- :mod:`dynify.search.claims`: ``SearchInterrupted``, ``requeue_interrupted``, ``claim``
  (was ``_claim``), ``Surplus`` (was ``_Surplus``);
- :mod:`dynify.search.worker`: ``run_worker``;
- :mod:`dynify.search.trials`: ``FINISHED``, ``finished``;
- :mod:`dynify.search.progress`: ``clock``, ``estimate``;
- :mod:`dynify.search.training`: ``training_speed``.

Deprecated: nothing new is added here.
"""

from __future__ import annotations

from dynify.search.claims import INTERRUPTED, SearchInterrupted, requeue_interrupted
from dynify.search.claims import Surplus as _Surplus
from dynify.search.claims import claim as _claim
from dynify.search.context import PRESET_RECIPES, STATIC, SearchContext, prepare
from dynify.search.data import SCALED_HOLDOUT
from dynify.search.identity import open_study, study_name
from dynify.search.objective import objective
from dynify.search.progress import clock, estimate
from dynify.search.sampling import plan_key, plan_of_trial, sample_recipe, static_params
from dynify.search.settings import (
    NUMERIC_SETTINGS,
    OBJECTIVES,
    SearchSettings,
    accepted,
    check_number,
)
from dynify.search.storage import (
    HIDDEN,
    MESSAGE_LIMIT,
    has_heartbeat,
    local_storage_file,
    make_storage,
    redact_text,
    redact_url,
    storage_url,
)
from dynify.search.training import training_speed
from dynify.search.trials import FINISHED, finished
from dynify.search.worker import run_worker

__all__ = [
    "FINISHED",
    "HIDDEN",
    "INTERRUPTED",
    "MESSAGE_LIMIT",
    "NUMERIC_SETTINGS",
    "OBJECTIVES",
    "PRESET_RECIPES",
    "SCALED_HOLDOUT",
    "STATIC",
    "SearchContext",
    "SearchInterrupted",
    "SearchSettings",
    "_Surplus",
    "_claim",
    "accepted",
    "check_number",
    "clock",
    "estimate",
    "finished",
    "has_heartbeat",
    "local_storage_file",
    "make_storage",
    "objective",
    "open_study",
    "plan_key",
    "plan_of_trial",
    "prepare",
    "redact_text",
    "redact_url",
    "requeue_interrupted",
    "run_worker",
    "sample_recipe",
    "static_params",
    "storage_url",
    "study_name",
    "training_speed",
]

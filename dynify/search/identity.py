"""Which study a search is, and opening it.

Owns the study's name and identity (what must be the same for processes to share a study:
the model, budget, limits, space, objectives, starting weights, groups), its creation (once,
whichever process comes first, with the presets queued once), the sampler and pruner every
process gets, and the refusal of a study made for another search.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import optuna

from dynify.errors import DynifyError
from dynify.search.claims import requeue_interrupted
from dynify.search.context import STATIC, SearchContext
from dynify.search.sampling import static_params
from dynify.search.storage import (
    folder_lock,
    local_storage_file,
    make_storage,
    redact_url,
    storage_url,
)

__all__ = ["open_study", "study_identity", "study_name"]


def study_name(ctx: SearchContext) -> str:
    """The study's name: ``settings.study``, or one made of the model, input size and the
    parsed budget."""
    if ctx.settings.study:
        return ctx.settings.study
    size = "x".join(map(str, ctx.space.input_size[1:]))
    # The parsed budget, so 600MFLOPs and 0.6GFLOPs name the same study.
    budget = str(ctx.budget).replace(" ", "")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{ctx.model_name}-{size}-{budget}")


def study_identity(ctx: SearchContext) -> dict[str, Any]:
    """What must be the same for processes to share a study."""
    space = ctx.space
    choices = {
        "granularity": space.granularity,
        "experts": list(space.experts),
        "reduction": list(space.reduction),
        "kinds": list(space.kinds),
        "temperature": repr(space.temperature),
        "training": repr(space.training),
    }
    return {
        "model": ctx.model_name,
        "budget": str(ctx.budget),
        "max_params": ctx.settings.max_params,
        "max_latency": ctx.max_latency,
        "space": space.label,
        "choices": hashlib.sha256(json.dumps(choices).encode()).hexdigest()[:16],
        "input_size": list(space.input_size),
        "objectives": list(ctx.settings.objectives),
        "weights": ctx.fingerprint,
        "groups": sorted(ctx.groups),
    }


def open_study(ctx: SearchContext, *, create: bool) -> optuna.Study:
    """Create (``create``) or load the study; refuse one that was made for another search.

    The process that creates the study enqueues the presets (once, even when several
    processes start together) and seeds its sampler with ``settings.seed`` when it is the
    only worker, so a fresh one-process run is reproducible. Every other process (a resume,
    a worker process, another machine) gets a freshly seeded sampler, so processes do not
    all draw the same plans.
    """
    storage = make_storage(ctx.settings)
    name = study_name(ctx)
    maximize, minimize = optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE
    directions = [maximize] + [minimize] * (len(ctx.settings.objectives) - 1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    identity = study_identity(ctx)
    created = False
    if create:
        try:
            study_id = storage.create_new_study(directions, study_name=name)
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            pass  # a resume, or another process made it first
        else:
            # Claim the presets at once: a process joining a moment later sees the claim and
            # does not queue them again (the run-time check in claim covers the rest).
            storage.set_study_user_attr(study_id, "dynify", identity)
            storage.set_study_user_attr(study_id, "presets_enqueued", list(ctx.presets))
    sampler = optuna.samplers.TPESampler(
        seed=ctx.settings.seed if created and ctx.settings.workers == 1 else None,
        n_startup_trials=max(len(ctx.presets) + 2, 5),
        multivariate=True,
        constant_liar=True,
    )
    pruner = optuna.pruners.MedianPruner(n_startup_trials=len(ctx.presets) + 1, n_warmup_steps=0)
    try:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError as err:
        where = redact_url(ctx.settings.storage) if ctx.settings.storage else "the run folder"
        raise DynifyError(f"study {name!r} does not exist in {where}") from err
    existing = study.user_attrs.get("dynify")
    if existing is None and create:
        study.set_user_attr("dynify", identity)
    elif existing is not None and existing != identity:
        diff = ", ".join(
            f"{k}: {existing.get(k)!r} there vs {v!r} here"
            for k, v in identity.items()
            if existing.get(k) != v
        )
        raise DynifyError(
            f"{name!r} in this storage belongs to another search ({diff}); "
            "give another study name or output folder",
            arguments=("study", "output"),
        )
    if list(study.directions) != directions:
        raise DynifyError(
            f"{name!r} in this storage has {len(study.directions)} objective(s), this search "
            f"{len(directions)}; give another study name or output folder",
            arguments=("study", "output"),
        )
    # Presets: queued by the creator; a later process queues them only if the creator died
    # before it could claim them.
    if created or (create and "presets_enqueued" not in study.user_attrs):
        if not created:
            study.set_user_attr("presets_enqueued", list(ctx.presets))
        for preset in ctx.presets:
            params = static_params(ctx) if preset == STATIC else {}
            study.enqueue_trial(params, user_attrs={"preset": preset})
    if create:
        # Two resumes at once must not both queue a retry of the same trial: on a local
        # storage they take turns under the folder lock that guards its creation, each reading
        # the trials afresh under it; on a server, claim runs only the first of two retries.
        path = local_storage_file(storage_url(ctx.settings))
        with folder_lock(None if path is None else path.parent):
            requeue_interrupted(study)
    return study

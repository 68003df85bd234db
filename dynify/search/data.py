"""The search's images: the per-trial training budget fitted to the data, and the split of
the training set into images to train on and images held out to score each trial (the test
split is never used by the search)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.utils.data import Subset

from dynify.errors import DynifyError
from dynify.search.settings import SearchSettings
from dynify.search.space import SearchSpace, TrainingBudget
from dynify.train import Data

__all__ = ["SCALED_HOLDOUT", "fit_budget", "split_data"]

# The fraction held out when the space's split does not fit the data: finetune's holdout.
SCALED_HOLDOUT = 0.1


def fit_budget(
    settings: SearchSettings, space: SearchSpace, n: int, spec: str
) -> tuple[TrainingBudget, str | None]:
    """The training budget per trial for ``n`` training images: the space's, with the
    settings' ``epochs`` / ``train_images`` / ``val_images`` in place of its own, and (when
    the data is smaller than the space's counts) the counts the settings did not give scaled
    to the data, with a note saying so (it names ``val_images`` and ``train_images``).
    Refuses only what cannot work: explicit counts the data cannot hold, or fewer than two
    images."""
    overrides = {
        key: getattr(settings, key)
        for key in ("epochs", "train_images", "val_images")
        if getattr(settings, key) is not None
    }
    budget = dataclasses.replace(space.training, **overrides)
    val, train = budget.val_images, budget.train_images
    if val < n and val + (train or 0) <= n:
        return budget, None
    if n < 2:
        raise DynifyError(
            f"data {spec!r} has {n} training image(s); a search needs at least 2 (one to train "
            "on, one held out): give more data"
        )
    given_val, given_train = "val_images" in overrides, "train_images" in overrides
    counts = ("val_images", "train_images")
    if given_val and given_train:
        raise DynifyError(
            f"data {spec!r} has {n:,} training images; val_images {val:,} and "
            f"train_images {train:,} need {val + (train or 0):,}: give counts that add up to "
            f"at most {n:,}",
            arguments=counts,
        )
    if given_val and val >= n:
        raise DynifyError(
            f"data {spec!r} has {n:,} training images; val_images {val:,} leaves none to "
            f"train on: give val_images below {n:,}",
            arguments=counts,
        )
    if given_val:
        new_val = val
    elif train is None or given_train:
        new_val = max(1, round(n * SCALED_HOLDOUT))
    else:
        new_val = max(1, round(n * val / (val + train)))  # keep the space's proportion
    new_val = min(new_val, n - 1)
    if given_train and train is not None and train > n - new_val:
        raise DynifyError(
            f"data {spec!r} has {n:,} training images; train_images {train:,} and the "
            f"{new_val:,} held out need {train + new_val:,}: give train_images at most "
            f"{n - new_val:,} (or val_images)",
            arguments=counts,
        )
    new_train = train if given_train else (None if train is None else n - new_val)
    asked = f"{val:,} held out" + (f" + {train:,} to train on" if train else "")
    used = f"{new_val:,} held out and {new_train or n - new_val:,} to train on"
    note = (
        f"data {spec!r} has {n:,} training images, fewer than the space {space.label!r} asks "
        f"for ({asked}); using {used} (val_images and train_images choose)"
    )
    return dataclasses.replace(budget, val_images=new_val, train_images=new_train), note


def split_data(full: Any, space: SearchSpace) -> Data:
    """Training images and a held-out set, both taken from the training split of ``full``
    (the test split is never used by the search), fixed by the space's seed; the space's
    budget fits the data (:func:`fit_budget`)."""
    budget = space.training
    n = len(full.train)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(budget.seed)).tolist()
    val = order[: budget.val_images]
    rest = order[budget.val_images :]
    train = rest[: budget.train_images] if budget.train_images else rest
    return Data(
        Subset(full.train, sorted(train)),
        Subset(full.train, sorted(val)),
        full.classes,
        full.source,
        f"{len(val):,} images held out from {full.source}",
    )

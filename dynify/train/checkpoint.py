"""Training checkpoints: everything ``resume`` needs to continue exactly, written atomically.

One file, ``OUTPUT/checkpoint.pth``, replaced at the end of every epoch (temporary name, then
rename: a crash or a NaN never leaves a half-written or bad checkpoint under that name). It
holds the model, optimiser, LR scheduler, temperature scheduler and gradient scaler states,
the number of finished epochs and updates, the metrics so far, and the settings that must
not change on resume (the data order and augmentation are functions of the seed and the
epoch, so they need no state of their own).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynify._io import atomic_torch_save
from dynify.errors import DynifyError
from dynify.models import state_dict_mismatch

__all__ = ["CHECKPOINT_NAME", "FORMAT", "check_fits", "read", "write"]

CHECKPOINT_NAME = "checkpoint.pth"
FORMAT = "dynify.finetune/1"


def write(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write ``state`` (plus the format tag) to ``path`` atomically."""
    atomic_torch_save({"format": FORMAT, **state}, path)


def read(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint written by :func:`write`, with one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise DynifyError(
            f"nothing to resume: {str(p)!r} does not exist (start a new run, or point output "
            f"at the run to continue)",
            arguments=("output",),
        )
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DynifyError(
            f"checkpoint {str(p)!r} could not be read ({type(err).__name__}); expected a "
            f"{CHECKPOINT_NAME} written by dynify finetune"
        ) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise DynifyError(
            f"checkpoint {str(p)!r} is not a dynify training checkpoint (format {found!r}, "
            f"expected {FORMAT!r})"
        )
    return state


def check_fits(state: dict[str, torch.Tensor], model: nn.Module, path: str | os.PathLike) -> None:
    """Raise a one-line error unless ``state`` has exactly ``model``'s keys and shapes."""
    mismatch = state_dict_mismatch(state, model)
    if mismatch is not None:
        raise DynifyError(
            f"checkpoint {str(path)!r} does not fit this model: {mismatch} (another model, "
            f"class count or recipe: resume with the same model and recipe)",
        )

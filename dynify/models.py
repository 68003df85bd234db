"""Building the timm model a command works on, with one-line errors for bad input.

Shared by every command (convert, inspect, finetune, search): an unknown name gets the
closest timm names, a checkpoint that does not fit says which keys are wrong, and the
network is never reached unless ``pretrained=True``.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynify.errors import DynifyError

__all__ = ["create_model", "load_checkpoint_into", "parse_input_size"]


def _close_names(name: str, n: int = 3) -> list[str]:
    import timm

    names = timm.list_models()
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.5)
    if not close:
        close = [m for m in names if name.lower() in m.lower()][:n]
    return close


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint: str | os.PathLike[str] | None = None,
    num_classes: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model`` with errors a user can act on.

    Args:
        name: a timm model name (``timm.list_models()``).
        pretrained: download timm's pretrained weights (needs the network / a hub cache).
        checkpoint: a checkpoint file to load (timm or plain state_dict format).
        num_classes: classifier width; default: the model's own.
    """
    import timm

    if not timm.is_model(name):
        close = _close_names(name)
        hint = f"; closest timm names: {', '.join(close)}" if close else ""
        raise DynifyError(f"unknown model {name!r}{hint} (see timm.list_models())")
    if pretrained and checkpoint is not None:
        raise DynifyError("give either --pretrained or --checkpoint, not both")
    if num_classes is not None:
        if num_classes < 1:
            raise DynifyError(f"num_classes must be >= 1, got {num_classes}")
        kwargs["num_classes"] = num_classes
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        if pretrained:
            raise DynifyError(
                f"could not get pretrained weights for {name!r} ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:160]}); offline, use --checkpoint FILE instead"
            ) from None
        raise
    if checkpoint is not None:
        load_checkpoint_into(model, checkpoint)
    return model


def load_checkpoint_into(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a checkpoint file (timm's ``state_dict`` / ``model`` / ``ema`` layouts, plain
    state dicts, or safetensors) strictly into ``model``."""
    p = Path(path)
    if not p.is_file():
        raise DynifyError(f"checkpoint {str(p)!r}: no such file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DynifyError(
            f"checkpoint {str(p)!r} could not be read ({type(err).__name__}); expected a "
            f"torch state_dict (.pth/.pt) or a .safetensors file"
        ) from None
    if isinstance(state, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise DynifyError(f"checkpoint {str(p)!r} does not hold a state_dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            parts.append(f"{len(wrong)} of the wrong shape (e.g. {wrong[0]})")
        raise DynifyError(
            f"checkpoint {str(p)!r} does not fit {type(model).__name__}: "
            + ", ".join(parts)
            + " (wrong model name, or --num-classes?)"
        )
    model.load_state_dict(state)


def parse_input_size(text: str | Sequence[int] | None) -> tuple[int, int, int] | None:
    """``"3,224,224"`` (or ``"3x224x224"``) -> ``(3, 224, 224)``."""
    if text is None:
        return None
    if isinstance(text, str):
        parts = text.replace("x", ",").split(",")
        try:
            values = tuple(int(p) for p in parts)
        except ValueError:
            values = ()
    else:
        values = tuple(int(v) for v in text)
    if len(values) != 3 or any(v <= 0 for v in values):
        raise DynifyError(f"input size must be C,H,W (three positive integers), got {text!r}")
    return values  # type: ignore[return-value]

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

from dynify.errors import QUOTE_LIMIT, DynifyError, quoted, shorten
from dynify.trace import check_input_size

__all__ = [
    "MAX_COUNT",
    "check_model_name",
    "create_model",
    "hub_reachable",
    "load_checkpoint_into",
    "parse_input_size",
    "state_dict_mismatch",
]

# How long the connectivity check before a pretrained download waits for the hub: a
# reachable hub answers a TCP connect in well under a second; an offline machine would
# otherwise spend about 50 s in huggingface_hub's retries.
HUB_CONNECT_TIMEOUT_S = 2.0

# The largest count (classes, channels, widths) a model is built with: far above any timm
# model (the widest classifier has 21,843 classes), far below what exhausts memory or
# overflows a tensor size (a billion classes of 512 features is 2 TB).
MAX_COUNT = 2**20


def _close_names(name: str, n: int = 3) -> list[str]:
    import timm

    names = timm.list_models()
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.5)
    if not close:
        close = [m for m in names if name.lower() in m.lower()][:n]
    return close


def check_model_name(name: Any, *, where: str | None = None, plain: bool = False) -> str:
    """Return ``name`` if it is a timm model name; else one line with the closest names.

    A name may carry a pretrained tag (``resnet18.a1_in1k``, timm's ``arch.tag``), which
    must be one of the architecture's tags: timm would otherwise fail on it ("Invalid
    pretrained tag"), even to build random weights.

    Args:
        where: what the message names first (e.g. the file the name was read from).
        plain: accept only a plain architecture name, no tag (an artifact's model name: it
            rebuilds an architecture, and a tag only says which weights to download).
    """
    import timm
    from timm.models import split_model_name_tag

    prefix = f"{where}: " if where else ""
    if isinstance(name, str) and timm.is_model(name):
        arch, tag = split_model_name_tag(name)
        if not tag:
            return name
        if plain:
            raise DynifyError(
                f"{prefix}{quoted(name)} is not a plain architecture name; "
                f"expected a timm architecture without a pretrained tag, such as {arch!r}"
            )
        tags = timm.list_models(f"{arch}.*", include_tags=True)
        if name in tags:
            return name
        known = f"its tags: {', '.join(tags)}" if tags else f"{arch} has no pretrained tags"
        raise DynifyError(
            f"{prefix}unknown pretrained tag {quoted(tag)} of model {arch!r} ({known}); "
            f"a tag only chooses which pretrained weights are downloaded: give {arch!r} "
            "alone otherwise"
        )
    shown = quoted(name)
    close = _close_names(name) if isinstance(name, str) and len(name) <= QUOTE_LIMIT else []
    hint = f"; closest timm names: {', '.join(close)}" if close else ""
    raise DynifyError(f"{prefix}unknown model {shown}{hint} (see timm.list_models())")


def _hub_offline_setting() -> str | None:
    """The environment variable that puts huggingface_hub offline, if one is set (it then
    reads its cache only, as ``huggingface_hub.constants`` does)."""
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return variable
    return None


def hub_reachable(timeout: float = HUB_CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the Hugging Face hub (``HF_ENDPOINT``'s host, else
    huggingface.co, port 443) opens within about ``timeout`` seconds, name lookup included.

    Behind a proxy (``HTTPS_PROXY`` / ``ALL_PROXY`` set) a direct connection says nothing,
    so the hub is then taken as reachable and huggingface_hub decides.
    """
    import socket
    import threading
    from urllib.parse import urlsplit

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    result: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    # The name lookup ignores the socket timeout; a daemon thread bounds it too.
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


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
            Offline (``HF_HUB_OFFLINE`` set, or the hub unreachable within
            :data:`HUB_CONNECT_TIMEOUT_S`), this is one line at once rather than a minute
            of retries.
        checkpoint: a checkpoint file to load (timm or plain state_dict format).
        num_classes: classifier width; default: the model's own.
    """
    import timm

    check_model_name(name)
    if pretrained and checkpoint is not None:
        raise DynifyError(
            "give either pretrained or checkpoint, not both", arguments=("pretrained", "checkpoint")
        )
    if num_classes is not None:
        if not 1 <= num_classes <= MAX_COUNT:
            raise DynifyError(
                f"num_classes must be from 1 to {MAX_COUNT:,}, got {num_classes:,}",
                arguments=("num_classes",),
            )
        kwargs["num_classes"] = num_classes
    offline = _hub_offline_setting() if pretrained else None
    if pretrained and offline is None and not hub_reachable():
        raise DynifyError(
            f"cannot get pretrained weights for {name!r}: the Hugging Face hub cannot be "
            f"reached (no network?); pass checkpoint=FILE (weights downloaded elsewhere), "
            f"or set HF_HUB_OFFLINE=1 to use weights already in the hub cache",
            arguments=("checkpoint",),
        )
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as err:
        if not kwargs:
            raise
        # A keyword argument this architecture does not take (timm passes them on).
        raise DynifyError(
            f"model {name!r} does not accept these arguments {sorted(kwargs)} "
            f"({shorten(str(err), 160)})"
        ) from err
    except (OSError, RuntimeError, ValueError) as err:
        if not pretrained:
            raise
        if offline is not None:
            raise DynifyError(
                f"cannot get pretrained weights for {name!r}: {offline} is set (offline) and "
                f"they are not in the hub cache; pass checkpoint=FILE instead",
                arguments=("checkpoint",),
            ) from err
        raise DynifyError(
            f"could not get pretrained weights for {name!r} ({type(err).__name__}: "
            f"{shorten(str(err), 160)}); offline, pass checkpoint=FILE instead",
            arguments=("checkpoint",),
        ) from err
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
        ) from err
    if isinstance(state, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise DynifyError(f"checkpoint {str(p)!r} does not hold a state_dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    mismatch = state_dict_mismatch(state, model)
    if mismatch is not None:
        raise DynifyError(
            f"checkpoint {str(p)!r} does not fit {type(model).__name__}: {mismatch} "
            "(wrong model name, or num_classes?)",
            arguments=("num_classes",),
        )
    model.load_state_dict(state)


def state_dict_mismatch(state: dict[str, Any], model: nn.Module) -> str | None:
    """How ``state`` (a state dict) differs from ``model``'s in keys and shapes, as a
    message's clause (``"2 missing (e.g. fc.bias), 1 of the wrong shape (e.g. fc.weight
    (10, 8) vs (4, 8))"``); ``None`` when it has exactly the model's keys and shapes.
    Values without a shape are compared by key only."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong:
        parts.append(f"{len(wrong)} of the wrong shape (e.g. {wrong[0]})")
    return ", ".join(parts) or None


def parse_input_size(text: str | Sequence[int] | None) -> tuple[int, int, int] | None:
    """``"3,224,224"`` (or ``"3x224x224"``, or a sequence) -> ``(3, 224, 224)``; ``None``
    stays ``None`` (the model's own size). Bounded as every input size is
    (:func:`dynify.trace.check_input_size`)."""
    return None if text is None else check_input_size(text)

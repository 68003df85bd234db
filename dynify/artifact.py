"""The converted-model artifact: one safetensors file that rebuilds the model on its own.

The weights are stored as safetensors; the metadata holds what is needed to rebuild the
module tree: the timm model name and keyword arguments, the resolved plan (which convs are
dynamic and how), and the dynify, timm and torch versions that wrote it. Last step of the
data flow (... -> swap -> fine-tune -> artifact).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynify._io import atomic_path
from dynify._version import __version__
from dynify.convert import apply, model_name_of, plan_of
from dynify.errors import DynifyError
from dynify.plan import Plan

__all__ = ["FORMAT", "ArtifactInfo", "load", "read_info", "save"]

FORMAT = "dynify.artifact/1"


class ArtifactInfo(dict):
    """The artifact's metadata: ``model_name``, ``model_kwargs``, ``plan`` and versions."""

    @property
    def plan(self) -> Plan:
        return Plan.from_dict(self["plan"])


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    model_name: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (converted by :func:`dynify.apply`) to one ``.safetensors`` file.

    Args:
        model: a converted timm model (it must carry its plan).
        path: the file to write; it appears only once complete (temporary name + rename).
        model_name: the timm name (default: the model's ``pretrained_cfg`` architecture).
        model_kwargs: keyword arguments for ``timm.create_model`` (default: the model's
            ``num_classes``, and ``in_chans`` when the image is not RGB).
        extra: more JSON-serialisable metadata to keep beside (e.g. training results).
    """
    import timm
    from safetensors.torch import save_model

    plan = plan_of(model)
    name = model_name or plan.model_name or model_name_of(model)
    if not name:
        raise DynifyError("cannot tell which timm model this is: pass model_name= (the timm name)")
    kwargs = dict(model_kwargs or {})
    if "num_classes" not in kwargs and isinstance(getattr(model, "num_classes", None), int):
        kwargs["num_classes"] = model.num_classes
    in_chans = _input_channels(plan)
    if "in_chans" not in kwargs and in_chans not in (None, 3):
        kwargs["in_chans"] = in_chans
    metadata = {
        "format": FORMAT,
        "model_name": name,
        "model_kwargs": json.dumps(kwargs),
        "plan": json.dumps(plan.to_dict()),
        "dynify_version": __version__,
        "timm_version": timm.__version__,
        "torch_version": torch.__version__,
        "extra": json.dumps(extra or {}),
    }
    target = Path(path)
    with atomic_path(target) as tmp:
        save_model(model, str(tmp), metadata=metadata)
    return target


def _input_channels(plan: Plan) -> int | None:
    """Channels of the image the model reads (the first conv to run): timm's ``in_chans``."""
    first = next((lp.site for lp in plan.layers if lp.site.input_shape is not None), None)
    return None if first is None else first.in_channels


def read_info(path: str | os.PathLike[str]) -> ArtifactInfo:
    """The metadata of an artifact, without loading its weights."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise DynifyError(f"artifact {str(p)!r}: no such file")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:
        raise DynifyError(
            f"{str(p)!r} is not a safetensors file ({type(err).__name__}); expected an "
            f"artifact written by 'dynify convert' or dynify.save"
        ) from None
    if meta.get("format") != FORMAT:
        raise DynifyError(
            f"{str(p)!r} is not a dynify artifact (metadata format {meta.get('format')!r}, "
            f"expected {FORMAT!r})"
        )
    try:
        return ArtifactInfo(
            model_name=meta["model_name"],
            model_kwargs=json.loads(meta["model_kwargs"]),
            plan=json.loads(meta["plan"]),
            dynify_version=meta.get("dynify_version"),
            timm_version=meta.get("timm_version"),
            torch_version=meta.get("torch_version"),
            extra=json.loads(meta.get("extra", "{}")),
        )
    except (KeyError, json.JSONDecodeError) as err:
        raise DynifyError(f"{str(p)!r}: damaged dynify metadata ({err})") from None


def load(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a converted model from an artifact alone (same outputs as when saved)."""
    from safetensors.torch import load_model

    from dynify.models import create_model

    info = read_info(path)
    model = create_model(info["model_name"], **info["model_kwargs"])
    model = apply(model, info.plan, inplace=True, check=False)
    try:
        load_model(model, str(path), strict=True, device=str(device))
    except RuntimeError as err:
        raise DynifyError(
            f"{str(path)!r}: weights do not fit {info['model_name']} as planned "
            f"({str(err).splitlines()[0][:200]})"
        ) from None
    return model.to(device)

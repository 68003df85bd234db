"""The converted-model artifact: one safetensors file that rebuilds the model on its own.

The weights are stored as safetensors; the metadata holds what is needed to rebuild the
module tree: the timm model name and keyword arguments, the resolved plan (which convs are
dynamic and how), the edits made to the tree after the plan (``edits``: BatchNorms fused,
dynamic layers made static; see :mod:`dynify.fuse`), and the dynify, timm and torch
versions that wrote it. Last step of the
data flow (... -> swap -> fine-tune -> artifact).

An artifact is untrusted input: loading one builds the named timm architecture with random
weights and reads the file's own tensors, nothing else. It never runs code, fetches a URL or
reads or writes another file. So the metadata is validated before anything is built: the
model name must be a timm name, the plan is checked field by field like a recipe, and the
keyword arguments for ``timm.create_model`` are limited to :data:`MODEL_KWARGS` (what
changes the architecture's shape, never where weights come from: ``pretrained``,
``pretrained_cfg_overlay``, ``checkpoint_path``, ``cache_dir`` and the rest are refused, by
``save`` too, so that no artifact ``load`` would refuse is ever written).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynify import _memory
from dynify._io import atomic_path, write_error
from dynify._memory import format_gib
from dynify._version import __version__
from dynify.convert import apply, model_name_of
from dynify.errors import DynifyError, did_you_mean, quoted, shorten
from dynify.fuse import ModelEdits, apply_edits, find_edits
from dynify.models import MAX_COUNT, check_model_name
from dynify.plan import Plan, plan_of

__all__ = [
    "FORMAT",
    "MODEL_KWARGS",
    "ArtifactInfo",
    "check_model_kwargs",
    "load",
    "read_info",
    "save",
]

FORMAT = "dynify.artifact/1"

# timm's global pooling types (timm.layers.SelectAdaptivePool2d, and the token / map pools
# of the transformer families).
GLOBAL_POOLS: tuple[str, ...] = (
    "",
    "avg",
    "max",
    "avgmax",
    "catavgmax",
    "fast",
    "fastavg",
    "fastmax",
    "fastavgmax",
    "fastcatavgmax",
    "token",
    "map",
)

# Bounds far above any timm model (resnet200 has 36 blocks in a stage; counts such as
# num_classes up to dynify.models.MAX_COUNT), so that building the architecture's skeleton
# to compare it with the file (see load) never loops for long nor overflows a size.
_MAX_STAGES = 16
_MAX_BLOCKS = 1024

# What each kind of accepted keyword argument must be.
_KIND_TEXT = {
    "count": f"an integer from 1 to {MAX_COUNT:,}",
    "counts": f"a list of 1 to {_MAX_STAGES} integers from 1 to {MAX_COUNT:,}",
    "blocks": f"a list of 1 to {_MAX_STAGES} integers from 1 to {_MAX_BLOCKS}",
    "rate": "a number in [0, 1)",
    "multiplier": "a finite number > 0",
    "pool": f"one of {', '.join(repr(p) for p in GLOBAL_POOLS)}",
    "output_stride": "8, 16 or 32",
}

# The keyword arguments an artifact may pass to timm.create_model, by kind: what dynify's
# commands pass (num_classes, in_chans), what a fine-tuned model was built with (pooling,
# dropout rates: no tensors, but the model should train as saved), and the architecture
# sizes timm's families take (the tests' tiny test_resnet uses channels and stem_width).
# Nothing that names a file, a URL, a cache or a source of weights.
MODEL_KWARGS: dict[str, str] = {
    "num_classes": "count",
    "in_chans": "count",
    "global_pool": "pool",
    "drop_rate": "rate",
    "drop_path_rate": "rate",
    "drop_block_rate": "rate",
    "output_stride": "output_stride",
    "stem_width": "count",
    "channels": "counts",
    "layers": "blocks",
    "depths": "blocks",
    "embed_dim": "count",
    "channel_multiplier": "multiplier",
    "depth_multiplier": "multiplier",
    "width_multiplier": "multiplier",
}


def _valid_kwarg(kind: str, value: Any) -> bool:
    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_COUNT

    number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "count":
        return count(value)
    if kind in ("counts", "blocks"):
        if not (isinstance(value, list) and 1 <= len(value) <= _MAX_STAGES):
            return False
        return all(count(v) and (kind == "counts" or v <= _MAX_BLOCKS) for v in value)
    if kind == "rate":
        return number and math.isfinite(value) and 0 <= value < 1
    if kind == "multiplier":
        return number and math.isfinite(value) and value > 0
    if kind == "pool":
        return isinstance(value, str) and value in GLOBAL_POOLS
    return count(value) and value in (8, 16, 32)  # output_stride


# The safetensors header (the metadata plus the tensor index) of an artifact: a plan takes
# about 750 bytes a conv, so 16 MiB is ample for any timm model and keeps a hostile file
# from making read_info parse a hundred megabytes.
MAX_HEADER_BYTES = 16 * 2**20


class ArtifactInfo(dict):
    """The artifact's metadata: ``model_name``, ``model_kwargs``, ``plan``, ``edits`` and
    versions."""

    @property
    def plan(self) -> Plan:
        return Plan.from_dict(self["plan"])

    @property
    def edits(self) -> ModelEdits:
        """The edits made after the plan (empty for an artifact that has none)."""
        return ModelEdits.from_dict(self.get("edits") or {})


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
        model: a converted timm model (it must carry its plan); the edits it records
            (:func:`dynify.fuse_batchnorm`, ``dynify fold``) are stored beside the plan.
        path: the file to write; it appears only once complete (temporary name + rename).
        model_name: the timm name (default: the model's ``pretrained_cfg`` architecture).
        model_kwargs: keyword arguments for ``timm.create_model`` (default: the model's
            ``num_classes``, and ``in_chans`` when the image is not RGB); only the keys of
            :data:`MODEL_KWARGS`, so that ``load`` never fetches or reads anything else.
        extra: more JSON-serialisable metadata to keep beside (e.g. training results).
    """
    import timm
    from safetensors import SafetensorError
    from safetensors.torch import save_model

    plan = plan_of(model)
    name = model_name or plan.model_name or model_name_of(model)
    if not name:
        raise DynifyError("cannot tell which timm model this is: pass model_name= (the timm name)")
    # Tuples (channels=(8, 16, 24, 32)) are stored as the JSON lists they become.
    kwargs = {
        k: list(v) if isinstance(v, tuple) else v for k, v in dict(model_kwargs or {}).items()
    }
    check_model_kwargs(kwargs, where="model_kwargs")
    check_model_name(name, where="model_name", plain=True)
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
    edits = find_edits(model)
    if edits is not None and not edits.empty:
        metadata["edits"] = json.dumps(edits.to_dict())
    target = Path(path)
    # safetensors writes a temporary of its own beside the file it is given: a private
    # folder keeps it where a later write finds it if this process is killed.
    with atomic_path(target, private_folder=True) as tmp:
        try:
            save_model(model, str(tmp), metadata=metadata)
        except SafetensorError as err:  # its wrapping of an OSError (a full disk)
            raise write_error(target, err) from err
    return target


def _input_channels(plan: Plan) -> int | None:
    """Channels of the image the model reads (the first conv to run): timm's ``in_chans``."""
    first = next((lp.site for lp in plan.layers if lp.site.input_shape is not None), None)
    return None if first is None else first.in_channels


def check_model_kwargs(kwargs: Any, *, where: str) -> dict[str, Any]:
    """Check ``kwargs`` holds only :data:`MODEL_KWARGS`, each of the type it needs.

    Raises:
        DynifyError: one line naming ``where``, the key and what is accepted.
    """
    if not isinstance(kwargs, dict):
        raise DynifyError(
            f"{where}: expected a mapping of timm.create_model arguments, got {_kind(kwargs)}"
        )
    accepted = ", ".join(MODEL_KWARGS)
    for key, value in kwargs.items():
        if key not in MODEL_KWARGS:
            # A hostile key can be megabytes: quoted short (and did_you_mean skips it).
            hint = did_you_mean(str(key), MODEL_KWARGS)
            raise DynifyError(
                f"{where}: {quoted(key)} is not accepted{hint}: an "
                f"artifact only rebuilds an architecture, from the keys {accepted}"
            )
        kind = MODEL_KWARGS[key]
        if not _valid_kwarg(kind, value):
            raise DynifyError(f"{where}: {key} must be {_KIND_TEXT[kind]}, got {quoted(value)}")
    return kwargs


def _kind(value: Any) -> str:
    return type(value).__name__ if not isinstance(value, str) else quoted(value)


def _header_bytes(path: Path) -> int:
    """The length of a safetensors file's JSON header (its first 8 bytes, little-endian)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        return -1
    return int.from_bytes(head, "little")


def _json_field(
    meta: dict[str, str], key: str, where: str, expected: type, default: Any = None
) -> Any:
    """One JSON-encoded metadata field, decoded and of the ``expected`` type."""
    if key not in meta:
        if default is not None:
            return default
        raise DynifyError(f"{where}: damaged dynify metadata: {key!r} is missing")
    try:
        value = json.loads(meta[key])
    except (json.JSONDecodeError, RecursionError) as err:
        reason = err.msg if isinstance(err, json.JSONDecodeError) else "nested too deeply"
        raise DynifyError(
            f"{where}: damaged dynify metadata: {key!r} is not JSON ({reason})"
        ) from err
    if not isinstance(value, expected):
        raise DynifyError(
            f"{where}: damaged dynify metadata: {key!r} must be a JSON "
            f"{'object' if expected is dict else expected.__name__}, got {type(value).__name__}"
        )
    return value


def read_info(path: str | os.PathLike[str]) -> ArtifactInfo:
    """The metadata of an artifact, validated, without loading its weights.

    Raises:
        DynifyError: one line when the file is not an artifact, or its metadata is damaged
            or asks for anything but an architecture (see the module documentation).
    """
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise DynifyError(f"artifact {str(p)!r}: no such file")
    where = repr(str(p))
    try:
        header = _header_bytes(p)
    except OSError as err:
        raise DynifyError(f"artifact {where}: cannot read it ({err.strerror or err})") from err
    if not 0 < header <= p.stat().st_size - 8:  # safetensors would refuse it too
        raise DynifyError(
            f"{where} is not a safetensors file (its header length does not fit the file); "
            f"expected an artifact written by 'dynify convert' or dynify.save"
        )
    if header > MAX_HEADER_BYTES:
        raise DynifyError(
            f"{where}: its safetensors header is {header / 2**20:,.0f} MiB, more than the "
            f"{MAX_HEADER_BYTES // 2**20} MiB a dynify artifact needs; not a dynify artifact"
        )
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:
        raise DynifyError(
            f"{where} is not a safetensors file ({type(err).__name__}); expected an "
            f"artifact written by 'dynify convert' or dynify.save"
        ) from err
    if meta.get("format") != FORMAT:
        raise DynifyError(
            f"{where} is not a dynify artifact (metadata format {meta.get('format')!r}, "
            f"expected {FORMAT!r})"
        )
    for key in ("model_name", "model_kwargs", "plan"):
        if key not in meta:
            raise DynifyError(f"{where}: damaged dynify metadata: {key!r} is missing")
    model_name = check_model_name(meta["model_name"], where=f"{where}: model_name", plain=True)
    kwargs = _json_field(meta, "model_kwargs", where, dict)
    check_model_kwargs(kwargs, where=f"{where}: model_kwargs")
    plan = _json_field(meta, "plan", where, dict)
    Plan.from_dict(plan, source=f"{where}: plan")  # validated here, parsed again on use
    # Older artifacts have no edits: nothing was changed after the plan.
    edits = _json_field(meta, "edits", where, dict) if "edits" in meta else {}
    ModelEdits.from_dict(edits, source=where)  # "'file': edits.fused[2][1]: ..."
    return ArtifactInfo(
        model_name=model_name,
        model_kwargs=kwargs,
        plan=plan,
        edits=edits,
        dynify_version=meta.get("dynify_version"),
        timm_version=meta.get("timm_version"),
        torch_version=meta.get("torch_version"),
        extra=_json_field(meta, "extra", where, dict, default={}),
    )


def _build(
    info: ArtifactInfo, plan: Plan, edits: ModelEdits, where: str, *, meta: bool
) -> nn.Module:
    """The converted model the metadata describe, ``edits`` replayed, with random weights;
    on the meta device (``meta``: no memory), so that it can be compared with the file's
    tensors before anything is allocated.

    Raises:
        DynifyError: one line naming the artifact and the field at fault when the
            architecture cannot be built (the original error is the ``__cause__``).
    """
    import timm

    name, kwargs = info["model_name"], info["model_kwargs"]
    # Never pretrained: the file's own tensors are the weights (read_info refused any other
    # source of weights in model_kwargs).
    place = torch.device("meta") if meta else contextlib.nullcontext()
    try:
        with place:
            model = timm.create_model(name, pretrained=False, **kwargs)
    except (RuntimeError, ValueError, AssertionError, TypeError, IndexError, KeyError) as err:
        raise DynifyError(
            f"{where}: model_kwargs {quoted(kwargs)} do not build a {name} "
            f"({type(err).__name__}: {shorten(str(err), 120) or 'no message'}); not this "
            "file's model (damaged or forged metadata)"
        ) from err
    try:
        with place:
            model = apply(model, plan, inplace=True, check=False)
    except DynifyError as err:  # the plan's own checks name the key ("plan: layers[3]...")
        raise DynifyError(f"{where}: {err}") from err
    except (RuntimeError, ValueError, AssertionError, TypeError) as err:
        raise DynifyError(
            f"{where}: plan: its layers do not build on {name} ({type(err).__name__}: "
            f"{shorten(str(err), 120) or 'no message'}); damaged or forged metadata"
        ) from err
    if edits.empty:
        return model
    try:
        with place:
            return apply_edits(model, edits)
    except DynifyError as err:  # names the key ("edits.fused[2][1]: ...")
        raise DynifyError(f"{where}: {err}") from err
    except (RuntimeError, ValueError, AssertionError, TypeError) as err:
        raise DynifyError(
            f"{where}: edits: they do not apply to {name} as planned ({type(err).__name__}: "
            f"{shorten(str(err), 120) or 'no message'}); damaged or forged metadata"
        ) from err


def _check_tensors(skeleton: nn.Module, info: ArtifactInfo, path: Path, where: str) -> None:
    """Refuse a file whose tensors are not exactly the planned model's (every key, every
    shape, from the safetensors header alone), and a model too big for this machine.

    A forged plan (every layer at 200 experts beside a one-element tensor) or forged
    model_kwargs (a billion classes) would otherwise be allocated in full before
    ``load_model`` finds that the weights do not fit. Tied weights are stored once
    (safetensors drops duplicates), so a key may be absent when one of its aliases is there.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        stored = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    expected = skeleton.state_dict(keep_vars=True)
    aliases: dict[int, list[str]] = {}
    for key, tensor in expected.items():
        aliases.setdefault(id(tensor), []).append(key)
    # Worded as load_model's refusal below, which this check comes before.
    unfit = f"{where}: weights do not fit {info['model_name']} as planned"
    for key, tensor in expected.items():
        if key in stored:
            if stored[key] != tuple(tensor.shape):
                raise DynifyError(
                    f"{unfit}: tensor {quoted(key)} is {list(stored[key])} in the file, "
                    f"{list(tensor.shape)} in the model; damaged or forged metadata"
                )
        elif not any(alias in stored for alias in aliases[id(tensor)]):
            raise DynifyError(
                f"{unfit}: tensor {quoted(key)} ({list(tensor.shape)}) is not in the file; "
                "damaged or forged metadata"
            )
    unexpected = next((key for key in stored if key not in expected), None)
    if unexpected is not None:
        raise DynifyError(
            f"{unfit}: the file's tensor {quoted(unexpected)} is not in the model; damaged "
            "or forged metadata"
        )
    tensors = {id(t): t for t in (*skeleton.parameters(), *skeleton.buffers())}.values()
    need = sum(t.numel() * t.element_size() for t in tensors)
    available = _memory.available_memory(torch.device("cpu"))
    if available is not None and need > available:
        raise DynifyError(
            f"{where}: the model takes {format_gib(need)}; this machine has "
            f"{format_gib(available)} available"
        )


def load(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a converted model from an artifact alone (same outputs as when saved).

    The metadata are validated (:func:`read_info`), the converted model is built on the
    meta device (its recorded edits replayed) and its every tensor compared with the file's
    header, all before any weight is allocated; only then is the model built and the
    weights read. The model carries its plan and its edits, as when saved.
    """
    from safetensors.torch import load_model

    info = read_info(path)
    where = repr(str(path))
    plan, edits = info.plan, info.edits  # parsed once for both builds (read_info validated)
    _check_tensors(_build(info, plan, edits, where, meta=True), info, Path(path), where)
    model = _build(info, plan, edits, where, meta=False)
    try:
        load_model(model, str(path), strict=True, device=str(device))
    except RuntimeError as err:
        raise DynifyError(
            f"{where}: weights do not fit {info['model_name']} as planned "
            f"({shorten(str(err), 300)})"
        ) from err
    return model.to(device)

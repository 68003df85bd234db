"""Exporting a model, converted or not, to ONNX or to a ``torch.export`` program, checked.

:func:`export_onnx` writes one ``.onnx`` file (weights inside) with a dynamic or a fixed
batch dimension; :func:`export_program` writes a ``torch.export`` program (``.pt2``,
:func:`torch.export.save`). Both export a copy of the model (on the CPU, in float32, in eval
mode, its BatchNorms fused into the convs before them by :func:`dynify.fuse_batchnorm`; the
user's model untouched) and, before the file appears under its name, run what was written
(onnxruntime on the CPU; :func:`torch.export.load`) at two batch sizes (one for a fixed
batch) against the eager model as given: the largest error relative to the output's largest
magnitude must be at most :data:`TOLERANCE`, else nothing is left behind (dynify._io).

The eager dynamic layers fold the batch into a grouped convolution (``groups = B *
groups``) under tracing, which an ONNX ``Conv`` cannot take with a dynamic batch: ONNX
export therefore traces under :func:`dynify.layers.portable` (the same function as batched
matrix products). A torch.export program keeps the layers' own formulation, which
torch.export traces with a symbolic batch.

A model that cannot be exported is one line naming the module at fault (found from the node
the ONNX translator failed on, else by exporting its modules alone, from the model down to
the innermost that fails) and why; the exporter's error stays the ``__cause__``.

ONNX needs the optional ``onnx``, ``onnxruntime`` and ``onnxscript``: ``pip install
"dynify[export]"``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import logging
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from dynify._io import atomic_path, ensure_writable
from dynify._limits import Limit
from dynify._modes import evaluating
from dynify.errors import DynifyError, DynifyTypeError, quoted, shorten
from dynify.fuse import FusedPair
from dynify.fuse import fuse_batchnorm as fuse_batchnorm_
from dynify.layers import portable
from dynify.logging import get_logger
from dynify.plan import find_plan
from dynify.trace import check_input_size, default_input_size

__all__ = [
    "BATCH",
    "DYNAMIC",
    "EXTRA_HINT",
    "FORMATS",
    "TOLERANCE",
    "ExportReport",
    "check_opset",
    "export_onnx",
    "export_program",
    "parse_batch",
    "require_onnx",
]

logger = get_logger(__name__)

#: What ``batch=`` takes for a batch dimension the exported graph leaves free.
DYNAMIC = "dynamic"
Batch = int | Literal["dynamic"]

#: The formats, as ``dynify export --format`` names them.
FORMATS: tuple[str, ...] = ("onnx", "torch-export")

#: A fixed batch: the check runs the model at it, eagerly and exported.
BATCH = Limit(low=1, high=1024, integer=True)

#: The largest error allowed, relative to the eager output's largest magnitude.
TOLERANCE = 1e-4

#: The batch sizes a dynamic batch dimension is checked at (and the one it is traced at,
#: which is neither 0 nor 1, sizes that torch.export would specialise).
DYNAMIC_CHECK_BATCHES: tuple[int, ...] = (1, 3)
_DYNAMIC_TRACE_BATCH = 2

# The opsets the dynamo-based exporter writes without converting down (its torchlib is
# opset 18); the highest is what the installed onnx knows.
_MIN_OPSET = 18

EXTRA_HINT = 'pip install "dynify[export]"'

# A dynamic batch dimension's bound, as torch.export records it: far above any batch a
# single process runs at.
BATCH_MAX_DYNAMIC = 2**20

# The largest model one .onnx file holds (protobuf's 2 GiB), with room for the graph.
_MAX_ONNX_BYTES = 2**31 - 2**26


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote and how it checked.

    ``errors``: ``(batch size, relative max error)`` per check run (empty when
    ``check=False``); ``opset``: the ONNX opset written (``None`` for a torch.export
    program); ``fused``: the BatchNorms fused into the convs before them in the exported
    copy (:func:`dynify.fuse_batchnorm`)."""

    path: Path
    format: str
    batch: Batch
    input_size: tuple[int, int, int]
    opset: int | None
    errors: tuple[tuple[int, float], ...]
    fused: tuple[FusedPair, ...] = ()

    @property
    def max_error(self) -> float | None:
        return max((e for _, e in self.errors), default=None)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    batch: Batch = DYNAMIC,
    input_size: Any = None,
    opset: int | None = None,
    check: bool = True,
    fuse_batchnorm: bool = True,
    optimize: bool = True,
) -> ExportReport:
    """Write ``model`` as one ONNX file, checked with onnxruntime against the eager model.

    Args:
        model: an ``nn.Module`` taking one image batch ``(B, C, H, W)`` and returning one
            tensor (a converted model or a static one).
        path: the ``.onnx`` file; it appears only once written and checked.
        batch: ``"dynamic"`` (the graph's batch dimension is free; checked at batch 1 and
            3) or a fixed batch size (checked at it).
        input_size: ``(C, H, W)`` (or ``"3,224,224"``); default: the size the model's plan
            was traced at, else the model's own (timm's ``pretrained_cfg``).
        opset: the ONNX opset to write (default: the exporter's).
        check: run the written graph against the eager model (``False``: export only).
        fuse_batchnorm: fuse each eval-mode BatchNorm into the conv before it
            (:func:`dynify.fuse_batchnorm`, exact) in the exported copy; the check still
            compares with the model as given.
        optimize: run onnxscript's graph optimizer (constant folding, rewrites) on the
            graph; ``False`` exports quicker (the optimizer took about 40% of the export
            of a converted test_resnet), and onnxruntime still optimizes the graph it loads.

    Raises:
        DynifyError: one line for a bad argument, a missing extra, a module that cannot be
            exported (named) or a graph that does not compute what the model does.
    """
    batch, size = _check_arguments(model, path, batch=batch, input_size=input_size)
    require_onnx()
    opset = check_opset(opset)
    target = Path(path)
    parameter_bytes = sum(p.numel() * 4 for p in model.parameters())  # float32, as exported
    if parameter_bytes > _MAX_ONNX_BYTES:
        raise DynifyError(
            f"the model's weights take {parameter_bytes / 2**30:.1f} GiB, more than one ONNX "
            f"file holds (2 GiB); export it with format 'torch-export' instead"
        )
    exportable, fused = _exportable(model, size, fuse=fuse_batchnorm)
    example = _inputs(size, batch if isinstance(batch, int) else _DYNAMIC_TRACE_BATCH)
    with _exporter_quiet(), portable(exportable):
        program = _torch_export(exportable, example, batch, what="ONNX")
        onnx_program = _onnx_program(exportable, program, example, batch, opset, optimize)
    opset_written = onnx_program.model.opset_imports.get("")
    with _exporter_quiet(), atomic_path(target) as tmp:
        onnx_program.save(tmp, external_data=False)
        errors: tuple[tuple[int, float], ...] = ()
        if check:
            run = _onnxruntime_runner(tmp, batch)
            errors = _compare(model, run, size, batch, what="the ONNX graph (onnxruntime)")
    logger.debug("wrote %s (%s)", target, _error_text(errors))
    return ExportReport(target, "onnx", batch, size, opset_written, errors, fused)


def export_program(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    batch: Batch = DYNAMIC,
    input_size: Any = None,
    check: bool = True,
    fuse_batchnorm: bool = True,
) -> ExportReport:
    """Write ``model`` as a ``torch.export`` program (:func:`torch.export.save`, ``.pt2``),
    checked by loading it back (:func:`torch.export.load`) and running it against the eager
    model. Arguments as :func:`export_onnx` (the batch: a ``Dim`` when ``"dynamic"``)."""
    batch, size = _check_arguments(model, path, batch=batch, input_size=input_size)
    target = Path(path)
    exportable, fused = _exportable(model, size, fuse=fuse_batchnorm)
    example = _inputs(size, batch if isinstance(batch, int) else _DYNAMIC_TRACE_BATCH)
    with _exporter_quiet():
        program = _torch_export(exportable, example, batch, what="torch.export")
    with _exporter_quiet(), atomic_path(target) as tmp:
        # Through file objects: torch names a path that does not end in .pt2 a mistake.
        with open(tmp, "wb") as f:
            torch.export.save(program, f)
        errors: tuple[tuple[int, float], ...] = ()
        if check:
            with open(tmp, "rb") as f:
                loaded = torch.export.load(f).module()
            errors = _compare(
                model, lambda x: loaded(x), size, batch, what="the loaded torch.export program"
            )
    logger.debug("wrote %s (%s)", target, _error_text(errors))
    return ExportReport(target, "torch-export", batch, size, None, errors, fused)


# -- arguments ------------------------------------------------------------------------------


def _check_arguments(
    model: Any, path: Any, *, batch: Any, input_size: Any
) -> tuple[Batch, tuple[int, int, int]]:
    if not isinstance(model, nn.Module):
        raise DynifyTypeError(
            f"model must be a torch nn.Module, got {type(model).__name__}", arguments=("model",)
        )
    if not isinstance(path, str | os.PathLike):
        raise DynifyTypeError(
            f"path must be a file path, got {type(path).__name__}", arguments=("path",)
        )
    batch = parse_batch(batch)
    ensure_writable(path, what="path")
    if input_size is not None:
        size = check_input_size(input_size)
    else:
        plan = find_plan(model)
        size = tuple(plan.input_size) if plan is not None else default_input_size(model)
    return batch, size  # type: ignore[return-value]


def parse_batch(value: Any) -> Batch:
    """``"dynamic"``, or a fixed batch size (an int, or its digits as text, ``"8"``)."""
    if isinstance(value, str) and value == DYNAMIC:
        return DYNAMIC
    batch = int(value) if isinstance(value, str) and value.isascii() and value.isdigit() else value
    if not BATCH.accepts(batch):
        raise DynifyError(
            f"batch must be {DYNAMIC!r} or {BATCH}, got {quoted(value)}", arguments=("batch",)
        )
    return batch


def check_opset(opset: Any) -> int | None:
    """``opset`` if the exporter writes it (``None``: its default); needs onnx."""
    if opset is None:
        return None
    import onnx

    limit = Limit(low=_MIN_OPSET, high=onnx.defs.onnx_opset_version(), integer=True)
    limit.check("opset", opset)
    return int(opset)


def require_onnx() -> None:
    """Import what ONNX export needs (the ``export`` extra), or say how to install it."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise DynifyError(
                f"exporting to ONNX needs the packages onnx, onnxscript and onnxruntime "
                f"({name} is not installed): {EXTRA_HINT}"
            ) from err


# -- the model --------------------------------------------------------------------------


def _cpu_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the CPU, in float32 and eval mode (the original untouched)."""
    try:
        copied = copy.deepcopy(model)
    except Exception as err:
        raise DynifyError(
            f"cannot copy the model for export ({type(err).__name__}: {shorten(str(err), 120)})"
        ) from err
    return copied.to(device="cpu", dtype=torch.float32).eval()


def _exportable(
    model: nn.Module, size: tuple[int, int, int], *, fuse: bool
) -> tuple[nn.Module, tuple[FusedPair, ...]]:
    """The copy that is exported, its BatchNorms fused (``fuse``), and the pairs fused."""
    exportable = _cpu_copy(model)
    if not fuse:
        return exportable, ()
    return exportable, tuple(fuse_batchnorm_(exportable, input_size=size))


def _inputs(size: tuple[int, int, int], batch: int, *, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *size), generator=generator)


def _dynamic_shapes(batch: Batch) -> tuple[dict[int, Any], ...] | None:
    if batch != DYNAMIC:  # a fixed batch: every shape static
        return None
    return ({0: torch.export.Dim("batch", min=1, max=BATCH_MAX_DYNAMIC)},)


# -- exporting --------------------------------------------------------------------------


class _ToDebug(logging.Filter):
    """Drops a record, after logging its message to dynify's log at debug level."""

    def filter(self, record: logging.LogRecord) -> bool:
        logger.debug("%s: %s", record.name, record.getMessage())
        return False


@contextlib.contextmanager
def _exporter_quiet() -> Iterator[None]:
    """The exporters' own output off the user's stderr while they run, into dynify's log at
    debug level: torch prints the partial graph it failed on (which the one line raised
    names instead), logs and warns of things the check then measures.

    The filter sits on the loggers, not their handlers: torch replaces its handlers when
    its compiler is first imported (during an export)."""
    import torch._dynamo  # noqa: F401 (its loggers exist from here)

    quiet = _ToDebug()
    loggers = [
        logger_
        for name, logger_ in list(logging.Logger.manager.loggerDict.items())
        if isinstance(logger_, logging.Logger) and name.split(".")[0] in _EXPORTER_LOGGERS
    ]
    for logger_ in loggers:
        logger_.addFilter(quiet)
    printed = io.StringIO()
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(printed):
            warnings.simplefilter("always")
            yield
    finally:
        for logger_ in loggers:
            logger_.removeFilter(quiet)
        for warning in caught:
            logger.debug("exporter warning: %s", warning.message)
        if printed.getvalue().strip():
            logger.debug("the exporter printed: %s", printed.getvalue())


_EXPORTER_LOGGERS = frozenset({"torch", "onnxscript", "onnx_ir", "onnx", "onnxruntime"})


def _torch_export(
    model: nn.Module, example: torch.Tensor, batch: Batch, *, what: str
) -> torch.export.ExportedProgram:
    try:
        return torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes(batch))
    except Exception as err:
        raise _export_failure(model, example, batch, err, what, _torch_export_one) from err


def _torch_export_one(module: nn.Module, x: torch.Tensor, batch: Batch) -> None:
    torch.export.export(module, (x,), dynamic_shapes=_dynamic_shapes(batch))


def _onnx_program(
    model: nn.Module,
    program: torch.export.ExportedProgram,
    example: torch.Tensor,
    batch: Batch,
    opset: int | None,
    optimize: bool,
) -> Any:
    try:
        return torch.onnx.export(
            program,
            (example,),
            dynamo=True,
            opset_version=opset,
            optimize=optimize,
            verbose=False,
        )
    except Exception as err:
        raise _export_failure(
            model, example, batch, err, "ONNX", _onnx_export_one, program=program
        ) from err


def _onnx_export_one(module: nn.Module, x: torch.Tensor, batch: Batch) -> None:
    torch.onnx.export(
        module, (x,), dynamo=True, dynamic_shapes=_dynamic_shapes(batch), verbose=False
    )


# -- when it fails ------------------------------------------------------------------------

_FAILED_NODE = re.compile(r"translating node %(\w+)")


def _export_failure(
    model: nn.Module,
    example: torch.Tensor,
    batch: Batch,
    err: BaseException,
    what: str,
    export_one: Callable[[nn.Module, torch.Tensor, Batch], None],
    *,
    program: torch.export.ExportedProgram | None = None,
) -> DynifyError:
    """The one line for a failed export: the module at fault and why."""
    found = _module_of_failed_node(model, program, err)
    if found is None:
        found = _failing_module(model, example, batch, export_one)
    if found is not None:
        name, module, cause = found
        return DynifyError(
            f"cannot export module {name!r} ({type(module).__name__}) to {what}: {_reason(cause)}"
        )
    return DynifyError(
        f"cannot export the model ({type(model).__name__}) to {what}: {_reason(err)}"
    )


def _module_of_failed_node(
    model: nn.Module, program: torch.export.ExportedProgram | None, err: BaseException
) -> tuple[str, nn.Module, BaseException] | None:
    """The innermost module whose code made the node the ONNX translator failed on."""
    match = _FAILED_NODE.search(" ".join(str(e) for e in _chain(err)))
    if program is None or match is None:
        return None
    node = next((n for n in program.graph.nodes if n.name == match[1]), None)
    stack = node.meta.get("nn_module_stack") if node is not None else None
    if not stack:
        return None
    name = list(stack.values())[-1][0]
    if not name:  # the model's own forward: no module narrower than the model
        return None
    try:
        return name, model.get_submodule(name), err
    except AttributeError:
        return None


def _failing_module(
    model: nn.Module,
    example: torch.Tensor,
    batch: Batch,
    export_one: Callable[[nn.Module, torch.Tensor, Batch], None],
) -> tuple[str, nn.Module, BaseException] | None:
    """The innermost module that does not export on its own: from the model down, the first
    child (in the order they run) that fails, until none of a failing module's children
    fails. Only modules called with one tensor can be tried alone."""
    inputs: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
                inputs.setdefault(name, args[0].detach())

        return hook

    hooks = [
        module.register_forward_pre_hook(keep(name), with_kwargs=True)
        for name, module in model.named_modules()
        if name
    ]
    try:
        with torch.no_grad():
            model(example)
    except Exception:  # the eager model fails too: nothing to narrow down
        return None
    finally:
        for hook in hooks:
            hook.remove()
    found: tuple[str, nn.Module, BaseException] | None = None
    parent, attempts = "", 0
    while attempts < _MAX_ATTEMPTS:
        prefix = f"{parent}." if parent else ""
        children = [n for n in inputs if n.startswith(prefix) and "." not in n[len(prefix) :]]
        for name in children:
            attempts += 1
            module = model.get_submodule(name)
            try:
                export_one(module, inputs[name], batch)
            except Exception as err:
                found, parent = (name, module, err), name
                break
        else:
            break
    return found


# Modules exported alone, at most, to find the one at fault.
_MAX_ATTEMPTS = 200


def _chain(err: BaseException) -> list[BaseException]:
    chain = [err]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 32:
        chain.append(nxt)
    return chain


def _reason(err: BaseException) -> str:
    """Why, in words: the innermost error's type and first line."""
    inner = _chain(err)[-1]
    if type(inner).__name__ == "GuardOnDataDependentSymNode":
        return "its Python code branches on a tensor's values, which a graph cannot record"
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return shorten(f"{type(inner).__name__}: {first}" if first else type(inner).__name__, 240)


# -- checking ---------------------------------------------------------------------------


def _check_batches(batch: Batch) -> tuple[int, ...]:
    return DYNAMIC_CHECK_BATCHES if batch == DYNAMIC else (int(batch),)


def _onnxruntime_runner(path: Path, batch: Batch) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings are not the user's
    try:
        session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
    except Exception as err:
        raise DynifyError(
            f"onnxruntime {onnxruntime.__version__} cannot load the exported graph "
            f"({shorten(str(err), 200)})"
        ) from err
    (graph_input,) = session.get_inputs()
    if batch == DYNAMIC and isinstance(graph_input.shape[0], int):
        raise DynifyError(
            f"the exported ONNX graph fixed the batch at {graph_input.shape[0]} although a "
            f"dynamic batch was asked for"
        )

    def run(x: torch.Tensor) -> torch.Tensor:
        (y, *_) = session.run(None, {graph_input.name: x.numpy()})
        return torch.from_numpy(y)

    return run


def _compare(
    model: nn.Module,
    run: Callable[[torch.Tensor], torch.Tensor],
    size: tuple[int, int, int],
    batch: Batch,
    *,
    what: str,
) -> tuple[tuple[int, float], ...]:
    """Run ``what`` and the eager model (in eval mode for the moment) at each check batch
    size; refuse an error above :data:`TOLERANCE`. The reference is the model itself when
    it is on the CPU in float32, else such a copy of it."""
    on_cpu = all(
        t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point())
        for t in [*model.parameters(), *model.buffers()]
    )
    reference = model if on_cpu else _cpu_copy(model)
    errors = []
    for i, b in enumerate(_check_batches(batch)):
        x = _inputs(size, b, seed=1 + i)
        with torch.no_grad(), evaluating(reference):
            expected = reference(x)
        if not isinstance(expected, torch.Tensor):
            raise DynifyError(
                f"the model returns {type(expected).__name__}, not one tensor; export takes "
                f"models with one tensor output"
            )
        try:
            with torch.no_grad():
                got = run(x)
        except Exception as err:
            raise DynifyError(f"{what} failed at batch {b} ({shorten(str(err), 200)})") from err
        if tuple(got.shape) != tuple(expected.shape):
            raise DynifyError(
                f"{what} gave an output of shape {tuple(got.shape)} at batch {b}, the eager "
                f"model {tuple(expected.shape)}"
            )
        scale = float(expected.abs().max())
        diff = float((got.to(expected.dtype) - expected).abs().max())
        error = diff / scale if scale > 0 else diff
        if not math.isfinite(error) or error > TOLERANCE:
            raise DynifyError(
                f"{what} does not compute what the model does: at batch {b} the max error "
                f"relative to the output's largest magnitude is {error:.2e}, above the "
                f"tolerance {TOLERANCE:g}; nothing was written"
            )
        errors.append((b, error))
    return tuple(errors)


def _error_text(errors: tuple[tuple[int, float], ...]) -> str:
    if not errors:
        return "not checked"
    return ", ".join(f"batch {b}: max relative error {e:.1e}" for b, e in errors)

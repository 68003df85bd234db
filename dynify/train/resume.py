"""A run's state across processes' lives: what a checkpoint holds, whether a run may continue
one (the same settings, plan and model; :data:`~dynify.train.settings.SAME` fields), and
putting its states back. The file format itself is :mod:`dynify.train.checkpoint`."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from torch import nn

from dynify._io import atomic_write_text
from dynify.errors import DynifyError
from dynify.plan import find_plan
from dynify.train import checkpoint
from dynify.train._messages import listable
from dynify.train.settings import SAME, FinetuneSettings

__all__ = ["METRICS_NAME", "check_resumable", "plan_dict", "restore", "save"]

METRICS_NAME = "metrics.json"


def plan_dict(model: nn.Module) -> dict[str, Any] | None:
    """The model's conversion plan as saved in checkpoints; ``None`` for a static model."""
    plan = find_plan(model)
    return None if plan is None else plan.to_dict()


def _layer_settings(plan: dict[str, Any] | None) -> list[Any] | None:
    """What makes two plans the same run: each conv's resolved settings (not, say, the
    equivalence error measured when it was applied)."""
    if plan is None:
        return None
    return [(layer["site"].get("name"), layer["settings"]) for layer in plan["layers"]]


def _spell(name: str, value: Any) -> str:
    """A recorded setting as a message says it: ``batch_size=16``, ``no val_images``."""
    if value is None:
        return f"no {name}"
    if isinstance(value, list):
        value = tuple(value)
    return f"{name}={value!r}"


def check_resumable(
    path: Path, settings: FinetuneSettings, *, distill: bool, model: nn.Module
) -> dict[str, Any]:
    """The checkpoint at ``path``, refused (one line naming the setting, with the saved and
    the asked value) when this run would not continue it: another value of a setting kept on
    resume, a teacher given or dropped, fewer epochs than it finished, another plan.

    ``settings`` are the run's resolved ones (:meth:`FinetuneSettings.resolve`)."""
    state = checkpoint.read(path)
    saved = state.get("settings", {})
    now = settings.record(distill=distill)
    if "distill" in saved and bool(saved["distill"]) != distill:
        was, asks = ("", "no ") if saved["distill"] else ("no ", "")
        raise DynifyError(
            f"checkpoint {str(path)!r} was written with {was}teacher, this run asks for "
            f"{asks}teacher; resume with the same settings, or give another output",
            arguments=listable(("teacher", "output"), path),
        )
    for f in fields(FinetuneSettings):
        name = f.name
        if f.metadata["resume"] != SAME or name not in saved or saved[name] == now[name]:
            continue
        if name.startswith("distill_") and not distill:
            continue  # without a teacher they do nothing
        was, asks = _spell(name, saved[name]), _spell(name, now[name])
        # A switch is named as it is: the command line's flag for it may say its opposite.
        names = () if isinstance(now[name], bool) else (name,)
        raise DynifyError(
            f"checkpoint {str(path)!r} was written with {was}, this run asks {asks}; resume "
            f"with the same settings (only epochs may grow), or give another output",
            arguments=listable((*names, "epochs", "output"), path, saved[name], now[name]),
        )
    done = int(state.get("epoch", 0))
    if settings.epochs < done:
        raise DynifyError(
            f"checkpoint {str(path)!r} stops at epoch {done}, this run asks "
            f"epochs={settings.epochs}; give epochs={done} or more to continue it",
            arguments=listable(("epochs",), path),
        )
    saved_plan, plan = state.get("plan"), plan_dict(model)
    if _layer_settings(saved_plan) != _layer_settings(plan):
        was, asks = (saved_plan or {}).get("recipe"), (plan or {}).get("recipe")
        raise DynifyError(
            f"checkpoint {str(path)!r} was written for another conversion plan (recipe "
            f"{was!r}, this run's {asks!r}): resume with the same model and recipe, or give "
            f"another output",
            arguments=listable(("recipe", "output"), path, was, asks),
        )
    return state


def restore(
    state: dict[str, Any],
    path: Path,
    *,
    settings: FinetuneSettings,
    model: nn.Module,
    optimizer: Any,
    lr_scheduler: Any,
    temperature: Any,
    scaler: Any,
) -> tuple[int, int, list[dict[str, Any]]]:
    """Load a checked checkpoint's states into the run's; return (finished epochs, updates,
    history). With more ``epochs`` than the saved run the fresh LR schedule spans the new
    total from where the run stands."""
    saved = state.get("settings", {})
    checkpoint.check_fits(state["model"], model, path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if lr_scheduler is not None and saved.get("epochs") == settings.epochs:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    try:
        temperature.load_state_dict(state["temperature"])
    except ValueError as err:
        raise DynifyError(f"checkpoint {str(path)!r}: {err}") from err
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    updates = int(state["updates"])
    if lr_scheduler is not None:
        lr_scheduler.step_update(num_updates=updates)
    return int(state["epoch"]), updates, list(state["history"])


def save(
    out: Path,
    *,
    record: dict[str, Any],
    data_description: str,
    epochs_done: int,
    updates: int,
    history: list[dict[str, Any]],
    world_size: int,
    model: nn.Module,
    optimizer: Any,
    lr_scheduler: Any,
    temperature: Any,
    scaler: Any,
) -> Path:
    """Write ``out/checkpoint.pth`` (atomically) and ``out/metrics.json``; return the
    checkpoint's path. ``record``: :meth:`FinetuneSettings.record` of the run."""
    ckpt = out / checkpoint.CHECKPOINT_NAME
    checkpoint.write(
        ckpt,
        {
            "epoch": epochs_done,
            "updates": updates,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler else None,
            "temperature": temperature.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "history": history,
            "settings": record,
            "world_size": world_size,
            "plan": plan_dict(model),
        },
    )
    summary = {"settings": record, "data": data_description, "history": history}
    atomic_write_text(out / METRICS_NAME, json.dumps(summary, indent=2) + "\n")
    return ckpt

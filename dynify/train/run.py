"""A whole ``dynify finetune`` run as a Python call: :func:`finetune_to_artifact`.

From a timm model name (converted by a recipe, or trained static) or a ``.safetensors``
artifact: build the model (and, with ``teacher=True``, its unconverted copy to distil from),
fit an artifact's classifier to the data, run :func:`~dynify.train.finetune` into a run
folder, and on rank 0 save the trained model there as ``model.safetensors``. The command
line only parses its flags into these arguments and prints the outcome.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynify import artifact, models
from dynify._io import ensure_writable
from dynify.convert import apply
from dynify.errors import DynifyError
from dynify.logging import get_logger
from dynify.plan import find_plan
from dynify.recipe import Recipe, load_recipe
from dynify.train import data as train_data
from dynify.train import loop
from dynify.train._messages import listable
from dynify.train.checkpoint import CHECKPOINT_NAME
from dynify.train.data import Data
from dynify.train.distributed import is_primary_process
from dynify.train.loop import EpochCallback, FinetuneResult
from dynify.train.settings import FinetuneSettings

__all__ = ["ARTIFACT_NAME", "MODEL_OPTIONS", "FinetuneOutcome", "finetune_to_artifact"]

_logger = get_logger(__name__)

ARTIFACT_NAME = "model.safetensors"
# The arguments of finetune_to_artifact that say how the model is built (the command line's
# flags of the same names); everything else is a FinetuneSettings field.
MODEL_OPTIONS: tuple[str, ...] = (
    "recipe",
    "static",
    "pretrained",
    "checkpoint",
    "num_classes",
    "teacher",
)


@dataclass
class FinetuneOutcome:
    """What :func:`finetune_to_artifact` did. ``artifact``: the saved ``model.safetensors``
    (``None`` for a static model, whose weights stay in the checkpoint's ``model`` entry,
    and on every process but rank 0, which alone writes). ``model_name`` /
    ``model_kwargs``: the timm arguments the artifact rebuilds the model with."""

    result: FinetuneResult
    output: Path
    model_name: str
    model_kwargs: dict[str, Any]
    artifact: Path | None = None
    primary: bool = True

    @property
    def checkpoint(self) -> Path:
        return self.output / CHECKPOINT_NAME


def finetune_to_artifact(
    model: str | os.PathLike[str],
    settings: FinetuneSettings,
    *,
    recipe: Recipe | dict[str, Any] | str | os.PathLike[str] | None = None,
    static: bool = False,
    pretrained: bool = False,
    checkpoint: str | os.PathLike[str] | None = None,
    num_classes: int | None = None,
    teacher: bool = False,
    callbacks: Sequence[EpochCallback] = (),
) -> FinetuneOutcome:
    """Build ``model``, fine-tune it as ``settings`` say, and save the artifact.

    Args:
        model: a timm model name, or a ``.safetensors`` artifact of ``dynify convert`` /
            ``dynify.save`` (already converted, holding its weights).
        settings: the run's :class:`~dynify.train.FinetuneSettings`; ``output=None`` means
            ``runs/<model>-<recipe label>`` (``runs/<model>-static`` with ``static``,
            ``runs/<artifact name>`` for an artifact), checked before any work.
        recipe: how a timm model is converted (default: the bundled ``dycnn``).
        static: train a timm model without converting it.
        pretrained, checkpoint: start a timm model from timm's weights, or from this file.
        num_classes: classes of the model (default: the data's, which it must equal); an
            artifact with another count gets a new classifier (timm's ``reset_classifier``).
        teacher: distil from the unconverted model (a timm model only).
        callbacks: as :func:`~dynify.train.finetune`'s.

    Raises:
        DynifyError: bad input, before any work where it can be told.
        TrainingDiverged: the loss became NaN or infinite.
    """
    source = os.fspath(model)
    is_artifact = source.endswith(".safetensors")
    if is_artifact and (recipe or static or pretrained or checkpoint):
        raise DynifyError(
            "recipe, static, pretrained and checkpoint apply to a timm model name; an "
            "artifact is already converted and holds its weights",
            arguments=("recipe", "static", "pretrained", "checkpoint"),
        )
    if is_artifact and teacher:
        raise DynifyError(
            "teacher needs the unconverted model: give the timm model name (with pretrained "
            "or checkpoint) instead of the artifact",
            arguments=("teacher", "pretrained", "checkpoint"),
        )
    if static and teacher:
        raise DynifyError(
            "teacher distils a converted model from the unconverted one; it cannot be "
            "combined with static",
            arguments=("teacher", "static"),
        )
    plan_recipe = None if is_artifact or static else load_recipe(recipe)
    if is_artifact:
        label = Path(source).name.removesuffix(".safetensors")
    else:
        label = f"{source}-{'static' if plan_recipe is None else plan_recipe.label}"
    asked = Path("runs") / label if settings.output is None else settings.output
    output = ensure_writable(asked, what="output", folder=True)  # "" is refused
    # Subsets are finetune's to take (and its checkpoint's to record, so resume compares
    # them); here only the classes are needed.
    data = train_data.load_data(
        settings.data, holdout=settings.holdout, cache_dir=settings.data_cache
    )
    if num_classes is not None and not is_artifact and num_classes != data.num_classes:
        raise DynifyError(
            f"num_classes={num_classes}: the data has {data.num_classes} classes "
            f"({data.source}); give num_classes={data.num_classes} or leave it out",
            arguments=listable(("num_classes",), data.source),
        )
    distil_from = None
    if is_artifact:
        info = artifact.read_info(source)
        net = artifact.load(source)
        name, kwargs = info["model_name"], dict(info["model_kwargs"])
        net, kwargs = _fit_classifier(
            net, name, kwargs, path=source, num_classes=num_classes, data=data, settings=settings
        )
    else:
        name, kwargs = source, {"num_classes": data.num_classes}
        torch.manual_seed(settings.seed)
        net = models.create_model(source, pretrained=pretrained, checkpoint=checkpoint, **kwargs)
        if teacher:
            distil_from = copy.deepcopy(net)
        if plan_recipe is not None:
            size = None if settings.img_size is None else (3, settings.img_size, settings.img_size)
            net = apply(net, plan_recipe, input_size=size, inplace=True, seed=settings.seed)
    result = loop.finetune(
        net,
        replace(settings, data=data, output=output),
        teacher=distil_from,
        callbacks=callbacks,
    )
    outcome = FinetuneOutcome(result, output, name, kwargs, primary=is_primary_process())
    if not outcome.primary:
        return outcome
    trained = result.model.cpu()
    if find_plan(trained) is None:  # a static model: its weights are in the checkpoint
        return outcome
    target = output / ARTIFACT_NAME
    extra = {"finetune": dict(result.history[-1]) if result.history else {}}
    artifact.save(trained, target, model_name=name, model_kwargs=kwargs, extra=extra)
    outcome.artifact = target
    return outcome


def _fit_classifier(
    model: nn.Module,
    name: str,
    kwargs: dict[str, Any],
    *,
    path: str,
    num_classes: int | None,
    data: Data,
    settings: FinetuneSettings,
) -> tuple[nn.Module, dict[str, Any]]:
    """An artifact's model and timm arguments with as many classes as the data: with
    ``num_classes`` its classifier is replaced (timm's ``reset_classifier``), without it a
    mismatch is refused naming ``num_classes``."""
    has = getattr(model, "num_classes", None)
    if num_classes is None:
        if isinstance(has, int) and has != data.num_classes:
            raise DynifyError(
                f"the artifact {path!r} classifies {has} classes, the data has "
                f"{data.num_classes} ({data.source}); give num_classes={data.num_classes} to "
                f"replace its classifier",
                arguments=listable(("num_classes",), path, data.source),
            )
        return model, kwargs
    if num_classes != data.num_classes:
        raise DynifyError(
            f"num_classes={num_classes}: the data has {data.num_classes} classes "
            f"({data.source}); give num_classes={data.num_classes}",
            arguments=listable(("num_classes",), data.source),
        )
    if has == num_classes:
        return model, kwargs
    if not callable(getattr(model, "reset_classifier", None)):
        raise DynifyError(
            f"num_classes: {name} has no reset_classifier to replace its {has}-class classifier",
            arguments=listable(("num_classes",), name),
        )
    model.reset_classifier(num_classes)
    weights = "from the checkpoint" if settings.resume else "untrained"
    if is_primary_process():
        _logger.info(
            f"replaced the artifact's {has}-class classifier by a new {num_classes}-class "
            f"one (reset_classifier; its weights: {weights})"
        )
    return model, {**kwargs, "num_classes": num_classes}

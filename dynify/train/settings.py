"""``FinetuneSettings``: every setting of a fine-tuning run, typed, documented and checked here.

One frozen dataclass holds what :func:`dynify.train.finetune` takes besides the model, its
teacher and the callbacks. Each field carries two pieces of metadata:

- ``resume``: what a resumed run may do with it: :data:`SAME` (must equal the checkpoint's:
  it changes what the run computes), :data:`GROW` (``epochs``: may grow) or :data:`FREE`
  (how the run is carried out: workers, device, output, progress...);
- ``accepts``: the :class:`~dynify._limits.Limit` range of a numeric field, checked on construction.

The field names are the ``dynify finetune`` argparse destinations, so the command line
builds its settings with one generic mapping, and a message naming a field (listed in the
error's ``arguments``) is shown there as the flag.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from dynify._limits import Limit
from dynify.errors import DynifyError, DynifyTypeError, did_you_mean, quoted
from dynify.schedule import TemperatureSchedule
from dynify.train.data import Data

__all__ = [
    "FREE",
    "GROW",
    "SAME",
    "SCHEDULERS",
    "FinetuneSettings",
    "kept_on_resume",
]

# timm learning-rate schedules (create_scheduler_v2 names) that need no validation metric.
SCHEDULERS: tuple[str, ...] = (
    "cosine",
    "tanh",
    "step",
    "multistep",
    "constant",
    "poly",
    "wsd",
    "rsqrt",
    "none",
)
# Optimisers whose default peak learning rate is SGD's 0.1 x batch / 256 (others: 1e-3 x).
SGD_LIKE: tuple[str, ...] = (
    "sgd",
    "nesterov",
    "momentum",
    "sgdp",
    "sgdw",
    "lars",
    "nlars",
    "larc",
    "nlarc",
)

# What a resumed run may do with a setting (field metadata ``resume``).
SAME = "same"  # must equal the checkpoint's
GROW = "grow"  # may grow (``epochs``: the run continues up to the new total)
FREE = "free"  # may change: it does not change what the run computes


def _rules(resume: str, accepts: Limit | None = None) -> dict[str, Any]:
    """A field's metadata: its ``resume`` rule and its ``accepts`` range."""
    return {"resume": resume, "accepts": accepts}


_COUNT = Limit(integer=True, low=1)
_OPTIONAL_COUNT = Limit(integer=True, low=1, optional=True)
_NON_NEGATIVE = Limit(low=0)
_FRACTION = Limit(low=0, high=1, low_open=True)


@dataclass(frozen=True, kw_only=True)
class FinetuneSettings:
    """The settings of one :func:`~dynify.train.finetune` run (all keyword arguments).

    Attributes:
        data: a folder, ``.tar``, ``torch/NAME`` or a :class:`~dynify.train.Data` (see
            :func:`~dynify.train.load_data`).
        epochs: total epochs (a resumed run continues up to this many).
        batch_size: the global batch (over all processes).
        lr: peak learning rate; ``None``: ``0.1 * batch_size / 256`` for SGD-like optimisers,
            ``1e-3 * batch_size / 256`` for others (:attr:`peak_lr`).
        opt, weight_decay, momentum: ``timm.optim.create_optimizer_v2`` arguments.
        sched, warmup_epochs, min_lr: ``timm.scheduler.create_scheduler_v2`` arguments (one of
            :data:`SCHEDULERS`), stepped on every update.
        smoothing: label smoothing of the cross-entropy.
        clip_grad: clip the gradient norm to this value.
        img_size: train and evaluate at ``img_size`` squared (default: the model's
            ``pretrained_cfg`` input size); the whole image is used unless ``crop_pct``.
        crop_pct: evaluation centre-crop fraction (default: the model's, or 1 with img_size).
        augment: timm's training augmentation (random resized crop, flip, colour jitter).
        aug_scale: area range ``(min, max)`` of the random resized crop (timm's default
            ``(0.08, 1)``).
        temperature: one temperature schedule for every dynamic layer, instead of the plan's.
        distill_weight: with a teacher, the share of the KL term against the label loss.
        distill_temperature: with a teacher, softens both distributions.
        seed: seeds the data order, augmentation and global random streams.
        train_images, val_images: train / validate on a fixed subset of this many images.
        holdout: fraction held out for validation when ``data`` has no validation split.
        data_cache: download folder for ``torch/NAME``.
        output: run folder: ``checkpoint.pth`` (replaced atomically every epoch) and
            ``metrics.json``; ``None`` writes nothing.
        resume: ``True`` continues from ``output/checkpoint.pth``, a path from that file; the
            settings whose ``resume`` metadata is :data:`SAME` must match the saved run's.
        device: ``"cpu"``, ``"cuda"``, ...; default CUDA when available. Under torchrun each
            process uses the GPU of its local rank.
        amp: mixed precision (bfloat16, or float16 with loss scaling where bfloat16 is not
            supported); default on for CUDA.
        channels_last: NHWC memory layout; default on for CUDA.
        sync_bn: under torchrun on GPUs, compute batch-norm statistics over the global batch
            (``nn.SyncBatchNorm``) instead of each process's share.
        workers: data-loading processes per training process.
        progress: a progress bar and one line per epoch (rank 0, through the ``dynify``
            logger: ``logging.getLogger("dynify").setLevel(logging.WARNING)`` silences both).
        routing_images: after every epoch, measure the dynamic layers' routing
            (:func:`dynify.routing_report`) on this many validation images and record it in
            the metrics; 0 skips it. Costs about three evaluation passes over them.

    Raises (on construction):
        DynifyError: a value out of range, naming the field (``error.arguments``).
    """

    data: str | os.PathLike[str] | Data = field(metadata=_rules(SAME))
    epochs: int = field(metadata=_rules(GROW, _COUNT))
    batch_size: int = field(default=128, metadata=_rules(SAME, _COUNT))
    lr: float | None = field(
        default=None, metadata=_rules(SAME, Limit(low=0, low_open=True, optional=True))
    )
    opt: str = field(default="sgd", metadata=_rules(SAME))
    weight_decay: float = field(default=1e-4, metadata=_rules(SAME, _NON_NEGATIVE))
    momentum: float = field(default=0.9, metadata=_rules(SAME, Limit(low=0, high=1)))
    sched: str = field(default="cosine", metadata=_rules(SAME))
    warmup_epochs: int = field(default=0, metadata=_rules(SAME, Limit(integer=True, low=0)))
    min_lr: float = field(default=0.0, metadata=_rules(SAME, _NON_NEGATIVE))
    smoothing: float = field(
        default=0.1, metadata=_rules(SAME, Limit(low=0, high=1, high_open=True))
    )
    clip_grad: float | None = field(
        default=None, metadata=_rules(SAME, Limit(low=0, low_open=True, optional=True))
    )
    img_size: int | None = field(default=None, metadata=_rules(SAME, _OPTIONAL_COUNT))
    crop_pct: float | None = field(
        default=None, metadata=_rules(SAME, Limit(low=0, high=1, low_open=True, optional=True))
    )
    augment: bool = field(default=True, metadata=_rules(SAME))
    aug_scale: tuple[float, float] | None = field(default=None, metadata=_rules(SAME))
    temperature: TemperatureSchedule | None = field(default=None, metadata=_rules(SAME))
    distill_weight: float = field(default=0.5, metadata=_rules(SAME, Limit(low=0, high=1)))
    distill_temperature: float = field(
        default=1.0, metadata=_rules(SAME, Limit(low=0, low_open=True))
    )
    seed: int = field(default=0, metadata=_rules(SAME, Limit(integer=True, low=0, high=2**32 - 1)))
    train_images: int | None = field(default=None, metadata=_rules(SAME, _OPTIONAL_COUNT))
    val_images: int | None = field(default=None, metadata=_rules(SAME, _OPTIONAL_COUNT))
    holdout: float = field(
        default=0.1, metadata=_rules(SAME, Limit(low=0, high=1, low_open=True, high_open=True))
    )
    data_cache: str | os.PathLike[str] | None = field(default=None, metadata=_rules(FREE))
    output: str | os.PathLike[str] | None = field(default=None, metadata=_rules(FREE))
    resume: bool | str | os.PathLike[str] = field(default=False, metadata=_rules(FREE))
    device: str | torch.device | None = field(default=None, metadata=_rules(FREE))
    amp: bool | None = field(default=None, metadata=_rules(SAME))
    channels_last: bool | None = field(default=None, metadata=_rules(FREE))
    sync_bn: bool = field(default=False, metadata=_rules(FREE))
    workers: int = field(
        default=2,
        metadata=_rules(FREE, Limit(integer=True, low=0, note="0: load in this process")),
    )
    progress: bool = field(default=True, metadata=_rules(FREE))
    routing_images: int = field(default=256, metadata=_rules(FREE, Limit(integer=True, low=0)))

    def __post_init__(self) -> None:
        if not isinstance(self.data, str | os.PathLike | Data):
            raise DynifyTypeError(
                f"data must be a path, torch/NAME or a dynify.train.Data, got "
                f"{type(self.data).__name__}"
            )
        for f in fields(self):
            if f.metadata["accepts"] is not None:
                f.metadata["accepts"].check(f.name, getattr(self, f.name))
        if self.sched not in SCHEDULERS:
            raise DynifyError(
                f"unknown LR schedule sched={quoted(self.sched)}"
                f"{did_you_mean(self.sched, SCHEDULERS)}; accepted: {', '.join(SCHEDULERS)}",
                arguments=("sched",),
            )
        if not isinstance(self.opt, str) or not self.opt:
            raise DynifyError(
                f"opt must be a timm optimizer name, got {quoted(self.opt)}", arguments=("opt",)
            )
        if self.aug_scale is not None:
            scale = tuple(self.aug_scale)
            if len(scale) != 2 or not all(_FRACTION.accepts(v) for v in scale):
                raise DynifyError(
                    f"aug_scale must be two numbers in (0, 1] (MIN MAX), got "
                    f"{quoted(self.aug_scale)}",
                    arguments=("aug_scale",),
                )
            if scale[0] > scale[1]:
                raise DynifyError(
                    f"aug_scale {scale[0]} {scale[1]}: MIN must be <= MAX", arguments=("aug_scale",)
                )
            object.__setattr__(self, "aug_scale", (float(scale[0]), float(scale[1])))
        if isinstance(self.temperature, dict):
            object.__setattr__(self, "temperature", TemperatureSchedule.from_dict(self.temperature))
        if self.temperature is not None and not isinstance(self.temperature, TemperatureSchedule):
            raise DynifyTypeError(
                f"temperature must be a TemperatureSchedule or None, got "
                f"{type(self.temperature).__name__}"
            )
        if self.resume is True and self.output is None:
            raise DynifyError(
                "resume needs the run folder: give output", arguments=("resume", "output")
            )

    # -- derived values -------------------------------------------------------------------

    @property
    def peak_lr(self) -> float:
        """``lr``, or its default for ``opt`` and ``batch_size``."""
        if self.lr is not None:
            return float(self.lr)
        return (0.1 if self.opt.lower() in SGD_LIKE else 1e-3) * self.batch_size / 256

    @property
    def data_source(self) -> str:
        """What ``data`` names (a :class:`Data`'s source), as the checkpoint records it."""
        return self.data.source if isinstance(self.data, Data) else os.fspath(self.data)

    def resolve(self, device: torch.device) -> FinetuneSettings:
        """These settings with the defaults that depend on the device filled in: ``lr``
        (:attr:`peak_lr`), ``amp`` and ``channels_last`` (on for CUDA)."""
        cuda = device.type == "cuda"
        return replace(
            self,
            lr=self.peak_lr,
            amp=cuda if self.amp is None else bool(self.amp),
            channels_last=cuda if self.channels_last is None else bool(self.channels_last),
        )

    def record(self, *, distill: bool) -> dict[str, Any]:
        """The settings a checkpoint and ``metrics.json`` keep (those a resumed run must
        share, and ``epochs``), as plain data: ``distill`` says whether a teacher was given
        (without one, ``distill_weight`` and ``distill_temperature`` are ``None``)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.metadata["resume"] == FREE:
                continue
            value = getattr(self, f.name)
            if f.name == "data":
                value = self.data_source
            elif f.name == "aug_scale" and value is not None:
                value = list(value)
            elif f.name == "temperature" and value is not None:
                value = value.to_dict()
            elif f.name in ("distill_weight", "distill_temperature") and not distill:
                value = None
            if f.name == "distill_weight":
                out["distill"] = distill
            out[f.name] = value
        return out


def kept_on_resume() -> tuple[str, ...]:
    """The settings a resumed run must share with the checkpoint (``resume`` metadata
    :data:`SAME`), in field order."""
    return tuple(f.name for f in fields(FinetuneSettings) if f.metadata["resume"] == SAME)

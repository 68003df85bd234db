"""``dynify.train.finetune``: the training loop the command line, the search and users run.

Built from what timm and torch provide: timm's datasets and transforms (see
:mod:`dynify.train.data`), its optimisers and schedules (:mod:`dynify.train.optim`), its
classification and logit-distillation tasks (label smoothing, KD from a teacher), torch
autocast, ``GradScaler`` and DistributedDataParallel; plus dynify's
:class:`~dynify.TemperatureScheduler`. This module sets a run up from its
:class:`~dynify.train.FinetuneSettings` and runs the epochs; evaluation, resume state,
progress and the settings themselves live in their own modules. Resume is exact (bitwise on
the CPU): the checkpoint holds every state, and the data order, augmentation and global
random streams are re-derived from (seed, epoch) at the start of every epoch.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from timm.task import ClassificationTask, LogitDistillationTask
from timm.utils import distribute_bn
from torch import nn

from dynify._io import ensure_writable
from dynify.errors import DynifyError, DynifyTypeError, TrainingDiverged
from dynify.logging import get_logger
from dynify.train import checkpoint, resume
from dynify.train.data import Loaders, derive_seed, load_data, make_loaders
from dynify.train.distributed import Processes, start_processes
from dynify.train.evaluation import RoutingProbe, evaluate, evaluate_loader
from dynify.train.optim import make_lr_scheduler, make_optimizer
from dynify.train.precision import amp_dtype, memory_format, seed_everything, to_channels_last
from dynify.train.progress import epoch_bar, epoch_line, format_temperature, shows_progress
from dynify.train.settings import SCHEDULERS, FinetuneSettings, kept_on_resume
from dynify.train.temperature import TemperatureScheduler

__all__ = [
    "SCHEDULERS",
    "EpochCallback",
    "FinetuneResult",
    "StopTraining",
    "TrainingDiverged",
    "evaluate",
    "finetune",
]

_logger = get_logger(__name__)

EpochCallback = Callable[[int, dict[str, Any]], None]


class StopTraining(Exception):
    """Raise from a callback to end training after this epoch; ``finetune`` returns normally
    with ``result.stopped`` set to the message."""


@dataclass
class FinetuneResult:
    """What a run produced. ``history`` has one metrics dict per finished epoch (also in
    ``OUTPUT/metrics.json``): epoch, lr, temperature, train_loss, train_top1, val_loss,
    val_top1, val_top5 (percent), images_per_s (training, all processes), seconds.
    ``settings``: the run's, with the device's defaults filled in
    (:meth:`FinetuneSettings.resolve`)."""

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: str | None = None
    checkpoint: Path | None = None
    images_per_s: float | None = None
    settings: FinetuneSettings | None = None

    @property
    def epochs(self) -> int:
        return len(self.history)

    @property
    def top1(self) -> float | None:
        return self.history[-1]["val_top1"] if self.history else None

    @property
    def top5(self) -> float | None:
        return self.history[-1]["val_top5"] if self.history else None

    @property
    def best_top1(self) -> float | None:
        return max((h["val_top1"] for h in self.history), default=None)


def finetune(
    model: nn.Module,
    settings: FinetuneSettings | None = None,
    *,
    teacher: nn.Module | None = None,
    callbacks: Sequence[EpochCallback] = (),
    **changes: Any,
) -> FinetuneResult:
    """Train ``model`` as ``settings`` say; return the trained model and metrics.

    ``finetune(model, FinetuneSettings(data=..., epochs=...))``, or the settings as keywords:
    ``finetune(model=model, data=..., epochs=...)`` builds them (keywords given with a
    settings object replace its fields).

    Under ``torchrun`` each process runs this same call: the model is wrapped in
    DistributedDataParallel, every process takes ``batch_size / world_size`` images of each
    global batch, and only rank 0 writes files and logs. Global random streams are seeded
    from ``seed`` at every epoch.

    Args:
        model: a timm model, converted (``dynify.apply`` / ``dynify.load``) or static; its
            classifier must have as many classes as the data. Trained in place.
        settings: see :class:`~dynify.train.FinetuneSettings` (data, epochs, optimiser,
            schedule, sizes, output, resume, device...).
        teacher: distil from this model's logits (e.g. the unconverted model, which the
            converted one starts out equal to); ``settings.distill_weight`` weighs the KL
            term against the label loss, ``settings.distill_temperature`` softens both.
        callbacks: ``callback(epoch, metrics)`` after every epoch (``epoch`` counts finished
            epochs from 1, on every process, after the checkpoint is written): raise
            :class:`StopTraining` to end the run normally; any other exception (e.g.
            ``optuna.TrialPruned``) propagates.

    Raises:
        TrainingDiverged: the loss became NaN or infinite (the checkpoint of the last
            finished epoch is left intact).
        DynifyError: bad data, settings, or a checkpoint that does not fit.
    """
    if settings is None:
        settings = FinetuneSettings(**changes)
    elif not isinstance(settings, FinetuneSettings):
        raise DynifyTypeError(
            f"settings must be a dynify.train.FinetuneSettings, got {type(settings).__name__}"
        )
    elif changes:
        settings = replace(settings, **changes)
    if settings.output is not None:
        ensure_writable(settings.output, what="output", folder=True)  # before any work
    procs = start_processes(settings.device)
    try:
        return _Run(procs, model, settings, teacher=teacher).train(callbacks)
    finally:
        procs.close()


class _Run:
    """One training run's state: :meth:`_setup` builds it, :meth:`train` is the loop."""

    def __init__(
        self,
        procs: Processes,
        model: nn.Module,
        settings: FinetuneSettings,
        *,
        teacher: nn.Module | None,
    ) -> None:
        self.procs = procs
        self.model = model
        self.teacher = teacher
        self.device = procs.device
        self.settings = settings.resolve(self.device)
        self.record = self.settings.record(distill=teacher is not None)
        self.amp_dtype = amp_dtype(self.device)
        self.show = shows_progress(self.settings.progress, primary=procs.is_primary)

    # -- setup --------------------------------------------------------------------------

    def _setup(self) -> None:
        s, procs = self.settings, self.procs
        self.data = load_data(
            s.data,
            holdout=s.holdout,
            train_images=s.train_images,
            val_images=s.val_images,
            cache_dir=s.data_cache,
        )
        num_classes = getattr(self.model, "num_classes", None)
        if isinstance(num_classes, int) and num_classes != self.data.num_classes:
            raise DynifyError(
                f"the model classifies {num_classes} classes, the data has "
                f"{self.data.num_classes} ({self.data.source}); create the model with "
                f"num_classes={self.data.num_classes}"
            )
        if s.batch_size % procs.world_size:
            raise DynifyError(
                f"batch_size {s.batch_size} does not split evenly over {procs.world_size} "
                f"processes; use a multiple of {procs.world_size}",
                arguments=("batch_size",),
            )
        self.loaders: Loaders = make_loaders(
            self.data,
            model=self.model,
            batch_size=s.batch_size // procs.world_size,
            img_size=s.img_size,
            crop_pct=s.crop_pct,
            augment=s.augment,
            aug_scale=s.aug_scale,
            seed=s.seed,
            workers=s.workers,
            rank=procs.rank,
            world_size=procs.world_size,
            pin_memory=self.device.type == "cuda",
        )
        self.steps = len(self.loaders.train)
        if s.sync_bn and procs.distributed:
            if self.device.type != "cuda":
                raise DynifyError(
                    "sync_bn needs GPUs: torch's SyncBatchNorm has no CPU path",
                    arguments=("sync_bn",),
                )
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.model.to(self.device)
        if s.channels_last:
            to_channels_last(self.model)
        self.optimizer = make_optimizer(self.model, s)
        self.lr_scheduler = make_lr_scheduler(self.optimizer, s, steps_per_epoch=self.steps)
        self.temperature = TemperatureScheduler(
            self.model, steps_per_epoch=self.steps, schedule=s.temperature
        )
        use_scaler = s.amp and self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.task = self._make_task()
        self.routing = RoutingProbe(
            self.data,
            images=s.routing_images,
            cfg=self.loaders.data_config,
            batch_size=s.batch_size,
            workers=s.workers,
            device=self.device,
            channels_last=bool(s.channels_last),
        )

    def _make_task(self) -> nn.Module:
        s = self.settings
        criterion_kwargs = {"smoothing": s.smoothing}
        if self.teacher is not None:
            self.teacher.to(self.device).eval()
            if s.channels_last:
                to_channels_last(self.teacher)
            self.teacher.requires_grad_(False)
            task: nn.Module = LogitDistillationTask(
                student_model=self.model,
                teacher_model=self.teacher,
                criterion_kwargs=criterion_kwargs,
                task_loss_weight=1.0 - s.distill_weight,
                temperature=s.distill_temperature,
                device=self.device,
                verbose=False,
            )
        else:
            task = ClassificationTask(
                self.model, criterion_kwargs=criterion_kwargs, device=self.device, verbose=False
            )
        if self.procs.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            task.prepare_distributed(device_ids=ids)
        return task

    # -- the loop -----------------------------------------------------------------------

    def train(self, callbacks: Sequence[EpochCallback]) -> FinetuneResult:
        s = self.settings
        out = Path(s.output) if s.output is not None else None
        ckpt = out / checkpoint.CHECKPOINT_NAME if out is not None else None
        if not s.resume and ckpt is not None and ckpt.exists():
            raise DynifyError(
                f"output {str(out)!r} already holds a run ({checkpoint.CHECKPOINT_NAME}); "
                f"continue it with resume, or choose another output, so that it is not "
                f"overwritten",
                arguments=("output", "resume"),
            )
        path = (ckpt if s.resume is True else Path(s.resume)) if s.resume else None  # type: ignore[arg-type]
        # The checkpoint is read and its settings compared before any work.
        state = None
        if path is not None:
            state = resume.check_resumable(
                path, s, distill=self.teacher is not None, model=self.model
            )
        self._setup()
        start, updates, history = 0, 0, []
        self.last_good: Path | None = None
        self.last_good_epoch = 0
        if state is not None:
            assert path is not None
            start, updates, history = resume.restore(
                state,
                path,
                settings=s,
                model=self.model,
                optimizer=self.optimizer,
                lr_scheduler=self.lr_scheduler,
                temperature=self.temperature,
                scaler=self.scaler,
            )
            self.last_good, self.last_good_epoch = path, start
        if self.show:
            _logger.info(f"data {self.data.describe()}")
            if start:
                _logger.info(f"resumed from {path} at epoch {start}")
        result = FinetuneResult(self.model, history, checkpoint=self.last_good, settings=s)
        seen = elapsed = 0.0
        for epoch in range(start, s.epochs):
            t0 = time.perf_counter()
            train_metrics, updates = self._train_epoch(epoch, updates)
            train_s = time.perf_counter() - t0
            seen += train_metrics.pop("images")
            elapsed += train_s
            if self.procs.distributed:
                distribute_bn(self.model, self.procs.world_size, reduce=True)
            metrics = {
                "epoch": epoch + 1,
                "lr": self.optimizer.param_groups[0]["lr"],
                "temperature": self.temperature.temperature,
                **train_metrics,
                **self._evaluate(),
                **self.routing.measure(self.model),
                "seconds": time.perf_counter() - t0,
            }
            history.append(metrics)
            if self.procs.is_primary and out is not None:
                self._save(out, epoch + 1, updates, history)
            if ckpt is not None:
                self.last_good = result.checkpoint = ckpt
                self.last_good_epoch = epoch + 1
            result.images_per_s = seen / elapsed if elapsed else None
            if self.show:
                _logger.info(epoch_line(metrics, s.epochs))
            try:
                for callback in callbacks:
                    callback(epoch + 1, dict(metrics))
            except StopTraining as stop:
                result.stopped = str(stop) or "stopped by a callback"
                break
        self.model.eval()
        return result

    def _train_epoch(self, epoch: int, updates: int) -> tuple[dict[str, Any], int]:
        s = self.settings
        seed_everything(derive_seed(s.seed, epoch, self.procs.rank))
        self.loaders.set_epoch(epoch)
        self.task.train()
        total = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, images
        bar = epoch_bar(steps=self.steps, epoch=epoch, epochs=s.epochs, show=self.show)
        t0 = time.perf_counter()
        layout = memory_format(bool(s.channels_last))
        with bar:
            for step, (x, y) in enumerate(self.loaders.train):
                x = x.to(self.device, non_blocking=True, memory_format=layout)
                y = y.to(self.device, non_blocking=True)
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=bool(s.amp)):
                    out = self.task(x, y)
                loss = out["loss"]
                n = float(y.shape[0])
                correct = (out["output"].argmax(dim=-1) == y).sum()
                stats = torch.stack([loss.detach().float() * n, correct.float()])
                stats = torch.cat([stats, stats.new_tensor([n])])
                stats = self.procs.all_reduce_sum(stats).cpu().double()
                if not math.isfinite(float(stats[0])):
                    raise self._diverged(float(stats[0]), epoch, step)
                total += stats
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                if s.clip_grad:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.model.parameters(), s.clip_grad)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                updates += 1
                if self.lr_scheduler is not None:
                    self.lr_scheduler.step_update(num_updates=updates)
                self.temperature.step()
                if self.show:
                    rate = float(total[2]) / max(time.perf_counter() - t0, 1e-9)
                    temperature = format_temperature(self.temperature.temperature)
                    bar.set_postfix_str(
                        f"loss {total[0] / total[2]:.3f} acc {100 * total[1] / total[2]:.1f}% "
                        f"T {temperature} {rate:.0f} img/s",
                        refresh=False,
                    )
                    bar.update(1)
        seconds = time.perf_counter() - t0
        images = float(total[2])
        return {
            "train_loss": float(total[0] / total[2]),
            "train_top1": float(100 * total[1] / total[2]),
            "images_per_s": images / seconds if seconds else None,
            "images": images,
        }, updates

    def _evaluate(self) -> dict[str, float]:
        return evaluate_loader(
            self.model,
            self.loaders.val,
            procs=self.procs,
            amp=bool(self.settings.amp),
            channels_last=bool(self.settings.channels_last),
            num_classes=self.data.num_classes,
        )

    def _save(self, out: Path, epochs_done: int, updates: int, history: list) -> None:
        resume.save(
            out,
            record=self.record,
            data_description=self.data.describe(),
            epochs_done=epochs_done,
            updates=updates,
            history=history,
            world_size=self.procs.world_size,
            model=self.model,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            temperature=self.temperature,
            scaler=self.scaler,
        )

    def _diverged(self, value: float, epoch: int, step: int) -> TrainingDiverged:
        what = "NaN" if math.isnan(value) else "infinite"
        lr = self.optimizer.param_groups[0]["lr"]
        where = f"epoch {epoch + 1}, step {step + 1}/{self.steps}"
        if self.last_good is not None:
            kept = (
                f"the last good checkpoint {str(self.last_good)!r} (epoch "
                f"{self.last_good_epoch}) is intact"
            )
        else:
            kept = "no checkpoint was written before it"
        temperature = format_temperature(self.temperature.temperature)
        return TrainingDiverged(
            f"loss became {what} at {where} (lr {lr:.3g}, T {temperature}); training "
            f"stopped, {kept}; try a lower lr or a clip_grad",
            arguments=("lr", "clip_grad"),
        )


def __getattr__(name: str) -> Any:
    """Deprecated names of this module, before its split."""
    if name == "RESUME_KEYS":
        warnings.warn(
            "dynify.train.loop.RESUME_KEYS is deprecated: which settings a resumed run keeps "
            "is FinetuneSettings field metadata; use dynify.train.settings.kept_on_resume()",
            DeprecationWarning,
            stacklevel=2,
        )
        keys = kept_on_resume()
        at = keys.index("distill_weight")  # the teacher's presence was recorded there
        return (*keys[:at], "distill", *keys[at:])
    if name == "METRICS_NAME":
        warnings.warn(
            "dynify.train.loop.METRICS_NAME is deprecated: use dynify.train.resume.METRICS_NAME",
            DeprecationWarning,
            stacklevel=2,
        )
        return resume.METRICS_NAME
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

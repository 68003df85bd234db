"""``dynify.train.finetune``: the training loop the command line, the search and users run.

Built from what timm and torch provide: timm's datasets and transforms (see
:mod:`dynify.train.data`), ``create_optimizer_v2`` / ``create_scheduler_v2``, its
classification and logit-distillation tasks (label smoothing, KD from a teacher),
``timm.utils.accuracy``, torch autocast, ``GradScaler`` and DistributedDataParallel; plus
dynify's :class:`~dynify.TemperatureScheduler`. Resume is exact (bitwise on the CPU): the
checkpoint holds every state, and the data order, augmentation and global random streams
are re-derived from (seed, epoch) at the start of every epoch.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dynify._io import atomic_write_text, ensure_writable
from dynify.errors import DynifyError, shorten
from dynify.plan import find_plan
from dynify.schedule import TemperatureSchedule
from dynify.train import checkpoint
from dynify.train.data import Data, Loaders, derive_seed, load_data, make_loaders
from dynify.train.distributed import Processes, start_processes
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
_SGD_LIKE = ("sgd", "nesterov", "momentum", "sgdp", "sgdw", "lars", "nlars", "larc", "nlarc")
METRICS_NAME = "metrics.json"

# Settings a resumed run must share with the run it continues (``epochs`` may grow).
RESUME_KEYS: tuple[str, ...] = (
    "batch_size",
    "lr",
    "opt",
    "weight_decay",
    "momentum",
    "sched",
    "warmup_epochs",
    "min_lr",
    "smoothing",
    "clip_grad",
    "img_size",
    "crop_pct",
    "augment",
    "aug_scale",
    "temperature",
    "distill",
    "distill_weight",
    "distill_temperature",
    "amp",
    "seed",
    "train_images",
    "val_images",
    "holdout",
    "data",
)

# How ``dynify finetune`` spells each of them, for messages both audiences can act on; the
# rest (momentum, min_lr, temperature) have no flag. Switches: (spelling on, spelling off).
_FLAGS: dict[str, str] = {
    key: "--" + key.replace("_", "-")
    for key in RESUME_KEYS
    if key not in ("momentum", "min_lr", "temperature", "augment", "distill", "amp")
}
_SWITCHES: dict[str, tuple[str, str]] = {
    "augment": ("no --no-aug", "--no-aug"),
    "distill": ("--teacher", "no --teacher"),
    "amp": ("--amp", "--no-amp"),
}

EpochCallback = Callable[[int, dict[str, Any]], None]


class StopTraining(Exception):
    """Raise from a callback to end training after this epoch; ``finetune`` returns normally
    with ``result.stopped`` set to the message."""


class TrainingDiverged(DynifyError):
    """The loss became NaN or infinite; the last checkpoint (previous epoch) is intact."""


@dataclass
class FinetuneResult:
    """What a run produced. ``history`` has one metrics dict per finished epoch (also in
    ``OUTPUT/metrics.json``): epoch, lr, temperature, train_loss, train_top1, val_loss,
    val_top1, val_top5 (percent), images_per_s (training, all processes), seconds."""

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: str | None = None
    checkpoint: Path | None = None
    images_per_s: float | None = None

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
    *,
    model: nn.Module,
    data: str | os.PathLike[str] | Data,
    epochs: int,
    batch_size: int = 128,
    lr: float | None = None,
    opt: str = "sgd",
    weight_decay: float = 1e-4,
    momentum: float = 0.9,
    sched: str = "cosine",
    warmup_epochs: int = 0,
    min_lr: float = 0.0,
    smoothing: float = 0.1,
    clip_grad: float | None = None,
    img_size: int | None = None,
    crop_pct: float | None = None,
    augment: bool = True,
    aug_scale: tuple[float, float] | None = None,
    temperature: TemperatureSchedule | None = None,
    teacher: nn.Module | None = None,
    distill_weight: float = 0.5,
    distill_temperature: float = 1.0,
    output: str | os.PathLike[str] | None = None,
    resume: bool | str | os.PathLike[str] = False,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    channels_last: bool | None = None,
    sync_bn: bool = False,
    seed: int = 0,
    workers: int = 2,
    train_images: int | None = None,
    val_images: int | None = None,
    holdout: float = 0.1,
    data_cache: str | os.PathLike[str] | None = None,
    callbacks: Sequence[EpochCallback] = (),
    progress: bool = True,
    routing_images: int = 256,
) -> FinetuneResult:
    """Train ``model`` on ``data`` for ``epochs`` epochs; return the trained model and metrics.

    Under ``torchrun`` each process runs this same call: the model is wrapped in
    DistributedDataParallel, every process takes ``batch_size / world_size`` images of each
    global batch, and only rank 0 writes files and prints. Global random streams are seeded
    from ``seed`` at every epoch.

    Args:
        model: a timm model, converted (``dynify.apply`` / ``dynify.load``) or static; its
            classifier must have as many classes as ``data``. Trained in place.
        data: a folder, ``.tar``, ``torch/NAME`` or a :class:`~dynify.train.Data` (see
            :func:`~dynify.train.load_data`).
        epochs: total epochs (a resumed run continues up to this many).
        batch_size: the global batch (over all processes).
        lr: peak learning rate; default ``0.1 * batch_size / 256`` for SGD-like optimisers,
            ``1e-3 * batch_size / 256`` for others.
        opt, weight_decay, momentum: ``timm.optim.create_optimizer_v2`` arguments.
        sched, warmup_epochs, min_lr: ``timm.scheduler.create_scheduler_v2`` arguments (one of
            :data:`SCHEDULERS`), stepped on every update.
        smoothing: label smoothing of the cross-entropy.
        clip_grad: clip the gradient norm to this value.
        img_size: train and evaluate at ``img_size`` squared (default: the model's
            ``pretrained_cfg`` input size); the whole image is used unless ``crop_pct``.
        crop_pct: evaluation centre-crop fraction (default: the model's, or 1 with img_size).
        augment: timm's training augmentation (random resized crop, flip, colour jitter).
        aug_scale: area range of the random resized crop (timm's default ``(0.08, 1)``).
        temperature: one temperature schedule for every dynamic layer, instead of the plan's.
        teacher: distil from this model's logits (e.g. the unconverted model, which the
            converted one starts out equal to); ``distill_weight`` weighs the KL term against
            the label loss, ``distill_temperature`` softens both distributions.
        output: run folder: ``checkpoint.pth`` (replaced atomically every epoch) and
            ``metrics.json``; ``None`` writes nothing.
        resume: ``True`` continues from ``output/checkpoint.pth``, a path from that file;
            the settings must match the saved run's, except ``epochs``.
        device: ``"cpu"``, ``"cuda"``, ...; default CUDA when available. Under torchrun each
            process uses the GPU of its local rank.
        amp: mixed precision (bfloat16, or float16 with loss scaling where bfloat16 is not
            supported); default on for CUDA.
        channels_last: NHWC memory layout; default on for CUDA.
        sync_bn: under torchrun on GPUs, compute batch-norm statistics over the global batch
            (``nn.SyncBatchNorm``) instead of each process's share.
        seed: seeds the data order, augmentation and global random streams.
        workers: data-loading processes per training process.
        train_images, val_images: train / validate on a fixed subset of this many images.
        holdout: fraction held out for validation when ``data`` has no validation split.
        data_cache: download folder for ``torch/NAME``.
        callbacks: ``callback(epoch, metrics)`` after every epoch (``epoch`` counts finished
            epochs from 1, on every process, after the checkpoint is written): raise
            :class:`StopTraining` to end the run normally; any other exception (e.g.
            ``optuna.TrialPruned``) propagates.
        progress: show a progress bar and one line per epoch (rank 0).
        routing_images: after every epoch, measure the dynamic layers' routing
            (:func:`dynify.routing_report`) on this many validation images and record it
            in the metrics (``routing``: the model's routing effect, flips, entropy and
            per-layer figures); 0 skips it. Costs about three evaluation passes over them.

    Raises:
        TrainingDiverged: the loss became NaN or infinite (the checkpoint of the last
            finished epoch is left intact).
        DynifyError: bad data, settings, or a checkpoint that does not fit.
    """
    _check_integer(epochs, minimum=1, expected="epochs must be a positive integer")
    if batch_size < 1:
        raise DynifyError(f"batch size must be >= 1, got {batch_size}")
    if sched not in SCHEDULERS:
        raise DynifyError(f"unknown LR schedule {sched!r}; accepted: {', '.join(SCHEDULERS)}")
    if not 0 <= distill_weight <= 1:
        raise DynifyError(f"distill weight must be in [0, 1], got {distill_weight}")
    if resume is True and output is None:
        raise DynifyError("resume needs the run folder: give output= (--output DIR)")
    _check_integer(routing_images, minimum=0, expected="routing images must be an integer >= 0")
    _check_integer(workers, minimum=0, expected=_WORKERS_EXPECTED)
    if lr is None:
        lr = (0.1 if opt.lower() in _SGD_LIKE else 1e-3) * batch_size / 256
    if not (math.isfinite(lr) and lr > 0):
        raise DynifyError(f"lr must be a finite number > 0, got {lr!r}")
    if output is not None:
        ensure_writable(output, what="output", folder=True)  # before any work
    settings: dict[str, Any] = {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "opt": opt,
        "weight_decay": weight_decay,
        "momentum": momentum,
        "sched": sched,
        "warmup_epochs": warmup_epochs,
        "min_lr": min_lr,
        "smoothing": smoothing,
        "clip_grad": clip_grad,
        "img_size": img_size,
        "crop_pct": crop_pct,
        "augment": augment,
        "aug_scale": list(aug_scale) if aug_scale is not None else None,
        "temperature": temperature.to_dict() if temperature is not None else None,
        "distill": teacher is not None,
        "distill_weight": distill_weight if teacher is not None else None,
        "distill_temperature": distill_temperature if teacher is not None else None,
        "seed": seed,
        "train_images": train_images,
        "val_images": val_images,
        "holdout": holdout,
        "data": data.source if isinstance(data, Data) else os.fspath(data),
    }
    procs = start_processes(device)
    try:
        run = _Run(
            procs=procs,
            model=model,
            teacher=teacher,
            settings=settings,
            amp=amp,
            channels_last=channels_last,
            sync_bn=sync_bn,
            workers=workers,
            data_cache=data_cache,
            progress=progress,
            routing_images=routing_images,
        )
        return run.train(data, output=output, resume=resume, callbacks=callbacks)
    finally:
        procs.close()


class _Run:
    """One training run's state; :meth:`train` is the loop."""

    def __init__(
        self,
        *,
        procs: Processes,
        model: nn.Module,
        teacher: nn.Module | None,
        settings: dict[str, Any],
        amp: bool | None,
        channels_last: bool | None,
        sync_bn: bool,
        workers: int,
        data_cache: str | os.PathLike[str] | None,
        progress: bool,
        routing_images: int = 0,
    ) -> None:
        self.procs = procs
        self.model = model
        self.teacher = teacher
        self.settings = settings
        self.device = procs.device
        cuda = self.device.type == "cuda"
        self.settings["amp"] = self.amp = cuda if amp is None else bool(amp)
        self.channels_last = cuda if channels_last is None else bool(channels_last)
        self.amp_dtype = _amp_dtype(self.device)
        self.sync_bn = sync_bn
        self.workers = workers
        self.data_cache = data_cache
        self.show = progress and procs.is_primary
        self.routing_images = routing_images

    # -- setup --------------------------------------------------------------------------

    def _setup(self, data: str | os.PathLike[str] | Data) -> None:
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        s, procs = self.settings, self.procs
        self.data = load_data(
            data,
            holdout=s["holdout"],
            train_images=s["train_images"],
            val_images=s["val_images"],
            cache_dir=self.data_cache,
        )
        num_classes = getattr(self.model, "num_classes", None)
        if isinstance(num_classes, int) and num_classes != self.data.num_classes:
            raise DynifyError(
                f"the model classifies {num_classes} classes, the data has "
                f"{self.data.num_classes} ({self.data.source}); create the model with "
                f"num_classes={self.data.num_classes}"
            )
        if s["batch_size"] % procs.world_size:
            raise DynifyError(
                f"batch size {s['batch_size']} does not split evenly over {procs.world_size} "
                f"processes; use a multiple of {procs.world_size}"
            )
        self.loaders: Loaders = make_loaders(
            self.data,
            model=self.model,
            batch_size=s["batch_size"] // procs.world_size,
            img_size=s["img_size"],
            crop_pct=s["crop_pct"],
            augment=s["augment"],
            aug_scale=tuple(s["aug_scale"]) if s["aug_scale"] else None,
            seed=s["seed"],
            workers=self.workers,
            rank=procs.rank,
            world_size=procs.world_size,
            pin_memory=self.device.type == "cuda",
        )
        self.steps = len(self.loaders.train)

        if self.sync_bn and procs.distributed:
            if self.device.type != "cuda":
                raise DynifyError(
                    "sync_bn (--sync-bn) needs GPUs: torch's SyncBatchNorm has no CPU path"
                )
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.model.to(self.device)
        if self.channels_last:
            _channels_last(self.model)
        try:
            self.optimizer = create_optimizer_v2(
                self.model,
                opt=s["opt"],
                lr=s["lr"],
                weight_decay=s["weight_decay"],
                momentum=s["momentum"],
            )
        except (ValueError, AssertionError) as err:
            raise DynifyError(
                f"optimizer {s['opt']!r}: {shorten(str(err).splitlines()[0], 160)} (see "
                f"timm.optim.list_optimizers())"
            ) from None
        self.lr_scheduler = None
        if s["sched"] != "none":
            self.lr_scheduler, _ = create_scheduler_v2(
                self.optimizer,
                sched=s["sched"],
                num_epochs=s["epochs"],
                warmup_epochs=s["warmup_epochs"],
                min_lr=s["min_lr"],
                step_on_epochs=False,
                updates_per_epoch=self.steps,
            )
        schedule = None
        if s["temperature"] is not None:
            schedule = TemperatureSchedule.from_dict(s["temperature"])
        self.temperature = TemperatureScheduler(
            self.model, steps_per_epoch=self.steps, schedule=schedule
        )
        use_scaler = self.amp and self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.task = self._make_task()

    def _make_task(self) -> nn.Module:
        from timm.task import ClassificationTask, LogitDistillationTask

        criterion_kwargs = {"smoothing": self.settings["smoothing"]}
        if self.teacher is not None:
            self.teacher.to(self.device).eval()
            if self.channels_last:
                _channels_last(self.teacher)
            self.teacher.requires_grad_(False)
            task: nn.Module = LogitDistillationTask(
                student_model=self.model,
                teacher_model=self.teacher,
                criterion_kwargs=criterion_kwargs,
                task_loss_weight=1.0 - self.settings["distill_weight"],
                temperature=self.settings["distill_temperature"],
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

    def _resumable(self, path: Path) -> dict[str, Any]:
        """The checkpoint at ``path``, refused (one line naming the setting, as a flag, with
        the saved and the asked value) when this run would not continue it: other settings,
        fewer epochs than it finished, another conversion plan."""
        state = checkpoint.read(path)
        saved = state.get("settings", {})
        again = "resume with the same settings (only --epochs may grow), or give another --output"
        for key in RESUME_KEYS:
            if key in saved and saved[key] != self.settings.get(key):
                raise DynifyError(
                    f"checkpoint {str(path)!r} was written with {_spell(key, saved[key])}, this "
                    f"run asks {_spell(key, self.settings.get(key))} ({key}); {again}"
                )
        done = int(state.get("epoch", 0))
        if self.settings["epochs"] < done:
            raise DynifyError(
                f"checkpoint {str(path)!r} has finished {done} epochs, this run asks --epochs "
                f"{self.settings['epochs']}; give --epochs {done} or more to continue it"
            )
        saved_plan, plan = state.get("plan"), _plan_dict(self.model)
        if _layer_settings(saved_plan) != _layer_settings(plan):
            raise DynifyError(
                f"checkpoint {str(path)!r} was written for another conversion plan (recipe "
                f"{(saved_plan or {}).get('recipe')!r}, this run's "
                f"{(plan or {}).get('recipe')!r}): resume with the same MODEL "
                f"and --recipe, or give another --output"
            )
        return state

    def _resume(self, state: dict[str, Any], path: Path) -> tuple[int, int, list[dict[str, Any]]]:
        saved = state.get("settings", {})
        checkpoint.check_fits(state["model"], self.model, path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and saved.get("epochs") == self.settings["epochs"]:
            # Otherwise (more epochs) the fresh schedule spans the new total.
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        try:
            self.temperature.load_state_dict(state["temperature"])
        except ValueError as err:
            raise DynifyError(f"checkpoint {str(path)!r}: {err}") from None
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        updates = int(state["updates"])
        if self.lr_scheduler is not None:
            self.lr_scheduler.step_update(num_updates=updates)
        return int(state["epoch"]), updates, list(state["history"])

    # -- the loop -----------------------------------------------------------------------

    def train(
        self,
        data: str | os.PathLike[str] | Data,
        *,
        output: str | os.PathLike[str] | None,
        resume: bool | str | os.PathLike[str],
        callbacks: Sequence[EpochCallback],
    ) -> FinetuneResult:
        out = Path(output) if output is not None else None
        ckpt = out / checkpoint.CHECKPOINT_NAME if out is not None else None
        if not resume and ckpt is not None and ckpt.exists():
            raise DynifyError(
                f"{str(out)!r} already holds a run ({checkpoint.CHECKPOINT_NAME}); resume it "
                f"(--resume) or choose another --output, so that it is not overwritten"
            )
        path = (ckpt if resume is True else Path(resume)) if resume else None  # type: ignore[arg-type]
        # The checkpoint is read and its settings compared before any work.
        state = self._resumable(path) if path is not None else None
        self._setup(data)
        start, updates, history = 0, 0, []
        self.last_good: Path | None = None
        self.last_good_epoch = 0
        if state is not None:
            assert path is not None
            start, updates, history = self._resume(state, path)
            self.last_good, self.last_good_epoch = path, start
        if self.show:
            self._say(f"data {self.data.describe()}")
            if start:
                self._say(f"resumed from {ckpt if resume is True else resume} at epoch {start}")
        result = FinetuneResult(self.model, history, checkpoint=self.last_good)
        seen = elapsed = 0.0
        for epoch in range(start, self.settings["epochs"]):
            t0 = time.perf_counter()
            train_metrics, updates = self._train_epoch(epoch, updates)
            train_s = time.perf_counter() - t0
            seen += train_metrics.pop("images")
            elapsed += train_s
            if self.procs.distributed:
                from timm.utils import distribute_bn

                distribute_bn(self.model, self.procs.world_size, reduce=True)
            metrics = {
                "epoch": epoch + 1,
                "lr": self.optimizer.param_groups[0]["lr"],
                "temperature": self.temperature.temperature,
                **train_metrics,
                **self._evaluate(),
                **self._routing(),
                "seconds": time.perf_counter() - t0,
            }
            history.append(metrics)
            if self.procs.is_primary and out is not None:
                self._write(out, ckpt, epoch + 1, updates, history)  # type: ignore[arg-type]
            if ckpt is not None:
                self.last_good = result.checkpoint = ckpt
                self.last_good_epoch = epoch + 1
            result.images_per_s = seen / elapsed if elapsed else None
            if self.show:
                self._say(_summary(metrics, self.settings["epochs"]))
            try:
                for callback in callbacks:
                    callback(epoch + 1, dict(metrics))
            except StopTraining as stop:
                result.stopped = str(stop) or "stopped by a callback"
                break
        self.model.eval()
        return result

    def _train_epoch(self, epoch: int, updates: int) -> tuple[dict[str, Any], int]:
        from tqdm.auto import tqdm

        seed = self.settings["seed"]
        _seed_everything(derive_seed(seed, epoch, self.procs.rank))
        self.loaders.set_epoch(epoch)
        self.task.train()
        total = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, images
        bar = tqdm(
            total=self.steps,
            desc=f"epoch {epoch + 1}/{self.settings['epochs']}",
            unit="batch",
            leave=False,
            dynamic_ncols=True,
            disable=not self.show,
        )
        t0 = time.perf_counter()
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        with bar:
            for step, (x, y) in enumerate(self.loaders.train):
                x = x.to(self.device, non_blocking=True, memory_format=memory_format)
                y = y.to(self.device, non_blocking=True)
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
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
                if self.settings["clip_grad"]:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.model.parameters(), self.settings["clip_grad"])
                self.scaler.step(self.optimizer)
                self.scaler.update()
                updates += 1
                if self.lr_scheduler is not None:
                    self.lr_scheduler.step_update(num_updates=updates)
                self.temperature.step()
                if self.show:
                    rate = float(total[2]) / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix_str(
                        f"loss {total[0] / total[2]:.3f} acc {100 * total[1] / total[2]:.1f}% "
                        f"T {_fmt_t(self.temperature.temperature)} {rate:.0f} img/s",
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
        return _evaluate(
            self.model,
            self.loaders.val,
            procs=self.procs,
            amp=self.amp,
            amp_dtype=self.amp_dtype,
            channels_last=self.channels_last,
            num_classes=self.data.num_classes,
        )

    def _routing(self) -> dict[str, Any]:
        """The routing diagnostics on the first validation images (every process measures
        the same images, so every process reports the same figures)."""
        from dynify.routing import dynamic_layers, routing_report

        if not self.routing_images or not dynamic_layers(self.model):
            return {}
        report = routing_report(self.model, self._routing_batches(), max_images=self.routing_images)
        return {"routing": report.to_dict()}

    def _routing_batches(self):
        from dynify.train.data import eval_loader, sample_images

        if not hasattr(self, "_routing_loader"):
            # Not the DDP-sharded validation loader: the same images on every process.
            self._routing_loader = eval_loader(
                sample_images(self.data.val, self.routing_images),
                cfg=self.loaders.data_config,
                batch_size=min(self.settings["batch_size"], 256),
                # Read in worker processes like every other loader: a tar read in this
                # process would share its file offset with the workers forked later.
                workers=self.workers,
                rank=0,
                world_size=1,
                pin_memory=False,
            )
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        for x, _ in self._routing_loader:
            yield x.to(self.device, memory_format=memory_format)

    # -- outputs ------------------------------------------------------------------------

    def _write(self, out: Path, ckpt: Path, epochs_done: int, updates: int, history: list) -> None:
        plan = _plan_dict(self.model)
        checkpoint.write(
            ckpt,
            {
                "epoch": epochs_done,
                "updates": updates,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler else None,
                "temperature": self.temperature.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "history": history,
                "settings": self.settings,
                "world_size": self.procs.world_size,
                "plan": plan,
            },
        )
        summary = {"settings": self.settings, "data": self.data.describe(), "history": history}
        atomic_write_text(out / METRICS_NAME, json.dumps(summary, indent=2) + "\n")

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
        return TrainingDiverged(
            f"loss became {what} at {where} (lr {lr:.3g}, T {_fmt_t(self.temperature.temperature)}"
            f"); training stopped, {kept}; try a lower --lr or --clip-grad"
        )

    def _say(self, line: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(line)


def evaluate(
    *,
    model: nn.Module,
    data: str | os.PathLike[str] | Data,
    batch_size: int = 256,
    img_size: int | None = None,
    crop_pct: float | None = None,
    val_images: int | None = None,
    holdout: float = 0.1,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    channels_last: bool | None = None,
    workers: int = 2,
    data_cache: str | os.PathLike[str] | None = None,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy of ``model`` on the
    validation split of ``data`` (the same split, transforms and counting as
    :func:`finetune`'s evaluation given the same ``img_size`` and ``crop_pct``; both default
    to the model's ``pretrained_cfg``, not to what a training run used; under torchrun the
    processes share the images).

    Returns ``{"val_loss", "val_top1", "val_top5", "images"}``.
    """
    from dynify.train.data import data_config, eval_loader

    _check_integer(workers, minimum=0, expected=_WORKERS_EXPECTED)
    data = load_data(data, holdout=holdout, val_images=val_images, cache_dir=data_cache)
    procs = start_processes(device)
    try:
        cuda = procs.device.type == "cuda"
        use_amp = cuda if amp is None else bool(amp)
        nhwc = cuda if channels_last is None else bool(channels_last)
        model.to(procs.device)
        if nhwc:
            _channels_last(model)
        cfg = data_config(model, img_size=img_size, crop_pct=crop_pct)
        loader = eval_loader(
            data.val,
            cfg=cfg,
            batch_size=batch_size,
            workers=workers,
            rank=procs.rank,
            world_size=procs.world_size,
            pin_memory=cuda,
        )
        metrics = _evaluate(
            model,
            loader,
            procs=procs,
            amp=use_amp,
            amp_dtype=_amp_dtype(procs.device),
            channels_last=nhwc,
            num_classes=data.num_classes,
        )
    finally:
        procs.close()
    return {**metrics, "images": float(len(data.val))}


@torch.no_grad()
def _evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    *,
    procs: Processes,
    amp: bool,
    amp_dtype: torch.dtype,
    channels_last: bool,
    num_classes: int,
) -> dict[str, float]:
    from timm.utils import accuracy

    device = procs.device
    model.eval()
    k5 = min(5, num_classes)
    total = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1, top-k correct, images
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    for x, y in loader:
        x = x.to(device, non_blocking=True, memory_format=memory_format)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            logits = model(x)
        n = y.shape[0]
        acc1, acc5 = accuracy(logits.float(), y, topk=(1, k5))
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        total += torch.stack(
            [
                loss.double().cpu(),
                torch.round(acc1.double().cpu() * n / 100),
                torch.round(acc5.double().cpu() * n / 100),
                torch.tensor(float(n), dtype=torch.float64),
            ]
        )
    if procs.distributed:
        total = procs.all_reduce_sum(total.to(device)).cpu()
    images = max(float(total[3]), 1.0)
    return {
        "val_loss": float(total[0]) / images,
        "val_top1": 100 * float(total[1]) / images,
        "val_top5": 100 * float(total[2]) / images,
    }


# Refused here rather than as a DataLoader traceback.
_WORKERS_EXPECTED = "workers must be an integer >= 0 (0: load in this process)"


def _check_integer(value: Any, *, minimum: int, expected: str) -> None:
    """Refuse ``value`` unless it is an int (a bool is not) of at least ``minimum``: one line,
    ``expected`` and what was given."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DynifyError(f"{expected}, got {value!r}")


def _plan_dict(model: nn.Module) -> dict[str, Any] | None:
    """The model's conversion plan as saved in checkpoints; ``None`` for a static model."""
    plan = find_plan(model)
    return None if plan is None else plan.to_dict()


def _layer_settings(plan: dict[str, Any] | None) -> list[Any] | None:
    """What makes two plans the same run: each conv's resolved settings (not, say, the
    equivalence error measured when it was applied)."""
    if plan is None:
        return None
    return [(layer["site"].get("name"), layer["settings"]) for layer in plan["layers"]]


def _spell(key: str, value: Any) -> str:
    """A resume setting as ``dynify finetune`` spells it (``--train-images 16``)."""
    if key in _SWITCHES:
        return _SWITCHES[key][0 if value else 1]
    if key not in _FLAGS:
        return f"{key}={value!r}"
    if value is None:
        return f"no {_FLAGS[key]}"
    if isinstance(value, (list, tuple)):
        return " ".join([_FLAGS[key], *(f"{v:g}" for v in value)])
    return f"{_FLAGS[key]} {value:g}" if isinstance(value, float) else f"{_FLAGS[key]} {value}"


def _amp_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where supported, else float16 (older GPUs; used with loss scaling)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _channels_last(model: nn.Module) -> None:
    """NHWC layout for every 4-D parameter and buffer. ``Module.to(memory_format=...)`` would
    also try to convert the 5-D expert kernels of dynamic layers, and fail."""
    with torch.no_grad():
        for module in model.modules():
            for p in module.parameters(recurse=False):
                if p.dim() == 4:
                    p.data = p.data.contiguous(memory_format=torch.channels_last)
            for name, b in module.named_buffers(recurse=False):
                if b.dim() == 4:
                    setattr(module, name, b.contiguous(memory_format=torch.channels_last))


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (1 << 32))


def _fmt_t(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _summary(m: dict[str, Any], epochs: int) -> str:
    rate = m["images_per_s"]
    routing = m.get("routing")
    tail = ""
    if routing:
        tail = (
            f" | routing effect {100 * routing['effect']:.2f}% ({100 * routing['flips']:.1f}% "
            f"flips) H {routing['entropy']:.3f}"
        )
    return (
        f"epoch {m['epoch']}/{epochs}: train loss {m['train_loss']:.4f} acc "
        f"{m['train_top1']:.2f}% | val loss {m['val_loss']:.4f} top-1 {m['val_top1']:.2f}% "
        f"top-5 {m['val_top5']:.2f}% | T {_fmt_t(m['temperature'])} lr {m['lr']:.3g} | "
        f"{rate or 0:.0f} img/s{tail}"
    )

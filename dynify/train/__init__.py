"""Fine-tuning converted (or static) timm models: :func:`finetune` and its data helpers.

Modules: :mod:`~dynify.train.loop` (the loop), :mod:`~dynify.train.data` (what ``--data``
names, loaders), :mod:`~dynify.train.checkpoint` (resume state),
:mod:`~dynify.train.distributed` (torchrun / DDP).
"""

from dynify.train.checkpoint import CHECKPOINT_NAME
from dynify.train.data import Data, default_cache_dir, load_data
from dynify.train.loop import (
    SCHEDULERS,
    EpochCallback,
    FinetuneResult,
    StopTraining,
    TrainingDiverged,
    evaluate,
    finetune,
)
from dynify.train.temperature import TemperatureScheduler

__all__ = [
    "CHECKPOINT_NAME",
    "SCHEDULERS",
    "Data",
    "EpochCallback",
    "FinetuneResult",
    "StopTraining",
    "TemperatureScheduler",
    "TrainingDiverged",
    "default_cache_dir",
    "evaluate",
    "finetune",
    "load_data",
]

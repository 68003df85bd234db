"""Fine-tuning converted (or static) timm models: :func:`finetune` and its data helpers.

Modules, one job each:

- :mod:`~dynify.train.settings`: :class:`FinetuneSettings`, every setting of a run (types,
  defaults, accepted values, what may change on resume);
- :mod:`~dynify.train.loop`: :func:`finetune`, setting a run up and running its epochs;
- :mod:`~dynify.train.run`: :func:`finetune_to_artifact`, a whole ``dynify finetune`` run
  from a model name or artifact to the saved ``model.safetensors``;
- :mod:`~dynify.train.evaluation`: :func:`evaluate`, validation counts, routing diagnostics;
- :mod:`~dynify.train.optim`: the timm optimiser and LR schedule;
- :mod:`~dynify.train.resume`: what a checkpoint holds, whether a run may continue it;
- :mod:`~dynify.train.checkpoint`: the checkpoint file (atomic writes, one-line errors);
- :mod:`~dynify.train.data`: what ``data`` names, loaders;
- :mod:`~dynify.train.distributed`: torchrun / DDP processes;
- :mod:`~dynify.train.precision`: autocast dtype, channels_last, seeding;
- :mod:`~dynify.train.progress`: the progress bar and epoch lines (``dynify`` logger);
- :mod:`~dynify.train.temperature`: :class:`TemperatureScheduler`.
"""

from dynify.errors import TrainingDiverged
from dynify.train.checkpoint import CHECKPOINT_NAME
from dynify.train.data import Data, default_cache_dir, load_data
from dynify.train.evaluation import evaluate
from dynify.train.loop import EpochCallback, FinetuneResult, StopTraining, finetune
from dynify.train.run import FinetuneOutcome, finetune_to_artifact
from dynify.train.settings import SCHEDULERS, FinetuneSettings
from dynify.train.temperature import TemperatureScheduler

__all__ = [
    "CHECKPOINT_NAME",
    "SCHEDULERS",
    "Data",
    "EpochCallback",
    "FinetuneOutcome",
    "FinetuneResult",
    "FinetuneSettings",
    "StopTraining",
    "TemperatureScheduler",
    "TrainingDiverged",
    "default_cache_dir",
    "evaluate",
    "finetune",
    "finetune_to_artifact",
    "load_data",
]

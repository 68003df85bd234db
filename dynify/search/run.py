"""Running a search: one process or several against one study, then the run folder.

:func:`search` prepares (refusing an impossible budget before any training), creates or
resumes the study, runs ``workers`` processes on this machine (one GPU each where there are
several; other machines join with the same ``storage`` and ``study``), then writes the run
folder and returns the summary. Running the same settings again resumes: finished trials
are kept, and a trial whose process died is retried.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass

import optuna
import torch

from dynify._device import resolve_device
from dynify.errors import DynifyError
from dynify.logging import get_logger
from dynify.search.claims import SearchInterrupted
from dynify.search.context import SearchContext, prepare
from dynify.search.identity import open_study
from dynify.search.progress import Progress, announce
from dynify.search.report import write_report
from dynify.search.settings import SearchSettings
from dynify.search.training import training_speed
from dynify.search.trials import finished
from dynify.search.worker import run_worker

__all__ = ["SearchOutcome", "search"]

_logger = get_logger(__name__)


@dataclass
class SearchOutcome:
    """What :func:`search` returns: the study (reloaded once every worker is done), the
    summary it wrote (what the command line prints), and the context it ran in."""

    study: optuna.Study
    summary: str
    context: SearchContext


def search(settings: SearchSettings) -> SearchOutcome:
    """Run (or resume) the search ``settings`` describe and write its run folder.

    Raises:
        DynifyError: a bad setting, or a budget no plan can meet (before any training).
        SearchInterrupted: Ctrl-C; the interrupted trial runs again on resume.
    """
    ctx = prepare(settings)
    study = open_study(ctx, create=True)
    if settings.progress:
        remaining = settings.trials - len(finished(study))
        announce(ctx, study, training_speed(ctx) if remaining > 0 else None)
    if settings.workers == 1:
        run_worker(ctx, study=study, on_trial=Progress(ctx))
    else:
        _run_processes(settings)
    study = open_study(ctx, create=False)
    summary = write_report(study, ctx)
    return SearchOutcome(study, summary, ctx)


def _worker_main(settings: SearchSettings, index: int) -> None:
    """Entry of a worker process (spawned): rebuild the context, run trials."""
    try:
        if resolve_device(settings.device).type != "cuda":
            # N processes training on the CPU share its cores (oversubscribed threads spin).
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // settings.workers))
        ctx = prepare(settings)
        ctx.prefix = f"[worker {index}] "
        run_worker(ctx, on_trial=Progress(ctx))
    except DynifyError as err:
        _logger.error(f"[worker {index}] {err}")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)  # the interrupted trial is marked; the parent says it in one line


def _worker_settings(settings: SearchSettings) -> list[SearchSettings]:
    """Each worker's settings: one GPU each, in turn, where there are several and the
    settings name none in particular (``cuda`` or no device)."""
    device = resolve_device(settings.device)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if gpus <= 1 or device.index is not None:
        return [settings] * settings.workers
    return [
        dataclasses.replace(settings, device=f"cuda:{i % gpus}") for i in range(settings.workers)
    ]


def _run_processes(settings: SearchSettings) -> None:
    spawn = multiprocessing.get_context("spawn")
    procs = []
    for i, worker_settings in enumerate(_worker_settings(settings)):
        p = spawn.Process(target=_worker_main, args=(worker_settings, i), daemon=False)
        p.start()
        procs.append(p)
    failed = []
    try:
        for i, p in enumerate(procs):
            p.join()
            if p.exitcode != 0:
                failed.append(f"worker {i} exited with {p.exitcode}")
    except KeyboardInterrupt:
        # The workers got Ctrl-C too (one process group) and are marking their trials
        # interrupted; a worker sent only SIGINT to this process is told. SIGTERM is the last
        # resort: a trial killed by it is retried through its heartbeat instead.
        time.sleep(2.0)
        for p in procs:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGINT)
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        raise SearchInterrupted(
            "the workers' running trials are retried when the same command is rerun"
        ) from None
    if failed and len(failed) == len(procs):
        raise DynifyError("every worker failed: " + "; ".join(failed))
    for line in failed:
        _logger.warning(line)

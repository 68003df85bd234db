"""Running a search: one process or several against one study, with progress lines.

``search(settings)`` prepares (refusing an impossible budget before any training), creates or
resumes the study, runs ``workers`` processes on this machine (one GPU each where there are
several; other machines join with the same ``--storage`` and ``--study``), then writes the
run folder and returns the summary. Rerunning the same command resumes: finished trials are
kept, and a trial whose process died is retried.
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
from optuna.trial import FrozenTrial, TrialState

from dynify.cost import format_count
from dynify.errors import DynifyError
from dynify.search.study import (
    SearchContext,
    SearchInterrupted,
    SearchSettings,
    clock,
    estimate,
    finished,
    open_study,
    prepare,
    redact_url,
    run_worker,
    training_speed,
)

__all__ = ["SearchOutcome", "search"]


@dataclass
class SearchOutcome:
    study: optuna.Study
    summary: str
    context: SearchContext


class _Progress:
    """One line per finished trial: number, result, best so far, time used and left."""

    def __init__(self, ctx: SearchContext) -> None:
        self.ctx = ctx
        self.start = time.monotonic()

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if not self.ctx.settings.progress or "surplus" in trial.user_attrs:
            return
        total = self.ctx.settings.trials
        done = finished(study)
        what = str(trial.user_attrs.get("preset") or "sampled")
        if "same_as" in trial.user_attrs:
            what += f" (same plan as trial {trial.user_attrs['same_as']}, not retrained)"
        flops = trial.user_attrs.get("flops")
        cost = f"{format_count(flops)}FLOPs" if flops is not None else "?"
        if trial.state == TrialState.COMPLETE:
            feasible = all(v <= 0 for v in trial.constraints.values())
            result = f"{trial.values[0]:.2f}%" if feasible else "over budget"
        elif trial.state == TrialState.PRUNED:
            result = "pruned"
        else:
            result = trial.state.name.lower()
        best = ""
        try:
            if len(study.directions) == 1:
                b = study.best_trial
                best = f" | best {b.values[0]:.2f}% (trial {b.number})"
        except ValueError:
            pass
        used = time.monotonic() - self.start
        durations = [t.duration.total_seconds() for t in done if t.duration]
        left_n = max(total - len(done), 0)
        left = (
            (sum(durations) / len(durations)) * left_n / self.ctx.settings.workers
            if durations
            else 0.0
        )
        if self.ctx.settings.timeout is not None:
            left = min(left, max(self.ctx.settings.timeout - used, 0.0))
        print(
            f"{self.ctx.prefix}trial {trial.number} ({len(done)}/{total}) {what}: {result}, {cost}"
            f"{best} | {clock(used)} used, ~{clock(left)} left",
            flush=True,
        )


def _worker_main(settings: SearchSettings, index: int) -> None:
    """Entry of a worker process (spawned): rebuild the context, run trials."""
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not device.startswith("cuda"):
        # N processes training on the CPU share its cores (oversubscribed threads spin).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // settings.workers))
    try:
        ctx = prepare(settings)
        ctx.prefix = f"[worker {index}] "
        run_worker(ctx, on_trial=_Progress(ctx))
    except DynifyError as err:
        print(f"[worker {index}] error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)  # the interrupted trial is marked; the parent says it in one line


def search(settings: SearchSettings) -> SearchOutcome:
    """Run (or resume) the search ``settings`` describe and write its run folder."""
    ctx = prepare(settings)
    study = open_study(ctx, create=True)
    if settings.progress:
        static = ctx.static_cost
        done = len(finished(study))
        print(
            f"search {study.study_name}: {ctx.model_name} at "
            f"{'x'.join(map(str, ctx.space.input_size))}, {len(ctx.groups)} groups "
            f"({ctx.space.granularity}), static {format_count(static.flops)}FLOPs, "
            f"budget {ctx.budget}, {done}/{settings.trials} trials done, "
            f"device {ctx.device}, storage {_where(settings)}",
            flush=True,
        )
        for note in ctx.notes:
            print(f"note: {note}", flush=True)
        remaining = settings.trials - done
        if remaining > 0:
            print(estimate(ctx, remaining, training_speed(ctx)), flush=True)
    if settings.workers == 1:
        run_worker(ctx, study=study, on_trial=_Progress(ctx))
    else:
        _run_processes(settings)
    study = open_study(ctx, create=False)
    from dynify.search.report import write_report

    summary = write_report(study, ctx)
    return SearchOutcome(study, summary, ctx)


def _run_processes(settings: SearchSettings) -> None:
    spawn = multiprocessing.get_context("spawn")
    procs = []
    gpus = torch.cuda.device_count()
    for i in range(settings.workers):
        worker_settings = settings
        if gpus > 1 and (settings.device or "cuda").startswith("cuda"):
            worker_settings = dataclasses.replace(settings, device=f"cuda:{i % gpus}")
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
        print(f"warning: {line}", file=sys.stderr)


def _where(settings: SearchSettings) -> str:
    if settings.storage:
        return redact_url(settings.storage)
    return os.path.join(settings.output, "study.db")

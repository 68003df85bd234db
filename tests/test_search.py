"""``dynify search`` end to end with real components: a timm model (``test_resnet``, 8 MFLOPs
at 32x32), a tiny image set the tests write (tests/_imagedata.py), Optuna studies in SQLite
(and PostgreSQL when ``DYNIFY_TEST_POSTGRES_URL`` names a server), the real training loop.

Budget: 9.5 MFLOPs. The static model (8.20 MFLOPs) and the bundled ``mobile`` recipe (9.18)
fit it; ``dycnn`` (11.2) and ``condconv`` (13.2) do not, and a stage-4 group at K >= 4 (10.4
MFLOPs alone) never does, so about half of the sampled plans are over budget.

Every process trains with one thread: the test machines' cores are shared, and oversubscribed
threads make a 3-second trial take a minute.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from _imagedata import write_image_folder
from optuna.trial import TrialState

import dynify
import dynify.models
import dynify.search.claims as claims_module
import dynify.search.objective as objective_module
import dynify.train
from dynify.cli import main
from dynify.errors import DynifyError
from dynify.recipe import load_recipe
from dynify.search import (
    SearchSettings,
    open_study,
    plan_key,
    plan_of_trial,
    prepare,
    run_worker,
)
from dynify.search.report import _recipe_text
from dynify.search.sampling import static_params
from dynify.search.storage import make_storage

warnings.filterwarnings("ignore", category=UserWarning)

ROOT = Path(__file__).resolve().parents[1]
BUDGET = "9.5MFLOPs"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def space_yaml(*, epochs: int = 2, lr: float = 0.05, train_images: int = 64) -> str:
    return f"""\
version: 1
description: tiny test space
model: test_resnet
input_size: [3, 32, 32]
candidates:
  rules:
    - {{select: {{stem: true}}, convert: false}}
    - {{select: {{classifier: true}}, convert: false}}
granularity: stage
choices:
  experts: [1, 2, 4, 8]
  reduction: [4]
  kind: [dycnn]
temperature:
  start: [10, 30]
  end: [1]
  length: [1]
  shape: [linear]
  unit: epoch
training:
  epochs: {epochs}
  train_images: {train_images}
  val_images: 32
  batch_size: 16
  lr: {lr}
  workers: 0
"""


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("search")
    data = write_image_folder(root / "images", 30)  # 120 images; 108 after the 10% holdout
    space = root / "space.yaml"
    space.write_text(space_yaml())
    return SimpleNamespace(root=root, data=data, space=space)


def search_args(files: SimpleNamespace, output: Path, *extra: str, trials: int = 8) -> list[str]:
    return [
        "search", "--space", str(files.space), "--data", str(files.data), "--budget", BUDGET,
        "--trials", str(trials), "--output", str(output), "--device", "cpu", *extra,
    ]  # fmt: skip


@contextlib.contextmanager
def counting_finetune():
    """Count the real training loop's calls (the search looks it up at call time), and the
    models the search builds (``calls.built``; ``calls.plans``: the key of each one's plan)."""
    calls = Calls()
    real_finetune, real_apply = dynify.train.finetune, objective_module.apply

    def finetune(model, settings, **kwargs):
        calls.append(settings.epochs)
        return real_finetune(model, settings, **kwargs)

    def apply(model, plan, *args, **kwargs):
        calls.built += 1
        calls.plans.append(plan_key(plan))
        return real_apply(model, plan, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dynify.train, "finetune", finetune)
        mp.setattr(objective_module, "apply", apply)
        yield calls


class Calls(list):
    def __init__(self) -> None:
        super().__init__()
        self.built = 0
        self.plans: list[str] = []


def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def load(output: Path, name: str | None = None) -> optuna.Study:
    storage = f"sqlite:///{output / 'study.db'}"
    if name is None:
        (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


def done(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))


def feasible(t: optuna.trial.FrozenTrial) -> bool:
    return all(v <= 0 for v in t.constraints.values())


def settings_for(files: SimpleNamespace, output: Path, **kw) -> SearchSettings:
    base = dict(budget=BUDGET, trials=8, device="cpu", progress=False, space=str(files.space))
    return SearchSettings(**{**base, "data": str(files.data), "output": str(output), **kw})


# -- one real search, inspected by several tests ---------------------------------------------


@pytest.fixture(scope="module")
def run(files: SimpleNamespace) -> SimpleNamespace:
    output = files.root / "run"
    with counting_finetune() as calls:
        code, out, err = run_main(search_args(files, output))
    assert code == 0, err
    return SimpleNamespace(output=output, out=out, err=err, calls=calls, study=load(output))


def test_presets_are_the_first_trials(run: SimpleNamespace) -> None:
    trials = run.study.trials
    assert [t.user_attrs.get("preset") for t in trials[:2]] == ["static", "mobile"]
    assert not any(t.user_attrs.get("preset") for t in trials[2:])  # dycnn, condconv: over
    static, mobile = trials[0], trials[1]
    assert static.user_attrs["converted"] == 0 and static.user_attrs["flops"] == 8_196_864
    assert mobile.user_attrs["converted"] == 4 and feasible(static) and feasible(mobile)
    assert run.study.user_attrs["presets_enqueued"] == ["static", "mobile"]


def test_infeasible_plans_are_priced_not_trained(run: SimpleNamespace) -> None:
    trials = run.study.trials
    assert len(trials) == len(done(run.study)) == 8
    over = [t for t in trials if not feasible(t)]
    assert over, "the seeded sampler drew no plan over the budget"
    for t in over:
        assert t.state == TrialState.COMPLETE and t.constraints["budget"] > 0
        assert t.constraints["budget"] == pytest.approx(t.user_attrs["flops"] / 9.5e6 - 1)
        assert t.value == 0.0 and t.intermediate_values == {}
        assert "top1_history" not in t.user_attrs and "latency_ms" not in t.user_attrs
    trained = [t for t in trials if feasible(t) and "same_as" not in t.user_attrs]
    # One model built and trained per feasible plan, none for plans over budget or seen before:
    # the plans built are exactly the trained trials' plans, in order, and no priced one.
    assert len(run.calls) == run.calls.built == len(trained) and set(run.calls) == {2}
    assert run.calls.plans == [t.user_attrs["plan"] for t in trained]
    assert not {t.user_attrs["plan"] for t in over} & set(run.calls.plans)


def test_feasible_trials_report_every_epoch(run: SimpleNamespace) -> None:
    trained = [t for t in run.study.trials if feasible(t) and "same_as" not in t.user_attrs]
    assert len(trained) >= 3
    for t in trained:
        assert t.constraints["budget"] <= 0
        if t.state == TrialState.PRUNED:  # stopped after epoch 1, below the median
            assert sorted(t.intermediate_values) == [1] and "top1_history" not in t.user_attrs
            continue
        assert sorted(t.intermediate_values) == [1, 2]  # one report per epoch
        assert t.user_attrs["top1_history"] == [t.intermediate_values[1], t.value]
        assert 0.0 <= t.value <= 100.0
    for t in run.study.trials:  # a plan seen before is not trained twice
        if "same_as" in t.user_attrs:
            first = run.study.trials[t.user_attrs["same_as"]]
            assert t.user_attrs["plan"] == first.user_attrs["plan"] and t.value == first.value
    keys = [t.user_attrs["plan"] for t in trained]
    assert len(keys) == len(set(keys))


def test_best_is_feasible_and_beats_or_matches_static(run: SimpleNamespace) -> None:
    summary = json.loads((run.output / "summary.json").read_text())
    best = run.study.trials[summary["best"]["trial"]]
    static = run.study.trials[0]
    assert feasible(best) and best.state == TrialState.COMPLETE
    assert best.value >= static.value
    complete = [t for t in run.study.trials if t.state == TrialState.COMPLETE]
    assert best.value == max(t.value for t in complete if feasible(t))
    assert summary["best"]["static"]["top1"] == static.value
    assert summary["best"]["best"]["flops"] <= 9.5e6
    assert summary["best"]["static"]["flops"] == summary["best"]["static"]["measured_flops"]
    assert summary["trials"].get("COMPLETE", 0) + summary["trials"].get("PRUNED", 0) == 8


def _layers(plan) -> list[tuple]:
    return [
        (lp.name, lp.settings.experts, lp.settings.reduction, lp.settings.temperature)
        for lp in plan.converted
    ]


def _converted(path: Path) -> list[tuple]:
    return _layers(dynify.plan_of(dynify.load(path)))


def _expected(trial, ctx) -> list[tuple]:
    return _layers(plan_of_trial(trial, ctx))


def test_best_yaml_reproduces_the_best_plan(run: SimpleNamespace, files, tmp_path: Path) -> None:
    """best.yaml's header and the printed summary give the command that rebuilds the searched
    model: the plan, and the data's 4 classes (not timm's default 1000) at the input size."""
    summary = json.loads((run.output / "summary.json").read_text())
    best = run.study.trials[summary["best"]["trial"]]
    text = (run.output / "best.yaml").read_text()
    load_recipe(run.output / "best.yaml")  # a valid recipe
    assert (summary["model"], summary["num_classes"], summary["input_size"]) == (
        "test_resnet", 4, [3, 32, 32],
    )  # fmt: skip
    (header,) = [line for line in text.splitlines() if line.startswith("# rebuild: ")]
    command = header.removeprefix("# rebuild: ")
    assert f"\nrebuild it: {command}\n" in run.out and summary["best"]["rebuild"] == command
    words = shlex.split(command)
    assert words[:3] == ["dynify", "convert", "test_resnet"]
    assert words[words.index("--recipe") + 1] == str((run.output / "best.yaml").absolute())

    ctx = prepare(settings_for(files, run.output))
    art = tmp_path / "best.safetensors"
    code, _, err = run_main([*words[1:], "--output", str(art)])
    assert code == 0, err
    model = dynify.load(art)
    assert model.get_classifier().out_features == len(ctx.data.classes) == 4
    assert _converted(art) == _expected(best, ctx)
    size = ["--input-size", "3,32,32"]

    # The same file format for a dynamic plan (the best may well be the static model): the
    # recipe of the feasible trial that converts the most layers.
    dynamic = max(
        (t for t in run.study.trials if feasible(t)), key=lambda t: t.user_attrs["converted"]
    )
    assert dynamic.user_attrs["converted"] > 0
    recipe = tmp_path / "dynamic.yaml"
    recipe.write_text(_recipe_text(dynamic, ctx, "plan", recipe))
    art2 = tmp_path / "dynamic.safetensors"
    code, _, err = run_main(
        ["convert", "test_resnet", "--recipe", str(recipe), "--output", str(art2), *size]
    )
    assert code == 0, err
    assert _converted(art2) == _expected(dynamic, ctx) and len(_converted(art2)) > 0


def test_run_folder_and_printed_summary(run: SimpleNamespace) -> None:
    with open(run.output / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["number"]) for r in rows] == [t.number for t in run.study.trials]
    for row, t in zip(rows, run.study.trials, strict=True):
        assert row["state"] == t.state.name and row["preset"] == t.user_attrs.get("preset", "")
        assert row["top1"] == ("" if t.value is None else str(t.value))
        assert int(row["flops"]) == t.user_attrs["flops"]
        assert float(row["constraint.budget"]) == pytest.approx(t.constraints["budget"])
        assert row["feasible"] == str(feasible(t))
    for name in ("history.png", "pareto.png"):
        data = (run.output / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    # Progress goes through dynify.logging (stderr); the summary is the command's stdout.
    err = run.err
    assert "0/8 trials done, device cpu" in err
    assert "trial 0 (1/8) static: " in err and "trial 7 (8/8) " in err and "left" in err
    out = run.out
    assert out.startswith("search: test_resnet, budget ") and "trials done" not in out
    summary = out[out.index("search: test_resnet, budget ") :]
    first = summary.splitlines()[0]
    assert "space space, device cpu (" in first and first.endswith(", 1 thread)"), first
    for row in ("top1", "macs", "flops", "measured_flops", "params", "latency_ms"):
        assert f"\n{row} " in summary
    assert "best plan: " in summary and str(run.output / "best.yaml") in summary
    assert sorted(p.name for p in run.output.iterdir()) == [
        "best.yaml", "history.png", "pareto.png", "study.db", "summary.json", "trials.csv",
    ]  # fmt: skip


def test_rerun_resumes_without_repeating(run: SimpleNamespace, files, tmp_path: Path) -> None:
    """The same command again: nothing to do. With --trials 9: exactly one more trial, and
    the presets are not queued again."""
    output = tmp_path / "resumed"
    output.mkdir()
    (output / "study.db").write_bytes((run.output / "study.db").read_bytes())
    before = [(t.number, t.value, t.params) for t in run.study.trials]
    with counting_finetune() as calls:
        code, out, err = run_main(search_args(files, output))
    assert code == 0, err
    assert calls == [] and "8/8 trials done" in err
    with counting_finetune() as calls:
        code, out, err = run_main(search_args(files, output, trials=9))
    assert code == 0 and "trials done" not in out and "1/9 trials to run" not in out, err
    study = load(output)
    assert [(t.number, t.value, t.params) for t in study.trials[:8]] == before
    assert len(study.trials) == 9 and len(done(study)) == 9
    assert not study.trials[8].user_attrs.get("preset")
    assert len(calls) == (1 if feasible(study.trials[8]) and "same_as" not in
                          study.trials[8].user_attrs else 0)  # fmt: skip


# -- the pruner, multi-objective mode --------------------------------------------------------


def test_the_median_pruner_stops_a_poor_trial_after_one_epoch(files, tmp_path: Path) -> None:
    """Three finished trials reached 100% at every epoch; a trial whose learning rate is too
    small to learn anything is stopped after its first epoch."""
    space = tmp_path / "slow-learner.yaml"
    space.write_text(space_yaml(epochs=3, lr=1e-7))
    settings = settings_for(files, tmp_path / "out", space=str(space), budget="1GFLOPs")
    ctx = prepare(settings)
    ctx.presets = []  # the reference trials below stand for them
    study = open_study(ctx, create=True)
    for _ in range(3):
        study.add_trial(
            optuna.trial.create_trial(
                value=100.0,
                intermediate_values={1: 100.0, 2: 100.0, 3: 100.0},
                user_attrs={"plan": "reference"},
            )
        )
    with counting_finetune() as calls:
        run_worker(dataclasses_replace(ctx, trials=4))
    trial = study.trials[-1]
    assert trial.state == TrialState.PRUNED
    assert list(trial.intermediate_values) == [1] and trial.intermediate_values[1] < 100.0
    assert calls == [3]  # the 3-epoch run stopped after epoch 1
    assert feasible(trial) and trial.constraints["budget"] < 0


def dataclasses_replace(ctx, **settings):
    import dataclasses

    ctx.settings = dataclasses.replace(ctx.settings, **settings)
    return ctx


def test_multi_objective_returns_a_pareto_front(files, tmp_path: Path) -> None:
    output = tmp_path / "pareto"
    code, out, err = run_main(
        search_args(files, output, "--objectives", "accuracy, params", trials=5)
    )
    assert code == 0, err
    study = load(output)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert len(done(study)) == 5
    front = study.best_trials
    assert front and all(feasible(t) for t in front)
    files_ = sorted((output / "front").glob("*.yaml"))
    assert [p.name for p in files_] == [f"trial_{t.number:04d}.yaml" for t in sorted(
        front, key=lambda t: t.number)]  # fmt: skip
    ctx = prepare(settings_for(files, output, objectives=("accuracy", "params")))
    for t in front:
        assert t.values[1] == t.user_attrs["params"]
        recipe = load_recipe(output / "front" / f"trial_{t.number:04d}.yaml")
        assert plan_key(dynify.resolve_plan(ctx.trace, recipe)) == t.user_attrs["plan"]
    # No feasible trial dominates a front member.
    for t in front:
        for o in (o for o in done(study) if feasible(o) and o.state == TrialState.COMPLETE):
            assert not (o.values[0] >= t.values[0] and o.values[1] < t.values[1])
            assert not (o.values[0] > t.values[0] and o.values[1] <= t.values[1])
    assert "Pareto front: " in out and "best.yaml" not in os.listdir(output)
    # Multi-objective trials are not reported to the pruner (Optuna refuses it) ...
    assert all(t.intermediate_values == {} for t in study.trials)
    # ... but their accuracies per epoch are kept.
    assert all(len(t.user_attrs["top1_history"]) == 2 for t in front)


@pytest.mark.slow
def test_a_journal_file_study_runs_and_resumes(files, tmp_path: Path) -> None:
    """``--storage journal:PATH`` (a file on a shared file system): the same search, no
    heartbeat; rerunning the command finds the study finished."""
    journal = tmp_path / "shared" / "study.log"
    args = search_args(files, tmp_path / "out", "--storage", f"journal:{journal}", trials=3)
    args += ["--study", "shared-study"]
    code, _, err = run_main(args)
    assert code == 0, err
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = JournalStorage(JournalFileBackend(str(journal)))
    study = optuna.load_study(study_name="shared-study", storage=storage)
    assert len(done(study)) == 3 and len(study.trials) == 3
    assert [t.user_attrs.get("preset") for t in study.trials[:2]] == ["static", "mobile"]
    assert f"storage journal:{journal}" in err and (tmp_path / "out" / "best.yaml").exists()
    assert not (tmp_path / "out" / "study.db").exists()
    with counting_finetune() as calls:
        code, _, err = run_main(args)
    assert code == 0 and calls == [] and "3/3 trials done" in err, err


# -- refusals and exit codes -----------------------------------------------------------------


def test_a_budget_below_the_static_model_is_refused_before_training(files, tmp_path) -> None:
    output = tmp_path / "refused"
    with counting_finetune() as calls:
        code, out, err = run_main(_with(search_args(files, output), ["--budget", "5MFLOPs"]))
    assert code == 2 and calls == [] and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dynify search: error: budget 5.00 MFLOPs is below the static")
    assert "(test_resnet at 3x32x32: 8.20 MFLOPs)" in lines[0]
    assert not output.exists()  # no study was even created

    with pytest.raises(DynifyError, match="max_params 100000 is below the static model's "
                       "373,076 parameters") as caught:  # fmt: skip
        prepare(settings_for(files, output, max_params=1e5))
    assert caught.value.arguments == ("max_params",)
    assert not output.exists()


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (["--budget", "600 bananas"], ["budget '600 bananas' is not understood", "600MFLOPs"]),
        (["--data", "/nonexistent/images"], ["data '/nonexistent/images': no such file"]),
        (["resnet_nope"], ["unknown model 'resnet_nope'"]),
        (["--space", "defualt"], ["did you mean 'default'?"]),
        (["--objectives", "params"], ["--objectives 'params'", "accuracy,params"]),
        (
            ["--trials", "0"],
            ["--trials must be a positive integer (the number to finish,", "got 0"],
        ),
        (["--trials", "1e3"], ["--trials must be a positive integer", "got '1e3'"]),
        (["--workers", "-1"], ["--workers must be a positive integer (worker processes), got -1"]),
        (["--workers", "two"], ["--workers must be a positive integer", "got 'two'"]),
        (["--timeout", "nan"], ["--timeout must be a finite number > 0 (seconds), got nan"]),
        (["--timeout", "-5"], ["--timeout must be a finite number > 0 (seconds), got -5.0"]),
        (["--max-params", "-5"], ["--max-params must be a finite number > 0", "e.g. 30M", "'-5'"]),
        (["--seed", "-1"], ["--seed must be an integer in [0, 4294967295]", "got -1"]),
        (["--heartbeat", "0"], ["--heartbeat must be a positive integer (seconds), got 0"]),
        (["--epochs", "0"], ["--epochs must be a positive integer (training passes per", "got 0"]),
        (["--train-images", "many"], ["--train-images must be a positive integer", "'many'"]),
        (["--val-images", "-3"], ["--val-images must be a positive integer (held-out", "got -3"]),
        (["--device", "tpu"], ["device 'tpu' is not a torch device"]),
        (["--device", "meta"], ["device 'meta': the search runs on cpu or cuda"]),
        (["--max-latency", "5MFLOPs"], ["--max-latency '5MFLOPs': give a time"]),
        (
            ["--space", "default", "--budget", "600MFLOPs", "--val-images", "108"],
            ["has 108 training images; --val-images 108 leaves none to train on", "below 108"],
        ),
        (
            ["--val-images", "50", "--train-images", "100"],
            ["108 training images; --val-images 50 and --train-images 100 need 150"],
        ),
        (["--storage", "mysql://u:secret@localhost/db"], ["'mysql://u:***@localhost/db'"]),
    ],
)
def test_bad_arguments_are_exit_2_in_one_line(files, tmp_path, change, words) -> None:
    args = _with(search_args(files, tmp_path / "out"), change)
    with counting_finetune() as calls:
        code, _, err = run_main(args)
    assert code == 2 and calls == [], (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dynify search: error: "), err
    for word in words:
        assert word in lines[0]
    assert not (tmp_path / "out").exists()  # refused before anything was written


def _with(args: list[str], change: list[str]) -> list[str]:
    """``args`` with options replaced (``--x v ...``) or a positional MODEL added."""
    args = list(args)
    if not change[0].startswith("--"):
        return [args[0], change[0], *args[1:]]
    for option, value in zip(change[::2], change[1::2], strict=True):
        if option in args:
            args[args.index(option) + 1] = value
        else:
            args += [option, value]
    return args


def test_the_real_command_prints_no_traceback(files, tmp_path: Path) -> None:
    args = search_args(files, tmp_path / "out")
    args[args.index("--budget") + 1] = "1MFLOPs"
    proc = subprocess.run(
        [sys.executable, "-m", "dynify", *args],
        capture_output=True, text=True, timeout=600, env=ENV,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "below the static model's own cost (test_resnet at 3x32x32: 8.20 MFLOPs)" in line


# -- several processes, kills and PostgreSQL (slow) ------------------------------------------


# Runs the real CLI in a child process with every trial's training held back by 2 s first, so
# that a trial is reliably mid-way when the test kills the process (on a quiet machine the
# tiny trials otherwise finish between two polls). The search looks finetune up at call time.
_SLOW_TRAINING_CLI = """
import sys, time
import dynify.train
real = dynify.train.finetune
def finetune(*args, **kwargs):
    time.sleep(2.0)
    return real(*args, **kwargs)
dynify.train.finetune = finetune
from dynify.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _spawn(
    files, output: Path, *extra: str, trials: int, slow_training: bool = False
) -> subprocess.Popen:
    command = ["-c", _SLOW_TRAINING_CLI] if slow_training else ["-m", "dynify"]
    return subprocess.Popen(
        [sys.executable, *command, *search_args(files, output, *extra, trials=trials)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip


def _check_shared_study(study: optuna.Study, trials: int, killed: tuple[int, ...] = ()) -> None:
    """Exactly ``trials`` finished trials, nothing left running or queued, presets once."""
    states = [t.state for t in study.trials]
    assert states.count(TrialState.RUNNING) == 0 and states.count(TrialState.WAITING) == 0
    finished = done(study)
    assert len(finished) == trials, [(t.number, t.state.name) for t in study.trials]
    presets = [t.user_attrs.get("preset") for t in finished if t.user_attrs.get("preset")]
    assert sorted(presets) == ["mobile", "static"]
    # Failed trials here can only be killed ones and surplus claims (two processes asking for
    # the last trial at the same moment).
    for t in study.trials:
        if t.state == TrialState.FAIL and t.number not in killed:
            assert "surplus" in t.user_attrs, t


@pytest.mark.slow
def test_two_worker_processes_share_one_sqlite_study(files, tmp_path: Path) -> None:
    output = tmp_path / "workers"
    proc = _spawn(files, output, "--workers", "2", trials=8)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    study = load(output)
    _check_shared_study(study, 8)
    workers = {t.user_attrs["worker"] for t in done(study)}
    assert len(workers) == 2, workers  # both processes ran trials
    assert "[worker 0] trial" in err and "[worker 1] trial" in err
    # The summary counts every trial of the shared study by state, 8 of them finished.
    counts = {s: sum(t.state == s for t in study.trials) for s in TrialState}
    assert counts[TrialState.COMPLETE] + counts[TrialState.PRUNED] == 8
    line = "trials: " + ", ".join(f"{n} {s.name.lower()}" for s, n in counts.items() if n)
    assert f"\n{line}\n" in out, out


def _states(db: Path) -> dict[int, str]:
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=30)) as con:
            return dict(con.execute("SELECT number, state FROM trials").fetchall())
    except sqlite3.OperationalError:  # not created yet
        return {}


@pytest.mark.slow
def test_a_killed_run_resumes_without_losing_or_repeating_trials(files, tmp_path: Path) -> None:
    output = tmp_path / "killed"
    trials = 5
    proc = _spawn(files, output, "--heartbeat", "1", trials=trials, slow_training=True)
    db = output / "study.db"
    deadline = time.monotonic() + 600
    killed_number = None
    while time.monotonic() < deadline and proc.poll() is None:
        states = _states(db)
        complete = [n for n, s in states.items() if s == "COMPLETE"]
        running = [n for n, s in states.items() if s == "RUNNING"]
        if complete and running:
            # Only a training trial stays RUNNING for long: check it is mid-way.
            time.sleep(0.5)
            if _states(db).get(running[0]) == "RUNNING":
                killed_number = running[0]
                os.kill(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.1)
    proc.wait(timeout=60)
    assert killed_number is not None, "no trial was running after another had finished"
    assert proc.returncode == -signal.SIGKILL
    before = {t.number: t for t in load(output).trials}
    finished_before = {n: (t.value, t.params) for n, t in before.items() if t.state.is_finished()}
    assert before[killed_number].state == TrialState.RUNNING and finished_before

    # The same command (same heartbeat) resumes.
    proc = _spawn(files, output, "--heartbeat", "1", trials=trials)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    study = load(output)
    after = {t.number: t for t in study.trials}
    # No finished trial lost or changed...
    assert {n: (after[n].value, after[n].params) for n in finished_before} == finished_before
    # ... the killed one failed, and a copy of it (a WAITING trial, same plan) finished.
    assert after[killed_number].state == TrialState.FAIL
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed_number]
    assert len(retries) == 1 and retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retries[0].params == before[killed_number].params
    assert retries[0].user_attrs.get("preset") == before[killed_number].user_attrs.get("preset")
    assert retries[0].user_attrs["plan"] == before[killed_number].user_attrs["plan"]
    # ... and exactly --trials finished trials; the only copy of a trial is that retry.
    _check_shared_study(study, trials, killed=(killed_number,))
    copies = [t for t in study.trials if "failed_trial" in t.system_attrs]
    assert copies == retries
    assert f"{len(finished_before)}/{trials} trials done" in err


def _postgres_url() -> str:
    url = os.environ.get("DYNIFY_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("DYNIFY_TEST_POSTGRES_URL is not set (.ci/run starts a PostgreSQL server)")
    try:
        import psycopg2
    except ImportError:
        pytest.skip("psycopg2 is not installed (pip install -e '.[test]')")
    try:
        psycopg2.connect(url, connect_timeout=5).close()
    except psycopg2.OperationalError as err:
        reason = str(err).strip().splitlines()[0]
        pytest.skip(f"no PostgreSQL server reachable at DYNIFY_TEST_POSTGRES_URL ({reason})")
    return url


@pytest.mark.slow
def test_two_machines_share_one_postgresql_study(files, tmp_path: Path) -> None:
    """Two independent ``dynify search`` processes (as on two machines: separate run folders)
    join one study through ``--storage postgresql://... --study NAME``."""
    url = _postgres_url()
    name = f"test-{uuid.uuid4().hex[:12]}"
    shared = ("--storage", url, "--study", name)
    procs = [_spawn(files, tmp_path / f"machine{i}", *shared, trials=8) for i in range(2)]
    try:
        results = [p.communicate(timeout=900) for p in procs]
        for p, (_, err) in zip(procs, results, strict=True):
            assert p.returncode == 0, err
        storage = make_storage(SearchSettings(budget=BUDGET, storage=url))
        study = optuna.load_study(study_name=name, storage=storage)
        _check_shared_study(study, 8)
        workers = {t.user_attrs["worker"] for t in done(study)}
        assert len(workers) == 2, workers
        for i, (_, err) in enumerate(results):  # each machine writes the same report
            assert f"{url.split('@')[0].rsplit(':', 1)[0]}:***@" in err
            assert (tmp_path / f"machine{i}" / "trials.csv").exists()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        with contextlib.suppress(KeyError):
            storage = make_storage(SearchSettings(budget=BUDGET, storage=url))
            optuna.delete_study(study_name=name, storage=storage)


def test_advantage_over_static_is_judged_against_its_standard_error() -> None:
    from dynify.search.report import _advantage

    def cmp(a: float, b: float, best: str = "trial 3") -> dict:
        return {"static": {"top1": a, "label": "static"}, "best": {"top1": b, "label": best}}

    # 80% vs 82% on 5,000 images: se = 100 sqrt(.8 .2 / 5000 + .82 .18 / 5000) = 0.78435
    v = _advantage(cmp(80.0, 82.0), 5000)
    assert v is not None
    assert v["standard_error"] == pytest.approx(0.78435, abs=1e-4)
    assert v["difference"] == pytest.approx(2.0) and v["exceeds"]
    assert "exceeds one standard error (2.5 SE)" in v["text"]
    small = _advantage(cmp(80.0, 80.5), 2000)
    assert small is not None and not small["exceeds"]
    assert "cannot tell the best plan from static" in small["text"]
    assert _advantage(cmp(80.0, 80.0, best="static"), 5000) is None  # static won


# -- hardening: the run folder, secrets, Ctrl-C, concurrent creation, budgets, plots ---------


@contextlib.contextmanager
def counting_work():
    """Count data loads and model builds (``prepare`` looks both up at call time)."""
    calls: list[str] = []
    real_load, real_create = dynify.train.load_data, dynify.models.create_model

    def load_data(*args, **kwargs):
        calls.append("load_data")
        return real_load(*args, **kwargs)

    def create_model(*args, **kwargs):
        calls.append("create_model")
        return real_create(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dynify.train, "load_data", load_data)
        mp.setattr(dynify.models, "create_model", create_model)
        yield calls


def test_an_output_in_the_way_is_refused_before_any_work(files, tmp_path: Path) -> None:
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("keep me")
    under_a_file = in_the_way / "run"
    for output, words in (
        (in_the_way, f"--output {str(in_the_way)!r} is a file; give a folder"),
        (under_a_file, f"{str(in_the_way)!r} is a file, not a folder"),
    ):
        with counting_work() as work:
            code, out, err = run_main(search_args(files, output))
        assert (code, out, work) == (2, "", []), err
        (line,) = err.strip().splitlines()
        assert line.startswith("dynify search: error: --output ") and words in line
        assert "Traceback" not in err
    assert in_the_way.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.parametrize(
    ("storage", "where"),
    [
        ("sqlite:///{afile}/x/study.db", "{afile}/x/study.db"),
        ("journal:{afile}/j.log", "{afile}/j.log"),
    ],
)
def test_a_storage_under_a_file_is_refused_before_any_work(
    files, tmp_path: Path, storage: str, where: str
) -> None:
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("keep me")
    url = storage.format(afile=in_the_way)
    with counting_work() as work:
        code, out, err = run_main(search_args(files, tmp_path / "out", "--storage", url))
    assert (code, out, work) == (2, "", []), err
    (line,) = err.strip().splitlines()
    assert line == (
        f"dynify search: error: --storage {url!r} file {where.format(afile=in_the_way)!r}: "
        f"{str(in_the_way)!r} is a file, not a folder; choose another path"
    )
    assert in_the_way.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.parametrize("storage", ["sqlite:///{afile}/x/study.db", "journal:{afile}/j.log"])
def test_make_storage_says_a_folder_it_cannot_create_in_one_line(
    tmp_path: Path, storage: str
) -> None:
    """The folder check in prepare can be overtaken (a file appears after it): the mkdir is
    one line too, not NotADirectoryError / FileExistsError."""
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("keep me")
    url = storage.format(afile=in_the_way)
    with pytest.raises(DynifyError) as caught:
        make_storage(SearchSettings(budget=BUDGET, storage=url, output=str(tmp_path / "out")))
    assert str(caught.value).startswith(f"storage {url!r}: cannot create ")
    assert str(caught.value).endswith("; choose another path")
    assert caught.value.arguments == ("storage",)  # the command line writes --storage
    assert isinstance(caught.value.__cause__, OSError)  # kept for --debug
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


SECRET = "Hunter2Secret"


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://user:p@ss{SECRET}@127.0.0.1:1/db",  # '@' in the password
        f"postgresql://user:pw@127.0.0.1:1/db?password={SECRET}&sslmode=disable",
        f"postgresql://user:{SECRET}@127.0.0.1:notaport/db",  # does not parse
        f"mysql://user:{SECRET}@127.0.0.1:1/db",  # no driver installed
        f"nonsense {SECRET}",
    ],
)
def test_storage_passwords_never_appear_in_errors(files, tmp_path: Path, url: str) -> None:
    output = tmp_path / "out"
    code, out, err = run_main(search_args(files, output, "--storage", url))
    assert code == 2 and out == "", err
    (line,) = err.strip().splitlines()
    assert line.startswith("dynify search: error: --storage ")
    assert SECRET not in line and SECRET.lower() not in line.lower(), line
    for path in tmp_path.rglob("*"):
        assert path.is_dir() or SECRET.encode() not in path.read_bytes(), path


def test_redact_url_uses_sqlalchemys_parse() -> None:
    from dynify.search.storage import redact_text, redact_url

    assert (
        redact_url("postgresql://u:p@ss@db.example.org/x") == "postgresql://u:***@db.example.org/x"
    )
    assert (
        redact_url("postgresql://u:pw@h/x?sslmode=require&password=zz&sslpassword=yy")
        == "postgresql://u:***@h/x?password=***&sslmode=require&sslpassword=***"
    )
    assert redact_url("mysql://u:s%40cret@h:3306/x") == "mysql://u:***@h:3306/x"
    assert redact_url("postgresql://u:secret@h:port/x") == (
        "postgresql URL that does not parse (not shown, it may hold a password)"
    )
    assert redact_url("journal:/shared/study.log") == "journal:/shared/study.log"
    assert redact_url("sqlite:////tmp/study.db") == "sqlite:////tmp/study.db"
    # A driver's message that quotes the host SQLAlchemy parsed (the tail of the password).
    # The password as parsed ("p") is hidden too, where it stands alone (not inside "pw").
    message = 'could not translate host name "ss@word@h" to address; user "u" pw p'
    assert redact_text(message, "postgresql://u:p@ss@word@h/x") == (
        'could not translate host name "***@h" to address; user "u" pw ***'
    )


@pytest.mark.parametrize(
    ("url", "message", "expected"),
    [
        # A '/' in the password: SQLAlchemy's password is "p/a1", its host "ss@host".
        (
            "postgresql://u:p/a1@ss@host/db",
            'password "p/a1" for user "u" on "ss@host" refused',
            'password "***" for user "u" on "***@host" refused',
        ),
        # '#' and '?' with a raw '@': the parsed password was skipped when the host had '@'.
        (
            "postgresql://u:pw#x9@ss@host/db",
            "authentication with pw#x9 failed",
            "authentication with *** failed",
        ),
        (
            "postgresql://u:pw?x9@ss@host/db",
            "authentication with pw?x9 failed",
            "authentication with *** failed",
        ),
        # Percent-encoded '@' beside a '/': decoded ("s@c/t9") and typed.
        (
            "postgresql://u:s%40c/t9@x@h/db",
            "bad password s@c/t9 (typed s%40c/t9)",
            "bad password *** (typed ***)",
        ),
        # A password given only in the query string, quoted as typed or decoded.
        (
            "postgresql://u@h/db?sslmode=disable&password=s%2Bx+y9",
            'invalid option "password=s%2Bx+y9" ("s+x y9")',
            'invalid option "password=***" ("***")',
        ),
        # A user name with ':' ("us:er"): its password may be only what follows the last ':'.
        (
            "postgresql://us:er:pw12@h/db",
            'password authentication failed for user "us:er" (pw12)',
            'password authentication failed for user "us:er" (***)',
        ),
    ],
)
def test_redact_text_hides_every_reading_of_the_password(
    url: str, message: str, expected: str
) -> None:
    from dynify.search.storage import redact_text

    assert redact_text(message, url) == expected


def test_redact_text_cuts_a_long_driver_message_at_a_word() -> None:
    from dynify.search.storage import redact_text

    url = f"postgresql://u:{SECRET}@h/db"
    message = f"connection to server failed for {SECRET}: " + "retrying connection " * 40
    text = redact_text(message, url)
    assert SECRET not in text and len(text) <= 160 and text.endswith("…")
    head = text.removesuffix("…").split()
    words = set(message.replace(SECRET, "***").split())
    assert all(word in words for word in head), text  # no word cut in two


def test_a_storage_password_is_in_no_output_of_a_whole_run(files, tmp_path: Path) -> None:
    """A URL with a password in its query string that opens (SQLite ignores it): the search
    runs, and the secret is in nothing it prints or writes."""
    output = tmp_path / "out"
    url = f"sqlite:///{tmp_path / 'db' / 'study.db'}?password={SECRET}"
    code, out, err = run_main(search_args(files, output, "--storage", url, trials=3))
    assert code == 0, err
    assert f"storage sqlite:///{tmp_path / 'db' / 'study.db'}?password=***" in err
    assert SECRET not in out and SECRET not in err
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"study.db", "summary.json", "trials.csv", "best.yaml"}
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), path
    study = optuna.load_study(study_name=None, storage=url.partition("?")[0])
    assert SECRET not in json.dumps(study.user_attrs, default=str)


# A child process runs the real CLI with the training loop raising KeyboardInterrupt (as
# Ctrl-C does) in its second call: during the "mobile" preset, the second trial.
_CTRL_C_IN_SECOND_TRIAL_CLI = """
import sys
import dynify.train
real = dynify.train.finetune
calls = []
def finetune(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        raise KeyboardInterrupt
    return real(*args, **kwargs)
dynify.train.finetune = finetune
from dynify.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_in_a_trial_is_one_line_and_the_trial_runs_on_resume(files, tmp_path) -> None:
    output = tmp_path / "out"
    args = search_args(files, output, trials=3)
    proc = subprocess.run(
        [sys.executable, "-c", _CTRL_C_IN_SECOND_TRIAL_CLI, *args],
        capture_output=True, text=True, timeout=600, env=ENV,
    )  # fmt: skip
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr
    # Progress lines come first on stderr (dynify.logging); the interruption is one line.
    *progress, line = proc.stderr.strip().splitlines()
    assert all("interrupted" not in p and "error" not in p for p in progress), progress
    assert line == (
        "dynify search: interrupted: trial 1 was interrupted; rerun the same command to "
        "resume (it runs that trial again)"
    )
    before = load(output).trials
    assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.FAIL]
    assert before[1].user_attrs["preset"] == "mobile" and before[1].user_attrs["interrupted"]

    code, _, err = run_main(args)  # the same command resumes
    assert code == 0, err
    study = load(output)
    retry = study.trials[2]
    assert retry.user_attrs == {**retry.user_attrs, "preset": "mobile", "retry_of": 1}
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["converted"] == 4
    presets = [t.user_attrs.get("preset") for t in done(study)]
    assert presets[:2] == ["static", "mobile"] and len(done(study)) == 3
    # Queued once: a further run finds the retry and does not queue the trial again.
    assert claims_module.requeue_interrupted(study) == []
    with open(output / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert (rows[1]["interrupted"], rows[2]["retry_of"]) == ("True", "1")


def test_an_interrupted_sampled_trial_is_not_requeued_when_its_plan_finished(
    files, tmp_path: Path
) -> None:
    ctx = prepare(settings_for(files, tmp_path / "out"))
    ctx.presets = []
    study = open_study(ctx, create=True)
    params = {**static_params(ctx), "experts.stage1": 2}
    distributions = {
        k: optuna.distributions.CategoricalDistribution([v]) for k, v in params.items()
    }
    for state, attrs in ((TrialState.FAIL, {"interrupted": True}), (TrialState.FAIL, {})):
        study.add_trial(
            optuna.trial.create_trial(
                state=state, params=params, distributions=distributions, user_attrs=attrs
            )
        )
    assert claims_module.requeue_interrupted(study) == [0]  # the plain failure is not
    assert study.trials[2].state == TrialState.WAITING and study.trials[2].params == {}
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert waiting[0].system_attrs["fixed_params"] == params
    study.add_trial(  # the retry ran elsewhere under another number; no new copy
        optuna.trial.create_trial(
            value=50.0, params=params, distributions=distributions,
            user_attrs={"interrupted": True},
        )
    )  # fmt: skip
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.FAIL, params=params, distributions=distributions,
            user_attrs={"interrupted": True},
        )
    )  # fmt: skip
    assert claims_module.requeue_interrupted(study) == []  # trial 3 finished these params


def _interrupted_study(files, output: Path):
    """A study (no presets) whose one trial, a sampled plan, was interrupted."""
    ctx = prepare(settings_for(files, output))
    ctx.presets = []
    study = open_study(ctx, create=True)
    params = {**static_params(ctx), "experts.stage1": 2}
    distributions = {
        k: optuna.distributions.CategoricalDistribution([v]) for k, v in params.items()
    }
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.FAIL, params=params, distributions=distributions,
            user_attrs={"interrupted": True},
        )
    )  # fmt: skip
    return ctx, study, params


def test_two_resumes_at_once_queue_one_retry(files, tmp_path: Path) -> None:
    """Two threads (each its own storage engine, as two processes have) resume the study at
    the same moment; the enqueue is slowed so that, without taking turns, both would read
    the trials before either queued the retry."""
    import threading

    ctx, _, params = _interrupted_study(files, tmp_path / "out")
    real_enqueue = optuna.Study.enqueue_trial

    def slow_enqueue(self, *args, **kwargs):
        time.sleep(0.5)
        return real_enqueue(self, *args, **kwargs)

    barrier = threading.Barrier(2)
    errors: list[str] = []

    def resume() -> None:
        barrier.wait()
        try:
            open_study(ctx, create=True)
        except Exception as err:  # the failure is the finding
            errors.append(f"{type(err).__name__}: {err}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(optuna.Study, "enqueue_trial", slow_enqueue)
        threads = [threading.Thread(target=resume) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert errors == []
    retries = [t for t in load(tmp_path / "out").trials if t.user_attrs.get("retry_of") == 0]
    assert len(retries) == 1 and retries[0].state == TrialState.WAITING
    assert retries[0].system_attrs["fixed_params"] == params


def test_a_second_retry_of_one_trial_is_not_run(files, tmp_path: Path) -> None:
    """Two resumes on a database server (no shared lock) may both queue a retry: only the
    first runs, the second is marked surplus."""
    from dynify.search.claims import Surplus, claim

    ctx, study, params = _interrupted_study(files, tmp_path / "out")
    for _ in range(2):
        study.enqueue_trial(params, user_attrs={"retry_of": 0})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(claims_module, "objective", lambda trial, ctx: 50.0)
        study.optimize(
            lambda trial: claim(trial, ctx, heartbeat=False), n_trials=2, catch=(Surplus,)
        )
    first, second = study.trials[1:]
    assert (first.state, first.value) == (TrialState.COMPLETE, 50.0)
    assert second.state == TrialState.FAIL
    assert second.user_attrs["surplus"] == "not run: trial 0 is retried by an earlier trial"


def _create_together(settings: SearchSettings) -> tuple[list[int], list[str]]:
    """Two threads (each its own engine, as two processes have) open the storage and create
    or join study "s" at the same moment: the study ids they got, the errors they hit."""
    import threading

    barrier = threading.Barrier(2)
    errors: list[str] = []
    ids: list[int] = []

    def join() -> None:
        barrier.wait()
        try:
            storage = make_storage(settings)
            try:
                ids.append(storage.create_new_study(
                    [optuna.study.StudyDirection.MAXIMIZE], study_name="s"))  # fmt: skip
            except optuna.exceptions.DuplicatedStudyError:
                ids.append(storage.get_study_id_from_name("s"))
        except Exception as err:  # the failure is the finding
            errors.append(f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=join) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return ids, errors


def test_processes_creating_a_new_storage_at_once_all_join(tmp_path: Path) -> None:
    """Several rounds on fresh run folders: both always join the one study (before the lock
    and the retry, most rounds ended in "UNIQUE constraint failed: alembic_version...")."""
    for round_ in range(6):
        folder = tmp_path / f"run{round_}"
        ids, errors = _create_together(SearchSettings(budget=BUDGET, output=str(folder)))
        assert errors == [] and len(ids) == 2 and ids[0] == ids[1], (round_, errors)
        assert sorted(p.name for p in folder.iterdir()) == ["study.db"]  # no lock file left


def test_training_flags_override_the_space(files, tmp_path: Path) -> None:
    ctx = prepare(settings_for(files, tmp_path / "out", epochs=1, train_images=40, val_images=20))
    training = ctx.space.training
    assert (training.epochs, training.train_images, training.val_images) == (1, 40, 20)
    assert (len(ctx.data.train), len(ctx.data.val)) == (40, 20)
    assert training.batch_size == 16 and ctx.notes == []  # the rest is the space's
    # The library names the Python argument; the command line shows it as --epochs.
    with pytest.raises(
        DynifyError, match=r"^epochs must be a positive integer .*, got 0$"
    ) as caught:
        prepare(settings_for(files, tmp_path / "out", epochs=0))
    assert caught.value.arguments == ("epochs",)


def test_a_space_larger_than_the_data_is_scaled_with_a_note(files, tmp_path: Path) -> None:
    """The default space's counts (5,000 held out, 20,000 to train on) against 108 images:
    the split keeps the space's proportion (1 in 5 held out), the run says so, per-epoch
    progress and an estimate are printed, and summary.json records what was used."""
    space = tmp_path / "big.yaml"
    space.write_text(space_yaml(train_images=20000).replace("val_images: 32", "val_images: 5000"))
    output = tmp_path / "out"
    code, out, err = run_main(_with(search_args(files, output, trials=2), ["--space", str(space)]))
    assert code == 0, err
    data = str(files.data)
    assert (
        f"note: data {data!r} has 108 training images, fewer than the space 'big' asks for "
        "(5,000 held out + 20,000 to train on); using 22 held out and 86 to train on "
        "(--val-images and --train-images choose)"
    ) in err
    assert "estimate: 2 trial(s) to run, each up to 2 epoch(s) x 86 images + 22 held out" in err
    assert "images/s (the static model, timed just now on cpu)" in err
    assert "  trial 0 epoch 1/2: held-out top-1 " in err
    assert "  trial 0 epoch 2/2: held-out top-1 " in err
    assert "note: " not in out and "estimate: " not in out
    summary = json.loads((output / "summary.json").read_text())
    assert (summary["training"]["val_images"], summary["training"]["train_images"]) == (22, 86)
    assert "advantage" not in summary["best"] or "22 held-out" in summary["best"]["advantage"]


def test_plots_keep_points_clear_and_label_the_best(run: SimpleNamespace, files) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.ticker import MaxNLocator

    from dynify.search.report import count_label, history_figure, pareto_figure

    assert [count_label(v) for v in (1.2e8, 1.2e9, 9.5e6, 8_196_864, 0.0, 512.0)] == [
        "120M", "1.2G", "9.5M", "8.2M", "0", "512",
    ]  # fmt: skip
    ctx = prepare(settings_for(files, run.output))
    summary = json.loads((run.output / "summary.json").read_text())
    best = run.study.trials[summary["best"]["trial"]]
    label = best.user_attrs.get("preset") or f"trial {best.number}"
    history, pareto = history_figure(run.study, ctx), pareto_figure(run.study, ctx)
    for fig in (history, pareto):
        FigureCanvasAgg(fig).draw()
        (ax,) = fig.axes
        legend = ax.get_legend()
        # The legend lies beside the axes: it covers no point.
        assert legend.get_window_extent().x0 >= ax.get_window_extent().x1
        assert f"best: {label}, {best.value:.2f}%" in [t.get_text() for t in ax.texts]
    locator = history.axes[0].xaxis.get_major_locator()
    assert isinstance(locator, MaxNLocator) and locator._integer
    ticks = [t.get_text() for t in pareto.axes[0].get_xticklabels() if t.get_text()]
    assert ticks and all(t[-1] == "M" for t in ticks), ticks  # 8.2M, not 8.2 with 1e6
    assert pareto.axes[0].xaxis.get_offset_text().get_text() == ""


@pytest.mark.slow
def test_two_commands_started_together_on_a_fresh_folder_share_the_study(files, tmp_path) -> None:
    """Two real ``dynify search`` processes, started at the same moment on a new run folder,
    both join one study (rounds on fresh folders: the storage creation race is timing)."""
    for round_ in range(3):
        output = tmp_path / f"run{round_}"
        procs = [_spawn(files, output, trials=3) for _ in range(2)]
        results = [p.communicate(timeout=900) for p in procs]
        for p, (_, err) in zip(procs, results, strict=True):
            assert p.returncode == 0, err
            assert "UNIQUE constraint" not in err and "already exists" not in err
        _check_shared_study(load(output), 3)


# -- the package: its public API, its layout, its messages, the shared limits ----------------

SEARCH = ROOT / "dynify" / "search"
# The modules of dynify/search in the order they may import one another (docs/search.md).
LAYOUT = [
    "space", "settings", "storage", "data", "trials", "context", "sampling", "training",
    "objective", "claims", "identity", "worker", "report", "progress", "run", "study",
]  # fmt: skip


def test_import_dynify_gives_the_search_and_its_public_api() -> None:
    import importlib

    import dynify.search.run
    import dynify.search.study

    package = importlib.import_module("dynify.search")
    assert dynify.search is package
    assert "search" in dir(package) and set(package.__all__) <= set(dir(package))
    for name in package.__all__:
        assert getattr(package, name) is not None, name
    assert package.search is dynify.search.run.search
    assert package.SearchSettings is SearchSettings is dynify.search.study.SearchSettings
    # The names the former single module had still come from it, the same objects.
    for name in ("prepare", "open_study", "run_worker", "plan_of_trial", "SearchContext"):
        assert getattr(dynify.search.study, name) is getattr(package, name), name
    for name in dynify.search.study.__all__:
        assert getattr(dynify.search.study, name) is not None, name
    with pytest.raises(AttributeError):
        package.no_such_name  # noqa: B018


def _dynify_imports(path: Path) -> tuple[list[str], list[str]]:
    """The dynify modules ``path`` imports at its top level, and those imported elsewhere."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    top, local = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        names = [n for n in names if n == "dynify" or n.startswith("dynify.")]
        (top if node in tree.body else local).extend(names)
    return top, local


def test_the_search_modules_import_one_way_at_their_top() -> None:
    """Every module of dynify/search is in the layout; none imports a dynify module inside a
    function, and each imports only the search modules before it in the layout."""
    found = {p.stem for p in SEARCH.glob("*.py")} - {"__init__"}
    assert found == set(LAYOUT), found ^ set(LAYOUT)
    for index, name in enumerate(LAYOUT):
        top, local = _dynify_imports(SEARCH / f"{name}.py")
        assert local == [], (name, local)
        below = {f"dynify.search.{m}" for m in LAYOUT[:index]}
        for module in top:
            if module.startswith("dynify.search.") and module.count(".") == 2:
                assert module in below, f"{name} imports {module}, which is not above it"
    # The command is a shell over the public API (and the settings' number parsing).
    cli = (ROOT / "dynify" / "cli" / "search.py").read_text(encoding="utf-8")
    assert "dynify.search.study" not in cli and "dynify.search.run" not in cli


def test_search_messages_name_python_arguments_not_flags() -> None:
    """No error or log message under dynify/search names a flag (``--trials``): they name
    the Python argument and list it in ``arguments``; the command line writes the flag. Only
    the rebuild command (a command line to run) holds flags."""
    import ast
    import re

    for path in sorted(SEARCH.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            said = isinstance(node, ast.Raise) or (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("info", "warning", "error", "debug")
            )
            if not said:
                continue
            for leaf in ast.walk(node):
                if isinstance(leaf, ast.Constant) and isinstance(leaf.value, str):
                    assert not re.search(r"--[a-z]", leaf.value), (path.name, leaf.value)


def test_a_bad_setting_names_the_python_argument(files, tmp_path: Path) -> None:
    from dynify.search.settings import parse_number

    with pytest.raises(DynifyError) as caught:
        prepare(settings_for(files, tmp_path / "out", trials=0))
    assert str(caught.value) == (
        "trials must be a positive integer (the number to finish, over every process), got 0"
    )
    assert caught.value.arguments == ("trials",)
    with pytest.raises(DynifyError) as caught:
        prepare(settings_for(files, tmp_path / "out", objectives=("params",)))
    assert caught.value.arguments == ("objectives",) and "--" not in str(caught.value)
    with pytest.raises(DynifyError) as caught:
        parse_number("max_params", "lots")
    assert str(caught.value).startswith("max_params must be a finite number > 0")
    assert str(caught.value).endswith("got 'lots'")
    assert caught.value.arguments == ("max_params",)
    assert isinstance(caught.value.__cause__, DynifyError)  # the budget parser's message
    assert (parse_number("max_params", "30M"), parse_number("trials", "7")) == (3e7, 7)
    assert not (tmp_path / "out").exists()


def test_a_note_names_python_arguments_and_the_command_its_flags(files, tmp_path) -> None:
    space = tmp_path / "big.yaml"
    space.write_text(space_yaml(train_images=20000).replace("val_images: 32", "val_images: 5000"))
    ctx = prepare(settings_for(files, tmp_path / "out", space=str(space)))
    (note,) = ctx.notes
    assert note.endswith("(val_images and train_images choose)")
    assert note.arguments == ("val_images", "train_images")


def test_numeric_limits_have_one_definition() -> None:
    """The command line's limits are dynify/_limits.py's, and so are the search settings'."""
    import dynify._limits as limits
    import dynify.cli as cli
    from dynify.search.settings import NUMERIC_SETTINGS

    for name in ("Limit", "check_limits", "COUNT", "NON_NEGATIVE", "SEED", "POSITIVE",
                 "FRACTION", "SHARE"):  # fmt: skip
        assert getattr(cli, name) is getattr(limits, name), name
    # Each search setting is a shared limit with a note on what the number is.
    shared = {limits.COUNT, limits.POSITIVE, limits.SEED}
    assert all(limit.but(note="") in shared for limit in NUMERIC_SETTINGS.values())
    assert NUMERIC_SETTINGS["seed"].but(note="") == limits.SEED
    with pytest.raises(DynifyError) as caught:
        limits.SEED.check("seed", 2**32)
    assert str(caught.value) == "seed must be an integer in [0, 4294967295], got 4294967296"
    assert caught.value.arguments == ("seed",)
    with pytest.raises(DynifyError) as caught:
        limits.POSITIVE.check("timeout", True)  # a bool is not a number here
    assert caught.value.arguments == ("timeout",)
    # The fine-tuning settings use the same limits.
    from dataclasses import fields

    from dynify.train import FinetuneSettings

    assert all(
        isinstance(f.metadata["accepts"], limits.Limit)
        for f in fields(FinetuneSettings)
        if f.metadata.get("accepts") is not None
    )
    with pytest.raises(DynifyError) as caught:
        limits.check_limits(SimpleNamespace(lr=[0.1, -1.0], none=None), {
            "lr": limits.POSITIVE, "none": limits.COUNT})  # fmt: skip
    assert (str(caught.value), caught.value.arguments) == (
        "lr must be a finite number > 0, got -1.0",
        ("lr",),
    )


def test_training_speed_times_the_steps_it_is_asked_for(files, tmp_path: Path) -> None:
    """A deterministic check of the estimate's timing: one untimed step, then ``steps``; the
    shared starting model is copied, never trained."""
    from dynify.search.training import training_speed

    ctx = prepare(settings_for(files, tmp_path / "out"))
    before = {k: v.clone() for k, v in ctx.base.state_dict().items()}
    forwards: list[int] = []
    handle = ctx.base.register_forward_hook(lambda *_: forwards.append(1))
    try:
        speed = training_speed(ctx, steps=3)
    finally:
        handle.remove()
    assert len(forwards) == 4 and speed > 0
    after = ctx.base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_redaction_parses_the_url_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import dynify.search.storage as storage

    parses: list[str] = []
    real = storage.make_url

    def make_url(url):
        parses.append(url)
        return real(url)

    monkeypatch.setattr(storage, "make_url", make_url)
    url = f"postgresql://u:{SECRET}@h/db?password={SECRET}x"
    text = storage.redact_text(f"cannot connect to {url} as u with {SECRET}", url)
    assert SECRET not in text and "postgresql://u:***@h/db?password=***" in text
    assert parses == [url]

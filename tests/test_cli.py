"""The command line as a whole: a quick ``--help``, Ctrl-C, numeric flags, outputs checked
before any work.

The subprocess tests run the real command (``python -m dynify``) to see what a user sees:
the modules it imported, its exit status, its stderr.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dynify

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("convert", "inspect", "finetune", "search", "fold", "export")


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore"}


def _python(*args: str, cwd: Path | None = None, timeout: float = 120):
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        cwd=cwd,
    )


# -- 1. --help without torch ----------------------------------------------------------------

HEAVY = ("torch", "timm", "optuna", "numpy")


@pytest.mark.parametrize("argv", [["--help"], *([name, "--help"] for name in COMMANDS)])
def test_help_imports_no_heavy_module(argv: list[str]) -> None:
    code = (
        "import sys\n"
        "from dynify.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as done:\n"
        "    assert done.code == 0, done.code\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    proc = _python("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]", proc.stdout[-500:]
    assert "usage: dynify" in proc.stdout


@pytest.mark.parametrize("command", ["convert", "finetune"])
def test_python_m_dynify_help_imports_no_torch(command: str) -> None:
    # What ``python -m dynify COMMAND --help`` runs: dynify/__main__.py as __main__.
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['dynify', {command!r}, '--help']\n"
        "try:\n"
        "    runpy.run_module('dynify', run_name='__main__')\n"
        "except SystemExit as done:\n"
        "    assert done.code == 0, done.code\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    proc = _python("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert f"usage: dynify {command}" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "[]", proc.stdout[-500:]


def test_every_public_name_resolves_lazily() -> None:
    code = (
        "import sys, dynify\n"
        "assert 'torch' not in sys.modules\n"
        "names = dynify.__all__\n"
        "missing = [n for n in names if n not in dir(dynify)]\n"
        "assert not missing, missing\n"
        "for n in names:\n"
        "    getattr(dynify, n)\n"
        "from dynify import *\n"
        "print(len(names), 'torch' in sys.modules)\n"
    )
    proc = _python("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(len(dynify.__all__)), "True"]


def test_public_names_are_the_defining_modules_objects() -> None:
    from dynify.artifact import load, save
    from dynify.convert import apply, make_plan, plan_of
    from dynify.errors import DynifyError
    from dynify.layers import DynamicConv2d, KernelAttention
    from dynify.recipe import load_recipe
    from dynify.routing import routing_report
    from dynify.trace import trace_model
    from dynify.train.temperature import TemperatureScheduler

    expected = [apply, make_plan, plan_of, load, save, DynifyError, DynamicConv2d]
    expected += [KernelAttention, load_recipe, routing_report, TemperatureScheduler, trace_model]
    for obj in expected:
        assert getattr(dynify, obj.__name__) is obj, obj.__name__
    assert set(dynify.__all__) == {*dynify._SOURCES, *dynify._SUBPACKAGES, "__version__"}
    assert dynify.artifact.read_info is not None  # public submodules stay reachable
    with pytest.raises(AttributeError, match="no_such_name"):
        dynify.no_such_name  # noqa: B018


# -- 2. Ctrl-C ------------------------------------------------------------------------------


def _interrupt(argv: list[str], *, delay: float, cwd: Path) -> tuple[int, str]:
    proc = subprocess.Popen(
        [sys.executable, *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=cwd,
        # A shell's background job ignores SIGINT, and a child would inherit that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


CONSOLE_SCRIPT = "import sys; from dynify.cli import main; sys.exit(main())"


# Not earlier than about half a second: before that the interpreter itself is starting (and
# a console script's own first line runs), which no program can guard.
@pytest.mark.parametrize("delay", [0.6, 1.5, 3.0])
@pytest.mark.parametrize("launcher", [["-m", "dynify"], ["-c", CONSOLE_SCRIPT]])
def test_ctrl_c_early_is_one_line_and_130(tmp_path: Path, launcher: list[str], delay: float):
    argv = [*launcher, "convert", "resnet18", "--input-size", "3,32,32"]
    code, err = _interrupt(argv, delay=delay, cwd=tmp_path)
    # 130, or ended by SIGINT itself, which a shell reports as 130 too: after an interrupt at
    # some points of torch's import (seen about 2 s in), Python ends itself that way at exit
    # although dynify caught the KeyboardInterrupt and printed its line.
    assert code in (130, -signal.SIGINT), err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["dynify convert: interrupted"], err
    assert list(tmp_path.iterdir()) == []


# -- 3. numeric flags, 7. outputs: refused in one line before any work -----------------------


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Building a model, reading data or an artifact fails the test: the refusal must come
    first. Runs in an empty folder, returned (nothing may be created in it)."""
    import dynify.artifact
    import dynify.models
    import dynify.train
    import dynify.train.data

    def work(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started before the bad input was refused")

    monkeypatch.setattr(dynify.models, "create_model", work)
    monkeypatch.setattr(dynify.artifact, "load", work)
    monkeypatch.setattr(dynify.artifact, "read_info", work)
    monkeypatch.setattr(dynify.train, "load_data", work)
    monkeypatch.setattr(dynify.train.data, "load_data", work)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _refused(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    from dynify.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"dynify {argv[0]}: error: "), err
    return lines[0]


FINETUNE = ["finetune", "test_resnet", "--data", "imgs", "--epochs", "1"]
CONVERT = ["convert", "resnet18"]
INSPECT = ["inspect", "resnet18"]

BAD_NUMBERS = [
    (CONVERT, ["--num-classes", "0"], "--num-classes must be a positive integer, got 0"),
    (CONVERT, ["--seed", "-1"], "--seed must be an integer in [0, 4294967295], got -1"),
    (CONVERT, ["--seed", str(2**70)], f"--seed must be an integer in [0, 4294967295], got {2**70}"),
    (INSPECT, ["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (INSPECT, ["--repeats", "0"], "--repeats must be a positive integer, got 0"),
    (INSPECT, ["--num-classes", "-3"], "--num-classes must be a positive integer, got -3"),
    (INSPECT, ["--routing-images", "0"], "--routing-images must be a positive integer, got 0"),
    (INSPECT, ["--img-size", "0"], "--img-size must be a positive integer, got 0"),
    (FINETUNE[:-1], ["0"], "--epochs must be a positive integer, got 0"),
    (FINETUNE[:-1], ["-2"], "--epochs must be a positive integer, got -2"),
    (
        FINETUNE,
        ["--workers", "-1"],
        "--workers must be an integer >= 0 (0: load in this process), got -1",
    ),
    (FINETUNE, ["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (FINETUNE, ["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
    (FINETUNE, ["--lr", "-0.1"], "--lr must be a finite number > 0, got -0.1"),
    (FINETUNE, ["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (FINETUNE, ["--img-size", "0"], "--img-size must be a positive integer, got 0"),
    (FINETUNE, ["--crop-pct", "0"], "--crop-pct must be a finite number in (0, 1], got 0.0"),
    (FINETUNE, ["--crop-pct", "1.5"], "--crop-pct must be a finite number in (0, 1], got 1.5"),
    (
        FINETUNE,
        ["--aug-scale", "0", "1"],
        "--aug-scale must be two numbers in (0, 1] (MIN MAX), got [0.0, 1.0]",
    ),
    (
        FINETUNE,
        ["--aug-scale", "0.5", "2"],
        "--aug-scale must be two numbers in (0, 1] (MIN MAX), got [0.5, 2.0]",
    ),
    (FINETUNE, ["--aug-scale", "0.9", "0.5"], "--aug-scale 0.9 0.5: MIN must be <= MAX"),
    (FINETUNE, ["--train-images", "0"], "--train-images must be a positive integer, got 0"),
    (FINETUNE, ["--val-images", "-5"], "--val-images must be a positive integer, got -5"),
    (FINETUNE, ["--holdout", "0"], "--holdout must be a finite number in (0, 1), got 0.0"),
    (FINETUNE, ["--holdout", "1"], "--holdout must be a finite number in (0, 1), got 1.0"),
    (
        FINETUNE,
        ["--weight-decay=-1e-4"],
        "--weight-decay must be a finite number >= 0, got -0.0001",
    ),
    (FINETUNE, ["--warmup-epochs", "-1"], "--warmup-epochs must be an integer >= 0, got -1"),
    (FINETUNE, ["--smoothing", "1"], "--smoothing must be a finite number in [0, 1), got 1.0"),
    (FINETUNE, ["--smoothing", "-0.1"], "--smoothing must be a finite number in [0, 1), got -0.1"),
    (FINETUNE, ["--clip-grad", "0"], "--clip-grad must be a finite number > 0, got 0.0"),
    (
        FINETUNE,
        ["--distill-weight", "1.5"],
        "--distill-weight must be a finite number in [0, 1], got 1.5",
    ),
    (
        FINETUNE,
        ["--distill-temperature", "0"],
        "--distill-temperature must be a finite number > 0, got 0.0",
    ),
    (FINETUNE, ["--routing-images", "-1"], "--routing-images must be an integer >= 0, got -1"),
    (FINETUNE, ["--seed", "-1"], "--seed must be an integer in [0, 4294967295], got -1"),
    (
        FINETUNE,
        ["--seed", "4294967296"],
        "--seed must be an integer in [0, 4294967295], got 4294967296",
    ),
    (FINETUNE, ["--num-classes", "0"], "--num-classes must be a positive integer, got 0"),
]


@pytest.mark.parametrize(
    ("command", "flag", "message"),
    BAD_NUMBERS,
    ids=[f"{c[0]}{' '.join(f)}" for c, f, _ in BAD_NUMBERS],
)
def test_nonsensical_numbers_are_refused_before_work(
    capsys, no_work: Path, command: list[str], flag: list[str], message: str
) -> None:
    line = _refused(capsys, [*command, *flag])
    assert line.endswith(message), line
    assert list(no_work.iterdir()) == []


def test_library_refuses_negative_workers_and_lr(tmp_path: Path) -> None:
    from torch import nn

    from dynify.errors import DynifyError
    from dynify.train import evaluate, finetune

    model = nn.Linear(2, 2)
    with pytest.raises(DynifyError, match=r"workers must be an integer >= 0.*got -1"):
        finetune(model=model, data=tmp_path, epochs=1, workers=-1)
    with pytest.raises(DynifyError, match=r"workers must be an integer >= 0.*got -1"):
        evaluate(model=model, data=tmp_path, workers=-1)
    with pytest.raises(DynifyError, match=r"lr must be a finite number > 0, got -1"):
        finetune(model=model, data=tmp_path, epochs=1, lr=-1, workers=0)


def _in_the_way(root: Path) -> dict[str, Path]:
    """A folder, a regular file, and a path under that file."""
    (root / "folder").mkdir()
    (root / "file").write_text("in the way\n")
    return {"folder": root / "folder", "file": root / "file", "under": root / "file" / "x"}


OUTPUTS = [
    (["convert", "resnet18", "--output"], "folder", "is a folder; give a file name"),
    (["convert", "resnet18", "--output"], "under", "is a file, not a folder"),
    (["convert", "--from", "a.safetensors", "--output"], "folder", "is a folder"),
    (["finetune", "test_resnet", "--data", "d", "--epochs", "1", "--output"], "file", "is a file"),
    (["finetune", "test_resnet", "--data", "d", "--epochs", "1", "--output"], "under", "a file,"),
    (["inspect", "a.safetensors", "--data", "d", "--plot"], "folder", "is a folder"),
    (["inspect", "a.safetensors", "--data", "d", "--plot"], "under", "is a file, not a folder"),
]


@pytest.mark.parametrize(("argv", "where", "message"), OUTPUTS)
def test_outputs_are_checked_before_any_work(
    capsys, no_work: Path, argv: list[str], where: str, message: str
) -> None:
    paths = _in_the_way(no_work)
    before = sorted(str(p.relative_to(no_work)) for p in no_work.rglob("*"))
    start = time.perf_counter()
    line = _refused(capsys, [*argv, str(paths[where])])
    assert time.perf_counter() - start < 5
    flag = argv[-1]
    assert f"{flag} {str(paths[where])!r}" in line and message in line, line
    assert sorted(str(p.relative_to(no_work)) for p in no_work.rglob("*")) == before
    assert (no_work / "file").read_text() == "in the way\n"


def test_default_outputs_are_checked_too(capsys, no_work: Path) -> None:
    # convert's default <model>.dynify.safetensors and finetune's runs/<model>-<recipe>.
    (no_work / "resnet18.dynify.safetensors").mkdir()
    line = _refused(capsys, ["convert", "resnet18"])
    assert "--output 'resnet18.dynify.safetensors' is a folder" in line
    (no_work / "runs").write_text("")
    line = _refused(capsys, ["finetune", "test_resnet", "--data", "d", "--epochs", "1"])
    assert "--output 'runs/test_resnet-dycnn'" in line and "is a file, not a folder" in line


def test_closed_stdout_is_no_traceback(tmp_path: Path) -> None:
    # ``dynify convert ... | head -0``: the reader is gone before the plan (more than a pipe
    # buffer's worth) is printed.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "dynify", "convert", "resnet18", "--input-size", "3,32,32"],
            cwd=tmp_path,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            env=_env(),
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode == 1
    assert list(tmp_path.iterdir()) == []  # stopped at the plan, before the artifact


def test_an_interrupt_in_process_leaves_the_callers_ctrl_c(monkeypatch, capsys) -> None:
    import signal

    from dynify import cli
    from dynify.cli import convert

    def interrupt(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "run", interrupt)
    before = signal.getsignal(signal.SIGINT)
    assert cli.main(["convert", "resnet18"]) == 130
    assert signal.getsignal(signal.SIGINT) is before
    assert capsys.readouterr().err.strip() == "dynify convert: interrupted"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["convert", "resnet18", "--nosuchflag"], "unrecognized arguments: --nosuchflag"),
        (["inspect", "resnet18", "--budget", "-5MFLOPs"], "argument --budget: expected one"),
        (["finetune", "resnet18", "--epochs", "x"], "argument --epochs: invalid int value"),
        (["nosuchcommand"], "invalid choice: 'nosuchcommand'"),
    ],
)
def test_argparse_errors_are_one_line_without_usage(capsys, argv: list[str], message: str):
    from dynify.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "usage:" not in err, err
    assert message in err and "--help" in err, err


def test_input_sizes_beyond_the_plan_bounds_are_refused(capsys, no_work: Path) -> None:
    line = _refused(capsys, ["convert", "resnet18", "--input-size", "3,100000,100000"])
    assert line.endswith("C from 1 to 4096 and H, W from 1 to 8192, got '3,100000,100000'"), line


def test_an_allocation_that_fails_is_one_line_and_a_bug_is_not(monkeypatch, capsys) -> None:
    from dynify import cli
    from dynify.cli import convert

    def out_of_memory(args):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
            "you tried to allocate 30720000000000 bytes."
        )

    monkeypatch.setattr(convert, "run", out_of_memory)
    assert cli.main(["convert", "resnet18"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dynify convert: error: out of memory (") and "\n" not in err
    assert "--batch-size" in err

    def bug(args):
        raise RuntimeError("shape mismatch in some layer")

    monkeypatch.setattr(convert, "run", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        cli.main(["convert", "resnet18"])


@pytest.mark.parametrize(
    "argv",
    [
        ["convert", "resnet18", "--output", ""],
        ["finetune", "test_resnet", "--data", "d", "--epochs", "1", "--output", ""],
        ["inspect", "a.safetensors", "--data", "d", "--plot", " "],
    ],
    ids=["convert", "finetune", "inspect"],
)
def test_an_empty_output_is_refused_not_replaced_by_the_default(
    capsys, no_work: Path, argv: list[str]
) -> None:
    line = _refused(capsys, argv)
    assert line.endswith(
        f"{argv[-2]} is empty; give a " + ("folder path" if "finetune" in argv else "file path")
    ), line
    assert list(no_work.iterdir()) == []


def test_argument_names_become_flags_outside_quotes_only() -> None:
    from dynify.cli import build_parser, command_flags, with_flags

    flags = command_flags(build_parser(), "finetune")
    assert flags["batch_size"] == "--batch-size" and flags["clip_grad"] == "--clip-grad"
    assert "augment" not in flags  # only --no-aug sets it, which says the opposite
    message = "output 'runs/output/x' is a folder; give output a file (batch_size=3)"
    assert with_flags(message, ("output", "batch_size", "augment"), flags) == (
        "--output 'runs/output/x' is a folder; give --output a file (--batch-size=3)"
    )
    assert with_flags("outputs and output_dir", ("output",), flags) == "outputs and output_dir"
    assert with_flags(message, (), flags) == message


def test_log_messages_that_name_arguments_show_flags(monkeypatch, capsys) -> None:
    """A library log record with ``extra={"arguments": ...}`` reads with the command's flags
    while that command runs, and with Python names otherwise."""
    import argparse

    from dynify.cli import convert as convert_command
    from dynify.cli import main
    from dynify.logging import get_logger

    logger = get_logger("dynify.test_note")

    def run(args: argparse.Namespace) -> int:
        logger.info("input_size is large", extra={"arguments": ("input_size",)})
        return 0

    real = convert_command.add_parser

    def add_parser(subparsers: argparse._SubParsersAction) -> None:
        real(subparsers)
        subparsers.choices["convert"].set_defaults(run=run)

    monkeypatch.setattr(convert_command, "add_parser", add_parser)
    assert main(["convert", "resnet18"]) == 0
    assert "--input-size is large" in capsys.readouterr().err
    logger.info("input_size is large", extra={"arguments": ("input_size",)})
    assert "--input-size" not in capsys.readouterr().err

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
COMMANDS = ("convert", "inspect", "finetune", "search")


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
    from dynify.schedule import TemperatureScheduler
    from dynify.trace import trace_model

    expected = [apply, make_plan, plan_of, load, save, DynifyError, DynamicConv2d]
    expected += [KernelAttention, load_recipe, routing_report, TemperatureScheduler, trace_model]
    for obj in expected:
        assert getattr(dynify, obj.__name__) is obj, obj.__name__
    assert set(dynify.__all__) == {*dynify._SOURCES, "__version__"}
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


@pytest.mark.parametrize("delay", [0.2, 0.6, 1.5])
@pytest.mark.parametrize("launcher", [["-m", "dynify"], ["-c", CONSOLE_SCRIPT]])
def test_ctrl_c_early_is_one_line_and_130(tmp_path: Path, launcher: list[str], delay: float):
    argv = [*launcher, "convert", "resnet18", "--input-size", "3,32,32"]
    code, err = _interrupt(argv, delay=delay, cwd=tmp_path)
    assert code == 130, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["dynify convert: interrupted"], err
    assert list(tmp_path.iterdir()) == []

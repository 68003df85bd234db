"""Writes killed half-way: a writer killed with SIGKILL leaves its temporaries behind (dynify's
and, for artifacts, safetensors' own), and the next write to the same target removes them;
a live writer's temporaries are never touched; artifacts get the umask-based file mode.

The killed writers are real child processes whose writer (safetensors' ``save_file``, or
``torch.save``) is replaced by one that writes part of a file and then waits to be killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import dynify
from dynify._io import _HOST, atomic_write_text, remove_stale_temporaries
from dynify.train import checkpoint

ROOT = Path(__file__).resolve().parents[1]
SIZE = (3, 32, 32)

# safetensors' serialize_file writes the whole file to a NamedTempFile (".tmpXXXXXX") in
# the folder of the path it is given, then renames it: this does the same, up to the wait.
_SLOW_SAFETENSORS = """
import os, tempfile, time
import safetensors.torch

def slow_save_file(tensors, filename, metadata=None):
    fd, tmp = tempfile.mkstemp(prefix=".tmp", dir=os.path.dirname(filename) or ".")
    os.write(fd, b"half a file" * 100_000)
    print("writing", flush=True)
    time.sleep(600)

safetensors.torch.save_file = slow_save_file
import timm, dynify
model = dynify.apply(timm.create_model("resnet18", num_classes=3), "mobile", input_size=(3, 32, 32))
dynify.save(model, TARGET)
"""

_SLOW_TORCH_SAVE = """
import time
import torch

def slow_save(obj, f, *args, **kwargs):
    f.write(b"half a checkpoint" * 100_000)
    f.flush()
    print("writing", flush=True)
    time.sleep(600)

torch.save = slow_save
from dynify.train import checkpoint
checkpoint.write(TARGET, {"epoch": 1})
"""


def _start_writer(script: str, target: Path) -> subprocess.Popen:
    """A child process that starts writing ``target`` and blocks half-way."""
    code = f"TARGET = {str(target)!r}\n" + textwrap.dedent(script)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != b"writing":
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the writer did not start: {err.decode()[-2000:]}")
    return proc


@pytest.fixture
def writers() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@pytest.fixture(scope="module")
def converted() -> nn.Module:
    model = timm.create_model("resnet18", num_classes=3).eval()
    return dynify.apply(model, "mobile", input_size=SIZE)


def test_killed_artifact_write_is_cleaned_up_by_the_next(
    converted: nn.Module, tmp_path: Path, writers: list
) -> None:
    target = tmp_path / "model.safetensors"
    proc = _start_writer(_SLOW_SAFETENSORS, target)
    writers.append(proc)
    _kill(proc)
    left = _entries(tmp_path)
    # What the killed process left: dynify's temporary, holding safetensors' own.
    assert len(left) == 1 and left[0].startswith(".model.safetensors.") and not target.exists()
    holder = tmp_path / left[0]
    assert [p.name[:4] for p in holder.iterdir()] == [".tmp"]
    dynify.save(converted, target)
    assert _entries(tmp_path) == ["model.safetensors"]


def test_killed_checkpoint_write_is_cleaned_up_by_the_next(tmp_path: Path, writers: list) -> None:
    target = tmp_path / checkpoint.CHECKPOINT_NAME
    proc = _start_writer(_SLOW_TORCH_SAVE, target)
    writers.append(proc)
    _kill(proc)
    left = _entries(tmp_path)
    assert len(left) == 1 and left[0].startswith(f".{checkpoint.CHECKPOINT_NAME}.")
    assert (tmp_path / left[0]).stat().st_size > 1_000_000
    checkpoint.write(target, {"epoch": 2, "weights": torch.zeros(3)})
    assert _entries(tmp_path) == [checkpoint.CHECKPOINT_NAME]
    assert checkpoint.read(target)["epoch"] == 2


def test_a_live_writers_temporaries_are_left_alone(
    converted: nn.Module, tmp_path: Path, writers: list
) -> None:
    target = tmp_path / "model.safetensors"
    proc = _start_writer(_SLOW_SAFETENSORS, target)
    writers.append(proc)
    theirs = _entries(tmp_path)
    assert len(theirs) == 1
    dynify.save(converted, target)  # another process writes the same target meanwhile
    assert _entries(tmp_path) == sorted([*theirs, "model.safetensors"])
    assert remove_stale_temporaries(target) == []
    _kill(proc)
    assert remove_stale_temporaries(target) == [tmp_path / theirs[0]]
    assert _entries(tmp_path) == ["model.safetensors"]


def test_only_temporaries_of_the_same_target_are_removed(tmp_path: Path, writers: list) -> None:
    other = tmp_path / "other.pth"
    proc = _start_writer(_SLOW_TORCH_SAVE, other)
    writers.append(proc)
    _kill(proc)
    theirs = _entries(tmp_path)
    (tmp_path / ".tmpabc123").write_text("someone else's")  # not attributable: kept
    atomic_write_text(tmp_path / "notes.txt", "x")
    assert _entries(tmp_path) == sorted([*theirs, ".tmpabc123", "notes.txt"])


def test_artifact_gets_the_umask_mode_as_checkpoints_do(
    converted: nn.Module, tmp_path: Path
) -> None:
    artifact = dynify.save(converted, tmp_path / "model.safetensors")
    ckpt = tmp_path / "checkpoint.pth"
    checkpoint.write(ckpt, {"epoch": 1})
    assert artifact.stat().st_mode & 0o777 == _umask_mode()
    assert ckpt.stat().st_mode & 0o777 == _umask_mode()


_LOCK_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(os.name == "nt", reason="no flock: temporaries are never removed")
@pytest.mark.parametrize("folder", [False, True])
def test_a_live_writer_whose_pid_looks_dead_is_left_alone(tmp_path: Path, folder: bool) -> None:
    """Another container sharing this folder and host name: its writer's pid does not exist
    here, but it holds its temporary's lock, so the temporary is kept; once that process
    dies (the kernel drops the lock) the next write removes it."""
    target = tmp_path / "model.safetensors"
    theirs = tmp_path / f".model.safetensors.{_HOST}.999999999.abc123.tmp"
    if folder:
        theirs.mkdir()
        (theirs / ".tmpXYZ").write_bytes(b"half a file")
    else:
        theirs.write_bytes(b"half a file")
    holder = subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, str(theirs)], stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"locked"
        assert remove_stale_temporaries(target) == []
        atomic_write_text(target, "mine")
        assert theirs.exists() and target.read_text() == "mine"
    finally:
        holder.kill()
        holder.wait(timeout=30)
        assert holder.stdout is not None
        holder.stdout.close()
    assert remove_stale_temporaries(target) == [theirs]
    assert _entries(tmp_path) == ["model.safetensors"]

"""Output checks before any work, and one-line errors when a write fails."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dynify._io import atomic_write_text, ensure_writable
from dynify.errors import DynifyError


def test_new_file_in_new_folders_is_accepted_and_nothing_is_created(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out.txt"
    assert ensure_writable(target) == target
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("make", "folder", "message"),
    [
        (lambda d: d, False, "is a folder; give a file name"),
        (lambda d: _file(d / "f"), True, "is a file; give a folder"),
        (lambda d: _file(d / "f") / "out.txt", False, "is a file, not a folder"),
        (lambda d: _file(d / "f") / "x" / "y", True, "is a file, not a folder"),
        (lambda d: Path("/dev/null"), False, "is not a regular file"),
    ],
)
def test_paths_in_the_way_are_one_line(tmp_path: Path, make, folder: bool, message: str) -> None:
    target = make(tmp_path)
    with pytest.raises(DynifyError, match=message) as err:
        ensure_writable(target, what="--output", folder=folder)
    assert "--output" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(DynifyError, match="not writable"):
            ensure_writable(ro / "sub" / "out.txt")
    finally:
        ro.chmod(0o700)


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    import errno

    def full(self, data, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(DynifyError, match=r"could not write .*out.txt.*No space left"):
        atomic_write_text(tmp_path / "out.txt", "x")
    assert list(tmp_path.iterdir()) == []


def _file(path: Path) -> Path:
    path.write_text("x")
    return path


# A child process whose files may not grow past LIMIT bytes (RLIMIT_FSIZE, SIGXFSZ ignored
# so that the write fails with EFBIG, "File too large", as on a full disk): it writes an
# artifact or a checkpoint bigger than that, and prints the one line it got.
_LIMITED_WRITER = """
import resource, signal, sys
import torch
import dynify
from dynify.errors import DynifyError
from dynify.train import checkpoint

KIND, TARGET = sys.argv[1], sys.argv[2]
model = dynify.apply(torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.Conv2d(64, 64, 3)),
                     {"defaults": {"convert": True}}, input_size=(3, 16, 16))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    if KIND == "artifact":
        dynify.save(model, TARGET, model_name="test_resnet")
    else:
        checkpoint.write(TARGET, {"model": model.state_dict()})
except DynifyError as err:
    print(err)
    sys.exit(2)
"""


@pytest.mark.parametrize("kind", ["artifact", "checkpoint"])
def test_a_write_past_the_file_size_limit_is_one_line_and_leaves_nothing(
    tmp_path: Path, kind: str
) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    target = tmp_path / ("model.safetensors" if kind == "artifact" else "checkpoint.pth")
    proc = subprocess.run(
        [sys.executable, "-c", _LIMITED_WRITER, kind, str(target)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root), "PYTHONWARNINGS": "ignore"},
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stdout.strip() == f"could not write {str(target)!r}: File too large"
    assert list(tmp_path.iterdir()) == []

"""Atomic file output: write to a temporary name beside the target, then rename.

A crash or a bad input half-way never leaves a truncated file under the final name. Commands
call :func:`ensure_writable` on their outputs before any work, so that a folder in the way or
a read-only location is one line at the start rather than a traceback after an epoch; an OS
error during the write itself (a full disk) is one line too.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from dynify.errors import DynifyError

__all__ = [
    "atomic_path",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "ensure_writable",
]


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (what a later ``mkdir -p`` would build on)."""
    current = path.absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def ensure_writable(
    path: str | os.PathLike[str], *, what: str = "output", folder: bool = False
) -> Path:
    """Check, without creating anything, that ``path`` can be written; return it as a Path.

    Args:
        path: the file (or, with ``folder=True``, the folder) a command will write.
        what: how the message names it (e.g. ``"--output"``).
        folder: the output is a folder of files rather than one file.

    Raises:
        DynifyError: one line naming the path and what is in the way.
    """
    target = Path(path)
    if target.exists():
        if folder and not target.is_dir():
            raise DynifyError(f"{what} {str(target)!r} is a file; give a folder (new or existing)")
        if not folder and target.is_dir():
            raise DynifyError(f"{what} {str(target)!r} is a folder; give a file name")
        if not folder and not target.is_file():
            # A device or a pipe: replacing it by rename would be wrong, and as root harmful.
            raise DynifyError(f"{what} {str(target)!r} is not a regular file; give a file name")
    # The folder that will receive a new entry: the target folder itself, or the closest
    # existing folder above the path (a later mkdir -p builds the rest).
    if folder and target.is_dir():
        receiver = target
    elif target.exists():
        receiver = target.parent
    else:
        receiver = _nearest_existing(target.parent)
    if not receiver.is_dir():
        raise DynifyError(
            f"{what} {str(target)!r}: {str(receiver)!r} is a file, not a folder; "
            f"choose another path"
        )
    if not os.access(receiver, os.W_OK | os.X_OK):
        raise DynifyError(
            f"{what} {str(target)!r}: the folder {str(receiver)!r} is not writable; "
            f"choose another path"
        )
    return target


def _write_error(target: Path, err: OSError) -> DynifyError:
    reason = err.strerror or str(err) or type(err).__name__
    return DynifyError(f"could not write {str(target)!r}: {reason}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it over ``path`` on success."""
    target = Path(path)
    ensure_writable(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as err:
        raise _write_error(target, err) from err
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates the file private (0600); give it the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except OSError as err:
        raise _write_error(target, err) from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    import torch

    with atomic_path(path) as tmp:
        f: IO[bytes]
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())

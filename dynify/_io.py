"""Atomic file output: write to a temporary name beside the target, then rename.

A crash or a bad input half-way never leaves a truncated file under the final name. Commands
call :func:`ensure_writable` on their outputs before any work, so that a folder in the way or
a read-only location is one line at the start rather than a traceback after an epoch; an OS
error during the write itself (a full disk) is one line too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from dynify.errors import DynifyError, shorten

__all__ = [
    "atomic_path",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "ensure_writable",
    "remove_stale_temporaries",
    "write_error",
]

logger = logging.getLogger(__name__)


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
        what: how the message names it: the Python argument (``"output"``, listed in the
            error's ``arguments``, so the command line shows its flag) or a flag.
        folder: the output is a folder of files rather than one file.

    Raises:
        DynifyError: one line naming the path and what is in the way.
    """
    arguments = (what,) if what.isidentifier() else ()
    if not str(path).strip():
        raise DynifyError(
            f"{what} is empty; give a {'folder' if folder else 'file'} path", arguments=arguments
        )
    target = Path(path)
    if target.exists():
        if folder and not target.is_dir():
            raise DynifyError(
                f"{what} {str(target)!r} is a file; give a folder (new or existing)",
                arguments=arguments,
            )
        if not folder and target.is_dir():
            raise DynifyError(
                f"{what} {str(target)!r} is a folder; give a file name", arguments=arguments
            )
        if not folder and not target.is_file():
            # A device or a pipe: replacing it by rename would be wrong, and as root harmful.
            raise DynifyError(
                f"{what} {str(target)!r} is not a regular file; give a file name",
                arguments=arguments,
            )
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
            f"choose another path",
            arguments=arguments,
        )
    if not os.access(receiver, os.W_OK | os.X_OK):
        raise DynifyError(
            f"{what} {str(target)!r}: the folder {str(receiver)!r} is not writable; "
            f"choose another path",
            arguments=arguments,
        )
    return target


def write_error(target: str | os.PathLike[str], err: BaseException) -> DynifyError:
    """The one line for a write of ``target`` that failed with ``err``: an OSError (a full
    disk, a file-size limit), or another library's wrapping of one (safetensors'
    ``SafetensorError: ... I/O error: File too large (os error 27)``, torch's
    ``RuntimeError: [enforce fail at inline_container.cc]`` raised while handling it)."""
    cause = err if isinstance(err, OSError) else err.__cause__ or err.__context__
    if isinstance(cause, OSError):
        reason = cause.strerror or str(cause) or type(cause).__name__
    else:
        text = str(err)
        io_error = re.search(r"I/O error: (.*?)(?: \(os error \d+\))?$", text)
        reason = io_error[1] if io_error else shorten(text, 120) or type(err).__name__
    return DynifyError(f"could not write {str(target)!r}: {reason}")


# Temporaries are named ``.<target name>.<host>.<pid>.<random>.tmp`` (which target they
# belong to, and for a person who finds one, whose) and their writer holds an exclusive
# flock on each for the whole write. A later write to the same target removes those whose
# lock it can take: the kernel releases a lock when its holder dies (SIGKILL, out of
# memory), so a free lock means an abandoned temporary, whichever host or container wrote
# it, whereas a pid says nothing across containers sharing a folder and a host name. Where
# there is no flock (Windows), nothing is ever removed.
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]


def _temporary_pattern(target: Path) -> re.Pattern[str]:
    return re.compile(
        rf"\.{re.escape(target.name)}\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.\w+\.tmp"
    )


def _lock(path: Path, *, wait: bool) -> int | None:
    """An open descriptor of ``path`` (a file or a folder, never through a symlink) holding
    its exclusive flock, or ``None`` when another holds it (``wait=False``) or it cannot be
    opened."""
    assert fcntl is not None
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    if path.is_dir() and not path.is_symlink():
        flags |= getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:  # BlockingIOError: a live writer holds it
        os.close(fd)
        return None
    return fd


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries an earlier, killed writer of ``path`` left beside it.

    Only temporaries of this very target whose flock nobody holds are removed (a file, or
    the folder of a writer that makes its own temporaries, such as safetensors); a live
    writer's, which holds its lock, are never touched. Returns what was removed.
    """
    target = Path(path)
    removed: list[Path] = []
    if fcntl is None:
        return removed
    pattern = _temporary_pattern(target)
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if pattern.fullmatch(entry.name) is None:
            continue
        fd = _lock(entry, wait=False)
        if fd is None:
            continue
        try:  # removed while holding the lock, so no writer can take it over meanwhile
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            pass
        finally:
            os.close(fd)
    if removed:
        logger.info("removed %d temporary file(s) a killed writer of %s left", len(removed), target)
    return removed


def _umask_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, private_folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success.

    Args:
        path: the file to write.
        private_folder: yield a path inside a temporary folder of its own, for writers that
            make temporaries of their own beside the file they are given (safetensors writes
            to a ``.tmpXXXXXX`` file in that folder, then renames it): a crash then leaves
            everything inside the one folder, which a later write removes.

    The temporary is flock-ed for the whole write; temporaries of the same target whose lock
    is free (their writer was killed) are removed first (:func:`remove_stale_temporaries`).
    The file gets the mode a plain ``open()`` would give it, whoever created it.
    """
    target = Path(path)
    ensure_writable(target)
    prefix = f".{target.name}.{_HOST}.{os.getpid()}."
    lock: int | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target)
        # The lock is held until the temporary is gone (how a later write tells it is not
        # abandoned), taken at once so that a concurrent cleanup has no time to see it free.
        if private_folder:
            holder = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=target.parent))
            tmp_path = holder / target.name
            lock = None if fcntl is None else _lock(holder, wait=True)
        else:
            fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=target.parent)
            holder = tmp_path = Path(tmp)
            if fcntl is None:
                os.close(fd)
            else:
                lock = fd
                fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as err:
        raise write_error(target, err) from err
    try:
        yield tmp_path
        # mkstemp (and safetensors' own temporary) create files private (0600).
        os.chmod(tmp_path, _umask_mode())
        os.replace(tmp_path, target)
    except OSError as err:
        raise write_error(target, err) from err
    finally:
        with contextlib.suppress(OSError):
            if private_folder:
                shutil.rmtree(holder)
            else:
                holder.unlink()
        if lock is not None:
            os.close(lock)


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
            try:
                torch.save(obj, f)
            except RuntimeError as err:
                # torch's writer turns a failed write (a full disk) into its own error.
                if not isinstance(err.__cause__ or err.__context__, OSError):
                    raise
                raise write_error(path, err) from err
            f.flush()
            os.fsync(f.fileno())

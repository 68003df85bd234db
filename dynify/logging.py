"""dynify's messages go through :mod:`logging`, as Optuna's do.

Every module logs to ``logging.getLogger(__name__)`` (a child of the ``"dynify"`` logger),
never to ``print``. By default the ``"dynify"`` logger has one handler that writes INFO and
above to ``sys.stderr`` (looked up at each message, so pytest's capture and a redirected
stderr both see it): progress lines as they are, warnings prefixed ``warning:``. A caller
silences or redirects it the usual ways::

    import logging
    logging.getLogger("dynify").setLevel(logging.WARNING)   # progress off
    dynify.logging.disable_default_handler()                 # route to your own handlers
"""

from __future__ import annotations

import logging
import sys
import threading

__all__ = [
    "disable_default_handler",
    "enable_default_handler",
    "get_logger",
    "get_verbosity",
    "set_verbosity",
]

_ROOT = "dynify"
_lock = threading.Lock()
_default_handler: logging.Handler | None = None


class _StderrHandler(logging.StreamHandler):
    """A stream handler whose stream is whatever ``sys.stderr`` is at each message."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:  # StreamHandler.__init__ assigns it
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"error: {message}"
        if record.levelno >= logging.WARNING:
            return f"warning: {message}"
        return message


def _configure() -> None:
    global _default_handler
    with _lock:
        if _default_handler is not None:
            return
        _default_handler = _StderrHandler()
        _default_handler.setFormatter(_Formatter())
        root = logging.getLogger(_ROOT)
        root.addHandler(_default_handler)
        root.setLevel(logging.INFO)
        root.propagate = False


def get_logger(name: str) -> logging.Logger:
    """The logger for ``name`` (a ``dynify.*`` module), with the default handler set up."""
    _configure()
    return logging.getLogger(name)


def set_verbosity(level: int) -> None:
    """Set the level of the ``"dynify"`` logger (``logging.WARNING`` silences progress)."""
    _configure()
    logging.getLogger(_ROOT).setLevel(level)


def get_verbosity() -> int:
    _configure()
    return logging.getLogger(_ROOT).getEffectiveLevel()


def disable_default_handler() -> None:
    """Remove the stderr handler, and let records propagate to the caller's handlers."""
    _configure()
    root = logging.getLogger(_ROOT)
    assert _default_handler is not None
    root.removeHandler(_default_handler)
    root.propagate = True


def enable_default_handler() -> None:
    _configure()
    root = logging.getLogger(_ROOT)
    assert _default_handler is not None
    if _default_handler not in root.handlers:
        root.addHandler(_default_handler)
    root.propagate = False

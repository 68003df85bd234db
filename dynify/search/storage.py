"""Where a study lives: storage URLs, the Optuna storage they open, and URLs fit to show.

Owns the storage drivers (SQLite in the run folder by default, any SQLAlchemy URL, Optuna's
journal file), the race of processes creating one new storage together (a folder lock and
retries), and redaction: :func:`redact_url` and :func:`redact_text` hide every reading of a
URL's password from whatever the search prints or stores, from one parse of the URL.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, unquote_plus

import optuna
import sqlalchemy.exc
from optuna.storages.journal import JournalFileBackend, JournalStorage
from sqlalchemy.engine import URL, make_url

from dynify.errors import DynifyError, shorten
from dynify.search.settings import SearchSettings

__all__ = [
    "HIDDEN",
    "folder_lock",
    "has_heartbeat",
    "local_storage_file",
    "make_storage",
    "redact_text",
    "redact_url",
    "storage_url",
]


def has_heartbeat(settings: SearchSettings) -> bool:
    """Whether the storage tracks trial heartbeats (SQLite and other RDB storages do; Optuna's
    journal storage does not, so a trial whose process died stays RUNNING there)."""
    return not (settings.storage or "").startswith("journal:")


def storage_url(settings: SearchSettings) -> str:
    """The storage URL of ``settings``: ``storage``, or SQLite in the run folder."""
    return settings.storage or f"sqlite:///{Path(settings.output).resolve() / 'study.db'}"


# sqlite:///FILE, with or without a driver named (sqlite+pysqlite:///FILE), and its options.
_SQLITE_FILE = re.compile(r"sqlite(?:\+\w+)?:///(?P<path>[^?]*)")


def local_storage_file(url: str) -> Path | None:
    """The file a ``journal:PATH`` or ``sqlite:///FILE`` URL names; None for a database server
    or an in-memory SQLite."""
    if url.startswith("journal:"):
        return Path(url.removeprefix("journal:").removeprefix("//"))
    match = _SQLITE_FILE.match(url)
    if match is None or match["path"] in ("", ":memory:"):
        return None
    return Path(match["path"])


def make_storage(settings: SearchSettings) -> optuna.storages.BaseStorage:
    """The study's storage: SQLite in the run folder by default; any SQLAlchemy URL
    (``postgresql://``, ``mysql://``) or ``journal:PATH`` (a journal file on a shared file
    system). RDB storages get a heartbeat, so a trial whose process died is marked failed and
    retried (up to twice) by the next process that runs the study."""
    url = storage_url(settings)
    path = local_storage_file(url)
    folder = None if path is None else path.parent
    try:
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        if url.startswith("journal:"):
            return JournalStorage(JournalFileBackend(str(path)))
    except OSError as err:  # e.g. a file in the way, made after prepare's check
        reason = err.strerror or type(err).__name__
        raise DynifyError(
            f"storage {redact_url(url)!r}: cannot create {str(err.filename or path)!r} "
            f"({reason}); choose another path",
            arguments=("storage",),
        ) from err
    shown = url
    url = _with_driver(url)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 120}
    for attempt in range(_CREATE_ATTEMPTS):
        try:
            # Creating the tables of a new storage races between processes that start together
            # (one gets "UNIQUE constraint failed: alembic_version..." or "table ... already
            # exists"): processes on this machine take turns, others retry once it is made.
            with folder_lock(folder), warnings.catch_warnings():
                # Heartbeats are "experimental" in Optuna's terms; they make resume work.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=settings.heartbeat,
                    grace_period=2 * settings.heartbeat,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                        max_retry=2
                    ),
                )
        except Exception as err:  # SQLAlchemy / driver errors: one line, naming the URL
            if _creation_race(err) and attempt + 1 < _CREATE_ATTEMPTS:
                time.sleep(0.2 * (attempt + 1))
                continue
            # The driver's whole message, redacted and cut; not chained: the driver's own
            # exception (which --debug would print) may quote the password.
            message = redact_text(str(err).strip(), shown)
            raise DynifyError(
                f"storage {redact_url(shown)!r}: cannot open ({type(err).__name__}: {message}); "
                "accepted: sqlite:///FILE, postgresql://USER:PASS@HOST/DB, mysql://..., "
                "journal:PATH",
                arguments=("storage",),
            ) from None
    raise AssertionError("unreachable")  # the last attempt returns or raises


_CREATE_ATTEMPTS = 5


def _creation_race(err: Exception) -> bool:
    """Whether ``err`` is another process creating the same new storage's tables."""
    text = str(err).lower()
    return isinstance(err, sqlalchemy.exc.DBAPIError) and any(
        words in text for words in ("already exists", "unique constraint", "duplicate")
    )


@contextlib.contextmanager
def folder_lock(folder: Path | None) -> Iterator[None]:
    """An exclusive ``flock`` on ``folder`` itself (no lock file is left behind), or nothing
    when there is no local folder or the platform has no flock."""
    try:
        import fcntl
    except ImportError:  # Windows: the retry covers it
        fcntl = None  # type: ignore[assignment]
    if folder is None or fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # a file system without locks (some NFS): retry
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


# SQLAlchemy's default driver for a bare scheme, and the ones tried instead when it is missing
# (SQLAlchemy 2.1 made psycopg 3 the PostgreSQL default; dynify's 'postgres' extra installs
# psycopg2).
_DRIVERS: dict[str, tuple[tuple[str, str], ...]] = {
    "postgresql": (("psycopg", "psycopg"), ("psycopg2", "psycopg2"), ("pg8000", "pg8000")),
    "mysql": (
        ("mysqldb", "MySQLdb"),
        ("pymysql", "pymysql"),
        ("mysqlconnector", "mysql.connector"),
    ),
}


def _with_driver(url: str) -> str:
    """``postgresql://...`` with an installed driver named (``postgresql+psycopg2://...``);
    a URL that names its driver is left as it is. Missing every driver is a clear error."""
    scheme, sep, rest = url.partition("://")
    if scheme == "postgres":  # the libpq spelling SQLAlchemy does not accept
        scheme = "postgresql"
    if not sep or scheme not in _DRIVERS:
        return url
    for driver, module in _DRIVERS[scheme]:
        with contextlib.suppress(ImportError, ValueError):
            if importlib.util.find_spec(module) is not None:
                return f"{scheme}+{driver}://{rest}"
    names = ", ".join(module for _, module in _DRIVERS[scheme])
    hint = "pip install 'dynify[postgres]'" if scheme == "postgresql" else "pip install pymysql"
    raise DynifyError(
        f"storage {redact_url(url)!r}: no {scheme} driver is installed ({names}); {hint}",
        arguments=("storage",),
    )


# Query-string keys that carry a secret (libpq's password and sslpassword, tokens, keys).
_SECRET_QUERY = re.compile(r"pass|pwd|secret|token|key|auth|credential", re.IGNORECASE)
HIDDEN = "***"


def _parse(url: str) -> URL | None:
    """``url`` as SQLAlchemy parses it (as the storage will), or None when it does not."""
    try:
        return make_url(url)
    except Exception:  # ArgumentError, or ValueError for a bad port
        return None


def redact_url(url: str) -> str:
    """``url`` fit to print or store: its password (and any secret in its query string)
    replaced by ``***``, parsed as SQLAlchemy parses it. A URL that does not parse is not
    shown at all (only its scheme), since where its secret lies is unknown."""
    return _redacted(url, _parse(url))


def _redacted(url: str, parsed: URL | None) -> str:
    if url.startswith("journal:"):
        return url  # a file path: nothing secret in it
    if parsed is None:
        scheme = url.partition("://")[0]
        shown = scheme if re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme) else "a storage"
        return f"{shown} URL that does not parse (not shown, it may hold a password)"
    host = parsed.host
    if host and "@" in host:
        # A password with a raw '@': SQLAlchemy takes the text after its first '@' as part
        # of the host, so that part is the rest of the password.
        host = host.rsplit("@", 1)[1]
        parsed = parsed.set(host=host, password=parsed.password or HIDDEN)
    query = {
        key: (HIDDEN if _SECRET_QUERY.search(key) else value) for key, value in parsed.query.items()
    }
    rendered = parsed.set(query=query).render_as_string(hide_password=True)
    # render_as_string percent-encodes the query's '***'; write it as the password is.
    return rendered.replace("%2A%2A%2A", HIDDEN)


def _secrets(url: str, parsed: URL | None) -> list[str]:
    """The pieces of ``url`` (``parsed`` as :func:`_parse` read it) that must not appear in a
    message: every reading of its password (as SQLAlchemy parses it, as typed,
    percent-decoded, and the wider readings a raw '@' or a user name with ':' allow),
    query-string secrets (as typed and decoded), and the whole URL when it does not parse.
    Hiding a candidate that was not the password costs a word of the message; missing one
    prints a password, so every candidate is kept."""
    rest = url.partition("://")[2]
    if parsed is None:
        return [url, rest]
    found = [url]
    if parsed.password is not None:
        found.append(str(parsed.password))
    # SQLAlchemy's reading: the user name stops at ':' or '/', the password at the first '@'
    # (so it may hold '/', '?' or '#'); that text as typed, before percent-decoding.
    user = re.split(r"[:/]", rest, maxsplit=1)[0]
    typed = rest[len(user) + 1 :].partition("@")[0] if parsed.password is not None else ""
    found.append(typed)
    if parsed.host and "@" in parsed.host:
        # A password with a raw '@': SQLAlchemy reads the text after its first '@' as part of
        # the host, and drivers quote that host; its head is the rest of the password.
        tail = parsed.host.rsplit("@", 1)[0]
        found += [tail, f"{typed}@{tail}"]
    # The widest reading: everything before the last '@' is user and password, and the
    # password starts after any ':' in it (a user name may hold ':').
    userinfo = rest.rpartition("@")[0]
    for i, char in enumerate(userinfo):
        if char == ":":
            found.append(userinfo[i + 1 :])
    for key, value in parsed.query.items():
        if _SECRET_QUERY.search(key):
            found += [value] if isinstance(value, str) else list(value)
    # The query as typed: a driver may quote a value before it is decoded.
    for pair in rest.partition("?")[2].split("&"):
        key, _, value = pair.partition("=")
        if _SECRET_QUERY.search(unquote_plus(key)):
            found += [value, unquote_plus(value)]
    found += [unquote(f) for f in found[1:]]  # the URL itself is replaced by redact_url's
    return list(dict.fromkeys(f for f in found if f))


# The longest driver message a storage error quotes (cut at a word by ``shorten``).
MESSAGE_LIMIT = 160


def redact_text(text: str, url: str, *, limit: int = MESSAGE_LIMIT) -> str:
    """``text`` (e.g. a driver's error message) with every secret of ``url`` hidden, cut to
    ``limit`` characters at a word. Secrets are hidden before the cut, so a cut cannot leave
    part of one that the replacement would then miss."""
    parsed = _parse(url)  # once, for both readings
    for secret in sorted(_secrets(url, parsed), key=len, reverse=True):
        if secret == url:
            text = text.replace(url, _redacted(url, parsed))
        elif len(secret) >= 4:
            text = text.replace(secret, HIDDEN)
        else:  # a short one only where it stands alone, not inside every word
            text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", HIDDEN, text)
    return shorten(text, limit)

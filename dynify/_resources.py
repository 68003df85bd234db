"""Where the bundled YAML files (recipes, search spaces) live.

In a source checkout they are the top-level ``recipes/`` and ``search/`` folders; a wheel
carries the same files inside the package as ``dynify/_bundled/<kind>/`` (see
pyproject.toml), so a bare name such as ``mobile`` works however dynify was installed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from dynify.errors import DynifyError, DynifyTypeError, did_you_mean, quoted

__all__ = ["bundled_dir", "bundled_names", "find_bundled", "locate"]

Kind = Literal["recipes", "search"]
_PACKAGE = Path(__file__).resolve().parent
# What a message calls a file of each kind: in full, and after "a bundled".
_NOUNS: dict[str, tuple[str, str]] = {
    "recipes": ("recipe", "recipe"),
    "search": ("search space", "space"),
}


def bundled_dir(kind: Kind) -> Path:
    installed = _PACKAGE / "_bundled" / kind
    if installed.is_dir():
        return installed
    return _PACKAGE.parent / kind


def bundled_names(kind: Kind) -> list[str]:
    folder = bundled_dir(kind)
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.yaml"))


def find_bundled(kind: Kind, name: str) -> Path | None:
    """The bundled file called ``name`` (with or without ``.yaml``), if there is one."""
    stem = name[:-5] if name.endswith(".yaml") else name
    if "/" in stem or "\\" in stem:
        return None
    path = bundled_dir(kind) / f"{stem}.yaml"
    return path if _is(path, Path.is_file) else None


def locate(kind: Kind, name: str | os.PathLike[str], *, also: tuple[str, ...] = ()) -> Path:
    """The file ``name`` names: a path that exists, else the bundled file of that name.

    A file in the current folder wins over a bundled one of the same name. Neither is one
    line naming the closest bundled name and all of them; a value that is no path at all is
    a :class:`DynifyTypeError` listing what would be accepted, ``also`` included (what else
    the caller takes: ``("a dict", "a Recipe")``).
    """
    noun, short = _NOUNS[kind]
    if not isinstance(name, str | os.PathLike):
        accepted = ["a path", f"a bundled {short}'s name", *also]
        raise DynifyTypeError(
            f"{noun} must be {', '.join(accepted[:-1])} or {accepted[-1]}, "
            f"got {type(name).__name__}"
        )
    path = Path(name)
    if _is(path, Path.exists):
        return path
    bundled = find_bundled(kind, str(name))
    if bundled is not None:
        return bundled
    names = bundled_names(kind)
    raise DynifyError(
        f"{noun} {quoted(str(name))} is neither a file nor a bundled {short}"
        f"{did_you_mean(path.stem, names)}; bundled {short}s: {', '.join(names)}"
    )


def _is(path: Path, test: Callable[[Path], bool]) -> bool:
    """``test(path)``, false for a name no file can have (too long for the OS, a NUL)."""
    try:
        return test(path)
    except (OSError, ValueError):
        return False

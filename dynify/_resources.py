"""Where the bundled YAML files (recipes, search spaces) live.

In a source checkout they are the top-level ``recipes/`` and ``search/`` folders; a wheel
carries the same files inside the package as ``dynify/_bundled/<kind>/`` (see
pyproject.toml), so a bare name such as ``mobile`` works however dynify was installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

__all__ = ["bundled_dir", "bundled_names", "find_bundled"]

Kind = Literal["recipes", "search"]
_PACKAGE = Path(__file__).resolve().parent


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
    return path if path.is_file() else None

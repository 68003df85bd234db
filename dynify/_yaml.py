"""YAML reading that remembers line numbers, and the validation helpers built on it.

Recipes and search spaces share this: every error names the file, the line and the key path
at fault (``recipes/mobile.yaml:14: rules[2].select.kernal_size: unknown key (did you mean
'kernel_size'?)``) and what would be accepted.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dynify.errors import QUOTE_LIMIT, DynifyError, did_you_mean, quoted

__all__ = ["Doc", "load_yaml_file", "parse_yaml"]

_EXPONENT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


@dataclass
class Doc:
    """A parsed YAML document plus the line of every key path, for error messages."""

    data: Any
    source: str
    lines: dict[str, int] = field(default_factory=dict)
    # Key path of ``data`` inside the file, for a section parsed on its own (see ``sub``).
    prefix: str = ""

    def sub(self, key: str) -> Doc:
        """The section ``key`` of this mapping as a document of its own; its errors still
        name the full path and the right line."""
        data = self.data.get(key) if isinstance(self.data, dict) else None
        return Doc(data, self.source, self.lines, _join(self.prefix, key))

    def where(self, path: str) -> str:
        """``file:line: path`` for the closest known ancestor of ``path``."""
        full = _join(self.prefix, path)
        probe = full
        while probe and probe not in self.lines:
            probe = _parent(probe)
        line = self.lines.get(probe) or self.lines.get("")
        loc = f"{self.source}:{line}" if line else self.source
        return f"{loc}: {full}" if full else loc

    def line(self, path: str) -> int | None:
        return self.lines.get(_join(self.prefix, path))

    def error(self, path: str, message: str) -> DynifyError:
        return DynifyError(f"{self.where(path)}: {message}")

    # -- typed accessors ---------------------------------------------------------------

    def mapping(self, value: Any, path: str, allowed: Iterable[str]) -> dict[str, Any]:
        """Check ``value`` is a mapping whose keys are all in ``allowed``."""
        allowed = list(allowed)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(path, f"expected a mapping with keys {allowed}, got {_kind(value)}")
        for key in value:
            if key not in allowed:
                # A hostile key can be megabytes: quoted short (and did_you_mean skips it).
                hint = did_you_mean(str(key), allowed)
                key = quoted(key) if len(str(key)) > QUOTE_LIMIT else key
                sub = f"{path}.{key}" if path else str(key)
                raise self.error(
                    sub,
                    f"unknown key{hint}; accepted keys: {', '.join(allowed)}",
                )
        return value

    def integer(self, value: Any, path: str, *, minimum: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(path, f"expected an integer{_min(minimum)}, got {quoted(value)}")
        if minimum is not None and value < minimum:
            raise self.error(path, f"expected an integer{_min(minimum)}, got {value}")
        return value

    def number(
        self, value: Any, path: str, *, minimum: float | None = None, exclusive: bool = False
    ) -> float:
        if isinstance(value, str) and _EXPONENT.match(value.strip()):
            value = float(value)  # YAML 1.1 (PyYAML) reads 1e-3, without a dot, as a string
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(
                path, f"expected a number{_min(minimum, exclusive)}, got {quoted(value)}"
            )
        if not math.isfinite(value):  # YAML's .inf and .nan
            raise self.error(
                path, f"expected a finite number{_min(minimum, exclusive)}, got {value}"
            )
        if minimum is not None and (value <= minimum if exclusive else value < minimum):
            raise self.error(path, f"expected a number{_min(minimum, exclusive)}, got {value}")
        return float(value)

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.error(path, f"expected true or false, got {quoted(value)}")
        return value

    def string(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise self.error(path, f"expected a string, got {quoted(value)}")
        return value

    def choice(self, value: Any, path: str, choices: Iterable[str]) -> str:
        choices = list(choices)
        if not isinstance(value, str) or value not in choices:
            hint = did_you_mean(str(value), choices)
            raise self.error(path, f"got {quoted(value)}{hint}; accepted: {', '.join(choices)}")
        return value

    def one_or_list(self, value: Any, path: str, item: Callable[[Any, str], Any]) -> tuple:
        """A scalar or a non-empty list of scalars, each checked by ``item``."""
        if isinstance(value, list):
            if not value:
                raise self.error(path, "expected a value or a non-empty list, got []")
            return tuple(item(v, f"{path}[{i}]") for i, v in enumerate(value))
        return (item(value, path),)


def _join(prefix: str, path: str) -> str:
    if not prefix:
        return path
    if not path:
        return prefix
    return prefix + path if path.startswith("[") else f"{prefix}.{path}"


def _parent(path: str) -> str:
    """``rules[2].select`` -> ``rules[2]`` -> ``rules`` -> ``""``."""
    if path.endswith("]"):
        return path[: path.rindex("[")]
    return path.rsplit(".", 1)[0] if "." in path else ""


def _kind(value: Any) -> str:
    return {list: "a list", str: f"the string {quoted(value)}"}.get(type(value), repr(value))


def _min(minimum: float | None, exclusive: bool = False) -> str:
    if minimum is None:
        return ""
    return f" > {minimum:g}" if exclusive else f" >= {minimum:g}"


# At most this many values after aliases are expanded: a recipe or a space holds a few
# hundred, while aliases of aliases ("billion laughs") expand a few lines into 10**20.
MAX_VALUES = 100_000


class _Expansion:
    """What building Python values from the node graph has used so far."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.values = 0
        self.open: set[int] = set()  # nodes being built: one met again is a recursive alias

    def enter(self, node: yaml.Node, path: str) -> None:
        self.values += 1
        line = node.start_mark.line + 1
        if self.values > MAX_VALUES:
            raise DynifyError(
                f"{self.source}:{line}: {path or 'the document'}: more than {MAX_VALUES:,} "
                "values once its aliases are expanded; write the values out, or use fewer "
                "aliases of aliases"
            )
        if id(node) in self.open:
            raise DynifyError(
                f"{self.source}:{line}: {path or 'the document'}: an alias that contains "
                "itself (a recursive anchor); a recipe's values must be finite"
            )


def _to_python(node: yaml.Node, path: str, lines: dict[str, int], seen: _Expansion) -> Any:
    seen.enter(node, path)
    lines.setdefault(path, node.start_mark.line + 1)
    source = seen.source
    if isinstance(node, yaml.MappingNode):
        seen.open.add(id(node))
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                line = key_node.start_mark.line + 1
                raise DynifyError(f"{source}:{line}: keys must be strings, got a {key_node.id}")
            key = yaml.safe_load(yaml.serialize(key_node))
            if not isinstance(key, str):
                line = key_node.start_mark.line + 1
                raise DynifyError(f"{source}:{line}: keys must be strings, got {quoted(key)}")
            sub = f"{path}.{key}" if path else key
            if key in out:
                line = key_node.start_mark.line + 1
                raise DynifyError(f"{source}:{line}: {sub}: duplicate key")
            lines[sub] = key_node.start_mark.line + 1
            out[key] = _to_python(value_node, sub, lines, seen)
        seen.open.discard(id(node))
        return out
    if isinstance(node, yaml.SequenceNode):
        seen.open.add(id(node))
        items = [_to_python(v, f"{path}[{i}]", lines, seen) for i, v in enumerate(node.value)]
        seen.open.discard(id(node))
        return items
    return yaml.safe_load(yaml.serialize(node))


def parse_yaml(text: str, source: str) -> Doc:
    """Parse YAML text; syntax errors become one line naming ``source`` and the position."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise DynifyError(f"{where}: YAML syntax error: {problem}") from None
    if node is None:
        return Doc(None, source, {"": 1})
    lines: dict[str, int] = {}
    return Doc(_to_python(node, "", lines, _Expansion(source)), source, lines)


def load_yaml_file(path: str | os.PathLike[str]) -> Doc:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise DynifyError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise DynifyError(f"{p}: is a directory, expected a YAML file") from None
    except UnicodeDecodeError:
        raise DynifyError(f"{p}: not a text (UTF-8) file") from None
    return parse_yaml(text, str(p))

"""Plain-text tables for the command line (no dependency, aligned columns)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_table"]


def format_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    footer: Sequence[str] | None = None,
    right: Sequence[int] | None = None,
) -> str:
    """Columns padded to their widest cell; numeric-looking columns right-aligned."""
    all_rows = [list(header), *[list(r) for r in rows]] + ([list(footer)] if footer else [])
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(header))]
    if right is None:
        right = [
            i
            for i in range(len(header))
            if rows and all(_numeric(r[i]) for r in rows if r[i] not in ("", "-"))
        ]

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            out.append(cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    text = [line(header), rule, *[line(r) for r in rows]]
    if footer:
        text += [rule, line(footer)]
    return "\n".join(text)


def _numeric(cell: str) -> bool:
    cleaned = cell.replace(",", "").replace("x", "").replace("%", "").replace("+", "")
    try:
        float(cleaned)
    except ValueError:
        return False
    return True

"""What a count returns: per-layer rows (:class:`LayerCost`), totals (:class:`Totals`) and
the whole report (:class:`CostReport`). Data only; :mod:`dynify.cost.formatting` writes
them as text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dynify.cost.formatting import format_report, format_summary

__all__ = ["CostReport", "LayerCost", "Totals"]


@dataclass(frozen=True, slots=True)
class LayerCost:
    """One row of a cost report: a conv layer, or a module running matrix products.

    ``macs`` and ``extra_ops`` are for the whole batch of the report. ``parts`` splits a
    dynamic layer's MACs (conv, attention_fc1, attention_fc2, kernel_mix, bias_mix) and
    ``extra_parts`` its extra ops (pool, activations); both are empty for other rows.
    """

    name: str
    kind: str  # "conv", "dynamic", "matmul", "attention", "other"
    macs: int
    params: int
    extra_ops: int = 0
    parts: dict[str, int] = field(default_factory=dict)
    extra_parts: dict[str, int] = field(default_factory=dict)

    @property
    def flops(self) -> int:
        return 2 * self.macs


@dataclass(frozen=True, slots=True)
class Totals:
    """Totals only (``price``): MACs, parameters and extra ops for ``batch_size`` images."""

    macs: int
    params: int
    extra_ops: int
    batch_size: int

    @property
    def flops(self) -> int:
        """FLOPs = 2 x MACs (what FlopCounterMode counts)."""
        return 2 * self.macs


@dataclass(frozen=True)
class CostReport:
    """Per-layer and total cost of a model or plan for ``batch_size`` images.

    ``macs`` (and ``flops = 2 * macs``) is exactly what FlopCounterMode counts;
    ``extra_ops`` is the elementwise work of dynamic layers it does not count.
    ``complete`` is False when the plan carries no op counts (made by an older dynify):
    only its convs are priced then.
    """

    rows: tuple[LayerCost, ...]
    macs: int
    params: int
    extra_ops: int
    weight_bytes: int
    batch_size: int
    input_size: tuple[int, int, int]
    complete: bool = True

    @property
    def flops(self) -> int:
        """FLOPs = 2 x MACs."""
        return 2 * self.macs

    @property
    def totals(self) -> Totals:
        return Totals(self.macs, self.params, self.extra_ops, self.batch_size)

    def row(self, name: str) -> LayerCost:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def summary(self) -> str:
        """One line: MACs, FLOPs, parameters, weights, batch and input size."""
        return format_summary(self)

    def table(self) -> str:
        """Every row as a text table, with totals."""
        return format_report(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "macs": self.macs,
            "flops": self.flops,
            "params": self.params,
            "extra_ops": self.extra_ops,
            "weight_bytes": self.weight_bytes,
            "batch_size": self.batch_size,
            "input_size": list(self.input_size),
            "complete": self.complete,
        }

"""What every kind of dynamic convolution provides, so that one converter, one temperature
scheduler, one cost model and one set of routing diagnostics serve them all.

A kind (``dycnn``, ``condconv``, ``odconv``, ``dcd``) is one :class:`DynamicLayer` subclass
(DY-CNN and CondConv share :class:`~dynify.layers.DynamicConv2d`, told apart by their
attention). Its per-sample *routing* is one tensor ``(B, D)``: everything the layer's
output depends on besides its input and its parameters (DY-CNN: the K expert weights;
ODConv: its four attentions side by side; DCD: the channel scale and the latent matrix).
``attention(x)`` computes it, ``forward_routed(x, routing)`` applies it, and
``forward(x) == forward_routed(x, attention(x))``. Freezing a layer's routing at its mean
over images (what ``dynify.routing`` measures) is replacing ``attention``'s output.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from dynify.errors import DynifyError

__all__ = ["DynamicLayer"]


class DynamicLayer(nn.Module):
    """Base of every dynamic convolution (see the module documentation).

    Subclasses set the ``nn.Conv2d``-like attributes (``in_channels``, ``out_channels``,
    ``kernel_size``, ``stride``, ``padding``, ``dilation``, ``groups``), a submodule
    ``attention`` whose output is the routing ``(B, D)``, and implement
    :meth:`forward_routed`. The class methods let the planner and the cost model ask about
    a conv before anything is built.
    """

    #: The kinds this class builds (a recipe's ``kind``).
    KINDS: ClassVar[tuple[str, ...]] = ()

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    attention: nn.Module

    # -- what the kind covers, before anything is built ------------------------------------

    @classmethod
    def unsupported_reason(
        cls,
        *,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int] | str,
        dilation: tuple[int, int],
        groups: int,
        same_pad: bool = False,
    ) -> str | None:
        """Why this kind cannot take over a conv of this configuration (``None``: it can).
        ``same_pad``: timm's run-time TF-'SAME' padding."""
        return None

    # -- the layer --------------------------------------------------------------------

    @property
    def kind(self) -> str:
        """The recipe ``kind`` this layer is."""
        return self.KINDS[0]

    #: K, the number of expert kernels mixed per sample (1 when the kind mixes none).
    num_experts: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_routed(x, self.attention(x))

    def forward_routed(self, x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        """The layer's output with ``routing`` ``(B, D)`` in place of ``attention(x)``."""
        raise NotImplementedError

    def expert_weights(self, routing: torch.Tensor) -> torch.Tensor | None:
        """The ``(B, K)`` expert mixing weights inside ``routing``, or ``None`` when the
        kind mixes no experts (the diagnostics' usage and entropy read these)."""
        return None

    def expert_kernels(self) -> torch.Tensor | None:
        """The ``(K, ...)`` expert kernels (the diagnostics' expert spread), or ``None``."""
        return None

    # -- temperature (kinds whose attention has one) ----------------------------------

    @property
    def has_temperature(self) -> bool:
        return isinstance(getattr(self.attention, "temperature", None), torch.Tensor)

    @property
    def temperature(self) -> float:
        """The attention's temperature T (a buffer: saved, never changed by forward)."""
        if not self.has_temperature:
            raise DynifyError(f"a {self.kind} layer has no temperature")
        return float(self.attention.temperature)

    @temperature.setter
    def temperature(self, value: float) -> None:
        if not self.has_temperature:
            raise DynifyError(f"a {self.kind} layer has no temperature")
        if not float(value) > 0:
            raise DynifyError(f"temperature must be > 0, got {value}")
        self.attention.temperature.fill_(float(value))

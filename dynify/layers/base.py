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

What shipping a model needs (``dynify fold``, ``dynify export``) is here too:
``sample_kernels(routing)`` is each sample's kernel and bias written out, the literal
definition every formulation computes; ``average_kernel`` is their mean over images (the
static conv a layer that does not route folds to); ``forward_portable`` is the formulation
an exported graph uses (``dynify.layers.portable``); ``fuse_affine_`` takes in a following
per-channel affine map (an eval-mode BatchNorm) exactly; ``drop_experts_`` removes experts.
"""

from __future__ import annotations

from collections.abc import Sequence
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

    #: Compute with the portable formulation (set by ``dynify.layers.portable``).
    portable: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The attention pools the unpadded input, as the surrounding network sees it.
        routing = self.attention(x)
        if self.portable:
            return self.forward_portable(x, routing)
        return self.forward_routed(x, routing)

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

    # -- shipping: the kernels written out, folding, fusing -------------------------

    def sample_kernels(self, routing: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each sample's kernel ``(B, C_out, C_in // groups, kh, kw)`` and bias ``(B, C_out)``
        (``None`` without one) under ``routing`` ``(B, D)``: the convolution with these is
        the layer's output (for the layer's own padding)."""
        raise NotImplementedError

    def forward_portable(self, x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        """``forward_routed(x, routing)`` with ops whose shapes never involve the batch
        (what an exported graph computes; see ``dynify.layers.portable``)."""
        raise NotImplementedError

    @torch.no_grad()
    def average_kernel(
        self, routing: torch.Tensor, *, max_bytes: int = 64 * 2**20
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The mean over the ``N`` samples of ``routing`` ``(N, D)`` of their kernels and
        biases (:meth:`sample_kernels`), accumulated in float64 a chunk of samples at a time
        (at most ``max_bytes`` of kernels at once), returned in the layer's dtype: the
        static conv that computes, for every input, the layer's average function."""
        weight = next(self.parameters())
        routing = routing.to(weight.device, weight.dtype)
        per_sample = self.out_channels * (self.in_channels // self.groups)
        per_sample *= self.kernel_size[0] * self.kernel_size[1] * weight.element_size()
        chunk = max(1, max_bytes // max(per_sample, 1))
        kernel_sum = bias_sum = None
        for part in routing.split(chunk):
            kernels, bias = self.sample_kernels(part)
            k = kernels.double().sum(dim=0)
            kernel_sum = k if kernel_sum is None else kernel_sum + k
            if bias is not None:
                b = bias.double().sum(dim=0)
                bias_sum = b if bias_sum is None else bias_sum + b
        if kernel_sum is None:
            raise DynifyError("average_kernel needs the routing of at least one sample")
        n = routing.shape[0]
        kernel = (kernel_sum / n).to(weight.dtype)
        return kernel, None if bias_sum is None else (bias_sum / n).to(weight.dtype)

    def fuse_affine_(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Make the layer compute ``scale[o] * y[o] + shift[o]`` (``scale``, ``shift``:
        ``(C_out,)``) exactly, for every input: an eval-mode BatchNorm that follows it,
        taken in. May add a bias parameter; works on the meta device (shapes only)."""
        raise NotImplementedError

    def drop_experts_(self, keep: Sequence[int]) -> None:
        """Keep only the experts ``keep`` (indices, in order), renormalising the mixture
        where the kind's weights are a softmax (which is then exactly the softmax over the
        experts kept)."""
        raise DynifyError(f"a {self.kind} layer has no experts to drop")

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

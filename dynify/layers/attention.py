"""Kernel attention: the per-sample routing weights that mix a dynamic layer's experts.

DY-CNN (Chen et al., CVPR 2020) uses a squeeze-and-excitation block whose last activation
is a softmax over the K experts, sharpened by a temperature; CondConv (Yang et al., 2019)
routes with an independent sigmoid per expert. Both are this module with a different
``kind``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dynify.errors import DynifyError

__all__ = ["ATTENTION_KINDS", "AttentionKind", "KernelAttention", "attention_hidden_width"]

AttentionKind = Literal["softmax", "sigmoid"]
ATTENTION_KINDS: tuple[str, ...] = ("softmax", "sigmoid")

# Narrow layers (the RGB stem, a depthwise conv on 16 channels) would otherwise get a hidden
# width of C // r = 0 or 1, which cannot carry K independent logits.
MIN_HIDDEN = 4


def attention_hidden_width(in_channels: int, reduction: int) -> int:
    """Width of the attention's hidden layer: ``max(in_channels // reduction, 4)``."""
    return max(in_channels // reduction, MIN_HIDDEN)


class KernelAttention(nn.Module):
    """Global average pool, Linear, ReLU, Linear, then softmax(z / T) or sigmoid(z / T).

    Shapes: input ``(B, C, H, W)`` in any memory layout; output ``(B, K)``.

    The temperature ``T`` is a buffer, so it is saved in the ``state_dict``; it is changed
    only by the caller (``module.temperature = 5.0``) or by a
    :class:`dynify.TemperatureScheduler`, never inside ``forward``, so evaluation is
    deterministic.
    """

    temperature: torch.Tensor

    def __init__(
        self,
        in_channels: int,
        num_experts: int,
        *,
        reduction: int = 4,
        kind: AttentionKind = "softmax",
        temperature: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if kind not in ATTENTION_KINDS:
            raise DynifyError(f"attention must be one of {ATTENTION_KINDS}, got {kind!r}")
        if float(temperature) <= 0:
            raise DynifyError(f"temperature must be > 0, got {temperature}")
        factory = {"device": device, "dtype": dtype}
        self.kind = kind
        self.num_experts = num_experts
        hidden = attention_hidden_width(in_channels, reduction)
        self.fc1 = nn.Linear(in_channels, hidden, **factory)
        self.fc2 = nn.Linear(hidden, num_experts, **factory)
        self.register_buffer("temperature", torch.tensor(float(temperature), **factory))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activation scores ``z`` of shape ``(B, K)``."""
        pooled = x.mean(dim=(2, 3))
        # F.linear on the submodules' parameters instead of calling them: two module calls
        # are ~8 us here, a quarter of the attention's cost on a small layer at batch 1
        # (bench/layer.py). fc1 / fc2 stay modules for the state_dict and for init.
        hidden = F.relu(F.linear(pooled, self.fc1.weight, self.fc1.bias))
        return F.linear(hidden, self.fc2.weight, self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.logits(x) / self.temperature
        if self.kind == "softmax":
            return torch.softmax(z, dim=1)
        return torch.sigmoid(z)

    def reset_routing(self, *, std: float, generator: torch.Generator | None = None) -> None:
        """A random attention whose weights still sum to the same constant for every input.

        ``fc1`` is initialised as ``nn.Linear`` does and ``fc2``'s weight is drawn from
        N(0, std^2) with a zero bias, so different inputs get different weights from the
        start. Softmax weights sum to 1 whatever the logits; for sigmoid the rows of ``fc2``
        come in antisymmetric pairs (``z_{2i+1} = -z_{2i}``, so the pair's weights sum to
        exactly 1) and an odd expert out gets a zero row (weight 1/2): the weights sum to
        ``K / 2``. A mixture of identical experts is then the same kernel for every input,
        while each expert's gradient is weighted differently per sample.
        """
        _reset_linear(self.fc1, generator)
        if self.fc2.weight.is_meta:
            return
        with torch.no_grad():
            w = _drawable(self.fc2.weight, generator).normal_(0.0, float(std), generator=generator)
            if self.kind == "sigmoid":
                pairs = self.num_experts // 2
                w[1 : 2 * pairs : 2] = -w[0 : 2 * pairs : 2]
                if self.num_experts % 2:
                    w[-1] = 0.0
            self.fc2.weight.copy_(w)
            self.fc2.bias.zero_()

    def reset_parameters(self, *, generator: torch.Generator | None = None) -> None:
        """Both layers initialised as ``nn.Linear`` initialises itself (random routing whose
        weights do not sum to a constant under sigmoid)."""
        _reset_linear(self.fc1, generator)
        _reset_linear(self.fc2, generator)

    def value_at_zero(self) -> float:
        """Each expert's weight when all logits are zero (the state ``from_conv`` starts in)."""
        return 1.0 / self.num_experts if self.kind == "softmax" else 0.5

    def extra_repr(self) -> str:
        return f"kind={self.kind}, temperature={float(self.temperature):g}"


def _drawable(target: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Where ``generator`` can draw ``target``'s values: ``target`` itself, or (a generator
    on another device, e.g. a CPU generator seeding a CUDA layer reproducibly) an empty
    float32 tensor on the generator's device, to be copied into ``target`` afterwards."""
    if generator is None or generator.device == target.device:
        return target
    return torch.empty(target.shape, device=generator.device)


def _reset_linear(linear: nn.Linear, generator: torch.Generator | None) -> None:
    """``nn.Linear.reset_parameters`` drawing from ``generator``."""
    if linear.weight.is_meta:
        return
    with torch.no_grad():
        w = _drawable(linear.weight, generator)
        linear.weight.copy_(nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator))
        if linear.bias is not None:
            bound = 1 / math.sqrt(linear.in_features) if linear.in_features > 0 else 0
            b = _drawable(linear.bias, generator)
            linear.bias.copy_(b.uniform_(-bound, bound, generator=generator))

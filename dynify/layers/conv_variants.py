"""Which convolution modules a dynamic layer can take over, and what they compute.

``nn.Conv2d`` and timm's conv variants whose function is known exactly (TF-'SAME' padding,
weight standardisation) convert; anything else that overrides ``Conv2d.forward`` does not,
since its function is unknown. timm's ``CondConv2d`` is already dynamic and is left alone.
The trace asks :func:`conversion_kind` why a conv stays static; the swap asks it which class
to build and :func:`effective_weight` for the kernel the original really convolves with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import (
    CondConv2d,
    Conv2dSame,
    ScaledStdConv2d,
    ScaledStdConv2dSame,
    StdConv2d,
    StdConv2dSame,
)
from timm.layers.conv2d_same import Conv2dSameExport
from torch import nn

from dynify.layers.base import DynamicLayer
from dynify.layers.dynamic_conv import DynamicConv2d
from dynify.layers.dynamic_conv_same import DynamicConv2dSame

__all__ = [
    "CONV_CLASSES",
    "SAME_PAD_CLASSES",
    "conversion_kind",
    "effective_weight",
    "is_conv",
    "is_conv_layer",
]

# timm's Conv2d subclasses whose forward dynify reproduces exactly.
_SUPPORTED = (Conv2dSame, StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame)
_STANDARDISED = (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame)
_KNOWN_FORWARDS = frozenset({nn.Conv2d.forward, *(cls.forward for cls in _SUPPORTED)})
# timm's classes that may pad TF-'SAME' style at run time (StdConv2dSame and
# ScaledStdConv2dSame when built with same_pad).
SAME_PAD_CLASSES: tuple[type[nn.Module], ...] = (Conv2dSame, StdConv2dSame, ScaledStdConv2dSame)

# The conv classes of torch and timm that the trace reports by name (a recipe's ``type``
# selector accepts these names); timm's export variant of 'SAME' padding is reported but,
# its forward being its own, left static.
CONV_CLASSES: tuple[type[nn.Module], ...] = (
    nn.Conv2d,
    Conv2dSame,
    Conv2dSameExport,
    StdConv2d,
    StdConv2dSame,
    ScaledStdConv2d,
    ScaledStdConv2dSame,
    CondConv2d,
)


def is_conv(module: nn.Module) -> bool:
    """A module the trace reports: any ``nn.Conv2d`` (timm subclasses included), or timm's
    CondConv2d (already dynamic, reported so the plan says why it is left alone)."""
    return isinstance(module, nn.Conv2d | CondConv2d)


def is_conv_layer(module: nn.Module) -> bool:
    """A module the cost model counts as one convolution layer: a conv the trace reports,
    or a dynamic layer that replaced one (its inner ops are priced as the layer's)."""
    return is_conv(module) or isinstance(module, DynamicLayer)


def _same_pad(module: nn.Module) -> bool:
    """Whether a timm conv pads TF-'SAME' style at run time."""
    if isinstance(module, Conv2dSame):
        return True
    return isinstance(module, StdConv2dSame | ScaledStdConv2dSame) and bool(module.same_pad)


def effective_weight(module: nn.Conv2d) -> torch.Tensor:
    """The kernel the module's forward really convolves with (weight standardisation applied
    exactly as timm's StdConv2d / ScaledStdConv2d do)."""
    if isinstance(module, _STANDARDISED):
        gain = None
        if isinstance(module, ScaledStdConv2d | ScaledStdConv2dSame):
            gain = (module.gain * module.scale).view(-1)
        return F.batch_norm(
            module.weight.reshape(1, module.out_channels, -1),
            None,
            None,
            weight=gain,
            training=True,
            momentum=0.0,
            eps=module.eps,
        ).reshape_as(module.weight)
    return module.weight


def conversion_kind(module: nn.Module) -> tuple[type[DynamicConv2d] | None, str | None]:
    """The dynamic class ``module`` converts to, or ``None`` and the reason it cannot."""
    name = type(module).__name__
    if isinstance(module, CondConv2d):
        return None, f"already dynamic (timm {name})"
    if not isinstance(module, nn.Conv2d):
        return None, f"not an nn.Conv2d ({name})"
    if type(module).forward not in _KNOWN_FORWARDS:
        return None, f"{name} overrides Conv2d.forward; dynify does not know its function"
    if isinstance(module.padding, str) and module.padding not in ("same", "valid"):
        return None, f"unsupported padding {module.padding!r}"
    return (DynamicConv2dSame if _same_pad(module) else DynamicConv2d), None

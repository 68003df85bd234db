"""DynamicConv2dSame: DynamicConv2d with TensorFlow's input-dependent 'SAME' padding.

timm's ``Conv2dSame`` (used by the ``tf_*`` ports of EfficientNet, MixNet, ...) pads each
input so that ``H_out = ceil(H / stride)``, splitting odd totals with the extra pixel on the
bottom/right. That depends on the input size, so it cannot be a fixed ``padding``.
"""

from __future__ import annotations

import torch
from timm.layers.padding import pad_same

from dynify.errors import DynifyError
from dynify.layers.dynamic_conv import DynamicConv2d

__all__ = ["DynamicConv2dSame"]


class DynamicConv2dSame(DynamicConv2d):
    """Same arguments as :class:`DynamicConv2d`; ``padding`` must be 0 (it is computed)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.padding != (0, 0) or self.padding_mode != "zeros":
            raise DynifyError("DynamicConv2dSame computes its padding: pass padding=0, 'zeros'")

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        return pad_same(x, self.kernel_size, self.stride, self.dilation)

"""Dynamic convolution layers."""

from dynify.layers._functional import choose_strategy, dynamic_conv2d, mix_kernels
from dynify.layers.attention import ATTENTION_KINDS, KernelAttention
from dynify.layers.dcd import DCDConv2d
from dynify.layers.dynamic_conv import PADDING_MODES, DynamicConv2d
from dynify.layers.odconv import ODAttention, ODConv2d
from dynify.layers.portable import per_sample_conv2d, portable

__all__ = [
    "ATTENTION_KINDS",
    "PADDING_MODES",
    "DCDConv2d",
    "DynamicConv2d",
    "KernelAttention",
    "ODAttention",
    "ODConv2d",
    "choose_strategy",
    "dynamic_conv2d",
    "mix_kernels",
    "per_sample_conv2d",
    "portable",
]

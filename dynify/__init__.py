"""dynify: turn static CNNs into dynamic-convolution networks.

The public API is what this module exports; everything in a module whose name starts with
an underscore is private.
"""

from dynify._version import __version__
from dynify.errors import DynifyError
from dynify.layers import DynamicConv2d, KernelAttention

__all__ = [
    "DynamicConv2d",
    "DynifyError",
    "KernelAttention",
    "__version__",
]

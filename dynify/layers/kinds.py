"""The kinds of dynamic convolution a recipe can name, and the layer class of each.

``dycnn`` (DY-CNN, Chen et al., CVPR 2020: softmax over K experts) and ``condconv``
(CondConv, Yang et al., NeurIPS 2019: sigmoid) share :class:`DynamicConv2d`; each later kind
has its own :class:`~dynify.layers.base.DynamicLayer` subclass (``dcd``: DCD, Li et al.,
ICLR 2021, :class:`~dynify.layers.DCDConv2d`). Registering a kind here is
what makes the converter, the planner's coverage check and the artifact loader know it.
"""

from __future__ import annotations

from dynify.errors import DynifyError, did_you_mean
from dynify.layers.base import DynamicLayer
from dynify.layers.dcd import DCDConv2d
from dynify.layers.dynamic_conv import DynamicConv2d
from dynify.layers.odconv import ODConv2d

__all__ = ["DEFAULT_KIND", "KINDS", "layer_class"]

DEFAULT_KIND = "dycnn"

# kind -> the class that builds it, in the order recipes and messages list them.
_CLASSES: dict[str, type[DynamicLayer]] = {
    "dycnn": DynamicConv2d,
    "condconv": DynamicConv2d,
    "odconv": ODConv2d,
    "dcd": DCDConv2d,
}

KINDS: tuple[str, ...] = tuple(_CLASSES)


def layer_class(kind: str) -> type[DynamicLayer]:
    """The class that builds ``kind``; a :class:`DynifyError` naming the kinds otherwise."""
    try:
        return _CLASSES[kind]
    except KeyError:
        raise DynifyError(
            f"kind must be one of {', '.join(KINDS)}, got {kind!r}{did_you_mean(kind, KINDS)}"
        ) from None

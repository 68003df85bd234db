"""Routing diagnostics: does a converted model's attention actually route?

Every kind of dynamic layer (``dynify.layers.base.DynamicLayer``) is measured the same way:
its routing is one ``(B, D)`` tensor, frozen at its mean for the effects below; the expert
figures (usage, entropy, expert spread) read the K expert weights of the kinds that mix
experts, and a kind that mixes none (DCD, ODConv with K = 1) counts as one expert, with the
sample spread of its whole routing relative to its size.

A dynamic layer is worth its K experts only if its attention differs from sample to sample
*and* its experts differ from one another; otherwise it computes a static conv with K times
the parameters. :func:`routing_report` measures both on a set of images, per layer:

- ``usage``: the mean attention weight of each expert over the images (normalised to sum
  to 1), what the PNG of :meth:`RoutingReport.plot` shows;
- ``entropy``: the mean over images of ``H(p(x)) / log K`` where ``p(x) = a(x) / sum_k
  a_k(x)`` are the layer's expert weights (softmax: the attention itself). 1 = uniform;
- ``sample_spread``: ``sqrt(mean_k Var_x p_k(x))``, how far the weights move from their
  mean across images (0 = the same weights for every image);
- ``expert_spread``: ``std(W_k - W_mean) / std(W_mean)`` over all kernel elements
  (0 = identical experts, so any routing gives the same kernel);
- ``output_effect``: ``||y - y_frozen|| / ||y||`` of the layer's own output when its
  attention ``a(x)`` is replaced by its mean over the images (the layer folded to a static
  conv with the kernel ``sum_k mean(a_k) W_k``);
- ``logit_effect`` and ``logit_flips`` (optional, one pass over the images per layer): the
  same replacement measured on the model's output, ``||f(x) - f_l(x)||_F / ||f(x)||_F``
  over the images, and the share of images whose top-1 prediction changes.

And for the whole model, ``effect`` / ``flips``: every dynamic layer frozen at once, which
is what folding the whole model to static convs would cost. Norms are Frobenius norms over
all images together. Everything runs in eval mode without gradients.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from timm.utils import unwrap_model
from torch import nn

from dynify._io import atomic_write_bytes
from dynify._modes import evaluating
from dynify._table import format_table
from dynify.errors import DynifyError
from dynify.layers.base import DynamicLayer

__all__ = [
    "LayerRouting",
    "RoutingReport",
    "dynamic_layers",
    "image_batches",
    "output_logits",
    "routing_report",
]

DEFAULT_IMAGES = 512


@dataclass(frozen=True)
class LayerRouting:
    """One dynamic layer's routing on a set of images (see the module documentation)."""

    name: str
    experts: int
    attention: str  # softmax / sigmoid (a mixture of experts), else the layer's kind
    usage: tuple[float, ...]
    entropy: float
    sample_spread: float
    expert_spread: float
    output_effect: float
    logit_effect: float | None = None
    logit_flips: float | None = None
    kind: str = "dycnn"  # dycnn, condconv, odconv, dcd

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["usage"] = list(self.usage)
        return out


@dataclass(frozen=True)
class RoutingReport:
    """Per-layer routing figures and the whole-model routing effect."""

    layers: tuple[LayerRouting, ...]
    images: int
    effect: float
    flips: float

    @property
    def entropy(self) -> float:
        """Mean expert-attention entropy over the layers that mix experts (1 = uniform
        everywhere; 1 too when no layer mixes experts, as for a single expert)."""
        mixing = [lr.entropy for lr in self.layers if lr.experts > 1]
        return _mean(mixing) if mixing else 1.0

    @property
    def sample_spread(self) -> float:
        return _mean([lr.sample_spread for lr in self.layers])

    @property
    def expert_spread(self) -> float:
        """Mean expert spread over the layers that mix experts (0 when none does)."""
        return _mean([lr.expert_spread for lr in self.layers if lr.experts > 1])

    def summary(self) -> str:
        """One line: the model's routing effect, flips and the layers' mean figures."""
        return (
            f"routing effect {100 * self.effect:.2f}% of the logits ({100 * self.flips:.1f}% "
            f"predictions flip), entropy {self.entropy:.3f}, sample spread "
            f"{self.sample_spread:.3f}, expert spread {self.expert_spread:.3f} "
            f"({len(self.layers)} layers, {self.images} images)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "effect": self.effect,
            "flips": self.flips,
            "entropy": self.entropy,
            "sample_spread": self.sample_spread,
            "expert_spread": self.expert_spread,
            "layers": [lr.to_dict() for lr in self.layers],
        }

    def table(self) -> str:
        logits = any(lr.logit_effect is not None for lr in self.layers)
        header = ["layer", "K", "usage (mean weight per expert)", "entropy", "sample spread",
                  "expert spread", "output effect"]  # fmt: skip
        if logits:
            header += ["logit effect", "flips"]
        rows = []
        for lr in self.layers:
            row = [
                lr.name,
                str(lr.experts),
                " ".join(f"{u:.2f}" for u in lr.usage),
                f"{lr.entropy:.3f}",
                f"{lr.sample_spread:.4f}",
                f"{lr.expert_spread:.4f}",
                f"{100 * lr.output_effect:.2f}%",
            ]
            if logits:
                row += [_pct(lr.logit_effect), _pct(lr.logit_flips, 1)]
            rows.append(row)
        return format_table(header, rows)

    def plot(self, path: str | Path) -> Path:
        """A PNG of attention use per layer: the mean weight of each expert (a heat map, one
        row per layer) beside each layer's routing effect and entropy."""
        # The object API, not pyplot: drawing a report must not change the process's backend.
        from matplotlib.figure import Figure

        if not self.layers:
            raise DynifyError("the model has no dynamic layers: nothing to plot")
        k_max = max(lr.experts for lr in self.layers)
        usage = torch.full((len(self.layers), k_max), float("nan"))
        for i, lr in enumerate(self.layers):
            usage[i, : lr.experts] = torch.tensor(lr.usage)
        height = 1.2 + 0.28 * len(self.layers)
        fig = Figure(figsize=(10, height))
        ax_u, ax_e = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [1.2, 1]})
        im = ax_u.imshow(usage.numpy(), aspect="auto", cmap="viridis", vmin=0)
        ax_u.set_yticks(range(len(self.layers)), [lr.name for lr in self.layers], fontsize=7)
        ax_u.set_xticks(range(k_max), [str(k) for k in range(k_max)])
        ax_u.set_xlabel("expert")
        ax_u.set_title("mean attention weight", fontsize=9)
        fig.colorbar(im, ax=ax_u, fraction=0.05)
        effects = [100 * lr.output_effect for lr in self.layers]
        ax_e.barh(range(len(self.layers)), effects, color="tab:orange", label="output effect")
        ax_e.set_xlabel("output change with routing frozen (%)")
        ax_e.set_title(
            f"model: {100 * self.effect:.2f}% of logits, {100 * self.flips:.1f}% flips",
            fontsize=9,
        )
        ax_h = ax_e.twiny()
        ax_h.plot([lr.entropy for lr in self.layers], range(len(self.layers)), "k.", ms=4)
        ax_h.set_xlim(0, 1.05)
        ax_h.set_xlabel("attention entropy (dots; 1 = uniform)", fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        path = Path(path)
        atomic_write_bytes(path, buf.getvalue())
        return path


def dynamic_layers(model: nn.Module) -> list[tuple[str, DynamicLayer]]:
    """``(name, layer)`` for every dynamic layer of ``model``, of any kind (DDP / compile
    wrappers unwrapped), in module order."""
    model = unwrap_model(model)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DynamicLayer)]


@torch.no_grad()
def routing_report(
    model: nn.Module,
    images: torch.Tensor | Iterable[Any],
    *,
    max_images: int = DEFAULT_IMAGES,
    logit_effects: bool = False,
) -> RoutingReport:
    """Measure how every dynamic layer of ``model`` routes on ``images``.

    Args:
        model: a converted model (``dynify.apply`` / ``dynify.load``); run in eval mode,
            restored afterwards.
        images: a ``(N, C, H, W)`` tensor, or an iterable of batches (tensors, or
            ``(images, labels)`` pairs such as a DataLoader yields), on any device: each
            batch is moved to the model's device.
        max_images: use at most this many images.
        logit_effects: also measure each layer's effect on the model's output (one more
            pass over the images per dynamic layer).

    Returns:
        A :class:`RoutingReport` (see the module documentation for every figure).
    """
    net = unwrap_model(model)
    layers = dynamic_layers(net)
    if not layers:
        raise DynifyError("the model has no dynamic layers (convert it with dynify.apply)")
    param = next(net.parameters())
    batches = image_batches(images, max_images, param.device, param.dtype)
    n = sum(b.shape[0] for b in batches)
    with evaluating(net):  # each module's mode comes back as it was (frozen BN stays)
        # Pass 1: every layer's attention, and the model's output.
        seen: dict[str, list[torch.Tensor]] = {name: [] for name, _ in layers}
        hooks = [
            layer.attention.register_forward_hook(_recorder(seen[name])) for name, layer in layers
        ]
        try:
            reference = [output_logits(net(x)) for x in batches]
        finally:
            for h in hooks:
                h.remove()
        # A layer the forward pass never reached (an unused branch) has nothing to report.
        layers = [(name, layer) for name, layer in layers if seen[name]]
        if not layers:
            raise DynifyError("no dynamic layer ran in the model's forward pass")
        attention = {name: torch.cat(seen[name]).double() for name, _ in layers}
        mean = {name: a.mean(dim=0) for name, a in attention.items()}

        # Pass 2: each layer's own output against its output with the routing frozen (the
        # layer sees the real input; the model continues with the real output).
        sq = {name: torch.zeros(2, dtype=torch.float64) for name, _ in layers}
        hooks = [
            layer.register_forward_hook(_local_effect(layer, mean[name], sq[name]))
            for name, layer in layers
        ]
        try:
            for x in batches:
                net(x)
        finally:
            for h in hooks:
                h.remove()

        # Pass 3 (and one per layer when asked): the model's output with routing frozen.
        effect, flips = _frozen_effect(net, batches, reference, layers, mean)
        per_layer: dict[str, tuple[float, float]] = {}
        if logit_effects:
            for name, layer in layers:
                per_layer[name] = _frozen_effect(net, batches, reference, [(name, layer)], mean)

    results = []
    for name, layer in layers:
        weights = layer.expert_weights(attention[name])
        if weights is not None:  # a mixture of K experts: the figures of its weights
            p = _normalised(weights)
            k = p.shape[1]
            entropy = 1.0 if k == 1 else float(_entropy(p).mean() / math.log(k))
            usage = p.mean(dim=0)
            spread = float(p.var(dim=0, unbiased=False).mean().sqrt())
        else:  # no experts (DCD, ODConv with K = 1): how far the routing moves, relatively
            k, entropy, usage = 1, 1.0, torch.ones(1)
            spread = _relative_spread(attention[name])
        kernels = layer.expert_kernels()
        total, diff = sq[name].tolist()
        logit = per_layer.get(name)
        results.append(
            LayerRouting(
                name=name,
                experts=k,
                attention=getattr(layer.attention, "kind", layer.kind),
                usage=tuple(float(u) for u in usage),
                entropy=entropy,
                sample_spread=spread,
                expert_spread=0.0 if kernels is None else expert_spread(kernels),
                output_effect=math.sqrt(diff / total) if total > 0 else 0.0,
                logit_effect=logit[0] if logit else None,
                logit_flips=logit[1] if logit else None,
                kind=layer.kind,
            )
        )
    return RoutingReport(tuple(results), n, effect, flips)


def expert_spread(weight: torch.Tensor) -> float:
    """``std(W_k - mean_k W) / std(mean_k W)`` over all elements of ``weight`` ``(K, ...)``."""
    w = weight.detach().double()
    if w.shape[0] < 2:
        return 0.0
    centre = w.mean(dim=0)
    scale = float(centre.std()) if centre.numel() > 1 else float(centre.abs().max())
    if scale == 0:
        return math.inf if bool((w != centre).any()) else 0.0
    return float((w - centre).std()) / scale


# -- helpers ------------------------------------------------------------------------------


def image_batches(
    images: Any, max_images: int, device: torch.device, dtype: torch.dtype
) -> list[torch.Tensor]:
    """At most ``max_images`` images of ``images`` (a ``(N, C, H, W)`` tensor, or batches of
    them or of ``(images, labels)`` pairs) as a list of batches on ``device``, floating
    point in ``dtype``: what every measurement here runs on."""
    if max_images < 1:
        raise DynifyError(f"max_images must be >= 1, got {max_images}")
    source = images.split(128) if isinstance(images, torch.Tensor) else images
    batches, n = [], 0
    for batch in source:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise DynifyError(
                "images must be a (N, C, H, W) tensor or batches of them (or (images, labels) "
                f"pairs), got {type(x).__name__}"
                + (f" of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else "")
            )
        x = x[: max_images - n]
        batches.append(x.to(device, dtype=dtype if x.is_floating_point() else None))
        n += x.shape[0]
        if n >= max_images:
            break
    if not batches:
        raise DynifyError("no images to measure the routing on")
    return batches


def output_logits(out: Any) -> torch.Tensor:
    """The logits of a model's output (a tensor, or the first tensor of a tuple), float."""
    if isinstance(out, torch.Tensor):
        return out.float()
    if isinstance(out, list | tuple) and out and isinstance(out[0], torch.Tensor):
        return out[0].float()
    raise DynifyError(f"the model's output is a {type(out).__name__}, expected a tensor")


def _recorder(store: list[torch.Tensor]):
    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        store.append(output.detach().float().cpu())

    return hook


def _local_effect(layer: DynamicLayer, mean: torch.Tensor, acc: torch.Tensor):
    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        (x,) = args
        frozen_routing = mean.to(output.device, output.dtype).expand(x.shape[0], -1)
        frozen = layer.forward_routed(x, frozen_routing)
        y = output.double()
        acc[0] += float(y.square().sum())
        acc[1] += float((y - frozen.double()).square().sum())

    return hook


def _freezer(mean: torch.Tensor):
    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return mean.to(output.device, output.dtype).expand_as(output)

    return hook


def _frozen_effect(
    net: nn.Module,
    batches: list[torch.Tensor],
    reference: list[torch.Tensor],
    layers: list[tuple[str, DynamicLayer]],
    mean: dict[str, torch.Tensor],
) -> tuple[float, float]:
    hooks = [layer.attention.register_forward_hook(_freezer(mean[n])) for n, layer in layers]
    total = diff = 0.0
    flipped = count = 0
    try:
        for x, ref in zip(batches, reference, strict=True):
            out = output_logits(net(x))
            total += float(ref.double().square().sum())
            diff += float((out.double() - ref.double()).square().sum())
            if ref.dim() == 2:
                flipped += int((out.argmax(dim=1) != ref.argmax(dim=1)).sum())
            count += ref.shape[0]
    finally:
        for h in hooks:
            h.remove()
    return (math.sqrt(diff / total) if total > 0 else 0.0), flipped / max(count, 1)


def _relative_spread(routing: torch.Tensor) -> float:
    """``sqrt(mean_d Var_x r_d(x) / mean_d mean_x r_d(x)^2)``: how far a routing vector that
    is not a set of expert weights moves across images, relative to its size (0 = the same
    for every image)."""
    power = float(routing.square().mean())
    if power == 0:
        return 0.0
    return math.sqrt(float(routing.var(dim=0, unbiased=False).mean()) / power)


def _normalised(a: torch.Tensor) -> torch.Tensor:
    return a / a.sum(dim=1, keepdim=True).clamp_min(1e-300)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-300).log()).sum(dim=1)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"

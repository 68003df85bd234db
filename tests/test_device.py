"""One device resolver for the cost model, latency and training."""

from __future__ import annotations

import pytest

from dynify.errors import DynifyError


def test_one_device_resolver_serves_cost_and_training() -> None:
    import torch

    from dynify import cost
    from dynify._device import resolve_device
    from dynify.train import distributed

    assert cost.resolve_device is resolve_device is distributed.resolve_device
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected
    with pytest.raises(DynifyError, match="'tpu9' is not a torch device"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(DynifyError, match="no CUDA device is available here"):
            resolve_device("cuda:1")

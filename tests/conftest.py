"""Shared pytest fixtures (kept generic: every test module may rely on them)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Seed torch's global generator before every test so failures are reproducible."""
    torch.manual_seed(0)

"""Straight-through clamp: values bounded, gradients kept."""

from __future__ import annotations

import torch


def straight_through_clamp(x: torch.Tensor, lo: torch.Tensor | None, hi: torch.Tensor | None) -> torch.Tensor:
    """Value clamped into [lo, hi], gradient of x unchanged. Bit-identical to x where no bound bites."""
    y = x
    if lo is not None:
        y = torch.maximum(y, lo)
    if hi is not None:
        y = torch.minimum(y, hi)
    return x + (y - x).detach()

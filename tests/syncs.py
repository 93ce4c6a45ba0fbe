"""Count device->host synchronisations made by a block of code (works on CPU too).

Every way a tensor's value reaches Python goes through one of these methods, and
each one is a host sync on an accelerator. A TorchFunctionMode sees them all.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_SYNCING = {
    torch.Tensor.__bool__,
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
}


class CountSyncs(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _SYNCING:
            self.count += 1
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))

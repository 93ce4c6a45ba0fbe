"""Name the first module whose output went non-finite.

Used on the failure path only (after a guard fired): it re-runs one forward with
a hook on every module and stops at the first module, in execution order, whose
output holds NaN or Inf. Forward hooks fire when a module *finishes*, so the
innermost culprit (a Linear with NaN weights) is named before the blocks that
contain it. Each hook costs a host sync, which is fine off the hot path.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

INPUTS = "<inputs>"


class _Found(Exception):
    def __init__(self, name: str) -> None:
        self.name = name


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif hasattr(obj, "to_tuple"):  # transformers ModelOutput
        yield from _tensors(obj.to_tuple())


def _nonfinite(obj: Any) -> bool:
    return any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in _tensors(obj))


def first_nonfinite_module(model: torch.nn.Module, *args: Any, **kwargs: Any) -> str | None:
    """Run ``model(*args, **kwargs)`` without grad and return the first module whose output is non-finite.

    Returns the module's qualified name (``""`` is the root), ``"<inputs>"`` when a
    floating input is already non-finite, or None when the whole forward is finite.
    All hooks are removed afterwards, also when the forward raises.
    """
    if _nonfinite((args, kwargs)):
        return INPUTS

    def hook_for(name: str):
        def hook(_module, _inputs, output):
            if _nonfinite(output):
                raise _Found(name)

        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in model.named_modules()]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except _Found as found:
        return found.name
    finally:
        for h in handles:
            h.remove()
    return None

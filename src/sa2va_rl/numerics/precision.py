"""fp32 master weights: trainable parameters live in fp32 whatever the model was loaded in; bf16 is autocast.

AdamW moves a weight by about lr per step: 1e-5 at lr 1e-5. A bf16 weight of scale 0.02 has an ulp of 2^-13 (1.2e-4;
8 significant bits), so an update below half of that (6.1e-5) rounds back to the same weight: a silent stall
(``tests/numerics/test_precision.py`` measures it). Casting the *trainable* tensors to fp32 and running the forward
under ``torch.autocast(bf16)`` keeps bf16 matmuls and fp32 updates. Frozen tensors keep their
dtype (bf16 halves their memory and they never take an update).
"""

from __future__ import annotations

import torch


def fp32_master_weights(model: torch.nn.Module) -> int:
    """Cast every trainable floating-point parameter of ``model`` to fp32 in place (the Parameter object is kept, so
    tied weights stay tied and optimizers built later see fp32). Frozen parameters keep their dtype. Returns the
    number of tensors cast."""
    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            if p.grad is not None:
                p.grad = p.grad.float()
            cast += 1
    return cast

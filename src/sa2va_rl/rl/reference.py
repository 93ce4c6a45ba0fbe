"""The KL reference pi_ref (``beta > 0``), built for the Policy path instead of by TRL.

TRL 1.16's GRPOTrainer, given ``beta > 0``, disables the adapters of a top-level ``PeftModel`` (or copies a
pretrained adapter as a "ref" adapter) and otherwise re-loads the model from ``model.config._name_or_path``.
Neither fits a Sa2VA model: its LoRA sits on the inner LLM (``model.language_model`` is the ``PeftModel``, the
outer model is not one), and re-loading a Sa2VA checkpoint from its path needs ``load_sa2va``, not an Auto class.
So the trainer hands ``beta = 0`` to TRL's constructor and builds the reference here, for every path:

* **LoRA** (any ``PeftModel`` inside the model, the LLM of a Sa2VA model or the whole causal LM): the reference
  is the policy's own model with every adapter disabled, no second copy; :class:`AdapterReference` stands in for
  TRL's ``ref_model`` and the trainer's scoring seam runs the Policy under :meth:`AdapterReference.disabled`.
  For a freshly initialised adapter (LoRA B = 0) that is exactly the initial policy.
* **Full fine-tuning** (no adapter): :func:`frozen_copy`, a deep copy of the model taken when the trainer is
  built (after the fp32 master-weight cast, so pi_ref = pi at step 0, bit for bit), every parameter frozen. On
  one process and under DDP the frozen parameters (vision tower, SAM2, anything not trained) are shared with the
  policy rather than copied: the copy costs only the trained parameters (:func:`reference_bytes`). Under FSDP and
  DeepSpeed the copy is whole, and sharded by TRL's own ``prepare_fsdp`` / ``prepare_deepspeed``.

The per-token KL TRL adds to the loss is k3, ``exp(r) - r - 1`` with ``r = log pi_ref - log pi``; the scoring
seam bounds ``|r|`` by ``log_ratio_clamp`` exactly as it bounds the policy ratio (:func:`bound_log_ratios`).
"""

from __future__ import annotations

import contextlib
import copy
import logging

import torch
from torch import nn

from sa2va_rl.numerics.clamp import straight_through_clamp

logger = logging.getLogger(__name__)


def peft_models(model: nn.Module) -> list[nn.Module]:
    """Every peft ``PeftModel`` in ``model`` (itself included), outermost first."""
    return [m for m in model.modules() if hasattr(m, "peft_config") and hasattr(m, "disable_adapter")]


class AdapterReference:
    """Stands in for TRL's ``ref_model`` when the model trains LoRA adapters: the reference is the same model with
    its adapters disabled. Holds no parameters; the trainer's scoring seam recognises it (see ``scoring``)."""

    kind = "adapter_disabled"

    def __init__(self, trainer) -> None:
        self._trainer = trainer

    @contextlib.contextmanager
    def disabled(self):
        """The policy's model, with every adapter in it disabled for the duration."""
        model = self._trainer.model
        with contextlib.ExitStack() as stack:
            for peft in peft_models(self._trainer.accelerator.unwrap_model(model)):
                stack.enter_context(peft.disable_adapter())
            yield model


def frozen_copy(model: nn.Module, share_frozen: bool = True) -> nn.Module:
    """A deep copy of ``model`` with every parameter frozen, in eval mode. ``share_frozen``: parameters that do not
    require grad are the very same tensors in the copy (they never change), so only trained ones are copied."""
    memo = {id(p): p for p in model.parameters() if not p.requires_grad} if share_frozen else {}
    ref = copy.deepcopy(model, memo)
    ref.requires_grad_(False)
    return ref.eval()


def reference_bytes(policy: nn.Module, ref) -> int:
    """Bytes the reference adds to memory: its parameters and buffers that are not the policy's own tensors (0 for
    an AdapterReference)."""
    if not isinstance(ref, nn.Module):
        return 0
    own = {t.data_ptr() for t in [*policy.parameters(), *policy.buffers()]}
    seen: set[int] = set()
    total = 0
    for t in [*ref.parameters(), *ref.buffers()]:
        if t.data_ptr() in own or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def build_reference(trainer, sync_ref_model: bool):
    """The reference for ``trainer`` (beta > 0): an AdapterReference when the model holds a peft adapter, else a
    frozen copy prepared for the run's engine as TRL prepares its own ``ref_model``."""
    from accelerate.utils import DistributedType

    model = trainer.accelerator.unwrap_model(trainer.model)
    if peft_models(model):
        if sync_ref_model:
            raise ValueError("sync_ref_model with a LoRA model: the reference is the model with its adapters "
                             "disabled, there is no copy to synchronise; use --sync_ref_model false, or full "
                             "fine-tuning (--lora_r 0) for a synchronised reference")
        logger.info("KL reference (beta=%g): the policy with its LoRA adapters disabled (no copy)", trainer.beta)
        return AdapterReference(trainer)
    engine = trainer.accelerator.distributed_type
    sharded = engine in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    ref = frozen_copy(model, share_frozen=not sharded)
    nbytes = reference_bytes(model, ref)
    if engine == DistributedType.DEEPSPEED:
        from trl.models.utils import prepare_deepspeed

        ref = prepare_deepspeed(ref, trainer.accelerator)
    elif engine == DistributedType.FSDP:
        from trl.models.utils import prepare_fsdp

        ref = prepare_fsdp(ref, trainer.accelerator)
    else:
        ref = trainer.accelerator.prepare_model(ref, evaluation_mode=True)
    if sync_ref_model:
        from trl.trainer.callbacks import SyncRefModelCallback

        trainer.add_callback(SyncRefModelCallback(ref_model=ref, accelerator=trainer.accelerator))
    logger.info("KL reference (beta=%g): a frozen copy of the model, %.1f MiB%s", trainer.beta, nbytes / 2**20,
                "" if sharded else " (its frozen parameters are shared with the policy)")
    return ref


@contextlib.contextmanager
def scoring(model):
    """What the scoring seam runs: the policy's model with adapters disabled for an AdapterReference, else
    ``model`` itself."""
    if isinstance(model, AdapterReference):
        with model.disabled() as m:
            yield m
    else:
        yield model


def bound_log_ratios(logps: torch.Tensor, old: torch.Tensor | None, ref: torch.Tensor | None,
                     c: float) -> torch.Tensor:
    """``logps`` clamped, straight-through (value bounded, gradient kept, bit-identical where no bound bites), to
    within ``c`` of pi_old and of pi_ref: the policy ratio ``exp(logp - old)`` is at most ``e^c`` and the k3 KL
    ``exp(ref - logp) - (ref - logp) - 1`` at most ``e^c - c - 1``. Where pi_old and pi_ref are more than 2c
    apart no value satisfies both; the ratio's upper bound wins."""
    los = [t - c for t in (old, ref) if t is not None]
    his = [t + c for t in (ref, old) if t is not None]
    lo = torch.stack(los).amax(dim=0) if los else None
    hi = torch.stack(his).amin(dim=0) if his else None
    return straight_through_clamp(logps, lo=lo, hi=hi)

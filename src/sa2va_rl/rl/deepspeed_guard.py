"""DeepSpeed ZeRO-1/2/3 under the GradGuard.

Under DeepSpeed, accelerate's ``Accelerator.backward`` hands the loss to its ``DeepSpeedEngineWrapper``, whose
``backward`` runs ``engine.backward(loss)`` and then ``engine.step()`` (clip, optimizer step, zero grad, scheduler):
transformers' clipping seam, where the GradGuard runs on every other engine, comes after the update.
``GuardedEngineWrapper`` subclasses that wrapper (the trainer installs it in place of accelerate's before the first
step) and puts the GradGuard between the two calls:

1. ``engine.backward(loss)`` at the accumulation boundary: ZeRO reduces the gradients and leaves each rank its
   partition in ``optimizer.averaged_gradients`` - the tensors DeepSpeed's own norm and overflow check read, and the
   ones its optimizer step would apply.
2. The GradGuard checks those partitions (``GradGuard.check_partitions``): every element of the global gradient is
   held by exactly one rank, so the global norm is the square root of the SUM over ranks of the local sums of
   squares, with NaN/inf from any rank kept: the definition every engine shares (numerics/grads.py), one
   all-reduce and one host sync. Every rank gets the same decision.
3. Finite: ``engine.step()`` as DeepSpeed would (it clips with its ``gradient_clipping`` and steps). Non-finite:
   ``engine.step()`` with DeepSpeed's overflow check on for that step (ZeRO-1/2: ``check_grad_overflow``; ZeRO-3
   treats an invalid norm as overflow always). The ZeRO optimizer then drops the gradients and returns before its
   optimizer step, so the fp32 master weights and the moments stay bit-identical, the engine's scheduler does not
   step, and the engine counts the step in its ``skipped_steps``. The wrapper checks ``engine.was_step_applied()``
   afterwards and raises if DeepSpeed applied the step anyway (never a silent update).

The trainer's ``_clip_grad_norm`` (which transformers calls after ``backward``) takes the report and does what it does
on one GPU: count, name the parameters with their ranks, halt or roll back after ``max_consecutive_skips``.

Supported: the ZeRO optimizers of stages 1, 2 and 3 (``DeepSpeedZeroOptimizer``, ``DeepSpeedZeroOptimizer_Stage3``)
without optimizer/parameter offload. fp16 is left to DeepSpeed's dynamic loss scaler, as fp16 is left to the
GradScaler on one GPU. Anything else is refused at start (``unguardable``), or runs only with
``--allow_unguarded_deepspeed``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch
from accelerate.utils.deepspeed import DeepSpeedEngineWrapper

from sa2va_rl.numerics import GradReport

logger = logging.getLogger(__name__)


def unguardable(ds_config: dict | None) -> str | None:
    """Why the GradGuard cannot run under this DeepSpeed config (None: it can). Read from the config at start."""
    zero = (ds_config or {}).get("zero_optimization") or {}
    stage = int(zero.get("stage", 0) or 0)
    if stage not in (1, 2, 3):
        return (f"ZeRO stage {stage} has no partitioned gradients for the GradGuard to read (DeepSpeed's stage-0 "
                "optimizers are not supported); without ZeRO, use configs/ddp.yaml (DDP), which is guarded")
    for key in ("offload_optimizer", "offload_param"):
        device = str((zero.get(key) or {}).get("device", "none")).lower()
        if device not in ("none", "null"):
            return (f"zero_optimization.{key}.device={device}: with offload, ZeRO keeps the gradients in its CPU/NVMe "
                    "buffers, which the GradGuard does not read (not supported, not tested); drop the offload, or "
                    "use FSDP2 (configs/fsdp.yaml)")
    return None


def zero_optimizer_kind(optimizer) -> int | None:
    """3 for ZeRO-3's optimizer, 12 for ZeRO-1/2's, None for any other (not guarded)."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        return 3
    if isinstance(optimizer, DeepSpeedZeroOptimizer) and not optimizer.cpu_offload:
        return 12
    return None


def zero_partitions(optimizer, names: dict[int, str]) -> list[tuple[str, torch.Tensor]]:
    """This rank's reduced gradient partitions, ``(parameter name, tensor)``, as DeepSpeed's own norm reads them
    after the boundary backward: ``averaged_gradients[group]`` lines up with the group's parameters in this
    partition (ZeRO-1/2: ``params_in_partition``, the first and last possibly cut; ZeRO-3: ``fp16_groups``, each
    parameter's shard); padding views (``_zero_padding``) are left out."""
    kind = zero_optimizer_kind(optimizer)
    groups = optimizer.fp16_groups if kind == 3 else optimizer.params_in_partition
    out: list[tuple[str, torch.Tensor]] = []
    for i, params in enumerate(groups):
        grads = optimizer.averaged_gradients.get(i)
        if grads is None or not params:
            continue
        grads = [g for g in grads if not getattr(g, "_zero_padding", False)]
        if len(grads) != len(params):
            raise RuntimeError(f"DeepSpeed ZeRO: group {i} holds {len(grads)} gradient partitions for {len(params)} "
                               "parameters; this DeepSpeed version lays them out differently (the GradGuard cannot "
                               "name them)")
        out.extend((names.get(id(p), f"group{i}.param{j}"), g) for j, (p, g) in enumerate(zip(params, grads)))
    return out


@contextlib.contextmanager
def _overflow_check_on(optimizer):
    """ZeRO-1/2 run their overflow check only when ``check_grad_overflow`` is set (bf16's default, not fp32's): on for
    the one step the GradGuard skips. ZeRO-3 always treats a non-finite norm as overflow."""
    if not hasattr(optimizer, "check_grad_overflow"):
        yield
        return
    before = optimizer.check_grad_overflow
    optimizer.check_grad_overflow = True
    try:
        yield
    finally:
        optimizer.check_grad_overflow = before


class GuardedEngineWrapper(DeepSpeedEngineWrapper):
    """accelerate's DeepSpeedEngineWrapper with the GradGuard between ``engine.backward`` and ``engine.step``.

    Args:
        engine: the DeepSpeed engine.
        check: called after the boundary backward with the engine, returns the GradGuard's report (a decision every
            rank shares).
    """

    def __init__(self, engine, check: Callable[[object], GradReport]) -> None:
        super().__init__(engine)
        self.check = check
        self.report: GradReport | None = None  # the last boundary's report, taken by the trainer's _clip_grad_norm

    def backward(self, loss, sync_gradients=True, **kwargs):
        if not sync_gradients:  # accumulating: no step, nothing to check
            return super().backward(loss, sync_gradients=False, **kwargs)
        self.engine.set_gradient_accumulation_boundary(is_boundary=True)
        self.engine.backward(loss, **kwargs)
        self.report = report = self.check(self.engine)
        if report.finite:
            self.engine.step()
            if not self.engine.was_step_applied():
                logger.warning("DeepSpeed skipped a step whose gradients the GradGuard found finite (norm %g): its "
                               "own overflow check (fp32 overflow of the norm, or the fp16 loss scale)", report.norm)
            return
        with _overflow_check_on(self.engine.optimizer):
            self.engine.step()  # DeepSpeed's overflow path: gradients dropped, no optimizer step, no scheduler step
        if self.engine.was_step_applied():
            raise RuntimeError("DeepSpeed applied a step whose gradients the GradGuard found non-finite "
                               f"({report.kind}); its overflow path did not run. Stop: the weights may be corrupt. "
                               "This DeepSpeed version is not supported by the guard (docs/distributed.md)")

    def take_report(self) -> GradReport:
        report, self.report = self.report, None
        if report is None:
            raise RuntimeError("GradGuard under DeepSpeed: no report for this optimizer step (the guarded backward "
                               "did not run at the accumulation boundary)")
        return report

"""GradGuard: decide, once per optimizer step, whether the gradients may be applied.

It runs between ``backward`` and ``optimizer.step``, *before* gradient clipping:
clipping multiplies every gradient by ``max_norm / total_norm``, so one NaN
gradient makes every gradient NaN once clipped and the evidence of where it came
from is gone.

Cost. The fast path is the pass that clipping needs anyway: per-tensor L2 norms
from ``torch._foreach_norm`` (fused kernels), their total on the device, and one
``.tolist()`` (the only host sync). A finite total proves every gradient finite.
``clip_()`` then scales by that same norm, so check + clip reads the gradients
exactly as often as ``clip_grad_norm_`` alone.

Finiteness is decided by the inf-norm (``max |g|``) whenever the total L2 norm is
not finite: the L2 norm of huge-but-finite gradients overflows in fp32 (1e20
squared is 1e40) while ``max |g|`` stays finite, and both propagate NaN. The
inf-norm kernel is slow on CPU (~6x an L2 pass), so it only runs on that path.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch

from sa2va_rl.numerics._ratelimit import PowerOfTwoLimiter

logger = logging.getLogger(__name__)

NamedParams = Iterable[tuple[str, torch.nn.Parameter]]


@dataclass
class GradReport:
    """What one check found. ``norm`` is the total L2 norm (may be inf for huge finite grads)."""

    finite: bool
    norm: float
    max_abs: float | None  # computed on the slow path only (it costs a slow pass on CPU)
    nonfinite_params: list[str] = field(default_factory=list)  # first few, slow path only
    num_nonfinite_params: int = 0
    num_tensors: int = 0

    @property
    def kind(self) -> str:
        """'ok', 'nan' or 'inf' (NaN wins when both are present)."""
        if self.finite:
            return "ok"
        return "nan" if self.max_abs is None or math.isnan(self.max_abs) else "inf"


@dataclass
class GradStats:
    """Running statistics over checked steps, saved with checkpoints."""

    steps: int = 0
    finite_steps: int = 0
    skipped_steps: int = 0
    nan_steps: int = 0
    inf_steps: int = 0
    consecutive_nonfinite: int = 0
    norm_sum: float = 0.0
    norm_min: float = math.inf
    norm_max: float = 0.0
    last_norm: float = 0.0

    @property
    def norm_mean(self) -> float:
        return self.norm_sum / self.finite_steps if self.finite_steps else 0.0


class GradGuard:
    """Checks gradients for finiteness with one host sync and drops non-finite steps.

    Args:
        max_names: how many offending parameter names a report carries.
    """

    def __init__(self, max_names: int = 5) -> None:
        self.max_names = max_names
        self.stats = GradStats()
        self._limiter = PowerOfTwoLimiter()
        self._grads: list[torch.Tensor] = []
        self._total: torch.Tensor | None = None  # device scalar of the last finite check, for clip_

    def check(self, model_or_params: torch.nn.Module | NamedParams) -> GradReport:
        named = model_or_params.named_parameters() if isinstance(model_or_params, torch.nn.Module) else model_or_params
        names, grads = [], []
        for name, p in named:
            if p.grad is not None:
                names.append(name)
                grads.append(p.grad)
        self._grads, self._total = grads, None
        if not grads:
            return self._record(GradReport(finite=True, norm=0.0, max_abs=0.0))

        per_l2 = self._per_tensor_norms(grads, 2.0)  # fp32 [N]
        total = self._all_reduce_max(torch.linalg.vector_norm(per_l2))
        norm = total.tolist()  # the one host sync of the fast path
        if math.isfinite(norm):
            self._total = total
            return self._record(GradReport(finite=True, norm=norm, max_abs=None, num_tensors=len(grads)))

        # Slow path: inf or NaN total. The inf-norm says whether any gradient is really non-finite.
        per_max = self._per_tensor_norms(grads, math.inf)
        max_abs = self._all_reduce_max(per_max.max()).tolist()
        report = GradReport(finite=math.isfinite(max_abs), norm=norm, max_abs=max_abs, num_tensors=len(grads))
        if report.finite:  # huge but finite: the L2 norm overflowed; recompute it on g / max|g|, in fp64
            scaled = [g.double() / max_abs for g in grads]
            self._total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(scaled, 2.0))) * max_abs
        else:
            bad = (~torch.isfinite(per_max)).nonzero().squeeze(1).tolist()
            report.num_nonfinite_params = len(bad)
            report.nonfinite_params = [names[i] for i in bad[: self.max_names]]
        return self._record(report)

    def clip_(self, max_norm: float, eps: float = 1e-6) -> None:
        """Scale the gradients of the last healthy ``check`` to total norm <= max_norm, as
        ``torch.nn.utils.clip_grad_norm_`` does, reusing the norm already computed."""
        if self._total is None:
            raise RuntimeError("GradGuard.clip_() needs a preceding check() that found finite gradients")
        coef = (max_norm / (self._total + eps)).clamp(max=1.0)
        by_device: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for g in self._grads:
            by_device.setdefault((g.device, g.dtype), []).append(g)
        for (device, dtype), gs in by_device.items():
            torch._foreach_mul_(gs, coef.to(device=device, dtype=dtype))

    def skip(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop this step: every gradient the optimizer holds becomes None.

        ``torch.optim`` skips parameters without a gradient, so moments and step
        counts stay bit-identical. Call it instead of clipping and stepping (or
        before a step that cannot be avoided).
        """
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.stats.skipped_steps += 1

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """JSON-safe: ``norm_min`` is None until a finite step has been seen (inf is not JSON)."""
        stats = asdict(self.stats)
        stats["norm_min"] = None if math.isinf(stats["norm_min"]) else stats["norm_min"]
        return {"stats": stats, "limiter": self._limiter.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        stats = dict(state["stats"])
        stats["norm_min"] = math.inf if stats["norm_min"] is None else stats["norm_min"]
        self.stats = GradStats(**stats)
        self._limiter.load_state_dict(state["limiter"])

    # ------------------------------------------------------------- internals
    @staticmethod
    def _per_tensor_norms(grads: list[torch.Tensor], ord: float) -> torch.Tensor:
        """fp32 [N] norms of each gradient, gathered on the first gradient's device."""
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g._values() if g.is_sparse else g)
        home = grads[0].device
        return torch.cat([torch.stack(torch._foreach_norm(gs, ord)).float().to(home) for gs in by_device.values()])

    @staticmethod
    def _all_reduce_max(x: torch.Tensor) -> torch.Tensor:
        """Every rank must take the same decision: MAX over ranks, with NaN kept (MAX alone drops it)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return x
        packed = torch.stack([x.nan_to_num(nan=math.inf), torch.isnan(x).to(x.dtype)])
        torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.MAX)
        return torch.where(packed[1] > 0, torch.full_like(packed[0], math.nan), packed[0])

    def _record(self, report: GradReport) -> GradReport:
        s = self.stats
        s.steps += 1
        if report.finite:
            s.finite_steps += 1
            s.consecutive_nonfinite = 0
            s.norm_sum += report.norm
            s.norm_min = min(s.norm_min, report.norm)
            s.norm_max = max(s.norm_max, report.norm)
            s.last_norm = report.norm
            return report
        s.consecutive_nonfinite += 1
        if report.kind == "nan":
            s.nan_steps += 1
        else:
            s.inf_steps += 1
        if self._limiter():
            logger.warning(
                "GradGuard: non-finite gradients (%s) at check %d in %d of %d local gradient tensors, "
                "first: %s%s; %d non-finite step(s) in a row, %d in total. (Logged on the 1st, 2nd, 4th... event.)",
                report.kind, s.steps, report.num_nonfinite_params, report.num_tensors,
                report.nonfinite_params, "" if report.nonfinite_params else " (none local: another rank)",
                s.consecutive_nonfinite, s.nan_steps + s.inf_steps,
            )
        return report

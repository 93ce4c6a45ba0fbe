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

Several processes. The norm has one definition for every engine: the L2 norm of the *global* gradient, i.e. over
all ranks' shards. Each rank squares its local per-tensor norms and splits them in two sums: sharded tensors (FSDP1
flat/orig params of a sharded strategy, DTensors with a ``Shard`` placement: every element lives on one rank) and
replicated ones (DDP, ``Replicate`` DTensors, NO_SHARD: every rank holds the whole tensor). One SUM all-reduce of
``[sharded sum, replicated sum on rank 0 only, nan flag, inf flag]`` gives the global sum of squares with each
element counted once; the flags make a NaN or inf seen by any rank the decision of every rank (NaN wins). Engines
differ only in how a gradient's local part and its layout are read (``local_part``); DTensors are never gathered
(``full_tensor`` is not used). Still one host sync on the fast path. One process: the original single reduction,
bit-identical.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
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
    nonfinite_params: list[str] = field(default_factory=list)  # first few on this rank, slow path only
    # {rank: first few names} over every rank that saw a non-finite gradient (slow path; {0: ...} with one process)
    nonfinite_by_rank: dict[int, list[str]] = field(default_factory=dict)
    world_size: int = 1  # processes that took this decision together
    num_nonfinite_params: int = 0
    num_tensors: int = 0
    extra: list[float] = field(default_factory=list)  # what check(extra=...) computed, read in the same sync

    @property
    def all_nonfinite_params(self) -> list[str]:
        """The names over all ranks, ``name (rank r)`` with several processes, in rank order."""
        if not self.nonfinite_by_rank:
            return list(self.nonfinite_params)
        if self.world_size == 1:
            return list(self.nonfinite_by_rank.get(0, []))
        return [f"{n} (rank {r})" for r, names in sorted(self.nonfinite_by_rank.items()) for n in names]

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


class _GradHolder:
    """A bare gradient tensor seen as a parameter (``.grad``), so partitions go through the one-process path."""

    __slots__ = ("grad",)

    def __init__(self, grad: torch.Tensor) -> None:
        self.grad = grad


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return None
    return DTensor


def fsdp1_sharded_ids(model: torch.nn.Module | None) -> set[int]:
    """ids of the parameters (flat params and, with use_orig_params, the original ones) that FSDP1 shards across
    the whole world. HYBRID strategies (sharded within a node, replicated across nodes) are refused."""
    if model is None:
        return set()
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover
        return set()
    ids: set[int] = set()
    for m in model.modules():
        if not isinstance(m, FSDP):
            continue
        if "HYBRID" in str(getattr(m, "sharding_strategy", "")):
            raise NotImplementedError(
                f"GradGuard: FSDP1 {m.sharding_strategy} (sharded within a node, replicated across nodes) is not "
                "supported; use FULL_SHARD or SHARD_GRAD_OP")
        h = getattr(m, "_handle", None)
        if h is None or not h.uses_sharded_strategy:
            continue
        ids.add(id(h.flat_param))
        if h._use_orig_params:
            ids.update(id(p) for p in h.flat_param._params)
    return ids


def local_part(t: torch.Tensor, key: torch.Tensor, sharded_ids: set[int]) -> tuple[torch.Tensor, bool]:
    """(this rank's part of ``t`` as a plain tensor, whether other ranks hold other parts of it).

    ``key`` is the parameter ``t`` belongs to (FSDP1 is recognised by its parameters). DTensors: the local shard;
    ``Shard`` placements are sharded, ``Replicate`` ones replicated; ``Partial`` (unreduced) and meshes that do not
    span the whole world (HSDP) are refused rather than normed wrongly.
    """
    DTensor = _dtensor_type()
    if DTensor is not None and isinstance(t, DTensor):
        placements = t.placements
        if any(p.is_partial() for p in placements):
            raise NotImplementedError(f"GradGuard: a DTensor gradient with a Partial placement {placements} (not "
                                      "reduced yet) cannot be normed")
        world = torch.distributed.get_world_size() if _distributed() else 1
        sharded = any(p.is_shard() for p in placements)
        if sharded and (t.device_mesh.ndim != 1 or t.device_mesh.size() != world):
            raise NotImplementedError(f"GradGuard: DTensor on mesh {t.device_mesh} (not one dimension spanning all "
                                      f"{world} ranks, e.g. HSDP) is not supported")
        return t.to_local(), sharded
    return t, id(key) in sharded_ids


_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def unwrapped_named_parameters(model: torch.nn.Module):
    """named_parameters() under the names of the unwrapped model: DDP's ``module.`` prefix and FSDP1's (and
    activation checkpointing's, torch.compile's) wrapper segments removed."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    for name, p in model.named_parameters():
        for seg in _WRAPPER_SEGMENTS:
            name = name.replace(seg, "")
        yield name, p


def _collective_device() -> torch.device:
    """Where a collective's tensors must live: the current CUDA device under NCCL, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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

    def check(self, model_or_params: torch.nn.Module | NamedParams,
              extra: Callable[[torch.Tensor], torch.Tensor] | None = None) -> GradReport:
        """``extra(total_norm)``, when given, returns a 1-D device tensor computed from the (device) total norm,
        e.g. spike flags; it is read back in the same host sync as the norm and lands in ``report.extra``."""
        is_module = isinstance(model_or_params, torch.nn.Module)
        named = model_or_params.named_parameters() if is_module else model_or_params
        if not _distributed():
            return self._check_local(named, extra)
        sharded_ids = fsdp1_sharded_ids(model_or_params if is_module else None)
        if is_module:  # the names a user knows: without DDP's "module." and FSDP1's wrapper segments
            named = unwrapped_named_parameters(model_or_params)
        names, grads, sharded = [], [], []
        for name, p in named:
            if p.grad is not None:
                g, is_sharded = local_part(p.grad, p, sharded_ids)
                names.append(name)
                grads.append(g)
                sharded.append(is_sharded)
        return self._check_global(names, grads, sharded, extra)

    def check_partitions(self, named_parts: Iterable[tuple[str, torch.Tensor]]) -> GradReport:
        """Check gradients that an engine has already reduced and partitioned: ``(name, this rank's part)`` pairs,
        every element of the global gradient held by exactly one rank (DeepSpeed ZeRO's partitions). Same norm, same
        decision and the same single host sync as ``check``; a name may appear on several ranks (a parameter split
        across partitions). With one process the parts are the whole gradient."""
        named_parts = list(named_parts)
        if not _distributed():
            return self._check_local((n, _GradHolder(g)) for n, g in named_parts)
        names = [n for n, _ in named_parts]
        grads = [g for _, g in named_parts]
        return self._check_global(names, grads, [True] * len(grads))

    def _check_global(self, names: list[str], grads: list[torch.Tensor], sharded: list[bool],
                      extra: Callable[[torch.Tensor], torch.Tensor] | None = None) -> GradReport:
        """Several processes: this rank's gradient parts, each flagged sharded or replicated (module docstring)."""
        self._grads, self._total = grads, None
        home = grads[0].device if grads else _collective_device()
        mask = torch.tensor(sharded, dtype=torch.bool).to(home, non_blocking=True)  # host->device, not a sync

        per_l2 = self._per_tensor_norms(grads, 2.0, home)  # fp32 [N], this rank's parts
        total = self._global_l2(per_l2, mask)  # every rank: the same global norm, NaN/inf from any rank kept
        norm, more = self._read(total, extra)  # the one host sync of the fast path
        if math.isfinite(norm):
            self._total = total
            return self._record(GradReport(finite=True, norm=norm, max_abs=None, num_tensors=len(grads),
                                           extra=more))

        per_max = self._per_tensor_norms(grads, math.inf, home)
        local_max = per_max.max() if len(grads) else torch.zeros((), device=home)
        max_abs = self._all_reduce_max(local_max).tolist()
        report = GradReport(finite=math.isfinite(max_abs), norm=norm, max_abs=max_abs, num_tensors=len(grads),
                            extra=more)
        if report.finite:  # huge but finite: the squares overflowed; recompute on g / max|g|, in fp64
            scaled = [g.double() / max_abs for g in grads]
            per = torch.stack(torch._foreach_norm(scaled, 2.0)) if scaled else torch.zeros(0, device=home).double()
            self._total = self._global_l2(per, mask) * max_abs
        else:
            bad = (~torch.isfinite(per_max)).nonzero().squeeze(1).tolist()
            report.num_nonfinite_params = len(bad)
            report.nonfinite_params = [names[i] for i in bad[: self.max_names]]
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, report.nonfinite_params)  # slow path only
            report.nonfinite_by_rank = {r: names_r for r, names_r in enumerate(gathered) if names_r}
            report.world_size = len(gathered)
        return self._record(report)

    @staticmethod
    def _read(total: torch.Tensor, extra) -> tuple[float, list[float]]:
        """(norm, extra values) in one host sync. Without ``extra``, the original ``total.tolist()``."""
        if extra is None:
            return total.tolist(), []
        more = extra(total).reshape(-1)
        vals = torch.cat([total.reshape(1).double(), more.to(device=total.device, dtype=torch.float64)]).tolist()
        return vals[0], vals[1:]

    def _check_local(self, named: NamedParams, extra=None) -> GradReport:
        """One process: the original single-reduction path (kept bit-identical)."""
        names, grads = [], []
        for name, p in named:
            if p.grad is not None:
                names.append(name)
                grads.append(p.grad)
        self._grads, self._total = grads, None
        if not grads:
            more = self._read(torch.zeros(()), extra)[1]
            return self._record(GradReport(finite=True, norm=0.0, max_abs=0.0, extra=more))

        per_l2 = self._per_tensor_norms(grads, 2.0)  # fp32 [N]
        total = torch.linalg.vector_norm(per_l2)
        norm, more = self._read(total, extra)  # the one host sync of the fast path
        if math.isfinite(norm):
            self._total = total
            return self._record(GradReport(finite=True, norm=norm, max_abs=None, num_tensors=len(grads),
                                           extra=more))

        # Slow path: inf or NaN total. The inf-norm says whether any gradient is really non-finite.
        per_max = self._per_tensor_norms(grads, math.inf)
        max_abs = per_max.max().tolist()
        report = GradReport(finite=math.isfinite(max_abs), norm=norm, max_abs=max_abs, num_tensors=len(grads),
                            extra=more)
        if report.finite:  # huge but finite: the L2 norm overflowed; recompute it on g / max|g|, in fp64
            scaled = [g.double() / max_abs for g in grads]
            self._total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(scaled, 2.0))) * max_abs
        else:
            bad = (~torch.isfinite(per_max)).nonzero().squeeze(1).tolist()
            report.num_nonfinite_params = len(bad)
            report.nonfinite_params = [names[i] for i in bad[: self.max_names]]
            report.nonfinite_by_rank = {0: list(report.nonfinite_params)}
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

    def skip(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Drop this step: every gradient the optimizer holds becomes None.

        ``torch.optim`` skips parameters without a gradient, so moments and step
        counts stay bit-identical. Call it instead of clipping and stepping (or
        before a step that cannot be avoided). ``None``: an engine dropped the
        gradients itself (DeepSpeed's overflow path); only counted.
        """
        for group in optimizer.param_groups if optimizer is not None else ():
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
    def _per_tensor_norms(grads: list[torch.Tensor], ord: float, home: torch.device | None = None) -> torch.Tensor:
        """fp32 [N] norms of each gradient, gathered on the first gradient's device."""
        if not grads:
            return torch.zeros(0, device=home)
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g._values() if g.is_sparse else g)
        home = grads[0].device
        return torch.cat([torch.stack(torch._foreach_norm(gs, ord)).float().to(home) for gs in by_device.values()])

    @staticmethod
    def _global_l2(per: torch.Tensor, sharded: torch.Tensor) -> torch.Tensor:
        """The global L2 norm from this rank's per-tensor norms: one SUM all-reduce of [sharded sum of squares,
        replicated sum of squares (rank 0's only: every rank holds the same), nan flag, inf flag]."""
        sq = per.square()
        zero = torch.zeros((), dtype=sq.dtype, device=sq.device)
        shard_sq = torch.where(sharded, sq, zero).sum()
        rep_sq = torch.where(sharded, zero, sq).sum()
        local = shard_sq + rep_sq  # NaN/inf anywhere on this rank
        mine = rep_sq if torch.distributed.get_rank() == 0 else zero
        packed = torch.stack([shard_sq, torch.where(torch.isfinite(mine), mine, zero), torch.isnan(local).to(sq.dtype),
                              torch.isinf(local).to(sq.dtype)])
        torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.SUM)
        total = (packed[0].nan_to_num(nan=0.0, posinf=0.0) + packed[1]).sqrt()
        total = torch.where(packed[3] > 0, torch.full_like(total, math.inf), total)
        return torch.where(packed[2] > 0, torch.full_like(total, math.nan), total)

    @staticmethod
    def _all_reduce_max(x: torch.Tensor) -> torch.Tensor:
        """Every rank must take the same decision: MAX over ranks, with NaN kept (MAX alone drops it)."""
        if not _distributed():
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
                report.nonfinite_params, "" if report.nonfinite_params else
                f" (none local; by rank: {report.nonfinite_by_rank})",
                s.consecutive_nonfinite, s.nan_steps + s.inf_steps,
            )
        return report

"""LogitsGuard: a transformers ``LogitsProcessor`` that makes sampling safe without changing healthy rows.

Why not the usual patch (clamp to +-30, NaN -> -100, a 1e-8 probability floor)?
That touches every row at every step: the floor moves ~1e-8 * vocab (~1.5e-3 for
Qwen's 151k rows) of probability onto junk tokens, revives tokens that top-k/top-p
or the padded vocabulary rows masked with -inf, and lets a run with NaN weights go
on sampling garbage. The sampler is then not the policy that the loss scores.

This guard instead:

* decides health for every row with one ``amax`` over the vocabulary (one read of
  the logits) and one host sync per call (the [batch] row maxima, compared on the host);
* returns healthy rows bit-identical (the same tensor object, in fact);
* repairs only broken rows, and records which (row, step) pairs it repaired so
  the trainer can drop exactly those tokens from the policy-gradient loss.

A row is **healthy** when it has no NaN, no +inf, no entry above
``max_abs_logit``, and at least one entry above -inf. -inf entries are masks;
very negative finite values are harmless and left alone.

Repair policy, applied to broken rows only (in fp32, written back in the input dtype):

1. NaN -> -inf. A NaN logit says nothing about the token, so it is not sampled.
2. +inf and finite entries above ``max_abs_logit`` -> ``max_abs_logit``. An
   overflowed logit means "very likely"; clamping keeps that order while making
   the row finite. Several +inf tokens end up tied.
3. The row is shifted so its maximum is exactly 0 (softmax is shift invariant),
   and usable entries are kept within the dtype's finite range.
   Every later temperature (any T > 0), top-k, top-p or min-p warper then keeps
   at least one finite entry, in fp32, bf16 or fp16 alike.
4. -inf entries stay -inf: a masked token is never revived.
5. A row with no usable entry at all (all NaN / -inf) falls back to a one-hot
   row on ``eos_token_id`` (token 0 when there is none), flagged as ``fallback``.
   This is the only case where a formerly -inf entry becomes finite.

Order in ``generate``: transformers (5.x) runs user ``logits_processor`` entries
before its own temperature/top-k/top-p warpers. Because repaired rows are
bounded with their maximum at 0, and healthy rows are bounded by
``max_abs_logit`` by definition, the warpers that follow cannot create a row
that ``torch.multinomial`` rejects, so the guard does not have to run last.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import asdict, dataclass

import torch

from sa2va_rl.numerics._ratelimit import PowerOfTwoLimiter

try:  # Subclass transformers' processor when it is there; the guard itself is plain torch.
    from transformers import LogitsProcessor as _Base
except Exception:  # pragma: no cover - transformers is a hard dependency of the package
    _Base = object

logger = logging.getLogger(__name__)


def fixed_signature(cls):
    """Class decorator for logits processors: store ``__call__``'s signature on it. transformers'
    ``LogitsProcessorList`` runs ``inspect.signature(processor.__call__)`` for every processor at every decoding step
    (to see whether it takes extra kwargs); a stored ``__signature__`` makes that lookup about 3x cheaper
    (9 -> 3 us per processor and step on CPU)."""
    cls.__call__.__signature__ = inspect.signature(cls.__call__)
    return cls


@dataclass
class LogitsGuardStats:
    """Cumulative counters. A row can count under several causes."""

    calls: int = 0
    rows_seen: int = 0
    rows_repaired: int = 0
    nan_rows: int = 0
    posinf_rows: int = 0
    huge_rows: int = 0
    fallback_rows: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@fixed_signature
class LogitsGuard(_Base):
    """Repairs non-finite logit rows before sampling; healthy rows pass through untouched.

    Args:
        eos_token_id: token a row with no usable entry falls back to. An int, a
            list (the first is used), or None for token 0.
        max_abs_logit: entries above this are treated as overflow. Real LM
            logits sit well below 100; 1e4 leaves room for any temperature >= 0.1
            in fp32 and still flags values that came from an overflow.
    """

    def __init__(self, eos_token_id: int | list[int] | None = None, max_abs_logit: float = 1e4) -> None:
        if not (math.isfinite(max_abs_logit) and max_abs_logit > 0):
            raise ValueError(f"max_abs_logit must be a positive finite number, got {max_abs_logit!r}")
        if isinstance(eos_token_id, (list, tuple)):
            eos_token_id = eos_token_id[0] if eos_token_id else None
        self.fallback_token_id = int(eos_token_id) if eos_token_id is not None else 0
        self.max_abs_logit = float(max_abs_logit)
        self.stats = LogitsGuardStats()
        self._limiter = PowerOfTwoLimiter()
        # One entry per call: None (no row repaired) or a bool [batch] tensor.
        self._steps: list[torch.Tensor | None] = []
        self._batch: int | None = None
        self._limits = {d: float(torch.tensor(self.max_abs_logit, dtype=d))  # max_abs_logit as each dtype rounds it
                        for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}

    # ------------------------------------------------------------------ API
    def __call__(self, input_ids: torch.LongTensor | None, scores: torch.Tensor) -> torch.Tensor:
        if scores.dim() != 2:
            raise ValueError(f"LogitsGuard expects scores of shape [batch, vocab], got {tuple(scores.shape)}")
        batch = scores.shape[0]
        if self._batch is None:
            self._batch = batch
        elif batch != self._batch:
            raise ValueError(
                f"LogitsGuard saw batch size {batch} after {self._batch} without pop_repaired(); "
                "call pop_repaired() (or reset()) between generate() calls"
            )
        self.stats.calls += 1
        self.stats.rows_seen += batch

        # One read of the logits decides every row: amax propagates NaN and +inf,
        # and is -inf only when the whole row is masked.
        row_max = scores.amax(dim=-1)  # [B]
        # the row maxima on the host: the one host sync of the healthy path, and its only tensor op besides the amax
        # (B floats; a per-row test on the device, or its aminmax, costs more tensor ops than the host compare)
        lim = self._limit(scores.dtype)
        if all(-math.inf < m <= lim for m in row_max.tolist()):  # NaN compares False
            self._steps.append(None)
            return scores
        broken = ~((row_max <= self.max_abs_logit) & (row_max > -math.inf))
        self._steps.append(broken)
        return self._repair(scores, broken)

    def _limit(self, dtype: torch.dtype) -> float:
        """``max_abs_logit`` as a tensor of ``dtype`` compares it (rounded to the dtype), so that the healthy-path test
        on host floats and the per-row test on tensors draw the line at the same value (the usual dtypes are rounded
        in ``__init__``, outside the hot path)."""
        lim = self._limits.get(dtype)
        if lim is None:
            lim = self._limits[dtype] = float(torch.tensor(self.max_abs_logit, dtype=dtype))
        return lim

    @property
    def steps_seen(self) -> int:
        """Decoding steps recorded since the last ``pop_repaired`` / ``reset``."""
        return len(self._steps)

    def pop_repaired(self) -> torch.Tensor:
        """Bool [batch, steps]: True where the token of that step was sampled from a repaired row. Resets."""
        steps, batch = self._steps, self._batch or 0
        device = next((s.device for s in steps if s is not None), torch.device("cpu"))
        out = torch.zeros(batch, len(steps), dtype=torch.bool, device=device)
        for t, rows in enumerate(steps):
            if rows is not None:
                out[:, t] = rows
        self.reset()
        return out

    def reset(self) -> None:
        """Forget the per-step record (the cumulative ``stats`` are kept)."""
        self._steps = []
        self._batch = None

    def state_dict(self) -> dict:
        return {"stats": self.stats.as_dict(), "limiter": self._limiter.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stats = LogitsGuardStats(**state["stats"])
        self._limiter.load_state_dict(state["limiter"])

    # --------------------------------------------------------------- repair
    def _repair(self, scores: torch.Tensor, broken: torch.Tensor) -> torch.Tensor:
        idx = broken.nonzero().squeeze(1)
        rows = scores.index_select(0, idx).float()  # [R, V], only the broken rows

        nan = rows.isnan()
        over = rows > self.max_abs_logit  # +inf and huge finite values
        posinf = rows == math.inf
        rows = rows.masked_fill(nan, -math.inf).clamp_(max=self.max_abs_logit)
        row_max = rows.amax(dim=-1, keepdim=True)  # [R, 1]
        fallback = row_max.squeeze(1) == -math.inf  # nothing usable left
        rows = rows - torch.where(fallback.unsqueeze(1), 0.0, row_max)  # max -> 0; -inf stays -inf
        # The shift can push a usable very negative entry past the dtype's range (fp16: -6e4 - 1e4);
        # it must stay finite there, not turn into a mask.
        lowest = torch.finfo(scores.dtype).min
        rows = torch.where(rows == -math.inf, rows, rows.clamp(min=lowest))
        if fallback.any():
            if self.fallback_token_id >= rows.shape[1]:
                raise ValueError(
                    f"LogitsGuard: a row has no usable logit and its fallback token {self.fallback_token_id} "
                    f"(eos_token_id) is outside the vocabulary of {rows.shape[1]} entries; pass the model's EOS id"
                )
            onehot = torch.full_like(rows[0], -math.inf)
            onehot[self.fallback_token_id] = 0.0
            rows = torch.where(fallback.unsqueeze(1), onehot, rows)

        out = scores.clone()
        out.index_copy_(0, idx, rows.to(scores.dtype))

        nan_r, posinf_r, huge_r = nan.any(1), posinf.any(1), (over & ~posinf).any(1)
        counts = torch.stack([nan_r.sum(), posinf_r.sum(), huge_r.sum(), fallback.sum()]).tolist()
        n_rep = int(idx.numel())
        s = self.stats
        s.rows_repaired += n_rep
        s.nan_rows += counts[0]
        s.posinf_rows += counts[1]
        s.huge_rows += counts[2]
        s.fallback_rows += counts[3]
        if self._limiter():
            logger.warning(
                "LogitsGuard repaired %d of %d rows at generation step %d (scores %s %s): "
                "nan=%d posinf=%d huge(>%g)=%d fallback-to-token-%d=%d. Total so far: %d repaired of %d rows "
                "in %d repair events. Tokens sampled from repaired rows are flagged for the loss to drop. "
                "(Logged on the 1st, 2nd, 4th, 8th... event.)",
                n_rep, scores.shape[0], len(self._steps) - 1, tuple(scores.shape), scores.dtype,
                counts[0], counts[1], self.max_abs_logit, counts[2], self.fallback_token_id, counts[3],
                s.rows_repaired, s.rows_seen, self._limiter.events,
            )
        return out

"""guarded_reward: a reward function made safe for training (NaN/inf -> no opinion, errors named or skipped)."""

from __future__ import annotations

import functools
import logging
import math

from sa2va_rl.numerics._ratelimit import PowerOfTwoLimiter

logger = logging.getLogger(__name__)


class RewardError(RuntimeError):
    """A reward function raised (reward_errors='raise'); the message names the function and the sample."""


def _sample_name(kwargs: dict, i: int) -> str:
    for key in ("source", "prompts"):
        vals = kwargs.get(key)
        if isinstance(vals, list) and i < len(vals):
            return f"{key}={str(vals[i])[-120:]!r}"
    return f"index {i}"


def guarded_reward(fn, errors: str, counters_of):
    """``fn`` with TRL's signature, made safe: NaN/inf -> None (counted). If ``fn`` raises on the batch, it is
    re-run one sample at a time to find the samples it raises on; 'raise' stops there with their name, 'skip'
    gives those samples None (counted). ``counters_of()`` returns the live StabilityCounters."""
    limiter = PowerOfTwoLimiter()
    name = getattr(fn, "__name__", type(fn).__name__)

    def one(i: int, completions, kwargs):
        sub = {k: (v[i:i + 1] if isinstance(v, list) and len(v) == len(completions) else v)
               for k, v in kwargs.items()}
        return fn(completions[i:i + 1], **sub)[0]

    @functools.wraps(fn)
    def wrapped(completions, **kwargs):
        try:
            values = list(fn(completions, **kwargs))
        except Exception as batch_error:  # find the samples it raises on
            values = []
            for i in range(len(completions)):
                try:
                    values.append(one(i, completions, kwargs))
                except Exception as e:
                    if errors == "raise":
                        raise RewardError(
                            f"reward function {name!r} raised {type(e).__name__}: {e} on sample "
                            f"{_sample_name(kwargs, i)} with completion {str(completions[i])[:200]!r}. Fix the "
                            "reward or the data, or pass --reward_errors skip to give such samples no opinion."
                        ) from e
                    counters_of().reward_errors += 1
                    if limiter():
                        logger.warning("reward %r raised %s: %s on sample %s; it gets no opinion "
                                       "(%d such samples so far)", name, type(e).__name__, e,
                                       _sample_name(kwargs, i), counters_of().reward_errors)
                    values.append(None)
            if len(values) == len(completions) and all(v is None for v in values):
                logger.debug("reward %r failed on the whole batch: %s", name, batch_error)
        clean = []
        for v in values:
            if v is not None and not math.isfinite(float(v)):
                counters_of().nonfinite_rewards += 1
                v = None
            clean.append(None if v is None else float(v))
        return clean

    return wrapped

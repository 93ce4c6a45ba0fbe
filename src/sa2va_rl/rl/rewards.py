"""Reward functions with TRL's signature: ``(completions, **kwargs) -> list[float | None]``.

Pure functions: no state, no I/O. ``None`` means "no opinion" (TRL leaves it out of the group baseline).
"""

from __future__ import annotations

import re
from collections import Counter

_WORD = re.compile(r"[a-z0-9]+")


def _text(completion) -> str:
    """A completion is a string, or (conversational) a list of messages whose last content is the answer."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        return content if isinstance(content, str) else " ".join(
            c.get("text", "") for c in content if isinstance(c, dict))
    return str(completion)


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def token_f1(completions, solution=None, **kwargs) -> list[float | None]:
    """F1 of the bag of lower-cased words of the completion against ``solution``; None without a solution."""
    if solution is None:
        return [None] * len(completions)
    out: list[float | None] = []
    for completion, ref in zip(completions, solution, strict=True):
        if ref is None:
            out.append(None)
            continue
        pred, gold = Counter(_tokens(_text(completion))), Counter(_tokens(ref))
        common = sum((pred & gold).values())
        if common == 0:
            out.append(0.0)
            continue
        precision, recall = common / sum(pred.values()), common / sum(gold.values())
        out.append(2 * precision * recall / (precision + recall))
    return out


def exact_match(completions, solution=None, **kwargs) -> list[float | None]:
    """1.0 when the completion's words equal the solution's words, else 0.0; None without a solution."""
    if solution is None:
        return [None] * len(completions)
    return [None if ref is None else float(_tokens(_text(c)) == _tokens(ref))
            for c, ref in zip(completions, solution, strict=True)]


REWARDS = {"token_f1": token_f1, "exact_match": exact_match}

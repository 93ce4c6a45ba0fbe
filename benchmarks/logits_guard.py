"""LogitsGuard's cost on healthy [8, 151936] fp32 logits, measured against its floor and its alternatives.

Run: python benchmarks/logits_guard.py [--device cuda]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
from transformers import InfNanRemoveLogitsProcessor

sys.path.insert(0, os.path.dirname(__file__))
from _timing import interleaved_medians, report  # noqa: E402

from sa2va_rl.numerics import LogitsGuard  # noqa: E402


def seed_style(scores: torch.Tensor) -> torch.Tensor:
    """The usual patch this project replaces: nan_to_num, clamp +-30, softmax, 1e-8 floor, log."""
    x = torch.nan_to_num(scores, nan=-100.0, posinf=30.0, neginf=-30.0).clamp(-30.0, 30.0)
    p = torch.softmax(x, dim=-1).clamp(min=1e-8)
    return torch.log(p / p.sum(-1, keepdim=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=60)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(8, 151936, device=args.device) * 3
    x[:, 151679:] = -math.inf  # padded vocabulary rows, masked as Sa2VA's policy does
    guard, infnan = LogitsGuard(eos_token_id=151645), InfNanRemoveLogitsProcessor()
    fns = {
        "one read: x.amax()": lambda: bool(x.amax() > 0),
        "torch.isfinite(x).all()": lambda: bool(torch.isfinite(x).all()),
        "LogitsGuard (healthy path)": lambda: guard(None, x),
        "InfNanRemoveLogitsProcessor": lambda: infnan(None, x),
        "seed-style clamp+floor": lambda: seed_style(x),
    }
    med = interleaved_medians(fns, repeats=args.repeats)
    guard.reset()
    report(f"LogitsGuard, [8, 151936] fp32 on {args.device}, torch {torch.__version__}", med, [
        ("LogitsGuard (healthy path)", "one read: x.amax()", 1.3),
        ("LogitsGuard (healthy path)", "torch.isfinite(x).all()", None),
        ("LogitsGuard (healthy path)", "InfNanRemoveLogitsProcessor", None),
        ("LogitsGuard (healthy path)", "seed-style clamp+floor", 0.1),
    ])
    # The repair path, for reference: one broken row of eight.
    bad = x.clone()
    bad[3, 17] = math.nan
    med2 = interleaved_medians({"LogitsGuard (1 of 8 rows repaired)": lambda: (guard(None, bad), guard.reset()),
                                "one read: x.amax()": lambda: bool(x.amax() > 0)}, repeats=args.repeats // 2)
    report("LogitsGuard repair path", med2, [("LogitsGuard (1 of 8 rows repaired)", "one read: x.amax()", None)])


if __name__ == "__main__":
    main()

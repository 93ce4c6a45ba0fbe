"""Side-by-side timing: interleaved repeats, medians, ratios printed from one run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int = 50, inner: int = 5,
                        warmup: int = 3, clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per call of each fn, the candidates taking turns so drift hits all alike. ``clock``: wall time
    by default; ``time.process_time`` (this process's CPU seconds, all threads) on a CPU machine that other jobs
    load, where wall time mostly measures the waiting."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync()
            t0 = clock()
            for _ in range(inner):
                fn()
            _sync()
            samples[name].append((clock() - t0) / inner)
    return {k: statistics.median(v) for k, v in samples.items()}


def report(title: str, medians: dict[str, float], ratios: list[tuple[str, str, float | None]]) -> None:
    print(f"== {title}")
    for name, sec in medians.items():
        print(f"  {name:<40s} {sec * 1e6:10.1f} us")
    for num, den, target in ratios:
        r = medians[num] / medians[den]
        verdict = "" if target is None else ("  [ok, target <= %.2f]" % target if r <= target
                                             else "  [MISSES target <= %.2f]" % target)
        print(f"  ratio {num} / {den}: {r:.3f}{verdict}")

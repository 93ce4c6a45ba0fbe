"""Side-by-side timing: interleaved repeats, medians, ratios printed from one run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from transformers import TrainerCallback


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


class StepTimer(TrainerCallback):
    """Wall and process CPU seconds per optimizer step (CPU time is what a loaded, shared machine distorts least),
    from one step's start to the next one's: the whole iteration of the Trainer's loop, i.e. the step itself and what
    the Trainer runs around it every step (every callback, the per-step log with its metrics, the next batch's
    fetch). Timing only up to on_step_end would leave out the log, where each trainer does its own per-step work.
    The first interval (one-off setup) is dropped by ``steady``; the last step has no next start and is not timed."""

    def __init__(self):
        self.wall, self.cpu, self.t0 = [], [], None

    def on_step_begin(self, *a, **k):
        now = (time.perf_counter(), time.process_time())
        if self.t0 is not None:
            self.wall.append(now[0] - self.t0[0])
            self.cpu.append(now[1] - self.t0[1])
        self.t0 = now

    def steady(self) -> StepTimer:
        self.wall, self.cpu = self.wall[1:], self.cpu[1:]
        return self

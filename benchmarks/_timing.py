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


def alternating_steps(variants: dict[str, object], run: Callable[[object, str], tuple[StepTimer, object]],
                      rounds: int) -> tuple[dict[str, StepTimer], dict[str, list]]:
    """Each variant's training run ``rounds`` times, the variants taking turns so that machine drift hits all alike.
    ``run(value, tag)`` trains once (``tag``: a fresh name for its output) and returns (its steady StepTimer, its
    trainer). Returns every variant's pooled step times and its trainers."""
    pooled = {k: StepTimer() for k in variants}
    trainers: dict[str, list] = {k: [] for k in variants}
    for r in range(rounds):
        for i, (name, value) in enumerate(variants.items()):
            timer, trainer = run(value, f"{r}-{i}")
            pooled[name].wall += timer.wall
            pooled[name].cpu += timer.cpu
            trainers[name].append(trainer)
    return pooled, trainers


def report_steps(title: str, pooled: dict[str, StepTimer], threads: int) -> tuple[float, float, int]:
    """Print each variant's median step (CPU time on a CPU machine, wall time on a GPU; the other clock beside it)
    and the ratio of the first variant to the second. Returns (first, second, judged clock index: 0 CPU, 1 wall)."""
    judged = 1 if torch.cuda.is_available() else 0  # on a GPU the step is device time: judge wall time
    med = {k: (statistics.median(t.cpu), statistics.median(t.wall)) for k, t in pooled.items()}
    clock = ("wall", "CPU") if judged else ("CPU", "wall")
    device = "GPU" if torch.cuda.is_available() else f"CPU ({threads} thread(s))"
    first, second = list(med)[:2]
    print(f"== {title}, {device}, {len(pooled[second].cpu)} steps each; medians, {clock[0]} time ({clock[1]})")
    for name, times in med.items():
        print(f"  {name:<40s} {times[judged] * 1e3:8.1f} ms  ({times[1 - judged] * 1e3:.1f} ms {clock[1]})")
    print(f"  ratio {first} / {second}: {med[first][judged] / med[second][judged]:.3f} "
          f"({clock[1]} {med[first][1 - judged] / med[second][1 - judged]:.3f})")
    return med[first][judged], med[second][judged], judged


def timed_train(trainer) -> StepTimer:
    """Train ``trainer`` with a StepTimer and without the per-step printer; its steady step times."""
    from transformers.trainer_callback import PrinterCallback

    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return timer.steady()


def step_benchmark_args(rounds: int, steps: int):
    """The step benchmarks' command line (``--rounds``, ``--steps``, ``--threads``), parsed; torch's CPU threads set
    to ``--threads`` and log warnings off, as every step benchmark runs."""
    import argparse
    import logging

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least sensitive to other load)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    return args

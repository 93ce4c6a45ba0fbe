"""SpikeDetector: running statistics of a few per-step signals, kept on the device, that flag a step whose value is
far outside its recent history (OLMo-core's rule: more than ``sigma`` standard deviations over a ``window``-step
history, 128 steps and 6 sigma by default).

Pure torch, no host sync: ``decide`` and ``update`` only launch device ops. The caller reads the flags in a sync it
makes anyway (the GradGuard's one ``tolist()``) and then calls ``update`` with the decision it took.

Rules, per signal:

* A signal is judged only after ``warmup`` observations are in its window (the std of a handful of values is noise).
* ``two_sided`` signals (the GRPO loss, whose sign is not fixed) spike on ``|x - mean| > sigma * std``; the others
  (gradient norm, KL) on ``x - mean > sigma * std`` only: a step that is unusually *calm* is no danger.
* ``log_scale`` signals (the gradient norm, the KL: positive, heavy-tailed) are judged and kept as ``log(x)``, so
  the band is a factor, ``exp(sigma * std of log x)`` over the window's geometric mean. A GRPO gradient norm is
  skewed: a group whose one sample earns the reward puts its whole advantage on a few tokens, and healthy steps of
  3-8x the median are common. On the demo's healthy runs (200 steps each) a linear 6-sigma band flagged 1-2 steps
  per run (z up to 11) and halted one run as "persistent"; in log space the largest healthy z was 4.9, while the
  1e3x drill spike sits ~14 sigma out.
* The std is floored at ``rel_floor * mean(|x|)`` (``rel_floor`` itself for log signals: a relative change) so a
  window of near-identical values does not flag noise.
* A log signal's value under ``low_cut`` (1e-3) times its window's median is recorded as that bound (winsorised;
  it is judged as it is and never flags): a handful of steps with almost no learning signal (a near-tie in every
  group) would otherwise widen the log band until a 1e3x spike fit inside it. Clamped, not dropped: every accepted
  step is recorded, so the window follows a real change of level (the median moves down within half a window)
  and an early outlier cannot freeze it. (Exact ties give exact-zero advantages, rl/advantages.py, hence a zero
  norm, which is not recorded at all.)
* Non-finite values and exact zeros (for log signals: values <= 0) are neither judged nor recorded: non-finite
  steps are the GradGuard's, and an exact zero (no learning signal: every group's advantages zero) says nothing
  about the signal's scale.
* Only accepted steps enter the history (the caller ``update``s only the steps it took), so one spike does not
  widen the band for the next one.
"""

from __future__ import annotations

import logging
import math

import torch

logger = logging.getLogger(__name__)


class SpikeDetector:
    """Device-side ring buffers, one row per signal.

    Args:
        names: the signals, in the order ``decide``/``update`` take their values.
        window: steps of history per signal.
        sigma: how many standard deviations make a spike.
        warmup: observations a signal needs before it is judged (at least 2).
        two_sided: names judged on |x - mean| rather than x - mean.
        log_scale: names judged on log(x) (positive signals).
        low_cut: log signals: values under this fraction of the window's median are recorded as that bound.
        rel_floor: the std is at least this fraction of the window's mean |x|.
    """

    def __init__(self, names: list[str], window: int = 128, sigma: float = 6.0, warmup: int = 16,
                 two_sided: tuple[str, ...] = (), log_scale: tuple[str, ...] = (), rel_floor: float = 1e-3,
                 low_cut: float = 1e-3, device: torch.device | str = "cpu") -> None:
        if window < 2 or warmup < 2 or warmup > window or not sigma > 0:
            raise ValueError(f"SpikeDetector: need window >= warmup >= 2 and sigma > 0 (got window={window}, "
                             f"warmup={warmup}, sigma={sigma})")
        self.names = list(names)
        self.window, self.sigma, self.warmup, self.rel_floor = window, float(sigma), warmup, rel_floor
        self.log_cut = math.log(low_cut)
        n = len(self.names)
        self.two_sided = torch.tensor([name in two_sided for name in self.names], dtype=torch.bool)
        self.log_scale = torch.tensor([name in log_scale for name in self.names], dtype=torch.bool)
        self.buf = torch.zeros(n, window, dtype=torch.float64)
        self.count = torch.zeros(n, dtype=torch.long)  # observations recorded (not capped)
        self.to(device)

    def to(self, device: torch.device | str) -> SpikeDetector:
        self.device = torch.device(device)
        self.two_sided, self.log_scale, self.buf, self.count = (
            t.to(self.device) for t in (self.two_sided, self.log_scale, self.buf, self.count))
        self._slots = torch.arange(self.window, device=self.device)[None, :]
        self._seen = None  # (values, their _version, judged values, usable, window median) of the last decide
        return self

    def _judged(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values in the space they are judged in, usable mask): log for ``log_scale`` signals."""
        usable = torch.isfinite(values) & torch.where(self.log_scale, values > 0, values != 0)
        safe = torch.where(usable, values, torch.ones_like(values))  # log(1) = 0 where unusable: never read
        return torch.where(self.log_scale, safe.log(), safe), usable

    def _median(self) -> torch.Tensor:
        """Per signal, the median of the recorded values (NaN for an empty window)."""
        valid = self._slots < self.count.clamp(max=self.window)[:, None]
        return torch.where(valid, self.buf, math.nan).nanmedian(dim=1).values

    def stats(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(n, mean, floored std) per signal, on the device; of log(x) for log signals. The slots not yet filled
        hold 0 (the ring buffer fills from slot 0), so plain sums over the window are sums over the recorded values."""
        n = self.count.clamp(max=self.window)
        nf = n.to(self.buf.dtype).clamp(min=1)
        total, squares, absolute = self.buf.sum(1), self.buf.square().sum(1), self.buf.abs().sum(1)
        mean = total / nf
        std = ((squares - total * mean) / (nf - 1).clamp(min=1)).clamp(min=0).sqrt()
        floor = torch.where(self.log_scale, self.rel_floor, self.rel_floor * absolute / nf)
        return n, mean, torch.maximum(std, floor)

    def threshold(self) -> torch.Tensor:
        """Per signal, the upward bound of the band in the signal's own units (mean + sigma * std, or its exp for
        log signals); for reports."""
        _n, mean, std = self.stats()
        bound = mean + self.sigma * std
        return torch.where(self.log_scale, bound.exp(), bound)

    def decide(self, values: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """Bool [signals] on the device: which signals spike at this step. ``present`` marks the signals that have a
        value this step (e.g. no KL without beta). No host sync."""
        values = values.to(device=self.device, dtype=self.buf.dtype)
        present = torch.ones_like(values, dtype=torch.bool) if present is None else present.to(self.device)
        x, usable = self._judged(values)
        self._seen = (values, values._version, x, usable, self._median())
        n, mean, std = self.stats()
        d = x - mean
        d = torch.where(self.two_sided, d.abs(), d)
        return present & usable & (n >= self.warmup) & (d > self.sigma * std)

    def update(self, values: torch.Tensor, present: torch.Tensor | None = None) -> None:
        """Record an accepted step's values (the caller decided the step was taken). No host sync. Right after
        ``decide`` on the same tensor, its work is reused."""
        values = values.to(device=self.device, dtype=self.buf.dtype)
        seen = self._seen
        if seen is not None and seen[0] is values and seen[1] == values._version:  # the same, unmodified tensor
            _, _, x, ok, median = seen
        else:
            (x, ok), median = self._judged(values), self._median()
        self._seen = None
        if present is not None:
            ok = ok & present.to(self.device)
        # winsorised from below (log signals): NaN median (empty window) compares False, nothing is clamped
        x = torch.where(self.log_scale & (x < median + self.log_cut), median + self.log_cut, x)
        idx = (self.count % self.window)[:, None]
        new = torch.where(ok, x, self.buf.gather(1, idx).squeeze(1))
        self.buf.scatter_(1, idx, new[:, None])
        self.count += ok.long()

    # ------------------------------------------------------------ checkpoint (a sync: checkpoints only)
    def state_dict(self) -> dict:
        return {"names": self.names, "buf": self.buf.cpu().tolist(), "count": self.count.cpu().tolist(),
                "log_scale": self.log_scale.cpu().tolist()}

    def load_state_dict(self, state: dict) -> None:
        if (list(state["names"]) != self.names or len(state["buf"][0]) != self.window
                or state.get("log_scale", [False] * len(self.names)) != self.log_scale.cpu().tolist()):
            logger.info("spike guard: the checkpoint's statistics are for other signals, window or scale (%s, "
                        "window %d); starting them afresh", state.get("names"), len(state["buf"][0]))
            return
        self.buf = torch.tensor(state["buf"], dtype=torch.float64, device=self.device)
        self.count = torch.tensor(state["count"], dtype=torch.long, device=self.device)
        self._seen = None

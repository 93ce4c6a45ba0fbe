"""Finite spikes and the data behind them: the spike guard's trainer side, and rollback past the data.

``SpikeGuard`` feeds the step's loss (summed over its micro-batches, on the device), the pre-clip global gradient
norm, when the trainer logs a KL (beta > 0) the KL, and with the mask loss on the mask loss, to a
``numerics.SpikeDetector``. The detector's flags are
computed from the device-side norm inside ``GradGuard.check`` and read back in the GradGuard's one host sync
(``check(extra=...)``): the guard adds no sync. A flagged step is skipped exactly as a non-finite one is (every
gradient None, optimizer state untouched), counted by cause and named in ``stability.json``'s events; ``k`` spikes
within ``w`` steps are persistent, and the trainer acts as ``on_persistent_spikes`` says (halt, rollback, continue).

``DataSkip`` is PaLM's remedy: on a rollback to checkpoint S at step T, the dataset rows consumed by steps S+1..T
are skipped from then on. The run's step counter goes on after a rollback, so within the run those batches are
already behind the data loader; the skip matters for later epochs and for a resume (from a checkpoint before or
after the rollback). It works by substitution at fetch time: the training dataset is wrapped so that each row
carries its index (``row_index``, removed before TRL sees the row), and a skipped index is served as the next index
that is not skipped. Batch positions never move, so a resume's "skip the first N batches" still lands on the step
it should. The skipped rows and why are written to ``output_dir/skipped_rows.json`` (and ``stability.json``); a
resume in that output_dir reads it back and keeps the skip.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import deque

import torch
from accelerate.utils import DistributedType

from sa2va_rl.numerics._ratelimit import PowerOfTwoLimiter
from sa2va_rl.numerics.spikes import SpikeDetector
from sa2va_rl.rl.stability import write_json_atomic

logger = logging.getLogger(__name__)

SIGNALS = ("loss", "grad_norm", "kl", "mask_loss")
ROW_KEY = "row_index"
SKIP_FILE = "skipped_rows.json"


class SpikeGuard:
    """The step's signals in, skip decisions out; the flags travel in the GradGuard's sync.

    Args:
        window, sigma, warmup: the detector's (see numerics/spikes.py).
        persistent_count, persistent_window: ``persistent_count`` spikes within ``persistent_window`` steps are
            persistent.
        reduce_mean: under several processes, makes the local loss the mean over ranks (a collective, not a host
            sync), so every rank judges the same values and takes the same decision.
        mask_loss: the mask loss is on (rl/mask_loss.py): its per-step sum is a signal every step (0 on a step
            without caption2mask rows, which the log scale leaves unjudged), so ranks agree on what is present.
    """

    def __init__(self, window: int = 128, sigma: float = 6.0, warmup: int = 16, persistent_count: int = 3,
                 persistent_window: int = 20, device: torch.device | str = "cpu", reduce_mean=None,
                 signals: tuple[str, ...] = SIGNALS, mask_loss: bool = False) -> None:
        unknown = set(signals) - set(SIGNALS)
        if unknown:
            raise ValueError(f"spike signals {sorted(unknown)}: use some of {', '.join(SIGNALS)}")
        self.detector = SpikeDetector(list(SIGNALS), window, sigma, warmup, two_sided=("loss",),
                                        log_scale=("grad_norm", "kl", "mask_loss"), device=device)
        self.device = torch.device(device)
        # every signal's statistics are kept; only these may flag a step. Built once: a blocking host->device copy
        # waits for the stream on CUDA, so nothing per step is copied that way
        self.judged = torch.tensor([name in signals for name in SIGNALS], device=self.device)
        self.signals = frozenset(signals)
        self._present = {(kl, m): torch.tensor([True, True, kl, m], device=self.device)
                         for kl in (False, True) for m in (False, True)}
        self.persistent_count, self.persistent_window = persistent_count, persistent_window
        self.reduce_mean = reduce_mean
        self._loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self._kl: list[float] = []  # host floats TRL already read (its own .item()): free
        self._mask = torch.zeros((), dtype=torch.float64, device=self.device)  # the step's mask loss (rl/mask_loss.py)
        self.mask_loss = mask_loss  # on: a value every step (0 without rows), so ranks agree
        self._values: torch.Tensor | None = None
        self._present_mask: torch.Tensor | None = None  # which signals had a value at the last flags()
        self.recent: deque[int] = deque()  # steps of recent spikes
        self.limiter = PowerOfTwoLimiter()  # the skip warning: 1st, 2nd, 4th... spike

    # ---------------------------------------------------------------- feeding (no sync)
    def add_loss(self, loss: torch.Tensor) -> None:
        self._loss += loss.detach().to(device=self.device, dtype=torch.float64)

    def add_kl(self, kl: float) -> None:
        self._kl.append(float(kl))

    def add_mask_loss(self, value: torch.Tensor) -> None:
        """The mask loss of a micro-batch (summed over the step, as the loss), on the device."""
        self._mask += value.detach().to(device=self.device, dtype=torch.float64)

    def flags(self, total_norm: torch.Tensor) -> torch.Tensor:
        """The ``extra`` of ``GradGuard.check``: spike flags [signals] as a device tensor, from the device norm."""
        loss = self._loss if self.reduce_mean is None else self.reduce_mean(self._loss)
        kl = sum(self._kl) / len(self._kl) if self._kl else 0.0
        kl = torch.tensor(kl, dtype=torch.float64).to(self.device, non_blocking=True)  # host->device, not a sync
        mask = self._mask if self.reduce_mean is None or not self.mask_loss else self.reduce_mean(self._mask)
        values = torch.stack([loss, total_norm.detach().to(device=self.device, dtype=torch.float64), kl, mask])
        present = self._present[(bool(self._kl), self.mask_loss)]
        self._values, self._present_mask = values, present
        return self.detector.decide(values, present) & self.judged

    # ---------------------------------------------------------------- deciding (host values from the sync)
    def conclude(self, step: int, flags: list[float], finite: bool, norm: float | None = None) -> list[str]:
        """The causes that flagged this step ([] when none); the step's values enter the statistics only when it is
        taken (finite and not a spike). Clears the step's accumulators. ``norm``: the GradGuard's read of the global
        norm; finite gradients whose fp32 L2 norm overflowed (inf) are a grad_norm spike whatever the window says
        (the detector cannot judge an inf)."""
        causes = [name for name, f in zip(SIGNALS, flags, strict=False) if f] if finite else []
        overflowed = finite and norm is not None and math.isinf(norm) and "grad_norm" in self.signals
        if overflowed:
            causes = [name for name in SIGNALS if name in causes or name == "grad_norm"]
        if finite and not causes and self._values is not None:
            self.detector.update(self._values, self._present_mask)
        if causes:
            self.recent.append(step)
        while self.recent and self.recent[0] <= step - self.persistent_window:
            self.recent.popleft()
        self._loss.zero_()
        self._kl.clear()
        self._mask.zero_()
        return causes

    def event(self, step: int, causes: list[str]) -> dict:
        """What stability.json records for a spike (failure path only: reads the values back, one sync)."""
        n, mean, std = self.detector.stats()
        bound = self.detector.threshold().tolist()
        log = self.detector.log_scale.tolist()
        values = self._values.tolist() if self._values is not None else [None] * len(SIGNALS)
        mean, std, n = mean.tolist(), std.tolist(), n.tolist()

        def per(xs, how=lambda x, i: x):
            return {c: how(xs[SIGNALS.index(c)], SIGNALS.index(c)) for c in causes}

        return {"step": step, "kind": "spike", "causes": causes, "values": per(values),
                # the window's mean in the signal's units (geometric for log signals) and the band's upper bound
                # (a two-sided signal, the loss, also spikes below mean - sigma * std)
                "mean": per(mean, lambda m, i: math.exp(m) if log[i] else m), "threshold": per(bound),
                "std": per(std), "scale": per(log, lambda b, i: "log" if b else "linear"),
                "window_steps": per(n)}

    def persistent(self) -> bool:
        return len(self.recent) >= self.persistent_count

    def reset_persistence(self) -> None:
        self.recent.clear()

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        return {"detector": self.detector.state_dict(), "recent": list(self.recent),
                "limiter": self.limiter.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.detector.load_state_dict(state["detector"])
        self.recent = deque(state.get("recent", []))
        self.limiter.load_state_dict(state.get("limiter", {"events": 0}))


class IndexedRows(torch.utils.data.Dataset):
    """A map-style dataset whose rows carry their index (``row_index``) and whose skipped indices are served as the
    next index that is not skipped. Attributes not defined here are the wrapped dataset's."""

    def __init__(self, inner, skip: set[int]) -> None:
        self.inner = inner
        self.skip = skip  # shared with DataSkip: a rollback's skip applies from the next fetch on

    def __len__(self) -> int:
        return len(self.inner)

    def substitute(self, i: int) -> int:
        n = len(self.inner)
        if i not in self.skip:
            return i
        for k in range(1, n):
            j = (i + k) % n
            if j not in self.skip:
                return j
        raise RuntimeError(f"every one of the {n} training rows is skipped (see {SKIP_FILE}); nothing left to train "
                           "on: remove rows from the skip list or fix the data")

    def __getitem__(self, i):
        j = self.substitute(int(i))
        row = self.inner[j]
        return {**row, ROW_KEY: j} if isinstance(row, dict) else row

    def __getattr__(self, name):
        if name in ("inner", "skip") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.inner, name)


class DataSkip:
    """Which rows each step consumed, which rows are skipped, and the file that keeps the skip across resumes."""

    MAX_STEPS_KEPT = 10_000

    def __init__(self) -> None:
        self.rows: set[int] = set()
        self.consumed: deque[tuple[int, list[int]]] = deque(maxlen=self.MAX_STEPS_KEPT)
        self.events: list[dict] = []
        self.last_rows: list[int] | None = None  # the rows of the generation batch in flight (None: not indexed)

    def wrap(self, dataset):
        """The training dataset, indexed; an iterable dataset (no indices) is returned as is."""
        if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset,
                                                                                                   "__getitem__"):
            return dataset
        try:
            len(dataset)
        except TypeError:
            return dataset
        return IndexedRows(dataset, self.rows)

    def take(self, step: int, inputs: list, rows: list[int] | None = None) -> list:
        """The generation batch without ``row_index``; its rows (their ``row_index``, or ``rows`` when the trainer's
        ``_prepare_inputs`` already took the key off) are noted as consumed by ``step``."""
        if inputs and isinstance(inputs[0], dict) and ROW_KEY in inputs[0]:
            rows = [x[ROW_KEY] for x in inputs]
            inputs = [{k: v for k, v in x.items() if k != ROW_KEY} for x in inputs]
        if rows is None or len(rows) != len(inputs):
            self.last_rows = None
            return inputs
        self.last_rows = rows
        self.consumed.append((step, sorted(set(rows))))
        return inputs

    def since(self, step: int) -> list[int]:
        """The rows consumed by the steps after ``step``."""
        return sorted({r for s, rows in self.consumed if s > step for r in rows})

    def skip_since(self, step: int, checkpoint_step: int, checkpoint: str, output_dir: str | None) -> list[int]:
        """Skip the rows consumed since ``checkpoint_step`` (a rollback at ``step``), record and write them. Under
        several processes the rows of every rank (a rollback is a decision every rank takes together: this gathers),
        so that every rank serves the same substitutes."""
        rows = self.since(checkpoint_step)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, rows)
            rows = sorted({r for part in gathered for r in part})
        new = sorted(set(rows) - self.rows)
        self.rows.update(rows)
        self.events.append({"step": step, "checkpoint": os.path.basename(checkpoint),
                            "steps": [checkpoint_step + 1, step], "rows": rows})
        if output_dir is not None:
            write_json_atomic(os.path.join(output_dir, SKIP_FILE), self.report())
        logger.warning("step %d: skipping the %d row(s) consumed by steps %d-%d from now on (%d new), listed in %s",
                       step, len(rows), checkpoint_step + 1, step, len(new),
                       os.path.join(output_dir or ".", SKIP_FILE))
        return rows

    def report(self) -> dict:
        return {"rows": sorted(self.rows), "events": self.events}

    def state_dict(self) -> dict:  # travels with checkpoints, beside output_dir/skipped_rows.json
        return self.report()

    def load_state_dict(self, state: dict) -> None:
        self.rows.update(int(r) for r in state.get("rows", []))
        self.events += [e for e in state.get("events", []) if e not in self.events]

    def load(self, output_dir: str) -> bool:
        """A resume: keep the skip a rollback of an earlier run in this output_dir recorded."""
        path = os.path.join(output_dir, SKIP_FILE)
        if not os.path.exists(path):
            return False
        with open(path) as f:
            saved = json.load(f)
        self.rows.update(int(r) for r in saved.get("rows", []))
        self.events = list(saved.get("events", [])) + [e for e in self.events if e not in saved.get("events", [])]
        if self.rows:
            logger.info("resume: %d row(s) skipped by earlier rollbacks stay skipped (%s)", len(self.rows), path)
        return True


def install(trainer) -> tuple[SpikeGuard | None, DataSkip, object]:
    """The spike guard, the data skip and the collapse monitor of a Sa2VAGRPOTrainer, wired into its stability
    callback (their state travels with checkpoints, their metrics with the logs). Wraps the training dataset."""
    from sa2va_rl.rl.collapse import CollapseMonitor

    args, acc = trainer.args, trainer.accelerator
    guard = None
    if args.spike_guard and acc.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed decides its step inside backward, where only a non-finite gradient can make it skip one
        logger.warning("spike guard off under DeepSpeed (it can skip non-finite steps only); NaN/Inf steps are "
                       "still skipped. docs/stability.md")
    elif args.spike_guard:
        mask_loss = args.mask_loss_weight > 0  # judged whenever it is on (rl/mask_loss.py)
        signals = tuple(args.spike_signals) + (("mask_loss",) if mask_loss and "mask_loss" not in args.spike_signals
                                               else ())
        guard = SpikeGuard(args.spike_window, args.spike_sigma, args.spike_warmup, args.spike_persistent_count,
                           args.spike_persistent_window, device=acc.device, signals=signals,
                           reduce_mean=(lambda t: acc.reduce(t, "mean")) if acc.num_processes > 1 else None,
                           mask_loss=mask_loss)
        trainer.stability.parts["spike_guard"] = guard
    skip = DataSkip()
    trainer.train_dataset = skip.wrap(trainer.train_dataset)
    trainer.stability.parts["skipped_data"] = skip
    collapse = CollapseMonitor(args.collapse_entropy_floor, args.collapse_entropy_fraction, args.collapse_warmup_steps,
                               args.collapse_zero_std_share, args.collapse_identical_share,
                               args.collapse_max_length_share, args.collapse_repeat_share, args.collapse_halt,
                               args.collapse_patience,
                               on_halt=lambda message: trainer.rollback.halt(message, advice=False),
                               share_window=args.collapse_share_window,
                               local=("identical_groups", "max_length", "cross_prompt_repeat")
                               if acc.num_processes > 1 else ())
    trainer.stability.parts["collapse"] = collapse
    trainer.add_callback(collapse)
    return guard, skip, collapse


def persistent_spike_action(args) -> str:
    return args.on_persistent_spikes or args.on_persistent_nonfinite

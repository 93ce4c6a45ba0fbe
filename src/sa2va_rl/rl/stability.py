"""StabilityCallback: the run's numerical health, in the logs, in a summary line, and in stability.json."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field

import torch
from transformers import TrainerCallback

from sa2va_rl.jsonio import dump_json
from sa2va_rl.numerics import GradGuard, GradReport, LogitsGuard
from sa2va_rl.numerics.grads import fsdp1_sharded_ids, local_part

logger = logging.getLogger(__name__)

STATE_FILE = "stability_state.json"  # inside each checkpoint
REPORT_FILE = "stability.json"  # in output_dir at the end of a run


class NonFiniteTrainingError(RuntimeError):
    """Raised when non-finite steps persist; the message says what happened and what to try."""


@dataclass
class StabilityCounters:
    steps: int = 0  # optimizer steps taken or skipped
    skipped_steps: int = 0
    nonfinite_grad_steps: int = 0
    repaired_rows: int = 0  # logit rows repaired by LogitsGuard
    dropped_tokens: int = 0  # completion tokens excluded from the loss (repaired or empty filler)
    empty_completions: int = 0
    nonfinite_losses: int = 0
    nonfinite_metric_values: int = 0
    reward_errors: int = 0  # samples a reward function raised on (reward_errors='skip')
    nonfinite_rewards: int = 0  # NaN/inf reward values, turned into 'no opinion'
    first_nonfinite: dict | None = None  # {"step", "kind", "params"} of the first non-finite gradient step
    first_nonfinite_logits: dict | None = None  # {"step", "rows", "module"}: first repaired logits, traced
    rollbacks: int = 0
    spike_steps: int = 0  # finite steps the spike guard flagged (skipped; also in skipped_steps)
    spike_causes: dict = field(default_factory=dict)  # {"loss" | "grad_norm" | "kl": steps it flagged}
    skipped_rows: int = 0  # dataset rows skipped by rollbacks past the data (listed in skipped_rows.json)
    unsaved_checkpoints: int = 0  # checkpoints not written because the weights were non-finite
    events: list = field(default_factory=list)  # the last few non-finite steps, newest last
    dynamic_sampling: dict = field(default_factory=dict)  # rl/dynamic_sampling.py COUNTERS (empty when off)


def write_json_atomic(path: str, payload: dict) -> None:
    """Strict JSON (non-finite floats as null), written atomically: a reader never sees half a file."""
    dump_json(payload, path, atomic=True, sort_keys=True)


def _local_params(model: torch.nn.Module) -> list[tuple[torch.Tensor, bool]]:
    """(this rank's part of each parameter, sharded?) - FSDP1 flat/orig params, DTensors and ZeRO-3 partitions read
    locally."""
    sharded_ids = fsdp1_sharded_ids(model)
    # DeepSpeed ZeRO-3: a parameter is an empty placeholder between forwards; this rank's shard is its ds_tensor
    return [(p.ds_tensor.detach(), True) if getattr(p, "ds_tensor", None) is not None
            else local_part(p.detach(), p, sharded_ids) for p in model.parameters()]


def weights_finite(model: torch.nn.Module, all_ranks: bool = False) -> bool:
    """One pass over the parameters, one sync: end of run and failure path only. Reads each rank's own part of
    sharded parameters; ``all_ranks`` (a collective: every rank must call it) makes the answer every rank's."""
    params = [t for t, _ in _local_params(model)]
    flag = torch.stack([torch.isfinite(p).all() for p in params]).all() if params else torch.tensor(True)
    if all_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
        device = params[0].device if params else torch.device("cpu")
        if torch.distributed.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        flag = flag.to(device=device, dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag)


def ranks_agree(model: torch.nn.Module, accelerator) -> bool | None:
    """Whether every process holds the same weights (None with one process): per-tensor sums of the replicated
    tensors (DDP; NO_SHARD or non-managed parameters under FSDP; Replicate DTensors), gathered. A sharded tensor
    (FSDP1 with a sharded strategy, Shard DTensors) has one owner per element: there is no copy to disagree, and
    it is read locally (never gathered). A collective: every rank must call it."""
    if accelerator.num_processes == 1:
        return None
    with torch.no_grad():
        parts = _local_params(model)
        sums = [t.double().sum() for t, sharded in parts if not sharded]
        sums = torch.stack(sums) if sums else torch.zeros(1, dtype=torch.float64)
        every = accelerator.gather(sums.to(accelerator.device)[None])  # [ranks, tensors]
    return bool((every == every[:1]).all())


class StabilityCallback(TrainerCallback):
    """Owns the stability counters; the trainer feeds it, the trainer's log() asks it for metrics."""

    MAX_EVENTS = 20

    def __init__(self, summary_steps: int = 10, logits_guard: LogitsGuard | None = None,
                 grad_guard: GradGuard | None = None) -> None:
        self.summary_steps = summary_steps
        self.logits_guard = logits_guard
        self.grad_guard = grad_guard or GradGuard()
        self.counters = StabilityCounters()
        self.extras: dict = {}  # name -> callable returning JSON-able data for the report (e.g. bad data rows)
        self.grad_guard_off: str | None = None  # why the GradGuard did not check the steps (fp16, unguarded DeepSpeed)
        # name -> a monitor (spike guard, collapse monitor, data skip): its state_dict()/load_state_dict() travel
        # with checkpoints; its metrics() join the logs and its report() joins stability.json, where it has them
        self.parts: dict = {}

    # ---------------------------------------------------------------- feeding
    def record_generation(self, repaired_rows: int, dropped_tokens: int, empty: int) -> None:
        c = self.counters
        c.repaired_rows += repaired_rows
        c.dropped_tokens += dropped_tokens
        c.empty_completions += empty

    def record_unguarded_step(self, why: str) -> None:
        """An optimizer step the GradGuard did not check, and why (``grad_guard_off``, in the summary and report)."""
        self.counters.steps += 1
        self.grad_guard_off = why

    def record_grads(self, step: int, report: GradReport, skipped: bool) -> None:
        c = self.counters
        c.steps += 1
        if report.finite:
            return
        c.nonfinite_grad_steps += 1
        c.skipped_steps += int(skipped)
        event = {"step": step, "kind": report.kind, "params": report.nonfinite_params,
                 "num_params": report.num_nonfinite_params}
        if report.world_size > 1:  # several processes: every rank's
            by_rank = report.nonfinite_by_rank  # names, whatever rank writes the report
            event["params"] = list(dict.fromkeys(n for r in sorted(by_rank) for n in by_rank[r]))
            event["ranks"] = {str(r): names for r, names in sorted(by_rank.items())}
        if c.first_nonfinite is None:
            c.first_nonfinite = event
        self.record_event(event)

    def record_spike(self, event: dict, skipped: bool) -> None:
        c = self.counters
        c.steps += 1
        c.spike_steps += 1
        c.skipped_steps += int(skipped)
        for cause in event["causes"]:
            c.spike_causes[cause] = c.spike_causes.get(cause, 0) + 1
        self.record_event(event)

    # --------------------------------------------------------------- reading
    def metrics(self) -> dict[str, float]:
        c, g = self.counters, self.grad_guard.stats
        out = {
            "stability/skipped_steps": c.skipped_steps,
            "stability/nonfinite_grad_steps": c.nonfinite_grad_steps,
            "stability/consecutive_nonfinite": g.consecutive_nonfinite,
            "stability/repaired_rows": c.repaired_rows,
            "stability/dropped_tokens": c.dropped_tokens,
            "stability/empty_completions": c.empty_completions,
            "stability/nonfinite_losses": c.nonfinite_losses,
            "stability/nonfinite_metric_values": c.nonfinite_metric_values,
            "stability/reward_errors": c.reward_errors,
            "stability/rollbacks": c.rollbacks,
            "stability/nonfinite_rewards": c.nonfinite_rewards,
            "stability/grad_norm_mean": g.norm_mean,
            "stability/grad_norm_max": g.norm_max,
        }
        if self.logits_guard is not None:
            out["stability/logit_rows_seen"] = self.logits_guard.stats.rows_seen
        out["stability/spike_steps"] = c.spike_steps
        for cause, n in c.spike_causes.items():
            out[f"stability/spike_{cause}"] = n
        out["stability/skipped_rows"] = c.skipped_rows
        for part in self.parts.values():
            if hasattr(part, "metrics"):
                out.update(part.metrics())
        out.update({f"stability/dynamic_sampling/{k}": v for k, v in c.dynamic_sampling.items()})
        return out

    def summary_line(self, step: int) -> str:
        c, g = self.counters, self.grad_guard.stats
        lg = self.logits_guard.stats if self.logits_guard is not None else None
        rows = f"{lg.rows_repaired}/{lg.rows_seen} logit rows repaired" if lg else "logits guard off"
        rollbacks = f", {c.rollbacks} rollbacks" if c.rollbacks else ""
        rollbacks += f", {c.spike_steps} spikes" if c.spike_steps else ""
        if self.grad_guard_off is not None:
            steps = f"{c.steps} steps, grad guard off ({self.grad_guard_off})"
            norms = ""
        else:
            steps = (f"{c.skipped_steps} skipped of {c.steps} steps{rollbacks} "
                     f"({c.nonfinite_grad_steps} non-finite grads)")
            norms = f", grad norm mean {g.norm_mean:.4g} max {g.norm_max:.4g}"
        return (f"stability @ step {step}: {steps}, {rows}, {c.dropped_tokens} tokens dropped, "
                f"{c.empty_completions} empty completions, {c.nonfinite_losses} non-finite losses{norms}")

    def report(self, model: torch.nn.Module | None) -> dict:
        out = asdict(self.counters)
        out["grad_guard"] = self.grad_guard.state_dict()["stats"]
        out["logits_guard"] = self.logits_guard.stats.as_dict() if self.logits_guard is not None else None
        out["grad_guard_off"] = self.grad_guard_off
        out["final_weights_finite"] = weights_finite(model) if model is not None else None
        for name, part in self.parts.items():
            if hasattr(part, "report"):
                out[name] = part.report()
        for name, get in self.extras.items():
            out[name] = get()
        return out

    def write_report(self, output_dir: str, model: torch.nn.Module | None) -> dict:
        payload = self.report(model)
        write_json_atomic(os.path.join(output_dir, REPORT_FILE), payload)
        return payload

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {
            "counters": asdict(self.counters),
            "grad_guard": self.grad_guard.state_dict(),
            "logits_guard": self.logits_guard.state_dict() if self.logits_guard is not None else None,
            "parts": {name: part.state_dict() for name, part in self.parts.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.counters = StabilityCounters(**state["counters"])
        self.grad_guard.load_state_dict(state["grad_guard"])
        if self.logits_guard is not None and state.get("logits_guard") is not None:
            self.logits_guard.load_state_dict(state["logits_guard"])
        for name, part_state in state.get("parts", {}).items():
            if name in self.parts:
                self.parts[name].load_state_dict(part_state)

    def record_event(self, event: dict) -> None:
        self.counters.events = (self.counters.events + [event])[-self.MAX_EVENTS:]

    def save(self, checkpoint_dir: str, weights_finite: bool = True, world_size: int = 1) -> None:
        write_json_atomic(os.path.join(checkpoint_dir, STATE_FILE), {**self.state_dict(),
                                                                      "weights_finite": weights_finite,
                                                                      "world_size": world_size})

    def load(self, checkpoint_dir: str) -> bool:
        path = os.path.join(checkpoint_dir, STATE_FILE)
        if not os.path.exists(path):
            return False
        with open(path) as f:
            self.load_state_dict(json.load(f))
        return True

    # ------------------------------------------------------------ callbacks
    def on_step_end(self, args, state, control, **kwargs):
        if self.summary_steps and state.global_step % self.summary_steps == 0:
            logger.info(self.summary_line(state.global_step))

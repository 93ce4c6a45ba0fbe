"""Fault injection for drills: ``--inject KIND[@STEP][:ARG]`` (repeatable). A testing feature.

Each fault enters through the seam where a real fault would, never through a special path in the guards:

=================  ===========================================================================================
kind               what happens at optimizer step STEP (default 1)
=================  ===========================================================================================
nan_logits         the model's LM head outputs NaN for the last position of ARG rows (default 1), once
posinf_logits      ... +inf at one vocabulary entry (try it with --temperature 0.7)
huge_logits        ... 1e30 at one vocabulary entry: finite, but far past max_abs_logit
empty_completion   the Policy returns an empty completion for the first row
nan_grads          after backward, one gradient element is NaN (ARG: only on that rank)
inf_grads          ... +inf
nan_weights        one weight of the first trainable matrix (not an embedding, not a query/key projection)
                   becomes NaN and stays so. Query/key are skipped because torch's CPU SDPA kernel (2.13 on
                   AVX-512) returns finite attention for a NaN query: the logits would stay finite there while
                   the gradients go NaN; a NaN value projection reaches the logits under every kernel
reward_raises      the first reward function raises on the first sample
reward_nan         ... returns NaN for the first sample
reward_none        ... returns None ("no opinion") for the first sample
signal             the process sends itself SIGTERM (ARG: INT for SIGINT) as the step starts, as a scheduler
                   would: the step finishes, a checkpoint is saved, the run stops with exit 128 + signal
io_error           the checkpoint save of step STEP fails writing the optimizer state, after the weights were
                   written, with OSError ARG (ENOSPC, the default; EIO; EACCES), as a full or failing disk would
loss_spike         the step's advantages are multiplied by ARG (default 1e3): a finite loss and gradient spike,
                   what the spike guard must skip
entropy_collapse   the LM head's weight is multiplied by ARG (default 20) and stays so: logits sharpened, the
                   token entropy collapses (the collapse monitor's drill)
poison_rows        ARG lists dataset rows (``3+17``): every generation batch that holds one of them, at any step,
                   gets those rows' advantages multiplied by 1e3 (bad data that spikes every time it is seen; STEP
                   is ignored); rollback-past-data must keep them from being seen again
force_token        every completion of the step starts with token ARG (default ``[SEG]``): its logit is raised
                   by 50 at the first sampled position (finite; the LogitsGuard leaves the row alone). Not a
                   fault: it exercises a path random weights rarely take (a ``[SEG]`` -> SAM2 mask)
=================  ===========================================================================================

Each fault fires once, at the first opportunity in its step.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from dataclasses import dataclass, field

import torch

from sa2va_rl.models.sa2va import lm_parts

logger = logging.getLogger(__name__)

LOGIT_KINDS = {"nan_logits": math.nan, "posinf_logits": math.inf, "huge_logits": 1e30}
GRAD_KINDS = {"nan_grads": math.nan, "inf_grads": math.inf}
REWARD_KINDS = ("reward_raises", "reward_nan", "reward_none")
IO_ERRNOS = ("ENOSPC", "EIO", "EACCES")
SPIKE_KINDS = ("loss_spike", "entropy_collapse", "poison_rows")
KINDS = (*LOGIT_KINDS, "empty_completion", *GRAD_KINDS, "nan_weights", *REWARD_KINDS, "force_token", "signal",
         "io_error", *SPIKE_KINDS)
_SPEC = re.compile(r"^(?P<kind>[a-z_]+)(?:@(?P<step>\d+))?(?::(?P<arg>[^:]+))?$")


class InjectedFault(RuntimeError):
    """What ``reward_raises`` raises."""


@dataclass
class Fault:
    kind: str
    step: int = 1
    arg: str | None = None
    fired: bool = False

    @classmethod
    def parse(cls, spec: str) -> Fault:
        m = _SPEC.match(spec.strip())
        if not m or m["kind"] not in KINDS:
            raise ValueError(f"--inject {spec!r}: expected KIND[@STEP][:ARG] with KIND one of {', '.join(KINDS)}")
        step = int(m["step"]) if m["step"] else 1
        if step < 1:
            raise ValueError(f"--inject {spec!r}: STEP counts optimizer steps from 1")
        if m["kind"] == "io_error" and m["arg"] is not None and m["arg"].upper() not in IO_ERRNOS:
            raise ValueError(f"--inject {spec!r}: ARG is one of {', '.join(IO_ERRNOS)}")
        fault = cls(m["kind"], step, m["arg"])
        try:
            if fault.kind == "poison_rows":
                fault.rows()
            elif fault.kind in ("loss_spike", "entropy_collapse") and fault.arg is not None:
                float(fault.arg)
        except ValueError:
            raise ValueError(f"--inject {spec!r}: {fault.kind} takes " + (
                "the dataset rows as ARG, e.g. poison_rows:3+17" if fault.kind == "poison_rows"
                else "a number as ARG, e.g. loss_spike@5:1000")) from None
        return fault

    def rows(self) -> set[int]:
        """poison_rows: the dataset rows of ARG (``3+17``; ``,`` works too)."""
        if not self.arg:
            raise ValueError("no rows")
        return {int(r) for r in re.split(r"[+,]", self.arg) if r}


def _head(model: torch.nn.Module) -> torch.nn.Module:
    """The module that outputs the logits: a causal LM's lm_head, or a Sa2VA model's LLM's."""
    if hasattr(model, "language_model"):
        return lm_parts(model)[2]
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings to inject logit faults into")
    return head


@dataclass
class FaultInjector:
    faults: list[Fault] = field(default_factory=list)
    token_id: object = None  # str -> id (the tokenizer's convert_tokens_to_ids), for force_token

    @classmethod
    def from_specs(cls, specs: list[str] | None) -> FaultInjector:
        return cls([Fault.parse(s) for s in specs or []])

    def _due(self, step: int, kinds) -> list[Fault]:
        return [f for f in self.faults if not f.fired and f.kind in kinds and f.step == step]

    def _fire(self, fault: Fault, what: str) -> None:
        fault.fired = True
        logger.warning("fault injection: %s at step %d (%s)", fault.kind, fault.step, what)

    # ---------------------------------------------------------------- model seams
    def before_generation(self, step: int, model: torch.nn.Module) -> list:
        """Poison weights now (persistent); return hooks that corrupt the next logits (remove them after)."""
        for f in self._due(step, ("signal",)):
            import os
            import signal

            sig = signal.SIGINT if (f.arg or "TERM").upper() in ("INT", "SIGINT") else signal.SIGTERM
            self._fire(f, f"sending {sig.name} to this process")
            os.kill(os.getpid(), sig)
        for f in self._due(step, ("nan_weights",)):
            embedding = {id(q) for m in model.modules() if isinstance(m, torch.nn.Embedding) for q in m.parameters()}
            scores = ("q_proj", "k_proj", "wqkv", "qkv_proj")
            p = next(p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2
                     and id(p) not in embedding and not any(s in n for s in scores))
            with torch.no_grad():
                p.view(-1)[0] = math.nan
            self._fire(f, f"one weight of a {tuple(p.shape)} tensor is NaN")
        handles = []
        for f in self._due(step, ("entropy_collapse",)):
            factor = float(f.arg or 20)
            head = _head(model)
            with torch.no_grad():
                head.weight.mul_(factor)
            self._fire(f, f"LM head weight {tuple(head.weight.shape)} x{factor:g} (logits sharpened)")
        for f in self._due(step, LOGIT_KINDS):
            rows = int(f.arg or 1)

            def hook(_module, _inputs, output, f=f, rows=rows):
                if f.fired:
                    return output
                out = output.clone()
                value = LOGIT_KINDS[f.kind]
                if f.kind == "nan_logits":
                    out[:rows, -1, :] = value
                else:
                    out[:rows, -1, 0] = value
                self._fire(f, f"{rows} row(s) of logits {tuple(output.shape)}")
                return out

            handles.append(_head(model).register_forward_hook(hook))
        for f in self._due(step, ("force_token",)):
            token = f.arg or "[SEG]"
            tid = int(token) if token.isdigit() else (self.token_id(token) if self.token_id else None)
            if tid is None:
                raise ValueError(f"--inject force_token:{token}: the tokenizer has no such token")

            def force(_module, _inputs, output, f=f, tid=tid):
                if f.fired:
                    return output
                out = output.clone()
                out[:, -1, tid] = out[:, -1].float().amax(dim=-1).to(out.dtype) + 50
                self._fire(f, f"token {tid} forced first in {output.shape[0]} completion(s)")
                return out

            handles.append(_head(model).register_forward_hook(force))
        return handles

    def after_generation(self, step: int, completions: list[list[int]]) -> None:
        for f in self._due(step, ("empty_completion",)):
            completions[0] = []
            self._fire(f, "completion 0 emptied")

    def advantages(self, step: int, advantages: torch.Tensor, rows: list[int] | None, group: int) -> torch.Tensor:
        """loss_spike (the whole step) and poison_rows (the completions of those rows, whenever they are seen).
        ``rows`` are the dataset rows of the prompts in flight (one per prompt copy), ``group`` completions each."""
        for f in self._due(step, ("loss_spike",)):
            factor = float(f.arg or 1e3)
            advantages = advantages * factor
            self._fire(f, f"advantages x{factor:g}")
        for f in (f for f in self.faults if f.kind == "poison_rows"):
            if rows is None:
                raise ValueError("--inject poison_rows needs a map-style training dataset (rows with indices)")
            poisoned = f.rows()
            per = advantages.shape[0] // max(len(rows), 1)
            flags = [r in poisoned for r in rows for _ in range(per)]
            if any(flags):  # decided on the host list: no device sync
                hit = torch.tensor(flags, device=advantages.device)
                advantages = torch.where(hit, advantages * 1e3, advantages)
                logger.warning("fault injection: poison_rows at step %d (rows %s of this batch, advantages x1e3)",
                               step, sorted(poisoned & set(rows)))
        return advantages

    def grads(self, step: int, model: torch.nn.Module | None, rank: int,
              parts: list[tuple[str, torch.Tensor]] | None = None) -> None:
        """``parts``: where an engine keeps the gradients instead of ``p.grad`` (DeepSpeed ZeRO's reduced partitions,
        ``(name, tensor)``); the first non-empty one is hit."""
        for f in self._due(step, GRAD_KINDS):
            if f.arg is not None and int(f.arg) != rank:
                f.fired = True  # another rank's fault
                continue
            if parts is not None:
                name, g = next((n, g) for n, g in parts if g.numel())
                what = f"{name}'s gradient partition {tuple(g.shape)}"
            else:
                # this rank's part of the gradient (a DTensor's local shard: indexing the DTensor would be a
                # collective that only this rank joins); under FSDP1 a rank's part of a parameter may be empty
                p, g = next((p, g) for p in model.parameters() if p.grad is not None
                            for g in [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad] if g.numel())
                what = f"a {tuple(p.shape)} tensor"
            g.view(-1)[0] = GRAD_KINDS[f.kind]
            self._fire(f, f"one gradient element of {what} on rank {rank}")

    def checkpoint_write(self, step: int, path: str) -> None:
        """Called as the checkpoint of ``step`` writes ``path``: raise the due ``io_error``."""
        for f in self._due(step, ("io_error",)):
            import errno
            import os

            code = getattr(errno, (f.arg or "ENOSPC").upper())
            self._fire(f, f"writing {path}")
            raise OSError(code, os.strerror(code), path)

    # ---------------------------------------------------------------- rewards
    def wrap_reward(self, fn, step_of):
        """The raw reward function, misbehaving at its step; ``step_of()`` is the current optimizer step."""
        if not any(f.kind in REWARD_KINDS for f in self.faults):
            return fn

        @functools.wraps(fn)
        def wrapped(completions, **kwargs):
            values = list(fn(completions, **kwargs))
            for f in self._due(step_of(), REWARD_KINDS):
                if len(completions) != len(values) or not values:
                    continue
                if f.kind == "reward_raises":
                    if len(completions) == 1:  # the reward guard's per-sample retry: sample 0 comes first
                        self._fire(f, "raised on sample 0")
                    raise InjectedFault("injected reward failure")
                values[0] = math.nan if f.kind == "reward_nan" else None
                self._fire(f, f"sample 0 -> {values[0]}")
            return values

        return wrapped

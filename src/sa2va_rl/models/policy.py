"""The Policy seam: how a model samples completions and scores them.

The trainer never calls ``model.generate`` or ``model(...)`` for the RL math
itself; it asks a Policy. ``CausalLMPolicy`` serves any Hugging Face causal LM;
``Sa2VAPolicy`` (models/sa2va.py) serves Sa2VA, which generates from
``inputs_embeds``.

Two root causes of the original trainer's NaNs are fixed here, for every policy:

* **Completions are the new tokens only, whichever way generate() returns them.**
  A model fed ``input_ids`` returns prompt + completion; one fed
  ``inputs_embeds`` (Sa2VA) returns the completion alone, and slicing the
  prompt length off that gives empty completions, 0/0 in the loss and NaN
  weights. The number of decoding steps, counted by the logits processor, says
  which case we are in.
* **No padding in front of real tokens.** Prompts of one GRPO group are
  identical, so each group is generated without padding; for scoring, each row
  is laid out as [prompt, completion, right padding], so no real token sits
  behind a pad and no query row is fully masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from sa2va_rl.numerics import LogitsGuard
from sa2va_rl.numerics.nan_trace import first_nonfinite_module


@dataclass
class Generation:
    """Completions (new tokens only, cut after the first EOS) and, per token, whether it came from a repaired row."""

    completion_ids: list[list[int]]
    repaired: list[list[bool]]


class Policy(Protocol):
    """``contexts``: one opaque object per row from the dataset's ``visual`` column (Sa2VA: the sample's
    tiles and region cells), or None for text-only policies."""

    def generate(self, model: torch.nn.Module, prompt_ids: list[list[int]], generation_config: GenerationConfig,
                 logits_guard: LogitsGuard | None, contexts: list | None = None) -> Generation: ...

    def logprobs(self, model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                 completion_ids: torch.Tensor, completion_mask: torch.Tensor, temperature: float = 1.0,
                 drop_mask: torch.Tensor | None = None, contexts: list | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]: ...


class StepCounter(LogitsProcessor):
    """Counts decoding steps when no LogitsGuard is in the list; returns scores untouched."""

    def __init__(self) -> None:
        self.steps = 0

    def __call__(self, input_ids, scores):
        self.steps += 1
        return scores


def new_tokens(output: torch.Tensor, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """The generated tokens of ``output`` [n, T], whether or not generate() echoed the prompt [n, P]."""
    if output.shape[1] == steps:
        return output  # generated from inputs_embeds: new tokens only
    prompt_len = prompt.shape[1]
    if output.shape[1] == prompt_len + steps and torch.equal(output[:, :prompt_len], prompt):
        return output[:, prompt_len:]
    raise RuntimeError(
        f"generate() returned {output.shape[1]} tokens per row for a prompt of {prompt_len} tokens after "
        f"{steps} decoding steps; expected {steps} (new tokens only) or {prompt_len + steps} (prompt + new)"
    )


def cut_after_eos(rows: list[list[int]], eos_ids: set[int]) -> list[int]:
    """Length of each row up to and including its first EOS."""
    lengths = []
    for row in rows:
        n = len(row)
        for i, tok in enumerate(row):
            if tok in eos_ids:
                n = i + 1
                break
        lengths.append(n)
    return lengths


def eos_set(generation_config: GenerationConfig) -> set[int]:
    eos = generation_config.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def prompt_groups(prompt_ids: list[list[int]]) -> list[tuple[int, int]]:
    """[start, end) runs of identical consecutive prompts: TRL's sampler puts a GRPO group side by side."""
    groups, start = [], 0
    for i in range(1, len(prompt_ids) + 1):
        if i == len(prompt_ids) or prompt_ids[i] != prompt_ids[start]:
            groups.append((start, i))
            start = i
    return groups


def right_aligned_logprobs(
    forward, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
    completion_mask: torch.Tensor, pad_token_id: int, temperature: float = 1.0, drop_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token logprobs and entropies of the completion, fp32, computed on a right-padded layout.

    ``forward(input_ids, attention_mask, logits_to_keep) -> logits [B, keep, V]``.
    Inputs arrive in TRL's layout: prompts left-padded [B, P], completions right-padded [B, K].
    Each row is shifted left by its prompt padding so it reads [prompt, completion, pad...].
    Dropped positions (padding, and ``drop_mask``, e.g. repaired tokens) get zero logits before
    log_softmax and zero logprob after, so a NaN there can reach neither the loss nor its gradient.
    """
    B, P = prompt_ids.shape
    K = completion_ids.shape[1]
    L = P + K
    ids = torch.cat([prompt_ids, completion_ids], dim=1)  # [B, L]
    att = torch.cat([prompt_mask, completion_mask], dim=1)
    pad_left = (prompt_mask == 0).sum(dim=1)  # [B]
    src = torch.arange(L, device=ids.device)[None, :] + pad_left[:, None]  # [B, L]
    inside = src < L
    src = src.clamp(max=L - 1)
    ids = ids.gather(1, src).masked_fill(~inside, pad_token_id)
    att = att.gather(1, src) * inside

    first = P - int(pad_left.max())  # earliest completion position over rows (one sync per forward)
    keep = L - first + 1  # logits for positions [first - 1, L)
    logits = forward(ids, att, keep)  # [B, keep, V]
    V = logits.shape[-1]
    # completion token j of row b sits at P - pad_left[b] + j and is predicted one position earlier
    pos = (P - pad_left)[:, None] + torch.arange(K, device=ids.device)[None, :] - 1 - (L - keep)  # [B, K]
    logits = logits.gather(1, pos.unsqueeze(-1).expand(B, K, V)).float()
    if temperature != 1.0:
        logits = logits / temperature
    drop = completion_mask == 0
    if drop_mask is not None:
        drop = drop | drop_mask.to(drop.device)
    logits = torch.where(drop.unsqueeze(-1), 0.0, logits)
    logp_all = F.log_softmax(logits, dim=-1)  # fp32 whatever the model's dtype
    logps = logp_all.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all.clamp(min=torch.finfo(torch.float32).min)).sum(-1)
    zero = torch.zeros((), device=logps.device)
    return torch.where(drop, zero, logps), torch.where(drop, zero, entropy)


class CausalLMPolicy:
    """Any Hugging Face causal LM: generate from ``input_ids``, score with one right-padded forward.

    ``generate_from_embeds=True`` feeds ``inputs_embeds`` instead, as Sa2VA does; generate() then returns
    the new tokens only, and the completions must come out the same.
    """

    def __init__(self, pad_token_id: int, generate_from_embeds: bool = False) -> None:
        self.pad_token_id = pad_token_id
        self.generate_from_embeds = generate_from_embeds

    def generate(self, model, prompt_ids, generation_config, logits_guard, contexts=None) -> Generation:
        device = next(model.parameters()).device
        eos = eos_set(generation_config)
        completions: list[list[int]] = []
        repaired: list[list[bool]] = []
        for start, end in prompt_groups(prompt_ids):
            prompt = torch.tensor([prompt_ids[start]] * (end - start), device=device)
            counter = logits_guard if logits_guard is not None else StepCounter()
            inputs = ({"inputs_embeds": model.get_input_embeddings()(prompt)} if self.generate_from_embeds
                      else {"input_ids": prompt})
            out = model.generate(**inputs, attention_mask=torch.ones_like(prompt),
                                 generation_config=generation_config,
                                 logits_processor=LogitsProcessorList([counter]))
            if logits_guard is not None:
                rec = logits_guard.pop_repaired()
                steps = rec.shape[1]
            else:
                steps = counter.steps
                rec = torch.zeros(end - start, steps, dtype=torch.bool)
            self._collect(new_tokens(out, prompt, steps), rec, eos, completions, repaired)
        return Generation(completions, repaired)

    @staticmethod
    def _collect(new: torch.Tensor, rec: torch.Tensor, eos: set[int], completions: list, repaired: list) -> None:
        rows, flags = new.tolist(), rec.tolist()
        for row, flag, n in zip(rows, flags, cut_after_eos(rows, eos), strict=True):
            completions.append(row[:n])
            repaired.append([bool(f) for f in flag[:n]])

    def trace(self, model, prompt_ids: list[list[int]], contexts=None) -> str | None:
        """Failure path only: re-run the forward of one prompt; the first module whose output is non-finite."""
        device = next(model.parameters()).device
        return first_nonfinite_module(model, input_ids=torch.tensor(prompt_ids[:1], device=device), use_cache=False)

    def logprobs(self, model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=1.0,
                 drop_mask=None, contexts=None):
        def forward(ids, att, keep):
            return model(input_ids=ids, attention_mask=att, logits_to_keep=keep, use_cache=False).logits

        return right_aligned_logprobs(forward, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                      self.pad_token_id, temperature, drop_mask)

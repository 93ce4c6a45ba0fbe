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
* **Padding never shifts a real token's position.** Generation runs every row of
  a step in one generate() call, prompts left-padded with attention mask 0
  (transformers derives the positions from the mask, so greedy decoding gives
  the tokens of one call per group); for scoring, each row is laid out as
  [prompt, completion, right padding], so no real token sits behind a pad and no
  query row is fully masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from sa2va_rl.numerics import LogitsGuard
from sa2va_rl.numerics.logits import fixed_signature
from sa2va_rl.numerics.nan_trace import first_nonfinite_module


@dataclass
class Generation:
    """Completions (new tokens only, cut after the first EOS) and, per token, whether it came from a repaired row."""

    completion_ids: list[list[int]]
    repaired: list[list[bool]]


class Policy(Protocol):
    """``contexts``: one opaque object per row from the dataset's ``visual`` column (Sa2VA: the sample's
    tiles and region cells), or None for text-only policies.

    Optional keyword arguments the trainer passes only to a Policy whose method names them (and refuses, at start,
    the TRL option that needs one the Policy lacks; docs/trl_parity.md): ``generate(..., multimodal=)`` and
    ``logprobs(..., multimodal=)`` (a plain VLM's pixels, TRL's fields), ``logprobs(..., compute_entropy=,
    entropy_grad=)`` (TRL's entropy bonus), ``logprobs(..., compute_aux_loss=)`` (then a third value: an MoE
    router's aux loss)."""

    def generate(self, model: torch.nn.Module, prompt_ids: list[list[int]], generation_config: GenerationConfig,
                 logits_guard: LogitsGuard | None, contexts: list | None = None) -> Generation: ...

    def logprobs(self, model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                 completion_ids: torch.Tensor, completion_mask: torch.Tensor, temperature: float = 1.0,
                 drop_mask: torch.Tensor | None = None, contexts: list | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]: ...


@fixed_signature
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
    if steps == 0 and output.shape[1] > prompt_len:
        raise RuntimeError(
            f"generate() returned {output.shape[1] - prompt_len} token(s) per row past the prompt without calling "
            "the logits processors (a stand-in or mocked generate()?): the LogitsGuard saw none of those steps, so "
            "the tokens cannot be vouched for; generate through transformers' generate(), which runs them once per "
            "token")
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


def prompt_groups(prompt_ids: list[list[int]], keys: list | None = None) -> list[tuple[int, int]]:
    """[start, end) runs of identical consecutive prompts (and ``keys``, e.g. the sample a Sa2VA row's image comes
    from): TRL's sampler puts a GRPO group side by side."""
    groups, start = [], 0
    for i in range(1, len(prompt_ids) + 1):
        if i == len(prompt_ids) or prompt_ids[i] != prompt_ids[start] or (keys is not None
                                                                           and keys[i] != keys[start]):
            groups.append((start, i))
            start = i
    return groups


def collect_generation(out: torch.Tensor, prompt: torch.Tensor, logits_guard: LogitsGuard | None,
                       counter: StepCounter | LogitsGuard, eos: set[int], cut=None) -> Generation:
    """generate()'s output -> completions: new tokens only (``new_tokens``), cut after the first EOS id and, with
    ``cut(row) -> length``, a further rule (stop strings); each row's repaired flags (the guard's, else all False)
    cut alike."""
    if logits_guard is not None:
        rec = logits_guard.pop_repaired()
    else:
        rec = torch.zeros(prompt.shape[0], counter.steps, dtype=torch.bool)
    new = new_tokens(out, prompt, rec.shape[1]).tolist()
    completions: list[list[int]] = []
    repaired: list[list[bool]] = []
    for row, flag, n in zip(new, rec.tolist(), cut_after_eos(new, eos), strict=True):
        if cut is not None:
            n = min(n, cut(row[:n]))
        completions.append(row[:n])
        repaired.append([bool(f) for f in flag[:n]])
    return Generation(completions, repaired)


# fp32 elements of one scoring chunk's logits: 2**24 (64 MiB) is 110 tokens at Qwen's 151,936-row vocabulary
CHUNK_ELEMENTS = 2 ** 24


def _token_stats(logits: torch.Tensor, tokens: torch.Tensor, drop: torch.Tensor, temperature: float,
                 entropy: bool, entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits [..., V] -> (fp32 log-prob of each position's token [...], its entropy [...] or None; the entropy
    carries a gradient only with ``entropy_grad``: TRL's entropy bonus). Dropped positions get zero logits before the
    log_softmax, so a NaN there reaches neither value nor gradient."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logits = torch.where(drop.unsqueeze(-1), 0.0, logits)
    logp_all = F.log_softmax(logits, dim=-1)  # fp32 whatever the model's dtype
    logps = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if not entropy:
        return logps, None
    if entropy_grad:  # the entropy bonus trains on it: keep the graph (clamp: 0 * -inf is NaN, 0 * finfo.min is 0)
        return logps, -(logp_all.exp() * logp_all.clamp(min=torch.finfo(torch.float32).min)).sum(-1)
    with torch.no_grad():  # a metric (and TRL's entropy mask): no graph, no saved [n, V] tensors
        logp_all = logp_all.detach()
        ent = -(logp_all.exp() * logp_all.clamp(min=torch.finfo(torch.float32).min)).sum(-1)
    return logps, ent


def left_pad(rows: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (ids [N, P] left-padded with ``pad_token_id``, attention mask [N, P], 0 on the padding)."""
    P = max(len(r) for r in rows)
    ids = torch.tensor([[pad_token_id] * (P - len(r)) + list(r) for r in rows], device=device)
    mask = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def right_pad(rows: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (ids [N, L] right-padded with ``pad_token_id``, attention mask [N, L], 0 on the padding)."""
    L = max(len(r) for r in rows)
    ids = torch.tensor([list(r) + [pad_token_id] * (L - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows], device=device)
    return ids, mask


def right_aligned_logprobs(
    forward, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
    completion_mask: torch.Tensor, pad_token_id: int, temperature: float = 1.0, drop_mask: torch.Tensor | None = None,
    head=None, head_rows: int | None = None, compute_entropy: bool = True, chunk_elements: int = CHUNK_ELEMENTS,
    entropy_grad: bool = False, per_token: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token logprobs and entropies of the completion, fp32, computed on a right-padded layout, in chunks.

    ``forward(input_ids, attention_mask, keep)``: the model's output at the last ``keep`` positions, [B, keep, V]
    logits, or, with ``head``, last-layer hidden states [B, keep, C] that ``head(hidden [r, w, C]) -> logits
    [r, w, V]`` turns into logits a chunk at a time (``head_rows``: V, which sizes the chunks). Inputs arrive in TRL's
    layout: prompts left-padded [B, P], completions right-padded [B, K]. Each row is shifted left by its prompt
    padding so it reads [prompt, completion, pad...].

    Memory: the fp32 log_softmax runs over chunks of at most ``chunk_elements`` logits (whole rows of the [B, keep]
    grid while one fits, else windows of one row's positions), never over [B, K, V] at once. With ``head`` and
    several chunks, each chunk's logits are recomputed in the backward (activation checkpointing of the head and
    the softmax), so the peak is a few chunks with or without grad; when everything fits one chunk, that chunk is
    kept for the backward instead of recomputed (the recompute would hold it in the backward anyway); with full
    logits from ``forward``, those logits are the one [B, keep, V] copy (in the model's dtype). Entropies (only when
    ``compute_entropy``) carry no gradient unless ``entropy_grad`` (TRL's entropy bonus).

    ``per_token``: model inputs laid out like the tokens, [B, P + K] in TRL's layout (e.g. a VLM's
    ``token_type_ids`` / ``mm_token_type_ids``); they are shifted like the tokens (0 on the padding) and handed to
    ``forward`` as keyword arguments.

    Dropped positions (padding, and ``drop_mask``, e.g. repaired tokens) get zero logits before log_softmax and zero
    logprob after, so a NaN there can reach neither the loss nor its gradient. Returns (logps [B, K],
    entropies [B, K] or None).
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
    fields = {k: v.to(ids.device).gather(1, src).masked_fill(~inside, 0) for k, v in (per_token or {}).items()}

    first = P - int(pad_left.max())  # earliest completion position over rows (one sync per forward)
    keep = L - first + 1  # outputs for positions [first - 1, L)
    out = forward(ids, att, keep, **fields)  # [B, keep, V] logits, or [B, keep, C] hidden states with head
    # completion token j of row b sits at P - pad_left[b] + j and is predicted one position earlier
    pos = (P - pad_left)[:, None] + torch.arange(K, device=ids.device)[None, :] - 1 - (L - keep)  # [B, K]
    drop = completion_mask == 0
    if drop_mask is not None:
        drop = drop | drop_mask.to(drop.device)
    # per output position t of the tail: the token it predicts and whether it is dropped (prompt positions are)
    j = torch.arange(keep, device=ids.device)[None, :] - pos[:, :1]  # completion index predicted at t, [B, keep]
    valid = (j >= 0) & (j < K)
    jc = j.clamp(0, K - 1)
    tail_tokens = completion_ids.gather(1, jc)
    tail_drop = drop.gather(1, jc) | ~valid
    vocab = out.shape[-1] if head is None else head_rows
    if not vocab:
        raise ValueError("right_aligned_logprobs: pass head_rows (the vocabulary size) with head")
    # chunks of the [B, keep] grid: whole rows while a row fits the budget, else windows of one row's positions
    rows = max(1, chunk_elements // (keep * vocab))
    width = keep if rows > 1 or keep * vocab <= chunk_elements else max(1, chunk_elements // vocab)
    # under grad, with several chunks, each chunk's logits are recomputed in the backward rather than kept; a single
    # chunk is kept instead (its recompute would be the backward's own peak anyway: same bound, one head pass less)
    checkpoint = head is not None and torch.is_grad_enabled() and (rows < B or width < keep)

    def chunk_stats(x, toks, dropped):
        return _token_stats(x if head is None else head(x), toks, dropped, temperature, compute_entropy, entropy_grad)

    lp_rows, ent_rows = [], []
    for b0 in range(0, B, rows):
        lp_win, ent_win = [], []
        for t0 in range(0, keep, width):
            sl = (slice(b0, b0 + rows), slice(t0, t0 + width))
            args = (out[sl], tail_tokens[sl], tail_drop[sl])
            if checkpoint:  # the backward recomputes this chunk's logits instead of keeping them
                lp, ent = torch.utils.checkpoint.checkpoint(chunk_stats, *args, use_reentrant=False)
            else:
                lp, ent = chunk_stats(*args)
            lp_win.append(lp)
            ent_win.append(ent)
        lp_rows.append(torch.cat(lp_win, dim=1))
        ent_rows.append(torch.cat(ent_win, dim=1) if compute_entropy else None)
    lp_tail = torch.cat(lp_rows)  # [B, keep]
    zero = torch.zeros((), device=completion_ids.device)
    logps = torch.where(drop, zero, lp_tail.gather(1, pos))
    if not compute_entropy:
        return logps, None
    return logps, torch.where(drop, zero, torch.cat(ent_rows).gather(1, pos))


# a VLM's inputs laid out like the tokens ([B, P + K] in TRL's layout): shifted with them in the scoring layout
PER_TOKEN_FIELDS = ("token_type_ids", "mm_token_type_ids")


def generation_inputs(multimodal: dict | None, pad_width: int, device) -> dict:
    """TRL's ``multimodal_fields`` (what the processor returned besides the prompt ids: ``pixel_values``,
    ``image_grid_thw``, per-token ``token_type_ids``...) -> generate() keyword arguments, as TRL 1.16's
    ``_generate_single_turn`` builds them: tensors as they are, per-token lists left-padded like the prompts (to
    ``pad_width``), anything else as a tensor."""
    import numpy as np

    out = {}
    for k, v in (multimodal or {}).items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device)
        elif isinstance(v, list) and v and isinstance(v[0], list):
            out[k] = torch.tensor([[0] * (pad_width - len(r)) + list(r) for r in v], device=device)
        else:
            out[k] = torch.tensor(np.array(v), device=device)
    return out


class CausalLMPolicy:
    """Any Hugging Face causal LM, and plain VLMs (Qwen2-VL, Gemma 3, LLaVA-NeXT...) through TRL's multimodal
    inputs: generate from ``input_ids``, score with one right-padded forward.

    ``generate_from_embeds=True`` feeds ``inputs_embeds`` instead, as Sa2VA does; generate() then returns
    the new tokens only, and the completions must come out the same (text only: the images of a VLM are merged
    into the embeddings by the model's own forward, which that path skips).
    """

    def __init__(self, pad_token_id: int, generate_from_embeds: bool = False) -> None:
        self.pad_token_id = pad_token_id
        self.generate_from_embeds = generate_from_embeds

    def generate(self, model, prompt_ids, generation_config, logits_guard, contexts=None,
                 multimodal: dict | None = None) -> Generation:
        """Every row in one generate() call (prompts left-padded); the LogitsGuard's per-row flags as before.
        ``multimodal``: TRL's ``multimodal_fields`` of these prompts (a VLM's pixels and their layout)."""
        device = next(model.parameters()).device
        prompt, mask = left_pad(prompt_ids, self.pad_token_id, device)
        counter = logits_guard if logits_guard is not None else StepCounter()
        extra = generation_inputs(multimodal, prompt.shape[1], device)
        if extra and self.generate_from_embeds:
            raise ValueError(f"CausalLMPolicy(generate_from_embeds=True) cannot generate with {sorted(extra)}: the "
                             "model merges the images into its embeddings itself; use generate_from_embeds=False")
        inputs = ({"inputs_embeds": model.get_input_embeddings()(prompt)} if self.generate_from_embeds
                  else {"input_ids": prompt})
        out = model.generate(**inputs, **extra, attention_mask=mask, generation_config=generation_config,
                             logits_processor=LogitsProcessorList([counter]))
        return collect_generation(out, prompt, logits_guard, counter, eos_set(generation_config))

    def trace(self, model, prompt_ids: list[list[int]], contexts=None) -> str | None:
        """Failure path only: re-run the forward of one prompt; the first module whose output is non-finite."""
        device = next(model.parameters()).device
        return first_nonfinite_module(model, input_ids=torch.tensor(prompt_ids[:1], device=device), use_cache=False)

    def logprobs(self, model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=1.0,
                 drop_mask=None, contexts=None, compute_entropy=True, entropy_grad=False,
                 multimodal: dict | None = None, compute_aux_loss=False):
        """(logps [B, K], entropies [B, K] or None), and with ``compute_aux_loss`` a third value: the MoE router's
        load-balancing loss (the model's own ``aux_loss`` with ``output_router_logits=True``, as TRL asks for it).
        ``multimodal``: the model inputs TRL passes for these rows besides the tokens (``pixel_values``,
        ``image_grid_thw``, ``token_type_ids``...); the per-token ones are shifted with the tokens."""
        multimodal = {k: v for k, v in (multimodal or {}).items() if v is not None}
        per_token = {k: multimodal.pop(k) for k in PER_TOKEN_FIELDS if k in multimodal}
        args = (prompt_ids, prompt_mask, completion_ids, completion_mask, self.pad_token_id, temperature, drop_mask)
        kw = dict(compute_entropy=compute_entropy, entropy_grad=entropy_grad, per_token=per_token)
        split = None if compute_aux_loss else split_head(model)
        if split is None:  # a wrapper (DDP, FSDP, DeepSpeed), scaled logits or the router's aux loss: the model's own
            aux = []       # forward, full logits

            def forward(ids, att, keep, **fields):
                out = model(input_ids=ids, attention_mask=att, logits_to_keep=keep, use_cache=False, **multimodal,
                            **fields, **({"output_router_logits": True} if compute_aux_loss else {}))
                if compute_aux_loss:
                    aux.append(out.aux_loss)
                return out.logits

            logps, ents = right_aligned_logprobs(forward, *args, **kw)
            return (logps, ents, aux[0]) if compute_aux_loss else (logps, ents)
        backbone, head = split

        def hidden(ids, att, keep, **fields):
            return backbone(input_ids=ids, attention_mask=att, use_cache=False, **multimodal,
                            **fields).last_hidden_state[:, -keep:]

        return right_aligned_logprobs(hidden, *args, head=head, head_rows=head.weight.shape[0], **kw)


# logit scalings a plain ``lm_head(hidden)`` would skip (TRL's add_fused_lm_head lists the same attributes)
_LOGIT_SCALES = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                 "logits_scaling")


def split_head(model) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(backbone, LM head) of a plain Hugging Face causal LM (a peft wrapper is looked through), so that scoring can
    run the head a chunk at a time; None where the model's own forward must run: a DDP/FSDP/DeepSpeed wrapper (their
    hooks fire on the root forward), or logits the model scales or soft-caps after the head."""
    from transformers import PreTrainedModel

    base = model.get_base_model() if hasattr(model, "get_base_model") and hasattr(model, "peft_config") else model
    if not isinstance(base, PreTrainedModel) or type(base).__name__.startswith("FSDP"):
        return None
    cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    if any(getattr(cfg, a, None) not in (None, 1.0) for a in _LOGIT_SCALES):
        return None
    head = base.get_output_embeddings()
    backbone = getattr(base, base.base_model_prefix, None)
    if head is None or backbone is None or backbone is base or not hasattr(head, "weight"):
        return None
    return backbone, head

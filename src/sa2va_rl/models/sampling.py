"""What every Sa2VA Policy (InternVL family: models/sa2va.py; Qwen-VL family: models/sa2va_qwen.py) samples and
scores the same way, in one place:

* ``BannedTokens``: -inf on the padded vocabulary rows and on the image-structure tokens, in sampling and in
  scoring alike, so the scored policy is the sampled one.
* ``StopWords``: the chat template's stop words; those that are single tokens become EOS ids, the others stop
  strings that stop generation and cut the completion (phi3_chat's ``<|end|>`` on a Qwen vocabulary).
* ``generate_groups``: one generate() call for every row of a step (groups of G identical prompts sharing one
  image, left-padded to the longest prompt), new tokens only whatever generate() returns, cut after the first EOS
  or stop string, repaired-token flags kept aligned.
* ``head_logits_fp32``: the LM head in fp32 outside autocast, banned ids masked.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from sa2va_rl.models.grounding import ImageCache, decode_masks
from sa2va_rl.models.policy import (Generation, StepCounter, collect_generation, eos_set, left_pad, prompt_groups,
                                    right_aligned_logprobs, right_pad)
from sa2va_rl.numerics import LogitsGuard
from sa2va_rl.numerics.logits import fixed_signature


@fixed_signature
class BannedTokens(LogitsProcessor):
    """-inf on the padded vocabulary rows (ids >= limit: no tokens, their weights never trained) and on the
    image-structure tokens (InternVL: ``<IMG_CONTEXT>``, ``<img>``, ``</img>``, ``<vp>``, ``</vp>``; Qwen-VL:
    ``<|image_pad|>``, ``<|video_pad|>``, ``<|vision_start|>``, ...): a sampled one would claim visual features
    that do not exist. Scoring masks the same ids, so the scored policy is the sampled one."""

    def __init__(self, limit: int, banned: list[int]) -> None:
        self.limit = limit
        self.banned = sorted(banned)
        self._index: torch.Tensor | None = None

    def __call__(self, input_ids, scores):
        if scores.shape[-1] > self.limit:
            scores[..., self.limit:] = -math.inf
        if self.banned:
            if self._index is None or self._index.device != scores.device:
                self._index = torch.tensor(self.banned, device=scores.device)
            scores.index_fill_(-1, self._index, -math.inf)
        return scores


def token_ids(tokenizer, tokens) -> list[int]:
    """Ids of those ``tokens`` the tokenizer has as single tokens (unknown ones are skipped, not mapped to unk)."""
    ids = []
    for t in tokens:
        i = tokenizer.convert_tokens_to_ids(t)
        if i is not None and i != tokenizer.unk_token_id:
            ids.append(int(i))
    return ids


class StopWords:
    """A chat template's stop words on a tokenizer: single-token words are EOS ids (``ids``); the others are
    ``strings``, handed to generate() as ``stop_strings`` and cut out of each completion afterwards."""

    def __init__(self, tokenizer, words) -> None:
        from sa2va_rl.models.sa2va_inputs import single_token_ids

        self.tokenizer = tokenizer
        self.ids = single_token_ids(tokenizer, words)
        single = set(self.ids)
        self.strings = [s for s in words if not set(tokenizer.encode(s, add_special_tokens=False)) <= single]

    def generation_config(self, generation_config: GenerationConfig) -> tuple[GenerationConfig, dict]:
        """(config, extra generate() kwargs) that also stop on the stop strings."""
        if not self.strings:
            return generation_config, {}
        gc = copy.deepcopy(generation_config)
        gc.stop_strings = self.strings
        return gc, {"tokenizer": self.tokenizer}

    def cut(self, row: list[int]) -> int:
        """Length of ``row`` up to and including the token that completes the first stop string."""
        if not self.strings or not any(s in self.tokenizer.decode(row) for s in self.strings):
            return len(row)
        lo, hi = 1, len(row)  # smallest prefix whose text holds a stop string
        while lo < hi:
            mid = (lo + hi) // 2
            if any(s in self.tokenizer.decode(row[:mid]) for s in self.strings):
                hi = mid
            else:
                lo = mid + 1
        return lo


# run([(prompt ids, context, n rows) per group], generation config, logits processors, extra kwargs)
#   -> (output [N, T], prompt [N, P]): every group's rows in order, prompts left-padded (``left_pad``)
GroupRunner = Callable[[list[tuple[list[int], Any, int]], GenerationConfig, LogitsProcessorList, dict],
                       tuple[torch.Tensor, torch.Tensor]]


def generate_groups(prompt_ids: list[list[int]], contexts: list, generation_config: GenerationConfig,
                    logits_guard: LogitsGuard | None, banned: BannedTokens, stops: StopWords,
                    run: GroupRunner) -> Generation:
    """Sample every row in one ``run``, given the groups of consecutive rows with the same prompt and sample
    (``key``): each group's visual inputs are built once, its rows share them.

    ``run`` calls the model's generate() once with the processors it is given (banned ids first, then the guard,
    which must see the final row) and returns its output and the (left-padded) prompt tensor; the completions are the
    new tokens only (``new_tokens``), cut after the first EOS id and the first stop string.
    """
    gc, extra = stops.generation_config(generation_config)
    groups = [(prompt_ids[s], contexts[s], e - s)
              for s, e in prompt_groups(prompt_ids, [c.key for c in contexts])]
    counter = logits_guard if logits_guard is not None else StepCounter()
    out, prompt = run(groups, gc, LogitsProcessorList([banned, counter]), extra)
    return collect_generation(out, prompt, logits_guard, counter, eos_set(generation_config), cut=stops.cut)


def grouped_prompts(groups, pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(one left-padded prompt per group [G, P], its mask [G, P], rows per group [G]) for ``run``s."""
    ids, mask = left_pad([g[0] for g in groups], pad_token_id, device)
    return ids, mask, torch.tensor([g[2] for g in groups], device=device)


def head_logits_fp32(hidden: torch.Tensor, head: torch.nn.Module, banned: BannedTokens) -> torch.Tensor:
    """[B, T, C] last-layer hidden states -> fp32 logits [B, T, V] through ``head`` in fp32 outside autocast,
    banned ids -inf."""
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        logits = F.linear(hidden.float(), head.weight.float(), None if head.bias is None else head.bias.float())
    return banned(None, logits)


class GroundedPolicy:
    """What the Sa2VA policies share once a family knows how to run its model: scoring and ``[SEG]`` -> masks.

    A subclass provides ``_tail_hidden(model, ids, att, keep, contexts)`` (last-layer hidden states of the last
    ``keep`` positions [B, keep, C]; scoring and ``segment`` both call it) and ``_lm_head(model)``, and sets
    ``pad_token_id``, ``seg_id`` and ``banned``. Scoring runs the head (fp32, banned ids -inf) a chunk of positions at
    a time (``right_aligned_logprobs``).
    """

    def _require(self, contexts, n: int) -> list:
        """One visual-inputs object per row (the rows of a GARTaskDataset carry them)."""
        if contexts is None or len(contexts) != n:
            raise ValueError(f"{type(self).__name__} needs one visual-inputs object per row ({n}); got "
                             f"{None if contexts is None else len(contexts)}. Train on a GARTaskDataset.")
        return contexts

    def _logits(self, model, ids, att, keep, contexts) -> torch.Tensor:
        """fp32 logits [B, keep, V] of the last ``keep`` positions; banned ids (padded rows, image tokens) -inf."""
        return head_logits_fp32(self._tail_hidden(model, ids, att, keep, contexts), self._lm_head(model), self.banned)

    def logprobs(self, model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=1.0,
                 drop_mask=None, contexts=None, compute_entropy=True, hidden_hook=None, entropy_grad=False):
        """``hidden_hook(hidden [B, keep, C], keep, L)``, if given, sees the last-layer hidden states of the scoring
        forward (right-aligned layout, see ``right_aligned_logprobs``) before the head: the mask loss reads its
        ``[SEG]`` states there, with their gradient, instead of running the LLM again."""
        contexts = self._require(contexts, prompt_ids.shape[0])
        head = self._lm_head(model)

        def forward(ids, att, keep):
            hidden = self._tail_hidden(model, ids, att, keep, contexts)  # [B, keep, C]
            if hidden_hook is not None:
                hidden_hook(hidden, keep, ids.shape[1])
            return hidden

        return right_aligned_logprobs(forward,
                                      prompt_ids, prompt_mask, completion_ids, completion_mask, self.pad_token_id,
                                      temperature, drop_mask, head=lambda h: head_logits_fp32(h, head, self.banned),
                                      head_rows=head.weight.shape[0], compute_entropy=compute_entropy,
                                      entropy_grad=entropy_grad)

    @torch.no_grad()
    def segment(self, model, prompt_ids: list[list[int]], completion_ids: list[list[int]], contexts,
                cache: ImageCache | None = None) -> list[np.ndarray | None]:
        """The mask of the first ``[SEG]`` of each completion (bool [H, W]), or None without ``[SEG]``."""
        index = [[c.index(self.seg_id)] if self.seg_id in c else [] for c in completion_ids]
        return [m[0] if m else None
                for m in self.segment_at(model, prompt_ids, completion_ids, contexts, index, cache)]

    @torch.no_grad()
    def segment_at(self, model, prompt_ids: list[list[int]], completion_ids: list[list[int]], contexts,
                   seg_index: list[list[int]], cache: ImageCache | None = None) -> list[list[np.ndarray]]:
        """The masks of the ``[SEG]`` tokens at completion positions ``seg_index[i]`` of each row (bool [H, W] each,
        in that order; an empty list where a row names none).

        One LLM forward for every row that names a ``[SEG]``: each row is cut after its last named ``[SEG]``
        (attention is causal, so the states there do not depend on what follows) and right-padded (the real tokens
        keep positions 0..n-1); the grounding encoder runs once per distinct image (``cache``, shared with the
        caller's other calls of the step if given) and its decoder once per image for all of that image's
        ``[SEG]``s (models/grounding.py)."""
        contexts = self._require(contexts, len(prompt_ids))
        out: list[list[np.ndarray]] = [[] for _ in prompt_ids]
        rows = [i for i, idx in enumerate(seg_index) if idx]
        if not rows:
            return out
        for i in rows:
            c = completion_ids[i]
            bad = [j for j in seg_index[i] if not 0 <= j < len(c) or c[j] != self.seg_id]
            if bad:
                raise ValueError(f"segment_at: row {i}: positions {bad} are not [SEG] tokens of its completion")
        cache = cache if cache is not None else ImageCache()
        device = next(model.parameters()).device
        seqs = [prompt_ids[i] + completion_ids[i][:max(seg_index[i]) + 1] for i in rows]
        ids, att = right_pad(seqs, self.pad_token_id, device)
        hidden = self._tail_hidden(model, ids, att, ids.shape[1], [contexts[i] for i in rows])  # [n, L, C]
        who = [(k, len(prompt_ids[i]) + j) for k, i in enumerate(rows) for j in seg_index[i]]  # (row, position)
        states = hidden[torch.tensor([k for k, _ in who], device=device),
                        torch.tensor([t for _, t in who], device=device)]  # [number of [SEG]s, C]
        by_image: dict[int, list[int]] = {}  # index into who, per image (the G rows of a group share one image)
        for n, (k, _) in enumerate(who):
            by_image.setdefault(id(contexts[rows[k]].image), []).append(n)
        for ns in by_image.values():
            img = cache.get(model, contexts[rows[who[ns[0]][0]]].image)
            for n, m in zip(ns, decode_masks(model, states[ns], img), strict=True):
                out[rows[who[n][0]]].append(m.numpy())
        return out

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

from sa2va_rl.models.grounding import decode_masks, encode_image
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
                 drop_mask=None, contexts=None, compute_entropy=True):
        contexts = self._require(contexts, prompt_ids.shape[0])
        head = self._lm_head(model)
        return right_aligned_logprobs(lambda ids, att, keep: self._tail_hidden(model, ids, att, keep, contexts),
                                      prompt_ids, prompt_mask, completion_ids, completion_mask, self.pad_token_id,
                                      temperature, drop_mask, head=lambda h: head_logits_fp32(h, head, self.banned),
                                      head_rows=head.weight.shape[0], compute_entropy=compute_entropy)

    @torch.no_grad()
    def segment(self, model, prompt_ids: list[list[int]], completion_ids: list[list[int]], contexts
                ) -> list[np.ndarray | None]:
        """The mask of the first ``[SEG]`` of each completion (bool [H, W]), or None without ``[SEG]``.

        One LLM forward for every row with ``[SEG]``: each row is cut after its first ``[SEG]`` (attention is causal,
        so the state there does not depend on what follows) and right-padded (the real tokens keep positions 0..n-1);
        the grounding encoder runs once per distinct image and its decoder once per image for all of that image's
        rows (models/grounding.py)."""
        contexts = self._require(contexts, len(prompt_ids))
        out: list[np.ndarray | None] = [None] * len(prompt_ids)
        rows = [i for i, c in enumerate(completion_ids) if self.seg_id in c]
        if not rows:
            return out
        device = next(model.parameters()).device
        seqs = [prompt_ids[i] + completion_ids[i][:completion_ids[i].index(self.seg_id) + 1] for i in rows]
        ids, att = right_pad(seqs, self.pad_token_id, device)
        hidden = self._tail_hidden(model, ids, att, ids.shape[1], [contexts[i] for i in rows])  # [n, L, C]
        last = torch.tensor([len(s) - 1 for s in seqs], device=device)
        hidden = hidden[torch.arange(len(rows), device=device), last]  # [n, C]: the state at each first [SEG]
        by_image: dict[int, list[int]] = {}  # the G rows of a group share one image
        for k, i in enumerate(rows):
            by_image.setdefault(id(contexts[i].image), []).append(k)
        for ks in by_image.values():
            img = encode_image(model, contexts[rows[ks[0]]].image)
            for k, m in zip(ks, decode_masks(model, hidden[ks], img), strict=True):
                out[rows[k]] = m.numpy()
        return out

"""Think rollouts for caption2mask (``--seg_format think``): where a completion's ``[SEG]`` tokens are, and how its
masks are scored. Pure functions and one tokenizer-bound helper (``ThinkTags``); no model.

A think completion reads ``<think> ... </think> <answer> ... [SEG] ... </answer>``: reasoning first (which may point
at the objects it reasons about with ``[SEG]``), then the answer, whose ``[SEG]`` tokens are the prediction. Only the
answer's ``[SEG]``s are decoded into masks (the trainer's ``_add_pred_masks``); the think part's are only counted
by the format reward.

Parts, on token ids (``answer_seg_positions`` / ``think_seg_positions``):

* answer part: after the first ``<answer>`` tag, up to the first ``</answer>`` after it, or to the end of the
  completion when it never closes (a completion cut by ``max_completion_length`` keeps its answer masks);
* think part: after the first ``<think>`` tag, up to the first ``</think>`` after it; without ``</think>``, up to the
  first ``<answer>`` after ``<think>``, or to the end.

A tag is a token-id sequence (one id for a tokenizer that has it as a token, as Qwen3's has ``<think>``; several for
text tags on InternVL/Qwen2.5 vocabularies). With ``text_of`` (the text of one token id) the completion and the
tags are compared as text, so a tag whose first or last characters merged with a neighbour's (byte-level BPE's
``"><"``, ``">\\n"``, ``" <"``) is still found: each token's offset in the joined text places it inside or outside
a part. Without ``text_of`` the tag ids must appear as they are.

Rewards (TRL's signature, ``None`` on rows that are not think rows):

* ``think_format_reward``: 1.0 well-formed with ``[SEG]`` in both parts, 0.5 well-formed with ``[SEG]`` in the
  answer only, 0.0 otherwise (``well_formed`` says what well-formed is);
* ``answer_iou``: the answer's masks against the reference masks, matched one to one (Hungarian on IoU,
  ``match_masks``): mean IoU of the matched pairs minus ``UNMATCHED_PENALTY`` per mask left unmatched on either
  side, floored at 0.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from sa2va_rl.rl.rewards import _text, mask_overlap

THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"
SEG = "[SEG]"
UNMATCHED_PENALTY = 0.1  # answer_iou: subtracted per predicted or reference mask left without a partner

TextOf = Callable[[int], str]


# ----------------------------------------------------------------------------------------- positions on token ids
def _offsets(ids: Sequence[int], text_of: TextOf | None) -> tuple[list[int], Callable]:
    """(offset of each token, find(tag_ids, start) -> (begin, end) offsets of the first occurrence at or after offset
    ``start``, or None). Offsets are token indices without ``text_of``, character offsets in the joined text with
    it."""
    if text_of is None:
        def find(tag: Sequence[int], start: int):
            n = len(tag)
            for k in range(max(start, 0), len(ids) - n + 1):
                if list(ids[k:k + n]) == list(tag):
                    return k, k + n
            return None

        return list(range(len(ids))), find
    pieces = [text_of(int(t)) for t in ids]
    offsets, at = [], 0
    for p in pieces:
        offsets.append(at)
        at += len(p)
    text = "".join(pieces)

    def find_text(tag: Sequence[int], start: int):
        s = "".join(text_of(int(t)) for t in tag)
        k = text.find(s, max(start, 0)) if s else -1
        return None if k < 0 else (k, k + len(s))

    return offsets, find_text


def _segs_between(ids, seg_id: int, offsets: list[int], lo: int, hi: float) -> list[int]:
    return [j for j, t in enumerate(ids) if t == seg_id and lo <= offsets[j] < hi]


def answer_seg_positions(completion_ids: Sequence[int], seg_id: int, answer_open_ids: Sequence[int],
                         answer_close_ids: Sequence[int], text_of: TextOf | None = None) -> list[int]:
    """Completion positions of the ``[SEG]`` tokens inside the answer part (after the first ``<answer>``, before the
    first ``</answer>`` after it, or to the end without one); [] without ``<answer>``."""
    offsets, find = _offsets(completion_ids, text_of)
    opened = find(answer_open_ids, 0)
    if opened is None:
        return []
    closed = find(answer_close_ids, opened[1])
    return _segs_between(completion_ids, seg_id, offsets, opened[1], closed[0] if closed else float("inf"))


def think_seg_positions(completion_ids: Sequence[int], seg_id: int, think_open_ids: Sequence[int],
                        think_close_ids: Sequence[int], answer_open_ids: Sequence[int] | None = None,
                        text_of: TextOf | None = None) -> list[int]:
    """Completion positions of the ``[SEG]`` tokens inside the think part (after the first ``<think>``, before the
    first ``</think>`` after it; without one, before the first ``<answer>`` after ``<think>``, or to the end);
    [] without ``<think>``."""
    offsets, find = _offsets(completion_ids, text_of)
    opened = find(think_open_ids, 0)
    if opened is None:
        return []
    closed = find(think_close_ids, opened[1])
    if closed is None and answer_open_ids is not None:
        closed = find(answer_open_ids, opened[1])
    return _segs_between(completion_ids, seg_id, offsets, opened[1], closed[0] if closed else float("inf"))


class ThinkTags:
    """The four tags and ``[SEG]`` on one tokenizer: their ids (``tokenizer.encode(tag)``: one id where the tokenizer
    has the tag as a token) and each token's text, cached per id (the vocabulary bounds the cache), so the positions
    are found as text (``text_of``) whatever the tokenizer merged at a tag's edges."""

    def __init__(self, tokenizer, seg_id: int) -> None:
        self.tokenizer, self.seg_id = tokenizer, int(seg_id)
        enc = lambda s: [int(i) for i in tokenizer.encode(s, add_special_tokens=False)]  # noqa: E731
        self.think_open, self.think_close = enc(THINK_OPEN), enc(THINK_CLOSE)
        self.answer_open, self.answer_close = enc(ANSWER_OPEN), enc(ANSWER_CLOSE)
        self._text: dict[int, str] = {}
        # kept when a completion is turned back into text (TRL's completions drop special tokens, [SEG] among them)
        tags = [t for t in (self.think_open, self.think_close, self.answer_open, self.answer_close) if len(t) == 1]
        self._keep = {self.seg_id, *(t[0] for t in tags)}
        self._special = set(getattr(tokenizer, "all_special_ids", []) or [])

    def text_of(self, i: int) -> str:
        s = self._text.get(i)
        if s is None:
            s = self._text[i] = self.tokenizer.decode([i], skip_special_tokens=False)
        return s

    def answer_positions(self, ids: Sequence[int]) -> list[int]:
        return answer_seg_positions(ids, self.seg_id, self.answer_open, self.answer_close, self.text_of)

    def think_positions(self, ids: Sequence[int]) -> list[int]:
        return think_seg_positions(ids, self.seg_id, self.think_open, self.think_close, self.answer_open,
                                   self.text_of)

    def text(self, ids: Sequence[int]) -> str:
        """The completion as text with its ``[SEG]`` (and single-token tags) kept and other special tokens (EOS, pad)
        dropped: what ``think_format_reward`` reads (``seg_text``)."""
        return "".join(self.text_of(int(t)) for t in ids if t in self._keep or t not in self._special)


def seg_index(completion_ids: list[list[int]], seg_formats: list[str | None], seg_id: int,
              tags: ThinkTags | None) -> list[list[int]]:
    """Per row, the completion positions whose masks its rewards read: a think row's answer ``[SEG]``s, any other
    row's first ``[SEG]`` (the plain template's one), [] without."""
    out = []
    for ids, fmt in zip(completion_ids, seg_formats, strict=True):
        if fmt == "think":
            if tags is None:
                raise ValueError("seg_index: a think row needs the tokenizer's ThinkTags")
            out.append(tags.answer_positions(ids))
        else:
            out.append([ids.index(seg_id)] if seg_id in ids else [])
    return out


# ----------------------------------------------------------------------------------------- rewards
_WS_OR_STOP = r"(?:\s|<\|[^|>]*\|>)*"  # whitespace and chat-template stop markers (phi3's text '<|end|>')
_TAG = re.compile(r"</?(?:think|answer)>")
_FORM = re.compile(rf"^\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>{_WS_OR_STOP}$", re.DOTALL)


def well_formed(text: str) -> tuple[str, str] | None:
    """(think part, answer part) of a well-formed think completion, else None. Well-formed: the text is, in order,
    optional whitespace, ``<think>``, the think part, ``</think>``, optional whitespace, ``<answer>``, the answer part,
    ``</answer>``, then only whitespace and chat-template stop markers (``<|...|>``); each tag appears exactly once
    (no tag inside either part); the think part has some text besides ``[SEG]`` and whitespace. The answer part may
    be just ``[SEG]``s."""
    m = _FORM.match(text)
    if m is None:
        return None
    think, answer = m.group("think"), m.group("answer")
    if _TAG.search(think) or _TAG.search(answer) or not think.replace(SEG, " ").strip():
        return None
    return think, answer


def _column(value, n: int) -> list:
    return value if isinstance(value, list) else [value] * n


def think_format_reward(completions, seg_format=None, seg_text=None, task=None, **kwargs) -> list[float | None]:
    """The think format (the authors' scheme): 1.0 for a well-formed completion (``well_formed``) with ``[SEG]`` in
    its think part and in its answer part, 0.5 with ``[SEG]`` in the answer only, 0.0 otherwise (malformed, or no
    ``[SEG]`` in the answer). None on rows whose ``seg_format`` is not "think" and on mask2caption rows.

    Reads ``seg_text`` (the trainer's text of each completion with ``[SEG]`` kept, ``ThinkTags.text``) where given:
    TRL's completions are decoded without special tokens, which drops ``[SEG]``."""
    n = len(completions)
    formats, tasks, texts = _column(seg_format, n), _column(task, n), _column(seg_text, n)
    out: list[float | None] = []
    for completion, fmt, t, text in zip(completions, formats, tasks, texts, strict=True):
        if fmt != "think" or t == "mask2caption":
            out.append(None)
            continue
        parts = well_formed(text if text is not None else _text(completion))
        if parts is None or SEG not in parts[1]:
            out.append(0.0)
        else:
            out.append(1.0 if SEG in parts[0] else 0.5)
    return out


def match_masks(pred: list[np.ndarray], gt: list[np.ndarray]) -> tuple[list[tuple[int, int]], list[float]]:
    """One-to-one matching of predicted and reference bool masks (all of one size) maximising the summed IoU
    (Hungarian, ``scipy.optimize.linear_sum_assignment``): (pairs (pred index, gt index) in pred order, their IoUs).
    min(len(pred), len(gt)) pairs; a pair may have IoU 0."""
    if not pred or not gt:
        return [], []
    from scipy.optimize import linear_sum_assignment

    iou = np.zeros((len(pred), len(gt)))  # [P, G]
    for i, p in enumerate(pred):
        for j, g in enumerate(gt):
            inter, union = mask_overlap(p, g)
            iou[i, j] = inter / union if union else 0.0
    rows, cols = linear_sum_assignment(iou, maximize=True)
    pairs = [(int(r), int(c)) for r, c in zip(rows, cols, strict=True)]
    return pairs, [float(iou[r, c]) for r, c in pairs]


def _references(gt_masks, gt_mask, i: int) -> list:
    if gt_masks is not None and gt_masks[i] is not None:
        return list(gt_masks[i])
    if gt_mask is not None and gt_mask[i] is not None:
        return [gt_mask[i]]
    return []


def answer_iou(completions, pred_masks=None, gt_masks=None, seg_format=None, gt_mask=None, **kwargs
               ) -> list[float | None]:
    """The answer's masks (``pred_masks``: the trainer's masks of each completion's answer ``[SEG]``s) against the
    reference masks (``gt_masks``, a list per row, else the row's one ``gt_mask``), matched one to one
    (``match_masks``): max(0, mean IoU of the matched pairs - ``UNMATCHED_PENALTY`` x masks left unmatched, predicted
    or reference). No answer mask scores 0. None on rows whose ``seg_format`` is not "think" or without a reference."""
    n = len(completions)
    formats = _column(seg_format, n)
    preds = pred_masks if pred_masks is not None else [None] * n
    out: list[float | None] = []
    for i, fmt in enumerate(formats):
        refs = _references(gt_masks, gt_mask, i)
        if fmt != "think" or not refs:
            out.append(None)
            continue
        pred = list(preds[i] or [])
        _pairs, ious = match_masks(pred, refs)
        unmatched = len(pred) + len(refs) - 2 * len(ious)
        mean = sum(ious) / len(ious) if ious else 0.0
        out.append(max(0.0, mean - UNMATCHED_PENALTY * unmatched))
    return out

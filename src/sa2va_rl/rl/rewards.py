"""Reward functions with TRL's signature: ``(completions, **kwargs) -> list[float | None]``.

Pure functions from the caller's point of view: the same arguments give the same values. ``None`` means "no
opinion" (TRL leaves it out of the group baseline). ``caption_meteor`` with METEOR 1.5 talks to one java process
per run (eval/meteor.py); everything else does no I/O.
"""

from __future__ import annotations

import re
from collections import Counter

_WORD = re.compile(r"[a-z0-9]+")


def _text(completion) -> str:
    """A completion is a string, or (conversational) a list of messages whose last content is the answer."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        return content if isinstance(content, str) else " ".join(
            c.get("text", "") for c in content if isinstance(c, dict))
    return str(completion)


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _against_references(completions, references, score) -> list[float | None]:
    """score(completion_text, reference) per pair; None where there is no reference (TRL's 'no opinion')."""
    if references is None:
        return [None] * len(completions)
    return [None if ref is None else score(_text(c), ref) for c, ref in zip(completions, references, strict=True)]


def _f1(text: str, ref: str) -> float:
    pred, gold = Counter(_tokens(text)), Counter(_tokens(ref))
    common = sum((pred & gold).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(pred.values()), common / sum(gold.values())
    return 2 * precision * recall / (precision + recall)


def token_f1(completions, solution=None, **kwargs) -> list[float | None]:
    """F1 of the bag of lower-cased words of the completion against ``solution``; None without a solution."""
    return _against_references(completions, solution, _f1)


def exact_match(completions, solution=None, **kwargs) -> list[float | None]:
    """1.0 when the completion's words equal the solution's words, else 0.0; None without a solution."""
    return _against_references(completions, solution, lambda text, ref: float(_tokens(text) == _tokens(ref)))


class _NoWordNet:
    """Stands in for nltk's WordNet reader when the corpus is not installed: no synonyms, so METEOR
    matches exact words and Porter stems only. Nothing is downloaded at run time."""

    def synsets(self, *args, **kwargs):
        return []


def _wordnet():
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        return wordnet
    except LookupError:
        return _NoWordNet()


_WORDNET = None


def wordnet_available() -> bool:
    """Whether nltk's WordNet corpus is installed, so that METEOR matches synonyms (else exact + stem only)."""
    global _WORDNET
    if _WORDNET is None:
        _WORDNET = _wordnet()
    return not isinstance(_WORDNET, _NoWordNet)


def make_caption_meteor(meteor: str = "auto"):
    """The caption reward ``caption_meteor(completions, caption=None, **kwargs) -> list[float | None]``: METEOR of
    each completion against its reference ``caption``, in [0, 1]; None without one. All the batch's pairs are
    scored in one call (eval/meteor.py: one round trip to the run's METEOR 1.5 java process).

    ``meteor``: ``auto`` (METEOR 1.5 where java is installed, else nltk with a warning), ``meteor-1.5`` (the
    standard; refused where it cannot run) or ``nltk`` (nltk's meteor_score: exact + stem matching, WordNet
    synonyms where nltk's corpus is installed). An unknown name is refused here, and so is ``meteor-1.5`` where it
    cannot run; ``auto`` is resolved at the first call (so importing this module starts and warns nothing). The
    function's ``meteor_scorer()`` is the scorer (``report()``: which implementation scored, for stability.json)."""
    from sa2va_rl.eval.meteor import check_impl, get_scorer, meteor_scores

    check_impl(meteor, option="caption_meteor_impl")
    if meteor != "auto":
        get_scorer(meteor, option="caption_meteor_impl")  # MeteorUnavailable now, not at the first step

    def meteor_scorer():
        return get_scorer(meteor, option="caption_meteor_impl")

    def caption_meteor(completions, caption=None, **kwargs) -> list[float | None]:
        """METEOR of each completion against its reference ``caption`` (one batch); None without one."""
        if caption is None:
            return [None] * len(completions)
        pairs = [(i, _text(c), ref) for i, (c, ref) in enumerate(zip(completions, caption, strict=True))
                 if ref is not None]
        out: list[float | None] = [None] * len(completions)
        if pairs:
            _, per = meteor_scores([t for _, t, _ in pairs], [r for _, _, r in pairs], meteor_scorer())
            for (i, _, _), value in zip(pairs, per, strict=True):
                out[i] = float(value)
        return out

    caption_meteor.meteor_scorer = meteor_scorer
    caption_meteor.meteor = meteor
    return caption_meteor


caption_meteor = make_caption_meteor("auto")  # the default: METEOR 1.5 where java is installed (started lazily)


def mask_overlap(pred, gt) -> tuple[int, int]:
    """(intersection, union) pixel counts of two bool masks of one size; a missing prediction (None) overlaps
    nothing. IoU is their ratio (0 on an empty union); cIoU sums both over a data set first."""
    import numpy as np

    gt = np.asarray(gt, dtype=bool)
    if pred is None:
        return 0, int(gt.sum())
    pred = np.asarray(pred, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask_iou: predicted mask {pred.shape} and reference {gt.shape} differ in size")
    return int(np.logical_and(pred, gt).sum()), int(np.logical_or(pred, gt).sum())


def mask_iou(completions, pred_mask=None, gt_mask=None, **kwargs) -> list[float | None]:
    """IoU of the predicted (``pred_mask``: the trainer's mask of each completion's first [SEG]) and reference
    bool masks; 0 when the union is empty or no mask was predicted (a completion without [SEG]); None when
    there is no reference."""
    if gt_mask is None:
        return [None] * len(completions)
    if pred_mask is None:
        pred_mask = [None] * len(completions)
    out: list[float | None] = []
    for pred, gt in zip(pred_mask, gt_mask, strict=True):
        if gt is None:
            out.append(None)
            continue
        inter, union = mask_overlap(pred, gt)
        out.append(inter / union if union else 0.0)
    return out


_JUNK = re.compile(r"(<\|[^|>]*\|>|<IMG_CONTEXT>|<img>|</img>|\ufffd)")


def format_reward(completions, task=None, seg_format=None, seg_text=None, **kwargs) -> list[float | None]:
    """1.0 for a well-formed answer: non-empty text, no template/image tokens or replacement characters,
    and exactly the [SEG] use the task needs (caption2mask: at least one; mask2caption: none). None on think rows
    (``seg_format`` "think"): rl/think.py's think_format_reward scores their format. ``seg_text``: the completions
    with ``[SEG]`` kept (the trainer adds it for Sa2VA: TRL decodes without special tokens, ``[SEG]`` among them),
    read instead of ``completions`` where given."""
    out: list[float | None] = []
    tasks = task if isinstance(task, list) else [task] * len(completions)
    formats = seg_format if isinstance(seg_format, list) else [seg_format] * len(completions)
    texts = seg_text if isinstance(seg_text, list) else [None] * len(completions)
    for completion, t, fmt, kept in zip(completions, tasks, formats, texts, strict=True):
        if fmt == "think":
            out.append(None)
            continue
        text = _text(completion) if kept is None else kept
        words = text.replace("[SEG]", " ").strip()
        ok = bool(words) and not _JUNK.search(text)
        if t == "caption2mask":
            ok = ok and "[SEG]" in text
        elif t == "mask2caption":
            ok = ok and "[SEG]" not in text
        out.append(float(ok))
    return out


REWARDS = {"token_f1": token_f1, "exact_match": exact_match}

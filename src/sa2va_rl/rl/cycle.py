"""The cycle reward (``--cycle_reward``): a mask2caption caption is good when it finds its region again.

Each sampled caption of a mask2caption row is put to a *listener* as a caption2mask question on the same image,
with the original trainer's prompt (``CYCLE_QUESTION``); the mask the listener draws is compared with the row's
region mask (IoU), optionally times the original's length factor (``length_factor``). Reference-free: no
reference caption is read.

* The listener answers with the template Sa2VA was fine-tuned to give for a segmentation question
  (``CYCLE_ANSWER``, "Sure, [SEG]."), teacher-forced, not generated: the hidden state at its ``[SEG]`` is taken
  from ONE batched forward over every caption of the step (``GroundedPolicy.segment_at``). Where the listener's
  greedy answer would start with that template, the mask is exactly the one upstream's ``predict_forward`` returns
  (tests/rl/test_cycle.py checks it on a tiny upstream build); it costs one prefill instead of a prefill plus
  greedy decoding per caption, and it is deterministic.
* The listener is the policy's own model with its LoRA adapters disabled (``listener``): the model at step 0, a
  fixed judge that cannot drift with the captions it judges; without adapters (full fine-tuning) it is the live
  policy, under no grad (see docs/segmentation.md). It runs in eval mode: no dropout, deterministic.
* Each distinct image is tiled once (its rows' captions share one visual-inputs object, so the vision tower runs
  once per image) and encoded by SAM2 at most once per step (the step's ``ImageCache``).

The reward functions here are pure: the trainer (``Sa2VAGRPOTrainer._add_cycle_masks``) adds ``cycle_mask`` to each
mask2caption row before they run, as it adds ``pred_mask`` to caption2mask rows.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import numpy as np
import torch

from sa2va_rl.models.grounding import ImageCache
from sa2va_rl.rl.rewards import _text, mask_overlap

CYCLE_QUESTION = 'This is a description for something in the image: "{caption}", please segment it in the image.'
CYCLE_ANSWER = "Sure, [SEG]."  # the referring-segmentation answer of Sa2VA's SFT data (and of the original trainer)
_MARK = "@@sa2va-rl-cycle-question@@"  # stands for the question in a prompt built once per image

# text a caption must not carry into the listener's prompt: template and image-structure tokens, [SEG], U+FFFD
_NOT_CAPTION = re.compile(r"(<\|[^|>]*\|>|<IMG_CONTEXT>|</?img>|</?vp>|</?p>|\[SEG\]|\ufffd)")

# the original trainer's length factor (train_sa2va_dual_loop.py): short captions (< 25 words) scaled down to 0.25,
# long ones (> 120 words) to 0.6, the product floored at 0.25
SHORT_WORDS, SHORT_LAMBDA, SHORT_FLOOR = 25, 0.5, 0.25
LONG_WORDS, LONG_LAMBDA, LONG_FLOOR = 120, 0.3, 0.6


def clean_caption(text: str) -> str:
    """A completion's text as the listener reads it: template/image tokens and [SEG] removed, whitespace collapsed."""
    return " ".join(_NOT_CAPTION.sub(" ", text).split())


def cycle_question(caption: str) -> str:
    return CYCLE_QUESTION.format(caption=caption)


def length_factor(caption: str) -> float:
    """The original's multiplier in [0.25, 1] on a caption of n words: 1 - 0.5 (25 - n) / 25 below 25 words (at
    least 0.25), times 1 - 0.3 min(1, (n - 120) / 120) above 120 words (at least 0.6)."""
    n = len(caption.split())
    short = min(1.0, max(SHORT_FLOOR, 1.0 - SHORT_LAMBDA * max(0.0, SHORT_WORDS - n) / SHORT_WORDS))
    long = min(1.0, max(LONG_FLOOR, 1.0 - LONG_LAMBDA * min(1.0, max(0.0, n - LONG_WORDS) / LONG_WORDS)))
    return max(SHORT_FLOOR, short * long)


def cycle_iou(completions, cycle_mask=None, region_mask=None, **kwargs) -> list[float | None]:
    """IoU of the listener's mask for each caption (``cycle_mask``) with the row's region (``region_mask``); 0 when
    the caption gave no mask (an empty caption); None on rows without a region (caption2mask)."""
    if region_mask is None:
        return [None] * len(completions)
    if cycle_mask is None:
        cycle_mask = [None] * len(completions)
    out: list[float | None] = []
    for pred, region in zip(cycle_mask, region_mask, strict=True):
        if region is None:
            out.append(None)
            continue
        inter, union = mask_overlap(pred, region)
        out.append(inter / union if union else 0.0)
    return out


def cycle_iou_x_length(completions, cycle_mask=None, region_mask=None, **kwargs) -> list[float | None]:
    """``cycle_iou`` times the original's ``length_factor`` of the caption."""
    ious = cycle_iou(completions, cycle_mask, region_mask)
    return [None if v is None else v * length_factor(clean_caption(_text(c))) for v, c in zip(ious, completions)]


cycle_iou.needs_cycle_mask = True  # the trainer adds ``cycle_mask`` to the rows when a reward says so
cycle_iou_x_length.needs_cycle_mask = True


def cycle_reward(with_length_factor: bool = False):
    """The reward function for ``--cycle_reward`` (``--cycle_length_factor``: times the length factor)."""
    return cycle_iou_x_length if with_length_factor else cycle_iou


def needs_cycle_masks(funcs) -> bool:
    return any(getattr(f, "needs_cycle_mask", False) for f in funcs)


@contextlib.contextmanager
def listener(model):
    """The model that re-segments: ``model`` with every LoRA adapter in it disabled (the model at step 0 for a
    fresh adapter, no copy), or ``model`` itself when it has none (full fine-tuning); in eval mode (a judge without
    dropout: the same caption gets the same mask), each module's own mode restored afterwards."""
    from sa2va_rl.rl.reference import peft_models

    modes = [(m, m.training) for m in model.modules()]
    try:
        with contextlib.ExitStack() as stack:
            for peft in peft_models(model):
                stack.enter_context(peft.disable_adapter())
            model.eval()
            yield model
    finally:
        for m, training in modes:
            m.training = training


def answer_ids(tokenizer, seg_id: int) -> list[int]:
    """``CYCLE_ANSWER``'s ids as the SFT data tokenizes an answer (on its own), through its ``[SEG]``."""
    ids = tokenizer(text=CYCLE_ANSWER, add_special_tokens=False)["input_ids"]
    if seg_id not in ids:
        raise ValueError(f"--cycle_reward: the tokenizer does not encode [SEG] in {CYCLE_ANSWER!r} as the [SEG] "
                         f"token (id {seg_id}): {ids}; the checkpoint's tokenizer lacks Sa2VA's [SEG]")
    return ids[:ids.index(seg_id) + 1]


def cycle_prompts(policy, captions: list[str], contexts: list) -> tuple[list[list[int]], list]:
    """(prompt ids, visual inputs) of the cycle question for each caption on its row's image. The visual inputs
    are built once per distinct image (``policy.encode(image, question, None, key)``) and shared by its captions;
    the prompt text once per image too, with a mark where the question goes."""
    per_image: dict[int, tuple[str, object]] = {}
    texts, visuals = [], []
    for caption, ctx in zip(captions, contexts, strict=True):
        question = cycle_question(caption)
        built = per_image.get(id(ctx.image))
        if built is None:
            built = per_image[id(ctx.image)] = policy.encode(ctx.image, _MARK, None, ctx.key)
        template, visual = built
        # the prompt builders insert the question verbatim; were one to alter it, build this prompt in full
        texts.append(template.replace(_MARK, question) if template.count(_MARK) == 1 else
                     policy.encode(ctx.image, question, None, ctx.key)[0])
        visuals.append(visual)
    ids = policy.tokenizer(text=texts)["input_ids"] if texts else []
    return [list(i) for i in ids], visuals


@dataclass
class CycleMasks:
    """What ``cycle_masks`` found: one mask (bool [H, W]) or None per caption, and its counts."""

    masks: list[np.ndarray | None]
    encodes: int  # SAM2 image encodings it ran (images already in the step's cache cost none)
    no_seg: int  # captions that gave no mask (empty once cleaned)


@torch.no_grad()
def cycle_masks(policy, model, captions: list[str], contexts: list, cache: ImageCache | None = None) -> CycleMasks:
    """The listener's mask for each caption (``captions[i]`` on the image of ``contexts[i]``): the cycle question
    and the teacher-forced ``CYCLE_ANSWER`` for every caption in one batched forward, its ``[SEG]`` state decoded by
    SAM2 once per image (``policy.segment_at``). An empty caption (once cleaned) gets None. ``model`` is whatever
    the caller chose as the listener (``listener``)."""
    cache = cache if cache is not None else ImageCache()
    before = cache.encodes
    texts = [clean_caption(_text(c)) for c in captions]
    rows = [i for i, t in enumerate(texts) if t]
    masks: list[np.ndarray | None] = [None] * len(captions)
    if rows:
        answer = answer_ids(policy.tokenizer, policy.seg_id)
        prompts, visuals = cycle_prompts(policy, [texts[i] for i in rows], [contexts[i] for i in rows])
        found = policy.segment_at(model, prompts, [answer] * len(rows), visuals, [[len(answer) - 1]] * len(rows),
                                  cache)
        for i, m in zip(rows, found, strict=True):
            masks[i] = m[0]
    return CycleMasks(masks, cache.encodes - before, len(captions) - len(rows))

"""GAR region tasks for GRPO: what a row of the training set holds and how it is scored.

* ``mask2caption``: image + region mask (as Sa2VA's region prompt) -> a caption, scored by METEOR against the
  reference caption, plus a small format reward.
* ``caption2mask``: image + the reference caption -> an answer with ``[SEG]``, whose mask is scored by IoU
  against the reference mask, plus the format reward.
* ``both``: each GAR sample appears once per task.

caption2mask has two answer formats (``seg_format``): ``plain`` (the default) asks to segment the caption and the
model answers with Sa2VA's template ("Sure, [SEG]."); ``think`` asks for reasoning inside ``<think></think>`` and then
the answer inside ``<answer></answer>``, so that the G rollouts of a prompt differ before their ``[SEG]``
(rl/think.py; docs/segmentation.md).

A row is a dict; TRL hands every key but ``prompt`` to the reward functions: ``task``, ``caption`` (reference,
mask2caption rows only), ``gt_mask`` (reference, caption2mask rows only), ``region_mask`` (the region the prompt
shows, mask2caption rows only: what the cycle reward, rl/cycle.py, compares the re-segmented caption with),
``seg_format`` (caption2mask rows: "plain" or "think"; None on mask2caption rows), ``source`` ("file:row"), and
``visual`` (the sample's tiles and region cells, which the trainer passes to the Policy).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from sa2va_rl.data.gar import BadRow, GARReader, NoGoodRows
from sa2va_rl.rl.rewards import format_reward, make_caption_meteor, mask_iou
from sa2va_rl.rl.think import answer_iou, think_format_reward

logger = logging.getLogger(__name__)

TASKS = ("mask2caption", "caption2mask")
SEG_FORMATS = ("plain", "think")
DEFAULT_QUESTION = "Describe the masked region in detail."


def task_list(task: str) -> list[str]:
    if task == "both":
        return list(TASKS)
    if task not in TASKS:
        raise ValueError(f"task {task!r}: use mask2caption, caption2mask or both")
    return [task]


def check_seg_format(seg_format: str, tasks: list[str]) -> None:
    """Refuse an unknown ``seg_format``, and ``think`` for tasks without caption2mask rows (it would change nothing)."""
    if seg_format not in SEG_FORMATS:
        raise ValueError(f"seg_format {seg_format!r}: use plain (the template answer) or think (reasoning, then the "
                         "answer)")
    if seg_format == "think" and "caption2mask" not in tasks:
        raise ValueError(f"seg_format think formats caption2mask answers; the tasks {tasks} have none: use task "
                         "caption2mask or both, or drop seg_format")


def task_rewards(tasks: list[str], format_weight: float = 0.2, judge=None, cycle_weight: float = 0.0,
                 cycle_length_factor: bool = False, seg_format: str = "plain", meteor: str = "auto"
                 ) -> tuple[list, list[float]]:
    """(reward functions, weights) for the tasks. Each function returns None on rows of the other task. With an
    LLM judge (rl/judge.py), mask2caption is rewarded 0.25 x METEOR + 0.75 x the judge's score / 10, as the
    original trainer did. ``cycle_weight`` > 0 adds the cycle reward (rl/cycle.py: the caption re-segmented, IoU
    with its region; ``cycle_length_factor``: times the original's length factor) with that weight. ``meteor``:
    which METEOR (``caption_meteor_impl``: auto, meteor-1.5 or nltk; eval/meteor.py).

    ``seg_format`` think: caption2mask is rewarded by ``think_format_reward`` (1.0) and ``answer_iou`` (1.0) in place
    of ``mask_iou`` and ``format_reward``'s caption2mask part (format_reward has no opinion on think rows; it stays
    for mask2caption rows, and is left out when there are none)."""
    check_seg_format(seg_format, tasks)
    if cycle_weight < 0 or cycle_weight != cycle_weight:
        raise ValueError(f"--cycle_reward {cycle_weight}: use a weight >= 0 (0 turns the cycle reward off)")
    if cycle_weight > 0 and "mask2caption" not in tasks:
        raise ValueError(f"--cycle_reward scores mask2caption captions; task(s) {tasks} have none: use --task "
                         "mask2caption or both, or drop --cycle_reward")
    funcs, weights = [], []
    if "mask2caption" in tasks:
        caption_meteor = make_caption_meteor(meteor)
    if "mask2caption" in tasks and judge is not None:
        from sa2va_rl.rl.judge import judge_reward

        funcs += [caption_meteor, judge_reward(judge)]
        weights += [0.25, 0.75]
    elif "mask2caption" in tasks:
        funcs.append(caption_meteor)
        weights.append(1.0)
    if "caption2mask" in tasks and seg_format == "think":
        funcs += [think_format_reward, answer_iou]
        weights += [1.0, 1.0]
    elif "caption2mask" in tasks:
        funcs.append(mask_iou)
        weights.append(1.0)
    if seg_format == "plain" or "mask2caption" in tasks:
        funcs.append(format_reward)
        weights.append(format_weight)
    if cycle_weight > 0:  # last: the other rewards keep their places in --reward_weights
        from sa2va_rl.rl.cycle import cycle_reward

        funcs.append(cycle_reward(cycle_length_factor))
        weights.append(cycle_weight)
    return funcs, weights


def caption2mask_question(caption: str, seg_format: str = "plain") -> str:
    """The caption2mask question. ``think`` asks for the reasoning inside <think></think>, where [SEG] may point at
    the objects it reasons about, then the answer inside <answer></answer> with a [SEG] for each object asked for
    (our wording, after the think/answer format of the Sa2VA authors' reasoning-segmentation RL)."""
    target = caption.rstrip(".")
    if seg_format == "think":
        return (f"Please segment {target}. First think about which objects in the image it is and where they are, "
                "inside <think> </think>; you may mark an object you reason about with [SEG]. Then give the answer "
                "inside <answer> </answer>, with one [SEG] for each object to segment.")
    return f"Please segment {target}."


class GARTaskDataset:
    """Rows for GRPO from a GARReader: ``len(reader) * len(tasks)`` rows, row i = sample i // T, task i % T.

    A bad sample (``bad_rows='skip'``) is replaced by the next good one and counted once by the reader. The last
    few rows are cached: TRL reads each row G times in a row, and the G copies share one ``visual`` object.
    ``to_dataset()`` gives the ``datasets.Dataset`` TRL wants: an index column decoded on access.
    """

    def __init__(self, reader: GARReader, policy, tasks: list[str], cache_size: int = 16,
                 max_prompt_tokens: int | None = None, seg_format: str = "plain") -> None:
        for t in tasks:
            task_list(t)
        check_seg_format(seg_format, list(tasks))
        self.reader, self.policy, self.tasks = reader, policy, list(tasks)
        self.seg_format = seg_format
        self.max_prompt_tokens = max_prompt_tokens
        self._cache: OrderedDict[tuple[int, str], dict] = OrderedDict()
        self.cache_size = cache_size

    def __len__(self) -> int:
        return len(self.reader) * len(self.tasks)

    def __getitem__(self, i: int) -> dict:
        idx, task = divmod(int(i), len(self.tasks))
        task = self.tasks[task]
        key = (idx, task)
        if key not in self._cache:
            self._cache[key] = self._build(idx, task)
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return dict(self._cache[key])  # a fresh dict: the trainer may add keys; the tensors are shared

    def to_dataset(self):
        from datasets import Dataset

        return Dataset.from_dict({"row": list(range(len(self)))}).with_transform(self._transform)

    def _transform(self, batch: dict) -> dict:
        rows = [self[i] for i in batch["row"]]
        return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}

    def _build(self, idx: int, task: str) -> dict:
        """The row for sample ``idx`` (or the next good one): a sample whose prompt is over ``max_prompt_tokens``
        (a runaway caption makes a caption2mask prompt of thousands of tokens) is skipped and counted like a bad
        row, field 'conversations', so one sample cannot cost a step minutes and gigabytes."""
        j = idx
        for _ in range(len(self.reader)):
            j, s = self.reader.get_good(j)
            row = self._row(s, task)
            if self.max_prompt_tokens is None:
                return row
            n = len(self.policy.tokenizer(row["prompt"]).input_ids)
            if n <= self.max_prompt_tokens:
                return row
            path, index = s.source.rsplit(":", 1)
            why = f"{task} prompt of {n} tokens > max_prompt_tokens {self.max_prompt_tokens}"
            self.reader.reject(j, BadRow(path, int(index), "conversations", why))
            j = (j + 1) % len(self.reader)
        raise NoGoodRows(f"{self.reader.data_dir}: no row has a prompt within max_prompt_tokens "
                         f"{self.max_prompt_tokens}: {self.reader.bad_report()}")

    def _row(self, s, task: str) -> dict:
        if task == "mask2caption":
            prompt, visual = self.policy.encode(s.image, s.question or DEFAULT_QUESTION, [s.mask], s.source)
            return {"prompt": prompt, "task": task, "caption": s.caption, "gt_mask": None, "region_mask": s.mask,
                    "seg_format": None, "source": s.source, "visual": visual}
        prompt, visual = self.policy.encode(s.image, caption2mask_question(s.caption, self.seg_format), None,
                                            s.source)
        return {"prompt": prompt, "task": task, "caption": None, "gt_mask": s.mask, "region_mask": None,
                "seg_format": self.seg_format,
                "source": s.source, "visual": visual}

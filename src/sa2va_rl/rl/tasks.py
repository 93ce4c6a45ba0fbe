"""GAR region tasks for GRPO: what a row of the training set holds and how it is scored.

* ``mask2caption``: image + region mask (as Sa2VA's region prompt) -> a caption, scored by METEOR against the
  reference caption, plus a small format reward.
* ``caption2mask``: image + the reference caption -> an answer with ``[SEG]``, whose mask is scored by IoU
  against the reference mask, plus the format reward.
* ``both``: each GAR sample appears once per task.

A row is a dict; TRL hands every key but ``prompt`` to the reward functions: ``task``, ``caption`` (reference,
mask2caption rows only), ``gt_mask`` (reference, caption2mask rows only), ``source`` ("file:row"), and
``visual`` (the sample's tiles and region cells, which the trainer passes to the Policy).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from sa2va_rl.data.gar import BadRow, GARReader, NoGoodRows
from sa2va_rl.rl.rewards import format_reward, make_caption_meteor, mask_iou

logger = logging.getLogger(__name__)

TASKS = ("mask2caption", "caption2mask")
DEFAULT_QUESTION = "Describe the masked region in detail."


def task_list(task: str) -> list[str]:
    if task == "both":
        return list(TASKS)
    if task not in TASKS:
        raise ValueError(f"task {task!r}: use mask2caption, caption2mask or both")
    return [task]


def task_rewards(tasks: list[str], format_weight: float = 0.2, judge=None, meteor: str = "auto"
                 ) -> tuple[list, list[float]]:
    """(reward functions, weights) for the tasks. Each function returns None on rows of the other task. With an
    LLM judge (rl/judge.py), mask2caption is rewarded 0.25 x METEOR + 0.75 x the judge's score / 10, as the
    original trainer did. ``meteor``: which METEOR (``caption_meteor_impl``: auto, meteor-1.5 or nltk;
    eval/meteor.py)."""
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
    if "caption2mask" in tasks:
        funcs.append(mask_iou)
        weights.append(1.0)
    funcs.append(format_reward)
    weights.append(format_weight)
    return funcs, weights


def caption2mask_question(caption: str) -> str:
    return f"Please segment {caption.rstrip('.')}."


class GARTaskDataset:
    """Rows for GRPO from a GARReader: ``len(reader) * len(tasks)`` rows, row i = sample i // T, task i % T.

    A bad sample (``bad_rows='skip'``) is replaced by the next good one and counted once by the reader. The last
    few rows are cached: TRL reads each row G times in a row, and the G copies share one ``visual`` object.
    ``to_dataset()`` gives the ``datasets.Dataset`` TRL wants: an index column decoded on access.
    """

    def __init__(self, reader: GARReader, policy, tasks: list[str], cache_size: int = 16,
                 max_prompt_tokens: int | None = None) -> None:
        for t in tasks:
            task_list(t)
        self.reader, self.policy, self.tasks = reader, policy, list(tasks)
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
            return {"prompt": prompt, "task": task, "caption": s.caption, "gt_mask": None, "source": s.source,
                    "visual": visual}
        prompt, visual = self.policy.encode(s.image, caption2mask_question(s.caption), None, s.source)
        return {"prompt": prompt, "task": task, "caption": None, "gt_mask": s.mask, "source": s.source,
                "visual": visual}

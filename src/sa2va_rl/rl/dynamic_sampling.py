"""Dynamic sampling (DAPO, arXiv 2503.14476, section 3.2): groups whose G rewards are all equal are dropped and
refilled from the data, so every group in the loss carries a learning signal.

A group with zero reward std has advantage 0 for each of its completions: with the token-mean losses it still
counts in the denominator and dilutes the batch's gradient (as if the batch were smaller), and a batch made of such
groups is a step of pure noise from the KL and clipping terms. DAPO over-samples and keeps drawing until the batch
holds only groups with 0 < accuracy < 1; veRL's ``filter_groups`` does the same with ``max_num_gen_batches``
rounds. TRL 1.16 has no such option (its experimental ``GRPOWithReplayBufferTrainer`` replaces such groups with
groups it trained on before instead of fresh ones).

Here, at TRL's seam (``Sa2VAGRPOTrainer._generate_and_score_completions``): after a generation batch is scored,
its zero-std groups are counted; fresh prompts are drawn from the train dataset (a generator seeded by the run's
seed and the step, so a resumed run draws the same), each G times, generated and scored through the same seam;
groups with a signal take the dropped groups' places, in order. After ``dynamic_sampling_max_rounds`` rounds the
places still open keep their zero-std group (advantage 0, counted as unfilled): the batch size never changes. The
advantages of the batch are then recomputed over the merged rewards.

Counted in ``stability.json`` and the logs (``stability/dynamic_sampling/*``): ``groups`` drawn by the sampler,
``zero_std_groups`` among them, ``refilled_groups`` (replaced by a group with a signal), ``unfilled_groups`` (kept
after the last round), ``extra_groups`` generated for the refills (the cost: each is G more completions). Per
step, ``dynamic_sampling/zero_std_share_drawn`` and ``dynamic_sampling/zero_std_share_trained``. TRL's own
per-generation metrics (``reward``, ``frac_reward_zero_std``...) then average over every group generated in the
step, refills included.

One process only for now: with several, a group's completions may sit on several ranks and the refill would
have to be a collective decision.
"""

from __future__ import annotations

import logging

import torch
from trl.trainer.utils import nanstd

from sa2va_rl.rl.advantages import weighted_rewards

logger = logging.getLogger(__name__)

COUNTERS = ("groups", "zero_std_groups", "refilled_groups", "unfilled_groups", "extra_groups")
LEFT_PADDED = {"prompt_ids", "prompt_mask"}


def zero_std_groups(rewards_per_func: torch.Tensor, weights: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Bool [groups]: the groups whose weighted rewards have zero std (TRL's ``frac_reward_zero_std`` test,
    ``isclose(std, 0)``), or no reward at all: their advantages are all 0."""
    std = nanstd(weighted_rewards(rewards_per_func, weights).view(-1, num_generations), dim=1)
    return torch.isclose(std, torch.zeros_like(std)) | torch.isnan(std)


def _pad(t: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
    extra = width - t.shape[1]
    if extra == 0:
        return t
    return torch.nn.functional.pad(t, (extra, 0) if left else (0, extra), value=value)


def merge_groups(outputs: list[dict], picks: list[tuple[int, int]], num_generations: int, pad_token_id: int) -> dict:
    """One TRL generation output made of groups taken from several: ``picks[k] = (output index, group index)`` is
    the k-th group of the result. Token tensors are re-padded to the widest (prompts on the left, completions and
    their per-token values on the right, with the pad id for ids and 0 elsewhere, which every mask ignores);
    per-row lists (``visual``) follow their rows."""
    G = num_generations
    rows = [(o, g * G + j) for o, g in picks for j in range(G)]
    merged: dict = {}
    for key, first in outputs[0].items():
        if key == "num_items_in_batch":
            continue
        if isinstance(first, list):
            merged[key] = [outputs[o][key][r] for o, r in rows]
            continue
        if not isinstance(first, torch.Tensor) or first.dim() == 0:
            merged[key] = first
            continue
        parts = [outputs[o][key] for o in range(len(outputs))]
        if any(p.shape[0] != len(o.get("completion_ids", p)) for p, o in zip(parts, outputs)):
            raise ValueError(f"dynamic sampling cannot merge {key!r}: not one entry per completion")
        if first.dim() >= 2:
            width = max(p.shape[1] for p in parts)
            value = pad_token_id if key.endswith("_ids") else 0
            parts = [_pad(p, width, value, key in LEFT_PADDED) for p in parts]
        merged[key] = torch.stack([parts[o][r] for o, r in rows])
    mask = merged["completion_mask"] * merged["tool_mask"] if "tool_mask" in merged else merged["completion_mask"]
    merged["num_items_in_batch"] = mask.sum()
    return merged


class DynamicSampler:
    """Refills the zero-std groups of a scored generation batch (see the module doc). ``score(rows)`` is the
    trainer's un-refilled seam: rows -> (TRL output dict, StepRecord)."""

    def __init__(self, trainer, max_rounds: int) -> None:
        if trainer.accelerator.num_processes > 1:
            raise ValueError("dynamic_sampling runs on one process only for now (a group's completions may sit on "
                             "several ranks); drop --dynamic_sampling or run on one process")
        self.trainer = trainer
        self.max_rounds = max_rounds

    @property
    def counts(self) -> dict:
        c = self.trainer.stability.counters.dynamic_sampling
        for k in COUNTERS:
            c.setdefault(k, 0)
        return c

    def _draw(self, n: int, step: int, rnd: int) -> list[int]:
        gen = torch.Generator().manual_seed(int(self.trainer.args.seed) * 1_000_003 + step * 1009 + rnd)
        return torch.randint(len(self.trainer.train_dataset), (n,), generator=gen).tolist()

    def refill(self, output: dict, record, score) -> tuple[dict, object]:
        t = self.trainer
        G = t.num_generations
        zero = zero_std_groups(record.rewards_per_func, t.reward_weights, G).tolist()
        counts = self.counts
        counts["groups"] += len(zero)
        counts["zero_std_groups"] += sum(zero)
        open_slots = [g for g, z in enumerate(zero) if z]
        outputs, records = [output], [record]
        picks = [(0, g) for g in range(len(zero))]
        step = t.state.global_step + 1
        for rnd in range(self.max_rounds):
            if not open_slots:
                break
            rows = [t.train_dataset[i] for i in self._draw(len(open_slots), step, rnd) for _ in range(G)]
            extra_out, extra_rec = score(rows)
            counts["extra_groups"] += len(rows) // G
            outputs.append(extra_out)
            records.append(extra_rec)
            for g, z in enumerate(zero_std_groups(extra_rec.rewards_per_func, t.reward_weights, G).tolist()):
                if not z and open_slots:
                    picks[open_slots.pop(0)] = (len(outputs) - 1, g)
                    counts["refilled_groups"] += 1
        counts["unfilled_groups"] += len(open_slots)
        mode = "train" if t.model.training else "eval"
        t._metrics[mode]["dynamic_sampling/zero_std_share_drawn"].append(sum(zero) / len(zero))
        t._metrics[mode]["dynamic_sampling/zero_std_share_trained"].append(len(open_slots) / len(zero))
        if len(outputs) == 1:
            return output, record
        merged = merge_groups(outputs, picks, G, t._tokenizer.pad_token_id)
        rows = [(o, g * G + j) for o, g in picks for j in range(G)]
        record.rewards_per_func = torch.stack([records[o].rewards_per_func[r] for o, r in rows])
        if record.contexts is not None:
            record.contexts = [records[o].contexts[r] for o, r in rows]
        if any(r.seg_index is not None for r in records):
            record.seg_index = [[] if records[o].seg_index is None else records[o].seg_index[r] for o, r in rows]
        return merged, record

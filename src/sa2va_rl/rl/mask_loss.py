"""The mask loss inside GRPO: Sa2VA's supervised segmentation loss on the ``[SEG]`` states of chosen rollouts.

GRPO's loss reaches only token log-probs; the ``[SEG]`` state, ``text_hidden_fcs`` and SAM2's decoder never see the
reference mask. As the Sa2VA authors' GRPO (bytedance/Sa2VA ``projects/vrt_sa2va``) does, caption2mask rows add a
supervised term: the last-layer hidden state at the rollout's ``[SEG]`` -> ``text_hidden_fcs`` -> SAM2's decoder on
the image's cached features (``models/grounding.py``: ``mask_logits(..., grad=True)``) -> sigmoid CE (weight 2.0)
+ Dice (weight 0.5) against the reference mask, in fp32, at the decoder's resolution.

The hidden states come from the gradient-carrying scoring forward that computes the log-probs (the Policy's
``hidden_hook``): no second LLM forward. One path per step:

1. generation: ``targets`` gives each caption2mask row with a decoded ``[SEG]`` a ``SegTarget`` (where its
   ``[SEG]`` is, the reference mask, the image's SAM2 features from the step's ``ImageCache``);
2. after the rewards: ``choose`` sets each target's weight (which rollouts learn, and how much);
3. the loss: ``MaskLoss.hook`` gathers the chosen rows' ``[SEG]`` states from the scoring forward and adds their
   weighted loss; the trainer adds ``mask_loss_weight`` x that to GRPO's loss, so one backward, one GradGuard check,
   one clip and one skip decision cover both.

Which rollouts (``mask_loss_rollouts``): ``best`` (default, as the authors): the rollout of highest total reward in
each group that has a ``[SEG]``, weight 1 (ties: the first). ``positive``: every rollout with a ``[SEG]``, weighted
by its advantage where positive. ``best`` trains the mask path even when every rollout of a group scored the same
(the plain "Sure, [SEG]." format: std 0, advantage 0 everywhere, so ``positive`` gives it nothing); the supervised
term needs a good ``[SEG]`` state, not a better-than-average one. docs/segmentation.md has the measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sa2va_rl.models.grounding import GroundingImage, mask_logits

ROLLOUTS = ("best", "positive")
CE_WEIGHT, DICE_WEIGHT = 2.0, 0.5  # Sa2VA's (and its GRPO's) loss_mask / loss_dice weights


@dataclass
class SegTarget:
    """One caption2mask rollout's mask-loss target."""

    position: int  # completion index of the [SEG] whose state is decoded (the one its reward's mask came from)
    gt_mask: np.ndarray  # bool [H, W], the row's reference mask
    image: GroundingImage  # the image's grounding features, encoded once this step (no grad: SAM2's encoder is frozen)
    weight: float = 0.0  # this rollout's share of the generation batch's mask loss; 0: not chosen


def targets(seg_index: list[list[int]] | None, gt_masks: list, images: list) -> list[SegTarget | None]:
    """Per row: a SegTarget where the row has a reference mask and a decoded ``[SEG]`` (its first decoded one,
    ``seg_index[i][0]``), else None. ``images[i]``: the row's GroundingImage (or None)."""
    if seg_index is None:
        return [None] * len(gt_masks)
    return [SegTarget(idx[0], gt, img) if gt is not None and idx and img is not None else None
            for idx, gt, img in zip(seg_index, gt_masks, images, strict=True)]


def choose(local: list[SegTarget | None], total_reward: torch.Tensor, advantages: torch.Tensor, rank: int, G: int,
           mode: str) -> int:
    """Set the weights of this process's targets (``local``, rows ``rank * n .. rank * n + n`` of the whole batch).

    ``total_reward`` [N] (all processes, the weighted sum of the reward functions) picks ``best``; ``advantages`` [n]
    (this process's rows) weigh ``positive``. Weights are normalised so that this process's chosen weights sum to 1
    (a weighted mean over the generation batch). Returns how many rows were chosen. One host read of [N] values."""
    n = len(local)
    has = [t is not None for t in local]
    if mode == "best":
        # a group may span processes: rank every row of the batch, then keep this process's
        totals = total_reward.detach().float().nan_to_num(nan=-float("inf")).tolist()
        start = rank * n
        raw = [0.0] * n
        for g0 in range(0, len(totals), G):
            members = [k for k in range(g0, g0 + G) if start <= k < start + n and has[k - start]]
            if members:  # best among this process's rows with a [SEG] in the group
                k = max(members, key=lambda m: (totals[m], -m))
                raw[k - start] = 1.0
    elif mode == "positive":
        adv = advantages.detach().float().clamp(min=0).nan_to_num(0.0).tolist()
        raw = [a if h else 0.0 for a, h in zip(adv, has, strict=True)]
    else:
        raise ValueError(f"mask_loss_rollouts={mode!r}: use one of {', '.join(ROLLOUTS)}")
    total = sum(raw)
    chosen = 0
    for t, w in zip(local, raw, strict=True):
        if t is not None:
            t.weight = w / total if total > 0 else 0.0
            chosen += t.weight > 0
    return chosen


def resize_target(gt: np.ndarray, size: tuple[int, int], device) -> torch.Tensor:
    """bool [H, W] -> fp32 [h, w] in [0, 1]: the share of each decoder cell the mask covers (area resampling)."""
    t = torch.from_numpy(np.ascontiguousarray(gt)).to(device=device, dtype=torch.float32)[None, None]
    return F.interpolate(t, size=size, mode="area")[0, 0]


def ce_dice(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sa2VA's mask losses, fp32, per mask: logits, target [n, h, w] -> (sigmoid cross-entropy averaged over pixels
    [n], naive Dice loss ``1 - (2 sum(p t) + eps) / (sum p + sum t + eps)`` with p = sigmoid(logits) [n])."""
    logits, target = logits.float(), target.float()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)
    p = logits.sigmoid().flatten(1)
    t = target.flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)
    return ce, dice


class MaskLoss:
    """One loss sub-batch's mask loss, fed by the scoring forward's hidden states (``hook``)."""

    def __init__(self, model, seg_targets: list[SegTarget | None], prompt_mask: torch.Tensor,
                 ce_weight: float = CE_WEIGHT, dice_weight: float = DICE_WEIGHT) -> None:
        self.model, self.targets, self.prompt_mask = model, seg_targets, prompt_mask
        self.ce_weight, self.dice_weight = ce_weight, dice_weight
        self.loss: torch.Tensor | None = None  # sum of weight x (ce_weight ce + dice_weight dice), with grad
        self.ce = self.dice = self.weight = None  # detached weighted sums, for the logs

    def rows(self, start: int, end: int) -> list[int]:
        return [k for k in range(start, end) if self.targets[k] is not None and self.targets[k].weight > 0]

    def hook(self, start: int, end: int):
        """The Policy's ``hidden_hook`` for rows ``start:end``: ``(hidden [b, keep, C], keep, L)`` of the
        right-aligned scoring layout ([prompt, completion, pad] per row; models/policy.py)."""
        rows = self.rows(start, end)
        if not rows:
            return None

        def hook(hidden: torch.Tensor, keep: int, L: int) -> None:
            device = hidden.device
            P = self.prompt_mask.shape[1]
            local = torch.tensor([k - start for k in rows], device=device)
            pad_left = (self.prompt_mask[rows] == 0).sum(1).to(device)  # [n]
            position = torch.tensor([self.targets[k].position for k in rows], device=device)
            # completion token j of a row sits at P - pad_left + j; the tail holds positions [L - keep, L)
            states = hidden[local, P - pad_left + position - (L - keep)]  # [n, C]
            for n, k in enumerate(rows):
                t = self.targets[k]
                logits = mask_logits(self.model, states[n:n + 1], t.image, grad=True).float()  # [1, h', w']
                ce, dice = ce_dice(logits, resize_target(t.gt_mask, tuple(logits.shape[-2:]), device)[None])
                self._add(t.weight, ce[0], dice[0])

        return hook

    def _add(self, weight: float, ce: torch.Tensor, dice: torch.Tensor) -> None:
        term = weight * (self.ce_weight * ce + self.dice_weight * dice)
        self.loss = term if self.loss is None else self.loss + term
        w = torch.tensor(weight, device=ce.device)
        ce, dice = weight * ce.detach(), weight * dice.detach()
        if self.ce is None:
            self.ce, self.dice, self.weight = ce, dice, w
        else:
            self.ce, self.dice, self.weight = self.ce + ce, self.dice + dice, self.weight + w


def refuse_unsupported(policy, distributed_type, zero3: bool) -> None:
    """At start: the mask loss needs a segmenting Policy whose scoring exposes its hidden states, and
    ``text_hidden_fcs`` / SAM2's decoder called outside the wrapped model's forward, which FSDP and ZeRO-3 shard."""
    import inspect

    from accelerate.utils import DistributedType

    if not hasattr(policy, "segment_at") or "hidden_hook" not in inspect.signature(policy.logprobs).parameters:
        raise ValueError(f"mask_loss_weight > 0 needs a Sa2VA model (a Policy that segments); {type(policy).__name__} "
                         "does not. Set --mask_loss_weight 0.")
    if distributed_type == DistributedType.FSDP or zero3:
        raise ValueError("mask_loss_weight > 0 is not supported under FSDP or DeepSpeed ZeRO-3 yet (text_hidden_fcs "
                         "and SAM2's decoder run outside the sharded forward); use DDP or ZeRO-1/2, or set "
                         "--mask_loss_weight 0. docs/segmentation.md")

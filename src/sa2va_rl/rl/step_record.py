"""StepRecord: what the trainer's seams share about the rows in flight, from generation to the loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sa2va_rl.models.grounding import ImageCache
from sa2va_rl.rl.mask_loss import MaskLoss


@dataclass
class StepRecord:
    """What TRL's seams share about the rows in flight. The trainer holds one (``trainer.record``); an empty
    record (all None) means nothing is in flight. A finished generation's record stays readable as
    ``trainer.last_generation`` (no seam reads it).

    TRL generates once per generation batch and computes the loss on several shuffled sub-batches of it, so a
    record has one of two lifetimes; each is installed and cleared by ``Sa2VAGRPOTrainer._in_flight``.

    Generation (``StepRecord.generation``), one per generation batch, while ``_generate_and_score_completions``
    runs. One prompt's path:

    1. ``contexts[i]``: its row's ``visual`` (the Policy context), from TRL's rows;
    2. ``_generate_single_turn`` sets ``prompt_ids`` and ``drop`` (its completion's repaired or empty tokens);
    3. ``_generate`` turns ``drop`` into TRL's ``tool_mask`` (0 = the loss ignores it) and ``drop_mask``;
    4. the pi_old/pi_ref scoring reads ``drop_mask`` and ``contexts``;
    5. ``_calculate_rewards`` reads ``prompt_ids`` and ``contexts`` (the ``pred_mask``/``pred_masks`` of segmenting
       policies), sets ``seg_index`` (the completion positions whose ``[SEG]`` masks were decoded), ``images`` (the
       grounding features, encoded once per image) and ``rewards_per_func``, from which the advantages are
       recomputed;
    6. the prompt leaves in TRL's output dict: drop flags as ``tool_mask``, context as ``visual``, and with the mask
       loss on its ``seg_target`` (rl/mask_loss.py: the ``[SEG]`` position, the reference mask, the image's
       features, the weight set after the rewards); TRL's shuffle and split keep them aligned with the completion.

    Loss (``StepRecord.loss``), one per sub-batch, while ``_compute_loss`` runs: the same prompt's ``drop_mask``
    comes back from ``tool_mask``, its context from ``visual``, its ``seg_targets`` from ``seg_target``, and ``refs``
    holds its pi_old/pi_ref log-probs (fp32), against which the scoring seam bounds the log-ratios. ``refs`` is None
    outside the loss: no clamp. The gradient-carrying scoring forward feeds ``mask_loss``, which ``_compute_loss``
    adds to GRPO's loss.
    """

    contexts: list | None = None  # per row: the Policy context (the dataset's `visual` column); None: text only
    drop_mask: torch.Tensor | None = None  # [B, K] completion tokens the scoring neutralises
    # generation only
    prompt_ids: list[list[int]] | None = None  # the prompts as generated from
    tasks: list | None = None  # per row: the dataset's `task` column (Sa2VA: mask2caption / caption2mask); None: none
    drop: list[list[bool]] | None = None  # per completion token: repaired by the LogitsGuard, or empty filler
    # per _generate_single_turn call of this generation batch, its ``drop`` (TRL's tool loop calls it once per turn)
    drop_turns: list[list[list[bool]]] | None = None
    rewards_per_func: torch.Tensor | None = None  # [B, reward funcs], all processes
    images: ImageCache | None = None  # the grounding encoder's features of this batch's images (segmenting policies)
    # per row (this process): completion positions of the [SEG]s whose masks the rewards read (think rows: the
    # answer's; plain rows: the first); [] where none was decoded; None when nothing was segmented
    seg_index: list[list[int]] | None = None
    # loss only
    refs: dict[str, torch.Tensor] | None = None  # old/ref per-token logps, fp32
    seg_targets: list | None = None  # per row: its mask-loss target (rl/mask_loss.py SegTarget) or None
    mask_loss: MaskLoss | None = None  # the sub-batch's mask loss, fed by the scoring forward

    @classmethod
    def generation(cls, inputs: list[dict]) -> StepRecord:
        contexts, tasks = [x.get("visual") for x in inputs], [x.get("task") for x in inputs]
        return cls(contexts=contexts if any(c is not None for c in contexts) else None,
                   tasks=tasks if any(t is not None for t in tasks) else None)

    @classmethod
    def loss(cls, inputs: dict) -> StepRecord:
        return cls(drop_mask=(inputs["tool_mask"] == 0) if "tool_mask" in inputs else None,
                   contexts=inputs.get("visual"), seg_targets=inputs.get("seg_target"),
                   refs={k: inputs[k].float() for k in ("old_per_token_logps", "ref_per_token_logps")
                         if inputs.get(k) is not None})


def drop_tensor(drop: list[list[bool]], device: torch.device) -> torch.Tensor:
    """Per-token drop flags, right-padded with False, as a [B, K] bool tensor on ``device``."""
    width = max((len(r) for r in drop), default=0)
    mask = torch.zeros(len(drop), width, dtype=torch.bool)
    for i, row in enumerate(drop):
        mask[i, : len(row)] = torch.tensor(row, dtype=torch.bool)
    return mask.to(device)


def merge_turn_drops(turns: list[list[list[bool]]], tool_mask: list[list[int]] | None) -> list[list[bool]]:
    """Per completion token of the final completions: sampled from a repaired row (or empty filler) in any turn.

    ``turns[k]`` is the drop flags of the k-th ``_generate_single_turn`` call of one generation batch; ``tool_mask``
    is TRL's (None: one turn, no tools): per row, the first turn's tokens (1), then for each tool call the tool result
    (0) and the tokens generated after it (1, possibly truncated, possibly none when truncated to nothing: then the
    row's last). TRL's tool loop (``_tool_call_loop``) runs call k on the rows, in row order, that have at least k
    tool results, so row r's position in call k is the number of earlier rows with at least k tool results. Tool
    result tokens are never flagged (TRL's mask already keeps them out of the loss)."""
    if tool_mask is None:
        return [list(r) for r in turns[0]]
    runs = []  # per row: [(value, length)] of its mask
    for mask in tool_mask:
        row = []
        for v in mask:
            if row and row[-1][0] == v:
                row[-1][1] += 1
            else:
                row.append([v, 1])
        runs.append(row)
    tools = [sum(1 for v, _ in row if v == 0) for row in runs]
    if len(turns) <= max(tools, default=0):
        raise ValueError(f"tool mask with {max(tools)} tool result(s) in a row but {len(turns)} generation turn(s)")
    merged = []
    for r, row in enumerate(runs):
        flags, turn = [], 0
        for v, n in row:
            if v == 0:
                flags += [False] * n
                turn += 1
                continue
            pos = r if turn == 0 else sum(1 for q in range(r) if tools[q] >= turn)
            own = list(turns[turn][pos][:n])
            flags += own + [False] * (n - len(own))
        merged.append(flags)
    return merged

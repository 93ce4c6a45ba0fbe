"""Checkpoints on disk: atomic writes (staging, fsync, rename), rotation, the last good one, and rollback to it.

A checkpoint is written under ``output_dir/.staging/checkpoint-N``, fsynced, then renamed into place, so a crash
leaves either no ``checkpoint-N`` or a complete one; a staging directory left by a crash is removed when the next
run starts. A checkpoint is *good* when its stability state says its weights were finite.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import GRPOTrainer

from sa2va_rl.rl.stability import STATE_FILE, NonFiniteTrainingError

logger = logging.getLogger(__name__)

STAGING = ".staging"  # under output_dir: checkpoints being written


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """Every file under ``path``, then every directory, on disk."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def remove_stale_staging(output_dir: str) -> None:
    """A checkpoint whose writing was interrupted is never complete and never used: remove it."""
    stale = os.path.join(output_dir, STAGING)
    if os.path.isdir(stale):
        logger.warning("removing %s: a checkpoint left half-written by an interrupted run", stale)
        shutil.rmtree(stale)


# ------------------------------------------------------------------------------------------------ trained weights
TRAINABLE_FILE = "trainable.safetensors"  # a checkpoint's trained parameters and buffers, without the frozen ones


def frozen_parameter_names(model) -> set[str]:
    """Every name under which a frozen parameter appears in ``model.state_dict()`` (tied names included)."""
    return {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def save_trainable(model, output_dir: str, base_fingerprint: str | None = None) -> int:
    """Write ``model``'s state without its frozen parameters to ``output_dir/trainable.safetensors``.

    The frozen parameters (a Sa2VA's vision tower, SAM2, the LLM under LoRA: most of the model) never change in a
    run and are the ones ``--model_path`` holds, so a checkpoint needs only what trains (and the buffers): at
    Sa2VA-8B's size that is ~1 GB instead of 16 GB a checkpoint. ``base_fingerprint`` (the run's
    ``weights_fingerprint``, rl/resume_checks.py) is stored so that a resume onto another base model is refused.
    Returns the bytes written."""
    import safetensors.torch

    frozen = frozen_parameter_names(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in frozen}
    meta = {"format": "pt", "frozen_parameters": str(len(frozen))}
    if base_fingerprint:
        meta["base_model_fingerprint"] = base_fingerprint
    # tensors that share storage (tied, trained) are written once each by name: clone so safetensors accepts them
    seen: dict[tuple[int, int], str] = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        if key in seen:
            state[k] = v.clone()
        seen.setdefault(key, k)
    os.makedirs(output_dir, exist_ok=True)
    safetensors.torch.save_file(state, os.path.join(output_dir, TRAINABLE_FILE), metadata=meta)
    return sum(v.numel() * v.element_size() for v in state.values())


class CheckpointMismatch(ValueError):
    """A trained-parameters checkpoint that does not fit the model it is loaded into."""


def load_trainable(model, checkpoint: str, base_fingerprint: str | None = None) -> None:
    """Load ``checkpoint/trainable.safetensors`` into ``model``, whose frozen parameters come from the base model.

    Refused, naming the tensors, unless the file fits (models/layout.py ``trained_only_mismatch``: exactly what
    ``model`` trains and its buffers, at the same shapes, and, where both are known, from the same base model)."""
    import safetensors.torch

    from sa2va_rl.models.layout import trained_only_mismatch

    path = os.path.join(checkpoint, TRAINABLE_FILE)
    why = trained_only_mismatch(path, model, base_fingerprint)
    if why:
        raise CheckpointMismatch(f"{path} does not fit this model: {why}. Resume with the run's own --model_path and "
                                 "setup (--lora_r, --lora_target_modules, --train_vision, --mask_loss_weight, "
                                 "--train_mask_decoder) or start a new --output_dir")
    # every key checked above; the frozen ones stay the base's
    model.load_state_dict(safetensors.torch.load_file(path, device="cpu"), strict=False)


def checkpoint_name(step: int) -> str:
    return f"{PREFIX_CHECKPOINT_DIR}-{step}"


def publish(run_dir: str, name: str, save_total_limit: int | None, best_model_checkpoint: str | None) -> str:
    """Move ``run_dir/.staging/name`` into place as ``run_dir/name``: fsync it, replace any checkpoint of that name,
    fsync ``run_dir``, remove the staging directory, rotate old checkpoints. Returns the checkpoint's path."""
    staging = os.path.join(run_dir, STAGING)
    staged, final = os.path.join(staging, name), os.path.join(run_dir, name)
    fsync_tree(staged)
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(staged, final)
    fsync_dir(run_dir)
    shutil.rmtree(staging, ignore_errors=True)
    rotate_checkpoints(output_dir=run_dir, save_total_limit=save_total_limit,
                       best_model_checkpoint=best_model_checkpoint, use_mtime=False)
    return final


def checkpoint_state(checkpoint: str) -> dict | None:
    """The stability state a checkpoint was saved with (``weights_finite``, ``world_size``, ...), or None when it
    has none or it cannot be read."""
    try:
        with open(os.path.join(checkpoint, STATE_FILE)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def last_good_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint in ``output_dir`` whose stability state says its weights were finite."""
    if not os.path.isdir(output_dir):
        return None
    steps = sorted((int(n.split("-")[-1]) for n in os.listdir(output_dir)
                    if re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-\d+", n)), reverse=True)
    for s in steps:
        path = os.path.join(output_dir, checkpoint_name(s))
        if (checkpoint_state(path) or {}).get("weights_finite", False):
            return path
    return None


class Rollback:
    """Non-finite values (or spikes) that persist: back to the last good checkpoint when configured and possible,
    skipping the dataset rows consumed since it (``rollback_skip_data``, rl/spikes.py), else a halt that says what
    to try. Owns the learning-rate factor that the rollbacks have applied so far."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.lr_factor = 1.0  # product of rollback_lr_factor over rollbacks

    def on_persistent_nonfinite(self, step: int, what: str) -> None:
        """K non-finite gradient steps in a row, or non-finite weights: roll back, or halt."""
        self.on_persistent(step, what, self.trainer.args.on_persistent_nonfinite)

    def on_persistent(self, step: int, what: str, action: str) -> None:
        """A persistent fault (non-finite steps, or spikes): ``action`` 'rollback' rolls back when configured and
        possible, else (and for 'halt') halts; 'continue' does nothing."""
        if action == "continue":
            return
        t = self.trainer
        args, c = t.args, t.stability.counters
        prefix = ""
        if action == "rollback" and args.skip_nonfinite_steps:
            checkpoint = last_good_checkpoint(args.output_dir)
            if checkpoint is not None and c.rollbacks < args.max_rollbacks:
                self.restore(checkpoint, step)
                return
            why = (f"{c.rollbacks} rollback(s) done (max_rollbacks={args.max_rollbacks})"
                   if checkpoint is not None else "there is no good checkpoint to roll back to (set --save_steps)")
            prefix = f"Rollback is not possible: {why}. "
        self.halt(what, prefix)

    def restore(self, checkpoint: str, step: int) -> None:
        """Model, optimizer, scheduler and RNG from ``checkpoint`` (under DeepSpeed, the engine loads its own sharded
        checkpoint, as transformers does on resume); the step counter goes on (the steps since the
        checkpoint are discarded, and counted); the stability counters are this run's, not the checkpoint's."""
        t = self.trainer
        # DeepSpeed: the engine's own checkpoint (weights and the partitioned optimizer state)
        if getattr(t, "is_deepspeed_enabled", False):
            from transformers.integrations.deepspeed import deepspeed_load_checkpoint
            from transformers.trainer import _is_peft_model

            deepspeed_load_checkpoint(t.model_wrapped, checkpoint, load_module_strict=not _is_peft_model(t.model))
        else:
            t._load_from_checkpoint(checkpoint)
        GRPOTrainer._load_optimizer_and_scheduler(t, checkpoint)  # not the trainer's: keep this run's counters
        t._load_rng_state(checkpoint)
        f = t.args.rollback_lr_factor
        if f != 1.0:
            self.lr_factor *= f
            for group in t.optimizer.param_groups:
                group["lr"] *= f
            if hasattr(t.lr_scheduler, "base_lrs"):
                t.lr_scheduler.base_lrs = [lr * f for lr in t.lr_scheduler.base_lrs]
        t.grad_guard.stats.consecutive_nonfinite = 0
        c = t.stability.counters
        c.rollbacks += 1
        event = {"step": step, "kind": "rollback", "checkpoint": os.path.basename(checkpoint),
                 "lr_factor": self.lr_factor}
        skip = getattr(t, "data_skip", None)
        if skip is not None and t.args.rollback_skip_data:  # PaLM: skip the batches consumed since the checkpoint
            rows = skip.skip_since(step, int(os.path.basename(checkpoint).split("-")[-1]), checkpoint,
                                   t.args.output_dir if t.args.should_save else None)
            c.skipped_rows = len(skip.rows)
            event["skipped_rows"] = rows
        spikes = getattr(t, "spike_guard", None)
        if spikes is not None:
            spikes.reset_persistence()
        t.stability.record_event(event)
        logger.warning("step %d: faults persisted; rolled back to %s (rollback %d of at most %d, learning "
                       "rate x%g)", step, checkpoint, c.rollbacks, t.args.max_rollbacks, self.lr_factor)

    def halt(self, what: str, prefix: str = "", advice: bool = True) -> None:
        """Write stability.json and stop the run with what happened and what to try (``advice=False``: ``what``
        already says it)."""
        t = self.trainer
        t.stability.write_report(t.args.output_dir, t.model)
        if not advice:
            raise NonFiniteTrainingError(f"{what}; details in {os.path.join(t.args.output_dir, 'stability.json')}.")
        good = last_good_checkpoint(t.args.output_dir)
        raise NonFiniteTrainingError(
            f"{what}. {prefix}Try a lower --learning_rate, check the data of these steps, "
            + (f"resume from the last good checkpoint ({good}), " if good else "")
            + "or use --on_persistent_nonfinite rollback --save_steps N; "
            f"details in {os.path.join(t.args.output_dir, 'stability.json')}."
        )

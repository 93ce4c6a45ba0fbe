"""Sa2VAGRPOTrainer: TRL's GRPOTrainer with guarded sampling, loss and optimizer steps.

TRL keeps the loss types, KL, reward weighting, logging and checkpointing. The overrides, each a seam:

* ``_generate_single_turn``: generation goes through the Policy with the LogitsGuard; completions are the
  new tokens only; empty completions become one dropped EOS token (zero loss, counted).
* ``_generate``: tokens sampled from repaired rows become TRL's ``tool_mask`` zeros, so the loss's own
  mask (``completion_mask * tool_mask``) drops them.
* ``_get_per_token_logps_and_entropies``: the Policy's fp32, right-padded scoring; dropped positions are
  neutralised before log_softmax; during the loss, log-ratios against pi_old and pi_ref are clamped
  (straight-through: values bounded, gradients kept).
* ``_generate_and_score_completions``: advantages recomputed in fp32 with a floored group std.
* ``_clip_grad_norm``: GradGuard before clipping; non-finite steps skipped with the optimizer untouched.
* ``log``, ``training_step``: stability metrics, non-finite losses and metric values counted, not hidden.
* ``_save_checkpoint`` / ``_load_optimizer_and_scheduler``: the stability state travels with checkpoints.
* ``_calculate_rewards``: for policies that segment (Sa2VA), each completion's ``[SEG]`` mask is added to its row
  as ``pred_mask`` before the reward functions run. Every plain reward function is wrapped: NaN/inf become
  "no opinion" (counted); an exception stops the run naming the function and the sample, or, with
  ``reward_errors='skip'``, costs only the samples it raised on (counted).

Rows may carry a ``visual`` column (Sa2VA: tiles and region cells). The trainer hands it to the Policy for
generation and scoring and keeps it aligned with the completions through TRL's shuffle and split.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import os
import re
import shutil

import torch
from accelerate.utils import DistributedType
from trl import GRPOTrainer
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import nanstd

from sa2va_rl.models.policy import CausalLMPolicy, Policy
from sa2va_rl.numerics import GradGuard, LogitsGuard
from sa2va_rl.numerics._ratelimit import PowerOfTwoLimiter
from sa2va_rl.rl.config import Sa2VAGRPOConfig
from sa2va_rl.rl.faults import FaultInjector
from sa2va_rl.rl.stability import STATE_FILE, NonFiniteTrainingError, StabilityCallback, weights_finite

logger = logging.getLogger(__name__)


def group_advantages(rewards_per_func: torch.Tensor, weights: torch.Tensor, num_generations: int,
                     scale: str, std_floor: float) -> torch.Tensor:
    """Advantages in fp32: (r - group mean) / max(std, floor). NaN rewards are 'no opinion' (TRL's None).

    A completion with no reward at all gets advantage 0; a group whose rewards are all equal gets 0s
    (never 0/0); a near-tie cannot blow up past |r - mean| / std_floor.
    """
    rpf = rewards_per_func.float()
    unscorable = torch.isnan(rpf).all(dim=1)
    rewards = (rpf * weights.float().to(rpf.device)).nansum(dim=1)
    rewards = torch.where(unscorable, torch.nan, rewards)
    grouped = rewards.view(-1, num_generations)  # [groups, G]
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    centred = grouped - mean
    if scale == "group":
        std = nanstd(grouped, dim=1).unsqueeze(1)
    elif scale == "batch":
        std = nanstd(rewards).expand(grouped.shape[0], 1)
    else:  # "none"
        std = torch.ones_like(mean)
    adv = centred / torch.nan_to_num(std, nan=0.0).clamp(min=std_floor)
    return torch.nan_to_num(adv.view(-1), nan=0.0)


class RewardError(RuntimeError):
    """A reward function raised (reward_errors='raise'); the message names the function and the sample."""


def _sample_name(kwargs: dict, i: int) -> str:
    for key in ("source", "prompts"):
        vals = kwargs.get(key)
        if isinstance(vals, list) and i < len(vals):
            return f"{key}={str(vals[i])[-120:]!r}"
    return f"index {i}"


def guarded_reward(fn, errors: str, counters_of):
    """``fn`` with TRL's signature, made safe: NaN/inf -> None (counted). If ``fn`` raises on the batch, it is
    re-run one sample at a time to find the samples it raises on; 'raise' stops there with their name, 'skip'
    gives those samples None (counted). ``counters_of()`` returns the live StabilityCounters."""
    limiter = PowerOfTwoLimiter()
    name = getattr(fn, "__name__", type(fn).__name__)

    def one(i: int, completions, kwargs):
        sub = {k: (v[i:i + 1] if isinstance(v, list) and len(v) == len(completions) else v)
               for k, v in kwargs.items()}
        return fn(completions[i:i + 1], **sub)[0]

    @functools.wraps(fn)
    def wrapped(completions, **kwargs):
        try:
            values = list(fn(completions, **kwargs))
        except Exception as batch_error:  # find the samples it raises on
            values = []
            for i in range(len(completions)):
                try:
                    values.append(one(i, completions, kwargs))
                except Exception as e:
                    if errors == "raise":
                        raise RewardError(
                            f"reward function {name!r} raised {type(e).__name__}: {e} on sample "
                            f"{_sample_name(kwargs, i)} with completion {str(completions[i])[:200]!r}. Fix the "
                            "reward or the data, or pass --reward_errors skip to give such samples no opinion."
                        ) from e
                    counters_of().reward_errors += 1
                    if limiter():
                        logger.warning("reward %r raised %s: %s on sample %s; it gets no opinion "
                                       "(%d such samples so far)", name, type(e).__name__, e,
                                       _sample_name(kwargs, i), counters_of().reward_errors)
                    values.append(None)
            if len(values) == len(completions) and all(v is None for v in values):
                logger.debug("reward %r failed on the whole batch: %s", name, batch_error)
        clean = []
        for v in values:
            if v is not None and not math.isfinite(float(v)):
                counters_of().nonfinite_rewards += 1
                v = None
            clean.append(None if v is None else float(v))
        return clean

    return wrapped


STAGING = ".staging"  # under output_dir: checkpoints being written


def _fsync_tree(path: str) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _straight_through_clamp(x: torch.Tensor, lo: torch.Tensor | None, hi: torch.Tensor | None) -> torch.Tensor:
    """Value clamped into [lo, hi], gradient of x unchanged. Bit-identical to x where no bound bites."""
    y = x
    if lo is not None:
        y = torch.maximum(y, lo)
    if hi is not None:
        y = torch.minimum(y, hi)
    return x + (y - x).detach()


class Sa2VAGRPOTrainer(GRPOTrainer):
    def __init__(self, model, reward_funcs, args: Sa2VAGRPOConfig | None = None, policy: Policy | None = None,
                 **kwargs) -> None:
        if args is None:
            args = Sa2VAGRPOConfig(output_dir="outputs/sa2va-rl")
        if not isinstance(args, Sa2VAGRPOConfig):
            raise TypeError(f"Sa2VAGRPOTrainer needs a Sa2VAGRPOConfig, got {type(args).__name__}")
        if args.use_vllm or args.use_transformers_continuous_batching:
            raise ValueError("Sa2VAGRPOTrainer generates through its Policy with the LogitsGuard; "
                             "use_vllm and use_transformers_continuous_batching are not supported")
        self.faults = FaultInjector.from_specs(args.inject)
        self.faults.token_id = getattr(kwargs.get("processing_class"), "convert_tokens_to_ids", None)
        funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
        funcs = [guarded_reward(self.faults.wrap_reward(f, lambda: self.state.global_step + 1) if i == 0 else f,
                                args.reward_errors, lambda: self.stability.counters)
                 if callable(f) and not isinstance(f, (str, torch.nn.Module)) and not inspect.iscoroutinefunction(f)
                 else f for i, f in enumerate(funcs)]
        # TRL's fp32 LM head re-assigns model.lm_head; a Sa2VA model's policy runs its head in fp32 itself, and on
        # upstream's Sa2VAChatModel (lm_head is a read-only property) that assignment would register a second head
        cast_head = args.cast_lm_head_to_fp32
        args.cast_lm_head_to_fp32 = cast_head and policy is None and hasattr(model, "lm_head")
        try:
            super().__init__(model=model, reward_funcs=funcs, args=args, **kwargs)
        finally:
            args.cast_lm_head_to_fp32 = cast_head
        self.policy = policy or CausalLMPolicy(pad_token_id=self._tokenizer.pad_token_id)
        self.logits_guard = (LogitsGuard(eos_token_id=self.generation_config.eos_token_id,
                                         max_abs_logit=args.max_abs_logit) if args.logits_guard else None)
        self.grad_guard = GradGuard()
        self.stability = StabilityCallback(args.stability_summary_steps, self.logits_guard, self.grad_guard)
        self.add_callback(self.stability)
        self._pending_drop: list[list[bool]] | None = None  # per completion token, from the last generation
        self._drop_mask: torch.Tensor | None = None  # [B, K] for the logprob calls in flight
        self._loss_refs: dict | None = None  # old/ref logps while _compute_loss runs
        self._last_rewards_per_func: torch.Tensor | None = None
        self._contexts: list | None = None  # per-row Policy contexts (the dataset's `visual` column) in flight
        self._last_prompt_ids: list[list[int]] | None = None
        self._nonfinite_losses = torch.zeros((), dtype=torch.long, device=self.accelerator.device)
        self._lr_factor = 1.0  # product of rollback_lr_factor over rollbacks

    # ------------------------------------------------------------------ generation
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        with (
            unwrap_model_for_generation(
                self.model_wrapped, self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped_model,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
        ):
            # contexts only when the rows carry them: a text-only Policy need not take the argument
            extra = {} if self._contexts is None else {"contexts": self._contexts}
            step = self.state.global_step + 1
            hooks = self.faults.before_generation(step, unwrapped_model)
            try:
                gen = self.policy.generate(unwrapped_model, prompt_ids, self.generation_config, self.logits_guard,
                                           **extra)
            finally:
                for h in hooks:
                    h.remove()
            repaired_rows = sum(any(r) for r in gen.repaired)
            if repaired_rows and self.stability.counters.first_nonfinite_logits is None:
                self._trace_logits(unwrapped_model, prompt_ids, gen, step, repaired_rows)
        self._last_prompt_ids = prompt_ids
        self.faults.after_generation(step, gen.completion_ids)
        completions, drop = gen.completion_ids, [list(r) for r in gen.repaired]
        if not self.args.drop_repaired_tokens:
            drop = [[False] * len(r) for r in drop]
        eos = self.eos_token_ids[0] if self.eos_token_ids else self._tokenizer.pad_token_id
        empty = 0
        for i, c in enumerate(completions):
            if not c:  # never a 0/0: one EOS that the loss ignores
                completions[i], drop[i] = [eos], [True]
                empty += 1
        if empty:
            logger.warning("%d of %d completions were empty; each contributes zero loss (counted as "
                           "empty_completions)", empty, len(completions))
        self.stability.record_generation(repaired_rows, sum(map(sum, drop)), empty)
        self._pending_drop = drop
        return completions, None

    def _trace_logits(self, model, prompt_ids, gen, step, rows) -> None:
        """First repaired logits of the run: re-run the first affected prompt with nan_trace (failure path only)
        and record which module's output went non-finite; None means the fault did not reproduce (transient)."""
        i = next(k for k, r in enumerate(gen.repaired) if any(r))
        module = None
        trace = getattr(self.policy, "trace", None)
        if trace is not None:
            ctx = None if self._contexts is None else self._contexts[i:i + 1]
            module = trace(model, [prompt_ids[i]], ctx)
        event = {"step": step, "kind": "logits", "rows": rows, "module": module,
                 "reproducible": module is not None}
        self.stability.counters.first_nonfinite_logits = event
        logger.warning("step %d: %d logit row(s) repaired; first non-finite module on re-run: %s", step, rows,
                       module or "none (the fault did not reproduce: transient)")

    def _generate(self, prompts):
        out = list(super()._generate(prompts))
        drop, self._pending_drop = self._pending_drop, None
        # TRL's tool_mask: 1 = model token that the loss sees, 0 = token the loss ignores
        out[2] = [[0 if d else 1 for d in row] for row in drop]
        self._drop_mask = self._lists_to_mask(drop)
        return tuple(out)

    def _lists_to_mask(self, drop: list[list[bool]]) -> torch.Tensor:
        width = max((len(r) for r in drop), default=0)
        mask = torch.zeros(len(drop), width, dtype=torch.bool)
        for i, row in enumerate(drop):
            mask[i, : len(row)] = torch.tensor(row, dtype=torch.bool)
        return mask.to(self.accelerator.device)

    def _generate_and_score_completions(self, inputs):
        contexts = [x.get("visual") for x in inputs]
        self._contexts = contexts if any(c is not None for c in contexts) else None
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._drop_mask, self._last_prompt_ids = None, None
            self._contexts, contexts = None, self._contexts
        if contexts is not None:  # a list: TRL's shuffle and split keep it aligned with the completions
            output["visual"] = contexts
        if self.multi_objective_aggregation == "sum_then_normalize" and self._last_rewards_per_func is not None:
            mode = "train" if self.model.training else "eval"
            g = self.num_generations if mode == "train" else self.num_generations_eval
            adv = group_advantages(self._last_rewards_per_func, self.reward_weights, g, self.scale_rewards,
                                   self.args.advantage_std_floor)
            n = output["advantages"].shape[0]
            rank = self.accelerator.process_index
            output["advantages"] = adv[rank * n:(rank + 1) * n]
        return output

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        if hasattr(self.policy, "segment") and any(x.get("gt_mask") is not None for x in inputs):
            inputs = self._add_pred_masks(inputs, completion_ids_list)
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _add_pred_masks(self, inputs, completion_ids_list):
        """Rows with a reference mask get ``pred_mask``: the mask of their completion's first [SEG], or None."""
        rows = [i for i, x in enumerate(inputs) if x.get("gt_mask") is not None]
        model = self.accelerator.unwrap_model(self.model)
        masks = self.policy.segment(model, [self._last_prompt_ids[i] for i in rows],
                                    [completion_ids_list[i] for i in rows], [self._contexts[i] for i in rows])
        out = [{**x, "pred_mask": None} for x in inputs]
        for i, m in zip(rows, masks, strict=True):
            out[i]["pred_mask"] = m
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["seg/no_seg_frac"].append(sum(m is None for m in masks) / len(masks))
        return out

    # ------------------------------------------------------------------ scoring
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        K = logits_to_keep
        P = input_ids.shape[1] - K
        drop = self._drop_mask
        if drop is not None and drop.shape[1] != K:  # TRL may pad completions further (pad_to_multiple_of)
            drop = torch.nn.functional.pad(drop[:, :K], (0, max(0, K - drop.shape[1])), value=False)
        batch_size = batch_size or input_ids.shape[0]
        logps, ents = [], []
        for s in range(0, input_ids.shape[0], batch_size):
            e = min(s + batch_size, input_ids.shape[0])
            with self.accelerator.autocast():
                lp, ent = self.policy.logprobs(
                    model, input_ids[s:e, :P], attention_mask[s:e, :P], input_ids[s:e, P:],
                    attention_mask[s:e, P:], temperature=self.temperature,
                    drop_mask=None if drop is None else drop[s:e],
                    **({} if self._contexts is None else {"contexts": self._contexts[s:e]}),
                )
            logps.append(lp)
            ents.append(ent)
        logps = torch.cat(logps)
        if self._loss_refs is not None:  # bound the log-ratios that the loss exponentiates
            c = self.args.log_ratio_clamp
            old, ref = self._loss_refs.get("old_per_token_logps"), self._loss_refs.get("ref_per_token_logps")
            lows = [t - c for t in (old, ref) if t is not None]
            lo = torch.stack(lows).amax(dim=0) if lows else None
            logps = _straight_through_clamp(logps, lo=lo, hi=None if old is None else old + c)
        return logps, (torch.cat(ents) if compute_entropy else None), None

    def _compute_loss(self, model, inputs):
        self._drop_mask = (inputs["tool_mask"] == 0) if "tool_mask" in inputs else None
        self._contexts = inputs.get("visual")
        self._loss_refs = {k: inputs[k].float() for k in ("old_per_token_logps", "ref_per_token_logps")
                           if inputs.get(k) is not None}
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._drop_mask, self._loss_refs, self._contexts = None, None, None

    def training_step(self, model, inputs, num_items_in_batch):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._nonfinite_losses += (~torch.isfinite(loss.detach())).sum()  # stays on device: no sync
        return loss

    # ------------------------------------------------------------------ optimizer step
    def _clip_grad_norm(self, model):
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED or self.args.fp16:
            # DeepSpeed owns clipping and the step; fp16's GradScaler already skips inf/NaN steps.
            return super()._clip_grad_norm(model)
        step = self.state.global_step + 1
        self.faults.grads(step, model, self.accelerator.process_index)
        report = self.grad_guard.check(model)
        if report.finite:
            self.stability.record_grads(step, report, skipped=False)
            if math.isfinite(self.args.max_grad_norm):
                self.grad_guard.clip_(self.args.max_grad_norm)
            return torch.tensor(report.norm)
        skip = self.args.skip_nonfinite_steps
        if skip:
            self.grad_guard.skip(self.optimizer)
        self.stability.record_grads(step, report, skipped=skip)
        k = self.grad_guard.stats.consecutive_nonfinite
        if k >= self.args.max_consecutive_skips or not skip:
            self._persistent_nonfinite(step, (
                f"non-finite gradients ({report.kind}) at step {step}, {k} step(s) in a row (max_consecutive_skips="
                f"{self.args.max_consecutive_skips}); first offending parameters: "
                f"{report.nonfinite_params or 'on another rank'}; the weights were not updated by these steps"))
        return torch.tensor(float("nan"))

    def _persistent_nonfinite(self, step: int, what: str) -> None:
        """Non-finite values persist (K non-finite gradient steps in a row, or non-finite weights): roll back to the
        last good checkpoint when configured and possible, else halt."""
        c = self.stability.counters
        prefix = ""
        if self.args.on_persistent_nonfinite == "rollback" and self.args.skip_nonfinite_steps:
            checkpoint = self.last_good_checkpoint()
            if checkpoint is not None and c.rollbacks < self.args.max_rollbacks:
                self._rollback(checkpoint, step)
                return
            why = (f"{c.rollbacks} rollback(s) done (max_rollbacks={self.args.max_rollbacks})"
                   if checkpoint is not None else "there is no good checkpoint to roll back to (set --save_steps)")
            prefix = f"Rollback is not possible: {why}. "
        self._halt(what, prefix)

    def _rollback(self, checkpoint: str, step: int) -> None:
        """Model, optimizer, scheduler and RNG from ``checkpoint``; the step counter goes on (the steps since the
        checkpoint are discarded, and counted); the stability counters are this run's, not the checkpoint's."""
        self._load_from_checkpoint(checkpoint)
        GRPOTrainer._load_optimizer_and_scheduler(self, checkpoint)  # not ours: keep this run's counters
        self._load_rng_state(checkpoint)
        f = self.args.rollback_lr_factor
        if f != 1.0:
            self._lr_factor *= f
            for group in self.optimizer.param_groups:
                group["lr"] *= f
            if hasattr(self.lr_scheduler, "base_lrs"):
                self.lr_scheduler.base_lrs = [lr * f for lr in self.lr_scheduler.base_lrs]
        self.grad_guard.stats.consecutive_nonfinite = 0
        c = self.stability.counters
        c.rollbacks += 1
        self.stability.record_event({"step": step, "kind": "rollback", "checkpoint": os.path.basename(checkpoint),
                                     "lr_factor": self._lr_factor})
        logger.warning("step %d: non-finite steps persisted; rolled back to %s (rollback %d of at most %d, learning "
                       "rate x%g)", step, checkpoint, c.rollbacks, self.args.max_rollbacks, self._lr_factor)

    def last_good_checkpoint(self) -> str | None:
        """The newest checkpoint in output_dir whose stability state says its weights were finite."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        out = self.args.output_dir
        if not os.path.isdir(out):
            return None
        steps = sorted((int(n.split("-")[-1]) for n in os.listdir(out)
                        if re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-\d+", n)), reverse=True)
        for s in steps:
            path = os.path.join(out, f"{PREFIX_CHECKPOINT_DIR}-{s}")
            try:
                with open(os.path.join(path, STATE_FILE)) as f:
                    if json.load(f).get("weights_finite", False):
                        return path
            except (OSError, json.JSONDecodeError):
                continue
        return None

    def _halt(self, what: str, prefix: str = "") -> None:
        self.stability.write_report(self.args.output_dir, self.model)
        good = self.last_good_checkpoint()
        raise NonFiniteTrainingError(
            f"{what}. {prefix}Try a lower --learning_rate, check the data of these steps, "
            + (f"resume from the last good checkpoint ({good}), " if good else "")
            + "or use --on_persistent_nonfinite rollback --save_steps N; "
            f"details in {os.path.join(self.args.output_dir, 'stability.json')}."
        )

    # ------------------------------------------------------------------ logging and checkpoints
    def log(self, logs, start_time=None):
        mode = "train" if self.model.training else "eval"
        # rewards/<f>/mean is NaN by construction when f had no opinion on the whole batch (None everywhere);
        # non-finite reward values themselves are counted by the reward wrapper
        nonfinite = sum(1 for key, vals in self._metrics[mode].items() if not key.startswith("rewards/")
                        for v in vals if isinstance(v, float) and not math.isfinite(v))
        self.stability.counters.nonfinite_metric_values += nonfinite
        self.stability.counters.nonfinite_losses = int(self._nonfinite_losses)  # one sync per log
        if mode == "train":
            logs = {**logs, **self.stability.metrics()}
        super().log(logs, start_time)

    def train(self, *args, **kwargs):
        if self.args.should_save:
            stale = os.path.join(self.args.output_dir, STAGING)
            if os.path.isdir(stale):  # a checkpoint whose writing was interrupted: never complete, never used
                logger.warning("removing %s: a checkpoint left half-written by an interrupted run", stale)
                shutil.rmtree(stale)
        try:
            result = super().train(*args, **kwargs)
        finally:
            agree = self._ranks_agree()
            if self.args.should_save:
                self.stability.counters.nonfinite_losses = int(self._nonfinite_losses)
                self.stability.extras.setdefault("ranks_agree", lambda: agree)
                payload = self.stability.write_report(self.args.output_dir, self.model)
                logger.info("%s; weights finite: %s", self.stability.summary_line(self.state.global_step),
                            payload["final_weights_finite"])
        if not weights_finite(self.model):  # defence in depth: a run never ends "done" with NaN weights
            self._halt(f"training ended at step {self.state.global_step} with non-finite weights")
        return result

    def _ranks_agree(self) -> bool | None:
        """Whether every process holds the same weights (None with one process): per-tensor sums, gathered."""
        if self.accelerator.num_processes == 1:
            return None
        with torch.no_grad():
            sums = torch.stack([p.detach().double().sum() for p in self.model.parameters()])
            every = self.accelerator.gather(sums[None])  # [ranks, tensors]
        return bool((every == every[:1]).all())

    def _save_checkpoint(self, model, trial):
        """Atomic: the checkpoint is written under output_dir/.staging, fsynced, then renamed into place, so a
        crash leaves either no checkpoint-N or a complete one. Weights that are not finite are never saved."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        if not weights_finite(self.model):  # never save them; they are a persistent fault
            self.stability.counters.unsaved_checkpoints += 1
            self._persistent_nonfinite(self.state.global_step, f"the weights are not finite at step "
                                                                f"{self.state.global_step} (checkpoint not saved)")
            return
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        run_dir = self._get_output_dir(trial=trial)
        staging = os.path.join(run_dir, STAGING)
        self._staging_dir = staging
        try:
            super()._save_checkpoint(model, trial)  # into staging/checkpoint-N (see _get_output_dir)
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            self.stability.counters.nonfinite_losses = int(self._nonfinite_losses)
            self.stability.save(os.path.join(staging, name), weights_finite=True)
            _fsync_tree(os.path.join(staging, name))
            final = os.path.join(run_dir, name)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            _fsync_dir(run_dir)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        self.accelerator.wait_for_everyone()

    def _get_output_dir(self, trial):
        staging = getattr(self, "_staging_dir", None)
        return staging if staging is not None else super()._get_output_dir(trial)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.stability.load(checkpoint):
            self._nonfinite_losses.fill_(self.stability.counters.nonfinite_losses)
            logger.info("restored stability state from %s: %s", checkpoint,
                        self.stability.summary_line(self.state.global_step))

"""Sa2VAGRPOTrainer: TRL's GRPOTrainer with guarded sampling, loss and optimizer steps.

TRL keeps the loss types, KL, reward weighting, logging and checkpointing. The overrides, each a seam:

* ``_generate_single_turn``: generation goes through the Policy with the LogitsGuard; completions are the
  new tokens only; empty completions become one dropped EOS token (zero loss, counted). The model comes from
  ``_generation_model`` (TRL's unwrap without its per-step cost); activation checkpointing is paused once per
  generation batch, around ``_generate_and_score_completions``, by ``checkpointing_paused`` (TRL's own toggle adds
  an embedding hook per call that stays).
* ``_generate``: tokens sampled from repaired rows become TRL's ``tool_mask`` zeros, so the loss's own
  mask (``completion_mask * tool_mask``) drops them.
* ``_get_per_token_logps_and_entropies``: the Policy's fp32, right-padded scoring; dropped positions are
  neutralised before log_softmax; during the loss, log-ratios against pi_old and pi_ref are clamped
  (straight-through: values bounded, gradients kept).
* ``_generate_and_score_completions``: advantages recomputed in fp32 with a floored group std; with
  ``dynamic_sampling``, zero-std groups are first refilled from the data (rl/dynamic_sampling.py).
* ``_clip_grad_norm``: GradGuard before clipping; non-finite steps skipped with the optimizer untouched; the spike
  guard's flags (rl/spikes.py) ride in the GradGuard's one sync, and a finite spike is skipped the same way. Under
  DeepSpeed ZeRO the check runs earlier, between the engine's backward and its step (``training_step`` installs
  rl/deepspeed_guard.py's engine wrapper), and ``_clip_grad_norm`` takes its report (no spike guard there).
* ``_generate_and_score_completions`` / ``_generate_single_turn`` / ``training_step`` also feed the data skip (which
  rows each step consumed: rollback past the data) and the collapse monitors (rl/collapse.py), from host values.
* ``log``, ``training_step``: stability metrics, non-finite losses and metric values counted, not hidden.
* ``_save_checkpoint`` / ``_load_optimizer_and_scheduler``: the stability state travels with checkpoints.
* ``_save`` / ``_load_from_checkpoint`` / ``_load_best_model``: where part of the model is frozen (a Sa2VA: vision
  tower, SAM2, the LLM under LoRA), a checkpoint holds only the trained parameters and buffers
  (rl/checkpoints.py ``save_trainable``).
* ``_calculate_rewards``: for policies that segment (Sa2VA), each completion's ``[SEG]`` masks are added to its row
  before the reward functions run: ``pred_masks`` (think rows: the answer's ``[SEG]``s, rl/think.py; plain rows:
  the first ``[SEG]``) and ``pred_mask`` (the first of them, or None), and every row gets ``seg_text`` (its text
  with ``[SEG]`` kept: TRL's decode drops special tokens); with the cycle reward (rl/cycle.py), each mask2caption
  row's caption re-segmented by the listener is added as ``cycle_mask`` (``_add_cycle_masks``). Every plain reward
  function is wrapped: NaN/inf become "no opinion" (counted); an exception stops the run naming the function and
  the sample, or, with ``reward_errors='skip'``, costs only the samples it raised on (counted).

TRL options are honoured as TRL honours them (plain VLMs' images, an MoE router's aux loss, the entropy bonus) or
refused at start by name (rl/config.py ``REFUSED_TRL_OPTIONS``, ``_refuse_unsupported_trl_options``;
docs/trl_parity.md). ``_prepare_inputs`` takes the data skip's ``row_index`` off the rows before TRL sees them.

Rows may carry a ``visual`` column (Sa2VA: tiles and region cells). The trainer hands it to the Policy for
generation and scoring and keeps it aligned with the completions through TRL's shuffle and split.

What the seams share about the rows in flight is one ``StepRecord`` (rl/step_record.py: follow one prompt from
generation to the loss there). Checkpoint I/O and rollback live in rl/checkpoints.py; advantages in
rl/advantages.py; the reward wrapper in rl/reward_guard.py.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os

import torch
from accelerate.utils import DistributedType
from transformers.trainer_callback import ProgressCallback
from trl import GRPOTrainer
from trl.models import unwrap_model_for_generation

from sa2va_rl.models.grounding import ImageCache
from sa2va_rl.models.policy import CausalLMPolicy, Policy
from sa2va_rl.numerics import GradGuard, LogitsGuard
from sa2va_rl.numerics.grads import unwrapped_named_parameters
from sa2va_rl.numerics.precision import fp32_master_weights
from sa2va_rl.rl import checkpoints, cycle, deepspeed_guard, mask_loss, reference, spikes, think
from sa2va_rl.rl.advantages import group_advantages
from sa2va_rl.rl.config import Sa2VAGRPOConfig
from sa2va_rl.rl.dynamic_sampling import DynamicSampler
from sa2va_rl.rl.multimodal import multimodal_rows
from sa2va_rl.rl.progress import ReadableProgress
from sa2va_rl.rl.faults import FaultInjector
from sa2va_rl.rl.reward_guard import RewardError, guarded_reward
from sa2va_rl.rl.stability import NonFiniteTrainingError, StabilityCallback, ranks_agree, weights_finite
from sa2va_rl.rl.step_record import StepRecord, drop_tensor, merge_turn_drops
from sa2va_rl.rl.think import ThinkTags

__all__ = ["RewardError", "Sa2VAGRPOTrainer", "group_advantages", "guarded_reward"]

logger = logging.getLogger(__name__)


def refuse_unguarded_engine(distributed_type, args: Sa2VAGRPOConfig, ds_config: dict | None = None) -> bool:
    """At start, never mid-run: an engine where the GradGuard cannot run is refused unless the user opted in.
    Returns whether the DeepSpeed guard runs (rl/deepspeed_guard.py); False for every other engine.

    DeepSpeed ZeRO-1/2/3 are guarded (the GradGuard runs between the engine's backward and its step). Refused:
    ZeRO stage 0 and optimizer/parameter offload (``deepspeed_guard.unguardable`` says why). fp16 is left to
    DeepSpeed's loss scaler, as fp16 is left to the GradScaler elsewhere."""
    if distributed_type != DistributedType.DEEPSPEED or args.fp16:
        return False
    why = deepspeed_guard.unguardable(ds_config)
    if why is None:
        return True
    if not args.allow_unguarded_deepspeed:
        raise ValueError(
            f"DeepSpeed is not guarded by sa2va-rl in this setup: {why}. Unguarded, DeepSpeed would step the "
            "optimizer inside backward before any check, so a NaN/inf gradient could be applied and nothing would "
            "be skipped, counted or named. Guarded setups: ZeRO-1/2/3 without offload (configs/zero2.yaml, "
            "configs/zero3.yaml), DDP, FSDP2. Or pass --allow_unguarded_deepspeed true to run with DeepSpeed's own "
            "overflow handling only. See docs/distributed.md.")
    logger.warning("DeepSpeed runs UNGUARDED (--allow_unguarded_deepspeed): %s. Only DeepSpeed's own overflow "
                   "handling applies; skipped_steps does not count its skips.", why)
    return False


@contextlib.contextmanager
def checkpointing_paused(model: torch.nn.Module):
    """Activation checkpointing off for a block without backward (generation, no-grad scoring): each module whose
    ``gradient_checkpointing`` flag is on gets False, and its own value back afterwards.

    TRL (1.16) does this with ``gradient_checkpointing_disable()`` / ``gradient_checkpointing_enable()`` twice per
    generation batch (around generate() and around its no-grad scoring). Each pair walks the model four times and
    emits three FutureWarnings, the enable resets a user's ``every_n_layers`` to every layer, and, unless transformers
    itself loaded a PEFT config, the enable registers one more forward hook on the input embeddings that nothing
    removes (transformers 5 removes them only for that case): two more hooks per step, each run on every embedding
    forward, so a run of N steps decodes every token through 2N hooks. Here: one walk, no hook, flags restored
    exactly. TRL's own pair, run inside this block, finds checkpointing off and does nothing."""
    # the flag as the module reads it (its own, else its class's), without nn.Module.__getattr__'s slow miss
    paused = [(m, flag) for m in model.modules()
              if (flag := vars(m).get("gradient_checkpointing", getattr(type(m), "gradient_checkpointing", False)))]
    for m, _ in paused:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m, flag in paused:
            m.gradient_checkpointing = flag


def as_wrapper_forward(model: torch.nn.Module, fn):
    """``fn(module)`` run as DistributedDataParallel's forward when ``model`` is one, else ``fn(model)``.

    A Policy that is not a plain causal LM (Sa2VA) reaches into the model's parts (the vision tower, the LLM, its
    head) instead of calling the model. Under DDP that would bypass DDP's forward: the wrapper has none of those
    parts, and DDP's forward does the bookkeeping the gradient all-reduce needs (buffers broadcast, the reducer
    readied for this backward). The inner module's ``forward`` is shadowed for this one call, so that DDP's own
    forward runs around the Policy's; whatever ``forward`` the module had (accelerate's autocast wrapper under
    mixed precision is an instance attribute) is put back."""
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return fn(model)
    inner = model.module
    own = inner.__dict__.get("forward")
    inner.forward = lambda: fn(inner)
    try:
        return model()
    finally:
        if own is None:
            del inner.forward
        else:
            inner.forward = own


class Sa2VAGRPOTrainer(GRPOTrainer):
    def __init__(self, model, reward_funcs=None, args: Sa2VAGRPOConfig | None = None, policy: Policy | None = None,
                 **kwargs) -> None:
        if args is None:
            args = Sa2VAGRPOConfig(output_dir="outputs/sa2va-rl")
        if not isinstance(args, Sa2VAGRPOConfig):
            raise TypeError(f"Sa2VAGRPOTrainer needs a Sa2VAGRPOConfig, got {type(args).__name__}")
        if args.use_vllm or args.use_transformers_continuous_batching:
            raise ValueError("Sa2VAGRPOTrainer generates through its Policy with the LogitsGuard; "
                             "use_vllm and use_transformers_continuous_batching are not supported")
        for option in ("tools", "environment_factory"):
            if kwargs.get(option) and hasattr(policy, "segment_at"):  # before TRL renders tool prompts
                raise ValueError(
                    f"{option}: not supported with {type(policy).__name__}: TRL's tool loop generates the turns after "
                    "a tool call from token ids (prompt + completion + tool result), and a Sa2VA row's image and "
                    "region reach the model as its context (spliced into the embeddings), which those turns would "
                    "not carry; train tools with a causal LM or a plain VLM (docs/trl_parity.md)")
        self.faults = FaultInjector.from_specs(args.inject)
        self.faults.token_id = getattr(kwargs.get("processing_class"), "convert_tokens_to_ids", None)
        # None: as in TRL, no reward function of the user's (an environment's get_reward may own the reward)
        funcs = [] if reward_funcs is None else reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
        self._cycle = cycle.needs_cycle_masks(funcs)  # a reward reads cycle_mask: _add_cycle_masks adds it
        funcs = [guarded_reward(self.faults.wrap_reward(f, lambda: self.state.global_step + 1) if i == 0 else f,
                                args.reward_errors, lambda: self.stability.counters)
                 if callable(f) and not isinstance(f, (str, torch.nn.Module)) and not inspect.iscoroutinefunction(f)
                 else f for i, f in enumerate(funcs)]
        # TRL's fp32 LM head re-assigns model.lm_head; a Sa2VA model's policy runs its head in fp32 itself, and on
        # upstream's Sa2VAChatModel (lm_head is a read-only property) that assignment would register a second head
        cast_head = args.cast_lm_head_to_fp32
        args.cast_lm_head_to_fp32 = cast_head and policy is None and hasattr(model, "lm_head")
        # the KL reference is built below (rl/reference.py), not by TRL: TRL would re-load it from the model's path
        beta, sync_ref = args.beta, args.sync_ref_model
        args.beta, args.sync_ref_model = 0.0, False
        try:
            super().__init__(model=model, reward_funcs=funcs, args=args, **kwargs)
        finally:
            args.cast_lm_head_to_fp32 = cast_head
            args.beta, args.sync_ref_model = beta, sync_ref
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        self._deepspeed_guard = refuse_unguarded_engine(self.accelerator.distributed_type, args,
                                                        getattr(plugin, "deepspeed_config", None))
        if self.accelerator.distributed_type != DistributedType.DEEPSPEED:
            # fp32 master weights (numerics/precision.py); DeepSpeed's bf16 optimizer keeps its own fp32 copies, and
            # ZeRO-3 needs one dtype across its persistent parameters
            fp32_master_weights(self.model)
        self.beta = beta
        if beta != 0.0:  # after the fp32 cast: pi_ref = pi at step 0, bit for bit
            self.ref_model = reference.build_reference(self, sync_ref)
        self.policy = policy or CausalLMPolicy(pad_token_id=self._tokenizer.pad_token_id)
        if self._cycle and not hasattr(self.policy, "segment_at"):
            raise ValueError(f"--cycle_reward re-segments captions: it needs a Sa2VA policy, not "
                             f"{type(self.policy).__name__}; drop --cycle_reward for a causal LM")
        # entropies only when TRL asks for them, where the Policy can skip them (a third-party one may not take it)
        self._policy_entropy_flag = "compute_entropy" in inspect.signature(self.policy.logprobs).parameters
        self._refuse_unsupported_trl_options()
        self.logits_guard = (LogitsGuard(eos_token_id=self.generation_config.eos_token_id,
                                         max_abs_logit=args.max_abs_logit) if args.logits_guard else None)
        self.grad_guard = GradGuard()
        self.stability = StabilityCallback(args.stability_summary_steps, self.logits_guard, self.grad_guard)
        self.add_callback(self.stability)
        for func in self.reward_funcs:  # which METEOR the caption reward used (rl/rewards.py make_caption_meteor)
            if callable(getattr(func, "meteor_scorer", None)):
                self.stability.extras["caption_meteor"] = (lambda f: lambda: f.meteor_scorer().report())(func)
        if any(isinstance(cb, ProgressCallback) for cb in self.callback_handler.callbacks):
            self.remove_callback(ProgressCallback)  # the raw metric dicts -> one readable line (rl/progress.py)
            self.add_callback(ReadableProgress)
        self.rollback = checkpoints.Rollback(self)
        self.spike_guard, self.data_skip, self.collapse = spikes.install(self)  # rl/spikes.py, rl/collapse.py
        self.dynamic_sampler = DynamicSampler(self, args.dynamic_sampling_max_rounds) if args.dynamic_sampling else None
        self.record = StepRecord()  # the rows in flight: what each seam reads and writes (see StepRecord)
        self.last_generation: StepRecord | None = None  # the last finished generation's record; no seam reads it
        self._think_tags: ThinkTags | None = None  # think rows' tags on the policy's tokenizer (rl/think.py)
        self._nonfinite_losses = torch.zeros((), dtype=torch.long, device=self.accelerator.device)
        self._mask_stats = torch.zeros(3, dtype=torch.float64, device=self.accelerator.device)  # ce, dice, weight
        if not isinstance(self.policy, CausalLMPolicy) and (self._dist.is_fsdp or self._dist.is_zero3):
            raise ValueError(
                f"{type(self.policy).__name__} under {'FSDP' if self._dist.is_fsdp else 'DeepSpeed ZeRO-3'} is not "
                "supported yet: a Sa2VA Policy runs the vision tower, the LLM and SAM2 piece by piece, outside the "
                "sharded forward that gathers their parameters, and its final save needs the whole weights. Use DDP "
                "(configs/ddp.yaml) or DeepSpeed ZeRO-1/2 (configs/zero2.yaml): with LoRA (the default) each GPU "
                "holds the frozen model once. docs/distributed.md")
        if args.mask_loss_weight > 0:
            mask_loss.refuse_unsupported(self.policy, self.accelerator.distributed_type, self._dist.is_zero3)
        self._unwrapped_for_generation = (None, None)  # (model_wrapped, its unwrapped model): see _generation_model

    def _refuse_unsupported_trl_options(self) -> None:
        """TRL options this trainer's Policy cannot honour are refused here, at start, by name (never accepted and
        ignored). The config refuses the ones that need no model (rl/config.py REFUSED_TRL_OPTIONS)."""
        takes = inspect.signature(self.policy.logprobs).parameters
        who = type(self.policy).__name__
        if self.aux_loss_enabled and "compute_aux_loss" not in takes:
            raise ValueError(
                f"router_aux_loss_coef: {type(self.model).__name__} is a Mixture-of-Experts model and TRL adds its "
                f"router's load-balancing loss (coefficient {self.router_aux_loss_coef}), but {who} cannot return it; "
                "pass --router_aux_loss_coef 0 to train without it, or use a Policy whose logprobs() takes "
                "compute_aux_loss (CausalLMPolicy does)")
        if self._entropy_bonus_enabled and "entropy_grad" not in takes:
            raise ValueError(
                f"entropy_coef / use_adaptive_entropy: TRL's entropy bonus needs entropies that carry a gradient, "
                f"which {who}.logprobs() cannot give (no entropy_grad argument); without it the bonus would change "
                "the logged loss and not the weights. Leave entropy_coef at 0 and use_adaptive_entropy off")
        if self.rollout_func is not None:
            raise ValueError(
                "rollout_func: not supported by Sa2VAGRPOTrainer: TRL's generation would call it instead of the "
                "Policy, so completions would be sampled outside the LogitsGuard (repair of NaN/inf logit rows, the "
                "repaired-token drop), as with use_vllm; generate through the Policy (docs/trl_parity.md)")
        if self._is_vlm and "multimodal" not in takes:
            raise ValueError(
                f"processing_class is a {type(self.processing_class).__name__} (a VLM's processor): TRL hands the "
                f"images to the model as pixel_values & co., which {who} cannot take, so the model would see the "
                "image placeholder tokens without their pixels. Use CausalLMPolicy (plain VLMs) or a tokenizer")

    def _prepare_inputs(self, generation_batch):
        """TRL's, on rows without the data skip's ``row_index`` (rl/spikes.py): TRL, a subclass and the reward
        functions see the dataset's columns only. The indices go to ``_score_generation`` beside the rows."""
        rows = generation_batch
        if isinstance(rows, list) and rows and isinstance(rows[0], dict) and spikes.ROW_KEY in rows[0]:
            self._row_index = [x.get(spikes.ROW_KEY) for x in rows]
            rows = [{k: v for k, v in x.items() if k != spikes.ROW_KEY} for x in rows]
        try:
            return super()._prepare_inputs(rows)
        finally:
            self._row_index = None

    @contextlib.contextmanager
    def _in_flight(self, record: StepRecord):
        """The one place a StepRecord is installed and cleared (a generation batch, or one loss sub-batch)."""
        self.record = record
        try:
            yield record
        finally:
            self.record = StepRecord()

    @property
    def _last_rewards_per_func(self) -> torch.Tensor | None:
        """[B, reward funcs] of the last finished generation batch (for inspection)."""
        return None if self.last_generation is None else self.last_generation.rewards_per_func

    # ------------------------------------------------------------------ generation
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        with (
            self._generation_model() as unwrapped_model,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
            self.accelerator.autocast(),  # bf16 compute over fp32 master weights; nothing when bf16 is off
        ):
            # contexts only when the rows carry them: a text-only Policy need not take the argument
            extra = {} if self.record.contexts is None else {"contexts": self.record.contexts}
            if multimodal_fields:  # a VLM's pixels and their layout, as TRL passes them to generate()
                extra["multimodal"] = multimodal_fields
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
        first_turn = not self.record.drop_turns  # TRL's tool loop calls again, with the rows that called a tool
        if first_turn:
            self.record.prompt_ids = prompt_ids
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
        if self.model.training:  # collapse monitors: host lists, no sync
            rows, tasks = self.data_skip.last_rows, self.record.tasks
            self.collapse.observe_completions(
                completions, rows if rows is not None and len(rows) == len(completions) else
                [tuple(p) for p in prompt_ids], self.args.max_completion_length,
                # segmentation answers are one template by design ("Sure, [SEG]."): not a caption collapse
                [t == "caption2mask" for t in tasks] if tasks is not None and len(tasks) == len(completions) else None)
        self.record.drop_turns = (self.record.drop_turns or []) + [drop]
        if first_turn:
            self.record.drop = drop
        return completions, None

    @contextlib.contextmanager
    def _generation_model(self):
        """The unwrapped model that generates: what TRL's ``unwrap_model_for_generation`` yields, without its per-call
        overhead (about 0.8 ms a call on CPU, 2% of a small step). ZeRO-3, whose parameters must be gathered, takes
        TRL's own context. Elsewhere the unwrap (``accelerator.unwrap_model``, which reads package metadata from disk
        on every call) is done once per wrapped model, not per step; activation checkpointing is already paused by
        ``_generate_and_score_completions``, around every generation (``checkpointing_paused``: TRL's disable/enable
        pair leaks a hook per call). TRL's generation-config override is a no-op from transformers 5 on (its own
        check; the package needs 5.x)."""
        if self._dist.is_zero3:
            with unwrap_model_for_generation(
                self.model_wrapped, self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as model:
                yield model
            return
        wrapped, model = self._unwrapped_for_generation
        if wrapped is not self.model_wrapped:  # the first generation, or the Trainer wrapped the model anew
            model = self.accelerator.unwrap_model(self.model_wrapped)
            self._unwrapped_for_generation = (self.model_wrapped, model)
        yield model

    def _trace_logits(self, model, prompt_ids, gen, step, rows) -> None:
        """First repaired logits of the run: re-run the first affected prompt with nan_trace (failure path only)
        and record which module's output went non-finite; None means the fault did not reproduce (transient)."""
        i = next(k for k, r in enumerate(gen.repaired) if any(r))
        module = None
        trace = getattr(self.policy, "trace", None)
        if trace is not None:
            ctx = None if self.record.contexts is None else self.record.contexts[i:i + 1]
            module = trace(model, [prompt_ids[i]], ctx)
        event = {"step": step, "kind": "logits", "rows": rows, "module": module,
                 "reproducible": module is not None}
        self.stability.counters.first_nonfinite_logits = event
        logger.warning("step %d: %d logit row(s) repaired; first non-finite module on re-run: %s", step, rows,
                       module or "none (the fault did not reproduce: transient)")

    def _generate(self, prompts):
        self.record.drop_turns = []
        out = list(super()._generate(prompts))
        # TRL's tool_mask: 1 = model token that the loss sees, 0 = token the loss ignores (with tools: the tool
        # results are 0 already; each turn's repaired tokens join them)
        drop = merge_turn_drops(self.record.drop_turns, out[2])
        out[2] = [[0 if d else 1 for d in row] for row in drop] if out[2] is None else [
            [0 if d else m for m, d in zip(mask, row, strict=True)] for mask, row in zip(out[2], drop, strict=True)]
        self.record.drop = drop
        self.record.drop_mask = drop_tensor(drop, self.accelerator.device)
        return tuple(out)

    def _generate_and_score_completions(self, inputs):
        output, record = self._score_generation(inputs)
        rows = self.data_skip.last_rows
        if self.dynamic_sampler is not None and self.model.training:  # zero-std groups refilled (DAPO)
            refilled, record = self.dynamic_sampler.refill(output, record, self._score_generation)
            if refilled is not output:
                rows = None  # the merged batch's rows are no longer the first draw's, position by position
            output = refilled
        self.last_generation = record
        if self.multi_objective_aggregation == "sum_then_normalize" and record.rewards_per_func is not None:
            mode = "train" if self.model.training else "eval"
            g = self.num_generations if mode == "train" else self.num_generations_eval
            adv = group_advantages(record.rewards_per_func, self.reward_weights, g, self.scale_rewards,
                                   self.args.advantage_std_floor)
            n = output["advantages"].shape[0]
            rank = self.accelerator.process_index
            output["advantages"] = adv[rank * n:(rank + 1) * n]
        if self.model.training:
            output["advantages"] = self.faults.advantages(self.state.global_step + 1, output["advantages"], rows, 1)
            self._choose_mask_rollouts(output, record)
            self.collapse.observe("zero_std_groups", self._last_metric("frac_reward_zero_std"))
        return output

    def _last_metric(self, key: str) -> float | None:
        """The last value TRL logged for ``key`` this step (a host float TRL already read back), or None."""
        vals = self._metrics["train"].get(key)
        return vals[-1] if vals else None

    def _score_generation(self, inputs):
        """TRL's generation and scoring of one generation batch (the first draw, or a dynamic-sampling refill): (its
        output dict, its StepRecord). Its rows are noted as consumed by this step (rollback past the data)."""
        if self.model.training:
            inputs = self.data_skip.take(self.state.global_step + 1, inputs, getattr(self, "_row_index", None))
            self._row_index = None  # the first draw's; a dynamic-sampling refill's rows carry their own
        else:
            inputs = [{k: v for k, v in x.items() if k != spikes.ROW_KEY} for x in inputs]
        # no backward runs in here: checkpointing paused once for the whole batch, so that TRL's own disable/enable
        # around its no-grad scoring finds it off and does nothing (see checkpointing_paused)
        with self._in_flight(StepRecord.generation(inputs)) as record, checkpointing_paused(self.model):
            output = super()._generate_and_score_completions(inputs)
        if record.contexts is not None:  # a list: TRL's shuffle and split keep it aligned with the completions
            output["visual"] = record.contexts
        if self.args.mask_loss_weight > 0 and self.model.training:
            targets = self._seg_targets(inputs, record)
            if targets is not None:
                output["seg_target"] = targets  # a list, aligned like `visual`; weights set after the rewards
        return output, record

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        if hasattr(self.policy, "segment_at"):
            # TRL's completions are decoded without special tokens, [SEG] among them: the format reward reads this
            tags = self._tags()
            inputs = [{**x, "seg_text": tags.text(c)} for x, c in zip(inputs, completion_ids_list, strict=True)]
            if any(x.get("gt_mask") is not None for x in inputs):
                inputs = self._add_pred_masks(inputs, completion_ids_list)
        if self._cycle:
            inputs = self._add_cycle_masks(inputs, completions)
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self.record.rewards_per_func = rewards_per_func
        return rewards_per_func

    def _add_pred_masks(self, inputs, completion_ids_list):
        """Rows with a reference mask get ``pred_masks``, the masks of the [SEG]s their rewards read (think rows: the
        answer's, rl/think.py; other rows: the first), and ``pred_mask``, the first of them or None; every row gets
        both keys (None where not segmented). The positions decoded are recorded as ``record.seg_index`` (the mask
        loss reads them), the image features in ``record.images`` (one encode per distinct image per batch)."""
        record = self.record
        rows = [i for i, x in enumerate(inputs) if x.get("gt_mask") is not None]
        formats = [inputs[i].get("seg_format") for i in rows]
        completions = [completion_ids_list[i] for i in rows]
        index = think.seg_index(completions, formats, self.policy.seg_id, self._tags())
        record.images = record.images if record.images is not None else ImageCache()
        model = self.accelerator.unwrap_model(self.model)
        masks = self.policy.segment_at(model, [record.prompt_ids[i] for i in rows], completions,
                                       [record.contexts[i] for i in rows], index, cache=record.images)
        out = [{**x, "pred_mask": None, "pred_masks": None} for x in inputs]
        seg_index: list[list[int]] = [[] for _ in inputs]
        for i, ms, idx in zip(rows, masks, index, strict=True):
            out[i].update(pred_mask=ms[0] if ms else None, pred_masks=ms)
            seg_index[i] = idx
        record.seg_index = seg_index
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["seg/no_seg_frac"].append(sum(not ms for ms in masks) / len(masks))
        return out

    def _tags(self) -> ThinkTags:
        """The think format's tags and a [SEG]-keeping decode on the policy's tokenizer (rl/think.py), built once."""
        if self._think_tags is None:
            self._think_tags = ThinkTags(self.policy.tokenizer, self.policy.seg_id)
        return self._think_tags

    # ------------------------------------------------------------------ the mask loss (rl/mask_loss.py)
    def _seg_targets(self, inputs, record: StepRecord) -> list | None:
        """Per row of this generation batch: its mask-loss target (a decoded [SEG] and a reference mask), or None."""
        if record.seg_index is None or record.images is None:
            return None
        model = self.accelerator.unwrap_model(self.model)
        images = [record.images.get(model, record.contexts[i].image) if idx else None
                  for i, idx in enumerate(record.seg_index)]
        return mask_loss.targets(record.seg_index, [x.get("gt_mask") for x in inputs], images)

    def _choose_mask_rollouts(self, output: dict, record: StepRecord) -> None:
        """Which rollouts the mask loss trains on, and their weights (``mask_loss_rollouts``), after the rewards."""
        rows = output.get("seg_target")
        if rows is None or record.rewards_per_func is None:
            return
        weights = torch.as_tensor(self.reward_weights).to(record.rewards_per_func)
        total = (record.rewards_per_func * weights).nansum(dim=1)  # [all rows]: what GRPO's advantages rank
        chosen = mask_loss.choose(rows, total, output["advantages"], self.accelerator.process_index,
                                  self.num_generations, self.args.mask_loss_rollouts)
        self._metrics["train"]["mask_loss/rollouts"].append(float(chosen))

    def _add_cycle_masks(self, inputs, completions):
        """Rows with a region mask (mask2caption) get ``cycle_mask``: the listener's mask for their caption
        (rl/cycle.py: the policy with its adapters disabled, no grad, one batched forward, SAM2 once per distinct
        image this step); the others get None."""
        rows = [i for i, x in enumerate(inputs) if x.get("region_mask") is not None]
        out = [{**x, "cycle_mask": None} for x in inputs]
        if not rows:
            return out
        if self.record.images is None:
            self.record.images = ImageCache()
        model = self.accelerator.unwrap_model(self.model)
        with cycle.listener(model) as listener:
            found = cycle.cycle_masks(self.policy, listener, [completions[i] for i in rows],
                                      [self.record.contexts[i] for i in rows], self.record.images)
        for i, m in zip(rows, found.masks, strict=True):
            out[i]["cycle_mask"] = m
        metrics = self._metrics["train" if self.model.training else "eval"]
        metrics["cycle/encodes"].append(float(found.encodes))
        metrics["cycle/no_seg_frac"].append(found.no_seg / len(rows))
        return out

    # ------------------------------------------------------------------ scoring
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        K = logits_to_keep
        P = input_ids.shape[1] - K
        record = self.record
        drop = record.drop_mask
        if drop is not None and drop.shape[1] != K:  # TRL may pad completions further (pad_to_multiple_of)
            drop = torch.nn.functional.pad(drop[:, :K], (0, max(0, K - drop.shape[1])), value=False)
        batch_size = batch_size or input_ids.shape[0]
        logps, ents, aux = [], [], []
        # TRL's entropy bonus trains on the entropies: with grad then (docs/trl_parity.md)
        entropy_grad = compute_entropy and self._entropy_bonus_enabled and torch.is_grad_enabled()
        for s in range(0, input_ids.shape[0], batch_size):
            e = min(s + batch_size, input_ids.shape[0])
            # the KL reference: a frozen copy, or (AdapterReference) the policy's model with its adapters disabled
            with self.accelerator.autocast(), reference.scoring(model) as scored:
                score = (lambda m: self.policy.logprobs(
                    m, input_ids[s:e, :P], attention_mask[s:e, :P], input_ids[s:e, P:],
                    attention_mask[s:e, P:], temperature=self.temperature,
                    drop_mask=None if drop is None else drop[s:e],
                    **({} if record.contexts is None else {"contexts": record.contexts[s:e]}),
                    **({"compute_entropy": compute_entropy} if self._policy_entropy_flag else {}),
                    **({"entropy_grad": True} if entropy_grad else {}),
                    **({"compute_aux_loss": True} if compute_aux_loss else {}),
                    **({"multimodal": mm} if (mm := multimodal_rows(multimodal, s, e, input_ids.shape[0])) else {}),
                    **({"hidden_hook": hook} if (hook := self._mask_loss_hook(model, attention_mask[:, :P], s, e))
                       is not None else {}),
                ))
                # a causal LM's Policy calls the (wrapped) model itself; a Sa2VA Policy runs inside DDP's forward
                scores = score(scored) if isinstance(self.policy, CausalLMPolicy) else as_wrapper_forward(scored, score)
            lp, ent = scores[:2]
            if compute_aux_loss:
                aux.append(scores[2])
            logps.append(lp)
            ents.append(ent)
        logps = torch.cat(logps)
        if record.refs is not None:  # bound the log-ratios that the loss exponentiates (the ratio and the k3 KL)
            logps = reference.bound_log_ratios(logps, record.refs.get("old_per_token_logps"),
                                               record.refs.get("ref_per_token_logps"), self.args.log_ratio_clamp)
        aux_loss = torch.stack(aux).mean() if compute_aux_loss else None  # TRL's: the mean over chunks
        return logps, (torch.cat(ents) if compute_entropy else None), aux_loss

    def _mask_loss_hook(self, model, prompt_mask, start: int, end: int):
        """The Policy's ``hidden_hook`` for rows ``start:end`` of a loss sub-batch with mask-loss targets (the
        gradient-carrying scoring forward only), else None."""
        record = self.record
        if record.seg_targets is None or not torch.is_grad_enabled():
            return None
        if record.mask_loss is None:
            record.mask_loss = mask_loss.MaskLoss(self.accelerator.unwrap_model(model), record.seg_targets,
                                                  prompt_mask, self.args.mask_loss_ce_weight,
                                                  self.args.mask_loss_dice_weight)
        return record.mask_loss.hook(start, end)

    def _compute_loss(self, model, inputs):
        with self._in_flight(StepRecord.loss(inputs)) as record:
            loss = super()._compute_loss(model, inputs)
            ml = record.mask_loss
            if ml is not None and ml.loss is not None:
                # the targets' weights sum to 1 over the generation batch; TRL divides its loss by the accumulation
                # steps of a generation batch's share the same way: the sum over sub-batches is the weighted mean
                scale = self.args.steps_per_generation / self.current_gradient_accumulation_steps
                term = self.args.mask_loss_weight * ml.loss * scale
                loss = loss + term
                self._mask_stats += torch.stack([ml.ce, ml.dice, ml.weight]).to(self._mask_stats)
                if self.spike_guard is not None:
                    self.spike_guard.add_mask_loss(term)
            return loss

    def training_step(self, model, inputs, num_items_in_batch):
        if self._deepspeed_guard:
            self._install_deepspeed_guard()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._nonfinite_losses += (~torch.isfinite(loss.detach())).sum()  # stays on device: no sync
        self.collapse.observe("entropy", self._last_metric("entropy"))
        if self.spike_guard is not None:
            self.spike_guard.add_loss(loss)
            kl = self._last_metric("kl") if self.beta != 0.0 else None
            if kl is not None:
                self.spike_guard.add_kl(kl)
        return loss

    # ------------------------------------------------------------------ optimizer step
    def _clip_grad_norm(self, model):
        ds = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        if (ds and not self._deepspeed_guard) or self.args.fp16:
            # unguarded DeepSpeed (opted in) owns clipping and the step; fp16's GradScaler skips inf/NaN steps.
            self.stability.record_unguarded_step(
                "fp16: torch's GradScaler skips overflowed steps and lowers its scale itself; use bf16 for the guarded "
                "step" if self.args.fp16 else "DeepSpeed unguarded (--allow_unguarded_deepspeed): its own overflow "
                "handling only")
            return super()._clip_grad_norm(model)
        step = self.state.global_step + 1
        guard = self.spike_guard  # None under DeepSpeed (rl/spikes.py: its step is decided inside backward)
        if ds:  # checked (and, if non-finite, skipped) inside the guarded backward, before DeepSpeed's step
            report = self.accelerator.deepspeed_engine_wrapped.take_report()
        else:
            self.faults.grads(step, model, self.accelerator.process_index)
            report = self.grad_guard.check(model, extra=None if guard is None else guard.flags)  # same sync
        causes = [] if guard is None else guard.conclude(step, report.extra, report.finite, report.norm)
        if causes:  # finite, but a spike: skipped like a non-finite step
            return self._skip_spike(step, report, causes)
        if report.finite:
            self.stability.record_grads(step, report, skipped=False)
            if not ds and math.isfinite(self.args.max_grad_norm):  # DeepSpeed clips with its gradient_clipping
                self.grad_guard.clip_(self.args.max_grad_norm)
            return torch.tensor(report.norm)
        # DeepSpeed: the step was dropped already, whatever skip_nonfinite_steps says (it cannot be applied later)
        skip = self.args.skip_nonfinite_steps or ds
        if skip:
            self.grad_guard.skip(None if ds else self.optimizer)
        self.stability.record_grads(step, report, skipped=skip)
        k = self.grad_guard.stats.consecutive_nonfinite
        if k >= self.args.max_consecutive_skips or not self.args.skip_nonfinite_steps:
            self.rollback.on_persistent_nonfinite(step, (
                f"non-finite gradients ({report.kind}) at step {step}, {k} step(s) in a row (max_consecutive_skips="
                f"{self.args.max_consecutive_skips}); first offending parameters: "
                f"{report.all_nonfinite_params}; the weights were not updated by these steps"))
        return torch.tensor(float("nan"))

    def _skip_spike(self, step, report, causes):
        self.grad_guard.skip(self.optimizer)
        event = self.spike_guard.event(step, causes)  # failure path: reads the statistics back
        self.stability.record_spike(event, skipped=True)
        if self.spike_guard.limiter():
            logger.warning("step %d skipped: spike in %s (value %s, window mean %s, band's upper bound %s; judged "
                           "in %s scale); %d spike(s) in the last %d steps (logged on the 1st, 2nd, 4th... spike)",
                           step, ", ".join(causes), event["values"], event["mean"], event["threshold"], event["scale"],
                           len(self.spike_guard.recent), self.args.spike_persistent_window)
        if self.spike_guard.persistent():
            self.rollback.on_persistent(step, (
                f"{len(self.spike_guard.recent)} loss/grad-norm/KL spikes within {self.args.spike_persistent_window} "
                f"steps (steps {list(self.spike_guard.recent)}; spike_persistent_count="
                f"{self.args.spike_persistent_count}); the weights were not updated by these steps"),
                spikes.persistent_spike_action(self.args))
        return torch.tensor(report.norm)

    def _install_deepspeed_guard(self) -> None:
        """Put the GradGuard between DeepSpeed's backward and step: accelerate's DeepSpeedEngineWrapper (created when
        the Trainer prepares the engine) is replaced by rl/deepspeed_guard.py's subclass, once, before the first
        backward. An optimizer the guard cannot read is refused here, before any step."""
        wrapped = self.accelerator.deepspeed_engine_wrapped
        if wrapped is None or isinstance(wrapped, deepspeed_guard.GuardedEngineWrapper):
            return
        engine = wrapped.engine
        if deepspeed_guard.zero_optimizer_kind(engine.optimizer) is None:
            if self.args.allow_unguarded_deepspeed:
                logger.warning("DeepSpeed runs UNGUARDED (--allow_unguarded_deepspeed): the GradGuard cannot read a "
                               "%s", type(engine.optimizer).__name__)
                self._deepspeed_guard = False
                return
            raise ValueError(
                f"DeepSpeed built a {type(engine.optimizer).__name__}, which the GradGuard cannot read (it reads the "
                "ZeRO-1/2/3 optimizers' gradient partitions; e.g. ZeRO-1 with bf16 and fp32 gradient accumulation "
                "uses DeepSpeed's BF16_Optimizer). Drop data_types.grad_accum_dtype, use ZeRO-2, or pass "
                "--allow_unguarded_deepspeed true. See docs/distributed.md.")
        names = {id(p): n for n, p in unwrapped_named_parameters(engine.module)}

        def check(engine):
            parts = deepspeed_guard.zero_partitions(engine.optimizer, names)
            self.faults.grads(self.state.global_step + 1, None, self.accelerator.process_index, parts=parts)
            return self.grad_guard.check_partitions(parts)

        self.accelerator.deepspeed_engine_wrapped = deepspeed_guard.GuardedEngineWrapper(engine, check)
        logger.info("DeepSpeed ZeRO-%s: the GradGuard runs between the engine's backward and its step",
                    engine.zero_optimization_stage())

    # ------------------------------------------------------------------ logging and checkpoints
    def log(self, logs, start_time=None):
        mode = "train" if self.model.training else "eval"
        # rewards/<f>/mean is NaN by construction when f had no opinion on the whole batch (None everywhere);
        # non-finite reward values themselves are counted by the reward wrapper
        nonfinite = sum(1 for key, vals in self._metrics[mode].items() if not key.startswith("rewards/")
                        for v in vals if isinstance(v, float) and not math.isfinite(v))
        self.stability.counters.nonfinite_metric_values += nonfinite
        self.stability.counters.nonfinite_losses = int(self._nonfinite_losses)  # one sync per log
        for key in [k for k, vals in self._metrics[mode].items() if k.startswith("rewards/") and vals
                    and all(isinstance(v, float) and math.isnan(v) for v in vals)]:
            del self._metrics[mode][key]  # no row of that reward's task in these steps: absent, not a NaN/None
        if mode == "train":
            logs = {**logs, **self.stability.metrics()}
            if self.args.mask_loss_weight > 0:  # weighted means since the last log (one read per log)
                ce, dice, weight = self._mask_stats.tolist()
                self._mask_stats.zero_()
                if weight > 0:
                    self._metrics[mode]["mask_loss/ce"] = [ce / weight]
                    self._metrics[mode]["mask_loss/dice"] = [dice / weight]
        n = len(self.state.log_history)
        super().log(logs, start_time)
        # HF writes log_history into trainer_state.json with json.dumps, NaN/inf as bare tokens (not JSON): the
        # entry it keeps gets null instead (docs/troubleshooting.md "Strict JSON"); the callbacks (TensorBoard,
        # the progress line) were already given the values as they were
        for i in range(n, len(self.state.log_history)):
            entry = self.state.log_history[i]
            for key, value in entry.items():
                if isinstance(value, float) and not math.isfinite(value):
                    entry[key] = None

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """TRL's train, after the checkpoint to resume from (``resume_from_checkpoint``: a path, or True for the
        newest in ``output_dir``) is checked: its trainer and stability state present and well formed, the skip
        list beside it when rows were skipped (rl/resume_checks.py; a ResumeError names the file), never a silent
        restart of the counters."""
        resume = resume_from_checkpoint
        if resume is True:  # as transformers' Trainer resolves it (and fails when there is none)
            from transformers.trainer_utils import get_last_checkpoint

            resume = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
        if isinstance(resume, str):
            from sa2va_rl.rl.resume_checks import check_resume

            check_resume(resume, self.args.output_dir)
        if self.args.should_save:
            checkpoints.remove_stale_staging(self.args.output_dir)
        error: BaseException | None = None
        try:
            result = super().train(resume_from_checkpoint, *args, **kwargs)
        except BaseException as e:
            error = e
            raise
        finally:
            finite = self._end_of_run(error)
        if not finite:  # defence in depth: a run never ends "done" with NaN weights
            self.rollback.halt(f"training ended at step {self.state.global_step} with non-finite weights")
        return result

    def _end_of_run(self, error: BaseException | None) -> bool:
        """stability.json, with ranks_agree and the final weights check. Never masks ``error`` (the exception that
        ended training, if any) and never fails a finished run for a check that cannot run: such a failure is
        logged and recorded as ``ranks_agree_error``. Collectives run only when every rank is known to be here: a
        finished run, or a halt (a decision every rank took together); another exception may be rank-local, and a
        collective there would hang the ranks that did not raise. Returns whether the weights are finite."""
        collective = error is None or isinstance(error, NonFiniteTrainingError)
        agree, finite, problem = None, None, None
        if collective:
            try:
                agree = ranks_agree(self.model, self.accelerator)
                finite = weights_finite(self.model, all_ranks=True)
            except Exception as e:  # noqa: BLE001 - recorded and logged; training's own result stands
                problem = f"{type(e).__name__}: {e}"
                logger.exception("end of run: checking the weights across ranks failed; the run's result stands")
        elif self.accelerator.num_processes > 1:
            problem = f"not checked: training failed with {type(error).__name__} (possibly on this rank only)"
        if self.args.should_save:
            try:
                self.stability.counters.nonfinite_losses = int(self._nonfinite_losses)
                self.stability.extras["ranks_agree"] = lambda: agree
                if problem is not None:
                    self.stability.extras["ranks_agree_error"] = lambda: problem
                if finite is not None:
                    self.stability.extras["final_weights_finite"] = lambda: finite
                payload = self.stability.write_report(self.args.output_dir, self.model)
                logger.info("%s; weights finite: %s", self.stability.summary_line(self.state.global_step),
                            payload["final_weights_finite"])
            except Exception as e:
                if error is None:
                    raise
                # one line, naming the error that stopped training first (a full disk fails this write too)
                logger.error("training stopped by %s: %s; stability.json could not be written either (%s: %s)",
                             type(error).__name__, error, type(e).__name__, e)
        return True if finite is None else finite

    run_settings: dict | None = None  # set by the command line: written into each checkpoint as run_settings.json

    def _save_checkpoint(self, model, trial):
        """Atomic (see rl/checkpoints.py): TRL writes into output_dir/.staging, which is fsynced and renamed into
        place. Weights that are not finite are never saved."""
        if not weights_finite(self.model, all_ranks=True):  # never save them; they are a persistent fault
            self.stability.counters.unsaved_checkpoints += 1
            what = f"the weights are not finite at step {self.state.global_step} (checkpoint not saved)"
            self.rollback.on_persistent_nonfinite(self.state.global_step, what)
            return
        name = checkpoints.checkpoint_name(self.state.global_step)
        run_dir = self._get_output_dir(trial=trial)
        self._staging_dir = os.path.join(run_dir, checkpoints.STAGING)
        try:
            super()._save_checkpoint(model, trial)  # into staging/checkpoint-N (see _get_output_dir)
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            self.stability.counters.nonfinite_losses = int(self._nonfinite_losses)
            self.stability.save(os.path.join(run_dir, checkpoints.STAGING, name), weights_finite=True,
                                world_size=self.accelerator.num_processes)
            if self.run_settings is not None:  # what defines the run, compared on resume (rl/resume_checks.py)
                from sa2va_rl.rl.resume_checks import write_run_settings

                write_run_settings(os.path.join(run_dir, checkpoints.STAGING, name), self.run_settings)
            checkpoints.publish(run_dir, name, self.args.save_total_limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def _checkpoints_hold_trained_only(self) -> bool:
        """Checkpoints write only the trained parameters (rl/checkpoints.py save_trainable) where some are frozen
        and the weights are whole on each process. TRL's own layouts stay: a PeftModel's adapter (already only the
        trained part), and FSDP's and DeepSpeed's sharded checkpoints, which their engines write and load."""
        from transformers.trainer import _is_peft_model

        if self.is_fsdp_enabled or self.is_deepspeed_enabled or _is_peft_model(self.model):
            return False
        return any(not p.requires_grad for p in self.model.parameters())

    def _save(self, output_dir=None, state_dict=None):
        if getattr(self, "_staging_dir", None) is None or not self._checkpoints_hold_trained_only():
            return super()._save(output_dir, state_dict)  # not a checkpoint (save_model), or nothing frozen
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        from transformers.trainer import TRAINING_ARGS_NAME

        size = checkpoints.save_trainable(self.model, output_dir, (self.run_settings or {}).get("weights_fingerprint"))
        logger.info("checkpoint %s: the trained parameters and buffers, %.1f MB (the frozen ones are the base "
                    "model's)", output_dir, size / 1e6)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not os.path.isfile(os.path.join(resume_from_checkpoint, checkpoints.TRAINABLE_FILE)):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        checkpoints.load_trainable(model if model is not None else self.model, resume_from_checkpoint,
                                   (self.run_settings or {}).get("weights_fingerprint"))

    def _load_best_model(self):
        best = self.state.best_model_checkpoint
        if best and os.path.isfile(os.path.join(best, checkpoints.TRAINABLE_FILE)):
            logger.info("loading the best model from %s (score %s)", best, self.state.best_metric)
            return self._load_from_checkpoint(best)
        return super()._load_best_model()

    def _save_optimizer_and_scheduler(self, output_dir):
        self.faults.checkpoint_write(self.state.global_step, os.path.join(output_dir, "optimizer.pt"))
        super()._save_optimizer_and_scheduler(output_dir)

    def _get_output_dir(self, trial):
        staging = getattr(self, "_staging_dir", None)
        return staging if staging is not None else super()._get_output_dir(trial)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self.data_skip.load(self.args.output_dir)  # a rollback's skip outlives the run that made it
        if checkpoint is not None and self.stability.load(checkpoint):
            self._nonfinite_losses.fill_(self.stability.counters.nonfinite_losses)
            logger.info("restored stability state from %s: %s", checkpoint,
                        self.stability.summary_line(self.state.global_step))

    def last_good_checkpoint(self) -> str | None:
        """The newest checkpoint in output_dir whose stability state says its weights were finite."""
        return checkpoints.last_good_checkpoint(self.args.output_dir)

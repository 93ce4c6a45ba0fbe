"""Sa2VAGRPOConfig: TRL's GRPOConfig plus the stability fields, with the old script's defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig

from sa2va_rl.rl.faults import Fault


# GRPOConfig options this trainer refuses at start, by name, each with its reason (docs/trl_parity.md). Everything
# else is TRL's and behaves as in TRL; the options that need the model or the Policy to judge (router_aux_loss_coef,
# entropy_coef, a VLM processor) are refused by the trainer at start (Sa2VAGRPOTrainer._refuse_unsupported_trl_options).
GUARD_BYPASS = ("generation goes through the Policy with the LogitsGuard (repair of NaN/inf logit rows, the "
                "repaired-token drop); {name} samples outside it")
REFUSED_TRL_OPTIONS: dict[str, tuple] = {
    "use_vllm": (lambda a: a.use_vllm, GUARD_BYPASS.format(name="vLLM")),
    "use_transformers_continuous_batching": (lambda a: a.use_transformers_continuous_batching,
                                             GUARD_BYPASS.format(name="transformers' continuous batching")),
    "generation_kwargs['num_beams']": (
        lambda a: int((a.generation_kwargs or {}).get("num_beams") or 1) > 1,
        "beam search: the LogitsGuard sees batch x beams rows, reordered at every step, and cannot say which of them "
        "a returned token came from, so repaired tokens could not be dropped from the loss; use num_beams=1 "
        "(sampling, TRL's default)"),
    "generation_kwargs['num_return_sequences']": (
        lambda a: int((a.generation_kwargs or {}).get("num_return_sequences") or 1) > 1,
        "GRPO's group is num_generations (the sampler repeats each prompt); more sequences per prompt would not "
        "match the prompts they are scored against; use num_generations"),
    "generation_kwargs['assistant_model' / 'prompt_lookup_num_tokens' / 'assistant_early_exit']": (
        lambda a: any((a.generation_kwargs or {}).get(k) for k in ("assistant_model", "prompt_lookup_num_tokens",
                                                                    "assistant_early_exit")),
        "assisted (speculative) decoding accepts several tokens per logits-processor call, so the LogitsGuard's "
        "per-step flags no longer line up with the returned tokens and repaired tokens could not be dropped from "
        "the loss; leave them unset"),
}


def bf16_supported() -> bool:
    """bf16 where the hardware has it: a CUDA device with native bf16. CPU runs stay fp32."""
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


@dataclass
class Sa2VAGRPOConfig(GRPOConfig):
    """GRPOConfig with numerically guarded sampling, loss and optimizer steps.

    Defaults that differ from TRL's follow the original Sa2VA RL script: learning_rate 1e-5, max_grad_norm
    1.0, warmup_steps 10, num_generations 4, bf16 only when the device supports it (never fp16 by default).
    """

    # --- old-script defaults ---------------------------------------------------------------------------------
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (after GradGuard)."})
    warmup_steps: int = field(default=10, metadata={"help": "Linear warmup steps."})
    num_generations: int | None = field(
        default=4, metadata={"help": "Completions sampled per prompt (the GRPO group). Must be >= 2."}
    )
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision. Default: on when the GPU supports bf16, else fp32 (never fp16)."},
    )
    cast_lm_head_to_fp32: bool = field(
        default=True, metadata={"help": "Run the LM head in fp32 so logprobs are not computed from bf16 logits "
                                        "(the Sa2VA policy always does)."}
    )
    logging_steps: float = field(
        default=1,
        metadata={"help": "Log metrics every N optimizer steps. Default 1 (TRL's GRPOConfig: 10): one readable line "
                          "and one metrics entry per step, so a NaN or a spike is seen at the step it happens. As in "
                          "TRL, the metrics of the steps after the last log are merged into the end-of-training entry; "
                          "with 1 there are none left, so the last log_history entry holds train_runtime & co. only "
                          "(pass --logging_steps 10 for TRL's behaviour)."},
    )

    batch_size: int | None = field(
        default=None,
        metadata={"help": "Prompts per device per step, as in the original Sa2VA RL script. Sets "
                          "per_device_train_batch_size = batch_size * num_generations (TRL counts completions)."},
    )

    memory_check: bool = field(
        default=True,
        metadata={"help": "Before the model loads, estimate the memory per device (weights, trained states, "
                          "generation KV cache, scoring activations; `sa2va-rl plan` prints it, docs/scale.md has "
                          "the formulas) and refuse the run (exit 2) when it exceeds the device's memory, naming "
                          "the largest --num_generations that fits. false: skip the check (the context-length check "
                          "stays)."},
    )

    # --- stability -------------------------------------------------------------------------------------------
    logits_guard: bool = field(
        default=True,
        metadata={"help": "Repair NaN/inf/overflowed logit rows before sampling (healthy rows bit-identical)."},
    )
    max_abs_logit: float = field(
        default=1e4, metadata={"help": "Logits above this count as overflow and mark their row broken."}
    )
    drop_repaired_tokens: bool = field(
        default=True, metadata={"help": "Exclude tokens sampled from repaired logit rows from the loss."}
    )
    skip_nonfinite_steps: bool = field(
        default=True,
        metadata={"help": "Skip an optimizer step whose gradients hold NaN/Inf; the optimizer state is untouched."},
    )
    max_consecutive_skips: int = field(
        default=3, metadata={"help": "After this many non-finite steps in a row, act (see on_persistent_nonfinite)."}
    )
    on_persistent_nonfinite: str = field(
        default="halt",
        metadata={"help": "What to do after max_consecutive_skips: 'halt' (stop with an error; the last good "
                          "checkpoint stays) or 'rollback' (restore model, optimizer, scheduler and RNG from the "
                          "last good checkpoint and go on; needs --save_steps)."},
    )
    max_rollbacks: int = field(
        default=2, metadata={"help": "With rollback: after this many rollbacks in one run, halt."}
    )
    rollback_lr_factor: float = field(
        default=1.0, metadata={"help": "With rollback: multiply the learning rate by this at each rollback "
                                       "(e.g. 0.5)."}
    )
    inject: list[str] | None = field(
        default=None,
        metadata={"help": "Testing: inject faults, KIND[@STEP][:ARG] ... (see sa2va_rl.rl.faults): nan_logits, "
                          "posinf_logits, huge_logits, empty_completion, nan_grads, inf_grads, nan_weights, "
                          "reward_raises, reward_nan, reward_none, signal[:INT|TERM], io_error[:ENOSPC|EIO|EACCES], "
                          "loss_spike[:FACTOR], entropy_collapse[:FACTOR], poison_rows:I+J+... (every batch holding "
                          "one of these rows spikes); force_token[:TOKEN] (every completion of the step starts with "
                          "TOKEN, default [SEG], to exercise the mask path)."},
    )
    save_on_signal: bool = field(
        default=True,
        metadata={"help": "On SIGINT/SIGTERM: finish the step, save a checkpoint, stop with exit 128 + signal "
                          "(resume with --resume_from_checkpoint latest). A second signal stops at once."},
    )
    allow_unguarded_deepspeed: bool = field(
        default=False,
        metadata={"help": "DeepSpeed ZeRO-1/2/3 are guarded (the GradGuard runs between the engine's backward and "
                          "its step). Setups it cannot guard (ZeRO stage 0, optimizer/parameter offload, a non-ZeRO "
                          "DeepSpeed optimizer) are refused at start unless this is set; then they run with "
                          "DeepSpeed's own overflow handling only, not skipped or counted by sa2va-rl."},
    )
    stability_summary_steps: int = field(
        default=10, metadata={"help": "Log a one-line stability summary every N optimizer steps (0: never)."}
    )
    advantage_std_floor: float = field(
        default=1e-2,
        metadata={"help": "Floor on the reward std that advantages are divided by, so near-ties do not explode."},
    )
    log_ratio_clamp: float = field(
        default=20.0, metadata={"help": "Clamp |log pi/pi_old| and |log pi_ref/pi| before exp()."}
    )
    caption_meteor_impl: str = field(
        default="auto",
        metadata={"help": "Which METEOR the mask2caption reward uses: 'auto' (METEOR 1.5, the standard, where java is "
                          "installed, else nltk with a warning), 'meteor-1.5' (pycocoevalcap's jar in one java "
                          "process per run; refused without java) or 'nltk' (nltk's meteor_score: no paraphrases, "
                          "numbers no paper reports). stability.json -> caption_meteor.meteor_impl says which ran."},
    )
    reward_errors: str = field(
        default="raise",
        metadata={"help": "A reward function that raises: 'raise' (stop, naming the function and the sample) or "
                          "'skip' (that sample gets no opinion from that function, counted as reward_errors)."},
    )

    # --- spikes and collapse (rl/spikes.py, rl/collapse.py; docs/stability.md) --------------------------------
    spike_guard: bool = field(
        default=True,
        metadata={"help": "Skip a step whose loss, pre-clip grad norm or (beta > 0) KL is more than spike_sigma "
                          "standard deviations over its last spike_window steps (optimizer state untouched, counted "
                          "by cause). Statistics stay on the device; no extra host sync."},
    )
    spike_signals: list[str] = field(
        default_factory=lambda: ["grad_norm", "kl"],
        metadata={"help": "Spike guard: the signals that may flag a step, of loss, grad_norm, kl. The loss is off by "
                          "default: GRPO's surrogate loss is zero-mean by construction (group-normalised advantages, "
                          "ratio 1 on the first iteration), so its window is round-off punctuated by length effects "
                          "and a sigma rule flags healthy steps; a loss blow-up shows in the grad norm."},
    )
    spike_window: int = field(default=128, metadata={"help": "Spike guard: steps of history per signal."})
    spike_sigma: float = field(default=6.0, metadata={"help": "Spike guard: standard deviations that make a spike."})
    spike_warmup: int = field(
        default=16, metadata={"help": "Spike guard: observations a signal needs before it is judged (>= 2)."}
    )
    spike_persistent_count: int = field(
        default=3, metadata={"help": "This many spikes within spike_persistent_window steps are persistent "
                                     "(see on_persistent_spikes)."}
    )
    spike_persistent_window: int = field(default=20, metadata={"help": "Steps over which spikes are counted."})
    on_persistent_spikes: str | None = field(
        default=None,
        metadata={"help": "Persistent spikes: 'halt', 'rollback' (to the last good checkpoint, skipping the data "
                          "consumed since; needs --save_steps) or 'continue' (keep skipping each spike). Default: "
                          "as on_persistent_nonfinite."},
    )
    rollback_skip_data: bool = field(
        default=True,
        metadata={"help": "On a rollback, skip the dataset rows consumed since the checkpoint from then on, also "
                          "after a resume (PaLM's remedy); the rows are listed in output_dir/skipped_rows.json."},
    )
    collapse_entropy_floor: float = field(
        default=0.05, metadata={"help": "Collapse monitor: warn when the mean token entropy (nats) is below this."}
    )
    collapse_entropy_fraction: float = field(
        default=0.1, metadata={"help": "Collapse monitor: ... or below this fraction of its early value."}
    )
    collapse_warmup_steps: int = field(
        default=5, metadata={"help": "Collapse monitor: steps whose mean entropy is the 'early value'."}
    )
    collapse_zero_std_share: float = field(
        default=0.8, metadata={"help": "Collapse monitor: warn when more groups than this share have zero reward std."}
    )
    collapse_identical_share: float = field(
        default=0.5, metadata={"help": "Collapse monitor: warn when more groups than this share have G identical "
                                       "completions."}
    )
    collapse_max_length_share: float = field(
        default=0.5, metadata={"help": "Collapse monitor: warn when more completions than this share reach "
                                       "max_completion_length."}
    )
    collapse_repeat_share: float = field(
        default=0.5, metadata={"help": "Collapse monitor: warn when more completions than this share repeat a "
                                       "completion of another prompt in the batch."}
    )
    collapse_share_window: int = field(
        default=8, metadata={"help": "Collapse monitor: the share monitors (zero_std, identical, max_length, repeat) "
                                     "are judged on their mean over this many steps (a collapse lasts; one batch's "
                                     "coincidence does not)."}
    )
    collapse_halt: bool = field(
        default=False, metadata={"help": "Collapse monitor: stop the run (exit 4) when a monitor stays crossed "
                                         "for collapse_patience steps in a row."}
    )
    collapse_patience: int = field(default=3, metadata={"help": "Collapse monitor: see collapse_halt."})
    dynamic_sampling: bool = field(
        default=False,
        metadata={"help": "DAPO's dynamic sampling: groups whose rewards are all equal (zero std, no learning "
                          "signal) are dropped and refilled with fresh prompts from the data, counted under "
                          "stability/dynamic_sampling/*. Each refill costs G more completions. One process only."},
    )
    dynamic_sampling_max_rounds: int = field(
        default=3, metadata={"help": "With dynamic_sampling: refill rounds per generation batch; groups still "
                                     "without a signal after them stay (advantage 0, counted as unfilled)."}
    )
    mask_loss_weight: float = field(
        default=0.0,
        metadata={"help": "Sa2VA caption2mask rows: weight of the supervised mask loss added to GRPO's loss (0: off). "
                          "The [SEG] state of the chosen rollouts, from the same scoring forward as the log-probs, "
                          "goes through text_hidden_fcs and SAM2's decoder; sigmoid CE x mask_loss_ce_weight + Dice x "
                          "mask_loss_dice_weight against the reference mask, fp32 (rl/mask_loss.py). On: "
                          "text_hidden_fcs trains; SAM2's decoder only with --train_mask_decoder."},
    )
    mask_loss_ce_weight: float = field(default=2.0, metadata={"help": "Mask loss: sigmoid CE weight (Sa2VA's 2.0)."})
    mask_loss_dice_weight: float = field(default=0.5, metadata={"help": "Mask loss: Dice weight (Sa2VA's 0.5)."})
    mask_loss_rollouts: str = field(
        default="best",
        metadata={"help": "Mask loss: which rollouts learn. 'best': the highest-reward rollout with a [SEG] of each "
                          "group (the Sa2VA authors'; trains even when a group's rewards tie); 'positive': every "
                          "rollout with a [SEG], weighted by its positive advantage."},
    )

    def __post_init__(self) -> None:
        if self.batch_size is not None:
            if self.batch_size < 1:
                raise ValueError(f"batch_size={self.batch_size}: use 1 or more prompts per device per step")
            self.per_device_train_batch_size = self.batch_size * (self.num_generations or 1)
        if self.bf16 is None:
            self.bf16 = False if self.fp16 else bf16_supported()
        if self.dataloader_pin_memory and not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # pinned memory without an accelerator: a warning, nothing gained
        problems = []
        if self.num_generations is None or self.num_generations < 2:
            problems.append(
                f"num_generations={self.num_generations}: GRPO normalises rewards within a group, and the std of "
                "a single sample is NaN; use --num_generations 2 or more (4 is the usual choice)"
            )
        if self.on_persistent_nonfinite not in ("halt", "rollback"):
            problems.append(f"on_persistent_nonfinite={self.on_persistent_nonfinite!r}: use 'halt' or 'rollback'")
        if self.max_rollbacks < 0:
            problems.append(f"max_rollbacks={self.max_rollbacks}: use 0 or more")
        if not (0 < self.rollback_lr_factor <= 1):
            problems.append(f"rollback_lr_factor={self.rollback_lr_factor}: use a factor in (0, 1]")
        for spec in self.inject or []:
            try:
                Fault.parse(spec)
            except ValueError as e:
                problems.append(str(e))
        if self.caption_meteor_impl not in ("auto", "meteor-1.5", "nltk"):
            problems.append(f"caption_meteor_impl={self.caption_meteor_impl!r}: unknown METEOR implementation; use "
                            "'auto', 'meteor-1.5' or 'nltk'")
        if self.reward_errors not in ("raise", "skip"):
            problems.append(f"reward_errors={self.reward_errors!r}: use 'raise' or 'skip'")
        if self.max_consecutive_skips < 1:
            problems.append(f"max_consecutive_skips={self.max_consecutive_skips}: use 1 or more")
        if not (math.isfinite(self.max_abs_logit) and self.max_abs_logit > 0):
            problems.append(f"max_abs_logit={self.max_abs_logit}: use a positive number such as 1e4")
        if not (self.advantage_std_floor > 0):
            problems.append(f"advantage_std_floor={self.advantage_std_floor}: use a small positive number (1e-2)")
        if not (self.log_ratio_clamp > 0):
            problems.append(f"log_ratio_clamp={self.log_ratio_clamp}: use a positive number such as 20")
        if self.stability_summary_steps < 0:
            problems.append(f"stability_summary_steps={self.stability_summary_steps}: use 0 (off) or more")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            problems.append(f"learning_rate={self.learning_rate}: use a positive rate (1e-5 is the original "
                            "recipe's); 0 would train nothing and report success")
        if not (self.max_grad_norm is not None and self.max_grad_norm > 0):
            problems.append(f"max_grad_norm={self.max_grad_norm}: transformers calls the gradient seam only when it "
                            "is > 0, so this would switch the GradGuard off; use inf to check without clipping")
        if self.max_steps == 0 or self.max_steps < -1:
            problems.append(f"max_steps={self.max_steps}: use a positive number of optimizer steps, or -1 (the "
                            "default) to train for num_train_epochs")
        if self.drop_repaired_tokens and not self.logits_guard:
            problems.append("drop_repaired_tokens needs logits_guard: enable --logits_guard or disable both")
        if self.spike_warmup < 2 or self.spike_window < self.spike_warmup:
            problems.append(f"spike_window={self.spike_window}, spike_warmup={self.spike_warmup}: use "
                            "spike_window >= spike_warmup >= 2 (defaults 128 and 16)")
        if not (math.isfinite(self.spike_sigma) and self.spike_sigma > 0):
            problems.append(f"spike_sigma={self.spike_sigma}: use a positive number of standard deviations (6)")
        if self.spike_persistent_count < 1 or self.spike_persistent_window < self.spike_persistent_count:
            problems.append(f"spike_persistent_count={self.spike_persistent_count}, spike_persistent_window="
                            f"{self.spike_persistent_window}: use 1 <= count <= window (defaults 3 and 20)")
        bad_signals = sorted(set(self.spike_signals or []) - {"loss", "grad_norm", "kl", "mask_loss"})
        if bad_signals:
            problems.append(f"spike_signals: {bad_signals} unknown; use some of loss, grad_norm, kl, mask_loss")
        if not (math.isfinite(self.mask_loss_weight) and self.mask_loss_weight >= 0):
            problems.append(f"mask_loss_weight={self.mask_loss_weight}: use 0 (off) or a positive weight (1.0)")
        if min(self.mask_loss_ce_weight, self.mask_loss_dice_weight) < 0 or not (
                self.mask_loss_ce_weight + self.mask_loss_dice_weight > 0):
            problems.append(f"mask_loss_ce_weight={self.mask_loss_ce_weight}, mask_loss_dice_weight="
                            f"{self.mask_loss_dice_weight}: use non-negative weights, not both 0 (Sa2VA: 2.0, 0.5)")
        if self.mask_loss_rollouts not in ("best", "positive"):
            problems.append(f"mask_loss_rollouts={self.mask_loss_rollouts!r}: use 'best' or 'positive'")
        if self.on_persistent_spikes not in (None, "halt", "rollback", "continue"):
            problems.append(f"on_persistent_spikes={self.on_persistent_spikes!r}: use 'halt', 'rollback' or "
                            "'continue' (or leave it unset to follow on_persistent_nonfinite)")
        for name in ("collapse_entropy_fraction", "collapse_zero_std_share", "collapse_identical_share",
                     "collapse_max_length_share", "collapse_repeat_share"):
            if not (0 <= getattr(self, name) <= 1):
                problems.append(f"{name}={getattr(self, name)}: use a share in [0, 1] (1 never warns)")
        if not (self.collapse_entropy_floor >= 0):
            problems.append(f"collapse_entropy_floor={self.collapse_entropy_floor}: use 0 (off) or more nats")
        if self.collapse_share_window < 1:
            problems.append(f"collapse_share_window={self.collapse_share_window}: use 1 (judge each step) or more")
        if self.collapse_warmup_steps < 1 or self.collapse_patience < 1:
            problems.append(f"collapse_warmup_steps={self.collapse_warmup_steps}, collapse_patience="
                            f"{self.collapse_patience}: use 1 or more")
        if self.dynamic_sampling_max_rounds < 1:
            problems.append(f"dynamic_sampling_max_rounds={self.dynamic_sampling_max_rounds}: use 1 or more")
        if self.dynamic_sampling and self.multi_objective_aggregation != "sum_then_normalize":
            problems.append("dynamic_sampling needs multi_objective_aggregation='sum_then_normalize' (its advantages "
                            "are recomputed per group after the refill)")
        for name, (refused, why) in REFUSED_TRL_OPTIONS.items():
            if refused(self):
                problems.append(f"{name}: not supported by Sa2VAGRPOTrainer: {why} (docs/trl_parity.md)")
        if problems:
            raise ValueError("Invalid Sa2VAGRPOConfig:\n  - " + "\n  - ".join(problems))
        super().__post_init__()

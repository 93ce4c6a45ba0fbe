import copy
import json
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from sa2va_rl.data.prompts import load_prompt_dataset
from sa2va_rl.models.policy import CausalLMPolicy
from sa2va_rl.rl.config import Sa2VAGRPOConfig
from sa2va_rl.rl.stability import NonFiniteTrainingError
from sa2va_rl.rl.trainer import Sa2VAGRPOTrainer, group_advantages


def length_reward(completions, **kwargs):
    """Distinct words: varies within a group even when every completion hits the length cap, so
    advantages (and gradients) are non-zero."""
    return [len(set(c.split())) / 10.0 for c in completions]


def make_trainer(tiny_causal, prompt_dir, out, policy=None, reward=length_reward, **overrides):
    torch.manual_seed(0)
    kw = dict(output_dir=str(out), max_steps=3, batch_size=2, num_generations=4, max_completion_length=8,
              warmup_steps=0, learning_rate=1e-2, save_strategy="no", disable_tqdm=True, seed=0,
              stability_summary_steps=1)
    kw.update(overrides)
    cfg = Sa2VAGRPOConfig(**kw)
    model = AutoModelForCausalLM.from_pretrained(tiny_causal)
    tok = AutoTokenizer.from_pretrained(tiny_causal)
    return Sa2VAGRPOTrainer(model=model, reward_funcs=[reward], args=cfg, policy=policy,
                            train_dataset=load_prompt_dataset(prompt_dir), processing_class=tok)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def stability_json(out):
    with open(os.path.join(out, "stability.json")) as f:
        return json.load(f)


def group_batch(trainer, n_prompts=2):
    """One generation batch in the sampler's order (each prompt num_generations times), ready for the
    seams to be called directly, outside train()."""
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by train()
    trainer.model.train()
    g = trainer.num_generations
    return [dict(trainer.train_dataset[i]) for i in range(n_prompts) for _ in range(g)]


# (1) ------------------------------------------------------------------------------------------------------
def test_new_tokens_only_policy_gives_nonempty_completions_and_finite_loss(tiny_causal, prompt_dir, tmp_path):
    trainer = make_trainer(tiny_causal, prompt_dir, tmp_path,
                           policy=CausalLMPolicy(pad_token_id=0, generate_from_embeds=True))
    trainer.model.train()
    inputs = trainer._generate_and_score_completions(group_batch(trainer))
    lengths = inputs["completion_mask"].sum(1)
    assert (lengths > 0).all(), lengths
    loss = trainer.compute_loss(trainer.model, inputs)
    assert torch.isfinite(loss)
    trainer.train()
    report = stability_json(tmp_path)
    assert report["empty_completions"] == 0 and report["final_weights_finite"] is True


# (2) ------------------------------------------------------------------------------------------------------
class NaNLogitsAt:
    """Forward hook on lm_head: during generation (no grad), NaN in some entries of row `row` at call `call`."""

    def __init__(self, call, row, entries=slice(3, 20)):
        self.call, self.row, self.entries, self.n = call, row, entries, 0

    def __call__(self, module, inputs, out):
        if torch.is_grad_enabled():
            return out
        self.n += 1
        if self.n == self.call:
            out = out.clone()
            out[self.row, -1, self.entries] = math.nan
        return out


def hand_loss(model, inputs, mask):
    """GRPO loss (loss_type='grpo', one iteration: ratio 1) from one unpadded fp32 forward per row."""
    total = 0.0
    B = inputs["prompt_ids"].shape[0]
    for b in range(B):
        p = inputs["prompt_ids"][b][inputs["prompt_mask"][b].bool()]
        n = int(inputs["completion_mask"][b].sum())
        c = inputs["completion_ids"][b, :n]
        logits = model(input_ids=torch.cat([p, c])[None]).logits[0].float()
        logp = torch.log_softmax(logits[len(p) - 1:-1], -1).gather(-1, c[:, None]).squeeze(-1)
        m = mask[b, :n].float()
        total = total + (-inputs["advantages"][b] * logp * m).sum() / m.sum().clamp(min=1.0)
    return total / B


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_nan_logits_repaired_tokens_dropped_from_loss(tiny_causal, prompt_dir, tmp_path):
    trainer = make_trainer(tiny_causal, prompt_dir, tmp_path, loss_type="grpo")
    model = trainer.model
    hook = NaNLogitsAt(call=3, row=1)
    handle = model.lm_head.register_forward_hook(hook)
    model.train()
    inputs = trainer._generate_and_score_completions(group_batch(trainer))
    handle.remove()
    drop = inputs["tool_mask"] == 0
    assert drop.sum() == 1 and drop[1, 2], drop  # row 1, decoding step 3 (0-based 2)
    assert trainer.logits_guard.stats.nan_rows == 1

    ours = grads_of(model, trainer.compute_loss(model, inputs))
    keep = inputs["completion_mask"].bool() & ~drop
    by_hand = grads_of(model, hand_loss(model, inputs, keep))
    with_repaired = grads_of(model, hand_loss(model, inputs, inputs["completion_mask"].bool()))
    for n in by_hand:
        torch.testing.assert_close(ours[n], by_hand[n], rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(by_hand[n], with_repaired[n], rtol=1e-4, atol=1e-6) for n in by_hand), \
        "keeping the repaired token must change the gradient, or this test cannot fail"


def test_nan_logits_run_finishes_with_finite_weights(tiny_causal, prompt_dir, tmp_path):
    trainer = make_trainer(tiny_causal, prompt_dir, tmp_path)
    trainer.model.lm_head.register_forward_hook(NaNLogitsAt(call=5, row=0, entries=slice(None)))
    trainer.train()
    report = stability_json(tmp_path)
    assert report["steps"] == 3 and report["repaired_rows"] == 1 and report["logits_guard"]["fallback_rows"] == 1
    assert report["dropped_tokens"] == 1 and report["skipped_steps"] == 0
    assert report["final_weights_finite"] is True


# (3) ------------------------------------------------------------------------------------------------------
class Snapshots(TrainerCallback):
    def __init__(self):
        self.opt, self.params = [], []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        self.opt.append(copy.deepcopy(optimizer.state_dict()))
        self.params.append(params(model))


def nan_grad_at(trainer, steps):
    """A gradient hook on one parameter that turns its gradient NaN during the given optimizer steps."""
    p = trainer.model.model.layers[0].mlp.down_proj.weight

    def hook(grad):
        if trainer.state.global_step + 1 in steps:
            return torch.full_like(grad, math.nan)
        return grad

    p.register_hook(hook)
    return "model.layers.0.mlp.down_proj.weight"


def opt_equal(a, b):
    return all(torch.equal(a["state"][k][f], b["state"][k][f]) for k in a["state"] for f in a["state"][k])


def test_nan_grads_skip_step_with_optimizer_untouched(tiny_causal, prompt_dir, tmp_path):
    trainer = make_trainer(tiny_causal, prompt_dir, tmp_path, max_steps=4)
    name = nan_grad_at(trainer, {3})
    snaps = Snapshots()
    trainer.add_callback(snaps)
    trainer.train()
    # step 3 (index 2) skipped: optimizer state and weights bit-identical to after step 2
    assert opt_equal(snaps.opt[1], snaps.opt[2])
    assert all(torch.equal(snaps.params[1][n], snaps.params[2][n]) for n in snaps.params[1])
    # step 4 healthy: the optimizer moved again
    assert not opt_equal(snaps.opt[2], snaps.opt[3])
    report = stability_json(tmp_path)
    assert report["steps"] == 4 and report["skipped_steps"] == 1 and report["nonfinite_grad_steps"] == 1
    assert report["first_nonfinite"]["step"] == 3 and report["first_nonfinite"]["params"] == [name]
    assert report["final_weights_finite"] is True


def test_persistent_nan_grads_halt_with_message(tiny_causal, prompt_dir, tmp_path):
    trainer = make_trainer(tiny_causal, prompt_dir, tmp_path, max_steps=6, max_consecutive_skips=2)
    nan_grad_at(trainer, {2, 3, 4, 5, 6})
    with pytest.raises(NonFiniteTrainingError, match="2 step\\(s\\) in a row"):
        trainer.train()
    report = stability_json(tmp_path)
    assert report["skipped_steps"] == 2 and report["steps"] == 3 and report["final_weights_finite"] is True


# (4) ------------------------------------------------------------------------------------------------------
def test_all_equal_rewards_zero_advantages():
    w = torch.ones(1)
    adv = group_advantages(torch.full((8, 1), 0.7), w, 4, "group", 1e-2)
    assert torch.equal(adv, torch.zeros(8))
    # G = 8: the fp32 mean of eight 0.7s is an ulp off 0.7 (r - mean = 6e-8, which gave a 1e-7 gradient norm where
    # there is no signal); a tie is centred to exact zeros, also with a "no opinion" (NaN) among the tied
    tied = torch.full((16, 1), 0.7)
    tied[9] = math.nan
    assert (tied[:8] - tied[:8].mean()).abs().max() > 0  # the trap is real
    assert torch.equal(group_advantages(tied, w, 8, "group", 1e-2), torch.zeros(16))
    none = torch.tensor([[math.nan]] * 4 + [[1.0], [0.0], [1.0], [0.0]])
    adv = group_advantages(none, w, 4, "group", 1e-2)
    assert torch.isfinite(adv).all() and torch.equal(adv[:4], torch.zeros(4))
    near_tie = torch.tensor([[0.5], [0.5], [0.5], [0.5001]])
    adv = group_advantages(near_tie, w, 4, "group", 1e-2)
    assert adv.abs().max() <= 0.0001 / 1e-2 * 1.01  # TRL's std + 1e-4 would give ~1.5
    assert adv.dtype == torch.float32


def test_all_equal_rewards_in_training(tiny_causal, prompt_dir, tmp_path):
    trainer = make_trainer(tiny_causal, prompt_dir, tmp_path, reward=lambda completions, **kw: [1.0] * len(completions))
    trainer.model.train()
    inputs = trainer._generate_and_score_completions(group_batch(trainer))
    assert torch.equal(inputs["advantages"], torch.zeros_like(inputs["advantages"]))
    assert torch.isfinite(trainer.compute_loss(trainer.model, inputs))


# (5) ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("g", [1, 0])
def test_num_generations_below_two_is_a_config_error(tmp_path, g):
    with pytest.raises(ValueError, match="num_generations=%d.*2 or more" % g):
        Sa2VAGRPOConfig(output_dir=str(tmp_path), num_generations=g)


def test_config_defaults_and_validation(tmp_path):
    cfg = Sa2VAGRPOConfig(output_dir=str(tmp_path), batch_size=4, num_generations=4)
    assert (cfg.max_grad_norm, cfg.warmup_steps, cfg.learning_rate) == (1.0, 10, 1e-5)
    assert cfg.per_device_train_batch_size == 16
    assert cfg.bf16 == (torch.cuda.is_available() and torch.cuda.is_bf16_supported()) and not cfg.fp16
    with pytest.raises(ValueError, match="on_persistent_nonfinite='explode'"):
        Sa2VAGRPOConfig(output_dir=str(tmp_path), on_persistent_nonfinite="explode")


# (6) ------------------------------------------------------------------------------------------------------
def test_every_trainable_parameter_changes_after_a_healthy_step(tiny_causal, prompt_dir, tmp_path):
    trainer = make_trainer(tiny_causal, prompt_dir, tmp_path, max_steps=1)
    before = params(trainer.model)
    trainer.train()
    after = params(trainer.model)
    unchanged = [n for n, p in trainer.model.named_parameters() if p.requires_grad and torch.equal(before[n], after[n])]
    assert unchanged == []
    assert stability_json(tmp_path)["skipped_steps"] == 0


# (7) ------------------------------------------------------------------------------------------------------
def test_checkpoint_resume_keeps_stability_counters(tiny_causal, prompt_dir, tmp_path):
    out = tmp_path / "run"
    first = make_trainer(tiny_causal, prompt_dir, out, max_steps=2, save_strategy="steps", save_steps=2)
    nan_grad_at(first, {2})
    first.train()
    saved = stability_json(out)
    assert saved["skipped_steps"] == 1 and saved["steps"] == 2
    ckpt = out / "checkpoint-2"
    assert (ckpt / "stability_state.json").exists()

    second = make_trainer(tiny_causal, prompt_dir, out, max_steps=4, save_strategy="no")
    second.train(resume_from_checkpoint=str(ckpt))
    report = stability_json(out)
    assert second.state.global_step == 4
    assert report["steps"] == 4 and report["skipped_steps"] == 1 and report["nonfinite_grad_steps"] == 1
    assert report["first_nonfinite"] == saved["first_nonfinite"]
    assert report["grad_guard"]["steps"] == 4
    assert report["logits_guard"]["rows_seen"] > saved["logits_guard"]["rows_seen"]


# empty completions ------------------------------------------------------------------------------------------
class EmptyFirstPolicy(CausalLMPolicy):
    """Returns an empty completion for the first sample of each generation call."""

    def generate(self, model, prompt_ids, generation_config, logits_guard):
        gen = super().generate(model, prompt_ids, generation_config, logits_guard)
        gen.completion_ids[0], gen.repaired[0] = [], []
        return gen


def test_empty_completion_contributes_zero_loss_and_is_counted(tiny_causal, prompt_dir, tmp_path):
    trainer = make_trainer(tiny_causal, prompt_dir, tmp_path, loss_type="grpo",
                           policy=EmptyFirstPolicy(pad_token_id=0))
    inputs = trainer._generate_and_score_completions(group_batch(trainer))
    assert (inputs["tool_mask"][0] * inputs["completion_mask"][0]).sum() == 0  # nothing of row 0 in the loss
    assert trainer.stability.counters.empty_completions == 1
    loss = trainer.compute_loss(trainer.model, inputs)
    assert torch.isfinite(loss)
    ours = grads_of(trainer.model, loss)
    keep = inputs["completion_mask"].bool() & (inputs["tool_mask"] == 1)
    by_hand = grads_of(trainer.model, hand_loss(trainer.model, inputs, keep))
    for n in by_hand:
        torch.testing.assert_close(ours[n], by_hand[n], rtol=1e-4, atol=1e-6)
    trainer.train()
    report = stability_json(tmp_path)
    assert report["empty_completions"] == 1 + 3 and report["final_weights_finite"] is True


def test_log_ratio_clamp_bounds_value_keeps_gradient_and_is_identity_when_idle():
    from sa2va_rl.numerics.clamp import straight_through_clamp as _straight_through_clamp

    x = torch.tensor([-1.0, -50.0, -0.5], requires_grad=True)
    ref = torch.tensor([-1.2, -2.0, -0.4])
    y = _straight_through_clamp(x, lo=ref - 20, hi=None)
    assert y[0] == x[0] and y[2] == x[2]  # bit-identical where the bound does not bite
    assert y[1] == -22.0  # bounded: exp(ref - y) <= e^20 instead of e^48
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))  # gradient of every token kept
    assert torch.isfinite(torch.exp(ref - y)).all()


def test_progress_lines_are_readable():
    from sa2va_rl.rl.progress import format_logs

    logs = {"loss": -0.0823, "grad_norm": 0.733, "reward": 0.459, "rewards/caption_meteor/mean": 0.426,
            "rewards/mask_iou/mean": 0.33, "entropy": 0.887, "completions/mean_length": 8.31,
            "stability/skipped_steps": 0, "stability/repaired_rows": 2}
    assert format_logs(3, 40, logs) == ("step 3/40  reward 0.459 (caption_meteor 0.426, mask_iou 0.33)  loss -0.0823  "
                                        "grad 0.733  entropy 0.887  len 8.31  skipped 0, repaired rows 2")
    assert format_logs(40, 40, {"train_runtime": 3.0, "loss": 0.1}) is None  # the end-of-run summary dict


# (G) end of run: nothing in train()'s finally masks the real error or fails a finished run ----------------------
def test_failing_end_of_run_check_does_not_fail_a_finished_run(tiny_causal, prompt_dir, tmp_path, monkeypatch):
    def broken(model, accelerator):
        raise NotImplementedError("Operator c10d.allreduce_.default does not have a sharding strategy registered")

    monkeypatch.setattr("sa2va_rl.rl.trainer.ranks_agree", broken)
    trainer = make_trainer(tiny_causal, prompt_dir, tmp_path, max_steps=1)
    trainer.train()  # finishes: the check's failure is recorded, not raised
    report = stability_json(tmp_path)
    assert report["ranks_agree"] is None and "NotImplementedError" in report["ranks_agree_error"]
    assert report["steps"] == 1 and report["final_weights_finite"] is True


def test_training_error_is_not_masked_by_the_end_of_run(tiny_causal, prompt_dir, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_causal, prompt_dir, tmp_path, max_steps=1)

    def boom(*a, **k):
        raise RuntimeError("the real error")

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(trainer, "training_step", boom)
    monkeypatch.setattr(trainer.stability, "write_report", broken)
    with pytest.raises(RuntimeError, match="the real error"):
        trainer.train()


def test_deepspeed_zero_is_guarded_and_unguardable_setups_are_refused_at_start(tmp_path):
    """ZeRO-1/2/3 without offload: the DeepSpeed guard runs (tests/rl/test_deepspeed.py drives it). ZeRO stage 0 and
    offload: refused at start with the reason, unless --allow_unguarded_deepspeed (an explicit opt-in, never a
    silent one). fp16 is left to the loss scaler, as on every engine; other engines never take this path."""
    from accelerate.utils import DistributedType

    from sa2va_rl.rl.trainer import refuse_unguarded_engine
    ds = DistributedType.DEEPSPEED
    cfg = Sa2VAGRPOConfig(output_dir=str(tmp_path), num_generations=2)
    for stage in (1, 2, 3):
        config = {"zero_optimization": {"stage": stage, "offload_optimizer": {"device": "none"},
                                        "offload_param": {"device": "none"}}}
        assert refuse_unguarded_engine(ds, cfg, config) is True
    refused = {"ZeRO stage 0": {"zero_optimization": {"stage": 0}},
               "ZeRO stage 0 has": None,  # no zero_optimization section at all: stage 0
               "offload_optimizer.device=cpu": {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
               "offload_param.device=nvme": {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}}
    for why, config in refused.items():
        with pytest.raises(ValueError, match=f"DeepSpeed is not guarded.*{why}.*--allow_unguarded_deepspeed"):
            refuse_unguarded_engine(ds, cfg, config)
    for engine in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU, DistributedType.FSDP):
        assert refuse_unguarded_engine(engine, cfg) is False  # guarded by the GradGuard's own seam
    cfg.allow_unguarded_deepspeed = True
    for config in refused.values():
        assert refuse_unguarded_engine(ds, cfg, config) is False  # runs, unguarded, with a warning
    cfg.allow_unguarded_deepspeed, cfg.fp16 = False, True
    assert refuse_unguarded_engine(ds, cfg, {"zero_optimization": {"stage": 0}}) is False


def test_bf16_run_keeps_fp32_master_weights_and_every_trainable_tensor_moves(tiny_causal, prompt_dir, tmp_path):
    """A model loaded in bf16 with bf16 on: trainable weights become fp32 (bf16 is autocast), so AdamW at lr 1e-5
    moves every one of them in one step (in bf16 storage most of them would round back: numerics/precision.py)."""
    torch.manual_seed(0)
    cfg = Sa2VAGRPOConfig(output_dir=str(tmp_path), max_steps=1, batch_size=4, num_generations=2,
                          max_completion_length=8, warmup_steps=0, learning_rate=1e-5, save_strategy="no",
                          disable_tqdm=True, seed=0, bf16=True, use_cpu=True, report_to=[])
    model = AutoModelForCausalLM.from_pretrained(tiny_causal, dtype=torch.bfloat16)

    def varied(completions, **kwargs):  # non-zero advantages in every group
        return [float(i % 2) for i in range(len(completions))]

    trainer = Sa2VAGRPOTrainer(model=model, reward_funcs=[varied], args=cfg,
                               train_dataset=load_prompt_dataset(prompt_dir),
                               processing_class=AutoTokenizer.from_pretrained(tiny_causal))
    assert trainer.accelerator.mixed_precision == "bf16"
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}
    before = params(trainer.model)
    trainer.train()
    unchanged = [n for n, p in trainer.model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert not unchanged


def test_generation_pauses_checkpointing_restores_each_flag_and_leaks_no_hook(tiny_causal, prompt_dir, tmp_path):
    """The trainer's generation context (``_generation_model``): activation checkpointing is off while generating,
    each module's own flag comes back afterwards (a user's every_n_layers=2 pattern included, which TRL's
    disable/enable would reset to every layer), the input embedding gains no forward hook per generation (TRL's
    enable registers one each time), and the model generated from is the unwrapped model."""
    trainer = make_trainer(tiny_causal, prompt_dir, tmp_path)
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    model.activation_checkpointing_enable(every_n_layers=2)
    layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    before = [m.gradient_checkpointing for m in layers]
    assert True in before and False in before  # the pattern: some layers on, some off
    hooks = len(model.get_input_embeddings()._forward_hooks)
    seen = []

    class Recording(CausalLMPolicy):
        def generate(self, model_, *args, **kwargs):
            seen.append((model_, [m.gradient_checkpointing for m in layers]))
            return super().generate(model_, *args, **kwargs)

    trainer.policy = Recording(pad_token_id=trainer.processing_class.pad_token_id)
    for _ in range(3):
        trainer._generate_and_score_completions(group_batch(trainer))
    assert len(seen) == 3
    assert all(m is model and not any(flags) for m, flags in seen)
    assert [m.gradient_checkpointing for m in layers] == before
    assert len(model.get_input_embeddings()._forward_hooks) == hooks

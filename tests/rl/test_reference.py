"""The KL recipe (beta > 0): the reference for LoRA (adapters disabled, no copy) and full fine-tuning (a frozen copy),
on the tiny Sa2VA and the causal path; the k3 KL bounded like the policy ratio."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sa2va_rl.data.prompts import load_prompt_dataset
from sa2va_rl.models.sa2va import load_sa2va
from sa2va_rl.rl.config import Sa2VAGRPOConfig
from sa2va_rl.rl.reference import AdapterReference, bound_log_ratios, reference_bytes
from sa2va_rl.rl.trainer import Sa2VAGRPOTrainer
from tests.rl.test_sa2va_trainer import batch, distinct_words, make


def kl_per_step(trainer):
    return [h["kl"] for h in trainer.state.log_history if "kl" in h]


def scored(trainer, model, out):
    """Per-token logps of the generation ``out`` under ``model`` through the trainer's scoring seam."""
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
    att = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
    with torch.no_grad(), trainer._in_flight(trainer.last_generation):
        return trainer._get_per_token_logps_and_entropies(model, ids, att, out["completion_ids"].shape[1])[0]


def test_lora_reference_is_the_model_with_adapters_disabled_and_no_copy(tiny_sa2va, gar_dir, tmp_path):
    trainer = make(tiny_sa2va, gar_dir, tmp_path, lora_r=4, rewards=[distinct_words], beta=0.01, max_steps=3,
                   logging_steps=1)
    assert isinstance(trainer.ref_model, AdapterReference) and trainer.beta == 0.01
    assert reference_bytes(trainer.model, trainer.ref_model) == 0
    n_params = sum(p.numel() for p in trainer.model.parameters())
    trainer.train()
    assert sum(p.numel() for p in trainer.model.parameters()) == n_params  # no "ref" adapter, no copy
    kl = kl_per_step(trainer)
    # a fresh LoRA (B = 0) is the base model: pi = pi_ref at step 1, up to float noise (the reference is scored
    # without grad on the whole batch, the policy with grad); the step moves the policy away from it
    assert len(kl) == 3 and abs(kl[0]) < 1e-5 and kl[-1] > 100 * abs(kl[0])
    assert all(math.isfinite(k) for k in kl)
    # the reference scores as the base model without any adapter: a fresh load of the same checkpoint
    out = trainer._generate_and_score_completions(batch(trainer, rows=(0, 1)))
    base, _tok = load_sa2va(tiny_sa2va)
    trainer.model.eval()  # the tiny vision tower has dropout
    ref = scored(trainer, trainer.ref_model, out)
    assert torch.equal(ref, scored(trainer, base, out))
    assert not torch.equal(ref, scored(trainer, trainer.model, out))  # the adapters are back on afterwards


def test_full_finetune_reference_is_a_frozen_copy_sharing_frozen_weights(tiny_sa2va, gar_dir, tmp_path):
    trainer = make(tiny_sa2va, gar_dir, tmp_path, lora_r=0, rewards=[distinct_words], beta=0.01, max_steps=3,
                   logging_steps=1)
    ref, model = trainer.ref_model, trainer.model
    assert isinstance(ref, torch.nn.Module) and ref is not model
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training
    policy_params, ref_params = dict(model.named_parameters()), dict(ref.named_parameters())
    assert policy_params.keys() == ref_params.keys()
    for name, p in policy_params.items():  # trained ones copied, frozen ones (vision, mask decoder) shared
        assert (ref_params[name] is p) == (not p.requires_grad), name
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in ref.buffers())
    assert reference_bytes(model, ref) == trained + buffers
    before = {n: p.detach().clone() for n, p in ref_params.items()}
    trainer.train()
    assert all(torch.equal(before[n], p) for n, p in ref.named_parameters())  # the reference never moves
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved
    kl = kl_per_step(trainer)
    assert len(kl) == 3 and abs(kl[0]) < 1e-5 and kl[-1] > 100 * abs(kl[0])
    assert all(math.isfinite(k) for k in kl)


@pytest.mark.parametrize("lora", [False, True])
def test_causal_path_trains_with_beta(tiny_causal, prompt_dir, tmp_path, lora):
    from peft import LoraConfig

    torch.manual_seed(0)
    cfg = Sa2VAGRPOConfig(output_dir=str(tmp_path), max_steps=2, batch_size=2, num_generations=4,
                          max_completion_length=6, warmup_steps=0, learning_rate=1e-2, save_strategy="no",
                          disable_tqdm=True, seed=0, report_to=[], beta=0.01)
    trainer = Sa2VAGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_causal), reward_funcs=[distinct_words], args=cfg,
        train_dataset=load_prompt_dataset(prompt_dir), processing_class=AutoTokenizer.from_pretrained(tiny_causal),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if lora else None)
    assert isinstance(trainer.ref_model, AdapterReference) == lora
    trainer.train()
    kl = kl_per_step(trainer)
    assert len(kl) == 2 and abs(kl[0]) < 1e-5 and math.isfinite(kl[1]) and kl[1] > 100 * abs(kl[0])


def test_k3_kl_and_ratio_bounded_straight_through():
    c = 20.0
    x = torch.zeros(4, requires_grad=True)
    ref = torch.tensor([100.0, -100.0, 0.5, 0.0])
    y = bound_log_ratios(x, None, ref, c)
    assert y.tolist() == [80.0, -80.0, 0.0, 0.0]  # |log pi_ref - log pi| <= c; untouched where it already was
    r = ref - y
    k3 = torch.exp(r) - r - 1
    assert torch.isfinite(k3).all() and float(k3.max()) == pytest.approx(math.exp(c) - c - 1, rel=1e-6)
    y.sum().backward()
    assert x.grad.tolist() == [1.0] * 4  # the gradient is kept
    # with pi_old too: the ratio exp(logp - old) stays <= e^c even where old and ref are > 2c apart
    old = torch.tensor([0.0, 0.0, 0.0, 0.0])
    logp = torch.tensor([50.0, -50.0, 0.0, 30.0])
    ref = torch.tensor([0.0, 0.0, 0.0, 60.0])
    assert bound_log_ratios(logp, old, ref, c).tolist() == [20.0, -20.0, 0.0, 20.0]
    assert torch.equal(bound_log_ratios(logp[2:3], old[2:3], ref[2:3], c), logp[2:3])


def test_sync_ref_model_with_lora_is_refused(tiny_sa2va, gar_dir, tmp_path):
    with pytest.raises(ValueError, match="sync_ref_model with a LoRA model"):
        make(tiny_sa2va, gar_dir, tmp_path, lora_r=4, rewards=[distinct_words], beta=0.01, sync_ref_model=True)


def test_beta_zero_builds_no_reference(tiny_sa2va, gar_dir, tmp_path):
    trainer = make(tiny_sa2va, gar_dir, tmp_path, lora_r=0, rewards=[distinct_words])
    assert trainer.ref_model is None and trainer.beta == 0.0

"""plan.py: sizes read from config.json and the weight headers equal the loaded model's; the KV-cache part equals
the cache generate() builds; LoRA's trained count equals peft's; the largest G is the boundary of the budget; and
`sa2va-rl plan` / `train` say so before anything loads."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from sa2va_rl import cli
from sa2va_rl.models.sa2va import Sa2VAModelArgs, load_sa2va, prepare_for_training
from sa2va_rl.plan import (GiB, LINEAR_NAMES, PlanError, RunShape, estimate, largest_fitting, read_dims,
                           trained_params)


def test_dims_and_parameter_counts_equal_the_loaded_models(tiny_causal, tiny_sa2va):
    causal = AutoModelForCausalLM.from_pretrained(tiny_causal)
    d = read_dims(tiny_causal)
    assert d.params == d.llm_params == sum(p.numel() for p in causal.parameters())
    c = causal.config
    assert (d.hidden, d.layers, d.heads, d.kv_heads, d.ffn, d.vocab, d.context) == (
        c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
        c.vocab_size, c.max_position_embeddings)
    assert d.image_tokens == d.min_image_tokens == 0
    model, _ = load_sa2va(tiny_sa2va)
    s = read_dims(tiny_sa2va)
    assert s.params == sum(p.numel() for p in model.parameters())
    assert s.llm_params == sum(p.numel() for p in model.language_model.parameters())
    assert s.text_hidden_fcs == sum(p.numel() for p in model.text_hidden_fcs.parameters())
    cfg = model.config  # 16 image tokens per tile (32 px / 4 px patches, downsampled 0.5), max tiles + thumbnail
    per_tile = int((cfg.force_image_size // cfg.patch_size) ** 2 * cfg.downsample_ratio ** 2)
    assert (s.min_image_tokens, s.image_tokens) == (per_tile, per_tile * (cfg.max_dynamic_patch + 1))
    assert read_dims(tiny_sa2va, max_tiles=1).image_tokens == per_tile  # one tile: no thumbnail


@pytest.mark.parametrize("targets", ["auto", "q_proj,v_proj"])
def test_lora_trained_count_equals_peft(tiny_sa2va, targets):
    margs = Sa2VAModelArgs(lora_r=8, lora_alpha=16, lora_target_modules=targets)
    model, _ = load_sa2va(tiny_sa2va)
    prepare_for_training(model, margs, mask_loss=True)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    d = read_dims(tiny_sa2va)
    shape = RunShape(rows=1, generation_rows=1, prompt_tokens=1, completion_tokens=1, lora_r=8,
                     lora_targets=() if targets == "auto" else tuple(targets.split(",")),
                     extra_trained=d.text_hidden_fcs)
    assert trained_params(d, shape) == trained
    full = RunShape(rows=1, generation_rows=1, prompt_tokens=1, completion_tokens=1, lora_r=0)
    assert trained_params(d, full) == d.llm_params


def test_kv_cache_part_equals_the_cache_generate_builds(tiny_causal):
    model = AutoModelForCausalLM.from_pretrained(tiny_causal).eval()
    d = read_dims(tiny_causal)
    rows, prompt, new = 3, 5, 7
    ids = torch.randint(3, 50, (rows, prompt))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), return_dict_in_generate=True, use_cache=True,
                         generation_config=GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                                            pad_token_id=0, eos_token_id=None))
    cache = out.past_key_values
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    # the cache holds every token but the last generated one (its K/V are never needed)
    shape = RunShape(rows=rows, generation_rows=rows, prompt_tokens=prompt, completion_tokens=new - 1)
    assert estimate(d, shape).parts["kv_cache"] == held


def test_parts_follow_the_engine_and_the_largest_g_is_the_budgets_boundary(tiny_causal):
    d = read_dims(tiny_causal)
    base = RunShape(rows=8, generation_rows=8, prompt_tokens=16, completion_tokens=64, lora_r=0)
    one = estimate(d, base).parts
    assert one["weights"] == d.params * 4 and one["grads+adam"] == d.params * 12 and one["reference"] == 0
    z3 = estimate(d, RunShape(**{**base.__dict__, "engine": "zero3", "devices": 4})).parts
    z2 = estimate(d, RunShape(**{**base.__dict__, "engine": "zero2", "devices": 4})).parts
    assert z3["weights"] == one["weights"] // 4 and z3["grads+adam"] == one["grads+adam"] // 4
    assert z2["weights"] == one["weights"] and z2["grads+adam"] == one["grads+adam"] // 4
    assert estimate(d, RunShape(**{**base.__dict__, "beta": 0.04})).parts["reference"] == d.params * 4
    ckpt = estimate(d, RunShape(**{**base.__dict__, "gradient_checkpointing": True})).parts
    assert ckpt["activations"] < one["activations"]
    budget = int(0.05 * GiB)
    best = largest_fitting(d, base, budget, runtime=0, per=2)
    fits = lambda g: estimate(d, RunShape(**{**base.__dict__, "rows": 2 * g, "generation_rows": 2 * g})).total
    assert best >= 2 and fits(best) <= budget < fits(best + 1)
    with pytest.raises(PlanError, match="engine 'zero4'"):
        estimate(d, RunShape(**{**base.__dict__, "engine": "zero4"}))


def test_a_checkpoint_without_safetensors_cannot_be_sized(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(PlanError, match="no \\*.safetensors weights"):
        read_dims(str(tmp_path))


def test_linear_names_cover_every_lora_target():
    from sa2va_rl.models.sa2va import DEFAULT_LORA_TARGETS, LORA_TARGETS

    for targets in [DEFAULT_LORA_TARGETS, *LORA_TARGETS.values()]:
        assert set(targets.split(",")) <= set(LINEAR_NAMES)


def test_plan_command_prints_the_parts_and_the_largest_g(tiny_sa2va, capsys):
    rc = cli.main(["plan", "--model_path", tiny_sa2va, "--batch_size", "2", "--num_generations", "4",
                   "--max_completion_length", "32", "--device_memory", "64"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for part in ("runtime", "weights", "grads+adam", "reference", "kv_cache", "activations", "total"):
        assert f"  {part}" in out
    assert "2 prompt(s) x 4 generations per device step" in out and "of 64.00 GiB" in out
    rc = cli.main(["plan", "--model_path", tiny_sa2va, "--batch_size", "2", "--num_generations", "100000",
                   "--max_completion_length", "32", "--device_memory", "16"])  # room beside this process's RSS
    out = capsys.readouterr().out
    assert rc == 1 and "is more than --device_memory 16 GiB allows" in out, out
    best = int(out.split("the largest --num_generations that fits is ")[1].split()[0])
    assert 2 <= best < 100000, out
    rc = cli.main(["plan", "--model_path", tiny_sa2va, "--engine", "zero4"])
    assert rc == cli.EXIT_USAGE and "--engine 'zero4'" in capsys.readouterr().err


def test_total_is_what_is_held_plus_the_larger_of_a_step_and_the_final_save(tiny_sa2va, tmp_path):
    from sa2va_rl.plan import MemoryPlan, check_limits
    from sa2va_rl.rl.config import Sa2VAGRPOConfig

    plan = MemoryPlan({"runtime": 1, "weights": 10, "grads+adam": 5, "reference": 0, "kv_cache": 2,
                       "activations": 3, "save_copy": 4})
    assert plan.total == 16 + 5
    plan.parts["save_copy"] = 9
    assert plan.total == 16 + 9
    d = read_dims(tiny_sa2va)
    assert d.stored_bytes == d.params * 4  # the tiny Sa2VA is stored in fp32
    config = Sa2VAGRPOConfig(output_dir=str(tmp_path), batch_size=2, num_generations=2, max_completion_length=8)
    same = check_limits(tiny_sa2va, config, Sa2VAModelArgs(), budget=GiB)  # fp32 in memory, fp32 saved: no copy
    assert same.plan.parts["save_copy"] == 0
    bf16 = check_limits(tiny_sa2va, config, Sa2VAModelArgs(save_dtype="bfloat16"), budget=GiB)
    assert bf16.plan.parts["save_copy"] == d.params * 2

"""What TRL users expect (issue N, item 1): options of TRL's GRPOTrainer behave as in stock TRL 1.16, or are refused
at start by name (docs/trl_parity.md). Tiny models built from transformers configs, random weights, no download."""

import copy

import numpy as np
import pytest
import torch
import trl
from datasets import Dataset
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM
from trl import GRPOConfig, GRPOTrainer

from sa2va_rl.data.prompts import load_prompt_dataset
from sa2va_rl.models.policy import CausalLMPolicy
from sa2va_rl.rl import spikes
from sa2va_rl.rl.config import Sa2VAGRPOConfig
from sa2va_rl.rl.trainer import Sa2VAGRPOTrainer

SHARED = dict(max_steps=1, per_device_train_batch_size=4, num_generations=2, max_completion_length=6,
              learning_rate=1e-2, warmup_steps=0, save_strategy="no", disable_tqdm=True, seed=0, report_to="none",
              bf16=False, logging_steps=1)


def length_reward(completions, **kwargs):
    return [float(len(str(c))) for c in completions]


def pair(out, model, dataset, processing_class, reward=length_reward, **overrides):
    """(stock TRL's trainer, ours) on copies of one model, same config fields."""
    kw = {**SHARED, **overrides}
    torch.manual_seed(0)
    stock = GRPOTrainer(model=copy.deepcopy(model), reward_funcs=[reward], train_dataset=dataset,
                        processing_class=processing_class, args=GRPOConfig(output_dir=str(out / "stock"), **kw))
    torch.manual_seed(0)
    ours = Sa2VAGRPOTrainer(model=copy.deepcopy(model), reward_funcs=[reward], train_dataset=dataset,
                            processing_class=processing_class,
                            args=Sa2VAGRPOConfig(output_dir=str(out / "ours"), stability_summary_steps=0, **kw))
    return stock, ours


def scoring_args(inputs):
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    mm = {k: inputs[k] for k in ("pixel_values", "image_grid_thw", "num_images", "token_type_ids",
                                 "mm_token_type_ids", "image_sizes") if inputs.get(k) is not None}
    return ids, mask, inputs["completion_ids"].shape[1], mm


# ---------------------------------------------------------------------------------------------- (1) plain VLMs
@pytest.fixture(scope="module")
def tiny_qwen2_vl():
    """A ~200k-parameter Qwen2-VL and its processor (Qwen2VLProcessor with transformers' PIL image processor, the
    Qwen2-VL chat template, a word tokenizer carrying Qwen's vision tokens), built in code."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    from tests.upstream.qwen_vl import QWEN2_5_VL_TEMPLATE, SPECIAL, _images_only, image_processor, tokenizer

    tok = tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    processor = _images_only(Qwen2VLProcessor)(image_processor=image_processor("qwen2_5_vl"), tokenizer=tok,
                                               video_processor=None, chat_template=QWEN2_5_VL_TEMPLATE)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, in_channels=3,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg)
    rng = np.random.default_rng(0)
    # two image sizes: rows hold different numbers of patches, so a chunk's slice of pixel_values is not uniform
    rows = [{"prompt": [{"role": "user", "content": "Describe the picture"}],
             "image": Image.fromarray(rng.integers(0, 255, (56, 56 + 28 * (i % 2), 3), dtype=np.uint8))}
            for i in range(4)]
    return model, processor, Dataset.from_list(rows)


def vlm_batch(trainer, dataset):
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return [dict(dataset[i]) for i in range(2) for _ in range(trainer.num_generations)]


def test_vlm_generates_and_scores_with_its_images_as_stock_trl(tiny_qwen2_vl, tmp_path):
    model, processor, data = tiny_qwen2_vl
    stock, ours = pair(tmp_path, model, data, processor)
    seen = []
    hook = ours.model.model.visual.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    inputs = ours._generate_and_score_completions(vlm_batch(ours, data))
    hook.remove()
    assert seen, "generation never ran the vision tower: the prompts' image tokens had no pixels"
    ids, mask, K, mm = scoring_args(inputs)
    assert {"pixel_values", "image_grid_thw", "num_images"} <= set(mm)
    with torch.no_grad():
        ref, ref_ent, _ = stock._get_per_token_logps_and_entropies(stock.model, ids, mask, K, compute_entropy=True,
                                                                   **mm)
        got, got_ent, _ = ours._get_per_token_logps_and_entropies(ours.model, ids, mask, K, compute_entropy=True,
                                                                  **mm)
        # chunks of 3 rows: each chunk gets its own rows' patches (TRL's slicing by image_grid_thw)
        chunked, _, _ = ours._get_per_token_logps_and_entropies(ours.model, ids, mask, K, batch_size=3, **mm)
        blind, _, _ = ours._get_per_token_logps_and_entropies(ours.model, ids, mask, K)
    keep = inputs["completion_mask"].bool()
    torch.testing.assert_close(got[keep], ref[keep], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_ent[keep], ref_ent[keep], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(chunked[keep], got[keep], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(blind[keep], got[keep], atol=1e-3), "the images made no difference to the logps"


def test_vlm_vision_tower_trains(tiny_qwen2_vl, tmp_path):
    model, processor, data = tiny_qwen2_vl
    torch.manual_seed(0)
    trainer = Sa2VAGRPOTrainer(model=copy.deepcopy(model), reward_funcs=[length_reward], train_dataset=data,
                               processing_class=processor,
                               args=Sa2VAGRPOConfig(output_dir=str(tmp_path), stability_summary_steps=0, **SHARED))
    visual = {n: p.detach().clone() for n, p in trainer.model.model.visual.named_parameters()}
    grads = {}
    for n, p in trainer.model.model.visual.named_parameters():
        p.register_hook(lambda g, n=n: grads.__setitem__(n, g.abs().sum().item()))
    trainer.train()
    assert grads and any(v > 0 for v in grads.values()), grads
    changed = [n for n, p in trainer.model.model.visual.named_parameters() if not torch.equal(p, visual[n])]
    assert changed, "no vision parameter moved after a step"


def test_vlm_processor_refused_by_a_policy_that_cannot_take_images(tiny_qwen2_vl, tmp_path):
    model, processor, data = tiny_qwen2_vl

    class TextOnly(CausalLMPolicy):
        def logprobs(self, model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=1.0,
                     drop_mask=None, contexts=None, compute_entropy=True):
            return super().logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature,
                                    drop_mask, contexts, compute_entropy)

    with pytest.raises(ValueError, match="Qwen2VLProcessor.*pixels"):
        Sa2VAGRPOTrainer(model=copy.deepcopy(model), reward_funcs=[length_reward], train_dataset=data,
                         processing_class=processor, policy=TextOnly(pad_token_id=0),
                         args=Sa2VAGRPOConfig(output_dir=str(tmp_path), **SHARED))


# ------------------------------------------------------------------------------------------ (2) MoE aux loss
def tiny_moe(vocab: int):
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_experts=4, num_experts_per_tok=2, max_position_embeddings=256, pad_token_id=0,
                         eos_token_id=2, bos_token_id=None, tie_word_embeddings=False)
    return Qwen3MoeForCausalLM(cfg)


def test_moe_router_aux_loss_matches_stock_trl_and_is_logged(tiny_causal, prompt_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_causal)
    stock, ours = pair(tmp_path, tiny_moe(len(tok)), load_prompt_dataset(prompt_dir), tok, max_steps=2)
    assert ours.aux_loss_enabled and ours.router_aux_loss_coef == pytest.approx(0.001)
    ours.current_gradient_accumulation_steps = 1
    ours.model.train()
    inputs = ours._generate_and_score_completions([dict(ours.train_dataset[i]) for i in range(2) for _ in range(2)])
    ids, mask, K, _ = scoring_args(inputs)
    stock.model.train()
    _, _, ref = stock._get_per_token_logps_and_entropies(stock.model, ids, mask, K, batch_size=2,
                                                         compute_aux_loss=True)
    _, _, got = ours._get_per_token_logps_and_entropies(ours.model, ids, mask, K, batch_size=2,
                                                        compute_aux_loss=True)
    assert got is not None and got.requires_grad
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    ours.train()
    assert all(h.get("aux_loss") is not None for h in ours.state.log_history if "reward" in h)
    assert any("aux_loss" in h for h in ours.state.log_history)


def test_moe_aux_loss_refused_by_a_policy_that_cannot_return_it(tiny_causal, prompt_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_causal)

    class NoAux(CausalLMPolicy):
        def logprobs(self, model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=1.0,
                     drop_mask=None, contexts=None, compute_entropy=True, entropy_grad=False):
            return super().logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature,
                                    drop_mask, contexts, compute_entropy, entropy_grad)

    args = dict(output_dir=str(tmp_path), **SHARED)
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        Sa2VAGRPOTrainer(model=tiny_moe(len(tok)), reward_funcs=[length_reward], policy=NoAux(pad_token_id=0),
                         train_dataset=load_prompt_dataset(prompt_dir), processing_class=tok,
                         args=Sa2VAGRPOConfig(**args))
    # the way out the message names
    Sa2VAGRPOTrainer(model=tiny_moe(len(tok)), reward_funcs=[length_reward], policy=NoAux(pad_token_id=0),
                     train_dataset=load_prompt_dataset(prompt_dir), processing_class=tok,
                     args=Sa2VAGRPOConfig(router_aux_loss_coef=0.0, **args))


# ------------------------------------------------------------------------------- (3) options refused by name
@pytest.mark.parametrize("kwargs, name", [({"num_beams": 2}, "num_beams"),
                                          ({"num_return_sequences": 2}, "num_return_sequences"),
                                          ({"prompt_lookup_num_tokens": 3}, "assistant_model"),
                                          ({"assistant_early_exit": 1}, "assistant_model")])
def test_generation_kwargs_that_change_the_rows_are_refused_by_name(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=rf"generation_kwargs\['{name}'.*trl_parity"):
        Sa2VAGRPOConfig(output_dir=str(tmp_path), generation_kwargs={"do_sample": True, **kwargs})
    Sa2VAGRPOConfig(output_dir=str(tmp_path), generation_kwargs={"top_k": 50, "num_beams": 1})  # honoured


# ------------------------------------------------------------------------------------ (4) reward_funcs optional
def test_reward_funcs_is_optional_as_in_trl(tiny_causal, prompt_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_causal)
    data = load_prompt_dataset(prompt_dir)
    kw = dict(output_dir=str(tmp_path), **SHARED)
    # no reward source at all: TRL's own error, from both (not a TypeError about None)
    with pytest.raises(ValueError, match="No reward source provided") as stock_error:
        GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_causal), train_dataset=data,
                    processing_class=tok, args=GRPOConfig(**kw))
    with pytest.raises(ValueError, match="No reward source provided") as our_error:
        Sa2VAGRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_causal), train_dataset=data,
                         processing_class=tok, args=Sa2VAGRPOConfig(**kw))
    assert str(our_error.value) == str(stock_error.value)
    # the same signature: reward_funcs may be left out (an environment_factory whose environments define
    # get_reward is then the reward source; TRL needs a tool-calling chat template for those, which the tiny
    # tokenizer lacks)
    import inspect

    assert inspect.signature(Sa2VAGRPOTrainer).parameters["reward_funcs"].default is None
    assert inspect.signature(GRPOTrainer).parameters["reward_funcs"].default is None


# -------------------------------------------------------------------------------------------- (5) logging
def test_last_log_entry_holds_trls_keys_with_trls_logging_steps(tiny_causal, prompt_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_causal)

    def other_reward(completions, **kwargs):
        return [float(len(set(str(c)))) for c in completions]

    trainer = Sa2VAGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_causal), reward_funcs=[length_reward, other_reward],
        train_dataset=load_prompt_dataset(prompt_dir), processing_class=tok,
        args=Sa2VAGRPOConfig(output_dir=str(tmp_path), **{**SHARED, "max_steps": 3, "logging_steps": 10},
                             entropy_coef=0.1, reward_weights=[0.7, 0.3]))
    trainer.train()
    last = trainer.state.log_history[-1]
    assert last["train_loss"] is not None
    for key in ("reward", "rewards/length_reward/mean", "rewards/length_reward/std", "rewards/other_reward/mean",
                "policy_loss", "entropy_coef"):
        assert last.get(key) is not None, (key, sorted(last))
    help_text = Sa2VAGRPOConfig.__dataclass_fields__["logging_steps"].metadata["help"]
    assert "TRL" in help_text and "10" in help_text
    assert Sa2VAGRPOConfig.__dataclass_fields__["logging_steps"].default == 1


# ------------------------------------------------------------------------------------------- (6) row_index
def test_rows_reach_trl_and_reward_functions_without_row_index(tiny_causal, prompt_dir, tmp_path, monkeypatch):
    tok = AutoTokenizer.from_pretrained(tiny_causal)
    seen_rows, seen_kwargs = [], []
    stock_prepare = trl.GRPOTrainer._prepare_inputs

    def spy(self, generation_batch):
        seen_rows.extend(set(x) for x in generation_batch)
        return stock_prepare(self, generation_batch)

    monkeypatch.setattr(trl.GRPOTrainer, "_prepare_inputs", spy)

    def reward(completions, **kwargs):
        seen_kwargs.append(set(kwargs))
        return length_reward(completions)

    trainer = Sa2VAGRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_causal), reward_funcs=[reward],
                               train_dataset=load_prompt_dataset(prompt_dir), processing_class=tok,
                               args=Sa2VAGRPOConfig(output_dir=str(tmp_path), **{**SHARED, "max_steps": 2}))
    assert isinstance(trainer.train_dataset, spikes.IndexedRows)  # the rows do carry it out of the dataset
    trainer.train()
    assert seen_rows and seen_kwargs
    assert all(spikes.ROW_KEY not in keys for keys in seen_rows + seen_kwargs)
    # the data skip still knows which rows each step consumed
    assert [s for s, _ in trainer.data_skip.consumed] == [1, 2]
    assert all(rows for _, rows in trainer.data_skip.consumed)


# ---------------------------------------------------------------------------------------- (7) entropy bonus
def test_entropy_bonus_carries_a_gradient_as_in_trl(tiny_causal, prompt_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_causal)
    model = AutoModelForCausalLM.from_pretrained(tiny_causal)
    data = load_prompt_dataset(prompt_dir)
    stock, ours = pair(tmp_path, model, data, tok, entropy_coef=0.1)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    mask = torch.ones_like(ids)
    _, ent, _ = ours._get_per_token_logps_and_entropies(ours.model, ids, mask, 4, compute_entropy=True)
    _, ref, _ = stock._get_per_token_logps_and_entropies(stock.model, ids, mask, 4, compute_entropy=True)
    assert ent.requires_grad
    torch.testing.assert_close(ent, ref, atol=1e-4, rtol=1e-4)
    ours._entropy_bonus_enabled = False
    _, ent, _ = ours._get_per_token_logps_and_entropies(ours.model, ids, mask, 4, compute_entropy=True)
    assert not ent.requires_grad  # off: no [n, V] graph kept for a metric
    ours._entropy_bonus_enabled = True

    # the option changes the gradient: same batch, the loss's gradient with and without the bonus
    ours.current_gradient_accumulation_steps = 1
    ours.model.train()
    inputs = ours._generate_and_score_completions([dict(ours.train_dataset[i]) for i in range(2) for _ in range(2)])

    def grad(coef):
        ours.entropy_coef = coef
        ours.model.zero_grad(set_to_none=True)
        ours.compute_loss(ours.model, inputs).backward()
        return torch.cat([p.grad.flatten() for p in ours.model.parameters() if p.grad is not None])

    with_bonus, without = grad(0.1), grad(0.0)
    assert not torch.allclose(with_bonus, without)


def test_entropy_bonus_refused_by_a_policy_without_entropy_gradients(tiny_causal, prompt_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_causal)

    class NoEntropyGrad(CausalLMPolicy):
        def logprobs(self, model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=1.0,
                     drop_mask=None, contexts=None, compute_entropy=True):
            return super().logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature,
                                    drop_mask, contexts, compute_entropy)

    for opt in ({"entropy_coef": 0.1}, {"use_adaptive_entropy": True}):
        with pytest.raises(ValueError, match="entropy_coef / use_adaptive_entropy"):
            Sa2VAGRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_causal), reward_funcs=[length_reward],
                             policy=NoEntropyGrad(pad_token_id=0), train_dataset=load_prompt_dataset(prompt_dir),
                             processing_class=tok, args=Sa2VAGRPOConfig(output_dir=str(tmp_path), **SHARED, **opt))


# ----------------------------------------------------------------------- (7) rollout_func, tool-calling turns
def test_rollout_func_refused_by_name(tiny_causal, prompt_dir, tmp_path):
    """TRL's _generate calls rollout_func instead of _generate_single_turn: completions from outside the Policy and
    its LogitsGuard. Refused at start, naming the option; stock TRL accepts it."""
    tok = AutoTokenizer.from_pretrained(tiny_causal)
    data = load_prompt_dataset(prompt_dir)

    def rollout(prompts, trainer):
        return {"prompt_ids": [[1]] * len(prompts), "completion_ids": [[2]] * len(prompts),
                "logprobs": [[0.0]] * len(prompts)}

    kw = dict(output_dir=str(tmp_path), **SHARED)
    stock = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_causal), reward_funcs=[length_reward],
                        train_dataset=data, processing_class=tok, args=GRPOConfig(**kw), rollout_func=rollout)
    assert stock.rollout_func is rollout
    with pytest.raises(ValueError, match=r"^rollout_func: not supported by Sa2VAGRPOTrainer.*trl_parity"):
        Sa2VAGRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_causal), reward_funcs=[length_reward],
                         train_dataset=data, processing_class=tok, args=Sa2VAGRPOConfig(**kw), rollout_func=rollout)


def test_tool_turns_keep_trls_tool_mask_and_each_turns_repaired_tokens():
    """With tools, TRL's tool loop calls _generate_single_turn once per turn, on the rows that called a tool, and
    builds tool_mask (0 = tool result). The drop flags of every turn land on that turn's tokens; tool results stay 0.
    Rows: 0 no tool call; 1 two tool calls; 2 one tool call, its post-tool turn truncated to 2 of 3 tokens; 3 one
    tool call whose post-tool turn was truncated to nothing."""
    from sa2va_rl.rl.step_record import merge_turn_drops

    T, F = True, False
    turns = [[[F, T], [F, F, T], [T, F], [F]],  # call 1: every row
             [[T, F], [F, T, F], [F]],          # call 2: rows 1, 2, 3 (one tool result or more), in row order
             [[F, T]]]                          # call 3: row 1 only (two tool results)
    tool_mask = [[1, 1],
                 [1, 1, 1, 0, 0, 1, 1, 0, 1, 1],
                 [1, 1, 0, 0, 0, 1, 1],
                 [1, 0, 0]]
    merged = merge_turn_drops(turns, tool_mask)
    assert merged == [[F, T],
                      [F, F, T, F, F, T, F, F, F, T],
                      [T, F, F, F, F, F, T],
                      [F, F, F]]
    assert [len(r) for r in merged] == [len(m) for m in tool_mask]
    # no tools: the single turn's flags, unchanged
    assert merge_turn_drops([turns[0]], None) == turns[0]
    # a mask with more tool results than turns is a bookkeeping error, not silently misaligned
    with pytest.raises(ValueError, match="2 tool result"):
        merge_turn_drops(turns[:2], [[1, 0, 1, 0, 1]])

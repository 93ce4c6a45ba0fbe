"""StepRecord: built from TRL's rows, installed and cleared by the trainer once per generation batch and loss batch."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sa2va_rl.data.prompts import load_prompt_dataset
from sa2va_rl.rl.config import Sa2VAGRPOConfig
from sa2va_rl.rl.step_record import StepRecord, drop_tensor
from sa2va_rl.rl.trainer import Sa2VAGRPOTrainer


def test_generation_record_keeps_contexts_only_when_rows_carry_them():
    assert StepRecord.generation([{"prompt": "a"}, {"prompt": "b", "visual": None}]).contexts is None
    v = object()
    assert StepRecord.generation([{"prompt": "a"}, {"prompt": "b", "visual": v}]).contexts == [None, v]


def test_loss_record_reads_drops_contexts_and_refs_from_the_sub_batch():
    old = torch.zeros(2, 3, dtype=torch.bfloat16)
    r = StepRecord.loss({"tool_mask": torch.tensor([[1, 0, 1], [1, 1, 1]]), "visual": ["v0", "v1"],
                         "old_per_token_logps": old, "ref_per_token_logps": None})
    assert r.drop_mask.tolist() == [[False, True, False], [False, False, False]] and r.contexts == ["v0", "v1"]
    assert list(r.refs) == ["old_per_token_logps"] and r.refs["old_per_token_logps"].dtype == torch.float32
    bare = StepRecord.loss({})
    assert bare.drop_mask is None and bare.contexts is None and bare.refs == {}  # {}: the clamp still applies


def test_drop_tensor_right_pads_with_false():
    m = drop_tensor([[True], [False, True, False], []], torch.device("cpu"))
    assert m.tolist() == [[True, False, False], [False, True, False], [False, False, False]]
    assert drop_tensor([], torch.device("cpu")).shape == (0, 0)


def test_trainer_holds_one_record_per_generation_and_per_loss_batch_and_clears_it(tiny_causal, prompt_dir, tmp_path):
    torch.manual_seed(0)
    cfg = Sa2VAGRPOConfig(output_dir=str(tmp_path), max_steps=1, batch_size=2, num_generations=4,
                          max_completion_length=8, warmup_steps=0, save_strategy="no", disable_tqdm=True, seed=0)
    trainer = Sa2VAGRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_causal),
                               reward_funcs=[lambda completions, **kw: [float(len(c)) for c in completions]],
                               args=cfg, train_dataset=load_prompt_dataset(prompt_dir),
                               processing_class=AutoTokenizer.from_pretrained(tiny_causal))
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    seen = []
    scoring = trainer._get_per_token_logps_and_entropies

    def spy(*a, **k):
        seen.append(trainer.record)
        return scoring(*a, **k)

    trainer._get_per_token_logps_and_entropies = spy
    rows = [dict(trainer.train_dataset[i]) for i in range(2) for _ in range(4)]
    out = trainer._generate_and_score_completions(rows)
    empty = StepRecord()
    assert trainer.record == empty  # cleared when the generation batch is done
    gen = trainer.last_generation
    assert len(gen.prompt_ids) == 8 and gen.rewards_per_func.shape == (8, 1)
    assert torch.equal(gen.drop_mask, out["tool_mask"] == 0)  # the same drops, on to the loss as tool_mask
    assert all(r is gen for r in seen)  # pi_old/pi_ref scoring, if any, read the generation's record
    seen.clear()
    trainer.compute_loss(trainer.model, out)
    assert trainer.record == empty and len(seen) == 1 and seen[0] is not gen and seen[0].refs is not None
    assert torch.equal(seen[0].drop_mask, out["tool_mask"] == 0)

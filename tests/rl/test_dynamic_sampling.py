"""Dynamic sampling (DAPO): zero-std groups dropped and refilled from the data, counted."""

import math

import pytest
import torch

from sa2va_rl.rl.config import Sa2VAGRPOConfig
from sa2va_rl.rl.dynamic_sampling import merge_groups, zero_std_groups
from tests.rl.test_trainer import group_batch, make_trainer, stability_json

FLAT = {"white", "black", "red", "green"}  # prompts whose solution starts with one of these get one reward for all


def flat_or_varied(completions, solution=None, **kwargs):
    """No signal (every completion 0.5) for prompts whose solution starts with a FLAT colour; the number of
    distinct words otherwise, which varies within a group."""
    return [0.5 if s.split()[0] in FLAT else len(set(c.split())) / 10.0 for c, s in zip(completions, solution)]


def test_zero_std_groups_weighted_nan_aware():
    nan = math.nan
    rpf = torch.tensor([[1.0, 0.0], [1.0, 0.0],  # equal: zero std
                        [1.0, 0.0], [0.0, 1.0],  # weights 1, 1: equal sums -> zero std
                        [1.0, nan], [0.5, nan],  # a signal
                        [nan, nan], [nan, nan]])  # no reward at all: no signal
    assert zero_std_groups(rpf, torch.tensor([1.0, 1.0]), 2).tolist() == [True, True, False, True]
    assert zero_std_groups(rpf, torch.tensor([1.0, 2.0]), 2).tolist() == [True, False, False, True]


def test_merge_groups_repads_and_keeps_rows_aligned():
    def out(n_rows, p, c, base):
        return {"prompt_ids": torch.full((n_rows, p), base), "prompt_mask": torch.ones(n_rows, p, dtype=torch.long),
                "completion_ids": torch.full((n_rows, c), base + 1), "completion_mask": torch.ones(n_rows, c),
                "tool_mask": torch.ones(n_rows, c), "advantages": torch.arange(n_rows).float() + base,
                "ref_per_token_logps": torch.full((n_rows, c), -1.0), "num_items_in_batch": torch.tensor(0),
                "visual": [f"v{base}-{i}" for i in range(n_rows)]}

    a, b = out(4, 3, 2, 10), out(2, 5, 4, 20)  # G = 2: a has groups 0, 1; b has group 0
    m = merge_groups([a, b], [(0, 0), (1, 0)], 2, pad_token_id=0)
    assert m["prompt_ids"].tolist() == [[0, 0, 10, 10, 10]] * 2 + [[20] * 5] * 2  # prompts padded on the left
    assert m["prompt_mask"].tolist() == [[0, 0, 1, 1, 1]] * 2 + [[1] * 5] * 2
    assert m["completion_ids"].tolist() == [[11, 11, 0, 0]] * 2 + [[21] * 4] * 2  # completions on the right
    assert m["completion_mask"].sum().item() == 2 * 2 + 2 * 4 == m["num_items_in_batch"].item()
    assert m["ref_per_token_logps"][0].tolist() == [-1.0, -1.0, 0.0, 0.0]
    assert m["advantages"].tolist() == [10.0, 11.0, 20.0, 21.0] and m["visual"] == ["v10-0", "v10-1", "v20-0", "v20-1"]


def test_zero_std_groups_are_refilled_with_groups_that_carry_a_signal(tiny_causal, prompt_dir, tmp_path):
    trainer = make_trainer(tiny_causal, prompt_dir, tmp_path, reward=flat_or_varied, batch_size=4,
                           dynamic_sampling=True)
    G = trainer.num_generations
    rows = group_batch(trainer, n_prompts=4)
    flat = [r["solution"].split()[0] in FLAT for r in rows[::G]]
    assert any(flat) and not all(flat)  # the fixture's first prompts mix both kinds
    out = trainer._generate_and_score_completions(rows)
    counts = trainer.stability.counters.dynamic_sampling
    assert counts["groups"] == 4 and counts["zero_std_groups"] == sum(flat)
    assert counts["refilled_groups"] + counts["unfilled_groups"] == sum(flat) and counts["refilled_groups"] > 0
    assert counts["extra_groups"] >= counts["refilled_groups"]
    record = trainer.last_generation
    left = zero_std_groups(record.rewards_per_func, trainer.reward_weights, G)
    assert int(left.sum()) == counts["unfilled_groups"]
    tok = trainer.processing_class
    prompts = [tok.decode(p[m.bool()]) for p, m in zip(out["prompt_ids"], out["prompt_mask"])]
    for g, was_flat in enumerate(flat):  # groups with a signal kept their places; refills have a signal
        if not was_flat:
            assert prompts[g * G] == rows[g * G]["prompt"]
        elif not left[g]:
            assert prompts[g * G].split(": ")[1].split()[0] not in FLAT
    assert out["completion_ids"].shape[0] == 4 * G and len(set(prompts[g * G] for g in range(4))) >= 2
    assert out["num_items_in_batch"].item() == (out["completion_mask"] * out["tool_mask"]).sum().item()
    adv = out["advantages"].view(4, G)
    assert ((adv.abs().sum(1) > 0) == ~left).all()  # every refilled group moves the policy, unfilled ones do not
    metrics = trainer._metrics["train"]
    assert metrics["dynamic_sampling/zero_std_share_drawn"] == [sum(flat) / 4]
    assert metrics["dynamic_sampling/zero_std_share_trained"] == [counts["unfilled_groups"] / 4]


def test_dynamic_sampling_trains_and_reports(tiny_causal, prompt_dir, tmp_path):
    trainer = make_trainer(tiny_causal, prompt_dir, tmp_path, reward=flat_or_varied, batch_size=4, max_steps=2,
                           dynamic_sampling=True, report_to=[])
    trainer.train()
    report = stability_json(tmp_path)["dynamic_sampling"]
    assert report["groups"] == 8 and report["refilled_groups"] + report["unfilled_groups"] == report["zero_std_groups"]
    logged = [h for h in trainer.state.log_history if "stability/dynamic_sampling/groups" in h]
    assert logged and logged[-1]["stability/dynamic_sampling/groups"] == 8


def test_dynamic_sampling_config_is_validated(tmp_path):
    with pytest.raises(ValueError, match="dynamic_sampling_max_rounds=0: use 1 or more"):
        Sa2VAGRPOConfig(output_dir=str(tmp_path), dynamic_sampling=True, dynamic_sampling_max_rounds=0)
    with pytest.raises(ValueError, match="dynamic_sampling needs multi_objective_aggregation"):
        Sa2VAGRPOConfig(output_dir=str(tmp_path), dynamic_sampling=True,
                        multi_objective_aggregation="normalize_then_sum")

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GenerationConfig

from sa2va_rl.models.policy import CausalLMPolicy, cut_after_eos, new_tokens, prompt_groups
from sa2va_rl.numerics import LogitsGuard


@pytest.fixture
def model(tiny_causal):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_causal).eval()


def gen_config(n=6):
    return GenerationConfig(do_sample=True, max_new_tokens=n, min_new_tokens=n, eos_token_id=2, pad_token_id=0)


def test_new_tokens_both_ways():
    prompt = torch.tensor([[5, 6, 7]])
    assert torch.equal(new_tokens(torch.tensor([[5, 6, 7, 9, 10]]), prompt, 2), torch.tensor([[9, 10]]))
    assert torch.equal(new_tokens(torch.tensor([[9, 10]]), prompt, 2), torch.tensor([[9, 10]]))
    with pytest.raises(RuntimeError, match="expected 2"):
        new_tokens(torch.tensor([[9, 10, 11, 12]]), prompt, 2)


def test_helpers():
    assert prompt_groups([[1], [1], [2], [2], [1]]) == [(0, 2), (2, 4), (4, 5)]
    assert cut_after_eos([[4, 2, 5], [4, 5], [2]], {2}) == [2, 2, 1]


@pytest.mark.parametrize("from_embeds", [False, True])
def test_generate_returns_completions_either_way(model, from_embeds):
    """Sa2VA generates from inputs_embeds: output holds new tokens only. Slicing the prompt off that
    (the original trainer) leaves nothing; the policy must give the same non-empty completions."""
    policy = CausalLMPolicy(pad_token_id=0, generate_from_embeds=from_embeds)
    prompts = [[10, 11, 12, 13]] * 2 + [[14, 15]] * 2
    torch.manual_seed(1)
    gen = policy.generate(model, prompts, gen_config(), LogitsGuard(eos_token_id=2))
    assert [len(c) for c in gen.completion_ids] == [len(r) for r in gen.repaired]
    assert all(len(c) > 0 for c in gen.completion_ids)
    if from_embeds:  # the trap itself: the raw output is shorter than prompt + completion
        raw = model.generate(inputs_embeds=model.get_input_embeddings()(torch.tensor([prompts[0]])),
                             generation_config=gen_config())
        assert raw.shape[1] == 6 and raw[:, len(prompts[0]):].shape[1] == 2
    torch.manual_seed(1)
    other = CausalLMPolicy(pad_token_id=0, generate_from_embeds=not from_embeds).generate(
        model, prompts, gen_config(), LogitsGuard(eos_token_id=2))
    assert other.completion_ids == gen.completion_ids


def reference_logprobs(model, prompts, completions):
    """One unpadded forward per row, full fp32 log_softmax."""
    out = []
    for p, c in zip(prompts, completions):
        ids = torch.tensor([p + c])
        logits = model(input_ids=ids).logits[0].float()
        lp = F.log_softmax(logits[len(p) - 1:-1], -1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        out.append(lp)
    return out


def test_logprobs_with_very_different_prompt_lengths_are_finite_and_exact(model):
    prompts = [[10, 11], list(range(10, 45))]  # 2 vs 35 tokens: heavy left padding on row 0
    completions = [[20, 21, 22], [23, 24]]
    P, K = max(map(len, prompts)), max(map(len, completions))
    prompt_ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    prompt_mask = (torch.arange(P)[None] >= torch.tensor([P - len(p) for p in prompts])[:, None]).long()
    comp_ids = torch.tensor([c + [0] * (K - len(c)) for c in completions])
    comp_mask = torch.tensor([[1] * len(c) + [0] * (K - len(c)) for c in completions])
    logps, ent = CausalLMPolicy(pad_token_id=0).logprobs(model, prompt_ids, prompt_mask, comp_ids, comp_mask)
    assert logps.dtype == torch.float32 and torch.isfinite(logps).all() and torch.isfinite(ent).all()
    for row, ref in enumerate(reference_logprobs(model, prompts, completions)):
        torch.testing.assert_close(logps[row, : len(ref)], ref, rtol=1e-5, atol=1e-5)
    assert logps[1, 2] == 0 and ent[1, 2] == 0  # padding position


def test_logprobs_drop_mask_blocks_nan_from_loss_and_grad(model):
    """A NaN logit at a dropped position must reach neither the logprobs nor the gradient."""
    prompt_ids, prompt_mask = torch.tensor([[10, 11, 12]]), torch.ones(1, 3, dtype=torch.long)
    comp_ids, comp_mask = torch.tensor([[20, 21, 22]]), torch.ones(1, 3, dtype=torch.long)
    handle = model.lm_head.register_forward_hook(
        lambda m, i, o: o.index_put((torch.tensor([0]), torch.tensor([o.shape[1] - 3])),
                                    torch.full((o.shape[-1],), math.nan)))
    try:
        drop = torch.tensor([[False, True, False]])  # the logit predicting token 21 is NaN
        logps, _ = CausalLMPolicy(pad_token_id=0).logprobs(model.train(), prompt_ids, prompt_mask, comp_ids,
                                                           comp_mask, drop_mask=drop)
        assert torch.isfinite(logps).all() and logps[0, 1] == 0
        logps.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        # without the drop mask the same NaN is visible: the test can fail
        logps, _ = CausalLMPolicy(pad_token_id=0).logprobs(model, prompt_ids, prompt_mask, comp_ids, comp_mask)
        assert torch.isnan(logps[0, 1])
    finally:
        handle.remove()

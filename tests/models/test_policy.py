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


# ------------------------------------------------------------------ chunked scoring == the full-vocabulary reference
def full_vocab_reference(forward, prompt_ids, prompt_mask, completion_ids, completion_mask, pad_token_id,
                         temperature=1.0, drop_mask=None):
    """The scoring before chunking (fp32 [B, K, V] gather, log_softmax and entropy over the whole vocabulary)."""
    B, P = prompt_ids.shape
    K = completion_ids.shape[1]
    L = P + K
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    att = torch.cat([prompt_mask, completion_mask], dim=1)
    pad_left = (prompt_mask == 0).sum(dim=1)
    src = torch.arange(L)[None, :] + pad_left[:, None]
    inside = src < L
    src = src.clamp(max=L - 1)
    ids = ids.gather(1, src).masked_fill(~inside, pad_token_id)
    att = att.gather(1, src) * inside
    keep = L - (P - int(pad_left.max())) + 1
    logits = forward(ids, att, keep)
    V = logits.shape[-1]
    pos = (P - pad_left)[:, None] + torch.arange(K)[None, :] - 1 - (L - keep)
    logits = logits.gather(1, pos.unsqueeze(-1).expand(B, K, V)).float()
    if temperature != 1.0:
        logits = logits / temperature
    drop = completion_mask == 0
    if drop_mask is not None:
        drop = drop | drop_mask
    logits = torch.where(drop.unsqueeze(-1), 0.0, logits)
    logp_all = F.log_softmax(logits, dim=-1)
    logps = logp_all.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all.clamp(min=torch.finfo(torch.float32).min)).sum(-1)
    zero = torch.zeros(())
    return torch.where(drop, zero, logps), torch.where(drop, zero, entropy)


class ToyLM(torch.nn.Module):
    """Embedding -> causal running mean -> head; -inf on two banned ids, as the Sa2VA heads."""

    def __init__(self, V=97, C=16):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(V, C)
        self.head = torch.nn.Linear(C, V)
        self.V = V

    def hidden(self, ids, att, keep):
        x = self.emb(ids) * att[..., None]
        x = x.cumsum(1) / torch.arange(1, ids.shape[1] + 1)[None, :, None]
        return torch.tanh(x)[:, -keep:]

    def logits_of(self, h):
        z = self.head(h).float()
        z[..., [5, 7]] = -math.inf
        return z

    def logits(self, ids, att, keep):
        return self.logits_of(self.hidden(ids, att, keep))


def toy_batch(V=97):
    g = torch.Generator().manual_seed(1)
    lens_p, lens_c = [3, 9, 6, 1], [5, 2, 7, 4]
    P, K = max(lens_p), max(lens_c)
    prompt_ids = torch.zeros(4, P, dtype=torch.long)
    prompt_mask = torch.zeros(4, P, dtype=torch.long)
    comp_ids = torch.zeros(4, K, dtype=torch.long)
    comp_mask = torch.zeros(4, K, dtype=torch.long)
    for b, (p, c) in enumerate(zip(lens_p, lens_c)):
        prompt_ids[b, P - p:] = torch.randint(8, V, (p,), generator=g)
        prompt_mask[b, P - p:] = 1
        comp_ids[b, :c] = torch.randint(8, V, (c,), generator=g)
        comp_mask[b, :c] = 1
    drop = torch.zeros(4, K, dtype=torch.bool)
    drop[0, 1] = drop[2, 4] = True  # repaired tokens
    return prompt_ids, prompt_mask, comp_ids, comp_mask, drop


@pytest.mark.parametrize("with_head", [True, False])
@pytest.mark.parametrize("chunk_elements", [10 ** 9, 97 * 11, 97 * 4, 1])  # one chunk; whole rows; windows; 1 each
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_scoring_equals_full_vocabulary_values_and_gradients(with_head, chunk_elements, temperature):
    from sa2va_rl.models.policy import right_aligned_logprobs

    batch = toy_batch()
    weights = torch.randn(4, batch[2].shape[1], generator=torch.Generator().manual_seed(2))

    def run(fn):
        lm = ToyLM()
        lp, ent = fn(lm)
        (lp * weights).sum().backward()
        return lp.detach(), ent.detach(), {n: p.grad for n, p in lm.named_parameters()}

    ref = run(lambda lm: full_vocab_reference(lm.logits, *batch[:4], 0, temperature, batch[4]))
    if with_head:
        new = run(lambda lm: right_aligned_logprobs(lm.hidden, *batch[:4], 0, temperature, batch[4], head=lm.logits_of,
                                                    head_rows=lm.V, chunk_elements=chunk_elements))
    else:
        new = run(lambda lm: right_aligned_logprobs(lm.logits, *batch[:4], 0, temperature, batch[4],
                                                    chunk_elements=chunk_elements))
    torch.testing.assert_close(new[0], ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(new[1], ref[1], rtol=1e-6, atol=1e-6)
    assert (new[0][batch[4] | (batch[3] == 0)] == 0).all()  # dropped and padded positions: exactly zero
    for name in ref[2]:
        torch.testing.assert_close(new[2][name], ref[2][name], rtol=1e-5, atol=1e-7)


def test_chunked_scoring_nan_in_dropped_logits_and_entropy_on_request():
    """NaN logits at a dropped position reach neither values nor gradients, chunked as in one piece; entropy is
    skipped when not asked for."""
    from sa2va_rl.models.policy import right_aligned_logprobs

    batch = toy_batch()
    lm = ToyLM()

    def poisoned(ids, att, keep):  # NaN in the logits that predict row 0's completion token 1
        z = lm.logits(ids, att, keep)
        P, L = batch[0].shape[1], ids.shape[1]
        t = P - int((batch[1][0] == 0).sum()) + 1 - 1 - (L - keep)
        return z.index_put((torch.tensor([0]), torch.tensor([t])), torch.full((lm.V,), math.nan))

    for chunk in (10 ** 9, 97 * 3):
        lm.zero_grad()
        lp, ent = right_aligned_logprobs(poisoned, *batch[:4], 0, 1.0, batch[4], compute_entropy=False,
                                         chunk_elements=chunk)
        assert ent is None and torch.isfinite(lp).all() and lp[0, 1] == 0
        lp.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in lm.parameters())
        lp_nodrop, _ = right_aligned_logprobs(poisoned, *batch[:4], 0, 1.0, None, chunk_elements=chunk)
        assert torch.isnan(lp_nodrop[0, 1])  # the fault is real: without the drop mask it shows


# ------------------------------------------------------------------ one generate() for every group of a step
@pytest.mark.parametrize("from_embeds", [False, True])
def test_batched_generation_greedy_equals_one_call_per_group(model, from_embeds):
    """Groups of different prompt lengths, left-padded into one generate(): greedy completions are those of one
    unpadded generate() per group, and the guard's per-row flags stay aligned with them."""
    prompts = [[10, 11, 12, 13, 14, 15, 16]] * 2 + [[20, 21]] * 3 + [[30, 31, 32, 33]] * 2
    gc = GenerationConfig(do_sample=False, max_new_tokens=8, eos_token_id=2, pad_token_id=0)
    reference = []
    for start, end in prompt_groups(prompts):
        ids = torch.tensor(prompts[start:end])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc)
        rows = out[:, ids.shape[1]:].tolist()
        reference += [r[:n] for r, n in zip(rows, cut_after_eos(rows, {2}))]
    guard = LogitsGuard(eos_token_id=2)
    gen = CausalLMPolicy(pad_token_id=0, generate_from_embeds=from_embeds).generate(model, prompts, gc, guard)
    assert gen.completion_ids == reference
    assert [len(r) for r in gen.repaired] == [len(c) for c in reference] and not any(map(any, gen.repaired))
    assert guard.stats.rows_seen == len(prompts) * max(map(len, reference))  # one batched call: every row, each step


def test_batched_generation_flags_only_the_broken_row(model):
    """A NaN logit row in one row of the batch is repaired and flagged in that row alone."""
    prompts = [[10, 11, 12]] * 2 + [[20, 21, 22, 23, 24]] * 2
    calls = []

    def hook(module, inputs, out):
        calls.append(1)
        if len(calls) == 2:  # the second decoding step, third row
            out = out.clone()
            out[2, -1] = math.nan
        return out

    handle = model.lm_head.register_forward_hook(hook)
    try:
        gen = CausalLMPolicy(pad_token_id=0).generate(model, prompts, gen_config(), LogitsGuard(eos_token_id=2))
    finally:
        handle.remove()
    assert [any(r) for r in gen.repaired] == [False, False, True, False]

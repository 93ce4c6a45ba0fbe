import logging
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from sa2va_rl.numerics import LogitsGuard
from tests.syncs import CountSyncs

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INF = math.inf


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern: equal bits means bit-identical, NaN payloads included."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


@st.composite
def logits_case(draw):
    """Random logits with -inf masks, very negative entries, and NaN/+inf/huge injected into chosen rows."""
    batch = draw(st.integers(1, 6))
    vocab = draw(st.integers(6, 48))  # >= 6 so every EOS id drawn below exists
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, vocab, generator=g) * draw(st.sampled_from([1.0, 10.0, 100.0]))
    masks = torch.rand(batch, vocab, generator=g) < draw(st.sampled_from([0.0, 0.3, 0.9]))
    masks[:, 0] = False  # keep one unmasked entry so "masked" alone never breaks a row
    x = x.masked_fill(masks, -INF)
    x[torch.rand(batch, vocab, generator=g) < 0.05] = -1e30 if dtype == torch.float32 else -6e4  # harmless
    broken = []
    for r in range(batch):
        kind = draw(st.sampled_from(["ok", "ok", "nan", "posinf", "huge", "all_nan", "all_masked", "mixed"]))
        if kind == "ok":
            continue
        broken.append(r)
        pos = draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=vocab))
        if kind == "nan":
            x[r, pos] = math.nan
        elif kind == "posinf":
            x[r, pos] = INF
        elif kind == "huge":
            x[r, pos] = 3e4
        elif kind == "all_nan":
            x[r] = math.nan
        elif kind == "all_masked":
            x[r] = -INF
        else:
            x[r, pos[:1]] = math.nan
            x[r, pos[-1:]] = INF
    return x.to(dtype), broken


@settings(max_examples=300, deadline=None)
@given(logits_case(), st.sampled_from([None, 1, [3, 5]]))
def test_contract(case, eos):
    scores, broken = case
    before = scores.clone()
    guard = LogitsGuard(eos_token_id=eos)
    out = guard(None, scores)
    assert torch.equal(bits(scores), bits(before)), "the input tensor must not be modified"
    assert out.dtype == scores.dtype and out.shape == scores.shape
    fallback_id = 0 if eos is None else (eos if isinstance(eos, int) else eos[0])
    for r in range(scores.shape[0]):
        if r not in broken:
            # (1) healthy rows bit-identical
            assert torch.equal(bits(out[r]), bits(scores[r]))
            continue
        row, orig = out[r].float(), scores[r].float()
        usable = ~(orig.isnan() | (orig == -INF))
        # (3) finite or -inf, at least one finite, maximum exactly 0
        assert not row.isnan().any() and not (row == INF).any()
        assert torch.isfinite(row).any()
        assert row.max().item() == 0.0
        if usable.any():
            # (2) masks stay masked; NaN entries become masks; usable entries stay usable
            assert torch.equal(row == -INF, ~usable)
        else:
            # (4) nothing usable: one-hot on the fallback token
            assert row[fallback_id] == 0 and (row == -INF).sum() == row.numel() - 1
    # (5) the record says exactly which rows were repaired
    rec = guard.pop_repaired()
    assert rec.shape == (scores.shape[0], 1)
    assert rec[:, 0].tolist() == [r in broken for r in range(scores.shape[0])]
    assert guard.stats.rows_seen == scores.shape[0] and guard.stats.rows_repaired == len(broken)
    assert guard.pop_repaired().shape == (0, 0)  # reset


@settings(max_examples=150, deadline=None)
@given(logits_case(), st.floats(0.1, 2.0), st.sampled_from([0, 1, 5]), st.sampled_from([1.0, 0.9, 0.3]))
def test_repaired_rows_survive_later_warpers(case, temperature, top_k, top_p):
    """transformers runs temperature/top-k/top-p after user processors: the output must stay sampleable."""
    scores, _ = case
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    guard = LogitsGuard(eos_token_id=1)
    guarded = guard(None, scores)
    repaired = guard.pop_repaired()[:, 0]
    # generate() hands processors fp32 scores: every row must stay sampleable there. In the row's own dtype, the
    # repaired rows must (their maximum is exactly 0); a healthy fp16 row is left bit-identical, and one at the edge
    # of fp16's range (-6e4 / temperature 0.5 = -inf) is the dtype's limit, not the guard's to change (hypothesis
    # found that case)
    for s, rows in ((guarded, repaired), (guarded.float(), torch.ones_like(repaired))):
        probs = torch.softmax(warpers(None, s), dim=-1)
        if rows.any():
            torch.multinomial(probs[rows].float(), 1)  # must not raise


def test_masked_tokens_never_sampled_from_repaired_row():
    vocab = 1000
    row = torch.randn(1, vocab) * 5
    masked = torch.zeros(vocab, dtype=torch.bool)
    masked[::3] = True  # a third of the vocabulary masked, as top-k/padded rows would be
    row[0, masked] = -INF
    row[0, 7] = math.nan
    row[0, 11] = INF
    out = LogitsGuard()(None, row)
    probs = torch.softmax(out.float(), dim=-1)
    samples = torch.multinomial(probs[0], 100_000, replacement=True, generator=torch.Generator().manual_seed(0))
    assert not masked[samples].any()
    assert not (samples == 7).any()  # a NaN logit is not sampled either


def test_guarded_row_through_temperature_and_top_p():
    scores = torch.randn(4, 50)
    scores[1, 3] = math.nan
    scores[2] = math.nan
    scores[3, 10] = INF
    warpers = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopPLogitsWarper(0.9)])
    out = warpers(None, LogitsGuard(eos_token_id=2)(None, scores))
    tokens = torch.multinomial(torch.softmax(out, -1), 1).squeeze(1)
    assert tokens[2] == 2  # the all-NaN row fell back to EOS
    assert tokens[3] == 10  # the +inf token dominates its row


def test_seed_style_floor_harm_is_real():
    """Documents why we do not floor probabilities: the floor leaks ~1e-8 * vocab of mass to junk."""
    vocab = 151936
    logits = torch.full((vocab,), -INF)
    logits[:10] = torch.randn(10)
    probs = torch.softmax(logits, -1).clamp(min=1e-8)
    probs = probs / probs.sum()
    junk_mass = probs[10:].sum().item()
    assert 1e-3 < junk_mass < 2e-3
    guarded = torch.softmax(LogitsGuard()(None, logits[None])[0], -1)
    assert guarded[10:].sum().item() == 0.0


def test_healthy_path_costs_one_sync_and_returns_same_tensor():
    guard = LogitsGuard()
    scores = torch.randn(8, 1024)
    scores[:, 100:] = -INF
    with CountSyncs() as c:
        out = guard(None, scores)
    assert out is scores
    assert c.count == 1, c.calls


def test_pop_repaired_marks_steps_and_rows():
    guard = LogitsGuard(eos_token_id=0)
    for step in range(5):
        s = torch.randn(3, 10)
        if step == 1:
            s[2, 4] = math.nan
        if step == 3:
            s[0] = -INF
        guard(None, s)
        assert guard.steps_seen == step + 1
    rec = guard.pop_repaired()
    assert guard.steps_seen == 0  # pop resets the record
    expected = torch.zeros(3, 5, dtype=torch.bool)
    expected[2, 1] = True
    expected[0, 3] = True
    assert torch.equal(rec, expected)
    st_ = guard.stats
    assert (st_.calls, st_.rows_seen, st_.rows_repaired, st_.nan_rows, st_.fallback_rows) == (5, 15, 2, 1, 1)


def test_batch_change_without_pop_is_an_error():
    guard = LogitsGuard()
    guard(None, torch.randn(2, 5))
    with pytest.raises(ValueError, match="pop_repaired"):
        guard(None, torch.randn(3, 5))


def test_warnings_are_rate_limited(caplog):
    guard = LogitsGuard()
    with caplog.at_level(logging.WARNING, logger="sa2va_rl.numerics.logits"):
        for _ in range(10):
            s = torch.randn(2, 8)
            s[0, 0] = math.nan
            guard(None, s)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 4  # events 1, 2, 4, 8
    assert "repaired 1 of 2 rows" in msgs[0] and "nan=1" in msgs[0] and "(2, 8)" in msgs[0]


def test_state_dict_round_trip():
    guard = LogitsGuard()
    s = torch.randn(2, 8)
    s[1, 1] = INF
    guard(None, s)
    other = LogitsGuard()
    other.load_state_dict(guard.state_dict())
    assert other.stats == guard.stats and other.stats.posinf_rows == 1


def test_fallback_outside_vocab_is_a_clear_error():
    with pytest.raises(ValueError, match="outside the vocabulary of 4 entries"):
        LogitsGuard(eos_token_id=9)(None, torch.full((1, 4), math.nan))


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_bad_max_abs_logit(bad):
    with pytest.raises(ValueError, match="max_abs_logit"):
        LogitsGuard(max_abs_logit=bad)


def test_inside_transformers_generate():
    """End to end: NaN logits at one decoding step of a real (tiny) model with sampling, T=0.7, top-p."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, eos_token_id=1, pad_token_id=0)
    model = Qwen2ForCausalLM(cfg).eval()
    calls = {"n": 0}

    def poison(_m, _i, out):  # NaN in row 1 at the 3rd forward (= decoding step 2)
        calls["n"] += 1
        if calls["n"] == 3:
            out.logits[1, -1] = math.nan
        return out

    model.register_forward_hook(poison)
    guard = LogitsGuard(eos_token_id=1)
    out = model.generate(torch.tensor([[5, 6, 7], [8, 9, 10]]), max_new_tokens=6, min_new_tokens=6, do_sample=True,
                         temperature=0.7, top_p=0.9, logits_processor=LogitsProcessorList([guard]))
    rec = guard.pop_repaired()
    assert out.shape[1] - 3 == rec.shape[1] == 6
    assert rec.sum() == 1 and rec[1, 2]
    # The all-NaN row has no usable entry: it falls back to EOS, as documented
    assert out[1, 3 + 2] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_contract():
    s = torch.randn(4, 100, device="cuda")
    s[1, 5] = math.nan
    s[2, :] = -INF
    guard = LogitsGuard(eos_token_id=3)
    out = guard(None, s)
    assert torch.equal(out[0], s[0]) and torch.equal(out[3], s[3])
    assert out[2, 3] == 0 and guard.pop_repaired().device.type == "cuda"


def test_processors_carry_their_signature_and_run_in_a_processor_list():
    """transformers' LogitsProcessorList inspects each processor's signature at every step: the stored one is the
    bound call's (input_ids, scores), so the list calls the processors positionally as before."""
    import inspect

    from sa2va_rl.models.policy import StepCounter
    from sa2va_rl.models.sampling import BannedTokens

    guard, counter, banned = LogitsGuard(eos_token_id=0), StepCounter(), BannedTokens(6, [1])
    for p in (guard, counter, banned):
        assert list(inspect.signature(p.__call__).parameters) == ["input_ids", "scores"]
    scores = torch.zeros(2, 8)
    scores[1, 3] = math.nan
    out = LogitsProcessorList([banned, counter, guard])(torch.zeros(2, 1, dtype=torch.long), scores)
    assert counter.steps == 1 and guard.pop_repaired().tolist() == [[False], [True]]
    assert out[0, 1] == -math.inf and (out[:, 6:] == -math.inf).all() and not out.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_overflow_line_is_the_same_on_the_fast_path_and_per_row(dtype):
    """The healthy-path test (host floats) and the per-row test (tensors) agree at max_abs_logit, which the dtype
    rounds: the largest value at or below the line passes untouched, the next one up is repaired."""
    limit = 100.3  # not representable in any of the three dtypes
    at = torch.tensor(limit, dtype=dtype)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    above = (at.reshape(1).view(bits) + 1).view(dtype)[0]  # the dtype's next value up (positive: next bit pattern)
    assert above > at
    guard = LogitsGuard(eos_token_id=0, max_abs_logit=limit)
    scores = torch.zeros(2, 5, dtype=dtype)
    scores[0, 1] = at
    out = guard(None, scores)
    assert out is scores and guard.pop_repaired().tolist() == [[False], [False]]
    scores[1, 2] = above
    out = guard(None, scores)
    assert guard.pop_repaired().tolist() == [[False], [True]] and torch.equal(out[0], scores[0])

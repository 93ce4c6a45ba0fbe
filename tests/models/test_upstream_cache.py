"""InternLM2 (Sa2VA-8B/26B) generates with a KV cache through the compatibility layer (upstream.py's
``generation_mixin`` fix): transformers 5's DynamicCache bridged to the legacy (key, value) tuples of the pristine
code; Phi3 (the v1 code's other pre-Cache LLM) with the same DynamicCache handed to its 4.x Cache API code. Greedy tokens, the logits processors' inputs and the Policy's completions equal the cache-free path's (each
step a forward over the whole sequence); the cache is used (the prompt is read once, then one token per step)."""

import numpy as np
import pytest
import torch

from sa2va_rl.models.sa2va import lm_parts, load_sa2va, make_policy
from sa2va_rl.models.upstream import _dynamic_classes, _prepare_inputs_with_cache, _prepare_inputs_without_cache
from sa2va_rl.numerics.logits import LogitsGuard


@pytest.fixture
def internlm2(upstream_ckpts):
    """(model, tokenizer, causal LM, path) of a tiny pristine InternLM2-based Sa2VA, its head spread (random weights
    at scale 0.02 make every greedy token the same)."""
    path = upstream_ckpts("v1_internlm2")
    model, tok = load_sa2va(path, trust_remote_code=True)
    lm = lm_parts(model)[0]
    torch.manual_seed(1)
    with torch.no_grad():
        lm.get_output_embeddings().weight.normal_()
    return model.eval(), tok, lm, path


class Recorder:
    """A logits processor that keeps what it is handed at each step."""

    def __init__(self):
        self.ids, self.scores = [], []

    def __call__(self, input_ids, scores):
        self.ids.append(input_ids.clone())
        self.scores.append(scores.clone())
        return scores


def left_padded(tok, texts):
    rows = [tok(t).input_ids for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def generate(lm, embeds, mask, cached: bool, new: int = 8):
    """Greedy tokens, the Recorder, the LogitsGuard and the forward's input length at each step."""
    from transformers import GenerationConfig, LogitsProcessorList

    lm.sa2va_rl_kv_cache = cached
    lengths = []

    def count(_module, _args, kwargs):
        x = kwargs.get("inputs_embeds")
        lengths.append((x if x is not None else kwargs["input_ids"]).shape[1])

    rec, guard = Recorder(), LogitsGuard(eos_token_id=None)
    hook = lm.register_forward_pre_hook(count, with_kwargs=True)
    try:
        gc = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
        with torch.no_grad():
            out = lm.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=gc,
                              logits_processor=LogitsProcessorList([guard, rec]))
    finally:
        hook.remove()
        del lm.sa2va_rl_kv_cache
    return out, rec, guard, lengths


def test_internlm2_and_phi3_are_bridged(internlm2):
    model, _tok, lm, _path = internlm2
    classes = {c.__name__: c for c in _dynamic_classes(type(model))}
    assert type(lm).__name__ == "InternLM2ForCausalLM"
    for cls in (type(lm), classes["Phi3ForCausalLM"]):  # legacy tuples; 4.x Cache API (get_usable_length)
        assert getattr(cls.forward, "_sa2va_rl_cache_bridge", False)
        assert cls.prepare_inputs_for_generation is _prepare_inputs_with_cache
        assert cls._supports_default_dynamic_cache()


def test_cached_greedy_equals_cache_free_on_a_left_padded_batch_from_inputs_embeds(internlm2):
    _model, tok, lm, _path = internlm2
    ids, mask = left_padded(tok, ["a red square is at the left of the picture", "blue", "Describe the region"])
    with torch.no_grad():
        embeds = lm.get_input_embeddings()(ids)
    new = 8
    got, rec, guard, lengths = generate(lm, embeds, mask, cached=True, new=new)
    want, rec0, guard0, lengths0 = generate(lm, embeds, mask, cached=False, new=new)
    assert got.tolist() == want.tolist() and len({tuple(r) for r in got.tolist()}) == 3
    prompt = ids.shape[1]
    assert lengths == [prompt] + [1] * (new - 1)  # the cache is used: the prompt once, then one token per step
    assert lengths0 == [prompt + i for i in range(new)]  # the cache-free path re-reads the whole sequence
    # the processors see the same rows: the same ids, the same logits up to float noise
    assert [t.tolist() for t in rec.ids] == [t.tolist() for t in rec0.ids]
    for a, b in zip(rec.scores, rec0.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert guard.stats.calls == guard0.stats.calls == new and guard.stats.rows_repaired == 0
    # a left-padded row decodes as the same prompt unpadded: positions come from the attention mask
    short, _r, _g, _l = generate(lm, embeds[1:2, -1:], mask[1:2, -1:], cached=True, new=new)
    assert short.tolist() == got[1:2].tolist()


def test_generate_returns_the_dynamic_cache_filled_and_tuple_outputs_keep_working(internlm2):
    from transformers import DynamicCache, GenerationConfig

    _model, tok, lm, _path = internlm2
    ids, mask = left_padded(tok, ["a red square", "blue"])
    gc = GenerationConfig(max_new_tokens=4, min_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0,
                          return_dict_in_generate=True)
    with torch.no_grad():
        out = lm.generate(inputs_embeds=lm.get_input_embeddings()(ids), attention_mask=mask, generation_config=gc)
        cache = out.cache
        assert isinstance(cache, DynamicCache) and cache.get_seq_length() == ids.shape[1] + 3
        # a forward handed the cache and the last token equals a full forward's last position
        full = torch.cat([ids, out.sequences], dim=1)
        att = torch.cat([mask, torch.ones_like(out.sequences)], dim=1)
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        step = lm(input_ids=full[:, -1:], attention_mask=att, position_ids=pos[:, -1:], cache=cache,
                  return_dict=False)
        ref = lm(input_ids=full, attention_mask=att, position_ids=pos, use_cache=False).logits[:, -1]
    assert isinstance(step, tuple) and step[1] is cache and cache.get_seq_length() == full.shape[1]
    torch.testing.assert_close(step[0][:, -1], ref, rtol=1e-4, atol=1e-4)


def test_activation_checkpointing_in_training_mode_generates_without_the_cache(internlm2):
    _model, tok, lm, _path = internlm2
    ids, mask = left_padded(tok, ["a red square is at the left", "blue"])
    with torch.no_grad():
        embeds = lm.get_input_embeddings()(ids)
    want, _r, _g, _l = generate(lm, embeds, mask, cached=False, new=4)
    lm.model.gradient_checkpointing = True  # what gradient_checkpointing_enable() sets on the backbone
    lm.train()
    try:
        got, _r, _g, lengths = generate(lm, embeds, mask, cached=True, new=4)
    finally:
        lm.model.gradient_checkpointing = False
        lm.eval()
    assert got.tolist() == want.tolist() and lengths == [ids.shape[1] + i for i in range(4)]


def test_policy_generation_with_images_and_the_guard_equals_the_cache_free_path(internlm2):
    """The training path: Sa2VAPolicy.generate (groups of G rows, visual features spliced, left padding, the
    LogitsGuard and the project's processors) gives the same completions with and without the cache."""
    from transformers import GenerationConfig

    model, tok, lm, path = internlm2
    policy = make_policy(model, tok, path, trust_remote_code=True)
    rng = np.random.default_rng(0)
    prompts, contexts = [], []
    for shape, question, key in [((40, 56, 3), "Describe the image.", "a"),
                                 ((48, 32, 3), "What is in this picture? Answer in a word.", "b")]:
        text, visual = policy.encode(rng.integers(0, 255, shape, dtype=np.uint8), question, None, key=key)
        prompts.append(tok(text).input_ids)
        contexts.append(visual)
    gc = GenerationConfig(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=policy.pad_token_id,
                          eos_token_id=None)
    runs = {}
    for cached in (True, False):
        lm.sa2va_rl_kv_cache = cached
        guard = LogitsGuard(eos_token_id=None)
        runs[cached] = policy.generate(model, [prompts[0]] * 2 + [prompts[1]] * 2, gc, guard,
                                       contexts=[contexts[0]] * 2 + [contexts[1]] * 2).completion_ids
        assert guard.stats.rows_seen == 4 * 6
    del lm.sa2va_rl_kv_cache
    assert runs[True] == runs[False] and runs[True][0] != runs[True][-1]


@pytest.mark.parametrize("arch, family", [("internlm2", "v1_internlm2"), ("internlm2", "v2"), ("phi3", "v1"),
                                          ("phi3", "v2")])
def test_each_upstream_llm_generates_with_the_cache_as_greedy_decoding_by_hand(arch, family, tmp_path):
    """Both copies of modeling_internlm2.py (sa2va_v2's has GenerationMixin on its PreTrainedModel only, which
    transformers 5's can_generate() does not count: no generation_config, generate() failed before the fix), and
    modeling_phi3.py (transformers 4.x's Cache API: it calls get_usable_length, which 5 removed): cached greedy
    tokens equal the cache-free path's and greedy decoding by hand with upstream's own forward, on a left-padded
    batch from inputs_embeds; the cache is used (the prompt once, then one token per step)."""
    from tests.upstream import upstream_dir
    from tests.upstream.internvl import build_upstream_llm

    lm = build_upstream_llm(arch, upstream_dir(family), str(tmp_path))
    assert lm.generation_config is not None
    torch.manual_seed(1)
    with torch.no_grad():  # spread (random weights at scale 0.02 make every greedy token the same)
        lm.get_output_embeddings().weight.normal_()
        lm.get_input_embeddings().weight.normal_()
    ids = torch.randint(3, 512, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        embeds = lm.get_input_embeddings()(ids)
    got, rec, guard, lengths = generate(lm, embeds, mask, cached=True, new=6)
    want, rec0, _g, lengths0 = generate(lm, embeds, mask, cached=False, new=6)
    assert got.tolist() == want.tolist() and lengths == [9] + [1] * 5 and lengths0 == [9 + i for i in range(6)]
    for a, b in zip(rec.scores, rec0.scores):  # the processors see the same rows
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert guard.stats.calls == 6 and guard.stats.rows_repaired == 0
    for row, start in ((0, 0), (1, 4)):  # each row unpadded, by hand with upstream's own forward (no cache)
        seq = ids[row:row + 1, start:]
        with torch.no_grad():
            for _ in range(6):
                nxt = lm(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], dim=1)
        assert got[row].tolist() == seq[0, 9 - start:].tolist() and len(set(got[row].tolist())) > 1


def test_a_cache_the_bridge_cannot_take_generates_without_it(internlm2, caplog):
    """An offloaded (or static, quantized) cache holds its layers otherwise: warned once, then the cache-free path."""
    from transformers import GenerationConfig

    from sa2va_rl.models import upstream

    _model, tok, lm, _path = internlm2
    ids, mask = left_padded(tok, ["a red square is at the left", "blue"])
    upstream._UNBRIDGED_WARNED.clear()
    with torch.no_grad():
        embeds = lm.get_input_embeddings()(ids)
        want = lm.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=GenerationConfig(
            max_new_tokens=4, min_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0))
        with caplog.at_level("WARNING", logger="sa2va_rl.models.upstream"):
            got = lm.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=GenerationConfig(
                max_new_tokens=4, min_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0,
                cache_implementation="offloaded"))
    assert got.tolist() == want.tolist()
    assert sum("only a plain DynamicCache" in r.getMessage() for r in caplog.records) == 1  # 4 steps, 1 warning

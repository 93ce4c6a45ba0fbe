import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from sa2va_rl.models.sa2va import (BannedTokens, Sa2VAModelArgs, Sa2VAPolicy, is_sa2va_checkpoint, lm_parts,
                                   load_sa2va, prepare_for_training, save_sa2va)
from sa2va_rl.models.grounding import decode_masks, encode_image, mask_logits
from sa2va_rl.models.sa2va_inputs import IMG_CONTEXT, region_cells, tile_image
from sa2va_rl.numerics import LogitsGuard


@pytest.fixture()
def loaded(tiny_sa2va):
    model, tok = load_sa2va(tiny_sa2va)
    return model.eval(), tok, Sa2VAPolicy(model, tok)


def sample(seed=0, h=40, w=56):
    rng = np.random.default_rng(seed)
    image = rng.integers(30, 220, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), bool)
    mask[5:25, 8:30] = True
    return image, mask


# ----------------------------------------------------------------------------------------- inputs
def test_tiling_grid_and_thumbnail_last():
    square = np.zeros((64, 64, 3), np.uint8)
    square[:32, :32] = 255  # top-left quadrant white
    tiles = tile_image(square, 32, max_tiles=4)
    assert len(tiles) == 5  # 2x2 grid + thumbnail
    assert np.asarray(tiles[0]).min() == 255 and np.asarray(tiles[3]).max() == 0  # row-major crops
    assert np.asarray(tiles[-1]).shape == (32, 32, 3) and np.asarray(tiles[-1])[:14, :14].min() == 255
    assert len(tile_image(np.zeros((32, 96, 3), np.uint8), 32, max_tiles=4)) == 4  # 3x1 + thumbnail
    assert len(tile_image(np.zeros((20, 20, 3), np.uint8), 32, max_tiles=4)) == 1  # small: one tile, no thumbnail


def test_region_cells_nearest_and_never_empty():
    mask = np.zeros((64, 64), bool)
    mask[0:32, 0:16] = True
    cells = region_cells(mask, 4)
    assert cells.tolist() == [[True, False, False, False], [True, False, False, False]] + [[False] * 4] * 2
    tiny = np.zeros((64, 64), bool)
    tiny[40:42, 50:52] = True  # covers no cell centre
    cells = region_cells(tiny, 4)
    assert int(cells.sum()) == 1 and bool(cells[2, 3])


def test_prompt_counts_and_template(loaded):
    model, tok, policy = loaded
    image, mask = sample()
    prompt, visual = policy.encode(image, "Describe region1.", [mask], key="s0")
    tiles, k = visual.pixel_values.shape[0], int(visual.region_masks.sum())
    assert prompt.startswith("<|im_start|>user\n<img>") and prompt.endswith("<|im_start|>assistant\n")
    assert "There are 1 part regions in the picture: region1<vp>" in prompt
    assert prompt.count(IMG_CONTEXT) == tiles * model.num_image_token + k
    ids = torch.tensor([tok(prompt).input_ids])
    embeds = policy.embed(model, ids, [visual])
    with torch.no_grad():
        vit = model.extract_feature(visual.pixel_values)  # [tiles, T, C]
    slots = (ids[0] == policy.context_id).nonzero().flatten()
    n = tiles * model.num_image_token
    torch.testing.assert_close(embeds[0, slots[:n]], vit.reshape(n, -1))
    torch.testing.assert_close(embeds[0, slots[n:]], vit[-1][visual.region_masks[0].flatten()])  # LAST tile


# ----------------------------------------------------------------------------------------- loading
def test_loader_refuses_remote_code_unless_asked(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "sa2va_chat", "architectures": ["Sa2VAChatModel"]}))
    assert is_sa2va_checkpoint(str(tmp_path))
    with pytest.raises(ValueError, match="--trust_remote_code"):
        load_sa2va(str(tmp_path))


def test_lora_freezes_vision_and_decoder_and_save_merges(tiny_sa2va, tmp_path):
    model, tok = load_sa2va(tiny_sa2va)
    prepare_for_training(model, Sa2VAModelArgs(lora_r=4, lora_alpha=8))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert not any(p.requires_grad for m in (model.vision_model, model.mlp1, model.grounding_encoder,
                                             model.text_hidden_fcs) for p in m.parameters())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # a trained adapter: changes the outputs
    policy = Sa2VAPolicy(model.eval(), tok)  # eval: no LoRA dropout
    image, mask = sample()
    prompt, visual = policy.encode(image, "Describe.", [mask], key="s")
    ids = torch.tensor([tok(prompt).input_ids])
    with torch.no_grad():
        before = policy._logits(model, ids, torch.ones_like(ids), 3, [visual])
    save_sa2va(model, tok, str(tmp_path))
    assert os.path.exists(tmp_path / "lora_adapter" / "adapter_config.json")
    again, tok2 = load_sa2va(str(tmp_path))
    with torch.no_grad():
        after = Sa2VAPolicy(again, tok2)._logits(again.eval(), ids, torch.ones_like(ids), 3, [visual])
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lora_r", [0, 4])
def test_bf16_checkpoint_trains_fp32_master_weights_frozen_stay_bf16(tiny_sa2va, lora_r):
    """bf16 on: the model loads in bf16; what trains is fp32 (LoRA adapters, or the whole LLM with lora_r 0, and the
    vision tower when asked), what is frozen stays bf16."""
    model, _tok = load_sa2va(tiny_sa2va, dtype=torch.bfloat16)
    prepare_for_training(model, Sa2VAModelArgs(lora_r=lora_r, lora_alpha=8, train_vision=True))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.float32 for p in model.vision_model.parameters())
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)


# ----------------------------------------------------------------------------------------- generate
def test_generate_new_tokens_only_non_empty(loaded):
    model, tok, policy = loaded
    image, mask = sample()
    prompt, visual = policy.encode(image, "Describe.", [mask], key="s")
    ids = tok(prompt).input_ids
    gc = GenerationConfig(max_new_tokens=5, min_new_tokens=5, do_sample=True, pad_token_id=0)
    gen = policy.generate(model, [ids] * 3, gc, LogitsGuard(eos_token_id=2), contexts=[visual] * 3)
    assert [len(c) for c in gen.completion_ids] == [5, 5, 5]  # new tokens only, never prompt + new, never empty
    assert all(not any(r) for r in gen.repaired)


def two_prompts(tok, policy, question_a: str, question_b: str):
    """Two samples whose prompts differ in length: image 0 with its region prompt, and a 48x32 image 1 without one;
    (ids_a, visual_a, ids_b, visual_b)."""
    (img_a, mask_a), (img_b, _) = sample(0), sample(1, h=48, w=32)
    prompt_a, vis_a = policy.encode(img_a, question_a, [mask_a], key="a")
    prompt_b, vis_b = policy.encode(img_b, question_b, None, key="b")
    ids_a, ids_b = tok(prompt_a).input_ids, tok(prompt_b).input_ids
    assert len(ids_a) != len(ids_b)
    return ids_a, vis_a, ids_b, vis_b


def test_batched_generation_greedy_equals_one_call_per_group(loaded):
    """Two groups (different images, regions and prompt lengths) in one generate() from left-padded inputs_embeds:
    greedy completions equal one unpadded generate() per group."""
    model, tok, policy = loaded
    ids_a, vis_a, ids_b, vis_b = two_prompts(tok, policy, "Describe the region.",
                                             "What is in this picture? Answer briefly.")
    gc = GenerationConfig(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=2)
    gen = policy.generate(model, [ids_a] * 2 + [ids_b] * 3, gc, LogitsGuard(eos_token_id=2),
                          contexts=[vis_a] * 2 + [vis_b] * 3)
    lm = lm_parts(model)[0]
    reference = []
    for ids, vis, n in ((ids_a, vis_a, 2), (ids_b, vis_b, 3)):
        t = torch.tensor([ids] * n)
        with torch.no_grad():
            out = lm.generate(inputs_embeds=policy.embed(model, t[:1], [vis]).expand(n, -1, -1),
                              attention_mask=torch.ones_like(t), generation_config=gc,
                              logits_processor=[policy.banned])
        reference += [r[:next((i + 1 for i, x in enumerate(r) if x == 2), len(r))] for r in out.tolist()]
    assert gen.completion_ids == reference and reference[0] != reference[-1] and all(reference)
    assert [len(r) for r in gen.repaired] == [len(c) for c in reference]


def per_completion_masks(model, policy, prompt_ids, completion_ids, contexts):
    """The former GroundedPolicy.segment: one unpadded LLM forward over [prompt, whole completion] per row with
    [SEG], the state at its first [SEG] decoded alone (one image encoding per image). Also returns the states."""
    out, states = [None] * len(prompt_ids), {}
    with torch.no_grad():
        for i, (p, c, vis) in enumerate(zip(prompt_ids, completion_ids, contexts)):
            if policy.seg_id not in c:
                continue
            ids = torch.tensor([p + c])
            hidden = lm_parts(model)[1](inputs_embeds=policy.embed(model, ids, [vis]), use_cache=False)
            pos = len(p) + c.index(policy.seg_id)
            states[i] = hidden.last_hidden_state[0, pos]
            out[i] = decode_masks(model, states[i][None], vis.image)[0].numpy()
    return out, states


def test_segment_one_batched_forward_equals_per_completion(loaded):
    """Two images (a region prompt and a plain one: different prompt lengths), G=4 rows each sharing the image;
    [SEG] at different positions, a second [SEG], a row without: the masks equal the per-completion path's, from
    one LLM forward and one grounding encoding per distinct image."""
    model, tok, policy = loaded
    ids_a, vis_a, ids_b, vis_b = two_prompts(tok, policy, "Please segment the region.", "Please segment it.")
    seg = policy.seg_id
    w = [tok(x, add_special_tokens=False).input_ids[0] for x in ("red", "the", "cat", "Sure")]
    completions = [[seg], [w[0], seg, w[1]], [w[3], w[2], w[1], seg, w[0], seg], [w[0], w[1]],
                   [w[1], seg], [w[2], w[0], w[3], w[3], seg, w[2]], [seg, w[1], w[1]], [w[0], w[1], w[2], seg]]
    prompts, contexts = [ids_a] * 4 + [ids_b] * 4, [vis_a] * 4 + [vis_b] * 4
    backbone, sam2 = lm_parts(model)[1], model.grounding_encoder.sam2_model
    forwards, encodes, states = [], [], []
    hooks = [backbone.register_forward_pre_hook(lambda m, a, k: forwards.append(1), with_kwargs=True),
             model.text_hidden_fcs.register_forward_hook(lambda m, a, o: states.append(a[0]))]
    forward_image = sam2.forward_image
    sam2.forward_image = lambda pixels: encodes.append(1) or forward_image(pixels)
    try:
        masks = policy.segment(model, prompts, completions, contexts)
    finally:
        for h in hooks:
            h.remove()
        del sam2.forward_image
    assert len(forwards) == 1 and len(encodes) == 2  # one LLM forward, one encoding per distinct image
    want, want_states = per_completion_masks(model, policy, prompts, completions, contexts)
    assert masks[3] is None and want[3] is None
    rows = [i for i in range(8) if i != 3]
    got_states = torch.cat(states)  # decoded image by image, rows in order within each
    # not bit-identical: cutting rows after [SEG] (another length) and padding them into one batch (a masked
    # attention) let the kernels sum in another order; the states differ by a few fp32 ulps (4.8e-7 at |x| ~ 3)
    torch.testing.assert_close(got_states, torch.stack([want_states[i] for i in rows]), rtol=1e-5, atol=1e-6)
    for i in rows:
        assert masks[i].shape == contexts[i].image.shape[:2] and masks[i].dtype == bool
        # equal masks, except where the reference's logit is within fp32 noise of 0: the random tiny decoder's logits
        # are ~3e-4 at most, and the batched forward's last-ulp differences moved one of 2240 pixels' logit (9e-8)
        # across 0 on the locked versions
        h, w = contexts[i].image.shape[:2]
        with torch.no_grad():
            logit = F.interpolate(mask_logits(model, want_states[i][None], encode_image(model, contexts[i].image))
                                  [:, None].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        undecided = (logit.abs() < 1e-3 * logit.abs().max()).numpy()
        assert np.array_equal(masks[i] | undecided, want[i] | undecided), i
        assert undecided.mean() < 0.05, i  # the test still decides almost every pixel
    assert len({masks[i].tobytes() for i in rows}) > 2 and any(0 < masks[i].mean() < 1 for i in rows)


def test_banned_tokens_never_sampled_and_never_scored(loaded):
    model, tok, policy = loaded
    vocab = model.language_model.config.vocab_size
    banned = policy.banned.banned + list(range(len(tok), vocab))
    assert len(tok) < vocab and IMG_CONTEXT in tok.convert_ids_to_tokens(policy.banned.banned)
    boost = lambda m, a, o: o.index_fill(-1, torch.tensor(banned), 50.0)  # noqa: E731
    hook = lm_parts(model)[2].register_forward_hook(boost)
    image, mask = sample()
    prompt, visual = policy.encode(image, "Describe.", [mask], key="s")
    ids = tok(prompt).input_ids
    gc = GenerationConfig(max_new_tokens=6, do_sample=True, pad_token_id=0)
    try:
        gen = policy.generate(model, [ids] * 4, gc, None, contexts=[visual] * 4)
        assert not any(t in banned for c in gen.completion_ids for t in c)
        off = Sa2VAPolicy(model, tok)
        off.banned = BannedTokens(vocab, [])  # counterfactual: without the ban they dominate
        gen_off = off.generate(model, [ids] * 4, gc, None, contexts=[visual] * 4)
        assert sum(t in banned for c in gen_off.completion_ids for t in c) > 12
    finally:
        hook.remove()


def test_stop_strings_cut_phi3_completions(tiny_sa2va):
    model, tok = load_sa2va(tiny_sa2va)
    model.config.template = "phi3_chat"  # <|end|> is text here, not a token
    policy = Sa2VAPolicy(model, tok)
    assert policy.stop_strings == ["<|end|>"]
    row = tok("red square", add_special_tokens=False).input_ids
    tail = tok("<|end|> blue", add_special_tokens=False).input_ids
    n = policy._cut_stop_strings(row + tail)
    assert tok.decode((row + tail)[:n]).endswith("<|end|>") and "blue" not in tok.decode((row + tail)[:n])
    assert policy._cut_stop_strings(row) == len(row)


# ----------------------------------------------------------------------------------------- scoring
def test_logprobs_fp32_with_grad_match_unpadded(loaded):
    model, tok, policy = loaded
    prepare_for_training(model, Sa2VAModelArgs(lora_r=0))
    rows = []
    for seed, (h, w) in enumerate([(40, 56), (64, 64)]):  # 1 tile vs 4 tiles + thumbnail: different lengths
        image, mask = sample(seed, h, w)
        prompt, visual = policy.encode(image, "Describe.", [mask], key=str(seed))
        rows.append((tok(prompt).input_ids, [20 + seed, 21, 22][: 2 + seed], visual))
    P = max(len(r[0]) for r in rows)
    K = max(len(r[1]) for r in rows)
    prompt_ids = torch.tensor([[0] * (P - len(p)) + p for p, _, _ in rows])
    prompt_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p, _, _ in rows])
    comp = torch.tensor([c + [0] * (K - len(c)) for _, c, _ in rows])
    comp_mask = torch.tensor([[1] * len(c) + [0] * (K - len(c)) for _, c, _ in rows])
    logps, ent = policy.logprobs(model, prompt_ids, prompt_mask, comp, comp_mask, contexts=[r[2] for r in rows])
    assert logps.dtype == torch.float32 and logps.requires_grad
    logps.sum().backward()
    assert model.language_model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        for b, (p, c, visual) in enumerate(rows):
            ids = torch.tensor([p + c])
            logits = policy._logits(model, ids, torch.ones_like(ids), len(c) + 1, [visual])[0, :-1]
            want = F.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
            torch.testing.assert_close(logps[b, : len(c)].detach(), want, rtol=1e-5, atol=1e-5)
            assert (logps[b, len(c):] == 0).all()


def test_segment_first_seg_mask_at_image_size(loaded):
    model, tok, policy = loaded
    image, mask = sample(h=40, w=56)
    prompt, visual = policy.encode(image, "Please segment it.", None, key="s")
    p = tok(prompt).input_ids
    seg, word = policy.seg_id, tok("red", add_special_tokens=False).input_ids[0]
    masks = policy.segment(model, [p, p], [[word, seg, word], [word, word]], [visual, visual])
    assert masks[1] is None  # no [SEG]: no mask, reward 0
    assert masks[0].shape == (40, 56) and masks[0].dtype == bool
    with torch.no_grad():  # the state at the [SEG] position, decoded as upstream does
        ids = torch.tensor([p + [word, seg, word]])
        hidden = lm_parts(model)[1](inputs_embeds=policy.embed(model, ids, [visual])).last_hidden_state
        want = decode_masks(model, hidden[0, len(p) + 1:len(p) + 2], image)[0].numpy()
    assert np.array_equal(masks[0], want)

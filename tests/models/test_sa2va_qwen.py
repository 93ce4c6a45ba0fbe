"""Sa2VAQwenPolicy on tiny Qwen2.5-VL / Qwen3-VL Sa2VA checkpoints built from the pristine upstream code
(tests/upstream/qwen_vl.py): inputs as upstream's predict_forward builds them, generate -> logprobs with M-RoPE
positions from the model, [SEG] -> the mask upstream computes, one SAM2 encoding per image.

SAM2 is upstream's hard-coded Hiera-L (~15 s per 1024x1024 encoding on 2 CPU cores): each family encodes twice
(upstream's predict_forward once, the policy once)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

FAMILIES = ["qwen2_5_vl", "qwen3vl"]
QUESTION = "Please segment the red box."
PATHS: dict[str, str] = {}


@pytest.fixture(scope="module", params=FAMILIES)
def qwen(request, upstream_ckpts):
    """(family, model fp32, processor, policy) for a freshly built tiny checkpoint; its path in PATHS."""
    from sa2va_rl.models.sa2va_qwen import Sa2VAQwenPolicy
    from sa2va_rl.models.upstream import load_upstream
    from tests.upstream.qwen_vl import load_processor

    path = upstream_ckpts(request.param)
    PATHS[request.param] = path
    torch.manual_seed(0)
    model, info = load_upstream(path, torch.float32)
    model.eval()
    processor = load_processor(path)
    return request.param, model.eval(), processor, Sa2VAQwenPolicy(model, processor)


def image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


class Force(LogitsProcessor):
    """Makes the LLM write ``ids`` (then repeat the last): a [SEG] from random weights."""

    def __init__(self, ids: list[int]) -> None:
        self.ids, self.step = ids, 0

    def __call__(self, input_ids, scores):
        out = torch.full_like(scores, -torch.inf)
        out[:, self.ids[min(self.step, len(self.ids) - 1)]] = 0
        self.step += 1
        return out


@contextlib.contextmanager
def counting_encodes(model):
    """Counts SAM2 image encodings (``sam2_model.forward_image``)."""
    sam = model.grounding_encoder.sam2_model
    calls = [0]
    original = sam.forward_image

    def forward_image(x):
        calls[0] += 1
        return original(x)

    sam.forward_image = forward_image
    try:
        yield calls
    finally:
        del sam.forward_image


@pytest.fixture(scope="module")
def upstream_run(qwen):
    """One upstream predict_forward on CPU with a forced ``[SEG]<|im_end|>``: the inputs it passes to generate,
    its generate output (hidden states) and its mask. Test-only shims for upstream's CUDA-only spots (sam2.py
    ``.cuda()`` and ``init_state``'s device): they move nothing, the run stays on CPU. And one for precision:
    upstream's ``preprocess_image`` normalises the SAM2 pixels with the ImageNet mean/std rounded to bf16 (its
    ``dtype`` default, whatever the model's dtype; up to 0.008 off in normalised pixels), where sa2va-rl uses the
    exact constants; the shim passes the model's dtype (fp32 here), so the masks can be compared exactly."""
    family, model, processor, policy = qwen
    tok = processor.tokenizer
    seg, end = tok.convert_tokens_to_ids("[SEG]"), tok.convert_tokens_to_ids("<|im_end|>")
    captured: dict = {}
    inner, sam = model.model, model.grounding_encoder.sam2_model
    generate, init_state = inner.generate, sam.init_state
    preprocess = model.grounding_encoder.preprocess_image

    def capture(**kw):
        captured.update({k: v.clone() for k, v in kw.items() if torch.is_tensor(v)})
        kw.update(max_new_tokens=4, logits_processor=LogitsProcessorList([Force([seg, end])]))
        captured["output"] = generate(**kw)
        return captured["output"]

    def init_state_here(images):
        state = init_state(images)
        state["device"] = state["storage_device"] = images.device
        return state

    img = image(48, 64)
    with pytest.MonkeyPatch.context() as mp, counting_encodes(model) as calls, torch.no_grad():
        mp.setattr(inner, "generate", capture)
        mp.setattr(sam, "init_state", init_state_here)
        mp.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
        mp.setattr(model.grounding_encoder, "preprocess_image", lambda im: preprocess(im, dtype=model.torch_dtype))
        result = model.predict_forward(image=Image.fromarray(img), text="<image>" + QUESTION, processor=processor)
    assert calls[0] == 1 and result["prediction"].startswith("[SEG]")
    return img, captured, result


def test_inputs_equal_upstream_predict_forward(qwen, upstream_run):
    family, model, processor, policy = qwen
    img, captured, _result = upstream_run
    prompt, visual = policy.encode(img, QUESTION, None, "sample:0")
    ids = policy.tokenizer(text=prompt)["input_ids"]  # as TRL tokenizes a text prompt
    assert ids == captured["input_ids"][0].tolist()
    assert torch.equal(visual.pixel_values, captured["pixel_values"])
    assert torch.equal(visual.image_grid_thw, captured["image_grid_thw"])
    n = int(captured["image_grid_thw"].prod()) // 4
    assert ids.count(policy.image_id) == n
    assert torch.equal(policy.model_inputs(torch.tensor([ids]), [visual])["mm_token_type_ids"],
                       captured["mm_token_type_ids"])


def test_segment_matches_upstream_mask_one_encoding(qwen, upstream_run):
    family, model, processor, policy = qwen
    img, captured, result = upstream_run
    prompt, visual = policy.encode(img, QUESTION, None, "sample:0")
    p = policy.tokenizer(text=prompt)["input_ids"]
    seq = captured["output"].sequences[0].tolist()
    completion = seq[len(p):]
    assert completion[0] == policy.seg_id
    # the hidden state at [SEG] (the state when [SEG] is fed back), upstream's from its generate() cache
    theirs = torch.cat([h[-1][0] for h in captured["output"].hidden_states])[len(p)]
    ours = policy._hidden(model, torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long), [visual])[0, len(p)]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    from sa2va_rl.models.sa2va_qwen import qwen_parts

    forwards = []  # Qwen-VL backbone forwards: one for both rows with [SEG]
    hook = qwen_parts(model)[1].register_forward_pre_hook(lambda m, a: forwards.append(1))
    try:
        with counting_encodes(model) as calls:  # two rows of one group share the image: one encoding
            masks = policy.segment(model, [p, p, p], [completion, completion, completion[1:]], [visual] * 3)
    finally:
        hook.remove()
    assert calls[0] == 1 and len(forwards) == 1
    assert masks[2] is None  # no [SEG]
    up = result["prediction_masks"][0][0]
    assert masks[0].shape == img.shape[:2] == up.shape and masks[0].dtype == bool
    assert np.array_equal(masks[0], masks[1])
    agree = (masks[0] == up).mean()
    print(f"{family}: mask agreement with upstream {agree:.6f}, fg {up.mean():.3f}")
    assert np.array_equal(masks[0], up)


def test_generate_logprobs_round_trip_padded_equals_unpadded(qwen):
    """Greedy completions come back as new tokens only, and the policy's own forward (M-RoPE positions from
    input_ids + image_grid_thw + attention mask) picks the same tokens; padded-batch logprobs are fp32, finite,
    and equal each row's unpadded ones."""
    from sa2va_rl.numerics import LogitsGuard

    family, model, processor, policy = qwen
    region = np.zeros((30, 70), dtype=bool)
    region[5:20, 10:40] = True
    samples = [policy.encode(image(40, 40, 1), QUESTION, None, "a"),
               policy.encode(image(30, 70, 2), "Describe the masked region in detail.", [region], "b")]
    prompts = [policy.tokenizer(text=p)["input_ids"] for p, _ in samples]
    assert len(prompts[0]) != len(prompts[1])
    end = policy.tokenizer.convert_tokens_to_ids("<|im_end|>")
    gc = GenerationConfig(do_sample=False, max_new_tokens=4, eos_token_id=[end], pad_token_id=policy.pad_token_id)
    rows = [prompts[0]] * 2 + [prompts[1]] * 2
    contexts = [samples[0][1]] * 2 + [samples[1][1]] * 2
    with torch.no_grad():
        gen = policy.generate(model, rows, gc, LogitsGuard(eos_token_id=end), contexts=contexts)
    assert all(1 <= len(c) <= 4 for c in gen.completion_ids)
    assert [len(r) for r in gen.repaired] == [len(c) for c in gen.completion_ids]
    assert not any(t in policy.banned.banned or t >= policy.vocab_limit for c in gen.completion_ids for t in c)
    assert gen.completion_ids[0] == gen.completion_ids[1]
    P, K = max(map(len, rows)), max(map(len, gen.completion_ids))
    pad = policy.pad_token_id
    prompt_ids = torch.tensor([[pad] * (P - len(p)) + p for p in rows])
    prompt_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in rows])
    comp = torch.tensor([c + [pad] * (K - len(c)) for c in gen.completion_ids])
    comp_mask = torch.tensor([[1] * len(c) + [0] * (K - len(c)) for c in gen.completion_ids])
    with torch.no_grad():
        logps, _ent = policy.logprobs(model, prompt_ids, prompt_mask, comp, comp_mask, contexts=contexts)
        assert logps.dtype == torch.float32 and bool(torch.isfinite(logps).all())
        for b, (p, c, ctx) in enumerate(zip(rows, gen.completion_ids, contexts)):
            one, _ = policy.logprobs(model, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long),
                                     torch.tensor([c]), torch.ones(1, len(c), dtype=torch.long), contexts=[ctx])
            torch.testing.assert_close(logps[b, :len(c)], one[0], rtol=1e-5, atol=1e-5)
            assert (logps[b, len(c):] == 0).all()
            ids = torch.tensor([p + c])
            logits = policy._logits(model, ids, torch.ones_like(ids), len(c) + 1, [ctx])[0, :-1]
            assert logits.argmax(-1).tolist() == c  # greedy under generate() == greedy under our forward
            assert bool((logits[:, policy.banned.banned] == -torch.inf).all())


def test_region_prompt_box_in_the_backbones_coordinates(qwen):
    from sa2va_rl.models.sa2va_qwen import QWEN3_VL, region_box

    family, model, processor, policy = qwen
    assert policy.family == ("qwen3vl" if family == "qwen3vl" else "qwen2_5_vl")
    mask = np.zeros((30, 70), dtype=bool)
    mask[5:20, 10:40] = True
    prompt, visual = policy.encode(image(30, 70, 2), "Describe the masked region in detail.", [mask], "b")
    t, h, w = visual.image_grid_thw[0].tolist()
    patch = processor.image_processor.patch_size
    if family == "qwen3vl":  # 0-1000 of the image's width and height
        box = [round(10 / 70 * 1000), round(5 / 30 * 1000), round(40 / 70 * 1000), round(20 / 30 * 1000)]
    else:  # absolute pixels of the image the model sees (the processor's resize)
        sx, sy = w * patch / 70, h * patch / 30
        box = [round(10 * sx), round(5 * sy), round(40 * sx), round(20 * sy)]
    assert region_box(mask, (h * patch, w * patch), relative=policy.family == QWEN3_VL) == box
    assert f"There are 1 part regions in the picture: region1 [{', '.join(map(str, box))}].\n" \
           "Describe the masked region in detail.<|im_end|>" in prompt
    with pytest.raises(ValueError, match="b: empty region mask"):
        policy.encode(image(30, 70, 2), "Describe.", [np.zeros((30, 70), dtype=bool)], "b")


def distinct_words(completions, **kwargs):
    return [len(set(c.split())) / 10.0 for c in completions]


def test_grpo_step_both_tasks(qwen, gar_dir, tmp_path):
    """One GRPO step of ``--task both`` (mask2caption rows with the box prompt, caption2mask rows) through
    Sa2VAGRPOTrainer; the LLM's tensors change and the run stays finite. A fresh load: training mutates it."""
    import json

    from sa2va_rl.data.gar import GARReader
    from sa2va_rl.models.sa2va_qwen import Sa2VAQwenPolicy, qwen_parts
    from sa2va_rl.models.upstream import load_upstream
    from sa2va_rl.rl.config import Sa2VAGRPOConfig
    from sa2va_rl.rl.tasks import GARTaskDataset, task_list, task_rewards
    from sa2va_rl.rl.trainer import Sa2VAGRPOTrainer

    family, _model, processor, _policy = qwen
    torch.manual_seed(0)
    model, _info = load_upstream(PATHS[family], torch.float32)
    model.generation_config = GenerationConfig.from_pretrained(PATHS[family])  # the CLI's loader does this
    for p in model.parameters():
        p.requires_grad_(False)
    llm = qwen_parts(model)[1].language_model
    for p in llm.parameters():
        p.requires_grad_(True)
    policy = Sa2VAQwenPolicy(model, processor)
    tasks = task_list("both")
    funcs, weights = task_rewards(tasks)
    funcs, weights = funcs + [distinct_words], weights + [1.0]  # random weights: some reward spread per group
    data = GARTaskDataset(GARReader(gar_dir), policy, tasks)
    assert "part regions in the picture: region1 [" in data[0]["prompt"] and data[1]["task"] == "caption2mask"
    args = Sa2VAGRPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, num_generations=2,
                           max_completion_length=4, warmup_steps=0, learning_rate=1e-2, save_strategy="no",
                           disable_tqdm=True, seed=0, report_to=[], reward_weights=weights)
    trainer = Sa2VAGRPOTrainer(model=model, reward_funcs=funcs, args=args, policy=policy,
                               train_dataset=data.to_dataset(), processing_class=policy.tokenizer)
    before = {n: p.detach().clone() for n, p in llm.named_parameters()}
    trainer.train()
    after = dict(llm.named_parameters())
    assert [n for n, p in before.items() if torch.equal(p, after[n].detach())] == []
    with open(tmp_path / "stability.json") as f:
        report = json.load(f)
    assert report["final_weights_finite"] and report["empty_completions"] == 0 and report["skipped_steps"] == 0

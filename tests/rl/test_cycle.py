"""The cycle reward (rl/cycle.py, ``--cycle_reward``): each mask2caption caption segmented again by the listener on
the same image, IoU with the row's region. Equal to what upstream's own predict_forward gives for the same caption
and prompt; one SAM2 encoding per distinct image per step; None on caption2mask rows; the CLI flag end to end."""

import contextlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LogitsProcessorList

from sa2va_rl import cli
from sa2va_rl.models.grounding import ImageCache
from sa2va_rl.models.sa2va import lm_parts, load_sa2va, make_policy
from sa2va_rl.rl import cycle
from sa2va_rl.rl.rewards import mask_overlap
from sa2va_rl.rl.tasks import task_list, task_rewards
from tests.models.test_sa2va_qwen import Force
from tests.rl.test_sa2va_trainer import make as make_trainer


@contextlib.contextmanager
def counting(obj, name: str):
    """Counts calls of ``obj.name`` (an instance attribute shadows the method for the duration)."""
    calls = [0]
    original = getattr(obj, name)

    def counted(*a, **k):
        calls[0] += 1
        return original(*a, **k)

    setattr(obj, name, counted)
    try:
        yield calls
    finally:
        delattr(obj, name)


def iou(a, b) -> float:
    inter, union = mask_overlap(a, b)
    return inter / union if union else 0.0


def test_cycle_iou_contract():
    region = np.zeros((4, 4), bool)
    region[:2, :2] = True
    half = np.zeros((4, 4), bool)
    half[:2, :1] = True
    got = cycle.cycle_iou(["a", "b", "c"], cycle_mask=[half, None, None], region_mask=[region, region, None])
    assert got == [0.5, 0.0, None]  # no mask -> 0; a caption2mask row (no region) -> no opinion
    assert cycle.cycle_iou(["a"], cycle_mask=[half]) == [None]  # no region column at all (caption2mask only)
    long = " ".join(["w"] * 25)
    assert cycle.length_factor(long) == 1.0 and cycle.length_factor("w") == pytest.approx(1 - 0.5 * 24 / 25)
    assert cycle.length_factor("") == 0.5 and cycle.length_factor(" ".join(["w"] * 240)) == pytest.approx(0.7)
    assert cycle.cycle_iou_x_length([long, "w"], cycle_mask=[half, half], region_mask=[region, region]) == \
        [0.5, pytest.approx(0.5 * (1 - 0.5 * 24 / 25))]
    assert cycle.clean_caption(" a [SEG] red<IMG_CONTEXT>  box<|end|>\n") == "a red box"
    assert cycle.cycle_reward(False).__name__ == "cycle_iou" and cycle.needs_cycle_masks([cycle.cycle_reward(True)])


def test_task_rewards_appends_the_cycle_reward_and_refuses_caption2mask_by_flag():
    funcs, weights = task_rewards(["mask2caption", "caption2mask"], cycle_weight=0.5)
    assert [f.__name__ for f in funcs] == ["caption_meteor", "mask_iou", "format_reward", "cycle_iou"]
    assert weights == [1.0, 1.0, 0.2, 0.5]
    assert task_rewards(["mask2caption"])[0][-1].__name__ == "format_reward"  # off by default
    with pytest.raises(ValueError, match="--cycle_reward"):
        task_rewards(["caption2mask"], cycle_weight=1.0)


def test_cli_refuses_cycle_reward_with_caption2mask_naming_the_flag(tiny_sa2va, gar_dir, tmp_path, capsys):
    rc = cli.main(["train", "--model_path", tiny_sa2va, "--data_dir", gar_dir, "--output_dir", str(tmp_path / "o"),
                   "--task", "caption2mask", "--cycle_reward", "1", "--max_steps", "1", "--report_to", "none"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_USAGE and "--cycle_reward" in err and "caption2mask" in err
    rc = cli.main(["train", "--model_path", tiny_sa2va, "--data_dir", gar_dir, "--output_dir", str(tmp_path / "o"),
                   "--cycle_length_factor", "true", "--max_steps", "1", "--report_to", "none"])
    assert rc == cli.EXIT_USAGE and "--cycle_reward" in capsys.readouterr().err


@pytest.fixture(scope="module")
def upstream_v1(upstream_ckpts):
    """(model fp32, tokenizer, policy) of a tiny upstream v1 build (Sa2VA-4B's layout: phi3_chat on Qwen2)."""
    path = upstream_ckpts("v1")
    model, tok = load_sa2va(path, torch.float32, trust_remote_code=True)
    model.eval()
    model.preparing_for_generation(tok, torch_dtype=torch.float32)  # else predict_forward casts it to bf16
    return model, tok, make_policy(model, tok, path, trust_remote_code=True)


def test_cycle_mask_equals_upstream_predict_forward_for_the_same_caption_and_prompt(upstream_v1):
    """Upstream's predict_forward, greedy, answering the cycle question with the SFT answer "Sure, [SEG]." (forced
    here: random weights), returns the mask whose IoU with the region is the cycle reward; the caption's prompt
    ids are upstream's. Test-only shims for upstream's CUDA-only spots (``.cuda()``, ``init_state``'s device) and
    its bf16-rounded SAM2 normalisation constants (as tests/models/test_sa2va_qwen.py)."""
    model, tok, policy = upstream_v1
    rng = np.random.default_rng(0)
    image = rng.integers(1, 255, size=(48, 64, 3), dtype=np.uint8)
    region = np.zeros((48, 64), bool)
    region[10:30, 20:50] = True
    _prompt, row_visual = policy.encode(image, "Describe the masked region in detail.", [region], "x:0")
    caption = "a red square at the left"
    answer = tok(text=cycle.CYCLE_ANSWER, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    lm, sam, enc = model.language_model, model.grounding_encoder.sam2_model, model.grounding_encoder
    generate, init_state, preprocess = lm.generate, sam.init_state, enc.preprocess_image
    captured = {}

    def forced(**kw):
        kw["logits_processor"] = LogitsProcessorList([Force(answer)])
        return generate(**kw)

    def generate_outer(**kw):  # Sa2VAChatModel.generate -> language_model.generate(inputs_embeds=...)
        captured["ids"] = kw["input_ids"][0].tolist()
        return outer(**kw)

    def init_state_here(images):
        state = init_state(images)
        state["device"] = state["storage_device"] = images.device
        return state

    outer = model.generate
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(lm, "generate", forced)
        mp.setattr(model, "generate", generate_outer)
        mp.setattr(sam, "init_state", init_state_here)
        mp.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
        mp.setattr(enc, "preprocess_image", lambda im: preprocess(im, dtype=torch.float32))
        result = model.predict_forward(image=Image.fromarray(image), text="<image>\n" + cycle.cycle_question(caption),
                                       tokenizer=tok)
    assert result["prediction"].startswith(cycle.CYCLE_ANSWER) and len(result["prediction_masks"]) == 1
    up = result["prediction_masks"][0][0]

    # the caption as sampled (template end and all), batched with a longer one on the same image (right padding)
    completions = [caption + "<|end|>", "a much longer caption about the green circle near the top right corner"]
    prompts, _visuals = cycle.cycle_prompts(policy, [cycle.clean_caption(c) for c in completions], [row_visual] * 2)
    assert prompts[0] == captured["ids"]  # upstream's prompt for this caption, token for token
    with counting(sam, "forward_image") as encodes:
        found = cycle.cycle_masks(policy, model, completions, [row_visual] * 2, ImageCache())
    assert encodes[0] == found.encodes == 1 and found.no_seg == 0
    mine = found.masks[0]
    assert mine.shape == up.shape == region.shape and mine.dtype == bool and 0 < up.mean() < 1
    print(f"mask agreement with upstream {(mine == up).mean():.6f}, fg {up.mean():.3f}")
    assert np.array_equal(mine, up)
    reward = cycle.cycle_iou(completions, cycle_mask=found.masks, region_mask=[region, region])
    assert reward[0] == iou(up, region)


def make(tiny_sa2va, gar_dir, out, task, lora_r=0, **overrides):
    """test_sa2va_trainer's trainer, with the task's rewards plus the cycle reward (weight 1), one step."""
    funcs, weights = task_rewards(task_list(task), cycle_weight=1.0)
    return make_trainer(tiny_sa2va, gar_dir, out, task, rewards=funcs, lora_r=lora_r,
                        **{"max_steps": 1, "reward_weights": weights, **overrides})


def batch(trainer, rows):
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    trainer.model.train()
    return [dict(trainer.train_dataset[i]) for i in rows for _ in range(trainer.num_generations)]


def test_one_sam2_encode_and_one_vit_pass_per_distinct_image_per_step(tiny_sa2va, gar_dir, tmp_path):
    trainer = make(tiny_sa2va, gar_dir, tmp_path, "mask2caption")
    model = trainer.model
    rows = batch(trainer, rows=(0, 1))  # 2 samples x G=4 captions: 2 distinct images
    with counting(model.grounding_encoder.sam2_model, "forward_image") as encodes:
        trainer._generate_and_score_completions(rows)
    assert encodes[0] == 2 and trainer._metrics["train"]["cycle/encodes"] == [2.0]
    assert 0.0 <= trainer._metrics["train"]["cycle/no_seg_frac"][0] <= 1.0
    # the cycle's own batch: 8 captions, one LLM forward, the vision tower once and SAM2 once per image, and none of
    # either for an image already encoded this step
    contexts = [r["visual"] for r in rows]
    cache = ImageCache()
    captions = [f"caption {i}" for i in range(8)]
    sam2 = model.grounding_encoder.sam2_model
    with counting(model, "extract_feature") as vit, counting(sam2, "forward_image") as sam, cycle.listener(model):
        found = cycle.cycle_masks(trainer.policy, model, captions, contexts, cache)
        again = cycle.cycle_masks(trainer.policy, model, captions, contexts, cache)
    assert model.training and model.vision_model.training  # the listener's eval mode ends with it
    assert vit[0] == 4 and sam[0] == 2 and found.encodes == 2 and again.encodes == 0  # ViT: 2 images x 2 calls
    assert all(np.array_equal(a, b) for a, b in zip(found.masks, again.masks))


def test_both_tasks_caption2mask_rows_get_none_and_the_listener_has_adapters_off(tiny_sa2va, gar_dir, tmp_path):
    trainer = make(tiny_sa2va, gar_dir, tmp_path, "both", lora_r=4)
    model = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():  # a trained adapter: the listener must not see it
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    seen = {}
    real = trainer._add_cycle_masks

    def spy(inputs, completions):
        out = real(inputs, completions)
        seen.update(rows=out, completions=completions)
        return out

    trainer._add_cycle_masks = spy
    trainer._generate_and_score_completions(batch(trainer, rows=(0, 1)))  # row 0: mask2caption, 1: caption2mask
    rows = seen["rows"]
    assert [r["task"] for r in rows] == ["mask2caption"] * 4 + ["caption2mask"] * 4
    assert all(r["cycle_mask"] is None for r in rows[4:]) and all(r["region_mask"] is None for r in rows[4:])
    assert all(r["gt_mask"] is None and r["region_mask"] is not None for r in rows[:4])
    rewards = trainer.last_generation.rewards_per_func[:, trainer.reward_func_names.index("cycle_iou")]
    assert torch.isnan(rewards[4:]).all() and torch.isfinite(rewards[:4]).all()  # caption2mask: no opinion
    want = cycle.cycle_iou(seen["completions"][:4], [r["cycle_mask"] for r in rows[:4]],
                           [r["region_mask"] for r in rows[:4]])
    assert rewards[:4].tolist() == pytest.approx(want)
    # the listener is the model with its adapters off: same LLM output as with LoRA B zeroed
    ids = torch.arange(5, 20)[None]
    lm = lm_parts(model)[0]
    with torch.no_grad(), cycle.listener(model):
        off = lm(input_ids=ids).logits
    with torch.no_grad():
        on = lm(input_ids=ids).logits
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.zero_()
        zeroed = lm(input_ids=ids).logits
    assert torch.equal(off, zeroed) and not torch.allclose(on, zeroed)


def test_cli_train_with_cycle_reward_logs_it(tiny_sa2va, gar_dir, tmp_path):
    out = str(tmp_path / "o")
    assert cli.main(["train", "--model_path", tiny_sa2va, "--data_dir", gar_dir, "--task", "mask2caption",
                     "--cycle_reward", "1", "--max_steps", "1", "--output_dir", out, "--max_completion_length", "6",
                     "--lora_r", "4", "--lora_alpha", "8", "--report_to", "none", "--disable_tqdm", "true",
                     "--logging_steps", "1", "--save_steps", "1"]) == 0
    with open(os.path.join(out, "checkpoint-1", "trainer_state.json")) as f:
        logged = json.load(f)["log_history"][0]
    assert 0.0 <= logged["rewards/cycle_iou/mean"] <= 1.0
    assert logged["cycle/encodes"] >= 1 and 0.0 <= logged["cycle/no_seg_frac"] <= 1.0

"""Think rollouts (``--seg_format think``, rl/think.py): [SEG] positions by part, the format reward, Hungarian mask
matching and answer_iou, the rows and rewards of the task, the trainer's answer-only masks (tiny Sa2VA, and the
released InternVL and Qwen3-VL code), and the CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from sa2va_rl import cli
from sa2va_rl.rl.think import (ThinkTags, answer_iou, answer_seg_positions, match_masks, seg_index,
                               think_format_reward, think_seg_positions, well_formed)

SEG = 7
# single-token tags (as Qwen3's tokenizer has <think> and </think>)
T1, T1C, A1, A1C = [100], [101], [102], [103]
# multi-token text tags: '<' 'think' '>', '</' 'think' '>', '<' 'answer' '>', '</' 'answer' '>'
PIECES = {60: "<", 61: "</", 62: ">", 63: "think", 64: "answer", 65: "><", 66: ">\n<", 5: " the", 6: " box",
          8: " left", 9: ".", SEG: "[SEG]"}
TM, TMC, AM, AMC = [60, 63, 62], [61, 63, 62], [60, 64, 62], [61, 64, 62]
THINK_TEXT = "<think> the red box [SEG] is at the left [SEG]</think>\n<answer> Sure, [SEG] and [SEG].</answer>"


# ----------------------------------------------------------------------------------------- positions
def test_positions_single_token_tags():
    ids = [100, 5, SEG, 6, 101, 102, SEG, 8, SEG, 103, SEG]  # a [SEG] after </answer> is outside both parts
    assert answer_seg_positions(ids, SEG, A1, A1C) == [6, 8]
    assert think_seg_positions(ids, SEG, T1, T1C, A1) == [2]
    no_close = [100, 5, 101, 102, SEG, 8, SEG]  # cut by max_completion_length: the answer runs to the end
    assert answer_seg_positions(no_close, SEG, A1, A1C) == [4, 6]
    only_think = [100, SEG, 5, 101, 102, 6, 103]
    assert answer_seg_positions(only_think, SEG, A1, A1C) == [] and think_seg_positions(only_think, SEG, T1,
                                                                                         T1C, A1) == [1]
    assert answer_seg_positions([SEG, 5, SEG], SEG, A1, A1C) == []  # no <answer>: no answer part
    # no </think>: the think part ends at <answer>
    assert think_seg_positions([100, SEG, 102, SEG, 103], SEG, T1, T1C, A1) == [1]
    # only the first <answer> opens the answer; a second one is inside it
    assert answer_seg_positions([102, SEG, 102, SEG, 103, SEG], SEG, A1, A1C) == [1, 3]


def test_positions_multi_token_tags_by_ids_and_by_text():
    ids = [*TM, 5, SEG, *TMC, *AM, 6, SEG, 9, *AMC]
    assert answer_seg_positions(ids, SEG, AM, AMC) == [12]
    assert think_seg_positions(ids, SEG, TM, TMC, AM) == [4]
    text_of = PIECES.__getitem__
    assert answer_seg_positions(ids, SEG, AM, AMC, text_of) == [12]
    # '</think><answer>' tokenized with the boundary merged ('><', '>\n<'): the tag ids are not there, the text is
    for merged in (65, 66):
        ids = [*TM, 5, SEG, 61, 63, merged, 64, 62, 6, SEG, *AMC, SEG]
        assert answer_seg_positions(ids, SEG, AM, AMC) == []  # id matching misses the merged tag
        assert answer_seg_positions(ids, SEG, AM, AMC, text_of) == [11]
        assert think_seg_positions(ids, SEG, TM, TMC, AM, text_of) == [4]


@pytest.mark.parametrize("tag_tokens", [False, True])
def test_think_tags_on_a_byte_level_tokenizer(tag_tokens):
    """Multi-token text tags (InternVL/Qwen2.5 vocabularies), and <think>/</think> as tokens (Qwen3's)."""
    from sa2va_rl.data.vocab import WORDS
    from sa2va_rl.models.tiny import word_tokenizer

    tok = word_tokenizer(WORDS + ["Sure"], extra_special=["[SEG]", "<|im_end|>"])
    if tag_tokens:
        tok.add_tokens(["<think>", "</think>"])
    seg = tok.convert_tokens_to_ids("[SEG]")
    tags = ThinkTags(tok, seg)
    assert (len(tags.think_open) == 1) == tag_tokens and len(tags.answer_open) > 1
    ids = tok.encode(THINK_TEXT + "<|im_end|>", add_special_tokens=False)
    segs = [j for j, t in enumerate(ids) if t == seg]
    assert len(segs) == 4
    assert tags.answer_positions(ids) == segs[2:] and tags.think_positions(ids) == segs[:2]
    # TRL's completions drop special tokens ([SEG] among them); the trainer's seg_text keeps [SEG] and the tags
    assert "[SEG]" not in tok.decode(ids, skip_special_tokens=True)
    assert tags.text(ids) == THINK_TEXT


class PieceTokenizer:
    """The multi-token tags of PIECES as a tokenizer: encode knows the four tags, decode joins pieces."""

    all_special_ids: list[int] = []
    TAGS = {"<think>": TM, "</think>": TMC, "<answer>": AM, "</answer>": AMC}

    def encode(self, text, add_special_tokens=False):
        return list(self.TAGS[text])

    def decode(self, ids, skip_special_tokens=False):
        return "".join(PIECES[i] for i in ids)


def test_seg_index_think_rows_answer_plain_rows_first_seg():
    tags = ThinkTags(PieceTokenizer(), SEG)
    think = [*TM, SEG, *TMC, *AM, SEG, 9, SEG, *AMC]
    plain = [5, SEG, 6, SEG]
    assert seg_index([think, plain, [5, 6], think], ["think", "plain", "plain", None], SEG, tags) == [
        [10, 12], [1], [], [3]]  # a row of no think format: its first [SEG], wherever it is
    with pytest.raises(ValueError, match="ThinkTags"):
        seg_index([think], ["think"], SEG, None)


# ----------------------------------------------------------------------------------------- format reward
@pytest.mark.parametrize("text,value", [
    ("<think>the box [SEG] is left</think> <answer>Sure, [SEG].</answer>", 1.0),
    ("\n<think>the box\nis left</think>\n<answer>[SEG]</answer>\n", 0.5),
    ("<think>the box is left</think><answer>[SEG] and [SEG]</answer><|end|>", 0.5),  # a stop marker may trail
    ("<think>the box [SEG]</think><answer>Sure.</answer>", 0.0),  # [SEG] in the think part only
    ("<think>the box [SEG]</think><answer>Sure, [SEG].", 0.0),  # no </answer>
    ("<think>the box</think> it is <answer>[SEG]</answer>", 0.0),  # text between the blocks
    ("<think>the box</think><answer>[SEG]</answer> done", 0.0),  # text after the answer
    ("<answer>[SEG]</answer><think>the box</think>", 0.0),  # answer first
    ("<think>the box</think><answer>[SEG]</answer><answer>[SEG]</answer>", 0.0),  # two answers
    ("<think><think>the box</think><answer>[SEG]</answer>", 0.0),  # a tag inside the think part
    ("<think> [SEG] </think><answer>[SEG]</answer>", 0.0),  # no reasoning besides [SEG]
    ("Sure, [SEG].", 0.0),
])
def test_think_format_reward_values(text, value):
    assert think_format_reward([text], seg_format=["think"], task=["caption2mask"]) == [value]
    # every 0 but the [SEG]-in-think-only case is a malformed completion
    assert (well_formed(text) is not None) == (value > 0 or text.endswith("<answer>Sure.</answer>"))


def test_think_format_reward_no_opinion_and_reads_seg_text():
    good = "<think>the box [SEG]</think><answer>[SEG]</answer>"
    assert think_format_reward([good, good, good], seg_format=["plain", None, "think"],
                               task=["caption2mask", "mask2caption", "mask2caption"]) == [None, None, None]
    assert think_format_reward([good], seg_format=None) == [None]
    # TRL's text without [SEG]; the trainer's seg_text with it
    trl_text = good.replace("[SEG]", "")
    assert think_format_reward([trl_text], seg_format=["think"]) == [0.0]
    assert think_format_reward([trl_text], seg_format=["think"], seg_text=[good]) == [1.0]


# ----------------------------------------------------------------------------------------- matching and IoU
def strip(lo: int, hi: int) -> np.ndarray:
    """A 1 x 20 bool mask true on columns lo..hi-1."""
    m = np.zeros((1, 20), bool)
    m[0, lo:hi] = True
    return m


def test_hungarian_beats_greedy_on_a_two_by_two():
    gt = [strip(0, 10), strip(10, 20)]
    pred = [strip(0, 16), strip(0, 5)]  # IoU: p0-g0 10/16, p0-g1 6/20, p1-g0 5/10, p1-g1 0
    # greedy takes the best pair first (p0-g0, 0.625) and is left with p1-g1 (0): 0.625 in all
    pairs, ious = match_masks(pred, gt)
    assert pairs == [(0, 1), (1, 0)] and ious == [6 / 20, 5 / 10]  # 0.8 in all
    assert answer_iou([""], pred_masks=[pred], gt_masks=[gt], seg_format=["think"]) == [(6 / 20 + 5 / 10) / 2]
    assert match_masks([], gt) == ([], []) and match_masks(pred, []) == ([], [])


def test_answer_iou_unmatched_penalty_floor_and_no_opinion():
    g0, g1 = strip(0, 10), strip(10, 20)
    rows = dict(pred_masks=[[g0, g1, strip(3, 4)], [g0], [], [strip(10, 12), g1, g0], [g0], [g0]],
                gt_masks=[[g0, g1], [g0, g1], [g0, g1], [g0], None, [g0]],
                gt_mask=[None, None, None, None, g0, g0], seg_format=["think"] * 5 + ["plain"])
    out = answer_iou([""] * 6, **rows)
    assert out[0] == 1.0 - 0.1  # one predicted mask left over
    assert out[1] == 1.0 - 0.1  # one reference left over
    assert out[2] == 0.0  # no answer mask: 0 - 0.2, floored
    assert out[3] == 1.0 - 0.2  # the exact one is matched, two predictions left over
    assert out[4] == 1.0  # a row's single gt_mask is its reference list
    assert out[5] is None  # not a think row
    assert answer_iou(["", ""], pred_masks=[[g0], [g0]], gt_mask=[None, None], seg_format=["think"] * 2) == [
        None, None]  # no reference: no opinion
    assert answer_iou([""], pred_masks=[[strip(0, 1), strip(1, 2), strip(2, 3)]], gt_mask=[g1],
                      seg_format=["think"]) == [0.0]  # IoU 0 - 0.2, floored


# ----------------------------------------------------------------------------------------- task rewards
def test_task_rewards_plain_unchanged_think_replaces_the_mask_rewards():
    from sa2va_rl.rl.rewards import format_reward
    from sa2va_rl.rl.tasks import task_rewards

    def names(tasks, **kw):
        funcs, weights = task_rewards(tasks, **kw)
        return [f.__name__ for f in funcs], weights

    assert names(["caption2mask"]) == names(["caption2mask"], seg_format="plain") == (
        ["mask_iou", "format_reward"], [1.0, 0.2])
    assert names(["mask2caption", "caption2mask"]) == (["caption_meteor", "mask_iou", "format_reward"],
                                                       [1.0, 1.0, 0.2])
    assert names(["caption2mask"], seg_format="think") == (["think_format_reward", "answer_iou"], [1.0, 1.0])
    assert names(["mask2caption", "caption2mask"], seg_format="think") == (
        ["caption_meteor", "think_format_reward", "answer_iou", "format_reward"], [1.0, 1.0, 1.0, 0.2])
    # format_reward keeps its opinion on mask2caption and plain rows, none on think rows: no double count
    assert format_reward(["a box", "Sure, [SEG].", "<think>a</think><answer>[SEG]</answer>"],
                         task=["mask2caption", "caption2mask", "caption2mask"],
                         seg_format=[None, "plain", "think"]) == [1.0, 1.0, None]
    with pytest.raises(ValueError, match="seg_format 'cot'"):
        task_rewards(["caption2mask"], seg_format="cot")
    with pytest.raises(ValueError, match="seg_format think .* caption2mask"):
        task_rewards(["mask2caption"], seg_format="think")


# ----------------------------------------------------------------------------------------- trainer (tiny Sa2VA)
def think_trainer(tiny_sa2va, gar_dir, out, extra_rewards=()):
    from sa2va_rl.data.gar import GARReader
    from sa2va_rl.models.sa2va import Sa2VAModelArgs, Sa2VAPolicy, load_sa2va, prepare_for_training
    from sa2va_rl.rl.config import Sa2VAGRPOConfig
    from sa2va_rl.rl.tasks import GARTaskDataset, task_rewards
    from sa2va_rl.rl.trainer import Sa2VAGRPOTrainer

    torch.manual_seed(0)
    model, tok = load_sa2va(tiny_sa2va)
    prepare_for_training(model, Sa2VAModelArgs(lora_r=0))
    policy = Sa2VAPolicy(model, tok)
    funcs, weights = task_rewards(["caption2mask"], seg_format="think")
    funcs, weights = funcs + list(extra_rewards), weights + [1.0] * len(extra_rewards)
    config = Sa2VAGRPOConfig(output_dir=str(out), max_steps=1, batch_size=1, num_generations=2,
                             max_completion_length=6, save_strategy="no", disable_tqdm=True, seed=0, report_to=[],
                             reward_weights=weights)
    data = GARTaskDataset(GARReader(gar_dir), policy, ["caption2mask"], seg_format="think")
    return Sa2VAGRPOTrainer(model=model, reward_funcs=funcs, args=config, policy=policy,
                            train_dataset=data.to_dataset(), processing_class=tok), data


def test_rows_carry_the_think_prompt_and_seg_format(tiny_sa2va, gar_dir):
    from sa2va_rl.data.gar import GARReader
    from sa2va_rl.models.sa2va import Sa2VAPolicy, load_sa2va
    from sa2va_rl.rl.tasks import GARTaskDataset, caption2mask_question

    model, tok = load_sa2va(tiny_sa2va)
    policy = Sa2VAPolicy(model, tok)
    reader = GARReader(gar_dir)
    plain = GARTaskDataset(reader, policy, ["mask2caption", "caption2mask"])
    think = GARTaskDataset(reader, policy, ["mask2caption", "caption2mask"], seg_format="think")
    assert [plain[i]["seg_format"] for i in range(2)] == [None, "plain"]
    assert [think[i]["seg_format"] for i in range(2)] == [None, "think"]
    assert think[0]["prompt"] == plain[0]["prompt"]  # mask2caption rows are untouched
    assert caption2mask_question("the red box.") == "Please segment the red box."  # today's question, as it was
    question = caption2mask_question("the red box.", "think")
    assert question.startswith("Please segment the red box. ") and all(
        t in question for t in ("<think> </think>", "<answer> </answer>", "[SEG]"))
    assert "<answer>" in think[1]["prompt"] and "<answer>" not in plain[1]["prompt"]
    with pytest.raises(ValueError, match="seg_format think"):
        GARTaskDataset(reader, policy, ["mask2caption"], seg_format="think")


def test_trainer_decodes_only_the_answer_masks_and_records_their_positions(tiny_sa2va, gar_dir, tmp_path):
    from sa2va_rl.rl.step_record import StepRecord

    seen = {}

    def spy(completions, pred_mask=None, pred_masks=None, seg_text=None, **kw):
        seen.update(pred_mask=pred_mask, pred_masks=pred_masks, seg_text=seg_text)
        return [0.0] * len(completions)

    trainer, _data = think_trainer(tiny_sa2va, gar_dir, tmp_path, extra_rewards=[spy])
    policy, tok = trainer.policy, trainer.processing_class
    inputs = [dict(trainer.train_dataset[0]) for _ in range(3)]
    prompt_ids = [tok(x["prompt"]).input_ids for x in inputs]
    both = tok.encode(THINK_TEXT, add_special_tokens=False)
    segs = [j for j, t in enumerate(both) if t == policy.seg_id]
    think_only = tok.encode("<think> the box [SEG] is left</think><answer> Sure.</answer>", add_special_tokens=False)
    unclosed = tok.encode("<think> the box</think><answer> Sure, [SEG] and", add_special_tokens=False)
    completion_ids = [both, think_only, unclosed]
    completions = tok.batch_decode(completion_ids, skip_special_tokens=True)  # as TRL decodes: no [SEG]
    assert all("[SEG]" not in c for c in completions)
    trainer.model.eval()  # the tiny vision tower has dropout: deterministic masks to compare
    with trainer._in_flight(StepRecord.generation(inputs)) as record:
        record.prompt_ids = prompt_ids
        rpf = trainer._calculate_rewards(inputs, [x["prompt"] for x in inputs], completions, completion_ids)
        positions = record.seg_index
    unclosed_seg = unclosed.index(policy.seg_id)
    assert positions == [segs[2:], [], [unclosed_seg]]
    assert rpf[:, 0].tolist() == [1.0, 0.0, 0.0]  # think_format_reward, read from seg_text
    model = trainer.accelerator.unwrap_model(trainer.model)
    want = policy.segment_at(model, prompt_ids, completion_ids, [x["visual"] for x in inputs], positions)
    assert len(seen["pred_masks"][0]) == 2 and seen["pred_masks"][1] == [] and len(seen["pred_masks"][2]) == 1
    for got, ref in zip(seen["pred_masks"], want, strict=True):
        assert all(np.array_equal(a, b) for a, b in zip(got, ref, strict=True))
    assert seen["pred_mask"][0] is seen["pred_masks"][0][0] and seen["pred_mask"][1] is None
    assert seen["seg_text"][0] == THINK_TEXT
    gt = inputs[0]["gt_mask"]
    assert rpf[:, 1].tolist() == pytest.approx(  # answer_iou (fp32 in the reward tensor)
        answer_iou([""] * 3, pred_masks=seen["pred_masks"], gt_mask=[gt] * 3, seg_format=["think"] * 3), abs=1e-6)
    assert rpf[1, 1].item() == 0.0  # no answer [SEG]: no mask, 0


# ----------------------------------------------------------------------------------------- released code
FAMILIES = ["v1", "v1_internlm2", "v2", "qwen2_5_vl", "qwen3vl"]


@pytest.fixture(scope="module", params=FAMILIES)
def released(request, upstream_ckpts):
    """(family, model fp32, policy) of every released family: InternVL (Sa2VA-4B-like, -8B-like on InternLM2,
    InternVL3) and Qwen2.5-VL with text tags; Qwen3-VL with its tokenizer given <think>/</think> as tokens, as the
    released Qwen3 vocabulary has them."""
    from sa2va_rl.models.sa2va import load_sa2va, make_policy

    path = upstream_ckpts(request.param)
    torch.manual_seed(0)
    if request.param in ("qwen2_5_vl", "qwen3vl"):
        from sa2va_rl.models.sa2va_qwen import Sa2VAQwenPolicy
        from sa2va_rl.models.upstream import load_upstream
        from tests.upstream.qwen_vl import load_processor

        model, _info = load_upstream(path, torch.float32)
        processor = load_processor(path)
        if request.param == "qwen3vl":
            processor.tokenizer.add_tokens(["<think>", "</think>"])
        policy = Sa2VAQwenPolicy(model, processor)
        assert len(policy.tokenizer) <= policy._lm_head(model).weight.shape[0]  # the padded rows hold them
    else:
        model, tok = load_sa2va(path, torch.float32, trust_remote_code=True)
        policy = make_policy(model, tok, path, trust_remote_code=True)
    return request.param, model.eval(), policy


def test_released_code_think_answer_masks_only(released, monkeypatch):
    """A hand-written think answer with [SEG] in both parts: exactly the answer's masks come back (those segment_at
    gives at the answer positions), decoded from the answer's [SEG] states alone; the think part's states, other
    rows, are not decoded. (Random weights give near-identical masks for any [SEG]: the states are compared.)"""
    from sa2va_rl.models import sampling
    from sa2va_rl.models.grounding import ImageCache
    from sa2va_rl.rl.tasks import caption2mask_question

    family, model, policy = released
    tok = policy.tokenizer
    tags = ThinkTags(tok, policy.seg_id)
    assert (len(tags.think_open) == 1) == (family == "qwen3vl")
    img = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    prompt, visual = policy.encode(img, caption2mask_question("the red box", "think"), None, "sample:0")
    p = tok(prompt)["input_ids"]
    c = tok.encode(THINK_TEXT, add_special_tokens=False)
    segs = [j for j, t in enumerate(c) if t == policy.seg_id]
    assert len(segs) == 4
    index = seg_index([c], ["think"], policy.seg_id, tags)
    assert index == [segs[2:]]
    decoded, real = [], sampling.decode_masks  # the [SEG] states each call decodes [n, C]
    monkeypatch.setattr(sampling, "decode_masks",
                        lambda m, states, image: decoded.append(states.clone()) or real(m, states, image))
    cache = ImageCache()
    with torch.no_grad():
        masks = policy.segment_at(model, [p], [c], [visual], index, cache)[0]
        every = policy.segment_at(model, [p], [c], [visual], [segs], cache)[0]
    assert cache.encodes == 1 and len(decoded) == 2
    answer_states, every_states = decoded
    assert answer_states.shape[0] == len(masks) == 2  # the answer's two [SEG]s, nothing else decoded
    assert torch.equal(answer_states, every_states[2:])  # ... and they are the answer rows
    for think_state in every_states[:2]:  # the think part's rows are other rows
        assert not any(torch.allclose(think_state, a) for a in answer_states)
    assert all(m.shape == img.shape[:2] and m.dtype == bool for m in masks)
    assert all(np.array_equal(a, b) for a, b in zip(masks, every[2:], strict=True))


# ----------------------------------------------------------------------------------------- CLI
def test_cli_refuses_think_without_caption2mask_and_unknown_formats(tiny_sa2va, gar_dir, tmp_path, capsys):
    common = ["train", "--model_path", tiny_sa2va, "--data_dir", gar_dir, "--output_dir", str(tmp_path / "o")]
    assert cli.main([*common, "--task", "mask2caption", "--seg_format", "think"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--seg_format think" in err and "--task mask2caption" in err and "--task caption2mask or both" in err
    assert cli.main([*common, "--task", "caption2mask", "--seg_format", "cot"]) == cli.EXIT_USAGE
    assert "--seg_format 'cot'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")  # refused before anything was written


def test_cli_think_run(tiny_sa2va, gar_dir, tmp_path):
    out = str(tmp_path / "think")
    rc = cli.main(["train", "--model_path", tiny_sa2va, "--data_dir", gar_dir, "--task", "caption2mask",
                   "--seg_format", "think", "--max_steps", "1", "--output_dir", out, "--batch_size", "1",
                   "--num_generations", "2", "--max_completion_length", "6", "--lora_r", "4", "--lora_alpha", "8",
                   "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1", "--save_steps", "1"])
    assert rc == 0
    with open(os.path.join(out, "checkpoint-1", "trainer_state.json")) as f:
        logged = json.load(f)["log_history"][0]
    rewards = {k for k in logged if k.startswith("rewards/") and k.endswith("/mean")}
    assert rewards == {"rewards/think_format_reward/mean", "rewards/answer_iou/mean"}
    with open(os.path.join(out, "stability.json")) as f:
        assert json.load(f)["final_weights_finite"] is True

"""The Sa2VA path end to end: tiny Sa2VA checkpoint + synthetic GAR -> Sa2VAGRPOTrainer, rewards, CLI, demo."""

import json
import math
import os
import random
import re

import numpy as np
import pytest
import torch

from sa2va_rl import cli
from sa2va_rl.data.gar import GARReader
from sa2va_rl.models.sa2va import Sa2VAModelArgs, Sa2VAPolicy, lm_parts, load_sa2va, prepare_for_training
from sa2va_rl.models.tiny_sa2va import make_tiny_sa2va
from sa2va_rl.rl.config import Sa2VAGRPOConfig
from sa2va_rl.rl.tasks import GARTaskDataset, task_list, task_rewards
from sa2va_rl.rl.trainer import RewardError, Sa2VAGRPOTrainer, guarded_reward
from sa2va_rl.rl.stability import StabilityCounters


def distinct_words(completions, **kwargs):
    return [len(set(c.split())) / 10.0 for c in completions]


def make(tiny_sa2va, gar_dir, out, task="both", rewards=None, lora_r=0, **overrides):
    torch.manual_seed(0)
    model, tok = load_sa2va(tiny_sa2va)
    prepare_for_training(model, Sa2VAModelArgs(lora_r=lora_r, lora_alpha=2 * max(lora_r, 1)),
                         mask_loss=overrides.get("mask_loss_weight", 0) > 0)
    policy = Sa2VAPolicy(model, tok)
    tasks = task_list(task)
    funcs, weights = task_rewards(tasks)
    if rewards is not None:
        funcs, weights = rewards, [1.0] * len(rewards)
    kw = dict(output_dir=str(out), max_steps=2, batch_size=2, num_generations=4, max_completion_length=6,
              warmup_steps=0, learning_rate=1e-2, save_strategy="no", disable_tqdm=True, seed=0, report_to=[],
              reward_weights=weights)
    kw.update(overrides)
    data = GARTaskDataset(GARReader(gar_dir), policy, tasks)
    return Sa2VAGRPOTrainer(model=model, reward_funcs=funcs, args=Sa2VAGRPOConfig(**kw), policy=policy,
                            train_dataset=data.to_dataset(), processing_class=tok)


def batch(trainer, rows=(0, 1)):
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    trainer.model.train()
    return [dict(trainer.train_dataset[i]) for i in rows for _ in range(trainer.num_generations)]


def test_completions_non_empty_rows_carry_their_visual_and_masks_reach_the_reward(tiny_sa2va, gar_dir, tmp_path):
    seen = {}

    def spy_iou(completions, pred_mask=None, gt_mask=None, task=None, **kw):
        seen.update(pred=pred_mask, gt=gt_mask, task=task)
        return [None] * len(completions)

    trainer = make(tiny_sa2va, gar_dir, tmp_path, rewards=[distinct_words, spy_iou])
    out = trainer._generate_and_score_completions(batch(trainer, rows=(0, 1)))  # row 0: mask2caption, 1: caption2mask
    assert (out["completion_mask"].sum(1) > 0).all()  # the inputs_embeds trap is handled
    assert len(out["visual"]) == 8 and out["visual"][0] is out["visual"][3]  # a group shares one VisualInputs
    assert out["visual"][0].region_masks is not None and out["visual"][4].region_masks is None
    assert seen["task"] == ["mask2caption"] * 4 + ["caption2mask"] * 4
    assert seen["pred"][:4] == [None] * 4  # mask2caption rows are not segmented
    assert all(g.shape == (64, 64) for g in seen["gt"][4:])
    loss = trainer.compute_loss(trainer.model, out)
    assert torch.isfinite(loss)


def test_both_tasks_train_every_llm_tensor_changes_and_shuffle_keeps_alignment(tiny_sa2va, gar_dir, tmp_path):
    # steps_per_generation=2: TRL shuffles and splits the generation batch; a misaligned visual would not
    # match its prompt's <IMG_CONTEXT> count and raise
    trainer = make(tiny_sa2va, gar_dir, tmp_path, rewards=[distinct_words], max_steps=2,
                   gradient_accumulation_steps=2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    unchanged = [n for n, p in before.items() if torch.equal(p, after[n].detach())]
    assert unchanged == [] and len(before) > 10
    with open(tmp_path / "stability.json") as f:
        report = json.load(f)
    assert report["steps"] == 2 and report["skipped_steps"] == 0 and report["final_weights_finite"] is True


def test_caption2mask_iou_reward_uses_the_seg_mask(tiny_sa2va, gar_dir, tmp_path):
    trainer = make(tiny_sa2va, gar_dir, tmp_path, task="caption2mask")
    seg = trainer.policy.seg_id
    head = trainer.model.language_model.lm_head
    hook = head.register_forward_hook(lambda m, a, o: o.index_fill(-1, torch.tensor([seg]), 60.0))
    try:
        trainer._generate_and_score_completions(batch(trainer, rows=(0,)))
    finally:
        hook.remove()
    rpf = trainer._last_rewards_per_func  # [4 completions, 2 funcs]: mask_iou, format_reward
    assert rpf.shape == (4, 2) and torch.isfinite(rpf).all()
    assert trainer._metrics["train"]["seg/no_seg_frac"][-1] == 0.0


def test_reward_errors_raise_names_sample_or_skip_counts():
    def picky(completions, source=None, **kw):
        if any("bad" in c for c in completions):
            raise KeyError("no reference")
        return [1.0] * len(completions)

    counters = StabilityCounters()
    strict = guarded_reward(picky, "raise", lambda: counters)
    assert strict.__name__ == "picky"
    with pytest.raises(RewardError, match=r"'picky' raised KeyError.*source='f.arrow:7'"):
        strict(["ok", "bad"], source=["f.arrow:3", "f.arrow:7"])
    lenient = guarded_reward(picky, "skip", lambda: counters)
    assert lenient(["ok", "bad", "ok"], source=["a", "b", "c"]) == [1.0, None, 1.0]
    assert counters.reward_errors == 1
    nan = guarded_reward(lambda completions, **kw: [math.nan, math.inf, 0.5, None], "raise", lambda: counters)
    assert nan(["a", "b", "c", "d"]) == [None, None, 0.5, None] and counters.nonfinite_rewards == 2


def test_dataset_replaces_bad_rows_and_counts_each_once(tiny_sa2va, tmp_path):
    from sa2va_rl.data.synthetic import synthetic_row, write_arrow

    rng = random.Random(0)
    rows = [synthetic_row(rng) for _ in range(3)]
    rows[1] = dict(rows[1], conversations=[{"from": "human", "value": "<image>"}])  # no caption
    write_arrow(str(tmp_path / "d" / "x.arrow"), rows)
    model, tok = load_sa2va(tiny_sa2va)
    reader = GARReader(str(tmp_path / "d"))
    data = GARTaskDataset(reader, Sa2VAPolicy(model, tok), ["mask2caption"])
    for _ in range(4):  # TRL reads a row G times
        assert data[1]["source"].endswith(":2")  # replaced by the next good row
    assert sum(reader.bad_counts.values()) == 1


# ----------------------------------------------------------------------------------------- CLI and demo
def test_cli_acceptance_command(tmp_path, capsys):
    m, d, o = (str(tmp_path / x) for x in "MDO")
    assert cli.main(["make-tiny", "--kind", "sa2va", m]) == 0
    assert cli.main(["make-data", "--kind", "gar", d, "--n", "8"]) == 0
    rc = cli.main(["train", "--model_path", m, "--data_dir", d, "--task", "both", "--max_steps", "3",
                   "--output_dir", o, "--max_completion_length", "6", "--lora_r", "8", "--lora_alpha", "16",
                   "--report_to", "none", "--disable_tqdm", "true"])
    assert rc == 0
    with open(os.path.join(o, "stability.json")) as f:
        report = json.load(f)
    assert report["steps"] == 3 and report["final_weights_finite"] is True and report["bad_rows"] == {}
    model, _tok = load_sa2va(o)  # the saved model (LoRA merged) loads back
    assert not hasattr(model.language_model, "peft_config")


def test_cli_data_errors_name_file_and_row(tiny_sa2va, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["train", "--model_path", tiny_sa2va, "--data_dir", str(empty), "--output_dir",
                     str(tmp_path / "o")]) == cli.EXIT_DATA
    assert "no GAR files" in capsys.readouterr().err
    from sa2va_rl.data.synthetic import synthetic_row, write_arrow

    row = dict(synthetic_row(random.Random(0)), mask_rle={"size": [3, 3], "counts": "zz"})
    write_arrow(str(tmp_path / "bad" / "x.arrow"), [row] * 8)
    rc = cli.main(["train", "--model_path", tiny_sa2va, "--data_dir", str(tmp_path / "bad"), "--bad_rows", "error",
                   "--output_dir", str(tmp_path / "o2"), "--max_steps", "1", "--max_completion_length", "4",
                   "--report_to", "none"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_DATA and re.search(r"bad/x\.arrow: row [0-7]: field 'mask_rle': undecodable RLE", err)


def test_demo_runs_and_writes_pngs(tmp_path, capsys):
    from PIL import Image

    from sa2va_rl.demo import run_demo

    assert run_demo(out_dir=str(tmp_path), steps=3, warm_start_steps=3, train_rows=32, eval_samples=4) == 0
    out = capsys.readouterr().out
    assert "mean reward: first" in out and "stability @ step 3" in out
    for name, min_w in (("samples.png", 600), ("curves.png", 600)):
        with Image.open(tmp_path / name) as im:
            assert im.width >= min_w and np.asarray(im.convert("L")).std() > 5  # not blank
            assert im.info.get("Software", "").startswith("Matplotlib")


def test_same_seed_same_weights(tiny_sa2va, gar_dir, tmp_path):
    """--seed fixes the whole run, LoRA initialisation included: two runs save byte-identical weights."""
    outs = []
    for name in ("a", "b"):
        out = str(tmp_path / name)
        assert cli.main(["train", "--model_path", tiny_sa2va, "--data_dir", gar_dir, "--task", "both", "--max_steps",
                         "2", "--output_dir", out, "--max_completion_length", "4", "--lora_r", "4", "--lora_alpha",
                         "8", "--report_to", "none", "--disable_tqdm", "true", "--seed", "3"]) == 0
        with open(os.path.join(out, "model.safetensors"), "rb") as f:
            outs.append(f.read())
    assert outs[0] == outs[1]


def test_runaway_caption_prompt_is_skipped_and_counted(tiny_sa2va, tmp_path):
    """A 10,000-word caption makes a caption2mask prompt of ~10k tokens: that sample is skipped (the next good one
    takes its place) and counted under bad_rows, field 'conversations'."""
    from sa2va_rl.data.synthetic import synthetic_row, write_arrow

    rng = random.Random(0)
    rows = [synthetic_row(rng) for _ in range(3)]
    rows[1] = dict(rows[1], conversations=[{"from": "human", "value": "<image>"},
                                           {"from": "gpt", "value": " ".join(["red"] * 10_000)}])
    write_arrow(str(tmp_path / "d" / "x.arrow"), rows)
    model, tok = load_sa2va(tiny_sa2va)
    reader = GARReader(str(tmp_path / "d"))
    data = GARTaskDataset(reader, Sa2VAPolicy(model, tok), ["caption2mask"], max_prompt_tokens=512)
    assert data[1]["source"].endswith(":2") and len(tok(data[1]["prompt"]).input_ids) <= 512
    assert dict(reader.bad_counts) == {("x.arrow", "conversations"): 1}


def test_caption2mask_step_encodes_each_distinct_image_once(tiny_sa2va, gar_dir, tmp_path):
    """G=4 completions of each of two images, every one with [SEG]: the grounding encoder (SAM2's forward_image)
    runs once per distinct image in the step, not once per completion, and the [SEG] states come from one LLM
    forward for the step's 8 completions."""
    trainer = make(tiny_sa2va, gar_dir, tmp_path, task="caption2mask")
    seg = trainer.policy.seg_id
    head = trainer.model.language_model.lm_head
    hook = head.register_forward_hook(lambda m, a, o: o.index_fill(-1, torch.tensor([seg]), 60.0))
    sam2 = trainer.model.grounding_encoder.sam2_model
    encodes = []
    forward_image = sam2.forward_image
    sam2.forward_image = lambda pixels: encodes.append(pixels.shape) or forward_image(pixels)
    seg_forwards = []  # LLM backbone forwards while the step segments
    backbone, segment_at = lm_parts(trainer.model)[1], trainer.policy.segment_at  # the trainer segments through it

    def counted_segment(*args, **kwargs):
        h = backbone.register_forward_pre_hook(lambda m, a: seg_forwards.append(1))
        try:
            return segment_at(*args, **kwargs)
        finally:
            h.remove()

    trainer.policy.segment_at = counted_segment
    try:
        rows = batch(trainer, rows=(0, 1))
        trainer._generate_and_score_completions(rows)
    finally:
        hook.remove()
        del sam2.forward_image
        del trainer.policy.segment_at
    images = {id(r["visual"].image) for r in rows}
    assert len(images) == 2 and len(rows) == 8
    assert trainer._metrics["train"]["seg/no_seg_frac"][-1] == 0.0  # all 8 completions were segmented
    assert len(encodes) == len(images)
    assert len(seg_forwards) == 1


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first integer.
        b: The second integer.

    Returns:
        The product.
    """
    return a * b


class Counter:
    def reset(self, **kwargs):
        self.n = 0

    def increment(self, step: int) -> int:
        """Increment the counter.

        Args:
            step: Value to add.

        Returns:
            The counter.
        """
        self.n += step
        return self.n


@pytest.mark.parametrize("option", ["tools", "environment_factory"])
def test_tool_calling_turns_are_refused_for_sa2va_by_name(tiny_sa2va, gar_dir, tmp_path, option, monkeypatch):
    """TRL's tool loop generates again from token ids (prompt + completion + tool result) for the rows that called a
    tool; a Sa2VA row's image and region live in its context (spliced into the embeddings), which those turns would
    not carry: refused at start, by name, before any step."""
    kw = {"tools": [multiply]} if option == "tools" else {"environment_factory": Counter}
    init = Sa2VAGRPOTrainer.__init__

    def with_option(self, *a, **k):
        init(self, *a, **{**k, **kw})

    monkeypatch.setattr(Sa2VAGRPOTrainer, "__init__", with_option)
    with pytest.raises(ValueError, match=rf"^{option}: .*Sa2VAPolicy"):
        make(tiny_sa2va, gar_dir, tmp_path, max_steps=1)


def test_checkpoints_hold_only_the_trained_parameters_and_resume_to_the_same_weights(tiny_sa2va, gar_dir,
                                                                                       tmp_path, capsys):
    """A Sa2VA checkpoint writes what trains (LoRA, fp32) and the buffers, not the frozen vision tower, SAM2 and
    LLM that --model_path holds (at Sa2VA-8B's size: 16 GB a checkpoint, 29 s of a 33 s step on an H200). Resuming
    from it ends on the same weights as the run that was not interrupted; a resume onto another base model of the
    same shapes is refused by name before training."""
    import safetensors
    from safetensors.torch import load_file

    from sa2va_rl.rl.checkpoints import TRAINABLE_FILE

    common = ["--data_dir", gar_dir, "--task", "both", "--max_completion_length", "4", "--lora_r", "4",
              "--lora_alpha", "8", "--report_to", "none", "--disable_tqdm", "true", "--seed", "3", "--save_steps", "1",
              "--warmup_steps", "0", "--learning_rate", "1e-3"]  # step 1 moves the weights: resume must load them
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert cli.main(["train", "--model_path", tiny_sa2va, *common, "--max_steps", "2", "--output_dir", full]) == 0
    ckpt = os.path.join(full, "checkpoint-1")
    assert TRAINABLE_FILE in os.listdir(ckpt) and not [f for f in os.listdir(ckpt) if f.startswith("model")]
    model = prepare_for_training(load_sa2va(tiny_sa2va)[0], Sa2VAModelArgs(lora_r=4, lora_alpha=8))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = set(model.state_dict()) - {n for n, _ in model.named_parameters(remove_duplicate=False)}
    saved = load_file(os.path.join(ckpt, TRAINABLE_FILE))
    assert set(saved) == trained | buffers and trained and all("lora_" in n for n in trained)
    assert all(saved[n].dtype == torch.float32 for n in trained)
    assert any(saved[n].abs().sum() > 0 for n in trained if "lora_B" in n)  # LoRA's B starts at 0: step 1 trained
    with safetensors.safe_open(os.path.join(ckpt, TRAINABLE_FILE), "pt") as f:
        frozen = sum(1 for _, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad)
        assert f.metadata()["frozen_parameters"] == str(frozen) and frozen > 0

    assert cli.main(["train", "--model_path", tiny_sa2va, *common, "--max_steps", "2", "--output_dir", part,
                     "--inject", "io_error@2:ENOSPC"]) == cli.EXIT_IO  # stops at checkpoint-2; checkpoint-1 stays
    assert sorted(f for f in os.listdir(part) if f.startswith("checkpoint")) == ["checkpoint-1"]
    assert cli.main(["train", "--model_path", tiny_sa2va, *common, "--max_steps", "2", "--output_dir", part,
                     "--resume_from_checkpoint", "latest"]) == 0
    a, b = load_file(os.path.join(full, "model.safetensors")), load_file(os.path.join(part, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = (load_file(os.path.join(d, "checkpoint-2", TRAINABLE_FILE)) for d in (full, part))
    assert all(torch.equal(a[k], b[k]) for k in a)

    other = str(tmp_path / "other")  # same shapes, other weights: the frozen ones would be wrong under the adapter
    make_tiny_sa2va(other, seed=1)
    capsys.readouterr()
    rc = cli.main(["train", "--model_path", other, *common, "--max_steps", "3", "--output_dir", part,
                   "--resume_from_checkpoint", "latest", "--allow_changed_run", "true"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_USAGE and "holds only the trained parameters" in err and "fingerprint" in err, err

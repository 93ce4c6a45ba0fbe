"""The mask loss inside GRPO (rl/mask_loss.py): its value, which rollouts it trains, where its [SEG] states come
from, what it trains, and that it goes through the same guarded step as the rest of the loss."""

import json
import math

import numpy as np
import pytest
import torch

from sa2va_rl import cli
from sa2va_rl.models.grounding import ImageCache
from sa2va_rl.models.policy import left_pad, right_pad
from sa2va_rl.rl import mask_loss
from sa2va_rl.rl.mask_loss import MaskLoss, SegTarget, ce_dice, choose, resize_target
from tests.rl.test_sa2va_trainer import batch, make


def test_ce_dice_equals_the_hand_computed_losses():
    logits = torch.tensor([[[0.0, 2.0], [-1.0, 3.0]]])  # [1, 2, 2]
    target = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    p = [0.5, 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(1)), 1 / (1 + math.exp(-3))]
    t = [1.0, 0.0, 0.0, 1.0]
    ce_want = -sum(ti * math.log(pi) + (1 - ti) * math.log(1 - pi) for pi, ti in zip(p, t)) / 4
    dice_want = 1 - (2 * (p[0] + p[3]) + 1) / (sum(p) + 2 + 1)
    ce, dice = ce_dice(logits, target)
    assert ce.dtype == dice.dtype == torch.float32 and ce.shape == dice.shape == (1,)
    assert ce.item() == pytest.approx(ce_want, rel=1e-6) and dice.item() == pytest.approx(dice_want, rel=1e-6)
    # bf16 logits are scored in fp32
    assert ce_dice(logits.bfloat16(), target)[0].dtype == torch.float32
    # area resampling: the share of each cell the mask covers
    gt = np.zeros((4, 4), bool)
    gt[:2, :3] = True
    assert resize_target(gt, (2, 2), "cpu").tolist() == [[1.0, 0.5], [0.0, 0.0]]


def _targets(n):
    return [SegTarget(0, np.ones((2, 2), bool), None) for _ in range(n)]


def test_choose_best_per_group_and_positive_advantages():
    G = 4
    total = torch.tensor([0.1, 0.9, 0.9, 0.2, 0.5, 0.5, 0.5, 0.5])  # two groups, rank 0 holds all 8 rows
    rows = _targets(8)
    rows[1] = None  # the group's best has no [SEG]: the next best with one learns
    assert choose(rows, total, torch.zeros(8), 0, G, "best") == 2
    assert [0.0 if r is None else r.weight for r in rows] == [0, 0, 0.5, 0, 0.5, 0, 0, 0]  # ties: the first
    # a group that spans two processes: rank 1 holds rows 4..7 of [8], its group 1 = rows 4..7
    rows = _targets(4)
    assert choose(rows, torch.tensor([0, 0, 0, 0, 0.1, 0.3, 0.2, 0.0]), torch.zeros(4), 1, G, "best") == 1
    assert [r.weight for r in rows] == [0, 1.0, 0, 0]
    # positive: weighted by the advantage where positive, normalised over this process's batch
    rows = _targets(4)
    assert choose(rows, torch.zeros(4), torch.tensor([1.0, -1.0, 3.0, 0.0]), 0, G, "positive") == 2
    assert [r.weight for r in rows] == [0.25, 0.0, 0.75, 0.0]
    rows = _targets(4)  # all rewards equal: positive trains nothing, best still one rollout per group
    assert choose(rows, torch.zeros(4), torch.zeros(4), 0, G, "positive") == 0
    assert choose(rows, torch.zeros(4), torch.zeros(4), 0, G, "best") == 1
    with pytest.raises(ValueError, match="mask_loss_rollouts='worst'"):
        choose(rows, torch.zeros(4), torch.zeros(4), 0, G, "worst")


def test_seg_states_come_from_the_scoring_forward_at_the_right_positions(tiny_sa2va, gar_dir, tmp_path, monkeypatch):
    """Rows of different prompt lengths (TRL's left-padded prompts, right-padded completions) with [SEG] at different
    completion positions: the states the mask loss decodes, taken from the log-prob forward, equal the states of
    each row's own unpadded forward at its [SEG]; and the log-probs with the hook are bit-identical to without."""
    trainer = make(tiny_sa2va, gar_dir, tmp_path, task="both")
    policy, model = trainer.policy, trainer.model
    rows = [trainer.train_dataset[i] for i in (0, 1, 2)]  # mask2caption, caption2mask, mask2caption: two lengths
    prompts = [policy.tokenizer(r["prompt"]).input_ids for r in rows]
    assert len({len(p) for p in prompts}) > 1
    seg, word = policy.seg_id, policy.tokenizer("red", add_special_tokens=False).input_ids[0]
    completions = [[word, seg, word], [seg, word, word, word], [word, word, word, seg]]
    positions = [1, 0, 3]
    contexts = [r["visual"] for r in rows]
    p_ids, p_mask = left_pad(prompts, policy.pad_token_id, "cpu")
    c_ids, c_mask = right_pad(completions, policy.pad_token_id, "cpu")
    captured = []
    monkeypatch.setattr(mask_loss, "mask_logits", lambda m, h, img, grad: captured.append(h.detach()) or
                        torch.zeros(1, 8, 8, requires_grad=True))
    gt = np.zeros((64, 64), bool)
    targets = [SegTarget(j, gt, None, weight=1 / 3) for j in positions]
    ml = MaskLoss(model, targets, p_mask)
    lp, _ = policy.logprobs(model, p_ids, p_mask, c_ids, c_mask, contexts=contexts, hidden_hook=ml.hook(0, 3))
    lp0, _ = policy.logprobs(model, p_ids, p_mask, c_ids, c_mask, contexts=contexts)
    assert torch.equal(lp, lp0)
    assert len(captured) == 3 and ml.loss is not None and ml.loss.requires_grad
    for k, (p, c, j) in enumerate(zip(prompts, completions, positions)):
        ids = torch.tensor([p + c])
        want = policy._tail_hidden(model, ids, torch.ones_like(ids), ids.shape[1], [contexts[k]])[0, len(p) + j]
        torch.testing.assert_close(captured[k][0], want, rtol=1e-5, atol=1e-5)


@pytest.fixture
def seg_everywhere():
    """Generation emits [SEG] at every step (the head's output forced), so every caption2mask rollout has one."""
    hooks = []

    def install(trainer):
        seg = trainer.policy.seg_id
        head = trainer.model.language_model.lm_head
        hooks.append(head.register_forward_hook(lambda m, a, o: o.index_fill(-1, torch.tensor([seg]), 60.0)))
        return trainer

    yield install
    for h in hooks:
        h.remove()


def params(model, part):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(part) or part in n}


def test_one_step_trains_text_hidden_fcs_and_lora_not_sam2_and_logs_the_terms(tiny_sa2va, gar_dir, tmp_path,
                                                                             seg_everywhere):
    trainer = seg_everywhere(make(tiny_sa2va, gar_dir, tmp_path, task="caption2mask", lora_r=4, max_steps=1,
                                  mask_loss_weight=1.0, logging_steps=1))
    model = trainer.model
    assert all(p.requires_grad for p in model.text_hidden_fcs.parameters())
    assert not any(p.requires_grad for p in model.grounding_encoder.parameters())
    # LoRA's B starts at zero, so the first step's gradient reaches every B (and no A: dL/dA = B^T (...) = 0)
    before = {part: params(model, part) for part in ("text_hidden_fcs", "lora_B", "grounding_encoder")}
    assert all(before.values())
    trainer.train()
    after = dict(model.named_parameters())
    for part in ("text_hidden_fcs", "lora_B"):  # every tensor of these changed
        assert [n for n, p in before[part].items() if torch.equal(p, after[n].detach())] == [], part
    assert all(torch.equal(p, after[n].detach()) for n, p in before["grounding_encoder"].items())
    log = next(h for h in trainer.state.log_history if "mask_loss/ce" in h)
    assert log["mask_loss/ce"] > 0 and 0 < log["mask_loss/dice"] < 1
    assert log["mask_loss/rollouts"] == 2.0  # batch_size 2: one rollout per group ('best')


def test_off_or_nothing_chosen_leaves_the_grpo_step_bit_identical(tiny_sa2va, gar_dir, tmp_path, seg_everywhere,
                                                                  monkeypatch):
    """mask_loss_weight 0: no targets, no hook, no metric. On with no rollout chosen: the hook is installed and
    reads the states, yet every LLM weight after the step is bit-identical to the step with the loss off."""
    off = seg_everywhere(make(tiny_sa2va, gar_dir, tmp_path / "off", task="caption2mask", max_steps=1))
    out = off._generate_and_score_completions(batch(off, rows=(0, 1)))
    assert "seg_target" not in out and off._mask_loss_hook(off.model, None, 0, 1) is None
    off.train()
    assert not any("mask_loss" in k for h in off.state.log_history for k in h)

    real_choose = mask_loss.choose

    def choose_none(rows, *a):
        real_choose(rows, *a)
        for r in rows:
            if r is not None:
                r.weight = 0.0
        return 0

    monkeypatch.setattr(mask_loss, "choose", choose_none)
    on = seg_everywhere(make(tiny_sa2va, gar_dir, tmp_path / "on", task="caption2mask", max_steps=1,
                             mask_loss_weight=1.0))
    on.train()
    got = dict(on.model.named_parameters())
    llm = [n for n, _ in off.model.named_parameters() if n.startswith("language_model")]
    assert llm and all(torch.equal(p.detach(), got[n].detach()) for n, p in off.model.named_parameters()
                       if n in llm)


def test_a_nan_mask_loss_is_skipped_and_named_like_any_other(tiny_sa2va, gar_dir, tmp_path, seg_everywhere,
                                                             monkeypatch):
    real = mask_loss.ce_dice
    monkeypatch.setattr(mask_loss, "ce_dice", lambda logits, target: (real(logits, target)[0] * float("nan"),
                                                                       real(logits, target)[1]))
    trainer = seg_everywhere(make(tiny_sa2va, gar_dir, tmp_path, task="caption2mask", max_steps=1,
                                  mask_loss_weight=1.0, max_consecutive_skips=5))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert all(torch.equal(p, dict(trainer.model.named_parameters())[n].detach()) for n, p in before.items())
    with open(tmp_path / "stability.json") as f:
        report = json.load(f)
    assert report["skipped_steps"] == 1 and report["final_weights_finite"] is True
    assert not trainer.optimizer.state  # AdamW never stepped: its state is untouched (empty)
    first = report["first_nonfinite"]  # named as any non-finite step: its step, kind and first parameters
    assert first["step"] == 1 and first["kind"] == "nan" and first["params"]


def test_one_encode_per_image_for_rewards_and_mask_loss(tiny_sa2va, gar_dir, tmp_path, seg_everywhere):
    trainer = seg_everywhere(make(tiny_sa2va, gar_dir, tmp_path, task="caption2mask", mask_loss_weight=1.0))
    sam2 = trainer.model.grounding_encoder.sam2_model
    encodes = []
    forward_image = sam2.forward_image
    sam2.forward_image = lambda pixels: encodes.append(1) or forward_image(pixels)
    try:
        rows = batch(trainer, rows=(0, 1))
        out = trainer._generate_and_score_completions(rows)
        loss = trainer.compute_loss(trainer.model, out)
        loss.backward()
    finally:
        del sam2.forward_image
    assert len(encodes) == len({id(r["visual"].image) for r in rows}) == 2
    assert sum(t is not None and t.weight > 0 for t in out["seg_target"]) == 2
    assert isinstance(trainer.last_generation.images, ImageCache) and trainer.last_generation.images.encodes == 2
    assert trainer.model.text_hidden_fcs[0].weight.grad is not None


@pytest.mark.parametrize("argv, message", [
    (["--task", "mask2caption", "--mask_loss_weight", "1"], "--mask_loss_weight 1.0: the mask loss trains"),
    (["--mask_loss_weight", "-1"], "mask_loss_weight=-1.0"),
    (["--mask_loss_rollouts", "all"], "mask_loss_rollouts='all'"),
])
def test_the_cli_refuses_mask_loss_settings_by_name(tiny_sa2va, gar_dir, tmp_path, capsys, argv, message):
    rc = cli.main(["train", "--model_path", tiny_sa2va, "--data_dir", gar_dir, "--output_dir", str(tmp_path),
                   "--num_generations", "2"] + argv)
    assert rc == 2 and message in capsys.readouterr().err

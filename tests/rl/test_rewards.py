import numpy as np
import pytest

from sa2va_rl.rl.rewards import exact_match, format_reward, make_caption_meteor, mask_iou, token_f1


def test_meteor_hand_checked():
    """nltk's METEOR (the demo's; METEOR 1.5's numbers are pinned in tests/eval/test_meteor.py)."""
    caption_meteor = make_caption_meteor("nltk")
    ref = "a red square at the left of the image"
    scores = caption_meteor([ref, "blue circles everywhere", "a red squares at the left"], caption=[ref] * 3)
    assert scores[0] == pytest.approx(1.0, abs=0.01)
    assert scores[1] == 0.0
    assert 0.5 < scores[2] < scores[0]  # stem match: squares ~ square
    assert caption_meteor(["x"], caption=[None]) == [None] and caption_meteor(["x"]) == [None]
    assert caption_meteor([[{"role": "assistant", "content": ref}]], caption=[ref])[0] == pytest.approx(1.0, abs=0.01)


def test_mask_iou_hand_checked():
    a = np.zeros((4, 4), bool)
    a[:2] = True  # 8 pixels
    b = np.zeros((4, 4), bool)
    b[1:3] = True  # 8 pixels, 4 shared -> 4 / 12
    assert mask_iou(["", "", "", ""], pred_mask=[a, b, None, np.zeros((4, 4), bool)],
                    gt_mask=[a, a, a, np.zeros((4, 4), bool)]) == [1.0, pytest.approx(1 / 3), 0.0, 0.0]
    with pytest.raises(ValueError, match="differ in size"):
        mask_iou([""], pred_mask=[np.zeros((2, 2), bool)], gt_mask=[a])


def test_format_and_overlap_rewards():
    assert format_reward(["the box [SEG]", "the box", "<|end|>", "  "], task="caption2mask") == [1.0, 0, 0, 0]
    assert format_reward(["a box", "a [SEG]"], task=["mask2caption", "mask2caption"]) == [1.0, 0.0]
    assert token_f1(["red square", "blue"], solution=["red square left"] * 2) == [pytest.approx(0.8), 0.0]
    assert exact_match(["Red  square", "red"], solution=["red square"] * 2) == [1.0, 0.0]

"""Matplotlib figures: the training curves (panels, labels, smoothing) and the sample grid."""

import numpy as np
import pytest
from PIL import Image

from sa2va_rl.eval.plots import draw_samples, ema, figure_to_array, plot_training_curves


def history(n=6):
    out = []
    for s in range(1, n + 1):
        out.append({"step": s, "reward": 0.1 * s, "rewards/caption_meteor/mean": 0.05 * s,
                    "rewards/mask_iou/mean": 0.2, "grad_norm": 1.0 / s, "entropy": 2.0 - 0.1 * s,
                    "stability/skipped_steps": int(s > 3), "stability/repaired_rows": 0, "loss": 0.0})
    out.append({"step": n, "train_runtime": 1.0})  # the trainer's closing record: not a step
    return out


def test_ema_is_tensorboards_debiased_smoothing():
    assert ema([1.0, 0.0], 0.5) == pytest.approx([1.0, 1 / 3])
    assert ema([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])


def test_training_curves_panels_share_the_step_axis_with_labels():
    fig = plot_training_curves(history())
    reward, grad, entropy, counters = fig.get_axes()[:4]
    assert counters.get_xlabel() == "optimizer step"
    assert [a.get_ylabel() for a in (reward, grad, entropy, counters)] == [
        "mean reward", "gradient norm\n(before clipping)", "entropy of sampled\ntokens (nats)",
        "stability counters\n(cumulative)"]
    assert reward.get_shared_x_axes().joined(reward, counters)
    legend = [t.get_text() for t in reward.get_legend().get_texts()]
    assert legend == ["total (weighted)", "caption_meteor", "mask_iou"]
    lines = reward.get_lines()  # per series: the raw points, then the smoothed line
    assert list(lines[0].get_ydata()) == pytest.approx([0.1 * s for s in range(1, 7)])
    assert list(lines[1].get_ydata()) == pytest.approx(ema([0.1 * s for s in range(1, 7)]))
    assert list(lines[1].get_xdata()) == [1, 2, 3, 4, 5, 6]
    assert [t.get_text() for t in counters.get_legend().get_texts()] == ["skipped_steps", "repaired_rows"]


def test_training_curves_png_and_sample_grid(tmp_path):
    path = plot_training_curves(history(), str(tmp_path / "c.png"))
    with Image.open(path) as im:
        assert im.info["Software"].startswith("Matplotlib") and im.width == 1000
    img = np.zeros((16, 16, 3), np.uint8)
    gt = np.zeros((16, 16), bool)
    gt[4:8, 4:8] = True
    entries = [{"image": img, "gt_mask": gt, "reference": "a red square",
                "models": [{"label": "A", "mask": gt, "iou": 1.0, "caption": "a red\x01 square"},
                           {"label": "B", "mask": None, "caption": ""}]}]
    fig = draw_samples(entries)
    axes = fig.get_axes()
    assert len(axes) == 5 and axes[2].get_title() == "A: mask from caption" and axes[2].get_xlabel() == "IoU 1.00"
    texts = [t.get_text() for t in axes[4].texts]
    assert texts == ["reference: a red square", "A: a red? square", "B: (empty)"]
    assert "no [SEG]" in [t.get_text() for t in axes[3].texts]
    arr = figure_to_array(fig)
    assert arr.dtype == np.uint8 and arr.shape[2] == 3 and arr.std() > 5

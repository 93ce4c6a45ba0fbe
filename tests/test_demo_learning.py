"""The demo learns rather than collapses: held-out captions name the right colour and shape more often after GRPO."""

import re

from sa2va_rl.demo_eval import attribute_reward, demo_rewards, named

BEFORE, AFTER = 4, 5  # held-out captions with the right colour and shape, seed 0, before and after GRPO


def test_named_reads_the_first_colour_and_shape_word():
    ref = "a blue circle at the top left of the image"
    assert named("a blue circle at the center", ref) == (True, True)
    assert named("a red circle . a blue square", ref) == (False, True)  # the first colour word counts
    assert named("blue", ref) == (True, False) and named("", ref) == (False, False)


def test_attribute_reward_scores_mask2caption_rows_only():
    refs = ["a red square at the center of the image", None]
    assert attribute_reward(["a red circle", "Sure, [SEG]."], caption=refs) == [0.5, None]
    assert attribute_reward(["x", "y"]) == [None, None]
    funcs, weights = demo_rewards(["mask2caption", "caption2mask"])
    assert [f.__name__ for f in funcs] == ["caption_meteor", "mask_iou", "format_reward", "attribute_reward"]
    assert weights == [1.0, 1.0, 0.2, 1.0]


def test_demo_captions_name_colour_and_shape_more_often_after_grpo(tmp_path, capsys):
    """The full default demo on seed 0 (deterministic on CPU): the before/after accuracy is printed, improves, and
    the held-out captions differ across samples."""
    from sa2va_rl.demo import run_demo

    assert run_demo(out_dir=str(tmp_path)) == 0
    out = capsys.readouterr().out
    m = re.search(r"naming the right colour and shape \(greedy, (\d+) samples\): before GRPO (\d+)/\d+ -> after "
                  r"GRPO (\d+)/\d+", out)
    assert m, out
    n, before, after = map(int, m.groups())
    lines = "\n".join(x for x in out.splitlines() if "GRPO" in x or "zero reward std" in x)
    assert (n, before, after) == (24, BEFORE, AFTER) and after > before, lines
    distinct = int(re.search(r"after GRPO: .* (\d+) distinct captions", out)[1])
    assert distinct > 1

"""Metrics against hand-computed cases: CIDEr-D, gIoU/cIoU, and which METEOR implementation runs."""

import math

import numpy as np
import pytest

from sa2va_rl.eval.metrics import cider_d, mask_metrics, meteor, meteor_backend
from sa2va_rl.rl.rewards import make_caption_meteor


def test_cider_d_hand_computed():
    """Two images, one reference each; N = 2 so idf = log 2 for an n-gram in one reference set, 0 in both.
    A: hypothesis == reference: n = 1, 2, 3 give cosine 1 ('a' weighs 0), n = 4 has no n-grams: 10 x 3/4 = 7.5.
    B: 'a blue circle' vs 'a blue square': unigrams {blue, circle} vs {blue, square}, each weight log 2: 1/2;
    bigrams {a blue, blue circle} vs {a blue, blue square}: 1/2; trigrams differ: 0 -> 10 x (1/2 + 1/2)/4 = 2.5."""
    corpus, per = cider_d(["a red circle", "a blue circle"], [["a red circle"], ["a blue square"]])
    assert per == pytest.approx([7.5, 2.5]) and corpus == pytest.approx(5.0)


def test_cider_d_length_penalty_and_clipping():
    # 'red red circle' vs 'red circle' (the other image makes idf non-zero): the repeated 'red' is clipped by the
    # reference count, and one bigram more gives exp(-1/72)
    _, per = cider_d(["red red circle", "x"], [["red circle"], ["y"]])
    w = math.log(2)
    uni = (min(2 * w, w) * w + w * w) / (math.sqrt(4 * w * w + w * w) * math.sqrt(2 * w * w))
    bi = (w * w) / (math.sqrt(2 * w * w) * w)
    assert per[0] == pytest.approx(10 * (uni + bi) / 4 * math.exp(-1 / 72))
    assert cider_d(["a red circle"], [["a red circle"]])[0] == 0.0  # one sample: every idf is 0


def test_mask_metrics_giou_vs_ciou():
    gt1, gt2 = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    gt1[:1] = True  # 4 px, predicted exactly
    gt2[1:] = True  # 12 px, no [SEG]
    m = mask_metrics([gt1.copy(), None], [gt1, gt2])
    assert m == {"gIoU": 0.5, "cIoU": 4 / 16, "no_seg": 0.5, "n": 2}
    half = np.zeros((4, 4), bool)
    half[1:3] = True  # 8 px inside gt2: IoU 8/12
    assert mask_metrics([half], [gt2])["gIoU"] == pytest.approx(8 / 12)


def test_meteor_nltk_is_the_mean_of_the_nltk_reward():
    b = meteor_backend("nltk")
    assert b.impl == "nltk" and b.report()["meteor_impl"] == "nltk"
    hyps, refs = ["a red circle at the top", "blue square"], ["a red circle at the top left", "a green circle"]
    corpus, per = meteor(hyps, refs, b)
    assert per == make_caption_meteor("nltk")(hyps, caption=refs) and corpus == pytest.approx(sum(per) / 2)


def test_meteor_goes_to_meteor_15_tokenized_in_one_batch(monkeypatch, tmp_path):
    """Where java and the jar are there, METEOR is METEOR 1.5's (eval/meteor.py; its numbers: test_meteor.py),
    fed lower-cased words."""
    from sa2va_rl.eval import meteor as M

    seen = []
    jar = tmp_path / "meteor-1.5.jar"
    jar.write_bytes(b"")
    monkeypatch.setattr(M, "jar_path", lambda: str(jar))
    monkeypatch.setattr(M.shutil, "which", lambda name: "/usr/bin/java")
    monkeypatch.setattr(M.Meteor15, "score", lambda self, pairs: seen.append(pairs) or (0.42, [0.5, 0.25]))
    b = M.MeteorScorer("auto")
    assert b.impl == "meteor-1.5" and b.describe() == "METEOR 1.5 (pycocoevalcap, Java)"
    assert meteor(["A red, circle!", "x"], ["a red circle", "y"], b) == (0.42, [0.5, 0.25])
    assert seen == [[("a red circle", ["a red circle"]), ("x", ["y"])]]

"""Metrics against hand-computed cases: CIDEr-D, gIoU/cIoU, and which METEOR implementation runs."""

import math
import sys
import types

import numpy as np
import pytest

from sa2va_rl.eval import metrics
from sa2va_rl.eval.metrics import cider_d, mask_metrics, meteor, meteor_backend
from sa2va_rl.rl.rewards import caption_meteor


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


def test_meteor_falls_back_to_nltk_and_says_so(monkeypatch):
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: None)
    b = meteor_backend()
    assert b.name == "nltk" and "fell back to nltk's METEOR: pycocoevalcap not found" in b.note
    assert ("WordNet installed" in b.note) == b.wordnet
    hyps, refs = ["a red circle at the top", "blue square"], ["a red circle at the top left", "a green circle"]
    corpus, per = meteor(hyps, refs, b)
    assert per == caption_meteor(hyps, caption=refs) and corpus == pytest.approx(sum(per) / 2)
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    assert "pycocoevalcap and a Java runtime not found" in meteor_backend().note


def test_meteor_uses_pycocoevalcap_when_it_and_java_are_there(monkeypatch):
    seen = {}

    class Meteor:  # stands in for pycocoevalcap.meteor.meteor.Meteor (which runs METEOR 1.5 in Java)
        def compute_score(self, gts, res):
            seen.update(gts=gts, res=res)
            return 0.42, [0.5, 0.25]

    mod = types.ModuleType("pycocoevalcap.meteor.meteor")
    mod.Meteor = Meteor
    monkeypatch.setitem(sys.modules, "pycocoevalcap.meteor.meteor", mod)
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(metrics.shutil, "which", lambda name: "/usr/bin/java")
    b = meteor_backend()
    assert b.name == "pycocoevalcap" and b.describe() == "pycocoevalcap METEOR 1.5"
    assert meteor(["A red, circle!", "x"], ["a red circle", "y"], b) == (0.42, [0.5, 0.25])
    assert seen["gts"] == {0: ["a red circle"], 1: ["y"]} and seen["res"] == {0: ["a red circle"], 1: ["x"]}

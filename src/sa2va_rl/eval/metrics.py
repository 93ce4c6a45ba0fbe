"""Benchmark metrics as the field reports them: caption METEOR and CIDEr-D, mask gIoU and cIoU.

* METEOR: the COCO-caption toolkit's (``pycocoevalcap``, METEOR 1.5 in Java, with WordNet synonyms and
  paraphrases) when it is installed and ``java`` is on the PATH; otherwise nltk's ``meteor_score`` through the
  training reward (``rl.rewards.caption_meteor``: WordNet synonyms when nltk's corpus is installed, exact + stem
  matching when not). The two give different numbers; ``meteor_backend()`` says which one ran and every report
  carries it.
* CIDEr-D: the COCO-caption definition (n = 1..4, tf-idf over the references of the evaluated set, hypothesis
  counts clipped by the reference's, Gaussian length penalty sigma = 6, x 10), written here after pycocoevalcap's
  ``CiderScorer``; tokens are lower-cased words (the toolkit's PTB tokenizer needs Java).
* gIoU: the mean of per-sample IoU (a sample without ``[SEG]`` scores 0); cIoU: total intersection / total union.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass

from sa2va_rl.rl.rewards import _tokens, caption_meteor, mask_overlap, wordnet_available


@dataclass(frozen=True)
class MeteorBackend:
    name: str  # "pycocoevalcap" or "nltk"
    wordnet: bool  # synonyms matched (always, in pycocoevalcap's METEOR 1.5)
    note: str  # why this one, for the report

    def describe(self) -> str:
        if self.name == "pycocoevalcap":
            return "pycocoevalcap METEOR 1.5"
        return "nltk, WordNet" if self.wordnet else "nltk, no WordNet: exact+stem"


def meteor_backend() -> MeteorBackend:
    have_pkg = importlib.util.find_spec("pycocoevalcap") is not None
    java = shutil.which("java")
    if have_pkg and java:
        return MeteorBackend("pycocoevalcap", True, f"pycocoevalcap with Java ({java})")
    missing = " and ".join(x for x, ok in (("pycocoevalcap", have_pkg), ("a Java runtime", bool(java))) if not ok)
    wn = wordnet_available()
    return MeteorBackend("nltk", wn, f"fell back to nltk's METEOR: {missing} not found (pip install pycocoevalcap "
                                     "and a JRE give the COCO toolkit's numbers); WordNet "
                                     + ("installed" if wn else "not installed (python -m nltk.downloader wordnet)"))


def meteor(hypotheses: list[str], references: list[str], backend: MeteorBackend | None = None
           ) -> tuple[float, list[float]]:
    """(corpus METEOR, per-sample METEOR). pycocoevalcap's corpus score pools the statistics of all samples (as
    the COCO toolkit reports it); nltk's is the mean of per-sample scores."""
    backend = backend or meteor_backend()
    if not hypotheses:
        return float("nan"), []
    if backend.name == "pycocoevalcap":
        from pycocoevalcap.meteor.meteor import Meteor

        gts = {i: [" ".join(_tokens(r))] for i, r in enumerate(references)}
        res = {i: [" ".join(_tokens(h))] for i, h in enumerate(hypotheses)}
        corpus, per = Meteor().compute_score(gts, res)
        return float(corpus), [float(x) for x in per]
    per = [float(x) for x in caption_meteor(hypotheses, caption=references)]
    return sum(per) / len(per), per


def _ngrams(words: list[str], n_max: int = 4) -> Counter:
    return Counter(tuple(words[i:i + n]) for n in range(1, n_max + 1) for i in range(len(words) - n + 1))


def cider_d(hypotheses: list[str], references: list[list[str]], n_max: int = 4, sigma: float = 6.0
            ) -> tuple[float, list[float]]:
    """(corpus CIDEr-D, per-sample CIDEr-D) of each hypothesis against its list of references, as
    pycocoevalcap's CiderScorer computes it. The document frequencies come from the references of this set, so
    the score depends on the set (with one sample every idf is 0 and so is the score)."""
    if not hypotheses:
        return float("nan"), []
    refs = [[_ngrams(_tokens(r), n_max) for r in rs] for rs in references]
    hyps = [_ngrams(_tokens(h), n_max) for h in hypotheses]
    df: Counter = Counter()
    for rs in refs:
        df.update(set(g for r in rs for g in r))
    log_n = math.log(float(len(refs)))

    def vec(counts: Counter):
        v = [defaultdict(float) for _ in range(n_max)]
        norm = [0.0] * n_max
        length = 0
        for g, tf in counts.items():
            n = len(g) - 1
            v[n][g] = tf * (log_n - math.log(max(1.0, df[g])))
            norm[n] += v[n][g] ** 2
            if n == 1:
                length += tf  # pycocoevalcap's length: the number of bigrams
        return v, [math.sqrt(x) for x in norm], length

    per = []
    for h, rs in zip(hyps, refs, strict=True):
        vh, nh, lh = vec(h)
        total = [0.0] * n_max
        for r in rs:
            vr, nr, lr = vec(r)
            for n in range(n_max):
                val = sum(min(x, vr[n][g]) * vr[n][g] for g, x in vh[n].items() if g in vr[n])
                if nh[n] and nr[n]:
                    val /= nh[n] * nr[n]
                total[n] += val * math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
        per.append(10.0 * sum(total) / n_max / max(1, len(rs)))
    return sum(per) / len(per), per


def mask_metrics(preds: list, gts: list) -> dict:
    """gIoU (mean per-sample IoU, 0 without a mask), cIoU (total intersection / total union) and the share of
    samples with no predicted mask (no ``[SEG]`` in the answer)."""
    if not gts:
        return {"gIoU": float("nan"), "cIoU": float("nan"), "no_seg": float("nan"), "n": 0}
    overlaps = [mask_overlap(p, g) for p, g in zip(preds, gts, strict=True)]
    inter = sum(i for i, _ in overlaps)
    union = sum(u for _, u in overlaps)
    return {"gIoU": sum(i / u if u else 0.0 for i, u in overlaps) / len(overlaps),
            "cIoU": inter / union if union else 0.0,
            "no_seg": sum(p is None for p in preds) / len(preds), "n": len(gts)}

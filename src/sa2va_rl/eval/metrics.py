"""Benchmark metrics as the field reports them: caption METEOR and CIDEr-D, mask gIoU and cIoU.

* METEOR: eval/meteor.py, the one METEOR of the package: METEOR 1.5 (pycocoevalcap's jar, in Java: exact, stem,
  WordNet-synonym and paraphrase matches; the corpus score pools all samples' statistics) where ``java`` is on the
  PATH, else nltk's ``meteor_score`` (mean of per-sample scores), with a warning. The two give different numbers;
  the scorer's ``impl`` (``meteor-1.5`` or ``nltk``) says which one ran and every report carries it.
* CIDEr-D: the COCO-caption definition (n = 1..4, tf-idf over the references of the evaluated set, hypothesis
  counts clipped by the reference's, Gaussian length penalty sigma = 6, x 10), written here after pycocoevalcap's
  ``CiderScorer``; tokens are lower-cased words (the toolkit's PTB tokenizer needs Java).
* gIoU: the mean of per-sample IoU (a sample without ``[SEG]`` scores 0); cIoU: total intersection / total union.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

from sa2va_rl.eval.meteor import MeteorScorer, get_scorer, meteor_scores
from sa2va_rl.rl.rewards import _tokens, mask_overlap


def meteor_backend(impl: str = "auto") -> MeteorScorer:
    """The run's METEOR scorer for ``impl`` (auto, meteor-1.5 or nltk; ``--meteor`` of eval)."""
    return get_scorer(impl, option="--meteor")


def meteor(hypotheses: list[str], references: list[str], backend: MeteorScorer | None = None
           ) -> tuple[float, list[float]]:
    """(corpus METEOR, per-sample METEOR), in one batch (eval/meteor.py ``meteor_scores``)."""
    return meteor_scores(hypotheses, references, backend or meteor_backend())


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

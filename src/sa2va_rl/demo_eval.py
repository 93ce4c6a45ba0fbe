"""The demo's held-out check: do the tiny Sa2VA's captions name the right colour and shape, and do they differ?

Captions are written greedily (upstream's ``predict_forward``) for the region of each held-out sample. A caption
names the right colour when the first colour word in it is the reference's colour, and the right shape likewise;
``both`` needs both. ``distinct`` counts different captions: a collapsed policy writes one caption for all.
"""

from __future__ import annotations

from dataclasses import dataclass

from sa2va_rl.data.synthetic import COLORS, SHAPES


@dataclass
class CaptionAccuracy:
    n: int
    colour: int  # captions whose first colour word is the reference's
    shape: int  # captions whose first shape word is the reference's
    both: int
    distinct: int  # different captions among the n
    captions: list[str]

    def line(self) -> str:
        n = max(self.n, 1)
        return (f"colour {self.colour}/{self.n} ({self.colour / n:.0%}), shape {self.shape}/{self.n} "
                f"({self.shape / n:.0%}), both {self.both}/{self.n} ({self.both / n:.0%}), "
                f"{self.distinct} distinct captions")


def first_word(words: list[str], vocabulary) -> str | None:
    return next((w for w in words if w in vocabulary), None)


def named(caption: str, reference: str) -> tuple[bool, bool]:
    """(right colour, right shape) of ``caption`` against the synthetic ``reference`` caption."""
    words, ref = caption.replace(".", " ").split(), reference.split()
    return (first_word(words, COLORS) == first_word(ref, COLORS) is not None,
            first_word(words, SHAPES) == first_word(ref, SHAPES) is not None)


def held_out_captions(model, tokenizer, reader, max_new_tokens: int = 16) -> list[tuple[object, str]]:
    """(sample, greedy caption of its region) for every good row of ``reader``."""
    from sa2va_rl.rl.tasks import DEFAULT_QUESTION

    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(len(reader)):
            s = reader.get(i)
            if s is None:
                continue
            text = model.predict_forward(image=s.image, text="<image>\n" + (s.question or DEFAULT_QUESTION),
                                         tokenizer=tokenizer, mask_prompts=[s.mask],
                                         max_new_tokens=max_new_tokens)["prediction"]
            out.append((s, text.replace("<|im_end|>", "").strip()))
    finally:
        model.train(was_training)
    return out


def caption_accuracy(model, tokenizer, reader) -> CaptionAccuracy:
    pairs = held_out_captions(model, tokenizer, reader)
    hits = [named(c, s.caption) for s, c in pairs]
    captions = [c for _s, c in pairs]
    return CaptionAccuracy(n=len(pairs), colour=sum(c for c, _ in hits), shape=sum(s for _, s in hits),
                           both=sum(c and s for c, s in hits), distinct=len(set(captions)), captions=captions)


@dataclass
class SampledAccuracy:
    n: int  # held-out samples
    k: int  # captions sampled per sample
    both: int  # sampled captions (of n * k) naming the right colour and shape
    colour: int
    shape: int

    def line(self) -> str:
        m = max(self.n * self.k, 1)
        return (f"colour {self.colour / m:.0%}, shape {self.shape / m:.0%}, both {self.both}/{self.n * self.k} "
                f"({self.both / m:.0%})")


def sampled_accuracy(model, policy, reader, k: int = 8, seed: int = 0, max_new_tokens: int = 12) -> SampledAccuracy:
    """What GRPO optimises: captions sampled as in training (temperature 1), ``k`` per held-out sample, seeded, so
    the same model gives the same count. A policy that puts more probability on the right words scores higher here
    before its greedy caption changes."""
    import torch

    from sa2va_rl.eval.runner import eval_rows, predict

    rows, samples = eval_rows(reader, policy, ["mask2caption"], max_samples=0)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        preds = predict(model, policy, rows * k, batch_size=8 * k, max_new_tokens=max_new_tokens, do_sample=True)
    finally:
        torch.random.set_rng_state(state)
    hits = [named(p["text"], samples[p["source"]].caption) for p in preds]
    return SampledAccuracy(n=len(samples), k=k, both=sum(c and s for c, s in hits), colour=sum(c for c, _ in hits),
                           shape=sum(s for _, s in hits))


def attribute_reward(completions, caption=None, **kwargs) -> list[float | None]:
    """The demo's shaping for mask2caption: 0.5 for the right colour, 0.5 for the right shape (first colour and
    shape words, as ``named``); None on rows without a reference caption (caption2mask). METEOR alone pays mostly
    for the template ("at the ... of the image"), which one caption for every image earns as well."""
    from sa2va_rl.rl.rewards import _text

    if caption is None:
        return [None] * len(completions)
    out: list[float | None] = []
    for c, ref in zip(completions, caption, strict=True):
        if ref is None:
            out.append(None)
            continue
        colour, shape = named(_text(c), ref)
        out.append(0.5 * colour + 0.5 * shape)
    return out


def demo_rewards(tasks: list[str], attribute_weight: float = 1.0, meteor: str = "nltk") -> tuple[list, list[float]]:
    """The tasks' rewards (rl/tasks.py: METEOR, mask IoU, format) plus, for mask2caption, ``attribute_reward``.
    ``meteor``: nltk's by default, as the demo pins it (demo.py says why)."""
    from sa2va_rl.rl.tasks import task_rewards

    funcs, weights = task_rewards(tasks, meteor=meteor)
    if "mask2caption" in tasks and attribute_weight:
        funcs, weights = funcs + [attribute_reward], weights + [attribute_weight]
    return funcs, weights


def mask_accuracy(model, policy, reader) -> dict:
    """caption2mask on the held-out samples, greedy, scored as ``sa2va-rl eval`` scores it (eval/runner.py's rows,
    answers and masks; eval/metrics.py's gIoU, cIoU and the share without ``[SEG]``)."""
    from sa2va_rl.eval.metrics import mask_metrics
    from sa2va_rl.eval.runner import eval_rows, predict

    rows, samples = eval_rows(reader, policy, ["caption2mask"], 0)
    preds = predict(model, policy, rows)
    return mask_metrics([p["mask"] for p in preds], [samples[p["source"]].mask for p in preds])

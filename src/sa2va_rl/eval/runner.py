"""``sa2va-rl eval``: a checkpoint (or two, side by side) over a held-out GAR split, scored as the field reports.

For each GAR sample (the first ``max_samples`` good rows) and task, the model answers the same prompt the trainer
builds (rl/tasks.py), decoded greedily through the model's Policy (models/sa2va.py ``make_policy``: the tiny Sa2VA
and every released family):

* ``mask2caption``: image + region mask -> a caption, scored by METEOR (which implementation: eval/metrics.py),
  CIDEr-D and, with ``--judge_url``, the LLM judge's score / 10 (rl/judge.py; samples it could not score are left
  out of its mean and counted);
* ``caption2mask``: image + reference caption -> ``[SEG]`` -> a mask, scored by gIoU and cIoU, with the share of
  answers without ``[SEG]``.

Writes ``OUT/metrics.json`` (every number, the settings and the METEOR implementation), ``OUT/metrics.md`` (the
table it prints), ``OUT/predictions-LABEL.jsonl`` (each answer) and ``OUT/samples.png``.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class EvalArgs:
    """What ``sa2va-rl eval`` scores and where it writes."""

    model_path: str = field(default=None, metadata={"help": "Sa2VA checkpoint directory: a run's input or its "
                                                          "output (any family; released ones need "
                                                          "--trust_remote_code)."})
    data_dir: str = field(default=None, metadata={"help": "Held-out GAR directory (*.arrow, *.parquet or *.jsonl)."})
    task: str = field(default="both", metadata={"help": "mask2caption, caption2mask or both."})
    compare: str | None = field(default=None, metadata={"help": "A second checkpoint, scored on the same samples and "
                                                               "shown side by side (e.g. the run's input)."})
    max_samples: int = field(default=100, metadata={"help": "Score the first N good GAR samples (each once per "
                                                            "task); 0: all."})
    out_dir: str = field(default="sa2va-rl-eval", metadata={"help": "Where metrics.json, metrics.md, "
                                                                    "predictions-*.jsonl and samples.png go."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per generate() call."})
    max_new_tokens: int = field(default=64, metadata={"help": "Longest answer, in tokens."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding (greedy, the "
                                                             "default, is deterministic)."})
    seed: int = field(default=0, metadata={"help": "Seed (matters only with --do_sample)."})
    sample_images: int = field(default=4, metadata={"help": "Samples drawn in samples.png."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow a released checkpoint's own code."})
    max_tiles: int | None = field(default=None, metadata={"help": "Most 448-px tiles per image (default: the "
                                                                  "checkpoint's)."})
    bad_rows: str = field(default="skip", metadata={"help": "Bad GAR rows: skip (counted) or error."})
    max_prompt_tokens: int = field(default=8192, metadata={"help": "Skip (count) a sample whose prompt is longer."})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when available), cpu or cuda[:N]."})
    meteor: str = field(default="auto", metadata={"help": "Which METEOR: auto (METEOR 1.5, pycocoevalcap's jar in "
                                                          "Java, where java is installed; else nltk with a warning), "
                                                          "meteor-1.5 (refused without java) or nltk. metrics.json "
                                                          "-> settings.meteor_impl says which ran."})

    def __post_init__(self) -> None:
        from sa2va_rl.rl.checkpoints import TRAINABLE_FILE
        from sa2va_rl.rl.tasks import task_list

        if not self.model_path or not self.data_dir:
            raise ValueError("--model_path and --data_dir are required")
        for flag, path in (("model_path", self.model_path), ("compare", self.compare)):
            if path and os.path.isfile(os.path.join(path, TRAINABLE_FILE)):
                raise ValueError(f"{flag} {path!r} is a training checkpoint: it holds only the trained parameters "
                                 "(the frozen ones are the run's --model_path). Evaluate the run's --output_dir, "
                                 "where the whole model is written at the end")
            if path and not os.path.isfile(os.path.join(path, "config.json")):
                raise ValueError(f"{flag} {path!r} has no config.json: pass a checkpoint directory (saved with "
                                 "save_pretrained, or a run's --output_dir)")
        task_list(self.task)  # raises with the choices
        for name in ("max_samples", "sample_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: use 0 or more")
        for name in ("batch_size", "max_new_tokens", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: use 1 or more")
        if self.bad_rows not in ("skip", "error"):
            raise ValueError(f"bad_rows={self.bad_rows!r}: use skip or error")
        check_out_dir(self.out_dir)


def check_out_dir(out_dir: str) -> None:
    """``--out_dir`` must be a directory or creatable as one: a path naming a file (itself or a parent) is refused
    before any model is loaded."""
    path = os.path.abspath(out_dir)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent
    if not os.path.isdir(path):
        what = "is a file" if path == os.path.abspath(out_dir) else f"lies under {path}, which is a file"
        raise ValueError(f"out_dir {out_dir!r} {what}: pass a directory for --out_dir (it is created if missing; "
                         "metrics.json, metrics.md, predictions-*.jsonl and samples.png go in it)")


class EvalStopped(Exception):
    """A signal stopped the eval; ``code`` is the exit code (128 + signal), the message says what was kept."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------------ predicting
def eval_rows(reader, policy, tasks: list[str], max_samples: int, max_prompt_tokens: int | None = None,
              indices=None) -> tuple[list[dict], dict]:
    """The task rows of the first ``max_samples`` good samples (all when 0) among the reader's rows ``indices``
    (default: all, in order), built as the trainer builds them, and {source: GARSample} for drawing. A bad row, or
    one whose prompt is over ``max_prompt_tokens``, is left out (counted by the reader), never replaced."""
    from sa2va_rl.rl.tasks import GARTaskDataset

    data = GARTaskDataset(reader, policy, tasks, max_prompt_tokens=max_prompt_tokens)
    rows, samples = [], {}
    for i in range(len(reader)) if indices is None else indices:
        if max_samples and len(samples) >= max_samples:
            break
        s = reader.get(i)
        if s is None:
            continue
        built = [data[i * len(tasks) + t] for t in range(len(tasks))]
        if any(r["source"] != s.source for r in built):  # refused (prompt too long): counted by the reader
            continue
        samples[s.source] = s
        rows.extend(built)
    return rows, samples


def predict(model, policy, rows: list[dict], batch_size: int = 8, max_new_tokens: int = 64,
            do_sample: bool = False, progress=None, stop=None) -> list[dict]:
    """Each row's answer: {source, task, text, has_seg, mask (bool [H, W] for caption2mask rows with [SEG],
    else None)}. Greedy unless ``do_sample``; no LogitsGuard (nothing is trained on these tokens). ``stop``: an
    object whose ``received`` turns non-None on a signal (rl/signals.py GracefulStop): the answers stop after the
    batch in flight, and those made so far are returned (fewer than the rows)."""
    import torch
    from transformers import GenerationConfig

    from sa2va_rl.models.policy import eos_set

    gc = GenerationConfig(do_sample=do_sample, max_new_tokens=max_new_tokens, pad_token_id=policy.pad_token_id,
                          eos_token_id=getattr(model.generation_config, "eos_token_id", None))
    tok = policy.tokenizer
    drop = eos_set(gc) | {policy.pad_token_id}
    stops = getattr(getattr(policy, "stops", None), "strings", [])

    def text_of(ids: list[int]) -> str:
        """The answer as written, [SEG] kept (it may be a special token), EOS and stop strings removed."""
        text = tok.decode([t for t in ids if t not in drop], skip_special_tokens=False)
        for s in stops:
            text = text.split(s)[0]
        return text.strip()

    out = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                if stop is not None and stop.received is not None:
                    break
                chunk = rows[start:start + batch_size]
                ids = [tok(r["prompt"])["input_ids"] for r in chunk]
                contexts = [r["visual"] for r in chunk]
                gen = policy.generate(model, ids, gc, None, contexts=contexts)
                seg_rows = [i for i, r in enumerate(chunk) if r["task"] == "caption2mask"]
                masks = [None] * len(chunk)
                if seg_rows:
                    got = policy.segment(model, [ids[i] for i in seg_rows],
                                         [gen.completion_ids[i] for i in seg_rows], [contexts[i] for i in seg_rows])
                    for i, m in zip(seg_rows, got, strict=True):
                        masks[i] = m
                for r, c, m in zip(chunk, gen.completion_ids, masks, strict=True):
                    out.append({"source": r["source"], "task": r["task"], "reference": r["caption"],
                                "text": text_of(c),
                                "has_seg": policy.seg_id in c, "mask": m})
                if progress is not None:
                    progress.update(len(chunk))
    finally:
        model.train(was_training)
    return out


# ------------------------------------------------------------------------------------------------ scoring
def score(preds: list[dict], samples: dict, backend, judge=None) -> dict:
    """Per-task metrics of one model's predictions (adds each prediction's own scores to it)."""
    from sa2va_rl.eval.metrics import cider_d, mask_metrics, meteor

    out = {}
    caps = [p for p in preds if p["task"] == "mask2caption"]
    if caps:
        hyps, refs = [p["text"] for p in caps], [p["reference"] for p in caps]
        m, per_m = meteor(hyps, refs, backend)
        c, per_c = cider_d(hyps, [[r] for r in refs])
        res = {"METEOR": m, "CIDEr-D": c, "n": len(caps), "meteor_impl": backend.last_impl}
        for p, a, b in zip(caps, per_m, per_c, strict=True):
            p["meteor"], p["cider_d"] = a, b
        if judge is not None:
            js = judge.score(hyps, refs)
            ok = [x for x in js if x is not None]
            res["judge"] = sum(ok) / len(ok) if ok else None  # None (null): the judge scored none of them
            res["judge_unscored"] = len(js) - len(ok)
            for p, x in zip(caps, js, strict=True):
                p["judge"] = x
        out["mask2caption"] = res
    segs = [p for p in preds if p["task"] == "caption2mask"]
    if segs:
        gts = [samples[p["source"]].mask for p in segs]
        out["caption2mask"] = mask_metrics([p["mask"] for p in segs], gts)
        from sa2va_rl.rl.rewards import mask_overlap

        for p, g in zip(segs, gts, strict=True):
            i, u = mask_overlap(p["mask"], g)
            p["iou"] = i / u if u else 0.0
    return out


def evaluate_checkpoint(path: str, args: EvalArgs, tasks: list[str], judge, backend, stop=None
                        ) -> tuple[dict | None, list, dict, int]:
    """Load one checkpoint, answer every row, score: (metrics, predictions, {source: sample}, number of rows).
    Stopped by a signal (``stop``, see ``predict``): metrics None and the predictions made so far, unscored."""
    import torch
    from tqdm.auto import tqdm

    from sa2va_rl.data.gar import GARReader
    from sa2va_rl.models.sa2va import load_sa2va, make_policy

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    model, tokenizer = load_sa2va(path, dtype, trust_remote_code=args.trust_remote_code)
    model.to(device)
    policy = make_policy(model, tokenizer, path, args.max_tiles, args.trust_remote_code)
    reader = GARReader(args.data_dir, bad_rows=args.bad_rows)
    rows, samples = eval_rows(reader, policy, tasks, args.max_samples, args.max_prompt_tokens)
    with tqdm(total=len(rows), desc=f"eval {os.path.basename(os.path.normpath(path))}", unit="answer") as bar:
        preds = predict(model, policy, rows, args.batch_size, args.max_new_tokens, args.do_sample, bar, stop)
    if len(preds) < len(rows):
        return None, preds, samples, len(rows)
    metrics = score(preds, samples, backend, judge)
    metrics["bad_rows"] = {f"{f}:{fld}": n for (f, fld), n in reader.bad_counts.items()}
    del model
    return metrics, preds, samples, len(rows)


# ------------------------------------------------------------------------------------------------ reporting
ROWS = [("mask2caption", "METEOR", "{:.4f}"), ("mask2caption", "CIDEr-D", "{:.4f}"), ("mask2caption", "judge", "{:.4f}"),
        ("mask2caption", "judge_unscored", "{:d}"), ("mask2caption", "n", "{:d}"),
        ("caption2mask", "gIoU", "{:.4f}"), ("caption2mask", "cIoU", "{:.4f}"), ("caption2mask", "no_seg", "{:.1%}"),
        ("caption2mask", "n", "{:d}")]
NAMES = {"judge": "LLM judge (score/10)", "judge_unscored": "judge: no score (failed calls)", "n": "samples",
         "no_seg": "answers without [SEG]"}


def markdown_table(results: dict[str, dict], meteor_name: str) -> str:
    """One column per model (a third with the difference when there are two)."""
    labels = list(results)
    head = ["task", "metric", *labels] + (["difference"] if len(labels) == 2 else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, key, fmt in ROWS:
        if not any(key in results[lab].get(task, {}) for lab in labels):
            continue
        vals = [results[lab].get(task, {}).get(key) for lab in labels]
        cells = ["-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v) for v in vals]
        if len(labels) == 2:
            a, b = vals
            diff = "" if key in ("n", "judge_unscored") or a is None or b is None else (
                "{:+.1%}" if key == "no_seg" else "{:+.4f}").format(a - b)
            cells.append(diff)
        name = NAMES.get(key, key) + (f" [{meteor_name}]" if key == "METEOR" else "")
        lines.append("| " + " | ".join([task, name, *cells]) + " |")
    return "\n".join(lines) + "\n"


def _labels(paths: list[str]) -> list[str]:
    names = [os.path.basename(os.path.normpath(p)) or p for p in paths]
    return names if len(set(names)) == len(names) else [f"{n} ({k})" for n, k in zip(names, "AB")]


def _predictions_file(out_dir: str, label: str, partial: bool = False) -> str:
    return os.path.join(out_dir, f"predictions-{label.replace(' ', '_')}{'.partial' if partial else ''}.jsonl")


def _jsonable(p: dict) -> dict:
    return {k: v for k, v in p.items() if k != "mask"} | {"mask_pixels": None if p["mask"] is None
                                                            else int(np.asarray(p["mask"]).sum())}


def run_eval(args: EvalArgs, judge=None, stop=None) -> dict:
    """Score ``args.model_path`` (and ``args.compare``) and write the reports; returns the metrics.json payload.

    ``args.out_dir`` is locked for the whole eval (rl/run_lock.py: a second eval into it is refused,
    ``OutputDirBusy``); if the eval fails, a directory it created is removed again when it is empty. ``stop``
    (rl/signals.py GracefulStop, installed by the caller): after a signal the answers made so far are written to
    ``predictions-LABEL.partial.jsonl`` and ``EvalStopped`` is raised; no metrics are written."""
    from sa2va_rl.rl.run_lock import RunLock

    created = not os.path.isdir(args.out_dir)
    lock = RunLock(args.out_dir, flag="--out_dir",
                   clash="two evals into one --out_dir would overwrite each other's predictions and metrics")
    lock.acquire()  # creates out_dir: OSError when it cannot be
    done = False
    try:
        payload = _run_eval(args, judge, stop)
        done = True
        return payload
    finally:
        lock.release()
        if created and not done:
            try:
                os.rmdir(args.out_dir)  # only when empty: partial predictions stay
            except OSError:
                pass


def _run_eval(args: EvalArgs, judge, stop) -> dict:
    import signal

    from transformers import set_seed

    from sa2va_rl.eval.metrics import meteor_backend
    from sa2va_rl.eval.plots import plot_eval_samples
    from sa2va_rl.jsonio import dump_json, dump_jsonl
    from sa2va_rl.rl.tasks import task_list

    tasks = task_list(args.task)
    backend = meteor_backend(args.meteor)  # ValueError naming --meteor: unknown, or meteor-1.5 without java
    logger.info("METEOR: %s", backend.note)
    paths = [args.model_path] + ([args.compare] if args.compare else [])
    labels = _labels(paths)
    results, all_preds, samples = {}, {}, {}
    for label, path in zip(labels, paths, strict=True):
        set_seed(args.seed)
        results[label], all_preds[label], samples, n_rows = evaluate_checkpoint(path, args, tasks, judge, backend,
                                                                                stop)
        if results[label] is None or (stop is not None and stop.received is not None):
            written = []
            for lab, preds in all_preds.items():
                if preds:
                    written.append(_predictions_file(args.out_dir, lab, partial=True))
                    dump_jsonl((_jsonable(p) for p in preds), written[-1])
            name = signal.Signals(stop.received).name
            kept = (f"the answers so far ({len(all_preds[label])} of {n_rows} for {label}) are in "
                    f"{', '.join(written)}" if written else "no answer was made yet, nothing written")
            raise EvalStopped(128 + int(stop.received), f"stopped by {name}: {kept}; no metrics written (run the "
                                                         "eval again for them)")
    for label, preds in all_preds.items():
        dump_jsonl((_jsonable(p) for p in preds), _predictions_file(args.out_dir, label))
    used = {lab: results[lab].get("mask2caption", {}).get("meteor_impl") for lab in labels}
    if len(set(x for x in used.values() if x)) > 1:
        logger.warning("METEOR: the models were scored with different implementations (%s: java failed and "
                       "nltk took over); their METEOR columns do not compare: run the eval again", used)
    payload = {
        "models": {lab: {"model_path": p, **results[lab]} for lab, p in zip(labels, paths, strict=True)},
        "settings": {**{k: v for k, v in asdict(args).items() if k not in ("model_path", "compare")},
                     "decoding": "sampled" if args.do_sample else "greedy",
                     "meteor_impl": backend.impl,  # "meteor-1.5" or "nltk": which METEOR scored
                     "meteor": {"implementation": backend.describe(), **backend.report()},
                     "judge": None if judge is None else judge.report()},
    }
    dump_json(payload, os.path.join(args.out_dir, "metrics.json"))  # strict JSON: NaN/inf as null
    table = markdown_table(results, backend.describe())
    with open(os.path.join(args.out_dir, "metrics.md"), "w") as f:
        f.write(table)
    if args.sample_images:
        plot_eval_samples(samples, all_preds, os.path.join(args.out_dir, "samples.png"), args.sample_images)
    payload["table"] = table
    return payload

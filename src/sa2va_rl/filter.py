"""``sa2va-rl filter``: keep the GAR samples whose rewards vary most under group rollouts.

The Sa2VA authors trained RL on the 2k samples with the highest reward variance under G rollouts (config
``vrt_qwen3_4b_grpo_0801_2k_filtered``): a group whose G rewards are equal gives GRPO no advantage, so no gradient.
This scores every GAR sample (once per task row) as training would see it and writes the top K as a data directory
``sa2va-rl train`` reads.

* Rollouts and rewards go through the trainer itself: a ``Sa2VAGRPOTrainer`` built as ``train`` builds it (the
  model from ``load_sa2va``/``make_policy``, so every family works; the rewards and weights of ``task_rewards``; the
  generation config TRL builds from ``temperature`` and ``max_completion_length``; the LogitsGuard) runs its own
  ``_score_generation`` on G copies of each row, with the model in eval mode (no dropout, no data skip). Completions
  are decoded as TRL decodes them, caption2mask rows get their ``[SEG]`` masks from ``policy.segment``, and the
  rewards are the ones GRPO's advantages see: each function's values (None: no opinion), weighted and summed over the
  functions with an opinion (rl/advantages.py ``weighted_rewards``), then per row the mean and the std (TRL's
  ``nanstd``, Bessel-corrected, as ``group_advantages`` with ``scale_rewards='group'``).
* Batches are fixed ranges of the reader's rows (``batch_size`` samples each, every task, G rollouts each, one
  generate() call), each seeded from (``seed``, batch number): a batch's scores do not depend on which batches ran
  before, so a resumed run gives the scores an uninterrupted one gives.
* ``OUT/scores.jsonl`` gets one line per task row, appended and fsync'd per batch; ``OUT/skipped.jsonl`` the bad
  samples. A re-run with the same arguments skips what is scored (keyed by source and task); ``OUT/filter_config.json``
  holds the arguments the scores depend on, and a run with others is refused by name. ``top_k`` and ``max_samples``
  are not among them: a re-run with another K only selects again.
* The selection: a sample ranks by the highest std among its task rows; the K highest, ties broken by source (file,
  then row number); rows whose std is undefined (null: fewer than two rollouts had a reward) are never selected.
  ``OUT/subset/gar_index.json`` lists them by file and row (data/gar.py ``INDEX_FILE``: the reader reads those rows
  of the original files, sources unchanged). Also ``OUT/std_hist.png`` and the summary table (``OUT/summary.md``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field

from sa2va_rl.jsonio import dump_json, dumps_strict

logger = logging.getLogger(__name__)

CONFIG_FILE, SCORES_FILE, SKIPPED_FILE = "filter_config.json", "scores.jsonl", "skipped.jsonl"
SUBSET_DIR, HIST_FILE, SUMMARY_FILE = "subset", "std_hist.png", "summary.md"
ZERO_STD_ATOL = 1e-8  # torch.isclose's default atol, with which TRL counts frac_reward_zero_std


def _train_default(name: str):
    """A Sa2VAGRPOConfig field's default: ``train``'s value, so that filter and train sample alike."""
    from sa2va_rl.rl.config import Sa2VAGRPOConfig

    return Sa2VAGRPOConfig.__dataclass_fields__[name].default


@dataclass
class FilterArgs:
    """What ``sa2va-rl filter`` scores, how, and where it writes."""

    model_path: str = field(default=None, metadata={"help": "Sa2VA checkpoint directory (any family; released ones "
                                                          "need --trust_remote_code): the model whose rollouts "
                                                          "score the data, usually the one you will train."})
    data_dir: str = field(default=None, metadata={"help": "GAR directory to filter (*.arrow, *.parquet, *.jsonl, or "
                                                        "a gar_index.json subset)."})
    out_dir: str = field(default=None, metadata={"help": "Where filter_config.json, scores.jsonl, skipped.jsonl, "
                                                       "std_hist.png, summary.md and subset/ (the data dir for "
                                                       "train) go. Re-run into it with the same arguments to "
                                                       "resume."})
    num_generations: int = field(default=None, metadata={"help": "Rollouts per task row (G, >= 2); default: "
                                                               "train's."})
    top_k: int = field(default=2000, metadata={"help": "Samples written to OUT/subset: those with the highest "
                                                       "reward std (the Sa2VA authors kept 2000). May change "
                                                       "between runs: only the selection is redone."})
    task: str = field(default="both", metadata={"help": "mask2caption, caption2mask or both (each sample scored "
                                                        "once per task; a sample ranks by its highest std)."})
    temperature: float = field(default=None, metadata={"help": "Sampling temperature; default: train's."})
    max_completion_length: int = field(default=None, metadata={"help": "Longest rollout, in tokens; default: "
                                                                         "train's."})
    batch_size: int = field(default=4, metadata={"help": "GAR samples per batch: one generate() call samples "
                                                         "batch_size x tasks x num_generations completions; scores "
                                                         "are saved per batch."})
    seed: int = field(default=0, metadata={"help": "Seed: the same seed (and arguments) gives the same scores, "
                                                   "resumed or not."})
    max_samples: int = field(default=0, metadata={"help": "Score only the first N rows of the data (rounded up to "
                                                          "a whole batch); 0: all. A later run continues."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow a released checkpoint's own code."})
    max_tiles: int | None = field(default=None, metadata={"help": "Most 448-px tiles per image (default: the "
                                                                  "checkpoint's)."})
    bad_rows: str = field(default="skip", metadata={"help": "Bad GAR rows: skip (listed in skipped.jsonl) or "
                                                            "error."})
    max_prompt_tokens: int = field(default=8192, metadata={"help": "Skip a sample whose prompt is longer (as "
                                                                   "train does)."})

    def __post_init__(self) -> None:
        from sa2va_rl.rl.tasks import task_list

        if not self.model_path or not self.data_dir or not self.out_dir:
            raise ValueError("--model_path, --data_dir and --out_dir are required")
        if not os.path.isfile(os.path.join(self.model_path, "config.json")):
            raise ValueError(f"--model_path {self.model_path!r} has no config.json: pass a checkpoint directory "
                             "(`sa2va-rl make-tiny --kind sa2va DIR` writes one)")
        if os.path.exists(self.out_dir) and not os.path.isdir(self.out_dir):
            raise ValueError(f"--out_dir {self.out_dir!r} is a file, not a directory: pass a new or existing "
                             "directory")
        task_list(self.task)  # raises with the choices
        if self.num_generations is None:
            self.num_generations = _train_default("num_generations")
        if self.temperature is None:
            self.temperature = _train_default("temperature")
        if self.max_completion_length is None:
            self.max_completion_length = _train_default("max_completion_length")
        if self.num_generations < 2:
            raise ValueError(f"--num_generations {self.num_generations}: the std of fewer than 2 rollouts is "
                             "undefined; use 2 or more (train's groups)")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"--temperature {self.temperature}: use a finite value > 0 (train samples)")
        for name in ("top_k", "batch_size", "max_completion_length", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} {getattr(self, name)}: use 1 or more")
        if self.max_samples < 0:
            raise ValueError(f"--max_samples {self.max_samples}: use 0 (all) or more")
        if self.bad_rows not in ("skip", "error"):
            raise ValueError(f"--bad_rows {self.bad_rows!r}: use skip or error")


# the arguments the scores depend on: a run into an out_dir scored with others is refused, naming them
SCORED_WITH = ("model_path", "data_dir", "task", "num_generations", "temperature", "max_completion_length",
               "batch_size", "seed", "max_tiles", "max_prompt_tokens")


class FilterConfigMismatch(ValueError):
    """The out_dir holds scores made with other arguments; the message names each field, both values and the fix."""


class ScoresFileError(ValueError):
    """scores.jsonl / skipped.jsonl cannot be read back (a corrupt line other than a torn last one, a key twice)."""


def scored_with(args: FilterArgs, funcs, weights) -> dict:
    """The identity of a run's scores: the arguments they depend on, paths made absolute, and the rewards."""
    ident = {k: getattr(args, k) for k in SCORED_WITH}
    ident["model_path"], ident["data_dir"] = os.path.abspath(args.model_path), os.path.abspath(args.data_dir)
    ident["reward_functions"] = [getattr(f, "__name__", type(f).__name__) for f in funcs]
    ident["reward_weights"] = list(weights)
    scorers = [f.meteor_scorer() for f in funcs if callable(getattr(f, "meteor_scorer", None))]
    if scorers:  # METEOR 1.5 and nltk's give different scores: a resume must not mix them
        ident["caption_meteor_impl"] = scorers[0].impl
    return ident


def claim_out_dir(out_dir: str, ident: dict) -> bool:
    """Write ``filter_config.json`` (atomically), or check the one there: raises FilterConfigMismatch naming every
    field that differs. Returns whether a previous run's config was found."""
    path = os.path.join(out_dir, CONFIG_FILE)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                stored = json.load(f)["scored_with"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise FilterConfigMismatch(f"{path}: unreadable ({type(e).__name__}: {e}); it is written atomically, so "
                                       "something else wrote it: use a new --out_dir") from None
        diff = [k for k in sorted(set(stored) | set(ident)) if stored.get(k) != ident.get(k)]
        if diff:
            named = "; ".join(f"{k}: {stored.get(k)!r} there, {ident.get(k)!r} now" for k in diff)
            raise FilterConfigMismatch(
                f"--out_dir {out_dir} holds scores made with other arguments ({named}). Re-run with the arguments in "
                f"{path} to continue those scores, or pass a new --out_dir")
        return True
    if os.path.exists(os.path.join(out_dir, SCORES_FILE)):
        raise FilterConfigMismatch(f"--out_dir {out_dir} holds a {SCORES_FILE} but no {CONFIG_FILE}: not written by "
                                   "`sa2va-rl filter`, or by another version; use a new --out_dir")
    dump_json({"scored_with": ident}, path, indent=1)
    return False


def read_jsonl_keyed(path: str, key) -> dict:
    """{key(record): record} of a jsonl file this command appends to. A torn last line (a kill mid-write) is cut off
    the file, with a warning; any other unreadable line, or a key met twice, raises ScoresFileError naming the line."""
    out: dict = {}
    if not os.path.exists(path):
        return out
    with open(path, "rb") as f:
        data = f.read()
    good_end, lineno = 0, 0
    for lineno, raw in enumerate(data.splitlines(keepends=True), start=1):
        try:
            if not raw.endswith(b"\n"):
                raise ValueError("no newline: the write of this line did not finish")
            rec = json.loads(raw)
        except ValueError as e:
            if good_end + len(raw) == len(data):  # the last line: torn by a kill; its batch is scored again
                logger.warning("%s: line %d is incomplete (%s); cut off, its batch is scored again", path, lineno, e)
                with open(path, "r+b") as f:
                    f.truncate(good_end)
                    f.flush()
                    os.fsync(f.fileno())
                break
            raise ScoresFileError(f"{path}: line {lineno}: not valid JSON ({e}); remove the line (its row is scored "
                                  "again) or the file") from None
        k = key(rec)
        if k in out:
            raise ScoresFileError(f"{path}: line {lineno}: {k} is there twice; remove one line")
        out[k] = rec
        good_end += len(raw)
    return out


def _append_jsonl(path: str, records: list[dict]) -> None:
    """One write, flushed and fsync'd: a kill leaves at most the last line torn (read_jsonl_keyed cuts it)."""
    if not records:
        return
    text = "".join(dumps_strict(r) + "\n" for r in records)
    with open(path, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _float_or_none(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def group_stats(rewards_per_func, weights, num_generations: int) -> list[dict]:
    """Per group of ``num_generations`` consecutive rows of ``rewards_per_func`` [N * G, funcs] (NaN: no opinion):
    {mean, std, totals, per_func} of the weighted total as GRPO's advantages see it; NaN -> None (strict JSON)."""
    import torch
    from trl.trainer.utils import nanstd

    from sa2va_rl.rl.advantages import weighted_rewards

    rpf = rewards_per_func.detach().float().cpu()
    totals = weighted_rewards(rpf, torch.as_tensor(weights, dtype=torch.float32)).view(-1, num_generations)
    mean, std = torch.nanmean(totals, dim=1), nanstd(totals, dim=1)
    per = rpf.view(-1, num_generations, rpf.shape[1])
    return [{"mean": _float_or_none(mean[g]), "std": _float_or_none(std[g]),
             "totals": [_float_or_none(v) for v in totals[g]],
             "per_func": [[_float_or_none(v) for v in per[g, :, f]] for f in range(rpf.shape[1])]}
            for g in range(totals.shape[0])]


# ------------------------------------------------------------------------------------------------ scoring
class Scorer:
    """The trainer that ``train`` would build for these arguments, used for rollouts and rewards only."""

    def __init__(self, args: FilterArgs, tasks: list[str], funcs, weights) -> None:
        import torch

        from sa2va_rl.models.sa2va import load_sa2va, make_policy
        from sa2va_rl.rl.config import Sa2VAGRPOConfig, bf16_supported
        from sa2va_rl.rl.trainer import Sa2VAGRPOTrainer

        bf16 = bf16_supported()  # train's default
        model, tokenizer = load_sa2va(args.model_path, torch.bfloat16 if bf16 else torch.float32,
                                      trust_remote_code=args.trust_remote_code)
        self.policy = make_policy(model, tokenizer, args.model_path, args.max_tiles, args.trust_remote_code)
        model.requires_grad_(False)  # nothing trains: no fp32 master copy, no optimizer state
        G = args.num_generations
        config = Sa2VAGRPOConfig(
            output_dir=args.out_dir, num_generations=G, num_generations_eval=G, batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size * G, temperature=args.temperature,
            max_completion_length=args.max_completion_length, reward_weights=list(weights), beta=0.0, bf16=bf16,
            seed=args.seed, report_to=[], save_strategy="no", disable_tqdm=True)
        from datasets import Dataset

        self.trainer = Sa2VAGRPOTrainer(model=model, reward_funcs=funcs, args=config, processing_class=tokenizer,
                                        train_dataset=Dataset.from_dict({"row": [0]}), policy=self.policy)
        self.trainer.model.eval()  # generation as in training, without dropout; _score_generation's eval branch
        self.G = G
        self.weights = list(weights)

    def score(self, rows: list[dict]) -> list[dict]:
        """One generate() call for ``rows`` x G rollouts; per row, group_stats of its G rewards."""
        inputs = [dict(r) for r in rows for _ in range(self.G)]  # the G copies share the row's visual inputs
        _output, record = self.trainer._score_generation(inputs)
        self.trainer._metrics["eval"].clear()  # TRL's per-batch metric lists: nobody logs them here
        return group_stats(record.rewards_per_func, self.weights, self.G)


def batch_seed(seed: int, batch: int) -> int:
    """The seed of batch ``batch``: independent of which batches ran before (resume gives the same scores)."""
    import numpy as np

    return int(np.random.SeedSequence([seed, batch]).generate_state(1)[0])


# ------------------------------------------------------------------------------------------------ selection
def _source_order(source: str) -> tuple[str, int]:
    path, row = source.rsplit(":", 1)
    return path, int(row)


def select_top(scores: list[dict], k: int) -> list[dict]:
    """The ``k`` samples with the highest std, one entry per sample: a sample ranks by the highest std among its
    task rows (that row's task recorded); ties broken by source (file, then row number); null stds never chosen."""
    best: dict[str, dict] = {}
    for r in scores:
        if r["std"] is None:
            continue
        b = best.get(r["source"])
        if b is None or r["std"] > b["std"] or (r["std"] == b["std"] and r["task"] < b["task"]):
            best[r["source"]] = r
    ranked = sorted(best.values(), key=lambda r: (-r["std"], *_source_order(r["source"])))
    return ranked[:k]


def summary_table(scores: list[dict], selected: list[dict], k: int, skipped: int, repaired: int | None) -> tuple[
        str, dict]:
    """(markdown table, its numbers)."""
    import numpy as np

    stds = np.array([r["std"] for r in scores if r["std"] is not None], dtype=np.float64)
    by_task = Counter(r["task"] for r in scores)
    qs = [0, 0.25, 0.5, 0.75, 0.9, 1.0]
    quant = [float(np.quantile(stds, q)) for q in qs] if stds.size else [None] * len(qs)
    zero = int((np.abs(stds) <= ZERO_STD_ATOL).sum()) if stds.size else 0
    cutoff = selected[k - 1]["std"] if len(selected) >= k else None
    nums = {"rows_scored": len(scores), "rows_by_task": dict(sorted(by_task.items())), "samples_skipped": skipped,
            "std_quantiles": dict(zip([f"{q:g}" for q in qs], quant)), "std_null": len(scores) - int(stds.size),
            "zero_std_share": zero / len(scores) if scores else None, "top_k": k, "selected": len(selected),
            "cutoff_std": cutoff, "repaired_logit_rows": repaired}
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    lines = ["| filter | value |", "|---|---|",
             f"| task rows scored | {len(scores)} ({', '.join(f'{t} {n}' for t, n in sorted(by_task.items()))}) |",
             f"| samples skipped (bad rows, long prompts) | {skipped} |",
             "| reward std: min / 25% / 50% / 75% / 90% / max | " + " / ".join(fmt(v) for v in quant) + " |",
             f"| zero-std rows (no GRPO signal) | {zero} ({(zero / len(scores) if scores else 0):.1%}) |",
             f"| undefined std (null: < 2 rewarded rollouts) | {len(scores) - int(stds.size)} |",
             f"| K-th highest sample std (cutoff), K = {k} | "
             + (fmt(cutoff) if cutoff is not None else f"- (only {len(selected)} samples with a std)") + " |",
             f"| samples written to {SUBSET_DIR}/ | {len(selected)} |"]
    if repaired is not None:
        lines.append(f"| logit rows repaired by the LogitsGuard (this run) | {repaired} |")
    return "\n".join(lines) + "\n", nums


# ------------------------------------------------------------------------------------------------ the command
def run_filter(args: FilterArgs, on_batch=None) -> dict:
    """Score, select and write (see the module docstring); returns {"table", "summary", "subset_dir"}. ``on_batch``
    (tests) is called with the batch number after each batch is saved. Raises FilterConfigMismatch (another run's
    out_dir), ScoresFileError, the reader's errors (FileNotFoundError, DataFileError, BadRow, NoGoodRows), ValueError
    / UpstreamLoadError / LayoutError from loading, RewardError, OutputDirBusy and OSError."""
    from tqdm.auto import tqdm
    from transformers import set_seed

    from sa2va_rl.data.gar import GARReader, write_index
    from sa2va_rl.eval.plots import plot_std_histogram
    from sa2va_rl.eval.runner import eval_rows
    from sa2va_rl.rl.run_lock import RunLock
    from sa2va_rl.rl.tasks import task_list, task_rewards

    tasks = task_list(args.task)
    funcs, weights = task_rewards(tasks)  # train's, without a judge
    names = [getattr(f, "__name__", type(f).__name__) for f in funcs]
    reader = GARReader(args.data_dir, bad_rows=args.bad_rows)
    os.makedirs(args.out_dir, exist_ok=True)
    lock = RunLock(args.out_dir)
    lock.acquire()
    try:
        resumed = claim_out_dir(args.out_dir, scored_with(args, funcs, weights))
        scores_path, skipped_path = (os.path.join(args.out_dir, n) for n in (SCORES_FILE, SKIPPED_FILE))
        scores = read_jsonl_keyed(scores_path, lambda r: (r["source"], r["task"]))
        skipped = read_jsonl_keyed(skipped_path, lambda r: r["source"])
        if resumed:
            logger.info("%s: %d task rows scored and %d samples skipped by earlier runs with these arguments",
                        args.out_dir, len(scores), len(skipped))

        def rel(source: str) -> str:  # "file:row", file relative to data_dir: the key, portable
            path, row = source.rsplit(":", 1)
            return f"{os.path.relpath(path, args.data_dir)}:{row}"

        B = args.batch_size
        n = len(reader) if not args.max_samples else min(len(reader), -(-args.max_samples // B) * B)
        done = lambda i: rel(reader.source(i)) in skipped or all(  # noqa: E731
            (rel(reader.source(i)), t) in scores for t in tasks)
        scorer = None
        with tqdm(total=n, desc="filter", unit="sample") as bar:
            for b, lo in enumerate(range(0, n, B)):
                todo = [i for i in range(lo, min(lo + B, n)) if not done(i)]
                bar.update(min(lo + B, n) - lo - len(todo))
                if not todo:
                    continue
                if scorer is None:
                    scorer = Scorer(args, tasks, funcs, weights)
                rows, new_skips = [], []
                for i in range(lo, min(lo + B, n)):  # the whole batch, done rows included: same batch, same draws
                    before = Counter(reader.bad_counts)
                    got, _ = eval_rows(reader, scorer.policy, tasks, 0, args.max_prompt_tokens, indices=[i])
                    rows.extend(got)
                    if not got and rel(reader.source(i)) not in skipped:
                        fields = sorted(f for (_, f), c in (reader.bad_counts - before).items() if c)
                        new_skips.append({"source": rel(reader.source(i)), "fields": fields or ["<known bad>"]})
                stats = []
                if rows:
                    set_seed(batch_seed(args.seed, b))
                    stats = scorer.score(rows)
                new = [{"source": rel(r["source"]), "task": r["task"], "mean": s["mean"], "std": s["std"],
                        "rewards": {name: s["per_func"][f] for f, name in enumerate(names)},
                        "totals": s["totals"]}
                       for r, s in zip(rows, stats, strict=True) if (rel(r["source"]), r["task"]) not in scores]
                _append_jsonl(skipped_path, new_skips)
                _append_jsonl(scores_path, new)
                skipped.update({s["source"]: s for s in new_skips})
                scores.update({(r["source"], r["task"]): r for r in new})
                bar.update(len(todo))
                if on_batch is not None:
                    on_batch(b)
        ordered = sorted(scores.values(), key=lambda r: (*_source_order(r["source"]), r["task"]))
        selected = select_top(ordered, args.top_k)
        subset = os.path.join(args.out_dir, SUBSET_DIR)
        os.makedirs(subset, exist_ok=True)
        entries = [{"file": _source_order(r["source"])[0], "row": _source_order(r["source"])[1], "task": r["task"],
                    "std": r["std"], "mean": r["mean"]} for r in selected]
        write_index(subset, args.data_dir, entries, top_k=args.top_k, ranked_by="reward std (highest first)")
        repaired = None if scorer is None else scorer.trainer.stability.counters.repaired_rows
        table, nums = summary_table(ordered, selected, args.top_k, len(skipped), repaired)
        with open(os.path.join(args.out_dir, SUMMARY_FILE), "w") as f:
            f.write(table)
        plot_std_histogram([r["std"] for r in ordered if r["std"] is not None], nums["cutoff_std"],
                           os.path.join(args.out_dir, HIST_FILE),
                           title=f"reward std over {args.num_generations} rollouts per task row "
                                 f"({args.task}, temperature {args.temperature:g})")
    finally:
        lock.release()
    return {"table": table, "summary": nums, "subset_dir": subset, "settings": asdict(args)}

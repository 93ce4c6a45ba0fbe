"""Median GRPO step time: this trainer (every guard on) vs stock ``trl.GRPOTrainer``, measured in one run.

Same tiny causal LM, data, seed, reward function and config (the fields both configs share are set from one dict;
the stability fields keep their defaults: LogitsGuard, repaired-token drop, GradGuard, reward guard, log-ratio
clamp and the fp32 floored-std advantages all on). Runs alternate between the two trainers so machine drift hits
both alike; a step is timed from its start to the next step's start (the Trainer's whole loop iteration, per-step
logging included); the first step of each run (one-off setup) and the last (no next start) are not counted. The
mean completion length of each side is printed to show that both decode the same number of tokens.

Run: python benchmarks/vs_trl.py [--rounds 4 --steps 8 --threads 1]   (prints wall and process-CPU medians; CPU time is
the one to read on a CPU machine that other jobs load)
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
from trl import GRPOConfig, GRPOTrainer

from _timing import StepTimer
from grpo_step import distinct_words
from sa2va_rl.data.prompts import load_prompt_dataset, make_prompt_data
from sa2va_rl.models.tiny import make_tiny_causal
from sa2va_rl.rl.config import Sa2VAGRPOConfig
from sa2va_rl.rl.trainer import Sa2VAGRPOTrainer


def shared_config(out: str, steps: int) -> dict:
    return dict(output_dir=out, max_steps=steps, per_device_train_batch_size=8, num_generations=4,
                max_completion_length=16, learning_rate=1e-5, max_grad_norm=1.0, warmup_steps=0, bf16=False,
                cast_lm_head_to_fp32=True, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
                report_to="none")


def run(ours: bool, model_dir: str, data_dir: str, out: str, steps: int) -> tuple[StepTimer, float]:
    torch.manual_seed(0)
    kw = shared_config(out, steps)
    cls, cfg = ((Sa2VAGRPOTrainer, Sa2VAGRPOConfig(**kw, stability_summary_steps=0)) if ours
                else (GRPOTrainer, GRPOConfig(**kw)))
    trainer = cls(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=[distinct_words], args=cfg,
                  train_dataset=load_prompt_dataset(data_dir),
                  processing_class=AutoTokenizer.from_pretrained(model_dir))
    trainer.remove_callback(PrinterCallback)  # both sides: no per-step metric dicts on stdout
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    timer.steady()  # the first step pays one-off setup; the last one has no next start: steps - 2 timed ones
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return timer, statistics.mean(lengths)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least sensitive to other load)")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    sys.stdout.reconfigure(line_buffering=True)
    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp()
    model_dir, data_dir = make_tiny_causal(f"{tmp}/m"), make_prompt_data(f"{tmp}/d", n=256)
    res = {True: ([], [], []), False: ([], [], [])}  # wall, cpu, mean completion length per run
    for r in range(args.rounds):
        for ours in (True, False):
            timer, length = run(ours, model_dir, data_dir, f"{tmp}/{ours}{r}", args.steps)
            res[ours][0].extend(timer.wall)
            res[ours][1].extend(timer.cpu)
            res[ours][2].append(length)
    med = {k: (statistics.median(v[0]), statistics.median(v[1]), statistics.mean(v[2])) for k, v in res.items()}
    print(f"== GRPO step, tiny causal LM, CPU ({args.threads} thread(s)), 2 prompts x 4 generations x 16 tokens, "
          f"{len(res[True][0])} steps each, medians")
    for ours, name in ((True, "Sa2VAGRPOTrainer (guards on)"), (False, "trl.GRPOTrainer (stock)")):
        wall, cpu, length = med[ours]
        print(f"  {name:<30s} wall {wall * 1e3:8.1f} ms   cpu {cpu * 1e3:8.1f} ms   mean completion length "
              f"{length:.2f}")
    for i, what in ((0, "wall"), (1, "cpu")):
        ratio = med[True][i] / med[False][i]
        print(f"  ratio ours / stock ({what}): {ratio:.3f}  [{'ok' if ratio <= 1.0 else 'MISSES'}, target <= 1.0]")


if __name__ == "__main__":
    main()

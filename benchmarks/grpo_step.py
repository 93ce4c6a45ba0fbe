"""Median GRPO step time with all guards on vs off, on the tiny causal model, measured in one run.

"Off" is the same trainer with the LogitsGuard disabled, TRL's plain clip_grad_norm_ in place of
GradGuard, and neither spike guard nor collapse monitors; the root-cause fixes (policy generation, fp32
right-padded scoring) are in both. "No spike" is every guard on except the spike guard, which isolates the
spike guard's cost (its statistics ride in the GradGuard's one sync). Rounds alternate between the three so
machine drift hits all alike.

Run: python benchmarks/grpo_step.py [--rounds 6 --steps 8]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from transformers.trainer_callback import PrinterCallback
from trl import GRPOTrainer

from sa2va_rl.data.prompts import load_prompt_dataset, make_prompt_data
from sa2va_rl.models.tiny import make_tiny_causal
from sa2va_rl.rl.config import Sa2VAGRPOConfig
from sa2va_rl.rl.trainer import Sa2VAGRPOTrainer


class Unguarded(Sa2VAGRPOTrainer):
    _clip_grad_norm = GRPOTrainer._clip_grad_norm

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.collapse.observe = self.collapse.observe_completions = lambda *a, **k: None  # monitors off


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self.t0 = [], None

    def on_step_begin(self, *a, **k):
        self.t0 = time.perf_counter()

    def on_step_end(self, *a, **k):
        self.times.append(time.perf_counter() - self.t0)


def distinct_words(completions, **kw):
    return [len(set(c.split())) / 10 for c in completions]


def run(cls, guards: bool, model_dir, data_dir, out, steps, spike: bool = True) -> list[float]:
    torch.manual_seed(0)
    cfg = Sa2VAGRPOConfig(output_dir=out, max_steps=steps, batch_size=2, num_generations=4, max_completion_length=16,
                          warmup_steps=0, save_strategy="no", disable_tqdm=True, logits_guard=guards,
                          drop_repaired_tokens=guards, stability_summary_steps=0, seed=0,
                          spike_guard=guards and spike, spike_warmup=2)
    trainer = cls(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=[distinct_words], args=cfg,
                  train_dataset=load_prompt_dataset(data_dir), processing_class=AutoTokenizer.from_pretrained(model_dir))
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.remove_callback(PrinterCallback)  # disable_tqdm prints every log dict otherwise
    trainer.train()
    return timer.times[1:]  # the first step pays one-off setup


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    tmp = tempfile.mkdtemp()
    model_dir, data_dir = make_tiny_causal(f"{tmp}/m"), make_prompt_data(f"{tmp}/d", n=256)
    on, nospike, off = [], [], []
    for r in range(args.rounds):
        on += run(Sa2VAGRPOTrainer, True, model_dir, data_dir, f"{tmp}/on{r}", args.steps)
        nospike += run(Sa2VAGRPOTrainer, True, model_dir, data_dir, f"{tmp}/ns{r}", args.steps, spike=False)
        off += run(Unguarded, False, model_dir, data_dir, f"{tmp}/off{r}", args.steps)
    m_on, m_ns, m_off = statistics.median(on), statistics.median(nospike), statistics.median(off)
    device = "GPU" if torch.cuda.is_available() else "CPU"
    print(f"== GRPO step, tiny causal LM, {device}, {len(on)} steps each")
    print(f"  guards on (spike guard, collapse monitors)  median {m_on * 1e3:8.1f} ms")
    print(f"  guards on, spike guard off                  median {m_ns * 1e3:8.1f} ms")
    print(f"  guards off                                  median {m_off * 1e3:8.1f} ms")
    ratio = m_on / m_off
    print(f"  ratio on / off: {ratio:.3f}  [{'ok' if ratio <= 1.03 else 'MISSES'}, target <= 1.03]")
    print(f"  ratio on / spike guard off: {m_on / m_ns:.3f}")


if __name__ == "__main__":
    main()

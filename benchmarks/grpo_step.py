"""Median GRPO step time with all guards on vs off, on the tiny causal model, measured in one run.

Each step is timed as vs_trl.py times it (``_timing.StepTimer``: from one step's start to the next one's, the
per-step log included) in process CPU time, the clock a shared CPU machine distorts least; wall time is printed too.

"Off" is the same trainer with the LogitsGuard disabled, TRL's plain clip_grad_norm_ in place of
GradGuard, and neither spike guard nor collapse monitors; the root-cause fixes (policy generation, fp32
right-padded scoring) are in both. "No spike" is every guard on except the spike guard, which isolates the
spike guard's cost (its statistics ride in the GradGuard's one sync). Rounds alternate between the three so
machine drift hits all alike.

Run: python benchmarks/grpo_step.py [--rounds 6 --steps 10 --threads 1]
"""

from __future__ import annotations

import statistics
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOTrainer

from _timing import StepTimer, step_benchmark_args, timed_train

from sa2va_rl.data.prompts import load_prompt_dataset, make_prompt_data
from sa2va_rl.models.tiny import make_tiny_causal
from sa2va_rl.rl.config import Sa2VAGRPOConfig
from sa2va_rl.rl.trainer import Sa2VAGRPOTrainer


class Unguarded(Sa2VAGRPOTrainer):
    _clip_grad_norm = GRPOTrainer._clip_grad_norm

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.collapse.observe = self.collapse.observe_completions = lambda *a, **k: None  # monitors off


def distinct_words(completions, **kw):
    return [len(set(c.split())) / 10 for c in completions]


def run(cls, guards: bool, model_dir, data_dir, out, steps, spike: bool = True) -> list[float]:
    torch.manual_seed(0)
    cfg = Sa2VAGRPOConfig(output_dir=out, max_steps=steps, batch_size=2, num_generations=4, max_completion_length=16,
                          warmup_steps=0, save_strategy="no", disable_tqdm=True, logits_guard=guards,
                          drop_repaired_tokens=guards, stability_summary_steps=0, seed=0,
                          spike_guard=guards and spike, spike_warmup=2)
    trainer = cls(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=[distinct_words], args=cfg,
                  train_dataset=load_prompt_dataset(data_dir),
                  processing_class=AutoTokenizer.from_pretrained(model_dir))
    return timed_train(trainer)  # the first step pays one-off setup; the last one has no next start


def main() -> None:
    args = step_benchmark_args(rounds=6, steps=10)
    tmp = tempfile.mkdtemp()
    model_dir, data_dir = make_tiny_causal(f"{tmp}/m"), make_prompt_data(f"{tmp}/d", n=256)
    variants = {"guards on (spike guard, collapse monitors)": (Sa2VAGRPOTrainer, True, True),
                "guards on, spike guard off": (Sa2VAGRPOTrainer, True, False),
                "guards off": (Unguarded, False, False)}
    wall, cpu = ({k: [] for k in variants} for _ in range(2))
    for r in range(args.rounds):  # the variants take turns, so machine drift hits all alike
        for i, (name, (cls, guards, spike)) in enumerate(variants.items()):
            t = run(cls, guards, model_dir, data_dir, f"{tmp}/{r}-{i}", args.steps, spike=spike)
            wall[name] += t.wall
            cpu[name] += t.cpu
    med = {k: (statistics.median(cpu[k]), statistics.median(wall[k])) for k in variants}
    # on a GPU the step is device time: judge wall time (process CPU time there counts the host's waiting)
    judged = 1 if torch.cuda.is_available() else 0
    clock = ("wall", "CPU") if judged else ("CPU", "wall")
    on, nospike, off = (med[k][judged] for k in variants)
    device = "GPU" if torch.cuda.is_available() else f"CPU ({args.threads} thread(s))"
    print(f"== GRPO step, tiny causal LM, {device}, {len(cpu['guards off'])} steps each; medians, {clock[0]} time "
          f"({clock[1]})")
    for name, times in med.items():
        print(f"  {name:<44s} {times[judged] * 1e3:8.1f} ms  ({times[1 - judged] * 1e3:.1f} ms {clock[1]})")
    ratio = on / off
    other = med[list(variants)[0]][1 - judged] / med["guards off"][1 - judged]
    print(f"  ratio on / off: {ratio:.3f} ({clock[1]} {other:.3f})  [{'ok' if ratio <= 1.03 else 'MISSES'}, target "
          f"<= 1.03]")
    print(f"  ratio on / spike guard off: {on / nospike:.3f}")


if __name__ == "__main__":
    main()

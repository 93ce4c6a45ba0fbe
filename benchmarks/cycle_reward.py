"""Median GRPO step time with the cycle reward (``--cycle_reward 1``) vs without, on the tiny Sa2VA model and
synthetic GAR data (task mask2caption, METEOR + format reward in both), measured in one run.

Each step is timed as grpo_step.py times it (``_timing.StepTimer``: from one step's start to the next one's, the
per-step log included), in process CPU time on a CPU machine (wall time printed too), wall time on a GPU. Rounds
alternate between the two so machine drift hits both alike. The cycle's own share is also timed inside the step
(``_add_cycle_masks``: prompt building, the batched listener forward, SAM2 encode and decode).

The tiny model's SAM2 stand-in is small, its prompts short: the ratio says what the cycle's machinery costs around a
tiny step, not what a 4B step pays (docs/segmentation.md estimates that).

Run: python benchmarks/cycle_reward.py [--rounds 3 --steps 8 --threads 1]
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from _timing import StepTimer, alternating_steps, report_steps, step_benchmark_args, timed_train

from sa2va_rl.data.gar import GARReader
from sa2va_rl.data.synthetic import make_gar_data
from sa2va_rl.models.sa2va import Sa2VAModelArgs, Sa2VAPolicy, load_sa2va, prepare_for_training
from sa2va_rl.models.tiny_sa2va import make_tiny_sa2va
from sa2va_rl.rl.config import Sa2VAGRPOConfig
from sa2va_rl.rl.tasks import GARTaskDataset, task_rewards
from sa2va_rl.rl.trainer import Sa2VAGRPOTrainer


class Timed(Sa2VAGRPOTrainer):
    """Records the process CPU / wall seconds and the SAM2 encodes of each ``_add_cycle_masks`` call."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.cycle_cpu, self.cycle_wall, self.encodes = [], [], []

    def _add_cycle_masks(self, inputs, completions):
        t0, c0 = time.perf_counter(), time.process_time()
        out = super()._add_cycle_masks(inputs, completions)
        self.cycle_wall.append(time.perf_counter() - t0)
        self.cycle_cpu.append(time.process_time() - c0)
        self.encodes.append(self._metrics["train"]["cycle/encodes"][-1])
        return out


def run(cycle_weight: float, model_dir, data_dir, out, steps) -> tuple[StepTimer, Timed]:
    torch.manual_seed(0)
    model, tok = load_sa2va(model_dir)
    prepare_for_training(model, Sa2VAModelArgs(lora_r=8, lora_alpha=16))
    policy = Sa2VAPolicy(model, tok)
    funcs, weights = task_rewards(["mask2caption"], cycle_weight=cycle_weight)
    cfg = Sa2VAGRPOConfig(output_dir=out, max_steps=steps, batch_size=2, num_generations=4, max_completion_length=16,
                          warmup_steps=0, save_strategy="no", disable_tqdm=True, stability_summary_steps=0, seed=0,
                          report_to=[], reward_weights=weights)
    data = GARTaskDataset(GARReader(data_dir), policy, ["mask2caption"])
    trainer = Timed(model=model, reward_funcs=funcs, args=cfg, policy=policy, train_dataset=data.to_dataset(),
                    processing_class=tok)
    return timed_train(trainer), trainer


def main() -> None:
    args = step_benchmark_args(rounds=3, steps=8)
    tmp = tempfile.mkdtemp()
    model_dir, data_dir = make_tiny_sa2va(f"{tmp}/m"), make_gar_data(f"{tmp}/d", n=64)
    variants = {"cycle reward on (--cycle_reward 1)": 1.0, "cycle reward off": 0.0}
    pooled, trainers = alternating_steps(variants, lambda w, tag: run(w, model_dir, data_dir, f"{tmp}/{tag}",
                                                                      args.steps), args.rounds)
    on_name = "cycle reward on (--cycle_reward 1)"
    on, off, judged = report_steps("GRPO step, tiny Sa2VA, mask2caption, batch 2 x G 4", pooled, args.threads)
    inner = statistics.median([x for t in trainers[on_name] for x in (t.cycle_wall if judged else t.cycle_cpu)[1:]])
    encodes = [e for t in trainers[on_name] for e in t.encodes]
    print(f"  _add_cycle_masks alone, in the on steps  {inner * 1e3:8.1f} ms  (SAM2 encodes per step: "
          f"{statistics.mean(encodes):.1f} for 2 images x 4 captions)")
    print(f"  ratio (off + _add_cycle_masks) / off: {(off + inner) / off:.3f}")

if __name__ == "__main__":
    main()

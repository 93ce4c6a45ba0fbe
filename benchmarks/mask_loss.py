"""Median GRPO step time with the mask loss (``--mask_loss_weight 1``) vs without, on the tiny Sa2VA model and
synthetic GAR data (task caption2mask, after a short supervised warm start so that the answers carry a ``[SEG]``),
measured in one run.

Each step is timed as grpo_step.py times it (``_timing.StepTimer``), in process CPU time on a CPU machine (wall time
printed too), wall time on a GPU. Rounds alternate between the two so machine drift hits both alike. What the mask
loss adds: one SAM2 decoder call per chosen rollout (one per group) with gradient, its backward through
``text_hidden_fcs`` and the ``[SEG]`` state, and nothing else (the state comes from the scoring forward the step
already runs; the image features from the step's cache).

The tiny model's SAM2 stand-in is small: the ratio says what the machinery costs around a tiny step, not what a 4B
step pays (there the decoder's share is smaller still: SAM2's mask decoder is ~4M parameters against the LLM's
billions).

Run: python benchmarks/mask_loss.py [--rounds 3 --steps 8 --threads 1]
"""

from __future__ import annotations

import statistics
import tempfile

import torch

from _timing import StepTimer, alternating_steps, report_steps, step_benchmark_args, timed_train

from sa2va_rl.data.gar import GARReader
from sa2va_rl.data.synthetic import make_gar_data
from sa2va_rl.demo import warm_start
from sa2va_rl.models.sa2va import Sa2VAModelArgs, Sa2VAPolicy, load_sa2va, prepare_for_training, save_sa2va
from sa2va_rl.models.tiny_sa2va import make_tiny_sa2va
from sa2va_rl.rl.config import Sa2VAGRPOConfig
from sa2va_rl.rl.tasks import GARTaskDataset, task_list, task_rewards
from sa2va_rl.rl.trainer import Sa2VAGRPOTrainer


def warm(tmp: str, data_dir: str) -> str:
    """The tiny model after 150 supervised steps on caption2mask ("Sure, [SEG]." and a BCE mask loss)."""
    model, tok = load_sa2va(make_tiny_sa2va(f"{tmp}/m"))
    prepare_for_training(model, Sa2VAModelArgs(lora_r=0))
    policy = Sa2VAPolicy(model, tok)
    warm_start(model, tok, policy, GARTaskDataset(GARReader(data_dir), policy, task_list("caption2mask")), 150, 0)
    save_sa2va(model, tok, f"{tmp}/warm")
    return f"{tmp}/warm"


def run(weight: float, model_dir, data_dir, out, steps) -> tuple[StepTimer, Sa2VAGRPOTrainer]:
    torch.manual_seed(0)
    model, tok = load_sa2va(model_dir)
    prepare_for_training(model, Sa2VAModelArgs(lora_r=8, lora_alpha=16), mask_loss=weight > 0)
    policy = Sa2VAPolicy(model, tok)
    funcs, weights = task_rewards(["caption2mask"])
    cfg = Sa2VAGRPOConfig(output_dir=out, max_steps=steps, batch_size=2, num_generations=4, max_completion_length=16,
                          warmup_steps=0, save_strategy="no", disable_tqdm=True, stability_summary_steps=0, seed=0,
                          report_to=[], reward_weights=weights, mask_loss_weight=weight, logging_steps=1)
    data = GARTaskDataset(GARReader(data_dir), policy, ["caption2mask"])
    trainer = Sa2VAGRPOTrainer(model=model, reward_funcs=funcs, args=cfg, policy=policy,
                               train_dataset=data.to_dataset(), processing_class=tok)
    return timed_train(trainer), trainer


def main() -> None:
    args = step_benchmark_args(rounds=3, steps=8)
    tmp = tempfile.mkdtemp()
    data_dir = make_gar_data(f"{tmp}/d", n=64)
    model_dir = warm(tmp, data_dir)
    variants = {"mask loss on (--mask_loss_weight 1)": 1.0, "mask loss off": 0.0}
    pooled, trainers = alternating_steps(variants, lambda w, tag: run(w, model_dir, data_dir, f"{tmp}/{tag}",
                                                                      args.steps), args.rounds)
    report_steps("GRPO step, tiny Sa2VA (warm-started), caption2mask, batch 2 x G 4", pooled, args.threads)
    rows = [h["mask_loss/rollouts"] for t in trainers["mask loss on (--mask_loss_weight 1)"]
            for h in t.state.log_history if "mask_loss/rollouts" in h]
    print(f"  rollouts in the mask loss per step: {statistics.mean(rows) if rows else 0:.2f} (2 groups)")

if __name__ == "__main__":
    main()

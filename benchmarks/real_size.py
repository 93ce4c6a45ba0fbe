"""Where a GRPO step's time and memory go at a release's dimensions: per step, the time of each phase and the peak.

Builds a checkpoint from the pristine upstream code (``../shared/upstream`` or ``SA2VA_UPSTREAM_DIR``; random
weights) or takes one (``--model_path``), makes synthetic GAR data, and runs ``--steps`` GRPO steps per task
through the CLI's own build (``sa2va-rl train``'s ``_build_sa2va_run``), with gradient checkpointing off and on.
Phases are timed by wrapping the callables that do them (nothing in the library changes):

    generation        Policy.generate (includes the vision encoder's share for the prompts' images)
    vision encoder    forward of the vision tower (InternViT / Qwen-VL visual), wherever it runs
    scoring forward   Policy.logprobs (the gradient-carrying forward; a no-grad one too when TRL asks)
    backward          accelerator.backward
    rewards           the trainer's reward computation (METEOR, mask IoU: the [SEG] forward and SAM2 live here)
    [SEG] forward     the Policy's segment_at (teacher-forced [SEG] states -> SAM2 masks)
    SAM2 encode       sam2_model.forward_image;  SAM2 decode: the SAM2 mask decoder's forward
    optimizer         on_pre_optimizer_step -> on_optimizer_step (clip, guard, AdamW)
    checkpoint        Trainer._save_checkpoint (with --save_steps)

caption2mask runs add ``SEG_BIAS`` to the ``[SEG]`` logit (``sequence_bias``): a random-weight model would never
emit it, and the segmentation phases would not run. Phases nest (the vision encoder runs inside generation and scoring; SAM2 inside rewards), so rows do not add up
to the step. Peak memory per step: ``max_memory_allocated`` on a GPU, the process's resident memory on CPU (there,
also the most resident memory seen during each wrapped phase), beside the estimate ``sa2va-rl train`` logs before
loading (sa2va_rl/plan.py) and their ratio.

    python benchmarks/real_size.py --build tiny_v1 --steps 2          # smoke: a tiny pristine InternVL2.5 build
    python benchmarks/real_size.py --build sa2va_1b --steps 1         # Sa2VA-1B's dimensions (CPU: ~10 min a step)
    python benchmarks/real_size.py --build sa2va_8b --bf16 true       # Sa2VA-8B's dimensions on a GPU (InternLM2)
    python benchmarks/real_size.py --model_path DIR --bf16 true ...   # a real checkpoint on a GPU
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict

import torch
from transformers import TrainerCallback

from _upstream import build_release, stand_ins

SEG_BIAS = 6.0  # added to [SEG]'s logit in caption2mask runs
PHASES = ["step", "generation", "vision encoder", "scoring forward", "backward", "rewards", "[SEG] forward",
          "SAM2 encode", "SAM2 decode", "optimizer", "checkpoint"]


class Phases(TrainerCallback):
    """Seconds per phase and peak memory, per step (a step runs from one on_step_begin to the next)."""

    def __init__(self) -> None:
        self.now: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self.peak = 0
        self.active: dict[str, int] = {}  # phases running now (nesting counts)
        self.phase_peak: dict[str, int] = defaultdict(int)  # CPU: the most resident memory seen during each phase
        self.t0 = None
        self.opt_t0 = None
        self._stop = threading.Event()
        if not torch.cuda.is_available():
            threading.Thread(target=self._watch_rss, daemon=True).start()

    def _watch_rss(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * page
            self.peak = max(self.peak, rss)
            for name in list(self.active):
                self.phase_peak[name] = max(self.phase_peak[name], rss)
            time.sleep(0.01)

    def timed(self, name: str, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            t = time.perf_counter()
            self.active[name] = self.active.get(name, 0) + 1
            try:
                return fn(*a, **k)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.now[name] += time.perf_counter() - t
                self.active[name] -= 1
                if not self.active[name]:
                    del self.active[name]
        return wrapper

    def hook(self, module: torch.nn.Module | None, name: str) -> None:
        if module is None:
            return
        starts = []
        module.register_forward_pre_hook(lambda *a: starts.append(time.perf_counter()))
        module.register_forward_hook(lambda *a: self.now.__setitem__(name, self.now[name] + time.perf_counter()
                                                                      - starts.pop()))

    def _close(self) -> None:
        if self.t0 is None:
            return
        row = dict(self.now)
        row["step"] = time.perf_counter() - self.t0
        row["peak_gib"] = (torch.cuda.max_memory_allocated() if torch.cuda.is_available() else self.peak) / 2 ** 30
        row["phase_peak_gib"] = {k: v / 2 ** 30 for k, v in self.phase_peak.items()}
        self.steps.append(row)

    def on_step_begin(self, args, state, control, **kw):
        self._close()
        self.now, self.t0 = defaultdict(float), time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = 0
            self.phase_peak = defaultdict(int)

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.opt_t0 = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kw):
        if self.opt_t0 is not None:
            self.now["optimizer"] += time.perf_counter() - self.opt_t0

    def on_train_end(self, args, state, control, **kw):
        self._close()
        self._stop.set()


def instrument(trainer, policy, model) -> Phases:
    p = Phases()
    trainer.add_callback(p)
    policy.generate = p.timed("generation", policy.generate)
    policy.logprobs = p.timed("scoring forward", policy.logprobs)
    trainer.accelerator.backward = p.timed("backward", trainer.accelerator.backward)
    trainer._calculate_rewards = p.timed("rewards", trainer._calculate_rewards)
    trainer._save_checkpoint = p.timed("checkpoint", trainer._save_checkpoint)
    if hasattr(policy, "segment_at"):
        policy.segment_at = p.timed("[SEG] forward", policy.segment_at)
    vision = getattr(model, "vision_model", None) or getattr(getattr(model, "model", None), "visual", None)
    p.hook(vision, "vision encoder")
    enc = getattr(model, "grounding_encoder", None)
    sam2 = getattr(enc, "sam2_model", None)
    if sam2 is not None:
        sam2.forward_image = p.timed("SAM2 encode", sam2.forward_image)
        p.hook(getattr(sam2, "sam_mask_decoder", None), "SAM2 decode")
    return p


def run(model_path: str, data: str, out: str, task: str, ckpt: bool, extra: list[str]) -> list[dict]:
    from trl import TrlParser

    from sa2va_rl import cli
    from sa2va_rl.models.sa2va import Sa2VAModelArgs
    from sa2va_rl.rl.config import Sa2VAGRPOConfig
    from sa2va_rl.rl.judge import JudgeArgs

    argv = ["--model_path", model_path, "--data_dir", data, "--output_dir", out, "--task", task,
            "--gradient_checkpointing", str(ckpt).lower(), "--report_to", "none", "--disable_tqdm", "true",
            "--warmup_steps", "0", "--caption_meteor_impl", "nltk", "--trust_remote_code", "true", *extra]
    parser = TrlParser((cli.TrainArgs, Sa2VAModelArgs, Sa2VAGRPOConfig, JudgeArgs))
    script, margs, config, jargs = parser.parse_args_and_config(args=argv)
    if task == "caption2mask":  # random weights never say [SEG]: bias it (transformers' sequence_bias) so that the
        # [SEG] forward and SAM2 run as they do for a trained model
        from transformers import AutoTokenizer

        seg = AutoTokenizer.from_pretrained(model_path, trust_remote_code=True).convert_tokens_to_ids("[SEG]")
        config.generation_kwargs = {**(config.generation_kwargs or {}), "sequence_bias": [[[seg], SEG_BIAS]]}
    from sa2va_rl.plan import check_limits

    estimate = check_limits(model_path, config, margs, max_prompt_tokens=script.max_prompt_tokens).plan.total
    built = cli._build_sa2va_run(script, margs, config, jargs)
    if isinstance(built, int):
        raise SystemExit(f"build failed (exit {built})")
    trainer, _save = built
    phases = instrument(trainer, trainer.policy, trainer.accelerator.unwrap_model(trainer.model))
    trainer.train()
    steps = phases.steps
    for s in steps:
        s["estimate_gib"] = estimate / 2 ** 30
    del trainer, built, phases  # the next run starts with the device empty
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--build", choices=["tiny_v1", "sa2va_1b", "sa2va_4b", "sa2va_8b"],
                     help="build from the pristine upstream code: the tests' tiny InternVL2.5, or a release's "
                          "dimensions (tests/upstream/internvl.py RELEASE_DIMS; 4B/8B: bf16 on a GPU)")
    src.add_argument("--model_path", help="an existing Sa2VA checkpoint")
    ap.add_argument("--steps", type=int, default=1, help="GRPO steps per task and setting")
    ap.add_argument("--tasks", default="mask2caption,caption2mask")
    ap.add_argument("--checkpointing", default="off,on", help="gradient checkpointing settings to run")
    ap.add_argument("--threads", type=int, default=2)
    args, extra = ap.parse_known_args()
    torch.set_num_threads(args.threads)
    stand_ins()
    if not torch.cuda.is_available():  # on CPU the plan's runtime term is the RSS when train checks: keep the first
        import sa2va_rl.plan as plan   # run's (a fresh process's), or later runs would count the earlier runs' memory

        first, rss = [], plan.current_rss
        plan.current_rss = lambda: first[0] if first else first.append(rss()) or first[0]
    extra = ["--batch_size", "2", "--num_generations", "2", "--max_completion_length", "16", "--max_tiles", "1",
             "--save_strategy", "steps", "--save_steps", "1", *extra]  # train flags given here come last: they win
    from sa2va_rl.data.synthetic import make_gar_data

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model_path or build_release(os.path.join(tmp, args.build), args.build)
        data = make_gar_data(os.path.join(tmp, "gar"), n=16)
        print(f"model {model}; flags {' '.join(extra)}; {args.threads} threads; "
              f"{'GPU ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU'}", flush=True)
        header = "| task | grad ckpt | # | " + " | ".join(PHASES) + " | peak GiB | estimate GiB | estimate / peak |"
        rows = []
        for task in args.tasks.split(","):
            for ckpt in args.checkpointing.split(","):
                out = os.path.join(tmp, f"out-{task}-{ckpt}")
                steps = run(model, data, out, task, ckpt == "on", [*extra, "--max_steps", str(args.steps)])
                shutil.rmtree(out, ignore_errors=True)  # the checkpoints: Sa2VA-8B's fill a disk in a few runs
                for i, s in enumerate(steps, 1):
                    rows.append(f"| {task} | {ckpt} | {i} | " + " | ".join(f"{s.get(k, 0.0):.2f}" for k in PHASES)
                                + f" | {s['peak_gib']:.2f} | {s['estimate_gib']:.2f} | "
                                f"{s['estimate_gib'] / s['peak_gib']:.2f} |")
                    print(rows[-1], flush=True)
                    if s["phase_peak_gib"]:
                        print("  peak resident GiB during: " + ", ".join(
                            f"{k} {v:.2f}" for k, v in s["phase_peak_gib"].items()), flush=True)
        print("\nseconds per phase (phases nest; see the docstring)\n" + header + "\n|"
              + "---|" * (len(PHASES) + 6) + "\n" + "\n".join(rows))
    print(f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB")


if __name__ == "__main__":
    main()

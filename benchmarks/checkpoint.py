"""A checkpoint's model part, side by side in one run: the whole model (what the Trainer wrote before: the Sa2VA
model's ``save_pretrained``, frozen vision tower, SAM2 and LLM included) against the trained parameters only
(rl/checkpoints.py ``save_trainable``: what the trainer writes now where part of the model is frozen).

Both are written to the same disk and fsynced as a published checkpoint is (rl/checkpoints.py ``fsync_tree``);
the runs alternate and the medians are compared. The optimizer state, RNG and trainer state that every checkpoint
also holds are the same either way and are left out.

    python benchmarks/checkpoint.py --build tiny_v1                  # smoke
    python benchmarks/checkpoint.py --build sa2va_1b --repeats 3     # Sa2VA-1B's dimensions (CPU: a few minutes)
    python benchmarks/checkpoint.py --model_path DIR --trust_remote_code   # a released checkpoint
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch

from _upstream import build_release, stand_ins


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--build", choices=["tiny_v1", "sa2va_1b", "sa2va_4b", "sa2va_8b"])
    src.add_argument("--model_path")
    ap.add_argument("--lora_r", type=int, default=128, help="the trainer's default rank")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = ap.parse_args()
    stand_ins()
    from sa2va_rl.models.sa2va import Sa2VAModelArgs, load_sa2va, prepare_for_training
    from sa2va_rl.rl.checkpoints import fsync_tree, save_trainable

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = args.model_path or build_release(os.path.join(tmp, "model"), args.build)
        model, _tok = load_sa2va(path, torch.bfloat16, trust_remote_code=True)
        model = prepare_for_training(model, Sa2VAModelArgs(lora_r=args.lora_r, lora_alpha=2 * args.lora_r))
        total = sum(p.numel() for p in model.parameters())
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        ways = {"whole model (save_pretrained)": lambda d: model.save_pretrained(d),
                "trained only (save_trainable)": lambda d: save_trainable(model, d)}
        seconds: dict[str, list[float]] = {k: [] for k in ways}
        size: dict[str, int] = {}
        for i in range(args.repeats):
            for name, write in ways.items():
                out = os.path.join(tmp, f"ckpt-{i}")
                t0 = time.perf_counter()
                write(out)
                fsync_tree(out)
                seconds[name].append(time.perf_counter() - t0)
                size[name] = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs)
                shutil.rmtree(out)
        print(f"{path}: {total / 1e9:.3f} B parameters, {trained / 1e6:.1f} M trained (LoRA r={args.lora_r}, fp32), "
              f"frozen in bf16; {args.repeats} alternating writes each, medians")
        base = None
        for name in ways:
            med = statistics.median(seconds[name])
            base = base or (med, size[name])
            print(f"  {name:32s} {size[name] / 1e9:7.3f} GB  {med:7.2f} s   bytes x{size[name] / base[1]:.3f}, "
                  f"time x{med / base[0]:.3f}")


if __name__ == "__main__":
    main()

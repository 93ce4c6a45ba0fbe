"""The memory estimate (sa2va_rl/plan.py, `sa2va-rl plan`) against the measured peak, side by side in one run.

Each case trains `--max_steps 2` (the second step's backward is the first with AdamW's states allocated) through
`sa2va-rl train` in a fresh process, which logs the estimate before the model loads ("estimated memory per device:
...") and reports its own peak at exit: on a GPU ``torch.cuda.max_memory_allocated()``; on CPU, where the "device" is
the host's RAM, its peak resident memory (``getrusage(RUSAGE_SELF).ru_maxrss``: the training process alone) with
glibc's ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors leave the resident set (as ``max_memory_allocated``
counts live tensors on a GPU).
Prints, per case, the estimate by part, the measured peak and their ratio (the target: within 25%).

    python benchmarks/memory_plan.py                  # tiny causal, tiny Sa2VA, a 41M causal LM (G 4 and 32)
    python benchmarks/memory_plan.py --sa2va_1b       # + Sa2VA-1B's dimensions from the pristine upstream code
                                                      #   (../shared/upstream or SA2VA_UPSTREAM_DIR; ~10 min on 2 cores)
    python benchmarks/memory_plan.py --sa2va_1b --sa2va_1b_path DIR   # that checkpoint instead of a new build

METEOR 1.5 runs a JVM beside the trainer (host memory, not the device's): the Sa2VA cases use nltk's METEOR so
the peak is the trainer's own.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GiB = 1024 ** 3
STEP = ["--max_steps", "2", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
        "--logging_steps", "1", "--warmup_steps", "0", "--seed", "0"]


def child(argv: list[str]) -> None:
    """One training run in this process; prints its peak (bytes) as JSON on the last line: the GPU's
    ``max_memory_allocated`` where the run used one, else the process's peak RSS."""
    import torch

    from sa2va_rl import cli

    rc = cli.main(["train", *argv])
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"rc": rc, "peak": peak}))


def measure(argv: list[str], threads: int) -> tuple[float, dict, int]:
    """(the logged estimate in GiB, its parts, the measured peak in bytes)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE",
           # glibc serves large blocks from mmap and returns them on free: the resident memory then follows the live
           # tensors instead of the allocator's high-water mark (without it, a Sa2VA-1B step's RSS ran ~3 GiB above)
           "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536"),
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, __file__, "--child", *argv], env=env, capture_output=True, text=True)
    text = out.stdout + out.stderr
    line = re.search(r"estimated memory per device: ([\d.]+) GiB \((.*)\)", text)
    last = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if line is None or not last or json.loads(last[-1])["rc"] != 0:
        raise SystemExit(f"case failed: {' '.join(argv)}\n{text[-3000:]}")
    parts = {k: float(v) for k, v in (p.rsplit(" ", 1) for p in line.group(2).split(", "))}
    return float(line.group(1)), parts, json.loads(last[-1])["peak"]


def build(root: Path, sa2va_1b: bool | str) -> list[tuple[str, object]]:
    """The cases; ``sa2va_1b``: add Sa2VA-1B's dimensions (a path: that checkpoint, else built here)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sa2va_rl.data.prompts import make_prompt_data
    from sa2va_rl.data.synthetic import make_gar_data
    from sa2va_rl.models.tiny import make_tiny_causal, word_tokenizer
    from sa2va_rl.models.tiny_sa2va import make_tiny_sa2va

    prompts, gar = make_prompt_data(str(root / "prompts")), make_gar_data(str(root / "gar"), n=16)
    tiny, tiny_sa2va = make_tiny_causal(str(root / "tiny")), make_tiny_sa2va(str(root / "tiny_sa2va"))
    mid = root / "causal_41m"  # the tiny tokenizer's words, a 41M-parameter Qwen2 (vocab 16,000 rows)
    from sa2va_rl.data.vocab import WORDS

    tok = word_tokenizer(WORDS)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=16000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id or 0, eos_token_id=tok.eos_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(mid)
    tok.save_pretrained(mid)
    causal = ["--data_dir", prompts, "--batch_size", "2", "--learning_rate", "1e-5"]
    sa2va = ["--data_dir", gar, "--caption_meteor_impl", "nltk", "--batch_size", "2", "--task", "both"]
    cases = [
        ("tiny causal (G 4, 16 new tokens)", ["--model_path", tiny, *causal, "--num_generations", "4",
                                              "--max_completion_length", "16"]),
        ("tiny Sa2VA (G 4, 16 new tokens)", ["--model_path", tiny_sa2va, *sa2va, "--num_generations", "4",
                                             "--max_completion_length", "16"]),
        ("41M causal (G 4, 64 new tokens)", ["--model_path", str(mid), *causal, "--num_generations", "4",
                                             "--max_completion_length", "64"]),
        ("41M causal (G 32, 256 new tokens)", ["--model_path", str(mid), *causal, "--num_generations", "32",
                                               "--max_completion_length", "256", "--gradient_checkpointing",
                                               "false"]),
        ("41M causal (G 32, 256 new, grad ckpt)", ["--model_path", str(mid), *causal, "--num_generations", "32",
                                                   "--max_completion_length", "256", "--gradient_checkpointing",
                                                   "true"]),
    ]
    if sa2va_1b:  # built when its turn comes (minutes), after the quick cases have printed
        def sa2va_1b_case() -> list[str]:
            from _upstream import build_release, stand_ins

            stand_ins()
            path = sa2va_1b if isinstance(sa2va_1b, str) else build_release(str(root / "sa2va_1b"), "sa2va_1b")
            return ["--model_path", path, *sa2va, "--num_generations", "2", "--max_completion_length", "16",
                    "--max_tiles", "1", "--trust_remote_code", "true"]

        cases.append(("Sa2VA-1B dims (LoRA 128, G 2, 16 new tokens, 1 tile)", sa2va_1b_case))
    return cases


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sa2va_1b", action="store_true", help="add Sa2VA-1B's dimensions (slow: minutes)")
    ap.add_argument("--sa2va_1b_path", default=None, help="with --sa2va_1b: use this Sa2VA-1B-dims checkpoint "
                    "(benchmarks/_upstream.py build_release) instead of building one")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="run the cases whose name contains this text")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cases = [c for c in build(Path(tmp), args.sa2va_1b and (args.sa2va_1b_path or True))
                 if args.only is None or args.only in c[0]]
        rows = []
        for name, argv in cases:
            argv = argv() if callable(argv) else argv
            est, parts, peak = measure([*argv, "--output_dir", os.path.join(tmp, "out"), *STEP], args.threads)
            rows.append((name, parts, est, peak / GiB))
            print(f"{name}: estimate {est:.2f} GiB ({', '.join(f'{k} {v:.2f}' for k, v in parts.items())}); "
                  f"measured peak {peak / GiB:.2f} GiB; estimate/measured {est / (peak / GiB):.2f}", flush=True)
    import torch

    what = "max_memory_allocated" if torch.cuda.is_available() else "peak RSS"
    print(f"\n| case | estimate (GiB) | measured {what} (GiB) | estimate / measured |\n|---|---|---|---|")
    for name, _, est, peak in rows:
        print(f"| {name} | {est:.2f} | {peak:.2f} | {est / peak:.2f} |")


if __name__ == "__main__":
    main()

"""Two CPU processes (gloo): a non-finite gradient on one rank only makes both ranks skip the same step, and the
weights stay identical across ranks.

Launched with torch.distributed.run, the launcher `accelerate launch` itself uses for multi-GPU; `accelerate launch`
runs multi-CPU jobs only through MPI. Inside, accelerate's Accelerator sets up the gloo process group."""

import json
import socket
import subprocess
import sys

import pytest
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch without gloo")
def test_two_ranks_skip_the_same_step_and_agree(tiny_causal, prompt_dir, tmp_path):
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "sa2va_rl.cli", "train", "--model_path", tiny_causal, "--data_dir", prompt_dir, "--output_dir",
           str(out), "--max_steps", "4", "--batch_size", "2", "--num_generations", "4", "--max_completion_length",
           "6", "--warmup_steps", "0", "--learning_rate", "1e-2", "--report_to", "none", "--disable_tqdm", "true",
           "--save_strategy", "no", "--use_cpu", "true", "--seed", "0", "--inject", "nan_grads@2:1"]  # rank 1 only
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with open(out / "stability.json") as f:
        report = json.load(f)
    assert report["ranks_agree"] is True  # per-tensor weight sums gathered from both ranks: identical
    assert report["steps"] == 4 and report["skipped_steps"] == 1 and report["first_nonfinite"]["step"] == 2
    # rank 0 writes the report, yet it names the parameter that rank 1 saw, and the rank
    assert report["first_nonfinite"]["params"] == ["model.embed_tokens.weight"]
    assert report["first_nonfinite"]["ranks"] == {"1": ["model.embed_tokens.weight"]}
    assert "on rank 1" in proc.stderr and proc.stderr.count("GradGuard: non-finite gradients (nan) at check 2") == 2

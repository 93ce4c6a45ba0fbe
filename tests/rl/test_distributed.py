"""Two CPU processes (gloo): a non-finite gradient on one rank only makes both ranks skip the same step, and the
weights stay identical across ranks.

Launched with torch.distributed.run, the launcher `accelerate launch` itself uses for multi-GPU; `accelerate launch`
runs multi-CPU jobs only through MPI. Inside, accelerate's Accelerator sets up the gloo process group."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch.distributed as dist

from tests.spawn import free_port


gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch without gloo")


def launch(model, data, out, *extra, script=None, env=None):
    """`sa2va-rl train` in 2 CPU processes (DDP on gloo through accelerate, or what ``script`` launches); returns
    (process, stability.json)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           *(["-m", "sa2va_rl.cli"] if script is None else [script]), "train", "--model_path", model, "--data_dir", data, "--output_dir", str(out),
           "--batch_size", "2", "--num_generations", "4", "--max_completion_length", "6", "--warmup_steps", "0",
           "--learning_rate", "1e-2", "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true",
           "--seed", "0", *extra]
    return run_launch(cmd, out, timeout=300, env=env)


def run_launch(cmd, out, timeout, env=None):
    """Run a launch command; (process, out/stability.json or None when the run wrote none)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    report = None
    if (out / "stability.json").exists():
        with open(out / "stability.json") as f:
            report = json.load(f)
    return proc, report


@gloo
def test_two_ranks_roll_back_then_resume_and_agree(tiny_causal, prompt_dir, tmp_path):
    """DDP: NaN gradients on rank 1 only at steps 3 and 4 (2 in a row = max_consecutive_skips): both ranks roll back
    to checkpoint-2 together and finish; then a resume from the latest checkpoint runs on; ranks agree throughout."""
    out = tmp_path / "o"
    proc, report = launch(tiny_causal, prompt_dir, out, "--max_steps", "5", "--save_strategy", "steps",
                          "--save_steps", "2", "--max_consecutive_skips", "2", "--on_persistent_nonfinite", "rollback",
                          "--inject", "nan_grads@3:1", "--inject", "nan_grads@4:1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert report["rollbacks"] == 1 and report["skipped_steps"] == 2 and report["ranks_agree"] is True
    rollback = [e for e in report["events"] if e["kind"] == "rollback"]
    assert rollback and rollback[0]["checkpoint"] == "checkpoint-2"
    # rollback past the data: the rows both ranks consumed in steps 3-4 (2 steps x 2 ranks x 2 prompts), gathered
    assert len(rollback[0]["skipped_rows"]) == 8 and report["skipped_data"]["rows"] == rollback[0]["skipped_rows"]
    assert report["first_nonfinite"]["ranks"] == {"1": [report["first_nonfinite"]["params"][0]]}
    assert proc.stderr.count("rolled back to") == 2  # both ranks

    proc, report = launch(tiny_causal, prompt_dir, out, "--max_steps", "7", "--save_strategy", "steps",
                          "--save_steps", "2", "--resume_from_checkpoint", "latest", "--allow_changed_run", "true")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert report["ranks_agree"] is True and report["final_weights_finite"] is True
    assert report["rollbacks"] == 1 and report["skipped_steps"] == 2  # the resumed run carries the counters on
    with open(out / "checkpoint-7" / "trainer_state.json") as f:
        assert json.load(f)["global_step"] == 7


@gloo
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


@gloo
@pytest.mark.parametrize("version", [1, 2])
def test_fsdp_through_accelerate_skip_rollback_resume(tiny_causal, prompt_dir, tmp_path, version):
    """FSDP2 (accelerate's fully_shard, DTensor weights, gradients and optimizer state) and FSDP1 (accelerate's
    FullyShardedDataParallel, one flat parameter per rank), sharded checkpoints, driven through the trainer on 2 CPU
    processes by a stand-in launcher that lets accelerate build FSDP on CPU (see tests/rl/fsdp_cpu_launch.py; FSDP1
    also needs ACCELERATE_TORCH_DEVICE=cpu, or FSDP1 refuses accelerate's device ``cpu:0`` against its compute device
    ``cpu``). NaN on rank 1 only at steps 5 and 6: both ranks skip and name the rank-1 parameter,
    then roll back to checkpoint-3 (step 4 updated the weights since: each rank's shards go back to those saved at
    step 3) and finish; a resume from the latest checkpoint runs on; ranks agree at the end of both runs."""
    env = {**os.environ, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": str(version), "FSDP_AUTO_WRAP_POLICY": "NO_WRAP",
           "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT", "FSDP_RESHARD_AFTER_FORWARD": "true",
           **({"ACCELERATE_TORCH_DEVICE": "cpu"} if version == 1 else {})}
    launcher = os.path.join(os.path.dirname(__file__), "fsdp_cpu_launch.py")
    out = tmp_path / "o"
    common = ["--save_strategy", "steps", "--save_steps", "3"]
    proc, report = launch(tiny_causal, prompt_dir, out, "--max_steps", "7", *common, "--max_consecutive_skips", "2",
                          "--on_persistent_nonfinite", "rollback", "--inject", "nan_grads@5:1",
                          "--inject", "nan_grads@6:1", script=launcher, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    engines = set(re.findall(r"ENGINE (\S+) dtensor_grads=(\d+)/(\d+) rank=", proc.stdout))
    # FSDP2: every gradient a DTensor; FSDP1: plain (flat) gradients
    assert engines and all(e == "DistributedType.FSDP" and m != "0" and n == (m if version == 2 else "0")
                           for e, n, m in engines), engines
    assert report["skipped_steps"] == 2 and report["rollbacks"] == 1 and report["ranks_agree"] is True
    name = report["first_nonfinite"]["params"][0]
    assert report["first_nonfinite"]["ranks"] == {"1": [name]} and report["final_weights_finite"] is True
    assert [e["checkpoint"] for e in report["events"] if e["kind"] == "rollback"] == ["checkpoint-3"]

    def shards(tag, step):
        return {r: d for d, r in re.findall(rf"{tag} {step} ([\w-]+) rank=(\d)", proc.stdout)}
    saved, before, restored = shards("SAVED", 3), shards("BEFORE", 6), shards("RESTORED", 3)
    assert len(saved) == 2 and saved["0"] != saved["1"], saved  # shards: each rank holds a different part
    # weights and optimizer state: back to what each rank saved at step 3, and step 4 had moved that state (the
    # optimizer's at least: the weights move only when step 4's group rewards differ, which sampling decides)
    assert restored == saved, (saved, restored, before)
    assert all(before[r] != saved[r] for r in saved), (saved, before)
    assert (out / "checkpoint-3" / "optimizer_0").is_dir()  # the optimizer state was saved sharded

    proc, report = launch(tiny_causal, prompt_dir, out, "--max_steps", "8", *common, "--resume_from_checkpoint",
                          "latest", "--allow_changed_run", "true", script=launcher, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert report["ranks_agree"] is True and report["rollbacks"] == 1 and report["final_weights_finite"] is True
    with open(out / "checkpoint-8" / "trainer_state.json") as f:
        assert json.load(f)["global_step"] == 8


@gloo
def test_sa2va_under_ddp_syncs_gradients_and_resumes_from_its_trained_only_checkpoint(tiny_sa2va, gar_dir, tmp_path):
    """Sa2VA in 2 DDP processes: its Policy's scoring forward runs inside DDP's forward (``as_wrapper_forward``),
    so the gradients are all-reduced and the ranks' weights agree although each rank saw other rows. Its
    checkpoints hold only the trained parameters; a resume from checkpoint-1 ends on the weights of the run that
    went through."""
    import shutil

    from safetensors.torch import load_file

    from sa2va_rl.rl.checkpoints import TRAINABLE_FILE

    flags = ["--task", "both", "--lora_r", "4", "--lora_alpha", "8", "--max_steps", "2", "--save_strategy", "steps",
             "--save_steps", "1"]
    full, part = tmp_path / "full", tmp_path / "part"
    proc, report = launch(tiny_sa2va, gar_dir, full, *flags)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert report["ranks_agree"] is True and report["final_weights_finite"] is True
    assert report["skipped_steps"] == 0 and report["grad_guard"]["norm_min"] > 0 and report["steps"] == 2
    assert TRAINABLE_FILE in os.listdir(full / "checkpoint-1")

    shutil.copytree(full / "checkpoint-1", part / "checkpoint-1")
    proc, report = launch(tiny_sa2va, gar_dir, part, *flags, "--resume_from_checkpoint", "latest")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert report["ranks_agree"] is True
    a, b = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@gloo
def test_sa2va_under_fsdp_is_refused_at_start_by_name(tiny_sa2va, gar_dir, tmp_path):
    """FSDP shards the parameters that a Sa2VA Policy's piecewise forward (vision tower, LLM, SAM2) would read
    outside FSDP's gathering forward (before: "got mixed torch.Tensor and DTensor" at the first generation)."""
    env = {**os.environ, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "NO_WRAP"}
    launcher = os.path.join(os.path.dirname(__file__), "fsdp_cpu_launch.py")
    proc, report = launch(tiny_sa2va, gar_dir, tmp_path / "o", "--task", "both", "--lora_r", "4", "--lora_alpha",
                          "8", "--max_steps", "1", script=launcher, env=env)
    assert proc.returncode != 0 and report is None, (proc.stdout + proc.stderr)[-4000:]
    assert "(exitcode: 2)" in proc.stderr  # each rank exits with the usage code; the launcher reports it
    assert "Sa2VAPolicy under FSDP is not supported yet" in proc.stderr and "configs/ddp.yaml" in proc.stderr

"""Crash-safe resume: SIGKILL a training process mid-run, resume with --resume_from_checkpoint latest."""

import json
import os
import signal
import subprocess
import sys
import time

from transformers.trainer_utils import get_last_checkpoint

from sa2va_rl import cli

STEPS = 24


def args(model, data, out):
    return ["train", "--model_path", model, "--data_dir", data, "--output_dir", str(out), "--max_steps", str(STEPS),
            "--save_strategy", "steps", "--save_steps", "3", "--batch_size", "2", "--num_generations", "4",
            "--max_completion_length", "6", "--warmup_steps", "0", "--learning_rate", "1e-2", "--report_to", "none",
            "--disable_tqdm", "true", "--seed", "0"]


def counters(out):
    with open(os.path.join(out, "stability.json")) as f:
        r = json.load(f)
    return {k: r[k] for k in ("steps", "skipped_steps", "nonfinite_grad_steps", "first_nonfinite")}, r


def test_sigkill_mid_run_then_resume_latest(tiny_causal, prompt_dir, tmp_path):
    out = tmp_path / "killed"
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "sa2va_rl.cli", *args(tiny_causal, prompt_dir, out),
                             "--inject", "nan_grads@2"], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while not (out / "checkpoint-9").exists():
        assert proc.poll() is None, open(tmp_path / "killed.log").read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    last = get_last_checkpoint(str(out))
    step = int(last.rsplit("-", 1)[1])
    assert 9 <= step < STEPS  # killed mid-run
    for name in os.listdir(out):  # every checkpoint in place is complete: staged, then renamed
        if name.startswith("checkpoint-"):
            assert {"trainer_state.json", "stability_state.json", "optimizer.pt"} <= set(os.listdir(out / name))

    # resume WITHOUT --inject: the skipped step 2 can only come from the restored stability state
    assert cli.main([*args(tiny_causal, prompt_dir, out), "--resume_from_checkpoint", "latest"]) == 0
    resumed, report = counters(out)
    assert report["final_weights_finite"] is True and not (out / ".staging").exists()
    with open(out / f"checkpoint-{STEPS}" / "trainer_state.json") as f:
        assert json.load(f)["global_step"] == STEPS

    ref = tmp_path / "ref"  # the same run, uninterrupted
    assert cli.main([*args(tiny_causal, prompt_dir, ref), "--inject", "nan_grads@2"]) == 0
    expected, _ = counters(ref)
    assert resumed == expected and expected["skipped_steps"] == 1 and expected["steps"] == STEPS


def test_half_written_checkpoint_is_never_resumed(tiny_causal, prompt_dir, tmp_path):
    out = tmp_path / "o"
    base = [a if a != str(STEPS) else "3" for a in args(tiny_causal, prompt_dir, out)]
    assert cli.main(base) == 0
    staged = out / ".staging" / "checkpoint-6"  # what a crash during the next save leaves
    staged.mkdir(parents=True)
    (staged / "model.safetensors").write_bytes(b"\0" * 10)
    assert get_last_checkpoint(str(out)).endswith("checkpoint-3")
    resume = [a if a != "3" or i != base.index("--max_steps") + 1 else "6" for i, a in enumerate(base)]
    assert cli.main([*resume, "--resume_from_checkpoint", "latest", "--allow_changed_run", "true"]) == 0
    assert not (out / ".staging").exists() and (out / "checkpoint-6" / "trainer_state.json").exists()

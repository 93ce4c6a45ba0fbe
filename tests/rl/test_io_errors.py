"""A full, failing or read-only disk: exit 6 with the first error first (errno, path), the last complete checkpoint
intact, and --resume_from_checkpoint latest ends where an uninterrupted run ends (part of issue H). The failure is
injected where a real one strikes: the checkpoint's optimizer-state write, after its weights were written."""

import json
import os

import pytest
from safetensors.torch import load_file

from sa2va_rl import cli

BASE = ["--max_steps", "4", "--batch_size", "2", "--num_generations", "4", "--max_completion_length", "6",
        "--report_to", "none", "--disable_tqdm", "true", "--seed", "0", "--save_strategy", "steps", "--save_steps", "2"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_causal, prompt_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "o")
    assert cli.main(["train", "--model_path", tiny_causal, "--data_dir", prompt_dir, "--output_dir", out, *BASE]) == 0
    return load_file(os.path.join(out, "model.safetensors"))


@pytest.mark.parametrize("errno_name,strerror", [("ENOSPC", "No space left on device"), ("EIO", "Input/output error"),
                                                 ("EACCES", "Permission denied")])
def test_io_error_exits_6_keeps_the_last_checkpoint_and_resumes(errno_name, strerror, uninterrupted, tiny_causal,
                                                                prompt_dir, tmp_path, capsys):
    out = str(tmp_path / "o")
    common = ["train", "--model_path", tiny_causal, "--data_dir", prompt_dir, "--output_dir", out, *BASE]
    assert cli.main([*common, "--inject", f"io_error@4:{errno_name}"]) == cli.EXIT_IO
    err = capsys.readouterr().err
    first = next(line for line in err.splitlines() if "I/O error" in line or "training stopped by" in line)
    assert f"I/O error: {strerror} ({errno_name}) at {os.path.join(out, '.staging', 'checkpoint-4', 'optimizer.pt')}" \
        in first, err
    assert f"the last complete checkpoint, {os.path.join(out, 'checkpoint-2')}, is intact" in first
    assert "Traceback" not in err
    files = os.listdir(out)
    assert "checkpoint-2" in files and "checkpoint-4" not in files and "model.safetensors" not in files
    with open(os.path.join(out, "checkpoint-2", "trainer_state.json")) as f:
        assert json.load(f)["global_step"] == 2

    assert cli.main([*common, "--resume_from_checkpoint", "latest"]) == 0
    assert ".staging" not in os.listdir(out)  # the half-written checkpoint was removed, never used
    with open(os.path.join(out, "stability.json")) as f:
        assert json.load(f)["steps"] == 4
    resumed = load_file(os.path.join(out, "model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    for name, t in uninterrupted.items():  # the same run: bit-identical to one never interrupted
        assert resumed[name].equal(t), name


def test_fp16_summary_says_the_grad_guard_is_off(tiny_causal, prompt_dir, tmp_path, capsys):
    out = str(tmp_path / "o")
    rc = cli.main(["train", "--model_path", tiny_causal, "--data_dir", prompt_dir, "--output_dir", out, *BASE[:-4],
                   "--save_strategy", "no", "--max_steps", "2", "--fp16", "true", "--use_cpu", "true"])
    assert rc == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("stability @ step 2"))
    assert line.startswith("stability @ step 2: 2 steps, grad guard off (fp16: torch's GradScaler"), line
    with open(os.path.join(out, "stability.json")) as f:
        report = json.load(f)
    assert report["steps"] == 2 and report["grad_guard_off"].startswith("fp16")


def test_unwritable_output_dir_is_exit_6_before_training(tiny_causal, prompt_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rc = cli.main(["train", "--model_path", tiny_causal, "--data_dir", prompt_dir, "--output_dir",
                   str(blocker / "o"), *BASE])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_IO and "I/O error: Not a directory (ENOTDIR)" in err and "Traceback" not in err, err

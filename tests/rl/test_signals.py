"""SIGTERM / SIGINT: the step finishes, a checkpoint is saved, the run stops with 128 + signal and no traceback,
and --resume_from_checkpoint latest finishes the same run (part of issue H)."""

import json
import os

import pytest

from sa2va_rl import cli

BASE = ["--max_steps", "4", "--batch_size", "2", "--num_generations", "4", "--max_completion_length", "6",
        "--report_to", "none", "--disable_tqdm", "true", "--seed", "0", "--save_strategy", "no"]


@pytest.mark.parametrize("sig,code", [("TERM", 143), ("INT", 130)])
def test_signal_saves_a_checkpoint_stops_cleanly_and_resumes(sig, code, tiny_causal, prompt_dir, tmp_path, capsys):
    out = str(tmp_path / "o")
    common = ["train", "--model_path", tiny_causal, "--data_dir", prompt_dir, "--output_dir", out, *BASE]
    assert cli.main([*common, "--inject", f"signal@2:{sig}"]) == code
    err = capsys.readouterr().err
    assert f"stopped by SIG{sig} after step 2: checkpoint-2 saved" in err and "Traceback" not in err
    files = os.listdir(out)
    assert "checkpoint-2" in files and "model.safetensors" not in files  # no final model: the run is not done
    with open(os.path.join(out, "checkpoint-2", "trainer_state.json")) as f:
        assert json.load(f)["global_step"] == 2
    assert cli.main([*common, "--resume_from_checkpoint", "latest"]) == 0
    with open(os.path.join(out, "stability.json")) as f:
        report = json.load(f)
    assert report["steps"] == 4 and report["final_weights_finite"] is True

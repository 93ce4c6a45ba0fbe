"""Fault-injection drills: one row per fault kind, through the CLI, on the tiny models.

Each row asserts the exit code, the exact stability.json counters, finite weights, and where the fault is
named (module for logits/weights faults that reproduce, parameters for gradient faults)."""

import json
import os

import pytest
import torch

from sa2va_rl import cli
from sa2va_rl.rl.faults import KINDS, SPIKE_KINDS, Fault

BASE = ["--max_steps", "4", "--batch_size", "2", "--num_generations", "4", "--max_completion_length", "6",
        "--warmup_steps", "0", "--learning_rate", "1e-2", "--report_to", "none", "--disable_tqdm", "true",
        "--seed", "0", "--save_strategy", "no"]
ZERO = dict(skipped_steps=0, nonfinite_grad_steps=0, repaired_rows=0, empty_completions=0, reward_errors=0,
            nonfinite_rewards=0, rollbacks=0)


def run(model, data, out, *extra):
    rc = cli.main(["train", "--model_path", model, "--data_dir", data, "--output_dir", str(out), *BASE, *extra])
    path = os.path.join(out, "stability.json")
    report = json.load(open(path)) if os.path.exists(path) else None
    return rc, report


ROWS = {
    # kind-specific flags, exit code, counters that differ from ZERO
    "nan_logits": (["--inject", "nan_logits@2"], 0, dict(repaired_rows=1, dropped_tokens=1)),
    "posinf_logits": (["--inject", "posinf_logits@2", "--temperature", "0.7"], 0, dict(repaired_rows=1,
                                                                                     dropped_tokens=1)),
    "huge_logits": (["--inject", "huge_logits@2"], 0, dict(repaired_rows=1, dropped_tokens=1)),
    "empty_completion": (["--inject", "empty_completion@2"], 0, dict(empty_completions=1, dropped_tokens=1)),
    "nan_grads": (["--inject", "nan_grads@2"], 0, dict(skipped_steps=1, nonfinite_grad_steps=1)),
    "inf_grads": (["--inject", "inf_grads@2"], 0, dict(skipped_steps=1, nonfinite_grad_steps=1)),
    "nan_weights": (["--inject", "nan_weights@2"], cli.EXIT_NONFINITE,
                    dict(skipped_steps=3, nonfinite_grad_steps=3, repaired_rows=3 * 8)),  # every row of 3 steps
    "reward_raises": (["--inject", "reward_raises@2"], cli.EXIT_REWARD, None),
    "reward_nan": (["--inject", "reward_nan@2"], 0, dict(nonfinite_rewards=1)),
    "reward_none": (["--inject", "reward_none@2"], 0, {}),
    "force_token": (["--inject", "force_token@2:red"], 0, {}),  # finite: nothing to repair (the mask path's drill)
    "signal": (["--inject", "signal@2"], 143, None),  # stopped cleanly after step 2: tests/rl/test_signals.py
    "io_error": (["--inject", "io_error@2", "--save_strategy", "steps", "--save_steps", "2"], cli.EXIT_IO,
                 None),  # the checkpoint-2 write fails: tests/rl/test_io_errors.py
}


def test_every_kind_has_a_row():
    assert set(ROWS) | set(SPIKE_KINDS) == set(KINDS)  # the spike/collapse drills: tests/rl/test_spikes.py


@pytest.mark.parametrize("kind", list(ROWS))
def test_fault_drill(kind, tiny_causal, prompt_dir, tmp_path):
    flags, want_rc, changed = ROWS[kind]
    rc, report = run(tiny_causal, prompt_dir, tmp_path, *flags)
    assert rc == want_rc
    if changed is None:  # stopped before the end: no report is promised
        return
    want = {**ZERO, **changed}
    assert {k: report[k] for k in want} == want
    if kind == "nan_weights":  # persistent: halted, the poisoned module named, no checkpoint written
        assert report["final_weights_finite"] is False
        assert report["first_nonfinite_logits"]["module"] == "model.layers.0.self_attn.v_proj"
        assert report["first_nonfinite_logits"]["step"] == 2
        return
    assert report["steps"] == 4 and report["final_weights_finite"] is True
    if kind.endswith("_logits"):  # transient: repaired, and the re-run says it does not reproduce
        assert report["first_nonfinite_logits"] == {"step": 2, "kind": "logits", "rows": 1, "module": None,
                                                    "reproducible": False}
    if kind.endswith("_grads"):
        assert report["first_nonfinite"]["step"] == 2 and report["first_nonfinite"]["kind"] == kind[:3]
        assert report["first_nonfinite"]["params"] == ["model.embed_tokens.weight"]


def test_reward_raises_skip_counts_the_sample(tiny_causal, prompt_dir, tmp_path):
    rc, report = run(tiny_causal, prompt_dir, tmp_path, "--inject", "reward_raises@2", "--reward_errors", "skip")
    assert rc == 0 and report["reward_errors"] == 1 and report["final_weights_finite"] is True


def test_persistent_grads_halt_and_rollback(tiny_causal, prompt_dir, tmp_path):
    three = ["--inject", "nan_grads@2", "--inject", "nan_grads@3", "--inject", "nan_grads@4"]  # repeatable flag
    rc, report = run(tiny_causal, prompt_dir, tmp_path / "halt", *three)
    assert rc == cli.EXIT_NONFINITE and report["skipped_steps"] == 3
    rc, report = run(tiny_causal, prompt_dir, tmp_path / "rb", "--inject", "nan_weights@3", "--on_persistent_nonfinite",
                     "rollback", "--save_strategy", "steps", "--save_steps", "2", "--max_steps", "6",
                     "--rollback_lr_factor", "0.5")
    assert rc == 0 and report["rollbacks"] == 1 and report["final_weights_finite"] is True and report["steps"] == 6
    assert report["events"][-1]["kind"] == "rollback" and report["events"][-1]["checkpoint"] == "checkpoint-2"
    assert not os.path.exists(tmp_path / "rb" / ".staging")


def test_rollback_without_checkpoint_or_budget_halts(tiny_causal, prompt_dir, tmp_path):
    rc, report = run(tiny_causal, prompt_dir, tmp_path, "--inject", "nan_weights@2", "--on_persistent_nonfinite",
                     "rollback")
    assert rc == cli.EXIT_NONFINITE and report["rollbacks"] == 0


def test_sa2va_seams(tiny_sa2va, gar_dir, tmp_path):
    rc, report = run(tiny_sa2va, gar_dir, tmp_path / "a", "--inject", "nan_logits@2", "--inject", "nan_grads@3",
                     "--lora_r", "4", "--lora_alpha", "8")
    assert rc == 0 and report["repaired_rows"] == 1 and report["skipped_steps"] == 1
    assert "lora_A" in report["first_nonfinite"]["params"][0]
    rc, report = run(tiny_sa2va, gar_dir, tmp_path / "b", "--inject", "nan_weights@2", "--lora_r", "4",
                     "--lora_alpha", "8")
    assert rc == cli.EXIT_NONFINITE
    module = report["first_nonfinite_logits"]["module"]
    assert module.startswith("language_model.") and "layers.0.self_attn.v_proj" in module


def test_sa2va_rollback_restores_the_trained_parameters_from_its_checkpoint(tiny_sa2va, gar_dir, tmp_path,
                                                                           monkeypatch):
    """A Sa2VA checkpoint holds only what trains (rl/checkpoints.py save_trainable): rolling back to it puts every
    one of those tensors back as checkpoint-2 holds it (the poisoned LoRA weights among them)."""
    from safetensors.torch import load_file

    from sa2va_rl.rl import checkpoints
    from sa2va_rl.rl.checkpoints import TRAINABLE_FILE

    restored = []
    load = checkpoints.load_trainable

    def spy(model, checkpoint, base_fingerprint=None):
        load(model, checkpoint, base_fingerprint)
        restored.append((checkpoint, {k: v.detach().clone() for k, v in model.state_dict().items()}))

    monkeypatch.setattr(checkpoints, "load_trainable", spy)
    rc, report = run(tiny_sa2va, gar_dir, tmp_path, "--inject", "nan_weights@4", "--on_persistent_nonfinite",
                     "rollback", "--save_strategy", "steps", "--save_steps", "2", "--max_steps", "5", "--lora_r", "4",
                     "--lora_alpha", "8")
    assert rc == 0 and report["rollbacks"] == 1 and report["final_weights_finite"] is True and report["steps"] == 5
    assert report["events"][-1]["kind"] == "rollback" and report["events"][-1]["checkpoint"] == "checkpoint-2"
    (where, state), = restored
    saved = load_file(os.path.join(where, TRAINABLE_FILE))
    assert os.path.basename(where) == "checkpoint-2" and saved
    assert all(torch.equal(state[k], v) for k, v in saved.items())


def test_bad_spec_is_a_usage_error(tiny_causal, prompt_dir, tmp_path, capsys):
    assert run(tiny_causal, prompt_dir, tmp_path, "--inject", "nan_logit@2")[0] == cli.EXIT_USAGE
    assert "expected KIND[@STEP][:ARG]" in capsys.readouterr().err
    assert Fault.parse("nan_grads@3:1") == Fault("nan_grads", 3, "1")

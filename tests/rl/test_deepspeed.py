"""DeepSpeed ZeRO-1/2/3 under the GradGuard, through the whole trainer: accelerate's DeepSpeed preparation, DeepSpeed's
own ZeRO engine and optimizers and transformers' DeepSpeed checkpoints, on CPU (DS_ACCELERATOR=cpu) in 1 and 2 gloo
processes.

What runs through a stand-in: only accelerate's choice of backend (tests/rl/deepspeed_cpu_launch.py: without a device,
accelerate would call each rank a single-process run). Every run replaces the tiny model's all-zero reward by 0, 1,
0, 1... (SA2VA_DRILL_VARIED_REWARD) so that every step has non-zero gradients and a healthy step moves the state.

Skipped when DeepSpeed is not installed (`pip install -e .[dev]` installs it)."""

import json
import os
import re
import sys

import pytest

pytest.importorskip("deepspeed")

from tests.rl.test_distributed import free_port, gloo, run_launch  # noqa: E402

LAUNCHER = os.path.join(os.path.dirname(__file__), "deepspeed_cpu_launch.py")
OPTIMIZER = {1: "DeepSpeedZeroOptimizer", 2: "DeepSpeedZeroOptimizer", 3: "DeepSpeedZeroOptimizer_Stage3"}


def ds_config(tmp_path, stage: int) -> str:
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": stage}, "gradient_clipping": "auto",
                                "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                "train_batch_size": "auto", "bf16": {"enabled": "auto"}}))
    return str(path)


def launch(nproc, stage, model, data, out, tmp_path, *extra):
    """`sa2va-rl train` under DeepSpeed ZeRO-<stage> in ``nproc`` CPU processes; (process, stability.json, lines)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), LAUNCHER, "train", "--model_path", model, "--data_dir", data, "--output_dir", str(out),
           "--batch_size", "2", "--num_generations", "4", "--max_completion_length", "6", "--warmup_steps", "0",
           "--learning_rate", "1e-2", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0",
           "--deepspeed", ds_config(tmp_path, stage), *extra]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "SA2VA_DRILL_VARIED_REWARD": "1"}
    return run_launch(cmd, out, timeout=600, env=env)


def steps(proc):
    """rank -> [(kind, applied, digest before, digest after)] in order."""
    out: dict[str, list] = {}
    for kind, applied, before, after, rank in re.findall(r"^STEP \d+ (\w+) applied=(\d) (\S+) (\S+) rank=(\d)$",
                                                         proc.stdout, re.M):
        out.setdefault(rank, []).append((kind, applied == "1", before, after))
    return out


def check_engine(proc, stage, world):
    engines = set(re.findall(r"^ENGINE (\S+) zero=(\d) (\w+) world=(\d) rank=(\d)$", proc.stdout, re.M))
    assert engines == {("DistributedType.DEEPSPEED", str(stage), OPTIMIZER[stage], str(world), str(r))
                       for r in range(world)}, engines


def check_skip_drill(proc, report, stage, world):
    """Step 2 has a NaN gradient (on rank 1 with two processes): skipped on every rank with the weights and the
    optimizer state bit-identical; the healthy steps move them; the GradGuard's norm is DeepSpeed's own."""
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    check_engine(proc, stage, world)
    by_rank = steps(proc)
    assert sorted(by_rank) == [str(r) for r in range(world)], by_rank
    for rank, seq in by_rank.items():
        assert [(k, a) for k, a, _, _ in seq] == [("ok", True), ("nan", False), ("ok", True)], (rank, seq)
        assert all(before != after for k, _, before, after in seq if k == "ok"), seq  # a healthy step moves them
        _, _, before, after = seq[1]
        assert before == after, (rank, seq)  # the skipped step: weights, fp32 masters and moments untouched
    norms = re.findall(r"^NORM (\d+) guard=(\S+) deepspeed=(\S+) rank=(\d)$", proc.stdout, re.M)
    assert len(norms) == 2 * world, norms
    for _, guard, deepspeed, _ in norms:
        assert float(guard) == pytest.approx(float(deepspeed), rel=1e-5) and float(guard) > 0, norms
    assert len({(step, guard) for step, guard, _, _ in norms}) == 2  # every rank: the same norm per step
    assert report["skipped_steps"] == 1 and report["steps"] == 3 and report["first_nonfinite"]["step"] == 2
    assert report["final_weights_finite"] is True
    name = report["first_nonfinite"]["params"][0]
    assert re.fullmatch(r"(model|lm_head)\.[\w.]+", name), name  # the model's own parameter name
    if world > 1:  # names with the rank that saw them, whatever rank writes the file
        assert report["first_nonfinite"]["ranks"] == {"1": [name]}
    return name


@gloo
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_nan_on_rank_1_is_skipped_on_both_ranks(tiny_causal, prompt_dir, tmp_path, stage):
    out = tmp_path / "o"
    proc, report = launch(2, stage, tiny_causal, prompt_dir, out, tmp_path, "--max_steps", "3", "--save_strategy",
                          "no", "--inject", "nan_grads@2:1")
    name = check_skip_drill(proc, report, stage, 2)
    assert report["ranks_agree"] is True
    assert f"one gradient element of {name}'s gradient partition" in proc.stderr
    assert proc.stderr.count("GradGuard: non-finite gradients (nan) at check 2") == 2  # both ranks decided


def test_zero2_one_process_nan_is_skipped(tiny_causal, prompt_dir, tmp_path):
    out = tmp_path / "o"
    proc, report = launch(1, 2, tiny_causal, prompt_dir, out, tmp_path, "--max_steps", "3", "--save_strategy", "no",
                          "--inject", "nan_grads@2")
    check_skip_drill(proc, report, 2, 1)
    assert report["ranks_agree"] is None  # one process: nothing to compare


@gloo
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_roll_back_then_resume(tiny_causal, prompt_dir, tmp_path, stage):
    """NaN on rank 1 at steps 5 and 6 (max_consecutive_skips 2): both ranks skip both, then roll back to checkpoint-3
    through DeepSpeed's own checkpoint (each rank's weights, fp32 master partitions and moments equal what it saved
    at step 3, and step 4 had moved them) and finish; a resume from the latest checkpoint starts from exactly the
    state saved there and runs on."""
    out = tmp_path / "o"
    common = ["--save_strategy", "steps", "--save_steps", "3"]
    proc, report = launch(2, stage, tiny_causal, prompt_dir, out, tmp_path, "--max_steps", "7", *common,
                          "--max_consecutive_skips", "2", "--on_persistent_nonfinite", "rollback",
                          "--inject", "nan_grads@5:1", "--inject", "nan_grads@6:1")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    check_engine(proc, stage, 2)
    assert report["skipped_steps"] == 2 and report["rollbacks"] == 1 and report["ranks_agree"] is True
    assert report["final_weights_finite"] is True
    name = report["first_nonfinite"]["params"][0]
    assert report["first_nonfinite"]["ranks"] == {"1": [name]}
    assert [e["checkpoint"] for e in report["events"] if e["kind"] == "rollback"] == ["checkpoint-3"]
    assert os.path.isfile(out / "checkpoint-3" / "latest")  # DeepSpeed's own (sharded) checkpoint

    def shards(tag, step, text):
        return {r: d for d, r in re.findall(rf"^{tag} {step} (\S+) rank=(\d)$", text, re.M)}
    saved, before, restored = shards("SAVED", 3, proc.stdout), shards("BEFORE", 6, proc.stdout), \
        shards("RESTORED", 3, proc.stdout)
    assert len(saved) == 2 and restored == saved, (saved, restored)
    assert all(before[r] != saved[r] for r in saved), (saved, before)
    assert saved["0"] != saved["1"]  # each rank holds its own partition of the optimizer state
    for rank, seq in steps(proc).items():
        assert [k for k, _, _, _ in seq[4:6]] == ["nan", "nan"] and all(b == a for _, _, b, a in seq[4:6]), seq
    saved7 = shards("SAVED", 7, proc.stdout)

    proc, report = launch(2, stage, tiny_causal, prompt_dir, out, tmp_path, "--max_steps", "8", *common,
                          "--resume_from_checkpoint", "latest", "--allow_changed_run", "true")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert report["ranks_agree"] is True and report["rollbacks"] == 1 and report["skipped_steps"] == 2
    resumed = steps(proc)
    assert {r: seq[0][2] for r, seq in resumed.items()} == saved7  # the first step starts from the saved state
    with open(out / "checkpoint-8" / "trainer_state.json") as f:
        assert json.load(f)["global_step"] == 8


def test_a_deepspeed_optimizer_the_guard_cannot_read_is_refused_before_the_first_step(tiny_causal, prompt_dir,
                                                                                      tmp_path):
    """E.g. DeepSpeed's BF16_Optimizer (ZeRO-1 with bf16 and fp32 gradient accumulation): refused when the guard would
    be installed (before the first backward), unless --allow_unguarded_deepspeed, which leaves accelerate's own
    wrapper in place and says so."""
    from types import SimpleNamespace

    import torch

    from tests.rl.test_trainer import make_trainer
    trainer = make_trainer(tiny_causal, prompt_dir, tmp_path, max_steps=1)
    plain = SimpleNamespace(engine=SimpleNamespace(optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))],
                                                                             lr=0.1)))
    trainer.accelerator.deepspeed_engine_wrapped = plain
    with pytest.raises(ValueError, match="DeepSpeed built a SGD, which the GradGuard cannot read.*"
                                         "--allow_unguarded_deepspeed"):
        trainer._install_deepspeed_guard()
    trainer.args.allow_unguarded_deepspeed, trainer._deepspeed_guard = True, True
    trainer._install_deepspeed_guard()
    assert trainer._deepspeed_guard is False and trainer.accelerator.deepspeed_engine_wrapped is plain


def test_zero2_resume_with_a_new_learning_rate_follows_the_new_schedule(tiny_causal, prompt_dir, tmp_path):
    """A resume with --allow_changed_run and another --learning_rate under DeepSpeed: the restored engine's
    scheduler and optimizer (DeepSpeed's own checkpoint) carry the old rate; the steps after the resume step with the
    new rate at the schedule's point (linear decay over 3 steps: 3e-2 * 2/3, then 3e-2 * 1/3), read from the
    optimizer DeepSpeed steps with, not only from the logs."""
    out = tmp_path / "o"
    common = ["--max_steps", "3", "--lr_scheduler_type", "linear", "--save_strategy", "steps", "--save_steps", "1"]
    proc, _ = launch(1, 2, tiny_causal, prompt_dir, out, tmp_path, *common)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]

    def lrs(text):
        return {int(s): float(v) for s, v in re.findall(r"^LR (\d+) (\S+) rank=0$", text, re.M)}
    assert lrs(proc.stdout) == pytest.approx({1: 1e-2, 2: 1e-2 * 2 / 3, 3: 1e-2 / 3})

    proc, _ = launch(1, 2, tiny_causal, prompt_dir, out, tmp_path, *common, "--learning_rate", "3e-2",
                     "--resume_from_checkpoint", str(out / "checkpoint-1"), "--allow_changed_run", "true")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "changed settings (--allow_changed_run): learning_rate: 0.01 -> 0.03" in proc.stderr
    assert lrs(proc.stdout) == pytest.approx({2: 3e-2 * 2 / 3, 3: 3e-2 / 3})
    with open(out / "checkpoint-3" / "trainer_state.json") as f:
        logged = {e["step"]: e["learning_rate"] for e in json.load(f)["log_history"] if "learning_rate" in e}
    assert logged == pytest.approx({1: 1e-2, 2: 3e-2 * 2 / 3, 3: 3e-2 / 3}), logged


@gloo
def test_zero2_trains_sa2va_and_zero3_refuses_it_at_start(tiny_sa2va, gar_dir, tmp_path):
    """ZeRO-2 keeps whole parameters on every rank: a Sa2VA policy trains there and the ranks agree. ZeRO-3 shards
    them, and a Sa2VA Policy runs its parts outside the engine's gathering forward: refused at start, by name
    (before, it stopped at step 1 with "mat2 must be a matrix")."""
    flags = ["--task", "both", "--lora_r", "4", "--lora_alpha", "8", "--max_steps", "2"]
    proc, report = launch(2, 2, tiny_sa2va, gar_dir, tmp_path / "z2", tmp_path, *flags)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert report["ranks_agree"] is True and report["steps"] == 2 and report["skipped_steps"] == 0
    proc, report = launch(2, 3, tiny_sa2va, gar_dir, tmp_path / "z3", tmp_path, *flags)
    assert proc.returncode != 0 and report is None, (proc.stdout + proc.stderr)[-4000:]
    assert "(exitcode: 2)" in proc.stderr  # each rank exits with the usage code; the launcher reports it
    assert "Sa2VAPolicy under DeepSpeed ZeRO-3 is not supported yet" in proc.stderr

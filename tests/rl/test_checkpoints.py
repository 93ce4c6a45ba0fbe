"""rl/checkpoints.py on its own: staging and rename, rotation, the last good checkpoint, stale staging, rollback."""

import json
import logging
import os
from types import SimpleNamespace

import pytest
import torch
from trl import GRPOTrainer

from sa2va_rl.rl import checkpoints
from sa2va_rl.rl.checkpoints import STAGING, Rollback, last_good_checkpoint, publish, remove_stale_staging
from sa2va_rl.rl.stability import STATE_FILE, NonFiniteTrainingError, StabilityCallback


def write(path, text="x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def checkpoint(out, step, finite=True, state=None):
    """A checkpoint directory as the trainer leaves it: weights and the stability state."""
    path = os.path.join(out, f"checkpoint-{step}")
    write(os.path.join(path, "model.safetensors"), f"weights {step}")
    if state is None:
        state = json.dumps({"weights_finite": finite})
    if state is not False:
        write(os.path.join(path, STATE_FILE), state)
    return path


def staged(run_dir, name="checkpoint-6"):
    path = os.path.join(run_dir, STAGING, name)
    write(os.path.join(path, "model.safetensors"), "new weights")
    write(os.path.join(path, "sub", "rng_state.pth"), "rng")
    return path


def tree(path):
    return sorted(os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs)


# ---------------------------------------------------------------------------------------------- publish
def test_publish_renames_the_staged_checkpoint_into_place_and_removes_staging(tmp_path):
    run_dir = str(tmp_path)
    staged(run_dir)
    final = publish(run_dir, "checkpoint-6", save_total_limit=None, best_model_checkpoint=None)
    assert final == os.path.join(run_dir, "checkpoint-6")
    assert tree(final) == ["model.safetensors", os.path.join("sub", "rng_state.pth")]
    assert open(os.path.join(final, "model.safetensors")).read() == "new weights"
    assert os.listdir(run_dir) == ["checkpoint-6"]  # no .staging left behind


def test_publish_replaces_a_checkpoint_of_the_same_name(tmp_path):
    run_dir = str(tmp_path)
    old = checkpoint(run_dir, 6)
    write(os.path.join(old, "stale.bin"))
    staged(run_dir)
    publish(run_dir, "checkpoint-6", None, None)
    assert tree(old) == ["model.safetensors", os.path.join("sub", "rng_state.pth")]  # nothing of the old one


def test_publish_rotates_the_oldest_beyond_save_total_limit_keeping_the_best(tmp_path):
    run_dir = str(tmp_path)
    for s in (2, 4):
        checkpoint(run_dir, s)
    staged(run_dir)
    publish(run_dir, "checkpoint-6", save_total_limit=2, best_model_checkpoint=None)
    assert sorted(os.listdir(run_dir)) == ["checkpoint-4", "checkpoint-6"]
    staged(run_dir, "checkpoint-8")
    publish(run_dir, "checkpoint-8", save_total_limit=2, best_model_checkpoint=os.path.join(run_dir, "checkpoint-4"))
    assert sorted(os.listdir(run_dir)) == ["checkpoint-4", "checkpoint-8"]
    staged(run_dir, "checkpoint-10")
    publish(run_dir, "checkpoint-10", save_total_limit=None, best_model_checkpoint=None)  # no limit: keeps all
    assert sorted(os.listdir(run_dir)) == ["checkpoint-10", "checkpoint-4", "checkpoint-8"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fds through /proc")
def test_publish_fsyncs_every_staged_file_and_directory_before_the_rename_then_the_run_dir(tmp_path, monkeypatch):
    run_dir = str(tmp_path)
    staging = staged(run_dir)
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    publish(run_dir, "checkpoint-6", None, None)
    files = [os.path.join(staging, "model.safetensors"), os.path.join(staging, "sub", "rng_state.pth")]
    dirs = [staging, os.path.join(staging, "sub")]
    assert sorted(synced[:-1]) == sorted(files + dirs)  # all of the staged tree, while it is still staged
    assert synced[-1] == run_dir  # then the rename itself


# ------------------------------------------------------------------------------------ last good checkpoint
def test_last_good_checkpoint_is_the_newest_by_step_whose_weights_were_finite(tmp_path):
    out = str(tmp_path)
    assert last_good_checkpoint(os.path.join(out, "missing")) is None
    assert last_good_checkpoint(out) is None
    good = checkpoint(out, 3)
    checkpoint(out, 10, finite=False)
    checkpoint(out, 9, state=False)  # no stability state: not known to be good
    checkpoint(out, 8, state="{not json")
    checkpoint(out, 7, state=json.dumps({"counters": {}}))  # no weights_finite field: not good
    write(os.path.join(out, "checkpoint-12x", STATE_FILE), json.dumps({"weights_finite": True}))
    write(os.path.join(out, STAGING, "checkpoint-13", STATE_FILE), json.dumps({"weights_finite": True}))
    assert last_good_checkpoint(out) == good
    newest = checkpoint(out, 11)  # by step number, not by name: 11 > 9 > 3
    assert last_good_checkpoint(out) == newest


# ------------------------------------------------------------------------------------------ stale staging
def test_remove_stale_staging_removes_a_half_written_checkpoint_only(tmp_path, caplog):
    out = str(tmp_path)
    remove_stale_staging(out)  # nothing there: nothing to do
    kept = checkpoint(out, 3)
    staged(out)
    with caplog.at_level(logging.WARNING, logger="sa2va_rl.rl.checkpoints"):
        remove_stale_staging(out)
    assert os.listdir(out) == ["checkpoint-3"] and tree(kept) == ["model.safetensors", STATE_FILE]
    assert "half-written" in caplog.text


# ----------------------------------------------------------------------------------------------- rollback
def stub_trainer(out, **args):
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    t = SimpleNamespace(
        args=SimpleNamespace(output_dir=out, on_persistent_nonfinite="rollback", skip_nonfinite_steps=True,
                             max_rollbacks=1, rollback_lr_factor=0.5, **args),
        model=model, optimizer=optimizer, lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
        stability=StabilityCallback(), loaded=[])
    t.grad_guard = t.stability.grad_guard
    t._load_from_checkpoint = lambda c: t.loaded.append(("model", c))
    t._load_rng_state = lambda c: t.loaded.append(("rng", c))
    return t


def test_rollback_restores_the_last_good_checkpoint_and_scales_the_learning_rate(tmp_path, monkeypatch):
    out = str(tmp_path)
    checkpoint(out, 2)
    checkpoint(out, 4, finite=False)
    t = stub_trainer(out)
    monkeypatch.setattr(GRPOTrainer, "_load_optimizer_and_scheduler", lambda self, c: self.loaded.append(("opt", c)))
    t.grad_guard.stats.consecutive_nonfinite = 3
    rollback = Rollback(t)
    rollback.on_persistent_nonfinite(5, "non-finite gradients")
    good = os.path.join(out, "checkpoint-2")
    assert t.loaded == [("model", good), ("opt", good), ("rng", good)]
    assert t.optimizer.param_groups[0]["lr"] == 0.05 and t.lr_scheduler.base_lrs == [0.05]
    assert rollback.lr_factor == 0.5 and t.grad_guard.stats.consecutive_nonfinite == 0
    assert t.stability.counters.rollbacks == 1
    assert t.stability.counters.events[-1] == {"step": 5, "kind": "rollback", "checkpoint": "checkpoint-2",
                                               "lr_factor": 0.5}
    # the budget is spent: the next persistent fault halts, naming why and where to resume from
    with pytest.raises(NonFiniteTrainingError, match=r"^again\. Rollback is not possible: 1 rollback\(s\) done "
                                                     r"\(max_rollbacks=1\)\. .*resume from the last good checkpoint "
                                                     rf"\({good}\)"):
        rollback.on_persistent_nonfinite(7, "again")
    assert os.path.exists(os.path.join(out, "stability.json"))


def test_rollback_halts_without_a_good_checkpoint_and_in_halt_mode(tmp_path):
    out = str(tmp_path)
    with pytest.raises(NonFiniteTrainingError, match="there is no good checkpoint to roll back to"):
        Rollback(stub_trainer(out)).on_persistent_nonfinite(2, "bad")
    checkpoint(out, 2)
    t = stub_trainer(out)
    t.args.on_persistent_nonfinite = "halt"
    with pytest.raises(NonFiniteTrainingError, match=r"^bad\. Try a lower --learning_rate") as e:
        Rollback(t).on_persistent_nonfinite(3, "bad")
    assert f"details in {os.path.join(out, 'stability.json')}." in str(e.value)
    assert t.stability.counters.rollbacks == 0 and checkpoints.last_good_checkpoint(out).endswith("checkpoint-2")


class _Toy(torch.nn.Module):
    """A trained embedding tied to the head, a frozen layer, a persistent and a non-persistent buffer."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.register_buffer("count", torch.zeros(1))
        self.register_buffer("scratch", torch.ones(2), persistent=False)


def test_trained_only_checkpoint_round_trip_and_refusals(tmp_path):
    from safetensors.torch import load_file

    from sa2va_rl.rl.checkpoints import TRAINABLE_FILE, CheckpointMismatch, load_trainable, save_trainable

    torch.manual_seed(0)
    trained = _Toy()
    with torch.no_grad():
        trained.emb.weight.add_(1.0)
        trained.count += 5
    size = save_trainable(trained, str(tmp_path), base_fingerprint="base-a")
    saved = load_file(tmp_path / TRAINABLE_FILE)
    assert sorted(saved) == ["count", "emb.weight", "head.weight"]  # tied names both, no frozen, no scratch
    assert size == sum(v.numel() * v.element_size() for v in saved.values())

    torch.manual_seed(0)
    fresh = _Toy()
    frozen_before = {k: v.clone() for k, v in fresh.frozen.state_dict().items()}
    load_trainable(fresh, str(tmp_path), base_fingerprint="base-a")
    assert torch.equal(fresh.emb.weight, trained.emb.weight) and torch.equal(fresh.count, trained.count)
    assert fresh.head.weight is fresh.emb.weight  # still tied
    assert all(torch.equal(fresh.frozen.state_dict()[k], v) for k, v in frozen_before.items())

    with pytest.raises(CheckpointMismatch, match="fingerprint base-a, now base-b"):
        load_trainable(_Toy(), str(tmp_path), base_fingerprint="base-b")
    more = _Toy()
    more.frozen.requires_grad_(True)  # trains what the checkpoint kept frozen
    with pytest.raises(CheckpointMismatch, match=r"2 trained tensor\(s\) of this model are not in it "
                                                 r"\(first: frozen.bias\)"):
        load_trainable(more, str(tmp_path))
    less = _Toy()
    less.emb.requires_grad_(False)  # keeps frozen what the checkpoint trained
    with pytest.raises(CheckpointMismatch, match=r"2 tensor\(s\) in it are frozen in this model"):
        load_trainable(less, str(tmp_path))


def test_weights_fingerprint_sees_a_difference_inside_any_tensor(tmp_path):
    """Two bases of the same shapes and file sizes that differ in one small tensor (a mask decoder, say) have
    different fingerprints: a trained-only checkpoint must not resume onto the wrong one."""
    from safetensors.torch import save_file

    from sa2va_rl.rl.resume_checks import model_fingerprint, weights_fingerprint

    # 1.5 MiB, the small tensor, 5 MiB: it lies in none of 1 MiB windows at the file's start, middle and end
    before, after = torch.zeros(3 << 17), torch.zeros(5 << 18)  # fp32, as m_small: laid out in name order
    for name, value in (("a", 0.0), ("b", 1.0)):
        os.makedirs(tmp_path / name)
        save_file({"a_before": before, "m_small": torch.full((64,), value), "z_after": after},
                  str(tmp_path / name / "model.safetensors"))
    assert model_fingerprint(str(tmp_path / "a")) == model_fingerprint(str(tmp_path / "b"))  # names and sizes only
    assert weights_fingerprint(str(tmp_path / "a")) != weights_fingerprint(str(tmp_path / "b"))

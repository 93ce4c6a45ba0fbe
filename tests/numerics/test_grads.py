import copy
import math
import os

import pytest
import torch
import torch.distributed as dist

from sa2va_rl.numerics import GradGuard
from tests.spawn import spawn_workers
from tests.syncs import CountSyncs


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def backward(model):
    model.zero_grad(set_to_none=True)
    model(torch.randn(5, 8)).pow(2).mean().backward()


def test_healthy_check_one_sync_grads_untouched():
    model = make_model()
    backward(model)
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    objs = {n: p.grad for n, p in model.named_parameters()}
    guard = GradGuard()
    with CountSyncs() as c:
        report = guard.check(model)
    assert c.count == 1, c.calls
    assert report.finite and report.kind == "ok" and report.nonfinite_params == []
    expected = torch.linalg.vector_norm(torch.stack([g.norm() for g in before.values()]))
    assert report.norm == pytest.approx(expected.item(), rel=1e-6)
    assert report.max_abs is None  # only computed on the slow path
    for n, p in model.named_parameters():
        assert p.grad is objs[n] and torch.equal(p.grad, before[n])


@pytest.mark.parametrize("value,kind", [(math.nan, "nan"), (math.inf, "inf"), (-math.inf, "inf")])
def test_nonfinite_param_is_named(value, kind):
    model = make_model()
    backward(model)
    model[2].bias.grad[1] = value
    report = GradGuard().check(model)
    assert not report.finite and report.kind == kind
    assert report.nonfinite_params == ["2.bias"] and report.num_nonfinite_params == 1


def test_check_partitions_one_process_is_check_on_the_whole_gradients():
    """An engine's gradient partitions (DeepSpeed ZeRO's, with one process: the whole gradient in pieces): the same
    norm as checking the model, one host sync, and a NaN named by the parameter its piece belongs to."""
    model = make_model()
    backward(model)
    whole = GradGuard().check(model)
    parts = [(n, piece) for n, p in model.named_parameters() for piece in p.grad.view(-1).chunk(3)]
    guard = GradGuard()
    with CountSyncs() as c:
        report = guard.check_partitions(parts)
    assert c.count == 1 and report.finite and report.norm == pytest.approx(whole.norm, rel=1e-6)
    model[2].weight.grad[0, 0] = math.nan
    report = guard.check_partitions(parts)
    assert not report.finite and report.kind == "nan" and report.all_nonfinite_params == ["2.weight"]
    assert guard.stats.nan_steps == 1 and guard.stats.steps == 2


def test_huge_finite_grads_are_not_mistaken_for_inf():
    model = make_model()
    backward(model)
    model[0].weight.grad.fill_(1e20)  # L2 overflows fp32, inf-norm does not
    guard = GradGuard()
    report = guard.check(model)
    assert report.finite and report.max_abs == pytest.approx(1e20) and report.norm == math.inf
    guard.clip_(1.0)
    total = torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in model.parameters()]))
    assert total.item() == pytest.approx(1.0, rel=1e-5)


def test_clip_matches_torch_clip_grad_norm():
    model, ref = make_model(), make_model()
    backward(model)
    for p, q in zip(model.parameters(), ref.parameters()):
        q.grad = p.grad.clone()
    guard = GradGuard()
    report = guard.check(model)
    guard.clip_(0.01)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.01)
    assert report.norm == pytest.approx(ref_norm.item(), rel=1e-6)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)


def test_clip_after_nonfinite_check_is_refused():
    model = make_model()
    backward(model)
    model[0].bias.grad[0] = math.nan
    guard = GradGuard()
    guard.check(model)
    with pytest.raises(RuntimeError, match="finite"):
        guard.clip_(1.0)


def test_skip_leaves_adamw_state_bit_identical_and_next_step_updates():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = GradGuard()
    backward(model)
    assert guard.check(model).finite
    opt.step()
    state_before = copy.deepcopy(opt.state_dict())
    params_before = copy.deepcopy(model.state_dict())

    backward(model)
    model[0].weight.grad[0, 0] = math.nan
    report = guard.check(model)
    assert not report.finite
    guard.skip(opt)
    opt.step()  # a trainer that steps anyway must not move anything
    after = opt.state_dict()
    for pid, st in state_before["state"].items():
        for k, v in st.items():
            assert torch.equal(after["state"][pid][k], v), (pid, k)
    for k, v in params_before.items():
        assert torch.equal(model.state_dict()[k], v)
    assert guard.stats.skipped_steps == 1 and guard.stats.nan_steps == 1

    backward(model)
    assert guard.check(model).finite
    opt.step()
    for k, v in params_before.items():
        assert not torch.equal(model.state_dict()[k], v), f"{k} did not change after a healthy step"
    assert opt.state_dict()["state"][0]["step"] == state_before["state"][0]["step"] + 1


def test_stats_and_state_dict_round_trip():
    model = make_model()
    guard = GradGuard()
    norms = []
    for i in range(5):
        backward(model)
        if i in (1, 2):
            model[0].bias.grad[0] = math.inf if i == 1 else math.nan
        r = guard.check(model)
        if r.finite:
            norms.append(r.norm)
        else:
            guard.skip(torch.optim.SGD(model.parameters(), lr=0.1))
    s = guard.stats
    assert (s.steps, s.finite_steps, s.skipped_steps, s.nan_steps, s.inf_steps) == (5, 3, 2, 1, 1)
    assert s.consecutive_nonfinite == 0
    assert s.norm_max == max(norms) and s.norm_min == min(norms)
    assert s.norm_mean == pytest.approx(sum(norms) / 3)
    other = GradGuard()
    other.load_state_dict(guard.state_dict())
    assert other.stats == guard.stats


def test_state_dict_is_json_safe_before_any_finite_step():
    import json

    guard = GradGuard()
    state = json.loads(json.dumps(guard.state_dict(), allow_nan=False))
    assert state["stats"]["norm_min"] is None
    other = GradGuard()
    other.load_state_dict(state)
    assert other.stats == guard.stats and other.stats.norm_min == math.inf


def test_no_grads_is_finite():
    assert GradGuard().check(make_model()).finite



def _worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = make_model()
        backward(model)
        if rank == 1:
            model[0].weight.grad[0, 0] = math.nan
        r = GradGuard().check(model)
        results[rank] = (r.finite, r.kind, r.nonfinite_params)
        dist.barrier()  # no rank closes its side while the other still reads from it
    finally:
        dist.destroy_process_group()


def test_distributed_ranks_agree():
    """A NaN on rank 1 only: both ranks decide 'non-finite'."""
    results = spawn_workers(_worker, 2, expected=2)
    assert results[0][:2] == (False, "nan") and results[1][:2] == (False, "nan")
    assert results[0][2] == [] and results[1][2] == ["0.weight"]

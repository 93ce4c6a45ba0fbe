"""Two CPU processes (gloo): GradGuard's global norm under DDP, FSDP1 (flat and original params), FSDP2 and
ZeRO-style partitions.

accelerate does not wrap FSDP on CPU, so the model is wrapped here with torch's own DDP, FSDP1
(``FullyShardedDataParallel``) and FSDP2 (``fully_shard``, DTensor parameters) - a stand-in for what accelerate
builds on GPUs - and the same GradGuard / ranks_agree code the trainer calls is driven directly. ``zero_parts``: the
reduced DDP gradients split as DeepSpeed ZeRO partitions them (every element on one rank: here each gradient's first
half on rank 0, its second half on rank 1), checked with ``GradGuard.check_partitions``, which the DeepSpeed guard
calls on ZeRO's own partitions (tests/rl/test_deepspeed.py runs that through DeepSpeed). Each rank sees half
of one global batch; the reference is one process on the full batch.

Per engine: the guard's norm equals the reference norm (1e-5); after ``clip_(0.5 x norm)`` the true global norm
(computed independently from the full gradients) equals the target (1e-5); the fast path makes one host sync; a NaN
injected on rank 1 only makes both ranks skip, the optimizer state stays bit-identical, the weights are unchanged
and agree across ranks, and both ranks name the rank-1 parameter.
"""

import math
import os

import pytest
import torch
import torch.distributed as dist

from tests.spawn import spawn_workers

ENGINES = ["ddp", "fsdp1", "fsdp1_flat", "fsdp2", "zero_parts"]


def _build():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 3))


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 8, generator=g)


def _loss(model, x):
    return model(x).pow(2).mean()


def _wrap(engine, model):
    if engine in ("ddp", "zero_parts"):
        return torch.nn.parallel.DistributedDataParallel(model)
    if engine.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        return FSDP(model, auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}), use_orig_params=engine == "fsdp1",
                    device_id=torch.device("cpu"))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for m in model:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _parts(model, rank):
    """ZeRO-style: this rank's half of each (reduced, replicated) DDP gradient, as views, named."""
    return [(name.removeprefix("module."), p.grad.view(-1).chunk(2)[rank]) for name, p in model.named_parameters()
            if p.grad is not None]


def _check(engine, guard, model, rank):
    return guard.check_partitions(_parts(model, rank)) if engine == "zero_parts" else guard.check(model)


def _full_grads(engine, model):
    """The global gradient of every parameter, gathered (the test's independent truth)."""
    if engine == "zero_parts":  # clip_ scaled this rank's halves only: the global norm over both ranks' halves
        sq = torch.stack([g.double().norm() ** 2 for _, g in _parts(model, dist.get_rank())]).sum()
        dist.all_reduce(sq)
        return [sq.sqrt()[None]]
    if engine == "ddp":
        return [p.grad.double().clone() for p in model.parameters()]
    if engine == "fsdp2":
        return [p.grad.full_tensor().double() for p in model.parameters()]
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    if engine == "fsdp1_flat":  # summon_full_params(with_grads=True) needs use_orig_params: torch's own FSDP1 norm
        return [model.clip_grad_norm_(math.inf).double()[None]]
    with FSDP.summon_full_params(model, with_grads=True):
        return [p.grad.double().clone() for p in model.parameters() if p.grad is not None]


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _opt_state(opt):
    return [{k: _local(v).clone() if torch.is_tensor(v) else v for k, v in s.items()} for s in opt.state.values()]


class _Acc:  # what ranks_agree needs of an accelerate Accelerator
    num_processes = 2
    device = torch.device("cpu")

    @staticmethod
    def gather(t):
        out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(out, t.contiguous())
        return torch.cat(out)


def _run(engine, rank):
    from sa2va_rl.numerics import GradGuard
    from sa2va_rl.rl.stability import StabilityCallback, ranks_agree
    from tests.syncs import CountSyncs

    x = _batch()
    ref = _build()
    _loss(ref, x).backward()
    ref_norm = torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in ref.parameters()])).item()

    model = _wrap(engine, _build())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = GradGuard()
    _loss(model, x[rank * 4:(rank + 1) * 4]).backward()  # each rank: half of the global batch
    with CountSyncs() as c:
        report = _check(engine, guard, model, rank)
    out = {"finite": report.finite, "norm": report.norm, "ref_norm": ref_norm, "syncs": c.count}
    guard.clip_(0.5 * report.norm)
    full = _full_grads(engine, model)
    out["clipped_norm"] = torch.linalg.vector_norm(torch.stack([g.norm() for g in full])).item()
    out["target"] = 0.5 * report.norm
    if engine == "zero_parts":  # each rank clipped its halves only: exchange them (ZeRO all-gathers instead)
        for p in model.parameters():
            p.grad.view(-1).chunk(2)[1 - rank].zero_()
            dist.all_reduce(p.grad)
    opt.step()  # a real step: the optimizer has state to keep
    opt.zero_grad(set_to_none=True)

    # NaN on rank 1 only
    _loss(model, x[rank * 4:(rank + 1) * 4]).backward()
    named = None
    if rank == 1 and engine == "zero_parts":  # in rank 1's own partition
        named, part = _parts(model, rank)[0]
        part[0] = math.nan
    elif rank == 1:
        for name, p in model.named_parameters():
            if p.grad is not None and _local(p.grad).numel():
                _local(p.grad).view(-1)[0] = math.nan
                named = name.replace("_fsdp_wrapped_module.", "").removeprefix("module.")  # names as unwrapped
                break
    before_state = _opt_state(opt)
    before_w = [_local(p.detach()).clone() for p in model.parameters()]
    callback = StabilityCallback(grad_guard=guard)
    report = _check(engine, guard, model, rank)
    callback.record_grads(2, report, skipped=True)
    out.update(nan_finite=report.finite, nan_kind=report.kind, by_rank=report.nonfinite_by_rank, injected=named,
               event=callback.counters.first_nonfinite)
    guard.skip(opt)
    opt.step()
    after_state = _opt_state(opt)
    out["state_same"] = len(before_state) == len(after_state) and all(
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)
        for a, b in zip(before_state, after_state))
    out["weights_same"] = all(torch.equal(a, _local(p.detach())) for a, p in zip(before_w, model.parameters()))
    out["ranks_agree"] = ranks_agree(model, _Acc())
    out["skipped"] = guard.stats.skipped_steps
    return out


def _worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for engine in ENGINES:
            try:
                results[(engine, rank)] = _run(engine, rank)
            except Exception as e:  # reported per engine, so one failure does not hide the others
                results[(engine, rank)] = {"error": f"{type(e).__name__}: {e}"}
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch without gloo")
    return spawn_workers(_worker, 2, expected=2 * len(ENGINES))  # every engine's result of both ranks


@pytest.mark.parametrize("engine", ENGINES)
def test_global_norm_and_clip_are_exact(results, engine):
    for rank in (0, 1):
        r = results[(engine, rank)]
        assert "error" not in r, r
        assert r["finite"] and r["norm"] == pytest.approx(r["ref_norm"], rel=1e-5, abs=1e-6), r
        assert r["clipped_norm"] == pytest.approx(r["target"], rel=1e-5, abs=1e-6), r
        assert r["syncs"] == 1, r  # one host sync, as with one process


@pytest.mark.parametrize("engine", ENGINES)
def test_nan_on_rank_1_skips_on_both_ranks_and_is_named(results, engine):
    injected = results[(engine, 1)]["injected"]
    assert injected is not None
    for rank in (0, 1):
        r = results[(engine, rank)]
        assert "error" not in r, r
        assert not r["nan_finite"] and r["nan_kind"] == "nan" and r["skipped"] == 1, r
        assert r["state_same"] and r["weights_same"] and r["ranks_agree"] is True, r
        assert r["by_rank"] == {1: [injected]}, r  # both ranks name the rank-1 parameter
        assert r["event"]["params"] == [injected] and r["event"]["ranks"] == {"1": [injected]}, r

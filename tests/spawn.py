"""Gloo processes for the tests: a free local port, and spawning workers that end without interpreter finalization.

Why: gloo could abort a worker *after* it had delivered every result ("terminate called without an active
exception", SIGABRT; seen in CI in test_grads and test_grads_sharded, never reproduced here in 40 runs of the
sharded workers and 100 of a minimal all_reduce/all_gather pattern). That message is std::terminate from a C++
object destroyed while still in use, and the only phase left at that point is interpreter finalization: c10d's
objects (a ProcessGroupGloo still referenced by a DDP/FSDP wrapper or a pending Work, its worker threads and
their tensors) are then destroyed in an arbitrary order with the interpreter half torn down (pytorch/pytorch
#179291, #190489 describe the same abort from torch's side). So a worker that returns normally, having destroyed
its process group, leaves with ``os._exit(0)`` after flushing its output: no finalization, no abort, and any abort
before that is a real failure (no tolerance). The CLI's own runs do the equivalent in-process teardown instead
(cli._close_process_group: release the trainer, gc, barrier, destroy) because they must run atexit handlers
(TensorBoard, W&B)."""

import os
import socket
import sys

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_then_exit(rank, worker, nprocs, port, results):
    import faulthandler

    faulthandler.enable(all_threads=True)  # an abort before the exit prints every thread's stack
    worker(rank, nprocs, port, results)  # an exception propagates: the spawn reports it as a failure
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_workers(worker, nprocs: int, expected: int) -> dict:
    """Run ``worker(rank, nprocs, port, results)`` in ``nprocs`` spawned processes; returns ``results`` (a managed
    dict the workers fill), which must hold ``expected`` entries. Any worker that fails or aborts fails the call."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_run_then_exit, args=(worker, nprocs, free_port(), results), nprocs=nprocs, join=True,
                           start_method="spawn")
        assert len(results) == expected, f"{len(results)} of {expected} results delivered"
        return dict(results)

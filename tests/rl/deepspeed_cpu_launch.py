"""Stand-in launcher for the DeepSpeed drills on CPU: `python tests/rl/deepspeed_cpu_launch.py train ... --deepspeed
CONFIG.json` under torch.distributed.run, with DS_ACCELERATOR=cpu in the environment.

accelerate starts DeepSpeed only on an accelerator: on a machine without one its PartialState finds no backend, calls
the run single-process (num_processes 1 on every rank: each rank would train alone and both would write the output
directory), and with --use_cpu true it never enables DeepSpeed at all. This launcher makes accelerate's backend choice
return gloo / MULTI_CPU in exactly that case (LOCAL_RANK set, ACCELERATE_USE_DEEPSPEED=true, no device found);
nothing else changes: accelerate's DeepSpeed preparation, DeepSpeed's ZeRO engine and optimizer, transformers'
DeepSpeed checkpoints run as on GPUs. One process needs no patch (the patched branch is not taken), but it is the
same script. Also not built: DeepSpeed's CPU shared-memory all-reduce kernel (inference only; see below). It prints what the tests need as evidence (one write per line):
  STEP <step> <ok|nan|inf> applied=<0|1> <digest before> <digest after> rank=<r>   around each guarded backward+step
  LR <step> <the learning rate the engine's optimizer steps with> rank=<r>   at each guarded step
  SAVED <step> <digest> / BEFORE <step> <digest> / RESTORED <step> <digest> rank=<r>   at save, around a rollback
  NORM <step> guard=<GradGuard's norm> deepspeed=<the engine's global grad norm> rank=<r>   after each applied step
  ENGINE <distributed type> zero=<stage> <optimizer class> world=<n> rank=<r>   once
With SA2VA_DRILL_VARIED_REWARD=1 the token_f1 reward is replaced by 0, 1, 0, 1... over each batch's completions, so
every group has non-zero advantages and every step non-zero gradients (the tiny model's completions score 0).
where a digest is this rank's weights (ZeRO-3: its shards) then its optimizer state: the fp32 master partitions and
AdamW's moments and step counts.
"""

import os
import sys

import importlib

import accelerate.state as st
import torch
from accelerate.utils import DistributedType

_prepare_backend = st.PartialState._prepare_backend


def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
    found, kind = _prepare_backend(self, cpu, sagemaker_dp, backend)
    if (found is None and not cpu and int(os.environ.get("LOCAL_RANK", -1)) != -1
            and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"):
        return "gloo", DistributedType.MULTI_CPU
    return found, kind


st.PartialState._prepare_backend = prepare_backend
# DeepSpeed's CPU shared-memory all-reduce kernel serves inference all-reduce only (training's collectives go through
# torch.distributed, gloo here); it is JIT-compiled with a C++ toolchain on first use (2+ minutes): not built here
# (the module itself: the attribute deepspeed.comm.torch is the torch package, which deepspeed.comm imports)
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

from sa2va_rl import cli  # noqa: E402
from sa2va_rl.rl import deepspeed_guard, rewards  # noqa: E402
from sa2va_rl.rl.trainer import Sa2VAGRPOTrainer  # noqa: E402
from launch_markers import mark_checkpoints, say, tensor_hash  # noqa: E402


def digest(engine) -> str:
    weights = [p.ds_tensor if getattr(p, "ds_tensor", None) is not None else p for p in engine.module.parameters()]
    zero = engine.optimizer
    # the fp32 master partitions (ZeRO-1/2, ZeRO-3) and the torch optimizer's state keyed on them
    masters = list(getattr(zero, "single_partition_of_fp32_groups", None) or zero.fp32_partitioned_groups_flat)
    state = [v for p in masters for _, v in sorted(zero.optimizer.state.get(p, {}).items()) if torch.is_tensor(v)]
    return f"{tensor_hash(weights)}-{tensor_hash(masters)}-{tensor_hash(state)}"


_backward = deepspeed_guard.GuardedEngineWrapper.backward
_install = Sa2VAGRPOTrainer._install_deepspeed_guard


def backward(self, loss, sync_gradients=True, **kwargs):
    before, lr = digest(self.engine), self.engine.get_lr()[0]
    _backward(self, loss, sync_gradients=sync_gradients, **kwargs)
    if sync_gradients:
        say(f"STEP {self.engine.global_steps} {self.report.kind} applied={int(self.engine.was_step_applied())} "
            f"{before} {digest(self.engine)}")
        say(f"LR {self.engine.global_steps} {lr!r}")
        if self.report.finite:  # DeepSpeed's own norm of the same step, over the same partitions
            say(f"NORM {self.engine.global_steps} guard={self.report.norm!r} "
                f"deepspeed={float(self.engine.get_global_grad_norm())!r}")


def install(self):
    first = not isinstance(self.accelerator.deepspeed_engine_wrapped, deepspeed_guard.GuardedEngineWrapper)
    _install(self)
    if first:
        engine = self.accelerator.deepspeed_engine_wrapped.engine
        say(f"ENGINE {self.accelerator.distributed_type} zero={engine.zero_optimization_stage()} "
            f"{type(engine.optimizer).__name__} world={self.accelerator.num_processes}")


def varied(completions, **kwargs):
    return [float(i % 2) for i in range(len(completions))]


if os.environ.get("SA2VA_DRILL_VARIED_REWARD") == "1":
    rewards.REWARDS["token_f1"] = varied
deepspeed_guard.GuardedEngineWrapper.backward = backward
Sa2VAGRPOTrainer._install_deepspeed_guard = install
mark_checkpoints(lambda trainer: digest(trainer.model_wrapped))
torch.set_num_threads(1)
sys.exit(cli.main(sys.argv[1:]))

"""Stand-in launcher for the FSDP trainer drills on CPU: `python tests/rl/fsdp_cpu_launch.py train ...` under
torch.distributed.run, with ACCELERATE_USE_FSDP=true FSDP_VERSION=2 (or FSDP_VERSION=1 and ACCELERATE_TORCH_DEVICE=cpu:
accelerate's own device override, without which FSDP1 refuses accelerate's device ``cpu:0`` against its compute
device ``cpu``) in the environment.

accelerate builds FSDP only for accelerator devices: AcceleratorState lists the multi-device types it turns into FSDP
and MULTI_CPU is not among them, so with --use_cpu true the FSDP settings silently fall back to DDP. This launcher
adds MULTI_CPU to that list (nothing else in accelerate changes: its FSDP1/FSDP2 preparation and sharded
checkpoints run as on GPUs), then runs the CLI. It also prints what the test needs as evidence:
  ENGINE <distributed type> dtensor_grads=<n>/<m> rank=<r>   at each guarded step (FSDP2: every gradient a DTensor)
  SAVED <step> <digest> rank=<r> / RESTORED <step> <digest> rank=<r>   this rank's weight-optimizer shards, at save and after
  a rollback; BEFORE <step> <digest> rank=<r>: the shards just before that rollback
"""

import inspect
import re
import sys
import textwrap

import accelerate.state as st
import torch

src = textwrap.dedent(inspect.getsource(st.AcceleratorState.__init__))
src, n = re.subn(r"(elif self\.distributed_type in \[\n(\s+))DistributedType\.MULTI_GPU,",
                 r"\1DistributedType.MULTI_CPU,\n\2DistributedType.MULTI_GPU,", src, count=1)
assert n == 1, "accelerate's AcceleratorState changed: update the stand-in launcher"
ns: dict = {}
exec(compile(src, st.__file__, "exec"), st.__dict__, ns)
st.AcceleratorState.__init__ = ns["__init__"]

from sa2va_rl import cli  # noqa: E402
from sa2va_rl.rl.trainer import Sa2VAGRPOTrainer  # noqa: E402
from launch_markers import mark_checkpoints, say, tensor_hash  # noqa: E402


def digest(trainer) -> str:
    """this rank's weight shards, then its optimizer state shards (AdamW's moments and steps)"""
    # by key: a restored state dict may list its entries in another order (FSDP1's load does)
    state = [v for p in trainer.model.parameters() for _, v in sorted(trainer.optimizer.state.get(p, {}).items())
             if torch.is_tensor(v)]
    return f"{tensor_hash(trainer.model.parameters())}-{tensor_hash(state)}"


_clip = Sa2VAGRPOTrainer._clip_grad_norm


def clip(self, model):
    from torch.distributed.tensor import DTensor
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    say(f"ENGINE {self.accelerator.distributed_type} dtensor_grads={sum(isinstance(g, DTensor) for g in grads)}"
        f"/{len(grads)}")
    return _clip(self, model)


Sa2VAGRPOTrainer._clip_grad_norm = clip
mark_checkpoints(digest)
torch.set_num_threads(1)
sys.exit(cli.main(sys.argv[1:]))

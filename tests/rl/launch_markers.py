"""What the CPU stand-in launchers (deepspeed_cpu_launch.py, fsdp_cpu_launch.py) print for the tests, shared by both.

Import it after the launcher's own patches to accelerate/DeepSpeed: it imports the trainer."""

import hashlib
import os

from sa2va_rl.rl import checkpoints
from sa2va_rl.rl.trainer import Sa2VAGRPOTrainer


def say(line: str) -> None:
    """``line rank=<r>``: one write (atomic on a pipe; the ranks share the launcher's stdout), starting on a fresh
    line: another rank's block-buffered stdout can flush half a line into the shared pipe just before, and a marker
    glued to it would not match the tests' ^...$ patterns."""
    os.write(1, f"\n{line} rank={os.environ.get('RANK', '0')}\n".encode())


def tensor_hash(tensors) -> str:
    """16 hex digits over the tensors' fp32 bytes (a DTensor: this rank's local shard)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach()
        t = t.to_local() if hasattr(t, "to_local") else t
        h.update(t.float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def mark_checkpoints(digest) -> None:
    """Print ``SAVED <step> <digest>`` at each save, and ``BEFORE <step> <digest>`` / ``RESTORED <step> <digest>``
    around a rollback; ``digest(trainer)``: this rank's state."""
    save_checkpoint, restore_checkpoint = Sa2VAGRPOTrainer._save_checkpoint, checkpoints.Rollback.restore

    def save(self, model, trial):
        say(f"SAVED {self.state.global_step} {digest(self)}")
        return save_checkpoint(self, model, trial)

    def restore(self, checkpoint, step):
        say(f"BEFORE {step} {digest(self.trainer)}")
        restore_checkpoint(self, checkpoint, step)
        say(f"RESTORED {checkpoint.rsplit('-', 1)[1]} {digest(self.trainer)}")

    Sa2VAGRPOTrainer._save_checkpoint, checkpoints.Rollback.restore = save, restore

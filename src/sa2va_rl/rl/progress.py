"""One readable line per logging step under the progress bar, instead of transformers' raw metric dict.

The full dict still goes to the trainer's log history and to ``--report_to`` (TensorBoard, W&B); the terminal gets
what a person reads: step, reward (and each reward function), loss, grad norm, entropy, completion length and the
guards' counters.
"""

from __future__ import annotations

from transformers.trainer_callback import ProgressCallback


def _num(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def format_logs(step: int, max_steps: int, logs: dict) -> str | None:
    """The line for one log event, or None for events that are not training steps (e.g. the final summary)."""
    if "loss" not in logs or "train_runtime" in logs:
        return None
    parts = [f"step {step}/{max_steps}"]
    reward = _num(logs.get("reward"))
    if reward is not None:
        per = [(k[len("rewards/"):-len("/mean")], _num(v)) for k, v in logs.items()
               if k.startswith("rewards/") and k.endswith("/mean")]
        inner = ", ".join(f"{name} {v:.3g}" for name, v in per if v is not None)
        parts.append(f"reward {reward:.3g}" + (f" ({inner})" if inner else ""))
    for key, label in (("loss", "loss"), ("grad_norm", "grad"), ("entropy", "entropy"),
                       ("completions/mean_length", "len")):
        v = _num(logs.get(key))
        if v is not None:
            parts.append(f"{label} {v:.3g}")
    skipped = logs.get("stability/skipped_steps")
    if skipped is not None:
        parts.append(f"skipped {int(skipped)}, repaired rows {int(logs.get('stability/repaired_rows', 0))}")
    return "  ".join(parts)


class ReadableProgress(ProgressCallback):
    """transformers' progress bar, with ``format_logs`` lines in place of the raw dicts."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            line = format_logs(state.global_step, state.max_steps, logs)
            if line is not None:
                self.training_bar.write(line)

"""SampleImagesCallback: the model's answers on a few samples, drawn (eval/plots.py) and logged to TensorBoard.

``sa2va-rl train --report_to tensorboard`` adds it: every ``every`` optimizer steps and at the end of training it
answers the first ``n`` samples of the training set greedily (the caption for the reference mask, the mask for the
reference caption) and writes the figure as the image ``samples`` through the trainer's TensorBoard writer, into
the same event file as its scalars (transformers 5: ``$TENSORBOARD_LOGGING_DIR``, else ``./runs/DATE_HOST``). Single process only (under DDP/FSDP/DeepSpeed the other ranks would have to join the generation): with
several processes it logs that it is off and does nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os

from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class SampleImagesCallback(TrainerCallback):
    def __init__(self, policy, dataset, n: int = 4, every: int = 50, max_new_tokens: int = 32,
                 callbacks: list | None = None) -> None:
        """``dataset``: the run's GARTaskDataset (its reader and tasks give the samples); ``callbacks``: the
        trainer's (``trainer.callback_handler.callbacks``), to share TensorBoardCallback's writer."""
        self.policy, self.dataset, self.callbacks = policy, dataset, callbacks or []
        self.own_writer = False
        self.n, self.every, self.max_new_tokens = n, every, max_new_tokens
        self.writer = None
        self.logged_steps: list[int] = []
        self._rows = None

    def _enabled(self, state) -> bool:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            if self.writer is None and not getattr(self, "_said_off", False):
                logger.info("sample images for TensorBoard are off under several processes")
                self._said_off = True
            return False
        return state.is_world_process_zero

    def log_samples(self, args, state, model) -> None:
        import torch
        from torch.utils.tensorboard import SummaryWriter

        from sa2va_rl.eval.plots import draw_samples, eval_entries, figure_to_array
        from sa2va_rl.eval.runner import eval_rows, predict

        if self._rows is None:
            self._rows, self._samples = eval_rows(self.dataset.reader, self.policy, self.dataset.tasks, self.n)
        device = next(model.parameters()).device
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else
                    torch.autocast(device.type, dtype=torch.float16) if args.fp16 else contextlib.nullcontext())
        with autocast:
            preds = predict(model, self.policy, self._rows, batch_size=len(self._rows),
                            max_new_tokens=self.max_new_tokens)
        from sa2va_rl.rl.rewards import mask_overlap

        for p in preds:
            if p["task"] == "caption2mask":
                i, u = mask_overlap(p["mask"], self._samples[p["source"]].mask)
                p["iou"] = i / u if u else 0.0
        fig = draw_samples(eval_entries(self._samples, {f"step {state.global_step}": preds}, self.n),
                           title=f"training samples at step {state.global_step} (greedy)")
        if self.writer is None:
            self.writer = next((cb.tb_writer for cb in self.callbacks if getattr(cb, "tb_writer", None) is not None),
                               None)
        if self.writer is None:
            self.writer = SummaryWriter(log_dir=os.environ.get("TENSORBOARD_LOGGING_DIR"))
            self.own_writer = True
        self.writer.add_image("samples", figure_to_array(fig), state.global_step, dataformats="HWC")
        self.writer.flush()
        self.logged_steps.append(state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # the last step is drawn here too: at on_train_end TensorBoardCallback (called first) has closed its writer
        due = (self.every and state.global_step % self.every == 0) or state.global_step == state.max_steps
        if due and model is not None and self._enabled(state):
            self.log_samples(args, state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None and self._enabled(state) and state.global_step not in self.logged_steps:
            self.log_samples(args, state, model)
        if self.writer is not None and self.own_writer:
            self.writer.close()
        self.writer = None

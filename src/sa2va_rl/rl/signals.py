"""Stop cleanly on SIGINT / SIGTERM (what a cluster scheduler sends before it kills a job).

``GracefulStop`` is a trainer callback plus the signal handlers it installs for the duration of ``train()``:

* the first signal only sets a flag; the step in flight finishes (its optimizer step guarded as always);
* at that step's end the callback asks the trainer to save a checkpoint (``save_on_signal``, atomic as every
  checkpoint) and to stop; ``train()`` then returns normally and the CLI exits with 128 + the signal number
  (130 for SIGINT, 143 for SIGTERM), so ``--resume_from_checkpoint latest`` continues the same run;
* a second signal while the first is being honoured restores the default handler and re-raises it: a user
  who presses Ctrl-C twice gets out at once.
"""

from __future__ import annotations

import logging
import signal

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

HANDLED = (signal.SIGINT, signal.SIGTERM)


class GracefulStop(TrainerCallback):
    def __init__(self, save_on_signal: bool = True, doing: str = "step") -> None:
        self.save_on_signal = save_on_signal
        self.doing = doing  # what finishes before the stop (the log line names it)
        self.received: int | None = None  # the signal number, once one arrived
        self.saved_at: int | None = None  # the global step whose checkpoint was requested
        self._previous: dict[int, object] = {}

    # ------------------------------------------------------------------ handlers
    def install(self) -> None:
        for sig in HANDLED:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): leave signals alone
                return

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # the second one: out now
            self.uninstall()
            signal.raise_signal(signum)
            return
        self.received = signum
        logger.warning("%s received: finishing the current %s, %sthen stopping (send it again to stop at once)",
                       signal.Signals(signum).name, self.doing, "saving a checkpoint, " if self.save_on_signal else "")

    @property
    def exit_code(self) -> int | None:
        return None if self.received is None else 128 + int(self.received)

    # ------------------------------------------------------------------ trainer seam
    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_training_stop = True
            if self.save_on_signal:
                control.should_save = True
                self.saved_at = state.global_step
        return control

"""Rate limiting for warnings that can fire at every generation step."""

from __future__ import annotations


class PowerOfTwoLimiter:
    """Says yes on the 1st, 2nd, 4th, 8th, ... event.

    A guard that fires every step of a long run then logs about log2(n) lines
    instead of n, while the first occurrence is always reported at once.
    """

    def __init__(self) -> None:
        self.events = 0

    def __call__(self) -> bool:
        self.events += 1
        return self.events & (self.events - 1) == 0

    def state_dict(self) -> dict:
        return {"events": self.events}

    def load_state_dict(self, state: dict) -> None:
        self.events = int(state["events"])

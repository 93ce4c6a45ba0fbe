"""Collapse monitors: the quiet failures of GRPO, measured every step, with a warning that says what to do.

Each monitor is a number per optimizer step, logged as ``stability/<name>``. The share monitors (all but entropy)
are judged on their mean over the last ``share_window`` (8) steps, once that many are in: with the usual 4 prompts
per step, one batch in which two prompts rightly get the same caption (same colour, shape and place) makes
cross_prompt_repeat 0.5 by itself, while a collapse lasts. Crossing a threshold logs a warning
with the fix (rate-limited: the 1st, 2nd, 4th, 8th... crossing of each monitor), is counted in ``stability.json``
under ``collapse``, and, with ``collapse_halt``, stops the run after ``collapse_patience`` crossing steps in a row.

=====================  ===============================================================================================
monitor                value (threshold)
=====================  ===============================================================================================
entropy                mean token entropy of the step's completions, nats, from TRL's own metric (below
                       ``collapse_entropy_floor``, or below ``collapse_entropy_fraction`` x its mean over the first
                       ``collapse_warmup_steps`` steps)
zero_std_groups        share of groups whose rewards are all equal: no learning signal (TRL's frac_reward_zero_std)
                       (above ``collapse_zero_std_share``)
identical_groups       share of groups whose G completions are token-for-token identical (above
                       ``collapse_identical_share``); segmentation groups are left out (see cross_prompt_repeat)
max_length             share of completions as long as max_completion_length: cut, not finished (above
                       ``collapse_max_length_share``)
cross_prompt_repeat    share of completions identical to a completion of another prompt in the batch: the same
                       caption whatever the input (above ``collapse_repeat_share``). Answers to segmentation
                       prompts (caption2mask rows) are left out: Sa2VA's segmentation answer is a template ("Sure,
                       [SEG].") whose content is the mask, the same text for every prompt by design; a caption
                       prompt answered with that template still counts
=====================  ===============================================================================================

Costs nothing on the device: the completions are host lists already, and entropy and zero-std shares are values TRL
has already read back for its logs. Under several processes the completion-based monitors see this process's
completions (a group split across processes is judged on its local part), so they warn but do not halt: ranks
could disagree, and one rank halting alone would leave the others waiting in the next collective.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, deque

from transformers import TrainerCallback

from sa2va_rl.numerics._ratelimit import PowerOfTwoLimiter

logger = logging.getLogger(__name__)

MONITORS = ("entropy", "zero_std_groups", "identical_groups", "max_length", "cross_prompt_repeat")

FIXES = {
    "entropy": "the policy has become (near-)deterministic and stops exploring: lower the learning rate, raise "
               "--temperature, add the KL term (--beta 0.01), or resume from a checkpoint before the drop",
    "zero_std_groups": "most groups get the same reward for every completion, so their advantages are zero and they "
                       "teach nothing: use a denser or finer-grained reward, harder/more varied prompts, a higher "
                       "--temperature or more --num_generations, or drop and refill such groups (dynamic sampling)",
    "identical_groups": "the G completions of a prompt are identical, so GRPO has nothing to compare: raise "
                        "--temperature, lower the learning rate, or add the KL term (--beta 0.01)",
    "max_length": "completions run to --max_completion_length without finishing (often repetition loops): raise "
                  "--max_completion_length if answers are genuinely long, otherwise lower the learning rate or "
                  "penalise length/repetition in the reward",
    "cross_prompt_repeat": "the model writes the same text whatever the prompt (caption collapse; a rising mean "
                           "reward can hide it): reward what is specific to each input (e.g. METEOR/IoU against "
                           "the reference), lower the learning rate, add the KL term (--beta 0.01), or resume "
                           "from a checkpoint before it began",
}


def completion_shares(completions: list[list[int]], groups: list, max_len: int | None,
                      templated: list[bool] | None = None) -> dict[str, float]:
    """identical_groups, max_length and cross_prompt_repeat for one batch of completions; ``groups[i]`` says which
    prompt (row) completion i answers. Completions whose ``templated[i]`` is True (answers to segmentation prompts,
    a template by design) are not counted in identical_groups and cross_prompt_repeat."""
    out: dict[str, float] = {}
    if not completions:
        return out
    templated = templated or [False] * len(completions)
    by_group: dict = {}
    for c, g, t in zip(completions, groups, templated, strict=True):
        if not t:  # a group of segmentation answers is one template by design
            by_group.setdefault(g, []).append(tuple(c))
    multi = [cs for cs in by_group.values() if len(cs) >= 2]
    if multi:
        out["identical_groups"] = sum(len(set(cs)) == 1 for cs in multi) / len(multi)
    if max_len:
        out["max_length"] = sum(len(c) >= max_len for c in completions) / len(completions)
    free = [(tuple(c), g) for c, g, t in zip(completions, groups, templated, strict=True) if not t]
    if len({g for _c, g in free}) >= 2:
        owners: dict[tuple, set] = {}
        for c, g in free:
            owners.setdefault(c, set()).add(g)
        out["cross_prompt_repeat"] = sum(len(owners[c]) > 1 for c, _g in free) / len(free)
    return out


class CollapseMonitor(TrainerCallback):
    """Fed by the trainer during a step; judged at the step's end (``on_step_end``)."""

    def __init__(self, entropy_floor: float = 0.05, entropy_fraction: float = 0.1, warmup_steps: int = 5,
                 zero_std_share: float = 0.8, identical_share: float = 0.5, max_length_share: float = 0.5,
                 repeat_share: float = 0.5, halt: bool = False, patience: int = 3, on_halt=None,
                 share_window: int = 8, local: tuple[str, ...] = ()) -> None:
        self.entropy_floor, self.entropy_fraction, self.warmup_steps = entropy_floor, entropy_fraction, warmup_steps
        self.limits = {"zero_std_groups": zero_std_share, "identical_groups": identical_share,
                       "max_length": max_length_share, "cross_prompt_repeat": repeat_share}
        self.halt, self.patience, self.on_halt = halt, patience, on_halt
        # monitors judged on this process's values only (the completion-based ones under several processes): they
        # warn but never halt, since ranks could disagree and one halting rank would leave the others waiting in
        # the next collective
        self.local = set(local)
        self.recent = {m: deque(maxlen=share_window) for m in self.limits}  # the share monitors' last values
        self.values: dict[str, float] = {}  # the last judged step's values
        self._pending: dict[str, list[float]] = {}  # this step's observations
        self.early_entropy: list[float] = []
        self.crossings = Counter()
        self.first_crossing: dict[str, int] = {}
        self.streak = Counter()
        self._limiters = {m: PowerOfTwoLimiter() for m in MONITORS}

    # ---------------------------------------------------------------- feeding
    def observe(self, name: str, value: float | None) -> None:
        if value is not None and math.isfinite(value):
            self._pending.setdefault(name, []).append(float(value))

    def observe_completions(self, completions: list[list[int]], groups: list, max_len: int | None,
                            templated: list[bool] | None = None) -> None:
        for name, v in completion_shares(completions, groups, max_len, templated).items():
            self.observe(name, v)

    # ---------------------------------------------------------------- judging
    def entropy_threshold(self) -> float:
        early = (sum(self.early_entropy) / len(self.early_entropy)
                 if len(self.early_entropy) >= self.warmup_steps else None)
        return self.entropy_floor if early is None else max(self.entropy_floor, self.entropy_fraction * early)

    def end_step(self, step: int) -> str | None:
        """Judge this step's values; returns the halt message when ``halt`` is on and a monitor stayed crossed for
        ``patience`` steps in a row."""
        values = {k: sum(v) / len(v) for k, v in self._pending.items() if v}
        self._pending = {}
        self.values = values
        crossed = []
        if "entropy" in values:
            threshold = self.entropy_threshold()
            if values["entropy"] < threshold:
                crossed.append(("entropy", values["entropy"], f"below {threshold:.4g}"))
            if len(self.early_entropy) < self.warmup_steps:
                self.early_entropy.append(values["entropy"])
        for name, limit in self.limits.items():
            if name not in values:
                continue
            recent = self.recent[name]
            recent.append(values[name])
            mean = sum(recent) / len(recent)
            if len(recent) == recent.maxlen and mean > limit:
                crossed.append((name, mean, f"mean of the last {recent.maxlen} steps above {limit:.4g}"))
        names = {c[0] for c in crossed}
        for m in MONITORS:
            self.streak[m] = self.streak[m] + 1 if m in names else 0
        message = None
        for name, value, how in crossed:
            self.crossings[name] += 1
            self.first_crossing.setdefault(name, step)
            if self._limiters[name]():
                logger.warning("collapse monitor: stability/%s = %.4g at step %d (%s; %d step(s) so far). Fix: %s. "
                               "(Logged on the 1st, 2nd, 4th... crossing.)", name, value, step, how,
                               self.crossings[name], FIXES[name])
            if self.halt and name not in self.local and self.streak[name] >= self.patience and message is None:
                message = (f"collapse: stability/{name} = {value:.4g} ({how}) for {self.streak[name]} steps in a row "
                           f"at step {step} (collapse_halt, collapse_patience={self.patience}). Fix: {FIXES[name]}")
        return message

    def on_step_end(self, args, state, control, **kwargs):
        message = self.end_step(state.global_step)
        if message is not None and self.on_halt is not None:
            self.on_halt(message)

    # ---------------------------------------------------------------- reading
    def metrics(self) -> dict[str, float]:
        return {f"stability/{k}": v for k, v in self.values.items()}

    def report(self) -> dict:
        return {m: {"crossings": self.crossings[m], "first_step": self.first_crossing.get(m),
                    "last": self.values.get(m)} for m in MONITORS}

    def state_dict(self) -> dict:
        return {"early_entropy": self.early_entropy, "crossings": dict(self.crossings),
                "recent": {m: list(v) for m, v in self.recent.items()}, "streak": dict(self.streak),
                "first_crossing": self.first_crossing,
                "limiters": {m: lim.state_dict() for m, lim in self._limiters.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.early_entropy = list(state.get("early_entropy", []))
        self.crossings = Counter(state.get("crossings", {}))
        self.first_crossing = dict(state.get("first_crossing", {}))
        self.streak = Counter(state.get("streak", {}))
        for m, values in state.get("recent", {}).items():
            if m in self.recent:
                self.recent[m].clear()
                self.recent[m].extend(values)
        for m, s in state.get("limiters", {}).items():
            if m in self._limiters:
                self._limiters[m].load_state_dict(s)

"""Pure-torch numerics: no TRL, no Sa2VA. Everything here is safe to use in any training loop."""

from sa2va_rl.numerics.grads import GradGuard, GradReport
from sa2va_rl.numerics.logits import LogitsGuard, LogitsGuardStats
from sa2va_rl.numerics.nan_trace import first_nonfinite_module

__all__ = ["GradGuard", "GradReport", "LogitsGuard", "LogitsGuardStats", "first_nonfinite_module"]

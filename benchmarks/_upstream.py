"""Benchmarks' checkpoints from the pristine upstream Sa2VA code (``../shared/upstream`` or ``SA2VA_UPSTREAM_DIR``),
through tests.upstream's builder, with the test suite's torchvision stand-ins where the real one cannot load
(tests/stubs/README.md) — in this process and, through PYTHONPATH, in the processes it starts."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def build_internvl_v1(out: str, sa2va_1b: bool) -> str:
    """An InternVL2.5 (v1) Sa2VA checkpoint in ``out``: Sa2VA-1B's dimensions, or the tiny test build."""
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests" / "stubs"))
    import activate

    if not activate.real_torchvision_imports():
        activate.activate()
        os.environ["PYTHONPATH"] = os.pathsep.join([activate.SITE, os.environ.get("PYTHONPATH", "")])
    from tests.upstream import upstream_dir
    from tests.upstream.internvl import SA2VA_1B_DIMS, build_internvl

    return build_internvl("v1", upstream_dir("v1"), out, dims=SA2VA_1B_DIMS if sa2va_1b else None)

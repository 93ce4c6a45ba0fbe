"""Benchmarks' checkpoints from the pristine upstream Sa2VA code (``../shared/upstream`` or ``SA2VA_UPSTREAM_DIR``),
through tests.upstream's builder, with the test suite's torchvision stand-ins where the real one cannot load
(tests/stubs/README.md) — in this process and, through PYTHONPATH, in the processes it starts."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def stand_ins() -> None:
    """The test suite's torchvision/timm stand-ins, where the real torchvision cannot load (here and in the
    processes this one starts); nothing where it can."""
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests" / "stubs"))
    import activate

    if not activate.real_torchvision_imports():
        activate.activate()
        os.environ["PYTHONPATH"] = os.pathsep.join([activate.SITE, os.environ.get("PYTHONPATH", "")])


def build_release(out: str, name: str) -> str:
    """A Sa2VA checkpoint in ``out`` from the pristine InternVL-family code: ``tiny_v1`` (the tests' build) or a
    release's dimensions (``sa2va_1b``, ``sa2va_4b``, ``sa2va_8b``: tests/upstream/internvl.py RELEASE_DIMS), with
    random weights made on the GPU where there is one."""
    stand_ins()
    import torch

    from tests.upstream import upstream_dir
    from tests.upstream.internvl import RELEASE_DIMS, build_internvl

    family, dims = RELEASE_DIMS.get(name, ("v1", None))
    if torch.cuda.is_available():
        try:
            return build_internvl(family, upstream_dir(family), out, dims=dims, device="cuda")
        except Exception as e:  # noqa: BLE001 - the CPU build below is the fallback, slower but the tests' path
            print(f"build on the GPU failed ({e!r}); building on the CPU", file=sys.stderr)
            torch.cuda.empty_cache()
    return build_internvl(family, upstream_dir(family), out, dims=dims)

"""Tiny random-weight checkpoints of the released Sa2VA families, built from their pristine remote code.

``../shared/upstream/`` (beside the repository; ``SA2VA_UPSTREAM_DIR`` overrides) holds the unmodified files.
A builder copies a family's files into a new directory, writes a config.json that scales everything down
except SAM2 (hard-coded Hiera-L upstream, 224M parameters: it is built by upstream's own ``SAM2()``), builds the
model with upstream's own classes, and saves it in bf16 like the releases, with a tokenizer (and, for Qwen-VL,
a processor). Tests that need one skip with a clear reason when the folder is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UPSTREAM = Path(os.environ.get("SA2VA_UPSTREAM_DIR", REPO.parent / "shared" / "upstream"))

FAMILY_DIRS = {
    "v1": "sa2va_v1_llava_sam2",  # Sa2VA-1B/4B/8B/26B (InternVL2.5); Sa2VA-4B: Qwen2.5 LLM, phi3_chat
    "v1_internlm2": "sa2va_v1_llava_sam2",  # Sa2VA-8B/26B-like: InternLM2 LLM
    "v2": "sa2va_v2/models",  # Sa2VA-InternVL3-2B/8B/14B: qwen_chat
    "qwen2_5_vl": "sa2va_v2/models_qwen2_5_vl",  # Sa2VA-Qwen2_5-VL-3B/7B
    "qwen3vl": "sa2va_v2/models_qwen3vl",  # Sa2VA-Qwen3-VL-4B
}


def upstream_dir(family: str) -> Path:
    """The family's pristine folder, or a pytest skip naming what is missing."""
    d = UPSTREAM / FAMILY_DIRS[family]
    if not d.is_dir():
        pytest.skip(f"upstream Sa2VA code not found at {d} (set SA2VA_UPSTREAM_DIR to the shared/upstream folder)")
    return d


def build(family: str, out_dir: str | os.PathLike, seed: int = 0) -> str:
    """Write a tiny checkpoint of ``family`` to ``out_dir``; return the path."""
    if family in ("v1", "v1_internlm2", "v2"):
        from tests.upstream.internvl import build_internvl

        return build_internvl(family, upstream_dir(family), str(out_dir), seed)
    from tests.upstream.qwen_vl import build_qwen_vl

    return build_qwen_vl(family, upstream_dir(family), str(out_dir), seed)

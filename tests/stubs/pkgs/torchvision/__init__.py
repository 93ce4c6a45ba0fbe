"""Test stand-in for torchvision (see tests/stubs/README.md): only what Sa2VA's remote code and qwen_vl_utils use."""

__version__ = "0.28.0+stub"

from . import io, transforms  # noqa: E402,F401

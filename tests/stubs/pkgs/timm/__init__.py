"""Test stand-in for timm (see tests/stubs/README.md): only DropPath, which InternViT imports."""

__version__ = "1.0.0+stub"

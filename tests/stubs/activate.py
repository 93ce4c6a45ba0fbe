"""Make the torchvision/timm stand-ins importable for upstream's code without transformers seeing torchvision.

transformers decides once (``is_torchvision_available``, cached) whether torchvision exists and, if it does,
imports torchvision-backed image utilities the stand-ins do not provide. So: ask transformers first (the real
torchvision is absent -> False, cached), then put ``pkgs/`` on sys.path. Used by tests/conftest.py in-process
and by ``site/sitecustomize.py`` in the CLI subprocesses the tests start (PYTHONPATH=tests/stubs/site).
"""

import importlib.util
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PKGS, SITE = os.path.join(HERE, "pkgs"), os.path.join(HERE, "site")


def real_torchvision_imports() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    return subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True).returncode == 0


def activate() -> None:
    from transformers.utils import import_utils

    import_utils.is_torchvision_available()  # cached before the stand-ins become findable
    if PKGS not in sys.path:
        sys.path.append(PKGS)

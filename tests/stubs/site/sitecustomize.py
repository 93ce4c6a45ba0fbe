"""Loaded at start-up by the CLI subprocesses of the tests (PYTHONPATH=tests/stubs/site); see ../README.md."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import activate  # noqa: E402

sys.path.pop(0)
activate.activate()

"""Session fixtures: tiny models and data built in code. Also makes the upstream Sa2VA code importable here:
see tests/stubs/README.md for why torchvision/timm are stood in for on the CPU test machine."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "stubs"))
import activate as _stubs  # noqa: E402

sys.path.pop(0)


def use_stubs_if_needed() -> bool:
    """Stand-ins for torchvision/timm, in this process and (PYTHONPATH) in CLI subprocesses, unless the real
    torchvision imports. Runs before the tests import the package."""
    if _stubs.real_torchvision_imports():
        return False
    _stubs.activate()
    os.environ["PYTHONPATH"] = os.pathsep.join([_stubs.SITE] + [p for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p])
    return True


USING_STUBS = use_stubs_if_needed()

try:  # the suite is deterministic: hypothesis draws the same examples every run (a new counterexample must not
    # turn CI red at random); HYPOTHESIS_PROFILE=explore draws fresh ones when you hunt for them
    from hypothesis import settings as _hyp

    _hyp.register_profile("ci", derandomize=True)
    _hyp.register_profile("explore", derandomize=False)
    _hyp.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:
    pass

from sa2va_rl.data.prompts import make_prompt_data  # noqa: E402
from sa2va_rl.models.tiny import make_tiny_causal  # noqa: E402


@pytest.fixture(scope="session")
def tiny_causal(tmp_path_factory):
    return make_tiny_causal(str(tmp_path_factory.mktemp("tiny_causal")))


@pytest.fixture(scope="session")
def prompt_dir(tmp_path_factory):
    return make_prompt_data(str(tmp_path_factory.mktemp("prompts")), n=32)


@pytest.fixture(scope="session")
def tiny_sa2va(tmp_path_factory):
    from sa2va_rl.models.tiny_sa2va import make_tiny_sa2va

    return make_tiny_sa2va(str(tmp_path_factory.mktemp("tiny_sa2va")))


@pytest.fixture(scope="session")
def gar_dir(tmp_path_factory):
    from sa2va_rl.data.synthetic import make_gar_data

    return make_gar_data(str(tmp_path_factory.mktemp("gar")), n=16)


@pytest.fixture(scope="session")
def upstream_ckpts(tmp_path_factory):
    """family -> a tiny checkpoint built from the pristine upstream code (tests/upstream), once per session."""
    from tests.upstream import build

    built: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in built:
            built[family] = build(family, tmp_path_factory.mktemp(family))
        return built[family]

    return get

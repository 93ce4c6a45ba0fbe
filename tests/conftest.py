import pytest

from sa2va_rl.data.prompts import make_prompt_data
from sa2va_rl.models.tiny import make_tiny_causal


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

"""Test stand-in: video reading is not used by the tests."""


def read_video(*args, **kwargs):
    raise NotImplementedError("torchvision stand-in (tests/stubs): no video reading")

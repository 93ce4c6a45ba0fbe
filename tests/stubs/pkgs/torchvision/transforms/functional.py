"""Test stand-in for torchvision.transforms.functional on PIL images (see tests/stubs/README.md)."""

import enum

import numpy as np
from PIL import Image


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    LANCZOS = "lanczos"


_PIL = {InterpolationMode.NEAREST: Image.NEAREST, InterpolationMode.BILINEAR: Image.BILINEAR,
        InterpolationMode.BICUBIC: Image.BICUBIC, InterpolationMode.LANCZOS: Image.LANCZOS}


def resize(img, size, interpolation=InterpolationMode.BILINEAR, **kwargs):
    if not isinstance(img, Image.Image):
        raise NotImplementedError("torchvision stand-in (tests/stubs): resize takes PIL images only")
    if isinstance(size, int):  # the shorter side to `size`, aspect kept (torchvision's rule)
        w, h = img.size
        new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        return img.resize(new, _PIL[interpolation])
    h, w = size
    return img.resize((w, h), _PIL[interpolation])


def to_pil_image(pic, mode=None):
    arr = np.asarray(pic)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    im = Image.fromarray(arr)
    return im if mode is None or im.mode == mode else im.convert(mode)

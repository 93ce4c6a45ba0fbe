"""Test stand-in for torchvision.transforms on PIL images (see tests/stubs/README.md)."""

import numpy as np
import torch

from . import functional
from .functional import InterpolationMode


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class Lambda:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x):
        return self.fn(x)


class Resize:
    def __init__(self, size, interpolation=InterpolationMode.BILINEAR, **kwargs):
        self.size, self.interpolation = size, interpolation

    def __call__(self, img):
        return functional.resize(img, self.size, self.interpolation)


class ToTensor:
    def __call__(self, pic):
        arr = np.asarray(pic, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255)


class Normalize:
    def __init__(self, mean, std, inplace=False):
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)

    def __call__(self, x):
        return (x - self.mean[:, None, None]) / self.std[:, None, None]

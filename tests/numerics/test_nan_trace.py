import math

import pytest
import torch

from sa2va_rl.numerics import first_nonfinite_module


class LogOf(torch.nn.Module):
    def forward(self, x):
        return torch.log(x)  # NaN for negative inputs


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.act = LogOf()
        self.out = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.out(self.act(self.proj(x) - 100.0))


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), Block(), torch.nn.Linear(4, 2))


def no_hooks(m):
    return all(not mod._forward_hooks for mod in m.modules())


def test_names_the_module_that_produced_nan():
    m = model()
    assert first_nonfinite_module(m, torch.randn(3, 4)) == "1.act"
    assert no_hooks(m)


def test_names_a_layer_with_nan_weights():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    with torch.no_grad():
        m[1].weight[0, 0] = math.nan
    assert first_nonfinite_module(m, torch.randn(2, 4)) == "1"


def test_finite_forward_returns_none_and_inputs_are_checked():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert first_nonfinite_module(m, torch.randn(2, 4)) is None
    assert first_nonfinite_module(m, x := torch.full((2, 4), math.inf)) == "<inputs>" and x.isinf().all()
    assert no_hooks(m)


def test_hooks_removed_on_exception():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(5, 4))  # shape error in the 2nd layer
    with pytest.raises(RuntimeError):
        first_nonfinite_module(m, torch.randn(2, 4))
    assert no_hooks(m)

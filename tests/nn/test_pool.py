"""AdaptiveGridPool as a drop-in for nn.AdaptiveAvgPool2d / nn.AdaptiveMaxPool2d."""

import pytest
import torch
from torch import nn

import fastgen
from fastgen.nn import AdaptiveGridPool


@pytest.mark.parametrize("backend", ("triton", "torch"))
@pytest.mark.parametrize(
    "ours, theirs",
    [
        (AdaptiveGridPool((3, 2)), nn.AdaptiveAvgPool2d((3, 2))),
        (AdaptiveGridPool(3, "max"), nn.AdaptiveMaxPool2d(3)),
    ],
)
def test_drop_in_swap_in_a_model(backend, ours, theirs):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3, padding=1)
    ref = nn.Sequential(conv, theirs, nn.Flatten())
    net = nn.Sequential(conv, ours, nn.Flatten())
    assert net.state_dict().keys() == ref.state_dict().keys()  # no parameters or buffers of its own
    x = torch.randn(2, 2, 7, 5)
    with fastgen.use_backend(backend):
        y = net(x)
        (g,) = torch.autograd.grad(y.square().sum(), conv.weight)
    yr = ref(x)
    (gr,) = torch.autograd.grad(yr.square().sum(), conv.weight)
    torch.testing.assert_close(y, yr, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g, gr, atol=1e-5, rtol=1e-5)


def test_token_grid_call_and_repr():
    pool = AdaptiveGridPool((2, 2))
    tokens = torch.arange(16.0).view(1, 16, 1)  # a 4x4 grid of one channel, values 0..15 row-major
    out = pool(tokens, grid=(4, 4))
    assert out.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]  # means of the 2x2 quadrants
    assert "output_size=(2, 2), mode='avg'" in repr(pool)

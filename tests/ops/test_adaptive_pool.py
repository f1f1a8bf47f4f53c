"""adaptive_grid_pool: torch and Triton (interpreter) backends against float64 PyTorch adaptive pooling."""

import pytest
import torch
import torch.nn.functional as F

import fastgen
from fastgen.nn import AdaptiveGridPool
from fastgen.ops.adaptive_pool import (
    adaptive_grid_pool,
    adaptive_grid_pool_tokens,
    bin_bounds,
    max_bin,
)

BACKENDS = ("triton", "torch")
# (H, W) -> (h, w): divisible, non-divisible (overlapping bins), upsampling, mixed, identity, 1x1 source
SHAPES = [
    ((6, 4), (3, 2)),
    ((5, 7), (3, 2)),
    ((3, 4), (7, 5)),
    ((5, 3), (2, 6)),
    ((4, 4), (4, 4)),
    ((1, 1), (2, 3)),
]


def _layout(x, layout):
    """x (B, C, H, W) contiguous -> the same values in the requested memory layout."""
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider tensor
        wide = torch.stack((x, torch.full_like(x, float("nan"))), dim=-1).flatten(-2)
        return wide[..., ::2]
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ("avg", "max"))
@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: f"{s[0]}->{s[1]}")
def test_matches_torch_fwd_bwd(backend, mode, shapes, poison_empty):
    (h, w), out = shapes
    layout = ("contiguous", "channels_last", "strided")[(h + w) % 3]
    x64 = torch.randn(2, 3, h, w).double()  # float32 values: the max is exact in both
    g64 = torch.randn(2, 3, *out, dtype=torch.float64)
    x = _layout(x64.float(), layout).requires_grad_(True)
    with fastgen.use_backend(backend):
        if mode == "max":
            y, idx = adaptive_grid_pool(x, out, "max", return_indices=True)
        else:
            y = adaptive_grid_pool(x, out)
        (dx,) = torch.autograd.grad(y, x, g64.float())
    xr = x64.clone().requires_grad_(True)
    if mode == "max":
        yr, idx_r = F.adaptive_max_pool2d(xr, out, return_indices=True)
        assert torch.equal(idx, idx_r)
        assert torch.equal(y.double(), yr.detach())  # a max is exact
    else:
        yr = F.adaptive_avg_pool2d(xr, out)
        torch.testing.assert_close(y.double(), yr.detach(), atol=1e-6, rtol=1e-6)
    (dr,) = torch.autograd.grad(yr, xr, g64)
    torch.testing.assert_close(dx.double(), dr, atol=1e-6, rtol=1e-6)
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last" and out != (1, 1))
    assert dx.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ("avg", "max"))
def test_token_grid(backend, mode):
    b, (h, w), c, out = 2, (5, 3), 6, (2, 4)
    img = torch.randn(b, c, h, w, dtype=torch.float64)
    tokens = img.permute(0, 2, 3, 1).reshape(b, h * w, c).float().requires_grad_(True)
    g = torch.randn(b, out[0] * out[1], c)
    with fastgen.use_backend(backend):
        y = AdaptiveGridPool(out, mode)(tokens, grid=(h, w))
        (dt,) = torch.autograd.grad(y, tokens, g)
    imr = img.clone().requires_grad_(True)
    pool = F.adaptive_max_pool2d if mode == "max" else F.adaptive_avg_pool2d
    yr = pool(imr, out).permute(0, 2, 3, 1).reshape(b, -1, c)
    (dr,) = torch.autograd.grad(yr, imr, g.double())
    assert y.shape == (b, out[0] * out[1], c) and y.is_contiguous()
    torch.testing.assert_close(y.double(), yr.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dt.double(), dr.permute(0, 2, 3, 1).reshape(b, h * w, c), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_half_precision_within_2x_of_torch(backend, dtype):
    x64 = torch.randn(1, 4, 7, 9, dtype=torch.float64)
    ref = F.adaptive_avg_pool2d(x64, (3, 4))
    torch_err = (F.adaptive_avg_pool2d(x64.to(dtype), (3, 4)).double() - ref).abs().max()
    with fastgen.use_backend(backend):
        y = adaptive_grid_pool(x64.to(dtype), (3, 4))
    assert y.dtype == dtype
    assert (y.double() - ref).abs().max() <= 2 * torch_err + 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_like_torch(backend):
    x = torch.randn(1, 2, 5, 5)
    x[0, 0, 1, 1] = float("nan")
    x[0, 1, 3, 4] = float("nan")
    x[0, 1, 4, 4] = float("nan")
    with fastgen.use_backend(backend):
        y = adaptive_grid_pool(x, (2, 3))
        ym, im = adaptive_grid_pool(x, (2, 3), "max", return_indices=True)
    torch.testing.assert_close(y, F.adaptive_avg_pool2d(x, (2, 3)), equal_nan=True)
    rm, ri = F.adaptive_max_pool2d(x, (2, 3), return_indices=True)
    torch.testing.assert_close(ym, rm, equal_nan=True)
    assert torch.equal(im, ri)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_3d_input(backend):
    with fastgen.use_backend(backend):
        x = torch.randn(0, 3, 5, 4, requires_grad=True)
        y = adaptive_grid_pool(x, 2)
        y.sum().backward()
        assert y.shape == (0, 3, 2, 2) and x.grad.shape == x.shape
        x3 = torch.randn(3, 5, 4)
        torch.testing.assert_close(adaptive_grid_pool(x3, (2, None)), F.adaptive_avg_pool2d(x3, (2, None)))


def test_bins_match_the_formula():
    for n_in in range(1, 9):
        for n_out in range(1, 9):
            bins = [bin_bounds(i, n_in, n_out) for i in range(n_out)]
            assert bins[0][0] == 0 and bins[-1][1] == n_in
            assert max_bin(n_in, n_out) == max(e - s for s, e in bins)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: adaptive_grid_pool([1.0], 2), TypeError, "x must be a torch.Tensor"),
        (
            lambda: adaptive_grid_pool(torch.ones(1, 1, 4, 4, dtype=torch.int64), 2),
            TypeError,
            "floating-point",
        ),
        (lambda: adaptive_grid_pool(torch.ones(4, 4), 2), ValueError, r"x must be \(B, C, H, W\)"),
        (lambda: adaptive_grid_pool(torch.ones(1, 1, 0, 4), 2), ValueError, "H x W = 0 x 4"),
        (lambda: adaptive_grid_pool(torch.ones(1, 1, 4, 4), (2, -1)), ValueError, "output_size"),
        (lambda: adaptive_grid_pool(torch.ones(1, 1, 4, 4), (2, 2, 2)), ValueError, "output_size"),
        (lambda: adaptive_grid_pool(torch.ones(1, 1, 4, 4), 2.0), ValueError, "output_size"),
        (lambda: adaptive_grid_pool(torch.ones(1, 1, 4, 4), 2, "mean"), ValueError, "mode"),
        (
            lambda: adaptive_grid_pool(torch.ones(1, 1, 4, 4), 2, return_indices=True),
            ValueError,
            "return_indices",
        ),
        (lambda: adaptive_grid_pool_tokens(torch.ones(1, 7, 2), (2, 3), 1), ValueError, r"tokens.shape\[1\]"),
        (lambda: adaptive_grid_pool_tokens(torch.ones(1, 6, 2), (2, 0), 1), ValueError, "grid"),
        (lambda: AdaptiveGridPool(2, "sum"), ValueError, "mode"),
    ],
)
def test_errors_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_forced_triton_refuses_int32_overflow():
    from fastgen._backend import BackendUnavailableError

    x = torch.ones(1, 1, 1, 50_000)
    with fastgen.use_backend("triton"), pytest.raises(BackendUnavailableError, match="int32"):
        adaptive_grid_pool(x, (1, 50_000))


def test_opcheck():
    x = torch.randn(2, 3, 5, 7, requires_grad=True)
    torch.library.opcheck(torch.ops.fastgen.adaptive_grid_pool.default, (x, 3, 2, False))
    torch.library.opcheck(torch.ops.fastgen.adaptive_grid_pool.default, (x, 4, 9, True))
    g = torch.randn(2, 3, 3, 2)
    torch.library.opcheck(torch.ops.fastgen.adaptive_grid_pool_backward.default, (g, 5, 7, False))


@pytest.mark.gpu
@pytest.mark.gpu_smoke
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("layout", ("nchw", "tokens"))
def test_gpu_real_shapes_within_2x_of_torch(dtype, layout):
    b, c, (h, w), out = 16, 768, (24, 24), (16, 16)
    x64 = torch.randn(b, c, h, w, device="cuda", dtype=torch.float64)
    g = torch.randn(b, c, *out, device="cuda", dtype=torch.float64)
    x = x64.to(dtype)
    if layout == "tokens":
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.requires_grad_(True)
    with fastgen.use_backend("triton"):
        y = adaptive_grid_pool(x, out)
        (dx,) = torch.autograd.grad(y, x, g.to(dtype))
    xr = x64.clone().requires_grad_(True)
    yr = F.adaptive_avg_pool2d(xr, out)
    (dr,) = torch.autograd.grad(yr, xr, g)
    xt = x64.to(dtype).requires_grad_(True)
    yt = F.adaptive_avg_pool2d(xt, out)
    (dt,) = torch.autograd.grad(yt, xt, g.to(dtype))
    for ours, same_dtype, ref in ((y, yt, yr), (dx, dt, dr)):
        err = (ours.double() - ref).abs().max()
        assert err <= 2 * (same_dtype.double() - ref).abs().max() + 1e-5
    ym, im = adaptive_grid_pool(x.detach(), out, "max", return_indices=True)
    rm, ri = F.adaptive_max_pool2d(x.detach(), out, return_indices=True)
    assert torch.equal(ym, rm) and torch.equal(im, ri)

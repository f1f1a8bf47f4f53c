"""SSIM (== skimage), the fused Triton kernel (interpreter, small images) == ssim_ref, gradients, MS-SSIM,
PSNR and input errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

import fastgen
import fastgen.ops.ssim as ssim_op
from fastgen.metrics import MS_SSIM_WEIGHTS, ms_ssim, psnr, ssim
from fastgen.ops.ssim import ssim_ref, ssim_stats


def skimage_ssim(a: torch.Tensor, b: torch.Tensor, data_range=1.0) -> np.ndarray:
    """Per image of (B, C, H, W): skimage's Gaussian SSIM, averaged over channels."""
    kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=data_range)
    return np.array(
        [structural_similarity(a[i].numpy(), b[i].numpy(), channel_axis=0, **kw) for i in range(a.shape[0])]
    )


def image_pair(shape, kind, dtype=torch.float64):
    b, c, h, w = shape
    if kind == "random":
        x = torch.rand(shape, dtype=dtype)
    else:  # structured: gradients, a disc and stripes
        yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        base = 0.5 * xx + 0.3 * ((xx - 0.5) ** 2 + (yy - 0.4) ** 2 < 0.1) + 0.2 * torch.sin(20 * yy)
        x = (base + 0.1 * torch.arange(b * c).view(b, c, 1, 1) / (b * c)).to(dtype)
    y = (x + 0.15 * torch.randn(shape, dtype=dtype)).clamp(0, 1)
    return x, y


@pytest.mark.parametrize("kind", ["random", "structured"])
@pytest.mark.parametrize("shape", [(2, 1, 11, 11), (2, 1, 32, 32), (3, 3, 37, 50), (1, 3, 64, 45)])
def test_ssim_matches_skimage(shape, kind):
    x, y = image_pair(shape, kind)
    want = skimage_ssim(x, y)
    got = ssim(x, y, reduction="none")
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5, rtol=0)
    got32 = ssim(x.float(), y.float(), reduction="none")
    np.testing.assert_allclose(got32.numpy(), want, atol=1e-5, rtol=0)
    assert ssim(x.float(), y.float()).item() == pytest.approx(want.mean(), abs=1e-5)


def test_ssim_data_range_and_identical():
    x, y = image_pair((2, 3, 30, 30), "random")
    want = skimage_ssim(255 * x, 255 * y, data_range=255.0)
    np.testing.assert_allclose(
        ssim(255 * x, 255 * y, data_range=255, reduction="none").numpy(), want, atol=1e-5
    )
    assert torch.allclose(ssim(x, x, reduction="none"), torch.ones(2, dtype=torch.float64))


# ---- the fused Triton kernel under the interpreter -----------------------------------------------------


@pytest.mark.parametrize("blocks", [(64, 64), (16, 16)])  # one tile per plane; many tiles, persistent loop
@pytest.mark.parametrize("shape,window", [((2, 3, 23, 19), 11), ((1, 2, 40, 37), 11), ((2, 1, 17, 21), 7)])
def test_triton_matches_ref(shape, window, blocks, poison_empty, monkeypatch):
    monkeypatch.setattr(ssim_op, "BLOCK_R", blocks[0])
    monkeypatch.setattr(ssim_op, "BLOCK_C", blocks[1])
    x, y = image_pair(shape, "random", torch.float32)
    kw = dict(data_range=1.0, window_size=window, sigma=1.5)
    with fastgen.use_backend("triton", op="ssim"):
        got = ssim_stats(x, y, **kw)
    want = ssim_ref(x, y, upcast=True, **kw)
    err_torch = (ssim_ref(x, y, **kw) - want).abs().max().item()
    assert (got - want).abs().max().item() <= 2 * err_torch + 2e-6


def test_triton_half_inputs_and_grads(monkeypatch):
    monkeypatch.setattr(ssim_op, "BLOCK_R", 16)
    monkeypatch.setattr(ssim_op, "BLOCK_C", 16)
    x, y = image_pair((1, 2, 20, 18), "structured", torch.float32)
    xh, yh = x.half(), y.half()
    with fastgen.use_backend("triton", op="ssim"):
        got = ssim_stats(xh, yh)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ssim_ref(xh.float(), yh.float()), atol=2e-6, rtol=0)
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    with fastgen.use_backend("triton", op="ssim"):
        (1 - ssim(xs, ys) + 0.3 * ms_ssim(xs, ys, weights=[0.5, 0.5], window_size=7)).backward()
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    st = ssim_ref(xr, yr)
    ms = ssim_ref(F.avg_pool2d(xr, 2), F.avg_pool2d(yr, 2), window_size=7)
    cs7 = ssim_ref(xr, yr, window_size=7)[..., 1]
    (1 - st[..., 0].mean() + 0.3 * (cs7.relu() ** 0.5 * ms[..., 0].relu() ** 0.5).mean()).backward()
    torch.testing.assert_close(xs.grad, xr.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(ys.grad, yr.grad, atol=1e-6, rtol=1e-4)


def test_gradcheck_torch_backend():
    x, y = image_pair((1, 2, 9, 8), "random")
    x.requires_grad_()
    y.requires_grad_()
    with fastgen.use_backend("torch", op="ssim"):
        assert torch.autograd.gradcheck(
            lambda a, b: ssim_stats(a, b, data_range=2.0, window_size=7), (x, y), fast_mode=True
        )
        assert torch.autograd.gradcheck(
            lambda a, b: ssim_stats(a, b, window_size=5, sigma=0.8), (x, y), fast_mode=True
        )


def test_opcheck():
    x, y = image_pair((2, 3, 16, 15), "random", torch.float32)
    torch.library.opcheck(ssim_op._ssim_op, (x.requires_grad_(), y, 1.0, 11, 1.5, 0.01, 0.03))


# ---- MS-SSIM, PSNR, errors -------------------------------------------------------------------------------


def ms_ssim_formula(x, y, weights):
    """Wang et al. 2003 written out with the conv2d reference."""
    vals = []
    for j in range(len(weights)):
        if j:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        st = ssim_ref(x, y)
        vals.append(st[..., 0] if j == len(weights) - 1 else st[..., 1])
    out = torch.ones_like(vals[0])
    for v, w in zip(vals, weights, strict=True):
        out = out * v.clamp_min(0) ** w
    return out.mean(1)


@pytest.mark.parametrize("shape,weights", [((1, 3, 176, 181), None), ((1, 1, 50, 47), [0.2, 0.3, 0.5])])
def test_ms_ssim(shape, weights):
    x, y = image_pair(shape, "structured", torch.float32)
    got = ms_ssim(x, y, weights=weights, reduction="none")
    want = ms_ssim_formula(x, y, MS_SSIM_WEIGHTS if weights is None else weights)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert 0 < float(got.min()) < 1
    assert ms_ssim(x, x, weights=weights).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="too small"):
        ms_ssim(x[..., :40, :40], y[..., :40, :40], weights=weights, window_size=13)


def test_psnr():
    x, y = image_pair((3, 3, 16, 16), "random")
    mse = ((x - y) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(psnr(x, y, reduction="none"), 10 * torch.log10(1 / mse))
    torch.testing.assert_close(psnr(2 * x, 2 * y, data_range=2.0), (10 * torch.log10(1 / mse)).mean())
    assert torch.isinf(psnr(x, x))


@pytest.mark.parametrize(
    "a,b,kw,match",
    [
        ((1, 3, 16, 16), (1, 3, 16, 17), {}, "same shape"),
        ((1, 3, 10, 16), (1, 3, 10, 16), {}, "smaller than the 11x11 window"),
        ((3, 16, 16), (3, 16, 16), {}, "must be \\(B, C, H, W\\)"),
        ((1, 1, 16, 16), (1, 1, 16, 16), {"data_range": 0.0}, "data_range must be a positive"),
        ((1, 1, 16, 16), (1, 1, 16, 16), {"data_range": -1}, "data_range must be a positive"),
        ((1, 1, 16, 16), (1, 1, 16, 16), {"window_size": 4}, "odd"),
        ((1, 1, 16, 16), (1, 1, 16, 16), {"reduction": "sum"}, "reduction"),
    ],
)
def test_errors(a, b, kw, match):
    with pytest.raises(ValueError, match=match):
        ssim(torch.rand(a), torch.rand(b), **kw)


def test_psnr_errors():
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 5))
    with pytest.raises(ValueError, match="data_range"):
        psnr(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4), data_range=-1.0)


def test_forced_triton_refuses_float64():
    x = torch.rand(1, 1, 16, 16, dtype=torch.float64)
    with (
        fastgen.use_backend("triton", op="ssim"),
        pytest.raises(fastgen.BackendUnavailableError, match="float64"),
    ):
        ssim(x, x)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(16, 3, 256, 256), (3, 1, 300, 517)])
def test_triton_gpu_real_sizes(shape, dtype, poison_empty):
    x = torch.rand(shape, device="cuda").to(dtype)
    y = (x.float() + 0.1 * torch.randn(shape, device="cuda")).clamp(0, 1).to(dtype)
    want = ssim_ref(x, y, upcast=True)
    err_torch = (ssim_ref(x, y) - want).abs().max().item()
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    with fastgen.use_backend("triton", op="ssim"):
        got = ssim_stats(xg, yg)
    assert (got - want).abs().max().item() <= 2 * err_torch + 2e-6
    got[..., 0].sum().backward()
    xr = x.double().requires_grad_()
    ssim_ref(xr, y.double())[..., 0].sum().backward()
    scale = xr.grad.abs().max().item()
    assert (xg.grad.double() - xr.grad).abs().max().item() <= (
        1e-4 if dtype == torch.float32 else 1e-2
    ) * scale

"""SSIM on CPU (the torch backend's chunked separable path and the CPU analytic backward).

Every value and gradient is compared with ``ssim_ref`` in float64 (five depthwise 2-D conv2d calls,
autograd for the gradients) on the same (rounded) inputs, never with the code under test.
"""

from __future__ import annotations

import pytest
import torch

import fastgen
import fastgen.ops.ssim as S
from fastgen.metrics.ssim import ms_ssim, ssim
from fastgen.ops.ssim import ssim_ref, ssim_stats


def pair(shape, dtype=torch.float32, seed=0, noise=0.2, data_range=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64) * data_range
    y = (x + noise * data_range * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, data_range)
    return x.to(dtype), y.to(dtype)


def ref_and_grads(x, y, w, **kw):
    """float64 reference values and gradients of sum(w * stats) on the inputs as given (after rounding)."""
    xr = x.detach().double().requires_grad_()
    yr = y.detach().double().requires_grad_()
    out = ssim_ref(xr, yr, **kw)
    (out * w.double()).sum().backward()
    return out.detach(), xr.grad, yr.grad


def ours_and_grads(x, y, w, **kw):
    xg = x.detach().clone().requires_grad_()
    yg = y.detach().clone().requires_grad_()
    with fastgen.use_backend("torch", op="ssim"):
        out = ssim_stats(xg, yg, **kw)
    (out * w.to(out.dtype)).sum().backward()
    return out.detach(), xg.grad, yg.grad


def assert_grads_close(got, want, rel):
    scale = want.abs().max().item()
    err = (got.double() - want).abs().max().item()
    assert err <= rel * scale, (err, scale)


@pytest.mark.parametrize(
    "shape,kw",
    [
        ((2, 3, 23, 19), {}),
        ((1, 1, 11, 11), {}),  # one output pixel
        ((3, 2, 40, 37), {"window_size": 7, "data_range": 2.0}),
        ((2, 1, 17, 29), {"window_size": 3, "sigma": 0.8, "k1": 0.02, "k2": 0.05}),
        ((1, 5, 33, 30), {"window_size": 13, "sigma": 2.5, "data_range": 255.0}),
        ((2, 3, 64, 70), {"window_size": 1}),  # a 1-tap window: SSIM of the pixels themselves
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_grads_vs_float64_ref(shape, kw, dtype):
    x, y = pair(shape, dtype, data_range=kw.get("data_range", 1.0))
    w = torch.randn(shape[0], shape[1], 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got, gx, gy = ours_and_grads(x, y, w, **kw)
    want, wx, wy = ref_and_grads(x, y, w, **kw)
    assert got.dtype == dtype and gx.dtype == dtype and gy.dtype == dtype
    atol, rel = (1e-5, 2e-5) if dtype == torch.float32 else (1e-12, 1e-10)
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=0)
    assert_grads_close(gx, wx, rel)
    assert_grads_close(gy, wy, rel)


@pytest.mark.parametrize("planes", [1, 2, 3, 4, 5, 8])
def test_chunks_and_short_last_chunk(planes, monkeypatch):
    """7 planes in chunks of 1..8 planes (short last chunks; 3 and 5 padded to 4 and 8 in the conv):
    the same values and gradients."""
    monkeypatch.setattr(S, "CPU_CHUNK_ELEMS", 4 * 23 * 19 * planes)
    monkeypatch.setattr(S, "CPU_CHUNK_MAX_ELEMS", 4 * 23 * 19 * planes)
    assert S._chunk_planes(23, 19) == planes
    x, y = pair((7, 1, 23, 19), torch.float64, seed=3)
    w = torch.randn(7, 1, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got, gx, gy = ours_and_grads(x, y, w)
    want, wx, wy = ref_and_grads(x, y, w)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert_grads_close(gx, wx, 1e-10)
    assert_grads_close(gy, wy, 1e-10)


def test_padded_planes():
    assert [S._padded_planes(p) for p in range(1, 10)] == [1, 2, 4, 4, 8, 8, 8, 8, 12]


def test_chunk_rule():
    assert S._chunk_planes(64, 64) == 32
    assert S._chunk_planes(256, 256) == 4
    assert S._chunk_planes(2048, 2048) == 1
    assert S._chunk_planes(11, 11) >= 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_fp32_math(dtype):
    x, y = pair((2, 3, 30, 26), dtype, seed=5)
    w = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got, gx, gy = ours_and_grads(x, y, w)
    want, wx, wy = ref_and_grads(x, y, w)  # float64 on the same rounded inputs
    assert got.dtype == torch.float32 and gx.dtype == dtype and gy.dtype == dtype
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    # the gradients are rounded to the input dtype: relative error about one ulp of it
    assert_grads_close(gx, wx, 1e-2)
    assert_grads_close(gy, wy, 1e-2)


def test_non_contiguous_inputs():
    x, y = pair((2, 3, 40, 36), torch.float32, seed=6)
    xs = x.contiguous(memory_format=torch.channels_last)
    ys = y[:, :, :, :].transpose(2, 3).contiguous().transpose(2, 3)  # column-major planes
    w = torch.ones(2, 3, 2, dtype=torch.float64)
    got, gx, gy = ours_and_grads(xs, ys, w)
    want, wx, wy = ref_and_grads(x, y, w)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    assert_grads_close(gx, wx, 2e-5)
    assert_grads_close(gy, wy, 2e-5)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_metric_reductions_and_ms_ssim(reduction):
    x, y = pair((3, 2, 50, 47), torch.float32, seed=7)
    want = ssim_ref(x.double(), y.double(), data_range=1.0)[..., 0].mean(1)
    with fastgen.use_backend("torch", op="ssim"):
        got = ssim(x, y, reduction=reduction)
        got_ms = ms_ssim(x, y, weights=[0.4, 0.6], window_size=7, reduction=reduction)
    want = want.mean() if reduction == "mean" else want
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    xd, yd = x.double(), y.double()
    cs = ssim_ref(xd, yd, window_size=7)[..., 1]
    s2 = ssim_ref(torch.nn.functional.avg_pool2d(xd, 2), torch.nn.functional.avg_pool2d(yd, 2), window_size=7)
    ms = (cs.relu() ** 0.4 * s2[..., 0].relu() ** 0.6).mean(1)
    torch.testing.assert_close(got_ms.double(), ms.mean() if reduction == "mean" else ms, atol=1e-5, rtol=0)


def test_gradcheck_float64_tiny():
    x, y = pair((2, 2, 9, 8), torch.float64, seed=8)
    x.requires_grad_()
    y.requires_grad_()
    with fastgen.use_backend("torch", op="ssim"):
        assert torch.autograd.gradcheck(
            lambda a, b: ssim_stats(a, b, data_range=1.5, window_size=5, sigma=1.1, k1=0.03, k2=0.05),
            (x, y),
            fast_mode=True,
        )
        # the custom op itself (what torch.compile sees) has the same backward
        assert torch.autograd.gradcheck(
            lambda a, b: S._ssim_op(a, b, 1.0, 3, 0.7, 0.01, 0.03), (x, y), fast_mode=True
        )


def test_eager_path_equals_custom_op():
    x, y = pair((2, 3, 31, 33), torch.float32, seed=9)
    with fastgen.use_backend("torch", op="ssim"):
        a = ssim_stats(x, y, window_size=7)
        b = S._ssim_op(x, y, 1.0, 7, 1.5, 0.01, 0.03)
    assert torch.equal(a, b)


def test_nan_propagates_like_the_reference():
    x, y = pair((2, 2, 30, 30), torch.float32, seed=10)
    x[1, 0, 5, 7] = float("nan")
    w = torch.ones(2, 2, 2, dtype=torch.float64)
    got, gx, gy = ours_and_grads(x, y, w)
    want, wx, wy = ref_and_grads(x, y, w)
    assert torch.equal(got.isnan(), want.isnan())
    assert got.isnan().sum() == 2  # (ssim, cs) of the plane with the NaN, nothing else
    torch.testing.assert_close(got[~got.isnan()].double(), want[~want.isnan()], atol=1e-5, rtol=0)
    assert torch.equal(gx.isnan(), wx.isnan())
    assert torch.equal(gy.isnan(), wy.isnan())
    assert gx[0].isfinite().all() and gx[1, 1].isfinite().all()


def test_empty_batch():
    x = torch.rand(0, 3, 16, 16, requires_grad=True)
    y = torch.rand(0, 3, 16, 16)
    with fastgen.use_backend("torch", op="ssim"):
        out = ssim_stats(x, y)
    assert out.shape == (0, 3, 2)
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_errors_unchanged():
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match="window_size"):
        ssim_stats(x, x, window_size=4)
    with pytest.raises(ValueError, match="smaller than the 11x11 window"):
        ssim_stats(x, x)
    with pytest.raises(ValueError, match="data_range"):
        ssim_stats(x, x, window_size=3, data_range=float("nan"))


def test_chunks_on_worker_threads(monkeypatch):
    """With 2 intra-op threads the chunks run on 2 single-threaded workers: same values and gradients,
    and the caller's thread count (and the default of threads started later) is unchanged."""
    import threading

    monkeypatch.setattr(S, "CPU_CHUNK_ELEMS", 4 * 23 * 19 * 2)
    monkeypatch.setattr(S, "CPU_CHUNK_MAX_ELEMS", 4 * 23 * 19 * 2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, y = pair((7, 1, 23, 19), torch.float64, seed=11)
        w = torch.randn(7, 1, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        got, gx, gy = ours_and_grads(x, y, w)
        assert torch.get_num_threads() == 2
        seen = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert seen == [2]
    finally:
        torch.set_num_threads(before)
    want, wx, wy = ref_and_grads(x, y, w)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert_grads_close(gx, wx, 1e-10)
    assert_grads_close(gy, wy, 1e-10)

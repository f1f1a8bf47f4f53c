"""Benchmark: SSIM of two image batches, the fused Triton kernel against the plain conv2d formulation.

* ``reference`` (the correctness oracle): :func:`fastgen.ops.ssim.ssim_ref`, five depthwise ``conv2d``
  calls with the 11x11 Gaussian window and the SSIM map in elementwise PyTorch (five full-size filtered
  maps plus the map temporaries), autograd for the backward.
* ``fastgen[<backend>]``: :func:`fastgen.ops.ssim.ssim_stats` through dispatch: on CUDA the one-pass Triton
  kernel (separable filtering in tiles, per-tile sums, no full-size intermediates); its backward is the
  analytic PyTorch formula (separable conv2d + conv_transpose2d off CPU; on CPU the chunked
  separable path below) for every backend.

Plain-PyTorch baselines (CPU rows; ``fwd+bwd`` through autograd), the strongest alternatives on CPU:

* ``grouped conv2d`` (torchmetrics-style): the five maps x, y, xx, yy, xy concatenated into one
  (B, 5C, H, W) tensor, one depthwise ``conv2d`` with the (k, k) window and ``groups=5C``;
* ``grouped conv2d CL``: the same in channels-last memory (oneDNN's faster depthwise layout on CPU);
* ``separable conv``: the same stacked maps filtered by a (1, k) then a (k, 1) depthwise ``conv2d``.

On CPU the torch backend filters four maps (x, y, x^2 + y^2, xy) of a few planes at a time
(cache-sized chunks), horizontal conv in NCHW, vertical conv with the image columns as channels-last
channels, and its analytic backward is the adjoint of the same passes (see ``fastgen/ops/ssim.py``).

Every call returns the per-(image, channel) means of the SSIM and cs maps, (B, C, 2) float32. ``fwd+bwd``
returns the gradients of ``sum(ssim means) * (H-10)(W-10)`` (O(1) per pixel) in the input dtype.
Bytes counted (the unavoidable traffic): fwd reads x and y; fwd+bwd reads x, y twice and writes dx, dy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastgen._backend import Call
from fastgen.bench import Case, Impl, backend_impls, main, register
from fastgen.ops.ssim import gaussian_window, ssim_ref, ssim_stats

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
WINDOW = 11


def _stacked_ssim(x, y, filt, *, data_range=1.0, k1=0.01, k2=0.03):
    """(B, C, H, W) x 2 -> (B, C, 2): SSIM / cs means from ``filt`` applied to the stacked 5C maps."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, y = x.to(dt), y.to(dt)
    c = x.shape[1]
    f = filt(torch.cat((x, y, x * x, y * y, x * y), dim=1))
    mu_x, mu_y, e_xx, e_yy, e_xy = f.split(c, dim=1)
    s_xx, s_yy, s_xy = e_xx - mu_x * mu_x, e_yy - mu_y * mu_y, e_xy - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    cs = (2 * s_xy + c2) / (s_xx + s_yy + c2)
    s = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1) * cs
    return torch.stack((s.mean((-2, -1)), cs.mean((-2, -1))), dim=-1)


def grouped_conv2d_ssim(x, y, *, window_size=WINDOW, sigma=1.5, channels_last=False):
    """torchmetrics-style: one depthwise conv2d with the (k, k) Gaussian window over the 5C stacked maps."""

    def filt(m):
        g = gaussian_window(window_size, sigma, dtype=m.dtype, device=m.device)
        win = (g[:, None] * g[None, :]).expand(m.shape[1], 1, window_size, window_size)
        if channels_last:
            m = m.contiguous(memory_format=torch.channels_last)
        return F.conv2d(m, win, groups=m.shape[1])

    return _stacked_ssim(x, y, filt)


def separable_conv_ssim(x, y, *, window_size=WINDOW, sigma=1.5):
    """The 5C stacked maps filtered by a (1, k) then a (k, 1) depthwise conv2d (autograd backward)."""

    def filt(m):
        g = gaussian_window(window_size, sigma, dtype=m.dtype, device=m.device)
        n = m.shape[1]
        m = F.conv2d(m, g.view(1, 1, 1, -1).expand(n, 1, 1, window_size), groups=n)
        return F.conv2d(m, g.view(1, 1, -1, 1).expand(n, 1, window_size, 1), groups=n)

    return _stacked_ssim(x, y, filt)


def shapes(device: torch.device, quick: bool):
    if device.type != "cuda":
        return [(2, 3, 64, 64)] if quick else [(4, 3, 128, 128), (16, 3, 256, 256)]
    return [(16, 3, 256, 256)] if quick else [(16, 3, 256, 256), (64, 3, 512, 512)]


@register(op="ssim", description="SSIM per (image, channel): fused Triton pass vs five conv2d (fwd, fwd+bwd)")
def ssim_cases(device: torch.device, quick: bool):
    dtypes = [torch.float32] if quick and device.type != "cuda" else [torch.float32, torch.bfloat16]
    for shape in shapes(device, quick):
        for dtype in dtypes:
            for mode in ("fwd", "fwd+bwd"):
                yield make_case(device, shape, dtype, mode)


def make_case(device, shape, dtype, mode):
    torch.manual_seed(0)
    b, c, h, w = shape
    x = torch.rand(shape, device=device).to(dtype)
    y = (x.float() + 0.1 * torch.randn(shape, device=device)).clamp(0, 1).to(dtype)
    npix = (h - WINDOW + 1) * (w - WINDOW + 1)

    def run(fn):
        if mode == "fwd":
            return lambda: fn(x, y)

        def fwd_bwd():
            xg, yg = x.detach().requires_grad_(), y.detach().requires_grad_()
            (fn(xg, yg)[..., 0].sum() * npix).backward()
            return xg.grad, yg.grad

        return fwd_bwd

    impls = [Impl("reference", run(ssim_ref), baseline=True)]
    if device.type == "cpu":
        impls += [
            Impl("grouped conv2d", run(grouped_conv2d_ssim), baseline=True),
            Impl(
                "grouped conv2d CL",
                run(lambda a, b: grouped_conv2d_ssim(a, b, channels_last=True)),
                baseline=True,
            ),
            Impl("separable conv", run(separable_conv_ssim), baseline=True),
        ]
    call = Call(device, dtype, {"window_size": WINDOW, "pixels": h * w})
    impls += backend_impls("ssim", call, lambda _backend: run(ssim_stats))
    elems = x.numel() * x.element_size()
    nbytes = 2 * elems if mode == "fwd" else 6 * elems
    if mode == "fwd":
        atol, rtol = 2e-6, 1e-5
    else:  # gradients: the analytic formula vs autograd through the convs, rounded to the input dtype
        atol, rtol = (1e-3, 1e-3) if dtype == torch.float32 else (3e-2, 2e-2)
    params = {"batch": b, "channels": c, "H": h, "W": w, "window": WINDOW, "dtype": DTYPE_NAMES[dtype],
              "mode": mode, "byte_rule": "fwd: x, y read; fwd+bwd: x, y read twice, dx, dy written"}  # fmt: skip
    name = f"{mode} B{b} C{c} {h}x{w} {DTYPE_NAMES[dtype]}"
    return Case(name, impls, bytes=nbytes, params=params, atol=atol, rtol=rtol)


if __name__ == "__main__":
    raise SystemExit(main(only=["ssim"]))

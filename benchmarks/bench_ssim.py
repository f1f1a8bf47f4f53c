"""Benchmark: SSIM of two image batches, the fused Triton kernel against the plain conv2d formulation.

* ``reference`` (the correctness oracle): :func:`fastgen.ops.ssim.ssim_ref`, five depthwise ``conv2d``
  calls with the 11x11 Gaussian window and the SSIM map in elementwise PyTorch (five full-size filtered
  maps plus the map temporaries), autograd for the backward.
* ``fastgen[<backend>]``: :func:`fastgen.ops.ssim.ssim_stats` through dispatch: on CUDA the one-pass Triton
  kernel (separable filtering in tiles, per-tile sums, no full-size intermediates); its backward is the
  analytic PyTorch formula (separable conv2d + conv_transpose2d) for every backend.

Every call returns the per-(image, channel) means of the SSIM and cs maps, (B, C, 2) float32. ``fwd+bwd``
returns the gradients of ``sum(ssim means) * (H-10)(W-10)`` (O(1) per pixel) in the input dtype.
Bytes counted (the unavoidable traffic): fwd reads x and y; fwd+bwd reads x, y twice and writes dx, dy.
"""

from __future__ import annotations

import torch

from fastgen._backend import Call
from fastgen.bench import Case, Impl, backend_impls, main, register
from fastgen.ops.ssim import ssim_ref, ssim_stats

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
WINDOW = 11


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

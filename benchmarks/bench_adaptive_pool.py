"""Benchmark: adaptive grid pooling (fastgen.ops.adaptive_pool) against ``F.adaptive_avg_pool2d``.

* ``reference`` (the baseline and oracle): ``F.adaptive_avg_pool2d`` / ``adaptive_max_pool2d`` on the
  (B, C, H, W) view, autograd for the backward. For the token-grid cases the reference is what a model
  writes without fastgen: permute the (B, H * W, C) tokens to (B, C, H, W), pool, permute back, reshape.
* ``fastgen[<backend>]``: :func:`adaptive_grid_pool` / :func:`adaptive_grid_pool_tokens` through dispatch
  (on CUDA the Triton gather kernel; the torch backend is torch's own kernel, so on CPU the ratio shows
  only the dispatch overhead).

Cases are the model-facing ones: a 24x24 grid pooled to the trained 16x16 (non-divisible, overlapping
bins), 12x12 up to 16x16, and an NCHW feature map. Bytes counted: input read once, output written once
(fwd); fwd+bwd adds the gradient read and dx written.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastgen._backend import Call
from fastgen.bench import Case, Impl, backend_impls, main, register
from fastgen.ops.adaptive_pool import _call, adaptive_grid_pool, adaptive_grid_pool_tokens

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def shapes(device: torch.device, quick: bool):
    """(layout, B, C, (H, W), (h, w))."""
    if device.type != "cuda":
        base = [("tokens", 8, 192, (24, 24), (16, 16)), ("nchw", 8, 64, (28, 28), (7, 7))]
        return base[:1] if quick else [*base, ("tokens", 8, 192, (12, 12), (16, 16))]
    base = [("tokens", 64, 768, (24, 24), (16, 16)), ("nchw", 64, 256, (56, 56), (7, 7))]
    return (
        base
        if quick
        else [*base, ("tokens", 64, 768, (12, 12), (16, 16)), ("nchw", 32, 2048, (19, 19), (7, 7))]
    )


@register(
    op="adaptive_pool",
    description="adaptive avg pooling of token grids / feature maps vs F.adaptive_avg_pool2d",
)
def adaptive_pool_cases(device: torch.device, quick: bool):
    dtypes = [torch.float32] if device.type != "cuda" else [torch.float32, torch.bfloat16]
    for layout, b, c, hw, out in shapes(device, quick):
        for dtype in dtypes:
            for mode in ("fwd", "fwd+bwd"):
                yield make_case(device, layout, b, c, hw, out, dtype, mode)


def make_case(device, layout, b, c, hw, out, dtype, mode):
    torch.manual_seed(0)
    (h, w), (oh, ow) = hw, out
    if layout == "tokens":
        x = torch.randn(b, h * w, c, device=device).to(dtype)

        def ref(t):
            img = t.transpose(1, 2).reshape(b, c, h, w)
            return F.adaptive_avg_pool2d(img, out).flatten(2).transpose(1, 2).contiguous()

        def ours(t):
            return adaptive_grid_pool_tokens(t, hw, out)

        view = x.view(b, h, w, c).permute(0, 3, 1, 2)
    else:
        x = torch.randn(b, c, h, w, device=device).to(dtype)

        def ref(t):
            return F.adaptive_avg_pool2d(t, out)

        def ours(t):
            return adaptive_grid_pool(t, out)

        view = x

    def run(fn):
        if mode == "fwd":
            return lambda: fn(x)

        def fwd_bwd():
            xg = x.detach().requires_grad_()
            fn(xg).sum().backward()
            return xg.grad

        return fwd_bwd

    impls = [Impl("reference", run(ref), baseline=True)]
    call: Call = _call(view, h, w, oh, ow)
    impls += backend_impls("adaptive_pool", call, lambda _backend: run(ours))
    esz = x.element_size()
    n_in, n_out = b * c * h * w * esz, b * c * oh * ow * esz
    nbytes = n_in + n_out if mode == "fwd" else 2 * (n_in + n_out)
    atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 2e-2)
    params = {"layout": layout, "batch": b, "channels": c, "H": h, "W": w, "h": oh, "w": ow,
              "dtype": DTYPE_NAMES[dtype], "mode": mode}  # fmt: skip
    name = f"{mode} {layout} B{b} C{c} {h}x{w}->{oh}x{ow} {DTYPE_NAMES[dtype]}"
    return Case(name, impls, bytes=nbytes, params=params, atol=atol, rtol=rtol)


if __name__ == "__main__":
    raise SystemExit(main(only=["adaptive_pool"]))

"""Shared helpers of the fastgen.diffusers tests: a deterministic stand-in model and a sampling loop."""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

SHAPE = (2, 3, 8, 8)


def fake_model(x: torch.Tensor, t, channels_out: int | None = None, scale: float = 1.0) -> torch.Tensor:
    """A smooth, fixed function of (x, t) standing in for a UNet: (B, C, H, W) -> (B, C_out, H, W)."""
    c = x.shape[1]
    c_out = channels_out or c
    g = torch.Generator().manual_seed(1234)
    w = torch.randn(c_out, c, generator=g) / c**0.5
    bias = torch.randn(1, c_out, *x.shape[2:], generator=g) * 0.3
    tt = float(t) / 1000.0
    h = torch.einsum("oc,bc...->bo...", w, x.float())
    out = torch.tanh(h + bias * (1.0 + tt)) * scale
    return out.to(x.dtype)


def sample_loop(sched, steps: int, *, seed: int = 0, shape=SHAPE, step_kwargs=None, channels_out=None, scale=1.0,
                set_kwargs=None, return_x0: bool = False):  # fmt: skip
    """Runs a whole sampling loop as a diffusers pipeline does; returns the final sample (and every x0)."""
    sched.set_timesteps(steps, **(set_kwargs or {}))
    g = torch.Generator().manual_seed(seed)
    x = randn_tensor(shape, generator=g) * sched.init_noise_sigma
    x0s = []
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t)
        out = fake_model(inp, t, channels_out, scale)
        res = sched.step(out, t, x, generator=g, **(step_kwargs or {}))
        x = res.prev_sample
        if return_x0 and getattr(res, "pred_original_sample", None) is not None:
            x0s.append(res.pred_original_sample)
    return (x, x0s) if return_x0 else x


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (NaN-aware: NaN where exactly one side is NaN)."""
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    na, nb = a.isnan(), b.isnan()
    if not torch.equal(na, nb):
        return float("nan")
    a, b = a[~na].double(), b[~nb].double()
    if a.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))

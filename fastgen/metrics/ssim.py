r"""SSIM, MS-SSIM and PSNR for image batches ``(B, C, H, W)``.

SSIM follows Wang et al. 2004 ("Image quality assessment: from error visibility to structural
similarity"): an 11x11 Gaussian window (sigma 1.5, separable), 'valid' filtering (no padding),
``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` with ``L = data_range``; per channel, then averaged over channels.
It equals ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=L, channel_axis=0)``. The per-channel means come from the fused
op :func:`fastgen.ops.ssim.ssim_stats` (Triton on CUDA, conv2d elsewhere), differentiable (SSIM as a loss:
``1 - ssim(x, y)``).

MS-SSIM follows Wang, Simoncelli, Bovik 2003 ("Multi-scale structural similarity for image quality
assessment"): at scales j = 1..M (each a 2x2 average pool of the previous, floor sizes)::

    ms_ssim = prod_{j < M} relu(cs_j) ** w_j * relu(ssim_M) ** w_M          (per image and channel)

with the standard weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333), then averaged over channels. The
relu keeps the fractional powers real for anti-correlated images (as pytorch-msssim does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastgen._checks import is_finite_real
from fastgen.ops.ssim import check_ssim_args, ssim_stats

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _check_reduction(reduction: str, fn: str) -> None:
    if reduction not in ("mean", "none"):
        raise ValueError(f"fastgen.{fn}: reduction must be 'mean' or 'none', got {reduction!r}")


def _reduce(per_image: torch.Tensor, reduction: str) -> torch.Tensor:
    return per_image.mean() if reduction == "mean" else per_image


def ssim(
    img1: torch.Tensor,
    img2: torch.Tensor,
    *,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    reduction: str = "mean",
) -> torch.Tensor:
    """SSIM of two image batches ``(B, C, H, W)`` (H, W >= window_size), in [-1, 1] (1: identical).

    ``reduction="mean"``: a scalar (mean over images); ``"none"``: ``(B,)``, one value per image (mean
    over its channels). float32 for fp16 / bf16 / fp32 inputs, float64 for float64. Differentiable.
    """
    _check_reduction(reduction, "ssim")
    stats = ssim_stats(img1, img2, data_range=data_range, window_size=window_size, sigma=sigma, k1=k1, k2=k2)
    return _reduce(stats[..., 0].mean(1), reduction)


def ms_ssim(
    img1: torch.Tensor,
    img2: torch.Tensor,
    *,
    data_range: float = 1.0,
    weights: tuple[float, ...] | list[float] | torch.Tensor | None = None,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    reduction: str = "mean",
) -> torch.Tensor:
    """Multi-scale SSIM of ``(B, C, H, W)`` batches (formula in the module docstring).

    ``weights``: one per scale (default: the 5 standard weights). The coarsest scale must still hold the
    window: ``min(H, W) // 2 ** (len(weights) - 1) >= window_size`` (176 pixels for the defaults).
    Returns a scalar (``"mean"``) or ``(B,)`` (``"none"``). Differentiable.
    """
    _check_reduction(reduction, "ms_ssim")
    check_ssim_args(img1, img2, data_range, window_size, sigma, k1, k2)
    w = torch.as_tensor(MS_SSIM_WEIGHTS if weights is None else weights, dtype=torch.float64)
    if w.dim() != 1 or w.numel() < 1:
        raise ValueError(
            f"fastgen.ms_ssim: weights must be a non-empty 1-D sequence, got shape {tuple(w.shape)}"
        )
    # a NaN weight is a NaN score; a negative one turns relu's 0 into inf
    if not bool((torch.isfinite(w) & (w >= 0)).all()):
        raise ValueError(f"fastgen.ms_ssim: weights must be finite and >= 0, got {w.tolist()}")
    scales = w.numel()
    small = min(img1.shape[-2:]) // 2 ** (scales - 1)
    if small < window_size:
        need = window_size * 2 ** (scales - 1)
        raise ValueError(
            f"fastgen.ms_ssim: images of {img1.shape[-2]}x{img1.shape[-1]} pixels are too small for "
            f"{scales} scales with a {window_size}x{window_size} window (need min(H, W) >= {need})"
        )
    x, y = img1, img2
    out = None
    for j in range(scales):
        if j > 0:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        st = ssim_stats(x, y, data_range=data_range, window_size=window_size, sigma=sigma, k1=k1, k2=k2)
        val = st[..., 0] if j == scales - 1 else st[..., 1]
        term = torch.relu(val) ** float(w[j])
        out = term if out is None else out * term
    return _reduce(out.mean(1), reduction)


def psnr(
    img1: torch.Tensor, img2: torch.Tensor, *, data_range: float = 1.0, reduction: str = "mean"
) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image: ``10 log10(L^2 / mean((img1 - img2)^2))``.

    img1, img2: ``(B, C, H, W)`` (any ``(B, ...)`` works), same shape. Identical images give ``inf``.
    ``"mean"``: the mean over images of the per-image PSNR; ``"none"``: ``(B,)``. float32 (float64 for
    float64 inputs).
    """
    for name, t in (("img1", img1), ("img2", img2)):
        if not isinstance(t, torch.Tensor) or t.dim() < 2:
            raise ValueError(
                f"fastgen.psnr: {name} must be a (B, ...) tensor, got {getattr(t, 'shape', t)!r}"
            )
    if img1.shape != img2.shape:
        raise ValueError(
            f"fastgen.psnr: img1 and img2 must have the same shape, got {tuple(img1.shape)} and {tuple(img2.shape)}"
        )
    if not (is_finite_real(data_range) and data_range > 0):
        raise ValueError(f"fastgen.psnr: data_range must be a positive finite number, got {data_range!r}")
    _check_reduction(reduction, "psnr")
    dt = torch.float64 if img1.dtype == torch.float64 else torch.float32
    mse = (img1.to(dt) - img2.to(dt)).pow(2).flatten(1).mean(1)
    return _reduce(10.0 * torch.log10(data_range**2 / mse), reduction)

"""``AdaptiveGridPool``: adaptive average / max pooling of an image or token grid to a fixed grid."""

from __future__ import annotations

import torch
from torch import nn

from fastgen.ops.adaptive_pool import MODES, adaptive_grid_pool, adaptive_grid_pool_tokens


class AdaptiveGridPool(nn.Module):
    """Pool any ``H x W`` grid to ``output_size`` (area-weighted mean, or max), forward and backward.

    A drop-in for ``nn.AdaptiveAvgPool2d(output_size)`` (``mode="avg"``) and ``nn.AdaptiveMaxPool2d``
    (``mode="max"``) on ``(B, C, H, W)`` / ``(C, H, W)``; with ``grid=(H, W)`` it pools a row-major token
    grid ``(B, H * W, C)`` to ``(B, h * w, C)`` without a permute copy. No parameters.
    """

    def __init__(self, output_size, mode: str = "avg"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"fastgen.nn.AdaptiveGridPool: mode must be one of {MODES}, got {mode!r}")
        self.output_size = output_size
        self.mode = mode

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        if grid is not None:
            return adaptive_grid_pool_tokens(x, grid, self.output_size, self.mode)
        return adaptive_grid_pool(x, self.output_size, self.mode)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, mode={self.mode!r}"

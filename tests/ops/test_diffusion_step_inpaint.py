"""Inpainting (known-region x0 replacement) and CLIP-guided mean shift in the fused diffusion step."""

import pytest
import torch

from fastgen import _ext
from fastgen.ops import diffusion_step as D

needs_cpp = pytest.mark.skipif(_ext.C is None, reason="fastgen._C not built")


@needs_cpp
def test_cpp_entry_passes_a_nan_threshold_and_refuses_non_positive_ones():
    """The C++ entry lets a NaN threshold through (that sample becomes NaN) and refuses <= 0 ones."""
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g)
    coeffs = torch.zeros(D.NUM_COEFFS)
    coeffs[D.AX], coeffs[D.AM], coeffs[D.CX0] = 1.0, 1.0, 1.0  # x' = x0 = x + m, thresholded
    args = (x, cond, None, 0, coeffs, None, None, None)
    tail = (1.0, 0.0, 0, 0, 0, 0, True, False)
    out, x0 = _ext.C.sampler_step_cpu(*args, torch.tensor([float("nan"), 2.0]), *tail)
    assert out[0].isnan().all() and x0[0].isnan().all()
    want = (x[1] + cond[1]).clamp(-2, 2) / 2
    torch.testing.assert_close(out[1], want)
    for bad in (0.0, -1.0, float("-inf")):
        with pytest.raises(RuntimeError, match="thresh must be > 0"):
            _ext.C.sampler_step_cpu(*args, torch.tensor([bad, 2.0]), *tail)

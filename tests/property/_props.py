"""Shared pieces of the property layer: random tensors in random layouts, the numerics gate, and the
check that bad input raises a ValueError / TypeError naming the offending argument."""

import contextlib
import math
import re

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st

from fastgen import _ext

HAS_CPP = _ext.C is not None
ERRORS = (ValueError, TypeError)
# atol of the numerics gate, relative to max(1, max |reference|)
ATOL = {torch.float64: 1e-12, torch.float32: 4e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# contiguous; transposed (last two dims); strided (every other element of the last dim); offset (a view
# into a bigger buffer, non-zero storage offset); expanded (stride 0 along dim 0, read-only arguments only)
LAYOUTS = ("contiguous", "transposed", "strided", "offset")
READ_ONLY_LAYOUTS = (*LAYOUTS, "expanded")

seeds = st.integers(0, 2**31 - 1)


def scaled(factor: float) -> settings:
    """Settings with ``factor`` times the profile's examples (for the cheap, wide valid-input properties)."""
    return settings(max_examples=max(1, int(factor * settings.default.max_examples)))


def describe(v) -> str:
    """A short description of a tensor: shape, dtype, strides, storage offset (failure reports stay readable)."""
    if isinstance(v, torch.Tensor):
        dt = str(v.dtype).replace("torch.", "")
        return f"<{tuple(v.shape)} {dt} strides={v.stride()} offset={v.storage_offset()} {v.device.type}>"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k!r}: {describe(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(describe(x) for x in v) + ")"
    return repr(v)


class Case:
    """A drawn case: unpacks like a tuple, prints its tensors as shape / dtype / layout."""

    def __init__(self, *items):
        self.items = items

    def __iter__(self):
        return iter(self.items)

    def __repr__(self) -> str:
        return "Case" + describe(self.items)


def backends(*names: str) -> list[str]:
    """``names`` minus the cpp backend when the extension is not built."""
    return [b for b in names if b != "cpp" or HAS_CPP]


def make(shape, dtype, layout="contiguous", gen=None, scale=1.0) -> torch.Tensor:
    """scale * N(0, 1) values of ``shape`` and ``dtype`` on the CPU, laid out as ``layout``."""
    shape = tuple(int(s) for s in shape)

    def randn(s):
        return (torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(dtype)

    n = math.prod(shape)
    if layout == "transposed" and len(shape) >= 2:
        return randn((*shape[:-2], shape[-1], shape[-2])).transpose(-1, -2)
    if layout == "strided" and len(shape) >= 1:
        return randn((*shape[:-1], 2 * shape[-1]))[..., ::2]
    if layout == "offset":
        return randn((n + 7,))[5 : 5 + n].view(shape)
    if layout == "expanded" and len(shape) >= 1:
        return randn((1, *shape[1:])).expand(shape)
    return randn(shape)


def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of ``t`` in ``layout`` (expanded: only when dim 0 has one distinct row)."""
    out = make(t.shape, t.dtype, layout if layout != "expanded" else "contiguous")
    with torch.no_grad():
        out.copy_(t)
    return out


def assert_2x(
    got: torch.Tensor, ref64: torch.Tensor, same: torch.Tensor, dtype: torch.dtype, what: str
) -> None:
    """The numerics gate: max |got - ref64| <= 2 max |same - ref64| + atol, where ``same`` is the plain
    PyTorch computation in the inputs' dtype; NaN / inf exactly where the float64 reference has them."""
    assert tuple(got.shape) == tuple(ref64.shape), f"{what}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    g, r, s = got.detach().double(), ref64.detach().double(), same.detach().double()
    fin = torch.isfinite(r)
    assert torch.equal(torch.isfinite(g), fin), f"{what}: non-finite values where the reference is finite"
    if not fin.all():
        assert torch.equal(g[~fin].isnan(), r[~fin].isnan()), (
            f"{what}: NaN pattern differs from the reference"
        )
    if not fin.any():
        return
    scale = max(1.0, r[fin].abs().max().item())
    err = (g[fin] - r[fin]).abs().max().item()
    base = (s[fin] - r[fin]).abs().max().item() if torch.isfinite(s[fin]).all() else 0.0
    atol = ATOL[dtype] * scale
    assert err <= 2 * base + atol, f"{what}: error {err:.3e} > 2 x torch's {base:.3e} + {atol:.1e}"


def _names_re(names) -> re.Pattern:
    return re.compile("|".join(rf"(?<![\w.]){re.escape(n)}(?!\w)" for n in names))


@contextlib.contextmanager
def raises_naming(*names: str):
    """The block must raise ValueError / TypeError (any other exception propagates and fails the test)
    whose message names one of ``names`` as a word."""
    with pytest.raises(ERRORS) as info:
        yield info
    msg = str(info.value)
    assert _names_re(names).search(msg), (
        f"{type(info.value).__name__} does not name {' / '.join(names)}: {msg}"
    )

"""vq_nearest edge cases: an oracle exact on ties on every CPU, extreme magnitudes (no float32 overflow in
the expanded form), on every backend available here."""

import pytest
import torch

import fastgen
from fastgen import _ext
from fastgen.ops import vq as V

BACKENDS = ["torch", "triton"] + (["cpp"] if _ext.C is not None else [])


def run(backend, x, c, **kw):
    with fastgen.use_backend(backend, op="vq_nearest"):
        return V.vq_nearest(x, c, **kw)


@pytest.mark.parametrize("distance", V.DISTANCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_ref_exact_ties_lowest_index(distance, dtype):
    # every code appears 8 times (k and k + 8j): identical columns at every offset of a BLAS block, so the
    # expanded-form matmul would round some copies differently; the direct form must not
    base = torch.randn(8, 37, dtype=torch.float64)
    c = base.repeat(8, 1).to(dtype)
    x = torch.cat([base[torch.randint(0, 8, (24,))], torch.randn(40, 37, dtype=torch.float64)]).to(dtype)
    ref = V.vq_nearest_ref(x, c, distance=distance)
    assert (ref.indices < 8).all(), f"a tie went to a higher copy: {ref.indices.tolist()}"
    want = V.vq_nearest_ref(x, base.to(dtype), distance=distance)
    assert torch.equal(ref.indices, want.indices) and torch.equal(ref.dist, want.dist)
    if distance == "l2":
        assert (ref.dist[:24] == 0).all()

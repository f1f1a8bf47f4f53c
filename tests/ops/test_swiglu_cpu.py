"""fastgen._C's fused SwiGLU (csrc/swiglu: the CPU activation of grouped_mm / the MoE expert FFN) on every
SIMD path this machine runs (FASTGEN_CPU_ISA=scalar|avx2|avx512).

Oracle: the same formulas in float64 on the same float32 inputs. The kernel rounds each step in float32
(torch's silu / silu_backward formulas), with an exp within 1 ulp, so each output is within a few ulp of
the float64 value scaled by the magnitude of the terms it adds (the backward's 1 + g (1 - s) cancels near
g = -1.28 and 1 - s loses s's rounding for large g: the bound is taken on 1 + |g (1 - s)| + 2 |g|, not on
the result). NaN and +-inf land where torch's
own silu / silu_backward put them; -0 / +0 are not distinguished. Results may differ between paths (FMA in
the exp on AVX2 / AVX-512), never beyond that bound.
"""

from __future__ import annotations

import pytest
import torch

from fastgen import _ext
from fastgen.ops import grouped_mm as G

C = _ext.C
if C is None or not hasattr(C, "swiglu_fwd_cpu"):
    pytest.skip("fastgen._C (with swiglu) is not built", allow_module_level=True)

RANK = {"scalar": 0, "avx2": 1, "avx512": 2}
PATHS = [p for p in RANK if RANK[p] <= RANK[C.cpu_isa_best()]]
EPS = 2.0**-24  # float32 unit roundoff


SPECIAL = [float("nan"), float("inf"), -float("inf"), -200.0, -104.0, -88.0, -20.0, -1.2784645, -1e-30, -0.0,
           0.0, 1e-30, 1e-6, 0.5, 20.0, 88.0, 89.0, 104.0, 200.0]  # fmt: skip


def make(rows: int, f: int, seed: int = 0, row_pad: int = 0):
    """h (rows, 2F) with special values in its gates, as a row-strided view when row_pad > 0; dout."""
    g = torch.Generator().manual_seed(seed)
    hbuf = torch.randn(rows, 2 * f + row_pad, generator=g) * 6
    h = hbuf[:, : 2 * f]
    for i, v in enumerate(SPECIAL[: rows * f]):  # each special gate value somewhere, in several rows
        h[i % rows, (i // rows) % f] = v
    dout = torch.randn(rows, f, generator=g)
    return h, dout


def oracle(h: torch.Tensor, dout: torch.Tensor):
    """float64 forms and the magnitudes of their terms (for the error bound)."""
    f = dout.shape[1]
    g, u, dy = h[:, :f].double(), h[:, f:].double(), dout.double()
    s = torch.sigmoid(g)
    silu = g * s
    out = silu * u
    inner = 1 + g * (1 - s)
    dg = dy * u * s * inner
    du = silu * dy
    # s rounded to float32 carries an absolute error ~eps that 1 - s keeps and g multiplies: + 2 |g|
    dg_mag = (dy * u * s).abs() * (1 + (g * (1 - s)).abs() + 2 * g.abs())
    return out, du, dg, out.abs(), du.abs(), dg_mag


def torch_forms(h: torch.Tensor, dout: torch.Tensor):
    f = dout.shape[1]
    g, u = h[:, :f], h[:, f:]
    return (
        torch.nn.functional.silu(g) * u,
        torch.ops.aten.silu_backward(dout * u, g),
        torch.nn.functional.silu(g) * dout,
    )


def assert_within(
    got: torch.Tensor, want: torch.Tensor, mag: torch.Tensor, ref32: torch.Tensor, what: str, ulps=8
):
    # special values where torch's float32 forms put them
    assert torch.equal(torch.isnan(got), torch.isnan(ref32)), f"{what}: NaN positions differ from torch"
    assert torch.equal(torch.isinf(got), torch.isinf(ref32)), f"{what}: inf positions differ from torch"
    fin = torch.isfinite(got)
    assert torch.equal(got[torch.isinf(got)], ref32[torch.isinf(ref32)]), f"{what}: inf signs"
    err = (got[fin].double() - want[fin]).abs()
    # + an absolute 1e-28: where e^-g overflows float32 (g < -88.7) the float32 forms (torch's too) give 0
    # for a true value below |g| e^-88.7 times the other factors (O(1) to O(100) here)
    bound = ulps * EPS * mag[fin] + 1e-28
    worst = (err - bound).max().item() if err.numel() else -1.0
    assert worst <= 0, f"{what}: error {err.max().item():.3g} over the bound"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows,f,row_pad", [(1, 1, 0), (3, 19, 0), (64, 256, 0), (5, 33, 7), (0, 8, 0)])
def test_swiglu_fused_matches_the_formulas(path, rows, f, row_pad, monkeypatch):
    h, dout = make(rows, f, row_pad=row_pad)
    out = torch.full((rows, f), float("nan"))
    dh = torch.full((rows, 2 * f), float("nan"))
    monkeypatch.setenv("FASTGEN_CPU_ISA", path)  # read by the kernel at every call
    assert C.cpu_isa() == path
    C.swiglu_fwd_cpu(h, out)
    C.swiglu_bwd_cpu(dout, h, dh)
    want_out, want_du, want_dg, m_out, m_du, m_dg = oracle(h, dout)
    t_out, t_dg, t_du = torch_forms(h, dout)
    assert_within(out, want_out, m_out, t_out, "out")
    assert_within(dh[:, :f], want_dg, m_dg, t_dg, "dgate")
    assert_within(dh[:, f:], want_du, m_du, t_du, "dup")


def test_swiglu_fused_threads_split_rows_only():
    """Rows split over threads: the same bits at 1 and 2 threads."""
    h, dout = make(300, 128, seed=3)
    res = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            out, dh = torch.empty(300, 128), torch.empty(300, 256)
            C.swiglu_fwd_cpu(h, out)
            C.swiglu_bwd_cpu(dout, h, dh)
            res.append((out, dh))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(res[0], res[1], strict=True):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


@pytest.mark.parametrize(
    "call,msg",
    [
        (lambda: C.swiglu_fwd_cpu(torch.ones(4, 7), torch.empty(4, 3)), r"h must be \(R, 2F\)"),
        (
            lambda: C.swiglu_fwd_cpu(torch.ones(4, 8), torch.empty(4, 3)),
            r"out has shape \[4, 3\], expected \(4, 4\)",
        ),
        (lambda: C.swiglu_fwd_cpu(torch.ones(4, 8).double(), torch.empty(4, 4)), "h must be a 2-D float32"),
        (lambda: C.swiglu_fwd_cpu(torch.ones(8, 4).t(), torch.empty(4, 4)), "h needs unit column stride"),
        (lambda: C.swiglu_bwd_cpu(torch.ones(4, 3), torch.ones(4, 8), torch.empty(4, 8)), "dout has shape"),
    ],
)
def test_swiglu_fused_bad_arguments(call, msg):
    with pytest.raises(RuntimeError, match=msg):
        call()


def test_swiglu_fused_refuses_overlap():
    h, dout = torch.randn(4, 8), torch.randn(4, 4)
    with pytest.raises(RuntimeError, match="out must not overlap h"):
        C.swiglu_fwd_cpu(h, h[:, :4])  # in place over the gates
    with pytest.raises(RuntimeError, match="out must not overlap h"):
        C.swiglu_fwd_cpu(h[1:], h[:3, 4:])  # the up half of the rows before
    with pytest.raises(RuntimeError, match="dh must not overlap h"):
        C.swiglu_bwd_cpu(dout, h, h)
    dh = torch.empty(4, 8)
    with pytest.raises(RuntimeError, match="dh must not overlap dout"):
        C.swiglu_bwd_cpu(dh[:, :4], h, dh)
    C.swiglu_fwd_cpu(h, torch.empty(4, 4))  # separate buffers pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_swiglu_uses_the_fused_kernel_for_float32_only(dtype, record_calls):
    """grouped_mm's swiglu calls the fused kernel for float32 CPU tensors (values against the reference), and
    torch's ops otherwise."""
    calls = record_calls(G, "_SWIGLU_FWD", "_SWIGLU_BWD")
    x = torch.randn(40, 16, dtype=dtype, requires_grad=True)
    w = (torch.randn(3, 16, 24) * 0.3).to(dtype).requires_grad_()
    offsets = torch.tensor([0, 10, 10, 40])
    y = G.grouped_mm(x, w, offsets, activation="swiglu")
    y.backward(torch.ones_like(y))
    ref_x, ref_w = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = G.grouped_mm_ref(ref_x, ref_w, offsets, activation="swiglu")
    ref.backward(torch.ones_like(ref))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(x.grad.double(), ref_x.grad, atol=tol * 4, rtol=tol)
    torch.testing.assert_close(w.grad.double(), ref_w.grad, atol=tol * 4, rtol=tol)
    assert ("_SWIGLU_FWD" in calls and "_SWIGLU_BWD" in calls) == (dtype == torch.float32)

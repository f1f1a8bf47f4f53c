"""fastgen._C's grouped GEMMs for many small experts (csrc/grouped_gemm; grouped_mm's CPU path with more
than 16 experts with rows): the same GEMMs as a loop of torch.mm on the same views, spread over the threads.

Oracles: inputs that are multiples of 1/8 with small integer parts, so every product and sum is exact in
float32 (and in any summation order): the results must equal a float64 loop bit for bit, on any BLAS path
and at any thread count. Then grouped_mm itself (values and gradients, bias, empty experts) against the
float64 reference.
"""

from __future__ import annotations

import pytest
import torch

from fastgen import _ext
from fastgen.ops import grouped_mm as G

C = _ext.C
if C is None or not hasattr(C, "grouped_rows_cpu"):
    pytest.skip("fastgen._C (with grouped_gemm) is not built", allow_module_level=True)


def exact(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 9, shape, generator=g).float() / 8


def offsets_of(sizes):
    off = [0]
    for s in sizes:
        off.append(off[-1] + s)
    return off


SIZES = [0, 3, 40, 0, 1, 17, 64, 0, 5, 33, 2, 0, 8, 100, 1, 1, 4, 9, 12, 0, 30]  # 21 experts, 15 with rows


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_rows_and_wgrad_exact(threads, bias):
    off = offsets_of(SIZES)
    e, r, k, n = len(SIZES), off[-1] + 6, 24, 72
    lo = 2  # rows before the first expert and after the last are left alone
    off = [o + lo for o in off]
    x, w, dh = exact(r, k, seed=1), exact(e, k, n, seed=2), exact(r, n, seed=3)
    b = exact(e, n, seed=4) if bias else None
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = torch.full((r, n), 7.0)
        C.grouped_rows_cpu(x, w, b, off, out)
        dx = torch.full((r, k), 7.0)
        C.grouped_rows_cpu(dh, w.transpose(1, 2), None, off, dx)  # a transposed view of w
        dw, db = torch.full((e, k, n), 7.0), torch.full((e, n), 7.0)
        C.grouped_wgrad_cpu(x, dh, off, dw, db)
    finally:
        torch.set_num_threads(old)
    want_out, want_dx = (
        torch.full((r, n), 7.0, dtype=torch.float64),
        torch.full((r, k), 7.0, dtype=torch.float64),
    )
    want_dw, want_db = torch.zeros(e, k, n, dtype=torch.float64), torch.zeros(e, n, dtype=torch.float64)
    for i in range(e):
        a, z = off[i], off[i + 1]
        want_out[a:z] = x[a:z].double() @ w[i].double() + (b[i].double() if bias else 0)
        want_dx[a:z] = dh[a:z].double() @ w[i].double().t()
        want_dw[i] = x[a:z].double().t() @ dh[a:z].double()
        want_db[i] = dh[a:z].double().sum(0)
    assert torch.equal(out.double(), want_out)
    assert torch.equal(dx.double(), want_dx)
    assert torch.equal(dw.double(), want_dw)
    assert torch.equal(db.double(), want_db)


@pytest.mark.parametrize(
    "call,msg",
    [
        (lambda: C.grouped_rows_cpu(torch.ones(4, 3), torch.ones(2, 3, 5), None, [0, 2], torch.empty(4, 5)),
         r"off must hold E \+ 1 = 3 offsets, got 2"),
        (lambda: C.grouped_rows_cpu(torch.ones(4, 3), torch.ones(2, 3, 5), None, [0, 3, 2], torch.empty(4, 5)),
         r"off must be non-decreasing within \[0, 4\], got off\[2\] = 2"),
        (lambda: C.grouped_rows_cpu(torch.ones(4, 3), torch.ones(2, 3, 5), None, [0, 2, 5], torch.empty(4, 5)),
         r"got off\[2\] = 5"),
        (lambda: C.grouped_rows_cpu(torch.ones(4, 3), torch.ones(2, 4, 5), None, [0, 2, 4], torch.empty(4, 5)),
         "do not match"),
        (lambda: C.grouped_rows_cpu(torch.ones(4, 3), torch.ones(2, 3, 5).double(), None, [0, 2, 4],
                                    torch.empty(4, 5)), "b must be a 3-D CPU tensor of dtype Float"),
        (lambda: C.grouped_rows_cpu(torch.ones(4, 3), torch.ones(2, 3, 5), torch.ones(2, 4), [0, 2, 4],
                                    torch.empty(4, 5)), r"bias must be \(E, N\)"),
        (lambda: C.grouped_wgrad_cpu(torch.ones(4, 3), torch.ones(4, 5), [0, 2, 4], torch.empty(2, 3, 6)),
         "do not match"),
    ],
)  # fmt: skip
def test_grouped_gemm_bad_arguments(call, msg):
    with pytest.raises(RuntimeError, match=msg):
        call()


@pytest.mark.parametrize("act", [None, "gelu", "relu"])
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_mm_many_experts_uses_the_grouped_kernels(act, bias, record_calls):
    """More than 16 experts with rows: grouped_mm's forward and backward run on the grouped kernels, with the
    reference's values and gradients (float64 loop), empty experts included (zero dw / dbias)."""
    calls = record_calls(G, "_GROUPED_ROWS", "_GROUPED_WGRAD")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the grouped kernels serve calls on more than one thread
    try:
        _many_experts(act, bias, calls)
    finally:
        torch.set_num_threads(threads)
    torch.set_num_threads(1)  # one thread: torch._grouped_mm's path, the same values
    try:
        calls.clear()
        _many_experts(act, bias, calls, expect_grouped=False)
    finally:
        torch.set_num_threads(threads)


def _many_experts(act, bias, calls, expect_grouped=True):
    sizes = [*SIZES, 2, 3, 4]  # 18 experts with rows
    off = torch.tensor(offsets_of(sizes))
    e, k, n = len(sizes), 16, 32
    x = torch.randn(int(off[-1]), k, requires_grad=True)
    w = (torch.randn(e, k, n) * 0.3).requires_grad_()
    b = torch.randn(e, n, requires_grad=True) if bias else None
    y = G.grouped_mm(x, w, off, bias=b, activation=act)
    dy = torch.randn_like(y)
    y.backward(dy)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    br = b.detach().double().requires_grad_() if bias else None
    yr = G.grouped_mm_ref(xr, wr, off, bias=br, activation=act)
    yr.backward(dy.double())
    torch.testing.assert_close(y.double(), yr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad.double(), wr.grad, atol=1e-5, rtol=1e-5)
    assert torch.equal(w.grad[torch.tensor(sizes) == 0], torch.zeros_like(w.grad[torch.tensor(sizes) == 0]))
    if bias:
        torch.testing.assert_close(b.grad.double(), br.grad, atol=1e-5, rtol=1e-5)
    if not expect_grouped:
        assert calls == []
        return
    assert calls.count("_GROUPED_ROWS") == 2 and calls.count("_GROUPED_WGRAD") == 1
    with torch.no_grad():
        calls.clear()
        torch.testing.assert_close(G.grouped_mm(x, w, off, bias=b, activation=act), y.detach())
        assert calls == ["_GROUPED_ROWS"]


@pytest.mark.parametrize("act,tail", [("swiglu", 0), ("gelu", 5)])
def test_grouped_mm_many_experts_function_path(act, tail, record_calls):
    """Many experts through grouped_mm's own autograd Function (swiglu, or rows past the last expert): the
    forward, dx, dw and dbias on the grouped kernels, values and gradients as the float64 reference."""
    calls = record_calls(G, "_GROUPED_ROWS", "_GROUPED_WGRAD")
    sizes = [*SIZES, 2, 3, 4]
    off = torch.tensor(offsets_of(sizes))
    e, k, n = len(sizes), 16, 32
    x = torch.randn(int(off[-1]) + tail, k, requires_grad=True)
    w = (torch.randn(e, k, n) * 0.3).requires_grad_()
    b = torch.randn(e, n, requires_grad=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = G.grouped_mm(x, w, off, bias=b, activation=act)
        dy = torch.randn_like(y)
        y.backward(dy)
    finally:
        torch.set_num_threads(threads)
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    yr = G.grouped_mm_ref(xr, wr, off, bias=br, activation=act)
    yr.backward(dy.double())
    for got, want in ((y, yr), (x.grad, xr.grad), (w.grad, wr.grad), (b.grad, br.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert calls.count("_GROUPED_ROWS") == 2 and calls.count("_GROUPED_WGRAD") == 1

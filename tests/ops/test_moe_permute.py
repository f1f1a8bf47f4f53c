"""moe_route / moe_permute / moe_unpermute: every usable backend against the references (integer outputs
identical; values and gradients within 2x the same-dtype PyTorch error vs float64), poisoned outputs,
errors, opcheck and torch.compile."""

import pytest
import torch

from fastgen import _ext, use_backend
from fastgen._backend import BackendUnavailableError
from fastgen.ops.moe_permute import (
    Routing,
    moe_permute,
    moe_permute_ref,
    moe_route,
    moe_route_ref,
    moe_unpermute,
    moe_unpermute_ref,
)

pytestmark = pytest.mark.usefixtures("poison_empty")
HAS_CUDA = torch.cuda.is_available()


def _backends():
    out = ["torch"]
    if _ext.C is not None:
        out.append("cpp")
    return [*out, "triton"]


BACKENDS = _backends()


def route_loop(idx, num_experts, capacity=None, valid=None):
    """The priority rule spelled out: j-major, then token order; sequential counters."""
    t, k = idx.shape
    fill = [0] * num_experts
    counts = [0] * num_experts
    dest = [[-1] * k for _ in range(t)]
    for j in range(k):
        for i in range(t):
            if valid is not None and not valid[i, j]:
                continue
            e = int(idx[i, j])
            counts[e] += 1
            if capacity is None or fill[e] < capacity:
                dest[i][j] = fill[e]  # rank within e; made absolute below
                fill[e] += 1
    offsets = [0]
    for e in range(num_experts):
        offsets.append(offsets[-1] + fill[e])
    src = [-1] * (t * k)
    for i in range(t):
        for j in range(k):
            if dest[i][j] >= 0:
                dest[i][j] += offsets[int(idx[i, j])]
                src[dest[i][j]] = i * k + j
    i32 = torch.int32
    return Routing(torch.tensor(dest, dtype=i32).view(t, k), torch.tensor(src, dtype=i32),
                   torch.tensor(offsets, dtype=i32), torch.tensor(counts, dtype=i32))  # fmt: skip


# (label, T, k, E, capacity, valid fraction or None, mode)
ROUTE_CASES = [
    ("random-k2", 37, 2, 8, None, None, "random"),
    ("random-k1", 51, 1, 5, None, None, "random"),
    ("k3-cap", 45, 3, 6, 4, None, "random"),
    ("cap-small", 63, 2, 4, 3, None, "random"),
    ("cap0", 29, 2, 4, 0, None, "random"),
    ("cap-huge", 33, 2, 7, 10**6, None, "random"),
    ("one-expert", 41, 2, 6, None, None, "one"),
    ("one-expert-cap", 41, 2, 6, 5, None, "one"),
    ("empty-experts", 39, 2, 16, 3, None, "few"),
    ("valid", 47, 2, 5, None, 0.6, "random"),
    ("valid-cap", 47, 2, 5, 4, 0.5, "random"),
    ("none-valid", 9, 2, 3, None, 0.0, "random"),
    ("empty", 0, 2, 4, None, None, "random"),
    ("multi-chunk", 173, 2, 9, 30, 0.8, "random"),
]


def make_idx(t, k, e, mode, dtype=torch.int64, device="cpu"):
    if mode == "one":
        idx = torch.full((t, k), e // 2)
    elif mode == "few":
        idx = torch.randint(0, 3, (t, k)) * 5  # experts 0, 5, 10 only
    else:
        idx = torch.randint(0, e, (t, k))
    return idx.to(device=device, dtype=dtype)


def make_valid(t, k, frac, device="cpu"):
    return None if frac is None else (torch.rand(t, k) < frac).to(device)


def assert_routing_equal(got, want):
    for name, g, w in zip(Routing._fields, got, want):
        assert g.dtype == torch.int32 and g.device == w.device, name
        assert torch.equal(g, w), f"{name}: got {g.tolist()} expected {w.tolist()}"


@pytest.mark.parametrize("case", ROUTE_CASES, ids=[c[0] for c in ROUTE_CASES])
def test_route_ref_matches_loop(case):
    _, t, k, e, cap, frac, mode = case
    idx, valid = make_idx(t, k, e, mode), make_valid(t, k, frac)
    assert_routing_equal(moe_route_ref(idx, e, cap, valid), route_loop(idx, e, cap, valid))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ROUTE_CASES, ids=[c[0] for c in ROUTE_CASES])
def test_route_backends(backend, case):
    _, t, k, e, cap, frac, mode = case
    for dtype in (torch.int32, torch.int64):
        idx, valid = make_idx(t, k, e, mode, dtype), make_valid(t, k, frac)
        want = moe_route_ref(idx, e, cap, valid)
        with use_backend(backend, op="moe_route"):
            got = moe_route(idx, e, cap, valid)
        assert_routing_equal(got, want)
        if cap is not None:
            assert torch.equal(want.counts, moe_route_ref(idx, e, None, valid).counts)


def test_dropless_equals_huge_capacity():
    idx = make_idx(101, 2, 7, "random")
    assert_routing_equal(moe_route(idx, 7), moe_route(idx, 7, capacity=202))


@pytest.mark.skipif(_ext.C is None, reason="fastgen._C not built")
def test_route_cpp_large_parallel():  # several chunks per thread: the chunked scan must be exact
    idx = make_idx(20011, 2, 64, "random", torch.int32)
    valid = make_valid(20011, 2, 0.9)
    with use_backend("cpp", op="moe_route"):
        got = moe_route(idx, 64, 700, valid)
    assert_routing_equal(got, moe_route_ref(idx, 64, 700, valid))


# ---- permute / unpermute values and gradients -----------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _setup(t, k, e, d, dtype, cap, gate_dtype=None, device="cpu"):
    idx = make_idx(t, k, e, "random", device=device)
    valid = make_valid(t, k, 0.85, device)
    r = moe_route_ref(idx, e, cap, valid)
    x = torch.randn(t, d, device=device).to(dtype)
    w = torch.randn(t * k, d, device=device).to(dtype)  # a stand-in "expert": buf * w
    gates = torch.rand(t, k, device=device).to(gate_dtype or dtype)
    dy = torch.randn(t, d, device=device).to(dtype)
    return r, x, w, gates, dy


def _forward_backward(fn_perm, fn_unperm, r, x, w, gates, dy, dtype):
    x = x.to(dtype).requires_grad_()
    g = gates.to(dtype if dtype == torch.float64 else gates.dtype).requires_grad_()
    buf = fn_perm(x, r)
    y = fn_unperm(buf * w.to(dtype), r, g)
    dx, dg = torch.autograd.grad(y, (x, g), dy.to(dtype))
    return buf, y, dx, dg


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("t,k,d,cap", [(37, 2, 19, None), (53, 1, 64, None), (29, 3, 33, 5), (41, 2, 130, 4)])
def test_permute_unpermute(backend, dtype, t, k, d, cap):
    if backend == "triton" and dtype == torch.bfloat16 and not HAS_CUDA:
        pytest.skip("the Triton interpreter gets bf16 wrong (tested on GPU)")
    r, x, w, gates, dy = _setup(t, k, 6, d, dtype, cap, gate_dtype=torch.float32 if d == 130 else None)

    def ref(dt):
        return _forward_backward(
            lambda x, r: moe_permute_ref(x, r, upcast=dt == torch.float64),
            lambda b, r, g: moe_unpermute_ref(b, r, g, upcast=dt == torch.float64),
            r, x, w, gates, dy, dt)  # fmt: skip

    oracle, same = ref(torch.float64), ref(dtype)
    with use_backend(backend, op="moe_permute"):
        got = _forward_backward(moe_permute, moe_unpermute, r, x, w, gates, dy, dtype)
    for name, g_, o, s in zip(("buf", "y", "dx", "dgates"), got, oracle, same):
        assert g_.dtype == s.dtype and g_.shape == s.shape, name
        assert torch.isfinite(g_).all(), name
        atol = 1e-5 if dtype == torch.float32 else 1e-3
        assert _err(g_, o) <= 2 * _err(s, o) + atol * max(1.0, o.abs().max().item()), name
    buf = got[0]
    assert torch.equal(buf[int(r.offsets[-1]) :], torch.zeros_like(buf[int(r.offsets[-1]) :]))
    assert torch.equal(buf, moe_permute_ref(x, r))  # a gather is exact


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropped_and_empty(backend):
    idx = torch.zeros(5, 2, dtype=torch.int64)
    r = moe_route(idx, 2, capacity=3)  # tokens 3, 4 lose both assignments
    x = torch.randn(5, 8, requires_grad=True)
    g = torch.rand(5, 2, requires_grad=True)
    with use_backend(backend, op="moe_permute"):
        y = moe_unpermute(moe_permute(x, r), r, g)
        y.sum().backward()
        empty = moe_permute(torch.randn(0, 8), moe_route(idx[:0], 2))
    assert torch.equal(y[3:], torch.zeros(2, 8)) and torch.equal(x.grad[3:], torch.zeros(2, 8))
    assert torch.equal(g.grad[3:], torch.zeros(2, 2)) and g.grad[0, 1] == 0  # (0, 1) ranks 5th: dropped
    assert empty.shape == (0, 8)


# ---- errors ----------------------------------------------------------------------------------------


def test_errors():
    idx = torch.randint(0, 4, (6, 2))
    r = moe_route(idx, 4)
    x, g, buf = torch.randn(6, 8), torch.rand(6, 2), torch.randn(12, 8)
    bad = [
        (lambda: moe_route(idx.float(), 4), "expert_idx must be a 2-D"),
        (lambda: moe_route(idx[:, 0], 4), "expert_idx must be a 2-D"),
        (lambda: moe_route(idx, 0), "num_experts"),
        (lambda: moe_route(idx, 4, capacity=-1), "capacity"),
        (lambda: moe_route(idx, 3), r"in \[0, 3\)"),
        (lambda: moe_route(idx - 1, 4), r"in \[0, 4\)"),
        (lambda: moe_route(idx, 4, valid=torch.ones(6, 1, dtype=torch.bool)), "valid has shape"),
        (lambda: moe_route(idx, 4, valid=torch.ones(6, 2)), "valid must be a bool"),
        (lambda: moe_permute(x[:5], r), "5 rows"),
        (lambda: moe_permute(x[0], r), "x must be 2-D"),
        (lambda: moe_permute(x.long(), r), "x must be float"),
        (lambda: moe_permute(x, (r.dest.long(), *r[1:])), "routing.dest must be an int32"),
        (lambda: moe_permute(x, Routing(r.dest, r.src[:5], r.offsets, r.counts)), "routing.src has shape"),
        (lambda: moe_permute(x, Routing(r.dest, r.src + 20, r.offsets, r.counts)), r"routing.src entries"),
        (lambda: moe_permute(x, "routing"), "routing must be the Routing"),
        (lambda: moe_unpermute(buf, r, g[:, :1]), r"gates must be \(tokens, k\)"),
        (lambda: moe_unpermute(buf, r, g[:5]), "gates has 5 tokens"),
        (lambda: moe_unpermute(buf[:11], r, g), "buf has 11 rows"),
        (lambda: moe_unpermute(buf, r, g.long()), "gates must be float"),
        (lambda: moe_unpermute(buf, Routing(r.dest - 3, *r[1:]), g), "routing.dest entries"),
    ]
    for fn, msg in bad:
        with pytest.raises(ValueError, match=msg):
            fn()


def test_forced_backend_refusal():
    idx = torch.randint(0, 4, (6, 2))
    with use_backend("cuda", op="moe_route"), pytest.raises(BackendUnavailableError, match="cuda"):
        moe_route(idx, 4)


# ---- torch.library: opcheck and torch.compile ------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "cpp"] if _ext.C is not None else ["torch"])
def test_opcheck(backend):
    idx = make_idx(13, 2, 4, "random")
    valid = make_valid(13, 2, 0.8)
    r = moe_route(idx, 4, 5, valid)
    x = torch.randn(13, 6, requires_grad=True)
    buf = torch.randn(26, 6, requires_grad=True)
    g = torch.rand(13, 2, requires_grad=True)
    ops = torch.ops.fastgen
    with use_backend(backend):
        torch.library.opcheck(ops.moe_route, (idx, valid, 4, 5))
        torch.library.opcheck(ops.moe_route, (idx.int(), None, 4, -1))
        torch.library.opcheck(ops.moe_gather, (x, r.dest, r.src, None))
        torch.library.opcheck(ops.moe_gather, (x, r.dest, r.src, g))
        torch.library.opcheck(ops.moe_combine, (buf, r.dest, r.src, g))
        torch.library.opcheck(ops.moe_combine, (buf, r.dest, r.src, None))
        torch.library.opcheck(ops.moe_gate_grad, (x.detach(), buf.detach(), r.dest))


def test_compile_fullgraph():
    def layer(x, logits, w):
        gates, idx = torch.softmax(logits, -1).topk(2, dim=-1)
        r = moe_route(idx, logits.shape[-1], capacity=8)
        return moe_unpermute(moe_permute(x, r) * w, r, gates), r.counts

    x = torch.randn(21, 16, requires_grad=True)
    logits = torch.randn(21, 4, requires_grad=True)
    w = torch.randn(42, 16)
    y, counts = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, logits, w)
    y_eager, counts_eager = layer(x, logits, w)
    torch.testing.assert_close(y, y_eager)
    assert torch.equal(counts, counts_eager)
    gx, gl = torch.autograd.grad(y.sum(), (x, logits))
    ex, el = torch.autograd.grad(y_eager.sum(), (x, logits))
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gl, el)


# ---- GPU: the CUDA / Triton kernels at real sizes ---------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize(
    "t,k,e,cap", [(65537, 2, 64, None), (40000, 2, 8, 9000), (4097, 1, 3000, 2), (3, 2, 4, 1)]
)
def test_route_gpu(backend, t, k, e, cap):
    idx = make_idx(t, k, e, "random", torch.int32, "cuda")
    valid = make_valid(t, k, 0.9, "cuda")
    with use_backend(backend, op="moe_route"):
        got = moe_route(idx, e, cap, valid)
    assert_routing_equal(got, moe_route_ref(idx, e, cap, valid))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_permute_unpermute_gpu(dtype):
    r, x, w, gates, dy = _setup(4099, 2, 16, 1032, dtype, 700, torch.float32, "cuda")
    oracle = _forward_backward(
        lambda x, r: moe_permute_ref(x, r, upcast=True),
        lambda b, r, g: moe_unpermute_ref(b, r, g, upcast=True),
        r, x, w, gates, dy, torch.float64)  # fmt: skip
    same = _forward_backward(moe_permute_ref, moe_unpermute_ref, r, x, w, gates, dy, dtype)
    with use_backend("triton", op="moe_permute"):
        got = _forward_backward(moe_permute, moe_unpermute, r, x, w, gates, dy, dtype)
    for name, g_, o, s in zip(("buf", "y", "dx", "dgates"), got, oracle, same):
        assert _err(g_, o) <= 2 * _err(s, o) + 1e-3 * max(1.0, o.abs().max().item()), name


def test_route_dispatch_remembered_honours_forcing(monkeypatch):
    """route_trusted dispatches once per (device, dtype, E within each limit); a backend forced after that
    (use_backend, FASTGEN_BACKEND) is still honoured, and so is the Triton backend's E limit."""
    from fastgen.ops import moe_permute as P

    monkeypatch.delenv("FASTGEN_BACKEND", raising=False)
    idx = make_idx(6, 2, 8, "random", torch.int32, "cuda" if HAS_CUDA else "cpu")
    ref = moe_route_ref(idx, 8)
    calls, dispatch = [], P.ROUTE.dispatch
    monkeypatch.setattr(P.ROUTE, "dispatch", lambda call: calls.append(call) or dispatch(call))
    P.route_trusted(idx, 8, None, None)
    P.route_trusted(idx, 8, None, None)
    assert len(calls) <= 1
    served = []
    torch_fn = P.ROUTE.backends["torch"].fn
    monkeypatch.setattr(P.ROUTE.backends["torch"], "fn", lambda *a: served.append(1) or torch_fn(*a))
    with use_backend("torch", op="moe_route"):
        got = P.route_trusted(idx, 8, None, None)
    assert served == [1] and all(torch.equal(a, b) for a, b in zip(got, ref))
    monkeypatch.setenv("FASTGEN_BACKEND", "moe_route:triton")
    P.route_trusted(idx, 8, None, None)  # remembers triton for E within its limit ...
    with pytest.raises(BackendUnavailableError, match="num_experts 4097 > 4096"):
        P.route_trusted(idx, 4097, None, None)  # ... which is not E beyond it
    monkeypatch.setenv("FASTGEN_BACKEND", "moe_route:torch")
    P.route_trusted(idx, 8, None, None)
    assert served == [1, 1]


def test_permute_dispatch_remembered_honours_forcing(monkeypatch):
    """The gather / combine / gate-grad dispatch runs once per (device, dtype); a backend forced after that
    (use_backend, FASTGEN_BACKEND) is still the one that serves the call."""
    from fastgen.ops import moe_permute as P

    monkeypatch.delenv("FASTGEN_BACKEND", raising=False)
    idx = make_idx(6, 2, 4, "random", torch.int32, "cpu")
    routing = moe_route(idx, 4)
    x = torch.randn(6, 8)
    calls, dispatch = [], P.OP.dispatch
    monkeypatch.setattr(P.OP, "dispatch", lambda call: calls.append(call) or dispatch(call))
    want = moe_permute(x, routing)
    moe_permute(x, routing)
    assert len(calls) <= 1
    served = []
    torch_impl = P.OP.backends["torch"].fn
    spy = torch_impl._replace(gather=lambda *a: served.append(1) or torch_impl.gather(*a))
    monkeypatch.setattr(P.OP.backends["torch"], "fn", spy)
    with use_backend("torch", op="moe_permute"):
        assert torch.equal(moe_permute(x, routing), want)
    assert served == [1]
    monkeypatch.setenv("FASTGEN_BACKEND", "moe_permute:torch")
    assert torch.equal(moe_permute(x, routing), want)
    assert served == [1, 1]
    monkeypatch.delenv("FASTGEN_BACKEND")
    moe_permute(x, routing)
    assert served == [1, 1]  # back on the natural backend

"""vq_nearest vs the float64 reference, on the torch backend and the Triton kernel (interpreter on CPU).

Indices must equal the float64 argmin exactly (exact mode), including planted exact ties (duplicate codes:
the lowest index wins) and near-ties that float32's expanded form ||x||^2 - 2 x.c + ||c||^2 gets wrong
but the re-rank's direct form gets right. Fast mode may differ only on near-ties: its winner's true
distance must be within tolerance of the minimum.
"""

import pytest
import torch

import fastgen
from fastgen import _ext
from fastgen._backend import BackendUnavailableError, Call
from fastgen.ops import vq as V

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
BACKENDS = ["torch", "triton"] + (["cpp"] if _ext.C is not None else [])
CPU_DTYPES = [torch.float32, torch.float16]  # the interpreter gets bf16 arithmetic wrong (bf16: GPU tests)
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# fast mode: the winner's float64 distance may exceed the minimum by this (relative to the row's scale)
FAST_TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-9}

pytestmark = [
    pytest.mark.usefixtures("poison_empty"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),  # numpy in the interpreter
]


def run(backend, x, c, **kw):
    with fastgen.use_backend(backend, op="vq_nearest"):
        return V.vq_nearest(x, c, **kw)


def dist64(x, c, idx, distance):
    """float64 distance of every row to the code ``idx`` picked for it: (..., N)."""
    d = V._dist_matrix_ref(x, c, distance)
    return d.gather(-1, idx.unsqueeze(-1)).squeeze(-1)


def check(got, ref, x, c, distance, mode, counts=True):
    assert got.indices.dtype == torch.int64 and got.indices.shape == ref.indices.shape
    assert got.dist.dtype == torch.float32 and got.dist.shape == ref.dist.shape
    assert torch.isfinite(got.dist).all(), "unwritten or non-finite dist"
    k = c.shape[-2]
    assert ((got.indices >= 0) & (got.indices < k)).all(), "index out of range (unwritten?)"
    scale = 1.0 if distance == "cosine" else float(x.double().pow(2).sum(-1).max()) + 1.0
    if mode == "exact":
        bad = (got.indices != ref.indices).sum().item()
        assert bad == 0, f"{bad} indices differ from the float64 argmin"
        torch.testing.assert_close(got.dist, ref.dist, atol=2e-6 * scale, rtol=1e-5)
    else:
        excess = (dist64(x, c, got.indices, distance) - ref.dist.double()).max().item()
        assert excess <= FAST_TOL[x.dtype] * scale, f"fast mode's winner is {excess:.3e} above the minimum"
        torch.testing.assert_close(got.dist.double(), dist64(x, c, got.indices, distance),
                                   atol=FAST_TOL[x.dtype] * scale, rtol=0)  # fmt: skip
    if counts:
        assert got.counts is not None and got.counts.dtype == torch.int64
        i = got.indices if got.indices.dim() == 2 else got.indices.unsqueeze(0)
        want = torch.stack([torch.bincount(r, minlength=k) for r in i]).view(c.shape[:-1])
        assert torch.equal(got.counts, want), "counts != bincount(indices)"


def with_duplicates(c):
    """Copies of codes at lower and higher indices: exact ties, which the lowest index must win."""
    c = c.clone()
    k = c.shape[-2]
    c[..., 1, :] = c[..., k - 2, :]  # code k-2's duplicate at index 1 must win
    c[..., k - 1, :] = c[..., 3, :]  # code 3 must win over its copy at k-1
    return c


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("distance", V.DISTANCES)
@pytest.mark.parametrize("mode", V.MODES)
def test_matches_reference(backend, dtype, distance, mode):
    x = torch.randn(37, 20, device=DEV).to(dtype)
    c = with_duplicates(torch.randn(53, 20, device=DEV)).to(dtype)
    x[5] = c[1]  # rows sitting exactly on a duplicated code: distance 0, three-way tie
    x[6] = c[3]
    ref = V.vq_nearest_ref(x, c, distance=distance, return_counts=True)
    got = run(backend, x, c, distance=distance, mode=mode, return_counts=True)
    check(got, ref, x, c, distance, mode)
    if mode == "exact":
        assert got.indices[5] == 1 and got.indices[6] == 3 and got.dist[5] == 0, "exact ties: lowest index"


def near_tie_problem(n, d, unit, dtype, device=DEV):
    """Rows far from the origin (|x|^2 ~ d * 40^2) with three planted codes each, whose squared distances
    (~1) differ by one unit^2 (~1e-3 relative): above float32's resolution of the direct form (which is
    exact here: every value is a multiple of ``unit`` representable in ``dtype``), below the error of
    float32's expanded form (~eps32 * 2 |x|^2 ~ 4e-3) and of float16. Plus far random codes."""
    g = torch.Generator().manual_seed(1)
    x = 40 + unit * torch.randint(-64, 64, (n, d), generator=g).double()
    base = torch.zeros(n, d, dtype=torch.float64)
    base[:, :8] = unit * torch.randint(-5, 6, (n, 8), generator=g).double()
    alts = []
    for j in range(3):  # alternative j: base plus `unit` in coordinate 8 + j (distance + j' unit^2)
        delta = base.clone()
        delta[:, 8 + j] = unit * (1 + j % 2)  # +1, +4, +1 unit^2: a near-tie and an exact tie
        alts.append(x + delta)
    far = 40 + unit * torch.randint(-64, 64, (17, d), generator=g).double() + 3
    c = torch.cat([torch.stack(alts, 1).reshape(3 * n, d), far])
    c = c[torch.randperm(c.shape[0], generator=g)]
    for t in (x, c):  # exactly representable in the test dtype
        assert torch.equal(t.to(dtype).double(), t)
    return x.to(device=device, dtype=dtype), c.to(device=device, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_near_ties_exact(backend, dtype):
    x, c = near_tie_problem(12, 20, 1 / 32, dtype)
    ref = V.vq_nearest_ref(x, c, return_counts=True)
    got = run(backend, x, c, mode="exact", return_counts=True)
    check(got, ref, x, c, "l2", "exact")
    check(run(backend, x, c, mode="fast"), ref, x, c, "l2", "fast", counts=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distance", V.DISTANCES)
def test_multihead_equals_per_head(backend, distance):
    x = torch.randn(3, 29, 12, device=DEV)
    c = with_duplicates(torch.randn(3, 19, 12, device=DEV))
    got = run(backend, x, c, distance=distance, return_counts=True)
    ref = V.vq_nearest_ref(x, c, distance=distance, return_counts=True)
    check(got, ref, x, c, distance, "exact")
    for h in range(3):
        one = run(backend, x[h], c[h], distance=distance, return_counts=True)
        assert torch.equal(one.indices, got.indices[h]) and torch.equal(one.counts, got.counts[h])
        assert torch.equal(one.dist, got.dist[h])


@pytest.mark.skipif(_ext.C is None, reason="fastgen._C not built")
def test_cpp_exact_mode_and_cuda_exact():
    """The CPU C++ kernel re-ranks its top-R by the direct form: it serves both modes and is the CPU default.
    The CUDA C++ kernel re-ranks too: it serves exact mode (no refusal) and is the CUDA default for it."""
    x, c = torch.randn(9, 8), torch.randn(5, 8)
    assert V.OP.dispatch(V._call(x[None], c[None], "fast")).name == "cpp"
    assert V.OP.dispatch(V._call(x[None], c[None], "exact")).name == "cpp"
    check(run("cpp", x, c, mode="exact", return_counts=True), V.vq_nearest_ref(x, c, return_counts=True),
          x, c, "l2", "exact")  # fmt: skip
    reasons = V.OP.why_not("cuda", Call(torch.device("cuda"), torch.float32, {"mode": "exact"}))
    assert not any("exact" in r or "re-rank" in r for r in reasons), reasons  # no mode refusal any more
    if GPU and hasattr(_ext.C, "vq_nearest_cuda"):
        xg, cg = x.cuda(), c.cuda()
        assert V.OP.dispatch(V._call(xg[None], cg[None], "exact")).name == "cuda"
        got = run("cuda", xg, cg, mode="exact", return_counts=True)
        check(got, V.vq_nearest_ref(xg, cg, return_counts=True), xg, cg, "l2", "exact")


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_shapes_strides_and_edges(backend):
    # non-contiguous x, D > one block, K < R (fewer codes than re-rank slots), N = 0
    x = torch.randn(37, 80, device=DEV)[:, ::2]  # (37, 40), strides (80, 2)
    c = torch.randn(3, 40, device=DEV)
    check(
        run(backend, x, c, return_counts=True),
        V.vq_nearest_ref(x, c, return_counts=True),
        x,
        c,
        "l2",
        "exact",
    )
    x1 = torch.randn(5, 37, device=DEV)
    c1 = torch.randn(1, 37, device=DEV)
    got = run(backend, x1, c1, return_counts=True)
    assert (got.indices == 0).all() and got.counts.tolist() == [5]
    empty = run(backend, x1[:0], c1, return_counts=True)
    assert empty.indices.shape == (0,) and empty.counts.tolist() == [0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_cosine_zero_vectors(backend):
    # a zero row is at distance 1 from every code (norm clamped at eps): index 0; a zero code likewise
    x = torch.randn(6, 8, device=DEV)
    x[2] = 0
    c = torch.randn(5, 8, device=DEV)
    c[0] = 0
    got = run(backend, x, c, distance="cosine")
    ref = V.vq_nearest_ref(x, c, distance="cosine")
    assert torch.equal(got.indices, ref.indices) and got.indices[2] == 0 and got.dist[2] == 1.0
    assert len(got) == 2 and not hasattr(got, "counts")  # indices, dist = vq_nearest(...)


def test_float64_torch_backend():
    x, c = torch.randn(9, 7, dtype=torch.float64), torch.randn(11, 7, dtype=torch.float64)
    got = run("torch", x, c, return_counts=True)
    check(got, V.vq_nearest_ref(x, c, return_counts=True), x, c, "l2", "exact")


@pytest.mark.parametrize(
    "xs, cs, kw, match",
    [
        ((4, 8), (5, 7), {}, "D = 7 must equal x's D = 8"),
        ((4, 8), (0, 8), {}, "empty"),
        ((2, 4, 8), (3, 5, 8), {}, "3 heads, x has H = 2"),
        ((8,), (5, 8), {}, r"x must be \(N, D\)"),
        ((4, 8), (2, 5, 8), {}, r"codebook must be \(K, D\)"),
        ((4, 8), (5, 8), {"distance": "dot"}, "distance must be one of"),
        ((4, 8), (5, 8), {"mode": "approx"}, "mode must be one of"),
    ],
)
def test_errors(xs, cs, kw, match):
    with pytest.raises(ValueError, match=match):
        V.vq_nearest(torch.randn(xs), torch.randn(cs), **kw)


def test_errors_dtype_device_nonfinite():
    x, c = torch.randn(4, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="codebook must have x's dtype"):
        V.vq_nearest(x, c.half())
    with pytest.raises(ValueError, match="must be floating point"):
        V.vq_nearest(x.long(), c.long())
    if GPU:
        with pytest.raises(ValueError, match="codebook must be on x's device"):
            V.vq_nearest(x, c.cuda())
    for bad in (float("nan"), float("inf")):
        xb = x.clone()
        xb[1, 2] = bad
        with pytest.raises(ValueError, match="x contains NaN or inf"):
            V.vq_nearest(xb, c)


def test_triton_limits_refused_with_reason():
    dev = torch.device("cuda" if GPU else "cpu")
    reasons = V.OP.why_not("triton", Call(dev, torch.float16, {"dim": 1025, "codes": 65537}), forced=True)
    assert any("dim 1025 > 1024" in r for r in reasons) and any("codes 65537 > 65536" in r for r in reasons)
    x, c = torch.randn(2, 1025, device=DEV), torch.randn(3, 1025, device=DEV)
    with pytest.raises(BackendUnavailableError, match="dim 1025 > 1024"):
        run("triton", x, c)
    got = run("torch", x, c)  # the torch backend serves any size
    assert torch.equal(got.indices, V.vq_nearest_ref(x, c).indices)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, c = torch.randn(1, 9, 8, device=DEV), torch.randn(1, 6, 8, device=DEV)
    with fastgen.use_backend(backend, op="vq_nearest"):
        for args in ((x, c, "l2", "exact", True), (x, c, "cosine", "fast", False)):
            torch.library.opcheck(V._vq_nearest_op, args)


def test_compile_fullgraph():
    x, c = torch.randn(2, 9, 8, device=DEV), torch.randn(2, 6, 8, device=DEV)

    def f(x, c):
        out = V.vq_nearest(x, c, return_counts=True)
        return out.indices, out.dist * 2, out.counts

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, c)
    want = f(x, c)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# ---- GPU, real sizes -----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("n, k, d", [(65536, 8192, 256), (8192, 65536, 64), (4096, 2048, 1024)])
@pytest.mark.parametrize("distance", V.DISTANCES)
def test_gpu_real_sizes(dtype, n, k, d, distance):
    x = torch.randn(n, d, device="cuda").to(dtype)
    c = with_duplicates(torch.randn(k, d, device="cuda")).to(dtype)
    ref = V.vq_nearest_ref(x[:2048], c, distance=distance)
    for mode in V.MODES:
        got = run("triton", x, c, distance=distance, mode=mode, return_counts=True)
        assert got.counts.sum().item() == n
        head = V.VQNearest(got.indices[:2048], got.dist[:2048])
        check(head, ref, x[:2048], c, distance, mode, counts=False)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype, unit", [(torch.float32, 1 / 32), (torch.float16, 1 / 32), (torch.bfloat16, 1 / 4)]
)
def test_gpu_near_ties_multihead(dtype, unit):
    xs, cs = zip(*(near_tie_problem(256, 64, unit, dtype) for _ in range(2)))
    x, c = torch.stack(xs), torch.stack(cs)
    check(
        run("triton", x, c, return_counts=True),
        V.vq_nearest_ref(x, c, return_counts=True),
        x,
        c,
        "l2",
        "exact",
    )


def test_gpu_dispatch_sends_half_fast_mode_to_triton(monkeypatch):
    """On a GPU the fp32 SIMT CUDA kernel serves exact mode and fp32; fp16 / bf16 fast mode goes to the
    Triton tensor-core kernel when Triton is usable (the CUDA kernel still serves it when it is not)."""
    from fastgen import _backend

    check = V.OP.backends["cuda"].check
    dev = torch.device("cuda")
    monkeypatch.setattr(_backend, "triton_available", lambda: [])
    for dtype in (torch.float16, torch.bfloat16):
        assert check(Call(dev, dtype, {"mode": "fast"})), dtype
        assert check(Call(dev, dtype, {"mode": "exact"})) == []
    assert check(Call(dev, torch.float32, {"mode": "fast"})) == []
    monkeypatch.setattr(_backend, "triton_available", lambda: ["no triton"])
    assert check(Call(dev, torch.bfloat16, {"mode": "fast"})) == []

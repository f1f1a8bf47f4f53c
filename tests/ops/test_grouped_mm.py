"""Grouped GEMM (MoE) vs the float64 reference, on the torch backend and the Triton kernels (interpreter on CPU).

Numerics gate: max error against float64 <= 2x the error of the same computation done by PyTorch in the
input dtype (grouped_mm_ref with upcast=False), plus a small atol, for the output and every gradient.
"""

import pytest
import torch

import fastgen
from fastgen._backend import BackendUnavailableError
from fastgen.ops import grouped_mm as G

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
BACKENDS = ["torch", "triton"]
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}
CPU_DTYPES = [torch.float32, torch.float16]  # the interpreter gets bf16 arithmetic wrong (bf16: GPU tests)

pytestmark = [
    pytest.mark.usefixtures("poison_empty"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),  # numpy exp in the interpreter
]


def offs(*v, device=DEV):
    return torch.tensor(v, dtype=torch.int32, device=device)


def make(r, k, n, e, dtype, bias=True, device=DEV):
    x = torch.randn(r, k, dtype=dtype, device=device, requires_grad=True)
    w = (torch.randn(e, k, n, dtype=dtype, device=device) / k**0.5).requires_grad_()
    b = torch.randn(e, n, dtype=dtype, device=device, requires_grad=True) if bias else None
    return x, w, b


def assert_2x(got, ref64, same, dtype, what):
    err = (got.double() - ref64).abs().max().item() if got.numel() else 0.0
    base = (same.double() - ref64).abs().max().item() if got.numel() else 0.0
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    assert err <= 2 * base + ATOL[dtype], f"{what}: error {err:.3e} > 2 x torch's {base:.3e} + {ATOL[dtype]}"


def check(backend, x, w, off, bias, act, dtype):
    """Forward and the gradients w.r.t. x, w and bias under the 2x rule; unused rows exactly zero."""
    leaves = [t for t in (x, w, bias) if t is not None]
    with fastgen.use_backend(backend, op="grouped_mm"):
        out = G.grouped_mm(x, w, off, bias=bias, activation=act)
        n_out = w.shape[2] // 2 if act == "swiglu" else w.shape[2]
        assert out.shape == (x.shape[0], n_out) and out.dtype == dtype
        dout = torch.randn_like(out)
        got = torch.autograd.grad(out, leaves, dout)
    results = {}
    for upcast in (True, False):
        xs = [t.detach().clone().requires_grad_() for t in leaves]
        r = G.grouped_mm_ref(xs[0], xs[1], off, bias=xs[2] if bias is not None else None, activation=act,
                             upcast=upcast)  # fmt: skip
        results[upcast] = (r, torch.autograd.grad(r, xs, dout))
    (r64, g64), (rlo, glo) = results[True], results[False]
    assert_2x(out, r64, rlo, dtype, "out")
    for name, a, b64, blo in zip(("dx", "dw", "dbias"), got, g64, glo):
        assert a.shape == b64.shape and a.dtype == dtype, name
        assert_2x(a, b64, blo, dtype, name)
    lo, hi = int(off[0]), int(off[-1])
    for t, name in ((out, "out"), (got[0], "dx")):
        assert (t[:lo] == 0).all() and (t[hi:] == 0).all(), f"{name}: unused rows must be exactly zero"
    return out, got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("act", G.ACTIVATIONS, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_reference(backend, dtype, act, bias):
    # 4 experts, one empty, offsets[E] = 44 < R = 50 (6 unused rows), K and N not multiples of the block
    x, w, b = make(50, 20, 22, 4, dtype, bias)
    check(backend, x, w, offs(0, 9, 9, 30, 44), b, act, dtype)


# (R, K, N, offsets): odd sizes, rows before offsets[0], every row used, all empty, one expert, no rows
SHAPES = [
    (80, 33, 46, (5, 22, 23, 58, 71)),
    (37, 48, 16, (0, 0, 37, 37)),
    (20, 17, 30, (0, 0, 0, 0)),
    (31, 40, 34, (0, 31)),
    (0, 24, 18, (0, 0, 0)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["gelu", "swiglu"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"R{s[0]}K{s[1]}N{s[2]}E{len(s[3]) - 1}")
def test_shapes(backend, act, shape):
    r, k, n, o = shape
    x, w, b = make(r, k, n, len(o) - 1, torch.float32)
    check(backend, x, w, offs(*o), b, act, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_and_int64_offsets(backend):
    """x a column slice of a wider tensor, w a transposed (E, N, K) storage: strides, no copies needed."""
    base = torch.randn(40, 50, device=DEV)
    x = base[:, 3:27].requires_grad_()
    w = torch.randn(3, 18, 24, device=DEV).transpose(1, 2).requires_grad_()
    off = torch.tensor([0, 12, 30, 36], dtype=torch.int64, device=DEV)
    check(backend, x, w, off, None, "silu", torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["x", "w", "bias", "w+bias"])
def test_partial_grads(backend, which):
    """Only some inputs require grad: the backward computes (and returns) just those."""
    x, w, b = make(30, 16, 10, 3, torch.float32)
    leaves = [t for name, t in (("x", x), ("w", w), ("bias", b)) if name in which.split("+")]
    for t in (x, w, b):
        t.requires_grad_(any(t is leaf for leaf in leaves))
    off = offs(0, 10, 10, 28)
    with fastgen.use_backend(backend, op="grouped_mm"):
        got = torch.autograd.grad(G.grouped_mm(x, w, off, bias=b, activation="gelu").sum(), leaves)
    xs = [t.detach().double().requires_grad_() for t in leaves]
    full = {id(t): d for t, d in zip(leaves, xs)}
    args = [full.get(id(t), t.detach().double()) for t in (x, w, b)]
    ref = G.grouped_mm_ref(args[0], args[1], off, bias=args[2], activation="gelu").sum()
    for a, r in zip(got, torch.autograd.grad(ref, xs)):
        torch.testing.assert_close(a.double(), r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_experts(backend):
    x, w = torch.randn(5, 8, device=DEV), torch.randn(0, 8, 6, device=DEV, requires_grad=True)
    with fastgen.use_backend(backend, op="grouped_mm"):
        out = G.grouped_mm(x, w, offs(3), activation="relu")
        (dw,) = torch.autograd.grad(out.sum(), w)
    assert out.shape == (5, 6) and (out == 0).all() and dw.shape == (0, 8, 6)


def test_float64_torch_backend_and_triton_refuses_it():
    x, w, b = make(30, 12, 10, 3, torch.float64)
    off = offs(0, 7, 7, 25)
    with fastgen.use_backend("torch", op="grouped_mm"):
        out = G.grouped_mm(x, w, off, bias=b, activation="gelu_tanh")
    torch.testing.assert_close(out, G.grouped_mm_ref(x, w, off, bias=b, activation="gelu_tanh"))
    assert torch.autograd.gradcheck(
        lambda *a: G.grouped_mm(*a[:2], off, bias=a[2], activation="gelu_tanh"), (x, w, b)
    )
    with (
        fastgen.use_backend("triton", op="grouped_mm"),
        pytest.raises(BackendUnavailableError, match="float64"),
    ):
        G.grouped_mm(x, w, off)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_skips_saving_h(backend):
    x, w, b = make(30, 16, 20, 3, torch.float32)
    off = offs(0, 10, 20, 30)
    with fastgen.use_backend(backend, op="grouped_mm"), torch.no_grad():
        out, h = torch.ops.fastgen.grouped_mm_fwd(x, w, off, b, "swiglu", False)
        out2 = G.grouped_mm(x, w, off, bias=b, activation="swiglu")
    assert h.numel() == 0 and out.shape == (30, 10)
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(
        out, G.grouped_mm_ref(x, w, off, bias=b, activation="swiglu"), atol=1e-5, rtol=1e-5
    )


def _bad(name):
    x, w, b = make(10, 8, 6, 2, torch.float32, device="cpu")
    off = offs(0, 4, 10, device="cpu")
    kw = dict(bias=b, activation="relu")
    cases = {
        "x_dims": ((x[None], w, off), kw, "x must be 2-D"),
        "w_dims": ((x, w[0], off), kw, "w must be 3-D"),
        "k_mismatch": ((x[:, :7], w, off), kw, r"K = x.shape\[1\] = 7"),
        "w_dtype": ((x, w.double(), off), kw, "w must have x's dtype"),
        "x_int": ((x.long(), w.long(), off), kw, "floating point"),
        "offsets_dtype": ((x, w, off.float()), kw, "offsets must be int32"),
        "offsets_len": ((x, w, offs(0, 10, device="cpu")), kw, r"E \+ 1 = 3 entries"),
        "bias_shape": ((x, w, off), dict(bias=b[:1]), r"bias must be \(E, N\) = \(2, 6\)"),
        "bias_dtype": ((x, w, off), dict(bias=b.half()), "bias must have x's dtype"),
        "activation": ((x, w, off), dict(activation="tanh"), "activation must be one of"),
        "swiglu_odd": ((x, w[:, :, :5], off), dict(activation="swiglu"), "even N"),
        "decreasing": ((x, w, offs(0, 6, 4, device="cpu")), {}, "non-decreasing"),
        "past_end": ((x, w, offs(0, 4, 11, device="cpu")), {}, r"offsets\[E\] <= R = 10"),
        "negative": ((x, w, offs(-1, 4, 10, device="cpu")), {}, "non-decreasing with 0 <= offsets"),
    }
    return cases[name]


@pytest.mark.parametrize("name", [
    "x_dims", "w_dims", "k_mismatch", "w_dtype", "x_int", "offsets_dtype", "offsets_len", "bias_shape",
    "bias_dtype", "activation", "swiglu_odd", "decreasing", "past_end", "negative",
])  # fmt: skip
def test_bad_input_errors(name):
    args, kw, match = _bad(name)
    with pytest.raises(ValueError, match=match):
        G.grouped_mm(*args, **kw)


@pytest.mark.skipif(not GPU, reason="needs a second device")
def test_device_mismatch_error():
    x, w, _ = make(10, 8, 6, 2, torch.float32)
    with pytest.raises(ValueError, match="offsets must be on x's device"):
        G.grouped_mm(x, w, offs(0, 4, 10, device="cpu"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_and_compile(backend):
    x, w, b = make(24, 16, 12, 3, torch.float32)
    off = offs(0, 5, 5, 20)
    with fastgen.use_backend(backend, op="grouped_mm"):
        torch.library.opcheck(torch.ops.fastgen.grouped_mm_fwd.default, (x, w, off, b, "gelu", True))
        torch.library.opcheck(torch.ops.fastgen.grouped_mm_fwd.default, (x, w, off, None, "swiglu", False))

        def f(x, w, b):
            return G.grouped_mm(x, w, off, bias=b, activation="swiglu").square().sum()

        loss = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w, b)
        got = torch.autograd.grad(loss, (x, w, b))
    xs = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    ref = G.grouped_mm_ref(*xs[:2], off, bias=xs[2], activation="swiglu", upcast=False).square().sum()
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-5)
    for a, r in zip(got, torch.autograd.grad(ref, xs)):
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4)


# ---- GPU: real sizes ------------------------------------------------------------------------------


def _ragged(tokens, e, skew, device):
    """offsets (E + 1,) on the device for `tokens` rows: balanced or Zipf-skewed, a few empty experts."""
    p = 1.0 / torch.arange(1, e + 1, dtype=torch.float64) ** (1.2 if skew else 0.0)
    counts = torch.distributions.Multinomial(tokens, probs=p / p.sum()).sample().long()
    counts[e // 2] = 0
    o = torch.zeros(e + 1, dtype=torch.int64)
    o[1:] = torch.cumsum(counts, 0)
    return o.to(torch.int32).to(device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("e,act,skew", [(8, "gelu", False), (64, "swiglu", True), (8, None, True)])
def test_gpu_real_sizes(dtype, e, act, skew):
    r, k, n = 4096, 1024, 4096
    x, w, b = make(r, k, n, e, dtype, device="cuda")
    off = _ragged(r - 100, e, skew, "cuda")  # the last 100 rows unused
    check("triton", x, w, off, b, act, dtype)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    x, w, b = make(1000, 256, 512, 8, torch.bfloat16, bias=True, device="cuda")
    off = _ragged(900, 8, True, "cuda")
    with torch.no_grad():
        G.grouped_mm(x, w, off, bias=b, activation="swiglu")  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = G.grouped_mm(x, w, off, bias=b, activation="swiglu")
        off.copy_(_ragged(1000, 8, False, "cuda"))  # new routing, same graph
        graph.replay()
        torch.testing.assert_close(out, G.grouped_mm_ref(x, w, off, bias=b, activation="swiglu"), atol=3e-2,
                                   rtol=2e-2)  # fmt: skip

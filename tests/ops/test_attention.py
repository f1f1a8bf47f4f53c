"""Fused attention vs the float64 reference, on the torch backend and the Triton kernels (interpreter on CPU).

The numerics gate is flash-attention's: the kernel's max error against float64 is at most twice the error
of the same computation done by PyTorch in the input dtype, plus a small atol.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

import fastgen
from fastgen._backend import BackendUnavailableError
from fastgen.ops import attention as A

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
BACKENDS = ["torch", "triton"]
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}
CPU_DTYPES = [torch.float32, torch.float16]  # the interpreter gets bf16 arithmetic wrong (bf16: GPU tests)


pytestmark = pytest.mark.usefixtures("poison_empty")


def make(b, hq, hk, sq, sk, d, dv, dtype, device=DEV):
    q = torch.randn(b, hq, sq, d, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(b, hk, sk, d, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(b, hk, sk, dv, dtype=dtype, device=device, requires_grad=True)
    return q, k, v


def ref_mask(bias, mask):
    """attention_ref takes one attn_mask: fold the bool mask into the bias as -inf."""
    if bias is None:
        return mask
    return bias if mask is None else bias.masked_fill(~mask, float("-inf"))


def grads(out, inputs, dout):
    return torch.autograd.grad(out, [t for t in inputs if t is not None], dout)


def assert_2x(got, ref64, same, dtype, what):
    err = (got.double() - ref64).abs().max().item()
    base = (same.double() - ref64).abs().max().item()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    assert err <= 2 * base + ATOL[dtype], f"{what}: error {err:.3e} > 2 x torch's {base:.3e} + {ATOL[dtype]}"


def check(backend, b, hq, hk, sq, sk, d, dv, dtype, causal=False, bias=None, mask=None, device=DEV, det=True):
    """Forward and every gradient (q, k, v and a bias that requires grad) under the 2x rule.
    det=False: the single-pass backward with atomic dQ."""
    q, k, v = make(b, hq, hk, sq, sk, d, dv, dtype, device)
    with fastgen.use_backend(backend, op="attention"):
        out = A.flash_attention(q, k, v, bias=bias, mask=mask, causal=causal, deterministic=det)
    assert out.shape == (b, hq, sq, dv) and out.dtype == dtype
    dout = torch.randn_like(out)
    got = grads(out, (q, k, v, bias if bias is not None and bias.requires_grad else None), dout)
    leaves = [q, k, v] + ([bias] if bias is not None and bias.requires_grad else [])
    results = {}
    for upcast in (True, False):
        xs = [t.detach().clone().requires_grad_() for t in leaves]
        bb = xs[3] if len(xs) == 4 else bias
        r = A.attention_ref(*xs[:3], attn_mask=ref_mask(bb, mask), is_causal=causal, upcast=upcast)
        results[upcast] = (r, grads(r, xs, dout))
    (r64, g64), (rlo, glo) = results[True], results[False]
    assert_2x(out, r64, rlo, dtype, "out")
    for name, a, b64, blo in zip(("dq", "dk", "dv", "dbias"), got, g64, glo):
        assert a.shape == b64.shape, name
        assert_2x(a, b64, blo, dtype, name)
    return out, got


# (b, hq, hk, sq, sk, d, dv, causal): odd sizes, GQA / MQA, cross-attention, Dv != D, both alignments
SHAPES = [
    (2, 2, 2, 37, 29, 40, 40, False),
    (1, 4, 2, 17, 45, 24, 16, "top_left"),
    (1, 2, 1, 45, 17, 16, 16, "bottom_right"),  # Sq > Sk: the first rows see no key -> zeros
    (1, 2, 2, 33, 33, 80, 80, True),
    (1, 1, 1, 5, 70, 96, 96, False),
]


@pytest.mark.parametrize("backend", ["torch", "triton", "triton-atomic"])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(backend, dtype, shape):
    check(backend.split("-")[0], *shape[:7], dtype, causal=shape[7], det=backend != "triton-atomic")


@pytest.mark.parametrize("backend", ["torch", "triton", "triton-atomic"])
@pytest.mark.parametrize("bias_shape", [(1, 2, 21, 34), (2, 1, 1, 34), (21, 34)])
def test_bias_gradient_and_masks(backend, bias_shape):
    """A learnable bias broadcast over some dims (its gradient is summed over them) + a key-padding mask."""
    bias = torch.randn(bias_shape, device=DEV, requires_grad=True)
    pad = torch.ones(2, 1, 1, 34, dtype=torch.bool, device=DEV)
    pad[0, ..., 30:] = False
    check(backend.split("-")[0], 2, 2, 2, 21, 34, 16, 16, torch.float32, causal=True, bias=bias, mask=pad,
          det=backend != "triton-atomic")  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_give_zeros_and_finite_grads(backend):
    q, k, v = make(1, 2, 2, 19, 23, 16, 16, torch.float32)
    mask = torch.rand(1, 2, 19, 23, device=DEV) > 0.5
    mask[:, :, 4] = False  # rows with no visible key
    bias = torch.zeros(1, 2, 19, 23, device=DEV)
    bias[:, :, 7] = float("-inf")  # a row hidden by the additive mask
    bias.requires_grad_()
    with fastgen.use_backend(backend, op="attention"):
        out = A.flash_attention(q, k, v, bias=bias, mask=mask)
    assert torch.isfinite(out).all()
    assert out[:, :, 4].abs().max() == 0 and out[:, :, 7].abs().max() == 0
    gs = grads(out, (q, k, v, bias), torch.randn_like(out))
    for g in gs:
        assert not torch.isnan(g).any()
    assert gs[0][:, :, 4].abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_reproducible_and_exact(backend):
    q, k, v = make(2, 2, 1, 21, 27, 16, 16, torch.float32)
    p = 0.3
    with fastgen.use_backend(backend, op="attention"):
        o1 = A.flash_attention(q, k, v, dropout_p=p, seed=1234)
        o2 = A.flash_attention(q, k, v, dropout_p=p, seed=1234)
        o3 = A.flash_attention(q, k, v, dropout_p=p, seed=99)
        torch.manual_seed(7)
        o4 = fastgen.scaled_dot_product_attention(q, k, v, dropout_p=p, enable_gqa=True)
        torch.manual_seed(7)
        o5 = fastgen.scaled_dot_product_attention(q, k, v, dropout_p=p, enable_gqa=True)
    assert torch.equal(o1, o2) and torch.equal(o4, o5) and not torch.equal(o1, o3)
    keep = A.dropout_keep_mask(backend, (2, 2, 21, 27), p, 1234, DEV)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.06
    dout = torch.randn_like(o1)
    xs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = A.attention_ref(*xs, dropout_mask=keep, dropout_p=p)
    torch.testing.assert_close(o1.double(), ref, atol=2e-5, rtol=1e-5)
    for a, r in zip(grads(o1, (q, k, v), dout), grads(ref, xs, dout.double())):
        torch.testing.assert_close(a.double(), r, atol=5e-5, rtol=1e-5)


def test_backward_is_deterministic():
    q, k, v = make(1, 4, 2, 40, 40, 16, 16, torch.float16)
    bias = torch.randn(1, 4, 40, 40, device=DEV, requires_grad=True)
    with fastgen.use_backend("triton", op="attention"):
        out = A.flash_attention(q, k, v, bias=bias, causal=True, deterministic=True)
    dout = torch.randn_like(out)
    g1 = grads(out, (q, k, v, bias), dout)
    out2 = None
    with fastgen.use_backend("triton", op="attention"):
        out2 = A.flash_attention(q, k, v, bias=bias, causal=True, deterministic=True)
    g2 = grads(out2, (q, k, v, bias), dout)
    assert torch.equal(out, out2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def _packed(lens_q, lens_k, hq, hk, d, dtype=torch.float32, device=DEV):
    cu = [torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
          for lens in (lens_q, lens_k)]  # fmt: skip
    q = torch.randn(sum(lens_q), hq, d, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(sum(lens_k), hk, d, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(sum(lens_k), hk, d, dtype=dtype, device=device, requires_grad=True)
    return q, k, v, cu[0], cu[1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_matches_per_sequence_reference(backend, causal):
    lens_q, lens_k = [5, 17, 0, 33], [9, 17, 4, 20]
    q, k, v, cq, ck = _packed(lens_q, lens_k, 4, 2, 24)
    with fastgen.use_backend(backend, op="attention"):
        out = fastgen.flash_attn_varlen(q, k, v, cq, ck, max(lens_q), max(lens_k), causal=causal)
    ref = A.flash_attn_varlen_ref(q, k, v, cq, ck, causal=causal)
    torch.testing.assert_close(out.double(), ref.double(), atol=2e-5, rtol=1e-5)
    dout = torch.randn_like(out)
    for a, r in zip(grads(out, (q, k, v), dout), grads(ref, (q, k, v), dout)):
        torch.testing.assert_close(a, r, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_mixed_grids_equal_padded_batch(backend):
    """Image tokens of a 4x4 and a 6x6 grid (16x16 / 24x24 on GPU) in one packed batch vs the padded batch
    with a key-padding mask: same values on the real tokens, no compute on padding."""
    side = (16, 24) if GPU else (4, 6)
    lens = [side[0] ** 2, side[1] ** 2, side[0] ** 2]
    q, k, v, cu, _ = _packed(lens, lens, 2, 2, 32)
    with fastgen.use_backend(backend, op="attention"):
        packed = fastgen.flash_attn_varlen(q, k, v, cu, cu, max(lens), max(lens))
    s = max(lens)
    pad = torch.zeros(len(lens), 1, 1, s, dtype=torch.bool, device=DEV)
    qp, kp, vp = (torch.zeros(len(lens), 2, s, 32, device=DEV) for _ in range(3))
    for i, n in enumerate(lens):
        sl = slice(cu[i].item(), cu[i + 1].item())
        qp[i, :, :n], kp[i, :, :n], vp[i, :, :n] = (
            q[sl].transpose(0, 1),
            k[sl].transpose(0, 1),
            v[sl].transpose(0, 1),
        )
        pad[i, ..., :n] = True
    padded = fastgen.scaled_dot_product_attention(qp, kp, vp, attn_mask=pad)
    for i, n in enumerate(lens):
        got = packed[cu[i].item() : cu[i + 1].item()].transpose(0, 1)
        torch.testing.assert_close(got, padded[i, :, :n], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_drop_in(backend):
    """Same results as torch's SDPA for its argument forms (top-left causal with Sq != Sk included)."""
    q, k, v = (t.detach() for t in make(2, 3, 3, 10, 14, 16, 8, torch.float32))
    cases = [
        dict(is_causal=True),
        dict(attn_mask=torch.randn(10, 14, device=DEV)),
        dict(attn_mask=torch.rand(2, 1, 10, 14, device=DEV) > 0.2, scale=0.3),
        dict(attn_mask=torch.randn(2, 3, 10, 14, device=DEV).to(torch.float32)),
    ]
    with fastgen.use_backend(backend, op="attention"):
        for kw in cases:
            torch.testing.assert_close(fastgen.scaled_dot_product_attention(q, k, v, **kw),
                                       F.scaled_dot_product_attention(q, k, v, **kw), atol=2e-6, rtol=1e-5)  # fmt: skip
        # 3-D (no head dim), 5-D (two batch dims), GQA
        torch.testing.assert_close(fastgen.scaled_dot_product_attention(q[:, 0], k[:, 0], v[:, 0]),
                                   F.scaled_dot_product_attention(q[:, 0], k[:, 0], v[:, 0]), atol=2e-6, rtol=1e-5)  # fmt: skip
        q5, k5, v5 = (
            q[None].expand(2, -1, -1, -1, -1),
            k[None].expand(2, -1, -1, -1, -1),
            v[None].expand(2, -1, -1, -1, -1),
        )
        torch.testing.assert_close(fastgen.scaled_dot_product_attention(q5, k5, v5),
                                   F.scaled_dot_product_attention(q5, k5, v5), atol=2e-6, rtol=1e-5)  # fmt: skip
        kg, vg = k[:, :1], v[:, :1]
        torch.testing.assert_close(fastgen.scaled_dot_product_attention(q, kg, vg, enable_gqa=True),
                                   F.scaled_dot_product_attention(q, kg, vg, enable_gqa=True), atol=2e-6, rtol=1e-5)  # fmt: skip


def test_bad_input_errors():
    q, k, v = (t.detach() for t in make(2, 4, 4, 8, 8, 16, 16, torch.float32))
    sdpa = fastgen.scaled_dot_product_attention
    with pytest.raises(ValueError, match="enable_gqa"):
        sdpa(q, k[:, :2], v[:, :2])
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        sdpa(q, k[:, :3], v[:, :3], enable_gqa=True)
    with pytest.raises(ValueError, match="head_dim"):
        sdpa(q, k[..., :8], v)
    with pytest.raises(ValueError, match=r"not broadcastable.*\(2, 4, 8, 8\)"):
        sdpa(q, k, v, attn_mask=torch.ones(3, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool or floating point"):
        sdpa(q, k, v, attn_mask=torch.ones(8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="same dtype"):
        sdpa(q, k.double(), v)
    with pytest.raises(ValueError, match="dropout_p"):
        sdpa(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match="causal"):
        A.flash_attention(q, k, v, causal="diagonal")
    with pytest.raises(ValueError, match="mask must be a bool"):
        A.flash_attention(q, k, v, mask=torch.ones(8, 8))
    qv, kv, vv, cq, ck = _packed([3, 5], [3, 5], 2, 2, 16)
    with pytest.raises(ValueError, match="cu_seqlens_q must be int32"):
        fastgen.flash_attn_varlen(qv, kv, vv, cq.float(), ck, 5, 5)
    with pytest.raises(ValueError, match="3-D"):
        fastgen.flash_attn_varlen(qv[None], kv, vv, cq, ck, 5, 5)
    with pytest.raises(ValueError if DEV == "cpu" else RuntimeError, match="longer than max"):
        fastgen.flash_attn_varlen(qv, kv, vv, cq, ck, 4, 5)
    # a head dim over the Triton kernel's limit: refused with the reason when the kernel is forced
    big = torch.randn(1, 1, 4, 320, device=DEV)
    with (
        fastgen.use_backend("triton", op="attention"),
        pytest.raises(BackendUnavailableError, match="head_dim 320"),
    ):
        sdpa(big, big, big)
    with (
        fastgen.use_backend("triton", op="attention"),
        pytest.raises(BackendUnavailableError, match="float64"),
    ):
        sdpa(q.double(), k.double(), v.double())


def test_opcheck_and_compile():
    q, k, v = (t.detach() for t in make(1, 2, 2, 12, 12, 16, 16, torch.float32))
    bias = torch.randn(1, 2, 12, 12, device=DEV, requires_grad=True)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    args = (qt, kt, vt, bias, None, None, None, 12, 12, 1, 0.25, 0.0, 0, False)  # fmt: skip
    torch.library.opcheck(torch.ops.fastgen.attention_fwd.default, args)

    def f(q, k, v, bias):
        return fastgen.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=True).square().sum()

    qs = [t.clone().requires_grad_() for t in (q, k, v)]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(*qs, bias)
    loss.backward()
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    bias2 = bias.detach().clone().requires_grad_()
    f(*ref, bias2).backward()
    torch.testing.assert_close(loss, f(*ref, bias2))
    for a, b in zip([*qs, bias], [*ref, bias2]):
        torch.testing.assert_close(a.grad, b.grad)


# ---- GPU: real sizes, bf16, every head dim up to 256 ------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [16, 40, 64, 80, 96, 128, 160, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("det", [True, False])
def test_gpu_head_dims(dtype, d, causal, det):
    check("triton", 2, 4, 2, 333, 517, d, d, dtype, causal=causal, det=det)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_gpu_glide_text_keys_with_bias(dtype):
    """GLIDE: 1024 image queries against 1024 image + 77 text keys, learnable bias, key padding."""
    bias = torch.randn(1, 4, 1024, 1101, device=DEV, dtype=dtype, requires_grad=True)
    pad = torch.ones(2, 1, 1, 1101, dtype=torch.bool, device=DEV)
    pad[1, ..., 1050:] = False
    check("triton", 2, 4, 4, 1024, 1101, 64, 64, dtype, bias=bias, mask=pad)


@pytest.mark.gpu
def test_gpu_varlen_and_dropout():
    lens = [256, 576, 77, 1]
    q, k, v, cu, _ = _packed(lens, lens, 8, 2, 64, dtype=torch.float16)
    out = fastgen.flash_attn_varlen(q, k, v, cu, cu, 576, 576, causal=True)
    ref = A.flash_attn_varlen_ref(q, k, v, cu, cu, causal=True)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-3, rtol=1e-3)
    test_dropout_reproducible_and_exact("triton")


def test_float64_gradcheck():
    """The torch backend serves float64 with float64 statistics: exact enough for gradcheck."""
    q, k, v = make(1, 2, 1, 5, 7, 8, 4, torch.float64)
    bias = torch.randn(1, 2, 5, 7, dtype=torch.float64, device=DEV, requires_grad=True)

    def f(q, k, v, bias):
        return A.flash_attention(q, k, v, bias=bias, causal="bottom_right")

    assert torch.autograd.gradcheck(f, (q, k, v, bias))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_more_than_65535_batch_heads_on_the_gpu():
    """8,192 prompts x 8 heads = 65,536 (batch, head) pairs: past the 65,535 limit of grid y / z (the
    launches fold batch x heads into grid x), forward and backward."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(8192, 16, 8, 32, device="cuda", dtype=torch.float16, generator=g) for _ in range(3)
    )
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    with fastgen.use_backend("triton"):
        out = A.flash_attention(q, k, v, causal=True)
        out.float().square().sum().backward()
    grads = [t.grad for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = A.attention_ref(q, k, v, is_causal=True, upcast=True)
    ref.float().square().sum().backward()
    torch.testing.assert_close(out, ref.to(out.dtype), atol=2e-3, rtol=2e-3)
    for got, want in zip(grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_varlen_on_cpu_goes_through_torch_sdpa_per_sequence(monkeypatch):
    """On the CPU the default varlen call runs torch's fused SDPA per sequence (rule 11); it equals the
    reference and the forced torch backend, values and gradients, with GQA, bottom-right causal with
    Sq != Sk, and a sequence with no keys (zeros)."""
    calls = []
    real = A._TORCH_SDPA
    monkeypatch.setattr(A, "_TORCH_SDPA", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(0)
    lq, lk = [3, 5, 0, 4, 2], [3, 7, 2, 0, 5]
    cu_q = torch.tensor([0, *itertools.accumulate(lq)], dtype=torch.int32)
    cu_k = torch.tensor([0, *itertools.accumulate(lk)], dtype=torch.int32)
    q = torch.randn(sum(lq), 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(sum(lk), 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(sum(lk), 2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    for causal in (False, True):
        out = A.flash_attn_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal)
        assert len(calls) == 3  # one batched call per (Sq, Sk) with queries and keys
        calls.clear()
        ref = A.flash_attn_varlen_ref(q, k, v, cu_q, cu_k, causal=causal)
        torch.testing.assert_close(out, ref)
        assert out[sum(lq[:3]) : sum(lq[:4])].abs().max() == 0  # no keys: zeros
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        with fastgen.use_backend("torch", op="attention"):
            forced = A.flash_attn_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal)
        assert not calls
        torch.testing.assert_close(out, forced)
        for a, b in zip(grads, torch.autograd.grad(forced.square().sum(), (q, k, v))):
            torch.testing.assert_close(a, b)

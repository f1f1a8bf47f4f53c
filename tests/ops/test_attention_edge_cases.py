"""Edge cases of fastgen.ops.attention and fastgen.ops.attention_decode from the bad-input sweep (issue 14):
non-finite inputs propagate as the reference does, int64 index tensors are validated before narrowing,
non-finite scales are refused, huge additive masks normalise as SDPA does, long splits stay exact, and
aliased caches are refused. Oracles are exact by construction (uniform averages, float64 direct forms)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import fastgen
from fastgen.ops import attention as A
from fastgen.ops import attention_decode as AD

pytestmark = pytest.mark.usefixtures("poison_empty")
GPU = torch.cuda.is_available()
DECODE_CPU = [b for b in ("cpp", "torch") if not AD.OP.backends[b].available()]
FMIN = torch.finfo(torch.float32).min


# =====================================================================================================
# fastgen.ops.attention
# =====================================================================================================


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_scale_is_refused(bad):
    x = torch.randn(1, 2, 3, 4)
    packed, cu = torch.randn(3, 2, 4), torch.tensor([0, 3], dtype=torch.int32)
    calls = [
        lambda: A.flash_attention(x, x, x, scale=bad),
        lambda: A.scaled_dot_product_attention(x, x, x, scale=bad),
        lambda: A.flash_attn_varlen(packed, packed, packed, cu, cu, 3, 3, scale=bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="scale must be finite"):
            call()


@pytest.mark.parametrize(
    "which, cu_q, cu_k",
    [
        ("cu_seqlens_q", [0, 2**32 + 5], [0, 5]),  # wraps to [0, 5] in int32
        ("cu_seqlens_k", [0, 5], [0, 2**32 + 5]),
        ("cu_seqlens_q", [0, 2**32 + 2, 5], [0, 2, 5]),  # wraps to a valid [0, 2, 5]
        ("cu_seqlens_k", [0, 2, 5], [2**32, 2**32 + 2, 2**32 + 5]),  # wraps to [0, 2, 5]
    ],
)
def test_varlen_int64_cu_seqlens_validated_before_narrowing(which, cu_q, cu_k):
    t = torch.randn(5, 2, 4)
    cq, ck = torch.tensor(cu_q, dtype=torch.int64), torch.tensor(cu_k, dtype=torch.int64)
    with pytest.raises(ValueError, match=which):
        A.flash_attn_varlen(t, t, t, cq, ck, 5, 5)


def _huge_mask_cases():
    """(name, bias (1, 1, 3, 5), float64 oracle weights (3, 5)) whose exact softmax is known by construction."""
    out = []
    b = torch.zeros(1, 1, 3, 5)
    b[0, 0, 1] = FMIN  # HF-style padding row: every key at finfo.min -> uniform over all 5 keys
    w = torch.full((3, 5), math.nan, dtype=torch.float64)
    w[1] = 0.2
    out.append(("finfo_min_row", b, w))
    b = torch.zeros(1, 1, 3, 5)
    b[..., :3] = 1e30  # the other keys are exp(-1e30) = 0 exactly: uniform over the first 3
    w = torch.zeros(3, 5, dtype=torch.float64)
    w[:, :3] = 1.0 / 3.0
    out.append(("bias_1e30", b, w))
    return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "name, bias, weights", _huge_mask_cases(), ids=lambda x: x if isinstance(x, str) else ""
)
def test_huge_additive_mask_normalised_like_sdpa(backend, name, bias, weights):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, s, 16, generator=g) for s in (3, 5, 5))
    rows = ~weights.isnan().any(-1)  # rows whose exact answer is known (the others: finite scores)
    exact = (weights[rows] @ v[0, 0].double()).float()
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    with fastgen.use_backend(backend, op="attention"):
        got = A.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(sdpa[0, 0][rows], exact, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[0, 0][rows], exact, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got, sdpa, atol=1e-5, rtol=1e-5)


def test_huge_additive_mask_gradients_like_autograd_of_the_formula():
    """The torch backend's backward recomputes p normalised by its sum, not as exp(s - lse) (which is off by
    the row's key count here; SDPA's own CPU backward is, so the oracle is autograd through the float64
    textbook formula)."""
    for _, bias, _ in _huge_mask_cases():
        g = torch.Generator().manual_seed(1)
        base = [torch.randn(1, 1, s, 8, generator=g, dtype=torch.float64) for s in (3, 5, 5)]
        grads = []
        for f in (A.attention_ref, A.scaled_dot_product_attention):
            xs = [t.clone().requires_grad_() for t in base]
            with fastgen.use_backend("torch", op="attention"):
                out = f(*xs, attn_mask=bias.double())
            (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
            grads.append([x.grad for x in xs])
        for a, b in zip(*grads):
            torch.testing.assert_close(b, a, atol=1e-9, rtol=1e-9)


def test_triton_hf_mask_row_backward_is_finite():
    """The kernel's backward recomputes p from lse with the scores in natural-log units, like its forward:
    a finfo.min row must not turn into -inf - -inf = NaN gradients."""
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(1, 1, s, 16, generator=g).requires_grad_() for s in (3, 5, 5)]
    bias = torch.zeros(1, 1, 3, 5)
    bias[0, 0, 1] = FMIN
    with fastgen.use_backend("triton", op="attention"):
        out = A.scaled_dot_product_attention(*xs, attn_mask=bias)
    out[0, 0, [0, 2]].sum().backward()  # the padding row's output is unused, as in a masked loss
    ref = [x.detach().clone().requires_grad_() for x in xs]
    A.attention_ref(*ref, attn_mask=bias)[0, 0, [0, 2]].sum().backward()
    for a, b in zip(xs, ref):
        torch.testing.assert_close(a.grad, b.grad.float(), atol=1e-5, rtol=1e-5)


def test_references_with_no_keys_give_zeros_like_sdpa():
    q = torch.randn(2, 3, 4, 8, dtype=torch.float64)
    kv = torch.randn(2, 3, 0, 8, dtype=torch.float64)
    sdpa = F.scaled_dot_product_attention(q, kv, kv)
    assert torch.equal(sdpa, torch.zeros_like(q))  # the convention the references follow
    assert torch.equal(A.attention_ref(q, kv, kv), sdpa)
    assert torch.equal(A.attention_ref(q, kv, kv, is_causal="bottom_right"), sdpa)
    packed = torch.randn(3, 2, 4)
    empty = packed[:0]
    cq, ck = torch.tensor([0, 1, 3]), torch.tensor([0, 0, 0])  # every sequence without keys
    assert torch.equal(A.flash_attn_varlen_ref(packed, empty, empty, cq, ck), torch.zeros_like(packed))
    zero = torch.tensor([0, 0])  # a packed batch of total 0
    assert A.flash_attn_varlen_ref(empty, empty, empty, zero, zero).shape == (0, 2, 4)


def test_sdpa_mask_errors_name_attn_mask():
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 6, 8)
    with pytest.raises(ValueError, match=r"attn_mask of shape \(5, 5\) is not broadcastable"):
        A.scaled_dot_product_attention(q, k, k, attn_mask=torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must be a tensor"):  # a 3-D query used to hit .dim()
        A.scaled_dot_product_attention(q[0], k[0], k[0], attn_mask=[[True] * 6] * 5)


@pytest.mark.parametrize(
    "which, value, error, match",
    [
        ("max_seqlen_k", -1, ValueError, "max_seqlen_k must be >= 0, got -1"),
        ("max_seqlen_q", 3.5, TypeError, "max_seqlen_q must be an int, got float"),
        ("max_seqlen_k", True, TypeError, "max_seqlen_k must be an int, got bool"),
    ],
)
def test_varlen_max_seqlen_must_be_a_non_negative_int(which, value, error, match):
    t = torch.randn(5, 2, 4)
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    args = {"max_seqlen_q": 3, "max_seqlen_k": 3, which: value}
    with pytest.raises(error, match=match):
        A.flash_attn_varlen(t, t, t, cu, cu, **args)


# =====================================================================================================
# fastgen.ops.attention_decode
# =====================================================================================================


def _decode_inputs(sq=2, hq=4, hkv=2, d=8, length=700, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, sq, hq, d, generator=g)
    k = torch.randn(2, length, hkv, d, generator=g)
    v = torch.randn(2, length, hkv, d, generator=g)
    return q, k, v, torch.tensor([length, length - 3], dtype=torch.int32)


# (tensor, index, value): one poisoned element of sequence 0 at a key every query row sees
POISON = [
    ("k", (0, 5, 1, 3), math.nan),
    ("k", (0, 600, 0, 0), math.inf),  # +inf or -inf scores, by the sign of each query
    ("k", (0, 5, 1, 0), -math.inf),
    ("v", (0, 650, 0, 2), math.nan),
    ("v", (0, 5, 1, 7), math.inf),
    ("q", (0, 1, 2, 4), math.nan),
    ("q", (0, 0, 3, 1), math.inf),
]


@pytest.mark.parametrize("splits", [1, 3, 8])
@pytest.mark.parametrize("backend", DECODE_CPU)
@pytest.mark.parametrize("which, idx, val", POISON, ids=str)
def test_decode_non_finite_inputs_propagate_like_reference(backend, splits, which, idx, val):
    """NaN / inf in one split must reach the merged output as in the reference (a split whose running sum
    is NaN used to be dropped as empty, giving a finite wrong answer)."""
    q, k, v, lens = _decode_inputs()
    dict(q=q, k=k, v=v)[which][idx] = val
    ref = AD.attention_decode_ref(q, k, v, lens, upcast=True)
    assert not torch.isfinite(ref[0]).all()  # the case is meaningful
    with fastgen.use_backend(backend, op="attention_decode"):
        out = AD.attention_decode(q, k, v, lens, num_splits=splits)
    assert torch.equal(out.isnan(), ref.isnan())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5, equal_nan=True)


@pytest.mark.skipif("cpp" not in DECODE_CPU, reason="the C++ extension is not built")
def test_decode_cpp_long_split_accumulates_exactly():
    """2^25 keys in one split (a paged cache whose table points every page at one page: 32 KiB of memory).
    All scores are equal and every value is 3, so the output is exactly 3; a per-key float32 running
    accumulator stalls at 2^26 and gave 2.0."""
    page, n = 4096, 2**25
    kp = torch.zeros(1, page, 1, 1)
    vp = torch.full((1, page, 1, 1), 3.0)
    bt = torch.zeros(1, n // page, dtype=torch.int32)
    q = torch.ones(1, 1, 1, 1)
    with fastgen.use_backend("cpp", op="attention_decode"):
        out = AD.attention_decode_paged(q, kp, vp, bt, torch.tensor([n], dtype=torch.int32), num_splits=1)
    assert out.item() == 3.0


@pytest.mark.parametrize("backend", DECODE_CPU)
def test_decode_zero_length_cache_and_empty_batch(backend):
    q = torch.randn(2, 1, 2, 8)
    with fastgen.use_backend(backend, op="attention_decode"):
        empty = torch.zeros(2, 0, 2, 8)
        out = AD.attention_decode(q, empty, empty, torch.zeros(2, dtype=torch.int32))
        assert torch.equal(out, torch.zeros_like(q))  # no key: zeros, as SDPA with zero keys
        pages = torch.randn(3, 4, 2, 8)
        q0 = q[:0]
        out = AD.attention_decode_paged(
            q0, pages, pages, torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
        )
        assert out.shape == q0.shape


def test_decode_int64_indices_validated_before_narrowing():
    q, k, v, _ = _decode_inputs(length=16)
    lens = torch.tensor([2**31 + 4, 3], dtype=torch.int64)
    with pytest.raises(ValueError, match=r"cache_seqlens\[0\] = 2147483652"):
        AD.attention_decode(q, k, v, lens)
    pages = torch.randn(4, 4, 2, 8)
    bt = torch.tensor([[0, 1], [2**32 + 1, 0]], dtype=torch.int64)  # wraps to the valid page 1
    with pytest.raises(ValueError, match=r"block_table\[1, 0\] = 4294967297"):
        AD.attention_decode_paged(q, pages, pages, bt, torch.tensor([8, 3]))


def test_decode_lengths_past_int32_are_refused_not_wrapped():
    q, kp = torch.randn(1, 1, 1, 8), torch.randn(1, 4096, 1, 8)
    bt = torch.zeros(1, 2**19, dtype=torch.int32)  # 2^31 keys of capacity, all on page 0
    with pytest.raises(ValueError, match=r"cache_seqlens\[0\] = 2147483648"):  # wrapped to -2^31 before
        AD.attention_decode_paged(q, kp, kp, bt, torch.tensor([2**31]))


@pytest.mark.skipif("cpp" not in DECODE_CPU, reason="the C++ extension is not built")
def test_decode_cpp_entry_validates_int64_indices_itself():
    """fastgen._C.attention_decode_cpu takes int32 or int64 index tensors and checks their values in their
    own dtype before narrowing, without relying on the Python layer."""
    from fastgen import _ext

    q, k, v, _ = _decode_inputs(length=12)
    f = _ext.C.attention_decode_cpu
    with pytest.raises(RuntimeError, match=r"cache_seqlens\[1\] = 4294967300 out of range"):
        f(q, k, v, torch.tensor([3, 2**32 + 4]), None, 0.5, True, 0)
    pages = torch.randn(4, 6, 2, 8)
    bt = torch.tensor([[0, 1], [2**32 + 1, 0]])  # wraps to the valid page 1
    with pytest.raises(RuntimeError, match=r"block_table\[1, 0\] = 4294967297 out of range"):
        f(q, pages, pages, torch.tensor([8, 3]), bt, 0.5, True, 0)
    lens = torch.tensor([12, 9])
    ref = AD.attention_decode_ref(q, k, v, lens, scale=0.5)
    torch.testing.assert_close(f(q, k, v, lens, None, 0.5, True, 0).double(), ref, atol=1e-5, rtol=1e-5)
    bt = torch.tensor([[1, 0], [3, 2]]).t().contiguous().t()  # int64, column-major
    kp, vp = (t.reshape(4, 6, 2, 8)[[1, 0, 3, 2]] for t in (k, v))
    out = f(q, kp, vp, lens, bt, 0.5, True, 0)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", ["k_cache", "v_cache"])
def test_kv_cache_append_refuses_aliased_cache(which):
    good = torch.zeros(2, 4, 1, 8)
    caches = {"k_cache": good, "v_cache": good.clone()}
    caches[which] = torch.zeros(1, 4, 1, 8).expand(2, 4, 1, 8)  # both sequences write one slot
    new = torch.randn(2, 1, 1, 8)
    with pytest.raises(ValueError, match=f"{which} has internal overlap"):
        AD.kv_cache_append(caches["k_cache"], caches["v_cache"], new, new, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="same memory"):
        AD.kv_cache_append(good, good, new, new, torch.tensor([0, 1]))


@pytest.mark.parametrize("backend", DECODE_CPU)
@pytest.mark.parametrize("paged", [False, True])
def test_decode_q_with_strided_last_dim(backend, paged):
    """q views whose last dim is not contiguous (a broadcast token, every other element) are copied by the
    Python layer; the C++ kernel used to refuse them with a RuntimeError."""
    _, k, v, lens = _decode_inputs(length=12)
    base = torch.randn(2, 1, 1, 16)
    q = base[..., ::2].expand(2, 1, 4, 8)  # strides (16, 16, 0, 2)
    ref = AD.attention_decode_ref(q, k, v, lens)
    with fastgen.use_backend(backend, op="attention_decode"):
        if paged:  # the same caches as 2 pages of 6 per sequence
            kp, vp = (t.reshape(4, 6, 2, 8) for t in (k, v))
            bt = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
            out = AD.attention_decode_paged(q, kp, vp, bt, lens)
        else:
            out = AD.attention_decode(q, k, v, lens)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_kv_cache_append_refuses_partially_overlapping_caches():
    mem = torch.zeros(2 * 6 * 2 * 3 + 1)
    k_cache = mem[:-1].view(2, 6, 2, 3)
    v_cache = mem[1:].view(2, 6, 2, 3)  # k_cache shifted by one element
    new = torch.randn(2, 1, 2, 3)
    with pytest.raises(ValueError, match="k_cache and v_cache are the same memory or overlap"):
        AD.kv_cache_append(k_cache, v_cache, new, new, torch.tensor([0, 1]))
    assert not mem.any()  # refused before any write
    halves = torch.zeros(2, 2, 6, 2, 3)  # disjoint halves of one storage are fine
    AD.kv_cache_append(halves[0], halves[1], new, new * 2, torch.tensor([0, 1]))
    assert torch.equal(halves[1, 1, 1], 2 * new[1, 0])


# ---- GPU ---# ---- GPU ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("which, idx, val", POISON, ids=str)
def test_gpu_decode_non_finite_inputs_propagate_like_reference(splits, which, idx, val):
    q, k, v, lens = (t.cuda() for t in _decode_inputs(d=16))
    idx = (*idx[:3], idx[3] % 16)
    dict(q=q, k=k, v=v)[which][idx] = val
    ref = AD.attention_decode_ref(q, k, v, lens, upcast=True)
    with fastgen.use_backend("cuda", op="attention_decode"):
        out = AD.attention_decode(q, k, v, lens, num_splits=splits)
    assert torch.equal(out.isnan(), ref.isnan())
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4, equal_nan=True)


@pytest.mark.gpu
def test_gpu_decode_long_split_accumulates_exactly():
    """2^27 keys in one split (every page of the table is one 4096-key page): 2^24 keys per key group of
    the kernel. All scores are equal and every value is 3, so the output is exactly 3; a per-key float32
    running accumulator goes wrong past 2^24 / 3 keys (the kernel folds every 4096 keys, as the C++ one)."""
    page, n = 4096, 2**27
    kp = torch.zeros(1, page, 1, 4, device="cuda")
    vp = torch.full((1, page, 1, 4), 3.0, device="cuda")
    bt = torch.zeros(1, n // page, dtype=torch.int32, device="cuda")
    q = torch.ones(1, 1, 1, 4, device="cuda")
    lens = torch.tensor([n], dtype=torch.int32, device="cuda")
    with fastgen.use_backend("cuda", op="attention_decode"):
        out = AD.attention_decode_paged(q, kp, vp, bt, lens, num_splits=1)
    assert torch.equal(out.cpu(), torch.full((1, 1, 1, 4), 3.0))


@pytest.mark.parametrize("paged", [False, True])
def test_decode_empty_batch_with_stride_zero_q(paged):
    """An empty q with a stride-0 last dim (found by the property layer): an empty tensor counts as
    contiguous whatever its strides, so making q dense must not rely on .contiguous()."""
    q = torch.zeros(1, 1, 1, 8)[:0].as_strided((0, 1, 2, 8), (4, 0, 0, 0))
    seqlens = torch.zeros(0, dtype=torch.int32)
    for backend in DECODE_CPU:
        with fastgen.use_backend(backend):
            if paged:
                pages = torch.randn(3, 4, 2, 8)
                out = fastgen.attention_decode_paged(
                    q, pages, pages, torch.zeros(0, 2, dtype=torch.int32), seqlens
                )
            else:
                cache = torch.randn(0, 5, 2, 8)
                out = fastgen.attention_decode(q, cache, cache, seqlens)
        assert out.shape == (0, 1, 2, 8), backend


@pytest.mark.parametrize(
    "lens",
    [
        [4, 4, 4, 9, 9],  # two runs of one length each: views of the packed rows, outputs tile them
        [4, 9, 4, 9, 4],  # one length scattered: stacked copies
        [16],  # one sequence
        [3, 3, 0, 3],  # an empty sequence between equal ones: no longer one run
    ],
)
def test_varlen_cpu_groups_of_equal_lengths(lens):
    g = torch.Generator().manual_seed(1)
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)
    q, k, v = (
        torch.randn(sum(lens), 2, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in "qkv"
    )
    for causal in (False, True):
        out = A.flash_attn_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=causal)
        ref = A.flash_attn_varlen_ref(q, k, v, cu, cu, causal=causal)
        torch.testing.assert_close(out, ref)
        for a, b in zip(
            torch.autograd.grad(out.square().sum(), (q, k, v)),
            torch.autograd.grad(ref.square().sum(), (q, k, v)),
        ):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "cu, match",
    [
        ([1, 3, 5], r"cu_seqlens_q\[0\] must be 0, got cu_seqlens_q = \[1, 3, 5\]"),
        ([0, 3, 4], r"cu_seqlens_q\[-1\] must equal the total tokens 5"),
        ([0, 4, 3, 5], r"cu_seqlens_q must be non-decreasing, got cu_seqlens_q = \[0, 4, 3, 5\]"),
        ([0, 1, 5], r"cu_seqlens_q has a sequence longer than max_seqlen_q = 3"),
    ],
)
def test_varlen_cpu_cu_seqlens_errors_name_the_values(cu, match):
    t = torch.randn(5, 2, 4)
    ok = torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        A.flash_attn_varlen(t, t, t, torch.tensor(cu, dtype=torch.int32), ok, 3, 3)


@pytest.mark.parametrize(
    "kw, direct",
    [
        ({}, True),
        ({"attn_mask": "bool"}, True),
        ({"attn_mask": "float"}, True),
        ({"is_causal": True}, True),
        ({"attn_mask": "bool", "is_causal": True}, False),  # SDPA refuses both: fastgen combines them
        ({"attn_mask": "grad"}, False),  # the bias gradient is fastgen's
        ({"attn_mask": "float64"}, False),  # SDPA would round a mask of another dtype
        ({"scale": 1}, False),  # an int scale: the checked path converts it
    ],
)
def test_sdpa_cpu_calls_go_straight_to_torch_sdpa_when_nothing_changes(monkeypatch, kw, direct):
    """A valid 4-D CPU call that the checked path would hand to torch's SDPA unchanged skips that path's
    Python layer; every other call takes it. The values are the reference's either way."""
    seen = []
    real = A._sdpa_direct
    monkeypatch.setattr(A, "_sdpa_direct", lambda *a: seen.append(1) or real(*a))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g) for _ in range(3))
    args = dict(kw)
    m = args.get("attn_mask")
    if m == "bool":
        args["attn_mask"] = torch.rand(2, 1, 6, 6, generator=g) > 0.3
    elif m is not None:
        args["attn_mask"] = torch.randn(
            1, 4, 6, 6, generator=g, dtype=torch.float64 if m == "float64" else None
        )
        args["attn_mask"].requires_grad_(m == "grad")
    out = A.scaled_dot_product_attention(q, k, v, **args)
    assert bool(seen) == direct
    mask = args.get("attn_mask")
    mask = mask.detach().to(q.dtype) if mask is not None and mask.dtype != torch.bool else mask
    ref = A.attention_ref(q, k, v, mask, args.get("is_causal", False), scale=args.get("scale"))
    torch.testing.assert_close(out, ref.to(out.dtype), atol=1e-5, rtol=1e-5)

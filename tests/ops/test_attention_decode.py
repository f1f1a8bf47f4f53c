"""Tests of fastgen.ops.attention_decode (KV-cache decoding attention, contiguous and paged).

Oracles: the float64 reference (``attention_decode_ref``), itself checked against
``torch.nn.functional.scaled_dot_product_attention`` on the gathered valid prefix with an explicit
bottom-right causal mask. Numerics gate (the flash-attention rule): max |kernel - fp64| <= 2 x max |same-dtype
torch - fp64| + a small atol. Cache entries past cache_seqlens (and unused pages) are poisoned with NaN / inf.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastgen
from fastgen.ops import attention_decode as AD
from fastgen.ops.attention_decode import (
    attention_decode,
    attention_decode_paged,
    attention_decode_paged_ref,
    attention_decode_ref,
    kv_cache_append,
)

pytestmark = pytest.mark.usefixtures("poison_empty")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ATOL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float64: 1e-12}
CPU_BACKENDS = [b for b in ("cpp", "torch") if not AD.OP.backends[b].available()]
# (batch, seq_q, heads_q, heads_kv, head_dim, max_seqlen): MHA, GQA, MQA, odd head dims, seq_q up to 16
SHAPES = [
    (3, 1, 4, 4, 64, 37),
    (2, 4, 8, 2, 40, 50),
    (2, 3, 6, 1, 80, 33),
    (1, 16, 2, 1, 96, 70),
    (2, 2, 4, 2, 160, 20),
    (2, 1, 2, 2, 256, 9),
]


def make_inputs(b, sq, hq, hkv, d, length, dtype, lens=None, poison=math.nan, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, hq, d, generator=g).to(device, dtype)
    k = torch.randn(b, length, hkv, d, generator=g).to(device, dtype)
    v = torch.randn(b, length, hkv, d, generator=g).to(device, dtype)
    if lens is None:  # ragged: full, empty, and random lengths in between
        lens = [length, 0, *torch.randint(0, length + 1, (max(b - 2, 0),), generator=g).tolist()][:b]
    for i, n in enumerate(lens):
        k[i, n:] = poison
        v[i, n:] = poison
    return q, k, v, torch.tensor(lens, dtype=torch.int32, device=device)


def to_paged(k, v, lens, page, seed=0):
    """Scatter contiguous caches into randomly permuted pages; unused pages are NaN, unused table entries -1."""
    b, length, h, d = k.shape
    mp = -(-length // page) + 1
    n_pages = b * mp + 3
    g = torch.Generator().manual_seed(seed)
    bt = torch.randperm(n_pages, generator=g)[: b * mp].reshape(b, mp).to(torch.int32).to(k.device)
    kp = torch.full((n_pages, page, h, d), math.nan, dtype=k.dtype, device=k.device)
    vp = kp.clone()
    for i in range(b):
        for p in range(-(-length // page)):
            n = min(page, length - p * page)
            kp[bt[i, p], :n] = k[i, p * page : p * page + n]
            vp[bt[i, p], :n] = v[i, p * page : p * page + n]
        bt[i, -(-int(lens[i]) // page) :] = -1
    return kp, vp, bt


def sdpa_oracle(q, k, v, lens, causal, scale=None):
    """float64 SDPA on each sequence's valid prefix with an explicit bottom-right causal mask."""
    b, sq, hq, d = q.shape
    out = torch.zeros(b, sq, hq, d, dtype=torch.float64)
    for i in range(b):
        n = int(lens[i])
        if n == 0:
            continue
        qi = q[i].double().transpose(0, 1)  # (Hq, Sq, D)
        ki = k[i, :n].double().transpose(0, 1).repeat_interleave(hq // k.shape[2], dim=0)
        vi = v[i, :n].double().transpose(0, 1).repeat_interleave(hq // k.shape[2], dim=0)
        mask = torch.arange(n)[None, :] < (n - sq + torch.arange(sq)[:, None] + 1) if causal else None
        o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale).transpose(0, 1)
        out[i] = torch.nan_to_num(o, nan=0.0)  # rows without a visible key: zeros by definition
    return out


def assert_2x(out, ref64, same_dtype, what=""):
    assert out.shape == ref64.shape and torch.isfinite(out).all(), f"{what}: non-finite output"
    err = (out.double() - ref64).abs().max().item()
    base = (same_dtype.double() - ref64).abs().max().item()
    assert err <= 2 * base + ATOL[out.dtype], f"{what}: error {err:.3g} > 2 x torch {base:.3g} + atol"


# =====================================================================================================
# numerics
# =====================================================================================================


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES[:4], ids=str)
def test_reference_matches_sdpa(shape, causal):
    q, k, v, lens = make_inputs(*shape, torch.float64)
    ref = attention_decode_ref(q, k, v, lens, causal=causal)
    torch.testing.assert_close(ref, sdpa_oracle(q, k, v, lens, causal), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype, causal, backend):
    q, k, v, lens = make_inputs(*shape, dtype)
    with fastgen.use_backend(backend, op="attention_decode"):
        out = attention_decode(q, k, v, lens, causal=causal)
    assert out.dtype == dtype and out.is_contiguous()
    ref = attention_decode_ref(q, k, v, lens, causal=causal)
    assert_2x(out, ref, attention_decode_ref(q, k, v, lens, causal=causal, upcast=False), f"{backend}")
    assert_2x(
        out,
        sdpa_oracle(q, k, v, lens, causal),
        attention_decode_ref(q, k, v, lens, causal=causal, upcast=False),
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float64_and_scale(backend):
    q, k, v, lens = make_inputs(2, 3, 4, 2, 24, 30, torch.float64)
    with fastgen.use_backend(backend, op="attention_decode"):
        out = attention_decode(q, k, v, lens, scale=0.37)
    torch.testing.assert_close(out, sdpa_oracle(q, k, v, lens, True, scale=0.37), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("splits", [1, 2, 5, 64, 500])
def test_num_splits(splits, dtype):
    q, k, v, lens = make_inputs(3, 2, 8, 2, 64, 300, dtype, lens=[300, 1, 257])
    ref = attention_decode_ref(q, k, v, lens)
    for backend in CPU_BACKENDS:
        with fastgen.use_backend(backend, op="attention_decode"):
            out = attention_decode(q, k, v, lens, num_splits=splits)
        assert_2x(out, ref, attention_decode_ref(q, k, v, lens, upcast=False), f"{backend} splits={splits}")


@pytest.mark.parametrize("poison", [math.nan, math.inf, -1e4])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_poison_does_not_leak(poison, backend):
    q, k, v, lens = make_inputs(3, 2, 4, 2, 32, 40, torch.float16, lens=[40, 3, 17], poison=poison)
    clean = [t.clone() for t in (k, v)]
    for t in clean:
        t[1, 3:], t[2, 17:] = 0, 0
    with fastgen.use_backend(backend, op="attention_decode"):
        out = attention_decode(q, k, v, lens, num_splits=3)
        expect = attention_decode(q, *clean, lens, num_splits=3)
    torch.testing.assert_close(out, expect, rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rows_without_keys_are_zero(backend):
    # len 0, and causal with len < seq_q: the first seq_q - len queries see nothing
    q, k, v, lens = make_inputs(2, 4, 2, 1, 16, 8, torch.float32, lens=[0, 2])
    with fastgen.use_backend(backend, op="attention_decode"):
        out = attention_decode(q, k, v, lens)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all() and (out[1, :2] == 0).all() and (out[1, 2:] != 0).any()


@pytest.mark.parametrize("page", [1, 5, 16])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_paged_equals_contiguous(page, backend):
    q, k, v, lens = make_inputs(3, 2, 6, 3, 48, 45, torch.float32)
    kp, vp, bt = to_paged(k, v, lens, page)
    with fastgen.use_backend(backend, op="attention_decode"):
        out = attention_decode(q, k, v, lens, num_splits=1)
        paged = attention_decode_paged(q, kp, vp, bt, lens, num_splits=1)
    torch.testing.assert_close(paged, out, rtol=1e-6, atol=1e-6)
    ref = attention_decode_paged_ref(q, kp, vp, bt, lens)
    torch.testing.assert_close(ref, attention_decode_ref(q, k, v, lens), rtol=1e-12, atol=1e-12)


def test_strided_cache_and_int64_lens():
    # a cache sliced out of a bigger buffer (non-contiguous batch / seq / head strides), int64 lengths
    big = torch.randn(3, 40, 5, 2 * 64)
    k, v = big[:, :33, 1:4, :64], big[:, :33, 1:4, 64:]
    q = torch.randn(3, 2, 6, 64)
    lens = torch.tensor([33, 7, 20])
    ref = attention_decode_ref(q, k, v, lens)
    for backend in CPU_BACKENDS:
        with fastgen.use_backend(backend, op="attention_decode"):
            torch.testing.assert_close(attention_decode(q, k, v, lens).double(), ref, rtol=1e-5, atol=1e-5)


# =====================================================================================================
# errors
# =====================================================================================================


def _bad_cases():
    q, k, v, lens = make_inputs(2, 1, 4, 2, 16, 8, torch.float32)
    kp, vp, bt = to_paged(k, v, lens, 4)
    meta = torch.empty(2, dtype=torch.int32, device="meta")
    return {
        "q 3-D": ((q[0], k, v, lens), "q must be 4-D"),
        "k dtype": ((q, k.half(), v, lens), "k_cache has dtype"),
        "k device": ((q, k.to("meta"), v, lens), "k_cache is on meta"),
        "heads": ((q[:, :, :3], k, v, lens), r"heads_q \(3.*multiple of heads_kv \(2"),
        "head_dim > 256": (
            (torch.randn(2, 1, 4, 300), torch.randn(2, 8, 2, 300), torch.randn(2, 8, 2, 300), lens),
            "head_dim must be in",
        ),
        "v head_dim": ((q, k, torch.randn(2, 8, 2, 8), lens), "v must have k's head_dim"),
        "k head_dim": ((q, k[..., :8], v[..., :8], lens), "k_cache head_dim 8 != q head_dim 16"),
        "k batch": ((q, k[:1], v[:1], lens), "k_cache has batch 1"),
        "last dim strided": ((q, torch.randn(2, 8, 2, 32)[..., ::2], v, lens), "contiguous last dim"),
        "lens dtype": ((q, k, v, lens.float()), "cache_seqlens must be int32 or int64 of shape"),
        "lens shape": ((q, k, v, lens[:1]), r"of shape \(2,\)"),
        "lens device": ((q, k, v, meta), "cache_seqlens is on meta"),
        "lens > max_seqlen": ((q, k, v, torch.tensor([9, 1], dtype=torch.int32)), r"out of range \[0, 8\]"),
        "lens < 0": ((q, k, v, torch.tensor([-1, 1], dtype=torch.int32)), "out of range"),
        "paged table range": (
            (q, kp, vp, bt.masked_fill(bt >= 0, 99), lens),
            r"block_table entries.*\[0, \d+\)",
        ),
        "paged table dtype": ((q, kp, vp, bt.float(), lens), "block_table must be int32"),
        "paged table batch": ((q, kp, vp, bt[:1], lens), "block_table must be int32 of shape"),
        "paged lens": ((q, kp, vp, bt[:, :1], lens), r"cache_seqlens out of range \[0, 4\]"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs(case):
    args, match = BAD[case]
    fn = attention_decode_paged if case.startswith("paged") else attention_decode
    with pytest.raises(ValueError, match=match):
        fn(*args)


def test_bad_keywords():
    q, k, v, lens = make_inputs(2, 1, 4, 2, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="num_splits"):
        attention_decode(q, k, v, lens, num_splits=-1)
    with pytest.raises(ValueError, match="scale must be finite"):
        attention_decode(q, k, v, lens, scale=math.inf)


# =====================================================================================================
# torch.library, torch.compile, autograd, kv_cache_append
# =====================================================================================================


def test_opcheck():
    q, k, v, lens = make_inputs(2, 2, 4, 2, 16, 12, torch.float32, lens=[12, 5], poison=0.0)
    kp, vp, bt = to_paged(k, v, lens, 4)
    kp, vp, bt = kp.nan_to_num(0.0), vp.nan_to_num(0.0), bt.clamp(min=0)
    torch.library.opcheck(AD._decode_op, (q, k, v, lens, 0.25, True, 0))
    torch.library.opcheck(AD._decode_paged_op, (q, kp, vp, bt, lens, 0.25, False, 2))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_fullgraph(backend):
    q, k, v, lens = make_inputs(2, 2, 4, 2, 16, 12, torch.float32, lens=[12, 5])
    kp, vp, bt = to_paged(k, v, lens, 4)

    def step(q, k, v, kp, vp, bt, lens):
        return attention_decode(q, k, v, lens) + attention_decode_paged(q, kp, vp, bt, lens)

    with fastgen.use_backend(backend, op="attention_decode"):
        expect = step(q, k, v, kp, vp, bt, lens)
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, kp, vp, bt, lens)
    torch.testing.assert_close(got, expect)


def test_autograd_routes_to_torch():
    q, k, v, lens = make_inputs(2, 2, 4, 2, 16, 12, torch.float64, lens=[12, 5], poison=0.0)
    q.requires_grad_(True)
    attention_decode(q, k, v, lens).sum().backward()
    q64 = q.detach().clone().requires_grad_(True)
    sdpa_oracle(q64, k, v, lens, True).sum().backward()
    torch.testing.assert_close(q.grad, q64.grad)
    with fastgen.use_backend("cpp", op="attention_decode"), pytest.raises(fastgen.BackendUnavailableError):
        attention_decode(q, k, v, lens)
    with torch.no_grad(), fastgen.use_backend(CPU_BACKENDS[0], op="attention_decode"):
        attention_decode(q, k, v, lens)


def test_kv_cache_append_then_decode():
    b, hkv, d, length = 3, 2, 16, 20
    k_full, v_full = torch.randn(b, length, hkv, d), torch.randn(b, length, hkv, d)
    k_cache, v_cache = torch.full_like(k_full, math.nan), torch.full_like(v_full, math.nan)
    lens = torch.tensor([0, 4, 15], dtype=torch.int32)
    for i, n in enumerate(lens.tolist()):
        k_cache[i, :n], v_cache[i, :n] = k_full[i, :n], v_full[i, :n]
    s_new = 3
    rows = torch.arange(b)[:, None]
    pos = lens.long()[:, None] + torch.arange(s_new)
    kv_cache_append(k_cache, v_cache, k_full[rows, pos], v_full[rows, pos], lens)
    new_lens = lens + s_new
    for i, n in enumerate(new_lens.tolist()):
        assert torch.equal(k_cache[i, :n], k_full[i, :n]) and k_cache[i, n:].isnan().all()
        assert torch.equal(v_cache[i, :n], v_full[i, :n])
    q = torch.randn(b, s_new, 4, d)
    out = attention_decode(q, k_cache, v_cache, new_lens)
    torch.testing.assert_close(
        out.double(), sdpa_oracle(q, k_full, v_full, new_lens, True), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="cache_seqlens \\+ s_new"):
        kv_cache_append(k_cache, v_cache, k_full[:, :6], v_full[:, :6], torch.tensor([0, 0, 15]))
    with pytest.raises(ValueError, match="k_new has dtype"):
        kv_cache_append(k_cache, v_cache, k_full[:, :1].half(), v_full[:, :1], lens)


# =====================================================================================================
# GPU: the CUDA kernel at real sizes
# =====================================================================================================

needs_cuda_backend = pytest.mark.skipif(
    bool(AD.OP.backends["cuda"].available()), reason="cuda backend unavailable (needs a GPU and a CUDA build)"
)

GPU_SHAPES = [
    (4, 1, 32, 32, 128, 4096),  # GLaM-like MHA
    (8, 1, 32, 8, 128, 1000),  # GQA, odd length
    (2, 4, 16, 1, 64, 1280),  # MQA, DALL-E-like, seq_q > 1
    (3, 16, 8, 2, 40, 333),
    (2, 2, 4, 4, 80, 777),
    (2, 1, 8, 2, 96, 513),
    (2, 3, 4, 2, 160, 1031),
    (1, 1, 4, 1, 256, 3000),
]


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_cuda_matches_reference(shape, dtype, causal):
    q, k, v, lens = make_inputs(*shape, dtype, device="cuda")
    ref = attention_decode_ref(q, k, v, lens, causal=causal)
    same = attention_decode_ref(q, k, v, lens, causal=causal, upcast=False)
    for splits in (0, 1, 3, 17, 128):
        with fastgen.use_backend("cuda", op="attention_decode"):
            out = attention_decode(q, k, v, lens, causal=causal, num_splits=splits)
        assert_2x(out, ref, same, f"cuda splits={splits}")


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page", [16, 256])
def test_cuda_paged_equals_contiguous(dtype, page):
    q, k, v, lens = make_inputs(5, 2, 16, 4, 128, 1500, dtype, device="cuda")
    kp, vp, bt = to_paged(k, v, lens, page)
    with fastgen.use_backend("cuda", op="attention_decode"):
        for splits in (1, 4, 9):  # explicit: the heuristic looks at the capacity, which differs when paged
            out = attention_decode(q, k, v, lens, num_splits=splits)
            torch.testing.assert_close(
                attention_decode_paged(q, kp, vp, bt, lens, num_splits=splits), out, rtol=0, atol=0
            )
    ref = attention_decode_ref(q, k, v, lens)
    assert_2x(out, ref, attention_decode_ref(q, k, v, lens, upcast=False), "cuda paged")


@pytest.mark.gpu
@needs_cuda_backend
def test_cuda_poison_zero_rows_and_fallback():
    q, k, v, lens = make_inputs(
        3, 4, 8, 2, 64, 300, torch.float16, lens=[0, 2, 299], poison=math.inf, device="cuda"
    )
    with fastgen.use_backend("cuda", op="attention_decode"):
        out = attention_decode(q, k, v, lens, num_splits=7)
    assert torch.isfinite(out).all() and (out[0] == 0).all() and (out[1, :2] == 0).all()
    assert_2x(out, attention_decode_ref(q, k, v, lens), attention_decode_ref(q, k, v, lens, upcast=False))
    # head_dim 36 in fp16 is not a whole number of 16-byte packs: dispatch serves it from torch
    call = AD._make_call(q[..., :36], k[..., :36], v[..., :36], False)
    assert AD.OP.dispatch(call).name == "torch"
    with fastgen.use_backend("cuda", op="attention_decode"), pytest.raises(fastgen.BackendUnavailableError):
        attention_decode(q[..., :36].contiguous(), k[..., :36], v[..., :36], lens)


def test_kv_cache_append_cpu_ragged_and_out_of_range():
    """The CPU path reads the lengths on the host: ragged appends land at each row's own length, equal
    lengths as one slice, and a length past the cache is refused by name before anything is written."""
    g = torch.Generator().manual_seed(0)
    kc, vc = torch.randn(3, 10, 2, 4, generator=g), torch.randn(3, 10, 2, 4, generator=g)
    kn, vn = torch.randn(3, 2, 2, 4, generator=g), torch.randn(3, 2, 2, 4, generator=g)
    for lens in ([1, 4, 8], [5, 5, 5]):
        k2, v2 = kc.clone(), vc.clone()
        AD.kv_cache_append(k2, v2, kn, vn, torch.tensor(lens, dtype=torch.int32))
        want_k, want_v = kc.clone(), vc.clone()
        for i, n in enumerate(lens):
            want_k[i, n : n + 2], want_v[i, n : n + 2] = kn[i], vn[i]
        assert torch.equal(k2, want_k) and torch.equal(v2, want_v)
    k2 = kc.clone()
    with pytest.raises(
        ValueError, match=r"cache_seqlens \+ s_new \(2\) must be in \[0, 10\].*cache_seqlens\[2\] = 9"
    ):
        AD.kv_cache_append(k2, vc.clone(), kn, vn, torch.tensor([0, 3, 9]))
    assert torch.equal(k2, kc)  # nothing written

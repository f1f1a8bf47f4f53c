"""Tests of the C++ CPU attention_decode kernel (csrc/attention_decode/attention_decode_cpu.cpp) on every
SIMD path this CPU runs (FASTGEN_CPU_ISA=scalar|avx2|avx512; paths above the CPU's best skip).

Oracle: the float64 reference ``attention_decode_ref`` / ``attention_decode_paged_ref``; the numerics gate is
the one of tests/ops/test_attention_decode.py (max |kernel - fp64| <= 2 x max |same-dtype torch - fp64| + a
small atol). Shapes cover MHA / GQA / MQA, head dims below, between and above the vector widths (odd ones
too), lengths that are not a multiple of the 16-key tile, ragged and empty sequences, paged caches, caches
whose heads are not contiguous, and caches longer than one work item (4096 keys). Cache entries past
cache_seqlens are NaN: the kernel must never read them.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import fastgen
from fastgen import _ext
from fastgen.ops import attention_decode as AD
from fastgen.ops.attention_decode import (
    attention_decode,
    attention_decode_paged,
    attention_decode_paged_ref,
    attention_decode_ref,
)

C = _ext.C if not AD.OP.backends["cpp"].available() else None  # available(): reasons it is not
pytestmark = [
    pytest.mark.skipif(C is None, reason="fastgen._C (the cpp backend) is not built"),
    pytest.mark.usefixtures("poison_empty"),
]
ISAS = ("scalar", "avx2", "avx512")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ATOL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    best = C.cpu_isa_best()
    if ISAS.index(request.param) > ISAS.index(best):
        pytest.skip(f"this CPU's best SIMD path is {best}")
    monkeypatch.setenv("FASTGEN_CPU_ISA", request.param)
    assert C.cpu_isa() == request.param
    return request.param


@pytest.fixture
def threads():
    """Restores torch's thread count after a test that changes it."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def make(b, sq, hq, hkv, d, length, dtype, lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, hq, d, generator=g).to(dtype)
    k = torch.randn(b, length, hkv, d, generator=g).to(dtype)
    v = torch.randn(b, length, hkv, d, generator=g).to(dtype)
    for i, n in enumerate(lens):
        k[i, n:] = math.nan
        v[i, n:] = math.nan
    return q, k, v, torch.tensor(lens, dtype=torch.int32)


def paged(k, v, lens, page, seed=0):
    """Scatter contiguous caches into permuted pages; unused pages NaN, unused table entries -1."""
    b, length, h, d = k.shape
    mp = -(-length // page)
    n_pages = b * mp + 2
    g = torch.Generator().manual_seed(seed)
    bt = torch.randperm(n_pages, generator=g)[: b * mp].reshape(b, mp).to(torch.int32)
    kp = torch.full((n_pages, page, h, d), math.nan, dtype=k.dtype)
    vp = kp.clone()
    for i in range(b):
        for p in range(mp):
            n = min(page, length - p * page)
            kp[bt[i, p], :n] = k[i, p * page : p * page + n]
            vp[bt[i, p], :n] = v[i, p * page : p * page + n]
        bt[i, -(-int(lens[i]) // page) :] = -1
    return kp, vp, bt


def check(out, ref64, same, what):
    assert out.shape == ref64.shape and torch.isfinite(out).all(), f"{what}: non-finite output"
    err = (out.double() - ref64).abs().max().item()
    base = (same.double() - ref64).abs().max().item()
    assert err <= 2 * base + ATOL[out.dtype], f"{what}: error {err:.3g} > 2 x torch {base:.3g} + atol"


# (batch, seq_q, heads_q, heads_kv, head_dim, max_seqlen, lens): odd head dims below one 4-lane vector (3),
# between the 8 / 16 / 32-float blocks (19, 37), at the limit (256); lengths off the 16-key tile
CASES = [
    (3, 1, 8, 8, 64, 70, [70, 0, 33]),  # MHA, ragged + empty
    (2, 3, 12, 4, 37, 45, [45, 45]),  # GQA, causal seq_q 3, full
    (2, 1, 4, 1, 19, 21, [21, 5]),  # MQA
    (2, 2, 4, 2, 3, 17, [17, 1]),  # len 1 < seq_q: the first query sees nothing
    (1, 1, 2, 2, 256, 30, [29]),
]


@functools.cache
def case_data(i, dtype):
    """Inputs of CASES[i] and their references (computed once, shared by the ISA paths)."""
    b, sq, hq, hkv, d, length, lens = CASES[i]
    q, k, v, sl = make(b, sq, hq, hkv, d, length, dtype, lens, seed=i)
    refs = {
        causal: (
            attention_decode_ref(q, k, v, sl, causal=causal),
            attention_decode_ref(q, k, v, sl, causal=causal, upcast=False),
        )
        for causal in (True, False)
    }
    kp, vp, bt = paged(k, v, sl, page=5)
    refs["paged"] = (attention_decode_paged_ref(q, kp, vp, bt, sl), refs[True][1])
    return q, k, v, sl, kp, vp, bt, refs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_isa_matches_reference(isa, dtype):
    for i, case in enumerate(CASES):
        q, k, v, sl, kp, vp, bt, refs = case_data(i, dtype)
        with fastgen.use_backend("cpp", op="attention_decode"):
            for causal in (True, False):
                out = attention_decode(q, k, v, sl, causal=causal)
                assert out.dtype == dtype
                check(out, *refs[causal], f"{isa} {dtype} {case} causal={causal}")
            out = attention_decode_paged(q, kp, vp, bt, sl)
        check(out, *refs["paged"], f"{isa} {dtype} paged {case}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_long_caches_many_items_and_threads(isa, dtype, threads):
    """More keys than one work item holds (4096) and ragged lengths: the items of a sequence are merged
    through their log-sum-exp, with 1 and 2 threads and explicit split counts."""
    q, k, v, sl = make(3, 2, 4, 2, 24, 4133, dtype, [4133, 700, 4100])
    ref = attention_decode_ref(q, k, v, sl)
    same = attention_decode_ref(q, k, v, sl, upcast=False)
    outs = []
    with fastgen.use_backend("cpp", op="attention_decode"):
        for n in (1, 2):
            torch.set_num_threads(n)
            for splits in (0, 1, 3):
                out = attention_decode(q, k, v, sl, num_splits=splits)
                check(out, ref, same, f"{isa} threads={n} splits={splits}")
                outs.append(out)
    for out in outs[1:]:  # only the summation order differs between the splits
        torch.testing.assert_close(out, outs[0], rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_strided_cache_layouts(isa, dtype):
    """Heads that are not one contiguous run: a (B, H, S, D) cache seen as (B, S, H, D), and a slice of a
    wider last dim. The kernel follows the strides."""
    b, sq, hq, hkv, d, length, lens = 2, 1, 8, 4, 40, 50, [50, 23]
    q, k, v, sl = make(b, sq, hq, hkv, d, length, dtype, lens)
    ref = attention_decode_ref(q, k, v, sl)
    same = attention_decode_ref(q, k, v, sl, upcast=False)
    bhsd = (k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2))
    wide = []
    for t in (k, v):
        w = torch.full((b, length, hkv, d + 7), math.nan, dtype=dtype)
        w[..., :d] = t
        wide.append(w[..., :d])
    with fastgen.use_backend("cpp", op="attention_decode"):
        for kk, vv in (bhsd, wide):
            assert kk.stride(2) != d
            check(attention_decode(q, kk, vv, sl), ref, same, f"{isa} {dtype} strides {kk.stride()}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16bit_values_convert_exactly(isa, dtype):
    """With zero keys every visible key has weight 1 / n: the output is the mean of V, so the in-register
    conversion of subnormal, extreme, signed-zero, inf and NaN values is checked against float64."""
    info = torch.finfo(dtype)
    big = info.max if dtype == torch.float16 else 2.0**120  # 16 x bfloat16's max overflows a float32 sum
    special = [info.tiny / 4, -info.tiny / 8, info.tiny, big, -big / 2, -0.0, 1.0, -3.5e-3, 0.1]
    n, d = 16, 37  # d: vector lanes and a scalar tail
    g = torch.Generator().manual_seed(1)
    v = torch.randn(1, n, 2, d, generator=g).to(dtype)
    v[0, :, 0, : len(special)] = torch.tensor(special, dtype=torch.float64).to(dtype)
    v[0, :, 0, len(special) :] = torch.tensor(special[:4], dtype=torch.float64).to(dtype).repeat(7)[: d - 9]
    v[0, 3, 1, 5] = math.inf
    v[0, 7, 1, 6] = math.nan
    k = torch.zeros(1, n, 2, d, dtype=dtype)
    q = torch.randn(1, 1, 2, d, generator=g).to(dtype)
    sl = torch.tensor([n], dtype=torch.int32)
    with fastgen.use_backend("cpp", op="attention_decode"):
        out = attention_decode(q, k, v, sl)
    mean = v.double().mean(dim=1, keepdim=True).to(dtype)  # the float32 mean rounds to the same 16-bit value
    finite = torch.ones_like(mean, dtype=torch.bool)
    finite[0, 0, 1, 5:7] = False
    assert torch.equal(out[finite], mean[finite]), f"{isa} {dtype}"
    assert out[0, 0, 1, 5] == math.inf and math.isnan(out[0, 0, 1, 6])


def test_isa_paths_agree(monkeypatch):
    """The vector paths only change the summation order: every path agrees with the scalar one closely."""
    best = C.cpu_isa_best()
    q, k, v, sl = make(2, 2, 8, 2, 72, 90, torch.float32, [90, 41])
    outs = {}
    with fastgen.use_backend("cpp", op="attention_decode"):
        for name in ISAS[: ISAS.index(best) + 1]:
            monkeypatch.setenv("FASTGEN_CPU_ISA", name)
            outs[name] = attention_decode(q, k, v, sl)
    for name, out in outs.items():
        torch.testing.assert_close(out, outs["scalar"], rtol=1e-5, atol=1e-6, msg=name)


def test_nan_in_visible_key_stays_in_its_row(isa):
    """A NaN / inf among the visible keys or values gives NaN (or inf) exactly where the reference does, and
    nowhere else, whichever item of the split cache holds it."""
    q, k, v, sl = make(2, 1, 4, 2, 16, 600, torch.float32, [600, 300])
    k[0, 450, 1, 3] = math.nan  # sequence 0, KV head 1 (query heads 2, 3)
    v[1, 10, 0, 2] = math.inf  # sequence 1, KV head 0, one column
    ref = attention_decode_ref(q, k, v, sl)
    with fastgen.use_backend("cpp", op="attention_decode"):
        for splits in (0, 1, 4):
            out = attention_decode(q, k, v, sl, num_splits=splits)
            assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
            ok = torch.isfinite(ref)
            torch.testing.assert_close(out[ok].double(), ref[ok], rtol=1e-5, atol=1e-6)

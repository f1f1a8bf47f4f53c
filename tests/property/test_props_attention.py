"""Properties of the attention ops: flash_attention, scaled_dot_product_attention, flash_attn_varlen,
attention_decode, attention_decode_paged and kv_cache_append."""

import pytest
import torch
from _props import (
    FLOATS,
    LAYOUTS,
    READ_ONLY_LAYOUTS,
    Case,
    assert_2x,
    backends,
    make,
    raises_naming,
    scaled,
    seeds,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import fastgen
from fastgen.ops import attention as A
from fastgen.ops import attention_decode as AD

CAUSAL = (False, True, "bottom_right")


@st.composite
def attention_cases(draw, backend_names=("torch",), dtypes=FLOATS, max_len=9, max_d=16):
    backend = draw(st.sampled_from(backend_names))
    dtype = draw(st.sampled_from(dtypes))
    b, hk, group = draw(st.integers(0, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    sq, sk = draw(st.integers(1, max_len)), draw(st.integers(1, max_len))
    d, dv = draw(st.integers(1, max_d)), draw(st.integers(1, max_d))
    gen = torch.Generator().manual_seed(draw(seeds))
    lay = [draw(st.sampled_from(READ_ONLY_LAYOUTS)) for _ in range(3)]
    q = make((b, hk * group, sq, d), dtype, lay[0], gen)
    k = make((b, hk, sk, d), dtype, lay[1], gen, scale=draw(st.sampled_from([1.0, 3.0])))
    v = make((b, hk, sk, dv), dtype, lay[2], gen)
    kw = {"causal": draw(st.sampled_from(CAUSAL))}
    if draw(st.booleans()):
        kw["scale"] = draw(st.floats(0.05, 2.0))
    bias_shape = draw(st.sampled_from([None, (1, 1, 1, sk), (b, 1, sq, sk), (b, hk * group, sq, sk)]))
    if bias_shape is not None:
        kw["bias"] = make(bias_shape, dtype, draw(st.sampled_from(LAYOUTS)), gen)
    if draw(st.booleans()):
        kw["mask"] = torch.rand((b, 1, 1, sk), generator=gen) > 0.3  # key padding
    return Case(backend, dtype, q, k, v, kw)


def _ref_args(kw):
    mask = kw.get("mask")
    bias = kw.get("bias")
    if bias is not None and mask is not None:
        bias = bias.double().masked_fill(~mask, float("-inf"))
    return {
        "attn_mask": bias if bias is not None else mask,
        "is_causal": kw["causal"],
        "scale": kw.get("scale"),
    }


def check_attention(backend, dtype, q, k, v, kw):
    with fastgen.use_backend(backend, op="attention"):
        out = A.flash_attention(q, k, v, **kw)
    assert out.dtype == dtype
    ra = _ref_args(kw)
    ref = A.attention_ref(q, k, v, **ra, upcast=True).double()
    same_mask = (
        ra["attn_mask"].to(dtype)
        if ra["attn_mask"] is not None and ra["attn_mask"].is_floating_point()
        else ra["attn_mask"]
    )
    same = A.attention_ref(q, k, v, **{**ra, "attn_mask": same_mask}, upcast=False)
    assert_2x(out, ref, same, dtype, f"flash_attention {backend}")


@scaled(2)
@given(attention_cases())
def test_flash_attention_matches_reference(case):
    check_attention(*case)


@given(
    st.integers(0, 2), st.integers(1, 3), st.integers(1, 5), st.sampled_from(FLOATS), st.sampled_from(CAUSAL)
)
def test_no_keys_give_zeros(b, h, sq, dtype, causal):
    """Sk = 0: every row sees no key and gives zeros (the documented convention), op and reference alike."""
    q, k, v = (
        torch.randn(b, h, sq, 4).to(dtype),
        torch.zeros(b, h, 0, 4, dtype=dtype),
        torch.zeros(b, h, 0, 3, dtype=dtype),
    )
    with fastgen.use_backend("torch", op="attention"):
        out = A.flash_attention(q, k, v, causal=causal)
    assert out.shape == (b, h, sq, 3) and not out.abs().any()
    ref = A.attention_ref(q, k, v, is_causal=causal)
    assert ref.shape == (b, h, sq, 3) and not ref.abs().any()


@settings(max_examples=3)
@given(attention_cases(backend_names=("triton",), dtypes=(torch.float32,), max_len=5, max_d=8))
def test_flash_attention_triton_matches_reference(case):
    """The Triton kernel under the interpreter: tiny shapes, few examples."""
    check_attention(*case)


@given(st.integers(3, 5), st.booleans(), st.booleans(), st.sampled_from(FLOATS), seeds)
def test_sdpa_matches_reference(ndim, causal, gqa, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    lead = (2, 3, 1)[: ndim - 2]  # 3-D: (B, S, D); 4-D: (B, H, S, D); 5-D: (B, X, H, S, D)
    hq, hk = (lead[-1] * 2, lead[-1]) if gqa and ndim > 3 else (lead[-1], lead[-1])
    q = (
        make((*lead[:-1], hq, 5, 7), dtype, "transposed", gen)
        if ndim > 3
        else make((2, 5, 7), dtype, "offset", gen)
    )
    kshape = (*lead[:-1], hk, 6, 7) if ndim > 3 else (2, 6, 7)
    k, v = make(kshape, dtype, "strided", gen), make(kshape, dtype, "contiguous", gen)
    mask = torch.rand((5, 6), generator=gen) > 0.2
    out = fastgen.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
    if ndim == 3:
        q4, k4, v4 = q[:, None], k[:, None], v[:, None]
    else:
        q4, k4, v4 = (t.reshape(-1, *t.shape[-3:]) for t in (q, k, v))
    ref = A.attention_ref(q4, k4, v4, mask, causal, upcast=True).double().reshape(out.shape)
    same = A.attention_ref(q4, k4, v4, mask, causal, upcast=False).reshape(out.shape)
    assert_2x(out, ref, same, dtype, "scaled_dot_product_attention")


@st.composite
def varlen_cases(draw, empty_keys=False):
    dtype = draw(st.sampled_from(FLOATS))
    n = draw(st.integers(1, 3))
    lq = draw(st.lists(st.integers(0, 6), min_size=n, max_size=n))
    lk = draw(st.lists(st.integers(0 if empty_keys else 1, 6), min_size=n, max_size=n))
    hk, group, d = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 9))
    gen = torch.Generator().manual_seed(draw(seeds))
    cu_dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=cu_dtype)
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=cu_dtype)
    q = make((sum(lq), hk * group, d), dtype, draw(st.sampled_from(LAYOUTS)), gen)
    k = make((sum(lk), hk, d), dtype, draw(st.sampled_from(LAYOUTS)), gen)
    v = make((sum(lk), hk, d), dtype, draw(st.sampled_from(LAYOUTS)), gen)
    return Case(dtype, q, k, v, cu_q, cu_k, max(lq), max(lk), draw(st.booleans()))


@given(varlen_cases())
def test_varlen_matches_reference(case):
    dtype, q, k, v, cu_q, cu_k, mq, mk, causal = case
    with fastgen.use_backend("torch", op="attention"):
        out = fastgen.flash_attn_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=causal)
    ref = A.flash_attn_varlen_ref(q, k, v, cu_q, cu_k, causal=causal, upcast=True).double()
    same = A.flash_attn_varlen_ref(q, k, v, cu_q, cu_k, causal=causal, upcast=False)
    assert_2x(out, ref, same, dtype, "flash_attn_varlen")


@settings(max_examples=4)
@given(varlen_cases(empty_keys=True))
def test_varlen_with_empty_key_segments(case):
    """Sequences with no keys give zeros; the reference must agree (and not crash)."""
    test_varlen_matches_reference.hypothesis.inner_test(case)


# ---- decode against a KV cache -------------------------------------------------------------------------

CACHE_LAYOUTS = ("contiguous", "offset", "expanded")  # the caches need a contiguous last dim


@st.composite
def decode_cases(draw, paged):
    backend = draw(st.sampled_from(backends("cpp", "torch")))
    dtype = draw(st.sampled_from(FLOATS))
    b, sq, hk, group = (
        draw(st.integers(0, 3)),
        draw(st.integers(1, 3)),
        draw(st.integers(1, 2)),
        draw(st.integers(1, 3)),
    )
    d = draw(st.integers(1, 20))
    gen = torch.Generator().manual_seed(draw(seeds))
    q = make((b, sq, hk * group, d), dtype, draw(st.sampled_from(READ_ONLY_LAYOUTS)), gen)
    if paged:
        page, per_seq = draw(st.integers(1, 4)), draw(st.integers(1, 3))
        pages = draw(st.integers(max(1, b * per_seq // 2), b * per_seq + 2))
        cap = page * per_seq
        lay = draw(st.sampled_from(("contiguous", "offset")))
        kc, vc = make((pages, page, hk, d), dtype, lay, gen), make((pages, page, hk, d), dtype, lay, gen)
        table = torch.randint(0, pages, (b, per_seq), generator=gen, dtype=torch.int32)
    else:
        cap = draw(st.integers(1, 12))
        lay = draw(st.sampled_from(CACHE_LAYOUTS))
        kc, vc = make((b, cap, hk, d), dtype, lay, gen), make((b, cap, hk, d), dtype, lay, gen)
        table = None
    seqlens = torch.randint(
        0, cap + 1, (b,), generator=gen, dtype=draw(st.sampled_from([torch.int32, torch.int64]))
    )
    if paged:  # pages past the sequence are never read: poison them
        used = (seqlens[:, None] + page - 1) // page > torch.arange(table.shape[1])[None]
        table = torch.where(used, table, torch.full_like(table, -1))
    kw = {"causal": draw(st.booleans())}
    if draw(st.booleans()):
        kw["scale"] = draw(st.floats(0.05, 2.0))
    return Case(backend, dtype, q, kc, vc, table, seqlens, kw)


@scaled(2)
@given(decode_cases(paged=False))
def test_attention_decode_matches_reference(case):
    backend, dtype, q, kc, vc, _, seqlens, kw = case
    with fastgen.use_backend(backend, op="attention_decode"):
        out = fastgen.attention_decode(q, kc, vc, seqlens, **kw)
    ref = AD.attention_decode_ref(q, kc, vc, seqlens, **kw, upcast=True)
    same = AD.attention_decode_ref(q, kc, vc, seqlens, **kw, upcast=False)
    assert out.dtype == dtype
    assert_2x(out, ref, same, dtype, f"attention_decode {backend}")


@scaled(2)
@given(decode_cases(paged=True))
def test_attention_decode_paged_matches_reference(case):
    backend, dtype, q, kp, vp, table, seqlens, kw = case
    with fastgen.use_backend(backend, op="attention_decode"):
        out = fastgen.attention_decode_paged(q, kp, vp, table, seqlens, **kw)
    ref = AD.attention_decode_paged_ref(q, kp, vp, table, seqlens, **kw, upcast=True)
    same = AD.attention_decode_paged_ref(q, kp, vp, table, seqlens, **kw, upcast=False)
    assert_2x(out, ref, same, dtype, f"attention_decode_paged {backend}")


@given(
    st.integers(0, 3),
    st.integers(1, 8),
    st.integers(0, 4),
    st.sampled_from(FLOATS),
    st.sampled_from(READ_ONLY_LAYOUTS),
    seeds,
)
def test_kv_cache_append_writes_exactly_the_new_slots(b, length, s_new, dtype, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    s_new = min(s_new, length)
    kc, vc = make((b, length, 2, 3), dtype, "contiguous", gen), make((b, length, 2, 3), dtype, "offset", gen)
    kn, vn = make((b, s_new, 2, 3), dtype, layout, gen), make((b, s_new, 2, 3), dtype, layout, gen)
    seqlens = torch.randint(0, length - s_new + 1, (b,), generator=gen)
    want_k, want_v = kc.clone(), vc.clone()
    for i in range(b):
        p = int(seqlens[i])
        want_k[i, p : p + s_new], want_v[i, p : p + s_new] = kn[i], vn[i]
    fastgen.kv_cache_append(kc, vc, kn, vn, seqlens)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


# ---- invalid input -------------------------------------------------------------------------------------


def _fa_base(gen):
    return {
        "query": make((2, 4, 5, 8), torch.float32, "contiguous", gen),
        "key": make((2, 2, 6, 8), torch.float32, "contiguous", gen),
        "value": make((2, 2, 6, 8), torch.float32, "contiguous", gen),
    }


def _set(**kv):
    return lambda a: a.update({k: (v(a) if callable(v) else v) for k, v in kv.items()})


NAN, INF = float("nan"), float("inf")
FA_INVALID = [
    ("query int", _set(query=lambda a: a["query"].int()), ["query"]),
    ("key float64", _set(key=lambda a: a["key"].double()), ["key", "query, key and value"]),
    ("value meta", _set(value=lambda a: a["value"].to("meta")), ["value", "query, key and value"]),
    ("query 3-D", _set(query=lambda a: a["query"][0]), ["query", "query, key, value"]),
    ("key head_dim", _set(key=lambda a: a["key"][..., :5]), ["key"]),
    ("value seq", _set(value=lambda a: a["value"][:, :, :3]), ["value"]),
    ("batch", _set(key=lambda a: a["key"][:1], value=lambda a: a["value"][:1]), ["key", "batch"]),
    (
        "heads not a multiple",
        _set(
            key=lambda a: a["key"][:, :1].expand(2, 3, 6, 8),
            value=lambda a: a["value"][:, :1].expand(2, 3, 6, 8),
        ),
        ["query", "key"],
    ),
    ("scale NaN", _set(scale=NAN), ["scale"]),
    ("scale inf", _set(scale=INF), ["scale"]),
    ("scale string", _set(scale="0.5"), ["scale"]),
    ("dropout_p 1", _set(dropout_p=1.0), ["dropout_p"]),
    ("dropout_p NaN", _set(dropout_p=NAN), ["dropout_p"]),
    ("dropout_p negative", _set(dropout_p=-0.1), ["dropout_p"]),
    ("causal string", _set(causal="top"), ["causal"]),
    ("bias shape", _set(bias=torch.zeros(3, 5, 6)), ["bias"]),
    ("bias int", _set(bias=torch.zeros(5, 6, dtype=torch.int32)), ["bias"]),
    ("bias meta", _set(bias=torch.zeros(5, 6, device="meta")), ["bias"]),
    ("mask float", _set(mask=torch.ones(5, 6)), ["mask"]),
    ("mask shape", _set(mask=torch.ones(5, 7, dtype=torch.bool)), ["mask"]),
]


@pytest.mark.parametrize("case", FA_INVALID, ids=[c[0] for c in FA_INVALID])
@given(seed=seeds)
def test_flash_attention_rejects_bad_input(case, seed):
    _, mutate, names = case
    a = _fa_base(torch.Generator().manual_seed(seed))
    mutate(a)
    with fastgen.use_backend("torch", op="attention"), raises_naming(*names):
        A.flash_attention(a.pop("query"), a.pop("key"), a.pop("value"), **a)


SDPA_INVALID = [
    ("scale NaN", _set(scale=NAN), ["scale"]),
    (
        "gqa without enable_gqa",
        _set(key=lambda a: a["key"][:, :2], value=lambda a: a["value"][:, :2]),
        ["enable_gqa", "key", "query"],
    ),
    ("attn_mask int", _set(attn_mask=torch.ones(5, 6, dtype=torch.int64)), ["attn_mask"]),
    ("attn_mask shape", _set(attn_mask=torch.ones(5, 5, dtype=torch.bool)), ["attn_mask"]),
    ("attn_mask list", _set(attn_mask=[[True] * 6] * 5), ["attn_mask"]),
    ("query 2-D", _set(query=lambda a: a["query"][0, 0]), ["query", "query, key, value"]),
    ("dropout_p 1.5", _set(dropout_p=1.5), ["dropout_p"]),
]


@pytest.mark.parametrize("case", SDPA_INVALID, ids=[c[0] for c in SDPA_INVALID])
@given(seed=seeds)
def test_sdpa_rejects_bad_input(case, seed):
    _, mutate, names = case
    gen = torch.Generator().manual_seed(seed)
    a = {
        "query": make((2, 4, 5, 8), torch.float32, "contiguous", gen),
        "key": make((2, 4, 6, 8), torch.float32, "contiguous", gen),
        "value": make((2, 4, 6, 8), torch.float32, "contiguous", gen),
    }
    mutate(a)
    with raises_naming(*names):
        fastgen.scaled_dot_product_attention(a.pop("query"), a.pop("key"), a.pop("value"), **a)


def _cu(*v, dtype=torch.int32):
    return torch.tensor(v, dtype=dtype)


VARLEN_INVALID = [
    ("cu_seqlens_q float", _set(cu_seqlens_q=_cu(0, 3, 5).float()), ["cu_seqlens_q"]),
    ("cu_seqlens_q 2-D", _set(cu_seqlens_q=_cu(0, 3, 5)[None]), ["cu_seqlens_q"]),
    ("cu_seqlens_k meta", _set(cu_seqlens_k=_cu(0, 4, 7).to("meta")), ["cu_seqlens_k"]),
    ("cu_seqlens_q first not 0", _set(cu_seqlens_q=_cu(1, 3, 5)), ["cu_seqlens_q"]),
    ("cu_seqlens_q last != total", _set(cu_seqlens_q=_cu(0, 3, 4)), ["cu_seqlens_q"]),
    (
        "cu_seqlens_k decreasing",
        _set(cu_seqlens_k=_cu(0, 8, 7)),
        ["cu_seqlens_k"],
    ),
    (
        "cu_seqlens_q int64 wraps",
        _set(cu_seqlens_q=_cu(0, 2**32 + 3, 5, dtype=torch.int64)),
        ["cu_seqlens_q"],
    ),
    ("cu_seqlens lengths differ", _set(cu_seqlens_k=_cu(0, 7)), ["cu_seqlens_q", "cu_seqlens_k"]),
    ("max_seqlen_q too small", _set(max_seqlen_q=1), ["max_seqlen_q", "cu_seqlens_q"]),
    ("max_seqlen_k negative", _set(max_seqlen_k=-1), ["max_seqlen_k"]),
    ("max_seqlen_q float", _set(max_seqlen_q=3.5), ["max_seqlen_q"]),
    ("scale inf", _set(scale=INF), ["scale"]),
    ("q 4-D", _set(q=lambda a: a["q"][None]), ["q", "q, k, v"]),
    (
        "k heads",
        _set(
            k=lambda a: a["k"][:, :1].expand(7, 3, 8).contiguous(),
            v=lambda a: a["v"][:, :1].expand(7, 3, 8).contiguous(),
        ),
        ["q", "k"],
    ),
]


@pytest.mark.parametrize("case", VARLEN_INVALID, ids=[c[0] for c in VARLEN_INVALID])
@given(seed=seeds)
def test_varlen_rejects_bad_input(case, seed):
    _, mutate, names = case
    gen = torch.Generator().manual_seed(seed)
    a = {
        "q": make((5, 4, 8), torch.float32, "contiguous", gen),
        "k": make((7, 2, 8), torch.float32, "contiguous", gen),
        "v": make((7, 2, 8), torch.float32, "contiguous", gen),
        "cu_seqlens_q": _cu(0, 3, 5),
        "cu_seqlens_k": _cu(0, 4, 7),
        "max_seqlen_q": 3,
        "max_seqlen_k": 4,
    }
    mutate(a)
    with fastgen.use_backend("torch", op="attention"), raises_naming(*names):
        fastgen.flash_attn_varlen(**a)


DECODE_INVALID = [
    ("q int", _set(q=lambda a: a["q"].int()), ["q"]),
    ("q 3-D", _set(q=lambda a: a["q"][0]), ["q"]),
    ("k_cache dtype", _set(k_cache=lambda a: a["k_cache"].double()), ["k_cache"]),
    ("v_cache meta", _set(v_cache=lambda a: a["v_cache"].to("meta")), ["v_cache"]),
    ("v_cache shape", _set(v_cache=lambda a: a["v_cache"][:, :4]), ["v_cache"]),
    (
        "k_cache head_dim",
        _set(
            k_cache=lambda a: a["k_cache"][..., :4].contiguous(),
            v_cache=lambda a: a["v_cache"][..., :4].contiguous(),
        ),
        ["k_cache"],
    ),
    (
        "k_cache last dim strided",
        _set(k_cache=lambda a: a["k_cache"].transpose(1, 3).contiguous().transpose(1, 3)),
        ["k_cache"],
    ),
    ("heads not a multiple", _set(q=lambda a: a["q"][:, :, :3]), ["q", "heads_q", "heads_kv"]),
    ("cache_seqlens float", _set(cache_seqlens=torch.tensor([3.0, 4.0])), ["cache_seqlens"]),
    ("cache_seqlens shape", _set(cache_seqlens=torch.tensor([3])), ["cache_seqlens"]),
    ("cache_seqlens too long", _set(cache_seqlens=torch.tensor([3, 7])), ["cache_seqlens"]),
    ("cache_seqlens negative", _set(cache_seqlens=torch.tensor([-1, 3])), ["cache_seqlens"]),
    ("cache_seqlens meta", _set(cache_seqlens=torch.tensor([3, 4], device="meta")), ["cache_seqlens"]),
    ("scale NaN", _set(scale=NAN), ["scale"]),
    ("scale -inf", _set(scale=-INF), ["scale"]),
    ("num_splits negative", _set(num_splits=-1), ["num_splits"]),
    ("num_splits float", _set(num_splits=2.5), ["num_splits"]),
]


@pytest.mark.parametrize("case", DECODE_INVALID, ids=[c[0] for c in DECODE_INVALID])
@given(backend=st.sampled_from(backends("cpp", "torch")), seed=seeds)
def test_attention_decode_rejects_bad_input(case, backend, seed):
    _, mutate, names = case
    gen = torch.Generator().manual_seed(seed)
    a = {
        "q": make((2, 1, 4, 6), torch.float32, "contiguous", gen),
        "k_cache": make((2, 6, 2, 6), torch.float32, "contiguous", gen),
        "v_cache": make((2, 6, 2, 6), torch.float32, "contiguous", gen),
        "cache_seqlens": torch.tensor([3, 6]),
    }
    mutate(a)
    with fastgen.use_backend(backend, op="attention_decode"), raises_naming(*names):
        fastgen.attention_decode(a.pop("q"), a.pop("k_cache"), a.pop("v_cache"), a.pop("cache_seqlens"), **a)


PAGED_INVALID = [
    ("block_table float", _set(block_table=lambda a: a["block_table"].float()), ["block_table"]),
    ("block_table rows", _set(block_table=lambda a: a["block_table"][:1]), ["block_table"]),
    ("block_table meta", _set(block_table=lambda a: a["block_table"].to("meta")), ["block_table"]),
    (
        "block_table out of range",
        _set(block_table=torch.tensor([[0, 9], [2, 3]], dtype=torch.int32)),
        ["block_table"],
    ),
    (
        "block_table negative",
        _set(block_table=torch.tensor([[0, -1], [2, 3]], dtype=torch.int32)),
        ["block_table"],
    ),
    ("cache_seqlens past the table", _set(cache_seqlens=torch.tensor([3, 7])), ["cache_seqlens"]),
    (
        "k_pages page 0",
        _set(k_pages=lambda a: a["k_pages"][:, :0], v_pages=lambda a: a["v_pages"][:, :0]),
        ["k_pages", "page_size"],
    ),
]


@pytest.mark.parametrize("case", PAGED_INVALID, ids=[c[0] for c in PAGED_INVALID])
@given(backend=st.sampled_from(backends("cpp", "torch")), seed=seeds)
def test_attention_decode_paged_rejects_bad_input(case, backend, seed):
    _, mutate, names = case
    gen = torch.Generator().manual_seed(seed)
    a = {
        "q": make((2, 1, 4, 6), torch.float32, "contiguous", gen),
        "k_pages": make((4, 3, 2, 6), torch.float32, "contiguous", gen),
        "v_pages": make((4, 3, 2, 6), torch.float32, "contiguous", gen),
        "block_table": torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
        "cache_seqlens": torch.tensor([4, 6]),
    }
    mutate(a)
    with fastgen.use_backend(backend, op="attention_decode"), raises_naming(*names):
        fastgen.attention_decode_paged(
            a.pop("q"), a.pop("k_pages"), a.pop("v_pages"), a.pop("block_table"), a.pop("cache_seqlens"), **a
        )


APPEND_INVALID = [
    ("k_new dtype", _set(k_new=lambda a: a["k_new"].double()), ["k_new"]),
    ("v_new shape", _set(v_new=lambda a: a["v_new"][:, :1]), ["v_new"]),
    ("k_new meta", _set(k_new=lambda a: a["k_new"].to("meta")), ["k_new"]),
    ("v_cache shape", _set(v_cache=lambda a: a["v_cache"][:, :5]), ["v_cache"]),
    ("k_cache 3-D", _set(k_cache=lambda a: a["k_cache"][0]), ["k_cache"]),
    ("cache_seqlens float", _set(cache_seqlens=torch.tensor([1.0, 2.0])), ["cache_seqlens"]),
    ("cache_seqlens overflow", _set(cache_seqlens=torch.tensor([1, 5])), ["cache_seqlens"]),
    ("cache_seqlens negative", _set(cache_seqlens=torch.tensor([-1, 0])), ["cache_seqlens"]),
    ("k_cache is v_cache", _set(v_cache=lambda a: a["k_cache"]), ["k_cache", "v_cache"]),
    ("k_cache expanded", _set(k_cache=lambda a: a["k_cache"][:1].expand(2, 6, 2, 3)), ["k_cache"]),
    (
        "v_cache overlaps k_cache",
        _set(v_cache=lambda a: a["k_cache"].view(-1)[1:].as_strided((2, 6, 2, 3), a["k_cache"].stride())),
        ["k_cache", "v_cache"],
    ),
]


@pytest.mark.parametrize("case", APPEND_INVALID, ids=[c[0] for c in APPEND_INVALID])
@given(seed=seeds)
def test_kv_cache_append_rejects_bad_input(case, seed):
    _, mutate, names = case
    gen = torch.Generator().manual_seed(seed)
    a = {
        "k_cache": make((2, 6, 2, 3), torch.float32, "offset", gen),
        "v_cache": make((2, 6, 2, 3), torch.float32, "contiguous", gen),
        "k_new": make((2, 2, 2, 3), torch.float32, "contiguous", gen),
        "v_new": make((2, 2, 2, 3), torch.float32, "contiguous", gen),
        "cache_seqlens": torch.tensor([1, 4]),
    }
    mutate(a)
    with raises_naming(*names):
        fastgen.kv_cache_append(**a)

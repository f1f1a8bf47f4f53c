r"""KV-cache decoding attention: a few new query tokens against a (contiguous or paged) KV cache.

For autoregressive generation (GLaM, DALL-E): every step appends the new tokens' keys / values to the cache
(``kv_cache_append``) and attends the new queries to the whole cache. Shapes follow flash-attn's
``flash_attn_with_kvcache``::

    q:             (batch, seq_q, heads_q, head_dim)        seq_q small (1..16 typically; any works)
    k/v_cache:     (batch, max_seqlen, heads_kv, head_dim)  any strides with a contiguous last dim
    k/v_pages:     (num_pages, page_size, heads_kv, head_dim), with
    block_table:   (batch, max_pages_per_seq) int32         logical page p of sequence b = k_pages[block_table[b, p]]
    cache_seqlens: (batch,) int32 (int64 accepted)          valid tokens, the seq_q new ones INCLUDED
    out:           (batch, seq_q, heads_q, head_dim)        q's dtype

heads_q % heads_kv == 0 (query head hq reads KV head hq // (heads_q / heads_kv): GQA / MQA), head_dim <= 256
and equal for q, k and v. With ``len = cache_seqlens[b]`` and query token i (0-based among seq_q)::

    visible(i) = { j : j < len - seq_q + i + 1 }   (causal=True: bottom-right aligned, as flash-attn)
               = { j : j < len }                   (causal=False)
    out[b, i, hq] = softmax_{j in visible(i)}(scale * q[b, i, hq] . k[b, j, hq // G]) @ v[b, :, hq // G]

``scale`` defaults to 1/sqrt(head_dim) and must be finite. A query that sees no key (e.g. ``len = 0``) gets
zeros, never NaN; a NaN / inf among the keys, values or query a row sees gives what the reference gives
(NaN), whichever split holds it.
Cache entries at positions >= len are never read by the kernels (they may hold anything, NaN included).

The kernels follow flash-decoding (Dao, Haziza, Massa, Sizov 2023): the keys of each (sequence, KV head)
are split into ``num_splits`` chunks processed in parallel, each with an online softmax (Milakov &
Gimelshein 2018), and the partial outputs are merged with their log-sum-exp. Each (sequence, KV head) task
handles all the query heads of its group and all seq_q tokens, so K/V are read once per group.

Backends (``python -m fastgen.info``; ``FASTGEN_BACKEND=attention_decode:<name>`` forces one):
cuda (csrc/attention_decode/*_cuda.cu: split-K kernel, 16-byte loads; head_dim a multiple of 16 bytes,
16-byte aligned K/V rows), cpp (csrc/attention_decode/*_cpu.cpp: work items of (batch, KV-head block, key
split) that read the cache rows in memory order, AVX-512 / AVX2 / baseline SIMD picked at run time
(``FASTGEN_CPU_ISA``), 16-bit caches converted in registers), torch (gather + masked softmax in PyTorch
ops, any device, float64 too).

Inference only: the kernels have no backward. When grad mode is on and q / k / v require grad, the call is
served by the torch backend through autograd (differentiable); forcing another backend then raises.
"""

from __future__ import annotations

import math

import torch

from fastgen import _backend, _ext
from fastgen._backend import BackendUnavailableError, Call

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ALL_DTYPES = (*KERNEL_DTYPES, torch.float64)
MAX_HEAD_DIM = 256
MAX_SPLITS = 128

OP = _backend.get_op("attention_decode", "KV-cache decoding attention (flash-decoding), contiguous and paged")


def _err(msg: str) -> ValueError:
    return ValueError(f"fastgen.attention_decode: {msg}")


def _desc(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"


# =====================================================================================================
# Input validation (before any kernel runs)
# =====================================================================================================


def _assert_values(cond: torch.Tensor, msg: str, values: tuple[str, torch.Tensor] | None = None) -> None:
    """Raise ValueError(msg) unless every element of ``cond`` is true. CPU tensors are checked on the
    host, and ``values`` = (name, tensor shaped like cond) puts the first offending value in the message;
    device tensors (and traced graphs) with torch._assert_async, which never synchronises and fails at
    the next synchronisation point."""
    if cond.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(cond.all()):
            if values is not None:
                bad = (~cond).nonzero()[0].tolist()
                idx = ", ".join(map(str, bad))
                msg = f"{msg}; got {values[0]}[{idx}] = {int(values[1][tuple(bad)])}"
            raise _err(msg)
    else:
        torch._assert_async(cond.all(), f"fastgen.attention_decode: {msg}")


def _check_range(t: torch.Tensor, name: str, lo: int, hi: int, msg: str) -> None:
    """Raise ValueError(msg) naming the first value of the 1-D ``t`` outside [lo, hi]."""
    values = _backend.host_values(t)
    if values is None:
        _assert_values((t >= lo) & (t <= hi), msg, (name, t))
        return
    for i, n in enumerate(values):
        if not lo <= n <= hi:
            raise _err(f"{msg}; got {name}[{i}] = {n}")


def _check(q, k, v, cache_seqlens, block_table, scale, num_splits, paged):
    """Validate; returns (q, cache_seqlens as int32, block_table as int32 or None, scale as float)."""
    kn, vn = ("k_pages", "v_pages") if paged else ("k_cache", "v_cache")
    for name, t in (("q", q), (kn, k), (vn, v), ("cache_seqlens", cache_seqlens)):
        if not isinstance(t, torch.Tensor):
            raise _err(f"{name} must be a tensor, got {type(t).__name__}")
    if q.ndim != 4:
        raise _err(f"q must be 4-D (batch, seq_q, heads_q, head_dim), got shape {tuple(q.shape)}")
    if q.dtype not in ALL_DTYPES:
        raise _err(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    layout = (
        "(num_pages, page_size, heads_kv, head_dim)" if paged else "(batch, max_seqlen, heads_kv, head_dim)"
    )
    for name, t in ((kn, k), (vn, v)):
        if t.ndim != 4:
            raise _err(f"{name} must be 4-D {layout}, got shape {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise _err(f"{name} has dtype {t.dtype}, expected {q.dtype} like q")
        if t.device != q.device:
            raise _err(f"{name} is on {t.device} but q is on {q.device}")
    b, _, hq, d = q.shape
    if v.shape[-1] != k.shape[-1]:
        raise _err(
            f"{vn} head_dim {v.shape[-1]} != {kn} head_dim {k.shape[-1]}: v must have k's head_dim "
            f"(got {kn} {tuple(k.shape)}, {vn} {tuple(v.shape)})"
        )
    if k.shape != v.shape:
        raise _err(f"{vn} has shape {tuple(v.shape)}, expected {tuple(k.shape)} like {kn}")
    if k.shape[-1] != d:
        raise _err(
            f"{kn} head_dim {k.shape[-1]} != q head_dim {d} ({kn} {tuple(k.shape)}, q {tuple(q.shape)})"
        )
    if not 1 <= d <= MAX_HEAD_DIM:
        raise _err(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {d}")
    hkv = k.shape[2]
    if hkv == 0 or hq % hkv != 0:
        raise _err(
            f"heads_q ({hq}, q {tuple(q.shape)}) must be a multiple of heads_kv ({hkv}, {kn} {tuple(k.shape)})"
        )
    for name, t in ((kn, k), (vn, v)):
        if d > 1 and t.stride(-1) != 1:
            raise _err(f"{name} must have a contiguous last dim, got strides {t.stride()}")
    if d > 1 and q.stride(-1) != 1:
        # the kernels read q rows densely; q is a few tokens, the copy costs nothing. clone, not contiguous():
        # an empty tensor counts as contiguous whatever its strides and would come back unchanged
        q = q.clone(memory_format=torch.contiguous_format)
    if not paged and k.shape[0] != b:
        raise _err(f"{kn} has batch {k.shape[0]} ({tuple(k.shape)}), expected {b} like q")
    if cache_seqlens.dtype not in (torch.int32, torch.int64) or tuple(cache_seqlens.shape) != (b,):
        raise _err(f"cache_seqlens must be int32 or int64 of shape ({b},), got {_desc(cache_seqlens)}")
    if cache_seqlens.device != q.device:
        raise _err(f"cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")
    if paged:
        if not isinstance(block_table, torch.Tensor):
            raise _err(f"block_table must be a tensor, got {type(block_table).__name__}")
        if (
            block_table.dtype not in (torch.int32, torch.int64)
            or block_table.ndim != 2
            or block_table.shape[0] != b
        ):
            raise _err(
                f"block_table must be int32 of shape ({b}, max_pages_per_seq), got {_desc(block_table)}"
            )
        if block_table.device != q.device:
            raise _err(f"block_table is on {block_table.device} but q is on {q.device}")
        if k.shape[1] == 0:
            raise _err(f"page_size must be >= 1, got {kn} {tuple(k.shape)}")
        capacity = block_table.shape[1] * k.shape[1]
    else:
        capacity = k.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    scale = float(scale)
    if not math.isfinite(scale):
        raise _err(f"scale must be finite, got {scale}")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise _err(f"num_splits must be an int >= 0 (0: heuristic), got {num_splits!r}")
    # validated in their own dtype (int64 values past 2^31 must not wrap into range), then narrowed; a
    # paged cache can hold more than the kernels' int32 lengths address
    capacity = min(capacity, torch.iinfo(torch.int32).max)
    _check_range(
        cache_seqlens,
        "cache_seqlens",
        0,
        capacity,
        f"cache_seqlens out of range [0, {capacity}] (the cache holds {capacity} tokens per sequence)",
    )
    seqlens = cache_seqlens if cache_seqlens.dtype == torch.int32 else cache_seqlens.to(torch.int32)
    seqlens = seqlens.contiguous()
    if paged:
        if block_table.numel() > 0:
            page = k.shape[1]
            pages = (cache_seqlens.to(torch.int64) + page - 1) // page
            used = torch.arange(block_table.shape[1], device=q.device)[None, :] < pages[:, None]
            in_range = (block_table >= 0) & (block_table < k.shape[0])
            _assert_values(
                in_range | ~used,
                f"block_table entries of used pages must be in [0, {k.shape[0]}) (num_pages of {kn})",
                ("block_table", block_table),
            )
        block_table = block_table.to(torch.int32)
        if block_table.shape[1] > 1 and block_table.stride(1) != 1:
            block_table = block_table.contiguous()
    return q, seqlens, block_table, scale


# =====================================================================================================
# The torch backend and the reference (the same math; the reference upcasts to float64)
# =====================================================================================================


def _gather_pages(pages: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """(num_pages, page, H, D) pages + (B, P) table -> (B, P * page, H, D) logical caches."""
    idx = block_table.long().clamp(0, max(pages.shape[0] - 1, 0))
    g = pages[idx]  # (B, P, page, H, D)
    return g.reshape(g.shape[0], block_table.shape[1] * pages.shape[1], *pages.shape[2:])


def _attend_torch(q, k, v, seqlens, scale, causal, dtype):
    """Masked-softmax attention of q (B, Sq, Hq, D) against k, v (B, L, Hkv, D) in ``dtype`` (softmax in at
    least float32). Returns (B, Sq, Hq, D) contiguous in ``dtype``."""
    b, sq, hq, d = q.shape
    length, hkv = k.shape[1], k.shape[2]
    if length == 0:  # no key at all: every row sees none and gets zeros (as the kernels and SDPA)
        return torch.zeros((b, sq, hq, d), dtype=dtype, device=q.device)
    g = hq // hkv
    sdt = torch.promote_types(dtype, torch.float32)
    qd = (q.to(dtype) * scale).reshape(b, sq, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, g * sq, d)
    kd = k.to(dtype).permute(0, 2, 3, 1)  # (B, Hkv, D, L)
    vd = v.to(dtype).permute(0, 2, 1, 3)  # (B, Hkv, L, D)
    lens = seqlens.to(torch.int64).reshape(b, 1, 1)
    j = torch.arange(length, device=q.device).reshape(1, 1, length)
    i = torch.arange(sq, device=q.device).reshape(1, sq, 1)
    visible = (j < lens - sq + i + 1) if causal else (j < lens).expand(b, sq, length)
    visible = visible & (j < lens)  # (B, Sq, L)
    # entries past cache_seqlens may hold anything (NaN, inf): keep them out of P @ V (0 * NaN = NaN)
    vd = torch.where((j < lens).reshape(b, 1, length, 1), vd, torch.zeros((), dtype=dtype, device=q.device))
    s = torch.matmul(qd, kd).to(sdt).reshape(b, hkv, g, sq, length)
    s = torch.where(
        visible.reshape(b, 1, 1, sq, length), s, torch.full((), -math.inf, dtype=sdt, device=q.device)
    )
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros((), dtype=sdt, device=q.device))  # no visible key
    p = torch.exp(s - m)
    den = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(den > 0, den, torch.ones((), dtype=sdt, device=q.device))
    out = torch.matmul(p.to(dtype).reshape(b, hkv, g * sq, length), vd)  # (B, Hkv, G*Sq, D)
    return out.reshape(b, hkv, g, sq, d).permute(0, 3, 1, 2, 4).reshape(b, sq, hq, d).contiguous()


def _decode_torch(q, k, v, block_table, seqlens, scale, causal, num_splits):
    if block_table is not None:
        k, v = _gather_pages(k, block_table), _gather_pages(v, block_table)
    return _attend_torch(q, k, v, seqlens, scale, causal, q.dtype)


def _decode_cpp(q, k, v, block_table, seqlens, scale, causal, num_splits):
    return _ext.C.attention_decode_cpu(q, k, v, seqlens, block_table, scale, causal, num_splits)


def _decode_cuda(q, k, v, block_table, seqlens, scale, causal, num_splits):
    return _ext.C.attention_decode_cuda(q, k, v, seqlens, block_table, scale, causal, num_splits)


def _cuda_check(call: Call) -> list[str]:
    reasons = []
    vec = 16 // call.dtype.itemsize
    d = call.get("head_dim", 0)
    if d % vec:
        reasons.append(f"head_dim {d} is not a multiple of {vec} ({call.dtype} elements per 16-byte load)")
    if not call.get("aligned16", True):
        reasons.append("k/v cache rows are not 16-byte aligned (base pointer or a stride)")
    return reasons


OP.register("cuda", devices=("cuda",), dtypes=KERNEL_DTYPES, available=_backend.cuda_available,
            check=_cuda_check, note="CUDA C++ split-K flash-decoding, 16-byte loads")(_decode_cuda)  # fmt: skip
OP.register("cpp", devices=("cpu",), dtypes=ALL_DTYPES, available=_backend.cpp_available,
            note="C++ SIMD (runtime ISA) over (batch, kv-head block, split) items")(_decode_cpp)  # fmt: skip
OP.register("torch", devices=("cpu", "cuda", "mps", "xpu"), dtypes=ALL_DTYPES,
            note="gather + masked softmax in PyTorch ops")(_decode_torch)  # fmt: skip


def _aligned16(t: torch.Tensor) -> bool:
    vec = 16 // t.element_size()
    return t.data_ptr() % 16 == 0 and all(s % vec == 0 for s in t.stride()[:-1])


def _make_call(q, k, v, paged: bool) -> Call:
    return Call(
        q.device,
        q.dtype,
        {"paged": paged, "head_dim": q.shape[-1], "aligned16": _aligned16(k) and _aligned16(v)},
    )


def _backend_for(q, k, v, paged: bool) -> _backend.Backend:
    """OP.dispatch on the call, remembered per what the dispatch reads (device, dtype, the call's params): a
    decode step is a few microseconds of kernel on a CPU."""
    aligned = _aligned16(k) and _aligned16(v)
    return OP.dispatch_remembered(
        (q.device, q.dtype, paged, q.shape[-1], aligned), lambda: _make_call(q, k, v, paged)
    )


def _run(q, k, v, block_table, seqlens, scale, causal, num_splits):
    backend = _backend_for(q, k, v, block_table is not None)
    return backend.fn(q, k, v, block_table, seqlens, scale, causal, num_splits)


# ---- torch.library registration: traced by torch.compile without graph breaks ---------------------


@torch.library.custom_op("fastgen::attention_decode", mutates_args=())
def _decode_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    scale: float,
    causal: bool,
    num_splits: int,
) -> torch.Tensor:
    return _run(q, k_cache, v_cache, None, cache_seqlens, scale, causal, num_splits)


@_decode_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, scale, causal, num_splits):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@torch.library.custom_op("fastgen::attention_decode_paged", mutates_args=())
def _decode_paged_op(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    scale: float,
    causal: bool,
    num_splits: int,
) -> torch.Tensor:
    return _run(q, k_pages, v_pages, block_table, cache_seqlens, scale, causal, num_splits)


@_decode_paged_op.register_fake
def _(q, k_pages, v_pages, block_table, cache_seqlens, scale, causal, num_splits):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


# =====================================================================================================
# Public API
# =====================================================================================================


def _needs_grad(*ts: torch.Tensor) -> bool:
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in ts):
        return False
    forced = OP.forced_backend()
    if forced not in (None, "torch"):
        raise BackendUnavailableError(
            f"fastgen.attention_decode: backend {forced!r} was forced but the inputs require grad; the "
            "kernels are inference-only (use torch.no_grad(), or the torch backend for autograd)"
        )
    return True


def attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    num_splits: int = 0,
) -> torch.Tensor:
    """Attention of new query tokens against a contiguous KV cache (see the module docstring).

    Args:
        q: (batch, seq_q, heads_q, head_dim).
        k_cache, v_cache: (batch, max_seqlen, heads_kv, head_dim), last dim contiguous.
        cache_seqlens: (batch,) int32 / int64: valid tokens per sequence, the seq_q new ones included.
        scale: softmax scale, default 1/sqrt(head_dim).
        causal: bottom-right aligned causal mask (query i sees j < cache_seqlens[b] - seq_q + i + 1).
        num_splits: chunks of the cache per (sequence, KV head) processed in parallel; 0 picks one.
    Returns:
        (batch, seq_q, heads_q, head_dim) in q's dtype.
    """
    q, seqlens, _, scale = _check(q, k_cache, v_cache, cache_seqlens, None, scale, num_splits, paged=False)
    if _needs_grad(q, k_cache, v_cache):
        return _attend_torch(q, k_cache, v_cache, seqlens, scale, causal, q.dtype)
    if _backend.plain_eager(q) and type(k_cache) is type(v_cache) is torch.Tensor:
        return _run(q, k_cache, v_cache, None, seqlens, scale, bool(causal), int(num_splits))
    return _decode_op(q, k_cache, v_cache, seqlens, scale, bool(causal), int(num_splits))


def attention_decode_paged(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    num_splits: int = 0,
) -> torch.Tensor:
    """``attention_decode`` over a paged cache (vLLM-style).

    Args:
        k_pages, v_pages: (num_pages, page_size, heads_kv, head_dim), last dim contiguous.
        block_table: (batch, max_pages_per_seq) int32: token j of sequence b is at
            k_pages[block_table[b, j // page_size], j % page_size]. Entries of pages past cache_seqlens are
            never read and may hold anything (e.g. -1).
        Other arguments and the result: as ``attention_decode``.
    """
    q, seqlens, bt, scale = _check(
        q, k_pages, v_pages, cache_seqlens, block_table, scale, num_splits, paged=True
    )
    if _needs_grad(q, k_pages, v_pages):
        return _attend_torch(
            q, _gather_pages(k_pages, bt), _gather_pages(v_pages, bt), seqlens, scale, causal, q.dtype
        )
    if _backend.plain_eager(q) and type(k_pages) is type(v_pages) is torch.Tensor:
        return _run(q, k_pages, v_pages, bt, seqlens, scale, bool(causal), int(num_splits))
    return _decode_paged_op(q, k_pages, v_pages, bt, seqlens, scale, bool(causal), int(num_splits))


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """[start, end) byte range of t's elements within its storage (t non-empty)."""
    start = t.storage_offset() * t.element_size()
    last = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two views may share memory: the same storage and intersecting byte extents. Conservative
    (interleaved views that never touch read as overlapping), metadata only: no sync, no kernel."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    (a0, a1), (b0, b1) = _extent(a), _extent(b)
    return a0 < b1 and b0 < a1


def kv_cache_append(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cache_seqlens: torch.Tensor,
) -> None:
    """Write the new tokens in place: k_cache[b, cache_seqlens[b] + t] = k_new[b, t] for t < s_new (and v).

    k_cache, v_cache: (batch, max_seqlen, heads_kv, head_dim); k_new, v_new: (batch, s_new, heads_kv,
    head_dim); cache_seqlens: (batch,) int32 / int64, the lengths BEFORE the append (the caller adds s_new
    afterwards). Requires cache_seqlens[b] + s_new <= max_seqlen (asserted on the device without a sync).
    """
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise _err(f"kv_cache_append: {name} must be a 4-D tensor (batch, seq, heads_kv, head_dim)")
        if t.device != k_cache.device:
            raise _err(f"kv_cache_append: {name} is on {t.device} but k_cache is on {k_cache.device}")
    if v_cache.shape != k_cache.shape:
        raise _err(
            f"kv_cache_append: v_cache has shape {tuple(v_cache.shape)}, expected {tuple(k_cache.shape)}"
        )
    b, length = k_cache.shape[:2]
    for name, t, cache in (("k_new", k_new, k_cache), ("v_new", v_new, v_cache)):
        if t.shape[0] != b or t.shape[2:] != cache.shape[2:] or t.shape != k_new.shape:
            raise _err(
                f"kv_cache_append: {name} has shape {tuple(t.shape)}, expected ({b}, s_new, "
                f"{', '.join(map(str, cache.shape[2:]))})"
            )
        if t.dtype != cache.dtype:
            raise _err(f"kv_cache_append: {name} has dtype {t.dtype}, expected {cache.dtype} like the cache")
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise _err("kv_cache_append: cache_seqlens must be an int32 / int64 tensor")
    if tuple(cache_seqlens.shape) != (b,) or cache_seqlens.device != k_cache.device:
        raise _err(
            f"kv_cache_append: cache_seqlens must be ({b},) on {k_cache.device}, got {_desc(cache_seqlens)}"
        )
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        # an expanded (stride-0) or otherwise self-overlapping cache would take several tokens in one slot
        if torch._debug_has_internal_overlap(cache) == 1:
            raise _err(
                f"kv_cache_append: {name} has internal overlap (shape {tuple(cache.shape)}, strides "
                f"{cache.stride()}; e.g. an expand()ed tensor): it must own one memory slot per element"
            )
    if _overlap(k_cache, v_cache):
        raise _err(
            "kv_cache_append: k_cache and v_cache are the same memory or overlap (v_cache spans bytes "
            f"{_extent(v_cache)} of k_cache's storage, k_cache {_extent(k_cache)}); they must be separate caches"
        )
    s_new = k_new.shape[1]
    range_msg = (
        f"kv_cache_append: cache_seqlens + s_new ({s_new}) must be in [0, {length}] (max_seqlen of the cache)"
    )
    if k_cache.device.type == "cpu" and _backend.plain_eager(k_cache):
        # on the CPU the lengths are readable without a sync: check them here and copy slices (no index
        # tensors, no advanced indexing: a decode step appends one token per layer)
        starts = cache_seqlens.tolist()
        bad = [(i, n) for i, n in enumerate(starts) if not 0 <= n <= length - s_new]
        if bad:
            raise _err(f"{range_msg}; cache_seqlens[{bad[0][0]}] = {bad[0][1]}")
        if s_new == 0 or b == 0:
            return
        if all(n == starts[0] for n in starts):
            k_cache[:, starts[0] : starts[0] + s_new] = k_new
            v_cache[:, starts[0] : starts[0] + s_new] = v_new
        else:
            for i, n in enumerate(starts):
                k_cache[i, n : n + s_new] = k_new[i]
                v_cache[i, n : n + s_new] = v_new[i]
        return
    _assert_values(
        (cache_seqlens >= 0) & (cache_seqlens + s_new <= length),
        range_msg,
        ("cache_seqlens", cache_seqlens),
    )
    if s_new == 0 or b == 0:
        return
    pos = cache_seqlens.to(torch.int64)[:, None] + torch.arange(s_new, device=k_cache.device)[None, :]
    pos = pos.clamp(
        0, length - 1
    )  # asserted above; the clamp keeps an async failure from writing out of bounds
    rows = torch.arange(b, device=k_cache.device)[:, None]
    k_cache[rows, pos] = k_new
    v_cache[rows, pos] = v_new


# =====================================================================================================
# References (plain PyTorch; the oracle of the tests and the benchmarks' baseline)
# =====================================================================================================


def attention_decode_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    upcast: bool = True,
) -> torch.Tensor:
    """Masked-softmax attention in plain PyTorch. ``upcast=True``: float64 math and a float64 result (the
    oracle); ``upcast=False``: q's dtype (softmax in float32 for 16-bit inputs), what a user writes."""
    q, seqlens, _, scale = _check(q, k_cache, v_cache, cache_seqlens, None, scale, 0, paged=False)
    return _attend_torch(q, k_cache, v_cache, seqlens, scale, causal, torch.float64 if upcast else q.dtype)


def attention_decode_paged_ref(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    upcast: bool = True,
) -> torch.Tensor:
    """``attention_decode_ref`` on the pages gathered through ``block_table``."""
    q, seqlens, bt, scale = _check(q, k_pages, v_pages, cache_seqlens, block_table, scale, 0, paged=True)
    k, v = _gather_pages(k_pages, bt), _gather_pages(v_pages, bt)
    return _attend_torch(q, k, v, seqlens, scale, causal, torch.float64 if upcast else q.dtype)

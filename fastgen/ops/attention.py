r"""Fused attention (flash-attention style): forward and backward without the N x N score matrix.

For one (batch, head), with ``q: (Sq, D)``, ``k: (Sk, D)``, ``v: (Sk, Dv)``::

    s   = scale * q k^T + bias                     # bias: additive mask, learnable (has a gradient)
    s   = -inf where a boolean mask is False, where causal hides the key, or where the key is padding
    p   = softmax(s)  (a row with no visible key gives p = 0, hence an output of zeros, never NaN)
    out = dropout(p) v                             # dropout: keep with prob 1 - p_drop, scaled 1/(1 - p_drop)
    lse = logsumexp(s)                             # saved for the backward (+inf for an empty row)

The Triton kernels (Dao et al. 2022, "FlashAttention"; Dao 2023, "FlashAttention-2") stream key/value
blocks through an online softmax, so memory is O(Sq + Sk) per head. The backward recomputes ``p`` from
``lse`` in two kernels, one over key blocks (dK, dV; all the query heads of a GQA group in one program,
so no atomics) and one over query blocks (dQ and, when the bias needs a gradient, dBias): it is
deterministic (bit-identical results run to run) by construction.

Causal alignment. For ``Sq != Sk`` there are two conventions:

* **top-left** (``torch.nn.functional.scaled_dot_product_attention``'s ``is_causal``): query ``i`` sees
  keys ``j <= i``. :func:`scaled_dot_product_attention` keeps it, so it is a drop-in for SDPA.
* **bottom-right** (flash-attn, KV-cache decoding): query ``i`` sees keys ``j <= i + Sk - Sq``, i.e. the
  last query sees every key. :func:`flash_attn_varlen` and :func:`attention` with
  ``causal="bottom_right"`` use it. Rows that see no key (``Sq > Sk``) give zeros.

Backends: ``triton`` (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1`` when forced) and
``torch`` (any device and dtype, including float64: the same math in PyTorch ops over query-row tiles,
so no full score matrix). On CPU (and wherever ``torch`` would be the backend) every call that torch's
own fused SDPA can express goes to it instead (DESIGN rule 11; see ``_torch_sdpa_why_not``): the torch
backend serves only what fastgen adds (a bias gradient, a seeded dropout stream, varlen packing). ``python -m fastgen.info`` shows which serves what here.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator

import torch

from fastgen import _backend
from fastgen._backend import Call

try:  # triton is optional (not on every platform)
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None
    tl = None

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# causal modes (kernel constexpr)
NO_CAUSAL, TOP_LEFT, BOTTOM_RIGHT = 0, 1, 2
_CAUSAL_NAMES = {"top_left": TOP_LEFT, "bottom_right": BOTTOM_RIGHT}

OP = _backend.get_op("attention", "fused attention forward + backward (masks, bias, GQA, dropout, varlen)")


def _err(msg: str) -> ValueError:
    return ValueError(f"fastgen.attention: {msg}")


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


# =====================================================================================================
# Reference (the oracle): plain PyTorch in SDPA's layout, optionally upcast to float64
# =====================================================================================================


def _visible(
    sq: int, sk: int, causal: int, device: torch.device, row0: int = 0, rows: int | None = None
) -> torch.Tensor | None:
    """(rows, sk) bool: which keys query rows row0 .. row0 + rows of an (sq, sk) problem see."""
    if causal == NO_CAUSAL:
        return None
    off = 0 if causal == TOP_LEFT else sk - sq
    i = torch.arange(row0, row0 + (sq - row0 if rows is None else rows), device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    return j <= i + off


def attention_ref(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool | str = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    upcast: bool = True,
) -> torch.Tensor:
    """Attention as the textbook formula. q: (B, Hq, Sq, D), k: (B, Hkv, Sk, D), v: (B, Hkv, Sk, Dv).

    attn_mask: bool (True = attend) or additive float, broadcastable to (B, Hq, Sq, Sk).
    is_causal: False, True / "top_left" (SDPA) or "bottom_right" (flash-attn / KV cache).
    dropout_mask: bool keep-mask (B, Hq, Sq, Sk) applied as ``p * keep / (1 - dropout_p)``.
    Rows with no visible key give zeros. Computed in float64 when ``upcast`` (else in q's dtype);
    returns q's dtype.
    """
    dt = torch.float64 if upcast else query.dtype
    q, k, v = query.to(dt), key.to(dt), value.to(dt)
    hq, hk = q.shape[-3], k.shape[-3]
    if hq != hk:
        k = k.repeat_interleave(hq // hk, dim=-3)
        v = v.repeat_interleave(hq // hk, dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    allowed = torch.ones(s.shape, dtype=torch.bool, device=s.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            s = s + attn_mask.to(dt)
    causal = _causal_mode(is_causal)
    vis = _visible(s.shape[-2], s.shape[-1], causal, s.device)
    if vis is not None:
        allowed = allowed & vis
    s = s.masked_fill(~allowed, float("-inf"))
    if s.shape[-1] == 0:  # no key at all: zeros, as SDPA (p @ v is an empty sum); amax has no identity
        row_max = s.new_zeros((*s.shape[:-1], 1))
    else:
        row_max = s.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(s - row_max)
    denom = e.sum(-1, keepdim=True)
    p = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    if dropout_mask is not None:
        p = p * dropout_mask.to(dt) / (1.0 - dropout_p)
    return (p @ v).to(query.dtype)


def flash_attn_varlen_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Packed (total, heads, dim) attention, one sequence at a time, bottom-right causal alignment."""
    outs = []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        qi = q[cq[i] : cq[i + 1]].transpose(0, 1)[None]
        ki = k[ck[i] : ck[i + 1]].transpose(0, 1)[None]
        vi = v[ck[i] : ck[i + 1]].transpose(0, 1)[None]
        o = attention_ref(
            qi, ki, vi, is_causal="bottom_right" if causal else False, scale=scale, upcast=upcast
        )
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs, 0) if outs else q.new_empty((0, q.shape[1], v.shape[2]))


def _causal_mode(is_causal: bool | str) -> int:
    if isinstance(is_causal, str):
        if is_causal not in _CAUSAL_NAMES:
            raise _err(f"causal must be a bool, 'top_left' or 'bottom_right', got {is_causal!r}")
        return _CAUSAL_NAMES[is_causal]
    return TOP_LEFT if bool(is_causal) else NO_CAUSAL


# =====================================================================================================
# torch backend: the same math in PyTorch ops (scores materialised), any device / dtype
# =====================================================================================================
# Canonical layout shared by every backend (see _canonical): q (B, Sq, Hq, D), k (B, Sk, Hkv, D),
# v (B, Sk, Hkv, Dv) with the last dim contiguous; bias / mask (B, Hq, Sq, Sk) views (stride 0 where
# broadcast); lse (B, Hq, Sq) float32 (float64 for float64 inputs). Packed varlen batches come as B = 1 with cu_seqlens.


def _segments(cu_q, cu_k, sq, sk, b):
    if cu_q is None:
        return [(bi, 0, sq, 0, sk) for bi in range(b)]
    cq, ck = cu_q.tolist(), cu_k.tolist()
    return [(0, cq[i], cq[i + 1] - cq[i], ck[i], ck[i + 1] - ck[i]) for i in range(len(cq) - 1)]


def _torch_keep(
    seed: int, shapes: list[tuple[int, ...]], p: float, device: torch.device
) -> list[torch.Tensor]:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return [torch.rand(s, generator=g, device=device) >= p for s in shapes]


def _torch_scores(q, k, bias, mask, causal, scale, dt, sq_total=None, row0=0):
    """s (H, rows, sk) in dt for query rows row0 .. of one segment of sq_total queries (default: all of
    q), -inf where hidden. q: (rows, Hq, D), k: (sk, Hkv, D); bias / mask: (H, rows, sk) slices."""
    hq, hk = q.shape[1], k.shape[1]
    qh = q.transpose(0, 1).to(dt)
    kh = k.transpose(0, 1).to(dt)
    if hq != hk:
        kh = kh.repeat_interleave(hq // hk, dim=0)
    s = (qh @ kh.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(dt)
    hidden = None
    if mask is not None:
        hidden = ~mask
    total = s.shape[-2] if sq_total is None else sq_total
    vis = _visible(total, s.shape[-1], causal, s.device, row0, s.shape[-2])
    if vis is not None:
        hidden = ~vis if hidden is None else hidden | ~vis
    if hidden is not None:
        s = s.masked_fill(hidden, float("-inf"))
    return s


def _torch_softmax(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, lse) of scores s (..., sk): p = 0 and lse = -inf for a row with no visible key.

    p is normalised by its own sum after subtracting the row max, as SDPA does, not as exp(s - lse): where
    the scores are huge (an HF-style finfo.min mask over a whole row, a bias of 1e30) lse = m + log(sum)
    rounds to m, and exp(s - lse) would be off by the factor sum."""
    if s.shape[-1] == 0:
        return s, s.new_full(s.shape[:-1], -math.inf)
    m = s.amax(-1, keepdim=True)
    m = torch.where(m == -math.inf, torch.zeros_like(m), m)  # NaN / +inf rows stay non-finite
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    p = e / torch.where(den == 0, torch.ones_like(den), den)
    return p, (m + torch.log(den)).squeeze(-1)


def _expand_kv(x, hq):
    return x.repeat_interleave(hq // x.shape[1], dim=1) if x.shape[1] != hq else x


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 inputs keep float64 statistics, so their gradients are float64-accurate too
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_chunks(sq: int, hq: int, sk: int) -> list[tuple[int, int]]:
    """Query-row tiles of a segment: the scores of one tile, (Hq, rows, sk), stay under ~4M elements, so
    memory does not grow with sq * sk (rows whole, so each tile's softmax is exact)."""
    rows = max(16, (1 << 22) // max(1, hq * sk))
    return [(r, min(rows, sq - r)) for r in range(0, sq, rows)]


def _fwd_torch(q, k, v, bias, mask, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed):
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, _, hq, _ = q.shape
    out = torch.empty((*q.shape[:3], v.shape[3]), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, q.shape[1]), dtype=_lse_dtype(q.dtype), device=q.device)
    segs = _segments(cu_q, cu_k, q.shape[1], k.shape[1], b)
    keeps = (
        _torch_keep(seed, [(hq, s[2], s[4]) for s in segs], dropout_p, q.device) if dropout_p > 0 else None
    )
    for n, (bi, q0, sq, k0, sk) in enumerate(segs):
        ks, vs = k[bi, k0 : k0 + sk], v[bi, k0 : k0 + sk]
        vh = _expand_kv(vs.transpose(0, 1).to(dt)[None], hq)[0]
        for r0, rows in _row_chunks(sq, hq, sk):
            qs = q[bi, q0 + r0 : q0 + r0 + rows]
            bs = None if bias is None else bias[bi, :, r0 : r0 + rows, :sk]
            ms = None if mask is None else mask[bi, :, r0 : r0 + rows, :sk]
            p, l_ = _torch_softmax(_torch_scores(qs, ks, bs, ms, causal, scale, dt, sq, r0))
            if keeps is not None:
                p = p * keeps[n][:, r0 : r0 + rows] / (1.0 - dropout_p)
            out[bi, q0 + r0 : q0 + r0 + rows] = (p @ vh).transpose(0, 1).to(q.dtype)
            lse[bi, :, q0 + r0 : q0 + r0 + rows] = torch.where(
                torch.isfinite(l_), l_, torch.full_like(l_, math.inf)
            )
    return out, lse


def _bwd_torch(dout, q, k, v, out, lse, bias, mask, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed,
               bias_grad, deterministic):  # fmt: skip
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, _, hq, _ = q.shape
    hk = k.shape[2]
    dq = torch.zeros(q.shape, dtype=dt, device=q.device)
    dk = torch.zeros(k.shape, dtype=dt, device=q.device)
    dv = torch.zeros(v.shape, dtype=dt, device=q.device)
    dbias = torch.zeros((b, hq, q.shape[1], k.shape[1]), dtype=dt, device=q.device) if bias_grad else None
    segs = _segments(cu_q, cu_k, q.shape[1], k.shape[1], b)
    keeps = (
        _torch_keep(seed, [(hq, s[2], s[4]) for s in segs], dropout_p, q.device) if dropout_p > 0 else None
    )
    g = hq // hk
    for n, (bi, q0, sq, k0, sk) in enumerate(segs):
        ks, vs = k[bi, k0 : k0 + sk], v[bi, k0 : k0 + sk]
        vh = _expand_kv(vs.transpose(0, 1).to(dt)[None], hq)[0]
        kh = _expand_kv(ks.transpose(0, 1).to(dt)[None], hq)[0]
        dkh = torch.zeros((hq, sk, k.shape[3]), dtype=dt, device=q.device)
        dvh = torch.zeros((hq, sk, v.shape[3]), dtype=dt, device=q.device)
        for r0, rows in _row_chunks(sq, hq, sk):
            rs = slice(q0 + r0, q0 + r0 + rows)
            qs = q[bi, rs]
            bs = None if bias is None else bias[bi, :, r0 : r0 + rows, :sk]
            ms = None if mask is None else mask[bi, :, r0 : r0 + rows, :sk]
            p, _ = _torch_softmax(_torch_scores(qs, ks, bs, ms, causal, scale, dt, sq, r0))
            do = dout[bi, rs].transpose(0, 1).to(dt)  # (H, rows, Dv)
            qh = qs.transpose(0, 1).to(dt)
            dp = do @ vh.transpose(-1, -2)
            pd = p
            if keeps is not None:
                keep = keeps[n][:, r0 : r0 + rows]
                pd = p * keep / (1.0 - dropout_p)
                dp = dp * keep / (1.0 - dropout_p)
            delta = (do * out[bi, rs].transpose(0, 1).to(dt)).sum(-1, keepdim=True)
            ds = p * (dp - delta)
            dvh += pd.transpose(-1, -2) @ do
            dkh += (ds.transpose(-1, -2) @ qh) * scale
            dq[bi, rs] = ((ds @ kh) * scale).transpose(0, 1)
            if dbias is not None:
                dbias[bi, :, r0 : r0 + rows, :sk] = ds
        # explicit last dims: a sequence with no keys (sk = 0) makes -1 ambiguous
        dk[bi, k0 : k0 + sk] = dkh.reshape(hk, g, sk, k.shape[3]).sum(1).transpose(0, 1)
        dv[bi, k0 : k0 + sk] = dvh.reshape(hk, g, sk, v.shape[3]).sum(1).transpose(0, 1)
    dbias = dbias.to(bias.dtype) if dbias is not None else q.new_empty(0)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias


# =====================================================================================================
# Triton kernels
# =====================================================================================================

if triton is not None:

    @triton.jit
    def _seq_bounds(CuQ, CuK, b, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
        """(first query row, first key row) as int64 offsets and (sq, sk) of sequence / batch entry b."""
        if VARLEN:
            q0 = tl.load(CuQ + b)
            k0 = tl.load(CuK + b)
            sq = tl.load(CuQ + b + 1) - q0
            sk = tl.load(CuK + b + 1) - k0
            return q0.to(tl.int64), k0.to(tl.int64), sq, sk
        else:
            zero = b.to(tl.int64) * 0
            return zero, zero, seqlen_q, seqlen_k

    @triton.jit
    def _query_program(CuQ, CuK, seqlen_q, seqlen_k, n_heads, n_blocks, CAUSAL: tl.constexpr,
                       VARLEN: tl.constexpr):  # fmt: skip
        """A program over one query block of one (batch, head): its block index, batch, head and bounds.
        The grid is 1-D, (batch x head) folded over the ``n_blocks`` query blocks (block fastest, the order
        of a (blocks, batch x heads) grid): grid y / z would stop at 65,535 batch x head pairs."""
        pid = tl.program_id(0)
        pid_m = pid % n_blocks
        pid_bh = pid // n_blocks
        if CAUSAL != 0:  # the longest rows (most visible keys) first: better tail balance
            pid_m = n_blocks - 1 - pid_m
        b = pid_bh // n_heads
        q0, k0, sq, sk = _seq_bounds(CuQ, CuK, b, seqlen_q, seqlen_k, VARLEN)
        return pid_m, b, pid_bh % n_heads, q0, k0, sq, sk

    @triton.jit
    def _rng_batch(b64, VARLEN: tl.constexpr):
        # dropout counters: (batch, head, query row, key col) of the padded batch; a packed batch is one row
        # space (rows are unique across sequences), so its batch index does not enter
        if VARLEN:
            return b64 * 0
        else:
            return b64

    @triton.jit
    def _fwd_block(acc, l_i, m_i, q, K, V, Bias, Mask, offs_m, offs_d, offs_dv, start, end, sq, sk, off,
                   skn, svn, sbm, sbn, smm, smn, qk_scale, dropout_p, seed, rng_row,
                   D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                   EDGE: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
        # EDGE: the key blocks that need bounds / causal masking (the diagonal and the ragged end)
        for start_n in range(start, end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kmask = offs_d[:, None] < D
            vmask = offs_dv[None, :] < DV
            if EDGE:
                kmask = kmask & (offs_n[None, :] < sk)
                vmask = vmask & (offs_n[:, None] < sk)
            k = tl.load(K + offs_n[None, :] * skn + offs_d[:, None], mask=kmask, other=0.0)
            s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
            tile = (offs_m[:, None] < sq) & (offs_n[None, :] < sk)
            if HAS_BIAS:
                # scores in natural-log units: bias * log2(e) overflows float32 for an HF-style
                # finfo.min mask (-inf for every key, where SDPA gives the uniform average)
                bias = tl.load(Bias + offs_m[:, None] * sbm + offs_n[None, :] * sbn, mask=tile, other=0.0)
                s = s * 0.6931471805599453 + bias.to(tl.float32)
            if HAS_MASK:
                keep = tl.load(Mask + offs_m[:, None] * smm + offs_n[None, :] * smn, mask=tile, other=1)
                s = tl.where(keep != 0, s, float("-inf"))
            if EDGE:
                s = tl.where(offs_n[None, :] < sk, s, float("-inf"))
                if CAUSAL != 0:
                    s = tl.where(offs_n[None, :] <= offs_m[:, None] + off, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
            if HAS_BIAS:
                p = tl.math.exp2((s - m_use[:, None]) * 1.4426950408889634)
                alpha = tl.math.exp2((m_i - m_use) * 1.4426950408889634)
            else:
                p = tl.math.exp2(s - m_use[:, None])
                alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if DROPOUT:
                rng = rng_row[:, None] + offs_n[None, :]
                p = tl.where(tl.rand(seed, rng) >= dropout_p, p, 0.0)
            v = tl.load(V + offs_n[:, None] * svn + offs_dv[None, :], mask=vmask, other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd_kernel(Q, K, V, Out, Lse, Bias, Mask, CuQ, CuK,
                         sqb, sqm, sqh, skb, skn, skh, svb, svn, svh, sob, som, soh, slb, slh,
                         sbb, sbh, sbm, sbn, smb, smh, smm, smn,
                         seqlen_q, seqlen_k, rng_sq, rng_sk, n_heads, group, qk_scale, dropout_p, seed, n_blocks,
                         D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                         HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr,
                         DROPOUT: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
        pid_m, b, h, q0, k0, sq, sk = _query_program(
            CuQ, CuK, seqlen_q, seqlen_k, n_heads, n_blocks, CAUSAL, VARLEN
        )
        if pid_m * BLOCK_M < sq:
            b64 = b.to(tl.int64)
            hk = h // group
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_d = tl.arange(0, BLOCK_D)
            offs_dv = tl.arange(0, BLOCK_DV)
            Q += b64 * sqb + q0 * sqm + h * sqh
            K += b64 * skb + k0 * skn + hk * skh
            V += b64 * svb + k0 * svn + hk * svh
            Bias += b64 * sbb + h * sbh
            Mask += b64 * smb + h * smh
            q = tl.load(Q + offs_m[:, None] * sqm + offs_d[None, :],
                        mask=(offs_m[:, None] < sq) & (offs_d[None, :] < D), other=0.0)  # fmt: skip
            acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            off = 0
            if CAUSAL == 2:
                off = sk - sq
            # key blocks [0, full) need no masking; [full, hi) do (ragged end, causal diagonal)
            hi = sk
            full = (sk // BLOCK_N) * BLOCK_N
            if CAUSAL != 0:
                hi = tl.minimum(sk, (pid_m + 1) * BLOCK_M + off)
                hi = tl.maximum(hi, 0)
                full = tl.minimum(full, tl.maximum(pid_m * BLOCK_M + off + 1, 0) // BLOCK_N * BLOCK_N)
            rng_row = ((_rng_batch(b64, VARLEN) * n_heads + h) * rng_sq + q0 + offs_m) * rng_sk
            acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, K, V, Bias, Mask, offs_m, offs_d, offs_dv, 0, full,
                                       sq, sk, off, skn, svn, sbm, sbn, smm, smn, qk_scale, dropout_p, seed,
                                       rng_row, D, DV, BLOCK_N, CAUSAL, HAS_BIAS, HAS_MASK, DROPOUT, False,
                                       PRECISION)  # fmt: skip
            acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, K, V, Bias, Mask, offs_m, offs_d, offs_dv, full, hi,
                                       sq, sk, off, skn, svn, sbm, sbn, smm, smn, qk_scale, dropout_p, seed,
                                       rng_row, D, DV, BLOCK_N, CAUSAL, HAS_BIAS, HAS_MASK, DROPOUT, True,
                                       PRECISION)  # fmt: skip
            empty = l_i == 0.0
            inv = 1.0 / tl.where(empty, 1.0, l_i)
            if DROPOUT:
                inv = inv / (1.0 - dropout_p)
            out = acc * inv[:, None]
            Out += b64 * sob + q0 * som + h * soh
            tl.store(Out + offs_m[:, None] * som + offs_dv[None, :], out.to(Out.dtype.element_ty),
                     mask=(offs_m[:, None] < sq) & (offs_dv[None, :] < DV))  # fmt: skip
            log2_l = tl.math.log2(tl.where(empty, 1.0, l_i))
            if HAS_BIAS:  # m_i in natural-log units
                lse = tl.where(empty, float("inf"), m_i + log2_l * 0.6931471805599453)
            else:
                lse = tl.where(empty, float("inf"), (m_i + log2_l) * 0.6931471805599453)
            tl.store(Lse + b64 * slb + h * slh + q0 + offs_m, lse, mask=offs_m < sq)

    @triton.jit
    def _bwd_delta_kernel(Out, DO, Delta, CuQ, sob, som, soh, sdb, sdm, sdh, slb, slh, seqlen_q, n_heads,
                          n_blocks, DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                          VARLEN: tl.constexpr):  # fmt: skip
        pid = tl.program_id(0)  # 1-D grid: (batch x head) folded over the query blocks (see _query_program)
        pid_m = pid % n_blocks
        pid_bh = pid // n_blocks
        b = pid_bh // n_heads
        h = pid_bh % n_heads
        q0, _, sq, _ = _seq_bounds(CuQ, CuQ, b, seqlen_q, seqlen_q, VARLEN)
        if pid_m * BLOCK_M < sq:
            b64 = b.to(tl.int64)
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_dv = tl.arange(0, BLOCK_DV)
            msk = (offs_m[:, None] < sq) & (offs_dv[None, :] < DV)
            rows = (q0 + offs_m).to(tl.int64)
            o = tl.load(
                Out + b64 * sob + h * soh + rows[:, None] * som + offs_dv[None, :], mask=msk, other=0.0
            )
            do = tl.load(
                DO + b64 * sdb + h * sdh + rows[:, None] * sdm + offs_dv[None, :], mask=msk, other=0.0
            )
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
            tl.store(Delta + b64 * slb + h * slh + q0 + offs_m, delta, mask=offs_m < sq)

    @triton.jit
    def _bwd_p(q, k, Bias, Mask, lse, offs_m, offs_n, sq, sk, off, sbm, sbn, smm, smn, qk_scale,
               CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
               PRECISION: tl.constexpr):  # fmt: skip
        """Probabilities p (BLOCK_M, BLOCK_N) recomputed from lse (natural log; +inf for an empty row);
        0 where hidden. With a bias the scores stay in natural-log units, as in the forward."""
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
        tile = (offs_m[:, None] < sq) & (offs_n[None, :] < sk)
        if HAS_BIAS:
            bias = tl.load(Bias + offs_m[:, None] * sbm + offs_n[None, :] * sbn, mask=tile, other=0.0)
            s = s * 0.6931471805599453 + bias.to(tl.float32)
            p = tl.math.exp2((s - lse[:, None]) * 1.4426950408889634)
        else:
            p = tl.math.exp2(s - lse[:, None] * 1.4426950408889634)
        vis = tile
        if HAS_MASK:
            keep = tl.load(Mask + offs_m[:, None] * smm + offs_n[None, :] * smn, mask=tile, other=0)
            vis = vis & (keep != 0)
        if CAUSAL != 0:
            vis = vis & (offs_n[None, :] <= offs_m[:, None] + off)
        return tl.where(vis, p, 0.0)

    @triton.jit
    def _attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV_, DQacc, DBias, Lse, Delta, Bias, Mask, CuQ, CuK,
                              sqb, sqm, sqh, skb, skn, skh, svb, svn, svh, sdb, sdm, sdh,
                              sdkb, sdkn, sdkh, sdvb, sdvn, sdvh, sab, sam, sah, slb, slh,
                              sbb, sbh, sbm, sbn, smb, smh, smm, smn, sgb, sgh, sgm, sgn,
                              seqlen_q, seqlen_k, rng_sq, rng_sk, n_heads_kv, group, scale, qk_scale,
                              dropout_p, seed, n_blocks,
                              D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
                              BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
                              VARLEN: tl.constexpr, DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                              BIAS_GRAD: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
        # ATOMIC_DQ: one pass for every gradient, dQ accumulated with fp32 atomics (order-dependent rounding,
        # so not bit-reproducible); otherwise dQ (and dBias) come from _attn_bwd_dq_kernel.
        pid = tl.program_id(0)  # 1-D grid: (batch x kv head) folded over the key blocks
        pid_n = pid % n_blocks
        pid_bh = pid // n_blocks
        b = pid_bh // n_heads_kv
        hk = pid_bh % n_heads_kv
        q0, k0, sq, sk = _seq_bounds(CuQ, CuK, b, seqlen_q, seqlen_k, VARLEN)
        if pid_n * BLOCK_N < sk:
            b64 = b.to(tl.int64)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            offs_d = tl.arange(0, BLOCK_D)
            offs_dv = tl.arange(0, BLOCK_DV)
            krow = (k0 + offs_n).to(tl.int64)
            k = tl.load(
                K + b64 * skb + hk * skh + krow[None, :] * skn + offs_d[:, None],
                mask=(offs_n[None, :] < sk) & (offs_d[:, None] < D),
                other=0.0,
            )  # (BLOCK_D, BLOCK_N)
            v = tl.load(V + b64 * svb + hk * svh + krow[None, :] * svn + offs_dv[:, None],
                        mask=(offs_n[None, :] < sk) & (offs_dv[:, None] < DV), other=0.0)  # fmt: skip
            dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
            off = 0
            if CAUSAL == 2:
                off = sk - sq
            lo = 0
            if CAUSAL != 0:
                lo = tl.maximum(pid_n * BLOCK_N - off, 0) // BLOCK_M * BLOCK_M
            for g in range(0, group):
                h = hk * group + g
                Qh = Q + b64 * sqb + h * sqh + q0 * sqm
                DOh = DO + b64 * sdb + h * sdh + q0 * sdm
                Lh = Lse + b64 * slb + h * slh + q0
                Dh = Delta + b64 * slb + h * slh + q0
                Bh = Bias + b64 * sbb + h * sbh
                Mh = Mask + b64 * smb + h * smh
                DQh = DQacc + b64 * sab + h * sah + q0 * sam
                DBh = DBias + b64 * sgb + h * sgh
                rng_bh = (_rng_batch(b64, VARLEN) * n_heads_kv * group + h) * rng_sq + q0
                for start_m in range(lo, sq, BLOCK_M):
                    offs_m = start_m + tl.arange(0, BLOCK_M)
                    mrow = offs_m[:, None] < sq
                    q = tl.load(Qh + offs_m[:, None] * sqm + offs_d[None, :],
                                mask=mrow & (offs_d[None, :] < D), other=0.0)  # fmt: skip
                    do = tl.load(DOh + offs_m[:, None] * sdm + offs_dv[None, :],
                                 mask=mrow & (offs_dv[None, :] < DV), other=0.0)  # fmt: skip
                    lse = tl.load(Lh + offs_m, mask=offs_m < sq, other=float("inf"))
                    delta = tl.load(Dh + offs_m, mask=offs_m < sq, other=0.0)
                    p = _bwd_p(q, k, Bh, Mh, lse, offs_m, offs_n, sq, sk, off, sbm, sbn, smm, smn, qk_scale,
                               CAUSAL, HAS_BIAS, HAS_MASK, PRECISION)  # fmt: skip
                    dp = tl.dot(do, v, input_precision=PRECISION)
                    if DROPOUT:
                        rng = ((rng_bh + offs_m) * rng_sk)[:, None] + offs_n[None, :]
                        keep = tl.rand(seed, rng) >= dropout_p
                        inv_keep = 1.0 / (1.0 - dropout_p)
                        pd = tl.where(keep, p * inv_keep, 0.0)
                        dp = tl.where(keep, dp * inv_keep, 0.0)
                    else:
                        pd = p
                    dv = tl.dot(tl.trans(pd.to(do.dtype)), do, dv, input_precision=PRECISION)
                    ds = p * (dp - delta[:, None])
                    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PRECISION)
                    if ATOMIC_DQ:
                        dq = tl.dot(ds.to(k.dtype), tl.trans(k), input_precision=PRECISION) * scale
                        tl.atomic_add(DQh + offs_m[:, None] * sam + offs_d[None, :], dq,
                                      mask=mrow & (offs_d[None, :] < D))  # fmt: skip
                        if BIAS_GRAD:
                            tl.store(DBh + offs_m[:, None] * sgm + offs_n[None, :] * sgn, ds,
                                     mask=mrow & (offs_n[None, :] < sk))  # fmt: skip
            dk = dk * scale
            tl.store(DK + b64 * sdkb + hk * sdkh + krow[:, None] * sdkn + offs_d[None, :],
                     dk.to(DK.dtype.element_ty), mask=(offs_n[:, None] < sk) & (offs_d[None, :] < D))  # fmt: skip
            tl.store(DV_ + b64 * sdvb + hk * sdvh + krow[:, None] * sdvn + offs_dv[None, :],
                     dv.to(DV_.dtype.element_ty), mask=(offs_n[:, None] < sk) & (offs_dv[None, :] < DV))  # fmt: skip

    @triton.jit
    def _attn_bwd_dq_kernel(Q, K, V, DO, DQ, DBias, Lse, Delta, Bias, Mask, CuQ, CuK,
                            sqb, sqm, sqh, skb, skn, skh, svb, svn, svh, sdb, sdm, sdh,
                            sdqb, sdqm, sdqh, slb, slh, sbb, sbh, sbm, sbn, smb, smh, smm, smn,
                            sgb, sgh, sgm, sgn,
                            seqlen_q, seqlen_k, rng_sq, rng_sk, n_heads, group, scale, qk_scale, dropout_p, seed,
                            n_blocks, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                            HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr,
                            DROPOUT: tl.constexpr, BIAS_GRAD: tl.constexpr,
                            PRECISION: tl.constexpr):  # fmt: skip
        pid_m, b, h, q0, k0, sq, sk = _query_program(
            CuQ, CuK, seqlen_q, seqlen_k, n_heads, n_blocks, CAUSAL, VARLEN
        )
        if pid_m * BLOCK_M < sq:
            b64 = b.to(tl.int64)
            hk = h // group
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_d = tl.arange(0, BLOCK_D)
            offs_dv = tl.arange(0, BLOCK_DV)
            qrow = (q0 + offs_m).to(tl.int64)
            mrow = offs_m[:, None] < sq
            q = tl.load(Q + b64 * sqb + h * sqh + qrow[:, None] * sqm + offs_d[None, :],
                        mask=mrow & (offs_d[None, :] < D), other=0.0)  # fmt: skip
            do = tl.load(DO + b64 * sdb + h * sdh + qrow[:, None] * sdm + offs_dv[None, :],
                         mask=mrow & (offs_dv[None, :] < DV), other=0.0)  # fmt: skip
            lbase = b64 * slb + h * slh + q0
            lse = tl.load(Lse + lbase + offs_m, mask=offs_m < sq, other=float("inf"))
            delta = tl.load(Delta + lbase + offs_m, mask=offs_m < sq, other=0.0)
            K += b64 * skb + hk * skh + k0 * skn
            V += b64 * svb + hk * svh + k0 * svn
            Bias += b64 * sbb + h * sbh
            Mask += b64 * smb + h * smh
            DBias += b64 * sgb + h * sgh
            dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            off = 0
            if CAUSAL == 2:
                off = sk - sq
            hi = sk
            if CAUSAL != 0:
                hi = tl.maximum(tl.minimum(sk, (pid_m + 1) * BLOCK_M + off), 0)
            rng_row = ((_rng_batch(b64, VARLEN) * n_heads + h) * rng_sq + q0 + offs_m) * rng_sk
            for start_n in range(0, hi, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                ncol = offs_n[None, :] < sk
                k = tl.load(
                    K + offs_n[None, :] * skn + offs_d[:, None], mask=ncol & (offs_d[:, None] < D), other=0.0
                )
                v = tl.load(V + offs_n[None, :] * svn + offs_dv[:, None], mask=ncol & (offs_dv[:, None] < DV),
                            other=0.0)  # fmt: skip
                p = _bwd_p(q, k, Bias, Mask, lse, offs_m, offs_n, sq, sk, off, sbm, sbn, smm, smn, qk_scale,
                           CAUSAL, HAS_BIAS, HAS_MASK, PRECISION)  # fmt: skip
                dp = tl.dot(do, v, input_precision=PRECISION)
                if DROPOUT:
                    keep = tl.rand(seed, rng_row[:, None] + offs_n[None, :]) >= dropout_p
                    dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
                ds = p * (dp - delta[:, None])
                if BIAS_GRAD:
                    tl.store(DBias + offs_m[:, None] * sgm + offs_n[None, :] * sgn, ds, mask=mrow & ncol)
                dq = tl.dot(ds.to(k.dtype), tl.trans(k), dq, input_precision=PRECISION)
            dq = dq * scale
            tl.store(DQ + b64 * sdqb + h * sdqh + qrow[:, None] * sdqm + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                     mask=mrow & (offs_d[None, :] < D))  # fmt: skip

    @triton.jit
    def _dropout_keep_kernel(Keep, sq, sk, dropout_p, seed, n_blocks,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
        pid = tl.program_id(0)  # 1-D grid: (batch x head) folded over the query blocks
        pid_m = pid % n_blocks
        pid_bh = pid // n_blocks
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        bh = pid_bh.to(tl.int64)
        for start_n in range(0, sk, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            rng = (bh * sq + offs_m[:, None]) * sk + offs_n[None, :]
            keep = tl.rand(seed, rng) >= dropout_p
            tl.store(Keep + (bh * sq + offs_m[:, None]) * sk + offs_n[None, :], keep.to(tl.int8),
                     mask=(offs_m[:, None] < sq) & (offs_n[None, :] < sk))  # fmt: skip


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _configs(d: int, dtype: torch.dtype, kind: str, heavy: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for head dim d. Small blocks under the interpreter.

    Chosen from sm_90 compiles (`.ci/check_triton.py` prints registers / spills): 8 warps keep the plain
    paths spill-free; ``heavy`` (a bias, a mask or dropout in the forward: extra per-tile tensors and the
    Philox state) halves BLOCK_N to bound the spills."""
    if _backend.triton_interpret():
        return 16, 16, 4, 1
    wide = dtype == torch.float32
    if kind == "fwd":
        cfg = (128, 64, 8, 3) if d <= 128 else (64, 32, 8, 2)
        if heavy:
            cfg = (cfg[0], cfg[1] // 2, cfg[2], cfg[3])
    else:
        cfg = (64, 64, 8, 2) if d <= 64 else (32, 64, 8, 2) if d <= 128 else (32, 32, 8, 1)
    if wide:
        cfg = (cfg[0] // 2 if d > 64 else cfg[0], max(16, cfg[1] // 2), cfg[2], max(1, cfg[3] - 1))
    return cfg


def _mask_args(t: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    if t is None:
        return like, (0, 0, 0, 0)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return t, tuple(t.stride())


def _fwd_triton(q, k, v, bias, mask, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed):
    b, sq, hq, d = q.shape
    sk, hk, dv = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty((b, sq, hq, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    varlen = cu_q is not None
    nb = cu_q.numel() - 1 if varlen else b
    heavy = bias is not None or mask is not None or dropout_p > 0
    bm, bn, warps, stages = _configs(max(d, dv), q.dtype, "fwd", heavy)
    bias_t, bs = _mask_args(bias, q)
    mask_t, ms = _mask_args(mask, q)
    cu_q_t = cu_q if varlen else lse
    cu_k_t = cu_k if varlen else lse
    n_blocks = triton.cdiv(max_q if varlen else sq, bm)
    grid = (n_blocks * nb * hq,)  # 1-D: no 65,535 limit on batch x heads
    sb0 = 0 if varlen else None
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, bias_t, mask_t, cu_q_t, cu_k_t,
        sb0 if varlen else q.stride(0), q.stride(1), q.stride(2),
        sb0 if varlen else k.stride(0), k.stride(1), k.stride(2),
        sb0 if varlen else v.stride(0), v.stride(1), v.stride(2),
        sb0 if varlen else out.stride(0), out.stride(1), out.stride(2),
        sb0 if varlen else lse.stride(0), lse.stride(1),
        *bs, *ms, sq, sk, sq, sk, hq, hq // hk, scale * LOG2E, dropout_p, seed, n_blocks,
        D=d, DV=dv, BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv), BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal,
        HAS_BIAS=bias is not None, HAS_MASK=mask is not None, VARLEN=varlen, DROPOUT=dropout_p > 0,
        PRECISION=_precision(q.dtype), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out, lse


def _bwd_triton(dout, q, k, v, out, lse, bias, mask, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed,
                bias_grad, deterministic):  # fmt: skip
    b, sq, hq, d = q.shape
    sk, hk, dv = k.shape[1], k.shape[2], v.shape[3]
    varlen = cu_q is not None
    nb = cu_q.numel() - 1 if varlen else b
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=q.device)
    dvv = torch.empty(v.shape, dtype=v.dtype, device=q.device)
    dbias = torch.zeros((b, hq, sq, sk), dtype=torch.float32, device=q.device) if bias_grad else lse
    bm, bn, warps, stages = _configs(max(d, dv), q.dtype, "bwd")
    bias_t, bs = _mask_args(bias, q)
    mask_t, ms = _mask_args(mask, q)
    cu_q_t = cu_q if varlen else lse
    cu_k_t = cu_k if varlen else lse

    def sb(t):
        return 0 if varlen else t.stride(0)

    common = dict(D=d, DV=dv, BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv), BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal,
                  HAS_BIAS=bias is not None, HAS_MASK=mask is not None, VARLEN=varlen, DROPOUT=dropout_p > 0,
                  PRECISION=_precision(q.dtype), num_warps=warps, num_stages=stages)  # fmt: skip
    q_blocks = triton.cdiv(max_q if varlen else sq, bm)
    qgrid = (q_blocks * nb * hq,)  # 1-D grids: no 65,535 limit on batch x heads
    _bwd_delta_kernel[qgrid](out, dout, delta, cu_q_t, sb(out), out.stride(1), out.stride(2), sb(dout),
                             dout.stride(1), dout.stride(2), sb(lse), lse.stride(1), sq, hq, q_blocks,
                             DV=dv, BLOCK_DV=_pow2(dv), BLOCK_M=bm, VARLEN=varlen)  # fmt: skip
    strides = (sb(q), q.stride(1), q.stride(2), sb(k), k.stride(1), k.stride(2), sb(v), v.stride(1), v.stride(2),
               sb(dout), dout.stride(1), dout.stride(2))  # fmt: skip
    gs = tuple(dbias.stride()) if bias_grad else (0, 0, 0, 0)
    dq_acc = dq if deterministic else torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    k_blocks = triton.cdiv(max_k if varlen else sk, bn)
    _attn_bwd_dkdv_kernel[(k_blocks * nb * hk,)](
        q, k, v, dout, dk, dvv, dq_acc, dbias, lse, delta, bias_t, mask_t, cu_q_t, cu_k_t, *strides,
        sb(dk), dk.stride(1), dk.stride(2), sb(dvv), dvv.stride(1), dvv.stride(2),
        sb(dq_acc), dq_acc.stride(1), dq_acc.stride(2), sb(lse), lse.stride(1), *bs, *ms, *gs,
        sq, sk, sq, sk, hk, hq // hk, scale, scale * LOG2E, dropout_p, seed, k_blocks,
        ATOMIC_DQ=not deterministic, BIAS_GRAD=bias_grad and not deterministic, **common,
    )  # fmt: skip
    if deterministic:
        _attn_bwd_dq_kernel[qgrid](
            q, k, v, dout, dq, dbias, lse, delta, bias_t, mask_t, cu_q_t, cu_k_t, *strides,
            sb(dq), dq.stride(1), dq.stride(2), sb(lse), lse.stride(1), *bs, *ms, *gs,
            sq, sk, sq, sk, hq, hq // hk, scale, scale * LOG2E, dropout_p, seed, q_blocks, BIAS_GRAD=bias_grad,
            **common,
        )  # fmt: skip
    else:
        dq = dq_acc.to(q.dtype)
    dbias = dbias.to(bias.dtype) if bias_grad else q.new_empty(0)
    return dq, dk, dvv, dbias


def dropout_keep_mask(
    backend: str,
    shape: tuple[int, int, int, int],
    dropout_p: float,
    seed: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The bool keep-mask (B, H, Sq, Sk) that ``backend`` ("triton" or "torch") draws for a padded batch
    with this seed: what :func:`attention_ref`'s ``dropout_mask`` needs to reproduce a dropout call."""
    b, h, sq, sk = shape
    device = torch.device(device)
    if backend == "torch":
        return torch.stack(_torch_keep(seed, [(h, sq, sk)] * b, dropout_p, device) if b else [])
    if backend != "triton":
        raise _err(f"dropout_keep_mask: unknown backend {backend!r}")
    keep = torch.empty((b, h, sq, sk), dtype=torch.int8, device=device)
    bm, bn = 16, 64
    n_blocks = triton.cdiv(sq, bm)
    _dropout_keep_kernel[(n_blocks * b * h,)](keep, sq, sk, dropout_p, seed, n_blocks,
                                              BLOCK_M=bm, BLOCK_N=bn)  # fmt: skip
    return keep.bool()


# =====================================================================================================
# Backends and the torch.library ops
# =====================================================================================================


OP.register("triton", devices=("cuda",), dtypes=KERNEL_DTYPES, available=_backend.triton_available,
            check=_backend.triton_check(head_dim=MAX_HEAD_DIM, head_dim_v=MAX_HEAD_DIM), forced_only_devices=("cpu",),
            note="flash-attention 2 style; bwd with atomic or two-pass (deterministic) dQ")(_fwd_triton)  # fmt: skip
OP.register("torch", devices=("cpu", "cuda", "mps", "xpu"), dtypes=(*KERNEL_DTYPES, torch.float64),
            note="PyTorch ops over query-row tiles")(_fwd_torch)  # fmt: skip
_BWD = {"triton": _bwd_triton, "torch": _bwd_torch}


def _call(q: torch.Tensor, v: torch.Tensor) -> Call:
    return Call(q.device, q.dtype, {"head_dim": q.shape[-1], "head_dim_v": v.shape[-1]})


@torch.library.custom_op("fastgen::attention_fwd", mutates_args=())
def _attention_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: int,
    scale: float,
    dropout_p: float,
    seed: int,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    # deterministic only matters to the backward (setup_context saves it)
    backend = OP.dispatch(_call(q, v))
    return backend.fn(q, k, v, bias, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                      dropout_p, seed)  # fmt: skip


@_attention_fwd_op.register_fake
def _(
    q,
    k,
    v,
    bias,
    mask,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    causal,
    scale,
    dropout_p,
    seed,
    deterministic,
):
    out = q.new_empty((*q.shape[:3], v.shape[3]))
    lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=_lse_dtype(q.dtype))
    return out, lse


@torch.library.custom_op("fastgen::attention_bwd", mutates_args=())
def _attention_bwd_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: int,
    scale: float,
    dropout_p: float,
    seed: int,
    bias_grad: bool,
    deterministic: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # the backend that ran the forward (chosen when it ran: a forced backend may be out of scope by now,
    # and the dropout streams differ between backends)
    return _BWD[backend](dout, q, k, v, out, lse, bias, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, causal, scale, dropout_p, seed, bias_grad, deterministic)  # fmt: skip


@_attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, bias, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
      dropout_p, seed, bias_grad, deterministic, backend):  # fmt: skip
    dbias = (
        q.new_empty((q.shape[0], q.shape[2], q.shape[1], k.shape[1]), dtype=bias.dtype)
        if bias_grad
        else q.new_empty(0)
    )
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


def _setup_context(ctx, inputs, output):
    q, k, v, bias, mask, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, mask, cu_q, cu_k)
    ctx.args = (max_q, max_k, causal, scale, dropout_p, seed)
    ctx.deterministic = deterministic
    ctx.backend = OP.dispatch(_call(q, v)).name


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, bias, mask, cu_q, cu_k = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = _attention_bwd_op(dout, q, k, v, out, lse, bias, mask, cu_q, cu_k, *ctx.args, bias_grad,
                                          ctx.deterministic, ctx.backend)  # fmt: skip
    return dq, dk, dv, (dbias if bias_grad else None), *([None] * 10)


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# =====================================================================================================
# Public API
# =====================================================================================================


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names=("query", "key", "value")) -> None:
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, torch.Tensor):
            raise _err(f"{name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise _err(f"{name} must be floating point, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise _err(f"query, key and value must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise _err(f"query, key and value must be on one device, got {q.device}, {k.device}, {v.device}")


def _draw_seed(dropout_p: float, seed: int | None) -> int:
    if dropout_p == 0.0:
        return 0
    if seed is not None:
        return int(seed) & ((1 << 62) - 1)
    # drawn from torch's default generator: torch.manual_seed makes dropout reproducible
    return int(torch.randint(0, 1 << 62, (), dtype=torch.int64))


def _deterministic(flag: bool | None) -> bool:
    return torch.are_deterministic_algorithms_enabled() if flag is None else bool(flag)


def _check_dropout(dropout_p: float) -> float:
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise _err(f"dropout_p must be in [0, 1), got {dropout_p}")
    return dropout_p


def _check_scale(scale: float | None, d: int) -> float:
    """The softmax scale as a float, default 1 / sqrt(d). Any finite value (zero and negative included, as
    SDPA and attention_decode); NaN / inf would only give an all-NaN output."""
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"fastgen.attention: scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise _err(f"scale must be finite, got {scale}")
    return scale


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def flash_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    causal: bool | str = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """General fused attention in SDPA's layout; the function every other API calls.

    query: (B, Hq, Sq, D), key: (B, Hkv, Sk, D), value: (B, Hkv, Sk, Dv) with Hq % Hkv == 0 (GQA / MQA).
    bias: additive float, broadcastable to (B, Hq, Sq, Sk); gets a gradient when it requires one.
    mask: bool, True = attend, broadcastable to (B, Hq, Sq, Sk) (e.g. a key-padding mask (B, 1, 1, Sk)).
    causal: False, True / "top_left" (SDPA's alignment) or "bottom_right" (flash-attn's).
    scale: default 1 / sqrt(D). dropout_p: dropout on the probabilities, seeded by ``seed`` (default: drawn
    from torch's generator, so ``torch.manual_seed`` makes it reproducible).
    deterministic: backward bit-reproducible run to run (dQ from its own pass over the keys) rather than
    one pass with fp32 atomics for dQ; default: ``torch.are_deterministic_algorithms_enabled()``.
    Returns (B, Hq, Sq, Dv) in the inputs' dtype (memory layout (B, Sq, Hq, Dv), a transposed view).
    """
    _check_qkv(query, key, value)
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise _err(
            f"query, key, value must be 4-D (batch, heads, seq, head_dim), got {_shape(query)}, "
            f"{_shape(key)}, {_shape(value)}"
        )
    b, hq, sq, d = query.shape
    bk, hk, sk, dk = key.shape
    if bk != b or value.shape[0] != b:
        raise _err(f"batch sizes differ: query {b}, key {bk}, value {value.shape[0]}")
    if dk != d:
        raise _err(f"key head_dim {dk} != query head_dim {d} (query {_shape(query)}, key {_shape(key)})")
    if value.shape[1] != hk or value.shape[2] != sk:
        raise _err(f"value {_shape(value)} does not match key {_shape(key)} in heads and sequence length")
    if hk == 0 or hq % hk != 0:
        raise _err(f"query heads {hq} must be a multiple of key/value heads {hk} (GQA/MQA)")
    if d == 0 or value.shape[3] == 0:
        raise _err(f"head_dim must be positive, got query {d}, value {value.shape[3]}")
    causal_mode = _causal_mode(causal)
    dropout_p = _check_dropout(dropout_p)
    scale = _check_scale(scale, d)
    full = (b, hq, sq, sk)
    bias_in, mask_in = bias, mask  # as given (SDPA broadcasts them itself: no expanded views)
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise _err(f"bias must be a floating-point tensor, got {getattr(bias, 'dtype', type(bias))}")
        bias = _broadcast("bias", bias, full, query.device)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise _err(
                f"mask must be a bool tensor (True = attend), got {getattr(mask, 'dtype', type(mask))}"
            )
        mask = _broadcast("mask", mask, full, query.device)
    if not _torch_sdpa_why_not(query, value, bias, mask, dropout_p, seed, deterministic):
        return _via_torch_sdpa(query, key, value, bias_in, mask_in, causal_mode, scale, dropout_p)
    q = _last_dim_contiguous(query.transpose(1, 2))
    k = _last_dim_contiguous(key.transpose(1, 2))
    v = _last_dim_contiguous(value.transpose(1, 2))
    if b == 0 or sq == 0 or hq == 0:
        return query.new_zeros((b, hq, sq, value.shape[3]))
    out, _ = _attention_fwd_op(q, k, v, bias, mask, None, None, sq, sk, causal_mode, scale, dropout_p,
                               _draw_seed(dropout_p, seed), _deterministic(deterministic))  # fmt: skip
    return out.transpose(1, 2)


# =====================================================================================================
# torch's own fused SDPA: where fastgen's default backend would be the torch one (a CPU tensor, or no Triton)
# and SDPA can express the call, it serves it (rule 11: its fused CPU kernels are tiled and faster than the
# torch backend's materialised scores); fastgen's backends serve what only they do
# =====================================================================================================

_TORCH_SDPA = torch._C._nn.scaled_dot_product_attention  # torch's, even while swap patches F's
# torch >= 2.5 gives zeros for a row with every key masked (its safe softmax), fastgen's convention
_SDPA_ZERO_ROWS = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


@torch.compiler.assume_constant_result
def _default_backend(device_type: str, dtype: torch.dtype, d: int, dv: int) -> str:
    """The backend a call would get with nothing forced ("" when one is forced: it serves as asked)."""
    if OP.forced_backend() is not None:
        return ""
    return _unforced_backend(device_type, dtype, d, dv, _backend.getenv("TRITON_INTERPRET") or "")


@functools.lru_cache(maxsize=256)
def _unforced_backend(device_type: str, dtype: torch.dtype, d: int, dv: int, _interpret: str) -> str:
    # the availability probes behind dispatch cost tens of microseconds; their answer is fixed per process
    # (but for TRITON_INTERPRET, part of the key)
    call = Call(torch.device(device_type), dtype, {"head_dim": d, "head_dim_v": dv})
    return OP.dispatch(call).name


def _torch_sdpa_why_not(query, value, bias, mask, dropout_p, seed, deterministic) -> list[str]:
    """Why torch's SDPA cannot serve this flash_attention call (empty: it serves it)."""
    why = []
    if _default_backend(query.device.type, query.dtype, query.shape[-1], value.shape[-1]) != "torch":
        why.append("a fastgen kernel serves this device / dtype (or a backend is forced)")
    if bias is not None and bias.requires_grad and torch.is_grad_enabled():
        why.append("bias needs a gradient")
    if bias is not None and bias.dtype != query.dtype:
        why.append(f"bias dtype {bias.dtype} differs from the inputs' {query.dtype} (SDPA would round it)")
    if dropout_p > 0 and seed is not None:
        why.append("dropout with an explicit seed")
    if deterministic and query.device.type != "cpu":
        why.append("deterministic backward requested off CPU")
    if (bias is not None or mask is not None) and not _SDPA_ZERO_ROWS:
        why.append("this torch gives NaN for fully masked rows")
    return why


def _via_torch_sdpa(query, key, value, bias, mask, causal, scale, dropout_p):
    """flash_attention's semantics through torch's SDPA: bias and mask (already broadcast views) become
    one attn_mask; a causal pattern SDPA's is_causal cannot say (with a mask, or bottom-right with
    Sq != Sk) becomes part of it."""
    sq, sk = query.shape[-2], key.shape[-2]
    attn = bias
    if mask is not None:
        attn = mask if bias is None else torch.where(mask, bias, float("-inf"))
    is_causal = False
    if causal != NO_CAUSAL:
        if attn is None and (causal == TOP_LEFT or sq == sk):
            is_causal = True
        else:
            vis = _visible(sq, sk, causal, query.device)
            if attn is None:
                attn = vis
            elif attn.dtype == torch.bool:
                attn = attn & vis
            else:
                attn = torch.where(vis, attn, float("-inf"))
    return _TORCH_SDPA(query, key, value, attn, dropout_p, is_causal, scale=scale,
                       enable_gqa=query.shape[1] != key.shape[1])  # fmt: skip


def _varlen_via_torch_sdpa(q, k, v, cu_q, cu_k, causal, scale, dropout_p):
    """flash_attn_varlen on the CPU through torch's fused SDPA (the lengths are on the host): rule 11, its
    tiled CPU kernels beat the torch backend's per-segment score tiles. Sequences of the same (Sq, Sk) run
    as one batched call. A sequence with no keys gives zeros (fastgen's convention); causal is bottom-right
    aligned, as flash-attn."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    gqa = q.shape[1] != k.shape[1]
    groups: dict[tuple[int, int], list[int]] = {}
    for i in range(len(cq) - 1):
        groups.setdefault((cq[i + 1] - cq[i], ck[i + 1] - ck[i]), []).append(i)
    parts = []  # (first packed row, output rows)
    for (sq, sk), seqs in groups.items():
        if sq == 0 or sk == 0:
            continue  # no rows, or no keys: zeros
        n = len(seqs)
        # consecutive sequences of one length are a (n, S, H, D) view of the packed rows: no copies
        run = seqs[-1] - seqs[0] + 1 == n
        if run:
            qs = q[cq[seqs[0]] : cq[seqs[0]] + n * sq].unflatten(0, (n, sq)).transpose(1, 2)  # (n, Hq, Sq, D)
            ks = k[ck[seqs[0]] : ck[seqs[0]] + n * sk].unflatten(0, (n, sk)).transpose(1, 2)
            vs = v[ck[seqs[0]] : ck[seqs[0]] + n * sk].unflatten(0, (n, sk)).transpose(1, 2)
        else:
            qs = torch.stack([q[cq[i] : cq[i] + sq] for i in seqs]).transpose(1, 2)
            ks = torch.stack([k[ck[i] : ck[i] + sk] for i in seqs]).transpose(1, 2)
            vs = torch.stack([v[ck[i] : ck[i] + sk] for i in seqs]).transpose(1, 2)
        attn, is_causal = None, False
        if causal:
            if sq == sk:
                is_causal = True
            else:
                attn = _visible(sq, sk, BOTTOM_RIGHT, q.device)
        o = _TORCH_SDPA(qs, ks, vs, attn, dropout_p, is_causal, scale=scale, enable_gqa=gqa).transpose(1, 2)
        if run:
            parts.append((cq[seqs[0]], o.flatten(0, 1)))
        else:
            parts += [(cq[i], o[j]) for j, i in enumerate(seqs)]
    parts.sort(key=operator.itemgetter(0))
    shape = (q.shape[0], q.shape[1], v.shape[2])
    tiled = parts and parts[0][0] == 0 and parts[-1][0] + parts[-1][1].shape[0] == q.shape[0]
    if tiled and all(a[0] + a[1].shape[0] == b[0] for a, b in itertools.pairwise(parts)):
        # the outputs tile the packed rows in order (every sequence has rows and keys)
        return parts[0][1].reshape(shape) if len(parts) == 1 else torch.cat([t for _, t in parts])
    out = q.new_zeros(shape)
    for row, t in parts:
        out[row : row + t.shape[0]] = t
    return out


def _broadcast(name: str, t: torch.Tensor, full: tuple[int, ...], device: torch.device) -> torch.Tensor:
    if t.device != device:
        raise _err(f"{name} is on {t.device} but query is on {device}")
    if not _broadcasts(tuple(t.shape), full):
        raise _err(
            f"{name} of shape {_shape(t)} is not broadcastable to (batch, heads, seq_q, seq_k) = {full}"
        )
    return t.expand(full)


def _broadcasts(shape: tuple[int, ...], full: tuple[int, ...]) -> bool:
    """Whether ``shape`` broadcasts to ``full`` (without growing it): torch.broadcast_shapes costs ~70 us
    a call, more than a small attention call itself."""
    return len(shape) <= len(full) and all(s in (1, f) for s, f in zip(reversed(shape), reversed(full)))


def _sdpa_cpu_direct(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> bool:
    """Whether a scaled_dot_product_attention call goes straight to torch's SDPA: a valid 4-D call in plain
    eager mode that the checked path below would hand to torch's SDPA unchanged anyway (the CPU; the
    default backend "torch"). Anything else, a bad argument included, answers False and takes the checked
    path, which raises the named errors. Saves ~15 us of Python per call, which tiny models feel."""
    if not (
        type(query) is type(key) is type(value) is torch.Tensor
        and query.dim() == key.dim() == value.dim() == 4
        and query.is_cpu
        and key.is_cpu
        and value.is_cpu
        and query.dtype == key.dtype == value.dtype
        and type(is_causal) is bool
        and (dropout_p == 0 or (type(dropout_p) is float and 0.0 < dropout_p < 1.0))
        and (scale is None or (type(scale) is float and math.isfinite(scale)))
    ):
        return False
    b, hq, sq, d = query.shape
    bk, hk, sk, dk = key.shape
    bv, hv, sv, dv = value.shape
    if not (
        query.is_floating_point()
        and bk == bv == b
        and dk == d > 0
        and hv == hk > 0
        and sv == sk
        and dv > 0
        and (hq == hk or (enable_gqa and hq % hk == 0))
    ):
        return False
    if attn_mask is not None:
        if is_causal or type(attn_mask) is not torch.Tensor or not attn_mask.is_cpu:
            return False
        if attn_mask.dtype != torch.bool and (
            attn_mask.dtype != query.dtype or (attn_mask.requires_grad and torch.is_grad_enabled())
        ):
            return False
        if not (_SDPA_ZERO_ROWS and _broadcasts(tuple(attn_mask.shape), (b, hq, sq, sk))):
            return False
    return _backend.plain_eager(query) and _default_backend("cpu", query.dtype, d, dv) == "torch"


def _sdpa_direct(query, key, value, attn_mask, dropout_p, is_causal, scale, gqa) -> torch.Tensor:
    """torch's SDPA on a call :func:`_sdpa_cpu_direct` accepted."""
    return _TORCH_SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=gqa)


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``: same signature and semantics.

    query: (..., Hq, Sq, D), key: (..., Hkv, Sk, D), value: (..., Hkv, Sk, Dv) (3-D inputs: no head dim).
    attn_mask: bool (True = attend) or float (added to the scores), broadcastable to (..., Hq, Sq, Sk); a
    float mask that requires grad gets one. is_causal: top-left alignment (key j visible to query i iff
    j <= i), as SDPA; may be combined with attn_mask. enable_gqa: allow Hq a multiple of Hkv.
    Differs from SDPA only where SDPA gives NaN: a row with every key masked gives zeros here.
    """
    if _sdpa_cpu_direct(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        return _sdpa_direct(
            query, key, value, attn_mask, dropout_p, is_causal, scale, query.shape[1] != key.shape[1]
        )
    _check_qkv(query, key, value)
    if query.dim() < 3 or key.dim() != query.dim() or value.dim() != query.dim():
        raise _err(
            f"query, key, value must have the same number of dims (>= 3), got {_shape(query)}, "
            f"{_shape(key)}, {_shape(value)}"
        )
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise _err(f"attn_mask must be a tensor, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise _err(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
        # checked here, under its own name: flash_attention would report it as its bias / mask argument
        want = (*query.shape[:-1], key.shape[-2])
        if not _broadcasts(tuple(attn_mask.shape), tuple(want)):
            raise _err(
                f"attn_mask of shape {_shape(attn_mask)} is not broadcastable to (..., heads, seq_q, seq_k) "
                f"= {want}"
            )
    lead = query.shape[:-3] if query.dim() > 3 else ()
    if query.dim() == 3:
        query, key, value = query[:, None], key[:, None], value[:, None]
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask[:, None]
    elif query.dim() > 4:
        if key.shape[:-3] != lead or value.shape[:-3] != lead:
            raise _err(f"batch dims differ: query {_shape(query)}, key {_shape(key)}, value {_shape(value)}")
        if attn_mask is not None:
            attn_mask = attn_mask.expand(*lead, query.shape[-3], query.shape[-2], key.shape[-2])
            attn_mask = attn_mask.reshape(-1, *attn_mask.shape[-3:])
        query, key, value = (t.reshape(-1, *t.shape[-3:]) for t in (query, key, value))
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise _err(
            f"query has {query.shape[1]} heads but key/value have {key.shape[1]}: pass enable_gqa=True for "
            "grouped-query attention"
        )
    bias = mask = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            mask = attn_mask
        else:
            bias = attn_mask
    out = flash_attention(query, key, value, bias=bias, mask=mask, causal=bool(is_causal), scale=scale,
                    dropout_p=dropout_p)  # fmt: skip
    if len(lead) != 1 or out.dim() != len(lead) + 3:
        out = out.reshape(*lead, *out.shape[-3:]) if lead else out[:, 0]
    return out


def _check_max_seqlen(name: str, value: int) -> int:
    """max_seqlen_q / max_seqlen_k as a non-negative int: it sizes the launch grid, so a float would be
    truncated silently and a negative value would launch nothing."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"fastgen.attention: {name} must be an int, got {type(value).__name__} {value!r}")
    value = operator.index(value)
    if value < 0:
        raise _err(f"{name} must be >= 0, got {value}")
    return value


def _check_cu(
    name: str, cu: torch.Tensor, total: int, max_len: int, max_name: str, device: torch.device
) -> torch.Tensor:
    """Validate cu_seqlens in int64 (an int64 value past 2^31 must not wrap into range), then narrow it to
    the int32 the kernels take. CPU tensors are checked on the host with the offending value in the
    message; device tensors with torch._assert_async (no sync: a failure surfaces at the next one)."""
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 1:
        raise _err(f"{name} must be a 1-D tensor (batch + 1,), got {getattr(cu, 'shape', type(cu))}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise _err(f"{name} must be int32 (or int64), got {cu.dtype}")
    if cu.device != device:
        raise _err(f"{name} is on {cu.device} but q is on {device}")
    if total > torch.iinfo(torch.int32).max:
        raise _err(f"{name}: {total} total tokens do not fit the kernels' int32 offsets")
    offs = _backend.host_values(cu) if device.type == "cpu" else None
    if offs is not None:
        # the offsets are on the host: check the list (a few tensor ops per condition cost more than a
        # small attention call)
        bad = None
        if offs[0] != 0:
            bad = f"{name}[0] must be 0"
        elif offs[-1] != total:
            bad = f"{name}[-1] must equal the total tokens {total}"
        elif min(lens := [b - a for a, b in itertools.pairwise(offs)], default=0) < 0:
            bad = f"{name} must be non-decreasing"
        elif max(lens, default=0) > max_len:
            bad = f"{name} has a sequence longer than {max_name} = {max_len}"
        if bad is not None:
            raise _err(f"{bad}, got {name} = {offs if len(offs) <= 16 else _shape(cu)}")
        return cu if cu.dtype == torch.int32 else cu.to(torch.int32)
    c64 = cu.to(torch.int64)
    lens = c64[1:] - c64[:-1]
    checks = [
        (c64[0] == 0, f"{name}[0] must be 0"),
        (c64[-1] == total, f"{name}[-1] must equal the total tokens {total}"),
        (lens >= 0, f"{name} must be non-decreasing"),
        (lens <= max_len, f"{name} has a sequence longer than {max_name} = {max_len}"),
    ]
    for cond, msg in checks:
        if device.type == "cpu" and not torch.compiler.is_compiling():
            if not bool(cond.all()):
                raise _err(f"{msg}, got {name} = {c64.tolist() if c64.numel() <= 16 else _shape(c64)}")
        elif cond.numel():
            torch._assert_async(cond.all(), f"fastgen.attention: {msg}")
    return cu.to(torch.int32)


def flash_attn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """Attention over a packed batch of variable-length sequences, with no compute on padding.

    q: (total_q, Hq, D), k: (total_k, Hkv, D), v: (total_k, Hkv, Dv); sequence i is rows
    ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` of q against ``cu_seqlens_k[i]:cu_seqlens_k[i+1]`` of k / v
    (int32, (batch + 1,), starting at 0). max_seqlen_*: the longest sequence (sizes the launch grid).
    causal uses the bottom-right alignment (query i sees keys j <= i + sk - sq), as flash-attn.
    dropout_p / seed / deterministic: as :func:`flash_attention`.
    Returns (total_q, Hq, Dv).
    """
    _check_qkv(q, k, v, ("q", "k", "v"))
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise _err(f"q, k, v must be 3-D (total, heads, head_dim), got {_shape(q)}, {_shape(k)}, {_shape(v)}")
    if k.shape[2] != q.shape[2]:
        raise _err(f"k head_dim {k.shape[2]} != q head_dim {q.shape[2]}")
    if v.shape[:2] != k.shape[:2]:
        raise _err(f"v {_shape(v)} does not match k {_shape(k)} in tokens and heads")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise _err(f"q heads {q.shape[1]} must be a multiple of k/v heads {k.shape[1]}")
    max_q = _check_max_seqlen("max_seqlen_q", max_seqlen_q)
    max_k = _check_max_seqlen("max_seqlen_k", max_seqlen_k)
    cu_q = _check_cu("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_q, "max_seqlen_q", q.device)
    cu_k = _check_cu("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_k, "max_seqlen_k", q.device)
    if cu_q.numel() != cu_k.numel():
        raise _err(f"cu_seqlens_q has {cu_q.numel()} entries but cu_seqlens_k has {cu_k.numel()}")
    dropout_p = _check_dropout(dropout_p)
    scale = _check_scale(scale, q.shape[2])
    if q.shape[0] == 0:
        return q.new_zeros((0, q.shape[1], v.shape[2]))
    if (
        q.device.type == "cpu"
        and _backend.plain_eager(q)
        and not _torch_sdpa_why_not(q, v, None, None, dropout_p, seed, deterministic)
        and (not causal or _SDPA_ZERO_ROWS)  # bottom-right rows with no key: zeros only from torch >= 2.5
    ):
        return _varlen_via_torch_sdpa(q, k, v, cu_q, cu_k, causal, scale, dropout_p)
    qq, kk, vv = (_last_dim_contiguous(t)[None] for t in (q, k, v))
    out, _ = _attention_fwd_op(qq, kk, vv, None, None, cu_q, cu_k, max_q, max_k,
                               BOTTOM_RIGHT if causal else NO_CAUSAL, scale, dropout_p,
                               _draw_seed(dropout_p, seed), _deterministic(deterministic))  # fmt: skip
    return out[0]


__all__ = [
    "attention_ref",
    "dropout_keep_mask",
    "flash_attention",
    "flash_attn_varlen",
    "flash_attn_varlen_ref",
    "scaled_dot_product_attention",
]

r"""Fused nearest-codebook lookup (vector quantisation): for every row of ``x`` the index of the closest code.

With ``x: (N, D)`` and ``codebook: (K, D)`` (or ``x: (H, N, D)`` with one codebook per head, ``(H, K, D)``)::

    l2:      d(x, c) = ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2          (clamped at 0)
    cosine:  d(x, c) = 1 - x.c / (max(|x|, eps) max(|c|, eps))          (eps = 1e-12: a zero vector is
                                                                          at distance 1 from every code)
    indices[n] = argmin_k d(x[n], c[k])     ties -> the lowest index (as torch.argmin)
    dist[n]    = d(x[n], c[indices[n]])     float32
    counts[k]  = #{n : indices[n] = k}      (return_counts=True)

Modes. ``"fast"``: one scan, the dot products on tensor cores in the input dtype (float32: TF32), the
expanded form above, no re-rank. ``"exact"``: the scan keeps the best ``R`` candidates of every row by
the expanded form (float32 inputs: products in full float32, ``tf32x3`` / IEEE), then RE-RANKS them in
float32 from the original values with the direct forms (``sum((x - c)^2)``; cosine from ``x.c``, ``|x|^2``,
``|c|^2``), so the index is the argmin of the float32 direct-form distances (which is the float64
answer unless two codes are closer than float32 resolves). The expanded form loses
``~eps32 (|x|^2 + |c|^2)`` to cancellation, float16 / bfloat16 rounding of a fast scan much more; the
re-rank is what makes near-ties come out right. Magnitudes: inputs beyond 2^+-40 (float32 / bfloat16) are
first rescaled by powers of two (exact; see :func:`_prepare`), so ``||x||^2`` never overflows float32 (nor
l2's squares underflow); ``dist`` is returned at the caller's scale (inf where it exceeds float32).

Triton kernel (CUDA; CPU tensors only under ``TRITON_INTERPRET=1`` when forced): one launch over all heads,
grid ``(cdiv(N, BLOCK_N) * H,)`` (heads folded into x: no 65,535 limit on H). A program takes BLOCK_N
rows of x and streams code tiles (BLOCK_K x D, BLOCK_D at a time) through ``tl.dot``; ``||c||^2`` (cosine: ``1 / max(|c|, eps)``) is precomputed once,
O(K). Each distance is packed with its code index into one int64 key ``(float bits << 32) | k`` (the
distance is >= 0, so its bits order like the float): one integer min-reduction gives the minimum and the
lowest index on ties, across tiles too. The N x K matrix is never stored; extra memory is O(N + K).
Counts: one int32 atomic add per row at the end of its program into a zeroed (H, K) buffer, then cast to
int64 (integer atomics: deterministic).

Backends (priority cuda, triton, cpp, torch): ``triton`` and ``torch`` (any device and dtype including
float64: row chunks of the expanded form with ``torch.matmul``, top-R + re-rank in exact mode), ``cpp``
(CPU C++ kernel: (rows x codes) tiles of dot products from the BLAS sgemm torch links, each folded while
it sits in L2 by an AVX-512 / AVX2 / portable epilogue into running argmins (fast) or top-R lists (exact,
then the direct-form re-rank); never the N x K matrix; see csrc/vq/vq_cpu.cpp) and ``cuda``
(C++ CUDA kernel: both modes; exact keeps the top-R per row in the scan and re-ranks them by the fp32
direct form, one warp per row, as the CPU kernel). Reference: :func:`vq_nearest_ref` (float64, materialises N x K).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fastgen import _backend, _ext
from fastgen._backend import Call

try:  # triton is optional (not on every platform)
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None
    tl = None

DISTANCES = ("l2", "cosine")
MODES = ("exact", "fast")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_DIM = 1024
MAX_CODES = 65536
EPS = 1e-12
RERANK = 4  # candidates per row kept by the scan and re-ranked in float32 (exact mode)

OP = _backend.get_op("vq_nearest", "nearest codebook entry (VQ): fused distance + argmin + counts")


class VQNearest(NamedTuple):
    """``indices, dist = vq_nearest(x, codebook)``."""

    indices: torch.Tensor  # (N,) or (H, N) int64
    dist: torch.Tensor  # same shape, float32: the winning distance


class VQNearestCounts(NamedTuple):
    """``indices, dist, counts = vq_nearest(x, codebook, return_counts=True)``."""

    indices: torch.Tensor
    dist: torch.Tensor
    counts: torch.Tensor  # (K,) or (H, K) int64 per-code counts


def _result(
    idx: torch.Tensor, dist: torch.Tensor, counts: torch.Tensor | None
) -> VQNearest | VQNearestCounts:
    return VQNearest(idx, dist) if counts is None else VQNearestCounts(idx, dist, counts)


def _err(msg: str) -> ValueError:
    return ValueError(f"fastgen.vq_nearest: {msg}")


# =====================================================================================================
# Reference (the oracle)
# =====================================================================================================


def _dist_matrix(x: torch.Tensor, c: torch.Tensor, distance: str) -> torch.Tensor:
    """(..., N, K) distances by the expanded form in x's dtype (call with float32 / float64 tensors)."""
    if distance == "l2":
        x2 = (x * x).sum(-1, keepdim=True)
        c2 = (c * c).sum(-1).unsqueeze(-2)
        return (x2 - 2 * (x @ c.transpose(-1, -2)) + c2).clamp_min(0)
    xn = x.norm(dim=-1, keepdim=True).clamp_min(EPS)
    cn = c.norm(dim=-1).clamp_min(EPS).unsqueeze(-2)
    return (1 - (x @ c.transpose(-1, -2)) / (xn * cn)).clamp(0, 2)


def _dist_matrix_ref(x: torch.Tensor, c: torch.Tensor, distance: str) -> torch.Tensor:
    """(..., N, K) float64 distances by the DIRECT forms (``sum((x - c)^2)``; cosine from ``x.c``, ``|x|``,
    ``|c|``), accumulated one coordinate at a time: every (n, k) entry goes through the same sequence of
    correctly rounded float64 operations, so identical codes give bit-identical distances (exact ties) on
    any CPU or GPU. A matmul would not: BLAS rounds two equal columns differently depending on where they
    fall in its blocking (AVX2 vs AVX-512 paths). Row chunks bound the memory to a few (chunk, K) blocks."""
    x, c = x.double(), c.double()
    n, k, dim = x.shape[-2], c.shape[-2], x.shape[-1]
    out = x.new_empty((*x.shape[:-1], k))
    ct = c.transpose(-1, -2).unsqueeze(-3)  # (..., 1, D, K): coordinate d of every code is ct[..., d, :]
    chunk = max(1, (1 << 22) // max(k, 1))
    for s in range(0, n, chunk):
        xs = x[..., s : s + chunk, :].unsqueeze(-1)  # (..., rows, D, 1)
        acc = torch.zeros((*xs.shape[:-2], k), dtype=torch.float64, device=x.device)
        if distance == "l2":
            for d in range(dim):
                diff = xs[..., d, :] - ct[..., d, :]
                acc += diff * diff
        else:
            for d in range(dim):
                acc += xs[..., d, :] * ct[..., d, :]
            xn = (xs.squeeze(-1) ** 2).sum(-1, keepdim=True).sqrt().clamp_min(EPS)
            cn = torch.zeros_like(c[..., 0])
            for d in range(dim):
                cn += c[..., d] * c[..., d]
            acc = (1 - acc / (xn * cn.sqrt().clamp_min(EPS).unsqueeze(-2))).clamp(0, 2)
        out[..., s : s + chunk, :] = acc
    return out


def vq_nearest_ref(
    x: torch.Tensor, codebook: torch.Tensor, *, distance: str = "l2", return_counts: bool = False
) -> VQNearest | VQNearestCounts:
    """Plain PyTorch in float64: the full (N, K) matrix of direct-form distances (exact ties stay exact,
    see :func:`_dist_matrix_ref`), then argmin (ties -> lowest index).
    x: (N, D) with codebook (K, D), or (H, N, D) with (H, K, D). Returns indices int64, dist float32,
    counts int64 (or None)."""
    d = _dist_matrix_ref(x, codebook, distance)
    idx = d.argmin(-1)
    dist = d.gather(-1, idx.unsqueeze(-1)).squeeze(-1).float()
    counts = None
    if return_counts:
        i3 = idx if idx.dim() == 2 else idx.unsqueeze(0)
        counts = _counts(i3, codebook.shape[-2]).view(codebook.shape[:-1])
    return _result(idx, dist, counts)


# =====================================================================================================
# torch backend: row chunks of the expanded form, top-R + float32 re-rank in exact mode
# =====================================================================================================


def _direct(x: torch.Tensor, c: torch.Tensor, distance: str) -> torch.Tensor:
    """Direct-form distances of rows x (..., D) to their candidates c (..., R, D) -> (..., R)."""
    x = x.unsqueeze(-2)
    if distance == "l2":
        return ((x - c) ** 2).sum(-1)
    xc = (x * c).sum(-1)
    xn = (x * x).sum(-1).sqrt().clamp_min(EPS)
    cn = (c * c).sum(-1).sqrt().clamp_min(EPS)
    return (1 - xc / (xn * cn)).clamp(0, 2)


def _counts(idx: torch.Tensor, k: int) -> torch.Tensor:
    """idx: (H, N) -> (H, K) int64 counts (one bincount over head-offset indices)."""
    h = idx.shape[0]
    flat = idx + torch.arange(h, device=idx.device).unsqueeze(1) * k
    return torch.bincount(flat.reshape(-1), minlength=h * k).view(h, k)


def _vq_torch(x, c, distance, mode, return_counts):
    """x: (H, N, D), c: (H, K, D) -> indices (H, N) int64, dist (H, N) float32, counts (H, K) or empty."""
    h, n, _ = x.shape
    k = c.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    idx = torch.empty((h, n), dtype=torch.int64, device=x.device)
    dist = torch.empty((h, n), dtype=torch.float32, device=x.device)
    cf = c.to(acc)
    r = min(RERANK, k)
    chunk = max(1, (1 << 22) // max(k, 1))  # bounds the (chunk, K) block to 4M elements
    for hh in range(h):
        for s in range(0, n, chunk):
            xs = x[hh, s : s + chunk]
            xf = xs.to(acc)
            if mode == "fast":  # the dot in the input dtype, no re-rank
                dot = (xs @ c[hh].transpose(0, 1)).to(acc)
                if distance == "l2":
                    d = ((xf * xf).sum(-1, keepdim=True) - 2 * dot + (cf[hh] * cf[hh]).sum(-1)).clamp_min(0)
                else:
                    xn = xf.norm(dim=-1, keepdim=True).clamp_min(EPS)
                    d = (1 - dot / (xn * cf[hh].norm(dim=-1).clamp_min(EPS))).clamp(0, 2)
                best, arg = d.min(-1)
            else:
                cand = _dist_matrix(xf, cf[hh], distance).topk(r, -1, largest=False).indices
                cand = cand.sort(-1).values  # ascending index: argmin's first hit is the lowest index
                dr = _direct(xf, cf[hh][cand], distance)
                best, pos = dr.min(-1)
                arg = cand.gather(-1, pos.unsqueeze(-1)).squeeze(-1)
            idx[hh, s : s + chunk] = arg
            dist[hh, s : s + chunk] = best.float()
    counts = _counts(idx, k) if return_counts else idx.new_empty(0)
    return idx, dist, counts


# =====================================================================================================
# Triton kernel
# =====================================================================================================

if triton is not None:

    @triton.jit
    def _vq_kernel(
        X, C, CN, Idx, Dist, Counts,
        N, K, D,
        sxh, sxn, sxd, sch, sck, scd, soh, son,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, R: tl.constexpr,
        COSINE: tl.constexpr, RERANK: tl.constexpr, COUNTS: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """indices / dist of BLOCK_N rows of one head against all K codes (see the module doc).
        CN: (H, K) float32, ||c||^2 (l2) or 1 / max(|c|, eps) (cosine)."""
        # heads folded into grid x (grid y / z stop at 65,535): program = head * row_blocks + row_block
        row_blocks = tl.cdiv(N, BLOCK_N)
        pid = tl.program_id(0) % row_blocks
        hh = (tl.program_id(0) // row_blocks).to(tl.int64)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        xp = X + hh * sxh + offs_n.to(tl.int64)[:, None] * sxn
        cb = C + hh * sch
        # ||x||^2 (float32, from the original values): the expanded form and the final distance need it
        xx = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            xv = tl.load(xp + offs_d[None, :] * sxd, mask=nmask[:, None] & (offs_d < D)[None, :], other=0.0)
            xv = xv.to(tl.float32)
            xx += tl.sum(xv * xv, axis=1)
        xnorm = tl.maximum(tl.sqrt(xx), 1e-12)
        # best R keys per row, distinct so that the slot of the worst is found by equality
        rcols = tl.arange(0, R)
        best = tl.zeros((BLOCK_N, R), dtype=tl.int64) + (0x7FFFFFFFFFFFFFFF - rcols.to(tl.int64))[None, :]
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            kmask = offs_k < K
            ck = cb + offs_k.to(tl.int64)[None, :] * sck
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                dmask = offs_d < D
                a = tl.load(xp + offs_d[None, :] * sxd, mask=nmask[:, None] & dmask[None, :], other=0.0)
                b = tl.load(ck + offs_d[:, None] * scd, mask=dmask[:, None] & kmask[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
            cn = tl.load(CN + hh * K + offs_k, mask=kmask, other=0.0)
            if COSINE:
                dd = 1.0 - acc * cn[None, :] / xnorm[:, None]
            else:
                dd = xx[:, None] - 2.0 * acc + cn[None, :]
            dd = tl.maximum(dd, 0.0)  # >= 0 (and -0.0 -> 0): the float bits then order like the floats
            dd = tl.where(kmask[None, :], dd, float("inf"))
            bits = dd.to(tl.int32, bitcast=True).to(tl.int64)
            key = (bits << 32) | offs_k.to(tl.int64)[None, :]
            for _r in tl.static_range(R):
                m = tl.min(key, axis=1)
                worst = tl.max(best, axis=1)
                best = tl.where((best == worst[:, None]) & (m < worst)[:, None], m[:, None], best)
                if R > 1:
                    key = tl.where(key == m[:, None], 0x7FFFFFFFFFFFFFFF, key)
        if RERANK:
            # float32 direct form from the original values for every candidate; ties -> lowest index
            out_d = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
            out_i = tl.zeros((BLOCK_N,), dtype=tl.int32)
            for r in tl.static_range(R):
                kr = tl.sum(tl.where(rcols[None, :] == r, best, 0), axis=1)
                ir = (kr & 0xFFFFFFFF).to(tl.int32)
                valid = ir < K  # fewer than R codes: the unfilled slots hold no code
                irs = tl.where(valid, ir, 0)
                cp = cb + irs.to(tl.int64)[:, None] * sck
                s1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
                s2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
                for d0 in range(0, D, BLOCK_D):
                    offs_d = d0 + tl.arange(0, BLOCK_D)
                    msk = nmask[:, None] & (offs_d < D)[None, :]
                    xv = tl.load(xp + offs_d[None, :] * sxd, mask=msk, other=0.0).to(tl.float32)
                    cv = tl.load(cp + offs_d[None, :] * scd, mask=msk, other=0.0).to(tl.float32)
                    if COSINE:
                        s1 += tl.sum(xv * cv, axis=1)
                        s2 += tl.sum(cv * cv, axis=1)
                    else:
                        df = xv - cv
                        s1 += tl.sum(df * df, axis=1)
                if COSINE:
                    dr = 1.0 - s1 / (xnorm * tl.maximum(tl.sqrt(s2), 1e-12))
                    dr = tl.minimum(tl.maximum(dr, 0.0), 2.0)
                else:
                    dr = s1
                better = valid & ((dr < out_d) | ((dr == out_d) & (ir < out_i)))
                out_d = tl.where(better, dr, out_d)
                out_i = tl.where(better, ir, out_i)
        else:
            kb = tl.min(best, axis=1)
            out_i = (kb & 0xFFFFFFFF).to(tl.int32)
            out_d = (kb >> 32).to(tl.int32).to(tl.float32, bitcast=True)
            if COSINE:
                out_d = tl.minimum(out_d, 2.0)
        op = hh * soh + offs_n * son
        tl.store(Idx + op, out_i.to(tl.int64), mask=nmask)
        tl.store(Dist + op, out_d, mask=nmask)
        if COUNTS:
            tl.atomic_add(Counts + hh * K + out_i, tl.full((BLOCK_N,), 1, tl.int32), mask=nmask)


def _config(dtype: torch.dtype, d: int, mode: str) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, BLOCK_D, num_warps, num_stages) for H100; small blocks under the interpreter."""
    if _backend.triton_interpret():
        return 16, 16, 16, 4, 1
    bd = 64 if d >= 64 else max(16, triton.next_power_of_2(d))
    # from sm_90 compiles (.ci/check_triton.py): the packed int64 (dist, index) keys of a tile and the
    # top-R lists cost registers, so exact mode and fp32 use 64-code tiles to bound the spills
    if dtype == torch.float32 and mode == "exact":  # tf32x3: three TF32 products per tile
        return 64, 64, min(bd, 32), 4, 3
    if dtype == torch.float32:
        return 128, 64, min(bd, 32), 8, 3
    if mode == "exact":
        return 128, 64, bd, 8, 3
    return 128, 128, bd, 8, 3


def _precision(dtype: torch.dtype, mode: str) -> str:
    if dtype != torch.float32:
        return "tf32"  # ignored for 16-bit inputs (exact products, float32 accumulation); IEEE could
        # turn off the tensor-core path on some Triton versions
    return "tf32x3" if mode == "exact" else "tf32"


def _vq_triton(x, c, distance, mode, return_counts):
    h, n, d = x.shape
    k = c.shape[1]
    cf = c.float()
    if distance == "l2":
        cn = (cf * cf).sum(-1)
    else:
        cn = 1.0 / cf.norm(dim=-1).clamp_min(EPS)
    idx = torch.empty((h, n), dtype=torch.int64, device=x.device)
    dist = torch.empty((h, n), dtype=torch.float32, device=x.device)
    counts = torch.zeros((h, k), dtype=torch.int32, device=x.device) if return_counts else idx
    if n and h:
        bn, bk, bd, warps, stages = _config(x.dtype, d, mode)
        exact = mode == "exact"
        _vq_kernel[(triton.cdiv(n, bn) * h,)](
            x, c, cn.contiguous(), idx, dist, counts, n, k, d,
            *x.stride(), *c.stride(), *idx.stride(),
            BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=bd, R=RERANK if exact else 1, COSINE=distance == "cosine",
            RERANK=exact, COUNTS=return_counts, PRECISION=_precision(x.dtype, mode),
            num_warps=warps, num_stages=stages,
        )  # fmt: skip
    return idx, dist, (counts.to(torch.int64) if return_counts else idx.new_empty(0))


# =====================================================================================================
# Backends and the torch.library op
# =====================================================================================================
# Backends are tried in the order cuda, triton, cpp, torch; each is
#     fn(x (H, N, D), codebook (H, K, D), distance, mode, return_counts) -> (indices, dist, counts or empty)


def _cxx(name: str):
    """The C++ kernels (csrc/vq): fp32 accumulation always (fp64 for fp64). The CPU kernel's exact mode keeps
    the best RERANK candidates and re-ranks them by the direct form; so does the CUDA one. They take ||c||^2
    precomputed and, for cosine, unit vectors (normalised here in fp32, eps 1e-12 as the other backends)."""

    def run(x, c, distance, mode, return_counts):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        cosine = distance == "cosine"
        if cosine:
            x = torch.nn.functional.normalize(x.to(acc), dim=-1, eps=1e-12)
            c = torch.nn.functional.normalize(c.to(acc), dim=-1, eps=1e-12)
            sq = torch.ones(c.shape[:2], dtype=acc, device=c.device)
        else:
            sq = c.to(acc).square().sum(-1)
        fn = getattr(_ext.C, name)
        return fn(x.contiguous(), c.contiguous(), sq, cosine, mode == "exact", return_counts)

    return run


def _cuda_check(call: Call) -> list[str]:
    """The CUDA kernel is fp32 SIMT: half-precision fast mode belongs to the Triton kernel's tensor cores
    (it serves it whenever Triton is usable here)."""
    if call.get("mode") == "fast" and call.dtype in (torch.float16, torch.bfloat16):
        if _backend.triton_available():  # reasons Triton cannot run here: the CUDA kernel serves
            return []
        return [
            f"{str(call.dtype).replace('torch.', '')} fast mode is served by the Triton tensor-core kernel"
        ]
    return []


OP.register("cuda", devices=("cuda",), dtypes=KERNEL_DTYPES, available=_backend.cuda_available, check=_cuda_check,
            note="fp32 SIMT tiles, split-K over the codebook when rows are few; exact: top-R + fp32 direct-form re-rank")(_cxx("vq_nearest_cuda"))  # fmt: skip
OP.register("cpp", devices=("cpu",), dtypes=(*KERNEL_DTYPES, torch.float64), available=_backend.cpp_available,
            note="sgemm tiles + AVX-512 / AVX2 / portable argmin epilogue; exact: top-R + fp32 direct-form re-rank")(_cxx("vq_nearest_cpu"))  # fmt: skip

OP.register("triton", devices=("cuda",), dtypes=KERNEL_DTYPES, available=_backend.triton_available,
            check=_backend.triton_check(dim=MAX_DIM, codes=MAX_CODES), forced_only_devices=("cpu",),
            note="code tiles streamed through tl.dot, packed (dist, index) min keys, top-R fp32 re-rank")(_vq_triton)  # fmt: skip
OP.register("torch", devices=("cpu", "cuda", "mps", "xpu"), dtypes=(*KERNEL_DTYPES, torch.float64),
            note="row chunks of the expanded form with torch.matmul; top-R + fp32 re-rank (exact)")(_vq_torch)  # fmt: skip


def _call(x: torch.Tensor, c: torch.Tensor, mode: str = "exact") -> Call:
    return Call(
        x.device,
        x.dtype,
        {"heads": x.shape[0], "rows": x.shape[1], "codes": c.shape[1], "dim": c.shape[2], "mode": mode},
    )


@torch.library.custom_op("fastgen::vq_nearest", mutates_args=())
def _vq_nearest_op(
    x: torch.Tensor, codebook: torch.Tensor, distance: str, mode: str, return_counts: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    backend = OP.dispatch(_call(x, codebook, mode))
    return backend.fn(x, codebook, distance, mode, return_counts)


@_vq_nearest_op.register_fake
def _(x, codebook, distance, mode, return_counts):
    h, n, _ = x.shape
    idx = x.new_empty((h, n), dtype=torch.int64)
    dist = x.new_empty((h, n), dtype=torch.float32)
    counts = x.new_empty((h, codebook.shape[1]) if return_counts else (0,), dtype=torch.int64)
    return idx, dist, counts


# =====================================================================================================
# Public API
# =====================================================================================================


# Powers of two the inputs are kept within before the expanded form: |values| <= 2^40 keeps every
# ||x||^2, x.c and ||c||^2 far inside float32's range (2^128) for any D < 2^40; >= 2^-40 keeps the squares
# of l2 above float32's normal minimum (2^-126). float16 (|values| <= 65504) never needs it.
_POW2_RANGE = {torch.float32: 40, torch.bfloat16: 40, torch.float64: 300}


def _times_pow2(t: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """t * 2^e, exact (barring underflow of elements far below the row's maximum): two factors, so that each
    power of two stays inside t's dtype even for |e| ~ 150."""
    e1 = torch.div(e, 2, rounding_mode="floor")
    return t * torch.exp2((e - e1).to(t.dtype)) * torch.exp2(e1.to(t.dtype))


def _absmax(t: torch.Tensor, dim: int | tuple[int, ...] = -1) -> torch.Tensor:
    """max |t| over ``dim`` (the last dim by default), NaN where a NaN is. CPU: amax and -amin (two vectorized
    passes; the inf-norm reduction takes ~20x longer there: 3 ms for 4096 x 256 float32, a seventh of the
    lookup itself at K = 1024). Elsewhere the inf-norm (one pass)."""
    if t.device.type == "cpu":
        return torch.maximum(t.amax(dim), -t.amin(dim))
    return torch.linalg.vector_norm(t, ord=float("inf"), dim=dim)


def _host_checks(t: torch.Tensor) -> bool:
    """Value checks may read back to the host (CPU tensors outside a traced graph)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _prepare(x: torch.Tensor, c: torch.Tensor, distance: str):
    """Finiteness check, then a power-of-two rescale of inputs whose magnitude would overflow (or, for l2,
    underflow) float32 in the expanded form: x (H, N, D), c (H, K, D) -> x, c, dist_factor ((H, 1) float64
    or None: multiply the winning distances by it).

    l2: one factor per head for x and its codebook (d(s x, s c) = s^2 d(x, c) exactly for s = 2^-e: the
    argmin and the tie order are unchanged). cosine: one factor per row and per code, scaling down only
    (scale-invariant; rows below eps keep their clamped-norm meaning).
    CPU: the check is on the host (it raises a ValueError) and the rescale runs only when needed. CUDA and
    traced graphs: no host sync, so the check is a device assert and the rescale always runs, with factor
    1 for ordinary data (bit-identical results; the cost is one elementwise pass over x and the codebook,
    against the O(N K D) scan). The max-abs reduction replaces a separate isfinite pass."""
    host = _host_checks(x)
    lim = _POW2_RANGE.get(x.dtype)
    if host and x.numel():
        # the common case (all finite, nothing to rescale) from per-head extremes and one readback: a third
        # of the small ops below, which cost ~0.1 ms a call (5% of a 2048 x 512 x 64 lookup)
        heads = (-2, -1)
        mx = torch.maximum(_absmax(x, heads), _absmax(c, heads))
        hi, lo = (2.0**lim, 2.0**-lim) if lim is not None else (math.inf, 0.0)
        if all(math.isfinite(v) and v <= hi and (distance != "l2" or v >= lo or v == 0) for v in mx.tolist()):
            return x, c, None
    rx, rc = _absmax(x), _absmax(c)  # (H, N), (H, K): max |.| per row, NaN if any NaN
    for name, r in (("x", rx), ("codebook", rc)):
        if not r.numel():
            continue
        if host:
            if not bool(torch.isfinite(r).all()):
                raise _err(f"{name} contains NaN or inf")
        else:
            torch._assert_async(torch.isfinite(r).all(), f"fastgen.vq_nearest: {name} contains NaN or inf")
    if lim is None or not x.numel():
        return x, c, None
    hi, lo = 2.0**lim, 2.0**-lim
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    if distance == "l2":
        m = torch.maximum(rx.amax(-1), rc.amax(-1)).to(stat)  # (H,); x.numel() > 0 so N, K >= 1
        need = (m > hi) | ((m < lo) & (m > 0))
        if host and not bool(need.any()):
            return x, c, None
        e = torch.where(need, torch.frexp(m).exponent, 0)[:, None]  # max |.| -> [0.5, 1)
        factor = torch.exp2(2 * e.double())
        return _times_pow2(x, -e[..., None]), _times_pow2(c, -e[..., None]), factor
    need_x, need_c = rx > hi, rc > hi
    if host and not bool(need_x.any() or need_c.any()):
        return x, c, None
    ex = torch.where(need_x, torch.frexp(rx.to(stat)).exponent, 0)
    ec = torch.where(need_c, torch.frexp(rc.to(stat)).exponent, 0)
    return _times_pow2(x, -ex[..., None]), _times_pow2(c, -ec[..., None]), None


def vq_nearest(
    x: torch.Tensor,
    codebook: torch.Tensor,
    *,
    distance: str = "l2",
    mode: str = "exact",
    return_counts: bool = False,
) -> VQNearest | VQNearestCounts:
    """Index of the nearest code for every row (see the module docstring for the math and the modes).

    x: (N, D) with codebook (K, D), or (H, N, D) with codebook (H, K, D) (one codebook per head, one
    launch); float32 / float16 / bfloat16 (float64 on the torch backend), same dtype and device.
    distance: "l2" (squared Euclidean) or "cosine"; mode: "exact" or "fast".
    Returns ``VQNearest(indices, dist)``, or ``VQNearestCounts(indices, dist, counts)`` with
    ``return_counts``: indices (N,) / (H, N) int64 (ties -> lowest index), dist float32 of the same
    shape, counts (K,) / (H, K) int64. Not differentiable (the straight-through estimator and the
    codebook update belong to the caller).
    """
    if not isinstance(x, torch.Tensor) or not isinstance(codebook, torch.Tensor):
        raise _err(f"x and codebook must be tensors, got {type(x).__name__} and {type(codebook).__name__}")
    if distance not in DISTANCES:
        raise _err(f"distance must be one of {DISTANCES}, got {distance!r}")
    if mode not in MODES:
        raise _err(f"mode must be one of {MODES}, got {mode!r}")
    if x.dim() not in (2, 3):
        raise _err(f"x must be (N, D) or (H, N, D), got shape {tuple(x.shape)}")
    if codebook.dim() != x.dim():
        want = "(K, D)" if x.dim() == 2 else "(H, K, D)"
        raise _err(
            f"codebook must be {want} for x of shape {tuple(x.shape)}, got shape {tuple(codebook.shape)}"
        )
    if not x.is_floating_point():
        raise _err(f"x must be floating point, got {x.dtype}")
    if codebook.dtype != x.dtype:
        raise _err(f"codebook must have x's dtype {x.dtype}, got {codebook.dtype}")
    if codebook.device != x.device:
        raise _err(f"codebook must be on x's device {x.device}, got {codebook.device}")
    if codebook.shape[-1] != x.shape[-1]:
        raise _err(f"codebook's D = {codebook.shape[-1]} must equal x's D = {x.shape[-1]} "
                   f"(x {tuple(x.shape)}, codebook {tuple(codebook.shape)})")  # fmt: skip
    if x.dim() == 3 and codebook.shape[0] != x.shape[0]:
        raise _err(f"codebook has {codebook.shape[0]} heads, x has H = {x.shape[0]} "
                   f"(x {tuple(x.shape)}, codebook {tuple(codebook.shape)})")  # fmt: skip
    if codebook.shape[-2] == 0:
        raise _err(f"codebook is empty (K = 0), shape {tuple(codebook.shape)}")
    if x.shape[-1] == 0:
        raise _err(f"x has D = 0, shape {tuple(x.shape)}")
    single = x.dim() == 2
    x3 = x.unsqueeze(0) if single else x
    c3 = codebook.unsqueeze(0) if single else codebook
    with torch.no_grad():
        x3, c3, factor = _prepare(x3.detach(), c3.detach(), distance)
        idx, dist, counts = _vq_nearest_op(x3, c3, distance, mode, return_counts)
        if factor is not None:  # back to the caller's scale (inf where the true distance exceeds float32)
            dist = (dist.double() * factor).float()
    if single:
        idx, dist = idx[0], dist[0]
        counts = counts[0] if return_counts else counts
    return _result(idx, dist, counts if return_counts else None)

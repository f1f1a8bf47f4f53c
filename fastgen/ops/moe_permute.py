r"""MoE token routing, permutation and combine (GShard / GLaM top-k dispatch without one-hot tensors).

Given each token's k chosen experts, ``moe_route`` builds an expert-sorted layout of the T*k assignments,
``moe_permute`` gathers the token rows into it (so each expert's rows are contiguous, ready for a grouped
GEMM) and ``moe_unpermute`` scatters the expert outputs back, weighted by the gates::

    expert_idx: (T, k) int32 / int64 in [0, E)      valid: optional (T, k) bool (False: assignment not made)
    x:          (T, d)                              buf = moe_permute(x, routing):    (T*k, d)
    buf:        (T*k, d')                           y = moe_unpermute(buf, routing, gates): (T, d')

Priority (GShard, Lepikhin et al. 2020, "position priority"): assignments are ranked "all j=0 assignments
in token order, then all j=1 in token order, ...". With ``a = t*k + j`` the flat assignment index, the rank
``r`` of a valid assignment is the number of earlier (in that order) valid assignments to the same expert.
It is kept iff ``capacity is None or r < capacity``; a kept one lands on buffer row
``dest[t, j] = offsets[e] + r``, ``offsets`` the exclusive prefix sum of the KEPT counts. This is a stable
counting sort by expert id of the j-major assignment list. Rows ``>= offsets[E]`` are unused (``src = -1``)
and ``moe_permute`` writes zeros there, so the (T*k)-row buffer needs no host synchronisation to size it.

    buf[row] = x[src[row] // k]                          (0 for unused rows)
    y[t]     = sum_{j kept} gates[t, j] * buf[dest[t, j]]  (fp32 accumulation; a token with every assignment
                                                         dropped gets zeros: residuals are the layer's call)
    backward: dx[t] = sum_{j kept} dbuf[dest[t, j]];  dbuf[row] = gates.flat[a] * dy[a // k] (a = src[row]);
              dgates[t, j] = <dy[t], buf[dest[t, j]]>  (0 if dropped)

Every backward is a gather (or gather-sum): no atomics, deterministic.

Backends (``FASTGEN_BACKEND=moe_route:<name>`` / ``moe_permute:<name>``; ``moe_permute`` covers permute,
unpermute and their backwards): cuda (route only: csrc/moe_permute/*_cuda.cu, chunk histograms + scan +
warp-match stable ranks), triton (route: per-chunk histogram + in-chunk sort for stable ranks; gathers:
row-block gather / weighted gather-sum), cpp (csrc/moe_permute/*_cpu.cpp, at::parallel_for), torch (stable
argsort / index_select, any device, float64 too).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from fastgen import _backend, _ext
from fastgen._backend import Call

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ALL_DTYPES = (*KERNEL_DTYPES, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
MAX_EXPERTS = 1 << 20

ROUTE = _backend.get_op(
    "moe_route", "MoE routing: stable counting sort of (token, slot) assignments by expert"
)
OP = _backend.get_op("moe_permute", "MoE permute (row gather) and unpermute (weighted gather-sum), fwd + bwd")


class Routing(NamedTuple):
    """The expert-sorted layout of T*k assignments (see the module docstring).

    dest:    (T, k) int32: buffer row of assignment (t, j), -1 if dropped / invalid.
    src:     (T*k,) int32: flat assignment index a = t*k + j held by each buffer row, -1 for unused rows.
    offsets: (E+1,) int32: expert e's rows are [offsets[e], offsets[e+1]); offsets[E] = rows used.
    counts:  (E,) int32: valid assignments per expert BEFORE capacity dropping (usage statistics).
    """

    dest: torch.Tensor
    src: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor


def _err(msg: str, op: str = "moe_permute") -> ValueError:
    """op: the public function the user called (moe_route / moe_permute / moe_unpermute)."""
    return ValueError(f"fastgen.{op}: {msg}")


def _desc(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"


def _assert_values(cond: torch.Tensor, msg: str, op: str) -> None:
    """ValueError(msg) unless all of ``cond``: on the host for CPU tensors, torch._assert_async (no
    synchronisation) on devices and in traced graphs."""
    if cond.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(cond.all()):
            raise _err(msg, op)
    else:
        torch._assert_async(cond.all(), f"fastgen.{op}: {msg}")


# =====================================================================================================
# Input validation (before any kernel runs)
# =====================================================================================================


def _check_route(expert_idx, num_experts, capacity, valid) -> int:
    """Validate moe_route's arguments; returns capacity as an int (-1: dropless)."""
    err = functools.partial(_err, op="moe_route")
    if not isinstance(expert_idx, torch.Tensor):
        raise err(f"expert_idx must be a tensor, got {type(expert_idx).__name__}")
    if expert_idx.ndim != 2 or expert_idx.dtype not in INDEX_DTYPES:
        raise err(f"expert_idx must be a 2-D (tokens, k) int32 / int64 tensor, got {_desc(expert_idx)}")
    if expert_idx.shape[1] < 1:
        raise err(f"expert_idx must have k >= 1 columns, got shape {tuple(expert_idx.shape)}")
    if (
        isinstance(num_experts, bool)
        or not isinstance(num_experts, int)
        or not 1 <= num_experts <= MAX_EXPERTS
    ):
        raise err(f"num_experts must be an int in [1, {MAX_EXPERTS}], got {num_experts!r}")
    if capacity is None:
        cap = -1
    elif isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise err(f"capacity must be None (dropless) or an int >= 0, got {capacity!r}")
    else:
        cap = capacity
    if valid is not None:
        if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
            got = _desc(valid) if isinstance(valid, torch.Tensor) else type(valid).__name__
            raise err(
                f"valid must be a bool tensor of expert_idx's shape {tuple(expert_idx.shape)}, got {got}"
            )
        if valid.shape != expert_idx.shape:
            raise err(
                f"valid has shape {tuple(valid.shape)}, expected {tuple(expert_idx.shape)} like expert_idx"
            )
        if valid.device != expert_idx.device:
            raise err(f"valid is on {valid.device} but expert_idx is on {expert_idx.device}")
    if expert_idx.shape[0] * expert_idx.shape[1] >= 2**31:
        raise err(f"at most 2^31 - 1 assignments (tokens x k), got {tuple(expert_idx.shape)}")
    if expert_idx.numel() > 0:
        in_range = (expert_idx >= 0) & (expert_idx < num_experts)
        if valid is not None:
            in_range = in_range | ~valid
        _assert_values(
            in_range,
            f"expert_idx entries (where valid) must be in [0, {num_experts}) (num_experts)",
            "moe_route",
        )
    return cap


def _check_routing(
    routing, tokens: int, name: str, device: torch.device, op: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a Routing against ``tokens`` rows of the argument ``name`` (on ``device``); returns
    (dest, src) contiguous."""
    err = functools.partial(_err, op=op)
    if not isinstance(routing, tuple) or len(routing) != 4:
        raise err(f"routing must be the Routing returned by moe_route, got {type(routing).__name__}")
    dest, src = routing[0], routing[1]
    for n, t in (("routing.dest", dest), ("routing.src", src)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
            got = _desc(t) if isinstance(t, torch.Tensor) else type(t).__name__
            raise err(f"{n} must be an int32 tensor, got {got}")
        if t.device != device:
            raise err(f"{n} is on {t.device} but {name} is on {device}")
    if dest.ndim != 2 or dest.shape[1] < 1:
        raise err(f"routing.dest must be (tokens, k) with k >= 1, got {_desc(dest)}")
    t_, k = dest.shape
    if t_ != tokens:
        raise err(f"routing.dest has {t_} tokens ({tuple(dest.shape)}) but {name} has {tokens} rows")
    if tuple(src.shape) != (t_ * k,):
        raise err(f"routing.src has shape {tuple(src.shape)}, expected ({t_ * k},) (tokens * k)")
    return dest.contiguous(), src.contiguous()


def _check_rows(t, name: str, rows: int | None, what: str, op: str) -> None:
    err = functools.partial(_err, op=op)
    if not isinstance(t, torch.Tensor):
        raise err(f"{name} must be a tensor, got {type(t).__name__}")
    if t.ndim != 2:
        raise err(f"{name} must be 2-D {what}, got shape {tuple(t.shape)}")
    if t.dtype not in ALL_DTYPES:
        raise err(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if rows is not None and t.shape[0] != rows:
        raise err(f"{name} has {t.shape[0]} rows ({tuple(t.shape)}), expected {rows} {what}")


# =====================================================================================================
# References (plain PyTorch: the tests' oracle, the benchmarks' baseline)
# =====================================================================================================


def _route_torch(expert_idx, valid, num_experts: int, cap: int) -> Routing:
    """Stable argsort of the j-major assignment keys (invalid -> key E, sorted last)."""
    t, k = expert_idx.shape
    dev = expert_idx.device
    n = t * k
    key = expert_idx.to(torch.int64)
    if valid is not None:
        key = torch.where(valid, key, num_experts)
    key = key.t().reshape(-1)  # position p = j*T + t: the priority order
    order = torch.sort(key, stable=True).indices
    skey = key[order]
    counts_all = torch.bincount(key, minlength=num_experts + 1)
    counts = counts_all[:num_experts]
    first = torch.cumsum(counts_all, 0) - counts_all  # where each key's run starts in the sorted order
    rank = torch.arange(n, device=dev) - first[skey]
    kept_counts = counts if cap < 0 else counts.clamp(max=cap)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev)
    offsets[1:] = torch.cumsum(kept_counts, 0)
    kept = skey < num_experts
    if cap >= 0:
        kept = kept & (rank < cap)
    row = torch.where(kept, offsets[skey.clamp(max=num_experts - 1)] + rank, -1)
    p = order
    a = (p % t) * k + p // t if t > 0 else p
    dest = torch.empty(n, dtype=torch.int64, device=dev)
    dest[a] = row
    src = torch.full((n,), -1, dtype=torch.int64, device=dev)
    src[row[kept]] = a[kept]
    i32 = torch.int32
    return Routing(dest.view(t, k).to(i32), src.to(i32), offsets.to(i32), counts.to(i32))


def moe_route_ref(
    expert_idx: torch.Tensor, num_experts: int, capacity: int | None = None, valid: torch.Tensor | None = None
) -> Routing:
    """``moe_route`` in plain PyTorch (a stable argsort of the j-major expert ids)."""
    cap = _check_route(expert_idx, num_experts, capacity, valid)
    return _route_torch(expert_idx, valid, num_experts, cap)


def _gather_torch(x, dest, src, scale, out_dtype):
    """out[row] = scale.flat[a] * x[a // k] for a = src[row] >= 0, else 0 (math in x's dtype, or float64
    when out_dtype is float64)."""
    k = dest.shape[1]
    a = src.to(torch.int64)
    used = (a >= 0)[:, None]
    rows = x.to(out_dtype).index_select(0, a.clamp(min=0) // k)
    if scale is not None:
        rows = rows * scale.reshape(-1).to(out_dtype).index_select(0, a.clamp(min=0))[:, None]
    return torch.where(used, rows, torch.zeros((), dtype=out_dtype, device=x.device))


def _combine_torch(buf, dest, gates, acc_dtype):
    """y[t] = sum_{j: dest[t, j] >= 0} gates[t, j] * buf[dest[t, j]], accumulated in acc_dtype."""
    t, k = dest.shape
    d = dest.to(torch.int64)
    rows = buf.to(acc_dtype).index_select(0, d.clamp(min=0).reshape(-1)).view(t, k, buf.shape[1])
    w = (d >= 0).to(acc_dtype)
    if gates is not None:
        w = w * gates.to(acc_dtype)
    return (rows * w[:, :, None]).sum(1)


def moe_permute_ref(x: torch.Tensor, routing: Routing, upcast: bool = False) -> torch.Tensor:
    """``moe_permute`` in plain PyTorch (index_select); ``upcast``: float64 result."""
    _check_rows(x, "x", None, "(tokens, d)", "moe_permute")
    dest, src = _check_routing(routing, x.shape[0], "x", x.device, "moe_permute")
    return _gather_torch(x, dest, src, None, torch.float64 if upcast else x.dtype)


def moe_unpermute_ref(
    buf: torch.Tensor, routing: Routing, gates: torch.Tensor, upcast: bool = False
) -> torch.Tensor:
    """``moe_unpermute`` in plain PyTorch. ``upcast``: float64 math and result (the oracle); otherwise the
    math runs in buf's dtype, what a user writes."""
    dest, _, gates = _check_unpermute(buf, routing, gates)
    dt = torch.float64 if upcast else buf.dtype
    return _combine_torch(buf, dest, gates, dt).to(dt)


# =====================================================================================================
# Triton kernels (GPU; CPU tensors under TRITON_INTERPRET=1 for the tests)
# =====================================================================================================

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the machine
    triton = None

ROUTE_BLOCK = 1024  # priority positions per program in the route kernels


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


if triton is not None:

    @triton.jit
    def _route_keys(idx_ptr, valid_ptr, p, n, T, K: tl.constexpr, E, HAS_VALID: tl.constexpr):
        """Keys of priority positions p = j*T + t: the expert id, E where not made / past the end."""
        inb = p < n
        t = p % T
        j = p // T
        a = t * K + j
        e = tl.load(idx_ptr + a, mask=inb, other=E).to(tl.int32)
        ok = inb & (e >= 0) & (e < E)
        if HAS_VALID:
            ok = ok & (tl.load(valid_ptr + a, mask=inb, other=0) != 0)
        return tl.where(ok, e, E), a, inb

    @triton.jit
    def _route_hist_kernel(idx_ptr, valid_ptr, chunk_ptr, n, T, E, K: tl.constexpr, HAS_VALID: tl.constexpr,
                           BLOCK: tl.constexpr, NBINS: tl.constexpr):  # fmt: skip
        pid = tl.program_id(0)
        p = pid * BLOCK + tl.arange(0, BLOCK)
        key, _, _ = _route_keys(idx_ptr, valid_ptr, p, n, T, K, E, HAS_VALID)
        h = tl.histogram(key, NBINS)
        bins = tl.arange(0, NBINS)
        tl.store(chunk_ptr + pid * E + bins, h.to(tl.int32), mask=bins < E)

    @triton.jit
    def _route_rank_kernel(idx_ptr, valid_ptr, base_ptr, offsets_ptr, dest_ptr, src_ptr, n, T, E, cap,
                           K: tl.constexpr, HAS_VALID: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        # Stable in-chunk ranks: sorting key * BLOCK + lane keeps equal keys in priority order; a sorted
        # element's rank is its sorted position + base[chunk, key] (its run's global rank minus its run's start).
        pid = tl.program_id(0)
        lane = tl.arange(0, BLOCK)
        key, _, _ = _route_keys(idx_ptr, valid_ptr, pid * BLOCK + lane, n, T, K, E, HAS_VALID)
        s = tl.sort(key * BLOCK + lane)
        skey = s // BLOCK
        p = pid * BLOCK + s % BLOCK
        inb = p < n
        a = (p % T) * K + p // T
        ok = inb & (skey < E)
        e = tl.where(ok, skey, 0)
        r = tl.load(base_ptr + pid * E + e, mask=ok, other=0) + lane
        kept = ok & (r < cap)
        d = tl.where(kept, tl.load(offsets_ptr + e, mask=kept, other=0) + r, -1)
        tl.store(dest_ptr + a, d, mask=inb)
        tl.store(src_ptr + d, a, mask=kept)

    @triton.jit
    def _gather_kernel(x_ptr, src_ptr, scale_ptr, out_ptr, R, D, K: tl.constexpr, HAS_SCALE: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        rm = rows < R
        cm = cols < D
        a = tl.load(src_ptr + rows, mask=rm, other=-1)
        used = a >= 0
        tok = tl.where(used, a // K, 0).to(tl.int64)
        m = used[:, None] & cm[None, :]
        v = tl.load(x_ptr + tok[:, None] * D + cols[None, :], mask=m, other=0.0)
        if HAS_SCALE:
            w = tl.load(scale_ptr + a, mask=used, other=0.0)
            v = v.to(tl.float32) * w[:, None]
        out = out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :]
        tl.store(out, v.to(out_ptr.dtype.element_ty), mask=rm[:, None] & cm[None, :])

    @triton.jit
    def _combine_kernel(buf_ptr, dest_ptr, gates_ptr, out_ptr, T, D, K: tl.constexpr, HAS_GATES: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
        toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        tm = toks < T
        cm = cols < D
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for j in tl.static_range(K):
            r = tl.load(dest_ptr + toks * K + j, mask=tm, other=-1)
            used = r >= 0
            v = tl.load(buf_ptr + tl.where(used, r, 0).to(tl.int64)[:, None] * D + cols[None, :],
                        mask=used[:, None] & cm[None, :], other=0.0).to(tl.float32)  # fmt: skip
            if HAS_GATES:
                w = tl.load(gates_ptr + toks * K + j, mask=used, other=0.0)
                v = v * w[:, None]
            acc += v
        out = out_ptr + toks.to(tl.int64)[:, None] * D + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=tm[:, None] & cm[None, :])

    @triton.jit
    def _gate_grad_kernel(dy_ptr, buf_ptr, dest_ptr, out_ptr, N, D, K: tl.constexpr, BLOCK_A: tl.constexpr,
                          BLOCK_D: tl.constexpr):  # fmt: skip
        a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
        am = a < N
        r = tl.load(dest_ptr + a, mask=am, other=-1)
        used = r >= 0
        yrow = (a // K).to(tl.int64)[:, None] * D
        brow = tl.where(used, r, 0).to(tl.int64)[:, None] * D
        acc = tl.zeros((BLOCK_A,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            cm = cols < D
            y = tl.load(dy_ptr + yrow + cols[None, :], mask=am[:, None] & cm[None, :], other=0.0)
            b = tl.load(buf_ptr + brow + cols[None, :], mask=used[:, None] & cm[None, :], other=0.0)
            acc += tl.sum(y.to(tl.float32) * b.to(tl.float32), axis=1)
        tl.store(out_ptr + a, acc, mask=am)


def _route_triton(expert_idx, valid, num_experts, cap):
    t, k = expert_idx.shape
    n, e, dev = t * k, num_experts, expert_idx.device
    i32 = torch.int32
    dest = torch.empty((t, k), dtype=i32, device=dev)
    src = torch.full((n,), -1, dtype=i32, device=dev)
    # small chunks under the interpreter, whose tl.sort is slow; any chunk size gives the same result
    block = ROUTE_BLOCK if dev.type == "cuda" else 64
    chunks = triton.cdiv(n, block)
    chunk_counts = torch.empty((chunks, e), dtype=i32, device=dev)
    vp = valid if valid is not None else expert_idx
    if chunks:
        _route_hist_kernel[(chunks,)](expert_idx, vp, chunk_counts, n, t, e, K=k, HAS_VALID=valid is not None,
                                      BLOCK=block, NBINS=_next_pow2(e + 1))  # fmt: skip
    # (chunks x E) scans in torch: the run of expert e in chunk c starts at local[c, e] in the chunk's sorted
    # order and at global rank before[c, e]; base = before - local.
    counts = chunk_counts.sum(0, dtype=torch.int64)
    before = torch.cumsum(chunk_counts, 0, dtype=torch.int64) - chunk_counts
    local = torch.cumsum(chunk_counts, 1, dtype=torch.int64) - chunk_counts
    base = (before - local).to(i32)
    kept = counts if cap < 0 else counts.clamp(max=cap)
    offsets = torch.zeros(e + 1, dtype=torch.int64, device=dev)
    offsets[1:] = torch.cumsum(kept, 0)
    offsets = offsets.to(i32)
    if chunks:
        _route_rank_kernel[(chunks,)](expert_idx, vp, base, offsets, dest, src, n, t, e, cap if cap >= 0 else n, K=k,
                                      HAS_VALID=valid is not None, BLOCK=block)  # fmt: skip
    return Routing(dest, src, offsets, counts.to(i32))


def _blocks(d: int) -> tuple[int, int]:
    """(rows per program, columns per program): up to 4096 elements, columns up to 1024."""
    bd = min(_next_pow2(max(d, 1)), 1024)
    return max(1, 4096 // bd), bd


def _gather_triton(x, dest, src, scale):
    r, d, k = src.shape[0], x.shape[1], dest.shape[1]
    out = torch.empty((r, d), dtype=x.dtype, device=x.device)
    if out.numel():
        br, bd = _blocks(d)
        _gather_kernel[(triton.cdiv(r, br), triton.cdiv(d, bd))](
            x, src, scale if scale is not None else x, out, r, d, K=k, HAS_SCALE=scale is not None,
            BLOCK_R=br, BLOCK_D=bd)  # fmt: skip
    return out


def _combine_triton(buf, dest, gates):
    t, k = dest.shape
    d = buf.shape[1]
    out = torch.empty((t, d), dtype=buf.dtype, device=buf.device)
    if out.numel():
        bt, bd = _blocks(d)
        _combine_kernel[(triton.cdiv(t, bt), triton.cdiv(d, bd))](
            buf, dest, gates if gates is not None else buf, out, t, d, K=k, HAS_GATES=gates is not None,
            BLOCK_T=bt, BLOCK_D=bd)  # fmt: skip
    return out


def _gate_grad_triton(dy, buf, dest):
    t, k = dest.shape
    d = buf.shape[1]
    out = torch.empty((t, k), dtype=torch.float32, device=buf.device)
    if out.numel():
        bd = min(_next_pow2(max(d, 1)), 256)
        ba = max(1, 4096 // bd)
        _gate_grad_kernel[(triton.cdiv(t * k, ba),)](
            dy, buf, dest, out, t * k, d, K=k, BLOCK_A=ba, BLOCK_D=bd
        )
    return out


# =====================================================================================================
# Backends
# =====================================================================================================

# ---- moe_route ----


def _route_cpp(expert_idx, valid, num_experts, cap):
    return Routing(*_ext.C.moe_route_cpu(expert_idx, valid, num_experts, cap))


def _route_cuda(expert_idx, valid, num_experts, cap):
    return Routing(*_ext.C.moe_route_cuda(expert_idx, valid, num_experts, cap))


MAX_CUDA_EXPERTS = 12288  # one shared-memory counter per expert (csrc/moe_permute/moe_permute.h)
MAX_TRITON_EXPERTS = 4096  # tl.histogram bins (next power of two of E + 1) and the sort keys


def _route_backend(expert_idx: torch.Tensor, num_experts: int) -> _backend.Backend:
    """``ROUTE.dispatch`` for a routing of ``expert_idx`` over ``num_experts``, remembered on what the backends'
    checks read: device, dtype and which expert-count limits (Triton's, CUDA's) E fits."""
    key = (
        expert_idx.device,
        expert_idx.dtype,
        num_experts <= MAX_TRITON_EXPERTS,
        num_experts <= MAX_CUDA_EXPERTS,
    )
    return ROUTE.dispatch_remembered(
        key, lambda: Call(expert_idx.device, expert_idx.dtype, {"num_experts": num_experts})
    )


def _max_experts(limit: int, why: str):
    def check(call: Call) -> list[str]:
        e = call.get("num_experts", 1)
        return [] if e <= limit else [f"num_experts {e} > {limit} ({why})"]

    return check


ROUTE.register("cuda", devices=("cuda",), dtypes=INDEX_DTYPES, available=_backend.cuda_available,
               check=_max_experts(MAX_CUDA_EXPERTS, "shared-memory counters"),
               note="CUDA C++ chunk histograms + scans + warp-match stable ranks")(_route_cuda)  # fmt: skip
ROUTE.register("triton", devices=("cuda",), dtypes=INDEX_DTYPES, available=_backend.triton_available,
               check=lambda call: _backend.triton_check_device(call)
               + _max_experts(MAX_TRITON_EXPERTS, "histogram bins")(call),
               forced_only_devices=("cpu",), note="Triton chunk histograms + in-chunk sort")(
    lambda *a: _route_triton(*a))  # fmt: skip
ROUTE.register("cpp", devices=("cpu",), dtypes=INDEX_DTYPES, available=_backend.cpp_available,
               note="C++ at::parallel_for over chunks + sequential scan")(_route_cpp)  # fmt: skip
ROUTE.register("torch", devices=("cpu", "cuda", "mps", "xpu"), dtypes=INDEX_DTYPES,
               note="stable argsort in PyTorch ops")(_route_torch)  # fmt: skip

# ---- moe_permute: gather (permute fwd, unpermute bwd), combine (unpermute fwd, permute bwd), gate grads ----


class _Impl(NamedTuple):
    gather: object  # (x, dest, src, scale | None) -> (T*k, d) in x's dtype
    combine: object  # (buf, dest, gates | None) -> (T, d') in buf's dtype
    gate_grad: object  # (dy, buf, dest) -> (T, k) float32 (float64 for float64 inputs)


def _torch_gather(x, dest, src, scale):
    return _gather_torch(x, dest, src, scale, torch.promote_types(x.dtype, torch.float32)).to(x.dtype)


def _torch_combine(buf, dest, gates):
    return _combine_torch(buf, dest, gates, torch.promote_types(buf.dtype, torch.float32)).to(buf.dtype)


def _torch_gate_grad(dy, buf, dest):
    t, k = dest.shape
    acc = torch.promote_types(buf.dtype, torch.float32)
    d = dest.to(torch.int64)
    rows = buf.to(acc).index_select(0, d.clamp(min=0).reshape(-1)).view(t, k, buf.shape[1])
    g = (rows * dy.to(acc)[:, None, :]).sum(-1)
    return torch.where(d >= 0, g, torch.zeros((), dtype=acc, device=g.device))


def _weights(w, data):
    return (
        None if w is None else w.reshape(-1).to(torch.promote_types(data.dtype, torch.float32)).contiguous()
    )


_CPP = _Impl(
    lambda x, dest, src, scale: _ext.C.moe_gather_cpu(x, src, _weights(scale, x), dest.shape[1]),
    lambda buf, dest, gates: _ext.C.moe_combine_cpu(buf, dest, _weights(gates, buf)),
    lambda dy, buf, dest: _ext.C.moe_gate_grad_cpu(dy.contiguous(), buf, dest),
)
_TRITON = _Impl(
    lambda x, dest, src, scale: _gather_triton(x, dest, src, _weights(scale, x)),
    lambda buf, dest, gates: _combine_triton(buf, dest, _weights(gates, buf)),
    lambda dy, buf, dest: _gate_grad_triton(dy.contiguous(), buf, dest),
)
OP.register("triton", devices=("cuda",), dtypes=KERNEL_DTYPES, available=_backend.triton_available,
            check=_backend.triton_check_device, forced_only_devices=("cpu",),
            note="Triton row-block gather / weighted gather-sum")(_TRITON)  # fmt: skip
OP.register("cpp", devices=("cpu",), dtypes=ALL_DTYPES, available=_backend.cpp_available,
            note="C++ at::parallel_for over rows / tokens")(_CPP)  # fmt: skip
OP.register("torch", devices=("cpu", "cuda", "mps", "xpu"), dtypes=ALL_DTYPES,
            note="index_select / weighted sums in PyTorch ops")(
    _Impl(_torch_gather, _torch_combine, _torch_gate_grad))  # fmt: skip


def _impl(t: torch.Tensor) -> _Impl:
    """The dispatched backend's functions for a call on ``t``, remembered on what the backends' checks read
    (device and dtype; dispatch_remembered adds a forced backend and the Triton interpreter)."""
    return OP.dispatch_remembered((t.device, t.dtype), lambda: Call(t.device, t.dtype, {"d": t.shape[-1]})).fn


# ---- torch.library ops: traced by torch.compile without graph breaks -----------------------------------


@torch.library.custom_op("fastgen::moe_route", mutates_args=())
def _route_op(
    expert_idx: torch.Tensor, valid: torch.Tensor | None, num_experts: int, capacity: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(_route_backend(expert_idx, num_experts).fn(expert_idx, valid, num_experts, capacity))


@_route_op.register_fake
def _(expert_idx, valid, num_experts, capacity):
    t, k = expert_idx.shape
    new = expert_idx.new_empty
    i32 = torch.int32
    return (new((t, k), dtype=i32), new((t * k,), dtype=i32), new((num_experts + 1,), dtype=i32),
            new((num_experts,), dtype=i32))  # fmt: skip


@torch.library.custom_op("fastgen::moe_gather", mutates_args=())
def _gather_op(
    x: torch.Tensor, dest: torch.Tensor, src: torch.Tensor, scale: torch.Tensor | None
) -> torch.Tensor:
    return _impl(x).gather(x, dest, src, scale)


@_gather_op.register_fake
def _(x, dest, src, scale):
    return x.new_empty((src.shape[0], x.shape[1]))


@torch.library.custom_op("fastgen::moe_combine", mutates_args=())
def _combine_op(
    buf: torch.Tensor, dest: torch.Tensor, src: torch.Tensor, gates: torch.Tensor | None
) -> torch.Tensor:
    return _impl(buf).combine(buf, dest, gates)


@_combine_op.register_fake
def _(buf, dest, src, gates):
    return buf.new_empty((dest.shape[0], buf.shape[1]))


@torch.library.custom_op("fastgen::moe_gate_grad", mutates_args=())
def _gate_grad_op(dy: torch.Tensor, buf: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    return _impl(buf).gate_grad(dy, buf, dest)


@_gate_grad_op.register_fake
def _(dy, buf, dest):
    return dy.new_empty(dest.shape, dtype=torch.promote_types(buf.dtype, torch.float32))


# gather and combine are adjoint: gather(x, scale)^T = combine(., scale), and the scale gradient of one is
# the gate gradient of the other.
def _setup(ctx, inputs, output):
    a, dest, src, w = inputs
    ctx.save_for_backward(a, dest, src, w)


def _gather_bwd(ctx, grad):
    x, dest, src, scale = ctx.saved_tensors
    dx = dscale = None
    if ctx.needs_input_grad[0]:
        dx = _combine_op(grad.contiguous(), dest, src, scale)
    if scale is not None and ctx.needs_input_grad[3]:
        dscale = _gate_grad_op(x, grad.contiguous(), dest).to(scale.dtype)
    return dx, None, None, dscale


def _combine_bwd(ctx, grad):
    buf, dest, src, gates = ctx.saved_tensors
    dbuf = dgates = None
    grad = grad.contiguous()
    if ctx.needs_input_grad[0]:
        dbuf = _gather_op(grad, dest, src, gates)
    if gates is not None and ctx.needs_input_grad[3]:
        dgates = _gate_grad_op(grad, buf, dest).to(gates.dtype)
    return dbuf, None, None, dgates


_gather_op.register_autograd(_gather_bwd, setup_context=_setup)
_combine_op.register_autograd(_combine_bwd, setup_context=_setup)


# =====================================================================================================
# Public API
# =====================================================================================================


def moe_route(
    expert_idx: torch.Tensor, num_experts: int, capacity: int | None = None, valid: torch.Tensor | None = None
) -> Routing:
    """Route T*k (token, slot) assignments to experts (see the module docstring for the priority rule).

    Args:
        expert_idx: (T, k) int32 / int64 expert ids in [0, num_experts) (ignored where ``valid`` is False).
        num_experts: E.
        capacity: max rows per expert (GShard's expert capacity; overflow is dropped in priority order), or
            None for dropless routing.
        valid: optional (T, k) bool; False: the assignment is not made (e.g. a skipped second expert).
    Returns:
        Routing(dest (T, k), src (T*k,), offsets (E+1,), counts (E,)), all int32 on expert_idx's device.
    """
    cap = _check_route(expert_idx, num_experts, capacity, valid)
    return Routing(
        *_route_op(expert_idx.contiguous(), None if valid is None else valid.contiguous(), num_experts, cap)
    )


def route_trusted(
    expert_idx: torch.Tensor, num_experts: int, capacity: int | None, valid: torch.Tensor | None
) -> Routing:
    """``moe_route`` for callers that made expert_idx themselves (contiguous, in range: e.g. the top-2
    router): no value checks, and plain eager calls skip the torch.library wrapper."""
    cap = -1 if capacity is None else capacity
    if _backend.plain_eager(expert_idx):
        return Routing(*_route_backend(expert_idx, num_experts).fn(expert_idx, valid, num_experts, cap))
    return Routing(*_route_op(expert_idx, valid, num_experts, cap))


def moe_permute(x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Gather token rows into the expert-sorted buffer: (T, d) -> (T*k, d), buf[row] = x[src[row] // k],
    zeros on unused rows. Differentiable in x (dx[t] = sum over kept j of dbuf[dest[t, j]])."""
    _check_rows(x, "x", None, "(tokens, d)", "moe_permute")
    dest, src = _check_routing(routing, x.shape[0], "x", x.device, "moe_permute")
    _check_index_ranges(dest, src, "moe_permute")
    return _gather_op(x.contiguous(), dest, src, None)


def _check_unpermute(buf, routing, gates):
    err = functools.partial(_err, op="moe_unpermute")
    if not isinstance(routing, tuple) or len(routing) != 4 or not isinstance(routing[0], torch.Tensor):
        raise err(f"routing must be the Routing returned by moe_route, got {type(routing).__name__}")
    if routing[0].ndim != 2:
        raise err(f"routing.dest must be (tokens, k), got {_desc(routing[0])}")
    t, k = routing[0].shape
    _check_rows(buf, "buf", t * k, "(tokens * k rows, d)", "moe_unpermute")
    if not isinstance(gates, torch.Tensor):
        raise err(f"gates must be a tensor, got {type(gates).__name__}")
    if gates.dtype not in ALL_DTYPES:
        raise err(f"gates must be float16, bfloat16, float32 or float64, got {gates.dtype}")
    if gates.ndim != 2 or gates.shape[1] != k:
        raise err(f"gates must be (tokens, k) = (.., {k}) like routing.dest, got shape {tuple(gates.shape)}")
    if gates.shape[0] != t:
        raise err(f"gates has {gates.shape[0]} tokens ({tuple(gates.shape)}), expected {t} like routing.dest")
    if gates.device != buf.device:
        raise err(f"gates is on {gates.device} but buf is on {buf.device}")
    # the Routing's tensors must sit with buf (t comes from routing.dest itself, so its count holds)
    dest, src = _check_routing(routing, t, "buf", buf.device, "moe_unpermute")
    return dest, src, gates


def _check_index_ranges(dest, src, op: str) -> None:
    n = src.shape[0]
    if n:
        _assert_values(
            (dest >= -1) & (dest < n),
            f"routing.dest entries must be in [-1, {n}) (a Routing from moe_route)",
            op,
        )
        _assert_values(
            (src >= -1) & (src < n),
            f"routing.src entries must be in [-1, {n}) (a Routing from moe_route)",
            op,
        )


def moe_unpermute(buf: torch.Tensor, routing: Routing, gates: torch.Tensor) -> torch.Tensor:
    """Combine expert outputs: (T*k, d') -> (T, d'), y[t] = sum over kept j of gates[t, j] * buf[dest[t, j]].

    fp32 accumulation; the result has buf's dtype (gates may be float32 with a bf16 / fp16 buf).
    Differentiable in buf and gates.
    """
    dest, src, gates = _check_unpermute(buf, routing, gates)
    _check_index_ranges(dest, src, "moe_unpermute")
    return _combine_op(buf.contiguous(), dest, src, gates.contiguous())

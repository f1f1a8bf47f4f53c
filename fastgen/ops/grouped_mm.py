r"""Grouped GEMM for mixture-of-experts: one matmul per expert over its contiguous block of rows.

With ``x: (R, K)`` rows grouped by expert, ``w: (E, K, N)``, ``offsets: (E + 1,)`` and an optional
``bias: (E, N)``, expert ``e`` owns rows ``[offsets[e], offsets[e + 1])`` and::

    h[r]   = x[r] @ w[e] + bias[e]            for offsets[e] <= r < offsets[e + 1]
    out[r] = act(h[r])                        act: None, relu, gelu (erf), gelu_tanh, silu
    out[r] = silu(h[r, :F]) * h[r, F:]        act = swiglu, N = 2F: out is (R, F)
    out[r] = 0                                rows outside [offsets[0], offsets[E]) (unused padding)

Groups may be empty and ``offsets[E]`` may be below ``R`` (capacity padding); the offsets stay on the device.

Backward (w.r.t. x, w and bias). The forward saves the pre-activation ``h`` (in x's dtype, only when
an activation is used and a gradient is needed): recomputing it would cost a second forward GEMM, while
storing it costs one (R, N) write and read. Then::

    dh       = dout * act'(h)                 (swiglu: dgate = dout * u * silu'(g), dup = dout * silu(g))
    dx_e     = dh_e @ w[e]^T                  (the forward kernel on w's transposed strides, no copy)
    dw[e]    = x_e^T @ dh_e                   (the "weight-gradient" grouped GEMM: reduction over a
                                               variable number of rows; zeros for an empty expert)
    dbias[e] = sum of dh_e's rows

Triton kernels (CUDA; CPU tensors only under ``TRITON_INTERPRET=1`` when forced), no host synchronisation:
the number of BLOCK_M row tiles of each expert and their prefix sum are computed on the device with
torch ops; the forward launches ONE grid of ``cdiv(R, BLOCK_M) + E + 2`` (an upper bound on the row tiles
of all experts plus the unused-row tiles) x ``cdiv(N, BLOCK_N)`` programs, grouped along M for L2 reuse.
A program finds its expert by counting the tile prefix entries <= its row-tile id (one vector load),
and programs past the experts' tiles write the zeros of the unused rows. So the op is CUDA-graph
capturable. The weight-gradient kernel runs one program per (expert, K tile, N tile), looping over the
expert's rows; its programs of the first K tile also sum dh's rows into dbias.

Backends: ``triton`` and ``torch`` (any device and dtype including float64; it reads the offsets on the host,
so it synchronises — the CPU path): ``torch._grouped_mm`` (float32 / bfloat16 / float16, where torch has it)
or one ``torch.mm(out=)`` / ``torch.addmm(out=)`` per non-empty expert into a preallocated output, the
activation once over all used rows (in place without autograd) and the backward's dh in one fused ATen
kernel; see the section comment at ``_fwd_torch``. Experts with equal row counts covering x (balanced
routing) run as one ``torch.bmm`` / ``baddbmm`` over (E, R / E, K), forward and backward; swiglu over a few
experts goes through a one-block scratch (no (R, N) pre-activation without a gradient, no (R, N) dh). Small CPU calls that use every row and need a gradient
(not swiglu) run ``torch._grouped_mm`` + the activation under torch's own autograd: its C++ nodes cost
less per call than a Python autograd.Function and save the same tensors.
For the MoE layer, :func:`moe_experts_cpu` runs gather -> both GEMMs -> combine block by block on CPU
without the padded (T*k, .) buffers.
Reference: :func:`grouped_mm_ref`, a plain loop over experts in float64.
"""

from __future__ import annotations

import itertools
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

ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh", "silu", "swiglu")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_EXPERTS = 4096
_ACT_ID = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4, "swiglu": 5}
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)

OP = _backend.get_op("grouped_mm", "grouped GEMM over experts (MoE) with fused bias + activation, fwd + bwd")


def _err(msg: str) -> ValueError:
    return ValueError(f"fastgen.grouped_mm: {msg}")


# =====================================================================================================
# Reference (the oracle) and the activations in PyTorch
# =====================================================================================================


def activation_ref(h: torch.Tensor, act: str | None) -> torch.Tensor:
    """The activations in PyTorch (None / "none": identity; swiglu: silu(h[..., :F]) * h[..., F:])."""
    if act is None or act == "none":
        return h
    if act == "relu":
        return torch.relu(h)
    if act == "gelu":
        return torch.nn.functional.gelu(h)
    if act == "gelu_tanh":
        return torch.nn.functional.gelu(h, approximate="tanh")
    if act == "silu":
        return torch.nn.functional.silu(h)
    f = h.shape[-1] // 2
    return torch.nn.functional.silu(h[..., :f]) * h[..., f:]


def _act_grad(dout: torch.Tensor, h: torch.Tensor, act: str) -> torch.Tensor:
    """dh = dout * act'(h), in h's dtype (call with float32 / float64 tensors)."""
    if act == "none":
        return dout
    if act == "relu":
        return dout * (h > 0).to(h.dtype)
    if act == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(h * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * h * h) * (1.0 / math.sqrt(2.0 * math.pi))
        return dout * (cdf + h * pdf)
    if act == "gelu_tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (h + 0.044715 * h**3))
        return dout * (
            0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * h * h)
        )
    if act == "silu":
        s = torch.sigmoid(h)
        return dout * s * (1.0 + h * (1.0 - s))
    f = h.shape[-1] // 2
    g, u = h[..., :f], h[..., f:]
    s = torch.sigmoid(g)
    return torch.cat([dout * u * s * (1.0 + g * (1.0 - s)), dout * g * s], dim=-1)


def grouped_mm_ref(
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Plain loop over experts (differentiable by autograd). x: (R, K), w: (E, K, N), offsets: (E + 1,),
    bias: (E, N). Computed in float64 when ``upcast`` (else in x's dtype); returns x's dtype, (R, N) or
    (R, N / 2) for swiglu, zeros on rows outside [offsets[0], offsets[E])."""
    act = "none" if activation is None else activation
    dt = torch.float64 if upcast else x.dtype
    xs, ws = x.to(dt), w.to(dt)
    n_out = w.shape[2] // 2 if act == "swiglu" else w.shape[2]
    off = [int(v) for v in offsets.tolist()]
    pieces = [xs.new_zeros((off[0], n_out))]
    for e in range(w.shape[0]):
        h = xs[off[e] : off[e + 1]] @ ws[e]
        if bias is not None:
            h = h + bias[e].to(dt)
        pieces.append(activation_ref(h, act))
    pieces.append(xs.new_zeros((x.shape[0] - off[-1], n_out)))
    return torch.cat(pieces, 0).to(x.dtype)


# =====================================================================================================
# torch backend (the CPU path): per-group BLAS calls on views of the sorted rows, no copies
# =====================================================================================================
# The offsets are read on the host once per call. Every GEMM writes straight into its rows of one
# preallocated output: ``torch._grouped_mm`` (one ATen call looping over the groups in C++; float32 /
# bfloat16 / float16, where torch has it and the used rows start at row 0) or else one ``torch.mm`` /
# ``torch.addmm(out=...)`` per non-empty expert. The bias is added in place per expert, the activation runs
# ONCE over all used rows (in place when h need not be saved) and the backward's dh = dout * act'(h) is one
# fused ATen backward kernel (gelu_backward / silu_backward / threshold_backward) over the used rows. Only
# the unused rows (before offsets[0], from offsets[E]) are zero-filled. Peak memory: out (+ h when saved);
# backward: dh (unless act = none) + dx + dw + dbias, no per-expert temporaries.

_GMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ACT_INPLACE = {
    "relu": torch.relu_,
    "gelu": lambda h: torch._C._nn.gelu_(h),
    "gelu_tanh": lambda h: torch._C._nn.gelu_(h, approximate="tanh"),
    "silu": lambda h: torch._C._nn.silu_(h),
}
_ACT_OUT = {
    "relu": lambda h, out: torch.clamp_min(h, 0, out=out),
    "gelu": lambda h, out: torch._C._nn.gelu(h, out=out),
    "gelu_tanh": lambda h, out: torch._C._nn.gelu(h, approximate="tanh", out=out),
    "silu": lambda h, out: torch._C._nn.silu(h, out=out),
}
_ACT_BWD = {  # (dout, h, out) -> out = dout * act'(h), one ATen kernel (opmath = float32 for 16-bit types)
    "relu": lambda d, h, out: torch.ops.aten.threshold_backward.grad_input(d, h, 0, grad_input=out),
    "gelu": lambda d, h, out: torch.ops.aten.gelu_backward.grad_input(d, h, grad_input=out),
    "gelu_tanh": lambda d, h, out: torch.ops.aten.gelu_backward.grad_input(d, h, approximate="tanh",
                                                                            grad_input=out),
    "silu": lambda d, h, out: torch.ops.aten.silu_backward.grad_input(d, h, grad_input=out),
}  # fmt: skip


def _aligned(t: torch.Tensor) -> bool:
    """torch._grouped_mm's operand rule: 16-byte aligned data, unit stride in one of the last two dims and
    the other stride a multiple of 16 bytes."""
    a = 16 // t.element_size()
    s0, s1 = t.stride(-2), t.stride(-1)
    return t.data_ptr() % 16 == 0 and ((s1 == 1 and s0 % a == 0) or (s0 == 1 and s1 % a == 0))


def _use_gmm(x: torch.Tensor, w: torch.Tensor, lo: int, backward: bool) -> bool:
    """torch._grouped_mm for this call's GEMMs: torch has it, the dtype is one it takes, the used rows start
    at row 0, and every operand / output of the GEMMs is 16-byte aligned (else one mm per expert)."""
    if not (_HAS_TORCH_GMM and lo == 0 and x.dtype in _GMM_DTYPES and x.device.type == "cpu"):
        return False
    a = 16 // x.element_size()
    k, n = w.shape[1], w.shape[2]
    return not (n % a or (backward and k % a)) and _aligned(x) and _aligned(w)


_HAS_TORCH_GMM = hasattr(torch, "_grouped_mm")
# fastgen._C's grouped GEMMs (csrc/grouped_gemm): every expert's GEMM in one parallel region, each on one
# thread, where torch._grouped_mm forks the pool inside each expert's GEMM. Used for calls with more than
# _SCRATCH_MAX_EXPERTS experts with rows (small ones, many fork/joins); None: not built.
_GROUPED_ROWS = getattr(_ext.C, "grouped_rows_cpu", None)
_GROUPED_WGRAD = getattr(_ext.C, "grouped_wgrad_cpu", None)


def _grouped_c(x: torch.Tensor, off: list[int]) -> bool:
    """The grouped kernels for this call: built, many experts with rows, and more than one thread (on one
    thread their GEMMs are torch._grouped_mm's, and torch's own autograd nodes cost less per call)."""
    return _GROUPED_ROWS is not None and x.is_cpu and not _few_experts(off) and torch.get_num_threads() > 1


def _zero_unused(t: torch.Tensor, lo: int, hi: int) -> None:
    if lo:
        t[:lo].zero_()
    if hi < t.shape[0]:
        t[hi:].zero_()


# Two schedules, picked per call from the size of the pre-activation h:
# * "whole" (h of the used rows <= _WHOLE_BYTES, i.e. it stays in L2, or small experts): torch._grouped_mm for all experts
#   in one call, then the bias per expert and the activation once over all used rows (fewest Python calls);
# * "blocked": experts in row blocks of about _BLOCK_BYTES of h; each block's GEMM is followed at once by
#   its bias + activation (forward) or its dh, dx and dw updates (backward) while the block is in cache.
#   The backward then needs only one block of dh as scratch, not an (R, N) dh.
#   Used when the experts are big enough (on average >= _BLOCK_MIN_ROWS rows) for the per-block Python calls
#   not to matter. (Measured on 2 AMD EPYC cores: 1 MiB blocks beat 256 KiB and 4 MiB ones; 4 experts of
#   128 rows, 64 -> 512 swiglu: one torch._grouped_mm beat 4 blocks, hence 256 rows, not 128.)
_WHOLE_BYTES = 1 << 19
_BLOCK_BYTES = 1 << 20
_BLOCK_MIN_ROWS = 256


def _whole(x, w, lo, hi, backward):
    small = (hi - lo) * w.shape[2] * x.element_size() <= _WHOLE_BYTES or hi - lo < _BLOCK_MIN_ROWS * w.shape[
        0
    ]
    return small and _use_gmm(x, w, lo, backward)


def _balanced(x: torch.Tensor, off: list[int]) -> int:
    """Rows per expert when every expert has the same number of rows g >= 1, the rows cover all of x and x
    is contiguous: then x is an (E, g, K) batch and one ``torch.bmm`` (``baddbmm`` with the bias) serves
    all experts, for any dtype and alignment, at less cost per call than torch._grouped_mm's loop over the
    groups (balanced routing, e.g. capacity-padded experts). Else 0."""
    e, r = len(off) - 1, x.shape[0]
    if e < 1 or r == 0 or r % e or off[0] or off[-1] != r or not x.is_contiguous():
        return 0
    g = r // e
    return g if off == list(range(0, r + 1, g)) else 0


def _bmm_experts(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, g: int) -> torch.Tensor:
    """h (R, N) of balanced experts (``g`` = _balanced(x, off) rows each): one bmm / baddbmm over (E, g, K)."""
    x3 = x.view(w.shape[0], g, x.shape[1])
    h = torch.bmm(x3, w) if bias is None else torch.baddbmm(bias.unsqueeze(1), x3, w)
    return h.view(x.shape[0], w.shape[2])


def _expert_sums(dh: torch.Tensor, off: list[int], out: torch.Tensor) -> None:
    """out[e] = the sum of dh over the rows of expert e (float32 accumulation; 0 for an expert without rows)."""
    for e in range(out.shape[0]):
        torch.sum(dh[off[e] : off[e + 1]], 0, out=out[e])


_SCRATCH_MAX_EXPERTS = 16


def _few_experts(off: list[int]) -> bool:
    """At most _SCRATCH_MAX_EXPERTS experts with rows: one GEMM call per expert (through a block-sized
    scratch) costs little more Python than one torch._grouped_mm call over all of them."""
    return len(set(off)) - 1 <= _SCRATCH_MAX_EXPERTS


def _scratch_rows(off: list[int], rows_per_block: int) -> int:
    """Rows of a scratch that holds any block: blocks never span experts."""
    return max(1, min(rows_per_block, max((b - a for a, b in itertools.pairwise(off)), default=1)))


def _blocks(off, rows_per_block):
    """(expert, first row, end row) of each row block of each non-empty expert."""
    for e in range(len(off) - 1):
        for a in range(off[e], off[e + 1], rows_per_block):
            yield e, a, min(a + rows_per_block, off[e + 1])


def _rows_per_block(x, n):
    return max(16, _BLOCK_BYTES // max(1, n * x.element_size()))


# fastgen._C's fused SwiGLU (csrc/swiglu): one pass with a vectorized exp where torch makes two (three in
# the backward) with a libm-class exp; float32 CPU operands with unit column stride. None: not built.
_SWIGLU_FWD = getattr(_ext.C, "swiglu_fwd_cpu", None)
_SWIGLU_BWD = getattr(_ext.C, "swiglu_bwd_cpu", None)


_SWIGLU_WHOLE_BYTES = 1 << 20


def _fused_swiglu(fn, *ts: torch.Tensor) -> bool:
    return fn is not None and all(t.dtype is torch.float32 and t.is_cpu and t.stride(1) == 1 for t in ts)


def _act_fwd_block(h, out, act, save_h, n_out):
    """out = act(h) for one block of rows; in place on h when h is not kept (then out may be h)."""
    if act == "swiglu":  # out: never h; h left intact
        if _fused_swiglu(_SWIGLU_FWD, h, out):
            _SWIGLU_FWD(h, out)
            return
        g, u = h[:, :n_out], h[:, n_out:]  # silu(g) into out, then times u: no temporary
        _ACT_OUT["silu"](g, out).mul_(u)
    elif save_h:
        _ACT_OUT[act](h, out)
    else:
        _ACT_INPLACE[act](h)


def _fwd_torch(x, w, offsets, bias, act, save_h, off=None):
    """(out, h or None); ``off``: offsets as a host list when the caller has read them already."""
    r, n = x.shape[0], w.shape[2]
    swiglu = act == "swiglu"
    n_out = n // 2 if swiglu else n
    off = offsets.tolist() if off is None else off
    lo, hi = off[0], off[-1]
    e_count = w.shape[0]
    # h: the pre-activation x_e @ w[e] + bias[e] on rows [lo, hi) (other rows: zeroed below); out is h
    # itself when no activation is applied or h need not be kept (in-place activation)
    separate = act != "none" and (save_h or swiglu)
    g = _balanced(x, off)
    if g:
        h = _bmm_experts(x, w, bias, g)
        out = torch.empty((r, n_out), dtype=x.dtype, device=x.device) if separate else h
        if act != "none":
            _act_fwd_block(h, out, act, save_h, n_out)
        return out, (h if save_h and act != "none" else None)
    # swiglu without h kept: per expert into a scratch of one block's rows (peak memory below a loop's)
    # (not when the whole h is at most _SWIGLU_WHOLE_BYTES: one torch._grouped_mm call and one fused pass
    # then cost less than a GEMM and an activation call per expert, for 0.5 MiB more at most)
    scratch = (
        swiglu
        and not save_h
        and _few_experts(off)
        and not ((hi - lo) * n * x.element_size() <= _SWIGLU_WHOLE_BYTES and _fused_swiglu(_SWIGLU_FWD, x))
    )
    if not scratch and _whole(x, w, lo, hi, False):
        if _grouped_c(x, off):  # rows outside [lo, hi) are left unset, as by torch._grouped_mm
            h = torch.empty((r, n), dtype=x.dtype, device=x.device)
            _GROUPED_ROWS(x, w, bias, off, h)
        else:
            h = torch._grouped_mm(x, w, offs=offsets[1:])  # rows >= hi are left unset by the op
            if bias is not None:
                for e in range(e_count):
                    if off[e] < off[e + 1]:
                        h[off[e] : off[e + 1]].add_(bias[e])
        out = torch.empty((r, n_out), dtype=x.dtype, device=x.device) if separate else h
        if act != "none":
            every = lo == 0 and hi == r  # no views to make (a few us: this path serves small calls)
            _act_fwd_block(h if every else h[lo:hi], out if every else out[lo:hi], act, save_h, n_out)
    else:
        rpb = _rows_per_block(x, n)
        h = torch.empty((_scratch_rows(off, rpb) if scratch else r, n), dtype=x.dtype, device=x.device)
        out = torch.empty((r, n_out), dtype=x.dtype, device=x.device) if separate else h
        for e, a, b in _blocks(off, rpb):
            hb = h[: b - a] if scratch else h[a:b]
            if bias is None:
                torch.mm(x[a:b], w[e], out=hb)
            else:
                torch.addmm(bias[e], x[a:b], w[e], out=hb)
            if act != "none":
                _act_fwd_block(hb, out[a:b], act, save_h, n_out)
    _zero_unused(out, lo, hi)
    if not save_h or act == "none":
        return out, None
    _zero_unused(h, lo, hi)  # h is an output of the op too: fully defined
    return out, h


def _act_bwd_block(dout, h, act, dh):
    """dh = dout * act'(h) for one block of rows (dh: a (rows, N) tensor of h's dtype)."""
    if act != "swiglu":
        return _ACT_BWD[act](dout, h, dh)
    if _fused_swiglu(_SWIGLU_BWD, dout, h, dh):
        _SWIGLU_BWD(dout, h, dh)
        return dh
    f = dout.shape[1]
    g, u = h[:, :f], h[:, f:]
    # dgate = dout * u * silu'(g): silu_backward of (dout * u), in place (full overlap: elementwise);
    # dup = dout * silu(g), silu(g) recomputed into its half of dh (no temporary)
    dgate, dup = dh[:, :f], dh[:, f:]
    _ACT_BWD["silu"](torch.mul(dout, u, out=dgate), g, dgate)
    _ACT_OUT["silu"](g, dup).mul_(dout)
    return dh


def _bwd_torch(dout, x, w, offsets, h, act, need_dx, need_dw, need_dbias, off=None):
    e_count, n = w.shape[0], w.shape[2]
    off = offsets.tolist() if off is None else off
    lo, hi = off[0], off[-1]
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    g = _balanced(x, off)
    if g:
        dh = dout if act == "none" else _act_bwd_block(dout, h, act, torch.empty_like(h))
        dh3 = dh.view(e_count, g, n)
        x3 = x.view(e_count, g, x.shape[1])
        if need_dx:
            torch.bmm(dh3, w.transpose(1, 2), out=dx.view(e_count, g, x.shape[1]))
        dw = torch.bmm(x3.transpose(1, 2), dh3) if need_dw else x.new_empty(0)
        dbias = dh3.sum(1) if need_dbias else x.new_empty(0)
        return dx, dw, dbias
    dbias = torch.empty((e_count, n), dtype=x.dtype, device=x.device) if need_dbias else x.new_empty(0)
    # swiglu with few experts: the blocked schedule's dh scratch of one block instead of an (R, N) dh
    if (
        _whole(x, w, lo, hi, True)
        and (act != "none" or _aligned(dout))
        and not (act == "swiglu" and _few_experts(off))
    ):
        if act == "none":
            dh = dout
        else:
            dh = torch.empty_like(h)
            _act_bwd_block(dout[lo:hi], h[lo:hi], act, dh[lo:hi])
        if _grouped_c(x, off):
            if need_dx:
                _GROUPED_ROWS(dh, w.transpose(1, 2), None, off, dx)
            dw = torch.empty_like(w) if need_dw else x.new_empty(0)
            if need_dw:  # dbias in the same pass over dh
                _GROUPED_WGRAD(x, dh, off, dw, dbias if need_dbias else None)
                need_dbias = False
        else:
            if need_dx:
                dx = torch._grouped_mm(dh, w.transpose(1, 2), offs=offsets[1:])
            # the K-grouped form: a reduction over each expert's rows; zeros for an empty expert
            dw = torch._grouped_mm(x.transpose(0, 1), dh, offs=offsets[1:]) if need_dw else x.new_empty(0)
        if need_dbias:
            _expert_sums(dh, off, dbias)
    else:
        dw = torch.empty_like(w) if need_dw else x.new_empty(0)
        # 16-bit dw / dbias are not accumulated over row blocks (one rounding each, as in one GEMM)
        rpb = _rows_per_block(x, n) if x.dtype in (torch.float32, torch.float64) else max(
            1, max(b - a for a, b in itertools.pairwise(off)))  # fmt: skip
        scratch = None if act == "none" else torch.empty((_scratch_rows(off, rpb), n), dtype=x.dtype,
                                                           device=x.device)  # fmt: skip
        for e in range(e_count):
            if off[e] == off[e + 1]:
                if need_dw:
                    dw[e].zero_()
                if need_dbias:
                    dbias[e].zero_()
                continue
            for i, a in enumerate(range(off[e], off[e + 1], rpb)):
                b = min(a + rpb, off[e + 1])
                dh = dout[a:b] if act == "none" else _act_bwd_block(dout[a:b], h[a:b], act, scratch[: b - a])
                if need_dx:
                    torch.mm(dh, w[e].transpose(0, 1), out=dx[a:b])
                if need_dw:
                    if i == 0:
                        torch.mm(x[a:b].transpose(0, 1), dh, out=dw[e])
                    else:
                        dw[e].addmm_(x[a:b].transpose(0, 1), dh)
                if need_dbias:
                    if i == 0:
                        torch.sum(dh, 0, out=dbias[e])
                    else:
                        dbias[e].add_(dh.sum(0))
    if need_dx:
        _zero_unused(dx, lo, hi)
    return dx, dw, dbias


class _GroupedGemmC(torch.autograd.Function):
    """h = x_e @ w[e] (+ bias[e]) on fastgen._C's grouped kernels, every row used (offsets 0 .. R), for eager
    CPU calls with many experts that need a gradient; the activation then runs under torch's autograd, whose
    node frees h as soon as dh is made, before this node allocates dx and dw (peak memory as
    torch._grouped_mm's autograd path, not h + dh + dw at once)."""

    @staticmethod
    def forward(ctx, x, w, bias, off):
        h = x.new_empty((x.shape[0], w.shape[2]))
        _GROUPED_ROWS(x, w, bias, off, h)
        ctx.save_for_backward(x, w)
        ctx.off, ctx.has_bias = off, bias is not None
        return h

    @staticmethod
    def backward(ctx, dh):
        x, w = ctx.saved_tensors
        off = ctx.off
        dh = dh.contiguous()
        need_dx, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dx = dw = db = None
        if need_dx:
            dx = torch.empty_like(x)
            _GROUPED_ROWS(dh, w.transpose(1, 2), None, off, dx)
        if need_db:
            db = dh.new_empty((w.shape[0], w.shape[2]))
        if need_dw:  # db in the same pass over dh
            dw = torch.empty_like(w)
            _GROUPED_WGRAD(x, dh, off, dw, db)
        elif need_db:
            _expert_sums(dh, off, db)
        return dx, dw, db, None


class _GroupedMMCPU(torch.autograd.Function):
    """The torch backend on CPU tensors in eager mode, without the torch.library op's per-call wrapping
    (same functions, same results; torch.compile traces the library op instead). ``off``: host offsets."""

    @staticmethod
    def forward(ctx, x, w, offsets, bias, act, off):
        save_h = act != "none" and any(ctx.needs_input_grad[i] for i in (0, 1, 3))
        out, h = _fwd_torch(x, w, offsets, bias, act, save_h, off)
        ctx.save_for_backward(x, w, offsets, h)
        ctx.act, ctx.off, ctx.has_bias = act, off, bias is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w, offsets, h = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_dbias = ctx.has_bias and ctx.needs_input_grad[3]
        dx, dw, dbias = _bwd_torch(dout.contiguous(), x, w, offsets, h, ctx.act, need_dx, need_dw, need_dbias,
                                   ctx.off)  # fmt: skip
        return _input_grads(dx, dw, dbias, need_dx, need_dw, need_dbias)


# =====================================================================================================
# The whole expert FFN of an MoE layer on CPU: gather, two GEMMs and combine per block of rows
# =====================================================================================================
# For tokens x (T, d) routed by a Routing (dest, src, offsets) with gates (T, k), expert e's rows
# r in [off[e], off[e + 1]) hold the assignment a = src[r] (token a // k, gate gates.flat[a]) and
#
#     y[t] = sum_{j kept} gates[t, j] * o[dest[t, j]],  o[r] = act(x[a // k] @ w1[e] + b1[e]) @ w2[e] + b2[e]
#
# which is moe_unpermute(grouped_mm(grouped_mm(moe_permute(x), w1, act), w2), gates). Run block by block
# (see _ffn_blocks: one expert, or several small ones for torch._grouped_mm), the (T*k, d) permuted buffer,
# the (T*k, d_ff) activations and the (T*k, d) expert outputs are never materialised: a block's rows are
# gathered from x (C++), go through both GEMMs while in cache and are added into y with their gates (C++, threads split the columns:
# deterministic). Saved for the backward (only when a gradient is needed): the pre-activation h of the used
# rows, and o only when the gates need a gradient (dgates[t, j] = <dy[t], o[dest[t, j]]>); act(h) and the
# gathered x rows are recomputed per block. Peak memory is thus below a plain loop over experts, which keeps
# every expert's gathered x, h, act(h) and o for autograd.

_HALF = (torch.float16, torch.bfloat16)


class _Block(NamedTuple):
    """Rows [a, b) of experts e0 .. e1 - 1 (whole experts when e1 - e0 > 1: one torch._grouped_mm call;
    else all or part of expert e0: torch.mm / addmm). offs / onehot: for grouped blocks, the experts' end
    rows relative to a (int32) and the (rows, e1 - e0) one-hot of each row's expert in x's dtype: the
    biases are added as h += onehot @ bias[e0:e1] and summed as onehot^T @ dh (GEMMs: no (rows, N) bias
    temporary, deterministic)."""

    e0: int
    e1: int
    a: int
    b: int
    offs: torch.Tensor | None
    onehot: torch.Tensor | None
    host_offs: list[int] | None = None  # grouped blocks: [0, *offs] on the host


def _ffn_blocks(off: list[int], x: torch.Tensor, d: int, n1: int, f: int) -> list[_Block]:
    """Whole experts, one GEMM call each, as a plain loop makes, unless an expert's h would pass
    _FFN_BLOCK_BYTES (then blocks of that size; 16-bit weight gradients are then accumulated over blocks in
    their own dtype). Small experts (on average < _FFN_GROUP_MIN_ROWS rows) are grouped into blocks of up to
    _FFN_GROUP_BYTES of h served by torch._grouped_mm, where torch has it for the dtype and every GEMM
    operand is 16-byte aligned, and there are at least _FFN_GROUP_MIN_EXPERTS experts with rows: one call
    instead of one per expert."""
    e_count = len(off) - 1
    elsize = x.element_size()
    cap = max(16, _FFN_BLOCK_BYTES // max(1, n1 * elsize))
    used = [e for e in range(e_count) if off[e + 1] > off[e]]
    align = 16 // elsize
    group = (
        _HAS_TORCH_GMM
        and x.dtype in _GMM_DTYPES
        and len(used) >= _FFN_GROUP_MIN_EXPERTS
        and (off[-1] - off[0]) < _FFN_GROUP_MIN_ROWS * len(used)
        and not (d % align or n1 % align or f % align)
    )
    gcap = max(16, _FFN_GROUP_BYTES // max(1, n1 * elsize))
    blocks, e = [], 0
    while e < e_count:
        a = off[e]
        if off[e + 1] == a:
            e += 1
            continue
        if group and off[e + 1] - a <= gcap:
            e1 = e + 1
            while e1 < e_count and off[e1 + 1] - a <= gcap:
                e1 += 1
            if e1 - e > 1:
                host = [off[j] - a for j in range(e, e1 + 1)]
                ends = torch.tensor(host[1:], dtype=torch.int32)
                counts = torch.tensor(host).diff()
                local = torch.repeat_interleave(torch.arange(e1 - e), counts)
                onehot = torch.nn.functional.one_hot(local, e1 - e).to(x.dtype)
                blocks.append(_Block(e, e1, a, off[e1], ends, onehot, host))
                e = e1
                continue
        for r in range(a, off[e + 1], cap):
            blocks.append(_Block(e, e + 1, r, min(r + cap, off[e + 1]), None, None))
        e += 1
    return blocks


_FFN_BLOCK_BYTES = 1 << 23
_FFN_GROUP_BYTES = 1 << 19
_FFN_GROUP_MIN_ROWS = 128
_FFN_GROUP_MIN_EXPERTS = 8  # fewer experts: one GEMM call each costs little, and a block holds one


def _gemm(xb, w, bias, blk: _Block, out=None):
    """xb @ w[e] (+ bias[e]) for the rows of each expert of the block; w: (E, K, N) or its transpose view."""
    if blk.offs is None:
        e = blk.e0
        if bias is None:
            return torch.mm(xb, w[e], out=out) if out is not None else torch.mm(xb, w[e])
        return torch.addmm(bias[e], xb, w[e], out=out) if out is not None else torch.addmm(bias[e], xb, w[e])
    if _GROUPED_ROWS is not None:  # into out when it has the rows (scratch), bias fused
        h = (
            out
            if out is not None and out.shape[0] == xb.shape[0]
            else xb.new_empty((xb.shape[0], w.shape[2]))
        )
        _GROUPED_ROWS(
            xb, w[blk.e0 : blk.e1], None if bias is None else bias[blk.e0 : blk.e1], blk.host_offs, h
        )
        return h
    h = torch._grouped_mm(xb, w[blk.e0 : blk.e1], offs=blk.offs)
    if bias is not None:
        h.addmm_(blk.onehot, bias[blk.e0 : blk.e1])
    return h


def _wgrad(out, a_t, g, blk: _Block, first: bool):
    """out[e] (+)= a_t @ g over the rows of each expert of the block (a_t: (K, rows), g: (rows, N))."""
    if blk.offs is None:
        if first:
            torch.mm(a_t, g, out=out[blk.e0])
        else:
            out[blk.e0].addmm_(a_t, g)
    elif _GROUPED_WGRAD is not None:  # grouped blocks hold whole experts: written, zeros for empty ones
        _GROUPED_WGRAD(a_t.transpose(0, 1), g, blk.host_offs, out[blk.e0 : blk.e1], None)
    else:  # one mm per expert straight into its out[e] (torch._grouped_mm's result would need a copy)
        for e, (s, t) in enumerate(itertools.pairwise(blk.host_offs), blk.e0):
            if t > s:
                torch.mm(a_t[:, s:t], g[s:t], out=out[e])
            else:
                out[e].zero_()


def _bgrad(out, g, blk: _Block, first: bool):
    if blk.offs is None:
        if first:
            torch.sum(g, 0, out=out[blk.e0])
        else:
            out[blk.e0].add_(g.sum(0))
    else:
        torch.mm(blk.onehot.transpose(0, 1), g, out=out[blk.e0 : blk.e1])


def _ffn_fwd(x, gates, w1, b1, w2, b2, dest, src, off, act, train: bool, keep_o: bool):
    """y, and for the backward: (train) the blocks and their pre-activations h, (keep_o) o of the used
    rows."""
    t, d = x.shape
    k = dest.shape[1]
    n1, f = w1.shape[2], w2.shape[1]
    acc = torch.promote_types(x.dtype, torch.float32)
    gw = gates.reshape(-1).to(acc).contiguous()
    y = torch.zeros((t, d), dtype=acc if x.dtype in _HALF else x.dtype)
    blocks = _ffn_blocks(off, x, d, n1, f)
    rows = max((blk.b - blk.a for blk in blocks), default=1)
    # scratch for the GEMM outputs (of one-expert blocks only when torch._grouped_mm serves grouped ones: it
    # returns its own)
    grouped_c = _GROUPED_ROWS is not None
    out_rows = max((blk.b - blk.a for blk in blocks if blk.offs is None or grouped_c), default=0)
    new = x.new_empty
    o_all = new((off[-1], d)) if keep_o else None
    xb_s = new((rows, d))
    h_s = None if train else new((out_rows, n1))
    a_s = new((rows, f)) if act != "none" and (train or act == "swiglu") else None
    o_s = None if keep_o else new((out_rows, d))
    hs = []
    for blk in blocks:
        n, s = blk.b - blk.a, src[blk.a : blk.b]
        xb = _ext.C.moe_gather_cpu(x, s, None, k, xb_s[:n])
        hb = _gemm(xb, w1, b1, blk, None if train else h_s[:n])
        if train:
            hs.append(hb)
        if act == "none":
            ab = hb
        else:
            ab = hb if a_s is None else a_s[:n]
            _act_fwd_block(hb, ab, act, train, f)
        dest = o_all[blk.a : blk.b] if keep_o else o_s[:n]
        ob = _gemm(ab, w2, b2, blk, dest)
        if keep_o and ob is not dest:
            dest.copy_(ob)
        _ext.C.moe_scatter_add_cpu(y, ob, s, gw, k)
    return y.to(x.dtype), (blocks, hs), o_all


class _MoEFFNCPU(torch.autograd.Function):
    """y = combine(gates, FFN(gather(x))) on CPU tensors, block by block (see the section comment)."""

    @staticmethod
    def forward(ctx, x, gates, w1, b1, w2, b2, dest, src, off, act):
        # only called when a gradient is needed (moe_experts_cpu runs _ffn_fwd directly otherwise)
        y, (blocks, hs), o_all = _ffn_fwd(
            x, gates, w1, b1, w2, b2, dest, src, off, act, True, ctx.needs_input_grad[1]
        )
        ctx.save_for_backward(x, gates, w1, b1, w2, b2, dest, src, o_all, *hs)
        ctx.off, ctx.act, ctx.blocks = off, act, blocks
        return y

    @staticmethod
    def backward(ctx, dy):
        x, gates, w1, b1, w2, b2, dest, src, o_all, *hs = ctx.saved_tensors
        act, blocks = ctx.act, ctx.blocks
        need_x, need_g, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:6]
        dy = dy.contiguous()
        t, d = x.shape
        k = dest.shape[1]
        f = w2.shape[1]
        acc = torch.promote_types(x.dtype, torch.float32)
        dgates = _ext.C.moe_gate_grad_cpu(dy, o_all, dest).to(gates.dtype) if need_g else None
        gw = gates.reshape(-1).to(acc).contiguous()
        dx = torch.zeros((t, d), dtype=acc if x.dtype in _HALF else x.dtype) if need_x else None
        grads = [
            torch.empty_like(p) if need else None
            for p, need in zip((w1, b1, w2, b2), ctx.needs_input_grad[2:6])
        ]
        dw1, db1, dw2, db2 = grads
        for e in range(w1.shape[0]):  # experts without rows; every other entry is written by its blocks
            if ctx.off[e] == ctx.off[e + 1]:
                for g in grads:
                    if g is not None:
                        g[e].zero_()
        rows = max((blk.b - blk.a for blk in blocks), default=1)
        new = x.new_empty
        do_s, xb_s = new((rows, d)), new((rows, d))
        a_s = new((rows, f)) if act != "none" else None
        inner = need_x or need_w1 or need_b1
        last = -1
        for blk, hb in zip(blocks, hs, strict=True):
            first = blk.e0 != last  # the first block of its expert(s): write, not accumulate
            last = blk.e0
            n, s = blk.b - blk.a, src[blk.a : blk.b]
            dob = _ext.C.moe_gather_cpu(dy, s, gw, k, do_s[:n])  # gates[a] * dy[a // k]
            if need_w2:
                if act == "none":
                    ab = hb
                else:
                    ab = a_s[:n]
                    _act_fwd_block(hb, ab, act, True, f)
                _wgrad(dw2, ab.transpose(0, 1), dob, blk, first)
            if need_b2:
                _bgrad(db2, dob, blk, first)
            if not inner:
                continue
            dab = _gemm(dob, w2.transpose(1, 2), None, blk)
            if act == "none":
                dhb = dab
            elif act == "swiglu":
                dhb = _act_bwd_block(dab, hb, act, torch.empty_like(hb))
            else:
                dhb = _ACT_BWD[act](dab, hb, dab)  # in place: one elementwise pass
            if need_w1:
                xb = _ext.C.moe_gather_cpu(x, s, None, k, xb_s[:n])
                _wgrad(dw1, xb.transpose(0, 1), dhb, blk, first)
            if need_b1:
                _bgrad(db1, dhb, blk, first)
            if need_x:
                _ext.C.moe_scatter_add_cpu(dx, _gemm(dhb, w1.transpose(1, 2), None, blk), s, None, k)
        if dx is not None:
            dx = dx.to(x.dtype)
        return dx, dgates, dw1, db1, dw2, db2, None, None, None, None


def moe_experts_cpu_usable(x: torch.Tensor) -> bool:
    """Whether :func:`moe_experts_cpu` serves a layer call on ``x``: a plain eager CPU call, fastgen._C
    built, and no backend forced away from the CPU paths (grouped_mm: torch, moe_permute: cpp)."""
    return (
        x.device.type == "cpu"
        and _ext.C is not None
        and _backend.plain_eager(x)
        and OP.forced_backend() in (None, "torch")
        and _backend.forced_backend("moe_permute") in (None, "cpp")
    )


def moe_experts_cpu(x, routing, gates, w1, b1, w2, b2, activation: str | None) -> torch.Tensor:
    """The expert FFN of a top-k MoE layer on CPU, from tokens to combined outputs (differentiable in x,
    gates, w1, b1, w2, b2): ``moe_unpermute(grouped_mm(grouped_mm(moe_permute(x, routing), w1, bias=b1,
    activation=activation), w2, bias=b2), routing, gates)`` without the padded buffers.

    x: (T, d); routing: a Routing of (T, k) assignments from moe_route (trusted: the caller made it);
    gates: (T, k); w1: (E, d, N1) (N1 = 2F for swiglu, else F), b1: (E, N1) or None; w2: (E, F, d), b2:
    (E, d) or None. Returns (T, d) in x's dtype; tokens with no kept assignment get zeros."""
    off = routing.offsets.tolist()
    act = "none" if activation is None else activation
    args = (
        x.contiguous(),
        gates,
        w1,
        b1,
        w2,
        b2,
        routing.dest.contiguous(),
        routing.src.contiguous(),
        off,
        act,
    )
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, gates, w1, b1, w2, b2)):
        return _MoEFFNCPU.apply(*args)
    return _ffn_fwd(*args, False, False)[0]


# =====================================================================================================
# Triton kernels
# =====================================================================================================
# ACT ids (constexpr): 0 none, 1 relu, 2 gelu (erf), 3 gelu_tanh, 4 silu, 5 swiglu.
# gelu_tanh uses 0.5 * (1 + tanh(z)) = sigmoid(2z): no tanh (libdevice) needed, same on triton 3.6 .. 3.9.

if triton is not None:

    @triton.jit
    def _act_fwd(h, ACT: tl.constexpr):
        if ACT == 1:
            h = tl.maximum(h, 0.0)
        elif ACT == 2:
            h = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
        elif ACT == 3:
            h = h * tl.sigmoid(1.5957691216057308 * (h + 0.044715 * h * h * h))
        elif ACT == 4:
            h = h * tl.sigmoid(h)
        return h

    @triton.jit
    def _gmm_fwd_kernel(
        X, W, Bias, Out, H, Offs, TileStart,
        R, K, NO, E, num_m_tiles,
        sxm, sxk, swe, swk, swn, sbe, sbn, som, son, shm, shn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
        GROUP_M: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_H: tl.constexpr,
        EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """out[rows of e, n tile] = act(x_e @ w[e] + bias[e]); NO = N (F for swiglu: the program also
        computes the up tile at columns NO + n). Row tiles past the experts' write the unused rows' zeros."""
        pid = tl.program_id(0)
        num_n = tl.cdiv(NO, BLOCK_N)
        # group GROUP_M row tiles per column sweep: their w[e] tiles stay in L2
        width = GROUP_M * num_n
        first_m = (pid // width) * GROUP_M
        group_size = tl.minimum(num_m_tiles - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % group_size
        pid_n = (pid % width) // group_size
        rm = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < NO
        total = tl.load(TileStart + E)
        if pid_m < total:
            # expert = number of tile-prefix entries <= pid_m, minus one (empty experts repeat an entry)
            eidx = tl.arange(0, BLOCK_E)
            ts = tl.load(TileStart + eidx, mask=eidx < E, other=total + 1)
            e = tl.sum((ts <= pid_m).to(tl.int32), axis=0) - 1
            row_end = tl.load(Offs + e + 1)
            offs_m = tl.load(Offs + e) + (pid_m - tl.load(TileStart + e)) * BLOCK_M + rm
            mmask = offs_m < row_end
            # rows past the expert's end read its last row (no mask on x) and are not stored
            xrow = tl.minimum(offs_m, row_end - 1).to(tl.int64)
            e64 = e.to(tl.int64)
            xp = X + xrow[:, None] * sxm
            wp = W + e64 * swe + offs_n[None, :] * swn
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if ACT == 5:
                acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                if EVEN_K:
                    a = tl.load(xp + offs_k[None, :] * sxk)
                    b = tl.load(wp + offs_k[:, None] * swk, mask=nmask[None, :], other=0.0)
                else:
                    kmask = offs_k < K
                    a = tl.load(xp + offs_k[None, :] * sxk, mask=kmask[None, :], other=0.0)
                    b = tl.load(wp + offs_k[:, None] * swk, mask=kmask[:, None] & nmask[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
                if ACT == 5:
                    if EVEN_K:
                        b2 = tl.load(wp + NO * swn + offs_k[:, None] * swk, mask=nmask[None, :], other=0.0)
                    else:
                        b2 = tl.load(wp + NO * swn + offs_k[:, None] * swk,
                                     mask=kmask[:, None] & nmask[None, :], other=0.0)  # fmt: skip
                    acc2 = tl.dot(a, b2, acc2, input_precision=PRECISION)
            if HAS_BIAS:
                bp = Bias + e64 * sbe + offs_n * sbn
                acc += tl.load(bp, mask=nmask, other=0.0).to(tl.float32)[None, :]
                if ACT == 5:
                    acc2 += tl.load(bp + NO * sbn, mask=nmask, other=0.0).to(tl.float32)[None, :]
            smask = mmask[:, None] & nmask[None, :]
            om = offs_m.to(tl.int64)[:, None]
            if STORE_H:
                hp = H + om * shm + offs_n[None, :] * shn
                tl.store(hp, acc.to(H.dtype.element_ty), mask=smask)
                if ACT == 5:
                    tl.store(hp + NO * shn, acc2.to(H.dtype.element_ty), mask=smask)
            if ACT == 5:
                y = acc * tl.sigmoid(acc) * acc2
            else:
                y = _act_fwd(acc, ACT)
            tl.store(Out + om * som + offs_n[None, :] * son, y.to(Out.dtype.element_ty), mask=smask)
        else:
            # zero tiles: first the rows before offsets[0], then those from offsets[E] to R
            z = pid_m - total
            off0 = tl.load(Offs)
            head = tl.cdiv(off0, BLOCK_M)
            is_head = z < head
            offs_m = tl.where(is_head, z * BLOCK_M, tl.load(Offs + E) + (z - head) * BLOCK_M) + rm
            lim = tl.where(is_head, off0, R)
            smask = (offs_m < lim)[:, None] & nmask[None, :]
            zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=Out.dtype.element_ty)
            om = offs_m.to(tl.int64)[:, None]
            tl.store(Out + om * som + offs_n[None, :] * son, zero, mask=smask)
            if STORE_H:  # h is an output of the op too: fully defined
                tl.store(H + om * shm + offs_n[None, :] * shn, zero.to(H.dtype.element_ty), mask=smask)
                if ACT == 5:
                    tl.store(
                        H + om * shm + (offs_n + NO)[None, :] * shn, zero.to(H.dtype.element_ty), mask=smask
                    )

    @triton.jit
    def _act_bwd_kernel(
        DOut, H, DH, Offs, E, NO,
        sdm, sdn, shm, shn, sgm, sgn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACT: tl.constexpr,
    ):  # fmt: skip
        """dh = dout * act'(h) on the used rows [offsets[0], offsets[E]) (the others are never read).
        swiglu: dh[:, n] = dout u silu'(g), dh[:, NO + n] = dout silu(g) with g = h[:, n], u = h[:, NO + n]."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask = (offs_m >= tl.load(Offs)) & (offs_m < tl.load(Offs + E))
        mask = mmask[:, None] & (offs_n < NO)[None, :]
        om = offs_m.to(tl.int64)[:, None]
        do = tl.load(DOut + om * sdm + offs_n[None, :] * sdn, mask=mask, other=0.0).to(tl.float32)
        hp = H + om * shm + offs_n[None, :] * shn
        h = tl.load(hp, mask=mask, other=0.0).to(tl.float32)
        gp = DH + om * sgm + offs_n[None, :] * sgn
        if ACT == 5:
            u = tl.load(hp + NO * shn, mask=mask, other=0.0).to(tl.float32)
            s = tl.sigmoid(h)
            tl.store(gp, (do * u * s * (1.0 + h * (1.0 - s))).to(DH.dtype.element_ty), mask=mask)
            tl.store(gp + NO * sgn, (do * h * s).to(DH.dtype.element_ty), mask=mask)
        else:
            if ACT == 1:
                d = tl.where(h > 0, 1.0, 0.0)
            elif ACT == 2:
                d = (
                    0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
                    + h * tl.exp(-0.5 * h * h) * 0.3989422804014327
                )
            elif ACT == 3:
                s = tl.sigmoid(1.5957691216057308 * (h + 0.044715 * h * h * h))
                d = s + 2.0 * h * s * (1.0 - s) * 0.7978845608028654 * (1.0 + 0.134145 * h * h)
            else:
                s = tl.sigmoid(h)
                d = s * (1.0 + h * (1.0 - s))
            tl.store(gp, (do * d).to(DH.dtype.element_ty), mask=mask)

    @triton.jit
    def _gmm_wgrad_kernel(
        X, DH, DW, DB, Offs, K, N,
        sxm, sxk, sgm, sgn, swe, swk, swn, sbe, sbn,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DB: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        """dw[e, k tile, n tile] = x_e^T @ dh_e, looping over expert e's rows (zeros when it has none);
        the programs of the first K tile also write dbias[e, n tile] = sum of dh_e's rows."""
        pid = tl.program_id(0)
        e = tl.program_id(1)
        num_n = tl.cdiv(N, BLOCK_N)
        pid_k = pid // num_n
        pid_n = pid % num_n
        start = tl.load(Offs + e)
        end = tl.load(Offs + e + 1)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kmask = offs_k < K
        nmask = offs_n < N
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        dbacc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for i in range(0, tl.cdiv(end - start, BLOCK_M)):
            offs_m = start + i * BLOCK_M + tl.arange(0, BLOCK_M)
            mmask = offs_m < end
            om = offs_m.to(tl.int64)
            a = tl.load(X + om[:, None] * sxm + offs_k[None, :] * sxk, mask=mmask[:, None] & kmask[None, :],
                        other=0.0)  # fmt: skip
            g = tl.load(DH + om[:, None] * sgm + offs_n[None, :] * sgn, mask=mmask[:, None] & nmask[None, :],
                        other=0.0)  # fmt: skip
            acc = tl.dot(tl.trans(a), g, acc, input_precision=PRECISION)
            if HAS_DB:
                dbacc += tl.sum(g.to(tl.float32), axis=0)
        e64 = e.to(tl.int64)
        tl.store(DW + e64 * swe + offs_k[:, None] * swk + offs_n[None, :] * swn, acc.to(DW.dtype.element_ty),
                 mask=kmask[:, None] & nmask[None, :])  # fmt: skip
        if HAS_DB:
            tl.store(
                DB + e64 * sbe + offs_n * sbn,
                dbacc.to(DB.dtype.element_ty),
                mask=nmask & (offs_n * 0 + pid_k == 0),
            )


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _fwd_config(dtype: torch.dtype, mean_rows: float, swiglu: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for H100; small blocks under the interpreter."""
    if _backend.triton_interpret():
        return 16, 16, 16, 4, 1
    bm = 64 if mean_rows < 128 else 128  # few rows per expert: less padding waste in the last tile
    if dtype == torch.float32:
        return bm, 32 if swiglu else 64, 32, 8 if bm == 128 else 4, 3
    # swiglu keeps two accumulators: half the N tile for the same registers
    return bm, 64 if swiglu else 128, 64, 8 if bm == 128 else 4, 3 if swiglu else 4


def _wgrad_config(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M (rows reduced), BLOCK_K, BLOCK_N, num_warps, num_stages)."""
    if _backend.triton_interpret():
        return 16, 16, 16, 4, 1
    if dtype == torch.float32:
        return 32, 64, 64, 4, 3
    return 64, 128, 128, 8, 3


def _gmm_launch(x, w_strides, k, n_out, offsets, out, *, e, bias=None, h=None, act="none", mean_rows=1.0):
    """out = act(grouped x @ w + bias) with w given by its (expert, k, n) strides; one launch."""
    r = x.shape[0]
    if r == 0 or n_out == 0:
        return out
    bm, bn, bk, warps, stages = _fwd_config(x.dtype, mean_rows, act == "swiglu")
    # tile prefix on the device (no host sync): tile_start[e] = sum of cdiv(rows_j, BLOCK_M) for j < e
    tiles = torch.div(offsets[1:] - offsets[:-1] + (bm - 1), bm, rounding_mode="floor")
    tile_start = torch.nn.functional.pad(torch.cumsum(tiles, 0, dtype=torch.int32), (1, 0))
    num_m_tiles = triton.cdiv(r, bm) + e + 2  # >= expert tiles + unused-row tiles
    grid = (num_m_tiles * triton.cdiv(n_out, bn),)
    bias_t = bias if bias is not None else x
    h_t = h if h is not None else out
    _gmm_fwd_kernel[grid](
        x, w_strides[0], bias_t, out, h_t, offsets, tile_start,
        r, k, n_out, e, num_m_tiles,
        x.stride(0), x.stride(1), *w_strides[1:],
        *(bias.stride() if bias is not None else (0, 0)), out.stride(0), out.stride(1),
        *(h.stride() if h is not None else (0, 0)),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_E=max(16, triton.next_power_of_2(e)), GROUP_M=8,
        ACT=_ACT_ID[act], HAS_BIAS=bias is not None, STORE_H=h is not None, EVEN_K=k % bk == 0,
        PRECISION=_precision(x.dtype), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def _fwd_triton(x, w, offsets, bias, act, save_h):
    r, k = x.shape
    e, _, n = w.shape
    n_out = n // 2 if act == "swiglu" else n
    out = torch.empty((r, n_out), dtype=x.dtype, device=x.device)
    h = torch.empty((r, n), dtype=x.dtype, device=x.device) if save_h else None
    _gmm_launch(x, (w, w.stride(0), w.stride(1), w.stride(2)), k, n_out, offsets, out, e=e, bias=bias, h=h,
                act=act, mean_rows=r / max(e, 1))  # fmt: skip
    return out, (h if h is not None else x.new_empty(0))


def _bwd_triton(dout, x, w, offsets, h, act, need_dx, need_dw, need_dbias):
    r, k = x.shape
    e, _, n = w.shape
    if act == "none":
        dh = dout
    else:
        dh = torch.empty((r, n), dtype=x.dtype, device=x.device)
        n_out = dout.shape[1]
        if r and n_out:
            _act_bwd_kernel[(triton.cdiv(r, 64), triton.cdiv(n_out, 64))](
                dout, h, dh, offsets, e, n_out, *dout.stride(), *h.stride(), *dh.stride(),
                BLOCK_M=64, BLOCK_N=64, ACT=_ACT_ID[act],
            )  # fmt: skip
    dx, dw, dbias = x.new_empty(0), x.new_empty(0), x.new_empty(0)  # distinct: outputs must not alias
    if need_dx:
        # dx = dh @ w[e]^T: the forward kernel on w's transposed strides (reduction over N)
        dx = torch.empty_like(x)
        _gmm_launch(dh, (w, w.stride(0), w.stride(2), w.stride(1)), n, k, offsets, dx, e=e,
                    mean_rows=r / max(e, 1))  # fmt: skip
    if need_dw or need_dbias:
        dw_t = torch.empty_like(w) if need_dw else None
        dbias = torch.empty((e, n), dtype=x.dtype, device=x.device) if need_dbias else dbias
        bm, bk, bn, warps, stages = _wgrad_config(x.dtype)
        if need_dw:
            kk = k
        else:  # dbias only: one K tile of a dummy width
            kk = 0
        if e and n:
            dw_arg = dw_t if dw_t is not None else torch.empty((e, 0, n), dtype=x.dtype, device=x.device)
            grid = (max(1, triton.cdiv(kk, bk)) * triton.cdiv(n, bn), e)
            _gmm_wgrad_kernel[grid](
                x, dh, dw_arg, dbias if need_dbias else dw_arg, offsets, kk, n,
                *x.stride(), *dh.stride(), *dw_arg.stride(), *(dbias.stride() if need_dbias else (0, 0)),
                BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bn, HAS_DB=need_dbias, PRECISION=_precision(x.dtype),
                num_warps=warps, num_stages=stages,
            )  # fmt: skip
        elif need_dw:
            dw_t.zero_()
        if need_dw:
            dw = dw_t
    return dx, dw, dbias


# =====================================================================================================
# Backends and the torch.library ops
# =====================================================================================================


OP.register("triton", devices=("cuda",), dtypes=KERNEL_DTYPES, available=_backend.triton_available,
            check=_backend.triton_check(experts=MAX_EXPERTS), forced_only_devices=("cpu",),
            note="one launch over all experts, device-side tile schedule; fused bias + activation")(_fwd_triton)  # fmt: skip
_TORCH_DTYPES = (*KERNEL_DTYPES, torch.float64)


def _op_outputs(x, out, h):
    """The library op's (out, h): h a distinct empty tensor when not kept (outputs must not be None)."""
    return out, (h if h is not None else x.new_empty(0))


OP.register("torch", devices=("cpu", "cuda", "mps", "xpu"), dtypes=_TORCH_DTYPES,
            note="torch._grouped_mm or mm(out=) per expert, fused activation (host reads the offsets)")(
    lambda x, w, offsets, bias, act, save_h: _op_outputs(x, *_fwd_torch(x, w, offsets, bias, act, save_h)))  # fmt: skip
_BWD = {"triton": _bwd_triton, "torch": _bwd_torch}


def _input_grads(dx, dw, dbias, need_dx: bool, need_dw: bool, need_dbias: bool) -> tuple:
    """The backward's gradients in the forward's argument order (x, w, offsets, bias, activation, ...)."""
    return (
        (dx if need_dx else None),
        (dw if need_dw else None),
        None,
        (dbias if need_dbias else None),
        None,
        None,
    )


def _call(x: torch.Tensor, w: torch.Tensor) -> Call:
    return Call(x.device, x.dtype, {"experts": w.shape[0], "k": w.shape[1], "n": w.shape[2]})


@torch.library.custom_op("fastgen::grouped_mm_fwd", mutates_args=())
def _grouped_mm_fwd_op(
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    save_h: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    backend = OP.dispatch(_call(x, w))
    return backend.fn(x, w, offsets, bias, activation, save_h)


@_grouped_mm_fwd_op.register_fake
def _(x, w, offsets, bias, activation, save_h):
    n = w.shape[2]
    out = x.new_empty((x.shape[0], n // 2 if activation == "swiglu" else n))
    h = x.new_empty((x.shape[0], n)) if save_h else x.new_empty(0)
    return out, h


@torch.library.custom_op("fastgen::grouped_mm_bwd", mutates_args=())
def _grouped_mm_bwd_op(
    dout: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    h: torch.Tensor,
    activation: str,
    need_dx: bool,
    need_dw: bool,
    need_dbias: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # the backend that ran the forward (chosen when it ran: a forced backend may be out of scope by now)
    return _BWD[backend](dout, x, w, offsets, h, activation, need_dx, need_dw, need_dbias)


@_grouped_mm_bwd_op.register_fake
def _(dout, x, w, offsets, h, activation, need_dx, need_dw, need_dbias, backend):
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    dw = torch.empty_like(w) if need_dw else x.new_empty(0)
    dbias = x.new_empty((w.shape[0], w.shape[2])) if need_dbias else x.new_empty(0)
    return dx, dw, dbias


def _setup_context(ctx, inputs, output):
    x, w, offsets, bias, activation, _save_h = inputs
    _, h = output
    ctx.save_for_backward(x, w, offsets, bias, h)
    ctx.activation = activation
    ctx.has_bias = bias is not None
    ctx.backend = OP.dispatch(_call(x, w)).name
    ctx.set_materialize_grads(False)  # no zero-filled (R, N) gradient for the h output, never used


def _backward(ctx, dout, dh_unused):
    x, w, offsets, bias, h = ctx.saved_tensors
    if dout is None:  # out did not reach the loss
        return None, None, None, None, None, None
    act = ctx.activation
    if act != "none" and h.numel() == 0 and h.numel() != x.shape[0] * w.shape[2]:
        # the forward ran without saving the pre-activation (no input required grad then): recompute it
        h = _grouped_mm_fwd_op(x, w, offsets, bias, "none", False)[0]
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_dbias = ctx.has_bias and ctx.needs_input_grad[3]
    dx, dw, dbias = _grouped_mm_bwd_op(
        dout.contiguous(), x, w, offsets, h, act, need_dx, need_dw, need_dbias, ctx.backend
    )
    return _input_grads(dx, dw, dbias, need_dx, need_dw, need_dbias)


_grouped_mm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# =====================================================================================================
# Public API
# =====================================================================================================


def _check_tensor(name: str, t, dims: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise _err(f"{name} must be a tensor {layout}, got {type(t).__name__}")
    if t.dim() != dims:
        raise _err(f"{name} must be {dims}-D {layout}, got shape {tuple(t.shape)}")


def _check_offsets(offsets: torch.Tensor, rows: int) -> tuple[torch.Tensor, list[int] | None]:
    """Checked in the caller's dtype, THEN narrowed to the kernels' int32: int64 offsets past 2^31 would
    wrap to small, plausible values (2^32 + 1 -> 1) and pass a check made after the cast."""
    if rows >= 2**31:
        raise _err(f"x has R = {rows} rows; at most 2^31 - 1 (the offsets are int32)")
    off = None
    if offsets.is_cpu and not torch.compiler.is_compiling():
        off = offsets.tolist()
        if off[0] < 0 or off[-1] > rows or off != sorted(off):  # sorted: one C call, no per-pair Python
            raise _err(f"offsets must be non-decreasing with 0 <= offsets[0] and offsets[E] <= R = {rows}, "
                       f"got {off}")  # fmt: skip
    else:
        # on the device, without a host sync (a CUDA failure surfaces at the next synchronisation)
        torch._assert_async(offsets[0] >= 0, "fastgen.grouped_mm: offsets[0] must be >= 0")
        torch._assert_async(offsets[-1] <= rows, "fastgen.grouped_mm: offsets[E] must be <= R (rows of x)")
        if offsets.numel() > 1:
            torch._assert_async(
                (offsets[1:] - offsets[:-1]).min() >= 0, "fastgen.grouped_mm: offsets must be non-decreasing"
            )
    narrow = offsets if offsets.dtype == torch.int32 else offsets.to(torch.int32)
    return narrow, off  # exact once 0 <= offsets <= R < 2^31 holds; off: host list (CPU)


def grouped_mm(
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """Grouped GEMM over experts with a fused bias and activation (see the module docstring for the math).

    x: (R, K) rows grouped by expert; w: (E, K, N); offsets: (E + 1,) int32 (or int64) on x's device,
    expert e's rows are [offsets[e], offsets[e + 1]) (rows outside [offsets[0], offsets[E]) get zeros);
    bias: (E, N) or None; activation: one of ``ACTIVATIONS`` (swiglu needs an even N = 2F).
    Returns (R, N), or (R, F) for swiglu, in x's dtype (float32 accumulation; float32 inputs use IEEE
    products unless ``torch.backends.cuda.matmul.allow_tf32``). Differentiable w.r.t. x, w and bias.
    """
    _check_tensor("x", x, 2, "(R, K)")
    _check_tensor("w", w, 3, "(E, K, N)")
    _check_tensor("offsets", offsets, 1, "(E + 1,)")
    if activation not in ACTIVATIONS:
        raise _err(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not x.is_floating_point():
        raise _err(f"x must be floating point, got {x.dtype}")
    if w.dtype != x.dtype:
        raise _err(f"w must have x's dtype {x.dtype}, got {w.dtype}")
    if w.device != x.device:
        raise _err(f"w must be on x's device {x.device}, got {w.device}")
    if w.shape[1] != x.shape[1]:
        raise _err(f"w: (E, K, N) must have K = x.shape[1] = {x.shape[1]}, got w shape {tuple(w.shape)}")
    e = w.shape[0]
    if offsets.dtype not in (torch.int32, torch.int64):
        raise _err(f"offsets must be int32 (or int64), got {offsets.dtype}")
    if offsets.device != x.device:
        raise _err(f"offsets must be on x's device {x.device}, got {offsets.device}")
    if offsets.shape[0] != e + 1:
        raise _err(f"offsets must have E + 1 = {e + 1} entries (E = w.shape[0]), got {offsets.shape[0]}")
    if bias is not None:
        _check_tensor("bias", bias, 2, "(E, N)")
        if tuple(bias.shape) != (e, w.shape[2]):
            raise _err(f"bias must be (E, N) = {(e, w.shape[2])}, got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise _err(f"bias must have x's dtype {x.dtype}, got {bias.dtype}")
        if bias.device != x.device:
            raise _err(f"bias must be on x's device {x.device}, got {bias.device}")
    if activation == "swiglu" and w.shape[2] % 2:
        raise _err(f"swiglu needs an even N = 2F (gate | up halves), got N = {w.shape[2]}")
    offsets, off = _check_offsets(offsets, x.shape[0])
    act = "none" if activation is None else activation
    grad = torch.is_grad_enabled() and (
        x.requires_grad or w.requires_grad or (bias is not None and bias.requires_grad)
    )
    if (
        off is not None
        and x.dtype in _TORCH_DTYPES
        and _backend.plain_eager(x)
        and OP.forced_backend() in (None, "torch")
    ):
        # CPU eager: the torch backend is the one dispatch picks (triton takes CPU tensors only when forced);
        # called directly, without the custom op's wrapping, and without autograd when no gradient is needed
        if not grad:
            return _fwd_torch(x, w, offsets, bias, act, False, off)[0]
        g = 0 if act == "swiglu" else _balanced(x, off)
        if g:  # torch's autograd nodes (C++) over one bmm: see _balanced and the next comment
            return activation_ref(_bmm_experts(x, w, bias, g), act)
        if act != "swiglu" and off[0] == 0 and off[-1] == x.shape[0] and _grouped_c(x, off):
            return activation_ref(_GroupedGemmC.apply(x, w, bias, off), act)
        if act != "swiglu" and off[0] == 0 and off[-1] == x.shape[0] and _whole(x, w, 0, off[-1], True):
            # small calls whose rows are all used: torch's own autograd nodes (C++) over torch._grouped_mm
            # cost less per call than a Python autograd.Function, and save the same tensors (x, w, h);
            # swiglu keeps the Function, which saves h alone (autograd would also save silu(gate))
            h = torch._grouped_mm(x, w, offs=offsets[1:])
            if bias is not None:
                h = h + bias.repeat_interleave(torch.diff(offsets), dim=0, output_size=off[-1])
            return activation_ref(h, act)
        return _GroupedMMCPU.apply(x, w, offsets, bias, act, off)
    out, _ = _grouped_mm_fwd_op(x, w, offsets, bias, act, act != "none" and grad)
    return out

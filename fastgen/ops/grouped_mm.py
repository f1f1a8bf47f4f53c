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

Backends: ``triton`` and ``torch`` (any device and dtype including float64: a loop over experts with
``torch.matmul``; it reads the offsets on the host, so it synchronises — the CPU path).
Reference: :func:`grouped_mm_ref`, a plain loop over experts in float64.
"""

from __future__ import annotations

import itertools
import math

import torch

from fastgen import _backend
from fastgen._backend import Call

try:  # triton is optional (not on every platform)
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None
    tl = None

ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh", "silu", "swiglu")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ACT_ID = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4, "swiglu": 5}
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)

OP = _backend.get_op("grouped_mm", "grouped GEMM over experts (MoE) with fused bias + activation, fwd + bwd")


def _err(msg: str) -> ValueError:
    return ValueError(f"fastgen.grouped_mm: {msg}")


# =====================================================================================================
# Reference (the oracle) and the activations in PyTorch
# =====================================================================================================


def _act(h: torch.Tensor, act: str) -> torch.Tensor:
    if act == "none":
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
        pieces.append(_act(h, act))
    pieces.append(xs.new_zeros((x.shape[0] - off[-1], n_out)))
    return torch.cat(pieces, 0).to(x.dtype)


# =====================================================================================================
# torch backend: a loop over experts with torch.matmul (reads the offsets on the host)
# =====================================================================================================


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fwd_torch(x, w, offsets, bias, act, save_h):
    r, n = x.shape[0], w.shape[2]
    n_out = n // 2 if act == "swiglu" else n
    dt = _acc_dtype(x.dtype)
    out = torch.zeros((r, n_out), dtype=x.dtype, device=x.device)
    h_all = torch.empty((r, n), dtype=x.dtype, device=x.device) if save_h else x.new_empty(0)
    off = offsets.tolist()
    for e in range(w.shape[0]):
        a, b = off[e], off[e + 1]
        if a == b:
            continue
        h = torch.matmul(x[a:b], w[e]).to(dt)
        if bias is not None:
            h = h + bias[e].to(dt)
        if save_h:
            h_all[a:b] = h.to(x.dtype)
        out[a:b] = _act(h, act).to(x.dtype)
    return out, h_all


def _bwd_torch(dout, x, w, offsets, h, act, need_dx, need_dw, need_dbias):
    dt = _acc_dtype(x.dtype)
    e_count, n = w.shape[0], w.shape[2]
    dx = torch.zeros_like(x) if need_dx else x.new_empty(0)
    dw = torch.zeros_like(w) if need_dw else x.new_empty(0)
    dbias = torch.zeros((e_count, n), dtype=x.dtype, device=x.device) if need_dbias else x.new_empty(0)
    off = offsets.tolist()
    for e in range(e_count):
        a, b = off[e], off[e + 1]
        if a == b:
            continue
        dh = _act_grad(dout[a:b].to(dt), h[a:b].to(dt), act) if act != "none" else dout[a:b]
        if need_dx:
            dx[a:b] = torch.matmul(dh.to(x.dtype), w[e].transpose(0, 1))
        if need_dw:
            dw[e] = torch.matmul(x[a:b].transpose(0, 1), dh.to(x.dtype))
        if need_dbias:
            dbias[e] = dh.to(dt).sum(0).to(x.dtype)
    return dx, dw, dbias


# =====================================================================================================
# Backends and the torch.library ops
# =====================================================================================================

OP.register("torch", devices=("cpu", "cuda", "mps", "xpu"), dtypes=(*KERNEL_DTYPES, torch.float64),
            note="loop over experts with torch.matmul (host reads the offsets)")(_fwd_torch)  # fmt: skip
_BWD = {"torch": _bwd_torch}


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
    ctx.save_for_backward(x, w, offsets, h)
    ctx.activation = activation
    ctx.has_bias = bias is not None
    ctx.backend = OP.dispatch(_call(x, w)).name


def _backward(ctx, dout, dh_unused):
    x, w, offsets, h = ctx.saved_tensors
    act = ctx.activation
    if act != "none" and h.numel() == 0 and x.shape[0] > 0:
        raise RuntimeError(
            "fastgen.grouped_mm: the forward ran without saving the pre-activation (save_h=False); "
            "call grouped_mm with grad enabled to differentiate it"
        )
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_dbias = ctx.has_bias and ctx.needs_input_grad[3]
    dx, dw, dbias = _grouped_mm_bwd_op(
        dout.contiguous(), x, w, offsets, h, act, need_dx, need_dw, need_dbias, ctx.backend
    )
    return (
        (dx if need_dx else None),
        (dw if need_dw else None),
        None,
        (dbias if need_dbias else None),
        None,
        None,
    )


_grouped_mm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# =====================================================================================================
# Public API
# =====================================================================================================


def _check_tensor(name: str, t, dims: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise _err(f"{name} must be a tensor {layout}, got {type(t).__name__}")
    if t.dim() != dims:
        raise _err(f"{name} must be {dims}-D {layout}, got shape {tuple(t.shape)}")


def _check_offsets(offsets: torch.Tensor, rows: int) -> torch.Tensor:
    offsets = offsets.to(torch.int32)
    if offsets.device.type == "cpu" and not torch.compiler.is_compiling():
        off = offsets.tolist()
        if off[0] < 0 or any(b < a for a, b in itertools.pairwise(off)) or off[-1] > rows:
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
    return offsets


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
    offsets = _check_offsets(offsets, x.shape[0])
    act = "none" if activation is None else activation
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, bias))
    out, _ = _grouped_mm_fwd_op(x, w, offsets, bias, act, act != "none" and grad)
    return out

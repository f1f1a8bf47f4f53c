r"""Adaptive grid pooling: any ``H x W`` grid to any ``h x w`` grid, area-weighted average or max.

For output cell ``(i, j)`` the input bin is rows ``[floor(i H / h), ceil((i + 1) H / h))`` and columns
``[floor(j W / w), ceil((j + 1) W / w))`` -- the bins of ``torch.nn.functional.adaptive_avg_pool2d`` /
``adaptive_max_pool2d``, so downsampling (bins of ``H / h`` rows, overlapping by one when ``h`` does
not divide ``H``) and upsampling (``h > H``: bins of one or two rows, repeated) are one formula::

    avg[b, c, i, j] = mean over the bin of x[b, c, r, s]
    max[b, c, i, j] = max  over the bin of x[b, c, r, s]   (argmax: flat index r * W + s into H x W)

Models hold token grids ``(B, H * W, C)``; :func:`adaptive_grid_pool_tokens` pools those in place of
a permute + copy: the kernel reads any strides, and the output keeps the input's layout (token grid
in, token grid out; ``channels_last`` in, ``channels_last`` out, as torch does).

Backward (average): the gradient of input cell ``r`` gathers ``g[i] / count(i)`` over the output cells
whose bin holds ``r``, i.e. ``i in [floor(r h / H), ceil((r + 1) h / H))``: the same bin formula with
the two grids swapped, so one Triton kernel serves both directions, without atomics (deterministic).
Max backward scatters the gradient to the saved argmax (``scatter_add`` in PyTorch on every backend;
several output cells may pick the same input cell when upsampling).

NaN: a NaN in a bin makes its average NaN and wins its max (PyTorch's rule: the last NaN in row-major
order is the argmax; ties otherwise keep the first maximum).

Backends
--------
* ``triton`` (CUDA; CPU only under ``TRITON_INTERPRET=1`` when forced): one program per (image, output
  row, BLOCK_J output columns, BLOCK_C channels); it walks the bin's rows and the widest bin's
  columns, masking the columns past each cell's own bin. fp16 / bf16 / fp32, accumulated in fp32.
* ``torch`` (any device, also float64): ``F.adaptive_avg_pool2d`` / ``adaptive_max_pool2d`` and their
  ATen backwards (:func:`adaptive_grid_pool_ref`).
No host synchronisation: every launch parameter comes from the shapes.
"""

from __future__ import annotations

import functools
import numbers

import torch
import torch.nn.functional as F

from fastgen import _backend
from fastgen._backend import Call

try:  # triton is optional (not on every platform)
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None
    tl = None

X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MODES = ("avg", "max")
# i * H is formed in int32 inside the kernel
MAX_TRITON_PRODUCT = 2**31 - 1

OP = _backend.get_op("adaptive_pool", "adaptive average / max pooling of a grid to any size")
OP_BWD = _backend.get_op("adaptive_pool_backward", "gradient of adaptive average pooling")


def _err(msg: str, fn: str = "adaptive_grid_pool") -> ValueError:
    return ValueError(f"fastgen.{fn}: {msg}")


def bin_bounds(i: int, n_in: int, n_out: int) -> tuple[int, int]:
    """The input bin ``[start, end)`` of output index ``i`` when ``n_in`` cells pool to ``n_out``."""
    return (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)


@functools.lru_cache(maxsize=256)
def max_bin(n_in: int, n_out: int) -> int:
    """The widest bin, in input cells, over all ``n_out`` outputs (1 when the grid is empty)."""
    if n_in == 0 or n_out == 0:
        return 1
    return max(e - s for s, e in (bin_bounds(i, n_in, n_out) for i in range(n_out)))


# =====================================================================================================
# Reference (the oracle): PyTorch's adaptive pooling
# =====================================================================================================


def adaptive_grid_pool_ref(
    x: torch.Tensor, output_size, mode: str = "avg", *, upcast: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``F.adaptive_avg_pool2d`` (``mode="avg"``) or ``F.adaptive_max_pool2d(return_indices=True)``
    (``mode="max"``: returns ``(values, indices)``) on ``x: (B, C, H, W)`` or ``(C, H, W)``; float64
    when ``upcast``, returned in x's dtype."""
    xf = x.double() if upcast else x
    if mode == "max":
        out, idx = F.adaptive_max_pool2d(xf, output_size, return_indices=True)
        return out.to(x.dtype), idx
    return F.adaptive_avg_pool2d(xf, output_size).to(x.dtype)


def _out_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is laid out so (a token grid viewed as (B, C, H, W) is), as torch does."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


# =====================================================================================================
# torch backend
# =====================================================================================================


def _fwd_torch(x, oh, ow, is_max):
    fmt = _out_format(x)
    if is_max:
        out, idx = F.adaptive_max_pool2d(x, (oh, ow), return_indices=True)
        return out.contiguous(memory_format=fmt), idx.contiguous()
    return F.adaptive_avg_pool2d(x, (oh, ow)).contiguous(memory_format=fmt), x.new_empty(
        (0,), dtype=torch.int64
    )


def _bwd_torch(grad, ih, iw, channels_last):
    b, c = grad.shape[:2]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    like = torch.empty((b, c, ih, iw), dtype=grad.dtype, device=grad.device, memory_format=fmt)
    return torch.ops.aten._adaptive_avg_pool2d_backward(grad, like).contiguous(memory_format=fmt)


# =====================================================================================================
# Triton kernel (forward average / max, and the average backward as a gather)
# =====================================================================================================

if triton is not None:

    @triton.jit
    def _grid_pool_kernel(
        Src, Dst, Idx, C, SH, SW, DH, DW, KW,
        s_b, s_y, s_x, s_c, d_b, d_y, d_x, d_c,
        MODE: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """Dst[b, i, j, c] from the Src (SH x SW) bin of cell (i, j) of the DH x DW grid.

        MODE 0: mean; 1: max + argmax (Idx, (B, C, DH, DW) contiguous int64); 2: average backward, Src
        is the gradient of the pooled grid and each term is divided by its forward bin's cell count.
        KW: the widest column bin. Strides are in elements, any layout.
        """
        pid = tl.program_id(0)
        b = (pid // DH).to(tl.int64)
        i = pid % DH
        j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        ch = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        jm = j < DW
        cm = ch < C
        r0 = (i * SH) // DH
        r1 = ((i + 1) * SH + DH - 1) // DH
        c0 = (j * SW) // DW
        c1 = ((j + 1) * SW + DW - 1) // DW
        src = Src + b * s_b + ch.to(tl.int64)[None, :] * s_c
        if MODE == 1:
            acc = tl.full((BLOCK_J, BLOCK_C), float("-inf"), tl.float32)
            arg = tl.broadcast_to((r0 * SW + c0)[:, None], (BLOCK_J, BLOCK_C)).to(tl.int64)
        else:
            acc = tl.zeros((BLOCK_J, BLOCK_C), dtype=tl.float32)
        zero64 = b * 0  # loop indices are plain ints under the interpreter: widen through a tensor
        for r in range(r0, r1):
            row = src + (zero64 + r) * s_y
            if MODE == 2:  # rows of the forward bin of gradient row r
                cnt_r = ((r + 1) * DH + SH - 1) // SH - (r * DH) // SH
            for k in range(0, KW):
                col = c0 + k
                m = ((col < c1) & jm)[:, None] & cm[None, :]
                v = tl.load(row + col.to(tl.int64)[:, None] * s_x, mask=m, other=0.0)
                v = v.to(tl.float32)
                if MODE == 0:
                    acc += v
                elif MODE == 1:
                    upd = m & ((v > acc) | (v != v))
                    acc = tl.where(upd, v, acc)
                    arg = tl.where(upd, (r * SW + col)[:, None].to(tl.int64), arg)
                else:
                    cnt_c = ((col + 1) * DW + SW - 1) // SW - (col * DW) // SW
                    acc += v / (cnt_r * cnt_c)[:, None].to(tl.float32)
        if MODE == 0:
            acc = acc / ((r1 - r0) * (c1 - c0))[:, None].to(tl.float32)
        om = jm[:, None] & cm[None, :]
        dst = (
            Dst
            + b * d_b
            + i.to(tl.int64) * d_y
            + j.to(tl.int64)[:, None] * d_x
            + ch.to(tl.int64)[None, :] * d_c
        )
        tl.store(dst, acc.to(Dst.dtype.element_ty), mask=om)
        if MODE == 1:
            ip = Idx + ((b * C + ch[None, :]) * DH + i) * DW + j[:, None]
            tl.store(ip, arg, mask=om)


def _blocks(c: int, dw: int, channels_inner: bool, mode: int) -> tuple[int, int]:
    """(BLOCK_J, BLOCK_C): the memory-contiguous axis gets the wide side of the tile; 1024 elements, 512
    for max (its int64 argmax tile doubles the registers: 1024 spills at 4 warps on sm_90)."""
    np2 = triton.next_power_of_2
    tile = 512 if mode == 1 else 1024
    if channels_inner:
        bc = min(128, np2(max(c, 1)))
        return min(np2(max(dw, 1)), max(1, tile // bc), 16), bc
    bj = min(64, np2(max(dw, 1)))
    return bj, min(np2(max(c, 1)), max(1, tile // bj), 16)


def _launch(src, dst, idx, mode, sh, sw, dh, dw):
    """src (B, C, SH, SW), dst (B, C, DH, DW): any strides."""
    b, c = dst.shape[:2]
    if dst.numel() == 0:
        return
    bj, bc = _blocks(c, dw, dst.stride(1) == 1 and c > 1, mode)
    kw = max_bin(sw, dw)
    grid = (b * dh, triton.cdiv(dw, bj), triton.cdiv(c, bc))
    _grid_pool_kernel[grid](
        src, dst, idx if idx is not None else dst, c, sh, sw, dh, dw, kw,
        src.stride(0), src.stride(2), src.stride(3), src.stride(1),
        dst.stride(0), dst.stride(2), dst.stride(3), dst.stride(1),
        MODE=mode, BLOCK_J=bj, BLOCK_C=bc, num_warps=4,
    )  # fmt: skip


def _fwd_triton(x, oh, ow, is_max):
    b, c, h, w = x.shape
    out = torch.empty((b, c, oh, ow), dtype=x.dtype, device=x.device, memory_format=_out_format(x))
    if is_max:
        idx = torch.empty((b, c, oh, ow), dtype=torch.int64, device=x.device)
        if x.numel() and out.numel():
            _launch(x, out, idx, 1, h, w, oh, ow)
        return out, idx
    if x.numel() and out.numel():
        _launch(x, out, None, 0, h, w, oh, ow)
    return out, x.new_empty((0,), dtype=torch.int64)


def _bwd_triton(grad, ih, iw, channels_last):
    b, c, oh, ow = grad.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dx = torch.empty((b, c, ih, iw), dtype=grad.dtype, device=grad.device, memory_format=fmt)
    if dx.numel() and grad.numel():
        _launch(grad, dx, None, 2, oh, ow, ih, iw)
    elif dx.numel():
        dx.zero_()
    return dx


def _triton_limits(call: Call) -> list[str]:
    reasons = _backend.triton_check_device(call)
    if call["products"] > MAX_TRITON_PRODUCT:
        reasons.append(f"grid product {call['products']} > {MAX_TRITON_PRODUCT} (int32 bin arithmetic)")
    return reasons


for _op, _fns in ((OP, (_fwd_triton, _fwd_torch)), (OP_BWD, (_bwd_triton, _bwd_torch))):
    _op.register("triton", devices=("cuda",), dtypes=X_DTYPES, available=_backend.triton_available,
                 check=_triton_limits, forced_only_devices=("cpu",),
                 note="one gather kernel over the bins, fp32 accumulation, any strides")(_fns[0])  # fmt: skip
    _op.register("torch", devices=("cpu", "cuda", "mps", "xpu"), dtypes=(*X_DTYPES, torch.float64),
                 note="F.adaptive_avg_pool2d / adaptive_max_pool2d and ATen's backward")(_fns[1])  # fmt: skip


def _call(t: torch.Tensor, ih: int, iw: int, oh: int, ow: int) -> Call:
    products = max(ih * oh, iw * ow, (ih + 1) * oh, (iw + 1) * ow, (oh + 1) * ih, (ow + 1) * iw)
    return Call(t.device, t.dtype, {"products": products, "in": (ih, iw), "out": (oh, ow)})


# =====================================================================================================
# torch.library ops and autograd
# =====================================================================================================


@torch.library.custom_op("fastgen::adaptive_grid_pool", mutates_args=())
def _pool_op(x: torch.Tensor, oh: int, ow: int, is_max: bool) -> tuple[torch.Tensor, torch.Tensor]:
    backend = OP.dispatch(_call(x, x.shape[2], x.shape[3], oh, ow))
    return backend.fn(x, oh, ow, is_max)


@_pool_op.register_fake
def _(x, oh, ow, is_max):
    b, c = x.shape[:2]
    out = torch.empty((b, c, oh, ow), dtype=x.dtype, device=x.device, memory_format=_out_format(x))
    idx = x.new_empty((b, c, oh, ow) if is_max else (0,), dtype=torch.int64)
    return out, idx


@torch.library.custom_op("fastgen::adaptive_grid_pool_backward", mutates_args=())
def _pool_bwd_op(grad: torch.Tensor, ih: int, iw: int, channels_last: bool) -> torch.Tensor:
    backend = OP_BWD.dispatch(_call(grad, ih, iw, grad.shape[2], grad.shape[3]))
    return backend.fn(grad, ih, iw, channels_last)


@_pool_bwd_op.register_fake
def _(grad, ih, iw, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(
        (grad.shape[0], grad.shape[1], ih, iw), dtype=grad.dtype, device=grad.device, memory_format=fmt
    )


def _setup_context(ctx, inputs, output):
    x, _oh, _ow, is_max = inputs
    ctx.is_max = is_max
    ctx.in_shape = tuple(x.shape)
    ctx.channels_last = _out_format(x) == torch.channels_last
    if is_max:
        ctx.save_for_backward(output[1])


def _backward(ctx, grad, _grad_idx):
    b, c, ih, iw = ctx.in_shape
    fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
    if ctx.is_max:
        (idx,) = ctx.saved_tensors
        dx = grad.new_zeros((b, c, ih * iw))
        dx.scatter_add_(2, idx.reshape(b, c, -1), grad.reshape(b, c, -1))
        return dx.view(b, c, ih, iw).contiguous(memory_format=fmt), None, None, None
    return _pool_bwd_op(grad.contiguous(memory_format=fmt), ih, iw, ctx.channels_last), None, None, None


_pool_op.register_autograd(_backward, setup_context=_setup_context)


# =====================================================================================================
# Public API
# =====================================================================================================


def _size_arg(output_size, in_hw: tuple[int, int], fn: str) -> tuple[int, int]:
    """int or (h, w) (None keeps that input size) -> (h, w)."""
    if isinstance(output_size, numbers.Integral) and not isinstance(output_size, bool):
        output_size = (output_size, output_size)
    if not isinstance(output_size, (tuple, list, torch.Size)) or len(output_size) != 2:
        raise _err(f"output_size must be an int or a pair (h, w), got {output_size!r}", fn)
    out = []
    for v, n in zip(output_size, in_hw):
        if v is None:
            v = n
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 0:
            raise _err(f"output_size must hold ints >= 0 (or None), got {tuple(output_size)!r}", fn)
        out.append(int(v))
    return out[0], out[1]


def _check_x(x, mode: str, fn: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fastgen.{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"fastgen.{fn}: x must be a floating-point tensor, got {x.dtype}")
    if mode not in MODES:
        raise _err(f"mode must be one of {MODES}, got {mode!r}", fn)


def _pool4(x: torch.Tensor, oh: int, ow: int, mode: str, return_indices: bool):
    out, idx = _pool_op(x, oh, ow, mode == "max")
    return (out, idx) if return_indices else out


def adaptive_grid_pool(
    x: torch.Tensor, output_size, mode: str = "avg", *, return_indices: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Adaptive average / max pooling of ``x: (B, C, H, W)`` (or ``(C, H, W)``) to ``output_size``.

    output_size: int or ``(h, w)`` (``None`` keeps that side), any sizes (smaller, larger, not divisors);
    mode: ``"avg"`` (area-weighted mean over each bin) or ``"max"``. Returns ``(B, C, h, w)`` in x's
    dtype and memory format; with ``return_indices`` (max only) also the int64 argmax, flat into H x W,
    as ``F.adaptive_max_pool2d``. Differentiable. Bins and math: see the module docstring.
    """
    fn = "adaptive_grid_pool"
    _check_x(x, mode, fn)
    if return_indices and mode != "max":
        raise _err(f"return_indices=True needs mode='max', got mode={mode!r}", fn)
    if x.dim() not in (3, 4):
        raise _err(f"x must be (B, C, H, W) or (C, H, W), got shape {tuple(x.shape)}", fn)
    h, w = x.shape[-2:]
    if h == 0 or w == 0:
        raise _err(f"x's grid must be non-empty (H, W >= 1), got H x W = {h} x {w}", fn)
    oh, ow = _size_arg(output_size, (h, w), fn)
    if x.dim() == 3:
        res = _pool4(x.unsqueeze(0), oh, ow, mode, return_indices)
        return tuple(t.squeeze(0) for t in res) if return_indices else res.squeeze(0)
    return _pool4(x, oh, ow, mode, return_indices)


def adaptive_grid_pool_tokens(
    tokens: torch.Tensor, grid: tuple[int, int], output_size, mode: str = "avg"
) -> torch.Tensor:
    """Pool a token grid ``(B, H * W, C)`` (row-major, H x W = ``grid``) to ``(B, h * w, C)``.

    The kernel reads the tokens where they lie (no permute copy); the result is a contiguous token grid.
    """
    fn = "adaptive_grid_pool_tokens"
    _check_x(tokens, mode, fn)
    if tokens.dim() != 3:
        raise _err(f"tokens must be (B, H * W, C), got shape {tuple(tokens.shape)}", fn)
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(g, numbers.Integral) and not isinstance(g, bool) and g >= 1 for g in grid)
    ):
        raise _err(f"grid must be a pair of ints (H, W) >= 1, got {grid!r}", fn)
    h, w = int(grid[0]), int(grid[1])
    b, n, c = tokens.shape
    if n != h * w:
        raise _err(f"tokens.shape[1] must be H * W = {h} * {w} = {h * w} for grid {(h, w)}, got {n}", fn)
    oh, ow = _size_arg(output_size, (h, w), fn)
    x = tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)
    out = _pool4(x, oh, ow, mode, False)
    # a no-op unless the tokens were not channel-contiguous
    return out.permute(0, 2, 3, 1).reshape(b, oh * ow, c).contiguous()

r"""SSIM (structural similarity, Wang et al. 2004) per image and channel, fused into one pass.

For images ``x, y: (B, C, H, W)`` and the normalised Gaussian window ``w`` (``window_size`` taps, std
``sigma``; 11 and 1.5 as in the paper), with ``G * z`` the 'valid' (unpadded) separable Gaussian
filtering of the map ``z`` (output ``(H - window_size + 1, W - window_size + 1)``)::

    mu_x = G * x        mu_y = G * y
    s_xx = G * (x x) - mu_x^2      s_yy = G * (y y) - mu_y^2      s_xy = G * (x y) - mu_x mu_y
    C1 = (k1 L)^2       C2 = (k2 L)^2                              (L = data_range)
    cs   = (2 s_xy + C2) / (s_xx + s_yy + C2)
    ssim = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1) * cs

and the op returns the means of both maps per (image, channel): ``(B, C, 2)`` = (ssim, cs). This is
``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False)`` (skimage filters with reflection and crops the border: the same 'valid'
maps). ``cs`` (contrast-structure) is what MS-SSIM combines across scales.

Backends
--------
* ``triton`` (CUDA; CPU only under ``TRITON_INTERPRET=1`` when forced): a persistent kernel; each
  program takes output tiles of (BLOCK_R - window_size + 1) x BLOCK_C pixels of one (image, channel)
  plane in turn. Horizontal pass: ``window_size`` shifted loads of the BLOCK_R x BLOCK_C input rows of x
  and y, accumulating the five horizontally filtered maps (x, y, xx, yy, xy) in registers; they go to the
  program's own small scratch tile (5 x BLOCK_R x BLOCK_C fp32, L1/L2 resident, a barrier before and
  after); vertical pass: ``window_size`` shifted reads of it, then the SSIM and cs maps and their tile
  sums. One float32 pair per tile is written, summed per plane afterwards (fixed order: deterministic).
  No full-size intermediate map exists. fp16 / bf16 / fp32 inputs, computed in fp32.
* ``torch`` (any device, also float64): :func:`ssim_ref`, five depthwise conv2d calls.

Backward (SSIM as a loss): analytic, in PyTorch for both backends (:func:`_ssim_backward`). With
``dL/dssim_map`` and ``dL/dcs_map`` per pixel, the chain rule through the formulas above gives five
per-pixel coefficient maps (d/dmu_x, d/dmu_y, d/dE[xx], d/dE[yy], d/dE[xy]); the adjoint of the 'valid'
filter is the 'full' transposed filter (``conv_transpose2d``), so::

    dx = G^T * a_x + 2 x (G^T * a_xx) + y (G^T * a_xy)        (dy symmetric)

It recomputes the five filtered maps with separable conv2d (nothing is saved from the forward but the
inputs) and is not differentiable itself (no double backward).

CPU (the torch backend's forward, and the backward of every backend for CPU tensors): the same
formulas over four maps (x, y, x^2 + y^2, xy), separable depthwise conv2d on cache-sized chunks of
planes; layout notes at :func:`_ssim_cpu`.
"""

from __future__ import annotations

import concurrent.futures
import numbers
import threading

import torch
import torch.nn.functional as F

from fastgen import _backend
from fastgen._backend import Call
from fastgen._checks import is_finite_real

try:  # triton is optional (not on every platform)
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None
    tl = None

X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TRITON_WINDOW = 33
# Tile of the fused kernel: BLOCK_R input rows (BLOCK_R - window + 1 output rows) x BLOCK_C columns.
BLOCK_R = 64
BLOCK_C = 64

OP = _backend.get_op("ssim", "SSIM / contrast-structure means per (image, channel), Gaussian window")


def _err(msg: str) -> ValueError:
    return ValueError(f"fastgen.ssim: {msg}")


def gaussian_window(
    window_size: int, sigma: float, *, dtype: torch.dtype = torch.float64, device=None
) -> torch.Tensor:
    """The normalised 1-D Gaussian window, (window_size,): ``exp(-(i - r)^2 / (2 sigma^2))``, r = (n-1)/2."""
    r = (window_size - 1) / 2.0
    i = torch.arange(window_size, dtype=torch.float64)
    g = torch.exp(-((i - r) ** 2) / (2.0 * sigma * sigma))
    return (g / g.sum()).to(dtype=dtype, device=device)


def check_ssim_args(
    img1: torch.Tensor,
    img2: torch.Tensor,
    data_range: float,
    window_size: int,
    sigma: float,
    k1: float = 0.01,
    k2: float = 0.03,
) -> None:
    """Raise ValueError on bad SSIM input (shared by the op and fastgen.metrics)."""
    for name, t in (("img1", img1), ("img2", img2)):
        if not isinstance(t, torch.Tensor):
            raise _err(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise _err(f"{name} must be (B, C, H, W), got {t.dim()} dims, shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise _err(f"{name} must be a floating-point tensor, got {t.dtype}")
    if img1.shape != img2.shape:
        raise _err(f"img1 and img2 must have the same shape, got {tuple(img1.shape)} and {tuple(img2.shape)}")
    if img1.dtype != img2.dtype:
        raise _err(f"img1 and img2 must have the same dtype, got {img1.dtype} and {img2.dtype}")
    if img1.device != img2.device:
        raise _err(f"img1 and img2 must be on the same device, got {img1.device} and {img2.device}")
    if (
        not isinstance(window_size, numbers.Integral)
        or isinstance(window_size, bool)
        or window_size < 1
        or window_size % 2 == 0
    ):
        raise _err(f"window_size must be a positive odd int, got {window_size!r}")
    # NaN / inf would make every SSIM value NaN (or the window uniform) without an error
    if not (is_finite_real(sigma) and sigma > 0):
        raise _err(f"sigma must be a positive finite number, got {sigma!r}")
    if not (is_finite_real(data_range) and data_range > 0):
        raise _err(f"data_range must be a positive finite number, got {data_range!r}")
    for name, k in (("k1", k1), ("k2", k2)):
        if not (is_finite_real(k) and k >= 0):
            raise _err(f"{name} must be a finite number >= 0, got {k!r}")
    h, w = img1.shape[-2:]
    if h < window_size or w < window_size:
        raise _err(
            f"images of {h}x{w} pixels are smaller than the {window_size}x{window_size} window "
            "('valid' filtering needs H, W >= window_size)"
        )
    if img1.shape[1] == 0:  # an empty batch is fine (an empty result), no channels has no mean
        raise _err(f"images need at least one channel, got shape {tuple(img1.shape)}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# =====================================================================================================
# Reference (the oracle): five depthwise conv2d calls with the 2-D window
# =====================================================================================================


def ssim_ref(
    img1: torch.Tensor,
    img2: torch.Tensor,
    *,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    upcast: bool = False,
) -> torch.Tensor:
    """Plain-PyTorch SSIM: (B, C, H, W) x 2 -> (B, C, 2) per-channel means of the (ssim, cs) maps.

    Five depthwise ``conv2d`` calls (mu_x, mu_y, E[xx], E[yy], E[xy]) with the 2-D Gaussian window, no
    padding. Computed in float32 (float64 for float64 inputs or when ``upcast``); differentiable by
    autograd.
    """
    dt = torch.float64 if upcast else _compute_dtype(img1.dtype)
    x, y = img1.to(dt), img2.to(dt)
    c = x.shape[1]
    g = gaussian_window(window_size, sigma, dtype=dt, device=x.device)
    win = (g[:, None] * g[None, :]).expand(c, 1, window_size, window_size)

    def filt(z):
        return F.conv2d(z, win, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    s_xx = filt(x * x) - mu_x * mu_x
    s_yy = filt(y * y) - mu_y * mu_y
    s_xy = filt(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    cs = (2 * s_xy + c2) / (s_xx + s_yy + c2)
    s = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1) * cs
    return torch.stack((s.mean((-2, -1)), cs.mean((-2, -1))), dim=-1)


# =====================================================================================================
# Triton kernel
# =====================================================================================================

if triton is not None:

    @triton.jit
    def _ssim_fwd_kernel(
        X, Y, Win, Scratch, Part, H, W, Ho, Wo, TR, TC, n_tiles, nprog, c1, c2,
        WIN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """Tile t of plane bc: Part[t] = (sum ssim, sum cs) over its valid output pixels."""
        pid = tl.program_id(0)
        OUT_R: tl.constexpr = BLOCK_R - WIN + 1
        TILE: tl.constexpr = BLOCK_R * BLOCK_C
        rows = tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        soff = rows[:, None] * BLOCK_C + cols[None, :]
        sbase = Scratch + pid.to(tl.int64) * (5 * TILE)
        for t in range(pid, n_tiles, nprog):
            bc = t // (TR * TC)
            rem = t % (TR * TC)
            r0 = (rem // TC) * OUT_R
            c0 = (rem % TC) * BLOCK_C
            base = bc.to(tl.int64) * H * W
            ir = r0 + rows
            rmask = ir < H
            hx = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            hy = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            hxx = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            hyy = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            hxy = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            # horizontal pass: input rows r0 .. r0 + BLOCK_R - 1, output columns c0 .. c0 + BLOCK_C - 1
            for k in tl.static_range(WIN):
                wk = tl.load(Win + k)
                ic = c0 + cols + k
                m = rmask[:, None] & (ic < W)[None, :]
                off = base + ir[:, None] * W + ic[None, :]
                xv = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
                yv = tl.load(Y + off, mask=m, other=0.0).to(tl.float32)
                wx = wk * xv
                wy = wk * yv
                hx += wx
                hy += wy
                hxx += wx * xv
                hyy += wy * yv
                hxy += wx * yv
            tl.debug_barrier()  # the previous tile's vertical pass has read the scratch
            tl.store(sbase + soff, hx)
            tl.store(sbase + TILE + soff, hy)
            tl.store(sbase + 2 * TILE + soff, hxx)
            tl.store(sbase + 3 * TILE + soff, hyy)
            tl.store(sbase + 4 * TILE + soff, hxy)
            tl.debug_barrier()  # every thread's rows are in the scratch
            mx = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            my = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            exx = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            eyy = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            exy = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            # vertical pass: output row i reads scratch rows i .. i + WIN - 1 (rows >= OUT_R are unused)
            for k in tl.static_range(WIN):
                wk = tl.load(Win + k)
                m = ((rows + k) < BLOCK_R)[:, None] & (cols < BLOCK_C)[None, :]
                p = sbase + soff + k * BLOCK_C
                mx += wk * tl.load(p, mask=m, other=0.0)
                my += wk * tl.load(p + TILE, mask=m, other=0.0)
                exx += wk * tl.load(p + 2 * TILE, mask=m, other=0.0)
                eyy += wk * tl.load(p + 3 * TILE, mask=m, other=0.0)
                exy += wk * tl.load(p + 4 * TILE, mask=m, other=0.0)
            mxy = mx * my
            mxx = mx * mx
            myy = my * my
            cs = (2.0 * (exy - mxy) + c2) / ((exx - mxx) + (eyy - myy) + c2)
            s = (2.0 * mxy + c1) / (mxx + myy + c1) * cs
            valid = ((rows < OUT_R) & (r0 + rows < Ho))[:, None] & ((c0 + cols) < Wo)[None, :]
            tl.store(Part + 2 * t, tl.sum(tl.sum(tl.where(valid, s, 0.0), axis=1), axis=0))
            tl.store(Part + 2 * t + 1, tl.sum(tl.sum(tl.where(valid, cs, 0.0), axis=1), axis=0))


def _num_programs(device: torch.device, n_tiles: int) -> int:
    if device.type == "cuda":
        return max(1, min(n_tiles, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(n_tiles, 3))  # the interpreter: a few programs, so the persistent loop is exercised


def _ssim_triton(x, y, data_range, window_size, sigma, k1, k2):
    b, c, h, w = x.shape
    x, y = x.contiguous(), y.contiguous()
    ho, wo = h - window_size + 1, w - window_size + 1
    block_r = max(BLOCK_R, triton.next_power_of_2(window_size))
    block_c = BLOCK_C
    out_r = block_r - window_size + 1
    tr, tc = triton.cdiv(ho, out_r), triton.cdiv(wo, block_c)
    n_tiles = b * c * tr * tc
    if n_tiles == 0:  # empty batch: no launch (a zero-size grid is an error)
        return x.new_zeros((b, c, 2), dtype=torch.float32)
    nprog = _num_programs(x.device, n_tiles)
    win = gaussian_window(window_size, sigma, dtype=torch.float32, device=x.device)
    scratch = torch.empty(nprog * 5 * block_r * block_c, dtype=torch.float32, device=x.device)
    part = torch.empty((n_tiles, 2), dtype=torch.float32, device=x.device)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    _ssim_fwd_kernel[(nprog,)](
        x, y, win, scratch, part, h, w, ho, wo, tr, tc, n_tiles, nprog, c1, c2,
        WIN=window_size, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8,
    )  # fmt: skip
    return part.view(b, c, tr * tc, 2).sum(2) / (ho * wo)


# =====================================================================================================
# CPU path of the torch backend: separable filtering, planes in cache-sized chunks
# =====================================================================================================
#
# Layout. The (B, C) planes are flattened to (P, H, W) and taken CHUNK planes at a time (so that the
# four stacked maps of a chunk, 4 x CHUNK x H x W fp32, stay in L2/L3 while they are filtered; one
# full-batch pass of a conv over 60+ MiB of maps is memory bound and 5-10x slower per pixel). Four maps
# suffice: x, y, x^2 + y^2 and xy (the SSIM formula only needs s_xx + s_yy, not each of them), stacked
# as one contiguous (4 * CHUNK, H, W) tensor. The horizontal 1-D pass is a depthwise conv2d with a
# (1, k) kernel over those 4 * CHUNK channels (NCHW). The vertical pass reads the same memory as a
# channels-last tensor whose *channels* are the image columns: (4 * CHUNK, W', H, 1) with strides
# (H W', 1, W', W') is exactly the contiguous (4 * CHUNK, H, W') buffer, so a depthwise (k, 1) conv
# with W' groups filters along H with the SIMD lanes running along the row (no transpose, no copy), and
# its output (channels-last again) is the contiguous (4 * CHUNK, H', W') map. The backward is the
# adjoint of the same two passes: the 'full' correlation with the flipped window (zero padding k - 1
# on both sides; the column padding lives in the coefficient buffer itself), horizontal then vertical,
# over four per-pixel coefficient maps. Nothing is saved from the forward but the inputs: each chunk's
# filtered maps are recomputed while they are in cache.

CPU_CHUNK_ELEMS = 1 << 19  # target size of one chunk's stacked maps (elements): 2 MiB in fp32
CPU_CHUNK_MAX_ELEMS = 1 << 22  # ... raised up to this to get 4 planes (16 channels: full SIMD lanes)


def _chunk_planes(h: int, w: int) -> int:
    """Planes per chunk on CPU: about CPU_CHUNK_ELEMS elements in the four stacked maps; at least 4
    planes (the horizontal conv vectorises across 16 channels) while that stays under
    CPU_CHUNK_MAX_ELEMS; at least 1. Measured on a 2-core AVX-512 EPYC (1 MiB L2 per core, 32 MiB L3):
    64x64 -> 32 planes, 256x256 -> 4 planes are the fastest."""
    per_plane = 4 * h * w
    planes = CPU_CHUNK_ELEMS // per_plane
    if planes < 4:
        planes = min(4, CPU_CHUNK_MAX_ELEMS // per_plane)
    return max(1, planes)


def _hpass(z: torch.Tensor, win: torch.Tensor, pad: int) -> torch.Tensor:
    """(N, L, W) contiguous -> (N, L, W - k + 1 + 2 pad): correlation with ``win`` (k,) along the last dim."""
    n, rows, _ = z.shape
    k = win.numel()
    out = F.conv2d(
        z.view(1, n, rows, -1), win.view(1, 1, 1, k).expand(n, 1, 1, k), padding=(0, pad), groups=n
    )
    return out.view(n, rows, -1)


def _vpass(z: torch.Tensor, win: torch.Tensor, pad: int) -> torch.Tensor:
    """(N, L, W) contiguous -> (N, L - k + 1 + 2 pad, W): correlation along dim 1, columns as channels."""
    n, rows, cols = z.shape
    k = win.numel()
    zc = z.as_strided((n, cols, rows, 1), (rows * cols, 1, cols, cols))  # channels-last view, no copy
    out = F.conv2d(zc, win.view(1, 1, k, 1).expand(cols, 1, k, 1), padding=(pad, 0), groups=cols)
    lo = out.shape[2]
    if out.stride() != (lo * cols, 1, cols, cols):  # pragma: no cover - a conv that ignored the layout
        out = out.contiguous(memory_format=torch.channels_last)
    return out.as_strided((n, lo, cols), (lo * cols, cols, 1))


def _padded_planes(p: int) -> int:
    """Planes given to the horizontal conv for a chunk of ``p``: oneDNN's NCHW depthwise conv is up to 2x
    faster per channel on a multiple of 16 channels (4 maps x 4 planes) than on 20, 24 or 28, so 3 and
    5+ planes are padded up to a multiple of 4 (the padding planes hold stale finite values, ignored)."""
    return p if p <= 2 or p % 4 == 0 else (p + 3) // 4 * 4


def _maps_buffer(planes: int, h: int, w: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The (padded planes, 4, H, W) buffer of the stacked maps, plane-major; padding planes zeroed once."""
    n = _padded_planes(planes)
    buf = torch.empty((n, 4, h, w), dtype=dtype, device=device)
    buf[planes:].zero_()
    return buf


def _cpu_filtered(xc: torch.Tensor, yc: torch.Tensor, win: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """(P, H, W) x 2 in the compute dtype -> (4, P, H', W') (a view): G*x, G*y, G*(x^2 + y^2), G*(xy).

    ``maps``: a :func:`_maps_buffer` of at least P planes; all of its planes go through the horizontal
    conv (full SIMD channel blocks), only the first P through the vertical one.
    """
    p, h, w = xc.shape
    mv = maps[:p]
    mv[:, 0].copy_(xc)
    mv[:, 1].copy_(yc)
    torch.mul(xc, xc, out=mv[:, 2]).addcmul_(yc, yc)
    torch.mul(xc, yc, out=mv[:, 3])
    hor = _hpass(maps.view(-1, h, w), win, 0)
    filt = _vpass(hor[: 4 * p], win, 0)
    return filt.view(p, 4, filt.shape[1], filt.shape[2]).transpose(0, 1)


def _cpu_terms(filt: torch.Tensor, c1: float, c2: float):
    """Filtered maps (4, P, H', W') -> (lum, cs, b1, b2) maps; b1, b2 the luminance / cs denominators."""
    mu_x, mu_y, e_2, e_xy = filt.unbind(0)
    mxy = mu_x * mu_y
    b1 = torch.mul(mu_x, mu_x).addcmul_(mu_y, mu_y)  # mu_x^2 + mu_y^2
    b2 = torch.sub(e_2, b1).add_(c2)  # s_xx + s_yy + C2
    cs = torch.sub(e_xy, mxy).mul_(2.0).add_(c2).div_(b2)  # (2 s_xy + C2) / b2
    b1.add_(c1)
    lum = mxy.mul_(2.0).add_(c1).div_(b1)  # (2 mu_x mu_y + C1) / b1
    return lum, cs, b1, b2


# Threads. With T > 1 intra-op threads, every small op of a chunk would be its own OpenMP parallel
# region (~40 per chunk); on a busy machine each region's barrier waits for a descheduled partner and
# the chunked path ran 10-20x slower with 2 threads than with 1. Instead the chunks are split into T
# contiguous runs, each run by a worker thread whose own intra-op thread count is 1 (OpenMP's thread
# count is per calling thread: the caller's stays T). Inside tracing / dispatch modes (FakeTensor,
# torch.compile) everything stays on the calling thread, whose modes worker threads would not see.

_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()
_ONE_THREAD = threading.local()


def _pool(n: int) -> concurrent.futures.ThreadPoolExecutor:
    with _POOL_LOCK:
        pool = _POOLS.get(n)
        if pool is None:
            pool = _POOLS[n] = concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="fastgen-ssim")
        return pool


def _single_threaded(fn, lo: int, hi: int) -> None:
    if not getattr(_ONE_THREAD, "set", False):
        torch.set_num_threads(1)  # this worker's OpenMP / MKL thread count
        _ONE_THREAD.set = True
    with torch.no_grad():
        fn(lo, hi)


def _run_chunks(fn, planes: int, step: int, x: torch.Tensor) -> None:
    """``fn(lo, hi)`` over planes ``0 .. planes - 1``: on the calling thread, or in T chunk-aligned runs
    on T single-threaded workers when torch has T > 1 threads and there are >= 2 chunks."""
    threads = torch.get_num_threads()
    chunks = -(-planes // step)
    parts = min(threads, chunks)
    if parts <= 1 or not _plain_eager(x, x):
        fn(0, planes)
        return
    per = -(-chunks // parts) * step
    runs = [(lo, min(lo + per, planes)) for lo in range(0, planes, per)]
    futures = [_pool(threads).submit(_single_threaded, fn, lo, hi) for lo, hi in runs]
    for fut in futures:
        fut.result()
    # a worker's set_num_threads(1) also set the default that threads started later inherit: restore it
    # (the caller's own thread count is unchanged)
    torch.set_num_threads(threads)


def _ssim_cpu(x, y, data_range, window_size, sigma, k1, k2, *, keep: bool = False):
    """Forward on CPU: (B, C, H, W) x 2 -> (B, C, 2) float32 (float64 for float64), chunked separable.

    Layout and chunking: see the comment block above :data:`CPU_CHUNK_ELEMS`. fp16 / bf16 planes are
    converted to fp32 one chunk at a time (no full-size fp32 copy of the batch). ``keep``: return
    ``(stats, filtered)`` where ``filtered`` is the (4, B C, H', W') filtered maps when the batch is a
    single chunk (so a backward need not recompute them), else None.
    """
    b, c, h, w = x.shape
    dt = _compute_dtype(x.dtype)
    ho, wo = h - window_size + 1, w - window_size + 1
    out = torch.empty((b * c, 2), dtype=dt, device=x.device)
    if b == 0:
        return (out.view(b, c, 2), None) if keep else out.view(b, c, 2)
    win = gaussian_window(window_size, sigma, dtype=dt, device=x.device)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    xf, yf = x.reshape(b * c, h, w), y.reshape(b * c, h, w)
    step = min(_chunk_planes(h, w), b * c)
    kept = []

    def run(lo: int, hi: int) -> None:  # planes lo .. hi - 1, whole chunks
        maps = _maps_buffer(min(step, hi - lo), h, w, dt, x.device)
        for i in range(lo, hi, step):
            xc = xf[i : min(i + step, hi)].to(dt).contiguous()
            yc = yf[i : min(i + step, hi)].to(dt).contiguous()
            filt = _cpu_filtered(xc, yc, win, maps)
            lum, cs, _, _ = _cpu_terms(filt, c1, c2)
            torch.sum(cs, (1, 2), out=out[i : i + xc.shape[0], 1])
            torch.sum(lum.mul_(cs), (1, 2), out=out[i : i + xc.shape[0], 0])
        kept.append(filt)

    _run_chunks(run, b * c, step, x)
    out = out.div_(ho * wo).view(b, c, 2)
    if keep:
        return out, (kept[0] if step == b * c else None)
    return out


def _ssim_backward_cpu(x, y, grad, data_range, window_size, sigma, k1, k2, filt=None):
    """grad: (B, C, 2) of the (ssim, cs) means -> (dx, dy) in x's dtype; chunked like :func:`_ssim_cpu`.

    With p = dL/dcs_map, q = dL/dlum_map, u = 2 q / b1 and v = 2 p / b2 per pixel, the coefficient maps
    of (mu_x, mu_y, E[x^2 + y^2], E[xy]) are (A mu_x + D mu_y, A mu_y + D mu_x, -v cs / 2, v) with
    A = v cs - u lum and D = u - v; filtered back by the adjoint G^T (t_*),
    ``dx = t_mx + 2 x t_e2 + y t_exy`` and ``dy = t_my + 2 y t_e2 + x t_exy``. ``filt``: the forward's
    filtered maps of a single-chunk batch (``_ssim_cpu(..., keep=True)``), else recomputed per chunk.
    """
    b, c, h, w = x.shape
    dt = _compute_dtype(x.dtype)
    ho, wo = h - window_size + 1, w - window_size + 1
    dx = torch.empty((b * c, h, w), dtype=x.dtype, device=x.device)
    dy = torch.empty((b * c, h, w), dtype=y.dtype, device=y.device)
    if b == 0:
        return dx.view(x.shape), dy.view(y.shape)
    win = gaussian_window(window_size, sigma, dtype=dt, device=x.device)
    wflip = win.flip(0)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    g2 = grad.to(dt).reshape(b * c, 2) / (ho * wo)
    xf, yf = x.reshape(b * c, h, w), y.reshape(b * c, h, w)
    step = min(_chunk_planes(h, w), b * c)
    pad = window_size - 1

    def run(lo: int, hi: int) -> None:  # planes lo .. hi - 1, whole chunks
        n = min(step, hi - lo)
        maps = _maps_buffer(n, h, w, dt, x.device) if filt is None else None
        # coefficient maps (plane-major like the maps), zero-padded by k - 1 columns on both sides (the
        # borders stay zero across chunks): oneDNN's depthwise conv with padding along W is ~10x slower
        # than on a padded input
        coef_buf = torch.zeros((_padded_planes(n), 4, ho, wo + 2 * pad), dtype=dt, device=x.device)
        f = filt
        for i in range(lo, hi, step):
            xc = xf[i : min(i + step, hi)].to(dt).contiguous()
            yc = yf[i : min(i + step, hi)].to(dt).contiguous()
            p = xc.shape[0]
            if maps is not None:
                f = _cpu_filtered(xc, yc, win, maps)
            mu_x, mu_y = f[0], f[1]
            lum, cs, b1, b2 = _cpu_terms(f, c1, c2)
            gs = g2[i : i + p, 0].view(p, 1, 1)
            gc = g2[i : i + p, 1].view(p, 1, 1)
            coef = coef_buf[:p, :, :, pad : pad + wo].transpose(0, 1)  # (4, p, ho, wo) view
            v = torch.mul(lum, gs).add_(gc).mul_(2.0).div_(b2)  # 2 p / b2
            u = torch.mul(cs, gs).mul_(2.0).div_(b1)  # 2 q / b1
            a = torch.mul(v, cs).sub_(u.mul(lum))  # A
            d = u.sub_(v)  # D
            torch.mul(a, mu_x, out=coef[0]).addcmul_(d, mu_y)
            torch.mul(a, mu_y, out=coef[1]).addcmul_(d, mu_x)
            torch.mul(v, cs, out=coef[2]).neg_()  # 2 * (-v cs / 2): the 2 of 2 x t_e2 folded in
            coef[3].copy_(v)
            hor = _hpass(coef_buf.view(-1, ho, wo + 2 * pad), wflip, 0)
            back = _vpass(hor[: 4 * p], wflip, pad)
            t_mx, t_my, t_e2, t_xy = back.view(p, 4, h, w).unbind(1)
            dx[i : i + p] = t_mx.addcmul_(xc, t_e2).addcmul_(yc, t_xy)
            dy[i : i + p] = t_my.addcmul_(yc, t_e2).addcmul_(xc, t_xy)

    _run_chunks(run, b * c, step, x)
    return dx.view(x.shape), dy.view(y.shape)


def _ssim_torch(x, y, data_range, window_size, sigma, k1, k2):
    if x.device.type == "cpu":
        return _ssim_cpu(x, y, data_range, window_size, sigma, k1, k2)
    return ssim_ref(x, y, data_range=data_range, window_size=window_size, sigma=sigma, k1=k1, k2=k2)


OP.register("triton", devices=("cuda",), dtypes=X_DTYPES, available=_backend.triton_available,
            check=_backend.triton_check(window_size=MAX_TRITON_WINDOW), forced_only_devices=("cpu",),
            note="one pass: separable Gaussian filtering of x, y, xx, yy, xy in tiles, per-tile sums")(_ssim_triton)  # fmt: skip
OP.register("torch", devices=("cpu", "cuda", "mps", "xpu"), dtypes=(*X_DTYPES, torch.float64),
            note="ssim_ref: five depthwise conv2d")(_ssim_torch)  # fmt: skip


# =====================================================================================================
# Backward (analytic, PyTorch) and the torch.library op
# =====================================================================================================


def _ssim_backward(x, y, grad, data_range, window_size, sigma, k1, k2):
    """grad: (B, C, 2) upstream gradient of the (ssim, cs) means -> (dx, dy) in x's dtype."""
    if x.device.type == "cpu":
        return _ssim_backward_cpu(x, y, grad, data_range, window_size, sigma, k1, k2)
    dt = _compute_dtype(x.dtype)
    xf, yf = x.to(dt), y.to(dt)
    b, c, h, w = x.shape
    ho, wo = h - window_size + 1, w - window_size + 1
    g = gaussian_window(window_size, sigma, dtype=dt, device=x.device)
    gh, gv = g.view(1, 1, 1, window_size), g.view(1, 1, window_size, 1)
    maps = torch.stack((xf, yf, xf * xf, yf * yf, xf * yf), dim=2).view(b * c * 5, 1, h, w)
    filt = F.conv2d(F.conv2d(maps, gh), gv).view(b, c, 5, ho, wo)
    mu_x, mu_y, e_xx, e_yy, e_xy = filt.unbind(2)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    a1 = 2 * mu_x * mu_y + c1
    b1 = mu_x * mu_x + mu_y * mu_y + c1
    b2 = (e_xx - mu_x * mu_x) + (e_yy - mu_y * mu_y) + c2
    lum = a1 / b1
    cs = (2 * (e_xy - mu_x * mu_y) + c2) / b2
    gs = grad[..., 0].to(dt)[..., None, None] / (ho * wo)
    gc = grad[..., 1].to(dt)[..., None, None] / (ho * wo)
    p = gs * lum + gc  # dL/dcs_map
    q = gs * cs  # dL/dlum_map
    d_exy = 2 * p / b2
    d_exx = -p * cs / b2  # = d_eyy
    d_mx = 2 * q * (mu_y - lum * mu_x) / b1 + 2 * p * (cs * mu_x - mu_y) / b2
    d_my = 2 * q * (mu_x - lum * mu_y) / b1 + 2 * p * (cs * mu_y - mu_x) / b2
    coef = torch.stack((d_mx, d_my, d_exx, d_exy), dim=2).view(b * c * 4, 1, ho, wo)
    back = F.conv_transpose2d(F.conv_transpose2d(coef, gv), gh).view(b, c, 4, h, w)
    t_mx, t_my, t_exx, t_exy = back.unbind(2)
    dx = t_mx + 2 * xf * t_exx + yf * t_exy
    dy = t_my + 2 * yf * t_exx + xf * t_exy
    return dx.to(x.dtype), dy.to(y.dtype)


def _call(x: torch.Tensor, window_size: int) -> Call:
    return Call(x.device, x.dtype, {"window_size": window_size, "pixels": x.shape[-2] * x.shape[-1]})


@torch.library.custom_op("fastgen::ssim", mutates_args=())
def _ssim_op(
    x: torch.Tensor, y: torch.Tensor, data_range: float, window_size: int, sigma: float, k1: float, k2: float
) -> torch.Tensor:
    backend = OP.dispatch(_call(x, window_size))
    return backend.fn(x, y, data_range, window_size, sigma, k1, k2)


@_ssim_op.register_fake
def _(x, y, data_range, window_size, sigma, k1, k2):
    return x.new_empty((x.shape[0], x.shape[1], 2), dtype=_compute_dtype(x.dtype))


def _setup_context(ctx, inputs, output):
    x, y, data_range, window_size, sigma, k1, k2 = inputs
    ctx.save_for_backward(x, y)
    ctx.args = (data_range, window_size, sigma, k1, k2)


def _backward(ctx, grad):
    x, y = ctx.saved_tensors
    dx, dy = _ssim_backward(x, y, grad, *ctx.args)
    return dx, dy, None, None, None, None, None


_ssim_op.register_autograd(_backward, setup_context=_setup_context)


def ssim_stats(
    img1: torch.Tensor,
    img2: torch.Tensor,
    *,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Per-(image, channel) means of the SSIM and cs maps: (B, C, H, W) x 2 -> (B, C, 2) = (ssim, cs).

    img1, img2: same shape, dtype (fp16 / bf16 / fp32 computed in fp32; fp64 on the torch backend) and
    device; H, W >= window_size. Differentiable in both images (analytic backward, see the module
    docstring). Returns float32 (float64 for float64 inputs).
    """
    check_ssim_args(img1, img2, data_range, window_size, sigma, k1, k2)
    args = (img1, img2, float(data_range), int(window_size), float(sigma), float(k1), float(k2))
    if _plain_eager(img1, img2):
        return _SSIMEager.apply(*args)
    return _ssim_op(*args)


# ---- plain eager calls skip the custom-op machinery ------------------------------------------------------
#
# torch.library's Python custom op costs ~100 us per call on a CPU (autograd wrapper, redispatch): 10-15%
# of a small SSIM. In plain eager mode (plain tensors, nothing tracing) the same dispatch and the same
# analytic backward run through an autograd.Function instead; anything that traces (torch.compile /
# export, FakeTensor and other dispatch modes, tensor subclasses) still sees the one custom op.


def _plain_eager(x: torch.Tensor, y: torch.Tensor) -> bool:
    return _backend.plain_eager(x) and type(y) is torch.Tensor


class _SSIMEager(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, data_range, window_size, sigma, k1, k2):
        backend = OP.dispatch(_call(x, window_size))
        ctx.filt = None
        if backend.name == "torch" and x.device.type == "cpu" and any(ctx.needs_input_grad[:2]):
            # a single-chunk batch keeps its filtered maps for the backward (two convs fewer)
            out, ctx.filt = _ssim_cpu(x, y, data_range, window_size, sigma, k1, k2, keep=True)
        else:
            out = backend.fn(x, y, data_range, window_size, sigma, k1, k2)
        ctx.save_for_backward(x, y)
        ctx.args = (data_range, window_size, sigma, k1, k2)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        if ctx.filt is not None:
            dx, dy = _ssim_backward_cpu(x, y, grad, *ctx.args, filt=ctx.filt)
        else:
            dx, dy = _ssim_backward(x, y, grad, *ctx.args)
        ctx.filt = None
        return dx, dy, None, None, None, None, None

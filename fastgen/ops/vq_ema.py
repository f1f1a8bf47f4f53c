r"""EMA codebook statistics for vector quantisation (VQ-VAE / VQ-VAE-2), by index_add in O(N * D).

With rows ``x: (N, D)`` assigned to codes ``indices: (N,)`` in ``[0, K)`` and the running statistics
``cluster_size: (K,)``, ``embed_sum: (K, D)`` (float32, updated in place)::

    counts[k]       = #{n : indices[n] = k}
    sums[k]         = sum_{n : indices[n] = k} x[n]
    cluster_size[k] = decay * cluster_size[k] + (1 - decay) * counts[k]
    embed_sum[k]    = decay * embed_sum[k]    + (1 - decay) * sums[k]

Multi-head: ``x: (H, N, D)``, ``indices: (H, N)``, ``cluster_size: (H, K)``, ``embed_sum: (H, K, D)``,
one independent codebook per head. The popular formulation builds the (N, K) one-hot and computes
``onehot.T @ x``: O(N K D) FLOPs and an N x K tensor (65536 x 8192 fp32 = 2 GiB). Here each row is added
to its code's sum once: O(N D). That one-hot form is :func:`vq_ema_update_ref`, the oracle.

The codebook follows from the statistics with Laplace smoothing (van den Oord et al. 2017, appendix;
Razavi et al. 2019, VQ-VAE-2), see :func:`vq_codebook_from_ema`::

    n  = sum_k cluster_size[k]
    cs = (cluster_size + eps) / (n + K * eps) * n
    codebook[k] = embed_sum[k] / cs[k]

Backends
--------
* ``triton`` (CUDA; CPU only under ``TRITON_INTERPRET=1`` when forced):
  - default: the statistics are scaled by ``decay`` in place, then one program per (BLOCK_N rows,
    BLOCK_D columns, head) adds ``(1 - decay) * x`` to its rows' codes with fp32 ``atomic_add``. The
    order of the additions varies from run to run, so results may differ in the last bits.
  - ``deterministic=True``: rows are stably sorted by code (``argsort(stable=True)``, segment offsets by
    ``bincount`` + ``cumsum``) and one program per (code, BLOCK_D columns) sums its rows in a fixed order
    and writes ``decay * old + (1 - decay) * sum``: bit-identical run to run.
* ``torch`` (any device): ``index_add_`` (deterministic on CPU); with ``deterministic`` on other devices
  ``index_put_(accumulate=True)``, which sorts and reduces in a fixed order on CUDA.
No host synchronisation on CUDA (out-of-range indices are caught with ``torch._assert_async``).
"""

from __future__ import annotations

import torch

from fastgen import _backend
from fastgen._backend import Call
from fastgen._checks import check_real

try:  # triton is optional (not on every platform)
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None
    tl = None

X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

OP = _backend.get_op("vq_ema", "EMA codebook statistics update (cluster sizes, per-code sums) by index_add")


def _err(msg: str) -> ValueError:
    return ValueError(f"fastgen.vq_ema_update: {msg}")


# =====================================================================================================
# Reference (the oracle): the one-hot einsum form
# =====================================================================================================


def vq_ema_update_ref(
    x: torch.Tensor,
    indices: torch.Tensor,
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    decay: float,
    *,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-hot formulation (O(N K D)), NOT in place: returns the new ``(cluster_size, embed_sum)``.

    Shapes as :func:`vq_ema_update`. Computed in float64 when ``upcast`` (else float32); returned in
    the statistics' dtype.
    """
    dt = torch.float64 if upcast else torch.float32
    k = cluster_size.shape[-1]
    onehot = torch.nn.functional.one_hot(indices.long(), k).to(dt)  # (..., N, K)
    counts = onehot.sum(-2)
    sums = torch.einsum("...nk,...nd->...kd", onehot, x.to(dt))
    new_cs = decay * cluster_size.to(dt) + (1.0 - decay) * counts
    new_es = decay * embed_sum.to(dt) + (1.0 - decay) * sums
    return new_cs.to(cluster_size.dtype), new_es.to(embed_sum.dtype)


def vq_codebook_from_ema(
    cluster_size: torch.Tensor, embed_sum: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """Codebook from the EMA statistics with Laplace smoothing.

    cluster_size: (K,) or (H, K); embed_sum: (K, D) or (H, K, D). Per head, with n = sum_k cluster_size:
    ``cs = (cluster_size + eps) / (n + K * eps) * n`` and ``codebook = embed_sum / cs[..., None]``.
    Returns (K, D) / (H, K, D) in embed_sum's dtype.
    """
    if cluster_size.dim() not in (1, 2) or embed_sum.dim() != cluster_size.dim() + 1:
        raise ValueError(
            "fastgen.vq_codebook_from_ema: expected cluster_size (K,) / (H, K) and embed_sum (K, D) / "
            f"(H, K, D), got {tuple(cluster_size.shape)} and {tuple(embed_sum.shape)}"
        )
    if embed_sum.shape[:-1] != cluster_size.shape:
        raise ValueError(
            "fastgen.vq_codebook_from_ema: embed_sum.shape[:-1] must equal cluster_size.shape "
            f"{tuple(cluster_size.shape)}, got {tuple(embed_sum.shape)}"
        )
    check_real("fastgen.vq_codebook_from_ema", "eps", eps, 0.0, lo_open=True)
    k = cluster_size.shape[-1]
    n = cluster_size.sum(-1, keepdim=True)
    cs = (cluster_size + eps) / (n + k * eps) * n
    return embed_sum / cs[..., None]


# =====================================================================================================
# torch backend
# =====================================================================================================


def _flat_codes(indices: torch.Tensor, k: int) -> torch.Tensor:
    """(H, N) codes -> (H * N,) codes into the flattened (H * K) statistics."""
    h = indices.shape[0]
    base = torch.arange(h, device=indices.device, dtype=torch.int64)[:, None] * k
    return (indices.long() + base).reshape(-1)


def _update_torch(x, indices, cluster_size, embed_sum, decay, deterministic):
    h, n, d = x.shape
    k = cluster_size.shape[-1]
    codes = _flat_codes(indices, k)
    cs, es = cluster_size.view(h * k), embed_sum.view(h * k, d)
    rows = x.reshape(h * n, d).to(torch.float32)
    counts = torch.bincount(codes, minlength=h * k)
    sums = torch.zeros((h * k, d), dtype=torch.float32, device=x.device)
    if deterministic and x.device.type != "cpu":
        # CUDA index_add_ uses atomics; index_put_(accumulate=True) sorts and reduces in a fixed order.
        # (CPU index_add_ already adds the rows in index order.)
        sums.index_put_((codes,), rows, accumulate=True)
    else:
        sums.index_add_(0, codes, rows)
    cs.mul_(decay).add_(counts.to(torch.float32), alpha=1.0 - decay)
    es.mul_(decay).add_(sums, alpha=1.0 - decay)


# =====================================================================================================
# Triton kernels
# =====================================================================================================

if triton is not None:

    @triton.jit
    def _ema_atomic_kernel(
        X, Idx, CS, ES, N, D, K, sxh, sxn, sxd, sih, sin, w,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """ES[h, idx[h, n], :] += w * x[h, n, :] and CS[h, idx[h, n]] += w (statistics already scaled)."""
        pid_n = tl.program_id(0)
        pid_d = tl.program_id(1)
        h = tl.program_id(2).to(tl.int64)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        codes = tl.load(Idx + h * sih + rows.to(tl.int64) * sin, mask=rmask, other=0).to(tl.int64)
        codes = h * K + codes
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (cols < D)[None, :]
        xp = X + h * sxh + rows.to(tl.int64)[:, None] * sxn + cols[None, :] * sxd
        xv = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
        tl.atomic_add(ES + codes[:, None] * D + cols[None, :], xv * w, mask=mask, sem="relaxed")
        if pid_d == 0:
            ones = tl.full((BLOCK_N,), 1.0, tl.float32)
            tl.atomic_add(CS + codes, ones * w, mask=rmask, sem="relaxed")

    @triton.jit
    def _ema_segment_kernel(
        X, Order, Offs, CS, ES, N, D, sxh, sxn, sxd, decay, w,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Code c = program_id(0) (over H * K) sums its sorted rows Order[Offs[c]:Offs[c + 1]] in a fixed
        order and writes ES[c] = decay * ES[c] + w * sum, CS[c] = decay * CS[c] + w * count."""
        c = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1)
        start = tl.load(Offs + c)
        end = tl.load(Offs + c + 1)
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < D
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for r0 in range(start, end, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            m = r < end
            g = tl.load(Order + r, mask=m, other=0)  # row of the flattened (H * N) rows
            xp = X + ((g // N) * sxh + (g % N) * sxn)[:, None] + cols[None, :] * sxd
            acc += tl.load(xp, mask=m[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        s = tl.sum(acc, axis=0)
        ep = ES + c * D + cols
        old = tl.load(ep, mask=cmask, other=0.0)
        tl.store(ep, decay * old + w * s, mask=cmask)
        if pid_d == 0:
            cnt = (end - start).to(tl.float32)
            tl.store(CS + c, decay * tl.load(CS + c) + w * cnt)


def _update_triton(x, indices, cluster_size, embed_sum, decay, deterministic):
    h, n, d = x.shape
    k = cluster_size.shape[-1]
    w = 1.0 - decay
    block_d = min(128, triton.next_power_of_2(max(d, 1)))
    if not deterministic:
        cluster_size.mul_(decay)
        embed_sum.mul_(decay)
        if n == 0:
            return
        block_n = 32
        grid = (triton.cdiv(n, block_n), triton.cdiv(d, block_d), h)
        _ema_atomic_kernel[grid](
            x, indices, cluster_size, embed_sum, n, d, k,
            x.stride(0), x.stride(1), x.stride(2), indices.stride(0), indices.stride(1), w,
            BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
        return
    codes = _flat_codes(indices, k)
    order = torch.argsort(codes, stable=True)
    offs = torch.zeros(h * k + 1, dtype=torch.int64, device=x.device)
    torch.cumsum(torch.bincount(codes, minlength=h * k), 0, out=offs[1:])
    grid = (h * k, triton.cdiv(d, block_d))
    _ema_segment_kernel[grid](
        x, order, offs, cluster_size, embed_sum, n, d,
        x.stride(0), x.stride(1), x.stride(2), decay, w,
        BLOCK_R=16, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip


# =====================================================================================================
# Backends and the torch.library op
# =====================================================================================================

OP.register("triton", devices=("cuda",), dtypes=X_DTYPES, available=_backend.triton_available,
            check=_backend.triton_check(), forced_only_devices=("cpu",),
            note="fp32 atomic_add per row (deterministic: sorted segments, fixed order)")(_update_triton)  # fmt: skip
OP.register("torch", devices=("cpu", "cuda", "mps", "xpu"), dtypes=(*X_DTYPES, torch.float64),
            note="index_add_ (deterministic on CUDA: index_put_ accumulate, sort-based)")(_update_torch)  # fmt: skip


def _call(x: torch.Tensor, k: int) -> Call:
    return Call(x.device, x.dtype, {"heads": x.shape[0], "rows": x.shape[1], "dim": x.shape[2], "codes": k})


@torch.library.custom_op("fastgen::vq_ema_update", mutates_args=("cluster_size", "embed_sum"))
def _vq_ema_update_op(
    x: torch.Tensor,
    indices: torch.Tensor,
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    decay: float,
    deterministic: bool,
) -> None:
    backend = OP.dispatch(_call(x, cluster_size.shape[-1]))
    backend.fn(x, indices, cluster_size, embed_sum, decay, deterministic)


@_vq_ema_update_op.register_fake
def _(x, indices, cluster_size, embed_sum, decay, deterministic):
    return None


def _check(x, indices, cluster_size, embed_sum, decay) -> None:
    for name, t in (("x", x), ("indices", indices), ("cluster_size", cluster_size), ("embed_sum", embed_sum)):
        if not isinstance(t, torch.Tensor):
            raise _err(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() not in (2, 3):
        raise _err(f"x must be (N, D) or (H, N, D), got shape {tuple(x.shape)}")
    multi = x.dim() == 3
    lead = tuple(x.shape[:1]) if multi else ()
    k = cluster_size.shape[-1] if cluster_size.dim() > 0 else -1
    d = x.shape[-1]
    expect = {
        "indices": (indices, (*lead, x.shape[-2]), "(H, N)" if multi else "(N,)"),
        "cluster_size": (cluster_size, (*lead, k), "(H, K)" if multi else "(K,)"),
        "embed_sum": (embed_sum, (*lead, k, d), "(H, K, D)" if multi else "(K, D)"),
    }
    for name, (t, shape, layout) in expect.items():
        if tuple(t.shape) != shape:
            raise _err(
                f"{name} must be {layout} = {shape} for x of shape {tuple(x.shape)}, got {tuple(t.shape)}"
            )
    if k < 1:
        raise _err(f"the codebook is empty (K = {k}): cluster_size must have K >= 1 codes")
    if x.dtype not in (*X_DTYPES, torch.float64):
        raise _err(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise _err(f"indices must be int32 or int64, got {indices.dtype}")
    for name, t in (("cluster_size", cluster_size), ("embed_sum", embed_sum)):
        if t.dtype != torch.float32:
            raise _err(f"{name} must be float32 (statistics are kept in fp32), got {t.dtype}")
        if not t.is_contiguous():
            raise _err(f"{name} must be contiguous (it is updated in place)")
    for name, t in (("indices", indices), ("cluster_size", cluster_size), ("embed_sum", embed_sum)):
        if t.device != x.device:
            raise _err(f"{name} must be on x's device {x.device}, got {t.device}")
    check_real("fastgen.vq_ema_update", "decay", decay, 0.0, 1.0)
    if indices.numel() == 0:
        return
    if indices.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= k:
            raise _err(f"indices must lie in [0, K) = [0, {k}), got values in [{lo}, {hi}]")
    else:  # on the device (or while tracing), without a host sync
        torch._assert_async(
            (indices.min() >= 0) & (indices.max() < k), "fastgen.vq_ema_update: index out of range"
        )


def vq_ema_update(
    x: torch.Tensor,
    indices: torch.Tensor,
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    decay: float,
    *,
    deterministic: bool = False,
) -> None:
    """EMA update of the codebook statistics, in place (see the module docstring for the math).

    x: (N, D) or (H, N, D) float16 / bfloat16 / float32 rows; indices: (N,) / (H, N) int32 or int64 codes
    in [0, K); cluster_size: (K,) / (H, K) float32; embed_sum: (K, D) / (H, K, D) float32, both contiguous
    and updated in place; decay in [0, 1]. Codes without rows only decay. ``deterministic=True``: a fixed
    summation order, bit-identical results run to run (sorts the rows by code first). Not differentiable
    (statistics are buffers). Returns None.
    """
    _check(x, indices, cluster_size, embed_sum, decay)
    if x.dim() == 2:
        x, indices = x.unsqueeze(0), indices.unsqueeze(0)
        cluster_size, embed_sum = cluster_size.unsqueeze(0), embed_sum.unsqueeze(0)
    with torch.no_grad():
        _vq_ema_update_op(
            x.detach(), indices.contiguous(), cluster_size, embed_sum, float(decay), deterministic
        )

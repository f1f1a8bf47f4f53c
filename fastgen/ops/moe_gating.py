r"""GShard / GLaM top-2 gating: which two experts each token goes to, with what weights, and the router losses.

For token ``t`` with router logits ``x_t: (E,)`` (Lepikhin et al. 2020, "GShard", Algorithm 1; Du et al.
2021, "GLaM"; Zoph et al. 2022, "ST-MoE" for the z-loss)::

    p_t        = softmax(x_t)                          # float32 (float64 for float64 logits)
    e1, e2     = the top-2 experts of p_t              # ties: the lowest index first, as torch.topk
    g1, g2     = p_t[e1], p_t[e2] / (p_t[e1] + p_t[e2])  (normalize=True; else the raw probabilities)
    second choice routed?   "all": always; "threshold": g2 > second_threshold;
                            "random": u_t < g2 / max(second_threshold, eps), u_t ~ U[0, 1)
    capacity C = ceil(capacity_factor * T * 2 / E), at least min_capacity (None: dropless)
    priority   : every first choice (token order), then every second choice; an assignment whose rank
                 among the earlier routed assignments to its expert is >= C is dropped (gate 0)
    aux_loss   = E * sum_e f_e * P_e,  f_e = #{t: e1_t = e} / T,  P_e = mean_t p_t[e]   (load balancing)
    z_loss     = mean_t logsumexp(x_t)^2

The per-token part (softmax, top-2, logsumexp and the per-expert probability sums behind ``P_e``) is one
Triton kernel that reads each row of logits once and writes O(T + E) values: the (T, E) probabilities are
never materialised in the forward. Its backward is the exact softmax-Jacobian formula in PyTorch (below).
The capacity / priority decisions go through :func:`fastgen.ops.moe_permute.moe_route`.

Backends: ``triton`` (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1`` when forced) and
``torch`` (any device and float dtype, float64 included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastgen import _backend, _ext
from fastgen._backend import Call
from fastgen._checks import check_int, check_real
from fastgen.ops.moe_permute import Routing, route_trusted

try:  # triton is optional (not on every platform)
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None
    tl = None

K = 2
POLICIES = ("all", "threshold", "random")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_KERNEL_EXPERTS = 8192  # one row of logits per program lives in registers
_EPS = 1e-9

OP = _backend.get_op("moe_gating", "top-2 router: softmax, top-2, logsumexp, per-expert probability sums")


def _err(msg: str) -> ValueError:
    return ValueError(f"fastgen.top2_gating: {msg}")


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 logits keep float64 statistics (float64-accurate gradients, gradcheck); else float32
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class Gating:
    """The router's decisions for T tokens and E experts.

    expert_idx: (T, 2) int32, first and second expert of each token.
    gates: (T, 2) float32 (float64 for float64 logits), combine weights; 0 where dropped / not routed;
        differentiable w.r.t. the logits.
    routing: :class:`fastgen.ops.moe_permute.Routing` of ``expert_idx`` (dest / src / offsets / counts).
    capacity: slots per expert, None when dropless.
    aux_loss, z_loss: differentiable scalars (see the module docstring).
    expert_counts: (E,) int32 routed assignments per expert before capacity dropping.
    dropped: int64 scalar tensor, routed assignments dropped by capacity.
    """

    expert_idx: torch.Tensor
    gates: torch.Tensor
    routing: Routing
    capacity: int | None
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    expert_counts: torch.Tensor
    dropped: torch.Tensor


def capacity_for(
    num_tokens: int, num_experts: int, capacity_factor: float | None, k: int = K, min_capacity: int = 4
) -> int | None:
    """Slots per expert: ``ceil(capacity_factor * num_tokens * k / num_experts)``, at least ``min_capacity``.

    None when ``capacity_factor`` is None (dropless). The ceiling forgives a 1e-9 relative rounding
    error, so that e.g. 1.1 * 10 * 2 / 2 gives 11, not 12.
    """
    where = "fastgen.capacity_for"
    check_int(where, "num_tokens", num_tokens, 0)
    check_int(where, "num_experts", num_experts, 1)
    check_int(where, "k", k, 1)
    check_int(where, "min_capacity", min_capacity, 0)
    if capacity_factor is None:
        return None
    check_real(where, "capacity_factor", capacity_factor, 0.0, lo_open=True)
    exact = capacity_factor * num_tokens * k / num_experts
    return max(int(min_capacity), math.ceil(exact * (1 - 1e-9)))


# =====================================================================================================
# Reference (the oracle): GShard's formulation, one-hot masks and cumulative sums
# =====================================================================================================


def _uniform(num_tokens: int, device: torch.device, seed: int | None) -> torch.Tensor:
    """u ~ U[0, 1) per token for the "random" policy: from ``seed``, else torch's default generator."""
    if seed is None:
        return torch.rand(num_tokens, device=device)
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return torch.rand(num_tokens, device=device, generator=g)


def _second_valid(g2: torch.Tensor, policy: str, threshold: float, seed: int | None) -> torch.Tensor:
    """(T,) bool: is the second choice routed? g2: the renormalised second gate."""
    g2 = g2.detach()
    if policy == "all":
        return torch.ones_like(g2, dtype=torch.bool)
    if policy == "threshold":
        return g2 > threshold
    u = _uniform(g2.shape[0], g2.device, seed)
    return u.to(g2.dtype) < g2 / max(threshold, _EPS)


def top2_gating_ref(
    logits: torch.Tensor,
    *,
    capacity_factor: float | None = 1.25,
    min_capacity: int = 4,
    second_expert_policy: str = "all",
    second_threshold: float = 0.2,
    seed: int | None = None,
    normalize: bool = True,
) -> Gating:
    """:func:`top2_gating` in plain PyTorch: GShard's one-hot / cumsum capacity, its own routing tables.

    The routing here is built from the one-hot positions (expert e's kept assignments are rows
    ``offsets[e] + position``, offsets the cumulative kept counts), independently of ``moe_route``.
    """
    _check(logits, capacity_factor, second_expert_policy, min_capacity, second_threshold)
    if not bool(torch.isfinite(logits).all()):
        raise _err("logits contain NaN or +-inf")
    t, e = logits.shape
    dt = _stat_dtype(logits.dtype)
    x = logits.to(dt)
    probs = torch.softmax(x, dim=-1)
    # a stable descending sort puts equal logits in index order: the lowest index wins a tie
    idx = torch.sort(x.detach(), dim=-1, descending=True, stable=True).indices[:, :K]
    top = probs.gather(1, idx)
    g_norm = top / top.sum(-1, keepdim=True)
    gates = g_norm if normalize else top
    g2 = g_norm[:, 1].detach()
    if second_expert_policy == "all":
        valid2 = torch.ones(t, dtype=torch.bool, device=logits.device)
    elif second_expert_policy == "threshold":
        valid2 = g2 > second_threshold
    else:  # "random": the same draw as top2_gating, the comparison written out again
        valid2 = _uniform(t, logits.device, seed).to(dt) < g2 / max(second_threshold, _EPS)

    cap = capacity_for(t, e, capacity_factor, K, min_capacity)
    mask1 = torch.nn.functional.one_hot(idx[:, 0], e)  # (T, E)
    mask2 = torch.nn.functional.one_hot(idx[:, 1], e) * valid2[:, None]
    loc1 = torch.cumsum(mask1, 0) - 1
    loc2 = torch.cumsum(mask2, 0) - 1 + mask1.sum(0, keepdim=True)  # second choices queue behind all firsts
    if cap is not None:
        mask1k = mask1 * (loc1 < cap)
        mask2k = mask2 * (loc2 < cap)
    else:
        mask1k, mask2k = mask1, mask2
    keep = torch.stack([mask1k.sum(1), mask2k.sum(1)], 1).bool()  # (T, 2)
    counts = (mask1 + mask2).sum(0)
    kept_counts = (mask1k + mask2k).sum(0)
    offsets = torch.zeros(e + 1, dtype=torch.int64, device=logits.device)
    offsets[1:] = torch.cumsum(kept_counts, 0)
    pos = torch.stack([(loc1 * mask1).sum(1), (loc2 * mask2).sum(1)], 1)
    dest = torch.where(keep, offsets[idx] + pos, torch.full_like(pos, -1))
    src = torch.full((t * K,), -1, dtype=torch.int64, device=logits.device)
    flat = dest.reshape(-1)
    src[flat[flat >= 0]] = torch.arange(t * K, device=logits.device)[flat >= 0]
    routing = Routing(dest.int(), src.int(), offsets.int(), counts.int())

    gates = gates * keep.to(dt)
    valid = torch.stack([torch.ones_like(valid2), valid2], 1)
    dropped = (valid & ~keep).sum()
    if t > 0:
        f = mask1.sum(0).to(dt) / t
        p_mean = probs.mean(0)
        aux = e * (f * p_mean).sum()
        z = (torch.logsumexp(x, -1) ** 2).mean()
    else:
        aux = z = x.sum() * 0
    return Gating(idx.int(), gates, routing, cap, aux, z, counts.int(), dropped)


# =====================================================================================================
# torch backend (any device / dtype) and the shared backward
# =====================================================================================================
# Every backend returns (top (T, 2), lse (T,), psum (E,), idx (T, 2) int32, first (E,) int32): the raw
# softmax probabilities of the top-2 experts, the row logsumexp (NaN for a row with a non-finite logit), the
# per-expert sum of the probabilities over tokens, the top-2 expert indices and how many tokens chose each
# expert first; statistics in _stat_dtype(logits.dtype). (Integer outputs come last: opcheck sums the
# outputs in order into the first one's dtype. ``first`` is counted here, not with torch.bincount, which
# synchronises with the host on CUDA.)


def _fwd_torch(logits: torch.Tensor):
    x = logits.to(_stat_dtype(logits.dtype))
    # two argmaxes: torch.argmax returns the first maximal index, so a tie goes to the lowest index
    i1 = x.argmax(-1)
    x2 = x.scatter(1, i1[:, None], float("-inf"))
    i2 = x2.argmax(-1)
    idx = torch.stack([i1, i2], 1)
    lse = torch.logsumexp(x, -1)
    p = torch.exp(x - lse[:, None])
    lse = torch.where(torch.isfinite(x).all(-1), lse, torch.full_like(lse, float("nan")))
    first = torch.nn.functional.one_hot(i1, x.shape[1]).sum(0, dtype=torch.int32)
    return p.gather(1, idx), lse, p.sum(0), idx.int(), first


def _bwd(logits, idx, lse, g_top, g_lse, g_psum):
    """d/dx of <g_top, p[idx]> + <g_lse, lse> + <g_psum, sum_t p_t> for p = softmax(x).

    With w_t = g_psum + scatter(g_top_t at idx_t): dx_t = p_t * (g_lse_t + w_t - <p_t, w_t>).
    """
    dt = _stat_dtype(logits.dtype)
    x = logits.to(dt)
    p = torch.exp(x - lse.to(dt)[:, None])
    w = g_psum.to(dt)[None, :].expand_as(p).scatter_add(1, idx.long(), g_top.to(dt))
    dx = p * (g_lse.to(dt)[:, None] + w - (p * w).sum(-1, keepdim=True))
    return dx.to(logits.dtype)


# =====================================================================================================
# Triton kernel
# =====================================================================================================

if triton is not None:

    @triton.jit
    def _top2_fwd_kernel(X, Idx, Top, Lse, Part, CntPart, T, E, stride_xt, stride_xe,
                         BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):  # fmt: skip
        """BLOCK_T rows of logits per program: top-2, their probabilities, lse, and the partial sums
        over these rows of each expert's probability and first-choice count (Part, CntPart:
        (num_programs, E), summed in torch, so the result is deterministic, no atomics)."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_E)
        rmask = rows < T
        cmask = cols < E
        m2d = rmask[:, None] & cmask[None, :]
        ptrs = X + rows[:, None].to(tl.int64) * stride_xt + cols[None, :].to(tl.int64) * stride_xe
        x = tl.load(ptrs, mask=m2d, other=float("-inf")).to(tl.float32)
        bad = m2d & ((x != x) | (x == float("inf")) | (x == float("-inf")))
        nbad = tl.sum(bad.to(tl.int32), axis=1)
        m1 = tl.max(x, axis=1)
        i1 = tl.min(tl.where(m2d & (x == m1[:, None]), cols[None, :], BLOCK_E), axis=1)
        x2 = tl.where(cols[None, :] == i1[:, None], float("-inf"), x)
        m2 = tl.max(x2, axis=1)
        i2 = tl.min(tl.where(m2d & (x2 == m2[:, None]), cols[None, :], BLOCK_E), axis=1)
        ms = tl.where(rmask, m1, 0.0)  # rows past T are all -inf: keep them NaN-free
        e = tl.exp(x - ms[:, None])
        s = tl.where(rmask, tl.sum(e, axis=1), 1.0)
        inv = 1.0 / s
        lse = ms + tl.log(s)
        lse = tl.where(nbad > 0, float("nan"), lse)
        p1 = tl.exp(m1 - ms) * inv
        p2 = tl.exp(m2 - ms) * inv
        r64 = rows.to(tl.int64)
        tl.store(Idx + r64 * 2, i1.to(tl.int32), mask=rmask)
        tl.store(Idx + r64 * 2 + 1, i2.to(tl.int32), mask=rmask)
        tl.store(Top + r64 * 2, p1, mask=rmask)
        tl.store(Top + r64 * 2 + 1, p2, mask=rmask)
        tl.store(Lse + r64, lse, mask=rmask)
        psum = tl.sum(e * inv[:, None], axis=0)
        cnt = tl.sum(((cols[None, :] == i1[:, None]) & rmask[:, None]).to(tl.int32), axis=0)
        tl.store(Part + pid.to(tl.int64) * E + cols, psum, mask=cmask)
        tl.store(CntPart + pid.to(tl.int64) * E + cols, cnt, mask=cmask)


def _blocks(e: int) -> tuple[int, int]:
    block_e = max(16, triton.next_power_of_2(e))
    block_t = max(1, min(64, 4096 // block_e))
    return block_t, block_e


def _fwd_triton(logits: torch.Tensor):
    t, e = logits.shape
    block_t, block_e = _blocks(e)
    grid = triton.cdiv(t, block_t)
    dev = logits.device
    idx = torch.empty((t, K), dtype=torch.int32, device=dev)
    top = torch.empty((t, K), dtype=torch.float32, device=dev)
    lse = torch.empty((t,), dtype=torch.float32, device=dev)
    part = torch.empty((grid, e), dtype=torch.float32, device=dev)
    cnt = torch.empty((grid, e), dtype=torch.int32, device=dev)
    if grid > 0:
        _top2_fwd_kernel[(grid,)](logits, idx, top, lse, part, cnt, t, e, logits.stride(0), logits.stride(1),
                                  BLOCK_T=block_t, BLOCK_E=block_e, num_warps=4)  # fmt: skip
    return top, lse, part.sum(0), idx, cnt.sum(0, dtype=torch.int32)


OP.register("triton", devices=("cuda",), dtypes=KERNEL_DTYPES, available=_backend.triton_available,
            check=_backend.triton_check(num_experts=MAX_KERNEL_EXPERTS), forced_only_devices=("cpu",),
            note="one pass over each row of logits; O(T + E) outputs")(_fwd_triton)  # fmt: skip
OP.register("cpp", devices=("cpu",), dtypes=(*KERNEL_DTYPES, torch.float64), available=_backend.cpp_available,
            note="C++ one pass over each row of logits, fixed-chunk partial sums")(
    lambda logits: _ext.C.moe_top2_router_cpu(logits.contiguous()))  # fmt: skip
OP.register("torch", devices=("cpu", "cuda", "mps", "xpu"), dtypes=(*KERNEL_DTYPES, torch.float64),
            note="PyTorch ops, probabilities materialised")(_fwd_torch)  # fmt: skip


def _call(logits: torch.Tensor) -> Call:
    return Call(logits.device, logits.dtype, {"num_experts": logits.shape[-1]})


def _router_backend(logits: torch.Tensor) -> _backend.Backend:
    """``OP.dispatch`` for ``logits`` (T, E), remembered on what the backends' checks read: device, dtype and
    whether E fits the Triton kernel's row. A dispatch costs ~5 us, a twentieth of a small eager gating call."""
    fits = logits.shape[-1] <= MAX_KERNEL_EXPERTS
    return OP.dispatch_remembered((logits.device, logits.dtype, fits), lambda: _call(logits))


# =====================================================================================================
# torch.library op
# =====================================================================================================


@torch.library.custom_op("fastgen::top2_router", mutates_args=())
def _top2_router_op(
    logits: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (T, E) -> top (T, 2), lse (T,), psum (E,), idx (T, 2) int32, first (E,) int32 (see the torch
    backend)."""
    return _router_backend(logits).fn(logits)


@_top2_router_op.register_fake
def _(logits):
    t, e = logits.shape
    dt = _stat_dtype(logits.dtype)
    return (
        logits.new_empty((t, K), dtype=dt),
        logits.new_empty((t,), dtype=dt),
        logits.new_empty((e,), dtype=dt),
        logits.new_empty((t, K), dtype=torch.int32),
        logits.new_empty((e,), dtype=torch.int32),
    )


def _setup_context(ctx, inputs, output):
    (logits,) = inputs
    _, lse, _, idx, _ = output
    ctx.save_for_backward(logits, idx, lse)


def _backward(ctx, g_top, g_lse, g_psum, g_idx, g_first):
    logits, idx, lse = ctx.saved_tensors
    return _bwd(logits, idx, lse, g_top, g_lse, g_psum)


_top2_router_op.register_autograd(_backward, setup_context=_setup_context)


class _RouterEager(torch.autograd.Function):
    """The router op's backend called directly on plain eager CPU calls (no torch.library wrapping, which
    costs more than the C++ kernel on small inputs); same functions, same results."""

    @staticmethod
    def forward(ctx, logits):
        out = _router_backend(logits).fn(logits)
        ctx.save_for_backward(logits, out[3], out[1])
        ctx.mark_non_differentiable(out[3], out[4])
        return out

    @staticmethod
    def backward(ctx, g_top, g_lse, g_psum, g_idx, g_first):
        logits, idx, lse = ctx.saved_tensors
        z = torch.zeros((), dtype=lse.dtype)
        g_top = z.expand(idx.shape) if g_top is None else g_top
        g_lse = z.expand(lse.shape) if g_lse is None else g_lse
        g_psum = z.expand(logits.shape[1:]) if g_psum is None else g_psum
        return _bwd(logits, idx, lse, g_top, g_lse, g_psum)


# =====================================================================================================
# Public API
# =====================================================================================================


def _check(logits: torch.Tensor, capacity_factor, policy: str, min_capacity: int, threshold=0.2) -> None:
    if not isinstance(logits, torch.Tensor):
        raise _err(f"logits must be a tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise _err(f"logits must be 2-D (tokens, experts), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise _err(f"logits must be floating point, got {logits.dtype}")
    if logits.shape[1] < K:
        raise _err(f"k > E: top-{K} gating needs at least {K} experts, logits have {logits.shape[1]}")
    if policy not in POLICIES:
        raise _err(f"second_expert_policy must be one of {POLICIES}, got {policy!r}")
    where = "fastgen.top2_gating"
    if capacity_factor is not None:
        check_real(where, "capacity_factor", capacity_factor, 0.0, lo_open=True)
    check_int(where, "min_capacity", min_capacity, 0)
    # g2 = p[e2] / (p[e1] + p[e2]) lies in (0, 0.5]: a threshold outside [0, 1] is a mistake, not a policy
    check_real(where, "second_threshold", threshold, 0.0, 1.0)


def top2_gating(
    logits: torch.Tensor,
    *,
    capacity_factor: float | None = 1.25,
    min_capacity: int = 4,
    second_expert_policy: str = "all",
    second_threshold: float = 0.2,
    seed: int | None = None,
    normalize: bool = True,
) -> Gating:
    """GShard top-2 gating of ``logits: (T, E)`` (any float dtype; statistics in float32).

    capacity_factor: slots per expert = ceil(capacity_factor * T * 2 / E), at least ``min_capacity``;
        None: dropless (every routed assignment kept).
    second_expert_policy: "all" | "threshold" | "random" (see the module docstring); a second choice not
        routed takes no slot, is not counted as dropped and gets gate 0. Both policies compare the
        renormalised g2 = p[e2] / (p[e1] + p[e2]), whatever ``normalize`` says.
    seed: the "random" policy's generator seed (None: torch's default generator, so torch.manual_seed
        reproduces it).
    normalize: renormalise the two gates to sum to 1 (GShard) before dropping; False keeps the raw softmax
        probabilities.
    Returns a :class:`Gating`. Gradients flow from gates, aux_loss and z_loss into the logits.
    """
    _check(logits, capacity_factor, second_expert_policy, min_capacity, second_threshold)
    t, e = logits.shape
    # CPU: a host check before any other kernel, on the router's lse (NaN exactly for the rows holding a
    # non-finite logit; the router only reads logits); CUDA (and under torch.compile): on the device
    host_check = logits.device.type == "cpu" and not torch.compiler.is_compiling()
    eager = host_check and _backend.plain_eager(logits)
    top, lse, psum, idx, first = (_RouterEager.apply if eager else _top2_router_op)(logits)
    if host_check:
        if not bool(torch.isfinite(lse).all()):
            raise _err("logits contain NaN or +-inf")
    else:
        # the kernel marks a row holding a non-finite logit with lse = NaN: checked without a host sync
        torch._assert_async(torch.isfinite(lse).all(), "fastgen.top2_gating: logits contain NaN or +-inf")
    g_norm = top / top.sum(-1, keepdim=True)
    valid = None  # "all": every second choice is routed
    if second_expert_policy != "all":
        valid2 = _second_valid(g_norm[:, 1], second_expert_policy, second_threshold, seed)
        valid = torch.stack([torch.ones_like(valid2), valid2], 1)
    cap = capacity_for(t, e, capacity_factor, K, min_capacity)

    routing = route_trusted(idx, e, cap, valid)  # idx: the router's own output, in [0, E)
    keep = routing.dest >= 0
    gates = (g_norm if normalize else top) * keep.to(top.dtype)
    dropped = (~keep).sum() if valid is None else (valid & ~keep).sum()
    if t > 0:
        aux = (e / (t * t)) * (first.to(psum.dtype) * psum).sum()  # E * sum_e (count_e / T) * (psum_e / T)
        z = (lse * lse).mean()
    else:
        aux = z = psum.sum() * 0
    return Gating(idx, gates, routing, cap, aux, z, routing.counts, dropped)


__all__ = ["Gating", "capacity_for", "top2_gating", "top2_gating_ref"]

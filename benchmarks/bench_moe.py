"""Benchmark: the whole top-2 MoE layer (router, dispatch, expert FFNs, combine), forward and fwd+bwd.

FLOPs counted are the expert GEMMs of the kept assignments only: 2 * rows * d_model * d_ff' (first GEMM,
d_ff' = 2 d_ff for SwiGLU) + 2 * rows * d_ff * d_model (second), x3 for fwd+bwd. Every implementation
uses the same weights and the same GShard routing rule, so they compute the same function:

* ``naive-loop`` (the correctness oracle): a PyTorch loop over experts, each on the tokens routed to it
  (``index_select`` / ``index_add_``), gating in plain PyTorch — what a user writes first.
* ``sorted-loop``: the kept assignments sorted by expert once (one gather of x, one ``index_add_`` back),
  ``addmm`` per expert on contiguous slices — the strongest plain loop on CPU.
* ``gshard-einsum``: the dense GShard formulation, a (T, E, C) dispatch / combine one-hot and einsums
  with a padded (E, C, d) expert batch; skipped when the one-hot alone passes 2^31 elements.
* ``torch-grouped-mm``: fastgen's routing and permutation with ``torch._grouped_mm`` for the expert GEMMs,
  where torch has it (bf16 on sm90; CPU) — an apples-to-apples check of the grouped GEMM alone.
* ``fastgen``: ``fastgen.nn.Top2MoE``.

Peak memory of one call of each implementation is measured while the case is built and stored in the
case's params (``peak_mib``): CUDA's allocator peak on GPU; on CPU the CPU allocator's "Total Allocated"
high-water mark from torch.profiler memory events.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastgen.bench import Case, Impl, main, peak_memory_mib, register
from fastgen.nn.moe import Top2MoE
from fastgen.ops.grouped_mm import activation_ref
from fastgen.ops.moe_gating import top2_gating_ref
from fastgen.ops.moe_permute import moe_permute, moe_unpermute

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
EINSUM_MAX_ELEMENTS = 2**31


def shapes(device: torch.device, quick: bool):
    """(E, d_model, tokens, activation) with d_ff = 4 d_model."""
    if device.type != "cuda":
        if quick:
            return [(4, 32, 96, "gelu")]
        # the last: 64 small experts (~32 rows each), the layer's grouped (torch._grouped_mm) blocks
        return [(8, 128, 1024, "gelu"), (8, 128, 1024, "swiglu"), (64, 64, 1024, "gelu")]
    if quick:
        return [(8, 1024, 4096, "gelu")]
    return [
        (8, 1024, 4096, "gelu"),
        (8, 1024, 16384, "swiglu"),
        (8, 4096, 8192, "gelu"),
        (16, 2048, 16384, "gelu"),
        (64, 1024, 65536, "gelu"),
        (64, 2048, 16384, "swiglu"),
    ]


@register(op="moe", description="top-2 MoE layer: router + permute + grouped expert GEMMs + combine")
def moe_cases(device: torch.device, quick: bool):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for e, d, tokens, act in shapes(device, quick):
        for mode in ("fwd", "fwd+bwd"):
            yield make_case(device, dtype, e, d, tokens, act, mode)


def _gating(moe: Top2MoE, x2: torch.Tensor):
    logits = F.linear(x2.float(), moe.router.weight.float())
    return top2_gating_ref(logits, capacity_factor=moe.capacity_factor, min_capacity=moe.min_capacity)


def naive_loop(moe: Top2MoE, x2: torch.Tensor) -> torch.Tensor:
    g = _gating(moe, x2)
    y = torch.zeros_like(x2)
    kept = g.routing.dest >= 0
    for e in range(moe.num_experts):
        tok, slot = torch.nonzero((g.expert_idx == e) & kept, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = x2.index_select(0, tok) @ moe.w1[e] + moe.b1[e]
        o = activation_ref(h, moe.activation) @ moe.w2[e] + moe.b2[e]
        y.index_add_(0, tok, o * g.gates[tok, slot, None].to(o.dtype))
    return y


def sorted_loop(moe: Top2MoE, x2: torch.Tensor) -> torch.Tensor:
    g = _gating(moe, x2)
    k = g.expert_idx.shape[1]
    a = torch.nonzero((g.routing.dest >= 0).reshape(-1)).squeeze(1)  # kept assignments t * k + j
    ex = g.expert_idx.reshape(-1)[a]
    a = a[torch.argsort(ex, stable=True)]
    tok = a // k
    xs = x2.index_select(0, tok)
    outs = []
    for e, xe in enumerate(xs.split(torch.bincount(ex, minlength=moe.num_experts).tolist())):
        if xe.shape[0]:
            h = activation_ref(torch.addmm(moe.b1[e], xe, moe.w1[e]), moe.activation)
            outs.append(torch.addmm(moe.b2[e], h, moe.w2[e]))
    o = torch.cat(outs) * g.gates.reshape(-1)[a, None].to(x2.dtype)
    return torch.zeros_like(x2).index_add_(0, tok, o)


def gshard_einsum(moe: Top2MoE, x2: torch.Tensor) -> torch.Tensor:
    g = _gating(moe, x2)
    t, c = x2.shape[0], g.capacity
    kept = g.routing.dest >= 0
    offsets = g.routing.offsets.long()
    slot = g.routing.dest.long() - offsets[g.expert_idx.long()]  # position within the expert
    disp = torch.zeros(t, moe.num_experts, c, dtype=x2.dtype, device=x2.device)
    comb = torch.zeros(t, moe.num_experts, c, dtype=torch.float32, device=x2.device)
    for j in range(2):
        tt = torch.nonzero(kept[:, j], as_tuple=True)[0]
        ee, ss = g.expert_idx[tt, j].long(), slot[tt, j]
        disp[tt, ee, ss] = 1
        comb[tt, ee, ss] = g.gates[tt, j]
    xe = torch.einsum("tec,td->ecd", disp, x2)
    h = torch.baddbmm(moe.b1[:, None], xe, moe.w1)
    o = torch.baddbmm(moe.b2[:, None], activation_ref(h, moe.activation), moe.w2)
    return torch.einsum("tec,ecd->td", comb.to(o.dtype), o)


def torch_grouped(moe: Top2MoE, x2: torch.Tensor) -> torch.Tensor:
    g = moe.gate(x2)
    buf = moe_permute(x2, g.routing)
    rows = int(g.routing.offsets[-1])
    offs = g.routing.offsets[1:].to(torch.int32)
    expert = torch.repeat_interleave(
        torch.arange(moe.num_experts, device=x2.device), offs.diff(prepend=offs[:1] * 0)
    )
    h = torch._grouped_mm(buf[:rows], moe.w1, offs=offs) + moe.b1[expert]
    o = torch._grouped_mm(activation_ref(h, moe.activation), moe.w2, offs=offs) + moe.b2[expert]
    return moe_unpermute(torch.cat([o, o.new_zeros(buf.shape[0] - rows, o.shape[1])]), g.routing, g.gates)


def _grouped_mm_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if device.type == "cpu":
        return None  # the CPU kernel takes float32 / bfloat16 / float16 (probed below)
    if device.type != "cuda" or dtype != torch.bfloat16 or torch.cuda.get_device_capability(device)[0] < 9:
        return "torch._grouped_mm needs bf16 on an sm90+ GPU, or a CPU tensor"
    return None


def make_case(device, dtype, e, d, tokens, act, mode):
    torch.manual_seed(0)
    moe = Top2MoE(d, 4 * d, e, capacity_factor=1.25, activation=act, device=device, dtype=dtype)
    x = torch.randn(tokens, d, device=device, dtype=dtype)
    g = moe.gate(x)
    rows = int(g.routing.offsets[-1])
    ff_in = moe.w1.shape[-1]
    flops = 2 * rows * d * ff_in + 2 * rows * moe.d_ff * d
    train = mode == "fwd+bwd"
    if train:
        flops *= 3
        x.requires_grad_()
    dout = torch.randn_like(x)

    def runner(fn):
        def run():
            if not train:
                with torch.no_grad():
                    return fn()
            y = fn()
            y.backward(dout)
            out = y.detach(), x.grad, moe.w1.grad
            # cleared after, not before: a call that freed the last call's gradients would count them
            # against its own peak memory (and the next implementation's), and would not accumulate
            moe.zero_grad(set_to_none=True)
            x.grad = None
            return out

        return run

    capacity = g.capacity
    impls = [
        Impl("naive-loop", runner(lambda: naive_loop(moe, x)), baseline=True),
        Impl("sorted-loop", runner(lambda: sorted_loop(moe, x)), baseline=True),
    ]
    onehot = tokens * e * capacity
    if onehot > EINSUM_MAX_ELEMENTS:
        why = f"the (T, E, C) one-hot has {onehot / 2**30:.1f} Gi elements (> 2 Gi)"
        impls.append(Impl.skipped("gshard-einsum", why, baseline=True))
    else:
        impls.append(Impl("gshard-einsum", runner(lambda: gshard_einsum(moe, x)), baseline=True))
    why = _grouped_mm_reason(device, dtype)
    run = runner(lambda: torch_grouped(moe, x))
    if why is None:
        try:  # its layout / alignment rules vary with the torch version: probe once
            run()
        except (RuntimeError, TypeError, ValueError) as err:
            why = f"torch._grouped_mm refused: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    impls.append(
        Impl.skipped("torch-grouped-mm", why, baseline=True)
        if why
        else Impl("torch-grouped-mm", run, baseline=True)
    )
    impls.append(Impl("fastgen", runner(lambda: moe(x)[0])))
    peaks = peak_memory_mib(device, impls, cpu=True)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    name = f"{mode:<7} E{e} d{d} ff{4 * d} T{tokens} {act} {DTYPE_NAMES[dtype]}"
    params = {"experts": e, "d_model": d, "d_ff": 4 * d, "tokens": tokens, "activation": act, "mode": mode,
              "dtype": DTYPE_NAMES[dtype], "capacity": capacity, "rows_kept": rows, "peak_mib": peaks,
              "flop_rule": "expert GEMMs of kept rows: 2*rows*d*ff' + 2*rows*ff*d, x3 fwd+bwd"}  # fmt: skip
    return Case(
        name, impls, flops=flops, bound="compute", flop_dtype=dtype, params=params, atol=tol, rtol=tol
    )


if __name__ == "__main__":
    raise SystemExit(main(only=["moe"]))

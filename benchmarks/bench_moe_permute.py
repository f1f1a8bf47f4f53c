"""Benchmark: MoE dispatch (route + permute) and combine (unpermute), forward and forward + backward.

Memory-bound gathers. Bytes per call (analytic, the minimum any implementation must move):
  dispatch  fwd: read the kept token rows + write the (T*k, d) buffer (+ the (T, k) ids);
  combine   fwd: read the kept buffer rows + write (T, d);
  dispatch  fwd+bwd: the forward + read the kept dbuf rows + write dx;
  combine   fwd+bwd: the forward + read dy (k times) and the kept buf rows + write dbuf.
Baselines: the plain PyTorch reference (stable argsort + index_select, the oracle) and the dense GShard
formulation (Lepikhin et al. 2020): a (T, E, C) one-hot dispatch mask and ``einsum("tec,td->ecd")`` /
``einsum("tec,ecd->td")``, with its peak memory (``params.peak_mib``, GPU only) beside fastgen's. Dense
outputs are (E, C, d); the check maps them to the compact expert-sorted layout before comparing.
Capacity: C = ceil(1.25 * T * k / E) (GLaM's capacity factor), the same for every implementation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastgen._backend import Call
from fastgen.bench import Case, Impl, backend_impls, main, peak_memory_mib, register
from fastgen.bench.harness import Check
from fastgen.ops.moe_permute import (
    moe_permute,
    moe_permute_ref,
    moe_route,
    moe_route_ref,
    moe_unpermute,
    moe_unpermute_ref,
)

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
MODES = ("dispatch", "combine", "dispatch fwd+bwd", "combine fwd+bwd")
DENSE_LIMIT_BYTES = 16 << 30  # the dense (T, E, C) mask and its einsum operands beyond this are not run
K = 2


def shapes(device: torch.device, quick: bool):  # (tokens, d, experts)
    if device.type == "cuda":
        if quick:
            return [(16384, 2048, 16)]
        return [(4096, 1024, 8), (4096, 4096, 16), (16384, 1024, 16), (16384, 4096, 64), (65536, 1024, 64),
                (65536, 2048, 8)]  # fmt: skip
    return [(512, 256, 8)] if quick else [(2048, 512, 8), (4096, 1024, 16)]


@register(
    op="moe_permute", description="MoE dispatch (route + permute) / combine (unpermute), fwd and fwd+bwd"
)
def moe_permute_cases(device: torch.device, quick: bool):
    dtypes = [torch.bfloat16] if device.type == "cuda" else [torch.float32]
    if device.type == "cuda" and not quick:
        dtypes.append(torch.float16)
    for t, d, e in shapes(device, quick):
        for dtype in dtypes:
            for mode in MODES:
                yield make_case(device, t, d, e, dtype, mode)


def dense_masks(idx, gates, e, c):
    """GShard's (T, E, C) dispatch mask and combine weights, position priority (slot-major)."""
    t, k = idx.shape
    onehot = F.one_hot(idx.t().long(), e)  # (k, T, E)
    pos = (torch.cumsum(onehot.reshape(k * t, e), 0).reshape(k, t, e) - 1) * onehot
    keep = onehot.bool() & (pos < c)
    loc = F.one_hot((pos * keep).sum(-1), c)  # (k, T, C)
    slot = keep[..., None] & loc[:, :, None, :].bool()  # (k, T, E, C)
    combine = (slot * gates.t()[:, :, None, None].to(torch.float32)).sum(0)
    return slot.any(0), combine


def to_compact(out, offsets, e, c):
    """A dense (E, C, d) tensor -> the expert-sorted (rows used, d) rows; a (T*k, d) buffer -> its used rows."""
    off = offsets.tolist()
    if out.ndim == 3:
        return torch.cat([out[i, : off[i + 1] - off[i]] for i in range(e)])
    return out[: off[-1]]


def make_case(device, t, d, e, dtype, mode) -> Case:
    g = torch.Generator(device="cpu").manual_seed(0)
    c = math.ceil(1.25 * t * K / e)
    logits = torch.randn(t, e, generator=g) + torch.linspace(0, 1, e)  # mildly imbalanced
    gates, idx = torch.softmax(logits, -1).topk(K, dim=-1)
    idx, gates = idx.to(device, torch.int32), gates.to(device, torch.float32)
    x = torch.randn(t, d, generator=g).to(device, dtype)
    r = moe_route_ref(idx, e, c)
    used = int(r.offsets[-1])
    buf = moe_permute_ref(x, r)
    grad_in = torch.randn(t * K, d, generator=g).to(device, dtype)  # dbuf for dispatch fwd+bwd
    dy = torch.randn(t, d, generator=g).to(device, dtype)
    dense_bytes = t * e * c * (1 + 2 * x.element_size()) + e * c * d * x.element_size()
    bwd = mode.endswith("fwd+bwd")
    es = x.element_size()

    if mode.startswith("dispatch"):

        def make(route, permute):
            def run():
                rr = route(idx, e, c)
                if not bwd:
                    return permute(x, rr)
                xx = x.detach().requires_grad_()
                return torch.autograd.grad(permute(xx, rr), xx, grad_in)[0]

            return run

        def dense():
            disp, _ = dense_masks(idx, gates, e, c)
            xx = x.detach().requires_grad_(bwd)
            out = torch.einsum("tec,td->ecd", disp.to(dtype), xx)
            if not bwd:
                return out
            dense_grad = torch.zeros(e, c, d, device=device, dtype=dtype)
            for i in range(e):  # the same dbuf rows as the compact layout's
                n = int(r.offsets[i + 1] - r.offsets[i])
                dense_grad[i, :n] = grad_in[int(r.offsets[i]) : int(r.offsets[i]) + n]
            return torch.autograd.grad(out, xx, dense_grad)[0]

        ref_fn, fast_fn = make(moe_route_ref, moe_permute_ref), make(moe_route, moe_permute)
        nbytes = (used + t * K) * d * es + idx.numel() * 4 + (2 * used * d * es if bwd else 0)
        op = "moe_permute"
    else:

        def make(unpermute):
            def run():
                if not bwd:
                    return unpermute(buf, r, gates)
                bb, gg = buf.detach().requires_grad_(), gates.detach().requires_grad_()
                db, dg = torch.autograd.grad(unpermute(bb, r, gg), (bb, gg), dy)
                return db, dg

            return run

        def dense():
            _, comb = dense_masks(idx, gates, e, c)
            dbuf = torch.zeros(e, c, d, device=device, dtype=dtype)
            for i in range(e):
                n = int(r.offsets[i + 1] - r.offsets[i])
                dbuf[i, :n] = buf[int(r.offsets[i]) : int(r.offsets[i]) + n]
            bb = dbuf.requires_grad_(bwd)
            y = torch.einsum("tec,ecd->td", comb.to(dtype), bb)
            if not bwd:
                return y
            return torch.autograd.grad(y, bb, dy)[0], None

        ref_fn, fast_fn = make(moe_unpermute_ref), make(moe_unpermute)
        nbytes = used * d * es + t * d * es + (t * d * es + used * d * es + t * K * d * es if bwd else 0)
        op = "moe_permute"

    impls = [Impl("reference", ref_fn, baseline=True)]
    if dense_bytes > DENSE_LIMIT_BYTES:
        impls.append(
            Impl.skipped("dense GShard einsum", f"needs ~{dense_bytes / 2**30:.0f} GiB", baseline=True)
        )
    else:
        impls.append(Impl("dense GShard einsum", dense, baseline=True))
    call = Call(device, dtype, {"d": d})
    impls += backend_impls(op, call, lambda backend: fast_fn)
    if mode.startswith("dispatch"):  # the route's own backends (the permute then dispatches as usual)
        route_call = Call(device, torch.int32, {"num_experts": e})
        impls += backend_impls("moe_route", route_call, lambda backend: fast_fn, label="fastgen[route:{}]")

    expected = ref_fn()
    low = dtype != torch.float32

    def check(out) -> Check:
        outs = out if isinstance(out, tuple) else (out,)
        refs = expected if isinstance(expected, tuple) else (expected,)
        worst = 0.0
        for o, w in zip(outs, refs):
            if o is None or w is None:
                continue
            if o.shape != w.shape:
                o, w = to_compact(o, r.offsets, e, c), to_compact(w, r.offsets, e, c)
            if o.shape != w.shape:
                return Check(False, None, f"shape {tuple(o.shape)} vs {tuple(w.shape)}")
            err = (o.double() - w.double()).abs().max().item() if o.numel() else 0.0
            worst = max(worst, err / max(1.0, w.double().abs().max().item()))
        return Check(worst <= (2e-2 if low else 1e-5), worst, "max error / max |ref|")

    params = {"tokens": t, "d": d, "experts": e, "k": K, "capacity": c, "rows_used": used, "mode": mode,
              "dtype": DTYPE_NAMES[dtype]}  # fmt: skip
    params["peak_mib"] = peak_memory_mib(device, impls)  # per implementation, CUDA only
    return Case(f"{mode} T{t} d{d} E{e} k{K} C{c} {DTYPE_NAMES[dtype]}", impls, bytes=nbytes, params=params,
                check=check)  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main(only=["moe_permute"]))

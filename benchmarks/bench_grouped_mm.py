"""Benchmark: grouped GEMM for MoE expert FFNs (fastgen.ops.grouped_mm), fwd and fwd+bwd.

The GEMM timed is a GLaM-style expert FFN's first layer: ``x (R, d_model)`` rows grouped by expert,
``w (E, d_model, N)`` with ``N = d_ff = 4 d_model`` (``2 d_ff`` for SwiGLU), no bias, activation gelu or
swiglu fused; ``R = 2 * tokens`` (top-2 routing). Group sizes are balanced or Zipf-skewed (``p_e ~ 1 /
e^1.2``), rounded to multiples of 16 (what ``torch._grouped_mm`` needs on sm90), every row used.

Rows, side by side:

* ``reference`` (the correctness oracle): the naive loop over experts, ``torch.matmul`` per expert then the
  activation (:func:`fastgen.ops.grouped_mm.grouped_mm_ref` in the inputs' dtype): what a user writes first.
* ``dense-gemm``: one cuBLAS GEMM of the same FLOPs, ``x (R_used, K) @ w[0] (K, N)`` (+ its backward):
  the speed to aim at (>= 80% of it). It computes another function, so its output is not checked.
* ``torch._grouped_mm`` (+ the activation in PyTorch), where torch has it; skipped with torch's reason when
  it refuses (it needs bf16 and 16-aligned groups on sm90).
* ``fastgen[triton]`` and ``fastgen[torch]`` (the CPU path; timed on CPU only).
* CPU only, the strongest plain baselines: ``sorted-loop`` (``torch.cat`` of ``act(x[a:b] @ w[e])`` over the
  non-empty experts) and ``unbind-loop`` (the same over ``w.unbind(0)``, whose backward stacks dw at once).
  Peak memory on CPU (``peak_mib`` in the case's params): the CPU allocator's "Total Allocated" high-water
  mark over one call, from ``torch.profiler`` memory events (no tracemalloc), above what was live before.

FLOPs: ``2 * R_used * K * N`` forward, x3 for fwd+bwd (dx and dw GEMMs). %roof is against the dense
bf16 / fp16 tensor-core peak of known GPUs (fastgen/bench/device.py). Outputs of fwd+bwd: (out, dx, dw),
compared with the reference's element-wise (bf16: atol = rtol = 2e-2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fastgen._backend import Call
from fastgen.bench import Case, Check, Impl, backend_impls, compare_outputs, main, peak_memory_mib, register
from fastgen.ops.grouped_mm import activation_ref, grouped_mm, grouped_mm_ref

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}
MODES = ("fwd", "fwd+bwd")
DENSE = "dense-gemm"


def shapes(device: torch.device, quick: bool):
    """(E, d_model, tokens, activation, skewed) with d_ff = 4 d_model, R = 2 * tokens."""
    if device.type != "cuda":
        cpu = [(4, 64, 256, "gelu", False), (4, 64, 256, "swiglu", True)]
        # issue 18's CPU rows: tiny balanced, a larger balanced one, many skewed experts
        return cpu if quick else [*cpu, (4, 64, 64, "gelu", False), (8, 128, 1024, "gelu", False),
                                  (64, 64, 1024, "gelu", True)]  # fmt: skip
    if quick:
        return [(8, 1024, 4096, "gelu", False), (64, 1024, 16384, "swiglu", True)]
    return [
        (8, 1024, 16384, "gelu", False),
        (8, 1024, 16384, "swiglu", True),
        (8, 4096, 4096, "gelu", False),
        (8, 4096, 4096, "swiglu", True),
        (16, 2048, 16384, "gelu", True),
        (64, 1024, 65536, "gelu", False),
        (64, 1024, 65536, "swiglu", True),
        (64, 2048, 16384, "gelu", True),
    ]


@register(op="grouped_mm", description="MoE grouped GEMM + activation: fastgen vs loop, dense GEMM, torch")
def grouped_mm_cases(device: torch.device, quick: bool):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for e, d, tokens, act, skew in shapes(device, quick):
        for mode in MODES:
            yield make_case(device, dtype, e, d, tokens, act, skew, mode)


def group_sizes(rows: int, e: int, skew: bool) -> list[int]:
    """Sizes summing to ``rows`` (a multiple of 16), each a multiple of 16; Zipf(1.2) when skewed."""
    p = [1.0 / (i + 1) ** (1.2 if skew else 0.0) for i in range(e)]
    sizes = [int(rows * pi / sum(p)) // 16 * 16 for pi in p]
    sizes[0] += rows - sum(sizes)
    return sizes


def sizes_cum(sizes: list[int]) -> list[int]:
    out, acc = [], 0
    for s in sizes:
        acc += s
        out.append(acc)
    return out


def _runner(fwd: Callable[..., Any], inputs: list[torch.Tensor], mode: str) -> Callable[[], Any]:
    if mode == "fwd":
        return lambda: fwd(*inputs)
    leaves = [t.detach().requires_grad_() for t in inputs]

    def run() -> Any:
        out = fwd(*leaves)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out) * 0.01)
        return (out, *grads)

    return run


def _grouped_mm_torch(x, w, offsets, act, rows):
    """torch._grouped_mm for the GEMM, then the activation in PyTorch (unused rows: zeros)."""
    h = torch._grouped_mm(x, w, offs=offsets[1:])
    out = activation_ref(h.float(), act).to(x.dtype)
    return (
        out if rows == x.shape[0] else torch.cat([out[:rows], out.new_zeros(x.shape[0] - rows, out.shape[1])])
    )


def _probe(run: Callable[[], Any]) -> str | None:
    try:
        run()
        return None
    except (RuntimeError, ValueError, NotImplementedError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        return f"unsupported: {type(e).__name__}: {msg[:300]}"


def make_case(device, dtype, e, d, tokens, act, skew, mode) -> Case:
    r, k = 2 * tokens, d
    n = 8 * d if act == "swiglu" else 4 * d
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(r, k, device=device, dtype=dtype, generator=g)
    w = (torch.randn(e, k, n, device=device, dtype=dtype, generator=g) / k**0.5).to(dtype)
    sizes = group_sizes(r, e, skew)
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int32, device=device)
    rows = int(sum(sizes))

    dense = _runner(lambda x, w: x[:rows] @ w[0], [x, w], mode)

    def ref(x, w):
        return grouped_mm_ref(x, w, offsets, activation=act, upcast=False)

    impls = [
        Impl("reference", _runner(ref, [x, w], mode), baseline=True),
        Impl(DENSE, lambda: {DENSE: dense()}, baseline=True),
    ]
    if device.type == "cpu":
        groups = [
            (i, a, b) for i, (a, b) in enumerate(zip([0, *sizes_cum(sizes)[:-1]], sizes_cum(sizes))) if b > a
        ]

        def sorted_loop(x, w):
            return torch.cat([activation_ref(x[a:b] @ w[i], act) for i, a, b in groups])

        def unbind_loop(x, w):
            ws = w.unbind(0)
            return torch.cat([activation_ref(x[a:b] @ ws[i], act) for i, a, b in groups])

        impls += [Impl("sorted-loop", _runner(sorted_loop, [x, w], mode), baseline=True),
                  Impl("unbind-loop", _runner(unbind_loop, [x, w], mode), baseline=True)]  # fmt: skip
    if not hasattr(torch, "_grouped_mm"):
        impls.append(
            Impl.skipped("torch._grouped_mm", "torch has no _grouped_mm (torch < 2.8)", baseline=True)
        )
    else:
        run = _runner(lambda x, w: _grouped_mm_torch(x, w, offsets, act, rows), [x, w], mode)
        why = _probe(run)
        impls.append(Impl.skipped("torch._grouped_mm", why, baseline=True) if why else
                     Impl("torch._grouped_mm", run, baseline=True))  # fmt: skip
    call = Call(device, dtype, {"experts": e, "k": k, "n": n})
    for impl in backend_impls(
        "grouped_mm",
        call,
        lambda backend: _runner(lambda x, w: grouped_mm(x, w, offsets, activation=act), [x, w], mode),
    ):
        if impl.name == "fastgen[torch]" and device.type == "cuda" and impl.skip is None:
            impl = Impl.skipped(impl.name, "the fallback loop over experts: timed on CPU only")
        impls.append(impl)

    peaks = peak_memory_mib(device, impls, cpu=True)
    oracle = impls[0].fn()
    tol = TOL[dtype]

    def check(out: Any) -> Check:
        if isinstance(out, dict) and DENSE in out:
            return Check(True, None, "another function of the same FLOPs: speed reference only")
        return compare_outputs(out, oracle, tol, tol)

    flops = 2 * rows * k * n * (3 if mode == "fwd+bwd" else 1)
    name = f"{mode:<7} E={e} d={d} T={tokens} {act} {'zipf' if skew else 'balanced'} {DTYPE_NAMES[dtype]}"
    return Case(
        name,
        impls,
        flops=flops,
        bound="compute",
        flop_dtype=dtype,
        params={
            "mode": mode,
            "experts": e,
            "d_model": d,
            "d_ff": 4 * d,
            "tokens": tokens,
            "rows": r,
            "rows_used": rows,
            "k": k,
            "n": n,
            "activation": act,
            "groups": "zipf1.2" if skew else "balanced",
            "max_group": max(sizes),
            "dtype": DTYPE_NAMES[dtype],
            "flop_rule": "2*R_used*K*N fwd; x3 fwd+bwd",
            "peak_mib": peaks,
        },
        check=check,
    )


if __name__ == "__main__":
    raise SystemExit(main(only=["grouped_mm"]))

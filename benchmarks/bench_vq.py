"""Benchmark: nearest-codebook lookup (fastgen.ops.vq.vq_nearest), L2, exact and fast modes.

DALL-E's dVAE scale: ``N = 65536`` rows (a batch of 32x32 latent grids), ``K = 8192`` codes, ``D = 256``;
plus ``K in {512, 65536}`` and ``D in {64, 1024}``; float32 and bfloat16.

Rows, side by side (all return the (N,) int64 indices):

* ``cdist-argmin`` (the oracle): ``torch.cdist(x, c).argmin(1)`` (bf16 inputs: upcast to float32, as cdist
  wants). Every other row's indices are compared with it exactly; mismatches are allowed only on near-ties
  (the float64 distance of the row's pick within a tolerance of the oracle's; the count is reported).
* ``expanded-mm``: ``(x2 - 2 x @ c.T + c2).argmin(1)``, the matmul in the inputs' dtype: what a VQ layer
  usually does, materialising the N x K matrix.
* ``faiss-flat-l2``: ``faiss.IndexFlatL2`` (GPU index when faiss has GPUs), if faiss is importable; on
  the CPU with ``faiss.omp_set_num_threads(torch.get_num_threads())``.
* ``fastgen[<backend>]`` in ``exact`` and ``fast`` modes (separate cases).

FLOPs: the distance GEMM, ``2 N K D``. Peak memory (CUDA) of one call of each implementation, above the
resident inputs, goes in the case's params (``peak_mib``): the fused kernel needs O(N + K), the baselines
O(N K).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from fastgen._backend import Call
from fastgen.bench import Case, Check, Impl, backend_impls, main, peak_memory_mib, register
from fastgen.ops.vq import vq_nearest

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# a mismatch with the oracle is a near-tie when the pick's float64 distance exceeds the oracle's by at most
# this, relative to |x|^2 + |c|^2 (the scale of the expanded form's cancellation error)
NEAR_TIE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def shapes(device: torch.device, quick: bool) -> list[tuple[int, int, int]]:
    """(N, K, D)."""
    if device.type != "cuda":
        # the last: DALL-E's codebook (K = 8192, D = 256) for 4 images of 32 x 32 latents, a few seconds
        # on 2 cores
        return [(2048, 512, 64)] if quick else [(2048, 512, 64), (4096, 1024, 256), (4096, 8192, 256)]
    if quick:
        return [(65536, 8192, 256), (65536, 65536, 64)]
    return [
        (65536, 8192, 256),
        (65536, 512, 256),
        (65536, 65536, 256),
        (65536, 8192, 64),
        (65536, 8192, 1024),
        (65536, 65536, 64),
    ]


@register(op="vq_nearest", description="VQ nearest code: fastgen (exact / fast) vs cdist, expanded mm, faiss")
def vq_cases(device: torch.device, quick: bool):
    dtypes = [torch.float32] if device.type != "cuda" else [torch.float32, torch.bfloat16]
    for n, k, d in shapes(device, quick):
        for dtype in dtypes:
            for mode in ("exact", "fast"):
                yield make_case(device, dtype, n, k, d, mode)


def _faiss(x: torch.Tensor, c: torch.Tensor) -> Impl:
    try:
        import faiss
    except Exception as e:  # pragma: no cover - depends on the machine
        return Impl.skipped("faiss-flat-l2", f"faiss is not importable ({type(e).__name__})", baseline=True)
    xs = x.float().cpu().numpy() if x.device.type == "cpu" else None
    cs = c.float().cpu().numpy()
    if x.device.type == "cuda":
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
            return Impl.skipped("faiss-flat-l2", "faiss has no GPU support here (CPU faiss not timed on GPU)",
                                baseline=True)  # fmt: skip
        with contextlib.suppress(Exception):  # lets faiss take torch CUDA tensors
            import faiss.contrib.torch_utils
        index = faiss.GpuIndexFlatL2(faiss.StandardGpuResources(), c.shape[1])
        index.add(cs)
        xf = x.float().contiguous()

        def run():
            _, i = index.search(xf, 1)
            return torch.as_tensor(i, device=x.device).view(-1).long()

    else:
        # faiss runs its own OpenMP pool (all cores by default): the same thread count as torch's, so that
        # the rows compare like with like
        faiss.omp_set_num_threads(torch.get_num_threads())
        index = faiss.IndexFlatL2(c.shape[1])
        index.add(cs)

        def run():
            _, i = index.search(xs, 1)
            return torch.from_numpy(i).view(-1).long()

    try:
        run()
    except Exception as e:  # e.g. a faiss build without torch interop
        return Impl.skipped("faiss-flat-l2", f"{type(e).__name__}: {str(e)[:200]}", baseline=True)
    return Impl("faiss-flat-l2", run, baseline=True)


def make_case(device, dtype, n, k, d, mode) -> Case:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, d, device=device, generator=g).to(dtype)
    c = torch.randn(k, d, device=device, generator=g).to(dtype)
    xf, cf = x.float(), c.float()
    # the baselines materialise N x K float32 matrices (cdist: 1, expanded: ~2 live at once)
    nk_gib = n * k * 4 / 2**30
    free = torch.cuda.mem_get_info(device)[0] / 2**30 if device.type == "cuda" else math.inf

    def cdist():
        return torch.cdist(xf if dtype != torch.float32 else x, cf if dtype != torch.float32 else c).argmin(1)

    def expanded():
        x2 = (x.float() ** 2).sum(1, keepdim=True)
        c2 = (c.float() ** 2).sum(1)
        return (x2 - 2 * (x @ c.T).float() + c2).argmin(1)

    impls = []
    for name, fn, need in (("cdist-argmin", cdist, 1.5 * nk_gib), ("expanded-mm", expanded, 3 * nk_gib)):
        if need > 0.8 * free:
            impls.append(
                Impl.skipped(name, f"needs ~{need:.0f} GiB for N x K, {free:.0f} GiB free", baseline=True)
            )
        else:
            impls.append(Impl(name, fn, baseline=True))
    impls.append(_faiss(x, c))
    call = Call(device, dtype, {"heads": 1, "rows": n, "codes": k, "dim": d})
    impls += backend_impls("vq_nearest", call, lambda backend: lambda: vq_nearest(x, c, mode=mode).indices)
    peaks = peak_memory_mib(device, impls)

    oracle = impls[0].fn() if impls[0].skip is None else vq_nearest(x, c, mode="exact").indices
    x2 = x.double().pow(2).sum(1)
    c2 = c.double().pow(2).sum(1)

    def check(out: Any) -> Check:
        idx = torch.as_tensor(out).to(oracle.device)
        if idx.shape != oracle.shape:
            return Check(False, None, f"indices shape {tuple(idx.shape)} vs {tuple(oracle.shape)}")
        bad = (idx != oracle).nonzero().view(-1)
        if bad.numel() == 0:
            return Check(True, 0.0, "indices identical to the oracle")
        rows = bad[:65536]
        xr = x[rows].double()
        d_pick = (xr - c[idx[rows]].double()).pow(2).sum(1)
        d_orc = (xr - c[oracle[rows]].double()).pow(2).sum(1)
        rel = ((d_pick - d_orc) / (x2[rows] + c2[oracle[rows]])).max().item()
        ok = rel <= NEAR_TIE[dtype]
        what = "near-ties" if ok else "NOT near-ties"
        return Check(ok, None, f"{bad.numel()}/{n} indices differ from the oracle ({what}: worst excess "
                               f"{rel:.2e} of |x|^2 + |c|^2)")  # fmt: skip

    name = f"{mode:<5} N={n} K={k} D={d} {DTYPE_NAMES[dtype]}"
    params = {"n": n, "k": k, "d": d, "dtype": DTYPE_NAMES[dtype], "mode": mode, "distance": "l2",
              "peak_mib": peaks, "nk_matrix_mib": round(n * k * 4 / 2**20, 1),
              "flop_rule": "2*N*K*D (the distance GEMM)"}  # fmt: skip
    return Case(
        name, impls, flops=2 * n * k * d, bound="compute", flop_dtype=dtype, params=params, check=check
    )


if __name__ == "__main__":
    raise SystemExit(main(only=["vq_nearest"]))

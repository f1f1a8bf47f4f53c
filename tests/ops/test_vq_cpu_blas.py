"""fastgen._C.vq_nearest_cpu, the BLAS-tiled CPU kernel, on every SIMD epilogue this CPU runs
(FASTGEN_CPU_ISA=scalar|avx2|avx512), at 1 and 2 threads (they tile the rows and codes differently).

The oracle is exact by construction: every input is a small multiple of 1/4, so every dot product, norm,
ranking key and distance is an exact float32 (float16 / bfloat16 values too) whatever order a BLAS or a
SIMD path sums in. The kernel must then return exactly the float64 direct-form argmin (ties -> the lowest
index: the small value grid makes many) and exactly its distance, in both modes; the shapes cross the
code blocks, the 32-code lanes, the row tasks and the 16-coordinate partial sums, with tails everywhere.
NaN rows and NaN codes follow torch.argmin (the first NaN wins) on the same paths.
"""

from __future__ import annotations

import contextlib
import functools
import os

import pytest
import torch

import fastgen
from fastgen import _ext
from fastgen.ops import vq as V

C = _ext.C
if C is None or not hasattr(C, "cpu_isa_best"):
    pytest.skip("fastgen._C (with cpu_isa) is not built", allow_module_level=True)

RANK = {"scalar": 0, "avx2": 1, "avx512": 2}
PATHS = [p for p in RANK if RANK[p] <= RANK[C.cpu_isa_best()]]

pytestmark = pytest.mark.usefixtures("poison_empty")


@contextlib.contextmanager
def setting(path: str, threads: int):
    old_path, old_threads = os.environ.get("FASTGEN_CPU_ISA"), torch.get_num_threads()
    os.environ["FASTGEN_CPU_ISA"] = path
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        if old_path is None:
            del os.environ["FASTGEN_CPU_ISA"]
        else:
            os.environ["FASTGEN_CPU_ISA"] = old_path


def grid(h, n, k, d, dtype, seed=0):
    """x (H, N, D), c (H, K, D): multiples of 1/4 in [-3/4, 3/4] (exact in every dtype), with duplicated
    codes at the ends of the codebook and rows sitting exactly on codes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (h, n, d), generator=g).double() / 4
    c = torch.randint(-3, 4, (h, k, d), generator=g).double() / 4
    if k > 2:
        c[:, -1] = c[:, 1]  # an exact tie spanning every block: the lower index must win
    x[:, : min(n, k)] = c[:, : min(n, k)]
    return x.to(dtype), c.to(dtype)


@functools.cache
def problem(shape, dtype, cosine, seed=0):
    """(x, c, float64 direct-form argmin, its distance as float32) (cosine: 1 - x.c on the values as given,
    argmin before the [0, 2] clamp); cached: the oracle is the slow part."""
    x, c = grid(*shape, dtype, seed)
    x64, c64 = x.double(), c.double()
    if cosine:
        dot = torch.zeros(x64.shape[:-1] + c64.shape[-2:-1], dtype=torch.float64)
        for j in range(x64.shape[-1]):
            dot += x64[..., j, None] * c64[..., None, :, j]
        d64 = 1 - dot
    else:
        d64 = V._dist_matrix_ref(x64, c64, "l2")
    idx = d64.argmin(-1)
    best = d64.gather(-1, idx[..., None])[..., 0]
    return x, c, idx, (best.clamp(0, 2) if cosine else best).float()


def run(x, c, cosine, exact):
    sq = torch.ones(c.shape[:2]) if cosine else c.double().pow(2).sum(-1)
    sq = sq.double() if x.dtype == torch.float64 else sq.float()
    return C.vq_nearest_cpu(x, c, sq, cosine, exact, True)


# (H, N, K, D), blocks at 1 thread (the kernel's tiling: 256 rows x 512 codes, fewer rows -> more codes):
# 512 + 188 codes; a last block of 3 codes; K < 4 (candidate lists never fill); one row and one code;
# 2720 + 280 codes at 48 rows a task; at 2 threads, one row task: the codebook split in 768 + 732 codes
SHAPES = [
    (1, 600, 700, 20),
    (3, 130, 515, 33),
    (2, 9, 3, 5),
    (1, 1, 1, 1),
    (1, 40, 3000, 64),
    (1, 16, 1500, 24),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cos"])
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
@pytest.mark.parametrize("path", PATHS)
def test_grid_exact(path, exact, cosine, shape, threads):
    x, c, want_i, want_d = problem(shape, torch.float32, cosine)
    with setting(path, threads):
        idx, dist, counts = run(x, c, cosine, exact)
    assert torch.equal(idx, want_i), f"{int((idx != want_i).sum())} rows off the float64 argmin"
    assert torch.equal(dist, want_d)
    assert torch.equal(counts, torch.stack([torch.bincount(i, minlength=shape[2]) for i in want_i]))


@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cos"])
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
@pytest.mark.parametrize("path", PATHS)
def test_grid_register_tiles(path, exact, cosine):
    """The AVX-512 kernels' own dots (12-row register tiles over 32-code panels, from 64 rows a head):
    every row tail 0..11 after 5 whole tiles (N = 64..75, one task each), a last panel of 6 codes (K = 70);
    at D = 300 (fast mode: blocks of 416 codes) 416 + 84 codes, at 1 and 2 threads; and 63 rows
    (the BLAS tiles)."""
    shapes = [((2, n, 70, 12), 1) for n in range(63, 76)] + [((1, 64, 500, 300), t) for t in (1, 2)]
    for shape, threads in shapes:
        x, c, want_i, want_d = problem(shape, torch.float32, cosine, seed=5)
        with setting(path, threads):
            idx, dist, _ = run(x, c, cosine, exact)
        assert torch.equal(idx, want_i) and torch.equal(dist, want_d), shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
@pytest.mark.parametrize("path", PATHS)
def test_grid_dtypes(path, exact, dtype):
    x, c, want_i, want_d = problem((2, 150, 600, 40), dtype, False, seed=1)
    with setting(path, 1):
        idx, dist, _ = run(x, c, False, exact)
    assert torch.equal(idx, want_i) and torch.equal(dist, want_d)


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
@pytest.mark.parametrize("path", PATHS)
def test_nan_rows_and_codes(path, exact):
    """Head 0: two NaN rows among clean ones (index 0, NaN dist: the first NaN). Head 1: a NaN code in the
    second block, so every row's nearest is that code, with a NaN dist. The clean rows of head 0 keep the
    exact answer (the SIMD epilogue serves them, the portable one the others)."""
    x, c, want_i, want_d = problem((2, 300, 700, 20), torch.float32, False, seed=2)
    x, c, want_i, want_d = x.clone(), c.clone(), want_i.clone(), want_d.clone()
    x[0, 5, 3] = x[0, 299, 0] = float("nan")
    c[1, 600, 7] = float("nan")
    want_i[0, [5, 299]], want_d[0, [5, 299]] = 0, float("nan")
    want_i[1], want_d[1] = 600, float("nan")
    with setting(path, 2):
        idx, dist, _ = run(x, c, False, exact)
    assert torch.equal(idx, want_i)
    assert torch.equal(dist.isnan(), want_d.isnan()) and torch.equal(dist.nan_to_num(), want_d.nan_to_num())


@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cos"])
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
@pytest.mark.parametrize("path", PATHS)
def test_codebook_split(path, exact, cosine):
    """Few rows, 8 threads (2 row tasks): the codebook is split in 4 (672 codes each but the last), the
    per-split results merged in code order. A NaN row, a NaN code in the third split (head 1), ties across
    splits (code 2599 = code 1)."""
    x, c, want_i, want_d = problem((2, 4, 2600, 16), torch.float32, cosine, seed=4)
    x, c, want_i, want_d = x.clone(), c.clone(), want_i.clone(), want_d.clone()
    x[0, 2, 5] = float("nan")
    c[1, 1500, 0] = float("nan")
    want_i[0, 2], want_d[0, 2] = 0, float("nan")
    want_i[1], want_d[1] = 1500, float("nan")
    with setting(path, 8):
        idx, dist, counts = run(x, c, cosine, exact)
    assert torch.equal(idx, want_i)
    assert torch.equal(dist.isnan(), want_d.isnan()) and torch.equal(dist.nan_to_num(), want_d.nan_to_num())
    assert torch.equal(counts, torch.stack([torch.bincount(i, minlength=2600) for i in want_i]))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("mode", V.MODES)
def test_public_cosine_dist_in_range(mode, device):
    """Rows equal to (normalised) codes: 1 - x.c rounds to about +-1e-7; the distance is clamped to [0, 2]
    as on every other backend (the CUDA kernel's fast mode too), and the index is the row's own code."""
    g = torch.Generator().manual_seed(3)
    c = torch.nn.functional.normalize(torch.randn(300, 48, generator=g), dim=-1)
    x = c[torch.randperm(300, generator=g)]
    x, c = x.to(device), c.to(device)
    with fastgen.use_backend("cpp", op="vq_nearest"):
        out = V.vq_nearest(x, c, distance="cosine", mode=mode)
    assert (out.dist >= 0).all() and (out.dist <= 2).all()
    assert torch.equal(c[out.indices], x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("bad", ["inf", "-inf", "nan"])
def test_public_nonfinite_rejected(dtype, bad):
    """The CPU input check (per-head extremes first) rejects a non-finite value in x or the codebook, in
    every dtype, naming the argument, before any kernel runs."""
    x, c = torch.randn(2, 5, 8).to(dtype), torch.randn(2, 7, 8).to(dtype)
    for name in ("x", "codebook"):
        xb, cb = x.clone(), c.clone()
        (xb if name == "x" else cb)[1, 3, 2] = float(bad)
        for distance in V.DISTANCES:
            with pytest.raises(ValueError, match=f"{name} contains NaN or inf"):
                V.vq_nearest(xb, cb, distance=distance)

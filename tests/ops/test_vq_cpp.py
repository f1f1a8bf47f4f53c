"""fastgen._C.vq_nearest_{cpu,cuda}: indices equal a float64 direct-form argmin reference (a different index
only where the two distances tie within fp32 rounding), planted exact ties -> lowest index, odd shapes,
heads, L2 and cosine, every dtype and every CPU micro-kernel, counts == bincount, errors. On a GPU: the
CUDA kernel against the same reference and against the CPU kernel at real sizes."""

import pytest
import torch
import torch.nn.functional as F

import fastgen
from fastgen import _ext
from fastgen.ops import vq as V

C = _ext.C
HAS_CUDA_EXT = C is not None and hasattr(C, "vq_nearest_cuda")
pytestmark = [
    pytest.mark.skipif(C is None, reason="fastgen._C not built"),
    pytest.mark.usefixtures("poison_empty"),
]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


ISAS = ("scalar", "avx2", "avx512")


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Every CPU micro-kernel this CPU runs, selected with FASTGEN_CPU_ISA (paths above the CPU's best skip)."""
    best = C.cpu_isa_best() if C is not None else "scalar"
    if ISAS.index(request.param) > ISAS.index(best):
        pytest.skip(f"this CPU's best SIMD path is {best}")
    monkeypatch.setenv("FASTGEN_CPU_ISA", request.param)
    assert C.cpu_isa() == request.param
    return request.param


def test_cpu_isa_override(monkeypatch):
    """FASTGEN_CPU_ISA caps the path at the CPU's best; an unknown value is an error naming the variable,
    raised before the kernel runs."""
    best = C.cpu_isa_best()
    monkeypatch.delenv("FASTGEN_CPU_ISA", raising=False)
    assert C.cpu_isa() == best
    monkeypatch.setenv("FASTGEN_CPU_ISA", "avx512")
    assert C.cpu_isa() == best  # never above what the CPU runs
    monkeypatch.setenv("FASTGEN_CPU_ISA", "scalar")
    assert C.cpu_isa() == "scalar"
    monkeypatch.setenv("FASTGEN_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="FASTGEN_CPU_ISA=sse9"):
        C.cpu_isa()
    x, c = torch.randn(4, 8), torch.randn(5, 8)
    with fastgen.use_backend("cpp"), pytest.raises(ValueError, match="FASTGEN_CPU_ISA"):
        fastgen.vq_nearest(x, c)


def nearest(device, *args):
    if device == "cuda":
        if not HAS_CUDA_EXT:
            pytest.skip("fastgen._C built without CUDA")
        return C.vq_nearest_cuda(*(a.cuda() if torch.is_tensor(a) else a for a in args))
    return C.vq_nearest_cpu(*args)


def make(h, n, k, d, dtype, cosine):
    x, c = torch.randn(h, n, d), torch.randn(h, k, d)
    if cosine:
        x, c = F.normalize(x, dim=-1), F.normalize(c, dim=-1)
    x, c = x.to(dtype), c.to(dtype)
    return x, c


def sqnorm(c, cosine):
    """What the caller passes: ||c||^2 in fp32 from the values (1 for the normalised cosine inputs)."""
    h, k = c.shape[:2]
    return torch.ones(h, k) if cosine else c.float().pow(2).sum(-1)


def ref_dist(x, c, cosine):
    """(H, N, K) float64 distances of the values the kernel sees (16-bit inputs upcast exactly), by direct
    forms accumulated per coordinate: exact ties stay exact on every CPU (cdist / matmul round by BLAS path).
    Cosine is 1 - x.c (the kernel's inputs are unit vectors)."""
    x64, c64 = x.double().cpu(), c.double().cpu()
    if not cosine:
        return V._dist_matrix_ref(x64, c64, "l2")
    dot = torch.zeros(x64.shape[:-1] + c64.shape[-2:-1], dtype=torch.float64)
    for j in range(x64.shape[-1]):
        dot += x64[..., j, None] * c64[..., None, :, j]
    return 1 - dot


def check(x, c, cosine, idx, dist, counts=None):
    """idx is the float64 argmin, or a code whose float64 distance is within fp32 rounding of the min."""
    idx, dist = idx.cpu(), dist.cpu()
    h, n, k = x.shape[0], x.shape[1], c.shape[1]
    assert idx.shape == (h, n) and idx.dtype == torch.int64
    assert dist.shape == (h, n) and dist.dtype == torch.float32
    assert ((idx >= 0) & (idx < k)).all()
    d64 = ref_dist(x, c, cosine)
    ref = d64.argmin(-1)
    dmin = d64.gather(-1, ref[..., None])[..., 0]
    dgot = d64.gather(-1, idx[..., None])[..., 0]
    scale = (
        1.0 if cosine else x.double().cpu().pow(2).sum(-1) + c.double().cpu().pow(2).sum(-1).amax(-1, True)
    )
    tol = 1e-5 * scale  # ~ D * eps_fp32 * (||x||^2 + ||c||^2) for the shapes here
    assert ((idx == ref) | (dgot - dmin <= tol)).all(), f"{(idx != ref).sum()} rows off the argmin"
    assert (idx == ref).float().mean() > 0.99
    assert ((dist.double() - dmin.clamp_min(0)).abs() <= tol + 1e-6).all()
    if counts is not None:
        want = torch.stack([torch.bincount(i, minlength=k) for i in idx])
        assert counts.dtype == torch.int64 and torch.equal(counts.cpu(), want)


@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cos"])
@pytest.mark.parametrize(
    "shape", [(1, 37, 53, 20), (3, 300, 260, 64), (1, 9, 1, 1), (2, 5, 7, 1), (1, 70, 200, 257)]
)
def test_random(isa, cosine, shape):
    x, c = make(*shape, torch.float32, cosine)
    idx, dist, counts = C.vq_nearest_cpu(x, c, sqnorm(c, cosine), cosine, True, True)
    check(x, c, cosine, idx, dist, counts)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cos"])
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
def test_dtypes(device, dtype, cosine, exact):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("the CUDA kernel takes 16/32-bit inputs")
    x, c = make(2, 131, 150, 48, dtype, cosine)
    idx, dist, counts = nearest(device, x, c, sqnorm(c, cosine), cosine, exact, True)
    check(x, c, cosine, idx, dist, counts)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cos"])
def test_planted_ties(isa, device, cosine):
    """Duplicated codes (across micro-kernel panels and code tiles) give bitwise-equal distances: the
    lowest index must win, as torch.argmin's."""
    x, c = make(2, 90, 300, 40, torch.float32, cosine)
    dup = [7, 8, 70, 129, 290]
    c[:, dup] = c[:, [dup[0]]]
    x[:, :45] = c[:, [dup[0]]] + 0.01 * torch.randn(2, 45, 40)  # these rows' nearest is the duplicated code
    if cosine:
        x = F.normalize(x, dim=-1)
    x[:, 45] = c[:, dup[2]]  # exactly on a code: distance ~0 to all five copies
    idx, dist, counts = nearest(device, x, c, sqnorm(c, cosine), cosine, True, True)
    assert (idx[:, :46].cpu() == dup[0]).all()
    check(x, c, cosine, idx, dist, counts)


def test_nan_row_and_empty():
    x, c = make(1, 4, 10, 8, torch.float32, False)
    x[0, 1, 3] = float("nan")
    idx, dist, _ = C.vq_nearest_cpu(x, c, sqnorm(c, False), False, True, False)
    assert idx[0, 1] == 0 and dist[0, 1].isnan()  # torch.argmin: the first NaN
    idx, dist, counts = C.vq_nearest_cpu(x[:, :0], c, sqnorm(c, False), False, True, True)
    assert (
        idx.shape == (1, 0)
        and dist.shape == (1, 0)
        and torch.equal(counts, torch.zeros(1, 10, dtype=torch.long))
    )
    _, _, none = C.vq_nearest_cpu(x, c, sqnorm(c, False), False, True, False)
    assert none.numel() == 0


def test_errors():
    x, c = make(2, 5, 7, 4, torch.float32, False)
    cn = sqnorm(c, False)
    bad = [
        ((x[0], c, cn), "x \\(H, N, D\\) must be 3-D"),
        ((x, c.half(), cn), "codebook has dtype"),
        ((x.int(), c.int(), cn), "x must be float32"),
        ((x, c[..., :3].contiguous(), cn), "does not match x's D"),
        ((x, c[:, :0].contiguous(), cn[:, :0].contiguous()), "K > 0"),
        ((x, c[:1], cn[:1]), "heads"),
        ((x.transpose(1, 2).contiguous().transpose(1, 2), c, cn), "must be contiguous"),
        ((x, c, cn[:, :3].contiguous()), "code_sqnorm must have shape"),
        ((x, c, cn.half()), "code_sqnorm must be float32"),
        ((x, c, cn.double()), "code_sqnorm must be float32"),
        ((x[..., :0].contiguous(), c[..., :0].contiguous(), cn), "D must be > 0"),
    ]
    for args, msg in bad:
        with pytest.raises(RuntimeError, match=msg):
            C.vq_nearest_cpu(*args, False, True, True)
    if HAS_CUDA_EXT:
        with pytest.raises(RuntimeError, match="must be on a CUDA device"):
            C.vq_nearest_cuda(x, c, cn, False, True, True)
        with pytest.raises(RuntimeError, match="must be float32, float16 or bfloat16"):
            C.vq_nearest_cuda(x.double().cuda(), c.double().cuda(), cn.cuda(), False, True, True)


def mismatches_are_ties(x, c, got, want, cosine):
    """Rows where two kernels disagree: both codes' float64 distances within fp32 rounding."""
    rows = (got != want).nonzero()
    if rows.numel() == 0:
        return True
    h, n = rows[:, 0], rows[:, 1]
    xr, c64 = x[h, n].double().cpu(), c.double().cpu()
    ca, cb = c64[h, got[h, n]], c64[h, want[h, n]]
    if cosine:
        gap = ((xr * ca).sum(-1) - (xr * cb).sum(-1)).abs()
        return bool((gap <= 1e-5).all())
    gap = ((xr - ca).pow(2).sum(-1) - (xr - cb).pow(2).sum(-1)).abs()
    return bool((gap <= 1e-5 * (xr.pow(2).sum(-1) + ca.pow(2).sum(-1))).all())


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,d", [(65536, 8192, 256), (4096, 65536, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cos"])
def test_cuda_matches_cpu_large(n, k, d, dtype, cosine):
    if not HAS_CUDA_EXT:
        pytest.skip("fastgen._C built without CUDA")
    x, c = make(1, n, k, d, dtype, cosine)
    cn = sqnorm(c, cosine)
    i_cpu, d_cpu, _ = C.vq_nearest_cpu(x, c, cn, cosine, True, False)
    i_gpu, d_gpu, n_gpu = C.vq_nearest_cuda(x.cuda(), c.cuda(), cn.cuda(), cosine, True, True)
    i_gpu, d_gpu, n_gpu = i_gpu.cpu(), d_gpu.cpu(), n_gpu.cpu()
    assert (i_gpu == i_cpu).float().mean() > 0.999
    assert mismatches_are_ties(x, c, i_gpu, i_cpu, cosine)
    torch.testing.assert_close(d_gpu, d_cpu, rtol=1e-4, atol=1e-4)
    assert torch.equal(n_gpu[0], torch.bincount(i_gpu[0], minlength=k))


def near_tie_problem(dtype, far=0):
    """(1, 40, 24) rows far from the origin, (1, 129 + far, 24) codes: per row three planted codes whose
    squared distances differ by ~1e-3 relative (one near-tie, one exact tie), below the fp32 expanded
    form's resolution, plus 9 (+ far, farther) decoys; every value exact in dtype."""
    g = torch.Generator().manual_seed(3)
    unit = 1 / 4 if dtype == torch.bfloat16 else 1 / 32
    n, d = 40, 24
    x = 40 + unit * torch.randint(-16, 16, (n, d), generator=g).double()
    alts = []
    for j in range(3):  # +1, +4, +1 unit^2 over a shared offset: one near-tie, one exact tie per row
        delta = torch.zeros(n, d, dtype=torch.float64)
        delta[:, :4] = unit * torch.randint(-3, 4, (n, 4), generator=g).double()
        delta[:, 4 + j] = unit * (1 + j % 2)
        alts.append(x + delta)
    c = torch.cat(
        [torch.stack(alts, 1).reshape(3 * n, d), 43 + unit * torch.randint(-16, 16, (9, d), generator=g)]
    )
    if far:  # spread over the codebook, so that every split of a split-K scan holds some planted codes
        c = torch.cat([c, 60 + unit * torch.randint(-16, 16, (far, d), generator=g).double()])
    c = c[torch.randperm(c.shape[0], generator=g)]
    x, c = x[None].to(dtype), c[None].to(dtype)
    assert torch.equal(x.double().to(dtype), x) and torch.equal(c.double().to(dtype), c)
    return x, c


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_exact_reranks_near_ties(isa, dtype):
    """Rows far from the origin with planted codes whose squared distances differ by ~1e-3 relative, below
    the fp32 expanded form's resolution: exact mode (top-4 + direct-form re-rank) must return the float64
    argmin, ties -> lowest index, and the direct distance; on fast mode the test only checks the contract."""
    x, c = near_tie_problem(dtype)
    cn = c.double().pow(2).sum(-1).to(torch.float64 if dtype == torch.float64 else torch.float32)
    idx, dist, counts = C.vq_nearest_cpu(x, c, cn, False, True, True)
    d64 = ref_dist(x, c, False)
    want = d64.argmin(-1)
    assert torch.equal(idx, want), f"{(idx != want).sum()} rows off the float64 argmin"
    torch.testing.assert_close(dist.double(), d64.gather(-1, want[..., None])[..., 0], rtol=0, atol=1e-6)
    assert torch.equal(counts[0], torch.bincount(idx[0], minlength=c.shape[1]))


@pytest.mark.gpu
@pytest.mark.parametrize("split", ["splitk", "nosplit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cos"])
def test_cuda_exact_reranks_near_ties(split, dtype, cosine):
    """The near-tie problem on the CUDA kernel's exact mode. splitk: 1 row block, 8192 extra far codes (65
    code tiles): the codebook is split and the per-split top-4 lists merged. nosplit: 300 heads of it, 129
    codes: enough row blocks to fill the GPU, one split. L2 must return the float64 argmin and the direct
    distance; cosine (1 - x.c: the re-rank cannot beat fp32 there) must equal the CPU exact kernel and pick
    the float64 argmin up to fp32 ties."""
    if not HAS_CUDA_EXT:
        pytest.skip("fastgen._C built without CUDA")
    x, c = near_tie_problem(dtype, far=8192 if split == "splitk" else 0)
    if split == "nosplit":
        x, c = x.expand(300, -1, -1).contiguous(), c.expand(300, -1, -1).contiguous()
    if cosine:
        x, c = F.normalize(x.double(), dim=-1).to(dtype), F.normalize(c.double(), dim=-1).to(dtype)
    cn = torch.ones(c.shape[:2]) if cosine else c.double().pow(2).sum(-1).float()
    idx, dist, counts = (
        t.cpu() for t in C.vq_nearest_cuda(x.cuda(), c.cuda(), cn.cuda(), cosine, True, True)
    )
    d64 = ref_dist(x, c, cosine)
    want = d64.argmin(-1)
    for h in range(x.shape[0]):
        assert torch.equal(counts[h], torch.bincount(idx[h], minlength=c.shape[1]))
    if cosine:
        i_cpu, d_cpu, _ = C.vq_nearest_cpu(x, c, cn, True, True, False)
        assert torch.equal(idx, i_cpu)
        assert mismatches_are_ties(x, c, idx, want, True)
        torch.testing.assert_close(dist, d_cpu, rtol=0, atol=1e-6)
        return
    assert torch.equal(idx, want), f"{(idx != want).sum()} rows off the float64 argmin"
    torch.testing.assert_close(dist.double(), d64.gather(-1, want[..., None])[..., 0], rtol=0, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cos"])
def test_cuda_exact_equals_cpu_exact(dtype, cosine):
    """Both kernels re-rank the same top-4 with the direct form in fp32: the same indices at a real size."""
    if not HAS_CUDA_EXT:
        pytest.skip("fastgen._C built without CUDA")
    x, c = make(1, 4096, 8192, 256, dtype, cosine)
    cn = sqnorm(c, cosine)
    i_cpu, d_cpu, _ = C.vq_nearest_cpu(x, c, cn, cosine, True, False)
    i_gpu, d_gpu, _ = C.vq_nearest_cuda(x.cuda(), c.cuda(), cn.cuda(), cosine, True, False)
    assert torch.equal(i_gpu.cpu(), i_cpu)
    torch.testing.assert_close(d_gpu.cpu(), d_cpu, rtol=1e-5, atol=1e-5)

"""The C++ CPU diffusion step on every SIMD path this machine runs (FASTGEN_CPU_ISA=scalar|avx2|avx512).

The kernel is compiled three times from one source (baseline, AVX2+FMA, AVX-512F) with FMA contraction
off, so every path must give the same bits as the scalar one: outputs are compared bitwise (NaN-aware:
the same NaN positions, the other elements bit for bit). One documented exception: the learned-range
exp uses FMA on the AVX2 / AVX-512 paths (not on the baseline), each form within 1 ulp of the float64
exp of the same float32 argument (checked per path), so x_prev of a learned-range step with noise or a
guidance gradient may differ between paths by that (checked against a bound derived from the inputs);
pred_x0 does not depend on the variance and stays bitwise. Independent references:

* bf16 / fp16: the kernel converts its inputs exactly to float32, computes in float32 and rounds once, so
  its output must equal the float32 kernel on the upcast inputs followed by torch's own ``.to(dtype)``
  (round to nearest even; bf16 NaN -> 0x7FC0), bit for bit. Ties, overflow to inf, subnormals and NaN are
  exercised on purpose.
* every dtype: the public samplers on the cpp backend vs the same calls on the torch backend, per path,
  under the tolerances of tests/ops/test_diffusion_step.py (float32) or one rounding of the dtype.

Paths above ``fastgen._C.cpu_isa_best()`` are skipped (the selection is capped to the CPU anyway).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

import fastgen
from fastgen import _ext
from fastgen.ops import diffusion_step as D

C = _ext.C
if C is None or not hasattr(C, "cpu_isa_best"):
    pytest.skip("fastgen._C (with cpu_isa) is not built", allow_module_level=True)

RANK = {"scalar": 0, "avx2": 1, "avx512": 2}
BEST = C.cpu_isa_best()
PATHS = [p for p in RANK if RANK[p] <= RANK[BEST]]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
AX, AM, EX, EM, EX2, EX0, CX, CX0, CEPS, CPREV, SIGMA, MINLOG, MAXLOG, NOISE_MASK, RNG_STEP = range(15)

pytestmark = pytest.mark.usefixtures("poison_empty")


@pytest.fixture(autouse=True)
def one_thread():
    """Run on one thread (the kernel's results do not depend on it, see the chunking test): small torch
    ops then never wait for a second OpenMP thread on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def cpu_isa(path: str):
    """Run the block with FASTGEN_CPU_ISA=path (read by the kernel at every call)."""
    old = os.environ.get("FASTGEN_CPU_ISA")
    os.environ["FASTGEN_CPU_ISA"] = path
    try:
        yield
    finally:
        if old is None:
            del os.environ["FASTGEN_CPU_ISA"]
        else:
            os.environ["FASTGEN_CPU_ISA"] = old


def need(path: str) -> None:
    if RANK[path] > RANK[BEST]:
        pytest.skip(f"this CPU's best path is {BEST}")


def assert_same_bits(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Equal NaN positions and equal bits everywhere else (NaN payloads may differ)."""
    assert a.shape == b.shape and a.dtype == b.dtype, what
    na, nb = torch.isnan(a), torch.isnan(b)
    assert torch.equal(na, nb), f"{what}: NaN positions differ ({int((na != nb).sum())} elements)"
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    ia, ib = a.view(ints)[~na], b.view(ints)[~nb]
    bad = ia != ib
    assert not bad.any(), (
        f"{what}: {int(bad.sum())}/{bad.numel()} elements differ, e.g. {a[~na][bad][:4].tolist()} vs "
        f"{b[~nb][bad][:4].tolist()}"
    )


def assert_within(a: torch.Tensor, b: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """Equal NaN and infinity positions (and signs), |a - b| <= bound elsewhere."""
    assert a.shape == b.shape and a.dtype == b.dtype, what
    na, nb = torch.isnan(a), torch.isnan(b)
    assert torch.equal(na, nb), f"{what}: NaN positions differ ({int((na != nb).sum())} elements)"
    inf = torch.isinf(a) | torch.isinf(b)
    assert torch.equal(a[inf], b[inf]), f"{what}: infinities differ"
    ok = ~(na | inf)
    diff = (a.double() - b.double()).abs()[ok]
    bad = diff > bound.expand(a.shape)[ok]
    assert not bad.any(), f"{what}: {int(bad.sum())} elements beyond the bound, worst {diff.max().item():.3g}"


Z_MAX = 5.8  # |Box-Muller normal| <= sqrt(-2 ln 2^-24) = 5.77 (u1 >= 2^-24)


def learned_bound(args, ref_out: torch.Tensor) -> torch.Tensor:
    """How far x_prev of a learned-range step may move between paths whose exps differ (each within 1 ulp
    of exact: 2 ulp apart at most, 4 for sd^2): 8 float32 eps of the noise and guidance-gradient terms
    (from float64 sd), plus one rounding of the output dtype."""
    x, cond, k = args[0], args[1], args[4]
    B, N = x.shape
    f = (cond[:B, N : 2 * N].double() + 1.0) * 0.5
    sd = torch.exp(0.5 * (f * float(k[MAXLOG]) + (1.0 - f) * float(k[MINLOG])))
    z = args[6].double().abs() if args[12] == 1 else Z_MAX
    term = sd * abs(float(k[NOISE_MASK])) * z if args[12] else torch.zeros_like(sd)
    if args[19] is not None:
        term = term + sd * sd * abs(args[20]) * args[19].double().abs()
    eps32 = torch.finfo(torch.float32).eps
    out = ref_out.double().abs().nan_to_num(0.0, 0.0, 0.0)
    return (8 * eps32 * term.nan_to_num(0.0, 0.0, 0.0) + torch.finfo(ref_out.dtype).eps * out + 1e-37).float()


# =====================================================================================================
# the raw kernel: every feature, odd sizes, NaN / inf inputs
# =====================================================================================================


def coeffs(step: int = 11) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    k = torch.rand(16, generator=g) * 1.6 - 0.8
    k[MINLOG], k[MAXLOG] = -6.0, -2.0
    k[SIGMA], k[NOISE_MASK], k[RNG_STEP] = 0.3, 1.0, float(step)
    k[15] = float("nan")  # unused slot
    return k


# feature sets: uncond ("doubled" / "separate"), rescale, clip (0 none, 1 static, 2 dynamic), prev,
# noise (1 tensor, 2 counter), var (1 learned range), known (inpainting), grad, x0_only, want_x0
FEATURES = {
    "plain": {},
    "cfg+clip": {"uncond": "doubled", "clip": 1},
    "cfg+rescale+dynamic": {"uncond": "separate", "rescale": True, "clip": 2},
    "learned+rng+grad": {"uncond": "doubled", "var": 1, "noise": 2, "grad": True},
    "noise+prev": {"noise": 1, "prev": True, "want_x0": False},
    "inpaint+clip+learned+rng": {"uncond": "doubled", "var": 1, "noise": 2, "known": True, "clip": 1},
    "sigma-grad+dynamic+known": {"grad": True, "clip": 2, "known": True, "prev": True},
    "x0_only+dynamic+known": {"uncond": "separate", "clip": 2, "known": True, "x0_only": True},
}


def make_args(dtype, B, N, f, seed=0, specials=True):
    """Positional arguments of sampler_step_cpu, with NaN / +-inf planted in x and the model output."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    lc = (2 * N if f.get("var") else N) + 3  # rows longer than needed
    cond = rnd(2 * B if f.get("uncond") == "doubled" else B + 1, lc) * 2
    if f.get("var"):
        cond[:, N : 2 * N] = torch.rand(cond.shape[0], N, generator=g) * 2 - 1
    x = rnd(B, N) * 2
    if specials and N >= 4:
        x[0, N // 2] = float("nan")
        x[B - 1, N - 1] = float("inf")
        cond[B - 1, 1] = float("nan")
        cond[0, N - 2] = -float("inf")
    unc, uoff = None, 0
    if f.get("uncond") == "doubled":
        unc, uoff = cond, B
    elif f.get("uncond") == "separate":
        unc, uoff = rnd(B + 2, N + 5), 1
    keep = (torch.rand(B, N, generator=g) > 0.5).float() if f.get("known") else None
    args = [
        x,
        cond,
        unc,
        uoff,
        coeffs(),
        rnd(B, N) if f.get("prev") else None,
        rnd(B, N) if f.get("noise") == 1 else None,
        (torch.rand(B, generator=g) + 0.5) if f.get("rescale") else None,
        (torch.rand(B, generator=g) * 2 + 0.5) if f.get("clip") == 2 else None,
        4.0 if f.get("uncond") else 1.0,
        0.9 if f.get("clip") == 1 else 0.0,
        int(f.get("var", 0)),
        int(f.get("noise", 0)),
        0x1234_5678_9ABC,
        5,
        f.get("want_x0", True),
        f.get("x0_only", False),
        rnd(B, N) if f.get("known") else None,
        keep,
        rnd(B, N) if f.get("grad") else None,
        2.5 if f.get("grad") else 0.0,
    ]
    # every tensor but coeffs / row_scale / thresh (float32 by contract) in the step's dtype
    fixed = {4, 7, 8}
    return [a.to(dtype) if isinstance(a, torch.Tensor) and i not in fixed else a for i, a in enumerate(args)]


def upcast(args):
    return [a.float() if isinstance(a, torch.Tensor) else a for a in args]


def run(path, args):
    with cpu_isa(path):
        return C.sampler_step_cpu(*args)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("feat", list(FEATURES))
@pytest.mark.parametrize("N", [1, 15, 33, 515, 1559])
def test_paths_bitwise_equal_and_conversions_exact(dtype, feat, N):
    """Every path gives the scalar path's bits (x_prev of a learned-range step with noise or a guidance
    gradient: within learned_bound); 16-bit outputs equal float32 kernel + torch's rounding."""
    f = FEATURES[feat]
    B = 3
    args = make_args(dtype, B, N, f, seed=N)
    ref_out, ref_x0 = run("scalar", args)
    fma_exp = f.get("var") and (f.get("noise") or f.get("grad"))
    for path in PATHS[1:]:
        out, x0 = run(path, args)
        if fma_exp:
            assert_within(out, ref_out, learned_bound(args, ref_out), f"{path} x_prev")
        elif out.numel():
            assert_same_bits(out, ref_out, f"{path} x_prev")
        assert_same_bits(x0, ref_x0, f"{path} x0")
    if dtype != torch.float32:
        for path in PATHS:
            o32, x032 = run(path, upcast(args))
            out, x0 = run(path, args)
            if f.get("x0_only"):  # |x0| is float32 in every dtype
                assert_same_bits(x0, x032, f"{path} |x0|")
                continue
            assert_same_bits(out, o32.to(dtype), f"{path} x_prev vs float32 kernel + torch rounding")
            if f.get("want_x0", True):
                assert_same_bits(x0, x032.to(dtype), f"{path} x0 vs float32 kernel + torch rounding")
    # the planted NaN reaches x_prev (the dynamic threshold makes its whole sample NaN)
    if N >= 4 and not f.get("x0_only"):
        assert torch.isnan(ref_out[0, N // 2])


@pytest.mark.parametrize("path", list(RANK))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
def test_rounding_ties_overflow_subnormals(path, dtype):
    """x_prev = CX x with CX = 1 + half an ulp: every odd-mantissa x is an exact tie (round to even),
    the largest finite values overflow to inf, subnormals survive, NaN stays NaN (the other terms of the
    update are + 0 * 0, so -0.0 comes out as +0.0, as in IEEE arithmetic)."""
    need(path)
    fi = torch.finfo(dtype)
    half_ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    g = torch.Generator().manual_seed(1)
    mant = torch.randint(-(2**12), 2**12, (4000,), generator=g).float()
    lo, hi = (-40, 4) if dtype == torch.float16 else (-150, 100)  # finite inputs (|x| < 2^16 in fp16)
    expo = torch.randint(lo, hi, (4000,), generator=g).float()
    vals = (mant * torch.exp2(expo)).to(dtype)  # many odd mantissas, normals and subnormals
    special = torch.tensor(
        [fi.max, -fi.max, fi.tiny, fi.smallest_normal / 2, 0.0, -0.0, float("nan"), 1.0, -3.0], dtype=dtype
    )
    x = torch.cat([vals, special]).reshape(1, -1)
    k = torch.zeros(16)
    k[CX] = 1.0 + half_ulp
    args = [x, torch.zeros_like(x), None, 0, k, None, None, None, None, 1.0, 0.0, 0, 0, 0, 0, False, False]
    out, _ = run(path, args)
    o32, _ = run(path, upcast(args))
    assert_same_bits(out, o32.to(dtype), f"{path} ties")
    want = (x.double() * (1.0 + half_ulp) + 0.0).to(dtype)  # exact in float64: one rounding to dtype
    assert_same_bits(out, want, f"{path} vs float64 product rounded by torch")
    assert torch.isinf(out[0, -9]) and torch.isinf(out[0, -8])  # max * (1 + half ulp) ties to inf (even)


@pytest.mark.parametrize("path", list(RANK))
def test_learned_range_exp_within_one_ulp(path):
    """The learned-range sd, exp(0.5 (f MAXLOG + (1 - f) MINLOG)) with f = (v + 1) / 2, is the kernel's own
    branch-free exp (it vectorizes; libm's expf does not): within 1 ulp of the float64 exp of the same
    float32 argument over arguments from -110 to 95 (subnormal results, 0 below, inf above), NaN for NaN."""
    need(path)
    n = 20_000
    v = torch.cat(
        [torch.linspace(-1, 1, n - 4), torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5])]
    )
    k = torch.zeros(16)
    k[MINLOG], k[MAXLOG], k[NOISE_MASK] = -220.0, 190.0, 1.0
    x = torch.zeros(1, n)
    cond = torch.cat([torch.zeros(1, n), v[None]], 1)
    ones = torch.ones(1, n)  # the noise tensor: x_prev = sd * 1
    args = [x, cond, None, 0, k, None, ones, None, None, 1.0, 0.0, 1, 1, 0, 0, False, False]
    sd, _ = run(path, args)
    f = (v + 1.0) * 0.5  # the argument in float32, as the kernel forms it
    arg = 0.5 * (f * k[MAXLOG] + (1.0 - f) * k[MINLOG])
    want = torch.exp(arg.double()).float()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(sd[0]), nan)
    ulps = (sd[0].view(torch.int32).long() - want.view(torch.int32).long()).abs()[~nan]
    assert ulps.max().item() <= 1, f"{path}: {ulps.max().item()} ulp"
    assert (want == 0).any() and torch.isinf(want).any() and ((want > 0) & (want < 2**-126)).any()


def test_isa_selection_and_errors():
    with cpu_isa("scalar"):
        assert C.cpu_isa() == "scalar"
    with cpu_isa("avx512"):  # capped to the CPU
        assert C.cpu_isa() == ("avx512" if BEST == "avx512" else BEST)
    args = make_args(torch.float32, 2, 40, FEATURES["plain"])
    with cpu_isa("sse9"), pytest.raises(ValueError, match="FASTGEN_CPU_ISA"):
        C.sampler_step_cpu(*args)


@pytest.mark.parametrize("path", list(RANK))
def test_parallel_chunks_match_single_thread(path):
    """Large calls split into chunks across threads: the same bits as one thread."""
    need(path)
    args = make_args(torch.bfloat16, 3, 23_001, FEATURES["learned+rng+grad"], specials=False)  # 540 tiles
    one = run(path, args)
    torch.set_num_threads(2)  # restored by the one_thread fixture
    many = run(path, args)
    assert_same_bits(many[0], one[0], "x_prev")
    assert_same_bits(many[1], one[1], "x0")


# =====================================================================================================
# the public samplers: cpp on each path vs the torch backend
# =====================================================================================================


def schedule(t=40):
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    return abar[torch.linspace(0, 999, t).round().long()]


def _sampler_cases():
    def ddim_clip(x, mo, abar, **kw):
        return D.ddim_step(x, mo, abar, 25, 18, clip_sample=1.0, guidance_scale=3.0, **kw)

    def ddim_eta_dyn(x, mo, abar, **kw):
        return D.ddim_step(x, mo, abar, 25, 18, eta=0.7, seed=99, dynamic_threshold=(0.9, 2.0),
                           guidance_scale=3.0, **kw)  # fmt: skip

    def ddpm_inpaint(x, mo, abar, known, keep, **kw):
        return D.ddpm_step(x, mo, abar, 25, variance_type="learned_range", clip_sample=1.0, seed=7,
                           guidance_scale=3.0, known_image=known, known_mask=keep, **kw)  # fmt: skip

    def ddpm_grad(x, mo, abar, grad, noise, **kw):
        return D.ddpm_step(x, mo, abar, 25, variance_type="learned_range", noise=noise, cond_grad=grad,
                           cond_grad_scale=2.0, guidance_scale=3.0, **kw)  # fmt: skip

    def dpm2_rescale(x, mo, abar, prev, **kw):
        return D.dpm_solver_2m_step(x, mo, abar, 25, 21, prev_x0=prev, t_last=29, guidance_scale=3.0,
                                    guidance_rescale=0.7, **kw)  # fmt: skip

    def euler_a(x, mo, abar, **kw):
        return D.euler_ancestral_step(x, mo, abar, 25, 20, seed=3, sample_offset=2, guidance_scale=3.0, **kw)

    # name -> (call, learned variance, extra inputs)
    return {
        "ddim+cfg+clip": (ddim_clip, False, ()),
        "ddim_eta+seed+dynthresh": (ddim_eta_dyn, False, ()),
        "ddpm_learned+inpaint+seed": (ddpm_inpaint, True, ("known", "keep")),
        "ddpm_learned+grad+noise": (ddpm_grad, True, ("grad", "noise")),
        "dpm2+prev+rescale": (dpm2_rescale, False, ("prev",)),
        "euler_a+seed": (euler_a, False, ()),
    }


SAMPLER_CASES = _sampler_cases()


@pytest.mark.parametrize("path", list(RANK))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("name", list(SAMPLER_CASES))
def test_samplers_cpp_path_vs_torch_backend(path, dtype, name):
    need(path)
    call, learned, extras = SAMPLER_CASES[name]
    shape = (3, 3, 19, 29)  # N = 1653: three tiles of a row, the last one 117 long
    g = torch.Generator().manual_seed(len(name))
    b, c = shape[:2]
    x = (torch.randn(shape, generator=g) * 2).to(dtype)
    mo = torch.randn((2 * b, 2 * c if learned else c, *shape[2:]), generator=g)
    if learned:
        mo[:, c:] = mo[:, c:].tanh()
    mo = mo.to(dtype)
    kw = {}
    for e in extras:
        if e == "keep":
            kw[e] = (torch.rand((b, 1, *shape[2:]), generator=g) > 0.5).to(dtype).expand(shape).contiguous()
        else:
            kw[e] = torch.randn(shape, generator=g).to(dtype)
    abar = schedule()
    with cpu_isa(path), fastgen.use_backend("cpp", op="diffusion_step"):
        out, x0 = call(x, mo, abar, **kw)
    with cpu_isa("scalar"), fastgen.use_backend("cpp", op="diffusion_step"):
        s_out, s_x0 = call(x, mo, abar, **kw)
    with fastgen.use_backend("torch", op="diffusion_step"):
        r_out, r_x0 = call(x, mo, abar, **kw)
    if learned:  # the learned-range exp's FMA form: see learned_bound
        k = D.ddpm_coeffs(abar, 25, "epsilon", "learned_range").float()
        args = [x.reshape(b, -1), mo.reshape(2 * b, -1), None, 0, k, None, kw.get("noise"), *[None] * 5]
        args += [1 if "noise" in kw else 2, *[None] * 6, kw.get("grad"), 2.0]
        args = [a.reshape(b, -1) if isinstance(a, torch.Tensor) and a is not k and a.shape == x.shape else a
                for a in args]  # fmt: skip
        assert_within(out, s_out, learned_bound(args, s_out.reshape(b, -1)).reshape(shape), f"{path} x_prev")
    else:
        assert_same_bits(out, s_out, f"{path} x_prev vs scalar path")
    assert_same_bits(x0, s_x0, f"{path} x0 vs scalar path")
    # torch backend: float32 math, one rounding to dtype (the same formulas in another order)
    eps = 2e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    for o, r in ((out, r_out), (x0, r_x0)):
        assert torch.isfinite(o).all()
        scale = max(1.0, r.float().abs().max().item())
        torch.testing.assert_close(o.float(), r.float(), rtol=eps, atol=eps * scale / 10)

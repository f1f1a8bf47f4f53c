"""Tests of the C++ / CUDA fused sampler step kernels in fastgen._C, on their own.

The oracle is a float64 NumPy transcription of the kernels' specification written here (independent of
fastgen.ops.diffusion_step): per element, with b the sample and i the element,

    m   = u + g (c - u)  (with uncond)  else c;   m *= row_scale[b]
    x0  = AX x + AM m;   eps = EX x + EM m
    clip > 0:  x0 = clamp(x0, -clip, clip);          eps = EX2 x + EX0 x0
    thresh:    x0 = clamp(x0, -s_b, s_b) / s_b;      eps = EX2 x + EX0 x0
    x_prev = CX x + CX0 x0 + CEPS eps + CPREV prev_x0 + NOISE_MASK sd z
    sd = SIGMA, or exp(0.5 (f MAXLOG + (1 - f) MINLOG)) with f = (cond[b, N + i] + 1) / 2
    z  = noise[b, i], or the counter-based normal of (seed, sample_offset + b, RNG_STEP, i)
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import itertools
import os

import numpy as np
import pytest
import torch


def _load_ext():
    """fastgen._C, or the built .so loaded directly when importing the package fails for other reasons."""
    try:
        return importlib.import_module("fastgen._C")
    except ImportError:
        pass
    root = os.path.join(os.path.dirname(__file__), "..", "..", "fastgen")
    for path in glob.glob(os.path.join(root, "_C*.so")) + glob.glob(os.path.join(root, "_C*.pyd")):
        spec = importlib.util.spec_from_file_location("fastgen._C", path)
        mod = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(mod)
        except ImportError:
            continue
        return mod
    return None


C = _load_ext()
if C is None:
    pytest.skip("fastgen._C is not built", allow_module_level=True)

AX, AM, EX, EM, EX2, EX0, CX, CX0, CEPS, CPREV, SIGMA, MINLOG, MAXLOG, NOISE_MASK, RNG_STEP = range(15)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# max |kernel - float64 oracle| <= ATOL + RTOL |oracle|: float32 arithmetic, then one rounding to dtype
TOL = {torch.float32: (2e-5, 1e-5), torch.float16: (1e-5, 2.0**-10), torch.bfloat16: (1e-5, 2.0**-7)}
M32 = 0xFFFFFFFF

# =====================================================================================================
# float64 oracle
# =====================================================================================================


def fmix32(h: np.ndarray | int) -> np.ndarray:
    """MurmurHash3 fmix32 on uint32 (wrapping) arithmetic."""
    h = np.asarray(h, dtype=np.uint32)
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint32(16))
        h = h * np.uint32(0x85EBCA6B)
        h = h ^ (h >> np.uint32(13))
        h = h * np.uint32(0xC2B2AE35)
        h = h ^ (h >> np.uint32(16))
    return h


def rng_uniforms(seed: int, sample: int, step: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(u1, u2) of each element's pair, as float32 (exact: 24-bit integers times 2^-24)."""
    seed &= (1 << 64) - 1
    base = fmix32(np.uint32(seed & M32) ^ np.uint32(0x243F6A88))
    base = fmix32(base ^ np.uint32(seed >> 32))
    base = fmix32(base ^ np.uint32(sample & M32))
    base = fmix32(base ^ np.uint32(step & M32))
    k0 = fmix32(base ^ np.uint32(0x13198A2E))
    k1 = fmix32(base ^ np.uint32(0x03707344))
    c0 = (np.arange(n, dtype=np.uint32) >> np.uint32(1)) * np.uint32(2)
    with np.errstate(over="ignore"):
        h0 = fmix32(fmix32(c0 + k0) ^ k1)
        h1 = fmix32(fmix32(c0 + np.uint32(1) + k0) ^ k1)
    u1 = ((h0 >> np.uint32(8)) + np.uint32(1)).astype(np.float32) * np.float32(2.0**-24)
    u2 = (h1 >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)
    return u1, u2


def rng_normals(seed: int, sample: int, step: int, n: int) -> np.ndarray:
    """Box-Muller in float64 on the float32 uniforms; theta rounded to float32 as the kernels do."""
    u1, u2 = rng_uniforms(seed, sample, step, n)
    r = np.sqrt(-2.0 * np.log(u1.astype(np.float64)))
    theta = (np.float32(6.2831853071795864) * u2).astype(np.float64)
    odd = (np.arange(n) & 1).astype(bool)
    return np.where(odd, r * np.sin(theta), r * np.cos(theta))


def f64(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().to("cpu", torch.float64).numpy()


def oracle(x, cond, uncond, uoff, coeffs, prev, noise, row_scale, thresh, g, clip, var_mode, noise_mode, seed,
           sample_offset, want_x0, x0_only):  # fmt: skip
    """(x_prev, x0) in float64; x0 is |x0| when x0_only."""
    B, N = x.shape
    k = f64(coeffs)
    xv = f64(x)
    c = f64(cond)
    m = c[:B, :N]
    if uncond is not None:
        u = f64(uncond)[uoff : uoff + B, :N]
        m = u + float(np.float32(g)) * (m - u)
    if row_scale is not None:
        m = m * f64(row_scale)[:, None]
    x0 = k[AX] * xv + k[AM] * m
    eps = k[EX] * xv + k[EM] * m
    clip = float(np.float32(clip))
    if clip > 0:
        x0 = np.clip(x0, -clip, clip)
        eps = k[EX2] * xv + k[EX0] * x0
    elif thresh is not None:
        s = f64(thresh)[:, None]
        x0 = np.clip(x0, -s, s) / s
        eps = k[EX2] * xv + k[EX0] * x0
    if x0_only:
        return None, np.abs(x0)
    xp = k[CX] * xv + k[CX0] * x0 + k[CEPS] * eps
    if prev is not None:
        xp = xp + k[CPREV] * f64(prev)
    if noise_mode:
        if noise_mode == 1:
            z = f64(noise)
        else:
            z = np.stack([rng_normals(seed, sample_offset + b, int(k[RNG_STEP]), N) for b in range(B)])
        if var_mode == 1:
            f = (c[:B, N : 2 * N] + 1.0) * 0.5
            sd = np.exp(0.5 * (f * k[MAXLOG] + (1.0 - f) * k[MINLOG]))
        else:
            sd = k[SIGMA]
        xp = xp + k[NOISE_MASK] * sd * z
    return xp, (x0 if want_x0 else None)


# =====================================================================================================
# helpers
# =====================================================================================================


def poison_heap(shape):
    """Free a NaN-filled block of the outputs' size so a fresh output is likely to reuse NaN memory."""
    t = torch.full(shape, float("nan"))
    del t


def make_coeffs(step: int = 17) -> torch.Tensor:
    k = torch.randn(16) * 0.7
    k[MINLOG], k[MAXLOG] = -6.0, -1.5
    k[NOISE_MASK] = 1.0
    k[RNG_STEP] = float(step)
    k[15] = float("nan")  # unused: must never be read into a result
    return k


def noise_only_coeffs(step: int = 3) -> torch.Tensor:
    """Coefficients with x_prev = z (NOISE_MASK = SIGMA = 1, everything else 0)."""
    k = torch.zeros(16)
    k[SIGMA] = k[NOISE_MASK] = 1.0
    k[RNG_STEP] = float(step)
    return k


def make_case(dtype, B, N, *, uncond=None, rescale=False, clip_mode=0, prev=False, noise_mode=0, var_mode=0,
              want_x0=True, x0_only=False, seed=1234567, sample_offset=3, pad=True, device="cpu"):  # fmt: skip
    """Positional arguments of sampler_step_* for one feature combination.

    pad: cond / uncond rows longer than needed (the kernels must use their own row lengths); without it
    every row start is 16-byte aligned when N is a multiple of 8 (the CUDA kernel's vector path).
    """
    lc = (2 * N if var_mode == 1 else N) + (3 if pad else 0)
    cond = torch.randn(B + 1, lc)
    if var_mode == 1:
        cond[:, N : 2 * N].uniform_(-1.0, 1.0)
    cond = cond.to(dtype)
    unc, uoff = None, 0
    if uncond == "separate":
        unc, uoff = torch.randn(B + 3, N + (5 if pad else 0)).to(dtype), 2
    elif uncond == "doubled":  # GLIDE-style [cond; uncond] in one tensor
        cond = torch.randn(2 * B, lc).to(dtype)
        unc, uoff = cond, B
    args = [
        torch.randn(B, N).to(dtype),
        cond,
        unc,
        uoff,
        make_coeffs(),
        torch.randn(B, N).to(dtype) if prev else None,
        torch.randn(B, N).to(dtype) if noise_mode == 1 else None,
        (torch.rand(B) + 0.5) if rescale else None,
        (torch.rand(B) * 2 + 0.5) if clip_mode == 2 else None,
        7.5 if uncond else 1.0,
        0.8 if clip_mode == 1 else 0.0,
        var_mode,
        noise_mode,
        seed,
        sample_offset,
        want_x0,
        x0_only,
    ]
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]


def assert_close(out: torch.Tensor, ref: np.ndarray, dtype, what: str) -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {ref.shape}"
    o = f64(out)
    assert np.isfinite(o).all(), f"{what}: {int((~np.isfinite(o)).sum())} non-finite elements"
    atol, rtol = TOL[dtype]
    err = np.abs(o - ref)
    bad = err > atol + rtol * np.abs(ref)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())}/{bad.size} elements off, max err {err.max():.3g} at "
        f"{np.unravel_index(err.argmax(), err.shape)}"
    )


def run_and_check(args, dtype):
    B, N = args[0].shape
    poison_heap((B, N))
    out, x0 = C.sampler_step_cpu(*args)
    ref_out, ref_x0 = oracle(*args)
    x0_only, want_x0 = args[16], args[15]
    if x0_only:
        assert out.numel() == 0
        assert x0.dtype == torch.float32
        assert_close(x0, ref_x0, torch.float32, "|x0|")
        return
    assert out.dtype == dtype
    assert_close(out, ref_out, dtype, "x_prev")
    if want_x0:
        assert x0.dtype == dtype
        assert_close(x0, ref_x0, dtype, "pred_x0")
    else:
        assert x0.numel() == 0


# =====================================================================================================
# CPU kernel vs the oracle
# =====================================================================================================

NOISE_VAR = [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1)]
FEATURES = list(itertools.product([None, "separate", "doubled"], [False, True], [0, 1, 2], [False, True],
                                  NOISE_VAR, [False, True]))  # fmt: skip


def _feature_id(f):
    uncond, rescale, clip_mode, prev, (noise_mode, var_mode), want_x0 = f
    return (f"u-{uncond or 'none'}{'-rs' if rescale else ''}-clip{clip_mode}{'-prev' if prev else ''}"
            f"-noise{noise_mode}-var{var_mode}{'-x0' if want_x0 else ''}")  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feat", FEATURES, ids=[_feature_id(f) for f in FEATURES])
def test_cpu_every_feature(dtype, feat):
    uncond, rescale, clip_mode, prev, (noise_mode, var_mode), want_x0 = feat
    args = make_case(dtype, 3, 1001, uncond=uncond, rescale=rescale, clip_mode=clip_mode, prev=prev,
                     noise_mode=noise_mode, var_mode=var_mode, want_x0=want_x0)  # fmt: skip
    run_and_check(args, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 2, 7, 511, 512, 513, 1001, 2051])
@pytest.mark.parametrize("clip_mode", [0, 1, 2])
def test_cpu_sizes_and_x0_only(dtype, n, clip_mode):
    """Odd sizes and tile boundaries (tiles of 512 elements), with generator noise and the |x0| pass."""
    full = make_case(dtype, 3, n, uncond="separate", rescale=True, clip_mode=clip_mode, prev=True,
                     noise_mode=2, var_mode=1)  # fmt: skip
    run_and_check(full, dtype)
    only = make_case(dtype, 3, n, uncond="doubled", rescale=True, clip_mode=clip_mode, want_x0=False,
                     x0_only=True)  # fmt: skip
    run_and_check(only, dtype)


def test_cpu_empty_inputs():
    for B, N in [(0, 5), (3, 0)]:
        args = make_case(torch.float32, max(B, 1), max(N, 1), noise_mode=2)
        args[0] = torch.randn(B, N)
        args[1] = torch.randn(max(B, 1), max(N, 1))
        out, x0 = C.sampler_step_cpu(*args)
        assert out.shape == (B, N) and x0.shape == (B, N)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("clip_mode", [1, 2])
def test_cpu_clip_keeps_nan(dtype, clip_mode):
    """A NaN x0 stays NaN through the clip / threshold (torch.clamp semantics), in every lane of a tile."""
    args = make_case(dtype, 2, 1001, clip_mode=clip_mode)
    nan_at = [0, 7, 500, 1000]
    args[1][1, nan_at] = float("nan")  # model output of sample 1
    out, x0 = C.sampler_step_cpu(*args)
    for t in (out, x0):
        assert t[1].isnan().nonzero().flatten().tolist() == nan_at
        assert not t[0].isnan().any()


def test_cpu_large_parallel():
    """Several threads' worth of tiles (the parallel_for path), fp32 and bf16."""
    for dtype in (torch.float32, torch.bfloat16):
        args = make_case(dtype, 4, 3 * 64 * 64 + 1, uncond="separate", clip_mode=2, prev=True, noise_mode=2)
        run_and_check(args, dtype)


# =====================================================================================================
# the counter-based generator
# =====================================================================================================


def normals_cpu(n, *, seed, step, sample_offset=0, B=1, dtype=torch.float32):
    x = torch.zeros(B, n, dtype=dtype)
    out, _ = C.sampler_step_cpu(x, x, None, 0, noise_only_coeffs(step), None, None, None, None, 1.0, 0.0, 0, 2,
                                seed, sample_offset, False, False)  # fmt: skip
    return out


def test_fmix32_known_answers():
    # MurmurHash3 fmix32, computed with C uint32 arithmetic
    known = {0: 0x00000000, 1: 0x514E28B7, 2: 0x30F4C306, 0xDEADBEEF: 0x0DE5C6A9, 0xFFFFFFFF: 0x81F16F39,
             0x243F6A88: 0x1388A0FB}  # fmt: skip
    for h, want in known.items():
        assert int(fmix32(h)) == want, hex(h)


# (seed, sample, step) -> first six normals, computed from the specification in C (uint32 hashing,
# float32 uniforms and theta, double-precision log / sqrt / sin / cos)
KNOWN_NORMALS = {
    (0, 0, 0): [-0.423751904, -0.918945350, -0.642640942, 0.406737201, -0.613540773, -0.578366373],
    (0x0123456789ABCDEF, 5, 999): [
        2.754743827,
        -1.084362580,
        -1.717513329,
        -0.719498651,
        0.417862462,
        0.547155432,
    ],
}


@pytest.mark.parametrize("key", list(KNOWN_NORMALS))
def test_rng_known_answers(key):
    seed, sample, step = key
    want = np.array(KNOWN_NORMALS[key])
    np.testing.assert_allclose(rng_normals(seed, sample, step, 6), want, rtol=0, atol=2e-9)
    got = normals_cpu(6, seed=seed, step=step, sample_offset=sample)[0].double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_rng_matches_oracle_and_pairs():
    n = 20001
    z = normals_cpu(n, seed=-42, step=123456, sample_offset=7, B=2).double().numpy()
    for b in range(2):
        ref = rng_normals(-42, 7 + b, 123456, n)
        np.testing.assert_allclose(z[b], ref, rtol=2e-6, atol=1e-6)
        # elements 2p and 2p+1 are the cosine and the sine of one pair: z_e^2 + z_o^2 = -2 ln u1
        u1, _ = rng_uniforms(-42, 7 + b, 123456, n)
        r2 = -2.0 * np.log(u1[0 : n - 1 : 2].astype(np.float64))
        np.testing.assert_allclose(z[b, 0 : n - 1 : 2] ** 2 + z[b, 1:n:2] ** 2, r2, rtol=1e-5, atol=1e-6)


def test_rng_statistics():
    z = normals_cpu(100_000, seed=2024, step=1).double().numpy()[0]
    assert abs(z.mean()) < 0.02  # standard error 0.0032
    assert abs(z.std() - 1.0) < 0.02
    assert np.abs(z).max() < 6.0  # |z| <= sqrt(-2 ln 2^-24) = 5.77 by construction
    # neither the cosine nor the sine half is biased, and they are uncorrelated
    assert abs(z[0::2].mean()) < 0.03 and abs(z[1::2].mean()) < 0.03
    assert abs(np.corrcoef(z[0::2], z[1::2])[0, 1]) < 0.03


def test_rng_keys():
    base = normals_cpu(64, seed=5, step=10)
    assert torch.equal(base, normals_cpu(64, seed=5, step=10))
    assert not torch.equal(base, normals_cpu(64, seed=5, step=11))
    assert not torch.equal(base, normals_cpu(64, seed=5 + (1 << 32), step=10))  # the seed's high word counts
    # the op takes the seed's 64-bit pattern as int64
    want = rng_normals((1 << 64) - 1, 0, 10, 64)[None]
    np.testing.assert_allclose(normals_cpu(64, seed=-1, step=10).double().numpy(), want, rtol=2e-6, atol=1e-6)


def test_rng_batch_independence():
    """Sample b drawn with sample_offset o equals sample b + o drawn with offset 0, in every dtype."""
    for dtype in DTYPES:
        args = make_case(dtype, 5, 777, uncond="separate", clip_mode=1, noise_mode=2, var_mode=1,
                         sample_offset=0)  # fmt: skip
        full, full_x0 = C.sampler_step_cpu(*args)
        sub = list(args)
        sub[0] = args[0][2:].contiguous()
        sub[1] = args[1][2:].contiguous()
        sub[3] = args[3] + 2  # uncond rows follow their samples
        sub[14] = 2
        part, part_x0 = C.sampler_step_cpu(*sub)
        assert torch.equal(part, full[2:]) and torch.equal(part_x0, full_x0[2:])


# =====================================================================================================
# errors
# =====================================================================================================


def _bad(**changes):
    args = make_case(torch.float32, 3, 10, uncond="separate", rescale=True, prev=True, noise_mode=1)
    names = ["x", "cond", "uncond", "uoff", "coeffs", "prev", "noise", "row_scale", "thresh", "g", "clip",
             "var_mode", "noise_mode", "seed", "sample_offset", "want_x0", "x0_only"]  # fmt: skip
    for k, v in changes.items():
        args[names.index(k)] = v(args) if callable(v) else v
    return args


BAD_INPUTS = {
    "x float64": (dict(x=lambda a: a[0].double()), "x must be float32, float16 or bfloat16"),
    "x 1-D": (dict(x=lambda a: a[0].flatten()), "x must be 2-D"),
    # x of more than two dims: operands like x must have its exact shape, cond / uncond enough elements
    "x 3-D, prev 2-D": (
        dict(x=lambda a: a[0].view(3, 2, 5), noise=lambda a: a[6].view(3, 2, 5)),
        r"prev_x0 has shape \[3, 10\], expected \[3, 2, 5\]",
    ),
    "x 3-D, noise other 3-D": (
        dict(
            x=lambda a: a[0].view(3, 2, 5),
            prev=lambda a: a[5].view(3, 2, 5),
            noise=lambda a: a[6].view(3, 5, 2),
        ),
        r"noise has shape \[3, 5, 2\]",
    ),
    "x 3-D non-contiguous": (dict(x=lambda a: torch.randn(3, 5, 2).transpose(1, 2)), "x must be contiguous"),
    "x non-contiguous": (dict(x=lambda a: torch.randn(10, 3).t()), "x must be contiguous"),
    "cond dtype": (dict(cond=lambda a: a[1].half()), "cond has dtype Half, expected Float"),
    "cond too few rows": (dict(cond=lambda a: a[1][:2].contiguous()), "cond has shape"),
    "cond too short for learned var": (dict(var_mode=1), r"cond has shape .*needs at least \(3, 20\)"),
    "uncond offset": (dict(uoff=4), r"uncond has shape .*needs at least \(7, 10\)"),
    "uncond negative offset": (dict(uoff=-1), "uncond_row_offset must be >= 0"),
    "uncond non-contiguous": (dict(uncond=lambda a: a[2].t().contiguous().t()), "uncond must be contiguous"),
    "coeffs size": (dict(coeffs=lambda a: a[4][:15].contiguous()), r"coeffs must have shape \(16,\)"),
    "coeffs dtype": (dict(coeffs=lambda a: a[4].double()), "coeffs must be float32"),
    "prev mismatched B": (dict(prev=lambda a: torch.randn(4, 10)), "prev_x0 has shape"),
    "prev too long": (dict(prev=lambda a: torch.randn(3, 11)), "prev_x0 has shape"),
    "noise mismatched B": (dict(noise=lambda a: torch.randn(2, 10)), "noise has shape"),
    "noise missing": (dict(noise=None), "noise_mode 1 needs a noise tensor"),
    "noise dtype": (dict(noise=lambda a: a[6].bfloat16()), "noise has dtype"),
    "row_scale mismatched B": (dict(row_scale=lambda a: torch.rand(4)), r"row_scale must have shape \(3,\)"),
    "row_scale dtype": (dict(row_scale=lambda a: a[7].double()), "row_scale must be float32"),
    "thresh not positive": (dict(thresh=torch.tensor([1.0, 0.0, 2.0])), "thresh must be > 0"),
    "clip and thresh": (dict(thresh=torch.ones(3), clip=1.0), "clip .* and thresh are exclusive"),
    "var_mode": (dict(var_mode=2), "var_mode must be 0 or 1"),
    "noise_mode": (dict(noise_mode=3), "noise_mode must be"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_cpu_bad_input(case):
    changes, msg = BAD_INPUTS[case]
    with pytest.raises(RuntimeError, match=msg):
        C.sampler_step_cpu(*_bad(**changes))


@pytest.mark.parametrize("x0_only", [False, True])
@pytest.mark.parametrize("var_mode", [0, 1])
def test_cpu_entry_takes_nd_tensors_as_their_rows(var_mode, x0_only):
    """x (B, ...) and every operand as the caller's tensors (the fast lanes' call) gives exactly the (B, N)
    result, shaped like x; cond / uncond are read as the (rows, elements) matrices of theirs."""
    B, shape = 3, (3, 2, 4, 5)
    args = make_case(torch.float32, B, 40, uncond="doubled", prev=True, noise_mode=1, var_mode=var_mode,
                     clip_mode=1, pad=False, x0_only=x0_only)  # fmt: skip
    known, keep, grad = torch.randn(B, 40), (torch.rand(B, 40) > 0.5).float(), torch.randn(B, 40)
    flat_out, flat_x0 = C.sampler_step_cpu(*args, known, keep, grad, 0.5)
    nd = list(args)
    nd[0], nd[5], nd[6] = (t.view(shape) for t in (args[0], args[5], args[6]))
    nd[1] = nd[2] = args[1].view(2 * B, -1, 4, 5)  # cond and uncond: [cond; uncond] rows, 2 or 4 channels
    out, x0 = C.sampler_step_cpu(*nd, known.view(shape), keep.view(shape), grad.view(shape), 0.5)
    if x0_only:
        assert out.numel() == 0 and x0.shape == shape and x0.dtype == torch.float32
        assert torch.equal(x0.view(B, -1), flat_x0)
    else:
        assert out.shape == x0.shape == shape
        assert torch.equal(out.view(B, -1), flat_out) and torch.equal(x0.view(B, -1), flat_x0)
    nd[15] = False  # no pred_x0 wanted: an empty second output
    if not x0_only:
        assert C.sampler_step_cpu(*nd)[1].numel() == 0


def test_cpu_entry_rejects_cuda_only_and_meta():
    args = _bad(x=lambda a: a[0].to("meta"))
    with pytest.raises(RuntimeError, match="sampler_step_cpu: x must be on the CPU"):
        C.sampler_step_cpu(*args)
    assert C.has_cuda() == hasattr(C, "sampler_step_cuda")


# =====================================================================================================
# CUDA kernel vs the CPU kernel (GPU only)
# =====================================================================================================

needs_cuda_ext = pytest.mark.skipif(
    not hasattr(C, "sampler_step_cuda"), reason="fastgen._C built without CUDA"
)
# fp32: fused multiply-adds and the device's logf / sinf / cosf; fp16/bf16: one rounding step apart
CUDA_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 2.0**-10), torch.bfloat16: (1e-2, 2.0**-7)}


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values in a contiguous tensor whose data pointer is not 16-byte aligned."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 1001, 3 * 64 * 64])
@pytest.mark.parametrize("layout", ["aligned", "misaligned"])
@pytest.mark.parametrize("feat", FEATURES[::7], ids=[_feature_id(f) for f in FEATURES[::7]])
def test_cuda_matches_cpu(dtype, n, layout, feat):
    """Same inputs, same outputs: 16-byte vector path (aligned, n % 8 == 0) and the scalar fallback."""
    uncond, rescale, clip_mode, prev, (noise_mode, var_mode), want_x0 = feat
    args = make_case(dtype, 3, n, uncond=uncond, rescale=rescale, clip_mode=clip_mode, prev=prev,
                     noise_mode=noise_mode, var_mode=var_mode, want_x0=want_x0, pad=layout == "misaligned")  # fmt: skip
    dev = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    if layout == "misaligned":
        dev[0] = _misaligned(dev[0])
    out, x0 = C.sampler_step_cuda(*dev)
    ref_out, ref_x0 = C.sampler_step_cpu(*args)
    atol, rtol = CUDA_TOL[dtype]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.cpu(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(x0.cpu(), ref_x0, atol=atol, rtol=rtol)
    # the |x0| pass
    dev[15] = args[15] = False
    dev[16] = args[16] = True
    _, abs_dev = C.sampler_step_cuda(*dev)
    _, abs_ref = C.sampler_step_cpu(*args)
    torch.testing.assert_close(abs_dev.cpu(), abs_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_rng_and_large_batch():
    k = noise_only_coeffs(step=77).cuda()
    x = torch.zeros(70000, 2, device="cuda")  # more samples than gridDim.y allows
    out, _ = C.sampler_step_cuda(
        x, x, None, 0, k, None, None, None, None, 1.0, 0.0, 0, 2, 99, 5, False, False
    )
    ref = normals_cpu(2, seed=99, step=77, sample_offset=5, B=70000)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=1e-5)
    z = normals_cpu(100_000, seed=3, step=4)
    xz = torch.zeros(1, 100_000, device="cuda")
    got, _ = C.sampler_step_cuda(xz, xz, None, 0, noise_only_coeffs(4).cuda(), None, None, None, None, 1.0, 0.0,
                                 0, 2, 3, 0, False, False)  # fmt: skip
    torch.testing.assert_close(got.cpu(), z, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_bad_device():
    args = make_case(torch.float32, 3, 10, device="cuda")
    args[4] = args[4].cpu()
    with pytest.raises(RuntimeError, match="coeffs is on cpu but x is on cuda"):
        C.sampler_step_cuda(*args)
    with pytest.raises(RuntimeError, match="sampler_step_cuda: x must be on a CUDA device"):
        C.sampler_step_cuda(*make_case(torch.float32, 3, 10))

"""Fused diffusion steps vs the plain-PyTorch reference formulas, on every backend usable here."""

import math

import numpy as np
import pytest
import torch

import fastgen
from fastgen import _ext
from fastgen.ops import diffusion_step as D

BACKENDS = ["torch", "triton"]
if _ext.C is not None:
    BACKENDS.append("cpp")
if torch.cuda.is_available():
    BACKENDS.append("cuda")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (dtype, atol, rtol) against the same-precision reference
TOLS = {torch.float32: (1e-5, 1e-5)}


def device_for(backend):
    return "cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.usefixtures("poison_empty")


def schedule(t=40, device="cpu"):
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    idx = torch.linspace(0, 999, t).round().long()  # a respaced schedule, as samplers use
    return abar[idx].to(device)


def assert_close_rel(out, ref, rtol=1e-5, atol=1e-6):
    """max |out - ref| <= atol * max(1, max|ref|) + rtol * |ref| elementwise."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all(), "non-finite values (unwritten or overflow)"
    scale = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol * scale)


# -- one entry per sampler configuration: (name, fused call, reference call), both taking common kwargs --
def _samplers():
    def ddpm(var):
        return (
            lambda x, mo, abar, t, **kw: D.ddpm_step(x, mo, abar, t, variance_type=var, **kw),
            lambda x, mo, abar, t, **kw: D.ddpm_step_ref(x, mo, abar, t, variance_type=var, **kw),
            var == "learned_range",
            True,
        )

    def ddim(eta):
        return (
            lambda x, mo, abar, t, **kw: D.ddim_step(x, mo, abar, t, t - 7, eta=eta, **kw),
            lambda x, mo, abar, t, **kw: D.ddim_step_ref(x, mo, abar, t, t - 7, eta=eta, **kw),
            False,
            eta > 0,
        )

    def euler(anc):
        f = D.euler_ancestral_step if anc else D.euler_step
        r = D.euler_ancestral_step_ref if anc else D.euler_step_ref
        return (
            lambda x, mo, abar, t, **kw: f(x, mo, abar, t, t - 5, **kw),
            lambda x, mo, abar, t, **kw: r(x, mo, abar, t, t - 5, **kw),
            False,
            anc,
        )

    def dpm(order):
        def fused(x, mo, abar, t, prev_x0=None, **kw):
            if order == 2:
                return D.dpm_solver_2m_step(x, mo, abar, t, t - 4, prev_x0=prev_x0, t_last=t + 4, **kw)
            return D.dpm_solver_2m_step(x, mo, abar, t, t - 4, **kw)

        def ref(x, mo, abar, t, prev_x0=None, **kw):
            if order == 2:
                return D.dpm_solver_2m_step_ref(x, mo, abar, t, t - 4, prev_x0=prev_x0, t_last=t + 4, **kw)
            return D.dpm_solver_2m_step_ref(x, mo, abar, t, t - 4, **kw)

        return fused, ref, False, False

    return {
        "ddpm_small": ddpm("fixed_small"),
        "ddpm_large": ddpm("fixed_large"),
        "ddpm_learned": ddpm("learned_range"),
        "ddim": ddim(0.0),
        "ddim_eta": ddim(0.8),
        "euler": euler(False),
        "euler_a": euler(True),
        "dpm1": dpm(1),
        "dpm2": dpm(2),
    }


SAMPLERS = _samplers()


def make_inputs(name, shape=(3, 3, 5, 7), guidance=None, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    b, c = shape[:2]
    learned = SAMPLERS[name][2]
    c_out = 2 * c if learned else c
    rows = 2 * b if guidance == "doubled" else b
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    mo = torch.randn((rows, c_out, *shape[2:]), generator=g, dtype=torch.float64)
    if learned:
        mo[:, c:] = mo[:, c:].tanh()  # v in [-1, 1]
    kw = {}
    if guidance is not None:
        kw["guidance_scale"] = 3.5
    if guidance == "two":
        kw["uncond_output"] = torch.randn((b, c_out, *shape[2:]), generator=g, dtype=torch.float64).to(
            device, dtype
        )
    if name == "dpm2":
        kw["prev_x0"] = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
    return x.to(device, dtype), mo.to(device, dtype), kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
def test_sampler_matches_reference_fp32(backend, name, pred):
    dev = device_for(backend)
    fused, ref, _, noisy = SAMPLERS[name]
    abar = schedule(device=dev)
    for t in (9, 30):
        x, mo, kw = make_inputs(name, device=dev, seed=t)
        if noisy:
            kw["seed"] = 1234
        with fastgen.use_backend(backend):
            out, x0 = fused(x, mo, abar, t, prediction_type=pred, **kw)
        r, r0 = ref(x, mo, abar.cpu(), t, prediction_type=pred, **{k: v for k, v in kw.items()})
        assert_close_rel(out, r.to(out.dtype))
        assert_close_rel(x0, r0.to(x0.dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("guidance", ["doubled", "two"])
@pytest.mark.parametrize("clip", [None, "static", "dynamic", "rescale"])
@pytest.mark.parametrize("name", ["ddpm_learned", "ddim_eta", "euler", "dpm2"])
def test_guidance_and_clipping(backend, guidance, clip, name):
    dev = device_for(backend)
    fused, ref, _, noisy = SAMPLERS[name]
    abar = schedule(device=dev)
    x, mo, kw = make_inputs(name, shape=(2, 4, 3, 11), guidance=guidance, device=dev, seed=3)
    x = x * 3  # so that clipping and thresholding are active
    if noisy:
        kw["seed"] = 77
    if clip == "static":
        kw["clip_sample"] = 1.0
    elif clip == "dynamic":
        kw["dynamic_threshold"] = (0.9, 2.5)
    elif clip == "rescale":
        kw["guidance_rescale"] = 0.7
    with fastgen.use_backend(backend):
        out, x0 = fused(x, mo, abar, 25, **kw)
    r, r0 = ref(x, mo, abar.cpu(), 25, **kw)
    assert_close_rel(out, r.to(out.dtype), rtol=2e-5, atol=2e-6)
    assert_close_rel(x0, r0.to(x0.dtype), rtol=2e-5, atol=2e-6)
    if clip == "dynamic":
        assert x0.abs().max() <= 1.0 + 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["ddpm_learned", "ddim_eta", "euler_a", "dpm2"])
def test_low_precision_within_2x_of_torch(backend, dtype, name):
    """The flash-attention rule: error vs fp64 at most 2x that of the same-dtype PyTorch reference."""
    if backend == "triton" and not torch.cuda.is_available() and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter's bf16 arithmetic is not faithful; bf16 Triton runs on GPU")
    dev = device_for(backend)
    fused, ref, _, noisy = SAMPLERS[name]
    abar = schedule(device=dev)
    x, mo, kw = make_inputs(name, shape=(2, 3, 6, 9), guidance="doubled", dtype=dtype, device=dev, seed=5)
    noise = torch.randn_like(x)
    if noisy:
        kw["noise"] = noise
    with fastgen.use_backend(backend):
        out, x0 = fused(x, mo, abar, 20, **kw)
    kw64 = {k: (v.cpu().double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    gold, gold0 = ref(
        x.cpu().double(), mo.cpu().double(), abar.cpu(), 20, compute_dtype=torch.float64, **kw64
    )
    kwl = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    low, low0 = ref(x.cpu(), mo.cpu(), abar.cpu(), 20, compute_dtype=dtype, **kwl)
    for o, g, lo in ((out, gold, low), (x0, gold0, low0)):
        err = (o.cpu().double() - g).abs().max().item()
        torch_err = (lo.double() - g).abs().max().item()
        assert err <= 2 * torch_err + 1e-3 * max(1.0, g.abs().max().item()), (err, torch_err)


@pytest.mark.parametrize("backend", BACKENDS)
def test_counter_rng_matches_reference_and_is_batch_independent(backend):
    dev = device_for(backend)
    with fastgen.use_backend(backend):
        z = D.counter_normal((4, 3, 7, 5), seed=2**40 + 17, step=12, device=dev)
        z_sub = D.counter_normal((2, 3, 7, 5), seed=2**40 + 17, step=12, sample_offset=2, device=dev)
    ref = D.counter_normal_ref((4, 3, 7, 5), seed=2**40 + 17, step=12)
    torch.testing.assert_close(z.cpu().double(), ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(z_sub.cpu(), z[2:].cpu(), atol=0, rtol=0)


def test_counter_rng_known_answers_and_statistics():
    # fmix32 known answers (MurmurHash3 finaliser)
    assert D._fmix32(0) == 0
    assert D._fmix32(1) == 0x514E28B7
    assert D._fmix32(0xFFFFFFFF) == 0x81F16F39
    z = D.counter_normal_ref((4, 50_000), seed=123, step=3)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    # neighbouring elements, samples and steps are uncorrelated
    flat = z.flatten()
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()) < 0.01
    assert abs(torch.corrcoef(z[:2])[0, 1].item()) < 0.02
    z2 = D.counter_normal_ref((4, 50_000), seed=123, step=4)
    assert abs(torch.corrcoef(torch.stack([z[0], z2[0]]))[0, 1].item()) < 0.02
    # tails: fraction beyond 3 sigma ~ 0.27%
    frac = (z.abs() > 3).double().mean().item()
    assert 0.0015 < frac < 0.004


def test_sampler_noise_is_independent_of_batch_size():
    abar = schedule()
    x, mo, _ = make_inputs("ddpm_small", shape=(4, 3, 8, 8), seed=9)
    full, _ = D.ddpm_step(x, mo, abar, 20, seed=5)
    part, _ = D.ddpm_step(x[1:3], mo[1:3], abar, 20, seed=5, sample_offset=1)
    torch.testing.assert_close(part, full[1:3], atol=0, rtol=0)


def test_dynamic_threshold_beyond_torch_quantile_limit():
    """torch.quantile refuses > 16M elements; the fused path selects with kthvalue instead."""
    n = (1 << 24) + 37
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, n, generator=g) * 4
    mo = torch.randn(1, n, generator=g)
    abar = schedule()
    out, x0 = D.ddim_step(x, mo, abar, 10, 5, prediction_type="sample", dynamic_threshold=0.9)
    s = max(1.0, float(np.quantile(mo.abs().double().numpy(), 0.9)))
    torch.testing.assert_close(x0, (mo.clamp(-s, s) / s), atol=1e-6, rtol=1e-5)
    assert torch.isfinite(out).all()


def test_tensor_timesteps_equal_int_timesteps():
    abar = schedule()
    x, mo, _ = make_inputs("ddim", seed=2)
    a, a0 = D.ddim_step(x, mo, abar, 17, 10)
    b, _b0 = D.ddim_step(x, mo, abar, torch.tensor(17), torch.tensor(10))
    c_, _ = D.dpm_solver_2m_step(
        x, mo, abar, torch.tensor(17), torch.tensor(-1), prev_x0=a0, t_last=torch.tensor(20)
    )
    d_, _ = D.dpm_solver_2m_step(x, mo, abar, 17, -1, prev_x0=a0, t_last=20)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(c_, d_, atol=1e-6, rtol=1e-6)
    # tensor-t coefficients for DDPM (the t == 0 branch) equal the int ones
    for t in (0, 1, 30):
        torch.testing.assert_close(
            D.ddpm_coeffs(abar, torch.tensor(t), "epsilon", "fixed_small"),
            D.ddpm_coeffs(abar, t, "epsilon", "fixed_small"),
        )


def test_bad_input_errors():
    abar = schedule()
    x, mo, _ = make_inputs("ddim")
    with pytest.raises(ValueError, match=r"model_output has shape \(3, 2, 5, 7\), expected \(3, 3, 5, 7\)"):
        D.ddim_step(x, mo[:, :2], abar, 10, 5)
    with pytest.raises(ValueError, match="doubled batch"):
        D.ddim_step(x, mo, abar, 10, 5, guidance_scale=2.0)
    with pytest.raises(ValueError, match=r"t=40 out of range \[0, 39\]"):
        D.ddim_step(x, mo, abar, 40, 5)
    with pytest.raises(ValueError, match="t_prev=-2 out of range"):
        D.ddim_step(x, mo, abar, 10, -2)
    with pytest.raises(ValueError, match="unknown prediction_type 'eps2'"):
        D.ddim_step(x, mo, abar, 10, 5, prediction_type="eps2")
    with pytest.raises(ValueError, match="alphas_cumprod is on meta but x_t is on cpu"):
        D.ddim_step(x, mo, abar.to("meta"), 10, 5)
    with pytest.raises(ValueError, match="model_output is on meta"):
        D.ddim_step(x, mo.to("meta"), abar, 10, 5)
    with pytest.raises(ValueError, match="noise has shape"):
        D.ddpm_step(x, mo, abar, 10, noise=torch.randn(3, 3, 5))
    with pytest.raises(ValueError, match="exclusive"):
        D.ddim_step(x, mo, abar, 10, 5, clip_sample=1.0, dynamic_threshold=0.99)
    with pytest.raises(ValueError, match="2x channels"):
        D.ddpm_step(x, mo, abar, 10, variance_type="learned_range")
    with pytest.raises(ValueError, match="unknown variance_type"):
        D.ddpm_step(x, mo, abar, 10, variance_type="large")
    with pytest.raises(ValueError, match="prev_x0 and t_last"):
        D.dpm_solver_2m_step(x, mo, abar, 10, 5, prev_x0=x)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        D.ddim_step(x, mo, abar, 10, 5, eta=-0.1)


def test_forced_backend_that_cannot_serve_lists_reasons(monkeypatch):
    abar = schedule()
    x, mo, _ = make_inputs("ddim")
    monkeypatch.setenv("FASTGEN_BACKEND", "cuda")
    if torch.cuda.is_available():
        pytest.skip("cuda can serve here")
    with pytest.raises(fastgen.BackendUnavailableError, match="backend 'cuda' was forced") as e:
        D.ddim_step(x, mo, abar, 10, 5)
    assert "no CUDA device" in str(e.value)
    monkeypatch.setenv("FASTGEN_BACKEND", "diffusion_step:torch")
    out, _ = D.ddim_step(x, mo, abar, 10, 5)
    assert torch.isfinite(out).all()
    monkeypatch.setenv("FASTGEN_BACKEND", "fortran")
    with pytest.raises(fastgen.BackendUnavailableError, match="unknown backend 'fortran'"):
        D.ddim_step(x, mo, abar, 10, 5)


def test_torch_backend_float64():
    abar = schedule()
    x, mo, _ = make_inputs("euler", dtype=torch.float64)
    out, _ = D.euler_step(x, mo, abar, 20, 15)
    ref, _ = D.euler_step_ref(x, mo, abar, 20, 15, compute_dtype=torch.float64)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_opcheck(backend):
    abar = schedule()
    x, mo, _ = make_inputs("ddpm_learned", guidance="doubled")
    coeffs = D.ddpm_coeffs(abar, 12, "epsilon", "learned_range").float()
    xf, mf = x.reshape(3, -1), mo.reshape(6, -1)
    with fastgen.use_backend(backend):
        torch.library.opcheck(
            D._sampler_step_op,
            (xf, mf, mf, 3, coeffs, None, None, None, None, 2.0, 0.0, 1, 2, 99, 0, True, False),
        )


def test_torch_compile_without_graph_breaks():
    abar = schedule()
    coeffs = D.ddim_coeffs(abar, 20, 10, 0.0, "epsilon")
    x, mo, _ = make_inputs("ddim", guidance="doubled")

    def step(x, mo):
        return D.sampler_step(x, mo, coeffs, guidance_scale=2.0, clip_sample=1.0)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out, x0 = compiled(x, mo)
    ref, ref0 = step(x, mo)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x0, ref0)


def test_step_respects_math_identities():
    """Sanity independent of the reference: DDIM(eta=0) with the true eps recovers x0 exactly."""
    abar = schedule()
    x0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x0)
    t = 30
    x_t = math.sqrt(abar[t]) * x0 + math.sqrt(1 - abar[t]) * eps
    out, pred = D.ddim_step(x_t, eps, abar, t, -1)
    torch.testing.assert_close(pred, x0, atol=1e-10, rtol=0)
    torch.testing.assert_close(out, x0, atol=1e-10, rtol=0)
    v = math.sqrt(abar[t]) * eps - math.sqrt(1 - abar[t]) * x0
    _, pred_v = D.ddim_step(x_t, v, abar, t, -1, prediction_type="v")
    torch.testing.assert_close(pred_v, x0, atol=1e-10, rtol=0)

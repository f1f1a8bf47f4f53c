"""Sampler loops: against a manual loop of reference steps, and end to end on a Gaussian data set whose
optimal denoiser is known in closed form (so the samplers must reproduce the data distribution)."""

import math

import pytest
import torch

import fastgen
from fastgen.diffusion import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverSampler,
    EulerAncestralSampler,
    EulerSampler,
    NoiseSchedule,
)
from fastgen.diffusion.samplers import INIT_NOISE_STEP
from fastgen.ops import diffusion_step as D

MU, STD = 0.3, 0.5


def gaussian_model(full: NoiseSchedule, prediction_type: str):
    """Exact denoiser for data ~ N(MU, STD^2) per element, in the requested parametrisation."""
    abar_full = full.alphas_cumprod

    def fn(x, t):
        a = abar_full[t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        x64 = x.double()
        a = a.double()
        x0 = MU + (a.sqrt() * STD**2 / (a * STD**2 + 1 - a)) * (x64 - a.sqrt() * MU)
        eps = (x64 - a.sqrt() * x0) / (1 - a).sqrt()
        if prediction_type == "epsilon":
            out = eps
        elif prediction_type == "sample":
            out = x0
        else:
            out = a.sqrt() * eps - (1 - a).sqrt() * x0
        return out.to(x.dtype)

    return fn


SAMPLER_CASES = {  # enough (uniformly respaced) steps for each sampler to be accurate
    "ddpm": (lambda s: DDPMSampler(s), 250),
    "ddpm_large": (lambda s: DDPMSampler(s, variance_type="fixed_large"), 250),
    "ddim": (lambda s: DDIMSampler(s), 200),
    "ddim_eta1": (lambda s: DDIMSampler(s, eta=1.0), 250),
    "euler": (lambda s: EulerSampler(s), 200),
    "euler_a": (lambda s: EulerAncestralSampler(s), 250),
    "dpm2m": (lambda s: DPMSolverSampler(s), 50),
}


@pytest.mark.parametrize("name", list(SAMPLER_CASES))
@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
def test_sampler_reproduces_gaussian_data(name, pred):
    make, steps = SAMPLER_CASES[name]
    full = NoiseSchedule.from_name("linear", 1000)
    sampler = make(full.respace(str(steps)))
    sampler.prediction_type = pred
    x = sampler.sample(gaussian_model(full, pred), (4, 1, 50, 100), seed=11, progress=False)
    assert torch.isfinite(x).all()
    assert abs(x.mean().item() - MU) < 0.025, x.mean().item()
    assert abs(x.std().item() - STD) < 0.025, x.std().item()


def manual_ddim_loop(sched, model_fn, shape, seed, eta, guidance=None):
    """Reference loop (deterministic DDIM): reference steps from the same initial noise."""
    abar = sched.alphas_cumprod
    tmap = sched.timestep_map
    x = D.counter_normal_ref(shape, seed, INIT_NOISE_STEP).float()
    for i in range(sched.num_timesteps - 1, -1, -1):
        t = tmap[i].expand(shape[0])
        kw = {}
        if guidance is not None:
            out = model_fn(torch.cat([x, x]), torch.cat([t, t]))
            kw["guidance_scale"] = guidance
        else:
            out = model_fn(x, t)
        x, _ = D.ddim_step_ref(x, out, abar, i, i - 1, eta=eta, **kw)
    return x


def test_ddim_sampler_equals_manual_reference_loop():
    full = NoiseSchedule.from_name("cosine", 1000)
    sched = full.respace("ddim20")

    def model_fn(x, t):
        # a deterministic, non-trivial "model"; doubled batch -> different halves
        tt = (t.float() / 1000).reshape(-1, 1, 1, 1)
        out = torch.tanh(x) * (1 - tt) + 0.1 * tt
        half = out.shape[0] // 2
        if out.shape[0] == 2 * 3:
            out = torch.cat([out[:half], 0.5 * out[half:]])
        return out

    got = DDIMSampler(sched, guidance_scale=3.0).sample(model_fn, (3, 2, 6, 5), seed=4, progress=False)
    ref = manual_ddim_loop(sched, model_fn, (3, 2, 6, 5), seed=4, eta=0.0, guidance=3.0)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_noisy_sampler_keys_noise_by_timestep_and_sample():
    """Batch of 4 vs the last two samples alone with sample_offset=2: identical results."""
    full = NoiseSchedule.from_name("linear", 1000)
    sampler = DDPMSampler(full.respace("20"), variance_type="fixed_large")
    fn = gaussian_model(full, "epsilon")
    a = sampler.sample(fn, (4, 3, 5, 5), seed=99, progress=False)
    b = sampler.sample(fn, (2, 3, 5, 5), seed=99, sample_offset=2, progress=False)
    torch.testing.assert_close(b, a[2:], atol=1e-6, rtol=1e-6)
    c = sampler.sample(fn, (4, 3, 5, 5), seed=100, progress=False)
    assert (c - a).abs().max() > 0.1


@pytest.mark.parametrize("backend", ["torch", "triton"] + (["cpp"] if fastgen._ext.C is not None else []))
def test_sampler_same_result_on_every_backend(backend):
    full = NoiseSchedule.from_name("linear", 1000)
    sampler = EulerAncestralSampler(full.respace("8"), clip_sample=1.0)
    fn = gaussian_model(full, "epsilon")
    with fastgen.use_backend("torch"):
        ref = sampler.sample(fn, (2, 3, 4, 5), seed=3, progress=False)
    with fastgen.use_backend(backend):
        got = sampler.sample(fn, (2, 3, 4, 5), seed=3, progress=False)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_dpm_solver_converges_at_second_order():
    """Against the exact probability-flow map of Gaussian data, doubling the steps cuts DDIM's error
    ~2x (first order) and DPM-Solver++(2M)'s ~4x (second order)."""
    full = NoiseSchedule.from_name("linear", 1000)
    fn = gaussian_model(full, "epsilon")
    shape = (2, 1, 16, 16)
    z = D.counter_normal_ref(shape, 1, INIT_NOISE_STEP)
    errs = {}
    for steps in (40, 80):
        sched = full.respace(str(steps))
        a_T = float(sched.alphas_cumprod[-1])
        exact = MU + STD / math.sqrt(a_T * STD**2 + 1 - a_T) * (z - math.sqrt(a_T) * MU)
        for cls in (DDIMSampler, DPMSolverSampler):
            x = cls(sched).sample(fn, shape, seed=1, progress=False, dtype=torch.float64)
            errs[cls.name, steps] = (x - exact).abs().mean().item()
    ddim_ratio = errs["ddim", 40] / errs["ddim", 80]
    dpm_ratio = errs["dpm_solver++_2m", 40] / errs["dpm_solver++_2m", 80]
    assert 1.7 < ddim_ratio < 2.5, errs
    assert dpm_ratio > 3.2, errs
    assert errs["dpm_solver++_2m", 80] < 0.7 * errs["ddim", 80], errs


def test_sampler_bad_input():
    full = NoiseSchedule.from_name("linear", 100)
    with pytest.raises(TypeError, match="NoiseSchedule"):
        DDIMSampler(full.alphas_cumprod)
    with pytest.raises(ValueError, match="unknown variance_type"):
        DDPMSampler(full, variance_type="big")
    with pytest.raises(ValueError, match="x_T has shape"):
        DDIMSampler(full).sample(lambda x, t: x, (2, 3), x_T=torch.zeros(3, 3), progress=False)
    with pytest.raises(ValueError, match=r"step index i=100 out of range"):
        DDIMSampler(full).step(100, torch.zeros(1, 2), torch.zeros(1, 2))
    for i in (5.5, True, "5"):
        with pytest.raises(TypeError, match="step index i must be an int"):
            DDIMSampler(full).step(i, torch.zeros(1, 2), torch.zeros(1, 2))
    for eta in (float("inf"), float("nan"), -1.0):
        with pytest.raises(ValueError, match="eta"):
            DDIMSampler(full, eta=eta)
    # guidance / clipping options are checked at construction, not at the first step
    for kw, err in (({"guidance_scale": float("nan")}, ValueError), ({"guidance_scale": "3"}, TypeError),
                    ({"guidance_scale": 3.0, "guidance_rescale": float("nan")}, ValueError),
                    ({"clip_sample": float("nan")}, ValueError), ({"clip_sample": True}, TypeError)):  # fmt: skip
        with pytest.raises(err, match=list(kw)[-1]):
            DDIMSampler(full, **kw)
    zero_snr = NoiseSchedule.from_name("cosine", 20, max_beta=1.0)
    with pytest.raises(ValueError, match="zero SNR"):
        EulerSampler(zero_snr)
    assert math.isfinite(DDIMSampler(full).init_noise_sigma())

"""fastgen.diffusers Euler / Euler ancestral == diffusers' over whole sampling loops."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers_loop import rel_err, sample_loop  # noqa: E402

import fastgen.diffusers as fd  # noqa: E402

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
TRAINED = torch.linspace(1e-4, 0.03, 1000).tolist()

EULER_CASES = [
    {},
    {**SD, "steps_offset": 1, "timestep_spacing": "leading"},
    {**SD, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min"},
    {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "rescale_betas_zero_snr": True},
    {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample", "interpolation_type": "log_linear"},
    {"trained_betas": TRAINED, "prediction_type": "v_prediction", "timestep_type": "continuous"},
    {"use_exponential_sigmas": True, "timestep_spacing": "trailing"},
]  # fmt: skip

ANCESTRAL_CASES = [
    {},
    {**SD, "steps_offset": 1, "timestep_spacing": "leading"},
    {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "rescale_betas_zero_snr": True},
    {"beta_schedule": "squaredcos_cap_v2", "trained_betas": TRAINED},
]


def _pair(name, config):
    ref = getattr(diffusers, name)(**config)
    return ref, getattr(fd, name).from_config(ref.config)


@pytest.mark.parametrize("name,config", [("EulerDiscreteScheduler", c) for c in EULER_CASES]
                         + [("EulerAncestralDiscreteScheduler", c) for c in ANCESTRAL_CASES])  # fmt: skip
def test_euler_loop_matches_diffusers(name, config):
    ref, ours = _pair(name, config)
    a, a0 = sample_loop(ref, 10, return_x0=True)
    b, b0 = sample_loop(ours, 10, return_x0=True)
    assert torch.equal(ref.timesteps, ours.timesteps)
    assert ours.init_noise_sigma == ref.init_noise_sigma
    assert rel_err(b, a) <= 1e-5
    assert max(rel_err(y, x) for x, y in zip(a0, b0, strict=True)) <= 1e-5


def test_euler_refuses_what_it_cannot_serve():
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        fd.EulerAncestralDiscreteScheduler(prediction_type="sample")
    s = fd.EulerDiscreteScheduler()
    s.set_timesteps(4)
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="s_churn"):
        s.step(x, s.timesteps[0], x, s_churn=1.0)
    with pytest.raises(ValueError, match="integer indices"):
        s.step(x, 0, x)

"""fastgen.diffusers.DDIMScheduler / DDPMScheduler == diffusers' over whole sampling loops."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers_loop import fake_model, rel_err, sample_loop  # noqa: E402

import fastgen.diffusers as fd  # noqa: E402

TRAINED = torch.linspace(1e-4, 0.03, 1000).tolist()

# each config key of the issue that applies is covered by at least one row
DDIM_CASES = [
    ({}, {}),
    ({"clip_sample": False, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
      "steps_offset": 1}, {}),
    ({"clip_sample": False, "prediction_type": "v_prediction", "timestep_spacing": "trailing",
      "rescale_betas_zero_snr": True}, {}),
    ({"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample", "timestep_spacing": "linspace",
      "set_alpha_to_one": False}, {}),
    ({"trained_betas": TRAINED, "thresholding": True, "prediction_type": "v_prediction"}, {}),
    ({"clip_sample": True, "clip_sample_range": 0.8}, {"eta": 1.0}),
    ({"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5, "prediction_type": "sample"},
     {"eta": 0.5, "use_clipped_model_output": True}),
    ({"clip_sample": False, "timestep_spacing": "trailing"}, {"eta": 0.3}),
]  # fmt: skip

DDPM_CASES = [
    {},
    {"clip_sample": False, "beta_schedule": "scaled_linear", "variance_type": "fixed_large", "steps_offset": 1},
    {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "rescale_betas_zero_snr": True,
     "clip_sample": False},
    {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample", "timestep_spacing": "linspace",
     "thresholding": True},
    {"trained_betas": TRAINED, "variance_type": "learned_range", "clip_sample_range": 0.9},
    {"variance_type": "fixed_small_log", "clip_sample": False, "timestep_spacing": "trailing"},
]  # fmt: skip


def _pair(name, config):
    ref = getattr(diffusers, name)(**config)
    return ref, getattr(fd, name).from_config(ref.config)


@pytest.mark.parametrize("config,step_kwargs", DDIM_CASES)
def test_ddim_loop_matches_diffusers(config, step_kwargs):
    ref, ours = _pair("DDIMScheduler", config)
    scale = 1.5 if config.get("prediction_type") == "sample" else 1.0
    a, a0 = sample_loop(ref, 10, step_kwargs=step_kwargs, scale=scale, return_x0=True)
    b, b0 = sample_loop(ours, 10, step_kwargs=step_kwargs, scale=scale, return_x0=True)
    assert torch.equal(ref.timesteps, ours.timesteps)
    assert rel_err(b, a) <= 1e-5
    assert max(rel_err(y, x) for x, y in zip(a0, b0, strict=True)) <= 1e-5


@pytest.mark.parametrize("config", DDPM_CASES)
def test_ddpm_loop_matches_diffusers(config):
    ref, ours = _pair("DDPMScheduler", config)
    c_out = 6 if config.get("variance_type") == "learned_range" else None
    scale = 1.5 if config.get("prediction_type") == "sample" else 1.0
    a, a0 = sample_loop(ref, 10, channels_out=c_out, scale=scale, return_x0=True)
    b, b0 = sample_loop(ours, 10, channels_out=c_out, scale=scale, return_x0=True)
    assert torch.equal(ref.timesteps, ours.timesteps)
    assert rel_err(b, a) <= 1e-5
    assert max(rel_err(y, x) for x, y in zip(a0, b0, strict=True)) <= 1e-5


def test_ddpm_full_chain_without_set_timesteps_prev():
    """No set_timesteps call with custom timesteps: DDPM steps t -> t - 1 (diffusers' previous_timestep)."""
    ref, ours = _pair("DDPMScheduler", {"num_train_timesteps": 12})
    out = []
    for s in (ref, ours):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 3, 4, 4, generator=g)
        for t in range(11, -1, -1):
            x = s.step(fake_model(x, t), t, x, generator=g).prev_sample
        out.append(x)
    assert rel_err(out[1], out[0]) <= 1e-5

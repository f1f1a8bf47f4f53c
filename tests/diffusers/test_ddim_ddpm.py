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


@pytest.mark.parametrize(
    "name,config,match",
    [
        ("DDPMScheduler", {"variance_type": "learned"}, "variance_type='learned' is not supported"),
        ("DDPMScheduler", {"variance_type": "fixed_large_log"}, "variance_type='fixed_large_log'"),
        ("DDIMScheduler", {"thresholding": True, "dynamic_thresholding_ratio": 0.0}, "dynamic_thresholding_ratio=0.0"),
        ("DDIMScheduler", {"clip_sample_range": -1.0}, "clip_sample_range=-1.0"),
    ],
)  # fmt: skip
def test_unsupported_options_raise_at_construction(name, config, match):
    ref = getattr(diffusers, name)(**config)
    with pytest.raises(ValueError, match=f"fastgen.diffusers.{name}: {match}"):
        getattr(fd, name).from_config(ref.config)
    with pytest.raises(ValueError, match=match):
        getattr(fd, name)(**config)


def test_step_argument_errors():
    s = fd.DDIMScheduler()
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, 10, x)
    s.set_timesteps(4)
    with pytest.raises(ValueError, match=r"eta must be a finite real >= 0, got -0\.5"):
        s.step(x, s.timesteps[0], x, eta=-0.5)
    with pytest.raises(ValueError, match=r"guidance_rescale=0\.5 needs guidance_scale"):
        s.step(x, s.timesteps[0], x, guidance_rescale=0.5)
    d = fd.DDPMScheduler(variance_type="learned_range")
    d.set_timesteps(4)
    with pytest.raises(ValueError, match=r"2 x 3 channels"):
        d.step(x, d.timesteps[0], x)
    with pytest.raises(ValueError, match="not one of the scheduler's timesteps"):
        d.step(torch.randn(1, 6, 4, 4), 5, x)


def test_config_round_trips_through_diffusers(tmp_path):
    ours = fd.DDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False)
    ours.save_pretrained(tmp_path)
    back = diffusers.DDIMScheduler.from_pretrained(tmp_path)
    assert back.config.prediction_type == "v_prediction" and back.config.timestep_spacing == "trailing"
    again = fd.DDIMScheduler.from_pretrained(tmp_path)
    assert isinstance(again, fd.DDIMScheduler)
    assert {k: v for k, v in again.config.items() if not k.startswith("_")} == {
        k: v for k, v in ours.config.items() if not k.startswith("_")
    }


def test_empty_batch_gives_empty_result():
    for name in ("DDIMScheduler", "DDPMScheduler"):
        s = getattr(fd, name)()
        s.set_timesteps(4)
        x = torch.randn(0, 3, 4, 4)
        out = s.step(x, s.timesteps[0], x, generator=torch.Generator().manual_seed(0))
        assert out.prev_sample.shape == x.shape and out.pred_original_sample.shape == x.shape

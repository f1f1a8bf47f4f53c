"""fastgen.diffusers.DPMSolverMultistepScheduler == diffusers' over whole sampling loops."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers_loop import rel_err, sample_loop  # noqa: E402

import fastgen.diffusers as fd  # noqa: E402

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
TRAINED = torch.linspace(1e-4, 0.03, 1000).tolist()

DPM_CASES = [
    ({}, 10),
    ({**SD, "use_karras_sigmas": True, "steps_offset": 1, "timestep_spacing": "leading"}, 10),
    ({"lower_order_final": False, "final_sigmas_type": "sigma_min", "solver_type": "heun"}, 8),
    ({"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "prediction_type": "v_prediction",
      "timestep_spacing": "trailing"}, 10),
    ({"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "solver_type": "heun",
      "thresholding": True, "prediction_type": "sample", "lower_order_final": False}, 8),
    ({"thresholding": True, "prediction_type": "sample", "beta_schedule": "squaredcos_cap_v2"}, 10),
    ({"trained_betas": TRAINED, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
      "timestep_spacing": "trailing"}, 10),
    ({"euler_at_final": True, "lower_order_final": False, "final_sigmas_type": "sigma_min"}, 16),
    ({"solver_order": 1, "use_karras_sigmas": True}, 6),
    ({"variance_type": "learned_range"}, 6),
]  # fmt: skip


@pytest.mark.parametrize("config,steps", DPM_CASES)
def test_dpm_solver_loop_matches_diffusers(config, steps):
    ref = diffusers.DPMSolverMultistepScheduler(**config)
    ours = fd.DPMSolverMultistepScheduler.from_config(ref.config)
    c_out = 6 if config.get("variance_type") else None
    scale = 1.5 if config.get("prediction_type") == "sample" else 1.0
    a = sample_loop(ref, steps, channels_out=c_out, scale=scale)
    b = sample_loop(ours, steps, channels_out=c_out, scale=scale)
    assert torch.equal(ref.timesteps, ours.timesteps)
    assert rel_err(b, a) <= 1e-5
    # the multistep history is diffusers' (x0 for dpmsolver++, eps for dpmsolver)
    for x, y in zip(ref.model_outputs, ours.model_outputs, strict=True):
        assert rel_err(y, x) <= 1e-5
    assert ours.lower_order_nums == ref.lower_order_nums and ours.step_index == ref.step_index


@pytest.mark.parametrize(
    "config,option",
    [
        ({"solver_order": 3}, "solver_order=3"),
        ({"algorithm_type": "sde-dpmsolver++"}, "algorithm_type='sde-dpmsolver\\+\\+'"),
        (
            {"use_flow_sigmas": True, "prediction_type": "flow_prediction"},
            "prediction_type='flow_prediction'",
        ),
        ({"thresholding": True, "sample_max_value": 0.5}, "sample_max_value=0.5"),
    ],
)
def test_dpm_solver_refuses_what_it_cannot_serve(config, option):
    ref = diffusers.DPMSolverMultistepScheduler(**config)
    with pytest.raises(ValueError, match=f"DPMSolverMultistepScheduler: {option}"):
        fd.DPMSolverMultistepScheduler.from_config(ref.config)

"""Noise schedules and samplers over the fused sampling steps (``fastgen.ops.diffusion_step``)."""

from fastgen.diffusion.samplers import (
    SAMPLERS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverSampler,
    EulerAncestralSampler,
    EulerSampler,
    Sampler,
)
from fastgen.diffusion.schedules import NoiseSchedule, betas_for_schedule, space_timesteps, spaced_timesteps

__all__ = [
    "SAMPLERS",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverSampler",
    "EulerAncestralSampler",
    "EulerSampler",
    "NoiseSchedule",
    "Sampler",
    "betas_for_schedule",
    "space_timesteps",
    "spaced_timesteps",
]

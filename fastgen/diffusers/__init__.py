"""Drop-in diffusers schedulers whose ``step`` is one fused fastgen pass.

    pipe.scheduler = fastgen.diffusers.DDIMScheduler.from_config(pipe.scheduler.config)

Each class subclasses diffusers' scheduler of the same name (config, ``set_timesteps``, ``timesteps``,
``init_noise_sigma``, ``order``, ``scale_model_input``, ``add_noise`` are diffusers' own) and replaces
``step`` by one ``fastgen.sampler_step`` call (cpp / CUDA / Triton), giving the same samples as diffusers.
``step(..., guidance_scale=g)`` takes a pipeline's doubled batch ``[uncond; text]`` and does classifier-free
guidance inside the same pass. An option the fused step cannot serve raises a ValueError naming it when the
scheduler is built. Needs ``pip install diffusers``.
"""

from fastgen.diffusers.ddim import DDIMScheduler
from fastgen.diffusers.ddpm import DDPMScheduler
from fastgen.diffusers.dpm_solver import DPMSolverMultistepScheduler
from fastgen.diffusers.euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

__all__ = [
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
]

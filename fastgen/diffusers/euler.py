"""``EulerDiscreteScheduler`` / ``EulerAncestralDiscreteScheduler`` (Karras et al. 2022, k-diffusion) as
diffusers has them, with each ``step`` one fused fastgen pass."""

from __future__ import annotations

from typing import Any

import diffusers
import torch
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
from diffusers.utils import logging

from fastgen.diffusers import _fused as F
from fastgen.ops import diffusion_step as D

logger = logging.get_logger(__name__)
_PREDICTIONS = ("epsilon", "v_prediction", "sample", "original_sample")


def _check_euler(config: Any) -> None:
    if config.prediction_type not in _PREDICTIONS:
        raise F.unsupported(
            "EulerDiscreteScheduler",
            "prediction_type",
            config.prediction_type,
            f"expected one of {_PREDICTIONS}",
        )


def _check_ancestral(config: Any) -> None:
    if config.prediction_type not in ("epsilon", "v_prediction"):
        raise F.unsupported(
            "EulerAncestralDiscreteScheduler",
            "prediction_type",
            config.prediction_type,
            "diffusers' ancestral Euler implements epsilon and v_prediction only",
        )


def _x0(pred: str, sigma: torch.Tensor) -> dict[int, float]:
    """x0 from (x, m) in sigma space, as diffusers' Euler schedulers (float32 scalars)."""
    if pred == "epsilon":
        return {D.AX: 1.0, D.AM: -float(sigma)}
    if pred in ("sample", "original_sample"):
        return {D.AX: 0.0, D.AM: 1.0}
    return {D.AX: 1.0 / float(sigma**2 + 1), D.AM: float(-sigma / (sigma**2 + 1) ** 0.5)}


def _update(c: dict[int, float], sigma: torch.Tensor, dt: torch.Tensor) -> dict[int, float]:
    """x' = x + (x - x0) / sigma * dt = (1 + dt / sigma) x - dt / sigma x0."""
    r = float(dt) / float(sigma)
    c[D.CX] = 1.0 + r
    c[D.CX0] = -r
    return c


class _EulerBase:
    def set_timesteps(self, *args: Any, **kwargs: Any) -> None:
        super().set_timesteps(*args, **kwargs)
        F.remember_timesteps(self)

    def _fg_index(self, timestep: Any) -> int:
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError(
                "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to"
                f" `{type(self).__name__}.step()` is not supported. Make sure to pass"
                " one of the `scheduler.timesteps` as a timestep."
            )
        if not self.is_scale_input_called:
            logger.warning(
                "The `scale_model_input` function should be called before `step` to ensure correct denoising. "
                "See `StableDiffusionPipeline` for a usage example."
            )
        if self.step_index is None:
            self._init_step_index(timestep)
        return self.step_index


class EulerDiscreteScheduler(_EulerBase, diffusers.EulerDiscreteScheduler):
    """Drop-in for ``diffusers.EulerDiscreteScheduler`` (sigmas incl. Karras / exponential / beta,
    ``timestep_spacing``, ``final_sigmas_type``, ``scale_model_input``: diffusers' own). Per element::

        x0 = x - sigma m (epsilon) | m (sample) | x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) m (v)
        x' = x + (x - x0) / sigma (sigma_next - sigma)

    ``step(..., guidance_scale=g)`` takes the doubled batch ``[uncond; text]`` (guidance in the same pass).
    """

    __init__ = F.fastgen_init(diffusers.EulerDiscreteScheduler.__init__, _check_euler)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        *,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
    ) -> EulerDiscreteSchedulerOutput | tuple:
        """diffusers' ``EulerDiscreteScheduler.step`` in one fused pass (``s_churn = 0``: the churn's noise
        would enter x0 before the model output, which one pass cannot express)."""
        if s_churn != 0.0:
            raise ValueError(
                f"fastgen.diffusers.EulerDiscreteScheduler.step: s_churn={s_churn!r} is not supported: the "
                "churn noise is added to the sample before x0 is formed, which the fused step cannot express"
            )
        i = self._fg_index(timestep)

        def build():
            sigma = self.sigmas[i]
            return _update(_x0(self.config.prediction_type, sigma), sigma, self.sigmas[i + 1] - sigma)

        cond, uncond = F.split_guidance(model_output, sample, guidance_scale, guidance_rescale)
        coeffs = F.cached_coeffs(self, ("euler", i), sample.device, build)
        prev_sample, x0 = F.fused(
            sample,
            cond,
            coeffs,
            uncond=uncond,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
        )
        prev_sample = prev_sample.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample, x0)
        return EulerDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


class EulerAncestralDiscreteScheduler(_EulerBase, diffusers.EulerAncestralDiscreteScheduler):
    """Drop-in for ``diffusers.EulerAncestralDiscreteScheduler``. Per element, with
    sigma_up = sqrt(s'^2 (s^2 - s'^2) / s^2), sigma_down = sqrt(s'^2 - sigma_up^2)::

        x' = x + (x - x0) / s (sigma_down - s) + sigma_up z,   z drawn as diffusers draws it

    ``step(..., guidance_scale=g)`` takes the doubled batch ``[uncond; text]`` (guidance in the same pass).
    """

    __init__ = F.fastgen_init(diffusers.EulerAncestralDiscreteScheduler.__init__, _check_ancestral)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        *,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
    ) -> EulerAncestralDiscreteSchedulerOutput | tuple:
        """diffusers' ``EulerAncestralDiscreteScheduler.step`` in one fused pass."""
        i = self._fg_index(timestep)

        def build():
            s, s_to = self.sigmas[i], self.sigmas[i + 1]
            sigma_up = (s_to**2 * (s**2 - s_to**2) / s**2) ** 0.5
            sigma_down = (s_to**2 - sigma_up**2) ** 0.5
            c = _update(_x0(self.config.prediction_type, s), s, sigma_down - s)
            c[D.SIGMA] = float(sigma_up)
            c[D.NOISE_MASK] = 1.0
            return c

        cond, uncond = F.split_guidance(model_output, sample, guidance_scale, guidance_rescale)
        coeffs = F.cached_coeffs(self, ("euler_a", i), sample.device, build)
        noise = F.draw_noise(cond, generator)
        prev_sample, x0 = F.fused(
            sample, cond, coeffs, uncond=uncond, guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale, noise=noise,
        )  # fmt: skip
        prev_sample = prev_sample.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample, x0)
        return EulerAncestralDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

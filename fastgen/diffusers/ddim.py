"""``DDIMScheduler``: diffusers' DDIM (Song et al. 2021) with each ``step`` one fused fastgen pass."""

from __future__ import annotations

import math
import numbers
from typing import Any

import diffusers
import torch
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

from fastgen.diffusers import _fused as F
from fastgen.ops import diffusion_step as D


def _check(config: Any) -> None:
    F.check_threshold_config("DDIMScheduler", config)


class DDIMScheduler(diffusers.DDIMScheduler):
    """Drop-in for ``diffusers.DDIMScheduler`` (same config, timesteps, outputs; identical samples).

    ``pipe.scheduler = fastgen.diffusers.DDIMScheduler.from_config(pipe.scheduler.config)``.

    Per element, with a = alphas_cumprod[t], a' = alphas_cumprod[t - T // steps] (or
    ``final_alpha_cumprod``) and s = eta sqrt((1 - a') / (1 - a) (1 - a / a'))::

        x0 = x0(x, m)  (clipped / thresholded),  eps = eps(x, m)  (from the clipped x0 only with
        use_clipped_model_output),  x' = sqrt(a') x0 + sqrt(1 - a' - s^2) eps + s z

    ``step(..., guidance_scale=g)`` takes the pipeline's doubled batch ``[uncond; text]`` and applies
    classifier-free guidance (and ``guidance_rescale``) inside the same pass.
    """

    __init__ = F.fastgen_init(diffusers.DDIMScheduler.__init__, _check)

    def set_timesteps(self, *args: Any, **kwargs: Any) -> None:
        super().set_timesteps(*args, **kwargs)
        F.remember_timesteps(self)

    def _fg_build(self, t: int, t_prev: int, eta: float, rederive: bool, clipped: bool) -> dict[int, float]:
        # scalar subexpressions in float32 exactly as diffusers computes them (its rounding of, e.g.,
        # 1 - a / a' is part of its result), combined in float64
        a_t = self.alphas_cumprod[t].cpu()
        a_p = (self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod).cpu()
        std = eta * self._get_variance(t, t_prev).cpu() ** 0.5
        direction = float((1 - a_p - std**2) ** 0.5)
        c = F.safe_conversion(self.config.prediction_type, float(a_t**0.5), float((1 - a_t) ** 0.5))
        c[D.CX0] = float(a_p**0.5)
        if clipped and not rederive:
            # diffusers keeps the eps of the unclipped x0; the fused op re-derives eps after clipping, so
            # the model output enters through the prev_x0 slot: eps = EX x + EM m
            c[D.CX] = direction * c[D.EX]
            c[D.CPREV] = direction * c[D.EM]
        else:
            c[D.CEPS] = direction
        c[D.SIGMA] = float(std)
        c[D.NOISE_MASK] = 1.0
        return c

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
        *,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
    ) -> DDIMSchedulerOutput | tuple:
        """diffusers' ``DDIMScheduler.step`` in one fused pass.

        Args:
            model_output: (B, C, ...) — or (2B, C, ...) = [uncond; text] with ``guidance_scale``.
            sample: (B, C, ...) x_t.
            guidance_scale / guidance_rescale: classifier-free guidance ``u + g (c - u)`` (and Lin et al.'s
                rescale, as diffusers' ``rescale_noise_cfg``) applied in the same pass.
        Returns:
            ``DDIMSchedulerOutput(prev_sample, pred_original_sample)`` or the tuple.
        """
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
            )
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not (0.0 <= eta < math.inf):
            raise ValueError(
                f"fastgen.diffusers.DDIMScheduler.step: eta must be a finite real >= 0, got {eta!r}"
            )
        if variance_noise is not None and generator is not None and eta > 0:
            raise ValueError(
                "Cannot pass both generator and variance_noise. Please make sure that either `generator` or"
                " `variance_noise` stays `None`."
            )
        t = F.host_timestep(self, timestep)
        t_prev = t - self.config.num_train_timesteps // self.num_inference_steps
        if not 0 <= t < len(self.alphas_cumprod):
            raise ValueError(f"timestep={t} out of range [0, {len(self.alphas_cumprod) - 1}]")
        cond, uncond = F.split_guidance(model_output, sample, guidance_scale, guidance_rescale)
        clip = F.threshold_args(self.config)
        keep_eps = bool(clip) and not use_clipped_model_output
        coeffs = F.cached_coeffs(
            self,
            ("ddim", t, t_prev, float(eta), bool(use_clipped_model_output), bool(clip)),
            sample.device,
            lambda: self._fg_build(t, t_prev, float(eta), bool(use_clipped_model_output), bool(clip)),
        )
        noise = None
        if eta > 0:
            noise = variance_noise if variance_noise is not None else F.draw_noise(cond, generator)
        prev = None
        if keep_eps:
            if uncond is not None:
                # plain torch (one extra pass): the fused op has no coefficient for the guided model output
                # in the post-clip eps, so the guided output is formed first and passed as prev_x0
                cond = F.guided_ref(cond, uncond, guidance_scale, guidance_rescale)
                uncond = None
            prev = cond
        prev_sample, x0 = F.fused(
            sample, cond, coeffs, uncond=uncond, guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale, noise=noise, prev=prev, **clip,
        )  # fmt: skip
        if not return_dict:
            return (prev_sample, x0)
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

"""``DDPMScheduler``: diffusers' DDPM (Ho et al. 2020) with each ``step`` one fused fastgen pass."""

from __future__ import annotations

from typing import Any

import diffusers
import torch
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput

from fastgen.diffusers import _fused as F
from fastgen.ops import diffusion_step as D

_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "learned_range")


def _check(config: Any) -> None:
    F.check_threshold_config("DDPMScheduler", config)
    vt = config.variance_type
    if vt == "learned":
        raise F.unsupported(
            "DDPMScheduler", "variance_type", vt,
            "the fused step takes a log-variance interpolation (learned_range), not the variance itself",
        )  # fmt: skip
    if vt == "fixed_large_log":
        raise F.unsupported(
            "DDPMScheduler", "variance_type", vt,
            "diffusers takes the square root of log(beta) < 0 there (NaN samples); use fixed_large",
        )  # fmt: skip
    if vt not in _VARIANCES:
        raise F.unsupported("DDPMScheduler", "variance_type", vt, f"expected one of {_VARIANCES}")


class DDPMScheduler(diffusers.DDPMScheduler):
    """Drop-in for ``diffusers.DDPMScheduler`` (same config, timesteps, outputs; identical samples).

    Per element, with a = alphas_cumprod[t], a' = alphas_cumprod[prev(t)] (1 after the last step),
    beta = 1 - a / a'::

        x' = sqrt(a') beta / (1 - a) x0 + sqrt(a / a') (1 - a') / (1 - a) x + [t > 0] sd z

    with sd from ``variance_type`` (fixed_small(_log): the posterior variance clamped at 1e-20,
    fixed_large: beta, learned_range: the model's extra channels interpolate the two logs).
    ``step(..., guidance_scale=g)`` takes the doubled batch ``[uncond; text]`` (guidance in the same pass;
    learned variance channels come from the text half).
    """

    __init__ = F.fastgen_init(diffusers.DDPMScheduler.__init__, _check)

    def set_timesteps(self, *args: Any, **kwargs: Any) -> None:
        super().set_timesteps(*args, **kwargs)
        F.remember_timesteps(self)
        host = self._fg_host_timesteps or []
        self._fg_prev = {t: (host[i + 1] if i + 1 < len(host) else -1) for i, t in enumerate(host)}

    def _fg_prev_timestep(self, t: int) -> int:
        if self.custom_timesteps or self.num_inference_steps:
            prev = getattr(self, "_fg_prev", {}).get(t)
            if prev is None:
                raise ValueError(f"timestep={t} is not one of the scheduler's timesteps")
            return prev
        return t - 1

    def _fg_build(self, t: int, t_prev: int) -> dict[int, float]:
        # scalar subexpressions in float32 exactly as diffusers computes them (its rounding of
        # 1 - a / a' is part of its result), combined in float64
        a_t = self.alphas_cumprod[t].cpu()
        a_p = self.alphas_cumprod[t_prev].cpu() if t_prev >= 0 else torch.tensor(1.0)
        cur_alpha = a_t / a_p
        cur_beta = 1 - cur_alpha
        c = F.safe_conversion(self.config.prediction_type, float(a_t**0.5), float((1 - a_t) ** 0.5))
        c[D.CX0] = float((a_p**0.5 * cur_beta) / (1 - a_t))
        c[D.CX] = float(cur_alpha**0.5 * (1 - a_p) / (1 - a_t))
        var = torch.clamp((1 - a_p) / (1 - a_t) * cur_beta, min=1e-20)
        vt = self.config.variance_type
        if vt == "fixed_large":
            c[D.SIGMA] = float(cur_beta**0.5)
        elif vt == "fixed_small_log":
            c[D.SIGMA] = float(torch.exp(0.5 * torch.log(var)))
        elif vt == "learned_range":
            c[D.MINLOG] = float(torch.log(var))
            c[D.MAXLOG] = float(torch.log(cur_beta))
        else:
            c[D.SIGMA] = float(var**0.5)
        c[D.NOISE_MASK] = 1.0
        return c

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        *,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
    ) -> DDPMSchedulerOutput | tuple:
        """diffusers' ``DDPMScheduler.step`` in one fused pass.

        Args:
            model_output: (B, C', ...), C' = 2C ([eps; v]) for learned_range; (2B, C', ...) = [uncond; text]
                with ``guidance_scale``.
            sample: (B, C, ...) x_t.
        Returns:
            ``DDPMSchedulerOutput(prev_sample, pred_original_sample)`` or the tuple.
        """
        t = F.host_timestep(self, timestep)
        if not 0 <= t < len(self.alphas_cumprod):
            raise ValueError(f"timestep={t} out of range [0, {len(self.alphas_cumprod) - 1}]")
        t_prev = self._fg_prev_timestep(t)
        cond, uncond = F.split_guidance(model_output, sample, guidance_scale, guidance_rescale)
        coeffs = F.cached_coeffs(self, ("ddpm", t, t_prev), sample.device, lambda: self._fg_build(t, t_prev))
        learned = self.config.variance_type == "learned_range"
        if learned:
            F.check_learned_channels(cond, sample)
        noise = F.draw_noise(cond[:, : sample.shape[1]], generator) if t > 0 else None
        prev_sample, x0 = F.fused(
            sample, cond, coeffs, uncond=uncond, guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale, noise=noise, learned_variance=learned,
            **F.threshold_args(self.config),
        )  # fmt: skip
        if not return_dict:
            return (prev_sample, x0)
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

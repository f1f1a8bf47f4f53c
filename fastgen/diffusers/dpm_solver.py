"""``DPMSolverMultistepScheduler`` (Lu et al. 2022): DPM-Solver(++) 2M as diffusers has it, with each
``step`` one fused fastgen pass."""

from __future__ import annotations

from typing import Any

import diffusers
import torch
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from fastgen.diffusers import _fused as F
from fastgen.ops import diffusion_step as D

_NAME = "DPMSolverMultistepScheduler"


def _check(config: Any) -> None:
    F.check_threshold_config(_NAME, config)
    if config.solver_order not in (1, 2):
        raise F.unsupported(
            _NAME, "solver_order", config.solver_order,
            "the fused step keeps one previous model output (orders 1 and 2)",
        )  # fmt: skip
    if config.algorithm_type not in ("dpmsolver++", "dpmsolver"):
        raise F.unsupported(
            _NAME, "algorithm_type", config.algorithm_type, "supported: 'dpmsolver++' and 'dpmsolver'"
        )
    if config.prediction_type not in ("epsilon", "sample", "v_prediction"):
        raise F.unsupported(
            _NAME, "prediction_type", config.prediction_type, "supported: epsilon, sample, v_prediction"
        )
    if config.use_flow_sigmas:
        raise F.unsupported(_NAME, "use_flow_sigmas", True, "flow-matching sigmas are not served")


class DPMSolverMultistepScheduler(diffusers.DPMSolverMultistepScheduler):
    """Drop-in for ``diffusers.DPMSolverMultistepScheduler`` with ``solver_order`` 1 or 2 and
    ``algorithm_type`` ``dpmsolver++`` / ``dpmsolver`` (midpoint or heun ``solver_type``; sigmas,
    ``lower_order_final``, ``euler_at_final``, ``final_sigmas_type``, thresholding as diffusers).

    Per element, with (alpha, sigma) of the current (s) and next (t) sigma, lambda = log(alpha / sigma),
    h = lambda_t - lambda_s, r0 = (lambda_s - lambda_s1) / h and D the converted model output (x0 for
    dpmsolver++, eps for dpmsolver) of this step (D0) and the previous one (D_1)::

        dpmsolver++: x' = sigma_t / sigma_s x - alpha_t (e^-h - 1) D0 + k (D0 - D_1) / r0
        dpmsolver:   x' = alpha_t / alpha_s x - sigma_t (e^h - 1) D0 + k (D0 - D_1) / r0

    with k = 0 on first-order steps. ``step(..., guidance_scale=g)`` takes the doubled batch
    ``[uncond; text]`` (guidance in the same pass).
    """

    __init__ = F.fastgen_init(diffusers.DPMSolverMultistepScheduler.__init__, _check)

    def set_timesteps(self, *args: Any, **kwargs: Any) -> None:
        super().set_timesteps(*args, **kwargs)
        F.remember_timesteps(self)

    def _fg_build(self, i: int, order: int) -> dict[int, float]:
        # scalar subexpressions in float32 exactly as diffusers computes them, combined in float64
        cfg = self.config
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[i + 1])
        alpha_s, sigma_s = self._sigma_to_alpha_sigma_t(self.sigmas[i])
        lam_t = torch.log(alpha_t) - torch.log(sigma_t)
        lam_s = torch.log(alpha_s) - torch.log(sigma_s)
        h = lam_t - lam_s
        c = F.safe_conversion(cfg.prediction_type, float(alpha_s), float(sigma_s))
        plus = cfg.algorithm_type == "dpmsolver++"
        if plus:
            cx, c0 = sigma_t / sigma_s, -(alpha_t * (torch.exp(-h) - 1.0))
        else:
            cx, c0 = alpha_t / alpha_s, -(sigma_t * (torch.exp(h) - 1.0))
            if not cfg.thresholding:  # the x0 slot carries eps (what dpmsolver keeps)
                c[D.AX], c[D.AM] = c[D.EX], c[D.EM]
        k = 0.0
        if order == 2:
            alpha_s1, sigma_s1 = self._sigma_to_alpha_sigma_t(self.sigmas[i - 1])
            lam_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
            inv_r0 = float(1.0 / ((lam_s - lam_s1) / h))
            if cfg.solver_type == "midpoint":
                k = (
                    -0.5 * (alpha_t * (torch.exp(-h) - 1.0))
                    if plus
                    else -0.5 * (sigma_t * (torch.exp(h) - 1.0))
                )
            elif plus:
                k = alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)
            else:
                k = -(sigma_t * ((torch.exp(h) - 1.0) / h - 1.0))
            k = float(k) * inv_r0
        c[D.CX] = float(cx)
        # dpmsolver with thresholding: the slot holds the thresholded x0, eps is re-derived from it
        c[D.CEPS if (not plus and cfg.thresholding) else D.CX0] = float(c0) + k
        c[D.CPREV] = -k
        return c

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
        *,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
    ) -> SchedulerOutput | tuple:
        """diffusers' ``DPMSolverMultistepScheduler.step`` in one fused pass; returns
        ``SchedulerOutput(prev_sample)`` or ``(prev_sample,)``."""
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
            )
        cfg = self.config
        if self.step_index is None:
            self._init_step_index(timestep)
        i = self.step_index
        n = len(self.timesteps)
        lower_order_final = (i == n - 1) and (
            cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero"
        )
        order = 1 if (cfg.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final) else 2
        cond, uncond = F.split_guidance(model_output, sample, guidance_scale, guidance_rescale)
        if cfg.variance_type in ("learned", "learned_range") and cfg.prediction_type == "epsilon":
            c = sample.shape[1]
            cond = cond[:, :c]
            uncond = uncond[:, :c] if uncond is not None else None
        coeffs = F.cached_coeffs(self, ("dpm", i, order), sample.device, lambda: self._fg_build(i, order))
        prev = self.model_outputs[-1] if order == 2 else None
        prev_sample, slot = F.fused(
            sample, cond, coeffs, uncond=uncond, guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale, prev=prev, **F.threshold_args(cfg),
        )  # fmt: skip
        if cfg.algorithm_type == "dpmsolver" and cfg.thresholding:
            # plain torch (one extra pass): the fused op returns the thresholded x0, dpmsolver keeps eps
            alpha_s, sigma_s = self._sigma_to_alpha_sigma_t(self.sigmas[i])
            slot = (sample - alpha_s.to(sample.device) * slot) / sigma_s.to(sample.device)
        for j in range(cfg.solver_order - 1):
            self.model_outputs[j] = self.model_outputs[j + 1]
        self.model_outputs[-1] = slot
        if self.lower_order_nums < cfg.solver_order:
            self.lower_order_nums += 1
        prev_sample = prev_sample.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

"""Samplers: a loop of fused steps (``fastgen.ops.diffusion_step``) over a :class:`NoiseSchedule`.

Every sampler precomputes the 16 step coefficients for all of its steps once, on the device, so a step
is one model call plus one fused kernel, with no host synchronisation (the loop can be captured in a
CUDA graph). Noise, including the initial x_T, comes from the counter-based generator keyed by
(seed, sample index, timestep, element): a sample is the same whatever the batch size or backend.

``model_fn(x, t)`` receives ``x`` of shape (batch, ...) and ``t``, a long tensor (batch,) of the
*original* training timesteps (the schedule's ``timestep_map``), and returns the model output.
With ``guidance_scale``, the sampler calls ``model_fn`` once on the doubled batch ``[x; x]`` (GLIDE
style; the model conditions the first half and not the second) and expects ``[cond; uncond]`` back,
or ``model_fn`` may return the tuple ``(cond, uncond)`` itself.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable
from typing import Any

import torch

from fastgen.diffusion.schedules import NoiseSchedule
from fastgen.ops import diffusion_step as D

#: RNG step key of the initial noise x_T (timesteps key the per-step noise; they are < 2^24 - 1).
INIT_NOISE_STEP = (1 << 24) - 1

ModelFn = Callable[[torch.Tensor, torch.Tensor], Any]


class _StepPlan:
    """What the fast path of ``Sampler.step`` needs for one (shape, dtype, device), built once."""

    __slots__ = ("b", "clip", "device", "dtype", "g", "n", "noise_mode", "out_rows", "out_shape", "rows", "shape",
                 "uoff", "var_mode")  # fmt: skip


def _progress(iterable, total: int, enable: bool, desc: str):
    if not enable:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional on machines without a package registry
        return _PlainProgress(iterable, total, desc)
    return tqdm(iterable, total=total, desc=desc)


class _PlainProgress:
    def __init__(self, iterable, total, desc):
        self.iterable, self.total, self.desc = iterable, total, desc

    def __iter__(self):
        for k, item in enumerate(self.iterable, 1):
            yield item
            print(f"\r{self.desc}: {k}/{self.total}", end="" if k < self.total else "\n", file=sys.stderr)


class Sampler:
    """Base class. Subclasses define ``_table`` (the (steps, 16) float64 coefficients).

    Args:
        schedule: the (respaced) schedule to sample; ``schedule.respace("100")`` etc.
        prediction_type: "epsilon" | "sample" | "v_prediction".
        clip_sample: static clip of x0 (e.g. 1.0 for images in [-1, 1]).
        dynamic_threshold: ratio or (ratio, max_value), Imagen's per-sample thresholding.
        guidance_scale / guidance_rescale: classifier-free guidance (see module docstring).
    """

    name = "base"
    needs_noise = False
    needs_prev_x0 = False

    def __init__(
        self,
        schedule: NoiseSchedule,
        *,
        prediction_type: str = "epsilon",
        clip_sample: float | None = None,
        dynamic_threshold: float | tuple[float, float] | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
    ):
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(
                f"schedule must be a fastgen.diffusion.NoiseSchedule, got {type(schedule).__name__}"
            )
        self.schedule = schedule
        D.check_step_options(guidance_scale, guidance_rescale, clip_sample, dynamic_threshold)
        self.prediction_type = D._norm_pred(prediction_type)
        self.clip_sample = clip_sample
        self.dynamic_threshold = dynamic_threshold
        self.guidance_scale = guidance_scale
        self.guidance_rescale = guidance_rescale
        self._tables: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self._plan: _StepPlan | None = None

    @property
    def num_steps(self) -> int:
        return self.schedule.num_timesteps

    def _table(self, abar: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def coefficients(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(num_steps, 16) step coefficients on ``device``; row i serves the step from index i."""
        device = torch.device(device)
        key = (str(device), torch.float64 if dtype == torch.float64 else torch.float32)
        if key not in self._tables:
            sched = self.schedule.to(device)
            abar = sched.alphas_cumprod.to(torch.float64)
            idx = torch.arange(self.num_steps, device=device)
            table = self._table(abar, idx)
            table[:, D.RNG_STEP] = sched.timestep_map.to(device=device, dtype=torch.float64)
            self._tables[key] = table.to(key[1]).contiguous()
        return self._tables[key]

    def model_input_scale(self, device: torch.device | str) -> torch.Tensor | None:
        """Per-step factor applied to x before the model (Euler's 1/sqrt(sigma^2+1)); None if 1."""
        return None

    def init_noise_sigma(self) -> float:
        return 1.0

    def step(
        self,
        i: int,
        x: torch.Tensor,
        model_output: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        *,
        prev_x0: torch.Tensor | None = None,
        seed: int | None = None,
        sample_offset: int = 0,
        noise: torch.Tensor | None = None,
        known_image: torch.Tensor | None = None,
        known_mask: torch.Tensor | None = None,
        cond_grad: torch.Tensor | None = None,
        cond_grad_scale: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One fused step from schedule index ``i`` to ``i - 1``. Returns (x_prev, pred_x0).

        ``known_image`` / ``known_mask`` (inpainting) and ``cond_grad`` / ``cond_grad_scale`` (a guidance
        gradient shifting the mean by variance * scale * grad): see ``fastgen.ops.diffusion_step.sampler_step``.
        """
        if noise is None and known_image is None and cond_grad is None and known_mask is None:
            out = self._fast_step(i, x, model_output, prev_x0, seed, sample_offset)
            if out is not None:
                return out
        try:  # 5.5 would index the coefficient table with a float; True is not a step
            if isinstance(i, bool):
                raise TypeError
            i = operator.index(i)
        except TypeError:
            raise TypeError(f"step index i must be an int, got {type(i).__name__} {i!r}") from None
        if not 0 <= i < self.num_steps:
            raise ValueError(f"step index i={i} out of range [0, {self.num_steps - 1}]")
        uncond = None
        if isinstance(model_output, tuple):
            model_output, uncond = model_output
        coeffs = self.coefficients(x.device, x.dtype)[i]
        result = D.sampler_step(
            x,
            model_output,
            coeffs,
            uncond_output=uncond,
            guidance_scale=self.guidance_scale,
            guidance_rescale=self.guidance_rescale,
            clip_sample=self.clip_sample,
            dynamic_threshold=self.dynamic_threshold,
            learned_variance=getattr(self, "variance_type", None) == "learned_range",
            needs_noise=self.needs_noise,
            noise=noise,
            seed=seed,
            sample_offset=sample_offset,
            prev_x0=prev_x0 if self.needs_prev_x0 else None,
            known_image=known_image,
            known_mask=known_mask,
            cond_grad=cond_grad,
            cond_grad_scale=cond_grad_scale,
        )
        if uncond is None and noise is None and known_image is None and cond_grad is None:
            self._make_plan(x, model_output)
        return result

    def _fast_step(self, i, x, model_output, prev_x0, seed, sample_offset):
        """The common step (no explicit noise, inpainting or guidance gradient) with its Python cost cut to
        a few microseconds: the options were validated when the sampler was built, and what depends on the
        shapes is validated by the first full step and kept in a one-entry plan. Returns None whenever the
        full path must run (a new shape, a traced call, an argument of another kind); that path raises
        every error, so the fast path never has to."""
        plan = self._plan
        if (
            plan is None
            or type(i) is not int
            or type(x) is not torch.Tensor
            or type(model_output) is not torch.Tensor
            or x.shape != plan.shape
            or model_output.shape != plan.out_shape
            or x.dtype is not plan.dtype
            or model_output.dtype is not plan.dtype
            or x.device != plan.device
            or model_output.device != plan.device
            or not 0 <= i < len(plan.rows)
            or not x.is_contiguous()
            or not model_output.is_contiguous()
        ):
            return None
        prev = None
        if self.needs_prev_x0 and prev_x0 is not None:
            if (
                type(prev_x0) is not torch.Tensor
                or prev_x0.shape != plan.shape
                or prev_x0.dtype is not plan.dtype
                or prev_x0.device != plan.device
                or not prev_x0.is_contiguous()
            ):
                return None
            prev = prev_x0
        if plan.noise_mode == 2:
            if seed is None or type(seed) is not int or type(sample_offset) is not int:
                return None
            seed = D.op_seed(seed)
            sample_offset &= 0xFFFFFFFF
        else:
            seed, sample_offset = 0, 0
        backend = D.eager_backend(x, plan.n)
        if backend is None:
            return None
        return D.run_eager(backend, x, model_output, plan.out_rows, model_output if plan.uoff else None, plan.uoff,
                           plan.rows[i], prev, None, plan.g, plan.clip, plan.var_mode, plan.noise_mode, seed,
                           sample_offset, True)  # fmt: skip

    def _make_plan(self, x: torch.Tensor, model_output: Any) -> None:
        """After a full step validated these shapes: the plan for the fast path (None when the step
        needs what the fast path does not do: thresholding, guidance rescale, separate uncond)."""
        self._plan = None
        if (
            type(x) is not torch.Tensor
            or type(model_output) is not torch.Tensor
            or x.dtype not in D.KERNEL_DTYPES
            or model_output.dtype != x.dtype
            or x.dim() < 2
            or x.numel() == 0
            or self.dynamic_threshold not in (None, False)
            or self.guidance_rescale > 0
        ):
            return
        plan = _StepPlan()
        plan.shape, plan.out_shape = x.shape, model_output.shape
        plan.dtype, plan.device = x.dtype, x.device
        b = x.shape[0]
        plan.b, plan.n = b, x.numel() // b
        plan.out_rows = model_output.shape[0]
        plan.rows = self.coefficients(x.device, x.dtype).unbind(0)
        guided = self.guidance_scale is not None
        plan.uoff = b if guided else 0
        plan.g = float(self.guidance_scale) if guided else 1.0
        plan.clip = float(self.clip_sample) if self.clip_sample is not None else 0.0
        plan.var_mode = 1 if getattr(self, "variance_type", None) == "learned_range" else 0
        plan.noise_mode = 2 if self.needs_noise else 0
        self._plan = plan

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        shape: tuple[int, ...],
        *,
        seed: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        x_T: torch.Tensor | None = None,
        sample_offset: int = 0,
        progress: bool = True,
        callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
        known: tuple[torch.Tensor, torch.Tensor] | None = None,
        cond_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run the whole loop from pure noise (or ``x_T``) to the final sample of ``shape``.

        ``seed`` keys all noise (initial and per-step); None draws one. ``callback(i, x, pred_x0)`` is
        called after every step. ``known = (image, mask)``: inpainting, every step's x0 takes ``image``
        where ``mask`` (broadcastable to ``shape``; 1 = keep) is 1, before clipping (GLIDE's
        ``denoised_fn``). ``cond_fn(x, t) -> grad`` (x the current sample, t the original timesteps):
        every step's mean moves by variance * grad (GLIDE's ``cond_fn`` / ``condition_mean``).
        Returns the final sample.
        """
        device = torch.device(device)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        b = shape[0]
        if x_T is None:
            x = D.counter_normal(shape, seed, INIT_NOISE_STEP, sample_offset, device=device, dtype=dtype)
        else:
            if tuple(x_T.shape) != tuple(shape):
                raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {tuple(shape)}")
            x = x_T.to(device=device, dtype=dtype)
        init = self.init_noise_sigma()
        if init != 1.0:
            x = x * init
        # per-step tensors as views built once (indexing a tensor in the loop costs microseconds per step):
        # t of the batch, t of the doubled batch (contiguous, as torch.cat made it), the input scale
        tmap = self.schedule.timestep_map.to(device)[:, None]
        t_batch = tmap.expand(-1, b).unbind(0)
        guided = self.guidance_scale is not None
        t_model = tmap.expand(-1, 2 * b).contiguous().unbind(0) if guided else t_batch
        scale = self.model_input_scale(device)
        if scale is not None:
            scale = scale.to(dtype).unbind(0)
        self.coefficients(device, dtype)  # build once, before the loop
        known_image = known_mask = None
        if known is not None:
            if not (isinstance(known, tuple) and len(known) == 2):
                raise TypeError(f"known must be a tuple (image, mask), got {type(known).__name__}")
            known_image = known[0].to(device=device, dtype=dtype)
            # expanded once here, so that no step copies the mask
            known_mask = known[1].to(device=device, dtype=dtype).expand(shape).contiguous()
        prev_x0 = None
        steps = range(self.num_steps - 1, -1, -1)
        for i in _progress(steps, self.num_steps, progress, f"{self.name} sampling"):
            x_in = x if scale is None else x * scale[i]
            t = t_batch[i]
            out = model_fn(torch.cat([x_in, x_in]) if guided else x_in, t_model[i])
            grad = None
            if cond_fn is not None:
                grad = cond_fn(x, t)
            x, x0 = self.step(i, x, out, prev_x0=prev_x0, seed=seed, sample_offset=sample_offset,
                              known_image=known_image, known_mask=known_mask, cond_grad=grad)  # fmt: skip
            prev_x0 = x0
            if callback is not None:
                callback(i, x, x0)
        return x


class DDPMSampler(Sampler):
    """Ancestral sampling (Ho et al. 2020). ``variance_type``: fixed_small | fixed_large | learned_range."""

    name = "ddpm"
    needs_noise = True

    def __init__(self, schedule: NoiseSchedule, *, variance_type: str = "fixed_small", **kw: Any):
        if variance_type not in D.VARIANCE_TYPES:
            raise ValueError(f"unknown variance_type {variance_type!r}; expected one of {D.VARIANCE_TYPES}")
        self.variance_type = variance_type
        super().__init__(schedule, **kw)

    def _table(self, abar, idx):
        return D.ddpm_coeffs(abar, idx, self.prediction_type, self.variance_type)


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021); eta = 0 is deterministic, eta = 1 matches DDPM's fixed-small noise."""

    name = "ddim"

    def __init__(self, schedule: NoiseSchedule, *, eta: float = 0.0, **kw: Any):
        self.eta = D._check_eta(eta)
        self.needs_noise = self.eta > 0
        super().__init__(schedule, **kw)

    def _table(self, abar, idx):
        return D.ddim_coeffs(abar, idx, idx - 1, self.eta, self.prediction_type)


class EulerSampler(Sampler):
    """Euler (``ancestral=False``) or Euler ancestral (Karras et al. 2022) in sigma space."""

    name = "euler"

    def __init__(self, schedule: NoiseSchedule, *, ancestral: bool = False, **kw: Any):
        self.ancestral = bool(ancestral)
        self.needs_noise = self.ancestral
        if self.ancestral:
            self.name = "euler_ancestral"
        super().__init__(schedule, **kw)
        if not float(schedule.alphas_cumprod[-1]) > 0:
            raise ValueError(
                "Euler samplers need alphas_cumprod > 0 at every step; this schedule ends at zero SNR "
                "(alphas_cumprod[-1] = 0), where sigma = sqrt((1 - a) / a) is infinite"
            )

    def _table(self, abar, idx):
        return D.euler_coeffs(abar, idx, idx - 1, self.prediction_type, self.ancestral)

    def model_input_scale(self, device):
        return self.schedule.alphas_cumprod.to(device=device, dtype=torch.float64).sqrt()

    def init_noise_sigma(self) -> float:
        a = float(self.schedule.alphas_cumprod[-1])
        return (1.0 / a) ** 0.5  # sqrt(sigma_max^2 + 1)


class EulerAncestralSampler(EulerSampler):
    def __init__(self, schedule: NoiseSchedule, **kw: Any):
        super().__init__(schedule, ancestral=True, **kw)


class DPMSolverSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022): second order multistep, first order on the first and last step."""

    name = "dpm_solver++_2m"
    needs_prev_x0 = True

    def _table(self, abar, idx):
        n = idx.numel()
        second = D.dpm_solver_2m_coeffs(abar, idx, idx - 1, (idx + 1).clamp(max=n - 1), self.prediction_type)
        first = D.dpm_solver_2m_coeffs(abar, idx, idx - 1, None, self.prediction_type)
        second[n - 1] = first[n - 1]  # the first step of the loop has no previous x0
        return second


SAMPLERS: dict[str, type[Sampler]] = {
    "ddpm": DDPMSampler,
    "ddim": DDIMSampler,
    "euler": EulerSampler,
    "euler_ancestral": EulerAncestralSampler,
    "dpm_solver++_2m": DPMSolverSampler,
}

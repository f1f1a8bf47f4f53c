r"""Noise schedules and timestep respacing for discrete-time Gaussian diffusion (float64 math).

A schedule is the sequence :math:`\beta_0, \dots, \beta_{T-1}` of the forward process
:math:`q(x_t \mid x_{t-1}) = \mathcal N(\sqrt{1-\beta_t}\,x_{t-1}, \beta_t I)`, so that
:math:`q(x_t \mid x_0) = \mathcal N(\sqrt{\bar\alpha_t}\,x_0, (1-\bar\alpha_t) I)` with
:math:`\bar\alpha_t = \prod_{s \le t} (1 - \beta_s)` (Ho et al. 2020, arXiv:2006.11239).

* :func:`betas_for_schedule`: "linear" (Ho et al. 2020, scaled to T as in ADM), "cosine" /
  "squaredcos_cap_v2" (Nichol & Dhariwal 2021, arXiv:2102.09672), "scaled_linear" (Stable Diffusion).
* :func:`space_timesteps`: the ADM / GLIDE respacing specs ("100", "ddim50", "fast27", "10,10,3,2,2").
* :func:`spaced_timesteps`: the "linspace" / "leading" / "trailing" inference spacings of the diffusers
  schedulers (see also Lin et al. 2023, arXiv:2305.08891, Table 2).
* :class:`NoiseSchedule`: :math:`\bar\alpha`, the posterior :math:`q(x_{t-1} \mid x_t, x_0)`
  coefficients, and respacing by ADM's SpacedDiffusion rule.

Everything is computed in float64, like the numpy reference implementations, and the timestep
arithmetic is done in Python floats so that the chosen steps match those references exactly
(including their round-half-to-even ties).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence

import torch

SCHEDULE_NAMES = ("linear", "cosine", "squaredcos_cap_v2", "scaled_linear")
SPACINGS = ("linspace", "leading", "trailing")


def _positive_int(value: object, arg: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{arg} must be a positive int, got {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise ValueError(f"{arg} must be a positive int, got {value!r}") from None
    if n < 1:
        raise ValueError(f"{arg} must be a positive int, got {n}")
    return n


def _cosine_alpha_bar(u: float) -> float:
    # Nichol & Dhariwal 2021, eq. 17, with s = 0.008 (f(u) / f(0) is their alpha_bar).
    return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2


def betas_for_schedule(
    name: str,
    num_timesteps: int,
    *,
    beta_start: float | None = None,
    beta_end: float | None = None,
    max_beta: float = 0.999,
) -> torch.Tensor:
    r"""The betas of a named schedule: a float64 tensor of shape (num_timesteps,).

    With :math:`T` = ``num_timesteps`` and :math:`i = 0, \dots, T-1`:

    * ``"linear"`` (Ho et al. 2020; ADM's scaling to any T, Nichol & Dhariwal 2021):
      :math:`\beta_i` = linspace(1e-4 * 1000/T, 0.02 * 1000/T, T), so that T = 1000 gives the DDPM
      schedule. ``beta_start`` / ``beta_end``, when given, replace the endpoints unscaled (one that is
      not given keeps its scaled default).
    * ``"cosine"`` and its diffusers alias ``"squaredcos_cap_v2"`` (Nichol & Dhariwal 2021, eq. 17):
      :math:`\bar\alpha(u) = \cos^2\big(\tfrac{u + 0.008}{1.008} \tfrac{\pi}{2}\big)`,
      :math:`\beta_i = \min\big(1 - \bar\alpha(\tfrac{i+1}{T}) / \bar\alpha(\tfrac{i}{T}), \beta_{max}\big)`
      with :math:`\beta_{max}` = ``max_beta``; the cumulative product then equals
      :math:`\bar\alpha(\tfrac{i+1}{T}) / \bar\alpha(0)` wherever the cap is not hit.
    * ``"scaled_linear"`` (Stable Diffusion / latent diffusion, Rombach et al. 2022):
      :math:`\beta_i` = linspace(sqrt(beta_start), sqrt(beta_end), T)^2 with defaults 0.00085 and 0.012.

    Raises:
        ValueError: unknown ``name``, ``num_timesteps`` < 1, ``max_beta`` outside (0, 1],
            ``beta_start`` / ``beta_end`` given to the cosine schedule, or betas outside (0, 1].
    """
    t = _positive_int(num_timesteps, "num_timesteps")
    if not 0.0 < max_beta <= 1.0:
        raise ValueError(f"max_beta must lie in (0, 1], got {max_beta}")
    if name == "linear":
        scale = 1000.0 / t
        lo = scale * 1e-4 if beta_start is None else float(beta_start)
        hi = scale * 0.02 if beta_end is None else float(beta_end)
        betas = torch.linspace(lo, hi, t, dtype=torch.float64)
    elif name in ("cosine", "squaredcos_cap_v2"):
        if beta_start is not None or beta_end is not None:
            raise ValueError(f"beta_start / beta_end do not apply to the {name!r} schedule (use max_beta)")
        betas = torch.tensor(
            [
                min(1.0 - _cosine_alpha_bar((i + 1) / t) / _cosine_alpha_bar(i / t), max_beta)
                for i in range(t)
            ],
            dtype=torch.float64,
        )
    elif name == "scaled_linear":
        lo = 0.00085 if beta_start is None else float(beta_start)
        hi = 0.012 if beta_end is None else float(beta_end)
        if lo < 0 or hi < 0:
            raise ValueError(f"beta_start and beta_end must be >= 0 for 'scaled_linear', got {lo}, {hi}")
        betas = torch.linspace(math.sqrt(lo), math.sqrt(hi), t, dtype=torch.float64) ** 2
    else:
        raise ValueError(f"unknown schedule name {name!r}; expected one of {', '.join(SCHEDULE_NAMES)}")
    bad = ~((betas > 0) & (betas <= 1))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"the {name!r} schedule with num_timesteps={t} gives beta[{i}]={betas[i].item():.6g}, outside "
            f"(0, 1] (beta_start={betas[0].item():.6g}, beta_end={betas[-1].item():.6g}); "
            "pass beta_start / beta_end or use more timesteps"
        )
    return betas


def _evenly_spaced_sections(num_timesteps: int, counts: Sequence[int]) -> list[int]:
    # ADM splits [0, T) into len(counts) parts (the first T % len parts one longer) and walks each part
    # with a float stride (size - 1) / (count - 1), accumulating it and rounding half to even; the
    # accumulation (not k * stride) is kept on purpose, since the two differ in the last bit and so in
    # some of the chosen steps.
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(
                f"section_counts: section {i} is [{start}, {start + size}) and cannot take {count} steps "
                f"(num_timesteps={num_timesteps}, {len(counts)} sections)"
            )
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        pos = 0.0
        for _ in range(count):
            kept.append(start + round(pos))
            pos += stride
        start += size
    return sorted(set(kept))


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
    """The original timesteps that ADM / GLIDE respacing keeps, sorted ascending.

    ``section_counts`` (Nichol & Dhariwal 2021, improved-diffusion ``respace.py``; GLIDE, Nichol et al.
    2021, arXiv:2112.10741):

    * a list of ints or a comma string such as ``"10,10,3,2,2"``: [0, T) is split into len(list) equal
      parts (the first T % len parts one longer), and part j gives count_j steps evenly spread over it:
      start + round(k * (size - 1) / (count - 1)), k = 0 .. count-1 (count 1: the part's first step,
      count 0: none). A part asked for more steps than it holds is an error.
    * an int or ``"N"``: one section of N steps (so both 0 and T-1 are kept when N > 1).
    * ``"ddimN"``: range(0, T, s) for the stride s that gives exactly N steps (DDIM's uniform
      skipping, Song et al. 2021); an error when no stride does. Strides up to T are tried, so
      "ddim1" gives [0] (ADM stops at T - 1 and raises).
    * ``"fast27"`` (GLIDE): ``"10,10,3,2,2"`` with T-1 replaced by T-3, to avoid the noisiest step.
      Only ``"fast27"`` is defined; any other ``"fastN"`` is an error.

    Raises:
        ValueError: an unparsable spec, a section asked for more steps than it holds, no steps at all.
    """
    t = _positive_int(num_timesteps, "num_timesteps")
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            try:
                want = int(spec[len("ddim") :])
            except ValueError:
                raise ValueError(
                    f"section_counts {section_counts!r}: expected 'ddimN' with an int N"
                ) from None
            for stride in range(1, t + 1):
                if len(range(0, t, stride)) == want:
                    return list(range(0, t, stride))
            raise ValueError(
                f"section_counts {section_counts!r}: no stride s gives exactly {want} steps in range(0, {t}, s)"
            )
        if spec.startswith("fast"):
            if spec != "fast27":
                raise ValueError(f"section_counts {section_counts!r}: only 'fast27' (GLIDE) is defined")
            steps = set(space_timesteps(t, "10,10,3,2,2"))
            steps.discard(t - 1)
            steps.add(t - 3)
            return sorted(steps)
        try:
            counts = [int(x) for x in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"section_counts {section_counts!r}: expected 'N', 'N1,N2,...', 'ddimN' or 'fast27'"
            ) from None
    elif isinstance(section_counts, bool):
        raise ValueError(f"section_counts must be a str, an int or a list of ints, got {section_counts!r}")
    else:
        try:
            counts = [operator.index(section_counts)]
        except TypeError:
            try:
                counts = [operator.index(x) for x in section_counts]
            except TypeError:
                raise ValueError(
                    f"section_counts must be a str, an int or a list of ints, got {section_counts!r}"
                ) from None
    if not counts or any(c < 0 for c in counts) or sum(counts) == 0:
        raise ValueError(f"section_counts must be non-negative with at least one step, got {counts}")
    return _evenly_spaced_sections(t, counts)


def spaced_timesteps(
    num_timesteps: int, num_inference_steps: int, spacing: str = "leading", steps_offset: int = 0
) -> list[int]:
    """Inference timesteps in the order samplers visit them (descending), as the diffusers schedulers
    choose them (``timestep_spacing``; Lin et al. 2023, arXiv:2305.08891, Table 2).

    With T = ``num_timesteps`` and n = ``num_inference_steps``, k = 0 .. n-1:

    * ``"linspace"``: round(k * (T-1) / (n-1)), the last one exactly T-1 (numpy's ``linspace``).
    * ``"leading"``: k * (T // n) + ``steps_offset`` (the Stable Diffusion configs use offset 1).
    * ``"trailing"``: round(T - k * T / n) - 1, so the first step is always T-1.

    Rounding is half to even, as numpy's. ``steps_offset`` applies to "leading" only, as in diffusers.
    For "trailing", diffusers' float ``arange`` occasionally yields an extra n+1-th step of -1
    (e.g. T=1000, n=61); this returns exactly n steps, the first n of diffusers'.

    Raises:
        ValueError: n outside [1, T], unknown ``spacing``, or an offset that leaves [0, T).
    """
    t = _positive_int(num_timesteps, "num_timesteps")
    n = _positive_int(num_inference_steps, "num_inference_steps")
    if n > t:
        raise ValueError(f"num_inference_steps must be in [1, num_timesteps={t}], got {n}")
    if spacing == "linspace":
        # numpy: arange(n) * ((stop - start) / (n - 1)) + start, then the last entry set to stop.
        step = (t - 1) / (n - 1) if n > 1 else 0.0
        steps = [round(k * step) for k in range(n - 1)] + [t - 1 if n > 1 else 0]
    elif spacing == "leading":
        offset = operator.index(steps_offset)
        steps = [k * (t // n) + offset for k in range(n)]
        if steps[0] < 0 or steps[-1] >= t:
            raise ValueError(
                f"steps_offset={offset} puts the 'leading' timesteps [{steps[0]}, {steps[-1]}] outside [0, {t})"
            )
    elif spacing == "trailing":
        # numpy's arange(T, 0, -T/n) fills start + k * delta with delta = (start + step) - start.
        delta = (t + (-t / n)) - t
        steps = [round(t + k * delta) - 1 for k in range(n)]
    else:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {', '.join(SPACINGS)}")
    return sorted(steps, reverse=True)


class NoiseSchedule:
    r"""A discrete-time Gaussian diffusion schedule (Ho et al. 2020), all tensors float64 of shape (T,).

    Attributes:
        num_timesteps: T.
        betas: :math:`\beta_t`.
        alphas_cumprod: :math:`\bar\alpha_t = \prod_{s \le t} (1 - \beta_s)`.
        alphas_cumprod_prev: :math:`\bar\alpha_{t-1}`, with :math:`\bar\alpha_{-1} = 1`.
        posterior_variance: :math:`\tilde\beta_t = \beta_t (1 - \bar\alpha_{t-1}) / (1 - \bar\alpha_t)`,
            the variance of :math:`q(x_{t-1} \mid x_t, x_0)` (Ho et al. 2020, eq. 7); 0 at t = 0.
        posterior_log_variance_clipped: :math:`\log\tilde\beta_t` with the t = 0 entry replaced by the
            t = 1 entry, as ADM does to avoid log 0 (for T = 1 it stays -inf).
        posterior_mean_coef1, posterior_mean_coef2: :math:`\tilde\mu_t = c_1 x_0 + c_2 x_t` with
            :math:`c_1 = \beta_t \sqrt{\bar\alpha_{t-1}} / (1 - \bar\alpha_t)`,
            :math:`c_2 = (1 - \bar\alpha_{t-1}) \sqrt{1 - \beta_t} / (1 - \bar\alpha_t)`.
        timestep_map: long (T,), index in this schedule -> timestep of the original (training)
            schedule, which is what the model is conditioned on. ``arange(T)`` unless respaced.
        sigmas: (property) :math:`\sigma_t = \sqrt{(1 - \bar\alpha_t) / \bar\alpha_t}`, the noise level
            of the variance-exploding form :math:`x_t / \sqrt{\bar\alpha_t} = x_0 + \sigma_t \epsilon`
            used by Euler / Karras samplers (Karras et al. 2022, arXiv:2206.00364).

    Args:
        betas: (T,) values in (0, 1], only the last one may be 1 (which gives zero terminal SNR,
            alphas_cumprod[-1] = 0, e.g. the cosine schedule with max_beta=1); converted to float64.
        timestep_map: optional (T,) ints, see above.
    """

    def __init__(self, betas: torch.Tensor | Sequence[float], timestep_map: torch.Tensor | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or betas.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D tensor (T,), got shape {tuple(betas.shape)}")
        bad = ~((betas > 0) & (betas <= 1))
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"betas must lie in (0, 1], got betas[{i}]={betas[i].item()}")
        ones = (betas[:-1] == 1).nonzero()
        if ones.numel():
            # alphas_cumprod would be 0 from there on: every later step pure noise, with 0/0 in respacing
            i = int(ones[0])
            raise ValueError(
                f"betas[{i}] = 1 before the last step: only the last beta may be 1 (zero terminal SNR)"
            )
        t = betas.numel()
        self.num_timesteps = t
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, 0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        abar, abar_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        self.posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2] if t > 1 else pv[:1], pv[1:]]))
        self.posterior_mean_coef1 = betas * abar_prev.sqrt() / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - abar_prev) * (1.0 - betas).sqrt() / (1.0 - abar)
        if timestep_map is None:
            timestep_map = torch.arange(t, device=betas.device)
        timestep_map = torch.as_tensor(timestep_map, device=betas.device)
        if timestep_map.is_floating_point() or timestep_map.is_complex() or timestep_map.dtype == torch.bool:
            raise ValueError(f"timestep_map must hold integers, got dtype {timestep_map.dtype}")
        if timestep_map.shape != betas.shape:
            raise ValueError(
                f"timestep_map must have shape {tuple(betas.shape)} (one entry per timestep), "
                f"got {tuple(timestep_map.shape)}"
            )
        self.timestep_map = timestep_map.to(torch.long)

    @classmethod
    def from_name(cls, name: str, num_timesteps: int = 1000, **kw: float) -> NoiseSchedule:
        """``NoiseSchedule(betas_for_schedule(name, num_timesteps, **kw))``."""
        return cls(betas_for_schedule(name, num_timesteps, **kw))

    @property
    def sigmas(self) -> torch.Tensor:
        r"""(T,) float64 :math:`\sqrt{(1 - \bar\alpha_t) / \bar\alpha_t}` (Karras / Euler noise levels)."""
        return ((1.0 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    def respace(self, use_timesteps: Iterable[int] | str | int) -> NoiseSchedule:
        r"""A schedule over a subset of this one's timesteps (ADM's ``SpacedDiffusion``).

        The kept steps :math:`t_0 < t_1 < \dots` keep their :math:`\bar\alpha`, and the betas become
        :math:`\beta'_j = 1 - \bar\alpha_{t_j} / \bar\alpha_{t_{j-1}}` (:math:`\bar\alpha_{t_{-1}} = 1`),
        so the respaced forward process has the same marginals at the kept steps. ``timestep_map``
        composes: the result maps to the *original* training timesteps.

        Args:
            use_timesteps: indices into this schedule to keep (any order, duplicates ignored), or a
                :func:`space_timesteps` spec (a str such as "ddim50" / "fast27" / "10,10,3", or an int
                number of evenly spread steps), resolved against this schedule's length.
        """
        if isinstance(use_timesteps, (str, int)):
            use_timesteps = space_timesteps(self.num_timesteps, use_timesteps)
        keep = sorted({int(s) for s in use_timesteps})
        if not keep:
            raise ValueError("use_timesteps is empty: keep at least one timestep")
        if keep[0] < 0 or keep[-1] >= self.num_timesteps:
            raise ValueError(
                f"use_timesteps must lie in [0, {self.num_timesteps}), got values in [{keep[0]}, {keep[-1]}]"
            )
        idx = torch.tensor(keep, dtype=torch.long, device=self.betas.device)
        abar = self.alphas_cumprod[idx]
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        return NoiseSchedule(1.0 - abar / abar_prev, self.timestep_map[idx])

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """A copy with every tensor on ``device`` (dtypes kept: float64 and long)."""
        out = NoiseSchedule.__new__(NoiseSchedule)
        for k, v in vars(self).items():
            setattr(out, k, v.to(device, copy=True) if isinstance(v, torch.Tensor) else v)
        return out

    def __repr__(self) -> str:
        ab, tm = self.alphas_cumprod, self.timestep_map
        if ab.device.type == "meta":
            return f"NoiseSchedule(num_timesteps={self.num_timesteps}, device=meta)"
        return (
            f"NoiseSchedule(num_timesteps={self.num_timesteps}, "
            f"alphas_cumprod=[{ab[0].item():.6g} .. {ab[-1].item():.6g}], "
            f"timesteps=[{tm[0].item()} .. {tm[-1].item()}], device={ab.device})"
        )

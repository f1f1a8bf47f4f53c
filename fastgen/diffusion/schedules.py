r"""Noise schedules and timestep respacing (float64 math, like the reference implementations).

* ``betas_for_schedule``: "linear" (Ho et al. 2020, scaled to T as in ADM), "cosine" (Nichol & Dhariwal
  2021), "scaled_linear" (Stable Diffusion).
* ``space_timesteps``: ADM / GLIDE respacing strings ("100", "ddim50", "fast27", "10,10,3,2,2").
* ``spaced_timesteps``: the "linspace" / "leading" / "trailing" spacings of today's schedulers.
* ``NoiseSchedule``: \bar\alpha, posterior coefficients, and respacing (ADM's SpacedDiffusion rule:
  the kept timesteps keep their \bar\alpha and the betas are recomputed as 1 - \bar\alpha_i/\bar\alpha_{i-1}).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def betas_for_schedule(
    name: str,
    num_timesteps: int,
    *,
    beta_start: float | None = None,
    beta_end: float | None = None,
    max_beta: float = 0.999,
) -> torch.Tensor:
    """(T,) float64 betas.

    linear: linspace(1e-4 * 1000/T, 0.02 * 1000/T) (or linspace(beta_start, beta_end));
    cosine: beta_i = min(1 - f((i+1)/T)/f(i/T), max_beta), f(u) = cos((u + 0.008)/1.008 * pi/2)^2;
    scaled_linear: linspace(sqrt(beta_start), sqrt(beta_end))^2, defaults 0.00085 and 0.012.
    """
    if not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
    t = num_timesteps
    if name == "linear":
        if beta_start is None and beta_end is None:
            scale = 1000.0 / t
            beta_start, beta_end = scale * 1e-4, scale * 0.02
        betas = torch.linspace(float(beta_start), float(beta_end), t, dtype=torch.float64)
    elif name in ("cosine", "squaredcos_cap_v2"):

        def f(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor(
            [min(1 - f((i + 1) / t) / f(i / t), max_beta) for i in range(t)], dtype=torch.float64
        )
    elif name == "scaled_linear":
        lo = 0.00085 if beta_start is None else float(beta_start)
        hi = 0.012 if beta_end is None else float(beta_end)
        betas = torch.linspace(lo**0.5, hi**0.5, t, dtype=torch.float64) ** 2
    else:
        raise ValueError(f"unknown schedule name {name!r}; expected linear, cosine or scaled_linear")
    if not ((betas > 0) & (betas <= 1)).all():
        raise ValueError(f"schedule {name!r} gives betas outside (0, 1]: check beta_start / beta_end")
    return betas


def space_timesteps(num_timesteps: int, section_counts: str | int | list[int]) -> list[int]:
    """Timesteps kept by ADM / GLIDE respacing, sorted ascending.

    ``section_counts``: an int or "N" (N evenly spread steps); "10,10,3,2,2" or a list (split [0, T) in
    equal parts, the first T % parts one longer, and take that many evenly spread steps from each);
    "ddimN" (the stride s with len(range(0, T, s)) == N); "fast27" (GLIDE: "10,10,3,2,2" with T-1
    replaced by T-3, to avoid the noisiest step).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = int(section_counts[4:])
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == want:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {want} steps with a fixed stride from {num_timesteps}")
        if section_counts.startswith("fast"):
            if section_counts != "fast27":
                raise ValueError(f"unknown respacing {section_counts!r}; only 'fast27' is defined (GLIDE)")
            steps = set(space_timesteps(num_timesteps, "10,10,3,2,2"))
            steps.discard(num_timesteps - 1)
            steps.add(num_timesteps - 3)
            return sorted(steps)
        try:
            counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise ValueError(f"cannot parse respacing {section_counts!r}") from None
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(x) for x in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"section counts must be positive, got {counts}")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size} (T={num_timesteps})")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        kept += [start + round(k * stride) for k in range(count)]
        start += size
    return sorted(set(kept))


def spaced_timesteps(
    num_timesteps: int, num_inference_steps: int, spacing: str = "leading", steps_offset: int = 0
) -> list[int]:
    """Descending inference timesteps: "linspace" (round(linspace(0, T-1, n))), "leading"
    (arange(n) * (T // n) + offset), "trailing" (round(arange(T, 0, -T/n)) - 1)."""
    if not 1 <= num_inference_steps <= num_timesteps:
        raise ValueError(f"num_inference_steps must be in [1, {num_timesteps}], got {num_inference_steps}")
    n, t = num_inference_steps, num_timesteps
    if spacing == "linspace":
        steps = torch.linspace(0, t - 1, n, dtype=torch.float64).round().long().tolist()
    elif spacing == "leading":
        steps = [k * (t // n) + steps_offset for k in range(n)]
    elif spacing == "trailing":
        steps = (torch.arange(t, 0, -t / n, dtype=torch.float64).round() - 1).long().tolist()
    else:
        raise ValueError(f"unknown spacing {spacing!r}; expected linspace, leading or trailing")
    if any(not 0 <= s < t for s in steps):
        raise ValueError(f"steps_offset={steps_offset} puts timesteps outside [0, {t})")
    return sorted(steps, reverse=True)


class NoiseSchedule:
    """A discrete-time Gaussian diffusion schedule (float64).

    Attributes (all (T,) tensors): ``betas``, ``alphas_cumprod``, ``alphas_cumprod_prev`` (1 first),
    ``posterior_variance``, ``posterior_log_variance_clipped`` (t=0 entry from t=1, as ADM),
    ``posterior_mean_coef1/2``, ``timestep_map`` (index -> original model timestep), ``sigmas``.
    """

    def __init__(self, betas: torch.Tensor, timestep_map: torch.Tensor | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or betas.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = betas.numel()
        self.alphas_cumprod = torch.cumprod(1.0 - betas, 0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        ac, acp = self.alphas_cumprod, self.alphas_cumprod_prev
        self.posterior_variance = betas * (1.0 - acp) / (1.0 - ac)
        pv = self.posterior_variance
        first = pv[1:2] if self.num_timesteps > 1 else pv[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, pv[1:]]))
        self.posterior_mean_coef1 = betas * acp.sqrt() / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - acp) * (1.0 - betas).sqrt() / (1.0 - ac)
        if timestep_map is None:
            timestep_map = torch.arange(self.num_timesteps)
        self.timestep_map = torch.as_tensor(timestep_map, dtype=torch.long, device=betas.device)
        if self.timestep_map.shape != betas.shape:
            raise ValueError("timestep_map must have one entry per timestep")

    @classmethod
    def from_name(cls, name: str, num_timesteps: int = 1000, **kw) -> NoiseSchedule:
        return cls(betas_for_schedule(name, num_timesteps, **kw))

    @property
    def sigmas(self) -> torch.Tensor:
        """Karras / Euler noise levels sqrt((1 - abar) / abar)."""
        return ((1.0 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    def respace(self, use_timesteps: Iterable[int] | str | int) -> NoiseSchedule:
        """Keep only ``use_timesteps`` (indices into this schedule, or a ``space_timesteps`` spec)."""
        if isinstance(use_timesteps, (str, int)):
            use_timesteps = space_timesteps(self.num_timesteps, use_timesteps)
        keep = sorted({int(t) for t in use_timesteps})
        if not keep or keep[0] < 0 or keep[-1] >= self.num_timesteps:
            raise ValueError(f"timesteps to keep must lie in [0, {self.num_timesteps}), got {keep[:3]}...")
        idx = torch.tensor(keep, device=self.betas.device)
        abar = self.alphas_cumprod[idx]
        prev = torch.cat([abar.new_ones(1), abar[:-1]])
        return NoiseSchedule(1.0 - abar / prev, self.timestep_map[idx])

    def to(self, device: torch.device | str) -> NoiseSchedule:
        out = NoiseSchedule.__new__(NoiseSchedule)
        for k, v in self.__dict__.items():
            out.__dict__[k] = v.to(device) if isinstance(v, torch.Tensor) else v
        return out

    def __repr__(self) -> str:
        ab = self.alphas_cumprod
        return (
            f"NoiseSchedule(T={self.num_timesteps}, alphas_cumprod=[{ab[0].item():.6g} .. {ab[-1].item():.6g}], "
            f"timesteps=[{self.timestep_map[0].item()} .. {self.timestep_map[-1].item()}])"
        )

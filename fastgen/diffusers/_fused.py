"""What every ``fastgen.diffusers`` scheduler shares: the fused-step call, the per-step coefficient cache,
guidance on the doubled batch and the construction-time check of the config.

Each scheduler subclasses diffusers' own class, so that config handling, ``set_timesteps``, sigmas,
``scale_model_input`` and ``add_noise`` are diffusers' code (identical timesteps by construction), and
replaces ``step`` by ONE ``fastgen.sampler_step`` call whose 16 per-step scalars (see
``fastgen.ops.diffusion_step``) express diffusers' update for that step. The scalars are computed in
float64 on the host from the scheduler's own (float32) schedule values, once per step and schedule, and
are kept on the sample's device, so a later sampling loop costs no host-to-device copy.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from fastgen.ops import diffusion_step as D


def unsupported(scheduler: str, option: str, value: Any, why: str) -> ValueError:
    return ValueError(f"fastgen.diffusers.{scheduler}: {option}={value!r} is not supported: {why}")


def fastgen_init(parent_init, check):
    """Wraps diffusers' (config-registering) ``__init__``: same signature for ``from_config``, plus the
    check that refuses, at construction, an option the fused step cannot serve."""

    @functools.wraps(parent_init)
    def __init__(self, *args, **kwargs):
        parent_init(self, *args, **kwargs)
        check(self.config)
        self._fg_coeffs = {}

    return __init__


def conversion(pred: str, a: float, s: float, k: float = 1.0) -> dict[int, float]:
    """x0 / eps coefficients from (x, model_output) for a sample with ``k x = a x0 + s eps``; the post-clip
    eps re-derivation ``eps = (k x - a x0) / s`` goes in EX2 / EX0."""
    if pred == "epsilon":
        c = {D.AX: k / a, D.AM: -s / a, D.EX: 0.0, D.EM: 1.0}
    elif pred == "sample":
        c = {D.AX: 0.0, D.AM: 1.0, D.EX: k / s, D.EM: -a / s}
    else:  # v_prediction: v = a eps - s x0
        c = {D.AX: a * k, D.AM: -s, D.EX: s * k, D.EM: a}
    c[D.EX2] = k / s if s > 0 else 0.0
    c[D.EX0] = -a / s if s > 0 else 0.0
    return c


def _div(a: float, b: float) -> float:
    """a / b with IEEE semantics (a float division by zero raises in Python): what torch computes."""
    if b != 0:
        return a / b
    return math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a)


def safe_conversion(pred: str, a: float, s: float, k: float = 1.0) -> dict[int, float]:
    """``conversion`` where a = 0 (zero terminal SNR) or s = 0 give inf / NaN as torch's division does."""
    if a != 0 and s != 0:
        return conversion(pred, a, s, k)
    if pred == "epsilon":
        c = {D.AX: _div(k, a), D.AM: _div(-s, a), D.EX: 0.0, D.EM: 1.0}
    elif pred == "sample":
        c = {D.AX: 0.0, D.AM: 1.0, D.EX: _div(k, s), D.EM: _div(-a, s)}
    else:
        c = {D.AX: a * k, D.AM: -s, D.EX: s * k, D.EM: a}
    c[D.EX2], c[D.EX0] = _div(k, s), _div(-a, s)
    return c


def pack(values: dict[int, float]) -> torch.Tensor:
    out = torch.zeros(D.NUM_COEFFS, dtype=torch.float64)
    for i, v in values.items():
        out[i] = v
    return out


def cached_coeffs(sched: Any, key: tuple, device: torch.device, build) -> torch.Tensor:
    """The (16,) coefficients of one step on ``device``, built once per step key and schedule."""
    cache = sched._fg_coeffs
    k = (*key, device)
    hit = cache.get(k)
    if hit is None:
        hit = cache[k] = pack(build()).to(device)
    return hit


def host_timestep(sched: Any, timestep: Any) -> int:
    """A discrete timestep as a Python int. An element of ``sched.timesteps`` on a GPU is read from the host
    copy made at ``set_timesteps`` (through its storage offset), so the step does not synchronise."""
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() != 1:
            raise ValueError(f"timestep must be a scalar, got a tensor of shape {tuple(timestep.shape)}")
        ts = getattr(sched, "timesteps", None)
        host = getattr(sched, "_fg_host_timesteps", None)
        if (
            timestep.device.type != "cpu"
            and host is not None
            and isinstance(ts, torch.Tensor)
            and ts.device == timestep.device
            and ts.ndim == 1
            and ts.stride(0) == 1
            and timestep.untyped_storage().data_ptr() == ts.untyped_storage().data_ptr()
        ):
            i = timestep.storage_offset() - ts.storage_offset()
            if 0 <= i < len(host):
                return host[i]
        timestep = timestep.item()
    return int(timestep)


def remember_timesteps(sched: Any) -> None:
    """Called after diffusers' ``set_timesteps``. Pipelines call it before every generation: the per-step
    coefficients are kept while the schedule (timesteps and sigmas) is the same, and dropped otherwise."""
    ts = getattr(sched, "timesteps", None)
    sched._fg_host_timesteps = ts.tolist() if isinstance(ts, torch.Tensor) else None
    sigmas = getattr(sched, "sigmas", None)
    fingerprint = (
        tuple(sched._fg_host_timesteps or ()),
        tuple(sigmas.tolist()) if isinstance(sigmas, torch.Tensor) else None,
        getattr(sched, "num_inference_steps", None),
    )
    if getattr(sched, "_fg_fingerprint", None) != fingerprint:
        sched._fg_coeffs = {}
        sched._fg_fingerprint = fingerprint


def split_guidance(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    guidance_scale: float | None,
    guidance_rescale: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(cond, uncond) from a pipeline's doubled batch ``[uncond; text]`` (the order of diffusers'
    ``noise_pred.chunk(2)``), or (model_output, None) without guidance."""
    if guidance_scale is None:
        if guidance_rescale:
            raise ValueError(f"guidance_rescale={guidance_rescale!r} needs guidance_scale")
        return model_output, None
    b = sample.shape[0]
    if model_output.shape[0] != 2 * b:
        raise ValueError(
            f"with guidance_scale, model_output must be the doubled batch [uncond; text] of {2 * b} rows for a "
            f"sample of batch {b}, got shape {tuple(model_output.shape)}"
        )
    return model_output[b:], model_output[:b]


def guided_ref(cond: torch.Tensor, uncond: torch.Tensor | None, guidance_scale, guidance_rescale: float):
    """Classifier-free guidance as diffusers' pipelines compute it (``rescale_noise_cfg`` included)."""
    if uncond is None:
        return cond
    cfg = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale > 0:
        dims = list(range(1, cond.ndim))
        rescaled = cfg * (cond.std(dim=dims, keepdim=True) / cfg.std(dim=dims, keepdim=True))
        cfg = guidance_rescale * rescaled + (1.0 - guidance_rescale) * cfg
    return cfg


def check_learned_channels(model_output: torch.Tensor, sample: torch.Tensor) -> None:
    c = sample.shape[1]
    if model_output.ndim < 2 or model_output.shape[1] != 2 * c:
        raise ValueError(
            f"variance_type='learned_range' needs model_output with 2 x {c} channels ([eps; variance]), got "
            f"shape {tuple(model_output.shape)}"
        )


def draw_noise(model_output: torch.Tensor, generator, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Noise drawn exactly as diffusers' schedulers draw it (same call, same generator state)."""
    return randn_tensor(
        model_output.shape, generator=generator, device=model_output.device, dtype=dtype or model_output.dtype
    )


def threshold_args(config: Any) -> dict[str, Any]:
    """``sampler_step`` keywords for diffusers' ``thresholding`` / ``clip_sample`` (thresholding wins)."""
    if config.get("thresholding", False):
        return {"dynamic_threshold": (config.dynamic_thresholding_ratio, config.sample_max_value)}
    if config.get("clip_sample", False):
        return {"clip_sample": config.clip_sample_range}
    return {}


def check_threshold_config(name: str, config: Any) -> None:
    if config.get("thresholding", False):
        r, m = config.dynamic_thresholding_ratio, config.sample_max_value
        if not 0.0 < r <= 1.0:
            raise unsupported(name, "dynamic_thresholding_ratio", r, "the quantile ratio must be in (0, 1]")
        if not m >= 1.0:
            raise unsupported(name, "sample_max_value", m, "the threshold's upper bound must be >= 1")
    elif config.get("clip_sample", False) and not config.clip_sample_range > 0:
        raise unsupported(name, "clip_sample_range", config.clip_sample_range, "the clip range must be > 0")


def fused(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    coeffs: torch.Tensor,
    *,
    uncond: torch.Tensor | None = None,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    noise: torch.Tensor | None = None,
    prev: torch.Tensor | None = None,
    learned_variance: bool = False,
    **clip: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``fastgen.sampler_step`` pass; returns (prev_sample, the x0 slot)."""
    return D.sampler_step(
        sample,
        model_output,
        coeffs,
        uncond_output=uncond,
        guidance_scale=guidance_scale if uncond is not None else None,
        guidance_rescale=guidance_rescale if uncond is not None else 0.0,
        learned_variance=learned_variance,
        needs_noise=noise is not None,
        noise=noise,
        prev_x0=prev,
        **clip,
    )

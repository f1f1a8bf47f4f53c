r"""Fused diffusion sampling steps: classifier-free guidance + prediction conversion + clipping or
dynamic thresholding + the sampler update + noise, in ONE pass over the latent.

Every sampler step supported here has the same shape once its per-step scalars are known. With ``x``
the current sample, ``c``/``u`` the conditional / unconditional model outputs and ``g`` the guidance
scale, for every element::

    m   = u + g (c - u)                      # classifier-free guidance (m = c without guidance)
    m   = m * r_b                            # optional guidance rescale, r_b per sample
    x0  = AX x + AM m                        # prediction type -> x0 (epsilon / sample / v)
    eps = EX x + EM m                        #                 -> eps
    x0  = x0 (1 - K) + I K                   # optional inpainting: known image I where the mask K is 1
    x0  = clamp(x0, -C, C)                   # static clip, or dynamic thresholding:
    x0  = clamp(x0, -s_b, s_b) / s_b         #   s_b = max(1, percentile_p(|x0_b|)) (Imagen)
    eps = EX2 x + EX0 x0                     # after inpainting / clipping, eps is re-derived from x0
    x'  = CX x + CX0 x0 + CEPS eps + CPREV x0_prev + sd^2 gs grad + NOISE_MASK * sd * z
    sd  = SIGMA, or exp(0.5 (f MAXLOG + (1 - f) MINLOG)), f = (v + 1) / 2  (learned range, GLIDE/ADM)

``sd^2 gs grad`` is the optional guidance-gradient shift of the mean (GLIDE's CLIP guidance,
``condition_mean``), applied also at the last step; the inpainting replacement is GLIDE's ``denoised_fn``.

The 16 per-step scalars (``coeffs``) are computed by the sampler-specific builders below from the
schedule *on the device* (float64, then float32), so a step never synchronises with the host and a
whole sampling loop can be captured in a CUDA graph. Samplers precompute them for every step.

Samplers (``alphas_cumprod`` is the \bar\alpha of the (possibly respaced) schedule; ``t`` indexes it):

* DDPM (Ho et al. 2020; Nichol & Dhariwal 2021 for the learned-range variance): posterior mean
  ``coef1 x0 + coef2 x``, variance fixed-small (posterior), fixed-large (beta) or learned-range.
* DDIM (Song et al. 2021): ``x' = sqrt(a') x0 + sqrt(1 - a' - s^2) eps + s z`` with
  ``s = eta sqrt((1 - a')/(1 - a)) sqrt(1 - a/a')``.
* Euler / Euler ancestral (Karras et al. 2022, k-diffusion), in sigma space ``x = x0 + sigma eps``
  with ``sigma = sqrt((1 - a)/a)``; the model sees ``x / sqrt(sigma^2 + 1)``.
* DPM-Solver++(2M) (Lu et al. 2022), data-prediction multistep, midpoint form, first order on the first
  and the last step.

Noise comes either as a tensor or from a counter-based generator keyed by (seed, sample index, step,
element) so that a sample does not change with the batch size or the backend (see ``counter_normal``).

Backends (see ``python -m fastgen.info``): cuda (csrc/diffusion_step/*_cuda.cu), triton (below),
cpp (csrc/diffusion_step/*_cpu.cpp), torch (the same math in PyTorch ops, any device / dtype).

The per-step functions (``ddpm_step``, ``ddim_step``, ...) take timesteps as Python / numpy ints or
one-element integer tensors, ``alphas_cumprod`` in (0, 1] and non-increasing (only its last value may be
0: zero terminal SNR), checked once per schedule; their coefficients are cached per schedule (see
``_schedule``). A repeated eager call of the common kind (Python int timesteps, plain str / int / float
options, contiguous tensors of one kernel dtype) on an unchanged schedule takes a fast lane that skips
the checks it already passed (~9 us of Python over the kernel on a CPU instead of ~25); anything else takes
the full path, which raises every error. NaN propagates as in the references: a NaN in a sample's x0 makes that element NaN, and
under dynamic thresholding the whole sample (its threshold is NaN, as torch.quantile's). Empty batches
or samples give empty results.
"""

from __future__ import annotations

import math
import numbers
import operator
import weakref
from collections.abc import Callable
from typing import Any

import torch

from fastgen import _backend, _ext
from fastgen._backend import Call

try:  # triton is optional (not on every platform)
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None
    tl = None

# ---- coefficient layout (shared with csrc/diffusion_step/diffusion_step.h) ---------------------------
AX, AM, EX, EM, EX2, EX0, CX, CX0, CEPS, CPREV, SIGMA, MINLOG, MAXLOG, NOISE_MASK, RNG_STEP = range(15)
NUM_COEFFS = 16

PREDICTION_TYPES = {
    "epsilon": "epsilon",
    "eps": "epsilon",
    "sample": "sample",
    "x0": "sample",
    "v_prediction": "v_prediction",
    "v": "v_prediction",
}
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

OP = _backend.get_op("diffusion_step", "fused diffusion sampler step (CFG + x0/eps + clip + update + noise)")


# =====================================================================================================
# Counter-based normal generator
# =====================================================================================================
_M32 = 0xFFFFFFFF


def _mul32(h: Any, c: int) -> Any:
    # (h * c) mod 2^32 without int64 overflow: split the constant in 16-bit halves.
    return ((h * (c & 0xFFFF)) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(h: Any) -> Any:
    """MurmurHash3's 32-bit finaliser, on Python ints or int64 tensors holding uint32 values."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def op_seed(seed: int) -> int:
    """The seed as the op's int64 argument: its low 64 bits, the bit pattern kept (>= 2^63 wraps negative)."""
    seed &= 0xFFFFFFFFFFFFFFFF
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def _split_seed(seed: int) -> tuple[int, int]:
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return seed & _M32, seed >> 32


def _counter_normal_torch(
    seed: int, step: int | torch.Tensor, samples: torch.Tensor, n: int, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """(len(samples), n) standard normals; ``samples`` are global sample indices (int64 tensor).

    Bit-exact hashing with the kernels; Box-Muller in ``dtype``. Works on any device without syncing
    (``step`` may be a device tensor).
    """
    seed_lo, seed_hi = _split_seed(seed)
    dev = samples.device
    base0 = _fmix32(_fmix32(seed_lo ^ 0x243F6A88) ^ seed_hi)
    step_t = (int(step) & _M32) if isinstance(step, int) else (step.to(torch.int64) & _M32)
    base = _fmix32(base0 ^ (samples.to(torch.int64) & _M32))
    base = _fmix32(base ^ step_t)
    k0 = _fmix32(base ^ 0x13198A2E)[:, None]
    k1 = _fmix32(base ^ 0x03707344)[:, None]
    i = torch.arange(n, device=dev, dtype=torch.int64)
    c0 = (i >> 1) * 2
    h0 = _fmix32(_fmix32((c0 + k0) & _M32) ^ k1)
    h1 = _fmix32(_fmix32((c0 + 1 + k0) & _M32) ^ k1)
    u1 = ((h0 >> 8) + 1).to(dtype) * 2.0**-24
    u2 = (h1 >> 8).to(dtype) * 2.0**-24
    r = torch.sqrt(-2.0 * torch.log(u1))
    theta = (2.0 * math.pi) * u2
    return torch.where((i & 1).bool(), r * torch.sin(theta), r * torch.cos(theta))


def counter_normal_ref(
    shape: tuple[int, ...], seed: int, step: int = 0, sample_offset: int = 0, device: Any = "cpu"
) -> torch.Tensor:
    """Reference for the counter-based generator, float64, ``shape = (batch, ...)``.

    Element ``i`` (row-major within a sample) of sample ``b`` depends only on
    ``(seed, sample_offset + b, step, i)``. Hash: MurmurHash3 fmix32 chain; pairs of elements share two
    hashes and take the cos / sin halves of one Box-Muller transform.
    """
    b = shape[0]
    n = math.prod(shape[1:])
    samples = torch.arange(b, device=device, dtype=torch.int64) + sample_offset
    return _counter_normal_torch(seed, step, samples, n).reshape(shape)


# =====================================================================================================
# Per-step coefficients (on the schedule's device, float64 -> float32; no host sync)
# =====================================================================================================


def _take(abar: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    """abar[t] as a 0-d / (k,) float64 tensor, with abar[-1] := 1 (the state before the first noise)."""
    if isinstance(t, int):
        return abar[t] if t >= 0 else abar.new_ones(())
    t = t.to(abar.device)
    return torch.where(t >= 0, abar[t.clamp(min=0)], torch.ones_like(abar[0]))


def _num(t: int | torch.Tensor) -> float | torch.Tensor:
    """A timestep as a float64 value without a host->device copy for Python ints."""
    return float(t) if isinstance(t, int) else t.to(torch.float64)


def _conversion(pred: str, k: Any, a: Any, s: Any) -> dict[int, Any]:
    """x0 / eps from (x, m) for sample ``x`` with ``x_vp = k x = a x0 + s eps``."""
    if pred == "epsilon":
        conv = {AX: k / a, AM: -s / a, EX: 0.0, EM: 1.0}
    elif pred == "sample":
        conv = {AX: 0.0, AM: 1.0, EX: k / s, EM: -a / s}
    else:  # v = a eps - s x0
        conv = {AX: a * k, AM: -s, EX: s * k, EM: a}
    conv[EX2] = k / s
    conv[EX0] = -a / s
    return conv


def _pack(values: dict[int, Any], like: torch.Tensor) -> torch.Tensor:
    """Stack the coefficient dict into a float64 (..., 16) tensor on ``like``'s device.

    ``sampler_step`` casts to float32 for float32/16/bf16 samples (the kernels' coefficient type).
    """
    shape = torch.broadcast_shapes(*[v.shape for v in values.values() if isinstance(v, torch.Tensor)])
    out = like.new_zeros((*shape, NUM_COEFFS), dtype=torch.float64)
    for idx, v in values.items():
        out[..., idx] = v
    return out


def ddpm_coeffs(
    alphas_cumprod: torch.Tensor, t: int | torch.Tensor, prediction_type: str, variance_type: str
) -> torch.Tensor:
    """DDPM ancestral step t -> t-1 over ``alphas_cumprod`` (betas derived as 1 - a_t / a_{t-1})."""
    abar = alphas_cumprod.to(torch.float64)
    a_t = _take(abar, t)
    tp = t - 1
    a_p = _take(abar, tp)
    beta = 1.0 - a_t / a_p
    coef1 = beta * a_p.sqrt() / (1.0 - a_t)
    coef2 = (1.0 - a_p) * (1.0 - beta).sqrt() / (1.0 - a_t)
    post_var = beta * (1.0 - a_p) / (1.0 - a_t)
    # log posterior variance, clipped: at t = 0 the posterior variance is 0; ADM uses the t = 1 value.
    a_1 = abar[1] if abar.numel() > 1 else abar[0]
    post_var_1 = (1.0 - a_1 / abar[0]) * (1.0 - abar[0]) / (1.0 - a_1)
    if isinstance(t, int):
        min_log = torch.log(post_var_1) if t == 0 else torch.log(post_var)
        large = post_var_1 if t == 0 else beta
    else:
        min_log = torch.where(t == 0, torch.log(post_var_1), torch.log(post_var))
        large = torch.where(t == 0, post_var_1, beta)
    vals = _conversion(prediction_type, 1.0, a_t.sqrt(), (1.0 - a_t).sqrt())
    vals.update({CX: coef2, CX0: coef1, MINLOG: min_log, MAXLOG: torch.log(beta)})
    if variance_type == "fixed_small":
        vals[SIGMA] = min_log.mul(0.5).exp()
    elif variance_type == "fixed_large":
        vals[SIGMA] = large.sqrt()
    vals[NOISE_MASK] = float(t > 0) if isinstance(t, int) else (t > 0).to(torch.float64)
    vals[RNG_STEP] = _num(t)
    return _pack(vals, abar)


def ddim_coeffs(
    alphas_cumprod: torch.Tensor,
    t: int | torch.Tensor,
    t_prev: int | torch.Tensor,
    eta: float,
    prediction_type: str,
) -> torch.Tensor:
    abar = alphas_cumprod.to(torch.float64)
    a_t, a_p = _take(abar, t), _take(abar, t_prev)
    sigma = eta * ((1.0 - a_p) / (1.0 - a_t)).sqrt() * (1.0 - a_t / a_p).sqrt()
    vals = _conversion(prediction_type, 1.0, a_t.sqrt(), (1.0 - a_t).sqrt())
    vals.update(
        {
            CX0: a_p.sqrt(),
            CEPS: (1.0 - a_p - sigma * sigma).clamp(min=0.0).sqrt(),
            SIGMA: sigma,
            NOISE_MASK: 1.0,
            RNG_STEP: _num(t),
        }
    )
    return _pack(vals, abar)


def _karras_sigma(abar: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    a = _take(abar, t)
    return ((1.0 - a) / a).sqrt()


def euler_coeffs(
    alphas_cumprod: torch.Tensor,
    t: int | torch.Tensor,
    t_prev: int | torch.Tensor,
    prediction_type: str,
    ancestral: bool = False,
) -> torch.Tensor:
    abar = alphas_cumprod.to(torch.float64)
    a_t = _take(abar, t)
    sig, sig_p = _karras_sigma(abar, t), _karras_sigma(abar, t_prev)
    # x is in sigma space; k maps it to the VP space: x_vp = x / sqrt(sigma^2 + 1) = sqrt(a) x.
    vals = _conversion(prediction_type, a_t.sqrt(), a_t.sqrt(), (1.0 - a_t).sqrt())
    vals[CX] = 1.0
    vals[RNG_STEP] = _num(t)
    if ancestral:
        sig_up = (sig_p**2 * (sig**2 - sig_p**2) / sig**2).clamp(min=0.0).sqrt()
        sig_down = (sig_p**2 - sig_up**2).clamp(min=0.0).sqrt()
        vals.update({CEPS: sig_down - sig, SIGMA: sig_up, NOISE_MASK: 1.0})
    else:
        vals[CEPS] = sig_p - sig
    return _pack(vals, abar)


def dpm_solver_2m_coeffs(
    alphas_cumprod: torch.Tensor,
    t: int | torch.Tensor,
    t_prev: int | torch.Tensor,
    t_last: int | torch.Tensor | None,
    prediction_type: str,
) -> torch.Tensor:
    """DPM-Solver++(2M) from ``t`` to ``t_prev`` using x0 at ``t`` and at ``t_last`` (the step before).

    First order when ``t_last`` is None or ``t_prev < 0`` (the final step, to sigma = 0).
    """
    abar = alphas_cumprod.to(torch.float64)
    a_s, a_t = _take(abar, t), _take(abar, t_prev)
    alpha_s, sigma_s = a_s.sqrt(), (1.0 - a_s).sqrt()
    alpha_t, sigma_t = a_t.sqrt(), (1.0 - a_t).sqrt()
    lam_s = torch.log(alpha_s / sigma_s)
    lam_t = torch.log(alpha_t) - torch.log(sigma_t)  # +inf at the final step
    phi = torch.expm1(-(lam_t - lam_s))  # exp(-h) - 1
    vals = _conversion(prediction_type, 1.0, alpha_s, sigma_s)
    vals[CX] = sigma_t / sigma_s
    first = -alpha_t * phi
    if t_last is None or (isinstance(t_prev, int) and t_prev < 0):
        vals[CX0] = first
    else:
        a_l = _take(abar, t_last)
        lam_l = torch.log(a_l.sqrt() / (1.0 - a_l).sqrt())
        r0 = (lam_s - lam_l) / (lam_t - lam_s)
        if isinstance(t_prev, int):
            vals[CX0] = first * (1.0 + 0.5 / r0)
            vals[CPREV] = alpha_t * phi * 0.5 / r0
        else:  # the final step (t_prev = -1) is first order
            final = t_prev < 0
            vals[CX0] = torch.where(final, first, first * (1.0 + 0.5 / r0))
            vals[CPREV] = torch.where(final, torch.zeros_like(first), alpha_t * phi * 0.5 / r0)
    vals[RNG_STEP] = _num(t)
    return _pack(vals, abar)


# =====================================================================================================
# Backends. All take the same arguments (see _sampler_step_op) on (B, N)-flattened tensors.
# =====================================================================================================


def _step_torch(x, cond, uncond, uoff, coeffs, prev_x0, noise, row_scale, thresh, g, clip, var_mode,
                noise_mode, seed, sample_offset, want_x0, x0_only, known=None, keep=None, grad=None,
                grad_scale=0.0):  # fmt: skip
    """The fused step's math in PyTorch ops (any device, any float dtype incl. float64)."""
    b, n = x.shape
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    cf = coeffs.to(ct)
    xv = x.to(ct)
    m = cond[:b, :n].to(ct)
    if uncond is not None:
        u = uncond[uoff : uoff + b, :n].to(ct)
        m = u + g * (m - u)
    if row_scale is not None:
        m = m * row_scale.to(ct)[:, None]
    x0 = cf[AX] * xv + cf[AM] * m
    eps = cf[EX] * xv + cf[EM] * m
    if known is not None:  # inpainting (GLIDE's denoised_fn): the known region, before clipping
        kp = keep.to(ct)
        x0 = x0 * (1.0 - kp) + known.to(ct) * kp
    if clip > 0 or thresh is not None or known is not None:
        if clip > 0:
            x0 = x0.clamp(-clip, clip)
        elif thresh is not None:
            s = thresh.to(ct)[:, None]
            x0 = torch.minimum(torch.maximum(x0, -s), s) / s
        eps = cf[EX2] * xv + cf[EX0] * x0
    empty = x.new_empty(0)
    if x0_only:
        return empty, x0.abs().to(torch.float32)
    xp = cf[CX] * xv + cf[CX0] * x0 + cf[CEPS] * eps
    if prev_x0 is not None:
        xp = xp + cf[CPREV] * prev_x0.to(ct)
    if grad is not None:  # guidance shift of the mean (GLIDE's condition_mean), also at t = 0
        if var_mode == 1:
            f = (cond[:b, n : 2 * n].to(ct) + 1.0) * 0.5
            var = torch.exp(f * cf[MAXLOG] + (1.0 - f) * cf[MINLOG])
        else:
            var = cf[SIGMA] * cf[SIGMA]
        xp = xp + var * grad_scale * grad.to(ct)
    if noise_mode != 0:
        if noise_mode == 1:
            z = noise.to(ct)
        else:
            samples = torch.arange(b, device=x.device, dtype=torch.int64) + sample_offset
            z = _counter_normal_torch(seed, cf[RNG_STEP], samples, n, dtype=ct)
        if var_mode == 1:
            f = (cond[:b, n : 2 * n].to(ct) + 1.0) * 0.5
            sd = torch.exp(0.5 * (f * cf[MAXLOG] + (1.0 - f) * cf[MINLOG]))
        else:
            sd = cf[SIGMA]
        xp = xp + cf[NOISE_MASK] * sd * z
    return xp.to(x.dtype), (x0.to(x.dtype) if want_x0 else empty)


if triton is not None:

    @triton.jit
    def _fmix32_tl(h):
        h = h ^ (h >> 16)
        h = h * 0x85EBCA6B
        h = h ^ (h >> 13)
        h = h * 0xC2B2AE35
        return h ^ (h >> 16)

    @triton.jit
    def _sampler_step_kernel(
        x_ptr, cond_ptr, uncond_ptr, coef_ptr, prev_ptr, noise_ptr, rscale_ptr, thresh_ptr, out_ptr, x0_ptr,
        known_ptr, keep_ptr, grad_ptr,
        N, Lc, Lu, uoff, g, clip, seed_lo, seed_hi, sample_offset, grad_scale,
        HAS_KNOWN: tl.constexpr, HAS_GRAD: tl.constexpr,
        HAS_UNCOND: tl.constexpr, HAS_RESCALE: tl.constexpr, CLIP_MODE: tl.constexpr,
        HAS_PREV: tl.constexpr, NOISE_MODE: tl.constexpr, VAR_MODE: tl.constexpr,
        WANT_X0: tl.constexpr, X0_ONLY: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # the batch is folded into grid x (grid y / z stop at 65,535): program = sample * blocks + block
        blocks = tl.cdiv(N, BLOCK)
        pid = tl.program_id(0) % blocks
        b = (tl.program_id(0) // blocks).to(tl.int64)
        i = pid * BLOCK + tl.arange(0, BLOCK)
        mask = i < N
        row = b * N
        xv = tl.load(x_ptr + row + i, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(cond_ptr + b * Lc + i, mask=mask, other=0.0).to(tl.float32)
        if HAS_UNCOND:
            u = tl.load(uncond_ptr + (b + uoff) * Lu + i, mask=mask, other=0.0).to(tl.float32)
            m = u + g * (m - u)
        if HAS_RESCALE:
            m = m * tl.load(rscale_ptr + b)
        x0 = tl.load(coef_ptr + 0) * xv + tl.load(coef_ptr + 1) * m
        eps = tl.load(coef_ptr + 2) * xv + tl.load(coef_ptr + 3) * m
        if HAS_KNOWN:  # inpainting: the known region replaces x0 before clipping
            img = tl.load(known_ptr + row + i, mask=mask, other=0.0).to(tl.float32)
            kp = tl.load(keep_ptr + row + i, mask=mask, other=0.0).to(tl.float32)
            x0 = x0 * (1.0 - kp) + img * kp
            if CLIP_MODE == 0:
                eps = tl.load(coef_ptr + 4) * xv + tl.load(coef_ptr + 5) * x0
        # NaN-propagating clamps, as torch.clamp: the default min / max return the non-NaN operand on GPUs
        if CLIP_MODE == 1:
            x0 = tl.maximum(x0, -clip, propagate_nan=tl.PropagateNan.ALL)
            x0 = tl.minimum(x0, clip, propagate_nan=tl.PropagateNan.ALL)
            eps = tl.load(coef_ptr + 4) * xv + tl.load(coef_ptr + 5) * x0
        if CLIP_MODE == 2:
            s = tl.load(thresh_ptr + b)
            x0 = tl.maximum(x0, -s, propagate_nan=tl.PropagateNan.ALL)
            x0 = tl.minimum(x0, s, propagate_nan=tl.PropagateNan.ALL) / s
            eps = tl.load(coef_ptr + 4) * xv + tl.load(coef_ptr + 5) * x0
        if X0_ONLY:
            tl.store(x0_ptr + row + i, tl.abs(x0), mask=mask)
        else:
            xp = tl.load(coef_ptr + 6) * xv + tl.load(coef_ptr + 7) * x0 + tl.load(coef_ptr + 8) * eps
            if HAS_PREV:
                pv = tl.load(prev_ptr + row + i, mask=mask, other=0.0).to(tl.float32)
                xp += tl.load(coef_ptr + 9) * pv
            if HAS_GRAD:  # guidance shift of the mean: + variance * scale * grad (also at t = 0)
                gr = tl.load(grad_ptr + row + i, mask=mask, other=0.0).to(tl.float32)
                if VAR_MODE == 1:
                    v = tl.load(cond_ptr + b * Lc + N + i, mask=mask, other=0.0).to(tl.float32)
                    f = (v + 1.0) * 0.5
                    var = tl.exp(f * tl.load(coef_ptr + 12) + (1.0 - f) * tl.load(coef_ptr + 11))
                else:
                    var = tl.load(coef_ptr + 10) * tl.load(coef_ptr + 10)
                xp += var * grad_scale * gr
            if NOISE_MODE != 0:
                if NOISE_MODE == 1:
                    z = tl.load(noise_ptr + row + i, mask=mask, other=0.0).to(tl.float32)
                else:
                    step = tl.load(coef_ptr + 14).to(tl.uint32)
                    base = _fmix32_tl(seed_lo.to(tl.uint32) ^ 0x243F6A88)
                    base = _fmix32_tl(base ^ seed_hi.to(tl.uint32))
                    base = _fmix32_tl(base ^ (b + sample_offset).to(tl.uint32))
                    base = _fmix32_tl(base ^ step)
                    k0 = _fmix32_tl(base ^ 0x13198A2E)
                    k1 = _fmix32_tl(base ^ 0x03707344)
                    c0 = ((i >> 1) * 2).to(tl.uint32)
                    h0 = _fmix32_tl(_fmix32_tl(c0 + k0) ^ k1)
                    h1 = _fmix32_tl(_fmix32_tl(c0 + 1 + k0) ^ k1)
                    u1 = ((h0 >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08
                    u2 = (h1 >> 8).to(tl.float32) * 5.9604644775390625e-08
                    r = tl.sqrt(-2.0 * tl.log(u1))
                    theta = 6.283185307179586 * u2
                    z = tl.where((i & 1) == 1, r * tl.sin(theta), r * tl.cos(theta))
                if VAR_MODE == 1:
                    v = tl.load(cond_ptr + b * Lc + N + i, mask=mask, other=0.0).to(tl.float32)
                    f = (v + 1.0) * 0.5
                    sd = tl.exp(0.5 * (f * tl.load(coef_ptr + 12) + (1.0 - f) * tl.load(coef_ptr + 11)))
                else:
                    sd = tl.load(coef_ptr + 10)
                xp += tl.load(coef_ptr + 13) * sd * z
            tl.store(out_ptr + row + i, xp.to(out_ptr.dtype.element_ty), mask=mask)
            if WANT_X0:
                tl.store(x0_ptr + row + i, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def _step_triton(x, cond, uncond, uoff, coeffs, prev_x0, noise, row_scale, thresh, g, clip, var_mode,
                 noise_mode, seed, sample_offset, want_x0, x0_only, known=None, keep=None, grad=None,
                 grad_scale=0.0):  # fmt: skip
    b, n = x.shape
    empty = x.new_empty(0)
    out = empty if x0_only else torch.empty_like(x)
    x0 = torch.empty((b, n), device=x.device, dtype=torch.float32 if x0_only else x.dtype)
    if not (want_x0 or x0_only):
        x0 = empty
    if b == 0 or n == 0:
        return out, x0
    seed_lo, seed_hi = _split_seed(seed)
    block = 1024 if n >= 1024 else max(16, triton.next_power_of_2(n))
    grid = (triton.cdiv(n, block) * b,)
    dummy = x  # never dereferenced when its feature flag is off
    _sampler_step_kernel[grid](
        x, cond, uncond if uncond is not None else dummy, coeffs,
        prev_x0 if prev_x0 is not None else dummy, noise if noise is not None else dummy,
        row_scale if row_scale is not None else coeffs, thresh if thresh is not None else coeffs,
        out if not x0_only else dummy, x0 if x0.numel() else dummy,
        known if known is not None else dummy, keep if keep is not None else dummy,
        grad if grad is not None else dummy,
        n, cond.shape[1], uncond.shape[1] if uncond is not None else 0, uoff, float(g), float(clip),
        seed_lo, seed_hi, sample_offset & _M32, float(grad_scale),
        HAS_KNOWN=known is not None, HAS_GRAD=grad is not None,
        HAS_UNCOND=uncond is not None, HAS_RESCALE=row_scale is not None,
        CLIP_MODE=1 if clip > 0 else (2 if thresh is not None else 0),
        HAS_PREV=prev_x0 is not None, NOISE_MODE=noise_mode, VAR_MODE=var_mode,
        WANT_X0=bool(want_x0 and not x0_only), X0_ONLY=bool(x0_only), BLOCK=block,
        num_warps=4,
    )  # fmt: skip
    return out, x0


def _step_cpp(*args):
    return _ext.C.sampler_step_cpu(*args)


def _step_cuda(*args):
    return _ext.C.sampler_step_cuda(*args)


def _check_sizes(call: Call) -> list[str]:
    if call.get("n", 0) >= 2**31:
        return [f"elements per sample {call['n']} >= 2^31"]
    return []


OP.register("cuda", devices=("cuda",), dtypes=KERNEL_DTYPES, available=_backend.cuda_available,
            check=_check_sizes, note="CUDA C++, 16-byte vectorized")(_step_cuda)  # fmt: skip
OP.register(
    "triton",
    devices=("cuda",),
    dtypes=KERNEL_DTYPES,
    available=_backend.triton_available,
    check=lambda call: _backend.triton_check_device(call) + _check_sizes(call),
    forced_only_devices=("cpu",),
)(_step_triton)
OP.register("cpp", devices=("cpu",), dtypes=KERNEL_DTYPES, available=_backend.cpp_available,
            check=_check_sizes, note="C++ at::parallel_for")(_step_cpp)  # fmt: skip
OP.register("torch", devices=("cpu", "cuda", "mps", "xpu"), dtypes=(*KERNEL_DTYPES, torch.float64))(
    _step_torch
)


# ---- torch.library registration: one custom op, traced by torch.compile without graph breaks --------


@torch.library.custom_op("fastgen::sampler_step", mutates_args=())
def _sampler_step_op(
    x: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    uncond_row_offset: int,
    coeffs: torch.Tensor,
    prev_x0: torch.Tensor | None,
    noise: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    thresh: torch.Tensor | None,
    guidance_scale: float,
    clip: float,
    var_mode: int,
    noise_mode: int,
    seed: int,
    sample_offset: int,
    want_x0: bool,
    x0_only: bool,
    known: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    grad: torch.Tensor | None = None,
    grad_scale: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    backend = OP.dispatch(Call(x.device, x.dtype, {"n": x.shape[1]}))
    out, x0 = backend.fn(x, cond, uncond, uncond_row_offset, coeffs, prev_x0, noise, row_scale, thresh,
                         guidance_scale, clip, var_mode, noise_mode, seed, sample_offset, want_x0, x0_only,
                         known, keep, grad, grad_scale)  # fmt: skip
    # custom ops must not return views of (or the same storage as) their inputs
    return out, x0


@_sampler_step_op.register_fake
def _(x, cond, uncond, uncond_row_offset, coeffs, prev_x0, noise, row_scale, thresh, guidance_scale, clip,
      var_mode, noise_mode, seed, sample_offset, want_x0, x0_only, known=None, keep=None, grad=None,
      grad_scale=0.0):  # fmt: skip
    empty = x.new_empty(0)
    if x0_only:
        return empty, torch.empty(x.shape, device=x.device, dtype=torch.float32)
    return torch.empty_like(x), (torch.empty_like(x) if want_x0 else empty)


# ---- eager calls skip the custom-op machinery ----------------------------------------------------------
#
# torch.library's Python custom op costs ~50 us per call on a CPU (autograd wrapper, redispatch), more than
# the whole kernel at sampling sizes. In plain eager mode the dispatched backend is called directly; the
# custom op serves everything that traces (torch.compile / export, FakeTensor and other dispatch modes,
# tensor subclasses), so compiled graphs still see one op.


def _dispatched(x: torch.Tensor, n: int | None = None) -> _backend.Backend:
    """``OP.dispatch`` for a step on ``x`` (B, N) (or of ``n`` elements per sample), remembered on what
    dispatch depends on: device, dtype, the size limit (and a forced backend, the Triton interpreter)."""
    n = x.shape[1] if n is None else n
    return OP.dispatch_remembered((x.device, x.dtype, n < 2**31), lambda: Call(x.device, x.dtype, {"n": n}))


def _nd_kernel(backend: _backend.Backend) -> Callable[..., Any] | None:
    """The C++ entry behind ``backend`` when it takes the caller's (B, ...) tensors as they are (the cpp and
    cuda backends: no view per operand, no Python frame), else None (then pass (B, N) views to its fn)."""
    fn = backend.fn
    if fn is _step_cpp:
        return _ext.C.sampler_step_cpu
    if fn is _step_cuda:
        return _ext.C.sampler_step_cuda
    return None


def run_eager(backend, x, mo, rows, uncond, uoff, coeffs, prev, noise, g, clip, var_mode, noise_mode, seed,
              sample_offset, want_x0, known=None, keep=None, grad=None, grad_scale=0.0):  # fmt: skip
    """One checked step on the dispatched ``backend`` (see :func:`eager_backend`) for x (B, ...) and the model
    output ``mo`` (``rows``, ...); the other operands like x (uncond: b rows, or ``mo`` with ``uoff`` = b).
    The C++ entries take the tensors as they are and return x_prev / pred_x0 shaped like x; the other
    backends get (B, N) views, and their outputs are viewed back."""
    kernel = _nd_kernel(backend)
    if kernel is not None:
        return kernel(x, mo, uncond, uoff, coeffs, prev, noise, None, None, g, clip, var_mode, noise_mode, seed,
                      sample_offset, want_x0, False, known, keep, grad, grad_scale)  # fmt: skip
    b = x.shape[0]
    n = x.numel() // b
    # int sizes and view_as: a torch.Size argument costs more to parse than the rest of the view
    prev, noise, known, keep, grad = (
        None if t is None else t.view(b, n) for t in (prev, noise, known, keep, grad)
    )
    if uncond is not None:
        uncond = uncond.view(b if uoff == 0 else rows, -1)
    out, x0 = backend.fn(x.view(b, n), mo.view(rows, -1), uncond, uoff, coeffs, prev, noise, None, None, g,
                         clip, var_mode, noise_mode, seed, sample_offset, want_x0, False, known, keep, grad,
                         grad_scale)  # fmt: skip
    return out.view_as(x), (x0.view_as(x) if want_x0 else x0)


def eager_backend(x: torch.Tensor, n: int | None = None) -> _backend.Backend | None:
    """The backend that serves a step on ``x`` (B, N) (or ``n`` elements per sample) when the call can skip
    the custom op (plain eager mode, a plain tensor); None when something traces it (then call
    ``_sampler_step_op``)."""
    return _dispatched(x, n) if _backend.plain_eager(x) else None


def _run_step(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``_sampler_step_op(*args)``, without the custom-op overhead when nothing traces the call."""
    backend = eager_backend(args[0])
    return _sampler_step_op(*args) if backend is None else backend.fn(*args)


# =====================================================================================================
# Input handling shared by every step function
# =====================================================================================================


def _err(msg: str) -> ValueError:
    return ValueError(f"fastgen.diffusion_step: {msg}")


def _norm_pred(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise _err(f"unknown prediction_type {prediction_type!r}; expected one of {sorted(PREDICTION_TYPES)}")
    return PREDICTION_TYPES[prediction_type]


def _type_err(msg: str) -> TypeError:
    return TypeError(f"fastgen.diffusion_step: {msg}")


def _check_float_tensor(name: str, t: Any) -> None:
    """A real floating-point tensor: a complex one would silently lose its imaginary part."""
    if not isinstance(t, torch.Tensor):
        raise _type_err(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise _type_err(f"{name} must be a real floating-point tensor, got dtype {t.dtype}")


def _check_schedule(alphas_cumprod: Any, x: Any) -> _Schedule:
    """Checks the schedule (its values once per schedule, see ``_schedule``) and returns its cache."""
    _check_float_tensor("x_t", x)
    _check_float_tensor("alphas_cumprod", alphas_cumprod)
    if alphas_cumprod.ndim != 1 or alphas_cumprod.numel() == 0:
        raise _err(
            f"alphas_cumprod must be a non-empty 1-D tensor (T,), got shape {tuple(alphas_cumprod.shape)}"
        )
    if alphas_cumprod.device != x.device:
        raise _err(f"alphas_cumprod is on {alphas_cumprod.device} but x_t is on {x.device}")
    return _schedule(alphas_cumprod)


def _check_t(name: str, t: Any, size: int, allow_minus_one: bool, device: torch.device) -> int | torch.Tensor:
    lo = -1 if allow_minus_one else 0
    if isinstance(t, torch.Tensor):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise _type_err(f"{name} must be an int or a one-element integer tensor, got a {t.dtype} tensor")
        if t.numel() != 1:
            raise _err(f"{name} must be an int or a one-element integer tensor, got shape {tuple(t.shape)}")
        t = t.reshape(())
        if t.device.type == "cpu":
            t = int(t)
        else:
            if t.device != device:
                raise _err(f"{name} is on {t.device} but x_t is on {device}")
            # range check on the device: no host synchronisation (fails at the next sync point)
            torch._assert_async(
                (t >= lo) & (t < size), f"fastgen.diffusion_step: {name} out of range [{lo}, {size})"
            )
            return t
    elif not isinstance(t, int) or isinstance(t, bool):
        # numpy integers are fine; a float would be truncated (500.9 -> 500), a bool is not a timestep
        try:
            if isinstance(t, bool):
                raise TypeError
            t = operator.index(t)
        except TypeError:
            raise _type_err(
                f"{name} must be an int or a one-element integer tensor, got {type(t).__name__} {t!r}"
            ) from None
    if not lo <= t < size:
        raise _err(f"{name}={t} out of range [{lo}, {size - 1}] for a schedule of {size} steps")
    return t


def _check_before(name_a: str, a: int | torch.Tensor, name_b: str, b: int | torch.Tensor, why: str) -> None:
    """a < b for the validated timesteps a and b (device tensors: checked on the device, no sync)."""
    if isinstance(a, int) and isinstance(b, int):
        if not a < b:
            raise _err(f"{name_a}={a} must be < {name_b}={b}: {why}")
    else:
        torch._assert_async(
            torch.as_tensor(a < b), f"fastgen.diffusion_step: {name_a} must be < {name_b}: {why}"
        )


_T_PREV_WHY = "a step goes to an earlier, less noisy timestep (-1: the clean sample)"
_ZERO_SNR_WHY = "alphas_cumprod is 0 there (zero terminal SNR): Euler's sigma would be infinite"


def check_step_options(
    guidance_scale: Any, guidance_rescale: Any, clip_sample: Any, dynamic_threshold: Any
) -> tuple[float, float] | None:
    """Validates the guidance / clipping options every step takes (samplers check them once, at
    construction); returns the parsed dynamic threshold."""
    for name, v in (("guidance_scale", guidance_scale), ("guidance_rescale", guidance_rescale),
                    ("clip_sample", clip_sample)):  # fmt: skip
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
            raise _type_err(f"{name} must be a real number, got {type(v).__name__} {v!r}")
    if guidance_scale is not None and not math.isfinite(guidance_scale):
        raise _err(f"guidance_scale must be finite, got {guidance_scale}")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise _err(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
    if guidance_rescale > 0 and guidance_scale is None:
        raise _err("guidance_rescale needs guidance_scale")
    thr = _parse_threshold(dynamic_threshold)
    if clip_sample is not None and thr is not None:
        raise _err("clip_sample and dynamic_threshold are exclusive; pass one")
    if clip_sample is not None and not clip_sample > 0:
        raise _err(f"clip_sample must be > 0, got {clip_sample}")
    return thr


def _check_eta(eta: Any) -> float:
    """eta as a float: a finite real number >= 0 (inf or NaN would make every sample NaN)."""
    if (
        isinstance(eta, torch.Tensor)
        and eta.numel() == 1
        and not eta.is_complex()
        and eta.dtype != torch.bool
    ):
        eta = eta.item()
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real):
        raise _type_err(f"eta must be a real number, got {type(eta).__name__} {eta!r}")
    eta = float(eta)
    if not (eta >= 0.0 and math.isfinite(eta)):
        raise _err(f"eta must be >= 0 and finite, got {eta}")
    return eta


def _flat_rows(t: torch.Tensor) -> torch.Tensor:
    # flatten, not reshape(b, -1): -1 is ambiguous for an empty batch
    return t.flatten(1).contiguous()


class _Prepared:
    """Validated, flattened arguments of one fused step."""

    __slots__ = ("b", "cond", "n", "noise", "noise_mode", "prev", "shape", "uncond", "uoff", "var_mode", "x")


def _prepare(
    x_t: torch.Tensor,
    model_output: torch.Tensor,
    *,
    uncond_output: torch.Tensor | None,
    guidance_scale: float | None,
    learned_variance: bool,
    noise: torch.Tensor | None,
    needs_noise: bool,
    prev_x0: torch.Tensor | None = None,
) -> _Prepared:
    _check_float_tensor("x_t", x_t)
    _check_float_tensor("model_output", model_output)
    for name, t in (("uncond_output", uncond_output), ("noise", noise), ("prev_x0", prev_x0)):
        if t is not None:
            _check_float_tensor(name, t)
    if x_t.ndim < 2:
        raise _err(f"x_t must be (batch, ...) with at least 2 dims, got shape {tuple(x_t.shape)}")
    b, c = x_t.shape[0], x_t.shape[1]
    for name, t in (("model_output", model_output), ("uncond_output", uncond_output), ("noise", noise),
                    ("prev_x0", prev_x0)):  # fmt: skip
        if t is not None and t.device != x_t.device:
            raise _err(f"{name} is on {t.device} but x_t is on {x_t.device}")
    c_out = 2 * c if learned_variance else c
    want_rows = b
    if guidance_scale is not None and uncond_output is None:
        want_rows = 2 * b  # GLIDE-style doubled batch: [cond; uncond]
    if uncond_output is not None and guidance_scale is None:
        raise _err("uncond_output was given without guidance_scale")
    expect = (want_rows, c_out, *x_t.shape[2:])
    if tuple(model_output.shape) != expect:
        why = " (guidance with one doubled batch: [cond; uncond] along dim 0)" if want_rows == 2 * b else ""
        why += " (learned-range variance: 2x channels, [eps; v])" if learned_variance else ""
        raise _err(
            f"model_output has shape {tuple(model_output.shape)}, expected {expect} for x_t of shape "
            f"{tuple(x_t.shape)}{why}"
        )
    if uncond_output is not None and tuple(uncond_output.shape[:1]) + tuple(uncond_output.shape[2:]) != (
        b,
        *x_t.shape[2:],
    ):
        raise _err(
            f"uncond_output has shape {tuple(uncond_output.shape)}, expected ({b}, >= {c}, ...) like x_t"
        )
    if uncond_output is not None and uncond_output.shape[1] not in (c, c_out):
        raise _err(f"uncond_output has {uncond_output.shape[1]} channels, expected {c} or {c_out}")
    for name, t in (("noise", noise), ("prev_x0", prev_x0)):
        if t is not None and t.shape != x_t.shape:
            raise _err(f"{name} has shape {tuple(t.shape)}, expected {tuple(x_t.shape)} like x_t")
    p = _Prepared()
    p.shape, p.b = x_t.shape, b
    p.x = _flat_rows(x_t)
    p.n = p.x.shape[1]
    dt = x_t.dtype
    p.cond = _flat_rows(model_output.to(dt))
    p.uncond, p.uoff = None, 0
    if uncond_output is not None:
        p.uncond = _flat_rows(uncond_output.to(dt))
    elif guidance_scale is not None:
        p.uncond, p.uoff = p.cond, b
    p.var_mode = 1 if learned_variance else 0
    p.prev = _flat_rows(prev_x0.to(dt)) if prev_x0 is not None else None
    p.noise = None
    p.noise_mode = 0
    if needs_noise:
        if noise is not None:
            p.noise, p.noise_mode = _flat_rows(noise.to(dt)), 1
        else:
            p.noise_mode = 2
    return p


def _quantile_rows(a: torch.Tensor, q: float) -> torch.Tensor:
    """Row-wise ``torch.quantile(a, q, dim=1)`` (linear interpolation) for any row length.

    torch.quantile refuses inputs over 16M elements; kthvalue has no such limit. As with torch.quantile, a
    row holding a NaN gets a NaN quantile (kthvalue would rank the NaN and return a finite value).
    """
    n = a.shape[1]
    row_max = a.amax(dim=1)  # NaN exactly for the rows with a NaN
    rank = torch.tensor(q, dtype=torch.float32) * (n - 1)
    lo, hi = math.floor(rank), math.ceil(rank)
    weight = float(rank - lo)
    v = a.kthvalue(lo + 1, dim=1).values
    if hi != lo:
        v = torch.lerp(v, a.kthvalue(hi + 1, dim=1).values, weight)
    return torch.where(row_max.isnan(), row_max, v)


def _parse_threshold(dynamic_threshold: Any) -> tuple[float, float] | None:
    if dynamic_threshold is None or dynamic_threshold is False:
        return None
    if isinstance(dynamic_threshold, (tuple, list)):
        if len(dynamic_threshold) != 2:
            raise _err("dynamic_threshold must be a ratio or (ratio, max_value)")
        ratio, max_value = float(dynamic_threshold[0]), float(dynamic_threshold[1])
    else:
        ratio, max_value = float(dynamic_threshold), math.inf
    if not 0.0 < ratio <= 1.0:
        raise _err(f"dynamic_threshold ratio must be in (0, 1], got {ratio}")
    if not max_value >= 1.0:
        raise _err(f"dynamic_threshold max_value must be >= 1, got {max_value}")
    return ratio, max_value


def _rescale_factors(p: _Prepared, g: float, phi: float) -> torch.Tensor:
    """Per-sample guidance-rescale multiplier phi * std(cond)/std(cfg) + (1 - phi) (Lin et al. 2023)."""
    cond = p.cond[: p.b, : p.n].float()
    unc = p.uncond[p.uoff : p.uoff + p.b, : p.n].float()
    cfg = unc + g * (cond - unc)
    ratio = cond.std(dim=1) / cfg.std(dim=1)
    return (phi * ratio + (1.0 - phi)).to(torch.float32)


def _prepare_known_and_grad(x_t, known_image, known_mask, cond_grad, cond_grad_scale):
    """(known, keep, grad, grad_scale) as (B, N) rows in x_t's dtype (or None) for the fused step."""
    if (known_image is None) != (known_mask is None):
        raise _err("known_image and known_mask go together (inpainting): pass both or neither")
    known = keep = grad = None
    shape = tuple(x_t.shape)
    if known_image is not None:
        _check_float_tensor("known_image", known_image)
        if not isinstance(known_mask, torch.Tensor) or not (
            known_mask.is_floating_point() or known_mask.dtype == torch.bool
        ):
            raise _type_err(
                f"known_mask must be a float or bool tensor, got {getattr(known_mask, 'dtype', known_mask)!r}"
            )
        if tuple(known_image.shape) != shape:
            raise _err(f"known_image has shape {tuple(known_image.shape)}, expected {shape} like x_t")
        # broadcastable with as many dims (torch.broadcast_shapes would cost tens of microseconds per step)
        ms = tuple(known_mask.shape)
        if not (len(ms) == len(shape) and all(m in (1, s) for m, s in zip(ms, shape))):
            raise _err(
                f"known_mask has shape {tuple(known_mask.shape)}, expected {shape} or a shape that broadcasts "
                f"to it with as many dims, e.g. {(shape[0], 1, *shape[2:])}"
            )
        for name, t in (("known_image", known_image), ("known_mask", known_mask)):
            if t.device != x_t.device:
                raise _err(f"{name} is on {t.device} but x_t is on {x_t.device}")
        known = _flat_rows(known_image.to(x_t.dtype))
        keep = _flat_rows(known_mask.to(x_t.dtype).expand(shape))
    if cond_grad is not None:
        _check_float_tensor("cond_grad", cond_grad)
        if tuple(cond_grad.shape) != shape:
            raise _err(f"cond_grad has shape {tuple(cond_grad.shape)}, expected {shape} like x_t")
        if cond_grad.device != x_t.device:
            raise _err(f"cond_grad is on {cond_grad.device} but x_t is on {x_t.device}")
        grad = _flat_rows(cond_grad.to(x_t.dtype))
    if isinstance(cond_grad_scale, bool) or not isinstance(cond_grad_scale, numbers.Real):
        raise _type_err(f"cond_grad_scale must be a real number, got {type(cond_grad_scale).__name__}")
    if not math.isfinite(cond_grad_scale):
        raise _err(f"cond_grad_scale must be finite, got {cond_grad_scale}")
    return known, keep, grad, float(cond_grad_scale) if grad is not None else 0.0


# ---- the fast lane ------------------------------------------------------------------------------------
#
# The common eager step (plain contiguous tensors of one kernel dtype, inpainting with a full-shape mask
# and a guidance gradient included; no rescale or thresholding) checked with a few attribute reads and
# straight to the backend, in a
# fraction of the full path's Python cost (which dominates the kernel at sampling sizes). It returns None
# whenever anything is of another kind, and the full path then runs and raises every error: the lane
# serves only calls that the full path would accept, with the same backend arguments, so it never has to.

_FAST_DTYPES = frozenset(KERNEL_DTYPES)
_COEFF_SHAPE = (NUM_COEFFS,)


def _plain_real(v: Any) -> bool:
    return type(v) is float or type(v) is int  # not bool, numpy or tensor scalars: the full path judges those


def _like(t: Any, dt: torch.dtype, dev: torch.device, shape: torch.Size) -> bool:
    return (
        type(t) is torch.Tensor
        and t.dtype is dt
        and t.device == dev
        and t.shape == shape
        and t.is_contiguous()
    )


def _fast_step(x_t, model_output, coeffs, uncond, guidance_scale, clip_sample, learned, needs_noise, noise, seed,
               sample_offset, prev_x0, return_x0, known_image=None, known_mask=None, cond_grad=None,
               cond_grad_scale=1.0):  # fmt: skip
    """``sampler_step`` for the common case, or None (then the full path runs). The caller has checked
    ``_backend.plain_eager(x_t)``."""
    if type(x_t) is not torch.Tensor or type(model_output) is not torch.Tensor:
        return None
    dt, dev, xs, ms = x_t.dtype, x_t.device, x_t.shape, model_output.shape
    if (
        dt not in _FAST_DTYPES
        or model_output.dtype is not dt
        or model_output.device != dev
        or len(xs) < 2
        or len(ms) != len(xs)
        or not x_t.is_contiguous()
        or not model_output.is_contiguous()
        or type(coeffs) is not torch.Tensor
        or coeffs.dtype is not torch.float32
        or coeffs.device != dev
        or coeffs.shape != _COEFF_SHAPE
        or not coeffs.is_contiguous()
        or type(return_x0) is not bool
        or type(sample_offset) is not int
        or not (seed is None or type(seed) is int)
    ):
        return None
    b, c = xs[0], xs[1]
    numel = x_t.numel()
    if b == 0 or numel == 0 or numel >= b * 2**31:  # empty, or too long for the kernels: the full path
        return None
    if guidance_scale is None:
        if uncond is not None:
            return None
        g = 1.0
    elif _plain_real(guidance_scale) and math.isfinite(guidance_scale):
        g = float(guidance_scale)
    else:
        return None
    if clip_sample is None:
        clip = 0.0
    elif _plain_real(clip_sample) and clip_sample > 0:
        clip = float(clip_sample)
    else:
        return None
    c_out = 2 * c if learned else c
    rows = 2 * b if guidance_scale is not None and uncond is None else b
    if ms[0] != rows or ms[1] != c_out or ms[2:] != xs[2:]:
        return None
    for t in (noise, prev_x0, known_image, known_mask, cond_grad):
        if t is not None and not _like(t, dt, dev, xs):
            return None
    if (known_image is None) != (known_mask is None) or not (
        _plain_real(cond_grad_scale) and math.isfinite(cond_grad_scale)
    ):
        return None
    n = numel // b
    uoff = 0
    if uncond is not None:
        us = uncond.shape if type(uncond) is torch.Tensor else ()
        if (
            len(us) != len(xs)
            or us[0] != b
            or us[1] not in (c, c_out)
            or us[2:] != xs[2:]
            or uncond.dtype is not dt
            or uncond.device != dev
            or not uncond.is_contiguous()
        ):
            return None
    elif guidance_scale is not None:
        uncond, uoff = model_output, b
    noise_mode = 0
    if needs_noise:
        noise_mode = 1 if noise is not None else 2
    if noise_mode == 2 and seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())  # host RNG, no device sync
    seed = op_seed(seed or 0)
    if noise_mode != 1:
        noise = None
    gs = float(cond_grad_scale) if cond_grad is not None else 0.0
    out, x0 = run_eager(_dispatched(x_t, n), x_t, model_output, rows, uncond, uoff, coeffs, prev_x0, noise, g,
                        clip, 1 if learned else 0, noise_mode, seed, sample_offset & _M32, return_x0, known_image,
                        known_mask, cond_grad, gs)  # fmt: skip
    return out, (x0 if return_x0 else None)


def sampler_step(
    x_t: torch.Tensor,
    model_output: torch.Tensor,
    coeffs: torch.Tensor,
    *,
    uncond_output: torch.Tensor | None = None,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    clip_sample: float | None = None,
    dynamic_threshold: float | tuple[float, float] | None = None,
    learned_variance: bool = False,
    needs_noise: bool = False,
    noise: torch.Tensor | None = None,
    seed: int | None = None,
    sample_offset: int = 0,
    prev_x0: torch.Tensor | None = None,
    return_x0: bool = True,
    known_image: torch.Tensor | None = None,
    known_mask: torch.Tensor | None = None,
    cond_grad: torch.Tensor | None = None,
    cond_grad_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One fused sampler step given its 16 precomputed coefficients (see the module docstring).

    Args:
        x_t: (batch, channels, *spatial) current sample.
        model_output: (batch, C', *spatial), or (2*batch, C', ...) = [cond; uncond] when
            ``guidance_scale`` is given without ``uncond_output``. C' = 2*channels with
            ``learned_variance`` ([eps; v], GLIDE/ADM), else channels.
        coeffs: (16,) float64 or float32 on x_t's device, from ``ddpm_coeffs`` / ``ddim_coeffs`` / ... .
        guidance_rescale: phi in [0, 1] of Lin et al. 2023, std ratio per sample (needs guidance).
        clip_sample: static clip of x0 to [-clip_sample, clip_sample].
        dynamic_threshold: ratio p or (p, max_value): s = clamp(quantile_p(|x0|), 1, max_value) per
            sample, x0 = clamp(x0, -s, s) / s (Saharia et al. 2022). Adds one x0 pre-pass + a selection.
        needs_noise: the step adds noise; it comes from ``noise`` if given, else from the counter-based
            generator keyed by (``seed``, ``sample_offset`` + b, step, element).
        prev_x0: x0 of the previous step (multistep solvers), same shape as x_t.
        known_image, known_mask: inpainting (GLIDE's ``denoised_fn``): image of x_t's shape and a mask
            broadcastable to it (1 = keep, 0 = fill; values in [0, 1], not checked); the predicted x0
            becomes ``x0 (1 - mask) + image mask`` BEFORE clipping / thresholding, and eps is re-derived
            from it. A mask of x_t's shape and dtype, contiguous, is used without a copy.
        cond_grad, cond_grad_scale: guidance gradient of x_t's shape (GLIDE's ``cond_fn``): the mean
            becomes ``mean + variance * cond_grad_scale * cond_grad`` (``condition_mean``), with the
            step's noise variance (per element with the learned range, sigma^2 otherwise; 0 for
            deterministic samplers), also at the last step.
    Returns:
        (x_prev, pred_x0): pred_x0 is None when ``return_x0`` is False.
    """
    if (
        _plain_real(guidance_rescale)
        and guidance_rescale == 0
        and dynamic_threshold is None
        and _backend.plain_eager(x_t)
    ):
        out = _fast_step(x_t, model_output, coeffs, uncond_output, guidance_scale, clip_sample, learned_variance,
                         needs_noise, noise, seed, sample_offset, prev_x0, return_x0, known_image, known_mask,
                         cond_grad, cond_grad_scale)  # fmt: skip
        if out is not None:
            return out
    thr = check_step_options(guidance_scale, guidance_rescale, clip_sample, dynamic_threshold)
    p = _prepare(x_t, model_output, uncond_output=uncond_output, guidance_scale=guidance_scale,
                 learned_variance=learned_variance, noise=noise, needs_noise=needs_noise, prev_x0=prev_x0)  # fmt: skip
    if not isinstance(coeffs, torch.Tensor):
        raise _type_err(f"coeffs must be a torch.Tensor ({NUM_COEFFS},), got {type(coeffs).__name__}")
    if (
        coeffs.shape != (NUM_COEFFS,)
        or coeffs.dtype not in (torch.float32, torch.float64)
        or (coeffs.device != x_t.device)
    ):
        raise _err(
            f"coeffs must be float32/float64 ({NUM_COEFFS},) on {x_t.device}, got {coeffs.dtype} "
            f"{tuple(coeffs.shape)} on {coeffs.device}"
        )
    coeffs = coeffs.to(torch.float64 if x_t.dtype == torch.float64 else torch.float32)
    known, keep, grad, grad_scale = _prepare_known_and_grad(
        x_t, known_image, known_mask, cond_grad, cond_grad_scale
    )
    if p.noise_mode == 2 and seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())  # host RNG, no device sync
    seed = op_seed(int(seed or 0))
    sample_offset = int(sample_offset) & _M32
    g = float(guidance_scale) if guidance_scale is not None else 1.0
    # an empty batch or sample has nothing to rescale or threshold (and no rows to take statistics of)
    empty = p.b == 0 or p.n == 0
    row_scale = _rescale_factors(p, g, guidance_rescale) if guidance_rescale > 0 and not empty else None
    clip = float(clip_sample) if clip_sample is not None else 0.0
    thresh = None
    coeffs = coeffs.contiguous()
    if thr is not None and not empty:
        _, absx0 = _run_step(p.x, p.cond, p.uncond, p.uoff, coeffs, None, None, row_scale, None, g, 0.0,
                                    p.var_mode, 0, 0, sample_offset, False, True, known, keep)  # fmt: skip
        thresh = _quantile_rows(absx0, thr[0]).clamp(min=1.0, max=thr[1]).to(torch.float32)
    out, x0 = _run_step(p.x, p.cond, p.uncond, p.uoff, coeffs, p.prev, p.noise, row_scale, thresh, g,
                               clip, p.var_mode, p.noise_mode, seed, sample_offset, return_x0, False,
                               known, keep, grad, grad_scale)  # fmt: skip
    return out.view(p.shape), (x0.view(p.shape) if return_x0 else None)


# ---- per-schedule state of the per-step functional API: validation once, coefficient cache ----------
#
# A step with Python-int timesteps reuses the coefficients built for the same schedule and arguments. The
# cache must never serve a schedule whose values changed since: the tensor's version counter misses
# writes through ``.data``, numpy or DLPack, and its address can be reused by a new schedule. So on the
# CPU an entry is valid while the schedule's content equals the snapshot taken when it was built (a
# 1000-value torch.equal is a few microseconds). On a GPU that comparison would synchronise with the host
# on every step, so there an entry is valid for the same tensor object (held by weakref, so a new tensor
# at the same address misses) at the same version; a write that bypasses the version counter (``.data``,
# DLPack) is not seen there: pass a new tensor, or call ``clear_schedule_cache()``.


class _Schedule:
    """A validated schedule and the coefficients built from it, keyed by the step's arguments.

    ``fast`` maps the raw arguments of a per-step call that passed every check (its timesteps Python ints,
    its options plain str / int / float: equal keys of those types are judged alike) to its float32
    coefficients, so that a repeated call skips both the checks and the key normalisation."""

    __slots__ = ("coeffs", "fast", "ref", "snapshot", "version", "zero_snr_end")


_SCHEDULES: dict[tuple, _Schedule] = {}
_MAX_SCHEDULES = 64
_MAX_COEFFS_PER_SCHEDULE = 4096


def clear_schedule_cache() -> None:
    """Forget every schedule seen by the per-step functions (and the coefficients built from them)."""
    _SCHEDULES.clear()


def _validate_schedule(abar: torch.Tensor) -> bool:
    """alphas_cumprod in (0, 1] and non-increasing; the last value may be 0 (zero terminal SNR, as a
    cosine schedule with max_beta=1 gives). A 0 before the end would make every later step pure noise.
    Returns whether the last value is 0. One host sync per new schedule on a GPU."""
    if abar.device.type == "meta":
        return False
    a = abar.detach()
    in_range = torch.cat([(a[:-1] > 0) & (a[:-1] <= 1), (a[-1:] >= 0) & (a[-1:] <= 1)])
    increasing = a[1:] > a[:-1]
    ok, zero_end = torch.stack([in_range.all() & ~increasing.any(), a[-1] == 0]).tolist()
    if ok:
        return zero_end
    if not bool(in_range.all()):
        i = int((~in_range).nonzero()[0])
        raise _err(
            f"alphas_cumprod must lie in (0, 1] (only its last value may be 0: zero terminal SNR), got "
            f"alphas_cumprod[{i}]={a[i].item():.6g}"
        )
    i = int(increasing.nonzero()[0]) + 1
    raise _err(
        f"alphas_cumprod must be non-increasing (noise grows with t), got alphas_cumprod[{i}]="
        f"{a[i].item():.6g} > alphas_cumprod[{i - 1}]={a[i - 1].item():.6g}"
    )


def _schedule_key(abar: torch.Tensor) -> tuple:
    return (abar.data_ptr(), abar.shape[0], abar.stride(0), abar.dtype, abar.device)


def _schedule_hit(abar: torch.Tensor, key: tuple) -> _Schedule | None:
    """The cached state of a 1-D schedule tensor, if it is still valid for it (see above)."""
    st = _SCHEDULES.get(key)
    if st is not None:
        if st.snapshot is not None:
            if torch.equal(st.snapshot, abar):
                return st
        elif st.ref() is abar and st.version == abar._version:
            return st
    return None


def _schedule(abar: torch.Tensor) -> _Schedule:
    key = _schedule_key(abar)
    st = _schedule_hit(abar, key)
    if st is not None:
        return st
    st = _Schedule()
    st.zero_snr_end = _validate_schedule(abar)
    st.coeffs = {}
    st.fast = {}
    if abar.device.type == "cpu":
        st.ref, st.version, st.snapshot = None, None, abar.detach().clone()
    else:
        st.ref, st.version, st.snapshot = weakref.ref(abar), abar._version, None
    if len(_SCHEDULES) >= _MAX_SCHEDULES:
        _SCHEDULES.clear()
    _SCHEDULES[key] = st
    return st


def _cached(st: _Schedule, key: tuple, dtype: torch.dtype, build) -> torch.Tensor:
    """The coefficients of ``key`` in the type sampler_step runs them in for samples of ``dtype``."""
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    if any(isinstance(k, torch.Tensor) for k in key):  # device timesteps: built on the device, no sync
        return build().to(ct)
    key = (*key, ct)
    hit = st.coeffs.get(key)
    if hit is None:
        if len(st.coeffs) >= _MAX_COEFFS_PER_SCHEDULE:
            st.coeffs.clear()
        hit = st.coeffs[key] = build().to(ct)
    return hit


def _fast_coeffs(abar: Any, x_t: Any, key: tuple) -> torch.Tensor | None:
    """The coefficients of a per-step call whose raw arguments ``key`` passed every check before on this
    schedule (unchanged since), or None. Only in plain eager mode: anything traced takes the full path."""
    if type(abar) is not torch.Tensor or abar.ndim != 1 or not _backend.plain_eager(x_t):
        return None
    st = _schedule_hit(abar, _schedule_key(abar))
    return None if st is None else st.fast.get(key)


def _remember(st: _Schedule, key: tuple | None, coeffs: torch.Tensor) -> None:
    if key is not None and coeffs.dtype == torch.float32:
        if len(st.fast) >= _MAX_COEFFS_PER_SCHEDULE:
            st.fast.clear()
        st.fast[key] = coeffs


# The keywords the fast lane of the per-step functions takes; any other one (or a typo) takes the full path.
_FAST_KEYWORDS = frozenset(
    ("uncond_output", "guidance_scale", "seed", "sample_offset", "known_image", "known_mask", "cond_grad",
     "cond_grad_scale")
)  # fmt: skip


def _fast_public(abar, key, x_t, model_output, clip_sample, learned, needs_noise, noise, prev_x0, kwargs):
    """``sampler_step`` through the fast lane for a per-step call whose raw arguments ``key`` passed every
    check before on this schedule (see :func:`_fast_coeffs`), or None: then the full path serves it."""
    coeffs = _fast_coeffs(abar, x_t, key)
    if coeffs is None:
        return None
    if not kwargs:
        return _fast_step(x_t, model_output, coeffs, None, None, clip_sample, learned, needs_noise, noise, None, 0,
                          prev_x0, True)  # fmt: skip
    if not kwargs.keys() <= _FAST_KEYWORDS:
        return None
    g = kwargs.get
    return _fast_step(x_t, model_output, coeffs, g("uncond_output"), g("guidance_scale"), clip_sample, learned,
                      needs_noise, noise, g("seed"), g("sample_offset", 0), prev_x0, True, g("known_image"),
                      g("known_mask"), g("cond_grad"), g("cond_grad_scale", 1.0))  # fmt: skip


_STEP_KEYWORDS = frozenset(
    ("uncond_output", "guidance_scale", "guidance_rescale", "dynamic_threshold", "seed", "sample_offset",
     "known_image", "known_mask", "cond_grad", "cond_grad_scale")
)  # fmt: skip


def _common(fn: str, kw: dict) -> dict:
    """The keywords a step passes on to ``sampler_step``; anything else is a typo, refused as Python would."""
    for k in kw:
        if k not in _STEP_KEYWORDS:
            raise TypeError(f"{fn}() got an unexpected keyword argument {k!r}")
    return kw


def ddpm_step(
    x_t: torch.Tensor,
    model_output: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    t: int | torch.Tensor,
    *,
    variance_type: str = "fixed_small",
    noise: torch.Tensor | None = None,
    prediction_type: str = "epsilon",
    clip_sample: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDPM ancestral step x_t -> x_{t-1} (Ho et al. 2020), fused with guidance and clipping.

    ``alphas_cumprod``: (T,) of the schedule being sampled (respaced or not; betas are derived as
    1 - a_t/a_{t-1}). ``variance_type``: "fixed_small" (posterior variance, log clipped at t=0),
    "fixed_large" (beta_t) or "learned_range" (model_output carries [eps; v] channels, v in [-1, 1]
    interpolates log beta_t and the log posterior variance; Nichol & Dhariwal 2021). With guidance
    the variance channels come from the conditional half. No noise is added at t = 0.
    Extra keywords: see ``sampler_step`` (uncond_output, guidance_scale, guidance_rescale,
    dynamic_threshold, seed, sample_offset, known_image / known_mask (inpainting), cond_grad /
    cond_grad_scale (guidance gradient)). Returns (x_{t-1}, pred_x0).
    """
    fast = None
    if type(t) is int and type(prediction_type) is str and type(variance_type) is str:
        fast = ("ddpm", prediction_type, variance_type, t)
        out = _fast_public(
            alphas_cumprod,
            fast,
            x_t,
            model_output,
            clip_sample,
            variance_type == "learned_range",
            True,
            noise,
            None,
            kwargs,
        )
        if out is not None:
            return out
    pred = _norm_pred(prediction_type)
    if variance_type not in VARIANCE_TYPES:
        raise _err(f"unknown variance_type {variance_type!r}; expected one of {VARIANCE_TYPES}")
    kwargs = _common("ddpm_step", kwargs)
    st = _check_schedule(alphas_cumprod, x_t)
    t = _check_t("t", t, alphas_cumprod.numel(), False, x_t.device)
    coeffs = _cached(st, ("ddpm", pred, variance_type, t), x_t.dtype,
                     lambda: ddpm_coeffs(alphas_cumprod, t, pred, variance_type))  # fmt: skip
    _remember(st, fast, coeffs)
    return sampler_step(x_t, model_output, coeffs, clip_sample=clip_sample, noise=noise, needs_noise=True,
                        learned_variance=variance_type == "learned_range", **kwargs)  # fmt: skip


def ddim_step(
    x_t: torch.Tensor,
    model_output: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    t: int | torch.Tensor,
    t_prev: int | torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    prediction_type: str = "epsilon",
    clip_sample: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM step t -> t_prev (Song et al. 2021); ``t_prev < t``, ``t_prev = -1`` steps to the clean sample
    (a' = 1). ``eta``: a finite real >= 0 (0: deterministic, 1: DDPM's posterior noise).

    x' = sqrt(a') x0 + sqrt(1 - a' - s^2) eps + s z, s = eta sqrt((1-a')/(1-a)) sqrt(1 - a/a').
    When x0 is clipped / thresholded, eps is re-derived from the clipped x0 (as ADM/GLIDE do).
    Extra keywords: see ``sampler_step``. Returns (x_prev, pred_x0).
    """
    fast = None
    if type(t) is int and type(t_prev) is int and _plain_real(eta) and type(prediction_type) is str:
        fast = ("ddim", prediction_type, eta, t, t_prev)
        out = _fast_public(
            alphas_cumprod, fast, x_t, model_output, clip_sample, False, eta > 0, noise, None, kwargs
        )
        if out is not None:
            return out
    kwargs = _common("ddim_step", kwargs)
    pred = _norm_pred(prediction_type)
    eta = _check_eta(eta)
    st = _check_schedule(alphas_cumprod, x_t)
    size = alphas_cumprod.numel()
    t = _check_t("t", t, size, False, x_t.device)
    t_prev = _check_t("t_prev", t_prev, size, True, x_t.device)
    _check_before("t_prev", t_prev, "t", t, _T_PREV_WHY)
    coeffs = _cached(st, ("ddim", pred, eta, t, t_prev), x_t.dtype,
                     lambda: ddim_coeffs(alphas_cumprod, t, t_prev, eta, pred))  # fmt: skip
    _remember(st, fast, coeffs)
    return sampler_step(x_t, model_output, coeffs, clip_sample=clip_sample, noise=noise, needs_noise=eta > 0,
                        **kwargs)  # fmt: skip


def _euler(ancestral: bool, x_t, model_output, alphas_cumprod, t, t_prev, noise, prediction_type, clip_sample,
           kwargs):  # fmt: skip
    fast = None
    if type(t) is int and type(t_prev) is int and type(prediction_type) is str:
        fast = ("euler", ancestral, prediction_type, t, t_prev)
        out = _fast_public(
            alphas_cumprod, fast, x_t, model_output, clip_sample, False, ancestral, noise, None, kwargs
        )
        if out is not None:
            return out
    kwargs = _common("euler_ancestral_step" if ancestral else "euler_step", kwargs)
    pred = _norm_pred(prediction_type)
    st = _check_schedule(alphas_cumprod, x_t)
    size = alphas_cumprod.numel()
    t = _check_t("t", t, size, False, x_t.device)
    t_prev = _check_t("t_prev", t_prev, size, True, x_t.device)
    _check_before("t_prev", t_prev, "t", t, _T_PREV_WHY)
    if st.zero_snr_end:  # sigma = sqrt((1 - a) / a) is infinite there
        _check_before("t", t, "the last step", size - 1, _ZERO_SNR_WHY)
    coeffs = _cached(st, ("euler", pred, ancestral, t, t_prev), x_t.dtype,
                     lambda: euler_coeffs(alphas_cumprod, t, t_prev, pred, ancestral))  # fmt: skip
    _remember(st, fast, coeffs)
    return sampler_step(x_t, model_output, coeffs, clip_sample=clip_sample, noise=noise, needs_noise=ancestral,
                        **kwargs)  # fmt: skip


def euler_step(x_t, model_output, alphas_cumprod, t, t_prev, *, prediction_type="epsilon", clip_sample=None,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Euler step (Karras et al. 2022) in sigma space: x = x0 + sigma eps, sigma = sqrt((1-a)/a).

    x' = x + (sigma' - sigma) d with d = (x - x0)/sigma; the model must have been called on
    ``x / sqrt(sigma^2 + 1)`` (see ``euler_model_input_scale``). ``t_prev < t``; ``t_prev = -1`` ends at
    sigma = 0. ``t`` must not be a zero-SNR step (alphas_cumprod 0, infinite sigma).
    Returns (x_prev, pred_x0).
    """
    return _euler(
        False, x_t, model_output, alphas_cumprod, t, t_prev, None, prediction_type, clip_sample, kwargs
    )


def euler_ancestral_step(x_t, model_output, alphas_cumprod, t, t_prev, *, noise=None, prediction_type="epsilon",
                         clip_sample=None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Euler ancestral step: deterministic move to sigma_down, then noise of std sigma_up, with
    sigma_up = sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2), sigma_down = sqrt(sigma'^2 - sigma_up^2).
    """
    return _euler(
        True, x_t, model_output, alphas_cumprod, t, t_prev, noise, prediction_type, clip_sample, kwargs
    )


def euler_model_input_scale(alphas_cumprod: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    """1/sqrt(sigma_t^2 + 1) = sqrt(a_t): multiply the sigma-space sample by this before the model."""
    return _take(alphas_cumprod.to(torch.float64), t).sqrt()


def dpm_solver_2m_step(
    x_t: torch.Tensor,
    model_output: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    t: int | torch.Tensor,
    t_prev: int | torch.Tensor,
    *,
    prev_x0: torch.Tensor | None = None,
    t_last: int | torch.Tensor | None = None,
    prediction_type: str = "epsilon",
    clip_sample: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPM-Solver++(2M) step t -> t_prev (Lu et al. 2022, multistep, midpoint); ``t_prev < t``.

    ``prev_x0``/``t_last``: the pred_x0 returned by the previous step and that step's t (``t_last > t``);
    without them (first step) and on the final step (t_prev = -1) the update is first order.
    Returns (x_prev, pred_x0) — pass pred_x0 back as ``prev_x0`` next step.
    """
    fast = None
    if (
        type(t) is int
        and type(t_prev) is int
        and (t_last is None or type(t_last) is int)
        and (prev_x0 is None) == (t_last is None)
        and type(prediction_type) is str
    ):
        fast = ("dpm2m", prediction_type, t, t_prev, t_last)
        out = _fast_public(
            alphas_cumprod, fast, x_t, model_output, clip_sample, False, False, None, prev_x0, kwargs
        )
        if out is not None:
            return out
    kwargs = _common("dpm_solver_2m_step", kwargs)
    pred = _norm_pred(prediction_type)
    if (prev_x0 is None) != (t_last is None):
        raise _err("prev_x0 and t_last go together (both or neither)")
    st = _check_schedule(alphas_cumprod, x_t)
    size = alphas_cumprod.numel()
    t = _check_t("t", t, size, False, x_t.device)
    t_prev = _check_t("t_prev", t_prev, size, True, x_t.device)
    _check_before("t_prev", t_prev, "t", t, _T_PREV_WHY)
    if t_last is not None:
        t_last = _check_t("t_last", t_last, size, False, x_t.device)
        _check_before("t", t, "t_last", t_last, "t_last is the timestep of the previous, noisier step")
    coeffs = _cached(st, ("dpm2m", pred, t, t_prev, t_last), x_t.dtype,
                     lambda: dpm_solver_2m_coeffs(alphas_cumprod, t, t_prev, t_last, pred))  # fmt: skip
    _remember(st, fast, coeffs)
    return sampler_step(x_t, model_output, coeffs, clip_sample=clip_sample, prev_x0=prev_x0, **kwargs)


def counter_normal(
    shape: tuple[int, ...],
    seed: int,
    step: int = 0,
    sample_offset: int = 0,
    device: Any = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise of ``shape = (batch, ...)`` from the counter-based generator, on the fused
    kernels' backend: element i of sample b depends only on (seed, sample_offset + b, step, i)."""
    x = torch.zeros(shape, device=device, dtype=dtype)
    coeffs = torch.zeros(NUM_COEFFS, device=device, dtype=torch.float64)
    coeffs[SIGMA] = 1.0
    coeffs[NOISE_MASK] = 1.0
    coeffs[RNG_STEP] = float(step)
    if not 0 <= step < 2**24:
        raise _err(f"step must be in [0, 2^24), got {step}")
    out, _ = sampler_step(
        x, x, coeffs, needs_noise=True, seed=seed, sample_offset=sample_offset, return_x0=False
    )
    return out


# =====================================================================================================
# References: the plain formulas, one op at a time (what a user would write; oracle for the tests)
# =====================================================================================================


def _guided_ref(model_output, uncond_output, guidance_scale, guidance_rescale, b, c, dt):
    eps_part = model_output.to(dt)
    if guidance_scale is None:
        return eps_part[:, :c], eps_part
    if uncond_output is None:
        cond, unc = eps_part[:b], eps_part[b:]
    else:
        cond, unc = eps_part, uncond_output.to(dt)
    cond_c, unc_c = cond[:, :c], unc[:, :c]
    guided = unc_c + guidance_scale * (cond_c - unc_c)
    if guidance_rescale > 0:
        dims = list(range(1, cond_c.ndim))
        rescaled = guided * (cond_c.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
        guided = guidance_rescale * rescaled + (1.0 - guidance_rescale) * guided
    return guided, cond


def _x0_eps_ref(x, m, alpha_bar, prediction_type):
    a, s = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    pred = _norm_pred(prediction_type)
    if pred == "epsilon":
        return (x - s * m) / a, m
    if pred == "sample":
        return m, (x - a * m) / s
    return a * x - s * m, a * m + s * x


def _clip_ref(x, x0, alpha_bar, clip_sample, dynamic_threshold, eps):
    thr = _parse_threshold(dynamic_threshold)
    if clip_sample is None and thr is None:
        return x0, eps
    if clip_sample is not None:
        x0 = x0.clamp(-clip_sample, clip_sample)
    else:
        flat = x0.reshape(x0.shape[0], -1).abs().float()  # torch.quantile takes float32/64 only
        s = torch.quantile(flat, thr[0], dim=1).clamp(min=1.0, max=thr[1]).to(x0.dtype)
        s = s.reshape(-1, *([1] * (x0.ndim - 1)))
        x0 = torch.clamp(x0, -s, s) / s
    eps = (x - math.sqrt(alpha_bar) * x0) / math.sqrt(1.0 - alpha_bar)
    return x0, eps


def _known_ref(x, x0, eps, alpha_bar, known_image, known_mask):
    """GLIDE's inpainting denoised_fn: x0 takes the known image where the mask is 1 (eps re-derived)."""
    if known_image is None:
        return x0, eps
    m = known_mask.to(x0.dtype)
    x0 = x0 * (1 - m) + known_image.to(x0.dtype) * m
    return x0, (x - math.sqrt(alpha_bar) * x0) / math.sqrt(1.0 - alpha_bar)


def _ref_noise(x, noise, seed, step, sample_offset, dt):
    if noise is not None:
        return noise.to(dt)
    return counter_normal_ref(tuple(x.shape), seed, step, sample_offset, x.device).to(dt)


def _abar(alphas_cumprod, t):
    return 1.0 if t < 0 else float(alphas_cumprod[t])


def ddim_step_ref(x_t, model_output, alphas_cumprod, t, t_prev, eta=0.0, noise=None, prediction_type="epsilon",
                  clip_sample=None, *, uncond_output=None, guidance_scale=None, guidance_rescale=0.0,
                  dynamic_threshold=None, seed=None, sample_offset=0, known_image=None, known_mask=None,
                  compute_dtype=torch.float32):  # fmt: skip
    """DDIM in plain PyTorch (Song et al. 2021, eq. 12), int timesteps."""
    dt = compute_dtype
    x = x_t.to(dt)
    m, _ = _guided_ref(
        model_output, uncond_output, guidance_scale, guidance_rescale, x.shape[0], x.shape[1], dt
    )
    a_t, a_p = _abar(alphas_cumprod, t), _abar(alphas_cumprod, t_prev)
    x0, eps = _x0_eps_ref(x, m, a_t, prediction_type)
    x0, eps = _known_ref(x, x0, eps, a_t, known_image, known_mask)
    x0, eps = _clip_ref(x, x0, a_t, clip_sample, dynamic_threshold, eps)
    sigma = eta * math.sqrt((1 - a_p) / (1 - a_t)) * math.sqrt(1 - a_t / a_p)
    x_prev = math.sqrt(a_p) * x0 + math.sqrt(max(1 - a_p - sigma**2, 0.0)) * eps
    if eta > 0:
        x_prev = x_prev + sigma * _ref_noise(x, noise, seed, t, sample_offset, dt)
    return x_prev, x0


def ddpm_step_ref(x_t, model_output, alphas_cumprod, t, *, variance_type="fixed_small", noise=None,
                  prediction_type="epsilon", clip_sample=None, uncond_output=None, guidance_scale=None,
                  guidance_rescale=0.0, dynamic_threshold=None, seed=None, sample_offset=0, known_image=None,
                  known_mask=None, cond_grad=None, cond_grad_scale=1.0, compute_dtype=torch.float32):  # fmt: skip
    """DDPM posterior sampling in plain PyTorch (Ho et al. 2020 eq. 6-7; ADM's learned range).

    Inpainting replaces x0 by the known image before clipping; ``cond_grad`` shifts the mean by
    variance * cond_grad_scale * cond_grad (GLIDE's condition_mean), also at t = 0.
    """
    dt = compute_dtype
    x = x_t.to(dt)
    b, c = x.shape[:2]
    m, cond = _guided_ref(model_output, uncond_output, guidance_scale, guidance_rescale, b, c, dt)
    a_t, a_p = _abar(alphas_cumprod, t), _abar(alphas_cumprod, t - 1)
    beta = 1 - a_t / a_p
    x0, eps = _x0_eps_ref(x, m, a_t, prediction_type)
    x0, eps = _known_ref(x, x0, eps, a_t, known_image, known_mask)
    x0, _ = _clip_ref(x, x0, a_t, clip_sample, dynamic_threshold, eps)
    mean = (beta * math.sqrt(a_p) / (1 - a_t)) * x0 + ((1 - a_p) * math.sqrt(1 - beta) / (1 - a_t)) * x
    post_var = beta * (1 - a_p) / (1 - a_t)
    if t == 0:  # the posterior variance is 0 there: ADM clips its log to the t = 1 value
        a_1 = _abar(alphas_cumprod, 1) if len(alphas_cumprod) > 1 else a_t
        beta_1 = 1 - a_1 / a_t
        post_var = beta_1 * (1 - a_t) / (1 - a_1)
    if variance_type == "fixed_small":
        var = post_var
    elif variance_type == "fixed_large":
        var = beta if t > 0 else post_var
    else:
        frac = (cond[:, c:] + 1) / 2
        var = torch.exp(frac * math.log(beta) + (1 - frac) * math.log(post_var))
    if cond_grad is not None:
        mean = mean + var * cond_grad_scale * cond_grad.to(dt)
    if t == 0:
        return mean, x0
    std = var**0.5 if isinstance(var, float) else var.sqrt()
    return mean + std * _ref_noise(x, noise, seed, t, sample_offset, dt), x0


def euler_step_ref(x_t, model_output, alphas_cumprod, t, t_prev, *, prediction_type="epsilon", clip_sample=None,
                   uncond_output=None, guidance_scale=None, guidance_rescale=0.0, dynamic_threshold=None,
                   noise=None, seed=None, sample_offset=0, ancestral=False,
                   compute_dtype=torch.float32):  # fmt: skip
    """Euler / Euler-ancestral in sigma space, as k-diffusion and the diffusers Euler schedulers."""
    dt = compute_dtype
    x = x_t.to(dt)
    m, _ = _guided_ref(
        model_output, uncond_output, guidance_scale, guidance_rescale, x.shape[0], x.shape[1], dt
    )
    a_t = _abar(alphas_cumprod, t)
    sigma = math.sqrt((1 - a_t) / a_t)
    sigma_next = math.sqrt((1 - _abar(alphas_cumprod, t_prev)) / _abar(alphas_cumprod, t_prev))
    pred = _norm_pred(prediction_type)
    if pred == "epsilon":
        x0 = x - sigma * m
    elif pred == "sample":
        x0 = m
    else:
        x0 = m * (-sigma / math.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)
    if clip_sample is not None or dynamic_threshold is not None:
        x0, _ = _clip_ref(x, x0, a_t, clip_sample, dynamic_threshold, None)
    d = (x - x0) / sigma
    if not ancestral:
        return x + (sigma_next - sigma) * d, x0
    sigma_up = math.sqrt(max(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2, 0.0))
    sigma_down = math.sqrt(max(sigma_next**2 - sigma_up**2, 0.0))
    x_prev = x + (sigma_down - sigma) * d + sigma_up * _ref_noise(x, noise, seed, t, sample_offset, dt)
    return x_prev, x0


def euler_ancestral_step_ref(*args, **kwargs):
    return euler_step_ref(*args, ancestral=True, **kwargs)


def dpm_solver_2m_step_ref(x_t, model_output, alphas_cumprod, t, t_prev, *, prev_x0=None, t_last=None,
                           prediction_type="epsilon", clip_sample=None, uncond_output=None, guidance_scale=None,
                           guidance_rescale=0.0, dynamic_threshold=None, compute_dtype=torch.float32):  # fmt: skip
    """DPM-Solver++(2M), midpoint form (Lu et al. 2022, Algorithm 2), as the diffusers scheduler."""
    dt = compute_dtype
    x = x_t.to(dt)
    m, _ = _guided_ref(
        model_output, uncond_output, guidance_scale, guidance_rescale, x.shape[0], x.shape[1], dt
    )
    a_s = _abar(alphas_cumprod, t)
    x0, eps = _x0_eps_ref(x, m, a_s, prediction_type)
    x0, _ = _clip_ref(x, x0, a_s, clip_sample, dynamic_threshold, eps)
    a_t = _abar(alphas_cumprod, t_prev)
    alpha_s, sigma_s = math.sqrt(a_s), math.sqrt(1 - a_s)
    alpha_t, sigma_t = math.sqrt(a_t), math.sqrt(1 - a_t)
    if t_prev < 0:  # sigma_t = 0: lambda_t = inf, exp(-h) = 0
        return x0, x0
    lam_s, lam_t = math.log(alpha_s / sigma_s), math.log(alpha_t / sigma_t)
    h = lam_t - lam_s
    x_prev = (sigma_t / sigma_s) * x - (alpha_t * (math.exp(-h) - 1.0)) * x0
    if prev_x0 is not None:
        a_l = _abar(alphas_cumprod, t_last)
        r0 = (lam_s - math.log(math.sqrt(a_l) / math.sqrt(1 - a_l))) / h
        d1 = (1.0 / r0) * (x0 - prev_x0.to(dt))
        x_prev = x_prev - 0.5 * (alpha_t * (math.exp(-h) - 1.0)) * d1
    return x_prev, x0

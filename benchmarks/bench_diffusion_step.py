"""Benchmark: one fused sampler step vs the unfused PyTorch reference (CFG combine + scheduler step as
separate ops, what a user writes with today's schedulers).

The step is memory-bound, so the roofline is bytes moved / copy bandwidth. Bytes per call (analytic):
reads x, the conditional and unconditional eps, (the learned-variance channels, noise, prev x0 when the
sampler needs them) and writes x_prev and pred_x0.
"""

from __future__ import annotations

import torch

from fastgen._backend import Call
from fastgen.bench import Case, Impl, backend_impls, headline_mode, main, register
from fastgen.diffusion import NoiseSchedule
from fastgen.ops import diffusion_step as D

SCHED = NoiseSchedule.from_name("linear", 1000).respace("50")
T, T_PREV, T_LAST = 30, 29, 31
GUIDANCE = 4.0

# GLIDE's step (learned-range variance, clipped x0): (fused call, reference call)
_GLIDE_DDPM = (
    lambda x, mo, abar, **kw: D.ddpm_step(
        x, mo, abar, T, variance_type="learned_range", clip_sample=1.0, **kw
    ),
    lambda x, mo, abar, **kw: D.ddpm_step_ref(
        x, mo, abar, T, variance_type="learned_range", clip_sample=1.0, **kw
    ),
)

# name -> (fused call, reference call, learned variance, noise[, extras: "inpaint" (known image + mask),
# "grad" (a guidance gradient: GLIDE's CLIP guidance)])
SAMPLERS = {
    "ddim+cfg": (
        lambda x, mo, abar, **kw: D.ddim_step(x, mo, abar, T, T_PREV, **kw),
        lambda x, mo, abar, **kw: D.ddim_step_ref(x, mo, abar, T, T_PREV, **kw),
        False,
        False,
    ),
    "ddim+cfg+clip": (
        lambda x, mo, abar, **kw: D.ddim_step(x, mo, abar, T, T_PREV, clip_sample=1.0, **kw),
        lambda x, mo, abar, **kw: D.ddim_step_ref(x, mo, abar, T, T_PREV, clip_sample=1.0, **kw),
        False,
        False,
    ),
    "ddpm-learned+cfg+noise": (
        lambda x, mo, abar, **kw: D.ddpm_step(x, mo, abar, T, variance_type="learned_range", **kw),
        lambda x, mo, abar, **kw: D.ddpm_step_ref(x, mo, abar, T, variance_type="learned_range", **kw),
        True,
        True,
    ),
    "dpm++2m+cfg": (
        lambda x, mo, abar, **kw: D.dpm_solver_2m_step(x, mo, abar, T, T_PREV, t_last=T_LAST, **kw),
        lambda x, mo, abar, **kw: D.dpm_solver_2m_step_ref(x, mo, abar, T, T_PREV, t_last=T_LAST, **kw),
        False,
        False,
    ),
    "ddim+cfg+dynthresh": (
        lambda x, mo, abar, **kw: D.ddim_step(x, mo, abar, T, T_PREV, dynamic_threshold=0.995, **kw),
        lambda x, mo, abar, **kw: D.ddim_step_ref(x, mo, abar, T, T_PREV, dynamic_threshold=0.995, **kw),
        False,
        False,
    ),
    # GLIDE inpainting: the known region replaces x0 before clipping, in the same pass
    "ddpm-learned+cfg+inpaint": (*_GLIDE_DDPM, True, True, ("inpaint",)),
    # GLIDE CLIP guidance: mean + variance * grad, in the same pass
    "ddpm-learned+clip-grad": (*_GLIDE_DDPM, True, True, ("grad",)),
}

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# The step's coefficients (fastgen.ops.diffusion_step's layout) per sampler, for the torch.compile baseline.
COEFFS = {
    "ddim": lambda abar: D.ddim_coeffs(abar, T, T_PREV, 0.0, "epsilon"),
    "ddpm-learned": lambda abar: D.ddpm_coeffs(abar, T, "epsilon", "learned_range"),
    "dpm++2m": lambda abar: D.dpm_solver_2m_coeffs(abar, T, T_PREV, T_LAST, "epsilon"),
}


def compiled_step(name: str, abar: torch.Tensor, c: int, dtype: torch.dtype, extras=()):
    """The strongest plain-PyTorch rival: the whole step written in plain torch (float32 math, one
    rounding to the input dtype, like fastgen) with the step's scalars as Python constants, compiled by
    ``torch.compile`` (Inductor fuses it into one or two loops; dynamic thresholding adds a quantile).
    Takes the same (x, model_output, **kw) as the fused call; model_output is GLIDE-style [cond; uncond]."""
    k = [float(v) for v in next(f for key, f in COEFFS.items() if name.startswith(key))(abar)]
    ax, am, ex, em, ex2, ex0, cx, cx0, ceps, cprev, sigma, minlog, maxlog, mask = k[:14]
    learned = "learned" in name
    clip = 1.0 if ("inpaint" in extras or "grad" in extras or "clip" in name) else None
    dyn = 0.995 if "dynthresh" in name else None
    f32 = torch.float32

    def step(x, mo, guidance_scale, noise=None, prev_x0=None, known_image=None, known_mask=None,
             cond_grad=None, cond_grad_scale=1.0):  # fmt: skip
        b = x.shape[0]
        xv = x.to(f32)
        cond, unc = mo[:b, :c].to(f32), mo[b:, :c].to(f32)
        m = unc + guidance_scale * (cond - unc)
        x0 = ax * xv + am * m
        if known_image is not None:
            kp = known_mask.to(f32)
            x0 = x0 * (1.0 - kp) + known_image.to(f32) * kp
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        if dyn is not None:
            s = torch.quantile(x0.abs().reshape(b, -1), dyn, dim=1).clamp(min=1.0)
            s = s.reshape(b, *([1] * (x.dim() - 1)))
            x0 = torch.minimum(torch.maximum(x0, -s), s) / s
        if clip is None and dyn is None and known_image is None:
            eps = ex * xv + em * m
        else:
            eps = ex2 * xv + ex0 * x0
        xp = cx * xv + cx0 * x0 + ceps * eps
        if prev_x0 is not None:
            xp = xp + cprev * prev_x0.to(f32)
        v = mo[:b, c:].to(f32) if learned else None
        if cond_grad is not None:
            var = (
                torch.exp((v + 1) * 0.5 * maxlog + (1 - (v + 1) * 0.5) * minlog) if learned else sigma * sigma
            )
            xp = xp + var * cond_grad_scale * cond_grad.to(f32)
        if noise is not None:
            sd = (
                torch.exp(0.5 * ((v + 1) * 0.5 * maxlog + (1 - (v + 1) * 0.5) * minlog)) if learned else sigma
            )
            xp = xp + mask * sd * noise.to(f32)
        return xp.to(dtype), x0.to(dtype)

    # every case compiles the same code object with other constants: without room for all of them,
    # Dynamo would fall back to eager after 8 cases (the row would then time eager, not compiled, code)
    dyn_cfg = torch._dynamo.config
    dyn_cfg.recompile_limit = max(dyn_cfg.recompile_limit, 256)
    return torch.compile(step, dynamic=False)


def shapes(device: torch.device, quick: bool):
    if device.type == "cuda":
        if quick and headline_mode():  # the README's ratio: 64 x 3 x 256 x 256, vs unfused and copy bandwidth
            return [((64, 3, 256, 256), torch.float32)]
        if quick:
            return [((16, 3, 256, 256), torch.float32)]
        return [
            ((64, 3, 256, 256), torch.float32),
            ((64, 3, 256, 256), torch.bfloat16),
            ((16, 4, 96, 96), torch.float16),
        ]
    if quick:
        return [((4, 3, 64, 64), torch.float32)]
    # a latent batch that sits in L2 / L3, and a pixel-space batch that streams from memory
    return [
        (shape, dtype)
        for shape in ((16, 4, 64, 64), (8, 3, 256, 256))
        for dtype in (torch.float32, torch.bfloat16)
    ]


@register(
    op="diffusion_step", description="fused sampler step: CFG + x0/eps + clip/threshold + update + noise"
)
def diffusion_step_cases(device: torch.device, quick: bool):
    for shape, dtype in shapes(device, quick):
        names = ["ddim+cfg+clip"] if quick else list(SAMPLERS)
        for name in names:
            yield make_case(device, shape, dtype, name)


def make_case(device: torch.device, shape, dtype: torch.dtype, name: str) -> Case:
    fused, ref, learned, noisy, *more = SAMPLERS[name]
    extras = more[0] if more else ()
    b, c = shape[:2]
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape, generator=g).to(device, dtype)
    c_out = 2 * c if learned else c
    mo = torch.randn((2 * b, c_out, *shape[2:]), generator=g).to(device, dtype)
    if learned:
        mo[:, c:] = mo[:, c:].tanh()
    abar = SCHED.alphas_cumprod.to(device)
    abar_cpu = SCHED.alphas_cumprod
    kw = {"guidance_scale": GUIDANCE}
    if noisy:
        kw["noise"] = torch.randn(shape, generator=g).to(device, dtype)
    if name.startswith("dpm"):
        kw["prev_x0"] = torch.randn(shape, generator=g).to(device, dtype)
    if "inpaint" in extras:  # a full-shape mask, as the samplers pass it (expanded once per loop)
        kw["known_image"] = torch.rand(shape, generator=g).to(device, dtype) * 2 - 1
        kw["known_mask"] = (torch.rand((b, 1, *shape[2:]), generator=g) > 0.5).to(device, dtype).expand(shape)
        kw["known_mask"] = kw["known_mask"].contiguous()
    if "grad" in extras:
        kw["cond_grad"] = torch.randn(shape, generator=g).to(device, dtype)
        kw["cond_grad_scale"] = 3.0
    elem = x.element_size() * x.numel()
    reads = 3 + (1 if learned else 0) + (1 if noisy else 0) + (1 if "prev_x0" in kw else 0)
    reads += 2 * ("inpaint" in extras) + ("grad" in extras)
    nbytes = (reads + 2) * elem  # + x_prev and pred_x0 written
    # oracle: the reference formulas computed in float32; for 16-bit inputs the same ops in the input
    # dtype (what a user's scheduler does) is a second baseline
    impls = [
        Impl("reference", lambda: ref(x, mo, abar_cpu, compute_dtype=torch.float32, **kw), baseline=True)
    ]
    if dtype != torch.float32:
        impls.append(
            Impl(
                f"reference-{DTYPE_NAMES[dtype]}",
                lambda: ref(x, mo, abar_cpu, compute_dtype=dtype, **kw),
                baseline=True,
            )
        )
    compiled = compiled_step(name, SCHED.alphas_cumprod, c, dtype, extras)
    impls.append(Impl("torch.compile", lambda: compiled(x, mo, **kw), baseline=True))
    call = Call(x.device, dtype, {"n": x[0].numel()})
    impls += backend_impls("diffusion_step", call, lambda backend: lambda: fused(x, mo, abar, **kw))
    low = dtype != torch.float32
    return Case(
        f"{name} {'x'.join(map(str, shape))} {DTYPE_NAMES[dtype]}",
        impls,
        bytes=nbytes,
        params={"sampler": name, "shape": list(shape), "dtype": DTYPE_NAMES[dtype], "guidance": GUIDANCE},
        # fastgen computes in float32 and rounds once to the output dtype
        atol=2e-2 if low else 2e-4,
        rtol=1e-2 if low else 1e-4,
    )


@register(
    op="step_overhead",
    description="the Python cost of one step at a tiny shape: raw kernel vs Sampler.step vs the per-step API",
)
def step_overhead_cases(device: torch.device, quick: bool):
    """At 1 x 4 x 8 x 8 the kernel is ~2 us on a CPU, so each row's time over the raw entry point is the cost
    of its Python path (validation, dispatch, views). Ratios here are < 1 by construction: they show the
    tax, not a speed-up. The sampler validates once (first step) and then takes its fast path; the per-step
    functions validate a schedule and their arguments once, then take the fast lane. One case per step
    function, and the whole sampling loop (50 steps, an identity model) against a loop of raw calls."""
    yield _overhead_ddim(device)
    if not quick:
        yield from _overhead_per_function(device)
        yield _overhead_loop(device)


def _raw(device, x, coeffs, clip=0.0, prev=None):
    """The raw entry point on (1, N) views of x (and of x as the model output), x_prev viewed back."""
    xf = x.view(1, -1)
    backend = D.OP.dispatch(Call(x.device, x.dtype, {"n": xf.shape[1]}))
    pf = prev.view(1, -1) if prev is not None else None
    args = (xf, xf, None, 0, coeffs, pf, None, None, None, 1.0, clip, 0, 0, 0, 0, True, False, None, None, None,
            0.0)  # fmt: skip
    return backend, args


def _overhead_ddim(device):
    from fastgen.diffusion import DDIMSampler

    x = torch.randn(1, 4, 8, 8, device=device)
    eps = torch.randn(1, 4, 8, 8, device=device)
    smp = DDIMSampler(SCHED, clip_sample=1.0)
    smp.step(T, x, eps)  # the first step validates and plans
    coeffs = smp.coefficients(device, torch.float32)[T]
    abar = SCHED.alphas_cumprod.to(device)
    backend, args = _raw(device, x, coeffs, clip=1.0)
    args = (args[0], eps.view(1, -1), *args[2:])
    impls = [
        Impl(f"raw kernel[{backend.name}]", lambda: backend.fn(*args)[0].view(x.shape), baseline=True),
        Impl("Sampler.step", lambda: smp.step(T, x, eps)[0]),
        Impl("sampler_step(coeffs)", lambda: D.sampler_step(x, eps, coeffs, clip_sample=1.0)[0]),
        Impl("ddim_step(abar, t, t_prev)", lambda: D.ddim_step(x, eps, abar, T, T_PREV, clip_sample=1.0)[0]),
        Impl("torch.library op", lambda: D._sampler_step_op(*args)[0].view(x.shape)),
    ]
    return Case("ddim+clip 1x4x8x8 fp32", impls, params={"shape": [1, 4, 8, 8], "dtype": "fp32"}, atol=1e-6,
                rtol=1e-6)  # fmt: skip


def _overhead_per_function(device):
    """ddpm_step (a noise tensor), euler_step, dpm_solver_2m_step (prev_x0): each against its raw call."""
    x = torch.randn(1, 4, 8, 8, device=device)
    prev = torch.randn(1, 4, 8, 8, device=device)
    abar = SCHED.alphas_cumprod.to(device)
    cases = {
        "ddpm_step(abar, t)": (
            D.ddpm_coeffs(abar, T, "epsilon", "fixed_small"),
            lambda: D.ddpm_step(x, x, abar, T, noise=x)[0],
            None,
        ),
        "euler_step(abar, t, t_prev)": (
            D.euler_coeffs(abar, T, T_PREV, "epsilon"),
            lambda: D.euler_step(x, x, abar, T, T_PREV)[0],
            None,
        ),
        "dpm_solver_2m_step(abar, t, t_prev)": (
            D.dpm_solver_2m_coeffs(abar, T, T_PREV, T_LAST, "epsilon"),
            lambda: D.dpm_solver_2m_step(x, x, abar, T, T_PREV, prev_x0=prev, t_last=T_LAST)[0],
            prev,
        ),
    }
    for name, (coeffs, call, pv) in cases.items():
        backend, args = _raw(device, x, coeffs.float(), prev=pv)
        if name.startswith("ddpm"):  # the noise tensor (noise_mode 1)
            args = (*args[:6], args[0], *args[7:12], 1, *args[13:])
        impls = [
            Impl(
                f"raw kernel[{backend.name}]",
                lambda b=backend, a=args: b.fn(*a)[0].view(x.shape),
                baseline=True,
            ),
            Impl(name, call),
        ]
        yield Case(f"{name.split('(')[0]} 1x4x8x8 fp32", impls, params={"shape": [1, 4, 8, 8], "dtype": "fp32"},
                   atol=1e-6, rtol=1e-6)  # fmt: skip


def _overhead_loop(device):
    """DDIMSampler(clip).sample over 50 steps with an identity model vs the same loop of raw calls."""
    from fastgen.diffusion import DDIMSampler

    shape = (1, 4, 8, 8)
    x_t = torch.randn(shape, device=device)
    smp = DDIMSampler(SCHED, clip_sample=1.0)
    table = smp.coefficients(device, torch.float32)
    backend = D.OP.dispatch(Call(x_t.device, x_t.dtype, {"n": x_t[0].numel()}))

    def identity(x, t):
        return x

    def raw_loop():
        x = x_t.view(1, -1)
        for i in range(SCHED.num_timesteps - 1, -1, -1):
            x, _ = backend.fn(x, x, None, 0, table[i], None, None, None, None, 1.0, 1.0, 0, 0, 0, 0, True, False,
                              None, None, None, 0.0)  # fmt: skip
        return x.view(shape)

    impls = [
        Impl(f"raw kernel loop[{backend.name}]", raw_loop, baseline=True),
        Impl("Sampler.sample", lambda: smp.sample(identity, shape, x_T=x_t, device=device, progress=False)),
    ]
    return Case("ddim+clip sample() 50 steps 1x4x8x8 fp32", impls, params={"shape": list(shape), "steps": 50},
                atol=1e-6, rtol=1e-6)  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main(only=["diffusion_step", "step_overhead"]))

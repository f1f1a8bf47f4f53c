"""Benchmark: GLIDE sampling (``fastgen.models.glide``): the guided base model and the upsampler.

Two kinds of case, on the same weights (random; the released architecture at GPU sizes):

* ``sample``: a whole sampling call (text encoded once, then ``steps`` denoising steps) for a batch of
  prompts; images/s = batch / time (``images_per_call`` is in the params). The base model is run with
  classifier-free guidance (scale 3: each step is one model call on the doubled batch), the upsampler
  without, as released.
* ``step``: one denoising step (model call + sampler update) at the middle timestep: the per-step time.
* ``inpaint``: a whole inpainting call (``sample_inpaint``: the inpainting base model, CFG, the known
  region forced into every step's x0 inside the fused step; the oracle does it with ``ddpm_step_ref``'s
  separate ops).

The upsampler rows sample with DDPM on both paths (the oracle's loop), not the DDIM default.

Implementations:

* ``plain (torch sdpa + *_ref steps)`` (the oracle): the model's attention through
  ``torch.nn.functional.scaled_dot_product_attention`` and the unfused sampler math
  (``fastgen.ops.diffusion_step.ddpm_step_ref``: CFG, x0, clip, posterior, learned variance, noise as
  separate PyTorch ops), with the same counter-based noise, so it computes the same samples;
* ``fastgen[torch]``: the fastgen code path with every op forced to its torch backend
  (``fastgen.use_backend("torch")``);
* ``fastgen``: ``fastgen.flash_attention`` in the UNet and text encoder, fused sampler steps.

Correctness: in float32, samples must agree with the oracle to 1e-3 (the chain amplifies rounding). In
bf16 / fp16 the paths round differently at every step, so the gate is the mean absolute difference
(< 0.05 on images in [-1, 1]); the detail reports it. No FLOP count: the time is split over convolutions,
attention and the sampler, so the table reports ms and images/s (ratios against the baselines).
"""

from __future__ import annotations

import torch

import fastgen
from fastgen.bench import Case, Check, Impl, main, register
from fastgen.diffusion.samplers import INIT_NOISE_STEP
from fastgen.models.glide import GLIDE, from_name, make_sampler, sample_base, sample_inpaint, sample_upsample
from fastgen.ops.diffusion_step import counter_normal_ref, ddpm_step_ref

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
GUIDANCE = 3.0


def shapes(device: torch.device, quick: bool):
    """(preset, overrides, batch, steps, kinds)."""
    if device.type != "cuda":
        tiny = [("glide-tiny", {}, 2, "4", ("sample", "step"))]
        return (
            tiny
            if quick
            else [
                *tiny,
                ("glide-upsample-tiny", {}, 2, "4", ("sample", "step")),
                ("glide-inpaint-tiny", {}, 2, "4", ("inpaint",)),
            ]
        )
    if quick:
        return [("glide-base", {}, 4, "10", ("sample", "step"))]
    return [
        ("glide-base", {}, 8, "100", ("sample", "step")),
        ("glide-upsample", {}, 4, "fast27", ("sample", "step")),
        ("glide-base-inpaint", {}, 8, "100", ("inpaint",)),
    ]


@register(op="glide", description="GLIDE sampling: guided base 64x64 and 64->256 upsampler, fastgen vs plain")
def glide_cases(device: torch.device, quick: bool):
    dtypes = [torch.float32] if device.type != "cuda" else [torch.bfloat16]
    if device.type == "cuda" and not quick:
        dtypes.append(torch.float16)
    for preset, over, batch, steps, kinds in shapes(device, quick):
        for dtype in dtypes:
            model = _model(preset, over, device, dtype)
            for kind in kinds:
                yield make_case(model, preset, device, dtype, batch, steps, kind)


def _model(preset, over, device, dtype) -> GLIDE:
    torch.manual_seed(0)
    model = GLIDE(from_name(preset, **over)).eval()
    with torch.no_grad():  # the release zero-inits the output convs; random weights make every path work
        for p in model.parameters():
            if p.dim() > 1 and not p.abs().sum() > 0:
                p.normal_(0, 0.02)
    return model.to(device, dtype)


def _inputs(model: GLIDE, device, batch: int):
    cfg = model.cfg
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, cfg.n_vocab, (batch, min(cfg.text_ctx, 12)), generator=g).to(device)
    low = None
    if cfg.super_res:
        low = (torch.rand(batch, 3, cfg.low_res_size, cfg.low_res_size, generator=g) * 2 - 1).to(device)
    return tokens, low


def plain_sample(model: GLIDE, tokens, low, steps: str, seed: int):
    """The oracle: plain SDPA in the model, the *_ref sampler step, the same counter-based noise."""
    cfg, dev = model.cfg, tokens.device
    guided = not cfg.super_res
    b = tokens.shape[0]
    toks, mask = model.prepare_tokens(tokens)
    if guided:
        toks, mask = model.with_empty_prompt(toks, mask)
    model.attention_impl = "torch"
    try:
        text = model.encode_text(toks, mask)
        sched = make_sampler(cfg, steps).schedule.to(dev)
        size = cfg.image_size
        shape = (b, cfg.in_channels, size, size)
        abar, tmap = sched.alphas_cumprod, sched.timestep_map
        x = counter_normal_ref(shape, seed, INIT_NOISE_STEP, device=dev).float()
        if cfg.super_res:
            x = x * 0.997
        for i in range(sched.num_timesteps - 1, -1, -1):
            t = tmap[i].expand(b)
            xin, tin = (torch.cat([x, x]), torch.cat([t, t])) if guided else (x, t)
            out = model(xin, tin, low_res=low, text=text)
            noise = counter_normal_ref(shape, seed, int(tmap[i]), device=dev).float()
            x, _ = ddpm_step_ref(x, out, abar, i, variance_type="learned_range", noise=noise, clip_sample=1.0,
                                 guidance_scale=GUIDANCE if guided else None)  # fmt: skip
        return x
    finally:
        model.attention_impl = "fastgen"


def _known(model: GLIDE, batch: int, device):
    """A known image in [-1, 1] and a mask (1 = keep) with a hole of half the image."""
    s = model.cfg.image_size
    g = torch.Generator().manual_seed(2)
    image = (torch.rand(batch, 3, s, s, generator=g) * 2 - 1).to(device)
    keep = torch.ones(batch, 1, s, s)
    keep[:, :, s // 4 : 3 * s // 4] = 0
    return image, keep.to(device)


def plain_inpaint(model: GLIDE, tokens, image, keep, steps: str, seed: int):
    """The inpainting oracle: plain SDPA, ``ddpm_step_ref`` with the known region, the same noise."""
    cfg, dev = model.cfg, tokens.device
    b = tokens.shape[0]
    toks, mask = model.with_empty_prompt(*model.prepare_tokens(tokens))
    model.attention_impl = "torch"
    try:
        text = model.encode_text(toks, mask)
        sched = make_sampler(cfg, steps).schedule.to(dev)
        shape = tuple(image.shape)
        abar, tmap = sched.alphas_cumprod, sched.timestep_map
        x = counter_normal_ref(shape, seed, INIT_NOISE_STEP, device=dev).float()
        kw = {"inpaint_image": torch.cat([image, image]), "inpaint_mask": torch.cat([keep, keep])}
        for i in range(sched.num_timesteps - 1, -1, -1):
            t = tmap[i].expand(b)
            out = model(torch.cat([x, x]), torch.cat([t, t]), text=text, **kw)
            noise = counter_normal_ref(shape, seed, int(tmap[i]), device=dev).float()
            x, _ = ddpm_step_ref(x, out, abar, i, variance_type="learned_range", noise=noise, clip_sample=1.0,
                                 guidance_scale=GUIDANCE, known_image=image, known_mask=keep)  # fmt: skip
        return x
    finally:
        model.attention_impl = "fastgen"


def fastgen_sample(model: GLIDE, tokens, low, steps: str, seed: int):
    if model.cfg.super_res:
        return sample_upsample(model, low, tokens, steps=steps, seed=seed, progress=False, sampler="ddpm")
    return sample_base(model, tokens, guidance_scale=GUIDANCE, steps=steps, seed=seed, progress=False)


def step_fns(model: GLIDE, tokens, low, steps: str, seed: int, i: int):
    """One denoising step from index i (x = the initial noise): (plain, fastgen) zero-argument callables.

    The text encoding, the schedule and the noise are prepared once, outside the timed calls.
    """
    cfg, dev = model.cfg, tokens.device
    guided = not cfg.super_res
    b = tokens.shape[0]
    toks, mask = model.prepare_tokens(tokens)
    if guided:
        toks, mask = model.with_empty_prompt(toks, mask)
    with torch.no_grad():
        text = model.encode_text(toks, mask)
    smp = make_sampler(cfg, steps, guidance_scale=GUIDANCE if guided else None)
    smp.coefficients(dev)
    abar = smp.schedule.alphas_cumprod.to(dev)
    shape = (b, cfg.in_channels, cfg.image_size, cfg.image_size)
    x = counter_normal_ref(shape, seed, INIT_NOISE_STEP, device=dev).float()
    t = smp.schedule.timestep_map[i].to(dev).expand(b)
    xin, tin = (torch.cat([x, x]), torch.cat([t, t])) if guided else (x, t)
    noise = counter_normal_ref(shape, seed, int(smp.schedule.timestep_map[i]), device=dev).float()

    @torch.no_grad()
    def plain():
        model.attention_impl = "torch"
        try:
            out = model(xin, tin, low_res=low, text=text)
        finally:
            model.attention_impl = "fastgen"
        return ddpm_step_ref(x, out, abar, i, variance_type="learned_range", noise=noise, clip_sample=1.0,
                             guidance_scale=GUIDANCE if guided else None)[0]  # fmt: skip

    @torch.no_grad()
    def fused():
        return smp.step(i, x, model(xin, tin, low_res=low, text=text), seed=seed)[0]

    return plain, fused


def sample_check(dtype: torch.dtype):
    """The first output judged (the oracle; baselines run first) is the reference."""
    state = {}
    exact = dtype == torch.float32

    def check(out: torch.Tensor) -> Check:
        if "ref" not in state:
            state["ref"] = out
            return Check(bool(torch.isfinite(out).all()), 0.0, "oracle")
        diff = (out.float() - state["ref"].float()).abs()
        worst, mean = float(diff.max()), float(diff.mean())
        ok = worst <= 1e-3 if exact else mean < 0.05
        return Check(ok, worst, f"max abs diff {worst:.2e}, mean {mean:.2e}")

    return check


def make_case(model: GLIDE, preset: str, device, dtype, batch: int, steps: str, kind: str) -> Case:
    tokens, low = _inputs(model, device, batch)
    seed = 7
    n_steps = make_sampler(model.cfg, steps).num_steps
    mid = n_steps // 2

    if kind == "sample":

        def run_plain():
            with torch.no_grad():
                return plain_sample(model, tokens, low, steps, seed)

        def run_fastgen():
            return fastgen_sample(model, tokens, low, steps, seed)
    elif kind == "inpaint":
        image, keep = _known(model, batch, device)

        def run_plain():
            with torch.no_grad():
                return plain_inpaint(model, tokens, image, keep, steps, seed)

        def run_fastgen():
            return sample_inpaint(model, image, keep, tokens, guidance_scale=GUIDANCE, steps=steps, seed=seed,
                                  progress=False)  # fmt: skip
    else:
        run_plain, run_fastgen = step_fns(model, tokens, low, steps, seed, mid)

    def run_torch_backend():
        with fastgen.use_backend("torch"):
            return run_fastgen()

    impls = [
        Impl("plain (torch sdpa + *_ref steps)", run_plain, baseline=True),
        Impl("fastgen[torch]", run_torch_backend, baseline=True),
        Impl("fastgen", run_fastgen),
    ]
    cfg = model.cfg
    guided = not cfg.super_res
    name = (
        f"{kind} {preset} B{batch} {cfg.image_size}px steps={steps}({n_steps})"
        f"{' cfg' if guided else ''} {DTYPE_NAMES[dtype]}"
    )
    params = {"kind": kind, "preset": preset, "batch": batch, "image_size": cfg.image_size, "steps": steps,
              "num_steps": n_steps if kind == "sample" else 1, "guidance": GUIDANCE if guided else None,
              "model_batch": 2 * batch if guided else batch, "dtype": DTYPE_NAMES[dtype],
              "images_per_call": batch if kind in ("sample", "inpaint") else 0}  # fmt: skip
    return Case(name, impls, params=params, check=sample_check(dtype))


if __name__ == "__main__":
    raise SystemExit(main(only=["glide"]))

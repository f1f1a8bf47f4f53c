"""Benchmark: fastgen.diffusers' drop-in schedulers vs diffusers' own, scheduler time only.

The "model output" is a fixed random tensor, so only ``scheduler.step`` is timed: one step (per-step rows)
and a whole 50-step loop including ``set_timesteps`` (what a pipeline pays per generation). fastgen's step
is one fused pass; diffusers' a chain of elementwise ops. Bytes per step (analytic, fastgen's pass): reads
x, the model output (x2 with guidance: the doubled batch), the noise and the previous model output where
the sampler needs them; writes x_prev and pred_x0 (x0 / the multistep history for DPM-Solver).
"""

from __future__ import annotations

import torch

from fastgen._backend import Call
from fastgen.bench import Case, Impl, backend_impls, main, register

try:
    import diffusers

    import fastgen.diffusers as fd
except ImportError:  # pragma: no cover - diffusers is a test extra
    diffusers = None

STEPS = 50
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
# name -> (scheduler class, config, extra tensors read per step besides x and the model output)
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {**SD, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}, 0),
    "euler_a": ("EulerAncestralDiscreteScheduler", {**SD, "timestep_spacing": "trailing"}, 1),
    "dpm++2m": ("DPMSolverMultistepScheduler", SD, 1),
    "ddpm+clip": ("DDPMScheduler", {"clip_sample": True}, 1),
}


def _shapes(device: torch.device, quick: bool):
    if quick:
        return [(1, 4, 64, 64)]
    if device.type == "cuda":
        return [(1, 4, 64, 64), (8, 4, 64, 64), (8, 4, 128, 128)]
    return [(1, 4, 64, 64), (8, 4, 64, 64)]


@register(
    op="diffusers", description="drop-in diffusers schedulers: one step and a 50-step loop, scheduler only"
)
def diffusers_cases(device: torch.device, quick: bool):
    if diffusers is None:
        return
    names = ["dpm++2m"] if quick else list(SCHEDULERS)
    for shape in _shapes(device, quick):
        for name in names:
            for guided in (False, True) if not quick else (False,):
                yield make_case(device, shape, name, guided, loop=False)
            yield make_case(device, shape, name, False, loop=True)


def _scaled(sched) -> None:
    """A pipeline calls ``scale_model_input`` before each step; the fixed model output stands in for it."""
    if hasattr(sched, "is_scale_input_called"):
        sched.is_scale_input_called = True


def _reset(sched, index: int, history: list | None) -> None:
    """Puts a multistep / indexed scheduler back at step ``index`` so a single step can be repeated."""
    _scaled(sched)
    if hasattr(sched, "_step_index"):
        sched._step_index = index
    if history is not None:
        sched.model_outputs = list(history)
        sched.lower_order_nums = len([h for h in history if h is not None])


def make_case(device: torch.device, shape, name: str, guided: bool, loop: bool) -> Case:
    cls_name, config, extra = SCHEDULERS[name]
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device)
    rows = 2 * shape[0] if guided else shape[0]
    mo = torch.randn((rows, *shape[1:]), generator=gen).to(device)
    prev = torch.randn(shape, generator=gen).to(device)
    g = 7.5
    scheds = {}
    for label, mod in (("reference", diffusers), ("fastgen", fd)):
        s = getattr(mod, cls_name).from_config(getattr(diffusers, cls_name)(**config).config)
        s.set_timesteps(STEPS, device=device)
        scheds[label] = s
    idx = STEPS // 2
    t = scheds["reference"].timesteps[idx]
    history = [prev, prev] if name.startswith("dpm") else None

    def ref_step(s):
        def fn():
            _reset(s, idx, history)
            m = mo
            if guided:
                u, c = mo.chunk(2)
                m = u + g * (c - u)
            return s.step(m, t, x, generator=torch.Generator(device).manual_seed(1)).prev_sample

        return fn

    def fg_step(s):
        def fn():
            _reset(s, idx, history)
            kw = {"guidance_scale": g} if guided else {}
            return s.step(mo, t, x, generator=torch.Generator(device).manual_seed(1), **kw).prev_sample

        return fn

    def whole_loop(s):
        def fn():
            s.set_timesteps(STEPS, device=device)
            _scaled(s)
            gen_ = torch.Generator(device).manual_seed(1)
            y = x
            for tt in s.timesteps:
                y = s.step(mo, tt, y, generator=gen_).prev_sample
            return y

        return fn

    ref_fn, fg_fn = (whole_loop, whole_loop) if loop else (ref_step, fg_step)
    impls = [Impl("reference", ref_fn(scheds["reference"]), baseline=True)]

    def make(backend):
        return fg_fn(scheds["fastgen"])

    call = Call(x.device, x.dtype, {"n": x[0].numel()})
    impls += backend_impls("diffusion_step", call, make)
    elem = x.numel() * x.element_size()
    reads = 1 + (2 if guided else 1) + extra
    per_step = (reads + 2) * elem
    what = f"loop{STEPS}" if loop else ("step+cfg" if guided else "step")
    return Case(
        f"{name} {what} {'x'.join(map(str, shape))} fp32",
        impls,
        bytes=per_step * (STEPS if loop else 1),
        params={
            "scheduler": cls_name,
            "shape": list(shape),
            "guidance": g if guided else None,
            "loop_steps": STEPS if loop else 1,
        },
        # identical up to float32 rounding; a 50-step loop accumulates it
        atol=1e-4 if loop else 1e-5,
        rtol=1e-4 if loop else 1e-5,
    )


if __name__ == "__main__":
    raise SystemExit(main(only=["diffusers"]))

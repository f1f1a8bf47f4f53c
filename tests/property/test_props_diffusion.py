"""Properties of the fused diffusion steps (ddpm / ddim / euler / euler ancestral / dpm-solver-2m)."""

import math

import pytest
import torch
from _props import (
    FLOATS,
    LAYOUTS,
    READ_ONLY_LAYOUTS,
    Case,
    assert_2x,
    backends,
    make,
    raises_naming,
    scaled,
    seeds,
)
from hypothesis import given
from hypothesis import strategies as st

import fastgen
from fastgen.ops import diffusion_step as D

STEPS = 40
SAMPLERS = (
    "ddpm_small",
    "ddpm_large",
    "ddpm_learned",
    "ddim",
    "ddim_eta",
    "euler",
    "euler_anc",
    "dpm1",
    "dpm2",
)
DTYPES = {"torch": FLOATS, "cpp": (torch.float32, torch.float16, torch.bfloat16)}


def schedule():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)[torch.linspace(0, 999, STEPS).round().long()]


def run(sampler, fused, x, mo, abar, t, t_prev, noise, prev, kw):
    """One step of ``sampler``: the fused op (fused=True) or its reference (kw may carry compute_dtype)."""
    m = D if fused else None
    ref = {} if fused else {"compute_dtype": kw.pop("compute_dtype")}
    kw = {**kw, **ref}
    if sampler.startswith("ddpm"):
        var = {"ddpm_small": "fixed_small", "ddpm_large": "fixed_large", "ddpm_learned": "learned_range"}[
            sampler
        ]
        f = m.ddpm_step if fused else D.ddpm_step_ref
        return f(x, mo, abar, t, variance_type=var, noise=noise, **kw)
    if sampler.startswith("ddim"):
        f = m.ddim_step if fused else D.ddim_step_ref
        return f(x, mo, abar, t, t_prev, 0.7 if sampler == "ddim_eta" else 0.0, noise, **kw)
    if sampler == "euler":
        return (m.euler_step if fused else D.euler_step_ref)(x, mo, abar, t, t_prev, **kw)
    if sampler == "euler_anc":
        f = m.euler_ancestral_step if fused else D.euler_ancestral_step_ref
        return f(x, mo, abar, t, t_prev, noise=noise, **kw)
    f = m.dpm_solver_2m_step if fused else D.dpm_solver_2m_step_ref
    if sampler == "dpm2":
        return f(x, mo, abar, t, t_prev, prev_x0=prev, t_last=t + 3, **kw)
    return f(x, mo, abar, t, t_prev, **kw)


@st.composite
def step_cases(draw, min_batch=1, max_batch=3):
    backend = draw(st.sampled_from(backends("cpp", "torch")))
    dtype = draw(st.sampled_from(DTYPES[backend]))
    sampler = draw(st.sampled_from(SAMPLERS))
    b, c = draw(st.integers(min_batch, max_batch)), draw(st.integers(1, 4))
    spatial = tuple(draw(st.lists(st.integers(1, 7), min_size=0, max_size=2)))
    t = draw(st.integers(4, STEPS - 4))
    t_prev = draw(st.sampled_from([t - 3, -1])) if sampler not in ("dpm2",) else t - 3
    guidance = draw(st.sampled_from(["none", "doubled", "separate"]))
    kw = {"prediction_type": draw(st.sampled_from(["epsilon", "sample", "v_prediction"]))}
    if sampler == "dpm2":
        kw["prediction_type"] = "epsilon"
    post = draw(st.sampled_from(["none", "clip", "threshold"]))
    if post == "clip":
        kw["clip_sample"] = draw(st.sampled_from([0.5, 1.0, 3.0]))
    elif post == "threshold":
        kw["dynamic_threshold"] = draw(st.sampled_from([0.9, 0.995, (0.8, 2.0)]))
    gen = torch.Generator().manual_seed(draw(seeds))
    layouts = [draw(st.sampled_from(LAYOUTS)) for _ in range(2)] + [draw(st.sampled_from(READ_ONLY_LAYOUTS))]
    shape = (b, c, *spatial)
    c_out = 2 * c if sampler == "ddpm_learned" else c
    mo_rows = 2 * b if guidance == "doubled" else b
    x = make(shape, dtype, layouts[0], gen, scale=draw(st.sampled_from([1.0, 0.05, 20.0])))
    mo = make((mo_rows, c_out, *spatial), dtype, layouts[2], gen)
    if sampler == "ddpm_learned":  # the variance channels interpolate in [-1, 1]
        mo = mo.clone()
        mo[:, c:] = mo[:, c:].clamp(-1, 1)
    if guidance != "none":
        kw["guidance_scale"] = draw(st.sampled_from([1.0, 3.5, 7.5]))
        kw["guidance_rescale"] = draw(st.sampled_from([0.0, 0.7]))
    if guidance == "separate":
        kw["uncond_output"] = make((b, c_out, *spatial), dtype, layouts[1], gen)
    noise = make(shape, dtype, layouts[1], gen)
    prev = make(shape, dtype, layouts[0], gen)
    return Case(backend, dtype, sampler, (x, mo, schedule(), t, t_prev, noise, prev), kw)


def _up(v):
    return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v


@scaled(2)
@given(step_cases())
def test_step_matches_reference(case):
    backend, dtype, sampler, args, kw = case
    with fastgen.use_backend(backend, op="diffusion_step"):
        out, x0 = run(sampler, True, *args, dict(kw))
    assert out.dtype == dtype and x0.dtype == dtype
    args64 = [_up(a) for a in args]
    kw64 = {k: _up(v) for k, v in kw.items()}
    ref_out, ref_x0 = run(sampler, False, *args64, {**kw64, "compute_dtype": torch.float64})
    same_out, same_x0 = run(sampler, False, *args, {**kw, "compute_dtype": dtype})
    assert_2x(out, ref_out, same_out, dtype, f"{sampler} x_prev")
    assert_2x(x0, ref_x0, same_x0, dtype, f"{sampler} pred_x0")


@given(step_cases(min_batch=0, max_batch=0))
def test_step_empty_batch(case):
    """Batch 0 gives empty (x_prev, pred_x0) of the input's shape, as torch ops do."""
    backend, _, sampler, args, kw = case
    kw.pop("guidance_rescale", None)
    with fastgen.use_backend(backend, op="diffusion_step"):
        out, x0 = run(sampler, True, *args, dict(kw))
    assert out.shape == args[0].shape and x0.shape == args[0].shape


def _base(gen):
    x = make((2, 3, 5), torch.float32, "contiguous", gen)
    return {
        "x_t": x,
        "model_output": make((2, 3, 5), torch.float32, "contiguous", gen),
        "alphas_cumprod": schedule(),
        "t": 20,
        "t_prev": 17,
    }


def _sched(values):
    return lambda a: a.update(alphas_cumprod=torch.tensor(values, dtype=torch.float64))


# (label, samplers it applies to, mutation of the keyword arguments, names the error must mention)
ALL = ("ddpm", "ddim", "euler", "euler_ancestral", "dpm")
WITH_T_PREV = ("ddim", "euler", "euler_ancestral", "dpm")
INVALID = [
    ("x_t int", ALL, lambda a: a.update(x_t=a["x_t"].to(torch.int32)), ["x_t"]),
    ("x_t complex", ALL, lambda a: a.update(x_t=a["x_t"].to(torch.complex64)), ["x_t"]),
    ("x_t 1-D", ALL, lambda a: a.update(x_t=a["x_t"][0, 0], model_output=a["model_output"][0, 0]), ["x_t"]),
    ("x_t not a tensor", ALL, lambda a: a.update(x_t=a["x_t"].tolist()), ["x_t"]),
    ("model_output shape", ALL, lambda a: a.update(model_output=a["model_output"][:, :2]), ["model_output"]),
    ("model_output rows", ALL, lambda a: a.update(model_output=a["model_output"][:1]), ["model_output"]),
    (
        "model_output meta",
        ALL,
        lambda a: a.update(model_output=a["model_output"].to("meta")),
        ["model_output"],
    ),
    (
        "model_output complex",
        ALL,
        lambda a: a.update(model_output=a["model_output"].to(torch.complex64)),
        ["model_output"],
    ),
    ("model_output not a tensor", ALL, lambda a: a.update(model_output=1.0), ["model_output"]),
    (
        "alphas_cumprod 2-D",
        ALL,
        lambda a: a.update(alphas_cumprod=a["alphas_cumprod"][None]),
        ["alphas_cumprod"],
    ),
    (
        "alphas_cumprod int",
        ALL,
        lambda a: a.update(alphas_cumprod=(a["alphas_cumprod"] * 100).long()),
        ["alphas_cumprod"],
    ),
    (
        "alphas_cumprod meta",
        ALL,
        lambda a: a.update(alphas_cumprod=a["alphas_cumprod"].to("meta")),
        ["alphas_cumprod"],
    ),
    ("alphas_cumprod NaN", ALL, _sched([0.99] * 10 + [float("nan")] * 30), ["alphas_cumprod"]),
    ("alphas_cumprod > 1", ALL, _sched([1.5] * 40), ["alphas_cumprod"]),
    ("alphas_cumprod 0", ALL, _sched([0.0] * 40), ["alphas_cumprod"]),
    ("alphas_cumprod negative", ALL, _sched([-0.5] * 40), ["alphas_cumprod"]),
    ("alphas_cumprod increasing", ALL, _sched(torch.linspace(0.01, 0.99, 40).tolist()), ["alphas_cumprod"]),
    ("t out of range", ALL, lambda a: a.update(t=40), ["t"]),
    ("t negative", ALL, lambda a: a.update(t=-1), ["t"]),
    ("t float", ALL, lambda a: a.update(t=20.5), ["t"]),
    ("t string", ALL, lambda a: a.update(t="20"), ["t"]),
    ("t float tensor", ALL, lambda a: a.update(t=torch.tensor(20.0)), ["t"]),
    ("t two elements", ALL, lambda a: a.update(t=torch.tensor([20, 19])), ["t"]),
    ("t_prev out of range", WITH_T_PREV, lambda a: a.update(t_prev=-2), ["t_prev"]),
    ("t_prev float", WITH_T_PREV, lambda a: a.update(t_prev=16.5), ["t_prev"]),
    ("t_prev > t", WITH_T_PREV, lambda a: a.update(t_prev=25), ["t_prev"]),
    ("eta negative", ("ddim",), lambda a: a.update(eta=-0.5), ["eta"]),
    ("eta NaN", ("ddim",), lambda a: a.update(eta=float("nan")), ["eta"]),
    ("eta inf", ("ddim",), lambda a: a.update(eta=float("inf")), ["eta"]),
    ("noise shape", ("ddpm", "euler_ancestral"), lambda a: a.update(noise=a["x_t"][:, :2]), ["noise"]),
    ("noise meta", ("ddpm", "euler_ancestral"), lambda a: a.update(noise=a["x_t"].to("meta")), ["noise"]),
    ("prediction_type", ALL, lambda a: a.update(prediction_type="noise"), ["prediction_type"]),
    ("variance_type", ("ddpm",), lambda a: a.update(variance_type="small"), ["variance_type"]),
    ("clip_sample 0", ALL, lambda a: a.update(clip_sample=0.0), ["clip_sample"]),
    ("clip_sample NaN", ALL, lambda a: a.update(clip_sample=float("nan")), ["clip_sample"]),
    ("guidance_scale NaN", ALL, lambda a: a.update(guidance_scale=float("nan")), ["guidance_scale"]),
    ("guidance_scale inf", ALL, lambda a: a.update(guidance_scale=float("inf")), ["guidance_scale"]),
    (
        "guidance_rescale NaN",
        ALL,
        lambda a: a.update(
            guidance_scale=2.0, guidance_rescale=float("nan"), model_output=torch.cat([a["model_output"]] * 2)
        ),
        ["guidance_rescale"],
    ),
    (
        "guidance_rescale 2",
        ALL,
        lambda a: a.update(
            guidance_scale=2.0, guidance_rescale=2.0, model_output=torch.cat([a["model_output"]] * 2)
        ),
        ["guidance_rescale"],
    ),
    ("dynamic_threshold 0", ALL, lambda a: a.update(dynamic_threshold=0.0), ["dynamic_threshold"]),
    ("dynamic_threshold NaN", ALL, lambda a: a.update(dynamic_threshold=float("nan")), ["dynamic_threshold"]),
    ("dynamic_threshold max", ALL, lambda a: a.update(dynamic_threshold=(0.9, 0.5)), ["dynamic_threshold"]),
    ("unknown keyword", ALL, lambda a: a.update(guidance_sclae=3.0), ["guidance_sclae"]),
    ("prev_x0 without t_last", ("dpm",), lambda a: a.update(prev_x0=a["x_t"]), ["prev_x0", "t_last"]),
    ("prev_x0 shape", ("dpm",), lambda a: a.update(prev_x0=a["x_t"][:1], t_last=23), ["prev_x0"]),
]


def call_sampler(name, a):
    a = dict(a)
    x, mo, abar, t = a.pop("x_t"), a.pop("model_output"), a.pop("alphas_cumprod"), a.pop("t")
    t_prev = a.pop("t_prev")
    f = {
        "ddpm": D.ddpm_step,
        "ddim": D.ddim_step,
        "euler": D.euler_step,
        "euler_ancestral": D.euler_ancestral_step,
        "dpm": D.dpm_solver_2m_step,
    }[name]
    if name == "ddpm":
        return f(x, mo, abar, t, **a)
    return f(x, mo, abar, t, t_prev, **a)


@pytest.mark.parametrize("case", INVALID, ids=[c[0] for c in INVALID])
@given(data=st.data())
def test_step_rejects_bad_input(case, data):
    _, applies, mutate, names = case
    sampler = data.draw(st.sampled_from(applies))
    backend = data.draw(st.sampled_from(backends("cpp", "torch")))
    seed = data.draw(seeds)
    a = _base(torch.Generator().manual_seed(seed))
    mutate(a)
    with fastgen.use_backend(backend, op="diffusion_step"), raises_naming(*names):
        call_sampler(sampler, a)


def test_invalid_table_is_sound():
    """Every unmutated base call is valid, so each INVALID row tests its one mutation."""
    for name in ALL:
        a = _base(torch.Generator().manual_seed(0))
        out, _ = call_sampler(name, a)
        assert math.isfinite(out.sum().item())

"""The fast lane of the public step functions (``sampler_step``, ``ddim_step``, ...): a repeated eager call
of the common kind skips the full path's checks and normalisation, gives the full path's bits, and never
accepts what the full path refuses."""

import math

import pytest
import torch

import fastgen
from fastgen.ops import diffusion_step as D

AX = D.AX


def schedule(steps=40):
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    return abar[torch.linspace(0, 999, steps).round().long()]


def tensors(dtype=torch.float32, shape=(2, 3, 4, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    b, c = shape[:2]

    def r(*s):
        return torch.randn(s, generator=g).to(dtype)

    return {
        "x": r(*shape),
        "mo": r(*shape),
        "mo2": r(2 * b, c, *shape[2:]),  # [cond; uncond]
        "mo_learned": torch.cat([r(*shape), r(*shape).tanh()], 1),
        "uncond": r(*shape),
        "noise": r(*shape),
        "prev": r(*shape),
        "img": r(*shape),
        "keep": (torch.rand(shape, generator=g) > 0.5).to(dtype),
    }


# name -> f(abar, tensors) for the kinds of call the lane serves
CALLS = {
    "ddim": lambda a, v: D.ddim_step(v["x"], v["mo"], a, 20, 10),
    "ddim+cfg+clip": lambda a, v: D.ddim_step(v["x"], v["mo2"], a, 20, 10, clip_sample=1.0, guidance_scale=3),
    "ddim+uncond+eta+noise": lambda a, v: D.ddim_step(
        v["x"], v["mo"], a, 20, 10, eta=0.5, noise=v["noise"], guidance_scale=2.5, uncond_output=v["uncond"]
    ),
    "ddim+eta+seed": lambda a, v: D.ddim_step(v["x"], v["mo"], a, 20, -1, eta=1, seed=5, sample_offset=3),
    "ddpm-learned+cfg": lambda a, v: D.ddpm_step(
        v["x"],
        torch.cat([v["mo_learned"]] * 2),
        a,
        7,
        variance_type="learned_range",
        guidance_scale=4.0,
        seed=1,
    ),
    "ddpm+noise+v": lambda a, v: D.ddpm_step(v["x"], v["mo"], a, 7, noise=v["noise"], prediction_type="v"),
    "ddpm-learned+inpaint+grad": lambda a, v: D.ddpm_step(
        v["x"],
        v["mo_learned"],
        a,
        7,
        variance_type="learned_range",
        clip_sample=1.0,
        seed=3,
        known_image=v["img"],
        known_mask=v["keep"],
        cond_grad=v["noise"],
        cond_grad_scale=2.5,
    ),
    "euler": lambda a, v: D.euler_step(v["x"], v["mo"], a, 20, 10),
    "euler_a": lambda a, v: D.euler_ancestral_step(v["x"], v["mo"], a, 20, 10, seed=2),
    "dpm": lambda a, v: D.dpm_solver_2m_step(v["x"], v["mo"], a, 20, 10, prev_x0=v["prev"], t_last=30),
    "dpm-first+clip": lambda a, v: D.dpm_solver_2m_step(v["x"], v["mo"], a, 20, 10, clip_sample=2.0),
    "sampler_step": lambda a, v: D.sampler_step(
        v["x"], v["mo2"], D.ddim_coeffs(a, 20, 10, 0.0, "epsilon").float(), guidance_scale=1.5, clip_sample=1
    ),
}


@pytest.fixture
def full_path_calls(monkeypatch):
    """Records the checks of the full paths: a per-step function's schedule check, sampler_step's options."""
    calls = []

    def counting(name):
        fn = getattr(D, name)

        def wrapper(*a, **k):
            calls.append(name)
            return fn(*a, **k)

        return wrapper

    for name in ("_check_schedule", "check_step_options"):
        monkeypatch.setattr(D, name, counting(name))
    return calls


def full_path_only(monkeypatch):
    monkeypatch.setattr(D, "_fast_step", lambda *a: None)
    monkeypatch.setattr(D, "_fast_coeffs", lambda *a: None)


@pytest.mark.parametrize(
    "backend", ["cpp", "torch"]
)  # the C++ entry takes (B, ...) tensors; torch gets views
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CALLS))
def test_repeated_call_takes_the_lane_with_the_full_paths_bits(
    name, dtype, backend, full_path_calls, monkeypatch
):
    if backend == "cpp" and D.OP.why_not("cpp", D.Call(torch.device("cpu"), dtype, {"n": 1}), forced=True):
        pytest.skip("fastgen._C is not built")
    with fastgen.use_backend(backend, op="diffusion_step"):
        _lane_vs_full(name, dtype, full_path_calls, monkeypatch)


def _lane_vs_full(name, dtype, full_path_calls, monkeypatch):
    D.clear_schedule_cache()
    abar, v = schedule(), tensors(dtype)
    # a per-step function's first call validates the schedule and caches the coefficients; sampler_step
    # checks everything of every call in the lane, the first one too
    first = CALLS[name](abar, v)
    assert bool(full_path_calls) == (name != "sampler_step")
    full_path_calls.clear()
    again = CALLS[name](abar, v)
    assert not full_path_calls, "the repeated call took the full path"
    full_path_only(monkeypatch)
    full = CALLS[name](abar, v)
    assert full_path_calls
    for got in (first, again):
        for a, b in zip(got, full):
            assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), name


def test_lane_steps_aside_for_what_it_does_not_serve(full_path_calls):
    abar, v = schedule(), tensors()
    x, mo = v["x"], v["mo"]
    D.ddim_step(x, mo, abar, 20, 10)
    for call in (
        lambda: D.ddim_step(
            x.mT.contiguous().mT, mo, abar, 20, 10
        ),  # non-contiguous: copied by the full path
        lambda: D.ddim_step(x, mo.double(), abar, 20, 10),  # another dtype: converted by the full path
        lambda: D.ddim_step(x, mo, abar, 20, 10, guidance_rescale=0.5, guidance_scale=2.0, uncond_output=mo),
        lambda: D.ddim_step(x, mo, abar, 20, 10, dynamic_threshold=0.9),
        lambda: D.ddim_step(x[:0], mo[:0], abar, 20, 10),  # empty
        lambda: D.ddim_step(x, mo, abar.clone(), 20, 10),  # a new schedule tensor is validated once
    ):
        full_path_calls.clear()
        call()
        assert full_path_calls


def test_lane_is_never_weaker_than_the_full_path():
    """After a valid call has cached its coefficients, every variant the full path refuses is still refused
    with its error (the cache key only matches arguments of the same plain types and values)."""
    abar, v = schedule(), tensors()
    x, mo, mo2 = v["x"], v["mo"], v["mo2"]
    D.ddim_step(x, mo, abar, 20, 10, eta=0.0)
    D.ddim_step(x, mo2, abar, 20, 10, guidance_scale=3.0, clip_sample=1.0)
    D.dpm_solver_2m_step(x, mo, abar, 20, 10, prev_x0=v["prev"], t_last=30)
    bad = [
        (TypeError, r"\bt must be an int", lambda: D.ddim_step(x, mo, abar, 20.0, 10)),
        (TypeError, r"\bt must be an int", lambda: D.ddim_step(x, mo, abar, True, 10)),
        (TypeError, "t_prev must be an int", lambda: D.ddim_step(x, mo, abar, 20, 10.0)),
        (TypeError, "eta", lambda: D.ddim_step(x, mo, abar, 20, 10, eta=False)),
        (ValueError, "eta", lambda: D.ddim_step(x, mo, abar, 20, 10, eta=-0.0 - 1e-300)),
        (ValueError, "prediction_type", lambda: D.ddim_step(x, mo, abar, 20, 10, prediction_type="epsilon ")),
        (TypeError, "guidance_scale", lambda: D.ddim_step(x, mo2, abar, 20, 10, guidance_scale=True)),
        (ValueError, "guidance_scale", lambda: D.ddim_step(x, mo2, abar, 20, 10, guidance_scale=math.inf)),
        (ValueError, "clip_sample", lambda: D.ddim_step(x, mo, abar, 20, 10, clip_sample=0.0)),
        (ValueError, "clip_sample", lambda: D.ddim_step(x, mo, abar, 20, 10, clip_sample=math.nan)),
        (ValueError, "model_output has shape", lambda: D.ddim_step(x, mo2, abar, 20, 10)),
        (ValueError, "model_output has shape", lambda: D.ddim_step(x, mo, abar, 20, 10, guidance_scale=2.0)),
        (ValueError, "uncond_output was given", lambda: D.ddim_step(x, mo, abar, 20, 10, uncond_output=mo)),
        (ValueError, "noise has shape", lambda: D.ddim_step(x, mo, abar, 20, 10, noise=mo[:1])),
        (TypeError, "unexpected keyword argument 'gudance_scale'",
         lambda: D.ddim_step(x, mo, abar, 20, 10, gudance_scale=2.0)),
        (ValueError, "prev_x0 and t_last", lambda: D.dpm_solver_2m_step(x, mo, abar, 20, 10, prev_x0=v["prev"])),
        (ValueError, "prev_x0 has shape",
         lambda: D.dpm_solver_2m_step(x, mo, abar, 20, 10, prev_x0=v["prev"][:1], t_last=30)),
        (ValueError, "coeffs must be", lambda: D.sampler_step(x, mo, torch.zeros(15))),
        (ValueError, "known_image and known_mask go together",
         lambda: D.ddim_step(x, mo, abar, 20, 10, known_image=v["img"])),
        (ValueError, "known_mask has shape",
         lambda: D.ddim_step(x, mo, abar, 20, 10, known_image=v["img"], known_mask=v["keep"][:, :, :2])),
        (ValueError, "known_mask has shape",  # a mask larger than x_t in a size-1 dim does not broadcast to it
         lambda: D.ddim_step(x[:1], mo[:1], abar, 20, 10, known_image=v["img"][:1], known_mask=v["keep"])),
        (ValueError, "cond_grad_scale", lambda: D.ddim_step(x, mo, abar, 20, 10, cond_grad=x, cond_grad_scale=math.nan)),
        (TypeError, "cond_grad_scale", lambda: D.ddim_step(x, mo, abar, 20, 10, cond_grad=x, cond_grad_scale=True)),
    ]  # fmt: skip
    for err, match, call in bad:
        with pytest.raises(err, match=match):
            call()
    # a schedule edited in place after the hit is validated again
    abar[5] = 2.0
    with pytest.raises(ValueError, match="alphas_cumprod"):
        D.ddim_step(x, mo, abar, 20, 10, eta=0.0)

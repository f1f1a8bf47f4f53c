"""Edge cases of the fused diffusion steps: bad arguments, NaN, empty batches, the coefficient cache."""

import numpy as np
import pytest
import torch

import fastgen
from fastgen import _ext
from fastgen.diffusion.samplers import DDIMSampler
from fastgen.diffusion.schedules import SCHEDULE_NAMES, NoiseSchedule
from fastgen.ops import diffusion_step as D

BACKENDS = ["torch", "triton"]
if _ext.C is not None:
    BACKENDS.append("cpp")
if torch.cuda.is_available():
    BACKENDS.append("cuda")


def device_for(backend):
    return "cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu"


def schedule(t=40, device="cpu"):
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    return abar[torch.linspace(0, 999, t).round().long()].to(device)


def inputs(shape=(2, 3, 4, 5), device="cpu", seed=0, rows=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    mo = torch.randn((rows or shape[0], *shape[1:]), generator=g)
    return x.to(device), mo.to(device)


# Every per-step function as f(x, model_output, alphas_cumprod, t, t_prev, **kw).
STEPS = {
    "ddpm": lambda x, mo, a, t, tp, **kw: D.ddpm_step(x, mo, a, t, **kw),
    "ddim": lambda x, mo, a, t, tp, **kw: D.ddim_step(x, mo, a, t, tp, **kw),
    "euler": lambda x, mo, a, t, tp, **kw: D.euler_step(x, mo, a, t, tp, **kw),
    "euler_a": lambda x, mo, a, t, tp, **kw: D.euler_ancestral_step(x, mo, a, t, tp, **kw),
    "dpm": lambda x, mo, a, t, tp, **kw: D.dpm_solver_2m_step(x, mo, a, t, tp, **kw),
}
WITH_T_PREV = ["ddim", "euler", "euler_a", "dpm"]


@pytest.mark.parametrize("name", list(STEPS))
def test_unknown_keyword_is_a_type_error(name):
    x, mo = inputs()
    with pytest.raises(TypeError, match="unexpected keyword argument 'gudance_scale'"):
        STEPS[name](x, mo, schedule(), 20, 10, gudance_scale=3.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'needs_noise'"):
        STEPS[name](x, mo, schedule(), 20, 10, needs_noise=True)


BAD_T = [
    20.9,
    20.0,
    "20",
    True,
    np.float64(20.0),
    np.bool_(True),
    torch.tensor(20.0),
    torch.tensor(True),
    None,
]


@pytest.mark.parametrize("t", BAD_T, ids=repr)
def test_non_integer_t_is_a_type_error(t):
    x, mo = inputs()
    for name, step in STEPS.items():
        with pytest.raises(TypeError, match=r"\bt must be an int"):
            step(x, mo, schedule(), t, 10)
        if name in WITH_T_PREV:
            with pytest.raises(TypeError, match=r"\bt_prev must be an int"):
                step(x, mo, schedule(), 30, t)


def test_integer_like_t_is_accepted():
    x, mo = inputs()
    abar = schedule()
    want, _ = D.ddim_step(x, mo, abar, 20, 10)
    for t, tp in ((np.int64(20), np.int32(10)), (torch.tensor(20), torch.tensor(10, dtype=torch.int16))):
        got, _ = D.ddim_step(x, mo, abar, t, tp)
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("name", list(STEPS))
@pytest.mark.parametrize("arg", ["x_t", "model_output"])
def test_complex_and_non_tensor_inputs_are_type_errors(name, arg):
    x, mo = inputs()
    for bad in (lambda t: t.to(torch.complex64), lambda t: t.tolist()):
        args = {"x_t": x, "model_output": mo}
        args[arg] = bad(args[arg])
        with pytest.raises(TypeError, match=arg):
            STEPS[name](args["x_t"], args["model_output"], schedule(), 20, 10)


def test_complex_and_non_tensor_optional_inputs_are_type_errors():
    x, mo = inputs()
    abar = schedule()
    for bad in (x.to(torch.complex64), x.tolist()):
        with pytest.raises(TypeError, match="noise"):
            D.ddim_step(x, mo, abar, 20, 10, eta=1.0, noise=bad)
        with pytest.raises(TypeError, match="uncond_output"):
            D.ddim_step(x, mo, abar, 20, 10, guidance_scale=2.0, uncond_output=bad)
        with pytest.raises(TypeError, match="prev_x0"):
            D.dpm_solver_2m_step(x, mo, abar, 20, 10, prev_x0=bad, t_last=30)
    with pytest.raises(TypeError, match="alphas_cumprod"):
        D.ddim_step(x, mo, abar.tolist(), 20, 10)
    with pytest.raises(TypeError, match="alphas_cumprod"):
        D.ddim_step(x, mo, abar.to(torch.complex128), 20, 10)
    with pytest.raises(TypeError, match="coeffs"):
        D.sampler_step(x, mo, D.ddim_coeffs(abar, 20, 10, 0.0, "epsilon").tolist())


@pytest.mark.parametrize("eta", [float("inf"), float("nan"), -0.5])
def test_eta_must_be_finite_and_non_negative(eta):
    x, mo = inputs()
    with pytest.raises(ValueError, match="eta"):
        D.ddim_step(x, mo, schedule(), 20, 10, eta=eta)
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(NoiseSchedule.from_name("linear", 10), eta=eta)


@pytest.mark.parametrize("eta", ["0.5", True, None, 0.5j])
def test_eta_must_be_a_real_number(eta):
    x, mo = inputs()
    with pytest.raises(TypeError, match="eta"):
        D.ddim_step(x, mo, schedule(), 20, 10, eta=eta)


def _bad_schedules():
    a = schedule()
    increasing = a.flip(0)
    above_one = a.clone()
    above_one[0] = 1.5
    zero_inside = a.clone()
    zero_inside[30:] = 0.0
    negative = a.clone()
    negative[-1] = -1e-3
    nan = a.clone()
    nan[5] = float("nan")
    return {"increasing": increasing, "above_one": above_one, "zero_inside": zero_inside, "negative": negative,
            "nan": nan}  # fmt: skip


@pytest.mark.parametrize("case", list(_bad_schedules()))
def test_invalid_schedule_is_rejected(case):
    x, mo = inputs()
    for step in STEPS.values():
        with pytest.raises(ValueError, match="alphas_cumprod"):
            step(x, mo, _bad_schedules()[case], 20, 10)
        with pytest.raises(ValueError, match="alphas_cumprod"):  # tensor timesteps take the same check
            step(x, mo, _bad_schedules()[case], torch.tensor(20), torch.tensor(10))


@pytest.mark.parametrize("sched", SCHEDULE_NAMES)
def test_package_schedules_are_accepted(sched):
    x, mo = inputs()
    s = NoiseSchedule.from_name(sched, 50)
    for abar in (s.alphas_cumprod, s.respace("ddim10").alphas_cumprod):
        out, _ = D.ddim_step(x, mo, abar, abar.numel() - 1, -1)
        assert torch.isfinite(out).all()


def test_zero_terminal_snr_schedule_is_accepted():
    """max_beta=1 gives beta=1 at the last step, so alphas_cumprod[-1] == 0 exactly (zero terminal SNR)."""
    abar = NoiseSchedule.from_name("cosine", 50, max_beta=1.0).alphas_cumprod
    assert abar[-1] == 0
    x, mo = inputs()
    out, x0 = D.ddim_step(x, mo, abar, 49, 40, prediction_type="v_prediction")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(x0, -mo)  # at zero SNR, v = -x0
    for step in (D.euler_step, D.euler_ancestral_step):  # sigma is infinite at zero SNR
        with pytest.raises(ValueError, match="zero terminal SNR"):
            step(x, mo, abar, 49, 40)
        out, _ = step(x, mo, abar, 48, 40)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", WITH_T_PREV)
@pytest.mark.parametrize("t_prev", [20, 25, 39])
def test_t_prev_must_be_below_t(name, t_prev):
    x, mo = inputs()
    with pytest.raises(ValueError, match="t_prev"):
        STEPS[name](x, mo, schedule(), 20, t_prev)
    with pytest.raises(ValueError, match="t_prev"):
        STEPS[name](x, mo, schedule(), torch.tensor(20), torch.tensor(t_prev))


def test_dpm_t_last_must_be_above_t():
    x, mo = inputs()
    for t_last in (20, 15):
        with pytest.raises(ValueError, match="t_last"):
            D.dpm_solver_2m_step(x, mo, schedule(), 20, 10, prev_x0=x, t_last=t_last)


EMPTY_SHAPES = [(0, 3, 4, 5), (2, 0, 4, 5), (2, 3, 0, 5)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
def test_empty_inputs_give_empty_results(backend, shape):
    dev = device_for(backend)
    abar = schedule(device=dev)
    for extra in ("plain", "dynamic", "guided"):
        kw, rows = {"seed": 3}, shape[0]
        if extra == "dynamic":
            kw["dynamic_threshold"] = 0.9
        elif extra == "guided":
            kw.update(guidance_scale=3.0, guidance_rescale=0.5)
            rows = 2 * shape[0]
        x, mo = inputs(shape, device=dev, rows=rows)
        for name, step in STEPS.items():
            with fastgen.use_backend(backend):
                out, x0 = step(x, mo, abar, 20, 10, **kw)
            assert out.shape == shape and x0.shape == shape, (name, extra)
            assert out.dtype == x.dtype and x0.dtype == x.dtype


def _nan_case(where, device):
    x, mo = inputs((2, 3, 4, 5), device=device, seed=1)
    x = x * 3
    if where == "x_t":
        x[0, 1, 2, 3] = float("nan")
    else:
        mo[0, 2, 1, 0] = float("nan")
    return x, mo


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["x_t", "model_output"])
@pytest.mark.parametrize("clip", [None, "static", "dynamic"])
def test_nan_propagates_as_in_the_reference(backend, where, clip):
    dev = device_for(backend)
    x, mo = _nan_case(where, dev)
    abar = schedule(device=dev)
    kw = {"clip_sample": 1.0} if clip == "static" else {"dynamic_threshold": 0.9} if clip == "dynamic" else {}
    with fastgen.use_backend(backend):
        out, x0 = D.ddim_step(x, mo, abar, 25, 15, **kw)
    ref, ref0 = D.ddim_step_ref(x.cpu().double(), mo.cpu().double(), abar.cpu(), 25, 15,
                                compute_dtype=torch.float64, **kw)  # fmt: skip
    for got, want in ((out, ref), (x0, ref0)):
        got = got.cpu().double()
        assert torch.equal(got.isnan(), want.isnan())
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, equal_nan=True)
    if clip == "dynamic":  # a NaN makes the whole sample's threshold NaN; the other sample is untouched
        assert out[0].isnan().all() and not out[1].isnan().any()
    else:
        assert out.isnan().sum() == 1


def _ddim_ref(x, mo, abar, t, t_prev):
    return D.ddim_step_ref(x.double(), mo.double(), abar, t, t_prev, compute_dtype=torch.float64)


def test_cache_sees_edits_through_data():
    x, mo = inputs()
    abar = schedule()
    D.ddim_step(x, mo, abar, 20, 10)
    abar.data[20] *= 0.9  # .data writes do not bump the version counter
    out, x0 = D.ddim_step(x, mo, abar, 20, 10)
    ref, ref0 = _ddim_ref(x, mo, abar.clone(), 20, 10)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x0.double(), ref0, atol=1e-5, rtol=1e-5)


def test_cache_sees_a_new_schedule_at_the_same_address():
    x, mo = inputs()
    buf = schedule().numpy().copy()
    first = torch.from_numpy(buf)
    D.ddim_step(x, mo, first, 20, 10)
    buf[:] = schedule(80).numpy()[::2]  # another schedule in the same memory, version counter 0
    second = torch.from_numpy(buf)
    assert second.data_ptr() == first.data_ptr() and second._version == first._version
    out, _ = D.ddim_step(x, mo, second, 20, 10)
    ref, _ = _ddim_ref(x, mo, second.clone(), 20, 10)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_cache_sees_in_place_edits():
    x, mo = inputs()
    abar = schedule()
    D.euler_step(x, mo, abar, 20, 10)
    abar[10] = abar[10] * 0.95
    out, _ = D.euler_step(x, mo, abar, 20, 10)
    ref, _ = D.euler_step_ref(x.double(), mo.double(), abar.clone(), 20, 10, compute_dtype=torch.float64)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_cache_on_gpu_tracks_the_tensor_and_its_version():
    """On a GPU the cache keys on the tensor object (not its address) and its version counter."""
    x, mo = inputs(device="cuda")
    first = schedule(device="cuda")
    D.ddim_step(x, mo, first, 20, 10)
    del first
    second = schedule(80, device="cuda")[::2].contiguous()  # likely at the freed schedule's address
    out, _ = D.ddim_step(x, mo, second, 20, 10)
    ref, _ = _ddim_ref(x.cpu(), mo.cpu(), second.cpu(), 20, 10)
    torch.testing.assert_close(out.cpu().double(), ref, atol=1e-5, rtol=1e-5)
    second[20] = second[20] * 0.9  # an in-place write bumps the version
    out, _ = D.ddim_step(x, mo, second, 20, 10)
    ref, _ = _ddim_ref(x.cpu(), mo.cpu(), second.cpu(), 20, 10)
    torch.testing.assert_close(out.cpu().double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_blocks_per_sample_and_several_samples(backend):
    """The Triton grid folds the batch into x (grid y stops at 65,535 samples): every (sample, block) pair
    is one program, so samples of more than one block, with seeded noise, must land where the reference puts
    them."""
    dev = device_for(backend)
    x, mo = inputs((3, 2, 40, 30), device=dev, seed=4)  # 2,400 elements: 3 blocks of 1,024 per sample
    abar = schedule(device=dev)
    with fastgen.use_backend(backend):
        out, x0 = D.ddpm_step(x, mo, abar, 25, seed=9, sample_offset=2)
    ref, ref0 = D.ddpm_step_ref(x.cpu(), mo.cpu(), abar.cpu(), 25, seed=9, sample_offset=2)
    torch.testing.assert_close(out.cpu(), ref, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(x0.cpu(), ref0, rtol=2e-5, atol=2e-6)

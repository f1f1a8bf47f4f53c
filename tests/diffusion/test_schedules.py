"""Noise schedules and timestep respacing: known values, hand-computed step lists, the numpy formulas the
diffusers schedulers use, respacing invariants and input errors."""

import math

import numpy as np
import pytest
import torch

from fastgen.diffusion.schedules import NoiseSchedule, betas_for_schedule, space_timesteps, spaced_timesteps

# ---------------------------------------------------------------------------------------------- betas


def test_linear_endpoints_and_scaling():
    b = betas_for_schedule("linear", 1000)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert b[-1].item() == pytest.approx(0.02, rel=1e-12)
    assert torch.allclose(b.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))
    # ADM scales the endpoints by 1000 / T, so T = 100 runs from 1e-3 to 0.2.
    b100 = betas_for_schedule("linear", 100)
    assert (b100[0].item(), b100[-1].item()) == pytest.approx((1e-3, 0.2), rel=1e-12)
    # Explicit endpoints are used unscaled.
    b = betas_for_schedule("linear", 100, beta_start=1e-4, beta_end=0.02)
    assert (b[0].item(), b[-1].item()) == pytest.approx((1e-4, 0.02), rel=1e-12)


@pytest.mark.parametrize("name", ["cosine", "squaredcos_cap_v2"])
def test_cosine_matches_closed_form(name):
    T = 1000
    sched = NoiseSchedule.from_name(name, T)

    def f(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    closed = torch.tensor([f((i + 1) / T) / f(0.0) for i in range(T)], dtype=torch.float64)
    # The last beta is capped at 0.999 (1 - f(1)/f(0.999) is ~1), so the closed form holds before it.
    assert torch.allclose(sched.alphas_cumprod[:-1], closed[:-1], rtol=1e-12, atol=0)
    assert sched.betas[-1].item() == 0.999
    assert (sched.betas[:-1] < 0.999).all()
    assert betas_for_schedule("cosine", T, max_beta=0.5).max().item() == 0.5


def test_scaled_linear_endpoints():
    b = betas_for_schedule("scaled_linear", 1000)
    assert (b[0].item(), b[-1].item()) == pytest.approx((0.00085, 0.012), rel=1e-12)
    mid = ((math.sqrt(0.00085) + math.sqrt(0.012)) / 2) ** 2  # an odd count has a middle entry
    assert betas_for_schedule("scaled_linear", 999)[499].item() == pytest.approx(mid, rel=1e-12)
    b = betas_for_schedule("scaled_linear", 10, beta_start=0.01, beta_end=0.04)
    assert torch.allclose(b.sqrt(), torch.linspace(0.1, 0.2, 10, dtype=torch.float64))


def test_betas_errors():
    with pytest.raises(ValueError, match="schedule name"):
        betas_for_schedule("quadratic", 10)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_timesteps"):
            betas_for_schedule("linear", bad)
    with pytest.raises(ValueError, match="beta_start"):  # 1000/10 * 0.02 = 2 > 1
        betas_for_schedule("linear", 10)
    with pytest.raises(ValueError, match="beta_start"):
        betas_for_schedule("linear", 10, beta_start=0.0, beta_end=0.02)
    with pytest.raises(ValueError, match="beta_start"):
        betas_for_schedule("cosine", 10, beta_start=1e-4)
    with pytest.raises(ValueError, match="beta_start"):
        betas_for_schedule("scaled_linear", 10, beta_start=-1.0)
    with pytest.raises(ValueError, match="max_beta"):
        betas_for_schedule("cosine", 10, max_beta=1.5)


# ------------------------------------------------------------------------------------ space_timesteps

# Hand computation of "10,10,3,2,2" at T=1000: five sections of 200.
#   10 steps: stride 199/9 = 22.11 -> 0, 22, 44, 66, 88, 111 (110.56), 133, 155, 177, 199 (+0 and +200)
#    3 steps: stride 199/2 = 99.5  -> 400, 500 (round(99.5) = 100, half to even), 599
#    2 steps: stride 199           -> 600, 799 and 800, 999
SECTIONS_10 = [0, 22, 44, 66, 88, 111, 133, 155, 177, 199]
ADM_10_10_3_2_2 = [*SECTIONS_10, *(200 + s for s in SECTIONS_10), 400, 500, 599, 600, 799, 800, 999]


def test_space_timesteps_sections_by_hand():
    assert space_timesteps(1000, "10,10,3,2,2") == ADM_10_10_3_2_2
    assert space_timesteps(1000, [10, 10, 3, 2, 2]) == ADM_10_10_3_2_2
    # T=50, "2,3": parts [0, 25) and [25, 50); strides 24/1 and 24/2.
    assert space_timesteps(50, "2,3") == [0, 24, 25, 37, 49]
    # T=11, [2, 3]: the first part is one longer: [0, 6) stride 5, [6, 11) stride 2.
    assert space_timesteps(11, [2, 3]) == [0, 5, 6, 8, 10]
    assert space_timesteps(11, [1, 5]) == [0, 6, 7, 8, 9, 10]
    # A count of 1 takes the part's first step, a count of 0 none.
    assert space_timesteps(12, [1, 1, 1]) == [0, 4, 8]
    assert space_timesteps(12, [0, 2]) == [6, 11]


def test_space_timesteps_fast27():
    steps = space_timesteps(1000, "fast27")
    assert len(steps) == 27 and 997 in steps and 999 not in steps
    assert steps == sorted([*ADM_10_10_3_2_2[:-1], 997])


def test_space_timesteps_ddim_and_single_section():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    assert space_timesteps(10, "ddim4") == [0, 3, 6, 9]
    for spec in ("100", 100, [100]):
        steps = space_timesteps(1000, spec)
        assert len(steps) == len(set(steps)) == 100 and steps == sorted(steps)
        assert steps[0] == 0 and steps[-1] == 999
    assert space_timesteps(1000, "1000") == list(range(1000))
    # ADM accumulates the float stride: at k=10 of "21", 10 * 49.95 rounds to 500 but the
    # accumulated 499.49999999999994 gives 499, which is the step ADM / GLIDE sample at.
    steps = space_timesteps(1000, "21")
    assert 499 in steps and 500 not in steps


def test_space_timesteps_errors():
    with pytest.raises(ValueError, match="section 1"):
        space_timesteps(50, "2,26")
    with pytest.raises(ValueError, match="ddim7"):  # range(0, 10, s) has 10, 5, 4, 3, 2 or 1 steps
        space_timesteps(10, "ddim7")
    with pytest.raises(ValueError, match="fast27"):
        space_timesteps(1000, "fast50")
    for bad in ("ddimx", "abc", "10,,2", "", 2.5):
        with pytest.raises(ValueError, match="section_counts"):
            space_timesteps(100, bad)
    for bad in ("0", [-1, 3], []):
        with pytest.raises(ValueError, match="section_counts"):
            space_timesteps(100, bad)
    with pytest.raises(ValueError, match="num_timesteps"):
        space_timesteps(0, "10")


# ----------------------------------------------------------------------------------- spaced_timesteps


def test_spaced_timesteps_by_hand():
    # T=1000, n=10. linspace: k * 999/9 = 111 k. leading: k * (1000 // 10). trailing: round(1000 - 100 k) - 1.
    assert spaced_timesteps(1000, 10, "linspace") == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert spaced_timesteps(1000, 10, "leading") == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert spaced_timesteps(1000, 10, "leading", steps_offset=1) == [
        901,
        801,
        701,
        601,
        501,
        401,
        301,
        201,
        101,
        1,
    ]
    assert spaced_timesteps(1000, 10, "trailing") == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    # T=1000, n=3, not divisible. linspace: 0, 499.5 -> 500 (half to even), 999. leading: 333 k.
    # trailing: 1000, 666.67, 333.33 -> 1000, 667, 333, minus 1.
    assert spaced_timesteps(1000, 3, "linspace") == [999, 500, 0]
    assert spaced_timesteps(1000, 3, "leading") == [666, 333, 0]
    assert spaced_timesteps(1000, 3, "trailing") == [999, 666, 332]
    assert spaced_timesteps(1000, 1, "linspace") == [0]
    assert spaced_timesteps(1000, 1, "trailing") == [999]
    assert spaced_timesteps(7, 7, "leading") == list(range(6, -1, -1))


def test_spaced_timesteps_match_numpy_formulas():
    """The diffusers expressions in numpy; trailing's float arange can run one step long (-1), which we drop."""
    for T in (1000, 50):
        for n in range(1, T + 1):
            lin = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64).tolist()
            lead = (np.arange(0, n) * (T // n))[::-1].tolist()
            trail = (np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1).tolist()
            assert spaced_timesteps(T, n, "linspace") == lin, (T, n)
            assert spaced_timesteps(T, n, "leading") == lead, (T, n)
            assert spaced_timesteps(T, n, "trailing") == trail[:n], (T, n)
    assert spaced_timesteps(1000, 61, "trailing")[-1] == 15  # numpy gives a 62nd step of -1 here


def test_spaced_timesteps_errors():
    for n in (0, 1001):
        with pytest.raises(ValueError, match="num_inference_steps"):
            spaced_timesteps(1000, n)
    with pytest.raises(ValueError, match="spacing"):
        spaced_timesteps(1000, 10, "karras")
    with pytest.raises(ValueError, match="steps_offset"):
        spaced_timesteps(1000, 1000, "leading", steps_offset=1)


# ------------------------------------------------------------------------------------- NoiseSchedule


def test_noise_schedule_quantities():
    s = NoiseSchedule.from_name("linear", 1000)
    b = s.betas
    abar = torch.cumprod(1 - b, 0)
    assert s.num_timesteps == 1000 and s.betas.dtype == torch.float64
    assert torch.equal(s.alphas_cumprod, abar)
    assert s.alphas_cumprod_prev[0].item() == 1.0 and torch.equal(s.alphas_cumprod_prev[1:], abar[:-1])
    pv = b[1:] * (1 - abar[:-1]) / (1 - abar[1:])
    assert s.posterior_variance[0].item() == 0.0
    assert torch.allclose(s.posterior_variance[1:], pv, rtol=1e-14, atol=0)
    assert s.posterior_log_variance_clipped[0].item() == s.posterior_log_variance_clipped[1].item()
    assert torch.allclose(s.posterior_log_variance_clipped[1:], pv.log(), rtol=1e-14, atol=0)
    # The posterior mean interpolates x0 and x_t: with x_t = sqrt(abar) x0 (no noise), mu = sqrt(abar_prev) x0.
    mu = s.posterior_mean_coef1 + s.posterior_mean_coef2 * abar.sqrt()
    assert torch.allclose(mu, s.alphas_cumprod_prev.sqrt(), rtol=1e-12, atol=0)
    assert torch.allclose(s.sigmas, ((1 - abar) / abar).sqrt(), rtol=1e-14, atol=0)
    assert torch.equal(s.timestep_map, torch.arange(1000)) and s.timestep_map.dtype == torch.long
    assert "num_timesteps=1000" in repr(s)


def test_respace_all_is_identity():
    s = NoiseSchedule.from_name("cosine", 200)
    r = s.respace(range(200))
    assert torch.allclose(r.betas, s.betas, rtol=1e-12, atol=0)
    assert torch.allclose(r.alphas_cumprod, s.alphas_cumprod, rtol=1e-12, atol=0)
    assert torch.equal(r.timestep_map, s.timestep_map)


@pytest.mark.parametrize("spec", ["ddim50", "fast27", "10,10,3,2,2", "100", 37])
def test_respace_keeps_alphas_cumprod(spec):
    s = NoiseSchedule.from_name("linear", 1000)
    kept = space_timesteps(1000, spec)
    r = s.respace(spec)
    assert r.num_timesteps == len(kept)
    assert r.timestep_map.tolist() == kept
    assert torch.allclose(r.alphas_cumprod, s.alphas_cumprod[kept], rtol=1e-12, atol=0)
    assert torch.equal(r.respace(torch.arange(len(kept)).flip(0)).timestep_map, r.timestep_map)


def test_respace_composes_timestep_map():
    s = NoiseSchedule.from_name("scaled_linear", 1000)
    r = s.respace("ddim50").respace([0, 10, 49, 10])  # unordered, with a duplicate
    assert r.timestep_map.tolist() == [0, 200, 980]
    assert torch.allclose(r.alphas_cumprod, s.alphas_cumprod[[0, 200, 980]], rtol=1e-12, atol=0)
    one = s.respace([999])
    assert one.num_timesteps == 1 and one.betas.item() == pytest.approx(1 - s.alphas_cumprod[-1].item())


def test_to_copies():
    s = NoiseSchedule.from_name("linear", 100).respace("ddim10")
    c = s.to("cpu")
    assert c is not s and c.betas is not s.betas and torch.equal(c.betas, s.betas)
    assert torch.equal(c.timestep_map, s.timestep_map) and c.num_timesteps == 10
    m = s.to("meta")
    assert m.alphas_cumprod.device.type == "meta" and m.timestep_map.device.type == "meta"
    assert m.betas.dtype == torch.float64 and m.timestep_map.dtype == torch.long
    assert s.betas.device.type == "cpu"


def test_noise_schedule_errors():
    for bad in ([], [[0.1, 0.2]], [0.1, 0.0], [0.1, 1.5], [float("nan")], [0.1, 1.0, 0.2]):
        with pytest.raises(ValueError, match="betas"):
            NoiseSchedule(bad)
    # a beta of 1 at the last step is zero terminal SNR: alphas_cumprod[-1] == 0, and respacing keeps it
    zsnr = NoiseSchedule([0.1, 0.2, 1.0])
    assert zsnr.alphas_cumprod[-1] == 0 and zsnr.respace([0, 2]).alphas_cumprod[-1] == 0
    with pytest.raises(ValueError, match="timestep_map"):
        NoiseSchedule([0.1, 0.2], timestep_map=[0, 1, 2])
    with pytest.raises(ValueError, match="timestep_map"):
        NoiseSchedule([0.1, 0.2], timestep_map=torch.tensor([0.0, 1.0]))
    s = NoiseSchedule.from_name("linear", 100)
    with pytest.raises(ValueError, match="use_timesteps"):
        s.respace([])
    with pytest.raises(ValueError, match="use_timesteps"):
        s.respace([0, 100])
    with pytest.raises(ValueError, match="section"):
        s.respace("200")

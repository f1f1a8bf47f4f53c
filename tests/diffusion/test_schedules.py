import math

import pytest
import torch

from fastgen.diffusion import NoiseSchedule, betas_for_schedule, space_timesteps, spaced_timesteps


def test_named_schedules():
    lin = betas_for_schedule("linear", 1000)
    assert lin[0].item() == pytest.approx(1e-4) and lin[-1].item() == pytest.approx(0.02)
    assert betas_for_schedule("linear", 250)[-1].item() == pytest.approx(0.08)  # scaled by 1000/T
    cos = NoiseSchedule.from_name("cosine", 1000)

    def f(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    for t in (0, 500, 900):  # alpha_bar_t = f((t+1)/T) / f(0) (closed form, no beta clipping there)
        assert cos.alphas_cumprod[t].item() == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-9)
    sl = betas_for_schedule("scaled_linear", 1000)
    assert sl[0].item() == pytest.approx(0.00085) and sl[-1].item() == pytest.approx(0.012)
    assert betas_for_schedule("cosine", 1000).max().item() <= 0.999


def test_respacing_rules():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    hundred = space_timesteps(1000, "100")
    assert len(hundred) == 100 and hundred[0] == 0 and hundred[-1] == 999
    fast = space_timesteps(1000, "fast27")
    assert len(fast) == 27 and 997 in fast and 999 not in fast
    # T=50 in two sections of 25: 2 steps -> {0, 24}; 3 steps -> {25, 37, 49}
    assert space_timesteps(50, "2,3") == [0, 24, 25, 37, 49]
    # T=11, sections of 6 and 5 (the first one longer)
    assert space_timesteps(11, [1, 5]) == [0, 6, 7, 8, 9, 10]


def test_spacings():
    assert spaced_timesteps(1000, 10, "leading") == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert spaced_timesteps(1000, 10, "leading", steps_offset=1)[0] == 901
    assert spaced_timesteps(1000, 10, "trailing") == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert spaced_timesteps(1000, 10, "linspace") == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]


def test_noise_schedule_respace():
    full = NoiseSchedule.from_name("linear", 1000)
    same = full.respace(range(1000))
    torch.testing.assert_close(same.betas, full.betas)
    keep = space_timesteps(1000, "fast27")
    sub = full.respace("fast27")
    torch.testing.assert_close(sub.alphas_cumprod, full.alphas_cumprod[keep])
    assert sub.timestep_map.tolist() == keep
    sub2 = sub.respace([0, 5, 26])  # nested respacing composes the maps
    assert sub2.timestep_map.tolist() == [keep[0], keep[5], keep[26]]
    torch.testing.assert_close(sub2.alphas_cumprod, full.alphas_cumprod[sub2.timestep_map])
    assert sub.posterior_log_variance_clipped[0] == sub.posterior_log_variance_clipped[1]
    torch.testing.assert_close(full.sigmas, ((1 - full.alphas_cumprod) / full.alphas_cumprod).sqrt())
    assert "T=27" in repr(sub)


def test_schedule_errors():
    with pytest.raises(ValueError, match="unknown schedule name"):
        betas_for_schedule("quadratic", 10)
    with pytest.raises(ValueError, match="num_timesteps"):
        betas_for_schedule("linear", 0)
    with pytest.raises(ValueError, match="cannot take 30 steps"):
        space_timesteps(50, "30,3")
    with pytest.raises(ValueError, match="only 'fast27'"):
        space_timesteps(1000, "fast30")
    with pytest.raises(ValueError, match="num_inference_steps"):
        spaced_timesteps(100, 0)
    with pytest.raises(ValueError, match="unknown spacing"):
        spaced_timesteps(100, 10, "middle")
    with pytest.raises(ValueError, match="timesteps to keep"):
        NoiseSchedule.from_name("linear", 100).respace([3, 120])

"""GLIDE upsampler sampling as the release's text-to-image notebook: DDIM (eta 0, fast27), x_T = 0.997 z."""

import torch
from test_glide import prompt, randomized

from fastgen.diffusion.samplers import INIT_NOISE_STEP
from fastgen.models.glide import from_name, make_sampler, sample_upsample, training_schedule
from fastgen.ops.diffusion_step import counter_normal


def _toy_eps(x, t):
    """A smooth stand-in for the model's eps (float64 throughout)."""
    return torch.tanh(0.7 * x + t.double().view(-1, 1, 1, 1) / 1000.0) + 0.1 * x.roll(1, dims=-1)


def test_ddim_fast27_loop_equals_the_release_ddim_sample_loop():
    """Own float64 transcription of gaussian_diffusion.ddim_sample_loop (eta 0, clip_denoised) on fast27."""
    cfg = from_name("glide-upsample-tiny", diffusion_steps=1000)
    sched = training_schedule(cfg).respace("fast27")
    assert sched.num_timesteps == 27
    g = torch.Generator().manual_seed(0)
    x_T = 0.997 * torch.randn(2, 3, 6, 5, dtype=torch.float64, generator=g)
    got = make_sampler(cfg, "fast27", sampler="ddim").sample(
        _toy_eps, x_T.shape, x_T=x_T, dtype=torch.float64, progress=False
    )
    abar = sched.alphas_cumprod.double()
    tmap = sched.timestep_map
    x = x_T
    for i in range(26, -1, -1):
        t = tmap[i].expand(2)
        eps = _toy_eps(x, t)
        x0 = ((1 / abar[i]).sqrt() * x - (1 / abar[i] - 1).sqrt() * eps).clamp(-1, 1)
        eps = ((1 / abar[i]).sqrt() * x - x0) / (1 / abar[i] - 1).sqrt()  # _predict_eps_from_xstart
        a_prev = abar[i - 1] if i > 0 else torch.tensor(1.0, dtype=torch.float64)
        x = x0 * a_prev.sqrt() + (1 - a_prev).sqrt() * eps
    torch.testing.assert_close(got, x, rtol=1e-9, atol=1e-9)


def test_sample_upsample_defaults_to_ddim_and_ddpm_is_selectable():
    up = randomized(from_name("glide-upsample-tiny"), seed=1)
    tokens, mask = prompt(up.cfg)
    low = torch.rand(2, 3, 8, 8) * 2 - 1
    default = sample_upsample(up, low, tokens, mask, steps="2", seed=5, progress=False)
    # the DDIM loop by hand: x_T = 0.997 z from the sampler's counter-based noise, eps channels only
    text = up.encode_text(tokens, mask)
    x_T = counter_normal((2, 3, 32, 32), 5, INIT_NOISE_STEP, 0) * 0.997
    with torch.no_grad():
        want = make_sampler(up.cfg, "2", sampler="ddim").sample(
            lambda x, t: up(x, t, low_res=low, text=text)[:, :3], x_T.shape, x_T=x_T, seed=5, progress=False
        )
    torch.testing.assert_close(default, want, rtol=0, atol=0)
    ddpm = sample_upsample(up, low, tokens, mask, steps="2", seed=5, progress=False, sampler="ddpm")
    assert torch.isfinite(ddpm).all() and not torch.allclose(ddpm, default)

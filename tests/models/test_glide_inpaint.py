"""GLIDE inpainting: the release's inpainting models (keys, shapes, input layout) and their sampling."""

import pytest
import torch
import torch.nn.functional as F
from test_glide import prompt, randomized, release_keys

from fastgen.models.glide import GLIDE, count_parameters, from_name


def test_inpaint_presets_match_the_release_parameter_counts():
    with torch.device("meta"):
        assert count_parameters(GLIDE(from_name("glide-base-inpaint"))) == 385_037_638
        assert count_parameters(GLIDE(from_name("glide-upsample-inpaint"))) == 398_368_198


def release_inpaint_shapes(cfg, plain_cfg):
    """Key -> shape of the release's inpainting model: the plain model's, but a wider first conv.

    Written from glide_text2im's InpaintText2ImUNet / SuperResInpaintText2ImUNet: in_channels * 2 + 1
    (x_t, image * mask, mask), plus in_channels more for the upsampler's low-res image; 6 outputs.
    """
    shapes = {k: tuple(v.shape) for k, v in GLIDE(plain_cfg).state_dict().items()}
    first_in = 3 + 3 + 1 + (3 if cfg.super_res else 0)
    shapes["input_blocks.0.0.weight"] = (cfg.model_channels, first_in, 3, 3)
    assert shapes["out.2.weight"] == (6, cfg.model_channels, 3, 3)
    return shapes


@pytest.mark.parametrize(
    "name, plain",
    [("glide-inpaint-tiny", "glide-tiny"), ("glide-upsample-inpaint-tiny", "glide-upsample-tiny")],
)
def test_inpaint_release_keys_and_shapes_load_strict(name, plain):
    cfg = from_name(name)
    model = GLIDE(cfg).eval()
    sd = model.state_dict()
    assert set(sd) == release_keys(cfg)
    assert {k: tuple(v.shape) for k, v in sd.items()} == release_inpaint_shapes(cfg, from_name(plain))
    release = {k: torch.randn_like(v) for k, v in sd.items()}
    GLIDE(cfg).load_state_dict(release, strict=True)
    with pytest.raises(RuntimeError, match="size mismatch"):  # a plain checkpoint is not an inpainting one
        GLIDE(cfg).load_state_dict(GLIDE(from_name(plain)).state_dict(), strict=True)


@pytest.mark.parametrize("name", ["glide-inpaint-tiny", "glide-upsample-inpaint-tiny"])
def test_first_conv_sees_x_masked_image_mask_then_low_res(name):
    cfg = from_name(name)
    model = randomized(cfg)
    s, b = cfg.image_size, 2
    g = torch.Generator().manual_seed(0)
    x, image = torch.randn(b, 3, s, s, generator=g), torch.randn(b, 3, s, s, generator=g)
    keep = (torch.rand(b, 1, s, s, generator=g) > 0.5).float()
    kw = {}
    if cfg.super_res:
        kw["low_res"] = torch.randn(b, 3, cfg.low_res_size, cfg.low_res_size, generator=g)
    seen = {}
    handle = model.input_blocks[0][0].register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]))
    tokens, mask = prompt(cfg)
    try:
        out = model(x, torch.tensor([4, 9]), tokens, mask, inpaint_image=image, inpaint_mask=keep, **kw)
    finally:
        handle.remove()
    want = [x, image * keep, keep]
    if cfg.super_res:
        want.append(F.interpolate(kw["low_res"], (s, s), mode="bilinear", align_corners=False))
    torch.testing.assert_close(seen["x"], torch.cat(want, dim=1), rtol=0, atol=0)
    assert out.shape == (b, 6, s, s)
    bad = {
        "inpaint_mask": dict(inpaint_image=image, inpaint_mask=keep.expand(-1, 3, -1, -1)),
        "inpaint_image": dict(inpaint_image=image[:1], inpaint_mask=keep),
    }
    for arg, kws in bad.items():
        with pytest.raises(ValueError, match=arg):
            model(x, torch.tensor([4, 9]), tokens, mask, **kws, **kw)
    with pytest.raises(ValueError, match="needs inpaint_image"):
        model(x, torch.tensor([4, 9]), tokens, mask, **kw)
    plain = randomized(from_name(name.replace("inpaint-", "")))
    with pytest.raises(ValueError, match="inpainting models"):
        plain(x, torch.tensor([4, 9]), tokens, mask, inpaint_image=image, inpaint_mask=keep, **kw)


def _release_inpaint_step(sched, i, x, out, noise, image, keep, guidance_scale):
    """The release's p_sample with its inpainting denoised_fn, float64, on the respaced betas (own transcription:
    gaussian_diffusion.p_mean_variance with learned-range variance, clip_denoised, then the posterior mean)."""
    abar = sched.alphas_cumprod.double()
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    betas = 1 - abar / abar_prev
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_log_clipped = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    coef1 = betas * abar_prev.sqrt() / (1 - abar)
    coef2 = (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar)
    b = x.shape[0]
    cond, uncond = out[:b], out[b:]
    eps = uncond[:, :3] + guidance_scale * (cond[:, :3] - uncond[:, :3])
    frac = (cond[:, 3:] + 1) / 2
    log_var = frac * torch.log(betas[i]) + (1 - frac) * post_log_clipped[i]
    x0 = (1 / abar[i]).sqrt() * x - (1 / abar[i] - 1).sqrt() * eps
    x0 = x0 * (1 - keep) + image * keep  # denoised_fn, BEFORE clipping
    x0 = x0.clamp(-1, 1)
    mean = coef1[i] * x0 + coef2[i] * x
    return mean + (i != 0) * torch.exp(0.5 * log_var) * noise


@pytest.mark.parametrize("i", [0, 1, 60, 99])
def test_inpaint_step_equals_the_release_p_sample_with_denoised_fn(i):
    from fastgen.models.glide import make_sampler, training_schedule

    cfg = from_name("glide-inpaint-tiny", diffusion_steps=1000)
    sched = training_schedule(cfg).respace("100")
    smp = make_sampler(cfg, "100", guidance_scale=5.0)
    g = torch.Generator().manual_seed(i)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, generator=g)
    out = torch.randn(4, 6, 6, 5, dtype=torch.float64, generator=g)
    out[:, 3:] = out[:, 3:].clamp(-1, 1)
    noise = torch.randn(x.shape, dtype=torch.float64, generator=g)
    # also outside [-1, 1]: replaced, then clipped
    image = torch.rand(x.shape, dtype=torch.float64, generator=g) * 4 - 2
    keep = (torch.rand(2, 1, 6, 5, dtype=torch.float64, generator=g) > 0.5).double()
    got, _ = smp.step(i, x, out, noise=noise, known_image=image, known_mask=keep)
    want = _release_inpaint_step(sched, i, x, out, noise, image, keep, 5.0)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.fixture(scope="module")
def inpaint_models():
    base = randomized(from_name("glide-inpaint-tiny"), seed=2)
    return base, randomized(from_name("glide-upsample-inpaint-tiny"), seed=3)


def _known(b, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 3, s, s, generator=g) * 2 - 1
    keep = torch.ones(b, 1, s, s)
    keep[:, :, s // 4 : 3 * s // 4, s // 4 :] = 0  # fill a block on the right
    return image, keep


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sample_inpaint_keeps_the_known_pixels(inpaint_models, sampler):
    from fastgen.models.glide import sample_inpaint

    base, _ = inpaint_models
    image, keep = _known(2, 16)
    tokens, mask = prompt(base.cfg)
    kw = dict(guidance_scale=5.0, steps="3", seed=4, sampler=sampler, progress=False)
    out = sample_inpaint(base, image, keep, tokens, mask, **kw)
    assert out.shape == image.shape and torch.isfinite(out).all()
    kept = keep.expand_as(image).bool()
    torch.testing.assert_close(out[kept], image[kept], rtol=0, atol=1e-6 if sampler == "ddim" else 0)
    assert not torch.allclose(out[~kept], image[~kept])  # the hole is generated
    with pytest.raises(ValueError, match="mask values must lie in"):
        sample_inpaint(base, image, keep * 2, tokens, mask, **kw)
    with pytest.raises(ValueError, match="inpaint_mask must have shape"):
        sample_inpaint(base, image, keep[:, :, :8], tokens, mask, **kw)
    with pytest.raises(ValueError, match="needs an inpainting model"):
        sample_inpaint(randomized(from_name("glide-tiny")), image, keep, tokens, mask, **kw)


def test_sample_upsample_inpaint_keeps_the_known_pixels(inpaint_models):
    from fastgen.models.glide import sample_upsample_inpaint

    _, up = inpaint_models
    image, keep = _known(2, 32, seed=1)
    low = F.interpolate(image, (8, 8), mode="area")
    tokens, mask = prompt(up.cfg)
    out = sample_upsample_inpaint(up, low, image, keep, tokens, mask, steps="3", seed=2, progress=False)
    kept = keep.expand_as(image).bool()
    assert out.shape == image.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out[kept], image[kept], rtol=0, atol=0)


def test_text_to_image_inpaint_keeps_the_known_pixels(inpaint_models):
    from fastgen.models.glide import text_to_image_inpaint

    _, up = inpaint_models
    base = randomized(from_name("glide-inpaint-tiny", image_size=8, attention_resolutions=(4,)), seed=4)
    image, keep = _known(2, 32, seed=2)
    tokens, mask = prompt(up.cfg)
    out = text_to_image_inpaint(base, up, image, keep, tokens, mask, base_steps="2", upsample_steps="2", seed=3,
                                progress=False)  # fmt: skip
    kept = keep.expand_as(image).bool()
    assert out.shape == image.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out[kept], image[kept], rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiple of the upsampling factor 4"):
        text_to_image_inpaint(base, up, image[..., :30], keep[..., :30], tokens, mask, progress=False)

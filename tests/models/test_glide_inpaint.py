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

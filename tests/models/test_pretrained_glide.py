"""GLIDE / GlideCLIP from_pretrained and save_pretrained: release checkpoints (base.pt, upsample.pt, the
inpainting ones, clip_image_enc.pt / clip_text_enc.pt: plain state_dicts under the release names) with the
config inferred from the tensors, and fastgen's own directory format."""

import pytest
import torch
from test_glide import prompt, randomized, release_keys

from fastgen.models.glide import GLIDE, config_from_state_dict, from_name
from fastgen.models.glide_clip import GlideCLIP
from fastgen.models.glide_clip import from_name as clip_config

RELEASE = {
    "base.pt": "glide-tiny",
    "upsample.pt": "glide-upsample-tiny",
    "base_inpaint.pt": "glide-inpaint-tiny",
    "upsample_inpaint.pt": "glide-upsample-inpaint-tiny",
}


def _outputs(model, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = cfg.image_size
    x = torch.randn(2, 3, s, s, generator=g)
    kw = {}
    if cfg.super_res:
        kw["low_res"] = torch.randn(2, 3, cfg.low_res_size, cfg.low_res_size, generator=g)
    if cfg.inpaint:
        kw["inpaint_image"] = torch.randn(2, 3, s, s, generator=g)
        kw["inpaint_mask"] = (torch.rand(2, 1, s, s, generator=g) > 0.5).float()
    tokens, mask = prompt(cfg)
    with torch.no_grad():
        return model(x, torch.tensor([3, 70]), tokens, mask, **kw)


@pytest.mark.parametrize("filename", list(RELEASE))
def test_release_checkpoint_config_inferred_and_outputs_equal(filename, tmp_path):
    cfg = from_name(RELEASE[filename])
    model = randomized(cfg)
    state = model.state_dict()
    assert set(state) == release_keys(cfg)
    torch.save(state, tmp_path / filename)  # the release layout: a plain state_dict
    loaded = GLIDE.from_pretrained(tmp_path / filename).eval()
    assert loaded.cfg == cfg
    assert torch.equal(_outputs(loaded, cfg), _outputs(model, cfg))


def test_save_pretrained_round_trip_and_overrides(tmp_path):
    cfg = from_name("glide-upsample-tiny")
    model = randomized(cfg)
    model.save_pretrained(tmp_path / "up")
    back = GLIDE.from_pretrained(tmp_path / "up").eval()
    assert back.cfg == cfg and torch.equal(_outputs(back, cfg), _outputs(model, cfg))
    masked = GLIDE.from_pretrained(tmp_path / "up", mask_padding_keys=True, dropout=0.2)
    assert masked.cfg.mask_padding_keys and masked.cfg.dropout == 0.2
    torch.save(model.state_dict(), tmp_path / "upsample.pt")
    assert GLIDE.from_pretrained(tmp_path / "upsample.pt", mask_padding_keys=True).cfg.mask_padding_keys


def test_architecture_outside_the_presets(tmp_path):
    """Shapes set the architecture; what they cannot (heads, groups, size, schedule) comes as overrides."""
    cfg = from_name("glide-upsample-tiny", num_res_blocks=2, channel_mult=(1, 2, 2), attention_resolutions=(16, 8),
                    resblock_updown=False, xf_final_ln=False, text_ctx=6)  # fmt: skip
    model = randomized(cfg)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    with pytest.raises(ValueError, match=r"matches no preset; pass the fields.*norm_groups"):
        GLIDE.from_pretrained(tmp_path / "m.pt")
    rest = {"image_size": 32, "low_res_size": 8, "num_head_channels": 8, "norm_groups": 8, "xf_heads": 2,
            "diffusion_steps": 100, "dropout": 0.0}  # fmt: skip
    loaded = GLIDE.from_pretrained(tmp_path / "m.pt", **rest).eval()
    assert loaded.cfg == cfg
    assert torch.equal(_outputs(loaded, cfg), _outputs(model, cfg))
    # unconditional (xf_width=0) models have no text tensors
    plain = from_name("glide-tiny", xf_width=0)
    with torch.device("meta"):
        sd = GLIDE(plain).state_dict()
    assert config_from_state_dict(sd, norm_groups=8, num_head_channels=8, image_size=16).xf_width == 0


def test_glide_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"base\.pt: file not found.*dec-2021/base\.pt"):
        GLIDE.from_pretrained(tmp_path / "base.pt")
    model = randomized(from_name("glide-tiny"))
    torch.save(model.state_dict(), tmp_path / "base.pt")
    with pytest.raises(ValueError, match=r"not a fastgen directory.*holds base\.pt"):
        GLIDE.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match=r"unknown config fields \['bogus'\]"):
        GLIDE.from_pretrained(tmp_path / "base.pt", bogus=1)
    torch.save({"w": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"has no 'time_embed\.0\.weight': not a GLIDE"):
        GLIDE.from_pretrained(tmp_path / "other.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # weights_only: a pickled module is refused
    with pytest.raises(ValueError, match="not a plain state_dict"):
        GLIDE.from_pretrained(tmp_path / "module.pt")
    _clip().save_pretrained(tmp_path / "clip")
    with pytest.raises(ValueError, match="holds a 'glide_clip' model, not a 'glide' model"):
        GLIDE.from_pretrained(tmp_path / "clip")
    with pytest.raises(TypeError, match="path must be"):
        GLIDE.from_pretrained(None)


# ---- the noise-aware CLIP ----------------------------------------------------------------------------


def _clip(seed=0):
    torch.manual_seed(seed)
    clip = GlideCLIP(clip_config("glide-clip-tiny")).eval()
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return clip


def _embeddings(clip):
    g = torch.Generator().manual_seed(5)
    cfg = clip.cfg
    x = torch.rand(2, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    tokens = torch.randint(0, cfg.n_vocab, (2, cfg.max_text_len), generator=g)
    with torch.no_grad():
        return clip.image_embeddings(x, torch.tensor([4, 60])), clip.text_embeddings(
            tokens, torch.tensor([3, 8])
        )


@pytest.mark.parametrize("layout", ["cache_dir", "clip_subdir", "pair"])
def test_clip_release_files(layout, tmp_path):
    clip = _clip()
    if layout == "cache_dir":  # the names glide_text2im caches the downloads under
        image, text = tmp_path / "clip_image_enc.pt", tmp_path / "clip_text_enc.pt"
    else:
        (tmp_path / "clip").mkdir()
        image, text = tmp_path / "clip" / "image_enc.pt", tmp_path / "clip" / "text_enc.pt"
    torch.save(clip.image_encoder.state_dict(), image)
    torch.save(clip.text_encoder.state_dict(), text)
    loaded = GlideCLIP.from_pretrained((image, str(text)) if layout == "pair" else tmp_path)
    assert loaded.cfg == clip.cfg
    for a, b in zip(_embeddings(loaded), _embeddings(clip), strict=True):
        assert torch.equal(a, b)


def test_clip_save_pretrained_and_errors(tmp_path):
    clip = _clip(1)
    clip.save_pretrained(tmp_path / "fg")
    back = GlideCLIP.from_pretrained(tmp_path / "fg")
    assert back.cfg == clip.cfg
    for a, b in zip(_embeddings(back), _embeddings(clip), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(
        FileNotFoundError, match=r"clip_image_enc\.pt: file not found.*dec-2021/clip_image_enc\.pt"
    ):
        GlideCLIP.from_pretrained(tmp_path)
    torch.save(clip.image_encoder.state_dict(), tmp_path / "clip_image_enc.pt")
    with pytest.raises(FileNotFoundError, match=r"clip_text_enc\.pt.*text encoder"):
        GlideCLIP.from_pretrained(tmp_path)
    torch.save(clip.text_encoder.state_dict(), tmp_path / "clip_text_enc.pt")
    # widths 16 = 2 heads x 8 (the tiny preset); another split is an override
    assert GlideCLIP.from_pretrained(tmp_path, n_head_state=4).cfg.n_head_image == 4
    with pytest.raises(ValueError, match="not multiples of n_head_state=5"):
        GlideCLIP.from_pretrained(tmp_path, n_head_state=5)
    with pytest.raises(ValueError, match=r"text encoder state_dict has no 'blocks\.input\.w_voc'"):
        GlideCLIP.from_pretrained((tmp_path / "clip_image_enc.pt", tmp_path / "clip_image_enc.pt"))
    with pytest.raises(ValueError, match="is a file"):
        GlideCLIP.from_pretrained(tmp_path / "clip_image_enc.pt")

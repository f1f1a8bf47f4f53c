"""size_strategy of CLIP's image towers: interpolate / adaptive_pool / resize, padded and packed."""

import pytest
import torch
import torch.nn.functional as F

from fastgen.models import clip

DT = torch.float64


def _model(strategy, **kw):
    torch.manual_seed(0)
    return clip.from_name("tiny", size_strategy=strategy, dtype=DT, **kw).eval()


def _patch_mean(img, p, f):
    """(B, C, f*H, f*W) -> (B, C, H, W): each p x p patch of the output is the mean of the f x f block of
    patches it covers in the input (what average-pooling the linear patchify's outputs equals)."""
    b, c, hh, ww = img.shape
    gh, gw = hh // (p * f), ww // (p * f)
    x = img.reshape(b, c, gh, f, p, gw, f, p)
    return x.mean(dim=(3, 6)).reshape(b, c, gh * p, gw * p)


def test_adaptive_pool_equals_encoding_the_patch_averaged_image():
    # conv1 is linear without bias: pooling its outputs over 2x2 patch blocks == patchifying the image
    # whose patches are those blocks' means; with the trained pos-embed the rest is the trained model.
    m = _model("adaptive_pool")
    ref = _model("interpolate")
    img = torch.randn(2, 3, 64, 64, dtype=DT)
    with torch.no_grad():
        torch.testing.assert_close(m.encode_image(img), ref.encode_image(_patch_mean(img, 8, 2)))


def test_resize_equals_resizing_first():
    m = _model("resize")
    img = torch.randn(2, 3, 45, 37, dtype=DT)  # any size, not a multiple of the patch
    small = F.interpolate(img, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    with torch.no_grad():
        torch.testing.assert_close(m.encode_image(img), _model("interpolate").encode_image(small))


def test_every_strategy_is_the_model_at_the_trained_size():
    img = torch.randn(2, 3, 32, 32, dtype=DT)
    with torch.no_grad():
        outs = [_model(s).encode_image(img) for s in clip.SIZE_STRATEGIES]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0])


@pytest.mark.parametrize("strategy", clip.SIZE_STRATEGIES)
def test_packed_mixed_sizes_equal_one_by_one(strategy):
    m = _model(strategy)
    imgs = [
        torch.randn(3, 32, 32, dtype=DT),
        torch.randn(3, 48, 24, dtype=DT),
        torch.randn(3, 16, 40, dtype=DT),
    ]
    with torch.no_grad():
        packed = m.encode_image(imgs)
        alone = torch.cat([m.encode_image(i[None]) for i in imgs])
    torch.testing.assert_close(packed, alone)


def test_strategy_switchable_per_tower_and_max_pool():
    m = _model("interpolate", pool_mode="max")
    img = torch.randn(1, 3, 48, 48, dtype=DT)
    with torch.no_grad():
        a = m.encode_image(img)
        m.visual.size_strategy = "adaptive_pool"
        b = m.encode_image(img)
    assert not torch.allclose(a, b)
    m.visual.size_strategy = "zoom"
    with pytest.raises(ValueError, match="size_strategy must be one of"):
        m.encode_image(img)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"size_strategy": "crop"}, "size_strategy must be one of"),
        ({"pool_mode": "sum"}, "pool_mode must be one of"),
    ],
)
def test_bad_config_is_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        clip.from_name("micro", **kw)


def test_non_multiple_of_patch_still_refused_without_resize():
    with pytest.raises(ValueError, match="multiples of patch_size"):
        _model("adaptive_pool").encode_image(torch.randn(1, 3, 45, 32, dtype=DT))


# ---- DALL-E: interpolate (linear / nearest tables) and resize (nearest token grids) ---------------------


def _dalle(**kw):
    from fastgen.models import dalle

    torch.manual_seed(0)
    m = dalle.DALLE(dalle.from_name("dalle-tiny", dvae=None, **kw)).eval()
    with torch.no_grad():  # non-zero positional tables (they start at zero)
        m.image_row_emb.normal_()
        m.image_col_emb.normal_()
    return m


def test_dalle_resize_tokens_is_nearest_exact():
    from fastgen.models.dalle import resize_tokens

    t = torch.randint(0, 32, (2, 4, 4))
    for size in (3, 4, 6, 9):
        want = F.interpolate(t[:, None].double(), size=(size, size), mode="nearest-exact")[:, 0].long()
        assert torch.equal(resize_tokens(t, size), want)
    row = resize_tokens(torch.arange(4).view(1, 1, 4).expand(1, 4, 4), 6)[0, 0]
    assert row.tolist() == [0, 1, 1, 2, 3, 3]  # floor((i + 0.5) * 4 / 6)


def test_dalle_resize_equals_the_trained_grid():
    from fastgen.models.dalle import resize_tokens

    m, ref = _dalle(size_strategy="resize"), _dalle()
    text = torch.randint(1, 48, (2, 6))
    tok6 = torch.randint(0, 32, (2, 6, 6))
    with torch.no_grad():
        lt, li = m.logits(text, tok6)
        rt, ri = ref.logits(text, resize_tokens(tok6, 4))
        assert li.shape == (2, 16, 32)
        torch.testing.assert_close((lt, li), (rt, ri))
        torch.testing.assert_close(m(text, tok6), ref(text, resize_tokens(tok6, 4)))
        gen = m.generate_images(text, grid=6, seed=3, progress=False, temperature=0)
        want = resize_tokens(ref.generate_images(text, grid=4, seed=3, progress=False, temperature=0), 6)
    assert torch.equal(gen, want)


def test_dalle_nearest_tables():
    from fastgen.models.dalle import interpolate_pos_embed

    m = _dalle(pos_interp_mode="nearest")
    table = m.image_row_emb.detach()
    src = [int(((i + 0.5) * 4 / 6) // 1) for i in range(6)]
    torch.testing.assert_close(interpolate_pos_embed(table, 6, "nearest"), table[src])
    with torch.no_grad():  # runs at another grid with the nearest tables
        assert m.logits(torch.randint(1, 48, (1, 6)), torch.randint(0, 32, (1, 6, 6)))[1].shape == (1, 36, 32)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"size_strategy": "adaptive_pool"}, "autoregressive"),
        ({"size_strategy": "crop"}, "size_strategy must be one of"),
        ({"pos_interp_mode": "bicubic"}, "pos_interp_mode must be one of"),
    ],
)
def test_dalle_bad_strategy_refused(kw, match):
    from fastgen.models import dalle

    with pytest.raises(ValueError, match=match):
        dalle.from_name("dalle-tiny", **kw)

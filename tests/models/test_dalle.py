"""DALL-E: dVAE (release-format weights, gather == one-hot conv, fully convolutional), transformer
(forward, loss weighting, backward, masks, variable grid, backend swap), KV-cache generation == recompute."""

import pytest
import torch
import torch.nn.functional as F

import fastgen
from fastgen.models.dalle import (
    DALLE,
    DiscreteVAE,
    DVAEConfig,
    DVAEDecoder,
    DVAEEncoder,
    attention_mask,
    from_name,
    interpolate_pos_embed,
    map_pixels,
    paper_attn_types,
    sample_logits,
    unmap_pixels,
)
from fastgen.nn.vq import decode_tokens

PRESETS = ["dalle-tiny", "dalle-tiny-sparse"]


def _model(name="dalle-tiny", **overrides):
    torch.manual_seed(0)
    return DALLE(from_name(name, **overrides)).eval()


def _inputs(cfg, b=2, grid=None, text_len=None):
    g = torch.Generator().manual_seed(1)
    grid = grid or cfg.image_grid
    text = torch.randint(1, cfg.text_vocab_size, (b, text_len or cfg.text_seq_len - 1), generator=g)
    image = torch.randint(0, cfg.image_vocab_size, (b, grid, grid), generator=g)
    return text, image


# ---- dVAE -----------------------------------------------------------------------------------------


def _release_state(cfg: DVAEConfig, part: str) -> dict:
    """A state_dict in the dall_e release's format, written from its Encoder / Decoder source."""
    g = torch.Generator().manual_seed(2)
    h, nb = cfg.n_hid, cfg.n_blk_per_group
    sd = {}

    def conv(name, n_in, n_out, kw):
        sd[f"{name}.w"] = torch.randn(n_out, n_in, kw, kw, generator=g) / (n_in * kw * kw) ** 0.5
        sd[f"{name}.b"] = 0.1 * torch.randn(n_out, generator=g)

    if part == "encoder":
        conv("blocks.input", cfg.channels, h, 7)
        widths, kernels = [h, h, 2 * h, 4 * h, 8 * h], (3, 3, 3, 1)
    else:
        conv("blocks.input", cfg.vocab_size, cfg.n_init, 1)
        widths, kernels = [cfg.n_init, 8 * h, 4 * h, 2 * h, h], (1, 3, 3, 3)
    for gi in range(1, 5):
        for i in range(1, nb + 1):
            n_in, n_out = widths[gi - 1] if i == 1 else widths[gi], widths[gi]
            pre = f"blocks.group_{gi}.block_{i}"
            if n_in != n_out:
                conv(f"{pre}.id_path", n_in, n_out, 1)
            chans = (n_in, n_out // 4, n_out // 4, n_out // 4, n_out)
            for j, kw in enumerate(kernels):
                conv(f"{pre}.res_path.conv_{j + 1}", chans[j], chans[j + 1], kw)
    if part == "encoder":
        conv("blocks.output.conv", 8 * h, cfg.vocab_size, 1)
    else:
        conv("blocks.output.conv", h, 2 * cfg.channels, 1)
    return sd


def _release_forward(sd: dict, x: torch.Tensor, cfg: DVAEConfig, part: str) -> torch.Tensor:
    """The release's forward written functionally over the state_dict (the oracle)."""

    def conv(name, x):
        w = sd[f"{name}.w"]
        return F.conv2d(x, w, sd[f"{name}.b"], padding=(w.shape[-1] - 1) // 2)

    gain = 1 / (4 * cfg.n_blk_per_group) ** 2
    x = conv("blocks.input", x)
    for gi in range(1, 5):
        for i in range(1, cfg.n_blk_per_group + 1):
            pre = f"blocks.group_{gi}.block_{i}"
            r = x
            for j in range(1, 5):
                r = conv(f"{pre}.res_path.conv_{j}", F.relu(r))
            x = (conv(f"{pre}.id_path", x) if f"{pre}.id_path.w" in sd else x) + gain * r
        if gi < 4:
            x = F.max_pool2d(x, 2) if part == "encoder" else F.interpolate(x, scale_factor=2, mode="nearest")
    return conv("blocks.output.conv", F.relu(x))


def test_dvae_loads_release_state_dict_and_matches_release_forward():
    cfg = DVAEConfig(vocab_size=64, n_hid=8, n_init=12, n_blk_per_group=2)
    enc_sd, dec_sd = _release_state(cfg, "encoder"), _release_state(cfg, "decoder")
    enc, dec = DVAEEncoder(cfg), DVAEDecoder(cfg)
    enc.load_state_dict(enc_sd)  # strict: same key set and shapes
    dec.load_state_dict(dec_sd)
    assert set(enc.state_dict()) == set(enc_sd) and "blocks.group_2.block_1.id_path.w" in enc_sd
    x = map_pixels(torch.rand(2, 3, 32, 40))
    torch.testing.assert_close(enc(x), _release_forward(enc_sd, x, cfg, "encoder"), rtol=1e-5, atol=1e-5)
    tokens = torch.randint(0, 64, (2, 3, 5))
    onehot = F.one_hot(tokens, 64).permute(0, 3, 1, 2).float()
    ref = _release_forward(dec_sd, onehot, cfg, "decoder")
    torch.testing.assert_close(dec(tokens), ref, rtol=1e-5, atol=1e-5)
    vae = DiscreteVAE.from_release(enc_sd, dec_sd)
    assert vae.cfg == cfg
    img = vae.decode(tokens)
    torch.testing.assert_close(img, unmap_pixels(torch.sigmoid(ref[:, :3])))
    assert img.shape == (2, 3, 24, 40) and img.min() >= 0 and img.max() <= 1


def test_gather_equals_one_hot_conv_at_8192():
    torch.manual_seed(0)
    dec = DVAEDecoder(DVAEConfig(vocab_size=8192, n_hid=8, n_init=8, n_blk_per_group=1))
    with torch.no_grad():
        dec.blocks.input.b.normal_()
    tokens = torch.randint(0, 8192, (2, 3, 4))
    tokens[0, 0, 0], tokens[0, 0, 1] = 0, 8191
    onehot = F.one_hot(tokens, 8192).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        first = F.conv2d(onehot, dec.blocks.input.w, dec.blocks.input.b)
        torch.testing.assert_close(decode_tokens(tokens, dec.blocks.input.w, dec.blocks.input.b), first)
        torch.testing.assert_close(dec(tokens), dec(onehot), rtol=1e-6, atol=1e-6)


def test_dvae_fully_convolutional_shapes():
    torch.manual_seed(0)
    vae = DiscreteVAE(from_name("dalle-tiny").dvae)
    for side, grid in ((32, 4), (48, 6)):
        tokens = vae.encode(torch.rand(2, 3, side, side))
        assert tokens.shape == (2, grid, grid) and tokens.dtype == torch.int64
        assert vae.decode(tokens).shape == (2, 3, side, side)
    assert vae.encode(torch.rand(1, 3, 16, 24)).shape == (1, 2, 3)


# ---- transformer: forward, loss, backward ----------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_forward_shapes_and_backward(name):
    model = _model(name).train()
    cfg = model.cfg
    text, image = _inputs(cfg)
    tl, il = model.logits(text, image)
    assert tl.shape == (2, cfg.text_seq_len, cfg.text_vocab_size)
    assert il.shape == (2, cfg.image_grid**2, cfg.image_vocab_size)
    loss = model(text, image)
    loss.backward()
    for n, p in model.named_parameters():
        if not n.startswith("dvae."):
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert model.bos.grad.abs().sum() > 0 and model.image_row_emb.grad.abs().sum() > 0


def test_loss_weighting():
    model = _model()
    text, image = _inputs(model.cfg)
    tl, il = model.logits(text, image)
    target_text = F.pad(text, (0, model.cfg.text_seq_len - text.shape[1]), value=model.cfg.text_pad_id)
    ce_t = F.cross_entropy(tl.flatten(0, 1), target_text.flatten())
    ce_i = F.cross_entropy(il.flatten(0, 1), image.flatten())
    torch.testing.assert_close(model(text, image), ce_t / 8 + 7 * ce_i / 8)
    model.cfg.text_loss_weight, model.cfg.image_loss_weight = 1.0, 0.0
    torch.testing.assert_close(model(text, image), ce_t)


def test_causality_and_pads():
    model = _model("dalle-tiny-sparse")
    text, image = _inputs(model.cfg)
    image2 = image.clone()
    image2[:, -1, -1] = (image[:, -1, -1] + 1) % model.cfg.image_vocab_size  # never an input
    image2[:, 2, 1] = (image[:, 2, 1] + 1) % model.cfg.image_vocab_size  # raster index 9
    a, b = model.logits(text, image)[1], model.logits(text, image2)[1]
    torch.testing.assert_close(a[:, :10], b[:, :10])  # predictions of tokens <= 9 see inputs < 9
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    # per-position pads: the same pad id embeds differently at each position; short text = padded text
    cfg = model.cfg
    short = model.logits(text[:, :3], image)[1]
    padded = model.logits(F.pad(text[:, :3], (0, cfg.text_seq_len - 3), value=cfg.text_pad_id), image)[1]
    torch.testing.assert_close(short, padded)


def test_attention_masks():
    assert paper_attn_types(8) == ("row", "column", "row", "row", "row", "column", "row", "conv")
    L, g = 2, 4
    n_text = L + 1
    full = attention_mask("full", L, g)
    assert full.shape == (L + g * g, L + g * g) and torch.equal(full, torch.ones_like(full).tril())
    for kind in ("row", "column", "conv"):
        m = attention_mask(kind, L, g, conv_kernel=3)
        assert torch.equal(m & full, m)  # causal
        assert torch.equal(m[:, :n_text], full[:, :n_text])  # text keys: as dense causal
        assert m.diagonal().all()
    img = lambda m, q: set((m[n_text + q, n_text:].nonzero().flatten()).tolist())
    q = 9  # row 2, column 1 of a 4x4 grid
    assert img(attention_mask("row", L, g), q) == {5, 6, 7, 8, 9}
    assert img(attention_mask("column", L, g), q) == {1, 5, 9}
    assert img(attention_mask("conv", L, g, conv_kernel=3), q) == {4, 5, 6, 8, 9}


# ---- generation -------------------------------------------------------------------------------------

GEN_CASES = [
    dict(temperature=0),
    dict(seed=3),
    dict(seed=3, cond_scale=3.0, top_k=5),
    dict(seed=7, top_p=0.8, temperature=0.7),
]


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("kw", GEN_CASES, ids=["greedy", "sample", "cfg-topk", "topp"])
def test_kv_cache_generation_equals_recompute(name, kw):
    model = _model(name)
    text, _ = _inputs(model.cfg)
    cached = model.generate_images(text, progress=False, **kw)
    recomputed = model.generate_images(text, progress=False, use_cache=False, **kw)
    assert cached.shape == (2, 4, 4) and cached.dtype == torch.int64
    assert torch.equal(cached, recomputed)


def test_generation_seed_guidance_and_images():
    model = _model()
    text, _ = _inputs(model.cfg)
    a = model.generate_images(text, seed=5, progress=False)
    assert torch.equal(a, model.generate_images(text, seed=5, progress=False))
    assert not torch.equal(a, model.generate_images(text, seed=6, progress=False))
    assert torch.equal(a, model.generate_images(text, seed=5, cond_scale=1.0, progress=True))
    # guidance in logit space: the first greedy token from the cond / null-text logits
    s = 4.0
    first = model.generate_images(text, temperature=0, cond_scale=s, progress=False)[:, 0, 0]
    cond = model.logits(text)[1][:, 0]
    uncond = model.logits(torch.zeros_like(text))[1][:, 0]
    assert torch.equal(first, (uncond + s * (cond - uncond)).argmax(-1))
    tokens, images = model.generate_images(text, seed=0, return_images=True, progress=False)
    assert images.shape == (2, 3, 32, 32) and model.dvae.encode(images).shape == tokens.shape


def test_sample_logits_filters():
    logits = torch.randn(4, 50)
    assert torch.equal(sample_logits(logits, top_k=1), logits.argmax(-1))
    assert torch.equal(sample_logits(logits, top_p=1e-6), logits.argmax(-1))
    g = torch.Generator().manual_seed(0)
    top5 = logits.topk(5).indices
    for _ in range(20):
        t = sample_logits(logits, top_k=5, generator=g)
        assert (top5 == t[:, None]).any(-1).all()


# ---- backends, variable grid ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_backend_swap_and_plain_torch_attention(name):
    model = _model(name)
    text, image = _inputs(model.cfg)
    loss = model(text, image)
    toks = model.generate_images(text, seed=1, cond_scale=2.0, progress=False)
    with fastgen.use_backend("torch"):
        torch.testing.assert_close(model(text, image), loss, rtol=1e-6, atol=1e-6)
        assert torch.equal(model.generate_images(text, seed=1, cond_scale=2.0, progress=False), toks)
    model.attention_impl = "torch"  # torch.nn.functional.scaled_dot_product_attention, torch KV cache
    torch.testing.assert_close(model(text, image), loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.generate_images(text, seed=1, cond_scale=2.0, progress=False), toks)


@pytest.mark.parametrize("name", PRESETS)
def test_variable_grid_equals_interpolated_plain_model(name):
    model = _model(name)  # trained at 4x4
    plain = DALLE(from_name(name, image_grid=6)).eval()
    sd = dict(model.state_dict())
    for key in ("image_row_emb", "image_col_emb"):
        sd[key] = interpolate_pos_embed(sd[key], 6)
    plain.load_state_dict(sd)
    text, image = _inputs(model.cfg, grid=6)
    a, b = model.logits(text, image), plain.logits(text, image)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    toks = model.generate_images(text, grid=6, seed=2, progress=False)
    assert toks.shape == (2, 6, 6)
    assert torch.equal(toks, plain.generate_images(text, seed=2, progress=False))
    torch.testing.assert_close(interpolate_pos_embed(model.image_row_emb, 4), model.image_row_emb)


# ---- errors --------------------------------------------------------------------------------------------


def test_errors():
    model = _model()
    cfg = model.cfg
    text, image = _inputs(cfg)
    with pytest.raises(ValueError, match="more than text_seq_len"):
        model(torch.ones(2, cfg.text_seq_len + 1, dtype=torch.long), image)
    with pytest.raises(ValueError, match=r"text must lie in \[0, 48\)"):
        model(torch.full_like(text, cfg.text_vocab_size), image)
    with pytest.raises(ValueError, match="image_tokens must lie"):
        model(text, image - 1)
    with pytest.raises(ValueError, match="square grid"):
        model(text, image[:, :3])
    with pytest.raises(ValueError, match="integer"):
        model(text.float(), image)
    with pytest.raises(ValueError, match="multiples of 8"):
        model.dvae.encode(torch.rand(1, 3, 36, 32))
    with pytest.raises(ValueError, match="tokens must lie"):
        model.dvae.decode(torch.full((1, 2, 2), cfg.image_vocab_size))
    with pytest.raises(ValueError, match="unknown preset"):
        from_name("dalle-huge")
    with pytest.raises(ValueError, match="attn_types"):
        from_name("dalle-tiny", attn_types=("row", "diagonal"))
    with pytest.raises(ValueError, match="top_k"):
        model.generate_images(text, top_k=0, progress=False)

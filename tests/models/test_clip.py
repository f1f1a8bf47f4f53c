"""fastgen.models.clip: forward / backward, OpenAI (open_clip) and Hugging Face weights, variable image size,
packed mixed-size batches, backend swaps, the tokenizer and input errors. Tiny configs only."""

import gzip
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from optional_imports import import_or_skip

import fastgen
from fastgen.models import clip
from fastgen.models.clip import (
    CLIP,
    PRESETS,
    SimpleTokenizer,
    clip_loss,
    config_from_hf,
    convert_hf_clip_state_dict,
    from_name,
    resize_pos_embed,
)

TOL = {"atol": 2e-5, "rtol": 1e-4}


def images(b=2, h=32, w=32):
    return torch.randn(b, 3, h, w)


def texts(b, length, vocab, eot=None):
    """Random ids below the eot id, an eot (the largest id unless given) at a random place, zero padding."""
    eot = vocab - 1 if eot is None else eot
    t = torch.randint(1, min(eot, vocab - 1), (b, length))
    for i, end in enumerate(torch.randint(2, length, (b,)).tolist()):
        t[i, end] = eot
        t[i, end + 1 :] = 0
    return t


@pytest.mark.parametrize("name", ["tiny", "tiny-gelu"])
def test_forward_backward(name):
    model = from_name(name)
    tok = SimpleTokenizer()(["a cat", "a dog", "a bird"], context_length=16)
    logits_img, logits_txt = model(images(3), tok)
    assert logits_img.shape == (3, 3) and torch.equal(logits_txt, logits_img.t())
    img, txt = model.encode_image(images(3)), model.encode_text(tok)
    loss = clip_loss(img, txt, model.logit_scale.exp())
    scaled = model.logit_scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    ref = (F.cross_entropy(scaled, torch.arange(3)) + F.cross_entropy(scaled.t(), torch.arange(3))) / 2
    torch.testing.assert_close(loss, ref)
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert model.visual.positional_embedding.grad.abs().sum() > 0


def test_presets_published_sizes():
    counts = {
        "ViT-B/32": 151_277_313,
        "ViT-B/16": 149_620_737,
        "ViT-L/14": 427_616_513,
        "ViT-L/14@336": 427_944_193,
    }
    for name, n in counts.items():
        model = from_name(name, device="meta")
        assert sum(p.numel() for p in model.parameters()) == n, name
    assert PRESETS["ViT-L/14@336"].grid_size == (24, 24)
    assert from_name("tiny", text_layers=1).config.text_layers == 1
    with pytest.raises(ValueError, match="unknown preset"):
        from_name("ViT-H/99")


def test_open_clip_equivalence():
    open_clip = import_or_skip("open_clip")
    vision = open_clip.model.CLIPVisionCfg(layers=2, width=64, head_width=16, patch_size=8, image_size=32)
    text = open_clip.model.CLIPTextCfg(context_length=16, vocab_size=100, width=64, heads=4, layers=2)
    ref = open_clip.model.CLIP(32, vision_cfg=vision, text_cfg=text, quick_gelu=True).eval()
    with torch.no_grad():  # non-trivial LayerNorm / bias values
        for n, p in ref.named_parameters():
            if n.endswith("bias") or "ln" in n:
                p.add_(0.1 * torch.randn_like(p))
    model = CLIP.from_openai_state_dict(ref.state_dict(), vision_heads=4, text_heads=4).eval()
    assert model.config.embed_dim == 32 and model.config.vocab_size == 100 and model.config.image_size == 32
    x, t = images(3), texts(3, 16, 100)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), ref.encode_image(x), **TOL)
        torch.testing.assert_close(model.encode_text(t), ref.encode_text(t), **TOL)
        img, txt, scale = ref(x, t)
        torch.testing.assert_close(model(x, t)[0], scale * img @ txt.t(), **TOL)


@pytest.mark.parametrize("eos", [99, 2])  # 2: HF's legacy configs pool at the argmax
def test_hf_equivalence(eos):
    transformers = import_or_skip("transformers")
    tiny = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=100, max_position_embeddings=16, eos_token_id=eos, **tiny),
        vision_config=dict(image_size=24, patch_size=8, **tiny),
        projection_dim=32,
    )
    ref = transformers.CLIPModel(cfg).eval()
    config = config_from_hf(cfg)
    assert config.act == "quick_gelu" and config.eot_rule == ("argmax" if eos == 2 else "eos_id")
    model = CLIP(config)
    model.load_openai_state_dict(convert_hf_clip_state_dict(ref.state_dict(), config))
    x = images(3, 24, 24)
    t = texts(3, 16, 100, eot=eos if eos != 2 else None)
    if eos != 2:  # the rule takes the FIRST eos, even when a larger id follows
        t[:, -1] = 98
    with torch.no_grad():
        img_ref = ref.get_image_features(pixel_values=x)
        txt_ref = ref.get_text_features(input_ids=t)
        img_ref, txt_ref = (getattr(o, "pooler_output", o) for o in (img_ref, txt_ref))
        torch.testing.assert_close(model.encode_image(x), img_ref, **TOL)
        torch.testing.assert_close(model.encode_text(t), txt_ref, **TOL)
        torch.testing.assert_close(model(x, t)[0], ref(input_ids=t, pixel_values=x).logits_per_image, **TOL)


def micro(**kw):
    """4x4 trained grid (image 16, patch 4)."""
    return replace(PRESETS["micro"], **{"image_size": 16, **kw})


@pytest.mark.parametrize(
    ("size", "mode", "antialias"), [(24, "bicubic", True), ((16, 24), "bilinear", False)]
)
def test_variable_image_size_matches_resized_model(size, mode, antialias):
    model = CLIP(micro(pos_interp_mode=mode, pos_interp_antialias=antialias)).eval()
    h, w = (size, size) if isinstance(size, int) else size
    sd = resize_pos_embed(model.state_dict(), (h // 4, w // 4), mode=mode, antialias=antialias)
    plain = CLIP(micro(image_size=size)).eval()
    plain.load_openai_state_dict(sd)
    x = images(2, h, w)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), plain.encode_image(x), atol=1e-6, rtol=1e-6)
    # the interpolation itself: class token kept, grid through F.interpolate
    pos = model.visual.positional_embedding.detach()
    grid = pos[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(h // 4, w // 4), mode=mode, align_corners=False, antialias=antialias)
    torch.testing.assert_close(sd["visual.positional_embedding"][0], pos[0])
    torch.testing.assert_close(sd["visual.positional_embedding"][1:], grid[0].flatten(1).t())


def test_resize_pos_embed():
    sd = CLIP(micro()).state_dict()
    assert resize_pos_embed(sd, 4)["visual.positional_embedding"] is sd["visual.positional_embedding"]
    assert resize_pos_embed(sd, (3, 5))["visual.positional_embedding"].shape == (16, 32)
    with pytest.raises(ValueError, match="resize_pos_embed"):
        CLIP(micro(image_size=24)).load_openai_state_dict(sd)
    odd = resize_pos_embed(sd, (3, 5))
    with pytest.raises(ValueError, match="not a square"):
        resize_pos_embed(odd, 4)
    assert resize_pos_embed(odd, 4, old_grid=(3, 5))["visual.positional_embedding"].shape == (17, 32)


def test_pos_embed_cache(monkeypatch):
    calls = []
    real = clip.interpolate_pos_embed
    monkeypatch.setattr(clip, "interpolate_pos_embed", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    model = CLIP(micro()).eval()
    x = images(1, 24, 24)
    with torch.no_grad():
        first = model.encode_image(x)
        assert torch.equal(model.encode_image(x), first) and len(calls) == 1  # computed once
        model.encode_image(images(1, 16, 16))  # the trained grid: no interpolation
        model.encode_image(images(1, 24, 20))
        assert len(calls) == 2
        model.visual.positional_embedding.mul_(2)  # in-place update: version bump invalidates
        assert not torch.allclose(model.encode_image(x), first) and len(calls) == 3
        model.load_state_dict(CLIP(micro()).state_dict())
        model.encode_image(x)
        assert len(calls) == 4
    model.train()  # gradients must flow: recomputed every call
    model.encode_image(x).sum().backward()
    model.encode_image(x).sum().backward()
    assert len(calls) == 6 and model.visual.positional_embedding.grad.abs().sum() > 0


def test_varlen_mixed_batch_equals_per_image():
    model = CLIP(micro()).eval()
    imgs = [torch.randn(3, 16, 16), torch.randn(3, 24, 24), torch.randn(3, 12, 20), torch.randn(3, 16, 16)]
    with torch.no_grad():
        packed = model.encode_image_list(imgs)
        alone = torch.cat([model.encode_image(i[None]) for i in imgs])
        torch.testing.assert_close(packed, alone, **TOL)
        torch.testing.assert_close(
            model.encode_image(imgs, normalize=True), F.normalize(alone, dim=-1), **TOL
        )
    model.encode_image_list(imgs).sum().backward()
    assert torch.isfinite(model.visual.conv1.weight.grad).all()


def test_backend_swap_same_outputs():
    model = CLIP(micro()).eval()
    x, t = images(2, 16, 16), texts(2, 8, 258)
    imgs = [torch.randn(3, 16, 16), torch.randn(3, 8, 12)]
    with torch.no_grad():
        ref = (model.encode_image(x), model.encode_text(t), model.encode_image_list(imgs))
        with fastgen.use_backend("torch"):
            outs = (model.encode_image(x), model.encode_text(t), model.encode_image_list(imgs))
        for a, b in zip(outs, ref):
            torch.testing.assert_close(a, b, **TOL)
        with fastgen.use_backend("triton", op="attention"):  # interpreter on CPU
            outs = (model.encode_image(x), model.encode_text(t), model.encode_image_list(imgs))
        for a, b in zip(outs, ref):
            torch.testing.assert_close(a, b, **TOL)
        model.set_attention_fn(F.scaled_dot_product_attention)
        torch.testing.assert_close(model.encode_text(t), ref[1], **TOL)
        torch.testing.assert_close(model.encode_image(x), ref[0], **TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_swap_gpu(dtype):
    model = from_name("tiny", device="cuda", dtype=dtype).eval()
    x, t = images(4).cuda(), texts(4, 16, 258).cuda()
    tol = {"atol": 2e-3, "rtol": 2e-3} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 5e-2}
    with torch.no_grad():
        ours = model(x, t)[0]
        with fastgen.use_backend("torch"):
            torch.testing.assert_close(ours, model(x, t)[0], **tol)
        imgs = [torch.randn(3, 32, 32, device="cuda"), torch.randn(3, 48, 64, device="cuda")]
        alone = torch.cat([model.encode_image(i[None]) for i in imgs])
        torch.testing.assert_close(model.encode_image_list(imgs), alone, **tol)


def test_zero_shot():
    model = from_name("tiny").eval()
    tok = SimpleTokenizer()
    classes = tok(["a cat", "a dog", "a car"], context_length=16)
    w = model.zero_shot_classifier(classes)
    assert w.shape == (32, 3)
    torch.testing.assert_close(w.norm(dim=0), torch.ones(3))
    ensembled = model.zero_shot_classifier([tok(["a cat", "the cat"], 16), tok(["a dog"], 16)])
    torch.testing.assert_close(ensembled[:, 1], w[:, 1])
    probs = model.zero_shot_predict(images(2), w)
    assert probs.shape == (2, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))


def test_bpe_tokenizer(tmp_path):
    merges = ["#version: 0.2", "c a", "ca t</w>", "d o", "do g</w>", "a </w>"]
    path = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(merges) + "\n")
    tok = SimpleTokenizer(str(path))
    assert tok.vocab_size == 512 + 5 + 2 and (tok.sot_token, tok.eot_token) == (517, 518)
    ids = tok.encode("A  Cat, a dog!")
    names = [tok.decoder[i] for i in ids]
    assert names == ["a</w>", "cat</w>", ",</w>", "a</w>", "dog</w>", "!</w>"]
    assert tok.decode(ids) == "a cat , a dog !"
    assert tok.encode("cab") == [tok.encoder["ca"], tok.encoder["b</w>"]]
    out = tok.tokenize(["a cat", "dog"], context_length=6)
    assert out.tolist() == [[517, tok.encoder["a</w>"], tok.encoder["cat</w>"], 518, 0, 0],
                            [517, tok.encoder["dog</w>"], 518, 0, 0, 0]]  # fmt: skip
    assert tok.tokenize("a cat a cat a cat", context_length=4, truncate=True)[0, -1] == 518


def test_byte_tokenizer():
    tok = SimpleTokenizer()
    assert tok.vocab_size == 258
    out = tok(["Hi  there", "é"], context_length=12)
    assert out[0].tolist() == [256, *b"hi there", 257, 0, 0]
    assert out[1, :4].tolist() == [256, 0xC3, 0xA9, 257]
    assert tok.decode(out[1]) == "é"
    with pytest.raises(ValueError, match="exceed context_length 8"):
        tok("a much longer text", context_length=8)
    assert tok("a much longer text", context_length=8, truncate=True)[0].tolist()[-1] == 257


def test_errors():
    model = from_name("tiny")
    with pytest.raises(ValueError, match="multiples of patch_size 8"):
        model.encode_image(images(1, 32, 36))
    with pytest.raises(ValueError, match=r"expected \(batch, 3, H, W\), got \(1, 1, 32, 32\)"):
        model.encode_image(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"images\[1\].*multiples"):
        model.encode_image_list([torch.randn(3, 32, 32), torch.randn(3, 30, 32)])
    with pytest.raises(ValueError, match="length 33 exceeds context_length 32"):
        model.encode_text(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        model.encode_text(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        replace(PRESETS["tiny"], image_size=36)
    with pytest.raises(ValueError, match="eos_token_id"):
        replace(PRESETS["tiny"], eot_rule="eos_id")
    assert math.isclose(model.logit_scale.exp().item(), 1 / 0.07, rel_tol=1e-5)

"""CLIP's ResNet towers (ModifiedResNet + AttentionPool2d): names, shapes, parameter counts, sizes."""

import pytest
import torch
import torch.nn.functional as F

from fastgen.models import clip

RN = {  # name: (blocks per stage, stem width, embed_dim, image size, text width)
    "RN50": ((3, 4, 6, 3), 64, 1024, 224, 512),
    "RN101": ((3, 4, 23, 3), 64, 512, 224, 512),
    "RN50x4": ((4, 6, 10, 6), 80, 640, 288, 640),
    "RN50x16": ((6, 8, 18, 8), 96, 768, 384, 768),
    "RN50x64": ((3, 15, 36, 10), 128, 1024, 448, 1024),
}


def expected_visual_shapes(layers, w, embed, image):
    """The OpenAI ModifiedResNet state_dict (parameters and BN buffers), written from the architecture."""
    out = {}

    def conv(name, cin, cout, k):
        out[f"{name}.weight"] = (cout, cin, k, k)

    def bn(name, c):
        for p in ("weight", "bias", "running_mean", "running_var"):
            out[f"{name}.{p}"] = (c,)
        out[f"{name}.num_batches_tracked"] = ()

    conv("conv1", 3, w // 2, 3), bn("bn1", w // 2)
    conv("conv2", w // 2, w // 2, 3), bn("bn2", w // 2)
    conv("conv3", w // 2, w, 3), bn("bn3", w)
    inp = w
    for s, n in enumerate(layers):
        planes = w * 2**s
        for b in range(n):
            p = f"layer{s + 1}.{b}"
            conv(f"{p}.conv1", inp, planes, 1), bn(f"{p}.bn1", planes)
            conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
            conv(f"{p}.conv3", planes, 4 * planes, 1), bn(f"{p}.bn3", 4 * planes)
            if b == 0:  # every stage's first block changes the shape (stage 1: 64 -> 256 channels)
                conv(f"{p}.downsample.0", inp, 4 * planes, 1), bn(f"{p}.downsample.1", 4 * planes)
            inp = 4 * planes
    e, g = 32 * w, image // 32
    out["attnpool.positional_embedding"] = (g * g + 1, e)
    for proj in ("k_proj", "q_proj", "v_proj"):
        out[f"attnpool.{proj}.weight"], out[f"attnpool.{proj}.bias"] = (e, e), (e,)
    out["attnpool.c_proj.weight"], out["attnpool.c_proj.bias"] = (embed, e), (embed,)
    return out


def text_param_count(tw, embed, layers=12, ctx=77, vocab=49408):
    block = (
        2 * tw
        + (3 * tw * tw + 3 * tw)
        + (tw * tw + tw)
        + 2 * tw
        + (4 * tw * tw + 4 * tw)
        + (4 * tw * tw + tw)
    )
    return vocab * tw + ctx * tw + layers * block + 2 * tw + tw * embed + 1  # + logit_scale


def n_params(shapes):
    total = 0
    for k, s in shapes.items():
        if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        total += int(torch.tensor(s).prod()) if s else 1
    return total


@pytest.mark.parametrize("name", list(RN))
def test_preset_keys_shapes_and_parameter_count(name):
    layers, w, embed, image, tw = RN[name]
    m = clip.from_name(name, device="meta")  # no memory
    want = expected_visual_shapes(layers, w, embed, image)
    got = {k[len("visual.") :]: tuple(v.shape) for k, v in m.state_dict().items() if k.startswith("visual.")}
    assert got == want
    total = sum(p.numel() for p in m.parameters())
    assert total == n_params(want) + text_param_count(tw, embed)


def test_published_rn50_count():
    # OpenAI's CLIP notebook prints "Model parameters: 102,007,137" for RN50
    assert sum(p.numel() for p in clip.from_name("RN50", device="meta").parameters()) == 102_007_137


def _tiny(strategy="interpolate"):
    torch.manual_seed(0)
    m = clip.from_name("tiny-rn", size_strategy=strategy, dtype=torch.float64)
    with torch.no_grad():  # non-trivial BN statistics and residual branches
        for mod in m.visual.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


def test_strict_load_roundtrip_and_inferred_config():
    m = _tiny()
    sd = dict(m.state_dict())
    sd["input_resolution"] = torch.tensor(64)  # the JIT archive's extras are dropped
    m2 = clip.CLIP.from_openai_state_dict(sd)
    assert m2.config.vision_layers == (1, 1, 1, 1) and m2.config.vision_width == 8
    assert m2.config.image_size == 64 and m2.config.embed_dim == 32
    img = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m2.eval().encode_image(img), m.encode_image(img))
    bad = dict(sd, **{"visual.attnpool.positional_embedding": torch.zeros(10, 256, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"attnpool\.positional_embedding"):
        m.load_openai_state_dict(bad)


def _features(v, x):
    """The stem and stages, by hand from the submodules."""
    for i in (1, 2, 3):
        x = F.relu(getattr(v, f"bn{i}")(getattr(v, f"conv{i}")(x)))
    x = F.avg_pool2d(x, 2)
    for s in range(1, 5):
        x = getattr(v, f"layer{s}")(x)
    return x


def _attnpool_ref(pool, x, pos):
    """The attention pool in float64 by its formula (one query: the mean feature)."""
    b, c = x.shape[:2]
    t = x.flatten(2).transpose(1, 2)
    t = torch.cat([t.mean(1, keepdim=True), t], 1) + pos
    h = pool.heads
    q = pool.q_proj(t[:, :1]).view(b, 1, h, -1).transpose(1, 2)
    k = pool.k_proj(t).view(b, -1, h, c // h).transpose(1, 2)
    v = pool.v_proj(t).view(b, -1, h, c // h).transpose(1, 2)
    a = (q @ k.transpose(-1, -2) / (c // h) ** 0.5).softmax(-1) @ v
    return pool.c_proj(a.transpose(1, 2).reshape(b, c))


@pytest.mark.parametrize("strategy", ["interpolate", "adaptive_pool"])
@pytest.mark.parametrize("hw", [(64, 64), (96, 64), (128, 160)])
def test_head_at_any_size(strategy, hw):
    m = _tiny(strategy)
    v = m.visual
    img = torch.randn(2, 3, *hw, dtype=torch.float64)
    with torch.no_grad():
        got = m.encode_image(img)
        feat = _features(v, img)
        pos = v.attnpool.positional_embedding
        if strategy == "adaptive_pool":
            feat = F.adaptive_avg_pool2d(feat, (2, 2))
        elif feat.shape[-2:] != (2, 2):
            pos = clip.interpolate_pos_embed(pos, (2, 2), tuple(feat.shape[-2:]))
        torch.testing.assert_close(got, _attnpool_ref(v.attnpool, feat, pos))


def test_resize_and_mixed_sizes():
    m = _tiny("resize")
    imgs = [torch.randn(3, 64, 64, dtype=torch.float64), torch.randn(3, 100, 72, dtype=torch.float64)]
    with torch.no_grad():
        out = m.encode_image(imgs)
        small = F.interpolate(
            imgs[1][None], size=(64, 64), mode="bicubic", align_corners=False, antialias=True
        )
        m.visual.size_strategy = "interpolate"
        torch.testing.assert_close(out[1:], m.encode_image(small))
        torch.testing.assert_close(out[:1], m.encode_image(imgs[0][None]))
    with pytest.raises(ValueError, match=">= 32"):
        m.encode_image(torch.randn(1, 3, 16, 64, dtype=torch.float64))


def test_bad_resnet_configs():
    with pytest.raises(ValueError, match="4 block counts"):
        clip.from_name("tiny-rn", vision_layers=(1, 1, 1))
    with pytest.raises(ValueError, match="patch_size must be 32"):
        clip.from_name("tiny-rn", patch_size=16)

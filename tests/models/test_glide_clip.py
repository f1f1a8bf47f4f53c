"""GLIDE's noise-aware CLIP (fastgen.models.glide_clip): release names and shapes, numerics, CLIP guidance."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_glide import prompt, randomized

from fastgen.models.glide import from_name as glide_config
from fastgen.models.glide import make_sampler, sample_base, sample_clip_guided, training_schedule
from fastgen.models.glide_clip import GlideCLIP, from_name


def release_shapes(cfg, which):
    """Key -> shape of the release's clip/image-enc or clip/text-enc state_dict (glide_text2im.clip.encoders)."""
    heads = cfg.n_head_image if which == "image" else cfg.n_head_text
    n = cfg.n_xf_blocks_image if which == "image" else cfg.n_xf_blocks_text
    w = heads * cfg.n_head_state
    if which == "image":
        p = cfg.patch_size
        out = {
            "blocks.input.w_t": (cfg.n_timesteps, w),
            "blocks.input.patch_proj": (w, 3, p, p),
            "blocks.input.w_pos": (1 + (cfg.image_size // p) ** 2, w),
            "blocks.input.ln.g": (w,),
            "blocks.input.ln.b": (w,),
        }
    else:
        out = {"blocks.input.w_voc": (cfg.n_vocab, w), "blocks.input.w_pos": (cfg.max_text_len, w)}
    for i in range(n):
        blk = f"blocks.block_{i}"
        for ln in ("f_attn.ln", "f_mlp.ln"):
            out[f"{blk}.{ln}.g"] = out[f"{blk}.{ln}.b"] = (w,)
        for name in ("f_q", "f_k", "f_v", "f_c"):
            out[f"{blk}.f_attn.{name}.w"] = (w, w)
            if name != "f_k":
                out[f"{blk}.f_attn.{name}.b"] = (w,)
        out[f"{blk}.f_mlp.f_1.w"], out[f"{blk}.f_mlp.f_1.b"] = (4 * w, w), (4 * w,)
        out[f"{blk}.f_mlp.f_2.w"], out[f"{blk}.f_mlp.f_2.b"] = (w, 4 * w), (w,)
    out["blocks.output.ln.g"] = out["blocks.output.ln.b"] = (w,)
    out["blocks.output.f.w"] = (cfg.n_embd, w)
    return out


def test_release_names_shapes_and_parameter_counts():
    with torch.device("meta"):
        clip = GlideCLIP(from_name("glide-clip"))
    for which, enc, total in (
        ("image", clip.image_encoder, 86_443_776),
        ("text", clip.text_encoder, 71_679_488),
    ):
        sd = enc.state_dict()
        assert {k: tuple(v.shape) for k, v in sd.items()} == release_shapes(clip.cfg, which)
        assert sum(p.numel() for p in enc.parameters()) == total
    tiny = GlideCLIP(from_name("glide-clip-tiny"))
    for enc in (tiny.image_encoder, tiny.text_encoder):
        release = {k: torch.randn_like(v) for k, v in enc.state_dict().items()}
        enc.load_state_dict(release, strict=True)


def _clip(seed=0):
    torch.manual_seed(seed)
    clip = GlideCLIP(from_name("glide-clip-tiny")).double().eval()
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return clip


def _blocks_ref(sd, h, n_blocks, heads, causal):
    """The release's blocks in float64: pre-LN attention (q k^T / sqrt(d), -1e10 on masked keys), pre-LN MLP."""

    def ln(x, p):
        return F.layer_norm(x, x.shape[-1:], sd[p + ".g"], sd[p + ".b"], 1e-5)

    def aff(x, p):
        return x @ sd[p + ".w"].T + sd.get(p + ".b", 0)

    b, n, w = h.shape
    d = w // heads
    bias = torch.zeros(n, n, dtype=h.dtype)
    if causal:
        bias = bias.masked_fill(torch.ones(n, n).triu(1).bool(), -1e10)
    for i in range(n_blocks):
        p = f"blocks.block_{i}"
        r = ln(h, p + ".f_attn.ln")
        q, k, v = (
            aff(r, f"{p}.f_attn.{x}").view(b, n, heads, d).permute(0, 2, 1, 3) for x in ("f_q", "f_k", "f_v")
        )
        att = torch.softmax(torch.einsum("bhcd,bhkd->bhck", q, k) / math.sqrt(d) + bias, dim=-1)
        o = torch.einsum("bhck,bhkd->bhcd", att, v).permute(0, 2, 1, 3).reshape(b, n, w)
        h = h + aff(o, p + ".f_attn.f_c")
        r = ln(h, p + ".f_mlp.ln")
        h = h + aff(F.gelu(aff(r, p + ".f_mlp.f_1")), p + ".f_mlp.f_2")
    return h, ln, aff


def test_encoders_equal_a_float64_transcription_of_the_release():
    clip = _clip()
    cfg = clip.cfg
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    t = torch.tensor([3, 97])
    sd = clip.image_encoder.state_dict()
    pix = (x + 1) * 127.5
    # the release keeps CLIP's constants as float32 tensors
    mean = torch.tensor([122.77093945, 116.74601272, 104.09373519]).double().view(1, 3, 1, 1)
    std = torch.tensor([68.50053285, 66.63215831, 70.32316309]).double().view(1, 3, 1, 1)
    h = F.conv2d((pix - mean) / std, sd["blocks.input.patch_proj"], stride=4).flatten(2).transpose(1, 2)
    h = torch.cat([sd["blocks.input.w_t"][t][:, None], h], 1) + sd["blocks.input.w_pos"]
    h = F.layer_norm(h, h.shape[-1:], sd["blocks.input.ln.g"], sd["blocks.input.ln.b"], 1e-5)
    h, ln, aff = _blocks_ref(sd, h, cfg.n_xf_blocks_image, cfg.n_head_image, causal=False)
    want = aff(ln(h[:, 0], "blocks.output.ln"), "blocks.output.f")
    want = want / (want.norm(dim=-1, keepdim=True) + 1e-12)
    torch.testing.assert_close(clip.image_embeddings(x, t), want, rtol=1e-10, atol=1e-10)

    sd = clip.text_encoder.state_dict()
    tokens = torch.randint(0, cfg.n_vocab, (2, 5), generator=g)
    lengths = torch.tensor([5, 2])
    full = F.pad(tokens, (0, cfg.max_text_len - 5), value=7)  # any padding: causal
    h = sd["blocks.input.w_voc"][full] + sd["blocks.input.w_pos"]
    h, ln, aff = _blocks_ref(sd, h, cfg.n_xf_blocks_text, cfg.n_head_text, causal=True)
    want = aff(ln(h[torch.arange(2), lengths - 1], "blocks.output.ln"), "blocks.output.f")
    want = want / (want.norm(dim=-1, keepdim=True) + 1e-12)
    torch.testing.assert_close(clip.text_embeddings(tokens, lengths), want, rtol=1e-10, atol=1e-10)


def test_cond_fn_is_the_gradient_of_the_scaled_similarity():
    clip = _clip(1)
    g = torch.Generator().manual_seed(2)
    tokens, lengths = torch.randint(0, 64, (2, 6), generator=g), torch.tensor([6, 3])
    x = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    t = torch.tensor([40, 40])
    grad = clip.cond_fn(tokens, lengths, grad_scale=3.0)(x, t)
    d = torch.randn(x.shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        z_t = clip.text_embeddings(tokens, lengths)

        def loss(v):
            return 3.0 * 100 * (z_t * clip.image_embeddings(v, t)).sum()

        h = 1e-6
        fd = (loss(x + h * d) - loss(x - h * d)) / (2 * h)
    torch.testing.assert_close((grad * d).sum(), fd, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="grad_scale must be a finite number"):
        clip.cond_fn(tokens, lengths, grad_scale=float("nan"))
    with pytest.raises(ValueError, match="lengths must lie in"):
        clip.text_embeddings(tokens, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="t must lie in"):
        clip.image_embeddings(x, torch.tensor([0, 100]))


@pytest.mark.parametrize("i", [0, 60])
def test_guided_step_equals_the_release_condition_mean(i):
    """sampler step with a gradient == p_mean_variance mean + exp(model_log_variance) * grad, then noise."""
    cfg = glide_config("glide-tiny", diffusion_steps=1000)
    sched = training_schedule(cfg).respace("100")
    smp = make_sampler(cfg, "100")
    g = torch.Generator().manual_seed(i)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g)
    out = torch.randn(2, 6, 4, 5, dtype=torch.float64, generator=g)
    out[:, 3:] = out[:, 3:].clamp(-1, 1)
    noise, grad = (
        torch.randn(x.shape, dtype=torch.float64, generator=g),
        torch.randn(x.shape, dtype=torch.float64, generator=g),
    )
    got, _ = smp.step(i, x, out, noise=noise, cond_grad=grad)
    abar = sched.alphas_cumprod.double()
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    betas = 1 - abar / abar_prev
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_log = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    frac = (out[:, 3:] + 1) / 2
    log_var = frac * torch.log(betas[i]) + (1 - frac) * post_log[i]
    x0 = ((1 / abar[i]).sqrt() * x - (1 / abar[i] - 1).sqrt() * out[:, :3]).clamp(-1, 1)
    mean = (
        betas[i] * abar_prev[i].sqrt() / (1 - abar[i]) * x0
        + (1 - abar_prev[i]) * (1 - betas[i]).sqrt() / (1 - abar[i]) * x
    )
    mean = mean + torch.exp(log_var) * grad  # condition_mean
    want = mean + (i != 0) * torch.exp(0.5 * log_var) * noise
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_sample_clip_guided_sees_original_timesteps_and_moves_the_sample():
    base = randomized(glide_config("glide-tiny"))
    clip = GlideCLIP(from_name("glide-clip-tiny")).eval()
    tokens, mask = prompt(base.cfg)
    clip_tokens, lengths = torch.randint(0, 64, (2, 5)), torch.tensor([5, 2])
    seen = []
    inner = clip.cond_fn(clip_tokens, lengths, 3.0)

    def spy(x, t):
        seen.append(t.tolist())
        return inner(x, t)

    guided = sample_base(
        base, tokens, mask, guidance_scale=None, steps="4", seed=1, progress=False, cond_fn=spy
    )
    assert [s[0] for s in seen] == [99, 66, 33, 0]  # the respaced steps' ORIGINAL timesteps, as the release
    plain = sample_base(base, tokens, mask, guidance_scale=None, steps="4", seed=1, progress=False)
    again = sample_clip_guided(
        base, clip, tokens, mask, clip_tokens, lengths, steps="4", seed=1, progress=False
    )
    assert torch.isfinite(guided).all() and not torch.allclose(guided, plain)
    torch.testing.assert_close(again, guided, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cond_fn needs sampler='ddpm'"):
        sample_base(base, tokens, mask, steps="4", sampler="ddim", cond_fn=spy, progress=False)

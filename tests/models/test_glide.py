"""GLIDE (fastgen.models.glide): shapes, release key names, sampler maths, CFG, backends, loss, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastgen
from fastgen.diffusion import DDPMSampler
from fastgen.models.glide import (
    GLIDE,
    count_parameters,
    from_name,
    make_sampler,
    sample_base,
    sample_upsample,
    text_to_image,
    training_losses,
    training_schedule,
)


def randomized(cfg, seed=0):
    """A model with every parameter random (the release zero-inits output convs: outputs would be 0)."""
    torch.manual_seed(seed)
    model = GLIDE(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            for name, p in m.named_parameters(recurse=False):
                norm = isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and name == "weight"
                p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.1) + norm)
    return model


def prompt(cfg, b=2, n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, cfg.n_vocab, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[-1, 3:] = False
    return tokens, mask


@pytest.fixture(scope="module")
def base():
    return randomized(from_name("glide-tiny"))


@pytest.fixture(scope="module")
def up():
    return randomized(from_name("glide-upsample-tiny"), seed=1)


def test_presets_match_the_release_parameter_counts():
    with torch.device("meta"):  # the release notebook prints these totals
        assert count_parameters(GLIDE(from_name("glide-base"))) == 385_030_726
        assert count_parameters(GLIDE(from_name("glide-upsample"))) == 398_361_286


@pytest.mark.parametrize("name", ["glide-tiny", "glide-upsample-tiny"])
def test_forward_backward(name):
    cfg = from_name(name, resblock_updown=name == "glide-tiny")  # the upsampler: conv up / down sampling
    model = randomized(cfg).train()
    s = cfg.image_size
    x = torch.randn(2, 3, s, s)
    kw = {"low_res": torch.randn(2, 3, cfg.low_res_size, cfg.low_res_size)} if cfg.super_res else {}
    tokens, mask = prompt(cfg)
    out = model(x, torch.tensor([3, 70]), tokens, mask, **kw)
    assert out.shape == (2, 6, s, s) and torch.isfinite(out).all()
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad


def release_keys(cfg):
    """The release's state_dict keys, written out from glide_text2im's constructors (independent code)."""
    keys = ["time_embed.0", "time_embed.2", "input_blocks.0.0", "out.0", "out.2"]

    def res(p, skip):
        keys.extend(
            f"{p}.{k}" for k in ("in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3")
        )
        if skip:
            keys.append(f"{p}.skip_connection")

    def attn(p):
        keys.extend(f"{p}.{k}" for k in ("norm", "qkv", "encoder_kv", "proj_out"))

    mc, mult, n = cfg.model_channels, cfg.channel_mult, cfg.num_res_blocks
    ds, idx, ch = 1, 1, mc
    for level, m in enumerate(mult):
        for _ in range(n):
            res(f"input_blocks.{idx}.0", ch != m * mc)
            ch = m * mc
            if ds in cfg.attention_ds:
                attn(f"input_blocks.{idx}.1")
            idx += 1
        if level < len(mult) - 1:
            res(f"input_blocks.{idx}.0", False)
            idx, ds = idx + 1, ds * 2
    res("middle_block.0", False), attn("middle_block.1"), res("middle_block.2", False)
    idx = 0
    for level in range(len(mult) - 1, -1, -1):
        for i in range(n + 1):
            res(f"output_blocks.{idx}.0", True)
            j = 1
            if ds in cfg.attention_ds:
                attn(f"output_blocks.{idx}.1")
                j = 2
            if level and i == n:
                res(f"output_blocks.{idx}.{j}", False)
                ds //= 2
            idx += 1
    out = {f"{k}.{w}" for k in keys for w in ("weight", "bias")}
    for i in range(cfg.xf_layers):
        for k in ("attn.c_qkv", "attn.c_proj", "ln_1", "mlp.c_fc", "mlp.c_proj", "ln_2"):
            out |= {f"transformer.resblocks.{i}.{k}.weight", f"transformer.resblocks.{i}.{k}.bias"}
    out |= {"final_ln.weight", "final_ln.bias", "token_embedding.weight", "positional_embedding"}
    return out | {"padding_embedding", "transformer_proj.weight", "transformer_proj.bias"}


@pytest.mark.parametrize("name", ["glide-tiny", "glide-upsample-tiny"])
def test_release_key_names_load_strict(name, tmp_path):
    cfg = from_name(name)
    model = randomized(cfg)
    assert set(model.state_dict()) == release_keys(cfg)
    # a dict built under the release's names (e.g. from base.pt) loads strictly; save -> load is exact
    release = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    fresh = GLIDE(cfg).eval()
    fresh.load_state_dict(release, strict=True)
    torch.save(fresh.state_dict(), tmp_path / "m.pt")
    again = GLIDE(cfg).eval()
    again.load_state_dict(torch.load(tmp_path / "m.pt"), strict=True)
    x = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    kw = {"low_res": torch.randn(1, 3, 8, 8)} if cfg.super_res else {}
    tokens, mask = prompt(cfg, b=1)
    torch.testing.assert_close(
        again(x, torch.tensor([5]), tokens, mask, **kw),
        fresh(x, torch.tensor([5]), tokens, mask, **kw),
        rtol=0,
        atol=0,
    )
    assert fresh.input_blocks[0][0].weight.shape[1] == (6 if cfg.super_res else 3)


@pytest.mark.parametrize("i", [0, 1, 37, 99])
@pytest.mark.parametrize("guided", [False, True])
def test_ddpm_learned_range_step_equals_glide_p_mean_variance(i, guided):
    """One fastgen sampler step vs the release's p_mean_variance + p_sample, float64, on the "100" respacing."""
    cfg = from_name("glide-tiny", diffusion_steps=1000)
    sched = training_schedule(cfg).respace("100")
    g = 3.0 if guided else None
    smp = make_sampler(cfg, "100", guidance_scale=g)
    torch.manual_seed(i)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    out = torch.randn(4 if guided else 2, 6, 5, 4, dtype=torch.float64)
    out[:, 3:] = out[:, 3:].clamp(-1, 1)
    noise = torch.randn_like(x)
    got, _ = smp.step(i, x, out, noise=noise)
    # the release (gaussian_diffusion.py) over the respaced betas
    abar = sched.alphas_cumprod.double()
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    betas = 1 - abar / abar_prev
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_log = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    c1, c2 = betas * abar_prev.sqrt() / (1 - abar), (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar)
    cond = out[:2]
    eps = cond[:, :3] if not guided else out[2:, :3] + 3.0 * (cond[:, :3] - out[2:, :3])
    frac = (cond[:, 3:] + 1) / 2
    log_var = frac * torch.log(betas[i]) + (1 - frac) * post_log[i]
    x0 = ((1 / abar[i]).sqrt() * x - (1 / abar[i] - 1).sqrt() * eps).clamp(-1, 1)
    mean = c1[i] * x0 + c2[i] * x
    want = mean + (i != 0) * torch.exp(0.5 * log_var) * noise
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_cfg_scale_one_equals_conditional_and_seeds(base):
    cfg = base.cfg
    tokens, mask = prompt(cfg)
    kw = {"steps": "4", "progress": False}
    cond = sample_base(base, tokens, mask, guidance_scale=None, seed=5, **kw)
    one = sample_base(base, tokens, mask, guidance_scale=1.0, seed=5, **kw)
    # Guidance doubles the model's batch, and conv / matmul kernels pick their blocking by batch size, so
    # the oracle runs the conditional model on a batch of the same size (rows 2-3 are other samples; the
    # rows are computed independently): then only u + 1 (c - u) vs c rounds differently, on any CPU.
    cond4 = sample_base(base, torch.cat([tokens, tokens]), torch.cat([mask, mask]), guidance_scale=None,
                        seed=5, **kw)[:2]  # fmt: skip
    torch.testing.assert_close(one, cond4, atol=3e-4, rtol=1e-3)  # u + 1 (c - u) rounds, the chain amplifies
    assert cond.shape == (2, 3, 16, 16) and cond.abs().max() < 10
    again = sample_base(base, tokens, mask, guidance_scale=3.0, seed=5, **kw)
    torch.testing.assert_close(
        again, sample_base(base, tokens, mask, guidance_scale=3.0, seed=5, **kw), rtol=0, atol=0
    )
    assert (again - cond).abs().max() > 1e-3  # guidance does something
    assert (sample_base(base, tokens, mask, guidance_scale=3.0, seed=6, **kw) - again).abs().max() > 1e-2
    ddim = sample_base(base, tokens, mask, seed=5, sampler="ddim", **kw)
    assert ddim.shape == cond.shape and torch.isfinite(ddim).all()


def test_fastgen_backends_equal_torch_backends_and_plain_sdpa(base):
    tokens, mask = prompt(base.cfg)
    kw = {"guidance_scale": 3.0, "steps": "4", "seed": 2, "progress": False}
    got = sample_base(base, tokens, mask, **kw)
    with fastgen.use_backend("torch"):
        ref = sample_base(base, tokens, mask, **kw)
    base.attention_impl = "torch"
    try:
        plain = sample_base(base, tokens, mask, **kw)
    finally:
        base.attention_impl = "fastgen"
    torch.testing.assert_close(got, ref, atol=3e-4, rtol=1e-3)
    torch.testing.assert_close(got, plain, atol=3e-4, rtol=1e-3)


def test_two_image_sizes_one_set_of_weights(base):
    tokens, mask = prompt(base.cfg)
    for s in (16, 24):
        out = base(torch.randn(2, 3, s, s + 4), torch.tensor([1, 2]), tokens, mask)
        assert out.shape == (2, 6, s, s + 4) and torch.isfinite(out).all()
    img = sample_base(base, tokens, mask, steps="3", seed=0, image_size=24, progress=False)
    assert img.shape == (2, 3, 24, 24)


def test_upsampler_concatenates_resized_low_res(up):
    seen = {}

    def hook(module, inp, out):
        seen["x"] = inp[0]

    handle = up.input_blocks[0][0].register_forward_hook(hook)
    x, low = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 8, 8)
    tokens, mask = prompt(up.cfg)
    try:
        up(x, torch.tensor([4, 9]), tokens, mask, low_res=low)
    finally:
        handle.remove()
    want = torch.cat([x, F.interpolate(low, (32, 32), mode="bilinear", align_corners=False)], dim=1)
    torch.testing.assert_close(seen["x"], want, rtol=0, atol=0)
    hi = sample_upsample(up, low.clamp(-1, 1), tokens, mask, steps="fast27", seed=3, progress=False)
    assert hi.shape == (2, 3, 32, 32) and torch.isfinite(hi).all()
    base = randomized(from_name("glide-tiny", image_size=8, attention_resolutions=(4,)))
    both = text_to_image(base, up, tokens, mask, base_steps="3", upsample_steps="4", seed=1, progress=False)
    assert both.shape == (2, 3, 32, 32) and torch.isfinite(both).all()


def test_hybrid_loss_finite_with_gradients_and_stopped_mean(base):
    model = base.train()
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    t = torch.tensor([0, 1, 50, 99])
    tokens, mask = prompt(base.cfg, b=4)
    try:
        terms = training_losses(model, x0, t, tokens, mask, noise=torch.randn_like(x0))
        assert all(torch.isfinite(v).all() and v.shape == (4,) for v in terms.values())
        torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
        w = model.out[2].weight
        g_vb = torch.autograd.grad(terms["vb"].sum(), w, retain_graph=True)[0]
        assert g_vb[:3].abs().max() == 0 and g_vb[3:].abs().max() > 0  # vb trains the variance only
        terms["loss"].mean().backward()
        assert all(p.grad is not None for p in model.parameters())
        # p_uncond = 1: every text replaced by the empty prompt
        noise = torch.randn_like(x0)
        drop = training_losses(model, x0, t, tokens, mask, noise, p_uncond=1.0)
        empty = training_losses(model, x0, t, *model.empty_tokens(4, "cpu"), noise)
        torch.testing.assert_close(drop["loss"], empty["loss"])
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_vb_terms_match_closed_form():
    """With eps_theta = the true noise and v = 1 (variance beta_t), vb is KL(N(mu, post) || N(mu, beta))."""
    cfg = from_name("glide-tiny")

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cfg, self.noise = cfg, None
            self.w = torch.nn.Parameter(torch.zeros(()))

        def _check_image(self, x):
            pass

        def prepare_tokens(self, tokens, mask):
            return tokens, mask

        def forward(self, x, t, tokens, mask, low_res=None):
            return torch.cat([self.noise, torch.ones_like(self.noise)], 1) + self.w

    m = Oracle()
    x0, m.noise = torch.rand(2, 3, 4, 4) * 2 - 1, torch.randn(2, 3, 4, 4)
    t = torch.tensor([10, 60])
    terms = training_losses(m, x0, t, torch.zeros(2, 8, dtype=torch.long), None, m.noise)
    s = training_schedule(cfg)
    lv, lb = s.posterior_log_variance_clipped[t], s.betas[t].log()
    want = 0.5 * (-1 + lb - lv + torch.exp(lv - lb)) / math.log(2)
    torch.testing.assert_close(terms["vb"], want.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms["mse"], torch.zeros(2))


def test_mask_padding_keys_option():
    cfg = from_name("glide-tiny", mask_padding_keys=True)
    model = randomized(cfg)
    tokens, mask = prompt(cfg)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 4])
    got = model(x, t, tokens, mask)
    model.attention_impl = "torch"
    torch.testing.assert_close(got, model(x, t, tokens, mask), atol=1e-4, rtol=1e-4)
    unmasked = randomized(from_name("glide-tiny"))
    assert (unmasked(x, t, tokens, mask) - got).abs().max() > 1e-4


def test_errors(base, up):
    tokens, mask = prompt(base.cfg)
    t = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="multiple of the downsampling factor 2"):
        base(torch.randn(2, 3, 15, 16), t, tokens, mask)
    with pytest.raises(ValueError, match="too many tokens: 9 > text_ctx 8"):
        base(torch.randn(2, 3, 16, 16), t, torch.ones(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x must be \(batch, 3, H, W\)"):
        base(torch.randn(2, 4, 16, 16), t, tokens, mask)
    with pytest.raises(ValueError, match="token ids must lie in"):
        base(torch.randn(2, 3, 16, 16), t, tokens + 100, mask)
    with pytest.raises(ValueError, match="needs low_res"):
        up(torch.randn(2, 3, 32, 32), t, tokens, mask)
    with pytest.raises(ValueError, match="needs an upsampler"):
        sample_upsample(base, torch.zeros(2, 3, 8, 8), tokens, progress=False)
    with pytest.raises(ValueError, match="unknown preset"):
        from_name("glide-huge")
    with pytest.raises(ValueError, match="p_uncond"):
        training_losses(base, torch.zeros(2, 3, 16, 16), t, tokens, p_uncond=2.0)
    assert isinstance(make_sampler(base.cfg, "10"), DDPMSampler)

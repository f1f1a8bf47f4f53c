r"""GLIDE: a text-conditional ADM UNet, its 64 -> 256 upsampler, CFG sampling and the hybrid training loss.

Nichol et al. 2021, "GLIDE: Towards Photorealistic Image Generation and Editing with Text-Guided Diffusion
Models" (arXiv:2112.10741); the UNet is ADM's (Dhariwal & Nichol 2021, arXiv:2105.05233). Modules and
parameters follow the public ``glide_text2im`` release (``unet.py``, ``text2im_model.py``, ``xf.py``,
``nn.py``) name for name, so ``GLIDE(from_name("glide-base")).load_state_dict(release_state_dict)`` loads
the released checkpoints with ``strict=True`` (``base.pt``: "glide-base", ``upsample.pt``:
"glide-upsample"). ``GLIDE.from_pretrained("base.pt")`` reads such a checkpoint (``weights_only``), infers
the config from its tensors (:func:`config_from_state_dict`) and loads it; ``save_pretrained(dir)`` writes
fastgen's format (``config.json`` + ``model.safetensors``), which ``from_pretrained(dir)`` reads back.

**Text encoder** (``Text2ImUNet.get_text_emb``). tokens (B, L <= text_ctx), right-padded here to
``text_ctx`` with ``pad_token`` (mask False)::

    xf = token_embedding(tokens) + positional_embedding              # (B, text_ctx, xf_width)
    xf = where(mask, xf, padding_embedding)                           # xf_padding: learned per-position pad
    xf = transformer(xf)  (xf_layers pre-LN blocks: ln_1, attn.c_qkv/c_proj, ln_2, mlp.c_fc/c_proj, GELU)
    xf = final_ln(xf)
    xf_proj = transformer_proj(xf[:, -1])   # the LAST position (a pad position for short prompts)
    xf_out  = xf.permute(0, 2, 1)           # (B, xf_width, text_ctx), the attention context

The release's text transformer is **not causal** and has **no attention mask**: padding is handled by
``padding_embedding`` alone, and the UNet's attention sees every one of the ``text_ctx`` positions. That is
the default here (exact release numerics). ``GLIDEConfig.mask_padding_keys=True`` additionally hides the
padded text positions as keys (a bool key-padding mask through ``fastgen.flash_attention``), both in the
text transformer and in the UNet's text keys; released weights were not trained with it.
The text attention splits ``c_qkv``'s output per head first: (B, T, heads, [q | k | v] x head_dim).

**UNet** (ADM, ``use_scale_shift_norm`` and ``resblock_updown`` as released)::

    emb = time_embed(timestep_embedding(t, model_channels)) + xf_proj        # (B, 4 model_channels)
    h   = input_blocks(x)  -> middle_block -> output_blocks (skip concat) -> out   # out: (B, 2C, H, W)

* ``ResBlock``: ``in_layers`` = GroupNorm32+SiLU, Identity, conv3x3; ``emb_layers`` = SiLU, Linear(->
  2 out_ch); ``h = norm(h) * (1 + scale) + shift`` (scale-shift norm), then SiLU, Dropout, conv3x3
  (zero-init) = ``out_layers.0 / .1 / .2 / .3``; ``skip_connection`` a 1x1 conv when channels change.
  ``down`` / ``up`` resblocks resample (avg-pool / nearest) between ``in_layers``' norm and conv.
* GroupNorm32 (32 groups) runs in float32 and casts back, as the release's ``nn.GroupNorm32``; the SiLU
  that the release fuses into it (``swish=1.0``) is applied after the cast, as there.
* ``AttentionBlock`` (``norm``, ``qkv`` conv1d, ``encoder_kv`` conv1d, ``proj_out`` zero-init) at the
  downsampling factors ``image_size // r`` for r in ``attention_resolutions``. Keys / values are the
  projected text tokens **followed by** the image tokens (the release's ``cat([ek, k])``); the softmax
  is over the set, so the order matters only for the mask layout. Head split: the release's (ADM's
  ``QKVAttentionLegacy``) order, channels grouped per head first: qkv (B, heads x [q | k | v] x ch, L),
  encoder_kv (B, heads x [k | v] x ch, T). ADM's newer ``QKVAttention`` ([q | k | v] x heads x ch) is
  not used. Attention runs through ``fastgen.flash_attention`` in (B, heads, S, head_dim) layout with
  scale 1 / sqrt(ch) (the release's (q / ch^0.25) . (k / ch^0.25)).
* Fully convolutional: any H, W that are multiples of ``2 ** (len(channel_mult) - 1)``.
* Upsampler (``super_res``): ``low_res`` is resized to x's size (bilinear, align_corners=False) and
  concatenated to x on channels, so ``input_blocks.0.0`` takes 2 x in_channels.
* Inpainting (``inpaint``, the release's ``InpaintText2ImUNet`` / ``SuperResInpaintText2ImUNet``): the
  first conv sees ``cat([x_t, image * mask, mask])`` (7 channels), then the resized ``low_res`` LAST for
  the upsampler (10); mask (B, 1, H, W), 1 = keep, 0 = fill. Every other parameter is unchanged
  ("glide-base-inpaint": 385,037,638 parameters, "glide-upsample-inpaint": 398,368,198).

**Sampling** (:func:`sample_base`, :func:`sample_upsample`, :func:`text_to_image`) runs the fused steps of
``fastgen.diffusion`` (DDPM with the learned-range variance, x0 clipped to [-1, 1] as the release's
``clip_denoised=True``). Classifier-free guidance: the sampler calls the model once on the doubled batch
[x; x]; the first half sees the prompt, the second the empty prompt (all ``pad_token``, mask False); the
guided eps is ``u + s (c - u)`` and the variance channels come from the conditional half (as the
release's ``model_fn``). The text is encoded once per call, not once per step. The upsampler is not
guided; it samples with DDIM (eta 0, ``fast27``; DDPM selectable) and x_T scaled by ``upsample_temp``
(0.997), and its ``low_res`` input is the base sample quantised to 8 bits, as in the text-to-image notebook.

**Inpainting** (:func:`sample_inpaint`, :func:`sample_upsample_inpaint`): the known region replaces every
step's predicted x0 before clipping, inside the fused step (the release's ``denoised_fn``); the final
sample equals the known pixels where the mask is 1. **CLIP guidance** (:func:`sample_clip_guided`): the
noise-aware CLIP's gradient (``fastgen.models.glide_clip``) shifts every DDPM step's mean by
``variance * grad``, inside the fused step (the release's ``cond_fn`` / ``condition_mean``).

**Training** (:func:`training_losses`): ADM's hybrid loss ``mse(eps) + vb`` with the VLB term in bits/dim,
the mean's gradient stopped inside it (so the VLB trains only the variance), the discretised Gaussian
decoder NLL at t = 0, and weight 1 (``LossType.MSE`` + learned sigma, no ``RESCALED_MSE`` factor).
``p_uncond`` replaces the text of a random fraction of the batch by the empty prompt (CFG training).

Unsure details, chosen and documented: the empty prompt's token ids (irrelevant with ``xf_padding``: every
position takes ``padding_embedding``; ``pad_token`` = 0 here); initialisation for training from scratch
(the release ships weights only; embeddings here are N(0, 0.01^2)).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastgen
from fastgen.diffusion import DDIMSampler, DDPMSampler, NoiseSchedule
from fastgen.diffusion.samplers import INIT_NOISE_STEP
from fastgen.models import hub
from fastgen.models.common import (
    check_finite,
    check_id_range,
    check_integer_ids,
    check_positive_int,
    is_finite_real,
)
from fastgen.ops.diffusion_step import counter_normal


def _err(msg: str) -> ValueError:
    return ValueError(f"fastgen.models.glide: {msg}")


# =====================================================================================================
# Config and presets
# =====================================================================================================


@dataclass
class GLIDEConfig:
    """The release's ``model_and_diffusion_defaults()`` (base) hyper-parameters, plus fastgen options.

    ``attention_resolutions`` are resolutions at ``image_size`` (the release's "32,16,8"); the model stores
    them as downsampling factors, so it runs at any size. ``out_channels`` = 2 x ``in_channels`` ([eps; v],
    learned-range variance). ``low_res_size``: the upsampler's input size at ``image_size`` (its scale).
    """

    image_size: int = 64
    in_channels: int = 3
    model_channels: int = 192
    num_res_blocks: int = 3
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    num_heads: int = 1
    num_head_channels: int = 64  # -1: use num_heads
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    conv_resample: bool = True
    dropout: float = 0.1
    norm_groups: int = 32
    text_ctx: int = 128
    xf_width: int = 512  # 0: no text conditioning
    xf_layers: int = 16
    xf_heads: int = 8
    xf_final_ln: bool = True
    xf_padding: bool = True
    n_vocab: int = 50257  # GPT-2 BPE
    pad_token: int = 0
    mask_padding_keys: bool = False
    super_res: bool = False
    low_res_size: int | None = None
    inpaint: bool = False  # input_blocks.0.0 also takes [image * mask, mask] (the release's Inpaint*UNet)
    diffusion_steps: int = 1000
    noise_schedule: str = "squaredcos_cap_v2"
    learn_sigma: bool = True

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult)
        self.attention_resolutions = tuple(self.attention_resolutions)
        if not self.channel_mult or self.num_res_blocks < 1 or self.model_channels < 1:
            raise _err(f"GLIDEConfig: channel_mult must be non-empty, num_res_blocks >= 1: {self}")
        for r in self.attention_resolutions:
            if r < 1 or self.image_size % r:
                raise _err(f"attention resolution {r} does not divide image_size {self.image_size}")
        for m in self.channel_mult:
            ch = m * self.model_channels
            if ch % self.norm_groups:
                raise _err(f"channels {ch} (mult {m}) are not a multiple of norm_groups {self.norm_groups}")
        if self.xf_width and self.xf_width % self.xf_heads:
            raise _err(f"xf_width ({self.xf_width}) must be a multiple of xf_heads ({self.xf_heads})")
        if self.super_res and not self.low_res_size:
            raise _err("super_res needs low_res_size (the upsampler's input size at image_size)")

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def input_channels(self) -> int:
        """Channels into ``input_blocks.0.0``: [x_t, image * mask, mask, bilinear(low_res)] as present."""
        c = self.in_channels
        return c + (c + 1 if self.inpaint else 0) + (c if self.super_res else 0)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def attention_ds(self) -> tuple[int, ...]:
        return tuple(self.image_size // r for r in self.attention_resolutions)


_BASE = GLIDEConfig()
PRESETS: dict[str, GLIDEConfig] = {
    # the released base 64x64 model (385M parameters) and the 64 -> 256 upsampler (398M)
    "glide-base": _BASE,
    "glide-upsample": replace(
        _BASE,
        image_size=256,
        num_res_blocks=2,
        channel_mult=(1, 1, 2, 2, 4, 4),
        noise_schedule="linear",
        super_res=True,
        low_res_size=64,
    ),
    # tiny configs for tests / CPU examples (16x16 base, 8 -> 32 upsampler)
    "glide-tiny": replace(
        _BASE,
        image_size=16,
        model_channels=16,
        num_res_blocks=1,
        channel_mult=(1, 2),
        attention_resolutions=(8,),
        num_head_channels=8,
        norm_groups=8,
        text_ctx=8,
        xf_width=32,
        xf_layers=2,
        xf_heads=2,
        n_vocab=64,
        diffusion_steps=100,
        dropout=0.0,
    ),
    "glide-upsample-tiny": replace(
        _BASE,
        image_size=32,
        model_channels=16,
        num_res_blocks=1,
        channel_mult=(1, 1, 2),
        attention_resolutions=(8,),
        num_head_channels=8,
        norm_groups=8,
        text_ctx=8,
        xf_width=32,
        xf_layers=1,
        xf_heads=2,
        n_vocab=64,
        diffusion_steps=100,
        dropout=0.0,
        noise_schedule="linear",
        super_res=True,
        low_res_size=8,
    ),
}
# the released inpainting models (first conv: 7 = 3 + 3 + 1 and 10 = 3 + 3 + 1 + 3 input channels)
for _name, _of in (
    ("glide-base-inpaint", "glide-base"),
    ("glide-upsample-inpaint", "glide-upsample"),
    ("glide-inpaint-tiny", "glide-tiny"),
    ("glide-upsample-inpaint-tiny", "glide-upsample-tiny"),
):
    PRESETS[_name] = replace(PRESETS[_of], inpaint=True)


def from_name(name: str, **overrides) -> GLIDEConfig:
    """A copy of ``PRESETS[name]`` with ``overrides`` applied: ``from_name("glide-tiny", xf_layers=1)``."""
    if name not in PRESETS:
        raise _err(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return replace(copy.deepcopy(PRESETS[name]), **overrides)


# =====================================================================================================
# Layers (release names)
# =====================================================================================================


class GroupNorm32(nn.GroupNorm):
    """GroupNorm in float32, cast back to the input dtype, then SiLU when ``swish`` (the release's)."""

    def __init__(self, num_groups: int, num_channels: int, swish: float = 0.0, eps: float = 1e-5):
        super().__init__(num_groups, num_channels, eps=eps)
        self.swish = swish

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        y = y.to(x.dtype)
        if self.swish == 1.0:
            y = F.silu(y)
        elif self.swish:
            y = y * torch.sigmoid(y * float(self.swish))
        return y


class LayerNorm(nn.LayerNorm):
    """LayerNorm in float32, cast back (the release's ``xf.LayerNorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """(B,) -> (B, dim) float32 ``[cos(t f_i), sin(t f_i)]``, f_i = max_period^(-i / (dim // 2))."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _attend(q, k, v, mask, plain):
    """(B, H, Sq, D), (B, H, Sk, D) -> (B, H, Sq, D); mask: bool (B, 1, 1, Sk) or None."""
    if plain:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return fastgen.flash_attention(q, k, v, mask=mask)


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.use_conv = use_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """ADM residual block with timestep embedding (scale-shift norm), optional up / down resampling."""

    def __init__(self, channels, emb_channels, dropout, out_channels, cfg: GLIDEConfig, up=False, down=False):
        super().__init__()
        g, ssn = cfg.norm_groups, cfg.use_scale_shift_norm
        self.use_scale_shift_norm = ssn
        self.in_layers = nn.Sequential(
            GroupNorm32(g, channels, swish=1.0),
            nn.Identity(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, (2 if ssn else 1) * out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(g, out_channels, swish=0.0 if ssn else 1.0),
            nn.SiLU() if ssn else nn.Identity(),
            nn.Dropout(dropout),
            _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h, x = self.h_upd(h), self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb).to(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the H*W image tokens with the text tokens prepended to the keys / values."""

    def __init__(self, channels: int, num_heads: int, num_head_channels: int, cfg: GLIDEConfig):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise _err(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.norm = GroupNorm32(cfg.norm_groups, channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        if cfg.xf_width:
            self.encoder_kv = nn.Conv1d(cfg.xf_width, channels * 2, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x, xf_out=None, key_mask=None, plain=False):
        b, c, *spatial = x.shape
        n, h = math.prod(spatial), self.num_heads
        ch = c // h
        qkv = self.qkv(self.norm(x).reshape(b, c, n)).reshape(b, h, 3, ch, n)
        q, k, v = (qkv[:, :, i].transpose(-1, -2) for i in range(3))  # (B, H, n, ch)
        mask = None
        if xf_out is not None:
            ekv = self.encoder_kv(xf_out.to(x.dtype)).reshape(b, h, 2, ch, xf_out.shape[-1])
            k = torch.cat([ekv[:, :, 0].transpose(-1, -2), k], dim=2)
            v = torch.cat([ekv[:, :, 1].transpose(-1, -2), v], dim=2)
            if key_mask is not None:
                mask = torch.cat([key_mask, key_mask.new_ones(b, n)], dim=1)[:, None, None]
        a = _attend(q.contiguous(), k.contiguous(), v.contiguous(), mask, plain)  # (B, H, n, ch)
        a = a.transpose(-1, -2).reshape(b, c, n)
        return x + self.proj_out(a).reshape(b, c, *spatial)


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb, xf_out=None, key_mask=None, plain=False):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, AttentionBlock):
                x = layer(x, xf_out, key_mask, plain)
            else:
                x = layer(x)
        return x


# ---- text transformer (xf.py) -----------------------------------------------------------------------


class _XfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_qkv = nn.Linear(width, width * 3)
        self.c_proj = nn.Linear(width, width)

    def forward(self, x, mask, plain):
        b, t, w = x.shape
        qkv = self.c_qkv(x).view(b, t, self.heads, 3, w // self.heads)  # per head: [q | k | v]
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
        o = _attend(q.contiguous(), k.contiguous(), v.contiguous(), mask, plain)
        return self.c_proj(o.transpose(1, 2).reshape(b, t, w))


class _MLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, width * 4)
        self.c_proj = nn.Linear(width * 4, width)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class _XfBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = _XfAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = _MLP(width)
        self.ln_2 = LayerNorm(width)

    def forward(self, x, mask, plain):
        x = x + self.attn(self.ln_1(x), mask, plain)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList([_XfBlock(width, heads) for _ in range(layers)])

    def forward(self, x, mask=None, plain=False):
        for block in self.resblocks:
            x = block(x, mask, plain)
        return x


@dataclass
class TextEmbedding:
    """The encoded prompt: ``xf_proj`` (B, 4 model_channels), ``xf_out`` (B, xf_width, text_ctx) and
    ``key_mask`` (B, text_ctx) bool (None unless ``mask_padding_keys``)."""

    xf_proj: torch.Tensor
    xf_out: torch.Tensor
    key_mask: torch.Tensor | None


# =====================================================================================================
# The model
# =====================================================================================================


class GLIDE(nn.Module):
    """``Text2ImUNet`` (``cfg.super_res=False``) or ``SuperResText2ImUNet`` (True), release parameter names.

    ``forward(x, timesteps, tokens, mask, low_res=None)``: x (B, in_channels, H, W) with H, W multiples of
    ``cfg.downsample_factor``; timesteps (B,) original training steps; tokens (B, L <= text_ctx) long;
    mask (B, L) bool (True = real token); low_res (B, in_channels, h, w) for the upsampler;
    inpaint_image (B, in_channels, H, W) and inpaint_mask (B, 1, H, W) for the inpainting models. Returns (B, out_channels, H, W) = [eps; v] in x's dtype.
    ``attention_impl``: "fastgen" (``fastgen.flash_attention``) or "torch" (plain
    ``F.scaled_dot_product_attention``, the benchmark baseline).
    """

    def __init__(self, cfg: GLIDEConfig):
        super().__init__()
        self.cfg = cfg
        self.attention_impl = "fastgen"
        mc, ted = cfg.model_channels, cfg.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        in_ch = cfg.input_channels
        ch = input_ch = int(cfg.channel_mult[0] * mc)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_ch, ch, 3, padding=1))])
        chans, ds = [ch], 1
        attn_ds = cfg.attention_ds

        def attn(c, heads):
            return AttentionBlock(c, heads, cfg.num_head_channels, cfg)

        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, ted, cfg.dropout, int(mult * mc), cfg)]
                ch = int(mult * mc)
                if ds in attn_ds:
                    layers.append(attn(ch, cfg.num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                down = (
                    ResBlock(ch, ted, cfg.dropout, ch, cfg, down=True)
                    if cfg.resblock_updown
                    else Downsample(ch, cfg.conv_resample)
                )
                self.input_blocks.append(TimestepEmbedSequential(down))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, ted, cfg.dropout, ch, cfg),
            attn(ch, cfg.num_heads),
            ResBlock(ch, ted, cfg.dropout, ch, cfg),
        )
        heads_up = cfg.num_heads if cfg.num_heads_upsample == -1 else cfg.num_heads_upsample
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), ted, cfg.dropout, int(mc * mult), cfg)]
                ch = int(mc * mult)
                if ds in attn_ds:
                    layers.append(attn(ch, heads_up))
                if level and i == cfg.num_res_blocks:
                    layers.append(
                        ResBlock(ch, ted, cfg.dropout, ch, cfg, up=True)
                        if cfg.resblock_updown
                        else Upsample(ch, cfg.conv_resample)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(
            GroupNorm32(cfg.norm_groups, ch, swish=1.0),
            nn.Identity(),
            _zero(nn.Conv2d(input_ch, cfg.out_channels, 3, padding=1)),
        )
        if cfg.xf_width:
            w = cfg.xf_width
            self.transformer = Transformer(w, cfg.xf_layers, cfg.xf_heads)
            self.final_ln = LayerNorm(w) if cfg.xf_final_ln else None
            self.token_embedding = nn.Embedding(cfg.n_vocab, w)
            self.positional_embedding = nn.Parameter(torch.randn(cfg.text_ctx, w) * 0.01)
            self.transformer_proj = nn.Linear(w, ted)
            if cfg.xf_padding:
                self.padding_embedding = nn.Parameter(torch.randn(cfg.text_ctx, w) * 0.01)

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def prepare_tokens(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Checks (B, L) tokens and pads them (and the mask, False) on the right to ``text_ctx``."""
        cfg = self.cfg
        check_integer_ids("tokens", tokens, _err)
        if tokens.dim() != 2:
            raise _err(f"tokens must be an integer tensor (batch, seq), got shape {tuple(tokens.shape)}")
        b, n = tokens.shape
        if n > cfg.text_ctx:
            raise _err(f"too many tokens: {n} > text_ctx {cfg.text_ctx} (truncate the prompt)")
        check_id_range("token ids", tokens, cfg.n_vocab, _err)
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.bool, device=tokens.device)
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (b, n):
            raise _err(f"mask must have the tokens' shape {(b, n)}, got {tuple(getattr(mask, 'shape', ()))}")
        pad = cfg.text_ctx - n
        tokens = F.pad(tokens.long(), (0, pad), value=cfg.pad_token)
        mask = F.pad(mask.bool(), (0, pad), value=False)
        return tokens, mask

    def empty_tokens(self, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt (CFG's unconditional branch): all ``pad_token``, mask all False."""
        t = torch.full((batch, self.cfg.text_ctx), self.cfg.pad_token, dtype=torch.long, device=device)
        return t, torch.zeros_like(t, dtype=torch.bool)

    def with_empty_prompt(
        self, tokens: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepared (tokens, mask) of B prompts -> the CFG batch [prompts; B empty prompts] (2B rows)."""
        ut, um = self.empty_tokens(tokens.shape[0], tokens.device)
        return torch.cat([tokens, ut]), torch.cat([mask, um])

    def encode_text(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> TextEmbedding:
        """The release's ``get_text_emb`` (see the module docstring)."""
        if not self.cfg.xf_width:
            raise _err("this config has no text encoder (xf_width=0)")
        tokens, mask = self.prepare_tokens(tokens, mask)
        xf = self.token_embedding(tokens) + self.positional_embedding[None]
        if self.cfg.xf_padding:
            xf = torch.where(mask[..., None], xf, self.padding_embedding[None].to(xf.dtype))
        key_mask = mask if self.cfg.mask_padding_keys else None
        attn_mask = key_mask[:, None, None] if key_mask is not None else None
        xf = self.transformer(xf.to(self.dtype), attn_mask, self.attention_impl == "torch")
        if self.final_ln is not None:
            xf = self.final_ln(xf)
        return TextEmbedding(self.transformer_proj(xf[:, -1]), xf.permute(0, 2, 1), key_mask)

    def _check_image(self, x: torch.Tensor) -> None:
        cfg, f = self.cfg, self.cfg.downsample_factor
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise _err(f"x must be (batch, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % f or x.shape[3] % f:
            raise _err(
                f"image size {tuple(x.shape[2:])} must be a multiple of the downsampling factor {f} "
                f"(channel_mult {cfg.channel_mult})"
            )

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        tokens: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        *,
        low_res: torch.Tensor | None = None,
        text: TextEmbedding | None = None,
        inpaint_image: torch.Tensor | None = None,
        inpaint_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = self.cfg
        self._check_image(x)
        b = x.shape[0]
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(b)
        if timesteps.shape != (b,):
            raise _err(f"timesteps must be (batch,) = ({b},), got {tuple(timesteps.shape)}")
        h = x.to(self.dtype)
        if cfg.inpaint:
            image, keep = check_inpaint_inputs(inpaint_image, inpaint_mask, x)
            h = torch.cat([h, (image * keep).to(h.dtype), keep.to(h.dtype)], dim=1)
        elif inpaint_image is not None or inpaint_mask is not None:
            raise _err("inpaint_image / inpaint_mask are for the inpainting models (inpaint=True) only")
        if cfg.super_res:
            if low_res is None or low_res.dim() != 4 or low_res.shape[:2] != x.shape[:2]:
                raise _err(
                    f"the upsampler needs low_res (batch, {cfg.in_channels}, h, w), got "
                    f"{None if low_res is None else tuple(low_res.shape)}"
                )
            up = F.interpolate(low_res.to(h.dtype), x.shape[2:], mode="bilinear", align_corners=False)
            h = torch.cat([h, up], dim=1)
        elif low_res is not None:
            raise _err("low_res is for the upsampler (super_res=True) only")
        emb = self.time_embed(timestep_embedding(timesteps, cfg.model_channels).to(self.dtype))
        xf_out = key_mask = None
        if cfg.xf_width:
            if text is None:
                if tokens is None:
                    raise _err("pass tokens (or a precomputed text=encode_text(tokens, mask))")
                text = self.encode_text(tokens, mask)
            if text.xf_out.shape[0] != b:
                raise _err(f"text batch {text.xf_out.shape[0]} != image batch {b}")
            emb = emb + text.xf_proj.to(emb.dtype)
            xf_out, key_mask = text.xf_out, text.key_mask
        plain = self.attention_impl == "torch"
        hs = []
        for module in self.input_blocks:
            h = module(h, emb, xf_out, key_mask, plain)
            hs.append(h)
        h = self.middle_block(h, emb, xf_out, key_mask, plain)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, xf_out, key_mask, plain)
        return self.out(h).to(x.dtype)

    # ---- files --------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write fastgen's format into ``directory``: ``config.json`` (model_type "glide", the
        :class:`GLIDEConfig`) and ``model.safetensors`` (the state_dict, release parameter names)."""
        return hub.save_fastgen_dir(directory, "glide", self.cfg, self.state_dict())

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> GLIDE:
        """Load GLIDE from a local file or directory (nothing is downloaded):

        * a release checkpoint of ``glide_text2im``: ``base.pt``, ``upsample.pt``, ``base_inpaint.pt``,
          ``upsample_inpaint.pt`` (:data:`RELEASE_URLS`), a plain state_dict read with
          ``torch.load(weights_only=True)``; any state_dict under the release names works (``.pt`` or
          ``.safetensors``). The config comes from :func:`config_from_state_dict`: the architecture from
          the tensor shapes, the rest from the preset whose architecture matches;
        * a directory written by :meth:`save_pretrained`.

        ``overrides``: :class:`GLIDEConfig` fields applied last, e.g. ``mask_padding_keys=True`` or
        ``dropout=0.0``; for a checkpoint that matches no preset, the fields the tensors do not determine
        (``image_size``, ``num_head_channels``, ``xf_heads``, ``norm_groups``, ...).
        """
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(
                f"GLIDE.from_pretrained: path must be a str or os.PathLike, got {type(path).__name__}"
            )
        p = Path(path)
        if p.is_dir():
            if not (p / hub.CONFIG_NAME).is_file():
                found = [n for n in RELEASE_URLS if (p / n).is_file()]
                hint = f"; it holds {', '.join(found)}: pass one of them" if found else ""
                raise ValueError(
                    f"GLIDE.from_pretrained: {p} is not a fastgen directory (no {hub.CONFIG_NAME}); pass a "
                    f"save_pretrained directory or a release checkpoint file{hint}"
                )
            meta, state = hub.load_fastgen_dir(p, "glide")
            cfg = hub.config_with_overrides(
                hub.config_from_dict(GLIDEConfig, meta["config"]), overrides, "GLIDE.from_pretrained"
            )
        else:
            if not p.is_file():
                where = RELEASE_URLS.get(
                    p.name, "glide_text2im's release (" + ", ".join(RELEASE_URLS.values()) + ")"
                )
                raise hub.missing_weights_error(p, "a GLIDE checkpoint (a state_dict)", where)
            state = hub.read_state_dict(p)
            cfg = config_from_state_dict(state, **overrides)
        model = cls(cfg)
        model.load_state_dict(state)
        return model


RELEASE_URLS = {
    f"{name}.pt": f"https://openaipublic.blob.core.windows.net/diffusion/dec-2021/{name}.pt"
    for name in ("base", "upsample", "base_inpaint", "upsample_inpaint")
}


def _architecture(cfg: GLIDEConfig) -> dict:
    """The config fields a state_dict determines (what :func:`config_from_state_dict` infers)."""
    out = {
        "model_channels": cfg.model_channels,
        "num_res_blocks": cfg.num_res_blocks,
        "channel_mult": tuple(cfg.channel_mult),
        "attention_ds": tuple(sorted(cfg.attention_ds)),
        "use_scale_shift_norm": cfg.use_scale_shift_norm,
        "in_channels": cfg.in_channels,
        "learn_sigma": cfg.learn_sigma,
        "super_res": cfg.super_res,
        "inpaint": cfg.inpaint,
        "xf_width": cfg.xf_width,
    }
    if len(cfg.channel_mult) > 1:
        out["resblock_updown"] = cfg.resblock_updown
    if cfg.xf_width:
        out.update(xf_layers=cfg.xf_layers, text_ctx=cfg.text_ctx, n_vocab=cfg.n_vocab,
                   xf_final_ln=cfg.xf_final_ln, xf_padding=cfg.xf_padding)  # fmt: skip
    return out


def _indices(state, prefix: str) -> list[int]:
    """Sorted distinct integers i of the keys ``prefix{i}.*``."""
    return sorted({int(k[len(prefix) :].split(".", 1)[0]) for k in state if k.startswith(prefix)})


def config_from_state_dict(state: dict[str, torch.Tensor], **overrides) -> GLIDEConfig:
    """A :class:`GLIDEConfig` for a state_dict under the release's names (``base.pt``, ``upsample.pt``,
    ``base_inpaint.pt``, ``upsample_inpaint.pt``, or any size built the same way).

    From the shapes: ``model_channels`` (``time_embed.0``), ``num_res_blocks`` and ``channel_mult`` (the
    output blocks: the first one ending in an upsampling block is number ``num_res_blocks``; each level's
    width), the attention levels (which blocks hold ``qkv``), ``use_scale_shift_norm`` (``emb_layers``
    width), ``resblock_updown`` (a resblock or a conv upsamples), ``in_channels`` / ``learn_sigma`` /
    ``super_res`` / ``inpaint`` (the output and first-conv channels: x, [image * mask, mask], low_res), the
    text transformer (``token_embedding``, ``positional_embedding``, ``transformer.resblocks.*``,
    ``final_ln``, ``padding_embedding``). Everything else (``image_size``, heads, ``norm_groups``, dropout,
    the diffusion schedule, ``low_res_size``) is taken from the preset of :data:`PRESETS` whose
    architecture is the same; with none, from "glide-base" / "glide-upsample" (then pass what differs as
    ``overrides``). ``overrides`` apply last.
    """

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise ValueError(f"GLIDE.from_pretrained: the state_dict has no {key!r}: not a GLIDE (glide_text2im) "
                             "checkpoint")  # fmt: skip
        return tuple(state[key].shape)

    mc = shape("time_embed.0.weight")[1]
    ch0, input_channels = shape("input_blocks.0.0.weight")[:2]
    out_ch = shape("out.2.weight")[0]
    outs = _indices(state, "output_blocks.")
    up_at, updown = None, None
    for i in outs:
        for j in _indices(state, f"output_blocks.{i}.")[1:]:
            if f"output_blocks.{i}.{j}.in_layers.2.weight" in state:
                up_at, updown = i, True
            elif f"output_blocks.{i}.{j}.conv.weight" in state:
                up_at, updown = i, False
        if up_at is not None:
            break
    n_res = len(outs) - 1 if up_at is None else up_at
    levels = len(outs) // (n_res + 1)
    if n_res < 1 or levels * (n_res + 1) != len(outs):
        raise ValueError(f"GLIDE.from_pretrained: {len(outs)} output blocks do not form a UNet (up-sampling at "
                         f"block {up_at})")  # fmt: skip
    mult = []
    for level in range(levels):
        width = shape(f"output_blocks.{(levels - 1 - level) * (n_res + 1)}.0.out_layers.3.weight")[0]
        mult.append(width // mc)
    attn_ds, ds = set(), 2 ** (levels - 1)
    for i in outs:
        if f"output_blocks.{i}.1.qkv.weight" in state:
            attn_ds.add(ds)
        if i % (n_res + 1) == n_res:
            ds //= 2
    mid = shape("middle_block.0.out_layers.3.weight")[0]
    ssn = shape("middle_block.0.emb_layers.1.weight")[0] == 2 * mid
    # in_channels: out = 2 in (learned sigma, the release) else in; first conv: in (+ in + 1) (+ in)
    arch = None
    for learn_sigma in (True, False):
        c = out_ch // 2 if learn_sigma else out_ch
        if c < 1 or (learn_sigma and out_ch % 2):
            continue
        for inpaint in (False, True):
            for super_res in (False, True):
                if c + (c + 1 if inpaint else 0) + (c if super_res else 0) == input_channels and arch is None:
                    arch = {"in_channels": c, "learn_sigma": learn_sigma, "inpaint": inpaint,
                            "super_res": super_res}  # fmt: skip
    if arch is None:
        raise ValueError(f"GLIDE.from_pretrained: {input_channels} input and {out_ch} output channels match no "
                         "GLIDE variant")  # fmt: skip
    arch.update(model_channels=mc, num_res_blocks=n_res, channel_mult=tuple(mult),
                attention_ds=tuple(sorted(attn_ds)), use_scale_shift_norm=ssn)  # fmt: skip
    if ch0 != mult[0] * mc:
        raise ValueError(f"GLIDE.from_pretrained: first conv width {ch0} != channel_mult[0] x model_channels")
    if updown is not None:
        arch["resblock_updown"] = updown
    if "token_embedding.weight" in state:
        n_vocab, width = shape("token_embedding.weight")
        arch.update(xf_width=width, n_vocab=n_vocab, text_ctx=shape("positional_embedding")[0],
                    xf_layers=len(_indices(state, "transformer.resblocks.")),
                    xf_final_ln="final_ln.weight" in state, xf_padding="padding_embedding" in state)  # fmt: skip
    else:
        arch["xf_width"] = 0
    matches = [name for name, cfg in PRESETS.items() if _architecture(cfg) == arch]
    base = PRESETS[matches[0] if matches else ("glide-upsample" if arch["super_res"] else "glide-base")]
    image_size = overrides.get("image_size", base.image_size)
    fields_ = {k: v for k, v in arch.items() if k != "attention_ds"}
    bad = [d for d in arch["attention_ds"] if image_size % d]
    if not bad:
        fields_["attention_resolutions"] = tuple(image_size // d for d in arch["attention_ds"])
    if arch["super_res"] and base.low_res_size:
        fields_["low_res_size"] = image_size * base.low_res_size // base.image_size
    fields_.update(overrides)
    try:
        if bad and "attention_resolutions" not in overrides:
            raise _err(
                f"image_size {image_size} is not a multiple of the attention downsampling factors {bad}"
            )
        return hub.config_with_overrides(base, fields_, "GLIDE.from_pretrained")
    except ValueError as e:
        if matches:
            raise
        raise ValueError(
            f"GLIDE.from_pretrained: the checkpoint's architecture {arch} matches no preset; pass the fields the "
            f"tensors do not determine (image_size, num_head_channels, xf_heads, norm_groups, ...) as keyword "
            f"overrides ({e})"
        ) from e


def check_inpaint_inputs(
    image: torch.Tensor | None, mask: torch.Tensor | None, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks the known image (B, C, H, W) and mask (B, 1, H, W) (1 = keep, 0 = fill) against x."""
    b, c, h, w = x.shape
    for name, t, ch in (("inpaint_image", image, c), ("inpaint_mask", mask, 1)):
        if not isinstance(t, torch.Tensor):
            raise _err(f"the inpainting model needs {name} ({b}, {ch}, {h}, {w}), got {type(t).__name__}")
        if tuple(t.shape) != (b, ch, h, w):
            raise _err(
                f"{name} must have shape {(b, ch, h, w)} (x is {tuple(x.shape)}), got {tuple(t.shape)}"
            )
        if not t.is_floating_point() and not (name == "inpaint_mask" and t.dtype == torch.bool):
            raise _err(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != x.device:
            raise _err(f"{name} is on {t.device} but x is on {x.device}")
    return image, mask.to(image.dtype)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# =====================================================================================================
# Diffusion: schedules, sampling, training loss
# =====================================================================================================


def training_schedule(cfg: GLIDEConfig) -> NoiseSchedule:
    """The model's training schedule (T = diffusion_steps; cosine for the base, linear for the upsampler)."""
    return NoiseSchedule.from_name(cfg.noise_schedule, cfg.diffusion_steps)


def make_sampler(cfg: GLIDEConfig, steps: str | int = "100", *, sampler: str = "ddpm", guidance_scale=None):
    """DDPM with the learned-range variance (the release) or deterministic DDIM over ``steps``, clip 1."""
    sched = training_schedule(cfg).respace(steps)
    if sampler == "ddpm":
        return DDPMSampler(
            sched, variance_type="learned_range", clip_sample=1.0, guidance_scale=guidance_scale
        )
    if sampler == "ddim":
        return DDIMSampler(sched, clip_sample=1.0, guidance_scale=guidance_scale)
    raise _err(f"unknown sampler {sampler!r}; expected 'ddpm' or 'ddim'")


def _model_fn(model: GLIDE, text: TextEmbedding | None, low_res=None, eps_only=False, inpaint=None):
    c = model.cfg.in_channels

    def fn(x, t):
        kw = {}
        if inpaint is not None:  # the CFG batch [x; x] sees the known image twice
            reps = x.shape[0] // inpaint[0].shape[0]
            kw = {
                "inpaint_image": inpaint[0].repeat(reps, 1, 1, 1),
                "inpaint_mask": inpaint[1].repeat(reps, 1, 1, 1),
            }
        out = model(x, t, low_res=low_res, text=text, **kw)
        return out[:, :c] if eps_only else out

    return fn


@torch.no_grad()
def sample_base(
    model: GLIDE,
    tokens: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    guidance_scale: float | None = 3.0,
    steps: str | int = "100",
    seed: int | None = None,
    image_size: int | None = None,
    sampler: str = "ddpm",
    progress: bool = True,
    sample_offset: int = 0,
    cond_fn=None,
) -> torch.Tensor:
    """Text -> (B, C, S, S) images in [-1, 1] from the base model, classifier-free guided.

    tokens (B, L), mask (B, L) bool; ``guidance_scale`` None: conditional only (no doubled batch).
    ``steps``: a ``space_timesteps`` spec ("100" as released). Same ``seed`` -> same images.
    ``cond_fn(x, t) -> grad`` (e.g. ``GlideCLIP.cond_fn``): every DDPM step's mean moves by
    variance * grad, fused into the step (GLIDE's ``condition_mean``; see :func:`sample_clip_guided`).
    """
    check_positive_int("image_size", image_size, _err, allow_none=True)
    if guidance_scale is not None:
        check_finite("guidance_scale", guidance_scale, _err)
    if cond_fn is not None and sampler != "ddpm":
        raise _err(
            f"cond_fn needs sampler='ddpm' (the shift is variance * grad; {sampler!r} has no variance)"
        )
    device = next(model.parameters()).device
    size = model.cfg.image_size if image_size is None else image_size
    tokens, mask = model.prepare_tokens(tokens.to(device), None if mask is None else mask.to(device))
    b = tokens.shape[0]
    if guidance_scale is not None:
        tokens, mask = model.with_empty_prompt(tokens, mask)
    text = model.encode_text(tokens, mask) if model.cfg.xf_width else None
    smp = make_sampler(model.cfg, steps, sampler=sampler, guidance_scale=guidance_scale)
    fn = _model_fn(model, text, eps_only=sampler != "ddpm")
    shape = (b, model.cfg.in_channels, size, size)
    return smp.sample(fn, shape, seed=seed, device=device, progress=progress, sample_offset=sample_offset,
                      cond_fn=cond_fn)  # fmt: skip


def sample_clip_guided(
    model: GLIDE,
    clip,
    tokens: torch.Tensor,
    mask: torch.Tensor | None,
    clip_tokens: torch.Tensor,
    clip_lengths: torch.Tensor,
    *,
    grad_scale: float = 3.0,
    steps: str | int = "100",
    seed: int | None = None,
    progress: bool = True,
    sample_offset: int = 0,
) -> torch.Tensor:
    """CLIP-guided sampling (GLIDE sec. 2.3), as the release notebook: no CFG, DDPM, ``grad_scale`` 3.

    ``clip``: a :class:`fastgen.models.glide_clip.GlideCLIP` (the noise-aware CLIP); ``clip_tokens``
    (B, L <= 77) / ``clip_lengths`` (B,) the prompt in CLIP's tokenizer. Each step adds
    ``variance * grad_x[grad_scale * 100 * <text, image(x_t, t)>]`` to the mean, t the original timestep.
    """
    fn = clip.cond_fn(clip_tokens, clip_lengths, grad_scale)
    return sample_base(model, tokens, mask, guidance_scale=None, steps=steps, seed=seed, progress=progress,
                       sample_offset=sample_offset, cond_fn=fn)  # fmt: skip


@torch.no_grad()
def sample_upsample(
    model: GLIDE,
    low_res: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    steps: str | int = "fast27",
    upsample_temp: float = 0.997,
    seed: int | None = None,
    image_size: int | None = None,
    progress: bool = True,
    sample_offset: int = 0,
    sampler: str = "ddim",
) -> torch.Tensor:
    """(B, C, h, w) low-res images in [-1, 1] -> (B, C, H, W), H = h * image_size / low_res_size.

    Not guided; x_T = ``upsample_temp`` x N(0, I). ``sampler``: "ddim" (eta 0, as the release's
    text-to-image notebook, the default) or "ddpm" (learned-range ancestral sampling).
    """
    cfg = model.cfg
    if not cfg.super_res:
        raise _err("sample_upsample needs an upsampler (super_res=True) model")
    check_positive_int("image_size", image_size, _err, allow_none=True)
    # a NaN / inf temperature is a NaN x_T: every sample NaN without an error
    if not (is_finite_real(upsample_temp) and upsample_temp > 0):
        raise _err(f"upsample_temp must be a positive finite number, got {upsample_temp!r}")
    device = next(model.parameters()).device
    if low_res.dim() != 4 or low_res.shape[1] != cfg.in_channels:
        raise _err(f"low_res must be (batch, {cfg.in_channels}, h, w), got {tuple(low_res.shape)}")
    scale = cfg.image_size // cfg.low_res_size
    if image_size is None:
        h, w = low_res.shape[2] * scale, low_res.shape[3] * scale
    else:
        h = w = image_size
    low_res = low_res.to(device, torch.float32)
    text = model.encode_text(tokens.to(device), None if mask is None else mask.to(device))
    if text.xf_out.shape[0] != low_res.shape[0]:
        raise _err(f"tokens batch {text.xf_out.shape[0]} != low_res batch {low_res.shape[0]}")
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    shape = (low_res.shape[0], cfg.in_channels, h, w)
    x_T = counter_normal(shape, seed, INIT_NOISE_STEP, sample_offset, device=device) * upsample_temp
    smp = make_sampler(cfg, steps, sampler=sampler)
    fn = _model_fn(model, text, low_res=low_res, eps_only=sampler != "ddpm")
    return smp.sample(
        fn, shape, seed=seed, device=device, x_T=x_T, progress=progress, sample_offset=sample_offset
    )


def _inpaint_inputs(
    model: GLIDE, image: torch.Tensor, mask: torch.Tensor, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks the known image (B, C, H, W) in [-1, 1] and its mask (B, 1, H, W) in [0, 1] (1 = keep)."""
    cfg = model.cfg
    if not cfg.inpaint:
        raise _err("inpainting needs an inpainting model (inpaint=True, e.g. 'glide-base-inpaint')")
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[1] != cfg.in_channels:
        raise _err(
            f"image must be (batch, {cfg.in_channels}, H, W), got {tuple(getattr(image, 'shape', ()))}"
        )
    model._check_image(image)
    image = image.to(device, torch.float32)
    if not isinstance(mask, torch.Tensor):
        raise _err(f"mask must be a tensor (batch, 1, H, W), got {type(mask).__name__}")
    check_inpaint_inputs(image, mask.to(device), image)
    mask = mask.to(device, torch.float32)
    # one host sync per sampling call (not per step): values outside the ranges give wrong pixels silently
    bad_mask, bad_image = torch.stack(
        [((mask < 0) | (mask > 1) | mask.isnan()).any(), ~image.isfinite().all()]
    ).tolist()
    if bad_mask:
        raise _err("mask values must lie in [0, 1] (1 = keep the known pixel, 0 = fill it)")
    if bad_image:
        raise _err("image must be finite (NaN / inf pixels would be copied into every sample)")
    return image, mask


@torch.no_grad()
def sample_inpaint(
    model: GLIDE,
    image: torch.Tensor,
    mask: torch.Tensor,
    tokens: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    *,
    guidance_scale: float | None = 5.0,
    steps: str | int = "100",
    seed: int | None = None,
    sampler: str = "ddpm",
    progress: bool = True,
    sample_offset: int = 0,
) -> torch.Tensor:
    """Fill the region where ``mask`` is 0 of ``image`` (B, C, S, S) in [-1, 1] with the base inpainting model.

    mask (B, 1, S, S), 1 = keep. As the release: the model sees ``[x_t, image * mask, mask]``, CFG (scale 5
    in the release notebook), and every step's predicted x0 takes the known pixels before clipping (fused
    into the step). The final sample equals ``image`` where ``mask`` is 1.
    """
    if guidance_scale is not None:
        check_finite("guidance_scale", guidance_scale, _err)
    device = next(model.parameters()).device
    image, mask = _inpaint_inputs(model, image, mask, device)
    tokens, token_mask = model.prepare_tokens(
        tokens.to(device), None if token_mask is None else token_mask.to(device)
    )
    b = tokens.shape[0]
    if image.shape[0] != b:
        raise _err(f"tokens batch {b} != image batch {image.shape[0]}")
    if guidance_scale is not None:
        tokens, token_mask = model.with_empty_prompt(tokens, token_mask)
    text = model.encode_text(tokens, token_mask) if model.cfg.xf_width else None
    smp = make_sampler(model.cfg, steps, sampler=sampler, guidance_scale=guidance_scale)
    fn = _model_fn(model, text, eps_only=sampler != "ddpm", inpaint=(image, mask))
    return smp.sample(fn, tuple(image.shape), seed=seed, device=device, progress=progress,
                      sample_offset=sample_offset, known=(image, mask))  # fmt: skip


@torch.no_grad()
def sample_upsample_inpaint(
    model: GLIDE,
    low_res: torch.Tensor,
    image: torch.Tensor,
    mask: torch.Tensor,
    tokens: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    *,
    steps: str | int = "fast27",
    upsample_temp: float = 0.997,
    sampler: str = "ddpm",
    seed: int | None = None,
    progress: bool = True,
    sample_offset: int = 0,
) -> torch.Tensor:
    """Upsample ``low_res`` (B, C, h, w) to ``image``'s size with the upsampling inpainting model.

    ``image`` (B, C, H, W) / ``mask`` (B, 1, H, W): the known high-resolution pixels (1 = keep); the
    model sees ``[x_t, image * mask, mask, bilinear(low_res)]``. Not guided (as released), x_T =
    ``upsample_temp`` x N(0, I), the known region forced in every step's x0.
    """
    cfg = model.cfg
    if not cfg.super_res:
        raise _err(
            "sample_upsample_inpaint needs an upsampling inpainting model (super_res=True, inpaint=True)"
        )
    if not (is_finite_real(upsample_temp) and upsample_temp > 0):
        raise _err(f"upsample_temp must be a positive finite number, got {upsample_temp!r}")
    device = next(model.parameters()).device
    image, mask = _inpaint_inputs(model, image, mask, device)
    if low_res.dim() != 4 or low_res.shape[:2] != image.shape[:2]:
        raise _err(f"low_res must be ({image.shape[0]}, {cfg.in_channels}, h, w), got {tuple(low_res.shape)}")
    low_res = low_res.to(device, torch.float32)
    text = model.encode_text(tokens.to(device), None if token_mask is None else token_mask.to(device))
    if text.xf_out.shape[0] != image.shape[0]:
        raise _err(f"tokens batch {text.xf_out.shape[0]} != image batch {image.shape[0]}")
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    shape = tuple(image.shape)
    x_T = counter_normal(shape, seed, INIT_NOISE_STEP, sample_offset, device=device) * upsample_temp
    smp = make_sampler(cfg, steps, sampler=sampler)
    fn = _model_fn(model, text, low_res=low_res, eps_only=sampler != "ddpm", inpaint=(image, mask))
    return smp.sample(fn, shape, seed=seed, device=device, x_T=x_T, progress=progress,
                      sample_offset=sample_offset, known=(image, mask))  # fmt: skip


def text_to_image_inpaint(
    base: GLIDE,
    upsampler: GLIDE,
    image: torch.Tensor,
    mask: torch.Tensor,
    tokens: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    *,
    guidance_scale: float | None = 5.0,
    base_steps: str | int = "100",
    upsample_steps: str | int = "fast27",
    upsample_temp: float = 0.997,
    seed: int | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Inpaint ``image`` (B, C, H, W) at the upsampler's size where ``mask`` (B, 1, H, W) is 0, both models.

    The base model inpaints the downscaled image (area average; its mask keeps a low-res pixel only where
    every high-res pixel under it is kept), CFG ``guidance_scale`` (5 in the release notebook); its sample,
    quantised to 8 bits, is the upsampler's ``low_res``, which inpaints at full size (DDPM, as the release's
    inpainting notebook). Seeds: ``seed`` for the base, ``seed + 1`` for the upsampler.
    """
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    if (
        not isinstance(image, torch.Tensor)
        or image.dim() != 4
        or not isinstance(mask, torch.Tensor)
        or mask.dim() != 4
    ):
        raise _err("image (batch, C, H, W) and mask (batch, 1, H, W) must be 4-D tensors")
    f = upsampler.cfg.image_size // upsampler.cfg.low_res_size
    if image.shape[2] % f or image.shape[3] % f:
        raise _err(f"image size {tuple(image.shape[2:])} must be a multiple of the upsampling factor {f}")
    low_image = F.avg_pool2d(image.float(), f)
    low_mask = -F.max_pool2d(-mask.float(), f)
    low = sample_inpaint(base, low_image, low_mask, tokens, token_mask, guidance_scale=guidance_scale,
                         steps=base_steps, seed=seed, progress=progress)  # fmt: skip
    return sample_upsample_inpaint(upsampler, quantize_8bit(low), image, mask, tokens, token_mask,
                                   steps=upsample_steps, upsample_temp=upsample_temp, seed=seed + 1,
                                   progress=progress)  # fmt: skip


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> the nearest of the 256 levels (the release notebook's ``low_res`` preparation)."""
    return ((x + 1) * 127.5).round() / 127.5 - 1


def text_to_image(
    base: GLIDE,
    upsampler: GLIDE,
    tokens: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    guidance_scale: float | None = 3.0,
    base_steps: str | int = "100",
    upsample_steps: str | int = "fast27",
    upsample_temp: float = 0.997,
    seed: int | None = None,
    progress: bool = True,
    upsample_sampler: str = "ddim",
) -> torch.Tensor:
    """Base sample (guided) -> 8-bit quantised -> upsampled: (B, C, 4S, 4S) for the released pair.

    Both models take the same tokens (one tokenizer, the same ``text_ctx``). Seeds: ``seed`` for the
    base, ``seed + 1`` for the upsampler.
    """
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    low = sample_base(base, tokens, mask, guidance_scale=guidance_scale, steps=base_steps, seed=seed,
                      progress=progress)  # fmt: skip
    return sample_upsample(upsampler, quantize_8bit(low), tokens, mask, steps=upsample_steps,
                           upsample_temp=upsample_temp, seed=seed + 1, progress=progress,
                           sampler=upsample_sampler)  # fmt: skip


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) of 8-bit data in [-1, 1] (bins of width 2/255; edge bins open) under N(means, e^2log_scales)."""

    def cdf(v):  # ADM's tanh approximation of the standard normal CDF
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))

    centered = x - means
    inv = torch.exp(-log_scales)
    cdf_plus = cdf(inv * (centered + 1.0 / 255.0))
    cdf_min = cdf(inv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def training_losses(
    model: GLIDE,
    x0: torch.Tensor,
    t: torch.Tensor,
    tokens: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    *,
    low_res: torch.Tensor | None = None,
    p_uncond: float = 0.0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    r"""ADM's hybrid loss per sample: ``{"loss": mse + vb, "mse": ..., "vb": ...}``, each (B,).

    x0 (B, C, H, W) in [-1, 1]; t (B,) long in [0, diffusion_steps); noise default N(0, I).
    ``mse`` = mean((eps - eps_theta)^2); ``vb`` = KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) / ln 2 per dim
    (the model's mean from eps_theta.detach(), so vb trains the variance only), or the decoder NLL at t = 0.
    ``p_uncond``: probability that a sample's text is replaced by the empty prompt (CFG training).
    """
    cfg = model.cfg
    if not (is_finite_real(p_uncond) and 0.0 <= p_uncond <= 1.0):
        raise _err(f"p_uncond must be in [0, 1], got {p_uncond!r}")
    model._check_image(x0)
    b, c = x0.shape[:2]
    # a float t would be truncated to the wrong step (0.9 -> 0) by the table lookups
    check_integer_ids("t", t, _err)
    if t.shape != (b,):
        raise _err(f"t must be (batch,) = ({b},) int in [0, {cfg.diffusion_steps}), got {tuple(t.shape)}")
    check_id_range("t", t, cfg.diffusion_steps, _err)
    t = t.to(device=x0.device, dtype=torch.long)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    sched = training_schedule(cfg).to(x0.device)

    def at(arr):
        return arr[t].to(torch.float32).view(b, 1, 1, 1)

    abar = at(sched.alphas_cumprod)
    x0f, noise = x0.float(), noise.float()
    x_t = abar.sqrt() * x0f + (1 - abar).sqrt() * noise
    if cfg.xf_width:
        if tokens is None:
            raise _err("this model is text-conditional: pass tokens")
        tokens, mask = model.prepare_tokens(tokens, mask)
        if p_uncond > 0:
            drop = torch.rand(b, generator=generator, device=tokens.device) < p_uncond
            tokens = torch.where(drop[:, None], cfg.pad_token, tokens)
            mask = mask & ~drop[:, None]
    out = model(x_t, t, tokens, mask, low_res=low_res).float()
    eps, v = out[:, :c], out[:, c:]
    mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
    if not cfg.learn_sigma:
        return {"loss": mse, "mse": mse, "vb": torch.zeros_like(mse)}
    c1, c2 = at(sched.posterior_mean_coef1), at(sched.posterior_mean_coef2)
    min_log, max_log = at(sched.posterior_log_variance_clipped), at(sched.betas.log())
    true_mean = c1 * x0f + c2 * x_t
    pred_x0 = (x_t - (1 - abar).sqrt() * eps.detach()) / abar.sqrt()
    model_mean = c1 * pred_x0 + c2 * x_t
    frac = (v + 1) / 2
    model_logvar = frac * max_log + (1 - frac) * min_log
    kl = normal_kl(true_mean, min_log, model_mean, model_logvar).mean(dim=(1, 2, 3)) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0f, model_mean, 0.5 * model_logvar)
    nll = nll.mean(dim=(1, 2, 3)) / math.log(2.0)
    vb = torch.where(t == 0, nll, kl)
    return {"loss": mse + vb, "mse": mse, "vb": vb}


__all__ = [
    "GLIDE",
    "PRESETS",
    "RELEASE_URLS",
    "GLIDEConfig",
    "TextEmbedding",
    "config_from_state_dict",
    "count_parameters",
    "from_name",
    "make_sampler",
    "quantize_8bit",
    "sample_base",
    "sample_clip_guided",
    "sample_inpaint",
    "sample_upsample",
    "sample_upsample_inpaint",
    "text_to_image",
    "text_to_image_inpaint",
    "timestep_embedding",
    "training_losses",
    "training_schedule",
]

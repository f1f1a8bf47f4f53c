r"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision").

A ViT image tower and a causal text transformer, projected into one ``embed_dim`` space::

    image -> conv1 (patchify) -> [class token; patches] + pos -> ln_pre -> L x block -> ln_post(cls) @ proj
    text  -> token_embedding + pos -> L x causal block -> ln_final -> x[eot] @ text_projection
    block(x) = x + attn(ln_1(x));  x + mlp(ln_2(x)),   mlp = c_proj(act(c_fc(x))),  act = QuickGELU | GELU
    logits_per_image = exp(logit_scale) * normalize(img) @ normalize(txt)^T

Module and parameter names are those of the OpenAI release (``visual.conv1.weight``,
``visual.transformer.resblocks.N.attn.in_proj_weight``, ``mlp.c_fc``, ``text_projection``, ...), so an
OpenAI / open_clip ``state_dict`` loads as is (:meth:`CLIP.load_openai_state_dict`); Hugging Face
``CLIPModel`` weights go through :func:`convert_hf_clip_state_dict` and :func:`config_from_hf`.
ResNet image towers (RN50, RN101, RN50x4, RN50x16, RN50x64: ``vision_layers`` a 4-tuple of block counts)
are :class:`ModifiedResNet`: a three-conv stem, bottleneck blocks whose strided ones average-pool
(anti-aliased, 2x2) instead of striding their convs, and :class:`AttentionPool2d`, one attention query
(the mean feature) over the final feature grid plus a learned positional embedding, through
:func:`fastgen.scaled_dot_product_attention`. Parameter names are OpenAI's (``visual.layer1.0.conv1``,
``visual.layer2.0.downsample.0``, ``visual.attnpool.q_proj``, ...).

Attention: q, k, v from one ``in_proj`` (OpenAI layout) into :func:`fastgen.scaled_dot_product_attention`
(``is_causal`` for text), so ``fastgen.use_backend(...)`` swaps the kernel; a packed batch of images of
different sizes (:meth:`CLIP.encode_image_list`) goes through :func:`fastgen.flash_attn_varlen`.

Variable image size (``CLIPConfig.size_strategy``, also settable per tower as ``visual.size_strategy``):

* ``"interpolate"`` (default): any image whose sides are multiples of ``patch_size``; the positional
  embedding of the patch grid (the class token's entry kept apart) is interpolated from the trained grid
  (:func:`interpolate_pos_embed`; ``pos_interp_mode`` / ``pos_interp_antialias``, default bicubic with
  antialias as open_clip and timm).
* ``"adaptive_pool"``: the patch grid (multiples of ``patch_size``) is pooled to the trained grid with
  :func:`fastgen.ops.adaptive_grid_pool` (``pool_mode`` "avg" or "max"), and the trained positional
  embedding is used unchanged; the sequence length is the trained one at every input size.
* ``"resize"``: the image (any size) is resized to ``image_size`` first (``F.interpolate`` with
  ``pos_interp_mode`` / ``pos_interp_antialias``).

All three apply per image in the packed varlen path (:meth:`CLIP.encode_image_list`). The interpolated table is cached per (grid_h, grid_w, dtype, device) and
keyed on the parameter's version counter, so an in-place update (optimizer step, ``load_state_dict``)
invalidates it. Whenever a gradient can reach the parameter (grad mode on and ``requires_grad``) it is
recomputed on every call instead, so fine-tuning at a new size trains the pos-embed correctly.
"""

from __future__ import annotations

import dataclasses
import gzip
import html
import json
import math
import os
import re
import unicodedata
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.models.common import check_id_range, check_positive_int
from fastgen.models.hub import (
    CONFIG_NAME,
    config_from_dict,
    load_fastgen_dir,
    missing_weights_error,
    package_dirs,
    read_state_dict,
    save_fastgen_dir,
)
from fastgen.ops.adaptive_pool import adaptive_grid_pool
from fastgen.ops.attention import flash_attn_varlen, scaled_dot_product_attention

__all__ = [
    "CLIP",
    "PRESETS",
    "AttentionPool2d",
    "CLIPConfig",
    "ModifiedResNet",
    "SimpleTokenizer",
    "clip_loss",
    "config_from_hf",
    "config_from_openai_state_dict",
    "convert_hf_clip_state_dict",
    "detect_clip_format",
    "find_bpe_file",
    "from_name",
    "interpolate_pos_embed",
    "read_clip_checkpoint",
    "resize_pos_embed",
]

ACTIVATIONS = ("quick_gelu", "gelu")
EOT_RULES = ("argmax", "eos_id")
INTERP_MODES = ("bicubic", "bilinear")
RESNET_STRIDE = 32  # the ResNet tower's total downsampling: its "patch"
SIZE_STRATEGIES = ("interpolate", "adaptive_pool", "resize")
POOL_MODES = ("avg", "max")
# keys of the OpenAI JIT archive's state_dict that are not parameters
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")


def _err(msg: str) -> ValueError:
    return ValueError(f"fastgen.models.clip: {msg}")


def check_size_strategy(strategy: str, pool_mode: str = "avg") -> None:
    if strategy not in SIZE_STRATEGIES:
        raise _err(f"size_strategy must be one of {SIZE_STRATEGIES}, got {strategy!r}")
    if pool_mode not in POOL_MODES:
        raise _err(f"pool_mode must be one of {POOL_MODES}, got {pool_mode!r}")


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    h, w = x
    return (int(h), int(w))


# =====================================================================================================
# Config and presets
# =====================================================================================================


@dataclass
class CLIPConfig:
    """CLIP hyper-parameters (ViT image tower + text transformer).

    Vision: ``image_size`` (int or (H, W)) and ``patch_size`` give the trained patch grid; ``vision_width``
    / ``vision_layers`` / ``vision_heads``; MLP width ``vision_width * vision_mlp_ratio``.
    Text: ``context_length`` positions, ``vocab_size`` tokens, ``text_width`` / ``text_heads`` /
    ``text_layers``. ``act``: ``"quick_gelu"`` (x * sigmoid(1.702 x), OpenAI's and HF's default) or
    ``"gelu"`` (erf). ``eot_rule``: which text position is pooled: ``"argmax"`` = the position of the
    largest token id (OpenAI: the eot token has the largest id), ``"eos_id"`` = the first position equal
    to ``eos_token_id`` (HF's rule when its ``eos_token_id != 2``). ``pos_interp_mode`` /
    ``pos_interp_antialias``: how the image pos-embed (or, with ``size_strategy="resize"``, the image)
    is resampled for other sizes. ``size_strategy``: ``"interpolate"`` | ``"adaptive_pool"`` |
    ``"resize"`` (see the module docstring); ``pool_mode``: ``"avg"`` | ``"max"`` for adaptive_pool.
    """

    embed_dim: int = 512
    image_size: int | tuple[int, int] = 224
    patch_size: int = 32
    vision_width: int = 768
    vision_layers: int | tuple[int, int, int, int] = 12
    vision_heads: int = 12
    vision_mlp_ratio: float = 4.0
    in_channels: int = 3
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12
    text_mlp_ratio: float = 4.0
    act: str = "quick_gelu"
    eot_rule: str = "argmax"
    eos_token_id: int | None = None
    ln_eps: float = 1e-5
    pos_interp_mode: str = "bicubic"
    pos_interp_antialias: bool = True
    size_strategy: str = "interpolate"
    pool_mode: str = "avg"

    def __post_init__(self) -> None:
        if not isinstance(self.vision_layers, int):
            self.vision_layers = tuple(int(n) for n in self.vision_layers)
            if len(self.vision_layers) != 4 or min(self.vision_layers) < 1:
                raise _err(
                    f"vision_layers must be an int (ViT) or 4 block counts >= 1 (ResNet), got {self.vision_layers}"
                )
            if self.patch_size != RESNET_STRIDE:
                raise _err(
                    f"a ResNet tower downsamples by {RESNET_STRIDE}: patch_size must be {RESNET_STRIDE}, got {self.patch_size}"
                )
        if not isinstance(self.image_size, int):
            self.image_size = _pair(self.image_size)
        h, w = _pair(self.image_size)
        gh, gw = self.grid_size
        if h % self.patch_size or w % self.patch_size or gh < 1 or gw < 1:
            raise _err(
                f"image_size {self.image_size} must be a positive multiple of patch_size {self.patch_size}"
            )
        for name in ("vision", "text"):
            width, heads = getattr(self, f"{name}_width"), getattr(self, f"{name}_heads")
            if name == "vision" and self.is_resnet:
                width = width * 32  # the attention pool runs on the last stage's 32 * width channels
            if heads <= 0 or width % heads:
                raise _err(f"{name}_width ({width}) must be a multiple of {name}_heads ({heads})")
        if self.act not in ACTIVATIONS:
            raise _err(f"act must be one of {ACTIVATIONS}, got {self.act!r}")
        if self.eot_rule not in EOT_RULES:
            raise _err(f"eot_rule must be one of {EOT_RULES}, got {self.eot_rule!r}")
        if self.eot_rule == "eos_id" and self.eos_token_id is None:
            raise _err("eot_rule='eos_id' needs eos_token_id")
        if self.pos_interp_mode not in INTERP_MODES:
            raise _err(f"pos_interp_mode must be one of {INTERP_MODES}, got {self.pos_interp_mode!r}")
        check_size_strategy(self.size_strategy, self.pool_mode)

    @property
    def is_resnet(self) -> bool:
        return not isinstance(self.vision_layers, int)

    @property
    def grid_size(self) -> tuple[int, int]:
        h, w = _pair(self.image_size)
        return (h // self.patch_size, w // self.patch_size)


def _openai_vit(embed_dim, image_size, patch, v_width, v_layers, t_width, t_layers) -> CLIPConfig:
    return CLIPConfig(
        embed_dim=embed_dim, image_size=image_size, patch_size=patch, vision_width=v_width,
        vision_layers=v_layers, vision_heads=v_width // 64, text_width=t_width, text_heads=t_width // 64,
        text_layers=t_layers,
    )  # fmt: skip


def _openai_rn(embed_dim, image_size, layers, v_width, t_width) -> CLIPConfig:
    return CLIPConfig(
        embed_dim=embed_dim, image_size=image_size, patch_size=RESNET_STRIDE, vision_width=v_width,
        vision_layers=layers, vision_heads=v_width * 32 // 64, text_width=t_width, text_heads=t_width // 64,
        text_layers=12,
    )  # fmt: skip


PRESETS: dict[str, CLIPConfig] = {
    # the published OpenAI sizes (vision heads = width / 64, text heads = width / 64)
    "ViT-B/32": _openai_vit(512, 224, 32, 768, 12, 512, 12),
    "ViT-B/16": _openai_vit(512, 224, 16, 768, 12, 512, 12),
    "ViT-L/14": _openai_vit(768, 224, 14, 1024, 24, 768, 12),
    "ViT-L/14@336": _openai_vit(768, 336, 14, 1024, 24, 768, 12),
    # ResNet towers: (blocks per stage), stem width; attention-pool heads = 32 * width / 64
    "RN50": _openai_rn(1024, 224, (3, 4, 6, 3), 64, 512),
    "RN101": _openai_rn(512, 224, (3, 4, 23, 3), 64, 512),
    "RN50x4": _openai_rn(640, 288, (4, 6, 10, 6), 80, 640),
    "RN50x16": _openai_rn(768, 384, (6, 8, 18, 8), 96, 768),
    "RN50x64": _openai_rn(1024, 448, (3, 15, 36, 10), 128, 1024),
    "tiny-rn": CLIPConfig(
        embed_dim=32, image_size=64, patch_size=RESNET_STRIDE, vision_width=8, vision_layers=(1, 1, 1, 1),
        vision_heads=4, context_length=32, vocab_size=258, text_width=64, text_heads=4, text_layers=2,
    ),
    # test sizes; vocab 258 = SimpleTokenizer's byte-level fallback
    "tiny": CLIPConfig(
        embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=4,
        context_length=32, vocab_size=258, text_width=64, text_heads=4, text_layers=2,
    ),
    "tiny-gelu": CLIPConfig(
        embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=4,
        context_length=32, vocab_size=258, text_width=64, text_heads=4, text_layers=2, act="gelu",
    ),
    "micro": CLIPConfig(
        embed_dim=16, image_size=8, patch_size=4, vision_width=32, vision_layers=1, vision_heads=2,
        context_length=8, vocab_size=258, text_width=32, text_heads=2, text_layers=1,
    ),
}  # fmt: skip


def from_name(name: str, **overrides: Any) -> CLIP:
    """A randomly initialised :class:`CLIP` of preset ``name`` with config fields replaced by ``overrides``
    (``device`` / ``dtype`` are passed to the constructor)."""
    if name not in PRESETS:
        raise _err(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    device, dtype = overrides.pop("device", None), overrides.pop("dtype", None)
    return CLIP(replace(PRESETS[name], **overrides), device=device, dtype=dtype)


# =====================================================================================================
# Building blocks (OpenAI names)
# =====================================================================================================


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names (``in_proj_weight``
    (3E, E), ``in_proj_bias``, ``out_proj``), served by fastgen's attention ops.

    ``attn_fn``: None = :func:`fastgen.scaled_dot_product_attention`; any function with SDPA's signature
    (e.g. ``torch.nn.functional.scaled_dot_product_attention``) replaces it on the padded path.
    """

    def __init__(self, width: int, heads: int, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width, **kw))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width, **kw))
        self.out_proj = nn.Linear(width, width, **kw)
        self.attn_fn: Callable[..., torch.Tensor] | None = None

    def forward(
        self,
        x: torch.Tensor,
        causal: bool = False,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int = 0,
    ) -> torch.Tensor:
        """x: (B, L, E), or packed (total, E) with ``cu_seqlens`` (B + 1,) int32. Returns x's shape."""
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        e, h = x.shape[-1], self.heads
        if cu_seqlens is not None:
            q, k, v = qkv.view(-1, 3, h, e // h).unbind(1)  # (total, H, D) each
            o = flash_attn_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=causal)
            return self.out_proj(o.reshape(-1, e))
        b, n = x.shape[:2]
        q, k, v = qkv.view(b, n, 3, h, e // h).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, D) each
        o = (self.attn_fn or scaled_dot_product_attention)(q, k, v, is_causal=causal)
        return self.out_proj(o.transpose(1, 2).reshape(b, n, e))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)), mlp = c_fc -> act -> c_proj."""

    def __init__(self, width, heads, mlp_ratio, act, eps, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        hidden = round(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width, eps=eps, **kw)
        self.attn = SelfAttention(width, heads, **kw)
        self.ln_2 = nn.LayerNorm(width, eps=eps, **kw)
        gelu = QuickGELU() if act == "quick_gelu" else nn.GELU()
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, hidden, **kw), gelu=gelu, c_proj=nn.Linear(hidden, width, **kw))
        )

    def forward(self, x: torch.Tensor, **attn_kw: Any) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), **attn_kw)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, mlp_ratio, act, eps, device=None, dtype=None) -> None:
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, act, eps, device, dtype) for _ in range(layers)
        )

    def forward(self, x: torch.Tensor, **attn_kw: Any) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, **attn_kw)
        return x


# =====================================================================================================
# Positional-embedding resampling
# =====================================================================================================


def interpolate_pos_embed(
    pos: torch.Tensor,
    old_grid: int | Sequence[int],
    new_grid: int | Sequence[int],
    mode: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample a ViT positional embedding to another patch grid.

    pos: (1 + gh * gw, C), row 0 the class token's (kept as is), rows 1.. the (gh, gw) grid row-major.
    The grid is treated as a (C, gh, gw) image and resized with ``F.interpolate(mode, align_corners=False,
    antialias)`` in fp32 (as timm / open_clip do); ``antialias`` only matters when shrinking.
    Returns (1 + GH * GW, C) in pos's dtype.
    """
    (gh, gw), (nh, nw) = _pair(old_grid), _pair(new_grid)
    if min(gh, gw, nh, nw) < 1:
        raise _err(f"old_grid and new_grid must be positive, got {(gh, gw)} and {(nh, nw)}")
    if pos.dim() != 2 or pos.shape[0] != 1 + gh * gw:
        raise _err(f"pos: expected (1 + {gh}*{gw}, C) = ({1 + gh * gw}, C), got {tuple(pos.shape)}")
    if mode not in INTERP_MODES:
        raise _err(f"mode must be one of {INTERP_MODES}, got {mode!r}")
    if (gh, gw) == (nh, nw):
        return pos
    grid = pos[1:].float().reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(nh, nw), mode=mode, align_corners=False, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(nh * nw, -1).to(pos.dtype)
    return torch.cat([pos[:1], grid], dim=0)


def resize_pos_embed(
    state_dict: Mapping[str, torch.Tensor],
    new_grid: int | Sequence[int],
    mode: str = "bicubic",
    antialias: bool = True,
    old_grid: int | Sequence[int] | None = None,
    key: str = "visual.positional_embedding",
) -> dict[str, torch.Tensor]:
    """A copy of an OpenAI-format ``state_dict`` whose image pos-embed is resampled to ``new_grid``, for
    fine-tuning or serving at another size (build the model with ``image_size = new_grid * patch_size``).
    ``old_grid``: default the square grid implied by the pos-embed's length."""
    sd = dict(state_dict)
    pos = sd[key]
    if old_grid is None:
        side = math.isqrt(pos.shape[0] - 1)
        if side * side != pos.shape[0] - 1:
            raise _err(f"{key} has {pos.shape[0] - 1} grid positions, not a square: pass old_grid")
        old_grid = side
    sd[key] = interpolate_pos_embed(pos, old_grid, new_grid, mode, antialias)
    return sd


# =====================================================================================================
# Towers and model
# =====================================================================================================


class VisionTransformer(nn.Module):
    """The ViT image tower. Images (B, C, H, W) with H, W multiples of ``patch_size`` -> (B, embed_dim)."""

    def __init__(self, cfg: CLIPConfig, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        w, p = cfg.vision_width, cfg.patch_size
        self.cfg = cfg
        self.grid_size = cfg.grid_size
        self.conv1 = nn.Conv2d(cfg.in_channels, w, kernel_size=p, stride=p, bias=False, **kw)
        self.class_embedding = nn.Parameter(torch.empty(w, **kw))
        self.positional_embedding = nn.Parameter(
            torch.empty(1 + self.grid_size[0] * self.grid_size[1], w, **kw)
        )
        self.ln_pre = nn.LayerNorm(w, eps=cfg.ln_eps, **kw)
        self.transformer = Transformer(
            w, cfg.vision_layers, cfg.vision_heads, cfg.vision_mlp_ratio, cfg.act, cfg.ln_eps, **kw
        )
        self.ln_post = nn.LayerNorm(w, eps=cfg.ln_eps, **kw)
        self.proj = nn.Parameter(torch.empty(w, cfg.embed_dim, **kw))
        self._pos_cache: dict[tuple, tuple[int, int, torch.Tensor]] = {}
        self.size_strategy = cfg.size_strategy
        self.pool_mode = cfg.pool_mode

    def pos_embed(self, grid: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """(1 + gh * gw, width): the pos-embed for a (gh, gw) patch grid (see the module docstring)."""
        pe = self.positional_embedding
        if tuple(grid) == self.grid_size:
            return pe.to(dtype)
        cfg = self.cfg
        if torch.is_grad_enabled() and pe.requires_grad:  # gradients must reach the parameter
            return interpolate_pos_embed(
                pe, self.grid_size, grid, cfg.pos_interp_mode, cfg.pos_interp_antialias
            ).to(dtype)
        key = (*grid, dtype, pe.device)
        stamp = (pe._version, pe.data_ptr())
        hit = self._pos_cache.get(key)
        if hit is not None and hit[:2] == stamp:
            return hit[2]
        with torch.no_grad():
            out = interpolate_pos_embed(
                pe, self.grid_size, grid, cfg.pos_interp_mode, cfg.pos_interp_antialias
            )
            out = out.to(dtype)
        self._pos_cache[key] = (*stamp, out)
        return out

    def _check(self, x: torch.Tensor, name: str = "image") -> None:
        check_size_strategy(self.size_strategy, self.pool_mode)
        c, p = self.cfg.in_channels, self.cfg.patch_size
        if x.dim() != 4 or x.shape[1] != c:
            raise _err(f"{name}: expected (batch, {c}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if self.size_strategy == "resize" and h > 0 and w > 0:
            return
        if h % p or w % p or h == 0 or w == 0:
            raise _err(f"{name}: height and width must be positive multiples of patch_size {p}, got {h}x{w}")

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + gh * gw, width): class token + patches + pos-embed."""
        cfg = self.cfg
        size = _pair(cfg.image_size)
        if self.size_strategy == "resize" and tuple(x.shape[-2:]) != size:
            dt = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
            x = F.interpolate(
                x.to(dt), size=size, mode=cfg.pos_interp_mode, align_corners=False,
                antialias=cfg.pos_interp_antialias,
            )  # fmt: skip
        x = self.conv1(x.to(self.conv1.weight.dtype))
        if self.size_strategy == "adaptive_pool" and tuple(x.shape[-2:]) != self.grid_size:
            x = adaptive_grid_pool(x, self.grid_size, self.pool_mode)
        b, w, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(b, 1, w)
        return torch.cat([cls, x], dim=1) + self.pos_embed((gh, gw), x.dtype)

    def _head(self, cls: torch.Tensor) -> torch.Tensor:
        return self.ln_post(cls) @ self.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        x = self.transformer(self.ln_pre(self._tokens(x)))
        return self._head(x[:, 0])

    def forward_list(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Images of different sizes, each (C, H, W) or (1, C, H, W), as ONE packed varlen batch."""
        if len(images) == 0:
            raise _err("images: expected a non-empty list")
        groups: dict[tuple, list[int]] = {}  # images of one shape are embedded as one batch
        batches = []
        for i, img in enumerate(images):
            img = img.unsqueeze(0) if img.dim() == 3 else img
            self._check(img, f"images[{i}]")
            if img.shape[0] != 1:
                raise _err(
                    f"images[{i}]: expected one image (C, H, W) or (1, C, H, W), got {tuple(img.shape)}"
                )
            groups.setdefault((tuple(img.shape), img.dtype, img.device), []).append(i)
            batches.append(img)
        order, lens, seqs = [], [0], []
        for idx in groups.values():
            t = self._tokens(torch.cat([batches[i] for i in idx]) if len(idx) > 1 else batches[idx[0]])
            order += idx
            lens += [t.shape[1]] * t.shape[0]
            seqs.append(t.reshape(-1, t.shape[-1]))
        cu = torch.tensor(lens, device=seqs[0].device).cumsum(0).to(torch.int32)
        x = self.ln_pre(torch.cat(seqs) if len(seqs) > 1 else seqs[0])  # (total, width), size-group order
        x = self.transformer(x, cu_seqlens=cu, max_seqlen=max(lens))
        out = self._head(x[cu[:-1].long()])
        if order == sorted(order):
            return out
        # back to the order of ``images``
        return out[torch.tensor(order, device=out.device).argsort()]


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> [avgpool(stride)] -> 1x1 (x4 channels), BN + ReLU after each; the shortcut is
    avgpool(stride) -> 1x1 conv -> BN when the shape changes (OpenAI's anti-aliased strided block)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False, **kw)
        self.bn1 = nn.BatchNorm2d(planes, **kw)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False, **kw)
        self.bn2 = nn.BatchNorm2d(planes, **kw)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False, **kw)
        self.bn3 = nn.BatchNorm2d(out, **kw)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != out:
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, out, 1, bias=False, **kw)),
                        ("1", nn.BatchNorm2d(out, **kw)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.relu2(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(self.avgpool(y)))
        return self.relu3(y + identity)


class AttentionPool2d(nn.Module):
    """One attention query over a feature grid: (B, C, h, w) -> (B, output_dim).

    tokens = [mean over the grid; the h * w features] + positional_embedding (1 + gh * gw, C) -- the
    trained (gh, gw) table, interpolated or the grid adaptive-pooled for other sizes (``size_strategy``);
    out = c_proj(MHA(q = q_proj(tokens[0]), k = k_proj(tokens), v = v_proj(tokens))).
    """

    def __init__(self, grid: tuple[int, int], embed_dim: int, heads: int, output_dim: int, cfg: CLIPConfig,
                 device=None, dtype=None) -> None:  # fmt: skip
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.grid_size = grid
        self.heads = heads
        self.cfg = cfg
        self.positional_embedding = nn.Parameter(torch.empty(grid[0] * grid[1] + 1, embed_dim, **kw))
        self.k_proj = nn.Linear(embed_dim, embed_dim, **kw)
        self.q_proj = nn.Linear(embed_dim, embed_dim, **kw)
        self.v_proj = nn.Linear(embed_dim, embed_dim, **kw)
        self.c_proj = nn.Linear(embed_dim, output_dim, **kw)

    def forward(
        self, x: torch.Tensor, size_strategy: str = "interpolate", pool_mode: str = "avg"
    ) -> torch.Tensor:
        if size_strategy == "adaptive_pool" and tuple(x.shape[-2:]) != self.grid_size:
            x = adaptive_grid_pool(x, self.grid_size, pool_mode)
        b, c, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, gh * gw, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        pos = self.positional_embedding
        if (gh, gw) != self.grid_size:
            pos = interpolate_pos_embed(pos, self.grid_size, (gh, gw), self.cfg.pos_interp_mode,
                                        self.cfg.pos_interp_antialias)  # fmt: skip
        x = x + pos.to(x.dtype)
        h, d = self.heads, c // self.heads
        q = self.q_proj(x[:, :1]).view(b, 1, h, d).transpose(1, 2)
        k = self.k_proj(x).view(b, -1, h, d).transpose(1, 2)
        v = self.v_proj(x).view(b, -1, h, d).transpose(1, 2)
        o = scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c)
        return self.c_proj(o)


class ModifiedResNet(nn.Module):
    """CLIP's ResNet image tower: (B, C, H, W) -> (B, embed_dim). See the module docstring.

    stem: 3x3/2 conv (width/2) -> 3x3 conv (width/2) -> 3x3 conv (width), each BN + ReLU, then 2x2 avgpool;
    stages layer1..4 of ``vision_layers`` bottlenecks, planes width * (1, 2, 4, 8), strides (1, 2, 2, 2);
    attnpool over the (H/32, W/32) grid of 32 * width channels, 32 * width / 64 heads by default.
    """

    def __init__(self, cfg: CLIPConfig, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        w = cfg.vision_width
        self.cfg = cfg
        self.grid_size = cfg.grid_size
        self.size_strategy = cfg.size_strategy
        self.pool_mode = cfg.pool_mode
        self.conv1 = nn.Conv2d(cfg.in_channels, w // 2, 3, stride=2, padding=1, bias=False, **kw)
        self.bn1 = nn.BatchNorm2d(w // 2, **kw)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(w // 2, w // 2, 3, padding=1, bias=False, **kw)
        self.bn2 = nn.BatchNorm2d(w // 2, **kw)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(w // 2, w, 3, padding=1, bias=False, **kw)
        self.bn3 = nn.BatchNorm2d(w, **kw)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = w
        for i, (n, stride) in enumerate(zip(cfg.vision_layers, (1, 2, 2, 2))):
            planes = w * 2**i
            blocks = [Bottleneck(inplanes, planes, stride, **kw)]
            inplanes = planes * Bottleneck.expansion
            blocks += [Bottleneck(inplanes, planes, 1, **kw) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.attnpool = AttentionPool2d(self.grid_size, w * 32, cfg.vision_heads, cfg.embed_dim, cfg, **kw)

    def _check(self, x: torch.Tensor, name: str = "image") -> None:
        check_size_strategy(self.size_strategy, self.pool_mode)
        c = self.cfg.in_channels
        if x.dim() != 4 or x.shape[1] != c:
            raise _err(f"{name}: expected (batch, {c}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if min(h, w) < RESNET_STRIDE:
            raise _err(
                f"{name}: height and width must be >= {RESNET_STRIDE} (the tower's stride), got {h}x{w}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        cfg = self.cfg
        size = _pair(cfg.image_size)
        if self.size_strategy == "resize" and tuple(x.shape[-2:]) != size:
            dt = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
            x = F.interpolate(x.to(dt), size=size, mode=cfg.pos_interp_mode, align_corners=False,
                              antialias=cfg.pos_interp_antialias)  # fmt: skip
        x = x.to(self.conv1.weight.dtype)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.relu3(self.bn3(self.conv3(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x, self.size_strategy, self.pool_mode)

    def forward_list(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Images of different sizes, each (C, H, W) or (1, C, H, W): one forward each (a CNN has no
        packed form), stacked."""
        if len(images) == 0:
            raise _err("images: expected a non-empty list")
        return torch.cat([self(img.unsqueeze(0) if img.dim() == 3 else img) for img in images])


class CLIP(nn.Module):
    """CLIP with OpenAI's module names. See the module docstring for the math and the formats."""

    def __init__(self, config: CLIPConfig, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        cfg = self.config = config
        self.visual = ModifiedResNet(cfg, **kw) if cfg.is_resnet else VisionTransformer(cfg, **kw)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width, **kw)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.text_width, **kw))
        self.transformer = Transformer(
            cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.text_mlp_ratio, cfg.act, cfg.ln_eps, **kw
        )
        self.ln_final = nn.LayerNorm(cfg.text_width, eps=cfg.ln_eps, **kw)
        self.text_projection = nn.Parameter(torch.empty(cfg.text_width, cfg.embed_dim, **kw))
        self.logit_scale = nn.Parameter(torch.empty((), **kw))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """OpenAI's initialisation (``CLIP.initialize_parameters`` and ``VisionTransformer.__init__``)."""
        v, cfg = self.visual, self.config
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if cfg.is_resnet:
            self._reset_resnet(v)
            towers = (self.transformer,)
        else:
            scale = cfg.vision_width**-0.5
            for p in (v.class_embedding, v.positional_embedding, v.proj):
                p.normal_(0, scale)
            towers = (self.transformer, v.transformer)
            v._pos_cache.clear()
        for tower in towers:
            attn_std, fc_std = tower.width**-0.5, (2 * tower.width) ** -0.5
            proj_std = attn_std * (2 * tower.layers) ** -0.5
            for block in tower.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
                for lin in (block.attn.out_proj, block.mlp.c_fc, block.mlp.c_proj):
                    nn.init.zeros_(lin.bias)
                nn.init.zeros_(block.attn.in_proj_bias)
        nn.init.normal_(self.text_projection, std=cfg.text_width**-0.5)
        self.logit_scale.fill_(math.log(1 / 0.07))

    @staticmethod
    def _reset_resnet(v: ModifiedResNet) -> None:
        """OpenAI's: default conv / BN init, the attention pool at std c^-0.5, each block's last BN scale
        zeroed (every residual branch starts as the identity)."""
        for m in v.modules():
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
                m.reset_parameters()
        pool = v.attnpool
        std = pool.c_proj.in_features**-0.5
        pool.positional_embedding.normal_(0, pool.positional_embedding.shape[1] ** -0.5)
        for lin in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
            nn.init.normal_(lin.weight, std=std)
        for m in v.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def set_attention_fn(self, fn: Callable[..., torch.Tensor] | None) -> CLIP:
        """Serve the padded attention calls with ``fn`` (SDPA's signature), e.g.
        ``torch.nn.functional.scaled_dot_product_attention``; None restores fastgen's. Returns self."""
        for m in self.modules():
            if isinstance(m, SelfAttention):
                m.attn_fn = fn
        return self

    # ---- encoders ---------------------------------------------------------------------------------

    def encode_image(
        self, image: torch.Tensor | Sequence[torch.Tensor], normalize: bool = False
    ) -> torch.Tensor:
        """image: (B, C, H, W), H and W any multiples of ``patch_size`` (other sizes interpolate the
        pos-embed), or a list of (C, H, W) of different sizes (-> :meth:`encode_image_list`).
        Returns (B, embed_dim), L2-normalised if ``normalize``."""
        if isinstance(image, (list, tuple)):
            return self.encode_image_list(image, normalize)
        out = self.visual(image)
        return F.normalize(out, dim=-1) if normalize else out

    def encode_image_list(self, images: Sequence[torch.Tensor], normalize: bool = False) -> torch.Tensor:
        """Images of different sizes, each (C, H, W), packed into one varlen batch (no padding compute):
        equal to encoding each image alone. Returns (len(images), embed_dim)."""
        out = self.visual.forward_list(images)
        return F.normalize(out, dim=-1) if normalize else out

    def eot_index(self, text: torch.Tensor) -> torch.Tensor:
        """(B,) the pooled position of each row of ``text`` under ``config.eot_rule``."""
        if self.config.eot_rule == "argmax":
            return text.argmax(dim=-1)
        return (text == self.config.eos_token_id).int().argmax(dim=-1)  # first match (0 when absent, as HF)

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """text: (B, L) token ids, L <= context_length (causal attention: shorter rows need no padding
        mask). Returns (B, embed_dim): the ``ln_final`` output at the eot position, projected."""
        ctx = self.config.context_length
        if (
            not isinstance(text, torch.Tensor)
            or text.dim() != 2
            or text.dtype not in (torch.int64, torch.int32)
        ):
            raise _err(
                "text: expected (batch, length) int64 / int32 token ids, got "
                f"{tuple(getattr(text, 'shape', ()))} {getattr(text, 'dtype', type(text).__name__)}"
            )
        if text.shape[1] > ctx:
            raise _err(f"text: length {text.shape[1]} exceeds context_length {ctx}")
        if text.shape[1] == 0:
            raise _err(f"text: needs length >= 1 (the eot position is pooled), got {tuple(text.shape)}")
        check_id_range("text", text, self.config.vocab_size, _err)
        x = self.token_embedding(text) + self.positional_embedding[: text.shape[1]]
        x = self.ln_final(self.transformer(x, causal=True))
        x = x[torch.arange(x.shape[0], device=x.device), self.eot_index(text)]
        out = x @ self.text_projection
        return F.normalize(out, dim=-1) if normalize else out

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits_per_image (B_img, B_txt), logits_per_text (B_txt, B_img)) =
        exp(logit_scale) * cosine similarities."""
        img = self.encode_image(image, normalize=True)
        txt = self.encode_text(text, normalize=True)
        logits = self.logit_scale.exp() * img @ txt.t()
        return logits, logits.t()

    # ---- zero-shot --------------------------------------------------------------------------------

    @torch.no_grad()
    def zero_shot_classifier(self, class_tokens: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """class_tokens: (num_classes, L) token ids (one prompt per class) or a list of (templates, L) per
        class (prompt ensembling: the normalised mean of the normalised prompt embeddings).
        Returns (embed_dim, num_classes) unit columns."""
        if isinstance(class_tokens, torch.Tensor):
            w = self.encode_text(class_tokens, normalize=True)
        else:
            w = torch.stack([self.encode_text(t, normalize=True).mean(0) for t in class_tokens])
        return F.normalize(w, dim=-1).t()

    @torch.no_grad()
    def zero_shot_predict(self, image: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) class probabilities: softmax(exp(logit_scale) * normalize(img) @ classifier)."""
        logits = self.logit_scale.exp() * self.encode_image(image, normalize=True) @ classifier
        return logits.softmax(dim=-1)

    # ---- checkpoints ------------------------------------------------------------------------------

    def load_openai_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True):
        """Load an OpenAI-release (or open_clip ViT, or :func:`convert_hf_clip_state_dict`) state_dict:
        the key names are this module's, so this is ``load_state_dict`` minus the JIT archive's extra
        entries (input_resolution, context_length, vocab_size, attn_mask)."""
        sd = {k: v for k, v in state_dict.items() if k not in _OPENAI_EXTRA_KEYS}
        key = (
            "visual.attnpool.positional_embedding" if self.config.is_resnet else "visual.positional_embedding"
        )
        own = self.state_dict()[key]
        pos = sd.get(key)
        if pos is not None and pos.shape != own.shape:
            raise _err(
                f"{key}: checkpoint {tuple(pos.shape)} vs model {tuple(own.shape)}; resize it with "
                f"resize_pos_embed(sd, {self.visual.grid_size}, key={key!r}) (any image size still runs: "
                "the model interpolates on the fly)"
            )
        return self.load_state_dict(sd, strict=strict)

    @classmethod
    def from_openai_state_dict(cls, state_dict: Mapping[str, Any], **overrides: Any) -> CLIP:
        """A model with :func:`config_from_openai_state_dict`'s config and these weights."""
        first = next(v for v in state_dict.values() if isinstance(v, torch.Tensor))
        model = cls(
            config_from_openai_state_dict(state_dict, **overrides), device=first.device, dtype=first.dtype
        )
        model.load_openai_state_dict(state_dict)
        return model

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write fastgen's format into ``directory`` (created if missing): config.json
        (``{"model_type": "clip", "fastgen_version", "config": CLIPConfig as JSON}``) and model.safetensors
        (this ``state_dict``, dtypes as they are). The image tower's current ``size_strategy`` /
        ``pool_mode`` are stored in the config. Read back with :meth:`from_pretrained`. Returns the path."""
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory: expected a str or os.PathLike, got {type(directory).__name__}")
        v = self.visual
        cfg = replace(self.config, size_strategy=v.size_strategy, pool_mode=v.pool_mode)
        return save_fastgen_dir(directory, "clip", cfg, self.state_dict())

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        **overrides: Any,
    ) -> CLIP:
        """A CLIP from a local checkpoint in any release format (see :func:`detect_clip_format`):

        - a :meth:`save_pretrained` directory;
        - an OpenAI release TorchScript archive (``ViT-B-32.pt``, ``RN50.pt``, ...) or an OpenAI / open_clip
          state_dict file (``.pt``, ``.bin``, ``.safetensors``, also an open_clip training checkpoint
          ``{"epoch", "name", "state_dict": {"module.*": ...}}``);
        - an open_clip Hub directory (open_clip_config.json + open_clip_model.safetensors or
          open_clip_pytorch_model.bin; its ``model_cfg`` sets QuickGELU vs GELU and the head counts);
        - a Hugging Face ``CLIPModel`` directory (config.json + model.safetensors or pytorch_model.bin).

        Files without a config have it inferred from the shapes (heads = width / 64, QuickGELU as OpenAI's;
        pass ``act="gelu"`` for an open_clip model trained with GELU). ``overrides``: CLIPConfig fields,
        e.g. ``size_strategy="adaptive_pool"``; a different ``image_size`` resamples the trained image
        pos-embed to the new grid (``pos_interp_mode``). ``dtype``: None = float32 (as OpenAI's and
        HF's loaders on CPU; OpenAI archives store float16), ``"auto"`` = the checkpoint's dominant floating
        dtype, or a ``torch.dtype``. ``device``: where the model is built (default CPU). Returns the model in
        eval mode. Nothing is downloaded: a missing file raises ``FileNotFoundError`` naming it and its
        source.
        """
        if dtype is not None and dtype != "auto" and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype: expected None, 'auto' or a torch.dtype, got {dtype!r}")
        config, sd, stored = read_clip_checkpoint(path, **overrides)
        if dtype is None:
            dtype = torch.float32
        elif dtype == "auto":
            dtype = _auto_dtype(sd)
        model = cls(config, device=device, dtype=dtype)
        with torch.no_grad():
            _load_checkpoint_into(model, sd, stored, os.fspath(path))
        if not config.is_resnet:
            model.visual._pos_cache.clear()
        return model.eval()


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float):
    """Symmetric InfoNCE of CLIP: (CE(logits, arange) + CE(logits^T, arange)) / 2 with
    logits = logit_scale * normalize(image_features) @ normalize(text_features)^T, pairs on the diagonal.

    image_features, text_features: (B, embed_dim) (normalised here; already-unit features are unchanged).
    logit_scale: the multiplicative temperature, i.e. ``model.logit_scale.exp()`` (open_clip's convention).
    """
    if image_features.shape != text_features.shape or image_features.dim() != 2:
        raise _err(
            f"image_features {tuple(image_features.shape)} and text_features {tuple(text_features.shape)} "
            "must both be (batch, embed_dim)"
        )
    logits = logit_scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


# =====================================================================================================
# Checkpoint formats
# =====================================================================================================


def _count_blocks(sd: Mapping[str, Any], prefix: str) -> int:
    idx = {int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def config_from_openai_state_dict(state_dict: Mapping[str, Any], **overrides: Any) -> CLIPConfig:
    """Infer a :class:`CLIPConfig` from OpenAI-format weights, as OpenAI's ``build_model`` does. Head
    counts are not in the weights: width / 64 (OpenAI's rule) unless overridden; act defaults to
    quick_gelu, eot_rule to argmax."""
    sd = state_dict
    if "visual.attnpool.positional_embedding" in sd:
        return _resnet_config(sd, **overrides)
    v_width, _, patch, _ = sd["visual.conv1.weight"].shape
    n = sd["visual.positional_embedding"].shape[0] - 1
    side = math.isqrt(n)
    kw: dict[str, Any] = {
        "embed_dim": sd["text_projection"].shape[1],
        "image_size": side * patch if side * side == n else overrides.get("image_size"),
        "patch_size": patch,
        "vision_width": v_width,
        "vision_layers": _count_blocks(sd, "visual.transformer.resblocks."),
        "vision_heads": max(v_width // 64, 1),
        "vision_mlp_ratio": sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / v_width,
        "in_channels": sd["visual.conv1.weight"].shape[1],
        **_text_config(sd),
    }
    kw.update(overrides)
    return CLIPConfig(**kw)


def _text_config(sd: Mapping[str, Any]) -> dict[str, Any]:
    """The text tower's config entries from an OpenAI state_dict (shared by the ViT and ResNet models)."""
    t_width = sd["ln_final.weight"].shape[0]
    return {
        "context_length": sd["positional_embedding"].shape[0],
        "vocab_size": sd["token_embedding.weight"].shape[0],
        "text_width": t_width,
        "text_heads": max(t_width // 64, 1),
        "text_layers": _count_blocks(sd, "transformer.resblocks."),
        "text_mlp_ratio": sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / t_width,
    }


def _resnet_config(sd: Mapping[str, Any], **overrides: Any) -> CLIPConfig:
    """OpenAI's build_model for the ResNet towers: stage depths from the block keys, the stem width
    from layer1's first conv, the input size from the attention pool's grid."""
    n = sd["visual.attnpool.positional_embedding"].shape[0] - 1
    side = math.isqrt(n)
    v_width = sd["visual.layer1.0.conv1.weight"].shape[1]
    kw: dict[str, Any] = {
        "embed_dim": sd["text_projection"].shape[1],
        "image_size": side * RESNET_STRIDE if side * side == n else overrides.get("image_size"),
        "patch_size": RESNET_STRIDE,
        "vision_width": v_width,
        "vision_layers": tuple(_count_blocks(sd, f"visual.layer{i}.") for i in range(1, 5)),
        "vision_heads": max(v_width * 32 // 64, 1),
        "in_channels": sd["visual.conv1.weight"].shape[1],
        **_text_config(sd),
    }
    kw.update(overrides)
    return CLIPConfig(**kw)


def config_from_hf(hf_config: Any) -> CLIPConfig:
    """A :class:`CLIPConfig` from a Hugging Face ``transformers.CLIPConfig`` (or its ``to_dict()``).

    HF's pooling: ``eos_token_id == 2`` (old configs) -> argmax of the ids, else the first ``eos_token_id``.
    Text and vision must use the same activation (``quick_gelu`` or ``gelu``)."""
    d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    t, v = dict(d["text_config"]), dict(d["vision_config"])
    acts = {t.get("hidden_act", "quick_gelu"), v.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= set(ACTIVATIONS):
        raise _err(f"hidden_act: need one of {ACTIVATIONS} for both towers, got text/vision {sorted(acts)}")
    eos = t.get("eos_token_id", 2)
    eps = {t.get("layer_norm_eps", 1e-5), v.get("layer_norm_eps", 1e-5)}
    if len(eps) != 1:
        raise _err(f"layer_norm_eps differs between the towers: {sorted(eps)}")
    return CLIPConfig(
        embed_dim=d.get("projection_dim", 512),
        image_size=v["image_size"],
        patch_size=v["patch_size"],
        vision_width=v["hidden_size"],
        vision_layers=v["num_hidden_layers"],
        vision_heads=v["num_attention_heads"],
        vision_mlp_ratio=v["intermediate_size"] / v["hidden_size"],
        in_channels=v.get("num_channels", 3),
        context_length=t["max_position_embeddings"],
        vocab_size=t["vocab_size"],
        text_width=t["hidden_size"],
        text_heads=t["num_attention_heads"],
        text_layers=t["num_hidden_layers"],
        text_mlp_ratio=t["intermediate_size"] / t["hidden_size"],
        act=acts.pop(),
        eot_rule="argmax" if eos == 2 or eos is None else "eos_id",
        eos_token_id=None if eos == 2 else eos,
        ln_eps=eps.pop(),
    )


def convert_hf_clip_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: CLIPConfig
) -> dict[str, torch.Tensor]:
    """Hugging Face ``CLIPModel.state_dict()`` -> OpenAI-format keys (load with
    :meth:`CLIP.load_openai_state_dict`). q/k/v projections are concatenated into ``in_proj``; the
    ``visual_projection`` / ``text_projection`` Linear weights (E, W) become (W, E) matrices."""
    sd = state_dict

    def get(key: str) -> torch.Tensor:
        if key not in sd:
            raise _err(f"convert_hf_clip_state_dict: missing key {key!r} (is this a CLIPModel state_dict?)")
        return sd[key]

    out: dict[str, torch.Tensor] = {}
    for hf, oa, layers in (
        ("vision_model.", "visual.", config.vision_layers),
        ("text_model.", "", config.text_layers),
    ):
        for i in range(layers):
            s, d = f"{hf}encoder.layers.{i}.", f"{oa}transformer.resblocks.{i}."
            for p in ("weight", "bias"):
                out[f"{d}attn.in_proj_{p}"] = torch.cat([get(f"{s}self_attn.{x}_proj.{p}") for x in "qkv"])
                out[f"{d}attn.out_proj.{p}"] = get(f"{s}self_attn.out_proj.{p}")
                for src, dst in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                                 ("mlp.fc2", "mlp.c_proj")):  # fmt: skip
                    out[f"{d}{dst}.{p}"] = get(f"{s}{src}.{p}")
    for p in ("weight", "bias"):
        out[f"visual.ln_pre.{p}"] = get(f"vision_model.pre_layrnorm.{p}")
        out[f"visual.ln_post.{p}"] = get(f"vision_model.post_layernorm.{p}")
        out[f"ln_final.{p}"] = get(f"text_model.final_layer_norm.{p}")
    out["visual.class_embedding"] = get("vision_model.embeddings.class_embedding")
    out["visual.conv1.weight"] = get("vision_model.embeddings.patch_embedding.weight")
    out["visual.positional_embedding"] = get("vision_model.embeddings.position_embedding.weight")
    out["visual.proj"] = get("visual_projection.weight").t().contiguous()
    out["token_embedding.weight"] = get("text_model.embeddings.token_embedding.weight")
    out["positional_embedding"] = get("text_model.embeddings.position_embedding.weight")
    out["text_projection"] = get("text_projection.weight").t().contiguous()
    out["logit_scale"] = get("logit_scale")
    return out


# =====================================================================================================
# Pretrained files: every CLIP release format, and fastgen's own
# =====================================================================================================

FORMATS = ("fastgen", "openai_jit", "state_dict", "open_clip_hub", "hf")
_OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")  # fmt: skip
_HF_WHERE = "the Hugging Face model repository ('Files and versions', e.g. openai/clip-vit-base-patch32)"
_CHECKPOINT_WHAT = (
    "a CLIP checkpoint (an OpenAI .pt, an open_clip checkpoint, a Hugging Face CLIP directory or a "
    "save_pretrained directory)"
)
_CHECKPOINT_WHERE = (
    "OpenAI's CLIP release (ViT-B-32.pt, RN50.pt, ...), open_clip, the Hugging Face Hub, or "
    "CLIP.save_pretrained"
)

_BLOCK_KEY = (
    r"transformer\.resblocks\.\d+\.(?:ln_[12]\.(?:weight|bias)|attn\.in_proj_(?:weight|bias)"
    r"|attn\.out_proj\.(?:weight|bias)|mlp\.c_(?:fc|proj)\.(?:weight|bias))"
)
_BN_KEY = r"bn[123]\.(?:weight|bias|running_mean|running_var|num_batches_tracked)"
_OPENAI_KEY = re.compile(
    rf"{_BLOCK_KEY}|token_embedding\.weight|positional_embedding|text_projection|logit_scale"
    rf"|ln_final\.(?:weight|bias)|visual\.(?:{_BLOCK_KEY}|conv1\.weight|class_embedding|positional_embedding"
    rf"|ln_(?:pre|post)\.(?:weight|bias)|proj|conv[23]\.weight|{_BN_KEY}"
    rf"|layer[1-4]\.\d+\.(?:conv[123]\.weight|{_BN_KEY}|downsample\.0\.weight"
    rf"|downsample\.1\.(?:weight|bias|running_mean|running_var|num_batches_tracked))"
    rf"|attnpool\.(?:positional_embedding|[qkvc]_proj\.(?:weight|bias)))"
)
# HF CLIPConfig defaults (transformers' CLIPTextConfig / CLIPVisionConfig), for config.json files that
# leave a field out
_HF_TEXT_DEFAULTS = {
    "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
    "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}  # fmt: skip
_HF_VISION_DEFAULTS = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}  # fmt: skip


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip whose records include ``constants.pkl`` (torch.save's zips do not)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in z.namelist())


def detect_clip_format(path: str | os.PathLike) -> str:
    """Which CLIP release format ``path`` holds, from its files (nothing is loaded):

    - ``"fastgen"``: a :meth:`CLIP.save_pretrained` directory (config.json with ``"model_type": "clip"``
      and a ``"config"`` entry, model.safetensors);
    - ``"hf"``: a Hugging Face ``CLIPModel`` directory (config.json with ``text_config`` /
      ``vision_config``; model.safetensors, pytorch_model.bin or their sharded ``.index.json``);
    - ``"open_clip_hub"``: an open_clip Hub directory (open_clip_config.json and / or
      open_clip_model.safetensors / open_clip_pytorch_model.bin);
    - ``"openai_jit"``: a TorchScript archive (OpenAI's release ``ViT-B-32.pt``, ``RN50.pt``, ...);
    - ``"state_dict"``: any other file: an OpenAI-layout state_dict (``.pt`` / ``.bin`` / ``.safetensors``),
      bare or in an open_clip training checkpoint ``{"epoch", "name", "state_dict": {"module.*": ...}}``.

    A missing path raises ``FileNotFoundError``; a directory with none of these files ``ValueError``.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    p = Path(path)
    if not p.exists():
        raise missing_weights_error(p, _CHECKPOINT_WHAT, _CHECKPOINT_WHERE)
    if p.is_file():
        return "openai_jit" if _is_torchscript(p) else "state_dict"
    cfg = p / CONFIG_NAME
    if cfg.is_file():
        meta = _read_json(cfg)
        if isinstance(meta, dict) and "config" in meta and "model_type" in meta:
            if meta["model_type"] != "clip":
                raise ValueError(f"{p}: holds a fastgen {meta['model_type']!r} model, not a 'clip' model")
            return "fastgen"
        if isinstance(meta, dict) and "text_config" in meta and "vision_config" in meta:
            if meta.get("model_type", "clip") != "clip":
                raise ValueError(
                    f"{cfg}: Hugging Face model_type {meta.get('model_type')!r} is not supported; fastgen reads "
                    "CLIPModel directories (model_type 'clip')"
                )
            return "hf"
    if (p / "open_clip_config.json").is_file() or any((p / n).is_file() for n in _OPEN_CLIP_WEIGHTS):
        return "open_clip_hub"
    raise ValueError(
        f"{p}: not a CLIP checkpoint directory. Expected config.json (fastgen's save_pretrained, or a Hugging "
        f"Face CLIPModel with its weights {_HF_WEIGHTS[0]} / {_HF_WEIGHTS[2]}), or open_clip_config.json with "
        f"{' / '.join(_OPEN_CLIP_WEIGHTS)}; for a single checkpoint file pass the file itself"
    )


def _check_openai_layout(sd: Mapping[str, Any], source: str) -> None:
    """ValueError naming the first keys fastgen's CLIP cannot represent."""
    bad = [k for k in sd if k not in _OPENAI_EXTRA_KEYS and not _OPENAI_KEY.fullmatch(k)]
    if not bad:
        return
    if any(k.startswith(("vision_model.", "text_model.")) for k in bad):
        raise ValueError(
            f"{source}: a Hugging Face CLIPModel state_dict (keys {bad[:3]}): pass the directory holding it and "
            "its config.json"
        )
    raise ValueError(
        f"{source}: {len(bad)} unsupported keys, first {bad[:5]}. fastgen's CLIP reads the OpenAI layout (a ViT "
        "or ModifiedResNet image tower, OpenAI's text transformer); other open_clip towers (timm 'visual.trunk.*', "
        "Hugging Face 'text.transformer.*', layer scale, attentional pooling, logit_bias) are not supported"
    )


def _open_clip_fields(model_cfg: Mapping[str, Any], source: str) -> dict[str, Any]:
    """CLIPConfig fields an open_clip ``model_cfg`` fixes that the weights' shapes cannot tell (activation,
    head counts, LayerNorm eps, a non-square image size); options that change the computation without
    changing the keys, and towers fastgen lacks, raise."""
    if not isinstance(model_cfg, Mapping):
        raise ValueError(f"{source}: model_cfg must be a JSON object, got {type(model_cfg).__name__}")
    v, t = dict(model_cfg.get("vision_cfg") or {}), dict(model_cfg.get("text_cfg") or {})
    for tower, cfg, key in (("vision", v, "timm_model_name"), ("text", t, "hf_model_name")):
        if cfg.get(key):
            raise ValueError(f"{source}: {tower}_cfg.{key}={cfg[key]!r}: fastgen's CLIP has no such tower")
    unsupported = {
        "vision_cfg.pool_type": (v.get("pool_type", "tok"), "tok"),
        "vision_cfg.final_ln_after_pool": (bool(v.get("final_ln_after_pool")), False),
        "vision_cfg.attentional_pool": (bool(v.get("attentional_pool")), False),
        "vision_cfg.no_ln_pre": (bool(v.get("no_ln_pre")), False),
        "vision_cfg.act_kwargs": (v.get("act_kwargs") or None, None),
        "text_cfg.pool_type": (t.get("pool_type", "argmax"), "argmax"),
        "text_cfg.no_causal_mask": (bool(t.get("no_causal_mask")), False),
        "text_cfg.embed_cls": (bool(t.get("embed_cls")), False),
        "text_cfg.act_kwargs": (t.get("act_kwargs") or None, None),
    }
    for name, (got, want) in unsupported.items():
        if got != want:
            raise ValueError(f"{source}: {name}={got!r} is not supported (fastgen's CLIP computes {want!r})")
    out: dict[str, Any] = {"act": "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"}
    width, head_width = v.get("width"), v.get("head_width", 64)
    if width:
        resnet = isinstance(v.get("layers"), (list, tuple))
        out["vision_heads"] = max((width * 32 if resnet else width) // head_width, 1)
    if t.get("heads"):
        out["text_heads"] = t["heads"]
    if v.get("image_size") is not None:
        out["image_size"] = v["image_size"] if isinstance(v["image_size"], int) else tuple(v["image_size"])
    eps = {(c.get("norm_kwargs") or {}).get("eps") for c in (v, t)} - {None}
    if len(eps) > 1:
        raise ValueError(f"{source}: norm_kwargs.eps differs between the towers: {sorted(eps)}")
    if eps:
        out["ln_eps"] = eps.pop()
    return out


def _hf_config(meta: Mapping[str, Any]) -> CLIPConfig:
    d = dict(meta)
    d["text_config"] = {**_HF_TEXT_DEFAULTS, **(d.get("text_config") or {})}
    d["vision_config"] = {**_HF_VISION_DEFAULTS, **(d.get("vision_config") or {})}
    return config_from_hf(d)


def _read_hf_weights(d: Path) -> dict[str, torch.Tensor]:
    for name in _HF_WEIGHTS:
        f = d / name
        if not f.is_file():
            continue
        if name.endswith(".index.json"):
            index = _read_json(f)
            shards = sorted(set((index.get("weight_map") or {}).values())) if isinstance(index, dict) else []
            if not shards:
                raise ValueError(f"{f}: expected a 'weight_map' of tensor names to shard files")
            sd: dict[str, torch.Tensor] = {}
            for shard in shards:
                if not (d / shard).is_file():
                    raise missing_weights_error(d / shard, f"a shard of the CLIPModel weights named in {name}",
                                                _HF_WHERE)  # fmt: skip
                sd.update(read_state_dict(d / shard))
            return sd
        return read_state_dict(f)
    raise missing_weights_error(
        d / _HF_WEIGHTS[0], f"the CLIPModel weights ({_HF_WEIGHTS[0]} or {_HF_WEIGHTS[2]})", _HF_WHERE
    )


def _state_dict_config(
    sd: Mapping[str, Any], fields: Mapping[str, Any], overrides: Mapping[str, Any], source: str
) -> CLIPConfig:
    """The config of an OpenAI-layout state_dict: shapes, then ``fields`` (open_clip's model_cfg)."""
    fields = dict(fields)
    pos_key = (
        "visual.attnpool.positional_embedding"
        if "visual.attnpool.positional_embedding" in sd
        else "visual.positional_embedding"
    )
    for key in (pos_key, "visual.conv1.weight", "text_projection", "token_embedding.weight",
                "positional_embedding", "ln_final.weight"):  # fmt: skip
        if key not in sd:
            raise ValueError(f"{source}: missing {key!r}; not a CLIP checkpoint with both towers")
    n = sd[pos_key].shape[0] - 1
    if math.isqrt(n) ** 2 != n and "image_size" not in fields:
        if "image_size" not in overrides:
            raise ValueError(
                f"{source}: {pos_key} has a non-square grid of {n} positions: pass image_size=(H, W)"
            )
        fields["image_size"] = overrides["image_size"]
    try:
        return config_from_openai_state_dict(sd, **fields)
    except KeyError as e:
        raise ValueError(f"{source}: missing {e.args[0]!r}; not a CLIP checkpoint with both towers") from None


def read_clip_checkpoint(
    path: str | os.PathLike, **overrides: Any
) -> tuple[CLIPConfig, dict[str, torch.Tensor], CLIPConfig]:
    """Read a CLIP checkpoint in any format of :func:`detect_clip_format`, without the original package.

    Returns ``(config, state_dict, stored_config)``: the state_dict in fastgen's (= OpenAI's) key layout as
    stored (dtypes unchanged), ``stored_config`` the config the weights were trained with, ``config`` that
    with ``overrides`` (CLIPConfig fields) applied. Where the file has no config, it is inferred from the
    shapes (OpenAI's ``build_model`` rules: heads = width / 64, ``act="quick_gelu"``); pass
    ``act="gelu"`` for open_clip models trained without QuickGELU (their Hub directories say so in
    open_clip_config.json, which is read). OpenAI TorchScript archives are read with ``torch.jit.load``
    (TorchScript, not pickle: only the archive's tensors are used); other ``.pt`` / ``.bin`` files with
    ``torch.load(weights_only=True)``.
    """
    fmt = detect_clip_format(path)
    p = Path(path)
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(CLIPConfig)})
    if unknown:
        raise TypeError(f"from_pretrained: unknown config overrides {unknown} (not CLIPConfig fields)")
    if fmt == "fastgen":
        meta, sd = load_fastgen_dir(p, "clip")
        stored = config_from_dict(CLIPConfig, meta["config"])
    elif fmt == "hf":
        stored = _hf_config(_read_json(p / CONFIG_NAME))
        sd = convert_hf_clip_state_dict(_read_hf_weights(p), stored)
    else:
        fields: dict[str, Any] = {}
        if fmt == "openai_jit":
            with (
                warnings.catch_warnings()
            ):  # torch 2.9+ marks torch.jit deprecated; the archives are TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                sd = dict(torch.jit.load(str(p), map_location="cpu").state_dict())
            source = str(p)
        elif fmt == "state_dict":
            sd, source = read_state_dict(p), str(p)
        else:  # open_clip_hub
            cfg_file = p / "open_clip_config.json"
            if cfg_file.is_file():
                meta = _read_json(cfg_file)
                model_cfg = meta.get("model_cfg", meta) if isinstance(meta, dict) else meta
                fields = _open_clip_fields(model_cfg, str(cfg_file))
            weights = next((p / n for n in _OPEN_CLIP_WEIGHTS if (p / n).is_file()), None)
            if weights is None:
                raise missing_weights_error(
                    p / _OPEN_CLIP_WEIGHTS[1], f"the open_clip weights ({' or '.join(_OPEN_CLIP_WEIGHTS)})",
                    "the open_clip model's Hugging Face Hub repository (e.g. laion/CLIP-ViT-B-32-laion2B-s34B-b79K)",
                )  # fmt: skip
            sd, source = read_state_dict(weights), str(weights)
        _check_openai_layout(sd, source)
        stored = _state_dict_config(sd, fields, overrides, source)
    return replace(stored, **overrides), sd, stored


def _load_checkpoint_into(
    model: CLIP, sd: Mapping[str, torch.Tensor], stored: CLIPConfig, source: str
) -> None:
    """Copy ``sd`` into ``model`` (cast to its dtype), resampling the image pos-embed when the model's
    trained grid differs from the checkpoint's; missing / extra / mis-shaped entries raise."""
    cfg = model.config
    sd = {k: v for k, v in sd.items() if k not in _OPENAI_EXTRA_KEYS}
    key = "visual.attnpool.positional_embedding" if cfg.is_resnet else "visual.positional_embedding"
    if key in sd and stored.grid_size != cfg.grid_size:
        sd[key] = interpolate_pos_embed(
            sd[key], stored.grid_size, cfg.grid_size, cfg.pos_interp_mode, cfg.pos_interp_antialias
        )
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    extra = [k for k in sd if k not in own]
    if missing or extra:
        raise ValueError(
            f"{source}: the weights do not fit the config "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''})"
        )
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise ValueError(
                f"{source}: {k} has shape {tuple(v.shape)}, the config needs {tuple(own[k].shape)}"
            )
    model.load_state_dict(sd, strict=False)


def _auto_dtype(sd: Mapping[str, torch.Tensor]) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for v in sd.values():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            counts[v.dtype] = counts.get(v.dtype, 0) + v.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


# =====================================================================================================
# Tokenizer
# =====================================================================================================


@lru_cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable unicode character map."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _word_pattern():
    try:
        import regex

        return regex.compile(
            r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
            regex.IGNORECASE,
        )
    except ImportError:  # the same classes with the standard library: letters, digits, the rest
        import re

        return re.compile(
            r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+",
            re.IGNORECASE,
        )


def _clean(text: str) -> str:
    """OpenAI's basic_clean + whitespace_clean, then lower-case: NFC (the part of ftfy.fix_text that applies
    to well-formed text), HTML entities unescaped twice, whitespace runs collapsed to one space."""
    text = html.unescape(html.unescape(unicodedata.normalize("NFC", text))).strip()
    return " ".join(text.split()).lower()


BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_BPE_PACKAGES = ("open_clip", "clip")  # open_clip ships the file in its package, OpenAI's clip too


def find_bpe_file() -> Path:
    """The path of CLIP's merges file ``bpe_simple_vocab_16e6.txt.gz`` inside an installed ``open_clip`` or
    OpenAI ``clip`` package, located with ``importlib.util.find_spec`` (the package is not imported).
    Raises ``FileNotFoundError`` naming the file and where it comes from when neither package has it."""
    searched = []
    for name in _BPE_PACKAGES:
        for d in package_dirs(name):
            f = Path(d) / BPE_FILE
            if f.is_file():
                return f
            searched.append(str(d))
    where = f"searched {searched}" if searched else f"neither {' nor '.join(_BPE_PACKAGES)} is installed"
    raise FileNotFoundError(
        f"{BPE_FILE}: not found ({where}). It is CLIP's BPE merges file; it comes with the open_clip package "
        f"(open_clip/{BPE_FILE}) and OpenAI's CLIP repository (clip/{BPE_FILE}). fastgen downloads nothing: "
        "install open_clip or pass the file's local path as bpe_path."
    )


class SimpleTokenizer:
    """CLIP's tokenizer: byte-level BPE with the ``</w>`` end-of-word marker and sot / eot tokens.

    ``bpe_path``: the merges file (``bpe_simple_vocab_16e6.txt.gz`` of the OpenAI release, gzip or plain
    text, a ``#version`` header line then one ``a b`` merge per line; at most 48,894 merges are used, as
    OpenAI's), or ``"auto"``: the file inside an installed open_clip / OpenAI clip package
    (:func:`find_bpe_file`; see also :meth:`from_pretrained`):
    vocab = 256 byte symbols, the same with ``</w>``, one per merge, then ``<|startoftext|>``,
    ``<|endoftext|>`` (49,408 for the standard file). Without it, a byte-level fallback: the UTF-8 bytes
    (0..255) plus sot = 256 and eot = 257 (vocab 258; the ``"tiny"`` presets). Text is cleaned as
    OpenAI's (NFC, HTML unescaped, whitespace collapsed, lower-cased); of ftfy's fixes only NFC is applied
    (no mojibake repair, quote uncurling or width folding). Against Hugging Face's CLIPTokenizer (no ftfy
    either): HF leaves HTML entities (``&amp;``) as text, so texts holding entities tokenize differently.
    """

    MAX_MERGES = 49152 - 256 - 2

    def __init__(self, bpe_path: str | os.PathLike | None = None) -> None:
        self.bpe_ranks: dict[tuple[str, str], int] | None = None
        self.cache: dict[str, str] = {}
        if bpe_path is None:
            self.encoder: dict[str, int] = {}
            self.sot_token, self.eot_token, self.vocab_size = 256, 257, 258
            return
        if not isinstance(bpe_path, (str, os.PathLike)):
            raise TypeError(f"bpe_path: expected None, 'auto' or a path, got {type(bpe_path).__name__}")
        if bpe_path == "auto":
            bpe_path = find_bpe_file()
        if not Path(bpe_path).is_file():
            raise missing_weights_error(
                bpe_path, f"CLIP's BPE merges ({BPE_FILE}, or a merges.txt)",
                f"the open_clip package (open_clip/{BPE_FILE}) or OpenAI's CLIP repository (clip/{BPE_FILE})",
            )  # fmt: skip
        self.bpe_path = Path(bpe_path)
        opener = gzip.open if str(bpe_path).endswith(".gz") else open
        with opener(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        if lines and "#version" in lines[0]:  # the header line of OpenAI's file and of HF's merges.txt
            lines = lines[1:]
        merges = [tuple(m.split()) for m in lines[: self.MAX_MERGES] if m.strip()]
        bad = next((i for i, m in enumerate(merges) if len(m) != 2), None)
        if bad is not None:
            raise ValueError(
                f"bpe_path: {bpe_path}: merge {bad} is {' '.join(merges[bad])!r}, not two symbols"
            )
        symbols = list(_bytes_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = _bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}
        self.pat = _word_pattern()
        self.sot_token, self.eot_token = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]
        self.vocab_size = len(vocab)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None) -> SimpleTokenizer:
        """The BPE tokenizer from ``path``: None = :func:`find_bpe_file` (an installed open_clip / clip
        package); a merges file (``bpe_simple_vocab_16e6.txt.gz``, or a plain-text ``merges.txt``); or a
        directory holding ``bpe_simple_vocab_16e6.txt.gz``, or a Hugging Face CLIPTokenizer's
        ``merges.txt`` (its ``vocab.json``, when present, must be the vocab these merges define: byte
        symbols, the same with ``</w>``, one per merge, sot, eot; another order raises ``ValueError``)."""
        if path is None:
            return cls(find_bpe_file())
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path: expected None or a path, got {type(path).__name__}")
        p = Path(path)
        if not p.is_dir():
            return cls(p)
        if (p / BPE_FILE).is_file():
            return cls(p / BPE_FILE)
        if not (p / "merges.txt").is_file():
            raise missing_weights_error(
                p / BPE_FILE, "CLIP's BPE merges (or, in a Hugging Face tokenizer directory, merges.txt)",
                f"the open_clip package (open_clip/{BPE_FILE}) or OpenAI's CLIP repository (clip/{BPE_FILE})",
            )  # fmt: skip
        tok = cls(p / "merges.txt")
        vocab_file = p / "vocab.json"
        if vocab_file.is_file():
            vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
            if vocab != tok.encoder:
                diff = next((k for k in tok.encoder if vocab.get(k) != tok.encoder[k]), None)
                raise ValueError(
                    f"{vocab_file}: not the vocab that merges.txt defines (first difference: {diff!r} is "
                    f"{vocab.get(diff)} there, {tok.encoder.get(diff)} here); this tokenizer builds CLIP's vocab "
                    "from the merges"
                )
        return tok

    def bpe(self, token: str) -> str:
        """Merge the symbols of one pre-tokenised word, lowest-rank pair first; symbols joined by spaces."""
        if token in self.cache:
            return self.cache[token]
        word = (*token[:-1], token[-1] + "</w>")
        while len(word) > 1:
            pairs = set(pairwise(word))
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, math.inf))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no sot / eot)."""
        text = _clean(text)
        if self.bpe_ranks is None:
            return list(text.encode("utf-8"))
        ids = []
        for word in self.pat.findall(text):
            word = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(word).split(" "))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; sot is dropped and decoding stops at the first eot (so padded rows decode)."""
        ids = [int(i) for i in ids]
        if self.eot_token in ids:
            ids = ids[: ids.index(self.eot_token)]
        ids = [i for i in ids if i != self.sot_token]
        if self.bpe_ranks is None:
            return bytes(ids).decode("utf-8", errors="replace")
        text = "".join(self.decoder[i] for i in ids)
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def tokenize(
        self, texts: str | Sequence[str], context_length: int = 77, truncate: bool = False
    ) -> torch.Tensor:
        """(len(texts), context_length) int64: sot, the text's ids, eot, zero padding. A text that does not
        fit raises, unless ``truncate`` (then it is cut and its last token set to eot)."""
        check_positive_int("context_length", context_length, _err)
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.sot_token, *self.encode(text), self.eot_token]
            if len(ids) > context_length:
                if not truncate:
                    raise _err(
                        f"texts[{i}]: {len(ids)} tokens (with sot/eot) exceed context_length {context_length}; "
                        "pass truncate=True to cut it"
                    )
                ids = ids[:context_length]
                ids[-1] = self.eot_token
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    __call__ = tokenize

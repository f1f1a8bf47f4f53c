r"""GLIDE's noise-aware CLIP: image and text encoders for CLIP guidance of the diffusion sampler.

Nichol et al. 2021 (GLIDE, arXiv:2112.10741) sec. 2.3: a CLIP trained on NOISED images x_t, so that its
gradient w.r.t. x_t guides the sampler. Modules and parameters follow the public ``glide_text2im.clip``
release name for name (``blocks.input`` / ``blocks.block_{i}`` / ``blocks.output``; ``w`` / ``b`` of
its affine layers, ``g`` / ``b`` of its layer norms), so ``clip.image_encoder.load_state_dict(image_enc)``
and ``clip.text_encoder.load_state_dict(text_enc)`` load the released ``clip/image-enc`` and
``clip/text-enc`` checkpoints with ``strict=True``; ``GlideCLIP.from_pretrained(dir)`` reads the two
files (``clip_image_enc.pt`` / ``clip_text_enc.pt``) and infers the config, and ``save_pretrained(dir)``
writes fastgen's format, which ``from_pretrained`` reads back.

**Image encoder** (86.4M parameters for "glide-clip"): x_t (B, 3, 64, 64) in [-1, 1] ->
``(x + 1) * 127.5`` -> ``(x - mean) / std`` per channel (CLIP's constants) -> 4x4 patches by a conv
WITHOUT bias (``patch_proj``) -> (B, 256, 768); the class token is REPLACED by the timestep's learned row
``w_t[t]`` (1000 rows, t the original training timestep) -> + ``w_pos`` (257 rows) -> LayerNorm ->
12 pre-LN blocks (12 heads of 64, full attention) -> LayerNorm of position 0 -> ``f`` (768 -> 512, no bias).

**Text encoder** (71.7M): tokens (B, 77) of a 65,536-row table (``w_voc``) + ``w_pos`` -> 12 CAUSAL
pre-LN blocks (8 heads of 64) -> the features at the last real token (``lengths - 1``) -> LayerNorm ->
``f`` (512 -> 512, no bias). Token ids come from CLIP's own BPE (the release's ``SimpleTokenizer``,
with start and end tokens), not from GLIDE's GPT-2 tokenizer.

Blocks: ``f_attn`` (``ln``, ``f_q``, ``f_k`` without bias, ``f_v``, ``f_c``; softmax(q k^T / sqrt(64)))
then ``f_mlp`` (``ln``, ``f_1`` 4x, exact GELU, ``f_2``), both residual. Layer norms run in float32,
eps 1e-5. Both embeddings are L2-normalised (``z / (|z| + 1e-12)``); the logit scale is 100 (log 100,
not stored).

**CLIP guidance** (``cond_fn``): grad_x [``grad_scale * 100 * sum_b <text_b, image_b(x, t)>``], which
the sampler adds to the mean as ``variance * grad`` (``fastgen.models.glide.sample_clip_guided``).
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

from fastgen.models import hub
from fastgen.models.common import check_id_range, check_integer_ids, is_finite_real

# CLIP's image normalisation constants, on the 0..255 scale
IMAGE_MEAN = (122.77093945, 116.74601272, 104.09373519)
IMAGE_STD = (68.50053285, 66.63215831, 70.32316309)
LOGIT_SCALE = 100.0


def _err(msg: str) -> ValueError:
    return ValueError(f"fastgen.models.glide_clip: {msg}")


@dataclass
class GlideCLIPConfig:
    """The release's ``clip/config.yaml``."""

    image_size: int = 64
    patch_size: int = 4
    n_timesteps: int = 1000
    n_vocab: int = 65536
    max_text_len: int = 77
    n_embd: int = 512
    n_head_state: int = 64
    n_head_text: int = 8
    n_xf_blocks_text: int = 12
    n_head_image: int = 12
    n_xf_blocks_image: int = 12

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise _err(f"patch_size {self.patch_size} must divide image_size {self.image_size}")


PRESETS: dict[str, GlideCLIPConfig] = {
    "glide-clip": GlideCLIPConfig(),
    "glide-clip-tiny": GlideCLIPConfig(
        image_size=16,
        patch_size=4,
        n_timesteps=100,
        n_vocab=64,
        max_text_len=8,
        n_embd=16,
        n_head_state=8,
        n_head_text=2,
        n_xf_blocks_text=2,
        n_head_image=2,
        n_xf_blocks_image=2,
    ),
}


def from_name(name: str, **overrides) -> GlideCLIPConfig:
    if name not in PRESETS:
        raise _err(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return replace(copy.deepcopy(PRESETS[name]), **overrides)


class LayerNorm(nn.Module):
    """LayerNorm in (at least) float32 with the release's parameter names ``g`` (scale) and ``b`` (shift)."""

    def __init__(self, n: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.ones(n))
        self.b = nn.Parameter(torch.zeros(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = torch.promote_types(x.dtype, torch.float32)  # 16-bit inputs upcast, as the release's
        return F.layer_norm(x.to(dt), self.g.shape, self.g.to(dt), self.b.to(dt), self.eps)


class Affine(nn.Module):
    """``x @ w.T + b`` with the release's names (``w``: (out, in)); no ``b`` when ``bias=False``."""

    def __init__(self, n_in: int, n_out: int, bias: bool = True, std: float | None = None):
        super().__init__()
        self.w = nn.Parameter(
            torch.randn(n_out, n_in) * (std if std is not None else math.sqrt(2 / (n_in + n_out)))
        )
        self.b = nn.Parameter(torch.zeros(n_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w.to(x.dtype), None if self.b is None else self.b.to(x.dtype))


class AttentionResblock(nn.Module):
    def __init__(self, width: int, heads: int, n_resblocks: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        std = 1 / math.sqrt(width)
        self.ln = LayerNorm(width)
        self.f_q = Affine(width, width, std=std)
        self.f_k = Affine(width, width, bias=False, std=std)
        self.f_v = Affine(width, width, std=std)
        self.f_c = Affine(width, width, std=1 / math.sqrt(width * n_resblocks**2))

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        b, n, w = m.shape
        r = self.ln(m).to(m.dtype)

        def heads(t):
            return t.view(b, n, self.heads, w // self.heads).transpose(1, 2)

        o = F.scaled_dot_product_attention(
            heads(self.f_q(r)), heads(self.f_k(r)), heads(self.f_v(r)), is_causal=self.causal
        )
        return m + self.f_c(o.transpose(1, 2).reshape(b, n, w))


class FullyConnectedResblock(nn.Module):
    def __init__(self, width: int, n_resblocks: int):
        super().__init__()
        self.ln = LayerNorm(width)
        self.f_1 = Affine(width, 4 * width, std=math.sqrt(2 / (4 * width)))
        self.f_2 = Affine(4 * width, width, std=1 / math.sqrt(width * n_resblocks**2))

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        return m + self.f_2(F.gelu(self.f_1(self.ln(m).to(m.dtype))))


class TransformerBlock(nn.Module):
    def __init__(self, width: int, heads: int, n_resblocks: int, causal: bool):
        super().__init__()
        self.f_attn = AttentionResblock(width, heads, n_resblocks, causal)
        self.f_mlp = FullyConnectedResblock(width, n_resblocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f_mlp(self.f_attn(x))


class _TextEmbedding(nn.Module):
    def __init__(self, n_vocab: int, n_ctx: int, width: int):
        super().__init__()
        self.w_voc = nn.Parameter(torch.randn(n_vocab, width) * 0.02)
        self.w_pos = nn.Parameter(torch.randn(n_ctx, width) * 0.01)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.w_voc) + self.w_pos[None]


class _ImageEmbedding(nn.Module):
    def __init__(self, image_size: int, patch_size: int, width: int, n_timesteps: int):
        super().__init__()
        self.patch_size = patch_size
        n_pos = 1 + (image_size // patch_size) ** 2
        self.w_t = nn.Parameter(torch.randn(n_timesteps, width) / math.sqrt(width))
        self.patch_proj = nn.Parameter(
            torch.randn(width, 3, patch_size, patch_size) * math.sqrt(2 / (width * patch_size**2))
        )
        self.w_pos = nn.Parameter(torch.randn(n_pos, width) / math.sqrt(width))
        self.ln = LayerNorm(width)
        # plain attributes in the release, not state: kept out of the state_dict here too
        self.register_buffer("mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, S, S) on the 0..255 scale, t (B,) long."""
        x = (pixels - self.mean) / self.std
        x = F.conv2d(x, self.patch_proj.to(x.dtype), stride=self.patch_size).flatten(2).transpose(1, 2)
        x = torch.cat([F.embedding(t, self.w_t)[:, None].to(x.dtype), x], dim=1) + self.w_pos[None]
        return self.ln(x)


class _TextFeatures(nn.Module):
    def __init__(self, width: int, n_embd: int):
        super().__init__()
        self.ln = LayerNorm(width)
        self.f = Affine(width, n_embd, bias=False)

    def forward(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        last = h[torch.arange(h.shape[0], device=h.device), lengths - 1]
        return self.f(self.ln(last))


class _ImageFeatures(nn.Module):
    def __init__(self, width: int, n_embd: int):
        super().__init__()
        self.ln = LayerNorm(width)
        self.f = Affine(width, n_embd, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.f(self.ln(h[:, 0]))


class TextEncoder(nn.Module):
    """tokens (B, L <= max_text_len) long, lengths (B,) in [1, L] -> (B, n_embd) unnormalised features."""

    def __init__(self, cfg: GlideCLIPConfig):
        super().__init__()
        self.cfg = cfg
        width, n = cfg.n_head_text * cfg.n_head_state, cfg.n_xf_blocks_text
        blocks = {"input": _TextEmbedding(cfg.n_vocab, cfg.max_text_len, width)}
        for i in range(n):
            blocks[f"block_{i}"] = TransformerBlock(width, cfg.n_head_text, 2 * n, causal=True)
        blocks["output"] = _TextFeatures(width, cfg.n_embd)
        self.blocks = nn.ModuleDict(blocks)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        check_integer_ids("tokens", tokens, _err)
        if tokens.dim() != 2 or tokens.shape[1] > cfg.max_text_len:
            raise _err(f"tokens must be (batch, L <= {cfg.max_text_len}), got {tuple(tokens.shape)}")
        check_id_range("token ids", tokens, cfg.n_vocab, _err)
        b, n = tokens.shape
        check_integer_ids("lengths", lengths, _err)
        if tuple(lengths.shape) != (b,):
            raise _err(f"lengths must be (batch,) = ({b},), got {tuple(lengths.shape)}")
        if b and not bool(((lengths >= 1) & (lengths <= n)).all()):
            raise _err(f"lengths must lie in [1, {n}] (the number of real tokens), got {lengths.tolist()}")
        # causal attention: the padding after the last real token never reaches its features
        tokens = F.pad(tokens.long(), (0, cfg.max_text_len - n))
        h = self.blocks["input"](tokens)
        for i in range(cfg.n_xf_blocks_text):
            h = self.blocks[f"block_{i}"](h)
        return self.blocks["output"](h, lengths.to(tokens.device).long())


class ImageEncoder(nn.Module):
    """x_t (B, 3, S, S) on the 0..255 scale and t (B,) original timesteps -> (B, n_embd) features."""

    def __init__(self, cfg: GlideCLIPConfig):
        super().__init__()
        self.cfg = cfg
        width, n = cfg.n_head_image * cfg.n_head_state, cfg.n_xf_blocks_image
        blocks = {"input": _ImageEmbedding(cfg.image_size, cfg.patch_size, width, cfg.n_timesteps)}
        for i in range(n):
            blocks[f"block_{i}"] = TransformerBlock(width, cfg.n_head_image, 2 * n, causal=False)
        blocks["output"] = _ImageFeatures(width, cfg.n_embd)
        self.blocks = nn.ModuleDict(blocks)

    def forward(self, pixels: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        s = cfg.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise _err(f"images must be (batch, 3, {s}, {s}), got {tuple(pixels.shape)}")
        t = torch.as_tensor(t, device=pixels.device)
        check_integer_ids("t", t, _err)
        if t.dim() == 0:
            t = t.expand(pixels.shape[0])
        if tuple(t.shape) != (pixels.shape[0],):
            raise _err(f"t must be (batch,) = ({pixels.shape[0]},), got {tuple(t.shape)}")
        check_id_range("t", t, cfg.n_timesteps, _err)
        h = self.blocks["input"](pixels, t.long())
        for i in range(cfg.n_xf_blocks_image):
            h = self.blocks[f"block_{i}"](h)
        return self.blocks["output"](h)


def _normalize(z: torch.Tensor) -> torch.Tensor:
    return z / (torch.linalg.norm(z, dim=-1, keepdim=True) + 1e-12)


class GlideCLIP(nn.Module):
    """The noise-aware CLIP: ``image_encoder`` (release ``clip/image-enc``) + ``text_encoder`` (``clip/text-enc``)."""

    def __init__(self, cfg: GlideCLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.image_encoder = ImageEncoder(cfg)
        self.text_encoder = TextEncoder(cfg)

    def text_embeddings(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, n_embd), L2-normalised."""
        return _normalize(self.text_encoder(tokens, lengths))

    def image_embeddings(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x (B, 3, S, S) noised images in [-1, 1], t (B,) original timesteps -> (B, n_embd), L2-normalised."""
        return _normalize(self.image_encoder((x + 1) * 127.5, t))

    def cond_fn(self, tokens: torch.Tensor, lengths: torch.Tensor, grad_scale: float):
        """``fn(x, t) -> grad_x [grad_scale * 100 * sum_b <text_b, image_b(x, t)>]`` for the sampler."""
        if not is_finite_real(grad_scale):
            raise _err(f"grad_scale must be a finite number, got {grad_scale!r}")
        with torch.no_grad():
            z_t = self.text_embeddings(tokens, lengths)

        def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if x.shape[0] != z_t.shape[0]:
                raise _err(f"cond_fn: x batch {x.shape[0]} != prompts batch {z_t.shape[0]}")
            with torch.enable_grad():
                xv = x.detach().requires_grad_(True)
                loss = LOGIT_SCALE * (z_t * self.image_embeddings(xv, t)).sum()
                (grad,) = torch.autograd.grad(loss, xv)
            return grad * float(grad_scale)

        return fn

    # ---- files --------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write fastgen's format into ``directory``: ``config.json`` (model_type "glide_clip", the
        :class:`GlideCLIPConfig`) and ``model.safetensors`` (``image_encoder.*`` and ``text_encoder.*``)."""
        return hub.save_fastgen_dir(directory, "glide_clip", self.cfg, self.state_dict())

    @classmethod
    def from_pretrained(cls, path, **overrides) -> GlideCLIP:
        """Load the noise-aware CLIP from local files (nothing is downloaded). ``path`` is one of

        * a directory written by :meth:`save_pretrained`;
        * a directory holding the release's two checkpoints, ``clip_image_enc.pt`` and ``clip_text_enc.pt``
          (the names ``glide_text2im`` caches them under; ``image_enc.pt`` / ``text_enc.pt``, also inside a
          ``clip/`` subdirectory, are found too): :data:`RELEASE_URLS`;
        * a pair ``(image_enc_path, text_enc_path)``.

        The release files are plain state_dicts (read with ``weights_only=True``) of the image and text
        encoders; the config comes from :func:`config_from_state_dicts`. ``overrides``:
        :class:`GlideCLIPConfig` fields, for checkpoints of another size whose head split differs from
        the presets' (``n_head_state``, ``n_head_image``, ``n_head_text``).
        """
        if isinstance(path, (tuple, list)):
            if len(path) != 2 or not all(isinstance(p, (str, os.PathLike)) for p in path):
                raise TypeError(
                    "GlideCLIP.from_pretrained: path must be a directory or an (image_enc_path, text_enc_path) "
                    f"pair of paths, got {path!r}"
                )
            files = {"image": Path(path[0]), "text": Path(path[1])}
        elif isinstance(path, (str, os.PathLike)):
            d = Path(path)
            if (d / hub.CONFIG_NAME).is_file():
                meta, state = hub.load_fastgen_dir(d, "glide_clip")
                cfg = hub.config_with_overrides(
                    hub.config_from_dict(GlideCLIPConfig, meta["config"]),
                    overrides,
                    "GlideCLIP.from_pretrained",
                )
                model = cls(cfg)
                model.load_state_dict(state)
                return model
            if d.is_file():
                raise ValueError(
                    f"GlideCLIP.from_pretrained: {d} is a file; pass the directory holding clip_image_enc.pt and "
                    "clip_text_enc.pt, or the pair (image_enc_path, text_enc_path)"
                )
            files = {which: _find_release(d, which) for which in ("image", "text")}
        else:
            raise TypeError(
                f"GlideCLIP.from_pretrained: path must be a str / os.PathLike or a pair of them, "
                f"got {type(path).__name__}"
            )
        states = {}
        for which, f in files.items():
            if not f.is_file():
                raise hub.missing_weights_error(
                    f, f"the GLIDE noise-aware CLIP's {which} encoder (a state_dict)", RELEASE_URLS[which]
                )
            states[which] = hub.read_state_dict(f)
        cfg = config_from_state_dicts(states["image"], states["text"], **overrides)
        model = cls(cfg)
        model.image_encoder.load_state_dict(states["image"])
        model.text_encoder.load_state_dict(states["text"])
        return model


RELEASE_URLS = {
    which: f"https://openaipublic.blob.core.windows.net/diffusion/dec-2021/clip_{which}_enc.pt"
    for which in ("image", "text")
}


def _find_release(d: Path, which: str) -> Path:
    """``d``'s release file for ``which`` encoder; the canonical name when none is there (for the error)."""
    names = (f"clip_{which}_enc.pt", f"{which}_enc.pt", f"{which}-enc.pt")
    for sub in (d, d / "clip"):
        for name in names:
            if (sub / name).is_file():
                return sub / name
    return d / names[0]


def config_from_state_dicts(image_state: dict, text_state: dict, **overrides) -> GlideCLIPConfig:
    """A :class:`GlideCLIPConfig` for the release's ``clip/image-enc`` and ``clip/text-enc`` state_dicts.

    From the shapes: ``n_timesteps`` (``w_t`` rows), ``patch_size`` (``patch_proj``), ``image_size``
    (``patch_size * sqrt(w_pos rows - 1)``), ``n_vocab`` / ``max_text_len`` (``w_voc`` / text ``w_pos``
    rows), the block counts, ``n_embd`` (``blocks.output.f.w``) and the two widths. A width is
    ``heads * n_head_state``, which the tensors do not split: the split of the preset with the same widths
    is used, else ``n_head_state`` = 64 (the release's; pass ``n_head_state`` / ``n_head_image`` /
    ``n_head_text`` to change it). ``overrides`` apply last.
    """

    def shape(state, which, key):
        if key not in state:
            raise ValueError(
                f"GlideCLIP.from_pretrained: the {which} encoder state_dict has no {key!r}: not a glide_text2im "
                f"clip/{which}-enc checkpoint"
            )
        return tuple(state[key].shape)

    n_t, w_img = shape(image_state, "image", "blocks.input.w_t")
    p = shape(image_state, "image", "blocks.input.patch_proj")[-1]
    grid = math.isqrt(shape(image_state, "image", "blocks.input.w_pos")[0] - 1)
    n_vocab, w_txt = shape(text_state, "text", "blocks.input.w_voc")
    n_embd = shape(image_state, "image", "blocks.output.f.w")[0]
    n_embd_text = shape(text_state, "text", "blocks.output.f.w")[0]
    if n_embd != n_embd_text:
        raise ValueError(f"GlideCLIP.from_pretrained: image features {n_embd} != text features {n_embd_text}")

    def n_blocks(state):
        return len({k.split(".")[1] for k in state if k.startswith("blocks.block_")})

    found = {"image_size": grid * p, "patch_size": p, "n_timesteps": n_t, "n_vocab": n_vocab,
             "max_text_len": shape(text_state, "text", "blocks.input.w_pos")[0], "n_embd": n_embd,
             "n_xf_blocks_image": n_blocks(image_state), "n_xf_blocks_text": n_blocks(text_state)}  # fmt: skip
    split = next(
        ((c.n_head_state, c.n_head_image, c.n_head_text) for c in PRESETS.values()
         if (c.n_head_image * c.n_head_state, c.n_head_text * c.n_head_state) == (w_img, w_txt)),
        None,
    )  # fmt: skip
    state_w = overrides.get("n_head_state", split[0] if split else 64)
    if split and state_w == split[0]:
        found.update(n_head_state=split[0], n_head_image=split[1], n_head_text=split[2])
    elif w_img % state_w or w_txt % state_w:
        raise ValueError(
            f"GlideCLIP.from_pretrained: widths {w_img} (image) and {w_txt} (text) are not multiples of "
            f"n_head_state={state_w}; pass n_head_state= (the per-head width)"
        )
    else:
        found.update(n_head_state=state_w, n_head_image=w_img // state_w, n_head_text=w_txt // state_w)
    found.update(overrides)
    return hub.config_with_overrides(GlideCLIPConfig(), found, "GlideCLIP.from_pretrained")


__all__ = [
    "PRESETS",
    "RELEASE_URLS",
    "GlideCLIP",
    "GlideCLIPConfig",
    "ImageEncoder",
    "TextEncoder",
    "config_from_state_dicts",
    "from_name",
]

r"""DALL-E: a discrete VAE and a decoder-only transformer over text + image tokens.

Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation" (arXiv:2102.12092); the dVAE follows OpenAI's
``dall_e`` release (``dall_e/encoder.py``, ``dall_e/decoder.py``) layer for layer and name for name.

**Discrete VAE** (:class:`DiscreteVAE`). Images in [0, 1], (B, 3, H, W) with H, W multiples of 8::

    encoder:  map_pixels(x) -> 7x7 conv -> 4 groups of n_blk_per_group residual blocks (max-pool 2x after
              groups 1-3) -> ReLU -> 1x1 conv -> logits (B, vocab, H/8, W/8) -> tokens = argmax
    decoder:  tokens (B, h, w) -> 1x1 conv of the one-hot map, done as a gather (fastgen.nn.vq.decode_tokens)
              -> 4 groups of residual blocks (nearest 2x upsampling after groups 1-3) -> ReLU -> 1x1 conv
              -> (B, 2*3, 8h, 8w) logit-Laplace statistics -> unmap_pixels(sigmoid(stats[:, :3]))

A residual block is ``id_path(x) + post_gain * res_path(x)`` with ``post_gain = 1 / n_layers**2``
(n_layers = 4 * n_blk_per_group) and res_path = 4 x (ReLU, conv) (3x3, 3x3, 3x3, 1x1 in the encoder; 1x1,
3x3, 3x3, 3x3 in the decoder), hidden width n_out / 4. Parameters are named as the release's state_dict
(``blocks.input.w``, ``blocks.group_1.block_1.res_path.conv_1.w``, ``...id_path.b``,
``blocks.output.conv.w``), so ``dvae.encoder.load_state_dict(release_encoder.state_dict())`` works (and
the decoder likewise); :meth:`DiscreteVAE.from_release` infers the config from the tensors.
:meth:`DiscreteVAE.from_pretrained` reads the release's ``encoder.pkl`` / ``decoder.pkl`` (pickles of
whole ``dall_e`` modules) without the ``dall_e`` package and without running the pickles, and fastgen's
own directories (``save_pretrained``); :meth:`DALLE.from_pretrained` reads fastgen's directories (no
DALL-E transformer weights were released).

**Transformer** (:class:`DALLE`). One sequence of ``S = text_seq_len + grid**2`` positions::

    position 0          [BOS]                       -> predicts text token 0
    positions 1..L      text tokens 0..L-1          -> predict text 1..L-1, then image token 0
    positions L+1..S-1  image tokens 0..grid**2-2   -> predict image tokens 1..grid**2-1

Text and image tokens have separate embedding tables in one d_model space. Text padding: the pad id
(``text_pad_id``, default 0) at text position i is embedded as its own learned token ``text_vocab + i``
(the paper's "special padding token for each of the 256 text positions"), or as the ordinary pad id with
``per_position_pad=False``. Shorter text is right-padded with the pad id to ``text_seq_len``. Positional
embeddings: a learned table for BOS + text, and row + column tables for the image grid.

Other grids (``DALLEConfig.size_strategy``; trained at 16x16, run at 24x24):

* ``"interpolate"`` (default): the row and column tables are resampled to the new grid
  (:func:`interpolate_pos_embed`, ``pos_interp_mode`` "linear" (default) or "nearest");
* ``"resize"``: image tokens of another grid are resized (nearest, tokens are discrete:
  :func:`resize_tokens`) to the trained grid, so ``logits`` / the loss are those of the trained grid;
  ``generate_images(grid=G)`` samples at the trained grid and resizes the tokens to G x G;
* ``"adaptive_pool"`` is refused: the transformer predicts every image position one by one, so pooling
  the token grid would change what is being modelled (it is a strategy for encoders such as CLIP's
  towers). The dVAE is fully convolutional: any H, W multiple of 8 works with nothing to do. Blocks are pre-LN (attention, GELU MLP); the head is one final LayerNorm and one linear map
whose first ``text_vocab`` rows give the logits on text positions and the last ``image_vocab`` rows the
logits on image positions (logits are restricted to the right vocabulary by construction).

Attention masks (``DALLEConfig.attn_types``, one entry per layer): ``"full"`` is the dense causal mask,
run through ``fastgen.scaled_dot_product_attention(..., is_causal=True)``. The paper's sparse masks (its
Figure 11, :func:`attention_mask`) keep text -> text causal and image -> text full; image -> image is
``"row"`` (the previous grid + 1 image tokens in raster order, self included: back to the same column of
the previous row), ``"column"`` (earlier tokens of the same column) or ``"conv"`` (a causal
``conv_kernel x conv_kernel`` neighbourhood with the row attention's raster wrap-around). They run as
bool masks. The paper's 64-layer schedule (:func:`paper_attn_types`): column in layers i (1-based) with
(i - 2) % 4 == 0, conv in the last layer, row elsewhere. ``attn_types=()`` means every layer is full.

**Generation** (:meth:`DALLE.generate_images`): one prompt pass over BOS + text fills a KV cache per layer
((batch, S, heads, head_dim); every row appends at the same position, a slice copy), then one image token per step:
full layers through ``fastgen.attention_decode``, sparse layers through
``fastgen.scaled_dot_product_attention`` on the cache with the layer's mask row. Classifier-free
guidance appends a null-text row (all pad tokens) per sample: ``logits = uncond + cond_scale * (cond -
uncond)``. The first token comes from the prompt pass, so generation makes grid**2 - 1 decode steps.

**Training** (``loss = model(text, image_tokens)``): ``text_loss_weight * CE(text) + image_loss_weight *
CE(image)``, each cross-entropy averaged over its own tokens (the paper's 1/8 and 7/8).
"""

from __future__ import annotations

import copy
import math
import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastgen
from fastgen.models import hub
from fastgen.models.common import (
    check_finite,
    check_id_range,
    check_integer_ids,
    check_positive_int,
    check_sampling_args,
    sample_logits,
)
from fastgen.nn.vq import decode_tokens

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is a dependency, but keep generation working without it
    tqdm = None

LOGIT_LAPLACE_EPS = 0.1
GROUP_COUNT = 4  # the release's encoder / decoder: 4 groups, 3 resamplings -> 8x
ATTN_TYPES = ("full", "row", "column", "conv")
SIZE_STRATEGIES = ("interpolate", "resize")
POS_INTERP_MODES = ("linear", "nearest")


def _err(msg: str) -> ValueError:
    return ValueError(f"fastgen.models.dalle: {msg}")


# =====================================================================================================
# Configs and presets
# =====================================================================================================


@dataclass
class DVAEConfig:
    """The ``dall_e`` release's Encoder / Decoder hyper-parameters (its defaults are the released model)."""

    vocab_size: int = 8192
    n_hid: int = 256  # encoder / decoder width unit (groups: 1, 2, 4, 8 x n_hid)
    n_init: int = 128  # decoder: channels out of the token 1x1 conv
    n_blk_per_group: int = 2
    channels: int = 3  # image channels (the decoder outputs 2 x channels logit-Laplace statistics)

    def __post_init__(self) -> None:
        if self.n_hid < 4 or self.n_hid % 4 or self.n_init < 1 or self.n_blk_per_group < 1:
            raise _err(
                f"DVAEConfig: n_hid must be a positive multiple of 4, n_init and n_blk_per_group >= 1: {self}"
            )


def paper_attn_types(n_layers: int) -> tuple[str, ...]:
    """The paper's schedule: layer i (1-based) is column if (i - 2) % 4 == 0, conv if last, else row."""
    return tuple(
        "conv" if i == n_layers else ("column" if (i - 2) % 4 == 0 else "row") for i in range(1, n_layers + 1)
    )


@dataclass
class DALLEConfig:
    """Transformer hyper-parameters; ``dvae`` (or None) describes the image tokenizer."""

    text_vocab_size: int = 16384
    text_seq_len: int = 256
    image_vocab_size: int = 8192
    image_grid: int = 32  # the grid the image positional tables are trained at
    d_model: int = 3968
    n_layers: int = 64
    n_heads: int = 62
    mlp_ratio: float = 4.0
    attn_types: tuple[str, ...] = ()  # one per layer from ATTN_TYPES; () = every layer "full"
    conv_kernel: int = 11  # the "conv" mask's kernel (odd)
    text_pad_id: int = 0
    per_position_pad: bool = True
    text_loss_weight: float = 1 / 8
    image_loss_weight: float = 7 / 8
    norm_eps: float = 1e-5
    dvae: DVAEConfig | None = field(default_factory=DVAEConfig)
    size_strategy: str = "interpolate"  # or "resize" (see the module docstring)
    pos_interp_mode: str = "linear"  # or "nearest": how the image row / column tables are resampled

    def __post_init__(self) -> None:
        self.attn_types = tuple(self.attn_types)
        if self.size_strategy == "adaptive_pool":
            raise _err(
                "size_strategy='adaptive_pool' does not apply to an autoregressive image-token model (every "
                "position is predicted, pooling would change them); use 'interpolate' or 'resize'"
            )
        if self.size_strategy not in SIZE_STRATEGIES:
            raise _err(f"size_strategy must be one of {SIZE_STRATEGIES}, got {self.size_strategy!r}")
        if self.pos_interp_mode not in POS_INTERP_MODES:
            raise _err(f"pos_interp_mode must be one of {POS_INTERP_MODES}, got {self.pos_interp_mode!r}")
        if self.d_model % self.n_heads:
            raise _err(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if self.attn_types and len(self.attn_types) != self.n_layers:
            raise _err(f"attn_types has {len(self.attn_types)} entries for {self.n_layers} layers")
        bad = [t for t in self.attn_types if t not in ATTN_TYPES]
        if bad:
            raise _err(f"attn_types entries must be in {ATTN_TYPES}, got {bad}")
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise _err(f"conv_kernel must be odd and positive, got {self.conv_kernel}")
        if not 0 <= self.text_pad_id < self.text_vocab_size:
            raise _err(
                f"text_pad_id {self.text_pad_id} is outside the text vocab [0, {self.text_vocab_size})"
            )
        if self.dvae is not None and self.dvae.vocab_size != self.image_vocab_size:
            raise _err(f"dvae.vocab_size {self.dvae.vocab_size} != image_vocab_size {self.image_vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def layer_types(self) -> tuple[str, ...]:
        return self.attn_types or ("full",) * self.n_layers


_TINY_DVAE = DVAEConfig(vocab_size=32, n_hid=8, n_init=8, n_blk_per_group=1)
_TINY = DALLEConfig(text_vocab_size=48, text_seq_len=6, image_vocab_size=32, image_grid=4, d_model=32,
                    n_layers=2, n_heads=2, dvae=_TINY_DVAE)  # fmt: skip

PRESETS: dict[str, DALLEConfig] = {
    # the paper: 64 layers, 62 heads x 64, 256 BPE text tokens (vocab 16384), 32x32 image tokens (8192),
    # sparse attention (row / column / conv): ~12B parameters
    "dalle-12b": DALLEConfig(attn_types=paper_attn_types(64)),
    # a benchmark-size model with the paper's sequence (256 + 1024 tokens), dense attention
    "dalle-small": DALLEConfig(d_model=1024, n_layers=12, n_heads=16),
    # tiny configs for tests / CPU examples: 6 text tokens + a 4x4 token grid (32x32 pixels)
    "dalle-tiny": _TINY,
    "dalle-tiny-sparse": replace(_TINY, n_layers=3, attn_types=("row", "column", "conv"), conv_kernel=3),
}


def from_name(name: str, **overrides) -> DALLEConfig:
    """A copy of ``PRESETS[name]`` with ``overrides`` applied: ``from_name("dalle-tiny", n_layers=4)``."""
    if name not in PRESETS:
        raise _err(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return replace(copy.deepcopy(PRESETS[name]), **overrides)


# =====================================================================================================
# Discrete VAE (the dall_e release, parameter names included)
# =====================================================================================================


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """[0, 1] -> [eps, 1 - eps]: the input range of the logit-Laplace dVAE."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """Inverse of :func:`map_pixels`, clamped to [0, 1]."""
    return torch.clamp((x - eps) / (1 - 2 * eps), 0, 1)


class Conv2d(nn.Module):
    """The release's conv: parameters ``w`` (n_out, n_in, kw, kw) and ``b`` (n_out,), 'same' padding."""

    def __init__(self, n_in: int, n_out: int, kw: int):
        super().__init__()
        self.kw = kw
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw**2))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x.to(self.w.dtype), self.w, self.b, padding=(self.kw - 1) // 2)


class _ResBlock(nn.Module):
    """``id_path(x) + post_gain * res_path(x)``; kernels (3, 3, 3, 1) in the encoder, (1, 3, 3, 3) in the
    decoder."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = (n_in, n_hid, n_hid, n_hid, n_out)
        layers = []
        for i, kw in enumerate(kernels):
            layers += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", Conv2d(widths[i], widths[i + 1], kw))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _group(blocks: list[nn.Module], resample: tuple[str, nn.Module] | None) -> nn.Sequential:
    items = [(f"block_{i + 1}", b) for i, b in enumerate(blocks)]
    return nn.Sequential(OrderedDict(items + ([resample] if resample else [])))


class DVAEEncoder(nn.Module):
    """forward(x: (B, 3, H, W) in map_pixels range, H, W multiples of 8) -> logits (B, vocab, H/8, W/8)."""

    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        self.cfg = cfg
        nb, h = cfg.n_blk_per_group, cfg.n_hid
        n_layers = GROUP_COUNT * nb
        widths = [h, h, 2 * h, 4 * h, 8 * h]  # group g: widths[g - 1] -> widths[g]
        groups = []
        for g in range(1, GROUP_COUNT + 1):
            blocks = [_ResBlock(widths[g - 1] if i == 0 else widths[g], widths[g], n_layers, (3, 3, 3, 1))
                      for i in range(nb)]  # fmt: skip
            pool = ("pool", nn.MaxPool2d(kernel_size=2)) if g < GROUP_COUNT else None
            groups.append((f"group_{g}", _group(blocks, pool)))
        out = nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", Conv2d(8 * h, cfg.vocab_size, 1))]))
        self.blocks = nn.Sequential(
            OrderedDict([("input", Conv2d(cfg.channels, h, 7)), *groups, ("output", out)])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, self.cfg.channels)
        return self.blocks(x)


class DVAEDecoder(nn.Module):
    """forward(z) -> logit-Laplace statistics (B, 2 * channels, 8h, 8w).

    z: tokens (B, h, w) integer in [0, vocab): the input 1x1 conv runs as a gather of its weight columns;
    or the release's float one-hot map (B, vocab, h, w): the conv itself.
    """

    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        self.cfg = cfg
        nb, h = cfg.n_blk_per_group, cfg.n_hid
        n_layers = GROUP_COUNT * nb
        widths = [cfg.n_init, 8 * h, 4 * h, 2 * h, h]
        groups = []
        for g in range(1, GROUP_COUNT + 1):
            blocks = [_ResBlock(widths[g - 1] if i == 0 else widths[g], widths[g], n_layers, (1, 3, 3, 3))
                      for i in range(nb)]  # fmt: skip
            up = ("upsample", nn.Upsample(scale_factor=2, mode="nearest")) if g < GROUP_COUNT else None
            groups.append((f"group_{g}", _group(blocks, up)))
        out = nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", Conv2d(h, 2 * cfg.channels, 1))]))
        self.blocks = nn.Sequential(
            OrderedDict([("input", Conv2d(cfg.vocab_size, cfg.n_init, 1)), *groups, ("output", out)])
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        inp = self.blocks.input
        if z.is_floating_point():
            if z.dim() != 4 or z.shape[1] != self.cfg.vocab_size:
                raise _err(
                    f"decoder: a one-hot input must be (B, {self.cfg.vocab_size}, h, w), got {tuple(z.shape)}"
                )
            x = inp(z)
        else:
            _check_tokens("tokens", z, self.cfg.vocab_size, dims=3)
            x = decode_tokens(z, inp.w, inp.b)
        for module in list(self.blocks)[1:]:
            x = module(x)
        return x


def _check_images(x: torch.Tensor, channels: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != channels or not x.is_floating_point():
        raise _err(f"images must be float (B, {channels}, H, W), got {getattr(x, 'shape', type(x))}")
    if x.shape[2] % 8 or x.shape[3] % 8 or x.shape[2] == 0 or x.shape[3] == 0:
        raise _err(
            f"image height and width must be positive multiples of 8 (8x downsampling), "
            f"got {tuple(x.shape[2:])}"
        )


def _check_tokens(name: str, t: torch.Tensor, vocab: int, dims: int) -> None:
    check_integer_ids(name, t, _err)
    if t.dim() != dims:
        raise _err(f"{name} must have {dims} dims, got shape {tuple(t.shape)}")
    check_id_range(name, t, vocab, _err)


class DiscreteVAE(nn.Module):
    """The dVAE: ``encode(images in [0, 1]) -> tokens``, ``decode(tokens) -> images in [0, 1]``."""

    def __init__(self, cfg: DVAEConfig | None = None):
        super().__init__()
        self.cfg = cfg or DVAEConfig()
        self.encoder = DVAEEncoder(self.cfg)
        self.decoder = DVAEDecoder(self.cfg)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) in [0, 1], H and W multiples of 8 -> tokens (B, H/8, W/8) int64."""
        _check_images(images, self.cfg.channels)
        return self.encoder(map_pixels(images)).argmax(dim=1)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, h, w) in [0, vocab) -> images (B, 3, 8h, 8w) in [0, 1] (the logit-Laplace mean)."""
        stats = self.decoder(tokens)
        return unmap_pixels(torch.sigmoid(stats[:, : self.cfg.channels].float()))

    @classmethod
    def from_release(cls, encoder_state, decoder_state) -> DiscreteVAE:
        """Build from the release's encoder / decoder **state_dicts**, inferring the config from their shapes.

        Paths to the release's ``encoder.pkl`` / ``decoder.pkl`` are read by :meth:`from_pretrained`
        (``from_release`` forwards two paths to it).
        """
        if isinstance(encoder_state, (str, os.PathLike)) and isinstance(decoder_state, (str, os.PathLike)):
            return cls.from_pretrained((encoder_state, decoder_state))
        for name, sd in (("encoder_state", encoder_state), ("decoder_state", decoder_state)):
            if not isinstance(sd, Mapping):
                raise TypeError(
                    f"DiscreteVAE.from_release: {name} must be a state_dict (a mapping of names to tensors), "
                    f"got {type(sd).__name__}; for the release files use DiscreteVAE.from_pretrained("
                    "(encoder_path, decoder_path)) or from_pretrained(directory)"
                )
        for name, sd, keys in (("encoder_state", encoder_state, ("blocks.input.w", "blocks.output.conv.w")),
                               ("decoder_state", decoder_state, ("blocks.input.w",))):  # fmt: skip
            missing = [k for k in keys if k not in sd]
            if missing:
                raise ValueError(f"DiscreteVAE.from_release: {name} lacks {missing}: not a dall_e state_dict")
        w_in, w_out = encoder_state["blocks.input.w"], encoder_state["blocks.output.conv.w"]
        n_blk = len({k.split(".")[2] for k in encoder_state if k.startswith("blocks.group_1.block_")})
        cfg = DVAEConfig(vocab_size=w_out.shape[0], n_hid=w_in.shape[0],
                         n_init=decoder_state["blocks.input.w"].shape[0], n_blk_per_group=n_blk,
                         channels=w_in.shape[1])  # fmt: skip
        model = cls(cfg)
        model.encoder.load_state_dict(encoder_state)
        model.decoder.load_state_dict(decoder_state)
        return model

    # ---- files --------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write fastgen's format (``config.json`` with model_type "dvae" + ``model.safetensors``, keys
        ``encoder.*`` / ``decoder.*``) into ``directory``; read back with :meth:`from_pretrained`."""
        return hub.save_fastgen_dir(directory, "dvae", self.cfg, self.state_dict())

    @classmethod
    def from_pretrained(cls, path) -> DiscreteVAE:
        """Load the dVAE from local files (nothing is downloaded). ``path`` is one of

        * a directory written by :meth:`save_pretrained` (``config.json`` + ``model.safetensors``);
        * a directory holding the release's ``encoder.pkl`` and ``decoder.pkl``
          (https://cdn.openai.com/dall-e/encoder.pkl and .../decoder.pkl);
        * a pair ``(encoder_path, decoder_path)`` of those two files.

        The release files are ``torch.save``-d whole modules of the ``dall_e`` package. They are read by a
        restricted unpickler (:func:`fastgen.models.hub.restricted_torch_load`) that admits only the
        classes those files hold (:data:`DALL_E_PICKLE_CLASSES`), as inert records: no code in the file
        runs and the ``dall_e`` package is not needed. The config is inferred from the tensor shapes.
        """
        if isinstance(path, (tuple, list)):
            if len(path) != 2 or not all(isinstance(p, (str, os.PathLike)) for p in path):
                raise TypeError(
                    "DiscreteVAE.from_pretrained: path must be a directory or an (encoder_path, decoder_path) "
                    f"pair of paths, got {path!r}"
                )
            enc_path, dec_path = Path(path[0]), Path(path[1])
        elif isinstance(path, (str, os.PathLike)):
            d = Path(path)
            if hub.is_fastgen_dir(d):
                meta, state = hub.load_fastgen_dir(d, "dvae")
                model = cls(hub.config_from_dict(DVAEConfig, meta["config"]))
                model.load_state_dict(state)
                return model
            if d.is_file():
                raise ValueError(
                    f"DiscreteVAE.from_pretrained: {d} is a file; pass the directory holding encoder.pkl and "
                    "decoder.pkl, or the pair (encoder_path, decoder_path)"
                )
            if (d / hub.CONFIG_NAME).is_file() and not (d / "encoder.pkl").exists():
                hub.load_fastgen_dir(d, "dvae")  # raises: another model type, or model.safetensors missing
            enc_path, dec_path = d / "encoder.pkl", d / "decoder.pkl"
        else:
            raise TypeError(
                f"DiscreteVAE.from_pretrained: path must be a str / os.PathLike or a pair of them, "
                f"got {type(path).__name__}"
            )
        enc = _read_release_pickle(enc_path, "encoder")
        dec = _read_release_pickle(dec_path, "decoder")
        return cls.from_release(enc, dec)


# Every global the release's encoder.pkl / decoder.pkl name (besides torch's tensor internals).
DALL_E_PICKLE_CLASSES = (
    "dall_e.encoder.Encoder",
    "dall_e.encoder.EncoderBlock",
    "dall_e.decoder.Decoder",
    "dall_e.decoder.DecoderBlock",
    "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.upsampling.Upsample",
    "torch.nn.modules.linear.Identity",
)
DALL_E_URLS = {part: f"https://cdn.openai.com/dall-e/{part}.pkl" for part in ("encoder", "decoder")}


def _read_release_pickle(path: Path, part: str) -> dict:
    """The state_dict of the release's ``encoder.pkl`` / ``decoder.pkl``, read without running the pickle."""
    if not path.is_file():
        raise hub.missing_weights_error(
            path, f"the DALL-E dVAE {part} (a pickled dall_e.{part}.{part.title()})", DALL_E_URLS[part]
        )
    root = hub.restricted_torch_load(path, DALL_E_PICKLE_CLASSES)
    want = f"dall_e.{part}.{part.title()}"
    found = getattr(root, "_pickled_class", type(root).__name__)
    if found != want:
        raise ValueError(f"DiscreteVAE.from_pretrained: {path} holds a {found}, expected a {want}")
    return dict(hub.module_state_dict(root))


# =====================================================================================================
# Transformer
# =====================================================================================================


def interpolate_pos_embed(table: torch.Tensor, size: int, mode: str = "linear") -> torch.Tensor:
    """A (n, d) row or column positional table resampled to (size, d): ``F.interpolate(..., mode="linear",
    align_corners=False)`` or ``mode="nearest"`` (``nearest-exact``: source ``floor((i + 0.5) n / size)``);
    the table itself when n == size."""
    check_positive_int("size", size, _err)
    if mode not in POS_INTERP_MODES:
        raise _err(f"mode must be one of {POS_INTERP_MODES}, got {mode!r}")
    if table.shape[0] == size:
        return table
    kw = {"align_corners": False} if mode == "linear" else {}
    t_mode = "linear" if mode == "linear" else "nearest-exact"
    return F.interpolate(table.t()[None].float(), size=size, mode=t_mode, **kw)[0].t().to(table.dtype)


def resize_tokens(tokens: torch.Tensor, size: int) -> torch.Tensor:
    """(B, g, g) token ids -> (B, size, size) by nearest (``nearest-exact``) resampling of the grid."""
    check_positive_int("size", size, _err)
    g = tokens.shape[-1]
    if g == size:
        return tokens
    src = ((torch.arange(size, device=tokens.device) + 0.5) * g / size).floor().long().clamp_(max=g - 1)
    return tokens[:, src][:, :, src]


def attention_mask(
    kind: str, text_seq_len: int, grid: int, conv_kernel: int = 11, device=None
) -> torch.Tensor:
    """Bool (S, S) mask, True = attend; S = text_seq_len + grid**2 positions (BOS + text, then image tokens
    0..grid**2-2).

    Every kind is causal. "full": dense causal. Sparse kinds change image -> image only (Figure 11 of the
    paper): "row" sees image tokens j' with j - grid <= j' <= j; "column" those with (j - j') % grid == 0;
    "conv" those with j - j' = r * grid + c for some 0 <= r <= k // 2, |c| <= k // 2 (k = conv_kernel).
    """
    if kind not in ATTN_TYPES:
        raise _err(f"mask kind must be in {ATTN_TYPES}, got {kind!r}")
    n_text = text_seq_len + 1
    pos = torch.arange(text_seq_len + grid * grid, device=device)
    causal = pos[None, :] <= pos[:, None]
    if kind == "full":
        return causal
    d = pos[:, None] - pos[None, :]  # query image index - key image index, where both are image tokens
    if kind == "row":
        ok = d <= grid
    elif kind == "column":
        ok = d.remainder(grid) == 0
    else:
        h = conv_kernel // 2
        rows = torch.arange(h + 1, device=device) * grid
        ok = ((d[..., None] - rows).abs() <= h).any(-1)
    both_image = (pos[:, None] >= n_text) & (pos[None, :] >= n_text)
    return causal & (ok | ~both_image)


class _Attention(nn.Module):
    def __init__(self, cfg: DALLEConfig, kind: str):
        super().__init__()
        self.kind, self.n_heads, self.head_dim = kind, cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x, mask, cache, pos, plain):
        """x: (B, s, d) at sequence positions pos..pos+s-1. mask: bool (S, S) or None (full causal).
        cache: None or (k_cache, v_cache) (B, S, H, Dh), holding positions < pos; the new keys are written."""
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_heads, self.head_dim).unbind(2)  # (B, s, H, Dh)
        if cache is None:
            o = _sdpa(q, k, v, None if mask is None else mask[:s, :s], plain)
        else:
            kc, vc = cache
            end = pos + s
            # every row is at the same position: a slice copy is the append on any device
            # (fastgen.kv_cache_append is for ragged lengths)
            kc[:, pos:end], vc[:, pos:end] = k, v
            if pos == 0:  # the prompt: attention over itself, as the full forward
                o = _sdpa(q, k, v, None if mask is None else mask[:s, :s], plain)
            elif mask is None and not plain:
                o = fastgen.attention_decode(
                    q, kc, vc, torch.full((b,), end, dtype=torch.int32, device=x.device)
                )
            else:
                m = _causal_rows(pos, end, x.device) if mask is None else mask[pos:end, :end]
                o = _sdpa(q, kc[:, :end], vc[:, :end], m, plain, causal=False)
        return self.proj(o.reshape(b, s, self.n_heads * self.head_dim))


def _causal_rows(pos: int, end: int, device) -> torch.Tensor:
    return torch.arange(end, device=device)[None, :] <= torch.arange(pos, end, device=device)[:, None]


def _sdpa(q, k, v, mask, plain, causal=True):
    """(B, s, H, Dh) in and out. mask None: top-left causal; else the bool mask (s, sk) alone."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    fn = F.scaled_dot_product_attention if plain else fastgen.scaled_dot_product_attention
    if mask is None and causal:
        o = fn(qt, kt, vt, is_causal=True)
    else:
        o = fn(qt, kt, vt, attn_mask=mask)
    return o.transpose(1, 2)


class _Block(nn.Module):
    def __init__(self, cfg: DALLEConfig, kind: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = _Attention(cfg, kind)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        hidden = int(cfg.mlp_ratio * cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, hidden), nn.GELU(), nn.Linear(hidden, cfg.d_model))

    def forward(self, x, mask, cache=None, pos=0, plain=False):
        x = x + self.attn(self.ln_1(x), mask, cache, pos, plain)
        return x + self.mlp(self.ln_2(x))


class DALLE(nn.Module):
    """The DALL-E transformer (+ its dVAE when ``cfg.dvae`` is set or ``dvae`` is given).

    ``attention_impl``: "fastgen" (default: fastgen's attention, KV-cache append and decode ops) or
    "torch" (``torch.nn.functional.scaled_dot_product_attention`` and index-assignment KV caches: the
    plain-PyTorch baseline of the benchmarks).
    """

    def __init__(self, cfg: DALLEConfig, dvae: DiscreteVAE | None = None):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        n_pad = cfg.text_seq_len if cfg.per_position_pad else 0
        self.text_emb = nn.Embedding(cfg.text_vocab_size + n_pad, d)
        self.image_emb = nn.Embedding(cfg.image_vocab_size, d)
        self.bos = nn.Parameter(torch.zeros(d))
        self.text_pos_emb = nn.Parameter(torch.zeros(cfg.text_seq_len + 1, d))
        self.image_row_emb = nn.Parameter(torch.zeros(cfg.image_grid, d))
        self.image_col_emb = nn.Parameter(torch.zeros(cfg.image_grid, d))
        self.blocks = nn.ModuleList(_Block(cfg, kind) for kind in cfg.layer_types())
        self.ln_f = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.to_logits = nn.Linear(d, cfg.text_vocab_size + cfg.image_vocab_size, bias=False)
        if dvae is None and cfg.dvae is not None:
            dvae = DiscreteVAE(cfg.dvae)
        self.dvae = dvae
        self.attention_impl = "fastgen"
        self._masks: dict = {}
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.bos, self.text_pos_emb, self.image_row_emb, self.image_col_emb):
            nn.init.normal_(p, std=0.02)
        for blk in self.blocks:  # GPT-2: scale the residual projections by 1/sqrt(2 n_layers)
            for lin in (blk.attn.proj, blk.mlp[2]):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * self.cfg.n_layers))

    # ---- inputs -------------------------------------------------------------------------------------

    def _text_ids(self, text: torch.Tensor) -> torch.Tensor:
        """(B, L <= text_seq_len) -> (B, text_seq_len) embedding ids (right-padded, per-position pads)."""
        cfg = self.cfg
        _check_tokens("text", text, cfg.text_vocab_size, dims=2)
        if text.shape[1] > cfg.text_seq_len:
            raise _err(f"text has {text.shape[1]} tokens, more than text_seq_len = {cfg.text_seq_len}")
        text = F.pad(text.long(), (0, cfg.text_seq_len - text.shape[1]), value=cfg.text_pad_id)
        if cfg.per_position_pad:
            slots = cfg.text_vocab_size + torch.arange(cfg.text_seq_len, device=text.device)
            return torch.where(text == cfg.text_pad_id, slots, text), text
        return text, text

    def _image_flat(self, image_tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
        _check_tokens("image_tokens", image_tokens, self.cfg.image_vocab_size, dims=3)
        b, gh, gw = image_tokens.shape
        if gh != gw or gh == 0:
            raise _err(f"image_tokens must be a square grid (B, grid, grid), got {tuple(image_tokens.shape)}")
        if self.cfg.size_strategy == "resize" and gh != self.cfg.image_grid:
            image_tokens = resize_tokens(image_tokens, self.cfg.image_grid)
            gh = self.cfg.image_grid
        return image_tokens.reshape(b, gh * gh).long(), gh

    def _mask(self, kind: str, grid: int, device) -> torch.Tensor | None:
        if kind == "full":
            return None
        key = (kind, grid, str(device))
        if key not in self._masks:
            self._masks[key] = attention_mask(kind, self.cfg.text_seq_len, grid, self.cfg.conv_kernel, device)
        return self._masks[key]

    def _embed_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L + 1, d): BOS then text, with positions 0..L."""
        b = text_ids.shape[0]
        x = torch.cat([self.bos.expand(b, 1, -1), self.text_emb(text_ids)], dim=1)
        return x + self.text_pos_emb

    def _embed_image(self, flat: torch.Tensor, start: int, grid: int) -> torch.Tensor:
        """flat: (B, n) image tokens with raster indices start..start+n-1 -> (B, n, d)."""
        idx = torch.arange(start, start + flat.shape[1], device=flat.device)
        mode = self.cfg.pos_interp_mode
        rows = interpolate_pos_embed(self.image_row_emb, grid, mode)
        cols = interpolate_pos_embed(self.image_col_emb, grid, mode)
        return self.image_emb(flat) + rows[idx // grid] + cols[idx % grid]

    def _trunk(self, x: torch.Tensor, grid: int, caches=None, pos: int = 0) -> torch.Tensor:
        plain = self.attention_impl == "torch"
        for i, blk in enumerate(self.blocks):
            cache = None if caches is None else caches[i]
            x = blk(x, self._mask(blk.attn.kind, grid, x.device), cache, pos, plain)
        return self.ln_f(x)

    # ---- training -----------------------------------------------------------------------------------

    def logits(self, text: torch.Tensor, image_tokens: torch.Tensor | None = None, grid: int | None = None):
        """text: (B, L <= text_seq_len) int; image_tokens: (B, grid, grid) int or None.

        Returns (text_logits (B, text_seq_len, text_vocab), image_logits (B, grid**2, image_vocab)): the
        prediction of every text token and every image token (image_logits is (B, 1, image_vocab), the
        first image token, when image_tokens is None). With ``size_strategy="resize"`` the image tokens
        are first resized to the trained grid (and image_logits is (B, image_grid**2, image_vocab)).
        """
        check_positive_int("grid", grid, _err, allow_none=True)
        if self.cfg.size_strategy == "resize" and image_tokens is None:
            grid = None
        ids, _ = self._text_ids(text)
        x = self._embed_text(ids)
        if image_tokens is not None:
            if grid is not None and grid != image_tokens.shape[-1]:
                raise _err(f"grid {grid} does not match image_tokens' grid {image_tokens.shape[-1]}")
            flat, tok_grid = self._image_flat(image_tokens)
            grid = tok_grid
            x = torch.cat([x, self._embed_image(flat[:, :-1], 0, grid)], dim=1)
        h = self._trunk(x, self.cfg.image_grid if grid is None else grid)
        vt, n_text = self.cfg.text_vocab_size, self.cfg.text_seq_len
        w = self.to_logits.weight
        return F.linear(h[:, :n_text], w[:vt]), F.linear(h[:, n_text:], w[vt:])

    def forward(self, text: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Training loss: text_loss_weight * CE(text) + image_loss_weight * CE(image) (each a token mean)."""
        text_logits, image_logits = self.logits(text, image_tokens)
        _, text_target = self._text_ids(text)
        flat, _ = self._image_flat(image_tokens)
        lt = F.cross_entropy(text_logits.flatten(0, 1).float(), text_target.flatten())
        li = F.cross_entropy(image_logits.flatten(0, 1).float(), flat.flatten())
        return self.cfg.text_loss_weight * lt + self.cfg.image_loss_weight * li

    # ---- generation ---------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_images(
        self,
        text_tokens: torch.Tensor,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        cond_scale: float = 1.0,
        seed: int | None = None,
        progress: bool = True,
        grid: int | None = None,
        use_cache: bool = True,
        return_images: bool = False,
    ):
        """Sample image tokens for each text: (B, L <= text_seq_len) int -> (B, grid, grid) int64.

        temperature: logits / temperature (0: greedy argmax); top_k: keep the k largest logits; top_p:
        keep the smallest set of tokens whose probability reaches top_p (nucleus). cond_scale != 1:
        classifier-free guidance against the null text (all pad tokens), uncond + cond_scale * (cond -
        uncond) in logit space. seed: a torch.Generator seeded with it draws every sample (None: torch's
        global generator). grid: the token grid (default cfg.image_grid; others interpolate the image
        positional tables). use_cache=False recomputes the whole sequence every step (the oracle of the
        KV-cache path). return_images: also return the dVAE decoding, (B, 3, 8 grid, 8 grid) in [0, 1].
        With ``size_strategy="resize"`` the tokens are sampled at the trained grid and resized to grid.
        """
        cfg = self.cfg
        check_positive_int("grid", grid, _err, allow_none=True)
        out_grid = cfg.image_grid if grid is None else int(grid)
        grid = cfg.image_grid if cfg.size_strategy == "resize" else out_grid
        check_sampling_args(temperature, top_k, top_p, _err)
        check_finite("cond_scale", cond_scale, _err)
        n_img = grid * grid
        ids, _ = self._text_ids(text_tokens)
        b = ids.shape[0]
        guided = cond_scale != 1.0
        if guided:
            null, _ = self._text_ids(torch.full_like(text_tokens[:, :1], cfg.text_pad_id))
            ids = torch.cat([ids, null])
        gen = None
        if seed is not None:
            gen = torch.Generator(device=ids.device)
            gen.manual_seed(seed)
        dtype = self.to_logits.weight.dtype
        w_img = self.to_logits.weight[cfg.text_vocab_size :]
        tokens = torch.zeros(b, n_img, dtype=torch.long, device=ids.device)
        x = self._embed_text(ids)
        caches = None
        if use_cache:
            shape = (ids.shape[0], cfg.text_seq_len + n_img, cfg.n_heads, cfg.head_dim)
            caches = [(torch.zeros(shape, dtype=dtype, device=ids.device),
                       torch.zeros(shape, dtype=dtype, device=ids.device)) for _ in self.blocks]  # fmt: skip
        steps = range(n_img)
        if progress and tqdm is not None:
            steps = tqdm(steps, desc="DALL-E image tokens", leave=False)
        for j in steps:
            if use_cache:
                pos = 0 if j == 0 else cfg.text_seq_len + j
                h = self._trunk(x, grid, caches, pos)[:, -1]
            else:
                h = self._trunk(x, grid)[:, -1]
            logits = F.linear(h, w_img).float()
            if guided:
                cond, uncond = logits[:b], logits[b:]
                logits = uncond + cond_scale * (cond - uncond)
            tokens[:, j] = sample_logits(
                logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen
            )
            if j + 1 < n_img:
                new = tokens[:, j : j + 1].repeat(2, 1) if guided else tokens[:, j : j + 1]
                e = self._embed_image(new, j, grid)
                x = e if use_cache else torch.cat([x, e], dim=1)
        tokens = resize_tokens(tokens.view(b, grid, grid), out_grid)
        if not return_images:
            return tokens
        if self.dvae is None:
            raise _err("return_images=True needs a dVAE (cfg.dvae or the dvae argument)")
        return tokens, self.dvae.decode(tokens)

    # ---- files --------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write fastgen's format into ``directory``: ``config.json`` (model_type "dalle", the
        :class:`DALLEConfig` with its ``dvae`` config, or ``dvae: null`` when the model has no dVAE) and
        ``model.safetensors`` (the transformer, and the dVAE under ``dvae.*``)."""
        cfg = replace(self.cfg, dvae=None if self.dvae is None else self.dvae.cfg)
        return hub.save_fastgen_dir(directory, "dalle", cfg, self.state_dict())

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dvae=None, **overrides) -> DALLE:
        """Load a directory written by :meth:`save_pretrained`.

        No DALL-E transformer weights were ever released (OpenAI published only the dVAE), so the only
        transformer format is fastgen's own. ``dvae``: a :class:`DiscreteVAE`, or anything
        :meth:`DiscreteVAE.from_pretrained` reads (a directory holding the release ``encoder.pkl`` /
        ``decoder.pkl``, the pair of their paths, a fastgen "dvae" directory): it replaces the saved dVAE
        (or is attached when none was saved); its vocabulary must equal ``image_vocab_size``.
        ``overrides``: :class:`DALLEConfig` fields applied to the saved config, e.g.
        ``size_strategy="resize"`` or ``pos_interp_mode="nearest"``; fields that change parameter shapes
        make the load fail.
        """
        meta, state = hub.load_fastgen_dir(_check_path("path", path), "dalle")
        cfg = hub.config_with_overrides(
            hub.config_from_dict(DALLEConfig, meta["config"]), overrides, "DALLE.from_pretrained"
        )
        if dvae is not None:
            if not isinstance(dvae, DiscreteVAE):
                dvae = DiscreteVAE.from_pretrained(dvae)
            if dvae.cfg.vocab_size != cfg.image_vocab_size:
                raise ValueError(
                    f"DALLE.from_pretrained: dvae has a {dvae.cfg.vocab_size}-token vocabulary, the transformer "
                    f"{cfg.image_vocab_size} image tokens"
                )
            state = {k: v for k, v in state.items() if not k.startswith("dvae.")}
            state.update({f"dvae.{k}": v for k, v in dvae.state_dict().items()})
            cfg = replace(cfg, dvae=dvae.cfg)
        model = cls(cfg, dvae=dvae)
        model.load_state_dict(state)
        return model


def _check_path(name: str, path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__}")
    return Path(path)


def count_parameters(module: nn.Module, exclude: Iterable[str] = ("dvae.",)) -> int:
    """Parameters of ``module`` whose names do not start with any prefix in ``exclude``."""
    return sum(p.numel() for n, p in module.named_parameters() if not n.startswith(tuple(exclude)))

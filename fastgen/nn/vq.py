r"""Vector quantisation modules over fastgen's fused codebook lookup and EMA update.

* :class:`VectorQuantize` — VQ-VAE quantiser (van den Oord et al. 2017) with EMA codebook updates
  (Razavi et al. 2019, VQ-VAE-2), multi-head codebooks, dead-code replacement, k-means init.
* :class:`ResidualVQ` — residual quantisation (SoundStream, Zeghidour et al. 2021): each quantiser
  quantises what the previous ones left over.
* DALL-E's dVAE path (Ramesh et al. 2021): :func:`dvae_tokens` (argmax over the codebook logits) and
  :func:`decode_tokens` / :class:`OneHotConv1x1AsGather`: the decoder's first 1x1 conv applied to a
  one-hot (B, 8192, H, W) map is an embedding gather, O(B H W C_out) instead of O(B H W K C_out).

For rows ``x`` (per head) and the codebook ``e: (heads, K, dim / heads)``::

    k        = argmin_j d(x, e_j)                    (fastgen.ops.vq.vq_nearest: l2 or cosine)
    q        = e_k
    out      = x + (q - x).detach()                  straight-through estimator: d out / d x = identity
    loss     = commitment_weight * mse(x, q.detach())  (+ mse(q, x.detach()) when ema=False: codebook loss)

With ``distance="cosine"`` x and the codes are l2-normalised first and ``out`` is in the normalised space.
EMA (``ema=True``, training only): ``cluster_size``, ``embed_avg`` <- decay-weighted counts and sums of the
rows assigned to each code (:func:`fastgen.ops.vq_ema.vq_ema_update`), codebook = Laplace-smoothed
``embed_avg / cluster_size`` (:func:`fastgen.ops.vq_ema.vq_codebook_from_ema`). The output of the
step uses the codebook from before the update (as the popular implementations do).

State dict names follow lucidrains' ``vector-quantize-pytorch`` (``separate_codebook_per_head=True``):
``_codebook.embed`` (heads, K, dim_head) — a buffer with EMA, a parameter without —,
``_codebook.cluster_size`` (heads, K), ``_codebook.embed_avg`` (heads, K, dim_head),
``_codebook.initted`` (bool). ``cluster_size`` starts at ones and ``embed_avg`` at the initial codebook,
so the codebook is unchanged until data arrives.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastgen._checks import check_int, check_real
from fastgen.ops.vq import DISTANCES, MODES, vq_nearest
from fastgen.ops.vq_ema import vq_codebook_from_ema, vq_ema_update


def _l2norm(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t, dim=-1, eps=1e-12)


class _Codebook(nn.Module):
    """Holds the codebook state (named as lucidrains' ``EuclideanCodebook`` / ``CosineSimCodebook``)."""

    def __init__(self, heads: int, codebook_size: int, dim_head: int, ema: bool, cosine: bool):
        super().__init__()
        embed = torch.randn(heads, codebook_size, dim_head)
        if cosine:
            embed = _l2norm(embed)
        if ema:
            self.register_buffer("embed", embed)
        else:
            self.embed = nn.Parameter(embed)
        self.register_buffer("cluster_size", torch.ones(heads, codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("initted", torch.tensor(False))


class VectorQuantize(nn.Module):
    """Vector quantiser: ``quantized, indices, commit_loss = vq(x)``.

    Args:
        dim: feature size; codebook_size: K codes per head; heads: split dim into ``heads`` chunks of
            ``dim / heads``, each with its own codebook (one fused lookup for all heads).
        decay: EMA decay; commitment_weight: beta of the commitment loss; distance: "l2" or "cosine".
        ema: EMA codebook (buffers) vs a learned codebook parameter with the VQ-VAE codebook loss.
        dead_code_threshold: in training, codes whose EMA ``cluster_size`` falls below it are
            re-initialised from random rows of the current batch (0 disables).
        kmeans_init / kmeans_iters: initialise the codebook by k-means on the first training batch.
        channel_last: x is ``(..., dim)`` (e.g. (batch, seq, dim)); False: x is channel-first
            ``(batch, dim, *spatial)`` (e.g. (B, dim, H, W) feature maps). The layout is never guessed from
            the shape (a (B, S, dim) tensor with S = dim would be ambiguous).
        eps: Laplace smoothing of the EMA codebook; mode: vq_nearest's "exact" or "fast".
        check_finite: raise on NaN / inf input (CPU: ValueError; CUDA: device-side assert in vq_nearest).

    Shapes: channel_last: x (..., dim) -> quantized like x, indices (...) for heads = 1 else (..., heads);
    channel-first: x (B, dim, *S) -> quantized like x, indices (B, *S) or (B, *S, heads) (int64).
    commit_loss: scalar float32. ``return_info=True`` adds a 4th output, the ``info`` dict (also kept as
    ``vq.last_info``): perplexity (exp of the entropy of the batch's code usage, mean over heads), usage
    (fraction of codes used in the batch), dead_codes_replaced (int tensor), counts ((heads, K) int64).

    Buffers change only when ``self.training and torch.is_grad_enabled()``: under ``eval()`` or
    ``torch.no_grad()`` the module is a pure function of its state.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        heads: int = 1,
        decay: float = 0.99,
        commitment_weight: float = 0.25,
        distance: str = "l2",
        ema: bool = True,
        dead_code_threshold: float = 0.0,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        channel_last: bool = True,
        eps: float = 1e-5,
        mode: str = "exact",
        *,
        deterministic: bool = False,
        check_finite: bool = True,
    ):
        super().__init__()
        name = type(self).__name__
        for arg, v in (("dim", dim), ("codebook_size", codebook_size), ("heads", heads)):
            check_int(name, arg, v, -(2**63))  # the type; the ranges are checked below
        check_int(name, "kmeans_iters", kmeans_iters, 0)
        check_real(name, "commitment_weight", commitment_weight, 0.0)
        check_real(name, "dead_code_threshold", dead_code_threshold, 0.0)
        check_real(name, "eps", eps, 0.0, lo_open=True)  # Laplace smoothing: 0 divides by empty clusters
        if codebook_size < 1:
            raise ValueError(f"{name}: codebook_size must be >= 1, got {codebook_size} (an empty codebook)")
        if dim < 1 or heads < 1:
            raise ValueError(f"{name}: dim and heads must be >= 1, got dim={dim}, heads={heads}")
        if dim % heads:
            raise ValueError(f"{name}: dim={dim} is not divisible by heads={heads}")
        if distance not in DISTANCES:
            raise ValueError(f"{name}: distance must be one of {DISTANCES}, got {distance!r}")
        if mode not in MODES:
            raise ValueError(f"{name}: mode must be one of {MODES}, got {mode!r}")
        check_real(name, "decay", decay, 0.0, 1.0)
        self.dim, self.codebook_size, self.heads, self.dim_head = dim, codebook_size, heads, dim // heads
        self.decay, self.commitment_weight, self.distance, self.ema = decay, commitment_weight, distance, ema
        self.dead_code_threshold, self.kmeans_init, self.kmeans_iters = (
            dead_code_threshold,
            kmeans_init,
            kmeans_iters,
        )
        self.channel_last, self.eps, self.mode = channel_last, eps, mode
        self.deterministic, self.check_finite = deterministic, check_finite
        self._codebook = _Codebook(heads, codebook_size, self.dim_head, ema, distance == "cosine")
        self.last_info: dict[str, Any] = {}

    @property
    def codebook(self) -> torch.Tensor:
        """(heads, K, dim_head); (K, dim) when heads = 1."""
        e = self._codebook.embed
        return e[0] if self.heads == 1 else e

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, heads={self.heads}, ema={self.ema}, "
                f"distance={self.distance!r}, channel_last={self.channel_last}")  # fmt: skip

    # ---- layout ---------------------------------------------------------------------------------

    def _to_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """x -> (heads, N, dim_head) rows, and the leading shape of the indices."""
        name = type(self).__name__
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"{name}: x must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
        if self.channel_last:
            if x.dim() < 2 or x.shape[-1] != self.dim:
                hint = (
                    " (channel-first input? pass channel_last=False)"
                    if x.dim() > 2 and x.shape[1] == self.dim
                    else ""
                )
                raise ValueError(f"{name}: x must be (..., dim={self.dim}), got shape {tuple(x.shape)}{hint}")
            lead = tuple(x.shape[:-1])
            rows = x.reshape(-1, self.dim)
        else:
            if x.dim() < 3 or x.shape[1] != self.dim:
                raise ValueError(
                    f"{name}: channel-first x must be (batch, dim={self.dim}, *spatial), got shape {tuple(x.shape)}"
                )
            lead = (x.shape[0], *x.shape[2:])
            rows = x.movedim(1, -1).reshape(-1, self.dim)
        if self.check_finite and x.device.type == "cpu" and x.numel() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name}: x contains NaN or inf")
        return rows.reshape(-1, self.heads, self.dim_head).transpose(0, 1), lead

    def _from_rows(self, rows: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
        """(heads, N, dim_head) -> x's layout."""
        out = rows.transpose(0, 1).reshape(*lead, self.dim)
        return out if self.channel_last else out.movedim(-1, 1)

    def _indices_out(self, idx: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
        idx = idx.transpose(0, 1).reshape(*lead, self.heads)
        return idx[..., 0] if self.heads == 1 else idx

    # ---- codebook maintenance (training only) ---------------------------------------------------

    @torch.no_grad()
    def _kmeans(self, xs: torch.Tensor) -> None:
        """k-means (Lloyd) per head on the first batch: assignments by vq_nearest, sums by vq_ema_update."""
        h, n, d = xs.shape
        k = self.codebook_size
        pick = torch.randint(0, n, (h, k), device=xs.device)
        means = torch.gather(xs, 1, pick[..., None].expand(h, k, d)).clone()
        counts = torch.zeros(h, k, device=xs.device)
        sums = torch.zeros(h, k, d, device=xs.device)
        for _ in range(max(self.kmeans_iters, 1)):
            idx = vq_nearest(xs, means, distance=self.distance, mode=self.mode).indices
            vq_ema_update(xs, idx, counts, sums, 0.0, deterministic=self.deterministic)
            new = sums / counts.clamp(min=1.0)[..., None]
            if self.distance == "cosine":
                new = _l2norm(new)
            means = torch.where(counts[..., None] == 0, means, new)
        cb = self._codebook
        cb.embed.data.copy_(means)
        cb.embed_avg.copy_(means * counts.clamp(min=1.0)[..., None])
        cb.cluster_size.copy_(counts.clamp(min=1.0))
        cb.initted.fill_(True)

    @torch.no_grad()
    def _ema_step(self, xs: torch.Tensor, idx: torch.Tensor) -> None:
        cb = self._codebook
        vq_ema_update(xs, idx, cb.cluster_size, cb.embed_avg, self.decay, deterministic=self.deterministic)
        if self.ema:
            embed = vq_codebook_from_ema(cb.cluster_size, cb.embed_avg, self.eps)
            cb.embed.copy_(_l2norm(embed) if self.distance == "cosine" else embed)

    @torch.no_grad()
    def _replace_dead(self, xs: torch.Tensor) -> torch.Tensor:
        """Codes with cluster_size < threshold take random rows of the batch (no host sync)."""
        cb = self._codebook
        h, n, d = xs.shape
        dead = cb.cluster_size < self.dead_code_threshold  # (h, K)
        pick = torch.randint(0, n, dead.shape, device=xs.device)
        sample = torch.gather(xs, 1, pick[..., None].expand(h, self.codebook_size, d))
        m = dead[..., None]
        cb.embed.data.copy_(torch.where(m, sample, cb.embed))
        cb.cluster_size.copy_(torch.where(dead, torch.full_like(cb.cluster_size, self.dead_code_threshold),
                                          cb.cluster_size))  # fmt: skip
        cb.embed_avg.copy_(torch.where(m, sample * self.dead_code_threshold, cb.embed_avg))
        return dead.sum()

    # ---- forward --------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, return_info: bool = False):
        xs, lead = self._to_rows(x)  # (h, N, dh) in x's dtype
        cb = self._codebook
        embed = cb.embed
        xf = xs.to(embed.dtype)
        if self.distance == "cosine":
            xf = _l2norm(xf)
        update = self.training and torch.is_grad_enabled()
        if update and self.kmeans_init and not bool(cb.initted) and xf.shape[1] > 0:
            self._kmeans(xf.detach())
        res = vq_nearest(
            xf.detach(), embed.detach(), distance=self.distance, mode=self.mode, return_counts=True
        )
        idx = res.indices
        q = torch.gather(embed, 1, idx[..., None].expand(-1, -1, self.dim_head))  # (h, N, dh)
        if self.distance == "cosine":
            q = _l2norm(q)
        commit = F.mse_loss(xf, q.detach()) if xf.numel() else xf.new_zeros(())
        loss = self.commitment_weight * commit
        if not self.ema and xf.numel():
            loss = loss + F.mse_loss(q, xf.detach())
        replaced = torch.zeros((), dtype=torch.int64, device=x.device)
        if update and xf.shape[1] > 0:
            self._ema_step(xf.detach(), idx)
            if self.dead_code_threshold > 0:
                replaced = self._replace_dead(xf.detach())
        out = xf + (q - xf).detach()
        quantized = self._from_rows(out.to(x.dtype), lead)
        counts = res.counts
        p = counts.float() / counts.sum(-1, keepdim=True).clamp(min=1)
        entropy = -(p * torch.log(p.clamp(min=1e-30))).sum(-1)
        self.last_info = {
            "perplexity": entropy.exp().mean(),
            "usage": (counts > 0).float().mean(),
            "dead_codes_replaced": replaced,
            "counts": counts,
        }
        indices = self._indices_out(idx, lead)
        if return_info:
            return quantized, indices, loss, self.last_info
        return quantized, indices, loss

    @torch.no_grad()
    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (...) (heads = 1) or (..., heads) -> codes (..., dim), always channel-last; -1 -> zeros."""
        name = type(self).__name__
        if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.is_complex():
            raise TypeError(
                f"{name}: indices must be an integer tensor, got {getattr(indices, 'dtype', type(indices))}"
            )
        if self.heads == 1:
            indices = indices[..., None]
        if indices.shape[-1] != self.heads:
            raise ValueError(f"{name}: indices must end in heads={self.heads}, got {tuple(indices.shape)}")
        k = self.codebook_size
        if indices.numel() and indices.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi = int(indices.min()), int(indices.max())
            if lo < -1 or hi >= k:
                raise ValueError(
                    f"{name}: indices must lie in [0, codebook_size) = [0, {k}) (or be -1: no code), "
                    f"got values in [{lo}, {hi}]"
                )
        elif indices.numel():  # on the device, without a host sync (as vq_nearest's finite check)
            torch._assert_async(
                (indices.min() >= -1) & (indices.max() < k),
                f"{name}: indices must lie in [0, codebook_size) = [0, {k}) (or be -1: no code)",
            )
        lead = indices.shape[:-1]
        flat = indices.reshape(-1, self.heads).transpose(0, 1).long()  # (h, N)
        valid = flat >= 0
        codes = torch.gather(
            self._codebook.embed, 1, flat.clamp(min=0)[..., None].expand(-1, -1, self.dim_head)
        )
        if self.distance == "cosine":
            codes = _l2norm(codes)
        codes = codes * valid[..., None].to(codes.dtype)
        return codes.transpose(0, 1).reshape(*lead, self.dim)

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """The quantised output for ``indices`` in the module's layout (channel-first: dim moved to axis 1)."""
        codes = self.get_codes_from_indices(indices)
        return codes if self.channel_last else codes.movedim(-1, 1)


class ResidualVQ(nn.Module):
    """Residual VQ: ``quantized, indices, commit_losses = rvq(x)``.

    residual_0 = x; q_i, idx_i = VQ_i(residual_i); residual_{i+1} = residual_i - q_i.detach();
    quantized = sum_i q_i (straight-through per stage). indices: (..., num_quantizers) (heads > 1:
    (..., heads, num_quantizers)); commit_losses: (num_quantizers,). Keyword arguments go to every
    :class:`VectorQuantize`. ``shared_codebook``: one codebook module for all stages.
    ``quantize_dropout`` (training): a random number of trailing stages (at least
    ``quantize_dropout_cutoff_index + 1`` stages kept) is skipped; their indices are -1, their losses 0.
    """

    def __init__(
        self,
        num_quantizers: int,
        dim: int,
        codebook_size: int,
        shared_codebook: bool = False,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        **kwargs: Any,
    ):
        super().__init__()
        if num_quantizers < 1:
            raise ValueError(f"ResidualVQ: num_quantizers must be >= 1, got {num_quantizers}")
        if not 0 <= quantize_dropout_cutoff_index < num_quantizers:
            raise ValueError(
                f"ResidualVQ: quantize_dropout_cutoff_index must be in [0, {num_quantizers}), "
                f"got {quantize_dropout_cutoff_index}"
            )
        self.num_quantizers = num_quantizers
        self.layers = nn.ModuleList(
            VectorQuantize(dim, codebook_size, **kwargs) for _ in range(num_quantizers)
        )
        if shared_codebook:
            for layer in self.layers[1:]:
                layer._codebook = self.layers[0]._codebook
        self.quantize_dropout, self.quantize_dropout_cutoff_index = (
            quantize_dropout,
            quantize_dropout_cutoff_index,
        )

    def forward(self, x: torch.Tensor, return_info: bool = False):
        last = self.num_quantizers - 1
        if self.quantize_dropout and self.training:
            last = int(torch.randint(self.quantize_dropout_cutoff_index, self.num_quantizers, ()).item())
        residual, quantized = x, None
        all_idx, losses, infos = [], [], []
        for i, layer in enumerate(self.layers):
            if i > last:
                all_idx.append(torch.full_like(all_idx[0], -1))
                losses.append(torch.zeros((), device=x.device))
                continue
            q, idx, loss, info = layer(residual, return_info=True)
            residual = residual - q.detach()
            quantized = q if quantized is None else quantized + q
            all_idx.append(idx)
            losses.append(loss.float())
            infos.append(info)
        out = (quantized, torch.stack(all_idx, dim=-1), torch.stack(losses))
        return (*out, infos) if return_info else out

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (..., num_quantizers) -> sum of the stages' codes, in the layers' layout (-1 -> zeros)."""
        if indices.shape[-1] != self.num_quantizers:
            raise ValueError(
                f"ResidualVQ: indices must end in num_quantizers={self.num_quantizers}, got {tuple(indices.shape)}"
            )
        out = sum(layer.get_output_from_indices(indices[..., i]) for i, layer in enumerate(self.layers))
        return out


# =====================================================================================================
# DALL-E dVAE: tokens by argmax, and the decoder's first 1x1 conv on a one-hot map as a gather
# =====================================================================================================


def dvae_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits: (batch, K, H, W) codebook logits of the dVAE encoder -> tokens (batch, H, W) int64."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4:
        raise ValueError(
            f"dvae_tokens: logits must be (batch, K, H, W), got {tuple(getattr(logits, 'shape', ()))}"
        )
    if logits.shape[1] == 0:
        raise ValueError("dvae_tokens: logits have K = 0 codes")
    return logits.argmax(dim=1)


def decode_tokens(
    tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.conv2d(one_hot(tokens, K).permute(0, 3, 1, 2).float(), weight, bias)`` as a gather.

    tokens: (batch, H, W) integer codes in [0, K); weight: (C_out, K, 1, 1); bias: (C_out,) or None.
    out[b, :, h, w] = weight[:, tokens[b, h, w], 0, 0] + bias -> (batch, C_out, H, W) in weight's dtype.
    O(B H W C_out) instead of the conv's O(B H W K C_out); the one-hot map is never built.
    """
    if weight.dim() != 4 or weight.shape[2:] != (1, 1):
        raise ValueError(f"decode_tokens: weight must be (C_out, K, 1, 1), got {tuple(weight.shape)}")
    if tokens.dim() != 3 or tokens.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8):
        raise ValueError(
            f"decode_tokens: tokens must be (batch, H, W) integers, got {tuple(tokens.shape)} {tokens.dtype}"
        )
    k = weight.shape[1]
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"decode_tokens: bias must be (C_out,) = ({weight.shape[0]},), got {tuple(bias.shape)}"
        )
    if tokens.device.type == "cpu" and tokens.numel():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= k:
            raise ValueError(
                f"decode_tokens: tokens must lie in [0, K) = [0, {k}), got values in [{lo}, {hi}]"
            )
    table = weight[:, :, 0, 0].t()  # (K, C_out)
    out = F.embedding(tokens.long(), table)  # (B, H, W, C_out)
    if bias is not None:
        out = out + bias
    return out.permute(0, 3, 1, 2)


class DVAEQuantizer(nn.Module):
    """DALL-E dVAE bottleneck at inference: ``tokens = q(logits)`` (argmax over K), ``q.one_hot(tokens)``
    (the (batch, K, H, W) float map the reference decoder takes)."""

    def __init__(self, vocab_size: int = 8192):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.dim() == 4 and logits.shape[1] != self.vocab_size:
            raise ValueError(
                f"DVAEQuantizer: logits must have K = {self.vocab_size} channels, got {logits.shape[1]}"
            )
        return dvae_tokens(logits)

    def one_hot(self, tokens: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return F.one_hot(tokens.long(), self.vocab_size).permute(0, 3, 1, 2).to(dtype)


class OneHotConv1x1AsGather(nn.Module):
    """Drop-in for the dVAE decoder's first ``nn.Conv2d(K, C_out, 1)`` fed with one-hot maps.

    forward(tokens (batch, H, W) int) -> (batch, C_out, H, W) by :func:`decode_tokens`. A floating-point
    input (batch, K, H, W) runs the ordinary conv (exact for any input), unless ``assume_one_hot=True``,
    which takes its argmax as the tokens (valid only for exact one-hot maps, as DALL-E's decoder gets).
    Parameters ``weight`` (C_out, K, 1, 1) and ``bias`` as the conv's (same state_dict keys).
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, assume_one_hot: bool = False):
        super().__init__()
        self.in_channels, self.out_channels, self.assume_one_hot = in_channels, out_channels, assume_one_hot
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1 / math.sqrt(in_channels), 1 / math.sqrt(in_channels))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, assume_one_hot: bool = False) -> OneHotConv1x1AsGather:
        """Shares ``conv``'s parameters. The conv must be 1x1, stride 1, no padding, dilation 1, groups 1."""
        if (
            not isinstance(conv, nn.Conv2d)
            or tuple(conv.kernel_size) != (1, 1)
            or tuple(conv.stride) != (1, 1)
            or tuple(conv.dilation) != (1, 1)
            or conv.groups != 1
            or conv.padding not in ((0, 0), "valid")
        ):
            raise ValueError(f"OneHotConv1x1AsGather.from_conv: needs a plain 1x1 Conv2d, got {conv!r}")
        m = cls(
            conv.in_channels, conv.out_channels, bias=conv.bias is not None, assume_one_hot=assume_one_hot
        )
        m.weight = conv.weight
        m.bias = conv.bias
        return m

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if not z.is_floating_point():
            return decode_tokens(z, self.weight, self.bias)
        if self.assume_one_hot:
            return decode_tokens(z.argmax(dim=1), self.weight, self.bias).to(z.dtype)
        return F.conv2d(z, self.weight, self.bias)

r"""GLaM: a decoder-only transformer LM whose every other feed-forward is a top-2 mixture of experts.

Du et al. 2022, "GLaM: Efficient Scaling of Language Models with Mixture-of-Experts" (arXiv:2112.06905);
the MoE layer is GShard's (Lepikhin et al. 2021). For tokens (B, S) int64 in [0, vocab_size)::

    x = tok_emb(tokens) [+ pos_emb(positions) when pos_emb == "learned"]
    for layer i in 0..n_layers-1 (pre-LN):
        x = x + wo(causal_attention(rope(wq(norm(x))), rope(wk(norm(x))), wv(norm(x))))
        x = x + ffn_i(norm(x))        ffn_i = Top2MoE if i % moe_every == moe_offset, else a dense FFN
    logits = norm(x) @ tok_emb.weight^T   (tie_embeddings; else a separate lm_head)

**Choices, and where they differ from the paper.** Positions: GLaM used Transformer-XL's per-layer relative
position bias; here the default is rotary embeddings (``pos_emb="rope"``, GPT-NeoX half rotation), also
relative, but without an additive score bias, so training / prefill run through the fused causal
``fastgen.scaled_dot_product_attention`` and decoding through ``fastgen.attention_decode`` unchanged.
``pos_emb="learned"`` is the GPT-style absolute table. ``norm``: "layernorm" or "rmsnorm". ``activation``
("gelu" default, "swiglu", "gelu_tanh", "relu", "silu") is used by the dense FFNs and the experts alike;
with "swiglu" the first matrix has 2 * d_ff columns, ``silu(h[:, :d_ff]) * h[:, d_ff:]``. GLaM's MoE
layers are at odd positions (``moe_every=2, moe_offset=1``). Attention heads may share K/V heads
(``n_kv_heads``, GQA); head_dim = d_model / n_heads.

**Router statistics and losses.** ``forward(tokens, targets)`` returns ``(logits, loss, info)`` with
``loss = CE(logits, targets) + sum over MoE layers of aux.loss`` (each layer's ``aux_loss_weight *
load_balancing + z_loss_weight * z_loss``) and ``info``: ``lm_loss``, ``aux_loss`` (the summed weighted
aux), ``z_loss`` (summed, unweighted), ``expert_counts`` (n_moe, E) assignments before dropping,
``dropped`` (n_moe,), ``capacity`` (per MoE layer, None = dropless), ``moe_layers`` (their indices),
``tokens``.

**Capacity.** Training uses ``capacity_factor`` (GShard slots per expert); eval (and :meth:`GLaM.generate`,
which switches the model to eval for the call) uses ``eval_capacity_factor``, default None = dropless. With
a capacity, a token's fate depends on the other tokens of the batch, so a cached one-token decode step and
a full recomputation could route differently; dropless inference keeps them equal and never loses a token.

**Generation** (:meth:`GLaM.generate`): a prefill pass over the prompt fills a (batch, max_len, kv_heads,
head_dim) K/V cache per layer (slice copies: every row appends at the same position) through the fused
causal attention, then one token per step: the copy + ``fastgen.attention_decode``. Sampling: temperature, top-k, top-p
with a seeded generator (``fastgen.models.common.sample_logits``). ``use_cache=False`` recomputes the whole
sequence each step (the oracle of the tests).

**Files.** :meth:`GLaM.save_pretrained` writes fastgen's format (``config.json`` + ``model.safetensors``,
shared parameters stored once and re-tied on load); :meth:`GLaM.from_pretrained` reads it back.

**Expert parallelism.** ``GLaM(cfg, process_group=pg)`` hands ``pg`` to every Top2MoE: each rank holds
E / world experts of each MoE layer and everything else replicated. Every rank must run each forward (and
each generate step: early stopping at ``eos_id`` is off under a group, all ranks run max_new_tokens steps).
Replicated parameters' gradients must be averaged across ranks: :func:`train_step` does it (and composes
expert with data parallelism over a 2-D mesh, ``dp_group``); a custom loop calls ``sync_moe_grads``.
:meth:`GLaM.load_dense_state_dict` loads a single-process state dict into a rank's shard.

``model.impl = "torch"`` runs the plain-PyTorch baseline of the benchmarks: ``F.scaled_dot_product_attention``,
an index-assignment KV cache, and a Python loop over experts (same weights and routing rule).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastgen
from fastgen.models import hub
from fastgen.models.common import (
    check_id_range,
    check_integer_ids,
    check_sampling_args,
    is_finite_real,
    is_int,
    sample_logits,
)
from fastgen.nn.moe import MoEAux, Top2MoE, sync_moe_grads
from fastgen.ops.grouped_mm import activation_ref

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is a dependency, but keep generation working without it
    tqdm = None

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "swiglu")
NORMS = ("layernorm", "rmsnorm")
POS_EMBS = ("rope", "learned")
IMPLS = ("fastgen", "torch")
IGNORE_INDEX = -100


def _err(msg: str) -> ValueError:
    return ValueError(f"fastgen.models.glam: {msg}")


# =====================================================================================================
# Config and presets
# =====================================================================================================


@dataclass
class GLaMConfig:
    """GLaM hyper-parameters. ``expert_d_ff`` defaults to ``d_ff``; ``n_kv_heads`` to ``n_heads``."""

    vocab_size: int = 32000
    max_seq_len: int = 1024
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None
    d_ff: int = 3072
    num_experts: int = 64
    expert_d_ff: int | None = None
    moe_every: int = 2
    moe_offset: int = 1  # layer i is MoE iff i % moe_every == moe_offset (GLaM: odd layers)
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    pos_emb: str = "rope"
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    bias: bool = False  # biases of the attention / dense FFN / expert linear maps
    capacity_factor: float | None = 1.25  # training
    eval_capacity_factor: float | None = None  # eval and generation: dropless
    min_capacity: int = 4
    second_expert_policy: str = "all"
    second_threshold: float = 0.2
    jitter_eps: float = 0.0
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.0
    dropped_tokens: str = "zero"

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.expert_d_ff is None:
            self.expert_d_ff = self.d_ff
        if min(self.vocab_size, self.max_seq_len, self.d_model, self.n_layers, self.n_heads, self.d_ff) < 1:
            raise _err(f"sizes must be positive: {self}")
        if self.d_model % self.n_heads:
            raise _err(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise _err(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise _err(f"rotary embeddings need an even head_dim, got {self.head_dim}")
        for name, value, allowed in (("activation", self.activation, ACTIVATIONS), ("norm", self.norm, NORMS),
                                     ("pos_emb", self.pos_emb, POS_EMBS)):  # fmt: skip
            if value not in allowed:
                raise _err(f"{name} must be one of {allowed}, got {value!r}")
        if self.moe_every < 1 or not 0 <= self.moe_offset < self.moe_every:
            raise _err(f"need moe_every >= 1 and 0 <= moe_offset < moe_every, got {self.moe_every}, "
                       f"{self.moe_offset}")  # fmt: skip
        if self.moe_layers() and self.num_experts < 2:
            raise _err(f"top-2 routing needs num_experts >= 2, got {self.num_experts}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def is_moe_layer(self, i: int) -> bool:
        return i % self.moe_every == self.moe_offset

    def moe_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]

    def param_count(self) -> dict[str, int]:
        """Analytic parameter counts of the whole (unsharded) model.

        total: every parameter; activated: those one token uses (the router and 2 of E experts per MoE
        layer instead of all E); activated_non_embedding: the same without the embedding tables and the
        untied head (the paper's "activated" figures); experts: all expert weights; embedding: token
        (+ learned position) tables.
        """
        d, hd, kvh, bias = self.d_model, self.head_dim, self.n_kv_heads, int(self.bias)
        norm = 2 * d if self.norm == "layernorm" else d
        attn = d * self.n_heads * hd + 2 * d * kvh * hd + self.n_heads * hd * d
        attn += bias * (self.n_heads * hd + 2 * kvh * hd + d)

        def ffn(f: int) -> int:
            f_in = 2 * f if self.activation == "swiglu" else f
            return d * f_in + f * d + bias * (f_in + d)

        embedding = self.vocab_size * d + (self.max_seq_len * d if self.pos_emb == "learned" else 0)
        head = 0 if self.tie_embeddings else self.vocab_size * d
        n_moe = len(self.moe_layers())
        n_dense = self.n_layers - n_moe
        base = embedding + head + norm + self.n_layers * (attn + 2 * norm) + n_dense * ffn(self.d_ff)
        router = n_moe * self.num_experts * d
        experts = n_moe * self.num_experts * ffn(self.expert_d_ff)
        activated = base + router + n_moe * 2 * ffn(self.expert_d_ff)
        return {"total": base + router + experts, "activated": activated,
                "activated_non_embedding": activated - embedding - head, "experts": experts,
                "embedding": embedding}  # fmt: skip


def _paper(d: int, layers: int, heads: int) -> GLaMConfig:
    """The paper's Table 4 sizes (vocab 256K SentencePiece, context 1024, 64 experts, d_ff = 4 d)."""
    return GLaMConfig(vocab_size=256000, max_seq_len=1024, d_model=d, n_layers=layers, n_heads=heads,
                      d_ff=4 * d, num_experts=64)  # fmt: skip


_TINY = GLaMConfig(vocab_size=97, max_seq_len=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, num_experts=4,
                   expert_d_ff=48)  # fmt: skip

PRESETS: dict[str, GLaMConfig] = {
    # the paper's family (total / activated parameters per token in the paper): 1.9B / 0.1B,
    # 27B / 1.7B, 143B / 8B; head_dim = d_model / n_heads here
    "glam-0.1b-64e": _paper(768, 12, 12),
    "glam-1.7b-64e": _paper(2048, 24, 16),
    "glam-8b-64e": _paper(4096, 32, 32),
    # benchmark size: fits one GPU in bf16 with Adam, 8 experts, a 32K vocab
    "glam-small-8e": GLaMConfig(
        vocab_size=32000, max_seq_len=1024, d_model=1024, n_layers=8, n_heads=16, d_ff=4096, num_experts=8
    ),
    # tests / CPU examples
    "glam-tiny": _TINY,
    "glam-tiny-8e": replace(
        _TINY,
        n_layers=4,
        n_kv_heads=2,
        num_experts=8,
        activation="swiglu",
        norm="rmsnorm",
        pos_emb="learned",
        tie_embeddings=False,
        bias=True,
    ),
}


def from_name(name: str, **overrides: Any) -> GLaMConfig:
    """A copy of ``PRESETS[name]`` with ``overrides`` applied: ``from_name("glam-tiny", num_experts=8)``."""
    if name not in PRESETS:
        raise _err(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return replace(copy.deepcopy(PRESETS[name]), **overrides)


# =====================================================================================================
# Layers
# =====================================================================================================


def _rope_tables(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: (S, head_dim / 2) float32 for positions (S,)."""
    inv = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    ang = positions.float()[:, None] * inv[None]
    return ang.cos(), ang.sin()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, S, H, D); rotate (x[:D/2], x[D/2:]) pairs by the position angle (GPT-NeoX), in float32."""
    h = x.shape[-1] // 2
    x1, x2 = x.float().split(h, dim=-1)
    c, s = cos[:, None], sin[:, None]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def _sdpa(q, k, v, plain: bool, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, s, H, D) in and out; mask None: top-left causal, else the bool mask (s, sk)."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    fn = F.scaled_dot_product_attention if plain else fastgen.scaled_dot_product_attention
    gqa = qt.shape[1] != kt.shape[1]
    if mask is None:
        o = fn(qt, kt, vt, is_causal=True, enable_gqa=gqa)
    else:
        o = fn(qt, kt, vt, attn_mask=mask, enable_gqa=gqa)
    return o.transpose(1, 2)


class _Attention(nn.Module):
    def __init__(self, cfg: GLaMConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.bias)
        self.wkv = nn.Linear(cfg.d_model, 2 * cfg.n_kv_heads * cfg.head_dim, bias=cfg.bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.bias)

    def forward(self, x, rope, cache, pos: int, plain: bool) -> torch.Tensor:
        """x: (B, s, d) at positions pos..pos+s-1; cache: None or (k, v) (B, max_len, kv_heads, D) holding
        positions < pos (the new keys / values are written into it)."""
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_heads, self.head_dim)
        k, v = self.wkv(x).view(b, s, 2, self.n_kv_heads, self.head_dim).unbind(2)
        if rope is not None:
            q, k = _apply_rope(q, *rope), _apply_rope(k, *rope)
        if cache is None:
            o = _sdpa(q, k, v, plain)
        else:
            kc, vc = cache
            end = pos + s
            # every row is at the same position: a slice copy is the append on any device
            # (fastgen.kv_cache_append is for ragged lengths)
            kc[:, pos:end], vc[:, pos:end] = k, v
            if pos == 0:  # prefill: the prompt attends to itself, as in the full forward
                o = _sdpa(q, k, v, plain)
            elif not plain:
                o = fastgen.attention_decode(
                    q, kc, vc, torch.full((b,), end, dtype=torch.int32, device=x.device)
                )
            else:
                rows = torch.arange(pos, end, device=x.device)[:, None]
                o = _sdpa(q, kc[:, :end], vc[:, :end], plain, torch.arange(end, device=x.device) <= rows)
        return self.wo(o.reshape(b, s, self.n_heads * self.head_dim))


class _FFN(nn.Module):
    def __init__(self, cfg: GLaMConfig):
        super().__init__()
        self.activation = cfg.activation
        f_in = 2 * cfg.d_ff if cfg.activation == "swiglu" else cfg.d_ff
        self.w1 = nn.Linear(cfg.d_model, f_in, bias=cfg.bias)
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(activation_ref(self.w1(x), self.activation))


def _moe_loop(moe: Top2MoE, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
    """The naive MoE baseline: the layer's own gating, then a Python loop over experts, each on the rows
    routed to it (index_select / index_add). Same function as ``moe(x)`` (single process only)."""
    if moe.world > 1:
        raise _err("the expert-loop baseline (impl='torch') does not support expert parallelism")
    x2 = x.reshape(-1, moe.d_model)
    g = moe.gate(x2)
    kept = g.routing.dest >= 0
    y = torch.zeros_like(x2)
    for e in range(moe.num_experts):
        tok, slot = torch.nonzero((g.expert_idx == e) & kept, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = x2.index_select(0, tok) @ moe.w1[e]
        h = h + moe.b1[e] if moe.b1 is not None else h
        o = activation_ref(h, moe.activation) @ moe.w2[e]
        o = o + moe.b2[e] if moe.b2 is not None else o
        y = y.index_add(0, tok, o * g.gates[tok, slot, None].to(o.dtype))
    if moe.dropped_tokens == "residual":
        y = torch.where(kept.any(1, keepdim=True), y, x2)
    loss = moe.aux_loss_weight * g.aux_loss + moe.z_loss_weight * g.z_loss
    return y.reshape(x.shape), MoEAux(loss, g.aux_loss, g.z_loss, g.expert_counts, g.dropped, g.capacity,
                                      x2.shape[0])  # fmt: skip


def _norm(cfg: GLaMConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


class _Block(nn.Module):
    def __init__(self, cfg: GLaMConfig, moe: bool, process_group: Any):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = _norm(cfg), _Attention(cfg), _norm(cfg)
        self.capacity = (cfg.capacity_factor, cfg.eval_capacity_factor)
        self.mlp = None if moe else _FFN(cfg)
        self.moe = None
        if moe:
            self.moe = Top2MoE(cfg.d_model, cfg.expert_d_ff, cfg.num_experts, cfg.capacity_factor, cfg.activation,
                               cfg.second_expert_policy, cfg.jitter_eps, cfg.aux_loss_weight, cfg.z_loss_weight,
                               min_capacity=cfg.min_capacity, second_threshold=cfg.second_threshold,
                               dropped_tokens=cfg.dropped_tokens, bias=cfg.bias,
                               process_group=process_group)  # fmt: skip

    def forward(self, x, rope, cache, pos: int, plain: bool) -> tuple[torch.Tensor, MoEAux | None]:
        x = x + self.attn(self.ln_1(x), rope, cache, pos, plain)
        h = self.ln_2(x)
        if self.moe is None:
            return x + self.mlp(h), None
        self.moe.capacity_factor = self.capacity[0] if self.training else self.capacity[1]
        y, aux = _moe_loop(self.moe, h) if plain else self.moe(h)
        return x + y, aux


# =====================================================================================================
# Model
# =====================================================================================================


def _check_tokens(name: str, t: torch.Tensor, vocab: int, max_len: int) -> None:
    check_integer_ids(name, t, _err)
    if t.dim() != 2 or t.shape[1] == 0:
        raise _err(f"{name} must be (batch, seq) with seq >= 1, got shape {tuple(t.shape)}")
    if t.shape[1] > max_len:
        raise _err(f"{name} has {t.shape[1]} tokens, more than max_seq_len = {max_len}")
    check_id_range(name, t, vocab, _err)


class GLaM(nn.Module):
    """The GLaM language model (see the module docstring). ``process_group``: expert parallelism."""

    def __init__(self, config: GLaMConfig, process_group: Any = None):
        super().__init__()
        self.config = cfg = config
        self.process_group = process_group
        self.impl = "fastgen"
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos_emb == "learned" else None
        self.blocks = nn.ModuleList(
            _Block(cfg, cfg.is_moe_layer(i), process_group) for i in range(cfg.n_layers)
        )
        self.ln_f = _norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """N(0, 0.02) everywhere, zero biases; residual output maps (wo, w2) scaled by 1/sqrt(2 n_layers)."""
        resid = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if "ln_" in name:
                continue
            if name.endswith(("bias", "b1", "b2")):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=resid if name.endswith(("wo.weight", "w2.weight", "moe.w2")) else 0.02)

    def param_count(self) -> dict[str, int]:
        """``config.param_count()``: the whole model's counts, also on an expert-parallel shard."""
        return self.config.param_count()

    def moe_layers(self) -> list[Top2MoE]:
        return [b.moe for b in self.blocks if b.moe is not None]

    # ---- forward --------------------------------------------------------------------------------------

    def _trunk(self, tokens: torch.Tensor, caches=None, pos: int = 0) -> tuple[torch.Tensor, list[MoEAux]]:
        cfg = self.config
        if self.impl not in IMPLS:
            raise _err(f"impl must be one of {IMPLS}, got {self.impl!r}")
        plain = self.impl == "torch"
        positions = torch.arange(pos, pos + tokens.shape[1], device=tokens.device)
        x = self.tok_emb(tokens)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        rope = _rope_tables(positions, cfg.head_dim, cfg.rope_base) if cfg.pos_emb == "rope" else None
        auxes = []
        for i, blk in enumerate(self.blocks):
            x, aux = blk(x, rope, None if caches is None else caches[i], pos, plain)
            if aux is not None:
                auxes.append(aux)
        return self.ln_f(x), auxes

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.tok_emb.weight if self.lm_head is None else self.lm_head.weight)

    def forward(
        self, tokens: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """tokens: (B, S <= max_seq_len) int in [0, vocab); targets: (B, S) int (IGNORE_INDEX = -100 skips a
        position) or None. Returns logits (B, S, vocab), loss (lm + summed MoE aux losses; None without
        targets) and the info dict (see the module docstring)."""
        cfg = self.config
        _check_tokens("tokens", tokens, cfg.vocab_size, cfg.max_seq_len)
        if targets is not None:
            check_integer_ids("targets", targets, _err)  # float targets would be truncated by .long()
            if targets.shape != tokens.shape:
                raise _err(f"targets must have the shape of tokens {tuple(tokens.shape)}, got "
                           f"{tuple(targets.shape)}")  # fmt: skip
            bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= cfg.vocab_size))
            if not torch.compiler.is_compiling() and bool(bad.any()):
                raise _err(f"targets must lie in [0, {cfg.vocab_size}) or be {IGNORE_INDEX}")
        h, auxes = self._trunk(tokens)
        logits = self._logits(h)
        zero = logits.new_zeros((), dtype=torch.float32)
        aux_loss = sum((a.loss for a in auxes), zero)
        info: dict[str, Any] = {
            "aux_loss": aux_loss,
            "z_loss": sum((a.z_loss for a in auxes), zero),
            "expert_counts": torch.stack([a.expert_counts for a in auxes]) if auxes else None,
            "dropped": torch.stack([a.dropped for a in auxes]) if auxes else None,
            "capacity": [a.capacity for a in auxes],
            "moe_layers": cfg.moe_layers(),
            "tokens": tokens.numel(),
            "lm_loss": None,
        }
        loss = None
        if targets is not None:
            lm = F.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten().long(), ignore_index=IGNORE_INDEX
            )
            info["lm_loss"] = lm
            loss = lm + aux_loss
        return logits, loss, info

    # ---- generation -----------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        eos_id: int | None = None,
        progress: bool = False,
        use_cache: bool = True,
        output_logits: bool = False,
    ):
        """Continue each prompt row: (B, P) int -> (B, P + n) int64, n <= max_new_tokens.

        temperature 0 is greedy; top_k / top_p filter before the draw; seed: a torch.Generator seeded with
        it draws every sample (None: the global generator). eos_id: a row that produced it keeps producing
        it, and generation stops once every row has (single process only). The model runs in eval mode
        for the call (MoE: ``eval_capacity_factor``, dropless by default). use_cache=False recomputes the
        whole sequence every step. output_logits: also return the float32 logits of every step (B, n, V).
        """
        cfg = self.config
        _check_tokens("prompt", prompt, cfg.vocab_size, cfg.max_seq_len)
        if not is_int(max_new_tokens) or max_new_tokens < 0:
            raise _err(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        b, p = prompt.shape
        total = p + max_new_tokens
        if total > cfg.max_seq_len:
            raise _err(f"prompt ({p}) + max_new_tokens ({max_new_tokens}) = {total} > max_seq_len "
                       f"({cfg.max_seq_len})")  # fmt: skip
        check_sampling_args(temperature, top_k, top_p, _err)
        if eos_id is not None and not (is_int(eos_id) and 0 <= eos_id < cfg.vocab_size):
            raise _err(f"eos_id must be None or an int in [0, {cfg.vocab_size}), got {eos_id!r}")
        dev = prompt.device
        gen = None
        if seed is not None:
            gen = torch.Generator(device=dev)
            gen.manual_seed(seed)
        was_training = self.training
        self.eval()
        try:
            out = torch.empty(b, total, dtype=torch.long, device=dev)
            out[:, :p] = prompt
            caches = None
            if use_cache:
                dt = self.tok_emb.weight.dtype
                shape = (b, total, cfg.n_kv_heads, cfg.head_dim)
                caches = [(torch.zeros(shape, dtype=dt, device=dev), torch.zeros(shape, dtype=dt, device=dev))
                          for _ in self.blocks]  # fmt: skip
            done = torch.zeros(b, dtype=torch.bool, device=dev)
            step_logits = []
            cur, new = p, out[:, :p]
            steps = range(max_new_tokens)
            if progress and tqdm is not None:
                steps = tqdm(steps, desc="GLaM tokens", leave=False)
            for _ in steps:
                if use_cache:
                    h, _ = self._trunk(new, caches, cur - new.shape[1])
                else:
                    h, _ = self._trunk(out[:, :cur])
                logits = self._logits(h[:, -1]).float()
                if output_logits:
                    step_logits.append(logits)
                nxt = sample_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
                if eos_id is not None:
                    nxt = torch.where(done, eos_id, nxt)
                    done |= nxt == eos_id
                out[:, cur] = nxt
                cur += 1
                new = out[:, cur - 1 : cur]
                if eos_id is not None and self.process_group is None and bool(done.all()):
                    break
        finally:
            self.train(was_training)
        out = out[:, :cur]
        if output_logits:
            return out, torch.stack(step_logits, 1) if step_logits else out.new_zeros(
                b, 0, cfg.vocab_size
            ).float()
        return out

    # ---- state ----------------------------------------------------------------------------------------

    def load_dense_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a single-process GLaM state dict; an expert-parallel rank keeps its experts' slices."""
        local = dict(state)
        for i, blk in enumerate(self.blocks):
            if blk.moe is None:
                continue
            lo, hi = blk.moe.first_expert, blk.moe.first_expert + blk.moe.num_local_experts
            for n in ("w1", "w2", "b1", "b2"):
                key = f"blocks.{i}.moe.{n}"
                if key in local:
                    local[key] = local[key][lo:hi]
        self.load_state_dict(local)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write fastgen's format into ``directory``: ``config.json`` (model_type "glam", the
        :class:`GLaMConfig`) and ``model.safetensors`` (the state_dict).

        Parameters that share one tensor are stored once (safetensors refuses aliases): the copies are
        listed in config.json as ``"tied": {name: name it shares with}`` and re-tied by
        :meth:`from_pretrained`. With ``tie_embeddings=True`` (the default) the output layer is
        ``tok_emb.weight`` itself and nothing is duplicated; a hand-tied ``lm_head.weight =
        tok_emb.weight`` is recorded this way. An expert-parallel shard (``process_group``) holds only its
        experts and is refused: save from a single-process model.
        """
        if self.process_group is not None:
            raise ValueError(
                "GLaM.save_pretrained: this model is an expert-parallel shard (process_group is set) and holds "
                "only its own experts; save a single-process GLaM holding every expert"
            )
        state, tied, seen = {}, {}, {}
        for name, t in self.state_dict(keep_vars=True).items():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if t.numel() and key in seen:
                tied[name] = seen[key]
                continue
            seen.setdefault(key, name)
            state[name] = t.detach()
        return hub.save_fastgen_dir(
            directory, "glam", self.config, state, extra={"tied": tied} if tied else None
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, process_group: Any = None, **overrides) -> GLaM:
        """Load a directory written by :meth:`save_pretrained` (GLaM's weights were never released, so
        fastgen's format is the only one), re-tying the shared parameters it lists.

        ``process_group``: build an expert-parallel shard that keeps its own experts' slices
        (:meth:`load_dense_state_dict`). ``overrides``: :class:`GLaMConfig` fields applied to the saved
        config, e.g. ``eval_capacity_factor=2.0``, ``capacity_factor``, ``jitter_eps``,
        ``aux_loss_weight``; fields that change parameter shapes make the load fail.
        """
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(
                f"GLaM.from_pretrained: path must be a str or os.PathLike, got {type(path).__name__}"
            )
        meta, state = hub.load_fastgen_dir(path, "glam")
        cfg = hub.config_with_overrides(
            hub.config_from_dict(GLaMConfig, meta["config"]), overrides, "GLaM.from_pretrained"
        )
        tied = meta.get("tied") or {}
        for name, source in tied.items():
            if source not in state:
                raise ValueError(
                    f"GLaM.from_pretrained: {path}: {name} is tied to {source}, which is not stored"
                )
            state[name] = state[source]
        model = cls(cfg, process_group=process_group)
        model.load_dense_state_dict(state)
        for name, source in tied.items():
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, model.get_parameter(source))
        return model


def train_step(
    model: GLaM,
    batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    max_grad_norm: float | None = None,
    dp_group: Any = None,
) -> dict[str, float]:
    """One optimizer step on ``batch``: (B, S + 1) tokens (inputs batch[:, :-1], targets batch[:, 1:]) or a
    (tokens, targets) pair. Returns loss, lm_loss, aux_loss and dropped (assignments, all MoE layers) as
    this rank's Python numbers.

    Distributed (every rank its own batch): under expert parallelism (``model.process_group``) and / or
    data parallelism over ``dp_group`` (a 2-D mesh: ``fastgen.train.distributed.moe_mesh``), gradients
    are averaged (:func:`fastgen.nn.moe.sync_moe_grads`) before clipping, so the step is the
    single-process step on the mean of the ranks' losses. Do not wrap the model in DDP as well."""
    # a NaN max norm would scale every gradient to NaN without an error
    if max_grad_norm is not None and not (is_finite_real(max_grad_norm) and max_grad_norm > 0):
        raise _err(f"max_grad_norm must be None or a positive finite number, got {max_grad_norm!r}")
    tokens, targets = (batch[:, :-1], batch[:, 1:]) if isinstance(batch, torch.Tensor) else batch
    model.train()
    optimizer.zero_grad(set_to_none=True)
    _, loss, info = model(tokens, targets)
    loss.backward()
    if model.process_group is not None or dp_group is not None:
        sync_moe_grads(model, model.process_group, dp_group)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    dropped = 0 if info["dropped"] is None else int(info["dropped"].sum())
    return {"loss": float(loss.detach()), "lm_loss": float(info["lm_loss"].detach()),
            "aux_loss": float(info["aux_loss"].detach()),
            "dropped": dropped}  # fmt: skip

r"""``fastgen.nn.MultiheadAttention``: a drop-in for ``torch.nn.MultiheadAttention`` over the fused op.

Same constructor, parameter names, state_dict keys and initialisation as the torch module, so
``fastgen_mha.load_state_dict(torch_mha.state_dict())`` works as is (and the other way round), and the
same ``forward`` signature and return values ``(output, weights or None)``.

With ``E = embed_dim``, ``H = num_heads``, ``D = E / H``, batch ``N``, target length ``L``, source
length ``S`` and, per head, ``q = query W_q^T + b_q`` (likewise ``k``, ``v``)::

    out_h   = softmax(q_h k_h^T / sqrt(D) + bias, masked) v_h      (dropout on the probabilities)
    output  = concat_h(out_h) W_out^T + b_out

Two paths:

* ``need_weights=False`` (what ``nn.TransformerEncoderLayer`` asks for): the fused
  :func:`fastgen.ops.attention.flash_attention`, never materialising the (L, S) scores. A
  ``key_padding_mask`` becomes its bool ``mask`` (N, 1, 1, S), a 2-D / 3-D ``attn_mask`` a
  (1, 1, L, S) / (N, H, L, S) ``mask`` (bool) or ``bias`` (float, gets a gradient).
* ``need_weights=True`` (torch's default): the weights have to be returned, so this path computes
  ``softmax(...)`` explicitly, as torch does (O(L * S) memory per head), and the output from those
  same (dropped-out) weights; it draws dropout from torch's generator exactly as torch does, so it
  matches torch bit for bit in training too under the same seed. Pass ``need_weights=False`` for speed.

One deliberate difference from torch: a query row with every key masked gives an output of zeros (and
weights of zeros), where torch gives NaN; gradients stay finite.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.init import constant_, xavier_normal_, xavier_uniform_
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from fastgen.ops.attention import flash_attention

__all__ = ["MultiheadAttention"]


def _err(msg: str) -> ValueError:
    return ValueError(f"fastgen.nn.MultiheadAttention: {msg}")


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


class MultiheadAttention(nn.Module):
    r"""Multi-head attention (Vaswani et al. 2017) with torch's API, served by fastgen's fused attention.

    Args (as ``torch.nn.MultiheadAttention``): embed_dim ``E``, num_heads ``H`` (``E % H == 0``), dropout
    (on the attention probabilities, training only), bias (in- and out-projection biases), add_bias_kv
    (learned key/value appended to the source sequence), add_zero_attn (a zero key/value appended after
    that), kdim / vdim (key / value feature sizes; separate ``q/k/v_proj_weight`` when they differ from
    E), batch_first, device, dtype.

    Shapes: query (N, L, E) if batch_first else (L, N, E), or (L, E) unbatched; key (.., S, kdim),
    value (.., S, vdim) likewise. Returns output in query's layout and, when ``need_weights``, weights
    (N, L, S) averaged over heads or (N, H, L, S) per head (unbatched: without N).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if embed_dim <= 0 or num_heads <= 0:
            raise _err(
                f"embed_dim and num_heads must be greater than 0, got embed_dim={embed_dim} and "
                f"num_heads={num_heads} instead"
            )
        if embed_dim % num_heads != 0:
            raise _err(
                f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim}, num_heads={num_heads}"
            )
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        if not self._qkv_same_embed_dim:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory_kwargs))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **factory_kwargs))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **factory_kwargs))
            self.register_parameter("in_proj_weight", None)
        else:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory_kwargs))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory_kwargs))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory_kwargs)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **factory_kwargs))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **factory_kwargs))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # torch's initialisation, call for call (same RNG draws in the same order)
        if self._qkv_same_embed_dim:
            xavier_uniform_(self.in_proj_weight)
        else:
            xavier_uniform_(self.q_proj_weight)
            xavier_uniform_(self.k_proj_weight)
            xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            constant_(self.in_proj_bias, 0.0)
            constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            xavier_normal_(self.bias_v)

    def __setstate__(self, state):
        # old (torch 1.1) MultiheadAttention pickles have no _qkv_same_embed_dim
        state.setdefault("_qkv_same_embed_dim", True)
        super().__setstate__(state)

    def extra_repr(self) -> str:
        s = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"
        if not self._qkv_same_embed_dim:
            s += f", kdim={self.kdim}, vdim={self.vdim}"
        if self.dropout:
            s += f", dropout={self.dropout}"
        return s + f", batch_first={self.batch_first}"

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> MultiheadAttention:
        """A fastgen module equal to ``mha``: same config, device, dtype, training mode, parameter values
        (copied: the two modules do not share storage) and ``requires_grad`` flags."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"from_torch expects a torch.nn.MultiheadAttention, got {type(mha).__name__}")
        first = next(mha.parameters())
        new = cls(
            mha.embed_dim,
            mha.num_heads,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            add_bias_kv=mha.bias_k is not None,
            add_zero_attn=mha.add_zero_attn,
            kdim=mha.kdim,
            vdim=mha.vdim,
            batch_first=mha.batch_first,
            device="meta",  # no initialisation work, no RNG draws: the values come from mha
            dtype=first.dtype,
        )
        new.to_empty(device=first.device)
        new.load_state_dict(mha.state_dict())
        src = dict(mha.named_parameters())
        for name, p in new.named_parameters():
            p.requires_grad_(src[name].requires_grad)
        new.train(mha.training)
        return new

    def merge_masks(
        self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, query: torch.Tensor
    ) -> tuple[torch.Tensor | None, int | None]:
        """torch's helper, kept for code that calls it on ``layer.self_attn`` (torch's layer fast path)."""
        return nn.MultiheadAttention.merge_masks(self, attn_mask, key_padding_mask, query)

    # ------------------------------------------------------------------------------------------------
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """query (N, L, E) / (L, N, E) / (L, E); key (.., S, kdim); value (.., S, vdim).

        key_padding_mask: (N, S) (unbatched: (S,)); bool True = ignore that key, or float (added).
        attn_mask: (L, S) or (N * H, L, S) (unbatched: (H, L, S)); bool True = not allowed, or float.
        is_causal: a hint that attn_mask is the causal mask (needs attn_mask, as in torch); when there is
        no key_padding_mask and ``need_weights=False`` the fused kernel applies causality itself.
        Returns (output, weights) with weights None unless need_weights.
        """
        batched = self._check_shapes(query, key, value, key_padding_mask, attn_mask)
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # now batch first: query (N, L, E), key (N, S, kdim), value (N, S, vdim)
        n, tgt, e = query.shape
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask."
            )
        # torch's rule: the hint replaces the mask only when nothing else needs the explicit mask
        causal = bool(is_causal) and key_padding_mask is None and not need_weights
        if causal:
            attn_mask = None

        q, k, v = self._in_projection(query, key, value)
        n_extra = 0
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(n, 1, e)], 1)
            v = torch.cat([v, self.bias_v.expand(n, 1, e)], 1)
            n_extra += 1
        elif self.bias_k is not None or self.bias_v is not None:
            raise _err("bias_k and bias_v must both be set or both be None")
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(n, 1, e)], 1)
            v = torch.cat([v, v.new_zeros(n, 1, e)], 1)
            n_extra += 1
        src = k.shape[1]
        h, d = self.num_heads, self.head_dim
        q = q.reshape(n, tgt, h, d).transpose(1, 2)  # (N, H, L, D), memory (N, L, H, D)
        k = k.reshape(n, src, h, d).transpose(1, 2)
        v = v.reshape(n, src, h, d).transpose(1, 2)
        bias, mask = self._masks(key_padding_mask, attn_mask, n, tgt, src, n_extra, query)
        dropout_p = self.dropout if self.training else 0.0

        weights = None
        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(d))
            s = q_scaled @ k.transpose(-1, -2)  # (N, H, L, S)
            if bias is not None:
                s = s + bias
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            # softmax that gives 0 (not NaN) for a row with no visible key, with finite gradients
            row_max = s.detach().amax(-1, keepdim=True) if src else s.new_zeros((*s.shape[:-1], 1))
            row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
            ex = torch.exp(s - row_max)
            denom = ex.sum(-1, keepdim=True)
            weights = ex / torch.where(denom == 0, torch.ones_like(denom), denom)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            attn = weights @ v  # (N, H, L, D)
        else:
            attn = flash_attention(q, k, v, bias=bias, mask=mask, causal=causal, dropout_p=dropout_p)
            # (N, H, L, D) view of (N, L, H, D) memory

        if batched and not self.batch_first:
            out = F.linear(
                attn.permute(2, 0, 1, 3).reshape(tgt, n, e), self.out_proj.weight, self.out_proj.bias
            )
        else:
            out = F.linear(attn.transpose(1, 2).reshape(n, tgt, e), self.out_proj.weight, self.out_proj.bias)
            if not batched:
                out = out.squeeze(0)
        if weights is not None:
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        return out, weights

    # ------------------------------------------------------------------------------------------------
    def _in_projection(self, query, key, value):
        e = self.embed_dim
        if self._qkv_same_embed_dim:
            w, b = self.in_proj_weight, self.in_proj_bias
            if query is key and key is value:  # self-attention: one GEMM
                return F.linear(query, w, b).split(e, dim=-1)
            wq, wk, wv = w.split(e)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
            b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.split(e)
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def _check_shapes(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise _err(f"{name} must be a tensor, got {type(t).__name__}")
            if t.is_nested:
                raise _err(f"{name} is a NestedTensor: not supported (pad it and pass a key_padding_mask)")
        if query.dim() not in (2, 3):
            raise _err(
                f"query should be unbatched 2D or batched 3D tensor but received {query.dim()}-D query"
            )
        batched = query.dim() == 3
        kind = "batched (3-D)" if batched else "unbatched (2-D)"
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise _err(
                f"for {kind} query, expected key and value to be {query.dim()}-D, got key {_shape(key)} and "
                f"value {_shape(value)}"
            )
        bdim = 0 if (self.batch_first or not batched) else 1
        sdim = 1 if (self.batch_first and batched) else 0
        if batched and not (query.shape[bdim] == key.shape[bdim] == value.shape[bdim]):
            raise _err(
                f"batch sizes differ: query {_shape(query)}, key {_shape(key)}, value {_shape(value)} "
                f"(batch_first={self.batch_first})"
            )
        if key.shape[sdim] != value.shape[sdim]:
            raise _err(f"key {_shape(key)} and value {_shape(value)} differ in sequence length")
        pdt = self.out_proj.weight.dtype
        for name, t in (("query", query), ("key", key), ("value", value)):
            if t.dtype != pdt:
                # torch's module fails inside F.linear with "mat1 and mat2 must have the same dtype"
                raise TypeError(
                    f"fastgen.nn.MultiheadAttention: {name} has dtype {t.dtype}, expected {pdt} like the "
                    f"module's parameters (convert the input, or the module with .to({t.dtype}))"
                )
        for name, t, want in (
            ("query", query, self.embed_dim),
            ("key", key, self.kdim),
            ("value", value, self.vdim),
        ):
            if t.shape[-1] != want:
                raise _err(f"expected {name} feature size {want}, got {name} of shape {_shape(t)}")
        n = query.shape[bdim] if batched else 1
        tgt, src = query.shape[sdim], key.shape[sdim]
        for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if m is None:
                continue
            if not isinstance(m, torch.Tensor):
                raise _err(f"{name} must be a tensor, got {type(m).__name__}")
            if m.dtype != torch.bool and not m.is_floating_point():
                raise _err(f"only bool and floating types of {name} are supported, got {m.dtype}")
            if m.device != query.device:
                raise _err(f"{name} is on {m.device} but query is on {query.device}")
        if key_padding_mask is not None:
            want = (n, src) if batched else (src,)
            if _shape(key_padding_mask) != want:
                raise _err(
                    f"expected key_padding_mask of shape {want} (batch, source length), got {_shape(key_padding_mask)}"
                )
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                want = (tgt, src)
            elif attn_mask.dim() == 3:
                want = (n * self.num_heads, tgt, src)
            else:
                raise _err(
                    f"attn_mask must be 2-D (L, S) or 3-D (N * num_heads, L, S), got {_shape(attn_mask)}"
                )
            if _shape(attn_mask) != want:
                raise _err(
                    f"the shape of the {attn_mask.dim()}-D attn_mask is {_shape(attn_mask)}, but should be {want}"
                )
        return batched

    def _masks(self, key_padding_mask, attn_mask, n, tgt, src, n_extra, query):
        """(bias, mask) for the op: bias float (.., L, S) or None, mask bool True = attend or None; the
        n_extra appended keys (bias_k / zero attention) are visible, as in torch."""
        biases, masks = [], []
        if key_padding_mask is not None:
            m = key_padding_mask.reshape(n, 1, 1, -1)
            if m.dtype == torch.bool:
                masks.append(F.pad(~m, (0, n_extra), value=True))
            else:
                biases.append(F.pad(m, (0, n_extra)))
        if attn_mask is not None:
            m = (
                attn_mask.reshape(1, 1, tgt, -1)
                if attn_mask.dim() == 2
                else attn_mask.reshape(n, self.num_heads, tgt, -1)
            )
            if m.dtype == torch.bool:
                masks.append(F.pad(~m, (0, n_extra), value=True))
            else:
                biases.append(F.pad(m, (0, n_extra)))
        bias = None if not biases else biases[0] if len(biases) == 1 else biases[0] + biases[1]
        mask = None if not masks else masks[0] if len(masks) == 1 else masks[0] & masks[1]
        if bias is not None and bias.dtype != query.dtype:
            bias = bias.to(query.dtype)
        return bias, mask

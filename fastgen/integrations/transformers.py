"""fastgen attention as a transformers (v5) attention implementation.

Importing this module registers ``"fastgen"`` in transformers' ``AttentionInterface`` (and its mask
interface, with the same boolean masks as ``"sdpa"``), so that::

    import fastgen.integrations.transformers  # registers "fastgen"
    model = AutoModel.from_pretrained(name, attn_implementation="fastgen")
    model.set_attn_implementation("fastgen")  # or switch a loaded model (fastgen.swap_attention does it)

Every attention call of the model then comes to :func:`fastgen_attention_forward`, which serves it with
:func:`fastgen.scaled_dot_product_attention` (causal and padding masks, bool or additive of any
magnitude, GQA / MQA without repeating key / value heads, dropout in training, ``scaling``, T5-style
``position_bias`` as an additive bias that gets its gradient), or, where fastgen cannot serve the call,
falls back to the model's own implementation for that call and records why in :data:`FALLBACKS`:

* ``output_attentions=True`` or an attention-sink / soft-capping argument: the model's eager attention
  (SDPA cannot return the weights or cap the logits either);
* a query batch broadcast against the keys' batch: the model's sdpa path.

Sliding windows need nothing here: transformers builds them into the mask.
"""

from __future__ import annotations

import collections
import sys
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import create_position_bias_mask, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from fastgen.ops import attention as _attention

__all__ = ["FALLBACKS", "NAME", "fastgen_attention_forward", "register"]

NAME = "fastgen"
# (attention module class, reason) -> calls served by the model's own implementation instead (eager only:
# a compiled graph records nothing)
FALLBACKS: collections.Counter[tuple[str, str]] = collections.Counter()


def _fallback_reason(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> str:
    if kwargs.get("output_attentions"):
        return "output_attentions=True (eager attention returns the weights)"
    if kwargs.get("softcap") is not None:
        return "logit soft-capping (eager attention)"
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        return "attention sinks (eager attention)"
    if query.shape[0] != key.shape[0]:
        return f"query batch {query.shape[0]} broadcast against key batch {key.shape[0]} (sdpa)"
    return ""


def _model_eager(module: torch.nn.Module):
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return fn if callable(fn) else None


def fastgen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention-function contract. query: (B, Hq, Sq, D), key / value: (B, Hkv, Sk, D[v])
    (Hq a multiple of Hkv); attention_mask: bool (True = attend) or additive, broadcastable to
    (B, Hq, Sq, Sk), or None; position_bias: additive (B or 1, Hq, Sq, Sk). Returns ((B, Sq, Hq, Dv),
    None), the weights only from a fallback that computes them."""
    why = _fallback_reason(module, query, key, kwargs)
    if why:
        if not torch.compiler.is_compiling():
            FALLBACKS[(type(module).__name__, why)] += 1
        eager = _model_eager(module) if "eager" in why else None
        if eager is not None:
            return eager(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, position_bias=position_bias,
                                      **kwargs)  # fmt: skip
    q_len = query.shape[2]
    # as transformers' sdpa path: is_causal only without a mask (the mask then holds the causal pattern)
    # and never for one query (decoding sees every cached key)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = q_len > 1 and attention_mask is None and bool(causal)
    if position_bias is not None:
        attention_mask = create_position_bias_mask(position_bias, attention_mask, causal, query, key)
        causal = False
    gqa = query.shape[1] != key.shape[1]
    if _attention._sdpa_cpu_direct(query, key, value, attention_mask, dropout, causal, scaling, gqa):
        # what scaled_dot_product_attention would do with this call, without its Python layer
        out = _attention._sdpa_direct(query, key, value, attention_mask, dropout, causal, scaling, gqa)
    else:
        out = _attention.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=causal, scale=scaling,
            enable_gqa=gqa,
        )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"fastgen"`` with transformers (done on import; idempotent)."""
    AttentionInterface.register(NAME, fastgen_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


register()

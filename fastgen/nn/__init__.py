"""Drop-in ``nn.Module``\\ s over fastgen's ops, and helpers that swap them into existing models."""

from fastgen.nn.attention import MultiheadAttention
from fastgen.nn.moe import MoEAux, Top2MoE
from fastgen.nn.swap import SwapReport, swap_attention, unswap_attention
from fastgen.nn.vq import (
    DVAEQuantizer,
    OneHotConv1x1AsGather,
    ResidualVQ,
    VectorQuantize,
    decode_tokens,
    dvae_tokens,
)

__all__ = [
    "DVAEQuantizer",
    "MoEAux",
    "MultiheadAttention",
    "OneHotConv1x1AsGather",
    "ResidualVQ",
    "SwapReport",
    "Top2MoE",
    "VectorQuantize",
    "decode_tokens",
    "dvae_tokens",
    "swap_attention",
    "unswap_attention",
]

from fastgen.nn.pool import AdaptiveGridPool

__all__ += ["AdaptiveGridPool"]

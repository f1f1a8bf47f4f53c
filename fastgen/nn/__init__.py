"""Drop-in ``nn.Module``\\ s over fastgen's ops, and helpers that swap them into existing models."""

from fastgen.nn.attention import MultiheadAttention
from fastgen.nn.moe import MoEAux, Top2MoE
from fastgen.nn.swap import SwapReport, swap_attention, unswap_attention

__all__ = ["MoEAux", "MultiheadAttention", "SwapReport", "Top2MoE", "swap_attention", "unswap_attention"]

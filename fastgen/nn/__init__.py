"""Drop-in ``nn.Module``\\ s over fastgen's ops, and helpers that swap them into existing models."""

from fastgen.nn.attention import MultiheadAttention
from fastgen.nn.swap import SwapReport, swap_attention, unswap_attention

__all__ = ["MultiheadAttention", "SwapReport", "swap_attention", "unswap_attention"]

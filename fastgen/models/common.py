"""Pieces every autoregressive model here shares: token-id validation and logit sampling."""

from __future__ import annotations

from collections.abc import Callable

import torch


def check_integer_ids(name: str, t: torch.Tensor, err: Callable[[str], Exception]) -> None:
    """Raise ``err(message)`` unless ``t`` is an integer tensor (token ids)."""
    if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise err(f"{name} must be an integer tensor, got {getattr(t, 'dtype', type(t))}")


def check_id_range(name: str, t: torch.Tensor, vocab: int, err: Callable[[str], Exception]) -> None:
    """Raise ``err(message)`` unless every value of ``t`` lies in [0, vocab). It reads two scalars back from
    the device, so it is skipped while torch.compile traces."""
    if t.numel() and not torch.compiler.is_compiling():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= vocab:
            raise err(f"{name} must lie in [0, {vocab}), got values in [{lo}, {hi}]")


def sample_logits(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of logits (B, V): temperature, then top-k, then top-p filtering, then a draw
    from the softmax with ``generator``. temperature == 0 is greedy (argmax). Returns (B,) int64."""
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError(
            f"fastgen.models: need temperature >= 0, top_k >= 1, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}"
        )
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]

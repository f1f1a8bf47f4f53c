"""Pieces every model here shares: argument and token-id validation, and logit sampling."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastgen._checks import is_finite_real, is_int


def check_positive_int(name: str, v, err: Callable[[str], Exception], *, allow_none: bool = False) -> None:
    """Raise ``err(message)`` unless ``v`` is an int >= 1 (or None where ``allow_none``)."""
    if v is None and allow_none:
        return
    if not is_int(v) or v < 1:
        raise err(f"{name} must be a positive int{' or None' if allow_none else ''}, got {v!r}")


def check_finite(name: str, v, err: Callable[[str], Exception]) -> None:
    """Raise ``err(message)`` unless ``v`` is a finite real number (NaN / inf scales give NaN logits)."""
    if not is_finite_real(v):
        raise err(f"{name} must be a finite number, got {v!r}")


def check_sampling_args(
    temperature: float, top_k: int | None, top_p: float | None, err: Callable[[str], Exception]
) -> None:
    """Raise ``err(message)`` unless temperature is finite and >= 0, top_k None or an int >= 1 and top_p
    None or in (0, 1]. Python scalars only: no device work."""
    if not (is_finite_real(temperature) and temperature >= 0):
        raise err(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    check_positive_int("top_k", top_k, err, allow_none=True)
    if top_p is not None and not (is_finite_real(top_p) and 0 < top_p <= 1):
        raise err(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def check_integer_ids(name: str, t: torch.Tensor, err: Callable[[str], Exception]) -> None:
    """Raise ``err(message)`` unless ``t`` is an integer tensor (token ids)."""
    if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise err(f"{name} must be an integer tensor, got {getattr(t, 'dtype', type(t))}")


def check_id_range(name: str, t: torch.Tensor, vocab: int, err: Callable[[str], Exception]) -> None:
    """Raise ``err(message)`` unless every value of ``t`` lies in [0, vocab). It reads two scalars back from
    the device (one sync), so it is skipped while torch.compile traces."""
    if t.numel() and not torch.compiler.is_compiling():
        lo, hi = torch.stack(torch.aminmax(t)).tolist()
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
    check_sampling_args(temperature, top_k, top_p, lambda m: ValueError(f"fastgen.models.sample_logits: {m}"))
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

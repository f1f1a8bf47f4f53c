"""Checks of scalar arguments shared by the ops, modules and models: bad input gets an error naming the
argument before any kernel runs (DESIGN.md rule 4)."""

from __future__ import annotations

import math
import numbers

import torch


def is_int(v) -> bool:
    """A Python / NumPy integer, not a bool (True would silently mean 1)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_finite_real(v) -> bool:
    """A finite Python / NumPy real number, not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def check_real(
    where: str, name: str, value, lo: float, hi: float = math.inf, *, lo_open: bool = False
) -> float:
    """``value`` as a float, or a clear error: TypeError unless a real number (bool excluded), ValueError
    unless finite and in [lo, hi] ((lo, hi] with ``lo_open``). NaN fails every comparison, so it is named
    here rather than slipping through a ``not x < lo`` test."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi == math.inf else ']'}"
        raise ValueError(f"{where}: {name} must be in {rng} (finite), got {value}")
    return v


def check_int(where: str, name: str, value, lo: int) -> int:
    """``value`` as an int >= lo, or TypeError (not an integer: 2.5 would truncate silently) / ValueError."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < lo:
        raise ValueError(f"{where}: {name} must be >= {lo}, got {value}")
    return value if isinstance(value, torch.SymInt) else int(value)

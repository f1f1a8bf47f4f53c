"""Loads the compiled extension ``fastgen._C`` if it was built.

A missing extension is not an error: fastgen warns once and serves every op from Triton or torch.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import torch  # noqa: F401  (loads libc10 / libtorch, which fastgen._C links against)

C: ModuleType | None
_error: str | None = None

try:
    C = importlib.import_module("fastgen._C")
except ImportError as e:  # extension not built (FASTGEN_SKIP_EXT=1) or built for another torch
    C = None
    _error = f"{type(e).__name__}: {e}"
    if os.environ.get("FASTGEN_SKIP_EXT", "0") != "1":
        warnings.warn(
            "fastgen: the compiled extension fastgen._C is not available "
            f"({_error}); the cpp and cuda backends are disabled and ops run on triton / torch. "
            "Rebuild with `pip install --no-build-isolation -e .` to enable them.",
            RuntimeWarning,
            stacklevel=2,
        )


def load_error() -> str:
    return _error or "loaded"

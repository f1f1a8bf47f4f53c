"""fastgen's benchmark harness: ``python -m fastgen.bench`` runs every ``benchmarks/bench_*.py``.

Benchmark scripts use :func:`register`, :class:`Case`, :class:`Impl` and :func:`backend_impls`; the
contract is documented in :mod:`fastgen.bench.harness` and ``benchmarks/README.md``.
"""

from fastgen.bench.device import DeviceSpec, describe_device, nominal_spec
from fastgen.bench.harness import (
    Benchmark,
    Case,
    Check,
    Impl,
    Row,
    Timer,
    achieved_gbps,
    achieved_tflops,
    backend_impls,
    compare_outputs,
    headline_mode,
    main,
    peak_memory_mib,
    register,
    registered_benchmarks,
    token_agreement_check,
)

__all__ = [
    "Benchmark",
    "Case",
    "Check",
    "DeviceSpec",
    "Impl",
    "Row",
    "Timer",
    "achieved_gbps",
    "achieved_tflops",
    "backend_impls",
    "compare_outputs",
    "describe_device",
    "headline_mode",
    "main",
    "nominal_spec",
    "peak_memory_mib",
    "register",
    "registered_benchmarks",
    "token_agreement_check",
]
